"""Sampling from a language model: temperature, top-k and top-p (nucleus) as pure functions on logits.

    for token in sample(lm, [BOS_ID] + ids, max_new_tokens=100, temperature=0.8, top_p=0.9, generator=g):
        ...
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

import torch
from torch import Tensor

from transformer.data.vocab import BOS_ID, EOS_ID, PAD_ID
from transformer.decoding.common import NEG_INF


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the ``k`` largest logits of each row, set the rest to -inf (``k <= 0`` or ``k >= V``: unchanged).

    Logits tied with the k-th largest are kept too.

    Shapes:
        logits (..., V) -> (..., V)
    """
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]  # (...,1)
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filtering: keep the smallest set of most probable tokens whose probability sums to >= ``p``.

    The most probable token is always kept; ``p >= 1`` returns ``logits`` unchanged.

    Shapes:
        logits (..., V) -> (..., V)
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (...,V)
    probs = sorted_logits.float().softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
    drop_sorted = mass_before >= p  # (...,V), never the first token (mass_before = 0 < p)
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, NEG_INF)


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Draw one token per row after temperature, top-k and top-p; ``temperature == 0`` takes the argmax.

    PAD and BOS are never drawn.

    Shapes:
        logits (B,V) -> (B,) long
    """
    logits = logits.float().clone()
    logits[:, PAD_ID] = NEG_INF
    logits[:, BOS_ID] = NEG_INF
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = top_p_filter(top_k_filter(logits / temperature, top_k), top_p)
    probs = logits.softmax(dim=-1)  # (B,V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (B,1) -> (B,)


@torch.no_grad()
def sample(
    model: Any,
    prompt: Sequence[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> Iterator[int]:
    """Yield new tokens of a decoder-only model (``decode(tokens, cache)``, ``new_cache()``), one at a time.

    Stops after ``max_new_tokens`` or before yielding EOS. The prompt is run once; each later step feeds
    only the new token through the KV cache. The caller keeps prompt + new tokens within the model's
    positions.

    Shapes:
        prompt: T ids (normally starting with BOS).
    Returns:
        an iterator of token ids (EOS not included).
    """
    device = getattr(model, "device", None)  # a frozen model says where it is
    if device is None:
        device = next(model.parameters()).device if hasattr(model, "parameters") else torch.device("cpu")
    cache = model.new_cache()
    x = torch.tensor([list(prompt)], dtype=torch.long, device=device)  # (1,T)
    for _ in range(max_new_tokens):
        logits = model.decode(x, cache)[:, -1]  # (1,T,V) -> (1,V)
        token = sample_next(logits, temperature, top_k, top_p, generator)  # (1,)
        if int(token) == EOS_ID:
            return
        yield int(token)
        x = token[:, None]  # (1,) -> (1,1)
