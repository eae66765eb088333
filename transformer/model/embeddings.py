"""Token embeddings scaled by sqrt(d_model) and positional encodings (section 3.4 and 3.5)."""

from __future__ import annotations

import math
from typing import ContextManager, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transformer.errors import TransformerError
from transformer.model import native


def sinusoidal_table(n_positions: int, d_model: int) -> Tensor:
    """The paper's table: PE(pos, 2i) = sin(pos / 10000^(2i/D)), PE(pos, 2i+1) = cos(...). Shape (P, D)."""
    position = torch.arange(n_positions, dtype=torch.float64).unsqueeze(1)  # (P,1)
    inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(10000.0) / d_model))
    table = torch.zeros(n_positions, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq)
    return table.float()


def check_positions(n: int, max_positions: int) -> None:
    """Raise a clear error when a sequence of ``n`` positions does not fit the model's positions."""
    if n > max_positions:
        raise TransformerError(
            f"sequence of {n} tokens is longer than the model's maximum of {max_positions} "
            "positions (model.max_positions); shorten the input"
        )


class TokenEmbedding(nn.Embedding):
    """Embedding lookup multiplied by ``scale`` (sqrt(d_model) in the paper)."""

    def __init__(self, vocab_size: int, d_model: int, padding_idx: int, scale: float) -> None:
        super().__init__(vocab_size, d_model, padding_idx=padding_idx)
        self.scale = scale
        nn.init.normal_(self.weight, mean=0.0, std=d_model**-0.5)
        with torch.no_grad():
            self.weight[padding_idx].zero_()

    def forward(self, tokens: Tensor, weight: Optional[Tensor] = None) -> Tensor:  # (B,T) -> (B,T,D)
        """With ``weight`` (one output of :func:`tied_uses`), the lookup in it, with a sparse gradient."""
        if weight is None:
            return super().forward(tokens) * self.scale
        return F.embedding(tokens, weight, self.padding_idx, sparse=True) * self.scale


class _TiedUses(torch.autograd.Function):
    """``n`` aliases of one weight, one per use; the backward pass adds their gradients in place into the one
    dense gradient (the output projection's), the lookups' gradients being sparse (their rows only)."""

    @staticmethod
    def forward(ctx, weight: Tensor, n: int):
        ctx.set_materialize_grads(False)  # an unused alias gives None, not a (V,D) tensor of zeros
        return tuple(weight.view_as(weight) for _ in range(n))

    @staticmethod
    def backward(ctx, *grads: Optional[Tensor]):
        dense = [g for g in grads if g is not None and not g.is_sparse]
        rows = [g for g in grads if g is not None and g.is_sparse]
        if not dense and not rows:
            return None, None
        # The dense gradient is the output projection's (V,D) product, made for this use alone: written in place
        total = dense[0] if dense else torch.zeros(rows[0].shape, dtype=rows[0].dtype, device=rows[0].device)
        for g in dense[1:]:
            total = total + g
        for g in rows:  # uncoalesced (1,n) indices and (n,D) values: repeated tokens add up
            if torch.is_grad_enabled():  # create_graph: the gradient is itself recorded, so not in place
                total = total.index_add(0, g._indices()[0], g._values())
            else:
                total.index_add_(0, g._indices()[0], g._values())
        return total, None


_FAN_OUT = native.Switch()  # off: autograd's dense sum (comparisons)


def tied_uses(weight: Tensor, n: int) -> Optional[tuple[Tensor, ...]]:
    """``n`` aliases of ``weight`` for its ``n`` uses in one step (section 3.4's shared matrix: source and target
    lookups, output projection), or None where the plain path is as good: no gradient recorded, not the CPU, or
    under ``torch.compile``. Autograd would sum the uses' gradients into a fresh (V,D) tensor, each lookup's
    gradient first scattered into a (V,D) tensor of zeros: three passes over V x D floats per lookup (see
    BENCHMARKS.md, session 20). Here the lookups' gradients stay sparse and are added into the output
    projection's in place, which touches only their rows. Give the lookups to :meth:`TokenEmbedding.forward`
    and the projection to ``_OutputLayer``."""
    if (not _FAN_OUT or n < 2 or not (torch.is_grad_enabled() and weight.requires_grad)
            or weight.device.type != "cpu" or torch.compiler.is_compiling()):
        return None
    return _TiedUses.apply(weight, n)


def dense_tied_gradients() -> ContextManager[None]:
    """Within the block, :func:`tied_uses` returns None: autograd's own sum of dense gradients (comparisons:
    the ``ours_dense_tied`` peer of ``benchmarks/bench_train.py``, tests)."""
    return _FAN_OUT.off()


class PositionalEncoding(nn.Module):
    """Adds position vectors, fixed sinusoids or learned, to a (B,T,D) input starting at ``offset``."""

    def __init__(self, max_positions: int, d_model: int, learned: bool = False) -> None:
        super().__init__()
        self.max_positions = max_positions
        self.learned = learned
        if learned:
            self.weight = nn.Parameter(torch.randn(max_positions, d_model) * d_model**-0.5)
        else:
            self.register_buffer("weight", sinusoidal_table(max_positions, d_model), persistent=False)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        t = x.size(1)
        check_positions(offset + t, self.max_positions)
        return x + self.weight[offset : offset + t]  # (B,T,D) + (T,D)
