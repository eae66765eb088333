"""transformer: the Transformer of "Attention Is All You Need" as real, fast software."""

import os

# OpenMP threads that spin while waiting make PyTorch 10-30x slower on a CPU shared with another busy
# process (measured here: an Adam step took 1.3 s instead of 72 ms with one other process running); passive
# waiting costs nothing measurable on an idle machine. Only effective if torch is not imported yet, and a
# value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# On Hopper GPUs torch (2.11-2.13) sends bf16/fp16 scaled_dot_product_attention to cuDNN first, and cuDNN
# builds an execution plan for every new (batch, length) shape: milliseconds per new shape. Decoding grows
# the key length every step and token-bucket training varies both, so that made our bf16 greedy search at
# batch 32 16x slower than float32 on an H100 (BENCHMARKS.md). Flash / memory-efficient attention have no
# per-shape cost. Read by torch at its first attention call; a value the user set wins.
os.environ.setdefault("TORCH_CUDNN_SDPA_DEPRIORITIZED", "1")

__version__ = "0.1.0"
