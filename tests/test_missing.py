"""Missing values: NaN entries marginalised out, p(x_o^(i) | z^(i)) on the observed entries o^(i).

Oracles: direct numpy EM on the observed entries (diagonal and spherical GMM, Bernoulli and Poisson
mixtures, k-means' Lloyd iterations); for the full and tied GMM, scipy's multivariate normal on each
row's observed coordinates (log p(x), responsibilities) and the exact EM for incomplete data of
Ghahramani & Jordan (1994), whose optimum ppl_em's generalised EM must reach; the EM guarantee that
log p(x) never decreases; the default error and its remedy; the command line on a CSV with gaps.
"""

import contextlib
import json
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal
from torch.distributions import constraints

import ppl_em
import ppl_em.em as em_module
from ppl_em.cli import main
from ppl_em.models import bernoulli_mixture, gmm, kmeans, poisson_mixture

D = torch.float64
REG = 1e-6  # EM's default reg_covar, added to every variance below as EM adds it


def _with_gaps(x: torch.Tensor, fraction: float, seed: int, rows=None) -> torch.Tensor:
    """x with a seeded fraction of its entries set to NaN (only in ``rows`` if given); no row is left
    without an observed entry."""
    g = torch.Generator().manual_seed(seed)
    gaps = torch.rand(x.shape, generator=g) < fraction
    if rows is not None:
        gaps[~rows] = False
    gaps[gaps.all(1), 0] = False
    out = x.clone()
    out[gaps] = math.nan
    return out


def _gmm_data(n=160, seed=0, d=3):
    phi = torch.tensor([0.45, 0.55], dtype=D)
    mu = torch.tensor([[-2.5, 0.0, 1.0], [2.5, 1.0, -1.0]], dtype=D)[:, :d]
    A = torch.tensor([[1.0, 0.6, 0.2], [0.6, 1.2, -0.3], [0.2, -0.3, 0.8]], dtype=D)[:d, :d]
    Sigma = torch.stack([A, 0.7 * A.T @ A / 1.5 + 0.2 * torch.eye(d, dtype=D)])
    x, _ = gmm.generate(n, phi, mu, Sigma, seed=seed)
    return x


# -- element-wise masks: closed forms equal to numpy EM on the observed entries ----------------------
def _numpy_gaussian_em(x, phi, mu, var, steps, spherical=False):
    """EM for a diagonal (or spherical: var (k,)) GMM on the observed entries. Yields (log p(x) before the
    update, phi, mu, var after it)."""
    seen = ~np.isnan(x)
    xf = np.where(seen, x, 0.0)
    for _ in range(steps):
        v = var[:, None] * np.ones_like(mu) if spherical else var  # (k, d)
        terms = -0.5 * np.log(2 * np.pi * v)[None] - 0.5 * (xf[:, None] - mu[None]) ** 2 / v[None]  # (n, k, d)
        log_joint = np.log(phi) + (terms * seen[:, None]).sum(-1)  # (n, k)
        log_px = logsumexp(log_joint, 1)
        w = np.exp(log_joint - log_px[:, None])  # w_j^(i)
        den = w.T @ seen  # (k, d): sum_i w_j^(i) o_l^(i)
        mu = (w.T @ xf) / den
        sq = np.einsum("ik,il,ikl->kl", w, seen, (xf[:, None] - mu[None]) ** 2)  # (k, d)
        var = sq.sum(1) / den.sum(1) + REG if spherical else sq / den + REG
        phi = w.mean(0)
        yield log_px.sum(), phi, mu, var


@pytest.mark.parametrize("covariance_type", ["diag", "spherical"])
def test_diagonal_and_spherical_gmm_equal_a_numpy_em_on_the_observed_entries(covariance_type):
    x = _with_gaps(_gmm_data(), 0.25, seed=1)
    init = gmm.init_params(x, 2, seed=3, covariance_type=covariance_type)
    em = ppl_em.EM(gmm.model, missing="marginalize")
    spherical = covariance_type == "spherical"
    oracle = _numpy_gaussian_em(x.numpy(), *(init[n].numpy() for n in ("phi", "mu", "Sigma")), steps=8,
                                spherical=spherical)
    for log_px, phi, mu, var in oracle:
        loss = em.step(x, 2, init=init, covariance_type=covariance_type)
        np.testing.assert_allclose(-loss, log_px, rtol=1e-10)
        np.testing.assert_allclose(em.params["phi"].numpy(), phi, rtol=1e-9)
        np.testing.assert_allclose(em.params["mu"].numpy(), mu, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(em.params["Sigma"].numpy(), var, rtol=1e-9)
    assert em.explain() == {"phi": "closed form: Categorical.probs at site z",
                            "mu": "closed form: Normal.loc at site x",
                            "Sigma": "closed form: Normal.scale at site x, via sqrt"}


def test_bernoulli_mixture_equals_a_numpy_em_on_the_observed_entries():
    p_true = torch.tensor([[0.9, 0.8, 0.7, 0.1, 0.2, 0.1], [0.1, 0.3, 0.2, 0.9, 0.8, 0.7]], dtype=D)
    x, _ = bernoulli_mixture.generate(200, torch.tensor([0.4, 0.6], dtype=D), p_true, seed=2)
    x = _with_gaps(x, 0.3, seed=2)
    init = bernoulli_mixture.init_params(x, 2, seed=5)
    phi, p = init["phi"].numpy(), init["p"].numpy()
    seen = ~np.isnan(x.numpy())
    xf, eps = np.where(seen, x.numpy(), 0.0), np.finfo(np.float64).eps
    em = ppl_em.EM(bernoulli_mixture.model, missing="marginalize")
    for _ in range(10):
        pc = np.clip(p, eps, 1 - eps)
        log_joint = np.log(phi) + (seen * xf) @ np.log(pc).T + (seen * (1 - xf)) @ np.log1p(-pc).T
        log_px = logsumexp(log_joint, 1)
        w = np.exp(log_joint - log_px[:, None])
        phi, p = w.mean(0), (w.T @ (seen * xf)) / (w.T @ seen)
        loss = em.step(x, 2, init=init)
        np.testing.assert_allclose(-loss, log_px.sum(), rtol=1e-10)
        np.testing.assert_allclose(em.params["p"].numpy(), p, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(em.params["phi"].numpy(), phi, rtol=1e-9)
    assert em.explain()["p"] == "closed form: Bernoulli.probs at site x"


def test_poisson_mixture_equals_a_numpy_em_on_the_observed_entries():
    rate_true = torch.tensor([[1.0, 8.0, 3.0], [6.0, 2.0, 9.0]], dtype=D)
    x, _ = poisson_mixture.generate(200, torch.tensor([0.5, 0.5], dtype=D), rate_true, seed=3)
    x = _with_gaps(x, 0.3, seed=3)
    init = poisson_mixture.init_params(x, 2, seed=1)
    phi, rate = init["phi"].numpy(), init["rate"].numpy()
    seen = ~np.isnan(x.numpy())
    xf = np.where(seen, x.numpy(), 0.0)
    log_fact = np.vectorize(math.lgamma)(xf + 1)
    em = ppl_em.EM(poisson_mixture.model, missing="marginalize")
    for _ in range(10):
        terms = xf[:, None] * np.log(rate)[None] - rate[None] - log_fact[:, None]  # (n, k, d)
        log_joint = np.log(phi) + (terms * seen[:, None]).sum(-1)
        log_px = logsumexp(log_joint, 1)
        w = np.exp(log_joint - log_px[:, None])
        phi, rate = w.mean(0), (w.T @ xf) / (w.T @ seen)
        loss = em.step(x, 2, init=init)
        np.testing.assert_allclose(-loss, log_px.sum(), rtol=1e-10)
        np.testing.assert_allclose(em.params["rate"].numpy(), rate, rtol=1e-9)
    assert em.explain()["rate"] == "closed form: Poisson.rate at site x"


def test_hard_em_on_kmeans_is_lloyd_on_the_observed_coordinates():
    mu_true = torch.tensor([[-3.0, 0.0, 2.0], [3.0, 0.0, -2.0], [0.0, 4.0, 0.0]], dtype=D)
    x, _ = kmeans.generate(180, mu_true, seed=4)
    x = _with_gaps(x, 0.25, seed=4)
    mu = kmeans.init_params(x, 3, seed=2)["mu"]
    assert torch.isfinite(mu).all()
    em = ppl_em.EM(kmeans.model, posterior="hard", missing="marginalize")
    seen = ~torch.isnan(x)
    xf = x.nan_to_num()
    for _ in range(6):
        d2 = (((xf[:, None] - mu[None]) ** 2) * seen[:, None]).sum(-1)  # (n, k) over observed coordinates
        c = d2.argmin(-1)
        onehot = torch.nn.functional.one_hot(c, 3).to(D)  # (n, k)
        expected_distortion = d2.min(-1).values.sum()
        loss = em.step(x, 3, init={"mu": mu})
        np.testing.assert_allclose(float(kmeans.distortion(x, mu, c)), float(expected_distortion), rtol=1e-12)
        assert torch.equal(kmeans.assign(x, mu), c)
        mu = (onehot.T @ xf) / (onehot.T @ seen.to(D))
        torch.testing.assert_close(em.params["mu"], mu, rtol=1e-10, atol=1e-12)
        assert math.isfinite(loss)
    assert em.explain()["mu"] == "closed form: Normal.loc at site x"


def test_a_chunk_without_missing_values_follows_the_same_plan():
    """Streaming in chunks, some of which hold no NaN, gives the same step as the whole data."""
    x = _gmm_data(n=200)
    x = _with_gaps(x, 0.3, seed=5, rows=torch.arange(200) >= 120)  # rows 0..119 complete
    init = gmm.init_params(x, 2, seed=0, covariance_type="diag")
    runs = []
    for chunk_size in (None, 40):
        pyro.clear_param_store()
        em = ppl_em.EM(gmm.model, missing="marginalize", chunk_size=chunk_size)
        runs.append(([em.step(x, 2, init=init, covariance_type="diag") for _ in range(4)], em.params))
    (whole, at_whole), (streamed, at_streamed) = runs
    np.testing.assert_allclose(streamed, whole, rtol=1e-12)
    for name in at_whole:
        torch.testing.assert_close(at_streamed[name], at_whole[name], rtol=1e-10, atol=1e-12)
    assert em.chunking.startswith("streams")


# -- full and tied covariances: exact E-step, generalised EM --------------------------------------
def _scipy_rows(x, phi, mu, Sigma):
    """log p(x^(i)) and w^(i) from scipy's multivariate normal on each row's observed coordinates."""
    log_px, resp = [], []
    for row in x.numpy():
        o = ~np.isnan(row)
        lj = np.array([math.log(phi[j]) + multivariate_normal(mu[j][o], Sigma[j][np.ix_(o, o)]).logpdf(row[o])
                       for j in range(len(phi))])
        log_px.append(logsumexp(lj))
        resp.append(np.exp(lj - log_px[-1]))
    return np.array(log_px), np.array(resp)


def _full(params, covariance_type):
    Sigma = params["Sigma"].numpy()
    return np.broadcast_to(Sigma, (len(params["phi"]),) + Sigma.shape) if covariance_type == "tied" else Sigma


@pytest.mark.parametrize("covariance_type", ["full", "tied"])
def test_full_and_tied_log_likelihood_and_responsibilities_equal_scipy_per_row(covariance_type):
    x = _with_gaps(_gmm_data(n=60), 0.3, seed=6)
    init = gmm.init_params(x, 2, seed=1, covariance_type=covariance_type)
    em = ppl_em.EM(gmm.model, missing="marginalize")
    for _ in range(2):  # at the initial values, then after one step
        post = em.e_step(x, 2, init=init, covariance_type=covariance_type)
        params = em.params
        log_px, resp = _scipy_rows(x, params["phi"].numpy(), params["mu"].numpy(), _full(params, covariance_type))
        np.testing.assert_allclose(float(post.log_evidence), log_px.sum(), rtol=1e-11)
        np.testing.assert_allclose(post.marginal("z").numpy(), resp, rtol=1e-9, atol=1e-13)
        em.step(x, 2, init=init, covariance_type=covariance_type)


@pytest.mark.parametrize("covariance_type", ["full", "tied"])
def test_full_and_tied_em_never_decreases_log_likelihood_from_an_identity_start(covariance_type):
    """From Sigma_j = I the observed-entry means would look stationary; EM must not claim a closed form."""
    x = _with_gaps(_gmm_data(n=80), 0.3, seed=7)
    eye = torch.eye(3, dtype=D)
    init = {"mu": torch.tensor([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=D),
            "Sigma": eye if covariance_type == "tied" else eye.expand(2, 3, 3)}
    em = ppl_em.EM(gmm.model, missing="marginalize")
    losses = [em.step(x, 2, init=init, covariance_type=covariance_type) for _ in range(8)]
    assert all(b <= a + 1e-9 * abs(a) for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 10
    why = em.explain()
    assert why["phi"] == "closed form: Categorical.probs at site z"
    assert why["mu"].startswith("gradient") and why["Sigma"].startswith("gradient")


def _ghahramani_jordan_em(x, phi, mu, Sigma, steps, tied):
    """Exact EM for a GMM with missing entries (Ghahramani & Jordan 1994): per row and component, the
    conditional mean E[x_m | x_o, z = j] and covariance of the missing block, rows grouped by the
    coordinates they miss. Without reg_covar: ppl_em's gradient M-step maximises E_Q[log p(x_o, z)] itself."""
    n, d = x.shape
    k = len(phi)
    seen = ~np.isnan(x)
    patterns, which = np.unique(seen, axis=0, return_inverse=True)
    for _ in range(steps):
        log_joint, xs, cs = np.zeros((n, k)), np.zeros((n, k, d)), np.zeros((n, k, d, d))
        for p, o in enumerate(patterns):
            rows, m = which.ravel() == p, ~o
            xo = x[rows][:, o]  # (r, |o|)
            for j in range(k):
                s_oo = Sigma[j][np.ix_(o, o)]
                dev = xo - mu[j][o]
                sol = np.linalg.solve(s_oo, dev.T).T  # (r, |o|): Sigma_oo^-1 (x_o - mu_o)
                log_joint[rows, j] = (np.log(phi[j]) - 0.5 * (dev * sol).sum(1)
                                      - 0.5 * (o.sum() * np.log(2 * np.pi) + np.linalg.slogdet(s_oo)[1]))
                block = np.zeros((rows.sum(), d))
                block[:, o] = xo
                block[:, m] = mu[j][m] + sol @ Sigma[j][np.ix_(o, m)]
                xs[rows, j] = block
                cs[np.ix_(rows, [j], m, m)] = (Sigma[j][np.ix_(m, m)]
                                               - Sigma[j][np.ix_(m, o)] @ np.linalg.solve(s_oo, Sigma[j][np.ix_(o, m)]))
        w = np.exp(log_joint - logsumexp(log_joint, 1, keepdims=True))  # (n, k)
        nk = w.sum(0)
        phi = nk / n
        mu = np.einsum("ik,ikl->kl", w, xs) / nk[:, None]
        dev = xs - mu[None]
        scatter = np.einsum("ik,ikl,ikm->klm", w, dev, dev) + np.einsum("ik,iklm->klm", w, cs)  # (k, d, d)
        Sigma = np.broadcast_to(scatter.sum(0) / n, (k, d, d)) if tied else scatter / nk[:, None, None]
    return phi, mu, Sigma


@pytest.mark.parametrize("covariance_type", ["full", "tied"])
def test_full_and_tied_em_reaches_the_exact_missing_data_em_optimum(covariance_type):
    x = _with_gaps(_gmm_data(n=100, d=2), 0.25, seed=8)
    init = gmm.init_params(x, 2, seed=4, covariance_type=covariance_type)
    init["mu"] = torch.tensor([[-2.0, 0.0], [2.0, 0.5]], dtype=D)
    em = ppl_em.EM(gmm.model, missing="marginalize")
    losses = [em.step(x, 2, init=init, covariance_type=covariance_type)]
    while len(losses) < 60 and not (len(losses) > 1 and abs(losses[-2] - losses[-1]) < 1e-10):
        losses.append(em.step(x, 2, init=init, covariance_type=covariance_type))
    assert abs(losses[-2] - losses[-1]) < 1e-10
    sigma0 = np.array(_full(init, covariance_type))
    phi, mu, Sigma = _ghahramani_jordan_em(x.numpy(), init["phi"].numpy(), init["mu"].numpy(), sigma0,
                                           steps=300, tied=covariance_type == "tied")
    got = em.params
    np.testing.assert_allclose(-losses[-1], _scipy_rows(x, phi, mu, Sigma)[0].sum(), rtol=1e-11)
    np.testing.assert_allclose(got["phi"].numpy(), phi, atol=1e-6)
    np.testing.assert_allclose(got["mu"].numpy(), mu, atol=1e-5)
    np.testing.assert_allclose(_full(got, covariance_type), Sigma, atol=1e-5)


def test_the_plan_sees_rows_with_missing_values_beyond_its_usual_rows(monkeypatch):
    """The M-step plan is made on all rows under missing='marginalize', not on the first PLAN_ROWS."""
    monkeypatch.setattr(em_module, "PLAN_ROWS", 40)
    x = _with_gaps(_gmm_data(n=120), 0.3, seed=9, rows=torch.arange(120) >= 80)  # rows 0..79 complete
    em = ppl_em.EM(gmm.model, missing="marginalize")
    losses = [em.step(x, 2) for _ in range(4)]
    assert em.explain()["mu"].startswith("gradient")
    assert all(b <= a + 1e-9 * abs(a) for a, b in zip(losses, losses[1:]))


def test_without_missing_values_marginalize_changes_nothing():
    x = _gmm_data(n=100)
    plain = ppl_em.fit(gmm.model, x, 2, progress=False)
    again = ppl_em.fit(gmm.model, x, 2, progress=False, missing="marginalize")
    assert plain.losses == again.losses
    for name in plain.params:
        assert torch.equal(plain.params[name], again.params[name])


# -- ppl_em.fit and the result on rows with NaN -----------------------------------------------------
def test_fit_predicts_and_scores_rows_with_missing_values(tmp_path):
    x = _with_gaps(_gmm_data(n=90, d=2), 0.25, seed=10)
    result = ppl_em.fit(gmm.model, x, 2, missing="marginalize", progress=False, max_iter=30)
    assert result.missing == "marginalize" and result.init["params"] == ["mu"]
    params = result.params
    log_px, resp = _scipy_rows(x, params["phi"].numpy(), params["mu"].numpy(), params["Sigma"].numpy())
    np.testing.assert_allclose(result.predict_proba().numpy(), resp, rtol=1e-9, atol=1e-13)
    assert torch.equal(result.predict(), result.predict_proba().argmax(-1))
    np.testing.assert_allclose(result.score(), log_px.mean(), rtol=1e-11)
    n_params = 1 + 2 * 2 + 2 * 3
    np.testing.assert_allclose(result.bic(), -2 * log_px.sum() + n_params * math.log(90), rtol=1e-11)
    np.testing.assert_allclose(result.aic(), -2 * log_px.sum() + 2 * n_params, rtol=1e-11)
    drawn = result.sample(5)["x"]
    assert drawn.shape == (5, 2) and torch.isfinite(drawn).all()
    one = torch.tensor([[math.nan, 1.0]], dtype=D)  # a new row with its first coordinate missing
    np.testing.assert_allclose(result.predict_proba(one, 2).numpy(), _scipy_rows(one, params["phi"].numpy(),
                               params["mu"].numpy(), params["Sigma"].numpy())[1], rtol=1e-9)
    loaded = ppl_em.load(result.save(tmp_path / "fit.pt"))
    assert loaded.missing == "marginalize"
    np.testing.assert_allclose(loaded.score(x, 2), result.score(), rtol=1e-12)


@pytest.mark.parametrize("model, data, method", [
    (kmeans.model, lambda: kmeans.generate(60, torch.tensor([[-3.0, 0.0], [3.0, 1.0]], dtype=D), seed=1)[0],
     "hard_em"),
    (poisson_mixture.model, lambda: poisson_mixture.generate(
        60, torch.tensor([0.5, 0.5], dtype=D), torch.tensor([[1.0, 7.0], [6.0, 2.0]], dtype=D), seed=1)[0], "em"),
    (bernoulli_mixture.model, lambda: bernoulli_mixture.generate(
        60, torch.tensor([0.5, 0.5], dtype=D), torch.tensor([[0.9, 0.8, 0.1], [0.1, 0.3, 0.9]], dtype=D), seed=1)[0],
     "em"),
    (gmm.model, lambda: _gmm_data(n=60, d=2), "svi"),
])
def test_fit_with_missing_values_by_each_engine(model, data, method):
    x = _with_gaps(data(), 0.2, seed=11)
    options = {"max_iter": 40} if method == "svi" else {}
    with pytest.warns(ppl_em.ConvergenceWarning) if method == "svi" else contextlib.nullcontext():
        result = ppl_em.fit(model, x, 2, method=method, missing="marginalize", progress=False, **options)
    assert result.predict_proba().shape == (60, 2)
    assert math.isfinite(result.score()) and math.isfinite(result.log_likelihood)


# -- errors: the default, and what marginalize still refuses -----------------------------------------
def test_nan_is_an_error_by_default_naming_the_remedy():
    x = _with_gaps(_gmm_data(n=40), 0.2, seed=12)
    first = tuple(int(i) for i in torch.isnan(x).nonzero()[0])
    with pytest.raises(ValueError, match=rf"argument 'x'.*index \({first[0]}, {first[1]}\).*missing='marginalize'"):
        ppl_em.fit(gmm.model, x, 2, progress=False)
    with pytest.raises(ValueError, match=r"argument 0 .*pass missing='marginalize'"):
        ppl_em.EM(gmm.model).step(x, 2)
    clean = ppl_em.fit(gmm.model, _gmm_data(n=40), 2, progress=False)
    with pytest.raises(ValueError, match="missing='marginalize'"):
        clean.predict_proba(x, 2)
    clean.missing = "marginalize"  # a fit without gaps can score data with some
    assert clean.predict_proba(x, 2).shape == (40, 2)


def test_what_marginalize_still_refuses():
    x = _with_gaps(_gmm_data(n=40), 0.2, seed=13)
    row = x.clone()
    row[5] = math.nan
    with pytest.raises(ValueError, match=r"every entry missing; the first is x\[5\].*drop it"):
        ppl_em.fit(gmm.model, row, 2, missing="marginalize", progress=False)
    column = _gmm_data(n=40)
    column[:, 1] = math.nan
    with pytest.raises(ValueError, match=r"Column 1 of argument 'x' .* missing \(NaN\) in every observation"):
        ppl_em.fit(gmm.model, column, 2, missing="marginalize", progress=False)
    inf = x.clone()
    inf[3, 0] = math.inf
    with pytest.raises(ValueError, match=r"an inf at index \(3, 0\).*an inf is not one"):
        ppl_em.fit(gmm.model, inf, 2, missing="marginalize", progress=False)
    with pytest.raises(ValueError, match=r"missing must be one of \('error', 'marginalize'\), got 'drop'"):
        ppl_em.fit(gmm.model, x, 2, missing="drop", progress=False)
    with pytest.raises(ValueError, match="em_options may not hold 'missing'"):
        ppl_em.fit(gmm.model, x, 2, em_options={"missing": "marginalize"}, progress=False)
    with pytest.raises(ValueError, match="metric='cosine' clusters the directions of whole rows"):
        ppl_em.fit(kmeans.model, x, 2, metric="cosine", missing="marginalize", progress=False)


def test_a_model_that_does_not_mask_its_nan_is_refused():
    def model(x, k):
        phi = pyro.param("phi", torch.full((k,), 1.0 / k, dtype=D), constraint=constraints.simplex)
        mu = pyro.param("mu", torch.linspace(-1, 1, k, dtype=D)[:, None].expand(k, x.shape[1]).clone())
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(phi))
            pyro.sample("x", dist.Normal(mu[z], 1.0).to_event(1), obs=x)

    x = _with_gaps(_gmm_data(n=30), 0.2, seed=14)
    with pytest.raises(ValueError, match=r"does not mask them: Observed site 'x' has .*\.mask\(~x\.isnan\(\)\)"):
        ppl_em.fit(model, x, 2, missing="marginalize", progress=False)


# -- the command line ---------------------------------------------------------------------------------
def test_cli_round_trip_with_gaps_in_a_csv(tmp_path, capsys):
    x = _with_gaps(_gmm_data(n=60, d=2), 0.2, seed=15)
    lines = ["duration,waiting"] + [",".join("" if math.isnan(v) and i % 2 else ("nan" if math.isnan(v) else repr(v))
                                             for v in row) for i, row in enumerate(x.tolist())]
    data = tmp_path / "gaps.csv"
    data.write_text("\n".join(lines) + "\n")
    assert main(["fit", "gmm", "--data", str(data), "-k", "2", "--out", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ppl-em: error: ") and "--missing marginalize" in err[0]
    out = tmp_path / "out"
    assert main(["fit", "gmm", "--data", str(data), "-k", "2", "--missing", "marginalize", "--out", str(out),
                 "--json", "--max-iter", "30"]) == 0
    summary = json.loads(capsys.readouterr().out)
    result = ppl_em.load(out / "checkpoint.pt")
    assert result.missing == "marginalize"
    loaded = torch.from_numpy(np.genfromtxt(data, delimiter=",", skip_header=1))
    assert torch.equal(torch.isnan(loaded), torch.isnan(x))
    np.testing.assert_allclose(result.score(loaded, 2), summary["log_likelihood"], rtol=1e-12)
    assert {p.split("/")[-1] for p in summary["files"]} >= {"checkpoint.pt", "clusters.png"}


def test_cli_refuses_an_empty_row_with_its_line(tmp_path, capsys):
    data = tmp_path / "row.csv"
    data.write_text("a,b\n1,2\n,\n3,4\n5,6\n")
    assert main(["fit", "gmm", "--data", str(data), "-k", "1", "--missing", "marginalize",
                 "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == (f"ppl-em: error: data file {str(data)!r} has 1 row(s) with every value "
                                               "missing, the first at line 3; drop them (they say nothing about the "
                                               "parameters)")


def test_cli_reports_a_stalled_gradient_m_step_in_one_line(monkeypatch, tmp_path, capsys):
    """The full GMM's gradient M-step (missing values) can stall on degenerate data: a diagnostic, not a bug."""
    def stalled(*args, **kwargs):
        raise ppl_em.StalledError("The gradient M-step for ['mu', 'Sigma'] tried parameters that the model "
                                  "rejects.\nSecond line.")

    monkeypatch.setattr("ppl_em.cli.fit", stalled)
    data = tmp_path / "gaps.csv"
    data.write_text("1,2\n,3\n5,6\n7,\n")
    assert main(["fit", "gmm", "--data", str(data), "-k", "2", "--missing", "marginalize",
                 "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == ("ppl-em: error: The gradient M-step for ['mu', 'Sigma'] tried parameters "
                                       "that the model rejects.\n")

