"""numba, where it is installed, imported on first use: the compiled loops of the fast layer (a hidden
Markov chain's recursions) run on the CPU through it; elsewhere (a GPU, no numba) the torch code beside
them runs. Importing numba and loading a kernel from its cache take most of a second, once per
process: nothing here happens before a compiled loop is first called."""

from __future__ import annotations

import functools
from typing import Callable

import torch

__all__ = ["available", "compile"]


@functools.lru_cache(maxsize=None)
def _numba():
    try:
        import numba
    except ImportError:  # numba is a dependency; this keeps a stripped install working (the torch code runs)
        return None
    return numba


def available(t: torch.Tensor) -> bool:
    """Whether compiled loops can run on tensors like ``t`` (numba installed, on the CPU)."""
    return t.device.type == "cpu" and _numba() is not None


def compile(fn: Callable) -> Callable:
    """``fn`` compiled by numba's njit (no GIL, numpy's error model: 0 / 0 is NaN) at its first call, and
    cached on disk where numba finds a writable place for its cache (beside the source file, or its
    user-wide directory); compiled afresh in every process where it finds none."""
    compiled = None

    @functools.wraps(fn)
    def call(*args):
        nonlocal compiled
        if compiled is None:
            numba = _numba()
            try:
                compiled = numba.njit(cache=True, nogil=True, error_model="numpy")(fn)
            except RuntimeError:  # "cannot cache function ...: no locator available" (a read-only installation)
                compiled = numba.njit(nogil=True, error_model="numpy")(fn)
        return compiled(*args)

    return call
