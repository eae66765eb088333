"""The frozen decoding form (transformer.model.frozen) computes what the model computes: same logits step by
step, for every architecture variant, float and int8, with padding, cache growth, multi-token steps and
reorders; searches on it give the model's outputs."""

from dataclasses import replace

import pytest
import torch

from transformer.config import ModelConfig
from transformer.data.vocab import EOS_ID, PAD_ID
from transformer.decoding import beam_search, greedy_search, sample
from transformer.errors import TransformerError
from transformer.model import Transformer, TransformerLM
from transformer.model.frozen import FrozenLM, FrozenTransformer, _Int8, freeze
from transformer.model.quantize import quantize

from .helpers import biased_transformer

V = 50
TINY = ModelConfig(
    d_model=32, n_heads=4, d_ff=64, n_encoder_layers=2, n_decoder_layers=3, dropout=0.1, max_positions=64
)
VARIANTS = [
    pytest.param(dict(norm_first=False, positional="sinusoidal"), id="post-ln-sinusoidal"),
    pytest.param(dict(norm_first=True, positional="sinusoidal", activation="gelu"), id="pre-ln-gelu"),
    pytest.param(dict(norm_first=False, positional="learned", scale_embeddings=False), id="post-ln-learned"),
    pytest.param(dict(norm_first=True, positional="learned", final_logits_bias=True), id="pre-ln-learned-bias"),
]
SRC = torch.tensor([[5, 6, 7, 8, 9, EOS_ID], [10, 11, EOS_ID, PAD_ID, PAD_ID, PAD_ID], [12, 13, 14, 15, EOS_ID, PAD_ID]])


def _transformer(**overrides) -> Transformer:
    return biased_transformer(replace(TINY, **overrides), V)


def _lm(**overrides) -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(replace(TINY, arch="lm", **overrides), V).eval()


def _tokens(b: int, t: int) -> torch.Tensor:
    return torch.randint(4, V, (b, t))


@torch.no_grad()
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rows", [1, 3, 70])  # the decoder's three product forms in _Dense (1, 2-63, 64+ rows)
def test_frozen_steps_equal_the_models_steps(variant, rows):
    model = _transformer(**variant)
    frozen = freeze(model)
    assert isinstance(frozen, FrozenTransformer)
    assert (frozen.decoder.output.packed is not None) == torch.backends.mkldnn.is_available()  # oneDNN's weight
    src, tgt = SRC.repeat(24, 1)[:rows], _tokens(rows, 20)  # 20 > the cache's first allocation (16): it grows
    enc, frozen_enc = model.encode(src), frozen.encode(src)
    real = enc.src_mask  # (B,S): the frozen encoder skips padding and leaves zeros there
    torch.testing.assert_close(frozen_enc.memory[real], enc.memory[real], atol=2e-5, rtol=1e-5)
    assert not frozen_enc.memory[~real].any()
    assert torch.equal(frozen_enc.src_mask, enc.src_mask) and frozen_enc.padded == enc.padded
    cache, frozen_cache = model.new_cache(), frozen.new_cache()
    for t in range(tgt.size(1)):
        ref = model.decode(tgt[:, t : t + 1], enc, cache)
        out = frozen.decode(tgt[:, t : t + 1], frozen_enc, frozen_cache)
        assert out.shape == ref.shape == (rows, 1, V)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5, msg=f"step {t}")
    # several positions at once after a prefix (a causal mask over the cache), and the whole prefix uncached
    torch.testing.assert_close(frozen.decode(tgt[:, :4], frozen_enc), model.decode(tgt[:, :4], enc),
                               atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(frozen.decode(tgt[:, :4], enc), model.decode(tgt[:, :4], enc),  # the model's
                               atol=2e-5, rtol=1e-5)                                           # EncoderOut
    ref_cache, frozen_cache = model.new_cache(), frozen.new_cache()
    model.decode(tgt[:, :3], enc, ref_cache), frozen.decode(tgt[:, :3], frozen_enc, frozen_cache)
    torch.testing.assert_close(frozen.decode(tgt[:, 3:7], frozen_enc, frozen_cache),
                               model.decode(tgt[:, 3:7], enc, ref_cache), atol=2e-5, rtol=1e-5)
    # step by step on the model's EncoderOut: its memory is projected once, into the cache
    ref_cache, frozen_cache = model.new_cache(), frozen.new_cache()
    for t in range(3):
        torch.testing.assert_close(frozen.decode(tgt[:, t : t + 1], enc, frozen_cache),
                                   model.decode(tgt[:, t : t + 1], enc, ref_cache), atol=2e-5, rtol=1e-5)
        kv = frozen_cache.layers[0].cross_kv
        assert kv is not None and (t == 0 or kv is first_kv)  # projected once, then reused
        first_kv = kv


@torch.no_grad()
def test_frozen_cache_reorders_like_the_models():
    model = _transformer()
    frozen = freeze(model)
    tgt = _tokens(3, 6)
    enc, cache = frozen.encode(SRC), frozen.new_cache()
    frozen.decode(tgt[:, :4], enc, cache)
    new_order = torch.tensor([2, 0, 0, 1])  # drop, keep and repeat rows, as the searches do
    cache.reorder(new_order)
    enc = enc.reorder(new_order)
    for t in (4, 5):
        out = frozen.decode(tgt[new_order, t : t + 1], enc, cache)[:, 0]
        torch.testing.assert_close(out, model(SRC[new_order], tgt[new_order, : t + 1])[:, t], atol=2e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("variant", VARIANTS[:2])
def test_frozen_lm_steps_equal_the_models(variant):
    model = _lm(**variant)
    frozen = freeze(model)
    assert isinstance(frozen, FrozenLM)
    x = _tokens(2, 21)
    full = model(x)
    cache = frozen.new_cache()
    torch.testing.assert_close(frozen.decode(x[:, :5], cache), full[:, :5], atol=2e-5, rtol=1e-5)  # prompt
    for t in range(5, 21):
        torch.testing.assert_close(frozen.decode(x[:, t : t + 1], cache)[:, 0], full[:, t], atol=2e-5, rtol=1e-5)


@torch.no_grad()
def test_searches_on_the_frozen_model_give_the_models_outputs():
    model = _transformer()
    frozen = freeze(model)
    src = torch.cat([SRC, SRC.flip(0)])
    for ours, ref in [
        (greedy_search(frozen, src, 0.0, 15), greedy_search(model, src, 0.0, 15)),
        (beam_search(frozen, src, 4, 0.6, 0.0, 15, 2), beam_search(model, src, 4, 0.6, 0.0, 15, 2)),
    ]:
        assert [getattr(h, "tokens", None) or [x.tokens for x in h] for h in ours] == \
               [getattr(h, "tokens", None) or [x.tokens for x in h] for h in ref]
    lm = _lm()
    prompt = [5, 6, 7]
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert list(sample(freeze(lm), prompt, 12, 1.0, 0, 1.0, g1)) == list(sample(lm, prompt, 12, 1.0, 0, 1.0, g2))


@torch.no_grad()
@pytest.mark.parametrize("rows", [1, 3])
def test_frozen_int8_model_equals_the_int8_model(rows):
    """The fused int8 matrices (q/k/v, every layer's cross k/v) are the separately quantised rows side by
    side, so the frozen int8 model computes what the int8 model computes. (Sources without padding: int8
    activations are quantised with one scale per product, and the frozen encoder leaves padding rows out
    of its products, so with padding the two differ a little, as int8 results differ between batches.)"""
    q = quantize(_transformer())
    frozen = freeze(q, native=False)  # PyTorch's dynamic int8 products (with the extension: test_native.py)
    assert isinstance(frozen.decoder.layers[0].qkv, _Int8)  # int8 products, not float
    src = torch.cat([_tokens(rows, 5), torch.full((rows, 1), EOS_ID)], dim=1)  # (B,6), no padding
    tgt = _tokens(rows, 8)
    enc, frozen_enc = q.encode(src), frozen.encode(src)
    cache, frozen_cache = q.new_cache(), frozen.new_cache()
    for t in range(tgt.size(1)):
        ref = q.decode(tgt[:, t : t + 1], enc, cache)
        out = frozen.decode(tgt[:, t : t + 1], frozen_enc, frozen_cache)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4, msg=f"step {t}")


def test_freeze_refuses_what_it_cannot_freeze():
    model = _transformer()
    with pytest.raises(TransformerError, match="eval mode"):
        freeze(model.train())
    with pytest.raises(TransformerError, match="cannot freeze"):
        freeze(torch.nn.Linear(2, 2).eval())


@torch.no_grad()
def test_frozen_model_checks_the_position_limit():
    frozen = freeze(_lm())
    cache = frozen.new_cache()
    frozen.decode(_tokens(1, 60), cache)
    with pytest.raises(TransformerError, match="maximum of 64 positions"):
        frozen.decode(_tokens(1, 5), cache)


@torch.no_grad()
def test_one_row_products_split_across_threads_equal_the_model():
    """Frozen with several threads, a one-row product runs as a batched product of row blocks of W."""
    model = _transformer(norm_first=True, final_logits_bias=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        frozen = freeze(model)
    finally:
        torch.set_num_threads(threads)
    assert frozen.decoder.layers[0].qkv.blocks is not None and frozen.decoder.output.blocks is None
    tgt = _tokens(1, 6)
    enc, frozen_enc = model.encode(SRC[:1]), frozen.encode(SRC[:1])
    cache, frozen_cache = model.new_cache(), frozen.new_cache()
    for t in range(tgt.size(1)):
        torch.testing.assert_close(frozen.decode(tgt[:, t : t + 1], frozen_enc, frozen_cache),
                                   model.decode(tgt[:, t : t + 1], enc, cache), atol=2e-5, rtol=1e-5)
