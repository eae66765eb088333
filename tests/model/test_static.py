"""Static-cache decoding (transformer.model.static): the static step computes what the model computes, step
by step, through row buckets, source padding, output growth past a block, reorders and pruning; searches and
language-model sampling on it give the model's outputs. On the CPU the static step runs eagerly; on a CUDA device the same tests replay
it as CUDA graphs (skipped without a GPU)."""

from dataclasses import replace

import pytest
import torch

from transformer.config import ModelConfig
from transformer.data.vocab import EOS_ID, PAD_ID
from transformer.decoding import beam_search, greedy_search, sample
from transformer.decoding.common import holds_source, python_loop
from transformer.errors import TransformerError
from transformer.model import Transformer, TransformerLM, freeze
from transformer.model.frozen import FrozenEncoderOut
from transformer.model.quantize import quantize
from transformer.model.static import S_BLOCK, T_BLOCK, StaticCache, row_bucket

from .helpers import biased_transformer

V = 50
TINY = ModelConfig(
    d_model=32, n_heads=4, d_ff=64, n_encoder_layers=2, n_decoder_layers=3, dropout=0.1, max_positions=160
)
DEVICES = [
    pytest.param("cpu", id="cpu-eager"),
    pytest.param("cuda", id="cuda-graphs",
                 marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
]
SRC = torch.tensor([[5, 6, 7, 8, 9, EOS_ID], [10, 11, EOS_ID, PAD_ID, PAD_ID, PAD_ID], [12, 13, 14, 15, EOS_ID, PAD_ID]])


def _transformer(device: str, **overrides) -> Transformer:
    return biased_transformer(replace(TINY, **overrides), V, device)


def _tol(device: str) -> dict:
    # cuBLAS may use other reduction orders than the nn.Module's products (TF32 stays off: fp32 throughout)
    return dict(atol=2e-5, rtol=1e-5) if device == "cpu" else dict(atol=1e-4, rtol=1e-4)


def test_row_buckets():
    assert [row_bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 16, 17, 64, 65, 96, 97, 128)] == \
        [1, 2, 4, 4, 8, 8, 16, 16, 24, 64, 96, 96, 128, 128]


@torch.no_grad()
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-ln", "pre-ln"])
def test_static_steps_equal_the_models_steps(device, norm_first):
    model = _transformer(device, norm_first=norm_first, final_logits_bias=norm_first)
    frozen = freeze(model, graphs=True)
    steps = T_BLOCK + 6  # past the first block: the buffers grow mid-search, keeping the history
    for rows in (3, 5):  # a bucket of 4 then of 8 (its spare rows hold the last search's stale values)
        src = SRC.repeat(2, 1)[:rows].to(device)
        tgt = torch.randint(4, V, (rows, steps), device=device)
        enc, frozen_enc = model.encode(src), frozen.encode(src)
        cache, static = model.new_cache(), frozen.new_cache()
        assert isinstance(static, StaticCache)
        for t in range(steps):
            ref = model.decode(tgt[:, t : t + 1], enc, cache)
            out = frozen.decode(tgt[:, t : t + 1], frozen_enc, static)
            assert out.shape == ref.shape == (rows, 1, V)
            torch.testing.assert_close(out, ref, **_tol(device), msg=f"rows {rows}, step {t}")
    assert frozen.static.capacity == (8, S_BLOCK, 2 * T_BLOCK)
    if device == "cuda":  # (row bucket, source block, target block): (4,32,64), (4,32,128); 5 rows grow them: (8,..)
        assert frozen.static.recorded == 3 + 1  # the first search's (4,32,64) again after the buffers grew


@torch.no_grad()
@pytest.mark.parametrize("device", DEVICES)
def test_static_cache_reorders_and_prunes_like_the_models(device):
    model = _transformer(device)
    frozen = freeze(model, graphs=True)
    src = SRC.repeat(3, 1).to(device)  # 9 rows: a bucket of 16
    tgt = torch.randint(4, V, (9, 8), device=device)
    enc, frozen_enc = model.encode(src), frozen.encode(src)
    cache, static = model.new_cache(), frozen.new_cache()
    for t in range(3):
        model.decode(tgt[:, t : t + 1], enc, cache), frozen.decode(tgt[:, t : t + 1], frozen_enc, static)
    beams = torch.tensor([2, 2, 0, 4, 3, 5, 8, 7, 6], device=device)  # rows swap their history, same sources
    cache.reorder_beams(beams), static.reorder_beams(beams)
    keep = torch.tensor([8, 0, 3, 5], device=device)  # pruning: 4 rows (bucket 4), their sources move with them
    cache.reorder(keep), static.reorder(keep)
    enc, frozen_enc = enc.reorder(keep), frozen_enc.reorder(keep)
    for t in range(3, 8):
        ref = model.decode(tgt[keep, t : t + 1], enc, cache)
        out = frozen.decode(tgt[keep, t : t + 1], frozen_enc, static)
        torch.testing.assert_close(out, ref, **_tol(device), msg=f"step {t}")


@torch.no_grad()
@pytest.mark.parametrize("device", DEVICES)
def test_static_cache_grows_when_a_reorder_adds_rows(device):
    """Beam search's first step runs one row per sentence, then reorders each to its beams: more rows than the
    buffers hold, so they grow mid-search, keeping every live row's history and source."""
    model = _transformer(device)
    frozen = freeze(model, graphs=True)
    src = SRC.to(device)  # 3 rows: a bucket of 4
    first, later = torch.randint(4, V, (3, 2), device=device), torch.randint(4, V, (12, 4), device=device)
    enc, frozen_enc = model.encode(src), frozen.encode(src)
    cache, static = model.new_cache(), frozen.new_cache()
    for t in range(2):
        model.decode(first[:, t : t + 1], enc, cache), frozen.decode(first[:, t : t + 1], frozen_enc, static)
    assert frozen.static.capacity[0] == 4
    expand = torch.tensor([2, 2, 0, 1] * 3, device=device)  # 12 rows, sources in a new order
    cache.reorder(expand), static.reorder(expand)
    enc, frozen_enc = enc.reorder(expand), frozen_enc.reorder(expand)
    assert frozen.static.capacity[0] == row_bucket(12) == 16
    for t in range(4):
        ref = model.decode(later[:, t : t + 1], enc, cache)
        out = frozen.decode(later[:, t : t + 1], frozen_enc, static)
        torch.testing.assert_close(out, ref, **_tol(device), msg=f"step {t}")


@torch.no_grad()
@pytest.mark.parametrize("device", DEVICES)
def test_searches_on_the_static_cache_give_the_models_outputs(device):
    model = _transformer(device)
    frozen = freeze(model, graphs=True)
    torch.manual_seed(1)
    src = torch.randint(4, V, (11, 9), device=device)
    src[:, -1] = EOS_ID
    src[3, 4:], src[3, 3] = PAD_ID, EOS_ID
    src[7, 2:], src[7, 1] = PAD_ID, EOS_ID
    for _ in range(2):  # the second time on the recorded graphs
        assert [h.tokens for h in greedy_search(frozen, src, 1.5, 5)] == \
            [h.tokens for h in greedy_search(model, src, 1.5, 5)]
        for beam in (1, 4):
            ours = beam_search(frozen, src, beam=beam, max_len_a=1.5, max_len_b=5, nbest=beam)
            ref = beam_search(model, src, beam=beam, max_len_a=1.5, max_len_b=5, nbest=beam)
            assert [[h.tokens for h in n] for n in ours] == [[h.tokens for h in n] for n in ref]
            for n_ours, n_ref in zip(ours, ref):
                for a, b in zip(n_ours, n_ref):
                    assert a.score == pytest.approx(b.score, abs=1e-4)


@torch.no_grad()
def test_searches_leave_the_encoder_output_alone_once_the_static_cache_holds_the_source(monkeypatch):
    """A static cache copies the source's keys/values at its first step and reorders them itself: searches
    then skip reordering the encoder output (index copies of every layer's keys at each pruning); a growing
    cache still gets it reordered."""
    model = _transformer("cpu")
    calls = []
    original = FrozenEncoderOut.reorder
    monkeypatch.setattr(FrozenEncoderOut, "reorder", lambda self, order: calls.append(order) or original(self, order))
    src = SRC.repeat(3, 1)
    for graphs in (True, False):
        frozen = freeze(model, graphs=graphs)
        cache = frozen.new_cache()
        assert not holds_source(cache)
        frozen.decode(torch.full((len(src), 1), 1), frozen.encode(src), cache)
        assert holds_source(cache) == graphs
        calls.clear()
        with python_loop():  # the searches' Python loops (the compiled ones keep the source rows in C++)
            greedy = [h.tokens for h in greedy_search(frozen, src, 1.5, 5)]
            beams = [[h.tokens for h in n]
                     for n in beam_search(frozen, src, beam=4, max_len_a=1.5, max_len_b=5, nbest=4)]
        assert greedy == [h.tokens for h in greedy_search(model, src, 1.5, 5)]
        assert beams == [[h.tokens for h in n]
                         for n in beam_search(model, src, beam=4, max_len_a=1.5, max_len_b=5, nbest=4)]
        assert (len(calls) == 0) == graphs


@torch.no_grad()
def test_a_superseded_cache_and_bad_steps_are_refused():
    model = _transformer("cpu")
    frozen = freeze(model, graphs=True)
    src = SRC
    enc = frozen.encode(src)
    first = frozen.new_cache()
    frozen.decode(torch.full((3, 1), 7), enc, first)
    second = frozen.new_cache()
    frozen.decode(torch.full((3, 1), 7), enc, second)  # the second search takes the buffers
    with pytest.raises(TransformerError, match="superseded"):
        frozen.decode(torch.full((3, 1), 7), enc, first)
    with pytest.raises(TransformerError, match="one new position"):
        frozen.decode(torch.full((3, 2), 7), enc, frozen.new_cache())
    with pytest.raises(TransformerError, match="rows"):
        frozen.decode(torch.full((2, 1), 7), enc, second)
    with pytest.raises(TransformerError, match="int8"):
        freeze(quantize(model, "int8"), graphs=True)
    with pytest.raises(TransformerError, match="CUDA device"):
        from transformer.model.static import StaticDecoder

        StaticDecoder(frozen.decoder, TINY.n_heads, graphs=True)


@torch.no_grad()
def test_static_cache_stops_at_the_position_limit():
    model = _transformer("cpu", max_positions=70)
    frozen = freeze(model, graphs=True)
    enc = frozen.encode(SRC)
    cache = frozen.new_cache()
    for _ in range(70):
        frozen.decode(torch.full((3, 1), 7), enc, cache)
    assert frozen.static.capacity[2] == 70  # the last block is cut at the limit
    with pytest.raises(TransformerError, match="position"):
        frozen.decode(torch.full((3, 1), 7), enc, cache)


def test_freeze_defaults_to_graphs_on_cuda_only():
    assert freeze(_transformer("cpu")).static is None
    if torch.cuda.is_available():
        assert freeze(_transformer("cuda")).static is not None
        assert freeze(_transformer("cuda"), graphs=False).static is None


def _lm(device: str) -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(replace(TINY, arch="lm", norm_first=True), V).eval().to(device)


@torch.no_grad()
@pytest.mark.parametrize("device", DEVICES)
def test_static_lm_steps_and_sampling_equal_the_models(device):
    model = _lm(device)
    frozen = freeze(model, graphs=True)
    assert frozen.static is not None and frozen.device.type == device
    tokens = torch.randint(4, V, (2, T_BLOCK + 8), device=device)
    cache, static = model.new_cache(), frozen.new_cache()
    # a prompt of 5 positions (fed one step at a time), then one position per step past a 64-position block
    torch.testing.assert_close(frozen.decode(tokens[:, :5], static), model.decode(tokens[:, :5], cache), **_tol(device))
    for t in range(5, tokens.size(1)):
        torch.testing.assert_close(frozen.decode(tokens[:, t : t + 1], static),
                                   model.decode(tokens[:, t : t + 1], cache), **_tol(device), msg=f"step {t}")
    prompt = [2, 7, 8, 9]
    for _ in range(2):
        ours = list(sample(frozen, prompt, 40, temperature=0.0))
        assert ours == list(sample(model, prompt, 40, temperature=0.0)) and len(ours) > 0
