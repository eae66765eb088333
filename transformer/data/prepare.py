"""The data stage in one call: read the corpus, train (or load) the tokenizer, encode with the cache.

    data = prepare_data(cfg, run_dir)
    for batch in make_batches(data.train, cfg.data.max_tokens, epoch=0):
        ...

``data.dataset`` selects the corpus:
- ``bible``: the built-in Bible (offline), ``src_lang`` / ``tgt_lang`` (and optional translation ids);
- ``multi30k``: a local folder ``data.path`` (train / val / test_2017_flickr);
- ``files``: ``{path}/{prefix}.{src_lang}`` + ``{path}/{prefix}.{tgt_lang}``, or ``{path}/{prefix}.tsv``,
  or ``{path}/{prefix}.jsonl`` (keys: the language codes, or ``src``/``tgt``), for the train, valid and
  (if present) test prefixes;
- ``shakespeare``: the built-in plays (offline), a language model corpus;
- ``text``: a text file or folder (``data.path``). If it is a folder with ``{train_prefix}.txt`` and
  ``{valid_prefix}.txt`` those are the splits; otherwise the last 1% of the lines (at least 1, at most
  10,000) are the validation split and the rest is training text.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

from transformer.data import datasets
from transformer.data.cache import encode_corpus
from transformer.data.corpora import (
    Corpus, FilterReport, count_lines, filter_pairs, filter_texts, jsonl_file, parallel_file_paths,
    parallel_files, text_files, tsv_file,
)
from transformer.data.token_datasets import LMDataset, ParallelDataset
from transformer.data.tokenizer import Tokenizer
from transformer.errors import TransformerError

MONOLINGUAL = ("shakespeare", "text")


@dataclass
class PreparedData:
    """Everything the trainer needs from the data stage.

    ``valid_text`` / ``test_text`` are raw ``(src, ref)`` pairs (for BLEU) after the empty/length-in-
    characters filters, not the token-length filter; None for language models (and for a missing test).
    """

    tokenizer: Tokenizer
    train: Union[ParallelDataset, LMDataset]
    valid: Union[ParallelDataset, LMDataset]
    valid_text: Optional[list[tuple[str, str]]]
    test_text: Optional[list[tuple[str, str]]]
    report: FilterReport


@dataclass
class _Sources:
    train: Corpus
    valid: Corpus
    test: Optional[Corpus]


def _files_split(folder: Path, prefix: str, src: str, tgt: str) -> Optional[Corpus]:
    """The corpus of one prefix in whichever format exists, or None if none does."""
    src_path, tgt_path = parallel_file_paths(folder, prefix, src, tgt)
    if src_path.exists() or tgt_path.exists():
        return parallel_files(src_path, tgt_path)  # a missing side raises, naming it
    if (folder / f"{prefix}.tsv").exists():
        return tsv_file(folder / f"{prefix}.tsv")
    if (folder / f"{prefix}.jsonl").exists():
        return jsonl_file(folder / f"{prefix}.jsonl", src, tgt)
    return None


def _require(corpus: Optional[Corpus], folder: Path, prefix: str, src: str, tgt: str) -> Corpus:
    if corpus is None:
        raise TransformerError(
            f"no {prefix!r} split in {folder}: expected {prefix}.{src} + {prefix}.{tgt}, {prefix}.tsv or "
            f"{prefix}.jsonl (config fields data.path and data.*_prefix)"
        )
    return corpus


def _text_sources(d) -> _Sources:
    if d.path is None:
        raise TransformerError("config field data.path: the 'text' dataset needs a text file or folder")
    path = Path(d.path)
    if path.is_dir() and (path / f"{d.train_prefix}.txt").is_file() and (path / f"{d.valid_prefix}.txt").is_file():
        test = path / f"{d.test_prefix}.txt" if d.test_prefix else None
        return _Sources(text_files(path / f"{d.train_prefix}.txt"), text_files(path / f"{d.valid_prefix}.txt"),
                        text_files(test) if test is not None and test.is_file() else None)
    whole = text_files(path)
    files = sorted(path.glob("**/*.txt")) if path.is_dir() else [path]
    total = sum(count_lines(f) for f in files)
    n_valid = min(10_000, max(1, total // 100))
    n_train = total - n_valid
    train = Corpus(f"{whole.name} (first {n_train} lines)", whole.fingerprint + f"|train:{n_train}",
                   lambda: itertools.islice(iter(whole), n_train), whole.where)
    valid = Corpus(f"{whole.name} (last {n_valid} lines)", whole.fingerprint + f"|valid:{n_valid}",
                   lambda: itertools.islice(iter(whole), n_train, None), lambda i: whole.where(n_train + i))
    return _Sources(train, valid, None)


def load_sources(cfg) -> _Sources:
    """The train / valid / test corpora that ``cfg.data`` names (see the module docstring).

    Raises:
        TransformerError: missing path or files, unknown language, missing data package.
    """
    d = cfg.data
    if d.dataset == "bible":
        s = datasets.bible(d.src_lang, d.tgt_lang, d.src_translation, d.tgt_translation)
        tag = f"bible {d.src_lang}-{d.tgt_lang}"
        return _Sources(Corpus.from_list(s.train, f"{tag} train"), Corpus.from_list(s.valid, f"{tag} valid"),
                        Corpus.from_list(s.test, f"{tag} test"))
    if d.dataset == "multi30k":
        if d.path is None:
            raise TransformerError("config field data.path: the 'multi30k' dataset needs the folder of its files")
        folder = Path(d.path)
        for split in datasets.MULTI30K_SPLITS:
            for p in parallel_file_paths(folder, split, d.src_lang, d.tgt_lang):
                if not p.is_file():
                    raise TransformerError(
                        f"Multi30k file {p} does not exist; point data.path at the folder, or download it with "
                        f"python -c \"from transformer.data import download_multi30k; download_multi30k('{folder}')\""
                    )
        return _Sources(*(parallel_files(*parallel_file_paths(folder, s, d.src_lang, d.tgt_lang))
                          for s in datasets.MULTI30K_SPLITS))
    if d.dataset == "files":
        if d.path is None:
            raise TransformerError("config field data.path: the 'files' dataset needs the folder of the corpus")
        folder = Path(d.path)
        if not folder.is_dir():
            raise TransformerError(f"config field data.path: folder {folder} does not exist")
        train = _require(_files_split(folder, d.train_prefix, d.src_lang, d.tgt_lang), folder, d.train_prefix, d.src_lang, d.tgt_lang)
        valid = _require(_files_split(folder, d.valid_prefix, d.src_lang, d.tgt_lang), folder, d.valid_prefix, d.src_lang, d.tgt_lang)
        test = _files_split(folder, d.test_prefix, d.src_lang, d.tgt_lang) if d.test_prefix else None
        return _Sources(train, valid, test)
    if d.dataset == "shakespeare":
        s = datasets.shakespeare()
        return _Sources(Corpus.from_list(s.train, "shakespeare train"), Corpus.from_list(s.valid, "shakespeare valid"),
                        Corpus.from_list(s.test, "shakespeare test"))
    if d.dataset == "text":
        return _text_sources(d)
    raise TransformerError(f"config field data.dataset: unknown dataset {d.dataset!r}")


def _training_texts(corpus: Corpus, d, side: Optional[int]) -> Iterator[str]:
    """The filtered training sentences of one side (0 src, 1 tgt; None for monolingual)."""
    report = FilterReport()  # counted once, when encoding
    if side is None:
        items = filter_texts(corpus, d.max_chars, report, "train", corpus.where)
    else:
        items = (pair[side] for pair in filter_pairs(corpus, d.max_chars, report, "train", corpus.where))
    return itertools.islice(items, d.max_train_examples) if d.max_train_examples else items


def prepare_data(
    cfg,
    run_dir: Union[str, Path],
    tokenizer: Optional[Tokenizer] = None,
    log: Callable[[str], None] = print,
) -> PreparedData:
    """Read, tokenise, encode (cached) and wrap the corpus that ``cfg.data`` describes.

    The tokenizer is ``tokenizer`` if given, else ``{run_dir}/tokenizer`` if it exists, else trained on
    the training split and saved there. Encoded ids go to ``cfg.data.cache_dir`` (default
    ``{run_dir}/data``). Examples longer than ``data.max_len`` tokens (special tokens included), or than
    ``model.max_positions``, are filtered from the datasets and counted in the report, which is logged.

    Returns:
        :class:`PreparedData`.
    Raises:
        TransformerError: any bad input (see :mod:`transformer.data.corpora`), an empty split after
            filtering, a vocabulary too large for the corpus.
    """
    d = cfg.data
    run_dir = Path(run_dir)
    mono = d.dataset in MONOLINGUAL
    sources = load_sources(cfg)

    tok_dir = run_dir / "tokenizer"
    if tokenizer is None:
        if (tok_dir / "tokenizer.json").is_file():
            tokenizer = Tokenizer.load(tok_dir)
        else:
            if next(_training_texts(sources.train, d, None if mono else 0), None) is None:
                raise TransformerError(
                    f"the training split {sources.train.name} is empty (or every line is empty or longer than "
                    f"data.max_chars={d.max_chars}); check data.path and the training files"
                )
            log(f"training a {d.tokenizer_type} tokenizer (vocab {d.vocab_size}) into {tok_dir}")
            if mono:
                src_texts, tgt_texts = _training_texts(sources.train, d, None), None
            else:
                src_texts, tgt_texts = _training_texts(sources.train, d, 0), _training_texts(sources.train, d, 1)
            tokenizer = Tokenizer.train(
                src_texts, tgt_texts, vocab_size=d.vocab_size, model_type=d.tokenizer_type,
                joint=d.joint_vocab or mono, out_dir=tok_dir, seed=cfg.train.seed,
                num_threads=d.num_workers or os.cpu_count(),
            )
    elif not (tok_dir / "tokenizer.json").is_file():
        tokenizer.save(tok_dir)

    cache_dir = Path(d.cache_dir) if d.cache_dir else run_dir / "data"
    report = FilterReport()
    encoded = {}
    for split, corpus in (("train", sources.train), ("valid", sources.valid)):
        enc = encode_corpus(corpus, tokenizer, cache_dir, split, d.max_chars,
                            limit=d.max_train_examples if split == "train" else None,
                            monolingual=mono, num_workers=d.num_workers)
        report.merge(enc.report)
        encoded[split] = enc

    if mono:
        train = LMDataset(encoded["train"].tgt, d.block_size)
        valid = LMDataset(encoded["valid"].tgt, d.block_size)
        valid_text = test_text = None
    else:
        # An example the model has no positions for would crash training or validation: filter it too.
        max_len = min(d.max_len, cfg.model.max_positions)
        train = ParallelDataset(encoded["train"].src, encoded["train"].tgt, max_len)
        valid = ParallelDataset(encoded["valid"].src, encoded["valid"].tgt, max_len)
        for split, ds in (("train", train), ("valid", valid)):
            if ds.n_too_long:
                report.dropped.setdefault(split, {})["too long (tokens)"] = ds.n_too_long
                report.kept[split] = len(ds)
            if len(ds) == 0:
                limit = f"data.max_len={d.max_len}" if max_len == d.max_len else f"model.max_positions={max_len}"
                raise TransformerError(
                    f"the {split} split is empty after filtering examples longer than {limit} tokens:\n{report}\n"
                    f"raise config field {limit.split('=')[0]}"
                )
        scratch = FilterReport()
        valid_text = list(filter_pairs(sources.valid, d.max_chars, scratch, "valid", sources.valid.where))
        test_text = (list(filter_pairs(sources.test, d.max_chars, scratch, "test", sources.test.where))
                     if sources.test is not None else None)
    log(f"data ({d.dataset}): {len(train)} training and {len(valid)} validation "
        f"{'blocks' if mono else 'examples'}; filtered:\n{report}")
    return PreparedData(tokenizer, train, valid, valid_text, test_text, report)


__all__ = ["PreparedData", "prepare_data", "load_sources"]
