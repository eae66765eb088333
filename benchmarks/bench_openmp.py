"""How PyTorch's OpenMP threads wait, and what it costs: our training step (the ``small`` preset, synthetic
batches of 32 x 32 tokens, Adam) in child processes under each setting, alone and two side by side (a CPU
shared with another busy process), and greedy search at batch 1 (a frozen model, random weights, 16 source
tokens, 32 steps) alone.

Settings: ``GOMP_SPINCOUNT=10000`` (the package's default since session 27, see ``transformer/__init__.py``),
``OMP_WAIT_POLICY=PASSIVE`` (its default before), and libgomp's own default (``OMP_WAIT_POLICY`` set empty:
300,000 spins). Each child imports the package first, as the CLI does, with the setting in its environment.

    python benchmarks/bench_openmp.py --seconds 15

Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

SETTINGS = {
    "GOMP_SPINCOUNT=10000 (default)": {},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "libgomp's default spin": {"OMP_WAIT_POLICY": ""},
}


def child(kind: str, seconds: float) -> None:
    """One measurement in this process: ms per training step, or greedy search's tokens/s at batch 1."""
    import transformer  # noqa: F401  # first, as the CLI: its OpenMP defaults apply
    import torch

    from transformer.config import preset
    from transformer.decoding import greedy_search
    from transformer.model import Transformer, freeze

    torch.manual_seed(0)
    model = Transformer(preset("small"), 8000, 8000)
    if kind == "train":
        opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9, fused=True)
        src, tgt = torch.randint(4, 8000, (32, 32)), torch.randint(4, 8000, (32, 33))

        def work() -> int:
            out = model(src, tgt[:, :-1])
            loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.size(-1)), tgt[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad()
            return 1
    else:
        frozen = freeze(model.eval())
        src = torch.randint(4, 8000, (1, 16))

        def work() -> int:
            with torch.inference_mode():
                return len(greedy_search(frozen, src, max_len_a=0.0, max_len_b=32)[0].tokens) + 1
    work()
    start, done = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        done += work()
    elapsed = time.perf_counter() - start
    print(f"{elapsed / done * 1e3:.1f}" if kind == "train" else f"{done / elapsed:.0f}")


def run(env: dict, kind: str, seconds: float, copies: int) -> list[float]:
    """``copies`` children side by side under ``env``; each one's result."""
    full = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    full.update(env)
    procs = [subprocess.Popen([sys.executable, __file__, "--child", kind, "--seconds", str(seconds)], env=full,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for _ in range(copies)]
    return [float(p.communicate()[0].strip().splitlines()[-1]) for p in procs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0, help="measured seconds per child")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.seconds)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import describe_machine, machine_info

    print(f"machine: {describe_machine(machine_info('cpu'))}; command: {' '.join(sys.argv)}")
    print("| OpenMP setting | train ms/step, alone | train ms/step, two processes side by side (each) "
          "| greedy tok/s at batch 1, alone |")
    print("|---|---:|---:|---:|")
    rows = {}
    for name, env in SETTINGS.items():
        alone = run(env, "train", args.seconds, 1)[0]
        pair = run(env, "train", args.seconds, 2)
        greedy = run(env, "greedy", args.seconds, 1)[0]
        rows[name] = (alone, max(pair), greedy)
        print(f"| {name} | {alone:.0f} | {pair[0]:.0f} / {pair[1]:.0f} | {greedy:.0f} |", flush=True)
    base = rows["GOMP_SPINCOUNT=10000 (default)"]
    for name, (alone, pair, greedy) in rows.items():
        print(f"the default against {name}: train alone {alone / base[0]:.2f}x, side by side {pair / base[1]:.2f}x, "
              f"greedy {base[2] / greedy:.2f}x (above 1: the default is faster)")


if __name__ == "__main__":
    main()
