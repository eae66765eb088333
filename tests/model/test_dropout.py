"""The CPU dropout masks (transformer.model.dropout) against their definition and nn.Dropout's contract."""

import pytest
import torch
import torch.nn.functional as F

from transformer.model.dropout import Dropout, dropout_mask


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_mask_keeps_one_minus_p_and_scales_to_an_exact_expectation(p):
    torch.manual_seed(0)
    mask = dropout_mask(torch.empty(512, 1024), p)  # 524,288 elements: binomial sd of the mean < 0.0007
    dropped = round(p * 65536)
    scale = 65536 / (65536 - dropped)
    values = mask.unique().tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(scale, rel=1e-6)
    kept = mask.ne(0).float()
    assert kept.mean().item() == pytest.approx(1 - p, abs=0.004)
    # Every one of the four 16-bit lanes of a 64-bit draw is uniform (a lane with a fixed sign bit would
    # keep all or none of its elements at p = 0.5).
    for lane in range(4):
        assert kept.view(-1)[lane::4].mean().item() == pytest.approx(1 - p, abs=0.008)
    # Neighbouring elements are independent: the chance that both of a pair are kept is (1 - p)^2.
    pairs = kept.view(-1, 2)
    assert (pairs[:, 0] * pairs[:, 1]).mean().item() == pytest.approx((1 - p) ** 2, abs=0.006)


def test_mask_follows_the_torch_seed_and_the_input_dtype():
    x = torch.empty(3, 5, 7, dtype=torch.bfloat16)
    torch.manual_seed(3)
    a = dropout_mask(x, 0.1)
    torch.manual_seed(3)
    b = dropout_mask(x, 0.1)
    assert a.dtype == torch.bfloat16 and a.shape == x.shape and torch.equal(a, b)
    assert not torch.equal(a, dropout_mask(x, 0.1))  # the generator moved on


def test_forward_and_gradient_use_the_same_mask():
    d = Dropout(0.25).train()
    x = torch.randn(64, 33, requires_grad=True)
    torch.manual_seed(5)
    y = d(x)
    torch.manual_seed(5)
    mask = dropout_mask(x, 0.25)
    assert torch.equal(y, x * mask)
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, mask)


def test_residual_is_residual_plus_dropout():
    d = Dropout(0.1).train()
    r, x = torch.randn(8, 16, 32), torch.randn(8, 16, 32, requires_grad=True)
    torch.manual_seed(1)
    fused = d.residual(r, x)
    torch.manual_seed(1)
    torch.testing.assert_close(fused, r + d(x))
    d.eval()
    assert torch.equal(d.residual(r, x), r + x)


def test_eval_mode_and_edge_probabilities_are_nn_dropout():
    x = torch.randn(10, 10)
    assert torch.equal(Dropout(0.1).eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))
    with pytest.raises(ValueError):
        Dropout(1.5)
    assert Dropout(0.1).state_dict() == {}  # no parameters or buffers: checkpoints are unchanged


def test_expectation_matches_torch_dropout():
    torch.manual_seed(0)
    x = torch.rand(256, 256) + 0.5
    ours = torch.stack([Dropout(0.1).train()(x) for _ in range(20)]).mean(0)
    ref = torch.stack([F.dropout(x, 0.1, training=True) for _ in range(20)]).mean(0)
    assert ours.mean().item() == pytest.approx(x.mean().item(), rel=0.003)
    assert ours.mean().item() == pytest.approx(ref.mean().item(), rel=0.005)
