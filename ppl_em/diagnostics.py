"""Why a step failed: the site whose log-probability is not finite, the singular component.

When EM's loss -log p(x; theta) comes out NaN or infinite, some factor of the joint is: one
run of the model under parallel enumeration (every value of every discrete latent at once)
finds the first sample site whose log-probability is NaN or +inf anywhere, or -inf for every
value of the latents at some data point (a point the model gives probability 0).
When an M-step's covariance is singular, torch's Cholesky factorisation says which matrix
of the batch failed; for a mixture's (k, d, d) Sigma that is the component j.
"""

from __future__ import annotations

import math
import re
from typing import Callable, List, Optional, Tuple

import torch
import pyro
import pyro.poutine as poutine
import pyro.util
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import constraints

from .posterior import _MAX_PLATES, enumerated, full_plates

__all__ = ["non_finite_site", "non_finite_loss_message", "rejected_parameters", "singular_update_message",
           "degenerate_update_message", "explain_failure"]

_MATRIX_CONSTRAINTS = (type(constraints.positive_definite), type(constraints.lower_cholesky),
                       type(constraints.positive_semidefinite))


def non_finite_site(model: Callable, args: tuple, kwargs: dict) -> Optional[Tuple[str, str]]:
    """The first site whose log-probability is not finite at the parameters in the store.

    Returns ``(name, description)``, e.g. ``("x", "nan (first at data index 3)")``, or None
    when every site is finite (or the model cannot be run under enumeration).
    """
    try:
        trace = _enumerated_trace(model, args, kwargs)
    except Exception:  # diagnosis must never hide the error it explains
        return None
    sites = [s for s in trace.nodes.values() if s["type"] == "sample"]
    for test in (_nan_or_pos_inf, _impossible_point):
        for site in sites:
            found = test(site)
            if found:
                return site["name"], found
    return None


def rejected_parameters(model: Callable, args: tuple, kwargs: dict) -> Optional[str]:
    """The first line of the error with which the model's distributions reject the parameters in the
    store (every value of the latents tried), or None if they accept them."""
    try:
        _enumerated_trace(model, args, kwargs, validate=True)
    except ValueError as e:
        return str(e).splitlines()[0]
    except Exception:
        return None
    return None


def _enumerated_trace(model: Callable, args: tuple, kwargs: dict, validate: bool = False):
    enum_model = enumerated(model)
    state = pyro.util.get_rng_state()
    try:
        with poutine.block(), pyro.validation_enabled(validate), torch.no_grad(), full_plates():
            trace = prune_subsample_sites(poutine.trace(enum_model).get_trace(*args, **kwargs))
            for site in trace.nodes.values():
                if site["type"] == "sample" and not validate:
                    site["diagnosed_log_prob"] = _masked(site, site["fn"].log_prob(site["value"]))
    finally:
        pyro.util.set_rng_state(state)
    return trace


def _masked(site: dict, log_p: torch.Tensor) -> torch.Tensor:
    mask = site["mask"]
    if mask is None or mask is True:
        return log_p
    return log_p.masked_fill(~torch.as_tensor(mask, device=log_p.device), 0.0)


def _nan_or_pos_inf(site: dict) -> str:
    lp = site["diagnosed_log_prob"]
    bad = torch.isnan(lp) | (lp == math.inf)
    if not bad.any():
        return ""
    value = lp[tuple(bad.nonzero()[0])].item()
    return f"{value}{_where(site, bad)}"


def _impossible_point(site: dict) -> str:
    """-inf for every value of the enumerated latents: the model gives an observation probability 0."""
    if not site["is_observed"]:
        return ""
    lp = site["diagnosed_log_prob"]
    impossible = lp == -math.inf
    if impossible.dim() > _MAX_PLATES:  # fold the enumeration dims: -inf for all of them
        impossible = impossible.flatten(0, impossible.dim() - _MAX_PLATES - 1).all(0)
    if not impossible.any():
        return ""
    return f"-inf for every value of the latent variables{_where(site, impossible)}, a point the model gives probability 0"


def _where(site: dict, bad: torch.Tensor) -> str:
    """' (first at data index 3)': the first bad position along each of the site's plates."""
    if bad.dim() == 0:
        return ""
    first = bad.nonzero()[0]
    parts: List[str] = []
    for frame in site["cond_indep_stack"]:
        dim = bad.dim() + frame.dim
        if frame.vectorized and dim >= 0 and bad.shape[dim] > 1:
            parts.append(f"{frame.name} index {int(first[dim])}")
    return f" (first at {', '.join(parts)})" if parts else ""


def non_finite_loss_message(model: Callable, args: tuple, kwargs: dict, what: str, loss: Optional[float]) -> str:
    """'EM iteration 3: log p(x) is nan: site 'x' has log-probability nan (...). ...'"""
    found = non_finite_site(model, args, kwargs)
    if found is None:
        culprit = "no single site's log-probability is non-finite on its own (the sum over the latents is)"
        advice = "Check the model's factors for values that cancel to inf - inf, or data outside their support"
    else:
        culprit = f"the log-probability of site {found[0]!r} is {found[1]}"
        advice = (f"Check site {found[0]!r}: its distribution's parameters (a log of a negative number, 0/0) "
                  "or data outside its support")
    value = "not finite" if loss is None else f"{-loss}"
    return f"{what}: log p(x) is {value} at the current parameters, so EM cannot continue: {culprit}. {advice}."


def singular_update_message(error: BaseException, what: str) -> str:
    """A scikit-learn style diagnosis of a singular covariance update (a failed Cholesky)."""
    match = re.search(r"[Bb]atch element (\d+)", str(error))
    names = _matrix_parameters()
    subject = f"parameter {names[0]!r}" if len(names) == 1 else "a covariance parameter"
    if match:
        subject = f"component {match.group(1)} of {subject}"
    return (f"{what}: {subject} has a singular covariance: increase reg_covar (em_options={{'reg_covar': 1e-4}}), "
            f"reduce k, or scale the data (the M-step's update is not positive definite: {str(error).splitlines()[0]})")


def degenerate_update_message(name: str, outside: torch.Tensor, what: str) -> str:
    """An M-step update outside its parameter's constraint: a component whose variance is 0 or whose
    covariance is singular (it collapsed onto identical points). ``outside`` marks the batch elements."""
    where = outside.reshape(-1).nonzero().reshape(-1).tolist() if outside.dim() else []
    subject = f"component {where[0]} of parameter {name!r}" if where and outside.numel() > 1 else f"parameter {name!r}"
    problem = ("has a singular covariance" if outside.dim() < 1 or _is_matrix(name) else
               "collapsed onto identical points: its variance is 0")
    return (f"{what}: {subject} {problem}: increase reg_covar (em_options={{'reg_covar': 1e-4}}), reduce k, "
            "or scale the data. The previous parameters were kept.")


def _is_matrix(name: str) -> bool:
    return name in _matrix_parameters()


def _matrix_parameters() -> List[str]:
    store = pyro.get_param_store()
    state = store.get_state()
    return [n for n, c in state["constraints"].items() if isinstance(c, _MATRIX_CONSTRAINTS)]


def explain_failure(error: Exception, model: Callable, args: tuple, kwargs: dict, what: str) -> Exception:
    """The error to raise for a failed EM step: the root cause where it can be told, else ``error``.

    A non-finite log-probability breaks any M-step, so it is named first. A failed Cholesky
    factorisation is a singular covariance update. A distribution that rejects its parameters
    ("Expected parameter ...") although the model accepted the parameters before the step was given
    them by the update (a variance of exactly 0 passes as finite).
    """
    from .em import NonFiniteParameterError
    from .svi import NonFiniteLossError

    if isinstance(error, (NonFiniteLossError, KeyboardInterrupt)):
        return error
    if non_finite_site(model, args, kwargs) is not None:
        return NonFiniteLossError(non_finite_loss_message(model, args, kwargs, what, None))
    if str(error).startswith(what):  # already says why
        return error
    if isinstance(error, torch.linalg.LinAlgError):
        return ValueError(singular_update_message(error, what))
    if isinstance(error, NonFiniteParameterError):
        return ValueError(f"{what}: {error}")
    return error
