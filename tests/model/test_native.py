"""The compiled decoder step (transformer.model.native) gives the Python step's logits bit for bit: every
architecture variant, one to many rows, padding, cache growth, beam reorders; it is off where it must be."""

import shutil

import pytest
import torch

from transformer.decoding import beam_search, greedy_search, sample
from transformer.errors import TransformerError
from transformer.model import native
from transformer.model.frozen import freeze
from transformer.model.quantize import quantize

from .test_frozen import SRC, VARIANTS, _lm, _tokens, _transformer

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="no C++ compiler to build the compiled step with")


@pytest.fixture(scope="module", autouse=True)
def built():
    return native.build()  # cached after the first build (about a minute)


@torch.no_grad()
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rows", [1, 3, 40])  # one row (row blocks), MKL's transposed product, x W_t past 16
def test_compiled_step_equals_python_step(variant, rows):
    model = _transformer(**variant)
    compiled, python = freeze(model, native=True), freeze(model, native=False)
    assert compiled.decoder.native is not None and python.decoder.native is None
    src, tgt = SRC.repeat(14, 1)[:rows], _tokens(rows, 20)  # 20 > the cache's first allocation (16): it grows
    enc = compiled.encode(src)
    a, b = compiled.new_cache(), python.new_cache()
    for t in range(tgt.size(1)):
        out, ref = compiled.decode(tgt[:, t : t + 1], enc, a), python.decode(tgt[:, t : t + 1], enc, b)
        assert torch.equal(out, ref), f"step {t}"
        if t == 9:  # beam search's reorders, within and across sources
            order = torch.arange(rows).flip(0)
            a.reorder(order), b.reorder(order)
            enc = enc.reorder(order)
    assert a.length == b.length == tgt.size(1)
    for la, lb in zip(a.layers, b.layers):
        assert torch.equal(la.self_attn.k[:, :, : a.length], lb.self_attn.k[:, :, : b.length])
        assert torch.equal(la.self_attn.v[:, :, : a.length], lb.self_attn.v[:, :, : b.length])
    # the model's own EncoderOut (cross k/v projected into the cache), and a multi-token step after a prefix
    enc_model = model.encode(src)
    a, b = compiled.new_cache(), python.new_cache()
    for t in range(3):
        assert torch.equal(compiled.decode(tgt[:, t : t + 1], enc_model, a), python.decode(tgt[:, t : t + 1], enc_model, b))
    assert torch.equal(compiled.decode(tgt[:, 3:6], enc_model, a), python.decode(tgt[:, 3:6], enc_model, b))
    assert torch.equal(compiled.decode(tgt[:, 6:7], enc_model, a), python.decode(tgt[:, 6:7], enc_model, b))


@torch.no_grad()
@pytest.mark.parametrize("variant", VARIANTS[:2])
def test_compiled_step_language_model(variant):
    model = _lm(**variant)
    compiled, python = freeze(model, native=True), freeze(model, native=False)
    tokens = _tokens(2, 12)
    a, b = compiled.new_cache(), python.new_cache()
    assert torch.equal(compiled.decode(tokens[:, :4], a), python.decode(tokens[:, :4], b))  # the prompt: Python
    for t in range(4, 12):
        assert torch.equal(compiled.decode(tokens[:, t : t + 1], a), python.decode(tokens[:, t : t + 1], b))


@torch.no_grad()
def test_searches_on_the_compiled_step_give_the_same_outputs():
    model = _transformer(norm_first=False, positional="sinusoidal")
    compiled, python = freeze(model, native=True), freeze(model, native=False)
    assert [h.tokens for h in greedy_search(compiled, SRC, 0.0, 15)] == \
           [h.tokens for h in greedy_search(python, SRC, 0.0, 15)]
    assert [[h.tokens for h in n] for n in beam_search(compiled, SRC, 4, 0.6, 0.0, 15, 2)] == \
           [[h.tokens for h in n] for n in beam_search(python, SRC, 4, 0.6, 0.0, 15, 2)]
    lm = _lm()
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert list(sample(freeze(lm, native=True), [5, 6, 7], 12, 1.0, 0, 1.0, g1)) == \
           list(sample(freeze(lm, native=False), [5, 6, 7], 12, 1.0, 0, 1.0, g2))


def test_compiled_step_is_optional(monkeypatch):
    model = _transformer(norm_first=False, positional="sinusoidal")
    assert freeze(model).decoder.native is not None  # built (the fixture): used by default
    monkeypatch.setenv("TRANSFORMER_NATIVE", "0")
    native._loaded.clear()
    assert native.load() is None and freeze(model).decoder.native is None
    monkeypatch.setenv("TRANSFORMER_NATIVE", "1")
    native._loaded.clear()
    assert native.load() is not None
    with pytest.raises(TransformerError, match="int8"):
        freeze(quantize(model, "int8"), native=True)
    assert freeze(quantize(model, "int8")).decoder.native is None  # int8: the Python step, silently


def test_not_built_means_the_python_step(monkeypatch, tmp_path):
    monkeypatch.setenv("TRANSFORMER_NATIVE_DIR", str(tmp_path))  # an empty cache: nothing built there
    native._loaded.clear()
    try:
        assert native.load() is None
        model = _transformer(norm_first=False, positional="sinusoidal")
        assert freeze(model).decoder.native is None
    finally:
        monkeypatch.undo()
        native._loaded.clear()


def test_build_native_command(capsys, monkeypatch, tmp_path):
    from transformer.cli import main

    assert main(["build-native"]) == 0
    assert ".so" in capsys.readouterr().out

    def no_compiler(**kwargs):
        raise RuntimeError("Error building extension\ng++: not found")

    monkeypatch.setenv("TRANSFORMER_NATIVE_DIR", str(tmp_path))
    monkeypatch.setattr("torch.utils.cpp_extension.load", no_compiler)
    native._loaded.clear()
    try:
        assert main(["build-native"]) == 2
        err = capsys.readouterr().err
        assert "could not build the compiled decoder step" in err and "g++: not found" in err
        assert str(tmp_path) in err and "Traceback" not in err
    finally:
        monkeypatch.undo()
        native._loaded.clear()
