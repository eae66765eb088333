"""sacreBLEU BLEU / chrF with signatures; evaluate() over files; line-count mismatches."""

import json

import pytest
from sacrebleu.metrics import BLEU

from transformer.config import DecodeConfig
from transformer.errors import TransformerError
from transformer.evaluation import compute_metrics, evaluate, format_scores, read_lines, score_files

REFS = ["The cat sat on the mat.", "A quick brown fox jumps over the lazy dog.", "Hello, world!"]


def test_identical_is_100_with_signatures():
    result = compute_metrics(REFS, REFS)
    assert result["bleu"] == pytest.approx(100.0)
    assert result["chrf"] == pytest.approx(100.0)
    assert "tok:13a" in result["bleu_signature"] and "nrefs:1" in result["bleu_signature"]
    assert "nc:6" in result["chrf_signature"]
    text = format_scores(result)
    assert result["bleu_signature"] in text and result["chrf_signature"] in text
    assert json.loads(json.dumps(result)) == result
    assert result["n_sentences"] == 3


def test_matches_sacrebleu_directly():
    hyps = ["The cat sat on a mat.", "A fast brown fox jumped over the dog.", "Hello world"]
    result = compute_metrics(hyps, REFS)
    assert result["bleu"] == pytest.approx(BLEU().corpus_score(hyps, [REFS]).score)
    assert 0 < result["bleu"] < 100 and 0 < result["chrf"] < 100


def test_bad_inputs():
    with pytest.raises(TransformerError, match="2 hypotheses but 3 references"):
        compute_metrics(REFS[:2], REFS)
    with pytest.raises(TransformerError, match="no sentences"):
        compute_metrics([], [])


class EchoTranslator:
    """Translates a sentence into itself."""

    cfg = DecodeConfig()

    def __init__(self):
        self.calls = []

    def translate(self, sentences, **options):
        self.calls.append(options)
        return list(sentences)


def test_evaluate_files(tmp_path):
    src, ref, hyp = tmp_path / "src.txt", tmp_path / "ref.txt", tmp_path / "out" / "hyp.txt"
    src.write_text("\n".join(REFS) + "\n", encoding="utf-8")
    ref.write_text("\n".join(REFS), encoding="utf-8")  # no final newline: same 3 lines
    translator = EchoTranslator()
    result = evaluate(translator, src, ref, output=hyp, beam=5)
    assert result["bleu"] == pytest.approx(100.0) and result["search"]["beam"] == 5
    assert result["search"]["length_penalty_form"] == "gnmt"  # the config's default
    assert translator.calls[0]["beam"] == 5
    result = evaluate(translator, src, ref, length_penalty_form="power")
    assert result["search"]["length_penalty_form"] == "power" and translator.calls[1]["length_penalty_form"] == "power"
    assert read_lines(hyp) == REFS
    assert score_files(hyp, ref)["chrf"] == pytest.approx(100.0)


def test_line_count_mismatch_names_both_files(tmp_path):
    src, ref = tmp_path / "src.txt", tmp_path / "ref.txt"
    src.write_text("a\nb\nc\n", encoding="utf-8")
    ref.write_text("a\nb\n", encoding="utf-8")
    with pytest.raises(TransformerError) as info:
        evaluate(EchoTranslator(), src, ref)
    assert str(src) in str(info.value) and str(ref) in str(info.value)
    assert "3 lines" in str(info.value) and "has 2" in str(info.value)
    with pytest.raises(TransformerError, match="does not exist"):
        evaluate(EchoTranslator(), src, tmp_path / "missing.txt")


def test_read_lines_edge_cases(tmp_path):
    p = tmp_path / "x.txt"
    p.write_bytes(b"a\r\nb\rc\n\nd")
    assert read_lines(p) == ["a", "b\rc", "", "d"]  # only \n separates lines, as wc -l counts
    p.write_bytes(b"")
    assert read_lines(p) == []
    p.write_bytes(b"ok\n\xff\xfe\n")
    with pytest.raises(TransformerError, match="line 2 is not UTF-8"):
        read_lines(p)
