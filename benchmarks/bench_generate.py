"""Language-model generation speed: our frozen model (what ``LanguageModel`` runs: on CUDA its step replayed as
CUDA graphs on a static KV cache) against the same weights as a frozen model without graphs and as the
``nn.Module``, in one process, round-robin. There is no Hugging Face peer: our LM has no exporter yet.

Each system samples ``--tokens`` new tokens after a ``--prompt``-token prompt with the same seed, so all
produce the same tokens (checked and printed); generated tokens/s, best of ``--repeats``. Weights: a
randomly initialised LM of ``--preset`` (the speed of a step does not depend on the values). Timings are
printed, never asserted.

    python benchmarks/bench_generate.py --device cuda [--bf16] --preset small
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import transformer  # noqa: F401  # before torch: its OpenMP defaults (transformer/__init__.py) apply, as in the CLI
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_machine, machine_info, setup_device, time_call  # noqa: E402

from transformer.config import preset  # noqa: E402
from transformer.data.vocab import BOS_ID  # noqa: E402
from transformer.decoding import sample  # noqa: E402
from transformer.model import TransformerLM, freeze  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--bf16", action="store_true", help="cast the model to bf16 (CUDA)")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    parser.add_argument("--tokens", type=int, default=200, help="new tokens sampled")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = setup_device(args.device, args.threads)
    print(f"machine: {describe_machine(machine_info(args.device))}; command: {' '.join(sys.argv)}")
    cfg = preset(args.preset)
    cfg = replace(cfg, arch="lm", max_positions=max(cfg.max_positions, args.prompt + args.tokens))
    torch.manual_seed(0)
    model = TransformerLM(cfg, args.vocab).to(device).eval()
    if args.bf16:
        model = model.to(torch.bfloat16)
    systems = {"ours (frozen, graphs on CUDA)": freeze(model)}
    if device.type == "cuda":
        systems["frozen, no graphs"] = freeze(model, graphs=False)
    systems["nn.Module"] = model
    prompt = [BOS_ID] + torch.randint(4, args.vocab, (args.prompt - 1,), generator=torch.Generator().manual_seed(1)).tolist()

    def generate(m) -> list[int]:
        g = torch.Generator(device=device).manual_seed(2)
        with torch.inference_mode():
            return list(sample(m, prompt, args.tokens, temperature=1.0, top_k=50, generator=g))

    outputs = {name: generate(m) for name, m in systems.items()}  # warm-up (records the graphs)
    best = {name: float("inf") for name in systems}
    for _ in range(args.repeats):
        for name, m in systems.items():
            best[name] = min(best[name], time_call(lambda: generate(m), device))
    first = next(iter(systems))
    print(f"\nLM {args.preset} (D={cfg.d_model}, {cfg.n_decoder_layers} layers, V={args.vocab}), "
          f"{'bf16' if args.bf16 else 'fp32'}, prompt {args.prompt} tokens, {len(outputs[first])} new tokens, "
          f"top-k 50 sampling, same seed; best of {args.repeats}")
    print("| system | tok/s | ours / this | same tokens as ours |")
    print("|---|---:|---:|---:|")
    rate = {name: len(outputs[name]) / best[name] for name in systems}
    for name in systems:
        print(f"| {name} | {rate[name]:.0f} | {rate[first] / rate[name]:.2f}x | "
              f"{sum(a == b for a, b in zip(outputs[name], outputs[first]))}/{len(outputs[first])} |")


if __name__ == "__main__":
    main()
