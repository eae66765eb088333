"""Tiny configs and synthetic data for the training tests (no tokenizer, no corpus)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np

from transformer.config import config_from_dict
from transformer.data.cache import TokenArray
from transformer.data.token_datasets import LMDataset, ParallelDataset

VOCAB = 24


def tiny_config(run_dir: Path, arch: str = "transformer", **train: object):
    """A very small model (d_model 32, one layer each side) and fast training settings."""
    train_cfg = dict(
        lr_schedule="inverse_sqrt", lr=3e-3, warmup_steps=5, max_steps=20, log_every=5, valid_every=10,
        save_every=10, keep_last=3, bleu_subset=0, seed=3,
    )
    train_cfg.update(train)
    return config_from_dict({
        "model": dict(arch=arch, d_model=32, n_heads=2, d_ff=64, n_encoder_layers=1, n_decoder_layers=1,
                      dropout=0.1, max_positions=64),
        "data": dict(dataset="files" if arch == "transformer" else "text", max_tokens=48, block_size=8),
        "train": train_cfg,
        "run_dir": str(run_dir),
    })


def copy_task(n_train: int = 96, n_valid: int = 16, seed: int = 0) -> SimpleNamespace:
    """Translation data where the target is the reversed source: learnable by a tiny model."""
    rng = np.random.default_rng(seed)

    def pairs(n):
        src = [rng.integers(4, VOCAB, size=int(rng.integers(3, 8))).tolist() for _ in range(n)]
        return ParallelDataset(TokenArray.from_lists(src), TokenArray.from_lists([s[::-1] for s in src]))

    return SimpleNamespace(tokenizer=None, train=pairs(n_train), valid=pairs(n_valid), valid_text=None,
                           src_vocab_size=VOCAB, tgt_vocab_size=VOCAB)


def lm_task(n_docs: int = 40, seed: int = 0) -> SimpleNamespace:
    """Language-model data: documents counting upwards modulo the vocabulary."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        start = int(rng.integers(4, VOCAB))
        docs.append([4 + (start + i) % (VOCAB - 4) for i in range(10)])
    arr = TokenArray.from_lists(docs)
    return SimpleNamespace(tokenizer=None, train=LMDataset(arr, 8), valid=LMDataset(arr, 8), valid_text=None,
                           src_vocab_size=VOCAB, tgt_vocab_size=VOCAB)


def ddp_config(run_dir: Path, update_freq: int):
    """Dropout off (masks differ across processes), 6 updates within the first epoch, on the CPU (gloo) also
    where a GPU is: two processes on one GPU is no launch torchrun's users make."""
    from transformer.config import replace

    cfg = tiny_config(run_dir, max_steps=6, update_freq=update_freq, valid_every=6, save_every=6, device="cpu")
    return replace(cfg, model=replace(cfg.model, dropout=0.0))
