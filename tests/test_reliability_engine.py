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


def test_m_steps_update_the_stores_tensors_in_place_and_keep_nothing_else_alive():
    """The closed forms write each parameter into the unconstrained tensor the store already holds: the
    same tensor (an optimizer's reference stays valid) and no new one per step in the store's
    tensor-to-name map (which would keep every step's parameters alive)."""
    x = load_old_faithful()
    em = ppl_em.EM(gmm.model, reg_covar=1e-6)
    em.step(x, 3, init=gmm.init_params(x, 3))
    store = pyro.get_param_store()
    before = dict(store.named_parameters())
    values = snapshot()
    for _ in range(5):
        em.step(x, 3)
    after = dict(store.named_parameters())
    assert all(after[name] is before[name] for name in before)
    assert len(store._param_to_name) == len(before)
    assert all(not torch.equal(store[name].detach(), values[name]) for name in values)  # EM moved them


@pytest.mark.parametrize("bad", ["singular", "nan"])
def test_an_m_step_writes_all_of_its_parameters_or_none(bad):
    """maximize from statistics whose Sigma update is singular (one point in a component, reg_covar = 0) or
    not finite raises and leaves phi and mu, whose updates come first and are fine, as they were."""
    x = load_old_faithful()
    em = ppl_em.EM(gmm.model, reg_covar=0.0)
    em.step(x, 2, init=gmm.init_params(x, 2))
    stats = em.summarize(x, 2)
    key = next(k for k in stats.sums if k.endswith(".M"))  # the Gaussian group's second moments
    stats.sums[key] = torch.zeros_like(stats.sums[key]) if bad == "singular" else stats.sums[key] * math.nan
    before = snapshot()
    with pytest.raises((ValueError, FloatingPointError), match="(?i)singular|not finite"):
        em.maximize(stats)
    assert_same(before, snapshot())
