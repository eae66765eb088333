"""Encode a corpus once into a binary cache of token ids, and read it back memory-mapped.

A split of a corpus becomes, per side, a :class:`TokenArray` folder::

    {cache_dir}/{split}-{key}/src/tokens.bin    all token ids, back to back (uint16, or int32 for V > 65535)
                              src/offsets.npy   int64 (n + 1,): sequence i is tokens[offsets[i]:offsets[i+1]]
                              src/meta.json     dtype and count
                              tgt/...           the same for the target side (the only side for text)
                              report.json       what the filters dropped while encoding

``key`` hashes the corpus fingerprint (file paths + sizes + mtimes, or the content of an in-memory
list), the tokenizer (a hash of its model files) and the options (``max_chars``, the example limit),
so a change to any of them encodes again, and anything else reuses the cache. The folder is written
under a temporary name and renamed when complete, so an interrupted run never leaves a half cache.

Encoding streams: examples are read, filtered and sent in chunks to a pool of worker processes, each
of which loads the SentencePiece model(s) once; at most a few chunks per worker are in flight, and the
ids are appended to ``tokens.bin`` as they come back in order. Memory stays bounded by the chunks in
flight plus the offsets (8 bytes per sequence).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import shutil
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from transformer.data.corpora import Corpus, FilterReport, filter_pairs, filter_texts
from transformer.data.tokenizer import Tokenizer
from transformer.errors import TransformerError

PathLike = Union[str, os.PathLike]

CACHE_VERSION = 1
CHUNK_SIZE = 4096  # examples per task sent to a worker
_IN_FLIGHT_PER_WORKER = 4


class TokenArray:
    """Variable-length sequences of token ids stored flat, with an offsets index.

    Shapes:
        tokens: (total_tokens,) uint16 or int32; offsets: (n + 1,) int64.
    """

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray):
        if offsets.ndim != 1 or len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != len(tokens):
            raise ValueError("offsets must start at 0 and end at len(tokens)")
        self.tokens = tokens
        self.offsets = offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        """Sequence ``i`` as an int64 array (a copy, safe to keep)."""
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i = i % len(self)
        return np.asarray(self.tokens[self.offsets[i]: self.offsets[i + 1]], dtype=np.int64)

    @property
    def lengths(self) -> np.ndarray:
        """(n,) int64: the length of each sequence."""
        return np.diff(self.offsets)

    def padded(self, rows: np.ndarray, prefix: Optional[int], suffix: Optional[int], pad: int) -> np.ndarray:
        """Sequences ``rows`` as one right-padded (B, W) int64 matrix, ``prefix`` / ``suffix`` (or None)
        added around each, W the longest plus those: a few array operations for the whole batch, instead
        of a Python loop over its examples (8.8x slower: 3.06 ms for a 4k-token batch on a 2-core CPU; ``benchmarks/bench_micro.py``).

        Shapes:
            rows: (B,) int; returns (B, max len + extra) int64.
        """
        rows = np.asarray(rows, dtype=np.int64)
        starts = self.offsets[rows]  # (B,)
        lengths = self.offsets[rows + 1] - starts  # (B,)
        lead = int(prefix is not None)
        width = (int(lengths.max()) if len(rows) else 0) + lead + int(suffix is not None)
        pos = np.arange(width)[None, :] - lead  # (1, W): position inside the sequence
        inside = (pos >= 0) & (pos < lengths[:, None])  # (B, W)
        out = np.full((len(rows), width), pad, dtype=np.int64)
        if len(self.tokens):
            out[inside] = self.tokens[(starts[:, None] + pos)[inside]]
        if prefix is not None:
            out[:, 0] = prefix
        if suffix is not None:
            out[np.arange(len(rows)), lengths + lead] = suffix
        return out

    @classmethod
    def from_lists(cls, seqs: Iterable[Sequence[int]]) -> "TokenArray":
        """Build an in-memory array from lists of ids (for tests and small data)."""
        seqs = [np.asarray(s, dtype=np.int64) for s in seqs]
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = np.concatenate(seqs).astype(np.int32) if seqs else np.zeros(0, dtype=np.int32)
        return cls(tokens, offsets)

    def save(self, directory: PathLike) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        np.asarray(self.tokens).tofile(directory / "tokens.bin")
        _write_index(directory, self.offsets, np.asarray(self.tokens).dtype)

    @classmethod
    def load(cls, directory: PathLike) -> "TokenArray":
        """Open a saved array; the tokens are memory-mapped (not read into memory)."""
        directory = Path(directory)
        meta = json.loads((directory / "meta.json").read_text())
        offsets = np.load(directory / "offsets.npy")
        dtype = np.dtype(meta["dtype"])
        if offsets[-1] == 0:
            tokens = np.zeros(0, dtype=dtype)
        else:
            tokens = np.memmap(directory / "tokens.bin", dtype=dtype, mode="r", shape=(int(offsets[-1]),))
        return cls(tokens, offsets)


def _write_index(directory: Path, offsets: np.ndarray, dtype: np.dtype) -> None:
    np.save(directory / "offsets.npy", offsets)
    (directory / "meta.json").write_text(json.dumps({"dtype": np.dtype(dtype).name, "n": len(offsets) - 1}))


class _TokenArrayWriter:
    """Appends sequences to ``tokens.bin`` chunk by chunk; ``close`` writes the offsets."""

    def __init__(self, directory: Path, dtype: np.dtype):
        directory.mkdir(parents=True, exist_ok=True)
        self.directory, self.dtype = directory, dtype
        self.file = open(directory / "tokens.bin", "wb")
        self.lengths: list[np.ndarray] = []

    def write(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        self.file.write(flat.astype(self.dtype, copy=False).tobytes())
        self.lengths.append(lengths.astype(np.int64, copy=False))

    def close(self) -> None:
        self.file.close()
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, dtype=np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        _write_index(self.directory, offsets, self.dtype)


# --- workers ----------------------------------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(src_model: str, tgt_model: str) -> None:
    """Load the model(s) once per worker process."""
    import sentencepiece as spm

    _WORKER["src"] = spm.SentencePieceProcessor(model_file=src_model)
    _WORKER["tgt"] = _WORKER["src"] if src_model == tgt_model else spm.SentencePieceProcessor(model_file=tgt_model)


def _flatten(seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    flat = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int32, count=int(lengths.sum()))
    return flat, lengths


def _encode_chunk(chunk: list, monolingual: bool = False) -> tuple:
    """Encode a chunk of pairs (or strings) with the worker's models: flat ids + lengths per side."""
    if not monolingual:
        src = _WORKER["src"].encode([s for s, _ in chunk])
        tgt = _WORKER["tgt"].encode([t for _, t in chunk])
        return _flatten(src), _flatten(tgt)
    return None, _flatten(_WORKER["tgt"].encode(chunk))


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _ordered_map(pool, fn, chunks: Iterator[list], window: int) -> Iterator:
    """Like ``pool.imap`` keeping order, but with at most ``window`` chunks read ahead (bounded memory)."""
    pending: deque = deque()
    for chunk in chunks:
        pending.append(pool.apply_async(fn, (chunk,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _mp_context():
    # fork is cheapest where it exists; workers touch only sentencepiece and numpy.
    methods = mp.get_all_start_methods()
    return mp.get_context("fork" if "fork" in methods and sys.platform != "darwin" else "spawn")


# --- the cache --------------------------------------------------------------------------------------


@dataclass
class EncodedSplit:
    """One encoded split: ``src`` is None for monolingual text."""

    src: Optional[TokenArray]
    tgt: TokenArray
    report: FilterReport
    path: Path


def cache_key(corpus: Corpus, tokenizer: Tokenizer, max_chars: int, limit: Optional[int], monolingual: bool) -> str:
    """A hash of everything that determines the encoded ids."""
    parts = {
        "version": CACHE_VERSION, "corpus": corpus.fingerprint, "tokenizer": tokenizer.fingerprint(),
        "max_chars": max_chars, "limit": limit, "monolingual": monolingual,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def encode_corpus(
    corpus: Corpus,
    tokenizer: Tokenizer,
    cache_dir: PathLike,
    split: str,
    max_chars: int,
    limit: Optional[int] = None,
    monolingual: bool = False,
    num_workers: int = 0,
    chunk_size: int = CHUNK_SIZE,
) -> EncodedSplit:
    """Filter and encode ``corpus`` into the cache (or reuse it), and open the result memory-mapped.

    ``limit`` keeps only the first N examples that pass the filters. ``num_workers=0`` uses every core;
    a corpus of at most two chunks is encoded in this process (a pool would cost more than it saves).

    Returns:
        :class:`EncodedSplit` with per-side :class:`TokenArray` and the filter report of this split.
    Raises:
        TransformerError: from the readers (file:line), or an empty split after filtering.
    """
    cache_dir = Path(cache_dir)
    key = cache_key(corpus, tokenizer, max_chars, limit, monolingual)
    final = cache_dir / f"{split}-{key}"
    if not (final / "report.json").is_file():
        _encode_into(final, corpus, tokenizer, split, max_chars, limit, monolingual, num_workers, chunk_size)
    report = FilterReport.from_dict(json.loads((final / "report.json").read_text()))
    tgt = TokenArray.load(final / "tgt")
    if len(tgt) == 0:
        raise TransformerError(
            f"the {split} split of {corpus.name} is empty after filtering:\n{report}\n"
            "check the files, data.max_chars and the language codes"
        )
    src = None if monolingual else TokenArray.load(final / "src")
    return EncodedSplit(src, tgt, report, final)


def _encode_into(final: Path, corpus: Corpus, tokenizer: Tokenizer, split: str, max_chars: int,
                 limit: Optional[int], monolingual: bool, num_workers: int, chunk_size: int) -> None:
    report = FilterReport()
    filt = filter_texts if monolingual else filter_pairs
    items: Iterator = filt(corpus, max_chars, report, split, corpus.where)
    if limit is not None:
        items = itertools.islice(items, limit)
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    big = 1 << 16
    files = tokenizer.model_files
    encode = functools.partial(_encode_chunk, monolingual=monolingual)
    workers = num_workers or os.cpu_count() or 1
    src_w = tgt_w = None
    try:
        src_w = None if monolingual else _TokenArrayWriter(
            tmp / "src", np.dtype(np.uint16 if tokenizer.src_vocab_size <= big else np.int32))
        tgt_w = _TokenArrayWriter(tmp / "tgt", np.dtype(np.uint16 if tokenizer.tgt_vocab_size <= big else np.int32))
        chunks = _chunks(items, chunk_size)
        head = list(itertools.islice(chunks, 2))
        if workers <= 1 or len(head) < 2:
            _init_worker(str(files["src"]), str(files["tgt"]))
            results: Iterator = map(encode, itertools.chain(head, chunks))
            _write_results(results, src_w, tgt_w)
        else:
            with _mp_context().Pool(workers, _init_worker, (str(files["src"]), str(files["tgt"]))) as pool:
                results = _ordered_map(pool, encode, itertools.chain(head, chunks), workers * _IN_FLIGHT_PER_WORKER)
                _write_results(results, src_w, tgt_w)
        (tmp / "report.json").write_text(json.dumps(report.to_dict()))
        if final.exists():  # another process finished first: keep its copy
            shutil.rmtree(tmp)
        else:
            tmp.rename(final)
    except BaseException:
        for w in (src_w, tgt_w):
            if w is not None and not w.file.closed:
                w.file.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_results(results: Iterator, src_w: Optional[_TokenArrayWriter], tgt_w: _TokenArrayWriter) -> None:
    for src, tgt in results:
        if src_w is not None:
            src_w.write(*src)
        tgt_w.write(*tgt)
    if src_w is not None:
        src_w.close()
    tgt_w.close()


__all__ = ["TokenArray", "EncodedSplit", "encode_corpus", "cache_key"]
