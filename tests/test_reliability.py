"""Reliability: every bad input and fault gives one clear message (exit 2, no traceback) and loses nothing.

Each case of the table in docs/RELIABILITY.md is a test here. Most run the CLI in-process
(``transformer.cli.main``); the signal cases (SIGKILL, SIGINT) run it as a subprocess.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from reliability_helpers import (
    STEPS, run_cli, snapshot, start_cli, step_losses, wait_for_checkpoints, write_config, write_corpus,
)
from transformer.cli import main
from transformer.config import DecodeConfig
from transformer.data.tokenizer import Tokenizer
from transformer.inference import Translator, translate_file
from transformer.training import checkpoint as ckpt
from transformer.training import trainer as trainer_module


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine threads cost 10x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of STEPS steps (in-process, through the CLI): what every fault must reproduce."""
    root = tmp_path_factory.mktemp("reference")
    corpus = write_corpus(root / "corpus")
    config = write_config(root / "config.yaml", corpus)
    assert main(["train", str(config), "--run-dir", str(root / "run")]) == 0
    return root / "run", config


@pytest.fixture
def run(reference, tmp_path):
    """A private copy of the reference run (a failing case must leave it byte-for-byte as it was)."""
    return Path(shutil.copytree(reference[0], tmp_path / "run"))


def fails_clearly(capsys, argv, *fragments):
    """``main(argv)`` exits 2 with one ``error:`` line holding ``fragments`` and no traceback."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("error: ") == 1 and "Traceback" not in err, err
    last = err.strip().split("\nerror: ")[-1]
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {last!r}"
    return err


def assert_same_as_reference(run_dir, reference_dir, steps=STEPS):
    """Same final weights and the same per-step training losses as the uninterrupted run."""
    final = ckpt.step_dir_name(steps)
    ref_w, got_w = ckpt.read_weights(reference_dir / "checkpoints" / final), ckpt.read_weights(run_dir / "checkpoints" / final)
    assert ref_w.keys() == got_w.keys()
    for name in ref_w:
        torch.testing.assert_close(got_w[name], ref_w[name], atol=1e-6, rtol=0, msg=name)
    ref_l, got_l = step_losses(reference_dir), step_losses(run_dir)
    assert sorted(got_l) == list(range(1, steps + 1))
    for step, loss in ref_l.items():
        assert got_l[step] == pytest.approx(loss, abs=1e-6), step


# --- corpora ---------------------------------------------------------------------------------------


def _drop_file(c):
    (c / "train.de").unlink()


def _misalign(c):
    (c / "train.de").write_text("one line only\n", encoding="utf-8")


def _latin1_line(c):
    lines = (c / "train.en").read_bytes().split(b"\n")
    lines[1] = "d\u00e9j\u00e0 vu".encode("latin-1")  # line 2, as an editor set to Latin-1 would save it
    (c / "train.en").write_bytes(b"\n".join(lines))


def _empty(c):
    (c / "train.en").write_text("")
    (c / "train.de").write_text("")


@pytest.mark.parametrize("mutate, overrides, fragments", [
    pytest.param(_drop_file, [], ["train.de does not exist", "data.path"], id="missing-corpus"),
    pytest.param(_misalign, [], ["not aligned", "train.en has 80 lines", "train.de has 1"], id="misaligned-corpus"),
    pytest.param(_latin1_line, [], ["train.en:2: invalid UTF-8", "iconv"], id="non-utf8-corpus"),
    pytest.param(_empty, [], ["training split", "is empty", "train.en"], id="empty-corpus"),
    pytest.param(None, ["data.max_chars=3"], ["is empty", "longer than data.max_chars=3"], id="over-long-lines-chars"),
    pytest.param(None, ["data.max_len=3"], ["empty after filtering", "data.max_len=3", "dropped 80"],
                 id="over-long-lines-tokens"),
])
def test_bad_corpus(tmp_path, capsys, mutate, overrides, fragments):
    corpus = write_corpus(tmp_path / "corpus")
    if mutate is not None:
        mutate(corpus)
    before = snapshot(corpus)
    config = write_config(tmp_path / "config.yaml", corpus)
    fails_clearly(capsys, ["train", str(config), *overrides, "--run-dir", str(tmp_path / "run")], *fragments)
    assert snapshot(corpus) == before  # the corpus is only read
    assert ckpt.list_checkpoints(tmp_path / "run") == []  # nothing trained on bad data


# --- config (pointed at an existing run: the run must survive the bad value) ------------------------


@pytest.mark.parametrize("override, fragments", [
    pytest.param("model.colour=blue", ["unknown config field 'model.colour'", "known fields here"], id="unknown-key"),
    pytest.param("train.max_steps=lots", ["train.max_steps: expected an integer, got 'lots'"], id="wrong-type"),
    pytest.param("model.n_heads=3", ["model.d_model: 16 is not divisible by model.n_heads=3"], id="d_model-vs-heads"),
    pytest.param("model.dropout=-0.1", ["model.dropout: must be in [0, 1), got -0.1"], id="negative-dropout"),
])
def test_bad_config_keeps_the_run(run, capsys, override, fragments):
    before = snapshot(run)
    fails_clearly(capsys, ["train", str(run / "config.yaml"), override, "--run-dir", str(run)], *fragments)
    assert snapshot(run) == before


# --- checkpoints -------------------------------------------------------------------------------------


@pytest.fixture
def no_input(tmp_path):
    path = tmp_path / "no-input.txt"
    path.write_text("")
    return str(path)


def _continue(run, steps, **train):
    """Ask for more steps (and other train settings) by editing the run's config.yaml, as a user would;
    ``train --resume RUN`` then continues with them."""
    import yaml

    data = yaml.safe_load((run / "config.yaml").read_text())
    data["train"].update(max_steps=steps, **train)
    (run / "config.yaml").write_text(yaml.safe_dump(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("name", [ckpt.STATE, ckpt.WEIGHTS])
def test_truncated_checkpoint(run, capsys, no_input, name):
    latest = ckpt.latest_checkpoint(run)
    _truncate(latest / name)
    others = {p: snapshot(p) for p in ckpt.list_checkpoints(run)[:-1]}
    fails_clearly(capsys, ["translate", "--model", str(latest), "--input", no_input], str(latest / name),
                  "truncated or corrupt", "earlier checkpoint")
    fails_clearly(capsys, ["train", "--resume", str(run)], str(latest / name), "truncated or corrupt")
    assert {p: snapshot(p) for p in others} == others  # the earlier checkpoints are untouched
    ckpt.load_model(ckpt.list_checkpoints(run)[-2])  # ...and load


def _weights_of(run, **model_changes):
    """Weights of a model like the run's but with ``model_changes`` (or another vocabulary size)."""
    from transformer.config import replace
    from transformer.model import build_model

    _, cfg, tok = ckpt.load_model(run)
    vocab = model_changes.pop("vocab", tok.src_vocab_size)
    model = build_model(replace(cfg.model, **model_changes), vocab, vocab, True)
    return ckpt._unique_state_dict(model)


@pytest.mark.parametrize("changes, fragments", [
    pytest.param({"d_ff": 48}, ["ffn.fc1.bias' has shape (48,) but the config gives (32,)"], id="other-architecture"),
    pytest.param({"vocab": 280}, ["embed", "(280, 16)", "(300, 16)"], id="other-vocabulary"),
])
def test_weights_from_another_model_name_the_tensor(run, capsys, no_input, changes, fragments):
    loaded = ckpt.resolve_checkpoint(run)  # checkpoints/best
    save_file(_weights_of(run, **changes), str(loaded / ckpt.WEIGHTS), metadata={"format": "pt"})
    fails_clearly(capsys, ["translate", "--model", str(run), "--input", no_input], "tensor '", *fragments,
                  "do not belong together")


def test_tokenizer_from_another_run(run, capsys, no_input):
    rng = random.Random(1)
    words = ["".join(rng.choice("abcdefghij") for _ in range(5)) for _ in range(400)]
    shutil.rmtree(run / "tokenizer")
    Tokenizer.train([" ".join(rng.choice(words) for _ in range(6)) for _ in range(300)], vocab_size=290,
                    out_dir=run / "tokenizer", num_threads=1)
    fails_clearly(capsys, ["translate", "--model", str(run), "--input", no_input],
                  "tokenizer", "290/290", "300/300", "does not belong to this model")


class _RunsCode:
    """Unpickling this runs a shell command: what a malicious state.pt would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_checkpoint_with_code_is_refused(run, capsys, tmp_path, no_input):
    marker = tmp_path / "pwned"
    for checkpoint in (ckpt.resolve_checkpoint(run), ckpt.latest_checkpoint(run)):  # best (translate), latest (resume)
        state = torch.load(checkpoint / ckpt.STATE, weights_only=True)
        state["payload"] = _RunsCode(marker)
        torch.save(state, checkpoint / ckpt.STATE)
    fails_clearly(capsys, ["translate", "--model", str(run), "--input", no_input],
                  str(ckpt.resolve_checkpoint(run) / ckpt.STATE), "refused", "trust")
    fails_clearly(capsys, ["train", "--resume", str(run)], str(ckpt.latest_checkpoint(run) / ckpt.STATE), "refused")
    assert not marker.exists()


# --- training faults ---------------------------------------------------------------------------------


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(run, capsys, monkeypatch):
    real = trainer_module.label_smoothed_nll_loss
    monkeypatch.setattr(trainer_module, "label_smoothed_nll_loss",
                        lambda *a, **k: tuple(x * float("nan") for x in real(*a, **k)))
    before = snapshot(run / "checkpoints")
    _continue(run, STEPS + 5, max_bad_steps=2)
    fails_clearly(capsys, ["train", "--resume", str(run)],
                  "training diverged", "NaN or infinite", ckpt.step_dir_name(STEPS), "train.lr")
    assert snapshot(run / "checkpoints") == before
    weights = ckpt.read_weights(ckpt.latest_checkpoint(run))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_unwritable_run_dir(tmp_path, capsys, reference):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    fails_clearly(capsys, ["train", str(reference[1]), "--run-dir", str(blocker / "run")],
                  f"run_dir {blocker / 'run'} is not a writable directory", "--run-dir")
    assert blocker.read_text() == "keep me"


def test_read_only_run_dir(tmp_path, capsys, reference):
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod does not stop root from writing (test_unwritable_run_dir covers it)")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        fails_clearly(capsys, ["train", str(reference[1]), "--run-dir", str(locked / "run")], "not a writable")
    finally:
        locked.chmod(0o700)


def test_full_disk_is_found_before_training(run, capsys, monkeypatch):
    usage = shutil.disk_usage(run)
    monkeypatch.setattr(trainer_module.shutil, "disk_usage", lambda p: usage._replace(free=4096))
    _continue(run, STEPS + 2)
    before = snapshot(run)
    fails_clearly(capsys, ["train", "--resume", str(run)], "MiB free", "free some space")
    assert snapshot(run) == before


def test_disk_full_while_writing_a_checkpoint(run, capsys, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt, "save_file", no_space)
    last_good = ckpt.latest_checkpoint(run)
    before = snapshot(last_good)
    _continue(run, STEPS + 2)
    fails_clearly(capsys, ["train", "--resume", str(run)],
                  "could not write checkpoint", "No space left on device", str(last_good), "--resume")
    assert snapshot(last_good) == before
    assert ckpt.latest_checkpoint(run) == last_good
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp dir left
    ckpt.load_model(last_good)


# --- translation -------------------------------------------------------------------------------------


def test_translate_empty_file(run, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["translate", "--model", str(run), "--input", str(empty), "--output", str(tmp_path / "out.txt")]) == 0
    assert (tmp_path / "out.txt").read_text() == ""
    assert "error" not in capsys.readouterr().err


def test_translate_bad_input_keeps_the_old_output(run, tmp_path, capsys):
    src, out = tmp_path / "in.txt", tmp_path / "out.txt"
    src.write_bytes(b"abc def\n\xff\xfe bad\n")
    out.write_text("yesterday's translations\n")
    fails_clearly(capsys, ["translate", "--model", str(run), "--input", str(src), "--output", str(out)],
                  str(src), "line 2", "not UTF-8")
    assert out.read_text() == "yesterday's translations\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out.txt", "run"]  # no temp file left


def test_translate_unwritable_output(run, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    src = tmp_path / "in.txt"
    src.write_text("abc\n")
    fails_clearly(capsys, ["translate", "--model", str(run), "--input", str(src), "--output", str(blocker / "out")],
                  "cannot write the output file", "--output")
    assert blocker.read_text() == "keep me"


def test_translate_missing_model(tmp_path, capsys, no_input):
    fails_clearly(capsys, ["translate", "--model", str(tmp_path / "nope"), "--input", no_input],
                  "nope does not exist", "run directory")


def test_translate_no_freeze_decodes_the_module_with_the_same_output(run, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("short line\nabc def ghi\n\nlast one\n")
    for flags, name in (([], "frozen.txt"), (["--no-freeze"], "module.txt")):
        assert main(["translate", "--model", str(run), "--input", str(src), "--output", str(tmp_path / name)] + flags) == 0
    assert (tmp_path / "frozen.txt").read_text() == (tmp_path / "module.txt").read_text()
    from transformer.cli import build_parser

    for command in ("translate", "evaluate"):
        args = build_parser().parse_args([command, "--model", "m", "--length-penalty-form", "power"] + (
            ["--src", "s", "--ref", "r"] if command == "evaluate" else []))
        assert args.length_penalty_form == "power"
    nbest = {}
    for form in ("gnmt", "power"):  # n-best lines: LINE<TAB>SCORE<TAB>TEXT, the score normalised by the form
        out = tmp_path / f"{form}.txt"
        assert main(["translate", "--model", str(run), "--input", str(src), "--output", str(out), "--nbest", "2",
                     "--length-penalty", "1", "--length-penalty-form", form]) == 0
        nbest[form] = [line.split("\t") for line in out.read_text().splitlines()]
    assert [row[0] for row in nbest["gnmt"]] == [row[0] for row in nbest["power"]]
    assert [row[1] for row in nbest["gnmt"]] != [row[1] for row in nbest["power"]]  # the flag reaches the search
    for command in ("translate", "generate", "evaluate"):
        assert build_parser().parse_args([command, "--model", "m", "--no-freeze"] + (
            ["--prompt", "p"] if command == "generate" else ["--src", "s", "--ref", "r"] if command == "evaluate" else [])
        ).freeze is False


def test_input_longer_than_max_positions_is_truncated(run, tmp_path, caplog):
    src, out = tmp_path / "in.txt", tmp_path / "out.txt"
    src.write_text("short line\n" + " ".join(["abcdefgh"] * 200) + "\n\nlast\n")
    assert main(["translate", "--model", str(run), "--input", str(src), "--output", str(out)]) == 0
    assert len(out.read_text().split("\n")) == 5  # four lines, in order, the empty one empty
    assert out.read_text().split("\n")[2] == ""
    assert "truncated to 64 tokens: line 2" in caplog.text
    strict = Translator.load(run, decode_cfg=DecodeConfig(beam=2, max_len_b=8, long_input="error"))
    with pytest.raises(Exception, match="input line 2 has .* tokens .* more than the limit of 64"):
        strict.translate(["short", " ".join(["abcdefgh"] * 200)])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.text(max_size=30), max_size=6))
def test_translate_random_unicode_keeps_order_and_count(reference, tmp_path, lines):
    """Any Unicode (surrogates aside, which a file cannot hold as UTF-8) translates without a crash: one
    output per input, in order, whatever the batching; empty lines give empty output."""
    lines = [s.encode("utf-8", "replace").decode("utf-8") for s in lines]
    translator = _translator(reference[0])
    together = translator.translate(lines, max_tokens=32)
    assert len(together) == len(lines)
    assert together == [translator.translate([s])[0] for s in lines]
    assert all(out == "" for s, out in zip(lines, together) if not s.strip())
    one_per_line = [s.replace("\n", " ").replace("\r", " ") for s in lines]
    src, out = tmp_path / "in.txt", tmp_path / "out.txt"
    src.write_text("".join(s + "\n" for s in one_per_line), encoding="utf-8", newline="")
    assert translate_file(translator, src, out, progress=False) == len(lines)
    assert out.read_bytes().count(b"\n") == len(lines)


_TRANSLATORS: dict = {}


def _translator(run_dir):
    if run_dir not in _TRANSLATORS:
        _TRANSLATORS[run_dir] = Translator.load(run_dir, decode_cfg=DecodeConfig(beam=2, max_len_b=4))
    return _TRANSLATORS[run_dir]


# --- signals (subprocesses) -------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_at_a_random_moment_then_resume(reference, tmp_path):
    run_dir = tmp_path / "run"
    proc = start_cli(["train", str(reference[1]), "--run-dir", str(run_dir)], tmp_path)
    try:
        wait_for_checkpoints(run_dir, 2, proc)
        time.sleep(random.Random().uniform(0.0, 0.3))  # anywhere: mid-update, mid-checkpoint, mid-log line
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL, "training ended before the kill; raise STEPS"
    resumed = run_cli(["train", "--resume", str(run_dir)], tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_same_as_reference(run_dir, reference[0])


@pytest.mark.slow
def test_sigkill_while_writing_a_checkpoint_then_resume(reference, tmp_path):
    run_dir = tmp_path / "run"
    killed = run_cli(["train", str(reference[1]), "--run-dir", str(run_dir)], tmp_path,
                     TRANSFORMER_TEST_KILL_DURING_SAVE="3")
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    stale = [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".step_00000003")]
    assert stale and (stale[0] / ckpt.WEIGHTS).is_file()  # the kill landed after the temp files, before the rename
    assert ckpt.latest_checkpoint(run_dir).name == "step_00000002"
    ckpt.load_model(run_dir)  # the last good checkpoint loads
    resumed = run_cli(["train", "--resume", str(run_dir)], tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_same_as_reference(run_dir, reference[0])


@pytest.mark.slow
def test_ctrl_c_saves_exits_cleanly_and_resumes(reference, tmp_path):
    run_dir = tmp_path / "run"
    proc = start_cli(["train", str(reference[1]), "--run-dir", str(run_dir)], tmp_path)
    try:
        wait_for_checkpoints(run_dir, 2, proc)
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, output  # 128 + SIGINT, as shells report it
    assert "interrupted at step" in output and "saving a checkpoint" in output
    assert f"continue with: transformer train --resume {run_dir}" in output
    assert "Traceback" not in output
    step = int(output.split("interrupted at step ")[1].split(":")[0])
    assert 2 <= step < STEPS
    assert ckpt.latest_checkpoint(run_dir).name == ckpt.step_dir_name(step)
    resumed = run_cli(["train", "--resume", str(run_dir)], tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_same_as_reference(run_dir, reference[0])
