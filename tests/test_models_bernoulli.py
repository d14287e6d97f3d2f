"""models/bernoulli_mixture.py against a direct numpy EM on binarised digits."""

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

import ppl_em
from ppl_em.datasets import load_digits
from ppl_em.models import bernoulli_mixture

D = torch.float64


def _numpy_em(x, phi, p, steps):
    """Direct EM for a Bernoulli mixture. Yields (log p(x) before the update, phi, p after it).

    p is clamped to [eps, 1 - eps] inside the logarithms, as torch's Bernoulli does.
    """
    eps = np.finfo(x.dtype).eps
    for _ in range(steps):
        pc = np.clip(p, eps, 1 - eps)
        log_joint = np.log(phi) + x @ np.log(pc).T + (1 - x) @ np.log1p(-pc).T  # (n, k)
        log_px = logsumexp(log_joint, 1)  # (n,)
        w = np.exp(log_joint - log_px[:, None])  # w_j^(i)
        nk = w.sum(0)
        phi, p = nk / len(x), (w.T @ x) / nk[:, None]
        yield log_px.sum(), phi, p


def test_em_on_binarised_digits_equals_a_direct_numpy_em():
    images, _ = load_digits()  # binarised at 8, (1797, 64), with some always-0 pixels
    x = images[:150]
    init = bernoulli_mixture.init_params(x, 4, seed=1)
    em = ppl_em.EM(bernoulli_mixture.model)
    for log_px, phi, p in _numpy_em(x.numpy(), init["phi"].numpy(), init["p"].numpy(), steps=12):
        loss = em.step(x, 4, init=init)
        np.testing.assert_allclose(-loss, log_px, rtol=1e-10)
        np.testing.assert_allclose(em.params["phi"].numpy(), phi, rtol=1e-9)
        np.testing.assert_allclose(em.params["p"].numpy(), p, rtol=1e-9, atol=1e-13)
    # A pixel never on in a cluster has MLE 0 (stored as ~1e-308: the constraint is a sigmoid).
    assert (em.params["p"] < 1e-300).any()
    assert em.explain() == {"phi": "closed form: Categorical.probs at site z",
                            "p": "closed form: Bernoulli.probs at site x"}


def test_parameters_are_recovered_from_data_drawn_from_the_model():
    phi = torch.tensor([0.35, 0.65], dtype=D)
    p = torch.tensor([[0.9, 0.9, 0.8, 0.1, 0.2, 0.1], [0.1, 0.2, 0.1, 0.9, 0.7, 0.8]], dtype=D)
    x, z = bernoulli_mixture.generate(3000, phi, p, seed=4)
    assert x.shape == (3000, 6) and set(x.unique().tolist()) == {0.0, 1.0}
    em = ppl_em.EM(bernoulli_mixture.model)
    for _ in range(30):
        em.step(x, 2)
    got = em.params
    order = got["p"][:, 0].argsort(descending=True)  # undo label switching
    assert torch.allclose(got["phi"][order], phi, atol=0.03)
    assert torch.allclose(got["p"][order], p, atol=0.05)


def test_non_binary_data_is_a_clear_error():
    with pytest.raises(ValueError, match="x must be binary.*found the value 3.0.*Poisson mixture"):
        ppl_em.EM(bernoulli_mixture.model).step(torch.tensor([[0.0, 1.0], [3.0, 1.0]], dtype=D))
