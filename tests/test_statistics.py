"""Statistics: the additive object between the E-step and the M-step.

Oracles: the statistics of the whole data (summing over disjoint parts must give them, to float
rounding, for every registered model with closed forms), the parameters of ``EM.step``
(``maximize(summarize(x))`` must give the same), and brute-force moments for the re-centring rule.
"""

import pyro
import pytest
import torch

import ppl_em
from ppl_em import Statistics
from ppl_em.models import REGISTRY, gmm

D = torch.float64
CLOSED_FORM_MODELS = [name for name, entry in REGISTRY.items() if "em" in entry["methods"]]


def _parts(args, kwargs, n, cuts):
    """The arguments split along the data plate at ``cuts`` (row arguments: first dimension n)."""
    bounds = [0] + sorted(cuts) + [n]
    for a, b in zip(bounds[:-1], bounds[1:]):
        rows = slice(a, b)
        yield (tuple(v[rows] if torch.is_tensor(v) and v.dim() and v.shape[0] == n else v for v in args),
               {k: (v[rows] if torch.is_tensor(v) and v.dim() and v.shape[0] == n else v) for k, v in kwargs.items()})


def _rows(args):
    x = args[0]
    return x.shape[0]


@pytest.mark.parametrize("name", CLOSED_FORM_MODELS)
@pytest.mark.parametrize("parts", [1, 2, 3, 7])
def test_statistics_of_random_parts_add_up_to_the_whole(name, parts):
    entry = REGISTRY[name]
    args, kwargs = entry["make_data"](0)
    n = _rows(args)
    em = ppl_em.EM(entry["model"], chunk_size=None)
    whole = em.summarize(*args, **kwargs)
    g = torch.Generator().manual_seed(parts)
    cuts = torch.randperm(n - 1, generator=g)[:parts - 1].add(1).tolist()
    total = sum(em.summarize(*a, **k) for a, k in _parts(args, kwargs, n, cuts))
    assert total.sums.keys() == whole.sums.keys() and total.sums
    for key, value in whole.sums.items():
        assert torch.allclose(total.sums[key], value, rtol=1e-10, atol=1e-9), key
    assert float(total.n) == float(whole.n) == n
    assert torch.allclose(total.log_evidence, whole.log_evidence, rtol=1e-12)


@pytest.mark.parametrize("name", CLOSED_FORM_MODELS)
def test_maximize_of_summarize_equals_step(name):
    entry = REGISTRY[name]
    args, kwargs = entry["make_data"](1)
    stepped = ppl_em.EM(entry["model"], chunk_size=None)
    for _ in range(3):
        stepped.step(*args, **kwargs)
    expected = stepped.params
    pyro.clear_param_store()
    em = ppl_em.EM(entry["model"], chunk_size=None)
    for _ in range(3):
        em.maximize(em.summarize(*args, **kwargs))
    for key, value in expected.items():
        assert torch.allclose(em.params[key], value, rtol=1e-10, atol=1e-12), key


def test_statistics_arithmetic_and_flat_round_trip():
    x = REGISTRY["gmm"]["make_data"](0)[0][0]
    em = ppl_em.EM(gmm.model)
    a, b = em.summarize(x[:60], 3), em.summarize(x[60:], 3)
    total = a + b
    assert torch.allclose((0.5 * total).sums["x.M"], 0.5 * total.sums["x.M"])
    assert torch.allclose((total * 0.25).n, torch.tensor(37.5, dtype=D))
    back = Statistics.from_tensors(total.tensors())
    assert back.sums.keys() == total.sums.keys() and back.centres.keys() == total.centres.keys()
    for key in total.sums:
        assert torch.equal(back.sums[key], total.sums[key])
    assert float(back.log_evidence) == float(total.log_evidence) and float(back.n) == 150
    assert Statistics.sum([a, b]).sums.keys() == total.sums.keys()
    moved = total.to("cpu")
    assert all(v.device.type == "cpu" and v.dtype == D for v in moved.sums.values())


def test_float32_data_give_float64_statistics():
    x = REGISTRY["gmm"]["make_data"](0)[0][0].float()
    stats = ppl_em.EM(gmm.model).summarize(x, 3)
    assert all(v.dtype == D for v in stats.sums.values())


def test_adding_statistics_about_different_centres_shifts_them():
    """S, M about c, re-centred to c': S - N delta, M - S delta^T - delta S^T + N delta delta^T."""
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(40, 3, generator=g, dtype=D) + 7, torch.rand(2, 40, generator=g, dtype=D)

    def sums_about(c):
        xc = x - c
        return {"g.N": w.sum(-1), "g.S": w @ xc, "g.M": torch.einsum("ji,ia,ib->jab", w, xc, xc)}

    c1, c2 = torch.zeros(3, dtype=D), torch.tensor([7.0, 6.0, 8.0], dtype=D)
    a = Statistics(sums_about(c1), {"g": c1})
    b = Statistics(sums_about(c2), {"g": c2})
    total = a + b
    for key, value in sums_about(c1).items():
        assert torch.allclose(total.sums[key], 2 * value, rtol=1e-12), key


def test_statistics_of_other_models_refuse_to_add():
    x = REGISTRY["gmm"]["make_data"](0)[0][0]
    a = ppl_em.EM(gmm.model).summarize(x, 3)
    b = Statistics({"other.num": torch.ones(3)})
    with pytest.raises(ValueError, match="different models"):
        a + b
    with pytest.raises(ValueError, match="No data to summarise"):
        Statistics.sum([])


def test_summarize_names_the_parameters_that_need_all_of_q():
    def shifted(x):
        phi = pyro.param("phi", torch.ones(2, dtype=D) / 2, constraint=torch.distributions.constraints.simplex)
        mu = pyro.param("mu", torch.tensor([-1.0, 1.0], dtype=D))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", pyro.distributions.Categorical(phi))
            pyro.sample("x", pyro.distributions.Normal(mu[z] + mu.sum(), 1.0), obs=x)  # mu enters twice

    x = torch.cat([torch.randn(30, dtype=D) - 2, torch.randn(30, dtype=D) + 2])
    with pytest.raises(ValueError, match=r"\['mu'\] cannot be updated from statistics alone"):
        ppl_em.EM(shifted).summarize(x)
