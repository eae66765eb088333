#!/usr/bin/env bash
# Sets up .venv for this checkout: the CPU build of PyTorch, then the package with its extras.
# Usage: bash scripts/setup.sh [EXTRAS]   (default extras: data,test,hf,native)
# Then it compiles the optional C++ decoder step (transformer build-native, about a minute, cached in
# ~/.cache/transformer/native); without a compiler it says so and decoding runs the Python step.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-data,test,hf,native}"
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# Pin the CPU build first: an open range would pull a multi-GB CUDA build. With a GPU, install the
# CUDA build of your choice instead; the package's own range (torch>=2.3) will not replace it.
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[${extras}]"
python -m transformer build-native \
    || echo "note: the compiled decoder step did not build; CPU decoding runs the Python step (same results)"
echo "set up: $(python -c 'import torch, transformer; print("torch", torch.__version__, "| transformer", transformer.__version__)')"
