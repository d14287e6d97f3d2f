"""The fit loop against its oracles: the engine's own loop, best-of-restarts, D^2 sampling, tol."""

import importlib
import itertools
import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints

import ppl_em
from ppl_em.datasets import load_old_faithful
from ppl_em.fit import initialise, kmeans_plus_plus
from ppl_em.models import REGISTRY, gmm

D = torch.float64



def faithful(step=4):
    return load_old_faithful()[::step]  # (68, 2)


def quiet_fit(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ppl_em.ConvergenceWarning)
        return ppl_em.fit(*args, progress=False, **kwargs)


def test_em_fit_is_the_engine_loop_from_the_same_start():
    x = faithful()
    result = ppl_em.fit(gmm.model, x, 2, init="prior", tol=1e-8, progress=False)
    pyro.clear_param_store()
    em = ppl_em.EM(gmm.model)
    losses = [em.step(x, 2) for _ in range(result.n_iter)]
    assert result.losses == pytest.approx(losses, rel=1e-12)
    for name, value in em.params.items():
        torch.testing.assert_close(result.params[name], value)
    # The final E-step: the result's log-likelihood is log p(x) at the returned parameters.
    assert result.log_likelihood == pytest.approx(float(em.e_step(x, 2).log_evidence) / len(x), rel=1e-12)
    assert result.converged and abs(losses[-1] - losses[-2]) / len(x) < 1e-8
    assert abs(losses[-2] - losses[-3]) / len(x) >= 1e-8  # it stopped at the first change below tol


def test_history_records_every_iteration_and_log_px_never_decreases():
    x = faithful()
    result = ppl_em.fit(gmm.model, x, 3, max_iter=200, progress=False)
    assert [h["iteration"] for h in result.history] == list(range(1, result.n_iter + 1))
    assert [h["loss"] for h in result.history] == result.losses
    times = [h["time"] for h in result.history]
    assert all(b >= a for a, b in zip(times, times[1:])) and times[0] > 0
    log_px = [-loss for loss in result.losses]
    assert all(b >= a - 1e-9 * abs(a) for a, b in zip(log_px, log_px[1:]))
    assert result.method == "em" and result.n_data == len(x)


def test_restarts_keep_the_best_and_leave_it_in_the_param_store():
    x = load_old_faithful()[::2]
    result = quiet_fit(gmm.model, x, 3, init="random", n_init=4, max_iter=40, tol=1e-4, seed=0)
    scores = [r["log_likelihood"] for r in result.restarts]
    assert len({round(s, 6) for s in scores}) > 1, "the restarts should reach different optima"
    assert result.best == max(range(4), key=scores.__getitem__)
    assert result.log_likelihood == max(scores)
    assert result.restarts[result.best]["seed"] == result.best  # restart r runs with seed + r
    store = pyro.get_param_store()
    assert set(store.keys()) == set(result.params)
    for name, value in result.params.items():
        torch.testing.assert_close(store[name].detach(), value)
    # Oracle: the kept restart, rerun alone with its seed, gives the same parameters.
    alone = quiet_fit(gmm.model, x, 3, init="random", max_iter=40, tol=1e-4, seed=result.best)
    for name, value in result.params.items():
        torch.testing.assert_close(alone.params[name], value)
    assert result.score() == pytest.approx(result.log_likelihood, rel=1e-12)


@pytest.mark.parametrize("method", ["em", "hard_em"])
def test_restarts_share_one_plan_and_each_equals_its_fit_alone(method, monkeypatch):
    """EM's restarts reuse the traced model, chunking and M-step plan (made once), and restart r is
    still exactly the fit alone with seed + r."""
    plans = []
    original = ppl_em.em.make_plan
    monkeypatch.setattr(ppl_em.em, "make_plan", lambda *a, **k: plans.append(1) or original(*a, **k))
    x = load_old_faithful()[::2]
    result = quiet_fit(gmm.model, x, 3, method=method, init="random", n_init=3, max_iter=30, tol=1e-6, seed=5)
    assert len(plans) == 1
    for r, restart in enumerate(result.restarts):
        alone = quiet_fit(gmm.model, x, 3, method=method, init="random", max_iter=30, tol=1e-6, seed=5 + r)
        assert restart["n_iter"] == alone.n_iter
        assert restart["log_likelihood"] == pytest.approx(alone.log_likelihood, rel=1e-12)
        assert restart["final_loss"] == pytest.approx(alone.losses[-1] / len(x), rel=1e-12)


def _drawn_start_model(x, k):
    """A mixture whose start is drawn (torch initialisers, a global latent's prior draw for MAP-EM)."""
    w = pyro.param("w", torch.rand(k, dtype=x.dtype) + 0.5, constraint=constraints.simplex)
    mu = pyro.param("mu", 2.0 * torch.randn(k, x.shape[1], dtype=x.dtype))
    scale = pyro.sample("scale", dist.LogNormal(torch.tensor(0.0, dtype=x.dtype), 1.0))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(w), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(mu[z], scale).to_event(1), obs=x)


def test_restarts_look_at_the_model_once_and_a_drawn_start_equals_its_fit_alone(monkeypatch):
    """The model's structure is found once per fit (at the first restart's initialisation, handed to EM) and
    that look consumes no randomness: restart r of a model whose initialisers draw is the fit alone with seed + r."""
    looks = []
    fit_module = importlib.import_module("ppl_em.fit")  # (ppl_em.fit is the function)
    original = fit_module.inspect_model
    spy = lambda *a, **k: looks.append(1) or original(*a, **k)
    monkeypatch.setattr(fit_module, "inspect_model", spy)
    monkeypatch.setattr(ppl_em.em, "inspect_model", spy)
    x = load_old_faithful()[::4]
    x = (x - x.mean(0)) / x.std(0)
    result = quiet_fit(_drawn_start_model, x, 3, init="prior", n_init=3, max_iter=20, tol=1e-6, seed=11)
    assert len(looks) == 1
    starts = [restart["final_loss"] for restart in result.restarts]
    assert len(set(starts)) == 3  # the draws differ between restarts
    for r, restart in enumerate(result.restarts):
        looks.clear()
        alone = quiet_fit(_drawn_start_model, x, 3, init="prior", max_iter=20, tol=1e-6, seed=11 + r)
        assert len(looks) == 1
        assert restart["n_iter"] == alone.n_iter
        assert restart["final_loss"] == pytest.approx(alone.losses[-1] / len(x), rel=1e-12)
        assert restart["log_likelihood"] == pytest.approx(alone.log_likelihood, rel=1e-12)


def test_a_reset_em_object_runs_as_a_new_one():
    x = faithful()
    em = ppl_em.EM(gmm.model)
    first = [em.step(x, 2) for _ in range(5)]
    pyro.clear_param_store()
    em.reset()
    assert em.iterations == 0
    again = [em.step(x, 2) for _ in range(5)]
    assert again == pytest.approx(first, rel=1e-12) and em.iterations == 5
    pyro.clear_param_store()
    fresh = ppl_em.EM(gmm.model)
    assert [fresh.step(x, 2) for _ in range(5)] == pytest.approx(first, rel=1e-12)


def test_convergence_warning_when_max_iter_is_too_small():
    assert issubclass(ppl_em.ConvergenceWarning, UserWarning)
    with pytest.warns(ppl_em.ConvergenceWarning, match=r"did not converge \(it reached max_iter=2.*n_init"):
        result = ppl_em.fit(gmm.model, faithful(), 2, max_iter=2, progress=False)
    assert not result.converged and result.n_iter == 2 and len(result.history) == 2


def test_random_and_kmeanspp_place_the_means_on_distinct_data_rows():
    x = faithful()
    for init in ("random", "kmeans++"):
        pyro.clear_param_store()
        pyro.set_rng_seed(3)
        chosen = initialise(gmm.model, (x, 3), {}, init, seed=3)
        mu = pyro.param("mu").detach()
        assert chosen == ["mu"]
        rows = [int(((x - m).abs().sum(-1) == 0).nonzero()[0]) for m in mu]  # each mean is a data row
        assert len(set(rows)) == 3
    expected = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(5))[:2]]
    result = quiet_fit(gmm.model, x, 2, init="random", seed=5, max_iter=1)
    assert result.init == {"strategy": "random", "params": ["mu"]}
    pyro.clear_param_store()
    em = ppl_em.EM(gmm.model)  # one EM step from exactly those rows reproduces the fit
    pyro.param("mu", expected.clone())
    em.step(x, 2)
    torch.testing.assert_close(result.params["mu"], em.params["mu"])


def test_kmeanspp_draws_rows_with_probability_proportional_to_squared_distance():
    rows = torch.tensor([[0.0], [1.0], [3.0], [7.0]], dtype=D)
    draws = 4000
    g = torch.Generator().manual_seed(0)
    counts = {}
    for _ in range(draws):
        pair = tuple(kmeans_plus_plus(rows, 2, g).tolist())
        counts[pair] = counts.get(pair, 0) + 1
    # Brute force: first row uniform, second with probability D^2 / sum D^2.
    for a, b in itertools.permutations(range(4), 2):
        d2 = (rows - rows[a]).pow(2).sum(-1)
        p = 0.25 * float(d2[b] / d2.sum())
        se = math.sqrt(p * (1 - p) / draws)
        assert abs(counts.get((a, b), 0) / draws - p) < 4 * se + 1e-3, (a, b)


def bernoulli_mixture(x, k=2):
    phi = pyro.param("phi", torch.full((k,), 1.0 / k, dtype=D), constraint=constraints.simplex)
    probs = pyro.param("probs", torch.full((k, x.shape[1]), 0.5, dtype=D), constraint=constraints.unit_interval)
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(phi))
        pyro.sample("x", dist.Bernoulli(probs[z]).to_event(1), obs=x)


def test_init_is_generic_probabilities_start_inside_the_open_interval():
    torch.manual_seed(0)
    x = (torch.rand(30, 5, dtype=D) < 0.3).to(D)
    x[:, 4] = 0  # a column that is never 1: blended with the mean it would still be 0
    result = quiet_fit(bernoulli_mixture, x, 3, init="random", seed=2, max_iter=1)
    assert result.init["params"] == ["probs"]
    pick = torch.randperm(30, generator=torch.Generator().manual_seed(2))[:3]
    start = (0.5 * x[pick] + 0.5 * x.mean(0)).clamp(1e-3, 1 - 1e-3)
    pyro.clear_param_store()
    pyro.param("probs", start, constraint=constraints.unit_interval)
    em = ppl_em.EM(bernoulli_mixture)
    em.step(x, 3)
    torch.testing.assert_close(result.params["probs"], em.params["probs"])


def test_prior_init_uses_the_models_initialisers_seeded():
    def model(x):
        mu = pyro.param("mu", lambda: torch.randn(2, dtype=D))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(torch.tensor([0.5, 0.5], dtype=D)))
            pyro.sample("x", dist.Normal(mu[z], 1.0), obs=x)

    x = torch.tensor([-2.0, -1.0, 1.0, 2.0], dtype=D)
    a = quiet_fit(model, x, init="prior", seed=7, max_iter=1)
    b = quiet_fit(model, x, init="prior", seed=7, max_iter=1)
    c = quiet_fit(model, x, init="prior", seed=8, max_iter=1)
    assert a.init["params"] == [] and torch.equal(a.params["mu"], b.params["mu"])
    assert not torch.equal(a.params["mu"], c.params["mu"])


def test_too_few_rows_for_k_is_a_clear_error():
    with pytest.raises(ValueError, match="k = 3 components, but the data have only n = 2 observations.*k <= 2"):
        ppl_em.fit(kmeans_like, torch.tensor([[0.0], [1.0]], dtype=D), 3, progress=False)


def kmeans_like(x, k):
    mu = pyro.param("mu", torch.zeros(k, x.shape[1], dtype=D))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(torch.ones(k, dtype=D) / k))
        pyro.sample("x", dist.Normal(mu[z], 1.0).to_event(1), obs=x)


@pytest.mark.parametrize("options, message", [
    ({"method": "gibbs"}, "method must be one of"),
    ({"init": "farthest"}, "init must be one of"),
    ({"n_init": 0}, "n_init must be an integer >= 1"),
    ({"max_iter": 0}, "max_iter must be an integer >= 1"),
    ({"tol": -1.0}, "tol must be >= 0"),
    ({"method": "em", "guide": object()}, "takes no guide"),
])
def test_bad_options_are_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        ppl_em.fit(gmm.model, faithful(), 2, progress=False, **options)


def test_a_model_without_observations_is_a_clear_error():
    def prior_only():
        pyro.sample("z", dist.Categorical(torch.ones(2) / 2))

    with pytest.raises(ValueError, match="no observed sample site"):
        ppl_em.fit(prior_only, progress=False)


def test_svi_reaches_the_em_optimum_and_records_exact_log_px():
    from ppl_em.guides import AutoCategorical

    x = faithful()
    em = ppl_em.fit(gmm.model, x, 2, progress=False)
    svi = quiet_fit(gmm.model, x, 2, method="svi", max_iter=250, log_px_every=50,
                    optim=pyro.optim.Adam({"lr": 0.2}))
    assert svi.method == "svi" and isinstance(svi.guide, AutoCategorical)
    assert svi.log_likelihood == pytest.approx(em.log_likelihood, abs=2e-3)
    assert svi.score() == pytest.approx(svi.log_likelihood, rel=1e-12)
    recorded = [h for h in svi.history if "log_px" in h]
    assert [h["iteration"] for h in recorded] == [1] + list(range(50, 251, 50))
    for h in recorded:  # ELBO <= log p(x): the ELBO here is exact (enumerated), so no noise
        assert -h["loss"] / svi.n_data <= h["log_px"] + 1e-9
    # Guide parameters are in the result but are no model parameters.
    assert "AutoCategorical.z" in svi.params and svi.n_parameters() == em.n_parameters()
    assert svi.elbo() <= svi.score() + 1e-9


def test_vae_guide_and_restarts_with_a_guide_class():
    from ppl_em.guides import AutoAmortized, AutoCategorical

    x = faithful()
    result = quiet_fit(gmm.model, x, 2, method="vae", max_iter=30)
    assert isinstance(result.guide, AutoAmortized) and result.n_iter == 30
    assert math.isfinite(result.score())
    two = quiet_fit(gmm.model, x, 2, method="svi", guide=AutoCategorical, n_init=2, max_iter=20)
    assert len(two.restarts) == 2 and two.guide is not None
    with pytest.raises(ValueError, match="guide instance cannot be reset"):
        ppl_em.fit(gmm.model, x, 2, method="svi", guide=AutoCategorical(gmm.model), n_init=2, progress=False)


def test_a_diverging_svi_run_stops_keeps_finite_parameters_and_warns():
    def model(x):
        mu = pyro.param("mu", torch.tensor([-1.0, 1.0], dtype=D))
        log_s = pyro.param("log_s", torch.tensor(0.0, dtype=D))  # exp overflows once log_s is huge
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(torch.tensor([0.5, 0.5], dtype=D)))
            pyro.sample("x", dist.Normal(mu[z], log_s.exp()), obs=x)

    x = torch.tensor([-30.0, -20.0, 20.0, 30.0], dtype=D)
    with pyro.validation_enabled(False), pytest.warns(ppl_em.ConvergenceWarning, match="stopped: NonFiniteLossError"):
        result = ppl_em.fit(model, x, method="svi", max_iter=50, progress=False, init="prior",
                            optim=pyro.optim.SGD({"lr": 1e6}))
    assert 1 <= result.n_iter < 50 and result.restarts[0]["stopped"].startswith("NonFiniteLossError")
    assert all(math.isfinite(loss) for loss in result.losses)
    assert all(torch.isfinite(v).all() for v in result.params.values())


def test_network_arguments_restart_fresh_and_end_with_the_kept_weights():
    from ppl_em.models import vae

    torch.manual_seed(0)
    x = (torch.rand(32, 16) < 0.3).float()
    decoder = vae.Decoder(z_dim=2, hidden=8, x_dim=16)
    passed = {k: v.clone() for k, v in decoder.state_dict().items()}
    result = quiet_fit(vae.model, x, decoder, method="vae", n_init=2, max_iter=5, seed=4)
    for name, value in decoder.state_dict().items():  # the network holds the kept restart's weights
        torch.testing.assert_close(value, result.params[f"decoder$$$net.{name[len('net.'):]}"])
    # Restart 0 starts from the weights as passed: rerunning it alone reproduces its loss trajectory.
    decoder.load_state_dict(passed)
    alone = quiet_fit(vae.model, x, decoder, method="vae", max_iter=5, seed=4)
    assert alone.restarts[0]["final_loss"] == pytest.approx(result.restarts[0]["final_loss"], rel=1e-6)
    assert result.restarts[1]["final_loss"] != pytest.approx(result.restarts[0]["final_loss"], rel=1e-3)


def test_a_fit_hands_its_initialisations_run_to_the_first_step(monkeypatch):
    """fit's initialisation runs the model under enumeration to create its parameters; EM's first step reads
    the model's parameters and plates from that run (EM.offer_trace) instead of running the model again:
    one run fewer, the same fit."""
    x = load_old_faithful()

    def fit_counting(offer: bool):
        runs = []

        def counted(*args, **kwargs):
            runs.append(1)
            return gmm.model(*args, **kwargs)
        if not offer:
            monkeypatch.setattr(ppl_em.EM, "offer_trace", lambda self, *a: None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ppl_em.ConvergenceWarning)
            result = ppl_em.fit(counted, x, 3, max_iter=5, tol=0.0, progress=False, seed=0)
        monkeypatch.undo()
        return result, len(runs)

    (offered, runs), (plain, plain_runs) = fit_counting(True), fit_counting(False)
    assert runs == plain_runs - 1
    assert offered.losses == plain.losses and offered.log_likelihood == plain.log_likelihood


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_the_first_look_counts_the_observations_of_a_run_as_written(name):
    """fit's check of the data (and count_observations) looks at the model on its first rows under parallel enumeration (a mixture's
    per-component tensors are not gathered once per row); the observations it counts are those of a run
    with every latent drawn, as written, on every model file."""
    from ppl_em.result import first_look
    from ppl_em.result import observations
    from ppl_em.store import model_trace

    args, kwargs = REGISTRY[name]["make_data"](0)
    model = REGISTRY[name]["model"]
    trace, plates = first_look(model, args, kwargs)
    assert observations(trace, plates) == observations(model_trace(model, args, kwargs))
    if "em" in REGISTRY[name]["methods"]:
        assert plates is not None  # a model EM fits can be enumerated
        enumerated = [s for s in trace.nodes.values() if s["type"] == "sample" and s["infer"].get("_enumerate_dim") is not None]
        assert enumerated, "no latent was enumerated"


def test_a_model_that_branches_on_a_drawn_value_is_looked_at_as_written():
    """A model whose Python branches on a latent's value cannot run under enumeration: the first look runs it
    as written, and an SVI fit counts its observations as before."""
    x = torch.cat([torch.randn(30, dtype=D) - 2, torch.randn(30, dtype=D) + 2])

    def branching(x):
        p = pyro.param("p", torch.tensor(0.5, dtype=D), constraint=constraints.unit_interval)
        loc = pyro.param("loc", torch.tensor([-1.0, 1.0], dtype=D))
        for i in pyro.plate("data", len(x)):
            z = pyro.sample(f"z_{i}", dist.Bernoulli(p))
            pyro.sample(f"x_{i}", dist.Normal(loc[1] if z.item() == 1 else loc[0], 1.0), obs=x[i])

    from ppl_em.result import first_look
    from ppl_em.result import observations
    trace, plates = first_look(branching, (x,), {})
    assert plates is None and observations(trace, plates) == 60
