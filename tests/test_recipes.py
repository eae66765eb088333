"""The recipes in configs/ load and validate; the paper's WMT recipes start and run steps on tiny data."""

from pathlib import Path

import pytest

from transformer.config import load_config
from transformer.recipes import quickstart_config
from transformer.training import train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_recipe_is_valid(path):
    cfg = load_config(path)
    assert cfg.run_dir.startswith("runs/")


def test_wmt_recipes_are_the_papers():
    base = load_config(CONFIGS / "wmt14_en_de_base.yaml")
    big = load_config(CONFIGS / "wmt14_en_de_big.yaml")
    assert (base.model.d_model, base.model.n_heads, base.model.d_ff, base.model.dropout) == (512, 8, 2048, 0.1)
    assert (big.model.d_model, big.model.n_heads, big.model.d_ff, big.model.dropout) == (1024, 16, 4096, 0.3)
    for cfg, steps, last in ((base, 100_000, 5), (big, 300_000, 20)):
        assert cfg.data.vocab_size == 37000 and cfg.data.joint_vocab and cfg.data.max_tokens == 25000
        assert cfg.train.lr_schedule == "noam" and cfg.train.warmup_steps == 4000
        assert cfg.train.adam_betas == (0.9, 0.98) and cfg.train.label_smoothing == 0.1
        assert cfg.train.max_steps == steps and cfg.train.average_last == last
        assert (cfg.decode.beam, cfg.decode.length_penalty, cfg.decode.max_len_b) == (4, 0.6, 50)


def test_quickstart_config_takes_the_pair_budget_and_overrides():
    cfg = quickstart_config("fr", "en", minutes=2.5, run_dir="runs/x", overrides=["model.dropout=0.2"])
    assert (cfg.data.dataset, cfg.data.src_lang, cfg.data.tgt_lang) == ("bible", "fr", "en")
    assert cfg.train.time_limit_minutes == 2.5 and cfg.model.dropout == 0.2 and cfg.run_dir == "runs/x"


def test_bible_recipe_is_the_quickstart_with_a_longer_budget():
    from dataclasses import replace

    recipe = load_config(CONFIGS / "bible_en_de.yaml")
    quick = quickstart_config("en", "de", minutes=10.0)
    assert recipe.train.time_limit_minutes == 60
    same = dict(time_limit_minutes=0, valid_every=0, save_every=0, bleu_subset=0, log_every=0)
    assert replace(recipe.train, **same) == replace(quick.train, **same)
    assert (recipe.model, recipe.data, recipe.decode) == (quick.model, quick.data, quick.decode)


def _tiny_wmt_folder(folder: Path) -> Path:
    en = ["the house is small .", "the man reads a book .", "a woman sees the house .", "the child is here ."]
    de = ["das haus ist klein .", "der mann liest ein buch .", "eine frau sieht das haus .", "das kind ist hier ."]
    for prefix in ("train", "newstest2013", "newstest2014"):
        (folder / f"{prefix}.en").write_text("\n".join(en * 8) + "\n")
        (folder / f"{prefix}.de").write_text("\n".join(de * 8) + "\n")
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["wmt14_en_de_base", "wmt14_en_de_big"])
def test_wmt_recipe_runs_steps_on_tiny_data(recipe, tmp_path):
    # The paper's architecture and schedule as written; only the data, the vocabulary, the batch size and
    # the number of steps are shrunk (and fp32, since this CPU has no native bf16).
    cfg = load_config(CONFIGS / f"{recipe}.yaml", [
        f"data.path={_tiny_wmt_folder(tmp_path)}", "data.vocab_size=300", "data.max_tokens=64",
        "train.max_steps=2", "train.precision=fp32", "train.bleu_subset=0", "train.average_last=0",
        f"run_dir={tmp_path / 'run'}",
    ])
    result = train(cfg)
    assert result.step == 2 and len(result.losses) == 2
    assert all(loss == loss and loss > 0 for loss in result.losses)
    assert (tmp_path / "run" / "checkpoints" / "best" / "model.safetensors").is_file()
