"""Configs: YAML round trip, dotted overrides, presets, validation naming the field."""

import pytest

from transformer.config import Config, PRESETS, load_config, preset, save_config
from transformer.errors import TransformerError


def test_defaults_are_the_papers_base_model():
    cfg = Config()
    assert (cfg.model.d_model, cfg.model.n_heads, cfg.model.d_ff, cfg.model.n_encoder_layers) == (512, 8, 2048, 6)
    assert cfg.train.adam_betas == (0.9, 0.98) and cfg.train.adam_eps == 1e-9
    assert cfg.train.label_smoothing == 0.1 and cfg.model.dropout == 0.1 and cfg.train.warmup_steps == 4000
    assert (cfg.decode.beam, cfg.decode.length_penalty, cfg.decode.max_len_b) == (4, 0.6, 50)


def test_big_preset_is_table_3():
    big = preset("big")
    assert (big.d_model, big.n_heads, big.d_ff, big.dropout) == (1024, 16, 4096, 0.3)
    assert set(PRESETS) >= {"base", "big", "small", "tiny"}


def test_yaml_round_trip_and_overrides(tmp_path):
    cfg = load_config(None, ["preset=tiny", "train.max_steps=7", "train.adam_betas=[0.9, 0.99]", "data.path=x"])
    assert cfg.model.d_model == 64 and cfg.train.max_steps == 7 and cfg.train.adam_betas == (0.9, 0.99)
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    again = load_config(tmp_path / "c.yaml", ["model.dropout=0.3"])
    assert again.model.dropout == 0.3 and again.model.d_model == 64


@pytest.mark.parametrize(
    "override, field",
    [
        ("model.n_heads=3", "model.d_model"),
        ("model.dropout=1.5", "model.dropout"),
        ("model.activation=tanh", "model.activation"),
        ("train.label_smoothing=-1", "train.label_smoothing"),
        ("decode.beam=0", "decode.beam"),
        ("decode.nbest=9", "decode.nbest"),
        ("decode.length_penalty_form=wu", "decode.length_penalty_form"),
        ("train.max_steps=1.5", "train.max_steps"),
        ("model.norm_first=maybe", "model.norm_first"),
        ("model.arch=lm", "data.dataset"),
        ("model.nope=1", "model.nope"),
    ],
)
def test_invalid_values_name_the_field(override, field):
    with pytest.raises(TransformerError, match=field.replace(".", r"\.")):
        load_config(None, [override])


def test_config_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(TransformerError, match="bad.yaml"):
        load_config(bad)
    with pytest.raises(TransformerError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
