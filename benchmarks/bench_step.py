"""Decoder step cost against CTranslate2, without search effects: both decode exactly L steps (greedy).

CTranslate2 is forced with ``min_decoding_length = max_decoding_length = L``; ours runs its frozen model (what
``Translator`` runs on the CPU) for L steps of encode -> decode -> log-softmax -> argmax. Each side is timed
at two lengths, L1 and L2, and the cost of a step is the slope ``(t(L2) - t(L1)) / (L2 - L1)``; the intercept
is the rest (encoder, cross-attention keys/values, setup). Same weights (our model exported to Hugging Face
Marian and converted, as in ``bench_inference.py``), the first B Multi30k validation sentences, float32
(``--int8``: our int8 path, ``quantize(model, "int8")`` frozen, against CTranslate2 int8 converted from the
same weights), best of 5. Where the compiled extension's ``panel_linear`` runs the step's products (up to
``frozen.PANEL_ROWS`` rows), the step is also timed with it off (MKL's and oneDNN's products, as before
session 8), as "ours, MKL products", with the ratio. Timings are printed, never asserted.

    python benchmarks/bench_step.py --run-dir runs/multi30k_en_de
    python benchmarks/bench_step.py --run-dir runs/multi30k_en_de --int8 --batches 1,32,128
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import transformer  # noqa: F401  # before torch: its OpenMP defaults (transformer/__init__.py) apply, as in the CLI
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import convert_ct2, pad_batch  # noqa: E402
from common import (  # noqa: E402
    add_allocator_arg, describe_machine, keep_host_memory, machine_info, read_lines, setup_device, time_call,
)

from transformer.data.vocab import BOS_ID, EOS_ID  # noqa: E402


def best_of(fn, repeats: int = 5) -> float:
    """Best of ``repeats`` timed calls after one untimed call."""
    fn()
    return min(time_call(fn, "cpu") for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True, help="a trained translation run")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--batches", default="1,4,32", help="rows per step (sentences)")
    parser.add_argument("--lengths", default="5,35", help="L1,L2")
    parser.add_argument("--int8", action="store_true", help="our int8 path against CTranslate2 int8")
    add_allocator_arg(parser, "Translator's decode.keep_freed_memory")
    args = parser.parse_args()
    keep_host_memory("cpu", args.system_malloc)  # for both systems alike, as bench_inference.py
    setup_device("cpu", args.threads)
    print(f"machine: {describe_machine(machine_info('cpu'))}; command: {' '.join(sys.argv)}")
    import ctranslate2

    from transformer.model import frozen as frozen_module
    from transformer.model.convert import to_marian
    from transformer.model.frozen import freeze
    from transformer.training.checkpoint import load_model

    model, _, tok = load_model(args.run_dir)
    model.eval()
    if args.int8:
        from transformer.model.quantize import quantize

        frozen = freeze(quantize(model, "int8"))  # what bench_inference.py's "ours int8" runs
    else:
        frozen = freeze(model)
    l1, l2 = (int(x) for x in args.lengths.split(","))
    with tempfile.TemporaryDirectory() as work:
        to_marian(model).save_pretrained(f"{work}/hf")
        pieces = [tok._tgt.id_to_piece(i) for i in range(tok.tgt_vocab_size)]
        quantization = "int8" if args.int8 else None
        ct2 = ctranslate2.Translator(convert_ct2(f"{work}/hf", f"{work}/ct2", pieces, quantization), device="cpu",
                                     compute_type=quantization or "float32", intra_threads=torch.get_num_threads(),
                                     inter_threads=1)
        sources = [ids + [EOS_ID] for ids in tok.encode_src_batch(read_lines("val", "en")[:128])]
        panels = getattr(frozen.decoder.layers[0].fc1, "panels", None) is not None  # float32 panel_linear
        print("| rows | ours ms/step | CT2 ms/step | ours / CT2 step speed | ours rest ms | CT2 rest ms |"
              + (" ours, MKL products ms/step | panel_linear speed-up |" if panels else ""))
        print("|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if panels else ""))
        for rows in (int(b) for b in args.batches.split(",")):
            batch = sources[:rows]
            src = pad_batch(batch, torch.device("cpu"))

            def ours(steps: int) -> None:
                with torch.inference_mode():
                    enc, cache = frozen.encode(src), frozen.new_cache()
                    token = torch.full((rows, 1), BOS_ID)
                    for _ in range(steps):
                        logprobs = torch.log_softmax(frozen.decode(token, enc, cache)[:, -1], dim=-1)
                        token = logprobs.argmax(-1, keepdim=True)

            def peer(steps: int) -> None:
                ct2.translate_batch([[pieces[i] for i in s] for s in batch], beam_size=1, max_decoding_length=steps,
                                    min_decoding_length=steps, max_batch_size=0)

            def ours_mkl(steps: int) -> None:
                panel_rows = dict(frozen_module.PANEL_ROWS)
                frozen_module.PANEL_ROWS.update(dict.fromkeys(panel_rows, 0))  # read at each call: MKL's forms
                try:
                    ours(steps)
                finally:
                    frozen_module.PANEL_ROWS.update(panel_rows)

            systems = [("ours", ours), ("ct2", peer)] + ([("mkl", ours_mkl)] if panels else [])
            times = {name: (best_of(lambda: fn(l1)), best_of(lambda: fn(l2))) for name, fn in systems}
            step = {n: (t2 - t1) / (l2 - l1) for n, (t1, t2) in times.items()}
            rest = {n: times[n][0] - l1 * step[n] for n in times}
            print(f"| {rows} | {step['ours'] * 1e3:.2f} | {step['ct2'] * 1e3:.2f} | {step['ct2'] / step['ours']:.2f}x "
                  f"| {rest['ours'] * 1e3:.1f} | {rest['ct2'] * 1e3:.1f} |"
                  + (f" {step['mkl'] * 1e3:.2f} | {step['mkl'] / step['ours']:.2f}x |" if panels else ""), flush=True)


if __name__ == "__main__":
    main()
