"""Shared fixtures for the data tests: one small tokenizer per session, the Multi30k folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from transformer.data.tokenizer import Tokenizer

from .helpers import MULTI30K, synthetic_pairs


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Tokenizer:
    pairs = synthetic_pairs(400)
    return Tokenizer.train([s for s, _ in pairs], [t for _, t in pairs], vocab_size=320,
                           out_dir=tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def multi30k_dir() -> Path:
    if not (MULTI30K / "train.en").is_file():
        pytest.skip(f"Multi30k not found at {MULTI30K}")
    return MULTI30K.resolve()
