"""Guides: the Q(z) of ELBO(x; Q, theta), written as Pyro guides for ``pyro.infer.SVI``.

For any distribution Q(z) over the latent variables, Jensen's inequality gives

    log p(x; theta) >= ELBO(x; Q, theta) = E_Q[log p(x, z; theta)] - E_Q[log Q(z)],

with equality when Q(z) = p(z | x; theta). EM makes the bound tight in the E-step and
maximises it over theta in the M-step. SVI instead takes gradient steps on the ELBO, in theta
and in Q's own parameters at once. The three guides differ in the family Q comes from:

* :class:`ExactPosterior`: Q(z) = p(z | x; theta), computed exactly at every step by the EM
  engine (:mod:`ppl_em.posterior`) and held fixed. The bound is tight, ELBO = log p(x; theta),
  and SVI becomes gradient EM.
* :class:`AutoCategorical`: mean-field Q(z) = prod_i q_i(z^(i)), one free Categorical per data
  point (variational EM). For a mixture this family contains the exact posterior w_j^(i).
* :class:`AutoAmortized`: q(z^(i) | x^(i)) computed by an encoder network from x^(i) (the
  recognition model of a VAE). It also handles continuous local latents.

Global continuous latent sites (outside every plate that holds observations) are point
estimates in all three, as EM treats them (MAP): a Delta guide at a ``pyro.param``, like
``AutoDelta``. Discrete sites are marked ``infer={"enumerate": "parallel"}`` so that
``TraceEnum_ELBO`` takes the expectation over Q exactly instead of sampling. The guides take
the model's own arguments and never modify the model: the same model object runs under EM.

References: lecture notes, "Jensen's inequality", "ELBO", "EM as the general recipe";
Neal & Hinton, "A view of the EM algorithm", 1998; Hoffman et al., "Stochastic Variational
Inference", JMLR 2013; Kingma & Welling, "Auto-Encoding Variational Bayes", ICLR 2014.
"""

from __future__ import annotations

import operator
from contextlib import ExitStack
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution
from pyro.infer.autoguide import AutoGuide
from pyro.infer.autoguide.initialization import InitMessenger, init_to_sample
from pyro.infer.autoguide.utils import deep_setattr
from pyro.nn import PyroParam
from pyro.ops.indexing import Vindex
from pyro.poutine.util import site_is_subsample
from torch import nn
from torch.distributions import biject_to, constraints

from .posterior import ExactInferenceError, Posterior, exact_posterior, inspect_model

__all__ = ["ExactPosterior", "AutoCategorical", "AutoAmortized"]

_ENUMERATE = ("parallel", "sequential", None)


# -- small helpers -------------------------------------------------------------------------------
def _base(fn: dist.Distribution) -> dist.Distribution:
    """The distribution under ``.mask()`` and ``.expand()`` wrappers."""
    while isinstance(fn, (MaskedDistribution, ExpandedDistribution)):
        fn = fn.base_dist
    return fn


def _check_discrete_family(name: str, fn: dist.Distribution) -> None:
    if not isinstance(_base(fn), (dist.Categorical, dist.Bernoulli, dist.OneHotCategorical)):
        raise NotImplementedError(
            f"Discrete latent site '{name}' has distribution {type(_base(fn)).__name__}; the guides "
            "support Categorical, Bernoulli and OneHotCategorical sites. Rewrite the site as a "
            "Categorical over its values, or write a guide for it by hand."
        )


def _num_values(fn: dist.Distribution) -> int:
    """k, the number of values a discrete site can take (its enumeration support)."""
    return fn.enumerate_support(expand=False).shape[0]


def _q_from_logits(fn: dist.Distribution, logits: torch.Tensor) -> dist.Distribution:
    """q over the values of a discrete site, from logits (..., k) in ``enumerate_support`` order."""
    base = _base(fn)
    if isinstance(base, dist.Bernoulli):
        return dist.Bernoulli(logits=logits[..., 1] - logits[..., 0])
    if isinstance(base, dist.OneHotCategorical):
        return dist.OneHotCategorical(logits=logits)
    return dist.Categorical(logits=logits)


def _value_index(fn: dist.Distribution, value: torch.Tensor) -> torch.Tensor:
    """The position of a discrete site's value in its ``enumerate_support``, as a long tensor."""
    return value.argmax(-1) if isinstance(_base(fn), dist.OneHotCategorical) else value.long()


def _float_dtype(*tensors) -> torch.dtype:
    for t in tensors:
        if torch.is_tensor(t) and t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


def _subsample(value: torch.Tensor, site: dict, indices: Dict[str, torch.Tensor], event_dim: int) -> torch.Tensor:
    """Select the current minibatch of a per-data-point parameter along each subsampled plate."""
    for frame in site["cond_indep_stack"]:
        dim = frame.dim - event_dim
        idx = indices.get(frame.name)
        if idx is not None and value.size(dim) != idx.numel():
            value = value.index_select(dim, idx)
    return value


def _data_plates(trace) -> set:
    """Names of the plates that hold observations: a latent inside one of them is local, z^(i)."""
    return {f.name for s in trace.nodes.values() if s["type"] == "sample" and s["is_observed"]
            for f in s["cond_indep_stack"]}


def _prototype_hide_fn(msg: dict) -> bool:
    # Unlike Pyro's autoguides, keep observed sites: AutoAmortized reads its input off them.
    return msg["type"] != "sample" or site_is_subsample(msg)


# -- the shared base -----------------------------------------------------------------------------
class _SiteGuide(AutoGuide):
    """Trace the model once, classify its latent sites, then replay its plates at every call.

    Each latent site gets a role: ``"point"`` (global continuous: Delta at a parameter),
    ``"discrete"`` (enumerable), ``"continuous"`` (continuous inside a data plate). A subclass
    provides the distribution of each non-point site through :meth:`_q`, and may precompute
    what all sites share in one pass (an E-step, an encoder pass) in :meth:`_begin`.
    """

    _prototype_hide_fn = staticmethod(_prototype_hide_fn)

    def __init__(self, model: Callable, *, enumerate: Optional[str] = "parallel",
                 init_loc_fn: Callable = init_to_sample, create_plates: Optional[Callable] = None) -> None:
        if enumerate not in _ENUMERATE:
            raise ValueError(f"enumerate must be one of {_ENUMERATE}, got {enumerate!r}.")
        super().__init__(model, create_plates=create_plates)
        self.enumerate = enumerate
        self.init_loc_fn = init_loc_fn
        self._roles: Dict[str, str] = {}
        self._local: set = set()

    def _setup_prototype(self, *args, **kwargs) -> None:
        model = InitMessenger(self.init_loc_fn)(poutine.block(self.model, self._prototype_hide_fn))
        self.prototype_trace = poutine.block(poutine.trace(model).get_trace)(*args, **kwargs)
        self._classify_sites()
        for name, role in self._roles.items():
            fn = self.prototype_trace.nodes[name]["fn"]
            if role == "discrete":
                _check_discrete_family(name, fn)
            if role == "point":
                value = self.prototype_trace.nodes[name]["value"].detach()
                deep_setattr(self, name, PyroParam(value, fn.support, fn.event_dim))
        self._setup_sites(*args, **kwargs)

    def _classify_sites(self) -> None:
        """Record the plates to replay and each latent site's role (see the class docstring)."""
        self._prototype_frames = {}
        data_plates = _data_plates(self.prototype_trace)
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            for frame in site["cond_indep_stack"]:
                if not frame.vectorized:
                    raise NotImplementedError(
                        f"Site '{name}' is inside the sequential plate '{frame.name}'; the guides need "
                        "vectorized plates: write `with pyro.plate(...)` instead of `for i in pyro.plate(...)`.")
                self._prototype_frames[frame.name] = frame
            if {f.name for f in site["cond_indep_stack"]} & data_plates:
                self._local.add(name)
            self._roles[name] = ("discrete" if site["fn"].has_enumerate_support
                                 else "continuous" if name in self._local else "point")

    def _setup_sites(self, *args, **kwargs) -> None:
        """Subclass hook: create the parameters of the non-point sites."""

    def _begin(self, args: tuple, kwargs: dict):
        """Subclass hook: work shared by all sites of one call; passed on to :meth:`_q`."""
        return None

    def _plates(self, shared, args: tuple, kwargs: dict) -> Dict[str, pyro.plate]:
        """The model's plates, replayed in the guide (AutoGuide's, sized as in the first call)."""
        return self._create_plates(*args, **kwargs)

    def _q(self, name: str, site: dict, indices: Dict[str, torch.Tensor], values: dict, shared):
        raise NotImplementedError

    def forward(self, *args, **kwargs) -> Dict[str, torch.Tensor]:
        """Sample every latent site of the model from Q, with the model's ``*args, **kwargs``."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        shared = self._begin(args, kwargs)
        plates = self._plates(shared, args, kwargs)
        values: Dict[str, torch.Tensor] = {}
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            with ExitStack() as stack:
                indices = {f.name: stack.enter_context(plates[f.name]) for f in site["cond_indep_stack"]}
                if self._roles[name] == "point":  # MAP, as in EM: a Delta at the parameter
                    q = dist.Delta(operator.attrgetter(name)(self), event_dim=site["fn"].event_dim)
                else:
                    q = self._q(name, site, indices, values, shared)
                infer = {"enumerate": self.enumerate} if self._roles[name] == "discrete" and self.enumerate else {}
                values[name] = pyro.sample(name, q, infer=infer)
        return values

    def _point_values(self) -> Dict[str, torch.Tensor]:
        return {n: operator.attrgetter(n)(self).detach() for n, r in self._roles.items() if r == "point"}

    def _reject_local_continuous(self, what: str) -> None:
        local = [n for n, r in self._roles.items() if r == "continuous"]
        if local:
            raise ExactInferenceError(
                f"Site(s) {local} are continuous latent variables inside a data plate; {what} "
                "Use AutoAmortized (an encoder q(z | x)) or a hand-written guide for them.")


# -- ExactPosterior ------------------------------------------------------------------------------
class ExactPosterior(_SiteGuide):
    """The EM E-step as a guide: Q(z) = p(z | x; theta), exact, recomputed at every call.

    Each call runs the engine's E-step (:func:`ppl_em.posterior.exact_posterior`) at the
    current parameters and draws the discrete latents from it, detached: Q is fixed within a
    step, as in EM. The ELBO is then log p(x; theta) (+ log p of the point estimates) up to
    float precision, and its gradient in theta is the gradient of log p(x; theta)
    (Fisher's identity), so SVI with this guide is gradient EM.

    Sites are drawn in model order, each from p(z_s | z_parent, x; theta), the ratio of the
    posterior pairwise marginal to the parent's marginal. This is exact when every discrete
    latent shares a factor with at most one earlier discrete latent (a forest in model
    order): mixtures (z^(i) conditionally independent given x), several latents per data
    point as long as they form a chain, HMMs (the chain z_1 -> ... -> z_T). Other structures
    raise ``ValueError``. Plates must not be subsampled: the E-step is over all data.

    Parameters
    ----------
    model : callable
        A Pyro model whose local latents are discrete (the models EM fits).
    enumerate : {"parallel", "sequential", None}
        How ``TraceEnum_ELBO`` treats the guide's discrete sites; with ``"parallel"`` (default)
        the ELBO is computed exactly, with ``None`` the latents are sampled.
    init_loc_fn : callable
        Initial values of the point-estimated global latents (default: a draw from the prior).

    Examples
    --------
    >>> import torch, pyro, pyro.distributions as dist
    >>> from pyro.infer import TraceEnum_ELBO
    >>> from ppl_em import EM
    >>> def model(x):
    ...     mu = pyro.param("mu", torch.tensor([-1.0, 1.0]))
    ...     with pyro.plate("data", len(x)):
    ...         z = pyro.sample("z", dist.Categorical(torch.ones(2) / 2))
    ...         pyro.sample("x", dist.Normal(mu[z], 1.0), obs=x)
    >>> pyro.clear_param_store()
    >>> x = torch.tensor([-2.0, 0.3, 1.5])
    >>> elbo = -TraceEnum_ELBO(max_plate_nesting=1).loss(model, ExactPosterior(model), x)
    >>> log_px = EM(model).e_step(x).log_evidence.item()
    >>> abs(elbo - log_px) < 1e-5
    True
    """

    def __init__(self, model: Callable, *, enumerate: Optional[str] = "parallel",
                 init_loc_fn: Callable = init_to_sample) -> None:
        super().__init__(model, enumerate=enumerate, init_loc_fn=init_loc_fn)
        self._structure = None
        self._parents: Optional[Dict[str, Tuple[Optional[str], Optional[str]]]] = None

    def _setup_sites(self, *args, **kwargs) -> None:
        self._reject_local_continuous("ExactPosterior needs p(z | x) by enumeration.")
        for frame in self._prototype_frames.values():
            if frame.full_size is not None and frame.full_size != frame.size:
                raise ValueError(
                    f"Plate '{frame.name}' is subsampled ({frame.size} of {frame.full_size}); "
                    "ExactPosterior computes the exact E-step over all data points. Remove "
                    "subsample_size, or use AutoCategorical / AutoAmortized for minibatches.")

    def e_step(self, *args, **kwargs) -> Posterior:
        """Q(z) = p(z | x; theta) at the current parameters and point estimates (no gradient)."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        model = poutine.condition(self.model, data=self._point_values())
        # Blocked: the E-step's own model run must not appear in the guide's trace.
        with poutine.block():
            if self._structure is None:
                self._structure = inspect_model(model, args, kwargs)
            return exact_posterior(model, self._structure, args, kwargs)

    def _begin(self, args: tuple, kwargs: dict) -> Dict[str, Tuple[Optional[str], torch.Tensor]]:
        post = self.e_step(*args, **kwargs)
        if self._parents is None:
            self._parents = _tree_parents(post)
        return {name: (parent, _table(post, name, parent, factor, self._batch_shape(name)))
                for name, (parent, factor) in self._parents.items()}

    def _batch_shape(self, name: str) -> torch.Size:
        return self.prototype_trace.nodes[name]["fn"].batch_shape

    def _q(self, name, site, indices, values, tables):
        parent, table = tables[name]
        # Given its parent's value (sampled, or enumerated by TraceEnum_ELBO), pick the row
        # p(z_s | z_parent = value, x) of the conditional table.
        if parent is not None:
            table = Vindex(table)[..., _value_index(self.prototype_trace.nodes[parent]["fn"], values[parent]), :]
        probs = table
        return _q_from_logits(site["fn"], probs.clamp_min(torch.finfo(probs.dtype).tiny).log())


def _tree_parents(post: Posterior) -> Dict[str, Tuple[Optional[str], Optional[str]]]:
    """For each enumerated site, its one earlier neighbour in the factor graph and a factor holding both."""
    order = post.enumerated_sites
    latents = {name: post.joint(name)[1] for name in post.weights}  # factor -> its latents
    parents: Dict[str, Tuple[Optional[str], Optional[str]]] = {}
    for i, s in enumerate(order):
        before = {z for names in latents.values() if s in names for z in names} & set(order[:i])
        if len(before) > 1:
            raise ValueError(
                f"Site '{s}' shares factors with several earlier latents {sorted(before)}, so "
                "p(z | x) is not a chain and ExactPosterior cannot draw from it site by site. "
                "Use EM (ppl_em.EM) for this model, or AutoCategorical for a mean-field Q.")
        if not before:
            parents[s] = (None, None)
            continue
        p = before.pop()
        factor = s if p in latents[s] else next(f for f, names in latents.items() if {p, s} <= set(names))
        parents[s] = (p, factor)
    return parents


def _table(post: Posterior, name: str, parent: Optional[str], factor: Optional[str],
           batch_shape: torch.Size) -> torch.Tensor:
    """p(z_s | x) as batch_shape + (k,), or p(z_s | z_parent, x) as batch_shape + (k_parent, k)."""
    if parent is None:
        probs = post.marginal(name)  # plate sizes + (k,)
    else:
        probs, names = post.joint(factor)  # plate sizes + (k_1, ..., k_m)
        first = probs.dim() - len(names)
        others = [first + i for i, n in enumerate(names) if n not in (parent, name)]
        probs = probs.sum(others) if others else probs
        if names.index(parent) > names.index(name):
            probs = probs.transpose(-1, -2)
        total = probs.sum(-1, keepdim=True)
        # Rows whose parent value has posterior probability 0 are never used; keep them valid.
        probs = torch.where(total > 0, probs / total.clamp_min(torch.finfo(probs.dtype).tiny),
                            torch.full_like(probs, 1.0 / probs.shape[-1]))
    latent_shape = probs.shape[probs.dim() - (1 if parent is None else 2):]
    if probs.numel() != batch_shape.numel() * latent_shape.numel():
        raise ValueError(
            f"Cannot lay out the posterior of site '{name}' (shape {tuple(probs.shape)}) in its "
            f"batch shape {tuple(batch_shape)}: the factor linking it to '{parent}' lives in other plates.")
    return probs.reshape(batch_shape + latent_shape)


# -- AutoCategorical -----------------------------------------------------------------------------
class AutoCategorical(_SiteGuide):
    """Mean-field variational EM: a free Categorical q_i(z^(i)) for every data point.

    For each discrete latent site the guide holds logits of shape ``batch_shape + (k,)``
    (for a mixture's z: (n, k), one row per x^(i)); q_i = softmax of row i. SVI maximises the
    ELBO jointly in theta and in these logits. For a mixture the optimal q_i is the EM
    responsibility w^(i) = p(z^(i) | x^(i); theta), so SVI reaches EM's fixed points; for
    models with several latents per point (or an HMM) Q is mean-field, a product over sites.

    With ``enumerate="parallel"`` (default) ``TraceEnum_ELBO`` sums over the values of each
    q_i exactly. Global continuous latents are point estimates. Subsampled plates are
    supported: the logits are indexed by the plate's minibatch indices (pass
    ``create_plates`` to share the model's subsample, as with Pyro's autoguides).

    Parameters
    ----------
    model : callable
        A Pyro model whose local latents are discrete.
    enumerate : {"parallel", "sequential", None}
        How ``TraceEnum_ELBO`` treats the guide's discrete sites (None: sample them).
    init_loc_fn : callable
        Initial values of the point-estimated global latents (default: a draw from the prior).
    create_plates : callable, optional
        As in ``pyro.infer.autoguide.AutoGuide``.

    Examples
    --------
    >>> import torch, pyro, pyro.distributions as dist
    >>> from pyro.infer import SVI, TraceEnum_ELBO
    >>> def model(x):
    ...     mu = pyro.param("mu", torch.tensor([-1.0, 1.0]))
    ...     with pyro.plate("data", len(x)):
    ...         z = pyro.sample("z", dist.Categorical(torch.ones(2) / 2))
    ...         pyro.sample("x", dist.Normal(mu[z], 1.0), obs=x)
    >>> pyro.clear_param_store()
    >>> x = torch.tensor([-3.0, -2.5, 2.5, 3.0])
    >>> guide = AutoCategorical(model)
    >>> svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.1}), TraceEnum_ELBO(max_plate_nesting=1))
    >>> losses = [svi.step(x) for _ in range(50)]
    >>> losses[-1] < losses[0], pyro.param("AutoCategorical.z").shape
    (True, torch.Size([4, 2]))
    """

    def _setup_sites(self, *args, **kwargs) -> None:
        self._reject_local_continuous("AutoCategorical only has Categorical factors for discrete latents.")
        for name, role in self._roles.items():
            if role == "discrete":
                self._free_logits(name)

    def _free_logits(self, name: str) -> None:
        """Zero logits (a uniform q) of shape batch_shape + (k,), full size along subsampled plates."""
        site = self.prototype_trace.nodes[name]
        shape = list(site["fn"].batch_shape)
        for frame in site["cond_indep_stack"]:
            shape[frame.dim] = frame.full_size or frame.size
        fn = _base(site["fn"])
        dtype = _float_dtype(getattr(fn, "logits", None))
        deep_setattr(self, name, PyroParam(torch.zeros(shape + [_num_values(site["fn"])], dtype=dtype)))

    def _q(self, name, site, indices, values, shared):
        logits = _subsample(operator.attrgetter(name)(self), site, indices, event_dim=1)
        return _q_from_logits(site["fn"], logits)


# -- AutoAmortized -------------------------------------------------------------------------------
class MLP(nn.Module):
    """The encoder network: standardise the input, then Linear-ReLU layers and a Linear output.

    Parameters
    ----------
    x : torch.Tensor
        Example inputs, shape (n, m): one row of observed data per plate element. Their
        per-feature mean and standard deviation (floored at 1% of the largest) fix the
        standardisation, so the encoder does not depend on the data's units.
    hidden : sequence of int
        Widths of the hidden layers.
    out : int
        Output width.

    Examples
    --------
    >>> import torch
    >>> net = MLP(torch.randn(10, 3), hidden=(8,), out=2)
    >>> net(torch.randn(5, 3)).shape
    torch.Size([5, 2])
    """

    def __init__(self, x: torch.Tensor, hidden: Sequence[int], out: int) -> None:
        super().__init__()
        std = x.std(0) if x.shape[0] > 1 else torch.ones_like(x[0])
        self.register_buffer("shift", x.mean(0))
        self.register_buffer("scale", std.clamp_min(0.01 * float(std.max()) or 1.0))
        sizes = [x.shape[1], *hidden]
        layers: List[nn.Module] = []
        for a, b in zip(sizes, sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(sizes[-1], out)).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.shift) / self.scale)


class AutoAmortized(AutoCategorical):
    """Amortized guide: q(z^(i) | x^(i)) from an encoder network applied to x^(i).

    For every latent site inside a data plate, an :class:`MLP` maps each plate element's
    observed data x^(i) (the observed site in the same plate, flattened to a vector) to

    * logits of q(z^(i) | x^(i)) for a discrete latent (enumerated like AutoCategorical), or
    * location and scale (softplus) of a Normal for a continuous latent, reparameterised;
      a constrained latent gets the Normal pushed through ``biject_to(support)``.

    The networks live in the ``nn.ModuleDict`` ``self.encoder``; Pyro registers them with
    ``pyro.module`` (as ``AutoAmortized.encoder$$$...``) whenever the guide runs. Global
    discrete latents get free logits (as in AutoCategorical), global continuous latents
    point estimates. Unlike AutoCategorical, the guide generalises to new data: call it
    with held-out x.

    The encoder's input is found among the model's arguments (the tensor passed as the
    observation); if the model transforms its data first, the guide runs the model once per
    call to read the observed value.

    Parameters
    ----------
    model : callable
        A Pyro model with latents inside a plate of observations.
    hidden : sequence of int
        Hidden layer widths of each encoder.
    obs : str, optional
        The observed site that feeds the encoder; needed only when several observed sites
        share the latent's plate.
    enumerate, init_loc_fn
        As in :class:`AutoCategorical`.

    Examples
    --------
    >>> import torch, pyro, pyro.distributions as dist
    >>> from pyro.infer import SVI, TraceEnum_ELBO
    >>> def model(x):
    ...     mu = pyro.param("mu", torch.tensor([-1.0, 1.0]))
    ...     with pyro.plate("data", len(x)):
    ...         z = pyro.sample("z", dist.Categorical(torch.ones(2) / 2))
    ...         pyro.sample("x", dist.Normal(mu[z], 1.0), obs=x)
    >>> pyro.clear_param_store()
    >>> x = torch.tensor([-3.0, -2.5, 2.5, 3.0])
    >>> guide = AutoAmortized(model, hidden=(8,))
    >>> svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), TraceEnum_ELBO(max_plate_nesting=1))
    >>> losses = [svi.step(x) for _ in range(50)]
    >>> losses[-1] < losses[0], type(guide.encoder["z"]).__name__
    (True, 'MLP')
    """

    def __init__(self, model: Callable, hidden: Sequence[int] = (64,), obs: Optional[str] = None, *,
                 enumerate: Optional[str] = "parallel", init_loc_fn: Callable = init_to_sample) -> None:
        super().__init__(model, enumerate=enumerate, init_loc_fn=init_loc_fn)
        self.hidden = tuple(hidden)
        self.obs = obs
        self._inputs: Dict[str, Tuple[str, object, object]] = {}  # latent -> (obs site, locator, frame)

    def _setup_sites(self, *args, **kwargs) -> None:
        self.encoder = nn.ModuleDict()
        for name, role in self._roles.items():
            if name not in self._local:
                if role == "discrete":
                    self._free_logits(name)
                continue
            frame = self._amortization_plate(name)
            obs_name = self._input_site(name, frame)
            locator = _locate(self.prototype_trace.nodes[obs_name]["value"], args, kwargs)
            self._inputs[name] = (obs_name, locator, frame)
            x = self._features(name, self.prototype_trace.nodes[obs_name]["value"])
            self.encoder[_key(name)] = MLP(x, self.hidden, self._out_size(name))

    def _amortization_plate(self, name: str):
        site = self.prototype_trace.nodes[name]
        frames = [f for f in site["cond_indep_stack"] if f.vectorized]
        if len(frames) != 1:
            raise NotImplementedError(
                f"AutoAmortized encodes latents inside exactly one plate; site '{name}' is inside "
                f"{[f.name for f in frames]}. Write a guide by hand for this site.")
        if frames[0].full_size is not None and frames[0].full_size != frames[0].size:
            raise NotImplementedError(
                f"Plate '{frames[0].name}' is subsampled; AutoAmortized reads the plate's data from the "
                "model's arguments. Pass each minibatch as the data argument instead (as in Pyro's VAE).")
        return frames[0]

    def _input_site(self, name: str, frame) -> str:
        """The observed site in the latent's plate whose value is the encoder's input x^(i)."""
        candidates = [n for n, s in self.prototype_trace.nodes.items() if s["type"] == "sample"
                      and s["is_observed"] and frame.name in {f.name for f in s["cond_indep_stack"]}]
        if self.obs is not None:
            if self.obs not in candidates:
                raise ValueError(f"obs={self.obs!r} is not an observed site in plate '{frame.name}' "
                                 f"(the plate of latent '{name}'); candidates are {candidates}.")
            return self.obs
        if len(candidates) != 1:
            raise ValueError(f"Latent '{name}' shares plate '{frame.name}' with observed sites {candidates}; "
                             "pass obs='<site name>' to choose the encoder's input.")
        return candidates[0]

    def _features(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """x^(i) as rows: move the plate's dimension first and flatten the rest, (n, m)."""
        obs_name, _, frame = self._inputs[name]
        event_dim = self.prototype_trace.nodes[obs_name]["fn"].event_dim
        value = torch.as_tensor(value)
        dim = frame.dim - event_dim
        if value.dim() < -dim:
            raise ValueError(f"Observed site '{obs_name}' has shape {tuple(value.shape)}, which has no "
                             f"dimension {dim} for plate '{frame.name}'.")
        value = value.movedim(dim, 0)
        latent = self.prototype_trace.nodes[name]["value"]
        return value.reshape(value.shape[0], -1).to(_float_dtype(value, latent))

    def _out_size(self, name: str) -> int:
        fn = self.prototype_trace.nodes[name]["fn"]
        if self._roles[name] == "discrete":
            return _num_values(fn)
        return 2 * biject_to(fn.support).inverse_shape(fn.event_shape).numel()

    def _begin(self, args: tuple, kwargs: dict) -> Dict[str, torch.Tensor]:
        """Run each encoder on its plate's data: raw outputs, shape (n, out)."""
        traced = None
        out = {}
        for name, (obs_name, locator, _) in self._inputs.items():
            if locator is None:  # the model transforms its data: read the observed value off a run
                if traced is None:
                    traced = poutine.block(poutine.trace(self.model).get_trace)(*args, **kwargs)
                value = traced.nodes[obs_name]["value"]
            else:
                value = args[locator] if isinstance(locator, int) else kwargs[locator]
            out[name] = self.encoder[_key(name)](self._features(name, value))
        return out

    def _plates(self, raw, args: tuple, kwargs: dict) -> Dict[str, pyro.plate]:
        # The encoder generalises to new data: size each encoded plate by this call's data.
        sizes = {self._inputs[name][2].name: out.shape[0] for name, out in raw.items()}
        plates = {}
        for name, frame in sorted(self._prototype_frames.items()):
            full_size = sizes.get(name, frame.full_size or frame.size)
            plates[name] = pyro.plate(name, full_size, dim=frame.dim, subsample_size=sizes.get(name, frame.size))
        return plates

    def _q(self, name, site, indices, values, raw):
        if name not in self._local:
            return super()._q(name, site, indices, values, raw)
        dim, fn = self._inputs[name][2].dim, site["fn"]
        if self._roles[name] == "discrete":
            return _q_from_logits(fn, _at_plate(raw[name], dim, (_num_values(fn),)))
        # Reparameterised: a Normal in unconstrained space, pushed onto the site's support.
        transform = biject_to(fn.support)
        shape = transform.inverse_shape(fn.event_shape)
        loc, scale = raw[name].chunk(2, dim=-1)
        q = dist.Normal(_at_plate(loc, dim, shape), _at_plate(nn.functional.softplus(scale), dim, shape))
        q = q.to_event(len(shape))
        return q if _is_real(fn.support) else dist.TransformedDistribution(q, transform)


def _at_plate(t: torch.Tensor, dim: int, shape: Tuple[int, ...]) -> torch.Tensor:
    """Rows (n, ...) of encoder output laid out for a plate at ``dim``: (n,) + (1,) * (-dim - 1) + shape."""
    return t.reshape((t.shape[0],) + (1,) * (-dim - 1) + tuple(shape))


def _key(name: str) -> str:
    return name.replace(".", "_")


def _is_real(support) -> bool:
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real


def _locate(value: torch.Tensor, args: tuple, kwargs: dict):
    """Where the observed tensor sits among the model's arguments: an index, a keyword, or None."""
    places = list(enumerate(args)) + list(kwargs.items())
    for place, arg in places:
        if arg is value:
            return place
    for place, arg in places:
        if torch.is_tensor(arg) and arg.shape == value.shape and torch.equal(arg, value):
            return place
    return None
