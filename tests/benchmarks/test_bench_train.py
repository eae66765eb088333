"""The training benchmark's FLOP count against the products a step really runs (benchmarks/bench_train.py).

MFU is model FLOPs over the GEMM peak: if ``train_step_flops`` miscounted, every MFU in BENCHMARKS.md would
be off. The products-alone replay captures the matrix products of one real step; their FLOPs must be the
formula's, less the attention term (computed inside ``scaled_dot_product_attention``, not by mm/addmm).
"""

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_train  # noqa: E402
from common import train_step_flops  # noqa: E402

from transformer.config import preset  # noqa: E402
from transformer.model.attention import short_kernel  # noqa: E402


@pytest.mark.parametrize("n_enc,n_dec,batch,src_len,tgt_len", [(2, 1, 3, 7, 5), (1, 2, 2, 4, 9)])
def test_the_step_s_products_are_the_flop_formula_without_attention(n_enc, n_dec, batch, src_len, tgt_len):
    d, f, vocab = 32, 48, 50
    cfg = dataclasses.replace(preset("tiny"), d_model=d, n_heads=4, d_ff=f, n_encoder_layers=n_enc,
                              n_decoder_layers=n_dec)
    src, tgt_in, tgt_out = bench_train.synthetic_batch(batch, max(src_len, tgt_len), vocab, torch.device("cpu"))
    src, tgt_in, tgt_out = src[:, :src_len], tgt_in[:, :tgt_len], tgt_out[:, :tgt_len]
    model, forward = bench_train.build_peer("ours", cfg, vocab, torch.device("cpu"))
    step = bench_train.make_train_step(model, forward, torch.device("cpu"), bf16=False)
    before = [p.detach().clone() for p in model.parameters()]

    replay, count, flops = bench_train.products_alone(lambda: step(src, tgt_in, tgt_out), torch.device("cpu"))

    attention = 3 * 2 * 2 * d * batch * (n_enc * src_len**2 + n_dec * tgt_len**2 + n_dec * tgt_len * src_len)
    assert flops == train_step_flops(d, f, n_enc, n_dec, vocab, batch, src_len, tgt_len) - attention
    # Each linear layer: one product forward, two backward (input and weight); the tied output layer too. With
    # the attention kernel, the projections of one input are one packed layer: q, k, v in self-attention, k and
    # v in cross-attention.
    if short_kernel() is not None:
        n_linear = n_enc * 4 + n_dec * 7 + 1
    else:
        n_linear = n_enc * 6 + n_dec * 10 + 1
    assert count == 3 * n_linear
    # The captured step was a real one (it updated the weights), and the replay runs on its own.
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    replay()


def test_products_by_shape_groups_every_product_of_the_step(capsys):
    cfg = dataclasses.replace(preset("tiny"), d_model=32, n_heads=4, d_ff=48, n_encoder_layers=1,
                              n_decoder_layers=1)
    src, tgt_in, tgt_out = bench_train.synthetic_batch(2, 6, 50, torch.device("cpu"))
    model, forward = bench_train.build_peer("ours", cfg, 50, torch.device("cpu"))
    step = bench_train.make_train_step(model, forward, torch.device("cpu"), bf16=False)
    _, count, _ = bench_train.products_alone(lambda: step(src, tgt_in, tgt_out), torch.device("cpu"))

    bench_train.print_products_by_shape(lambda: step(src, tgt_in, tgt_out), torch.device("cpu"), 100.0, 2)

    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and not line.startswith("| op")]
    assert sum(int(row[3]) for row in rows) == count  # every product in one group
    assert {row[0].strip() for row in rows} == {"mm", "addmm"}
    # the output layer's forward: (B*T, D) x the shared (V, D) embedding used transposed
    assert any(row[1].strip() == "12x32 N" and row[2].strip() == "32x50 T" for row in rows)
