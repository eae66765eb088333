"""What the model tests share: a small encoder-decoder with non-zero biases (frozen and static decoding), and
the compiled extension's kernels built and looked up anew (dropout, attention)."""

import shutil

import pytest
import torch

from transformer.config import ModelConfig
from transformer.model import Transformer, native

HAVE_COMPILER = shutil.which("g++") is not None or shutil.which("c++") is not None


def biased_transformer(cfg: ModelConfig, vocab: int, device: str = "cpu") -> Transformer:
    """A seeded ``Transformer`` in eval mode with biases drawn from N(0, 0.1): a dropped or misplaced bias shows."""
    torch.manual_seed(0)
    model = Transformer(cfg, vocab, vocab).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model.to(device)


def built_kernel(kernel: native.Kernel, monkeypatch: pytest.MonkeyPatch):
    """The extension behind ``kernel``, built if needed and looked up anew for the test (the cached lookup comes
    back afterwards); skips without a compiler, or where the extension is off or cannot run here."""
    if not HAVE_COMPILER:
        pytest.skip("no C++ compiler to build the extension with")
    native.build()  # cached after the first build
    monkeypatch.setattr(kernel, "module", native.Kernel.UNSET)
    module = kernel.get()
    if module is None:
        pytest.skip("the extension is off (TRANSFORMER_NATIVE=0) or this CPU lacks AVX2/FMA")
    return module
