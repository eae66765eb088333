"""The layers' CPU training path: the ReLU feed-forward network fused with the extension's kernels, against
``nn.Linear`` and ``F.relu`` (the same maths); a post-norm sub-layer's end (bias, dropout, residual, LayerNorm)
as one pass each way, against the separate ops with the same dropout mask; and where each applies."""

import pytest
import torch

from transformer.model import layers as layers_module
from transformer.config import ModelConfig
from transformer.model.layers import DecoderLayer, EncoderLayer, FeedForward, plain_feed_forward, unfused_add_norm

from native_helpers import built_kernel


@pytest.fixture
def kernel(monkeypatch):
    return built_kernel(layers_module._KERNEL, monkeypatch)


@pytest.fixture
def add_norm(monkeypatch):
    return built_kernel(layers_module._ADD_NORM, monkeypatch)


def _network(d_model: int, d_ff: int, **kwargs) -> FeedForward:
    torch.manual_seed(0)
    ff = FeedForward(d_model, d_ff, **kwargs).train()
    with torch.no_grad():  # non-zero biases: a dropped or misplaced one shows
        ff.fc1.bias.normal_()
        ff.fc2.bias.normal_()
    return ff


def _step(ff: FeedForward, x0: torch.Tensor, plain: bool):
    """(output, its autograd node's name, gradient of x, gradients of the parameters) of one weighted sum."""
    ff.zero_grad(set_to_none=True)
    x = x0.clone().requires_grad_()
    with plain_feed_forward() if plain else torch.enable_grad():
        y = ff(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), type(y.grad_fn).__name__, x.grad, {n: p.grad for n, p in ff.named_parameters()}


@pytest.mark.parametrize("shape", [(3, 5, 24, 70), (4, 50, 16, 64)])  # F not a multiple of 8; rows over 64
def test_fused_feed_forward_equals_linear_and_relu(kernel, shape):
    *rows, d_model, d_ff = shape
    ff = _network(d_model, d_ff)
    x0 = torch.randn(*rows, d_model)
    x0[0, 0] = -50.0  # a row whose hidden units are mostly off: zero gradients through the ReLU
    ours, ours_node, ours_dx, ours_grads = _step(ff, x0, plain=False)
    ref, ref_node, ref_dx, ref_grads = _step(ff, x0, plain=True)
    assert ours_node == "_ReluFeedForwardBackward" and ref_node != ours_node
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_dx, ref_dx, rtol=1e-5, atol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(ours_grads[name], ref_grads[name], rtol=1e-5, atol=1e-5, msg=name)


def test_fused_feed_forward_computes_only_the_gradients_asked_for(kernel):
    ff = _network(16, 40)
    ff.fc1.weight.requires_grad_(False)
    ff.fc2.bias.requires_grad_(False)
    x0 = torch.randn(2, 7, 16)
    _, node, dx, grads = _step(ff, x0, plain=False)
    assert node == "_ReluFeedForwardBackward"
    assert ff.fc1.weight.grad is None and ff.fc2.bias.grad is None
    _, _, ref_dx, ref_grads = _step(ff, x0, plain=True)
    torch.testing.assert_close(dx, ref_dx)
    for name in ("fc1.bias", "fc2.weight"):
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["no-grad", "gelu", "activation-dropout", "float64", "autocast"])
def test_plain_path_where_the_fused_form_does_not_apply(kernel, case):
    ff = _network(16, 32, activation="gelu" if case == "gelu" else "relu",
                  activation_dropout=0.1 if case == "activation-dropout" else 0.0)
    x = torch.randn(2, 3, 16, requires_grad=True)
    if case == "float64":
        ff, x = ff.double(), x.double()
    if case == "no-grad":
        context = torch.no_grad()
    elif case == "autocast":
        context = torch.autocast("cpu", dtype=torch.bfloat16)
    else:
        context = torch.enable_grad()
    with context:
        y = ff(x)
    assert y.grad_fn is None if case == "no-grad" else type(y.grad_fn).__name__ != "_ReluFeedForwardBackward"
    if case == "autocast":
        assert y.dtype == torch.bfloat16
    if case == "activation-dropout":  # dropout off in eval mode: the fused form applies (a gradient recorded)
        assert type(ff.eval()(x).grad_fn).__name__ == "_ReluFeedForwardBackward"


def _layer(kind: str, d_model: int, dropout: float, norm_first: bool = False):
    cfg = ModelConfig(d_model=d_model, n_heads=4, d_ff=2 * d_model, n_encoder_layers=1, n_decoder_layers=1,
                      dropout=dropout, norm_first=norm_first)
    torch.manual_seed(0)
    layer = EncoderLayer(cfg) if kind == "encoder" else DecoderLayer(cfg, cross_attention=kind == "decoder")
    with torch.no_grad():  # non-zero biases and norms off 1 and 0: a dropped or misplaced one shows
        for name, p in layer.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_()
    return layer.train()


def _layer_step(layer, kind: str, x0: torch.Tensor, memory0: torch.Tensor, unfused: bool):
    """(output, its autograd node's name, gradients of the inputs and parameters) of one weighted sum, the dropout
    masks drawn from seed 1."""
    layer.zero_grad(set_to_none=True)
    x, memory = x0.clone().requires_grad_(), memory0.clone().requires_grad_()
    source = x if kind == "encoder" else memory
    mask = torch.ones(x.size(0), 1, 1, source.size(1), dtype=torch.bool)
    mask[0, ..., 3:] = False  # a padded source
    torch.manual_seed(1)
    with unfused_add_norm() if unfused else torch.enable_grad():
        if kind == "encoder":
            y = layer(x, mask)
        elif kind == "decoder":
            y = layer(x, memory, memory_mask=mask, is_causal=True)
        else:  # a language model's layer: no cross-attention
            y = layer(x, is_causal=True)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    grads = {"x": x.grad, "memory": memory.grad, **{n: p.grad for n, p in layer.named_parameters()}}
    return y.detach(), type(y.grad_fn).__name__, grads


@pytest.mark.parametrize("kind", ["encoder", "decoder", "lm"])
@pytest.mark.parametrize("d_model,dropout", [(32, 0.1), (32, 0.0), (24, 0.3)])  # 24: rows not in 16-blocks
def test_fused_add_norm_equals_bias_dropout_residual_and_layer_norm(add_norm, kind, d_model, dropout):
    layer = _layer(kind, d_model, dropout)
    x0, memory0 = torch.randn(3, 7, d_model), torch.randn(3, 5, d_model)
    ours, ours_node, ours_grads = _layer_step(layer, kind, x0, memory0, unfused=False)
    ref, ref_node, ref_grads = _layer_step(layer, kind, x0, memory0, unfused=True)
    assert ours_node == "_AddNormBackward" and ref_node != ours_node
    if dropout:  # the same mask on both sides (one seed a sub-layer, from torch's generator), and a mask at all
        without = _layer_step(_layer(kind, d_model, 0.0), kind, x0, memory0, unfused=False)[0]
        assert (ours - without).abs().max() > 0.1
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert ours_grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        if grad is None:  # an encoder's or language model's memory
            assert ours_grads[name] is None, name
            continue
        torch.testing.assert_close(ours_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_fused_add_norm_computes_only_the_gradients_asked_for(add_norm):
    layer = _layer("encoder", 32, 0.1)
    layer.self_attn_norm.weight.requires_grad_(False)
    layer.ffn.fc2.bias.requires_grad_(False)
    x0 = torch.randn(2, 6, 32)
    _, node, grads = _layer_step(layer, "encoder", x0, x0, unfused=False)
    assert node == "_AddNormBackward"
    assert grads["self_attn_norm.weight"] is None and grads["ffn.fc2.bias"] is None
    _, _, ref = _layer_step(layer, "encoder", x0, x0, unfused=True)
    for name in ("x", "self_attn_norm.bias", "self_attn.out_proj.bias", "ffn_norm.weight", "ffn.fc1.weight"):
        torch.testing.assert_close(grads[name], ref[name], rtol=1e-4, atol=1e-5, msg=name)


def test_add_norm_kernel_is_layer_norm_of_the_residual_plus_the_hashed_dropout(add_norm):
    torch.manual_seed(0)
    for shape in [(4, 50, 64), (5, 13)]:  # rows over a task's 64; rows not in 16-blocks
        d = shape[-1]
        s, r, grad = torch.randn(shape), torch.randn(shape), torch.randn(shape)
        bias, weight, norm_bias = torch.randn(d), torch.randn(d), torch.randn(d)
        seed, dropped, scale = 1234567890123, 6554, 65536 / (65536 - 6554)
        y, x_hat, rstd = add_norm.add_norm_forward(s, bias, r, seed, dropped, scale, weight, norm_bias, 1e-5)
        assert y.shape == x_hat.shape == shape and rstd.shape == (s.numel() // d,)
        mask = add_norm.dropout_apply(torch.ones(shape), None, seed, dropped, scale)  # the dropout's own mask
        assert 0.8 < (mask > 0).float().mean() < 0.99
        leaves = [t.clone().requires_grad_() for t in (s, bias, r, weight, norm_bias)]
        s_, bias_, r_, weight_, norm_bias_ = leaves
        ref = torch.nn.functional.layer_norm(r_ + (s_ + bias_) * mask, (d,), weight_, norm_bias_, 1e-5)
        torch.testing.assert_close(y, ref.detach(), rtol=1e-5, atol=1e-5)
        ref.backward(grad)
        grad_r, grad_s, grad_weight, grad_norm_bias, grad_bias = add_norm.add_norm_backward(
            grad, x_hat, rstd, weight, seed, dropped, scale)
        for got, leaf in zip((grad_s, grad_bias, grad_r, grad_weight, grad_norm_bias), leaves):
            torch.testing.assert_close(got, leaf.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["norm-first", "no-grad", "float64", "autocast", "unbiased-projection",
                                  "quantised-projection"])
def test_separate_ops_where_the_fused_add_norm_does_not_apply(add_norm, case):
    layer = _layer("encoder", 32, 0.1, norm_first=case == "norm-first")
    x = torch.randn(2, 5, 32, requires_grad=True)
    if case == "float64":
        layer, x = layer.double(), x.double()
    if case == "unbiased-projection":
        layer.ffn.fc2.bias = None
    if case == "quantised-projection":  # any other module in place of nn.Linear
        layer.self_attn.out_proj = torch.nn.Sequential(layer.self_attn.out_proj)
    context = {"no-grad": torch.no_grad(), "autocast": torch.autocast("cpu", dtype=torch.bfloat16)}.get(
        case, torch.enable_grad())
    with context:
        y = layer(x, None)
    assert y.grad_fn is None if case == "no-grad" else type(y.grad_fn).__name__ != "_AddNormBackward"
    if case == "no-grad":  # eval mode with a gradient recorded: the fused form, dropout off
        layer.eval()
        assert type(layer(x, None).grad_fn).__name__ == "_AddNormBackward"
