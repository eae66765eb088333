"""Tiny corpora, configs, CLI runs and directory snapshots for tests/test_reliability.py."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

STEPS = 30  # long enough that a signal sent after the first checkpoints lands in the middle of training
REPO = Path(__file__).resolve().parents[1]


def write_corpus(folder: Path, n_train: int = 80, n_valid: int = 8, seed: int = 0) -> Path:
    """train/val .en/.de files of random-letter words (the target is each source word reversed)."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 7))) for _ in range(60)]
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("val", n_valid)):
        src = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 6))) for _ in range(n)]
        (folder / f"{name}.en").write_text("\n".join(src) + "\n", encoding="utf-8")
        (folder / f"{name}.de").write_text("\n".join(" ".join(w[::-1] for w in s.split()) for s in src) + "\n",
                                           encoding="utf-8")
    return folder


def write_config(path: Path, corpus: Path, **train: object) -> Path:
    """A tiny translation config (d_model 16, one layer each side) on the "files" corpus, saving every step."""
    train_cfg = dict(lr_schedule="constant", lr=3e-3, warmup_steps=0, max_steps=STEPS, save_every=1,
                     valid_every=1000, log_every=1, keep_last=3, bleu_subset=0, device="cpu", seed=1)
    train_cfg.update(train)
    cfg = {
        "model": dict(d_model=16, n_heads=2, d_ff=32, n_encoder_layers=1, n_decoder_layers=1, max_positions=64),
        "data": dict(dataset="files", path=str(corpus), vocab_size=300, max_tokens=64, test_prefix=None,
                     num_workers=1),
        "train": train_cfg,
        "decode": dict(beam=2, max_len_b=8),
    }
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def snapshot(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``root`` (what must survive a failure unchanged)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def step_losses(run_dir: Path) -> dict[int, float]:
    """Training loss per step from metrics.jsonl; a step redone after a resume keeps its last record."""
    from transformer.training.metrics import read_metrics

    return {e["step"]: e["loss"] for e in read_metrics(run_dir / "metrics.jsonl") if e.get("split") == "train"}


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def _default_sigint() -> None:
    """In the child before exec: SIGINT back to its default. A test run launched in the background of a
    non-interactive shell ignores SIGINT, the child would inherit that, and Python then installs no
    KeyboardInterrupt handler, so the Ctrl-C tests' signal would be lost."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_cli(args: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    """``python -m transformer.cli ARGS`` in the background (stdout and stderr together, as text), taking
    Ctrl-C (SIGINT) as a terminal would deliver it."""
    return subprocess.Popen([sys.executable, "-m", "transformer.cli", *args], cwd=cwd, env=cli_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=_default_sigint if os.name == "posix" else None)


def run_cli(args: list[str], cwd: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "transformer.cli", *args], cwd=cwd, env=cli_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def wait_for_checkpoints(run_dir: Path, n: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Poll until ``run_dir`` holds ``n`` finished step checkpoints (or the process ended)."""
    from transformer.training.checkpoint import list_checkpoints

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list_checkpoints(run_dir)) >= n:
            return
        time.sleep(0.01)
    raise AssertionError(f"no {n} checkpoints in {run_dir}: the process ended with {proc.poll()}:\n"
                         f"{proc.communicate()[0] if proc.poll() is not None else ''}")


def dumps(obj: object) -> str:
    return json.dumps(obj, indent=1, default=str)
