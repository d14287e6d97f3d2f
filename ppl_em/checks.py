"""Checks of the data before the engine runs: a clear error naming the argument, site and index.

NaN is how a missing value is written. By default (``missing="error"``) a NaN in a tensor argument is
an error; with ``missing="marginalize"`` it is let through to the model, which must mask it (see
``ppl_em.models.gmm``): the check of the observed sites (:func:`check_observations`) still refuses a
NaN that reaches a site's value unmasked. An inf is an error either way.
"""

from __future__ import annotations

from typing import Optional

import torch

from .posterior import Posterior, sample_sites

__all__ = ["MISSING", "check_arguments", "check_missing", "check_observations"]

# How NaN entries of the data are treated: refused, or marginalised by a model that masks them.
MISSING = ("error", "marginalize")
MISSING_REMEDY = ("The models of ppl_em.models (gmm, kmeans, bernoulli_mixture, poisson_mixture) marginalise "
                  "NaN entries as missing values: pass missing='marginalize'.")


def check_missing(missing: str) -> str:
    """``missing`` must be one of :data:`MISSING`."""
    if missing not in MISSING:
        raise ValueError(f"missing must be one of {MISSING}, got {missing!r}: 'error' refuses NaN data, "
                         "'marginalize' lets NaN entries through to a model that masks them as missing values.")
    return missing


def _first_bad(value: torch.Tensor, bad: Optional[torch.Tensor] = None) -> str:
    bad = ~torch.isfinite(value) if bad is None else bad
    first = tuple(int(i) for i in bad.nonzero()[0])
    return f"{int(bad.sum())} non-finite value(s) (NaN or inf); the first is at index {first}: {value[first].item()}"


def _all_finite(value: torch.Tensor) -> bool:
    """No NaN or inf in ``value``: one sum (finite unless some entry is not, or it overflows), and
    the elementwise test only when the sum is not finite."""
    return bool(torch.isfinite(value.sum())) or bool(torch.isfinite(value).all())


def check_arguments(args: tuple, kwargs: dict, missing: str = "error") -> None:
    """Raise a ValueError naming the argument and index of the first NaN or inf in the data
    (the first inf only, with ``missing="marginalize"``)."""
    named = [(f"argument {i}", a) for i, a in enumerate(args)] + [(f"argument '{k}'", v) for k, v in kwargs.items()]
    for label, value in named:
        if not torch.is_tensor(value) or not value.is_floating_point() or _all_finite(value):
            continue
        if missing == "marginalize":
            if bool(value.isinf().any()):
                raise ValueError(f"The data in {label} (shape {tuple(value.shape)}) has "
                                 f"{_first_bad(value, value.isinf())}. missing='marginalize' treats NaN as a "
                                 "missing value, but an inf is not one: remove or impute those entries, or set "
                                 "them to NaN.")
            continue
        raise ValueError(
            f"The data in {label} (shape {tuple(value.shape)}) has {_first_bad(value)}. "
            "Remove or impute those rows before fitting, or mask them with obs_mask / poutine.mask "
            f"and pass finite placeholders. {MISSING_REMEDY}"
        )


def check_observations(post: Posterior) -> None:
    """Raise a ValueError naming the site and index of the first NaN or inf observation."""
    check_observed_sites(post.trace)


def check_observed_sites(trace) -> None:
    """:func:`check_observations` on a trace: the first NaN or inf that an observed site's mask
    (a ``MaskedDistribution``'s) does not cover."""
    for site in sample_sites(trace):
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
                "Remove or impute those rows, or mask them out with obs_mask / poutine.mask. A model that "
                "marginalises missing values masks them and observes finite placeholders: "
                "dist.Normal(loc, scale).mask(~x.isnan()).to_event(1) on x.nan_to_num()."
            )
