"""The closed-form M-step, in two halves that meet in :class:`ppl_em.Statistics`.

``summarize``: from one E-step's posterior Q(z), the sums each closed form needs. A Gaussian site
whose mean and covariance are both closed form keeps N_j, S_j, M_j per component about a centre
(:class:`ppl_em.families.GaussianSums`); every other use's (numerator, denominator) is scattered
onto its ``pyro.param`` by the selection's S^T, so sums from different chunks add up.

``maximize``: from the sums alone, each parameter's update in the lecture's order: locations,
probabilities and rates first (phi_j = N_j / n, mu_j = sum_i w_j^(i) x^(i) / N_j), then the scales
about the new locations (Sigma_j = sum_i w_j^(i) (x^(i) - mu_j)(x^(i) - mu_j)^T / N_j), each mapped
back to the parameter as the model writes it (:func:`to_param`).
"""

from __future__ import annotations

import collections
from typing import Callable, Dict, List, Mapping, Optional

import torch

from .families import GaussianSums, location_from_pass, to_attribute, view
from .fast import reduce_product
from .plan import Plan, Use, find_uses, matrix_layout
from .statistics import Statistics

__all__ = ["summarize", "use_statistics", "maximize", "to_param"]


def summarize(plan: Plan, post, rows: int = 1) -> Statistics:
    """Every closed-form use's statistics from one posterior (``post``, a :class:`ppl_em.Posterior`):
    the Gaussian groups' sums per cell, the other uses' sums scattered onto their parameters.
    Scales that need a second pass are left out (see :func:`use_statistics`)."""
    sums: Dict[str, torch.Tensor] = {}
    for key, group in plan.groups.items():
        fn, x, w = view(post.trace.nodes[group.loc.site], post.weights[group.loc.site], group.loc.part)
        ready = post.sums.get(group.loc.site) if not group.loc.part else None  # the E-step's own pass (fuse)
        found = None if ready is None else group.sums.from_pass(ready, x, w, group.cells, group.centre)
        for name, value in zip("NSM", found or group.sums.summarize(fn, x, w, group.cells, group.centre)):
            sums[f"{key}.{name}"] = value
    uses = [u for p in plan.closed if p not in plan.second_pass for u in plan.uses[p] if plan.in_group(u) is None]
    use_statistics(sums, uses, post.trace, post.weights, post.leaves, post.sums)
    return Statistics(sums, {k: g.centre for k, g in plan.groups.items()}, post.log_evidence, rows, post.objective)


def use_statistics(sums: Dict[str, torch.Tensor], uses: List[Use], trace, weights, leaves,
                   fused: Optional[Mapping] = None) -> None:
    """Add each use's (numerator, denominator) statistics at this trace, scattered onto its parameter:
    ``sums["<param>.num"]``, ``["<param>.den"]``, and for a scale ``["<param>.eye"]``, the weights on
    the diagonal, where reg_covar goes. ``weights`` are the E-step's Q for each site; ``fused`` the sums of
    the E-step's own pass per site (``Posterior.sums``), which a location's statistics take where they apply."""
    fresh: Dict[str, dict] = {}
    for use in uses:
        selection = use.selection if use.stable else _reselect(use, trace, fresh, leaves)
        with torch.no_grad():
            fn, x, w = view(trace.nodes[use.site], weights[use.site], use.part)
            stats = precision_weighted_mean if use.weighted else use.rule.stats
            ready = None if use.part or fused is None else fused.get(use.site)
            num, den = location_from_pass(stats, ready, x, w, selection.shape) or stats(fn, x, w, selection.shape)
            dtype = selection.tensor.dtype  # the selection's backward runs in the parameter's dtype
            _accumulate(sums, f"{use.param}.num", selection.vjp(num.to(dtype)))
            if den is not None:
                _accumulate(sums, f"{use.param}.den", selection.vjp(den.to(dtype)))
            if use.rule.kind in ("variance", "covariance"):
                eye = torch.eye(den.shape[-1], dtype=den.dtype, device=den.device) if use.rule.kind == "covariance" else 1.0
                _accumulate(sums, f"{use.param}.eye", selection.vjp((den * eye).to(dtype)))


def precision_weighted_mean(fn, x, w, shape):
    """(sum_i w^(i) x^(i) / sigma^2, sum_i w^(i) / sigma^2) at the site's current sigma: a Normal location's
    statistics under a Normal prior (an ECM step given sigma)."""
    precision = fn.scale.to(torch.promote_types(fn.scale.dtype, torch.float64)) ** -2
    return reduce_product([w, x, precision], shape), reduce_product([w, precision], shape)


def _reselect(use: Use, trace, fresh: Dict[str, dict], leaves):
    """A per-row selection (theta[doc_i]) read again from this trace's autograd graph."""
    if use.site not in fresh:
        by_id = {id(leaf): name for name, leaf in leaves.items()}
        fresh[use.site] = {u.key: u.selection for u in find_uses(trace.nodes[use.site], by_id)[0]}
    return fresh[use.site][use.key]


def maximize(plan: Plan, stats: Statistics, names: List[str], current: Mapping[str, torch.Tensor],
             reg: float, basis: str = "constrained") -> Dict[str, torch.Tensor]:
    """The new value of each parameter in ``names`` from ``stats``: phase 1 (locations, probabilities,
    rates), then phase 2 (scales) about the new locations. ``current``: the parameters' values now
    (constrained); ``reg``: added to every covariance's (variance's) diagonal; ``basis``: where a MAP
    with a conjugate prior is taken (:mod:`ppl_em.priors`)."""
    new: Dict[str, torch.Tensor] = {}
    values = collections.ChainMap(new, current)  # the new values where made, else the current ones
    for phase in (1, 2):
        for p in names:
            if plan.phase(p) == phase:
                new[p] = _update(plan, p, stats, values, reg, basis)
    return new


def _update(plan: Plan, p: str, stats: Statistics, values: Dict[str, torch.Tensor], reg: float,
            basis: str) -> torch.Tensor:
    """One parameter's update: its numerator and denominator in its own layout (scattered sums, plus the
    Gaussian groups' contributions), the family's formula, then the maps back to the ``pyro.param``."""
    num, den = stats.sums.get(f"{p}.num"), stats.sums.get(f"{p}.den")
    if f"{p}.eye" in stats.sums:
        num = num + reg * stats.sums[f"{p}.eye"]
    for use in plan.uses[p]:
        group = plan.in_group(use)
        if group is None:
            continue
        n, s, m = (stats.sums[f"{group.key}.{k}"] for k in "NSM")
        c = stats.centres[group.key]
        if use is group.loc:  # mu_j = (S_j + N_j c) / N_j
            cell_num, cell_den = GaussianSums.mean(n, s, c)
            cell_den = cell_den.unsqueeze(-1) if cell_num.dim() > cell_den.dim() else cell_den
            if use.weighted:  # a Normal prior: weighted by 1 / sigma_j^2 at the current sigma (ECM)
                precision = group.scale.selection.forward(values[group.scale.param]).to(cell_num.dtype) ** -2
                cell_num, cell_den = cell_num * precision, cell_den * precision
        else:  # Sigma_j about the new mu_j
            mu = group.loc.selection.forward(values[group.loc.param])
            cell_num, cell_den = group.sums.covariance(n, s, m, c, mu, reg)
        shape, dtype = use.selection.shape, use.selection.tensor.dtype  # (sums read once here: no copies)
        num = _plus(num, use.selection.vjp(reduce_product([cell_num], shape, fresh=False).to(dtype), fresh=False))
        den = _plus(den, use.selection.vjp(reduce_product([cell_den], shape, fresh=False).to(dtype), fresh=False))
    for prior in plan.priors.get(p, []):  # MAP: the prior's pseudo-statistics
        if prior.family == "Normal":
            num, den = num + prior.weighted_mean, den + prior.precision
            continue
        extra_num, extra_den = prior.pseudo(basis)
        num = _plus(num, extra_num) if extra_num is not None else num
        den = _plus(den, extra_den) if extra_den is not None else den
        prior.check(num, den)
    return to_param(plan.uses[p][0], num, den, lambda: values[p])


def to_param(use: Use, num: torch.Tensor, den: Optional[torch.Tensor], old: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The family's formula on the summed statistics (the canonical parameter: probabilities, mean,
    covariance), then its map to the attribute (log, Cholesky, inverse, sqrt) and the inverse of the
    model's own maps (exp, softplus, ...), in the parameter's layout and dtype. An element with no
    posterior mass keeps its previous value, ``old()`` (read only when needed, or for a branch of a map)."""
    rule, dt = use.rule, num.dtype
    value, empty = rule.finish(num, den)  # empty: None where every component has posterior mass
    layout = matrix_layout(use.selection) if rule.kind == "covariance" else ""
    if layout == "whole" and empty is not None:  # an empty component's placeholder must be a valid covariance
        empty = empty.any(-1, keepdim=True).any(-2, keepdim=True).expand(value.shape)
        value = torch.where(empty, torch.eye(value.shape[-1], dtype=dt, device=value.device), value)
    value = to_attribute(rule.to_attr, value, diagonal=layout == "diagonal")
    for transform in use.selection.transforms:
        value = transform.inverse(value, old().to(dt))
    if empty is not None:
        value = torch.where(empty, old().to(dt), value)
    return value.to(use.selection.leaf_dtype).detach()


def _plus(a: Optional[torch.Tensor], b: torch.Tensor) -> torch.Tensor:
    return b if a is None else a + b


def _accumulate(sums: Dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    value = value.double() if value.is_floating_point() and value.dtype != torch.float64 else value
    sums[name] = value if name not in sums else sums[name] + value
