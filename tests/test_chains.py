"""Chain sites (``DiscreteHMM``) under the engine, against oracles: brute-force enumeration of every
state path, a sequential log-space forward recursion differentiated by autograd, hmmlearn's Baum-Welch
and Viterbi, and the ``pyro.markov`` loop model of the same HMM."""

import itertools
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from hmmlearn.hmm import GaussianHMM
from torch.distributions import constraints

import ppl_em
from ppl_em import chains
from ppl_em.fast import recursions
from ppl_em.models import hmm
from ppl_em.result import count_observations

from test_models_hmm import _truth, assert_params_equal_hmmlearns

D = torch.float64


@pytest.fixture(autouse=True, params=["compiled", "blocked"])
def recursion(request, monkeypatch):
    """Every test runs twice: with the compiled recursions (numba, the CPU's default for chains of
    COMPILED_STEPS steps or more; here for every chain) and with the blocked torch recursions (a GPU's,
    shorter chains', or a CPU's without numba)."""
    if request.param == "blocked":
        monkeypatch.setattr(recursions, "available", lambda t: False)
    else:
        assert recursions.available(torch.zeros(1)), "numba is a dependency: the compiled recursions must run"
        monkeypatch.setattr(chains, "COMPILED_STEPS", 0)
    return request.param


def _random_tables(batch, T, K, time_dependent, seed):
    g = torch.Generator().manual_seed(seed)
    initial = torch.randn(batch + (K,), generator=g, dtype=D).log_softmax(-1)
    shape = batch + (T, K, K) if time_dependent else (K, K)
    transition = (2 * torch.randn(shape, generator=g, dtype=D)).log_softmax(-1)
    emission = 3 * torch.randn(batch + (T, K), generator=g, dtype=D)
    return initial, transition, emission


def _paths(initial, transition, emission):
    """log p(x, w) for every path w_{-1}, w_0, ..., w_{T-1} of one chain: a (K,) * (T + 1) table."""
    T, K = emission.shape
    tr = transition if transition.dim() == 3 else transition.expand(T, K, K)
    table = torch.empty((K,) * (T + 1), dtype=D)
    for w in itertools.product(range(K), repeat=T + 1):
        table[w] = initial[w[0]] + sum(tr[t, w[t], w[t + 1]] + emission[t, w[t + 1]] for t in range(T))
    return table


@pytest.mark.parametrize("time_dependent", [False, True])
def test_log_evidence_and_its_gradients_are_the_posterior_of_every_path(time_dependent):
    T, K = 4, 3
    tables = [t.requires_grad_() for t in _random_tables((2,), T, K, time_dependent, seed=1)]
    log_p = chains.log_evidence(*tables)  # (2,)
    g_init, g_trans, g_emit = torch.autograd.grad(log_p.sum(), tables)
    pairs = torch.zeros(T, K, K, dtype=D)
    for s in range(2):
        trans = tables[1][s] if time_dependent else tables[1]
        joint = _paths(tables[0][s].detach(), trans.detach(), tables[2][s].detach())
        assert torch.allclose(log_p[s], joint.logsumexp(tuple(range(T + 1))), rtol=1e-12)
        q = (joint - joint.logsumexp(tuple(range(T + 1)))).exp()  # p(w | x)
        marg = lambda keep: q.sum(tuple(u for u in range(T + 1) if u not in keep))  # noqa: E731
        assert torch.allclose(g_init[s], marg((0,)), atol=1e-12)
        for t in range(T):
            assert torch.allclose(g_emit[s, t], marg((t + 1,)), atol=1e-12)  # p(w_t | x)
            pair = marg((t, t + 1))  # p(w_{t-1}, w_t | x)
            if time_dependent:
                assert torch.allclose(g_trans[s, t], pair, atol=1e-12)
            pairs[t] += pair
    if not time_dependent:  # one shared matrix: its gradient is the expected transition counts
        assert torch.allclose(g_trans, pairs.sum(0), atol=1e-12)


def _sequential(initial, transition, emission, reduce):
    """The textbook forward recursion in log space, one time step at a time."""
    tr = transition if transition.dim() > 2 else transition.unsqueeze(0)
    log_alpha = initial
    for t in range(emission.shape[-2]):
        step = tr[..., 0 if tr.shape[-3] == 1 else t, :, :]
        log_alpha = reduce(log_alpha.unsqueeze(-1) + step, -2) + emission[..., t, :]
    return reduce(log_alpha, -1)


@pytest.mark.parametrize("T", [1, 2, 7, 150, 1001])
def test_blocked_recursions_equal_the_sequential_forward_algorithm(T):
    # Lengths that leave a remainder after the blocks; batch dimensions only the first state has.
    initial, transition, emission = _random_tables((2,), T, 4, False, seed=T)
    initial = torch.randn(3, 1, 4, dtype=D).log_softmax(-1)
    ours = [t.clone().requires_grad_() for t in (initial, transition, emission)]
    ref = [t.clone().requires_grad_() for t in (initial, transition, emission)]
    weights = torch.rand(3, 2, dtype=D)
    a, b = chains.log_evidence(*ours), _sequential(*ref, torch.logsumexp)
    assert a.shape == (3, 2) and torch.allclose(a, b, rtol=1e-12)
    for ga, gb in zip(torch.autograd.grad(a, ours, weights), torch.autograd.grad(b, ref, weights)):
        assert torch.allclose(ga, gb, atol=1e-10)


def test_max_semiring_gives_the_indicators_of_the_best_path():
    T, K = 5, 3
    tables = [t.requires_grad_() for t in _random_tables((), T, K, False, seed=2)]
    best = chains.log_evidence(*tables, semiring="max")
    g_init, g_trans, g_emit = torch.autograd.grad(best, tables)
    joint = _paths(*(t.detach() for t in tables))
    path = np.unravel_index(int(joint.argmax()), joint.shape)
    assert torch.allclose(best, joint.max())
    assert g_emit.argmax(-1).tolist() == list(path[1:]) and set(g_emit.unique().tolist()) == {0.0, 1.0}
    counts = torch.zeros(K, K, dtype=D)
    for t in range(T):
        counts[path[t], path[t + 1]] += 1
    assert torch.equal(g_trans, counts)


@pytest.mark.parametrize("T", [1, 7, 50, 203])
@pytest.mark.parametrize("homogeneous", [True, False])
def test_viterbi_with_back_pointers_equals_autograd_through_the_max_sum_recursion(T, homogeneous):
    """The blocked Viterbi (block products with back-pointers, no graph) against the log-space max-sum
    recursion differentiated by autograd: the same best score per chain and the same path indicators,
    with batch dimensions that only the first state has and weights per chain."""
    initial, transition, emission = _random_tables((2,), T, 4, not homogeneous, seed=T + 7)
    initial = torch.randn(3, 1, 4, dtype=D).log_softmax(-1)
    ours = [t.clone().requires_grad_() for t in (initial, transition, emission)]
    ref = [t.clone().requires_grad_() for t in (initial, transition, emission)]
    weights = torch.rand(3, 2, dtype=D)
    a, b = chains.log_evidence(*ours, semiring="max"), chains._log_space(*ref, chains._max)
    assert a.shape == (3, 2) and torch.allclose(a, b, rtol=1e-12)
    for ga, gb in zip(torch.autograd.grad(a, ours, weights), torch.autograd.grad(b, ref, weights)):
        assert torch.allclose(ga, gb, atol=1e-12)


@pytest.mark.parametrize("homogeneous", [True, False])
def test_viterbi_reads_back_only_the_paths_that_get_a_gradient(homogeneous):
    """Under hard EM the enumerated first state's other values get an incoming gradient of 0: their paths
    are not read back, and the gradients equal autograd's through the max-sum recursion, zeros included."""
    initial, transition, emission = _random_tables((2,), 60, 3, not homogeneous, seed=11)
    initial = torch.randn(4, 1, 3, dtype=D).log_softmax(-1)
    ours = [t.clone().requires_grad_() for t in (initial, transition, emission)]
    ref = [t.clone().requires_grad_() for t in (initial, transition, emission)]
    weights = torch.zeros(4, 2, dtype=D)
    weights[1, 0], weights[3, 1] = 1.0, 0.5  # one live chain per batch element, at different first states
    a, b = chains.log_evidence(*ours, semiring="max"), chains._log_space(*ref, chains._max)
    assert torch.allclose(a, b, rtol=1e-12)
    grads = torch.autograd.grad(a, ours, weights)
    for ga, gb in zip(grads, torch.autograd.grad(b, ref, weights)):
        assert torch.allclose(ga, gb, atol=1e-12)
    assert float(grads[0][0].abs().sum()) == 0.0 and float(grads[2].sum()) == pytest.approx(1.5 * 60)


def test_an_underflowing_scaled_recursion_falls_back_to_log_space():
    # From state 0 the chain can only stay in 0, whose observation at t = 2 is 1000 nats less likely
    # than state 1's: scaled by the best state, every reachable probability underflows to 0.
    initial = torch.tensor([0.0, -math.inf], dtype=D, requires_grad=True)
    transition = torch.tensor([[0.0, -math.inf], [-math.inf, 0.0]], dtype=D, requires_grad=True)
    emission = torch.zeros(5, 2, dtype=D)
    emission[2] = torch.tensor([-1000.0, 0.0])
    emission.requires_grad_()
    log_p = chains.log_evidence(initial, transition, emission)
    assert float(log_p.detach()) == -1000.0
    _, g_trans, g_emit = torch.autograd.grad(log_p, [initial, transition, emission])
    assert torch.equal(g_emit, torch.tensor([[1.0, 0.0]] * 5, dtype=D))
    assert torch.equal(g_trans, torch.tensor([[5.0, 0.0], [0.0, 0.0]], dtype=D))


def test_a_step_whose_scaled_sum_is_zero_falls_back_to_log_space():
    # States persist; state 0 explains x_1 1000 nats worse than state 1, state 1 explains x_3 as badly: every
    # path pays 1000 nats once. Scaled by the best state, the backward recursion's sum at t = 1 is 0 (0 / 0).
    initial = torch.tensor([math.log(0.5)] * 2, dtype=D, requires_grad=True)
    transition = torch.tensor([[0.0, -math.inf], [-math.inf, 0.0]], dtype=D, requires_grad=True)
    emission = torch.zeros(5, 2, dtype=D)
    emission[1, 0] = emission[3, 1] = -1000.0
    emission.requires_grad_()
    log_p = chains.log_evidence(initial, transition, emission)
    assert float(log_p.detach()) == pytest.approx(-1000.0, abs=1e-9)
    g_init, g_trans, g_emit = torch.autograd.grad(log_p, [initial, transition, emission])
    assert torch.allclose(g_init, torch.tensor([0.5, 0.5], dtype=D))
    assert torch.allclose(g_emit, torch.full((5, 2), 0.5, dtype=D))
    assert torch.allclose(g_trans, torch.tensor([[2.5, 0.0], [0.0, 2.5]], dtype=D))


def test_long_chains_run_compiled_and_short_ones_blocked(recursion, monkeypatch):
    """By default a chain of COMPILED_STEPS (4096) steps or more runs the compiled recursions where numba
    runs, a shorter one the blocked torch recursions (which never import numba); the two agree."""
    calls = []
    backward = recursions.backward
    monkeypatch.setattr(recursions, "backward", lambda *a: calls.append(len(calls)) or backward(*a))
    monkeypatch.setattr(chains, "COMPILED_STEPS", 4096)
    short, long = (_random_tables((), T, 3, False, seed=T) for T in (4095, 4096))
    chains.log_evidence(*short)
    assert calls == []
    by_default = chains.log_evidence(*long)
    assert len(calls) == (1 if recursion == "compiled" else 0)
    monkeypatch.setattr(chains, "COMPILED_STEPS", 10**9)  # the other path for the same tables
    assert torch.allclose(by_default, chains.log_evidence(*long), rtol=1e-12)


def test_mismatched_tables_are_a_clear_error():
    with pytest.raises(ValueError, match=r"Expected chain tables.*transition \(\.\.\., T, K, K\).*got initial \(3,\), "
                                         r"transition \(2, 2\).*DiscreteHMM"):
        chains.log_evidence(torch.zeros(3), torch.zeros(2, 2), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="semiring must be 'sum' or 'max'"):
        chains.log_evidence(torch.zeros(2), torch.zeros(2, 2), torch.zeros(5, 2), semiring="min")


# -- the vectorised HMM model file ------------------------------------------------------------------
def test_vectorized_model_has_the_loop_model_posterior():
    x, _ = hmm.generate(4, **_truth(), num_sequences=2, seed=7)  # (2, 4, 2)
    loop = ppl_em.EM(hmm.model).e_step(x, 3, init=_truth())
    pyro.clear_param_store()
    post = ppl_em.EM(hmm.vectorized_model).e_step(x, 3, init=_truth())
    assert torch.allclose(post.log_evidence, loop.log_evidence, rtol=1e-13)
    assert torch.allclose(post.marginal("z_0"), loop.marginal("z_0"), atol=1e-13)
    states, counts = post.chain("x_rest")  # p(z_t | x) for t = 1..3, expected transition counts
    assert states.shape == (2, 3, 3) and counts.shape == (3, 3)
    assert torch.allclose(states, torch.stack([loop.marginal(f"z_{t}") for t in range(1, 4)], 1), atol=1e-13)
    pairs = sum(loop.joint(f"z_{t}")[0].sum(0) for t in range(1, 4))
    assert torch.allclose(counts, pairs, atol=1e-13)
    assert torch.equal(post.marginal("x_rest"), states)
    assert post.joint("x_rest")[1] == ["z_0"]  # at site level, the chain depends on z_0 only
    assert count_observations(hmm.vectorized_model, (x, 3), {}) == 2 * 4  # every time step of every sequence
    with pytest.raises(KeyError, match="'x_0' is not a chain.*\\['x_rest'\\]"):
        post.chain("x_0")


def _hmmlearn(init):
    ref = GaussianHMM(3, covariance_type="diag", init_params="", params="stmc", n_iter=1,
                      means_prior=0.0, means_weight=0.0, covars_prior=0.0, covars_weight=1.0)
    ref.startprob_, ref.transmat_ = init["pi"].numpy(), init["A"].numpy()
    ref.means_, ref.covars_ = init["mu"].numpy(), (init["sigma"] ** 2).numpy()
    return ref


def test_em_is_baum_welch_step_by_step_against_hmmlearn():
    x, _ = hmm.generate(60, **_truth(), num_sequences=3, seed=1)  # (3, 60, 2)
    init = hmm.init_params(x, 3, seed=2)
    ref = _hmmlearn(init)
    em = ppl_em.EM(hmm.vectorized_model, reg_covar=0.0)  # hmmlearn with its priors off adds nothing either
    for _ in range(8):
        loss = em.step(x, 3, init=init)
        ref.fit(x.reshape(-1, 2).numpy(), [60] * 3)  # one Baum-Welch iteration from where the last one stopped
        np.testing.assert_allclose(-loss, ref.monitor_.history[-1], rtol=1e-10)
        assert_params_equal_hmmlearns(em.params, ref)
    assert em.explain() == {"pi": "closed form: Categorical.probs at site z_0",
                            "A": "closed form: DiscreteHMM.transition_logits at site x_rest",
                            "mu": "closed form: Normal.loc at sites x_0 and x_rest",
                            "sigma": "closed form: Normal.scale at sites x_0 and x_rest"}


def test_em_trajectory_equals_the_loop_model_and_never_decreases():
    x, _ = hmm.generate(12, **_truth(), num_sequences=4, seed=3)
    init = hmm.init_params(x, 3, seed=4)
    loop = ppl_em.EM(hmm.model)
    slow = [-loop.step(x, 3, init=init) for _ in range(6)]
    pyro.clear_param_store()
    vec = ppl_em.EM(hmm.vectorized_model)
    fast = [-vec.step(x, 3, init=init) for _ in range(6)]
    np.testing.assert_allclose(fast, slow, rtol=1e-12)
    assert all(b >= a - 1e-9 * abs(a) for a, b in zip(fast, fast[1:])), fast


def test_hard_em_posterior_is_hmmlearns_viterbi_path():
    x, _ = hmm.generate(300, **_truth(), num_sequences=2, seed=5)
    truth = _truth()
    post = ppl_em.EM(hmm.vectorized_model, posterior="hard").e_step(x, 3, init=truth)
    states, _ = post.chain("x_rest")
    z = torch.cat([post.marginal("z_0").unsqueeze(1), states], 1)  # (2, 300, 3), one-hot
    assert set(z.unique().tolist()) == {0.0, 1.0} and torch.equal(z.sum(-1), torch.ones(2, 300, dtype=D))
    ref = _hmmlearn(truth)
    for s in range(2):
        log_prob, path = ref.decode(x[s].numpy(), algorithm="viterbi")
        assert z[s].argmax(-1).tolist() == path.tolist()
    best = sum(ref.decode(x[s].numpy(), algorithm="viterbi")[0] for s in range(2))
    np.testing.assert_allclose(float(post.objective), best, rtol=1e-12)


def test_float32_data_fit_in_float32_like_float64():
    x, _ = hmm.generate(200, **_truth(), num_sequences=2, seed=6)
    init = hmm.init_params(x, 3, seed=1)
    em64 = ppl_em.EM(hmm.vectorized_model)
    traj64 = [-em64.step(x, 3, init=init) for _ in range(5)]
    pyro.clear_param_store()
    em32 = ppl_em.EM(hmm.vectorized_model)
    init32 = {k: v.float() for k, v in init.items()}
    traj32 = [-em32.step(x.float(), 3, init=init32) for _ in range(5)]
    assert all(v.dtype == torch.float32 for v in em32.params.values())
    np.testing.assert_allclose(traj32, traj64, rtol=1e-5)


def _time_dependent_model(x, k, init):
    """The same HMM as one DiscreteHMM site with pi in a first transition matrix: logits (T, k, k)."""
    pi = pyro.param("pi", init["pi"].clone(), constraint=constraints.simplex)
    A = pyro.param("A", init["A"].clone(), constraint=constraints.simplex)
    mu = pyro.param("mu", init["mu"].clone())
    sigma = pyro.param("sigma", init["sigma"].clone(), constraint=constraints.positive)
    S, T, _ = x.shape
    steps = torch.cat([pi.log().expand(1, k, k), A.log().expand(T - 1, k, k)])  # every row of step 0 is log pi
    with pyro.plate("sequences", S):
        chain = dist.DiscreteHMM(x.new_zeros(k), steps, dist.Normal(mu, sigma).to_event(1))
        pyro.sample("x", chain, obs=x)


def test_parameters_joined_by_cat_each_get_their_closed_form():
    x, _ = hmm.generate(30, **_truth(), num_sequences=3, seed=8)
    init = hmm.init_params(x, 3, seed=3)
    em = ppl_em.EM(_time_dependent_model)
    ours = [-em.step(x, 3, init) for _ in range(5)]
    assert em.explain()["pi"] == em.explain()["A"] == "closed form: DiscreteHMM.transition_logits at site x"
    pyro.clear_param_store()
    vec = ppl_em.EM(hmm.vectorized_model)
    np.testing.assert_allclose(ours, [-vec.step(x, 3, init=init) for _ in range(5)], rtol=1e-12)
    post = em.e_step(x, 3, init)
    states, pairs = post.chain("x")
    # One table per step, in the layout of the logits (T, k, k): shared by the sequences, summed over them.
    assert states.shape == (3, 30, 3) and pairs.shape == (30, 3, 3)
    assert torch.allclose(pairs.sum((-1, -2)), torch.full((30,), 3.0, dtype=D))
    assert torch.allclose(pairs.sum(-2), states.sum(0), atol=1e-12)  # p(z_t) = sum_i p(z_{t-1} = i, z_t)


def test_gradient_m_step_on_a_chain_increases_log_px():
    x, _ = hmm.generate(40, **_truth(), num_sequences=2, seed=9)
    init = hmm.init_params(x, 3, seed=5)
    em = ppl_em.EM(hmm.vectorized_model, m_step="gradient", max_grad_iter=20)
    trajectory = [-em.step(x, 3, init=init) for _ in range(3)]
    assert trajectory[-1] > trajectory[0] and all(b >= a - 1e-9 * abs(a) for a, b in zip(trajectory, trajectory[1:]))


def test_a_single_time_step_is_a_mixture_and_a_bad_shape_a_clear_error():
    x, _ = hmm.generate(1, **_truth(), num_sequences=5, seed=10)  # (5, 1, 2): no chain site at all
    post = ppl_em.EM(hmm.vectorized_model).e_step(x, 3, init=_truth())
    assert "x_rest" not in post.weights and post.marginal("z_0").shape == (5, 3)
    with pytest.raises(ValueError, match=r"x must have shape \(T, d\).*got \(5,\).*x\[:, None\]"):
        ppl_em.EM(hmm.vectorized_model).step(torch.zeros(5, dtype=D), 2)


def _categorical_hmm(x, init, mask=None):
    """A discrete-emission HMM written the same way: B_jv = p(x_t = v | z_t = j)."""
    pi = pyro.param("pi", init["pi"].clone(), constraint=constraints.simplex)
    A = pyro.param("A", init["A"].clone(), constraint=constraints.simplex)
    B = pyro.param("B", init["B"].clone(), constraint=constraints.simplex)
    k = len(init["pi"])
    with pyro.plate("sequences", x.shape[0]), pyro.poutine.mask(mask=True if mask is None else mask):
        z0 = pyro.sample("z_0", dist.Categorical(pi), infer={"enumerate": "parallel"})
        pyro.sample("x_0", dist.Categorical(B[z0]), obs=x[:, 0])
        chain = dist.DiscreteHMM(torch.eye(k, dtype=D).log()[z0], A.log(), dist.Categorical(B), duration=x.shape[1] - 1)
        pyro.sample("x_rest", chain, obs=x[:, 1:])


def test_other_emission_families_reuse_their_rules_against_hmmlearn_and_masks_drop_sequences():
    from hmmlearn.hmm import CategoricalHMM

    g = torch.Generator().manual_seed(0)
    x = torch.randint(5, (3, 40), generator=g)
    B = torch.rand(3, 5, generator=g, dtype=D)
    init = {"pi": _truth()["pi"], "A": _truth()["A"], "B": B / B.sum(-1, keepdim=True)}
    ref = CategoricalHMM(3, init_params="", params="ste", n_iter=1, n_features=5)
    ref.startprob_, ref.transmat_, ref.emissionprob_ = (v.numpy() for v in init.values())
    em = ppl_em.EM(_categorical_hmm)
    for _ in range(4):
        loss = em.step(x, init)
        ref.fit(x.reshape(-1, 1).numpy(), [40] * 3)
        np.testing.assert_allclose(-loss, ref.monitor_.history[-1], rtol=1e-10)
        np.testing.assert_allclose(em.params["B"].numpy(), ref.emissionprob_, rtol=1e-8)
        np.testing.assert_allclose(em.params["A"].numpy(), ref.transmat_, rtol=1e-8)
    assert em.explain()["B"] == "closed form: Categorical.probs at sites x_0 and x_rest"
    pyro.clear_param_store()
    masked = ppl_em.EM(_categorical_hmm)
    with_mask = [masked.step(x, init, torch.tensor([True, True, False])) for _ in range(3)]
    pyro.clear_param_store()
    dropped = ppl_em.EM(_categorical_hmm)
    np.testing.assert_allclose(with_mask, [dropped.step(x[:2], init) for _ in range(3)], rtol=1e-12)


def test_hard_em_keeps_its_closed_forms_when_a_transition_never_occurs():
    eps = 1e-12  # the Viterbi paths never take these transitions
    cyclic = dict(_truth(), A=torch.tensor([[0.9, 0.1, eps], [eps, 0.9, 0.1], [0.1, eps, 0.9]], dtype=D))
    x, _ = hmm.generate(100, **cyclic, num_sequences=2, seed=11)
    em = ppl_em.EM(hmm.vectorized_model, posterior="hard")
    objective = [-em.step(x, 3, init=cyclic) for _ in range(4)]
    _, counts = em.e_step(x, 3, init=cyclic).chain("x_rest")
    assert bool((counts == 0).any())  # A_ij estimated as 0: log A_ij = -inf must not poison the check
    assert all(how.startswith("closed form") for how in em.explain().values()), em.explain()
    assert all(b >= a - 1e-9 * abs(a) for a, b in zip(objective, objective[1:])), objective


def test_float32_closed_forms_survive_their_check_on_a_long_chain():
    # One sequence of 1e5 steps: its statistics are single sums over all of them (no chunks).
    g = torch.Generator().manual_seed(0)
    T, k, d = 100_000, 8, 4
    segment = (torch.rand(T, generator=g) < 0.1).cumsum(0)  # a sticky chain: a new state every ~10 steps
    z = torch.randint(k, (int(segment[-1]) + 1,), generator=g)[segment]
    mu = 2 * torch.randn(k, d, generator=g)
    x = (mu[z] + torch.randn(T, d, generator=g)).float()
    em = ppl_em.EM(hmm.vectorized_model, reg_covar=0.0)
    em.step(x, k)
    assert all(how.startswith("closed form") for how in em.explain().values()), em.explain()
    assert all(v.dtype == torch.float32 for v in em.params.values())
