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
# # 6. The variational autoencoder: EM's ELBO with a neural network
#
# A **latent-variable model** explains data x through a latent z: P(x) = sum_z P(x, z) =
# sum_z P(z) P(x | z) (an integral for continuous z). The lecture lists three modern ones,
# all built around a neural network f:
#
# * **VAE**: x ~ P(f(z)). z ~ N(0, I); the network f (the *decoder*) maps z to the parameters
#   of a distribution over x, here one Bernoulli probability per pixel. P(x) is a proper
#   likelihood, and we train with the ELBO.
# * **GAN**: x = f(z). The generator is deterministic: it pushes N(0, I) forward onto a thin
#   set of images, so P(x) has no density to evaluate or bound. Instead a second network
#   (the discriminator) is trained to tell generated from real x, and f is trained to fool it.
# * **Diffusion models**: the latents are a whole chain z_1, ..., z_T of ever noisier copies
#   of x. The "encoder" is fixed (add a little Gaussian noise at each step), the decoder is a
#   network that learns to remove it, step by step. Training again maximises an ELBO, the
#   same bound as here, summed over the steps of the chain.
#
# (Tutorial 13 fits a small GAN and a small diffusion model and checks the contrast between
# x = f(z) and x ~ P(f(z)) in code.)
#
# The digits below are the VAE case. Its z is continuous, so p(z | x) = p(x | z) p(z) / p(x)
# has no closed form (p(x) is an intractable integral) and EM's exact E-step is out of reach.
# The way out is the ELBO of tutorial 4 with a *restricted* Q: a Gaussian
# q(z | x) = N(m(x), diag s(x)^2) whose mean and scale come from a second network, the
# **encoder**. That is an amortized Q (tutorial 5): one network replaces the n separate E-steps.
#
#     ELBO(x; Q, theta) = sum_i [ E_{q(z | x^(i))}[ log p(x^(i) | z; theta) ] - KL( q(z | x^(i)) || N(0, I) ) ]
#                                    reconstruction                               stay close to the prior

# %%
import functools

import matplotlib.pyplot as plt
import torch
import pyro
import pyro.distributions as dist

import ppl_em
from ppl_em import teaching
from ppl_em.datasets import load_digits
from ppl_em.guides import AutoAmortized
from ppl_em.models import vae
from ppl_em.svi import SafeSVI, default_loss

QUICK, OUT = teaching.setup(globals().get("__file__"))  # no __file__ in a notebook

# %% [markdown]
# ## The binarised digits
#
# 1797 images of 8 x 8 pixels, each pixel set to 1 if its ink value is at least 8 of 16. We
# train on most of them and keep the rest to look at the latent space of unseen digits.
# (float32: the networks' native precision.)

# %%
images, labels = load_digits(dtype=torch.float32)  # (1797, 64) in {0, 1}, (1797,)
n_train, n_test = (300, 200) if QUICK else (1500, 297)
perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
train, test = perm[:n_train], perm[n_train:n_train + n_test]
x, x_test = images[train], images[test]  # (n_train, 64), (n_test, 64)

# %% [markdown]
# ## EM cannot fit this model, and says why
#
# The same engine that fitted the GMM inspects the model, finds a continuous latent z inside
# the data plate, and refuses, pointing to SVI or an amortized guide.

# %%
z_dim, hidden = 2, 128
decoder = vae.Decoder(z_dim=z_dim, hidden=hidden, x_dim=64)
encoder = vae.Encoder(x_dim=64, hidden=hidden, z_dim=z_dim)
try:
    ppl_em.EM(vae.model).step(x, decoder)
    raise AssertionError("EM should have refused a continuous local latent")
except ppl_em.ExactInferenceError as error:
    print("EM:", str(error)[:160], "...")
    assert "SVI" in str(error)

# %% [markdown]
# ## Training: SVI on the ELBO, in the decoder's and the encoder's weights at once
#
# `vae.guide` is the encoder's q(z | x). `default_loss` picks `Trace_ELBO` (no discrete
# latents to enumerate): each step draws z = m(x) + s(x) * eps, eps ~ N(0, I) (the
# reparameterisation trick), so the ELBO estimate is differentiable in both networks.
#
# **Minibatches.** The ELBO of the training set is a sum over its N images. A step sees a
# batch B of them; multiplying the batch's terms by N / |B| (`pyro.poutine.scale`, the same
# scaling `pyro.plate(..., subsample_size=...)` applies inside a model) makes the batch ELBO an
# unbiased estimate of the whole data set's ELBO, so the loss and its gradient are on the scale
# of the data set whatever the batch size. We report the ELBO per image: the mean over an
# epoch's batches of the scaled estimate, divided by N.

# %%
def scaled(fn, n_total):
    """``fn`` (the model or the guide) run on a batch, with its log-densities scaled by n_total / batch."""
    def on_batch(x_batch, decoder, **kwargs):
        with pyro.poutine.scale(scale=n_total / len(x_batch)):
            return fn(x_batch, decoder, **kwargs)
    return on_batch


pyro.clear_param_store()
guide = functools.partial(vae.guide, encoder=encoder)
model_b, guide_b = scaled(vae.model, n_train), scaled(guide, n_train)
epochs, batch = (40, 100) if QUICK else (100, 128)
svi = SafeSVI(model_b, guide_b, pyro.optim.Adam({"lr": 3e-3}), default_loss(model_b, x[:batch], decoder))

# The scaled loss is the batch's -ELBO times N / |B| (the same random draws: the same seed).
plain = SafeSVI(vae.model, guide, pyro.optim.Adam({"lr": 3e-3}), default_loss(vae.model, x[:batch], decoder))
pyro.set_rng_seed(7)
loss_scaled = svi.evaluate_loss(x[:batch], decoder)
pyro.set_rng_seed(7)
loss_plain = plain.evaluate_loss(x[:batch], decoder)
assert abs(loss_scaled - n_train / batch * loss_plain) < 1e-6 * abs(loss_scaled)

shuffle = torch.Generator().manual_seed(1)
elbo_per_image = []
for epoch in range(epochs):
    estimates = [-svi.step(x[idx], decoder) for idx in torch.randperm(n_train, generator=shuffle).split(batch)]
    elbo_per_image.append(sum(estimates) / len(estimates) / n_train)  # each estimate: the whole set's ELBO
print(f"ELBO per image: {elbo_per_image[0]:.2f} in the first epoch -> {elbo_per_image[-1]:.2f} in the last")
assert elbo_per_image[-1] > elbo_per_image[0]

fig, ax = plt.subplots(figsize=(5, 3.5))
ax.plot(range(1, epochs + 1), elbo_per_image, "o-", ms=3)
ax.set_xlabel("epoch")
ax.set_ylabel("ELBO per image (nats)")
ax.set_title("VAE training: the ELBO rises")
teaching.savefig(fig, OUT / "06_elbo.png")

# %% [markdown]
# ## The two terms of the ELBO
#
# For a Gaussian q and the N(0, I) prior the KL term has a closed form (exercise 6.1). The
# ELBO's other form, E_q[log p(x, z) - log q(z | x)], is what SVI estimates by sampling; the
# two estimates of the mean ELBO per image must agree within their Monte Carlo error.
#
# ### Exercise 6.1: the Gaussian KL
#
# Show that KL(N(m, s^2) || N(0, 1)) = (1/2) (m^2 + s^2 - 1 - log s^2) for one coordinate
# (a diagonal Gaussian sums it over coordinates), and write `gaussian_kl(loc, scale)`, (n, z_dim) -> (n,).

# %% tags=["exercise"]
def gaussian_kl(loc, scale):
    """KL( N(loc, diag scale^2) || N(0, I) ) per row, shape (n,)."""
    raise NotImplementedError("Exercise 6.1")


# %% [markdown] tags=["solution", "hide-cell"] jupyter={"source_hidden": true}
# **Solution.** With q = N(m, s^2) and p = N(0, 1),
# log q(z) - log p(z) = -log s - (z - m)^2 / (2 s^2) + z^2 / 2. Under q, E[(z - m)^2] = s^2 and
# E[z^2] = m^2 + s^2, so KL = E_q[log q - log p] = -log s - 1/2 + (m^2 + s^2) / 2
# = (1/2) (m^2 + s^2 - 1 - log s^2). Coordinates of a diagonal Gaussian are independent, so
# their KLs add.

# %% tags=["solution", "hide-cell"] jupyter={"source_hidden": true}
def gaussian_kl(loc, scale):
    return 0.5 * (loc ** 2 + scale ** 2 - 1 - 2 * scale.log()).sum(-1)


# %%
def log_weights(x, num_samples):
    """log p(x, z) - log q(z | x) for z ~ q(z | x): shape (num_samples, n)."""
    with torch.no_grad():
        loc, scale = encoder(x)  # (n, z_dim) each
        q = dist.Normal(loc, scale).to_event(1)
        z = q.sample((num_samples,))  # (S, n, z_dim)
        log_lik = dist.Bernoulli(logits=decoder(z)).to_event(1).log_prob(x)  # (S, n)
        log_prior = dist.Normal(0.0, 1.0).expand([z_dim]).to_event(1).log_prob(z)
        return log_lik + log_prior - q.log_prob(z)


S = 32
with torch.no_grad():
    loc, scale = encoder(x)
    prior = dist.Normal(torch.zeros_like(loc), 1.0).to_event(1)
    kl = torch.distributions.kl_divergence(dist.Normal(loc, scale).to_event(1), prior)  # (n,)
    z = dist.Normal(loc, scale).sample((S,))  # (S, n, z_dim)
    log_lik = dist.Bernoulli(logits=decoder(z)).to_event(1).log_prob(x)  # (S, n)
lw = log_weights(x, S)  # (S, n), independent draws
sampled, closed = lw.mean(0), log_lik.mean(0) - kl  # (n,) each: two estimates of ELBO(x^(i))
# Standard error of the difference of the two means over the n images: each image's estimate
# has variance var / S, and the mean of n independent ones var / (S n^2) summed over images.
std_err = ((lw.var(0) + log_lik.var(0)) / S).sum().sqrt() / n_train
difference = (sampled.mean() - closed.mean()).item()
print(f"per image: reconstruction {log_lik.mean():.2f}, KL {kl.mean():.2f}; ELBO {closed.mean():.2f} "
      f"(closed-form KL) vs {sampled.mean():.2f} (sampled); difference {difference:.4f}, standard error {std_err:.4f}")
assert (kl >= 0).all()
assert abs(difference) < 4 * std_err


def check_gaussian_kl():
    assert torch.allclose(gaussian_kl(loc, scale), kl, atol=1e-5)
    assert torch.allclose(gaussian_kl(torch.zeros(3, 2), torch.ones(3, 2)), torch.zeros(3))


teaching.check_exercise("6.1", check_gaussian_kl)

# %% [markdown]
# ## ELBO <= log p(x): Jensen once more
#
# log p(x) = log E_{z ~ q}[p(x, z) / q(z | x)] for any q. Averaging K weights inside the log,
# log (1/K) sum_k p(x, z_k) / q(z_k | x), gives a family of lower bounds (Burda et al.'s IWAE):
# K = 1 is the ELBO, and the bound rises towards log p(x) as K grows, because the log of an
# average of K weights is closer to the log of their expectation. The gap at K = 1 is what
# the Gaussian family of q costs us (KL(q || p(z | x)), tutorial 4).

# %%
bounds = {}
for K in (1, 10, 100):
    bounds[K] = (log_weights(x, K).logsumexp(0) - torch.log(torch.tensor(float(K)))).mean().item()
print("mean bound per image:", {K: round(v, 3) for K, v in bounds.items()})
assert bounds[1] < bounds[10] < bounds[100]

# %% [markdown]
# ## The latent space and the reconstructions
#
# With z in R^2 we can draw the encoder's means m(x) for unseen digits: similar digits land
# near each other although the model never saw a label. Decoding m(x) reconstructs the image,
# and decoding a grid of z values shows what the decoder has learnt to draw.

# %%
with torch.no_grad():
    m_train, _ = encoder(x)
    m_test, _ = encoder(x_test)
    recon = torch.sigmoid(decoder(m_test))  # (n_test, 64): f(m(x)), pixel probabilities

# Labels were never used in training; a 5-nearest-neighbour vote in latent space shows structure.
nearest = torch.cdist(m_test, m_train).topk(5, largest=False).indices  # (n_test, 5)
votes = labels[train][nearest].mode(-1).values
knn_accuracy = (votes == labels[test]).double().mean().item()
pixel_mean = x.mean(0).clamp(1e-3, 1 - 1e-3)  # the best model that ignores z


def bce(p):
    """Cross-entropy per pixel of the held-out images under pixel probabilities p."""
    return torch.nn.functional.binary_cross_entropy(p.expand_as(x_test), x_test).item()


print(f"5-NN digit accuracy in the 2-D latent space: {knn_accuracy:.0%} (chance 10%)")
print(f"reconstruction cross-entropy per pixel {bce(recon):.3f} vs {bce(pixel_mean):.3f} for the mean image")
assert bce(recon) < bce(pixel_mean)
assert knn_accuracy > (0.2 if QUICK else 0.6)

fig, ax = plt.subplots(figsize=(6, 5))
points = ax.scatter(m_test[:, 0], m_test[:, 1], c=labels[test], cmap="tab10", s=12)
fig.colorbar(points, ax=ax, label="digit (not used in training)")
ax.set_xlabel("m(x)_1")
ax.set_ylabel("m(x)_2")
ax.set_title("encoder means of held-out digits")
teaching.savefig(fig, OUT / "06_latent_space.png")

fig, axes = plt.subplots(2, 10, figsize=(10, 2.4))
for j in range(10):
    axes[0, j].imshow(x_test[j].reshape(8, 8).numpy(), cmap="gray_r")
    axes[1, j].imshow(recon[j].reshape(8, 8).numpy(), cmap="gray_r", vmin=0, vmax=1)
for ax in axes.flat:
    ax.axis("off")
fig.suptitle("held-out digits (top) and their reconstructions f(m(x)) (bottom)")
teaching.savefig(fig, OUT / "06_reconstructions.png")

steps = torch.linspace(-2.0, 2.0, 8)
grid = torch.cartesian_prod(steps, steps.flip(0))[:, [0, 1]]  # (64, 2)
with torch.no_grad():
    drawn = torch.sigmoid(decoder(grid)).reshape(8, 8, 8, 8)  # (z1, z2, row, col)
tiles = torch.nn.functional.pad(drawn, (0, 1, 0, 1))  # a blank line between neighbouring images
canvas = tiles.permute(1, 2, 0, 3).reshape(72, 72)  # z2 down the rows, z1 across
fig, ax = plt.subplots(figsize=(5, 5))
ax.imshow(canvas.numpy(), cmap="gray_r")
ax.axis("off")
ax.set_title("f(z) on a grid of z in [-2, 2]^2")
teaching.savefig(fig, OUT / "06_decoder_grid.png")

# %% [markdown]
# ## The project's automatic encoder
#
# `ppl_em.guides.AutoAmortized` reads the model, finds the continuous latent z in the data
# plate, and builds the same kind of encoder (x -> location and scale of a Normal) by itself.
# It plugs into the same SVI loop:

# %%
pyro.clear_param_store()
decoder2 = vae.Decoder(z_dim=z_dim, hidden=hidden, x_dim=64)
auto = AutoAmortized(vae.model, hidden=(hidden,))
svi2 = SafeSVI(vae.model, auto, pyro.optim.Adam({"lr": 3e-3}), default_loss(vae.model, x, decoder2))
losses = [svi2.step(x, decoder2) / n_train for _ in range(30 if QUICK else 300)]
print(f"AutoAmortized: -ELBO per image {losses[0]:.2f} -> {losses[-1]:.2f}")
assert sum(losses[-5:]) < sum(losses[:5])

# %% [markdown]
# **Summary.** The VAE is the lecture's EM recipe with two changes forced by a continuous
# latent: Q is a Gaussian family computed by an encoder (amortized) instead of the exact
# posterior, and the ELBO is maximised by stochastic gradients instead of alternating exact
# steps. The bound is no longer tight (the IWAE bounds show the gap), but everything else,
# Jensen, the ELBO, the latent space as an explanation of x, is the same story.
