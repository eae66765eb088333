"""Batches: the :class:`Batch` tensors, ``collate``, and token-based batching with exact resume.

Conventions (docs/ARCHITECTURE.md): source ``ids + [EOS]``; decoder input ``[BOS] + ids``; decoder
target ``ids + [EOS]``; padding with ``PAD_ID`` on the right.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from transformer.data.vocab import BOS_ID, EOS_ID, PAD_ID
from transformer.errors import TransformerError


@dataclass
class Batch:
    """One batch of examples.

    Shapes:
        src_tokens: (B, S) int64, or None for a language model;
        tgt_input: (B, T) int64; tgt_output: (B, T) int64. Padding is ``PAD_ID``.
    """

    src_tokens: Optional[torch.Tensor]
    tgt_input: torch.Tensor
    tgt_output: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """A copy with every tensor on ``device``."""
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch(move(self.src_tokens), move(self.tgt_input), move(self.tgt_output))

    def pin_memory(self) -> "Batch":
        pin = lambda t: None if t is None else t.pin_memory()  # noqa: E731
        return Batch(pin(self.src_tokens), pin(self.tgt_input), pin(self.tgt_output))

    @property
    def n_tgt_tokens(self) -> int:
        """Non-pad tokens in ``tgt_output`` (what the loss is normalised by)."""
        return int((self.tgt_output != PAD_ID).sum().item())

    def __len__(self) -> int:
        return self.tgt_input.shape[0]


def _pad(seqs: Sequence[np.ndarray], prefix: Optional[int], suffix: Optional[int]) -> torch.Tensor:
    """(B, L) padded to the longest, with an optional id before and after each sequence."""
    extra = (prefix is not None) + (suffix is not None)
    width = max(len(s) for s in seqs) + extra
    out = np.full((len(seqs), width), PAD_ID, dtype=np.int64)
    for row, s in enumerate(seqs):
        start = 0
        if prefix is not None:
            out[row, 0] = prefix
            start = 1
        out[row, start: start + len(s)] = s
        if suffix is not None:
            out[row, start + len(s)] = suffix
    return torch.from_numpy(out)


def collate(items: Sequence[tuple[Sequence[int], Sequence[int]]]) -> Batch:
    """Build a translation :class:`Batch` from ``(src_ids, tgt_ids)`` pairs (ids without special tokens).

    Shapes:
        src_tokens (B, max len(src) + 1), tgt_input / tgt_output (B, max len(tgt) + 1).
    """
    if not items:
        raise ValueError("cannot collate an empty batch")
    src = [np.asarray(s, dtype=np.int64) for s, _ in items]
    tgt = [np.asarray(t, dtype=np.int64) for _, t in items]
    return Batch(_pad(src, None, EOS_ID), _pad(tgt, BOS_ID, None), _pad(tgt, None, EOS_ID))


def collate_lm(blocks: Sequence[Sequence[int]]) -> Batch:
    """Build a language-model :class:`Batch` from blocks: input ``x[:-1]``, target ``x[1:]``.

    Shapes:
        tgt_input, tgt_output: (B, max block length - 1); ``src_tokens`` is None.
    """
    if not blocks:
        raise ValueError("cannot collate an empty batch")
    blocks = [np.asarray(b, dtype=np.int64) for b in blocks]
    return Batch(None, _pad([b[:-1] for b in blocks], None, None), _pad([b[1:] for b in blocks], None, None))


class TokenBatchSampler:
    """Length-bucketed batches of example indices under a token budget, sharded, resumable.

    Examples are sorted by length (longer side, then target, then index) and cut greedily into batches
    with ``batch_size * max_len <= max_tokens`` (padding counted, as fairseq). The batches are fixed;
    each epoch shuffles their order with ``seed + epoch``. With ``world_size > 1`` the batch list is
    padded (repeating its first batches) to a multiple of ``world_size`` and rank ``r`` takes batches
    ``r, r + world_size, ...``, so every rank has ``len(self)`` batches.

    Resume: ``state_dict()`` holds the epoch and how many batches this rank has already yielded in it;
    after ``load_state_dict``, iterating yields exactly the remaining batches. ``set_epoch(e)`` with a
    new epoch starts it from the beginning (with the same epoch it keeps the position). Iterating again
    after an epoch was fully consumed replays it from the start.
    """

    def __init__(
        self,
        src_lengths: Optional[Sequence[int]],
        tgt_lengths: Sequence[int],
        max_tokens: int,
        shuffle: bool = True,
        seed: int = 1,
        rank: int = 0,
        world_size: int = 1,
    ):
        tgt = np.asarray(tgt_lengths, dtype=np.int64)
        size = tgt if src_lengths is None else np.maximum(np.asarray(src_lengths, dtype=np.int64), tgt)
        if len(size) == 0:
            raise TransformerError("cannot batch an empty dataset")
        longest = int(size.max())
        if max_tokens < longest:
            raise TransformerError(
                f"config field data.max_tokens: {max_tokens} is smaller than the longest example "
                f"({longest} tokens); raise data.max_tokens or lower data.max_len / data.block_size"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.max_tokens, self.shuffle, self.seed = max_tokens, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.n_examples = len(size)
        self.batches = self._make_batches(size, tgt, max_tokens)
        self.epoch = 0
        self.position = 0  # batches of the current epoch already yielded by this rank

    @staticmethod
    def _make_batches(size: np.ndarray, tgt: np.ndarray, max_tokens: int) -> list[np.ndarray]:
        order = np.lexsort((np.arange(len(size)), tgt, size))  # by size, then target length, then index
        batches, start, batch_max = [], 0, 0
        for pos, idx in enumerate(order):
            n = pos - start
            new_max = max(batch_max, int(size[idx]))
            if n > 0 and (n + 1) * new_max > max_tokens:
                batches.append(order[start:pos])
                start, new_max = pos, int(size[idx])
            batch_max = new_max
        batches.append(order[start:])
        return batches

    def _epoch_batches(self) -> list[np.ndarray]:
        """This rank's batches for the current epoch, in order."""
        order = np.arange(len(self.batches))
        if self.shuffle:
            order = np.random.default_rng(self.seed + self.epoch).permutation(len(self.batches))
        per_rank = -(-len(order) // self.world_size)
        total = per_rank * self.world_size
        order = np.concatenate([order, order[: total - len(order)]])  # pad so every rank gets per_rank
        return [self.batches[i] for i in order[self.rank::self.world_size]]

    def __len__(self) -> int:
        return -(-len(self.batches) // self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (its batch order); a different epoch starts from its first batch."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def __iter__(self) -> Iterator[list[int]]:
        if self.position >= len(self):
            self.position = 0
        batches = self._epoch_batches()
        while self.position < len(batches):
            batch = batches[self.position]
            self.position += 1
            yield batch.tolist()

    def state_dict(self) -> dict:
        """``{"epoch", "position"}``: a finished epoch is stored as the start of the next one."""
        if self.position >= len(self):
            return {"epoch": self.epoch + 1, "position": 0}
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def make_batches(
    dataset,
    max_tokens: int,
    shuffle: bool = True,
    seed: int = 1,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    sampler: Optional[TokenBatchSampler] = None,
) -> Iterator[Batch]:
    """Yield :class:`Batch` objects for one epoch of ``dataset`` (a ParallelDataset or LMDataset).

    Pass your own ``sampler`` (built with :func:`sampler_for`) to keep its position for resuming.
    """
    if sampler is None:
        sampler = sampler_for(dataset, max_tokens, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size)
        sampler.set_epoch(epoch)
    for indices in sampler:
        yield dataset.collate_indices(indices)


def sampler_for(dataset, max_tokens: int, **kwargs) -> TokenBatchSampler:
    """A :class:`TokenBatchSampler` over a dataset's ``src_lengths`` / ``tgt_lengths``."""
    return TokenBatchSampler(dataset.src_lengths, dataset.tgt_lengths, max_tokens, **kwargs)


__all__ = ["Batch", "collate", "collate_lm", "TokenBatchSampler", "make_batches", "sampler_for"]
