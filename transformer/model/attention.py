"""Multi-head attention (section 3.2) through ``scaled_dot_product_attention``, and its KV cache.

Shapes: B batch, T query length, S key length, D model width, H heads, Dh = D / H.
Masks are boolean, True = "may attend", broadcastable to (B, H, T, S).

On the CPU, training's attention of short sequences (T and S up to ``SHORT_MAX_LENGTH``) runs in the compiled
extension (:mod:`transformer.model.native`, ``attention_forward`` / ``attention_backward`` in
``csrc/decoder_step.cpp``) instead of ``scaled_dot_product_attention``'s flash kernel, which tiles for long
sequences: one task per (sentence, head) computes the scores, softmax and products in the L1 cache and keeps
the probabilities for the backward pass. The same maths (float32 rounding apart); ``flash_attention()`` turns
it off for comparisons. Without the extension, in inference, with dropout on the attention weights, other
masks, dtypes or devices, ``scaled_dot_product_attention`` runs. Where the kernel runs, ``MultiHeadAttention``
packs the projections that read the same input into one product (``separate_projections()`` turns that off).
"""

from __future__ import annotations

from types import ModuleType
from typing import ContextManager, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from transformer.model import native

# The longest T or S that takes the compiled kernel. Since session 22 (products as tiles of one kind, the causal
# half skipped), forward and backward, it is 1.3x flash attention at 128 positions and 1.06-1.14x at 256 without
# a causal mask, 2.1x and 1.8x with one (benchmarks/bench_micro.py --parts train-attention, 1024 tokens a batch;
# the forward alone 0.92-0.97x at 256); 256 covers the Shakespeare LM's blocks. Not longer: the kernel keeps the
# probabilities, (B, H, T, S) floats, for the backward pass (33 MB a layer at 8192 tokens of 256, 4 heads),
# where flash attention keeps a row's log-sum-exp.
SHORT_MAX_LENGTH = 256
_KERNEL = native.Kernel("attention_forward", needs_avx2=True)  # the extension, looked up once per process
_PACKING = native.Switch()  # off: separate projections (comparisons)


def short_kernel() -> Optional[ModuleType]:
    """The compiled extension if it is built, enabled and runs on this CPU (AVX2 and FMA), else None."""
    return _KERNEL.get()


def separate_projections() -> ContextManager[None]:
    """Within the block, q, k and v are projected one by one where the kernel runs (comparisons: the
    ``ours_separate_qkv`` peer of ``benchmarks/bench_train.py``, tests)."""
    return _PACKING.off()


def flash_attention() -> ContextManager[None]:
    """Within the block, ``scaled_dot_product_attention`` wherever the compiled kernel would run (comparisons:
    the ``ours_flash`` peer of ``benchmarks/bench_train.py``, tests). A backward pass follows its forward pass."""
    return _KERNEL.off()


class _ShortAttention(torch.autograd.Function):
    """Attention through the compiled kernel; the probabilities (B,H,T,S rounded up to 8) kept for backward."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], is_causal: bool,
                module: ModuleType) -> Tensor:
        ctx.scale, ctx.causal = q.size(-1) ** -0.5, is_causal
        out, probs = module.attention_forward(q, k, v, key_mask, is_causal, ctx.scale)  # (B,H,T,Dh), (B,H,T,S8)
        ctx.save_for_backward(q, k, v, probs)
        ctx.module = module
        return out

    @staticmethod
    @once_differentiable  # its backward pass is not itself differentiable (no double backward)
    def backward(ctx, grad: Tensor):
        q, k, v, probs = ctx.saved_tensors
        dq, dk, dv = ctx.module.attention_backward(grad, q, k, v, probs, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None, None


def _heads(x: Tensor, n: int, n_heads: int) -> list[Tensor]:
    """The n (B,H,T,Dh) views of ``x`` (B,T,n*D), which holds n projections side by side."""
    b, t, width = x.shape
    x = x.view(b, t, n, n_heads, width // (n * n_heads))  # (B,T,n,H,Dh)
    return [x[:, :, i].transpose(1, 2) for i in range(n)]


def _unpack(q_in: Tensor, kv_in: Optional[Tensor], n_heads: int) -> list[Tensor]:
    """q, k, v (B,H,T|S,Dh) of packed projections: q_in (B,T,3D) holds all three, or q_in (B,T,D) and kv_in
    (B,S,2D)."""
    if kv_in is None:
        return _heads(q_in, 3, n_heads)
    return _heads(q_in, 1, n_heads) + _heads(kv_in, 2, n_heads)


class _PackedShortAttention(torch.autograd.Function):
    """_ShortAttention over packed projections (see ``_unpack``). The backward pass writes the gradients of q,
    k and v into tensors of the same packed layout, so the packed projection's backward pass is one product
    for the input's gradient and one for the weights', with no copy to gather them."""

    @staticmethod
    def forward(ctx, q_in: Tensor, kv_in: Optional[Tensor], n_heads: int, key_mask: Optional[Tensor],
                is_causal: bool, module: ModuleType) -> Tensor:
        q, k, v = _unpack(q_in, kv_in, n_heads)
        ctx.scale, ctx.causal, ctx.n_heads, ctx.module = q.size(-1) ** -0.5, is_causal, n_heads, module
        out, probs = module.attention_forward(q, k, v, key_mask, is_causal, ctx.scale)  # (B,H,T,Dh), (B,H,T,S8)
        ctx.save_for_backward(q_in, kv_in, probs)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        q_in, kv_in, probs = ctx.saved_tensors
        d_q_in = torch.empty_like(q_in, memory_format=torch.contiguous_format)
        d_kv_in = None if kv_in is None else torch.empty_like(kv_in, memory_format=torch.contiguous_format)
        ctx.module.attention_backward(grad, *_unpack(q_in, kv_in, ctx.n_heads), probs, ctx.causal, ctx.scale,
                                      *_unpack(d_q_in, d_kv_in, ctx.n_heads))
        return d_q_in, d_kv_in, None, None, None, None


def _kernel_for(device: torch.device, records: bool, b: int, t: int, s: int, head_dim: int,
                attn_mask: Optional[Tensor], dropout_p: float, is_causal: bool) -> Optional[ModuleType]:
    """The extension when its kernel applies to attention of these sizes, float32 operands given: training on
    the CPU (``records``: a gradient is recorded), no attention dropout, no mask or a key mask (B,1,1,S), head
    width a multiple of 8, T and S up to SHORT_MAX_LENGTH. Shared by ``_short`` (the operands at hand) and
    ``MultiHeadAttention._packable`` (before the projections)."""
    if (dropout_p or not records or not torch.is_grad_enabled() or device.type != "cpu"
            or torch.compiler.is_compiling() or head_dim % 8 or max(t, s) > SHORT_MAX_LENGTH):
        return None
    if attn_mask is not None and (is_causal or attn_mask.dtype != torch.bool or attn_mask.shape != (b, 1, 1, s)):
        return None
    return short_kernel()


def _short(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], dropout_p: float,
           is_causal: bool) -> Optional[ModuleType]:
    """The extension when its kernel applies (``_kernel_for``) to q (B,H,T,Dh), k and v (B,H,S,Dh): float32,
    Dh contiguous."""
    if any(x.dtype != torch.float32 or x.dim() != 4 or x.stride(-1) != 1 for x in (q, k, v)):
        return None
    b, h, t, dh = q.shape
    s = k.size(2)
    if k.shape != (b, h, s, dh) or v.shape != k.shape:
        return None
    records = q.requires_grad or k.requires_grad or v.requires_grad
    return _kernel_for(q.device, records, b, t, s, dh, attn_mask, dropout_p, is_causal)


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
              is_causal: bool = False) -> Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)``, through the compiled kernel
    where it applies (see the module docstring). q (B,H,T,Dh), k and v (B,H,S,Dh) -> (B,H,T,Dh)."""
    module = _short(q, k, v, attn_mask, dropout_p, is_causal)
    if module is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)
    key_mask = attn_mask.reshape(q.size(0), k.size(2)) if attn_mask is not None else None  # (B,S)
    return _ShortAttention.apply(q, k, v, key_mask, is_causal, module)


class KVCache:
    """Keys and values of one self-attention layer, grown one step at a time for incremental decoding.

    Storage is preallocated and doubled when full, so appending a step costs O(1) copies on average
    instead of re-concatenating the whole history.
    """

    def __init__(self) -> None:
        self.k: Optional[Tensor] = None  # (B, H, capacity, Dh)
        self.v: Optional[Tensor] = None
        self.length = 0

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append new keys/values (B, H, T_new, Dh); return all of them so far (B, H, length, Dh)."""
        t_new = k.size(2)
        self.reserve(t_new, k)
        self.k[:, :, self.length : self.length + t_new] = k
        self.v[:, :, self.length : self.length + t_new] = v
        self.length += t_new
        return self.k[:, :, : self.length], self.v[:, :, : self.length]

    def reserve(self, t_new: int, like: Tensor) -> None:
        """Room for ``t_new`` more positions; ``like`` (B, H, *, Dh) gives a new buffer's shape, dtype and device."""
        if self.k is None:
            capacity = max(16, t_new)
            self.k = like.new_empty(like.size(0), like.size(1), capacity, like.size(3))
            self.v = like.new_empty(self.k.shape)
        elif self.length + t_new > self.k.size(2):
            capacity = max(2 * self.k.size(2), self.length + t_new)
            grown_k = self.k.new_empty(self.k.size(0), self.k.size(1), capacity, self.k.size(3))
            grown_v = self.v.new_empty(grown_k.shape)
            grown_k[:, :, : self.length] = self.k[:, :, : self.length]
            grown_v[:, :, : self.length] = self.v[:, :, : self.length]
            self.k, self.v = grown_k, grown_v

    def reorder(self, new_order: Tensor) -> None:
        """Select (and repeat) batch rows: ``new_order`` (B',) indexes the current batch."""
        if self.k is not None:
            self.k = self.k.index_select(0, new_order)
            self.v = self.v.index_select(0, new_order)


class MultiHeadAttention(nn.Module):
    """Multi-head scaled dot-product attention with separate q/k/v projections.

    Where the CPU kernel runs (training, see ``_short``), the projections that read the same input run as one
    product of their concatenated weights (q, k and v in self-attention, k and v in cross-attention), and the
    kernel's backward pass writes their gradients side by side: fewer, larger products each way. The
    parameters, and so checkpoints and converters, stay separate.

    Args:
        d_model: model width D.
        n_heads: number of heads H (D must be divisible by H).
        dropout: dropout on the attention weights (training only).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    def _packable(self, query: Tensor, key_value: Tensor, attn_mask: Optional[Tensor],
                  is_causal: bool) -> Optional[ModuleType]:
        """The extension when its kernel will run on the projections of these inputs (``_kernel_for``, checked
        before projecting: ``nn.Linear`` projections (not quantised ones), float32 inputs and weights, no
        autocast), so that they can be packed; else None."""
        if not _PACKING or type(self.q_proj) is not nn.Linear or torch.is_autocast_enabled("cpu"):
            return None
        weight = self.q_proj.weight
        if (query.dim() != 3 or key_value.dim() != 3 or key_value.size(0) != query.size(0)
                or any(x.dtype != torch.float32 for x in (query, key_value, weight))):
            return None
        records = weight.requires_grad or query.requires_grad or key_value.requires_grad
        return _kernel_for(query.device, records, query.size(0), query.size(1), key_value.size(1), self.head_dim,
                           attn_mask, self.dropout if self.training else 0.0, is_causal)

    def _packed(self, query: Tensor, key_value: Tensor, attn_mask: Optional[Tensor], is_causal: bool,
                module: ModuleType, out_bias: bool) -> Tensor:
        """``forward`` through the kernel with the projections packed: q, k and v as one product of
        ``torch.cat`` of their weights in self-attention (query is key_value), k and v in cross-attention."""
        both = key_value is query
        projections = (self.q_proj, self.k_proj, self.v_proj) if both else (self.k_proj, self.v_proj)
        weight = torch.cat([p.weight for p in projections])  # (nD, D)
        bias = torch.cat([p.bias for p in projections]) if self.q_proj.bias is not None else None
        packed = F.linear(key_value, weight, bias)  # (B,S,nD)
        q_in, kv_in = (packed, None) if both else (self.q_proj(query), packed)
        key_mask = attn_mask.reshape(query.size(0), key_value.size(1)) if attn_mask is not None else None  # (B,S)
        out = _PackedShortAttention.apply(q_in, kv_in, self.n_heads, key_mask, is_causal, module)  # (B,H,T,Dh)
        return self._output(out, out_bias)

    def _output(self, out: Tensor, out_bias: bool) -> Tensor:
        """The output projection of the heads ``out`` (B,H,T,Dh) -> (B,T,D); without its bias unless ``out_bias``
        (an ``nn.Linear`` projection then: the caller adds the bias, see ``layers._AddNorm``)."""
        b, _, t, _ = out.shape
        out = out.transpose(1, 2).reshape(b, t, -1)  # (B,T,D)
        return self.out_proj(out) if out_bias else F.linear(out, self.out_proj.weight)

    def _split_heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B,T,D) -> (B,H,T,Dh)

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of ``x`` (B,S,D), each (B,H,S,Dh). Cross-attention computes them once per source."""
        return self._split_heads(self.k_proj(x)), self._split_heads(self.v_proj(x))

    def attend(
        self, query: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False,
        out_bias: bool = True,
    ) -> Tensor:
        """Attend from ``query`` (B,T,D) to projected ``k``, ``v`` (B,H,S,Dh); returns (B,T,D) (see ``forward`` for
        ``out_bias``)."""
        q = self._split_heads(self.q_proj(query))  # (B,H,T,Dh)
        out = attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal
        )  # (B,H,T,Dh)
        return self._output(out, out_bias)

    def forward(
        self,
        query: Tensor,
        key_value: Tensor,
        attn_mask: Optional[Tensor] = None,
        is_causal: bool = False,
        cache: Optional[KVCache] = None,
        out_bias: bool = True,
    ) -> Tensor:
        """Attention of ``query`` (B,T,D) over ``key_value`` (B,S,D).

        With a ``cache``, the new keys/values are appended to it and the query attends to the whole history.
        With ``out_bias=False`` the output projection's bias is left out (``out_proj`` must be an ``nn.Linear``):
        the post-norm layers add it in the pass that ends the sub-layer (``layers._AddNorm``).

        Returns:
            (B,T,D)
        """
        if cache is None:
            module = self._packable(query, key_value, attn_mask, is_causal)
            if module is not None:
                return self._packed(query, key_value, attn_mask, is_causal, module, out_bias)
        k, v = self.project_kv(key_value)
        if cache is not None:
            k, v = cache.update(k, v)
        return self.attend(query, k, v, attn_mask=attn_mask, is_causal=is_causal, out_bias=out_bias)
