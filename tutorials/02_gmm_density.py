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
# This tutorial: run the model forward to sample from it; fit it when z *is* observed (GDA and
# QDA, one closed-form step each); see why a latent z turns the likelihood into
# log p(x) = log sum_z p(x, z); and use the mixture as a density estimate, compared with one
# Gaussian by held-out log-likelihood and BIC.

# %%
import matplotlib.pyplot as plt
import torch
import pyro
import pyro.distributions as dist

import ppl_em
from ppl_em import teaching
from ppl_em.datasets import load_old_faithful
from ppl_em.models import gmm

QUICK, OUT = teaching.setup(globals().get("__file__"))  # no __file__ in a notebook
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
    teaching.draw_ellipse(ax, truth["mu"][j], truth["Sigma"][j], colors[j], label=f"z = {j + 1}: N(mu_{j + 1}, Sigma_{j + 1})")
ax.set_xlabel("x_1")
ax.set_ylabel("x_2")
ax.legend(fontsize=8, loc="lower right")
ax.set_title("samples from the GMM, coloured by z;\n2-sigma ellipses of N(mu_j, Sigma_j)")
teaching.savefig(fig, OUT / "02_samples.png")

# %% [markdown]
# ## GDA: when z is observed, maximum likelihood is one closed-form step
#
# If we had seen the labels z^(i) (supervised learning), the log-likelihood would be a sum of
# simple terms. **Gaussian discriminant analysis** (GDA), as in the notes and in CS229, gives
# each class its own mean and one covariance **shared** by all classes:
#
#     z^(i) ~ Multinomial(phi),    x^(i) | z^(i) = j ~ N(mu_j, Sigma)
#     l(phi, mu, Sigma) = sum_i [ log phi_{z^(i)} + log N(x^(i); mu_{z^(i)}, Sigma) ]
#
# and each parameter has its own closed-form maximiser:
#
#     phi_j = (1/n) sum_i 1{z^(i) = j}                       (the fraction of class j)
#     mu_j  = sum_i 1{z^(i) = j} x^(i) / sum_i 1{z^(i) = j}   (the mean of class j)
#     Sigma = (1/n) sum_i (x^(i) - mu_{z^(i)}) (x^(i) - mu_{z^(i)})^T   (pooled over the classes)
#
# Giving every class its own Sigma_j is **quadratic discriminant analysis** (QDA); then Sigma_j
# is the covariance (divided by n_j) of class j alone. The GMM is QDA's model with z hidden.

# %% [markdown]
# ### Exercise 2.1: GDA by hand
#
# Write `gda_by_hand(x, z, k)` returning phi (k,), mu (k, d) and the pooled Sigma (d, d).
# The check compares it with the engine below.

# %% tags=["exercise"]
def gda_by_hand(x, z, k):
    """GDA's maximum-likelihood phi (k,), mu (k, d), shared Sigma (d, d) from labelled data."""
    raise NotImplementedError("Exercise 2.1")


# %% tags=["solution", "hide-cell"] jupyter={"source_hidden": true}
def gda_by_hand(x, z, k):
    one_hot = torch.nn.functional.one_hot(z, k).to(x.dtype)  # (n, k): 1{z^(i) = j}
    phi = one_hot.mean(0)  # (k,)
    mu = (one_hot.T @ x) / one_hot.sum(0)[:, None]  # (k, d)
    centred = x - mu[z]  # (n, d): each point minus its own class mean
    return phi, mu, centred.T @ centred / len(x)  # (d, d)


# %% [markdown]
# The same model file fits both when `labels` are passed: z is then an observed site, the
# E-step has nothing to infer, and one M-step (`reg_covar=0` for the exact MLE) lands on the
# formulas. `covariance_type="tied"` is GDA's shared Sigma, `"full"` QDA's Sigma_j. A second
# step changes nothing: the first one already reached the maximum.

# %%
fits = {}
for name, covariance_type in (("GDA", "tied"), ("QDA", "full")):
    pyro.clear_param_store()
    em = ppl_em.EM(gmm.model, reg_covar=0.0)
    em.step(x, k, labels=z, covariance_type=covariance_type)
    fits[name] = em.params
    em.step(x, k, labels=z, covariance_type=covariance_type)
    assert all(torch.allclose(em.params[p], fits[name][p]) for p in fits[name])
assert fits["GDA"]["Sigma"].shape == (2, 2) and fits["QDA"]["Sigma"].shape == (k, 2, 2)
for j in range(k):  # QDA: each class's own covariance
    assert torch.allclose(fits["QDA"]["Sigma"][j], torch.cov(x[z == j].T, correction=0))
print("GDA's shared Sigma:", fits["GDA"]["Sigma"].tolist())


def check_gda():
    phi, mu, Sigma = gda_by_hand(x, z, k)
    assert torch.allclose(phi, fits["GDA"]["phi"]) and torch.allclose(mu, fits["GDA"]["mu"])
    assert torch.allclose(Sigma, fits["GDA"]["Sigma"])


teaching.check_exercise("2.1", check_gda)

# %% [markdown]
# **Linear versus quadratic boundaries.** The log-odds of two classes a, b,
# log p(z = a | x) - log p(z = b | x) = log phi_a N(x; mu_a, Sigma_a) - log phi_b N(x; mu_b, Sigma_b),
# contain -(1/2) x^T (Sigma_a^{-1} - Sigma_b^{-1}) x. With GDA's shared Sigma that term cancels:
# the log-odds are affine in x and the boundaries between classes are straight lines. QDA's
# boundaries are conics. We check it by fitting an affine function to the log-odds on a grid.

# %%
g0, g1 = torch.linspace(-6.0, 7.0, 80, dtype=f64), torch.linspace(-4.0, 7.0, 80, dtype=f64)
plane = torch.cartesian_prod(g0, g1)  # (G, 2)
design = torch.cat([plane, torch.ones(len(plane), 1, dtype=f64)], -1)  # (G, 3): affine features
tables, residual = {}, {}
for name, p in fits.items():
    tables[name] = teaching.log_joint_table(plane, p["phi"], p["mu"], p["Sigma"])  # (G, k)
    log_odds = tables[name][:, 1] - tables[name][:, 0]  # class 2 against class 1
    coef = torch.linalg.lstsq(design, log_odds[:, None]).solution
    residual[name] = (design @ coef - log_odds[:, None]).abs().max().item()
print(f"largest deviation of the log-odds from an affine function: GDA {residual['GDA']:.1e}, "
      f"QDA {residual['QDA']:.1f}")
assert residual["GDA"] < 1e-8 and residual["QDA"] > 1.0

fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharex=True, sharey=True)
for ax, name in zip(axes, fits):
    regions = tables[name].argmax(-1).reshape(len(g0), len(g1)).T
    ax.contourf(g0, g1, regions, levels=[-0.5, 0.5, 1.5, 2.5], colors=colors, alpha=0.25)
    ax.contour(g0, g1, regions, levels=[0.5, 1.5], colors="k", linewidths=1)
    ax.scatter(x[:, 0], x[:, 1], c=[colors[j] for j in z], s=4, alpha=0.6)
    ax.set_title(f"{name}: " + ("shared Sigma, linear boundaries" if name == "GDA"
                                else "a Sigma_j per class, quadratic boundaries"))
    ax.set_xlabel("x_1")
axes[0].set_ylabel("x_2")
fig.suptitle("regions where argmax_j p(z = j | x) is each class (colours as in the samples)")
teaching.savefig(fig, OUT / "02_gda_vs_qda.png")

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
# teaching.log_joint_table(x, phi, mu, Sigma): log phi_j + log N(x^(i); mu_j, Sigma_j), (n, k)
table = teaching.log_joint_table(x, truth["phi"], truth["mu"], truth["Sigma"])
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
# minutes) form two clouds. Is a 2-component GMM a better density estimate than one Gaussian
# (the GMM with k = 1)? Not because its log-likelihood on the data it was fitted to is
# higher: the k = 2 family *contains* the k = 1 one (two equal components, or phi = (1, 0)), so
# its maximum is at least as high on any data set, even data drawn from one Gaussian. Two fair
# comparisons:
#
# * **held-out log-likelihood**: fit on half of the eruptions, score the other half;
# * **BIC** = -2 log p(x; theta) + p log n, which charges each of the p free parameters
#   log n (`FitResult.bic`; lower is better).
#
# The fits use `ppl_em.fit` (EM from k-means++ starts, treated as a black box until the next
# tutorial).

# %%
faithful = load_old_faithful()  # (272, 2)
order = torch.randperm(len(faithful), generator=torch.Generator().manual_seed(0))
train, test = faithful[order[:136]], faithful[order[136:]]  # (136, 2) each
results = {kk: ppl_em.fit(gmm.model, train, kk, n_init=3, progress=False) for kk in (1, 2)}
table_rows = {}
for kk, result in results.items():
    table_rows[kk] = {"train": result.score(train, kk), "held-out": result.score(test, kk),
                      "BIC": result.bic(train, kk), "parameters": result.n_parameters(train, kk)}
    print(f"k = {kk}: " + ", ".join(f"{key} {value:.3f}" if key != "parameters" else f"{key} {value}"
                                    for key, value in table_rows[kk].items()))
one, two = table_rows[1], table_rows[2]
assert two["train"] >= one["train"]  # always: the larger, nested family
assert two["held-out"] > one["held-out"]  # on new data too
assert two["BIC"] < one["BIC"]  # and after paying log n for each extra parameter
# k = 1 is one Gaussian: EM's maximum is the closed form, the data's mean and covariance.
single = dist.MultivariateNormal(train.mean(0), covariance_matrix=torch.cov(train.T, correction=0))
assert abs(single.log_prob(train).mean().item() - one["train"]) < 1e-4

# %% [markdown]
# ### Exercise 2.2: counting parameters
#
# BIC needs p, the number of free parameters. Write `gmm_free_parameters(k, d)` for a
# full-covariance GMM: phi lives on a simplex, each mu_j in R^d, each Sigma_j is symmetric.

# %% tags=["exercise"]
def gmm_free_parameters(k, d):
    """p for a GMM with k components and full d x d covariances."""
    raise NotImplementedError("Exercise 2.2")


# %% tags=["solution", "hide-cell"] jupyter={"source_hidden": true}
def gmm_free_parameters(k, d):
    # phi: k numbers summing to 1; mu: k d; Sigma_j: d (d + 1) / 2 entries on and above the diagonal.
    return (k - 1) + k * d + k * d * (d + 1) // 2


# %%
def check_free_parameters():
    for kk, row in table_rows.items():
        assert gmm_free_parameters(kk, 2) == row["parameters"], kk
    assert gmm_free_parameters(3, 10) == 2 + 30 + 165


teaching.check_exercise("2.2", check_free_parameters)

# %%
g0 = torch.linspace(0.0, 7.0, 120 if QUICK else 300, dtype=f64)
g1 = torch.linspace(20.0, 120.0, 120 if QUICK else 300, dtype=f64)
grid = torch.cartesian_prod(g0, g1)  # (G, 2)
densities = {kk: teaching.log_joint_table(grid, r.params["phi"], r.params["mu"], r.params["Sigma"]).logsumexp(-1).exp()
             for kk, r in results.items()}
cell = (g0[1] - g0[0]) * (g1[1] - g1[0])
for density in densities.values():
    assert abs((density.sum() * cell).item() - 1.0) < 0.02  # a density: it integrates to 1

fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
for ax, (kk, density) in zip(axes, densities.items()):
    filled = ax.contourf(g0, g1, density.reshape(len(g0), len(g1)).T, levels=15, cmap="Blues")
    ax.scatter(train[:, 0], train[:, 1], s=6, color="k", label="fitted on (train)")
    ax.scatter(test[:, 0], test[:, 1], s=10, facecolors="none", edgecolors="tab:red", label="held out")
    ax.set_title(f"k = {kk}: held-out mean log p(x) = {table_rows[kk]['held-out']:.2f}, "
                 f"BIC = {table_rows[kk]['BIC']:.0f}", fontsize=9)
    ax.set_xlabel("eruption (min)")
axes[0].set_ylabel("waiting (min)")
axes[0].legend(fontsize=8, loc="upper left")
fig.colorbar(filled, ax=axes, label="density p(x)")
teaching.savefig(fig, OUT / "02_old_faithful_density.png")

# %% [markdown]
# **Summary.** The GMM is a generative story with a latent z. With z observed, its maximum
# likelihood fit is one closed-form step (GDA with a shared Sigma, QDA with one per class). With z hidden, the likelihood is
# log sum_z p(x, z): no closed form, but the posterior p(z | x) = p(x, z) / p(x) is easy to
# compute, and that is the E-step of EM.
