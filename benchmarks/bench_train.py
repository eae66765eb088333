"""Training speed side by side: our ``Transformer`` against Hugging Face ``MarianMTModel`` and
``torch.nn.Transformer`` (with embeddings and a tied output layer), same config, same batches, same loss.

Two parts:

1. ``synthetic``: identical random token batches (B x S source, B x T target, no padding) at the
   ``small`` and ``base`` presets. A full step is forward, label-smoothed loss, backward, Adam step.
   Reported: target tokens/s, model FLOP/s and MFU against the fp32 GEMM peak measured at the model's
   own shapes in the same run (formula: :func:`benchmarks.common.train_step_flops`), peak RSS of a
   fresh process per config (CUDA: ``torch.cuda.max_memory_allocated``), and our speed as a ratio. MFU is
   given twice: the best step over the best GEMM peak (the two may come from different moments: the peak
   from the measurement before the models or from another moment), and paired by round, each step over the
   GEMM probe timed just before and just after it (median and range over the rounds), which a host whose
   speed drifts within seconds moves less; our speed against each peer is paired the same way, each step
   over its own probes (:func:`benchmarks.common.sandwiched_times`).
   Our step's matrix products are also replayed alone (captured from one real step with their
   shapes and strides, timed in the same rounds): the floor they set on our step, and so the highest
   MFU the step could reach if everything else in it took no time. With ``--products-by-shape``, those
   products are also timed one call at a time and grouped by op, shapes and layout (a weight used
   transposed, ``x W^T``, is a T factor): which of them fall short of the peak, and by how many ms a step.
   The three models are stepped round-robin so that load from other processes falls on all alike.
2. ``real``: Multi30k en-de, each toolkit batching as its users do: ours with token buckets
   (``TokenBatchSampler``, padded tokens per side <= ``--max-tokens``), Hugging Face with shuffled
   sentence batches padded to the longest (batch size = ``--max-tokens`` / mean example length, so both
   average the same real tokens per batch). Reported: non-pad target tokens/s, padding fraction, ratio.
   A third stream, ours fed Hugging Face's batches, separates the batching gain from the model's.

    python benchmarks/bench_train.py --device cpu                       # everything
    python benchmarks/bench_train.py --parts synthetic --presets small  # one part, one preset
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, ContextManager

import transformer  # noqa: F401  # before torch: its OpenMP defaults (transformer/__init__.py) apply, as in the CLI
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` when run as a script
from common import (  # noqa: E402
    add_allocator_arg, add_common_args, autocast, current_rss_mb, describe_allocator, describe_machine, gemm_gflops,
    gemm_peak, gemm_probe, keep_host_memory, machine_info, memory_bandwidth_gbs, multi30k_tokenizer, paired_fractions,
    peak_rss_mb, print_limits, read_lines, run_child, sandwiched_times, setup_device, sync, time_call, train_step_flops,
)

from transformer.config import ModelConfig, preset  # noqa: E402
from transformer.data.vocab import BOS_ID, EOS_ID, PAD_ID  # noqa: E402
from transformer.model import Transformer  # noqa: E402
from transformer.model.attention import flash_attention, separate_projections  # noqa: E402
from transformer.model.dropout import stored_masks  # noqa: E402
from transformer.model.embeddings import dense_tied_gradients, sinusoidal_table  # noqa: E402
from transformer.model.layers import plain_feed_forward, unfused_add_norm  # noqa: E402
from transformer.training.loss import aten_loss, cpu_sized_blocks, label_smoothed_nll_loss  # noqa: E402

PEERS = ("ours", "hf", "torch")
PEER_NAMES = {"ours": "ours (Transformer)", "hf": "HF MarianMTModel", "torch": "torch.nn.Transformer",
              "ours_compiled": "ours + torch.compile", "ours_compiled_dynamic": "ours + torch.compile(dynamic=True)",
              "hf_compiled_dynamic": "HF MarianMTModel + torch.compile(dynamic=True)",
              "ours_stored_masks": "ours, dropout masks stored",
              "ours_flash": "ours, flash attention", "ours_dense_tied": "ours, dense tied gradients",
              "ours_aten_loss": "ours, loss in ATen ops", "ours_plain_ffn": "ours, plain feed-forward",
              "ours_separate_qkv": "ours, q, k, v projected one by one",
              "ours_unfused_norm": "ours, bias, dropout, residual and LayerNorm apart",
              "ours_graphed": "ours, the step as one CUDA graph",
              "ours_compiled_graphed": "ours + torch.compile, the step as one CUDA graph",
              "ours_cpu_loss_blocks": "ours, the loss in the CPU's blocks of rows",
              "ours_again": "ours again (A/A control)"}
# Our step without one of its CPU kernels: dropout masks stored as tensors, not hashed (as before session 18);
# attention by scaled_dot_product_attention's flash kernel (as before session 19); the shared embedding's
# gradients summed by autograd as dense (V,D) tensors, the loss's passes over the logits in ATen's ops, the
# feed-forward network as nn.Linear and F.relu (all three as before session 20); q, k and v projected one by
# one, not as one product of their packed weights (as before session 22); a post-norm sub-layer ended by addmm's
# bias, the dropout's residual pass and nn.LayerNorm, not by one pass each way (as before session 24); on a GPU,
# the loss in the CPU's blocks of 1M logits, a few launches each (as before session 25). And an A/A control,
# ``ours_again``: our step unchanged, a second model of its own, whose ratio to ours shows how far the host's
# noise alone moves a ratio in the same run (session 30)
ABLATIONS = {"ours_again": contextlib.nullcontext, "ours_stored_masks": stored_masks, "ours_flash": flash_attention,
             "ours_dense_tied": dense_tied_gradients, "ours_aten_loss": aten_loss,
             "ours_plain_ffn": plain_feed_forward, "ours_separate_qkv": separate_projections,
             "ours_unfused_norm": unfused_add_norm, "ours_cpu_loss_blocks": cpu_sized_blocks}
# Batch (B, S=T) per preset for the synthetic part on the CPU: 1024 tokens a side for `small` and `base` alike
# (the Multi30k configs' buckets hold 2048, the paper's batches ~25k), a measured `base` config about 3 min on
# 2 cores. Until session 21 `base` ran B=8 (256 tokens), where the products' few rows hold them to 83-89% of
# the peak; --batch 8 measures that.
SYNTHETIC_BATCH = {"tiny": (32, 32), "small": (32, 32), "base": (32, 32), "big": (4, 32)}
# On a GPU those would measure kernel-launch latency, not the model: 16k tokens a side per step there
# (the paper's batches held ~25k tokens a side).
GPU_SYNTHETIC_BATCH = {"tiny": (256, 64), "small": (256, 64), "base": (256, 64), "big": (128, 64)}
LABEL_SMOOTHING = 0.1


# --- the peers --------------------------------------------------------------------------------------


class TorchNNTransformer(nn.Module):
    """``torch.nn.Transformer`` made into a translation model as its users do: one shared embedding
    (scaled by sqrt(D)), the paper's sinusoids, dropout, and the output projection tied to the embedding.

    nn.Transformer adds a final LayerNorm after the encoder and after the decoder (2 LayerNorms more
    than the paper's post-LN model; negligible FLOPs)."""

    def __init__(self, cfg: ModelConfig, vocab: int) -> None:
        super().__init__()
        self.scale = math.sqrt(cfg.d_model)
        self.embed = nn.Embedding(vocab, cfg.d_model, padding_idx=PAD_ID)
        nn.init.normal_(self.embed.weight, std=cfg.d_model**-0.5)
        self.register_buffer("positions", sinusoidal_table(cfg.max_positions, cfg.d_model), persistent=False)
        self.dropout = nn.Dropout(cfg.dropout)
        self.transformer = nn.Transformer(
            cfg.d_model, cfg.n_heads, cfg.n_encoder_layers, cfg.n_decoder_layers, cfg.d_ff, cfg.dropout,
            activation=cfg.activation, batch_first=True, norm_first=cfg.norm_first,
        )
        self.lm_head = nn.Linear(cfg.d_model, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def _embed(self, tokens: Tensor) -> Tensor:  # (B,L) -> (B,L,D)
        return self.dropout(self.embed(tokens) * self.scale + self.positions[: tokens.size(1)])

    def forward(self, src_tokens: Tensor, tgt_input: Tensor) -> Tensor:
        t = tgt_input.size(1)
        causal = torch.ones(t, t, dtype=torch.bool, device=tgt_input.device).triu(1)  # True = masked here
        src_pad = src_tokens.eq(PAD_ID)  # (B,S) True = padding (nn.Transformer's convention)
        h = self.transformer(
            self._embed(src_tokens), self._embed(tgt_input), tgt_mask=causal, tgt_is_causal=True,
            src_key_padding_mask=src_pad, memory_key_padding_mask=src_pad,
            tgt_key_padding_mask=tgt_input.eq(PAD_ID),
        )
        return self.lm_head(h)  # (B,T,V)


def synthetic_shape(args, preset_name: str) -> tuple[int, int]:
    """(B, S=T) of the synthetic part: --batch / --length, else the device's default for the preset."""
    table = GPU_SYNTHETIC_BATCH if args.device.startswith("cuda") else SYNTHETIC_BATCH
    batch, length = table[preset_name]
    return args.batch or batch, args.length or length


def build_peer(name: str, cfg: ModelConfig, vocab: int, device: torch.device):
    """(module, forward(src, tgt_input) -> logits) for one peer, on ``device``, in training mode."""
    torch.manual_seed(0)
    if name in ("ours", "ours_graphed") or name in ABLATIONS:  # an ablation's kernel: off in make_train_step
        model = Transformer(cfg, vocab, vocab).to(device).train()
        return model, model
    if name in ("ours_compiled", "ours_compiled_graphed"):  # torch.compile's default mode on fixed shapes (the
        # trainer adds dynamic=True); ours_compiled_graphed then records the step, compiled kernels and all, as a
        # CUDA graph (peer_step)
        model = Transformer(cfg, vocab, vocab).to(device).train()
        return model, torch.compile(model)
    if name == "ours_compiled_dynamic":  # what the trainer runs with train.compile=true (token buckets change shapes)
        model = Transformer(cfg, vocab, vocab).to(device).train()
        return model, torch.compile(model, dynamic=True)
    if name in ("hf", "hf_compiled_dynamic"):
        from transformers import MarianMTModel

        from transformer.model.convert import marian_config

        hf_cfg = marian_config(cfg, vocab, vocab, shared=True, tied=True)
        hf_cfg._attn_implementation = "sdpa"
        model = MarianMTModel(hf_cfg).to(device).train()
        call = torch.compile(model, dynamic=True) if name == "hf_compiled_dynamic" else model

        def forward(src: Tensor, tgt_in: Tensor) -> Tensor:
            # As HF users call it: an attention mask for the source, decoder inputs given.
            return call(input_ids=src, attention_mask=src.ne(PAD_ID), decoder_input_ids=tgt_in).logits

        return model, forward
    if name == "torch":
        model = TorchNNTransformer(cfg, vocab).to(device).train()
        return model, model
    raise ValueError(name)


def ablation(name: str) -> Callable[[], ContextManager[None]]:
    """The context that turns a peer's kernel off for a whole step (ABLATIONS), else one that does nothing."""
    return ABLATIONS.get(name, contextlib.nullcontext)


def make_train_step(model: nn.Module, forward, device: torch.device, bf16: bool,
                    within: Callable[[], ContextManager[None]] = contextlib.nullcontext):
    """One full step: forward, label-smoothed loss (the project's function, for every peer), backward,
    Adam update (the paper's betas/eps; torch's fused kernel for every peer, as
    transformer.training.optim builds it, so that the peers differ only in their models), all ``within`` the
    given context (an ablation's)."""
    opt = paper_adam(model, lr=1e-4)

    def step(src: Tensor, tgt_in: Tensor, tgt_out: Tensor) -> float:
        forward_backward(forward, src, tgt_in, tgt_out, device, bf16, within)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return 0.0

    return step


def paper_adam(model: nn.Module, **options) -> torch.optim.Adam:
    """Adam with the paper's betas and eps in torch's fused kernel, for every peer alike."""
    return torch.optim.Adam(model.parameters(), betas=(0.9, 0.98), eps=1e-9, fused=True, **options)


def forward_backward(forward, src: Tensor, tgt_in: Tensor, tgt_out: Tensor, device: torch.device, bf16: bool,
                     within: Callable[[], ContextManager[None]] = contextlib.nullcontext, cast_cache: bool = True):
    """A step's forward pass (autocast to bf16 where asked) and label-smoothed loss ``within`` the given
    context, then its backward pass, which follows what the forward pass chose."""
    with within():
        with autocast(device, bf16, cache=cast_cache):
            logits = forward(src, tgt_in)
        loss, _ = label_smoothed_nll_loss(logits, tgt_out, LABEL_SMOOTHING, overwrite_logits=True)
    (loss / tgt_out.ne(PAD_ID).sum()).backward()


def make_graphed_step(model: nn.Module, forward, device: torch.device, bf16: bool):
    """The step of :func:`make_train_step` (forward, loss, backward, Adam) recorded once as one CUDA graph and
    replayed (PyTorch's whole-network capture: a side stream for the warm-up steps, Adam with ``capturable=True``,
    autocast without its cast cache, inputs copied into static tensors). Recorded at the first call's shapes,
    which must not change. It measures what launching the step's kernels one by one from Python costs."""
    opt = paper_adam(model, lr=torch.tensor(1e-4, device=device), capturable=True)
    state: dict = {}

    def body(src: Tensor, tgt_in: Tensor, tgt_out: Tensor) -> None:
        forward_backward(forward, src, tgt_in, tgt_out, device, bf16, cast_cache=False)
        opt.step()

    def step(src: Tensor, tgt_in: Tensor, tgt_out: Tensor) -> float:
        if not state:
            static = tuple(t.clone() for t in (src, tgt_in, tgt_out))
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the default stream, as capture wants
                for _ in range(3):
                    opt.zero_grad(set_to_none=True)
                    body(*static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            opt.zero_grad(set_to_none=True)  # the gradients are then allocated (and written, not added) by the graph
            with torch.cuda.graph(graph):
                body(*static)
            state.update(graph=graph, static=static)
        for into, new in zip(state["static"], (src, tgt_in, tgt_out)):
            into.copy_(new)
        state["graph"].replay()
        return 0.0

    return step


def peer_step(name: str, model: nn.Module, forward, device: torch.device, bf16: bool):
    """A peer's step: :func:`make_graphed_step` for ``ours_graphed`` and ``ours_compiled_graphed`` (CUDA only),
    else :func:`make_train_step` within the peer's ablation."""
    if name in ("ours_graphed", "ours_compiled_graphed"):
        if device.type != "cuda":
            raise ValueError("a CUDA graph needs --device cuda")
        return make_graphed_step(model, forward, device, bf16)
    return make_train_step(model, forward, device, bf16, ablation(name))


_PRODUCTS = ("mm", "addmm", "bmm", "baddbmm")


def capture_products(step, device: torch.device) -> list[tuple]:
    """The matrix products of one ``step()`` (mm/addmm/bmm/baddbmm, as the dispatcher sees them, forward,
    backward and optimiser), captured once with their shapes, strides and dtypes, each as (op, operands,
    kwargs) on random operands of the same layout, in the step's order."""
    from torch.utils._python_dispatch import TorchDispatchMode

    recorded = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in _PRODUCTS:
                recorded.append((func, [(a.shape, a.stride(), a.dtype) if isinstance(a, Tensor) else a
                                        for a in args], dict(kwargs or {})))
            return func(*args, **(kwargs or {}))

    with Record():
        step()
    sync(device)

    def operand(meta):
        if not (isinstance(meta, tuple) and len(meta) == 3 and isinstance(meta[0], torch.Size)):
            return meta
        shape, stride, dtype = meta
        return torch.empty_strided(shape, stride, dtype=dtype, device=device).normal_()

    return [(func, [operand(m) for m in metas], kwargs) for func, metas, kwargs in recorded]


def _factors(operands: list) -> list[Tensor]:
    """The two factors of one captured product (addmm's bias comes first, so the last two tensors)."""
    return [o for o in operands if isinstance(o, Tensor)][-2:]


def product_flops(operands: list) -> int:
    """FLOPs of one captured product: its two factors, (..., m, k) x (..., k, n)."""
    a, b = _factors(operands)
    return 2 * math.prod(a.shape) * b.shape[-1]


def products_alone(step, device: torch.device) -> tuple[Callable[[], None], int, float]:
    """The products of one ``step()`` (:func:`capture_products`) and a call that replays them alone, in order.
    Returns (replay, count, FLOPs).

    The replay's time is the step's floor from its products: what the step would take if everything else
    (attention, norms, the loss, dropout, Adam, Python, the autograd engine) were free. Attention inside
    ``scaled_dot_product_attention`` or the extension's kernel is not among them."""
    calls = capture_products(step, device)

    def replay() -> None:
        for func, operands, kwargs in calls:
            func(*operands, **kwargs)

    return replay, len(calls), float(sum(product_flops(operands) for _, operands, _ in calls))


def _layout(t: Tensor) -> str:
    """A factor's shape and how it lies: N (rows contiguous) or T (a transposed view: columns contiguous)."""
    shape = "x".join(str(n) for n in t.shape)
    return f"{shape} {'T' if t.dim() >= 2 and t.stride(-1) != 1 else 'N'}"


def print_products_by_shape(step, device: torch.device, peak: float, rounds: int) -> None:
    """Our step's products grouped by op, shapes and layouts, each call timed alone (best of ``rounds``):
    which of them run below the GEMM peak, and by how many ms a step."""
    calls = capture_products(step, device)
    best = [math.inf] * len(calls)
    for _ in range(rounds):
        for i, (func, operands, kwargs) in enumerate(calls):
            sync(device)
            started = time.perf_counter()
            func(*operands, **kwargs)
            sync(device)
            best[i] = min(best[i], time.perf_counter() - started)
    groups: dict[tuple, list] = {}
    for (func, operands, _), seconds in zip(calls, best):
        a, b = _factors(operands)
        key = (func.overloadpacket.__name__, _layout(a), _layout(b))
        group = groups.setdefault(key, [0, 0.0, 0])
        group[0] += 1
        group[1] += seconds
        group[2] += product_flops(operands)
    print(f"our step's products by op, shapes and layout (N: rows contiguous, T: a transposed view), each call "
          f"timed alone, best of {rounds}:")
    print("| op | A | B | calls | ms a step | GFLOP/s | of the peak | ms over the peak |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    total = over = 0.0
    for (op, a, b), (count, seconds, flops) in sorted(groups.items(), key=lambda kv: -kv[1][1]):
        gflops = flops / seconds / 1e9
        extra = seconds - flops / (peak * 1e9)
        total, over = total + seconds, over + extra
        print(f"| {op} | {a} | {b} | {count} | {seconds * 1e3:.2f} | {gflops:.1f} | {100 * gflops / peak:.0f}% "
              f"| {extra * 1e3:+.2f} |")
    print(f"  all: {total * 1e3:.1f} ms a step, {over * 1e3:.1f} ms of it over what the peak would take")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def synthetic_batch(batch: int, length: int, vocab: int, device: torch.device, seed: int = 0):
    """(src, tgt_input, tgt_output), no padding: ids drawn from the non-special range."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, vocab, (batch, length), generator=g)
    src[:, -1] = EOS_ID
    tgt = torch.randint(4, vocab, (batch, length), generator=g)
    tgt_in = torch.cat([torch.full((batch, 1), BOS_ID), tgt[:, :-1]], 1)
    tgt_out = torch.cat([tgt[:, :-1], torch.full((batch, 1), EOS_ID)], 1)
    return src.to(device), tgt_in.to(device), tgt_out.to(device)


# --- part 1: synthetic batches ----------------------------------------------------------------------


def memory_child(args) -> None:
    """Fresh process: build one peer, run 2 steps (the first allocates Adam's state), print peak memory."""
    device = setup_device(args.device, args.threads)
    cfg = preset(args.child_preset)
    batch, length = synthetic_shape(args, args.child_preset)
    src, tgt_in, tgt_out = synthetic_batch(batch, length, args.vocab, device)
    rss_before = current_rss_mb()
    model, forward = build_peer(args.child_peer, cfg, args.vocab, device)
    step = peer_step(args.child_peer, model, forward, device, args.bf16)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        step(src, tgt_in, tgt_out)
    sync(device)
    out = {"peak_rss_mb": peak_rss_mb(), "rss_before_model_mb": rss_before}
    if device.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(out))


def gemm_shapes(cfg: ModelConfig, batch: int, length: int, vocab: int) -> list[tuple[int, int, int]]:
    """The model's big GEMMs: the FFN (B*T, D) x (D, F), its second half, the output (B*T, D) x (D, V)."""
    m = batch * length
    return [(m, cfg.d_model, cfg.d_ff), (m, cfg.d_ff, cfg.d_model), (m, cfg.d_model, vocab)]


def percent_range(fractions: list[float]) -> str:
    """``"64.1% (60.2-66.0%)"``: the median of ``fractions`` and their range, as percentages."""
    return f"{100 * statistics.median(fractions):.1f}% ({100 * min(fractions):.1f}-{100 * max(fractions):.1f}%)"


def times_range(ratios: list[float]) -> str:
    """``"1.12x (0.98-1.30x)"``: the median of ``ratios`` and their range."""
    return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}x)"


def run_synthetic(args, device: torch.device, gemms: list, results: dict) -> None:
    for preset_name in args.presets:
        cfg = preset(preset_name)
        batch, length = synthetic_shape(args, preset_name)
        flops = train_step_flops(
            cfg.d_model, cfg.d_ff, cfg.n_encoder_layers, cfg.n_decoder_layers, args.vocab, batch, length, length
        )
        src, tgt_in, tgt_out = synthetic_batch(batch, length, args.vocab, device)
        print(f"\n== synthetic, preset {preset_name}: D={cfg.d_model} H={cfg.n_heads} F={cfg.d_ff} "
              f"L={cfg.n_encoder_layers}+{cfg.n_decoder_layers} V={args.vocab}, B={batch} S=T={length}, "
              f"{flops / 1e9:.1f} model GFLOP/step ==")
        steps, params = {}, {}
        for name in args.peers:
            model, forward = build_peer(name, cfg, args.vocab, device)
            try:  # a first step outside the timing: it also compiles, for ours_compiled (and records ours_graphed)
                fn = peer_step(name, model, forward, device, args.bf16)
                started = time.perf_counter()
                fn(src, tgt_in, tgt_out)
                sync(device)
                if "compiled" in name:
                    print(f"{PEER_NAMES[name]}: first step took {time.perf_counter() - started:.0f} s")
            except Exception as exc:  # report the peer, keep the others
                print(f"{PEER_NAMES[name]}: its first step failed, left out: {type(exc).__name__}: {exc}"[:2000])
                continue
            params[name] = n_params(model)
            steps[name] = lambda fn=fn: fn(src, tgt_in, tgt_out)
        peers = [name for name in args.peers if name in steps]
        floor = None
        if "ours" in steps:  # our step's products alone, timed in the same rounds: the floor they set
            replay, n_products, product_flops = products_alone(steps["ours"], device)
            steps["ours_products"] = replay
            floor = (n_products, product_flops)
        # The GEMM peak again, at this preset's best shape, timed between the models' steps in the same rounds.
        mine = [g for g in gemms if (g.m, g.k, g.n) in gemm_shapes(cfg, batch, length, args.vocab)]
        best = max(mine, key=lambda g: g.gflops)
        probe, probe_flops = gemm_probe(best, device)
        times, around, probe_times = sandwiched_times(steps, probe, device, warmup=args.warmup, rounds=args.rounds)
        peak = max(best.gflops, probe_flops / min(probe_times) / 1e9)
        print(f"GEMM peak {best.label()}: {peak:.1f} GFLOP/s (best of: alone before the models "
              f"{best.gflops:.1f}, and timed between their steps)")
        del steps
        mem = {}
        if not args.no_memory:
            for name in peers:
                if "compiled" in name:
                    continue  # a second compilation in a fresh process would cost minutes
                child = [__file__, "--child-memory", "--child-preset", preset_name, "--child-peer", name,
                         "--device", args.device, "--vocab", str(args.vocab)]
                if args.threads:
                    child += ["--threads", str(args.threads)]
                if args.bf16:
                    child.append("--bf16")
                child += ["--batch", str(batch), "--length", str(length)]
                mem[name] = run_child(child)
        # The best step of each peer is the headline: on a shared machine other processes only ever slow a
        # step down, so the fastest of the round-robin repeats is the least disturbed (median shown too).
        ours = min(times["ours"]) if "ours" in times else None
        # MFU paired by round: each step over the GEMM probe timed on either side of it (median and range over
        # the rounds), its two figures from the same moment, unlike the best step over the best peak; and ours
        # against each peer from those pairs, each step measured against its own probes
        print(f"| peer | params | s/step best (median) of {args.rounds} | target tok/s | model GFLOP/s | MFU | "
              f"MFU paired by round, median (range) | peak RSS MB | ours speed-up | ours speed-up paired by round |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        ours_paired = paired_fractions(flops, times["ours"], probe_flops, around["ours"]) if ours else None
        rows = {}
        for name in peers:
            t = min(times[name])
            row = {
                "params": params[name], "s_per_step": t, "s_per_step_median": statistics.median(times[name]),
                "all_s": times[name], "tok_s": batch * length / t,
                "gflops": flops / t / 1e9, "mfu": flops / t / 1e9 / peak,
                "mfu_paired": paired_fractions(flops, times[name], probe_flops, around[name]),
                "speedup_ours": (t / ours) if ours else None, **mem.get(name, {}),
            }
            if ours:
                row["speedup_ours_paired"] = [a / b for a, b in zip(ours_paired, row["mfu_paired"])]
            rows[name] = row
            rss = f"{row['peak_rss_mb']:.0f}" if "peak_rss_mb" in row else "-"
            if "cuda_peak_mb" in row:
                rss = f"{row['cuda_peak_mb']:.0f} (GPU)"
            ratio = f"{row['speedup_ours']:.2f}x" if ours else "-"
            ratio_paired = times_range(row["speedup_ours_paired"]) if ours else "-"
            print(f"| {PEER_NAMES[name]} | {row['params'] / 1e6:.1f}M | {t:.3f} ({row['s_per_step_median']:.3f}) | "
                  f"{row['tok_s']:.0f} | {row['gflops']:.1f} | {100 * row['mfu']:.1f}% | "
                  f"{percent_range(row['mfu_paired'])} | {rss} | {ratio} | {ratio_paired} |")
        products = None
        if floor:
            n_products, product_flops = floor
            t_products = min(times["ours_products"])
            products = {"count": n_products, "gflop": product_flops / 1e9, "s_best": t_products,
                        "s_median": statistics.median(times["ours_products"]),
                        "gflops": product_flops / t_products / 1e9,
                        "mfu_ceiling": flops / t_products / 1e9 / peak,
                        "of_peak_paired": paired_fractions(product_flops, times["ours_products"], probe_flops,
                                                           around["ours_products"])}
            print(f"our step's {n_products} matrix products alone (replayed with the same shapes, strides and "
                  f"dtypes, in the same rounds): {t_products:.3f} s best ({products['s_median']:.3f}), "
                  f"{product_flops / 1e9:.1f} GFLOP at {products['gflops']:.1f} GFLOP/s "
                  f"({100 * products['gflops'] / peak:.0f}% of the peak; paired by round "
                  f"{percent_range(products['of_peak_paired'])})")
            if ours:
                # paired by round: the products' time and the step's, each over its own probes
                rest = [1 - (p / pa) / (t / ta) for p, pa, t, ta in zip(times["ours_products"], around["ours_products"],
                                                                         times["ours"], around["ours"])]
                products["rest_paired"] = rest
                print(f"  so MFU could reach at most {100 * products['mfu_ceiling']:.1f}% if all the rest were free; "
                      f"the rest takes {ours - t_products:.3f} s of our {ours:.3f} s step "
                      f"({100 * (ours - t_products) / ours:.0f}%; paired by round {percent_range(rest)})")
        if args.products_by_shape and "ours" in params:
            model, forward = build_peer("ours", cfg, args.vocab, device)
            fn = make_train_step(model, forward, device, args.bf16)
            fn(src, tgt_in, tgt_out)  # Adam's state allocated, as in the timed steps
            print_products_by_shape(lambda: fn(src, tgt_in, tgt_out), device, peak, args.rounds)
        if ours:
            paired = statistics.median(rows['ours']['mfu_paired'])
            print(f"goal: MFU >= 85% of the GEMM peak; ours {100 * rows['ours']['mfu']:.1f}% "
                  f"({rows['ours']['mfu'] / 0.85:.2f}x of the goal); paired by round {100 * paired:.1f}% "
                  f"({paired / 0.85:.2f}x)")
        if args.reference_gemm:
            ref = args.reference_gemm
            print(f"against the {ref.label()} GEMM ({ref.gflops / 1e3:.1f} TFLOP/s), MFU: "
                  + ", ".join(f"{PEER_NAMES[n]} {100 * r['gflops'] / ref.gflops:.1f}%" for n, r in rows.items()))
        results["synthetic"][preset_name] = {"batch": batch, "length": length, "flops_per_step": flops,
                                            "gemm_peak_round_robin": peak, "peers": rows,
                                            "ours_products_alone": products}


# --- part 2: real data ------------------------------------------------------------------------------


def load_multi30k(args):
    """Tokenizer (trained on the fly on a subset, cached in --work-dir) and the encoded training pairs."""
    tok = multi30k_tokenizer(args.work_dir, args.real_vocab)
    return tok, tok.encode_src_batch(read_lines("train", "en")), tok.encode_tgt_batch(read_lines("train", "de"))


def ours_batches(src, tgt, max_tokens: int, seed: int):
    """Our users' batching: token buckets from transformer.data (fairseq-style, padding counted)."""
    from transformer.data.batching import TokenBatchSampler, collate

    sampler = TokenBatchSampler([len(s) + 1 for s in src], [len(t) + 1 for t in tgt], max_tokens, seed=seed)
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        for indices in sampler:
            yield collate([(src[i], tgt[i]) for i in indices])
        epoch += 1


def hf_batches(src, tgt, batch_size: int, seed: int):
    """HF users' batching: a shuffled dataset cut into fixed-size sentence batches, padded to the longest
    (what DataLoader(shuffle=True) + DataCollatorForSeq2Seq do)."""
    from transformer.data.batching import collate

    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(src), generator=g).tolist()
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield collate([(src[i], tgt[i]) for i in order[start: start + batch_size]])


def run_real(args, device: torch.device, results: dict) -> None:
    cfg = preset(args.real_preset)
    t0 = time.perf_counter()
    tok, src, tgt = load_multi30k(args)
    vocab = tok.tgt_vocab_size
    mean_len = statistics.mean(max(len(s), len(t)) + 1 for s, t in zip(src, tgt))
    hf_bs = max(1, round(args.max_tokens / mean_len))
    print(f"\n== real data: Multi30k en-de train ({len(src)} pairs), joint SentencePiece BPE {vocab}, "
          f"preset {args.real_preset}; ours: TokenBatchSampler max_tokens={args.max_tokens}; "
          f"HF: shuffled batches of {hf_bs} sentences (= max_tokens / mean example length {mean_len:.1f}); "
          f"{args.real_seconds:.0f} s per stream, round-robin (data ready in {time.perf_counter() - t0:.0f} s) ==")
    streams = {
        "ours": ("ours", ours_batches(src, tgt, args.max_tokens, seed=1)),
        "hf": ("hf", hf_batches(src, tgt, hf_bs, seed=1)),
        "ours_hf_batches": ("ours", hf_batches(src, tgt, hf_bs, seed=1)),
    }
    for name in ABLATIONS:  # our step with one CPU kernel turned off, on the same token buckets
        if name in args.peers:
            streams[name] = (name, ours_batches(src, tgt, args.max_tokens, seed=1))
    if args.compile:  # both compiled for changing shapes, as the trainer's train.compile=true does for ours
        streams["ours_compiled"] = ("ours_compiled_dynamic", ours_batches(src, tgt, args.max_tokens, seed=1))
        streams["hf_compiled"] = ("hf_compiled_dynamic", hf_batches(src, tgt, hf_bs, seed=1))
    steps = {}
    for key, (peer, _) in streams.items():
        model, forward = build_peer(peer, cfg, vocab, device)
        steps[key] = make_train_step(model, forward, device, args.bf16, ablation(peer))
    stats = {key: {"time": 0.0, "steps": 0, "tgt_tokens": 0, "tgt_padded": 0, "src_tokens": 0, "src_padded": 0}
             for key in streams}

    def one(key: str, timed: bool) -> None:
        b = next(streams[key][1]).to(device)
        dt = time_call(lambda: steps[key](b.src_tokens, b.tgt_input, b.tgt_output), device)
        if timed:
            s = stats[key]
            s["time"] += dt
            s["steps"] += 1
            s["tgt_tokens"] += int(b.tgt_output.ne(PAD_ID).sum())
            s["tgt_padded"] += b.tgt_output.numel()
            s["src_tokens"] += int(b.src_tokens.ne(PAD_ID).sum())
            s["src_padded"] += b.src_tokens.numel()

    names = {"ours": "ours + token buckets", "hf": "HF Marian + sentence batches",
             "ours_hf_batches": "ours + HF's sentence batches",
             **{name: PEER_NAMES[name].replace("ours,", "ours + token buckets,") for name in ABLATIONS},
             "ours_compiled": "ours + token buckets + torch.compile(dynamic=True)",
             "hf_compiled": "HF Marian + sentence batches + torch.compile(dynamic=True)"}
    for key in streams:  # warm-up; compiled streams longer, so that recompiles for new shapes stay outside the timing
        started = time.perf_counter()
        for _ in range(max(args.warmup, 20) if "compiled" in key else args.warmup):
            one(key, timed=False)
        if "compiled" in key:
            print(f"{names[key]}: warm-up (compiling) took {time.perf_counter() - started:.0f} s")
    while min(s["time"] for s in stats.values()) < args.real_seconds:
        for key in streams:
            one(key, timed=True)
    print("| peer and batching | steps | tgt tokens/step | target padding | source padding | "
          "non-pad target tok/s | ours (buckets) speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    rate = {k: s["tgt_tokens"] / s["time"] for k, s in stats.items()}
    for key, s in stats.items():
        s["tok_s"] = rate[key]
        print(f"| {names[key]} | {s['steps']} | {s['tgt_tokens'] / s['steps']:.0f} | "
              f"{100 * (1 - s['tgt_tokens'] / s['tgt_padded']):.1f}% | "
              f"{100 * (1 - s['src_tokens'] / s['src_padded']):.1f}% | {rate[key]:.0f} | "
              f"{rate['ours'] / rate[key]:.2f}x |")
    print(f"goal: >= 1.3x HF; ours {rate['ours'] / rate['hf']:.2f}x "
          f"(batching alone: {rate['ours'] / rate['ours_hf_batches']:.2f}x, "
          f"model alone on the same batches: {rate['ours_hf_batches'] / rate['hf']:.2f}x)")
    for name in ABLATIONS:
        if name in stats:
            print(f"ablation: ours {rate['ours'] / rate[name]:.2f}x {PEER_NAMES[name]} (same batches)")
    if args.compile:
        from torch._dynamo.utils import counters  # dynamo's own tally (internal, informative only)

        print(f"torch.compile: {counters['stats']['unique_graphs']} graphs compiled in all (both models, "
              f"training and any recompiles)")
        print(f"both compiled: ours {rate['ours_compiled'] / rate['hf_compiled']:.2f}x HF; ours compiled / ours "
              f"eager {rate['ours_compiled'] / rate['ours']:.2f}x; ours compiled / HF eager "
              f"{rate['ours_compiled'] / rate['hf']:.2f}x")
    results["real"] = {"preset": args.real_preset, "vocab": vocab, "max_tokens": args.max_tokens,
                       "hf_batch_size": hf_bs, "streams": stats}


# --- where our time goes ----------------------------------------------------------------------------


def run_profile(args, device: torch.device) -> None:
    """torch.profiler over a few of our training steps at each preset: the top ops by self time."""
    from torch.profiler import ProfilerActivity, profile, record_function

    for preset_name in args.presets:
        cfg = preset(preset_name)
        batch, length = synthetic_shape(args, preset_name)
        src, tgt_in, tgt_out = synthetic_batch(batch, length, args.vocab, device)
        model, forward = build_peer("ours", cfg, args.vocab, device)
        step = make_train_step(model, forward, device, args.bf16)
        step(src, tgt_in, tgt_out)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(args.profile_steps):
                with record_function("train_step"):
                    step(src, tgt_in, tgt_out)
        print(f"\n== torch.profiler: our training step, preset {preset_name}, B={batch} S=T={length}, "
              f"{args.profile_steps} steps ==")
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=args.profile_rows))


# --- main -------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--parts", default="synthetic,real", help="comma list: synthetic, real")
    parser.add_argument("--presets", default="small,base", help="comma list of presets for the synthetic part")
    parser.add_argument("--peers", default=",".join(PEERS),
                        help="comma list of: ours, hf, torch; also our step with one CPU kernel turned off "
                             "(synthetic and real parts): " + "; ".join(f"{name} ({PEER_NAMES[name]})"
                                                                         for name in ABLATIONS))
    parser.add_argument("--vocab", type=int, default=8000, help="vocabulary of the synthetic part")
    parser.add_argument("--batch", type=int, default=0, help="override the synthetic batch size")
    parser.add_argument("--length", type=int, default=0, help="override the synthetic sequence length")
    parser.add_argument("--compile", action="store_true",
                        help="add a peer: ours under torch.compile (default mode; batches here have one shape)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per peer")
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per peer (round-robin)")
    parser.add_argument("--no-memory", action="store_true", help="skip the fresh-process memory runs")
    parser.add_argument("--real-preset", default="small")
    parser.add_argument("--real-vocab", type=int, default=8000)
    parser.add_argument("--max-tokens", type=int, default=2048, help="ours: padded tokens per side per batch")
    parser.add_argument("--real-seconds", type=float, default=45.0, help="timed seconds per stream")
    parser.add_argument("--work-dir", default="/tmp/transformer_bench", help="tokenizer cache (outside the repo)")
    parser.add_argument("--json", default="", help="write all results here")
    parser.add_argument("--products-by-shape", action="store_true",
                        help="synthetic part: also time our step's products one call at a time, grouped by op, "
                             "shapes and layout, against the GEMM peak")
    parser.add_argument("--profile", action="store_true", help="only profile our training step (torch.profiler)")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--profile-rows", type=int, default=20)
    add_allocator_arg(parser, "the trainer's train.keep_freed_memory")
    parser.add_argument("--child-memory", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-preset", default="", help=argparse.SUPPRESS)
    parser.add_argument("--child-peer", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.presets = [p for p in args.presets.split(",") if p]
    args.peers = [p for p in args.peers.split(",") if p]
    if args.compile and "ours_compiled" not in args.peers:
        args.peers.append("ours_compiled")
    args.kept_memory = keep_host_memory(args.device, args.system_malloc)  # for every peer alike, as our trainer
    if args.child_memory:
        memory_child(args)
        return
    device = setup_device(args.device, args.threads)
    if args.profile:
        run_profile(args, device)
        return
    info = machine_info(args.device)
    dtype = torch.bfloat16 if (args.bf16 and device.type == "cuda") else torch.float32
    print(f"machine: {describe_machine(info)}; command: {' '.join(sys.argv)}")
    if device.type == "cpu":
        print(describe_allocator(args.kept_memory, "the trainer's train.keep_freed_memory"))
    shapes = []
    for name in args.presets:
        batch, length = synthetic_shape(args, name)
        shapes += gemm_shapes(preset(name), batch, length, args.vocab)
    shapes = sorted(set(shapes)) or [(1024, 1024, 1024)]
    peak, gemms = gemm_peak(shapes, device, dtype)
    bandwidth = memory_bandwidth_gbs(device)
    print_limits(peak, gemms, bandwidth)
    # On a GPU the model's own shapes may not reach the chip's matrix peak: also report MFU against a large
    # square product (the usual MFU denominator), measured here in the same dtype.
    args.reference_gemm = gemm_gflops(8192, 8192, 8192, device, dtype) if device.type == "cuda" else None
    if args.reference_gemm:
        print(f"  GEMM {args.reference_gemm.label():<32} {args.reference_gemm.gflops:8.1f} GFLOP/s (reference)")
    results = {"machine": info, "gemm_peak_gflops": peak, "dtype": str(dtype),
               "gemm": [vars(g) for g in gemms], "bandwidth_gbs": bandwidth, "synthetic": {}}
    parts = args.parts.split(",")
    if "synthetic" in parts:
        run_synthetic(args, device, gemms, results)
    if "real" in parts:
        run_real(args, device, results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
