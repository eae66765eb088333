"""prepare_data end to end on tiny corpora: every format, the report, tokenizer reuse, errors."""

from __future__ import annotations

import json

import pytest

from transformer.config import load_config
from transformer.data.batching import make_batches
from transformer.data.prepare import prepare_data
from transformer.data.token_datasets import LMDataset, ParallelDataset
from transformer.data.tokenizer import Tokenizer
from transformer.errors import TransformerError

from .helpers import synthetic_pairs, write_lines, write_parallel


def cfg_for(path, *overrides, dataset="files"):
    return load_config(None, [f"data.dataset={dataset}", f"data.path={path}", "data.vocab_size=300",
                              "data.max_len=12", "data.max_tokens=256", *overrides])


def test_files_plain_pairs(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    train = synthetic_pairs(300) + [("", "leer"), ("nur links", "")]
    write_parallel(corpus, "train", train)
    write_parallel(corpus, "val", synthetic_pairs(20, seed=1))
    write_parallel(corpus, "test_2017_flickr", synthetic_pairs(10, seed=2))
    logs = []
    data = prepare_data(cfg_for(corpus), tmp_path / "run", log=logs.append)
    assert isinstance(data.train, ParallelDataset) and (tmp_path / "run" / "tokenizer" / "tokenizer.json").is_file()
    dropped = data.report.dropped["train"]
    assert dropped["empty source"] == 1 and dropped["empty target"] == 1
    assert len(data.train) + dropped.get("too long (tokens)", 0) == 300
    assert data.report.kept["train"] == len(data.train)
    assert data.valid_text == synthetic_pairs(20, seed=1) and len(data.test_text) == 10
    assert "empty source" in logs[-1]
    assert all(max(s.size(1), t.size(1)) <= 12 for b in make_batches(data.train, 256)
               for s, t in [(b.src_tokens, b.tgt_input)])
    # a second run reuses the tokenizer and the cache
    tok_mtime = (tmp_path / "run" / "tokenizer" / "spm.model").stat().st_mtime_ns
    again = prepare_data(cfg_for(corpus), tmp_path / "run", log=logs.append)
    assert (tmp_path / "run" / "tokenizer" / "spm.model").stat().st_mtime_ns == tok_mtime
    assert len(again.train) == len(data.train)


@pytest.mark.parametrize("fmt", ["tsv", "jsonl"])
def test_files_tsv_and_jsonl(tmp_path, fmt, tiny_tokenizer):
    for prefix, n in (("train", 100), ("val", 10)):
        pairs = synthetic_pairs(n, seed=n)
        if fmt == "tsv":
            write_lines(tmp_path / f"{prefix}.tsv", [f"{s}\t{t}" for s, t in pairs])
        else:
            write_lines(tmp_path / f"{prefix}.jsonl", [json.dumps({"en": s, "de": t}) for s, t in pairs])
    data = prepare_data(cfg_for(tmp_path, "data.max_len=64"), tmp_path / "run", tokenizer=tiny_tokenizer, log=lambda s: None)
    assert len(data.train) == 100 and data.valid_text == synthetic_pairs(10, seed=10) and data.test_text is None
    assert Tokenizer.load(tmp_path / "run" / "tokenizer").fingerprint() == tiny_tokenizer.fingerprint()


def test_missing_split_and_folder(tmp_path):
    with pytest.raises(TransformerError, match="folder .* does not exist"):
        prepare_data(cfg_for(tmp_path / "nope"), tmp_path / "run", log=lambda s: None)
    write_parallel(tmp_path, "train", synthetic_pairs(5))
    with pytest.raises(TransformerError, match="no 'val' split"):
        prepare_data(cfg_for(tmp_path), tmp_path / "run", log=lambda s: None)


def test_max_train_examples(tmp_path, tiny_tokenizer):
    write_parallel(tmp_path, "train", synthetic_pairs(100))
    write_parallel(tmp_path, "val", synthetic_pairs(5))
    data = prepare_data(cfg_for(tmp_path, "data.max_train_examples=30", "data.max_len=64"), tmp_path / "run",
                        tokenizer=tiny_tokenizer, log=lambda s: None)
    assert len(data.train) == 30


def test_everything_too_long_is_an_error(tmp_path, tiny_tokenizer):
    write_parallel(tmp_path, "train", synthetic_pairs(20))
    write_parallel(tmp_path, "val", synthetic_pairs(5))
    with pytest.raises(TransformerError, match=r"empty after filtering examples longer than data\.max_len=2"):
        prepare_data(cfg_for(tmp_path, "data.max_len=2"), tmp_path / "run", tokenizer=tiny_tokenizer, log=lambda s: None)


def test_text_dataset_for_language_models(tmp_path, tiny_tokenizer):
    lines = [s for s, _ in synthetic_pairs(400)]
    write_lines(tmp_path / "book.txt", lines)
    cfg = cfg_for(tmp_path / "book.txt", "model.arch=lm", "data.block_size=16", dataset="text")
    data = prepare_data(cfg, tmp_path / "run", tokenizer=tiny_tokenizer, log=lambda s: None)
    assert isinstance(data.train, LMDataset) and data.valid_text is None
    assert data.report.kept == {"train": 396, "valid": 4}  # the last 1% of the lines validate
    batch = next(make_batches(data.train, 256))
    assert batch.src_tokens is None and batch.tgt_input.shape[1] == 16


def test_builtin_multi30k(multi30k_dir, tmp_path, tiny_tokenizer):
    cfg = cfg_for(multi30k_dir, "data.max_len=256", "data.max_train_examples=2000", dataset="multi30k")
    data = prepare_data(cfg, tmp_path / "run", tokenizer=tiny_tokenizer, log=lambda s: None)
    assert len(data.train) == 2000 and len(data.valid) == 1014 and len(data.test_text) == 1000
