"""The command line: subcommands reach the library, user errors print one message and exit 2."""

import subprocess
import sys

import pytest

from transformer.cli import main


def test_describe_base_and_big_match_the_paper(capsys):
    assert main(["describe", "--preset", "base", "--vocab-size", "37000"]) == 0
    out = capsys.readouterr().out
    assert "63,082,496" in out and "the paper" in out
    assert main(["describe", "--preset", "big"]) == 0
    assert "214,245,376" in capsys.readouterr().out


def test_describe_language_model(capsys):
    assert main(["describe", "--preset", "tiny", "--arch", "lm", "--vocab-size", "1000"]) == 0
    assert "TransformerLM" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["describe", "--preset", "huge"], "unknown preset 'huge'"),
        (["train", "does/not/exist.yaml"], "does/not/exist.yaml does not exist"),
        (["train"], "give a config file"),
        (["train", "--resume", "no/such/run"], "no config.yaml there"),
    ],
)
def test_user_errors_print_one_message(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert "Traceback" not in err


def test_bad_config_values_name_the_field(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  d_model: 100\n  n_heads: 3\n")
    assert main(["train", str(cfg)]) == 2
    assert "model.d_model" in capsys.readouterr().err
    cfg.write_text("model:\n  colour: blue\n")
    assert main(["train", str(cfg)]) == 2
    assert "unknown config field 'model.colour'" in capsys.readouterr().err
    cfg.write_text("model:\n  dropout: -0.1\n")
    assert main(["train", str(cfg)]) == 2
    assert "model.dropout" in capsys.readouterr().err
    cfg.write_text("train:\n  max_steps: lots\n")
    assert main(["train", str(cfg)]) == 2
    assert "train.max_steps: expected an integer" in capsys.readouterr().err


def test_debug_shows_the_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "transformer.cli", "--debug", "describe", "--preset", "huge"],
        capture_output=True, text=True,
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "TransformerError" in proc.stderr


def test_console_script_is_installed():
    proc = subprocess.run([sys.executable, "-m", "transformer.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for command in ("describe", "train", "average", "translate", "generate", "evaluate", "quickstart"):
        assert command in proc.stdout


def test_train_takes_overrides_before_and_after_options(monkeypatch, tmp_path):
    seen = {}

    def fake_train(cfg, resume=False):
        seen["cfg"], seen["resume"] = cfg, resume

        class Result:
            interrupted = False

        return Result()

    monkeypatch.setattr("transformer.training.train", fake_train)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("preset: tiny\n")
    assert main(["train", str(cfg), "train.max_steps=7", "--run-dir", str(tmp_path / "r"), "model.dropout=0.2"]) == 0
    assert seen["cfg"].train.max_steps == 7 and seen["cfg"].model.dropout == 0.2
    assert seen["cfg"].run_dir == str(tmp_path / "r") and seen["resume"] is False
    # --resume: the first override must not be taken for a config file.
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.yaml").write_text("preset: tiny\n")
    assert main(["train", "--resume", str(tmp_path / "r"), "train.max_steps=9"]) == 0
    assert seen["cfg"].train.max_steps == 9 and seen["resume"] is True
    assert main(["train", str(cfg), "--resume", str(tmp_path / "r")]) == 2
