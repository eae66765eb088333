"""Keeping freed host memory for reuse (glibc's ``mallopt``), for training and decoding on the CPU.

glibc's ``malloc`` maps every block above a threshold (32 MiB at most) afresh with ``mmap`` and unmaps it when
freed, and returns the top of its heap to the system when more than a threshold is free there. A training step
frees and allocates the same large tensors every time (the logits of a 2048-token batch over 8000 types are
65 MB), so each step paid a page fault, and the zeroing of a page, for every 4 KiB of them: tens of thousands of
faults a step at the ``small`` preset with 2048-token batches, against hundreds with the settings below
(``M_MMAP_MAX = 0``: every block from the heap; ``M_TRIM_THRESHOLD = 1 GiB``: freed memory stays for the next
step). Decoding does the same at a smaller scale: each step's logits (4 MB at 128 rows of beam search over
8000 types), the KV buffers, which double in size as a batch's outputs grow, and each new batch's buffers (see
BENCHMARKS.md, session 17). PyTorch's own CPU tuning guide makes the same point by swapping in jemalloc or
tcmalloc; this needs nothing installed. The price is that the process keeps its peak heap for its lifetime.
Other C libraries (no ``mallopt``) are left as they are. ``train.keep_freed_memory: false`` and
``decode.keep_freed_memory: false`` turn it off.
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's <malloc.h>
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Tell glibc's allocator to serve large blocks from its heap and keep what is freed; True if it did."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    log.debug("host allocator: keep freed memory: %s", done)
    return done


__all__ = ["keep_freed_memory"]
