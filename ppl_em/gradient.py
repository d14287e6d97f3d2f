"""The M-step by gradient, and the check that keeps closed forms honest.

Where no closed form applies (a shared or transformed parameter the rules cannot read, a neural
network), the M-step maximises the expected complete-data log-likelihood

    E_Q[log p(x, z; theta)] + log p(theta)        (Q fixed, from the E-step)

by L-BFGS in the parameters' unconstrained space: generalised EM, which still never decreases
log p(x; theta) as long as the objective does not decrease. The same objective checks each closed
form once: its gradient must vanish there.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional

import torch
import pyro
import pyro.distributions as dist

from .families import unwrap
from .posterior import ModelStructure, Posterior, expected_log_prob, sample_sites, trace_model

__all__ = ["expected_log_joint", "gradient_m_step", "stationary", "StalledError"]


class StalledError(RuntimeError):
    """A gradient M-step could not improve a point that is not stationary: EM would stall there."""


def expected_log_joint(model: Callable, structure: ModelStructure, post: Posterior, args, kwargs,
                       reg: float = 0.0, trace=None) -> torch.Tensor:
    """E_Q[log p(x, z; theta)] + log p(theta) at the parameters in the store, differentiable in them.

    With ``reg`` > 0, minus (reg/2) sum over the weighted elements of every Gaussian site of
    tr(Sigma^{-1}) (1 / sigma^2 for a Normal): the objective whose exact maximiser is the closed form
    that adds reg to every covariance (variance). ``trace``: the model's trace at these parameters,
    differentiable in them (:func:`ppl_em.posterior.differentiable_posterior`), where one was made.
    """
    tr = trace if trace is not None else trace_model(model, structure, args, kwargs, leaf_params=False)[0]
    total = sum(expected_log_prob(s, post.weights[s["name"]]) for s in sample_sites(tr))
    if reg == 0:
        return total
    for site in sample_sites(tr):
        weights = post.weights[site["name"]]
        if not torch.is_tensor(weights):
            continue  # a chain's tables: its emissions are not regularised here
        fn, w = unwrap(site["fn"], weights)
        if isinstance(fn, dist.MultivariateNormal):
            total = total - 0.5 * reg * (w * fn.precision_matrix.diagonal(dim1=-2, dim2=-1).sum(-1)).sum()
        elif isinstance(fn, dist.Normal):
            total = total - 0.5 * reg * (w / fn.scale.square()).sum()
    return total


def unconstrained_grads(objective: Callable[[], torch.Tensor], names: List[str]) -> Dict[str, torch.Tensor]:
    """d objective / d unconstrained value of each parameter in ``names`` (zeros where it does not enter)."""
    store = pyro.get_param_store()
    leaves = [store[n].unconstrained() for n in names]
    grads = torch.autograd.grad(objective(), leaves, allow_unused=True)
    return {n: (torch.zeros_like(l) if g is None else g) for n, l, g in zip(names, leaves, grads)}


def stationary(g_old: torch.Tensor, g_new: torch.Tensor, power: float) -> bool:
    """``max |gradient after| <= eps^power (1 + max |gradient before|)``: the update is a stationary point (up to rounding)."""
    eps = torch.finfo(g_new.dtype).eps
    return bool(g_new.abs().max() <= eps ** power * (1 + g_old.abs().max())) if g_new.numel() else True


def gradient_m_step(objective: Callable[[], torch.Tensor], names: List[str], scale: float,
                    max_iter: int) -> Optional[str]:
    """Maximise ``objective()`` over the parameters ``names`` by L-BFGS, from their current values.

    Generalised EM must not decrease the objective: a step that does not improve it is undone.
    Returns None, or why the step stalled: it could not move from a point where the gradient does
    not vanish (every trial point rejected by the model, or no increase). The caller decides whether
    that stalls EM (nothing else moved either) and raises :class:`StalledError`.
    """
    if not names:
        return None
    store = pyro.get_param_store()
    unconstrained = [store[n].unconstrained() for n in names]
    optim = torch.optim.LBFGS(unconstrained, max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-13,
                              history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optim.zero_grad()
        loss = -objective() / scale
        loss.backward()
        return loss

    before = [u.detach().clone() for u in unconstrained]
    start = closure()
    grad = max(float(u.grad.abs().max()) if u.grad is not None and u.grad.numel() else 0.0 for u in unconstrained)
    start, rejected = start.item(), None
    try:
        optim.step(closure)
        end = closure().item()
    except (ValueError, RuntimeError) as error:
        # A line search can try a point outside the model's support (a covariance that is not
        # positive definite, say), which the model's distributions reject: keep the start.
        rejected, end = str(error).splitlines()[0][:200], math.inf
    if end <= start and all(torch.isfinite(u).all() for u in unconstrained):
        return None
    with torch.no_grad():
        for u, b in zip(unconstrained, before):
            u.copy_(b)
    if grad <= 1e-6 * (1 + abs(start)) and not rejected:
        return None  # already stationary: nothing to improve
    what = f"tried parameters that the model rejects ({rejected})" if rejected else \
        "could not increase E_Q[log p(x, z; theta)]"
    return (f"The gradient M-step for {names} {what}, at a point where its gradient is {grad:.3g}, not 0; "
            "the previous values were kept")


def stalled_message(reason: str) -> str:
    """The error text when a stalled gradient M-step stops EM: what to check and try."""
    return (f"{reason}, and no other parameter moved: EM cannot leave this point. Check that the model's "
            "log-density is finite and smooth near these values (a prior with a concentration below 1 is "
            "unbounded at the boundary), or try another initialisation, a larger reg_covar, or SVI.")
