"""What tests of the compiled extension's kernels share (model and training): whether a compiler is here, a
kernel built and looked up anew for a test, and a fixture's two forms (the kernel's fallback, the kernel)."""

import contextlib
import shutil
from typing import Iterator

import pytest

from transformer.model import native

HAVE_COMPILER = shutil.which("g++") is not None or shutil.which("c++") is not None


def built_kernel(kernel: native.Kernel, monkeypatch: pytest.MonkeyPatch):
    """The extension behind ``kernel``, built if needed and looked up anew for the test (the cached lookup comes
    back afterwards); skips without a compiler, or where the extension is off or cannot run here."""
    if not HAVE_COMPILER:
        pytest.skip("no C++ compiler to build the extension with")
    native.build()  # cached after the first build
    monkeypatch.setattr(kernel, "module", native.Kernel.UNSET)
    module = kernel.get()
    if module is None:
        pytest.skip("the extension is off (TRANSFORMER_NATIVE=0) or this CPU lacks AVX2/FMA")
    return module


def each_form(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, kernel: native.Kernel,
              fallback: str) -> Iterator[str]:
    """The body of a fixture parametrized over two forms: ``fallback`` runs the test with ``kernel`` turned off,
    the other form with it built (see :func:`built_kernel`). Yields the form's name."""
    if request.param == fallback:
        with kernel.off():
            yield fallback
        return
    built_kernel(kernel, monkeypatch)
    yield request.param


def cpu_levels(module) -> list[int]:
    """The instruction levels of the extension's kernels that this CPU runs (2 AVX2, 3 AVX-512, 4 AVX-512 VNNI;
    see ``set_cpu_level`` in csrc/decoder_step.cpp), lowest first; empty without AVX2."""
    top = module.cpu_level()
    return list(range(2, top + 1)) if top >= 2 else []


@contextlib.contextmanager
def at_cpu_level(module, level: int) -> Iterator[None]:
    """Within the block the extension's kernels use instructions up to ``level``; the highest afterwards."""
    try:
        assert module.set_cpu_level(level) == level
        yield
    finally:
        module.set_cpu_level(4)
