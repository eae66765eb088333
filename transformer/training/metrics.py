"""Where training numbers go: a JSONL file, TensorBoard scalars, and a PNG of the curves at the end.

``RUN_DIR/metrics.jsonl`` has one JSON object per event; ``"split"`` is ``"train"`` (every
``log_every`` steps: step, loss, nll, ppl, lr, tokens_per_s, elapsed) or ``"valid"`` (every
``valid_every`` steps: step, loss, nll, ppl, bleu when computed, elapsed). Loss and nll are per target
token, in nats; ppl = exp(nll).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional, Union

PathLike = Union[str, os.PathLike]


def perplexity(nll_per_token: float) -> float:
    """exp(nll), capped to avoid overflow (inf above e^100)."""
    return math.exp(nll_per_token) if nll_per_token < 100 else float("inf")


class MetricsLogger:
    """Appends events to ``metrics.jsonl`` and TensorBoard (``tb/``) in a run directory.

    With ``enabled=False`` (ranks other than 0) every method does nothing.
    """

    def __init__(self, run_dir: PathLike, enabled: bool = True, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._writer = None
        self._file = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "metrics.jsonl"
        torn = path.is_file() and path.stat().st_size > 0 and _last_byte(path) != b"\n"
        self._file = open(path, "a", encoding="utf-8")
        if torn:  # a process killed mid-line: start afresh so the next event is not glued to the torn one
            self._file.write("\n")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(self.run_dir / "tb"))
            except ImportError:  # tensorboard not installed: JSONL only
                self._writer = None

    def log(self, split: str, step: int, values: dict[str, Any]) -> None:
        """Write one event; numeric values also go to TensorBoard as ``split/name``."""
        if not self.enabled:
            return
        record = {"split": split, "step": step, **values}
        self._file.write(json.dumps(record, allow_nan=True) + "\n")
        self._file.flush()
        if self._writer is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self._writer.add_scalar(f"{split}/{name}", value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, 2)
        return f.read(1)


def read_metrics(path: PathLike) -> list[dict[str, Any]]:
    """All events of a ``metrics.jsonl`` (a truncated last line, from a crash, is skipped)."""
    events = []
    path = Path(path)
    if not path.is_file():
        return events
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def plot_curves(run_dir: PathLike, out: Optional[PathLike] = None) -> Optional[Path]:
    """Draw loss, perplexity and (if any) BLEU against step from ``metrics.jsonl`` into ``curves.png``.

    Returns:
        the PNG path, or None when there is nothing to plot.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from transformer.training.checkpoint import atomic_write

    run_dir = Path(run_dir)
    events = read_metrics(run_dir / "metrics.jsonl")
    if not events:
        return None

    def series(split: str, key: str) -> tuple[list[int], list[float]]:
        pts = [(e["step"], e[key]) for e in events if e.get("split") == split and isinstance(e.get(key), (int, float))]
        return [p[0] for p in pts], [p[1] for p in pts]

    has_bleu = bool(series("valid", "bleu")[0])
    fig, axes = plt.subplots(1, 3 if has_bleu else 2, figsize=(15 if has_bleu else 10, 4))
    for split, style in (("train", "-"), ("valid", "o-")):
        x, y = series(split, "loss")
        if x:
            axes[0].plot(x, y, style, label=f"{split} loss")
        x, y = series(split, "ppl")
        if x:
            axes[1].plot(x, y, style, label=f"{split} ppl")
    axes[0].set_title("loss (label-smoothed, per token)")
    axes[1].set_title("perplexity")
    axes[1].set_yscale("log")
    if has_bleu:
        x, y = series("valid", "bleu")
        axes[2].plot(x, y, "o-", label="valid BLEU")
        axes[2].set_title("BLEU (greedy)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out) if out is not None else run_dir / "curves.png"
    atomic_write(out, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)
    return out


__all__ = ["MetricsLogger", "read_metrics", "plot_curves", "perplexity"]
