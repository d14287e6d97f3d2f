"""Hard EM's E-step for a mixture (one latent z^(i) per data point, every site in the data's plate):
Q(z^(i)) is the one-hot of z^(i)* = argmax_j log p(x^(i), z^(i) = j; theta) and the objective is
sum_i max_j log p(x^(i), z^(i) = j; theta), both from the one (k, n) table that exact EM normalises.

Oracles: the general max-sum contraction (Pyro's ``MapRing``) and its backward pass, which the E-step
takes for any structure (forced here by switching the one-latent path off); brute force over z with
torch's own distributions; for ties, the contraction's rule (the first of the tied components); whole
hard-EM runs against the same runs through the contraction.
"""

import functools

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from torch.distributions import constraints

import ppl_em
from ppl_em import closed_form, posterior
from ppl_em.datasets import load_old_faithful
from ppl_em.fast import gaussian as fast_gaussian
from ppl_em.models import bernoulli_mixture, gmm, kmeans, poisson_mixture
from ppl_em.fast import normalise_exp, normalise_mode
from ppl_em.posterior import exact_posterior

from test_fused import COUNTS, masked, two_views, with_a_covariate, with_a_prior
from test_idioms import make_model, vindex_style

D = torch.float64
X = load_old_faithful()
BITS = (torch.rand(300, 6, generator=torch.Generator().manual_seed(0)) < 0.3).to(D)


def fixed_covariance(x):
    """A multivariate normal location alone: the covariance a constant of the model, not a parameter."""
    phi = pyro.param("phi", torch.tensor([0.5, 0.5], dtype=D), constraint=constraints.simplex)
    mu = pyro.param("mu", x[[0, -1]].clone())
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Categorical(phi), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.MultivariateNormal(mu[z], torch.cov(x.T)), obs=x)


MODELS = {
    "gmm model file": (gmm.model, (X, 3)),
    "gmm, float32 data": (gmm.model, (X.float(), 3)),
    "scale_tril": (make_model("scale_tril", "full"), (X,)),
    "precision_matrix, logits": (make_model("precision_matrix", "full", weights="logits"), (X,)),
    "Vindex, config_enumerate": (vindex_style, (X,)),
    "diagonal covariances": (functools.partial(gmm.model, covariance_type="diag"), (X, 2)),
    "k-means model file": (kmeans.model, ((X - X.mean(0)) / X.std(0), 3)),
    "a second factor per row (Poisson counts)": (two_views, (X, COUNTS)),
    "a factor of each row without z": (with_a_covariate, (X, 40 + 10 * torch.randn(
        len(X), generator=torch.Generator().manual_seed(2), dtype=D))),
    "poutine.scale": (poutine.scale(gmm.model, scale=2.5), (X, 2)),
    "a global latent under a prior (MAP-EM)": (with_a_prior, (X,)),
    "Poisson mixture file": (poisson_mixture.model, (COUNTS[:, None], 2)),
    "Bernoulli mixture file": (bernoulli_mixture.model, (BITS, 3)),
    "poutine.mask over the whole model (z masked too: the contraction)": (masked, (X,)),
    "a multivariate normal location alone (fixed covariance)": (fixed_covariance, (X,)),
}


@pytest.fixture(params=[False, True], ids=["GEMM form in one block", "GEMM form in 64-row blocks"])
def blocks(request, monkeypatch):
    if request.param:
        monkeypatch.setattr(fast_gaussian, "WHITEN_PAIRS", 0)
        monkeypatch.setattr(fast_gaussian, "FEATURE_ELEMENTS", 128 * 5)
        monkeypatch.setattr(fast_gaussian, "PASS_ELEMENTS", 0)  # the posterior's pass in blocks of 64 rows too
    return request.param


def _hard_em(model, args, steps: int = 1) -> ppl_em.EM:
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    em = ppl_em.EM(model, posterior="hard")
    for _ in range(steps):
        em.step(*args)
    return em


def _contraction(monkeypatch):
    """The E-step through the general contraction: the one-latent path switched off."""
    monkeypatch.setattr(posterior, "_one_latent_posterior", lambda tr, scale, workspace=None, hard=False, tables=True: None)


def _e_step(em, args, **options):
    return exact_posterior(em.model, em.structure, args, {}, mode="hard", leaves=False, **options)


def _assert_same(got, expected, rtol=1e-12):
    torch.testing.assert_close(got.log_evidence, expected.log_evidence, rtol=rtol, atol=0)
    torch.testing.assert_close(got.objective, expected.objective, rtol=rtol, atol=0)
    torch.testing.assert_close(got.log_prior, expected.log_prior, rtol=rtol, atol=0)
    assert got.weights.keys() == expected.weights.keys()
    for site, w in expected.weights.items():
        assert torch.equal(got.weights[site].to(w.dtype), w), site  # one-hot: the same mode, exactly


@pytest.mark.parametrize("name", MODELS)
def test_the_one_latent_hard_e_step_equals_the_max_sum_contraction(name, blocks, monkeypatch):
    model, args = MODELS[name]
    em = _hard_em(model, args, steps=2)  # parameters away from the start
    rtol = 1e-12 if args[0].dtype == D else 1e-6
    fused, plain = _e_step(em, args), _e_step(em, args, fuse=False)
    _contraction(monkeypatch)
    general = _e_step(em, args)
    _assert_same(plain, general, rtol)
    _assert_same(fused, general, rtol)
    for site, w in general.weights.items():  # the weights are one-hot along z (or ones where z does not enter)
        assert set(w.unique().tolist()) <= {0.0, float(general.trace.nodes[site]["scale"])}


def test_the_hard_e_step_is_the_mode_by_brute_force():
    """log p(x^(i), z = j) for every j with torch's MultivariateNormal; Q the one-hot of the argmax."""
    em = _hard_em(gmm.model, (X, 3), steps=3)
    phi, mu, sigma = (em.params[n] for n in ("phi", "mu", "Sigma"))
    joint = phi.log()[:, None] + torch.distributions.MultivariateNormal(mu[:, None], sigma[:, None]).log_prob(X)  # (k, n)
    post = _e_step(em, (X, 3))
    torch.testing.assert_close(post.objective, joint.amax(0).sum(), rtol=1e-12, atol=0)
    torch.testing.assert_close(post.log_evidence, joint.logsumexp(0).sum(), rtol=1e-12, atol=0)
    q = post.marginal("z")  # (n, k)
    assert torch.equal(q.argmax(-1), joint.argmax(0)) and torch.equal(q.sum(-1), torch.ones(len(X), dtype=D))


def tied(x):
    """Components 0 and 1 the same Gaussian with the same weight: every row ties between them."""
    phi = pyro.param("phi", torch.tensor([0.3, 0.3, 0.4], dtype=D), constraint=constraints.simplex)
    mu = pyro.param("mu", torch.stack([x.mean(0), x.mean(0), x[0]]))
    cov = pyro.param("cov", torch.cov(x.T).expand(3, 2, 2).clone(), constraint=constraints.positive_definite)
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Categorical(phi), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.MultivariateNormal(mu[z], cov[z]), obs=x)


def test_a_tie_goes_to_the_first_component_as_in_the_contraction(blocks, monkeypatch):
    pyro.clear_param_store()
    em = ppl_em.EM(tied, posterior="hard")
    em.structure = posterior.inspect_model(tied, (X,), {})
    fast = _e_step(em, (X,))
    q = fast.marginal("z")
    assert q[:, 1].sum() == 0 and q[:, 0].sum() > 0  # the tie 0 = 1 goes to 0, never to 1
    _contraction(monkeypatch)
    _assert_same(fast, _e_step(em, (X,)))


def masked_latent(x):
    """z itself masked for the first ten rows (no other factor reads it there): the fill that a masked
    latent gets differs between the sum and the max over z, so the general contraction is taken."""
    phi = pyro.param("phi", torch.tensor([0.4, 0.6], dtype=D), constraint=constraints.simplex)
    mu = pyro.param("mu", x[[0, -1]].clone())
    cov = pyro.param("cov", torch.cov(x.T).expand(2, 2, 2).clone(), constraint=constraints.positive_definite)
    keep = torch.arange(x.shape[0]) >= 10
    with pyro.plate("data", x.shape[0]):
        with poutine.mask(mask=keep):
            z = pyro.sample("z", dist.Categorical(phi), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.MultivariateNormal(mu[z], cov[z]), obs=x)


def test_a_masked_latent_takes_the_contraction_and_gets_its_answer(monkeypatch):
    em = _hard_em(masked_latent, (X,))
    post = _e_step(em, (X,))
    tr = posterior.trace_model(em.model, em.structure, (X,), {}, log_prob="value", leaf_params=False, graph=False)[0]
    assert posterior._one_latent_posterior(tr, 1.0, hard=True) is None
    _contraction(monkeypatch)
    _assert_same(post, _e_step(em, (X,)))


@pytest.mark.parametrize("name", ["gmm model file", "scale_tril", "k-means model file", "Poisson mixture file"])
def test_hard_em_runs_as_through_the_contraction(name, monkeypatch):
    """Ten hard-EM steps: the same losses (the objective before each update) and parameters either way."""
    model, args = MODELS[name]
    fast = _hard_em(model, args)
    losses = [fast.step(*args) for _ in range(10)]
    params = {n: v.clone() for n, v in fast.params.items()}
    _contraction(monkeypatch)
    general = _hard_em(model, args)
    expected = [general.step(*args) for _ in range(10)]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-12, atol=0)
    for n, v in general.params.items():
        torch.testing.assert_close(params[n], v, rtol=1e-10, atol=1e-12)
    assert all(b <= a + 1e-9 * abs(a) for a, b in zip(losses, losses[1:]))  # hard EM's objective never falls


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_normalise_mode_against_torch(dtype):
    """The one-hot of torch.max's index, torch.max's values and torch.logsumexp's, on a table with a tie,
    an all -inf column and an inf; in place or not."""
    g = torch.Generator().manual_seed(3)
    table = (torch.randn(4, 50, generator=g, dtype=torch.float64) * 30).to(dtype)
    table[1, 7] = table[3, 7] = table[:, 7].max() + 1  # a tie: the first
    table[:, 8] = -float("inf")
    table[2, 9] = float("inf")
    for in_place in (False, True):
        t = table.clone()
        q, lse, best = normalise_mode(t, 0, in_place)
        values, index = table.max(0, keepdim=True)
        assert torch.equal(q, torch.zeros_like(table).scatter_(0, index, 1.0)) and q[1, 7] == 1 and q[3, 7] == 0
        assert torch.equal(best, values)
        torch.testing.assert_close(lse, torch.logsumexp(table, 0, keepdim=True), rtol=1e-6 if dtype != D else 1e-14, atol=0)
        assert torch.equal(lse, normalise_exp(table.clone(), 0)[1])  # the same lse as exact EM's, to the bit
        assert (q is t) == in_place


def test_normalise_mode_with_a_graph_keeps_torch_max_gradient():
    """With a graph: the maximum's gradient is the one-hot of torch.max's index (a tie: the first), as the
    max-sum contraction's; the one-hot itself carries no graph."""
    leaf = torch.tensor([[1.0, 5.0, 2.0], [3.0, 5.0, -1.0]], dtype=D, requires_grad=True)
    q, lse, best = normalise_mode(leaf * 1.0, 0)
    assert not q.requires_grad and torch.equal(q, torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]], dtype=D))
    (grad,) = torch.autograd.grad(best.sum(), leaf)
    assert torch.equal(grad, q)
    torch.testing.assert_close(lse, torch.logsumexp(leaf, 0, keepdim=True), rtol=1e-15, atol=0)


@pytest.mark.parametrize("name", ["k-means model file", "a multivariate normal location alone (fixed covariance)"])
@pytest.mark.parametrize("posterior_mode", ["exact", "hard"])
def test_a_location_alone_takes_its_statistics_from_the_fused_pass(name, posterior_mode, monkeypatch):
    """The scale is not a parameter, so mu's statistics are a location's (sum_i w x, sum_i w): read off the
    pass's own sums (families.location_from_pass), equal to summing Q times the rows again."""
    monkeypatch.setattr(fast_gaussian, "WHITEN_PAIRS", 0)  # the GEMM form (and its fused pass) at this size
    model, args = MODELS[name]
    pyro.clear_param_store()
    em = ppl_em.EM(model, posterior=posterior_mode)
    em.step(*args)
    fused = exact_posterior(em.model, em.structure, args, {}, mode=posterior_mode, leaves=False)
    plain = exact_posterior(em.model, em.structure, args, {}, mode=posterior_mode, leaves=False, fuse=False)
    assert "x" in fused.sums and plain.sums == {}
    found = []
    original = closed_form.location_from_pass
    monkeypatch.setattr(closed_form, "location_from_pass", lambda *a: found.append(original(*a)) or found[-1])
    got = closed_form.summarize(em.plan, fused)
    assert sum(f is not None for f in found) == 1  # mu's use (phi's, a Categorical's, sums its weights)
    expected = closed_form.summarize(em.plan, plain)
    assert got.sums.keys() == expected.sums.keys()
    for key, value in expected.sums.items():
        torch.testing.assert_close(got.sums[key], value, rtol=1e-12, atol=1e-12 * float(value.abs().max()))


@pytest.mark.parametrize("name", ["gmm model file", "k-means model file"])
def test_hard_em_in_chunks_equals_it_whole(name):
    """The step streams the rows in chunks of 64 (each chunk's modes and maxima from its own pass, the
    statistics added): the same losses and parameters as the whole data in one pass."""
    model, args = MODELS[name]
    runs = []
    for chunk_size in (None, 64):
        pyro.clear_param_store()
        em = ppl_em.EM(model, posterior="hard", chunk_size=chunk_size)
        runs.append(([em.step(*args) for _ in range(6)], {n: v.clone() for n, v in em.params.items()}))
        assert (em._chunks.rows is None) == (chunk_size is None)
    torch.testing.assert_close(torch.tensor(runs[1][0]), torch.tensor(runs[0][0]), rtol=1e-12, atol=0)
    for n, v in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][n], v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("posterior_mode", ["exact", "hard"])
@pytest.mark.parametrize("name", [n for n in MODELS if "masked" not in n])
def test_the_check_at_rest_takes_its_gradient_from_one_run_as_from_two(name, posterior_mode):
    """EM's check at rest: the gradient of E_Q[log p(x, z; theta)] in every parameter at the Q of the same theta,
    from one run of a mixture (Q read from the differentiable trace's table) equals the one from the posterior's
    own run and a second, differentiable run (oracle), with reg_covar's term, on every style of mixture."""
    model, args = MODELS[name]
    em = _hard_em(model, args, steps=3) if posterior_mode == "hard" else ppl_em.EM(model, reg_covar=1e-3)
    if posterior_mode == "exact":
        pyro.clear_param_store()
        for _ in range(3):
            em.step(*args)
    names = sorted(em.plan.closed)
    with pyro.validation_enabled(False):
        trace, quick = posterior.differentiable_posterior(em.model, em.structure, args, {}, em.posterior)
        fast = ppl_em.gradient.unconstrained_grads(lambda: em._objective(quick, args, {}, em.reg_covar, trace), names)
        slow_post = exact_posterior(em.model, em.structure, args, {}, mode=em.posterior, leaves=False, fuse=False)
        slow = ppl_em.gradient.unconstrained_grads(lambda: em._objective(slow_post, args, {}, em.reg_covar), names)
    for p in names:
        scale = 1.0 + float(slow[p].abs().max())
        torch.testing.assert_close(fast[p], slow[p], rtol=0, atol=1e-9 * scale * len(args[0]))
    for number in ("objective", "log_evidence", "log_prior"):
        torch.testing.assert_close(getattr(quick, number), getattr(slow_post, number), rtol=1e-12, atol=0)


def test_the_check_at_rest_of_a_chain_takes_two_runs():
    from ppl_em.models import hmm
    x, _ = hmm.generate(6, pi=torch.tensor([0.5, 0.5], dtype=D), A=torch.tensor([[0.9, 0.1], [0.2, 0.8]], dtype=D),
                        mu=torch.tensor([[-1.0], [1.0]], dtype=D), sigma=torch.tensor([[1.0], [1.0]], dtype=D),
                        num_sequences=2, seed=0)
    em = ppl_em.EM(hmm.vectorized_model)
    em.step(x, 2)
    assert posterior.differentiable_posterior(em.model, em.structure, (x, 2), {}) is None
