"""Keeping freed CPU memory inside the process, for CPU training.

glibc's malloc serves large blocks (above a threshold that adapts up to 32 MiB) with ``mmap`` and
returns them with ``munmap`` when freed; it also gives the top of the heap back to the system once
more than the trim threshold is free there. A training step allocates and frees the same large
tensors every time (activations, logits of seq_length x vocabulary, gradients), so each step maps
fresh pages and the kernel zero-fills them on first touch: at the 125M shape on this project's CPU
that was 9 % of a step (1.9 s of 21.5 s), more for RETRO than for GPT (benchmarks/README.md).
Raising the mmap threshold and turning trimming off lets freed blocks be reused from the heap: the
process keeps its peak footprint instead of returning it between steps.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

# <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

# mallopt takes a C int: blocks of 2 GiB and more are still mapped. A trim threshold of -1 turns
# trimming off (mallopt(3)): the free top of the heap is never handed back, however large it grows
# (a 125M step on a CPU frees several GiB of activations at once).
MMAP_THRESHOLD = (1 << 31) - 1
TRIM_THRESHOLD = -1


def keep_freed_memory() -> bool:
    """Raise glibc's mmap threshold and turn heap trimming off for this process. False where that is not possible
    (not glibc: macOS, musl), leaving the allocator as it was."""
    try:
        libc = ctypes.CDLL(None)  # the symbols already loaded into this process, libc's among them
        mallopt = libc.mallopt
        gnu_get_libc_version = libc.gnu_get_libc_version  # glibc only: musl's mallopt is a no-op
    except (OSError, AttributeError):
        return False
    gnu_get_libc_version.restype = ctypes.c_char_p
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if ok:
        log.debug("glibc %s: mmap threshold %d, trim threshold %d", gnu_get_libc_version().decode(),
                  MMAP_THRESHOLD, TRIM_THRESHOLD)
    return ok
