"""models/gmm.py against its oracles: scikit-learn for each covariance structure, closed-form GDA,
and a direct numpy semi-supervised EM."""

import warnings

import numpy as np
import pyro
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

import ppl_em
from ppl_em.datasets import load_old_faithful
from ppl_em.models import gmm

D = torch.float64


def _precisions(Sigma: torch.Tensor, covariance_type: str) -> np.ndarray:
    """scikit-learn's precisions_init in its layout: the inverse of each covariance."""
    s = Sigma.numpy()
    return np.linalg.inv(s) if covariance_type in ("full", "tied") else 1.0 / s


def _standardised_faithful():
    x = load_old_faithful()
    return (x - x.mean(0)) / x.std(0)


@pytest.mark.parametrize("covariance_type", gmm.COVARIANCE_TYPES)
def test_each_covariance_structure_follows_scikit_learn_step_by_step(covariance_type):
    # k == d on purpose: a (k, d) diagonal must never be mistaken for a (d, d) matrix.
    x, k = _standardised_faithful(), 2
    init = gmm.init_params(x, k, seed=1, covariance_type=covariance_type)
    sk = GaussianMixture(k, covariance_type=covariance_type, reg_covar=1e-6, max_iter=1, warm_start=True,
                         tol=0.0, random_state=0, init_params="random_from_data",
                         weights_init=init["phi"].numpy(), means_init=init["mu"].numpy(),
                         precisions_init=_precisions(init["Sigma"], covariance_type))
    em = ppl_em.EM(gmm.model, reg_covar=1e-6)
    for _ in range(10):
        loss = em.step(x, k, init=init, covariance_type=covariance_type)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            sk.fit(x.numpy())
        p = em.params
        np.testing.assert_allclose(p["phi"].numpy(), sk.weights_, rtol=1e-9)
        np.testing.assert_allclose(p["mu"].numpy(), sk.means_, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(p["Sigma"].numpy(), sk.covariances_, rtol=1e-9, atol=1e-12)
        # Both report the mean log p(x) at the parameters before this iteration's M-step.
        np.testing.assert_allclose(-loss / len(x), sk.lower_bound_, rtol=1e-9)
    assert all(how.startswith("closed form") for how in em.explain().values()), em.explain()
    # "diag" and "spherical" are d independent Normals (so that a NaN entry can be masked alone).
    expected = {"full": "MultivariateNormal.covariance_matrix at site x", "tied": "MultivariateNormal.covariance_matrix "
                "at site x", "diag": "Normal.scale at site x, via sqrt", "spherical": "Normal.scale at site x, via sqrt"}
    assert em.explain()["Sigma"] == "closed form: " + expected[covariance_type]


def _gda(x: np.ndarray, c: np.ndarray, k: int):
    """Closed-form GDA maximum likelihood: class frequencies, means and (biased) covariances."""
    phi = np.array([(c == j).mean() for j in range(k)])
    mu = np.stack([x[c == j].mean(0) for j in range(k)])
    Sigma = np.stack([np.cov(x[c == j].T, bias=True) for j in range(k)])
    return phi, mu, Sigma


def test_fully_observed_labels_give_gda_in_one_m_step():
    x = _standardised_faithful()
    labels = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()  # three classes
    em = ppl_em.EM(gmm.model, reg_covar=0.0)
    em.step(x, 3, labels=labels)
    phi, mu, Sigma = _gda(x.numpy(), labels.numpy(), 3)
    p = em.params
    np.testing.assert_allclose(p["phi"].numpy(), phi, rtol=1e-12)
    np.testing.assert_allclose(p["mu"].numpy(), mu, rtol=1e-10)
    np.testing.assert_allclose(p["Sigma"].numpy(), Sigma, rtol=1e-10)
    # Nothing is latent: a second step leaves the estimate where it is.
    em.step(x, 3, labels=labels)
    np.testing.assert_allclose(em.params["mu"].numpy(), mu, rtol=1e-10)
    assert em.e_step(x, 3, labels=labels).enumerated_sites == []


def _numpy_semi_supervised_em(x, labels, mask, init, steps):
    """Direct EM where labelled points have one-hot responsibilities. Yields (log p(x), params)."""
    from scipy.stats import multivariate_normal

    phi, mu, Sigma = (init[name].numpy().copy() for name in ("phi", "mu", "Sigma"))
    k = len(phi)
    for _ in range(steps):
        log_joint = np.log(phi) + np.stack(
            [multivariate_normal(mu[j], Sigma[j]).logpdf(x) for j in range(k)], -1)  # (n, k)
        log_px = log_joint[mask, labels[mask]].sum() + np.logaddexp.reduce(log_joint[~mask], -1).sum()
        w = np.exp(log_joint - np.logaddexp.reduce(log_joint, -1, keepdims=True))
        w[mask] = np.eye(k)[labels[mask]]
        nk = w.sum(0)
        phi, mu = nk / len(x), (w.T @ x) / nk[:, None]
        Sigma = np.stack([(w[:, j, None] * (x - mu[j])).T @ (x - mu[j]) / nk[j] for j in range(k)])
        yield log_px, {"phi": phi, "mu": mu, "Sigma": Sigma}


def test_partially_observed_labels_give_semi_supervised_em():
    x = _standardised_faithful()[:120]
    labels = (x[:, 0] > 0).long()
    mask = torch.zeros(len(x), dtype=torch.bool)
    mask[::4] = True
    hidden = labels.masked_fill(~mask, 1 - labels[0])  # unobserved labels must not matter
    init = gmm.init_params(x, 2, seed=3)
    em = ppl_em.EM(gmm.model, reg_covar=0.0)
    oracle = _numpy_semi_supervised_em(x.numpy(), labels.numpy(), mask.numpy(), init, steps=8)
    for log_px, expected in oracle:
        loss = em.step(x, 2, init=init, labels=hidden, labels_mask=mask)
        np.testing.assert_allclose(-loss, log_px, rtol=1e-10)
        for name, value in expected.items():
            np.testing.assert_allclose(em.params[name].numpy(), value, rtol=1e-8, atol=1e-12)
    post = em.e_step(x, 2, init=init, labels=hidden, labels_mask=mask)
    assert post.enumerated_sites == ["z_unobserved"]
    assert post.marginal("z_unobserved")[~mask].sum(-1).allclose(torch.ones((~mask).sum(), dtype=D))


def test_generate_runs_the_model_forward_and_leaves_the_store_alone():
    phi = torch.tensor([0.2, 0.8], dtype=D)
    mu = torch.tensor([[-5.0, 0.0], [5.0, 1.0]], dtype=D)
    Sigma = torch.tensor([[1.0, 0.25], [0.5, 0.5]], dtype=D)  # diag: per-coordinate variances
    pyro.param("mu", torch.zeros(1, dtype=D))
    x, z = gmm.generate(4000, phi, mu, Sigma, seed=5, covariance_type="diag")
    assert x.shape == (4000, 2) and z.shape == (4000,)
    assert torch.equal(pyro.param("mu"), torch.zeros(1, dtype=D))
    # Law of large numbers: frequencies, means and variances within ~5 standard errors.
    assert abs((z == 0).double().mean() - 0.2) < 5 * (0.2 * 0.8 / 4000) ** 0.5
    for j in range(2):
        xj = x[z == j]
        assert torch.allclose(xj.mean(0), mu[j], atol=5 * (Sigma[j].max() / len(xj)) ** 0.5)
        assert torch.allclose(xj.var(0), Sigma[j], rtol=0.15)
    again, _ = gmm.generate(4000, phi, mu, Sigma, seed=5, covariance_type="diag")
    assert torch.equal(x, again)


def test_bad_inputs_are_clear_errors():
    x = load_old_faithful()[:10]
    em = ppl_em.EM(gmm.model)
    with pytest.raises(ValueError, match="covariance_type must be one of.*got 'diagonal'"):
        em.step(x, 2, covariance_type="diagonal")
    with pytest.raises(ValueError, match=r"x must be a tensor of shape \(n, d\), got \(10,\).*x\[:, None\]"):
        em.step(x[:, 0], 2)
    with pytest.raises(ValueError, match=r"labels must be a long tensor of shape \(10,\), got torch.float64"):
        em.step(x, 2, labels=torch.zeros(10, dtype=D))
    with pytest.raises(ValueError, match="labels_mask was given without labels"):
        em.step(x, 2, labels_mask=torch.ones(10, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"labels_mask must be a bool tensor of shape \(10,\)"):
        em.step(x, 2, labels=torch.zeros(10, dtype=torch.long), labels_mask=torch.ones(10))


@pytest.mark.parametrize("init", [None, {"mu": torch.zeros(3, 2, dtype=torch.float64)}])
def test_default_initial_values_are_made_once_for_all_parameters(monkeypatch, init):
    """A run of the model on an empty param store makes the defaults (the data covariance, k rows) once, for
    every parameter that takes them; the values are those of init_params itself (oracle; through the store's
    constraint transforms, so within rounding)."""
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    calls = []
    own = gmm.init_params
    monkeypatch.setattr(gmm, "init_params", lambda *a, **k: calls.append(1) or own(*a, **k))
    pyro.clear_param_store()
    pyro.poutine.trace(gmm.model).get_trace(x, 3, init)
    assert len(calls) == 1
    expected = own(x, 3)
    for name in ("phi", "mu", "Sigma"):
        value = init[name] if init and name in init else expected[name]
        torch.testing.assert_close(pyro.param(name).detach(), value, rtol=1e-12, atol=1e-12)
    pyro.clear_param_store()
