"""Dropout (section 5.4) with cheaper masks on the CPU.

PyTorch's CPU dropout fills its mask with ``bernoulli_``, one draw of its Mersenne Twister per element, on one
thread: about 10 ns per element on the benchmark CPU, which made the masks the largest cost of a training step
after the matrix products (5-7% at the ``small`` preset). Two cheaper forms here, both keeping an element
with probability ``1 - round(p * 65536) / 65536`` (``p`` to within 1/131072) and scaling the kept ones by the
inverse of that probability, so the expectation is exact:

- with the compiled extension built (``transformer build-native``), ``dropout_apply`` in
  ``csrc/decoder_step.cpp``: one 64-bit seed drawn from ``torch``'s default generator per call, and element
  ``i`` kept when 16 bits of a hash of (seed, ``i``) clear the threshold. The mask is computed where it is
  applied, in one pass over the elements (with the residual add, for :meth:`Dropout.residual`), and again in
  the backward pass from the same seed, so it is never stored (the backward saves one integer). Several
  times faster than the form below per call, and about 3% of a ``small`` training step (BENCHMARKS.md, session 18);
- otherwise, :func:`dropout_mask`: one 64-bit draw of ``torch``'s generator (``torch.randint`` over the
  full int64 range) makes four 16-bit lanes, each compared with the threshold: a plain tensor that autograd
  saves for the backward pass, as PyTorch's own CPU dropout saves its mask.

Both come from ``torch``'s default generator, so ``torch.manual_seed`` and the trainer's saved RNG state
reproduce them. On other devices (CUDA's dropout is one fused kernel), for ``p`` of 0 or 1, and under
``torch.compile`` this is ``nn.Dropout``'s or the mask form's arithmetic.
"""

from __future__ import annotations

from types import ModuleType
from typing import ContextManager, Optional

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from transformer.model import native

_LANES = 65536  # values of one 16-bit lane
_KERNEL = native.Kernel("dropout_apply")  # the extension, looked up once per process


def _threshold(p: float) -> tuple[int, float]:
    """(lanes dropped of 65536: p rounded, at most 65535; the kept elements' scale)."""
    dropped = min(round(p * _LANES), _LANES - 1)
    return dropped, _LANES / (_LANES - dropped)


def dropout_mask(like: Tensor, p: float) -> Tensor:
    """A mask shaped and typed as ``like``: 0 with probability ``p`` (rounded to 1/65536), else 1 / (1 - p)."""
    dropped, scale = _threshold(p)  # lanes below the threshold are dropped
    n = like.numel()
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=like.device)
    lanes = words.view(torch.int16)[:n].view(like.shape)  # (like), uniform over -32768..32767
    keep = lanes >= dropped - _LANES // 2
    return keep.to(like.dtype).mul_(scale)


def kernel() -> Optional[ModuleType]:
    """The compiled extension (with ``dropout_apply``) if it is built and enabled, else None; looked up once."""
    return _KERNEL.get()


def stored_masks() -> ContextManager[None]:
    """Within the block, the stored-mask form even where the hashed one applies (comparisons: the
    ``ours_stored_masks`` peer of ``benchmarks/bench_train.py``, tests). Forward passes read the choice; a
    backward pass follows what its forward pass chose."""
    return _KERNEL.off()


def hashed_mask(p: float) -> tuple[int, int, float]:
    """(seed, dropped lanes, scale): the arguments of the extension's hashed mask for dropout ``p``, one seed drawn
    from ``torch``'s default generator (no draw, and a mask that keeps all, for ``p`` of 0)."""
    if p == 0.0:
        return 0, 0, 1.0
    return int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64)), *_threshold(p)


class _HashedDropout(torch.autograd.Function):
    """``(residual +) x * mask(seed)`` with the mask recomputed from the seed in the backward pass."""

    @staticmethod
    def forward(ctx, x: Tensor, residual: Optional[Tensor], p: float, module: ModuleType) -> Tensor:
        ctx.args = hashed_mask(p)
        ctx.module, ctx.with_residual = module, residual is not None
        return module.dropout_apply(x, residual, *ctx.args)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # d/dx = the same mask; d/dresidual = 1
        grad_x = ctx.module.dropout_apply(grad, None, *ctx.args) if ctx.needs_input_grad[0] else None
        return grad_x, (grad if ctx.with_residual else None), None, None


def _fast(module: nn.Dropout, x: Tensor) -> bool:
    return module.training and 0.0 < module.p < 1.0 and x.device.type == "cpu" and not module.inplace


def _hashed(x: Tensor, residual: Optional[Tensor] = None) -> Optional[ModuleType]:
    """The extension when the hashed form applies to ``x`` (float32, not under ``torch.compile``)."""
    if x.dtype != torch.float32 or torch.compiler.is_compiling():
        return None
    if residual is not None and (residual.shape != x.shape or residual.dtype != torch.float32):
        return None
    return kernel()


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same arguments, no parameters) with the CPU masks described in this module."""

    def forward(self, x: Tensor) -> Tensor:
        if not _fast(self, x):
            return super().forward(x)
        module = _hashed(x)
        if module is not None:
            return _HashedDropout.apply(x, None, self.p, module)
        return x * dropout_mask(x, self.p)

    def residual(self, residual: Tensor, x: Tensor) -> Tensor:
        """``residual + dropout(x)`` in one pass over the elements on the CPU."""
        if not _fast(self, x):
            return residual + super().forward(x)
        module = _hashed(x, residual)
        if module is not None:
            return _HashedDropout.apply(x, residual, self.p, module)
        return torch.addcmul(residual, x, dropout_mask(x, self.p))


__all__ = ["Dropout", "dropout_mask", "hashed_mask", "kernel", "stored_masks"]
