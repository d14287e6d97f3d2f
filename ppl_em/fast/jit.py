"""numba, where it is installed: the compiled loops of the fast layer (a chain's recursions, the Gaussian's
packed features) run on the CPU through it; elsewhere (a GPU, no numba) the torch code beside them runs."""

from __future__ import annotations

import torch

try:  # an optional speed-up: without numba the torch code runs instead
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; this keeps a stripped install working
    numba = None

__all__ = ["available", "compile"]


def available(t: torch.Tensor) -> bool:
    """Whether compiled loops can run on tensors like ``t`` (numba installed, on the CPU)."""
    return numba is not None and t.device.type == "cpu"


def compile(fn):
    """numba's njit (no GIL, numpy's error model: 0 / 0 is NaN), cached on disk where numba finds a
    writable place for its cache (beside the source file, or its user-wide directory), compiled afresh
    in every process where it finds none."""
    if numba is None:
        return fn
    try:
        return numba.njit(cache=True, nogil=True, error_model="numpy")(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available" (a read-only installation)
        return numba.njit(nogil=True, error_model="numpy")(fn)
