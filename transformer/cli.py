"""The ``transformer`` command: subcommands parse their arguments, then call library functions.

User errors (:class:`TransformerError`) print one clear message and exit with status 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from transformer.errors import TransformerError


def _describe(args: argparse.Namespace) -> None:
    from transformer.config import load_config, preset, replace
    from transformer.model import build_model, describe

    if args.config:
        cfg = load_config(args.config, args.overrides).model
    else:
        cfg = preset(args.preset)
    if args.arch:
        cfg = replace(cfg, arch=args.arch)
    tgt_vocab = args.tgt_vocab_size or args.vocab_size
    model = build_model(cfg, args.vocab_size, tgt_vocab)
    name = args.preset if not args.config else args.config
    print(f"preset/config: {name}   vocabulary: {args.vocab_size}" + (f" / {tgt_vocab}" if tgt_vocab != args.vocab_size else " (shared)"))
    print(describe(model, cfg))
    paper = {"base": 65e6, "big": 213e6}.get(args.preset) if not args.config else None
    if paper and args.vocab_size == 37000 and tgt_vocab == 37000:
        from transformer.model import count_parameters

        n = count_parameters(model)
        print(f"  the paper (Table 3, 37k shared BPE): {paper / 1e6:.0f}M; ours is {100 * (n - paper) / paper:+.1f}%")


def _train(args: argparse.Namespace) -> None:
    from transformer.config import apply_overrides, config_from_dict, load_config, read_yaml
    from transformer.training import train

    # argparse cannot tell "CONFIG" from a first "section.field=value": the one without "=" is the config.
    configs = [a for a in args.args if "=" not in a]
    overrides = [a for a in args.args if "=" in a] + list(args.overrides)
    if len(configs) > 1:
        raise TransformerError(f"give one config file, not {len(configs)}: {' '.join(configs)}")
    if args.resume:
        if configs:
            raise TransformerError(f"give a config file ({configs[0]}) or --resume {args.resume}, not both")
        run_dir = Path(args.resume)
        saved = run_dir / "config.yaml"
        if not saved.is_file():
            raise TransformerError(f"--resume {run_dir}: no config.yaml there; is it a run directory?")
        cfg = config_from_dict(apply_overrides(read_yaml(saved), overrides + [f"run_dir={run_dir}"]))
    else:
        if not configs:
            raise TransformerError("give a config file (e.g. configs/bible_en_de.yaml) or --resume RUN_DIR")
        cfg = load_config(configs[0], overrides + ([f"run_dir={args.run_dir}"] if args.run_dir else []))
    result = train(cfg, resume=bool(args.resume))
    if result.interrupted:
        raise KeyboardInterrupt


def _average(args: argparse.Namespace) -> None:
    from transformer.training import average_checkpoints

    out = average_checkpoints(args.run_dir, last_n=args.last, out_dir=args.output)
    print(f"averaged the last {args.last} checkpoints into {out}")


def _translate(args: argparse.Namespace) -> None:
    from transformer.inference import Translator, translate_file

    translator = Translator.load(args.model, device=args.device, quantize=args.quantize, dtype=args.dtype,
                                 freeze=args.freeze)
    translate_file(
        translator,
        args.input,
        args.output,
        beam=args.beam,
        length_penalty=args.length_penalty,
        length_penalty_form=args.length_penalty_form,
        nbest=args.nbest,
        max_tokens=args.max_tokens,
    )


def _generate(args: argparse.Namespace) -> None:
    from transformer.inference import LanguageModel

    lm = LanguageModel.load(args.model, device=args.device, quantize=args.quantize, dtype=args.dtype,
                            freeze=args.freeze)
    text = lm.generate(
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        stop=args.stop or None,
        seed=args.seed,
    )
    print(text)


def _evaluate(args: argparse.Namespace) -> None:
    from transformer.inference import Translator
    from transformer.evaluation import evaluate, format_scores

    translator = Translator.load(args.model, device=args.device, quantize=args.quantize, dtype=args.dtype,
                                 freeze=args.freeze)
    scores = evaluate(translator, args.src, args.ref, beam=args.beam, length_penalty=args.length_penalty,
                      length_penalty_form=args.length_penalty_form, output=args.output)
    print(json.dumps(scores, indent=2) if args.json else format_scores(scores))


def _quickstart(args: argparse.Namespace) -> None:
    from transformer.recipes import quickstart

    quickstart(src_lang=args.src, tgt_lang=args.tgt, minutes=args.minutes, run_dir=args.run_dir,
               overrides=args.overrides)


def _download(args: argparse.Namespace) -> None:
    from transformer.data.datasets import download_multi30k

    path = download_multi30k(args.dest)
    print(f"Multi30k is in {path}")


def _build_native(args: argparse.Namespace) -> None:
    import time

    from transformer.model import native

    start = time.perf_counter()
    print("building the compiled decoder step (about a minute the first time) ...", file=sys.stderr, flush=True)
    module = native.build(verbose=args.verbose)
    print(f"compiled decoder step ready: {module.__file__} ({time.perf_counter() - start:.0f} s)")


def _add_inference_options(p: argparse.ArgumentParser) -> None:
    """Where and in what number format a loaded model runs: shared by translate, generate and evaluate."""
    p.add_argument("--device", default="cpu")
    p.add_argument("--quantize", choices=("int8",), help="the Linear layers' weights in int8, one scale per output channel (CPU only)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="cast the model for inference (bf16: the fast path on a GPU; default: as trained, fp32)")
    p.add_argument("--no-freeze", dest="freeze", action="store_false",
                   help="decode with the nn.Module as it is: no frozen copy for decoding, no CUDA graphs on a GPU")


def build_parser() -> argparse.ArgumentParser:
    from transformer.config import LENGTH_PENALTY_FORMS  # light (PyYAML): no torch at parse time

    parser = argparse.ArgumentParser(
        prog="transformer",
        description="Train, translate, generate and evaluate with the Transformer of 'Attention Is All You Need'.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("describe", help="print a model's architecture and parameter count")
    p.add_argument("--preset", default="base", help="base, big, small or tiny (default: base)")
    p.add_argument("--config", help="a YAML config instead of a preset")
    p.add_argument("--arch", choices=("transformer", "lm"), help="override the architecture")
    p.add_argument("--vocab-size", type=int, default=37000, help="(source) vocabulary size (default: 37000)")
    p.add_argument("--tgt-vocab-size", type=int, help="target vocabulary size if not shared")
    p.add_argument("overrides", nargs="*", help="dotted overrides with --config, e.g. model.d_model=256")
    p.set_defaults(func=_describe)

    p = sub.add_parser("train", help="train a translation model or a language model")
    p.add_argument("args", nargs="*", metavar="CONFIG [OVERRIDE ...]",
                   help="YAML config (see configs/), then dotted overrides, e.g. train.max_steps=1000")
    p.set_defaults(overrides=[])
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR exactly where it stopped")
    p.add_argument("--run-dir", help="where to write checkpoints and logs (overrides run_dir)")
    p.set_defaults(func=_train)

    p = sub.add_parser("average", help="average the last N checkpoints of a run (as the paper did)")
    p.add_argument("run_dir")
    p.add_argument("--last", type=int, default=5, help="how many checkpoints (default: 5)")
    p.add_argument("--output", help="output checkpoint directory (default: RUN_DIR/checkpoints/averaged)")
    p.set_defaults(func=_average)

    p = sub.add_parser("translate", help="translate lines from stdin or --input")
    p.add_argument("--model", required=True, help="run directory or checkpoint directory")
    p.add_argument("--input", help="input file (default: stdin)")
    p.add_argument("--output", help="output file (default: stdout)")
    p.add_argument("--beam", type=int, default=None, help="beam size (default: the run's decode.beam, 4)")
    p.add_argument("--length-penalty", type=float, default=None, help="alpha (default: 0.6)")
    p.add_argument("--length-penalty-form", choices=LENGTH_PENALTY_FORMS, default=None,
                   help="gnmt: ((5 + len) / 6) ** alpha, the paper's; power: len ** alpha, as fairseq, Hugging Face "
                        "and CTranslate2 (default: the run's decode.length_penalty_form, gnmt)")
    p.add_argument("--nbest", type=int, default=1, help="write the N best translations with scores")
    p.add_argument("--max-tokens", type=int, default=None, help="source tokens per batch")
    _add_inference_options(p)
    p.set_defaults(func=_translate)

    p = sub.add_parser("generate", help="continue a prompt with a language model")
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", default="")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    _add_inference_options(p)
    p.set_defaults(func=_generate)

    p = sub.add_parser("evaluate", help="translate --src and score against --ref with sacreBLEU and chrF")
    p.add_argument("--model", required=True)
    p.add_argument("--src", required=True)
    p.add_argument("--ref", required=True)
    p.add_argument("--beam", type=int, default=None)
    p.add_argument("--length-penalty", type=float, default=None)
    p.add_argument("--length-penalty-form", choices=LENGTH_PENALTY_FORMS, default=None,
                   help="as for translate (default: the run's decode.length_penalty_form, gnmt)")
    p.add_argument("--output", help="also write the translations here")
    p.add_argument("--json", action="store_true", help="print the scores as JSON")
    _add_inference_options(p)
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("quickstart", help="train and evaluate a small Bible translation model, offline")
    p.add_argument("--src", default="en", help="source language code (default: en)")
    p.add_argument("--tgt", default="de", help="target language code (default: de)")
    p.add_argument("--minutes", type=float, default=10.0, help="training time budget (default: 10)")
    p.add_argument("--run-dir", default="runs/quickstart")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the quickstart config")
    p.set_defaults(func=_quickstart)

    p = sub.add_parser("build-native", help="compile the C++ decoder step and few-row product that CPU decoding then "
                       "uses, and the dropout, attention, feed-forward ReLU and loss of CPU training (optional)")
    p.add_argument("--verbose", action="store_true", help="show the compiler's output")
    p.set_defaults(func=_build_native)

    p = sub.add_parser("download-multi30k", help="download Multi30k (needs internet)")
    p.add_argument("dest", help="folder to write train/val/test_2017_flickr.{en,de,fr}")
    p.set_defaults(func=_download)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Dotted overrides may also come after options (argparse stops collecting positionals at an option).
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.func(args)
    except TransformerError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
