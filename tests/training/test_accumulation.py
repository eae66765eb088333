import torch

from training_helpers import VOCAB, copy_task, tiny_config
from transformer.config import replace
from transformer.model import build_model
from transformer.training.trainer import accumulate_gradients


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_two_half_batches_equal_one_batch(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg = replace(cfg, model=replace(cfg.model, dropout=0.0))
    data = copy_task()
    torch.manual_seed(0)
    model = build_model(cfg.model, VOCAB, VOCAB)
    items = [data.train[i] for i in range(10)]
    whole = data.train.collate(items)
    halves = [data.train.collate(items[:4]), data.train.collate(items[4:])]  # unequal halves, unequal padding
    tokens = whole.n_tgt_tokens
    assert tokens == sum(b.n_tgt_tokens for b in halves)

    loss_one, _ = accumulate_gradients(model, [whole], 0.1, tokens)
    g_one = _grads(model)
    model.zero_grad(set_to_none=True)
    loss_two, _ = accumulate_gradients(model, halves, 0.1, tokens)
    g_two = _grads(model)
    assert abs(loss_one - loss_two) < 1e-4 * abs(loss_one)
    assert g_one.keys() == g_two.keys()
    for name in g_one:
        torch.testing.assert_close(g_one[name], g_two[name], atol=1e-6, rtol=1e-5, msg=name)
