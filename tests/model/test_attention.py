"""Our MultiHeadAttention against PyTorch's nn.MultiheadAttention with the same weights, and the KV cache."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transformer.model import attention as attention_module
from transformer.model.attention import KVCache, MultiHeadAttention, attention, flash_attention

from native_helpers import built_kernel

D, H, B, T, S = 32, 4, 3, 5, 7


@pytest.fixture
def pair():
    torch.manual_seed(0)
    ours = MultiHeadAttention(D, H).eval()
    ref = nn.MultiheadAttention(D, H, batch_first=True).eval()
    with torch.no_grad():
        nn.init.normal_(ref.in_proj_bias)  # PyTorch zeroes biases; random ones make the check stronger
        nn.init.normal_(ref.out_proj.bias)
        q_w, k_w, v_w = ref.in_proj_weight.chunk(3)  # (3D,D) -> 3 x (D,D)
        q_b, k_b, v_b = ref.in_proj_bias.chunk(3)
        for proj, w, b in ((ours.q_proj, q_w, q_b), (ours.k_proj, k_w, k_b), (ours.v_proj, v_w, v_b)):
            proj.weight.copy_(w)
            proj.bias.copy_(b)
        ours.out_proj.weight.copy_(ref.out_proj.weight)
        ours.out_proj.bias.copy_(ref.out_proj.bias)
    return ours, ref


def _max_diff(a, b):
    return (a - b).abs().max().item()


def test_no_mask(pair):
    ours, ref = pair
    q, kv = torch.randn(B, T, D), torch.randn(B, S, D)
    expected, _ = ref(q, kv, kv, need_weights=False)
    assert _max_diff(ours(q, kv), expected) <= 1e-5


def test_key_padding_mask(pair):
    ours, ref = pair
    q, kv = torch.randn(B, T, D), torch.randn(B, S, D)
    lengths = torch.tensor([S, 4, 1])
    real_mask = torch.arange(S)[None, :] < lengths[:, None]  # (B,S) True = real key (ours: may attend)
    expected, _ = ref(q, kv, kv, key_padding_mask=~real_mask, need_weights=False)  # PyTorch: True = ignore
    got = ours(q, kv, attn_mask=real_mask[:, None, None, :])  # (B,1,1,S)
    assert _max_diff(got, expected) <= 1e-5


def test_causal_mask(pair):
    ours, ref = pair
    x = torch.randn(B, T, D)
    blocked = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)  # PyTorch: True = not allowed
    expected, _ = ref(x, x, x, attn_mask=blocked, need_weights=False)
    assert _max_diff(ours(x, x, is_causal=True), expected) <= 1e-5
    assert _max_diff(ours(x, x, attn_mask=~blocked), expected) <= 1e-5  # the same as an explicit bool mask


def test_kv_cache_grows_past_its_capacity_and_reorders():
    torch.manual_seed(0)
    cache = KVCache()
    ks = [torch.randn(2, H, n, 8) for n in (3, 1, 14, 1, 20)]  # 39 steps: grows 16 -> 32 -> 39
    for k in ks:
        all_k, all_v = cache.update(k, -k)
    expected = torch.cat(ks, dim=2)
    assert cache.length == 39
    assert torch.equal(all_k, expected) and torch.equal(all_v, -expected)
    cache.reorder(torch.tensor([1, 1, 0]))
    k, _ = cache.update(torch.zeros(3, H, 1, 8), torch.zeros(3, H, 1, 8))
    assert torch.equal(k[:, :, :39], expected[[1, 1, 0]])


# --- the compiled kernel for training's short sequences (attention.attention on the CPU) ---------------------


@pytest.fixture
def kernel(monkeypatch):
    """The extension's attention kernel, built if needed (skips without a compiler, AVX2 or with it off)."""
    return built_kernel(attention_module._KERNEL, monkeypatch)


def _heads(b, n, h, dh, seed):
    """(B,H,N,Dh) leaf tensors laid out as the projections give them: views of (B,N,H,Dh), Dh contiguous."""
    torch.manual_seed(seed)
    return [torch.randn(b, n, h, dh).transpose(1, 2).requires_grad_() for _ in range(3)]


@pytest.mark.parametrize("b,h,t,s,dh,causal,masked", [
    (2, 4, 32, 32, 64, False, False),  # the `small` preset's shape
    (2, 4, 32, 32, 64, True, False),  # the decoder's self-attention
    (3, 2, 13, 29, 64, False, True),  # cross-attention over padded sources; S not a multiple of 8
    (2, 3, 17, 17, 16, True, False),
    (4, 1, 5, 7, 8, False, True),
    (1, 1, 1, 1, 8, False, False),
    (2, 2, 128, 128, 32, True, False),
    (1, 2, 256, 256, 16, True, False),  # SHORT_MAX_LENGTH
    # causal with T != S (query i sees keys j <= i, as scaled_dot_product_attention) and rows that end a tile
    # part-way: the products skip what the mask zeroes by blocks of 4 rows and 8 columns
    (2, 2, 13, 29, 16, True, False),
    (2, 2, 29, 13, 16, True, False),
    (3, 1, 7, 7, 8, True, False),
])
def test_kernel_matches_sdpa_forward_and_backward(kernel, b, h, t, s, dh, causal, masked):
    q, k, v = _heads(b, t, h, dh, 0)[0], *_heads(b, s, h, dh, 1)[1:]
    mask = None
    if masked:
        lengths = torch.randint(1, s + 1, (b,), generator=torch.Generator().manual_seed(2))
        lengths[0] = s  # one full row, one of length 1 at least sometimes
        mask = (torch.arange(s)[None, :] < lengths[:, None])[:, None, None, :]  # (B,1,1,S)
    assert attention_module._short(q, k, v, mask, 0.0, causal) is kernel  # the kernel runs, not the fallback
    grad = torch.randn(b, h, t, dh)
    out = attention(q, k, v, attn_mask=mask, is_causal=causal)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    # reference in float64: both float32 paths are within rounding of it
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = F.scaled_dot_product_attention(q64, k64, v64, attn_mask=mask, is_causal=causal)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad.double())
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert (out.double() - ref).abs().max().item() <= 1e-5
    for got, want in zip(grads, ref_grads):
        assert got.shape == want.shape
        assert (got.double() - want).abs().max().item() <= 1e-5


def test_kernel_masks_keys_exactly_and_a_row_that_sees_none_is_zero(kernel):
    q, k, v = _heads(2, 4, 2, 8, 3)
    mask = torch.tensor([[True, False, True, False], [False, False, False, False]])[:, None, None, :]
    out = attention(q, k, v, attn_mask=mask)
    # sentence 0: only keys 0 and 2 count, so changing the masked keys' values changes nothing
    v2 = v.detach().clone()
    v2[0, :, 1] += 100.0
    v2[0, :, 3] -= 100.0
    with torch.no_grad():
        again = attention_module._ShortAttention.apply(q, k, v2, mask.reshape(2, 4), False, kernel)
    assert torch.equal(out[0].detach(), again[0])
    # sentence 1 sees no key: zeros, and zero gradients
    assert torch.equal(out[1].detach(), torch.zeros_like(out[1]))
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    for g in (dq, dk, dv):
        assert torch.equal(g[1], torch.zeros_like(g[1]))
    assert torch.equal(dk[0, :, 1], torch.zeros_like(dk[0, :, 1])) and torch.equal(dv[0, :, 3], torch.zeros_like(dv[0, :, 3]))


def test_kernel_outputs_are_laid_out_for_the_projections(kernel):
    q, k, v = _heads(2, 6, 4, 8, 4)
    out = attention(q, k, v)
    assert out.transpose(1, 2).is_contiguous()  # (B,T,H,Dh): merging the heads is a view
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert all(g.transpose(1, 2).is_contiguous() for g in (dq, dk, dv))


def test_kernel_takes_an_expanded_gradient_and_refuses_double_backward(kernel):
    q, k, v = _heads(2, 5, 2, 8, 8)
    attention(q, k, v, is_causal=True).sum().backward()  # the output's gradient: ones with zero strides
    got = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    for a, b in zip(got, (q.grad, k.grad, v.grad)):
        assert (a - b).abs().max().item() <= 1e-5
    dq, = torch.autograd.grad(attention(q, k, v).pow(2).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError):
        dq.sum().backward()


def test_fallback_where_the_kernel_does_not_apply(kernel):
    q, k, v = _heads(2, 8, 2, 8, 5)
    short = attention_module._short
    assert short(q, k, v, None, 0.0, False) is kernel
    assert short(q, k, v, None, 0.1, False) is None  # attention dropout
    with torch.no_grad():
        assert short(q, k, v, None, 0.0, False) is None  # inference
    frozen = [x.detach() for x in (q, k, v)]
    assert short(*frozen, None, 0.0, False) is None  # nothing to differentiate
    assert short(q.double(), k.double(), v.double(), None, 0.0, False) is None
    assert short(q, k, v, torch.ones(2, 1, 8, 8, dtype=torch.bool), 0.0, False) is None  # not a key mask
    assert short(q, k, v, torch.zeros(2, 1, 1, 8), 0.0, False) is None  # additive float mask
    q12, k12, v12 = _heads(2, 8, 2, 12, 6)
    assert short(q12, k12, v12, None, 0.0, False) is None  # head width not a multiple of 8
    n = attention_module.SHORT_MAX_LENGTH + 1
    ql, kl, vl = _heads(1, n, 1, 8, 7)
    assert short(ql, kl, vl, None, 0.0, True) is None  # long sequences: flash attention
    with flash_attention():
        assert short(q, k, v, None, 0.0, False) is None
    assert short(q, k, v, None, 0.0, False) is kernel


def test_training_step_gradients_equal_with_flash_attention(kernel):
    from transformer.config import ModelConfig
    from transformer.model import Transformer

    cfg = ModelConfig(d_model=32, n_heads=4, d_ff=64, n_encoder_layers=2, n_decoder_layers=2, dropout=0.0)
    torch.manual_seed(0)
    model = Transformer(cfg, 50, 50).train()
    src = torch.randint(4, 50, (3, 9))
    src[1, 6:] = 0  # padding: the encoder and cross-attention take the key mask
    tgt = torch.randint(4, 50, (3, 7))

    def grads():
        model.zero_grad()
        model(src, tgt).float().pow(2).mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    with flash_attention():
        reference = grads()
    got = grads()
    for a, b in zip(got, reference):
        assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("cross,masked,causal", [
    (False, False, False), (False, True, False), (False, False, True),  # encoder and decoder self-attention
    (True, False, False), (True, True, False),  # cross-attention, with padded sources
])
def test_packed_projections_equal_separate_ones(kernel, bias, cross, masked, causal):
    torch.manual_seed(0)
    mha = MultiHeadAttention(D, H, bias=bias).train()
    x = torch.randn(B, T, D, requires_grad=True)
    memory = torch.randn(B, S, D, requires_grad=True) if cross else x
    s = memory.size(1)
    mask = None
    if masked:
        mask = (torch.arange(s)[None, :] < torch.tensor([s, 2, 5])[:, None])[:, None, None, :]  # (B,1,1,S)
    assert mha._packable(x, memory, mask, causal) is kernel  # the packed path runs below

    def run():
        out = mha(x, memory, attn_mask=mask, is_causal=causal)
        inputs = [x, memory] if cross else [x]
        grads = torch.autograd.grad(out, inputs + list(mha.parameters()), grad_out)
        return out, grads

    grad_out = torch.randn(B, T, D, generator=torch.Generator().manual_seed(1))
    out, grads = run()
    with attention_module.separate_projections():
        assert mha._packable(x, memory, mask, causal) is None
        ref, ref_grads = run()
    assert _max_diff(out, ref) <= 1e-5
    for a, b in zip(grads, ref_grads):
        assert a.shape == b.shape and _max_diff(a, b) <= 1e-5


def test_projections_stay_separate_where_the_kernel_does_not_run(kernel):
    torch.manual_seed(0)
    mha = MultiHeadAttention(D, H).train()
    x = torch.randn(B, T, D)
    assert mha._packable(x, x, None, True) is kernel
    key_mask = torch.ones(B, 1, 1, T, dtype=torch.bool)
    assert mha._packable(x, x, key_mask, True) is None  # a key mask and causal: scaled_dot_product_attention
    assert mha._packable(x, x, torch.ones(B, 1, T, T, dtype=torch.bool), False) is None  # not a key mask
    with torch.no_grad():
        assert mha._packable(x, x, None, False) is None  # inference
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert mha._packable(x, x, None, False) is None
    assert mha._packable(x.double(), x.double(), None, False) is None
    long = torch.randn(1, attention_module.SHORT_MAX_LENGTH + 1, D)
    assert mha._packable(long, long, None, False) is None
    with flash_attention():
        assert mha._packable(x, x, None, False) is None
    assert MultiHeadAttention(D, H, dropout=0.1).train()._packable(x, x, None, False) is None
    assert MultiHeadAttention(24, 2).train()._packable(torch.randn(B, T, 24), torch.randn(B, T, 24), None,
                                                        False) is None  # head width 12


def test_kernel_backward_checks_the_tensors_it_writes_into(kernel):
    q, k, v = _heads(2, 5, 2, 8, 9)
    out, probs = kernel.attention_forward(q, k, v, None, False, 8 ** -0.5)
    grad = torch.randn_like(out)
    packed = torch.empty(2, 5, 3, 2, 8)  # (B,T,3,H,Dh): q, k, v's gradients side by side
    views = [packed[:, :, i].transpose(1, 2) for i in range(3)]
    dq, dk, dv = kernel.attention_backward(grad, q, k, v, probs, False, 8 ** -0.5, *views)
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip((dq, dk, dv), views))
    ref = kernel.attention_backward(grad, q, k, v, probs, False, 8 ** -0.5)
    for a, b in zip(views, ref):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="dk must be float32"):
        kernel.attention_backward(grad, q, k, v, probs, False, 8 ** -0.5, None, torch.empty(2, 2, 4, 8))
