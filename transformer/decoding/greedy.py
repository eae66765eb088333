"""Greedy search: the most probable next token at every step, batched, with finished rows pruned.

Where the model is frozen with the compiled extension's step computing the logits (CPU, ``transformer
build-native``), the whole loop below runs in C++ instead (:meth:`~transformer.model.frozen.FrozenTransformer.
compiled_greedy`): the same calls, so the same tokens and the same float32 scores, without the interpreter
between steps (BENCHMARKS.md, session 23). :func:`~transformer.decoding.common.python_loop` keeps the Python loop
within a block.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from transformer.data.vocab import BOS_ID, EOS_ID, PAD_ID
from transformer.decoding.common import (
    BANNED,
    COMPILED_LOOP,
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
    batch_size, device = src_tokens.size(0), src_tokens.device
    limit = max_output_lengths(src_tokens, max_len_a, max_len_b, max_positions(model)).cpu().numpy()  # (B,)
    enc = model.encode(src_tokens)
    compiled = getattr(model, "compiled_greedy", None) if COMPILED_LOOP else None
    result = compiled(enc, torch.from_numpy(limit), BANNED) if compiled is not None else None
    if result is not None:  # the whole loop in the compiled step: the same calls, no Python between steps
        tokens, logprobs = (t.numpy() for t in result)  # (B, max(limit)), (B,)
        return _hypotheses(tokens, logprobs)
    cache = model.new_cache()
    # The bookkeeping is on the host (numpy), from one read of each step's tokens and log-probabilities.
    active = np.arange(batch_size)  # original index of each row
    out_tokens = np.full((batch_size, int(limit.max())), EOS_ID, dtype=np.int64)  # EOS-filled past each end
    logprob = np.zeros(batch_size, dtype=np.float32)  # summed in float32, as on the device
    last = torch.full((batch_size, 1), BOS_ID, dtype=torch.long, device=device)  # (B,1)
    no_scores = torch.zeros(batch_size, 1, device=device)  # the fused candidates' hypothesis scores: none
    first_limit = int(limit.min())  # no active row reaches its length limit before this step
    fused = fused_candidates()
    for step in range(int(limit.max())):
        logits = model.decode(last, enc, cache)[:, -1]  # (n,V)
        n = logits.size(0)
        at_limit = None
        if step + 1 < first_limit and fused_applies(fused, logits):  # log-softmax and argmax in one compiled pass
            best_logprob, _, best = (c[:, 0] for c in fused(logits, no_scores[:n], 1, BANNED, PAD_ID))  # (n,) each
        else:
            logprobs = next_token_logprobs(logits)  # (n,V)
            if step + 1 >= first_limit:
                at_limit = step + 1 >= limit[active]  # (n,) numpy
                logprobs = eos_only_where(logprobs, torch.from_numpy(at_limit).to(device))
            best_logprob, best = logprobs.max(dim=-1)  # (n,), (n,)
        tokens, token_logprobs = _to_host(best, best_logprob)  # (n,) each, numpy
        out_tokens[active, step] = tokens
        logprob[active] += token_logprobs
        done = tokens == EOS_ID if at_limit is None else (tokens == EOS_ID) | at_limit  # (n,)
        n_done = int(done.sum())
        if n_done == n:
            break
        if n_done:
            keep_host = np.flatnonzero(~done)  # (n',)
            keep = torch.from_numpy(keep_host).to(device)
            cache.reorder(keep)
            if not holds_source(cache):
                enc = enc.reorder(keep)
            active, best = active[keep_host], best.index_select(0, keep)
            first_limit = int(limit[active].min())
        last = best.view(-1, 1)  # (n,) -> (n,1)
    return _hypotheses(out_tokens, logprob)


def _hypotheses(out_tokens: np.ndarray, logprob: np.ndarray) -> list[Hypothesis]:
    """Tokens (B, L), EOS past each end, and summed log-probabilities (B,) -> one hypothesis per sentence."""
    hyps = []
    for row, score in zip(out_tokens.tolist(), logprob.tolist()):
        tokens = row[: row.index(EOS_ID)] if EOS_ID in row else row
        hyps.append(Hypothesis(tokens, score, score))
    return hyps


def _to_host(best: Tensor, best_logprob: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """A step's tokens (n,) long and their log-probabilities (n,) float32 -> numpy, in one copy from a device
    (on the CPU, views of the same memory)."""
    if best.device.type == "cpu":
        return best.numpy(), best_logprob.float().numpy()
    both = torch.stack((best.double(), best_logprob.double())).cpu().numpy()  # (2,n): ids and float32 are exact
    return both[0].astype(np.int64), both[1].astype(np.float32)
