"""The Gaussian mixture model (GMM), as a plain Pyro program.

Generative story, for a data set S = {x^(1), ..., x^(n)}, x^(i) in R^d, with k components:

    z^(i) ~ Multinomial(phi)                    phi_j = p(z^(i) = j),  phi_j >= 0,  sum_j phi_j = 1
    x^(i) | z^(i) = j ~ N(mu_j, Sigma_j)

z^(i) is latent: never observed. Fitting maximises l(phi, mu, Sigma) = sum_i log sum_j
p(x^(i), z^(i) = j), which EM does by alternating the responsibilities
w_j^(i) = p(z^(i) = j | x^(i)) (E-step) with the closed-form updates of phi, mu, Sigma (M-step).

Parameters are ``pyro.param`` sites: ``phi`` (k,) on the simplex, ``mu`` (k, d),
``Sigma`` (k, d, d) positive definite. Their initial values come from ``init`` (a dict with
any of these names) or, if absent, from the data: phi uniform, mu = k distinct data points,
Sigma = the data covariance. Values already in Pyro's param store take precedence.

Reference: lecture notes, "Gaussian Mixture Model" and "EM algorithm".
"""

from typing import Dict, Optional

import torch
import pyro
import pyro.distributions as dist
from torch.distributions import constraints


def init_params(x: torch.Tensor, k: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Default initial values: uniform phi, k distinct data points as mu, the data covariance."""
    n, d = x.shape
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=g)[:k]
    cov = torch.cov(x.T).reshape(d, d) + 1e-6 * torch.eye(d, dtype=x.dtype)
    return {"phi": torch.full((k,), 1.0 / k, dtype=x.dtype), "mu": x[idx].clone(), "Sigma": cov.expand(k, d, d).clone()}


def model(x: torch.Tensor, k: int = 2, init: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """GMM on data ``x`` of shape (n, d) with ``k`` components."""
    n, d = x.shape
    init = init or {}
    default = None if all(name in init for name in ("phi", "mu", "Sigma")) else init_params(x, k)
    start = {name: init.get(name, default[name] if default else None) for name in ("phi", "mu", "Sigma")}
    phi = pyro.param("phi", lambda: start["phi"], constraint=constraints.simplex)  # (k,)
    mu = pyro.param("mu", lambda: start["mu"])  # (k, d)
    Sigma = pyro.param("Sigma", lambda: start["Sigma"], constraint=constraints.positive_definite)  # (k, d, d)
    with pyro.plate("data", n):
        z = pyro.sample("z", dist.Categorical(phi), infer={"enumerate": "parallel"})  # (n,) or (k, 1)
        pyro.sample("x", dist.MultivariateNormal(mu[z], covariance_matrix=Sigma[z]), obs=x)


def generate(n: int, phi: torch.Tensor, mu: torch.Tensor, Sigma: torch.Tensor, seed: int = 0):
    """Draw (x, z) by running the generative story forward: x (n, d), z (n,)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.multinomial(phi, n, replacement=True, generator=g)
    L = torch.linalg.cholesky(Sigma)  # (k, d, d)
    eps = torch.randn(n, mu.shape[-1], generator=g, dtype=mu.dtype)
    x = mu[z] + (L[z] @ eps.unsqueeze(-1)).squeeze(-1)
    return x, z
