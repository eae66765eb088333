import math

import pytest
import torch

from transformer.config import TrainConfig
from transformer.training.optim import build_optimizer, lr_at


@pytest.mark.parametrize("step", [1, 10, 100, 3999, 4000, 4001, 10_000, 100_000])
def test_noam_matches_the_paper(step):
    cfg = TrainConfig()
    expected = 512**-0.5 * min(step**-0.5, step * 4000**-1.5)
    assert lr_at(step, cfg, 512) == pytest.approx(expected, rel=1e-12)


def test_noam_peak_at_warmup_and_scale():
    cfg = TrainConfig(lr_scale=2.0, warmup_steps=100)
    rates = [lr_at(s, cfg, 256) for s in range(1, 400)]
    assert max(rates) == pytest.approx(lr_at(100, cfg, 256))
    assert lr_at(100, cfg, 256) == pytest.approx(2.0 * (256 * 100) ** -0.5)


def test_inverse_sqrt():
    cfg = TrainConfig(lr_schedule="inverse_sqrt", lr=1e-3, warmup_steps=10)
    assert lr_at(5, cfg, 512) == pytest.approx(5e-4)
    assert lr_at(10, cfg, 512) == pytest.approx(1e-3)
    assert lr_at(40, cfg, 512) == pytest.approx(1e-3 * math.sqrt(10 / 40))


def test_cosine_and_constant():
    cfg = TrainConfig(lr_schedule="cosine", lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert lr_at(10, cfg, 64) == pytest.approx(1e-3)
    assert lr_at(60, cfg, 64) == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert lr_at(110, cfg, 64) == pytest.approx(1e-4)
    assert lr_at(500, cfg, 64) == pytest.approx(1e-4)
    const = TrainConfig(lr_schedule="constant", lr=2e-4, warmup_steps=0)
    assert lr_at(1, const, 64) == lr_at(1000, const, 64) == 2e-4


def test_adam_and_adamw_groups():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, TrainConfig())
    assert type(opt) is torch.optim.Adam
    assert opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-9
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1))
    assert type(opt) is torch.optim.AdamW
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and [p.dim() for p in decayed["params"]] == [2]
    assert plain["weight_decay"] == 0.0 and all(p.dim() == 1 for p in plain["params"])
