"""Encoding throughput and peak memory of the data cache on a large synthetic corpus.

The corpus: N line pairs sampled (with replacement, seed 1) from Multi30k's en-de training set, written
to two plain-text files. A joint BPE tokenizer (8000) is trained on Multi30k's training set, then the
corpus is encoded into the binary cache with 1 worker (in-process) and with all cores (a process pool).
Each measurement runs in a fresh subprocess, so its peak memory (``ru_maxrss`` of itself plus the
largest of its children) is its own.

    python benchmarks/bench_encoding.py --lines 2000000 --multi30k ../shared/data/multi30k

Not a test: timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_corpus(multi30k: Path, out: Path, n_lines: int) -> tuple[Path, Path]:
    from transformer.data import read_parallel_files

    pairs = read_parallel_files(multi30k / "train.en", multi30k / "train.de")
    rng = random.Random(1)
    src, tgt = out / "big.en", out / "big.de"
    with open(src, "w", encoding="utf-8") as fs, open(tgt, "w", encoding="utf-8") as ft:
        for _ in range(n_lines):
            s, t = pairs[rng.randrange(len(pairs))]
            fs.write(s + "\n")
            ft.write(t + "\n")
    return src, tgt


def measure(work: Path, workers: int) -> dict:
    """One encoding run (in this process); returns lines/s and peak memory."""
    from transformer.data import Tokenizer, encode_corpus, parallel_files

    tok = Tokenizer.load(work / "tokenizer")
    corpus = parallel_files(work / "big.en", work / "big.de")
    cache = work / f"cache_{workers}"
    shutil.rmtree(cache, ignore_errors=True)
    start = time.perf_counter()
    enc = encode_corpus(corpus, tok, cache, "train", max_chars=2000, num_workers=workers)
    seconds = time.perf_counter() - start
    n = len(enc.tgt)
    self_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    tokens = int(enc.src.lengths.sum() + enc.tgt.lengths.sum())
    size = sum(f.stat().st_size for f in enc.path.rglob("*") if f.is_file())
    return {"workers": workers, "lines": n, "seconds": round(seconds, 2), "lines_per_s": round(n / seconds),
            "tokens": tokens, "cache_mib": round(size / 2**20, 1),
            "peak_rss_self_mib": round(self_kib / 1024, 1), "peak_rss_children_mib": round(child_kib / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=2_000_000)
    parser.add_argument("--multi30k", type=Path, default=ROOT.parent / "shared" / "data" / "multi30k")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--measure", type=int, default=None, help=argparse.SUPPRESS)  # internal: one run
    args = parser.parse_args()

    if args.measure is not None:
        print(json.dumps(measure(args.work_dir, args.measure)))
        return

    import numpy
    import sentencepiece
    import torch

    from transformer.data import Tokenizer, read_parallel_files

    print(f"python {platform.python_version()}, torch {torch.__version__}, numpy {numpy.__version__}, "
          f"sentencepiece {sentencepiece.__version__}, {os.cpu_count()} cores, {platform.platform()}")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_encoding_"))
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    make_corpus(args.multi30k, work, args.lines)
    print(f"corpus: {args.lines} line pairs sampled from Multi30k en-de, "
          f"{(work / 'big.en').stat().st_size / 2**20:.0f} + {(work / 'big.de').stat().st_size / 2**20:.0f} MiB "
          f"({time.perf_counter() - t:.1f} s to write)")
    pairs = read_parallel_files(args.multi30k / "train.en", args.multi30k / "train.de")
    t = time.perf_counter()
    Tokenizer.train([s for s, _ in pairs], [d for _, d in pairs], vocab_size=8000, out_dir=work / "tokenizer")
    print(f"tokenizer: joint BPE 8000 on Multi30k train ({time.perf_counter() - t:.1f} s)")
    print(f"{'workers':>7} {'lines':>9} {'seconds':>8} {'lines/s':>9} {'cache MiB':>9} {'peak RSS self':>13} {'peak RSS child':>14}")
    for workers in args.workers:
        out = subprocess.run([sys.executable, __file__, "--measure", str(workers), "--work-dir", str(work)],
                             check=True, capture_output=True, text=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{r['workers']:>7} {r['lines']:>9} {r['seconds']:>8} {r['lines_per_s']:>9} {r['cache_mib']:>9} "
              f"{r['peak_rss_self_mib']:>10} MiB {r['peak_rss_children_mib']:>10} MiB")
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
