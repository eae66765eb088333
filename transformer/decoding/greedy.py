"""Greedy search: the most probable next token at every step, batched, with finished rows pruned."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from transformer.data.vocab import BOS_ID, EOS_ID, PAD_ID
from transformer.decoding.common import (
    BANNED,
    Hypothesis,
    eos_only_where,
    fused_applies,
    fused_candidates,
    holds_source,
    max_output_lengths,
    max_positions,
    next_token_logprobs,
)


@torch.no_grad()
def greedy_search(model: Any, src_tokens: Tensor, max_len_a: float = 1.0, max_len_b: int = 50) -> list[Hypothesis]:
    """Translate a batch by taking the argmax token at each step (using the model's KV cache).

    A sentence stops at EOS or at its maximum length (see :mod:`transformer.decoding.common`); finished
    sentences leave the batch (the cache and encoder output are reordered to the active rows).

    Shapes:
        src_tokens (B,S), right-padded with PAD.
    Returns:
        one :class:`Hypothesis` per sentence, in batch order; ``score`` equals ``logprob`` (no length penalty).
    """
    batch_size = src_tokens.size(0)
    max_len = max_output_lengths(src_tokens, max_len_a, max_len_b, max_positions(model))  # (B,)
    enc = model.encode(src_tokens)
    cache = model.new_cache()
    active = torch.arange(batch_size, device=src_tokens.device)  # original index of each row
    last = torch.full((batch_size, 1), BOS_ID, dtype=torch.long, device=src_tokens.device)  # (B,1)
    logprob = torch.zeros(batch_size, dtype=torch.float32, device=src_tokens.device)
    # (B, max_len): the output of each original row, EOS-filled past its end
    out_tokens = torch.full((batch_size, int(max_len.max())), EOS_ID, dtype=torch.long, device=src_tokens.device)
    first_limit = int(max_len.min())  # no active row reaches its length limit before this step
    fused = fused_candidates()
    for step in range(int(max_len.max())):
        logits = model.decode(last, enc, cache)[:, -1]  # (n,V)
        at_limit = None
        if step + 1 < first_limit and fused_applies(fused, logits):  # log-softmax and argmax in one compiled pass
            best_logprob, _, best = (c[:, 0] for c in fused(logits, logits.new_zeros(logits.size(0), 1), 1,
                                                            BANNED, PAD_ID))  # (n,) each
        else:
            logprobs = next_token_logprobs(logits)  # (n,V)
            if step + 1 >= first_limit:
                at_limit = step + 1 >= max_len[active]  # (n,)
                logprobs = eos_only_where(logprobs, at_limit)
            best_logprob, best = logprobs.max(dim=-1)  # (n,), (n,)
        out_tokens[active, step] = best
        logprob[active] += best_logprob
        done = best.eq(EOS_ID) if at_limit is None else best.eq(EOS_ID) | at_limit  # (n,)
        n_done = int(done.sum())  # one host read per step
        if n_done == done.numel():
            break
        if n_done:
            keep = (~done).nonzero().squeeze(1)  # (n',)
            cache.reorder(keep)
            if not holds_source(cache):
                enc = enc.reorder(keep)
            active, best = active[keep], best[keep]
            first_limit = int(max_len[active].min())
        last = best[:, None]  # (n,) -> (n,1)
    hyps = []
    for i, row in enumerate(out_tokens.tolist()):
        tokens = row[: row.index(EOS_ID)] if EOS_ID in row else row
        score = float(logprob[i])
        hyps.append(Hypothesis(tokens, score, score))
    return hyps
