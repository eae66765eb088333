"""The benchmarks' shared helpers (benchmarks/common.py) that turn timings into the figures BENCHMARKS.md quotes."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import common  # noqa: E402
from common import paired_fractions  # noqa: E402


def test_paired_fractions_are_each_round_s_flops_over_the_probe_s():
    # round 1: 100 FLOP in 2 s against the probe's 300 FLOP in 1 s -> 50 / 300; round 2: 100 / 4 against 300 / 2
    assert paired_fractions(100.0, [2.0, 4.0], 300.0, [1.0, 2.0]) == pytest.approx([50 / 300, 25 / 150])


def test_a_host_whose_speed_drifts_between_rounds_leaves_the_pairs_alone():
    # work done at 60% of the probe's FLOP/s, on a host 1.0x, 1.5x and 1.2x slower in rounds 1, 2 and 3
    slow = [1.0, 1.5, 1.2]
    step = [60.0 / 60.0 * k for k in slow]  # 60 FLOP at 60 FLOP/s, slowed
    probe = [100.0 / 100.0 * k for k in slow]  # 100 FLOP at 100 FLOP/s, slowed alike
    assert paired_fractions(60.0, step, 100.0, probe) == pytest.approx([0.6, 0.6, 0.6])


def test_rounds_must_match():
    with pytest.raises(ValueError, match="2 rounds of the step against 3 of the probe"):
        paired_fractions(1.0, [1.0, 1.0], 1.0, [1.0, 1.0, 1.0])


def test_each_call_is_paired_with_the_probes_on_either_side_of_it(monkeypatch):
    # the probe's k-th call takes k s, a 10 s and b 20 s: warm-up a P b P, then P3 a P4 b P5, P6 b P7 a P8
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    probe_calls = []

    def probe():
        probe_calls.append(len(probe_calls) + 1)

    durations = {"a": 10.0, "b": 20.0}

    def fake_time_call(fn, device):
        fn()
        return float(probe_calls[-1]) if fn is probe else durations[calls[-1]]

    monkeypatch.setattr(common, "time_call", fake_time_call)
    times, around, probes = common.sandwiched_times(fns, probe, "cpu", warmup=1, rounds=2)
    # the second round starts one peer further on
    assert calls == ["a", "b", "a", "b", "b", "a"]
    assert times == {"a": [10.0, 10.0], "b": [20.0, 20.0]}
    assert probes == [3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    assert around == {"a": [3.5, 7.5], "b": [4.5, 6.5]}
