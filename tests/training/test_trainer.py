import json
import math

import pytest
import torch

from training_helpers import copy_task, lm_task, tiny_config
from transformer.data.batching import sampler_for
from transformer.errors import TransformerError
from transformer.training import checkpoint as ckpt
from transformer.training import trainer as trainer_module
from transformer.training import train


def test_end_to_end_loss_falls_and_run_dir_layout(tmp_path):
    run = tmp_path / "run"
    result = train(tiny_config(run, max_steps=40, valid_every=20, save_every=20), data=copy_task())
    assert result.stop_reason == "max_steps" and result.step == 40
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < first - 0.5, (first, last)
    assert [v["step"] for v in result.valid] == [20, 40]
    assert result.valid[1]["loss"] < result.valid[0]["loss"]
    for name in ("config.yaml", "metrics.jsonl", "curves.png", "tb", "checkpoints/best/model.safetensors",
                 "checkpoints/step_00000040/state.pt"):
        assert (run / name).exists(), name
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_events = [e for e in events if e["split"] == "train"]
    assert [e["step"] for e in train_events] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert {"loss", "nll", "ppl", "lr", "tokens_per_s", "elapsed"} <= set(train_events[0])
    assert math.isclose(train_events[0]["ppl"], math.exp(train_events[0]["nll"]), rel_tol=1e-9)
    state = torch.load(run / "checkpoints/step_00000040/state.pt", weights_only=True)
    assert state["step"] == 40 and state["config"]["run_dir"] == str(run)
    model, _, _ = ckpt.load_model(run, require_tokenizer=False)  # loads checkpoints/best
    assert not model.training


def test_language_model_trains(tmp_path):
    result = train(tiny_config(tmp_path / "lm", arch="lm", max_steps=30, valid_every=30, save_every=30),
                   data=lm_task())
    assert sum(result.losses[-5:]) / 5 < sum(result.losses[:5]) / 5 - 0.3
    assert result.valid[-1]["ppl"] < 24


def test_exact_resume_and_interrupt(tmp_path):
    """12 steps in one go == 6 steps + resume 6 == 4 steps + Ctrl-C + resume 8 (dropout on, shuffled data)."""
    data = copy_task()
    common = dict(update_freq=2, valid_every=3, save_every=3, log_every=3)
    full = train(tiny_config(tmp_path / "a", max_steps=12, **common), data=data)
    assert full.epoch >= 1  # 24 batches: the resume crosses an epoch boundary

    first = train(tiny_config(tmp_path / "b", max_steps=6, **common), data=data)
    second = train(tiny_config(tmp_path / "b", max_steps=12, **common), resume=True, data=data)
    assert first.step == 6 and second.step == 12
    for a, b in zip(full.losses, first.losses + second.losses, strict=True):
        assert a == pytest.approx(b, abs=1e-6)

    def stop_at_4(event):
        if event["step"] == 4:
            raise KeyboardInterrupt

    interrupted = train(tiny_config(tmp_path / "c", max_steps=12, **common), data=data, callback=stop_at_4)
    assert interrupted.interrupted and interrupted.step == 4
    assert (tmp_path / "c/checkpoints/step_00000004/model.safetensors").is_file()
    rest = train(tiny_config(tmp_path / "c", max_steps=12, **common), resume=True, data=data)
    for a, b in zip(full.losses, interrupted.losses + rest.losses, strict=True):
        assert a == pytest.approx(b, abs=1e-6)
    full_w = ckpt.read_weights(tmp_path / "a/checkpoints/step_00000012")
    rest_w = ckpt.read_weights(tmp_path / "c/checkpoints/step_00000012")
    for name in full_w:
        torch.testing.assert_close(full_w[name], rest_w[name], atol=1e-6, rtol=0, msg=name)


def test_run_dir_guards(tmp_path):
    with pytest.raises(TransformerError, match="cannot resume"):
        train(tiny_config(tmp_path / "r", max_steps=2), resume=True, data=copy_task())
    train(tiny_config(tmp_path / "r", max_steps=2), data=copy_task())
    with pytest.raises(TransformerError, match="already holds checkpoints"):
        train(tiny_config(tmp_path / "r", max_steps=2), data=copy_task())


def _nan_on(monkeypatch, bad_calls):
    """Make the training loss NaN on the given (1-based) training forward passes."""
    real = trainer_module.label_smoothed_nll_loss
    calls = {"n": 0}

    def patched(logits, target, epsilon, *args, **kwargs):
        loss, nll = real(logits, target, epsilon, *args, **kwargs)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if bad_calls(calls["n"]):
                return loss * float("nan"), nll * float("nan")
        return loss, nll

    monkeypatch.setattr(trainer_module, "label_smoothed_nll_loss", patched)


def test_nan_loss_skips_the_update(tmp_path, monkeypatch, caplog):
    _nan_on(monkeypatch, lambda n: n == 2)
    result = train(tiny_config(tmp_path / "n", max_steps=5, valid_every=5, save_every=5), data=copy_task())
    assert result.step == 5 and result.skipped_steps == 1 and len(result.losses) == 5
    assert all(math.isfinite(x) for x in result.losses)
    assert "skipping this update" in caplog.text
    weights = ckpt.read_weights(tmp_path / "n/checkpoints/step_00000005")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_too_many_bad_steps_stop_with_a_clear_error(tmp_path, monkeypatch):
    _nan_on(monkeypatch, lambda n: n > 3)
    cfg = tiny_config(tmp_path / "d", max_steps=20, valid_every=3, save_every=3, max_bad_steps=3)
    with pytest.raises(TransformerError, match="diverged.*step_00000003"):
        train(cfg, data=copy_task())
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "d")] == ["step_00000003"]


def test_time_limit_and_early_stopping(tmp_path):
    result = train(tiny_config(tmp_path / "t", max_steps=1000, time_limit_minutes=1e-9), data=copy_task())
    assert result.stop_reason == "time_limit" and result.step == 1
    assert (tmp_path / "t/checkpoints/step_00000001").is_dir()
    result = train(tiny_config(tmp_path / "ep", max_steps=1000, max_epochs=1, valid_every=1000), data=copy_task())
    assert result.stop_reason == "max_epochs" and result.epoch == 1
    assert result.step == len(sampler_for(copy_task().train, 48))  # one update per batch of the epoch
    # lr so small that validation loss cannot improve by the float noise needed: patience 1 stops at once
    result = train(tiny_config(tmp_path / "e", max_steps=100, valid_every=1, patience=1, lr_schedule="constant",
                               lr=1e-12, warmup_steps=0), data=copy_task())
    assert result.stop_reason == "early_stopping" and result.step < 100


@pytest.mark.slow
def test_compile_follows_changing_batch_shapes_without_recompiling(tmp_path):
    # train.compile=true with token buckets: every batch has another shape. Compiled for symbolic shapes
    # and without a graph break, the model compiles a bounded number of times (once for training, once
    # more for validation's no_grad, and at most once for a size the first batch happened to share), not
    # once per shape as before (20-25 s a step on an H100).
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    data = copy_task()
    shapes = {tuple(data.train.collate_indices(ix).src_tokens.shape) for ix in sampler_for(data.train, 48, seed=3)}
    assert len(shapes) >= 4  # the point of the test: many shapes
    result = train(tiny_config(tmp_path / "run", max_steps=8, valid_every=8, compile=True), data=data)
    assert result.step == 8 and all(math.isfinite(x) for x in result.losses)
    assert counters["stats"]["unique_graphs"] <= 4, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch._dynamo.reset()


def test_bf16_autocast_on_cpu_and_fp16_needs_cuda(tmp_path):
    result = train(tiny_config(tmp_path / "bf16", max_steps=3, precision="bf16"), data=copy_task())
    assert len(result.losses) == 3 and all(math.isfinite(x) for x in result.losses)
    if not torch.cuda.is_available():
        with pytest.raises(TransformerError, match="train.precision"):
            train(tiny_config(tmp_path / "fp16", max_steps=3, precision="fp16", device="cpu"), data=copy_task())
