"""EM on models written as Pyro's own examples and tutorials write them (tests/pyro_style.py).

Oracles: Pyro's ``TraceEnum_ELBO`` for log p(x) (+ log p(theta)), the EM guarantee that the
objective never decreases, closed forms named by ``explain()``, the MAP's stationarity, and the
gradient M-step's fixed point for the closed forms it replaces.
"""

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO
from torch.distributions import constraints

import ppl_em
from ppl_em.priors import NoMAPError

from benchmarks import pyro_style as ps

D = torch.float64
SEQS, LENGTHS = ps.binary_sequences()
NETWORKS = (5, 7)


def _call(i, prior, batch_size=None):
    """(model, args, kwargs) of examples/hmm.py's model i on the synthetic sequences."""
    args = ps.args(hidden_dim=4 if i in (3, 4) else 3)
    kwargs = {"include_prior": prior, "batch_size": batch_size}
    if i in NETWORKS:
        torch.manual_seed(0)
        kwargs["net"] = ps.TonesGenerator(args, SEQS.shape[-1])
    return ps.HMM_MODELS[i], (SEQS, LENGTHS, args), kwargs


CASES = [(i, prior) for i in ps.HMM_MODELS for prior in (False, True) if not (i == 6 and prior)]


def _no_guide(*args, **kwargs):
    pass


@pytest.mark.parametrize("i, prior", CASES)
def test_hmm_examples_log_evidence_equals_trace_enum_elbo(i, prior):
    model, args, kwargs = _call(i, prior)
    em = ppl_em.EM(model)
    post = em.e_step(*args, **kwargs)
    store = pyro.get_param_store()
    conditioned = poutine.condition(model, data={n: store[n].detach() for n in em.structure.map_sites})
    # model 7 integrates its chain inside one DiscreteHMM site: nothing left to enumerate
    elbo = Trace_ELBO() if i == 7 else TraceEnum_ELBO(max_plate_nesting=2)
    expected = -elbo.loss(conditioned, _no_guide, *args, **kwargs)
    assert float(post.log_evidence + post.log_prior) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("i", sorted(ps.HMM_MODELS))
def test_hmm_examples_without_priors_fit_in_closed_form_and_never_decrease(i):
    model, args, kwargs = _call(i, prior=False)
    em = ppl_em.EM(model)
    losses = [em.step(*args, **kwargs) for _ in range(6)]
    assert all(b <= a + 1e-9 * abs(a) for a, b in zip(losses, losses[1:])), losses
    probabilities = {p: how for p, how in em.explain().items() if p.startswith("probs")}
    assert probabilities and all(how.startswith("closed form") for how in probabilities.values()), em.explain()
    if i in NETWORKS:  # the network's weights have no closed form, and say why
        assert all(how.startswith("gradient") for p, how in em.explain().items() if p.startswith("tones"))


@pytest.mark.parametrize("i", [i for i in ps.HMM_MODELS if i != 6])
def test_hmm_examples_priors_below_one_say_that_no_map_exists(i):
    """Dirichlet(0.9 I + 0.1) and Beta(0.1, 0.9): the MAP does not exist where counts are below 1 - alpha."""
    model, args, kwargs = _call(i, prior=True)
    em = ppl_em.EM(model)
    with pytest.raises(NoMAPError, match="concentrations below 1.*map_basis='unconstrained'"):
        em.step(*args, **kwargs)


@pytest.mark.parametrize("i", [i for i in ps.HMM_MODELS if i not in (6,) + NETWORKS])
def test_hmm_examples_priors_in_the_unconstrained_basis_are_conjugate_map(i):
    model, args, kwargs = _call(i, prior=True)
    em = ppl_em.EM(model, map_basis="unconstrained")
    losses = [em.step(*args, **kwargs) for _ in range(6)]
    assert all(b <= a + 1e-9 * abs(a) for a, b in zip(losses, losses[1:])), losses
    assert all("MAP with the conjugate" in how for how in em.explain().values()), em.explain()


def test_a_subsampled_plate_runs_in_full():
    """batch_size (a subsampled plate) is SVI's device: EM's steps use every row, as without it."""
    steps = {}
    for batch_size in (None, 3):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)  # the point-estimated sites start from a draw of their prior
        model, args, kwargs = _call(1, prior=False, batch_size=batch_size)
        em = ppl_em.EM(model)
        steps[batch_size] = [em.step(*args, **kwargs) for _ in range(3)]
    assert steps[3] == pytest.approx(steps[None], rel=1e-12)


def test_the_gmm_tutorial_gets_conjugate_map_for_weights_and_locations():
    """Dirichlet(0.5) weights and Normal(0, 10) locations are conjugate; the LogNormal scale is not."""
    data = torch.tensor([0.0, 1.0, 10.0, 11.0, 12.0], dtype=D)
    pyro.param("locs", torch.tensor([0.0, 10.0], dtype=D))
    em = ppl_em.EM(ps.tutorial_gmm, map_basis="unconstrained")
    losses = [em.step(data) for _ in range(60)]
    assert all(b <= a + 1e-9 for a, b in zip(losses, losses[1:]))
    routes = em.explain()
    assert routes["weights"].endswith("MAP with the conjugate Dirichlet prior at site weights")
    assert routes["locs"].endswith("MAP with the conjugate Normal prior at site locs")
    assert routes["scale"].startswith("gradient") and "LogNormal prior" in routes["scale"]
    w, p = em.e_step(data).marginal("assignment"), em.params
    # the mode in the unconstrained basis: weights = (N_j + alpha_j) / (n + sum alpha)
    assert torch.allclose(p["weights"], (w.sum(0) + 0.5) / (len(data) + 1.0), atol=1e-8)
    # given the scale, the locations are stationary points of log p(x, locs): sum w (x - l) / s^2 - l / 10^2 = 0
    gradient = (w * (data[:, None] - p["locs"])).sum(0) / p["scale"] ** 2 - p["locs"] / 100.0
    assert gradient.abs().max() < 1e-6


def test_the_gmm_tutorial_in_the_constrained_basis_says_why_there_is_no_map():
    data = torch.tensor([0.0, 1.0, 10.0, 11.0, 12.0], dtype=D)
    with pytest.raises(NoMAPError, match="Dirichlet prior at site 'weights'"):
        ppl_em.EM(ps.tutorial_gmm).step(data)


def test_the_enumeration_tutorials_feature_plate_global_is_point_estimated():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 3, (5, 40), generator=g)
    em = ppl_em.EM(ps.feature_plate_model)
    losses = [em.step(x) for _ in range(5)]
    assert all(b <= a + 1e-9 for a, b in zip(losses, losses[1:]))
    assert em.explain()["p"] == "closed form: Categorical.probs at site x, MAP with the conjugate Dirichlet prior at site p"


def test_the_enumeration_tutorials_hmm_without_a_data_plate():
    data = torch.randint(0, 4, (15,), generator=torch.Generator().manual_seed(1))
    em = ppl_em.EM(ps.tutorial_hmm)
    post = em.e_step(data, 4)
    store = pyro.get_param_store()
    conditioned = poutine.condition(ps.tutorial_hmm, data={n: store[n].detach() for n in em.structure.map_sites})
    expected = -TraceEnum_ELBO(max_plate_nesting=1).loss(conditioned, _no_guide, data, 4)
    assert float(post.log_evidence + post.log_prior) == pytest.approx(expected, rel=1e-10)
    losses = [em.step(data, 4) for _ in range(5)]
    assert all(b <= a + 1e-9 for a, b in zip(losses, losses[1:]))
    assert all("conjugate Dirichlet" in how for how in em.explain().values())


def test_capture_recapture_closed_forms_reach_the_gradient_m_steps_fixed_point():
    """mask * phi * z + (1 - mask): phi is selected where the animal was seen before, a constant elsewhere."""
    histories = ps.capture_histories()
    results = {}
    for how in ("auto", "gradient"):
        pyro.clear_param_store()
        pyro.param("phi", torch.tensor(0.5, dtype=D), constraint=constraints.unit_interval)
        pyro.param("rho", torch.tensor(0.5, dtype=D), constraint=constraints.unit_interval)
        em = ppl_em.EM(ps.cjs_model_1, m_step=how)
        for _ in range(150 if how == "auto" else 40):
            em.step(histories, None)
        results[how] = em.params
        if how == "auto":
            assert all(route.startswith("closed form") for route in em.explain().values()), em.explain()
    for name in ("phi", "rho"):
        assert torch.allclose(results["auto"][name], results["gradient"][name], atol=1e-5), name


def masked_latent(x, seen):
    """z masked where not seen, its child x observed everywhere: Pyro keeps p(z) under the mask."""
    phi = pyro.param("phi", torch.tensor([0.2, 0.8], dtype=D), constraint=constraints.simplex)
    mu = pyro.param("mu", torch.tensor([-1.0, 2.0], dtype=D))
    with pyro.plate("data", len(x)):
        with poutine.mask(mask=seen):
            z = pyro.sample("z", dist.Categorical(phi), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(mu[z], 1.0), obs=x)


def test_a_masked_enumerated_site_is_scored_as_trace_enum_elbo_scores_it():
    x = torch.tensor([-1.2, 0.3, 2.5, 1.9, -0.4, 3.1], dtype=D)
    seen = torch.tensor([True, False, True, False, True, False])
    em = ppl_em.EM(masked_latent)
    expected = -TraceEnum_ELBO(max_plate_nesting=1).loss(masked_latent, _no_guide, x, seen)
    assert float(em.e_step(x, seen).log_evidence) == pytest.approx(expected, rel=1e-12)
    losses = [em.step(x, seen) for _ in range(20)]
    assert all(b <= a + 1e-12 for a, b in zip(losses, losses[1:]))
    # at the fixed point phi_j is the mean responsibility over all points: their p(z) factor stays
    w = em.e_step(x, seen).marginal("z")
    assert torch.allclose(em.params["phi"], w.mean(0), atol=1e-6)
