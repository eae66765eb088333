"""The layers' CPU training path: the ReLU feed-forward network fused with the extension's kernels, against
``nn.Linear`` and ``F.relu`` (the same maths), and where it applies."""

import pytest
import torch

from transformer.model import layers as layers_module
from transformer.model.layers import FeedForward, plain_feed_forward

from native_helpers import built_kernel


@pytest.fixture
def kernel(monkeypatch):
    return built_kernel(layers_module._KERNEL, monkeypatch)


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
