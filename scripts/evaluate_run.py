"""Score a finished run for RESULTS.md: best and averaged checkpoints x greedy and beam, on several test sets.

    python scripts/evaluate_run.py runs/multi30k_en_de \
        val=../shared/data/multi30k/val.en,../shared/data/multi30k/val.de \
        test_2017_flickr=../shared/data/multi30k/test_2017_flickr.en,../shared/data/multi30k/test_2017_flickr.de

A set may also be ``bible:valid`` or ``bible:test`` (the built-in Bible's held-out books):

    python scripts/evaluate_run.py runs/bible_en_de valid=bible:valid test=bible:test

Prints one markdown row per (set, checkpoint, search) with sacreBLEU, chrF and the decoding time, and the
signatures once at the end.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from transformer.config import load_config
from transformer.evaluation import evaluate
from transformer.inference import Translator
from transformer.recipes import write_bible_split


def bible_files(cfg, spec: str, run: Path) -> tuple[Path, Path]:
    """``bible:valid`` or ``bible:test``: that split of the built-in Bible in the run's language pair,
    written to RUN/eval.SPLIT.{src,tgt} as the quickstart writes its test books."""
    split = spec.removeprefix("bible:")
    src, ref = run / f"eval.{split}.{cfg.data.src_lang}", run / f"eval.{split}.ref.{cfg.data.tgt_lang}"
    write_bible_split(cfg.data.src_lang, cfg.data.tgt_lang, split, src, ref)
    return src, ref


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("sets", nargs="+", help="NAME=SRC_FILE,REF_FILE")
    parser.add_argument("--beams", default="1,4", help="beam sizes to try (1 = greedy)")
    parser.add_argument("--device", default="cpu", help="where to decode (cpu, cuda)")
    args = parser.parse_args()

    run = Path(args.run_dir)
    cfg = load_config(run / "config.yaml")
    checkpoints = [("best", run / "checkpoints" / "best")]
    if (run / "checkpoints" / "averaged").is_dir():
        checkpoints.append((f"average of last {cfg.train.average_last}", run / "checkpoints" / "averaged"))
    signatures = {}
    print("| set | checkpoint | search | BLEU | chrF | decoding time |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for set_spec in args.sets:
        name, files = set_spec.split("=", 1)
        src, ref = bible_files(cfg, files, run) if files.startswith("bible:") else files.split(",")
        for ckpt_name, path in checkpoints:
            translator = Translator.load(path, device=args.device)
            for beam in (int(b) for b in args.beams.split(",")):
                started = time.time()
                scores = evaluate(translator, src, ref, beam=beam, length_penalty=cfg.decode.length_penalty,
                                  progress=False)
                search = "greedy" if beam == 1 else f"beam {beam}, alpha {cfg.decode.length_penalty}"
                print(f"| {name} | {ckpt_name} | {search} | {scores['bleu']:.1f} | {scores['chrf']:.1f} | "
                      f"{time.time() - started:.0f} s |", flush=True)
                signatures = {"BLEU": scores["bleu_signature"], "chrF": scores["chrf_signature"]}
    for metric, signature in signatures.items():
        print(f"\n{metric} signature: `{signature}`")


if __name__ == "__main__":
    main()
