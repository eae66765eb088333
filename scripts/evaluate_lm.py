"""Held-out perplexity of a language-model run, and a few samples, for RESULTS.md.

    python scripts/evaluate_lm.py runs/shakespeare_lm

Perplexity is computed as in validation: the split's lines joined with EOS, cut into blocks of
``data.block_size`` tokens, every token predicted once (no label smoothing). The built-in ``shakespeare``
dataset's test split is Julius Caesar; its validation split is The Tempest.
"""

from __future__ import annotations

import argparse

import torch

from transformer.data.cache import TokenArray
from transformer.data.datasets import shakespeare
from transformer.data.token_datasets import LMDataset
from transformer.inference import LanguageModel
from transformer.training.checkpoint import load_model
from transformer.training.trainer import evaluate_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--prompts", nargs="*", default=["ROMEO:", "To be, or not to be"])
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    model, cfg, tokenizer = load_model(args.run_dir)
    splits = shakespeare()
    for name, lines in (("valid (The Tempest)", splits.valid), ("test (Julius Caesar)", splits.test)):
        docs = TokenArray.from_lists([tokenizer.encode_src(line) for line in lines])
        dataset = LMDataset(docs, cfg.data.block_size)
        result = evaluate_loss(model, dataset, cfg.data.max_tokens, 0.0, torch.device("cpu"))
        print(f"{name}: perplexity {result['ppl']:.2f} per subword token ({int(result['tokens'])} tokens, "
              f"vocabulary {tokenizer.src_vocab_size})")
    lm = LanguageModel(model, tokenizer, cfg.decode)
    for prompt in args.prompts:
        print(f"\n--- {prompt!r} (temperature {cfg.decode.temperature}, top-p {cfg.decode.top_p}, seed {args.seed})")
        print(prompt + lm.generate(prompt, max_new_tokens=80, seed=args.seed))


if __name__ == "__main__":
    main()
