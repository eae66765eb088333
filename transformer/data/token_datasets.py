"""Datasets over encoded token arrays: parallel examples for translation, fixed blocks for language models.

Both index like a list and ``collate`` a list of their items into a :class:`~transformer.data.batching.Batch`
(``collate_indices`` does the same from the indices, faster),
so they work with :class:`~transformer.data.batching.TokenBatchSampler` directly or inside a
``torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=dataset.collate)``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from transformer.data.batching import Batch, collate, collate_lm
from transformer.data.cache import TokenArray
from transformer.data.vocab import BOS_ID, EOS_ID, PAD_ID
from transformer.errors import TransformerError


class ParallelDataset:
    """Aligned source/target id sequences, optionally restricted to the examples within ``max_len``.

    An example's model-side lengths are ``len(src) + 1`` (EOS appended) and ``len(tgt) + 1``
    (BOS prepended to the input / EOS appended to the output); ``max_len`` bounds those.
    ``dataset[i]`` is ``(src_ids, tgt_ids)`` (int64 arrays, no special tokens).
    """

    def __init__(self, src: TokenArray, tgt: TokenArray, max_len: Optional[int] = None):
        if len(src) != len(tgt):
            raise ValueError(f"source and target arrays differ in length: {len(src)} vs {len(tgt)}")
        self.src, self.tgt = src, tgt
        src_len, tgt_len = src.lengths + 1, tgt.lengths + 1
        if max_len is None:
            self.indices = np.arange(len(src), dtype=np.int64)
        else:
            self.indices = np.flatnonzero((src_len <= max_len) & (tgt_len <= max_len))
        self.n_too_long = len(src) - len(self.indices)
        self.src_lengths = src_len[self.indices]
        self.tgt_lengths = tgt_len[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        j = int(self.indices[i])
        return self.src[j], self.tgt[j]

    @property
    def lengths(self) -> np.ndarray:
        """(n,) the padded size of each example: the longer side, special tokens included."""
        return np.maximum(self.src_lengths, self.tgt_lengths)

    @staticmethod
    def collate(items: Sequence[tuple[np.ndarray, np.ndarray]]) -> Batch:
        return collate(items)

    def collate_indices(self, indices: Sequence[int]) -> Batch:
        """``collate([self[i] for i in indices])``, built with array operations (the trainer's path)."""
        rows = self.indices[np.asarray(indices, dtype=np.int64)]
        pad = lambda array, prefix, suffix: torch.from_numpy(array.padded(rows, prefix, suffix, PAD_ID))  # noqa: E731
        return Batch(pad(self.src, None, EOS_ID), pad(self.tgt, BOS_ID, None), pad(self.tgt, None, EOS_ID))


class LMDataset:
    """A token stream cut into blocks of ``block_size + 1`` tokens (input ``x[:-1]``, target ``x[1:]``).

    Documents (lines) are joined with EOS between them (and after the last). Blocks start every
    ``block_size`` tokens, so consecutive blocks share one token and every token is predicted once.
    ``dataset[i]`` is a (block_size + 1,) int64 array.
    """

    def __init__(self, docs: TokenArray, block_size: int):
        # Documents joined with EOS: insert one EOS after each document.
        n_docs = len(docs)
        tokens = np.asarray(docs.tokens, dtype=np.int64)
        stream = np.full(len(tokens) + n_docs, EOS_ID, dtype=np.int64)
        positions = np.arange(len(tokens)) + np.repeat(np.arange(n_docs), docs.lengths)
        stream[positions] = tokens
        if len(stream) < block_size + 1:
            raise TransformerError(
                f"config field data.block_size: the text has only {len(stream)} tokens, fewer than "
                f"block_size + 1 = {block_size + 1}; lower data.block_size or add text"
            )
        self.stream, self.block_size = stream, block_size
        self.n_blocks = (len(stream) - 1) // block_size

    def __len__(self) -> int:
        return self.n_blocks

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.n_blocks:
            raise IndexError(i)
        start = i * self.block_size
        return self.stream[start: start + self.block_size + 1]

    @property
    def lengths(self) -> np.ndarray:
        return np.full(self.n_blocks, self.block_size, dtype=np.int64)

    src_lengths = None

    @property
    def tgt_lengths(self) -> np.ndarray:
        return self.lengths

    @staticmethod
    def collate(items: Sequence[np.ndarray]) -> Batch:
        return collate_lm(items)

    def collate_indices(self, indices: Sequence[int]) -> Batch:
        """``collate([self[i] for i in indices])``."""
        return collate_lm([self[i] for i in indices])


__all__ = ["ParallelDataset", "LMDataset"]
