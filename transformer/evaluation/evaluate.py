"""Translate a test set and score it, or score an existing hypothesis file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from transformer.errors import TransformerError
from transformer.evaluation.metrics import compute_metrics

if TYPE_CHECKING:
    from transformer.inference import Translator

PathLike = Union[str, os.PathLike]


def read_lines(path: PathLike) -> list[str]:
    """The lines of a UTF-8 text file, without line endings.

    Raises:
        TransformerError: the file is missing or not UTF-8 (naming it).
    """
    path = Path(path)
    if not path.is_file():
        raise TransformerError(f"file {path} does not exist")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")  # not read_text: its universal newlines would split on a lone "\r"
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise TransformerError(f"{path}: line {line} is not UTF-8 text ({exc.reason})") from None
    if not text:
        return []
    # Split on "\n" only (str.splitlines also splits on U+2028 and others, miscounting lines against wc -l).
    lines = text.split("\n")
    if text.endswith("\n"):
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def _check_aligned(a_path: PathLike, a: list[str], b_path: PathLike, b: list[str]) -> None:
    if len(a) != len(b):
        raise TransformerError(f"{a_path} has {len(a)} lines but {b_path} has {len(b)}; they must be line-aligned")


def evaluate(
    translator: "Translator",
    src_path: PathLike,
    ref_path: PathLike,
    *,
    output: Optional[PathLike] = None,
    progress: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Translate ``src_path`` and score it against ``ref_path`` (one detokenised reference per line).

    Args:
        options: search settings for :meth:`Translator.translate` (beam, length_penalty, max_tokens, ...).
        output: also write the translations there, one per line.
        progress: a tqdm bar on stderr (default on).
    Returns:
        :func:`compute_metrics`'s dict, plus "src" and "ref" (the paths) and the search settings used.
    Raises:
        TransformerError: a missing or non-UTF-8 file, or files with different line counts (naming both).
    """
    sources, references = read_lines(src_path), read_lines(ref_path)
    _check_aligned(src_path, sources, ref_path, references)
    bar = None
    if progress:
        import sys

        from tqdm import tqdm

        bar = tqdm(total=len(sources), unit="sent", file=sys.stderr, desc="evaluate")
    try:
        hypotheses = translator.translate(sources, on_batch=bar.update if bar is not None else None, **options)
    finally:
        if bar is not None:
            bar.close()
    if output is not None:
        text = "".join(h.replace("\n", " ") + "\n" for h in hypotheses)
        try:
            Path(output).parent.mkdir(parents=True, exist_ok=True)
            Path(output).write_text(text, encoding="utf-8")
        except OSError as exc:
            raise TransformerError(f"cannot write the output file {output} ({exc.strerror or exc}); choose another --output") from None
    result = compute_metrics(hypotheses, references)
    cfg = translator.cfg
    result["search"] = {
        "beam": options.get("beam") or cfg.beam,
        "length_penalty": cfg.length_penalty if options.get("length_penalty") is None else options["length_penalty"],
        "length_penalty_form": options.get("length_penalty_form") or cfg.length_penalty_form,
    }
    result.update(src=str(src_path), ref=str(ref_path))
    return result


def score_files(hyp_path: PathLike, ref_path: PathLike) -> dict[str, Any]:
    """Score an existing detokenised hypothesis file against references (see :func:`compute_metrics`).

    Raises:
        TransformerError: a missing or non-UTF-8 file, or different line counts (naming both files).
    """
    hypotheses, references = read_lines(hyp_path), read_lines(ref_path)
    _check_aligned(hyp_path, hypotheses, ref_path, references)
    result = compute_metrics(hypotheses, references)
    result.update(hyp=str(hyp_path), ref=str(ref_path))
    return result
