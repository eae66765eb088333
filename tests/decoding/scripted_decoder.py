"""A decoder whose next-token probabilities are set by hand, per source script and output prefix.

It has the search protocol (encode / new_cache / decode with only the new tokens) and keeps prefixes in
its own cache, so a wrong ``reorder`` in the search shows up as wrong probabilities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from transformer.data.vocab import BOS_ID


@dataclass
class ScriptEncoderOut:
    script: Tensor  # (B,) which table each row uses: the first source token

    def reorder(self, new_order: Tensor) -> "ScriptEncoderOut":
        return ScriptEncoderOut(self.script.index_select(0, new_order))


@dataclass
class PrefixCache:
    tokens: Optional[Tensor] = None  # (B,T) decoder inputs so far, BOS first

    def reorder(self, new_order: Tensor) -> None:
        self.tokens = self.tokens.index_select(0, new_order)

    reorder_beams = reorder


@dataclass
class ScriptedModel:
    """``tables[script][prefix] = {token: probability}``; a prefix not listed gets a uniform distribution.

    Tokens missing from a listed distribution have probability 0 (logit -inf); listed probabilities
    should sum to 1 so that the search's log-softmax leaves them unchanged.
    """

    tables: dict[int, dict[tuple[int, ...], dict[int, float]]]
    vocab_size: int
    batch_sizes: list[int] = field(default_factory=list)  # rows of every decode call, to see pruning

    def encode(self, src_tokens: Tensor) -> ScriptEncoderOut:
        return ScriptEncoderOut(src_tokens[:, 0].clone())

    def new_cache(self) -> PrefixCache:
        return PrefixCache()

    def decode(self, new_tokens: Tensor, enc: ScriptEncoderOut, cache: PrefixCache) -> Tensor:
        assert new_tokens.size(1) == 1, "a cached search feeds one new token per step"
        cache.tokens = new_tokens if cache.tokens is None else torch.cat([cache.tokens, new_tokens], dim=1)
        assert bool(cache.tokens[:, 0].eq(BOS_ID).all())
        self.batch_sizes.append(new_tokens.size(0))
        logits = torch.full((new_tokens.size(0), 1, self.vocab_size), -math.log(self.vocab_size))
        for row, (script, prefix) in enumerate(zip(enc.script.tolist(), cache.tokens[:, 1:].tolist())):
            dist = self.tables[script].get(tuple(prefix))
            if dist is not None:
                logits[row, 0] = float("-inf")
                for token, p in dist.items():
                    logits[row, 0, token] = math.log(p)
        return logits
