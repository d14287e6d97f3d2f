"""EM against its oracles: scikit-learn, the EM guarantee, the ELBO, closed form vs gradient."""

import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture
from torch.distributions import constraints

import ppl_em
from ppl_em.datasets import load_old_faithful
from ppl_em.models import gmm
from ppl_em.posterior import Posterior

from test_posterior import hmm, mixture, two_latents

D = torch.float64


def gmm_init(x, k, seed=0):
    return gmm.init_params(x, k, seed=seed)


def test_gmm_trajectory_equals_scikit_learn():
    x = load_old_faithful()
    k, init = 3, gmm_init(load_old_faithful(), 3, seed=1)
    sk = GaussianMixture(k, covariance_type="full", reg_covar=1e-6, max_iter=1, warm_start=True, tol=0.0,
                         weights_init=init["phi"].numpy(), means_init=init["mu"].numpy(),
                         precisions_init=np.linalg.inv(init["Sigma"].numpy()))
    em = ppl_em.EM(gmm.model, reg_covar=1e-6)
    for _ in range(15):
        loss = em.step(x, k, init=init)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            sk.fit(x.numpy())
        p = em.params
        np.testing.assert_allclose(p["phi"].numpy(), sk.weights_, rtol=1e-6)
        np.testing.assert_allclose(p["mu"].numpy(), sk.means_, rtol=1e-6)
        np.testing.assert_allclose(p["Sigma"].numpy(), sk.covariances_, rtol=1e-6)
        # Both report the mean log p(x) at the parameters before this iteration's M-step.
        np.testing.assert_allclose(-loss / len(x), sk.lower_bound_, rtol=1e-6)
    assert em.explain()["Sigma"].startswith("closed form")


def _log_px_trajectory(em, *args, steps=12):
    return [-em.step(*args) for _ in range(steps)]


@pytest.mark.parametrize("name", ["mixture", "two_latents", "hmm", "gmm", "gradient_only", "map_em"])
def test_log_likelihood_never_decreases(name):
    torch.manual_seed(0)
    x1 = torch.cat([torch.randn(20, dtype=D) - 2, torch.randn(20, dtype=D) + 2.5])
    cases = {
        "mixture": (mixture, (x1,)),
        "two_latents": (two_latents, (x1,)),
        "hmm": (hmm, (x1[::4],)),
        "gmm": (gmm.model, (load_old_faithful()[:120], 3)),
        "gradient_only": (softplus_mixture, (x1,)),
        "map_em": (map_mixture, (x1,)),
    }
    model, args = cases[name]
    trajectory = _log_px_trajectory(ppl_em.EM(model), *args)
    assert all(b >= a - 1e-9 * abs(a) for a, b in zip(trajectory, trajectory[1:])), trajectory
    assert trajectory[-1] > trajectory[0]


def softplus_mixture(x):
    """A mixture whose scale is a transformed parameter: no closed form, gradient M-step."""
    phi = pyro.param("phi", torch.tensor([0.5, 0.5], dtype=D), constraint=constraints.simplex)
    mu = pyro.param("mu", torch.tensor([-0.5, 0.5], dtype=D))
    rho = pyro.param("rho", torch.tensor(0.0, dtype=D))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(phi))
        pyro.sample("x", dist.Normal(mu[z], torch.nn.functional.softplus(rho) + 0.1), obs=x)


def map_mixture(x):
    """Global latent locations with a prior, as in Pyro's GMM tutorial: MAP-EM."""
    phi = pyro.param("phi", torch.tensor([0.5, 0.5], dtype=D), constraint=constraints.simplex)
    with pyro.plate("components", 2):
        locs = pyro.sample("locs", dist.Normal(torch.zeros((), dtype=D), 2.0))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(phi))
        pyro.sample("x", dist.Normal(locs[z], 1.0), obs=x)


def test_map_em_point_estimates_global_latents_with_their_prior():
    torch.manual_seed(1)
    x = torch.cat([torch.randn(30, dtype=D) - 3, torch.randn(30, dtype=D) + 3])
    pyro.param("locs", torch.tensor([-1.0, 1.0], dtype=D))
    em = ppl_em.EM(map_mixture)
    for _ in range(60):
        em.step(x)
    post = em.e_step(x)
    w = post.marginal("z")  # (n, 2)
    # Stationarity of log p(x, locs) in locs: sum_i w_ij (x_i - l_j) / 1 - l_j / 2^2 = 0.
    locs = em.params["locs"]
    expected = (w * x[:, None]).sum(0) / (w.sum(0) + 1 / 4.0)
    assert torch.allclose(locs, expected, atol=1e-6)
    assert em.explain()["locs"] == "closed form: Normal.loc at site x, MAP with the conjugate Normal prior at site locs"
    assert torch.allclose(post.log_prior, dist.Normal(0.0, 2.0).log_prob(locs).sum())


def _with_q(post: Posterior, q: torch.Tensor) -> Posterior:
    """The same posterior object but with Q(z^(i) = j) = q, shape (n, k), for a one-latent mixture."""
    weights = dict(post.weights, z=q.T.contiguous(), x=q.T.contiguous())
    return Posterior(post.log_evidence, post.objective, post.log_prior, weights, post.trace, leaves=post.leaves)


def elbo(em, post, q, x):
    """ELBO(x; Q, theta) = E_Q[log p(x, z; theta)] + H(Q)."""
    entropy = -(q * q.clamp_min(1e-300).log()).sum()
    return em.expected_log_joint(_with_q(post, q), x).detach() + entropy


def test_elbo_touches_log_px_after_the_e_step_and_is_below_it_otherwise():
    torch.manual_seed(2)
    x = torch.cat([torch.randn(10, dtype=D) - 1, torch.randn(10, dtype=D) + 1])
    em = ppl_em.EM(mixture)
    post = em.e_step(x)
    exact = post.marginal("z")
    assert torch.allclose(elbo(em, post, exact, x), post.log_evidence, rtol=1e-12)
    for _ in range(5):
        q = torch.softmax(torch.randn(20, 3, dtype=D) * 2, -1)
        assert elbo(em, post, q, x) < post.log_evidence - 1e-6
    # EM is coordinate ascent on the ELBO: the M-step raises it with Q fixed.
    before = elbo(em, post, exact, x)
    em.m_step(post, x)
    post2 = em.e_step(x)
    assert elbo(em, post2, exact, x) >= before
    assert post2.log_evidence >= elbo(em, post2, exact, x) - 1e-9


def test_a_gradient_m_step_that_steps_outside_the_support_keeps_the_previous_values(monkeypatch):
    """L-BFGS's line search may try parameters the model rejects (a Sigma that is not positive
    definite raises in Pyro's validation): that step keeps its start. Where nothing else moved, EM
    is stuck and says so (a StalledError, not the same loss forever); the parameters are unchanged."""
    x = torch.cat([torch.randn(30, generator=torch.Generator().manual_seed(8), dtype=D) - 2,
                   torch.randn(30, generator=torch.Generator().manual_seed(9), dtype=D) + 2])
    em = ppl_em.EM(mixture, m_step="gradient", reg_covar=0.0)
    post = em.e_step(x)
    before = em.params
    calls = {"n": 0}
    real = ppl_em.EM.expected_log_joint

    def rejecting(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 1:  # the start is valid; every trial point is "outside the support"
            raise ValueError("Expected parameter scale to satisfy the constraint GreaterThan(lower_bound=0.0)")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ppl_em.EM, "expected_log_joint", rejecting)
    with pytest.raises(ppl_em.StalledError, match="tried parameters that the model rejects.*EM cannot leave"):
        em.m_step(post, x)
    for name, value in em.params.items():
        assert torch.equal(value, before[name]), name
    monkeypatch.setattr(ppl_em.EM, "expected_log_joint", real)
    em.step(x)  # and the fit goes on


def test_closed_form_and_gradient_m_steps_reach_the_same_fixed_point():
    torch.manual_seed(3)
    x = torch.cat([torch.randn(40, dtype=D) * 0.7 - 2, torch.randn(60, dtype=D) + 1.5])

    def model(x):
        phi = pyro.param("phi", torch.tensor([0.5, 0.5], dtype=D), constraint=constraints.simplex)
        mu = pyro.param("mu", torch.tensor([-1.0, 1.0], dtype=D))
        sigma = pyro.param("sigma", torch.tensor([1.0, 1.0], dtype=D), constraint=constraints.positive)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(phi))
            pyro.sample("x", dist.Normal(mu[z], sigma[z]), obs=x)

    results = {}
    for how in ("closed_form", "gradient"):
        pyro.clear_param_store()
        em = ppl_em.EM(model, m_step=how, reg_covar=0.0)
        for _ in range(200):
            em.step(x)
        results[how] = em.params
        assert set(em.explain().values()) == {"closed form: Categorical.probs at site z", "closed form: Normal.loc at site x",
                                              "closed form: Normal.scale at site x"} or how == "gradient"
    for name in ("phi", "mu", "sigma"):
        assert torch.allclose(results["closed_form"][name], results["gradient"][name], atol=1e-5), name


def kmeans_model(x, k=3):
    """Hard EM on this mixture (fixed uniform weights, fixed shared isotropic covariance) is Lloyd."""
    mu = pyro.param("mu", lambda: x[:k].clone())
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(torch.ones(k, dtype=x.dtype) / k))
        pyro.sample("x", dist.Normal(mu[z], 1.0).to_event(1), obs=x)


def test_hard_em_equals_kmeans_from_the_same_centres():
    x = load_old_faithful()
    x = (x - x.mean(0)) / x.std(0)
    centres = x[torch.tensor([0, 5, 17])].clone()
    pyro.param("mu", centres.clone())
    em = ppl_em.EM(kmeans_model, posterior="hard")
    for it in range(1, 6):
        em.step(x)
        km = KMeans(3, init=centres.numpy(), n_init=1, max_iter=it, algorithm="lloyd", tol=0.0).fit(x.numpy())
        np.testing.assert_allclose(em.params["mu"].numpy(), km.cluster_centers_, rtol=1e-10, atol=1e-12)
    labels = em.e_step(x).marginal("z").argmax(-1).numpy()
    np.testing.assert_array_equal(labels, km.predict(x.numpy()))


def test_continuous_local_latent_is_a_clear_error():
    def factor_model(x):
        with pyro.plate("data", len(x)):
            h = pyro.sample("h", dist.Normal(torch.zeros((), dtype=D), 1.0))
            pyro.sample("x", dist.Normal(h, 1.0), obs=x)

    with pytest.raises(ppl_em.ExactInferenceError, match="'h' is a continuous latent.*SVI.*amortized"):
        ppl_em.EM(factor_model).step(torch.zeros(3, dtype=D))


def test_nan_data_is_a_value_error_that_says_where():
    x = load_old_faithful()[:50].clone()
    x[7, 1] = float("nan")
    with pytest.raises(ValueError, match=r"argument 0 \(shape \(50, 2\)\) has 1 non-finite.*index \(7, 1\)"):
        ppl_em.EM(gmm.model).step(x, 2)


def test_non_finite_m_step_raises_and_keeps_the_last_good_parameters():
    # Each squared deviation is finite, so the E-step is; their weighted sum overflows to inf.
    x = torch.tensor([1.3e154, -1.3e154, 1.3e154, -1.3e154], dtype=D)

    def model(x):
        mu = pyro.param("mu", torch.tensor([0.0, 1.0], dtype=D))
        sigma = pyro.param("sigma", torch.tensor([1.3e154, 1.3e154], dtype=D), constraint=constraints.positive)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(torch.tensor([0.5, 0.5], dtype=D)))
            pyro.sample("x", dist.Normal(mu[z], sigma[z]), obs=x)

    em = ppl_em.EM(model)
    post = em.e_step(x)
    before = {k: v.clone() for k, v in em.params.items()}
    with pytest.raises(ppl_em.NonFiniteParameterError, match="'sigma' is not finite.*previous parameters were kept"):
        em.m_step(post, x)
    for name, value in em.params.items():
        assert torch.equal(value, before[name]), name


def test_empty_component_never_produces_nan():
    x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [5.0, 5.0]], dtype=D)
    init = {"phi": torch.tensor([0.5, 0.25, 0.25], dtype=D),
            "mu": torch.tensor([[0.0, 0.0], [5.0, 5.0], [1e3, 1e3]], dtype=D),
            "Sigma": torch.eye(2, dtype=D).expand(3, 2, 2).clone()}
    em = ppl_em.EM(gmm.model)
    for _ in range(5):
        em.step(x, 3, init=init)
    for name, value in em.params.items():
        assert torch.isfinite(value).all(), name
    assert torch.equal(em.params["mu"][2], init["mu"][2])  # no mass: kept, not 0/0
    # A component with one point makes the unregularised Sigma update near-singular; its gradient is
    # rounding, and the regularised check still recognises every closed form.
    assert all(how.startswith("closed form") for how in em.explain().values()), em.explain()


def test_a_weak_prior_on_a_location_gets_the_conjugate_map_update():
    """A Normal(0, 30) prior on each location: mu_j = (sum_i w_j^(i) x^(i) / sigma_j^2) / (N_j / sigma_j^2 + 1 / 30^2)
    given sigma_j (an ECM step); at EM's fixed point the gradient of log p(x, mu) in mu vanishes."""
    def weak_prior_mixture(x):
        phi = pyro.param("phi", torch.tensor([0.5, 0.5], dtype=D), constraint=constraints.simplex)
        sigma = pyro.param("sigma", torch.tensor([1.0, 1.0], dtype=D), constraint=constraints.positive)
        with pyro.plate("components", 2):
            locs = pyro.sample("locs", dist.Normal(torch.zeros((), dtype=D), 30.0))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(phi))
            pyro.sample("x", dist.Normal(locs[z], sigma[z]), obs=x)

    x = torch.cat([torch.randn(40, generator=torch.Generator().manual_seed(4), dtype=D) - 3,
                   torch.randn(40, generator=torch.Generator().manual_seed(5), dtype=D) + 3])
    pyro.param("locs", torch.tensor([-1.0, 1.0], dtype=D))
    em = ppl_em.EM(weak_prior_mixture)
    for _ in range(200):
        em.step(x)
    assert em.explain()["locs"].endswith("MAP with the conjugate Normal prior at site locs")
    assert em.explain()["sigma"].startswith("closed form") and em.explain()["phi"].startswith("closed form")
    w, p = em.e_step(x).marginal("z"), em.params
    gradient = (w * (x[:, None] - p["locs"]) / p["sigma"] ** 2).sum(0) - p["locs"] / 30.0 ** 2
    assert gradient.abs().max() < 1e-8


def test_constructor_rejects_unknown_options():
    with pytest.raises(ValueError, match="posterior must be 'exact' or 'hard'"):
        ppl_em.EM(mixture, posterior="soft")
    with pytest.raises(ValueError, match="m_step must be"):
        ppl_em.EM(mixture, m_step="newton")


# -- closed forms that hold only at some parameter values ------------------------------------------
def scale_mixture(x):
    """One location shared by two components of different scales: mu = sum w x / sigma^2 / sum w / sigma^2."""
    phi = pyro.param("phi", torch.tensor([0.5, 0.5], dtype=D), constraint=constraints.simplex)
    mu = pyro.param("mu", torch.tensor(1.0, dtype=D))
    sigma = pyro.param("sigma", torch.tensor([0.5, 2.0], dtype=D), constraint=constraints.positive)
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(phi))
        pyro.sample("x", dist.Normal(mu, sigma[z]), obs=x)


def _scale_mixture_data():
    g = torch.Generator().manual_seed(0)
    return torch.cat([0.05 * torch.randn(100, generator=g, dtype=D), 3 + 3 * torch.randn(100, generator=g, dtype=D)])


def test_a_location_shared_by_components_of_different_scales_is_precision_weighted():
    x = _scale_mixture_data()
    params = {}
    for how in ("auto", "gradient"):
        pyro.clear_param_store()
        em = ppl_em.EM(scale_mixture, m_step=how)
        for _ in range(80):
            em.step(x)
        params[how] = em.params
        if how == "auto":
            assert em.explain()["mu"] == "closed form: Normal.loc at site x"
    for name in params["auto"]:
        assert torch.allclose(params["auto"][name], params["gradient"][name], atol=1e-5), name


def masked_mean(x, seen):
    """A shortcut for missing entries: mean and data zeroed where unseen, a full Sigma_j. Averaging the seen
    entries is mu_j's maximiser only while Sigma_j is diagonal, as it is at the start (Sigma_j = I)."""
    phi = pyro.param("phi", torch.tensor([0.5, 0.5], dtype=D), constraint=constraints.simplex)
    mu = pyro.param("mu", torch.tensor([[-1.0, 0.0], [1.0, 1.0]], dtype=D))
    Sigma = pyro.param("Sigma", torch.eye(2, dtype=D).expand(2, 2, 2).clone(), constraint=constraints.positive_definite)
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(phi))
        pyro.sample("x", dist.MultivariateNormal(mu[z] * seen, Sigma[z]), obs=x * seen)


def test_a_closed_form_right_only_at_the_start_is_dropped_where_em_comes_to_rest():
    g = torch.Generator().manual_seed(1)
    factor = torch.linalg.cholesky(torch.tensor([[1.0, 0.9], [0.9, 1.0]], dtype=D)).T
    x = torch.cat([torch.randn(150, 2, generator=g, dtype=D) @ factor - 2, torch.randn(150, 2, generator=g, dtype=D) @ factor + 2])
    seen = torch.rand(300, 2, generator=g) > 0.3
    em = ppl_em.EM(masked_mean)
    assert em.step(x, seen) and em.explain()["mu"].startswith("closed form")  # it passes the first check
    with pytest.warns(RuntimeWarning, match=r"came to rest where .* not stationary in \['mu'\]"):
        losses = [em.step(x, seen) for _ in range(80)]
    assert em.explain()["mu"].startswith("gradient") and "came to rest" in em.explain()["mu"]
    assert all(b <= a + 1e-9 * abs(a) for a, b in zip(losses, losses[1:]))
    pyro.clear_param_store()
    reference = ppl_em.EM(masked_mean, m_step="gradient")
    for _ in range(40):
        best = reference.step(x, seen)
    assert losses[-1] == pytest.approx(best, rel=1e-7)


def test_a_rise_of_the_loss_makes_the_plan_be_checked_again(monkeypatch):
    """EM's loss cannot rise on the same data: if an update lowers the objective (here one made worse on
    purpose), the engine says so and makes its plan again at the next step."""
    x = _scale_mixture_data()
    em = ppl_em.EM(mixture)
    em.step(x)
    real = ppl_em.closed_form.maximize

    def worse(plan, stats, names, current, reg, basis="constrained"):
        new = real(plan, stats, names, current, reg, basis)
        return {**new, "mu": new["mu"] + 3.0}

    monkeypatch.setattr(ppl_em.closed_form, "maximize", worse)
    em.step(x)
    monkeypatch.setattr(ppl_em.closed_form, "maximize", real)
    with pytest.warns(RuntimeWarning, match="the loss rose from"):
        em.step(x)
    assert em.plan is None  # made again, and checked, at the next step
    em.step(x)
    assert em.plan is not None and all(how.startswith("closed form") for how in em.explain().values())


def _poisson_mixture(x):
    rate = pyro.param("rate", torch.tensor([1.0, 3.0], dtype=torch.float64), constraint=constraints.positive)
    phi = pyro.param("phi", torch.ones(2, dtype=torch.float64) / 2, constraint=constraints.simplex)
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(phi), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Poisson(rate[z]), obs=x)


@pytest.mark.parametrize("call", ["step", "summarize", "log_likelihood"])
def test_data_are_validated_once_and_again_when_they_change(call, monkeypatch):
    """Pyro's checks of the observations run on data the EM object has not seen (these very tensors,
    unchanged), and not again on every step: changed in place, they are checked again and refused."""
    checks = []
    original = dist.Poisson._validate_sample
    monkeypatch.setattr(dist.Poisson, "_validate_sample", lambda self, value: checks.append(1) or original(self, value))
    x = torch.poisson(torch.full((50,), 2.0, dtype=torch.float64), generator=torch.Generator().manual_seed(0))
    em = ppl_em.EM(_poisson_mixture)
    em.step(x)
    y = x.clone()
    getattr(em, call)(y)
    assert checks, "new data must be checked"
    checks.clear()
    getattr(em, call)(y)
    assert not checks, "the same, unchanged data must not be checked again"
    y[0] = 0.5  # not a count: Poisson's support check refuses it
    with pytest.raises(ValueError, match="support"):
        getattr(em, call)(y)


def _counted(model):
    """``model`` and a list that grows by one at each of its runs."""
    runs = []

    def counted(*args, **kwargs):
        runs.append(1)
        return model(*args, **kwargs)
    return counted, runs


def _offer_then_step(model, x, k, later=lambda args: args):
    """A fresh store and EM, every parameter created by a run under enumeration (as ``ppl_em.fit``'s
    initialisation makes it) and offered; then one step on ``later(args)``: (loss, parameters, model runs of
    the step)."""
    from ppl_em.posterior import inspect_model, trace_model

    pyro.clear_param_store()
    counted, runs = _counted(model)
    em, args = ppl_em.EM(counted), (x, k)
    em.structure = inspect_model(counted, args, {})
    trace, leaves = trace_model(counted, em.structure, args, {}, log_prob="none")
    em.offer_trace(trace, leaves, args, {})
    pyro.param("mu").data.add_(0.25)  # a value set after the offered run: its structure holds all the same
    runs.clear()
    loss = em.step(*later(args))
    return loss, em.params, len(runs)


def test_an_offered_trace_saves_the_first_steps_run_of_the_model_and_changes_nothing():
    """The first step reads the parameters' names and the plates from the offered run; the step is the one
    made without it (the same loss and parameters, to the bit), with one run of the model fewer."""
    x = load_old_faithful()
    offered = _offer_then_step(gmm.model, x, 3)
    unused = _offer_then_step(gmm.model, x, 3, later=lambda args: (args[0].clone(), args[1]))  # equal data, not these
    assert offered[2] == unused[2] - 1
    assert offered[0] == unused[0]
    assert offered[1].keys() == unused[1].keys()
    for name in offered[1]:
        assert torch.equal(offered[1][name], unused[1][name])


@pytest.mark.parametrize("change", ["other tensor", "changed in place", "cleared store"])
def test_an_offered_trace_is_not_read_for_other_arguments_or_a_store_without_its_parameters(change):
    """An offer holds for the very arguments it was made on, unchanged, with every parameter it names in the
    store: otherwise the step runs the model for its look as without an offer."""
    x = load_old_faithful()
    baseline = _offer_then_step(gmm.model, x, 3)[2] + 1  # the runs of a step that takes no offer

    def later(args):
        if change == "other tensor":
            return (args[0].clone(), args[1])
        if change == "changed in place":
            args[0].mul_(1.0)
            return args
        pyro.clear_param_store()
        return args
    _, _, runs = _offer_then_step(gmm.model, x.clone(), 3, later)
    assert runs >= baseline
