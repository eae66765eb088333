"""Beam search on a scripted decoder (exact hypotheses and scores, computed by hand) and beam_step alone."""

import math

import pytest
import torch

from scripted_decoder import ScriptedModel
from transformer.data.vocab import EOS_ID, PAD_ID, UNK_ID
from transformer.decoding import beam_search, beam_step, length_penalty
from transformer.errors import TransformerError

A, B, C, D = 4, 5, 6, 7
V = 8

# Script 1: three ways to finish, of output lengths (EOS included) 2, 3 and 5:
#   S = a EOS          logprob -1.1
#   M = b d EOS        logprob -1.155
#   L = c d d d EOS    logprob -1.375
# The rest of the first step's mass (about 0.1) goes to UNK, which never enters a beam of 3.
S_LP, M_LP, L_LP = -1.1, -1.155, -1.375
SCRIPT_1 = {
    (): {A: math.exp(S_LP), B: math.exp(M_LP), C: math.exp(L_LP),
         UNK_ID: 1 - math.exp(S_LP) - math.exp(M_LP) - math.exp(L_LP)},
    (A,): {EOS_ID: 1.0},
    (B,): {D: 1.0},
    (B, D): {EOS_ID: 1.0},
    (C,): {D: 1.0},
    (C, D): {D: 1.0},
    (C, D, D): {D: 1.0},
    (C, D, D, D): {EOS_ID: 1.0},
}
# Script 2: EOS is always very unlikely, so only the length limit ends a hypothesis.
P_D, P_EOS = 0.7, 1e-4
SCRIPT_2 = {"any": {D: P_D, A: 1 - P_D - P_EOS, EOS_ID: P_EOS}}


class Script2(dict):
    def get(self, key, default=None):
        return SCRIPT_2["any"]


def scripted():
    return ScriptedModel({1: SCRIPT_1, 2: Script2()}, V)


def lp(length, alpha):
    return ((5 + length) / 6) ** alpha


SRC_1 = torch.tensor([[1, EOS_ID]])  # script 1, src_len 2


@pytest.mark.parametrize(
    "alpha, expected_order",
    [
        # alpha 0: raw log-probabilities, the shortest wins: -1.1 > -1.155 > -1.375
        (0.0, ["S", "M", "L"]),
        # alpha 0.6: S -1.1/1.0969 = -1.0028, M -1.155/1.1885 = -0.9718, L -1.375/1.3590 = -1.0118
        (0.6, ["M", "S", "L"]),
        # alpha 1.0: S -1.1/(7/6) = -0.9429, M -1.155/(8/6) = -0.8663, L -1.375/(10/6) = -0.825
        (1.0, ["L", "M", "S"]),
    ],
)
def test_scripted_nbest_and_scores_change_with_alpha(alpha, expected_order):
    hyps = {"S": ([A], S_LP, 2), "M": ([B, D], M_LP, 3), "L": ([C, D, D, D], L_LP, 5)}
    (nbest,) = beam_search(scripted(), SRC_1, beam=3, alpha=alpha, nbest=3)
    assert [h.tokens for h in nbest] == [hyps[k][0] for k in expected_order]
    for h, key in zip(nbest, expected_order):
        _, logprob, length = hyps[key]
        assert h.logprob == pytest.approx(logprob, abs=1e-5)
        assert h.score == pytest.approx(logprob / lp(length, alpha), abs=1e-5)
    (best,) = beam_search(scripted(), SRC_1, beam=3, alpha=alpha, nbest=1)
    assert best[0].tokens == hyps[expected_order[0]][0]


def test_stops_once_beam_hypotheses_are_finished():
    # The documented fairseq rule: with beam 2, S and M finish first and end the search, so L (which
    # would win at alpha 1) is never completed.
    model = scripted()
    (nbest,) = beam_search(model, SRC_1, beam=2, alpha=1.0, nbest=2)
    assert [h.tokens for h in nbest] == [[B, D], [A]]
    assert len(model.batch_sizes) == 3  # steps: first token, S finishes, M finishes


def test_length_limit_forces_eos():
    src = torch.tensor([[2, EOS_ID]])  # src_len 2 -> max_len = 0 * 2 + 4 = 4 tokens including EOS
    for alpha in (0.0, 0.6, 1.0):
        (best,) = beam_search(scripted(), src, beam=2, alpha=alpha, max_len_a=0.0, max_len_b=4)
        logprob = 3 * math.log(P_D) + math.log(P_EOS)
        assert best[0].tokens == [D, D, D]
        assert best[0].logprob == pytest.approx(logprob, abs=1e-4)
        assert best[0].score == pytest.approx(logprob / lp(4, alpha), abs=1e-4)


def test_finished_sentences_leave_the_batch():
    model = scripted()
    src = torch.tensor([[2, EOS_ID], [1, EOS_ID]])
    together = beam_search(model, src, beam=3, alpha=1.0, nbest=3, max_len_a=0.0, max_len_b=8)
    # The first step runs one row per sentence; script 1 is done after 5 steps; script 2 runs to its limit
    # of 8 alone, with 3 rows instead of 6.
    assert model.batch_sizes == [2] + [6] * 4 + [3] * 3
    alone = [beam_search(scripted(), src[i : i + 1], beam=3, alpha=1.0, nbest=3, max_len_a=0.0, max_len_b=8)[0]
             for i in range(2)]
    assert together == alone


def test_beam_step_by_hand():
    scores = torch.tensor([[0.0, -1.0]])  # (B=1, K=2)
    logprobs = torch.log(torch.tensor([[[0.5, 0.3, 0.2], [0.9, 0.05, 0.05]]]))  # (1,2,3)
    cand_scores, cand_beams, cand_tokens = beam_step(scores, logprobs, 4)
    # totals: beam 0: log .5 = -0.693, log .3 = -1.204, log .2 = -1.609;
    #         beam 1: -1 + log .9 = -1.105, -1 + log .05 = -3.996 (twice)
    assert cand_beams.tolist() == [[0, 1, 0, 0]]
    assert cand_tokens.tolist() == [[0, 0, 1, 2]]
    expected = [math.log(0.5), -1 + math.log(0.9), math.log(0.3), math.log(0.2)]
    assert cand_scores[0].tolist() == pytest.approx(expected, abs=1e-6)


def test_beam_step_first_step_uses_only_beam_zero():
    scores = torch.tensor([[0.0, float("-inf"), float("-inf")]])
    logprobs = torch.log_softmax(torch.randn(1, 3, 5), dim=-1)
    cand_scores, cand_beams, _ = beam_step(scores, logprobs, 5)
    assert cand_beams.tolist() == [[0] * 5]
    assert bool(torch.isfinite(cand_scores).all())


def test_beam_step_pads_missing_candidates_with_empty_slots():
    """A first step on one hypothesis over a vocabulary smaller than 2 * beam: the candidates that do not
    exist are empty slots (-inf, PAD), so the search still has 2 * beam of them."""
    logprobs = torch.log_softmax(torch.randn(2, 1, 3), dim=-1)  # (B=2, K=1, V=3)
    cand_scores, cand_beams, cand_tokens = beam_step(torch.zeros(2, 1), logprobs, 5)
    assert cand_scores.shape == cand_beams.shape == cand_tokens.shape == (2, 5)
    assert bool(torch.isfinite(cand_scores[:, :3]).all()) and bool(torch.isinf(cand_scores[:, 3:]).all())
    assert sorted(cand_tokens[0, :3].tolist()) == [0, 1, 2] and cand_tokens[:, 3:].eq(PAD_ID).all()
    assert cand_beams.eq(0).all()


@pytest.mark.parametrize("sentences,beam,vocab,n", [(3, 4, 50, 8), (2, 2, 9, 4), (5, 3, 1000, 6)])
def test_beam_step_takes_the_best_of_all_continuations(sentences, beam, vocab, n):
    """beam_step takes each beam's own best n first, then the best of those: the same candidates as one
    top-k over all K * V continuations of a sentence (with empty slots and -inf tokens too)."""
    torch.manual_seed(vocab)
    scores = torch.randn(sentences, beam) * 3
    scores[0, -1] = float("-inf")  # an empty slot
    logprobs = torch.log_softmax(torch.randn(sentences, beam, vocab) * 4, dim=-1)
    logprobs[:, :, PAD_ID] = float("-inf")
    cand_scores, cand_beams, cand_tokens = beam_step(scores, logprobs, n)
    best, flat = (scores.unsqueeze(2) + logprobs).view(sentences, -1).topk(n, dim=1)
    assert torch.equal(cand_scores, best)
    assert torch.equal(cand_beams, flat // vocab) and torch.equal(cand_tokens, flat % vocab)


def test_length_penalty_formula():
    assert length_penalty(1, 0.6) == pytest.approx(1.0)
    assert length_penalty(7, 1.0) == pytest.approx(2.0)
    assert length_penalty(10, 0.0) == 1.0
    assert length_penalty(8, 1 / 3, "power") == pytest.approx(2.0)  # len ** alpha
    assert length_penalty(torch.tensor([4.0, 9.0]), 0.5, "power").tolist() == [2.0, 3.0]
    assert length_penalty(10, 0.0, "power") == 1.0
    with pytest.raises(TransformerError, match="wu"):
        length_penalty(3, 0.6, "wu")


def test_power_form_ranks_by_len_to_the_alpha():
    # alpha 0.6, len ** alpha: S -1.1/2**0.6 = -0.7257, M -1.155/3**0.6 = -0.5975, L -1.375/5**0.6 = -0.5235,
    # so L, M, S, where GNMT's form gives M, S, L (above)
    hyps = {"S": ([A], S_LP, 2), "M": ([B, D], M_LP, 3), "L": ([C, D, D, D], L_LP, 5)}
    (nbest,) = beam_search(scripted(), SRC_1, beam=3, alpha=0.6, nbest=3, length_penalty_form="power")
    assert [h.tokens for h in nbest] == [hyps[k][0] for k in ("L", "M", "S")]
    for h, key in zip(nbest, ("L", "M", "S")):
        _, logprob, length = hyps[key]
        assert h.score == pytest.approx(logprob / length ** 0.6, abs=1e-5)
    with pytest.raises(TransformerError, match="length penalty form"):
        beam_search(scripted(), SRC_1, beam=2, length_penalty_form="wu")


def test_bad_sizes_raise():
    with pytest.raises(TransformerError):
        beam_search(scripted(), SRC_1, beam=2, nbest=3)
    with pytest.raises(TransformerError):
        beam_search(scripted(), SRC_1, beam=0)
