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
# # 13. GANs and diffusion models among the latent-variable models
#
# The notes list three modern latent-variable models built around a neural network f and set
# two of them side by side: **x = f(z)** (a GAN) and **x ~ P(f(z))** (a VAE). With the
# mixture of tutorials 2-4 as the fourth, they differ in what the latent is, how x follows
# from it, and whether p(x) can be evaluated, which decides how each is trained:
#
# | model | latent z | x given z | p(x) = integral of p(z) p(x given z) | trained by |
# | --- | --- | --- | --- | --- |
# | GMM | discrete, one of k | x ~ N(mu_z, Sigma_z) | a finite sum: exact | EM (exact E-step) |
# | VAE | continuous, N(0, I) | x ~ P(f(z)), e.g. N(f(z), s^2 I) | an intractable integral | the ELBO, with an encoder as Q (tutorial 6) |
# | GAN | continuous, N(0, I) | x = f(z), no noise | none: x lies on the set f(R^m) | a discriminator (no likelihood) |
# | diffusion | x_1, ..., x_T, each like x | a fixed noising chain, learnt denoising | intractable | an ELBO over the chain (a reweighted one in practice) |
#
# This tutorial checks the x = f(z) versus x ~ P(f(z)) contrast in code, then trains a small
# GAN and a small diffusion model on the same 2-D data (a noisy ring). (Read after tutorial 6.)

# %%
import math

import matplotlib.pyplot as plt
import torch
from torch import nn

from ppl_em import teaching

QUICK, OUT = teaching.setup(globals().get("__file__"))  # no __file__ in a notebook
bce = nn.functional.binary_cross_entropy_with_logits


def mlp(inputs, outputs, hidden=64):
    """Two hidden ReLU layers: the network f of every model below."""
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, outputs))


def energy_distance(a, b):
    """2 E|X - Y| - E|X - X'| - E|Y - Y'| between two samples (n, 2), (m, 2): 0 iff the laws are equal."""
    return (2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean()).item()


# %% [markdown]
# ## The data: a noisy ring
#
# P_data puts x on a circle of radius 2, with a little radial noise (standard deviation 0.1).

# %%
def ring(n, generator):
    angle = 2 * math.pi * torch.rand(n, generator=generator)
    radius = 2 + 0.1 * torch.randn(n, generator=generator)
    return torch.stack([radius * angle.cos(), radius * angle.sin()], -1)  # (n, 2)


g = torch.Generator().manual_seed(0)
data = ring(2000, g)  # float32: the networks' precision
reference = ring(1000, g)  # a second sample of P_data, to score generated samples against

# %% [markdown]
# ## A GAN: x = f(z)
#
# The generator f maps a one-dimensional z ~ N(0, 1) to the plane. A discriminator D(x) is
# trained to tell data (label 1) from f(z) (label 0), and f to make D call its points data (the
# "non-saturating" generator loss -log sigmoid D(f(z))). No likelihood appears anywhere: there
# is none to write down, as the next section checks.

# %%
f = mlp(1, 2)
D = mlp(2, 1)
opt_f = torch.optim.Adam(f.parameters(), lr=2e-3, betas=(0.5, 0.999))
opt_D = torch.optim.Adam(D.parameters(), lr=2e-3, betas=(0.5, 0.999))
z_fixed = torch.randn(1000, 1, generator=g)
steps, batch = (600, 256) if QUICK else (3000, 256)
distances = []
for step in range(steps + 1):
    if step % 50 == 0:
        with torch.no_grad():
            distances.append((step, energy_distance(f(z_fixed), reference)))
    if step == steps:
        break
    real = data[torch.randint(len(data), (batch,))]
    fake = f(torch.randn(batch, 1))
    loss_D = bce(D(real), torch.ones(batch, 1)) + bce(D(fake.detach()), torch.zeros(batch, 1))
    opt_D.zero_grad()
    loss_D.backward()
    opt_D.step()
    loss_f = bce(D(fake), torch.ones(batch, 1))  # f wants D(f(z)) = "data"
    opt_f.zero_grad()
    loss_f.backward()
    opt_f.step()
print(f"GAN: energy distance to P_data {distances[0][1]:.3f} at the start -> {distances[-1][1]:.4f}")
assert distances[-1][1] < 0.1 * distances[0][1]
with torch.no_grad():
    radius = f(z_fixed).norm(dim=-1)
assert abs(radius.mean().item() - 2.0) < 0.1  # the generator draws the ring

# %% [markdown]
# ## x = f(z) against x ~ P(f(z)), in code
#
# Take the trained f and build both kinds of model from it: the GAN, x = f(z), and a
# VAE-style decoder, x ~ N(f(z), s^2 I) with s = 0.3. Three differences:
#
# 1. The same z gives the same x under the GAN, a different x under P(f(z)).
# 2. Under P(f(z)), log p(x | z) is finite for every x: the model has a density everywhere.
# 3. Under the GAN, all the probability lies on the curve {f(z)}: a one-dimensional set in
#    the plane, which has no area and hence no density. We measure the dimension: the
#    probability of a small disc of radius r around a generated point shrinks like r^1 for
#    the GAN (a curve), like r^2 for P(f(z)) (a density in the plane).

# %%
s = 0.3
z = torch.randn(5, 1, generator=g)
with torch.no_grad():
    gan_twice = f(z), f(z)
    decoded = f(z)
    vae_twice = decoded + s * torch.randn(5, 2, generator=g), decoded + s * torch.randn(5, 2, generator=g)
    anywhere = torch.tensor([[7.0, -3.0]])
    log_lik = torch.distributions.Normal(f(z), s).log_prob(anywhere).sum(-1)  # log p(x | z) at a far point
assert torch.equal(*gan_twice)  # deterministic: x = f(z)
assert not torch.allclose(*vae_twice)  # random: x ~ P(f(z))
assert torch.isfinite(log_lik).all()

many = 400_000
with torch.no_grad():
    gan_points = f(torch.randn(many, 1, generator=g))
    vae_points = f(torch.randn(many, 1, generator=g)) + s * torch.randn(many, 2, generator=g)
    centre = f(torch.zeros(1, 1))  # a point on the curve
radii = torch.tensor([0.03, 0.045, 0.07, 0.1, 0.12])


def disc_mass(points):
    """Fraction of the samples within each radius of ``centre``: the probability of the disc."""
    d = (points - centre).norm(dim=-1)
    return torch.stack([(d < r).double().mean() for r in radii])


def dimension(mass):
    """Slope of log(mass) against log(r): the dimension of where the probability lies."""
    design = torch.stack([radii.log().double(), torch.ones(len(radii), dtype=torch.float64)], -1)
    return torch.linalg.lstsq(design, mass.log()[:, None]).solution[0, 0].item()


mass_gan, mass_vae = disc_mass(gan_points), disc_mass(vae_points)
dim_gan, dim_vae = dimension(mass_gan), dimension(mass_vae)
print(f"probability of a disc of radius r ~ r^slope: slope {dim_gan:.2f} for x = f(z), {dim_vae:.2f} for x ~ P(f(z))")
assert abs(dim_gan - 1) < 0.25 and abs(dim_vae - 2) < 0.25
# Data points lie off the curve (the ring has width); under the GAN they have zero probability
# of ever being generated, so log p(x) = -infinity and maximum likelihood cannot train it.
gap = torch.cdist(data[:200], gan_points[:50_000]).min(-1).values
assert (gap > 1e-3).float().mean() > 0.9

fig, axes = plt.subplots(1, 4, figsize=(19, 4.3))
axes[0].scatter(data[:, 0], data[:, 1], s=2, color="k")
axes[0].set_title("P_data: a noisy ring")
axes[1].scatter(gan_points[:2000, 0], gan_points[:2000, 1], s=2, color="tab:red")
curve = f(torch.linspace(-3, 3, 400)[:, None]).detach()
axes[1].plot(curve[:, 0], curve[:, 1], color="k", lw=0.8, label="the curve f(z), z in [-3, 3]")
axes[1].set_title("GAN: x = f(z), z in R^1")
axes[1].legend(fontsize=8, loc="lower right")
axes[2].scatter(vae_points[:2000, 0], vae_points[:2000, 1], s=2, color="tab:blue")
axes[2].set_title(f"the same f as a decoder: x ~ N(f(z), {s}^2 I)")
for ax in axes[:3]:
    ax.set_aspect("equal")
    ax.set_xlabel("x_1")
    ax.set_ylabel("x_2")
    ax.set_xlim(-3.2, 3.2)
    ax.set_ylim(-3.2, 3.2)
axes[3].loglog(radii, mass_gan, "o-", color="tab:red", label=f"x = f(z): slope {dim_gan:.2f}")
axes[3].loglog(radii, mass_vae, "s-", color="tab:blue", label=f"x ~ P(f(z)): slope {dim_vae:.2f}")
axes[3].set_xlabel("radius r of a disc around a point f(z_0)")
axes[3].set_ylabel("probability of the disc")
axes[3].set_title("a curve (dimension 1) against a density (dimension 2)")
axes[3].legend(fontsize=8)
fig.tight_layout()
teaching.savefig(fig, OUT / "13_gan_vs_vae.png")

# %% [markdown]
# ## A diffusion model
#
# The latents are x_1, ..., x_T, noisier and noisier copies of x_0 = x. The "encoder" is
# fixed: q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I), and with
# alpha_t = 1 - beta_t, abar_t = alpha_1 ... alpha_t it jumps in one go:
# q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) (exercise 13.1). With abar_T near 0, x_T
# is N(0, I) whatever x was. The decoder p(x_{t-1} | x_t) is learnt: a network eps(x_t, t)
# predicts the noise in x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, trained on the squared
# error (Ho et al., 2020). That loss is the chain's ELBO with its terms reweighted; sampling
# runs the chain backwards from N(0, I).

# %%
T = 50
betas = torch.linspace(1e-3, 0.25, T)
alphas = 1 - betas
abar = alphas.cumprod(0)  # (T,)
# The last latent is the prior: KL(q(x_T | x_0) || N(0, I)) per point is tiny.
kl_T = 0.5 * (abar[-1] * (data ** 2).sum(-1) + 2 * (1 - abar[-1]) - 2 - 2 * (1 - abar[-1]).log())
assert kl_T.max() < 0.01

# %% [markdown]
# ### Exercise 13.1: jumping to step t
#
# Show that x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps with eps ~ N(0, I), by induction on
# t. Then write `forward_marginal(x0, t)` returning the mean (n, 2) and the variance (a
# number) of q(x_t | x_0), for t = 1, ..., T. The check runs the chain step by step.

# %% tags=["exercise"]
def forward_marginal(x0, t):
    """Mean (n, 2) and variance (float) of q(x_t | x_0), t in 1..T."""
    raise NotImplementedError("Exercise 13.1")


# %% [markdown] tags=["solution", "hide-cell"] jupyter={"source_hidden": true}
# **Solution.** For t = 1 it is the definition, with abar_1 = alpha_1. If
# x_{t-1} = sqrt(abar_{t-1}) x_0 + sqrt(1 - abar_{t-1}) e with e ~ N(0, I), then
# x_t = sqrt(alpha_t) x_{t-1} + sqrt(1 - alpha_t) e' =
# sqrt(abar_t) x_0 + [sqrt(alpha_t (1 - abar_{t-1})) e + sqrt(1 - alpha_t) e']. The bracket is a
# sum of independent centred Gaussians, with variance alpha_t (1 - abar_{t-1}) + 1 - alpha_t =
# 1 - abar_t. So q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I).

# %% tags=["solution", "hide-cell"] jupyter={"source_hidden": true}
def forward_marginal(x0, t):
    return abar[t - 1].sqrt() * x0, (1 - abar[t - 1]).item()


# %%
def check_forward_marginal():
    x0 = torch.tensor([[2.0, 0.0]]).expand(20_000, 2)
    chain = x0.clone()
    for t in range(1, T + 1):
        chain = alphas[t - 1].sqrt() * chain + betas[t - 1].sqrt() * torch.randn(chain.shape, generator=g)
        if t in (1, 10, T):
            mean, var = forward_marginal(x0[:1], t)
            se_mean = math.sqrt(var / len(chain))
            assert ((chain.mean(0) - mean[0]).abs() < 5 * se_mean).all(), t
            assert ((chain.var(0) - var).abs() < 5 * var * math.sqrt(2 / len(chain))).all(), t


teaching.check_exercise("13.1", check_forward_marginal)

# %%
eps_net = mlp(3, 2, hidden=128)  # input (x_t, t / T)
opt = torch.optim.Adam(eps_net.parameters(), lr=2e-3)
losses = []
for step in range(1000 if QUICK else 6000):
    x0 = data[torch.randint(len(data), (batch,))]
    t = torch.randint(T, (batch,))  # index 0..T-1 for steps 1..T
    eps = torch.randn_like(x0)
    xt = abar[t].sqrt()[:, None] * x0 + (1 - abar[t]).sqrt()[:, None] * eps  # one jump, exercise 13.1
    loss = ((eps_net(torch.cat([xt, (t[:, None] + 1.0) / T], -1)) - eps) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())


def sample(n):
    """Ancestral sampling backwards through the chain: x_T ~ N(0, I), then p(x_{t-1} | x_t)."""
    x = torch.randn(n, 2, generator=g)
    snapshots = {T: x}
    with torch.no_grad():
        for t in reversed(range(T)):
            predicted = eps_net(torch.cat([x, torch.full((n, 1), (t + 1.0) / T)], -1))
            x = (x - betas[t] / (1 - abar[t]).sqrt() * predicted) / alphas[t].sqrt()
            if t > 0:
                x = x + betas[t].sqrt() * torch.randn(n, 2, generator=g)
            snapshots[t] = x
    return x, snapshots


generated, backwards = sample(1000)
noise_distance, model_distance = energy_distance(backwards[T], reference), energy_distance(generated, reference)
print(f"diffusion: energy distance to P_data {noise_distance:.3f} for N(0, I) -> {model_distance:.4f} for samples")
assert model_distance < 0.25 * noise_distance
assert abs(generated.norm(dim=-1).mean().item() - 2.0) < 0.15
assert sum(losses[-100:]) < sum(losses[:100])

# %%
fig, axes = plt.subplots(2, 4, figsize=(16, 8))
forward = {0: data[:1000]}
for t in (T // 10, T // 2, T):
    mean, var = forward_marginal(data[:1000], t)
    forward[t] = mean + math.sqrt(var) * torch.randn(1000, 2, generator=g)
for ax, (t, points) in zip(axes[0], forward.items()):
    ax.scatter(points[:, 0], points[:, 1], s=2, color="tab:gray")
    ax.set_title(f"forward (fixed): x_{t} ~ q(x_{t} | x_0)" if t else "x_0: the data")
for ax, t in zip(axes[1], (T, T // 2, T // 10, 0)):
    points = backwards[t]
    ax.scatter(points[:, 0], points[:, 1], s=2, color="tab:purple")
    ax.set_title(f"backward (learnt): x_{t}" + (" ~ N(0, I)" if t == T else "") + (": samples" if t == 0 else ""))
for ax in axes.flat:
    ax.set_aspect("equal")
    ax.set_xlim(-3.5, 3.5)
    ax.set_ylim(-3.5, 3.5)
    ax.set_xlabel("x_1")
    ax.set_ylabel("x_2")
fig.suptitle(f"a diffusion model with T = {T} steps: noise the data (top), learn to denoise (bottom)")
fig.tight_layout()
teaching.savefig(fig, OUT / "13_diffusion.png")

# %% [markdown]
# **Summary.** All four models explain x through a latent z, and all four could be sampled
# by running their generative story forward. What separates them is p(x): a finite sum for
# the mixture (EM), an integral bounded by the ELBO for the VAE (an encoder as Q) and for
# diffusion (a fixed noising chain as Q), and no density at all for a GAN, whose
# x = f(z) puts its probability on a thin set: it is trained by a discriminator instead.
