"""A trained model frozen for fast decoding: the same maths, laid out for one decoder step at a time.

``freeze(model)`` turns a :class:`~transformer.model.Transformer` or :class:`~transformer.model.TransformerLM`
in eval mode (float, or int8 from :func:`transformer.model.quantize.quantize`) into an inference-only object
with the protocol the searches use (``encode`` / ``new_cache`` / ``decode``, and ``cfg``), so greedy, beam
search and sampling run on it unchanged. It computes what the model computes (tested against it); what
changes is how a decoder step is carried out, which at small batches is dominated by per-call overhead
and by reading the weights, not by arithmetic (BENCHMARKS.md, "Where our time goes"):

* The step is a flat sequence of ``torch`` calls on (rows, D) matrices: no ``nn.Module`` dispatch, no
  dropout or mode checks, no reshapes beyond the head split that attention needs.
* Self-attention's q, k and v projections are one (D, 3D) product per layer and step instead of three;
  cross-attention's keys and values of *all* layers are one (D, L*2D) product over the source, once per
  sentence.
* Each product takes the form that is fastest for its number of rows (see :class:`_Dense`): at one row, row
  blocks of the weight multiplied in parallel (MKL runs a one-row product on one thread); in a decoder step
  from 2 to 63 rows, MKL's transposed product; and oneDNN's pre-packed weight (``mkldnn`` linear, as
  inductor's freezing does) for the output projection (the largest product of a step) from two rows on,
  1.2-3.7x faster than MKL on the benchmark CPU, for the encoder from two rows, and for the decoder from 64
  (``benchmarks/bench_micro.py --parts frozen``).
* On the CPU, once ``transformer build-native`` has compiled it (:mod:`transformer.model.native`), a step of
  one new position runs in C++ (``csrc/decoder_step.cpp``), from the token embedding to the logits: the same
  calls in the same order, bit for bit the Python step's results, without the interpreter between them.
  The same build brings ``panel_linear``, a product for few rows (AVX2 and FMA, AVX-512 where the CPU has
  it: the same bits) by the weight cut into
  column panels that are each one sequential stream of memory; it replaces the forms above for the
  decoder's, the encoder's and the output projection's products up to ``PANEL_ROWS`` (256) rows (1.1-2.9x
  faster products, 1.25-1.4x faster decoder steps from 1 to 64 rows on the benchmark CPU: ``bench_micro.py
  --parts panels``, ``bench_step.py``; on an Intel CPU with AVX-512 the decoder's and the output's stop at 32
  rows, from where MKL's products win: :data:`INTEL_AVX512_PANEL_ROWS`). It also brings ``attend_one``, a step's
  attention of one new position (one query per row and head over a few dozen keys, AVX2), which reads keys
  through row indices: the beams
  of a sentence share its source's cross-attention keys (:class:`FrozenEncoderOut`), and the self-attention
  history is reordered by a table of rows instead of copies (:class:`IndexedKV`); and ``step_candidates``,
  which a search uses for a step's log-softmax and best continuations (:mod:`transformer.decoding.common`).
  Since session 12 it also brings ``add_layer_norm`` (LayerNorm of a residual sum in one pass, for every
  frozen LayerNorm: ATen's add and layer_norm cost more in calls than in arithmetic at a step's few rows),
  ReLU in the products' epilogue, ``attend_spans`` (the encoder's self-attention over its real tokens only,
  each over its own sentence's: no padded layout) and ``source_heads`` (the cross-attention keys and values
  laid out per head in one pass). Since session 23 greedy search's whole loop runs there too where the
  compiled step computes the logits (:meth:`FrozenTransformer.compiled_greedy`, ``DecoderStep.greedy``: the
  same calls as :func:`~transformer.decoding.greedy.greedy_search`'s Python loop, the same tokens and scores),
  and since session 28 beam search's (:meth:`FrozenTransformer.compiled_beam`, ``DecoderStep.beam``: the same
  hypotheses and scores as :func:`~transformer.decoding.beam.beam_search`'s Python loop).
  ``freeze(model, native=False)`` keeps the Python step and the forms above.
* An int8 model keeps its int8 weights (per-channel scales, from :func:`transformer.model.quantize.quantize`);
  the fused q/k/v and cross k/v matrices are built by concatenating the int8 rows and their scales, which is
  exactly what quantising the fused float matrix per channel would give. Where the compiled extension is
  built, every int8 product (the output projection's too) runs in its ``panel_linear_w8a8``
  (:class:`_Int8Panels`: int8 weights, each activation row rounded to 7-bit unsigned values with its own
  scale and zero point, integer arithmetic, at every number of rows), in the Python step and the compiled
  step alike; without it, in PyTorch's fbgemm dynamic product (:class:`_Int8`, which rounds the whole batch
  with one scale).

On a GPU the products are cuBLAS's ``F.linear`` by the (fused) weights, and by default the decoder step runs on
a static KV cache replayed as CUDA graphs (:mod:`transformer.model.static`; ``freeze(model, graphs=False)``
launches it from Python instead).

The encoder is frozen the same way and, like CTranslate2's, skips padding in its position-wise parts;
``encode`` also computes every decoder layer's cross-attention keys and values, once per source (beam
search then gives them to the beams, by index where ``attend_one`` reads them, else by copies, instead of
projecting the source once per beam). The KV cache is the model's :class:`~transformer.model.DecoderCache`
(with :class:`IndexedKV` histories where ``attend_one`` reads them), so searches reorder it as before.

Shapes: B batch, T new target positions, S source length, D model width, H heads, Dh = D / H, V vocabulary,
N = B*T rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transformer.data.vocab import BOS_ID, EOS_ID, PAD_ID
from transformer.errors import TransformerError
from transformer.model.attention import KVCache
from transformer.model.embeddings import check_positions
from transformer.model.layers import LayerCache
from transformer.model.static import StaticCache, StaticDecoder
from transformer.model.transformer import (
    DecoderCache, EncoderOut, Transformer, TransformerLM, self_attention_mask,
)


# --- linear maps in the layout that decoding wants ----------------------------------------------------


def _is_int8(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torch.ao.nn.quantized")


def _onednn_available(weight: Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class _Dense:
    """``x @ W^T + b`` for x (N, in) -> (N, out), by the product that is fastest for N on the CPU:

    * one row, with several threads (the layers' products): ``W x^T + b`` as a batched product of ``threads``
      row blocks of ``W`` (``baddbmm``), which runs the blocks in parallel where MKL runs a one-row product on
      one thread: a 1.08x faster decoder step at one row on 2 threads (reading the weights is the cost);
    * one row otherwise: MKL's ``addmm(b, x, W_t)`` by the contiguous (in, out) transpose;
    * 2 to ``COLUMN_ROWS[role]`` rows: the transposed product ``(W x^T + b)^T`` by the contiguous (out, in)
      ``W``; MKL runs this shape faster than ``x W_t`` (a 1.28x faster decoder step at 4 rows, 1.10x at 32;
      it returns a transposed view);
    * from ``PACKED_FROM_ROWS[role]`` rows (float32 on a CPU with oneDNN): oneDNN's linear by its pre-packed
      ``W``. It costs 60-80 us a call whatever the size, so it pays for the (D, V) output projection from two
      rows (1.2-3.7x faster than MKL), for the encoder's products, which run on all of a batch's source
      tokens at once (a 1.05-1.17x faster encoder from 1 to 128 sentences), and for the decoder's products
      from 64 rows (beam search over many sentences), but not for a decoder step's few rows.
    * otherwise (no oneDNN), ``addmm(b, x, W_t)``;
    * but first, from 1 to ``PANEL_ROWS[role]`` rows, when the compiled extension is built
      (:mod:`transformer.model.native`, a CPU with AVX2 and FMA; AVX-512 forms where it has them): its
      ``panel_linear``, by ``W^T`` cut into
      column panels of 16 that are each one sequential stream of memory (see ``csrc/decoder_step.cpp``).

    ``role`` ("encoder", "decoder" or "output") picks the thresholds; they were measured on the benchmark
    CPU in ``benchmarks/bench_micro.py --parts frozen,roles,panels``. The two MKL layouts, oneDNN's and the
    panels are up to four copies of ``W``. ``native``: the compiled extension's module, or None.
    """

    def __init__(self, weight: Tensor, bias: Optional[Tensor], role: str = "decoder",
                 native: Optional[Any] = None) -> None:
        weight = weight.detach()  # (out, in)
        self.weight = weight.contiguous()  # (out, in)
        self.bias = bias.detach() if bias is not None else None  # (out,)
        self.cpu = weight.device.type == "cpu"
        if not self.cpu:  # a GPU: F.linear (cuBLAS) by the model's own weight, no copies
            return
        self.role = role
        self.weight_t = weight.t().contiguous()  # (in, out)
        self.bias_col = self.bias[:, None] if self.bias is not None else None  # (out, 1)
        self.packed = None
        if _onednn_available(weight):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 32)  # oneDNN's blocked layout
        out, d_in = weight.shape
        blocks = torch.get_num_threads()  # the threads at freezing time
        self.blocks = None
        if role != "output" and blocks > 1 and out % blocks == 0:
            self.blocks = (self.weight.view(blocks, out // blocks, d_in),  # views of W and b, no copies
                           (self.bias if self.bias is not None else weight.new_zeros(out)).view(blocks, -1, 1))
        self.native = self.panels = self.bias_panels = None
        if (native is not None and PANEL_ROWS.get(role, 0) > 0 and weight.dtype == torch.float32
                and native.panels_supported()):
            self.panels = _column_panels(weight)  # (P, in, 16)
            self.bias_panels = _padded(self.bias, out)  # (P*16,)
            self.native = native

    def __call__(self, x: Tensor, relu: bool = False) -> Tensor:
        """x (N, in) -> (N, out), possibly a transposed view; then ReLU where ``relu`` (in the product's
        epilogue where it has one: the panels, oneDNN)."""
        if not self.cpu:
            y = F.linear(x, self.weight, self.bias)
            return F.relu(y) if relu else y
        rows = x.size(0)
        if self.panels is not None and rows <= PANEL_ROWS[self.role]:
            return self.native.panel_linear(x, self.panels, self.bias_panels, self.weight.size(0), relu)
        if self.packed is not None and rows >= PACKED_FROM_ROWS[self.role]:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "relu" if relu else "none", [], "")
        if rows == 1 and self.blocks is not None:
            weight, bias = self.blocks  # (P, out/P, in), (P, out/P, 1)
            y = torch.baddbmm(bias, weight, x.t().expand(weight.size(0), -1, 1)).view(1, -1)  # (P,out/P,1) -> (1,out)
        elif 2 <= rows <= COLUMN_ROWS[self.role]:
            y = (torch.mm(self.weight, x.t()) if self.bias is None
                 else torch.addmm(self.bias_col, self.weight, x.t())).t()  # (out, N) -> (N, out)
        else:
            y = torch.mm(x, self.weight_t) if self.bias is None else torch.addmm(self.bias, x, self.weight_t)
        return F.relu(y) if relu else y


class _Int8:
    """PyTorch's dynamic int8 product (what ``torch.ao.nn.quantized.dynamic.Linear`` calls)."""

    def __init__(self, weight_q: Tensor, bias: Optional[Tensor]) -> None:  # weight_q (out, in) qint8 per channel
        self.packed = torch.ops.quantized.linear_prepack(weight_q, bias)

    def __call__(self, x: Tensor, relu: bool = False) -> Tensor:  # (N, in) -> (N, out)
        y = torch.ops.quantized.linear_dynamic(x, self.packed, reduce_range=True)
        return F.relu(y) if relu else y


class _Int8Panels:
    """An int8 map on the compiled extension: each row of x is rounded with its own scale sx and zero point z
    to 7-bit unsigned values u (x ~ sx (u - z); the row's range widened to hold 0), multiplied by the int8
    weight Q (out, in) in integer arithmetic with exact int32 sums, and each sum ends as
    ``(sum - z colsum(Q)) * sx * s + b`` (s: the per-channel weight scales), by ``panel_linear_w8a8`` at every
    number of rows. A row's result depends on that row alone (PyTorch's dynamic int8 product, which runs
    without the extension (:class:`_Int8`), rounds the whole batch with one scale, to 7 bits too; CTranslate2
    rounds each row symmetrically to 8 bits). The weight is stored as "quad panels" (:func:`_quad_panels`)."""

    def __init__(self, weight_q: Tensor, bias: Optional[Tensor], native: Any) -> None:  # weight_q (out, in) qint8
        q = weight_q.int_repr()  # (out, in) int8
        out = q.size(0)
        self.in_features = q.size(1)
        self.quad_panels = _quad_panels(q)  # (P, ceil(in / 4), 64) int8
        self.scales = _padded(weight_q.q_per_channel_scales().float(), out)  # (P*16,)
        self.colsums = _padded(q.sum(1, dtype=torch.int32), out, torch.int32)  # (P*16,) each column's sum of Q
        self.bias = bias.detach().float() if bias is not None else torch.zeros(out)  # (out,)
        self.bias_panels = _padded(self.bias, out)  # (P*16,)
        self.native = native

    def __call__(self, x: Tensor, relu: bool = False) -> Tensor:  # (N, in) -> (N, out), then ReLU where ``relu``
        return self.native.panel_linear_w8a8(x, self.quad_panels, self.colsums, self.scales, self.bias_panels,
                                             self.bias.size(0), relu)

    def int8_weight(self) -> Tensor:
        """The int8 weight Q (out, in) that the quad panels hold."""
        p, groups, _ = self.quad_panels.shape
        q = self.quad_panels.view(p, groups, PANEL_WIDTH, 4).permute(0, 2, 1, 3).reshape(p * PANEL_WIDTH, groups * 4)
        return q[: self.bias.size(0), : self.in_features]

    def float_weight(self) -> Tensor:
        """The float32 weight ``Q * s`` (out, in) that this map multiplies the rounded activations by."""
        return self.int8_weight().float() * self.scales[: self.bias.size(0), None]


def _quad_panels(q: Tensor) -> Tensor:
    """An int8 weight (out, in) -> P = ceil(out / 16) panels of ceil(in / 4) groups of 64 bytes (P, G, 64):
    group g of panel j holds ``q[16j + c, 4g + i]`` at ``4c + i`` (zeros past ``out`` and ``in``): one 32-byte
    load is 8 output columns by 4 consecutive inputs, the operand of ``csrc/decoder_step.cpp``'s int8 tiles."""
    out, d_in = q.shape
    p, groups = -(-out // PANEL_WIDTH), -(-d_in // 4)
    padded = q.new_zeros(p * PANEL_WIDTH, groups * 4)
    padded[:out, :d_in] = q
    return padded.view(p, PANEL_WIDTH, groups, 4).permute(0, 2, 1, 3).reshape(p, groups, 4 * PANEL_WIDTH).contiguous()


def _column_panels(weight: Tensor) -> Tensor:
    """``weight`` (out, in) float32 -> ``weight^T`` as P = ceil(out / 16) column panels (P, in, 16),
    each one contiguous block, zeros past ``out`` (the layout of ``csrc/decoder_step.cpp``)."""
    out, d_in = weight.shape
    n_panels = -(-out // PANEL_WIDTH)
    panels = weight.new_zeros(d_in, n_panels * PANEL_WIDTH)
    panels[:, :out] = weight.t()
    return panels.view(d_in, n_panels, PANEL_WIDTH).transpose(0, 1).contiguous()


def _padded(vector: Optional[Tensor], out: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """An (out,) vector (zeros for None) padded with zeros to the panels' P * 16 columns, as ``dtype``."""
    padded = torch.zeros(-(-out // PANEL_WIDTH) * PANEL_WIDTH, dtype=dtype)
    if vector is not None:
        padded[:out] = vector
    return padded


def _int8_panels_fit(weight_q: Tensor, native: Optional[Any]) -> bool:
    """Whether ``weight_q`` can run as :class:`_Int8Panels`: the extension is built and runs on this CPU, and
    the weight is per-channel symmetric (zero points 0, as :func:`transformer.model.quantize.quantize` makes)."""
    return (native is not None and native.panels_supported()
            and weight_q.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric)
            and not bool(weight_q.q_per_channel_zero_points().any()))


def _weight_and_bias(linears: list[nn.Module]) -> tuple[Tensor, Optional[Tensor], bool]:
    """The weights of ``linears`` (each (out_i, in)) stacked along the output dim, and their biases;
    int8 modules give a per-channel qint8 weight. Returns (weight, bias or None, is_int8)."""
    int8 = [_is_int8(m) for m in linears]
    if any(int8) and not all(int8):
        raise TransformerError("cannot freeze a model whose Linear layers are partly quantised")
    biases = [m.bias() if int8[0] else m.bias for m in linears]
    bias = None if any(b is None for b in biases) else torch.cat([b.detach() for b in biases])
    if not int8[0]:
        return torch.cat([m.weight.detach() for m in linears]), bias, False
    weights = [m.weight() for m in linears]  # qint8
    if len(weights) == 1:
        return weights[0], bias, True
    if any(w.qscheme() not in (torch.per_channel_affine, torch.per_channel_symmetric) for w in weights):
        raise TransformerError("freezing an int8 model needs per-channel weight scales (transformer.model.quantize)")
    weight = torch._make_per_channel_quantized_tensor(
        torch.cat([w.int_repr() for w in weights]),
        torch.cat([w.q_per_channel_scales() for w in weights]).double(),
        torch.cat([w.q_per_channel_zero_points() for w in weights]).long(),
        0,
    )
    return weight, bias, True


# See _Dense, by role: from PACKED_FROM_ROWS rows a product runs in oneDNN (a decoder step's products stay in
# MKL below 64 rows: oneDNN's fixed cost loses at the few rows decoding uses most); from 2 to COLUMN_ROWS rows
# (below PACKED_FROM_ROWS, or on a CPU without oneDNN) MKL computes the transposed product.
PACKED_FROM_ROWS = {"output": 2, "encoder": 2, "decoder": 64}
COLUMN_ROWS = {"output": 16, "encoder": 16, "decoder": 63}  # output, encoder: only without oneDNN
# From 1 to PANEL_ROWS rows, a product runs in the compiled extension's panel_linear where it is built (the output
# projection too since session 10: 1.1-1.9x the best other form at 4-64 rows, bench_micro.py --parts panels).
PANEL_ROWS = {"output": 256, "encoder": 256, "decoder": 256}
PANEL_WIDTH = 16  # output columns per panel (csrc/decoder_step.cpp: kPanel)
# On an Intel CPU where the kernels take their AVX-512 forms (session 28's Xeon), MKL's products beat panel_linear
# from about 32 rows of a decoder step (bench_micro.py --parts panels), and beam search over 32 sentences (128 rows
# a step) ran faster with MKL's above 32 rows (median of 10 passes, 1 and 2 threads, the same outputs; ad hoc,
# and bench_inference.py's beam 4 at batch 32 in BENCHMARKS.md session 28): there the decoder's and the output's
# panels stop at 32 rows, and the decoder's products stay in MKL above (no oneDNN), so that the compiled step,
# which has MKL's forms but not oneDNN's, takes every row count.
# _tune_for_cpu applies it once, when the extension first loads.
INTEL_AVX512_PANEL_ROWS = 32
_TUNED: list[bool] = []


def _tune_for_cpu(module: Any) -> None:
    """The thresholds above for this CPU, once per process (see INTEL_AVX512_PANEL_ROWS)."""
    if _TUNED:
        return
    _TUNED.append(True)
    if module.cpu_level() >= 3 and module.cpu_is_intel():
        PANEL_ROWS.update(decoder=INTEL_AVX512_PANEL_ROWS, output=INTEL_AVX512_PANEL_ROWS)
        PACKED_FROM_ROWS["decoder"] = 1 << 30


def _linear(*linears: nn.Module, role: str = "decoder", native: Optional[Any] = None) -> Any:
    """One map computing ``linears`` side by side: x (N, in) -> (N, sum of their outputs); ``role`` picks
    the product's thresholds and ``native`` is the compiled extension or None (see :class:`_Dense`)."""
    weight, bias, int8 = _weight_and_bias(list(linears))
    if int8:
        return _Int8Panels(weight, bias, native) if _int8_panels_fit(weight, native) else _Int8(weight, bias)
    return _Dense(weight, bias, role, native)


def _layer_norm(norm: nn.LayerNorm) -> tuple:
    return (norm.normalized_shape, norm.weight.detach(), norm.bias.detach(), norm.eps)


def _norm_kernel(native: Optional[Any]) -> Optional[Any]:
    """The extension's ``add_layer_norm`` (LayerNorm of a residual sum in one pass, AVX2; the compiled step's
    LayerNorms) where it runs on this CPU, else None (ATen's add and layer_norm)."""
    return native.add_layer_norm if native is not None and native.panels_supported() else None


def _norm(kernel: Optional[Any], x: Tensor, norm: tuple, residual: Optional[Tensor] = None) -> Tensor:
    """LayerNorm(x + residual) (N,D) -> (N,D) with ``norm`` from :func:`_layer_norm`, by ``kernel`` (from
    :func:`_norm_kernel`) or ATen."""
    if kernel is not None:
        return kernel(x, residual, norm[1], norm[2], norm[3])
    return F.layer_norm(x if residual is None else x + residual, *norm)


# --- the decoder step ---------------------------------------------------------------------------------


class IndexedKV(KVCache):
    """A self-attention history whose ``reorder`` moves row indices, not keys (FasterTransformer's cache
    indirection): position j of row n lies in buffer row ``rows[n, j]``. Beam search reorders its rows at
    every step; with :class:`KVCache` that copies every row's keys and values, here a (N, length) table of
    indices. Each step writes its keys/values at buffer rows 0..N-1 of its own new position, which no row
    reads yet, so nothing written is overwritten while a row still reads it.

    Read by ``attend_one`` (:meth:`update_indexed`); :meth:`update` gathers the rows' keys/values for ATen's
    attention (a step of several positions: a prompt, a forced prefix). The frozen decoder uses it where its
    layers have ``attend_one``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.rows: Optional[Tensor] = None  # (N, capacity) long

    def reserve(self, t_new: int, like: Tensor) -> None:
        """Room for ``t_new`` more positions of ``like.size(0)`` rows (buffers of at least that many rows)."""
        n = like.size(0)
        if self.k is None:
            super().reserve(t_new, like)
            self.rows = torch.zeros(n, self.k.size(2), dtype=torch.long, device=like.device)
            return
        if self.length + t_new > self.k.size(2):
            super().reserve(t_new, like)
            grown = self.rows.new_zeros(self.rows.size(0), self.k.size(2))
            grown[:, : self.length] = self.rows[:, : self.length]
            self.rows = grown
        if n > self.k.size(0):  # more rows than the buffers hold (beam search's expansion after its first step)
            k = self.k.new_empty(n, *self.k.shape[1:])
            v = self.v.new_empty(k.shape)
            k[: self.k.size(0), :, : self.length] = self.k[:, :, : self.length]
            v[: self.v.size(0), :, : self.length] = self.v[:, :, : self.length]
            self.k, self.v = k, v

    def claim(self, t_new: int, like: Tensor) -> Tensor:
        """Room for ``t_new`` more positions of ``like.size(0)`` = N rows, their keys/values to go to buffer
        rows 0..N-1 -> the rows' table with them (N, length + t_new); ``length`` is left to the writer."""
        n = like.size(0)
        self.reserve(t_new, like)
        self.rows[:, self.length : self.length + t_new] = torch.arange(n, device=like.device)[:, None]
        return self.rows[:, : self.length + t_new]

    def update_indexed(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Append k, v (N,H,T,Dh) -> the buffers' first ``length`` positions (M,H,length,Dh) and the rows'
        table (N,length): what ``attend_one`` takes."""
        n, t = k.size(0), k.size(2)
        self.claim(t, k)
        self.k[:n, :, self.length : self.length + t] = k
        self.v[:n, :, self.length : self.length + t] = v
        self.length += t
        return self.k[:, :, : self.length], self.v[:, :, : self.length], self.rows[:, : self.length]

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append k, v (N,H,T,Dh) -> every row's keys and values so far, gathered (N,H,length,Dh)."""
        keys, values, rows = self.update_indexed(k, v)
        position = torch.arange(self.length, device=k.device)  # (L,)
        return keys[rows, :, position].transpose(1, 2), values[rows, :, position].transpose(1, 2)  # (N,L,H,Dh) -> (N,H,L,Dh)

    def reorder(self, new_order: Tensor) -> None:
        """Select (and repeat) rows: ``new_order`` (N',) indexes the current rows; only the table moves."""
        if self.rows is not None:
            self.rows = self.rows.index_select(0, new_order)





class _FrozenLayer:
    """One encoder or decoder layer: fused self-attention q/k/v, cross-attention q and output (decoder),
    the feed-forward network, and the three sub-layers with their residuals and LayerNorms."""

    def __init__(self, layer: nn.Module, cfg: Any, role: str, native: Optional[Any] = None) -> None:
        self.norm_first = cfg.norm_first
        self.head_dim = cfg.d_model // cfg.n_heads
        sa = layer.self_attn
        self.qkv = _linear(sa.q_proj, sa.k_proj, sa.v_proj, role=role, native=native)  # (N,D) -> (N,3D)
        self.self_out = _linear(sa.out_proj, role=role, native=native)
        self.self_norm = _layer_norm(layer.self_attn_norm)
        self.cross = getattr(layer, "cross_attn", None) is not None
        if self.cross:
            self.cross_q = _linear(layer.cross_attn.q_proj, role=role, native=native)
            self.cross_out = _linear(layer.cross_attn.out_proj, role=role, native=native)
            self.cross_norm = _layer_norm(layer.cross_attn_norm)
        self.fc1 = _linear(layer.ffn.fc1, role=role, native=native)
        self.fc2 = _linear(layer.ffn.fc2, role=role, native=native)
        self.activation = layer.ffn.activation
        self.ffn_norm = _layer_norm(layer.ffn_norm)
        # a decoder step's attention of one new position: the extension's attend_one (csrc/decoder_step.cpp)
        self.attend = (native.attend_one if role == "decoder" and native is not None and native.panels_supported()
                       else None)
        self.norm_kernel = _norm_kernel(native)
        # an encoder's self-attention over its real tokens only: the extension's attend_spans
        self.attend_spans = (native.attend_spans if role == "encoder" and native is not None
                             and native.panels_supported() else None)

    def _residual(self, x: Tensor, norm: tuple, sublayer: Any, *args: Any) -> Tensor:
        """``norm(x + sublayer(x))`` (the paper), or ``x + sublayer(norm(x))`` with ``norm_first``."""
        if self.norm_first:
            return x + sublayer(_norm(self.norm_kernel, x, norm), *args)
        return _norm(self.norm_kernel, x, norm, sublayer(x, *args))

    def _self_attention(self, y: Tensor, b: int, t: int, cache: Optional[KVCache], mask: Optional[Tensor],
                        is_causal: bool, rows: Optional[Tensor], spans: Optional[Tensor] = None) -> Tensor:
        d = y.size(1)
        h = d // self.head_dim
        if spans is not None:  # y: the real tokens of B sentences, sentence b's in rows spans[b]..spans[b+1]-1
            return self.self_out(self.attend_spans(self.qkv(y), spans, h))  # (N,3D) -> (N,D) -> (N,D)
        qkv = self.qkv(y).contiguous()  # (N,3D); SDPA's fused CPU kernel wants unit-stride heads
        if rows is not None:  # y holds the real tokens only: put them back in their (B*T) places for attention
            qkv = qkv.new_zeros(b * t, 3 * d).index_copy_(0, rows, qkv)
        q, k, v = qkv.reshape(b, t, 3, h, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # (B,H,T,Dh)
        one = self.attend is not None and t == 1 and mask is None and rows is None  # one new position: all keys
        if one and isinstance(cache, IndexedKV):
            keys, values, table = cache.update_indexed(k, v)  # (M,H,past+1,Dh) each, (B,past+1)
            return self.self_out(self.attend(q, keys, values, None, table))  # (B,D)
        if cache is not None:
            k, v = cache.update(k, v)  # (B,H,past+T,Dh)
        if one:
            return self.self_out(self.attend(q, k, v))  # (B,D)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)  # (B,H,T,Dh)
        a = a.transpose(1, 2).reshape(b * t, d)  # (B*T,D)
        return self.self_out(a if rows is None else a.index_select(0, rows))  # (N,D)

    def _cross_attention(self, y: Tensor, b: int, t: int, kv: tuple[Tensor, Tensor], mask: Optional[Tensor],
                         kv_rows: Optional[Tensor]) -> Tensor:
        d = y.size(1)
        q = self.cross_q(y).contiguous().view(b, t, d // self.head_dim, self.head_dim).transpose(1, 2)  # (B,H,T,Dh)
        if self.attend is not None and t == 1:
            return self.cross_out(self.attend(q, *kv, mask, kv_rows))  # (B,D)
        if kv_rows is not None:  # each row's own copy of its source's keys and values
            kv = (kv[0].index_select(0, kv_rows), kv[1].index_select(0, kv_rows))
        a = F.scaled_dot_product_attention(q, *kv, attn_mask=mask)  # (B,H,T,Dh)
        return self.cross_out(a.transpose(1, 2).reshape(b * t, d))  # (N,D)

    def _feed_forward(self, y: Tensor) -> Tensor:
        if self.activation is F.relu:  # in the product's epilogue
            return self.fc2(self.fc1(y, relu=True))  # (N,D) -> (N,F) -> (N,D)
        return self.fc2(self.activation(self.fc1(y)))

    def __call__(self, x: Tensor, b: int, t: int, cache: Optional[LayerCache] = None,
                 self_mask: Optional[Tensor] = None, is_causal: bool = False,
                 cross_kv: Optional[tuple[Tensor, Tensor]] = None, memory_mask: Optional[Tensor] = None,
                 rows: Optional[Tensor] = None, kv_rows: Optional[Tensor] = None,
                 spans: Optional[Tensor] = None) -> Tensor:
        """x (N,D) -> (N,D): N = B*T rows, or with ``rows`` (N,) only the rows of real tokens among the B*T
        (an encoder skipping its padding). A decoder layer appends its keys/values to ``cache`` and attends
        to the source's ``cross_kv`` (each (B,H,S,Dh), or (M,H,S,Dh) with ``kv_rows`` (B,): row i's source is
        row ``kv_rows[i]``). ``spans`` (B+1,): an encoder layer with ``attend_spans`` whose x holds the real
        tokens only, sentence b's in rows spans[b]..spans[b+1]-1 (then ``rows`` and ``self_mask`` are unused)."""
        x = self._residual(x, self.self_norm, self._self_attention, b, t,
                           cache.self_attn if cache is not None else None, self_mask, is_causal, rows, spans)
        if self.cross:
            x = self._residual(x, self.cross_norm, self._cross_attention, b, t, cross_kv, memory_mask, kv_rows)
        return self._residual(x, self.ffn_norm, self._feed_forward)


class _FrozenStack:
    """Token embedding, positions, the layers and the final LayerNorm (pre-LN) of an encoder or decoder."""

    def __init__(self, stack: nn.Module, cfg: Any, role: str, native: Optional[Any] = None) -> None:
        self.d_model = cfg.d_model
        self.embed = stack.embed_tokens.weight.detach()  # (V,D)
        self.embed_scale = stack.embed_tokens.scale
        self.positions = stack.embed_positions.weight.detach()  # (P,D)
        self.max_positions = stack.embed_positions.max_positions
        self.layers = [_FrozenLayer(layer, cfg, role, native) for layer in stack.layers]
        self.final_norm = _layer_norm(stack.final_norm) if stack.final_norm is not None else None
        self.norm_kernel = _norm_kernel(native)

    def embed_tokens(self, tokens: Tensor, offset: int = 0, position: Optional[Tensor] = None) -> Tensor:
        """tokens (B,T) at positions offset.. -> x (B*T,D): TokenEmbedding + PositionalEncoding, same ops.
        ``position`` (1,): one new position (T = 1) held on the device instead (a static-cache step, whose
        caller checks the limit; no host read)."""
        b, t = tokens.shape
        if position is None:
            check_positions(offset + t, self.max_positions)
            positions = self.positions[offset : offset + t]  # (T,D)
        else:
            positions = self.positions.index_select(0, position)  # (1,D)
        x = F.embedding(tokens, self.embed) * self.embed_scale + positions  # (B,T,D)
        return x.view(b * t, self.d_model)

    def finish(self, x: Tensor) -> Tensor:
        return _norm(self.norm_kernel, x, self.final_norm) if self.final_norm is not None else x


@dataclass
class FrozenEncoderOut(EncoderOut):
    """What the frozen decoder needs from the source: :class:`EncoderOut` plus every decoder layer's
    cross-attention keys and values, computed once per source.

    ``reorder`` (beam search expanding each source to its beams, searches dropping finished sentences) selects
    rows of ``memory`` and ``src_mask``. With ``shared`` (a decoder whose attention takes ``kv_rows``: the
    compiled extension's ``attend_one``) the keys and values stay one row per source and ``kv_rows`` (B,) says
    which row each of the B rows reads, as CTranslate2 and FasterTransformer keep them; otherwise they are
    copied row by row as well.
    """

    cross_kv: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # per layer, each (M,H,S,Dh)
    kv_rows: Optional[Tensor] = None  # (B,) long: the cross_kv row of each row; None: row i is row i (M = B)
    shared: bool = False

    def reorder(self, new_order: Tensor) -> "FrozenEncoderOut":
        memory, src_mask = self.memory.index_select(0, new_order), self.src_mask.index_select(0, new_order)
        if self.shared:
            rows = new_order if self.kv_rows is None else self.kv_rows.index_select(0, new_order)
            return FrozenEncoderOut(memory, src_mask, self.padded, self.cross_kv, rows, True)
        return FrozenEncoderOut(memory, src_mask, self.padded, _select_rows(self.cross_kv, new_order))

    def row_cross_kv(self) -> list[tuple[Tensor, Tensor]]:
        """Per layer, each row's own keys and values (B,H,S,Dh): copies where rows share a source."""
        if self.kv_rows is None:
            return self.cross_kv
        return _select_rows(self.cross_kv, self.kv_rows)


def _select_rows(cross_kv: list[tuple[Tensor, Tensor]], rows: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Per layer, rows ``rows`` (B,) of the keys and values (M,H,S,Dh) -> (B,H,S,Dh)."""
    return [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in cross_kv]


class _FrozenEncoder(_FrozenStack):
    """The encoder: what :class:`~transformer.model.transformer.Encoder` computes, in the frozen layout.

    Like CTranslate2, it skips padding: the position-wise parts (projections, feed-forward, LayerNorms) run on
    the real tokens only, and only attention sees the padded (B,S) layout; with the compiled extension's
    ``attend_spans``, attention too runs on the real tokens, each over its own sentence's. Padding positions
    of the memory are zeros (the model leaves other values there; attention masks them out either way).
    """

    def __call__(self, src_tokens: Tensor) -> tuple[EncoderOut, Optional[Tensor]]:
        """src_tokens (B,S) -> (EncoderOut(memory (B,S,D), src_mask (B,S)), the real rows of B*S or None)."""
        b, s = src_tokens.shape
        src_mask = src_tokens.ne(PAD_ID)  # (B,S)
        padded = not bool(src_mask.all())
        attn_mask = src_mask[:, None, None, :] if padded else None  # (B,1,1,S)
        x = self.embed_tokens(src_tokens)  # (B*S,D)
        rows = src_mask.view(-1).nonzero().squeeze(1) if padded else None  # (N,) real tokens
        if rows is not None:
            x = x.index_select(0, rows)  # (N,D)
        spans = None  # with attend_spans, attention too runs on the real tokens only, sentence by sentence
        if self.layers and self.layers[0].attend_spans is not None:
            spans = F.pad(src_mask.sum(1).cumsum(0), (1, 0))  # (B+1,)
        for layer in self.layers:
            x = layer(x, b, s, self_mask=attn_mask, rows=rows, spans=spans)
        x = self.finish(x)
        memory = x if rows is None else x.new_zeros(b * s, self.d_model).index_copy_(0, rows, x)
        return EncoderOut(memory.view(b, s, self.d_model), src_mask, padded), rows


class _FrozenDecoder(_FrozenStack):
    """The decoder stack and output layer of ``model`` for incremental decoding."""

    def __init__(self, model: nn.Module, module: Optional[Any] = None) -> None:
        """``module``: the compiled extension (:func:`_native_module`) or None."""
        super().__init__(model.decoder, model.cfg, "decoder", module)
        self.n_heads = model.cfg.n_heads
        self.cross = any(layer.cross for layer in self.layers)  # encoder-decoder; False for a language model
        if self.cross:  # every layer's cross k/v in one product
            self.cross_kv = _linear(*[m for layer in model.decoder.layers
                                      for m in (layer.cross_attn.k_proj, layer.cross_attn.v_proj)],
                                    role="encoder", native=module)  # runs over the source's rows, as the encoder does
        self.output = _linear(model.output.lm_head, role="output", native=module)
        self.source_heads = module.source_heads if module is not None else None
        bias = model.output.final_logits_bias
        self.final_logits_bias = bias.detach() if bias is not None else None
        self.native = _compiled_step(self, model, module) if module is not None else None
        # the compiled step computes the logits too where the output map runs in panels (float32 or int8)
        self.native_logits = self.native is not None and (isinstance(self.output, _Int8Panels)
                                                          or getattr(self.output, "panels", None) is not None)

    def project_memory(self, memory: Tensor, rows: Optional[Tensor] = None) -> list[tuple[Tensor, Tensor]]:
        """Every layer's cross-attention keys and values (each (B,H,S,Dh)) of ``memory`` (B,S,D), in one
        product; with ``rows``, of those rows of B*S only (the rest, padding, get zeros)."""
        b, s, d = memory.shape
        h, dh, n_layers = self.n_heads, d // self.n_heads, len(self.layers)
        x = memory.reshape(b * s, d)
        kv = self.cross_kv(x if rows is None else x.index_select(0, rows))  # (N, L*2*D)
        if self.source_heads is not None:  # the padded, per-head layout in one pass
            kv = self.source_heads(kv, rows, b, s, n_layers, h)  # (L,2,B,H,S,Dh)
            return [(kv[i, 0], kv[i, 1]) for i in range(n_layers)]
        if rows is not None:
            kv = kv.new_zeros(b * s, kv.size(1)).index_copy_(0, rows, kv)  # (B*S, L*2*D)
        kv = kv.reshape(b, s, n_layers, 2, h, dh).permute(2, 3, 0, 4, 1, 5).contiguous()  # (L,2,B,H,S,Dh)
        return [(kv[i, 0], kv[i, 1]) for i in range(n_layers)]

    def step(self, tokens: Tensor, cache: DecoderCache, cross_kv: Optional[list[tuple[Tensor, Tensor]]] = None,
             memory_mask: Optional[Tensor] = None, kv_rows: Optional[Tensor] = None) -> Tensor:
        """tokens (B,T): the new positions -> logits (B,T,V), appending their keys/values to ``cache``;
        ``cross_kv``: the source's keys and values for each layer (encoder-decoder), each (B,H,S,Dh), or
        (M,H,S,Dh) with ``kv_rows`` (B,) (see :class:`FrozenEncoderOut`)."""
        b, t = tokens.shape
        if not cache.layers:
            indexed = self.layers[0].attend is not None  # attend_one reads the history through a table of rows
            cache.layers.extend(LayerCache(IndexedKV() if indexed else KVCache()) for _ in self.layers)
        if self.native is not None and t == 1 and self._native_rows(b):
            return self._native_step(tokens, cache, cross_kv, memory_mask, kv_rows)
        past = cache.length
        x = self.embed_tokens(tokens, offset=past)  # (N,D)
        is_causal, self_mask = self_attention_mask(t, past, tokens.device)
        for i, (layer, layer_cache) in enumerate(zip(self.layers, cache.layers)):
            x = layer(x, b, t, layer_cache, self_mask, is_causal, cross_kv[i] if cross_kv else None, memory_mask,
                      kv_rows=kv_rows)
        return self.logits(x).reshape(b, t, -1)

    def _native_rows(self, rows: int) -> bool:
        """Whether the compiled step has the products for ``rows`` rows: MKL's forms below oneDNN's threshold,
        panel_linear up to PANEL_ROWS (the compiled step has no oneDNN form), int8 panels at any number."""
        fc1 = self.layers[0].fc1
        if isinstance(fc1, _Int8Panels):
            return True
        return rows < PACKED_FROM_ROWS["decoder"] or (fc1.panels is not None and rows <= PANEL_ROWS["decoder"])

    def _native_step(self, tokens: Tensor, cache: DecoderCache, cross_kv: Optional[list[tuple[Tensor, Tensor]]],
                     memory_mask: Optional[Tensor], kv_rows: Optional[Tensor]) -> Tensor:
        """:meth:`step` for one new position (T = 1) in the compiled step: the same calls, without Python
        between them, from the token embedding to the logits (to the last layer's output, then :meth:`logits`
        here, where the output map has no panels). Python grows the KV buffers; the compiled step writes this
        position into them and into the histories' tables of rows."""
        b = tokens.size(0)
        past = cache.length
        check_positions(past + 1, self.max_positions)
        shape = self.embed.new_empty(b, self.n_heads, 0, self.d_model // self.n_heads)  # (B,H,0,Dh): the buffers'
        caches = [layer_cache.self_attn for layer_cache in cache.layers]
        indexed = [kv for kv in caches if isinstance(kv, IndexedKV)]
        for kv in caches:
            kv.reserve(1, shape)
        ks, vs = [kv.k for kv in caches], [kv.v for kv in caches]
        cross_k, cross_v = [kv[0] for kv in cross_kv or ()], [kv[1] for kv in cross_kv or ()]
        if self.native_logits:  # the step writes this position's column of each table: (B,capacity) each
            logits = self.native.step(tokens, ks, vs, past, [kv.rows for kv in indexed], cross_k, cross_v,
                                      memory_mask, kv_rows, COLUMN_ROWS["decoder"], PANEL_ROWS["decoder"],
                                      PANEL_ROWS["output"])  # (B,V)
        else:
            x = self.embed_tokens(tokens, offset=past)  # (B,D)
            rows = [kv.claim(1, shape) for kv in indexed]  # (B,past+1) each
            x = self.native.forward(x, ks, vs, past, rows, cross_k, cross_v, memory_mask, kv_rows,
                                    COLUMN_ROWS["decoder"], PANEL_ROWS["decoder"])  # (B,D)
            logits = self.logits(x)
        for kv in caches:
            kv.length += 1
        return logits.view(b, 1, -1)

    def logits(self, x: Tensor) -> Tensor:
        """The last layer's output x (N,D) -> logits (N,V): final LayerNorm (pre-LN), output projection, bias."""
        logits = self.output(self.finish(x))  # (N,V)
        if self.final_logits_bias is not None:
            logits = logits + self.final_logits_bias
        return logits


def _native_module(model: nn.Module, native: Optional[bool]) -> Any:
    """The compiled extension (:mod:`transformer.model.native`: the decoder step and ``panel_linear``) for
    ``model``, or None: it takes a float32 or int8 model on the CPU; ``native=None`` uses it if it is built,
    True builds it if needed (raising if it cannot), False never uses it."""
    weight = model.decoder.embed_tokens.weight
    if native is False or weight.device.type != "cpu" or weight.dtype != torch.float32:
        return None
    from transformer.model import native as native_module

    module = native_module.build() if native else native_module.load()
    if module is not None:
        _tune_for_cpu(module)
    return module


def _compiled_step(decoder: _FrozenDecoder, model: nn.Module, module: Any) -> Any:
    """The compiled decoder step of ``module`` (:func:`_native_module`) holding ``decoder``'s weights (frozen
    from ``model``)."""
    none = torch.empty(0)  # the C++ side's "absent"

    def dense(m: Union[_Dense, _Int8Panels]) -> list[Tensor]:
        if isinstance(m, _Int8Panels):
            return [none, none, m.bias, none, none, none, none, m.bias_panels, m.quad_panels, m.scales, m.colsums]
        bias = m.bias if m.bias is not None else m.weight.new_zeros(m.weight.size(0))
        return [m.weight, m.weight_t, bias, bias[:, None], *(m.blocks or (none, none)),
                *((m.panels, m.bias_panels) if m.panels is not None else (none, none)), none, none, none]

    if isinstance(decoder.layers[0].fc1, _Int8):  # PyTorch's dynamic int8 products: the Python step only
        return None
    step = module.DecoderStep(decoder.n_heads, model.cfg.norm_first, model.cfg.activation == "gelu",
                              decoder.layers[0].attend is not None)
    for layer in decoder.layers:
        maps = [layer.qkv, layer.self_out, layer.fc1, layer.fc2] + ([layer.cross_q, layer.cross_out] if layer.cross else [])
        norms = [layer.self_norm, layer.ffn_norm] + ([layer.cross_norm] if layer.cross else [])  # (shape, w, b, eps)
        step.add_layer([dense(m) for m in maps], [t for n in norms for t in n[1:3]], [n[3] for n in norms])
    final = decoder.final_norm or ((), none, none, 1e-5)  # (shape, w, b, eps)
    output = decoder.output
    step.set_ends(decoder.embed, float(decoder.embed_scale), decoder.positions, [final[1], final[2]], final[3],
                  dense(output) if isinstance(output, (_Dense, _Int8Panels)) else [none] * 11,
                  decoder.final_logits_bias if decoder.final_logits_bias is not None else none)
    return step


# --- the two model kinds ------------------------------------------------------------------------------


def _static_decoder(model: nn.Module, decoder: _FrozenDecoder, graphs: Optional[bool]) -> Optional[StaticDecoder]:
    """Static-cache decoding (transformer.model.static) where asked, by default on a CUDA device: CUDA graphs
    there; ``graphs=True`` on the CPU runs the same static step eagerly (what the CPU tests check)."""
    cuda = decoder.embed.device.type == "cuda"
    if not (graphs if graphs is not None else cuda):
        return None
    if _is_int8_model(model):
        raise TransformerError("static-cache decoding (CUDA graphs) takes a float model, not an int8 one")
    return StaticDecoder(decoder, model.cfg.n_heads, graphs=cuda)


class FrozenTransformer:
    """An encoder-decoder :class:`Transformer` frozen for decoding (see the module docstring)."""

    def __init__(self, model: Transformer, graphs: Optional[bool] = None, native: Optional[bool] = None) -> None:
        self.cfg = model.cfg
        module = _native_module(model, native)
        self.encoder = _FrozenEncoder(model.encoder, model.cfg, "encoder", module)
        self.decoder = _FrozenDecoder(model, module)
        self.device = self.decoder.embed.device
        self.static = _static_decoder(model, self.decoder, graphs)

    def encode(self, src_tokens: Tensor) -> FrozenEncoderOut:
        """src_tokens (B,S) -> memory (B,S,D), src_mask (B,S) and the decoder's cross-attention keys/values."""
        with torch.no_grad():
            out, rows = self.encoder(src_tokens)
            shared = self.decoder.layers[0].attend is not None  # attend_one reads shared keys (kv_rows)
            return FrozenEncoderOut(out.memory, out.src_mask, out.padded, self.decoder.project_memory(out.memory, rows),
                                    shared=shared)

    def new_cache(self) -> Union[DecoderCache, StaticCache]:
        """A growing :class:`DecoderCache`, or with static-cache decoding a handle on the model's buffers
        (one search at a time: see :mod:`transformer.model.static`)."""
        return self.static.new_cache() if self.static is not None else DecoderCache()

    def compiled_greedy(self, encoder_out: EncoderOut, limit: Tensor,
                        banned: list[int]) -> Optional[tuple[Tensor, Tensor]]:
        """Greedy search's whole loop in the compiled step (``DecoderStep.greedy``, csrc/decoder_step.cpp) where
        it runs: the compiled step computes the logits (float32 panels or int8) with its own attention, no
        static cache, a :class:`FrozenEncoderOut`. ``limit`` (B,) int64: each sentence's most output tokens, EOS
        included; ``banned``: ids never generated. Returns the tokens (B, max(limit)), EOS past each end, and
        the summed log-probabilities (B,) float32, what :func:`~transformer.decoding.greedy.greedy_search`'s
        Python loop returns; else None."""
        if not self._compiled_loop_runs(encoder_out, limit.size(0)):
            return None
        src_mask = encoder_out.src_mask if encoder_out.padded else None  # (B,S) bool
        tokens, logprob = self.decoder.native.greedy(  # no autograd in it (the C++ side's NoGradGuard)
            limit, [kv[0] for kv in encoder_out.cross_kv], [kv[1] for kv in encoder_out.cross_kv], src_mask,
            encoder_out.kv_rows, BOS_ID, EOS_ID, PAD_ID, banned, COLUMN_ROWS["decoder"], PANEL_ROWS["decoder"],
            PANEL_ROWS["output"])
        return tokens, logprob

    def compiled_beam(self, encoder_out: EncoderOut, limit: Tensor, beam: int,
                      banned: list[int]) -> Optional[list[tuple[int, list[int], float]]]:
        """Beam search's whole loop in the compiled step (``DecoderStep.beam``, csrc/decoder_step.cpp) where it
        runs: as :meth:`compiled_greedy`, and with the ``B * beam`` rows of the search within the compiled
        step's products. Returns the finished hypotheses in the order :func:`~transformer.decoding.beam.
        beam_search`'s Python loop finishes them, each (sentence, tokens without EOS, summed log-probability
        with EOS, float32), for it to rank; else None."""
        if not self._compiled_loop_runs(encoder_out, limit.size(0) * beam):
            return None
        src_mask = encoder_out.src_mask if encoder_out.padded else None  # (B,S) bool
        sentences, logprobs, lengths, tokens = self.decoder.native.beam(  # no autograd in it (NoGradGuard)
            limit, beam, [kv[0] for kv in encoder_out.cross_kv], [kv[1] for kv in encoder_out.cross_kv], src_mask,
            encoder_out.kv_rows, BOS_ID, EOS_ID, PAD_ID, banned, COLUMN_ROWS["decoder"], PANEL_ROWS["decoder"],
            PANEL_ROWS["output"])
        flat, start, hypotheses = tokens.tolist(), 0, []
        for sentence, length, logprob in zip(sentences.tolist(), lengths.tolist(), logprobs.tolist()):
            hypotheses.append((sentence, flat[start:start + length], logprob))
            start += length
        return hypotheses

    def _compiled_loop_runs(self, encoder_out: EncoderOut, rows: int) -> bool:
        """Whether a search's compiled loop runs: the compiled step computes the logits (float32 panels or int8)
        with its own attention, no static cache, a :class:`FrozenEncoderOut`, and up to ``rows`` rows a step
        within the compiled step's products."""
        decoder = self.decoder
        return (self.static is None and decoder.native is not None and decoder.native_logits
                and decoder.layers[0].attend is not None and isinstance(encoder_out, FrozenEncoderOut)
                and decoder._native_rows(rows))

    def decode(self, tgt_tokens: Tensor, encoder_out: EncoderOut,
               cache: Optional[Union[DecoderCache, StaticCache]] = None) -> Tensor:
        """Logits (B,T,V) of the new ``tgt_tokens`` (B,T); without a cache, ``tgt_tokens`` is the whole prefix.
        ``encoder_out`` comes from :meth:`encode` (a plain :class:`EncoderOut` works too, projected here).
        A :class:`StaticCache` takes one new position per step and reads ``encoder_out`` at its first step only."""
        cache = cache if cache is not None else DecoderCache()
        with torch.no_grad():
            frozen_out = isinstance(encoder_out, FrozenEncoderOut)
            if isinstance(cache, StaticCache):
                cross_kv = None
                if cache.rows == 0:
                    cross_kv = (encoder_out.row_cross_kv() if frozen_out
                                else self.decoder.project_memory(encoder_out.memory))
                return self.static.decode(tgt_tokens, cross_kv, encoder_out.src_mask, cache)
            if frozen_out:
                return self.decoder.step(tgt_tokens, cache, encoder_out.cross_kv, encoder_out.attn_mask(),
                                         encoder_out.kv_rows)
            # the model's own EncoderOut: project the memory once, kept (and reordered) in the cache
            if not cache.layers:
                cache.layers.extend(LayerCache() for _ in self.decoder.layers)
            if cache.layers[0].cross_kv is None:
                for layer_cache, kv in zip(cache.layers, self.decoder.project_memory(encoder_out.memory)):
                    layer_cache.cross_kv = kv
            cross_kv = [layer_cache.cross_kv for layer_cache in cache.layers]
            return self.decoder.step(tgt_tokens, cache, cross_kv, encoder_out.attn_mask())


class FrozenLM:
    """A decoder-only :class:`TransformerLM` frozen for generation (see the module docstring)."""

    def __init__(self, model: TransformerLM, graphs: Optional[bool] = None, native: Optional[bool] = None) -> None:
        self.cfg = model.cfg
        self.decoder = _FrozenDecoder(model, _native_module(model, native))
        self.device = self.decoder.embed.device
        self.static = _static_decoder(model, self.decoder, graphs)

    def new_cache(self) -> Union[DecoderCache, StaticCache]:
        """A growing :class:`DecoderCache`, or with static-cache decoding a handle on the model's buffers."""
        return self.static.new_cache() if self.static is not None else DecoderCache()

    def decode(self, tokens: Tensor, cache: Optional[Union[DecoderCache, StaticCache]] = None) -> Tensor:
        """Logits (B,T,V) of the new ``tokens`` (B,T); without a cache, ``tokens`` is the whole sequence.
        A :class:`StaticCache` takes the T positions one step (one graph replay) at a time."""
        with torch.no_grad():
            if isinstance(cache, StaticCache):
                return torch.cat([self.static.decode(tokens[:, t : t + 1], None, None, cache)
                                  for t in range(tokens.size(1))], dim=1)
            return self.decoder.step(tokens, cache if cache is not None else DecoderCache())


def _is_int8_model(model: nn.Module) -> bool:
    return any(_is_int8(m) for m in model.modules())


def freeze(model: nn.Module, graphs: Optional[bool] = None, native: Optional[bool] = None) -> Any:
    """An inference-only :class:`FrozenTransformer` or :class:`FrozenLM` of ``model`` (float or int8).

    The frozen object copies the weights into its own layouts (on the CPU about two more copies of the
    model's Linear weights, a third (the encoder's, the decoder's and the output projection's) for
    ``panel_linear`` where the compiled extension is built, and one of the output projection for oneDNN; on a
    GPU, one of the fused q/k/v and cross-attention k/v weights); later changes to ``model`` do not reach it.

    ``native``: the compiled CPU extension (the decoder step, ``panel_linear`` and, for an int8 model,
    ``panel_linear_w8a8``): None uses it if it is built, True builds it if needed (raising
    :class:`TransformerError` where it cannot), False keeps the Python step and MKL's, oneDNN's and (int8)
    PyTorch's fbgemm products.

    ``graphs``: decode with a static KV cache whose step is replayed as CUDA graphs
    (:mod:`transformer.model.static`); the default is on for a model on a CUDA device. ``graphs=True`` on the
    CPU runs the same static step without graphs.

    Raises:
        TransformerError: ``model`` is neither a ``Transformer`` nor a ``TransformerLM``, or is in training mode;
            ``native=True`` and the compiled step cannot be built.
    """
    if model.training:
        raise TransformerError("freeze() takes a model in eval mode (call model.eval() first)")
    if isinstance(model, Transformer):
        return FrozenTransformer(model, graphs, native)
    if isinstance(model, TransformerLM):
        return FrozenLM(model, graphs, native)
    raise TransformerError(f"cannot freeze a {type(model).__name__}; freeze a Transformer or a TransformerLM")
