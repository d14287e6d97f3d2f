"""Pyro's param store: detached snapshots, exact replacement, and a look at a model beside it.

Pyro keeps every ``pyro.param`` in one global store. A fit, a result's method or a check that
runs the model must neither read what an earlier fit left there nor leave its own values
behind; these helpers give it a store of its own for the duration of a call.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, Optional

import pyro
import pyro.poutine as poutine
import pyro.util
from pyro.poutine.trace_struct import Trace

__all__ = ["capture_store", "replace_store", "model_trace", "fresh_rng"]

State = Dict[str, Dict[str, Any]]


def capture_store() -> State:
    """A detached copy of Pyro's param store: unconstrained values and constraints."""
    state = pyro.get_param_store().get_state()
    return {"params": {n: v.detach().clone() for n, v in state["params"].items()},
            "constraints": dict(state["constraints"])}


def replace_store(state: State) -> None:
    """Make Pyro's param store hold exactly ``state``: cleared first, so nothing is merged."""
    pyro.clear_param_store()
    params = {n: v.detach().clone().requires_grad_() for n, v in state["params"].items()}
    pyro.get_param_store().set_state({"params": params, "constraints": dict(state["constraints"])})


def model_trace(model: Callable, args: tuple, kwargs: dict, state: Optional[State] = None) -> Trace:
    """One run of ``model(*args, **kwargs)`` with a param store holding exactly ``state``.

    With ``state=None`` the store is empty, so every ``pyro.param`` takes the model's own
    initial value. The run is blocked (no enclosing handler sees it), consumes no randomness
    (the global random state is restored) and leaves the caller's param store as it was.
    """
    scoped = {"params": {}, "constraints": {}} if state is None else \
        {"params": {n: v.detach() for n, v in state["params"].items()}, "constraints": dict(state["constraints"])}
    store = pyro.get_param_store()
    with poutine.block(), fresh_rng(), store.scope(scoped):
        return poutine.trace(model).get_trace(*args, **kwargs)


@contextlib.contextmanager
def fresh_rng() -> Iterator[None]:
    """Run without consuming the global random stream (a look at the model must not shift seeds)."""
    state = pyro.util.get_rng_state()
    try:
        yield
    finally:
        pyro.util.set_rng_state(state)
