"""models/hmm.py against its oracles: hmmlearn's Baum-Welch, and brute-force enumeration of all
K^T state paths on a short chain."""

import itertools
import math

import numpy as np
import pyro.distributions as dist
import pytest
import torch
from hmmlearn.hmm import GaussianHMM

import ppl_em
from ppl_em.chains import ChainTerms
from ppl_em.models import hmm

D = torch.float64


def _truth():
    pi = torch.tensor([0.6, 0.3, 0.1], dtype=D)
    A = torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]], dtype=D)
    mu = torch.tensor([[-2.0, 0.0], [0.0, 2.0], [2.0, 0.0]], dtype=D)
    sigma = torch.tensor([[0.7, 0.5], [0.6, 0.9], [1.0, 0.4]], dtype=D)
    return {"pi": pi, "A": A, "mu": mu, "sigma": sigma}


def test_em_is_baum_welch_step_by_step_against_hmmlearn():
    x, _ = hmm.generate(20, **_truth(), num_sequences=3, seed=1)  # (3, 20, 2)
    init = hmm.init_params(x, 3, seed=2)
    ref = GaussianHMM(3, covariance_type="diag", init_params="", params="stmc", n_iter=1, covars_prior=0.0)
    ref.startprob_, ref.transmat_ = init["pi"].numpy(), init["A"].numpy()
    ref.means_, ref.covars_ = init["mu"].numpy(), (init["sigma"] ** 2).numpy()
    flat, lengths = x.reshape(-1, 2).numpy(), [20, 20, 20]
    em = ppl_em.EM(hmm.model, reg_covar=0.0)  # hmmlearn with covars_prior=0 adds nothing either
    for _ in range(8):
        loss = em.step(x, 3, init=init)
        ref.fit(flat, lengths)  # one Baum-Welch iteration from where the last one stopped
        np.testing.assert_allclose(-loss, ref.monitor_.history[-1], rtol=1e-10)
        assert_params_equal_hmmlearns(em.params, ref)
    assert em.explain() == {"pi": "closed form: Categorical.probs at site z_0",
                            "A": "closed form: Categorical.probs at sites z_1, ..., z_19 (19)",
                            "mu": "closed form: Normal.loc at sites x_0, ..., x_19 (20)",
                            "sigma": "closed form: Normal.scale at sites x_0, ..., x_19 (20)"}


def assert_params_equal_hmmlearns(p, ref):
    """pi, A, mu, sigma^2 equal to a fitted hmmlearn GaussianHMM's (diagonal covariances)."""
    np.testing.assert_allclose(p["pi"].numpy(), ref.startprob_, rtol=1e-8, atol=1e-14)
    np.testing.assert_allclose(p["A"].numpy(), ref.transmat_, rtol=1e-8)
    np.testing.assert_allclose(p["mu"].numpy(), ref.means_, rtol=1e-8)
    np.testing.assert_allclose((p["sigma"] ** 2).numpy(), ref._covars_, rtol=1e-8)


def _brute_force(x, p):
    """log p(x, z) for every path z in {0..K-1}^T of one sequence x (T, d): (K,) * T array."""
    T, K = len(x), len(p["pi"])
    log_joint = torch.empty((K,) * T, dtype=D)
    emit = dist.Normal(p["mu"], p["sigma"]).log_prob(x[:, None]).sum(-1)  # (T, K)
    for path in itertools.product(range(K), repeat=T):
        lp = p["pi"][path[0]].log() + emit[0, path[0]]
        for t in range(1, T):
            lp = lp + p["A"][path[t - 1], path[t]].log() + emit[t, path[t]]
        log_joint[path] = lp
    return log_joint


def test_posterior_marginals_and_pairwise_posteriors_against_all_k_to_the_t_paths():
    truth = _truth()
    x, _ = hmm.generate(4, **truth, num_sequences=2, seed=7)  # (2, 4, 2): 2 x 3^4 paths
    post = ppl_em.EM(hmm.model).e_step(x, 3, init=truth)
    total = torch.zeros((), dtype=D)
    for s in range(2):
        log_joint = _brute_force(x[s], truth)
        log_px = log_joint.logsumexp(tuple(range(4)))
        total = total + log_px
        q = (log_joint - log_px).exp()  # p(z | x), (3, 3, 3, 3)
        for t in range(4):
            others = tuple(u for u in range(4) if u != t)
            assert torch.allclose(post.marginal(f"z_{t}")[s], q.sum(others), atol=1e-12)
        for t in range(1, 4):
            pair, names = post.joint(f"z_{t}")
            assert names == [f"z_{t - 1}", f"z_{t}"]
            others = tuple(u for u in range(4) if u not in (t - 1, t))
            assert torch.allclose(pair[s], q.sum(others), atol=1e-12)
    assert torch.allclose(post.log_evidence, total, rtol=1e-12)


def test_hard_em_posterior_is_the_viterbi_path():
    truth = _truth()
    x, _ = hmm.generate(4, **truth, num_sequences=2, seed=8)
    post = ppl_em.EM(hmm.model, posterior="hard").e_step(x, 3, init=truth)
    for s in range(2):
        log_joint = _brute_force(x[s], truth)
        best = np.unravel_index(int(log_joint.argmax()), log_joint.shape)
        assert [int(post.marginal(f"z_{t}")[s].argmax()) for t in range(4)] == list(best)
        assert all(post.marginal(f"z_{t}")[s].max() == 1 for t in range(4))  # one-hot


def test_generate_follows_the_transition_matrix_and_em_never_decreases_log_px():
    truth = _truth()
    x, z = hmm.generate(30, **truth, num_sequences=60, seed=3)  # 60 x 29 transitions
    counts = torch.zeros(3, 3, dtype=D).index_put_((z[:, :-1].reshape(-1), z[:, 1:].reshape(-1)),
                                                   torch.ones(60 * 29, dtype=D), accumulate=True)
    freq = counts / counts.sum(-1, keepdim=True)
    se = (truth["A"] * (1 - truth["A"]) / counts.sum(-1, keepdim=True)).sqrt()
    assert ((freq - truth["A"]).abs() <= 5 * se).all()
    em = ppl_em.EM(hmm.model)
    trajectory = [-em.step(x[:5], 3) for _ in range(6)]
    assert all(b >= a - 1e-9 * abs(a) for a, b in zip(trajectory, trajectory[1:])), trajectory


def test_bad_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"x must have shape \(T, d\).*got \(5,\).*x\[:, None\]"):
        ppl_em.EM(hmm.model).step(torch.zeros(5, dtype=D), 2)


def test_hard_em_on_the_vectorised_chain_skips_log_px_in_its_steps_alone():
    """EM's own hard steps trace the chain site for its best path only (no sum-product pass: the step reads
    max_w log p(x, w) and Q); the E-step a user reads keeps the exact log p(x). Oracles: brute force over every
    path of a short chain, for both numbers, and the same E-step with log p(x), for Q and the objective."""
    truth = _truth()
    x, _ = hmm.generate(4, **truth, num_sequences=2, seed=8)
    em = ppl_em.EM(hmm.vectorized_model, posterior="hard")
    em.e_step(x, 3, truth)  # the structure and the plan
    log_joint = torch.stack([torch.as_tensor(_brute_force(x[s], truth)) for s in range(2)])
    post = em.e_step(x, 3, truth)
    torch.testing.assert_close(post.objective, log_joint.flatten(1).amax(1).sum(), rtol=1e-12, atol=0)
    torch.testing.assert_close(post.log_evidence, log_joint.flatten(1).logsumexp(1).sum(), rtol=1e-12, atol=0)
    quick = ppl_em.posterior.exact_posterior(em.model, em.structure, (x, 3, truth), {}, mode="hard", evidence=False)
    assert torch.isnan(quick.log_evidence) and torch.equal(quick.objective, post.objective)
    for name, w in post.weights.items():  # Q: a tensor per site, or a chain's tables
        tables = (lambda v: v.tensors() if isinstance(v, ChainTerms) else [v])
        assert all(torch.equal(a, b) for a, b in zip(tables(w), tables(quick.weights[name]))), name
    steps = [em.step(x, 3, truth) for _ in range(3)]  # the steps' loss is -max_w log p(x, w) - log p(theta)
    assert all(b <= a + 1e-9 * abs(a) for a, b in zip(steps, steps[1:])) and all(map(math.isfinite, steps))
    with pytest.raises(ValueError, match="best path has no log p"):
        ppl_em.posterior._contract(quick.trace, {s["name"]: torch.zeros_like(ppl_em.posterior.masked_log_prob(s))
                                                 for s in ppl_em.posterior.sample_sites(quick.trace)},
                                   ppl_em.posterior.LogRing())
