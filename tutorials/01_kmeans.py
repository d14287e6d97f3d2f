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
# # 1. k-means: clustering as coordinate descent
#
# Unsupervised learning starts from S = {x^(1), ..., x^(n)}, x^(i) in R^d, with no labels.
# Clustering is the unsupervised cousin of classification; there is no single correct
# answer, always some ambiguity. k-means, with k given:
#
# 1. Initialise the centroids mu_1, ..., mu_k in R^d (randomly).
# 2. Repeat until convergence:
#    * for every i, set c^(i) := argmin_j ||x^(i) - mu_j||^2 (assign x^(i) to its closest centre);
#    * for every j, set mu_j := sum_i 1{c^(i) = j} x^(i) / sum_i 1{c^(i) = j} (the mean of its points).
#
# It minimises the **distortion** J(c, mu) = sum_i ||x^(i) - mu_{c^(i)}||^2 by coordinate
# descent: step one optimises c with mu fixed, step two optimises mu with c fixed. We write
# both steps in a few lines of torch, check that J never rises, see that J is non-convex
# (different starts, different optima), try k-means++ seeding, and compare squared distance
# with cosine similarity. Finally, the same algorithm falls out of ppl_em's EM engine as
# *hard EM* on the mixture model `models/kmeans.py`.

# %%
import math

import matplotlib.pyplot as plt
import torch
import pyro

import ppl_em
from ppl_em import teaching
from ppl_em.models import kmeans

# Quick mode (PPL_EM_QUICK=1, the test suite's) shrinks the sizes; figures go to OUT.
QUICK, OUT = teaching.setup(globals().get("__file__"))  # no __file__ in a notebook
f64 = torch.float64

# %% [markdown]
# ## Data: six blobs
#
# `kmeans.generate` runs the k-means mixture model forward: z^(i) uniform over the clusters,
# x^(i) ~ N(mu_{z^(i)}, sigma^2 I).

# %%
centres = torch.tensor([[0.0, 0.0], [4.0, 0.0], [8.0, 1.0], [0.5, 4.5], [4.5, 5.0], [9.0, 5.5]], dtype=f64)
n = 180 if QUICK else 600
x, z_true = kmeans.generate(n, centres, seed=0, scale=0.8)  # (n, 2), (n,)
k = len(centres)

# %% [markdown]
# ## The two steps, by hand

# %%
def assign(x, mu):
    """Step 1: c^(i) = argmin_j ||x^(i) - mu_j||^2, shape (n,)."""
    return ((x[:, None, :] - mu[None, :, :]) ** 2).sum(-1).argmin(-1)


def update(x, c, mu):
    """Step 2: mu_j = mean of the points with c^(i) = j (an empty cluster keeps its centre)."""
    new = mu.clone()
    for j in range(len(mu)):
        if (c == j).any():
            new[j] = x[c == j].mean(0)
    return new


def J(x, c, mu):
    """The distortion J(c, mu) = sum_i ||x^(i) - mu_{c^(i)}||^2."""
    return ((x - mu[c]) ** 2).sum()


def run_kmeans(x, mu, max_iter=100):
    """Lloyd's algorithm from centroids ``mu``; returns c, mu and J after every half-step."""
    history = []
    c = assign(x, mu)
    for _ in range(max_iter):
        history.append(J(x, c, mu).item())  # after assigning
        mu = update(x, c, mu)
        history.append(J(x, c, mu).item())  # after re-estimating
        c_new = assign(x, mu)
        if torch.equal(c_new, c):
            break
        c = c_new
    return c, mu, history


g = torch.Generator().manual_seed(3)
mu0 = x[torch.randperm(n, generator=g)[:k]]  # k random data points
c, mu, history = run_kmeans(x, mu0)
# Coordinate descent: neither step can increase J.
assert all(later <= earlier + 1e-9 for earlier, later in zip(history, history[1:]))
print(f"J fell from {history[0]:.1f} to {history[-1]:.1f} in {len(history) // 2} iterations")

fig, ax = plt.subplots(figsize=(5, 3.5))
ax.plot(torch.arange(len(history)) / 2, history, "o-", ms=3)
ax.set_xlabel("iteration (half-steps: assign, re-estimate)")
ax.set_ylabel("J(c, mu)")
ax.set_title("k-means never increases the distortion")
teaching.savefig(fig, OUT / "01_distortion.png")

# %% [markdown]
# ### Exercise 1.1: why the mean?
#
# With the assignments c fixed, cluster j contributes f(mu) = sum_{i: c^(i) = j} ||x^(i) - mu||^2
# to J. Prove that, for the m points of the cluster and their mean xbar,
#
#     f(mu) = f(xbar) + m ||mu - xbar||^2      for every mu,
#
# so the mean is the unique minimiser (and the identity says what any other centre costs).
# Then write `excess_cost(points, mu)`, the right-hand side's second term, without calling `f`.

# %% tags=["exercise"]
def excess_cost(points, mu):
    """f(mu) - f(xbar) for points (m, d) and a centre mu (d,): your closed form."""
    raise NotImplementedError("Exercise 1.1")


# %% [markdown] tags=["solution", "hide-cell"] jupyter={"source_hidden": true}
# **Solution.** Write x^(i) - mu = (x^(i) - xbar) + (xbar - mu) and expand the square:
#
#     f(mu) = sum_i ||x^(i) - xbar||^2 + 2 (xbar - mu)^T sum_i (x^(i) - xbar) + m ||xbar - mu||^2.
#
# The middle sum is sum_i x^(i) - m xbar = 0, which leaves f(xbar) + m ||mu - xbar||^2. The
# second term is positive unless mu = xbar, so the mean is the only minimiser. (Setting the
# gradient -2 sum_i (x^(i) - mu) to zero finds the same point, but the identity also proves it
# is the minimum, not just a stationary point.)

# %% tags=["solution", "hide-cell"] jupyter={"source_hidden": true}
def excess_cost(points, mu):
    """f(mu) - f(xbar) = m ||mu - xbar||^2."""
    return len(points) * ((mu - points.mean(0)) ** 2).sum()


# %%
def check_excess_cost():
    points = x[c == 0]  # the first cluster of the run above

    def f(centre):
        return ((points - centre) ** 2).sum()

    for centre in torch.randn(5, 2, generator=torch.Generator().manual_seed(5), dtype=f64) * 3:
        assert torch.allclose(excess_cost(points, centre), f(centre) - f(points.mean(0)))


teaching.check_exercise("1.1", check_excess_cost)

# %% [markdown]
# ## Non-convexity: different starts, different optima
#
# J is not convex, so k-means stops at a *local* minimum that depends on the initialisation.
# Run it from many random starts and keep the best: two of the runs below end at different
# distortions, with visibly different clusterings.

# %%
seeds = range(6 if QUICK else 20)
runs = {}
for seed in seeds:
    g = torch.Generator().manual_seed(seed)
    runs[seed] = run_kmeans(x, x[torch.randperm(n, generator=g)[:k]])
final_J = {seed: run[2][-1] for seed, run in runs.items()}
best, worst = min(final_J, key=final_J.get), max(final_J, key=final_J.get)
assert final_J[worst] > final_J[best] * 1.01, "every start reached the same optimum"
print("final J per seed:", {s: round(v, 1) for s, v in final_J.items()})

fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True, sharey=True)
for ax, seed in zip(axes, (best, worst)):
    c_s, mu_s, _ = runs[seed]
    ax.scatter(x[:, 0], x[:, 1], c=c_s, cmap="tab10", s=8)
    ax.scatter(mu_s[:, 0], mu_s[:, 1], c="k", marker="x", s=80)
    ax.set_title(f"seed {seed}: J = {final_J[seed]:.1f}")
    ax.set_xlabel("x_1")
axes[0].set_ylabel("x_2")
fig.suptitle("the same data, two starts: two local minima of J (crosses: the centroids mu_j)")
teaching.savefig(fig, OUT / "01_local_optima.png")

# %% [markdown]
# ## k-means++ seeding
#
# k-means++ (Arthur & Vassilvitskii, 2007) picks the first centre uniformly at random and each
# next one with probability proportional to D(x)^2, the squared distance to the nearest centre
# chosen so far. Far-away points are likely picks, so the centres spread out over the clusters
# and start with a lower distortion than k random data points.

# %%
J_start = {"random points": [], "k-means++": []}
J_end = {"random points": [], "k-means++": []}
for seed in seeds:
    g = torch.Generator().manual_seed(seed)
    starts = {"random points": x[torch.randperm(n, generator=g)[:k]],
              "k-means++": kmeans.kmeans_plusplus(x, k, seed=seed)[0]}
    for name, start in starts.items():
        J_start[name].append(kmeans.distortion(x, start).item())  # J at the best c for these centres
        J_end[name].append(run_kmeans(x, start)[2][-1])
for name in J_start:
    print(f"{name:14s} mean J at the start {sum(J_start[name]) / len(seeds):8.1f}, "
          f"after k-means {sum(J_end[name]) / len(seeds):7.1f} (best {min(J_end[name]):.1f})")
assert sum(J_start["k-means++"]) < sum(J_start["random points"])

# %% [markdown]
# ### Exercise 1.2: the k-means++ distribution
#
# Write `dsquared_probabilities(x, centres)`: the probability with which k-means++ picks each
# x^(i) as the next centre, given the centres chosen so far (shape (n,)). The check compares it
# with J: summed over the points, D(x)^2 is the distortion of the chosen centres.

# %% tags=["exercise"]
def dsquared_probabilities(x, centres):
    """p_i = D(x^(i))^2 / sum_l D(x^(l))^2, D = distance to the nearest chosen centre; shape (n,)."""
    raise NotImplementedError("Exercise 1.2")


# %% tags=["solution", "hide-cell"] jupyter={"source_hidden": true}
def dsquared_probabilities(x, centres):
    # Exact distances: cdist's matrix-product shortcut leaves a rounding error where x^(i) is a centre.
    d2 = torch.cdist(x, centres, compute_mode="donot_use_mm_for_euclid_dist").square().min(-1).values  # (n,)
    return d2 / d2.sum()


# %%
def check_dsquared():
    chosen = torch.tensor([3, 50, 120])
    p = dsquared_probabilities(x, x[chosen])
    assert p.shape == (n,) and torch.allclose(p.sum(), torch.tensor(1.0, dtype=f64))
    assert (p[chosen] == 0).all(), "a chosen centre cannot be picked again"
    # Sum_i D(x^(i))^2 is J at the best assignment for these centres, so p_i * J = D(x^(i))^2.
    J_chosen = kmeans.distortion(x, x[chosen])
    D = torch.cdist(x, x[chosen], compute_mode="donot_use_mm_for_euclid_dist")  # (n, 3): exact distances
    assert torch.allclose(p * J_chosen, D.square().min(-1).values)
    far = D.min(-1).values.argmax()
    assert p.argmax() == far, "the farthest point is the likeliest pick"


teaching.check_exercise("1.2", check_dsquared)

# %% [markdown]
# ## k-means is hard EM on a mixture
#
# `models/kmeans.py` is the mixture z^(i) ~ Uniform{1..k}, x^(i) | z^(i) = j ~ N(mu_j, sigma^2 I)
# with only the centroids as parameters. Then log p(x^(i), z^(i) = j) =
# -||x^(i) - mu_j||^2 / (2 sigma^2) + const, so **hard EM** (Q one-hot at the most probable z)
# assigns each point to its nearest centroid and re-estimates mu_j as the mean of its points:
# the two steps above, from the same start, to the same answer. Its loss is J / (2 sigma^2)
# plus a constant.

# %% [markdown]
# **The param store and `init=`.** Model parameters are `pyro.param` sites, and Pyro keeps
# their values in one global *param store*, keyed by name. The first time a model runs
# `pyro.param("mu", init_fn)` the store has no `"mu"`, so `init_fn()` supplies the value; every
# later run reads the stored value, which the engine's M-step overwrites. The model files take
# `init={"mu": ...}` and use it only for that first value. So: clear the store before each new
# fit (`pyro.clear_param_store()`), pass the starting point as `init=`, read the fitted values
# from `em.params`. All the tutorials work this way.

# %%
pyro.clear_param_store()
em = ppl_em.EM(kmeans.model, posterior="hard")
em.e_step(x, k, init={"mu": mu0})
assert torch.equal(em.params["mu"], mu0)  # an empty store: init= supplied the value
em.e_step(x, k, init={"mu": mu0 + 100})
assert torch.equal(em.params["mu"], mu0)  # the store already holds "mu": init= is ignored

pyro.clear_param_store()
em = ppl_em.EM(kmeans.model, posterior="hard")
losses = [em.step(x, k, init={"mu": mu0}) for _ in range(len(history) // 2 + 1)]
assert torch.allclose(em.params["mu"], mu)
assert torch.equal(em.e_step(x, k).marginal("z").argmax(-1), c)
# -log p(x^(i), z^(i) = j) = ||x^(i) - mu_j||^2 / 2 + (d / 2) log(2 pi) + log k, with sigma = 1 and d = 2.
const = n * (math.log(2 * math.pi) + math.log(k))
assert abs(losses[0] - (history[0] / 2 + const)) < 1e-6 * abs(losses[0])
print("hard EM on models/kmeans.py reproduces the hand-written k-means:", em.explain())

# %% [markdown]
# ## Squared distance or cosine similarity?
#
# The notes contrast ||x - y||^2 with cos(x, y). Which one to use is a modelling choice:
# squared distance groups points that are *close*, cosine similarity groups points that point
# in the same *direction*, whatever their length (documents of different lengths, say).
# Below, points lie along two rays from the origin with lengths from 1 to 10. Squared
# distance splits them into near and far; cosine similarity (`metric="cosine"`, spherical
# k-means on the unit vectors x / ||x||) recovers the two rays.

# %%
m = 100 if QUICK else 300
g = torch.Generator().manual_seed(0)
ray = torch.randint(2, (m,), generator=g)  # (m,): which direction
angle = torch.tensor([0.45, 1.1], dtype=f64)[ray] + 0.05 * torch.randn(m, generator=g, dtype=f64)
length = 1 + 9 * torch.rand(m, generator=g, dtype=f64)
rays = length[:, None] * torch.stack([angle.cos(), angle.sin()], -1)  # (m, 2)


def agreement(c, truth):
    """Fraction of points on which two 2-cluster labelings agree, up to swapping the labels."""
    same = (c == truth).double().mean().item()
    return max(same, 1 - same)


labels = {}
for metric in ("euclidean", "cosine"):
    pyro.clear_param_store()
    em = ppl_em.EM(kmeans.model, posterior="hard")
    for _ in range(20):
        em.step(rays, 2, metric=metric)
    labels[metric] = em.e_step(rays, 2, metric=metric).marginal("z").argmax(-1)
    print(f"{metric:9s}: agreement with the rays {agreement(labels[metric], ray):.2f}")
assert agreement(labels["cosine"], ray) > 0.95
assert agreement(labels["euclidean"], ray) < 0.8

fig, axes = plt.subplots(1, 2, figsize=(10, 4.5), sharex=True, sharey=True)
for ax, metric in zip(axes, ("euclidean", "cosine")):
    ax.scatter(rays[:, 0], rays[:, 1], c=labels[metric], cmap="coolwarm", s=10)
    ax.set_title(f"{metric}: agreement with the rays {agreement(labels[metric], ray):.2f}")
    ax.set_aspect("equal")
    ax.set_xlabel("x_1")
axes[0].set_ylabel("x_2")
teaching.savefig(fig, OUT / "01_euclidean_vs_cosine.png")

# %% [markdown]
# **Summary.** k-means alternates two exact minimisations of J(c, mu), so J never rises and
# the algorithm converges, but only to a local minimum that depends on the start (use
# several starts, k-means++). Each point gets exactly one cluster: a *hard* assignment. The
# Gaussian mixture and EM (tutorials 2 and 3) make that assignment soft.
