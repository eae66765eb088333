"""Dropout (section 5.4) with masks drawn 16 bits at a time on the CPU.

PyTorch's CPU dropout fills its mask with ``bernoulli_``, one draw of its Mersenne Twister per element,
on one thread: about 10 ns per element on the benchmark CPU, which made the masks the largest cost of a
training step after the matrix products (5-7% at the ``small`` preset). Here one 64-bit draw of the same
generator (``torch.randint`` over the full int64 range) makes four 16-bit lanes, and each lane is kept when
it is at least a threshold: a keep probability of ``1 - round(p * 65536) / 65536`` (``p`` to within
1/131072), with the kept elements scaled by the inverse of that probability, so the expectation is exact.
The mask is several times cheaper than ``bernoulli_``, comes from ``torch``'s default generator (so
``torch.manual_seed`` and the trainer's saved RNG state reproduce it), and is a plain tensor that autograd
saves for the backward pass, as PyTorch's own CPU dropout saves its mask.

On other devices (CUDA's dropout is one fused kernel) and for ``p`` of 0 or 1 this is ``nn.Dropout``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

_LANES = 65536  # values of one 16-bit lane


def dropout_mask(like: Tensor, p: float) -> Tensor:
    """A mask shaped and typed as ``like``: 0 with probability ``p`` (rounded to 1/65536), else 1 / (1 - p)."""
    dropped = round(p * _LANES)  # lanes below the threshold are dropped
    n = like.numel()
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=like.device)
    lanes = words.view(torch.int16)[:n].view(like.shape)  # (like), uniform over -32768..32767
    keep = lanes >= dropped - _LANES // 2
    return keep.to(like.dtype).mul_(_LANES / (_LANES - dropped))


def _fast(module: nn.Dropout, x: Tensor) -> bool:
    return module.training and 0.0 < module.p < 1.0 and x.device.type == "cpu" and not module.inplace


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same arguments, no parameters) whose CPU masks come from :func:`dropout_mask`."""

    def forward(self, x: Tensor) -> Tensor:
        if not _fast(self, x):
            return super().forward(x)
        return x * dropout_mask(x, self.p)

    def residual(self, residual: Tensor, x: Tensor) -> Tensor:
        """``residual + dropout(x)`` in one pass over the elements on the CPU (``torch.addcmul``)."""
        if not _fast(self, x):
            return residual + super().forward(x)
        return torch.addcmul(residual, x, dropout_mask(x, self.p))


__all__ = ["Dropout", "dropout_mask"]
