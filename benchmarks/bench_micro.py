"""Micro-benchmarks behind the decoding and batching changes, each old way against the new one in the same process.

1. ``projection``: a decoding step's products on the CPU, ``F.linear`` by the stored (out, in) weight
   against a matrix product by a contiguous (in, out) copy (what ``_OutputLayer._weight_t`` keeps), at
   1, 4, 32 and 128 rows, for the output layer (256 -> 8000) and the decoder's other layers.
2. ``collate``: building every training batch of one Multi30k epoch (token buckets of ``--max-tokens``)
   from the token cache, per-example (``collate([ds[i] for i in ids])``) against ``collate_indices``;
   the two must give the same tensors.
3. ``frozen`` (session 4, ``transformer/model/frozen.py``): (a) the product forms of ``frozen._Dense``
   at 1 to 128 rows, for the decoder's shapes (256 -> 768 is the fused q/k/v): MKL's ``addmm`` by the (in, out)
   transposed weight, MKL's transposed product by the (out, in) weight, at one row the weight as two row
   blocks in one ``baddbmm`` (two threads), and oneDNN's linear with its pre-packed weight; (b) one decoder
   step of a ``small`` model (random weights, 16 source tokens, 20 target positions already cached), the
   ``nn.Module`` against its frozen copy.
4. ``overhead``: the Python cost of a frozen decoder step at one row: the same step (position 20, batch 1)
   run from Python against a ``torch.jit.trace`` of it, which replays the ATen calls without the
   interpreter (a diagnostic only: tracing fixes the position and batch, so decoding cannot use it); and
   (session 7) the whole step with the compiled decoder step (``transformer.model.native``) against the
   Python step.
5. ``roles`` (session 6): the products' forms by role (``frozen.PACKED_FROM_ROWS`` / ``COLUMN_ROWS``: oneDNN
   for the encoder and for decoder steps from 64 rows, MKL's transposed product for decoder steps up to 63)
   against session 4's, for the encoder over the first B Multi30k val sentences and one decoder step.
6. ``compile``: the static-cache decoder step (``transformer.model.static``) eagerly against
   ``torch.compile`` of it, on the CPU (a diagnostic: decoding does not compile it).
7. ``int8``: at decoding shapes, the float32 product against PyTorch's dynamic int8 Linear (what our int8
   path runs) and its weight-only int8 product (``torch._weight_int8pack_mm``).
8. ``panels`` (session 8): the compiled extension's ``panel_linear`` (``frozen.PANEL_ROWS``) against the
   forms it replaces (MKL's ``x W_t`` and transposed ``W x^T``, oneDNN's pre-packed linear, at one row the
   row blocks), at 1 to 64 rows of the layers' shapes, warm and with the caches flushed before each call
   (a step reads 19 MB of weights, more than this CPU's 8 MB L3, so its products read cold weights). Needs
   ``transformer build-native``.
9. ``int8-panels`` (session 9, since session 15 ``panel_linear_w8a8``): the int8 product that
   ``--quantize int8`` runs where the extension is built (int8 weights with per-channel scales, activations
   rounded per row to 7-bit unsigned values with a zero point, integer arithmetic) against ``panel_linear``
   with the same weights in float32 and against PyTorch's dynamic int8 Linear (fbgemm, the int8 path without
   the extension), at 1 to 1024 rows, warm and cold.
10. ``attention`` (session 9): the extension's ``attend_one`` (a decoder step's attention of one new position)
   against ATen's ``scaled_dot_product_attention``, per call and in whole compiled decoder steps.
11. ``train-attention`` (session 19): training's attention on the CPU, the extension's kernel for short
   sequences (``transformer.model.attention.attention``) against ATen's flash attention, forward and forward
   + backward, 16 to 512 positions, no mask, causal, and a key mask.
12. ``cpu-levels`` (session 27): each kernel that has an AVX-512 form, timed at every instruction level this
   CPU has (``set_cpu_level``: AVX2, AVX-512, AVX-512 VNNI) in the same process, with the same inputs, its
   outputs checked equal across the levels: ``panel_linear`` and ``panel_linear_w8a8`` at decoding shapes,
   training's attention forward + backward, the loss's ``exp_rows_`` and ``step_candidates``.

    python benchmarks/bench_micro.py --parts projection,collate,frozen,overhead,roles,compile,int8,panels,int8-panels,attention,train-attention,cpu-levels

Best of 7 repeats; timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import transformer  # noqa: F401  # before torch: its OpenMP defaults (transformer/__init__.py) apply, as in the CLI
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_machine, machine_info, multi30k_tokenizer, read_lines, setup_device  # noqa: E402


# (in, out) of a `small` decoder step's products: output projection, fused q/k/v, attention out, fc1, fc2
LAYER_SHAPES = ((256, 8000), (256, 768), (256, 256), (256, 1024), (1024, 256))


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


@torch.no_grad()
def run_frozen() -> None:
    print("\n== products (us): MKL addmm(b, x, W_t) by the (in,out) transpose; MKL (W x^T + b)^T by the (out,in) W; "
          "at one row, W as 2 row blocks in one baddbmm; oneDNN linear(x, packed W) ==")
    print("| layer | rows | MKL x W_t | MKL W x^T | row blocks | oneDNN | best / MKL x W_t |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for d_in, d_out, w, b in layer_weights():
        wt, packed = w.t().contiguous(), torch.ops.mkldnn._reorder_linear_weight(w, 32)
        w_blocks, b_blocks = w.view(2, d_out // 2, d_in), b.view(2, -1, 1)
        for rows in (1, 2, 4, 16, 32, 128):
            x = torch.randn(rows, d_in)
            forms = {
                "x W_t": lambda: torch.addmm(b, x, wt),
                "W x^T": lambda: torch.addmm(b[:, None], w, x.t()).t(),
                "row blocks": (lambda: torch.baddbmm(b_blocks, w_blocks, x.t().expand(2, -1, 1)).view(1, -1))
                if rows == 1 else None,
                "oneDNN": lambda: torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], ""),
            }
            inner = max(10, int(2000 / rows))
            us = {}
            for name, fn in forms.items():
                if fn is not None:
                    torch.testing.assert_close(fn(), forms["x W_t"](), rtol=1e-4, atol=1e-4)
                    us[name] = best_seconds(fn, inner) * 1e6
            cells = " | ".join(f"{us[n]:.1f}" if n in us else "-" for n in forms)
            print(f"| {d_in} -> {d_out} | {rows} | {cells} | {us['x W_t'] / min(us.values()):.2f}x |")

    from transformer.config import preset
    from transformer.model import Transformer, frozen as frozen_module
    from transformer.model.frozen import freeze

    model = Transformer(preset("small"), 8000, 8000).eval()
    frozen = freeze(model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # row blocks are chosen at freezing time, by the thread count
    frozen_no_blocks = freeze(model)
    torch.set_num_threads(threads)
    print("\n== one decoder step, `small` (D=256, 3 decoder layers, V=8000), 20 positions cached; the frozen step "
          "also without its row blocks (1 row) and without MKL's transposed product (2-63 rows) ==")
    print("| rows | nn.Module ms | frozen ms | speed-up | frozen, no row blocks ms | frozen, x W_t only ms |")
    print("|---|---:|---:|---:|---:|---:|")
    column_rows = dict(frozen_module.COLUMN_ROWS)
    no_column = {**column_rows, "decoder": 1}
    for rows in (1, 4, 32, 128):
        src, prefix = torch.randint(4, 8000, (rows, 16)), torch.randint(4, 8000, (rows, 20))
        token = torch.randint(4, 8000, (rows, 1))
        times = []
        for m, column in ((model, column_rows), (frozen, column_rows), (frozen_no_blocks, column_rows),
                          (frozen, no_column)):
            enc = m.encode(src)
            cache = m.new_cache()
            m.decode(prefix, enc, cache)

            def step(m=m, enc=enc, cache=cache):
                m.decode(token, enc, cache)
                for layer in cache.layers:  # back to 20 positions: every timed step is the same step
                    layer.self_attn.length = 20

            frozen_module.COLUMN_ROWS = column
            try:
                times.append(best_seconds(step, max(5, int(200 / rows))))
            finally:
                frozen_module.COLUMN_ROWS = column_rows
        print(f"| {rows} | {times[0] * 1e3:.2f} | {times[1] * 1e3:.2f} | {times[0] / times[1]:.2f}x "
              f"| {times[2] * 1e3:.2f} | {times[3] * 1e3:.2f} |")


@torch.inference_mode()
def run_overhead() -> None:
    import warnings

    from transformer.config import preset
    from transformer.model import Transformer
    from transformer.model.frozen import freeze

    torch.manual_seed(0)
    cfg = preset("small")
    model = Transformer(cfg, 8000, 8000).eval()
    frozen = freeze(model, native=False)
    dec, pos, heads, d = frozen.decoder, 20, cfg.n_heads, cfg.d_model
    src = torch.randint(4, 8000, (1, 16))
    cross_kv = frozen.encode(src).cross_kv
    caches = [torch.zeros(1, heads, 32, d // heads) for _ in range(2 * len(dec.layers))]

    def step(tokens, *kv):  # the frozen step at a fixed position, its cache buffers as inputs
        x = dec.embed_tokens(tokens, offset=pos)
        for i, layer in enumerate(dec.layers):
            def self_attention(y, k_cache=kv[2 * i], v_cache=kv[2 * i + 1], layer=layer):
                q, k, v = layer.qkv(y).contiguous().view(1, 1, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
                k_cache[:, :, pos : pos + 1] = k
                v_cache[:, :, pos : pos + 1] = v
                a = F.scaled_dot_product_attention(q, k_cache[:, :, : pos + 1], v_cache[:, :, : pos + 1])
                return layer.self_out(a.transpose(1, 2).reshape(1, d))
            x = layer._residual(x, layer.self_norm, self_attention)
            x = layer._residual(x, layer.cross_norm, layer._cross_attention, 1, 1, cross_kv[i], None, None)
            x = layer._residual(x, layer.ffn_norm, layer._feed_forward)
        return dec.output(dec.finish(x))

    inputs = (torch.full((1, 1), 5), *caches)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice and tracer warnings
        traced = torch.jit.trace(step, inputs, check_trace=False)
    torch.testing.assert_close(traced(*inputs), step(*inputs))
    python, replay = best_seconds(lambda: step(*inputs), 100), best_seconds(lambda: traced(*inputs), 100)
    print("\n== one frozen decoder step at one row (`small`, random weights, position 20) ==")
    print(f"from Python: {python * 1e3:.2f} ms; traced (no interpreter): {replay * 1e3:.2f} ms; "
          f"Python's share: {(python - replay) * 1e3:.2f} ms ({(python - replay) / python:.0%})")
    # Session 7: the compiled step (transformer.model.native) against the Python step, each a whole
    # _FrozenDecoder.step (embedding and output projection included) at position 20, alternating.
    from transformer.errors import TransformerError

    try:
        native = freeze(model, native=True)
    except TransformerError as exc:
        print(f"compiled step: not built ({exc})")
        return
    python_step = freeze(model, native=False)
    token = torch.full((1, 1), 5)

    def whole_step(m):
        enc, cache = m.encode(src), m.new_cache()
        m.decode(torch.full((1, pos), 5), enc, cache)  # 20 positions cached

        def call():
            for layer_cache in cache.layers:
                layer_cache.self_attn.length = pos  # back to position 20 each time
            return m.decode(token, enc, cache)
        return call

    calls = {"Python": whole_step(python_step), "compiled": whole_step(native)}
    assert torch.equal(calls["Python"](), calls["compiled"]())
    times = {k: [] for k in calls}
    for _ in range(7):
        for k, call in calls.items():
            times[k].append(best_seconds(call, 100, repeats=1, warmup=5))
    py, cc = min(times["Python"]), min(times["compiled"])
    print(f"whole step (embedding to logits), Python step: {py * 1e3:.2f} ms; compiled step: {cc * 1e3:.2f} ms; "
          f"speed-up {py / cc:.2f}x")


@torch.inference_mode()
def run_roles(args) -> None:
    """Session 6: the product forms by role (frozen.PACKED_FROM_ROWS / COLUMN_ROWS) against session 4's."""
    from bench_inference import pad_batch

    from transformer.config import preset
    from transformer.data.vocab import EOS_ID
    from transformer.model import Transformer, frozen as frozen_module
    from transformer.model.frozen import freeze

    torch.manual_seed(0)
    tok = multi30k_tokenizer(args.work_dir, 8000)
    sources = [ids + [EOS_ID] for ids in tok.encode_src_batch(read_lines("val", "en")[:128])]
    frozen = freeze(Transformer(preset("small"), tok.src_vocab_size, tok.tgt_vocab_size).eval())
    now = (dict(frozen_module.PACKED_FROM_ROWS), dict(frozen_module.COLUMN_ROWS))
    # session 4: oneDNN for the output projection only; MKL's transposed product from 2 to 16 rows, else x W_t
    before = ({"output": 2, "encoder": 1 << 30, "decoder": 1 << 30}, {"output": 16, "encoder": 16, "decoder": 16})

    def timed(fn, inner):  # (before, now): best of 7 rounds, the two settings alternating within each round
        best = [float("inf")] * 2
        try:
            for _ in range(7):
                for i, settings in enumerate((before, now)):
                    frozen_module.PACKED_FROM_ROWS, frozen_module.COLUMN_ROWS = settings
                    best[i] = min(best[i], best_seconds(fn, inner, repeats=1, warmup=2))
        finally:
            frozen_module.PACKED_FROM_ROWS, frozen_module.COLUMN_ROWS = now
        return best

    print("\n== products by role (random `small` weights), session 4's forms against now: the encoder over the "
          "first B Multi30k val sentences; one decoder step at B rows (20 positions cached) ==")
    print("| B | source tokens | encoder before ms | encoder now ms | speed-up | step before ms | step now ms "
          "| speed-up |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for rows in (1, 4, 32, 128):
        batch = sources[:rows]
        src = pad_batch(batch, torch.device("cpu"))
        enc = frozen.encode(src)
        cache = frozen.new_cache()
        frozen.decode(torch.randint(4, 8000, (rows, 20)), enc, cache)
        token = torch.randint(4, 8000, (rows, 1))

        def step():
            frozen.decode(token, enc, cache)
            for layer in cache.layers:  # back to 20 positions: every timed step is the same step
                layer.self_attn.length = 20

        inner = max(3, int(100 / rows))
        enc_times, step_times = timed(lambda: frozen.encode(src), inner), timed(step, inner)
        print(f"| {rows} | {sum(len(s) for s in batch)} | {enc_times[0] * 1e3:.2f} | {enc_times[1] * 1e3:.2f} "
              f"| {enc_times[0] / enc_times[1]:.2f}x | {step_times[0] * 1e3:.2f} | {step_times[1] * 1e3:.2f} "
              f"| {step_times[0] / step_times[1]:.2f}x |")


@torch.inference_mode()
def run_compile() -> None:
    """Session 6: the static-cache decoder step (transformer.model.static, run eagerly on the CPU) against the
    same step compiled by torch.compile (inductor, static shapes, without its own weight packing)."""
    import torch._inductor.config as inductor_config

    from transformer.config import preset
    from transformer.decoding import greedy_search
    from transformer.model import Transformer, frozen as frozen_module
    from transformer.model.frozen import freeze

    torch.manual_seed(0)
    inductor_config.cpp.weight_prepack = False  # keep the products in MKL (oneDNN's packing costs per call)
    # dynamo cannot trace oneDNN's opaque packed weights: both sides run every product in MKL here
    packed_from = frozen_module.PACKED_FROM_ROWS
    frozen_module.PACKED_FROM_ROWS = {role: 1 << 30 for role in packed_from}
    try:
        frozen = freeze(Transformer(preset("small"), 8000, 8000).eval(), graphs=True)  # the static step, eager
        static = frozen.static
        print("\n== the static-cache decoder step (random `small` weights, 32 source / 64 target buffer positions, "
              "every product in MKL), eager against torch.compile ==")
        print("| rows | eager ms | compiled ms | compiled / eager speed | compile s |")
        print("|---:|---:|---:|---:|---:|")
        for rows in (1, 32):
            greedy_search(frozen, torch.randint(4, 8000, (rows, 16)), max_len_a=0.0, max_len_b=8)  # fills the buffers
            key = (rows, 32, 64)
            compiled = torch.compile(static._step, dynamic=False, fullgraph=True)
            start = time.perf_counter()
            torch.testing.assert_close(compiled(*key), static._step(*key), atol=1e-4, rtol=1e-4)
            compile_s = time.perf_counter() - start
            inner = max(5, int(100 / rows))
            eager, fast = best_seconds(lambda: static._step(*key), inner), best_seconds(lambda: compiled(*key), inner)
            print(f"| {rows} | {eager * 1e3:.2f} | {fast * 1e3:.2f} | {eager / fast:.2f}x | {compile_s:.0f} |")
    finally:
        frozen_module.PACKED_FROM_ROWS = packed_from


def compiled_extension(part: str):
    """The compiled extension (transformer build-native) if it is built and runs here, else None (printed)."""
    from transformer.model import native

    module = native.load()
    if module is None or not module.panels_supported():
        print(f"\n== {part}: skipped (the compiled extension is not built, or this CPU lacks AVX2/FMA) ==")
        return None
    return module


def layer_weights():
    """(d_in, d_out, W (out, in), b (out,)) of each of LAYER_SHAPES, random from seed 0 (drawn as the loop goes)."""
    torch.manual_seed(0)
    for d_in, d_out in LAYER_SHAPES:
        yield d_in, d_out, torch.randn(d_out, d_in) * 0.05, torch.randn(d_out)


def cache_flush() -> torch.Tensor:
    """32 MB to read between calls (``cold_us``): more than the L3, so it evicts the weights."""
    return torch.randn(32 * 2**20 // 4)


def cold_us(fn, flush: torch.Tensor, repeats: int = 15) -> float:
    """Best time of ``fn`` in us with the caches flushed (``flush`` read) before each call."""
    best = float("inf")
    for _ in range(repeats):
        flush.sum()
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e6


@torch.inference_mode()
def run_int8() -> None:
    """Session 6: the int8 products on offer in PyTorch at decoding shapes, against the float32 product."""
    import warnings

    print("\n== int8 products (us): float32 MKL addmm(b, x, W_t); PyTorch's dynamic int8 Linear (fbgemm, what "
          "frozen._Int8 calls); weight-only int8 (torch._weight_int8pack_mm) ==")
    print("| layer | rows | float32 | dynamic int8 | weight-only int8 | dynamic int8 / float32 speed |")
    print("|---|---:|---:|---:|---:|---:|")
    for d_in, d_out, w, b in layer_weights():
        wt = w.t().contiguous()
        scale = w.abs().amax(1) / 127  # (out,) per-channel
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # quantized tensors' deprecation notice
            w_q = torch.quantize_per_channel(w, scale.double(), torch.zeros(d_out, dtype=torch.long), 0, torch.qint8)
        packed = torch.ops.quantized.linear_prepack(w_q, b)
        w_int8 = w_q.int_repr()  # (out, in) int8
        for rows in (1, 4, 32):
            x = torch.randn(rows, d_in)
            forms = {
                "float32": lambda: torch.addmm(b, x, wt),
                "dynamic": lambda: torch.ops.quantized.linear_dynamic(x, packed, reduce_range=True),
                "weight-only": lambda: torch._weight_int8pack_mm(x, w_int8, scale) + b,
            }
            ref = forms["float32"]()
            for fn in forms.values():  # within 5% of the output's range: a check of the wiring, not of accuracy
                torch.testing.assert_close(fn(), ref, rtol=0.0, atol=0.05 * float(ref.abs().max()))
            us = {name: best_seconds(fn, max(5, int(500 / rows))) * 1e6 for name, fn in forms.items()}
            print(f"| {d_in} -> {d_out} | {rows} | {us['float32']:.1f} | {us['dynamic']:.1f} | {us['weight-only']:.1f} "
                  f"| {us['float32'] / us['dynamic']:.2f}x |")


def run_panels() -> None:
    """Session 8: panel_linear against MKL's and oneDNN's forms at decoding shapes, warm and cold."""
    from transformer.model.frozen import _Dense

    module = compiled_extension("panels")
    if module is None:
        return
    flush = cache_flush()
    print("\n== panel_linear against the other product forms (us, best of 7; cold: caches flushed before each "
          "call) ==")
    print("| layer (in -> out) | rows | x W_t | W x^T | oneDNN | row blocks | panel_linear | best other / panel "
          "| cold: best other | cold: panel | cold: best other / panel |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for d_in, d_out, w, b in layer_weights():
        dense = _Dense(w, b, "decoder", module)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 32) if torch.backends.mkldnn.is_available() else None
        blocks = w.view(2, d_out // 2, d_in), b.view(2, -1, 1)
        for rows in (1, 2, 4, 8, 16, 32, 64):
            x = torch.randn(rows, d_in)
            forms = {
                "x W_t": lambda: torch.addmm(b, x, dense.weight_t),
                "W x^T": lambda: torch.addmm(dense.bias_col, w, x.t()).t(),
                "oneDNN": (lambda: torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], ""))
                if packed is not None else None,
                "blocks": (lambda: torch.baddbmm(blocks[1], blocks[0], x.t().expand(2, -1, 1)).view(1, -1))
                if rows == 1 else None,
                "panel": lambda: module.panel_linear(x, dense.panels, dense.bias_panels, d_out),
            }
            forms = {k: f for k, f in forms.items() if f is not None}
            ref = forms["x W_t"]()
            for fn in forms.values():
                torch.testing.assert_close(fn(), ref, rtol=1e-4, atol=1e-4)
            warm = {k: best_seconds(fn, max(5, int(400 / rows))) * 1e6 for k, fn in forms.items()}
            cold = {k: cold_us(fn, flush) for k, fn in forms.items()}
            other, other_cold = (min(v for k, v in t.items() if k != "panel") for t in (warm, cold))
            cell = lambda k: f"{warm[k]:.1f}" if k in warm else "-"  # noqa: E731
            print(f"| {d_in} -> {d_out} | {rows} | {cell('x W_t')} | {cell('W x^T')} | {cell('oneDNN')} "
                  f"| {cell('blocks')} "
                  f"| {warm['panel']:.1f} | {other / warm['panel']:.2f}x | {other_cold:.1f} | {cold['panel']:.1f} "
                  f"| {other_cold / cold['panel']:.2f}x |", flush=True)


def run_int8_panels() -> None:
    """The int8 product of ``--quantize int8`` (``panel_linear_w8a8``; session 9: int8 weights with float32
    activations) against panel_linear with the same weights in float32 and against PyTorch's dynamic int8
    Linear (fbgemm), warm and cold."""
    import warnings

    from transformer.model.frozen import _Dense, _Int8Panels
    from transformer.model.quantize import w8a8_row_rounding

    module = compiled_extension("int8 panels")
    if module is None:
        return
    flush = cache_flush()
    print("\n== panel_linear_w8a8 against float32 panel_linear (same weights Q * s) and dynamic int8 (fbgemm), "
          "us, best of 7; cold: caches flushed before each call ==")
    print("| layer (in -> out) | rows | float32 panels | dynamic int8 | w8a8 | float32 / w8a8 | dynamic / w8a8 "
          "| cold: float32 panels | cold: dynamic int8 | cold: w8a8 | cold: float32 / w8a8 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for d_in, d_out, w, b in layer_weights():
        scale = w.abs().amax(1) / 127  # (out,) per-channel, symmetric
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # quantized tensors' deprecation notice
            w_q = torch.quantize_per_channel(w, scale.double(), torch.zeros(d_out, dtype=torch.long), 0, torch.qint8)
        int8 = _Int8Panels(w_q, b, module)
        dense = _Dense(int8.float_weight(), b, "decoder", module)
        packed = torch.ops.quantized.linear_prepack(w_q, b)
        for rows in (1, 2, 4, 8, 16, 32, 64, 256, 1024):
            x = torch.randn(rows, d_in)
            forms = {
                "float32": lambda: module.panel_linear(x, dense.panels, dense.bias_panels, d_out),
                "dynamic": lambda: torch.ops.quantized.linear_dynamic(x, packed, reduce_range=True),
                "int8": lambda: int8(x),
            }
            u, z, sx = w8a8_row_rounding(x)  # each row as w8a8 rounds it: x ~ sx (u - z)
            rounded = ((u - z) * sx).float()
            expected = module.panel_linear(rounded, dense.panels, dense.bias_panels, d_out)
            torch.testing.assert_close(forms["int8"](), expected, rtol=1e-4, atol=1e-4)  # same weights and inputs
            warm = {k: best_seconds(fn, max(2, int(400 / rows))) * 1e6 for k, fn in forms.items()}
            cold = {k: cold_us(fn, flush) for k, fn in forms.items()}
            print(f"| {d_in} -> {d_out} | {rows} | {warm['float32']:.1f} | {warm['dynamic']:.1f} | {warm['int8']:.1f} "
                  f"| {warm['float32'] / warm['int8']:.2f}x | {warm['dynamic'] / warm['int8']:.2f}x "
                  f"| {cold['float32']:.1f} | {cold['dynamic']:.1f} "
                  f"| {cold['int8']:.1f} | {cold['float32'] / cold['int8']:.2f}x |", flush=True)


@torch.inference_mode()
def run_attention() -> None:
    """Session 9: attend_one against ATen's SDPA, per call and in whole decoder steps."""
    from transformer.config import preset
    from transformer.model import Transformer
    from transformer.model.frozen import _compiled_step, freeze

    module = compiled_extension("attention")
    if module is None:
        return
    sdpa = torch.nn.functional.scaled_dot_product_attention
    heads, dh = 4, 64
    print("\n== one query per row and head (H=4, Dh=64), keys of a KV buffer (20 of 64 positions), us: ATen's SDPA "
          "against attend_one; self-attention (no mask) and cross-attention (15 source positions, a padding mask) ==")
    print("| rows | self: SDPA | self: attend_one | speed-up | cross: SDPA | cross: attend_one | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    torch.manual_seed(0)
    for rows in (1, 4, 32, 128):
        q = torch.randn(rows, 1, 3, heads, dh).permute(2, 0, 3, 1, 4)[0]  # (N,H,1,Dh), as the q/k/v split
        k, v = (torch.randn(rows, heads, 64, dh)[:, :, :20] for _ in range(2))  # (N,H,20,Dh) views
        ck, cv = torch.randn(rows, heads, 15, dh), torch.randn(rows, heads, 15, dh)
        mask = torch.ones(rows, 1, 1, 15, dtype=torch.bool)
        mask[::2, ..., 11:] = False
        forms = {
            "self sdpa": lambda: sdpa(q, k, v).transpose(1, 2).reshape(rows, -1),
            "self": lambda: module.attend_one(q, k, v),
            "cross sdpa": lambda: sdpa(q, ck, cv, attn_mask=mask).transpose(1, 2).reshape(rows, -1),
            "cross": lambda: module.attend_one(q, ck, cv, mask),
        }
        torch.testing.assert_close(forms["self"](), forms["self sdpa"](), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(forms["cross"](), forms["cross sdpa"](), rtol=1e-5, atol=1e-5)
        us = {name: best_seconds(fn, max(10, int(2000 / rows))) * 1e6 for name, fn in forms.items()}
        print(f"| {rows} | {us['self sdpa']:.1f} | {us['self']:.1f} | {us['self sdpa'] / us['self']:.2f}x "
              f"| {us['cross sdpa']:.1f} | {us['cross']:.1f} | {us['cross sdpa'] / us['cross']:.2f}x |", flush=True)

    model = Transformer(preset("small"), 8000, 8000).eval()
    with_attend, without = freeze(model), freeze(model)
    for layer in without.decoder.layers:
        layer.attend = None
    without.decoder.native = _compiled_step(without.decoder, model, module)  # its step with ATen's SDPA
    print("\n== one compiled decoder step, `small` (D=256, 3 decoder layers, V=8000), 20 positions cached, "
          "15 source tokens: with ATen's SDPA against attend_one (ms) ==")
    print("| rows | SDPA | attend_one | speed-up |")
    print("|---:|---:|---:|---:|")
    for rows in (1, 4, 32, 128):
        src, prefix = torch.randint(4, 8000, (rows, 15)), torch.randint(4, 8000, (rows, 20))
        token = torch.randint(4, 8000, (rows, 1))
        times = []
        for m in (without, with_attend):
            enc = m.encode(src)
            cache = m.new_cache()
            m.decode(prefix, enc, cache)

            def step(m=m, enc=enc, cache=cache):
                m.decode(token, enc, cache)
                for layer in cache.layers:  # back to 20 positions: every timed step is the same step
                    layer.self_attn.length = 20

            times.append(best_seconds(step, max(5, int(200 / rows))))
        print(f"| {rows} | {times[0] * 1e3:.2f} | {times[1] * 1e3:.2f} | {times[0] / times[1]:.2f}x |", flush=True)


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


def run_train_attention() -> None:
    """Session 19: training's attention on the CPU, the extension's kernel (attention.attention) against ATen's
    flash attention (scaled_dot_product_attention), forward and forward + backward, at B x T = 1024 tokens."""
    from transformer.model.attention import attention, flash_attention

    if compiled_extension("train-attention") is None:
        return
    print("\n== training attention, q/k/v (B, H, T, 64) as views of the projections' (B, T, H, 64), T = S, "
          "1024 tokens a batch, ms: flash attention (SDPA) against the extension's kernel ==")
    print("| B x H x T | mask | forward: flash | forward: kernel | speed-up | fwd + bwd: flash | fwd + bwd: kernel "
          "| speed-up |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    torch.manual_seed(0)
    from transformer.model.attention import SHORT_MAX_LENGTH

    for batch, heads, length in ((64, 4, 16), (32, 4, 32), (32, 8, 32), (16, 4, 64), (8, 4, 128), (4, 4, 256),
                                 (2, 4, 512)):
        for mask_name in ("none", "causal", "keys"):
            q, k, v = (torch.randn(batch, length, heads, 64).transpose(1, 2).requires_grad_() for _ in range(3))
            grad = torch.randn(batch, heads, length, 64)
            causal = mask_name == "causal"
            mask = None
            if mask_name == "keys":  # padded sentences: lengths from half to all of T
                lengths = torch.randint(length // 2, length + 1, (batch,))
                mask = (torch.arange(length)[None, :] < lengths[:, None])[:, None, None, :]

            def forward():
                return attention(q, k, v, attn_mask=mask, is_causal=causal)

            def both():
                torch.autograd.grad(forward(), (q, k, v), grad)

            ms = []
            for fn in (forward, both):
                with flash_attention():
                    ms.append(best_seconds(fn, 10) * 1e3)
                ms.append(best_seconds(fn, 10) * 1e3)
            note = "" if length <= SHORT_MAX_LENGTH else " (above SHORT_MAX_LENGTH: attention() takes flash there too)"
            print(f"| {batch} x {heads} x {length}{note} | {mask_name} | {ms[0]:.3f} | {ms[1]:.3f} | {ms[0] / ms[1]:.2f}x "
                  f"| {ms[2]:.3f} | {ms[3]:.3f} | {ms[2] / ms[3]:.2f}x |", flush=True)


@torch.no_grad()
def run_cpu_levels() -> None:
    """Session 27: the kernels with AVX-512 forms at each instruction level this CPU has, same inputs."""
    import warnings

    from transformer.model.frozen import _Dense, _Int8Panels

    module = compiled_extension("cpu-levels")
    if module is None:
        return
    top = module.cpu_level()
    levels = list(range(2, top + 1))
    names = {2: "AVX2", 3: "AVX-512", 4: "AVX-512 VNNI"}
    cases = []  # (kernel, shape text, fn)
    torch.manual_seed(0)
    for d_in, d_out, w, b in layer_weights():
        dense = _Dense(w, b, "decoder", module)
        scale = w.abs().amax(1).clamp_min(1e-8) / 127
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # quantized tensors' deprecation notice
            w_q = torch.quantize_per_channel(w, scale.double(), torch.zeros(d_out, dtype=torch.long), 0, torch.qint8)
        int8 = _Int8Panels(w_q, b, module)
        for rows in (1, 8, 32, 128):
            x = torch.randn(rows, d_in)
            cases.append(("panel_linear", f"{rows} x {d_in} -> {d_out}", lambda x=x, d=dense: d(x)))
            cases.append(("panel_linear_w8a8", f"{rows} x {d_in} -> {d_out}", lambda x=x, q=int8: q(x)))
    for batch, heads, length in ((32, 4, 32), (16, 4, 64), (8, 8, 128)):
        q, k, v = (torch.randn(batch, length, heads, 64).transpose(1, 2) for _ in range(3))
        grad = torch.randn(batch, heads, length, 64)
        for causal in (False, True):
            def attend(q=q, k=k, v=v, grad=grad, causal=causal):
                out, probs = module.attention_forward(q, k, v, None, causal, 0.125)
                return (out, *module.attention_backward(grad, q, k, v, probs, causal, 0.125))
            cases.append(("attention fwd + bwd", f"{batch} x {heads} x {length}{', causal' if causal else ''}",
                          attend))
    logits = torch.randn(1024, 8000) * 4
    cases.append(("exp_rows_ (loss)", "1024 x 8000", lambda: (lambda z: (z, module.exp_rows_(z)))(logits.clone())))
    cases.append(("clone (exp_rows_'s copy)", "1024 x 8000", lambda: logits.clone()))
    scores = torch.randn(32, 4)
    cases.append(("step_candidates", "128 x 8000, beam 4", lambda: module.step_candidates(logits[:128], scores, 8,
                                                                                         [0, 1], 0)))
    print(f"\n== the kernels at each instruction level this CPU has ({', '.join(names[lv] for lv in levels)}), "
          "us, best of 7; outputs equal across levels ==")
    print("| kernel | shape | " + " | ".join(names[lv] for lv in levels) + " | " +
          " | ".join(f"{names[lv]} speed-up" for lv in levels[1:]) + " |")
    print("|---|---|" + "---:|" * (2 * len(levels) - 1))
    try:
        for kernel, shape, fn in cases:
            us, outs = [], []
            for level in levels:
                module.set_cpu_level(level)
                result = fn()
                outs.append([t.clone() for t in (result if isinstance(result, (tuple, list)) else (result,))])
                us.append(best_seconds(fn, 20 if "x 8000" in shape or "attention" in kernel else 200) * 1e6)
            for other in outs[1:]:
                assert all(torch.equal(a, c) for a, c in zip(outs[0], other)), (kernel, shape)
            print(f"| {kernel} | {shape} | " + " | ".join(f"{u:.1f}" for u in us) + " | " +
                  " | ".join(f"{us[0] / u:.2f}x" for u in us[1:]) + " |", flush=True)
    finally:
        module.set_cpu_level(top)  # the level before (TRANSFORMER_CPU_LEVEL may have capped it)


# each part's runner, in the order they run; the ones without options ignore args
PARTS = {
    "projection": lambda args: run_projection(),
    "collate": run_collate,
    "frozen": lambda args: run_frozen(),
    "overhead": lambda args: run_overhead(),
    "roles": run_roles,
    "compile": lambda args: run_compile(),
    "int8": lambda args: run_int8(),
    "panels": lambda args: run_panels(),
    "int8-panels": lambda args: run_int8_panels(),
    "attention": lambda args: run_attention(),
    "train-attention": lambda args: run_train_attention(),
    "cpu-levels": lambda args: run_cpu_levels(),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own, = cores)")
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--work-dir", default="/tmp/transformer_bench", help="tokenizer cache (outside the repo)")
    args = parser.parse_args()
    setup_device("cpu", args.threads)
    print(f"machine: {describe_machine(machine_info('cpu'))}; command: {' '.join(sys.argv)}")
    parts = args.parts.split(",")
    for name, run in PARTS.items():
        if name in parts:
            run(args)


if __name__ == "__main__":
    main()
