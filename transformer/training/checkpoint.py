"""Checkpoints: atomic writes, weights in safetensors, the rest of the training state in ``state.pt``.

A checkpoint is a directory::

    checkpoints/step_00001000/
        model.safetensors   the model's weights (tied tensors stored once, re-tied on load)
        state.pt            everything else, loadable with ``torch.load(weights_only=True)``:
                            step, epoch, optimiser, scaler, RNG states, data position, config dict,
                            vocabulary sizes, metric history

Every file is written to a temporary name in the same directory, fsynced and renamed with
``os.replace``; a checkpoint directory is written as a temporary directory and then renamed, so a
crash mid-write leaves the previous checkpoint intact and never a half-written one under a real name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from transformer.config import Config, config_from_dict, to_dict
from transformer.errors import TransformerError

PathLike = Union[str, os.PathLike]

WEIGHTS = "model.safetensors"
STATE = "state.pt"
CHECKPOINTS = "checkpoints"
BEST = "best"
AVERAGED = "averaged"
_STEP_PREFIX = "step_"


# --- atomic writes ----------------------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not supported on this platform (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: PathLike, write: Callable[[Path], None]) -> None:
    """Write ``path`` atomically: ``write(tmp_path)`` fills a temporary file in the same directory,
    which is fsynced and renamed over ``path``. If ``write`` raises, ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def _replace_dir(tmp_dir: Path, final: Path) -> None:
    """Rename a finished temporary directory to ``final``, replacing an existing one."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.old")
        os.replace(final, old)
    os.replace(tmp_dir, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each shared storage once (tied weights keep their first name), contiguous, on CPU."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().to("cpu").contiguous()
    return out


def _write_dir_atomically(
    final: Path, files: dict[str, Callable[[Path], None]], before_rename: Optional[Callable[[], None]] = None
) -> Path:
    """Write ``files`` (name -> writer) into a temporary sibling directory, then rename it to ``final``."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        for name, write in files.items():
            atomic_write(tmp_dir / name, write)
        if before_rename is not None:
            before_rename()
        _replace_dir(tmp_dir, final)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return final


def save_checkpoint(directory: PathLike, model: nn.Module, state: dict[str, Any]) -> Path:
    """Write ``directory`` (e.g. ``RUN_DIR/checkpoints/step_00001000``) atomically.

    ``model`` must be the unwrapped module (not DDP nor ``torch.compile``); ``state`` holds only
    tensors, dicts, lists, numbers, strings and None.

    Returns:
        the checkpoint directory.
    """
    weights = _unique_state_dict(model)
    return _write_dir_atomically(Path(directory), {
        WEIGHTS: lambda p: save_file(weights, str(p), metadata={"format": "pt"}),
        STATE: lambda p: torch.save(state, p),
    }, before_rename=_test_hook_kill_during_save)


_saves_in_this_process = 0


def _test_hook_kill_during_save() -> None:
    """A test hook: with ``TRANSFORMER_TEST_KILL_DURING_SAVE=N`` in the environment, the N-th checkpoint
    write of this process SIGKILLs the process after the temporary files are written, before the rename
    (tests/test_reliability.py checks that this loses nothing). Unset, it does nothing."""
    global _saves_in_this_process
    _saves_in_this_process += 1
    target = os.environ.get("TRANSFORMER_TEST_KILL_DURING_SAVE")
    if target and target.strip() == str(_saves_in_this_process):
        import signal

        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


def copy_checkpoint(src: PathLike, dst: PathLike) -> Path:
    """Copy a checkpoint directory to ``dst`` atomically (used for ``checkpoints/best``)."""
    src = Path(src)
    return _write_dir_atomically(
        Path(dst), {name: (lambda p, name=name: shutil.copyfile(src / name, p)) for name in (WEIGHTS, STATE)}
    )


def step_dir_name(step: int) -> str:
    """``step_00001000`` for step 1000."""
    return f"{_STEP_PREFIX}{step:08d}"


def list_checkpoints(run_dir: PathLike) -> list[Path]:
    """The ``step_*`` checkpoints of a run, oldest first (complete ones only: both files present)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(_STEP_PREFIX) and p.name[len(_STEP_PREFIX):].isdigit():
            if (p / WEIGHTS).is_file() and (p / STATE).is_file():
                found.append((int(p.name[len(_STEP_PREFIX):]), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: PathLike) -> Optional[Path]:
    """The newest ``step_*`` checkpoint of a run, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def prune_checkpoints(run_dir: PathLike, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` step checkpoints (``best`` and ``averaged`` are kept)."""
    for p in list_checkpoints(run_dir)[: max(len(list_checkpoints(run_dir)) - keep_last, 0)]:
        shutil.rmtree(p, ignore_errors=True)


# --- reading ----------------------------------------------------------------------------------------


def _check_file(path: Path) -> Path:
    if not path.is_file():
        raise TransformerError(
            f"checkpoint file {path} is missing; the checkpoint directory {path.parent} is incomplete "
            "(pick another checkpoint, e.g. an earlier checkpoints/step_*)"
        )
    return path


def load_state(checkpoint_dir: PathLike, map_location: Union[str, torch.device] = "cpu") -> dict[str, Any]:
    """Read ``state.pt`` of a checkpoint with ``torch.load(weights_only=True)``.

    Raises:
        TransformerError: the file is missing, truncated or corrupt (naming it).
    """
    path = _check_file(Path(checkpoint_dir) / STATE)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, zipfile errors...
        if "Weights only load failed" in str(exc) and "unsupported" in str(exc).lower():
            raise TransformerError(
                f"checkpoint file {path} holds Python objects other than tensors, numbers and strings "
                "(a pickle that could run code); it was refused. Only load checkpoints written by this "
                "package, from a source you trust"
            ) from None
        raise TransformerError(
            f"checkpoint file {path} is truncated or corrupt ({type(exc).__name__}: {str(exc)[:200]}); "
            "use an earlier checkpoint or retrain"
        ) from None
    if not isinstance(state, dict):
        raise TransformerError(f"checkpoint file {path} does not hold a training state dict")
    return state


def read_weights(checkpoint_dir: PathLike) -> dict[str, torch.Tensor]:
    """Read ``model.safetensors`` of a checkpoint into a dict of CPU tensors.

    Raises:
        TransformerError: the file is missing, truncated or corrupt (naming it).
    """
    path = _check_file(Path(checkpoint_dir) / WEIGHTS)
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise TransformerError(
            f"checkpoint file {path} is truncated or corrupt ({str(exc)[:200]}); use an earlier checkpoint or retrain"
        ) from None


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor], where: PathLike = "checkpoint") -> None:
    """Copy ``weights`` into ``model``, re-tying shared tensors; every shape is checked first.

    Raises:
        TransformerError: a tensor's shape differs from the model's (naming the tensor), a tensor is
            missing, or the file holds a tensor the model does not have.
    """
    expected = model.state_dict()
    for name, tensor in weights.items():
        if name not in expected:
            raise TransformerError(
                f"{where}: tensor {name!r} is not part of the model built from the checkpoint's config; "
                "the checkpoint and its config do not belong together"
            )
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise TransformerError(
                f"{where}: tensor {name!r} has shape {tuple(tensor.shape)} but the config gives "
                f"{tuple(expected[name].shape)}; the checkpoint and its config do not belong together"
            )
    # A name left out must be an alias of a stored tensor (tied weights are saved once).
    by_storage = {(t.untyped_storage().data_ptr(), t.storage_offset()) for n, t in expected.items() if n in weights}
    for name, tensor in expected.items():
        if name not in weights and (tensor.untyped_storage().data_ptr(), tensor.storage_offset()) not in by_storage:
            raise TransformerError(f"{where}: tensor {name!r} is missing from the checkpoint")
    model.load_state_dict(weights, strict=False)


def resolve_checkpoint(path: PathLike) -> Path:
    """A checkpoint directory from a run directory (``checkpoints/best`` if present, else the latest
    ``step_*``) or from a checkpoint directory itself.

    Raises:
        TransformerError: the path does not exist or holds no checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise TransformerError(f"checkpoint path {path} does not exist; give a run directory or a checkpoint directory")
    if path.is_file() and path.name in (WEIGHTS, STATE):
        path = path.parent
    if (path / WEIGHTS).exists() or (path / STATE).exists():
        return path
    best = path / CHECKPOINTS / BEST
    if (best / WEIGHTS).is_file():
        return best
    latest = latest_checkpoint(path)
    if latest is None:
        raise TransformerError(
            f"{path} holds no checkpoint (expected {path}/{CHECKPOINTS}/step_*/ or {path}/{WEIGHTS}); "
            "train first or give a checkpoint directory"
        )
    return latest


def _run_dir_of(checkpoint_dir: Path) -> Path:
    """RUN_DIR for RUN_DIR/checkpoints/NAME."""
    return checkpoint_dir.parent.parent if checkpoint_dir.parent.name == CHECKPOINTS else checkpoint_dir.parent


def load_model(path: PathLike, device: Union[str, torch.device] = "cpu", require_tokenizer: bool = True):
    """Load a trained model for inference.

    Args:
        path: a run directory (uses ``checkpoints/best`` if present, else the latest ``step_*``) or a
            checkpoint directory.
        device: where to put the model.
        require_tokenizer: raise if ``RUN_DIR/tokenizer`` is missing (else the tokenizer is None).
    Returns:
        (model in eval mode, its :class:`Config`, its Tokenizer or None).
    Raises:
        TransformerError: a missing path, a truncated/corrupt file (named), a tensor whose shape does not
            match the config (named), a missing tokenizer.
    """
    ckpt = resolve_checkpoint(path)
    state = load_state(ckpt)
    try:
        cfg = config_from_dict(state["config"])
        src_vocab, tgt_vocab = int(state["src_vocab_size"]), int(state["tgt_vocab_size"])
    except KeyError as exc:
        raise TransformerError(f"checkpoint file {ckpt / STATE} lacks the field {exc}; it was not written by this package")
    from transformer.model import build_model  # local: keeps training importable without the model's deps

    model = build_model(cfg.model, src_vocab, tgt_vocab, state.get("shared_vocab"))
    load_weights(model, read_weights(ckpt), ckpt / WEIGHTS)
    model.to(device).eval()
    tokenizer = None
    tok_dir = _run_dir_of(ckpt) / "tokenizer"
    if tok_dir.is_dir():
        from transformer.data.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(tok_dir)
        if (tokenizer.src_vocab_size, tokenizer.tgt_vocab_size) != (src_vocab, tgt_vocab):
            raise TransformerError(
                f"tokenizer {tok_dir} has vocabulary sizes {tokenizer.src_vocab_size}/{tokenizer.tgt_vocab_size} "
                f"(source/target) but checkpoint {ckpt} was trained with {src_vocab}/{tgt_vocab}; "
                "the tokenizer does not belong to this model: use the run directory's own tokenizer folder"
            )
    elif require_tokenizer:
        raise TransformerError(
            f"tokenizer directory {tok_dir} is missing; a run directory written by `transformer train` has one"
        )
    return model, cfg, tokenizer


# --- averaging --------------------------------------------------------------------------------------


def average_checkpoints(
    run_dir_or_paths: Union[PathLike, Sequence[PathLike]], last_n: int, out_dir: Optional[PathLike] = None
) -> Path:
    """Average the weights of the last ``last_n`` checkpoints, as the paper did (section 6.1: the last 5
    checkpoints, written every 10 minutes, for the base model).

    Args:
        run_dir_or_paths: a run directory (its ``checkpoints/step_*`` are used, newest ``last_n``) or an
            explicit list of checkpoint directories (the last ``last_n`` of the list are used).
        last_n: how many checkpoints to average.
        out_dir: where to write; default ``RUN_DIR/checkpoints/averaged``.
    Returns:
        the written checkpoint directory; its ``state.pt`` holds the config, vocabulary sizes, the step
        of the newest input and ``averaged_from`` (the input directories), not an optimiser.
    Raises:
        TransformerError: fewer than ``last_n`` checkpoints, or checkpoints with different tensors.
    """
    if last_n <= 0:
        raise TransformerError(f"average: last_n must be positive, got {last_n}")
    if isinstance(run_dir_or_paths, (str, os.PathLike)):
        run_dir = Path(run_dir_or_paths)
        if not run_dir.exists():
            raise TransformerError(f"run directory {run_dir} does not exist")
        paths = list_checkpoints(run_dir)
        default_out = run_dir / CHECKPOINTS / AVERAGED
    else:
        paths = [Path(p) for p in run_dir_or_paths]
        default_out = _run_dir_of(paths[-1]) / CHECKPOINTS / AVERAGED if paths else None
    if len(paths) < last_n:
        raise TransformerError(
            f"average: asked for the last {last_n} checkpoints but found {len(paths)}; lower last_n "
            "or keep more checkpoints (train.keep_last)"
        )
    paths = paths[-last_n:]
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for i, p in enumerate(paths):
        weights = read_weights(p)
        if i == 0:
            dtypes = {n: t.dtype for n, t in weights.items()}
            total = {n: t.double() if t.is_floating_point() else t for n, t in weights.items()}
            continue
        if set(weights) != set(total):
            raise TransformerError(f"average: {p / WEIGHTS} holds different tensors than {paths[0] / WEIGHTS}")
        for name, t in weights.items():
            if t.shape != total[name].shape:
                raise TransformerError(f"average: tensor {name!r} of {p / WEIGHTS} has a different shape")
            if t.is_floating_point():
                total[name] += t.double()  # accumulate in float64
    averaged = {n: (t / len(paths)).to(dtypes[n]) if t.is_floating_point() else t for n, t in total.items()}
    last_state = load_state(paths[-1])
    state = {
        "config": last_state.get("config"),
        "src_vocab_size": last_state.get("src_vocab_size"),
        "tgt_vocab_size": last_state.get("tgt_vocab_size"),
        "shared_vocab": last_state.get("shared_vocab"),
        "step": last_state.get("step"),
        "averaged_from": [str(p) for p in paths],
    }
    out = Path(out_dir) if out_dir is not None else default_out
    return _write_dir_atomically(out, {
        WEIGHTS: lambda f: save_file(averaged, str(f), metadata={"format": "pt"}),
        STATE: lambda f: torch.save(state, f),
    })


def config_dict(cfg: Config) -> dict:
    """The config as a plain dict for ``state.pt``."""
    return to_dict(cfg)


__all__ = [
    "atomic_write", "save_checkpoint", "copy_checkpoint", "step_dir_name", "list_checkpoints",
    "latest_checkpoint", "prune_checkpoints", "load_state", "read_weights", "load_weights",
    "resolve_checkpoint", "load_model", "average_checkpoints", "config_dict",
]


# --- RNG state ----------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """The RNG states of python, numpy, torch (and CUDA), as tensors/lists/numbers for ``weights_only``."""
    import random

    import numpy as np

    py = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype("int64")),
            "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    import random

    import numpy as np

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [s.cpu() for s in state["cuda"]]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


__all__ += ["rng_state", "set_rng_state"]
