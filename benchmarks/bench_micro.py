"""Micro-benchmarks behind two session-3 changes, each old way against the new one in the same process.

1. ``projection``: a decoding step's products on the CPU, ``F.linear`` by the stored (out, in) weight
   against a matrix product by a contiguous (in, out) copy (what ``_OutputLayer._weight_t`` keeps), at
   1, 4, 32 and 128 rows, for the output layer (256 -> 8000) and the decoder's other layers.
2. ``collate``: building every training batch of one Multi30k epoch (token buckets of ``--max-tokens``)
   from the token cache, per-example (``collate([ds[i] for i in ids])``) against ``collate_indices``;
   the two must give the same tensors.

    python benchmarks/bench_micro.py --parts projection,collate

Best of 7 repeats; timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_machine, machine_info, multi30k_tokenizer, read_lines, setup_device  # noqa: E402


def best_seconds(fn, inner: int, repeats: int = 7, warmup: int = 20) -> float:
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - start) / inner)
    return best


@torch.no_grad()
def run_projection() -> None:
    print("\n== products of a decoding step: F.linear(x, W (out,in)) against x @ W^T (in,out) contiguous ==")
    print("| layer | rows | F.linear us | x @ Wt us | speed-up |")
    print("|---|---:|---:|---:|---:|")
    torch.manual_seed(0)
    for d_in, d_out, bias in ((256, 8000, False), (256, 256, True), (256, 1024, True), (1024, 256, True)):
        w = torch.randn(d_out, d_in) * 0.05
        b = torch.randn(d_out) if bias else None
        wt = w.t().contiguous()
        for rows in (1, 4, 32, 128):
            x = torch.randn(rows, d_in)
            linear = (lambda: F.linear(x, w, b))
            product = (lambda: torch.addmm(b, x, wt)) if bias else (lambda: torch.mm(x, wt))
            torch.testing.assert_close(linear(), product(), rtol=1e-4, atol=1e-4)
            inner = max(10, int(2000 / rows))
            a, c = best_seconds(linear, inner), best_seconds(product, inner)
            print(f"| {d_in} -> {d_out} | {rows} | {a * 1e6:.1f} | {c * 1e6:.1f} | {a / c:.2f}x |")


def run_collate(args) -> None:
    from transformer.data.batching import sampler_for
    from transformer.data.cache import TokenArray
    from transformer.data.token_datasets import ParallelDataset

    tok = multi30k_tokenizer(args.work_dir, 8000)
    src = TokenArray.from_lists(tok.encode_src_batch(read_lines("train", "en")))
    tgt = TokenArray.from_lists(tok.encode_tgt_batch(read_lines("train", "de")))
    src.tokens, tgt.tokens = src.tokens.astype("uint16"), tgt.tokens.astype("uint16")  # as the cache stores them
    ds = ParallelDataset(src, tgt, max_len=128)
    batches = list(sampler_for(ds, args.max_tokens, shuffle=True, seed=1))
    for ids in batches[:20]:
        fast, slow = ds.collate_indices(ids), ds.collate([ds[i] for i in ids])
        assert all(torch.equal(getattr(fast, n), getattr(slow, n)) for n in ("src_tokens", "tgt_input", "tgt_output"))
    per_item = best_seconds(lambda: [ds.collate([ds[i] for i in ids]) for ids in batches], 1, repeats=3, warmup=1)
    vectorised = best_seconds(lambda: [ds.collate_indices(ids) for ids in batches], 1, repeats=3, warmup=1)
    n = len(batches)
    print(f"\n== batches of one Multi30k epoch ({n} batches of <= {args.max_tokens} tokens a side) ==")
    print(f"per example: {per_item / n * 1e3:.2f} ms a batch; collate_indices: {vectorised / n * 1e3:.3f} ms a batch; "
          f"{per_item / vectorised:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own, = cores)")
    parser.add_argument("--parts", default="projection,collate")
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--work-dir", default="/tmp/transformer_bench", help="tokenizer cache (outside the repo)")
    args = parser.parse_args()
    setup_device("cpu", args.threads)
    print(f"machine: {describe_machine(machine_info('cpu'))}; command: {' '.join(sys.argv)}")
    parts = args.parts.split(",")
    if "projection" in parts:
        run_projection()
    if "collate" in parts:
        run_collate(args)


if __name__ == "__main__":
    main()
