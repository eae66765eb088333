"""Readers and filters: every format, every bad-input error, nothing silently dropped."""

from __future__ import annotations

import json

import pytest

from .helpers import write_lines
from transformer.data.corpora import (
    FilterReport, count_lines, filter_pairs, filter_texts, iter_lines, parallel_file_paths, parallel_files,
    read_jsonl, read_parallel_files, read_text, read_tsv, text_files,
)
from transformer.errors import TransformerError


def test_parallel_files_read_in_order(tmp_path):
    write_lines(tmp_path / "train.en", ["Hello .", "  spaced  ", "last"])
    write_lines(tmp_path / "train.de", ["Hallo .", "x", "letzte"])
    src, tgt = parallel_file_paths(tmp_path, "train", "en", "de")
    assert read_parallel_files(src, tgt) == [("Hello .", "Hallo ."), ("spaced", "x"), ("last", "letzte")]


def test_last_line_without_newline_and_crlf(tmp_path):
    (tmp_path / "a").write_bytes(b"one\r\ntwo")
    (tmp_path / "b").write_bytes(b"eins\nzwei\n")
    assert count_lines(tmp_path / "a") == 2
    assert read_parallel_files(tmp_path / "a", tmp_path / "b") == [("one", "eins"), ("two", "zwei")]


def test_missing_file_is_named(tmp_path):
    write_lines(tmp_path / "x.en", ["a"])
    with pytest.raises(TransformerError, match="x.de does not exist"):
        parallel_files(tmp_path / "x.en", tmp_path / "x.de")


def test_line_count_mismatch_names_both_files_and_counts(tmp_path):
    write_lines(tmp_path / "a.en", ["1", "2", "3"])
    write_lines(tmp_path / "a.de", ["1", "2"])
    with pytest.raises(TransformerError) as exc:
        parallel_files(tmp_path / "a.en", tmp_path / "a.de")
    message = str(exc.value)
    assert "a.en has 3 lines" in message and "a.de has 2" in message


def test_invalid_utf8_names_file_and_line(tmp_path):
    (tmp_path / "a.en").write_bytes(b"fine\nalso fine\nbad \xff byte\n")
    write_lines(tmp_path / "a.de", ["1", "2", "3"])
    with pytest.raises(TransformerError, match=r"a\.en:3: invalid UTF-8"):
        read_parallel_files(tmp_path / "a.en", tmp_path / "a.de")


def test_unicode_line_separators_stay_inside_a_line(tmp_path):
    (tmp_path / "a").write_text("x\u2028y\x0cz\n", encoding="utf-8")
    assert list(iter_lines(tmp_path / "a")) == ["x\u2028y\x0cz"]


def test_tsv(tmp_path):
    write_lines(tmp_path / "d.tsv", ["a\tb", "", " c \t d "])
    assert read_tsv(tmp_path / "d.tsv") == [("a", "b"), ("", ""), ("c", "d")]
    write_lines(tmp_path / "bad.tsv", ["a\tb", "no tab here"])
    with pytest.raises(TransformerError, match=r"bad\.tsv:2: expected 2 tab-separated columns"):
        read_tsv(tmp_path / "bad.tsv")


def test_jsonl(tmp_path):
    rows = [{"en": "a", "de": "b"}, {"en": "c", "de": "d"}]
    write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in rows])
    assert read_jsonl(tmp_path / "d.jsonl", "en", "de") == [("a", "b"), ("c", "d")]
    write_lines(tmp_path / "s.jsonl", [json.dumps({"src": "x", "tgt": "y"})])
    assert read_jsonl(tmp_path / "s.jsonl", "en", "de") == [("x", "y")]
    write_lines(tmp_path / "bad.jsonl", [json.dumps(rows[0]), "{not json"])
    with pytest.raises(TransformerError, match=r"bad\.jsonl:2: invalid JSON"):
        read_jsonl(tmp_path / "bad.jsonl", "en", "de")
    write_lines(tmp_path / "keys.jsonl", [json.dumps({"en": "a"})])
    with pytest.raises(TransformerError, match=r"keys\.jsonl:1: expected string fields"):
        read_jsonl(tmp_path / "keys.jsonl", "en", "de")


def test_text_file_and_folder(tmp_path):
    write_lines(tmp_path / "b.txt", ["b1", "b2"])
    write_lines(tmp_path / "a.txt", ["a1"])
    assert read_text(tmp_path) == ["a1", "b1", "b2"]
    assert read_text(tmp_path / "b.txt") == ["b1", "b2"]
    assert text_files(tmp_path).where(2) == f"{tmp_path / 'b.txt'}:2"
    with pytest.raises(TransformerError, match="does not exist"):
        read_text(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TransformerError, match="no .txt file"):
        read_text(tmp_path / "empty")


def test_filters_count_and_locate_what_they_drop(tmp_path):
    write_lines(tmp_path / "a.en", ["ok", "", "x" * 11, "ok2", "also"])
    write_lines(tmp_path / "a.de", ["gut", "leer", "kurz", "", "auch"])
    corpus = parallel_files(tmp_path / "a.en", tmp_path / "a.de")
    report = FilterReport()
    kept = list(filter_pairs(corpus, 10, report, "train"))
    assert kept == [("ok", "gut"), ("also", "auch")]
    assert report.kept["train"] == 2
    assert report.dropped["train"] == {"empty source": 1, "too long (chars)": 1, "empty target": 1}
    assert report.examples["train"]["empty source"] == [f"{tmp_path / 'a.en'}:2 / {tmp_path / 'a.de'}:2"]
    text = str(report)
    assert "kept 2" in text and "1 empty target" in text and "a.en:4" in text


def test_filter_texts():
    report = FilterReport()
    assert list(filter_texts(["a", "", "bbbb", "c"], 3, report, "train")) == ["a", "c"]
    assert report.dropped["train"] == {"empty": 1, "too long (chars)": 1}
    assert FilterReport.from_dict(report.to_dict()).to_dict() == report.to_dict()
