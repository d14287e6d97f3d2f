"""Checks of the data before the engine runs: a clear error naming the argument, site and index."""

from __future__ import annotations

from typing import Optional

import torch

from .posterior import Posterior, sample_sites

__all__ = ["check_arguments", "check_observations"]


def _first_bad(value: torch.Tensor, bad: Optional[torch.Tensor] = None) -> str:
    bad = ~torch.isfinite(value) if bad is None else bad
    first = tuple(int(i) for i in bad.nonzero()[0])
    return f"{int(bad.sum())} non-finite value(s) (NaN or inf); the first is at index {first}: {value[first].item()}"


def _all_finite(value: torch.Tensor) -> bool:
    """No NaN or inf in ``value``: one sum (finite unless some entry is not, or it overflows), and
    the elementwise test only when the sum is not finite."""
    return bool(torch.isfinite(value.sum())) or bool(torch.isfinite(value).all())


def check_arguments(args: tuple, kwargs: dict) -> None:
    """Raise a ValueError naming the argument and index of the first NaN or inf in the data."""
    named = [(f"argument {i}", a) for i, a in enumerate(args)] + [(f"argument '{k}'", v) for k, v in kwargs.items()]
    for label, value in named:
        if torch.is_tensor(value) and value.is_floating_point() and not _all_finite(value):
            raise ValueError(
                f"The data in {label} (shape {tuple(value.shape)}) has {_first_bad(value)}. "
                "Remove or impute those rows before fitting, or mask them with obs_mask / poutine.mask "
                "and pass finite placeholders."
            )


def check_observations(post: Posterior) -> None:
    """Raise a ValueError naming the site and index of the first NaN or inf observation."""
    for site in sample_sites(post.trace):
        if not site["is_observed"] or site["infer"].get("_map_site"):
            continue
        value = site["value"]
        if not torch.is_tensor(value) or not value.is_floating_point() or _all_finite(value):
            continue
        bad = ~torch.isfinite(value)
        fn_mask = getattr(site["fn"], "_mask", None)
        if fn_mask is not None:
            event = value.dim() - fn_mask.dim()
            bad = bad & fn_mask.reshape(fn_mask.shape + (1,) * max(0, event)).expand_as(bad)
        if bad.any():
            raise ValueError(
                f"Observed site '{site['name']}' has {_first_bad(value, bad)}. "
                "Remove or impute those rows, or mask them out with obs_mask / poutine.mask."
            )
