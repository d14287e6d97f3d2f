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
# # 9. Choosing k: BIC, AIC, held-out likelihood, and scikit-learn
#
# Every model so far was told its number of components k. With real data k is unknown, and
# the log-likelihood l(theta) = sum_i log p(x^(i); theta) cannot choose it: a mixture with
# k + 1 components contains the one with k (set phi_{k+1} = 0), so the best l(theta_k) never
# falls as k grows. A criterion must trade fit against the number p_k of free parameters:
#
# * **BIC** (Schwarz): BIC(k) = -2 l(theta_k) + p_k log n, lower is better;
# * **AIC** (Akaike): AIC(k) = -2 l(theta_k) + 2 p_k, lower is better, a lighter penalty;
# * **held-out log-likelihood**: fit theta_k on part of the data and score the rest,
#   (1/m) sum log p(x_test; theta_k), higher is better; no parameter count needed.
#
# `ppl_em.select` fits every k and applies one of them; `ppl_em.plot.plot_selection` draws
# the criterion against k. For scikit-learn users, `ppl_em.sklearn.MixtureEstimator` puts
# the same model file into `GridSearchCV` and `Pipeline`, next to scikit-learn's own
# `GaussianMixture`.

# %%
import os
import sys
import warnings
from pathlib import Path

import matplotlib

if "ipykernel" not in sys.modules:
    matplotlib.use("Agg")  # a script writes PNG files; a notebook shows the figures inline
import matplotlib.pyplot as plt
import numpy as np
import torch
import pyro

import ppl_em
from ppl_em.models import gmm, poisson_mixture
from ppl_em.plot import plot_selection

QUICK = os.environ.get("PPL_EM_QUICK") == "1"  # tiny sizes, for the test suite
HERE = Path(__file__).parent if "__file__" in globals() else Path.cwd()  # a notebook runs in its folder
OUT = Path(os.environ.get("PPL_EM_TUTORIAL_OUT", HERE / "_out"))
OUT.mkdir(parents=True, exist_ok=True)


def savefig(fig, name):
    """Write ``fig`` to OUT/name; in a notebook keep it open so that it is displayed."""
    fig.savefig(OUT / name, dpi=100, bbox_inches="tight")
    if "ipykernel" not in sys.modules:
        plt.close(fig)


pyro.set_rng_seed(0)
torch.set_num_threads(1)  # small data: extra threads only synchronise
f64 = torch.float64
KS = range(1, 5) if QUICK else range(1, 9)
OPTIONS = {"n_init": 1 if QUICK else 2, "tol": 1e-5, "max_iter": 300, "progress": False}

# %% [markdown]
# ## Data with three components
#
# We draw n points from the Gaussian mixture itself, `gmm.generate`, with k = 3 components
# whose means lie far apart compared with their spread.

# %%
n = 240 if QUICK else 600
phi = torch.tensor([0.3, 0.3, 0.4], dtype=f64)
mu = torch.tensor([[-4.0, 0.0], [4.0, 0.0], [0.0, 5.0]], dtype=f64)
Sigma = torch.tensor([[[1.0, 0.3], [0.3, 0.5]], [[0.6, 0.0], [0.0, 1.0]], [[0.8, -0.2], [-0.2, 0.8]]], dtype=f64)
x, z = gmm.generate(n, phi, mu, Sigma, seed=0)
print(x.shape, torch.bincount(z).tolist())

# %% [markdown]
# ## The likelihood alone always asks for more components
#
# `ppl_em.select` fits the model for every k in `KS` (with two restarts each in the full
# run, keeping the better) and records l(theta_k) / n, the number of parameters p_k, BIC and AIC. The
# log-likelihood per point rises steeply up to k = 3 and by hundredths after it (EM finds a
# local maximum, so a fit with more components can even come out a hair lower than the one
# before); BIC's penalty p_k log n grows faster than that, so BIC is lowest at k = 3.

# %%
selection = ppl_em.select(gmm.model, x, k=KS, criterion="bic", **OPTIONS)
print(selection.table())
loglik = [row["log_likelihood"] for row in selection.rows]
assert all(b >= a - 1e-3 for a, b in zip(loglik, loglik[1:])), "l(theta_k) does not fall as k grows"
assert loglik[2] - loglik[1] > 0.2 and max(loglik) - loglik[2] < 0.1  # big gain up to k = 3, small after
assert selection.best_k == 3

# BIC by hand, from the fit's log-likelihood and its parameter count (full covariances, d = 2):
# p_k = (k - 1) + k d + k d (d + 1) / 2.
for row in selection.rows:
    k, d = row["k"], 2
    p = (k - 1) + k * d + k * d * (d + 1) // 2
    assert row["n_parameters"] == p
    assert abs(row["bic"] - (-2 * n * row["log_likelihood"] + p * np.log(n))) < 1e-6
figure = plot_selection(OUT / "14_selection_bic.png", selection)  # the PNG's path

# %% [markdown]
# ## Three criteria side by side
#
# AIC penalises less (2 p_k instead of p_k log n, and log n > 2 once n > 7), so it may pick
# a larger k. The held-out criterion needs no parameter count: each k is fitted on a seeded
# 75% of the points and scored on the other 25%. Too few components score the held-out points
# much worse; from k = 3 on the curve is a plateau, whose ups and downs of a thousandth of a nat
# per point are noise (a sample of a quarter of the data), so its maximum may fall on a larger
# k. The smallest k on the plateau is the sensible reading.

# %%
aic = ppl_em.select(gmm.model, x, k=KS, criterion="aic", **OPTIONS)
heldout = ppl_em.select(gmm.model, x, k=KS, criterion="heldout", **OPTIONS)
print(heldout.table())
print(f"chosen k: BIC {selection.best_k}, AIC {aic.best_k}, held-out {heldout.best_k}")
assert aic.best_k >= 3 and heldout.best_k >= 3  # neither misses a component of such separated data
assert heldout.scores[3] - heldout.scores[2] > 0.2  # k = 2 merges two components: far worse
assert max(heldout.scores.values()) - heldout.scores[3] < 0.01  # k = 3 is on the plateau
assert heldout.split["n_test"] == round(0.25 * n)

fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
ks = list(KS)
axes[0].plot(ks, loglik, "o-")
axes[0].set_title("log p(x) / n on the fitted points")
for name, sel in (("BIC", selection), ("AIC", aic)):
    axes[1].plot(ks, [sel.scores[k] for k in ks], "o-", label=f"{name} (chosen k = {sel.best_k})")
axes[1].set_title("information criteria (lower is better)")
axes[1].legend()
axes[2].plot(ks, [heldout.scores[k] for k in ks], "o-", color="tab:green")
axes[2].axvline(heldout.best_k, ls="--", color="tab:red")
axes[2].set_title("held-out log p(x) / point (higher is better)")
for ax in axes:
    ax.set_xlabel("k")
    ax.set_xticks(ks)
    ax.grid(alpha=0.3)
savefig(fig, "14_criteria.png")

# %% [markdown]
# ## The same choice with scikit-learn
#
# `MixtureEstimator(model="gmm", n_components=k)` is the same model file as a scikit-learn
# estimator: `fit`, `predict`, `predict_proba`, `score` (the mean log-likelihood), `bic`,
# `aic`, `sample`. In a `GridSearchCV` over `n_components` with `scoring=bic_scorer` (minus
# the BIC of each held-out fold; three folds here) it chooses k as scikit-learn's
# `GaussianMixture` does.

# %%
from sklearn.mixture import GaussianMixture
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ppl_em.sklearn import MixtureEstimator, bic_scorer

X = x.numpy()
grid = {"n_components": list(KS)}
ours = GridSearchCV(MixtureEstimator(n_init=2, random_state=0), grid, scoring=bic_scorer, cv=3).fit(X)
theirs = GridSearchCV(GaussianMixture(n_init=2, random_state=0), grid, scoring=bic_scorer, cv=3).fit(X)
print("ppl_em:", ours.best_params_, " scikit-learn:", theirs.best_params_)
assert ours.best_params_ == theirs.best_params_ == {"n_components": 3}
print(f"mean log-likelihood at k = 3: ppl_em {ours.best_estimator_.score(X):.6f}, "
      f"scikit-learn {theirs.best_estimator_.score(X):.6f}")
assert abs(ours.best_estimator_.score(X) - theirs.best_estimator_.score(X)) < 1e-4

# %% [markdown]
# A `Pipeline` standardises each feature before the mixture sees it, here on the Old
# Faithful eruptions, whose two columns (minutes of eruption, minutes of waiting) differ in
# scale by a factor of twenty. The BIC of standardised data differs from that of the raw data
# by the log-Jacobian of the scaling, a constant that does not change which k wins.

# %%
from ppl_em.datasets import load_old_faithful

faithful = load_old_faithful().numpy()
pipe = make_pipeline(StandardScaler(), MixtureEstimator(random_state=0))
search = GridSearchCV(pipe, {"mixtureestimator__n_components": list(KS)}, scoring=bic_scorer, cv=3).fit(faithful)
print(search.best_params_)
assert search.best_params_ == {"mixtureestimator__n_components": 2}
labels = search.best_estimator_.predict(faithful)
print("points per component:", np.bincount(labels).tolist())

# %% [markdown]
# ## Any model file
#
# `ppl_em.select` needs only a model that takes `k`: the same call chooses the number of
# components of a Poisson mixture (or the states of an HMM, the topics of a topic model).

# %%
rate = torch.tensor([[1.0, 10.0], [6.0, 6.0], [12.0, 1.0]], dtype=f64)
counts, _ = poisson_mixture.generate(n, torch.tensor([0.3, 0.4, 0.3], dtype=f64), rate, seed=1)
counts_selection = ppl_em.select(poisson_mixture.model, counts, k=KS, **OPTIONS)
print(counts_selection.table())
assert counts_selection.best_k == 3
