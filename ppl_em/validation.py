"""Checks of what a user passes to :func:`ppl_em.fit`, made before the model runs.

A model's own initialiser meets the data first (the GMM's data covariance, k-means++
seeding): without these checks, NaN data would surface as a failed Cholesky factorisation
inside the model, k = 0 as a division by zero. Each check raises a ``ValueError`` that says
what was expected, what was received and what to try; the argument is named as the model's
signature names it (``argument 'x'``).

Checked here, for every tensor among the model arguments (and one level into dicts, lists
and tuples, such as the GMM's ``init``): NaN or inf (with the index of the first one),
half precision, ``requires_grad``, emptiness, and values so large that sums of their
squares overflow the dtype. The number of components ``k`` must be a positive integer, and
at most the number of observations (:func:`check_k_fits`); observed sites of continuous
families must receive floating-point data (:func:`check_observed_dtypes`).

Missing values (``missing="marginalize"``): a NaN in a tensor argument (not in one nested in a
dict, list or tuple) is a missing entry, let through to the model, which masks it. An inf is still
an error, and so is an observation that is missing entirely (NaN along the whole last dimension:
a row of an (n, d) table): it says nothing about theta, and would count as an observation in
(1/n) log p(x) and in BIC. :func:`check_missing_columns` (for a fit) refuses a column that is
missing in every row, whose parameters nothing determines; :func:`check_masked_observations` a
model that lets a NaN reach an observed site unmasked.
"""

from __future__ import annotations

import inspect
import math
import operator
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import numpy as np
import torch

from .checks import MISSING_REMEDY, check_missing, check_observed_sites

__all__ = ["check_arguments", "check_k_fits", "check_masked_observations", "check_missing_columns",
           "check_observed_dtypes", "check_seed", "named_arguments"]

HALF = (torch.float16, torch.bfloat16)
MAX_SEED = 2 ** 32 - 1  # numpy's global seed, which pyro.set_rng_seed also sets, is 32-bit


def named_arguments(model: Callable, args: tuple, kwargs: dict) -> Dict[str, Any]:
    """The model arguments keyed by parameter name (``"x"``, ``"k"``); positions where the
    signature cannot be read, or for arguments collected by ``*args``."""
    try:
        bound = inspect.signature(model).bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        return {**{str(i): a for i, a in enumerate(args)}, **kwargs}
    named = {}
    for name, value in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            named.update({f"{name}[{i}]": v for i, v in enumerate(value)})
        elif kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        else:
            named[name] = value
    return named


def check_arguments(model: Callable, args: tuple, kwargs: dict, missing: str = "error") -> None:
    """Raise a ValueError for the first model argument that cannot be fitted (see the module docstring);
    ``missing="marginalize"`` lets NaN entries of the data through."""
    check_missing(missing)
    named = named_arguments(model, args, kwargs)
    for name, value in named.items():
        label = f"argument {name!r}"
        if isinstance(value, np.ndarray):
            raise ValueError(f"The model's {label} is a numpy array of shape {value.shape}; ppl_em fits torch "
                             f"tensors. Pass torch.as_tensor({name}) (float64 keeps numpy's precision), or ppl_em.Rows({name}) "
                             "to read it in batches (a memory map from np.load(path, mmap_mode='r') is read so).")
        if torch.is_tensor(value):
            _check_data_tensor(label, name, value, missing)
        for inner_label, inner in _nested_tensors(label, value):
            if inner is not value:
                _check_finite(inner_label, inner)
    if "k" in named:
        check_k(named["k"])


def _nested_tensors(label: str, value: Any) -> Iterator[Tuple[str, torch.Tensor]]:
    """The tensor itself, or the tensors one level inside a dict, list or tuple."""
    if torch.is_tensor(value):
        yield label, value
    elif isinstance(value, dict):
        yield from ((f"{label}[{k!r}]", v) for k, v in value.items() if torch.is_tensor(v))
    elif isinstance(value, (list, tuple)):
        yield from ((f"{label}[{i}]", v) for i, v in enumerate(value) if torch.is_tensor(v))


def _check_data_tensor(label: str, name: str, value: torch.Tensor, missing: str = "error") -> None:
    shape = tuple(value.shape)
    if value.requires_grad:
        raise ValueError(f"The model's {label} (shape {shape}) requires grad; fit treats the data as constants "
                         f"and learns only the model's parameters. Pass {name}.detach().")
    if value.numel() == 0:
        raise ValueError(f"The model's {label} is empty (shape {shape}); fitting needs at least one observation.")
    if value.dtype in HALF:
        raise ValueError(f"The model's {label} has dtype {value.dtype}; ppl_em fits in float32 or float64 (half "
                         "precision has too little range for the sufficient statistics, and no Cholesky on the "
                         f"CPU). Pass {name}.float() or {name}.double().")
    if value.is_complex():
        raise ValueError(f"The model's {label} has the complex dtype {value.dtype}; pass real data.")
    if missing == "marginalize" and value.is_floating_point() and bool(torch.isnan(value).any()):
        _check_missing_entries(label, name, value)
        value = value.nan_to_num(nan=0.0, posinf=math.inf, neginf=-math.inf)  # the observed entries
    else:
        _check_finite(label, value, remedy=True)
    _check_magnitude(label, name, value)


def _check_finite(label: str, value: torch.Tensor, remedy: bool = False) -> None:
    # One sum is finite unless some entry is not (or it overflows): the elementwise test only then.
    if not value.is_floating_point() or bool(torch.isfinite(value.sum())) or bool(torch.isfinite(value).all()):
        return
    bad = ~torch.isfinite(value)
    first = tuple(int(i) for i in bad.nonzero()[0])
    raise ValueError(
        f"The data in {label} (shape {tuple(value.shape)}) has {int(bad.sum())} non-finite value(s) (NaN or inf); "
        f"the first is at index {first}: {value[first].item()}. Remove or impute those rows before fitting, "
        "or mask them with obs_mask / poutine.mask and pass finite placeholders." + (f" {MISSING_REMEDY}" if remedy else ""))


def _check_missing_entries(label: str, name: str, value: torch.Tensor) -> None:
    """With missing values allowed: no inf, and no observation missing along its whole last dimension."""
    if bool(value.isinf().any()):
        first = tuple(int(i) for i in value.isinf().nonzero()[0])
        raise ValueError(f"The data in {label} (shape {tuple(value.shape)}) has an inf at index {first}. "
                         "missing='marginalize' treats NaN as a missing value, but an inf is not one: remove or "
                         f"impute it, or set it to NaN ({name}[{name}.isinf()] = float('nan')).")
    empty = torch.isnan(value).all(-1) if value.dim() >= 2 else torch.isnan(value)
    if bool(empty.any()):
        rows = empty.nonzero()
        first = tuple(int(i) for i in rows[0])
        raise ValueError(f"The data in {label} (shape {tuple(value.shape)}) have {len(rows)} observation(s) with "
                         f"every entry missing; the first is {name}[{', '.join(map(str, first))}]. An entirely "
                         "missing observation says nothing about the parameters: drop it, e.g. "
                         f"{name}[~{name}.isnan().all(-1)].")


def check_missing_columns(model: Callable, args: tuple, kwargs: dict) -> None:
    """For a fit with missing values: no coordinate (an index of the last dimension) may be missing in
    every observation of a tensor argument; nothing would determine its parameters."""
    for name, value in named_arguments(model, args, kwargs).items():
        if not (torch.is_tensor(value) and value.is_floating_point() and value.dim() >= 2):
            continue
        never = torch.isnan(value).reshape(-1, value.shape[-1]).all(0)  # (d,)
        if bool(never.any()):
            column = int(never.nonzero()[0])
            raise ValueError(f"Column {column} of argument {name!r} (shape {tuple(value.shape)}) is missing (NaN) "
                             "in every observation: nothing determines its parameters. Drop that column, e.g. "
                             f"{name}[..., ~{name}.isnan().reshape(-1, {name}.shape[-1]).all(0)].")


def check_masked_observations(trace) -> None:
    """With missing values allowed: every NaN must be masked before it reaches an observed site
    (a model that does not marginalise missing values would get NaN log-probabilities)."""
    try:
        check_observed_sites(trace)
    except ValueError as e:
        raise ValueError(f"missing='marginalize' let NaN entries through to the model, but it does not mask "
                         f"them: {e}") from None


def _check_magnitude(label: str, name: str, value: torch.Tensor) -> None:
    """Sums of squares over the data (the Gaussian statistics, covariances) must stay finite."""
    if not value.is_floating_point():
        return
    largest = max(float(value.detach().max()), -float(value.detach().min()))  # no |x| temporary
    limit = math.sqrt(torch.finfo(value.dtype).max / value.numel())
    if largest > limit:
        raise ValueError(
            f"The data in {label} reach {largest:.3g} in magnitude: the sum of their squares overflows "
            f"{value.dtype} (whose largest number is {torch.finfo(value.dtype).max:.3g}), so no variance or "
            f"covariance can be computed. Scale the data first, e.g. ({name} - {name}.mean(0)) / {name}.std(0), "
            f"to values below {limit:.3g}.")


def check_k(k: Any) -> int:
    """k, the number of components, as an int >= 1; a ValueError saying what to pass otherwise."""
    if isinstance(k, bool) or (torch.is_tensor(k) and k.dtype == torch.bool):
        raise ValueError(f"k, the number of components, must be a positive integer, got the bool {k!r}.")
    try:
        value = operator.index(k)
    except TypeError:
        hint = f" Pass k={int(k)}." if isinstance(k, float) and k.is_integer() else ""
        raise ValueError(f"k, the number of components, must be a positive integer, got {k!r} "
                         f"({type(k).__name__}).{hint}") from None
    if value < 1:
        raise ValueError(f"k, the number of components, must be at least 1, got {value}.")
    return value


def check_k_fits(model: Callable, args: tuple, kwargs: dict, n_data: int) -> None:
    """k (when the model takes one) must not exceed the number of observations n."""
    k = named_arguments(model, args, kwargs).get("k")
    if k is not None and check_k(k) > n_data:
        raise ValueError(f"k = {int(k)} components, but the data have only n = {n_data} observations: a mixture "
                         f"cannot have more components than points. Use k <= {n_data}.")


def check_observed_dtypes(trace) -> None:
    """An observed site of a continuous family (Normal, ...) needs floating-point data."""
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or not site["is_observed"] or not torch.is_tensor(site["value"]):
            continue
        value, fn = site["value"], site["fn"]
        if not value.is_floating_point() and not _is_discrete(fn):
            raise ValueError(f"Observed site {name!r} is a {type(fn).__name__}, a continuous distribution, but its "
                             f"data have dtype {value.dtype}. Pass the data as floats, e.g. x.double().")


def _is_discrete(fn) -> Optional[bool]:
    try:
        return bool(fn.support.is_discrete)
    except (AttributeError, NotImplementedError):
        return True  # unknown support: leave the decision to the distribution


def check_seed(seed: Any, n_init: int = 1) -> int:
    """seed must be an int with seed + n_init - 1 within numpy's 32-bit seed range."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer, got {seed!r} ({type(seed).__name__}).")
    if not 0 <= seed <= MAX_SEED - (n_init - 1):
        raise ValueError(f"seed must lie in [0, {MAX_SEED - (n_init - 1)}] (restart r uses seed + r, and seeds are "
                         f"32-bit), got {seed}.")
    return int(seed)
