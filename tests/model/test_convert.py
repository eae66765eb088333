"""Exact conversion between Hugging Face's MarianMTModel and our Transformer (needs the `hf` extra)."""

import pytest
import torch

from transformer.data.vocab import BOS_ID, EOS_ID, PAD_ID
from transformer.errors import TransformerError
from transformer.model.convert import from_marian, marian_channel_order, to_marian
from transformer.model.embeddings import sinusoidal_table

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.hf

V = 100
SRC = torch.tensor(
    [[5, 6, 7, 8, 9, 10, EOS_ID], [11, 12, 13, EOS_ID, PAD_ID, PAD_ID, PAD_ID], [14, EOS_ID] + [PAD_ID] * 5]
)
TGT = torch.tensor([[BOS_ID, 20, 21, 22, 23], [BOS_ID, 24, 25, PAD_ID, PAD_ID], [BOS_ID, 26, 27, 28, PAD_ID]])


def _marian(bias_std=0.5, **overrides):
    """A random MarianMTModel with the paper's choices and our special ids."""
    torch.manual_seed(0)
    settings = dict(
        vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, activation_function="relu",
        max_position_embeddings=64, pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=BOS_ID,
        decoder_start_token_id=BOS_ID, forced_eos_token_id=None, scale_embedding=True,
        share_encoder_decoder_embeddings=True, init_std=0.1, attn_implementation="eager",
    )
    settings.update(overrides)
    model = transformers.MarianMTModel(transformers.MarianConfig(**settings)).eval()
    with torch.no_grad():
        model.final_logits_bias.normal_(std=bias_std)  # zero after init; make it count
    return model


@torch.no_grad()
def _hf_logits(hf, src, tgt):
    return hf(input_ids=src, attention_mask=src.ne(PAD_ID), decoder_input_ids=tgt).logits


def _real(t):
    """Logits at real target positions only, (N,V)."""
    return t[TGT.ne(PAD_ID)]


def test_channel_order_turns_marians_table_into_the_papers():
    hf = _marian()
    perm = marian_channel_order(32)
    marian_table = hf.model.encoder.embed_positions.weight
    assert torch.allclose(marian_table[:, perm], sinusoidal_table(64, 32), atol=1e-6)


@pytest.mark.parametrize("positional", ["sinusoidal", "learned"])
def test_converted_marian_gives_the_same_logits(positional):
    hf = _marian(dropout=0.1, attention_dropout=0.1, activation_dropout=0.1)
    model, cfg = from_marian(hf, positional=positional)
    assert cfg.positional == positional and cfg.final_logits_bias and not cfg.norm_first
    assert (cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.n_encoder_layers, cfg.max_positions) == (32, 4, 64, 2, 64)
    assert (cfg.dropout, cfg.attention_dropout, cfg.activation_dropout) == (0.1, 0.1, 0.1)
    assert model.encoder.embed_tokens.weight is model.output.lm_head.weight  # Marian's three-way tying kept
    with torch.no_grad():
        ours = model(SRC, TGT)
    assert (_real(ours) - _real(_hf_logits(hf, SRC, TGT))).abs().max() <= 1e-4


def test_separate_marian_vocabularies_convert():
    hf = _marian(share_encoder_decoder_embeddings=False, decoder_vocab_size=80)
    model, _ = from_marian(hf)
    assert model.output.lm_head.weight is model.decoder.embed_tokens.weight
    assert model.encoder.embed_tokens.weight.shape[0] == V and model.decoder.embed_tokens.weight.shape[0] == 80
    with torch.no_grad():
        ours = model(SRC, TGT)
    assert (_real(ours) - _real(_hf_logits(hf, SRC, TGT))).abs().max() <= 1e-4


def test_untied_lm_head_converts_with_copied_embeddings():
    hf = _marian(tie_word_embeddings=False)  # shared source/target embeddings, separate lm_head
    model, cfg = from_marian(hf)
    assert not cfg.tie_embeddings
    assert not torch.equal(model.output.lm_head.weight, model.decoder.embed_tokens.weight)
    with torch.no_grad():
        ours = model(SRC, TGT)
    assert (_real(ours) - _real(_hf_logits(hf, SRC, TGT))).abs().max() <= 1e-4


@torch.no_grad()
def _greedy_ours(model, src, steps):
    """Greedy search with the KV cache; rows that emitted EOS continue with PAD."""
    enc, cache = model.encode(src), model.new_cache()
    out = torch.full((src.size(0), 1), BOS_ID)
    done = torch.zeros(src.size(0), dtype=torch.bool)
    for _ in range(steps):
        nxt = model.decode(out[:, -1:], enc, cache)[:, -1].argmax(-1)
        nxt = nxt.masked_fill(done, PAD_ID)
        done |= nxt.eq(EOS_ID)
        out = torch.cat([out, nxt[:, None]], dim=1)
    return out


def test_greedy_output_matches_hugging_face_generate():
    hf = _marian(bias_std=1.0, init_std=0.3)  # large enough weights that greedy output depends on the source
    model, _ = from_marian(hf)
    steps = 12
    with torch.no_grad():
        expected = hf.generate(
            input_ids=SRC, attention_mask=SRC.ne(PAD_ID), num_beams=1, do_sample=False,
            max_new_tokens=steps, min_new_tokens=0,
        )
    ours = _greedy_ours(model, SRC, steps)
    assert ours[:, : expected.size(1)].tolist() == expected.tolist()
    assert len(set(ours[:, 1:].flatten().tolist())) > 3  # a real test: the random model does not repeat one token


def _until_eos(ids):
    """ids cut after the first EOS (EOS kept), BOS dropped."""
    ids = [i for i in ids if i != BOS_ID]
    return ids[: ids.index(EOS_ID) + 1] if EOS_ID in ids else ids


def test_beam_search_with_power_length_penalty_matches_hugging_face_generate():
    """``length_penalty_form="power"`` is HF's ``len ** alpha`` (len with EOS) with ``early_stopping=True``:
    the same n-best lists and the same normalised scores."""
    from transformer.decoding import beam_search

    hf = _marian(bias_std=1.0, init_std=0.3)
    with torch.no_grad():
        hf.final_logits_bias[0, EOS_ID] = 5.5  # EOS likely enough that hypotheses end at different lengths
    model, _ = from_marian(hf)
    model.eval()
    limit, beam, alpha = 30, 4, 0.6
    with torch.no_grad():
        expected = hf.generate(
            input_ids=SRC, attention_mask=SRC.ne(PAD_ID), num_beams=beam, num_return_sequences=beam,
            do_sample=False, max_new_tokens=limit - 1, min_new_tokens=0, length_penalty=alpha, early_stopping=True,
            output_scores=True, return_dict_in_generate=True,
        )
    hf_tokens = [_until_eos(row) for row in expected.sequences.tolist()]
    ours = beam_search(model, SRC, beam=beam, alpha=alpha, max_len_a=0.0, max_len_b=limit, nbest=beam,
                       length_penalty_form="power")
    assert [h.tokens + [EOS_ID] for hyps in ours for h in hyps] == hf_tokens
    scores = torch.tensor([h.score for hyps in ours for h in hyps])
    assert torch.allclose(scores, expected.sequences_scores.float(), atol=1e-5, rtol=0)
    lengths = {len(t) for t in hf_tokens}
    assert len(lengths) > 2 and max(lengths) < limit  # a real test: the hypotheses end, at several lengths

    gnmt = beam_search(model, SRC, beam=beam, alpha=alpha, max_len_a=0.0, max_len_b=limit, nbest=beam)
    gnmt_scores = torch.tensor([h.score for hyps in gnmt for h in hyps])
    assert not torch.allclose(gnmt_scores, expected.sequences_scores.float(), atol=1e-2, rtol=0)  # the form counts


@pytest.mark.parametrize("positional", ["sinusoidal", "learned"])
def test_export_to_marian_gives_the_same_logits(positional):
    from dataclasses import replace

    from transformer.model import Transformer

    hf = _marian()
    _, cfg = from_marian(hf)
    torch.manual_seed(1)
    model = Transformer(replace(cfg, positional=positional), V, V).eval()
    with torch.no_grad():
        model.output.final_logits_bias.normal_()
        exported = to_marian(model)
        assert (_real(model(SRC, TGT)) - _real(_hf_logits(exported, SRC, TGT))).abs().max() <= 1e-4
    back, _ = from_marian(exported, positional=positional)
    for (name, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_export_survives_save_pretrained(tmp_path):
    hf = _marian(share_encoder_decoder_embeddings=False, decoder_vocab_size=80)
    model, _ = from_marian(hf)
    to_marian(model).save_pretrained(tmp_path)
    reloaded = transformers.MarianMTModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert (_real(model(SRC, TGT)) - _real(_hf_logits(reloaded, SRC, TGT))).abs().max() <= 1e-4


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(activation_function="swish"), "activation_function"),
        (dict(pad_token_id=58), "pad_token_id"),
        (dict(decoder_ffn_dim=128), "ffn"),
    ],
)
def test_unsupported_marian_features_raise(overrides, message):
    with pytest.raises(TransformerError, match=message):
        from_marian(_marian(**overrides))


def test_models_marian_cannot_express_are_not_exported():
    from dataclasses import replace

    from transformer.model import Transformer, TransformerLM

    _, cfg = from_marian(_marian())
    with pytest.raises(TransformerError, match="post-LayerNorm"):
        to_marian(Transformer(replace(cfg, norm_first=True), V, V))
    with pytest.raises(TransformerError, match="encoder-decoder"):
        to_marian(TransformerLM(replace(cfg, arch="lm"), V))
