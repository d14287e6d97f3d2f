"""Plain Pyro model files, installed as ``ppl_em.models``. None of them imports ppl_em.

``REGISTRY`` lists every model file with the inference methods it supports and a small
synthetic data set drawn from the model itself, which the test matrix
(``tests/test_registry.py``) fits with each method. An entry is a dict:

``module``
    The model's module (its docstring tells the generative story).
``model``
    The Pyro model function, ``module.model``; an entry named ``<module>_<variant>`` registers
    another function of the same file (``hmm_vectorized``: ``hmm.vectorized_model``).
``methods``
    Tuple drawn from ``"em"`` (exact EM), ``"hard_em"`` (classification EM: Q one-hot at the
    posterior mode), ``"svi"`` (SVI with the mean-field ``AutoCategorical`` guide) and
    ``"vae"`` (SVI with the amortized ``AutoAmortized`` encoder guide).
``make_data``
    ``make_data(seed) -> (args, kwargs)``: arguments for ``model(*args, **kwargs)``, small
    enough for a test.
``description``
    One line.

A new model file must be added here; ``tests/test_registry.py`` fails until it is.
"""

from typing import Any, Dict, Tuple

import pyro
import torch

from . import bernoulli_mixture, gmm, hmm, kmeans, poisson_mixture, topic, vae

__all__ = ["REGISTRY"]

D = torch.float64


def _gmm_data(seed: int) -> Tuple[tuple, Dict[str, Any]]:
    phi = torch.tensor([0.3, 0.3, 0.4], dtype=D)
    mu = torch.tensor([[-3.0, 0.0], [3.0, 0.0], [0.0, 3.0]], dtype=D)
    Sigma = torch.tensor([[[1.0, 0.3], [0.3, 0.5]], [[0.6, 0.0], [0.0, 1.0]], [[0.8, -0.2], [-0.2, 0.8]]], dtype=D)
    x, _ = gmm.generate(150, phi, mu, Sigma, seed=seed)
    return (x,), {"k": 3}


def _kmeans_data(seed: int) -> Tuple[tuple, Dict[str, Any]]:
    mu = torch.tensor([[-3.0, 0.0], [3.0, 0.0], [0.0, 4.0]], dtype=D)
    x, _ = kmeans.generate(150, mu, seed=seed)
    return (x,), {"k": 3}


def _bernoulli_data(seed: int) -> Tuple[tuple, Dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(3, 16, generator=g, dtype=D) ** 2  # sparse-ish binary patterns
    x, _ = bernoulli_mixture.generate(150, torch.full((3,), 1 / 3, dtype=D), p, seed=seed)
    return (x,), {"k": 3}


def _poisson_data(seed: int) -> Tuple[tuple, Dict[str, Any]]:
    rate = torch.tensor([[1.0, 8.0], [5.0, 5.0], [10.0, 1.0]], dtype=D)
    x, _ = poisson_mixture.generate(150, torch.tensor([0.3, 0.4, 0.3], dtype=D), rate, seed=seed)
    return (x,), {"k": 3}


def _hmm_data(seed: int) -> Tuple[tuple, Dict[str, Any]]:
    params = {"pi": torch.tensor([0.5, 0.5], dtype=D), "A": torch.tensor([[0.9, 0.1], [0.2, 0.8]], dtype=D),
              "mu": torch.tensor([[-1.5, 0.0], [1.5, 1.0]], dtype=D), "sigma": torch.full((2, 2), 0.8, dtype=D)}
    x, _ = hmm.generate(8, **params, num_sequences=4, seed=seed)  # (4, 8, 2): a short chain keeps SVI fast
    return (x,), {"k": 2}


def _topic_data(seed: int) -> Tuple[tuple, Dict[str, Any]]:
    beta = torch.full((2, 10), 0.02, dtype=D)
    beta[0, :5] = beta[1, 5:] = 0.18
    theta = torch.tensor([[0.9, 0.1], [0.1, 0.9]], dtype=D).repeat(5, 1)  # (10, 2)
    words, doc, _ = topic.generate([20] * 10, theta, beta / beta.sum(-1, keepdim=True), seed=seed)
    return (words, doc), {"k": 2, "num_docs": 10, "vocab_size": 10}


def _vae_data(seed: int) -> Tuple[tuple, Dict[str, Any]]:
    """Images drawn from the VAE itself (a random decoder, run forward); a fresh decoder to fit."""
    with pyro.get_param_store().scope(), torch.random.fork_rng():
        torch.manual_seed(seed)
        truth = vae.Decoder(z_dim=2, hidden=16, x_dim=16)
        placeholder = torch.zeros(64, 16)  # fixes n and D; never observed
        tr = pyro.poutine.trace(pyro.poutine.uncondition(vae.model)).get_trace(placeholder, truth)
        decoder = vae.Decoder(z_dim=2, hidden=16, x_dim=16)
    return (tr.nodes["x"]["value"].detach(), decoder), {}


def _entry(module, methods: Tuple[str, ...], make_data, description: str, model=None) -> Dict[str, Any]:
    return {"module": module, "model": module.model if model is None else model, "methods": methods,
            "make_data": make_data, "description": description}


REGISTRY: Dict[str, Dict[str, Any]] = {
    "gmm": _entry(gmm, ("em", "hard_em", "svi", "vae"), _gmm_data,
                  "Gaussian mixture (full, diag, spherical or tied Sigma_j); GDA with labels."),
    "kmeans": _entry(kmeans, ("hard_em", "em", "svi", "vae"), _kmeans_data,
                     "k-means as a fixed isotropic mixture: hard EM is Lloyd; cosine variant."),
    "bernoulli_mixture": _entry(bernoulli_mixture, ("em", "hard_em", "svi", "vae"), _bernoulli_data,
                                "Mixture of multivariate Bernoullis for binary vectors."),
    "poisson_mixture": _entry(poisson_mixture, ("em", "hard_em", "svi", "vae"), _poisson_data,
                              "Mixture of Poissons for count vectors."),
    # No "vae": an HMM's z_t depends on the whole sequence, not on its own x_t alone.
    "hmm": _entry(hmm, ("em", "hard_em", "svi"), _hmm_data,
                  "Hidden Markov model with diagonal Gaussian emissions (Baum-Welch under EM)."),
    "hmm_vectorized": _entry(hmm, ("em", "hard_em", "svi"), _hmm_data,
                             "The same HMM with the chain as one DiscreteHMM site: no loop over time.",
                             model=hmm.vectorized_model),
    # No "vae": a word id is a poor encoder input; the posterior of z_{d,m} needs theta_d too.
    "topic": _entry(topic, ("em", "svi"), _topic_data,
                    "Topic model (PLSA): per-document topic weights, per-topic word distributions."),
    # Continuous z^(i): no exact E-step, so only the amortized guide (AutoAmortized) fits it.
    "vae": _entry(vae, ("vae",), _vae_data, "Variational autoencoder for binary images: x ~ Bernoulli(f(z))."),
}
