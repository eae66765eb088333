"""Real data stage (prepare_data on tiny text files) + training + BLEU + load_model."""

import random

import pytest

from transformer.config import config_from_dict
from transformer.training import checkpoint as ckpt
from transformer.training import train

WORDS = "the a house cat dog sees big small red blue runs sleeps".split()
GERMAN = dict(zip(WORDS, "der ein haus katze hund sieht gross klein rot blau rennt schlaeft".split()))


def _write_corpus(folder, n, name, rng):
    src, tgt = [], []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 6))]
        src.append(" ".join(words))
        tgt.append(" ".join(GERMAN[w] for w in words))
    (folder / f"{name}.en").write_text("\n".join(src) + "\n")
    (folder / f"{name}.de").write_text("\n".join(tgt) + "\n")


@pytest.mark.slow
def test_prepare_train_bleu_and_load(tmp_path):
    rng = random.Random(0)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    _write_corpus(corpus, 300, "train", rng)
    _write_corpus(corpus, 20, "val", rng)
    run = tmp_path / "run"
    cfg = config_from_dict({
        "model": dict(d_model=32, n_heads=2, d_ff=64, n_encoder_layers=1, n_decoder_layers=1, max_positions=64),
        "data": dict(dataset="files", path=str(corpus), vocab_size=300, max_tokens=200, test_prefix=None),
        "train": dict(lr_schedule="inverse_sqrt", lr=3e-3, warmup_steps=5, max_steps=20, valid_every=10,
                      save_every=10, log_every=5, bleu_subset=8, best_metric="bleu"),
        "run_dir": str(run),
    })
    result = train(cfg)
    assert result.step == 20
    assert sum(result.losses[-3:]) < sum(result.losses[:3])
    assert all("bleu" in v and "bleu_signature" in v for v in result.valid)
    assert result.best_checkpoint == run / "checkpoints" / "best"
    model, loaded_cfg, tokenizer = ckpt.load_model(run)
    assert loaded_cfg == cfg and tokenizer.src_vocab_size == 300
    assert (run / "tokenizer").is_dir() and (run / "curves.png").is_file()
