"""Shared benchmark helpers: machine description, the physical limits measured in the same run, timing.

Every benchmark script prints, before its own results:

- the machine (CPU model from ``/proc/cpuinfo`` or the GPU name), torch version and thread count;
- the matrix-multiply peak (GFLOP/s through ``torch.matmul``) at the model's own GEMM shapes, so that
  model FLOP utilisation (MFU) is measured against what this machine can do *now* (other work on a
  shared machine lowers the peak and the model alike);
- the memory bandwidth (GB/s of a large tensor copy, read + write counted).

Timings take the median of several repeats; peers are measured interleaved in the same process so that
contention from other processes affects every peer alike, and each result is printed as a ratio.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, REPO_ROOT)


# --- the machine ------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or platform.processor())."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_info(device: str) -> dict:
    """What a results table must state: device, CPU, cores, threads, torch version."""
    info = {
        "device": device,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def describe_machine(info: dict) -> str:
    where = info.get("gpu") or f"{info['cpu']} ({info['cpu_count']} cores)"
    return f"{where}; torch {info['torch']}; {info['torch_threads']} threads"


def setup_device(device: str, threads: Optional[int]) -> torch.device:
    """Fix the thread count (default: all cores) and check that the device exists."""
    if threads:
        torch.set_num_threads(threads)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here")
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 on both sides of a ratio
        torch.backends.cudnn.allow_tf32 = False
    return torch.device(device)


def add_allocator_arg(parser, like: str) -> None:
    """``--system-malloc``: leave glibc's allocator as it is, where the script otherwise keeps freed host memory
    as ``like`` does (see :func:`keep_host_memory`)."""
    parser.add_argument("--system-malloc", action="store_true",
                        help=f"CPU: leave glibc's allocator as it is (default: as {like})")


def keep_host_memory(device: str, system_malloc: bool) -> bool:
    """On the CPU, unless ``--system-malloc``: glibc keeps freed host memory for reuse
    (:func:`transformer.host_memory.keep_freed_memory`, what our trainer and ``Translator`` set by default), for
    every system in the process alike. Whether it was set."""
    if device != "cpu" or system_malloc:
        return False
    from transformer.host_memory import keep_freed_memory

    return keep_freed_memory()


def describe_allocator(kept: bool, like: str) -> str:
    """The line a benchmark prints about the host allocator (``kept``: from :func:`keep_host_memory`)."""
    return "host allocator: " + (f"glibc, large blocks from the heap and freed memory kept (as {like})" if kept
                                 else "as the system has it")


def sync(device: torch.device | str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


# --- timing -----------------------------------------------------------------------------------------


def time_call(fn: Callable[[], object], device: torch.device | str) -> float:
    """Seconds for one call of ``fn``, synchronised on CUDA."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median_time(fn: Callable[[], object], device, warmup: int = 1, repeats: int = 5) -> float:
    """Median seconds per call after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    return statistics.median(time_call(fn, device) for _ in range(repeats))


def sandwiched_times(fns: dict[str, Callable[[], object]], probe: Callable[[], object], device, warmup: int,
                     rounds: int) -> tuple[dict[str, list[float]], dict[str, list[float]], list[float]]:
    """Per-call seconds of each peer, measured round-robin so that load from other processes lands on every peer
    alike, each round starting one peer further on (A B C, B C A, C A B, ...) so that no peer always follows the
    same one, with ``probe`` (the GEMM probe) timed before the first peer of a round and after each peer:
    P A P B P C P, P B P C P A P, ... Warm-up calls are interleaved the same way and discarded.

    Returns (times, around, probes): ``times[name][r]``, the peer's seconds in round r; ``around[name][r]``, the
    mean of the probe's seconds just before and just after that call, for :func:`paired_fractions`; and every
    probe's seconds. On a host whose speed changes within seconds (BENCHMARKS.md, sessions 29-30), a step is
    paired with the probe timed on either side of it, not with one timed a whole round away."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            probe()
    times: dict[str, list[float]] = {name: [] for name in fns}
    around: dict[str, list[float]] = {name: [] for name in fns}
    probes: list[float] = []
    names = list(fns)
    for r in range(rounds):
        before = time_call(probe, device)
        probes.append(before)
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(time_call(fns[name], device))
            after = time_call(probe, device)
            probes.append(after)
            around[name].append((before + after) / 2)
            before = after
    return times, around, probes


def paired_fractions(flops: float, seconds: list[float], probe_flops: float,
                     probe_seconds: list[float]) -> list[float]:
    """Per round, the FLOP/s of ``flops`` done in ``seconds[r]`` over the GEMM probe's FLOP/s in the same round
    (``probe_flops`` in ``probe_seconds[r]``), from :func:`sandwiched_times`' lists (``around``). On a host
    whose speed drifts, a step and the probe timed on either side of it see about the same host, so each ratio
    cancels the drift that a best step over a best peak, taken at different moments, does not."""
    if len(seconds) != len(probe_seconds):
        raise ValueError(f"{len(seconds)} rounds of the step against {len(probe_seconds)} of the probe")
    return [(flops / t) / (probe_flops / p) for t, p in zip(seconds, probe_seconds)]


# --- the physical limits ----------------------------------------------------------------------------


@dataclass
class GemmResult:
    m: int
    k: int
    n: int
    dtype: str
    gflops: float  # best of the repeats: a peak, not a typical figure

    def label(self) -> str:
        return f"({self.m},{self.k})x({self.k},{self.n}) {self.dtype}"


def gemm_gflops(m: int, k: int, n: int, device, dtype=torch.float32, min_seconds: float = 0.5) -> GemmResult:
    """Best GFLOP/s of ``(m,k) @ (k,n)`` (2*m*k*n FLOPs per product) over runs of >= ``min_seconds``."""
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)
    torch.matmul(a, b, out=out)  # warm-up (thread pool, allocator, cuBLAS heuristics)
    flops = 2.0 * m * k * n
    once = max(time_call(lambda: torch.matmul(a, b, out=out), device), 1e-6)
    inner = max(1, int(0.1 / once))  # ~0.1 s per timed batch
    best, spent = 0.0, 0.0
    while spent < min_seconds:

        def run() -> None:
            for _ in range(inner):
                torch.matmul(a, b, out=out)

        dt = time_call(run, device)
        spent += dt
        best = max(best, flops * inner / dt / 1e9)
    return GemmResult(m, k, n, str(dtype).replace("torch.", ""), best)


def gemm_peak(shapes: Iterable[tuple[int, int, int]], device, dtype=torch.float32) -> tuple[float, list[GemmResult]]:
    """The peak (best GFLOP/s over ``shapes``) and every shape's figure."""
    results = [gemm_gflops(m, k, n, device, dtype) for m, k, n in shapes]
    return max(r.gflops for r in results), results


def gemm_probe(best: GemmResult, device, seconds: float = 0.3) -> tuple[Callable[[], None], float]:
    """A call that multiplies at ``best``'s shape for about ``seconds``, and its FLOPs: timed round-robin
    with the models it gives the GEMM peak under the same load from other processes as they saw."""
    dtype = getattr(torch, best.dtype)
    a = torch.randn(best.m, best.k, device=device, dtype=dtype)
    b = torch.randn(best.k, best.n, device=device, dtype=dtype)
    out = torch.empty(best.m, best.n, device=device, dtype=dtype)
    flops = 2.0 * best.m * best.k * best.n
    inner = max(1, int(seconds * best.gflops * 1e9 / flops))

    def run() -> None:
        for _ in range(inner):
            torch.matmul(a, b, out=out)

    return run, flops * inner


def memory_bandwidth_gbs(device, n_bytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Best GB/s of copying a ``n_bytes`` float32 tensor (bytes read + bytes written)."""
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(time_call(lambda: dst.copy_(src), device) for _ in range(repeats))
    return 2 * n_bytes / best / 1e9


def print_limits(peak: float, results: Sequence[GemmResult], bandwidth: float) -> None:
    print("physical limits (measured in this run):")
    for r in results:
        print(f"  GEMM {r.label():<32} {r.gflops:8.1f} GFLOP/s")
    print(f"  GEMM peak (best of the above)    {peak:8.1f} GFLOP/s")
    print(f"  memory bandwidth (copy)          {bandwidth:8.1f} GB/s")


# --- model FLOPs ------------------------------------------------------------------------------------


def train_step_flops(
    d_model: int, d_ff: int, n_enc: int, n_dec: int, vocab: int, batch: int, src_len: int, tgt_len: int
) -> float:
    """Model FLOPs of one training step (forward + backward = 3 x forward) of an encoder-decoder.

    Formula (the usual ``6 * N * tokens`` of Kaplan et al. / PaLM, split by which tokens each weight sees,
    plus attention and the output projection; padded positions count, since they are computed):

        N_enc     = L_enc * (4 D^2 + 2 D F)             encoder weights, applied to B*S source positions
        N_dec_tgt = L_dec * (4 D^2 + 2 D^2 + 2 D F)     self-attn q,k,v,o + cross-attn q,o + FFN, on B*T
        N_dec_src = L_dec * 2 D^2                       cross-attn k,v, applied to the B*S memory positions
        attention = 2 * 2 * D * (L_enc S^2 + L_dec T^2 + L_dec T S) * B   (QK^T and AV, full T^2 counted
                                                                           for the causal self-attention, as PaLM)
        output    = 2 * D * V * B*T                      pre-softmax projection
        step      = 3 * (2 * (N_enc B S + N_dec_tgt B T + N_dec_src B S) + attention + output)

    Biases, LayerNorms, softmax, embeddings lookups and the optimizer are not counted (they are not
    matrix multiplies); the GEMM peak is the matching denominator.
    """
    d, f = d_model, d_ff
    n_src, n_tgt = batch * src_len, batch * tgt_len
    n_enc_w = n_enc * (4 * d * d + 2 * d * f)
    n_dec_tgt_w = n_dec * (6 * d * d + 2 * d * f)
    n_dec_src_w = n_dec * 2 * d * d
    forward = 2 * (n_enc_w * n_src + n_dec_tgt_w * n_tgt + n_dec_src_w * n_src)
    forward += 2 * 2 * d * batch * (n_enc * src_len**2 + n_dec * tgt_len**2 + n_dec * tgt_len * src_len)
    forward += 2 * d * vocab * n_tgt
    return 3.0 * forward


# --- memory -----------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """This process's peak resident set size: VmHWM from /proc/self/status (reset at exec, unlike
    ru_maxrss, which can carry the spawning parent's figure); ru_maxrss where /proc is missing."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_child(args: list[str], timeout: float = 600) -> dict:
    """Run ``python args...`` in a fresh process (so that its peak memory is its own); its last stdout
    line is JSON and is returned."""
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- real data --------------------------------------------------------------------------------------

# Read in place, never copied into the repository: ../shared/data/multi30k beside the checkout, or the folder
# named by $MULTI30K_DIR (e.g. a copy made with `transformer download-multi30k DIR`).
MULTI30K = os.environ.get("MULTI30K_DIR") or os.path.join(os.path.dirname(REPO_ROOT), "shared", "data", "multi30k")


def read_lines(split: str, lang: str) -> list[str]:
    if not os.path.isdir(MULTI30K):
        raise SystemExit(f"Multi30k not found in {MULTI30K}: set MULTI30K_DIR to a folder with "
                         "train/val/test_2017_flickr .en/.de files")
    with open(f"{MULTI30K}/{split}.{lang}", encoding="utf-8") as f:
        return f.read().splitlines()


def multi30k_tokenizer(work_dir: str, vocab_size: int = 8000):
    """A joint SentencePiece BPE tokenizer (transformer.data.Tokenizer) trained on the first 10k en-de
    training pairs, cached in ``work_dir`` (outside the repository) so that every script shares it."""
    from transformer.data.tokenizer import Tokenizer

    tok_dir = os.path.join(work_dir, f"tokenizer_{vocab_size}")
    if os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        return Tokenizer.load(tok_dir)
    en, de = read_lines("train", "en")[:10000], read_lines("train", "de")[:10000]
    return Tokenizer.train(en, de, vocab_size=vocab_size, joint=True, out_dir=tok_dir)


def add_common_args(parser) -> None:
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default cpu)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own, = cores)")
    parser.add_argument(
        "--bf16", action="store_true",
        help="cuda only: bf16 (training: autocast, MFU against the bf16 GEMM peak; inference: models cast to bf16)"
    )


def autocast(device: torch.device, bf16: bool, cache: bool = True):
    """bf16 autocast on CUDA when asked; otherwise a no-op context. ``cache=False``: no cache of the weights'
    casts (what recording a CUDA graph needs)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda",
                          cache_enabled=cache)
