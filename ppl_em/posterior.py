"""The exact E-step: log p(x; theta) and the posterior Q(z) = p(z | x; theta) of every factor.

A Pyro model is run once under parallel enumeration, so that every discrete local latent
z^(i) takes all of its values at once along a dimension of its own. The joint
log p(x, z; theta) is then a sum of factors, one per sample site, and

    log p(x; theta) = log sum_z exp( sum_s log p_s(x, z; theta) )

is computed by variable elimination (Pyro's ``contract_to_tensor``, the same routine
``TraceEnum_ELBO`` uses). To read the posterior off that computation we add a zero
"probe" tensor to the log-probability of each site. Because log p(x) is a log-sum-exp,

    d log p(x) / d probe_s = p(configuration of site s's latents | x; theta),

so one backward pass yields every factor's posterior marginal: the responsibilities
w_j^(i) of a mixture, the pairwise p(z_{t-1}, z_t | x) of an HMM, the joint posterior of
two latents that one site depends on. Replacing log-sum-exp by max (Pyro's ``MapRing``)
turns the same gradient into the one-hot indicator of the posterior mode: hard EM.

A ``DiscreteHMM`` site integrates a whole chain of hidden states inside its log-probability.
Its term is computed by :mod:`ppl_em.chains` from three tables of log-potentials (initial,
transition, emission) that stand in as the chain's probes: the gradient of log p(x) with
respect to them is the chain's posterior (pairwise and per state), and the chain's term
combines with every other site of the model as any factor does.

References: lecture notes on EM (E-step w_j^(i) := p(z^(i) = j | x^(i); phi, mu, Sigma));
Obermeyer et al., "Tensor Variable Elimination for Plated Factor Graphs", ICML 2019;
Eisner, "Inside-Outside and Forward-Backward Algorithms Are Just Backprop", 2016.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
from pyro.infer import config_enumerate
from pyro.distributions.util import scale_and_mask
from pyro.ops import packed
from pyro.ops.contract import contract_to_tensor
from pyro.ops.rings import LogRing, MapRing
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import SubsampleMessenger
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import prune_subsample_sites

from . import chains
from .fast import (GaussianFeatures, Replay, Workspace, broadcast_shape, compact, diag_features, has_gemm_path,
                   log_prob as fast_log_prob, map_blocks, mvn_features, new_table, normalise_exp, normalise_mode,
                   scratch)
from .chains import ChainTerms

__all__ = ["Posterior", "FusedSums", "ModelStructure", "exact_posterior", "trace_model", "log_joint_terms"]


class ExactInferenceError(ValueError):
    """The model has a latent site that exact enumeration cannot integrate out."""


class _LeafParams(Messenger):
    """Hands the model a fresh leaf tensor for every ``pyro.param`` value, kept in ``leaves``.

    The M-step differentiates distribution parameters with respect to these leaves to find
    which parameter elements each site uses (see :mod:`ppl_em.families`). With ``grad=False`` they
    are detached copies without a graph: the roots of a replay's recording (:mod:`ppl_em.fast.replay`).
    """

    def __init__(self, grad: bool = True, leaves: Optional[Dict[str, torch.Tensor]] = None) -> None:
        super().__init__()
        self.grad = grad
        self.leaves: Dict[str, torch.Tensor] = {} if leaves is None else leaves

    def _pyro_post_param(self, msg: dict) -> None:
        name = msg["name"]
        if name not in self.leaves:
            self.leaves[name] = _leaf(msg["value"], self.grad)
        msg["value"] = self.leaves[name]


def _leaf(value: torch.Tensor, grad: bool) -> torch.Tensor:
    return value.detach().requires_grad_() if grad else value.detach().clone()


class _PointEstimate(Messenger):
    """Replaces each global latent site by a point value theta stored as a ``pyro.param``.

    This is MAP-EM: the site becomes an observed factor log p(theta), as ``AutoDelta`` does
    for SVI. The value lives in the param store under the site's own name; when the store
    has none, it starts from a draw from the prior.
    """

    def __init__(self, names: Tuple[str, ...], leaves: Optional[Dict[str, torch.Tensor]] = None,
                 grad: bool = True) -> None:
        super().__init__()
        self.names = names
        # With a dict, the values are fresh leaves like _LeafParams' (with grad=False, detached copies).
        self.leaves, self.grad = leaves, grad

    def _pyro_sample(self, msg: dict) -> None:
        if msg["name"] not in self.names or msg["is_observed"]:
            return
        fn, name = msg["fn"], msg["name"]
        store = pyro.get_param_store()
        # Read the store directly: a param message named like the sample site would clash in traces.
        if name not in store:
            store.setdefault(name, fn.sample().detach(), constraint=fn.support)
        value = store[name]
        if self.leaves is not None:
            if name not in self.leaves:
                self.leaves[name] = _leaf(value, self.grad)
            value = self.leaves[name]
        msg["value"] = value
        msg["is_observed"] = True
        msg["infer"] = dict(msg["infer"], _map_site=True)


@contextlib.contextmanager
def full_plates():
    """Every ``pyro.plate`` runs in full: a subsampled plate (``subsample_size``, the ``batch_size`` of
    Pyro's examples) takes all of its rows, with scale 1.

    EM's E-step sums over every row and its M-step is exact on the whole data; a step goes through
    large data in chunks by itself (:mod:`ppl_em.chunking`). A subsample is SVI's way to an unbiased
    gradient, and has no place in an exact step. Only a plate given explicit ``subsample`` indices
    keeps them (they choose the data, as an argument would).
    """
    original = SubsampleMessenger.__dict__["_subsample"]

    def full(name, size=None, subsample_size=None, subsample=None, use_cuda=None, device=None):
        if size is not None and subsample is None:
            subsample_size = size
        return original.__func__(name, size, subsample_size, subsample, use_cuda, device)

    SubsampleMessenger._subsample = staticmethod(full)
    try:
        yield
    finally:
        SubsampleMessenger._subsample = original


@dataclass(frozen=True)
class ModelStructure:
    """What a first look at the model tells the engine.

    Attributes
    ----------
    max_plate_nesting : int
        Number of batch dimensions reserved for plates; enumeration uses the ones left of them.
    map_sites : tuple of str
        Global continuous latent sites, point-estimated (MAP-EM).
    """

    max_plate_nesting: int
    map_sites: Tuple[str, ...]


_MAX_PLATES = 8  # nested plates a model may have; enumeration dims go left of them


def enumerated(model: Callable) -> Callable:
    """``model`` under parallel enumeration of every discrete latent, whose dimensions go left of
    ``_MAX_PLATES`` plate dimensions: a discrete z^(i) is a (k, 1, ...) tensor rather than n draws that
    would select n copies of every parameter (an (n, d, d) Sigma_z for a GMM). For a look at a model
    before its structure is known (afterwards :func:`trace_model` enumerates from its plates)."""
    return poutine.enum(config_enumerate(model, default="parallel"), first_available_dim=-_MAX_PLATES - 1)


def inspect_model(model: Callable, args: tuple, kwargs: dict) -> ModelStructure:
    """Classify the model's latent sites; raise if one cannot be handled by exact EM."""
    enum_model = enumerated(model)
    with poutine.block(), full_plates():
        tr = poutine.trace(enum_model).get_trace(*args, **kwargs)
    tr = prune_subsample_sites(tr)
    sites = [s for s in tr.nodes.values() if s["type"] == "sample"]
    # Observed data, not a prior factor on a parameter (pyro.sample("prior", Beta(a, b), obs=p)).
    observed = [frozenset(f.name for f in s["cond_indep_stack"]) for s in sites
                if s["is_observed"] and not (torch.is_tensor(s["value"]) and s["value"].requires_grad)]
    map_sites = []
    for site in sites:
        if site["is_observed"] or site["fn"].has_enumerate_support:
            continue
        local = _local_plates(frozenset(f.name for f in site["cond_indep_stack"]), observed)
        if local:
            raise ExactInferenceError(
                f"Site '{site['name']}' is a continuous latent variable inside the data plate "
                f"{sorted(local)}, so p(z | x; theta) has no exact E-step by enumeration. "
                "Fit this model with SVI (ppl_em.fit(model, ..., method='svi')) or with an "
                "amortized guide (method='vae', ppl_em.guides.AutoAmortized)."
            )
        map_sites.append(site["name"])
    nesting = max([len([f for f in s["cond_indep_stack"] if f.vectorized]) for s in sites] + [0])
    return ModelStructure(max_plate_nesting=nesting, map_sites=tuple(map_sites))


def _local_plates(plates: frozenset, observed: List[frozenset]) -> frozenset:
    """The plates that make a continuous latent local: one copy per observation, as a VAE's z^(i).

    A latent is local when it shares a plate with an observed site whose every plate it also lies in:
    each copy then sees the observations of one index alone. A Dirichlet per (feature, component) in a
    feature plate that the data share is not: each copy is informed by every data point, and is a
    global point-estimated by MAP-EM."""
    for obs in observed:
        if plates & obs and obs <= plates:
            return plates & obs
    return frozenset()


def trace_model(
    model: Callable,
    structure: ModelStructure,
    args: tuple,
    kwargs: dict,
    leaf_params: bool = True,
    log_prob: str = "grad",
    workspace: Optional[Workspace] = None,
    graph: bool = True,
    replay: Optional[Replay] = None,
    defer: bool = False,
    chain_semiring: str = "sum",
) -> Tuple[Trace, Dict[str, torch.Tensor]]:
    """Run the model once under parallel enumeration.

    Returns the trace and, when ``leaf_params``, the detached leaf tensors that stood in for
    each ``pyro.param`` value during the run (otherwise parameters stay attached to the param
    store, for gradient steps). ``log_prob`` says whether the sites' log-probabilities are
    computed and their tensors packed: ``"grad"`` (differentiable in the parameters),
    ``"value"`` (values only: the E-step needs no parameter gradient of log p, which saves
    the memory of its autograd graph) or ``"none"`` (distributions and values only).
    A chain site (``DiscreteHMM``) also gets ``site["chain_terms"]``, its tables of
    log-potentials (:class:`ppl_em.chains.ChainTerms`); with ``"value"`` they are fresh leaves
    that its log-probability is differentiable in (the E-step's probes). The leaves include the
    values of point-estimated global latents, under their site names. ``workspace`` lends the fast
    paths their chunk-sized tables. ``replay`` (:class:`ppl_em.fast.Replay`) replays the model's run instead of
    running it, where no parameter leaves and no graph are asked for. ``defer`` (with ``"value"``) leaves a
    (full or diagonal) Gaussian's log-density table to the posterior's pass over the rows
    (``site["_features"]``, a :class:`ppl_em.fast.GaussianFeatures` or :class:`ppl_em.fast.DiagonalFeatures`;
    see :func:`exact_posterior`), where no site is masked. ``chain_semiring="max"``: a chain site's log-probability
    is max_w log p(x, w) instead of log p(x) (``site["chain_semiring"]`` says which), for hard EM's E-step alone.
    """
    if replay is not None and not leaf_params and not (graph and torch.is_grad_enabled()):
        tr = replay.trace(lambda roots: _run_model(model, structure, args, kwargs, _LeafParams(False, roots), False),
                          args, kwargs)
        leaves = {}
    else:
        handler = _LeafParams() if leaf_params else poutine.messenger.Messenger()
        tr = _run_model(model, structure, args, kwargs, handler, graph)
        leaves = getattr(handler, "leaves", {})
    if log_prob != "none":
        with torch.set_grad_enabled(log_prob == "grad" and torch.is_grad_enabled()):
            _compute_log_prob(tr, probes=log_prob == "value", workspace=workspace, defer=defer and log_prob == "value",
                              chain_semiring=chain_semiring)
        tr.pack_tensors()
        mark_connected(tr)
    return tr, leaves


def _run_model(model: Callable, structure: ModelStructure, args: tuple, kwargs: dict, params: Messenger,
               graph: bool) -> Trace:
    """One run of the model under parallel enumeration, ``params`` (a :class:`_LeafParams`, or a plain
    Messenger: the param store's own values) around its ``pyro.param`` calls; subsample sites pruned."""
    leaves = getattr(params, "leaves", None)
    point = _PointEstimate(structure.map_sites, leaves, grad=getattr(params, "grad", True))
    enum_model = poutine.enum(
        config_enumerate(point(model), default="parallel"),
        first_available_dim=-1 - structure.max_plate_nesting,
    )
    with params, full_plates(), torch.set_grad_enabled(graph and torch.is_grad_enabled()):
        tr = poutine.trace(enum_model).get_trace(*args, **kwargs)
    return prune_subsample_sites(tr)


def _compute_log_prob(tr: Trace, probes: bool = False, workspace: Optional[Workspace] = None,
                      defer: bool = False, chain_semiring: str = "sum") -> None:
    """``Trace.compute_log_prob``, with the fast paths of :func:`ppl_em.fast.log_prob` and
    :mod:`ppl_em.chains` (with ``probes``, a chain's tables become leaves it is differentiable in).
    ``defer``, ``chain_semiring``: see :func:`trace_model`."""
    sites = sample_sites(tr)
    defer = defer and all(s["mask"] is None or s["mask"] is True for s in sites)  # mark_connected reads every table
    for site in sites:
        if "log_prob" not in site and not site["args"] and not site["kwargs"]:
            if chains.is_chain(site["fn"]):
                log_p = _chain_log_prob(site, probes, chain_semiring)
            else:
                deferrable = defer and site["is_observed"] and not site["infer"].get("_map_site")  # data, not theta
                features = _deferred_features(site["fn"], site["value"]) if deferrable else None
                if features is not None:
                    site["_features"] = features
                    continue
                log_p = fast_log_prob(site["fn"], site["value"], workspace)
                if not torch.is_grad_enabled():  # Pyro's Categorical returns a view of its (graph-carrying) logits
                    log_p = log_p.detach()
            _set_log_prob(site, log_p, probes)
    tr.compute_log_prob(lambda name, site: "_features" not in site)  # whatever is left (sites with extra log_prob arguments)


def _deferred_features(fn, value):
    """The GEMM form of a (full or diagonal) Gaussian's log-density table, for the posterior's pass; or None."""
    if type(fn) is dist.MultivariateNormal:
        return mvn_features(fn, value)
    if has_gemm_path(fn) and type(fn) is dist.Independent:
        return diag_features(fn.base_dist, value)
    return None


def _set_log_prob(site: dict, log_p: torch.Tensor, probes: bool = True, tr: Optional[Trace] = None) -> None:
    """A site's log-probability entries; with ``tr``, packed as ``Trace.pack_tensors`` packs them."""
    site["unscaled_log_prob"] = log_p
    site["log_prob"] = scale_and_mask(log_p, site["scale"], site["mask"])
    if not probes:  # an E-step's trace never reads it (Trace.log_prob_sum recomputes it on demand)
        site["log_prob_sum"] = site["log_prob"].sum()
    if tr is not None:
        symbols = site["infer"]["_dim_to_symbol"]
        site["packed"].update(log_prob=packed.pack(site["log_prob"], symbols),
                              unscaled_log_prob=packed.pack(log_p, symbols))


def _materialise(tr: Trace, workspace: Optional[Workspace] = None) -> None:
    """The log-density tables that :func:`trace_model` deferred (``defer``) and no fused pass took, computed
    on their own, for every other use of the trace."""
    for site in sample_sites(tr):
        if site.pop("_features", None) is not None:
            _set_log_prob(site, fast_log_prob(site["fn"], site["value"], workspace), tr=tr)


def _chain_log_prob(site: dict, probes: bool, semiring: str = "sum") -> torch.Tensor:
    terms = chains.chain_terms(site["fn"], site["value"], fast_log_prob)
    if probes:
        terms = ChainTerms(*(t.detach().requires_grad_() for t in terms.tensors()))
    site["chain_terms"], site["chain_semiring"] = terms, semiring
    with torch.set_grad_enabled(probes or torch.is_grad_enabled()):
        return chains.log_evidence(*terms.tensors(), semiring=semiring)


def sample_sites(tr: Trace) -> List[dict]:
    return [s for s in tr.nodes.values() if s["type"] == "sample"]


def masked_log_prob(site: dict, probe: Optional[torch.Tensor] = None, fill: float = 0.0) -> torch.Tensor:
    """log p_s (+ ``probe``) in Pyro's unpacked layout, ``fill`` where the site is masked; ignores
    poutine.scale. The probe is masked too, so a masked position gets no posterior weight.

    An enumerated latent keeps its log-probability under a mask, as ``TraceEnum_ELBO`` scores it
    (:func:`factor`): there ``fill`` applies only where nothing else depends on the latent."""
    lp = site["unscaled_log_prob"] if probe is None else site["unscaled_log_prob"] + probe
    mask = _mask(site, lp)
    if mask is None:
        return lp
    return lp.masked_fill(~mask, fill)


def _mask(site: dict, lp: torch.Tensor) -> Optional[torch.Tensor]:
    """Where the site's factor counts: its poutine.mask, widened for an enumerated latent to every
    position where another factor depends on its value (``site["_connected"]``, see :func:`mark_connected`)."""
    mask = site["mask"]
    if mask is None or mask is True:
        return None
    mask = torch.as_tensor(mask, device=lp.device)
    connected = site.get("_connected")
    return mask if connected is None else mask | connected


def mark_connected(tr: Trace) -> None:
    """For each masked enumerated latent, where another factor depends on its value (``site["_connected"]``).

    Pyro's ``TraceEnum_ELBO`` ignores a mask on an enumerated site: its factor p(z | parents) stays.
    Where no other factor varies with z (Pyro's ``obs_mask`` splits z into z_observed and a masked
    z_unobserved that nothing sees where the label is observed; the padded steps of a chain), summing
    z out multiplies p(x) by sum_z p(z | parents) = 1, and EM on the model without that placeholder is
    the same, exactly: the factor is dropped there. Where another factor depends on z, it stays, in
    log p(x) and in the M-step. Dropped factors can only be reconnected by others, so the marking is
    repeated until it no longer changes. Call after ``pack_tensors`` (it reads the enumeration symbols).
    """
    masked = [s for s in sample_sites(tr) if s["infer"].get("_enumerate_dim") is not None
              and s["mask"] is not None and s["mask"] is not True]
    if not masked:
        return
    readers = {}
    for other in sample_sites(tr):
        for symbol in other["packed"]["log_prob"]._pyro_dims:
            readers.setdefault(symbol, []).append(other)
    for site in masked:
        site["_connected"] = None
    changed = True
    while changed:
        changed = False
        for site in masked:
            connected = _connected(site, readers.get(site["infer"]["_enumerate_symbol"], []))
            old = site["_connected"]
            if (old is None) != (connected is None) or (old is not None and not torch.equal(old, connected)):
                site["_connected"], changed = connected, True


def _connected(site: dict, readers: List[dict]) -> Optional[torch.Tensor]:
    """Positions (in ``site``'s log-probability layout) where a factor of ``readers`` varies with the site's value."""
    dim, lp = site["infer"]["_enumerate_dim"], site["unscaled_log_prob"]
    connected = None
    for other in readers:
        if other is site:
            continue
        olp = masked_log_prob(other)
        if olp.dim() < -dim or olp.shape[dim] == 1:
            continue
        varies = olp.amax(dim, keepdim=True) != olp.amin(dim, keepdim=True)
        extra = [d for d in range(-varies.dim(), 0) if varies.shape[d] > 1 and (-d > lp.dim() or lp.shape[d] == 1)]
        if extra:
            varies = varies.any(dim=extra, keepdim=True)
        varies = varies.reshape(varies.shape[max(0, varies.dim() - lp.dim()):]).expand(lp.shape)
        connected = varies if connected is None else connected | varies
    return connected if connected is not None and bool(connected.any()) else None


def _masked_fill_value(site: dict, ring) -> float:
    """What a masked position of a site contributes where its factor is dropped: 0, except -log(number of
    values) for an enumerated latent under log-sum-exp, so that summing it out multiplies p(x) by 1
    (under max, hard EM, 0 is right)."""
    dim = site["infer"].get("_enumerate_dim")
    if dim is None or isinstance(ring, MapRing):
        return 0.0
    return -math.log(site["value"].shape[dim])


def expected_log_prob(site: dict, weights) -> torch.Tensor:
    """E_Q[log p_s]: a site's weights times its log-probability, summed; for a chain site, each
    table of its posterior times the matching log-potentials (the states inside it are latent too).
    0 log 0 = 0: a position of no weight (masked) adds nothing, even where its log-probability is -inf."""
    if isinstance(weights, ChainTerms):
        return chains.expected_log_potential(site["chain_terms"], weights)
    lp = masked_log_prob(site)
    return torch.where(weights == 0, torch.zeros((), dtype=lp.dtype), weights * lp).sum()


def log_joint_terms(tr: Trace) -> Dict[str, torch.Tensor]:
    """Every site's masked log-probability, keyed by site name (unpacked layout)."""
    return {s["name"]: masked_log_prob(s) for s in sample_sites(tr)}


def _common_scale(tr: Trace) -> float:
    scales = {float(s["scale"]) for s in sample_sites(tr)}
    if len(scales) > 1:
        raise ValueError(
            f"Expected all sample sites to share one poutine.scale, found {sorted(scales)}. "
            "EM uses the full data set at every step; remove per-site scaling."
        )
    return scales.pop() if scales else 1.0


def _ordinal(tr: Trace, site: dict) -> frozenset:
    return frozenset(tr.plate_to_symbol[f.name] for f in site["cond_indep_stack"] if f.vectorized)


def _contract(tr: Trace, probes: Dict[str, torch.Tensor], ring) -> torch.Tensor:
    """sum over plates of log sum_z exp(sum of factors) (or max_z with ``MapRing``)."""
    tree: "OrderedDict[frozenset, List[torch.Tensor]]" = OrderedDict()
    sum_dims = set()
    for site in sample_sites(tr):
        if site["infer"].get("_map_site"):
            continue
        probe = probes[site["name"]]
        semiring = site.get("chain_semiring", "sum") if "chain_terms" in site else None
        if semiring == "sum" and isinstance(ring, MapRing):  # the chain's best path, not its sum
            site = dict(site, unscaled_log_prob=chains.log_evidence(*site["chain_terms"].tensors(), semiring="max"))
        elif semiring == "max" and not isinstance(ring, MapRing):
            raise ValueError(f"site {site['name']!r}: a chain traced for its best path has no log p(x)")
        log_p = masked_log_prob(site, probe, _masked_fill_value(site, ring))
        term = packed.pack(log_p, site["infer"]["_dim_to_symbol"])
        tree.setdefault(_ordinal(tr, site), []).append(term)
        if site["infer"].get("_enumerate_symbol") is not None:
            sum_dims.add(site["infer"]["_enumerate_symbol"])
    if not tree:
        return torch.zeros(())
    return contract_to_tensor(tree, sum_dims, target_ordinal=frozenset(), ring=ring)


def one_latent(tr: Trace) -> Optional[Tuple[List[dict], dict]]:
    """(the sites, the latent) where the trace has the structure of :func:`_one_latent_posterior` (one enumerated
    latent per data point, every site in the same plates, no chain): a mixture, whose E-step is a few passes
    over its (k, n) table; None for any other."""
    sites = [s for s in sample_sites(tr) if not s["infer"].get("_map_site")]
    latents = [s for s in sites if s["infer"].get("_enumerate_dim") is not None]
    if len(latents) != 1 or len({_ordinal(tr, s) for s in sites}) != 1 or any("chain_terms" in s for s in sites):
        return None
    return sites, latents[0]


def _one_latent_posterior(tr: Trace, scale: float, workspace: Optional[Workspace] = None, hard: bool = False,
                          tables: bool = True):
    """The probe gradients in closed form, for the commonest structure: one enumerated latent z^(i)
    per data point and every site in the same plates (a mixture). Then

        log p(x) = sum_i log sum_j exp(sum_s log p_s(x^(i), z^(i) = j)),
        w_j^(i) = exp(sum_s log p_s(x^(i), j) - log p(x^(i)))   (the responsibilities),

    which is what the general contraction and its backward pass compute, in a few passes over
    the (k, n) table instead of a log-einsum and autograd. ``hard`` (hard EM): w^(i) is instead the one-hot
    of z^(i)* = argmax_j sum_s log p_s(x^(i), j) (a tie to the first j, as the max-sum contraction's backward
    pass gives it) and the objective sum_i max_j sum_s log p_s(x^(i), j), from the same table. Returns
    (log p(x), the objective, the weights, the sums of a fused pass (see :func:`_fused_pass`)); None for any
    other structure (for ``hard``, also where the latent is masked: a masked position's fill differs between
    the two sums). ``tables``: see :func:`exact_posterior`.
    """
    found = one_latent(tr)
    if found is None:
        return None
    sites, latent = found
    if hard and _mask(latent, latent["unscaled_log_prob"]) is not None:
        return None
    dim = latent["infer"]["_enumerate_dim"]
    fused = _fused_pass(tr, sites, dim, workspace, hard, tables)
    if fused is None:
        _materialise(tr, workspace)
        post, lse, best = _sum_and_normalise([masked_log_prob(s, fill=_masked_fill_value(s, LogRing())) for s in sites],
                                             dim, workspace, hard)
    else:
        post, lse, best = fused[:3]
    if scale != 1.0:
        post = post * scale
    weights = {s["name"]: torch.ones_like(masked_log_prob(s)) for s in sample_sites(tr) if s["infer"].get("_map_site")}
    for site in sites:
        term = masked_log_prob(site, fill=_masked_fill_value(site, LogRing()))
        w = post.sum_to_size(term.shape).to(term.dtype)
        # A masked position has no factor, so its probe has no gradient (see masked_log_prob).
        weights[site["name"]] = masked_log_prob(dict(site, unscaled_log_prob=w))
    sums = {}
    if fused is not None:
        name, features, n, packed_sums = fused[3:]
        n, s_c, m_c = features.moments(n * scale, packed_sums * scale)
        sums[name] = FusedSums(weights[name], features.c, n, s_c, m_c)
    total = lse.sum()
    objective = total if best is None else best.sum()
    if scale != 1.0:
        total, objective = total * scale, objective * scale
    return total, objective, weights, sums


@dataclass
class FusedSums:
    """A Gaussian site's weighted sums from the E-step's own pass over the rows (:func:`_fused_pass`):
    N_z = sum_i w_z^(i) (K,), S_z = sum_i w_z^(i) (x^(i) - c) (K, d), M_z = sum_i w_z^(i) (x^(i) - c)(x^(i) - c)^T
    (K, d, d) about the centre c (d,), with w = ``weights`` (K, N), the site's Q."""

    weights: torch.Tensor
    c: torch.Tensor
    n: torch.Tensor
    s: torch.Tensor
    m: torch.Tensor


def _fused_pass(tr: Trace, sites: List[dict], dim: int, workspace: Optional[Workspace], hard: bool = False,
                tables: bool = True):
    """Q(z), log p(x) and one Gaussian site's weighted sums in one pass over the rows, where
    :func:`trace_model` left that site's log-density table to the posterior (``defer``) and its table
    lays its K components along the enumerated ``dim`` and the rows after it, the other factors' tables
    either broadcast over the rows or lie like it (:meth:`ppl_em.fast.GaussianFeatures.posterior_sums`:
    the sufficient statistics T(x - c) of each block of rows serve the log-densities and the M-step's sums
    while in cache, where building them again for the sums costs a pass over the data).

    Returns (Q, log p(x^(i)) in the table's layout, max_z log p(x^(i), z) there for ``hard`` (Q one-hot at
    the mode; else None), the site's name, its GaussianFeatures, N, the packed sums), the site's
    log-probability entries filled; None where it does not apply.
    """
    deferred = [s for s in sites if "_features" in s]
    if len(deferred) != 1:
        return None
    site = deferred[0]
    features: GaussianFeatures = site["_features"]
    (k, rows), shape = features.shape, features.laid_out(torch.empty(features.shape, device="meta")).shape
    laid = torch.empty(shape, device="meta")
    if not shape or shape[dim] != k or k * rows != laid.numel() or laid.stride(dim) != rows:
        return None
    others = []
    for other in sites:
        if other is not site:
            table = _as_columns(masked_log_prob(other, fill=_masked_fill_value(other, LogRing())), shape, dim, k, rows)
            if table is None:
                return None
            others.append(table)
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in others], features.dtype)
    log_density = new_table(workspace, features.shape, features.dtype, features.c.device) if tables else None
    total = new_table(workspace, features.shape, dtype, features.c.device)
    best = torch.empty((1, rows), dtype=dtype, device=features.c.device) if hard else None
    out = features.posterior_sums(others, log_density, total, workspace, best)
    if out is None:
        return None
    lse, n, packed_sums = out
    del site["_features"]
    if log_density is None:  # a placeholder of the table's shape: NaN wherever it is read
        log_density = torch.full((), math.nan, dtype=features.dtype, device=features.c.device).expand(features.shape)
    _set_log_prob(site, features.laid_out(log_density), tr=tr)
    lse_shape = shape[:dim % len(shape)] + (1,) + shape[dim % len(shape) + 1:]
    best = None if best is None else best.reshape(lse_shape)
    return total.reshape(shape), lse.reshape(lse_shape), best, site["name"], features, n, packed_sums


def _as_columns(t: torch.Tensor, shape, dim: int, k: int, rows: int) -> Optional[torch.Tensor]:
    """A factor's table in the layout of a (k, rows) table laid out as ``shape`` (k along ``dim``): (k, rows);
    (1, rows) for a factor of each row that does not depend on z; a (k, 1) or (1, 1) column broadcast over
    the rows. None for any other."""
    if broadcast_shape(t.shape, shape) != shape:
        return None
    if t.shape == shape and t.is_contiguous():
        return t.reshape(k, rows)
    small = compact(t)
    sizes = (1,) * (len(shape) - small.dim()) + tuple(small.shape)
    if all(size == 1 for i, size in enumerate(sizes) if i != dim % len(shape)):
        return small.reshape(-1, 1)
    if sizes[dim % len(shape)] == 1 and small.numel() == rows and small.is_contiguous():
        return small.reshape(1, rows)
    return None


# Columns per block when the posterior table is summed and normalised: a block of about 2 MB stays in
# cache through its six passes (add, max, subtract, exp, sum, divide), where a whole chunk's table
# (tens of MB) would go to memory and back for each.
BLOCK_ELEMENTS = 2**18


def _sum_and_normalise(terms: List[torch.Tensor], dim: int, workspace: Optional[Workspace] = None,
                       hard: bool = False) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(Q, lse, None): the sites' log-probability tables summed (broadcast) into log p(x, z), then
    normalised along the enumerated ``dim`` (:func:`ppl_em.fast.normalise_exp`); for ``hard``, (the one-hot Q
    of each mode, lse, max_z log p(x, z)) (:func:`ppl_em.fast.normalise_mode`). The sum goes into a table of
    its own (from the streaming pass's :class:`ppl_em.fast.Workspace`), block by block
    of columns where the normalised dim is not the last; every column's arithmetic is the same either way.

    Densest term first: adding a broadcast (k, 1) table to a (k, n) one is several times faster
    that way round (torch vectorises along the first operand's layout), and the table takes the
    densest term's layout, as torch.add would.
    """
    def normalise(table: torch.Tensor, in_place: bool = False):
        if not hard:
            return normalise_exp(table, dim, in_place) + (None,)
        exps = scratch(workspace, "exponentials", table.shape, table.dtype, table.device) if in_place else None
        return normalise_mode(table, dim, in_place, exps)

    if len(terms) == 1:
        return normalise(terms[0])
    terms = sorted(terms, key=lambda t: -compact(t).numel())
    if any(t.requires_grad for t in terms) and torch.is_grad_enabled():
        return normalise(functools.reduce(torch.add, terms), in_place=not hard)  # (the one-hot: no graph)
    shape = functools.reduce(broadcast_shape, (t.shape for t in terms))
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in terms))
    stride = torch.empty_like(terms[0], device="meta").stride() if terms[0].shape == shape else None
    total = new_table(workspace, shape, dtype, terms[0].device, stride)
    n = shape[-1] if shape else 1
    step = max(1, BLOCK_ELEMENTS // max(1, total.numel() // max(1, n)))
    if dim % len(shape) == len(shape) - 1 or total.stride(-1) != 1 or step >= n:
        return normalise(_add_into(terms, total), in_place=True)
    lse = torch.empty(shape[:dim % len(shape)] + (1,) + shape[dim % len(shape) + 1:], dtype=dtype, device=total.device)
    best = torch.empty_like(lse) if hard else None

    def one(b: int) -> None:  # the blocks side by side on the workspace's threads (ppl_em.fast.Workspace.map)
        cols = slice(b * step, (b + 1) * step)
        block = _add_into([t[..., cols] if t.dim() and t.shape[-1] == n else t for t in terms], total[..., cols])
        _, lse[..., cols], top = normalise(block, in_place=True)
        if best is not None:
            best[..., cols] = top

    map_blocks(workspace, one, -(-n // step), total.device)
    return total, lse, best


def _add_into(terms: List[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    torch.add(terms[0], terms[1], out=out)
    for t in terms[2:]:
        out.add_(t)
    return out


@dataclass
class Posterior:
    """The result of an E-step: Q(z) = p(z | x; theta) for every factor of the model.

    Attributes
    ----------
    log_evidence : torch.Tensor
        Scalar log p(x; theta), every discrete latent summed out exactly.
    objective : torch.Tensor
        What the E-step's Q makes tight: log p(x; theta) for ``mode="exact"``,
        max_z log p(x, z; theta) for ``mode="hard"`` (classification EM).
    log_prior : torch.Tensor
        Scalar sum of log p(theta) over point-estimated global latent sites (0 if none).
    weights : dict of str to torch.Tensor
        For each sample site s, Q over the configurations of the latents its factor depends
        on, in the layout of that site's log-probability (Pyro's enumeration layout).
        For a mixture's observation site this is w_j^(i) with shape (k, n). For a chain site
        (``DiscreteHMM``), a :class:`ppl_em.chains.ChainTerms` of the chain's posterior tables,
        whose ``weight`` is that site-level Q (see :meth:`chain`).
    trace : pyro.poutine.Trace
        The enumerated model trace the posterior was computed from.
    mode : str
        ``"exact"`` or ``"hard"``.
    sums : dict of str to FusedSums
        For a Gaussian site whose log-densities, Q(z) and weighted sums were computed in one pass over
        the rows (see :func:`exact_posterior`'s ``fuse``), those sums; the M-step's statistics take them.
    """

    log_evidence: torch.Tensor
    objective: torch.Tensor
    log_prior: torch.Tensor
    weights: Dict[str, torch.Tensor]
    trace: Trace
    mode: str = "exact"
    leaves: Dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    sums: Dict[str, "FusedSums"] = field(default_factory=dict, repr=False)

    @property
    def enumerated_sites(self) -> List[str]:
        """Names of the discrete latent sites that were enumerated, in model order."""
        return [s["name"] for s in sample_sites(self.trace) if s["infer"].get("_enumerate_dim") is not None]

    def marginal(self, name: str) -> torch.Tensor:
        """Posterior probabilities of one enumerated site, shape ``plate_shape + (num_values,)``.

        For a mixture's z this is the matrix of responsibilities w_j^(i), shape (n, k). For a
        chain site (``DiscreteHMM``), p(w_t = j | x) of its hidden states, plate_shape + (T, K).
        """
        if isinstance(self.weights.get(name), ChainTerms):
            return self.chain(name)[0]
        site = self._enumerated(name)
        return self._factor_view(site, self.weights[name], [site["infer"]["_enumerate_dim"]])

    def joint(self, name: str) -> Tuple[torch.Tensor, List[str]]:
        """Posterior over all latents that site ``name``'s factor depends on.

        Returns the probabilities, shape ``plate_shape + (k_1, ..., k_m)``, and the names of
        those m latents in the order of the trailing dimensions. For an HMM's z_t this is
        p(z_{t-1}, z_t | x); for a site with two parents it is their joint posterior.
        """
        if name not in self.weights:
            raise KeyError(f"No sample site named '{name}'; sites are {list(self.weights)}.")
        site = self.trace.nodes[name]
        latents = self._factor_latents(site)
        dims = [s["infer"]["_enumerate_dim"] for s in latents]
        w = self.weights[name]
        w = w.weight if isinstance(w, ChainTerms) else w
        return self._factor_view(site, w, dims), [s["name"] for s in latents]

    def chain(self, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """The posterior of the hidden states inside a chain site (``DiscreteHMM``).

        Returns p(w_t = j | x), shape plate_shape + (T, K), and the posterior of consecutive
        states p(w_{t-1} = i, w_t = j | x) in the layout of the site's transition logits:
        (..., T, K, K) for one matrix per step; for a homogeneous (K, K) matrix, its sum over t
        (and over the batch): the expected transition counts.
        """
        w = self.weights.get(name)
        if not isinstance(w, ChainTerms):
            chained = [k for k, v in self.weights.items() if isinstance(v, ChainTerms)]
            raise KeyError(f"'{name}' is not a chain (DiscreteHMM) site; chain sites are {chained}.")
        site = self.trace.nodes[name]
        nplate = len([f for f in site["cond_indep_stack"] if f.vectorized])
        states = w.emission
        extra = states.dim() - 2 - nplate  # enumeration dimensions, left of the plates
        return (states.sum(tuple(range(extra))) if extra > 0 else states), w.transition

    # -- helpers -----------------------------------------------------------------------------
    def _nplate(self) -> int:
        dims = [s["infer"]["_enumerate_dim"] for s in sample_sites(self.trace)
                if s["infer"].get("_enumerate_dim") is not None]
        return -max(dims) - 1 if dims else max(
            [len([f for f in s["cond_indep_stack"] if f.vectorized]) for s in sample_sites(self.trace)] + [0])

    def _factor_view(self, site: dict, w: torch.Tensor, dims: List[int]) -> torch.Tensor:
        """Reorder Pyro's enumeration layout to ``own plate dims + latent value dims``.

        ``w`` has enumeration dims left of the plate dims; ``dims`` (negative) are the
        enumeration dims to keep, in order; every other enumeration dim is summed out.
        """
        nplate = self._nplate()
        depth = max([nplate] + [-d for d in dims])
        w = w.reshape((1,) * max(0, depth - w.dim()) + w.shape)
        plates = sorted(f.dim for f in site["cond_indep_stack"] if f.vectorized)
        keep = plates + dims
        drop = [d for d in range(-w.dim(), 0) if d not in keep]
        if drop:
            w = w.sum(drop, keepdim=True)
        w = w.permute([w.dim() + d for d in drop + keep])
        return w.reshape(w.shape[len(drop):])

    def _enumerated(self, name: str) -> dict:
        if name not in self.trace.nodes or self.trace.nodes[name]["type"] != "sample":
            raise KeyError(f"No sample site named '{name}'; enumerated sites are {self.enumerated_sites}.")
        site = self.trace.nodes[name]
        if site["infer"].get("_enumerate_dim") is None:
            raise KeyError(
                f"Site '{name}' is not an enumerated latent; marginal() takes one of "
                f"{self.enumerated_sites}. Use joint('{name}') for the posterior of its parents."
            )
        return site

    def _factor_latents(self, site: dict) -> List[dict]:
        """Enumerated sites whose symbols appear in ``site``'s packed log-probability, in model order."""
        symbols = set(site["packed"]["log_prob"]._pyro_dims)
        return [s for s in sample_sites(self.trace) if s["infer"].get("_enumerate_symbol") in symbols]


def differentiable_posterior(model: Callable, structure: ModelStructure, args: tuple, kwargs: dict,
                             mode: str = "exact") -> Optional[Tuple[Trace, "Posterior"]]:
    """One run of the model whose log-probabilities are differentiable in the param store's parameters, and
    Q(z) = p(z | x; theta) (``mode="hard"``: the one-hot of the mode) read from its (k, n) table without a
    graph: for a gradient of E_Q[log p(x, z; theta)] in theta at the Q of the same theta (EM's check at rest),
    one model run where :func:`exact_posterior` and :func:`ppl_em.gradient.expected_log_joint` take two. For a
    mixture (:func:`one_latent`); None for any other structure (its Q is a gradient of the trace's own terms)."""
    tr, _ = trace_model(model, structure, args, kwargs, leaf_params=False)
    with torch.no_grad():
        single = _one_latent_posterior(tr, _common_scale(tr), hard=mode == "hard")
    if single is None:
        return None
    log_z, objective, weights, sums = single
    return tr, Posterior(log_evidence=log_z, objective=objective, log_prior=_log_prior(sample_sites(tr)),
                         weights=weights, trace=tr, mode=mode, leaves={}, sums=sums)


def _log_prior(sites: List[dict]) -> torch.Tensor:
    """log p(theta): the point-estimated global latents' log-densities, summed (0 without any), detached."""
    return torch.as_tensor(sum((masked_log_prob(s).sum() for s in sites if s["infer"].get("_map_site")),
                               torch.zeros(()))).detach()


# The posterior is a gradient (the probe trick): under a caller's torch.no_grad() (e.g.
# SVI.evaluate_loss with ExactPosterior) it would silently come out as all-ones weights.
@torch.enable_grad()
def exact_posterior(
    model: Callable, structure: ModelStructure, args: tuple, kwargs: dict, mode: str = "exact",
    workspace: Optional[Workspace] = None, leaves: bool = True, replay: Optional[Replay] = None, fuse: bool = True,
    tables: bool = True, evidence: bool = True,
) -> Posterior:
    """The E-step. See the module docstring for the probe-gradient mechanism.

    Parameters
    ----------
    model : callable
        A Pyro model; its discrete latent sites are enumerated in parallel.
    structure : ModelStructure
        From :func:`inspect_model`.
    mode : {"exact", "hard"}
        ``"exact"``: Q(z) = p(z | x; theta). ``"hard"``: Q(z) = one-hot at argmax_z p(z | x; theta)
        (the joint mode, e.g. the Viterbi path of an HMM).
    workspace : ppl_em.fast.Workspace, optional
        Lends the chunk-sized tables of the fast paths (a streaming pass recycles them between chunks).
    leaves : bool
        Whether the trace's distributions carry an autograd graph from fresh leaves standing for the
        parameters (``Posterior.leaves``, for the M-step plan); without, the model runs without a graph.
    replay : ppl_em.fast.Replay, optional
        Replays the model's run (without leaves) instead of running the model (:mod:`ppl_em.fast.replay`).
    fuse : bool
        For a mixture (one latent per data point) observed under a Gaussian (a multivariate normal, or
        ``Normal(...).to_event(1)``) whose log-density takes the GEMM form: compute the log-densities, Q(z)
        and the site's weighted sums (``Posterior.sums``, which the M-step's statistics take) in one pass
        over the rows (:func:`_fused_pass`); the same numbers, to rounding, as without (on float32 data, Q
        from float64 blocks: more accurate than float32 passes).
    tables : bool
        Whether that pass keeps the Gaussian site's log-density table as the site's log-probability in
        ``Posterior.trace``. Without, the site's entries are NaN of the table's shape (a (K, N) table less written
        and read: 7% of the pass at n = 1e6, d = 10, K = 16): for callers that read only Q(z), log p(x) and the
        sums, as EM's own steps do.
    evidence : bool
        With ``mode="hard"``: whether the exact log p(x) (``Posterior.log_evidence``) is computed beside the
        objective max_z log p(x, z). Where no single latent per row gives it for free (a chain: a sum-product
        pass over every time step, a third of a hard step of B3's HMM), without it ``log_evidence`` is NaN:
        for EM's own steps, which read only the objective and Q.
    """
    tr, leaves = trace_model(model, structure, args, kwargs, log_prob="value", workspace=workspace,
                             leaf_params=leaves, graph=leaves, replay=replay, defer=fuse and not leaves,
                             chain_semiring="max" if mode == "hard" and not evidence else "sum")
    sites = sample_sites(tr)
    scale = _common_scale(tr)
    single = _one_latent_posterior(tr, scale, workspace, hard=mode == "hard", tables=tables)
    _materialise(tr, workspace)  # whatever the posterior's pass did not take
    sums = {}
    if single is not None:
        log_z, objective, weights, sums = single
    else:
        probes = {s["name"]: torch.zeros_like(masked_log_prob(s)).requires_grad_() for s in sites}
        ring_probes = probes
        if mode == "hard":
            ring_probes = {k: torch.zeros_like(v).requires_grad_() for k, v in probes.items()}
            objective = _contract(tr, ring_probes, MapRing()) * scale
            log_z = _contract(tr, probes, LogRing()) * scale if evidence else torch.full_like(objective, math.nan)
        else:
            log_z = objective = _contract(tr, probes, LogRing()) * scale
        names = list(ring_probes)
        tables = {s["name"]: s["chain_terms"].tensors() for s in sites if "chain_terms" in s}
        inputs = [ring_probes[k] for k in names] + [t for ts in tables.values() for t in ts]
        grads = torch.autograd.grad(objective, inputs, allow_unused=True) \
            if objective.requires_grad else [None] * len(inputs)
        weights = {k: (torch.ones_like(ring_probes[k]) if g is None else g.detach())
                   for k, g in zip(names, grads)}
        rest = iter(grads[len(names):])
        for name, ts in tables.items():  # a chain's tables: its posterior (zero where nothing depends on them)
            weights[name] = ChainTerms(*(torch.zeros_like(t) if g is None else g.detach() for t, g in zip(ts, rest)),
                                       weight=weights[name])
    return Posterior(
        log_evidence=log_z.detach(),
        objective=objective.detach(),
        log_prior=_log_prior(sites),
        weights=weights,
        trace=tr,
        mode=mode,
        leaves=leaves,
        sums=sums,
    )
