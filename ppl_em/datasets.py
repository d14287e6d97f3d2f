"""Small real data sets shipped inside the package.

The files live in ``ppl_em/data/`` and are read with :mod:`importlib.resources`,
so the loaders work from a source checkout and from an installed wheel alike.
Nothing is ever downloaded at run time. See ``ppl_em/data/README.md`` for the
source, citation and licence of each file.

Available data sets
-------------------
``old_faithful``
    Old Faithful geyser eruptions, a (272, 2) float tensor
    (eruption duration, waiting time), both in minutes.
``digits``
    UCI 8x8 handwritten digits: (1797, 64) images and (1797,) labels.

Each loader caches the parsed NumPy array and returns a fresh tensor on every
call, so callers may modify the result freely.

Examples
--------
>>> from ppl_em.datasets import load
>>> images, labels = load("digits")
>>> images.shape, labels.shape
(torch.Size([1797, 64]), torch.Size([1797]))
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any, Callable, NamedTuple

import numpy as np
import torch

__all__ = ["DATASETS", "DatasetInfo", "load", "load_digits", "load_old_faithful"]

_N_DIGIT_PIXELS = 64
_MAX_PIXEL = 16


def _read_array(filename: str, skiprows: int = 0) -> np.ndarray:
    """Parse a comma-separated file from ``ppl_em/data/`` into a read-only array.

    Parameters
    ----------
    filename : str
        Name of the file inside ``ppl_em/data/``; a ``.gz`` suffix is
        decompressed transparently by :func:`numpy.loadtxt`.
    skiprows : int, default 0
        Number of header lines to skip.

    Returns
    -------
    numpy.ndarray
        Float64 array of shape ``(n_rows, n_columns)``, marked read-only.
    """
    resource = resources.files("ppl_em") / "data" / filename
    with resources.as_file(resource) as path:
        array = np.loadtxt(path, delimiter=",", skiprows=skiprows, ndmin=2)
    array.flags.writeable = False
    return array


@functools.lru_cache(maxsize=None)
def _old_faithful_array() -> np.ndarray:
    """Cached Old Faithful array of shape (272, 2): eruptions, waiting."""
    return _read_array("old_faithful.csv", skiprows=1)


@functools.lru_cache(maxsize=None)
def _digits_array() -> np.ndarray:
    """Cached digits array of shape (1797, 65): 64 pixels then the label."""
    return _read_array("digits.csv.gz")


def load_old_faithful(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Load the Old Faithful geyser data (R ``datasets::faithful``).

    Parameters
    ----------
    dtype : torch.dtype, default torch.float64
        Floating-point dtype of the returned tensor.

    Returns
    -------
    torch.Tensor
        Tensor of shape ``(272, 2)``. Column 0 is the eruption duration and
        column 1 the waiting time to the next eruption, both in minutes.
        A new tensor is returned on every call.

    Examples
    --------
    >>> load_old_faithful().shape
    torch.Size([272, 2])
    >>> load_old_faithful()[0]
    tensor([ 3.6000, 79.0000], dtype=torch.float64)
    """
    return torch.tensor(_old_faithful_array(), dtype=dtype)


def load_digits(
    binarize: bool = True,
    threshold: int = 8,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load the UCI 8x8 handwritten digits (the scikit-learn copy).

    Parameters
    ----------
    binarize : bool, default True
        If true, map each pixel to 1 when ``pixel >= threshold`` and to 0
        otherwise. If false, return the raw counts in ``0..16``.
    threshold : int, default 8
        Binarisation threshold, in ``1..16``; ignored when ``binarize`` is
        false.
    dtype : torch.dtype, default torch.float64
        Dtype of the returned images.

    Returns
    -------
    images : torch.Tensor
        Tensor of shape ``(1797, 64)``: row-major flattened 8x8 images.
    labels : torch.Tensor
        Long tensor of shape ``(1797,)`` with the digit classes ``0..9``.

    Raises
    ------
    ValueError
        If ``binarize`` is true and ``threshold`` is outside ``1..16``.
    """
    if binarize and not 1 <= threshold <= _MAX_PIXEL:
        raise ValueError(f"threshold must be in 1..{_MAX_PIXEL}, got {threshold}")
    data = _digits_array()
    pixels = data[:, :_N_DIGIT_PIXELS]
    if binarize:
        pixels = pixels >= threshold
    images = torch.tensor(pixels, dtype=dtype)
    labels = torch.tensor(data[:, _N_DIGIT_PIXELS], dtype=torch.long)
    return images, labels


class DatasetInfo(NamedTuple):
    """A registered data set: its loader and a one-line description."""

    loader: Callable[..., Any]
    description: str


DATASETS: dict[str, DatasetInfo] = {
    "old_faithful": DatasetInfo(
        load_old_faithful,
        "Old Faithful geyser: (272, 2) eruption and waiting times in minutes.",
    ),
    "digits": DatasetInfo(
        load_digits,
        "UCI 8x8 handwritten digits: (1797, 64) images and (1797,) labels.",
    ),
}


def load(name: str, **kwargs: Any) -> Any:
    """Load a shipped data set by name.

    Parameters
    ----------
    name : str
        A key of :data:`DATASETS`.
    **kwargs
        Passed on to the data set's loader.

    Returns
    -------
    object
        Whatever the loader returns (see :data:`DATASETS`).

    Raises
    ------
    ValueError
        If ``name`` is not a known data set.
    """
    if name not in DATASETS:
        known = ", ".join(sorted(DATASETS))
        raise ValueError(f"unknown data set {name!r}; expected one of: {known}")
    return DATASETS[name].loader(**kwargs)
