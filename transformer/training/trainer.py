"""The training loop: ``train(cfg)`` for translation (``model.arch="transformer"``) and language models (``"lm"``).

One optimiser update ("step") consumes ``update_freq`` batches on each of ``world_size`` processes. The
loss of all of them is summed and divided by their total number of target tokens, so the gradient of an
update equals that of one big batch whatever the accumulation or the number of processes.

    from transformer.config import load_config
    from transformer.training import train
    result = train(load_config("configs/bible_en_de.yaml"))          # a fresh run in cfg.run_dir
    result = train(cfg, resume=True)                                  # continue from its latest checkpoint

Multi-process and multi-node launches (torchrun) are described in :mod:`transformer.training.distributed`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn

from transformer.config import Config, save_config
from transformer.errors import TransformerError
from transformer.training import checkpoint as ckpt
from transformer.training import distributed as dist_utils
from transformer.training.loss import label_smoothed_nll_loss
from transformer.training.metrics import MetricsLogger, perplexity, plot_curves
from transformer.training.optim import build_optimizer, lr_at, set_lr

log = logging.getLogger("transformer.training")


@dataclass
class TrainResult:
    """What a call to :func:`train` did.

    ``losses``: the per-token training loss of every update made in this call (global, all processes).
    ``stop_reason``: "max_steps", "max_epochs", "time_limit", "early_stopping" or "interrupted".
    """

    run_dir: Path
    step: int
    epoch: int
    stop_reason: str
    losses: list[float] = field(default_factory=list)
    valid: list[dict[str, Any]] = field(default_factory=list)
    last_checkpoint: Optional[Path] = None
    best_checkpoint: Optional[Path] = None
    best_value: Optional[float] = None
    skipped_steps: int = 0
    elapsed_s: float = 0.0

    @property
    def interrupted(self) -> bool:
        return self.stop_reason == "interrupted"


# --- small pieces (public so tests can check them in isolation) ---------------------------------------


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast_context(precision: str, device: torch.device):
    """``torch.autocast`` for bf16/fp16, a no-op for fp32.

    Raises:
        TransformerError: fp16 on a CPU (``train.precision``).
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise TransformerError("config field train.precision: fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def batch_loss(module: nn.Module, batch: Any, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_sum, nll_sum) of one batch: ``module(src, tgt_in)`` for translation, ``module(tgt_in)`` for an LM."""
    if batch.src_tokens is None:
        logits = module(batch.tgt_input)
    else:
        logits = module(batch.src_tokens, batch.tgt_input)
    # Nothing reads the logits after the loss, so it may reuse their storage (exponentials, then the gradient).
    return label_smoothed_nll_loss(logits, batch.tgt_output, epsilon, overwrite_logits=torch.is_grad_enabled())


def accumulate_gradients(
    module: nn.Module,
    batches: Sequence[Any],
    epsilon: float,
    total_tokens: float,
    world_size: int = 1,
    precision_ctx: Any = None,
    scaler: Optional[torch.amp.GradScaler] = None,
) -> tuple[float, float]:
    """Backward over ``batches`` with the loss normalised by ``total_tokens`` (all batches, all processes).

    Under DDP (``module`` is a DistributedDataParallel) gradients are only synchronised after the last
    batch, and the loss is multiplied by ``world_size`` because DDP averages gradients across processes.

    Returns:
        (loss_sum, nll_sum) of these batches on this process (not normalised).
    """
    is_ddp = isinstance(module, nn.parallel.DistributedDataParallel)
    scale = world_size / max(total_tokens, 1.0)
    sums = []  # (loss_sum, nll_sum) per batch, read back once at the end: one device sync per update
    for i, batch in enumerate(batches):
        sync = i == len(batches) - 1
        with (module.no_sync() if is_ddp and not sync else contextlib.nullcontext()):
            with (precision_ctx if precision_ctx is not None else contextlib.nullcontext()):
                loss_sum, nll_sum = batch_loss(module, batch, epsilon)
            loss = loss_sum * scale
            (scaler.scale(loss) if scaler is not None else loss).backward()
        sums.append(torch.stack([loss_sum.detach().float(), nll_sum.detach().float()]))
    loss_total, nll_total = torch.stack(sums).double().sum(0).tolist()
    return loss_total, nll_total


@torch.no_grad()
def evaluate_loss(
    module: nn.Module, dataset: Any, max_tokens: int, epsilon: float, device: torch.device,
    info: dist_utils.DistInfo = dist_utils.DistInfo(), precision_ctx: Any = None,
) -> dict[str, float]:
    """Validation loss and perplexity over a whole dataset (batches split across processes, sums reduced).

    Returns:
        {"loss", "nll", "ppl", "tokens"}; loss and nll per target token.
    """
    from transformer.data.batching import sampler_for

    was_training = module.training
    module.eval()
    sampler = sampler_for(dataset, max_tokens, shuffle=False)
    loss = nll = tokens = 0.0
    for i, indices in enumerate(sampler):
        if i % info.world_size != info.rank:
            continue
        batch = dataset.collate_indices(indices).to(device)
        with (precision_ctx if precision_ctx is not None else contextlib.nullcontext()):
            loss_sum, nll_sum = batch_loss(module, batch, epsilon)
        loss += float(loss_sum)
        nll += float(nll_sum)
        tokens += batch.n_tgt_tokens
    loss, nll, tokens = dist_utils.all_reduce_sum([loss, nll, tokens], device)
    module.train(was_training)
    tokens = max(tokens, 1.0)
    return {"loss": loss / tokens, "nll": nll / tokens, "ppl": perplexity(nll / tokens), "tokens": tokens}


def validate_bleu(model: nn.Module, valid_text: Any, tokenizer: Any, cfg: Config) -> Optional[dict[str, Any]]:
    """BLEU of greedy translations of the first ``cfg.train.bleu_subset`` validation sentences.

    ``valid_text`` is a list of (source, reference) string pairs or a pair of lists (sources, references).
    Decoding is imported lazily from :mod:`transformer.decoding`; scoring uses sacreBLEU on detokenised text.

    Returns:
        {"bleu": score, "signature": sacreBLEU's signature}, or None when there is nothing to score
        (a language model, no text, ``bleu_subset == 0``, or decoding unavailable).
    """
    if cfg.model.arch != "transformer" or not valid_text or cfg.train.bleu_subset <= 0 or tokenizer is None:
        return None
    try:
        from transformer.decoding.greedy import greedy_search
    except ImportError:
        return None
    import sacrebleu

    from transformer.data.batching import collate

    if isinstance(valid_text, tuple) and len(valid_text) == 2 and isinstance(valid_text[0], (list, tuple)):
        pairs = list(zip(*valid_text))
    else:
        pairs = list(valid_text)
    pairs = pairs[: cfg.train.bleu_subset]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    hyps: list[str] = []
    chunk = 64
    for start in range(0, len(pairs), chunk):
        part = pairs[start: start + chunk]
        src = collate([(tokenizer.encode_src(s), [0]) for s, _ in part]).src_tokens.to(device)
        out = greedy_search(model, src, cfg.decode.max_len_a, cfg.decode.max_len_b)
        hyps.extend(tokenizer.decode_tgt(h.tokens) for h in out)
    model.train(was_training)
    bleu = sacrebleu.metrics.BLEU()
    score = bleu.corpus_score(hyps, [[ref for _, ref in pairs]])
    return {"bleu": float(score.score), "signature": str(bleu.get_signature())}


def _batch_stream(dataset: Any, sampler: Any) -> Iterator[Any]:
    """Batches forever, epoch after epoch; the sampler's state is always the position after the last yield."""
    while True:
        for indices in sampler:
            yield dataset.collate_indices(indices)
        sampler.set_epoch(sampler.epoch + 1)


def _vocab_sizes(data: Any) -> tuple[int, int, Optional[bool]]:
    tok = getattr(data, "tokenizer", None)
    src = getattr(data, "src_vocab_size", None) or (tok.src_vocab_size if tok is not None else None)
    tgt = getattr(data, "tgt_vocab_size", None) or (tok.tgt_vocab_size if tok is not None else src)
    shared = getattr(tok, "joint", None) if tok is not None else getattr(data, "shared_vocab", None)
    if src is None:
        raise TransformerError("training data has no tokenizer and no vocabulary size")
    return int(src), int(tgt), shared


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) until the block ends, then deliver it: the block runs whole or not at all."""
    held: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    except ValueError:  # not the main thread: signals cannot be handled here anyway
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held:
            if callable(previous):
                previous(signal.SIGINT, None)
            elif previous == signal.SIG_DFL:
                raise KeyboardInterrupt


def _check_writable(run_dir: Path) -> None:
    """Create ``run_dir`` and write a probe file in it, so a bad run directory fails before any work."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write_test."):
            pass
    except OSError as exc:
        raise TransformerError(
            f"run_dir {run_dir} is not a writable directory ({exc.strerror or exc}); choose another run_dir "
            "(--run-dir) or fix its permissions"
        ) from None


def _check_free_space(run_dir: Path, model: nn.Module) -> None:
    """Fail before training when the disk cannot hold two checkpoints (weights + Adam's two moments)."""
    need = 2 * 3 * sum(p.numel() * p.element_size() for p in model.parameters())
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise TransformerError(
            f"run_dir {run_dir}: only {free / 2**20:.1f} MiB free on its disk, but a checkpoint of this model "
            f"needs about {need / 2**21:.1f} MiB (and two may coexist while one is written); free some space "
            "or choose another run_dir"
        )


# --- the loop -----------------------------------------------------------------------------------------


class _Trainer:
    """State of one training run; :func:`train` is its public face."""

    def __init__(self, cfg: Config, resume: bool, data: Any, callback: Optional[Callable[[dict], None]]):
        self.cfg, self.t = cfg, cfg.train
        self.run_dir = Path(cfg.run_dir)
        self.callback = callback
        self.info, self.device = dist_utils.setup(self.t.device)
        if self.t.keep_freed_memory and self.device.type == "cpu":
            from transformer.host_memory import keep_freed_memory

            keep_freed_memory()  # for the whole process: the step's large tensors are reused, not mapped afresh
        self.owns_process_group = self.info.enabled
        if self.info.is_main:
            _check_writable(self.run_dir)
        resume_from = self._check_run_dir(resume)
        seed_everything(self.t.seed)
        self.data = data if data is not None else self._prepare_data()
        self.src_vocab, self.tgt_vocab, self.shared_vocab = _vocab_sizes(self.data)

        from transformer.data.batching import sampler_for
        from transformer.model import build_model

        seed_everything(self.t.seed)  # again: the data stage may have used the RNGs (or not, when cached)
        self.model = build_model(cfg.model, self.src_vocab, self.tgt_vocab, self.shared_vocab).to(self.device)
        self.optimizer = build_optimizer(self.model, self.t)
        if self.info.is_main:
            _check_free_space(self.run_dir, self.model)
        self.precision_ctx = autocast_context(self.t.precision, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.t.precision == "fp16" else None
        self.sampler = sampler_for(
            self.data.train, cfg.data.max_tokens, shuffle=True, seed=self.t.seed,
            rank=self.info.rank, world_size=self.info.world_size,
        )
        self.step, self.bad_steps, self.skipped = 0, 0, 0
        self.best_value: Optional[float] = None
        self.best_step: Optional[int] = None
        self.bad_validations = 0
        self.elapsed_before = 0.0
        self.last_saved: Optional[Path] = None
        self.pbar = None
        self._warned_no_bleu = False
        self.t0 = time.monotonic()
        # Dropout masks differ across processes; the weights start equal (seeded above, and DDP broadcasts).
        torch.manual_seed(self.t.seed + self.info.rank)
        if resume_from is not None:
            self._restore(resume_from)
        # The data position after the last finished update: what a checkpoint stores, so that a Ctrl-C in the
        # middle of an update resumes at the start of that update.
        self.sampler_state = self.sampler.state_dict()
        # Likewise the RNG states: a Ctrl-C in the middle of an update (dropout draws) still resumes exactly.
        self.rng_state = ckpt.rng_state()
        module: nn.Module = self.model
        if self.info.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            module = nn.parallel.DistributedDataParallel(module, device_ids=ids)
        if self.t.compile:
            # Token buckets change the batch shape every step: compile for symbolic shapes at once, or
            # every new shape recompiles (seen: 20-25 s a step for the first steps on an H100).
            module = torch.compile(module, dynamic=True)
        self.module = module  # what runs forward; self.model is what gets saved
        self.logger = MetricsLogger(self.run_dir, enabled=self.info.is_main)
        if self.info.is_main:
            save_config(cfg, self.run_dir / "config.yaml")

    # -- setup helpers --

    def _check_run_dir(self, resume: bool) -> Optional[Path]:
        latest = ckpt.latest_checkpoint(self.run_dir)
        if resume and latest is None:
            raise TransformerError(
                f"cannot resume: {self.run_dir}/checkpoints holds no checkpoint (run_dir={self.run_dir}); "
                "train without --resume, or point run_dir at the run to continue"
            )
        if not resume and latest is not None:
            raise TransformerError(
                f"run_dir {self.run_dir} already holds checkpoints ({latest.name}); resume it with --resume, "
                "or choose a new run_dir"
            )
        return latest if resume else None

    def _prepare_data(self) -> Any:
        from transformer.data import prepare_data

        # Rank 0 first (it may train the tokenizer and write the cache); the others then read the cache.
        if self.info.is_main:
            data = prepare_data(self.cfg, self.run_dir)
        dist_utils.barrier()
        if not self.info.is_main:
            data = prepare_data(self.cfg, self.run_dir)
        return data

    def _state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": int(self.sampler_state["epoch"]),
            "sampler": dict(self.sampler_state),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": self.rng_state,
            "config": ckpt.config_dict(self.cfg),
            "src_vocab_size": self.src_vocab,
            "tgt_vocab_size": self.tgt_vocab,
            "shared_vocab": self.shared_vocab,
            "best": {"value": self.best_value, "step": self.best_step, "metric": self.t.best_metric},
            "bad_validations": self.bad_validations,
            "elapsed_s": self.elapsed_before + (time.monotonic() - self.t0),
            "world_size": self.info.world_size,
        }

    def _restore(self, path: Path) -> None:
        state = ckpt.load_state(path)
        ckpt.load_weights(self.model, ckpt.read_weights(path), path / ckpt.WEIGHTS)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            self.sampler.load_state_dict(state["sampler"])
            self.step = int(state["step"])
            best = state.get("best") or {}
            self.best_value, self.best_step = best.get("value"), best.get("step")
            self.bad_validations = int(state.get("bad_validations", 0))
            self.elapsed_before = float(state.get("elapsed_s", 0.0))
            ckpt.set_rng_state(state["rng"])
        except (KeyError, ValueError, RuntimeError) as exc:
            raise TransformerError(
                f"checkpoint file {path / ckpt.STATE} cannot be resumed ({type(exc).__name__}: {exc}); "
                "was it written with a different optimiser or config?"
            ) from None
        if state.get("world_size", 1) != self.info.world_size:
            log.warning("resuming a %s-process run with %s processes: the data order will differ",
                        state.get("world_size"), self.info.world_size)
        log.info("resumed from %s at step %d", path, self.step)

    # -- saving and validation --

    def save(self) -> Optional[Path]:
        """Write ``checkpoints/step_N`` (rank 0), prune old ones; all processes wait for it."""
        path = self.run_dir / ckpt.CHECKPOINTS / ckpt.step_dir_name(self.step)
        if self.info.is_main and self.last_saved != path:
            try:
                ckpt.save_checkpoint(path, self.model, self._state())
            except OSError as exc:  # a full disk, a run directory made read-only under us...
                last = ckpt.latest_checkpoint(self.run_dir)
                raise TransformerError(
                    f"could not write checkpoint {path} ({exc.strerror or exc}); the last good checkpoint, "
                    f"{last if last is not None else 'none'}, is untouched. Free some space or fix the "
                    "permissions, then continue with --resume"
                ) from None
            ckpt.prune_checkpoints(self.run_dir, self.t.keep_last)
        self.last_saved = path
        dist_utils.barrier()
        return path

    def validate(self) -> dict[str, Any]:
        """Loss/ppl (and BLEU), log them, keep ``checkpoints/best``, count validations without improvement."""
        if getattr(self.data, "valid", None) is None:
            return {}
        result: dict[str, Any] = evaluate_loss(
            self.module, self.data.valid, self.cfg.data.max_tokens, self.t.label_smoothing, self.device,
            self.info, self.precision_ctx,
        )
        bleu = None
        if self.info.is_main:
            bleu = validate_bleu(self.model, getattr(self.data, "valid_text", None),
                                 getattr(self.data, "tokenizer", None), self.cfg)
        got_bleu, score = dist_utils.all_reduce_sum([1.0 if bleu else 0.0, bleu["bleu"] if bleu else 0.0], self.device)
        if got_bleu:
            result["bleu"] = score
            if bleu:
                result["bleu_signature"] = bleu["signature"]
        result["elapsed"] = self.elapsed()
        self.logger.log("valid", self.step, result)
        if self.t.best_metric == "bleu" and "bleu" in result:
            value, better = result["bleu"], lambda new, old: new > old
        else:
            if self.t.best_metric == "bleu" and not self._warned_no_bleu:
                log.warning("train.best_metric=bleu but no BLEU was computed (train.bleu_subset=0, a language "
                            "model, or no validation text); choosing the best checkpoint by validation loss")
                self._warned_no_bleu = True
            value, better = result["loss"], lambda new, old: new < old
        if self.best_value is None or better(value, self.best_value):
            self.best_value, self.best_step, self.bad_validations = value, self.step, 0
            saved = self.save()
            if self.info.is_main:
                ckpt.copy_checkpoint(saved, self.run_dir / ckpt.CHECKPOINTS / ckpt.BEST)
            dist_utils.barrier()
        else:
            self.bad_validations += 1
        result["step"] = self.step
        text = f"step {self.step}: valid loss {result['loss']:.4f} ppl {result['ppl']:.2f}"
        if "bleu" in result:
            text += f" BLEU {result['bleu']:.2f}"
        self.write(text)
        return result

    def elapsed(self) -> float:
        return self.elapsed_before + (time.monotonic() - self.t0)

    def write(self, text: str) -> None:
        if self.info.is_main:
            self.pbar.write(text) if self.pbar is not None else log.info(text)

    # -- the loop --

    def _to_device(self, batch: Any) -> Any:
        if self.device.type == "cuda":
            return batch.pin_memory().to(self.device, non_blocking=True)
        return batch.to(self.device)

    def run(self) -> TrainResult:
        from tqdm.auto import tqdm

        self.t0 = time.monotonic()
        start = time.monotonic()
        t = self.t
        losses: list[float] = []
        valid: list[dict] = []
        stop_reason = "max_steps"
        stream = _batch_stream(self.data.train, self.sampler)
        self.pbar = tqdm(total=t.max_steps, initial=self.step, unit="step", dynamic_ncols=True,
                         disable=not self.info.is_main)
        window = {"loss": 0.0, "nll": 0.0, "tokens": 0.0, "t": time.monotonic()}
        self.module.train()
        try:
            while self.step < t.max_steps:
                if t.max_epochs is not None and self.sampler.state_dict()["epoch"] >= t.max_epochs:
                    stop_reason = "max_epochs"
                    break
                batches = [next(stream) for _ in range(t.update_freq)]
                # Counted on the host before the copy (no device sync); pinned memory makes the copy
                # asynchronous on a GPU, so the next batch's transfer overlaps this one's compute.
                (tokens,) = dist_utils.all_reduce_sum([sum(b.n_tgt_tokens for b in batches)], self.device)
                batches = [self._to_device(b) for b in batches]
                loss_sum, nll_sum = accumulate_gradients(
                    self.module, batches, t.label_smoothing, tokens, self.info.world_size,
                    self.precision_ctx, self.scaler,
                )
                loss_sum, nll_sum = dist_utils.all_reduce_sum([loss_sum, nll_sum], self.device)
                if not math.isfinite(loss_sum):
                    self._skip_update(loss_sum)
                    continue
                self.bad_steps = 0
                lr = lr_at(self.step + 1, t, self.cfg.model.d_model)
                # A Ctrl-C must not save weights updated but not counted, nor a step whose loss was not logged.
                with _sigint_deferred():
                    set_lr(self.optimizer, lr)
                    if self.scaler is not None:
                        self.scaler.unscale_(self.optimizer)
                    if t.clip_norm > 0:
                        torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.clip_norm)
                    if self.scaler is not None:
                        self.scaler.step(self.optimizer)
                        self.scaler.update()
                    else:
                        self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.step += 1
                    self.sampler_state = self.sampler.state_dict()
                    self.rng_state = ckpt.rng_state()
                    losses.append(loss_sum / max(tokens, 1.0))
                    window["loss"] += loss_sum
                    window["nll"] += nll_sum
                    window["tokens"] += tokens
                    if t.time_limit_minutes is not None:
                        self._retarget_progress(start, t.time_limit_minutes * 60)
                    self.pbar.update(1)
                    if self.step % t.log_every == 0 or self.step == t.max_steps:
                        self._log_train(window, lr)
                if self.callback is not None:
                    self.callback({"step": self.step, "loss": losses[-1], "lr": lr, "trainer": self})
                stop = None
                if self.step % t.valid_every == 0:
                    valid.append(self.validate())
                    if t.patience > 0 and self.bad_validations >= t.patience:
                        stop = "early_stopping"
                if self.step % t.save_every == 0:
                    self.save()
                if t.time_limit_minutes is not None and dist_utils.broadcast_flag(
                    time.monotonic() - start > t.time_limit_minutes * 60, self.device
                ):
                    stop = stop or "time_limit"
                if stop is not None:
                    stop_reason = stop
                    break
            if stop_reason != "early_stopping" and (not valid or valid[-1].get("step") != self.step):
                valid.append(self.validate())
            self.save()
        except KeyboardInterrupt:
            self.optimizer.zero_grad(set_to_none=True)
            stop_reason = "interrupted"
            self.write(f"interrupted at step {self.step}: saving a checkpoint")
            self.save()
            self.write(f"saved {self.last_saved}; continue with: transformer train --resume {self.run_dir}")
        finally:
            self.pbar.close()
        if self.info.is_main:
            self.logger.close()
            if t.average_last > 1 and len(ckpt.list_checkpoints(self.run_dir)) >= t.average_last:
                ckpt.average_checkpoints(self.run_dir, t.average_last)
            try:
                plot_curves(self.run_dir)
            except Exception as exc:  # a plotting failure must not lose a finished run
                log.warning("could not draw curves.png: %s", exc)
        best = self.run_dir / ckpt.CHECKPOINTS / ckpt.BEST
        return TrainResult(
            run_dir=self.run_dir, step=self.step, epoch=int(self.sampler.state_dict()["epoch"]),
            stop_reason=stop_reason, losses=losses, valid=[v for v in valid if v],
            last_checkpoint=self.last_saved, best_checkpoint=best if best.is_dir() else None,
            best_value=self.best_value, skipped_steps=self.skipped, elapsed_s=time.monotonic() - start,
        )

    def _skip_update(self, loss_sum: float) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.sampler_state = self.sampler.state_dict()
        self.rng_state = ckpt.rng_state()
        if self.scaler is not None:
            self.scaler.update()
        self.bad_steps += 1
        self.skipped += 1
        log.warning("step %d: the loss is %s; skipping this update (%d in a row, at most train.max_bad_steps=%d)",
                    self.step + 1, loss_sum, self.bad_steps, self.t.max_bad_steps)
        if self.bad_steps >= self.t.max_bad_steps:
            last = self.last_saved or ckpt.latest_checkpoint(self.run_dir)
            raise TransformerError(
                f"training diverged: {self.bad_steps} updates in a row had a NaN or infinite loss after step "
                f"{self.step} (train.max_bad_steps={self.t.max_bad_steps}); the last good checkpoint is "
                f"{last if last is not None else 'none (nothing was saved yet)'}. Lower train.lr / train.lr_scale, "
                "set train.clip_norm, or use train.precision=fp32"
            )

    def _retarget_progress(self, start: float, budget_s: float) -> None:
        """Under a time limit, the bar's total is the steps that fit in the budget, so its ETA is honest.
        Called just before ``pbar.update``, whose redraw shows the new total (no second redraw)."""
        done = self.pbar.n + 1 - self.pbar.initial  # counting the step that has just finished
        spent = time.monotonic() - start
        if spent > 0:
            expected = self.step + int(max(budget_s - spent, 0.0) * done / spent)
            self.pbar.total = min(self.t.max_steps, max(expected, self.step))

    def _log_train(self, window: dict, lr: float) -> None:
        now = time.monotonic()
        tokens = max(window["tokens"], 1.0)
        record = {
            "loss": window["loss"] / tokens, "nll": window["nll"] / tokens, "ppl": perplexity(window["nll"] / tokens),
            "lr": lr, "tokens_per_s": window["tokens"] / max(now - window["t"], 1e-9), "elapsed": self.elapsed(),
        }
        self.logger.log("train", self.step, record)
        self.pbar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
        window.update(loss=0.0, nll=0.0, tokens=0.0, t=now)

    def close(self) -> None:
        self.logger.close()
        if self.owns_process_group:
            dist_utils.cleanup()


def train(
    cfg: Config,
    resume: bool = False,
    *,
    data: Any = None,
    callback: Optional[Callable[[dict], None]] = None,
) -> TrainResult:
    """Train a model as ``cfg`` says, writing the run directory ``cfg.run_dir`` (see docs/ARCHITECTURE.md).

    Args:
        cfg: the resolved config; saved to ``RUN_DIR/config.yaml``.
        resume: continue exactly from the latest ``checkpoints/step_*`` (weights, optimiser, schedule,
            RNG states, data position). ``train.max_steps`` may be raised to train longer.
        data: prepared data (``tokenizer``, ``train``, ``valid``, ``valid_text``), as returned by
            ``transformer.data.prepare_data(cfg, run_dir)``; default: prepare it here. Objects with
            ``src_vocab_size`` / ``tgt_vocab_size`` and no tokenizer are accepted (tests).
        callback: called after every update with ``{"step", "loss", "lr", "trainer"}``.
    Returns:
        a :class:`TrainResult`; ``stop_reason == "interrupted"`` after Ctrl-C: a checkpoint of the last
        finished update was saved (its data position is the start of the interrupted update, so
        ``resume=True`` redoes it, with the RNG states of that moment, so it resumes exactly). Under torchrun every process must receive the Ctrl-C
        (torchrun forwards it), since saving waits for all of them.
    Raises:
        TransformerError: a bad run directory (checkpoints present without ``resume``, none with it), a
            corrupt checkpoint, fp16 without CUDA, or ``train.max_bad_steps`` NaN/inf losses in a row.
    """
    try:
        trainer = _Trainer(cfg, resume, data, callback)
    except BaseException:
        if dist_utils.env_info().enabled:
            dist_utils.cleanup()
        raise
    try:
        return trainer.run()
    finally:
        trainer.close()


__all__ = ["train", "TrainResult", "accumulate_gradients", "evaluate_loss", "validate_bleu", "batch_loss",
           "seed_everything", "autocast_context"]
