"""SVI guides against EM: the exact E-step as a guide, mean-field and amortized variational EM."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO
from torch.distributions import constraints

import ppl_em
from ppl_em.guides import AutoAmortized, AutoCategorical, ExactPosterior
from ppl_em.models import gmm, vae
from ppl_em.posterior import ExactInferenceError
from ppl_em.svi import NonFiniteLossError, SafeSVI, default_loss

from test_posterior import hmm, mixture, two_latents

D = torch.float64


# -- models and data ---------------------------------------------------------------------------
def poisson_mixture(x, k=2):
    """A 1-d Poisson mixture with no enumeration marks: z^(i) ~ Cat(phi), x^(i) ~ Poisson(rate_z)."""
    phi = pyro.param("phi", lambda: torch.full((k,), 1.0 / k, dtype=D), constraint=constraints.simplex)
    rate = pyro.param("rate", lambda: torch.linspace(1.0, 8.0, k, dtype=D), constraint=constraints.positive)
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(phi))
        pyro.sample("x", dist.Poisson(rate[z]), obs=x)


def map_mixture(x):
    """Global latent locations with a prior: point-estimated by every guide."""
    with pyro.plate("components", 2):
        locs = pyro.sample("locs", dist.Normal(torch.zeros((), dtype=D), 3.0))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(torch.tensor([0.5, 0.5], dtype=D)))
        pyro.sample("x", dist.Normal(locs[z], 1.0), obs=x)


def gmm_problem():
    """2-d, k = 2, well separated; EM and SVI both start from means 1.4 away from the truth."""
    mu = torch.tensor([[-3.0, 0.0], [3.0, 1.0]], dtype=D)
    Sigma = torch.stack([torch.eye(2, dtype=D), torch.tensor([[1.0, 0.5], [0.5, 1.0]], dtype=D)])
    x, _ = gmm.generate(300, torch.tensor([0.4, 0.6], dtype=D), mu, Sigma, seed=1)
    init = {"phi": torch.tensor([0.5, 0.5], dtype=D), "mu": mu + torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=D),
            "Sigma": torch.cov(x.T).expand(2, 2, 2).clone()}
    return gmm.model, (x, 2), {"init": init}


def poisson_problem():
    g = torch.Generator().manual_seed(2)
    z = torch.rand(300, generator=g) < 0.35
    x = torch.poisson(torch.where(z, 2.0, 14.0).to(D), generator=g)
    return poisson_mixture, (x,), {}


def log_px_per_point(model, args, kwargs):
    """The oracle: log p(x; theta) / n by the exact E-step at the current parameters."""
    return ppl_em.EM(model).e_step(*args, **kwargs).log_evidence.item() / len(args[0])


def em_optimum(model, args, kwargs, steps=60):
    pyro.clear_param_store()
    em = ppl_em.EM(model)
    for _ in range(steps):
        em.step(*args, **kwargs)
    return log_px_per_point(model, args, kwargs)


# -- ExactPosterior: the E-step as a guide -------------------------------------------------------
def exact_elbo(model, guide, *args, nesting=1, **kwargs):
    """ELBO(x; Q, theta) with both model and guide enumerated: a finite sum, no sampling."""
    return -TraceEnum_ELBO(max_plate_nesting=nesting).loss(model, guide, *args, **kwargs)


@pytest.mark.parametrize("name", ["gmm", "two_latents", "hmm", "poisson"])
def test_exact_posterior_makes_the_elbo_tight(name):
    torch.manual_seed(0)
    x1 = torch.cat([torch.randn(15, dtype=D) - 2, torch.randn(15, dtype=D) + 2.5])
    model, args, kwargs = {"gmm": gmm_problem(), "poisson": poisson_problem(), "two_latents": (two_latents, (x1,), {}),
                           "hmm": (hmm, (x1[:5],), {})}[name]
    nesting = 0 if name == "hmm" else 1
    guide, sampled = ExactPosterior(model), ExactPosterior(model, enumerate=None)
    for _ in range(2):  # at the initial parameters, then at random ones
        log_px = ppl_em.EM(model).e_step(*args, **kwargs).log_evidence.item()
        elbo = exact_elbo(model, guide, *args, nesting=nesting, **kwargs)
        assert elbo == pytest.approx(log_px, rel=1e-12, abs=1e-10)
        # At Q = p(z | x), log p(x, z) - log Q(z) = log p(x) for every z: one sample is exact.
        one_sample = -Trace_ELBO().loss(model, sampled, *args, **kwargs)
        assert one_sample == pytest.approx(log_px, rel=1e-12, abs=1e-10)
        store = pyro.get_param_store()
        for p in list(store.keys()):
            u = store[p].unconstrained()
            with torch.no_grad():
                u.add_(0.3 * torch.randn_like(u))


def test_exact_posterior_point_estimates_global_latents():
    x = torch.cat([torch.randn(20, dtype=D) - 3, torch.randn(20, dtype=D) + 3])
    guide = ExactPosterior(map_mixture)
    elbo = exact_elbo(map_mixture, guide, x)
    locs = pyro.param("ExactPosterior.locs").detach()  # (2,), a draw from the prior
    log_joint = dist.Normal(locs, 1.0).log_prob(x[:, None]).add(torch.tensor(0.5, dtype=D).log())
    oracle = log_joint.logsumexp(-1).sum() + dist.Normal(torch.zeros((), dtype=D), 3.0).log_prob(locs).sum()
    assert elbo == pytest.approx(oracle.item(), rel=1e-12)


def test_svi_with_exact_posterior_is_gradient_em():
    """Fisher's identity: the gradient of the ELBO at Q = p(z | x) is the gradient of log p(x)."""
    x = torch.tensor([-2.5, -0.1, 0.4, 2.0, 3.3], dtype=D)
    svi = SafeSVI(mixture, ExactPosterior(mixture), pyro.optim.SGD({"lr": 0.0}), default_loss(mixture, x))
    loss = svi.loss_and_grads(mixture, svi.guide, x)
    store = pyro.get_param_store()
    grads = {n: store[n].unconstrained().grad.clone() for n in ("phi", "mu")}
    phi, mu = store["phi"], store["mu"]
    log_px = (phi.log() + dist.Normal(mu, 1.0).log_prob(x[:, None])).logsumexp(-1).sum()
    oracle = torch.autograd.grad(-log_px, [store[n].unconstrained() for n in ("phi", "mu")])
    assert loss == pytest.approx(-log_px.item(), rel=1e-12)
    for (name, g), o in zip(grads.items(), oracle):
        assert torch.allclose(g, o, rtol=1e-10, atol=1e-12), name
    losses = [svi.step(x) for _ in range(3)]  # lr 0: the loss stays -log p(x) at fixed theta
    assert losses == pytest.approx([-log_px.item()] * 3, rel=1e-12)


def test_exact_posterior_refuses_what_it_cannot_sample():
    def three_way(x):
        with pyro.plate("data", len(x)):
            a, b, c = (pyro.sample(n, dist.Bernoulli(torch.tensor(0.5, dtype=D))) for n in "abc")
            pyro.sample("x", dist.Normal(a + 2 * b + 4 * c, 1.0), obs=x)

    x = torch.zeros(3, dtype=D)
    with pytest.raises(ValueError, match="several earlier latents .* not a chain"):
        exact_elbo(three_way, ExactPosterior(three_way), x)
    images = torch.zeros(4, 64, dtype=D)
    with pytest.raises(ExactInferenceError, match="continuous latent .* AutoAmortized"):
        ExactPosterior(vae.model)(images, vae.Decoder().double())


# -- variational EM reaches EM's optimum ---------------------------------------------------------
@pytest.mark.parametrize("problem", [gmm_problem, poisson_problem])
@pytest.mark.parametrize("Guide, lr", [(AutoCategorical, 0.1), (AutoAmortized, 0.02)])
def test_svi_reaches_the_em_optimum(problem, Guide, lr):
    model, args, kwargs = problem()
    best = em_optimum(model, args, kwargs)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = Guide(model)
    svi = SafeSVI(model, guide, pyro.optim.Adam({"lr": lr}), default_loss(model, *args, **kwargs))
    start = log_px_per_point(model, args, kwargs)
    for _ in range(150):
        svi.step(*args, **kwargs)
    end = log_px_per_point(model, args, kwargs)
    assert best - start > 0.1, "the test must start away from the optimum"
    assert abs(best - end) < 0.01, (start, end, best)
    assert guide.model is model


def test_mean_field_family_contains_the_mixture_posterior():
    """At q_i = w^(i) (the E-step's responsibilities) AutoCategorical's ELBO equals log p(x)."""
    model, args, kwargs = poisson_problem()
    post = ppl_em.EM(model).e_step(*args, **kwargs)
    guide = AutoCategorical(model)
    guide(*args, **kwargs)  # creates the logits
    pyro.get_param_store()["AutoCategorical.z"] = post.marginal("z").log()
    assert exact_elbo(model, guide, *args, **kwargs) == pytest.approx(post.log_evidence.item(), rel=1e-12)
    pyro.get_param_store()["AutoCategorical.z"] = torch.zeros(len(args[0]), 2, dtype=D)  # uniform q: a gap
    assert exact_elbo(model, guide, *args, **kwargs) < post.log_evidence.item() - 1.0


def test_auto_categorical_follows_the_minibatch():
    def model(x):
        mu = pyro.param("mu", torch.tensor([-1.0, 1.0], dtype=D))
        with pyro.plate("data", len(x), subsample_size=4) as idx:
            z = pyro.sample("z", dist.Categorical(torch.tensor([0.5, 0.5], dtype=D)))
            pyro.sample("x", dist.Normal(mu[z], 1.0), obs=x[idx])

    x = torch.randn(10, dtype=D)
    guide = AutoCategorical(model, create_plates=lambda x: pyro.plate("data", len(x), subsample_size=4))
    guide(x)
    pyro.get_param_store()["AutoCategorical.z"] = torch.randn(10, 2, dtype=D)
    trace = pyro.poutine.trace(guide).get_trace(x)
    idx = trace.nodes["data"]["value"]
    assert pyro.param("AutoCategorical.z").shape == (10, 2)
    assert torch.allclose(trace.nodes["z"]["fn"].logits, pyro.param("AutoCategorical.z")[idx].log_softmax(-1))


def test_guides_share_the_model_object_with_em():
    model, args, kwargs = poisson_problem()
    before = (model.__code__, dict(vars(model)))
    em = ppl_em.EM(model)
    em.step(*args)
    for Guide in (ExactPosterior, AutoCategorical, AutoAmortized):
        guide = Guide(model)
        svi = SafeSVI(model, guide, pyro.optim.Adam({"lr": 0.01}), default_loss(model, *args))
        assert guide.model is model and svi.model is model
        assert torch.isfinite(torch.tensor(svi.step(*args)))
    em.step(*args)  # EM runs on after SVI moved the same parameters
    assert (model.__code__, dict(vars(model))) == before


def test_auto_categorical_refuses_continuous_local_latents():
    with pytest.raises(ExactInferenceError, match="continuous latent .* AutoAmortized"):
        AutoCategorical(vae.model)(torch.zeros(4, 64, dtype=D), vae.Decoder().double())


# -- AutoAmortized: finding the encoder's input ---------------------------------------------------
def two_views(x, y):
    mu = pyro.param("mu", torch.tensor([-1.0, 1.0], dtype=D))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(torch.tensor([0.5, 0.5], dtype=D)))
        pyro.sample("x", dist.Normal(mu[z], 1.0), obs=x)
        pyro.sample("y", dist.Normal(mu[z], 2.0), obs=y)


def test_auto_amortized_needs_obs_when_several_sites_share_the_plate():
    x, y = torch.randn(5, dtype=D), torch.randn(5, dtype=D)
    with pytest.raises(ValueError, match=r"observed sites \['x', 'y'\]; pass obs="):
        AutoAmortized(two_views)(x, y)
    with pytest.raises(ValueError, match="obs='w' is not an observed site in plate 'data'"):
        AutoAmortized(two_views, obs="w")(x, y)
    guide = AutoAmortized(two_views, obs="y", hidden=(4,))
    guide(x, y)
    assert guide.encoder["z"].net[0].in_features == 1
    assert any(name.startswith("AutoAmortized.encoder$$$z.") for name in pyro.get_param_store().keys())


def test_auto_amortized_reads_transformed_data_off_the_model():
    def scaled(x):
        mu = pyro.param("mu", torch.tensor([-1.0, 1.0], dtype=D))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(torch.tensor([0.5, 0.5], dtype=D)))
            pyro.sample("x", dist.Normal(mu[z], 1.0), obs=x / 10)  # the observation is not an argument

    x = torch.tensor([-20.0, -10.0, 10.0, 20.0], dtype=D)
    guide = AutoAmortized(scaled, hidden=(4,))
    net = lambda v: guide.encoder["z"](v[:, None] / 10)  # noqa: E731
    elbo = exact_elbo(scaled, guide, x)
    probs = net(x).softmax(-1)
    mu = pyro.param("mu")
    log_joint = dist.Normal(mu, 1.0).log_prob(x[:, None] / 10) + torch.tensor(0.5, dtype=D).log()
    oracle = (probs * (log_joint - probs.log())).sum()
    assert elbo == pytest.approx(oracle.item(), rel=1e-10)


# -- SafeSVI --------------------------------------------------------------------------------------
def snapshot():
    store = pyro.get_param_store()
    return {n: store[n].detach().clone() for n in store.keys()}


def test_non_finite_loss_names_the_step_and_keeps_the_last_finite_parameters():
    model, (x, k), kwargs = gmm_problem()
    svi = SafeSVI(model, AutoCategorical(model), pyro.optim.Adam({"lr": 0.05}), default_loss(model, x, k, **kwargs))
    for _ in range(3):
        svi.step(x, k, **kwargs)
    good = snapshot()
    bad = x.clone()
    bad[7, 1] = float("inf")
    with pytest.raises(NonFiniteLossError, match="SVI step 4: the loss is .*inf.*before this step"):
        svi.step(bad, k, **kwargs)
    after = snapshot()
    assert after.keys() == good.keys()
    assert all(torch.equal(after[n], good[n]) for n in good)
    svi.step(x, k, **kwargs)  # and SVI carries on from there
    assert all(torch.isfinite(v).all() for v in snapshot().values())


def test_overflowing_update_is_undone():
    def model(x):
        loc = pyro.param("loc", torch.tensor(0.0, dtype=D))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x)

    x = torch.full((4,), 3.0, dtype=D)
    svi = SafeSVI(model, lambda x: None, pyro.optim.SGD({"lr": 1e308}), Trace_ELBO())
    with pytest.raises(NonFiniteLossError, match=r"SVI step 1: the update made parameter\(s\) \['loc'\] non-finite"):
        svi.step(x)
    assert pyro.param("loc").item() == 0.0


def test_non_finite_gradient_is_refused():
    def model(x):
        s = pyro.param("s", torch.tensor(0.0, dtype=D), constraint=constraints.greater_than(-1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(s.sqrt(), 1.0), obs=x)  # d sqrt(s)/ds is infinite at s = 0

    svi = SafeSVI(model, lambda x: None, pyro.optim.Adam({"lr": 0.1}), Trace_ELBO())
    with pytest.raises(NonFiniteLossError, match=r"SVI step 1: the gradient of parameter\(s\) \['s'\]"):
        svi.step(torch.ones(3, dtype=D))
    assert pyro.param("s").item() == 0.0


def test_default_loss_picks_the_estimator():
    x = torch.randn(6, 2, dtype=D)
    loss = default_loss(gmm.model, x, 2)
    assert isinstance(loss, TraceEnum_ELBO) and loss.max_plate_nesting == 1
    images = torch.zeros(4, 64, dtype=D)
    assert type(default_loss(vae.model, images, vae.Decoder().double())) is Trace_ELBO
