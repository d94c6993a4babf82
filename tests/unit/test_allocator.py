"""retro_ray.allocator: a process that keeps freed memory stops faulting in its large tensors anew."""
from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from retro_ray import allocator

# Allocate and free the same large tensors again and again, as training steps do; count the page
# faults of the last rounds (the first ones fault in the heap once either way). 3 GiB are alive at once,
# as the activations of a 125M step on a CPU are, in blocks above glibc's adaptive mmap ceiling.
_STEPS = r"""
import json, resource, sys, torch
from retro_ray.allocator import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
def step():
    held = [torch.empty(32 << 20) for _ in range(24)] + [torch.empty(4 << 20)]  # 24 x 128 MiB + 16 MiB
    for t in held:
        t.view(-1, 1024)[:, 0] = 1.0  # touch every 4 KiB page once
for _ in range(2):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(int(sys.argv[2])):
    step()
print(json.dumps({"kept": kept, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""
STEPS = 5
_PAGES_PER_STEP = (24 * (128 << 20) + (16 << 20)) // 4096


def _faults(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _STEPS, mode, str(STEPS)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")
def test_kept_memory_is_reused_instead_of_faulted_in_every_step():
    default, kept = _faults("default"), _faults("keep")
    assert kept["kept"] is True and default["kept"] is False
    pages = STEPS * _PAGES_PER_STEP  # what mapping every tensor afresh each step costs
    assert default["faults"] > pages // 2, default
    assert kept["faults"] < pages // 10, kept


def test_thresholds_fit_mallopts_int():
    assert 0 < allocator.MMAP_THRESHOLD <= 2**31 - 1 and allocator.TRIM_THRESHOLD == -1  # -1: never trim
