"""k-means as a mixture model: hard EM on it is Lloyd's algorithm.

Generative story, for S = {x^(1), ..., x^(n)}, x^(i) in R^d, with k clusters, fixed uniform
weights and one fixed isotropic covariance sigma^2 I (``scale`` = sigma, not a parameter):

    z^(i) ~ Uniform{1, ..., k}
    x^(i) | z^(i) = j ~ N(mu_j, sigma^2 I)

Only the centroids mu_j are parameters. log p(x^(i), z^(i) = j) = -||x^(i) - mu_j||^2 / (2 sigma^2)
+ const, so hard EM (``ppl_em.EM(model, posterior="hard")``) alternates exactly the two steps
of the lecture's k-means:

    c^(i) := argmin_j ||x^(i) - mu_j||^2                      (E-step: Q one-hot at the mode)
    mu_j  := sum_i 1{c^(i) = j} x^(i) / sum_i 1{c^(i) = j}     (M-step, closed form)

which is coordinate descent on the distortion J(c, mu) = sum_i ||x^(i) - mu_{c(i)}||^2
(:func:`distortion`); the hard-EM loss is J / (2 sigma^2) + n d log(sigma sqrt(2 pi)) + n log k.
Exact EM on the same file is soft k-means with stiffness 1 / sigma^2.

``metric="cosine"`` clusters directions (spherical k-means): the model sees the unit vectors
x^(i) / ||x^(i)|| and keeps each mu_j on the unit sphere (a ``constraints.sphere`` param). For
unit vectors ||x - mu_j||^2 = 2 - 2 cos(x, mu_j), so the E-step assigns each point to the
centroid of largest cosine similarity, and the M-step's weighted mean is projected back onto
the sphere by the constraint: mu_j := sum_{c^(i) = j} x^(i) / ||sum_{c^(i) = j} x^(i)||, the
mean direction (the von Mises-Fisher maximum-likelihood mean).

Missing values (``metric="euclidean"``): a NaN entry x_l^(i) is missing. The coordinates are
independent given z, so marginalising the missing ones out leaves the observed ones,
``Normal(mu[z], sigma).mask(observed).to_event(1)`` on x with each NaN replaced by the placeholder
0; distances are taken over the observed coordinates o^(i) and the centroids average the
observed entries:

    c^(i) := argmin_j sum_{l in o^(i)} (x_l^(i) - mu_jl)^2
    mu_jl := sum_i 1{c^(i) = j, l in o^(i)} x_l^(i) / sum_i 1{c^(i) = j, l in o^(i)}

(the closed form EM finds from the mask). :func:`assign`, :func:`distortion` and
:func:`kmeans_plusplus` do the same; :func:`init_params` seeds on the data with each NaN at its
column's mean. ``metric="cosine"`` needs whole rows (a direction has no missing part) and
refuses NaN.

Reference: lecture notes, "K-Means clustering Algorithm", "Distortion function", squared
distance vs cosine similarity; Dhillon & Modha, "Concept decompositions for large sparse text
data using clustering", 2001 (spherical k-means); Arthur & Vassilvitskii, "k-means++", 2007.
"""

from functools import cache, partial
from typing import Dict, Optional, Tuple

import torch
import pyro
import pyro.distributions as dist
from pyro.distributions import constraints  # adds constraints.sphere to torch's

METRICS = ("euclidean", "cosine")


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}. "
                         "'euclidean' clusters points by squared distance, 'cosine' clusters their directions.")


def prepare(x: torch.Tensor, metric: str = "euclidean") -> torch.Tensor:
    """The data the model sees: ``x`` itself, or each row scaled to unit length for ``"cosine"``."""
    _check_metric(metric)
    if not torch.is_tensor(x) or x.dim() != 2:
        got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"x must be a tensor of shape (n, d), got {got}. Reshape 1-d data with x[:, None].")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor (float32 or float64), got {x.dtype}. "
                         "Convert it with x.double().")
    if metric == "euclidean":
        return x
    if bool(torch.isnan(x).any()):
        first = tuple(int(i) for i in torch.isnan(x).nonzero()[0])
        raise ValueError(f"metric='cosine' clusters the directions of whole rows, but x has missing values "
                         f"(NaN, the first at index {first}). Impute or drop them, or use metric='euclidean', "
                         "which marginalises missing entries.")
    norm = x.norm(dim=-1, keepdim=True)  # (n, 1)
    if (norm == 0).any():
        first = int((norm[:, 0] == 0).nonzero()[0])
        raise ValueError(f"metric='cosine' needs nonzero rows, but x[{first}] is all zeros: it has no "
                         "direction. Drop such rows or use metric='euclidean'.")
    return x / norm


def kmeans_plusplus(x: torch.Tensor, k: int, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """k-means++ seeding by D^2 sampling.

    The first centre is a uniformly drawn data point; each next one is x^(i) with probability
    D(x^(i))^2 / sum_l D(x^(l))^2, where D(x) is the distance from x to the nearest centre
    chosen so far.

    Parameters
    ----------
    x : torch.Tensor
        Data, shape (n, d) (for cosine clustering, pass ``prepare(x, "cosine")``).
    k : int
        Number of centres, at most the number of distinct points.
    seed : int
        Seed of the draws (a private ``torch.Generator``).

    Returns
    -------
    centres : torch.Tensor
        Shape (k, d), rows of ``x`` (a NaN entry at its column's mean, :func:`impute_means`).
    indices : torch.Tensor
        Long, shape (k,): which rows.
    """
    n = len(x)
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the number of points ({n}), got {k}.")
    x = impute_means(x)
    g = torch.Generator().manual_seed(seed)
    indices = [int(torch.randint(n, (1,), generator=g))]
    d2 = ((x - x[indices[0]]) ** 2).sum(-1)  # (n,) squared distance to the nearest centre
    for _ in range(1, k):
        if not d2.sum() > 0:
            raise ValueError(f"x has fewer than k={k} distinct points; use a smaller k.")
        indices.append(int(torch.multinomial(d2, 1, generator=g)))
        d2 = torch.minimum(d2, ((x - x[indices[-1]]) ** 2).sum(-1))
    indices = torch.tensor(indices)
    return x[indices].clone(), indices


def impute_means(x: torch.Tensor) -> torch.Tensor:
    """``x`` (n, d) with each NaN replaced by the mean of its column's observed entries.

    Raises a ValueError for a column without any observed entry: nothing is known about it.
    """
    seen = ~torch.isnan(x)  # (n, d)
    if bool(seen.all()):
        return x
    counts = seen.sum(0)  # (d,)
    if not bool((counts > 0).all()):
        column = int((counts == 0).nonzero()[0])
        raise ValueError(f"Column {column} of x has no observed value (NaN in every row): no centroid "
                         "coordinate can be placed there. Drop that column, or pass init={'mu': ...}.")
    return torch.where(seen, x, x.masked_fill(~seen, 0.0).sum(0) / counts)


def squared_distances(x: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """||x^(i) - mu_j||^2 over the observed coordinates of x^(i) (all of them without NaN), shape (n, k)."""
    seen = ~torch.isnan(x)  # (n, d)
    if bool(seen.all()):
        # Exact distances: the matrix-product shortcut of cdist can flip near-ties.
        return torch.cdist(x, mu, compute_mode="donot_use_mm_for_euclid_dist") ** 2
    diff = x.masked_fill(~seen, 0.0)[:, None, :] - mu  # (n, k, d)
    return (diff * diff * seen[:, None, :]).sum(-1)


def assign(x: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """c^(i) = argmin_j ||x^(i) - mu_j||^2, long, shape (n,), for x (n, d) and mu (k, d); a NaN entry of x
    is missing and left out of the distance."""
    return squared_distances(x, mu).argmin(-1)


def distortion(x: torch.Tensor, mu: torch.Tensor, c: Optional[torch.Tensor] = None,
               metric: str = "euclidean") -> torch.Tensor:
    """J(c, mu) = sum_i ||x^(i) - mu_{c(i)}||^2, a scalar (over the observed entries where x has NaN).

    ``c`` defaults to the nearest-centroid assignment :func:`assign`, which minimises J over c.
    With ``metric="cosine"`` the rows of x are normalised first, so J = 2 sum_i (1 - cos(x^(i), mu_c(i)))
    for unit centroids.
    """
    x = prepare(x, metric)
    c = assign(x, mu) if c is None else c
    seen = ~torch.isnan(x)  # (n, d): a missing entry adds nothing
    return ((x.masked_fill(~seen, 0.0) - mu[c]) ** 2 * seen).sum()


def init_params(x: torch.Tensor, k: int, seed: int = 0, metric: str = "euclidean") -> Dict[str, torch.Tensor]:
    """Default initial centroids: k-means++ on the data the model sees. Returns ``{"mu": (k, d)}``."""
    return {"mu": kmeans_plusplus(prepare(x, metric), k, seed)[0]}


def _start(name: str, init: Optional[Dict[str, torch.Tensor]], defaults) -> torch.Tensor:
    """Initial value of parameter ``name``: ``init[name]`` if given, else ``defaults()[name]``.

    A fresh copy: the param store must never alias (and later update in place) the caller's tensor.
    Called only when the param store has no value yet; ``defaults`` is cached, made at most once a run.
    """
    value = init[name] if init and name in init else defaults()[name]
    return value.detach().clone()


def model(x: torch.Tensor, k: int = 2, init: Optional[Dict[str, torch.Tensor]] = None,
          metric: str = "euclidean", scale: float = 1.0) -> None:
    """The k-means mixture on data ``x`` of shape (n, d) with ``k`` clusters.

    Parameters
    ----------
    x : torch.Tensor
        Observations x^(i), shape (n, d); NaN marks a missing entry (``metric="euclidean"`` only).
    k : int
        Number of clusters.
    init : dict, optional
        ``{"mu": (k, d)}`` initial centroids; default :func:`init_params` (k-means++, seed 0).
    metric : {"euclidean", "cosine"}
        Squared distance, or cosine similarity of directions (see the module docstring).
    scale : float
        The fixed sigma of N(mu_j, sigma^2 I); irrelevant to hard EM, the softness of exact EM.
    """
    x = prepare(x, metric)
    n, d = x.shape
    sphere = constraints.sphere if metric == "cosine" else constraints.real
    defaults = cache(partial(init_params, x, k))  # made at most once a run
    mu = pyro.param("mu", lambda: _start("mu", init, defaults), constraint=sphere)  # (k, d)
    phi = x.new_full((k,), 1.0 / k)  # fixed uniform weights: not a parameter
    seen = ~torch.isnan(x)  # (n, d): False at a missing entry
    with pyro.plate("data", n):
        z = pyro.sample("z", dist.Categorical(phi), infer={"enumerate": "parallel"})  # (n,) or (k, 1)
        coords = dist.Normal(mu[z], scale)
        if not bool(seen.all()):  # p(x_o^(i) | z^(i)): the missing entries marginalised out (module docstring)
            coords = coords.mask(seen)
        pyro.sample("x", coords.to_event(1), obs=x.masked_fill(~seen, 0.0))


def generate(n: int, mu: torch.Tensor, seed: int = 0, scale: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Draw (x, z) by running :func:`model` forward: x (n, d), z (n,).

    Runs under ``poutine.uncondition`` with a private param store and a forked random state,
    so the caller's are untouched. The draws are N(mu_z, scale^2 I); for cosine clustering,
    pass unit-length ``mu`` and a small ``scale``: the rows then point near their mu_z.
    """
    placeholder = mu.new_ones(n, mu.shape[-1])  # fixes n and d; never observed
    with pyro.get_param_store().scope(), torch.random.fork_rng():
        torch.manual_seed(seed)
        sampler = pyro.poutine.uncondition(model)
        tr = pyro.poutine.trace(sampler).get_trace(placeholder, len(mu), {"mu": mu}, "euclidean", scale)
    return tr.nodes["x"]["value"].detach(), tr.nodes["z"]["value"].detach()
