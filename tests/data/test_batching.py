"""Batch conventions, token-based batching, exact resume and rank sharding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from transformer.data.batching import Batch, TokenBatchSampler, collate, collate_lm, make_batches, sampler_for
from transformer.data.cache import TokenArray
from transformer.data.token_datasets import LMDataset, ParallelDataset
from transformer.data.vocab import BOS_ID, EOS_ID, PAD_ID
from transformer.errors import TransformerError


def random_lengths(n=500, seed=0, high=60):
    rng = np.random.default_rng(seed)
    return rng.integers(1, high, n), rng.integers(1, high, n)


def all_batches(sampler):
    return [list(b) for b in sampler]


def test_collate_conventions():
    batch = collate([([5, 6, 7], [8, 9]), ([10], [11, 12, 13])])
    assert batch.src_tokens.tolist() == [[5, 6, 7, EOS_ID], [10, EOS_ID, PAD_ID, PAD_ID]]
    assert batch.tgt_input.tolist() == [[BOS_ID, 8, 9, PAD_ID], [BOS_ID, 11, 12, 13]]
    assert batch.tgt_output.tolist() == [[8, 9, EOS_ID, PAD_ID], [11, 12, 13, EOS_ID]]
    assert batch.src_tokens.dtype == torch.long and batch.n_tgt_tokens == 7 and len(batch) == 2
    moved = batch.to("cpu")
    assert isinstance(moved, Batch) and torch.equal(moved.tgt_output, batch.tgt_output)


def test_collate_lm():
    batch = collate_lm([np.array([4, 5, 6, 7]), np.array([8, 9, 10, 11])])
    assert batch.src_tokens is None
    assert batch.tgt_input.tolist() == [[4, 5, 6], [8, 9, 10]]
    assert batch.tgt_output.tolist() == [[5, 6, 7], [9, 10, 11]]


def test_no_batch_over_max_tokens_and_every_example_once():
    src, tgt = random_lengths()
    sampler = TokenBatchSampler(src, tgt, max_tokens=200, seed=3)
    batches = all_batches(sampler)
    size = np.maximum(src, tgt)
    for b in batches:
        assert len(b) * size[b].max() <= 200
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(src)))
    assert len(batches) == len(sampler)


def test_same_seed_same_order_new_epoch_new_order():
    src, tgt = random_lengths()
    a = TokenBatchSampler(src, tgt, 200, seed=1)
    b = TokenBatchSampler(src, tgt, 200, seed=1)
    assert all_batches(a) == all_batches(b)
    epoch0 = all_batches(a)
    a.set_epoch(1)
    epoch1 = all_batches(a)
    assert epoch1 != epoch0 and sorted(map(tuple, epoch1)) == sorted(map(tuple, epoch0))
    assert all_batches(TokenBatchSampler(src, tgt, 200, seed=2)) != epoch0


def test_no_shuffle_is_sorted_by_length():
    src, tgt = random_lengths()
    batches = all_batches(TokenBatchSampler(src, tgt, 200, shuffle=False))
    maxes = [np.maximum(src, tgt)[b].max() for b in batches]
    assert maxes == sorted(maxes)


@pytest.mark.parametrize("stop", [0, 1, 7, 20])
def test_resume_mid_epoch_gives_the_remaining_batches(stop):
    src, tgt = random_lengths()
    full = TokenBatchSampler(src, tgt, 200, seed=5)
    full.set_epoch(2)
    expected = all_batches(full)
    first = TokenBatchSampler(src, tgt, 200, seed=5)
    first.set_epoch(2)
    it = iter(first)
    seen = [next(it) for _ in range(stop)]
    state = first.state_dict()
    assert state == {"epoch": 2, "position": stop}
    resumed = TokenBatchSampler(src, tgt, 200, seed=5)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # a trainer calling set_epoch with the same epoch keeps the position
    assert seen + all_batches(resumed) == expected


def test_finished_epoch_state_points_at_the_next_epoch():
    src, tgt = random_lengths(50)
    s = TokenBatchSampler(src, tgt, 200)
    all_batches(s)
    assert s.state_dict() == {"epoch": 1, "position": 0}
    assert all_batches(s) == all_batches(TokenBatchSampler(src, tgt, 200))  # iterating again replays


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ranks_partition_the_batches(world_size):
    src, tgt = random_lengths(301)
    single = TokenBatchSampler(src, tgt, 150, seed=9)
    n = len(single)
    per_rank = [all_batches(TokenBatchSampler(src, tgt, 150, seed=9, rank=r, world_size=world_size))
                for r in range(world_size)]
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == -(-n // world_size)
    union = [tuple(b) for rank in per_rank for b in rank]
    assert set(union) == set(map(tuple, all_batches(single)))  # every batch on some rank
    assert len(union) - len(set(union)) == len(union) - n  # only the padding repeats


def test_max_tokens_smaller_than_an_example_is_an_error():
    with pytest.raises(TransformerError, match=r"data\.max_tokens: 10 is smaller than the longest example \(12"):
        TokenBatchSampler([3, 12], [4, 5], max_tokens=10)


def test_parallel_dataset_filters_by_max_len_and_batches():
    src = TokenArray.from_lists([[5] * n for n in (1, 2, 9, 3)])
    tgt = TokenArray.from_lists([[6] * n for n in (2, 9, 1, 3)])
    ds = ParallelDataset(src, tgt, max_len=5)  # lengths with EOS/BOS: (2,3) (3,10) (10,2) (4,4)
    assert len(ds) == 2 and ds.n_too_long == 2
    assert ds.src_lengths.tolist() == [2, 4] and ds.lengths.tolist() == [3, 4]
    s, t = ds[1]
    assert s.tolist() == [5, 5, 5] and t.tolist() == [6, 6, 6]
    batches = list(make_batches(ds, max_tokens=8, shuffle=False))
    assert sum(len(b) for b in batches) == 2
    assert all(b.src_tokens.numel() <= 8 and b.tgt_input.numel() <= 8 for b in batches)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_collate_indices_equals_collate_of_the_items(dtype):
    # The trainer's vectorised path must build exactly the batch that collating the items builds, for
    # any selection: repeated and unordered indices, empty sequences, a max_len filter, uint16 caches.
    rng = np.random.default_rng(0)
    lists = [rng.integers(4, 60000 if dtype == np.uint16 else 100000, size=n).tolist()
             for n in rng.integers(0, 12, size=40)]
    src = TokenArray.from_lists(lists)
    tgt = TokenArray.from_lists(lists[::-1])
    src.tokens, tgt.tokens = src.tokens.astype(dtype), tgt.tokens.astype(dtype)
    ds = ParallelDataset(src, tgt, max_len=10)
    for indices in ([0], [3, 1, 3], list(range(len(ds)))[::-1], rng.integers(0, len(ds), size=17).tolist()):
        fast, slow = ds.collate_indices(indices), ds.collate([ds[i] for i in indices])
        for name in ("src_tokens", "tgt_input", "tgt_output"):
            a, b = getattr(fast, name), getattr(slow, name)
            assert a.dtype == b.dtype == torch.int64 and torch.equal(a, b), name


def test_collate_indices_of_empty_sequences():
    ds = ParallelDataset(TokenArray.from_lists([[], []]), TokenArray.from_lists([[], [7]]))
    batch = ds.collate_indices([0, 1])
    assert batch.src_tokens.tolist() == [[EOS_ID], [EOS_ID]]
    assert batch.tgt_input.tolist() == [[BOS_ID, PAD_ID], [BOS_ID, 7]]
    assert batch.tgt_output.tolist() == [[EOS_ID, PAD_ID], [7, EOS_ID]]


def test_dataloader_compatible():
    src = TokenArray.from_lists([[5] * n for n in range(1, 20)])
    ds = ParallelDataset(src, src)
    sampler = sampler_for(ds, 40, seed=1)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=ds.collate)
    assert sum(len(b) for b in loader) == 19


def test_lm_dataset_blocks():
    docs = TokenArray.from_lists([[10, 11, 12], [20, 21], [30, 31, 32, 33]])
    ds = LMDataset(docs, block_size=4)
    # stream: 10 11 12 EOS 20 21 EOS 30 31 32 33 EOS  (12 tokens) -> blocks of 5 every 4: 2 blocks
    assert len(ds) == 2
    assert ds[0].tolist() == [10, 11, 12, EOS_ID, 20] and ds[1].tolist() == [20, 21, EOS_ID, 30, 31]
    batch = next(make_batches(ds, max_tokens=8, shuffle=False))
    assert batch.src_tokens is None and batch.tgt_input.shape == (2, 4)
    with pytest.raises(TransformerError, match="block_size"):
        LMDataset(docs, block_size=100)
