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
# # 12. EM as a picture
#
# Tutorial 4 proved that EM climbs: each E-step builds a lower bound ELBO(x; Q_t, theta) that
# touches log p(x; theta) at the current theta_t, and each M-step jumps to the bound's
# maximum. This tutorial draws it, twice:
#
# 1. with one free parameter, so that log p(x; theta) and every E-step's bound are curves
#    over one theta axis (the picture in Bishop's PRML, figure 9.14);
# 2. as an animation of EM on the Old Faithful data, frame by frame (a GIF written with
#    matplotlib's `PillowWriter`).

# %%
import matplotlib.pyplot as plt
import torch
import pyro
import pyro.distributions as dist
from matplotlib.animation import FuncAnimation, PillowWriter
from PIL import Image

import ppl_em
from ppl_em import teaching
from ppl_em.datasets import load_old_faithful
from ppl_em.models import gmm

QUICK, OUT = teaching.setup(globals().get("__file__"))  # no __file__ in a notebook
f64 = torch.float64
COLORS = ["tab:blue", "tab:orange"]

# %% [markdown]
# ## One parameter, one axis
#
# The eruption durations alone (standardised, 1-D), a 2-component mixture with everything
# fixed except the first mean: phi = (0.36, 0.64), sigma_1 = sigma_2 = 0.35, mu_2 = 0.74, and
# theta = mu_1, started on the wrong side at theta_0 = 2. The model is a plain Pyro program
# with one `pyro.param`; since mu_1 enters the Normal through `torch.stack` with a constant,
# the engine finds no closed form and maximises E_Q[log p(x, z; theta)] by L-BFGS.

# %%
x = load_old_faithful()[:, 0]
x = (x - x.mean()) / x.std()  # (272,)
n = len(x)
phi = torch.tensor([0.36, 0.64], dtype=f64)
sigma = torch.tensor([0.35, 0.35], dtype=f64)
mu_2 = torch.tensor(0.74, dtype=f64)


def one_mean_model(x):
    """z^(i) ~ phi, x^(i) | z^(i) = j ~ N(mu_j, sigma_j^2), with only mu_1 free."""
    mu_1 = pyro.param("mu_1", torch.tensor(2.0, dtype=f64))
    mu = torch.stack([mu_1, mu_2])  # (2,)
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(phi))
        pyro.sample("x", dist.Normal(mu[z], sigma[z]), obs=x)


def table(theta):
    """log p(x^(i), z^(i) = j; theta) for theta = mu_1 (a scalar or a (G,) grid): (..., n, 2)."""
    mu = torch.stack(torch.broadcast_tensors(torch.as_tensor(theta, dtype=f64), mu_2), -1)  # (..., 2)
    return phi.log() + dist.Normal(mu[..., None, :], sigma).log_prob(x[:, None])


def elbo(theta, w):
    """ELBO(x; Q, theta) = sum_ij w_ij (log p(x^(i), j; theta) - log w_ij) for responsibilities w (n, 2)."""
    return (w * table(theta)).sum((-1, -2)) - torch.special.xlogy(w, w).sum()


pyro.clear_param_store()
em = ppl_em.EM(one_mean_model)
thetas, posteriors = [], []  # theta_t and Q_t
for t in range(7):
    post = em.e_step(x)  # Q_t = p(z | x; theta_t); the first call puts theta_0 = 2 in the store
    if t == 0:
        thetas.append(em.params["mu_1"].clone())
    posteriors.append(post.marginal("z"))  # (n, 2)
    assert torch.allclose(post.log_evidence, table(thetas[-1]).logsumexp(-1).sum())  # engine == by hand
    em.m_step(post, x)
    thetas.append(em.params["mu_1"].clone())
print("theta_t:", [round(v.item(), 3) for v in thetas])
print(em.explain())

# %% [markdown]
# Check the picture's three promises on a fine grid of theta, for every E-step t:
#
# * the bound lies below: ELBO(Q_t, theta) <= log p(x; theta) for every theta;
# * it touches at theta_t: ELBO(Q_t, theta_t) = log p(x; theta_t);
# * its maximum is the M-step's theta_{t+1} (for this model the weighted mean
#   sum_i w_1^(i) x^(i) / sum_i w_1^(i), which the engine's L-BFGS must find).

# %%
grid = torch.linspace(-2.0, 2.6, 921, dtype=f64)  # spacing 0.005
log_p = table(grid).logsumexp(-1).sum(-1)  # (G,): log p(x; theta)
curves = torch.stack([elbo(grid, w) for w in posteriors])  # (T, G)
for t, w in enumerate(posteriors):
    assert (curves[t] <= log_p + 1e-9).all()
    assert torch.allclose(elbo(thetas[t], w), table(thetas[t]).logsumexp(-1).sum())
    closed_form = (w[:, 0] * x).sum() / w[:, 0].sum()
    assert abs(thetas[t + 1] - closed_form) < 1e-6  # L-BFGS found the bound's maximiser
    assert abs(grid[curves[t].argmax()] - thetas[t + 1]) <= 0.005  # ... which is the curve's peak
    # log p(theta_{t+1}) >= ELBO(Q_t, theta_{t+1}) >= ELBO(Q_t, theta_t) = log p(theta_t)
    assert table(thetas[t + 1]).logsumexp(-1).sum() >= elbo(thetas[t + 1], w) >= elbo(thetas[t], w) - 1e-9

# %% [markdown]
# ### Exercise 12.1: the bound is tangent
#
# Show that at theta_t the bound and the log-likelihood have the same slope,
# d ELBO(Q_t, theta)/d theta = d log p(x; theta)/d theta at theta = theta_t. (Hint: the gap
# log p(x; theta) - ELBO(Q_t, theta) = KL(Q_t || p(z | x; theta)) is >= 0 and is 0 at theta_t.)
# Then write `slopes(theta, w)` returning both derivatives at theta with autograd.

# %% tags=["exercise"]
def slopes(theta, w):
    """(d ELBO(Q, theta) / d theta, d log p(x; theta) / d theta) at the scalar theta, Q = w."""
    raise NotImplementedError("Exercise 12.1")


# %% [markdown] tags=["solution", "hide-cell"] jupyter={"source_hidden": true}
# **Solution.** The gap g(theta) = log p(x; theta) - ELBO(Q_t, theta) = KL(Q_t || p(z | x; theta))
# is differentiable, never negative, and zero at theta_t (the E-step made Q_t the posterior
# there). A differentiable function that has a minimum at an interior point has zero slope
# there, so g'(theta_t) = 0: the two curves are tangent. (This is also why gradient EM works:
# the gradient of E_Q[log p(x, z; theta)] at theta_t is the gradient of log p(x; theta_t),
# Fisher's identity.) Away from theta_t the slopes differ, because g grows.

# %% tags=["solution", "hide-cell"] jupyter={"source_hidden": true}
def slopes(theta, w):
    theta = torch.as_tensor(theta, dtype=f64).detach().requires_grad_(True)
    (bound,) = torch.autograd.grad(elbo(theta, w), theta)
    (likelihood,) = torch.autograd.grad(table(theta).logsumexp(-1).sum(), theta)
    return bound, likelihood


# %%
def check_slopes():
    for t, w in enumerate(posteriors[:4]):
        bound, likelihood = slopes(thetas[t], w)
        assert torch.allclose(bound, likelihood, rtol=1e-8, atol=1e-8)  # tangent at theta_t
        away = slopes(thetas[t] + 0.3, w)
        assert not torch.allclose(*away, rtol=1e-3)  # but not elsewhere


teaching.check_exercise("12.1", check_slopes)

# %%
fig, ax = plt.subplots(figsize=(9, 5))
ax.plot(grid, log_p, color="k", lw=2.5, label="log p(x; theta)")
shades = plt.cm.viridis(torch.linspace(0.05, 0.85, len(posteriors)).numpy())
for t in range(min(len(posteriors), 6)):
    ax.plot(grid, curves[t], color=shades[t], lw=1.4, label=f"ELBO(x; Q_{t}, theta), E-step at theta_{t} = {thetas[t].item():.2f}")
    touch = table(thetas[t]).logsumexp(-1).sum().item()
    peak = curves[t].max().item()
    ax.plot(thetas[t].item(), touch, "o", color=shades[t], ms=7)
    ax.plot(thetas[t + 1].item(), peak, "v", color=shades[t], ms=7)
    ax.annotate("", (thetas[t + 1].item(), peak), (thetas[t].item(), touch),
                arrowprops={"arrowstyle": "->", "color": shades[t], "lw": 1})
lowest = table(thetas[0]).logsumexp(-1).sum().item()
ax.set_ylim(lowest - 0.15 * (log_p.max().item() - lowest), log_p.max().item() + 0.05 * (log_p.max().item() - lowest))
ax.set_xlabel("theta = mu_1 (the only free parameter)")
ax.set_ylabel("nats")
ax.set_title("each E-step builds a bound that touches log p(x) at theta_t (o);\n"
             "the M-step moves to its peak (v), where log p(x) is higher still")
ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
teaching.savefig(fig, OUT / "12_elbo_curves.png")

# %% [markdown]
# ## EM on Old Faithful, as an animation
#
# Both columns, standardised, a 2-component GMM with full covariances, from a start with both
# means in one corner. Each frame is one iteration: points coloured by w^(i) (a mix of the
# component colours), 1- and 2-sigma ellipses of the current theta, and log p(x; theta) in the
# title. The GIF lies in the output folder (open it in a browser or an image viewer).

# %%
faithful = load_old_faithful()
faithful = (faithful - faithful.mean(0)) / faithful.std(0)  # (272, 2)
start = {"phi": torch.tensor([0.5, 0.5], dtype=f64),
         "mu": torch.tensor([[-1.8, -1.6], [-1.5, -1.9]], dtype=f64),
         "Sigma": 0.3 * torch.eye(2, dtype=f64).expand(2, 2, 2).clone()}
pyro.clear_param_store()
em = ppl_em.EM(gmm.model)
frames = []
for t in range(12 if QUICK else 30):
    post = em.e_step(faithful, 2, init=start)
    frames.append({"w": post.marginal("z"), "log_px": post.log_evidence.item(), **em.params})
    em.m_step(post, faithful, 2, init=start)
log_lik = torch.tensor([f["log_px"] for f in frames])
assert (torch.diff(log_lik) >= -1e-8).all(), "EM decreased log p(x)"

fig, ax = plt.subplots(figsize=(5, 4.5))


def draw(t):
    """Frame t: the E-step's colours and the ellipses of theta_t."""
    ax.clear()
    frame = frames[t]
    ax.scatter(faithful[:, 0], faithful[:, 1], c=teaching.mix_colors(frame["w"], COLORS), s=10)
    for j in range(2):
        for radius in (1.0, 2.0):
            teaching.draw_ellipse(ax, frame["mu"][j], frame["Sigma"][j], COLORS[j], nsig=radius,
                                  lw=1.5 if radius == 1.0 else 0.8)
    ax.set_xlim(-2.6, 2.4)
    ax.set_ylim(-2.6, 2.4)
    ax.set_xlabel("eruption (standardised)")
    ax.set_ylabel("waiting (standardised)")
    ax.set_title(f"EM iteration {t}: log p(x) = {frame['log_px']:.1f}", fontsize=10)
    teaching.mixing_legend(ax, COLORS, loc="upper left")


animation = FuncAnimation(fig, draw, frames=len(frames))
gif = OUT / "12_em_old_faithful.gif"
animation.save(gif, writer=PillowWriter(fps=3), dpi=60 if QUICK else 90)
plt.close(fig)
with Image.open(gif) as image:
    assert image.n_frames == len(frames)
    image.seek(0)
    first = image.convert("RGB").tobytes()
    image.seek(image.n_frames - 1)
    assert image.convert("RGB").tobytes() != first  # the picture changes
print(f"{gif.name}: {len(frames)} frames, log p(x) {log_lik[0]:.1f} -> {log_lik[-1]:.1f}")

# %% [markdown]
# **Summary.** EM is a sequence of bounds: each one is tangent to log p(x; theta) at the
# current theta, lies below it everywhere, and its peak is the next theta. Where the bounds are
# flat (the slow stretch on the wrong side above) EM creeps; where they are sharp it leaps.
