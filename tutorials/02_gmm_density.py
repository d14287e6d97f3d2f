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
# # 2. Density estimation and the Gaussian mixture model
#
# k-means gives every point a cluster. Density estimation asks for more: the points
# S = {x^(1), ..., x^(n)}, x^(i) in R^d, live in a continuous space and were drawn from some
# distribution P_data(x) with a *density* (a PDF, not a PMF). We want a model P_model(x)
# that is close to it. One Gaussian is often too simple (the Old Faithful data below has
# two bumps); a **mixture of Gaussians** is flexible and still easy to write down.
#
# The generative story of the Gaussian mixture model (GMM), with k components:
#
#     z^(i) ~ Multinomial(phi)              phi_j = p(z^(i) = j),  phi_j >= 0,  sum_j phi_j = 1
#     x^(i) | z^(i) = j ~ N(mu_j, Sigma_j)
#
# z^(i) is a **latent variable**: a fancy name for a random variable that is never observed.
#
# This tutorial: run the model forward to sample from it; fit it when z *is* observed (GDA,
# one closed-form step); see why a latent z turns the likelihood into
# log p(x) = log sum_z p(x, z); and use the mixture as a density estimate.

# %%
import os
import sys
from pathlib import Path

import matplotlib

if "ipykernel" not in sys.modules:
    matplotlib.use("Agg")  # a script writes PNG files; a notebook shows the figures inline
import matplotlib.pyplot as plt
from matplotlib.patches import Ellipse
import torch
import pyro
import pyro.distributions as dist

import ppl_em
from ppl_em.datasets import load_old_faithful
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

# %% [markdown]
# ## Sampling: run the Pyro model forward
#
# `models/gmm.py` is a plain Pyro program. Conditioned on data (`obs=x`) it scores x; run
# under `pyro.poutine.uncondition` it *draws* z^(i) and then x^(i) | z^(i), exactly the
# generative story. (`gmm.generate` wraps these lines and leaves the param store alone.)

# %%
n = 600 if QUICK else 3000
k = 3
truth = {
    "phi": torch.tensor([0.5, 0.3, 0.2], dtype=f64),
    "mu": torch.tensor([[0.0, 0.0], [3.0, 3.0], [-3.0, 2.5]], dtype=f64),
    "Sigma": torch.tensor([[[1.0, 0.0], [0.0, 1.0]],
                           [[1.0, 0.8], [0.8, 1.0]],
                           [[0.5, 0.0], [0.0, 0.3]]], dtype=f64),
}
pyro.clear_param_store()
placeholder = torch.zeros(n, 2, dtype=f64)  # only fixes n and d: x is drawn, not observed
sampler = pyro.poutine.uncondition(gmm.model)
trace = pyro.poutine.trace(sampler).get_trace(placeholder, k, init=truth)
x, z = trace.nodes["x"]["value"].detach(), trace.nodes["z"]["value"].detach()  # (n, 2), (n,)
print("sampled sites:", {name: tuple(trace.nodes[name]["value"].shape) for name in ("z", "x")})
print("first labels z:", z[:10].tolist())

# %% [markdown]
# The sample should look like the story: the fraction of points with z^(i) = j is close to
# phi_j, and the points of component j have mean close to mu_j (within a few standard errors).

# %%
counts = torch.bincount(z, minlength=k).to(f64)  # (k,)
freq = counts / n
std_err = (truth["phi"] * (1 - truth["phi"]) / n).sqrt()
print("empirical phi:", freq.tolist(), " true phi:", truth["phi"].tolist())
assert ((freq - truth["phi"]).abs() < 4 * std_err).all()
for j in range(k):
    xj = x[z == j]
    mean_err = (truth["Sigma"][j].diagonal() / len(xj)).sqrt()
    assert ((xj.mean(0) - truth["mu"][j]).abs() < 4 * mean_err).all()

colors = ["tab:blue", "tab:orange", "tab:green"]
fig, ax = plt.subplots(figsize=(5, 4.5))
ax.scatter(x[:, 0], x[:, 1], c=[colors[j] for j in z], s=6, alpha=0.6)
for j in range(k):
    draw_ellipse(ax, truth["mu"][j], truth["Sigma"][j], colors[j])
ax.set_title("samples from the GMM, coloured by z; 2-sigma ellipses of N(mu_j, Sigma_j)")
savefig(fig, "02_samples.png")

# %% [markdown]
# ## GDA: when z is observed, maximum likelihood is one closed-form step
#
# If we had seen the labels z^(i) (supervised learning: Gaussian discriminant analysis), the
# log-likelihood would be a sum of simple terms,
#
#     l(phi, mu, Sigma) = sum_i log p(x^(i), z^(i))
#                       = sum_i [ log phi_{z^(i)} + log N(x^(i); mu_{z^(i)}, Sigma_{z^(i)}) ],
#
# and each parameter has its own closed-form maximiser: phi_j is the fraction of points in
# class j, mu_j and Sigma_j the mean and covariance (divided by n_j) of class j.

# %%
one_hot = torch.nn.functional.one_hot(z, k).to(f64)  # (n, k): 1{z^(i) = j}
phi_gda = one_hot.mean(0)  # (k,)
mu_gda = (one_hot.T @ x) / one_hot.sum(0)[:, None]  # (k, d)
Sigma_gda = torch.stack([torch.cov(x[z == j].T, correction=0) for j in range(k)])  # (k, d, d)

# %% [markdown]
# The same model file fits GDA when `labels` are passed: z is then an observed site, the
# E-step has nothing to infer, and one M-step (`reg_covar=0` for the exact MLE) lands on the
# formulas above. A second step changes nothing: the first one already reached the maximum.

# %%
pyro.clear_param_store()
em = ppl_em.EM(gmm.model, reg_covar=0.0)
em.step(x, k, labels=z)
fitted = em.params
assert torch.allclose(fitted["phi"], phi_gda)
assert torch.allclose(fitted["mu"], mu_gda)
assert torch.allclose(fitted["Sigma"], Sigma_gda)
em.step(x, k, labels=z)
assert all(torch.allclose(em.params[name], fitted[name]) for name in fitted)
print("GDA fit by the engine == the closed-form formulas; phi =", fitted["phi"].tolist())

# %% [markdown]
# ## Hiding z: log p(x) = log sum_z p(x, z)
#
# In density estimation nobody tells us z. The only thing we can score is the data, so we
# write out the joint and marginalise the latent variable:
#
#     l(phi, mu, Sigma) = sum_i log p(x^(i)) = sum_i log sum_{j=1}^k phi_j N(x^(i); mu_j, Sigma_j).
#
# The log of a sum no longer splits into one term per parameter, which is why there is no
# closed form and why we need EM (next tutorial). First, the sum itself. With the true
# parameters in the param store, the engine's E-step computes log p(x) by enumerating z:

# %%
def log_joint_table(x, phi, mu, Sigma):
    """log p(x^(i), z^(i) = j) = log phi_j + log N(x^(i); mu_j, Sigma_j), shape (n, k)."""
    components = dist.MultivariateNormal(mu, covariance_matrix=Sigma)  # batch (k,)
    return phi.log() + components.log_prob(x[:, None, :])  # (n, k)


table = log_joint_table(x, truth["phi"], truth["mu"], truth["Sigma"])
log_px = table.logsumexp(-1)  # (n,): log p(x^(i))

pyro.clear_param_store()
post = ppl_em.EM(gmm.model).e_step(x, k, init=truth)
print("log p(x) by hand:", log_px.sum().item(), " by the engine:", post.log_evidence.item())
assert torch.allclose(post.log_evidence, log_px.sum())

# %% [markdown]
# For a few points we can check the formula against the literal definition: sum the joint
# over **every** joint configuration (z^(1), ..., z^(m)) -- k^m = 27 of them for m = 3 --
# and see that it factorises into the per-point sums above.

# %%
m = 3
configurations = torch.cartesian_prod(*[torch.arange(k)] * m)  # (k^m, m)
per_config = table[torch.arange(m), configurations].sum(-1)  # (k^m,): log p(x, z) of each z
print(f"{len(configurations)} configurations")
assert torch.allclose(per_config.logsumexp(0), log_px[:m].sum())

# %% [markdown]
# Observing z picks **one** term of each sum; marginalising keeps all k of them. So
# log p(x^(i)) >= log p(x^(i), z^(i)) for every point, and the ratio of the two is the
# posterior p(z^(i) | x^(i)) = p(x^(i), z^(i)) / p(x^(i)) that the E-step will compute.

# %%
observed_term = table[torch.arange(n), z]  # (n,): log p(x^(i), z^(i))
assert (log_px >= observed_term).all()
posterior = (table - log_px[:, None]).exp()  # (n, k): p(z^(i) = j | x^(i))
assert torch.allclose(posterior.sum(-1), torch.ones(n, dtype=f64))
assert torch.allclose(posterior, post.marginal("z"))
print("mean posterior probability of the true component:", posterior[torch.arange(n), z].mean().item())

# %% [markdown]
# ## The mixture as a density estimate: Old Faithful
#
# The eruptions of the Old Faithful geyser (duration, waiting time to the next one, both in
# minutes) form two clouds. We fit one Gaussian (closed form: the mean and covariance) and a
# 2-component GMM (by EM, treated as a black box until the next tutorial), then compare the
# average log-likelihood per point. Both are densities: they integrate to 1.

# %%
faithful = load_old_faithful()  # (272, 2)
single = dist.MultivariateNormal(faithful.mean(0), covariance_matrix=torch.cov(faithful.T, correction=0))
ll_single = single.log_prob(faithful).mean().item()

pyro.clear_param_store()
em = ppl_em.EM(gmm.model)
for _ in range(10 if QUICK else 50):
    em.step(faithful, 2)
fit = em.params
ll_gmm = log_joint_table(faithful, fit["phi"], fit["mu"], fit["Sigma"]).logsumexp(-1).mean().item()
print(f"mean log-likelihood: one Gaussian {ll_single:.3f}, GMM with k=2 {ll_gmm:.3f}")
assert ll_gmm > ll_single

# %%
g0 = torch.linspace(0.0, 7.0, 120 if QUICK else 300, dtype=f64)
g1 = torch.linspace(20.0, 120.0, 120 if QUICK else 300, dtype=f64)
grid = torch.cartesian_prod(g0, g1)  # (G, 2)
density_gmm = log_joint_table(grid, fit["phi"], fit["mu"], fit["Sigma"]).logsumexp(-1).exp()
density_single = single.log_prob(grid).exp()
cell = (g0[1] - g0[0]) * (g1[1] - g1[0])
for density in (density_gmm, density_single):
    assert abs((density.sum() * cell).item() - 1.0) < 0.02  # a density: it integrates to 1

fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
panels = [("one Gaussian", density_single, ll_single), ("GMM, k = 2", density_gmm, ll_gmm)]
for ax, (title, density, ll) in zip(axes, panels):
    ax.contourf(g0, g1, density.reshape(len(g0), len(g1)).T, levels=15, cmap="Blues")
    ax.scatter(faithful[:, 0], faithful[:, 1], s=5, color="k")
    ax.set_title(f"{title}: mean log p(x) = {ll:.2f}")
    ax.set_xlabel("eruption (min)")
axes[0].set_ylabel("waiting (min)")
savefig(fig, "02_old_faithful_density.png")

# %% [markdown]
# **Summary.** The GMM is a generative story with a latent z. With z observed, its maximum
# likelihood fit is one closed-form step (GDA). With z hidden, the likelihood is
# log sum_z p(x, z): no closed form, but the posterior p(z | x) = p(x, z) / p(x) is easy to
# compute, and that is the E-step of EM.
