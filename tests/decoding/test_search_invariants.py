"""Invariants on a random tiny Transformer: beam 1 = greedy, cached = uncached, batch independence."""

import pytest
import torch

from transformer.config import ModelConfig
from transformer.data.vocab import EOS_ID, PAD_ID
from transformer.decoding import NoCache, beam_search, greedy_search
from transformer.model import build_model

VOCAB = 24


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_heads=4, d_ff=64, n_encoder_layers=2, n_decoder_layers=2, dropout=0.0,
                      max_positions=64, final_logits_bias=True)
    m = build_model(cfg, VOCAB).eval()
    with torch.no_grad():  # make EOS likely enough that outputs have different lengths
        m.output.final_logits_bias[EOS_ID] = 1.0
    return m


def sources(lengths, seed=1):
    """Right-padded (B,S) sources of the given lengths (EOS included)."""
    g = torch.Generator().manual_seed(seed)
    src = torch.full((len(lengths), max(lengths)), PAD_ID)
    for i, n in enumerate(lengths):
        src[i, : n - 1] = torch.randint(4, VOCAB, (n - 1,), generator=g)
        src[i, n - 1] = EOS_ID
    return src


LENGTHS = [9, 4, 7, 2, 12, 5]


def test_outputs_vary(model):
    lengths = {len(h.tokens) for h in greedy_search(model, sources(LENGTHS), max_len_b=10)}
    assert len(lengths) > 1  # otherwise the tests below would not exercise pruning


def test_beam_one_equals_greedy(model):
    src = sources(LENGTHS)
    greedy = greedy_search(model, src, max_len_b=10)
    beam = beam_search(model, src, beam=1, alpha=0.6, max_len_b=10)
    assert [h[0].tokens for h in beam] == [h.tokens for h in greedy]
    assert [h[0].logprob for h in beam] == pytest.approx([h.logprob for h in greedy], abs=1e-4)


@pytest.mark.parametrize("beam", [1, 4])
def test_cached_equals_uncached(model, beam):
    src = sources(LENGTHS)
    cached = beam_search(model, src, beam=beam, max_len_b=10, nbest=beam)
    uncached = beam_search(NoCache(model), src, beam=beam, max_len_b=10, nbest=beam)
    assert [[h.tokens for h in hs] for hs in cached] == [[h.tokens for h in hs] for hs in uncached]
    for hs, us in zip(cached, uncached):
        assert [h.score for h in hs] == pytest.approx([u.score for u in us], abs=1e-4)
    assert [h.tokens for h in greedy_search(model, src, max_len_b=10)] == [
        h.tokens for h in greedy_search(NoCache(model), src, max_len_b=10)
    ]


def test_sentence_does_not_depend_on_its_batch(model):
    src = sources(LENGTHS)
    together = beam_search(model, src, beam=4, max_len_b=10, nbest=2)
    for i, n in enumerate(LENGTHS):
        (alone,) = beam_search(model, src[i : i + 1, :n], beam=4, max_len_b=10, nbest=2)
        assert [h.tokens for h in alone] == [h.tokens for h in together[i]]
        assert [h.score for h in alone] == pytest.approx([h.score for h in together[i]], abs=1e-4)
    greedy_together = greedy_search(model, src, max_len_b=10)
    for i, n in enumerate(LENGTHS):
        assert greedy_search(model, src[i : i + 1, :n], max_len_b=10)[0].tokens == greedy_together[i].tokens


def test_max_length_respected(model):
    src = sources(LENGTHS)
    for hyps in beam_search(model, src, beam=3, max_len_a=0.0, max_len_b=3, nbest=3):
        assert all(len(h.tokens) <= 2 for h in hyps)  # 3 tokens including EOS
    assert all(len(h.tokens) <= 2 for h in greedy_search(model, src, max_len_a=0.0, max_len_b=3))


def test_fused_candidates_give_the_searches_outputs(model, monkeypatch):
    """The compiled step_candidates (log-softmax, scores and top-k in one pass; used where it is built) and
    the plain torch ops give the same hypotheses and scores."""
    from transformer.decoding import beam as beam_module
    from transformer.decoding import greedy as greedy_module
    from transformer.model import native

    if native.load() is None or not native.load().panels_supported():
        pytest.skip("the compiled extension is not built (transformer build-native) or the CPU lacks AVX2")
    src = sources(LENGTHS)
    runs = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(beam_module, "fused_candidates", lambda: None)
            monkeypatch.setattr(greedy_module, "fused_candidates", lambda: None)
        runs.append((greedy_search(model, src, max_len_b=10), beam_search(model, src, beam=4, max_len_b=10, nbest=4)))
    (greedy_fused, beam_fused), (greedy_plain, beam_plain) = runs
    assert [h.tokens for h in greedy_fused] == [h.tokens for h in greedy_plain]
    assert [h.score for h in greedy_fused] == pytest.approx([h.score for h in greedy_plain], abs=1e-5)
    assert [[h.tokens for h in n] for n in beam_fused] == [[h.tokens for h in n] for n in beam_plain]
    assert [h.score for n in beam_fused for h in n] == pytest.approx([h.score for n in beam_plain for h in n], abs=1e-5)
