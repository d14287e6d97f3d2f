"""FitResult against its oracles: direct responsibilities, scikit-learn's score/BIC/AIC, checkpoints."""

import os
import pickle
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from sklearn.mixture import GaussianMixture

import ppl_em
from ppl_em.datasets import load_old_faithful
from ppl_em.models import gmm
from ppl_em.result import free_parameters

D = torch.float64



@pytest.fixture(scope="module")
def fitted():
    """A GMM fitted to Old Faithful (k = 3), shared by the read-only tests."""
    pyro.clear_param_store()
    x = load_old_faithful()[::2]
    with warnings.catch_warnings():  # the oracles below hold at any parameters, converged or not
        warnings.simplefilter("ignore", ppl_em.ConvergenceWarning)
        result = ppl_em.fit(gmm.model, x, 3, max_iter=40, progress=False)
    return result, x


def sklearn_twin(result):
    """A scikit-learn GaussianMixture holding exactly the fitted phi, mu, Sigma."""
    p = {k: v.numpy() for k, v in result.params.items()}
    sk = GaussianMixture(len(p["phi"]), covariance_type="full")
    sk.weights_, sk.means_, sk.covariances_ = p["phi"], p["mu"], p["Sigma"]
    chol = np.linalg.cholesky(p["Sigma"])  # precision Cholesky: P = L^{-T}, so Sigma^{-1} = P P^T
    sk.precisions_cholesky_ = np.stack([np.linalg.inv(c).T for c in chol])
    sk.converged_, sk.n_iter_, sk.lower_bound_ = True, 1, 0.0
    return sk


def test_predict_proba_is_the_direct_responsibility_formula(fitted):
    result, x = fitted
    p = result.params
    log_joint = torch.log(p["phi"]) + torch.stack(
        [dist.MultivariateNormal(p["mu"][j], p["Sigma"][j]).log_prob(x) for j in range(3)], -1)  # (n, k)
    expected = torch.softmax(log_joint, -1)
    torch.testing.assert_close(result.predict_proba(), expected)
    assert torch.equal(result.predict(), result.predict_proba().argmax(-1))
    np.testing.assert_array_equal(result.predict().numpy(), sklearn_twin(result).predict(x.numpy()))


def test_score_is_the_e_step_log_evidence_per_point_and_matches_sklearn(fitted):
    result, x = fitted
    result.activate()  # the store now holds exactly the fitted parameters
    post = ppl_em.EM(gmm.model).e_step(x, 3)
    assert result.score() == pytest.approx(float(post.log_evidence) / len(x), rel=1e-12)
    assert result.score() == pytest.approx(result.log_likelihood, rel=1e-12)
    assert result.score() == pytest.approx(sklearn_twin(result).score(x.numpy()), rel=1e-10)
    held_out = load_old_faithful()[1::2]
    assert result.score(held_out, 3) == pytest.approx(sklearn_twin(result).score(held_out.numpy()), rel=1e-10)


def test_bic_and_aic_count_the_free_parameters_of_a_full_gmm(fitted):
    result, x = fitted
    k, d, n = 3, 2, len(x)
    p = (k - 1) + k * d + k * d * (d + 1) // 2
    assert result.n_parameters() == p == sklearn_twin(result)._n_parameters()
    log_lik = result.score() * n
    assert result.bic() == pytest.approx(-2 * log_lik + p * np.log(n), rel=1e-12)
    assert result.aic() == pytest.approx(-2 * log_lik + 2 * p, rel=1e-12)
    assert result.bic() == pytest.approx(sklearn_twin(result).bic(x.numpy()), rel=1e-10)
    assert result.aic() == pytest.approx(sklearn_twin(result).aic(x.numpy()), rel=1e-10)


@pytest.mark.parametrize("shape, constraint, expected", [
    ((4,), constraints.simplex, 3),
    ((3, 4), constraints.simplex, 9),
    ((3, 2), constraints.real, 6),
    ((5,), constraints.positive, 5),
    ((5,), constraints.unit_interval, 5),
    ((2, 3, 3), constraints.positive_definite, 12),
    ((3, 3), constraints.lower_cholesky, 6),
    ((4, 4), constraints.corr_cholesky, 6),
    ((2, 3), constraints.independent(constraints.real, 1), 6),
    ((3, 3), constraints.sphere, 6),
    ((2,), constraints.interval(0.0, 2.0), 2),
])
def test_free_parameters_follow_the_constraint(shape, constraint, expected):
    assert free_parameters(torch.Size(shape), constraint) == expected


def test_sample_runs_the_fitted_generative_story(fitted):
    result, x = fitted
    draws = result.sample(20000, seed=0)
    assert draws["x"].shape == (20000, 2) and draws["z"].shape == (20000,)
    p = result.params
    freq = torch.bincount(draws["z"], minlength=3).to(D) / 20000
    torch.testing.assert_close(freq, p["phi"], atol=0.015, rtol=0)
    for j in range(3):  # each component's draws have that component's mean and covariance
        xj = draws["x"][draws["z"] == j]
        torch.testing.assert_close(xj.mean(0), p["mu"][j], atol=0.1 * p["Sigma"][j].diagonal().sqrt().max().item(),
                                   rtol=0)
        torch.testing.assert_close(torch.cov(xj.T), p["Sigma"][j], rtol=0.1, atol=0.05)
    again = result.sample(5, seed=0)
    assert torch.equal(again["x"], result.sample(5, seed=0)["x"])


def test_methods_use_the_results_own_parameters_whatever_is_in_the_store(fitted):
    result, x = fitted
    before = result.score()
    pyro.clear_param_store()
    pyro.param("mu", torch.zeros(3, 2, dtype=D))  # a stranger's value under the same name
    assert result.score() == pytest.approx(before, rel=1e-12)
    result.bic(), result.sample(3), result.predict()
    assert list(pyro.get_param_store().keys()) == ["mu"]  # and the store is left as it was
    assert torch.equal(pyro.param("mu").detach(), torch.zeros(3, 2, dtype=D))


def test_save_load_roundtrip(fitted, tmp_path):
    result, x = fitted
    path = result.save(tmp_path / "gmm.pt")
    pyro.clear_param_store()
    loaded = ppl_em.load(path)
    assert loaded.model is gmm.model  # models of ppl_em.models are found by name
    for name, value in result.params.items():
        torch.testing.assert_close(loaded.params[name], value, rtol=0, atol=0)
        torch.testing.assert_close(pyro.param(name).detach(), value, rtol=0, atol=0)
    assert pyro.get_param_store()._constraints["Sigma"] is constraints.positive_definite
    assert loaded.history == result.history and loaded.losses == result.losses
    assert (loaded.method, loaded.n_iter, loaded.converged, loaded.n_data) == \
           (result.method, result.n_iter, result.converged, result.n_data)
    assert loaded.score(x, 3) == pytest.approx(result.score(), rel=1e-12)
    with pytest.raises(ValueError, match="loaded from a checkpoint.*pass them"):
        loaded.predict_proba()


def test_load_replaces_the_param_store_rather_than_merging(fitted, tmp_path):
    result, _ = fitted
    path = result.save(tmp_path / "gmm.pt")
    pyro.clear_param_store()
    pyro.param("leftover", torch.ones(2))
    pyro.param("mu", torch.zeros(7))
    ppl_em.load(path)
    assert set(pyro.get_param_store().keys()) == {"phi", "mu", "Sigma"}
    torch.testing.assert_close(pyro.param("mu").detach(), result.params["mu"])


def test_a_model_outside_ppl_em_models_must_be_passed_to_load(tmp_path):
    def model(x):
        mu = pyro.param("mu", torch.tensor([-1.0, 1.0], dtype=D))
        s = pyro.param("s", torch.tensor(1.0, dtype=D), constraint=constraints.greater_than(0.5))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(torch.tensor([0.5, 0.5], dtype=D)))
            pyro.sample("x", dist.Normal(mu[z], s), obs=x)

    x = torch.tensor([-2.0, -1.5, 1.0, 2.5], dtype=D)
    result = ppl_em.fit(model, x, max_iter=30, tol=1e-4, progress=False, init="prior")
    loaded = ppl_em.load(result.save(tmp_path / "m.pt"))
    assert loaded.model is None
    assert pyro.get_param_store()._constraints["s"].lower_bound == 0.5
    with pytest.raises(ValueError, match="pass it: ppl_em.load\\(path, model=my_model\\)"):
        loaded.score(x)
    assert ppl_em.load(tmp_path / "m.pt", model=model).score(x) == pytest.approx(result.score(), rel=1e-12)


def test_a_crash_during_save_leaves_the_previous_checkpoint_intact(fitted, tmp_path, monkeypatch):
    result, x = fitted
    path = result.save(tmp_path / "gmm.pt")
    with open(path, "rb") as f:
        original = f.read()

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        result.save(path)
    monkeypatch.undo()
    with open(path, "rb") as f:
        assert f.read() == original
    assert os.listdir(tmp_path) == ["gmm.pt"]  # no temporary file left behind
    assert ppl_em.load(path).score(x, 3) == pytest.approx(result.score(), rel=1e-12)


class Armed:
    """Unpickling this calls Path.touch(marker): what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_a_checkpoint_crafted_to_run_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    zipped = tmp_path / "evil.pt"
    torch.save({"format": "ppl_em.FitResult", "version": 1, "meta": "{}", "params": {"mu": Armed(marker)}}, zipped)
    raw = tmp_path / "evil.pkl.pt"
    raw.write_bytes(pickle.dumps({"params": Armed(marker)}))
    for path in (zipped, raw):
        with pytest.raises(ValueError, match="not a loadable ppl_em checkpoint: torch.load\\(weights_only=True\\)"):
            ppl_em.load(path)
        assert not marker.exists()
    # The payload is live: an unsafe loader would have run it.
    torch.load(zipped, weights_only=False)
    assert marker.exists()


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError):
        ppl_em.load(tmp_path / "missing.pt")
    torch.save({"some": torch.ones(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a ppl_em checkpoint"):
        ppl_em.load(tmp_path / "other.pt")


def test_models_with_several_latents_and_without_an_exact_posterior():
    def chain(x):
        """z1 -> z2, each emitting one observation: predict_proba stacks both marginals."""
        trans = torch.tensor([[0.9, 0.1], [0.2, 0.8]], dtype=D)
        mu = pyro.param("mu", torch.tensor([-1.0, 1.0], dtype=D))
        z1 = pyro.sample("z1", dist.Categorical(torch.tensor([0.5, 0.5], dtype=D)))
        pyro.sample("x1", dist.Normal(mu[z1], 1.0), obs=x[0])
        z2 = pyro.sample("z2", dist.Categorical(trans[z1]))
        pyro.sample("x2", dist.Normal(mu[z2], 1.0), obs=x[1])

    x = torch.tensor([-0.5, 0.7], dtype=D)
    result = ppl_em.fit(chain, x, max_iter=5, tol=1.0, progress=False, init="prior")
    mu, trans = result.params["mu"], torch.tensor([[0.9, 0.1], [0.2, 0.8]], dtype=D)
    lik = dist.Normal(mu, 1.0)
    joint = 0.5 * lik.log_prob(x[0]).exp()[:, None] * trans * lik.log_prob(x[1]).exp()[None, :]  # (z1, z2)
    joint = joint / joint.sum()
    torch.testing.assert_close(result.predict_proba(), torch.stack([joint.sum(1), joint.sum(0)]))
    torch.testing.assert_close(result.predict_proba(site="z2"), joint.sum(0))

    def factor_model(x):
        w = pyro.param("w", torch.tensor(1.0, dtype=D))
        with pyro.plate("data", len(x)):
            h = pyro.sample("h", dist.Normal(torch.zeros((), dtype=D), 1.0))
            pyro.sample("x", dist.Normal(w * h, 1.0), obs=x)

    y = torch.randn(8, dtype=D)
    with pytest.warns(ppl_em.ConvergenceWarning, match="method='vae' did not converge"):
        vae = ppl_em.fit(factor_model, y, method="vae", max_iter=3, progress=False)
    assert vae.log_likelihood is None and np.isfinite(vae.elbo())
    with pytest.raises(ppl_em.ExactInferenceError, match="no exact posterior or log p\\(x\\).*elbo"):
        vae.score()
