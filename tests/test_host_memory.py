"""keep_freed_memory: large CPU tensors reuse freed memory instead of faulting in fresh pages; the trainer
and the inference API (decode.keep_freed_memory) set it on the CPU unless told not to."""

import platform
import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
if sys.argv[1] == "keep":
    from transformer.host_memory import keep_freed_memory
    assert keep_freed_memory()
elif sys.argv[1].startswith("translator"):  # what the inference API does on the CPU, by decode.keep_freed_memory
    from transformer.config import DecodeConfig, ModelConfig
    from transformer.inference import Translator
    from transformer.model import build_model
    cfg = ModelConfig(d_model=16, n_heads=2, d_ff=32, n_encoder_layers=1, n_decoder_layers=1, max_positions=16)
    Translator(build_model(cfg, 8).eval(), None, DecodeConfig(keep_freed_memory=sys.argv[1] == "translator"))
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


PAGES = 5 * 92_000_000 // 4096  # the probe's five steps of 92 MB, in 4 KiB pages


def faults(mode: str) -> int:
    """The page faults of the probe's last five steps in a fresh process, in ``mode``."""
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_freed_blocks_are_reused_instead_of_mapped_afresh():
    assert faults("system") > PAGES // 2  # each block mapped and faulted in again (one fault per 4 KiB page)
    assert faults("keep") < PAGES // 20  # the same block, reused from the heap


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_inference_api_keeps_freed_memory_on_the_cpu_unless_told_not_to():
    assert faults("translator") < PAGES // 20  # Translator set it (the decode section's default)
    assert faults("translator-off") > PAGES // 2  # decode.keep_freed_memory=false: the allocator as it was
