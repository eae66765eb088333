"""Encoder and decoder layers (section 3.1): attention and feed-forward sub-layers with residuals.

Each sub-layer's output goes through dropout before the residual add. With ``norm_first=False`` (the
paper) the LayerNorm follows the add: ``x = norm(x + dropout(sublayer(x)))``; with ``norm_first=True``
it precedes the sub-layer: ``x = x + dropout(sublayer(norm(x)))``.

On the CPU, a training step's ReLU feed-forward network runs as one autograd function with two kernels of the
compiled extension (``transformer build-native``): fc1's bias and the ReLU in one in-place pass over the
product, and in the backward pass the ReLU's gradient in place with fc1's bias gradient summed in the same
pass (BENCHMARKS.md, session 20). Without the extension, ``nn.Linear`` and ``F.relu`` do the same maths.

In the post-norm layers (the paper's), a training step's sub-layer ends on the CPU as one autograd function
too, ``_AddNorm``: the sub-layer's last product (the attention's output projection, fc2) runs without its bias,
and one pass of the extension per row adds the bias, applies the dropout mask (hashed as
:mod:`transformer.model.dropout`'s), adds the residual and normalises, ``norm(x + dropout(sublayer(x)))``; its
backward pass is one pass too, with the column sums for the LayerNorm's weight and bias and the sub-layer's
bias (BENCHMARKS.md, session 24). ``unfused_add_norm()`` turns it off for comparisons.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable, ContextManager, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from transformer.config import ModelConfig
from transformer.model import native
from transformer.model.attention import KVCache, MultiHeadAttention
from transformer.model.dropout import Dropout, hashed_mask

_KERNEL = native.Kernel("relu_grad_")  # the extension, looked up once per process
_ADD_NORM = native.Kernel("add_norm_forward")


def plain_feed_forward() -> ContextManager[None]:
    """Within the block, ``nn.Linear`` and ``F.relu`` even where the fused form applies (comparisons: the
    ``ours_plain_ffn`` peer of ``benchmarks/bench_train.py``, tests). A backward pass follows its forward pass."""
    return _KERNEL.off()


class _ReluFeedForward(torch.autograd.Function):
    """``relu(x W1^T + b1) W2^T + b2`` with the extension's in-place bias + ReLU and ReLU-gradient passes."""

    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Optional[Tensor],
                module: ModuleType) -> Tensor:
        x2 = x.reshape(-1, x.size(-1))  # (N,D)
        h = torch.mm(x2, w1.t())  # (N,F)
        module.bias_relu_(h, b1)
        y = torch.addmm(b2, h, w2.t()) if b2 is not None else torch.mm(h, w2.t())  # (N,D)
        ctx.save_for_backward(x2, w1, h, w2)
        ctx.module = module
        return y.view(*x.shape[:-1], y.size(-1))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor):
        x2, w1, h, w2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        gy = grad_y.reshape(-1, grad_y.size(-1))  # (N,D)
        gx = gw1 = gb1 = None
        gw2 = gy.t().mm(h) if need[3] else None  # (D,F)
        gb2 = gy.sum(0) if need[4] else None  # (D,)
        if need[0] or need[1] or need[2]:
            gh = gy.mm(w2)  # (N,F)
            sums = ctx.module.relu_grad_(gh, h)  # gh through the ReLU, in place; its column sums: fc1's bias
            gb1 = sums if need[2] else None
            gw1 = gh.t().mm(x2) if need[1] else None  # (F,D)
            gx = gh.mm(w1).view(grad_y.shape[:-1] + (w1.size(1),)) if need[0] else None
        return gx, gw1, gb1, gw2, gb2, None


def unfused_add_norm() -> ContextManager[None]:
    """Within the block, the post-norm layers end their sub-layers with ``nn.Linear``'s bias, the dropout's
    residual pass and ``nn.LayerNorm`` even where ``_AddNorm`` applies (comparisons: the ``ours_unfused_norm``
    peer of ``benchmarks/bench_train.py``, tests). A backward pass follows its forward pass."""
    return _ADD_NORM.off()


class _AddNorm(torch.autograd.Function):
    """``layer_norm(residual + dropout(s + bias))`` over the last dimension, in one pass of the extension each way;
    s (B,T,D) is the sub-layer's output without its bias. Saved for the backward pass: the normalised rows and
    1/std per row (about what ``nn.LayerNorm`` keeps: its input, the mean and 1/std per row) and the mask's seed."""

    @staticmethod
    def forward(ctx, s: Tensor, bias: Optional[Tensor], residual: Tensor, weight: Tensor, norm_bias: Tensor,
                p: float, eps: float, module: ModuleType) -> Tensor:
        ctx.args = hashed_mask(p)  # (seed, dropped, scale), as the dropout's residual pass draws it
        y, x_hat, rstd = module.add_norm_forward(s.contiguous(), bias, residual.contiguous(), *ctx.args, weight,
                                                 norm_bias, eps)  # (B,T,D), (B,T,D), (B*T,)
        ctx.save_for_backward(x_hat, rstd, weight)
        ctx.module = module
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x_hat, rstd, weight = ctx.saved_tensors
        grad_residual, grad_s, grad_weight, grad_norm_bias, grad_bias = ctx.module.add_norm_backward(
            grad, x_hat, rstd, weight, *ctx.args)
        need = ctx.needs_input_grad
        return (grad_s if need[0] else None, grad_bias if need[1] else None, grad_residual if need[2] else None,
                grad_weight if need[3] else None, grad_norm_bias if need[4] else None, None, None, None)


def _add_norm_kernel(layer: nn.Module, x: Tensor, ends: tuple) -> Optional[ModuleType]:
    """The extension where ``_AddNorm`` ends the sub-layers of a post-norm ``layer`` on input ``x``: a gradient
    recorded on the CPU, float32 (no autocast), not under ``torch.compile``, dropout below 1; ``ends``, the
    sub-layers' (output projection, norm) pairs: ``nn.Linear`` with a bias, ``nn.LayerNorm`` over the last
    dimension with weight and bias, float32. Else None."""
    if (layer.norm_first or not torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype != torch.float32
            or torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling()
            or type(layer.dropout) is not Dropout or layer.dropout.inplace or layer.dropout.p >= 1.0):
        return None
    for projection, norm in ends:
        if (type(projection) is not nn.Linear or projection.bias is None or projection.weight.dtype != torch.float32
                or type(norm) is not nn.LayerNorm or norm.weight is None or norm.bias is None
                or norm.normalized_shape != (x.size(-1),) or norm.weight.dtype != torch.float32):
            return None
    return _ADD_NORM.get()


def _post_norm_end(fused: Optional[ModuleType], residual: Tensor, run: Callable[[bool], Tensor], projection: nn.Module,
                   norm: nn.LayerNorm, dropout: Dropout) -> Tensor:
    """``norm(residual + dropout(sublayer))``, the sub-layer's output from ``run(out_bias)``: with its bias and the
    separate ops, or through ``_AddNorm`` (the extension ``fused``, from ``_add_norm_kernel``) without it, the
    bias of ``projection`` (its output projection) added there."""
    if fused is None:
        return norm(dropout.residual(residual, run(True)))
    p = dropout.p if dropout.training else 0.0
    return _AddNorm.apply(run(False), projection.bias, residual, norm.weight, norm.bias, p, norm.eps, fused)


class FeedForward(nn.Module):
    """Position-wise feed-forward network: ``fc2(dropout(activation(fc1(x))))`` (section 3.3)."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "relu", activation_dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.activation = F.relu if activation == "relu" else F.gelu
        self.dropout = Dropout(activation_dropout)

    def forward(self, x: Tensor, out_bias: bool = True) -> Tensor:  # (B,T,D) -> (B,T,D)
        """With ``out_bias=False``, fc2's bias is left out (fc2 must be an ``nn.Linear``): the post-norm layers add it
        in the pass that ends the sub-layer (``_AddNorm``)."""
        module = self._fused(x)
        b2 = self.fc2.bias if out_bias else None
        if module is not None:
            return _ReluFeedForward.apply(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, b2, module)
        h = self.dropout(self.activation(self.fc1(x)))
        return self.fc2(h) if out_bias else F.linear(h, self.fc2.weight)

    def _fused(self, x: Tensor) -> Optional[ModuleType]:
        """The extension where the fused form applies: a training step's ReLU network on the CPU, float32 (no
        autocast), no dropout inside it, ``nn.Linear`` layers with biases, not under ``torch.compile``."""
        if not (torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32
                and not torch.is_autocast_enabled("cpu")
                and self.activation is F.relu and (self.dropout.p == 0.0 or not self.training)
                and type(self.fc1) is nn.Linear and type(self.fc2) is nn.Linear
                and self.fc1.bias is not None and self.fc2.bias is not None
                and self.fc1.weight.dtype == torch.float32 and not torch.compiler.is_compiling()):
            return None
        return _KERNEL.get()


class EncoderLayer(nn.Module):
    """Self-attention then feed-forward."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm_first = cfg.norm_first
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.attention_dropout)
        self.self_attn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.activation, cfg.activation_dropout)
        self.ffn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: Tensor, src_mask: Optional[Tensor]) -> Tensor:
        """x (B,S,D); src_mask (B,1,1,S) True = real token, or None when nothing is padded."""
        if self.norm_first:
            h = self.self_attn_norm(x)
            x = self.dropout.residual(x, self.self_attn(h, h, attn_mask=src_mask))
            return self.dropout.residual(x, self.ffn(self.ffn_norm(x)))
        ends = ((self.self_attn.out_proj, self.self_attn_norm), (self.ffn.fc2, self.ffn_norm))
        fused = _add_norm_kernel(self, x, ends)
        x = _post_norm_end(fused, x, lambda bias: self.self_attn(x, x, attn_mask=src_mask, out_bias=bias),
                           self.self_attn.out_proj, self.self_attn_norm, self.dropout)
        return _post_norm_end(fused, x, lambda bias: self.ffn(x, out_bias=bias), self.ffn.fc2, self.ffn_norm,
                              self.dropout)


@dataclass
class LayerCache:
    """Incremental state of one decoder layer: its self-attention history and the source's keys/values."""

    self_attn: KVCache = field(default_factory=KVCache)
    cross_kv: Optional[tuple[Tensor, Tensor]] = None  # each (B,H,S,Dh), computed once per source

    def reorder(self, new_order: Tensor, sources_changed: bool = True) -> None:
        self.self_attn.reorder(new_order)
        if sources_changed and self.cross_kv is not None:
            self.cross_kv = (self.cross_kv[0].index_select(0, new_order), self.cross_kv[1].index_select(0, new_order))


class DecoderLayer(nn.Module):
    """Masked self-attention, then (encoder-decoder only) cross-attention, then feed-forward."""

    def __init__(self, cfg: ModelConfig, cross_attention: bool = True) -> None:
        super().__init__()
        self.norm_first = cfg.norm_first
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.attention_dropout)
        self.self_attn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        if cross_attention:
            self.cross_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.attention_dropout)
            self.cross_attn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        else:
            self.cross_attn = None
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.activation, cfg.activation_dropout)
        self.ffn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.dropout)

    def _self_attention(
        self, x: Tensor, self_attn_mask: Optional[Tensor], is_causal: bool, cache: Optional[LayerCache],
        out_bias: bool = True,
    ) -> Tensor:
        return self.self_attn(
            x, x, attn_mask=self_attn_mask, is_causal=is_causal, cache=cache.self_attn if cache is not None else None,
            out_bias=out_bias,
        )

    def _cross_attention(
        self, x: Tensor, memory: Tensor, memory_mask: Optional[Tensor], cache: Optional[LayerCache],
        out_bias: bool = True,
    ) -> Tensor:
        if cache is None:
            return self.cross_attn(x, memory, attn_mask=memory_mask, out_bias=out_bias)
        if cache.cross_kv is None:
            cache.cross_kv = self.cross_attn.project_kv(memory)
        return self.cross_attn.attend(x, *cache.cross_kv, attn_mask=memory_mask, out_bias=out_bias)

    def forward(
        self,
        x: Tensor,
        memory: Optional[Tensor] = None,
        memory_mask: Optional[Tensor] = None,
        self_attn_mask: Optional[Tensor] = None,
        is_causal: bool = False,
        cache: Optional[LayerCache] = None,
    ) -> Tensor:
        """x (B,T,D); memory (B,S,D) with memory_mask (B,1,1,S); self-attention masked by
        ``is_causal`` or an explicit ``self_attn_mask`` (B|1,1,T,T_total)."""
        if self.norm_first:
            x = self.dropout.residual(x, self._self_attention(self.self_attn_norm(x), self_attn_mask, is_causal, cache))
            if self.cross_attn is not None:
                x = self.dropout.residual(x, self._cross_attention(self.cross_attn_norm(x), memory, memory_mask, cache))
            return self.dropout.residual(x, self.ffn(self.ffn_norm(x)))
        ends = ((self.self_attn.out_proj, self.self_attn_norm), (self.ffn.fc2, self.ffn_norm))
        if self.cross_attn is not None:
            ends += ((self.cross_attn.out_proj, self.cross_attn_norm),)
        fused = _add_norm_kernel(self, x, ends)
        x = _post_norm_end(fused, x, lambda bias: self._self_attention(x, self_attn_mask, is_causal, cache, bias),
                           self.self_attn.out_proj, self.self_attn_norm, self.dropout)
        if self.cross_attn is not None:
            x = _post_norm_end(fused, x, lambda bias: self._cross_attention(x, memory, memory_mask, cache, bias),
                               self.cross_attn.out_proj, self.cross_attn_norm, self.dropout)
        return _post_norm_end(fused, x, lambda bias: self.ffn(x, out_bias=bias), self.ffn.fc2, self.ffn_norm,
                              self.dropout)
