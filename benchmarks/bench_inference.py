"""Translation speed side by side: our greedy / beam search (``transformer.decoding``, KV cache) against
the same weights in Hugging Face ``MarianMTModel.generate`` and in CTranslate2 (float32 and int8), and our
int8 path (``transformer.model.quantize``'s per-channel int8 weights, frozen: ``panel_linear_w8a8`` where the
compiled extension is built, PyTorch's dynamic int8 products where not) beside CTranslate2 int8.

The weights: a run directory (``--run-dir``, loaded with ``transformer.training.checkpoint.load_model``),
or a ``small`` model trained here for ``--train-seconds`` on Multi30k en-de (cached under ``--work-dir``),
or, with neither, random init (outputs are then degenerate: every sentence runs to the length limit).
They are exported with ``transformer.model.convert.to_marian``, saved with ``save_pretrained``, and
converted with ``ctranslate2.converters.TransformersConverter`` (a Marian loader adapted to our special
tokens: decoding starts from ``<s>``, not from Marian's zero embedding, and no vocabulary row is dropped).

Measured: generated tokens/s (each sentence counts its output tokens plus one for the final step that
emits EOS or hits the limit), greedy and beam 4, batch 1 and batch 32, over the first ``--sentences``
Multi30k validation sentences, all systems stepped batch by batch round-robin, in a shuffled order for each
batch (since session 23). Every system gets the same source token ids and the same length limit
(``--max-len`` output tokens, EOS included); PAD and BOS are never generated. The outputs are compared
token for token. On the CPU the process keeps freed host memory for reuse (``transformer.host_memory``, what
``Translator`` sets there by default) for every system alike; ``--system-malloc`` leaves glibc's allocator
as it is.

``--isolate`` (since session 27) runs each system instead in a process of its own, as its users run it: one
child process per system and round (two rounds, the second in the reverse order), the best of the two per
system and case; ``--isolate-threads 1,2`` runs each at each thread count and takes its fastest. In one
process the systems' OpenMP runtimes meet (PyTorch's libgomp and the copy that CTranslate2's wheel bundles):
on session 27's 2-core Intel Xeon our greedy search at batch 1 ran several times slower once CTranslate2's
translators had run in the process, and CTranslate2 itself was several times slower at 2 threads than at 1
(BENCHMARKS.md, session 27).

On ``--device cuda`` CTranslate2 runs on the GPU too, where it loads (float32, or bfloat16 with ``--bf16``;
no int8 rows there): its wheels open CUDA 12's cuBLAS by name, so a machine with CUDA 13 only needs
``libcublas.so.12`` / ``libcublasLt.so.12`` on ``LD_LIBRARY_PATH`` (BENCHMARKS.md, GPU, session 11, ran
them as links to CUDA 13's cuBLAS); otherwise it is left out with a message.

    python benchmarks/bench_inference.py --device cpu --train-seconds 240
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import sacrebleu
import transformer  # noqa: F401  # before torch: its OpenMP defaults (transformer/__init__.py) apply, as in the CLI
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    add_allocator_arg, add_common_args, describe_allocator, describe_machine, gemm_peak, keep_host_memory,
    machine_info, memory_bandwidth_gbs, multi30k_tokenizer, print_limits, read_lines, setup_device, sync,
)

from transformer.config import LENGTH_PENALTY_FORMS, preset  # noqa: E402
from transformer.data.vocab import BOS, BOS_ID, EOS, EOS_ID, PAD, PAD_ID, UNK  # noqa: E402
from transformer.model import Transformer  # noqa: E402

NAMES = {"ours": "ours (decoding/)", "ours_nograph": "ours frozen, no CUDA graphs",
         "ours_pystep": "ours frozen, Python step", "ours_pyloop": "ours, Python search loops",
         "ours_eager": "ours, not frozen", "ours_int8": "ours int8",
         "ours_int8_pyloop": "ours int8, Python search loops",
         "ours_avx2": "ours, AVX2 kernels", "ours_int8_avx2": "ours int8, AVX2 kernels",
         "hf": "HF generate",
         "ct2_fp32": "CTranslate2 float32", "ct2_int8": "CTranslate2 int8"}


# --- the weights ------------------------------------------------------------------------------------


def quick_train(tok, seconds: float, device: torch.device, cache: Path) -> Transformer:
    """A ``small`` model trained for ``seconds`` on Multi30k en-de (so that outputs end with EOS at
    realistic lengths); cached by duration."""
    cfg = preset("small")
    model = Transformer(cfg, tok.src_vocab_size, tok.tgt_vocab_size)
    if cache.exists():
        model.load_state_dict(torch.load(cache, weights_only=True))
        return model.to(device).eval()
    from transformer.data.batching import TokenBatchSampler, collate
    from transformer.training.loss import label_smoothed_nll_loss

    src = tok.encode_src_batch(read_lines("train", "en"))
    tgt = tok.encode_tgt_batch(read_lines("train", "de"))
    sampler = TokenBatchSampler([len(s) + 1 for s in src], [len(t) + 1 for t in tgt], 2048, seed=1)
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-9)
    start, step, epoch = time.perf_counter(), 0, 0
    while time.perf_counter() - start < seconds:
        sampler.set_epoch(epoch)
        for indices in sampler:
            b = collate([(src[i], tgt[i]) for i in indices]).to(device)
            step += 1
            for group in opt.param_groups:  # inverse-sqrt with 200 warmup steps
                group["lr"] = 1e-3 * min(step / 200, (200 / step) ** 0.5)
            loss, nll = label_smoothed_nll_loss(model(b.src_tokens, b.tgt_input), b.tgt_output, 0.1)
            n = b.tgt_output.ne(PAD_ID).sum()
            (loss / n).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step % 100 == 0:
                print(f"  quick training: step {step}, nll/token {float(nll / n):.2f}, "
                      f"{time.perf_counter() - start:.0f} s", flush=True)
            if time.perf_counter() - start >= seconds:
                break
        epoch += 1
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), cache)
    return model.eval()


def load_weights(args, device: torch.device):
    """(model, tokenizer, description of the weights)."""
    if args.run_dir:
        from transformer.training.checkpoint import load_model

        model, _, tok = load_model(args.run_dir)
        return model.to(device).eval(), tok, f"trained run {args.run_dir}"
    tok = multi30k_tokenizer(args.work_dir, 8000)
    if args.train_seconds > 0:
        cache = Path(args.work_dir) / f"quick_small_{int(args.train_seconds)}s.pt"
        model = quick_train(tok, args.train_seconds, device, cache)
        return model, tok, f"small preset trained here for {args.train_seconds:.0f} s on Multi30k en-de"
    torch.manual_seed(0)
    model = Transformer(preset("small"), tok.src_vocab_size, tok.tgt_vocab_size).to(device).eval()
    return model, tok, "small preset, RANDOM INIT (degenerate outputs: sentences run to the length limit)"


# --- the peers --------------------------------------------------------------------------------------


class _PieceTokenizer:
    """What CTranslate2's converter asks of a tokenizer: the vocabulary in id order and special tokens."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = BOS, EOS, UNK, PAD

    def get_vocab(self) -> dict[str, int]:
        return {p: i for i, p in enumerate(self.pieces)}

    def convert_ids_to_tokens(self, i: int) -> str:
        return self.pieces[i]


def convert_ct2(hf_dir: str, out_dir: str, pieces: list[str], quantization: str | None) -> str:
    """``TransformersConverter`` on a ``save_pretrained`` directory, with a Marian loader for our tokens."""
    import ctranslate2.converters.transformers as ct2t

    class OurMarianLoader(ct2t.MarianMTLoader):
        def get_model_spec(self, model):
            model.config.normalize_before = False
            model.config.normalize_embedding = False
            return ct2t.BartLoader.get_model_spec(self, model)  # no vocabulary row dropped

        def set_config(self, config, model, tokenizer):
            config.bos_token, config.eos_token, config.unk_token = BOS, EOS, UNK
            config.decoder_start_token = BOS  # our decoder starts from <s>'s embedding

        def set_decoder(self, spec, decoder):
            ct2t.BartLoader.set_decoder(self, spec, decoder)  # start_from_zero_embedding stays False

        def get_vocabulary(self, model, tokenizer):
            return list(tokenizer.pieces)

    class Converter(ct2t.TransformersConverter):
        def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
            return _PieceTokenizer(pieces)

    saved = ct2t._MODEL_LOADERS["MarianConfig"]
    ct2t._MODEL_LOADERS["MarianConfig"] = OurMarianLoader()
    try:
        Converter(hf_dir).convert(out_dir, quantization=quantization, force=True)
    finally:
        ct2t._MODEL_LOADERS["MarianConfig"] = saved
    return out_dir


def strip(ids: list[int]) -> list[int]:
    """Output ids without BOS/PAD, cut at the first EOS."""
    out = []
    for i in ids:
        if i == EOS_ID:
            break
        if i not in (BOS_ID, PAD_ID):
            out.append(i)
    return out


def pad_batch(seqs: list[list[int]], device: torch.device) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [PAD_ID] * (width - len(s)) for s in seqs], dtype=torch.long, device=device)


def ct2_available(device: torch.device) -> bool:
    """CTranslate2 is importable and, for a CUDA device, sees one (its PyPI wheels then load CUDA 12's
    cuBLAS, ``libcublas.so.12``, at the first translation: ``make_systems`` leaves it out if that fails)."""
    try:
        import ctranslate2
    except ImportError:
        print("CTranslate2 is not installed: left out (pip install ctranslate2)")
        return False
    if device.type == "cuda" and ctranslate2.get_cuda_device_count() == 0:
        print("CTranslate2 sees no CUDA device: left out")
        return False
    return True


def make_systems(args, model, tok, device: torch.device, work: str) -> dict:
    """name -> translate(list of source id lists (EOS included), beam) -> list of output id lists."""
    from transformer.decoding import beam_search, greedy_search
    from transformer.model.convert import to_marian

    limit = args.max_len  # output tokens, EOS included
    systems = {}
    hf = to_marian(model).to(device).eval()  # the same weights, exported before any cast
    if args.bf16 and device.type == "cuda":  # both models cast to bf16, as GPU inference is run
        model, hf = model.to(torch.bfloat16), hf.to(torch.bfloat16)

    def ours(batch, beam, model=model):
        src = pad_batch(batch, device)
        with torch.inference_mode():
            if beam == 1:
                hyps = greedy_search(model, src, max_len_a=0.0, max_len_b=limit)
            else:
                hyps = [n[0] for n in beam_search(model, src, beam=beam, alpha=args.alpha, max_len_a=0.0,
                                                  max_len_b=limit, length_penalty_form=args.length_penalty_form)]
        return [h.tokens for h in hyps]

    if not args.no_freeze:  # what Translator runs: frozen; on CUDA with its decoder step as CUDA graphs
        from transformer.model.frozen import freeze

        frozen = freeze(model)
        systems["ours"] = lambda batch, beam: ours(batch, beam, model=frozen)
        if args.eager:
            if device.type == "cuda":
                plain = freeze(model, graphs=False)  # the frozen layout, launched from Python
                systems["ours_nograph"] = lambda batch, beam: ours(batch, beam, model=plain)
            elif frozen.decoder.native is not None:  # the compiled step is built: also the Python step
                pystep = freeze(model, native=False)
                systems["ours_pystep"] = lambda batch, beam: ours(batch, beam, model=pystep)
            systems["ours_eager"] = ours  # the nn.Module itself, as training's validation decodes it
    else:
        systems["ours"] = ours
    if device.type == "cpu" and not args.skip_int8:
        from transformer.model.quantize import quantize

        int8_model = quantize(model, "int8")  # PyTorch dynamic int8 Linear layers, per-channel weights
        if not args.no_freeze:
            int8_model = freeze(int8_model)
        systems["ours_int8"] = lambda batch, beam: ours(batch, beam, model=int8_model)
    if args.python_loop:  # the searches' Python loops where the compiled ones (DecoderStep.greedy, .beam) run
        from transformer.decoding.common import python_loop

        def in_python_loop(system):
            def run(batch, beam):
                with python_loop():
                    return system(batch, beam)
            return run

        for name in ("ours", "ours_int8"):
            if name in systems:
                systems[name + "_pyloop"] = in_python_loop(systems[name])
    if args.avx2:  # the extension's kernels capped at AVX2 where the CPU has AVX-512 (the same bits)
        from transformer.model import native

        module = native.load()
        if module is not None and module.cpu_level() > 2:
            level = module.cpu_level()  # restored after each call (TRANSFORMER_CPU_LEVEL may have capped it)

            def at_avx2(system):
                def run(batch, beam):
                    module.set_cpu_level(2)
                    try:
                        return system(batch, beam)
                    finally:
                        module.set_cpu_level(level)
                return run

            for name in ("ours", "ours_int8"):
                if name in systems:
                    systems[name + "_avx2"] = at_avx2(systems[name])
        else:
            print("--avx2: the extension is not built or this CPU has no AVX-512 form to compare with")
    hf_dir = os.path.join(work, "hf")
    hf.save_pretrained(hf_dir)
    # Ours stops at `limit` tokens with EOS forced at the last one; the peers stop after `limit - 1`
    # tokens without it: the same outputs, one decoder step fewer for the peers at the limit.
    hf_kwargs = dict(do_sample=False, max_new_tokens=limit - 1, suppress_tokens=[PAD_ID, BOS_ID])

    def hf_generate(batch, beam):
        src = pad_batch(batch, device)
        beam_kwargs = dict(length_penalty=args.alpha, early_stopping=True) if beam > 1 else {}
        with torch.inference_mode():
            out = hf.generate(input_ids=src, attention_mask=src.ne(PAD_ID), num_beams=beam, **hf_kwargs,
                              **beam_kwargs)
        return [strip(row) for row in out.tolist()]

    systems["hf"] = hf_generate
    if not args.skip_ct2 and ct2_available(device):
        import ctranslate2

        pieces = [tok._tgt.id_to_piece(i) for i in range(tok.tgt_vocab_size)]
        piece_id = {p: i for i, p in enumerate(pieces)}
        if device.type == "cuda":  # float32 (TF32 off on both sides) or bfloat16 as ours; no int8 of ours there
            variants = (("ct2_fp32", None, "bfloat16" if args.bf16 else "float32"),)
        else:
            variants = (("ct2_fp32", None, "float32"), ("ct2_int8", "int8", "int8"))
        for name, quant, compute_type in variants:
            if args.only and name != args.only:  # a child of --isolate: its own system's translator only
                continue
            path = convert_ct2(hf_dir, os.path.join(work, name), pieces, quant)
            options = dict(device="cpu", intra_threads=torch.get_num_threads(), inter_threads=1)
            if device.type == "cuda":
                options = dict(device="cuda", device_index=device.index or 0)
            try:  # a first translation loads the device's libraries (cuBLAS 12 on CUDA)
                translator = ctranslate2.Translator(path, compute_type=compute_type, **options)
                translator.translate_batch([[pieces[EOS_ID]]], max_decoding_length=2)
            except (RuntimeError, ValueError) as exc:
                print(f"CTranslate2 {compute_type} on {device.type} failed to run, left out: {exc}")
                continue

            def ct2_translate(batch, beam, translator=translator):
                source = [[pieces[i] for i in s] for s in batch]
                results = translator.translate_batch(
                    source, beam_size=beam, max_decoding_length=limit - 1, length_penalty=args.alpha,
                    suppress_sequences=[[PAD], [BOS]], max_batch_size=0,
                )
                return [[piece_id[p] for p in r.hypotheses[0]] for r in results]

            systems[name] = ct2_translate
            if compute_type == "bfloat16":
                NAMES[name] = "CTranslate2 bfloat16"
    return systems, frozen if not args.no_freeze else None


# --- measuring --------------------------------------------------------------------------------------


def paired_bootstrap(hyp_a: list[str], hyp_b: list[str], refs: list[str], n: int, seed: int = 0
                     ) -> tuple[float, float, float]:
    """BLEU(a) - BLEU(b) on all sentences, and the 2.5th and 97.5th percentiles of that difference over ``n``
    resamples of the sentences (the same resample for both: Koehn's paired bootstrap, as sacreBLEU's
    ``--paired-bs`` draws it), from sacreBLEU's per-sentence statistics."""
    import numpy as np
    from sacrebleu.metrics import BLEU

    bleu = BLEU()
    stats_a, stats_b = (np.array(bleu._extract_corpus_statistics(h, [refs])) for h in (hyp_a, hyp_b))
    score = lambda st: bleu._compute_score_from_stats(st.sum(0).tolist()).score  # noqa: E731
    index = np.random.default_rng(seed).integers(0, len(refs), size=(n, len(refs)))
    diffs = np.array([score(stats_a[i]) - score(stats_b[i]) for i in index])
    return score(stats_a) - score(stats_b), float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))


def run_case(systems: dict, sources: list[list[int]], batch_size: int, beam: int, device) -> dict:
    """Translate all sources in batches, systems round-robin batch by batch, in a new (seeded) order for each
    batch; seconds, tokens, outputs. A fixed order times each system right after the same other one, and what
    that one leaves behind (most likely the caches' contents; not busy threads: none use the CPU after their
    calls) moved a system's speed at batch 1 by up to a fifth: in session 23 our beam search ran at 0.83x of
    itself, the same code, where it followed CTranslate2 int8 (1.00-1.03x with the shuffled order)."""
    stats = {n: {"time": 0.0, "tokens": 0, "outputs": []} for n in systems}
    batches = [sources[i: i + batch_size] for i in range(0, len(sources), batch_size)]
    for fn in systems.values():  # warm-up on the first batch
        fn(batches[0], beam)
    order = list(systems.items())
    for number, batch in enumerate(batches):
        random.Random(number).shuffle(order)
        for name, fn in order:
            sync(device)
            start = time.perf_counter()
            outs = fn(batch, beam)
            sync(device)
            stats[name]["time"] += time.perf_counter() - start
            stats[name]["tokens"] += sum(len(o) + 1 for o in outs)  # + the step that ends the sentence
            stats[name]["outputs"].extend(outs)
    return stats


def profile_ours(systems: dict, sources: list[list[int]], batch_size: int, beam: int, rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    batches = [sources[i: i + batch_size] for i in range(0, len(sources), batch_size)][:4]
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for b in batches:
            systems["ours"](b, beam)
    print(f"\n== torch.profiler: our {'greedy' if beam == 1 else f'beam {beam}'} search, batch {batch_size}, "
          f"{len(batches)} batches ==")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    if cuda:
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows))


def isolated_stats(args, cases: list[str], names: list[str]) -> dict:
    """--isolate: each system's run of every case in a child process of its own (this script with ``--only``),
    at each of ``--isolate-threads`` (default: this run's thread count), two rounds (the second in the reverse
    order), the fastest per system and case -> {case: stats as run_case returns them, with "threads"}; the
    rate at each thread count is printed."""
    import subprocess

    thread_counts = [int(t) for t in args.isolate_threads.split(",")] if args.isolate_threads else [None]
    best: dict = {case: {} for case in cases}
    rates: dict = {}  # (case, name, threads) -> best tok/s
    for round_names in (names, names[::-1]):
        for name in round_names:
            for threads in thread_counts:
                with tempfile.NamedTemporaryFile(suffix=".json") as out:
                    skip = {"--isolate", "--profile"}
                    argv = [a for a in sys.argv[1:] if a not in skip]
                    if threads is not None:
                        argv = strip_option(strip_option(argv, "--isolate-threads"), "--threads")
                        argv += ["--threads", str(threads)]
                    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--only", name, "--child-json", out.name]
                    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                    child = json.loads(Path(out.name).read_text())
                for case in cases:
                    stats = {**child[case], "threads": threads or torch.get_num_threads()}
                    key = (case, name, stats["threads"])
                    rates[key] = max(rates.get(key, 0.0), stats["tokens"] / stats["time"])
                    if name not in best[case] or stats["time"] < best[case][name]["time"]:
                        best[case][name] = stats
            print(f"    (isolated: {NAMES[name]} done)", flush=True)
    if len(thread_counts) > 1:
        print("    tok/s by thread count (each system alone in its process, best of two rounds):")
        for case in cases:
            print(f"      {case}: " + "; ".join(
                f"{NAMES[n]} " + ", ".join(f"{t} thr {rates[(case, n, t)]:.0f}" for t in thread_counts)
                for n in names))
    return best


def strip_option(argv: list[str], option: str) -> list[str]:
    """argv without ``option`` and its value (given as ``option value`` or ``option=value``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == option:
            skip = True
        elif not a.startswith(option + "="):
            out.append(a)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--run-dir", default="", help="a trained run to load (default: train or random init)")
    parser.add_argument("--train-seconds", type=float, default=0.0, help="train a small model this long first")
    parser.add_argument("--sentences", type=int, default=128, help="Multi30k val sentences translated")
    parser.add_argument("--max-len", type=int, default=64, help="output tokens per sentence, EOS included")
    parser.add_argument("--alpha", type=float, default=0.6, help="length penalty exponent for beam search")
    parser.add_argument("--length-penalty-form", choices=LENGTH_PENALTY_FORMS, default="power",
                        help="our beam search's length penalty: power (len ** alpha) is the peers' own, so all beam "
                             "outputs can match; gnmt ((5 + len) / 6) ** alpha) is the paper's and our default, "
                             "which the peers do not offer")
    parser.add_argument("--cases", default="greedy:1,greedy:32,beam4:1,beam4:32", help="search:batch list")
    parser.add_argument("--skip-ct2", action="store_true")
    parser.add_argument("--skip-int8", action="store_true", help="leave out our int8 path")
    parser.add_argument("--no-freeze", action="store_true",
                        help="ours runs the nn.Module, not its frozen copy (transformer.model.frozen)")
    parser.add_argument("--eager", action="store_true",
                        help="add our nn.Module beside its frozen copy, and the frozen copy without CUDA graphs (CUDA) "
                             "or with the Python decoder step where the compiled one is built (CPU)")
    parser.add_argument("--python-loop", action="store_true",
                        help="add ours and ours int8 with the searches' Python loops instead of the compiled ones "
                             "(DecoderStep.greedy and .beam, where the compiled step computes the logits)")
    parser.add_argument("--avx2", action="store_true",
                        help="add ours and ours int8 with the extension's kernels capped at AVX2 (where the CPU has "
                             "AVX-512 forms; the same outputs)")
    parser.add_argument("--isolate", action="store_true",
                        help="each system in a process of its own, two rounds, the best of the two (see the docstring)")
    parser.add_argument("--isolate-threads", default="",
                        help="with --isolate: run each system at each of these thread counts (e.g. 1,2) and take "
                             "its fastest; the table's ratios are then each system at its best count")
    parser.add_argument("--only", default="", help=argparse.SUPPRESS)  # --isolate's child: this system only
    parser.add_argument("--child-json", default="", help=argparse.SUPPRESS)  # --isolate's child: its results
    parser.add_argument("--profile", action="store_true", help="torch.profiler over our greedy and beam search")
    parser.add_argument("--work-dir", default="/tmp/transformer_bench", help="caches (outside the repository)")
    parser.add_argument("--bootstrap", type=int, default=0,
                        help="paired bootstrap resamples of the BLEU differences (int8 against CT2 int8, ...); 0: none")
    parser.add_argument("--json", default="")
    add_allocator_arg(parser, "Translator's decode.keep_freed_memory")
    args = parser.parse_args()
    kept_memory = keep_host_memory(args.device, args.system_malloc)  # for every system alike, as Translator
    device = setup_device(args.device, args.threads)
    info = machine_info(args.device)
    print(f"machine: {describe_machine(info)}; command: {' '.join(sys.argv)}")
    if device.type == "cpu":
        print(describe_allocator(kept_memory, "Translator's decode.keep_freed_memory, for every system"))
    dtype = torch.bfloat16 if (args.bf16 and device.type == "cuda") else torch.float32
    model, tok, weights = load_weights(args, device)
    cfg = model.cfg
    v = tok.tgt_vocab_size
    sources = [ids + [EOS_ID] for ids in tok.encode_src_batch(read_lines("val", "en")[: args.sentences])]
    if args.only:  # a child of --isolate: one system, every case, the results into --child-json
        with tempfile.TemporaryDirectory(dir=args.work_dir if os.path.isdir(args.work_dir) else None) as work:
            systems, _ = make_systems(args, model, tok, device, work)
            systems = {args.only: systems[args.only]}
            out = {}
            for case in args.cases.split(","):
                search, batch_size = case.split(":")
                beam = 1 if search == "greedy" else int(search.removeprefix("beam"))
                out[case] = run_case(systems, sources, int(batch_size), beam, device)[args.only]
        Path(args.child_json).write_text(json.dumps(out))
        return
    peak, gemms = gemm_peak([(1, cfg.d_model, cfg.d_ff), (32, cfg.d_model, cfg.d_ff), (128, cfg.d_model, v),
                             (1024, cfg.d_model, cfg.d_ff)], device, dtype)
    bandwidth = memory_bandwidth_gbs(device)
    print_limits(peak, gemms, bandwidth)
    print(f"weights: {weights}; D={cfg.d_model} L={cfg.n_encoder_layers}+{cfg.n_decoder_layers} V={v}")
    with tempfile.TemporaryDirectory(dir=args.work_dir if os.path.isdir(args.work_dir) else None) as work:
        systems, frozen = make_systems(args, model, tok, device, work)
        isolated = isolated_stats(args, args.cases.split(","), list(systems)) if args.isolate else None
        if device.type == "cpu" and frozen is not None:  # the extension's hash follows its source: rebuild after edits
            print("compiled extension (transformer build-native): "
                  + ("built" if frozen.decoder.native is not None else
                     "NOT BUILT for this source: ours runs the Python step, ours int8 PyTorch's fbgemm products"))
        results = {"machine": info, "weights": weights, "gemm_peak_gflops": peak, "bandwidth_gbs": bandwidth,
                   "cases": {}}
        print(f"\n{len(sources)} Multi30k val sentences, max {args.max_len} output tokens, beam length "
              f"penalty alpha={args.alpha} (ours: {args.length_penalty_form} form; the peers: len ** alpha); "
              + ("each system in a process of its own, the best of two rounds" if isolated else
                 "systems round-robin batch by batch, shuffled for each batch"))
        ct2_label = "bf16" if dtype == torch.bfloat16 else "fp32"  # the ct2_fp32 system runs ours' dtype on CUDA
        print("| search | batch | " + " | ".join(f"{NAMES[n]} tok/s" for n in systems) + " | ours / HF | "
              f"ours / CT2 {ct2_label} | ours int8 / CT2 int8 | ours / not frozen | ours / no graphs | "
              "ours / Python step | ours / Python loop | ours int8 / Python loop | ours / AVX2 | ours int8 / AVX2 |")
        print("|---|---:|" + "---:|" * (len(systems) + 10))
        references = read_lines("val", "de")[: args.sentences]
        for case in args.cases.split(","):
            search, batch_size = case.split(":")
            beam = 1 if search == "greedy" else int(search.removeprefix("beam"))
            stats = isolated[case] if isolated else run_case(systems, sources, int(batch_size), beam, device)
            rate = {n: s["tokens"] / s["time"] for n, s in stats.items()}
            def ratio(ours: str, peer: str) -> str:
                return f"{rate[ours] / rate[peer]:.2f}x" if ours in rate and peer in rate else "-"

            print(f"| {search} | {batch_size} | " + " | ".join(f"{rate[n]:.0f}" for n in systems)
                  + f" | {ratio('ours', 'hf')} | {ratio('ours', 'ct2_fp32')} | {ratio('ours_int8', 'ct2_int8')} "
                  f"| {ratio('ours', 'ours_eager')} | {ratio('ours', 'ours_nograph')} "
                  f"| {ratio('ours', 'ours_pystep')} | {ratio('ours', 'ours_pyloop')} "
                  f"| {ratio('ours_int8', 'ours_int8_pyloop')} | {ratio('ours', 'ours_avx2')} "
                  f"| {ratio('ours_int8', 'ours_int8_avx2')} |",
                  flush=True)
            if isolated and args.isolate_threads:
                print("    threads of each system's best: " + ", ".join(f"{NAMES[n]} {s['threads']}"
                                                                      for n, s in stats.items()))
            hyps = {n: [tok.decode_tgt(o) for o in s["outputs"]] for n, s in stats.items()}  # detokenised
            bleu = {n: sacrebleu.corpus_bleu(h, [references]).score for n, h in hyps.items()}
            print(f"    BLEU against the references ({len(references)} sentences): "
                  + ", ".join(f"{NAMES[n]} {b:.2f}" for n, b in bleu.items()))
            for n, s in stats.items():
                s["bleu"] = bleu[n]
            if args.bootstrap:
                for a, b in (("ours_int8", "ct2_int8"), ("ours", "ct2_fp32"), ("ours_int8", "ours"),
                             ("ct2_int8", "ct2_fp32")):
                    if a in hyps and b in hyps:
                        diff, low, high = paired_bootstrap(hyps[a], hyps[b], references, args.bootstrap)
                        print(f"    BLEU {NAMES[a]} - {NAMES[b]}: {diff:+.2f}, 95% paired bootstrap interval "
                              f"[{low:+.2f}, {high:+.2f}] ({args.bootstrap} resamples)")
            ref = stats["ours"]["outputs"]
            for name in systems:
                if name == "ours":
                    continue
                same = sum(a == b for a, b in zip(ref, stats[name]["outputs"]))
                print(f"    {search} batch {batch_size}: {NAMES[name]} identical to ours token for token: "
                      f"{same}/{len(ref)}")
                stats[name]["identical_to_ours"] = same
            if frozen is not None and getattr(frozen, "static", None) is not None:
                print(f"    CUDA graphs recorded so far (row bucket, source and target blocks): "
                      f"{frozen.static.recorded}, capacity {frozen.static.capacity}")
            mean_len = statistics.mean(len(o) for o in stats["ours"]["outputs"])
            print(f"    mean output length (ours) {mean_len:.1f} tokens; "
                  f"at the limit: {sum(len(o) >= args.max_len - 1 for o in stats['ours']['outputs'])}")
            for s in stats.values():
                s.pop("outputs")
            results["cases"][case] = {"rates": rate, "stats": stats}
        if args.profile:
            profile_ours(systems, sources, 32, 1, 15)
            profile_ours(systems, sources, 1, 1, 15)
            profile_ours(systems, sources, 32, 4, 15)
    example = sources[0]
    print(f"\nexample: {tok.decode_src(example[:-1])!r}")
    for name, fn in systems.items():
        print(f"  {NAMES[name]:<22} {tok.decode_tgt(fn([example], 1)[0])!r}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
