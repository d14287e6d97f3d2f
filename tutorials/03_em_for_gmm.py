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
# # 3. EM for the Gaussian mixture
#
# With z^(i) unobserved, the log-likelihood l(phi, mu, Sigma) = sum_i log sum_j
# p(x^(i), z^(i) = j) has no closed-form maximiser. EM, inspired by k-means, alternates two
# easy steps. Randomly initialise phi, mu, Sigma, then repeat until convergence:
#
# * **E-step.** For each i, j: w_j^(i) := p(z^(i) = j | x^(i); phi, mu, Sigma). Given a point,
#   we assign a probability that it belongs to each component (Bayes' rule; a softmax).
# * **M-step.** Update the parameters as in GDA, with the soft counts w_j^(i) in place of
#   the indicators 1{z^(i) = j}:
#
#       phi_j   = (1/n) sum_i w_j^(i)
#       mu_j    = sum_i w_j^(i) x^(i) / sum_i w_j^(i)
#       Sigma_j = sum_i w_j^(i) (x^(i) - mu_j)(x^(i) - mu_j)^T / sum_i w_j^(i)
#
# We compute both steps by hand in torch and check them against ppl_em's engine, which runs
# the same `models/gmm.py` file; then watch EM converge, and compare soft with hard
# assignment ("soft k-means" versus k-means).

# %%
import os
import sys
from pathlib import Path

import matplotlib

if "ipykernel" not in sys.modules:
    matplotlib.use("Agg")  # a script writes PNG files; a notebook shows the figures inline
import matplotlib.pyplot as plt
from matplotlib.colors import to_rgb
from matplotlib.patches import Ellipse
import torch
import pyro
import pyro.distributions as dist

import ppl_em
from ppl_em.models import gmm

QUICK = os.environ.get("PPL_EM_QUICK") == "1"  # tiny sizes, for the test suite
HERE = Path(__file__).parent if "__file__" in globals() else Path.cwd()  # a notebook runs in its folder
OUT = Path(os.environ.get("PPL_EM_TUTORIAL_OUT", HERE / "_out"))
OUT.mkdir(parents=True, exist_ok=True)


def savefig(fig, name):
    """Write ``fig`` to OUT/name; in a notebook keep it open so that it is displayed."""
    fig.savefig(OUT / name, dpi=100, bbox_inches="tight")
    if "ipykernel" not in sys.modules:
        plt.close(fig)


def draw_ellipse(ax, mean, cov, color, nsig=2.0):
    """The nsig-standard-deviation contour of N(mean, cov) in 2-D."""
    evals, evecs = torch.linalg.eigh(cov)
    angle = torch.rad2deg(torch.atan2(evecs[1, -1], evecs[0, -1])).item()
    w, h = (2 * nsig * evals.flip(0).sqrt()).tolist()
    ax.add_patch(Ellipse(mean.tolist(), w, h, angle=angle, fill=False, color=color, lw=2))


pyro.set_rng_seed(0)
f64 = torch.float64
COLORS = ["tab:blue", "tab:orange", "tab:green"]
PALETTE = torch.tensor([to_rgb(c) for c in COLORS], dtype=f64)  # (k, 3)

# %% [markdown]
# ## Data and a deliberately poor start
#
# Three overlapping Gaussian clouds in the plane (drawn by running the model forward), and
# three starting means bunched together in one corner so that we can watch EM pull them apart.

# %%
k = 3
n = 150 if QUICK else 450
truth = {
    "phi": torch.tensor([0.4, 0.35, 0.25], dtype=f64),
    "mu": torch.tensor([[0.0, 0.0], [3.0, 0.5], [1.0, 3.0]], dtype=f64),
    "Sigma": torch.tensor([[[1.0, 0.3], [0.3, 0.8]],
                           [[0.7, -0.2], [-0.2, 1.0]],
                           [[0.9, 0.0], [0.0, 0.6]]], dtype=f64),
}
x, z_true = gmm.generate(n, **truth, seed=1)  # (n, 2), (n,)
start = {
    "phi": torch.full((k,), 1.0 / k, dtype=f64),
    "mu": torch.tensor([[-1.0, -1.0], [-0.5, -1.2], [-1.2, -0.4]], dtype=f64),
    "Sigma": torch.cov(x.T).expand(k, 2, 2).clone(),
}

# %% [markdown]
# ## The E-step by hand
#
# Bayes' rule with p(z = j) = phi_j and p(x | z = j) = N(x; mu_j, Sigma_j):
#
#     w_j^(i) = phi_j N(x^(i); mu_j, Sigma_j) / sum_l phi_l N(x^(i); mu_l, Sigma_l),
#
# a softmax over j of log phi_j + log N(x^(i); mu_j, Sigma_j).

# %%
def e_step_by_hand(x, phi, mu, Sigma):
    """Responsibilities w_j^(i), shape (n, k)."""
    log_joint = phi.log() + dist.MultivariateNormal(mu, covariance_matrix=Sigma).log_prob(x[:, None, :])
    return log_joint.softmax(-1)


def m_step_by_hand(x, w):
    """The lecture's closed forms: phi (k,), mu (k, d), Sigma (k, d, d)."""
    nj = w.sum(0)  # (k,): soft counts
    phi = nj / len(x)
    mu = (w.T @ x) / nj[:, None]
    centred = x[None, :, :] - mu[:, None, :]  # (k, n, d)
    Sigma = torch.einsum("nk,kni,knj->kij", w, centred, centred) / nj[:, None, None]
    return phi, mu, Sigma


pyro.clear_param_store()
em = ppl_em.EM(gmm.model, reg_covar=0.0)  # reg_covar=0: the exact formulas, nothing added
post = em.e_step(x, k, init=start)
w = post.marginal("z")  # (n, k)
assert torch.allclose(w, e_step_by_hand(x, **start))
assert torch.allclose(w.sum(-1), torch.ones(n, dtype=f64))
print("E-step: engine == Bayes' rule by hand;", "w^(0) =", [round(v, 3) for v in w[0].tolist()])

# %% [markdown]
# ## The M-step by hand
#
# Feed the same responsibilities to the formulas and to the engine's M-step. The engine was
# never told these formulas: it recognises that `phi`, `mu[z]` and `Sigma[z]` are selected by
# the latent z inside Categorical and MultivariateNormal sites, and applies the weighted
# maximum-likelihood update for those families (`em.explain()` says which).

# %%
phi_new, mu_new, Sigma_new = m_step_by_hand(x, w)
em.m_step(post, x, k, init=start)
assert torch.allclose(em.params["phi"], phi_new)
assert torch.allclose(em.params["mu"], mu_new)
assert torch.allclose(em.params["Sigma"], Sigma_new)
for name, how in em.explain().items():
    print(f"{name:6s} <- {how}")

# %% [markdown]
# ## Running EM: log p(x) never decreases
#
# `em.step` is one E-step plus one M-step and returns -log p(x; theta) before the update
# (the contract of `pyro.infer.SVI.step`). We keep the parameters of every iteration to draw
# them as frames, and check the EM guarantee: the log-likelihood never goes down.

# %%
n_iter = 15 if QUICK else 40
pyro.clear_param_store()
em = ppl_em.EM(gmm.model)
frames, log_lik = [], []
for t in range(n_iter):
    post = em.e_step(x, k, init=start)
    frames.append({"w": post.marginal("z"), **em.params})  # Q and theta of iteration t
    log_lik.append(post.log_evidence.item())
    em.m_step(post, x, k, init=start)
increments = torch.diff(torch.tensor(log_lik))
assert (increments >= -1e-8).all(), "EM decreased log p(x)"
print(f"log p(x): {log_lik[0]:.2f} at the start -> {log_lik[-1]:.2f} after {n_iter - 1} iterations")

# %%
def draw_frame(ax, frame, title):
    """Points coloured by their responsibilities (a mix of the component colours)."""
    ax.scatter(x[:, 0], x[:, 1], c=(frame["w"] @ PALETTE).clamp(0, 1).numpy(), s=8)
    for j in range(k):
        draw_ellipse(ax, frame["mu"][j], frame["Sigma"][j], COLORS[j])
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


shown = sorted({0, 1, 2, 3, 5, 8, n_iter // 2, n_iter - 1})
fig, axes = plt.subplots(2, 4, figsize=(13, 6.5), sharex=True, sharey=True)
for ax, t in zip(axes.flat, shown):
    draw_frame(ax, frames[t], f"iteration {t}: log p(x) = {log_lik[t]:.1f}")
for ax in axes.flat[len(shown):]:
    ax.axis("off")
fig.suptitle("EM for the GMM: E-step colours each point by w^(i), M-step moves the ellipses")
savefig(fig, "03_em_frames.png")

fig, ax = plt.subplots(figsize=(5, 3.5))
ax.plot(log_lik, marker="o", ms=3)
ax.set_xlabel("iteration")
ax.set_ylabel("log p(x; theta)")
ax.set_title("EM never decreases the log-likelihood")
savefig(fig, "03_log_likelihood.png")

# %% [markdown]
# ## A soft assignment
#
# At the fitted parameters most points belong clearly to one component, but points in the
# overlaps are shared: their w^(i) is a genuine probability vector such as [0.1, 0.7, 0.2].

# %%
w = frames[-1]["w"]
target = torch.tensor([0.1, 0.7, 0.2], dtype=f64)
closest = (w.sort(-1).values - target.sort().values).abs().sum(-1).argmin()  # up to relabelling
print(f"x^({closest.item()}) = {x[closest].tolist()}:  w = {[round(v, 2) for v in w[closest].tolist()]}")
assert w[closest].max() < 0.9 and (w[closest] > 0.05).sum() >= 2  # shared by at least two components
print(f"{((w.max(-1).values < 0.9).double().mean() * 100):.0f}% of the points have no component above 0.9")

# %% [markdown]
# ## Soft versus hard assignment
#
# k-means gives each point **one** cluster: a hard assignment. The same engine runs hard
# ("classification") EM with `posterior="hard"`: Q(z) is one-hot at the most probable
# component, c^(i) = argmax_j w_j^(i), and the M-step then averages over the points assigned
# to each component, exactly the k-means re-estimate of mu_j. (k-means itself is the special
# case with equal phi_j and a shared, fixed Sigma_j = sigma^2 I: tutorial 1.)

# %%
pyro.clear_param_store()
hard = ppl_em.EM(gmm.model, posterior="hard")
hard_losses = [hard.step(x, k, init=start) for _ in range(n_iter)]
# Hard EM climbs max_z log p(x, z; theta), the objective its one-hot Q makes tight.
assert (torch.diff(torch.tensor(hard_losses)) <= 1e-8).all()

post_hard = hard.e_step(x, k, init=start)
q = post_hard.marginal("z")  # (n, k), one-hot
c = q.argmax(-1)  # (n,): the hard assignments c^(i)
assert torch.equal(q, torch.nn.functional.one_hot(c, k).to(f64))
# The mode of a posterior that factorises over points is the per-point argmax of w^(i).
w_same_params = e_step_by_hand(x, **hard.params)
assert torch.equal(c, w_same_params.argmax(-1))
hard_frame = {"w": q, **hard.params}
hard.m_step(post_hard, x, k, init=start)
for j in range(k):
    assert torch.allclose(hard.params["mu"][j], x[c == j].mean(0))
print("hard EM: Q one-hot at argmax_j w_j^(i); mu_j = mean of the points assigned to j")

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 4.5), sharex=True, sharey=True)
draw_frame(axes[0], frames[-1], f"soft (EM): log p(x) = {log_lik[-1]:.1f}")
draw_frame(axes[1], hard_frame, f"hard (classification EM): log p(x) = {post_hard.log_evidence.item():.1f}")
savefig(fig, "03_soft_vs_hard.png")

# %% [markdown]
# **Summary.** The E-step is Bayes' rule, the M-step is GDA with soft counts, and each EM
# iteration raises log p(x). Why it cannot go down is the subject of the next tutorial:
# EM is coordinate ascent on a lower bound of log p(x), the ELBO.
