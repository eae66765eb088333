"""Corpus readers and the filters that every example passes before tokenisation.

Readers stream: files are read line by line in binary and decoded one line at a time, so a corpus far
larger than memory can be read, and an invalid UTF-8 byte is reported with its file and line.

Line rules, the same for every reader:
- a line ends at ``\\n`` only (``\\r\\n`` is accepted); other Unicode line breaks stay inside the line;
- surrounding whitespace is stripped (``str.strip``); inner whitespace is kept as it is;
- nothing is dropped by a reader: empty lines and over-long lines are dropped by :func:`filter_pairs` /
  :func:`filter_texts`, which count them in a :class:`FilterReport`.

Parallel formats:
- two aligned plain-text files, ``{prefix}.{src_lang}`` and ``{prefix}.{tgt_lang}`` (fairseq's
  convention), one sentence a line: :func:`parallel_file_paths`, :func:`read_parallel_files`;
- TSV, ``src<TAB>tgt`` on each line: :func:`read_tsv`;
- JSONL, one object a line with the two languages as keys (``{"en": ..., "de": ...}``), or
  ``"src"`` / ``"tgt"``: :func:`read_jsonl`.
Monolingual text (language models): a plain-text file or a folder of ``*.txt`` files: :func:`read_text`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

from transformer.errors import TransformerError

Pair = tuple[str, str]
PathLike = Union[str, os.PathLike]

# How many locations of filtered examples a report keeps (to print a few examples of each reason).
_KEEP_LOCATIONS = 5


# --- reading lines ----------------------------------------------------------------------------------


def _check_file(path: Path) -> Path:
    if not path.exists():
        raise TransformerError(f"file {path} does not exist; check data.path and the file prefixes")
    if not path.is_file():
        raise TransformerError(f"{path} is not a file")
    return path


def iter_lines(path: PathLike) -> Iterator[str]:
    """Stream the lines of a UTF-8 text file, stripped of surrounding whitespace.

    Returns:
        an iterator of ``str``, one per line (empty lines included).
    Raises:
        TransformerError: missing file, or invalid UTF-8 (naming the file and line).
    """
    path = _check_file(Path(path))
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise TransformerError(
                    f"{path}:{number}: invalid UTF-8 ({exc.reason} at byte {exc.start}); "
                    "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
                ) from None
            if number == 1 and text.startswith("\ufeff"):  # a byte-order mark is not text
                text = text[1:]
            yield text.strip()


def count_lines(path: PathLike) -> int:
    """The number of lines of a file (a last line without ``\\n`` counts), read in 1 MiB blocks."""
    path = _check_file(Path(path))
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            n += block.count(b"\n")
            last = block[-1:]
    return n + (last != b"\n")


# --- a re-iterable corpus with a fingerprint ------------------------------------------------------


@dataclass
class Corpus:
    """A re-iterable stream of examples (``(src, tgt)`` pairs, or ``str`` for monolingual text).

    ``fingerprint`` identifies the content for the encoding cache: file paths + sizes + mtimes for files,
    a content hash for in-memory lists. ``where(i)`` names example ``i`` (0-based) for messages.
    """

    name: str
    fingerprint: str
    _iterate: Callable[[], Iterator]
    _where: Callable[[int], str]

    def __iter__(self) -> Iterator:
        return self._iterate()

    def where(self, index: int) -> str:
        return self._where(index)

    @classmethod
    def from_list(cls, items: Sequence, name: str) -> "Corpus":
        """Wrap an in-memory list (of pairs or strings); the fingerprint hashes the content."""
        h = hashlib.sha256()
        for item in items:
            h.update(json.dumps(item, ensure_ascii=False).encode("utf-8"))
            h.update(b"\n")
        return cls(name, f"list:{h.hexdigest()}", lambda: iter(items), lambda i: f"{name} example {i + 1}")


def _files_fingerprint(kind: str, paths: Iterable[Path]) -> str:
    parts = [kind]
    for p in paths:
        st = p.stat()
        parts.append(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


# --- parallel readers -------------------------------------------------------------------------------


def parallel_file_paths(folder: PathLike, prefix: str, src_lang: str, tgt_lang: str) -> tuple[Path, Path]:
    """``{folder}/{prefix}.{src_lang}`` and ``{folder}/{prefix}.{tgt_lang}`` (fairseq's convention)."""
    folder = Path(folder)
    return folder / f"{prefix}.{src_lang}", folder / f"{prefix}.{tgt_lang}"


def parallel_files(src_path: PathLike, tgt_path: PathLike) -> Corpus:
    """Two aligned plain-text files as a :class:`Corpus` of ``(src, tgt)`` pairs (streamed).

    Raises:
        TransformerError: a missing file, or line counts that differ (naming both files and counts).
            Invalid UTF-8 is reported (file:line) while iterating.
    """
    src_path, tgt_path = _check_file(Path(src_path)), _check_file(Path(tgt_path))
    n_src, n_tgt = count_lines(src_path), count_lines(tgt_path)
    if n_src != n_tgt:
        raise TransformerError(
            f"the two sides are not aligned: {src_path} has {n_src} lines but {tgt_path} has {n_tgt}; "
            "line i of one file must translate line i of the other"
        )
    return Corpus(
        name=f"{src_path} / {tgt_path}",
        fingerprint=_files_fingerprint("parallel", [src_path, tgt_path]),
        _iterate=lambda: zip(iter_lines(src_path), iter_lines(tgt_path)),
        _where=lambda i: f"{src_path}:{i + 1} / {tgt_path}:{i + 1}",
    )


def read_parallel_files(src_path: PathLike, tgt_path: PathLike) -> list[Pair]:
    """All ``(src, tgt)`` pairs of two aligned files, in order (see :func:`parallel_files`)."""
    return list(parallel_files(src_path, tgt_path))


def _iter_tsv(path: Path) -> Iterator[Pair]:
    for number, line in enumerate(iter_lines(path), 1):
        if line == "":
            yield "", ""  # an empty line: both sides empty, filtered and counted later
            continue
        cols = line.split("\t")
        if len(cols) != 2:
            raise TransformerError(
                f"{path}:{number}: expected 2 tab-separated columns (source, target), found {len(cols)}"
            )
        yield cols[0].strip(), cols[1].strip()


def tsv_file(path: PathLike) -> Corpus:
    """A TSV file (``src<TAB>tgt`` per line) as a :class:`Corpus` of pairs (streamed).

    Raises:
        TransformerError: missing file; a line without exactly two columns or with invalid UTF-8 (file:line).
    """
    path = _check_file(Path(path))
    return Corpus(str(path), _files_fingerprint("tsv", [path]), lambda: _iter_tsv(path), lambda i: f"{path}:{i + 1}")


def read_tsv(path: PathLike) -> list[Pair]:
    """All pairs of a TSV file (see :func:`tsv_file`)."""
    return list(tsv_file(path))


def _iter_jsonl(path: Path, src_key: str, tgt_key: str) -> Iterator[Pair]:
    for number, line in enumerate(iter_lines(path), 1):
        if line == "":
            yield "", ""
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TransformerError(f"{path}:{number}: invalid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise TransformerError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
        keys = (src_key, tgt_key) if src_key in obj or tgt_key in obj else ("src", "tgt")
        for key in keys:
            if not isinstance(obj.get(key), str):
                raise TransformerError(
                    f"{path}:{number}: expected string fields {src_key!r} and {tgt_key!r} "
                    f"(or 'src' and 'tgt'); found keys {sorted(obj)}"
                )
        yield obj[keys[0]].strip(), obj[keys[1]].strip()


def jsonl_file(path: PathLike, src_key: str = "src", tgt_key: str = "tgt") -> Corpus:
    """A JSONL file (one object a line, keys ``src_key``/``tgt_key``, e.g. the language codes) as pairs.

    Raises:
        TransformerError: missing file; invalid UTF-8, invalid JSON or missing keys (file:line).
    """
    path = _check_file(Path(path))
    return Corpus(
        str(path),
        _files_fingerprint(f"jsonl:{src_key}:{tgt_key}", [path]),
        lambda: _iter_jsonl(path, src_key, tgt_key),
        lambda i: f"{path}:{i + 1}",
    )


def read_jsonl(path: PathLike, src_key: str = "src", tgt_key: str = "tgt") -> list[Pair]:
    """All pairs of a JSONL file (see :func:`jsonl_file`)."""
    return list(jsonl_file(path, src_key, tgt_key))


# --- monolingual ------------------------------------------------------------------------------------


def text_files(path: PathLike) -> Corpus:
    """A plain-text file, or a folder of ``*.txt`` files (sorted by name), as a :class:`Corpus` of lines.

    Raises:
        TransformerError: the path does not exist, or the folder holds no ``.txt`` file.
    """
    path = Path(path)
    if not path.exists():
        raise TransformerError(f"{path} does not exist; data.path must be a text file or a folder of .txt files")
    files = sorted(path.glob("**/*.txt")) if path.is_dir() else [path]
    if not files:
        raise TransformerError(f"folder {path} holds no .txt file")

    def iterate() -> Iterator[str]:
        for f in files:
            yield from iter_lines(f)

    # Line numbers per file, computed on demand (only for messages).
    def where(i: int) -> str:
        for f in files:
            n = count_lines(f)
            if i < n:
                return f"{f}:{i + 1}"
            i -= n
        return f"{path} line ?"

    return Corpus(str(path), _files_fingerprint("text", files), iterate, where)


def read_text(path: PathLike) -> list[str]:
    """All lines of a text file or folder (see :func:`text_files`)."""
    return list(text_files(path))


# --- filters ----------------------------------------------------------------------------------------


@dataclass
class FilterReport:
    """What the filters dropped, per split and reason, with the first few locations of each."""

    kept: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, dict[str, int]] = field(default_factory=dict)
    examples: dict[str, dict[str, list[str]]] = field(default_factory=dict)

    def keep(self, split: str, n: int = 1) -> None:
        self.kept[split] = self.kept.get(split, 0) + n

    def drop(self, split: str, reason: str, where: Union[str, Callable[[], str]] = "") -> None:
        """Count one dropped example; ``where`` (a string or a callable, computed only if kept) names it."""
        counts = self.dropped.setdefault(split, {})
        counts[reason] = counts.get(reason, 0) + 1
        locations = self.examples.setdefault(split, {}).setdefault(reason, [])
        if where and len(locations) < _KEEP_LOCATIONS:
            locations.append(where() if callable(where) else where)

    def n_dropped(self, split: str) -> int:
        return sum(self.dropped.get(split, {}).values())

    def merge(self, other: "FilterReport") -> None:
        for split, n in other.kept.items():
            self.kept[split] = n  # kept counts are replaced: later filters refine earlier ones
        for split, counts in other.dropped.items():
            for reason, n in counts.items():
                mine = self.dropped.setdefault(split, {})
                mine[reason] = mine.get(reason, 0) + n
                locs = self.examples.setdefault(split, {}).setdefault(reason, [])
                locs.extend(other.examples.get(split, {}).get(reason, [])[: _KEEP_LOCATIONS - len(locs)])

    def to_dict(self) -> dict:
        return {"kept": self.kept, "dropped": self.dropped, "examples": self.examples}

    @classmethod
    def from_dict(cls, d: dict) -> "FilterReport":
        return cls(dict(d.get("kept", {})), {k: dict(v) for k, v in d.get("dropped", {}).items()},
                   {k: {r: list(l) for r, l in v.items()} for k, v in d.get("examples", {}).items()})

    def __str__(self) -> str:
        lines = []
        for split in sorted(set(self.kept) | set(self.dropped)):
            counts = self.dropped.get(split, {})
            detail = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items())) or "none"
            lines.append(f"{split}: kept {self.kept.get(split, 0)}, dropped {detail}")
            for reason, locs in sorted(self.examples.get(split, {}).items()):
                if locs:
                    lines.append(f"  {reason}: e.g. {'; '.join(locs)}")
        return "\n".join(lines)


def filter_pairs(
    corpus: Iterable[Pair], max_chars: int, report: FilterReport, split: str,
    where: Optional[Callable[[int], str]] = None,
) -> Iterator[Pair]:
    """Yield the pairs with both sides non-empty and at most ``max_chars`` characters; count the others.

    Reasons counted in ``report``: ``"empty source"``, ``"empty target"``, ``"too long (chars)"``.
    """
    where = where or getattr(corpus, "where", None) or (lambda i: f"example {i + 1}")
    for i, (src, tgt) in enumerate(corpus):
        if not src:
            report.drop(split, "empty source", lambda: where(i))
        elif not tgt:
            report.drop(split, "empty target", lambda: where(i))
        elif len(src) > max_chars or len(tgt) > max_chars:
            report.drop(split, "too long (chars)", lambda: where(i))
        else:
            report.keep(split)
            yield src, tgt


def filter_texts(
    corpus: Iterable[str], max_chars: int, report: FilterReport, split: str,
    where: Optional[Callable[[int], str]] = None,
) -> Iterator[str]:
    """Yield the non-empty lines of at most ``max_chars`` characters; count the others (``"empty"``, ...)."""
    where = where or getattr(corpus, "where", None) or (lambda i: f"line {i + 1}")
    for i, text in enumerate(corpus):
        if not text:
            report.drop(split, "empty", lambda: where(i))
        elif len(text) > max_chars:
            report.drop(split, "too long (chars)", lambda: where(i))
        else:
            report.keep(split)
            yield text


__all__ = [
    "Pair", "Corpus", "FilterReport", "iter_lines", "count_lines", "parallel_file_paths", "parallel_files",
    "read_parallel_files", "tsv_file", "read_tsv", "jsonl_file", "read_jsonl", "text_files", "read_text",
    "filter_pairs", "filter_texts",
]
