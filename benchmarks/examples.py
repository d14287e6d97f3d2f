"""B12: EM against Pyro SVI on models written as Pyro's own examples write them, in the same wall time.

Each model of :mod:`benchmarks.pyro_style` is fitted by ``ppl_em.EM`` for a number of steps, and by
Pyro's ``SVI`` (``TraceEnum_ELBO``, Adam; an ``AutoDelta`` guide for the point-estimated globals, as
Pyro's examples use) for the same wall time, from the same start. Both end at a point estimate
theta; the exact log p(x; theta) + log p(theta) of each (by EM's E-step) is the score, per
observation. EM must reach the higher one.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Tuple

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import SVI, TraceEnum_ELBO
from pyro.infer.autoguide import AutoDelta, init_to_value

import ppl_em

from . import pyro_style as ps

D = torch.float64


def _gmm_data(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randn(n // 2, generator=g, dtype=D) * 1.5, 10 + torch.randn(n - n // 2, generator=g, dtype=D)])


def cases(quick: bool) -> Dict[str, Tuple[Callable, tuple, dict, int]]:
    """name -> (model, args, kwargs, max_plate_nesting)."""
    seqs, lengths = ps.binary_sequences(num_sequences=6 if quick else 40, max_length=9 if quick else 30)
    hmm = lambda i: (ps.HMM_MODELS[i], (seqs, lengths, ps.args(hidden_dim=4 if i in (3, 4) else 3)),
                     {"include_prior": False}, 2)
    data = torch.randint(0, 4, (15 if quick else 200,), generator=torch.Generator().manual_seed(1))
    return {
        "examples/hmm.py model 1": hmm(1),
        "examples/hmm.py model 3": hmm(3),
        "examples/hmm.py model 4": hmm(4),
        "examples/hmm.py model 6": hmm(6),
        "GMM tutorial": (ps.tutorial_gmm, (_gmm_data(60 if quick else 1000),), {}, 1),
        "enumeration tutorial HMM": (ps.tutorial_hmm, (data, 4), {}, 1),
        "capture-recapture model 1": (ps.cjs_model_1, (ps.capture_histories(N=40 if quick else 400), None), {}, 1),
    }


def objective(model, args, kwargs) -> float:
    """log p(x; theta) + log p(theta) at the parameters in the store, exactly (every latent summed out)."""
    post = ppl_em.EM(model).e_step(*args, **kwargs)
    return float(post.log_evidence + post.log_prior)


def _start(model, args, kwargs, seed: int) -> Dict[str, torch.Tensor]:
    """The shared start: the model's own initialisers (point-estimated sites from a draw of their prior)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    ppl_em.EM(model).e_step(*args, **kwargs)
    store = pyro.get_param_store()
    return {name: store[name].detach().clone() for name in store.keys()}


def _restore(start: Dict[str, torch.Tensor]) -> None:
    pyro.clear_param_store()
    for name, value in start.items():
        pyro.param(name, value.clone())


def run_em(model, args, kwargs, start, steps: int) -> Tuple[float, float]:
    """(seconds, objective) of ``steps`` EM steps from ``start``."""
    _restore_with_constraints(model, args, kwargs, start)
    em = ppl_em.EM(model)
    began = time.perf_counter()
    for _ in range(steps):
        em.step(*args, **kwargs)
    return time.perf_counter() - began, objective(model, args, kwargs)


def run_svi(model, args, kwargs, nesting: int, start, seconds: float, lr: float = 0.05) -> Tuple[int, float]:
    """(steps taken, objective) of SVI for ``seconds`` of wall time from ``start``."""
    _restore_with_constraints(model, args, kwargs, start)
    globals_ = ppl_em.EM(model)
    globals_.e_step(*args, **kwargs)
    sites = list(globals_.structure.map_sites)
    store = pyro.get_param_store()
    values = {name: store[name].detach().clone() for name in sites}
    for name in sites:  # AutoDelta keeps them itself
        del store[name]
    guide = AutoDelta(poutine.block(model, expose=sites), init_loc_fn=init_to_value(values=values)) if sites \
        else (lambda *a, **k: None)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}), TraceEnum_ELBO(max_plate_nesting=nesting))
    began, steps = time.perf_counter(), 0
    while time.perf_counter() - began < seconds:
        svi.step(*args, **kwargs)
        steps += 1
    if sites:
        medians = guide.median(*args, **kwargs)
        for name in sites:
            pyro.param(name, medians[name].detach())
    return steps, objective(model, args, kwargs)


def _restore_with_constraints(model, args, kwargs, start) -> None:
    """The start in a fresh store, with the constraints the model declares (one run of the model)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    ppl_em.EM(model).e_step(*args, **kwargs)
    store = pyro.get_param_store()
    for name, value in start.items():
        if name in store:
            store[name] = value.clone()


def compare(quick: bool, steps: int) -> List[dict]:
    """One record per model: EM's and SVI's objectives per observation after the same wall time."""
    out = []
    for name, (model, args, kwargs, nesting) in cases(quick).items():
        start = _start(model, args, kwargs, seed=0)
        n = float(ppl_em.result.count_observations(model, args, kwargs))
        seconds, em_value = run_em(model, args, kwargs, start, steps)
        svi_steps, svi_value = run_svi(model, args, kwargs, nesting, start, seconds)
        out.append({"model": name, "seconds": seconds, "em_steps": steps, "svi_steps": svi_steps,
                    "em": em_value / n, "svi": svi_value / n, "met": em_value >= svi_value})
    return out
