"""Closed-form M-step updates: weighted maximum likelihood per distribution family.

For a site whose distribution is an exponential family, the maximiser of E_Q[log p(x, z; theta)]
is a weighted MLE computed from expected sufficient statistics. With w_j^(i) = Q(z^(i) = j):

    phi_j   = (1/n) sum_i w_j^(i)                                                  (Categorical)
    mu_j    = sum_i w_j^(i) x^(i) / sum_i w_j^(i)                                  (Normal, MVN loc)
    Sigma_j = sum_i w_j^(i) (x^(i) - mu_j)(x^(i) - mu_j)^T / sum_i w_j^(i)          (MVN covariance)
    p_j     = sum_i w_j^(i) x^(i) / sum_i w_j^(i)                                  (Bernoulli, Poisson rate)

Each rule reads the distribution's *canonical* parameter (probabilities, mean, covariance); an
attribute written another way (``logits``, ``scale_tril``, ``precision_matrix``, a ``scale``) is
reached through the map ``to_attr`` (log, Cholesky, inverse, sqrt). The statistics are summed to
the shape in which the site sees the parameter (``shape``: e.g. (k, 1, d) for mu_z) and scattered
onto the ``pyro.param`` by its :class:`~ppl_em.selection.Selection`.

A Gaussian site whose mean and covariance both have closed forms keeps the three sums
N_j, S_j = sum_i w_j^(i) (x^(i) - c), M_j = sum_i w_j^(i) (x^(i) - c)(x^(i) - c)^T about a centre c
(:class:`GaussianSums`): mu_j = c + S_j / N_j, and Sigma_j about the *new* mu_j from the same sums,
so one pass over the data gives both.

References: lecture notes, M-step for the GMM; Bishop, PRML, sections 9.2-9.3.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
import pyro.distributions as dist
from pyro.distributions.torch_distribution import ExpandedDistribution
from torch.distributions import Independent

from . import chains
from .fast import broadcast_shape, centre, compact, gaussian_sums, normal_sums, overlap, reduce_product

__all__ = ["Rule", "RULES", "GaussianSums", "attributes", "parts", "unwrap", "view"]


@dataclass(frozen=True)
class Rule:
    """One closed-form update: the weighted statistics of a distribution attribute.

    ``stats(fn, x, w, shape)`` returns (numerator, denominator) summed to ``shape``; ``finish(num,
    den)`` turns their scatter-added sums into the canonical parameter and where a component has no
    posterior mass (None: nowhere), where the caller keeps the current value. ``to_attr`` names the map from the
    canonical parameter to the attribute (see :data:`ppl_em.selection`'s transforms), applied in
    the parameter's layout. ``phase`` 1 updates locations, probabilities and rates; phase 2 the
    scales, given the new locations.
    """

    family: type
    attr: str
    kind: str  # what the canonical parameter is: "probs", "mean", "loc", "variance", "covariance"
    phase: int
    stats: Callable
    finish: Callable
    to_attr: Optional[str] = None
    canonical: str = ""  # which canonical parameter the attribute stands for (probs and logits: the same)

    @property
    def gaussian(self) -> bool:
        return self.kind in ("loc", "variance", "covariance")


# -- the lecture's formulas --------------------------------------------------------------------------
def ratio(num: torch.Tensor, den: torch.Tensor):
    """num / den: mu_j = sum_i w_j^(i) x^(i) / sum_i w_j^(i). Returns the value and where it is empty (no
    posterior mass: the caller keeps the previous value there instead of 0/0; the value is 1 there), or
    None in place of where when no element is empty: the common case decides once, and costs no clamp
    and no select (``den`` above ``tiny`` everywhere, so ``num / den`` is the clamped quotient itself)."""
    tiny = torch.finfo(den.dtype).tiny
    full = den > tiny  # (NaN is not: counted as empty)
    if bool(full.all()):
        return num / den, None
    empty = ~full
    one = torch.ones((), dtype=num.dtype, device=num.device)
    return torch.where(empty, one, num / den.clamp_min(tiny)), empty


def normalise(num: torch.Tensor, den=None):
    """phi_j = N_j / sum_l N_l (each row of a table of counts, for a transition matrix A_i.); and the empty
    rows (None when no row is empty)."""
    value, empty = ratio(num, num.sum(-1, keepdim=True))
    return value, None if empty is None else empty.expand(num.shape)


def to_attribute(to_attr: Optional[str], value: torch.Tensor, diagonal: bool = False) -> torch.Tensor:
    """The attribute from the canonical parameter: logits = log phi, L = cholesky(Sigma), P = Sigma^-1,
    sigma = sqrt(sigma^2); elementwise on a diagonal (``diagonal``: the parameter holds only diagonal
    entries of the matrices). Probabilities of 0 give log(tiny): finite, and within 1e-300 of p(x)."""
    tiny, eps = torch.finfo(value.dtype).tiny, torch.finfo(value.dtype).eps
    if to_attr is None:
        return value
    if to_attr == "log":
        return value.clamp_min(tiny).log()
    if to_attr == "logit":
        return torch.logit(value.clamp(tiny, 1 - eps))
    if to_attr == "sqrt" or (to_attr == "cholesky" and diagonal):
        return value.sqrt()
    if to_attr == "cholesky":
        return torch.linalg.cholesky(value)
    if to_attr == "inverse":
        return value.reciprocal() if diagonal else torch.linalg.inv(value)
    raise ValueError(f"unknown map {to_attr!r}")


def counts(fn, x, w, shape):
    """N_j = sum_i w^(i) 1{x^(i) = j}: the expected counts of a Categorical's values (its last dim)."""
    k = fn.probs.shape[-1] if "probs" in fn.__dict__ else fn.logits.shape[-1]
    x, w = _sum_where_constant(x, w, shape[:-1])
    onehot = torch.nn.functional.one_hot(x.long(), k).to(w.dtype)
    return reduce_product([w.unsqueeze(-1), onehot], shape), None


def _sum_where_constant(x: torch.Tensor, w: torch.Tensor, keep):
    """(x, w) with w summed over the dims along which x does not vary and that ``keep`` sums over, and x
    narrowed to one entry there: an enumerated z takes the same values 0..k-1 at every row, so
    sum_i w_j^(i) 1{z^(i) = l} = (sum_i w_j^(i)) 1{z = l}, one pass over w instead of a product with the
    indicators at every row."""
    ndim = max(w.dim(), x.dim(), len(keep))
    w_sizes = (1,) * (ndim - w.dim()) + tuple(w.shape)
    x_sizes = (1,) * (ndim - x.dim()) + tuple(compact(x).shape)
    keep = (1,) * (ndim - len(keep)) + tuple(keep)
    dims = [i - ndim for i in range(ndim) if w_sizes[i] > 1 and x_sizes[i] == 1 and keep[i] == 1]
    for i in dims:
        if -i <= x.dim():
            x = x.narrow(i, 0, 1)
    return (x, w.sum(dims, keepdim=True)) if dims else (x, w)


def weighted_mean(fn, x, w, shape):
    """(sum_i w^(i) x^(i), sum_i w^(i)), elementwise: a Bernoulli's or Poisson's mean, a Normal's loc."""
    return reduce_product([w, x], shape), reduce_product([w], shape)


def weighted_vector_mean(fn, x, w, shape):
    """(sum_i w^(i) x^(i), sum_i w^(i)) for vector data (..., d): a multivariate normal's loc."""
    w = w.unsqueeze(-1)
    return reduce_product([w, x], shape), reduce_product([w], shape)


def location_from_pass(stats, ready, x, w, shape):
    """A location's (sum_i w^(i) x^(i), sum_i w^(i)) from the E-step's own sums (``ready``, a
    :class:`ppl_em.posterior.FusedSums` about its centre c': S' + N c' and N) where they are these sums
    (:meth:`GaussianSums.from_pass`), in place of ``stats`` (:func:`weighted_mean` for a Normal's loc,
    :func:`weighted_vector_mean` for a multivariate normal's) summing Q times the rows again: a mixture whose
    scale is not a parameter (k-means' sigma). None for other statistics or layouts."""
    if ready is None or stats not in (weighted_mean, weighted_vector_mean):
        return None
    shape = tuple(shape)
    elementwise = stats is weighted_mean
    found = GaussianSums(elementwise).from_pass(ready, x, w, shape if elementwise else shape[:-1], ready.c)
    if found is None:
        return None
    num, den = GaussianSums.mean(found[0], found[1], ready.c)
    return num.reshape(shape), (den if elementwise else den.unsqueeze(-1)).expand(shape)


def variance_about_loc(fn, x, w, shape):
    """(sum_i w^(i) (x^(i) - m^(i))^2, sum_i w^(i)) about the site's current loc m: a Normal's variance."""
    loc = compact(fn.loc)
    if not overlap(loc.shape, compact(x).shape):  # m is the same for every data point: no difference tensor
        inner = broadcast_shape(loc.shape, shape)
        c = normal_centre(x, inner)
        n, s, m = normal_sums(w, x, inner, c)
        return reduce_product([GaussianSums.about(n, s, m, c, loc)], shape), reduce_product([n], shape)
    diff = x - fn.loc
    return reduce_product([w, diff * diff], shape), reduce_product([w], shape)


def covariance_about_loc(fn, x, w, shape):
    """(sum_i w^(i) (x^(i) - m^(i))(x^(i) - m^(i))^T, sum_i w^(i)) about the current loc m of a multivariate normal."""
    loc = compact(fn.loc)
    if not overlap(loc.shape[:-1], compact(x).shape[:-1]):  # m is the same for every data point
        inner = broadcast_shape(loc.shape[:-1], shape[:-2])
        c = centre(compact(x).reshape(-1, x.shape[-1]))
        n, s, m = gaussian_sums(w, x, inner, c)
        return reduce_product([GaussianSums.about(n, s, m, c, loc)], shape), reduce_product([n[..., None, None]], shape)
    diff = x - loc
    w = w[..., None, None]
    return reduce_product([w, diff.unsqueeze(-1), diff.unsqueeze(-2)], shape), reduce_product([w], shape)


def normal_centre(x: torch.Tensor, cells) -> torch.Tensor:
    """A centre for a Normal's sums over data ``x``: per coordinate where the cells vary along x's last
    dim (a diagonal Gaussian's d coordinates), else one number; float64."""
    x = compact(x)
    dt = torch.promote_types(x.dtype, torch.float64)
    if x.dim() and len(cells) and cells[-1] == x.shape[-1] > 1:
        return centre(x.reshape(-1, x.shape[-1]))
    return x.reshape(-1)[:: max(1, x.numel() // 8192)].mean(dtype=dt)


def count_vectors(fn, x, w, shape):
    """N_j = sum_i w^(i) x^(i)_j: a Multinomial's expected counts of each category (its last dim)."""
    return reduce_product([w.unsqueeze(-1), x], shape), None


def exponential_rate(fn, x, w, shape):
    """(sum_i w^(i), sum_i w^(i) x^(i)): lambda = N / sum w x, an Exponential's rate."""
    return reduce_product([w], shape), reduce_product([w, x], shape)


def gamma_rate(fn, x, w, shape):
    """(alpha sum_i w^(i), sum_i w^(i) x^(i)): beta = alpha N / sum w x, a Gamma's rate given its concentration."""
    return reduce_product([w, fn.concentration.detach()], shape), reduce_product([w, x], shape)


def geometric_probs(fn, x, w, shape):
    """(sum_i w^(i), sum_i w^(i) (1 + x^(i))): p = N / (N + sum w x), for x failures before a success."""
    return reduce_product([w], shape), reduce_product([w, 1 + x], shape)


def binomial_probs(fn, x, w, shape):
    """(sum_i w^(i) x^(i), sum_i w^(i) n^(i)): p = sum w x / sum w n, for a known number of trials n."""
    return reduce_product([w, x], shape), reduce_product([w, fn.total_count.detach()], shape)


def _initial_counts(fn, x, w, shape):
    return reduce_product([w.initial], shape), None


def _transition_counts(fn, x, w, shape):
    return reduce_product([w.transition], shape), None


class GaussianSums:
    """A Gaussian site's joint statistics (N_j, S_j, M_j) about a centre c, and the updates from them.

    ``elementwise`` for a Normal (each coordinate its own variance); otherwise a multivariate
    normal with S (cells, d) and M (cells, d, d).
    """

    def __init__(self, elementwise: bool) -> None:
        self.elementwise = elementwise

    def summarize(self, fn, x, w, cells, c) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """N = sum_i w^(i), S = sum_i w^(i) (x^(i) - c), M = sum_i w^(i) (x^(i) - c)(x^(i) - c)^T, per cell."""
        if self.elementwise:
            return normal_sums(w, x, cells, c)
        return gaussian_sums(w, x, cells, c)

    def from_pass(self, ready, x, w, cells, c) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """:meth:`summarize`'s (N, S, M) about ``c`` from the E-step's own sums (``ready``, a
        :class:`ppl_em.posterior.FusedSums` about its centre c'), where they are these sums: the same Q (K, N)
        over rows x (N, d), summed into cells (K, 1) (a Normal's: Q (K, N, 1) broadcast over the d coordinates,
        cells (K, 1, d)). S about c is S' - N (c - c'), M is :meth:`about`. None elsewhere."""
        q = compact(w)
        if self.elementwise:  # the Normal's weights are Q with a trailing dim for the coordinates
            if q.dim() != 3 or q.shape[-1] != 1 or tuple(cells) != (q.shape[0], 1, x.shape[-1]):
                return None
            q = q.squeeze(-1)
        elif tuple(cells) != (w.shape[0], 1):
            return None
        same = q.shape == ready.weights.shape and q.stride() == ready.weights.stride() and \
            q.data_ptr() == ready.weights.data_ptr()
        if not same or q.dim() != 2 or compact(x).dim() != 2:
            return None
        d = ready.s.shape[-1]
        n = ready.n.unsqueeze(-1)  # (K, 1)
        s = ready.s - n * (c - ready.c)
        if self.elementwise:
            m = self.about(n, ready.s, ready.m, ready.c, c)
            return n.expand(-1, d).reshape(cells), s.reshape(cells), m.reshape(cells)
        m = self.about(ready.n, ready.s, ready.m, ready.c, c)
        return ready.n.reshape(cells), s.reshape(tuple(cells) + (d,)), m.reshape(tuple(cells) + (d, d))

    @staticmethod
    def mean(n, s, c):
        """(sum_i w^(i) x^(i), sum_i w^(i)) = (S + N c, N): the numerator and denominator of mu_j."""
        return s + n.unsqueeze(-1) * c if s.dim() > n.dim() else s + n * c, n

    def covariance(self, n, s, m, c, mu, reg: float):
        """(sum_i w^(i) (x^(i) - mu_j)(x^(i) - mu_j)^T + reg N_j I, N_j) at the new means ``mu`` per cell."""
        m2 = self.about(n, s, m, c, mu)
        if self.elementwise:
            return m2 + reg * n, n
        eye = torch.eye(s.shape[-1], dtype=m2.dtype, device=m2.device)
        n2 = n[..., None, None]
        return m2 + reg * n2 * eye, n2.expand(m2.shape)

    @staticmethod
    def about(n, s, m, c, mu):
        """The second moment about ``mu`` instead of ``c``: with delta = mu - c,
        sum w (x - mu)(x - mu)^T = M - (S delta^T + delta S^T) + N (delta delta^T) (elementwise for a Normal),
        summed in that order so that the result is symmetric to the bit where M is."""
        delta = mu.to(m.dtype) - c.to(m.dtype)
        if m.dim() == s.dim():
            return m - 2 * delta * s + n * delta * delta
        outer = s.unsqueeze(-1) * delta.unsqueeze(-2)
        return m - (outer + outer.transpose(-1, -2)) + n[..., None, None] * (delta.unsqueeze(-1) * delta.unsqueeze(-2))


RULES: List[Rule] = [
    Rule(dist.Categorical, "probs", "probs", 1, counts, normalise, None, "probs"),
    Rule(dist.Categorical, "logits", "probs", 1, counts, normalise, "log", "probs"),
    Rule(dist.Bernoulli, "probs", "mean", 1, weighted_mean, ratio, None, "probs"),
    Rule(dist.Bernoulli, "logits", "mean", 1, weighted_mean, ratio, "logit", "probs"),
    Rule(dist.Poisson, "rate", "mean", 1, weighted_mean, ratio, None, "rate"),
    Rule(dist.Normal, "loc", "loc", 1, weighted_mean, ratio, None, "loc"),
    Rule(dist.Normal, "scale", "variance", 2, variance_about_loc, ratio, "sqrt", "variance"),
    Rule(dist.MultivariateNormal, "loc", "loc", 1, weighted_vector_mean, ratio, None, "loc"),
    Rule(dist.MultivariateNormal, "covariance_matrix", "covariance", 2, covariance_about_loc, ratio, None, "covariance"),
    Rule(dist.MultivariateNormal, "scale_tril", "covariance", 2, covariance_about_loc, ratio, "cholesky", "covariance"),
    Rule(dist.MultivariateNormal, "precision_matrix", "covariance", 2, covariance_about_loc, ratio, "inverse",
         "covariance"),
    Rule(dist.DiscreteHMM, "initial_logits", "probs", 1, _initial_counts, normalise, "log", "initial"),
    Rule(dist.DiscreteHMM, "transition_logits", "probs", 1, _transition_counts, normalise, "log", "transition"),
    Rule(dist.Exponential, "rate", "mean", 1, exponential_rate, ratio, None, "rate"),
    Rule(dist.Gamma, "rate", "mean", 1, gamma_rate, ratio, None, "rate"),
    Rule(dist.Geometric, "probs", "mean", 1, geometric_probs, ratio, None, "probs"),
    Rule(dist.Geometric, "logits", "mean", 1, geometric_probs, ratio, "logit", "probs"),
    Rule(dist.Binomial, "probs", "mean", 1, binomial_probs, ratio, None, "probs"),
    Rule(dist.Binomial, "logits", "mean", 1, binomial_probs, ratio, "logit", "probs"),
    Rule(dist.Multinomial, "probs", "probs", 1, count_vectors, normalise, None, "probs"),
    Rule(dist.Multinomial, "logits", "probs", 1, count_vectors, normalise, "log", "probs"),
]


def rules_for(fn) -> List[Rule]:
    """The rules whose attribute ``fn`` (wrappers stripped) was constructed with.

    Torch computes the other parametrisations lazily and caches them in the same ``__dict__``
    (``logits`` of a Categorical made with ``probs``, ``scale_tril`` of a MultivariateNormal made with
    ``covariance_matrix``): of the attributes for one canonical parameter, the first one set is the
    constructor's."""
    order = {name: i for i, name in enumerate(attributes(fn))}
    chosen: dict = {}
    for rule in RULES:
        if type(fn) is rule.family and rule.attr in order:
            key = rule.canonical
            if key not in chosen or order[rule.attr] < order[chosen[key].attr]:
                chosen[key] = rule
    return list(chosen.values())


def attributes(fn) -> dict:
    """The tensors a distribution was made from: its ``__dict__`` (a Multinomial keeps its probabilities
    in the Categorical it holds)."""
    return fn._categorical.__dict__ if type(fn) is dist.Multinomial else fn.__dict__


def unwrap(fn, w: torch.Tensor):
    """Strip ``Independent``, masking and expanding wrappers; broadcast the weights to the base batch shape.

    Returns the base distribution and weights of shape ``base.batch_shape``.
    """
    while True:
        if isinstance(fn, Independent):
            n = fn.reinterpreted_batch_ndims
            w = w.reshape(w.shape + (1,) * n)
            fn = fn.base_dist
        elif isinstance(fn, dist.MaskedDistribution):
            w = w * torch.as_tensor(fn._mask).to(w.dtype)  # _mask may be a bool (pyro.deterministic)
            fn = fn.base_dist
        elif isinstance(fn, ExpandedDistribution):  # Pyro's broadcast of a family without its own expand
            fn = fn.base_dist
        else:
            break
    return fn, w.expand(broadcast_shape(w.shape, fn.batch_shape))


def base(fn):
    """``fn`` with its ``Independent`` and masking wrappers stripped."""
    return unwrap(fn, torch.ones(()))[0]


def parts(fn) -> List[Tuple[str, object]]:
    """The distributions inside a site's that carry parameters: itself; a chain's observation distribution
    (``"emission"``); the two components of a ``MaskedMixture`` (``"mixture0"``, ``"mixture1"``)."""
    found = [("", fn)]
    if chains.is_chain(fn):
        found.append(("emission", fn.observation_dist))
    top = base(fn)
    if type(top) is dist.MaskedMixture:
        found += [("mixture0", top.component0), ("mixture1", top.component1)]
    return found


def view(site: dict, weights, part: str = ""):
    """(distribution, value, Q) over which a rule's statistics are taken; Q broadcast to the batch shape.

    ``part="emission"``: a chain site's observation distribution, its values x_t and Q(w_t). A chain's
    statistics are sums over all its time steps at once (a chain is never split into chunks, whose sums
    are added in float64): lower-precision weights and values are summed in float64.
    """
    if part == "emission":
        fn, w = unwrap(site["fn"].observation_dist, weights.emission)
        x = chains.emission_value(site["fn"], site["value"])
        if w.dtype in (torch.float16, torch.bfloat16, torch.float32):
            w, x = compact(w).double(), (x.double() if x.is_floating_point() else x)  # (.., T, K, 1), not (.., T, K, d)
        return fn, x, w
    if isinstance(weights, chains.ChainTerms):
        return site["fn"], site["value"], weights  # the chain's own tables
    fn, w = unwrap(site["fn"], weights)
    if part.startswith("mixture"):  # component 1 where the mask is true, component 0 elsewhere
        mask = fn.mask if part == "mixture1" else ~fn.mask
        fn, w = unwrap(fn.component1 if part == "mixture1" else fn.component0, w * mask.to(w.dtype))
    return fn, site["value"], w
