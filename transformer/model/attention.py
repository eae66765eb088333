"""Multi-head attention (section 3.2) through ``scaled_dot_product_attention``, and its KV cache.

Shapes: B batch, T query length, S key length, D model width, H heads, Dh = D / H.
Masks are boolean, True = "may attend", broadcastable to (B, H, T, S).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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

    def _split_heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B,T,D) -> (B,H,T,Dh)

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of ``x`` (B,S,D), each (B,H,S,Dh). Cross-attention computes them once per source."""
        return self._split_heads(self.k_proj(x)), self._split_heads(self.v_proj(x))

    def attend(
        self, query: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False
    ) -> Tensor:
        """Attend from ``query`` (B,T,D) to projected ``k``, ``v`` (B,H,S,Dh); returns (B,T,D)."""
        q = self._split_heads(self.q_proj(query))  # (B,H,T,Dh)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal
        )  # (B,H,T,Dh)
        b, _, t, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, t, -1))  # (B,H,T,Dh) -> (B,T,D)

    def forward(
        self,
        query: Tensor,
        key_value: Tensor,
        attn_mask: Optional[Tensor] = None,
        is_causal: bool = False,
        cache: Optional[KVCache] = None,
    ) -> Tensor:
        """Attention of ``query`` (B,T,D) over ``key_value`` (B,S,D).

        With a ``cache``, the new keys/values are appended to it and the query attends to the whole history.

        Returns:
            (B,T,D)
        """
        k, v = self.project_kv(key_value)
        if cache is not None:
            k, v = cache.update(k, v)
        return self.attend(query, k, v, attn_mask=attn_mask, is_causal=is_causal)
