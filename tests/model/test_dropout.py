"""The CPU dropout (transformer.model.dropout) against its definition and nn.Dropout's contract, in both of its
forms: the mask stored as a tensor (dropout_mask) and the mask hashed from a seed in the compiled extension."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from transformer.model import dropout as dropout_module
from transformer.model.dropout import Dropout, dropout_mask

from native_helpers import each_form


@pytest.fixture(params=["stored", "hashed"])
def form(request, monkeypatch):
    """Run a test with each form of the mask: ``stored`` (dropout_mask) and ``hashed`` (the extension)."""
    yield from each_form(request, monkeypatch, dropout_module._KERNEL, fallback="stored")


def _mask_of(d: Dropout, shape) -> torch.Tensor:
    """The mask ``d`` applies: its output on ones."""
    return d(torch.ones(shape))


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_mask_keeps_one_minus_p_and_scales_to_an_exact_expectation(form, p):
    torch.manual_seed(0)
    mask = _mask_of(Dropout(p).train(), (512, 1024))  # 524,288 elements: binomial sd of the mean < 0.0007
    dropped = round(p * 65536)
    scale = 65536 / (65536 - dropped)
    values = mask.unique().tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(scale, rel=1e-6)
    kept = mask.ne(0).float().view(-1)
    assert kept.mean().item() == pytest.approx(1 - p, abs=0.004)
    # Each 16-bit lane of a draw is uniform: the four lanes of a 64-bit word (stored form), the low and high
    # halves of a 32-bit hash (hashed form: elements 0-7 and 8-15 of each block of 16). A lane with a fixed
    # sign bit would keep all or none of its elements at p = 0.5.
    for lane in range(4):
        assert kept[lane::4].mean().item() == pytest.approx(1 - p, abs=0.008)
    for half in range(2):
        assert kept.view(-1, 2, 8)[:, half].mean().item() == pytest.approx(1 - p, abs=0.006)
    # Neighbouring elements are independent: the chance that both of a pair are kept is (1 - p)^2; so are an
    # element and the one 8 further on (the other half of the same hash, in the hashed form).
    pairs = kept.view(-1, 2)
    assert (pairs[:, 0] * pairs[:, 1]).mean().item() == pytest.approx((1 - p) ** 2, abs=0.006)
    halves = kept.view(-1, 2, 8)
    assert (halves[:, 0] * halves[:, 1]).mean().item() == pytest.approx((1 - p) ** 2, abs=0.006)


def test_masks_follow_the_torch_seed(form):
    d = Dropout(0.1).train()
    torch.manual_seed(3)
    a = _mask_of(d, (3, 5, 7))
    torch.manual_seed(3)
    b = _mask_of(d, (3, 5, 7))
    assert a.shape == (3, 5, 7) and torch.equal(a, b)
    c = _mask_of(d, (3, 5, 7))  # the generator moved on
    assert not torch.equal(a, c)
    # Two layers' masks in one step are unrelated: about (1 - p)^2 of the elements kept in both.
    big = [_mask_of(d, (256, 256)).ne(0).float() for _ in range(2)]
    assert (big[0] * big[1]).mean().item() == pytest.approx(0.81, abs=0.006)


def test_stored_mask_follows_the_input_dtype():
    x = torch.empty(3, 5, 7, dtype=torch.bfloat16)
    torch.manual_seed(3)
    a = dropout_mask(x, 0.1)
    assert a.dtype == torch.bfloat16 and a.shape == x.shape


@pytest.mark.parametrize("shape", [(64, 33), (5, 3), (2, 16, 24)])
def test_forward_and_gradient_use_the_same_mask(form, shape):
    d = Dropout(0.25).train()
    x = torch.randn(*shape, requires_grad=True)
    torch.manual_seed(5)
    y = d(x)
    torch.manual_seed(5)
    mask = _mask_of(d, shape)
    assert torch.equal(y, x.detach() * mask)
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, mask)


def test_residual_is_residual_plus_dropout(form):
    d = Dropout(0.1).train()
    r = torch.randn(8, 16, 33, requires_grad=True)
    x = torch.randn(8, 16, 33, requires_grad=True)
    torch.manual_seed(1)
    fused = d.residual(r, x)
    torch.manual_seed(1)
    mask = _mask_of(d, x.shape)
    torch.testing.assert_close(fused, r.detach() + x.detach() * mask)  # addcmul may round once (FMA)
    g = torch.randn_like(fused)
    fused.backward(g)
    assert torch.equal(r.grad, g) and torch.equal(x.grad, g * mask)
    d.eval()
    assert torch.equal(d.residual(r, x), r + x)


def test_non_contiguous_input(form):
    d = Dropout(0.2).train()
    x = torch.randn(40, 24).t()  # (24, 40), not contiguous
    torch.manual_seed(2)
    y = d(x)
    torch.manual_seed(2)
    assert y.shape == x.shape and torch.equal(y, x * _mask_of(d, x.shape))


def _lowbias32(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def test_hashed_mask_is_the_documented_function_of_seed_and_element(form):
    """The vector path (blocks of 16) and the scalar tail compute the bits the module documents."""
    if form != "hashed":
        pytest.skip("the hashed form only")
    module = dropout_module.kernel()
    for seed in (0, 12345, -(2**63), 2**63 - 1, -987654321987):
        for n in (1, 15, 16, 37, 1000):
            got = module.dropout_apply(torch.ones(n), None, seed, 6554, 2.0)
            i = np.arange(n, dtype=np.int64)
            s = seed % 2**64
            lo, hi = np.uint32(s & 0xFFFFFFFF), np.uint32(s >> 32)
            word = (8 * (i // 16) + i % 8).astype(np.uint32)
            with np.errstate(over="ignore"):
                h = _lowbias32(_lowbias32(word ^ lo) + hi)
            bits = (h >> (16 * ((i % 16) // 8)).astype(np.uint32)) & np.uint32(0xFFFF)
            want = np.where(bits >= 6554, 2.0, 0.0).astype(np.float32)
            assert np.array_equal(got.numpy(), want), (seed, n)


def test_eval_mode_and_edge_probabilities_are_nn_dropout(form):
    x = torch.randn(10, 10)
    assert torch.equal(Dropout(0.1).eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))
    with pytest.raises(ValueError):
        Dropout(1.5)
    assert Dropout(0.1).state_dict() == {}  # no parameters or buffers: checkpoints are unchanged


def test_p_just_below_one_keeps_one_lane_in_65536(form):
    torch.manual_seed(0)
    y = Dropout(0.999999).train()(torch.ones(1 << 20))  # p rounds to 65536/65536 lanes: kept at 1/65536
    assert torch.isfinite(y).all() and set(y.unique().tolist()) <= {0.0, 65536.0}
    assert 0 < y.ne(0).sum().item() < 60  # about 16 of 2^20


def test_bfloat16_takes_the_stored_mask(form):
    torch.manual_seed(4)
    y = Dropout(0.5).train()(torch.ones(64, 64, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and set(y.unique().tolist()) == {0.0, 2.0}


def test_expectation_matches_torch_dropout(form):
    torch.manual_seed(0)
    x = torch.rand(256, 256) + 0.5
    ours = torch.stack([Dropout(0.1).train()(x) for _ in range(20)]).mean(0)
    ref = torch.stack([F.dropout(x, 0.1, training=True) for _ in range(20)]).mean(0)
    assert ours.mean().item() == pytest.approx(x.mean().item(), rel=0.003)
    assert ours.mean().item() == pytest.approx(ref.mean().item(), rel=0.005)
