"""The M-step plan: which ``pyro.param`` gets which update, decided once per model and data shape.

A parameter gets a closed form when every place it enters the model (a :class:`Use`) is an
attribute of a supported family (:data:`ppl_em.families.RULES`) that selects it, possibly through
invertible maps (:mod:`ppl_em.selection`), and all its uses agree on the rule. The plan then

* groups each Gaussian site whose mean and covariance both have closed forms, so that one set of
  sums (N_j, S_j, M_j about a centre) serves both (:class:`GaussianGroup`);
* marks the scales whose location varies with the data point (``mu[z, group_i]``): their statistics
  need the new location, hence a second pass over the data;
* verifies each closed form once, on the first rows: the gradient of E_Q[log p(x, z; theta)] must
  vanish at it. A parameter that fails (a prior, another use, a map the rule misreads) falls back to
  the gradient M-step, and :meth:`Plan.explain` says why in a user's words.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import pyro.distributions as dist

from .families import GaussianSums, Rule, attributes, base, normal_centre, parts, rules_for, view
from .fast import broadcast_shape, centre, compact
from .selection import INDEX_MAP_ELEMENTS, Selection, selection_sources

__all__ = ["Use", "GaussianGroup", "Plan", "find_uses"]


@dataclass
class Use:
    """One place where a parameter enters the model: site, family rule, and its selection.

    ``stable``: the selection is the same for every chunk of the data (mu_z, not theta_{doc(i)}), so its
    index map is kept and reused; otherwise it is read again from each chunk's trace (``path`` says
    which of the rule's selections at the site it is: a ``cat`` of parameters has several).
    """

    site: str
    rule: Rule
    selection: Selection
    part: str = ""  # "emission": the observation distribution of a chain site (ppl_em.chains)
    path: int = 0
    stable: bool = True
    weighted: bool = False  # a location with a Normal prior: statistics weighted by the precision 1 / sigma^2

    @property
    def param(self) -> str:
        return self.selection.param

    @property
    def key(self) -> Tuple[str, str, str, int]:
        return self.site, self.part, self.rule.attr, self.path


def find_uses(site: dict, leaves: Dict[int, str]) -> Tuple[List[Use], Dict[str, str]]:
    """Every (attribute, parameter) pair of ``site`` that a closed-form rule can update; and, for the
    parameters met in an attribute that no rule can use, why (for :meth:`Plan.explain`)."""
    uses, why = [], {}
    for part, fn in parts(site["fn"]):
        fn = base(fn)
        for rule in rules_for(fn):
            found, reason = selection_sources(attributes(fn)[rule.attr], leaves)
            for path, selection in enumerate(found):
                uses.append(Use(site["name"], rule, selection, part, path))
            if not found and reason:
                for name in _params_in(attributes(fn)[rule.attr], leaves):
                    why.setdefault(name, f"{fn.__class__.__name__}.{rule.attr} at site {site['name']}: {reason}")
    return uses, why


def _params_in(tensor: torch.Tensor, leaves: Dict[int, str]) -> List[str]:
    """Names of the parameter leaves anywhere below ``tensor`` in its autograd graph."""
    if tensor.grad_fn is None:
        return [leaves[id(tensor)]] if id(tensor) in leaves else []
    seen, stack, names = set(), [tensor.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if type(node).__name__ == "AccumulateGrad" and id(node.variable) in leaves:
            names.append(leaves[id(node.variable)])
        stack.extend(n for n, _ in node.next_functions)
    return names


@dataclass
class GaussianGroup:
    """A Gaussian site (or a chain's Gaussian emissions) whose mean and covariance (variance) both have
    closed forms: its statistics are N, S, M per cell about ``centre`` (:class:`ppl_em.families.GaussianSums`)."""

    key: str
    loc: Use
    scale: Use
    centre: torch.Tensor
    cells: torch.Size
    sums: GaussianSums


@dataclass
class Plan:
    """Which update each parameter gets.

    Attributes
    ----------
    routes : dict of str to str
        ``"closed"`` or ``"gradient"`` per parameter, in model order.
    uses : dict of str to list of Use
        Where each closed-form parameter enters the model.
    groups : dict of str to GaussianGroup
        The Gaussian sites whose sums serve a mean and a covariance at once.
    second_pass : set of str
        Scale parameters whose statistics need the new location (a location that varies per data point).
    why : dict of str to str
        The route of each parameter in a user's words (:meth:`explain`).
    """

    routes: Dict[str, str]
    uses: Dict[str, List[Use]] = field(default_factory=dict)
    groups: Dict[str, GaussianGroup] = field(default_factory=dict)
    second_pass: set = field(default_factory=set)
    why: Dict[str, str] = field(default_factory=dict)
    shapes: Dict[str, tuple] = field(default_factory=dict)  # the parameters' shapes it was made for
    priors: Dict[str, list] = field(default_factory=dict)  # conjugate prior factors per parameter (ppl_em.priors)
    with_prior: set = field(default_factory=set)  # every parameter with a prior factor, conjugate or not
    start_gradient: Dict[str, float] = field(default_factory=dict)  # max |d E_Q[log p] / d u| at the first check
    rechecked: bool = False  # the closed forms were checked again where EM came to rest

    @property
    def closed(self) -> List[str]:
        return [p for p, how in self.routes.items() if how == "closed"]

    @property
    def gradient(self) -> List[str]:
        return [p for p, how in self.routes.items() if how == "gradient"]

    @property
    def needs_graph(self) -> bool:
        """Whether an E-step's trace must carry the autograd graph from the parameters: only to read the
        selections that change with the data (theta[doc_i]) again, chunk by chunk."""
        return any(not u.stable for p in self.closed for u in self.uses[p])

    def phase(self, p: str) -> int:
        return self.uses[p][0].rule.phase

    def in_group(self, use: Use) -> Optional[GaussianGroup]:
        """The Gaussian group whose sums give ``use``'s statistics, if any."""
        group = self.groups.get(_group_key(use))
        return group if group is not None and use in (group.loc, group.scale) else None

    def explain(self) -> Dict[str, str]:
        return dict(self.why)

    def fall_back(self, names: List[str], reason: str) -> None:
        """Send ``names`` to the gradient M-step, with the reason."""
        for p in names:
            self.routes[p] = "gradient"
            self.uses.pop(p, None)
            self.why[p] = f"gradient (L-BFGS on E_Q[log p(x, z; theta)]): {reason}"
            self.second_pass.discard(p)
        self.groups = {k: g for k, g in self.groups.items() if g.loc.param not in names and g.scale.param not in names}


def _group_key(use: Use) -> str:
    return use.site + (f"/{use.part}" if use.part else "")


def make_plan(names: List[str], trace, leaves: Dict[str, torch.Tensor], weights, mode: str,
              one_row_trace=None) -> Plan:
    """The routes for parameters ``names`` from one E-step's trace, before verification.

    ``mode``: "auto", "closed_form" or "gradient" (see :class:`ppl_em.EM`). ``one_row_trace`` (a trace
    of the model on one data row, with its leaves) tells stable selections from per-row ones.
    """
    by_id = {id(leaf): name for name, leaf in leaves.items()}
    found: Dict[str, List[Use]] = {}
    unusable: Dict[str, str] = {}
    for site in _sites(trace):
        uses, why = find_uses(site, by_id)
        for use in uses:
            found.setdefault(use.param, []).append(use)
        for name, reason in why.items():
            unusable.setdefault(name, reason)
    plan = Plan(routes={p: "gradient" for p in names})
    for p in names:
        reason = _closed_form_problem(p, found.get(p, []), unusable.get(p))
        if mode == "gradient":
            reason = "m_step='gradient' was asked for"
        if reason:
            plan.why[p] = f"gradient (L-BFGS on E_Q[log p(x, z; theta)]): {reason}"
        else:
            plan.routes[p], plan.uses[p] = "closed", found[p]
    _mark_stable(plan, trace, one_row_trace)
    for use in (u for p in plan.closed for u in plan.uses[p] if u.stable):
        if use.selection.shape.numel() <= INDEX_MAP_ELEMENTS:
            use.selection.index_map()  # S^T by torch calls, which a recorded step replays (ppl_em.fast.tape)
    _attach_priors(plan, trace, leaves)
    _make_groups(plan, trace, weights)
    for p in plan.closed:
        plan.why[p] = describe(plan, p)
    return plan


def relation(use: Use) -> str:
    """How the parameter maps to its family's canonical parameter: "identity" (phi, mu, sigma^2 or Sigma
    itself), "reciprocal" (a precision), or "other" (a scale, a Cholesky factor, a log-scale)."""
    maps = tuple(t.name if t.name != "pow" else f"pow{t.arg:g}" for t in use.selection.transforms)
    to_attr = use.rule.to_attr
    if (to_attr, maps) in ((None, ()), ("log", ("log",)), ("logit", ("sigmoid",)), ("sqrt", ("sqrt",))):
        return "identity" if use.rule.kind != "covariance" or use.rule.attr == "covariance_matrix" else "other"
    if (to_attr, maps) in (("inverse", ()), ("sqrt", ("rsqrt",)), ("sqrt", ("pow-0.5",))):
        return "reciprocal"
    return "other"


def _attach_priors(plan: Plan, trace, leaves) -> None:
    """Conjugate prior factors add pseudo-statistics (:mod:`ppl_em.priors`); a parameter with a prior that is
    not conjugate to its likelihood keeps the gradient M-step, and ``explain()`` says why."""
    from .priors import find_priors

    kinds = {p: (plan.uses[p][0].rule.canonical, relation(plan.uses[p][0])) for p in plan.closed}
    priors, not_conjugate, plan.with_prior = find_priors(trace, leaves, kinds)
    for p, reason in not_conjugate.items():
        if p in plan.routes and plan.routes[p] == "closed":
            plan.fall_back([p], reason)
    for p, found in priors.items():
        if p not in plan.uses:
            continue
        if any(f.family == "Normal" for f in found) and plan.uses[p][0].rule.family is not dist.Normal:
            plan.fall_back([p], f"a Normal prior on a {plan.uses[p][0].rule.family.__name__}'s location has no "
                                "closed form here")
            continue
        plan.priors[p] = found
        for use in plan.uses[p]:
            use.weighted = any(f.family == "Normal" for f in found)


def _closed_form_problem(p: str, uses: List[Use], unusable: Optional[str]) -> str:
    """Why parameter ``p`` has no closed form ('' if it has one, pending verification)."""
    if unusable:
        return unusable
    if not uses:
        return "it enters no attribute of a family with a closed-form update"
    kinds = {(u.rule.family, u.rule.kind, u.rule.to_attr, tuple(u.selection.transforms)) for u in uses}
    if len(kinds) > 1:
        return "it is used in several ways (" + ", ".join(sorted({f"{u.rule.family.__name__}.{u.rule.attr}"
                                                                    for u in uses})) + ")"
    rule = uses[0].rule
    for use in uses:
        problem = _layout_problem(use)
        if problem:
            return problem
    if rule.to_attr in ("cholesky", "inverse") and any(t.matrix for t in uses[0].selection.transforms):
        return "it passes through two matrix maps"
    return ""


def _layout_problem(use: Use) -> str:
    """For a rule whose map to the attribute is per matrix (Cholesky, inverse), the selection must move
    whole matrices or only diagonal entries (a diagonal or spherical covariance)."""
    matrix = use.rule.to_attr in ("cholesky", "inverse") or any(t.matrix for t in use.selection.transforms)
    if not matrix or matrix_layout(use.selection) != "mixed":
        return ""
    return (f"{use.rule.family.__name__}.{use.rule.attr} at site {use.site} selects parts of matrices, "
            "so its map from the covariance is not elementwise")


def matrix_layout(selection: Selection) -> str:
    """How a selection into (..., d, d) matrices places the parameter's elements: ``"whole"`` (each cell's
    matrix is one parameter matrix, in order), ``"diagonal"`` (only diagonal entries, e.g. diag_embed or a
    spherical sigma^2 I) or ``"mixed"``."""
    cached = getattr(selection, "_layout", None)
    if cached is not None:
        return cached
    selection._layout = _layout(selection.index_map(), selection)
    return selection._layout


def _layout(index: torch.Tensor, selection: Selection) -> str:
    d = index.shape[-1]
    eye = torch.eye(d, dtype=torch.bool, device=index.device)
    valid = index >= 0
    if bool((valid <= eye).all()):
        return "diagonal"
    position = torch.arange(d * d, device=index.device).reshape(d, d)
    if selection.leaf_shape[-2:] == (d, d) and bool(valid.all()) and bool((index % (d * d) == position).all()):
        return "whole"
    return "mixed"


def _sites(trace) -> List[dict]:
    return [s for s in trace.nodes.values() if s["type"] == "sample" and not s["infer"].get("_map_site")]


def _mark_stable(plan: Plan, trace, one_row) -> None:
    """A use is stable when its selection's shape is the same on one data row as on the plan's rows."""
    if one_row is None:
        return
    row_trace, row_leaves = one_row
    by_id = {id(leaf): name for name, leaf in row_leaves.items()}
    shapes = {}
    for site in _sites(row_trace):
        for use in find_uses(site, by_id)[0]:
            shapes[use.key] = use.selection.shape
    for p in plan.closed:
        for use in plan.uses[p]:
            use.stable = shapes.get(use.key) == use.selection.shape


def _make_groups(plan: Plan, trace, weights) -> None:
    """Gaussian sites whose mean and covariance are both closed form, with a stable mean: one set of sums."""
    by_site: Dict[str, Dict[str, Use]] = {}
    for p in plan.closed:
        for use in plan.uses[p]:
            if use.rule.gaussian:
                by_site.setdefault(_group_key(use), {})[use.rule.kind] = use
    for key, kinds in by_site.items():
        loc = kinds.get("loc")
        scale = kinds.get("covariance") or kinds.get("variance")
        if scale is None or loc is None:
            continue
        if not loc.stable or not scale.stable:
            # a location per data point, or a scale read again from each chunk: the scale's sums about the
            # new location come from a second pass over the data
            plan.second_pass.add(scale.param)
            continue
        site = trace.nodes[loc.site]
        fn, x, w = view(site, weights[loc.site], loc.part)
        elementwise = loc.rule.kind == "loc" and scale.rule.kind == "variance"
        cells = _cells(loc, scale, elementwise)
        if elementwise and _shared_across(loc.selection.shape, cells):
            # one location for cells of different scales (a scale mixture): sum w x / sigma^2 over sum w / sigma^2
            loc.weighted = True
        c = normal_centre(x, cells) if elementwise else centre(compact(x).reshape(-1, x.shape[-1]))
        plan.groups[key] = GaussianGroup(key, loc, scale, c, cells, GaussianSums(elementwise))


def _shared_across(shape, cells) -> bool:
    """Whether a selection of ``shape`` is broadcast over some dimension along which ``cells`` vary."""
    shape = (1,) * (len(cells) - len(shape)) + tuple(shape)
    return any(a == 1 and b > 1 for a, b in zip(shape, cells))


def _cells(loc: Use, scale: Use, elementwise: bool) -> torch.Size:
    """The cells a Gaussian group's sums are kept per: the broadcast of the mean's and covariance's batch shapes."""
    if elementwise:
        return broadcast_shape(loc.selection.shape, scale.selection.shape)
    return broadcast_shape(loc.selection.shape[:-1], scale.selection.shape[:-2])


def describe(plan: Plan, p: str) -> str:
    """'closed form: MultivariateNormal.scale_tril at site obs, via Cholesky' and the like: the family's
    attribute, the sites, and how the parameter is written (logits, a Cholesky factor, exp of a log-scale)."""
    use = plan.uses[p][0]
    maps = [t.name for t in use.selection.transforms]
    via = []
    if use.rule.to_attr in ("log", "logit") and maps[:1] == [{"log": "log", "logit": "sigmoid"}[use.rule.to_attr]]:
        maps = maps[1:]  # logits = log(phi) of a parameter on the simplex: the canonical parameter itself
    elif use.rule.to_attr in ("cholesky", "inverse"):
        diagonal = use.rule.kind == "covariance" and matrix_layout(use.selection) == "diagonal"
        via.append({"cholesky": "square root of the diagonal" if diagonal else "Cholesky",
                    "inverse": "reciprocal of the diagonal" if diagonal else "inverse"}[use.rule.to_attr])
    via += [t.describe() for t in use.selection.transforms if t.name in maps]
    sites = sorted({u.site for u in plan.uses[p]}, key=lambda s: [u.site for u in plan.uses[p]].index(s))
    where = (f"site {sites[0]}" if len(sites) == 1 else f"sites {sites[0]} and {sites[1]}" if len(sites) == 2
             else f"sites {sites[0]}, ..., {sites[-1]} ({len(sites)})")
    text = f"closed form: {use.rule.family.__name__}.{use.rule.attr} at {where}"
    if via:
        text += ", via " + " of ".join(via)
    for prior in plan.priors.get(p, []):
        text += f", MAP with the conjugate {prior.family} prior at site {prior.site}"
    if p in plan.second_pass:
        text += " (a second pass over the data: its location varies with the data point)"
    return text
