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
# You write both steps in torch (exercises 3.1 and 3.2, with hidden solutions) and check them
# against ppl_em's engine, which runs the same `models/gmm.py` file; derive phi_j with a
# Lagrange multiplier (exercise 3.3); then watch EM converge, and compare soft with hard
# assignment ("soft k-means" versus k-means).

# %%
import matplotlib.pyplot as plt
import sympy
import torch
import pyro
import pyro.distributions as dist

import ppl_em
from ppl_em import teaching
from ppl_em.models import gmm

QUICK, OUT = teaching.setup(globals().get("__file__"))  # no __file__ in a notebook
f64 = torch.float64
COLORS = ["tab:blue", "tab:orange", "tab:green"]

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
# ## The E-step, by you
#
# Bayes' rule with p(z = j) = phi_j and p(x | z = j) = N(x; mu_j, Sigma_j):
#
#     w_j^(i) = phi_j N(x^(i); mu_j, Sigma_j) / sum_l phi_l N(x^(i); mu_l, Sigma_l),
#
# a softmax over j of log phi_j + log N(x^(i); mu_j, Sigma_j).
#
# ### Exercise 3.1: write the E-step
#
# Return the responsibilities w (n, k) for parameters phi (k,), mu (k, d), Sigma (k, d, d).
# Work in log space (`torch.distributions.MultivariateNormal(...).log_prob`, then a softmax):
# a product of small densities underflows. The check compares your w with ppl_em's E-step on
# `models/gmm.py`, which was never told this formula: it enumerates z in the Pyro program.

# %% tags=["exercise"]
def e_step_by_hand(x, phi, mu, Sigma):
    """Responsibilities w_j^(i), shape (n, k)."""
    raise NotImplementedError("Exercise 3.1")


# %% tags=["solution", "hide-cell"] jupyter={"source_hidden": true}
def e_step_by_hand(x, phi, mu, Sigma):
    log_joint = phi.log() + dist.MultivariateNormal(mu, covariance_matrix=Sigma).log_prob(x[:, None, :])  # (n, k)
    return log_joint.softmax(-1)


# %%
pyro.clear_param_store()
em = ppl_em.EM(gmm.model, reg_covar=0.0)  # reg_covar=0: the exact formulas, nothing added
post = em.e_step(x, k, init=start)
w = post.marginal("z")  # (n, k)
assert torch.allclose(w.sum(-1), torch.ones(n, dtype=f64))
print("the engine's w^(1) =", [round(v, 3) for v in w[0].tolist()])


def check_e_step():
    assert torch.allclose(e_step_by_hand(x, **start), w)
    tiny = {**start, "Sigma": start["Sigma"] * 1e-4}  # densities of order exp(-1e4): log space or bust
    assert torch.isfinite(e_step_by_hand(x, **tiny)).all()


teaching.check_exercise("3.1", check_e_step)

# %% [markdown]
# ## The M-step, by you
#
# Feed the same responsibilities to the formulas and to the engine's M-step. The engine
# recognises that `phi`, `mu[z]` and `Sigma[z]` are selected by the latent z inside
# Categorical and MultivariateNormal sites, and applies the weighted maximum-likelihood update
# for those families (`em.explain()` says which).
#
# ### Exercise 3.2: write the M-step
#
# Return phi (k,), mu (k, d) and Sigma (k, d, d) from the data x (n, d) and responsibilities
# w (n, k), using the formulas above (no loop over points; an `einsum` builds Sigma).

# %% tags=["exercise"]
def m_step_by_hand(x, w):
    """The lecture's closed forms: phi (k,), mu (k, d), Sigma (k, d, d)."""
    raise NotImplementedError("Exercise 3.2")


# %% tags=["solution", "hide-cell"] jupyter={"source_hidden": true}
def m_step_by_hand(x, w):
    nj = w.sum(0)  # (k,): soft counts
    phi = nj / len(x)
    mu = (w.T @ x) / nj[:, None]  # (k, d)
    centred = x[None, :, :] - mu[:, None, :]  # (k, n, d)
    Sigma = torch.einsum("nk,kni,knj->kij", w, centred, centred) / nj[:, None, None]
    return phi, mu, Sigma


# %%
em.m_step(post, x, k, init=start)
for name, how in em.explain().items():
    print(f"{name:6s} <- {how}")


def check_m_step():
    phi_new, mu_new, Sigma_new = m_step_by_hand(x, w)
    assert torch.allclose(phi_new, em.params["phi"])
    assert torch.allclose(mu_new, em.params["mu"])
    assert torch.allclose(Sigma_new, em.params["Sigma"])


teaching.check_exercise("3.2", check_m_step)

# %% [markdown]
# ### Exercise 3.3: phi_j with a Lagrange multiplier
#
# Only one term of E_Q[log p(x, z; theta)] depends on phi: sum_i sum_j w_j^(i) log phi_j. Maximise
# it subject to sum_j phi_j = 1 with a Lagrange multiplier beta, and show that
# phi_j = (1/n) sum_i w_j^(i). (Why is phi_j >= 0 not needed as a constraint?) Then let sympy
# solve the stationarity equations for k = 3: fill in `lagrangian` and `solve_for_phi`.

# %% tags=["exercise"]
def lagrangian(phi, N, beta):
    """L(phi, beta) = sum_j N_j log phi_j + beta (1 - sum_j phi_j), for sympy symbols (N_j = sum_i w_j^(i))."""
    raise NotImplementedError("Exercise 3.3")


def solve_for_phi(phi, N, beta):
    """Solve dL/dphi_j = 0 (every j) and dL/dbeta = 0; return the solution as a dict {symbol: value}."""
    raise NotImplementedError("Exercise 3.3")


# %% [markdown] tags=["solution", "hide-cell"] jupyter={"source_hidden": true}
# **Solution.** Write N_j = sum_i w_j^(i) (soft counts) and
# L(phi, beta) = sum_j N_j log phi_j + beta (1 - sum_j phi_j). Then
#
#     dL/dphi_j = N_j / phi_j - beta = 0    =>    phi_j = N_j / beta,
#
# and the constraint sum_j phi_j = 1 gives beta = sum_j N_j = sum_i sum_j w_j^(i) = n (each
# point's responsibilities sum to 1). So phi_j = N_j / n = (1/n) sum_i w_j^(i). The solution is
# positive by itself (N_j > 0), and log phi_j -> -infinity at phi_j = 0 keeps the maximum away
# from the boundary, so phi_j >= 0 never binds. The objective is concave in phi (a sum of
# logs) and the constraint linear, so this stationary point is the maximum. With hard counts
# 1{z^(i) = j} it is GDA's phi_j (tutorial 2).

# %% tags=["solution", "hide-cell"] jupyter={"source_hidden": true}
def lagrangian(phi, N, beta):
    return sum(N_j * sympy.log(phi_j) for N_j, phi_j in zip(N, phi)) + beta * (1 - sum(phi))


def solve_for_phi(phi, N, beta):
    L = lagrangian(phi, N, beta)
    equations = [sympy.diff(L, v) for v in (*phi, beta)]
    (solution,) = sympy.solve(equations, [*phi, beta], dict=True)
    return solution


# %%
def check_lagrange():
    phi_s = sympy.symbols("phi1:4", positive=True)
    N_s = sympy.symbols("N1:4", positive=True)
    beta = sympy.Symbol("beta")
    solution = solve_for_phi(phi_s, N_s, beta)
    total = sum(N_s)
    for phi_j, N_j in zip(phi_s, N_s):
        assert sympy.simplify(solution[phi_j] - N_j / total) == 0
    # With N_j = sum_i w_j^(i): the engine's phi, and sum_j N_j = n.
    counts = w.sum(0)
    values = {N_j: float(c) for N_j, c in zip(N_s, counts)}
    phi_numeric = torch.tensor([float(solution[p].subs(values)) for p in phi_s], dtype=f64)
    assert torch.allclose(phi_numeric, em.params["phi"]) and abs(float(total.subs(values)) - n) < 1e-9


teaching.check_exercise("3.3", check_lagrange)

# %% [markdown]
# ## Running EM: log p(x) never decreases
#
# `em.step` is one E-step plus one M-step and returns -log p(x; theta) before the update
# (the contract of `pyro.infer.SVI.step`). We keep the parameters of every iteration to draw
# them as frames, run until log p(x) changes by less than 1e-8 nats, and check the EM
# guarantee: the log-likelihood never goes down.

# %%
pyro.clear_param_store()
em = ppl_em.EM(gmm.model)
frames, log_lik = [], []
for t in range(1000):
    post = em.e_step(x, k, init=start)
    frames.append({"w": post.marginal("z"), **em.params})  # Q and theta of iteration t
    log_lik.append(post.log_evidence.item())
    if t > 0 and log_lik[-1] - log_lik[-2] < 1e-8:
        break
    em.m_step(post, x, k, init=start)
n_iter = len(log_lik)
assert log_lik[-1] - log_lik[-2] < 1e-8, "EM did not converge"
increments = torch.diff(torch.tensor(log_lik))
assert (increments >= -1e-8).all(), "EM decreased log p(x)"
print(f"log p(x): {log_lik[0]:.2f} at the start -> {log_lik[-1]:.2f} after {n_iter - 1} iterations")

# %%
def draw_frame(ax, frame, title):
    """Points coloured by their responsibilities (a mix of the component colours), 2-sigma ellipses."""
    ax.scatter(x[:, 0], x[:, 1], c=teaching.mix_colors(frame["w"], COLORS), s=8)
    for j in range(k):
        teaching.draw_ellipse(ax, frame["mu"][j], frame["Sigma"][j], COLORS[j])
    ax.set_title(title, fontsize=9)


shown = sorted({0, 1, 2, 3, 5, 10, n_iter // 3, n_iter - 1})
fig, axes = plt.subplots(2, 4, figsize=(13, 7), sharex=True, sharey=True)
for ax, t in zip(axes.flat, shown):
    draw_frame(ax, frames[t], f"iteration {t}: log p(x) = {log_lik[t]:.1f}")
for ax in axes[-1]:
    ax.set_xlabel("x_1")
for ax in axes[:, 0]:
    ax.set_ylabel("x_2")
teaching.mixing_legend(fig, COLORS, [f"w_{j + 1} = 1 (component {j + 1})" for j in range(k)],
                       loc="lower center", ncol=4, fontsize=9, bbox_to_anchor=(0.5, -0.02))
fig.suptitle("EM for the GMM: the E-step colours each point by its w^(i) (a mix of the component "
             "colours), the M-step moves the ellipses")
teaching.savefig(fig, OUT / "03_em_frames.png")

fig, ax = plt.subplots(figsize=(5, 3.5))
ax.plot(log_lik, marker="o", ms=3)
ax.set_xlabel("iteration")
ax.set_ylabel("log p(x; theta)")
ax.set_title("EM never decreases the log-likelihood")
teaching.savefig(fig, OUT / "03_log_likelihood.png")

# %% [markdown]
# ## A soft assignment
#
# These three clouds overlap. At the converged parameters about four points in five belong
# clearly to one component (some w_j^(i) above 0.9); the rest, in the overlaps, are shared:
# their w^(i) is a genuine probability vector such as [0.1, 0.7, 0.2].

# %%
w = frames[-1]["w"]
clear = (w.max(-1).values > 0.9).double().mean().item()
print(f"{clear:.0%} of the points have a component above 0.9; {1 - clear:.0%} are shared")
assert 0.7 < clear < 0.9
target = torch.tensor([0.1, 0.7, 0.2], dtype=f64)
closest = (w.sort(-1).values - target.sort().values).abs().sum(-1).argmin()  # up to relabelling
print(f"x^({closest.item() + 1}) = {x[closest].tolist()}:  w = {[round(v, 2) for v in w[closest].tolist()]}")
assert w[closest].max() < 0.9 and (w[closest] > 0.05).sum() >= 2  # shared by at least two components

# %% [markdown]
# ## Soft versus hard assignment
#
# k-means gives each point **one** cluster: a hard assignment. The same engine runs hard
# ("classification") EM with `posterior="hard"`: Q(z) is one-hot at the most probable
# component, c^(i) = argmax_j w_j^(i), and the M-step then averages over the points assigned
# to each component, exactly the k-means re-estimate of mu_j. (k-means itself is the special
# case with equal phi_j and a shared, fixed Sigma_j = sigma^2 I: tutorial 1.) We run it from
# the same start until the assignments stop changing.

# %%
pyro.clear_param_store()
hard = ppl_em.EM(gmm.model, posterior="hard")
hard_losses = []
for _ in range(1000):
    hard_losses.append(hard.step(x, k, init=start))
    if len(hard_losses) > 1 and hard_losses[-1] == hard_losses[-2]:
        break
assert hard_losses[-1] == hard_losses[-2], "hard EM did not converge"
# Hard EM climbs max_z log p(x, z; theta), the objective its one-hot Q makes tight.
assert (torch.diff(torch.tensor(hard_losses)) <= 1e-8).all()

post_hard = hard.e_step(x, k, init=start)
q = post_hard.marginal("z")  # (n, k), one-hot
c = q.argmax(-1)  # (n,): the hard assignments c^(i)
assert torch.equal(q, torch.nn.functional.one_hot(c, k).to(f64))
# The mode of a posterior that factorises over points is the per-point argmax of w^(i).
w_same_params = teaching.log_joint_table(x, **hard.params).softmax(-1)
assert torch.equal(c, w_same_params.argmax(-1))
hard_frame = {"w": q, **hard.params}
hard.m_step(post_hard, x, k, init=start)
for j in range(k):
    assert torch.allclose(hard.params["mu"][j], x[c == j].mean(0))
print("hard EM: Q one-hot at argmax_j w_j^(i); mu_j = mean of the points assigned to j")

# %% [markdown]
# From this start hard EM **collapses a component**: one ellipse ends up owning a handful of
# points (its phi_j falls to a few per cent) while soft EM keeps all three. The mechanism: a
# hard assignment gives a component only the points it wins outright; the M-step then
# shrinks it around them, so it wins even fewer, and nothing pulls it back. Soft EM's
# fractional counts let a component keep a share of the overlap. Both are converged, and
# soft EM's log p(x) is higher: hard EM does not maximise log p(x) (it maximises
# max_z log p(x, z)), so it stops at parameters that are not a maximum of the likelihood.
# (Tutorial 10 shows more ways EM can fail.)

# %%
phi_soft, phi_hard = frames[-1]["phi"], hard_frame["phi"]
log_px_soft, log_px_hard = log_lik[-1], post_hard.log_evidence.item()
print(f"smallest phi_j: soft {phi_soft.min():.3f}, hard {phi_hard.min():.3f} "
      f"({int(q.sum(0).min())} points); log p(x): soft {log_px_soft:.1f}, hard {log_px_hard:.1f}")
assert phi_hard.min() < 0.05 and phi_soft.min() > 0.2
assert log_px_soft > log_px_hard

fig, axes = plt.subplots(1, 2, figsize=(10, 4.8), sharex=True, sharey=True)
draw_frame(axes[0], frames[-1], f"soft (EM): log p(x) = {log_px_soft:.1f}, "
           f"smallest phi_j = {phi_soft.min():.2f}")
draw_frame(axes[1], hard_frame, f"hard (classification EM): log p(x) = {log_px_hard:.1f},\n"
           f"a collapsed component: smallest phi_j = {phi_hard.min():.3f}")
for ax in axes:
    ax.set_xlabel("x_1")
axes[0].set_ylabel("x_2")
teaching.mixing_legend(fig, COLORS, loc="lower center", ncol=4, fontsize=9, bbox_to_anchor=(0.5, -0.06))
teaching.savefig(fig, OUT / "03_soft_vs_hard.png")

# %% [markdown]
# **Summary.** The E-step is Bayes' rule, the M-step is GDA with soft counts, and each EM
# iteration raises log p(x). Why it cannot go down is the subject of the next tutorial:
# EM is coordinate ascent on a lower bound of log p(x), the ELBO.
