"""The E-step's one pass over the rows for a Gaussian mixture (``exact_posterior(..., fuse=True)``):
the log-densities log N(x^(i) | mu_z, Sigma_z), Q(z) and the M-step's sums N_z, S_z, M_z from the
same blocks of sufficient statistics.

Oracles: the same E-step with ``fuse=False`` (the log-densities, Q(z) and the sums each a pass of
their own), on models written the ways users write them; scikit-learn's trajectory for whole EM
runs. The tables are made small enough here (``WHITEN_PAIRS``, ``FEATURE_ELEMENTS``) that the GEMM
form and several blocks are used on Old Faithful's 272 rows. Where the pass does not apply (a mask,
parameter leaves, two Gaussian sites, a form that would cancel digits), the E-step must be
the unfused one. Hard EM takes the same pass, with Q the one-hot of each row's mode.
"""

import functools

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from torch.distributions import constraints

import ppl_em
from ppl_em import closed_form, families
from ppl_em.datasets import load_old_faithful
from ppl_em.fast import gaussian as fast_gaussian
from ppl_em.models import gmm
from ppl_em.posterior import exact_posterior

from test_idioms import MU0, _sklearn, make_model, vindex_style

D = torch.float64
X = load_old_faithful()
N = X.shape[0]


@pytest.fixture(autouse=True)
def gemm_form_in_blocks(monkeypatch):
    monkeypatch.setattr(fast_gaussian, "WHITEN_PAIRS", 0)  # the exponential-family GEMM form at any size
    monkeypatch.setattr(fast_gaussian, "FEATURE_ELEMENTS", 128 * 5)  # d = 2: 5 features; 128-row blocks
    monkeypatch.setattr(fast_gaussian, "PASS_ELEMENTS", 0)  # the posterior's pass in blocks of 64 rows


def two_views(x, counts):
    """Each point seen twice, as a Gaussian position and as Poisson counts: a second factor per row and z."""
    phi = pyro.param("phi", torch.full((2,), 0.5, dtype=D), constraint=constraints.simplex)
    mu = pyro.param("mu", MU0.clone())
    cov = pyro.param("cov", torch.cov(X.T).expand(2, 2, 2).clone(), constraint=constraints.positive_definite)
    rate = pyro.param("rate", torch.tensor([2.0, 6.0], dtype=D), constraint=constraints.positive)
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Categorical(phi), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.MultivariateNormal(mu[z], cov[z]), obs=x)
        pyro.sample("counts", dist.Poisson(rate[z]), obs=counts)


def with_a_covariate(x, age):
    """A factor of each row that z does not enter (an observed covariate), in the mixture's plate."""
    phi = pyro.param("phi", torch.full((2,), 0.5, dtype=D), constraint=constraints.simplex)
    mu = pyro.param("mu", MU0.clone())
    cov = pyro.param("cov", torch.cov(X.T).expand(2, 2, 2).clone(), constraint=constraints.positive_definite)
    spread = pyro.param("spread", torch.tensor(5.0, dtype=D), constraint=constraints.positive)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("age", dist.Normal(40.0, spread), obs=age)
        z = pyro.sample("z", dist.Categorical(phi), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.MultivariateNormal(mu[z], cov[z]), obs=x)


def with_a_prior(x):
    """mu a point-estimated global latent under a Normal prior (MAP-EM): a sample site beside the data's."""
    phi = pyro.param("phi", torch.full((2,), 0.5, dtype=D), constraint=constraints.simplex)
    mu = pyro.sample("mu", dist.Normal(MU0, 10.0).to_event(2))
    cov = pyro.param("cov", torch.cov(X.T).expand(2, 2, 2).clone(), constraint=constraints.positive_definite)
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Categorical(phi), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.MultivariateNormal(mu[z], cov[z]), obs=x)


def two_gaussians(x):
    """Two Gaussian observations of each point under the same z: two deferred tables, no fused pass."""
    phi = pyro.param("phi", torch.full((2,), 0.5, dtype=D), constraint=constraints.simplex)
    mu = pyro.param("mu", MU0.clone())
    nu = pyro.param("nu", MU0.flip(0).clone())
    cov = pyro.param("cov", torch.cov(X.T).expand(2, 2, 2).clone(), constraint=constraints.positive_definite)
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Categorical(phi), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.MultivariateNormal(mu[z], cov[z]), obs=x)
        pyro.sample("y", dist.MultivariateNormal(nu[z], cov[z]), obs=x.flip(-1))


def masked(x):
    """The first ten rows masked out of the likelihood (poutine.mask)."""
    keep = torch.arange(x.shape[0]) >= 10
    with poutine.mask(mask=keep):
        gmm.model(x, 2)


COUNTS = torch.distributions.Poisson((X[:, 0] > 3.0).to(D) * 4 + 2).sample()
FUSED = {
    "gmm model file": (gmm.model, (X, 3)),
    "gmm, float32 data": (gmm.model, (X.float(), 3)),
    "scale_tril": (make_model("scale_tril", "full"), (X,)),
    "precision_matrix, logits": (make_model("precision_matrix", "full", weights="logits"), (X,)),
    "tied covariance": (make_model("covariance_matrix", "tied"), (X,)),
    "Vindex, config_enumerate": (vindex_style, (X,), "obs"),
    "a second factor per row (Poisson counts)": (two_views, (X, COUNTS)),
    "poutine.scale": (poutine.scale(gmm.model, scale=2.5), (X, 2)),
    "a factor of each row without z": (with_a_covariate, (X, 40 + 10 * torch.randn(N, dtype=D))),
    "diagonal: Normal(...).to_event(1)": (functools.partial(gmm.model, covariance_type="diag"), (X, 2)),
    "diagonal, float32 data": (functools.partial(gmm.model, covariance_type="diag"), (X.float(), 2)),
    "spherical": (functools.partial(gmm.model, covariance_type="spherical"), (X, 2)),
    "a global latent under a prior (MAP-EM)": (with_a_prior, (X,)),
}
UNFUSED = {
    "two Gaussian sites": (two_gaussians, (X,), {}),
    "poutine.mask": (masked, (X,), {}),
    "parameter leaves": (gmm.model, (X, 2), {"leaves": True}),
}


def _planned(model, args):
    """An EM object whose plan and structure are made (one step from a cleared param store)."""
    pyro.clear_param_store()
    em = ppl_em.EM(model)
    em.step(*args)
    return em


def _assert_same_e_step(em, args, monkeypatch=None, **options):
    """exact_posterior with and without the fused pass: the same log p(x), Q(z), tables and statistics
    (with ``monkeypatch``: the fused posterior's statistics must take the pass's sums, not sum again).
    Returns the fused posterior."""
    fused = exact_posterior(em.model, em.structure, args, {}, leaves=options.pop("leaves", False), **options)
    plain = exact_posterior(em.model, em.structure, args, {}, leaves=fused.leaves != {}, fuse=False, **options)
    assert plain.sums == {}
    # float32 tables: the pass rounds a float64 block where the separate passes work in float32 throughout
    tol = {"rtol": 1e-10, "atol": 1e-10} if plain.log_evidence.dtype == D else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(fused.log_evidence, plain.log_evidence, rtol=min(1e-12, tol["rtol"] / 10), atol=0)
    torch.testing.assert_close(fused.objective, plain.objective, rtol=min(1e-12, tol["rtol"] / 10), atol=0)
    torch.testing.assert_close(fused.log_prior, plain.log_prior, rtol=1e-12, atol=0)
    assert fused.weights.keys() == plain.weights.keys()
    for site, w in plain.weights.items():
        torch.testing.assert_close(fused.weights[site], w, **tol)
    for name, node in plain.trace.nodes.items():
        if node["type"] == "sample":
            other = fused.trace.nodes[name]
            assert "_features" not in other, name  # every deferred table was computed
            torch.testing.assert_close(other["log_prob"], node["log_prob"], **tol)
            assert other["packed"]["log_prob"]._pyro_dims == node["packed"]["log_prob"]._pyro_dims
    if not fused.leaves:
        expected = closed_form.summarize(em.plan, plain)
        if monkeypatch is not None:
            monkeypatch.setattr(families.GaussianSums, "summarize", lambda *a: pytest.fail("summed again"))
        got = closed_form.summarize(em.plan, fused)
        assert got.sums.keys() == expected.sums.keys()
        for key, value in expected.sums.items():
            torch.testing.assert_close(got.sums[key], value, rtol=tol["rtol"], atol=10 * tol["rtol"] * float(value.abs().max()))
    return fused


@pytest.mark.parametrize("name", FUSED)
def test_the_fused_pass_gives_the_e_step_of_separate_passes(name, monkeypatch):
    model, args, *site = FUSED[name]
    fused = _assert_same_e_step(_planned(model, args), args, monkeypatch)
    assert list(fused.sums) == (site or ["x"])  # the pass applied here


@pytest.mark.parametrize("name", FUSED)
def test_hard_em_takes_the_fused_pass_too(name, monkeypatch):
    """Q the one-hot of each row's mode, the objective the sum of the rows' maxima: as the separate passes."""
    model, args, *site = FUSED[name]
    fused = _assert_same_e_step(_planned(model, args), args, monkeypatch, mode="hard")
    assert list(fused.sums) == (site or ["x"])
    assert fused.objective <= fused.log_evidence  # max_z p(x, z) <= sum_z p(x, z)


@pytest.mark.parametrize("mode", ["exact", "hard"])
@pytest.mark.parametrize("name", FUSED)
def test_a_pass_without_its_table_gives_the_same_q_sums_and_statistics(name, mode):
    """``tables=False`` (EM's own steps): the Gaussian site's log-density table is not kept, and everything EM
    reads is the same to the bit; the site's entries are NaN of the table's shape (a read would show)."""
    model, args, *site = FUSED[name]
    em = _planned(model, args)
    kept, dropped = (exact_posterior(em.model, em.structure, args, {}, mode=mode, leaves=False, tables=t)
                     for t in (True, False))
    site = (site or ["x"])[0]
    assert list(dropped.sums) == [site]
    assert torch.equal(dropped.log_evidence, kept.log_evidence) and torch.equal(dropped.objective, kept.objective)
    for name_, w in kept.weights.items():
        assert torch.equal(dropped.weights[name_], w), name_
    for key in ("n", "s", "m", "c"):
        assert torch.equal(getattr(dropped.sums[site], key), getattr(kept.sums[site], key)), key
    expected, got = closed_form.summarize(em.plan, kept), closed_form.summarize(em.plan, dropped)
    assert got.sums.keys() == expected.sums.keys()
    assert all(torch.equal(got.sums[k], v) for k, v in expected.sums.items())
    lost, table = dropped.trace.nodes[site]["log_prob"], kept.trace.nodes[site]["log_prob"]
    assert lost.shape == table.shape and bool(lost.isnan().all()) and bool(table.isfinite().all())


@pytest.mark.parametrize("name", UNFUSED)
def test_where_the_fused_pass_does_not_apply_the_e_step_is_the_plain_one(name):
    model, args, options = UNFUSED[name]
    fused = _assert_same_e_step(_planned(model, args), args, **options)
    assert fused.sums == {}


def test_float32_data_get_q_from_a_float64_block_at_least_as_accurate_as_float32_passes():
    """Oracle: Q(z) in float64 by torch's own log-densities at the same float32 parameters, and the same
    float32 Cholesky factor of Sigma that both E-steps take from the model's distribution (its rounding, about
    1e-7 of Q, would otherwise hide the passes' own: the two errors then differ by noise from one CPU to the
    next)."""
    x = X.float()
    em = _planned(gmm.model, (x, 3))
    fused = exact_posterior(gmm.model, em.structure, (x, 3), {}, leaves=False)
    plain = exact_posterior(gmm.model, em.structure, (x, 3), {}, leaves=False, fuse=False)
    phi, mu = (pyro.param(name).detach().double() for name in ("phi", "mu"))
    tril = torch.linalg.cholesky(pyro.param("Sigma").detach()).double()  # as the float32 distribution makes it
    log_joint = phi.log()[:, None] + dist.MultivariateNormal(mu[:, None], scale_tril=tril[:, None]).log_prob(X)  # (k, n)
    truth = torch.softmax(log_joint, 0)
    assert fused.weights["x"].dtype == torch.float32 and list(fused.sums) == ["x"]
    error = {name: float((post.weights["x"].double() - truth).abs().max()) for name, post in
             (("fused", fused), ("plain", plain))}
    assert error["fused"] <= error["plain"] and error["fused"] < 1e-6, error


def test_a_form_that_would_cancel_digits_falls_back_to_whitening():
    """Tight clusters 2000 apart: |x - c|^2 ||Sigma^{-1}|| = 1e12, the GEMM form is refused in the pass too."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.tensor([-1e3, 0.0], dtype=D) + 1e-3 * torch.randn(150, 2, generator=g, dtype=D),
                   torch.tensor([1e3, 5.0], dtype=D) + 1e-3 * torch.randn(150, 2, generator=g, dtype=D)])
    init = {"phi": torch.full((2,), 0.5, dtype=D), "mu": torch.tensor([[-1e3, 0.0], [1e3, 5.0]], dtype=D),
            "Sigma": torch.eye(2, dtype=D).expand(2, 2, 2) * 1e-6}
    em = _planned(gmm.model, (x, 2, init))
    post = _assert_same_e_step(em, (x, 2, init))
    assert post.sums == {}
    site = post.trace.nodes["x"]
    torch.testing.assert_close(site["log_prob"], site["fn"].log_prob(x), rtol=1e-10, atol=0)


@pytest.mark.parametrize("idiom", ["covariance_matrix", "scale_tril", "precision_matrix"])
def test_em_with_the_fused_pass_follows_scikit_learns_trajectory(idiom, monkeypatch):
    passes = []
    original = fast_gaussian.GaussianFeatures.posterior_sums
    monkeypatch.setattr(fast_gaussian.GaussianFeatures, "posterior_sums",
                        lambda self, *a: passes.append(1) or original(self, *a))
    pyro.clear_param_store()
    em = ppl_em.EM(make_model(idiom, "full", weights="probs" if idiom != "precision_matrix" else "logits"))
    em._tape.off = "the spy counts the pass's calls from Python, which a replayed step does not make"
    losses = [em.step(X) for _ in range(12)]
    assert all(b <= a + 1e-9 for a, b in zip(losses, losses[1:]))  # EM's guarantee: log p(x) never falls
    gm = _sklearn("full", 12)
    final = em.log_likelihood(X) / N
    assert abs(final - gm.score(X.numpy())) < 1e-6 * abs(final)
    np.testing.assert_allclose(em.params["mu"].numpy(), gm.means_, rtol=1e-6)
    assert len(passes) >= 11  # every step after the first (whose E-step makes the plan) made the one pass


def test_a_table_of_at_most_whiten_pairs_is_not_deferred(monkeypatch):
    """The whitened form computes a small table (K N <= WHITEN_PAIRS pairs) on its own, with no GEMM form made first."""
    fn = dist.MultivariateNormal(MU0.unsqueeze(-2), torch.cov(X.T))  # K = 2 components against N rows
    monkeypatch.setattr(fast_gaussian, "WHITEN_PAIRS", 2 * N)
    assert fast_gaussian.mvn_features(fn, X) is None
    monkeypatch.setattr(fast_gaussian, "WHITEN_PAIRS", 2 * N - 1)
    features = fast_gaussian.mvn_features(fn, X)
    assert features is not None and features.shape == (2, N)
    torch.testing.assert_close(features.laid_out(features.table()), fn.log_prob(X), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("structure", ["diag", "spherical"])
def test_em_on_a_diagonal_gmm_through_the_pass_follows_scikit_learn(structure, monkeypatch):
    from sklearn.mixture import GaussianMixture

    passes = []
    original = fast_gaussian.GaussianFeatures.posterior_sums
    monkeypatch.setattr(fast_gaussian.GaussianFeatures, "posterior_sums",
                        lambda self, *a: passes.append(type(self).__name__) or original(self, *a))
    init = gmm.init_params(X, 2, covariance_type=structure)
    pyro.clear_param_store()
    em = ppl_em.EM(gmm.model, reg_covar=1e-6)
    em._tape.off = "the spy counts the pass's calls from Python, which a replayed step does not make"
    losses = [em.step(X, 2, init, covariance_type=structure) for _ in range(12)]
    assert all(b <= a + 1e-9 for a, b in zip(losses, losses[1:]))
    gm = GaussianMixture(2, covariance_type=structure, max_iter=12, tol=0, reg_covar=1e-6,
                         weights_init=init["phi"].numpy(), means_init=init["mu"].numpy(),
                         precisions_init=1 / init["Sigma"].numpy())
    with pytest.warns(Warning):  # 12 iterations do not converge: that is the point
        gm.fit(X.numpy())
    final = em.log_likelihood(X, 2, init, covariance_type=structure) / N
    assert abs(final - gm.score(X.numpy())) < 1e-6 * abs(final)
    np.testing.assert_allclose(em.params["mu"].numpy(), gm.means_, rtol=1e-6)
    assert passes.count("DiagonalFeatures") >= 11
