"""Helpers for the data tests: tiny deterministic corpora."""

from __future__ import annotations

import random
from pathlib import Path

MULTI30K = Path(__file__).parents[2] / ".." / "shared" / "data" / "multi30k"

WORDS_EN = "the a small big dog cat man woman runs sits on in park street red blue with ball tree house".split()
WORDS_DE = "der die das kleine große Hund Katze Mann Frau läuft sitzt auf im Park Straße rot blau mit Ball".split()


def synthetic_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Deterministic toy sentence pairs of varying length."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        k = rng.randint(1, 12)
        pairs.append((" ".join(rng.choice(WORDS_EN) for _ in range(k)) + ".",
                      " ".join(rng.choice(WORDS_DE) for _ in range(k + rng.randint(0, 3))) + "."))
    return pairs


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def write_parallel(folder: Path, prefix: str, pairs: list[tuple[str, str]], src: str = "en", tgt: str = "de") -> None:
    write_lines(folder / f"{prefix}.{src}", [s for s, _ in pairs])
    write_lines(folder / f"{prefix}.{tgt}", [t for _, t in pairs])
