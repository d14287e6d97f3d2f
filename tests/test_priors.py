"""Conjugate priors give closed-form MAP M-steps: each against a direct numpy MAP-EM.

The priors are written both ways users write them: as point-estimated global latents
(``pyro.sample("rate", Gamma(a, b))``) and as a prior factor on a ``pyro.param``
(``pyro.sample("prior", Beta(a, b), obs=p)``). The numpy oracle runs the same E-step and the
textbook MAP updates (Bishop, PRML, 2.2-2.3; Murphy, MLPP, 11.4.2.8).
"""

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import norm, poisson
from torch.distributions import constraints

import ppl_em

D = torch.float64
G = torch.Generator().manual_seed(7)


def _responsibilities(log_joint):
    """w_j^(i) = p(z^(i) = j | x^(i)) from log p(x^(i), z^(i) = j), (n, k)."""
    return np.exp(log_joint - logsumexp(log_joint, 1, keepdims=True))


def _steps(em, args, steps):
    for _ in range(steps):
        em.step(*args)
    return {k: v.numpy() for k, v in em.params.items()}


# -- Dirichlet on the weights, Gamma on Poisson rates: point-estimated global latents ---------------
def poisson_mixture_with_priors(x, alpha, a, b):
    weights = pyro.sample("weights", dist.Dirichlet(alpha))
    with pyro.plate("components", len(alpha)):
        rate = pyro.sample("rate", dist.Gamma(a, b))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(weights), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Poisson(rate[z]), obs=x)


def test_dirichlet_weights_and_gamma_rates_against_numpy_map_em():
    x = torch.cat([torch.poisson(torch.full((60,), 2.0, dtype=D), generator=G),
                   torch.poisson(torch.full((40,), 9.0, dtype=D), generator=G)])
    alpha, a, b = torch.tensor([3.0, 2.0], dtype=D), torch.tensor(2.0, dtype=D), torch.tensor(0.5, dtype=D)
    phi, rate = np.array([0.5, 0.5]), np.array([1.0, 5.0])
    pyro.param("weights", torch.tensor(phi), constraint=constraints.simplex)
    pyro.param("rate", torch.tensor(rate), constraint=constraints.positive)
    em = ppl_em.EM(poisson_mixture_with_priors)
    xn = x.numpy()
    for _ in range(15):
        w = _responsibilities(np.log(phi) + poisson.logpmf(xn[:, None], rate))
        nk = w.sum(0)
        phi = (nk + alpha.numpy() - 1) / (len(xn) + alpha.sum().item() - 2)  # (N_j + alpha_j - 1) / (n + sum alpha - k)
        rate = (w.T @ xn + a.item() - 1) / (nk + b.item())                  # (sum w x + a - 1) / (N_j + b)
        p = _steps(em, (x, alpha, a, b), 1)
        np.testing.assert_allclose(p["weights"], phi, rtol=1e-10)
        np.testing.assert_allclose(p["rate"], rate, rtol=1e-10)
    assert em.explain()["rate"].endswith("MAP with the conjugate Gamma prior at site rate")


# -- Beta on Bernoulli probabilities: a prior factor on a pyro.param ---------------------------------
def bernoulli_mixture_with_beta(x, a, b):
    phi = pyro.param("phi", torch.tensor([0.5, 0.5], dtype=D), constraint=constraints.simplex)
    p = pyro.param("p", torch.tensor([[0.6, 0.6, 0.4], [0.4, 0.3, 0.7]], dtype=D), constraint=constraints.unit_interval)
    pyro.sample("p_prior", dist.Beta(a, b).expand(p.shape).to_event(2), obs=p)
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(phi), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Bernoulli(p[z]).to_event(1), obs=x)


def test_beta_prior_factor_on_bernoulli_probabilities_against_numpy_map_em():
    truth = torch.tensor([[0.9, 0.8, 0.1], [0.1, 0.2, 0.9]], dtype=D)
    z = torch.randint(0, 2, (80,), generator=G)
    x = torch.bernoulli(truth[z], generator=G)
    a, b = 2.0, 3.0
    em = ppl_em.EM(bernoulli_mixture_with_beta)
    phi, p = np.array([0.5, 0.5]), np.array([[0.6, 0.6, 0.4], [0.4, 0.3, 0.7]])
    xn = x.numpy()
    for _ in range(10):
        log_joint = np.log(phi) + xn @ np.log(p).T + (1 - xn) @ np.log1p(-p).T
        w = _responsibilities(log_joint)
        nk = w.sum(0)
        phi, p = nk / len(xn), (w.T @ xn + a - 1) / (nk[:, None] + a + b - 2)
        params = _steps(em, (x, torch.tensor(a, dtype=D), torch.tensor(b, dtype=D)), 1)
        np.testing.assert_allclose(params["p"], p, rtol=1e-10)
        np.testing.assert_allclose(params["phi"], phi, rtol=1e-10)
    assert em.explain()["p"] == "closed form: Bernoulli.probs at site x, MAP with the conjugate Beta prior at site p_prior"


# -- a 1-D Gaussian mixture: Normal on the locations, InverseGamma on the variance or Gamma on the precision
def gmm_1d(x, m0, s0, a, b, scale_prior):
    phi = pyro.param("phi", torch.tensor([0.5, 0.5], dtype=D), constraint=constraints.simplex)
    v = pyro.param("v", torch.tensor([1.0, 1.0], dtype=D), constraint=constraints.positive)
    with pyro.plate("components", 2):
        locs = pyro.sample("locs", dist.Normal(m0, s0))
        if scale_prior == "InverseGamma":  # v is the variance sigma^2
            pyro.sample("v_prior", dist.InverseGamma(a, b), obs=v)
        else:  # v is the precision 1 / sigma^2
            pyro.sample("v_prior", dist.Gamma(a, b), obs=v)
    scale = v.sqrt() if scale_prior == "InverseGamma" else v.rsqrt()
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(phi), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(locs[z], scale[z]), obs=x)


@pytest.mark.parametrize("scale_prior", ["InverseGamma", "Gamma"])
def test_normal_locations_and_scale_priors_against_numpy_ecm(scale_prior):
    x = torch.cat([torch.randn(50, generator=G, dtype=D) * 0.7 - 2, torch.randn(70, generator=G, dtype=D) + 2.5])
    m0, s0, a, b = 0.0, 3.0, 3.0, 2.0
    pyro.param("locs", torch.tensor([-1.0, 1.0], dtype=D))
    em = ppl_em.EM(gmm_1d, reg_covar=0.0)
    phi, locs, var = np.array([0.5, 0.5]), np.array([-1.0, 1.0]), np.array([1.0, 1.0])
    xn = x.numpy()
    for _ in range(12):
        w = _responsibilities(np.log(phi) + norm.logpdf(xn[:, None], locs, np.sqrt(var)))
        nk = w.sum(0)
        phi = nk / len(xn)
        locs = (w.T @ xn / var + m0 / s0 ** 2) / (nk / var + 1 / s0 ** 2)  # given the current variance (ECM)
        m2 = (w * (xn[:, None] - locs) ** 2).sum(0)
        var = (m2 + 2 * b) / (nk + (2 * a + 2 if scale_prior == "InverseGamma" else 2 * a - 2))
        args = (x, torch.tensor(m0, dtype=D), torch.tensor(s0, dtype=D), torch.tensor(a, dtype=D),
                torch.tensor(b, dtype=D), scale_prior)
        p = _steps(em, args, 1)
        np.testing.assert_allclose(p["locs"], locs, rtol=1e-10)
        np.testing.assert_allclose(p["v"] if scale_prior == "InverseGamma" else 1 / p["v"], var, rtol=1e-10)
    assert em.explain()["v"].endswith(f"MAP with the conjugate {scale_prior} prior at site v_prior")
    assert em.explain()["locs"].endswith("MAP with the conjugate Normal prior at site locs")


# -- Wishart on precision matrices ----------------------------------------------------------------------
def gmm_wishart(x, df, V):
    phi = pyro.param("phi", torch.tensor([0.5, 0.5], dtype=D), constraint=constraints.simplex)
    mu = pyro.param("mu", torch.tensor([[-1.0, 0.0], [1.0, 0.0]], dtype=D))
    P = pyro.param("P", torch.eye(2, dtype=D).expand(2, 2, 2).clone(), constraint=constraints.positive_definite)
    with pyro.plate("components", 2):
        pyro.sample("P_prior", dist.Wishart(df, covariance_matrix=V), obs=P)
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(phi), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.MultivariateNormal(mu[z], precision_matrix=P[z]), obs=x)


def test_wishart_prior_on_precision_matrices_against_numpy_map_em():
    x = torch.cat([torch.randn(40, 2, generator=G, dtype=D) @ torch.tensor([[1.0, 0.5], [0.0, 0.6]], dtype=D) - 2,
                   torch.randn(60, 2, generator=G, dtype=D) + 2])
    df, V = torch.tensor(5.0, dtype=D), 0.5 * torch.eye(2, dtype=D)
    em = ppl_em.EM(gmm_wishart, reg_covar=0.0)
    phi, mu, cov = np.array([0.5, 0.5]), np.array([[-1.0, 0.0], [1.0, 0.0]]), np.stack([np.eye(2)] * 2)
    xn, v_inv = x.numpy(), np.linalg.inv(V.numpy())
    for _ in range(10):
        log_joint = np.log(phi) + np.stack([_mvn_logpdf(xn, mu[j], cov[j]) for j in range(2)], 1)
        w = _responsibilities(log_joint)
        nk = w.sum(0)
        phi, mu = nk / len(xn), (w.T @ xn) / nk[:, None]
        cov = np.stack([((w[:, j, None] * (xn - mu[j])).T @ (xn - mu[j]) + v_inv) / (nk[j] + df.item() - 2 - 1)
                        for j in range(2)])  # (M_j + V^-1) / (N_j + nu - d - 1)
        p = _steps(em, (x, df, V), 1)
        np.testing.assert_allclose(np.linalg.inv(p["P"]), cov, rtol=1e-9)
    assert em.explain()["P"].endswith("MAP with the conjugate Wishart prior at site P_prior")


def _mvn_logpdf(x, mu, cov):
    diff = x - mu
    _, logdet = np.linalg.slogdet(cov)
    return -0.5 * (np.einsum("ia,ab,ib->i", diff, np.linalg.inv(cov), diff) + logdet + len(mu) * np.log(2 * np.pi))


def test_a_non_conjugate_prior_keeps_the_gradient_m_step_and_says_why():
    def model(x):
        phi = pyro.param("phi", torch.tensor([0.5, 0.5], dtype=D), constraint=constraints.simplex)
        sigma = pyro.param("sigma", torch.tensor([1.0, 1.0], dtype=D), constraint=constraints.positive)
        pyro.sample("sigma_prior", dist.LogNormal(0.0, 1.0).expand([2]).to_event(1), obs=sigma)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(phi), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(torch.tensor([-2.0, 2.0], dtype=D)[z], sigma[z]), obs=x)

    x = torch.cat([torch.randn(30, generator=G, dtype=D) - 2, torch.randn(30, generator=G, dtype=D) + 2])
    em = ppl_em.EM(model)
    losses = [em.step(x) for _ in range(5)]
    assert all(b <= a + 1e-9 for a, b in zip(losses, losses[1:]))
    assert em.explain()["sigma"] == ("gradient (L-BFGS on E_Q[log p(x, z; theta)]): its LogNormal prior at site "
                                     "sigma_prior is not conjugate to its likelihood (variance)")
    assert em.explain()["phi"] == "closed form: Categorical.probs at site z"


def test_flat_priors_are_no_prior():
    def model(x):
        phi = pyro.sample("phi", dist.Dirichlet(torch.ones(2, dtype=D)))  # flat on the simplex
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(phi), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(torch.tensor([-2.0, 2.0], dtype=D)[z], 1.0), obs=x)

    x = torch.cat([torch.randn(20, generator=G, dtype=D) - 2, torch.randn(40, generator=G, dtype=D) + 2])
    pyro.param("phi", torch.tensor([0.5, 0.5], dtype=D), constraint=constraints.simplex)
    em = ppl_em.EM(model)
    for _ in range(30):
        em.step(x)
    w = em.e_step(x).marginal("z")
    assert torch.allclose(em.params["phi"], w.mean(0), atol=1e-8)  # the MLE: Dirichlet(1) adds nothing
