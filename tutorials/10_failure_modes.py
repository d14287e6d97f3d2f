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
# # 10. How EM for mixtures fails
#
# EM never decreases log p(x; theta) (tutorial 4), but that guarantee says nothing about
# *where* it ends. Four failures every user of mixtures meets, each shown and checked:
#
# 1. **Singular collapse.** The GMM's likelihood is unbounded: a component sitting on one
#    data point with Sigma_j -> 0 sends log p(x) to infinity. Without a floor on Sigma_j
#    (`reg_covar = 0`) EM can run into it.
# 2. **Hard EM's collapse.** Classification EM starves a component of points (tutorial 3).
# 3. **Local optima.** Different starts end at different stationary points, as for k-means.
# 4. **Label switching.** The likelihood does not change when the components are renumbered,
#    so every optimum comes k! times and "component 1" means nothing across fits.
#
# (Read after tutorial 4; Bishop, PRML section 9.2.1, discusses the first and the last.)

# %%
import math

import matplotlib.pyplot as plt
import torch
import pyro

import ppl_em
from ppl_em import teaching
from ppl_em.datasets import load_old_faithful
from ppl_em.models import gmm, kmeans

QUICK, OUT = teaching.setup(globals().get("__file__"))  # no __file__ in a notebook
f64 = torch.float64
COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]

# %% [markdown]
# ## 1. Singular collapse: log p(x) -> infinity
#
# Take the standardised Old Faithful data with one outlying eruption x^(o) added, and a
# 3-component GMM: two components fitted to the two clouds, and a third placed on x^(o) with
# Sigma_3 = s^2 I. As s -> 0 the third component's density at x^(o) grows like
# 1 / (2 pi s^2), while every other point keeps the density the first two give it. So
# log p(x) grows like -d log s = -2 log s without bound: maximum likelihood, taken literally,
# prefers a spike on a single point to any sensible fit.

# %%
faithful = load_old_faithful()
faithful = (faithful - faithful.mean(0)) / faithful.std(0)  # (272, 2)
outlier = torch.tensor([[3.0, -2.5]], dtype=f64)
x = torch.cat([faithful, outlier])  # (273, 2)
n, d, k = len(x), 2, 3

two = ppl_em.fit(gmm.model, faithful, 2, progress=False)  # the two clouds
phi3 = 1.0 / n


def spike(s):
    """theta with the two fitted clouds and a third component N(x^(o), s^2 I) of weight 1/n."""
    return {"phi": torch.cat([(1 - phi3) * two.params["phi"], torch.tensor([phi3], dtype=f64)]),
            "mu": torch.cat([two.params["mu"], outlier]),
            "Sigma": torch.cat([two.params["Sigma"], s ** 2 * torch.eye(d, dtype=f64)[None]])}


scales = torch.logspace(0, -8, 33, dtype=f64)
log_px = torch.stack([teaching.log_joint_table(x, **spike(s)).logsumexp(-1).sum() for s in scales])
assert (torch.diff(log_px[4:]) > 0).all()  # rising as s shrinks ...
slope = ((log_px[-1] - log_px[-2]) / (scales[-1].log() - scales[-2].log())).item()
assert abs(slope + d) < 1e-6  # ... like -d log s: without bound
print(f"log p(x) at s = 1e-8: {log_px[-1]:.1f}; d log p / d log s -> {slope:.4f}")

# %% [markdown]
# **EM at `reg_covar = 0`.** Start EM with the third component on the outlier and
# Sigma_3 = 0.5 I. Its responsibility for x^(o) is nearly 1 and for every other point nearly
# 0, so the M-step's Sigma_3 = sum_i w_3^(i) (x^(i) - mu_3)(x^(i) - mu_3)^T / sum_i w_3^(i)
# collapses onto the one point; within a couple of iterations the covariance is singular to
# working precision and EM stops with an error. With `reg_covar = r > 0` (ppl_em's default
# is 1e-6, scikit-learn's too) every M-step adds r I, the collapse stops at Sigma_3 = r I, and
# log p(x) stays bounded (exercise 10.1), although the spike survives as a spurious optimum
# of high likelihood.

# %%
start = {"phi": torch.tensor([0.45, 0.45, 0.1], dtype=f64),
         "mu": torch.cat([two.params["mu"], outlier]),
         "Sigma": torch.stack([0.1 * torch.eye(d, dtype=f64)] * 2 + [0.5 * torch.eye(d, dtype=f64)])}
runs = {}
for reg in (0.0, 1e-6, 1e-2):
    pyro.clear_param_store()
    em = ppl_em.EM(gmm.model, reg_covar=reg)
    curve, failure = [], None
    try:
        for _ in range(30 if QUICK else 60):
            curve.append(-em.step(x, k, init=start))
    except (torch.linalg.LinAlgError, ppl_em.NonFiniteParameterError, ValueError) as error:
        failure = f"{type(error).__name__.lstrip('_')} after {len(curve)} iterations"
    runs[reg] = {"curve": curve, "failure": failure, "params": em.params}
    print(f"reg_covar = {reg:g}: " + (failure or f"log p(x) = {curve[-1]:.2f}, "
                                      f"det Sigma_3 = {em.params['Sigma'][2].det():.2e}"))
assert runs[0.0]["failure"] is not None and len(runs[0.0]["curve"]) <= 3  # the collapse breaks EM at once
for reg in (1e-6, 1e-2):
    Sigma3 = runs[reg]["params"]["Sigma"][2]
    assert runs[reg]["failure"] is None
    assert torch.allclose(Sigma3, reg * torch.eye(d, dtype=f64), rtol=1e-3, atol=1e-12)  # stopped at r I
    assert abs(runs[reg]["params"]["phi"][2].item() - 1 / n) < 1e-4  # a component of one point

# %% [markdown]
# ### Exercise 10.1: what `reg_covar` guarantees
#
# If every Sigma_j satisfies Sigma_j >= r I (all eigenvalues at least r), show that
# N(x; mu_j, Sigma_j) <= (2 pi r)^{-d/2} for every x, hence p(x^(i)) <= (2 pi r)^{-d/2} and
# log p(x) <= -(n d / 2) log(2 pi r). Write `log_likelihood_bound(n, d, r)`.

# %% tags=["exercise"]
def log_likelihood_bound(n, d, r):
    """An upper bound on log p(x; theta) for n points in R^d when every Sigma_j >= r I."""
    raise NotImplementedError("Exercise 10.1")


# %% [markdown] tags=["solution", "hide-cell"] jupyter={"source_hidden": true}
# **Solution.** N(x; mu, Sigma) = (2 pi)^{-d/2} det(Sigma)^{-1/2} exp(-(1/2) (x - mu)^T Sigma^{-1} (x - mu)).
# The exponential is at most 1, and det(Sigma) is the product of the eigenvalues, each >= r,
# so det(Sigma) >= r^d and N <= (2 pi r)^{-d/2}. A mixture is an average of such densities,
# p(x^(i)) = sum_j phi_j N_j <= max_j N_j <= (2 pi r)^{-d/2}, and summing the logs over the n
# points gives log p(x) <= -(n d / 2) log(2 pi r). With r = 0 there is no bound: that is the
# collapse. (The bound is loose: a useful fit sits far below it.)

# %% tags=["solution", "hide-cell"] jupyter={"source_hidden": true}
def log_likelihood_bound(n, d, r):
    return -0.5 * n * d * math.log(2 * math.pi * r)


# %%
def check_bound():
    for reg in (1e-6, 1e-2):
        assert runs[reg]["curve"][-1] <= log_likelihood_bound(n, d, reg)
        spiked = teaching.log_joint_table(x, **spike(math.sqrt(reg))).logsumexp(-1).sum()
        assert spiked <= log_likelihood_bound(n, d, reg)
    # The bound is attained by one point at the centre of a component with Sigma = r I.
    for r in (1e-6, 1e-2, 1.0):
        one = teaching.log_joint_table(torch.zeros(1, d, dtype=f64), torch.ones(1, dtype=f64),
                                       torch.zeros(1, d, dtype=f64), r * torch.eye(d, dtype=f64)[None])
        assert math.isclose(one.item(), log_likelihood_bound(1, d, r), rel_tol=1e-12)


teaching.check_exercise("10.1", check_bound)

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
axes[0].plot(scales, log_px, "o-", ms=3, label="log p(x; theta_s), a spike N(x^(o), s^2 I) on the outlier")
for reg, style in ((1e-6, "--"), (1e-2, ":")):
    axes[0].axhline(runs[reg]["curve"][-1], color="gray", ls=style, label=f"EM's end with reg_covar = {reg:g}")
axes[0].set_xscale("log")
axes[0].invert_xaxis()
axes[0].set_xlabel("s (the spike's standard deviation; shrinking to the right)")
axes[0].set_ylabel("log p(x; theta)")
axes[0].set_title("the likelihood is unbounded as Sigma_3 -> 0")
axes[0].legend(fontsize=8)
fitted = runs[1e-2]["params"]
w = teaching.log_joint_table(x, **fitted).softmax(-1)
axes[1].scatter(x[:, 0], x[:, 1], c=teaching.mix_colors(w, COLORS[:3]), s=8)
for j in range(k):
    teaching.draw_ellipse(axes[1], fitted["mu"][j], fitted["Sigma"][j], COLORS[j])
axes[1].annotate("component 3: one point,\nSigma_3 = reg_covar I", outlier[0].tolist(), xytext=(1.2, -2.2),
                 arrowprops={"arrowstyle": "->"}, fontsize=9)
axes[1].set_xlabel("eruption (standardised)")
axes[1].set_ylabel("waiting (standardised)")
axes[1].set_title(f"EM with reg_covar = 0.01 keeps the spike (EM at 0: {runs[0.0]['failure']})", fontsize=9)
teaching.mixing_legend(axes[1], COLORS[:3], loc="upper left")
teaching.savefig(fig, OUT / "10_singular_collapse.png")

# %% [markdown]
# ## 2. Hard EM's collapse
#
# Tutorial 3's data and start: soft EM keeps three components; hard EM's smallest phi_j falls
# to a few per cent, because a component that wins few points outright is refitted to those
# alone, shrinks, and wins fewer. We follow phi_j over the iterations of both.

# %%
truth = {"phi": torch.tensor([0.4, 0.35, 0.25], dtype=f64),
         "mu": torch.tensor([[0.0, 0.0], [3.0, 0.5], [1.0, 3.0]], dtype=f64),
         "Sigma": torch.tensor([[[1.0, 0.3], [0.3, 0.8]], [[0.7, -0.2], [-0.2, 1.0]],
                                [[0.9, 0.0], [0.0, 0.6]]], dtype=f64)}
x3, _ = gmm.generate(150 if QUICK else 450, **truth, seed=1)
start3 = {"phi": torch.full((3,), 1 / 3, dtype=f64),
          "mu": torch.tensor([[-1.0, -1.0], [-0.5, -1.2], [-1.2, -0.4]], dtype=f64),
          "Sigma": torch.cov(x3.T).expand(3, 2, 2).clone()}
phis = {}
for posterior in ("exact", "hard"):
    pyro.clear_param_store()
    em = ppl_em.EM(gmm.model, posterior=posterior)
    trajectory = [start3["phi"]]
    for _ in range(60):
        em.step(x3, 3, init=start3)
        trajectory.append(em.params["phi"])
    phis[posterior] = torch.stack(trajectory)  # (iterations, k)
print("smallest phi_j at the end: soft", round(phis["exact"][-1].min().item(), 3),
      "hard", round(phis["hard"][-1].min().item(), 3))
assert phis["hard"][-1].min() < 0.05 < 0.2 < phis["exact"][-1].min()

fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
for ax, (posterior, title) in zip(axes, (("exact", "soft EM"), ("hard", "hard (classification) EM"))):
    for j in range(3):
        ax.plot(phis[posterior][:, j], color=COLORS[j], label=f"phi_{j + 1}")
    ax.set_title(title)
    ax.set_xlabel("iteration (0: the start)")
axes[0].set_ylabel("phi_j")
axes[1].legend()
fig.suptitle("hard EM starves a component; soft EM's fractional counts keep it alive", y=1.02)
teaching.savefig(fig, OUT / "10_hard_em_collapse.png")

# %% [markdown]
# ## 3. Local optima over many starts
#
# Six blobs (tutorial 1's data) and a 6-component GMM, fitted by EM from many random starts
# (`init="random"`: phi uniform, mu at random data points). Each run converges, to one of
# several different stationary points. `ppl_em.fit(..., n_init=N)` runs N starts and keeps the
# one with the highest log p(x): the same as taking the best of these by hand.

# %%
centres = torch.tensor([[0.0, 0.0], [4.0, 0.0], [8.0, 1.0], [0.5, 4.5], [4.5, 5.0], [9.0, 5.5]], dtype=f64)
x6, _ = kmeans.generate(180, centres, seed=0, scale=0.8)
starts = 8 if QUICK else 30
best_fit = ppl_em.fit(gmm.model, x6, 6, init="random", n_init=starts, max_iter=400, progress=False)
assert all(r["converged"] for r in best_fit.restarts)
finals = torch.tensor([r["log_likelihood"] for r in best_fit.restarts], dtype=f64)  # (1/n) log p(x) per start
optima = torch.unique(finals.round(decimals=3))
print(f"{starts} starts reached {len(optima)} different optima of (1/n) log p(x): {optima.tolist()}")
assert len(optima) >= 3
assert best_fit.log_likelihood == finals.max().item()  # n_init keeps the best start


def refit(r):
    """Start r of the n_init run again on its own: restart r uses seed r."""
    return ppl_em.fit(gmm.model, x6, 6, init="random", seed=r, max_iter=400, progress=False)


order = finals.argsort()
fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [1.2, 1, 1]})
axes[0].plot(range(1, starts + 1), finals[order], "o")
axes[0].set_xlabel("start, sorted by its final log-likelihood")
axes[0].set_ylabel("(1/n) log p(x; theta) at convergence")
axes[0].set_title(f"{starts} random starts, {len(optima)} different optima")
worst = refit(order[0].item())
assert abs(worst.log_likelihood - finals.min().item()) < 1e-12
for ax, f, name in ((axes[1], worst, "worst"), (axes[2], best_fit, "best")):
    ax.scatter(x6[:, 0], x6[:, 1], c=teaching.mix_colors(f.predict_proba(), COLORS), s=8)
    for j in range(6):
        teaching.draw_ellipse(ax, f.params["mu"][j], f.params["Sigma"][j], COLORS[j], lw=1.5)
    ax.set_title(f"{name} start: (1/n) log p(x) = {f.log_likelihood:.3f}")
    ax.set_xlabel("x_1")
    ax.set_ylabel("x_2")
teaching.savefig(fig, OUT / "10_local_optima.png")

# %% [markdown]
# ## 4. Label switching
#
# Renumbering the components, (phi, mu, Sigma) -> (phi_pi, mu_pi, Sigma_pi) for a permutation
# pi, describes the same mixture, so log p(x; theta) is the same for all k! orderings. Two
# runs that reach the same optimum can therefore return it in different orders: compare fits
# only after matching their components (here by the smallest total distance between means,
# `teaching.best_permutation`), never by index.

# %%
theta = {name: best_fit.params[name] for name in ("phi", "mu", "Sigma")}
reference = teaching.log_joint_table(x6, **theta).logsumexp(-1).sum()
g = torch.Generator().manual_seed(0)
for _ in range(5):
    pi = torch.randperm(6, generator=g)
    permuted = {name: value[pi] for name, value in theta.items()}
    pyro.clear_param_store()
    engine_value = ppl_em.EM(gmm.model).e_step(x6, 6, init=permuted).log_evidence
    assert torch.allclose(engine_value, reference)  # the same likelihood in any order
print(f"log p(x) = {reference:.4f} for every ordering tried (of 6! = {math.factorial(6)})")

top = (finals - finals.max()).abs() < 1e-6  # the starts that found the best optimum
same = [best_fit] + [refit(r) for r in torch.nonzero(top)[:, 0].tolist() if r != best_fit.best]
pairs = [(a, b) for a in same for b in same if not torch.allclose(a.params["mu"], b.params["mu"], atol=1e-3)]
assert pairs, "every run returned the best optimum in the same order"
a, b = pairs[0]
perm = teaching.best_permutation(torch.cdist(a.params["mu"], b.params["mu"]))  # b's component perm[j] is a's j
assert perm != list(range(6))
for name in ("phi", "mu", "Sigma"):
    # The same mixture, renumbered (equal up to the fits' convergence tolerance, tol = 1e-6).
    assert torch.allclose(a.params[name], b.params[name][perm], atol=5e-3)
print("two runs at the same optimum, components in different orders; matched by", perm)

fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharex=True, sharey=True)
for ax, f, title in ((axes[0], a, "run A"), (axes[1], b, "run B: the same fit, renumbered")):
    labels = f.predict()
    ax.scatter(x6[:, 0], x6[:, 1], c=[COLORS[j] for j in labels], s=8)
    for j in range(6):
        ax.annotate(f"{j + 1}", f.params["mu"][j].tolist(), fontsize=12, weight="bold", ha="center",
                    color="white", bbox={"boxstyle": "circle", "fc": COLORS[j]})
    ax.set_title(f"{title}: log p(x) = {f.log_likelihood * len(x6):.2f}")
    ax.set_xlabel("x_1")
axes[0].set_ylabel("x_2")
fig.suptitle("label switching: component numbers (and colours) are arbitrary", y=1.02)
teaching.savefig(fig, OUT / "10_label_switching.png")

# %% [markdown]
# **Summary and remedies.** The GMM's likelihood is unbounded, so put a floor under Sigma_j
# (`reg_covar`, scaled to the data; or a prior on Sigma_j and MAP-EM) and treat a component
# with phi_j near 1/n as a spike, not a cluster. Prefer soft EM to hard EM when the clusters
# overlap. Run several starts (`n_init`) and keep the best. And never compare components across
# fits by their index: match them first.
