import math

import pytest
import torch
import torch.nn.functional as F

from transformer.training import loss as loss_module
from transformer.training.loss import label_smoothed_nll_loss

from native_helpers import built_kernel, each_form


@pytest.fixture(params=["aten", "kernel"])
def form(request, monkeypatch):
    """Run a test with each form of the float32 overwriting path: ``aten`` (ATen's ops over blocks of rows) and
    ``kernel`` (the extension's exp_rows_ / exp_rows_grad_)."""
    yield from each_form(request, monkeypatch, loss_module._KERNEL, fallback="aten")


def test_hand_computation():
    logits = torch.tensor([[[1.0, 2.0, 0.5, -1.0], [0.0, 0.0, 0.0, 3.0]]])  # (B=1,T=2,V=4)
    target = torch.tensor([[2, 0]])  # the second position is padding
    eps = 0.1
    z = [1.0, 2.0, 0.5, -1.0]
    log_norm = math.log(sum(math.exp(v) for v in z))
    logp = [v - log_norm for v in z]
    nll = -logp[2]
    expected = (1 - eps) * nll + eps * sum(-lp for lp in logp) / 4
    loss, nll_sum = label_smoothed_nll_loss(logits, target, eps)
    assert nll_sum.item() == pytest.approx(nll, abs=1e-6)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_matches_pytorch_cross_entropy_label_smoothing():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    target = torch.randint(1, 11, (3, 5))
    target[0, 3:] = 0
    loss, nll = label_smoothed_nll_loss(logits, target, 0.1)
    ref = F.cross_entropy(logits.view(-1, 11), target.view(-1), ignore_index=0, label_smoothing=0.1, reduction="sum")
    ref_nll = F.cross_entropy(logits.view(-1, 11), target.view(-1), ignore_index=0, reduction="sum")
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert nll.item() == pytest.approx(ref_nll.item(), rel=1e-6)


def test_no_smoothing_equals_nll_and_gradient_flows():
    logits = torch.randn(2, 3, 7, requires_grad=True)
    target = torch.randint(1, 7, (2, 3))
    loss, nll = label_smoothed_nll_loss(logits, target, 0.0)
    assert loss.item() == pytest.approx(nll.item())
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_bf16_logits_are_computed_in_float32():
    logits = torch.randn(2, 3, 7)
    target = torch.randint(1, 7, (2, 3))
    loss, _ = label_smoothed_nll_loss(logits.bfloat16(), target, 0.1)
    assert loss.dtype == torch.float32


def _reference(logits, target, eps, ignore_index=0):
    """The loss through autograd's own ops: log-softmax, a gather and a mean (the formula, unfused)."""
    lprobs = F.log_softmax(logits.float(), dim=-1).reshape(-1, logits.size(-1))
    target = target.reshape(-1)
    keep = target.ne(ignore_index)
    nll = -lprobs.gather(1, target.clamp(min=0).unsqueeze(1)).squeeze(1)
    smooth = -lprobs.mean(dim=-1)
    nll_sum = nll.masked_fill(~keep, 0.0).sum()
    return (1 - eps) * nll_sum + eps * smooth.masked_fill(~keep, 0.0).sum(), nll_sum


def _check_against_reference(base, nll_weight, overwrite_logits, loss_atol=1e-4, grad_tolerance=None):
    """The loss, its NLL and the gradient of ``loss + nll_weight * nll`` for logits ``base`` (..., V) against
    :func:`_reference`'s, with the first three positions ignored."""
    target = torch.randint(1, base.size(-1), base.shape[:-1], device=base.device)
    target.view(-1)[:3] = 0  # ignored positions
    ref_leaf, leaf = base.clone().requires_grad_(), base.clone().requires_grad_()
    ref_loss, ref_nll = _reference(ref_leaf, target, 0.1)
    (ref_loss + nll_weight * ref_nll).backward()
    loss, nll = label_smoothed_nll_loss(leaf * 1.0, target, 0.1, overwrite_logits=overwrite_logits)
    (loss + nll_weight * nll).backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=loss_atol)
    torch.testing.assert_close(nll, ref_nll, rtol=1e-5, atol=loss_atol)
    tolerance = grad_tolerance or dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(leaf.grad.float(), ref_leaf.grad.float(), **tolerance)
    assert leaf.grad.view(-1, base.size(-1))[:3].abs().max() == 0  # ignored rows get no gradient


@pytest.mark.parametrize("overwrite_logits", [False, True])
@pytest.mark.parametrize("nll_weight", [0.0, 0.7, -3.0])  # -3: a negative weight on the loss takes the multiply
@pytest.mark.parametrize("shape", [(2, 5, 13), (300, 5000)])  # (300, 5000): several row blocks
def test_fused_loss_and_gradient_match_autograd_of_the_formula(form, shape, nll_weight, overwrite_logits):
    torch.manual_seed(0)
    _check_against_reference(torch.randn(*shape) * 4, nll_weight, overwrite_logits)


def test_a_gpus_blocks_of_rows_are_few():
    # On a GPU each block is a few kernel launches: the CPU's cache-sized blocks would be ~126 at 16k x 8000
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert len(loss_module._row_blocks(16384, 8000, cpu)) == 126
    assert len(loss_module._row_blocks(16384, 8000, gpu)) == 2
    with loss_module.cpu_sized_blocks():
        assert loss_module._row_blocks(16384, 8000, gpu) == loss_module._row_blocks(16384, 8000, cpu)
    blocks = loss_module._row_blocks(16384, 8000, gpu)
    assert blocks[0][0] == 0 and blocks[-1][1] == 16384 and all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))


def test_the_backward_pass_walks_the_blocks_of_its_forward_pass(monkeypatch):
    # A comparison's block (cpu_sized_blocks) holds around the forward pass only: its backward pass must follow
    torch.manual_seed(0)
    logits = torch.randn(300, 5000, requires_grad=True)
    target = torch.randint(1, 5000, (300,))
    monkeypatch.setattr(loss_module, "_CPU_BLOCK_ELEMENTS", 100 * 5000)
    loss, _ = label_smoothed_nll_loss(logits * 1.0, target, 0.1)
    monkeypatch.setattr(loss_module, "_CPU_BLOCK_ELEMENTS", 1 << 20)
    assert loss.grad_fn.blocks == [(0, 100), (100, 200), (200, 300)]
    loss.backward()
    reference = logits.detach().clone().requires_grad_()
    _reference(reference, target, 0.1)[0].backward()
    torch.testing.assert_close(logits.grad, reference.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("overwrite_logits", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nll_weight", [0.0, -3.0])
def test_loss_on_cuda_matches_autograd_of_the_formula(dtype, nll_weight, overwrite_logits, monkeypatch):
    monkeypatch.setattr(loss_module, "_GPU_BLOCK_ELEMENTS", 100 * 5000)  # three blocks of 100 rows
    torch.manual_seed(0)
    base = (torch.randn(300, 5000, device="cuda") * 4).to(dtype)
    bf16_grads = dict(rtol=2e-2, atol=1e-4)  # the gradient is rounded to the logits' dtype
    _check_against_reference(base, nll_weight, overwrite_logits, loss_atol=1e-3,
                             grad_tolerance=bf16_grads if dtype == torch.bfloat16 else None)


def test_overwrite_logits_leaves_the_gradient_in_the_logits(form):
    torch.manual_seed(0)
    leaf = torch.randn(4, 9, requires_grad=True)
    logits = leaf * 2.0
    target = torch.randint(1, 9, (4,))
    loss, _ = label_smoothed_nll_loss(logits, target, 0.1, overwrite_logits=True)
    loss.backward()
    torch.testing.assert_close(logits.detach(), leaf.grad / 2.0)  # the logits now hold dloss/dlogits
    kept = torch.randn(4, 9, requires_grad=True)
    before = (kept * 1.0).detach().clone()
    copy_logits = kept * 1.0
    label_smoothed_nll_loss(copy_logits, target, 0.1)[0].backward()
    assert torch.equal(copy_logits.detach(), before)  # the default leaves them alone


def test_overwrite_logits_is_refused_by_autograd_when_an_earlier_op_saved_them(form):
    # The forward pass overwrites float32 logits with their exponentials. If the op that made them saved
    # its output for its own backward pass (exp does), autograd must refuse rather than use the overwritten
    # values; the trainer's logits come from a linear layer, which saves only its inputs.
    leaf = torch.randn(4, 9, requires_grad=True)
    target = torch.randint(1, 9, (4,))
    loss, _ = label_smoothed_nll_loss(leaf.exp(), target, 0.1, overwrite_logits=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_bf16_logits_get_a_bf16_gradient_close_to_float32():
    torch.manual_seed(0)
    base = torch.randn(6, 7, 50)
    target = torch.randint(1, 50, (6, 7))
    low = base.bfloat16().requires_grad_()
    ref = base.bfloat16().float().requires_grad_()
    label_smoothed_nll_loss(low * 1, target, 0.1, overwrite_logits=True)[0].backward()
    _reference(ref, target, 0.1)[0].backward()
    assert low.grad.dtype == torch.bfloat16
    torch.testing.assert_close(low.grad.float(), ref.grad, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("vocab", [8, 13, 1003])  # a whole number of 8-lane vectors, and remainders
def test_kernel_forms_agree_and_run_where_they_should(vocab, monkeypatch):
    module = built_kernel(loss_module._KERNEL, monkeypatch)
    calls = []
    monkeypatch.setattr(loss_module._KERNEL, "module", _Spy(module, calls))
    torch.manual_seed(0)
    base = torch.randn(37, vocab) * 5
    base[3, 2] = 40.0  # a large logit: exp(z - max) stays within range
    target = torch.randint(1, vocab, (37,))
    target[:4] = 0
    results = []
    for aten in (False, True):
        leaf = base.clone().requires_grad_()
        with loss_module.aten_loss() if aten else torch.enable_grad():
            loss, nll = label_smoothed_nll_loss(leaf * 1.0, target, 0.1, overwrite_logits=True)
        (0.3 * loss + 0.5 * nll).backward()
        results.append((loss, nll, leaf.grad))
    assert calls == ["exp_rows_", "exp_rows_grad_"]  # once each, in the first run only
    for ours, aten in zip(*results):
        torch.testing.assert_close(ours, aten, rtol=1e-5, atol=1e-5)
    leaf = base.clone().requires_grad_()
    label_smoothed_nll_loss(leaf * 1.0, target, 0.1)[0].backward()  # logits kept: the ATen form, no kernel
    label_smoothed_nll_loss((leaf * 1.0).t().contiguous().t(), target, 0.1, overwrite_logits=True)
    assert calls == ["exp_rows_", "exp_rows_grad_"]  # nor for logits not laid out row by row


class _Spy:
    """The extension with its loss kernels' calls recorded."""

    def __init__(self, module, calls):
        self.module, self.calls = module, calls

    def __getattr__(self, name):
        if name.startswith("exp_rows"):
            self.calls.append(name)
        return getattr(self.module, name)
