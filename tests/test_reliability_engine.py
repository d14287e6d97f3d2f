"""The reliability promises for a direct EM.step call (no ppl_em.fit around it).

fit explains a failed EM step itself (tests/test_reliability_fit.py); these tests hold the
engine to the same promises: the first non-finite log p(x) raises naming the site, a singular
update raises a diagnostic in scikit-learn's spirit, one observation does not divide by zero,
and every failure leaves the parameters of the last good iteration in the store.
"""

import math

import pyro
import pytest
import torch

import ppl_em
from ppl_em.datasets import load_old_faithful
from ppl_em.models import gmm, poisson_mixture

from test_reliability_fit import assert_same, nan_model, penalty_model, snapshot

D = torch.float64


@pytest.mark.parametrize("posterior", ["exact", "hard"])
def test_em_step_raises_on_a_nan_log_likelihood_naming_the_site(posterior):
    x = torch.tensor([-2.1, -1.9, 3.5, 2.2], dtype=D)
    em = ppl_em.EM(nan_model, posterior=posterior)
    pyro.param("phi", torch.ones(2, dtype=D) / 2, constraint=torch.distributions.constraints.simplex)
    pyro.param("mu", torch.tensor([-1.0, 1.0], dtype=D))
    before = snapshot()
    with pytest.raises(FloatingPointError, match="site 'x'"):
        em.step(x)
    assert_same(before, snapshot())


def test_em_step_raises_on_a_nan_factor_and_keeps_finite_parameters():
    x = torch.tensor([-2.0, 2.0], dtype=D)
    em = ppl_em.EM(penalty_model)
    with pyro.validation_enabled(False):
        with pytest.raises(FloatingPointError, match="site 'penalty'"):
            em.step(x)
    assert all(torch.isfinite(v).all() for v in snapshot().values())


@pytest.mark.parametrize("n_copies", [10, 30])
def test_em_step_reports_a_singular_covariance_in_scikit_learns_spirit(n_copies):
    x = load_old_faithful()[::4]
    x = torch.cat([x, x[:1].repeat(n_copies, 1)]) if n_copies == 30 else x[:1].repeat(n_copies, 1)
    em = ppl_em.EM(gmm.model, reg_covar=0.0)
    last = None
    with pytest.raises((ValueError, FloatingPointError), match="(?i)singular.*reg_covar"):
        for _ in range(50):
            em.step(x, 6 if n_copies == 30 else 2)
            last = snapshot()
    assert all(torch.isfinite(v).all() for v in snapshot().values())
    if last is not None:
        assert_same(last, snapshot())


def test_em_step_on_one_observation():
    one = torch.tensor([[3.0, 4.0]], dtype=D)
    loss = ppl_em.EM(poisson_mixture.model).step(one, 1)
    assert math.isfinite(loss)
    init = {"phi": torch.ones(1, dtype=D), "mu": one.clone(), "Sigma": torch.eye(2, dtype=D)[None]}
    pyro.clear_param_store()
    em = ppl_em.EM(gmm.model)
    assert math.isfinite(em.step(one, 1, init))
    torch.testing.assert_close(em.params["mu"], one)
