"""ppl_em.sklearn.MixtureEstimator: scikit-learn's own estimator checks, and scikit-learn as the oracle.

* every check of ``sklearn.utils.estimator_checks`` for several configurations, none skipped
  (the one array-API check that scikit-learn skips without SCIPY_ARRAY_API=1 runs with it set);
* ``GridSearchCV`` over ``n_components`` next to ``GaussianMixture`` on the same blobs: the
  same k by BIC, the same log-likelihood at it;
* ``Pipeline(StandardScaler(), MixtureEstimator())``, ``clone`` and pickling round trips;
* ``score_samples`` against log sum_j phi_j N(x^(i) | mu_j, Sigma_j) written out with scipy.
"""

import pickle
import warnings

import numpy as np
import pyro
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning as SklearnConvergenceWarning
from sklearn.exceptions import NotFittedError
from sklearn.mixture import GaussianMixture
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

import ppl_em
from ppl_em.models import bernoulli_mixture, gmm, poisson_mixture
from ppl_em.sklearn import ROW_MODELS, ConvergenceWarning, MixtureEstimator, aic_scorer, bic_scorer

CHECKED = [
    MixtureEstimator(random_state=0),
    *[MixtureEstimator(n_components=2, covariance_type=c, random_state=0) for c in ("full", "diag", "spherical", "tied")],
    MixtureEstimator("kmeans", 3, method="hard_em", random_state=0),
]


@parametrize_with_checks(CHECKED)
def test_sklearn_estimator_checks(estimator, check, monkeypatch):
    # check_array_api_input raises SkipTest unless SCIPY_ARRAY_API=1; with it set it runs for real.
    monkeypatch.setenv("SCIPY_ARRAY_API", "1")
    check(estimator)


def blobs(n_per=100, seed=0):
    """Three well-separated 2-D Gaussian blobs, (3 n_per, 2), and their labels, in random order.

    Shuffled, so that GridSearchCV's unshuffled folds each hold part of every blob.
    """
    rng = np.random.RandomState(seed)
    centres = np.array([[-6.0, 0.0], [6.0, 0.0], [0.0, 8.0]])
    X = np.vstack([rng.normal(c, [1.0, 0.7], size=(n_per, 2)) for c in centres])
    order = rng.permutation(3 * n_per)
    return X[order], np.repeat(np.arange(3), n_per)[order]


def test_grid_search_by_bic_chooses_the_k_that_scikit_learns_gaussian_mixture_chooses():
    X, _ = blobs()
    grid = {"n_components": list(range(1, 7))}
    ours = GridSearchCV(MixtureEstimator(random_state=0, n_init=2), grid, scoring=bic_scorer, cv=3).fit(X)
    theirs = GridSearchCV(GaussianMixture(random_state=0, n_init=2), grid, scoring=bic_scorer, cv=3).fit(X)
    assert ours.best_params_ == theirs.best_params_ == {"n_components": 3}
    # The refitted best models agree as density estimates: the same mean log-likelihood and BIC.
    assert ours.best_estimator_.score(X) == pytest.approx(theirs.best_estimator_.score(X), abs=1e-4)
    assert ours.best_estimator_.bic(X) == pytest.approx(theirs.best_estimator_.bic(X), abs=0.1)
    # Where the maximum-likelihood fit is unique (k = 1, and the true k = 3 on well-separated blobs) the
    # cross-validated criteria agree; for other k, both land on one of several local optima.
    for k in (1, 3):
        assert ours.cv_results_["mean_test_score"][k - 1] == pytest.approx(
            theirs.cv_results_["mean_test_score"][k - 1], rel=1e-4)


def test_default_score_is_the_held_out_mean_log_likelihood_like_gaussian_mixture():
    X, _ = blobs(seed=1)
    grid = {"n_components": [1, 2, 3]}
    ours = GridSearchCV(MixtureEstimator(random_state=0), grid, cv=3).fit(X)
    theirs = GridSearchCV(GaussianMixture(random_state=0), grid, cv=3).fit(X)
    assert ours.best_params_ == theirs.best_params_ == {"n_components": 3}
    for k in (1, 3):  # unique optima (k = 2 merges one of three pairs of blobs: several local optima)
        assert ours.cv_results_["mean_test_score"][k - 1] == pytest.approx(
            theirs.cv_results_["mean_test_score"][k - 1], rel=1e-4)


def test_fitted_parameters_match_gaussian_mixture_up_to_the_order_of_components():
    X, _ = blobs(seed=2)
    for covariance_type in ("full", "diag", "spherical", "tied"):
        ours = MixtureEstimator(n_components=3, covariance_type=covariance_type, random_state=0).fit(X)
        theirs = GaussianMixture(3, covariance_type=covariance_type, random_state=0, tol=1e-6).fit(X)
        order = [int(np.argmin(((theirs.means_ - m) ** 2).sum(1))) for m in ours.means_]
        assert sorted(order) == [0, 1, 2]
        np.testing.assert_allclose(ours.weights_, theirs.weights_[order], atol=1e-3)
        np.testing.assert_allclose(ours.means_, theirs.means_[order], atol=1e-2)
        cov = theirs.covariances_ if covariance_type == "tied" else theirs.covariances_[order]
        np.testing.assert_allclose(ours.covariances_, cov, atol=1e-2)
        assert ours.covariances_.shape == theirs.covariances_.shape
        assert ours.score(X) == pytest.approx(theirs.score(X), abs=1e-4)
        assert ours.bic(X) == pytest.approx(theirs.bic(X), abs=0.1)
        assert ours.aic(X) == pytest.approx(theirs.aic(X), abs=0.1)


def mixture_log_density(X, phi, mu, Sigma):
    """log sum_j phi_j N(x^(i) | mu_j, Sigma_j), written out with scipy: shape (n,)."""
    terms = [np.log(phi[j]) + multivariate_normal(mu[j], Sigma[j]).logpdf(X) for j in range(len(phi))]
    return logsumexp(np.stack(terms, 1), axis=1)


def test_score_samples_is_the_mixture_log_density_and_averages_to_score():
    X, _ = blobs(seed=3)
    est = MixtureEstimator(n_components=3, random_state=0).fit(X)
    expected = mixture_log_density(X, est.weights_, est.means_, est.covariances_)
    np.testing.assert_allclose(est.score_samples(X), expected, rtol=1e-10)
    # score() comes from the E-step's log p(x), score_samples from conditioned runs of the model
    assert est.score(X) == pytest.approx(est.score_samples(X).mean(), rel=1e-12)
    assert est.lower_bound_ == pytest.approx(est.score(X), rel=1e-10)


def test_predict_proba_is_bayes_rule_and_fit_predict_agrees_with_predict():
    X, y = blobs(seed=4)
    est = MixtureEstimator(n_components=3, random_state=0)
    labels = est.fit_predict(X)
    np.testing.assert_array_equal(labels, est.predict(X))
    resp = est.predict_proba(X)
    log_joint = np.stack([np.log(est.weights_[j]) + multivariate_normal(est.means_[j], est.covariances_[j]).logpdf(X)
                          for j in range(3)], 1)
    np.testing.assert_allclose(resp, np.exp(log_joint - logsumexp(log_joint, axis=1, keepdims=True)), atol=1e-12)
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(y, labels) == 1.0


def test_pipeline_with_standard_scaler_equals_fitting_the_scaled_data():
    X, _ = blobs(seed=5)
    X = X * [100.0, 0.01] + [1000.0, -5.0]  # wildly different feature scales
    pipe = Pipeline([("scale", StandardScaler()), ("mixture", MixtureEstimator(n_components=3, random_state=0))])
    labels = pipe.fit(X).predict(X)
    Z = StandardScaler().fit_transform(X)
    direct = MixtureEstimator(n_components=3, random_state=0).fit(Z)
    np.testing.assert_array_equal(labels, direct.predict(Z))
    assert pipe.score(X) == pytest.approx(direct.score(Z), rel=1e-12)
    np.testing.assert_allclose(pipe.score_samples(X), direct.score_samples(Z), rtol=1e-12)
    # and a search over the pipeline's step parameter
    search = GridSearchCV(pipe, {"mixture__n_components": [1, 2, 3, 4]}, scoring=bic_scorer, cv=3).fit(X)
    assert search.best_params_ == {"mixture__n_components": 3}


def test_clone_round_trip():
    est = MixtureEstimator("gmm", 3, covariance_type="diag", n_init=2, max_iter=50, tol=1e-4, random_state=7,
                           model_kwargs={})
    X, _ = blobs(seed=6)
    est.fit(X)
    copy = clone(est)
    assert copy.get_params() == est.get_params()
    assert copy is not est and not hasattr(copy, "params_")
    with pytest.raises(NotFittedError):
        copy.predict(X)
    np.testing.assert_array_equal(copy.fit(X).predict(X), est.predict(X))  # same seed, same fit
    assert copy.set_params(n_components=2).fit(X).predict_proba(X).shape == (300, 2)


def test_pickle_round_trip_keeps_predictions_and_the_parameter_count():
    X, _ = blobs(seed=7)
    est = MixtureEstimator(n_components=3, random_state=0).fit(X)
    back = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(back.predict_proba(X), est.predict_proba(X))
    assert back.bic(X) == est.bic(X)  # the constraints (simplex, positive definite) survive pickling


def test_every_row_model_of_the_registry_fits():
    rng = np.random.RandomState(0)
    binary = (rng.rand(90, 6) < np.repeat([[0.9] * 3 + [0.1] * 3, [0.1] * 3 + [0.9] * 3], 45, axis=0)).astype(float)
    counts = rng.poisson(np.repeat([[1.0, 9.0], [9.0, 1.0]], 45, axis=0)).astype(float)
    X, _ = blobs(seed=8)
    data = {"gmm": X, "kmeans": X, "bernoulli_mixture": binary, "poisson_mixture": counts}
    assert set(data) == set(ROW_MODELS)
    for name in ROW_MODELS:
        k = 3 if name in ("gmm", "kmeans") else 2
        est = MixtureEstimator(name, k, random_state=0).fit(data[name])
        assert est.predict_proba(data[name]).shape == (len(data[name]), k)
        assert est.weights_.shape == (k,) and est.converged_ and est.n_iter_ >= 1
        assert est.score(data[name]) == pytest.approx(est.score_samples(data[name]).mean(), rel=1e-12)
        assert set(est.params_) <= {"phi", "mu", "Sigma", "p", "rate"}
    assert MixtureEstimator("kmeans", 3, random_state=0).fit(X).covariances_.tolist() == [1.0, 1.0, 1.0]


def test_bernoulli_and_poisson_score_samples_match_their_densities():
    rng = np.random.RandomState(1)
    counts = rng.poisson(np.repeat([[1.0, 9.0], [9.0, 1.0]], 40, axis=0)).astype(float)
    est = MixtureEstimator("poisson_mixture", 2, random_state=0).fit(counts)
    from scipy.stats import poisson

    rate = est.params_["rate"]
    log_joint = np.stack([np.log(est.weights_[j]) + poisson(rate[j]).logpmf(counts).sum(1) for j in range(2)], 1)
    np.testing.assert_allclose(est.score_samples(counts), logsumexp(log_joint, axis=1), rtol=1e-10)
    binary = (counts > 4).astype(float)
    est = MixtureEstimator("bernoulli_mixture", 2, random_state=0).fit(binary)
    p = est.params_["p"]
    log_joint = np.stack([np.log(est.weights_[j]) + (binary * np.log(p[j]) + (1 - binary) * np.log1p(-p[j])).sum(1)
                          for j in range(2)], 1)
    np.testing.assert_allclose(est.score_samples(binary), logsumexp(log_joint, axis=1), rtol=1e-8)


def user_model(x, k=2):
    """A model of the user's own: a mixture of Laplace distributions with one shared scale."""
    from pyro.distributions import constraints

    import pyro.distributions as dist

    phi = pyro.param("weights", torch.full((k,), 1.0 / k, dtype=x.dtype), constraint=constraints.simplex)
    loc = pyro.param("loc", x[torch.linspace(0, len(x) - 1, k).long()].clone())
    scale = pyro.param("scale", torch.ones((), dtype=x.dtype), constraint=constraints.positive)
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(phi), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Laplace(loc[z], scale).to_event(1), obs=x)


def test_a_users_own_model_gets_params_and_every_method():
    X, y = blobs(n_per=50, seed=9)
    est = MixtureEstimator(user_model, 3, init_params="random_from_data", tol=1e-4, max_iter=200,
                           random_state=0).fit(X)
    assert sorted(est.params_) == ["loc", "scale", "weights"]
    assert not hasattr(est, "means_") and not hasattr(est, "weights_")
    from scipy.stats import laplace

    p = est.params_
    log_joint = np.stack([np.log(p["weights"][j]) + laplace(p["loc"][j], p["scale"]).logpdf(X).sum(1)
                          for j in range(3)], 1)
    np.testing.assert_allclose(est.score_samples(X), logsumexp(log_joint, axis=1), rtol=1e-10)
    Xs, ys = est.sample(20)
    assert Xs.shape == (20, 2) and ys.shape == (20,) and set(ys) <= {0, 1, 2}


def test_sample_is_seeded_by_random_state_and_leaves_the_global_random_state_alone():
    X, _ = blobs(seed=10)
    est = MixtureEstimator(n_components=3, random_state=0).fit(X)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    Xa, ya = est.sample(500)
    np.testing.assert_array_equal(torch.rand(3), before)
    Xb, yb = est.sample(500)
    np.testing.assert_array_equal(Xa, Xb)
    assert Xa.shape == (500, 2) and ya.dtype.kind == "i"
    # the draws come from the fitted mixture: per-component means near mu_j
    for j in range(3):
        np.testing.assert_allclose(Xa[ya == j].mean(0), est.means_[j], atol=0.3)
    with pytest.raises(ValueError, match="n_samples must be an integer >= 1, got 0"):
        est.sample(0)


def test_fit_leaves_the_callers_param_store_as_it_was():
    pyro.clear_param_store()
    pyro.param("mine", torch.ones(2))
    MixtureEstimator(n_components=2, random_state=0).fit(blobs(seed=11)[0])
    assert list(pyro.get_param_store().keys()) == ["mine"]
    pyro.clear_param_store()


def test_convergence_warning_is_both_scikit_learns_and_ppl_ems():
    X, _ = blobs(seed=12)
    with pytest.warns(SklearnConvergenceWarning, match="did not converge.*max_iter=1.*Increase max_iter") as record:
        est = MixtureEstimator(n_components=3, max_iter=1, random_state=0).fit(X)
    assert isinstance(record[0].message, ppl_em.ConvergenceWarning)
    assert issubclass(ConvergenceWarning, ppl_em.ConvergenceWarning)
    assert est.converged_ is False and est.n_iter_ == 1


@pytest.mark.parametrize("params, match", [
    ({"model": "hmm"}, r"model 'hmm' does not take rows x of shape \(n, d\).*ppl_em.select"),
    ({"model": "nope"}, r"model must be one of \('gmm', 'kmeans'.*got 'nope'"),
    ({"model": "poisson_mixture", "covariance_type": "diag"}, "has no covariance_type argument. Leave covariance_type=None"),
    ({"covariance_type": "round"}, r"covariance_type must be one of \('full', 'diag', 'spherical', 'tied'\), got 'round'"),
    ({"n_components": 0}, "n_components must be an integer >= 1, got 0"),
    ({"n_components": 500}, "Expected n_samples >= n_components but got n_components = 500, n_samples = 300"),
    ({"init_params": "kmeans"}, r"init_params must be one of \('k-means\+\+', 'random_from_data', 'prior'\), got 'kmeans'"),
    ({"model_kwargs": {"k": 2}}, "model_kwargs must not contain 'k'.*use n_components"),
    ({"method": "mcmc"}, r"method must be one of \('em', 'hard_em', 'svi', 'vae', 'online_em'\), got 'mcmc'"),
])
def test_bad_parameters_say_what_was_expected(params, match):
    with pytest.raises(ValueError, match=match):
        MixtureEstimator(**params).fit(blobs()[0])


def test_scorers_work_for_both_estimators():
    X, _ = blobs(seed=13)
    ours = MixtureEstimator(n_components=3, random_state=0).fit(X)
    theirs = GaussianMixture(3, random_state=0).fit(X)
    assert bic_scorer(ours, X) == pytest.approx(bic_scorer(theirs, X), abs=0.1)
    assert aic_scorer(ours, X) == pytest.approx(-ours.aic(X))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert make_pipeline(StandardScaler(), MixtureEstimator(n_components=3, random_state=0)).fit(X).score(X) < 0


def test_the_estimator_and_ppl_em_fit_give_the_same_model():
    X, _ = blobs(seed=14)
    est = MixtureEstimator(n_components=3, tol=1e-6, random_state=5).fit(X)
    x = torch.tensor(X)
    result = ppl_em.fit(gmm.model, x, 3, tol=1e-6, seed=5, progress=False)
    np.testing.assert_allclose(est.means_, result.params["mu"].numpy(), rtol=1e-10)
    assert est.lower_bound_ == pytest.approx(result.log_likelihood, rel=1e-12)
    pyro.clear_param_store()


def test_models_keep_their_own_input_checks():
    with pytest.raises(ValueError, match="x must be binary"):
        MixtureEstimator("bernoulli_mixture", 2).fit(np.array([[0.0, 2.0], [1.0, 0.0], [1.0, 1.0]]))
    with pytest.raises(ValueError, match="nonnegative integer counts"):
        MixtureEstimator("poisson_mixture", 2).fit(np.array([[0.5, 2.0], [1.0, 0.0], [1.0, 1.0]]))
    assert bernoulli_mixture.model is MixtureEstimator("bernoulli_mixture")._model_and_kwargs()[0]
    assert poisson_mixture.model is MixtureEstimator("poisson_mixture")._model_and_kwargs()[0]
