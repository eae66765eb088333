"""Our MultiHeadAttention against PyTorch's nn.MultiheadAttention with the same weights, and the KV cache."""

import pytest
import torch
from torch import nn

from transformer.model.attention import KVCache, MultiHeadAttention

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
