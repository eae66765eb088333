import math

import pytest
import torch
import torch.nn.functional as F

from transformer.training.loss import label_smoothed_nll_loss


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
