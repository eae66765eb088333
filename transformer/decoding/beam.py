"""Beam search, batched over sentences and beams, with the step (:func:`beam_step`) separate from the loop.

The loop follows fairseq's ``SequenceGenerator``:

* Every step scores all ``B' * beam`` active hypotheses with one ``decode`` call on the new tokens only
  (the KV cache holds the past; cross-attention keys/values are computed once per source).
* :func:`beam_step` takes the ``2 * beam`` best continuations of each sentence by summed log-probability.
  At most ``beam`` of them end in EOS (one per beam), so at least ``beam`` remain to continue: finished
  hypotheses never starve the beam.
* EOS candidates among the ``beam`` best are *finished*: their score is ``logprob / lp(len)`` with
  ``lp(len) = ((5 + len) / 6) ** alpha`` and ``len`` = generated tokens including EOS. The ``beam`` best
  non-EOS candidates become the next beam.
* Stopping (fairseq's rule, not the exact bound): a sentence is done as soon as it has ``beam`` finished
  hypotheses, or when it reaches its maximum length (at the last position only EOS is allowed). A
  hypothesis still in the beam could in principle score better later when ``alpha > 0``; like fairseq
  (and unlike an exact bound check) we do not wait for it, which keeps the search short.
* The first step runs on one row per sentence (all its beams would hold the same BOS prefix), as
  CTranslate2 does on the CPU; the cache and encoder output are then expanded to ``beam`` rows per sentence
  with ``reorder``.
* Done sentences leave the batch: the cache (``reorder``) and encoder output are cut to the active rows,
  so compute shrinks as sentences finish. Python touches individual hypotheses only to record finished ones.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from transformer.data.vocab import BOS_ID, EOS_ID, PAD_ID
from transformer.decoding.common import (
    BANNED,
    NEG_INF,
    Hypothesis,
    fused_applies,
    fused_candidates,
    length_penalty,
    max_output_lengths,
    max_positions,
    next_token_logprobs,
)
from transformer.errors import TransformerError


def beam_step(scores: Tensor, logprobs: Tensor, n_candidates: int) -> tuple[Tensor, Tensor, Tensor]:
    """The best ``n_candidates`` one-token continuations of each sentence's beam, by summed log-probability.

    Args:
        scores: summed log-probabilities of the current hypotheses; -inf marks an empty slot.
        logprobs: next-token log-probabilities of each hypothesis.
        n_candidates: how many to take per sentence (``2 * beam`` in beam search). Where the K hypotheses
            have fewer continuations (``K * V < n_candidates``: a first step on one hypothesis with a tiny
            vocabulary), the rest are empty slots: score -inf, token PAD.
    Shapes:
        scores (B,K), logprobs (B,K,V) -> three (B,N) tensors, N = n_candidates.
    Returns:
        (candidate scores, sorted descending; the beam each extends; the token each appends).
    """
    batch_size, beam, vocab = logprobs.shape
    total = scores.unsqueeze(2) + logprobs  # (B,K,1) + (B,K,V) -> (B,K,V)
    taken = min(n_candidates, beam * vocab)
    cand_scores, flat = total.view(batch_size, beam * vocab).topk(taken, dim=1)  # (B,taken)
    cand_beams, cand_tokens = torch.div(flat, vocab, rounding_mode="floor"), flat % vocab
    if taken < n_candidates:
        empty = (batch_size, n_candidates - taken)
        cand_scores = torch.cat([cand_scores, cand_scores.new_full(empty, NEG_INF)], dim=1)
        cand_beams = torch.cat([cand_beams, cand_beams.new_zeros(empty)], dim=1)
        cand_tokens = torch.cat([cand_tokens, cand_tokens.new_full(empty, PAD_ID)], dim=1)
    return cand_scores, cand_beams, cand_tokens


@torch.no_grad()
def beam_search(
    model: Any,
    src_tokens: Tensor,
    beam: int = 4,
    alpha: float = 0.6,
    max_len_a: float = 1.0,
    max_len_b: int = 50,
    nbest: int = 1,
) -> list[list[Hypothesis]]:
    """Beam search for a batch of sources (see the module docstring for the exact rules).

    Args:
        model: anything with ``encode`` / ``new_cache`` / ``decode`` (see :mod:`transformer.decoding.common`).
        src_tokens: source ids, each ending in EOS, right-padded with PAD.
        beam: beam size K.
        alpha: length-penalty exponent (0 = rank by summed log-probability).
        max_len_a, max_len_b: maximum output length ``a * src_len + b`` (capped by the model's positions).
        nbest: hypotheses returned per sentence (at most ``beam``).
    Shapes:
        src_tokens (B,S)
    Returns:
        per sentence, in batch order, its ``nbest`` best :class:`Hypothesis`, best first.
    Raises:
        TransformerError: ``beam < 1`` or ``nbest`` not in ``[1, beam]``.
    """
    if beam < 1:
        raise TransformerError(f"beam size must be positive, got {beam}")
    if not 1 <= nbest <= beam:
        raise TransformerError(f"nbest must be between 1 and the beam size {beam}, got {nbest}")
    device = src_tokens.device
    batch_size = src_tokens.size(0)
    max_len = max_output_lengths(src_tokens, max_len_a, max_len_b, max_positions(model))  # (B,)
    cand_order = torch.arange(2 * beam, device=device)  # (2K,)
    first_rows = torch.arange(0, batch_size * beam, beam, device=device)[:, None]  # (B,1): row of beam 0

    # Rows w*b .. w*b+w-1 hold sentence b's w hypotheses: w = 1 at the first step, then K.
    enc = model.encode(src_tokens)
    cache = model.new_cache()
    width = 1
    # Per active sentence, on the host: its original index and length limit (bookkeeping without device reads).
    sent_ids = list(range(batch_size))
    limits = max_len.tolist()
    scores = torch.zeros(batch_size, width, device=device)  # (n,w)
    tokens = torch.full((batch_size, width, 1), BOS_ID, dtype=torch.long, device=device)  # (n,w,t): BOS + output
    finished: list[list[Hypothesis]] = [[] for _ in range(batch_size)]

    fused = fused_candidates()
    for step in range(max(limits)):
        n = len(sent_ids)
        logits = model.decode(tokens[:, :, -1].reshape(n * width, 1), enc, cache)[:, -1]  # (n*w,1) -> (n*w,V)
        at_limit = [step + 1 >= limits[s] for s in sent_ids]  # (n,)
        if fused_applies(fused, logits) and not any(at_limit):  # the same candidates in one compiled pass
            cand_scores, cand_beams, cand_tokens = fused(logits, scores, 2 * beam, BANNED, PAD_ID)  # each (n,2K)
        else:
            logprobs = next_token_logprobs(logits).view(n, width, -1)  # (n*w,V) -> (n,w,V)
            if any(at_limit):
                # The last allowed position: only EOS may follow.
                eos_only = torch.full_like(logprobs, NEG_INF)
                eos_only[:, :, EOS_ID] = logprobs[:, :, EOS_ID]
                logprobs = torch.where(torch.tensor(at_limit, device=device)[:, None, None], eos_only, logprobs)
            cand_scores, cand_beams, cand_tokens = beam_step(scores, logprobs, 2 * beam)  # each (n,2K)
        cand_eos = cand_tokens.eq(EOS_ID)  # (n,2K)

        # Finish the EOS candidates that rank among the K best (bookkeeping: the only per-hypothesis loop).
        to_finish = cand_eos[:, :beam] & torch.isfinite(cand_scores[:, :beam])  # (n,K)
        if bool(to_finish.any()):
            lp = length_penalty(step + 1, alpha)
            rows, cols = to_finish.nonzero(as_tuple=True)
            prefixes = tokens[rows, cand_beams[rows, cols], 1:].tolist()  # without BOS
            for i, prefix, logprob in zip(rows.tolist(), prefixes, cand_scores[rows, cols].tolist()):
                done_list = finished[sent_ids[i]]
                if len(done_list) < beam:
                    done_list.append(Hypothesis(prefix, logprob / lp, logprob))

        # Sentences still searching: not at their limit and fewer than K finished hypotheses.
        kept = [i for i, s in enumerate(sent_ids) if not at_limit[i] and len(finished[s]) < beam]
        if not kept:
            break
        pruned = len(kept) < n
        if pruned:
            keep = torch.tensor(kept, device=device)  # (n',)
            cand_scores, cand_beams, cand_tokens, cand_eos = (
                t.index_select(0, keep) for t in (cand_scores, cand_beams, cand_tokens, cand_eos))

        # The K best non-EOS candidates continue: sort EOS candidates after all others, keep rank order.
        rank = cand_eos.long() * (2 * beam) + cand_order  # (n',2K)
        chosen = rank.topk(beam, dim=1, largest=False).indices  # (n',K) candidate positions
        next_beams = cand_beams.gather(1, chosen)  # (n',K)
        next_tokens = cand_tokens.gather(1, chosen)  # (n',K)
        scores = cand_scores.gather(1, chosen)  # (n',K)

        # Flat rows (of the n*w batch) that the new beams extend, in their new order.
        if pruned or width < beam:
            if not pruned:
                keep = torch.arange(n, device=device)  # (n,)
            rows = (keep[:, None] * width + next_beams).view(-1)  # (n',K) -> (n'*K,)
            cache.reorder(rows)
            # The encoder output is the same for all beams of a sentence: only pruning and the first
            # expansion change it.
            enc = enc.reorder((keep * width).repeat_interleave(beam))  # (n'*K,)
            sent_ids = [sent_ids[i] for i in kept]
        else:
            rows = (first_rows[:n] + next_beams).view(-1)  # (n,K) -> (n*K,)
            cache.reorder_beams(rows)
        prefix = tokens.view(n * width, -1).index_select(0, rows).view(len(kept), beam, -1)  # (n',K,t)
        tokens = torch.cat([prefix, next_tokens.unsqueeze(2)], dim=2)  # (n',K,t+1)
        width = beam

    return [sorted(hyps, key=lambda h: h.score, reverse=True)[:nbest] for hyps in finished]
