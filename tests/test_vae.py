"""The VAE model file: trained by SVI, it must beat independent pixels on held-out digits."""

import doctest
import functools

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO

from ppl_em.datasets import load_digits
from ppl_em.guides import AutoAmortized
from ppl_em.models import vae
from ppl_em.svi import SafeSVI, default_loss


def split_digits():
    images, _ = load_digits()  # (1797, 64) float64 in {0, 1}
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    return images[perm[:1400]], images[perm[1400:]]


def independent_pixels_log_lik(train, test):
    """The baseline: per-pixel Bernoulli MLE (add-one smoothed) on train; mean log-likelihood per test image."""
    p = (train.sum(0) + 1) / (len(train) + 2)  # (64,)
    return torch.distributions.Bernoulli(probs=p).log_prob(test).sum(-1).mean().item()


def train_vae(guide, decoder, train, steps=300, batch=256, lr=0.015):
    svi = SafeSVI(vae.model, guide, pyro.optim.Adam({"lr": lr}), default_loss(vae.model, train[:batch], decoder))
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        svi.step(train[torch.randint(len(train), (batch,), generator=g)], decoder)


def heldout_elbo_per_image(guide, decoder, test):
    """ELBO(x; Q, theta) <= log p(x; theta): beating the baseline with it is conclusive."""
    return -Trace_ELBO(num_particles=10).loss(vae.model, guide, test, decoder) / len(test)


@pytest.mark.parametrize("which", ["hand-written", "AutoAmortized"])
def test_vae_beats_independent_pixels_on_heldout_digits(which):
    train, test = split_digits()
    baseline = independent_pixels_log_lik(train, test)
    decoder = vae.Decoder(z_dim=4, hidden=32, x_dim=64).double()
    if which == "hand-written":
        guide = functools.partial(vae.guide, encoder=vae.Encoder(x_dim=64, hidden=32, z_dim=4).double())
    else:
        guide = AutoAmortized(vae.model, hidden=(32,))
    guide(train, decoder)  # AutoAmortized sets up (and standardises its input) on training data only
    before = heldout_elbo_per_image(guide, decoder, test)
    train_vae(guide, decoder, train)
    after = heldout_elbo_per_image(guide, decoder, test)
    assert before < baseline  # untrained, it is worse than independent pixels
    assert after > baseline + 2.0, (after, baseline)


def test_vae_default_loss_is_trace_elbo():
    x = torch.zeros(3, 64, dtype=torch.float64)
    assert type(default_loss(vae.model, x, vae.Decoder().double())) is Trace_ELBO


def test_vae_docstring_example_runs():
    result = doctest.testmod(vae, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
