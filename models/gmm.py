"""The Gaussian mixture model (GMM), as a plain Pyro program; with labels, GDA.

Generative story, for a data set S = {x^(1), ..., x^(n)}, x^(i) in R^d, with k components:

    z^(i) ~ Multinomial(phi)                    phi_j = p(z^(i) = j),  phi_j >= 0,  sum_j phi_j = 1
    x^(i) | z^(i) = j ~ N(mu_j, Sigma_j)

z^(i) is latent: never observed. Fitting maximises l(phi, mu, Sigma) = sum_i log sum_j
p(x^(i), z^(i) = j), which EM does by alternating the responsibilities
w_j^(i) = p(z^(i) = j | x^(i)) (E-step) with the closed-form updates of phi, mu, Sigma (M-step).

Covariance structures (``covariance_type``, as in scikit-learn's ``GaussianMixture``); the
parameter ``Sigma`` is stored in scikit-learn's ``covariances_`` layout:

    "full"       Sigma_j any positive-definite matrix          Sigma: (k, d, d)
    "diag"       Sigma_j = diag(Sigma[j])                      Sigma: (k, d)
    "spherical"  Sigma_j = Sigma[j] I                          Sigma: (k,)
    "tied"       Sigma_j = Sigma, shared by every component    Sigma: (d, d)

"full" and "tied" observe x^(i) under a ``MultivariateNormal`` whose covariance is a *selection*
of ``Sigma`` (indexing, broadcasting); "diag" and "spherical" under d independent
``Normal(mu_jl, sqrt(Sigma_jl))`` (``.to_event(1)``), the scale a square root of a selection. EM's
M-step finds the weighted-MLE closed form for all four.

Observed z (Gaussian discriminant analysis, GDA): when ``labels`` c^(i) are given, z^(i) is
observed and l(phi, mu, Sigma) = sum_i log p(x^(i), z^(i) = c^(i)) has the closed-form
maximiser phi_j = (1/n) sum_i 1{c^(i) = j}, mu_j and Sigma_j the mean and covariance of
class j: one M-step. With ``labels_mask`` only some labels are seen (semi-supervised EM):
labelled points have one-hot responsibilities, the others are enumerated as usual.

Parameters are ``pyro.param`` sites: ``phi`` (k,) on the simplex, ``mu`` (k, d) and ``Sigma``
(shape above). Their initial values come from ``init`` (a dict with any of these names) or,
if absent, from the data (:func:`init_params`). Values already in Pyro's param store take
precedence.

Missing values: a NaN entry x_l^(i) is missing, and the model observes only the rest of the
row, o^(i) = {l : x_l^(i) observed}, by marginalising the missing coordinates out:

    p(x_o^(i) | z^(i) = j) = N(x_o^(i); mu_{j,o}, Sigma_{j,oo})

(a Gaussian's marginal is the Gaussian of the selected coordinates). Rows without NaN are
modelled exactly as above; the site is still ``"x"``, with one observation per row, observed
at x with each NaN replaced by the placeholder 0 (:func:`observation`).

* "diag" and "spherical": the coordinates are independent given z, so the marginal is an
  element-wise mask, ``Normal(mu[z], sqrt(Sigma[z])).mask(observed).to_event(1)``. The M-step
  stays in closed form, the weighted MLE over the observed entries, o_l^(i) = 1{x_l^(i) observed}:

      mu_jl = sum_i w_j^(i) o_l^(i) x_l^(i) / sum_i w_j^(i) o_l^(i),
      Sigma_jl = sum_i w_j^(i) o_l^(i) (x_l^(i) - mu_jl)^2 / sum_i w_j^(i) o_l^(i)

  (summed over l as well for "spherical").
* "full" and "tied": a row with missing entries gets one d-dimensional Gaussian whose observed
  block is (mu_{j,o}, Sigma_{j,oo}) and whose missing coordinates have mean 0, variance
  1/(2 pi) and no correlation with the rest: the placeholder's density there is
  N(0; 0, 1/(2 pi)) = 1, so the row's density is exactly N(x_o; mu_{j,o}, Sigma_{j,oo}), and
  the E-step is exact. The exact M-step would need E[x_mis | x_o, z] and its second moment
  (Ghahramani & Jordan 1994), which are not statistics of the observed entries: the weighted
  mean of the observed entries maximises E_Q[log p(x_o, z)] over mu only where Sigma_j is
  diagonal. So mu and Sigma are selected with ``torch.where``, which EM does not read as a
  selection, and get the gradient M-step (L-BFGS on the exact E_Q[log p(x_o, z; theta)],
  which a step never decreases): a generalised EM, whose log p(x) never decreases either.
  phi keeps its closed form. Such a row costs a d x d Cholesky factorisation per component
  at every run of the model, and EM does not stream the data.

The default initial values (:func:`init_params`) fill each missing entry with its column's
mean over the observed entries. A column without any observed entry is an error.

Reference: lecture notes, "Gaussian Mixture Model", "GDA" and "EM algorithm"; Ghahramani &
Jordan, "Supervised learning from incomplete data via an EM approach", NIPS 1994.
"""

import math
from functools import cache, partial
from typing import Dict, Optional, Tuple

import torch
import pyro
import pyro.distributions as dist
from torch.distributions import constraints

COVARIANCE_TYPES = ("full", "diag", "spherical", "tied")


def _check_covariance_type(covariance_type: str) -> None:
    if covariance_type not in COVARIANCE_TYPES:
        raise ValueError(
            f"covariance_type must be one of {COVARIANCE_TYPES}, got {covariance_type!r}. "
            "Use 'full' for an unrestricted Sigma_j, 'diag', 'spherical' or 'tied' for fewer parameters."
        )


def init_params(x: torch.Tensor, k: int, seed: int = 0, covariance_type: str = "full") -> Dict[str, torch.Tensor]:
    """Default initial values: uniform phi, k distinct data points as mu, the data covariance.

    Parameters
    ----------
    x : torch.Tensor
        Data, shape (n, d).
    k : int
        Number of components.
    seed : int
        Seed of the choice of the k data points.
    covariance_type : {"full", "diag", "spherical", "tied"}
        Layout of ``Sigma`` (see the module docstring).

    Returns
    -------
    dict
        ``phi`` (k,), ``mu`` (k, d), ``Sigma`` in the layout of ``covariance_type``; for data with
        NaN, those of the data with each NaN at its column's mean (:func:`impute_means`).
    """
    _check_covariance_type(covariance_type)
    x = impute_means(x)
    n, d = x.shape
    if n < 2:
        raise ValueError(f"The default initial Sigma is the covariance of the data, which needs at least 2 rows; "
                         f"x has {n}. Pass more data, or initial values: init={{'Sigma': ...}}.")
    if k > n:
        raise ValueError(f"The default initial mu is k = {k} distinct rows of x, which has only {n}. "
                         f"Use k <= {n}, or pass init={{'mu': ...}}.")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=g)[:k]
    cov = torch.cov(x.T).reshape(d, d) + 1e-6 * torch.eye(d, dtype=x.dtype)  # (d, d)
    Sigma = {
        "full": cov.expand(k, d, d),
        "diag": cov.diagonal().expand(k, d),
        "spherical": cov.diagonal().mean().expand(k),
        "tied": cov,
    }[covariance_type]
    return {"phi": torch.full((k,), 1.0 / k, dtype=x.dtype), "mu": x[idx].clone(), "Sigma": Sigma.clone()}


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
        raise ValueError(f"Column {column} of x has no observed value (NaN in every row): its mean and variance "
                         "cannot be estimated. Drop that column, or pass init={'mu': ..., 'Sigma': ...}.")
    means = x.masked_fill(~seen, 0.0).sum(0) / counts  # (d,) mean over the observed entries
    return torch.where(seen, x, means)


def component_covariance(Sigma: torch.Tensor, z, d: int, covariance_type: str) -> torch.Tensor:
    """Sigma_{z}: the covariance matrices selected by ``z``, shape ``z.shape + (d, d)``.

    Every branch is a selection of ``Sigma`` (no arithmetic on its values), which is what
    lets EM recognise the closed-form M-step.
    """
    if covariance_type == "full":
        return Sigma[z]
    if covariance_type == "diag":
        return torch.diag_embed(Sigma[z])
    eye = torch.eye(d, dtype=Sigma.dtype, device=Sigma.device)
    if covariance_type == "spherical":
        return Sigma[z][..., None, None] * eye
    return Sigma  # tied: broadcast to every component


def model(
    x: torch.Tensor,
    k: int = 2,
    init: Optional[Dict[str, torch.Tensor]] = None,
    covariance_type: str = "full",
    labels: Optional[torch.Tensor] = None,
    labels_mask: Optional[torch.Tensor] = None,
) -> None:
    """GMM on data ``x`` of shape (n, d) with ``k`` components.

    Parameters
    ----------
    x : torch.Tensor
        Observations x^(i), shape (n, d); NaN marks a missing entry, marginalised out (module docstring).
    k : int
        Number of components.
    init : dict, optional
        Initial values for any of ``phi``, ``mu``, ``Sigma``; the rest from :func:`init_params`.
    covariance_type : {"full", "diag", "spherical", "tied"}
        Structure of Sigma_j.
    labels : torch.Tensor, optional
        Observed classes c^(i), long, shape (n,): GDA. Entries where ``labels_mask`` is False
        are ignored.
    labels_mask : torch.Tensor, optional
        Bool, shape (n,): which labels are observed (semi-supervised EM). Requires ``labels``.
    """
    _check_covariance_type(covariance_type)
    n, d = _check_inputs(x, labels, labels_mask)
    phi, mu, Sigma = _params(x, k, init, covariance_type)
    missing = torch.isnan(x)  # (n, d): True at a missing entry
    incomplete = bool(missing.any())
    seen = ~missing if incomplete else None  # None: every entry observed
    observed = x.masked_fill(missing, 0.0) if incomplete else x  # the placeholder 0 where missing
    with pyro.plate("data", n):
        # Pyro splits a masked site into z_observed and z_unobserved; only the latter is enumerated.
        z = pyro.sample("z", dist.Categorical(phi), obs=labels, obs_mask=labels_mask,
                        infer={"enumerate": "parallel"})  # (n,) or (k, 1)
        pyro.sample("x", observation(mu, Sigma, z, seen, covariance_type), obs=observed)


def observation(mu: torch.Tensor, Sigma: torch.Tensor, z, seen: Optional[torch.Tensor], covariance_type: str):
    """p(x_o^(i) | z^(i) = j) = N(x_o^(i); mu_{j,o}, Sigma_{j,oo}): the distribution of site ``x``.

    ``seen`` (n, d) is False at the missing entries, where the observed value is the placeholder 0; None
    where no entry is missing.
    "diag" and "spherical": the independent coordinates N(mu_jl, Sigma_jl), masked where x is
    missing (closed-form M-step). "full" and "tied": N(mu_z, Sigma_z) for a row without NaN;
    where a row has some, the observed block of (mu_z, Sigma_z) and mean 0, variance 1/(2 pi)
    at the missing coordinates, whose density there is exactly 1 (a gradient M-step; see the
    module docstring). The family and its attributes do not depend on whether a chunk of rows
    holds a NaN ("diag", "spherical") so that every chunk follows the same M-step plan. Batch
    shape (n,) or (k, n), event (d,).
    """
    d = mu.shape[-1]
    complete = seen is None or bool(seen.all())
    if covariance_type in ("diag", "spherical"):
        scale = Sigma[z].sqrt()  # (..., d) or (...,): sigma_z
        if covariance_type == "spherical":
            scale = scale[..., None].expand(scale.shape + (d,))
        base = dist.Normal(mu[z], scale)
        return (base if complete else base.mask(seen)).to_event(1)
    cov = component_covariance(Sigma, z, d, covariance_type)  # (..., d, d)
    if complete:
        return dist.MultivariateNormal(mu[z], covariance_matrix=cov)
    loc = torch.where(seen, mu[z], torch.zeros((), dtype=mu.dtype, device=mu.device))  # (n, d) or (k, n, d)
    per_row = cov.dim() >= 3 and cov.shape[-3] == seen.shape[0] > 1  # Sigma_z differs per row (z drawn, labels)
    # Rows that miss the same coordinates share their factor: one Cholesky per pattern, then picked per row.
    patterns, which = (seen, None) if per_row else torch.unique(seen, dim=0, return_inverse=True)  # (P, d), (n,)
    both = patterns[:, :, None] & patterns[:, None, :]  # (P, d, d): where Sigma_{z,oo} sits
    fill = torch.diag_embed((~patterns).to(mu.dtype)) / (2 * math.pi)  # (P, d, d): N(0; 0, 1/(2 pi)) = 1
    tril = torch.linalg.cholesky(torch.where(both, cov, fill))  # (P, d, d) or (k, P, d, d)
    if which is not None:
        tril = tril[..., which, :, :]  # (n, d, d) or (k, n, d, d)
    return dist.MultivariateNormal(loc, scale_tril=tril, validate_args=False)


def _check_inputs(x, labels, labels_mask) -> Tuple[int, int]:
    """(n, d) of ``x``; a clear error for data or labels of the wrong shape or type."""
    if not torch.is_tensor(x) or x.dim() != 2:
        got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"x must be a tensor of shape (n, d), got {got}. Reshape 1-d data with x[:, None].")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor (float32 or float64), got {x.dtype}. "
                         "Convert it with x.double().")
    n, d = x.shape
    if labels_mask is not None and labels is None:
        raise ValueError("labels_mask was given without labels; pass labels (n,) long with the observed classes.")
    if labels is not None and (labels.shape != (n,) or labels.dtype != torch.long):
        raise ValueError(f"labels must be a long tensor of shape ({n},), got {labels.dtype} {tuple(labels.shape)}.")
    if labels_mask is not None and (labels_mask.shape != (n,) or labels_mask.dtype != torch.bool):
        raise ValueError(f"labels_mask must be a bool tensor of shape ({n},), "
                         f"got {labels_mask.dtype} {tuple(labels_mask.shape)}.")
    return n, d


def _params(x, k: int, init: Optional[Dict[str, torch.Tensor]], covariance_type: str):
    """phi (k,), mu (k, d), Sigma: from the param store, else ``init``, else :func:`init_params`."""
    defaults = cache(partial(init_params, x, k, covariance_type=covariance_type))  # made at most once a run
    pd = constraints.positive_definite if covariance_type in ("full", "tied") else constraints.positive
    phi = pyro.param("phi", lambda: _start("phi", init, defaults), constraint=constraints.simplex)  # (k,)
    mu = pyro.param("mu", lambda: _start("mu", init, defaults))  # (k, d)
    Sigma = pyro.param("Sigma", lambda: _start("Sigma", init, defaults), constraint=pd)
    return phi, mu, Sigma


def _start(name: str, init: Optional[Dict[str, torch.Tensor]], defaults) -> torch.Tensor:
    """Initial value of parameter ``name``: ``init[name]`` if given, else ``defaults()[name]``.

    A fresh copy: the param store must never alias (and later update in place) the caller's tensor.
    Called only when the param store has no value yet; ``defaults`` is cached, made at most once a run.
    """
    value = init[name] if init and name in init else defaults()[name]
    return value.detach().clone()


def generate(
    n: int,
    phi: torch.Tensor,
    mu: torch.Tensor,
    Sigma: torch.Tensor,
    seed: int = 0,
    covariance_type: str = "full",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Draw (x, z) by running :func:`model` forward with the given parameters.

    Returns x (n, d) and z (n,). The model runs under ``poutine.uncondition`` (so x is drawn
    rather than observed) with a param store of its own and a forked random state seeded by
    ``seed``: the caller's store and random state are left untouched.
    """
    init = {"phi": phi, "mu": mu, "Sigma": Sigma}
    placeholder = mu.new_zeros(n, mu.shape[-1])  # fixes n and d; never observed
    with pyro.get_param_store().scope(), torch.random.fork_rng():
        torch.manual_seed(seed)
        sampler = pyro.poutine.uncondition(model)
        tr = pyro.poutine.trace(sampler).get_trace(placeholder, len(phi), init, covariance_type)
    return tr.nodes["x"]["value"].detach(), tr.nodes["z"]["value"].detach()
