"""retro_ray.allocator: a process that keeps freed memory stops faulting in its large tensors anew."""
from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from retro_ray import allocator

# Allocate and free the same large tensors again and again, as training steps do; count the page
# faults of the last rounds (the first ones fault in the heap once either way).
_STEPS = r"""
import json, resource, sys, torch
from retro_ray.allocator import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
def step():
    a = torch.ones(4096, 1024)       # 16 MiB: above glibc's initial mmap threshold
    b = torch.ones(8192, 4096)       # 128 MiB: above the adaptive threshold's 32 MiB ceiling
    return float(a[0, 0] + b[0, 0])
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(json.dumps({"kept": kept, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _faults(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _STEPS, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")
def test_kept_memory_is_reused_instead_of_faulted_in_every_step():
    default, kept = _faults("default"), _faults("keep")
    assert kept["kept"] is True and default["kept"] is False
    pages = 20 * (144 << 20) // 4096  # what mapping both tensors afresh each step costs
    assert default["faults"] > pages // 2, default
    assert kept["faults"] < pages // 5, kept  # measured: ~9 % (the heap grows to fit both once)


def test_thresholds_fit_mallopts_int():
    assert 0 < allocator.MMAP_THRESHOLD <= allocator.TRIM_THRESHOLD <= 2**31 - 1
