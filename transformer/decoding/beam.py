"""Beam search, batched over sentences and beams, with the step (:func:`beam_step`) separate from the loop.

The loop follows fairseq's ``SequenceGenerator``:

* Every step scores all ``B' * beam`` active hypotheses with one ``decode`` call on the new tokens only
  (the KV cache holds the past; cross-attention keys/values are computed once per source).
* :func:`beam_step` takes the ``2 * beam`` best continuations of each sentence by summed log-probability.
  At most ``beam`` of them end in EOS (one per beam), so at least ``beam`` remain to continue: finished
  hypotheses never starve the beam.
* EOS candidates among the ``beam`` best are *finished*: their score is ``logprob / lp(len)`` with
  ``len`` = generated tokens including EOS and ``lp`` GNMT's ``((5 + len) / 6) ** alpha`` (the paper's) or,
  with ``length_penalty_form="power"``, ``len ** alpha`` (fairseq's, Hugging Face's and CTranslate2's; with
  it our outputs are those of HF ``generate(num_beams=K, early_stopping=True)`` and of CTranslate2 on all
  1014 Multi30k val sentences, see BENCHMARKS.md). The ``beam`` best non-EOS candidates become the next beam.
* Stopping (fairseq's rule, not the exact bound): a sentence is done as soon as it has ``beam`` finished
  hypotheses, or when it reaches its maximum length (at the last position only EOS is allowed). A
  hypothesis still in the beam could in principle score better later when ``alpha > 0``; like fairseq
  (and unlike an exact bound check) we do not wait for it, which keeps the search short.
* The first step runs on one row per sentence (all its beams would hold the same BOS prefix), as
  CTranslate2 does on the CPU; the cache and encoder output are then expanded to ``beam`` rows per sentence
  with ``reorder``.
* Done sentences leave the batch: the cache (``reorder``) and encoder output are cut to the active rows,
  so compute shrinks as sentences finish. Python touches individual hypotheses only to record finished ones.
* The device scores the continuations and takes each sentence's best; the host (numpy) does the rest of a
  step's bookkeeping on one copy of them, and sends the chosen rows and tokens back in one copy.

Where the model is frozen with the compiled extension's step computing the logits (CPU, ``transformer
build-native``), the whole loop runs in C++ instead (:meth:`~transformer.model.frozen.FrozenTransformer.
compiled_beam`, since session 28): the same calls and the same bookkeeping, so the same hypotheses and float32
scores, without the interpreter between steps; this module ranks what it returns.
:func:`~transformer.decoding.common.python_loop` keeps the Python loop within a block.
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
    NEG_INF,
    Hypothesis,
    eos_only_where,
    fused_applies,
    fused_candidates,
    holds_source,
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
    cand_scores, cand_beams, cand_tokens = _top_continuations(scores, logprobs, n_candidates)  # (B,taken)
    missing = n_candidates - cand_scores.size(1)
    if missing > 0:
        empty = (cand_scores.size(0), missing)
        cand_scores = torch.cat([cand_scores, cand_scores.new_full(empty, NEG_INF)], dim=1)
        cand_beams = torch.cat([cand_beams, cand_beams.new_zeros(empty)], dim=1)
        cand_tokens = torch.cat([cand_tokens, cand_tokens.new_full(empty, PAD_ID)], dim=1)
    return cand_scores, cand_beams, cand_tokens


def _top_continuations(scores: Tensor, logprobs: Tensor, n_candidates: int) -> tuple[Tensor, Tensor, Tensor]:
    """scores (B,K), logprobs (B,K,V) -> the best ``min(n_candidates, K * V)`` summed scores of each sentence,
    sorted descending, with the beam each extends and the token each appends: three (B,taken) tensors.

    With several beams, in two stages: each beam's own best ``n_candidates`` tokens (adding the beam's score
    keeps the order within a beam, so a sentence's best continuations are among them), then the best of
    those ``K * n_candidates``. That is one top-k over (B*K, V) rows and a small one, instead of one over
    (B, K*V): on a GPU the long rows took PyTorch's multi-block top-k, slower and with host work per call.
    """
    batch_size, beam, vocab = logprobs.shape
    if beam == 1 or n_candidates >= vocab:
        total = scores.unsqueeze(2) + logprobs  # (B,K,1) + (B,K,V) -> (B,K,V)
        cand_scores, flat = total.view(batch_size, beam * vocab).topk(min(n_candidates, beam * vocab), dim=1)
        return cand_scores, torch.div(flat, vocab, rounding_mode="floor"), flat % vocab
    own_best, own_tokens = logprobs.topk(n_candidates, dim=2)  # (B,K,N): each beam's best tokens
    total = scores.unsqueeze(2) + own_best  # (B,K,1) + (B,K,N) -> (B,K,N)
    cand_scores, flat = total.view(batch_size, beam * n_candidates).topk(n_candidates, dim=1)  # (B,N)
    cand_tokens = own_tokens.view(batch_size, beam * n_candidates).gather(1, flat)  # (B,N)
    return cand_scores, torch.div(flat, n_candidates, rounding_mode="floor"), cand_tokens


def _on_host(cand_scores: Tensor, cand_beams: Tensor, cand_tokens: Tensor, n_candidates: int) -> tuple[np.ndarray, ...]:
    """:func:`beam_step`'s padding, done on the host after one copy of the scores and one of the beams and
    tokens: (scores, beams, tokens), each (B,N) numpy."""
    cand_scores = cand_scores.cpu().numpy()  # (B,taken)
    cand_beams, cand_tokens = torch.stack([cand_beams, cand_tokens]).cpu().numpy()  # (B,taken) each
    missing = n_candidates - cand_scores.shape[1]
    if missing > 0:
        pad = ((0, 0), (0, missing))
        cand_scores = np.pad(cand_scores, pad, constant_values=NEG_INF)
        cand_beams = np.pad(cand_beams, pad, constant_values=0)
        cand_tokens = np.pad(cand_tokens, pad, constant_values=PAD_ID)
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
    length_penalty_form: str = "gnmt",
) -> list[list[Hypothesis]]:
    """Beam search for a batch of sources (see the module docstring for the exact rules).

    Args:
        model: anything with ``encode`` / ``new_cache`` / ``decode`` (see :mod:`transformer.decoding.common`).
        src_tokens: source ids, each ending in EOS, right-padded with PAD.
        beam: beam size K.
        alpha: length-penalty exponent (0 = rank by summed log-probability).
        max_len_a, max_len_b: maximum output length ``a * src_len + b`` (capped by the model's positions).
        nbest: hypotheses returned per sentence (at most ``beam``).
        length_penalty_form: ``"gnmt"`` or ``"power"`` (see :func:`~transformer.decoding.common.length_penalty`).
    Shapes:
        src_tokens (B,S)
    Returns:
        per sentence, in batch order, its ``nbest`` best :class:`Hypothesis`, best first.
    Raises:
        TransformerError: ``beam < 1``, ``nbest`` not in ``[1, beam]``, or an unknown ``length_penalty_form``.
    """
    if beam < 1:
        raise TransformerError(f"beam size must be positive, got {beam}")
    if not 1 <= nbest <= beam:
        raise TransformerError(f"nbest must be between 1 and the beam size {beam}, got {nbest}")
    length_penalty(1, alpha, length_penalty_form)  # an unknown form fails here, before any work
    device = src_tokens.device
    batch_size = src_tokens.size(0)
    max_len = max_output_lengths(src_tokens, max_len_a, max_len_b, max_positions(model))  # (B,)
    cand_order = np.arange(2 * beam)  # (2K,)
    first_rows = np.arange(0, batch_size * beam, beam)[:, None]  # (B,1): row of beam 0

    # Rows w*b .. w*b+w-1 hold sentence b's w hypotheses: w = 1 at the first step, then K.
    # The model's device holds the scores and each row's newest token; the host holds the rest (prefixes,
    # candidates, bookkeeping) in numpy: a step reads its candidates back once and sends its choice once,
    # instead of launching a dozen small tensor operations on the device.
    enc = model.encode(src_tokens)
    compiled = getattr(model, "compiled_beam", None) if COMPILED_LOOP else None
    result = compiled(enc, max_len, beam, BANNED) if compiled is not None else None
    if result is not None:  # the whole loop in the compiled step: the same calls, no Python between steps
        finished = [[] for _ in range(batch_size)]
        for sentence, tokens, logprob in result:
            finished[sentence].append(Hypothesis(tokens, logprob / length_penalty(len(tokens) + 1, alpha,
                                                                                  length_penalty_form), logprob))
        return _best(finished, nbest)
    cache = model.new_cache()
    width = 1
    sent_ids = list(range(batch_size))  # per active sentence: its original index
    limits = max_len.tolist()  # per sentence: its length limit
    scores = torch.zeros(batch_size, width, device=device)  # (n,w)
    newest = torch.full((batch_size * width, 1), BOS_ID, dtype=torch.long, device=device)  # (n*w,1)
    prefixes = np.full((batch_size, width, 1), BOS_ID, dtype=np.int64)  # (n,w,t): BOS + output so far
    finished: list[list[Hypothesis]] = [[] for _ in range(batch_size)]

    fused = fused_candidates()
    for step in range(max(limits)):
        n = len(sent_ids)
        logits = model.decode(newest, enc, cache)[:, -1]  # (n*w,1) -> (n*w,V)
        at_limit = [step + 1 >= limits[s] for s in sent_ids]  # (n,)
        if fused_applies(fused, logits) and not any(at_limit):  # the same candidates in one compiled pass
            cand_scores, cand_beams, cand_tokens = (
                t.numpy() for t in fused(logits, scores, 2 * beam, BANNED, PAD_ID))  # each (n,2K)
        else:
            logprobs = next_token_logprobs(logits).view(n, width, -1)  # (n*w,V) -> (n,w,V)
            if any(at_limit):
                logprobs = eos_only_where(logprobs, torch.tensor(at_limit, device=device))
            cand_scores, cand_beams, cand_tokens = _on_host(
                *_top_continuations(scores, logprobs, 2 * beam), 2 * beam)  # each (n,2K)
        cand_eos = cand_tokens == EOS_ID  # (n,2K)

        # Finish the EOS candidates that rank among the K best (bookkeeping: the only per-hypothesis loop).
        to_finish = cand_eos[:, :beam] & np.isfinite(cand_scores[:, :beam])  # (n,K)
        if to_finish.any():
            lp = length_penalty(step + 1, alpha, length_penalty_form)
            for i, j in zip(*(a.tolist() for a in to_finish.nonzero())):
                done_list = finished[sent_ids[i]]
                if len(done_list) < beam:
                    logprob = float(cand_scores[i, j])
                    prefix = prefixes[i, cand_beams[i, j], 1:].tolist()  # without BOS
                    done_list.append(Hypothesis(prefix, logprob / lp, logprob))

        # Sentences still searching: not at their limit and fewer than K finished hypotheses.
        kept = [i for i, s in enumerate(sent_ids) if not at_limit[i] and len(finished[s]) < beam]
        if not kept:
            break
        pruned = len(kept) < n
        if pruned:
            cand_scores, cand_beams, cand_tokens, cand_eos = (a[kept] for a in (cand_scores, cand_beams,
                                                                                 cand_tokens, cand_eos))

        # The K best non-EOS candidates continue: sort EOS candidates after all others, keep rank order.
        rank = cand_eos * (2 * beam) + cand_order  # (n',2K), distinct in each row
        chosen = np.argsort(rank, axis=1)[:, :beam]  # (n',K) candidate positions
        next_beams, next_tokens, next_scores = (
            np.take_along_axis(a, chosen, axis=1) for a in (cand_beams, cand_tokens, cand_scores))  # (n',K)

        # Flat rows (of the n*w batch) that the new beams extend, in their new order: one copy to the device
        # with the new tokens.
        if pruned or width < beam:
            keep = np.array(kept) if pruned else np.arange(n)  # (n',)
            rows = (keep[:, None] * width + next_beams).reshape(-1)  # (n',K) -> (n'*K,)
        else:
            rows = (first_rows[:n] + next_beams).reshape(-1)  # (n,K) -> (n*K,)
        sent = torch.from_numpy(np.stack([rows, next_tokens.reshape(-1)])).to(device)  # (2,n'*K)
        if pruned or width < beam:
            cache.reorder(sent[0])
            # The encoder output is the same for all beams of a sentence: only pruning and the first
            # expansion change it (a cache that holds the source moved it already).
            if not holds_source(cache):
                enc = enc.reorder(torch.from_numpy(np.repeat(keep * width, beam)).to(device))  # (n'*K,)
            sent_ids = [sent_ids[i] for i in kept]
        else:
            cache.reorder_beams(sent[0])
        newest = sent[1].view(-1, 1)  # (n'*K,1)
        scores = torch.from_numpy(next_scores).to(device)  # (n',K)
        prefix = prefixes.reshape(n * width, -1)[rows].reshape(len(kept), beam, -1)  # (n',K,t)
        prefixes = np.concatenate([prefix, next_tokens[:, :, None]], axis=2)  # (n',K,t+1)
        width = beam

    return _best(finished, nbest)


def _best(finished: list[list[Hypothesis]], nbest: int) -> list[list[Hypothesis]]:
    """Each sentence's ``nbest`` best finished hypotheses, best first (the first finished first among equals)."""
    return [sorted(hyps, key=lambda h: h.score, reverse=True)[:nbest] for hyps in finished]
