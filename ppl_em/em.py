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

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import pyro
import pyro.distributions as dist

from . import families
from .posterior import (
    ModelStructure,
    Posterior,
    exact_posterior,
    expected_log_prob,
    inspect_model,
    sample_sites,
    trace_model,
)

__all__ = ["EM", "NonFiniteParameterError"]

# chunk_size="auto": rows per chunk such that the largest per-chunk tensor (a site's (k, rows)
# log-density; (k, rows, d) where a family's log_prob forms the event's terms) stays under 31 MiB.
# Fewer, larger chunks pay the model's per-trace cost fewer times (a Gaussian mixture with
# n = 1e6, k = 16 streams in 4 chunks). The fast paths' chunk-sized tables come from a pool
# (families.TablePool); any other tensor of that size is allocated per chunk, and above glibc's
# largest mmap threshold (32 MiB) every such allocation is page-faulted anew (measured 15-30%
# slower). The chunks are then evened out: 4 of 250000 rows, not 3 and a rest.
CHUNK_BYTES = 31 * 2**20
# The M-step plan (which closed forms apply, verified by a gradient) is made on at most this many
# rows of the first chunk: its check runs with autograd, whose graph would otherwise scale with the chunk.
PLAN_ROWS = 65536


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
    chunk_size : int, "auto" or None
        Rows of the data plate per chunk in :meth:`step`. The weighted statistics of the
        M-step are sums over data points, so a step can stream the data through the E-step
        in chunks and add up their statistics: memory stays O(chunk) instead of
        O(n * k * d). ``"auto"`` picks a chunk that keeps the largest per-chunk tensor under
        ``CHUNK_BYTES`` and streams only where that is exact (see :attr:`chunking`): every
        parameter has a closed-form update, there are no point-estimated global latents, all
        sites lie in one data plate, and splitting leaves log p(x) unchanged on a sample.
        ``None`` never streams; an int asks for that chunk (an error if streaming is not exact).

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
        chunk_size="auto",
    ) -> None:
        if posterior not in ("exact", "hard"):
            raise ValueError(f"posterior must be 'exact' or 'hard', got {posterior!r}.")
        if m_step not in ("auto", "closed_form", "gradient"):
            raise ValueError(f"m_step must be 'auto', 'closed_form' or 'gradient', got {m_step!r}.")
        if reg_covar < 0:
            raise ValueError(f"reg_covar must be >= 0, got {reg_covar}.")
        if not (chunk_size is None or chunk_size == "auto" or (isinstance(chunk_size, int) and chunk_size > 0)):
            raise ValueError(f"chunk_size must be a positive int, 'auto' or None, got {chunk_size!r}.")
        self.model = model
        self.posterior = posterior
        self.m_step_mode = m_step
        self.reg_covar = reg_covar
        self.max_grad_iter = max_grad_iter
        self.chunk_size = chunk_size
        self._chunks: Optional[_Chunking] = None  # how step() splits the data, once decided
        self._tables = families.TablePool()  # chunk-sized tables, handed from chunk to chunk
        self.structure: Optional[ModelStructure] = None
        self._plan: Optional[Dict[str, str]] = None  # param -> "closed" | "gradient"
        self._uses: Dict[str, List[families.Use]] = {}
        self._why: Dict[str, str] = {}
        self._param_names: List[str] = []
        self._phase2_sites: set = set()

    # -- the algorithm -----------------------------------------------------------------------
    def step(self, *args, **kwargs) -> float:
        """One EM iteration. Returns -log p(x; theta) - log p(theta) at theta *before* the update
        (for ``posterior="hard"``: -max_z log p(x, z; theta) - log p(theta))."""
        _check_arguments(args, kwargs)
        self._prepare(args, kwargs)
        if self._chunks.rows is not None and self._streams(args, kwargs):
            return self._streaming_step(self._chunks.split(args, kwargs))
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

    def log_likelihood(self, *args, **kwargs) -> float:
        """The log-likelihood l(theta) = log p(x; theta) at the current parameters, streamed like :meth:`step`.

        The same number as ``e_step(...).log_evidence``, without keeping Q(z): memory stays
        O(chunk) where :meth:`step` streams.
        """
        _check_arguments(args, kwargs)
        self._prepare(args, kwargs)
        pieces = self._chunks.split(args, kwargs) if self._chunks.rows is not None else [(args, kwargs)]
        total = 0.0
        for c_args, c_kwargs in families.recycling(self._tables if len(pieces) > 1 else None, pieces):
            post = exact_posterior(self.model, self.structure, c_args, c_kwargs)
            _check_observations(post)
            total += float(post.log_evidence)
        families.release_features()
        return total

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
        finally:
            families.release_features()

    # -- streaming the data in chunks --------------------------------------------------------
    def _prepare(self, args, kwargs) -> None:
        """Inspect the model once; decide (once per data shape) whether step() streams in chunks."""
        if self.structure is None:
            self.structure = inspect_model(self.model, args, kwargs)
        signature = _signature(args, kwargs)
        store = pyro.get_param_store()
        missing = not self._param_names or any(n not in store for n in self._param_names)
        if self._chunks is not None and self._chunks.signature == signature and not missing:
            return
        # A full-data trace without log-probabilities is cheap (enumerated tensors are (k, 1, ...)).
        # It initialises any parameter missing from the store from all the data, not from one chunk.
        trace, _ = trace_model(self.model, self.structure, args, kwargs, log_prob="none")
        if self._chunks is None or self._chunks.signature != signature:
            self._chunks = self._decide_chunking(trace, args, kwargs, signature)
            self._tables.clear()  # tables sized for other data

    def _decide_chunking(self, trace, args, kwargs, signature) -> "_Chunking":
        off = _Chunking(signature)
        plate, why = _data_plate(trace, self.structure)
        if self.chunk_size is None:
            why = "chunk_size=None"
        if not why:
            n = plate[1]
            off.n = n
            positions = _row_arguments(args, kwargs, n)
            why = "" if positions else f"no argument has the data plate's size {n} as its first dimension"
        if not why:
            on = _Chunking(signature, n=n, positions=positions)
            per_row, why = self._check_split(on, args, kwargs)
            if isinstance(self.chunk_size, int):
                on.rows = self.chunk_size
            else:
                most = max(1024, CHUNK_BYTES // per_row)
                on.rows = -(-n // -(-n // most))  # ceil(n / number of chunks): chunks of even size
            if not why and on.rows >= n:
                off.why = f"the data ({n} rows) fit in one chunk of {on.rows}"
                return off
        if not why:
            on.why = f"streams the data plate '{plate[0]}' ({on.n} rows) in chunks of {on.rows} rows"
            return on
        if isinstance(self.chunk_size, int):
            raise ValueError(f"chunk_size={self.chunk_size} was asked for, but this model's data cannot be "
                             f"streamed exactly: {why}. Use chunk_size='auto' or None.")
        off.why = f"no streaming: {why}"
        return off

    def _streams(self, args, kwargs) -> bool:
        """Whether step() can stream: the data can be split, and every parameter has a closed form
        (the plan is made on the first rows; a gradient M-step needs all of Q(z) at once)."""
        if self._plan is None:
            first_args, first_kwargs = self._chunks.take(args, kwargs, slice(0, min(self._chunks.rows, PLAN_ROWS)))
            self._make_plan(self.e_step(*first_args, **first_kwargs), first_args, first_kwargs)
        gradient = [p for p, how in self._plan.items() if how != "closed"]
        if not gradient:
            if self._chunks.shift is None:
                self._chunks.shift = self._locations_are_shared(args, kwargs)
            return True
        why = f"parameters {gradient} have a gradient M-step, which needs Q(z) of all the data at once"
        if isinstance(self.chunk_size, int):
            raise ValueError(f"chunk_size={self.chunk_size} was asked for, but {why}. Use chunk_size='auto' or None.")
        self._chunks.why = f"no streaming: {why}"
        return False

    def _locations_are_shared(self, args, kwargs) -> bool:
        """Whether every scale parameter's location is the same for all data points (mu_z, not mu_{z, i}):
        its shapes in a chunk's trace equal those in a one-row trace."""
        first = self._chunks.split(args, kwargs)[0]
        return _location_shapes(self, *first) == _location_shapes(self, *self._chunks.take(*first, slice(0, 1)))

    def _check_split(self, chunking: "_Chunking", args, kwargs):
        """log p(x) of 2m rows must equal log p(first m) + log p(next m): the model treats rows alike
        and independently (no normalisation of the data inside the model, say). Also returns
        the bytes per row of the largest site tensor, which sizes the chunks."""
        m = max(1, min(32, chunking.n // 2))
        logs, per_row = [], 1
        for rows in (slice(0, 2 * m), slice(0, m), slice(m, 2 * m)):
            c_args, c_kwargs = chunking.take(args, kwargs, rows)
            post = exact_posterior(self.model, self.structure, c_args, c_kwargs)
            logs.append(post.log_evidence)
            for site in sample_sites(post.trace):
                event = 1 if families.has_gemm_path(site["fn"]) else site["fn"].event_shape.numel()
                size = site["unscaled_log_prob"].numel() * event * site["unscaled_log_prob"].element_size()
                per_row = max(per_row, size // (rows.stop - rows.start))
        whole, parts = logs[0], logs[1] + logs[2]
        tol = 1e3 * torch.finfo(whole.dtype).eps * (1 + whole.abs())
        if not (whole - parts).abs() <= tol:
            return per_row, (f"log p(x) of {2 * m} rows ({float(whole):.6g}) differs from the sum over two "
                             f"halves ({float(parts):.6g}): the model couples rows or transforms the data as a whole")
        return per_row, ""

    @property
    def chunking(self) -> str:
        """How :meth:`step` goes through the data: in chunks, or whole and why (after the first step)."""
        if self._chunks is None:
            raise RuntimeError("chunking is decided at the first step(); call em.step(...) first.")
        return self._chunks.why

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
        return self._objective(post, args, kwargs)

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
        self._phase2_sites = {u.site for p in self._phases([p for p, how in self._plan.items() if how == "closed"])[1]
                              for u in self._uses[p]}
        for p, how in self._plan.items():
            if how == "closed":
                u = self._uses[p][0]
                self._why[p] = f"closed form: {u.rule.family.__name__}.{u.rule.attr} at site {u.site}"
            else:
                self._why.setdefault(p, "gradient (L-BFGS on E_Q[log p(x, z; theta)])")

    @staticmethod
    def _find_closed_forms(trace, leaves, weights=None) -> Dict[str, List[families.Use]]:
        """Per parameter, its uses in the trace that a closed-form rule covers; with ``weights``,
        only at the sites they are given for (a pass that kept only the weights it needs)."""
        by_id = {id(leaf): name for name, leaf in leaves.items()}
        uses: Dict[str, List[families.Use]] = {}
        for site in sample_sites(trace):
            if weights is not None and site["name"] not in weights:
                continue
            for use in families.find_uses(site, by_id):
                uses.setdefault(use.param, []).append(use)
        # A parameter qualifies only if every detected use follows the same update rule.
        return {p: us for p, us in uses.items() if len({(u.rule.family, u.rule.attr) for u in us}) == 1}

    def _verify_closed_forms(self, post: Posterior, candidates: List[str], args, kwargs) -> None:
        """Keep a closed form only if E_Q[log p] is stationary in that parameter after the update.

        The check runs with reg_covar = 0, where the closed forms are exact maximisers. Where that
        update is singular, or near-singular (a component with one data point, whose gradient is
        then all rounding), it runs again with reg_covar, whose update is the exact maximiser of
        E_Q[log p] - (reg/2) sum_z N_z tr(Sigma_z^{-1}) (see :meth:`_objective`).
        """
        before = self._snapshot()
        reg, failed = self.reg_covar, list(candidates)
        try:
            for self.reg_covar in ((0.0, reg) if reg > 0 else (0.0,)):
                try:
                    g_old = self._unconstrained_grads(post, failed, args, kwargs)
                    self._write(self._closed_form(post, candidates, args, kwargs))
                    g_new = self._unconstrained_grads(post, failed, args, kwargs)
                except (RuntimeError, ValueError, FloatingPointError):
                    if self.reg_covar == reg:
                        raise  # the update the M-step would make fails: say so (e.g. a non-finite Sigma)
                    continue  # singular without reg_covar: the regularised update decides
                finally:
                    self._restore(before)
                # A near-singular scale's gradient is rounding on terms of size N / sigma^4: the second,
                # regularised check allows a scale eps^(1/4) (1e-4) of its first gradient, still far
                # below a closed form that does not apply (a prior, a shared parameter: O(1) of it).
                tol = {p: 0.25 if self.reg_covar > 0 and self._uses[p][0].rule.phase == 2 else 0.5 for p in failed}
                eps = {p: torch.finfo(g_new[p].dtype).eps for p in failed}
                failed = [p for p in failed if not g_new[p].abs().max() <= eps[p] ** tol[p] * (1 + g_old[p].abs().max())]
                if not failed:
                    break
        finally:
            self.reg_covar = reg
        for p in failed:
            self._plan[p] = "gradient"
            self._why[p] = ("gradient (a closed form was detected but E_Q[log p(x, z; theta)] "
                            "is not stationary at it, e.g. the parameter has a prior or other uses)")

    def _objective(self, post: Posterior, args, kwargs, reg: float = 0.0) -> torch.Tensor:
        """E_Q[log p(x, z; theta)] + log p(theta) - (reg/2) sum over the weighted elements of every
        Gaussian site of tr(Sigma^{-1}) (1 / sigma^2 for a Normal): with reg = reg_covar, the
        objective whose exact maximiser is the closed form that adds reg_covar to every covariance
        (variance)."""
        tr, _ = trace_model(self.model, self.structure, args, kwargs, leaf_params=False)
        total = sum(expected_log_prob(s, post.weights[s["name"]]) for s in sample_sites(tr))
        if reg == 0:
            return total
        for site in sample_sites(tr):
            weights = post.weights[site["name"]]
            if not torch.is_tensor(weights):
                continue  # a chain's tables: its emissions are not regularised here
            fn, w = families.unwrap(site["fn"], weights)
            if isinstance(fn, dist.MultivariateNormal):
                total = total - 0.5 * reg * (w * fn.precision_matrix.diagonal(dim1=-2, dim2=-1).sum(-1)).sum()
            elif isinstance(fn, dist.Normal):
                total = total - 0.5 * reg * (w / fn.scale.square()).sum()
        return total

    def _unconstrained_grads(self, post, names, args, kwargs) -> Dict[str, torch.Tensor]:
        store = pyro.get_param_store()
        leaves = [store[n].unconstrained() for n in names]
        grads = torch.autograd.grad(self._objective(post, args, kwargs, self.reg_covar), leaves, allow_unused=True)
        return {n: (torch.zeros_like(l) if g is None else g) for n, l, g in zip(names, leaves, grads)}

    def _closed_form(self, post: Posterior, names: List[str], args, kwargs) -> Dict[str, torch.Tensor]:
        """Phase 1 (locations, probabilities, rates) then phase 2 (scales given new locations)."""
        phase1, phase2 = self._phases(names)
        new = self._sums(phase1).add(post.trace, post.leaves, post.weights).finish()
        if phase2:
            self._write(new)  # phase 2 reads the new locations from a fresh trace
            trace, leaves = trace_model(self.model, self.structure, args, kwargs, log_prob="none")
            new.update(self._sums(phase2).add(trace, leaves, post.weights).finish())
        return new

    def _streaming_step(self, chunks: List[tuple]) -> float:
        """One EM iteration over the data in chunks; every parameter has a closed form.

        One pass: the E-step of each chunk (Q(z^(i)) depends on row i only) and its weighted
        statistics. Scales (phase 2) need the new locations: their statistics are taken about
        the old location and shifted to the new one (:func:`ppl_em.families.location_moments`),
        or, where the location varies per data point, gathered in a second pass.
        """
        phase1, phase2 = self._phases(list(self._plan))
        shift = self._chunks.shift
        sums, moments, objective, kept = self._sums(phase1), _Moments(phase2), 0.0, []
        # A chunk's tables are free once its statistics are summed, unless its weights are kept.
        for c_args, c_kwargs in families.recycling(self._tables if shift or not phase2 else None, chunks):
            post = exact_posterior(self.model, self.structure, c_args, c_kwargs, mode=self.posterior)
            _check_observations(post)
            objective += float(post.objective)
            uses = self._find_closed_forms(post.trace, post.leaves, post.weights)  # once per chunk
            sums.add(post.trace, post.leaves, post.weights, uses)
            if phase2 and shift:
                moments.add(post.trace, post.weights, uses)
            elif phase2:
                kept.append({s: post.weights[s] for s in self._phase2_sites})
            del post, uses  # nothing of the chunk outlives its body: its tables are recycled
        saved = self._snapshot()
        try:
            self._write(sums.finish())
            if phase2 and shift:
                one_row = self._chunks.take(*chunks[0], slice(0, 1))
                trace, leaves = trace_model(self.model, self.structure, *one_row, log_prob="none")
                self._write(moments.finish(trace, leaves, self._sums(phase2)))
            elif phase2:
                sums = self._sums(phase2)
                for (c_args, c_kwargs), weights in zip(chunks, kept):
                    trace, leaves = trace_model(self.model, self.structure, c_args, c_kwargs, log_prob="none")
                    sums.add(trace, leaves, weights)
                self._write(sums.finish())
            self._check_finite()
        except BaseException:
            self._restore(saved)
            raise
        finally:
            families.release_features()
        return -objective

    def _phases(self, names: List[str]):
        phase = {p: self._uses[p][0].rule.phase for p in names}
        return [p for p in names if phase[p] == 1], [p for p in names if phase[p] == 2]

    def _sums(self, names: List[str]) -> "_Sums":
        return _Sums(names, self.reg_covar)

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
        try:
            optim.step(closure)
            end = closure().item()
        except (ValueError, RuntimeError) as error:
            # A line search can try a point outside the model's support (a covariance that is not
            # positive definite, say), which the model's distributions reject: keep the start.
            warnings.warn(f"The gradient M-step for {names} tried parameters that the model rejects "
                          f"({str(error).splitlines()[0][:200]}); the previous values were kept for this step. "
                          "If this repeats, try a larger reg_covar or another initialisation.", RuntimeWarning)
            end = math.inf
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


class _Sums:
    """Running sums, over the uses of each parameter and over data chunks, of S^T(statistics).

    Float32 statistics are accumulated in float64; :meth:`finish` applies the family's formula
    (e.g. mu_j = sum_i w_j^(i) x^(i) / sum_i w_j^(i)) and returns values in the parameter's dtype.
    """

    def __init__(self, names: List[str], reg: float) -> None:
        self.names, self.reg = names, reg
        self.num: Dict[str, torch.Tensor] = {}
        self.den: Dict[str, torch.Tensor] = {}
        self.rule: Dict[str, families.Rule] = {}
        self.old: Dict[str, torch.Tensor] = {}

    def add(self, trace, leaves, weights, uses=None) -> "_Sums":
        """Add one trace's statistics; ``uses``: its closed-form uses, if already found."""
        uses = EM._find_closed_forms(trace, leaves, weights) if uses is None else uses
        for p in self.names:
            for use in uses[p]:
                num, den = families.scatter_stats(use, trace.nodes[use.site], weights[use.site], self.reg)
                self.add_stats(p, use.rule, leaves[p].detach(), num, den)
        return self

    def add_stats(self, name: str, rule: families.Rule, old: torch.Tensor, num, den) -> None:
        _accumulate(self.num, name, num)
        if den is not None:
            _accumulate(self.den, name, den)
        self.rule[name] = rule
        self.old.setdefault(name, old)

    def finish(self) -> Dict[str, torch.Tensor]:
        out = {}
        for p in self.names:
            old = self.old[p]
            value = self.rule[p].finish(self.num[p], self.den.get(p), old.to(self.num[p].dtype))
            out[p] = value.to(old.dtype).detach()
        return out


class _Moments:
    """Running sums over chunks of (M2, S, N) about the old location, per use of each scale parameter."""

    def __init__(self, names: List[str]) -> None:
        self.names = names
        self.sums: Dict[tuple, tuple] = {}
        self.loc: Dict[tuple, torch.Tensor] = {}

    def add(self, trace, weights, uses) -> "_Moments":
        """Add one trace's moments; ``uses``: its closed-form uses."""
        for p in self.names:
            for i, use in enumerate(uses[p]):
                moments, loc = families.location_moments(use, trace.nodes[use.site], weights[use.site])
                moments = tuple(_wide(m) for m in moments)
                key = (p, i)
                self.loc.setdefault(key, loc)
                self.sums[key] = moments if key not in self.sums else tuple(
                    a + b for a, b in zip(self.sums[key], moments))
        return self

    def finish(self, trace, leaves, sums: _Sums) -> Dict[str, torch.Tensor]:
        """The scale updates at the new locations, read from ``trace`` (a trace at the new parameters)."""
        uses = EM._find_closed_forms(trace, leaves)
        for p in self.names:
            for i, use in enumerate(uses[p]):
                fn = families.use_distribution(use, trace.nodes[use.site])
                old = self.loc[(p, i)]
                new = families.compact(fn.loc).detach()
                num, den = families.shifted_stats(use, self.sums[(p, i)], old, new, sums.reg)
                sums.add_stats(p, use.rule, leaves[p].detach(), num, den)
        return sums.finish()


def _location_shapes(em: "EM", args: tuple, kwargs: dict) -> list:
    """(site, location shape, parameter view shape) of every use of a scale parameter."""
    trace, leaves = trace_model(em.model, em.structure, args, kwargs, log_prob="none")
    uses = EM._find_closed_forms(trace, leaves)
    out = []
    for p in em._phases([q for q, how in em._plan.items() if how == "closed"])[1]:
        for use in uses[p]:
            fn = families.use_distribution(use, trace.nodes[use.site])
            out.append((use.site, tuple(families.compact(fn.loc).shape), tuple(use.selection.shape)))
    return out


def _wide(value: torch.Tensor) -> torch.Tensor:
    """Statistics of lower precision, in float64 for summing."""
    return value.double() if value.dtype in (torch.float16, torch.bfloat16, torch.float32) else value


def _accumulate(sums: Dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    value = _wide(value)
    sums[name] = value if name not in sums else sums[name] + value


@dataclass
class _Chunking:
    """How step() splits the data: ``rows`` per chunk along the first dimension of the arguments
    at ``positions`` (None: the whole data at once), for data of the given shapes (``signature``)."""

    signature: tuple
    rows: Optional[int] = None
    n: int = 0
    positions: Tuple = ()
    why: str = ""
    shift: Optional[bool] = None  # phase-2 statistics by shifting moments (see EM._streaming_step)

    def take(self, args: tuple, kwargs: dict, rows: slice):
        return (tuple(a[rows] if i in self.positions else a for i, a in enumerate(args)),
                {k: (v[rows] if k in self.positions else v) for k, v in kwargs.items()})

    def split(self, args: tuple, kwargs: dict) -> List[tuple]:
        return [self.take(args, kwargs, slice(start, min(start + self.rows, self.n)))
                for start in range(0, self.n, self.rows)]


def _signature(args: tuple, kwargs: dict) -> tuple:
    items = list(enumerate(args)) + sorted(kwargs.items())
    return tuple((key, tuple(v.shape), v.dtype) for key, v in items if torch.is_tensor(v))


def _row_arguments(args: tuple, kwargs: dict, n: int) -> Tuple:
    """Positions (ints) and names of the tensor arguments whose first dimension is the data plate's."""
    items = list(enumerate(args)) + list(kwargs.items())
    return tuple(key for key, v in items if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == n)


def _data_plate(trace, structure: ModelStructure) -> Tuple[Optional[Tuple[str, int]], str]:
    """The largest plate that holds every sample site, as (name, size), or why there is none."""
    if structure.map_sites:
        return None, f"point-estimated global latents {list(structure.map_sites)}"
    sites = sample_sites(trace)
    common = None
    for site in sites:
        frames = {(f.name, f.size) for f in site["cond_indep_stack"] if f.vectorized}
        common = frames if common is None else common & frames
    if not common:
        return None, "no plate holds every site (a global latent or a Markov chain couples the data)"
    if any(float(site["scale"]) != 1.0 for site in sites):
        return None, "a site is scaled (poutine.scale or a subsampled plate)"
    return max(common, key=lambda frame: frame[1]), ""


def _first_bad(value: torch.Tensor, bad: Optional[torch.Tensor] = None) -> str:
    bad = ~torch.isfinite(value) if bad is None else bad
    first = tuple(int(i) for i in bad.nonzero()[0])
    return f"{int(bad.sum())} non-finite value(s) (NaN or inf); the first is at index {first}: {value[first].item()}"


def _all_finite(value: torch.Tensor) -> bool:
    """No NaN or inf in ``value``: one sum (finite unless some entry is not, or it overflows), and
    the elementwise test only when the sum is not finite."""
    return bool(torch.isfinite(value.sum())) or bool(torch.isfinite(value).all())


def _check_arguments(args: tuple, kwargs: dict) -> None:
    """Raise a ValueError naming the argument and index of the first NaN or inf in the data."""
    named = [(f"argument {i}", a) for i, a in enumerate(args)] + [(f"argument '{k}'", v) for k, v in kwargs.items()]
    for label, value in named:
        if torch.is_tensor(value) and value.is_floating_point() and not _all_finite(value):
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
        if not torch.is_tensor(value) or not value.is_floating_point() or _all_finite(value):
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
