"""Bad input to ppl_em.fit gets a clear error before the model runs, and a failed fit loses nothing.

Each test tries a class of input with several members and checks the promised error
(pytest.raises(..., match=...)) and that the param store, the networks and the caller's
tensors are as they were.
"""

import math
import re
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints

import ppl_em
from ppl_em.datasets import load_old_faithful
from ppl_em.models import REGISTRY, gmm, hmm, kmeans, poisson_mixture, vae
from ppl_em.svi import NonFiniteLossError, SafeSVI, default_loss
from ppl_em.guides import AutoCategorical

D = torch.float64


def faithful(step=4):
    return load_old_faithful()[::step]  # (68, 2)


def snapshot():
    store = pyro.get_param_store()
    return {n: store[n].detach().clone() for n in store.keys()}


def assert_same(before, after):
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name


@pytest.fixture
def sentinel():
    """A parameter the user had in the store before calling fit: a failed fit must leave it."""
    pyro.param("user_theta", torch.tensor([1.0, 2.0], dtype=D))
    return snapshot()


def quiet(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ppl_em.ConvergenceWarning)
        return ppl_em.fit(*args, progress=False, **kwargs)


# -- NaN / inf data: named before any model initialiser runs, for every model and method -------
def _float_entries():
    return [(name, method) for name, entry in REGISTRY.items() for method in entry["methods"]
            if entry["make_data"](0)[0][0].is_floating_point()]


def test_every_registered_model_with_float_data_is_covered():
    covered = {name for name, _ in _float_entries()}
    integer_data = {name for name, e in REGISTRY.items() if not e["make_data"](0)[0][0].is_floating_point()}
    assert covered | integer_data == set(REGISTRY) and integer_data == {"topic"}


@pytest.mark.parametrize("name, method", _float_entries())
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_data_names_the_argument_and_the_first_index(name, method, bad, sentinel):
    args, kwargs = REGISTRY[name]["make_data"](0)
    x = args[0].clone()
    flat = torch.randperm(x.numel(), generator=torch.Generator().manual_seed(1))[:3].sort().values
    x.view(-1)[flat] = bad
    first = tuple(int(i) for i in np.unravel_index(int(flat[0]), tuple(x.shape)))
    expected = rf"argument 'x' \(shape {re.escape(str(tuple(x.shape)))}\) has 3 non-finite .* index {re.escape(str(first))}"
    with pytest.raises(ValueError, match=expected):
        ppl_em.fit(REGISTRY[name]["model"], x, *args[1:], method=method, progress=False, max_iter=2, **kwargs)
    assert_same(sentinel, snapshot())


def test_non_finite_values_in_a_nested_argument_are_named():
    x = faithful()
    init = {"mu": torch.tensor([[1.0, math.nan], [2.0, 3.0]], dtype=D)}
    with pytest.raises(ValueError, match=r"argument 'init'\['mu'\] \(shape \(2, 2\)\) has 1 non-finite.*\(0, 1\)"):
        ppl_em.fit(gmm.model, x, 2, init, progress=False)


# -- k, empty data, dtypes, requires_grad, scale ------------------------------------------------
@pytest.mark.parametrize("k, message", [
    (0, "must be at least 1, got 0"),
    (-3, "must be at least 1, got -3"),
    (2.5, r"must be a positive integer, got 2.5 \(float\)"),
    (2.0, r"got 2.0 \(float\)\. Pass k=2"),
    (True, "got the bool True"),
    ("2", r"got '2' \(str\)"),
    (69, "k = 69 .*only 68|Use k <= 68"),
])
def test_k_must_be_a_positive_integer_no_larger_than_n(k, message, sentinel):
    with pytest.raises(ValueError, match=message):
        ppl_em.fit(gmm.model, faithful(), k, progress=False)
    assert_same(sentinel, snapshot())


def test_k_larger_than_the_observations_of_any_model():
    x = torch.tensor([[1.0, 2.0], [3.0, 0.0], [0.0, 5.0]], dtype=D)
    with pytest.raises(ValueError, match=r"k = 4 components, but the data have only n = 3 observations.*k <= 3"):
        ppl_em.fit(poisson_mixture.model, x, 4, progress=False)
    with pytest.raises(ValueError, match="k = 9 distinct observations, but x has only 8"):
        ppl_em.fit(hmm.model, torch.randn(2, 4, 1, dtype=D), 9, progress=False)
    # numpy and 0-d integer tensors are integers too
    assert ppl_em.fit(poisson_mixture.model, x, np.int64(1), progress=False).converged
    assert ppl_em.fit(poisson_mixture.model, x, torch.tensor(1), progress=False).converged


@pytest.mark.parametrize("x", [torch.zeros(0, 2, dtype=D), torch.zeros(5, 0, dtype=D)])
def test_empty_data_is_refused(x):
    with pytest.raises(ValueError, match=r"argument 'x' is empty \(shape \(\d, \d\)\); fitting needs at least one"):
        ppl_em.fit(gmm.model, x, 2, progress=False)


@pytest.mark.parametrize("method", ["em", "hard_em", "svi", "vae"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_refused_with_what_to_pass(dtype, method):
    with pytest.raises(ValueError, match=rf"dtype {dtype}; ppl_em fits in float32 or float64.*x.float\(\)"):
        ppl_em.fit(gmm.model, faithful().to(dtype), 2, method=method, progress=False)


@pytest.mark.parametrize("model", [gmm.model, kmeans.model, poisson_mixture.model, REGISTRY["bernoulli_mixture"]["model"]])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_or_bool_data_for_a_family_that_needs_floats(model, dtype):
    x = (faithful() > 50).to(dtype)
    with pytest.raises(ValueError, match=rf"floating.*{dtype}.*x.double\(\)"):
        ppl_em.fit(model, x, 2, progress=False)


def test_integer_data_at_a_continuous_site_of_a_users_model():
    def model(x):
        loc = pyro.param("loc", torch.tensor(0.0, dtype=D))
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Normal(loc, 1.0), obs=x)

    with pytest.raises(ValueError, match=r"site 'obs' is a Normal, a continuous distribution.*torch.int64.*double"):
        ppl_em.fit(model, torch.tensor([1, 2, 3]), progress=False, init="prior")


def test_data_that_requires_grad_or_is_a_numpy_array():
    x = faithful().clone().requires_grad_()
    with pytest.raises(ValueError, match=r"argument 'x' \(shape \(68, 2\)\) requires grad.*x.detach\(\)"):
        ppl_em.fit(gmm.model, x, 2, progress=False)
    with pytest.raises(ValueError, match=r"argument 'x' is a numpy array of shape \(68, 2\).*torch.as_tensor\(x\)"):
        ppl_em.fit(gmm.model, faithful().numpy(), 2, progress=False)


@pytest.mark.parametrize("scale, dtype", [(1e200, D), (1e160, D), (1e20, torch.float32)])
def test_data_whose_squares_overflow_is_refused_with_a_scaling_hint(scale, dtype):
    x = (faithful() * scale).to(dtype)
    with pytest.raises(ValueError, match=rf"reach .* sum of their squares overflows {dtype}.*Scale the data"):
        ppl_em.fit(gmm.model, x, 2, progress=False)


@pytest.mark.parametrize("seed, n_init", [(-1, 1), (2 ** 32, 1), (2 ** 32 - 1, 2), (1.5, 1)])
def test_seed_out_of_range_names_the_option(seed, n_init):
    with pytest.raises(ValueError, match="seed must"):
        ppl_em.fit(gmm.model, faithful(), 2, seed=seed, n_init=n_init, progress=False)


def test_one_observation_fits_where_the_model_can_and_says_why_where_it_cannot():
    one = torch.tensor([[3.0, 4.0]], dtype=D)
    for method in ("em", "hard_em", "svi"):
        result = quiet(poisson_mixture.model, one, 1, method=method, max_iter=50)
        rate = result.params["rate"]
        assert torch.isfinite(rate).all()
    # Oracle: one Poisson component's MLE is the observation itself.
    torch.testing.assert_close(ppl_em.fit(poisson_mixture.model, one, 1, progress=False).params["rate"][0], one[0])
    with pytest.raises(ValueError, match="covariance of the data, which needs at least 2 rows; x has 1"):
        ppl_em.fit(gmm.model, one, 1, progress=False)
    init = {"phi": torch.ones(1, dtype=D), "mu": one.clone(), "Sigma": torch.eye(2, dtype=D)[None]}
    result = ppl_em.fit(gmm.model, one, 1, init, progress=False)
    torch.testing.assert_close(result.params["mu"], one)  # the mean of one point
    torch.testing.assert_close(result.params["Sigma"][0], 1e-6 * torch.eye(2, dtype=D))  # 0 + reg_covar


# -- state between fits ---------------------------------------------------------------------------
def test_a_fit_does_not_read_what_an_earlier_fit_left_in_the_store():
    x = faithful()
    clean = ppl_em.fit(gmm.model, x, 2, covariance_type="diag", progress=False)
    pyro.clear_param_store()
    ppl_em.fit(gmm.model, x, 3, progress=False)  # leaves a (3, 2, 2) Sigma behind
    after_full = ppl_em.fit(gmm.model, x, 2, covariance_type="diag", progress=False)
    assert_same(clean.params, after_full.params)
    pyro.param("Sigma", torch.full((7,), math.nan, dtype=D))  # debris of the user's own
    after_debris = ppl_em.fit(gmm.model, x, 2, covariance_type="diag", progress=False)
    assert_same(clean.params, after_debris.params)


def test_a_failed_fit_leaves_the_store_as_it_was_and_does_not_poison_the_next():
    x = faithful()
    clean = ppl_em.fit(gmm.model, x, 2, progress=False).params
    pyro.clear_param_store()
    pyro.param("user_theta", torch.ones(3, dtype=D))
    before = snapshot()
    failures = [
        lambda: ppl_em.fit(gmm.model, x[:1].repeat(10, 1), 2, em_options={"reg_covar": 0}, progress=False),
        lambda: ppl_em.fit(nan_model, torch.tensor([-2.1, -1.9, 3.5, 2.2], dtype=D), init="prior", progress=False),
        lambda: ppl_em.fit(gmm.model, x, 0, progress=False),
    ]
    for fail in failures:
        with pytest.raises((ValueError, FloatingPointError)):
            fail()
        assert_same(before, snapshot())
    assert_same(clean, ppl_em.fit(gmm.model, x, 2, progress=False).params)


class _Interrupt(BaseException):
    pass


@pytest.mark.parametrize("method", ["em", "svi"])
def test_an_interrupted_fit_restores_the_store(method, monkeypatch, sentinel):
    real = {"em": ppl_em.EM.step, "svi": SafeSVI.step}[method]
    calls = []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ppl_em.EM if method == "em" else SafeSVI, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ppl_em.fit(gmm.model, faithful(), 2, method=method, tol=0.0, progress=False)
    assert len(calls) == 3
    assert_same(sentinel, snapshot())


def test_a_failed_vae_fit_restores_the_decoder_weights(monkeypatch):
    args, _ = REGISTRY["vae"]["make_data"](0)
    x, decoder = args
    weights = {k: v.clone() for k, v in decoder.state_dict().items()}
    real, calls = SafeSVI.step, []

    def interrupted(self, *a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(SafeSVI, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ppl_em.fit(vae.model, x, decoder, method="vae", max_iter=20, progress=False)
    for name, value in decoder.state_dict().items():
        assert torch.equal(value, weights[name]), name


# -- SVI: the constrained values, and interrupts inside the update --------------------------------
def test_svi_refuses_a_step_whose_constrained_covariance_overflows():
    x = faithful()
    with pytest.warns(ppl_em.ConvergenceWarning, match=r"SVI step \d+: the update made parameter\(s\) \['Sigma'\] "
                                                       r"non-finite or invalid \('Sigma' is non-finite once constrained"):
        result = ppl_em.fit(gmm.model, x, 2, method="svi", optim=pyro.optim.Adam({"lr": 1e3}), progress=False)
    assert all(torch.isfinite(v).all() for v in result.params.values())
    assert math.isfinite(result.score())  # the kept parameters are a usable model


def test_svi_refuses_a_step_that_leaves_the_constraint_and_keeps_every_parameter():
    def model(x):
        s = pyro.param("s", torch.tensor(1.0, dtype=D), constraint=constraints.positive)
        loc = pyro.param("loc", torch.tensor(0.5, dtype=D))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(loc, s), obs=x)

    x = torch.zeros(4, dtype=D)
    svi = SafeSVI(model, lambda x: None, pyro.optim.SGD({"lr": 1e3}), default_loss(model, x))
    pyro.param("s"), pyro.param("loc")
    before = snapshot()
    with pytest.raises(NonFiniteLossError, match=r"SVI step 1: .*'s' is outside its constraint GreaterThan"):
        svi.step(x)  # log s -= 1e3 * 4: s = exp(-4000) = 0, finite but not positive
    assert_same(before, snapshot())


def test_an_interrupt_inside_the_svi_update_leaves_no_parameter_half_updated():
    x, k = faithful(), 2
    svi = SafeSVI(gmm.model, AutoCategorical(gmm.model), pyro.optim.Adam({"lr": 0.1}), default_loss(gmm.model, x, k))
    svi.step(x, k)
    before = snapshot()
    real, moved = svi.optim, []

    def interrupted(params):
        params = sorted(params, key=lambda p: p.numel())
        real(params[:1])  # the first parameter is updated, then Ctrl-C
        moved.append(not torch.equal(params[0].detach(), before[pyro.get_param_store().param_name(params[0])]))
        raise KeyboardInterrupt

    svi.optim = interrupted
    with pytest.raises(KeyboardInterrupt):
        svi.step(x, k)
    assert moved == [True]  # the interrupt really came after a partial update...
    assert_same(before, snapshot())  # ...and that update was undone


# -- EM: a non-finite log p(x) names the site; a singular update names the component ---------------
class Flaky(dist.Normal):
    """A Normal whose log-density is NaN above 3: a model bug that EM must report, not run on."""

    def log_prob(self, value):
        lp = super().log_prob(value)
        return torch.where(value > 3.0, torch.full_like(lp, math.nan), lp)


def nan_model(x):
    phi = pyro.param("phi", torch.ones(2, dtype=D) / 2, constraint=constraints.simplex)
    mu = pyro.param("mu", torch.tensor([-1.0, 1.0], dtype=D))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(phi))
        pyro.sample("x", Flaky(mu[z], 1.0), obs=x)


def penalty_model(x):
    mu = pyro.param("mu", torch.tensor([-1.0, 1.0], dtype=D))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(torch.ones(2, dtype=D) / 2))
        pyro.sample("x", dist.Normal(mu[z], 1.0), obs=x)
    pyro.factor("penalty", (mu - 5).sqrt().sum())  # NaN while mu < 5


def zero_probability_model(x):
    rate = pyro.param("rate", torch.tensor([1.0, 2.0], dtype=D), constraint=constraints.positive)
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(torch.ones(2, dtype=D) / 2))
        pyro.sample("x", dist.Poisson(rate[z]), obs=x)


@pytest.mark.parametrize("method", ["em", "hard_em"])
@pytest.mark.parametrize("case", ["nan density", "nan factor", "a point of probability 0"])
def test_a_non_finite_log_likelihood_names_the_site_and_keeps_the_parameters(case, method, sentinel):
    model, x, site, where = {
        "nan density": (nan_model, torch.tensor([-2.1, -1.9, 3.5, 2.2], dtype=D), "x", "nan \\(first at data index 2\\)"),
        "nan factor": (penalty_model, torch.tensor([-2.0, 2.0], dtype=D), "penalty", "nan"),
        "a point of probability 0": (zero_probability_model, torch.tensor([1.0, -1.0, 2.0], dtype=D), "x",
                                     "-inf for every value of the latent variables \\(first at data index 1\\)"),
    }[case]
    label = "hard EM" if method == "hard_em" else "EM"
    with pyro.validation_enabled(False):  # the model's own checks would stop some of these sooner
        with pytest.raises(NonFiniteLossError, match=rf"{label} iteration 1: log p\(x\) is .* site '{site}' is {where}"):
            ppl_em.fit(model, x, method=method, init="prior", progress=False)
    assert_same(sentinel, snapshot())


@pytest.mark.parametrize("data, k, component", [
    ("ten copies of one point", 2, "component [01]"),
    ("a cluster of identical points", 6, r"component \d"),
])
def test_a_singular_update_names_the_component_and_what_to_try(data, k, component, sentinel):
    x = faithful()
    x = x[:1].repeat(10, 1) if data == "ten copies of one point" else torch.cat([x, x[:1].repeat(30, 1)])
    with pytest.raises(ValueError, match=rf"EM iteration \d+: {component} of parameter 'Sigma' has a singular "
                                         r"covariance: increase reg_covar.*reduce k, or scale the data"):
        ppl_em.fit(gmm.model, x, k, em_options={"reg_covar": 0}, progress=False)
    assert_same(sentinel, snapshot())


@pytest.mark.parametrize("covariance_type, message", [
    ("tied", "parameter 'Sigma' has a singular covariance: increase reg_covar"),
    # The engine reports a variance of 0 as a non-finite update or as one the model rejects.
    ("diag", r"EM iteration \d+: .*(variance is 0: increase reg_covar|Try a larger reg_covar)"),
    ("spherical", r"EM iteration \d+: .*(variance is 0: increase reg_covar|Try a larger reg_covar)"),
])
def test_a_collapsed_component_of_any_covariance_type(covariance_type, message):
    x = torch.tensor([[1.0, 2.0]] * 6 + [[1.0, 3.0], [2.0, 2.0]], dtype=D)
    x = x if covariance_type != "tied" else x[:6]
    with pytest.raises(ValueError, match=message):
        ppl_em.fit(gmm.model, x, 2, covariance_type=covariance_type, em_options={"reg_covar": 0}, progress=False)


def test_the_same_data_fit_with_the_default_reg_covar():
    x = faithful()[:1].repeat(10, 1)
    result = quiet(gmm.model, x, 2)
    assert all(torch.isfinite(v).all() for v in result.params.values())



@pytest.mark.parametrize("options, message", [
    ({"n_init": True}, "n_init must be an integer >= 1"),
    ({"max_iter": False}, "max_iter must be an integer >= 1"),
    ({"tol": "small"}, "tol must be >= 0"),
    ({"tol": math.nan}, "tol must be >= 0"),
])
def test_options_of_the_wrong_type(options, message):
    with pytest.raises(ValueError, match=message):
        ppl_em.fit(gmm.model, faithful(), 2, progress=False, **options)
