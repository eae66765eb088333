"""The compiled decoder step (``csrc/decoder_step.cpp``): built once with ``torch.utils.cpp_extension``, then reused.

A frozen model's decoder step at a few rows is mostly Python overhead between small ATen calls (about a
fifth of a step at one row on the benchmark CPU). The C++ step makes the same calls without the
interpreter, and runs greedy search's whole loop (``DecoderStep.greedy``). The same module has
``panel_linear``, a product for few rows (AVX2 and FMA) that the frozen decoder's and encoder's products use
(``frozen.PANEL_ROWS``), and kernels of training on the CPU: ``dropout_apply``, the dropout
(:mod:`transformer.model.dropout`), ``attention_forward`` / ``attention_backward``, the attention of short
sequences (:mod:`transformer.model.attention`), ``bias_relu_`` / ``relu_grad_``, the feed-forward network's
ReLU, ``add_norm_forward`` / ``add_norm_backward``, a post-norm sub-layer's bias, dropout, residual and
LayerNorm (:mod:`transformer.model.layers`), and ``exp_rows_`` / ``exp_rows_grad_``, the loss's passes over the
logits (:mod:`transformer.training.loss`). It is optional: building it needs a C++ compiler and Python's
headers and takes about a minute, so nothing builds it implicitly.
``transformer build-native`` (run by ``scripts/setup.sh``) builds it into a cache folder; from then on
:func:`~transformer.model.frozen.freeze` uses it on the CPU, and without it the Python step runs (the same
maths); training's dropout takes its masks from it, and without it from stored masks; training's attention,
feed-forward ReLU, sub-layer ends and loss run their kernels, and without it
``scaled_dot_product_attention``, ``nn.Linear`` with ``F.relu``, ``nn.LayerNorm``, and ATen's ops.

The cache folder is ``$TRANSFORMER_NATIVE_DIR``, else ``~/.cache/transformer/native``, one subfolder per
torch version, Python version and hash of the source and build flags, so a changed source or another torch
builds anew. ``TRANSFORMER_NATIVE=0`` turns all of it off (the compiled step, ``panel_linear``, and training's kernels).

Every kernel has an AVX2 + FMA form. On a CPU with AVX-512, the decoding products (``panel_linear``), training's
attention products and the passes of exponentials (the loss's, the candidates') take 16-float registers, and
with AVX-512 VNNI the int8 products (``panel_linear_w8a8``) take ``vpdpbusd``: the same operations per output in
the same order, so the same bits as the AVX2 forms (``tests/model/test_native.py`` checks both where the CPU has
them). ``TRANSFORMER_CPU_LEVEL=avx2`` (or ``avx512``) caps the forms used (comparisons).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import ContextManager, Iterator, Optional

import torch

from transformer.errors import TransformerError

SOURCE = Path(__file__).resolve().parent / "csrc" / "decoder_step.cpp"
# -fopenmp: ATen's parallel_for is OpenMP in its headers (without it, panel_linear runs on one thread); the
# library it links is the libgomp.so.1 that torch has loaded already. Tuples: cpp_extension extends the lists
# it is given, which would change the hash below
CFLAGS, LDFLAGS = ("-O3", "-fopenmp"), ("-fopenmp",)
_loaded: dict[str, Optional[ModuleType]] = {}


@functools.lru_cache(maxsize=None)
def _digest() -> str:
    """The hash of the source and flags, read once per process (``load`` runs at every search)."""
    return hashlib.sha256(SOURCE.read_bytes() + repr((CFLAGS, LDFLAGS)).encode()).hexdigest()[:12]


def _name_and_dir() -> tuple[str, Path]:
    name = f"transformer_decoder_step_{_digest()}"
    root = Path(os.environ.get("TRANSFORMER_NATIVE_DIR") or Path.home() / ".cache" / "transformer" / "native")
    tag = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}".replace("+", "_")
    return name, root / tag / name


def enabled() -> bool:
    """False when ``TRANSFORMER_NATIVE`` is set to ``0``, ``false``, ``off`` or ``no``."""
    return os.environ.get("TRANSFORMER_NATIVE", "1").strip().lower() not in ("0", "false", "off", "no")


def build(verbose: bool = False) -> ModuleType:
    """Compile the decoder step (about a minute) unless it is already built, and load it.

    Raises:
        TransformerError: the compiler or Python's headers are missing, or the build fails.
    """
    name, folder = _name_and_dir()
    if _loaded.get(name) is not None:
        return _loaded[name]
    # Built before under this name (the hash of the source and flags): import it without asking ninja, which
    # rebuilds when a reinstall has touched the source file's time.
    module = _import_built(name, folder)
    if module is not None:
        _loaded[name] = module
        return module
    from torch.utils import cpp_extension

    try:
        folder.mkdir(parents=True, exist_ok=True)
        module = cpp_extension.load(name=name, sources=[str(SOURCE)], build_directory=str(folder),
                                    extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS), verbose=verbose)
    except Exception as exc:  # the compiler's own message, shortened
        raise TransformerError(f"could not build the compiled decoder step in {folder}: "
                               f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__} "
                               "(it needs g++ and Python's headers; decoding works without it)") from exc
    _loaded[name] = module = _with_cpu_level(module)
    return module


def load() -> Optional[ModuleType]:
    """The compiled decoder step if it was built (by :func:`build`) and is enabled, else None. Never compiles."""
    if not enabled():
        return None
    name, folder = _name_and_dir()
    if name in _loaded:
        return _loaded[name]
    module = _loaded[name] = _import_built(name, folder)
    return module


@contextmanager
def _replaced(owner: object, name: str, value: object) -> Iterator[None]:
    """Within the block, ``owner.name`` is ``value``; the old value comes back after it."""
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


class Switch:
    """A path that is on unless turned off within a block (comparisons, tests), as :meth:`Kernel.off` turns
    off a kernel: truthy while on."""

    def __init__(self) -> None:
        self.on = True

    def __bool__(self) -> bool:
        return self.on

    def off(self) -> ContextManager[None]:
        """Within the block, the switch is off."""
        return _replaced(self, "on", False)


class Kernel:
    """One of the extension's kernels as a Python caller sees it: the module, looked up once per process (None
    where it is not built, is turned off, lacks ``attribute``, or with ``needs_avx2`` cannot run on this CPU),
    and :meth:`off`, the caller's fallback within a block (comparisons, tests)."""

    UNSET = object()

    def __init__(self, attribute: str, needs_avx2: bool = False) -> None:
        self.attribute, self.needs_avx2 = attribute, needs_avx2
        self.module: object = Kernel.UNSET

    def get(self) -> Optional[ModuleType]:
        if self.module is Kernel.UNSET:
            module = load()
            ok = (module is not None and hasattr(module, self.attribute)
                  and (not self.needs_avx2 or module.panels_supported()))
            self.module = module if ok else None
        return self.module  # type: ignore[return-value]

    def off(self) -> ContextManager[None]:
        """Within the block, :meth:`get` returns None."""
        return _replaced(self, "module", None)


CPU_LEVELS = {"avx2": 2, "avx512": 3, "vnni": 4}  # TRANSFORMER_CPU_LEVEL's values (set_cpu_level's caps)


def _with_cpu_level(module: ModuleType) -> ModuleType:
    """``module`` with its kernels capped at ``$TRANSFORMER_CPU_LEVEL`` where that is set (see the docstring).

    Raises:
        TransformerError: the variable holds another value.
    """
    wanted = os.environ.get("TRANSFORMER_CPU_LEVEL", "").strip().lower()
    if wanted:
        if wanted not in CPU_LEVELS:
            raise TransformerError(f"TRANSFORMER_CPU_LEVEL={wanted!r}: expected one of {', '.join(CPU_LEVELS)}")
        if hasattr(module, "set_cpu_level"):
            module.set_cpu_level(CPU_LEVELS[wanted])
    return module


def _import_built(name: str, folder: Path) -> Optional[ModuleType]:
    """The library built in ``folder``, imported, or None if there is none or it does not load."""
    library = folder / f"{name}.so"
    if not library.is_file():
        return None
    try:
        spec = importlib.util.spec_from_file_location(name, library)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except (ImportError, OSError):  # built against something no longer there: build() compiles it anew
        return None
    return _with_cpu_level(module)
