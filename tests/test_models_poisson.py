"""models/poisson_mixture.py against a direct numpy EM."""

import numpy as np
import pytest
import torch
from scipy.special import gammaln, logsumexp

import ppl_em
from ppl_em.models import poisson_mixture

D = torch.float64


def _numpy_em(x, phi, rate, steps):
    """Direct EM for a Poisson mixture. Yields (log p(x) before the update, phi, rate after it)."""
    for _ in range(steps):
        log_joint = np.log(phi) + x @ np.log(rate).T - rate.sum(1) - gammaln(x + 1).sum(1, keepdims=True)  # (n, k)
        log_px = logsumexp(log_joint, 1)
        w = np.exp(log_joint - log_px[:, None])
        nk = w.sum(0)
        phi, rate = nk / len(x), (w.T @ x) / nk[:, None]
        yield log_px.sum(), phi, rate


def _counts():
    phi = torch.tensor([0.2, 0.5, 0.3], dtype=D)
    rate = torch.tensor([[1.0, 9.0], [4.0, 4.0], [12.0, 0.5]], dtype=D)
    return phi, rate, *poisson_mixture.generate(400, phi, rate, seed=3)


def test_em_equals_a_direct_numpy_em():
    _, _, x, _ = _counts()
    init = poisson_mixture.init_params(x, 3, seed=2)
    em = ppl_em.EM(poisson_mixture.model)
    for log_px, phi, rate in _numpy_em(x.numpy(), init["phi"].numpy(), init["rate"].numpy(), steps=15):
        loss = em.step(x, 3, init=init)
        np.testing.assert_allclose(-loss, log_px, rtol=1e-10)
        np.testing.assert_allclose(em.params["phi"].numpy(), phi, rtol=1e-9)
        np.testing.assert_allclose(em.params["rate"].numpy(), rate, rtol=1e-9)
    assert em.explain()["rate"] == "closed form: Poisson.rate at site x"


def test_parameters_are_recovered_from_data_drawn_from_the_model():
    phi, rate, x, z = _counts()
    assert x.shape == (400, 2) and (x == x.round()).all() and (x >= 0).all()
    em = ppl_em.EM(poisson_mixture.model)
    for _ in range(60):
        em.step(x, 3)
    order = em.params["rate"][:, 0].argsort()  # undo label switching: components by first rate
    assert torch.allclose(em.params["rate"][order], rate, rtol=0.25, atol=0.3)
    assert torch.allclose(em.params["phi"][order], phi, atol=0.06)


def test_non_count_data_is_a_clear_error():
    em = ppl_em.EM(poisson_mixture.model)
    with pytest.raises(ValueError, match="nonnegative integer counts.*min -1.0"):
        em.step(torch.tensor([[1.0], [-1.0]], dtype=D))
    with pytest.raises(ValueError, match="nonnegative integer counts.*torch.int64.*x.double"):
        em.step(torch.tensor([[1], [2]]))
