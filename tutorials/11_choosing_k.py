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
# # 11. Choosing k, and judging a clustering without labels
#
# Unsupervised learning has no test labels to score against, yet we must choose k and
# compare fits. The notes put the question as P_data(x) against P_model(x): the data come from
# an unknown distribution P_data, and a density model is good when P_model is close to it.
# Here P_data is a GMM we chose, so every yardstick can be checked against the truth:
#
# * the **training log-likelihood**, which only rises with k (and so cannot choose it);
# * the **held-out log-likelihood** (1/m) sum log P_model(x) on fresh points, an estimate of
#   E_{P_data}[log P_model(x)] = -H(P_data) - KL(P_data || P_model);
# * **BIC** and **AIC**, -2 log p(x; theta) plus a charge per free parameter;
# * the **silhouette**, which scores the clustering's geometry and needs no model at all;
# * the **adjusted Rand index** against true labels, where (as here) they are known.
#
# (Read after tutorial 3. The fits, their log-likelihoods, BIC and AIC come from
# `ppl_em.select`; the held-out scores from `FitResult.score` on a fresh test set.
# scikit-learn, installed with the test extras, is the oracle for the two clustering metrics.
# Tutorial 14 puts the same choice into practice: `plot_selection`, a held-out split of the
# data themselves, and scikit-learn's `GridSearchCV` and `Pipeline`.)

# %%
import math

import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score, silhouette_score

import ppl_em
from ppl_em import teaching
from ppl_em.models import gmm

QUICK, OUT = teaching.setup(globals().get("__file__"))  # no __file__ in a notebook
f64 = torch.float64

# %% [markdown]
# ## P_data: a mixture we know
#
# Three components; a training set to fit, and a larger test set drawn separately from the
# same P_data. Because P_data is known, log P_data(x) can be evaluated at the test points.

# %%
truth = {"phi": torch.tensor([0.45, 0.35, 0.2], dtype=f64),
         "mu": torch.tensor([[0.0, 0.0], [4.0, 1.0], [1.5, 4.0]], dtype=f64),
         "Sigma": torch.tensor([[[1.0, 0.4], [0.4, 0.8]], [[0.8, -0.3], [-0.3, 1.2]],
                                [[0.6, 0.0], [0.0, 0.6]]], dtype=f64)}
n_train, n_test = (300, 300) if QUICK else (600, 2000)
x, z = gmm.generate(n_train, **truth, seed=0)  # (n, 2), (n,)
x_test, _ = gmm.generate(n_test, **truth, seed=1)
log_p_data = teaching.log_joint_table(x_test, **truth).logsumexp(-1)  # (m,): log P_data(x) at the test points

# %% [markdown]
# ## Fitting k = 1, ..., 6
#
# `ppl_em.select` fits the model for every k in `ks` by EM from several k-means++ starts
# (`n_init`; quick mode uses fewer and stops EM earlier), keeps the best start of each, and
# records per k the training log-likelihood (1/n) log p(x; theta_k), the number p_k of free
# parameters (counted from each parameter's constraint), BIC and AIC; `selection.table()`
# prints them, `selection.best_k` is the k of the lowest BIC. Every other yardstick is
# computed from the fits it returns, `selection.results[k]`: `score(x_test, k=k)` is
# (1/m) log p(x_test; theta_k) on the fresh test set. (`criterion="heldout"` would hold out a
# part of x itself, as in tutorial 14; here P_data gives us a fresh test set instead, on which
# the KL divergence to the truth can be estimated too.)

# %%
ks = list(range(1, 7))
selection = ppl_em.select(gmm.model, x, k=ks, criterion="bic", n_init=2 if QUICK else 5, max_iter=1000,
                          tol=1e-4 if QUICK else 1e-6, progress=False)
print(selection.table())
rows = []
for entry in selection.rows:
    kk, result = entry["k"], selection.results[entry["k"]]
    c = result.predict(x, k=kk)
    log_p_model = teaching.log_joint_table(x_test, *(result.params[p] for p in ("phi", "mu", "Sigma"))).logsumexp(-1)
    gap = log_p_data - log_p_model  # (m,): log P_data - log P_model at each test point
    rows.append({"k": kk, "fit": result, "labels": c, "n_parameters": entry["n_parameters"],
                 "train": entry["log_likelihood"], "held-out": result.score(x_test, k=kk),
                 "BIC": entry["bic"], "AIC": entry["aic"],
                 "KL": gap.mean().item(), "KL se": (gap.std() / math.sqrt(n_test)).item(),
                 "silhouette": silhouette_score(x.numpy(), c.numpy()) if kk > 1 else float("nan"),
                 "ARI": adjusted_rand_score(z.numpy(), c.numpy())})
    # The table's numbers are the fit's own: score, BIC and AIC of theta_k on the training set.
    assert math.isclose(entry["log_likelihood"], result.score(x, k=kk), rel_tol=1e-9)
    assert math.isclose(entry["bic"], result.bic(x, k=kk), rel_tol=1e-9)
    assert math.isclose(entry["aic"], result.aic(x, k=kk), rel_tol=1e-9)
    assert math.isclose(rows[-1]["held-out"], log_p_model.mean().item(), rel_tol=1e-9)
columns = ("held-out", "KL", "silhouette", "ARI")  # the yardsticks that select does not compute
print("k  " + "  ".join(f"{name:>10s}" for name in columns))
for row in rows:
    print(f"{row['k']}  " + "  ".join(f"{row[name]:10.3f}" for name in columns))


def best(name, pick=max):
    """The k chosen by yardstick ``name`` (NaN entries skipped)."""
    valid = [r for r in rows if not math.isnan(r[name])]
    return pick(valid, key=lambda r: r[name])["k"]


# %% [markdown]
# ## What each yardstick says
#
# * The training log-likelihood never falls as k grows: a mixture of k components is a special
#   case of one with k + 1, so it cannot choose k.
# * The held-out log-likelihood peaks at the true k = 3, and so does -KL(P_data || P_model):
#   on the same test points they differ by the constant mean of log P_data, so they choose the
#   same k. The KL estimate is never significantly below 0, as a KL divergence cannot be.
# * BIC's charge of log n per parameter picks k = 3; AIC's 2 per parameter is milder and picks
#   at least as many components as BIC (exercise 11.2 proves it always does, for n >= 8).
# * The silhouette and the agreement with the true labels also prefer k = 3 here.

# %%
train = [r["train"] for r in rows]
assert all(b >= a - 1e-9 for a, b in zip(train, train[1:])), "the training log-likelihood fell as k grew"
assert best("held-out") == 3 and best("KL", min) == 3
assert all(r["KL"] > -3 * r["KL se"] for r in rows)  # consistent with KL >= 0
assert all(math.isclose(r["held-out"], log_p_data.mean().item() - r["KL"], rel_tol=1e-9) for r in rows)
assert best("BIC", min) == selection.best_k == 3 and best("AIC", min) >= best("BIC", min)
assert best("silhouette") == 3 and best("ARI") == 3
print(f"chosen k: held-out {best('held-out')}, BIC {best('BIC', min)}, AIC {best('AIC', min)}, "
      f"silhouette {best('silhouette')}, ARI {best('ARI')}")

# %% [markdown]
# ## The silhouette
#
# For a point x^(i) in cluster C, let a(i) be its mean distance to the other points of C and
# b(i) its mean distance to the points of the nearest other cluster. Its silhouette is
# s(i) = (b(i) - a(i)) / max(a(i), b(i)), in [-1, 1]: near 1 when the point sits well inside
# its cluster, near 0 on a boundary, negative when it is closer to another cluster (by
# convention s(i) = 0 in a cluster of one). The silhouette of a clustering is the mean over
# points. It uses only distances, so it judges hard clusterings of any origin, and it
# prefers compact, separated, round-ish clusters.
#
# ### Exercise 11.1: the silhouette by hand
#
# Write `silhouette(x, c)` for data x (n, d) and labels c (n,). The check compares it with
# scikit-learn's `silhouette_score` for every k.

# %% tags=["exercise"]
def silhouette(x, c):
    """Mean silhouette s(i) over the points, Euclidean distances."""
    raise NotImplementedError("Exercise 11.1")


# %% tags=["solution", "hide-cell"] jupyter={"source_hidden": true}
def silhouette(x, c):
    dist = torch.cdist(x, x)  # (n, n)
    member = torch.nn.functional.one_hot(c).to(x.dtype)  # (n, clusters)
    sizes = member.sum(0)  # (clusters,)
    totals = dist @ member  # (n, clusters): summed distance from each point to each cluster
    own = member.bool()
    a = totals[own] / (sizes[c] - 1).clamp(min=1)  # the point itself is at distance 0
    b = (totals / sizes).masked_fill(own, float("inf")).min(-1).values
    s = (b - a) / torch.maximum(a, b)
    return torch.where(sizes[c] > 1, s, torch.zeros_like(s)).mean().item()


# %%
def check_silhouette():
    for row in rows[1:]:
        assert math.isclose(silhouette(x, row["labels"]), row["silhouette"], rel_tol=1e-9, abs_tol=1e-12)
    one_far = torch.tensor([0, 0, 1])  # a cluster of one point scores 0
    assert math.isclose(silhouette(torch.tensor([[0.0], [1.0], [9.0]], dtype=f64), one_far),
                        silhouette_score(np.array([[0.0], [1.0], [9.0]]), one_far.numpy()))


teaching.check_exercise("11.1", check_silhouette)

# %% [markdown]
# ## Agreement with true labels: the adjusted Rand index
#
# With true labels z^(i), count the pairs of points that the clustering and the labels treat
# alike. From the contingency table n_ab (points with label a in cluster b), its row sums
# r_a and column sums s_b,
#
#     index    = sum_ab C(n_ab, 2)
#     expected = sum_a C(r_a, 2) sum_b C(s_b, 2) / C(n, 2)          (the index of random labels)
#     ARI      = (index - expected) / ((sum_a C(r_a, 2) + sum_b C(s_b, 2)) / 2 - expected)
#
# 1 for identical partitions (up to renaming), about 0 for a random one. It does not care
# about label numbers, so label switching (tutorial 10) does not affect it.

# %%
def pairs(counts):
    return (counts * (counts - 1) / 2).sum()


def adjusted_rand(truth_labels, c):
    table = torch.zeros(int(truth_labels.max()) + 1, int(c.max()) + 1, dtype=f64)
    table.index_put_((truth_labels, c), torch.ones(len(c), dtype=f64), accumulate=True)
    index, rows_, cols = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
    expected = rows_ * cols / pairs(torch.tensor(float(len(c)), dtype=f64))
    return ((index - expected) / ((rows_ + cols) / 2 - expected)).item()


for row in rows[1:]:
    assert math.isclose(adjusted_rand(z, row["labels"]), row["ARI"], rel_tol=1e-9)
assert math.isclose(adjusted_rand(z, (z + 1) % 3), 1.0)  # renamed labels: still perfect agreement

# %% [markdown]
# ### Exercise 11.2: AIC never picks fewer components than BIC
#
# Both minimise -2 l_k + penalty * p_k over k, where l_k is the maximised log-likelihood and
# p_k the number of free parameters, increasing in k; AIC's penalty is 2, BIC's log n.
# Prove that for n >= 8 (log n > 2) the AIC choice is at least the BIC choice. Then write
# `penalised_choice(log_lik, n_params, penalty)` returning the index that minimises the
# criterion; the check tries it on our fits and on random tables.

# %% tags=["exercise"]
def penalised_choice(log_lik, n_params, penalty):
    """argmin_k of -2 log_lik[k] + penalty * n_params[k] (lists of equal length)."""
    raise NotImplementedError("Exercise 11.2")


# %% [markdown] tags=["solution", "hide-cell"] jupyter={"source_hidden": true}
# **Solution.** Let k_B minimise BIC(k) = -2 l_k + p_k log n, and take any k < k_B, so
# p_k < p_{k_B}. Then AIC(k) = BIC(k) - p_k (log n - 2) >= BIC(k_B) - p_k (log n - 2), and
# that is > BIC(k_B) - p_{k_B} (log n - 2) = AIC(k_B), using log n - 2 > 0 in the strict step.
# So every k below k_B has a larger AIC than k_B, and AIC's minimiser is at least k_B.

# %% tags=["solution", "hide-cell"] jupyter={"source_hidden": true}
def penalised_choice(log_lik, n_params, penalty):
    scores = [-2 * l + penalty * p for l, p in zip(log_lik, n_params)]
    return min(range(len(scores)), key=scores.__getitem__)


# %%
def check_choice():
    log_lik = [r["train"] * n_train for r in rows]
    n_params = [r["n_parameters"] for r in rows]
    assert ks[penalised_choice(log_lik, n_params, math.log(n_train))] == best("BIC", min)
    assert ks[penalised_choice(log_lik, n_params, 2.0)] == best("AIC", min)
    g = torch.Generator().manual_seed(0)
    for _ in range(500):
        ll = (100 * torch.rand(6, generator=g, dtype=f64)).sort().values.tolist()
        p = torch.randint(1, 20, (6,), generator=g).cumsum(0).tolist()  # increasing
        n_points = int(torch.randint(8, 10_000, (1,), generator=g))
        assert penalised_choice(ll, p, 2.0) >= penalised_choice(ll, p, math.log(n_points))


teaching.check_exercise("11.2", check_choice)

# %%
fig, axes = plt.subplots(1, 4, figsize=(18, 4))
axes[0].plot(ks, [r["train"] for r in rows], "o-", label="training set")
axes[0].plot(ks, [r["held-out"] for r in rows], "s-", label="held-out set")
axes[0].axhline(log_p_data.mean().item(), color="gray", ls=":", label="E[log P_data(x)] (the ceiling)")
axes[0].set_ylabel("mean log-likelihood per point")
axes[0].set_title("log-likelihood")
axes[1].plot(ks, [r["BIC"] for r in rows], "o-", label="BIC (log n per parameter)")
axes[1].plot(ks, [r["AIC"] for r in rows], "s-", label="AIC (2 per parameter)")
axes[1].set_ylabel("criterion (lower is better)")
axes[1].set_title("information criteria")
axes[2].errorbar(ks, [r["KL"] for r in rows], yerr=[2 * r["KL se"] for r in rows], fmt="o-", capsize=3,
                 label="estimate +- 2 standard errors")
axes[2].axhline(0.0, color="gray", ls=":")
axes[2].set_ylabel("KL(P_data || P_model) (nats)")
axes[2].set_title("distance to the truth (known here)")
axes[3].plot(ks[1:], [r["silhouette"] for r in rows[1:]], "o-", label="silhouette (no labels)")
axes[3].plot(ks, [r["ARI"] for r in rows], "s-", label="adjusted Rand index (true labels)")
axes[3].set_ylabel("score (higher is better)")
axes[3].set_title("clustering metrics")
for ax in axes:
    ax.axvline(3, color="tab:green", lw=6, alpha=0.15)
    ax.set_xlabel("k (shaded: the true k = 3)")
    ax.legend(fontsize=8)
fig.tight_layout()
teaching.savefig(fig, OUT / "11_choosing_k.png")

# %% [markdown]
# ## P_data against P_model, drawn
#
# The density contours of P_data and of three fits. Too few components (k = 1) smear the
# clusters together; the true k matches P_data closely; extra components (k = 6) chase the
# training points, and the held-out log-likelihood pays for it.

# %%
g0, g1 = torch.linspace(-3.5, 7.0, 100, dtype=f64), torch.linspace(-3.5, 6.5, 100, dtype=f64)
plane = torch.cartesian_prod(g0, g1)
shown = [("P_data (the truth)", truth, None)] + [
    (f"P_model, k = {kk}", {p: rows[kk - 1]["fit"].params[p] for p in ("phi", "mu", "Sigma")}, rows[kk - 1])
    for kk in (1, 3, 6)]
densities = [teaching.log_joint_table(plane, **theta).logsumexp(-1).exp().reshape(len(g0), len(g1)).T
             for _, theta, _ in shown]
levels = torch.linspace(0.1, 0.9, 8) * densities[0].max()  # the same contour levels in every panel
fig, axes = plt.subplots(1, 4, figsize=(17, 4), sharex=True, sharey=True)
for ax, (title, theta, row), density in zip(axes, shown, densities):
    lines = ax.contour(g0, g1, density, levels=levels.tolist(), cmap="viridis")
    ax.scatter(x[:, 0], x[:, 1], s=3, color="k", alpha=0.4)
    if row is not None:
        title += f"\nheld-out {row['held-out']:.3f}, KL {row['KL']:.3f} nats"
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("x_1")
axes[0].set_ylabel("x_2")
fig.colorbar(lines, ax=axes, label="density (the same levels in every panel)")
teaching.savefig(fig, OUT / "11_pdata_vs_pmodel.png")

# %% [markdown]
# **Summary.** Never choose k by the training likelihood. Held-out log-likelihood estimates
# how close P_model is to P_data (up to the unknown entropy of P_data); BIC approximates the
# same choice from the training set alone and tends to pick the true k when the model family
# is right, AIC picks at least as many components. The silhouette and the ARI score
# clusterings rather than densities: the silhouette needs no labels but rewards round,
# separated clusters; the ARI needs the labels, which real unsupervised problems rarely have.
