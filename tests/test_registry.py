"""The model registry: every model file is registered, and every (model, method) pair fits.

The matrix fits each registered model with each method it lists, on data drawn from the model
(``make_data``), and checks the objective each method is built to improve: EM never decreases
log p(x; theta); hard EM never decreases max_z log p(x, z; theta); and after any fit the exact
log p(x; theta) (computed by the EM engine's E-step) is higher than at the initial parameters,
or, for a model with continuous local latents that has no exact E-step, the ELBO is higher.
"""

import pathlib

import pyro
import pytest
import torch

import ppl_em
import ppl_em.models as models
from ppl_em.guides import AutoAmortized, AutoCategorical
from ppl_em.models import REGISTRY
from ppl_em.svi import SafeSVI, default_loss

METHODS = {"em", "hard_em", "svi", "vae"}
# The VAE model file is written separately; it must be registered all the same.
EXPECTED_ELSEWHERE = {"vae"}


def _stem(entry) -> str:
    return entry["module"].__name__.rsplit(".", 1)[-1]


def test_every_model_file_is_registered():
    folder = pathlib.Path(models.__file__).parent
    files = {p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
    missing = sorted((files | EXPECTED_ELSEWHERE) - set(REGISTRY))
    assert not missing, f"model files not in ppl_em.models.REGISTRY: {missing}; add an entry in models/__init__.py"
    stems = {_stem(entry) for entry in REGISTRY.values()}
    assert stems <= files, f"registered models without a file: {sorted(stems - files)}"


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_entries_are_well_formed(name):
    entry = REGISTRY[name]
    stem = _stem(entry)
    assert name == stem or name.startswith(stem + "_"), name  # a second model function of the file
    assert entry["model"] is (entry["module"].model if name == stem else entry["model"])
    assert entry["model"].__module__ == entry["module"].__name__
    assert entry["methods"] and set(entry["methods"]) <= METHODS, entry["methods"]
    assert entry["module"].__doc__ and entry["description"]
    args, kwargs = entry["make_data"](0)
    again, _ = entry["make_data"](0)
    assert all(torch.equal(a, b) for a, b in zip(args, again) if torch.is_tensor(a))  # seeded


def _log_px(model, args, kwargs) -> float:
    """Exact log p(x; theta) at the parameters in the store (initialising any that are missing)."""
    return float(ppl_em.EM(model).e_step(*args, **kwargs).log_evidence)


def _non_decreasing(values, name):
    assert all(b >= a - 1e-9 * abs(a) for a, b in zip(values, values[1:])), f"{name} decreased: {values}"


def _fit_em(model, args, kwargs, posterior):
    em = ppl_em.EM(model, posterior=posterior)
    objective = [-em.step(*args, **kwargs) for _ in range(8)]
    _non_decreasing(objective, "log p(x)" if posterior == "exact" else "max_z log p(x, z)")
    assert objective[-1] > objective[0]


def _fit_svi(model, args, kwargs, method):
    guide = AutoCategorical(model) if method == "svi" else AutoAmortized(model, hidden=(16,))
    svi = SafeSVI(model, guide, pyro.optim.Adam({"lr": 0.05}), default_loss(model, *args, **kwargs))
    return [svi.step(*args, **kwargs) for _ in range(80)]


MATRIX = [(name, method) for name in sorted(REGISTRY) for method in REGISTRY[name]["methods"]]


@pytest.mark.parametrize("name,method", MATRIX, ids=[f"{n}-{m}" for n, m in MATRIX])
def test_each_model_fits_with_each_method_it_supports(name, method):
    entry = REGISTRY[name]
    pyro.set_rng_seed(0)
    args, kwargs = entry["make_data"](0)
    model = entry["model"]
    try:
        start = _log_px(model, args, kwargs)
    except ppl_em.ExactInferenceError:
        start = None  # continuous local latents: judge by the ELBO
    if method in ("em", "hard_em"):
        _fit_em(model, args, kwargs, "exact" if method == "em" else "hard")
    else:
        losses = _fit_svi(model, args, kwargs, method)
        if start is None:
            first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
            assert last < first, f"-ELBO did not improve: {first} -> {last}"
    if start is not None:
        end = _log_px(model, args, kwargs)
        assert end > start, f"log p(x) did not improve: {start} -> {end}"
