"""The binary token cache: exact ids, reuse, invalidation, the worker pool."""

from __future__ import annotations

import os

import numpy as np
import pytest

from transformer.data import cache as cache_module
from transformer.data.cache import TokenArray, encode_corpus
from transformer.data.corpora import Corpus, parallel_files
from transformer.errors import TransformerError

from .helpers import synthetic_pairs, write_parallel


def test_token_array_save_load(tmp_path):
    arr = TokenArray.from_lists([[1, 2, 3], [], [70000]])
    arr.save(tmp_path / "a")
    back = TokenArray.load(tmp_path / "a")
    assert len(back) == 3 and back[0].tolist() == [1, 2, 3] and back[1].tolist() == [] and back[2].tolist() == [70000]
    assert back.lengths.tolist() == [3, 0, 1]


def test_encoded_ids_match_the_tokenizer(tmp_path, tiny_tokenizer):
    pairs = synthetic_pairs(50) + [("", "leer"), ("x" * 91, "lang")]
    write_parallel(tmp_path, "train", pairs)
    corpus = parallel_files(tmp_path / "train.en", tmp_path / "train.de")
    enc = encode_corpus(corpus, tiny_tokenizer, tmp_path / "cache", "train", max_chars=90)
    kept = [p for p in pairs if p[0] and len(p[0]) <= 90 and len(p[1]) <= 90]
    assert len(enc.src) == len(kept) == enc.report.kept["train"]
    assert enc.report.dropped["train"] == {"empty source": 1, "too long (chars)": 1}
    for i, (s, t) in enumerate(kept):
        assert enc.src[i].tolist() == tiny_tokenizer.encode_src(s)
        assert enc.tgt[i].tolist() == tiny_tokenizer.encode_tgt(t)
    assert isinstance(enc.src.tokens, np.memmap) and enc.src.tokens.dtype == np.uint16


def test_cache_is_reused_and_invalidated(tmp_path, tiny_tokenizer, monkeypatch):
    write_parallel(tmp_path, "train", synthetic_pairs(20))
    corpus = lambda: parallel_files(tmp_path / "train.en", tmp_path / "train.de")  # noqa: E731
    first = encode_corpus(corpus(), tiny_tokenizer, tmp_path / "c", "train", max_chars=100)
    calls = []
    real = cache_module._encode_into
    monkeypatch.setattr(cache_module, "_encode_into", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = encode_corpus(corpus(), tiny_tokenizer, tmp_path / "c", "train", max_chars=100)
    assert calls == [] and again.path == first.path
    encode_corpus(corpus(), tiny_tokenizer, tmp_path / "c", "train", max_chars=99)  # new options
    assert calls == [1]
    write_parallel(tmp_path, "train", synthetic_pairs(21))  # new content (size changes)
    changed = encode_corpus(corpus(), tiny_tokenizer, tmp_path / "c", "train", max_chars=100)
    assert calls == [1, 1] and len(changed.src) == 21
    assert not [p for p in (tmp_path / "c").iterdir() if ".tmp" in p.name]


def test_pool_gives_the_same_ids_in_order(tmp_path, tiny_tokenizer):
    pairs = synthetic_pairs(300, seed=4)
    corpus = Corpus.from_list(pairs, "toy")
    serial = encode_corpus(corpus, tiny_tokenizer, tmp_path / "a", "train", 100, num_workers=1)
    pooled = encode_corpus(corpus, tiny_tokenizer, tmp_path / "b", "train", 100, num_workers=2, chunk_size=16)
    assert np.array_equal(serial.src.tokens, pooled.src.tokens)
    assert np.array_equal(serial.tgt.offsets, pooled.tgt.offsets)


def test_limit_and_monolingual(tmp_path, tiny_tokenizer):
    corpus = Corpus.from_list(["the dog", "", "a cat", "the park"], "text")
    enc = encode_corpus(corpus, tiny_tokenizer, tmp_path, "train", 100, limit=2, monolingual=True)
    assert enc.src is None and len(enc.tgt) == 2 and enc.tgt[1].tolist() == tiny_tokenizer.encode_tgt("a cat")
    assert enc.report.dropped["train"] == {"empty": 1}


def test_empty_after_filtering_is_an_error(tmp_path, tiny_tokenizer):
    write_parallel(tmp_path, "train", [("", "a"), ("b", "")])
    corpus = parallel_files(tmp_path / "train.en", tmp_path / "train.de")
    with pytest.raises(TransformerError, match=r"train split of .* is empty after filtering") as exc:
        encode_corpus(corpus, tiny_tokenizer, tmp_path / "c", "train", 100)
    assert "1 empty source" in str(exc.value) and "1 empty target" in str(exc.value)


def test_errors_while_encoding_leave_no_partial_cache(tmp_path, tiny_tokenizer):
    write_parallel(tmp_path, "train", synthetic_pairs(5))
    (tmp_path / "train.de").write_bytes(b"a\nb\n\xff\nd\ne\n")
    corpus = parallel_files(tmp_path / "train.en", tmp_path / "train.de")
    with pytest.raises(TransformerError, match=r"train\.de:3: invalid UTF-8"):
        encode_corpus(corpus, tiny_tokenizer, tmp_path / "c", "train", 100)
    assert not os.listdir(tmp_path / "c") if (tmp_path / "c").exists() else True
