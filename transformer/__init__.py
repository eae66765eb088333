"""transformer: the Transformer of "Attention Is All You Need" as real, fast software."""

import os

# How long PyTorch's OpenMP threads (libgomp) spin before they sleep between parallel regions. libgomp's
# default (300,000 spins) makes PyTorch many times slower on a CPU shared with another busy process (on the Zen 1
# machine an Adam step took 1.3 s instead of 72 ms with one other process running; on session 27's 2-core Intel
# Xeon two training processes side by side took 2.5-2.8 s a step each, 0.24 s alone). Not spinning at all
# (OMP_WAIT_POLICY=PASSIVE, our default until session 27) avoids that, but on that Xeon (KVM), where waking a
# sleeping thread is slow, it made a training step 1.26x slower and greedy search at batch 1 4.4x slower on an
# idle machine. 10,000 spins: 0.24 s a step alone, 0.52-0.53 s each side by side (passive: 0.47-0.48)
# (benchmarks/bench_openmp.py, BENCHMARKS.md session 27). Only effective if torch is not imported yet; a value
# the user set for either variable wins (Intel's OpenMP, in builds of torch that use it, reads KMP_BLOCKTIME
# instead).
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
# On Hopper GPUs torch (2.11-2.13) sends bf16/fp16 scaled_dot_product_attention to cuDNN first, and cuDNN
# builds an execution plan for every new (batch, length) shape: milliseconds per new shape. Decoding grows
# the key length every step and token-bucket training varies both, so that made our bf16 greedy search at
# batch 32 16x slower than float32 on an H100 (BENCHMARKS.md). Flash / memory-efficient attention have no
# per-shape cost. Read by torch at its first attention call; a value the user set wins.
os.environ.setdefault("TORCH_CUDNN_SDPA_DEPRIORITIZED", "1")

__version__ = "0.1.0"
