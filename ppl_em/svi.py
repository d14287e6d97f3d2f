"""SVI that stops at the first non-finite step, and the default ELBO for a model.

``pyro.infer.SVI.step`` applies the optimiser's update whatever the loss was: one NaN in
the data (or one overflowing step) silently turns every parameter into NaN. :class:`SafeSVI`
has the same contract, ``step(*args, **kwargs) -> float``, but checks the loss and the
gradients before the update and the parameters after it (unconstrained and constrained:
a covariance can overflow through ``exp`` while its unconstrained value is finite), raises
:class:`NonFiniteLossError` naming the step and the parameter, and leaves the last finite
parameters in Pyro's param store, also when the update is interrupted halfway (Ctrl-C).

:func:`default_loss` picks the ELBO estimator: ``TraceEnum_ELBO`` when the model has
discrete latents (the guides in :mod:`ppl_em.guides` mark them for enumeration, so the
expectation over Q(z) is a finite sum, computed exactly), ``Trace_ELBO`` otherwise.

References: Hoffman et al., "Stochastic Variational Inference", JMLR 2013; Pyro's
``pyro/infer/svi.py``.
"""

from __future__ import annotations

from typing import Callable, Dict, List

import torch
import pyro
import pyro.poutine as poutine
from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO
from pyro.infer.elbo import ELBO
from pyro.infer.util import torch_item, zero_grads
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import transform_to

from .diagnostics import non_finite_site

__all__ = ["SafeSVI", "NonFiniteLossError", "default_loss"]


class NonFiniteLossError(FloatingPointError):
    """A step produced a NaN or infinite loss, gradient or parameter; nothing was updated.

    Raised by :meth:`SafeSVI.step`, and by :func:`ppl_em.fit` for an EM iteration whose
    log p(x) is not finite (naming the site whose log-probability is not).
    """


class SafeSVI(SVI):
    """``pyro.infer.SVI`` that refuses to apply a non-finite step.

    One call of :meth:`step` computes -ELBO(x; Q, theta) and its gradient, then updates the
    parameters of the model (theta) and of the guide (Q's). If the loss or a gradient is
    NaN or inf, or the update makes a parameter non-finite (unconstrained or constrained) or
    moves it outside its constraint, it raises :class:`NonFiniteLossError` (naming the
    parameter and the step, counted from 1 over the calls of ``step``) and the param store
    keeps the values it had before that step. Any exception during the update (a
    KeyboardInterrupt too) restores them as well.

    Parameters
    ----------
    model, guide : callable
        A Pyro model and guide taking the same ``*args, **kwargs``.
    optim : pyro.optim.PyroOptim
        For example ``pyro.optim.Adam({"lr": 0.05})``.
    loss : pyro.infer.ELBO
        For example :func:`default_loss(model, *args) <default_loss>`.

    Attributes
    ----------
    step_count : int
        Number of calls of :meth:`step` so far, the failed one included.

    Examples
    --------
    >>> import torch, pyro, pyro.distributions as dist
    >>> def model(x):
    ...     loc = pyro.param("loc", torch.tensor(0.0))
    ...     with pyro.plate("data", len(x)):
    ...         pyro.sample("x", dist.Normal(loc, 1.0), obs=x)
    >>> guide = lambda x: None
    >>> pyro.clear_param_store()
    >>> svi = SafeSVI(model, guide, pyro.optim.Adam({"lr": 0.1}), default_loss(model, torch.ones(3)))
    >>> loss = svi.step(torch.ones(3))
    >>> try:
    ...     svi.step(torch.tensor([1.0, float("inf"), 1.0]))
    ... except NonFiniteLossError as e:
    ...     print(str(e)[:34])
    SVI step 2: the loss is inf, not a
    >>> round(pyro.param("loc").item(), 4)  # the value after step 1
    0.1
    """

    def __init__(self, model: Callable, guide: Callable, optim, loss: ELBO, **kwargs) -> None:
        super().__init__(model, guide, optim, loss, **kwargs)
        self.step_count = 0

    def step(self, *args, **kwargs) -> float:
        """One gradient step on -ELBO; returns the loss before the update, as a float."""
        self.step_count += 1
        with poutine.trace(param_only=True) as capture:
            loss = self.loss_and_grads(self.model, self.guide, *args, **kwargs)
        params = set(site["value"].unconstrained() for site in capture.trace.nodes.values())
        try:
            self._check_before(torch_item(loss), params, args, kwargs)
            saved = {p: p.detach().clone() for p in params}
            try:
                self.optim(params)
                self._check_after(saved)
            except BaseException:  # a refused step, or an interrupt halfway through the update
                _restore(saved)
                raise
        finally:
            zero_grads(params)
        return torch_item(loss)

    def evaluate_loss(self, *args, **kwargs) -> float:
        """-ELBO at the current parameters, without gradients or updates (may be nan or inf)."""
        return super().evaluate_loss(*args, **kwargs)

    def _check_before(self, loss: float, params, args: tuple, kwargs: dict) -> None:
        if not torch.isfinite(torch.tensor(loss)):
            found = non_finite_site(self.model, args, kwargs)
            where = f" (the model's site {found[0]!r} has log-probability {found[1]})" if found else ""
            raise NonFiniteLossError(
                f"SVI step {self.step_count}: the loss is {loss}, not a finite -ELBO{where}. The parameters "
                "were left at their values before this step. Look for NaN or inf in the data, lower the "
                "learning rate, or start from other initial values.")
        bad = [n for n, p in _names(params).items() if p.grad is not None and not torch.isfinite(p.grad).all()]
        if bad:
            raise NonFiniteLossError(
                f"SVI step {self.step_count}: the gradient of parameter(s) {bad} is not finite (the loss "
                f"was {loss}). The parameters were left at their values before this step. Lower the "
                "learning rate or check the model for log(0) or division by zero.")

    def _check_after(self, saved: Dict[torch.Tensor, torch.Tensor]) -> None:
        """Every updated parameter must be finite, unconstrained and constrained (a large unconstrained
        value can overflow through exp), and its constrained value must satisfy its constraint."""
        constraints = pyro.get_param_store().get_state()["constraints"]
        problems = {name: _invalid(p, constraints.get(name)) for name, p in _names(saved).items()}
        bad = {name: why for name, why in problems.items() if why}
        if bad:
            details = "; ".join(f"{name!r} is {why}" for name, why in bad.items())
            raise NonFiniteLossError(
                f"SVI step {self.step_count}: the update made parameter(s) {list(bad)} non-finite or invalid "
                f"({details}). The parameters were restored to their values before this step; lower the "
                "learning rate.")


def _invalid(unconstrained: torch.Tensor, constraint) -> str:
    """'' for a valid updated parameter, else what is wrong with it."""
    if not torch.isfinite(unconstrained).all():
        return "non-finite"
    if constraint is None:
        return ""
    with torch.no_grad():
        value = transform_to(constraint)(unconstrained)
        if not torch.isfinite(value).all():
            return "non-finite once constrained"
        if not bool(constraint.check(value).all()):
            return f"outside its constraint {constraint}"
    return ""


def _restore(saved: Dict[torch.Tensor, torch.Tensor]) -> None:
    with torch.no_grad():
        for p, value in saved.items():
            p.copy_(value)


def _names(params) -> Dict[str, torch.Tensor]:
    store = pyro.get_param_store()
    return {store.param_name(p) or "?": p for p in params}


def default_loss(model: Callable, *args, **kwargs) -> ELBO:
    """The ELBO estimator for ``model``: ``TraceEnum_ELBO`` if it has discrete latents, else ``Trace_ELBO``.

    The model is run once (its parameters get initialised in the param store) to find its
    latent sites and its plate nesting depth.

    Returns
    -------
    pyro.infer.ELBO
        ``TraceEnum_ELBO(max_plate_nesting=...)`` when some latent site has enumerable
        support (Categorical, Bernoulli, ...), so that enumerated guides give exact
        expectations; ``Trace_ELBO()`` otherwise (reparameterised continuous latents, a VAE).
    """
    with poutine.block():
        trace = prune_subsample_sites(poutine.trace(model).get_trace(*args, **kwargs))
    sites: List[dict] = [s for s in trace.nodes.values() if s["type"] == "sample"]
    nesting = max([sum(f.vectorized for f in s["cond_indep_stack"]) for s in sites] + [0])
    if any(not s["is_observed"] and s["fn"].has_enumerate_support for s in sites):
        return TraceEnum_ELBO(max_plate_nesting=nesting)
    return Trace_ELBO()
