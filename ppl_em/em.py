"""Expectation-Maximisation for any Pyro model whose local latents are discrete.

EM maximises the log-likelihood l(theta) = log p(x; theta) = log sum_z p(x, z; theta) by
coordinate ascent on the evidence lower bound

    ELBO(x; Q, theta) = sum_z Q(z) log [ p(x, z; theta) / Q(z) ]  <=  log p(x; theta)

(Jensen's inequality, log is concave), with equality when Q(z) = p(z | x; theta):

* E-step: Q(z) := p(z | x; theta), exact, by enumeration (:mod:`ppl_em.posterior`).
* M-step: theta := argmax_theta E_Q[log p(x, z; theta)] (+ log p(theta) for point-estimated
  global latents), in closed form where the site is an exponential family whose parameters
  are selected by the latents (:mod:`ppl_em.families`), by L-BFGS otherwise.

Each step therefore never decreases log p(x; theta) (+ log p(theta)).

References: lecture notes, "EM algorithm", "Jensen's inequality", "ELBO"; Dempster, Laird &
Rubin, JRSS-B 1977; Neal & Hinton, "A view of the EM algorithm", 1998.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
import pyro

from . import families
from .posterior import (
    ModelStructure,
    Posterior,
    exact_posterior,
    inspect_model,
    masked_log_prob,
    sample_sites,
    trace_model,
)

__all__ = ["EM", "NonFiniteParameterError"]


class NonFiniteParameterError(FloatingPointError):
    """An M-step produced NaN or inf; the previous parameters were kept."""


class EM:
    """EM (or hard, classification EM) on a plain Pyro model, with the contract of ``pyro.infer.SVI``.

    Parameters
    ----------
    model : callable
        A Pyro model. Discrete latent sites are enumerated (no ``infer`` marking needed);
        global continuous latent sites are point-estimated (MAP-EM); parameters are
        ``pyro.param`` sites (and ``pyro.module`` networks) and live in Pyro's param store.
    posterior : {"exact", "hard"}
        ``"exact"``: Q(z) = p(z | x; theta). ``"hard"``: Q(z) is one-hot at the posterior mode
        (classification EM; k-means for an isotropic mixture with fixed shared covariance).
    m_step : {"auto", "closed_form", "gradient"}
        ``"auto"`` uses a closed form for every parameter that admits one, gradient otherwise;
        ``"closed_form"`` raises if some parameter has none; ``"gradient"`` never uses one.
    reg_covar : float
        Added to the diagonal of closed-form covariance (and variance) estimates.
    max_grad_iter : int
        L-BFGS iterations per gradient M-step.

    Examples
    --------
    >>> import torch, pyro, pyro.distributions as dist
    >>> from torch.distributions import constraints
    >>> def model(x):
    ...     phi = pyro.param("phi", torch.ones(2) / 2, constraint=constraints.simplex)
    ...     mu = pyro.param("mu", torch.tensor([-1.0, 1.0]))
    ...     with pyro.plate("data", len(x)):
    ...         z = pyro.sample("z", dist.Categorical(phi))
    ...         pyro.sample("x", dist.Normal(mu[z], 1.0), obs=x)
    >>> pyro.clear_param_store()
    >>> x = torch.tensor([-2.1, -1.9, 2.0, 2.2])
    >>> em = EM(model)
    >>> losses = [em.step(x) for _ in range(20)]
    >>> losses[-1] <= losses[0]
    True
    >>> em.e_step(x).marginal("z").shape
    torch.Size([4, 2])
    >>> em.explain()["mu"]
    'closed form: Normal.loc at site x'
    """

    def __init__(
        self,
        model: Callable,
        posterior: str = "exact",
        m_step: str = "auto",
        reg_covar: float = 1e-6,
        max_grad_iter: int = 100,
    ) -> None:
        if posterior not in ("exact", "hard"):
            raise ValueError(f"posterior must be 'exact' or 'hard', got {posterior!r}.")
        if m_step not in ("auto", "closed_form", "gradient"):
            raise ValueError(f"m_step must be 'auto', 'closed_form' or 'gradient', got {m_step!r}.")
        if reg_covar < 0:
            raise ValueError(f"reg_covar must be >= 0, got {reg_covar}.")
        self.model = model
        self.posterior = posterior
        self.m_step_mode = m_step
        self.reg_covar = reg_covar
        self.max_grad_iter = max_grad_iter
        self.structure: Optional[ModelStructure] = None
        self._plan: Optional[Dict[str, str]] = None  # param -> "closed" | "gradient"
        self._uses: Dict[str, List[families.Use]] = {}
        self._why: Dict[str, str] = {}
        self._param_names: List[str] = []

    # -- the algorithm -----------------------------------------------------------------------
    def step(self, *args, **kwargs) -> float:
        """One EM iteration. Returns -log p(x; theta) - log p(theta) at theta *before* the update
        (for ``posterior="hard"``: -max_z log p(x, z; theta) - log p(theta))."""
        post = self.e_step(*args, **kwargs)
        self.m_step(post, *args, **kwargs)
        return -float(post.objective + post.log_prior)

    def e_step(self, *args, **kwargs) -> Posterior:
        """Q(z) := p(z | x; theta) (or its mode), and log p(x; theta). See :class:`Posterior`."""
        _check_arguments(args, kwargs)
        if self.structure is None:
            self.structure = inspect_model(self.model, args, kwargs)
        post = exact_posterior(self.model, self.structure, args, kwargs, mode=self.posterior)
        _check_observations(post)
        self._param_names = list(post.leaves) + list(self.structure.map_sites)
        return post

    def m_step(self, post: Posterior, *args, **kwargs) -> None:
        """theta := argmax_theta E_Q[log p(x, z; theta)] + log p(theta), Q fixed.

        Raises :class:`NonFiniteParameterError` (keeping the previous parameters) if the
        update is not finite.
        """
        saved = self._snapshot()
        try:
            if self._plan is None:
                self._make_plan(post, args, kwargs)
            closed = [p for p, how in self._plan.items() if how == "closed"]
            self._write(self._closed_form(post, closed, args, kwargs))
            self._gradient(post, [p for p, how in self._plan.items() if how == "gradient"], args, kwargs)
            self._check_finite()
        except BaseException:
            self._restore(saved)
            raise

    # -- introspection -----------------------------------------------------------------------
    @property
    def params(self) -> Dict[str, torch.Tensor]:
        """Current constrained value of every parameter EM updates (after the first E-step)."""
        store = pyro.get_param_store()
        return {name: store[name].detach().clone() for name in self._param_names if name in store}

    def explain(self) -> Dict[str, str]:
        """Which update each parameter gets, e.g. ``{'mu': 'closed form: Normal.loc at site x'}``.

        Available after the first M-step.
        """
        if self._plan is None:
            raise RuntimeError("explain() is available after the first m_step(); call em.step(...) first.")
        return dict(self._why)

    def expected_log_joint(self, post: Posterior, *args, **kwargs) -> torch.Tensor:
        """E_Q[log p(x, z; theta)] + log p(theta) at the current parameters, differentiable in them."""
        tr, _ = trace_model(self.model, self.structure, args, kwargs, leaf_params=False)
        return sum((post.weights[s["name"]] * masked_log_prob(s)).sum() for s in sample_sites(tr))

    # -- M-step internals --------------------------------------------------------------------
    def _make_plan(self, post: Posterior, args, kwargs) -> None:
        """Decide, once, which parameters get a closed form; verify each by stationarity."""
        self._uses = self._find_closed_forms(post.trace, post.leaves, post.weights)
        self._plan = {p: ("closed" if p in self._uses and self.m_step_mode != "gradient" else "gradient")
                      for p in self._param_names}
        candidates = [p for p, how in self._plan.items() if how == "closed"]
        if candidates:
            self._verify_closed_forms(post, candidates, args, kwargs)
        missing = [p for p, how in self._plan.items() if how == "gradient"]
        if self.m_step_mode == "closed_form" and missing:
            raise ValueError(
                f"m_step='closed_form' but parameters {missing} have no closed-form update "
                f"({', '.join(self._why.get(p, '') for p in missing)}). Use m_step='auto'."
            )
        for p, how in self._plan.items():
            if how == "closed":
                u = self._uses[p][0]
                self._why[p] = f"closed form: {u.rule.family.__name__}.{u.rule.attr} at site {u.site}"
            else:
                self._why.setdefault(p, "gradient (L-BFGS on E_Q[log p(x, z; theta)])")

    @staticmethod
    def _find_closed_forms(trace, leaves, weights) -> Dict[str, List[families.Use]]:
        """Per parameter, its uses in the trace that a closed-form rule covers."""
        by_id = {id(leaf): name for name, leaf in leaves.items()}
        uses: Dict[str, List[families.Use]] = {}
        for site in sample_sites(trace):
            for use in families.find_uses(site, weights[site["name"]], by_id):
                uses.setdefault(use.param, []).append(use)
        # A parameter qualifies only if every detected use follows the same update rule.
        return {p: us for p, us in uses.items() if len({(u.rule.family, u.rule.attr) for u in us}) == 1}

    def _verify_closed_forms(self, post: Posterior, candidates: List[str], args, kwargs) -> None:
        """Keep a closed form only if E_Q[log p] is stationary in that parameter after the update.

        The check runs with reg_covar = 0, where the closed forms are exact maximisers; if that
        update is singular it runs with reg_covar and a tolerance loose enough for its bias.
        """
        before = self._snapshot()
        g_old = self._unconstrained_grads(post, candidates, args, kwargs)
        reg, tol = self.reg_covar, None
        try:
            self.reg_covar, tol = 0.0, 0.5
            self._write(self._closed_form(post, candidates, args, kwargs))
            g_new = self._unconstrained_grads(post, candidates, args, kwargs)
        except (RuntimeError, ValueError, FloatingPointError):
            self._restore(before)
            self.reg_covar, tol = reg, 0.25
            self._write(self._closed_form(post, candidates, args, kwargs))
            g_new = self._unconstrained_grads(post, candidates, args, kwargs)
        finally:
            self.reg_covar = reg
            self._restore(before)
        for p in candidates:
            eps = torch.finfo(g_new[p].dtype).eps
            if not g_new[p].abs().max() <= eps ** tol * (1 + g_old[p].abs().max()):
                self._plan[p] = "gradient"
                self._why[p] = ("gradient (a closed form was detected but E_Q[log p(x, z; theta)] "
                                "is not stationary at it, e.g. the parameter has a prior or other uses)")

    def _unconstrained_grads(self, post, names, args, kwargs) -> Dict[str, torch.Tensor]:
        store = pyro.get_param_store()
        leaves = [store[n].unconstrained() for n in names]
        grads = torch.autograd.grad(self.expected_log_joint(post, *args, **kwargs), leaves, allow_unused=True)
        return {n: (torch.zeros_like(l) if g is None else g) for n, l, g in zip(names, leaves, grads)}

    def _closed_form(self, post: Posterior, names: List[str], args, kwargs) -> Dict[str, torch.Tensor]:
        """Phase 1 (locations, probabilities, rates) then phase 2 (scales given new locations)."""
        new: Dict[str, torch.Tensor] = {}
        for phase in (1, 2):
            todo = [p for p in names if self._uses[p][0].rule.phase == phase]
            if not todo:
                continue
            trace, leaves = post.trace, post.leaves
            if phase == 2 and new:
                self._write(new)
                trace, leaves = trace_model(self.model, self.structure, args, kwargs)
            uses = self._find_closed_forms(trace, leaves, post.weights)
            for p in todo:
                new[p] = self._update(p, uses[p], trace, leaves[p], post)
        return new

    def _update(self, name: str, uses: List[families.Use], trace, leaf, post) -> torch.Tensor:
        """Sum the weighted statistics of every use of ``name``, then apply the family's formula."""
        num = den = None
        for use in uses:
            site = trace.nodes[use.site]
            n, d = families.scatter_stats(use, site, post.weights[use.site], leaf, self.reg_covar)
            num = n if num is None else num + n
            den = d if den is None else (den if d is None else den + d)
        return uses[0].rule.finish(num, den, leaf.detach()).detach()

    def _gradient(self, post: Posterior, names: List[str], args, kwargs) -> None:
        """Maximise E_Q[log p(x, z; theta)] + log p(theta) over ``names`` with L-BFGS, Q fixed."""
        if not names:
            return
        store = pyro.get_param_store()
        unconstrained = [store[n].unconstrained() for n in names]
        scale = max(1.0, float(sum(w.sum() for w in post.weights.values())))
        optim = torch.optim.LBFGS(unconstrained, max_iter=self.max_grad_iter, tolerance_grad=1e-10,
                                  tolerance_change=1e-13, history_size=20, line_search_fn="strong_wolfe")

        def closure():
            optim.zero_grad()
            loss = -self.expected_log_joint(post, *args, **kwargs) / scale
            loss.backward()
            return loss

        before = [u.detach().clone() for u in unconstrained]
        start = closure().item()
        optim.step(closure)
        end = closure().item()
        if not end <= start or not all(torch.isfinite(u).all() for u in unconstrained):
            # Generalised EM must not decrease the objective: keep the better point.
            with torch.no_grad():
                for u, b in zip(unconstrained, before):
                    u.copy_(b)

    # -- parameter store helpers -------------------------------------------------------------
    def _write(self, values: Dict[str, torch.Tensor]) -> None:
        for name, value in values.items():
            if not torch.isfinite(value).all():
                raise NonFiniteParameterError(
                    f"The M-step update of parameter '{name}' is not finite; the previous "
                    "parameters were kept. Try a larger reg_covar, fewer components, or scaling the data."
                )
        store = pyro.get_param_store()
        for name, value in values.items():
            store[name] = value

    def _snapshot(self) -> Dict[str, torch.Tensor]:
        store = pyro.get_param_store()
        return {n: store[n].unconstrained().detach().clone() for n in self._param_names if n in store}

    def _restore(self, saved: Dict[str, torch.Tensor]) -> None:
        store = pyro.get_param_store()
        with torch.no_grad():
            for name, value in saved.items():
                store[name].unconstrained().copy_(value)

    def _check_finite(self) -> None:
        store = pyro.get_param_store()
        for name in self._param_names:
            if name in store and not torch.isfinite(store[name]).all():
                raise NonFiniteParameterError(
                    f"Parameter '{name}' became non-finite in the M-step; the previous parameters "
                    "were kept. Try a larger reg_covar or scaling the data."
                )


def _first_bad(value: torch.Tensor, bad: Optional[torch.Tensor] = None) -> str:
    bad = ~torch.isfinite(value) if bad is None else bad
    first = tuple(int(i) for i in bad.nonzero()[0])
    return f"{int(bad.sum())} non-finite value(s) (NaN or inf); the first is at index {first}: {value[first].item()}"


def _check_arguments(args: tuple, kwargs: dict) -> None:
    """Raise a ValueError naming the argument and index of the first NaN or inf in the data."""
    named = [(f"argument {i}", a) for i, a in enumerate(args)] + [(f"argument '{k}'", v) for k, v in kwargs.items()]
    for label, value in named:
        if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(
                f"The data in {label} (shape {tuple(value.shape)}) has {_first_bad(value)}. "
                "Remove or impute those rows before fitting, or mask them with obs_mask / poutine.mask "
                "and pass finite placeholders."
            )


def _check_observations(post: Posterior) -> None:
    """Raise a ValueError naming the site and index of the first NaN or inf observation."""
    for site in sample_sites(post.trace):
        if not site["is_observed"] or site["infer"].get("_map_site"):
            continue
        value = site["value"]
        if not torch.is_tensor(value) or not value.is_floating_point():
            continue
        bad = ~torch.isfinite(value)
        fn_mask = getattr(site["fn"], "_mask", None)
        if fn_mask is not None:
            event = value.dim() - fn_mask.dim()
            bad = bad & fn_mask.reshape(fn_mask.shape + (1,) * max(0, event)).expand_as(bad)
        if bad.any():
            raise ValueError(
                f"Observed site '{site['name']}' has {_first_bad(value, bad)}. "
                "Remove or impute those rows, or mask them out with obs_mask / poutine.mask."
            )
