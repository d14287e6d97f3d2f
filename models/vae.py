"""The variational autoencoder (VAE), as a plain Pyro program.

Generative story, for binary images x^(i) in {0, 1}^D (the 8x8 digits: D = 64), with a
latent code z^(i) in R^{d_z}:

    z^(i) ~ N(0, I)
    x^(i) | z^(i) ~ Bernoulli(f(z^(i)))        f(z) = sigmoid(decoder(z)), one probability per pixel

This is the lecture's x ~ P(f(z)): a neural network f turns a simple latent into the
parameters of the data distribution. Unlike the Gaussian mixture, z^(i) is continuous and
p(z^(i) | x^(i); theta) has no closed form, so EM's E-step (Q(z) = p(z | x; theta)) is out of
reach. Instead Q is restricted to q(z^(i) | x^(i)) = N(m(x^(i)), diag s(x^(i))^2), computed
by a second network, the encoder, and the ELBO

    ELBO(x; Q, theta) = sum_i E_q[log p(x^(i) | z^(i); theta)] - KL(q(z^(i) | x^(i)) || N(0, I))

is maximised in the decoder's theta and the encoder's weights at once, by SVI with
reparameterised samples z = m(x) + s(x) * eps.

Networks are ``nn.Module`` objects registered with ``pyro.module``, so their weights live in
Pyro's param store. The model takes the images and the decoder; the hand-written guide takes
the same arguments plus its encoder (bind it with ``functools.partial``).
``ppl_em.guides.AutoAmortized(model)`` builds an equivalent encoder automatically.

Example (tiny; real training uses more steps and the digits data):

>>> import functools, torch, pyro
>>> from pyro.infer import SVI, Trace_ELBO
>>> pyro.clear_param_store(); pyro.set_rng_seed(0)
>>> x = torch.bernoulli(torch.full((16, 64), 0.3))
>>> decoder, encoder = Decoder(z_dim=2, hidden=16, x_dim=64), Encoder(x_dim=64, hidden=16, z_dim=2)
>>> svi = SVI(model, functools.partial(guide, encoder=encoder), pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
>>> losses = [svi.step(x, decoder) for _ in range(30)]
>>> losses[-1] < losses[0]
True

References: lecture notes, "latent variable models: VAE, x ~ P(f(z))"; Kingma & Welling,
"Auto-Encoding Variational Bayes", ICLR 2014; Pyro's VAE tutorial.
"""

from typing import Tuple

import torch
import pyro
import pyro.distributions as dist
from torch import nn


class Decoder(nn.Module):
    """f: z (b, z_dim) -> pixel logits (b, x_dim), through one hidden layer of width ``hidden``."""

    def __init__(self, z_dim: int = 2, hidden: int = 64, x_dim: int = 64) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.net = nn.Sequential(nn.Linear(z_dim, hidden), nn.ReLU(), nn.Linear(hidden, x_dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class Encoder(nn.Module):
    """x (b, x_dim) -> location m(x) and scale s(x) > 0 of q(z | x), each (b, z_dim)."""

    def __init__(self, x_dim: int = 64, hidden: int = 64, z_dim: int = 2) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(x_dim, hidden), nn.ReLU(), nn.Linear(hidden, 2 * z_dim))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        loc, scale = self.net(x).chunk(2, dim=-1)
        return loc, nn.functional.softplus(scale)


def model(x: torch.Tensor, decoder: Decoder) -> None:
    """p(x, z; theta) for images ``x`` of shape (n, D) with values in {0, 1}; theta = the decoder's weights."""
    pyro.module("decoder", decoder)
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(x.new_zeros(decoder.z_dim), 1.0).to_event(1))  # (n, z_dim)
        pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)


def guide(x: torch.Tensor, decoder: Decoder, *, encoder: Encoder) -> None:
    """q(z^(i) | x^(i)) = N(m(x^(i)), diag s(x^(i))^2): the amortized Q, one encoder pass per image."""
    pyro.module("encoder", encoder)
    with pyro.plate("data", x.shape[0]):
        loc, scale = encoder(x)  # (n, z_dim) each
        pyro.sample("z", dist.Normal(loc, scale).to_event(1))
