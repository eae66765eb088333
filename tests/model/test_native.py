"""The compiled decoder step (transformer.model.native) gives the Python step's logits bit for bit (the Python
step on the same products): every architecture variant, one to many rows, padding, cache growth, beam
reorders; its panel_linear computes F.linear; with both, the frozen model computes what the model computes
and the searches give the same outputs as without them; it is off where it must be."""

import copy
import os
import warnings

import pytest
import torch

from transformer.data.vocab import EOS_ID, PAD_ID
from transformer.decoding import beam_search, greedy_search, sample
from transformer.errors import TransformerError
from transformer.model import native
from transformer.model import frozen as frozen_module
from transformer.model.frozen import INTEL_AVX512_PANEL_ROWS, PANEL_ROWS, _Dense, _Int8Panels, freeze
from transformer.model.quantize import quantize, w8a8_row_rounding

from native_helpers import HAVE_COMPILER, at_cpu_level, cpu_levels
from .test_frozen import SRC, VARIANTS, V, _lm, _tokens, _transformer

pytestmark = pytest.mark.skipif(not HAVE_COMPILER, reason="no C++ compiler to build the compiled step with")


@pytest.fixture(scope="module", autouse=True)
def built():
    return native.build()  # cached after the first build (about a minute)


def _compiled_and_python(model):
    """The model frozen with the compiled step, and frozen with the same products (panel_linear where it
    applies) but the Python step."""
    compiled, python = freeze(model, native=True), freeze(model, native=True)
    python.decoder.native = None
    assert compiled.decoder.native is not None
    return compiled, python


@torch.no_grad()
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rows", [1, 3, 7, 40, 70])  # panel_linear: one tile, part of one, 2, 7, 12 (past 64)
def test_compiled_step_equals_python_step(variant, rows):
    model = _transformer(**variant)
    compiled, python = _compiled_and_python(model)
    src, tgt = SRC.repeat(rows, 1)[:rows], _tokens(rows, 20)  # 20 > the cache's first allocation (16): it grows
    enc = compiled.encode(src)
    a, b = compiled.new_cache(), python.new_cache()
    for t in range(tgt.size(1)):
        out, ref = compiled.decode(tgt[:, t : t + 1], enc, a), python.decode(tgt[:, t : t + 1], enc, b)
        assert torch.equal(out, ref), f"step {t}"
        if t == 9:  # beam search's reorders, within and across sources
            order = torch.arange(rows).flip(0)
            a.reorder(order), b.reorder(order)
            enc = enc.reorder(order)
    assert a.length == b.length == tgt.size(1)
    for la, lb in zip(a.layers, b.layers):
        assert torch.equal(la.self_attn.k[:, :, : a.length], lb.self_attn.k[:, :, : b.length])
        assert torch.equal(la.self_attn.v[:, :, : a.length], lb.self_attn.v[:, :, : b.length])
    # the model's own EncoderOut (cross k/v projected into the cache), and a multi-token step after a prefix
    enc_model = model.encode(src)
    a, b = compiled.new_cache(), python.new_cache()
    for t in range(3):
        assert torch.equal(compiled.decode(tgt[:, t : t + 1], enc_model, a), python.decode(tgt[:, t : t + 1], enc_model, b))
    assert torch.equal(compiled.decode(tgt[:, 3:6], enc_model, a), python.decode(tgt[:, 3:6], enc_model, b))
    assert torch.equal(compiled.decode(tgt[:, 6:7], enc_model, a), python.decode(tgt[:, 6:7], enc_model, b))


@torch.no_grad()
@pytest.mark.parametrize("variant", VARIANTS[:2])
@pytest.mark.parametrize("int8", [False, True])
def test_compiled_step_language_model(variant, int8):
    model = quantize(_lm(**variant), "int8") if int8 else _lm(**variant)
    compiled, python = _compiled_and_python(model)
    tokens = _tokens(2, 12)
    a, b = compiled.new_cache(), python.new_cache()
    assert torch.equal(compiled.decode(tokens[:, :4], a), python.decode(tokens[:, :4], b))  # the prompt: Python
    for t in range(4, 12):
        assert torch.equal(compiled.decode(tokens[:, t : t + 1], a), python.decode(tokens[:, t : t + 1], b))


@pytest.mark.parametrize("rows", [1, 2, 6, 7, 13])  # one tile, a partial one, tiles of 6 and a rest
@pytest.mark.parametrize("out_features,in_features", [(16, 8), (40, 7), (1, 64), (768, 256), (17, 1)])
def test_panel_linear_computes_linear(rows, out_features, in_features):
    if not native.build().panels_supported():
        pytest.skip("panel_linear needs a CPU with AVX2 and FMA")
    torch.manual_seed(rows * 1000 + out_features)
    linear = torch.nn.Linear(in_features, out_features)
    dense = _Dense(linear.weight, linear.bias, "decoder", native.build())
    assert dense.panels.shape == (-(-out_features // 16), in_features, 16)
    x = torch.randn(rows, in_features + 3)[:, 2 : 2 + in_features]  # not contiguous
    with torch.no_grad():
        torch.testing.assert_close(dense(x), linear(x), rtol=1e-5, atol=1e-5)
        no_bias = _Dense(linear.weight, None, "decoder", native.build())
        torch.testing.assert_close(no_bias(x), x @ linear.weight.t(), rtol=1e-5, atol=1e-5)
        assert torch.equal(dense(x, relu=True), torch.relu(dense(x)))  # ReLU in the epilogue: the same values
        assert dense(x[:0]).shape == (0, out_features)
    with pytest.raises(RuntimeError, match="panel_linear"):
        native.build().panel_linear(torch.randn(rows, in_features + 1), dense.panels, dense.bias_panels, out_features)


@pytest.mark.parametrize("rows,heads,length,head_dim", [(1, 4, 1, 64), (5, 4, 20, 64), (3, 2, 7, 5), (40, 8, 33, 32)])
def test_attend_one_computes_attention(rows, heads, length, head_dim):
    """attend_one against SDPA: one query per row and head over keys/values that are views of larger
    buffers (a KV cache), with and without a padding mask; (N, H*Dh) out."""
    if not native.build().panels_supported():
        pytest.skip("attend_one needs a CPU with AVX2 and FMA")
    torch.manual_seed(rows + length)
    q = torch.randn(rows, 1, 3, heads, head_dim).permute(2, 0, 3, 1, 4)[0]  # (N,H,1,Dh), as the q/k/v split
    k = torch.randn(rows, heads, length + 9, head_dim)[:, :, :length]  # (N,H,L,Dh) of a larger buffer
    v = torch.randn(rows, heads, length + 9, head_dim)[:, :, :length]
    mask = torch.rand(rows, 1, 1, length) < 0.7
    mask[..., 0] = True  # every row has a key to attend to
    attend = native.build().attend_one
    for m in (None, mask):
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m)  # (N,H,1,Dh)
        torch.testing.assert_close(attend(q, k, v, m), ref.transpose(1, 2).reshape(rows, heads * head_dim),
                                   rtol=1e-5, atol=1e-5)
    mask[0] = False  # nothing to attend to: zeros (SDPA gives NaN)
    assert attend(q, k, v, mask)[0].eq(0).all()
    assert attend(q[:0], k[:0], v[:0]).shape == (0, heads * head_dim)
    with pytest.raises(RuntimeError, match="attend_one"):
        attend(q, k, v[:, :, :-1] if length > 1 else v[:, :1, :, :1])


@pytest.mark.parametrize("head_dim", [64, 5])
def test_attend_one_reads_shared_keys_through_kv_rows(head_dim):
    """With kv_rows, row r attends to the keys and values of row kv_rows[r] (beams sharing their source's):
    the same as giving each row its own copy; out-of-range rows raise."""
    if not native.build().panels_supported():
        pytest.skip("attend_one needs a CPU with AVX2 and FMA")
    torch.manual_seed(head_dim)
    sources, rows, heads, length = 3, 8, 4, 11
    q = torch.randn(rows, heads, 1, head_dim)
    k, v = torch.randn(sources, heads, length, head_dim), torch.randn(sources, heads, length, head_dim)
    kv_rows = torch.tensor([0, 0, 2, 2, 2, 1, 0, 1])
    mask = torch.rand(rows, 1, 1, length) < 0.8
    mask[..., 0] = True
    attend = native.build().attend_one
    for m in (None, mask):
        expected = attend(q, k[kv_rows], v[kv_rows], m)
        torch.testing.assert_close(attend(q, k, v, m, kv_rows), expected, rtol=0, atol=0)
        ref = torch.nn.functional.scaled_dot_product_attention(q, k[kv_rows], v[kv_rows], attn_mask=m)
        torch.testing.assert_close(expected, ref.transpose(1, 2).reshape(rows, -1), rtol=1e-5, atol=1e-5)
    for bad in (torch.tensor([0, 1, 2, 3, 0, 0, 0, 0]), torch.tensor([-1] * rows), kv_rows[:-1], kv_rows.int()):
        with pytest.raises(RuntimeError, match="attend_one"):
            attend(q, k, v, None, bad)


def test_attend_one_reads_each_key_through_a_table_of_rows():
    """With kv_rows (N, L), row r's key j lies in row kv_rows[r, j] of the buffers (a reordered history)."""
    if not native.build().panels_supported():
        pytest.skip("attend_one needs a CPU with AVX2 and FMA")
    torch.manual_seed(5)
    buffer_rows, rows, heads, length, head_dim = 6, 4, 2, 9, 64
    q = torch.randn(rows, heads, 1, head_dim)
    k, v = (torch.randn(buffer_rows, heads, length + 7, head_dim)[:, :, :length] for _ in range(2))
    table = torch.randint(0, buffer_rows, (rows, length))
    position = torch.arange(length)
    own_k, own_v = (x[table, :, position].transpose(1, 2) for x in (k, v))  # (N,H,L,Dh): each row's own keys
    attend = native.build().attend_one
    torch.testing.assert_close(attend(q, k, v, None, table), attend(q, own_k.contiguous(), own_v.contiguous()),
                               rtol=0, atol=0)
    ref = torch.nn.functional.scaled_dot_product_attention(q, own_k, own_v)
    torch.testing.assert_close(attend(q, k, v, None, table), ref.transpose(1, 2).reshape(rows, -1), rtol=1e-5,
                               atol=1e-5)
    with pytest.raises(RuntimeError, match="attend_one"):
        attend(q, k, v, None, table[:, :-1])


def test_indexed_history_equals_a_copied_one():
    """IndexedKV (reorders move a table of rows) against KVCache (reorders copy the keys): the same history
    through appends, beam reorders, an expansion to more rows, pruning and growth past its capacity."""
    from transformer.model.attention import KVCache
    from transformer.model.frozen import IndexedKV

    torch.manual_seed(6)
    copied, indexed = KVCache(), IndexedKV()
    orders = {3: torch.tensor([0, 0, 1, 1, 2, 2]), 5: torch.tensor([1, 0, 0, 5, 4, 3]), 9: torch.tensor([4, 1]),
              12: torch.tensor([1, 1, 0])}
    rows = 3
    for step in range(20):
        k, v = torch.randn(rows, 2, 1 if step else 2, 8), torch.randn(rows, 2, 1 if step else 2, 8)
        expected = copied.update(k, v)
        if step % 2:  # what attend_one reads: the buffers and the table
            keys, values, table = indexed.update_indexed(k, v)
            position = torch.arange(indexed.length)
            got = keys[table, :, position].transpose(1, 2), values[table, :, position].transpose(1, 2)
        else:  # gathered, for ATen's attention
            got = indexed.update(k, v)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        if step in orders:
            copied.reorder(orders[step]), indexed.reorder(orders[step])
            rows = orders[step].numel()
    assert indexed.length == copied.length == 21 and indexed.k.size(2) >= 21


@pytest.mark.parametrize("sentences,width,vocab,n", [(3, 4, 8000, 8), (5, 1, 37, 1), (2, 3, 5, 8), (1, 2, 3, 6)])
def test_step_candidates_are_beam_steps_candidates(sentences, width, vocab, n):
    """step_candidates against beam_step over next_token_logprobs: the same continuations, their scores to
    float rounding; banned ids (PAD, BOS) never taken, even as the largest logits; -inf logits and empty
    (-inf) hypotheses allowed; fewer continuations than asked are filled with (-inf, 0, fill)."""
    from transformer.data.vocab import BOS_ID, PAD_ID
    from transformer.decoding import beam_step
    from transformer.decoding.common import next_token_logprobs

    module = native.build()
    if not module.panels_supported():
        pytest.skip("step_candidates needs a CPU with AVX2 and FMA")
    torch.manual_seed(vocab + n)
    logits = torch.randn(sentences * width, vocab) * 4
    logits[:, PAD_ID] = logits[:, BOS_ID] = 50.0  # banned, though the largest
    logits[0, 2:] = torch.where(torch.rand(vocab - 2) < 0.3, float("-inf"), logits[0, 2:])
    scores = -torch.rand(sentences, width) * 3
    if width > 1:
        scores[0, 1] = float("-inf")  # an empty slot
    got = module.step_candidates(logits, scores, n, [PAD_ID, BOS_ID], PAD_ID)
    ref = beam_step(scores, next_token_logprobs(logits).view(sentences, width, vocab), n)
    finite = torch.isfinite(ref[0])
    torch.testing.assert_close(got[0][finite], ref[0][finite], rtol=1e-5, atol=1e-5)
    assert got[1][finite].tolist() == ref[1][finite].tolist() and got[2][finite].tolist() == ref[2][finite].tolist()
    assert bool(torch.isinf(got[0][~finite]).all())  # empty slots: -inf (a hypothesis's or the fill's)
    assert not got[2].eq(BOS_ID).any() and not got[2][finite].eq(PAD_ID).any()
    if n > width * (vocab - 2):  # fewer continuations than asked: the fill
        assert got[2][:, -1].eq(PAD_ID).all() and got[1][:, -1].eq(0).all()
    with pytest.raises(RuntimeError, match="step_candidates"):
        module.step_candidates(logits, scores[:, :1] if width > 1 else scores[:1], n, [], 0)


def _quantized(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (out, in) as qint8 with one symmetric scale per output channel (what quantize() stores)."""
    scale = weight.abs().amax(1).clamp_min(1e-8) / 127
    zeros = torch.zeros(weight.size(0), dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensors' deprecation notice
        return torch.quantize_per_channel(weight, scale.double(), zeros, 0, torch.qint8)


def _rounded_rows(x: torch.Tensor) -> torch.Tensor:
    """x (..., in) with each row rounded as panel_linear_w8a8 rounds it, back in float32: sx (u - z)."""
    u, z, sx = w8a8_row_rounding(x.reshape(-1, x.size(-1)))
    return ((u - z) * sx).float().reshape(x.shape)


@pytest.mark.parametrize("out_features", [1, 16, 40, 768])
def test_panel_linear_w8a8_is_the_same_on_two_threads(out_features):
    """From 17 rows the rounding and the products run in one team of threads with a barrier between them
    (tests run on one thread, conftest.py): on two, the same bits, whatever the split of rows and panels."""
    if not native.build().panels_supported():
        pytest.skip("panel_linear_w8a8 needs a CPU with AVX2 and FMA")
    torch.manual_seed(1)
    linear = torch.nn.Linear(64, out_features)
    int8 = _Int8Panels(_quantized(linear.weight.detach()), linear.bias, native.build())
    x = torch.randn(41, 64)
    threads = torch.get_num_threads()
    with torch.no_grad():
        one = [int8(x[:rows], relu=relu) for rows in (16, 17, 33, 41) for relu in (False, True)]
        torch.set_num_threads(2)
        try:
            two = [int8(x[:rows], relu=relu) for rows in (16, 17, 33, 41) for relu in (False, True)]
        finally:
            torch.set_num_threads(threads)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


@pytest.mark.parametrize("out_features,in_features", [(16, 8), (40, 7), (1, 64), (768, 256), (17, 1), (33, 2050)])
def test_panel_linear_w8a8_computes_the_int8_product_exactly(out_features, in_features):
    """Each row rounded to 7-bit unsigned values with its own scale and zero point, the products by the int8
    weights summed exactly (the int32 sums of the rounded values, also at the extremes where AVX2's 16-bit
    pair sums could saturate: u = 127 against a pair of q = -128), whatever the number of rows (tiles of 3
    and a rest), each row's result independent of the other rows."""
    if not native.build().panels_supported():
        pytest.skip("panel_linear_w8a8 needs a CPU with AVX2 and FMA")
    torch.manual_seed(out_features)
    linear = torch.nn.Linear(in_features, out_features)
    w_q = _quantized(linear.weight.detach())
    q = w_q.int_repr()
    q[:, :2], q[0, -1] = -128, 127  # PyTorch's per-channel quantisation gives -128 too
    w_q = torch._make_per_channel_quantized_tensor(q, w_q.q_per_channel_scales(), w_q.q_per_channel_zero_points(), 0)
    int8 = _Int8Panels(w_q, linear.bias, native.build())
    groups = -(-in_features // 4)
    assert int8.quad_panels.dtype == torch.int8 and int8.quad_panels.shape == (-(-out_features // 16), groups, 64)
    assert torch.equal(int8.int8_weight(), w_q.int_repr())
    q, s = w_q.int_repr().double(), w_q.q_per_channel_scales().double()  # (out, in), (out,)
    x = torch.randn(40, in_features + 3)[:, 2 : 2 + in_features]  # not contiguous
    x[5] = 0  # an all-zero row
    x[7, 0] = 1e3  # a row whose other values round to the zero point
    x[8] = torch.where(torch.arange(in_features) % 2 == 0, 1.0, -1.0)  # u = 0 and 127 (clamped from 128)
    x[9] = 1.0  # u = 127 everywhere: 127 * -128 twice, the largest pair sums (2 * 127 * 128)
    x[11] = x[11].abs()  # non-negative (after a ReLU): z = 0
    tiny = x[10] * 1e-39  # subnormal values, whose 127 / (hi - lo) overflows float32
    u, z, sx = w8a8_row_rounding(x)
    assert u[9].eq(127).all() and z[11].eq(0).all()
    sums = (u - z) @ q.t()  # (N, out), exact in float64
    expected = (sums * sx * s + linear.bias.detach().double()).float()
    with torch.no_grad():
        whole = int8(x)
        torch.testing.assert_close(whole, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(whole, _rounded_rows(x) @ int8.float_weight().t() + linear.bias,
                                   rtol=1e-4, atol=1e-4)
        assert torch.equal(whole[5], linear.bias.detach())
        # weight scales of 1e30 keep the subnormal row's outputs in float32's normal range
        big = torch._make_per_channel_quantized_tensor(w_q.int_repr(), w_q.q_per_channel_scales() * 1e30,
                                                        w_q.q_per_channel_zero_points(), 0)
        t = tiny.double()
        lo, hi = min(t.min().item(), 0.0), max(t.max().item(), 0.0)
        z_t = round(-lo / (hi - lo) * 127)
        u_t = (torch.round(t / (hi - lo) * 127) + z_t).clamp(0, 127)  # (in,) integers
        expected_tiny = ((u_t - z_t) @ q.t()) * ((hi - lo) / 127) * (s * 1e30)
        torch.testing.assert_close(_Int8Panels(big, None, native.build())(tiny[None])[0].double(), expected_tiny,
                                   rtol=1e-4, atol=1e-30)
        for rows in (1, 2, 3, 4, 13):  # a partial tile, one, tiles of 3 and a rest
            assert torch.equal(int8(x[:rows]), whole[:rows]), rows
        assert torch.equal(torch.cat([int8(x[i : i + 1]) for i in range(40)]), whole)
        assert int8(x[:0]).shape == (0, out_features)
        no_bias = _Int8Panels(w_q, None, native.build())
        torch.testing.assert_close(no_bias(x), whole - linear.bias, rtol=1e-4, atol=1e-4)
        for rows in (2, 40):  # ReLU in the epilogue
            assert torch.equal(int8(x[:rows], relu=True), torch.relu(whole[:rows]))
    with pytest.raises(RuntimeError, match="panel_linear_w8a8"):
        native.build().panel_linear_w8a8(torch.randn(2, 4 * groups + 4), int8.quad_panels, int8.colsums, int8.scales,
                                         int8.bias_panels, out_features)
    with pytest.raises(RuntimeError, match="panel_linear_w8a8"):  # float panels where int8 ones belong
        native.build().panel_linear_w8a8(x, int8.quad_panels.float(), int8.colsums, int8.scales, int8.bias_panels,
                                         out_features)
    with pytest.raises(RuntimeError, match="panel_linear_w8a8"):  # float column sums
        native.build().panel_linear_w8a8(x, int8.quad_panels, int8.colsums.float(), int8.scales, int8.bias_panels,
                                         out_features)


def _dequantized_copy(model, int8_model):
    """``model`` with each Linear's weight replaced by the float32 weight Q * s of its int8 copy, and its input
    rounded per row as panel_linear_w8a8 rounds it."""
    ref = copy.deepcopy(model)
    modules = dict(int8_model.named_modules())
    for name, module in ref.named_modules():
        if type(module) is torch.nn.Linear:
            w_q = modules[name].weight()
            module.weight = torch.nn.Parameter(w_q.int_repr().float() * w_q.q_per_channel_scales().float()[:, None])
            module.register_forward_pre_hook(lambda _, args: (_rounded_rows(args[0]),))
    # in eval mode the output layer multiplies by its weight without calling lm_head (transformer._OutputLayer)
    ref.output.register_forward_pre_hook(lambda _, args: (_rounded_rows(args[0]),))
    return ref.eval()


def _at_each_level(module, compute):
    """``compute()`` (a list of tensors) at each instruction level this CPU has; skips with fewer than two."""
    levels = cpu_levels(module)
    if len(levels) < 2:
        pytest.skip(f"this CPU runs the kernels at one level only ({levels})")
    results = []
    for level in levels:
        with at_cpu_level(module, level):
            results.append([t.clone() for t in compute()])
    return levels, results


@torch.no_grad()
@pytest.mark.parametrize("threads", [1, 2])
def test_panel_products_are_the_same_bits_at_every_cpu_level(threads):
    """panel_linear and panel_linear_w8a8 give the same bits with AVX2 as with AVX-512 (16-float panels) and
    AVX-512 VNNI (vpdpbusd), where this CPU has them: the same operations per output in the same order, the
    int8 sums exact (u = 127 against q = -128 included), at tile sizes of both forms and their rests."""
    module = native.build()
    torch.manual_seed(threads)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for out_features, in_features in [(16, 8), (40, 7), (1, 64), (768, 256), (17, 1), (33, 2050)]:
            linear = torch.nn.Linear(in_features, out_features)
            dense = _Dense(linear.weight, linear.bias, "decoder", module)
            w_q = _quantized(linear.weight.detach())
            q = w_q.int_repr()
            q[:, :2] = -128
            w_q = torch._make_per_channel_quantized_tensor(q, w_q.q_per_channel_scales(),
                                                            w_q.q_per_channel_zero_points(), 0)
            int8 = _Int8Panels(w_q, linear.bias, module)
            for rows in (1, 2, 3, 5, 6, 7, 8, 9, 13, 17, 41):
                x = torch.randn(rows, in_features + 3)[:, 2 : 2 + in_features]  # not contiguous
                x[0] = 1.0  # u = 127 everywhere
                levels, results = _at_each_level(
                    module, lambda x=x, d=dense, q=int8: [d(x), d(x, relu=True), q(x), q(x, relu=True)])
                for level, result in zip(levels[1:], results[1:]):
                    for name, a, b in zip(("fp32", "fp32 relu", "int8", "int8 relu"), results[0], result):
                        assert torch.equal(a, b), (level, name, out_features, in_features, rows)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("b,h,t,s,dh", [(3, 4, 32, 32, 64), (2, 2, 7, 13, 8), (2, 3, 33, 20, 24), (1, 2, 17, 17, 40)])
def test_training_kernels_are_the_same_bits_at_every_cpu_level(b, h, t, s, dh):
    """Training's attention (its products in 16-float tiles with AVX-512, 8-wide rests masked) and the loss's
    passes over the logits (exp_16, its sums still added 8 lanes at a time), and decoding's candidates: the same
    bits at every level, with and without masks."""
    module = native.build()
    torch.manual_seed(t + s)
    q = torch.randn(b, t, h, dh).transpose(1, 2)  # (B,H,T,Dh) views of (B,T,H,Dh), as the projections give
    k, v = torch.randn(b, s, h, dh).transpose(1, 2), torch.randn(b, s, h, dh).transpose(1, 2)
    grad = torch.randn(b, h, t, dh)
    key_mask = torch.rand(b, s) < 0.8
    key_mask[:, 0] = True
    logits = torch.randn(b * t, 1003 + s) * 4  # widths with 16-, 8- and 1-float rests
    scores = torch.randn(b * t // 2 if t % 2 == 0 else b * t, 2 if t % 2 == 0 else 1)

    def compute():
        out = []
        for mask, causal in ((None, False), (key_mask, False)) + (((None, True),) if t == s else ()):
            o, p = module.attention_forward(q, k, v, mask, causal, dh**-0.5)
            out += [o, p, *module.attention_backward(grad, q, k, v, p, causal, dh**-0.5)]
        exps = logits.clone()
        out += [exps, module.exp_rows_(exps)]
        out += module.step_candidates(logits, scores, 3, [0, 1], 0)[:1]
        return out

    levels, results = _at_each_level(module, compute)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(results[-1][0], expected, rtol=1e-4, atol=1e-4)
    for level, result in zip(levels[1:], results[1:]):
        for i, (x, y) in enumerate(zip(results[0], result)):
            assert torch.equal(x, y), (level, i)


def test_set_cpu_level_checks_its_argument():
    with pytest.raises(RuntimeError, match="set_cpu_level"):
        native.build().set_cpu_level(1)


def test_cpu_level_from_the_environment(monkeypatch):
    """TRANSFORMER_CPU_LEVEL caps the kernels' level when the extension is loaded; another value is a clear
    error naming the variable."""
    module = native.build()
    if module.cpu_level() < 2:
        pytest.skip("this CPU lacks AVX2")
    try:
        monkeypatch.setenv("TRANSFORMER_CPU_LEVEL", "avx2")
        assert native._with_cpu_level(module).cpu_level() == 2
        monkeypatch.setenv("TRANSFORMER_CPU_LEVEL", "sse")
        with pytest.raises(TransformerError, match="TRANSFORMER_CPU_LEVEL='sse'"):
            native._with_cpu_level(module)
    finally:
        module.set_cpu_level(4)


@torch.no_grad()
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rows", [1, 7, 40])
def test_int8_model_on_the_extension(variant, rows):
    """An int8 model frozen with the extension runs int8 products in the compiled step (bit for bit the Python
    step on them) and computes what the float model with the int8 weights Q * s and its Linear layers' inputs
    rounded per row (7-bit unsigned, a zero point) computes."""
    if not native.build().panels_supported():
        pytest.skip("panel_linear_w8a8 needs a CPU with AVX2 and FMA")
    model = _transformer(**variant)
    q = quantize(model, "int8")
    compiled, python = _compiled_and_python(q)
    assert isinstance(compiled.decoder.layers[0].qkv, _Int8Panels) and isinstance(compiled.decoder.output, _Int8Panels)
    assert isinstance(compiled.encoder.layers[0].fc1, _Int8Panels)
    ref = _dequantized_copy(model, q)
    src, tgt = SRC.repeat(rows, 1)[:rows], _tokens(rows, 8)
    enc, ref_enc = compiled.encode(src), ref.encode(src)
    a, b, c = compiled.new_cache(), python.new_cache(), ref.new_cache()
    close_rows = []
    for t in range(tgt.size(1)):
        out = compiled.decode(tgt[:, t : t + 1], enc, a)
        assert torch.equal(out, python.decode(tgt[:, t : t + 1], enc, b)), f"step {t}"
        expected = ref.decode(tgt[:, t : t + 1], ref_enc, c)  # (B,1,V)
        # An activation within float rounding of a half step rounds the other way in one of the two (their
        # float sums differ in order), which moves that row a little; every other row agrees to 1e-4.
        close_rows.append((out - expected).abs().amax((1, 2)) <= 1e-4 + 1e-4 * expected.abs().amax((1, 2)))
        torch.testing.assert_close(out, expected, rtol=0, atol=0.05 * float(expected.abs().max()))
    assert torch.cat(close_rows).float().mean() >= 0.9


@torch.no_grad()
@pytest.mark.parametrize("rows", [1, INTEL_AVX512_PANEL_ROWS + 1, PANEL_ROWS["decoder"], PANEL_ROWS["decoder"] + 1])
def test_compiled_products_compute_what_the_model_computes(rows):
    """With the compiled step and panel_linear, the frozen decoder's logits are the model's (up to the sum
    order), as they are without them."""
    model = _transformer(norm_first=True, positional="sinusoidal")
    compiled, python = freeze(model, native=True), freeze(model, native=False)
    src, tgt = SRC.repeat(rows, 1)[:rows], _tokens(rows, 6)
    enc_c, enc_p = compiled.encode(src), python.encode(src)
    a, b = compiled.new_cache(), python.new_cache()
    full = model(src, tgt)  # (B,T,V)
    for t in range(tgt.size(1)):
        out, ref = compiled.decode(tgt[:, t : t + 1], enc_c, a), python.decode(tgt[:, t : t + 1], enc_p, b)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out[:, 0], full[:, t], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_beams_read_their_sources_keys_through_kv_rows():
    """With attend_one, reordering the encoder output (beam expansion, pruning) moves row indices, not the
    source keys/values; the compiled and the Python step then give what copied keys give."""
    if not native.build().panels_supported():
        pytest.skip("attend_one needs a CPU with AVX2 and FMA")
    model = _transformer(norm_first=False, positional="sinusoidal")
    compiled, python = _compiled_and_python(model)
    plain = freeze(model, native=False)
    order = torch.arange(SRC.size(0)).flip(0).repeat_interleave(3)  # each source to 3 rows, in a new order
    pruned = torch.tensor([5, 0, 1, 3])
    tgt = _tokens(order.numel(), 6)
    outs = []
    for frozen in (compiled, python, plain):
        enc = frozen.encode(SRC).reorder(order)
        cache = frozen.new_cache()
        logits = [frozen.decode(tgt[:, t : t + 1], enc, cache) for t in range(3)]
        enc = enc.reorder(pruned)
        cache.reorder(pruned)
        logits += [frozen.decode(tgt[pruned, t : t + 1], enc, cache) for t in range(3, 6)]
        outs.append(logits)
        if frozen is plain:
            assert not enc.shared and enc.kv_rows is None and enc.cross_kv[0][0].size(0) == pruned.numel()
        else:
            assert enc.shared and enc.cross_kv[0][0].size(0) == SRC.size(0)
            assert enc.kv_rows.tolist() == order[pruned].tolist()
    for ours, python_step, ref in zip(*outs):
        torch.testing.assert_close(ours, python_step, rtol=0, atol=0)
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_searches_on_the_compiled_step_give_the_same_outputs():
    model = _transformer(norm_first=False, positional="sinusoidal")
    compiled, python = freeze(model, native=True), freeze(model, native=False)
    assert [h.tokens for h in greedy_search(compiled, SRC, 0.0, 15)] == \
           [h.tokens for h in greedy_search(python, SRC, 0.0, 15)]
    assert [[h.tokens for h in n] for n in beam_search(compiled, SRC, 4, 0.6, 0.0, 15, 2)] == \
           [[h.tokens for h in n] for n in beam_search(python, SRC, 4, 0.6, 0.0, 15, 2)]
    lm = _lm()
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert list(sample(freeze(lm, native=True), [5, 6, 7], 12, 1.0, 0, 1.0, g1)) == \
           list(sample(freeze(lm, native=False), [5, 6, 7], 12, 1.0, 0, 1.0, g2))


@torch.no_grad()
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("rows", [1, 70])  # 70: float32 products in panels, then fewer rows as sentences end
def test_compiled_greedy_loop_equals_the_python_loop(variant, int8, rows):
    """DecoderStep.greedy (the whole search in C++) gives greedy_search's Python loop's tokens and float32 scores,
    bit for bit: sentences ending by EOS at different steps (the batch shrinking) and at their length limits."""
    from transformer.decoding.common import python_loop

    model = _eos_sometimes(_transformer(**variant))
    src = _random_sources(rows, V)
    frozen = freeze(quantize(model) if int8 else model, native=True)
    limit = src.ne(PAD_ID).sum(1) + 3  # greedy_search(.., 1.0, 3)'s limits
    assert frozen.compiled_greedy(frozen.encode(src), limit, [PAD_ID]) is not None  # the compiled loop runs here
    compiled = greedy_search(frozen, src, 1.0, 3)
    with python_loop():
        python = greedy_search(frozen, src, 1.0, 3)
    assert [(h.tokens, h.score) for h in compiled] == [(h.tokens, h.score) for h in python]
    if variant == VARIANTS[0].values[0] and rows > 1:  # both ways of ending a sentence are taken
        ended = [len(h.tokens) + 1 < n for h, n in zip(compiled, limit.tolist())]
        assert 5 <= sum(ended) <= rows - 5


def _eos_sometimes(model):
    """The EOS row of the output map made a random direction: EOS wins at some steps only."""
    weight = model.output.lm_head.weight
    weight[EOS_ID] = torch.randn(weight.size(1), generator=torch.Generator().manual_seed(1)) * (
        2.0 * weight.norm(dim=1).mean() / weight.size(1) ** 0.5)
    return model


def _random_sources(rows, vocab, seed=0):
    """rows sources of 1..11 real tokens (EOS last), right-padded to 12 -> (rows, 12)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 12, (rows,), generator=g)
    src = torch.randint(4, vocab, (rows, 12), generator=g)
    src[torch.arange(12)[None, :] >= lengths[:, None]] = PAD_ID
    src[torch.arange(rows), lengths - 1] = EOS_ID
    return src


@torch.no_grad()
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("rows", [1, 20])  # 20 sentences: 80 rows of float32 products in panels, fewer as they end
def test_compiled_beam_loop_equals_the_python_loop(variant, int8, rows):
    """DecoderStep.beam (the whole search in C++) gives beam_search's Python loop's hypotheses, float32 sums and
    ranking, bit for bit: sentences ending with K finished hypotheses at different steps (the batch shrinking)
    and at their length limits, both length penalties, n-best lists."""
    from transformer.decoding.common import python_loop

    model = _eos_sometimes(_transformer(**variant))
    src = _random_sources(rows, V)
    frozen = freeze(quantize(model) if int8 else model, native=True)
    limit = src.ne(PAD_ID).sum(1) + 3  # beam_search(.., 1.0, 3)'s limits
    assert frozen.compiled_beam(frozen.encode(src), limit, 4, [PAD_ID]) is not None  # the compiled loop runs here
    for alpha, form, nbest in ((0.6, "gnmt", 1), (1.0, "power", 4)):
        compiled = beam_search(frozen, src, 4, alpha, 1.0, 3, nbest, form)
        with python_loop():
            python = beam_search(frozen, src, 4, alpha, 1.0, 3, nbest, form)
        assert compiled == python
    if variant == VARIANTS[0].values[0] and rows > 1:  # both ways of ending a sentence are taken
        hyps = frozen.compiled_beam(frozen.encode(src), limit, 4, [PAD_ID])
        at_limit = {s for s, tokens, _ in hyps if len(tokens) + 1 == limit[s]}
        assert 3 <= len(at_limit) <= rows - 3


@torch.no_grad()
@pytest.mark.parametrize("beam", [1, 25, 30])  # 2K < V; 2K = V (one top-k over w V); 2K > V (empty slots)
@pytest.mark.parametrize("max_len_b", [-5, 1])  # every sentence at its limit from the first step; a step later
def test_compiled_beam_loop_at_its_edges(beam, max_len_b):
    from transformer.decoding.common import python_loop

    frozen = freeze(_eos_sometimes(_transformer(norm_first=False, positional="sinusoidal")), native=True)
    src = _random_sources(2, V, seed=1)
    compiled = beam_search(frozen, src, beam, 0.6, 0.5, max_len_b, beam)
    with python_loop():
        python = beam_search(frozen, src, beam, 0.6, 0.5, max_len_b, beam)
    assert compiled == python and all(compiled)


@torch.no_grad()
def test_compiled_beam_loop_leaves_more_rows_than_its_products_take_to_python(monkeypatch):
    frozen = freeze(_transformer(norm_first=False, positional="sinusoidal"), native=True)
    monkeypatch.setitem(frozen_module.PANEL_ROWS, "decoder", 256)  # the thresholds of a CPU other than an
    monkeypatch.setitem(frozen_module.PACKED_FROM_ROWS, "decoder", 64)  # Intel one with AVX-512
    src = _random_sources(70, V)  # 70 x 4 = 280 rows > PANEL_ROWS: float32 products in oneDNN, not the compiled step
    limit = src.ne(PAD_ID).sum(1) + 3
    assert frozen.compiled_beam(frozen.encode(src), limit, 4, [PAD_ID]) is None
    int8 = freeze(quantize(_transformer(norm_first=False, positional="sinusoidal")), native=True)
    assert int8.compiled_beam(int8.encode(src), limit, 4, [PAD_ID]) is not None  # int8 panels take any number


class _FakeExtension:
    def __init__(self, level, intel=True):
        self.level, self.intel = level, intel

    def cpu_level(self):
        return self.level

    def cpu_is_intel(self):
        return self.intel


def test_the_extension_knows_an_intel_cpu(built):
    if not os.path.exists("/proc/cpuinfo"):
        pytest.skip("no /proc/cpuinfo to compare with")
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
        vendors = {line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")}
    assert built.cpu_is_intel() == (vendors == {"GenuineIntel"})


@pytest.mark.parametrize("intel, level, tuned", [(True, 3, True), (True, 4, True), (True, 2, False),
                                                 (False, 4, False), (False, 3, False)])
def test_product_thresholds_follow_the_cpu(monkeypatch, intel, level, tuned):
    """On an Intel CPU whose kernels take their AVX-512 forms the decoder's and the output's panels stop at
    INTEL_AVX512_PANEL_ROWS rows and the decoder's products stay in MKL above; elsewhere the thresholds stay."""
    monkeypatch.setattr(frozen_module, "PANEL_ROWS", {"output": 256, "encoder": 256, "decoder": 256})
    monkeypatch.setattr(frozen_module, "PACKED_FROM_ROWS", {"output": 2, "encoder": 2, "decoder": 64})
    monkeypatch.setattr(frozen_module, "_TUNED", [])
    frozen_module._tune_for_cpu(_FakeExtension(level, intel))
    panels = frozen_module.INTEL_AVX512_PANEL_ROWS if tuned else 256
    assert frozen_module.PANEL_ROWS == {"output": panels, "encoder": 256, "decoder": panels}
    assert frozen_module.PACKED_FROM_ROWS["decoder"] == (1 << 30 if tuned else 64)
    # once per process: a second call, on another CPU, changes nothing
    frozen_module._tune_for_cpu(_FakeExtension(2 if tuned else 4, not intel))
    assert frozen_module.PANEL_ROWS["decoder"] == panels


def test_compiled_step_is_optional(monkeypatch):
    model = _transformer(norm_first=False, positional="sinusoidal")
    assert freeze(model).decoder.native is not None  # built (the fixture): used by default
    monkeypatch.setenv("TRANSFORMER_NATIVE", "0")
    native._loaded.clear()
    assert native.load() is None and freeze(model).decoder.native is None
    monkeypatch.setenv("TRANSFORMER_NATIVE", "1")
    native._loaded.clear()
    assert native.load() is not None
    assert freeze(quantize(model, "int8")).decoder.native is not None  # int8 too (its panels)
    assert freeze(quantize(model, "int8"), native=False).decoder.native is None


def test_not_built_means_the_python_step(monkeypatch, tmp_path):
    monkeypatch.setenv("TRANSFORMER_NATIVE_DIR", str(tmp_path))  # an empty cache: nothing built there
    native._loaded.clear()
    try:
        assert native.load() is None
        model = _transformer(norm_first=False, positional="sinusoidal")
        assert freeze(model).decoder.native is None
    finally:
        monkeypatch.undo()
        native._loaded.clear()


def test_build_reuses_what_is_built_without_the_compiler(monkeypatch):
    """A second build (another process, a reinstall that touched the source's time) imports the library
    built for this source and flags instead of compiling again."""
    native.build()

    def compiler(**kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr("torch.utils.cpp_extension.load", compiler)
    saved = dict(native._loaded)
    native._loaded.clear()
    try:
        assert native.build() is not None
    finally:
        native._loaded.clear()
        native._loaded.update(saved)


def test_build_native_command(capsys, monkeypatch, tmp_path):
    from transformer.cli import main

    assert main(["build-native"]) == 0
    assert ".so" in capsys.readouterr().out

    def no_compiler(**kwargs):
        raise RuntimeError("Error building extension\ng++: not found")

    monkeypatch.setenv("TRANSFORMER_NATIVE_DIR", str(tmp_path))
    monkeypatch.setattr("torch.utils.cpp_extension.load", no_compiler)
    native._loaded.clear()
    try:
        assert main(["build-native"]) == 2
        err = capsys.readouterr().err
        assert "could not build the compiled decoder step" in err and "g++: not found" in err
        assert str(tmp_path) in err and "Traceback" not in err
    finally:
        monkeypatch.undo()
        native._loaded.clear()


@pytest.mark.parametrize("rows,width", [(1, 256), (7, 20), (300, 256), (5, 3)])  # 300 rows: split among threads
def test_add_layer_norm_computes_layer_norm(rows, width):
    """LayerNorm(x + residual) and LayerNorm(x) in one pass against ATen's add and layer_norm."""
    if not native.build().panels_supported():
        pytest.skip("add_layer_norm needs a CPU with AVX2 and FMA")
    torch.manual_seed(rows + width)
    norm = torch.nn.LayerNorm(width)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    x = torch.randn(rows, width + 2)[:, 1 : 1 + width] * 3 + 1  # not contiguous, not centred
    residual = torch.randn(rows, width)
    kernel = native.build().add_layer_norm
    with torch.no_grad():
        torch.testing.assert_close(kernel(x, residual, norm.weight, norm.bias, norm.eps), norm(x + residual),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kernel(x, None, norm.weight, norm.bias, norm.eps), norm(x), rtol=1e-5, atol=1e-5)
    assert kernel(x[:0], None, norm.weight, norm.bias, 1e-5).shape == (0, width)
    with pytest.raises(RuntimeError, match="add_layer_norm"):
        kernel(x, residual[:, :-1], norm.weight, norm.bias, 1e-5)


@pytest.mark.parametrize("heads,head_dim", [(4, 64), (2, 5)])
def test_attend_spans_is_each_sentences_own_attention(heads, head_dim):
    """attend_spans over the packed real tokens of sentences of different lengths (one of none) equals SDPA
    on the padded layout with its padding mask, at the real tokens."""
    if not native.build().panels_supported():
        pytest.skip("attend_spans needs a CPU with AVX2 and FMA")
    torch.manual_seed(head_dim)
    lengths = [5, 1, 0, 9, 3]
    b, s, d = len(lengths), max(lengths), heads * head_dim
    mask = torch.arange(s)[None, :] < torch.tensor(lengths)[:, None]  # (B,S)
    qkv = torch.randn(b * s, 3 * d)
    real = mask.view(-1).nonzero().squeeze(1)
    q, k, v = qkv.view(b, s, 3, heads, head_dim).permute(2, 0, 3, 1, 4)  # (B,H,S,Dh) each
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    ref = ref.transpose(1, 2).reshape(b * s, d)[real]  # (N,D): the real tokens' rows
    spans = torch.nn.functional.pad(torch.tensor(lengths).cumsum(0), (1, 0))
    got = native.build().attend_spans(qkv[real], spans, heads)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="attend_spans"):
        native.build().attend_spans(qkv[real], spans + 1, heads)


def test_source_heads_is_the_padded_layout_per_head():
    """source_heads scatters the real tokens' keys/values into (L, 2, B, H, S, Dh), zeros at the padding:
    what the padded product, reshaped and permuted, gives."""
    torch.manual_seed(0)
    b, s, layers, heads, dh = 3, 6, 2, 4, 8
    mask = torch.arange(s)[None, :] < torch.tensor([6, 2, 4])[:, None]
    kv = torch.randn(b * s, layers * 2 * heads * dh) * mask.view(-1, 1)  # zeros at the padding
    expected = kv.view(b, s, layers, 2, heads, dh).permute(2, 3, 0, 4, 1, 5)  # (L,2,B,H,S,Dh)
    real = mask.view(-1).nonzero().squeeze(1)
    source_heads = native.build().source_heads
    assert torch.equal(source_heads(kv[real], real, b, s, layers, heads), expected)
    assert torch.equal(source_heads(kv, None, b, s, layers, heads), expected)
    with pytest.raises(RuntimeError, match="source_heads"):
        source_heads(kv[real], real + b * s, b, s, layers, heads)


@torch.no_grad()
def test_compiled_step_without_the_output_panels_stops_at_the_last_layer():
    """Where the output map has no panels, the compiled step runs the layers and Python the logits (the form
    used on a CPU whose output map runs elsewhere): the same logits as the whole compiled step."""
    model = _transformer()
    whole, layers_only = freeze(model, native=True), freeze(model, native=True)
    layers_only.decoder.native_logits = False
    src, tgt = SRC, _tokens(SRC.size(0), 6)
    enc = whole.encode(src)
    a, b = whole.new_cache(), layers_only.new_cache()
    for t in range(tgt.size(1)):
        assert torch.equal(whole.decode(tgt[:, t : t + 1], enc, a), layers_only.decode(tgt[:, t : t + 1], enc, b))
