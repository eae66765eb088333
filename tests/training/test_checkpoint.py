import pytest
import torch
from safetensors.torch import load_file

from training_helpers import VOCAB, tiny_config
from transformer.config import replace
from transformer.errors import TransformerError
from transformer.model import build_model
from transformer.training import checkpoint as ckpt
from transformer.training.checkpoint import atomic_write, average_checkpoints, load_model, save_checkpoint


def _save(run_dir, cfg, model, step):
    state = {"step": step, "config": ckpt.config_dict(cfg), "src_vocab_size": VOCAB, "tgt_vocab_size": VOCAB}
    return save_checkpoint(run_dir / "checkpoints" / ckpt.step_dir_name(step), model, state)


@pytest.fixture
def saved(tmp_path):
    cfg = tiny_config(tmp_path / "run")
    torch.manual_seed(0)
    model = build_model(cfg.model, VOCAB, VOCAB)
    path = _save(tmp_path / "run", cfg, model, 7)
    return cfg, model, path


def test_atomic_write_failure_keeps_previous_file(tmp_path):
    target = tmp_path / "file.bin"
    atomic_write(target, lambda p: p.write_bytes(b"old"))

    def broken(p):
        p.write_bytes(b"half-written")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, broken)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]  # no temp file left behind


def test_checkpoint_dir_failure_keeps_previous_checkpoint(saved, monkeypatch):
    cfg, model, path = saved
    before = path.joinpath(ckpt.WEIGHTS).read_bytes()
    monkeypatch.setattr(ckpt.torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(OSError):
        save_checkpoint(path, model, {"step": 7})
    assert path.joinpath(ckpt.WEIGHTS).read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_tied_weights_saved_once_and_retied(saved):
    cfg, model, path = saved
    stored = load_file(str(path / ckpt.WEIGHTS))
    assert len(stored) < len(model.state_dict())  # the tied copies are not stored
    loaded, loaded_cfg, tok = load_model(path, require_tokenizer=False)
    assert tok is None and loaded_cfg == cfg
    assert loaded.output.lm_head.weight is loaded.decoder.embed_tokens.weight
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, msg=name)
    assert not loaded.training


def test_load_model_from_run_dir_prefers_best(saved, tmp_path):
    cfg, model, path = saved
    run = tmp_path / "run"
    assert ckpt.resolve_checkpoint(run) == path
    ckpt.copy_checkpoint(path, run / "checkpoints" / "best")
    assert ckpt.resolve_checkpoint(run) == run / "checkpoints" / "best"
    with pytest.raises(TransformerError, match="tokenizer"):
        load_model(run)


def test_missing_path(tmp_path):
    with pytest.raises(TransformerError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TransformerError, match="holds no checkpoint"):
        load_model(tmp_path / "empty")


@pytest.mark.parametrize("name", [ckpt.WEIGHTS, ckpt.STATE])
def test_truncated_file_is_named(saved, name):
    _, _, path = saved
    data = (path / name).read_bytes()
    (path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(TransformerError, match=name.replace(".", r"\.")) as info:
        load_model(path, require_tokenizer=False)
    assert "truncated or corrupt" in str(info.value)


def test_corrupt_weights_are_named(saved):
    _, _, path = saved
    (path / ckpt.WEIGHTS).write_bytes(b"\x00garbage" * 10)
    with pytest.raises(TransformerError, match="model.safetensors"):
        load_model(path, require_tokenizer=False)


def test_shape_mismatch_names_the_tensor(saved):
    cfg, _, path = saved
    state = ckpt.load_state(path)
    state["config"]["model"]["d_ff"] = 128  # the config no longer matches the weights
    torch.save(state, path / ckpt.STATE)
    with pytest.raises(TransformerError, match=r"tensor '.*ffn.*' has shape"):
        load_model(path, require_tokenizer=False)


def test_average_of_two_checkpoints(tmp_path):
    cfg = tiny_config(tmp_path / "run")
    run = tmp_path / "run"
    torch.manual_seed(0)
    a = build_model(cfg.model, VOCAB, VOCAB)
    b = build_model(cfg.model, VOCAB, VOCAB)
    _save(run, cfg, a, 1)
    _save(run, cfg, b, 2)
    _save(run, cfg, b, 3)
    # last_n=2 takes steps 2 and 3 (both b): the average is b
    out = average_checkpoints(run, 2)
    avg, _, _ = load_model(out, require_tokenizer=False)
    for name, t in b.state_dict().items():
        torch.testing.assert_close(avg.state_dict()[name], t)
    out = average_checkpoints([run / "checkpoints" / ckpt.step_dir_name(s) for s in (1, 2)], 2, tmp_path / "avg")
    avg, _, _ = load_model(out, require_tokenizer=False)
    for name, t in a.state_dict().items():
        torch.testing.assert_close(avg.state_dict()[name], (t + b.state_dict()[name]) / 2, msg=name)
    assert ckpt.load_state(out)["averaged_from"][-1].endswith(ckpt.step_dir_name(2))
    with pytest.raises(TransformerError, match="found 3"):
        average_checkpoints(run, 4)


def test_prune_keeps_last(tmp_path):
    cfg = tiny_config(tmp_path / "run")
    model = build_model(cfg.model, VOCAB, VOCAB)
    for step in (1, 2, 3, 4):
        _save(tmp_path / "run", cfg, model, step)
    ckpt.prune_checkpoints(tmp_path / "run", 2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["step_00000003", "step_00000004"]
