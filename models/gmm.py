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

Each is written as a *selection* of ``Sigma`` (indexing, ``diag_embed``, a product with the
0/1 identity, broadcasting), so EM's M-step finds the weighted-MLE closed form for all four.

Observed z (Gaussian discriminant analysis, GDA): when ``labels`` c^(i) are given, z^(i) is
observed and l(phi, mu, Sigma) = sum_i log p(x^(i), z^(i) = c^(i)) has the closed-form
maximiser phi_j = (1/n) sum_i 1{c^(i) = j}, mu_j and Sigma_j the mean and covariance of
class j: one M-step. With ``labels_mask`` only some labels are seen (semi-supervised EM):
labelled points have one-hot responsibilities, the others are enumerated as usual.

Parameters are ``pyro.param`` sites: ``phi`` (k,) on the simplex, ``mu`` (k, d) and ``Sigma``
(shape above). Their initial values come from ``init`` (a dict with any of these names) or,
if absent, from the data (:func:`init_params`). Values already in Pyro's param store take
precedence.

Reference: lecture notes, "Gaussian Mixture Model", "GDA" and "EM algorithm".
"""

from functools import partial
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
        ``phi`` (k,), ``mu`` (k, d), ``Sigma`` in the layout of ``covariance_type``.
    """
    _check_covariance_type(covariance_type)
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
        Observations x^(i), shape (n, d).
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
    with pyro.plate("data", n):
        # Pyro splits a masked site into z_observed and z_unobserved; only the latter is enumerated.
        z = pyro.sample("z", dist.Categorical(phi), obs=labels, obs_mask=labels_mask,
                        infer={"enumerate": "parallel"})  # (n,) or (k, 1)
        cov = component_covariance(Sigma, z, d, covariance_type)
        pyro.sample("x", dist.MultivariateNormal(mu[z], covariance_matrix=cov), obs=x)


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
    defaults = partial(init_params, x, k, covariance_type=covariance_type)
    pd = constraints.positive_definite if covariance_type in ("full", "tied") else constraints.positive
    phi = pyro.param("phi", lambda: _start("phi", init, defaults), constraint=constraints.simplex)  # (k,)
    mu = pyro.param("mu", lambda: _start("mu", init, defaults))  # (k, d)
    Sigma = pyro.param("Sigma", lambda: _start("Sigma", init, defaults), constraint=pd)
    return phi, mu, Sigma


def _start(name: str, init: Optional[Dict[str, torch.Tensor]], defaults) -> torch.Tensor:
    """Initial value of parameter ``name``: ``init[name]`` if given, else ``defaults()[name]``.

    A fresh copy: the param store must never alias (and later update in place) the caller's tensor.
    Called only when the param store has no value yet, so ``defaults`` runs once per fit.
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
