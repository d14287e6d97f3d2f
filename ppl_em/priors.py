"""Conjugate priors: the MAP M-step adds pseudo-statistics to the likelihood's.

A parameter theta with a prior factor p(theta) (a point-estimated global latent,
``weights = pyro.sample("weights", Dirichlet(alpha))``, or ``pyro.sample("prior", Dirichlet(alpha),
obs=phi)``) is updated by MAP-EM: theta := argmax E_Q[log p(x, z; theta)] + log p(theta). Where the
prior is conjugate to the site's family, this is the closed form with pseudo-statistics added:

    Dirichlet(alpha) on probabilities      phi_j   = (N_j + alpha_j - 1) / sum_l (N_l + alpha_l - 1)
    Beta(a, b) on a Bernoulli's p          p       = (sum w x + a - 1) / (sum w + a + b - 2)
    Gamma(a, b) on a Poisson rate          lambda  = (sum w x + a - 1) / (sum w + b)
    InverseGamma(a, b) on a variance       sigma^2 = (sum w (x - mu)^2 + 2 b) / (sum w + 2 a + 2)
    Gamma(a, b) on a precision             sigma^2 = (sum w (x - mu)^2 + 2 b) / (sum w + 2 a - 2)
    Wishart(nu, V) on a precision matrix   Sigma   = (sum w (x - mu)(x - mu)^T + V^-1) / (sum w + nu - d - 1)
    Normal(m0, s0^2) on a location         mu      = (sum w x / sigma^2 + m0 / s0^2) / (sum w / sigma^2 + 1 / s0^2)

(the last given the current sigma: an ECM step, Meng & Rubin 1993, which still never decreases the
objective). A concentration below 1 makes the posterior density unbounded where the counts are too
few: then no MAP exists, and :class:`NoMAPError` says where. ``map_basis="unconstrained"`` takes the
mode of the posterior density of log(theta) (log-odds for probabilities) instead, which adds 1 to
every concentration: counts + alpha for a Dirichlet. Uniform and improper flat priors are no prior.

References: Bishop, PRML, sections 2.2-2.3 (conjugate priors); Murphy, "Machine Learning: a
Probabilistic Perspective", section 11.4.2.8 (MAP estimation for the GMM).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import pyro.distributions as dist

from .families import base
from .selection import Selection, selection_sources

__all__ = ["Prior", "NoMAPError", "find_priors", "log_jacobian", "MAP_BASES"]

MAP_BASES = ("constrained", "unconstrained")
FLAT = (dist.Uniform, dist.ImproperUniform)


class NoMAPError(ValueError):
    """The MAP of a parameter does not exist: its prior's density is unbounded there."""


@dataclass
class Prior:
    """A conjugate prior factor on a parameter: its pseudo-statistics, in the parameter's layout.

    ``num`` and ``den`` are added to the likelihood's numerator and denominator; ``unit`` is the
    shift of every concentration by the unconstrained basis (see the module docstring). For a Normal
    prior on a location, ``weighted_mean`` m0 / s0^2 and ``precision`` 1 / s0^2 instead.
    """

    site: str
    family: str
    param: str
    num: Optional[torch.Tensor] = None
    den: Optional[torch.Tensor] = None
    unit: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    weighted_mean: Optional[torch.Tensor] = None
    precision: Optional[torch.Tensor] = None
    positive: Optional[str] = None  # which sum must stay positive for the MAP to exist: "num" or "den"

    def pseudo(self, basis: str) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        if basis == "unconstrained" and self.unit is not None:
            return _plus(self.num, self.unit[0]), _plus(self.den, self.unit[1])
        return self.num, self.den

    def check(self, num: torch.Tensor, den: Optional[torch.Tensor]) -> None:
        """After the pseudo-counts are added, the counts (for a variance: the denominator) must be
        positive for the MAP to exist."""
        if self.positive is None:
            return
        bad = ~((num if self.positive == "num" else den) > 0)
        if bad.any():
            raise NoMAPError(
                f"The {self.family} prior at site '{self.site}' has concentrations below 1, and {int(bad.sum())} "
                f"of the {bad.numel()} entries of '{self.param}' have fewer expected counts than 1 - alpha: there "
                "the posterior density is unbounded (it grows without limit as the entry goes to the boundary), "
                "so no MAP exists. Use concentrations >= 1, or EM(model, map_basis='unconstrained') for the mode in "
                "the log / log-odds basis (counts + alpha).")


def find_priors(trace, leaves: Dict[str, torch.Tensor], kinds: Dict[str, Tuple[str, str]]):
    """The conjugate prior factors on parameters, why a prior factor is not conjugate, and the set of
    every parameter with a prior factor.

    ``kinds[p]`` = (the likelihood's canonical parameter, how p maps to it: "identity" or "reciprocal"),
    for the parameters with a closed-form likelihood update.
    """
    by_id = {id(leaf): name for name, leaf in leaves.items()}
    priors: Dict[str, List[Prior]] = {}
    not_conjugate: Dict[str, str] = {}
    with_prior = set()
    for site in trace.nodes.values():
        if site["type"] != "sample" or not site["is_observed"] or not torch.is_tensor(site["value"]):
            continue
        if site["value"].grad_fn is None and id(site["value"]) not in by_id:
            continue
        selections, _ = selection_sources(site["value"], by_id)
        if len(selections) != 1 or _masked_off(site) or isinstance(base(site["fn"]), FLAT):
            continue
        selection = selections[0]
        p = selection.param
        with_prior.add(p)
        prior, why = _conjugate(site, base(site["fn"]), selection, kinds.get(p))
        if prior is None:
            not_conjugate.setdefault(p, why)
        else:
            priors.setdefault(p, []).append(prior)
    return priors, not_conjugate, with_prior


def log_jacobian(names) -> torch.Tensor:
    """sum of log ``|det d theta / d u|`` over the parameters ``names`` at their current values, for the
    bijections theta = T(u) of their constraints (stick-breaking for a simplex, sigmoid, exp): the term that turns
    log p(theta) into the log-density of the unconstrained u. For these transforms ``|det J| = prod theta_i``
    (times prod (1 - theta_i) for an interval), so the mode of a Dirichlet's becomes counts + alpha."""
    import pyro
    from torch.distributions import biject_to

    store = pyro.get_param_store()
    total = torch.zeros((), dtype=torch.float64)
    for name in names:
        theta = store[name]  # differentiable in the store's own unconstrained value
        bijection = biject_to(store._constraints[name])  # a bijection (the store may use an overcomplete softmax)
        total = total + bijection.log_abs_det_jacobian(bijection.inv(theta), theta).sum()
    return total


def _masked_off(site) -> bool:
    """A prior inside ``poutine.mask(mask=False)`` (hmm.py's ``include_prior=False``) is no prior."""
    mask = site["mask"]
    return mask is False or (torch.is_tensor(mask) and not bool(mask.any()))


def _conjugate(site, fn, selection: Selection, kind) -> Tuple[Optional[Prior], str]:
    """The pseudo-statistics of a prior ``fn`` on the parameter that ``selection`` reads, or why it is not conjugate."""
    name = type(fn).__name__
    if kind is None:
        return None, f"it has a {name} prior at site {site['name']} and no closed-form likelihood update"
    canonical, relation = kind
    if selection.transforms:
        return None, f"its {name} prior at site {site['name']} is on a transform of it"
    if _depends_on_parameters(fn):
        return None, f"its {name} prior at site {site['name']} has hyperparameters that are parameters"
    scatter = lambda t: selection.vjp(t.to(selection.tensor.dtype).expand(selection.shape))
    ones = torch.ones(selection.shape, dtype=selection.tensor.dtype)
    p = selection.param
    if name == "Dirichlet" and canonical in ("probs", "initial", "transition") and relation == "identity":
        alpha = fn.concentration.detach()
        return Prior(site["name"], name, p, num=scatter(alpha - 1), unit=(scatter(ones), None), positive="num"), ""
    if name == "Beta" and canonical == "probs" and relation == "identity":
        a, b = fn.concentration1.detach(), fn.concentration0.detach()
        return Prior(site["name"], name, p, num=scatter(a - 1), den=scatter(a + b - 2),
                     unit=(scatter(ones), scatter(2 * ones)), positive="num"), ""
    if name == "Gamma" and canonical == "rate" and relation == "identity":
        a, b = fn.concentration.detach(), fn.rate.detach()
        return Prior(site["name"], name, p, num=scatter(a - 1), den=scatter(b), unit=(scatter(ones), None),
                     positive="num"), ""
    if name in ("Gamma", "InverseGamma") and canonical == "variance" and relation == ("reciprocal" if name == "Gamma" else "identity"):
        a, b = fn.concentration.detach(), fn.rate.detach()
        den = 2 * a - 2 if name == "Gamma" else 2 * a + 2
        return Prior(site["name"], name, p, num=scatter(2 * b), den=scatter(den),
                     unit=(None, scatter(2 * ones if name == "Gamma" else -2 * ones)), positive="den"), ""
    if name == "Wishart" and canonical == "covariance" and relation == "reciprocal":
        d = fn.event_shape[-1]
        v_inv = fn.precision_matrix.detach() if "precision_matrix" in fn.__dict__ else torch.linalg.inv(fn.covariance_matrix.detach())
        return Prior(site["name"], name, p, num=scatter(v_inv), den=scatter((fn.df.detach() - d - 1)[..., None, None] * ones)), ""
    if name == "Normal" and canonical == "loc" and relation == "identity":
        return Prior(site["name"], name, p, weighted_mean=scatter(fn.loc.detach() / fn.scale.detach() ** 2),
                     precision=scatter(fn.scale.detach() ** -2)), ""
    return None, f"its {name} prior at site {site['name']} is not conjugate to its likelihood ({canonical})"


def _depends_on_parameters(fn) -> bool:
    return any(torch.is_tensor(v) and v.requires_grad for v in fn.__dict__.values())


def _plus(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if a is None:
        return b
    return a if b is None else a + b
