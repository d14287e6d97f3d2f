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
# # 4. Jensen's inequality, the ELBO, and why EM works
#
# EM is not only a GMM trick. For any model with a joint p(x, z; theta) we want to maximise
# log p(x; theta) = log sum_z p(x, z; theta), which is hard because of the log of a sum.
# The lecture's way around it:
#
#     log p(x; theta) = log sum_z Q(z) p(x, z; theta) / Q(z)         (any Q with Q(z) > 0, sum_z Q(z) = 1)
#                     = log E_{z ~ Q}[ p(x, z; theta) / Q(z) ]
#                    >= E_{z ~ Q}[ log ( p(x, z; theta) / Q(z) ) ]  =:  ELBO(x; Q, theta)
#
# The inequality is **Jensen's**, because log is concave. This tutorial checks Jensen
# numerically, checks that the ELBO is a lower bound for every Q and is tight exactly at
# Q(z) = p(z | x; theta), and then watches EM climb as coordinate ascent on the ELBO.

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
# ## Jensen's inequality
#
# f is convex if f''(x) >= 0 for all x, and **strictly** convex if every chord lies strictly
# above the graph: f(a x_1 + (1 - a) x_2) < a f(x_1) + (1 - a) f(x_2) for x_1 != x_2, 0 < a < 1.
# f'' > 0 everywhere is *sufficient* for strict convexity but not necessary: f(x) = x^4 is
# strictly convex although f''(0) = 0. For weights alpha_1 + ... + alpha_n = 1, alpha_i >= 0,
# a convex f satisfies
#
#     f(alpha_1 x_1 + ... + alpha_n x_n) <= alpha_1 f(x_1) + ... + alpha_n f(x_n),
#
# i.e. f(E[x]) <= E[f(x)] for x taking value x_i with probability alpha_i. For a concave f
# (such as log) the inequality flips: E[log x] <= log E[x]. If f is *strictly* convex,
# equality holds only when x = E[x] with probability 1, i.e. x is a constant (exercise 4.1).
#
# We draw many random discrete distributions (alpha, x) and check the gap E[f(x)] - f(E[x]).

# %%
trials, support = (200, 5) if QUICK else (5000, 5)
alpha = dist.Dirichlet(torch.ones(support, dtype=f64)).sample((trials,))  # (trials, support)
values = 3 * torch.rand(trials, support, dtype=f64) + 0.1  # positive, so that log is defined


def mean(v):
    """E[v] under alpha, per trial."""
    return (alpha * v).sum(-1)


def quartic(v):
    return (v - 1.5) ** 4  # strictly convex, with f''(1.5) = 0 inside the range of the values


convex = {"x^2": torch.square, "exp(x)": torch.exp, "-log(x)": lambda v: -torch.log(v), "(x - 1.5)^4": quartic}
for name, f in convex.items():
    gap = mean(f(values)) - f(mean(values))  # E[f(x)] - f(E[x])
    assert (gap > 0).all(), name  # strictly convex and x not constant: a strict inequality
    print(f"f = {name:11s} E[f(x)] - f(E[x]) > 0 in all {trials} trials; smallest gap {gap.min():.2e}")

# (x - 1.5)^4 is strictly convex, yet its second derivative vanishes at 1.5: f'' > 0 is not necessary.
at = torch.tensor(1.5, dtype=f64, requires_grad=True)
(first,) = torch.autograd.grad(quartic(at), at, create_graph=True)
(second,) = torch.autograd.grad(first, at)
assert second.item() == 0.0

assert (mean(torch.log(values)) <= torch.log(mean(values))).all()  # concave: E[log x] <= log E[x]


def line(v):
    """Convex but not strictly: Jensen holds with equality."""
    return 2.0 * v + 1.0


assert torch.allclose(mean(line(values)), line(mean(values)))

constant = values[:, :1].expand(trials, support)  # x = E[x] with probability 1
for name, f in convex.items():
    assert torch.allclose(mean(f(constant)), f(mean(constant)))
print("equality for a linear f, and for any f when x is constant")

# %% [markdown]
# ### Exercise 4.1: Jensen's equality case
#
# Prove: if f is strictly convex and E[f(x)] = f(E[x]), then x = E[x] with probability 1.
# (Hint: a convex f lies above its tangent line at m = E[x]; for a strictly convex f the
# tangent touches only at m.) Then write `tangent(f, m)`, the tangent line of f at m as a
# function, using autograd for f'(m). The check tests the two facts the proof rests on.

# %% tags=["exercise"]
def tangent(f, m):
    """The function t(v) = f(m) + f'(m) (v - m), for a differentiable f and a scalar tensor m."""
    raise NotImplementedError("Exercise 4.1")


# %% [markdown] tags=["solution", "hide-cell"] jupyter={"source_hidden": true}
# **Solution.** Let m = E[x] and t(v) = f(m) + f'(m) (v - m) the tangent at m (for a
# non-differentiable f, any supporting line). Convexity gives f(v) >= t(v) for every v, and
# strict convexity gives f(v) > t(v) for v != m (if f(v) = t(v) for some v != m, the chord
# from m to v would lie on the line t, not strictly above the graph). The tangent is linear,
# so E[t(x)] = t(E[x]) = f(m). Hence
#
#     E[f(x)] - f(E[x]) = E[ f(x) - t(x) ],
#
# the expectation of a quantity that is >= 0, and > 0 wherever x != m. It is zero only if
# P(x != m) = 0: x = E[x] with probability 1. In the ELBO this is why the bound is tight only
# when p(x, z; theta) / Q(z) is the same for every z.

# %% tags=["solution", "hide-cell"] jupyter={"source_hidden": true}
def tangent(f, m):
    m = m.detach().requires_grad_(True)
    value = f(m)
    (slope,) = torch.autograd.grad(value, m)
    return lambda v: value.detach() + slope * (v - m.detach())


# %%
def check_tangent():
    grid = torch.linspace(0.1, 3.1, 301, dtype=f64)
    for name, f in convex.items():
        m = mean(values)[0]  # E[x] of the first trial
        t = tangent(f, m)
        below = f(grid) - t(grid)
        assert (below >= -1e-12).all(), name  # f lies above its tangent ...
        assert below[(grid - m).abs() > 1e-2].min() > 0, name  # ... strictly, away from m
        # E[f(x)] - f(E[x]) = E[f(x) - t(x)]: the identity the proof rests on.
        gap = (alpha[0] * f(values[0])).sum() - f(m)
        assert torch.allclose(gap, (alpha[0] * (f(values[0]) - t(values[0]))).sum()), name


teaching.check_exercise("4.1", check_tangent)

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 4))
grid = torch.linspace(0.15, 3.2, 200, dtype=f64)
x1, x2, a1 = 0.4, 2.8, 0.35  # x takes x1 with probability a1, x2 with 1 - a1
for ax, (name, f, sign) in zip(axes, [("x^2", torch.square, "<="), ("log(x)", torch.log, ">=")]):
    xs = torch.tensor([x1, x2], dtype=f64)
    ex = a1 * x1 + (1 - a1) * x2
    ax.plot(grid, f(grid), label=f"f(x) = {name}")
    ax.plot(xs, f(xs), "k--", lw=1, label="chord between (x1, f(x1)) and (x2, f(x2))")
    ax.plot([ex], f(torch.tensor([ex], dtype=f64)), "o", color="tab:red", label="f(E[x])")
    ax.plot([ex], [(a1 * f(xs[0]) + (1 - a1) * f(xs[1])).item()], "s", color="tab:green", label="E[f(x)]")
    ax.set_title(f"f(E[x]) {sign} E[f(x)]")
    ax.set_xlabel("x")
    ax.set_ylabel("f(x)")
    ax.legend(fontsize=8)
teaching.savefig(fig, OUT / "04_jensen.png")

# %% [markdown]
# ## The ELBO is a lower bound for every Q, tight at the posterior
#
# Take a GMM on the (standardised) Old Faithful data at some parameters theta. For each data
# point, Q_i is any distribution over its k components; the ELBO of the whole data set is
#
#     ELBO(x; Q, theta) = sum_i sum_j Q_i(j) [ log p(x^(i), z^(i) = j; theta) - log Q_i(j) ].

# %%
x = load_old_faithful()
x = (x - x.mean(0)) / x.std(0)  # (272, 2), standardised
n, k = len(x), 2
theta = {
    "phi": torch.tensor([0.5, 0.5], dtype=f64),
    "mu": torch.tensor([[-1.0, -1.0], [1.0, 1.0]], dtype=f64),
    "Sigma": torch.eye(2, dtype=f64).expand(k, 2, 2).clone(),
}


def elbo(Q, table):
    """ELBO(x; Q, theta) = sum_ij Q_ij (log p(x^(i), j) - log Q_ij), with 0 log 0 = 0."""
    return (Q * table).sum() - torch.special.xlogy(Q, Q).sum()


table = teaching.log_joint_table(x, **theta)  # (n, k): log p(x^(i), z^(i) = j; theta)
log_px = table.logsumexp(-1).sum()  # log p(x; theta)
posterior = table.softmax(-1)  # (n, k): p(z^(i) = j | x^(i); theta)

trials = 50 if QUICK else 500
noise = dist.Dirichlet(torch.ones(k, dtype=f64)).sample((trials, n))  # (trials, n, k)
lam = torch.rand(trials, 1, 1, dtype=f64)
random_Q = (1 - lam) * posterior + lam * noise  # random Q, some close to the posterior, some far
bounds = torch.stack([elbo(Q, table) for Q in random_Q])
assert (bounds <= log_px).all()
assert torch.allclose(elbo(posterior, table), log_px)
print(f"log p(x) = {log_px:.3f};  ELBO at Q = posterior: {elbo(posterior, table):.3f};  "
      f"best of {len(random_Q)} random Q: {bounds.max():.3f}")

# %% [markdown]
# Why is the posterior the one Q that makes it tight? Jensen is an equality when the thing
# inside is constant: p(x, z; theta) / Q(z) = c for every z. Then Q(z) is proportional to
# p(x, z; theta), and normalising gives Q(z) = p(x, z; theta) / sum_z p(x, z; theta) =
# p(z | x; theta). At that Q the ratio is the same for every z: it is p(x; theta).
#
# The size of the gap is a KL divergence: log p(x; theta) - ELBO(x; Q, theta) =
# KL(Q || p(z | x; theta)) >= 0, which is zero only at the posterior (exercise 4.2).

# %%
ratio = table - posterior.log()  # log [p(x^(i), j) / Q_i(j)] at Q = posterior, (n, k)
assert torch.allclose(ratio, table.logsumexp(-1, keepdim=True).expand(n, k))  # = log p(x^(i)), for every j

# %% [markdown]
# ### Exercise 4.2: the gap is a KL divergence
#
# Show that log p(x; theta) - ELBO(x; Q, theta) = KL(Q || p(z | x; theta)) =
# sum_z Q(z) log [Q(z) / p(z | x; theta)], and write `kl_divergence(Q, P)` for (n, k) tables of
# per-point distributions (summed over the points; use 0 log 0 = 0).

# %% tags=["exercise"]
def kl_divergence(Q, P):
    """sum_i sum_j Q_ij log(Q_ij / P_ij), with 0 log 0 = 0."""
    raise NotImplementedError("Exercise 4.2")


# %% [markdown] tags=["solution", "hide-cell"] jupyter={"source_hidden": true}
# **Solution.** Write p(x, z; theta) = p(z | x; theta) p(x; theta) inside the ELBO:
#
#     ELBO = sum_z Q(z) log [ p(z | x; theta) p(x; theta) / Q(z) ]
#          = log p(x; theta) sum_z Q(z) - sum_z Q(z) log [ Q(z) / p(z | x; theta) ]
#          = log p(x; theta) - KL(Q || p(z | x; theta)).
#
# KL >= 0 is Jensen again (-log is convex), with equality exactly when Q(z) / p(z | x) is
# constant, i.e. Q = p(z | x; theta). For the data set, sum over the points.

# %% tags=["solution", "hide-cell"] jupyter={"source_hidden": true}
def kl_divergence(Q, P):
    return (torch.special.xlogy(Q, Q) - torch.special.xlogy(Q, P)).sum()


# %%
def check_kl():
    for Q in random_Q[:5]:
        assert torch.allclose(log_px - elbo(Q, table), kl_divergence(Q, posterior))
        assert kl_divergence(Q, posterior) >= 0
    assert abs(kl_divergence(posterior, posterior)) < 1e-9
    one_hot = torch.nn.functional.one_hot(posterior.argmax(-1), k).to(f64)  # 0 log 0 = 0
    assert torch.isfinite(kl_divergence(one_hot, posterior))


teaching.check_exercise("4.2", check_kl)
Q = random_Q[0]
print(f"for a random Q: log p(x) - ELBO = {(log_px - elbo(Q, table)):.3f} "
      f"= KL(Q || posterior) = {(torch.special.xlogy(Q, Q / posterior)).sum():.3f}")

# %% [markdown]
# ## EM is coordinate ascent on the ELBO
#
# * E-step: Q_i(z^(i)) := p(z^(i) | x^(i); theta) maximises the ELBO over Q (it makes the
#   bound tight: ELBO = log p(x; theta)).
# * M-step: theta := argmax_theta sum_i ELBO(x^(i); Q_i, theta) with Q fixed (the entropy
#   term does not depend on theta, so this maximises E_Q[log p(x, z; theta)]).
#
# Hence log p(x; theta_{t+1}) >= ELBO(Q_t, theta_{t+1}) >= ELBO(Q_t, theta_t) = log p(x; theta_t).
# We check every link of that chain with the engine: `em.e_step` gives Q_t and
# log p(x; theta_t), and `em.expected_log_joint(post, ...)` evaluates E_{Q_t}[log p(x, z; theta)]
# at the *current* parameters, so after the M-step it gives the ELBO of the old Q at the new theta.

# %%
def entropy(post):
    """H(Q) = -sum_z Q(z) log Q(z) of the E-step's Q over z, summed over points."""
    w = post.marginal("z")
    return -torch.special.xlogy(w, w).sum()


pyro.clear_param_store()
em = ppl_em.EM(gmm.model)
n_iter = 6 if QUICK else 10
log_lik, elbo_old_q = [], []  # log p(x; theta_t) and ELBO(Q_{t-1}, theta_t)
post = em.e_step(x, k, init=theta)
for t in range(n_iter):
    with torch.no_grad():
        tight = em.expected_log_joint(post, x, k) + entropy(post)  # ELBO(Q_t, theta_t)
    assert torch.allclose(tight, post.log_evidence)  # the E-step makes the bound touch
    log_lik.append(post.log_evidence.item())
    em.m_step(post, x, k)
    with torch.no_grad():
        # ELBO(Q_t, theta_{t+1}): the old Q at the new parameters
        elbo_old_q.append((em.expected_log_joint(post, x, k) + entropy(post)).item())
    post = em.e_step(x, k)
    assert elbo_old_q[-1] >= log_lik[-1] - 1e-8  # the M-step raises the ELBO ...
    assert post.log_evidence.item() >= elbo_old_q[-1] - 1e-8  # ... and log p(x) lies above it
print("log p(x):      ", [round(v, 1) for v in log_lik])
print("ELBO of old Q: ", [round(v, 1) for v in elbo_old_q])

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 4))
for ax, first in zip(axes, (0, 1)):
    steps = range(first, n_iter)
    ax.plot(list(steps), log_lik[first:], "o-", color="tab:blue", label="log p(x; theta_t)")
    for t in steps:
        if t + 1 < n_iter:
            # M-step: along the old Q's bound to ELBO(Q_t, theta_{t+1}); E-step: up to touch log p(x).
            ax.plot([t, t + 1], [log_lik[t], elbo_old_q[t]], color="tab:orange", lw=1.5)
            ax.plot([t + 1, t + 1], [elbo_old_q[t], log_lik[t + 1]], ":", color="tab:orange")
    ax.plot(list(range(first + 1, n_iter)), elbo_old_q[first:-1], "s", color="tab:orange",
            label="ELBO(Q_t, theta_{t+1}): after the M-step")
    ax.set_xlabel("iteration t")
    ax.set_ylabel("nats")
    ax.legend(fontsize=8, loc="lower right")
axes[0].set_title("every iteration, from the start t = 0")
axes[1].set_title("zoomed in on t >= 1")
fig.suptitle("EM: the ELBO touches log p(x) after each E-step; the M-step climbs it", y=1.02)
teaching.savefig(fig, OUT / "04_elbo_vs_loglik.png")

# %% [markdown]
# ## One M-step seen as a function of theta
#
# Fix Q_t (one E-step from the poor start above) and move the means mu = (mu_1, mu_2) along
# the line from their current value (s = 0) through the M-step's value (s = 1), keeping phi
# and Sigma where they are. Because the M-step's mu_j = sum_i w_j^(i) x^(i) / sum_i w_j^(i)
# does not depend on phi or Sigma, it is the maximiser along this line too.
#
# log p(x; theta) and ELBO(Q_t, theta) touch at s = 0; the bound lies below everywhere and
# peaks at s = 1, the M-step's update; there log p(x) is higher still. This is the picture
# behind "maximise a lower bound that touches it".

# %%
pyro.clear_param_store()
em = ppl_em.EM(gmm.model)
post = em.e_step(x, k, init=theta)
Q_t = post.marginal("z")  # (n, k)
em.m_step(post, x, k)
mu_old, mu_new = theta["mu"], em.params["mu"]  # (k, d) each
s_grid = torch.linspace(-1.0, 2.5, 71 if QUICK else 141, dtype=f64)
curves = {"log p(x)": [], "ELBO": []}
for s in s_grid:
    mu = mu_old + s * (mu_new - mu_old)
    tab = teaching.log_joint_table(x, theta["phi"], mu, theta["Sigma"])  # only the means move
    curves["log p(x)"].append(tab.logsumexp(-1).sum().item())
    curves["ELBO"].append(elbo(Q_t, tab).item())
lp, lb = torch.tensor(curves["log p(x)"]), torch.tensor(curves["ELBO"])
assert (lb <= lp + 1e-8).all()
at0, at1 = s_grid.abs().argmin().item(), (s_grid - 1).abs().argmin().item()
assert abs(lp[at0] - lb[at0]) < 1e-8  # touching at the current theta
assert lb.argmax().item() == at1  # the bound's maximum along this line is the M-step's mu

fig, ax = plt.subplots(figsize=(6, 4))
ax.plot(s_grid, lp, label="log p(x; theta)")
ax.plot(s_grid, lb, label="ELBO(x; Q_t, theta)")
ax.axvline(0, color="gray", ls=":")
ax.axvline(1, color="gray", ls="--")
ax.set_xlabel("s  (mu = mu_old + s (mu_M-step - mu_old))")
ax.set_ylabel("nats")
ax.set_title("the bound touches at s = 0 and peaks at the M-step")
ax.legend()
teaching.savefig(fig, OUT / "04_bound_along_mstep.png")

# %% [markdown]
# **Summary.** Jensen's inequality turns log sum_z into a lower bound, the ELBO, for any Q.
# The E-step picks the Q that makes it tight (the posterior), the M-step raises it in theta,
# so log p(x) can never go down. Nothing here used the Gaussian form of the GMM: the same
# argument applies to any latent-variable model, which is how VAEs are trained (tutorial 6).
# Tutorial 12 draws the same story as pictures: one bound per E-step along a theta axis, and
# EM on Old Faithful as an animation.
