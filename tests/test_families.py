"""Closed forms of the other families: each M-step against its textbook formula on the E-step's
responsibilities, and against the gradient M-step's optimum (the same maximiser of E_Q[log p])."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints, transform_to

import ppl_em

D = torch.float64


def _sample(fn, n, seed):
    torch.manual_seed(seed)
    return fn.sample((n,))


def _two(fn0, fn1, n=60):
    return torch.cat([_sample(fn0, n, 1), _sample(fn1, n, 2)])


FAMILIES = {
    # name: (observation given p and z, initial p, its constraint, data, the M-step from w (n, k) and x)
    "Exponential": (lambda p, z: dist.Exponential(p[z]), [0.5, 2.0], constraints.positive,
                    _two(torch.distributions.Exponential(torch.tensor(0.3, dtype=D)),
                         torch.distributions.Exponential(torch.tensor(3.0, dtype=D))),
                    lambda w, x: w.sum(0) / (w.T @ x)),
    "Gamma": (lambda p, z: dist.Gamma(torch.tensor(2.0, dtype=D), p[z]), [0.5, 2.0], constraints.positive,
              _two(torch.distributions.Gamma(2.0, torch.tensor(0.3, dtype=D)),
                   torch.distributions.Gamma(2.0, torch.tensor(3.0, dtype=D))),
              lambda w, x: 2.0 * w.sum(0) / (w.T @ x)),
    "Geometric": (lambda p, z: dist.Geometric(probs=p[z]), [0.3, 0.6], constraints.unit_interval,
                  _two(torch.distributions.Geometric(torch.tensor(0.1, dtype=D)),
                       torch.distributions.Geometric(torch.tensor(0.8, dtype=D))),
                  lambda w, x: w.sum(0) / (w.sum(0) + w.T @ x)),
    "Binomial": (lambda p, z: dist.Binomial(10, probs=p[z]), [0.3, 0.6], constraints.unit_interval,
                 _two(torch.distributions.Binomial(10, torch.tensor(0.1, dtype=D)),
                      torch.distributions.Binomial(10, torch.tensor(0.8, dtype=D))),
                 lambda w, x: (w.T @ x) / (10 * w.sum(0))),
    "Binomial logits": (lambda p, z: dist.Binomial(10, logits=p[z]), [-1.0, 0.5], constraints.real,
                        _two(torch.distributions.Binomial(10, torch.tensor(0.1, dtype=D)),
                             torch.distributions.Binomial(10, torch.tensor(0.8, dtype=D))),
                        lambda w, x: torch.logit((w.T @ x) / (10 * w.sum(0)))),
    "Multinomial": (lambda p, z: dist.Multinomial(8, probs=p[z]), [[0.2, 0.3, 0.5], [0.5, 0.3, 0.2]],
                    constraints.simplex,
                    _two(torch.distributions.Multinomial(8, torch.tensor([0.7, 0.2, 0.1], dtype=D)),
                         torch.distributions.Multinomial(8, torch.tensor([0.1, 0.2, 0.7], dtype=D))),
                    lambda w, x: (w.T @ x) / (w.T @ x).sum(-1, keepdim=True)),
}


def _mixture(name):
    obs, start, constraint, _, _ = FAMILIES[name]

    def model(x):
        phi = pyro.param("phi", torch.tensor([0.5, 0.5], dtype=D), constraint=constraints.simplex)
        p = pyro.param("p", torch.tensor(start, dtype=D), constraint=constraint)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(phi), infer={"enumerate": "parallel"})
            pyro.sample("x", obs(p, z), obs=x)
    return model


@pytest.mark.parametrize("name", list(FAMILIES))
def test_each_family_update_is_its_textbook_formula(name):
    x, formula = FAMILIES[name][3], FAMILIES[name][4]
    em = ppl_em.EM(_mixture(name))
    for _ in range(3):
        w = em.e_step(x).marginal("z")  # (n, 2)
        em.step(x)
        assert torch.allclose(em.params["p"], formula(w, x), rtol=1e-10)
    family = name.split()[0]
    assert em.explain()["p"].startswith(f"closed form: {family}.")


@pytest.mark.parametrize("name", list(FAMILIES))
def test_each_family_reaches_the_gradient_m_steps_fixed_point(name):
    x = FAMILIES[name][3]
    params = {}
    for how in ("auto", "gradient"):
        pyro.clear_param_store()
        em = ppl_em.EM(_mixture(name), m_step=how)
        for _ in range(40):
            em.step(x)
        params[how] = em.params["p"]
    assert torch.allclose(params["auto"], params["gradient"], rtol=1e-5, atol=1e-6)


def zero_inflated(x):
    """A MaskedMixture, as Pyro's mixed-effects HMM example writes zero-inflation: a Gamma where x > 0,
    a point mass at 0 where x = 0 (which component is told by a Categorical observed beside it)."""
    phi = pyro.param("phi", torch.tensor([0.5, 0.5], dtype=D), constraint=constraints.simplex)
    rate = pyro.param("rate", torch.tensor([0.5, 2.0], dtype=D), constraint=constraints.positive)
    zero = pyro.param("zero_logits", torch.zeros(2, 2, dtype=D))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(phi), infer={"enumerate": "parallel"})
        is_zero = x == 0
        pyro.sample("zero", dist.Categorical(logits=zero[z]), obs=is_zero.long())
        step = dist.MaskedMixture(is_zero, dist.Gamma(torch.tensor(2.0, dtype=D), rate[z]),
                                  dist.Delta(torch.zeros((), dtype=D)))
        pyro.sample("x", step, obs=x)


def test_a_masked_mixtures_components_get_their_closed_forms():
    x = FAMILIES["Gamma"][3].clone()
    x[::5] = 0.0
    em = ppl_em.EM(zero_inflated)
    w = em.e_step(x).marginal("z")
    em.step(x)
    positive = (x > 0).to(D)
    expected = 2.0 * (w * positive[:, None]).sum(0) / (w.T @ x)  # the Gamma's rate on the x > 0 only
    assert torch.allclose(em.params["rate"], expected, rtol=1e-10)
    assert em.explain()["rate"] == "closed form: Gamma.rate at site x"
    assert em.explain()["zero_logits"] == "closed form: Categorical.logits at site zero"
    losses = [em.step(x) for _ in range(10)]
    assert all(b <= a + 1e-9 for a, b in zip(losses, losses[1:]))


@pytest.mark.parametrize("x, w_shape, shape", [
    (torch.arange(3).reshape(3, 1), (3, 40), (3,)),                 # an enumerated z: the same values at every row
    (torch.arange(3).reshape(3, 1).expand(3, 40), (3, 40), (3,)),   # the same, expanded along the rows
    (torch.tensor([0, 2, 1, 1, 0]), (5,), (3,)),                    # observed labels: a value per row
    (torch.arange(3).reshape(3, 1, 1), (3, 2, 40), (2, 1, 3)),      # per group of a plate: kept, rows summed
    (torch.arange(3).reshape(3, 1), (1, 40), (3,)),                 # weights broadcast over z's values
])
def test_categorical_counts_equal_the_indicators_summed(x, w_shape, shape):
    """N_j = sum_i w^(i) 1{x^(i) = j}, as the broadcast product of the weights with the one-hot indicators,
    summed to the parameter's shape (an enumerated z's rows are summed before the indicators)."""
    from ppl_em import families

    g = torch.Generator().manual_seed(0)
    w = torch.rand(w_shape, generator=g, dtype=D)
    fn = dist.Categorical(probs=torch.full((3,), 1 / 3, dtype=D))
    onehot = torch.nn.functional.one_hot(x, 3).to(D)
    expected = (w.unsqueeze(-1) * onehot).sum_to_size(shape)
    got, den = families.counts(fn, x, w, torch.Size(shape))
    assert den is None and torch.allclose(got, expected, rtol=1e-13, atol=0)


def test_the_second_moment_about_the_new_means_is_symmetric_to_the_bit():
    """M - (S delta^T + delta S^T) + N (delta delta^T) equals its transpose exactly wherever M does, and the
    sum about the means that the data give directly (oracle) within rounding."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(500, 4, generator=g, dtype=torch.float64) * 3 + 1
    w = torch.rand(3, 500, generator=g, dtype=torch.float64)
    c, mu = x.mean(0), torch.randn(3, 4, generator=g, dtype=torch.float64)
    n, s = w.sum(-1), w @ (x - c)
    m = torch.einsum("ki,ia,ib->kab", w, x - c, x - c)
    m = (m + m.mT) / 2  # symmetric to the bit, as the unpacked sums are
    about = ppl_em.families.GaussianSums.about(n, s, m, c, mu)
    assert torch.equal(about, about.mT)
    direct = torch.einsum("ki,kia,kib->kab", w, x - mu[:, None], x - mu[:, None])
    torch.testing.assert_close(about, direct, rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("matrix, inside", [
    (torch.tensor([[2.0, 0.5], [0.5, 1.0]]), True),  # symmetric to the bit, positive definite
    (torch.tensor([[1.0, 2.0], [2.0, 1.0]]), False),  # symmetric, indefinite
    (torch.tensor([[2.0, 0.5], [0.5 + 1e-9, 1.0]]), True),  # symmetric within torch's tolerance
    (torch.tensor([[2.0, 0.5], [0.6, 1.0]]), False),  # not symmetric
])
def test_the_positive_definite_check_of_an_update_is_torchs(matrix, inside):
    """ppl_em.em._inside against the constraint's own check (oracle), one matrix and a batch of them."""
    pd = constraints.positive_definite
    value = matrix.double()
    assert ppl_em.em._inside(pd, value, "Sigma", set())[0] == bool(pd.check(value).all()) == inside
    batch = torch.stack([torch.eye(2, dtype=torch.float64), value])
    ok, factor = ppl_em.em._inside(pd, batch, "Sigma", set())
    assert ok == bool(pd.check(batch).all()) == inside
    if factor is not None:  # the unconstrained value made from the check's factor is the transform's own, to the bit
        from torch.distributions.transforms import LowerCholeskyTransform
        assert torch.equal(LowerCholeskyTransform().inv(factor), transform_to(pd).inv(batch))


def test_the_write_makes_a_covariances_unconstrained_value_from_its_factor_under_pyros_transform():
    """Pyro registers its own transform for positive_definite (lower Cholesky, then L L^T): the write's shortcut
    recognises it and torch's own, and nothing else; the value is the transform's own (oracle), to the bit."""
    from torch.distributions import transforms
    pd = constraints.positive_definite
    assert ppl_em.em._from_cholesky(transform_to(pd)) and ppl_em.em._from_cholesky(transforms.PositiveDefiniteTransform())
    assert not ppl_em.em._from_cholesky(transform_to(constraints.positive))
    assert not ppl_em.em._from_cholesky(transforms.ComposeTransform([transforms.LowerCholeskyTransform(), transforms.ExpTransform()]))
    sigma = torch.tensor([[[2.0, 0.3], [0.3, 1.0]], [[1.0, -0.2], [-0.2, 0.5]]], dtype=torch.float64)
    ok, factor = ppl_em.em._inside(pd, sigma, "Sigma", set())
    assert ok and torch.equal(transforms.LowerCholeskyTransform().inv(factor), transform_to(pd).inv(sigma))


@pytest.mark.parametrize("values, finite", [
    ([torch.ones(3), torch.zeros(2, 2)], True),
    ([torch.ones(3), torch.tensor([[0.0, float("nan")]])], False),
    ([torch.tensor([float("inf")]), torch.zeros(2, dtype=torch.float64)], False),
    ([torch.ones(2, dtype=torch.float32), torch.zeros(2, 2, dtype=torch.float64).mT], True),
    ([torch.tensor(-float("inf"))], False),
    ([torch.ones(2 ** 16), torch.ones(3)], True),  # more than FINITE_TOGETHER elements: each by itself
    ([torch.ones(3), torch.ones(2 ** 16).index_fill_(0, torch.tensor([7]), float("nan"))], False),
    ([], True),
])
def test_all_parameters_tested_finite_at_once(values, finite):
    """ppl_em.em._all_finite against each tensor's own test (oracle), dtypes mixed and a 0-dim tensor included."""
    assert ppl_em.em._all_finite(values) == all(bool(torch.isfinite(v).all()) for v in values) == finite


def test_a_covariance_once_not_symmetric_to_the_bit_keeps_torchs_check(monkeypatch):
    """After an update that is symmetric only within tolerance, the same parameter's later updates take the
    constraint's own check (the set of such names), with the same answers (oracle: the constraint's check)."""
    pd, seen, checked = constraints.positive_definite, set(), []
    own = pd.check
    monkeypatch.setattr(pd, "check", lambda value: checked.append(value) or own(value))
    near = torch.tensor([[2.0, 0.5], [0.5 + 1e-12, 1.0]], dtype=torch.float64)
    exact = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    assert ppl_em.em._inside(pd, exact, "Sigma", seen)[0] and not seen and not checked
    assert ppl_em.em._inside(pd, near, "Sigma", seen)[0] and seen == {"Sigma"} and len(checked) == 1
    for value in (exact, torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=torch.float64)):
        assert ppl_em.em._inside(pd, value, "Sigma", seen) == (bool(own(value).all()), None)
    assert len(checked) == 3  # torch's check for both, the first bit-symmetric one included
