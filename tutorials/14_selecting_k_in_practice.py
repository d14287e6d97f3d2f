# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 14. Choosing k in practice: `ppl_em.select` and scikit-learn
#
# Tutorial 11 explained the yardsticks for the number of components k: the training
# log-likelihood only rises with k, so k is chosen by the held-out log-likelihood, by
# BIC(k) = -2 l(theta_k) + p_k log n or by AIC(k) = -2 l(theta_k) + 2 p_k, where p_k is the
# number of free parameters of the k-component model, and checked each one against the true
# P_data. This tutorial is about the tools that run the search in practice:
#
# * `ppl_em.select` fits a model for every k and chooses one by BIC, AIC or a held-out split
#   of the data; `Selection.table()` and `ppl_em.plot.plot_selection` report the search;
# * `ppl_em.sklearn.MixtureEstimator` is the same model file as a scikit-learn estimator, so
#   `GridSearchCV` chooses k next to scikit-learn's own `GaussianMixture`, and a `Pipeline`
#   standardises the data before the mixture sees them.
#
# (Read after tutorial 11. scikit-learn is installed with the test extras.)

# %%
import math

import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.metrics import check_scoring
from sklearn.mixture import GaussianMixture
from sklearn.model_selection import GridSearchCV, KFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import ppl_em
from ppl_em import teaching
from ppl_em.datasets import load_old_faithful
from ppl_em.models import gmm, poisson_mixture
from ppl_em.plot import plot_selection
from ppl_em.sklearn import MixtureEstimator, bic_scorer

QUICK, OUT = teaching.setup(globals().get("__file__"))  # no __file__ in a notebook
f64 = torch.float64
KS = range(1, 5) if QUICK else range(1, 9)
OPTIONS = {"n_init": 1 if QUICK else 2, "tol": 1e-5, "max_iter": 300, "progress": False}

# %% [markdown]
# ## Data with three components
#
# n points x^(i) drawn from a Gaussian mixture with k = 3 components (`gmm.generate`), whose
# means mu_j lie far apart compared with the spread Sigma_j of each.

# %%
n = 240 if QUICK else 600
phi = torch.tensor([0.3, 0.3, 0.4], dtype=f64)
mu = torch.tensor([[-4.0, 0.0], [4.0, 0.0], [0.0, 5.0]], dtype=f64)
Sigma = torch.tensor([[[1.0, 0.3], [0.3, 0.5]], [[0.6, 0.0], [0.0, 1.0]], [[0.8, -0.2], [-0.2, 0.8]]], dtype=f64)
x, z = gmm.generate(n, phi, mu, Sigma, seed=0)
print(x.shape, torch.bincount(z).tolist())

# %% [markdown]
# ## One call: `ppl_em.select`
#
# `ppl_em.select(model, x, k=KS, criterion="bic")` calls `ppl_em.fit(model, x, k=k)` for every
# k in `KS` with the same options and seed (here `n_init` restarts each, the best kept) and
# returns a `Selection`: `scores` (the criterion per k), `best_k`, `results` (the `FitResult`
# of every k), `best` (the chosen fit) and `rows`, which `table()` prints: p_k, the training
# log-likelihood per point, BIC, AIC, the iterations and whether each fit converged. Ties go
# to the smaller k. The rows are the fits' own numbers, and `best_k` is the argmin of BIC.

# %%
selection = ppl_em.select(gmm.model, x, k=KS, criterion="bic", **OPTIONS)
print(selection.table())
for row in selection.rows:
    fit_k = selection.results[row["k"]]
    assert math.isclose(row["log_likelihood"], fit_k.score(x, k=row["k"]), rel_tol=1e-9)
    assert math.isclose(row["bic"], fit_k.bic(x, k=row["k"]), rel_tol=1e-9)
    assert math.isclose(row["aic"], fit_k.aic(x, k=row["k"]), rel_tol=1e-9)
    assert row["converged"]
assert selection.best_k == min(selection.ks, key=selection.scores.get) == 3
assert selection.best is selection.results[3]

# %% [markdown]
# `plot_selection` draws the criterion against k and marks the chosen k with a star (a fit
# that stopped at `max_iter` would get a hollow marker).

# %%
plot_selection(OUT / "14_selection_bic.png", selection)

# %% [markdown]
# ### Exercise 14.1: counting the free parameters p_k
#
# BIC and AIC charge for every free parameter. A Gaussian mixture in d dimensions has k - 1
# free weights (phi sums to 1), k d means and, for the covariances Sigma_j, the count of its
# `covariance_type`: `"full"` (a symmetric d x d matrix per component), `"diag"` (d variances
# per component), `"spherical"` (one variance sigma_j^2 per component) or `"tied"` (one full
# Sigma shared by all components). Write `n_free_parameters(k, d, covariance_type)`. The check
# compares it with the p_k of `select`'s rows (full covariances), and with the counts that
# scikit-learn's `GaussianMixture` and `MixtureEstimator` use in their BIC:
# p = (BIC + 2 l(theta)) / log n.

# %% tags=["exercise"]
def n_free_parameters(k, d, covariance_type="full"):
    """p_k of a k-component Gaussian mixture in d dimensions."""
    raise NotImplementedError("Exercise 14.1")


# %% tags=["solution", "hide-cell"] jupyter={"source_hidden": true}
def n_free_parameters(k, d, covariance_type="full"):
    covariances = {"full": k * d * (d + 1) // 2, "diag": k * d, "spherical": k, "tied": d * (d + 1) // 2}
    return (k - 1) + k * d + covariances[covariance_type]


# %%
def parameters_in_bic(estimator, X):
    """p recovered from a fitted estimator's BIC: (BIC + 2 n score) / log n."""
    return round((estimator.bic(X) + 2 * len(X) * estimator.score(X)) / math.log(len(X)))


def check_parameter_count():
    for row in selection.rows:
        assert n_free_parameters(row["k"], 2) == row["n_parameters"]
    X = x.numpy()
    for covariance_type in ("full", "diag", "spherical", "tied"):
        for k in (1, 2, 3):
            theirs = GaussianMixture(k, covariance_type=covariance_type, random_state=0).fit(X)
            assert parameters_in_bic(theirs, X) == n_free_parameters(k, 2, covariance_type)
        ours = MixtureEstimator(n_components=2, covariance_type=covariance_type, random_state=0).fit(X)
        assert parameters_in_bic(ours, X) == n_free_parameters(2, 2, covariance_type)


teaching.check_exercise("14.1", check_parameter_count)

# %% [markdown]
# ## Three criteria, one interface
#
# `criterion="aic"` runs the same fits (same options, same seed) and applies the lighter
# penalty. `criterion="heldout"` needs no parameter count: it holds out a seeded 25% of the
# data points (`test_size`), fits every k on the other 75% and scores the held-out points by
# their mean log-likelihood, higher being better; `Selection.split` records the split, and
# with `refit=True` (the default) the chosen k is fitted again on all the data. Too few
# components score the held-out points much worse. From k = 3 on the curve is a plateau: its
# maximum lies within a hundredth of a nat per point of k = 3, differences that are the noise of
# a sample of a quarter of the data, so the maximum may fall on a larger k. The smallest k on
# the plateau is the sensible reading.

# %%
aic = ppl_em.select(gmm.model, x, k=KS, criterion="aic", **OPTIONS)
heldout = ppl_em.select(gmm.model, x, k=KS, criterion="heldout", **OPTIONS)
print(heldout.table())
print(f"chosen k: BIC {selection.best_k}, AIC {aic.best_k}, held-out {heldout.best_k}")
assert aic.scores == {row["k"]: row["aic"] for row in selection.rows}  # the same fits as the BIC search
assert aic.best_k >= 3 and heldout.best_k >= 3  # neither misses a component of such separated data
assert heldout.split["n_test"] == round(0.25 * n) and heldout.split["n_train"] == n - heldout.split["n_test"]
assert all(len(fit_k.args[0]) == heldout.split["n_train"] for fit_k in heldout.results.values())
assert len(heldout.best.args[0]) == n  # refitted on all the data
assert heldout.scores[3] - heldout.scores[2] > 0.2  # k = 2 merges two components: far worse
assert max(heldout.scores.values()) - heldout.scores[3] < 0.01  # k = 3 is on the plateau

# %% [markdown]
# ## The same choice with scikit-learn
#
# `MixtureEstimator(model="gmm", n_components=k)` answers in scikit-learn's vocabulary: `fit`,
# `predict`, `predict_proba` (the responsibilities w_j^(i)), `score` (the mean
# log-likelihood), `bic`, `aic`, `sample`. `GridSearchCV` over `n_components` with
# `scoring=bic_scorer` cross-validates: in each of three folds it fits on two thirds of the
# points and scores minus the BIC of the held-out third; the best mean over the folds wins. It
# chooses k as it does for scikit-learn's `GaussianMixture`, and the two fits of the chosen k
# reach the same log-likelihood. (Without `scoring`, `GridSearchCV` uses the estimator's
# `score`: the cross-validated held-out log-likelihood per point.)

# %%
X = x.numpy()
grid = {"n_components": list(KS)}
ours = GridSearchCV(MixtureEstimator(n_init=OPTIONS["n_init"], random_state=0), grid, scoring=bic_scorer, cv=3).fit(X)
theirs = GridSearchCV(GaussianMixture(n_init=OPTIONS["n_init"], random_state=0), grid, scoring=bic_scorer, cv=3).fit(X)
print("ppl_em:", ours.best_params_, " scikit-learn:", theirs.best_params_)
assert ours.best_params_ == theirs.best_params_ == {"n_components": 3}
print(f"mean log-likelihood at k = 3: ppl_em {ours.best_estimator_.score(X):.6f}, "
      f"scikit-learn {theirs.best_estimator_.score(X):.6f}")
assert abs(ours.best_estimator_.score(X) - theirs.best_estimator_.score(X)) < 1e-4

# What a fold's score is: minus the BIC of its held-out third, at the parameters fitted on the rest.
train, test = next(KFold(3).split(X))
first_fold = MixtureEstimator(n_components=3, n_init=OPTIONS["n_init"], random_state=0).fit(X[train])
assert math.isclose(ours.cv_results_["split0_test_score"][2], -first_fold.bic(X[test]), rel_tol=1e-9)
assert check_scoring(first_fold)(first_fold, X[test]) == first_fold.score(X[test])  # the default scoring

# %%
ks = list(KS)
fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
for name, search in (("BIC", selection), ("AIC", aic)):
    axes[0].plot(ks, [search.scores[k] for k in ks], "o-", label=f"{name} (chosen k = {search.best_k})")
axes[0].set_title("ppl_em.select on all the data (lower is better)")
axes[1].plot(ks, [heldout.scores[k] for k in ks], "o-", color="tab:green")
axes[1].axvline(heldout.best_k, ls="--", color="tab:red", label=f"maximum at k = {heldout.best_k}")
axes[1].set_title("held-out log p(x) per point, 25% held out (higher is better)")
for name, search, style in (("MixtureEstimator", ours, "o-"), ("GaussianMixture", theirs, "x--")):
    axes[2].plot(ks, -search.cv_results_["mean_test_score"], style, label=name)
axes[2].set_title("GridSearchCV: BIC of the held-out folds (mean of 3)")
for ax in axes:
    ax.set_xlabel("k")
    ax.set_xticks(ks)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
fig.tight_layout()
teaching.savefig(fig, OUT / "14_criteria.png")

# %% [markdown]
# ## Standardising first: a `Pipeline`
#
# The two columns of the Old Faithful eruptions (minutes of eruption, minutes of waiting)
# have spreads that differ by a factor of about twelve, so the waiting time makes up more than
# 99% of the squared distances between points, which the k-means++ starts measure. `make_pipeline(StandardScaler(),
# MixtureEstimator())` fits the mixture to x' = (x - m) / s, each column centred and divided by
# its standard deviation s_a, and `GridSearchCV` tunes the mixture's k inside the pipeline
# (`bic_scorer` scores the last step on the standardised fold).
#
# Does standardising change the BIC's choice? By the change of variables,
# p(x) = p'(x') / prod_a s_a for the mixture p' on the standardised scale and the same
# mixture mapped back (mu_j = m + s mu'_j, Sigma_j = S Sigma'_j S with S = diag(s)), so
# BIC(x) = BIC'(x') + 2 n sum_a log s_a: the same for every k. The choice changes only if EM
# ends in different optima on the two scales; for k = 1 (a closed form) and for the chosen
# k = 2 it does not.

# %%
faithful = load_old_faithful().numpy()
pipe = make_pipeline(StandardScaler(), MixtureEstimator(random_state=0))
search = GridSearchCV(pipe, {"mixtureestimator__n_components": list(KS)}, scoring=bic_scorer, cv=3).fit(faithful)
print(search.best_params_)
assert search.best_params_ == {"mixtureestimator__n_components": 2}
scaler, mixture = search.best_estimator_[0], search.best_estimator_[-1]
spread = faithful.std(0)
assert 10 < spread[1] / spread[0] < 14 and spread[1] ** 2 / (spread ** 2).sum() > 0.99
labels = search.best_estimator_.predict(faithful)
print("points per component:", np.bincount(labels).tolist())

# The fitted mixture mapped back to minutes: its BIC differs from the standardised one by 2 n sum log s.
s, m = torch.tensor(scaler.scale_), torch.tensor(scaler.mean_)
back = {"phi": torch.tensor(mixture.weights_), "mu": m + s * torch.tensor(mixture.means_),
        "Sigma": s[:, None] * torch.tensor(mixture.covariances_) * s[None, :]}
log_p = teaching.log_joint_table(torch.tensor(faithful), **back).logsumexp(-1).sum().item()
bic_minutes = -2 * log_p + n_free_parameters(2, 2) * math.log(len(faithful))
offset = 2 * len(faithful) * np.log(scaler.scale_).sum()
assert math.isclose(bic_minutes, mixture.bic(scaler.transform(faithful)) + offset, rel_tol=1e-9)
for k in (1, 2):  # EM on either scale reaches the same mixture here, so the BICs differ by that offset
    raw = MixtureEstimator(n_components=k, random_state=0).fit(faithful)
    standardised = MixtureEstimator(n_components=k, random_state=0).fit(scaler.transform(faithful))
    assert abs(raw.bic(faithful) - standardised.bic(scaler.transform(faithful)) - offset) < 1e-2

# %% [markdown]
# ### Exercise 14.2: a scorer that looks inside a pipeline
#
# A scikit-learn scorer is a function `scorer(estimator, X, y=None)` that returns a number,
# higher being better, for a fitted estimator on the held-out X. A `Pipeline` has no `bic`
# method: its last step has, on the data as the steps before it transform them. Write
# `neg_bic(estimator, X, y=None)` that works for a plain estimator and for a pipeline (a
# pipeline supports slicing: `pipe[:-1]` is the steps before the last, `pipe[-1]` the last).
# The check compares it with `bic_scorer` on the three searches' best estimators.

# %% tags=["exercise"]
def neg_bic(estimator, X, y=None):
    """-BIC of a fitted estimator, or of a pipeline's last step on X transformed by the others."""
    raise NotImplementedError("Exercise 14.2")


# %% tags=["solution", "hide-cell"] jupyter={"source_hidden": true}
def neg_bic(estimator, X, y=None):
    if hasattr(estimator, "steps"):
        X, estimator = estimator[:-1].transform(X), estimator[-1]
    return -float(estimator.bic(X))


# %%
def check_scorer():
    for fitted, data in ((ours.best_estimator_, X), (theirs.best_estimator_, X), (search.best_estimator_, faithful)):
        assert math.isclose(neg_bic(fitted, data), bic_scorer(fitted, data), rel_tol=1e-12)
    assert math.isclose(neg_bic(search.best_estimator_, faithful), -mixture.bic(scaler.transform(faithful)))


teaching.check_exercise("14.2", check_scorer)

# %% [markdown]
# ## Any model file
#
# `ppl_em.select` needs only a model that takes `k`: the same call chooses the number of
# components of a Poisson mixture of counts (or the states of an HMM, the topics of a topic
# model). Here three components with rates lambda_j per count column.

# %%
rate = torch.tensor([[1.0, 10.0], [6.0, 6.0], [12.0, 1.0]], dtype=f64)
counts, _ = poisson_mixture.generate(n, torch.tensor([0.3, 0.4, 0.3], dtype=f64), rate, seed=1)
counts_selection = ppl_em.select(poisson_mixture.model, counts, k=KS, **OPTIONS)
print(counts_selection.table())
assert counts_selection.best_k == 3

# %% [markdown]
# **Summary.** `ppl_em.select` runs the search of tutorial 11 in one call and keeps every fit;
# its table and `plot_selection` show how clear the choice is (a plateau of the held-out
# curve asks for the smallest k on it). In scikit-learn, `MixtureEstimator` takes the place of
# `GaussianMixture` in `GridSearchCV` and `Pipeline`, for any model file called as
# `model(x, k)`, and `bic_scorer` (or `aic_scorer`) makes the search choose by BIC (AIC) of
# the held-out folds.
