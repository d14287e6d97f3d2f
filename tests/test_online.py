"""Online (stepwise) EM against batch EM.

Oracles: with gamma_t = 1 and the whole data as every batch, stepwise EM is batch EM step for step;
the recursion s_t = (1 - gamma_t) s_{t-1} + gamma_t (n / m) S(batch_t) computed by hand from
EM.summarize; on synthetic data, stepwise EM reaches batch EM's optimum of log p(x) (run to convergence):
to within the noise of its step size, and with Polyak-Ruppert averaging of the iterates much closer.
"""

import math
import warnings

import pyro
import pytest
import torch

import ppl_em
from ppl_em import OnlineEM
from ppl_em.models import gmm, poisson_mixture
from ppl_em.store import capture_store, replace_store

D = torch.float64



def gmm_data(n=20000, seed=0):
    phi = torch.tensor([0.3, 0.3, 0.4], dtype=D)
    mu = torch.tensor([[-4.0, 0.0], [4.0, 0.0], [0.0, 4.0]], dtype=D)
    Sigma = torch.tensor([[[1.0, 0.3], [0.3, 0.8]], [[0.9, -0.2], [-0.2, 1.0]], [[1.0, 0.0], [0.0, 0.6]]], dtype=D)
    x, _ = gmm.generate(n, phi, mu, Sigma, seed=seed)
    return x


START = {"phi": torch.full((3,), 1 / 3, dtype=D), "mu": torch.tensor([[-1.0, -1.0], [1.0, -1.0], [0.0, 1.0]], dtype=D),
         "Sigma": torch.eye(2, dtype=D).expand(3, 2, 2).clone()}


def batch_em_optimum(model, x, k, init, tol=1e-10, max_iter=2000):
    pyro.clear_param_store()
    em = ppl_em.EM(model)
    losses = [em.step(x, k, init)]
    while len(losses) < max_iter:
        losses.append(em.step(x, k, init))
        if abs(losses[-2] - losses[-1]) < tol * len(x):
            break
    return em.log_likelihood(x, k, init) / len(x), em.params


def test_with_unit_step_size_and_the_whole_data_it_is_batch_em():
    x = gmm_data(3000)
    pyro.clear_param_store()
    em = ppl_em.EM(gmm.model)
    batch = [em.step(x, 3, START) for _ in range(6)]
    expected = em.params
    pyro.clear_param_store()
    online = OnlineEM(gmm.model, step_size=lambda t: 1.0, n=len(x), warmup=1)
    stepwise = [online.partial_fit(x, 3, START) for _ in range(6)]
    assert stepwise == pytest.approx(batch, rel=1e-12)
    for name, value in expected.items():
        torch.testing.assert_close(online.params[name], value, rtol=1e-12, atol=1e-12)


def test_the_recursion_is_the_decaying_average_of_scaled_batch_statistics():
    x = gmm_data(4000, seed=1)
    batches = [x[i:i + 500] for i in range(0, 4000, 500)]
    pyro.clear_param_store()
    online = OnlineEM(gmm.model, n=len(x), warmup=1000)
    for b in batches[:2]:  # warm-up: 1000 rows, then the first M-step from their statistics scaled to n
        online.partial_fit(b, 3, START)
    assert online.t == 1
    for t, b in enumerate(batches[2:5], start=1):
        state = capture_store()
        before = online.stats
        expected_stats = online.em.summarize(b, 3, START)
        gamma = (online.t + 2.0) ** -0.6  # t = 1, 2, ...: the M-steps made so far (the warm-up's is the first)
        expected = (1 - gamma) * before + (gamma * len(x) / 500) * expected_stats
        online.partial_fit(b, 3, START)
        assert float(online.stats.n) == pytest.approx(float(expected.n), rel=1e-12) == len(x)
        for key, value in expected.sums.items():
            torch.testing.assert_close(online.stats.sums[key], value, rtol=1e-12, atol=1e-9)
        replace_store(state)  # theta_t = maximize(s_t): the batch M-step on the recursion's statistics
        online.em.maximize(expected)
        assert all(torch.allclose(online.params[k], v, rtol=1e-12) for k, v in online.em.params.items())
        online.em.maximize(online.stats)


def test_no_m_step_before_the_warm_up():
    x = gmm_data(2000, seed=2)
    pyro.clear_param_store()
    online = OnlineEM(gmm.model, n=len(x), warmup=900)
    online.partial_fit(x[:400], 3, START)
    online.partial_fit(x[400:800], 3, START)
    assert online.t == 0 and torch.equal(pyro.param("mu").detach(), START["mu"])
    online.partial_fit(x[800:1200], 3, START)
    assert online.t == 1 and not torch.equal(pyro.param("mu").detach(), START["mu"])


@pytest.mark.parametrize("average, gap", [(False, 3e-4), (True, 2e-5)])
def test_reaches_the_optimum_of_batch_em_on_a_gmm(average, gap):
    """6 passes of 40 batches; averaging from the second pass on."""
    x = gmm_data()
    best, truth = batch_em_optimum(gmm.model, x, 3, START)
    pyro.clear_param_store()
    online = OnlineEM(gmm.model, batch_size=500, n=len(x), average=average and 40, seed=0)
    for _ in range(6):
        online.step(x, 3, START)
    online.finish()
    reached = ppl_em.EM(gmm.model).log_likelihood(x, 3, START) / len(x)
    assert best - gap < reached <= best + 1e-9
    torch.testing.assert_close(online.params["mu"], truth["mu"], atol=0.03, rtol=0)


def test_reaches_the_optimum_of_batch_em_on_a_mixture_of_counts():
    rate = torch.tensor([[1.0, 8.0], [5.0, 5.0], [10.0, 1.0]], dtype=D)
    x, _ = poisson_mixture.generate(20000, torch.tensor([0.3, 0.4, 0.3], dtype=D), rate, seed=3)
    init = {"phi": torch.full((3,), 1 / 3, dtype=D), "rate": torch.tensor([[2.0, 6.0], [4.0, 4.0], [6.0, 2.0]], dtype=D)}
    best, _ = batch_em_optimum(poisson_mixture.model, x, 3, init)
    pyro.clear_param_store()
    online = OnlineEM(poisson_mixture.model, batch_size=500, n=len(x), average=40)
    for _ in range(6):
        online.step(x, 3, init)
    online.finish()
    reached = ppl_em.EM(poisson_mixture.model).log_likelihood(x, 3, init) / len(x)
    assert best - 2e-5 < reached <= best + 1e-9


def test_partial_fit_on_a_stream_that_cannot_be_replayed():
    def stream():
        for seed in range(30):
            yield gmm_data(500, seed=100 + seed)

    pyro.clear_param_store()
    online = OnlineEM(gmm.model, warmup=1000)
    losses = [online.partial_fit(batch, 3, START) for batch in stream()]
    assert online.t == 29 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    truth = torch.tensor([[-4.0, 0.0], [4.0, 0.0], [0.0, 4.0]], dtype=D)
    assert torch.allclose(online.params["mu"][torch.cdist(truth, online.params["mu"]).argmin(-1)], truth, atol=0.1)


def test_fit_with_method_online_em():
    x = gmm_data(6000, seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ppl_em.ConvergenceWarning)
        result = ppl_em.fit(gmm.model, x, 3, method="online_em", batch_size=500, max_iter=8, progress=False,
                            em_options={"average": 20})
        batch = ppl_em.fit(gmm.model, x, 3, max_iter=300, tol=1e-9, progress=False)
    assert result.method == "online_em" and result.n_iter <= 8
    assert result.log_likelihood == pytest.approx(batch.log_likelihood, abs=1e-4)
    assert result.score() == pytest.approx(result.log_likelihood, rel=1e-12)


@pytest.mark.parametrize("options, message", [
    ({"step_size": 0.4}, r"step_size must be an exponent a in \(0.5, 1\].*got 0.4"),
    ({"step_size": lambda t: 2.0}, r"step_size\(t\) must lie in \(0, 1\]; step_size\(1\) = 2.0"),
    ({"batch_size": 0}, "batch_size must be a positive int, got 0"),
    ({"average": -1}, "average must be a bool or an M-step number >= 0, got -1"),
])
def test_options_are_checked(options, message):
    with pytest.raises(ValueError, match=message):
        OnlineEM(gmm.model, **options)


def test_partial_fit_takes_a_batch_not_a_source():
    with pytest.raises(ValueError, match="partial_fit takes one batch.*online.step"):
        OnlineEM(gmm.model).partial_fit(ppl_em.Batches([gmm_data(10)]), 3)
