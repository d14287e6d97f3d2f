"""The exact E-step against brute-force enumeration of every latent configuration."""

import itertools

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.ops.indexing import Vindex
from torch.distributions import constraints

import ppl_em

D = torch.float64


def mixture(x):
    phi = pyro.param("phi", torch.tensor([0.2, 0.5, 0.3], dtype=D), constraint=constraints.simplex)
    mu = pyro.param("mu", torch.tensor([-2.0, 0.0, 3.0], dtype=D))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(phi))
        pyro.sample("x", dist.Normal(mu[z], 1.0), obs=x)


def two_latents(x):
    """x^(i) depends on two latents: z1 in {0,1} (sign) and z2 in {0,1,2} (magnitude)."""
    p1 = pyro.param("p1", torch.tensor([0.3, 0.7], dtype=D), constraint=constraints.simplex)
    p2 = pyro.param("p2", torch.tensor([0.5, 0.25, 0.25], dtype=D), constraint=constraints.simplex)
    loc = pyro.param("loc", torch.tensor([[-1.0, -2.0, -4.0], [1.0, 2.0, 4.0]], dtype=D))
    with pyro.plate("data", len(x)):
        z1 = pyro.sample("z1", dist.Categorical(p1))
        z2 = pyro.sample("z2", dist.Categorical(p2))
        pyro.sample("x", dist.Normal(Vindex(loc)[z1, z2], 0.7), obs=x)


def hmm(x):
    """A 3-state HMM with Gaussian emissions, written with pyro.markov."""
    init = pyro.param("init", torch.tensor([0.6, 0.3, 0.1], dtype=D), constraint=constraints.simplex)
    trans = pyro.param("trans", torch.tensor([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.3, 0.6]], dtype=D),
                       constraint=constraints.simplex)
    mu = pyro.param("mu", torch.tensor([-1.0, 0.5, 2.0], dtype=D))
    z = None
    for t in pyro.markov(range(len(x))):
        probs = init if z is None else Vindex(trans)[z]
        z = pyro.sample(f"z_{t}", dist.Categorical(probs))
        pyro.sample(f"x_{t}", dist.Normal(mu[z], 0.8), obs=x[t])


def brute_force_mixture(x):
    phi, mu = pyro.param("phi").detach(), pyro.param("mu").detach()
    logj = phi.log() + dist.Normal(mu, 1.0).log_prob(x[:, None])  # (n, k)
    return logj.logsumexp(-1).sum(), (logj - logj.logsumexp(-1, keepdim=True)).exp()


def test_mixture_against_brute_force():
    x = torch.tensor([-2.5, -0.1, 0.4, 2.0, 3.3], dtype=D)
    post = ppl_em.EM(mixture).e_step(x)
    log_px, resp = brute_force_mixture(x)
    assert torch.allclose(post.log_evidence, log_px, rtol=1e-12)
    assert torch.allclose(post.marginal("z"), resp, atol=1e-12)
    joint, names = post.joint("x")
    assert names == ["z"] and torch.allclose(joint, resp, atol=1e-12)


def test_two_latents_joint_posterior_against_brute_force():
    x = torch.tensor([-3.5, -0.8, 1.1, 2.5], dtype=D)
    post = ppl_em.EM(two_latents).e_step(x)
    p1, p2, loc = (pyro.param(n).detach() for n in ("p1", "p2", "loc"))
    logj = p1.log()[:, None] + p2.log()[None, :] + dist.Normal(loc, 0.7).log_prob(x[:, None, None])  # (n, 2, 3)
    log_px = logj.logsumexp((-1, -2))
    joint = (logj - log_px[:, None, None]).exp()
    assert torch.allclose(post.log_evidence, log_px.sum(), rtol=1e-12)
    got, names = post.joint("x")
    assert names == ["z1", "z2"]
    assert torch.allclose(got, joint, atol=1e-12)
    assert torch.allclose(post.marginal("z1"), joint.sum(-1), atol=1e-12)
    assert torch.allclose(post.marginal("z2"), joint.sum(-2), atol=1e-12)


def hmm_brute_force(x):
    init, trans, mu = (pyro.param(n).detach() for n in ("init", "trans", "mu"))
    T, K = len(x), 3
    paths = list(itertools.product(range(K), repeat=T))
    logp = torch.stack([
        init[p[0]].log() + sum(trans[p[t - 1], p[t]].log() for t in range(1, T))
        + sum(dist.Normal(mu[p[t]], 0.8).log_prob(x[t]) for t in range(T))
        for p in paths
    ])
    return paths, logp


def test_hmm_pairwise_marginals_against_brute_force():
    x = torch.tensor([-1.2, 0.3, 2.2, 1.9, -0.5], dtype=D)
    post = ppl_em.EM(hmm).e_step(x)
    paths, logp = hmm_brute_force(x)
    log_px = logp.logsumexp(0)
    prob = (logp - log_px).exp()
    assert torch.allclose(post.log_evidence, log_px, rtol=1e-12)
    for t in range(1, len(x)):
        pair = torch.zeros(3, 3, dtype=D)
        for p, w in zip(paths, prob):
            pair[p[t - 1], p[t]] += w
        got, names = post.joint(f"z_{t}")
        assert names == [f"z_{t - 1}", f"z_{t}"]
        assert torch.allclose(got, pair, atol=1e-12)
        assert torch.allclose(post.marginal(f"z_{t}"), pair.sum(0), atol=1e-12)


def test_hard_posterior_is_the_joint_mode():
    x = torch.tensor([-1.2, 0.3, 2.2, 1.9, -0.5], dtype=D)
    post = ppl_em.EM(hmm, posterior="hard").e_step(x)
    paths, logp = hmm_brute_force(x)
    best = paths[int(logp.argmax())]
    assert torch.allclose(post.objective, logp.max(), rtol=1e-12)
    assert torch.allclose(post.log_evidence, logp.logsumexp(0), rtol=1e-12)
    for t, zt in enumerate(best):
        assert post.marginal(f"z_{t}").argmax().item() == zt
        assert post.marginal(f"z_{t}").max().item() == 1.0


def test_marginal_of_an_observed_site_is_a_clear_error():
    post = ppl_em.EM(mixture).e_step(torch.tensor([0.0, 1.0], dtype=D))
    with pytest.raises(KeyError, match="not an enumerated latent.*joint"):
        post.marginal("x")


def test_e_step_is_exact_under_no_grad():
    """The posterior is read off a gradient: a caller's no_grad() must not change it."""
    x = torch.tensor([-2.5, -0.1, 0.4, 2.0], dtype=D)
    em = ppl_em.EM(mixture)
    with torch.no_grad():
        post = em.e_step(x)
    assert torch.allclose(post.marginal("z"), brute_force_mixture(x)[1], atol=1e-12)
