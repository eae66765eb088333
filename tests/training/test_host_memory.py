"""keep_freed_memory: large CPU tensors reuse freed memory instead of faulting in fresh pages."""

import platform
import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
if sys.argv[1] == "keep":
    from transformer.training.host_memory import keep_freed_memory
    assert keep_freed_memory()
def step():  # a training step's pattern: large blocks (40 MB, above glibc's largest mmap threshold) come and go
    x = torch.empty(10_000_000).fill_(1.0)
    y = torch.empty(3_000_000).fill_(1.0)
    del x
    z = torch.empty(10_000_000).fill_(1.0)
    del y, z
for _ in range(5):  # the heap settles (aligned requests need a little more than a freed block)
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_freed_blocks_are_reused_instead_of_mapped_afresh():
    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    pages = 5 * 92_000_000 // 4096  # five steps of 92 MB
    assert faults("system") > pages // 2  # each block mapped and faulted in again (one fault per 4 KiB page)
    assert faults("keep") < pages // 20  # the same block, reused from the heap
