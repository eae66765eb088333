"""Int8 dynamic quantisation (transformer.model.quantize): close to the float model, float model untouched,
decoding and the inference API run on it, clear errors for what it cannot do."""

import pytest
import torch
from torch import nn

from transformer.config import ModelConfig
from transformer.decoding import beam_search, greedy_search
from transformer.errors import TransformerError
from transformer.model import Transformer, TransformerLM
from transformer.model.quantize import quantize

V = 200
CFG = ModelConfig(d_model=64, n_heads=4, d_ff=256, n_encoder_layers=2, n_decoder_layers=2, dropout=0.0,
                  max_positions=64)


def _model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(CFG, V, V).eval()


def _linears(model: nn.Module) -> int:
    return sum(type(m) is nn.Linear for m in model.modules())


@torch.no_grad()
def test_int8_logits_are_close_to_float_and_the_float_model_is_untouched():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = quantize(model)
    assert _linears(model) > 0 and _linears(q) == 0  # every Linear replaced in the copy only
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    src, tgt = torch.randint(4, V, (4, 12)), torch.randint(4, V, (4, 10))
    ref, out = model(src, tgt), q(src, tgt)  # (B,T,V)
    assert out.shape == ref.shape
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.05, f"int8 logits differ from float32 by {rel:.3f} (relative)"
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    assert (out - ref).abs().max() > 0  # it really runs in int8


@torch.no_grad()
def test_decoding_runs_on_the_int8_model():
    q = quantize(_model())
    src = torch.randint(4, V, (3, 9))
    greedy = greedy_search(q, src, max_len_a=0.0, max_len_b=12)
    beams = beam_search(q, src, beam=1, max_len_a=0.0, max_len_b=12)
    assert [h.tokens for h in greedy] == [n[0].tokens for n in beams]  # beam 1 = greedy holds in int8 too


@torch.no_grad()
def test_language_model_quantizes():
    torch.manual_seed(0)
    lm = TransformerLM(ModelConfig(arch="lm", d_model=64, n_heads=4, d_ff=128, n_decoder_layers=2, dropout=0.0,
                                   max_positions=32), V).eval()
    x = torch.randint(4, V, (2, 16))
    ref, out = lm(x), quantize(lm)(x)
    assert (out - ref).norm() / ref.norm() < 0.05


def test_errors():
    with pytest.raises(TransformerError, match="unknown quantisation 'int4'"):
        quantize(_model(), "int4")
    with torch.device("meta"):
        on_meta = Transformer(CFG, V, V)
    with pytest.raises(TransformerError, match="CPU only"):
        quantize(on_meta)
