"""The translation benchmark's paired bootstrap of BLEU differences (benchmarks/bench_inference.py)."""

import sys
from pathlib import Path

import pytest
import sacrebleu

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_inference  # noqa: E402

REFS = [f"the {a} sat on the {b} by the river today" for a in ("cat", "dog", "bird", "man") for b in ("mat", "log")] * 5


def test_paired_bootstrap_of_identical_outputs_is_zero():
    assert bench_inference.paired_bootstrap(REFS, REFS, REFS, 200) == (0.0, 0.0, 0.0)


def test_paired_bootstrap_brackets_the_difference_and_sees_a_clear_one():
    good = [r if i % 4 else r.replace("river", "sea") for i, r in enumerate(REFS)]  # a quarter with one word off
    bad = [r.replace("sat on", "was near") for r in REFS]  # every sentence with two words off
    diff, low, high = bench_inference.paired_bootstrap(good, bad, REFS, 300)
    expected = sacrebleu.corpus_bleu(good, [REFS]).score - sacrebleu.corpus_bleu(bad, [REFS]).score
    assert diff == pytest.approx(expected)
    assert 0 < low <= diff <= high  # every resample prefers `good`
    # the same two systems the other way round: the interval mirrors
    diff2, low2, high2 = bench_inference.paired_bootstrap(bad, good, REFS, 300)
    assert (diff2, low2, high2) == pytest.approx((-diff, -high, -low))
