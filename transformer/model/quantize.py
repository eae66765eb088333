"""Int8 inference on CPU: every ``nn.Linear``'s weight as int8, with one scale per output channel.

The copy is PyTorch's dynamic quantisation: each Linear's weight is stored as int8 Q with one symmetric
scale s per output channel. Run as it is, each activation matrix is also quantised, to uint8 with a scale
computed from that batch, and the product runs in PyTorch's x86 (fbgemm) int8 kernels, rescaled to float32.
Decoding runs the copy frozen (:mod:`transformer.model.frozen`), and where the compiled extension is built
(``transformer build-native``, a CPU with AVX2 and FMA; with AVX-512 VNNI its ``vpdpbusd``, the same
bits) its products run instead in ``panel_linear_w8a8``
(since session 15; sessions 9-14 kept float32 activations): the same int8 weights and scales, each
activation row rounded to 7-bit unsigned values with its own scale and zero point, integer arithmetic with
exact int32 sums, so a row's result does not depend on the batch; the weights a decoder step reads are a
quarter of their float32 size.
Embeddings, LayerNorms, attention scores and the softmax stay in float32. Tied weights are not shared any
more in the copy (the output projection gets its own int8 weight), which is why it is an inference-only copy
of the model.

``torch.ao.quantization.quantize_dynamic`` is deprecated upstream in favour of torchao; it still ships
with torch 2.13, is the peer-tested path on CPU, and its warnings are silenced here.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from transformer.errors import TransformerError

SCHEMES = ("int8",)


def quantize(model: nn.Module, scheme: str = "int8") -> nn.Module:
    """An int8 copy of ``model`` for CPU inference (the float model is left untouched).

    Raises:
        TransformerError: an unknown scheme, or a model that is not on the CPU.
    """
    if scheme not in SCHEMES:
        raise TransformerError(f"unknown quantisation {scheme!r}; choose one of {', '.join(SCHEMES)}")
    param = next(model.parameters(), None)
    if param is not None and param.device.type != "cpu":
        raise TransformerError(
            f"int8 quantisation runs on the CPU only; this model is on {param.device} "
            "(on a GPU use bf16 instead)"
        )
    if "x86" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "x86"
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    model = copy.deepcopy(model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation notices of torch.ao.quantization
        return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)


def w8a8_row_rounding(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row of x rounded as ``panel_linear_w8a8`` (``csrc/decoder_step.cpp``) rounds it, in torch: the
    reference its tests and ``benchmarks/bench_micro.py`` check the compiled kernel against.

    lo = min(row, 0), hi = max(row, 0), sx = (hi - lo) / 127, z = round(-lo / sx) and
    u = clamp(round(x / sx) + z, 0, 127), rounding half to even, so x ~ sx (u - z) and 0 stays exact. The
    scale's reciprocal is computed as 127 / (hi - lo), a division, as the kernel does (``127 / t`` is
    ``127 * (1 / t)`` in torch, which can differ in the last bit). A row of zeros gets u = z = sx = 0.

    Shapes:
        x (N, in) -> u (N, in), z (N, 1), sx (N, 1), all float64 (u and z hold integers).
    """
    lo, hi = x.amin(-1, keepdim=True).clamp_max(0), x.amax(-1, keepdim=True).clamp_min(0)  # (N,1) each
    span = hi - lo
    inv = torch.where(span > 0, torch.full_like(span, 127.0) / span, 0.0)  # (N,1)
    z = torch.round(-lo * inv)
    u = (torch.round(x * inv) + z).clamp(0, 127)
    return u.double(), z.double(), (span / 127).double()
