"""Expectation-Maximisation for any Pyro model whose local latents are discrete.

EM maximises the log-likelihood l(theta) = log p(x; theta) = log sum_z p(x, z; theta) by
coordinate ascent on the evidence lower bound

    ELBO(x; Q, theta) = sum_z Q(z) log [ p(x, z; theta) / Q(z) ]  <=  log p(x; theta)

(Jensen's inequality, log is concave), with equality when Q(z) = p(z | x; theta):

* E-step: Q(z) := p(z | x; theta), exact, by enumeration (:mod:`ppl_em.posterior`), summarised
  into expected sufficient statistics (:class:`ppl_em.Statistics`), e.g. N_j = sum_i w_j^(i),
  sum_i w_j^(i) x^(i), sum_i w_j^(i) x^(i) x^(i)^T.
* M-step: theta := argmax_theta E_Q[log p(x, z; theta)] (+ log p(theta) for point-estimated
  global latents), from the statistics in closed form where the site is an exponential family
  whose parameters are selected by the latents (:mod:`ppl_em.families`), by L-BFGS otherwise
  (:mod:`ppl_em.gradient`).

Each step therefore never decreases log p(x; theta) (+ log p(theta)). The statistics of a data set
are the sum of its chunks' statistics: ``step`` streams the data chunk by chunk
(:mod:`ppl_em.chunking`), and the same two calls serve data on disk, online EM and several processes.

References: lecture notes, "EM algorithm", "Jensen's inequality", "ELBO"; Dempster, Laird &
Rubin, JRSS-B 1977; Neal & Hinton, "A view of the EM algorithm", 1998.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping
from typing import Callable, Dict, List, Optional, Tuple

import torch
import pyro
from torch.distributions import constraints, transform_to
from torch.distributions.transforms import ComposeTransform, LowerCholeskyTransform, PositiveDefiniteTransform
from pyro.distributions.transforms import CholeskyTransform

from . import chunking as chunks_, closed_form, distributed as distributed_, sources
from .checks import check_arguments, check_missing, check_observations
from .diagnostics import degenerate_update_message, explain_failure, non_finite_loss_message
from .fast import Replay, StepTape, Workspace, signature
from .fast.tape import TAPE_ELEMENTS
from .gradient import (StalledError, expected_log_joint, gradient_m_step, stalled_message, stationary,
                       unconstrained_grads)
from .plan import Plan, make_plan
from .priors import MAP_BASES, NoMAPError, log_jacobian
from .posterior import ModelStructure, Posterior, differentiable_posterior, exact_posterior, inspect_model, trace_model
from .statistics import Statistics
from .svi import NonFiniteLossError

__all__ = ["EM", "NonFiniteParameterError", "StalledError", "NoMAPError"]

# The M-step plan (which closed forms apply, verified by a gradient) is made on at most this many
# rows of the first chunk: its check runs with autograd, whose graph would otherwise scale with the chunk.
FINITE_TOGETHER = 2 ** 16  # parameters of at most this many elements in all are tested finite as one tensor
PLAN_ROWS = 16384
CHUNK_BYTES = chunks_.CHUNK_BYTES


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
        Rows of the data plate per chunk in :meth:`step` (see :mod:`ppl_em.chunking`). ``"auto"``
        streams where that is exact and useful, ``None`` never, an int asks for that chunk (an
        error where streaming is not exact). :attr:`chunking` says what was decided.
    map_basis : {"constrained", "unconstrained"}
        Where MAP-EM takes the mode of a parameter with a conjugate prior (:mod:`ppl_em.priors`):
        of the posterior density of the parameter itself (the default; a :class:`NoMAPError` where
        a concentration below 1 makes it unbounded), or of its log / log-odds (counts + alpha).
    distributed : bool
        Data-parallel EM over ``torch.distributed``'s default process group (:mod:`ppl_em.distributed`):
        each process passes its own shard; the statistics are summed by ``all_reduce`` before every
        M-step, so every rank ends each step with the same parameters and ``step`` returns the loss of
        all ranks' data together.
    missing : {"error", "marginalize"}
        NaN in a tensor argument: an error (the default), or a missing value that the model masks
        (``"marginalize"``: the NaN reaches the model, which observes p(x_obs^(i) | z^(i)); a NaN that
        reaches an observed site unmasked is still an error; an inf is an error either way). A model
        may write the rows that hold a NaN differently (``ppl_em.models.gmm``), so the M-step plan is
        then made on all the rows of the first data, not on its first ``PLAN_ROWS``.
    replay : bool
        Whether steps on the same unchunked data may replay the model's recorded run instead of running
        it (:mod:`ppl_em.fast.replay`: the tensor operations from theta to the distributions, checked
        once against a real run; the speed of small fits), and a whole closed-form step its recorded tensor
        operations (:mod:`ppl_em.fast.tape`: guarded by every decision the step takes from a tensor, checked
        once against a real step). This assumes that a run depends on nothing but
        the arguments and the param store: a model that reads something else that changes between steps
        (a global temperature, say) should get it as an argument, or ``replay=False``.

    The data may also be a data source where a tensor of rows would be: a numpy memory map, a
    ``DataLoader``, a re-iterable of batches (:mod:`ppl_em.sources`); ``step`` then reads it batch by
    batch, in O(batch) memory.

    The loop contract: ``stats = em.summarize(*args)`` (E-step, no parameter changes),
    ``em.maximize(stats)`` (M-step from statistics alone), ``em.step(*args)`` (= maximize of the sum
    of summarize over the chunks; returns -log p(x; theta) at theta before the update).

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
    >>> stats = em.summarize(x)                  # the E-step, as additive statistics
    >>> halves = em.summarize(x[:2]) + em.summarize(x[2:])
    >>> bool(torch.allclose(stats.sums["mu.num"], halves.sums["mu.num"]))
    True
    >>> em.maximize(stats)                       # the M-step from statistics alone
    >>> em.e_step(x).marginal("z").shape
    torch.Size([4, 2])
    >>> em.explain()["mu"]
    'closed form: Normal.loc at site x'
    """

    def __init__(self, model: Callable, posterior: str = "exact", m_step: str = "auto", reg_covar: float = 1e-6,
                 max_grad_iter: int = 100, chunk_size="auto", map_basis: str = "constrained",
                 distributed: bool = False, missing: str = "error", replay: bool = True) -> None:
        if posterior not in ("exact", "hard"):
            raise ValueError(f"posterior must be 'exact' or 'hard', got {posterior!r}.")
        if m_step not in ("auto", "closed_form", "gradient"):
            raise ValueError(f"m_step must be 'auto', 'closed_form' or 'gradient', got {m_step!r}.")
        if reg_covar < 0:
            raise ValueError(f"reg_covar must be >= 0, got {reg_covar}.")
        if not (chunk_size is None or chunk_size == "auto" or (isinstance(chunk_size, int) and chunk_size > 0)):
            raise ValueError(f"chunk_size must be a positive int, 'auto' or None, got {chunk_size!r}.")
        if map_basis not in MAP_BASES:
            raise ValueError(f"map_basis must be one of {MAP_BASES}, got {map_basis!r}.")
        self.map_basis, self.missing = map_basis, check_missing(missing)
        self.distributed = distributed_.check_available() if distributed else False
        self._decided: Dict[tuple, chunks_.Chunking] = {}  # chunkings of data shapes seen (a pass's last batch)
        self.on_batch: Optional[Callable[[int], None]] = None  # called with the rows of each batch read (progress)
        self.model, self.posterior, self.m_step_mode = model, posterior, m_step
        self.reg_covar, self.max_grad_iter, self.chunk_size = reg_covar, max_grad_iter, chunk_size
        self.structure: Optional[ModelStructure] = None
        self._offered = None  # a run of the model under enumeration made by its caller, for these arguments (offer_trace)
        self.plan: Optional[Plan] = None
        self._chunks: Optional[chunks_.Chunking] = None  # how step() splits the data, once decided
        self._workspace = Workspace()  # chunk-sized tables, handed from chunk to chunk and step to step
        self._replay = Replay()  # the model's run on unchunked data, recorded and replayed (ppl_em.fast.replay)
        self._chunk_replays: Tuple[Optional[chunks_.Chunking], List[Replay]] = (None, [])  # a step's chunks' runs
        self._taping = False  # whether the step under way is recorded or replayed by the tape
        self._asymmetric: set = set()  # parameters whose positive-definite update was not symmetric to the bit (_inside)
        self._tape = StepTape()  # whole closed-form steps on unchunked data, recorded and replayed (ppl_em.fast.tape)
        self._log_px_tape = StepTape()  # log p(x; theta) on unchunked data seen before: the E-step alone, replayed
        self._log_px_seen = None  # the tape key of the last log-likelihood computed for real
        if not replay:
            self._replay.off = self._tape.off = self._log_px_tape.off = "EM(..., replay=False)"
        self._param_names: List[str] = []
        self._log_prior = 0.0
        self.iterations = 0  # steps completed
        self._validated: tuple = ()  # the data (ids and versions of the tensor arguments) already validated
        self._validated_data: list = []  # those tensors, held: no other tensor takes their ids while the key stands
        self._last = None  # (data, loss, parameters after) of the last step, for the objective's watch (_watch)
        self._fast: Optional[_Unchanged] = None  # what the last step that replayed its tape decided from (_fast_step)

    # -- the algorithm -----------------------------------------------------------------------
    def step(self, *args, **kwargs) -> float:
        """One EM iteration. Returns -log p(x; theta) - log p(theta) at theta *before* the update
        (for ``posterior="hard"``: -max_z log p(x, z; theta) - log p(theta); with
        ``map_basis="unconstrained"`` also minus log ``|det d theta / d u|``: the objective EM ascends).

        A step that fails (a non-finite log p(x), a singular covariance update) raises an error that
        says why and what to try, and leaves the parameters as they were before it.
        """
        held = self._held()
        loss = self._fast_step(args, kwargs)  # None: the step takes the whole way
        if loss is None:
            loss = self._iterate_saved(args, kwargs)
        self._watch(loss, args, kwargs, held)
        self.iterations += 1
        return loss

    def _iterate_saved(self, args, kwargs) -> float:
        """:meth:`_iterate`; on failure the parameters as they were, and an error that says why."""
        saved = self._snapshot()
        try:
            return self._iterate(args, kwargs)
        except Exception as error:
            self._restore(saved)
            if getattr(error, "explained", False):  # a batch's or another rank's failure, already explained
                raise
            explained = explain_failure(error, self.model, args, kwargs, self._what())
            if explained is error:
                raise
            raise explained from error

    def reset(self) -> "EM":
        """Start a new run from other parameters (a restart): the iteration count and the objective's
        watch start again, and the check at rest is made again; what is known of the model and the data
        stays (the model's structure, the data's chunking, the M-step plan, the data's validation), so the
        run's first step costs what any step does. The parameters themselves are the param store's:
        clear it or set them before the next step. Returns the EM object."""
        self.iterations, self._last = 0, None
        if self.plan is not None:
            self.plan.rechecked = False
        return self

    def _watch(self, loss: float, args, kwargs, before: tuple) -> None:
        """EM's objective never falls from one step to the next on the same data (the loss never rises),
        so a fall says that a closed form accepted at the plan's starting point does not hold here (an
        update right for some parameter values only): the plan is made and checked again at the next step.

        ``before``: :meth:`_held` at the step's start. The parameters are taken as untouched between two
        steps while the store holds the same tensors at the same versions (every in-place change, ``p.copy_(v)``
        under ``torch.no_grad()`` included, counts one; a write through ``p.data`` is not seen, as for the data)."""
        data = _data_key(args, kwargs)
        last = self._last
        untouched = last is not None and last[0] == data and _same_held(before, last[2])
        if untouched and loss > last[1] + 1e-8 * (1 + abs(last[1])) and self.plan is not None and self.plan.closed:
            warnings.warn(f"{self._what()}: the loss rose from {last[1]:.10g} to {loss:.10g}, which EM's updates "
                          "cannot do: a closed form accepted at the first step does not hold at these parameters. "
                          "The M-step plan is checked again at the next step.", RuntimeWarning)
            self.plan = None
        elif untouched and abs(loss - last[1]) <= 1e-9 * (1 + abs(last[1])):
            self._recheck_at_rest(args, kwargs)
        self._last = (data, loss, self._held())

    def _recheck_at_rest(self, args, kwargs) -> None:
        """Where EM has come to rest, each closed form must be a stationary point of E_Q[log p]: checked once
        per plan, on data that fit in one chunk. A closed form right only for some parameter values (a mean
        that ignores how Sigma_j couples the coordinates) can pass the first check and still lead EM to a
        point that is not a maximum; it then gets the gradient M-step, and EM goes on from there."""
        plan = self.plan
        if plan is None or plan.rechecked or not plan.closed or self._chunks.rows is not None:
            return
        if self.distributed or sources.find(args, kwargs) is not None:
            return  # no rank's check alone may change a plan all ranks share; a source is never all in memory
        plan.rechecked = True
        with self._validation(args, kwargs), torch.enable_grad():
            both = differentiable_posterior(self.model, self.structure, args, kwargs, self.posterior)  # a mixture: one run
            trace, post = both if both is not None else (None, exact_posterior(
                self.model, self.structure, args, kwargs, mode=self.posterior, leaves=False, fuse=False))
            grads = unconstrained_grads(lambda: self._objective(post, args, kwargs, self.reg_covar, trace), plan.closed)
        moving = [p for p, g in grads.items() if g.numel() and float(g.abs().max()) > 1e-2 * (1 + plan.start_gradient.get(p, 0.0))]
        if moving:
            warnings.warn(f"{self._what()}: EM came to rest where E_Q[log p(x, z; theta)] is not stationary in "
                          f"{moving}: their closed form does not hold here, and they get the gradient M-step from now "
                          "on (em.explain() says so).", RuntimeWarning)
            plan.fall_back(moving, "its closed form was accepted at the first step, but EM came to rest where the "
                                   "gradient of E_Q[log p(x, z; theta)] in it does not vanish")

    def _iterate(self, args, kwargs) -> float:
        if self.distributed or sources.find(args, kwargs) is not None:
            return self._iterate_from_statistics(args, kwargs)
        chunking = self._prepare(args, kwargs)
        if self.plan.gradient:  # a gradient M-step needs Q(z) of all the data at once
            post = self.e_step(*args, **kwargs)
            self._check_objective(post.objective, args, kwargs)
            log_prior = float(post.log_prior) + self._log_jacobian()
            self.m_step(post, *args, **kwargs)
            return -float(post.objective + log_prior)
        pieces = chunking.split_held(args, kwargs)  # the same chunks at every step: their model runs are replayed

        def closed_step() -> torch.Tensor:  # the step; its tensor operations may be replayed (ppl_em.fast.tape)
            kept: List[Dict[str, torch.Tensor]] = []  # the weights a second pass needs, per chunk
            with self._validation(args, kwargs):
                stats = Statistics.sum(self._summarize_chunk(a, k, kept, self._chunk_replay(i, len(pieces)), False)
                                       for i, (a, k) in enumerate(self._workspace.chunks(pieces)))  # E-step
            self._check_objective(stats.objective, args, kwargs)
            log_prior = self._log_prior + self._log_jacobian()  # log p(theta): a term of every chunk's trace, counted once
            self._m_step_from(stats, pieces, kept)  # M-step
            return (stats.objective + log_prior) if log_prior != 0.0 else stats.objective

        roots = self._roots()
        key = self._tape_key(args, kwargs, roots)
        self._taping = key is not None and self._tape.off is None
        try:  # a step that may be recorded runs its blocks in order, so that its real runs equal its replays
            with self._workspace.in_order(key is not None and self._tape.off is None):
                loss = -float(self._tape.step(closed_step, key, roots, (args, kwargs, self.plan)))
        finally:
            self._taping = False
        tape = self._tape.tape
        if tape is not None and tape.verified and tape.key == key and self._tape.off is None:
            self._fast = _Unchanged(self, args, kwargs, roots, tape)
        return loss

    def _fast_step(self, args, kwargs) -> Optional[float]:
        """The step as a replay of its verified tape (:mod:`ppl_em.fast.tape`), straight away, where nothing
        that :meth:`_iterate` decides from has changed since a step that replayed it (:class:`_Unchanged`):
        the same tensor operations as that way, without its Python. None: take the whole way (also where the
        replay stopped at a guard or raised, having written no parameter: the whole way then records the
        step's new way, or raises the step's error with its explanation)."""
        fast = self._fast
        if fast is None:
            return None
        if not fast.holds(self, args, kwargs):
            self._fast = None
            return None
        tape = fast.tape
        saved = None if tape.writes_last else self._snapshot()
        try:
            loss = tape.run(fast.roots)
        except Exception:
            loss = None
            if saved is not None:
                self._restore(saved)
        if loss is None:
            self._fast = None
            return None
        self._tape.replays += 1
        return -float(loss)

    def _iterate_from_statistics(self, args, kwargs) -> float:
        """theta := maximize(s), s = the statistics of every batch of a source (summed over the processes)."""
        stats = self.summarize(*args, **kwargs)  # E-step
        log_prior = self._log_prior + self._log_jacobian()
        self.maximize(stats)  # M-step
        return -float(stats.objective + log_prior)

    def _tape_key(self, args, kwargs, roots: Dict[str, torch.Tensor]):
        """What a recorded step, or a recorded log-likelihood, holds for (:mod:`ppl_em.fast.tape`): these very
        data, already validated, in one chunk; this plan, with these closed forms, no second pass and no per-row
        selection to read again from the graph; parameters of these names, shapes and constraints; these
        options. None where neither is replayed."""
        plan = self.plan
        seen = _data_key(args, kwargs)
        if self._chunks.rows is not None or plan.second_pass or plan.needs_graph or seen != self._validated:
            return None  # (a per-row selection is read again from each step's autograd graph: not replayed)
        if sum(v.numel() for v in list(args) + list(kwargs.values()) if torch.is_tensor(v)) > TAPE_ELEMENTS:
            return None  # large data: the step's Python is a small part of it, and a tape would keep its tables
        held = pyro.get_param_store()._constraints  # (a restart fills a cleared store with new tensors)
        layout = tuple((n, *_layout(t), str(held.get(n))) for n, t in roots.items())
        return (signature(args), signature(kwargs), id(plan), tuple(plan.closed), tuple(plan.gradient),
                layout, self.reg_covar, self.posterior, self.map_basis, torch.is_grad_enabled())

    def _roots(self) -> Dict[str, torch.Tensor]:
        unconstrained = dict(pyro.get_param_store().named_parameters())
        return {n: unconstrained[n] for n in self._param_names if n in unconstrained}

    def _validation(self, args, kwargs):
        """Pyro's validation for the E-step's traces: on while these data (these very tensors, unchanged)
        have not been through a step yet, off after: the data were checked, and the parameters are checked
        when an M-step writes them (a distribution's own checks would repeat both at every step)."""
        if _data_key(args, kwargs) == self._validated:
            return pyro.validation_enabled(False)
        self._checked(args, kwargs)
        return contextlib.nullcontext()

    def _checked(self, args, kwargs) -> None:
        """These data (these very tensors, unchanged) have been through Pyro's validation."""
        self._validated = _data_key(args, kwargs)
        self._validated_data = [v for v in list(args) + list(kwargs.values()) if torch.is_tensor(v)]  # (ids stay theirs)

    def _check_objective(self, objective: torch.Tensor, args, kwargs) -> None:
        """The E-step's log p(x) must be finite before any M-step uses its Q(z)."""
        if not torch.isfinite(objective):
            raise NonFiniteLossError(non_finite_loss_message(self.model, args, kwargs, self._what(), None))

    def _what(self) -> str:
        return f"{'hard EM' if self.posterior == 'hard' else 'EM'} iteration {self.iterations + 1}"

    def summarize(self, *args, **kwargs) -> Statistics:
        """The E-step on this data, as expected sufficient statistics; no parameter changes.

        Raises ValueError when some parameter's M-step cannot be made from statistics (a gradient
        M-step needs all of Q(z) at once; a scale whose location varies per data point needs a
        second pass): :meth:`step` handles those. With a data source among the arguments, the sum over its
        batches; with ``distributed=True``, the sum over every process's data (an all-reduce).
        """
        if self.distributed:
            return distributed_.summarize(self, args, kwargs)
        return self._summarize_here(args, kwargs)

    def _summarize_here(self, args, kwargs) -> Statistics:
        """The statistics of this process's data: a source batch by batch, tensors chunk by chunk."""
        if sources.find(args, kwargs) is not None:
            return sources.summarize(self, args, kwargs)
        self._prepare(args, kwargs)
        if self.plan.gradient or self.plan.second_pass:
            what = self.plan.gradient or sorted(self.plan.second_pass)
            raise ValueError(f"Parameters {what} cannot be updated from statistics alone "
                             f"({'; '.join(self.plan.why[p] for p in what)}). Use em.step(...) on the whole data, in "
                             "memory (tensors; not a data source or a batch of a stream), which makes that pass itself.")
        with self._validation(args, kwargs):
            return Statistics.sum(self._summarize_chunk(a, k, None)
                                  for a, k in self._workspace.chunks(self._chunks.split(args, kwargs)))

    def maximize(self, stats: Statistics) -> None:
        """theta := argmax_theta E_Q[log p(x, z; theta)] from statistics alone: the closed forms.

        Locations, probabilities and rates first, then the scales about the new locations.
        Raises :class:`NonFiniteParameterError` (keeping the previous parameters) if an update is not finite.
        """
        plan = self._plan_or_raise()
        self._write(closed_form.maximize(plan, stats, [p for p in plan.closed if p not in plan.second_pass],
                                         self._current(), self.reg_covar, self.map_basis))

    def e_step(self, *args, **kwargs) -> Posterior:
        """Q(z) := p(z | x; theta) (or its mode), and log p(x; theta). See :class:`Posterior`."""
        if sources.find(args, kwargs) is not None:
            raise ValueError("e_step holds Q(z) of all the data at once, which a data source does not fit; use "
                             "em.summarize(...) or em.step(...) on the source, or e_step on one batch.")
        if _data_key(args, kwargs) != self._validated:  # data already through a step, unchanged, were checked
            check_arguments(args, kwargs, self.missing)
        if self.structure is None:
            self.structure = inspect_model(self.model, args, kwargs)
        post = exact_posterior(self.model, self.structure, args, kwargs, mode=self.posterior)
        check_observations(post)
        self._param_names = list(post.leaves)
        return post

    def m_step(self, post: Posterior, *args, **kwargs) -> None:
        """theta := argmax_theta E_Q[log p(x, z; theta)] + log p(theta), Q fixed: closed forms from the
        posterior's statistics, then L-BFGS for the rest. Keeps the previous parameters on failure."""
        if self.plan is None:
            self._make_plan(post, args, kwargs)
        saved = self._snapshot()
        try:
            self._m_step_from(closed_form.summarize(self.plan, post), [(args, kwargs)], [post.weights])
            moved = any(not torch.equal(v, saved[n]) for n, v in self._snapshot().items())
            # The objective the closed forms maximise exactly: with reg_covar, minus (reg/2) sum N tr(Sigma^-1).
            objective = (lambda: self._objective(post, args, kwargs, self.reg_covar)) if self.reg_covar else \
                (lambda: self.expected_log_joint(post, *args, **kwargs))
            stalled = gradient_m_step(objective, self.plan.gradient, max(1.0, _total_weight(post)), self.max_grad_iter)
            if stalled and not moved:
                raise StalledError(stalled_message(stalled))
            if stalled:
                warnings.warn(stalled + " for this step.", RuntimeWarning)
            self._check_finite()
        except BaseException:
            self._restore(saved)
            raise

    def log_likelihood(self, *args, **kwargs) -> float:
        """l(theta) = log p(x; theta) at the current parameters, streamed like :meth:`step` (memory O(chunk));
        of every process's data with ``distributed=True``. On unchunked data already through a step, computed
        again (each restart's score, a log-likelihood per iteration), the E-step's tensor operations are
        recorded at the second computation, checked against a real run at the third and replayed after
        (:mod:`ppl_em.fast.tape`, under the key of :meth:`_tape_key`): the same numbers, without the model's run."""
        if self.distributed:
            return distributed_.log_likelihood(self, args, kwargs)
        return self._log_likelihood_here(args, kwargs)

    def _log_likelihood_here(self, args, kwargs) -> float:
        if sources.find(args, kwargs) is not None:
            return sources.log_likelihood(self, args, kwargs)
        chunking = self._prepare(args, kwargs, plan=False)
        if chunking.rows is None and self.plan is not None:
            # The same data and parameters' layout a second time (restarts, or a log-likelihood per iteration):
            # the E-step's tensor operations are recorded, checked against a real run, then replayed.
            roots = self._roots()
            key = self._tape_key(args, kwargs, roots)
            if key is not None and key == self._log_px_seen:
                def whole() -> torch.Tensor:
                    with self._validation(args, kwargs):
                        return self._log_evidence(args, kwargs, None)
                return float(self._log_px_tape.step(whole, key, roots, (args, kwargs, self.plan)))
            self._log_px_seen = key
        total = 0.0
        with self._validation(args, kwargs):
            for c_args, c_kwargs in self._workspace.chunks(chunking.split(args, kwargs)):
                total += float(self._log_evidence(c_args, c_kwargs, self._workspace))
        return total

    def _log_evidence(self, args, kwargs, workspace: Optional[Workspace]) -> torch.Tensor:
        """log p(x; theta) of one chunk, a 0-dim tensor: the E-step without a graph or the M-step's sums."""
        post = exact_posterior(self.model, self.structure, args, kwargs, workspace=workspace, leaves=False, fuse=False)
        check_observations(post)
        return post.log_evidence

    # -- E-step and M-step over chunks -------------------------------------------------------
    def _chunk_replay(self, index: int, count: int) -> Optional[Replay]:
        """The replay of chunk ``index``'s model run in a step over ``count`` chunks (held views of the data:
        :meth:`ppl_em.chunking.Chunking.split_held`): one :class:`ppl_em.fast.Replay` per chunk, made anew with
        the chunking; the EM's own for unchunked data."""
        if self._chunks.rows is None:
            return self._replay
        if self._chunk_replays[0] is not self._chunks or len(self._chunk_replays[1]) != count:
            self._chunk_replays = (self._chunks, [Replay() for _ in range(count)])
            for replay in self._chunk_replays[1]:
                replay.off = self._replay.off  # EM(..., replay=False), or a model found not to replay
        return self._chunk_replays[1][index]

    def _summarize_chunk(self, args, kwargs, kept: Optional[list], replay: Optional[Replay] = None,
                         evidence: bool = True) -> Statistics:
        # ``replay``: this chunk's, where its tensors are the same at every step (a step's held chunks, or the
        # unchunked data); a step that the tape records or replays needs no model replay. ``evidence``: whether
        # hard EM's statistics get the exact log p(x) too (a step reads only the objective; summarize's keep it).
        if replay is None and self._chunks.rows is None:
            replay = self._replay
        replay = None if self._taping else replay
        post = exact_posterior(self.model, self.structure, args, kwargs, mode=self.posterior, workspace=self._workspace,
                               leaves=self.plan.needs_graph, replay=replay, tables=False,  # only Q and the sums are read
                               evidence=evidence)
        check_observations(post)
        self._log_prior = float(post.log_prior)
        stats = closed_form.summarize(self.plan, post, rows=self._chunks.rows_of(args, kwargs))
        if kept is not None and self.plan.second_pass:
            sites = {u.site for p in self.plan.second_pass for u in self.plan.uses[p]}
            kept.append({s: _keep(post.weights[s]) for s in sites})  # the chunk's tables are recycled
        return stats

    def _m_step_from(self, stats: Statistics, pieces, kept) -> None:
        """The closed forms from ``stats``; then, for scales whose location varies per data point, a
        second pass: their statistics about the new locations (read from a trace at the new parameters,
        with the E-step's weights)."""
        # No snapshot here: step, m_step and the plan's check each keep one to restore on failure.
        self.maximize(stats)
        if self.plan.second_pass:
            sums: Dict[str, torch.Tensor] = {}
            uses = [u for p in self.plan.second_pass for u in self.plan.uses[p]]
            for (c_args, c_kwargs), weights in zip(pieces, kept):
                trace, leaves = trace_model(self.model, self.structure, c_args, c_kwargs, log_prob="none")
                closed_form.use_statistics(sums, uses, trace, weights, leaves)
            self._write(closed_form.maximize(self.plan, Statistics(sums), sorted(self.plan.second_pass),
                                             self._current(), self.reg_covar, self.map_basis))

    # -- the plan and the data's chunking ------------------------------------------------------
    def _prepare(self, args, kwargs, plan: bool = True) -> chunks_.Chunking:
        """Inspect the model once; decide (once per data shape) how step() chunks the data; make the plan
        (once per model and parameter shapes: it holds for data of any number of rows)."""
        if _data_key(args, kwargs) != self._validated:  # data already through a step, unchanged, were checked
            check_arguments(args, kwargs, self.missing)
        if self.structure is None:
            self.structure = inspect_model(self.model, args, kwargs)
        sig = chunks_.signature(args, kwargs)
        store = pyro.get_param_store()
        missing = not self._param_names or any(n not in store for n in self._param_names)
        if (self._chunks is None or self._chunks.signature != sig) and sig in self._decided and not missing:
            self._chunks = self._decided[sig]  # data of a shape seen before (e.g. the last batch of a pass)
        unsettled = self._chunks is not None and not self._chunks.settled
        if self._chunks is None or self._chunks.signature != sig or missing or unsettled:
            # A full-data trace without log-probabilities is cheap (enumerated tensors are (k, 1, ...)).
            # It initialises any parameter missing from the store from all the data, not from one chunk;
            # without Pyro's validation where these data were validated (a restart's: the store's values
            # are inside their constraints, and the E-steps that follow run without it too).
            seen = _data_key(args, kwargs) == self._validated
            with pyro.validation_enabled(False) if seen else contextlib.nullcontext():
                trace, leaves = self._offered_trace(args, kwargs) or \
                    trace_model(self.model, self.structure, args, kwargs, log_prob="none")
            self._param_names = list(leaves)
            if self._chunks is None or self._chunks.signature != sig or unsettled:
                self._chunks = chunks_.decide(self.model, self.structure, trace, args, kwargs, self.chunk_size)
                self._remember(self._chunks)
                self._workspace.clear()  # tables sized for other data
        self._offered = None  # read at most once, by the step right after the offer
        if plan and (self.plan is None or self.plan.shapes != _shapes(self._param_names)):
            # With missing values a model may write the rows that hold a NaN differently (the GMM with a full
            # Sigma): the plan is made on all the rows, so that it sees them.
            cut = self._chunks.positions and self.missing == "error"
            first = self._chunks.take(args, kwargs, slice(0, PLAN_ROWS)) if cut else (args, kwargs)
            self._make_plan(self.e_step(*first[0], **first[1]), *first)
            if not cut or self._chunks.n <= PLAN_ROWS:  # its E-step saw every row, under Pyro's validation
                self._checked(args, kwargs)  # (so this very step may be recorded: ppl_em.fast.tape)
        if plan and self.plan.gradient and self._chunks.rows is not None:
            why = f"parameters {self.plan.gradient} have a gradient M-step, which needs Q(z) of all the data at once"
            if isinstance(self.chunk_size, int):
                raise ValueError(f"chunk_size={self.chunk_size} was asked for, but {why}. "
                                 "Use chunk_size='auto' or None.")
            self._chunks.why, self._chunks.rows = f"no streaming: {why}", None
        return self._chunks

    def offer_trace(self, trace, leaves: Dict[str, torch.Tensor], args: tuple, kwargs: dict) -> None:
        """A run of the model under enumeration without log-probabilities (``trace_model(..., log_prob="none")``)
        on these very arguments, made by the caller after every parameter was created (``ppl_em.fit``'s
        initialisation): the next step on the same arguments, unchanged, reads the model's parameters and plates
        from it instead of running the model again for them. Only its structure is read (the names of the
        parameters, the sites' plates and scales), never a value, so parameters set after it do not matter."""
        self._offered = (args, dict(kwargs), _data_key(args, kwargs), trace, leaves)

    def _offered_trace(self, args, kwargs):
        """The offered trace and leaves where they were made on these arguments (the same objects, the tensors
        unchanged since) and the store holds every parameter they name; else None."""
        if self._offered is None:
            return None
        o_args, o_kwargs, key, trace, leaves = self._offered
        same = len(o_args) == len(args) and all(a is b for a, b in zip(o_args, args)) and \
            o_kwargs.keys() == kwargs.keys() and all(o_kwargs[k] is kwargs[k] for k in kwargs)
        store = pyro.get_param_store()
        if not same or key != _data_key(args, kwargs) or any(n not in store for n in leaves):
            return None
        return trace, leaves

    def _remember(self, chunking: chunks_.Chunking) -> None:
        """Keep the chunkings of a few data shapes: a source's batches come in one or two (the last one)."""
        if not chunking.settled:
            return
        self._decided[chunking.signature] = chunking
        while len(self._decided) > 8:
            self._decided.pop(next(iter(self._decided)))

    def _make_plan(self, post: Posterior, args, kwargs) -> None:
        """Decide, once, which parameters get a closed form; verify each by stationarity."""
        one_row = None  # the model on one row tells selections that grow with the data from those that do not
        if self._chunks is not None and self._chunks.positions:
            with pyro.validation_enabled(False):  # a look at the structure; the plan's E-step was under validation
                one_row = trace_model(self.model, self.structure, *self._chunks.take(args, kwargs, slice(0, 1)),
                                      log_prob="none")
        self._param_names = list(post.leaves)
        self._check_objective(post.objective, args, kwargs)
        self.plan = make_plan(self._param_names, post.trace, post.leaves, post.weights, self.m_step_mode, one_row)
        self.plan.shapes = _shapes(self._param_names)
        if self.plan.closed:
            self._verify(post, args, kwargs)
        if self.m_step_mode == "closed_form" and self.plan.gradient:
            missing = self.plan.gradient
            raise ValueError(f"m_step='closed_form' but parameters {missing} have no closed-form update "
                             f"({'; '.join(self.plan.why[p] for p in missing)}). Use m_step='auto'.")

    def _verify(self, post: Posterior, args, kwargs) -> None:
        """Keep a closed form only if E_Q[log p] is stationary in that parameter after the update.

        The check runs with reg_covar = 0, where the closed forms are exact maximisers. Where that
        update is singular, or near-singular (a component with one data point, whose gradient is
        then all rounding), it runs again with reg_covar, whose update is the exact maximiser of
        E_Q[log p] - (reg/2) sum_z N_z tr(Sigma_z^{-1}) (see :func:`ppl_em.gradient.expected_log_joint`).
        """
        before, reg, failed = self._snapshot(), self.reg_covar, list(self.plan.closed)
        try:
            for self.reg_covar in ((0.0, reg) if reg > 0 else (0.0,)):
                objective = lambda: self._objective(post, args, kwargs, self.reg_covar)
                try:
                    g_old = unconstrained_grads(objective, failed)
                    self.plan.start_gradient = {p: float(g.abs().max()) if g.numel() else 0.0 for p, g in g_old.items()}
                    g_new = self._gradients_after_update(post, args, kwargs, objective, failed, before)
                except (RuntimeError, ValueError, FloatingPointError):
                    if self.reg_covar == reg:
                        raise  # the update the M-step would make fails: say so (e.g. a non-finite Sigma)
                    continue  # singular without reg_covar: the regularised update decides
                finally:
                    self._restore(before)
                # A near-singular scale's gradient is rounding on terms of size N / sigma^4: the second,
                # regularised check allows a scale eps^(1/4) (1e-4) of its first gradient, still far
                # below a closed form that does not apply (a prior, a shared parameter: O(1) of it).
                power = {p: 0.25 if self.reg_covar > 0 and self.plan.phase(p) == 2 else 0.5 for p in failed}
                failed = [p for p in failed if not stationary(g_old[p], g_new[p], power[p])]
                if not failed:
                    break
        finally:
            self.reg_covar = reg
        if failed:
            self.plan.fall_back(failed, "a closed form was detected but E_Q[log p(x, z; theta)] is not stationary "
                                        "at it (e.g. the parameter has a prior or other uses)")

    def _gradients_after_update(self, post, args, kwargs, objective, names, before):
        """The gradient of the objective in each parameter after the closed forms, phase by phase: a
        location's update given the current scale (a precision-weighted mean, a Normal prior: an ECM step)
        is checked with only the phase-1 updates made, a scale's with all of them. Where no update reads a
        scale (phi_j, mu_j of a mixture), a location's stationarity does not depend on the scale's value,
        and the first check (reg_covar = 0) takes one gradient after all the updates for every parameter;
        the regularised check, which only runs for what failed there, keeps the two phases (a location's
        gradient at a near-singular new scale is mostly rounding)."""
        self._m_step_from(closed_form.summarize(self.plan, post), [(args, kwargs)], [post.weights])
        after, grads = {p: v.clone() for p, v in ((p, self._current()[p]) for p in self.plan.closed)}, {}
        one = self.reg_covar == 0 and not any(u.weighted for p in self.plan.closed for u in self.plan.uses[p])
        for phase in ((2,) if one else (1, 2)):
            checked = [p for p in names if self.plan.phase(p) == phase or one]
            if checked:
                self._restore(before)
                self._write({p: after[p] for p in self.plan.closed if self.plan.phase(p) <= phase})
                grads.update(unconstrained_grads(objective, checked))
        return grads

    def _plan_or_raise(self) -> Plan:
        if self.plan is None:
            raise RuntimeError("The M-step plan is made on the first data seen: call em.summarize(...) or "
                               "em.step(...) first.")
        return self.plan

    # -- introspection -----------------------------------------------------------------------
    @property
    def chunking(self) -> str:
        """How :meth:`step` goes through the data: in chunks, or whole and why (after the first step)."""
        if self._chunks is None:
            raise RuntimeError("chunking is decided at the first step(); call em.step(...) first.")
        return self._chunks.why

    @property
    def params(self) -> Dict[str, torch.Tensor]:
        """Current constrained value of every parameter EM updates (after the first E-step)."""
        store = pyro.get_param_store()
        return {name: store[name].detach().clone() for name in self._param_names if name in store}

    def explain(self) -> Dict[str, str]:
        """Which update each parameter gets, e.g. ``{'mu': 'closed form: Normal.loc at site x'}``.

        Available after the first step (or summarize).
        """
        return self._plan_or_raise().explain()

    def expected_log_joint(self, post: Posterior, *args, **kwargs) -> torch.Tensor:
        """E_Q[log p(x, z; theta)] + log p(theta) at the current parameters, differentiable in them
        (with ``map_basis="unconstrained"``, plus log ``|det d theta / d u|`` of the parameters with a prior)."""
        return self._objective(post, args, kwargs, 0.0)

    def _log_jacobian(self) -> float:
        """With ``map_basis="unconstrained"``: log ``|det d theta / d u|`` of the parameters with a prior, the
        term by which the objective EM ascends differs from log p(x, theta) (see :mod:`ppl_em.priors`)."""
        if self.map_basis != "unconstrained" or self.plan is None or not self.plan.with_prior:
            return 0.0
        with torch.no_grad():
            return float(log_jacobian(sorted(self.plan.with_prior)))

    def _objective(self, post, args, kwargs, reg: float, trace=None) -> torch.Tensor:
        total = expected_log_joint(self.model, self.structure, post, args, kwargs, reg, trace)
        if self.map_basis == "unconstrained" and self.plan is not None and self.plan.with_prior:
            total = total + log_jacobian(sorted(self.plan.with_prior)).to(total.dtype)
        return total

    # -- parameter store helpers -------------------------------------------------------------
    def _current(self) -> Mapping[str, torch.Tensor]:
        """The parameters' current (constrained) values, each read from the store only when asked for."""
        return _StoreValues()

    def _write(self, values: Dict[str, torch.Tensor]) -> None:
        """Set each parameter to its new constrained value, all or none: every value is checked (finite,
        inside its constraint) before any is written. A parameter's unconstrained tensor is updated in
        place, so that it stays the one tensor the store (and any optimizer) holds: a new tensor per step
        would also stay referenced from the store's tensor-to-name map, one more per parameter and step."""
        store = pyro.get_param_store()
        if not _all_finite(list(values.values())):
            for name, value in values.items():  # name the first that is not
                if not torch.isfinite(value).all():
                    raise NonFiniteParameterError(
                        f"The M-step update of parameter '{name}' is not finite; the previous "
                        "parameters were kept. Try a larger reg_covar, fewer components, or scaling the data.")
        unconstrained = dict(store.named_parameters())
        inverse = {}
        for name, value in values.items():
            constraint = store._constraints[name]
            transform = transform_to(constraint)
            inside, factor = _inside(constraint, value, name, self._asymmetric)
            with torch.no_grad():
                try:  # (a positive-definite Sigma's unconstrained value from the factor its check made)
                    reuse = factor is not None and _from_cholesky(transform)
                    inverse[name] = LowerCholeskyTransform().inv(factor) if reuse else transform.inv(value)
                except RuntimeError:  # no inverse outside the constraint (the Cholesky factor of a singular Sigma)
                    if inside:
                        raise
                    inverse[name] = None
                if not inside:  # a projecting constraint (a sphere) may still take it
                    outside = ~constraint.check(value if inverse[name] is None else transform(inverse[name]))
                    if outside.any():  # a variance of 0, a singular covariance: a component collapsed onto a point
                        raise ValueError(degenerate_update_message(name, outside, self._what()))
        with torch.no_grad():
            for name, u in inverse.items():
                leaf = unconstrained.get(name)
                if leaf is not None and leaf.shape == u.shape and leaf.dtype == u.dtype:
                    leaf.copy_(u)
                else:  # a parameter the store does not hold in this shape: the store makes its tensor
                    store[name] = values[name].clone()

    def _options(self) -> tuple:
        return (self.reg_covar, self.posterior, self.map_basis, self.chunk_size, self.distributed)

    def _held(self) -> tuple:
        """The store's tensors of the parameters, with their versions (held: no other tensor takes their ids)."""
        return tuple((n, t, t._version) for n, t in pyro.get_param_store().named_parameters())

    def _snapshot(self) -> Dict[str, torch.Tensor]:
        """The parameters' unconstrained values (read without applying their constraints' transforms)."""
        unconstrained = dict(pyro.get_param_store().named_parameters())
        return {n: unconstrained[n].detach().clone() for n in self._param_names if n in unconstrained}

    def _restore(self, saved: Dict[str, torch.Tensor]) -> None:
        unconstrained = dict(pyro.get_param_store().named_parameters())
        with torch.no_grad():
            for name, value in saved.items():
                unconstrained[name].copy_(value)

    def _check_finite(self) -> None:
        store = pyro.get_param_store()
        for name in self._param_names:
            if name in store and not torch.isfinite(store[name]).all():
                raise NonFiniteParameterError(
                    f"Parameter '{name}' became non-finite in the M-step; the previous parameters "
                    "were kept. Try a larger reg_covar or scaling the data.")


class _StoreValues(Mapping):
    """A read-only view of the param store's constrained values: a constraint's transform (a softmax, a
    Cholesky product) runs only for the values an M-step reads (an empty component's previous value)."""

    def __getitem__(self, name: str) -> torch.Tensor:
        return pyro.get_param_store()[name].detach().clone()

    def __iter__(self):
        return iter(pyro.get_param_store().keys())

    def __len__(self) -> int:
        return len(pyro.get_param_store().keys())


class _Unchanged:
    """What a step that replayed its checked tape decided its way from, by identity or by value: the arguments
    (:func:`ppl_em.fast.signature`: tensors by identity and version), the validated data, the chunking, the
    model's structure, the plan and its routes, the parameters' names, the store's tensors (with their shapes,
    dtypes and devices) and their constraints, an offered trace, the options and the grad mode. While
    :meth:`holds`, the next step's way through :meth:`EM._iterate` is the same: its tape, replayed on the same
    tensors."""

    __slots__ = ("args", "kwargs", "validated", "chunks", "settled", "structure", "plan", "routes", "second_pass",
                 "names", "roots", "layout", "constraints", "options", "grad", "tape")

    def __init__(self, em: "EM", args, kwargs, roots: Dict[str, torch.Tensor], tape) -> None:
        store = pyro.get_param_store()
        self.args, self.kwargs, self.validated = signature(args), signature(kwargs), em._validated
        self.chunks, self.settled, self.structure = em._chunks, em._chunks.settled, em.structure
        self.plan, self.routes, self.second_pass = em.plan, dict(em.plan.routes), set(em.plan.second_pass)
        self.names, self.roots = list(em._param_names), dict(roots)
        self.layout = {n: _layout(r) for n, r in roots.items()}  # as the tape's key has them (p.data = ... keeps p)
        self.constraints = {n: store._constraints.get(n) for n in roots}
        self.options, self.grad, self.tape = em._options(), torch.is_grad_enabled(), tape

    def holds(self, em: "EM", args, kwargs) -> bool:
        plan, store = em.plan, pyro.get_param_store()
        if (plan is not self.plan or em._chunks is not self.chunks or em.structure is not self.structure
                or em._tape.tape is not self.tape or em._tape.off is not None or em._offered is not None
                or torch.is_grad_enabled() is not self.grad or em._chunks.settled is not self.settled
                or em._validated != self.validated or plan.routes != self.routes or plan.second_pass != self.second_pass
                or em._param_names != self.names or em._options() != self.options):
            return False
        params, constraints = store._params, store._constraints
        if not all(params.get(n) is r and constraints.get(n) is self.constraints[n] and _layout(r) == self.layout[n]
                   for n, r in self.roots.items()):
            return False
        return signature(args) == self.args and signature(kwargs) == self.kwargs


def _layout(t: torch.Tensor) -> tuple:
    """A parameter's shape, dtype and device: what a recorded step holds for (besides its values)."""
    return t.shape, t.dtype, t.device


def _same_held(a: tuple, b: tuple) -> bool:
    """Whether two :meth:`EM._held` are of the same tensors at the same versions."""
    return len(a) == len(b) and all(x[0] == y[0] and x[1] is y[1] and x[2] == y[2] for x, y in zip(a, b))


def _data_key(args, kwargs) -> tuple:
    """The tensor arguments by identity and version: equal while these very tensors are unchanged."""
    return tuple((id(v), v._version) for v in list(args) + list(kwargs.values()) if torch.is_tensor(v))


def _shapes(names: List[str]) -> Dict[str, tuple]:
    """The parameters' shapes (those of their unconstrained values: the store's transforms keep the shape)."""
    unconstrained = dict(pyro.get_param_store().named_parameters())
    return {n: tuple(unconstrained[n].shape) for n in names if n in unconstrained}


def _keep(weights):
    """A copy of a chunk's weights that outlives the chunk (its tables go back to the workspace)."""
    return weights.clone() if torch.is_tensor(weights) else weights


def _total_weight(post: Posterior) -> float:
    return float(sum(w.sum() for w in post.weights.values()))


def _inside(constraint, value: torch.Tensor, name: str, asymmetric: set) -> Tuple[bool, Optional[torch.Tensor]]:
    """``constraint.check(value).all()`` for a finite ``value``, and the Cholesky factor of a positive-definite
    ``value`` where the test made one (else None). A covariance that the closed forms made
    symmetric to the bit (Sigma_j about mu_j is) is positive definite where its Cholesky factorisation
    succeeds: torch's own test first compares Sigma_j with its transpose within a tolerance (``isclose``,
    measured a twentieth of a small fit's replayed step), which only a matrix symmetric to the bit skips
    here. A parameter whose update once was not (its name goes into ``asymmetric``) gets torch's test from
    then on, so that a replayed step does not stop at a symmetry that comes and goes with the rounding."""
    if constraint is constraints.real:  # every finite value (the update was checked finite first)
        return True, None
    if type(constraint) is type(constraints.positive_definite) and name not in asymmetric:
        if torch.equal(value, value.mT):
            factor, info = torch.linalg.cholesky_ex(value)
            inside = bool((info == 0).all())
            return inside, factor if inside else None
        asymmetric.add(name)
    return bool(constraint.check(value).all()), None


def _from_cholesky(transform) -> bool:
    """Whether ``transform.inv(Sigma)`` is ``LowerCholeskyTransform().inv(cholesky(Sigma))``: torch's
    positive-definite transform, and Pyro's (a lower Cholesky factor, then L L^T), which Pyro registers in
    its place."""
    if type(transform) is PositiveDefiniteTransform:
        return True
    parts = getattr(transform, "parts", None) if type(transform) is ComposeTransform else None
    return bool(parts) and len(parts) == 2 and type(parts[0]) is LowerCholeskyTransform and \
        type(parts[1].inv) is CholeskyTransform


def _all_finite(values: List[torch.Tensor]) -> bool:
    """Whether every element of every tensor is finite. Small parameters sharing a device are tested together,
    as one tensor: a few kernels however many a step writes (their fixed cost is the whole test there); large
    ones each by itself, without a copy."""
    if len({v.device for v in values}) != 1 or sum(v.numel() for v in values) > FINITE_TOGETHER:
        return all(bool(torch.isfinite(v).all()) for v in values)
    return bool(torch.isfinite(torch.cat([v.reshape(-1) for v in values])).all())
