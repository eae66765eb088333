"""Token embeddings scaled by sqrt(d_model) and positional encodings (section 3.4 and 3.5)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from transformer.errors import TransformerError


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

    def forward(self, tokens: Tensor) -> Tensor:  # (B,T) -> (B,T,D)
        return super().forward(tokens) * self.scale


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
