"""The fit loop: one call fits a plain Pyro model by EM, hard EM, SVI or an amortized guide.

Every method runs the same template, the one of scikit-learn's mixtures::

    for restart in range(n_init):                 # fresh param store, seed + restart
        initialise theta                           # "kmeans++", "random" or "prior"
        repeat: loss = engine.step(*args)          # EM: E-step then M-step; SVI: one gradient step
        until |change of mean loss per observation| < tol, or max_iter
        final E-step: exact (1/n) log p(x; theta)  # so predictions agree with the fit
    keep the restart with the highest log p(x)     # the loss where log p(x) is intractable

Non-convexity is why restarts matter: like k-means' distortion J(c, mu), the log-likelihood
l(theta) has many local optima, and EM climbs to the one nearest its start.

Initialisation strategies (all seeded with ``seed + restart``):

``"prior"``
    The model's own ``pyro.param`` initialisers, run with Pyro's global seed set.
``"random"``
    As "prior", then every *location* parameter of an observed site is set to k distinct data
    rows drawn uniformly without replacement.
``"kmeans++"``
    As "random", but the k rows are chosen by D^2 sampling (Arthur & Vassilvitskii, 2007):
    the first uniformly, each next one with probability proportional to its squared
    Euclidean distance to the nearest row already chosen.

Data in memory are initialised from all their rows, in O(chunk) working memory beyond them (the
model runs under enumeration, so a GMM's Sigma_z is (k, 1, d, d), not (n, d, d)). A data source
(a memory map, a DataLoader: :mod:`ppl_em.sources`) is initialised from ``sources.SAMPLE_ROWS`` rows
drawn uniformly without replacement, which the model's own initial values (a GMM's data covariance)
see too; the data are never loaded.

A location parameter is found generically, from the engine's closed-form detection on one
E-step trace: a ``pyro.param`` of shape (k, *row) that is selected by a discrete latent
(``mu[z]``) into the ``loc`` of a Normal / MultivariateNormal, the ``probs`` of a Bernoulli
or the ``rate`` of a Poisson at an observed site, where ``row`` is the trailing shape of one
observation. For ``probs`` and ``rate`` the chosen rows are averaged half-and-half with the
data mean and kept inside (1e-3, 1 - 1e-3), resp. >= 1e-3, so that no probability or rate
starts at exactly 0 or 1. Every other parameter keeps its "prior" value. A model with no such
parameter (a VAE decoder network) or without an exact E-step falls back to "prior"; the
result's ``init["params"]`` lists what was set.

Missing values (``missing="marginalize"``): NaN entries of the data are let through to the model,
which must marginalise them (the models of ``ppl_em.models`` observe p(x_o^(i) | z^(i)), the
observed entries o^(i) of each row; see ``ppl_em.models.gmm``). Every engine then sees the same
NaN data: the E- and M-steps use the observed entries, the result's ``predict_proba``, ``score``,
``bic`` and ``aic`` accept rows with NaN, and its checkpoint records ``missing``. The
initialisation places the location parameters on the data with each NaN at the observed value of
its column nearest to the column's mean (so that a count stays a count, a bit a bit), choosing
among the rows without NaN where there are at least k of them and the rows map one to one to the
data's. A
model that lets a NaN reach an observed site unmasked, an entirely missing observation (a row of
NaN) and a column missing in every row are errors before the fit starts.

References: lecture notes, "k-means" (initialisation, non-convexity), "EM algorithm";
scikit-learn's ``BaseMixture.fit``; Arthur & Vassilvitskii, "k-means++", SODA 2007.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine

from . import distributed as distributed_, sources
from .em import EM
from .online import OnlineEM
from .plan import find_uses
from .guides import AutoAmortized, AutoCategorical
from .posterior import ExactInferenceError, inspect_model, trace_model
from .result import FitResult, first_look, observations, scaled_observations
from .store import capture_store, fresh_rng, replace_store
from .svi import NonFiniteLossError, SafeSVI, default_loss
from .checks import check_missing
from .validation import (check_arguments, check_k_fits, check_masked_observations, check_missing_columns,
                         check_observed_dtypes, check_seed)

__all__ = ["fit", "ConvergenceWarning", "METHODS", "INITS"]

METHODS = ("em", "hard_em", "svi", "vae", "online_em")
INITS = ("kmeans++", "random", "prior")
DEFAULT_MAX_ITER = {"em": 100, "hard_em": 100, "svi": 1000, "vae": 1000, "online_em": 20}  # online: passes
# SVI losses are noisy: convergence compares the means of two consecutive windows of losses.
SVI_WINDOW = 20


class ConvergenceWarning(UserWarning):
    """The fit stopped at ``max_iter`` before the loss settled to within ``tol``."""


@dataclass
class _Options:
    method: str
    guide: Any
    max_iter: int
    tol: float
    init: str
    progress: Optional[bool]
    optim: Any
    em_options: Dict[str, Any]
    log_px_every: int
    n_data: int
    n_init: int
    data: Any = None  # the arguments as rows (ppl_em.sources.Data)
    online: Dict[str, Any] = field(default_factory=dict)  # OnlineEM's options (batch_size, step_size)
    distributed: bool = False
    missing: str = "error"


@dataclass
class _Run:
    """One restart: its history, final scores and a snapshot of its parameters."""

    seed: int
    losses: List[float] = field(default_factory=list)
    history: List[Dict[str, float]] = field(default_factory=list)
    converged: bool = False
    stopped: Optional[str] = None
    log_px: Optional[float] = None
    init_params: List[str] = field(default_factory=list)
    guide: Any = None
    state: Dict[str, Any] = field(default_factory=dict)
    networks: List[Dict[str, torch.Tensor]] = field(default_factory=list)

    def rank(self) -> float:
        """Higher is better: exact (1/n) log p(x), else minus the last loss per observation."""
        if self.log_px is not None and math.isfinite(self.log_px):
            return self.log_px
        finite = [loss for loss in self.losses if math.isfinite(loss)]
        return -finite[-1] if finite else -math.inf

    def summary(self, n_data: int) -> Dict[str, Any]:
        return {"seed": self.seed, "log_likelihood": self.log_px, "n_iter": len(self.losses),
                "final_loss": self.losses[-1] / n_data if self.losses else None,
                "converged": self.converged, "stopped": self.stopped, "init_params": self.init_params}


def fit(
    model: Callable,
    *args: Any,
    method: str = "em",
    guide: Any = None,
    max_iter: Optional[int] = None,
    tol: float = 1e-6,
    n_init: int = 1,
    init: str = "kmeans++",
    seed: int = 0,
    progress: Optional[bool] = None,
    optim: Any = None,
    em_options: Optional[Dict[str, Any]] = None,
    log_px_every: int = 0,
    batch_size: Optional[int] = None,
    step_size: Any = None,
    distributed: bool = False,
    missing: str = "error",
    **kwargs: Any,
) -> FitResult:
    """Fit a plain Pyro model; ``*args`` and ``**kwargs`` are passed to it untouched.

    Parameters
    ----------
    model : callable
        A Pyro model, e.g. ``ppl_em.models.gmm.model`` called as ``model(x, k)``. In the place of a
        tensor of rows, EM takes a data source (:mod:`ppl_em.sources`): a numpy memory map
        (``np.load("big.npy", mmap_mode="r")``), a ``DataLoader`` or a re-iterable of batches, read
        batch by batch in every iteration, in O(batch) memory.
    method : {"em", "hard_em", "svi", "vae", "online_em"}
        Exact EM (:class:`ppl_em.EM`), hard (classification) EM, SVI with ``guide``
        (default :class:`ppl_em.guides.AutoCategorical`), SVI with an amortized encoder
        guide (default :class:`ppl_em.guides.AutoAmortized`), or stepwise EM (:class:`ppl_em.OnlineEM`:
        an M-step after every batch of ``batch_size`` rows; an iteration is one pass over the data).
    guide : guide object or guide class, optional
        For "svi"/"vae". A class (or any ``type``) is instantiated as ``guide(model)`` for each
        restart; an instance is used as is and then needs ``n_init=1``.
    max_iter : int, optional
        Iterations per restart; default 100 for EM, 1000 for SVI.
    tol : float
        Stop when the mean loss per observation changes by less than ``tol`` between two
        iterations (for SVI: between the means of two consecutive windows of 20 losses).
    n_init : int
        Restarts, each from a fresh param store; the one with the highest exact log p(x)
        (the lowest final loss where log p(x) is intractable) is kept.
    init : {"kmeans++", "random", "prior"}
        How theta starts; see the module docstring. The param store is cleared before each
        restart, so initial values a model takes as an argument (``gmm.model(x, k, init=...)``)
        are the way to choose theta's start; use ``init="prior"`` to keep them all.
    seed : int
        Restart r uses seed + r for Pyro's global RNG and for the initialisation.
    progress : bool, optional
        Show a tqdm bar; by default only on an interactive terminal and for long fits.
    optim : pyro.optim.PyroOptim, optional
        For "svi"/"vae"; default ``pyro.optim.Adam({"lr": 0.05})``, fresh for each restart.
    em_options : dict, optional
        Keyword arguments of :class:`ppl_em.EM` (``reg_covar``, ``m_step``, ...); for "online_em" also
        those of :class:`ppl_em.OnlineEM` (``warmup``, ``average``).
    log_px_every : int
        For SVI: every that many iterations, also record the exact (1/n) log p(x) in the
        history (``log_px``) when the model has an exact E-step; its cost is not timed.
    batch_size : int, optional
        For "online_em", the rows of each batch (each followed by an M-step); for EM on a numpy
        array (a memory map), the rows read per batch.
    step_size : float or callable, optional
        For "online_em": the exponent a of gamma_t = (t + 2)^(-a) (default 0.6), or a function t -> gamma_t.
    distributed : bool
        For "em" and "hard_em": data-parallel EM over torch.distributed's default process group
        (:mod:`ppl_em.distributed`); each process passes its own shard of the data, rank 0's
        initialisation is every rank's start, and every rank returns the same result (its
        ``log_likelihood`` and ``n_data`` are of all ranks' data together).
    missing : {"error", "marginalize"}
        NaN in the data: an error (the default), or missing entries that the model marginalises
        out (the models of ``ppl_em.models`` do; see the module docstring). An inf is an error
        either way.

    Returns
    -------
    FitResult
        The kept restart. Its parameters are also left in Pyro's param store.

    Raises
    ------
    ValueError
        Before the model runs, for model arguments that cannot be fitted (NaN or inf, naming
        the argument and the first index, NaN allowed with ``missing="marginalize"``; empty,
        half-precision or ``requires_grad`` data; a
        ``k`` that is not a positive integer no larger than n; see :mod:`ppl_em.validation`),
        and for an EM update that is singular (naming the component where it can).
    NonFiniteLossError
        When an EM iteration's log p(x) is not finite, naming the site whose log-probability
        is not (:mod:`ppl_em.diagnostics`).

    Whatever it raises (KeyboardInterrupt included), ``fit`` leaves Pyro's param store and the
    ``nn.Module`` arguments as it found them.

    Warns
    -----
    ConvergenceWarning
        If the kept restart did not converge within ``max_iter`` (or an SVI run stopped on a
        non-finite step, keeping its last finite parameters).
    """
    args, kwargs = _batched(args, kwargs, method, batch_size)
    opts = _check_options(model, args, kwargs, method, guide, max_iter, tol, n_init, init, seed, progress, optim,
                          em_options, log_px_every, distributed, missing)
    opts.online = {"batch_size": batch_size, "step_size": step_size}
    networks, before = _Networks(args, kwargs), capture_store()
    try:
        runs = _restarts(model, args, kwargs, opts, seed, networks)
    except BaseException:  # a failed or interrupted fit leaves the store and the networks as it found them
        replace_store(before)
        networks.restore(networks.initial)
        raise
    best = max(range(n_init), key=lambda r: runs[r].rank())
    run = runs[best]
    replace_store(run.state)
    networks.restore(run.networks)
    if not run.converged:
        why = f"it stopped: {run.stopped}" if run.stopped else f"it reached max_iter={opts.max_iter}"
        warnings.warn(f"method={method!r} did not converge ({why}; tol={tol} on the change of the mean loss "
                      "per observation). Increase max_iter, loosen tol, or try other initialisations (n_init).",
                      ConvergenceWarning, stacklevel=2)
    return FitResult.from_store(
        method=method, losses=run.losses, history=run.history, converged=run.converged, n_iter=len(run.losses),
        n_data=opts.n_data, log_likelihood=run.log_px, restarts=[r.summary(opts.n_data) for r in runs], best=best,
        init={"strategy": init, "params": run.init_params}, model=model, guide=run.guide, args=args, kwargs=kwargs,
        missing=missing)


def _restarts(model: Callable, args: tuple, kwargs: dict, opts: "_Options", seed: int,
              networks: "_Networks") -> List["_Run"]:
    runs = []
    # EM's restarts share one EM object: the model is traced, the data's chunking decided and the
    # M-step plan made once, not once per restart (EM.reset).
    shared = _engine(model, args, kwargs, opts)[0] if opts.method in ("em", "hard_em") else None
    for r in range(opts.n_init):
        networks.start(r, seed + r)
        runs.append(_fit_once(model, args, kwargs, opts, seed + r, shared))
        runs[-1].networks = networks.snapshot()
    return runs


class _Networks:
    """``nn.Module`` objects passed as model arguments (a VAE's decoder), reset between restarts.

    ``pyro.module`` registers a network's own tensors, so a fresh param store does not
    reset it. Restart 0 starts from the weights as passed; restart r > 0 from
    ``reset_parameters()`` of every layer, under its seed. The kept restart's weights are
    copied back at the end, so the networks agree with the result's parameters.
    """

    def __init__(self, args: tuple, kwargs: dict) -> None:
        self.modules = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.nn.Module)]
        self.initial = self.snapshot()

    def snapshot(self) -> List[Dict[str, torch.Tensor]]:
        return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in self.modules]

    def start(self, restart: int, seed: int) -> None:
        self.restore(self.initial)
        if restart > 0 and self.modules:  # (torch.manual_seed seeds every backend compiled in: 0.1 ms a call)
            torch.manual_seed(seed)
            for module in self.modules:
                for layer in module.modules():
                    if callable(getattr(layer, "reset_parameters", None)):
                        layer.reset_parameters()

    def restore(self, states: List[Dict[str, torch.Tensor]]) -> None:
        with torch.no_grad():
            for module, state in zip(self.modules, states):
                for name, value in module.state_dict().items():
                    value.copy_(state[name])  # in place: pyro.module keeps referring to these tensors


def _check_options(model, args, kwargs, method, guide, max_iter, tol, n_init, init, seed, progress, optim,
                   em_options, log_px_every, distributed=False, missing="error") -> _Options:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}.")
    if not (isinstance(n_init, int) and not isinstance(n_init, bool) and n_init >= 1):
        raise ValueError(f"n_init must be an integer >= 1, got {n_init!r}.")
    max_iter = DEFAULT_MAX_ITER[method] if max_iter is None else max_iter
    if not (isinstance(max_iter, int) and not isinstance(max_iter, bool) and max_iter >= 1):
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}.")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}.")
    if guide is not None and method in ("em", "hard_em"):
        raise ValueError(f"method={method!r} computes the exact posterior and takes no guide; "
                         "use method='svi' or 'vae' to fit with a guide.")
    if guide is not None and not isinstance(guide, type) and n_init > 1:
        raise ValueError("A guide instance cannot be reset between restarts; pass its class "
                         "(e.g. guide=AutoCategorical) so that each restart builds a fresh one, or use n_init=1.")
    check_seed(seed, n_init)
    check_missing(missing)
    if em_options and "missing" in em_options:
        raise ValueError("em_options may not hold 'missing': pass it to fit itself, fit(..., missing='marginalize'), "
                         "and every engine of the fit (EM, SVI, the final E-step) follows it.")
    if distributed and method not in ("em", "hard_em"):
        raise ValueError(f"distributed=True sums EM's statistics across processes; method={method!r} has none. "
                         "Use method='em' or 'hard_em', or fit in one process.")
    if distributed:
        distributed_.check_available()
        n_data, data = distributed_.agreed(lambda: _check_data(model, args, kwargs, missing), "checking the data")
        n_data = _sum_over_ranks(n_data)
    else:
        n_data, data = _check_data(model, args, kwargs, missing)
    return _Options(method, guide, max_iter, float(tol), init, progress, optim, dict(em_options or {}),
                    int(log_px_every), n_data, n_init, data, distributed=bool(distributed), missing=missing)


def _check_data(model: Callable, args: tuple, kwargs: dict, missing: str = "error"):
    """Validate the model arguments before the model runs, then look at one run of it on its first rows in
    an empty param store (what a previous fit left there must not leak in); returns n, the observations
    (of all rows), and the arguments as rows (:class:`ppl_em.sources.Data`)."""
    if sources.find(args, kwargs) is None:
        check_arguments(model, args, kwargs, missing)
        if missing == "marginalize":
            check_missing_columns(model, args, kwargs)
    data = sources.Data.of(model, args, kwargs)
    first = data.first(sources.CHECK_ROWS)
    if data.source is not None:
        check_arguments(model, *first, missing)
    trace, plates = first_look(model, *first)
    if missing == "marginalize":
        check_masked_observations(trace)
    check_observed_dtypes(trace)
    n_data = scaled_observations(observations(trace, plates), data, sources.CHECK_ROWS)
    check_k_fits(model, args, kwargs, n_data)
    return n_data, data


def _sum_over_ranks(n: int) -> int:
    total = torch.tensor([n], dtype=torch.int64)
    distributed_.all_reduce_ints(total, "counting the observations")
    return int(total)


def _batched(args: tuple, kwargs: dict, method: str, batch_size: Optional[int]):
    """The arguments with a numpy array (memory map) read in batches of ``batch_size`` rows (for EM)."""
    if batch_size is None or method == "online_em":
        return args, kwargs
    found = sources.find(args, kwargs) if method in ("em", "hard_em") else None
    if found is None or not isinstance(found[1], sources.Rows):
        raise ValueError(f"batch_size={batch_size!r} applies to method='online_em', and to EM on a numpy array or "
                         "memory map (rows read per batch); a DataLoader brings its own batch size, and EM on a tensor "
                         "takes em_options={'chunk_size': ...}.")
    rows = found[1]
    return _replace(args, kwargs, found[0], sources.Rows(rows.data, batch_size, rows.dtype, rows.start, rows.stop,
                                                                   rows.device))


def _replace(args: tuple, kwargs: dict, key, value):
    if isinstance(key, int):
        return args[:key] + (value,) + args[key + 1:], kwargs
    return args, {**kwargs, key: value}


# -- one restart ----------------------------------------------------------------------------
def _fit_once(model: Callable, args: tuple, kwargs: dict, opts: _Options, seed: int,
              em: Optional[EM] = None) -> _Run:
    """Fresh store, seeded initialisation, then ``engine.step`` until tol or max_iter (``em``: the EM
    object that the restarts share, reset for this one)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    start = lambda: initialise(model, args, kwargs, opts.init, seed, opts.data, opts.missing, em)
    run = _Run(seed=seed, init_params=distributed_.agreed(start, "initialisation") if opts.distributed else start())
    engine, run.guide = (em.reset(), None) if em is not None else _engine(model, args, kwargs, opts, seed)
    window = SVI_WINDOW if opts.method in ("svi", "vae") else 1
    elapsed = 0.0
    with _progress_bar(opts, seed) as bar:
        by_rows = _count_rows(engine, opts, bar)
        for it in range(1, opts.max_iter + 1):
            # Monitoring happens before the step, at the theta the step's loss is computed at.
            monitor = opts.log_px_every and (it == 1 or it % opts.log_px_every == 0) \
                and opts.method in ("svi", "vae")
            log_px = exact_log_px(model, args, kwargs, opts.n_data, missing=opts.missing) if monitor else None
            start = time.perf_counter()
            try:
                loss = _step(engine, model, args, kwargs, it)
            except _Stopped as e:
                run.stopped = str(e)
                break
            elapsed += time.perf_counter() - start
            run.losses.append(loss)
            run.history.append({"iteration": it, "loss": loss, "time": elapsed})
            if log_px is not None:
                run.history[-1]["log_px"] = log_px
            bar.update(0 if by_rows else 1)
            bar.set_postfix(loss=f"{loss / opts.n_data:.4g}", refresh=False)
            if _settled(run.losses, window, opts.tol * opts.n_data):
                run.converged = True
                break
    if isinstance(engine, OnlineEM):
        engine.finish()  # the Polyak-Ruppert average, where asked for, is the result
    run.log_px = exact_log_px(model, args, kwargs, opts.n_data, distributed=opts.distributed, missing=opts.missing,
                              em=em)
    run.state = capture_store()
    return run


class _Stopped(Exception):
    """An SVI run stopped at a non-finite step; its last finite parameters stand."""


def _step(engine: Any, model: Callable, args: tuple, kwargs: dict, it: int) -> float:
    """``engine.step``. An EM step explains its own failures (a non-finite log p(x), a singular update:
    :func:`ppl_em.diagnostics.explain_failure`) and leaves the parameters of the step before; it is
    deterministic, so from the same parameters it fails the same way, and the fit ends with that error.
    An SVI step that went non-finite keeps the last finite parameters: a stopped run, kept."""
    if isinstance(engine, (EM, OnlineEM)):
        return engine.step(*args, **kwargs)
    try:
        return engine.step(*args, **kwargs)
    except NonFiniteLossError as e:
        raise _Stopped(f"{type(e).__name__}: {e}") from e


def _settled(losses: List[float], window: int, tol: float) -> bool:
    """|mean of the last window - mean of the window before| < tol (window 1: last change)."""
    if len(losses) < 2 * window:
        return False
    last = sum(losses[-window:]) / window
    before = sum(losses[-2 * window:-window]) / window
    return abs(last - before) < tol


def exact_log_px(model: Callable, args: tuple, kwargs: dict, n_data: int,
                 distributed: bool = False, missing: str = "error", em: Optional[EM] = None) -> Optional[float]:
    """(1/n) log p(x; theta) at the parameters in the store, by one exact E-step (streamed; of every rank's
    data with ``distributed``; by ``em`` where the fit has an EM object for this model and data, which knows
    them already); None if intractable."""
    try:
        with poutine.block():
            em = em if em is not None else EM(model, distributed=distributed, missing=missing,
                                               **_tiny_data_options(n_data))
            return em.log_likelihood(*args, **kwargs) / n_data
    except ExactInferenceError:
        return None


def _engine(model: Callable, args: tuple, kwargs: dict, opts: _Options, seed: int = 0):
    """The object whose ``step(*args, **kwargs) -> float`` runs one iteration, and the guide."""
    if opts.method in ("em", "hard_em"):
        posterior = "exact" if opts.method == "em" else "hard"
        options = {**_tiny_data_options(opts.n_data), "missing": opts.missing, **opts.em_options}
        return EM(model, posterior=posterior, distributed=opts.distributed, **options), None
    if opts.method == "online_em":
        online = {k: v for k, v in opts.online.items() if v is not None}
        return OnlineEM(model, n=opts.data.rows or opts.n_data, seed=seed, missing=opts.missing, **online,
                        **opts.em_options), None
    guide = opts.guide
    if guide is None:
        guide = AutoCategorical if opts.method == "svi" else AutoAmortized
    if isinstance(guide, type):
        guide = guide(model)
    optim = opts.optim if opts.optim is not None else pyro.optim.Adam({"lr": 0.05})
    return SafeSVI(model, guide, optim, default_loss(model, *args, **kwargs)), guide


def _tiny_data_options(n_data: int) -> Dict[str, Any]:
    """One observation: nothing to stream, and no two halves for EM's streaming check to compare."""
    return {"chunk_size": None} if n_data < 2 else {}


def _progress_bar(opts: _Options, seed: int):
    from tqdm.auto import tqdm

    show = opts.progress
    if show is None:  # long fits on an interactive terminal only; never under pytest or in pipes
        show = (sys.stderr.isatty() and "PYTEST_CURRENT_TEST" not in os.environ
                and opts.max_iter * opts.n_init >= 200)
    if _reads_rows(opts):  # data read batch by batch: the bar counts rows, every iteration reads each once
        return tqdm(total=opts.max_iter * opts.data.rows, desc=f"{opts.method} (seed {seed})", unit="rows",
                    unit_scale=True, disable=not show, leave=False)
    return tqdm(total=opts.max_iter, desc=f"{opts.method} (seed {seed})", disable=not show, leave=False)


def _reads_rows(opts: _Options) -> bool:
    return opts.data is not None and (opts.data.source is not None or opts.method == "online_em") and \
        opts.data.rows is not None


def _count_rows(engine: Any, opts: _Options, bar) -> bool:
    """Hook the bar to the rows the engine reads (a source's batches, stepwise EM's batches)."""
    if not _reads_rows(opts):
        return False
    em = engine.em if isinstance(engine, OnlineEM) else engine
    em.on_batch = lambda rows: bar.update(rows)
    return True


# -- initialisation -------------------------------------------------------------------------
def initialise(model: Callable, args: tuple, kwargs: dict, strategy: str, seed: int,
               data: Optional[sources.Data] = None, missing: str = "error", em: Optional[EM] = None) -> List[str]:
    """Create every parameter with the model's initialisers, then set the location ones.

    Returns the names of the parameters set from data rows (empty for "prior" or when the
    model has none). See the module docstring for what each strategy does. ``data``: the
    arguments as rows, if already known (a source is initialised from a sample of its rows); with
    ``missing="marginalize"`` the rows come from the data with its NaN filled (:func:`impute_columns`).
    ``em``: the EM object the fit steps with (shared by its restarts); the model's structure is found here
    once and handed to it, so that neither a later restart nor its first step looks for it again.
    """
    generator = torch.Generator().manual_seed(seed)
    data = data if data is not None else sources.Data.of(model, args, kwargs)
    if data.source is not None:
        args, kwargs = data.sample(sources.SAMPLE_ROWS, generator)
    seen: List[torch.Tensor] = []
    if missing == "marginalize":
        args, kwargs, seen = impute_columns(args, kwargs)
    traced = _create_parameters(model, args, kwargs, em)  # every pyro.param now exists
    if strategy == "prior" or traced is None:
        return []
    store = pyro.get_param_store()
    chosen = []
    for name, (rows, attr) in location_parameters(traced).items():
        k = store[name].shape[0]
        rows = complete_rows(rows, seen, k)
        if rows.shape[0] < k:
            raise ValueError(f"init={strategy!r} needs at least k = {k} observations to place parameter '{name}', "
                             f"got {rows.shape[0]}. Use fewer components, or init='prior'.")
        pick = kmeans_plus_plus(rows, k, generator) if strategy == "kmeans++" else \
            torch.randperm(rows.shape[0], generator=generator)[:k]
        value = rows[pick].clone()
        if attr in ("probs", "rate"):
            value = 0.5 * value + 0.5 * rows.mean(0)  # never start a probability or rate at 0 or 1
            value = value.clamp(1e-3, 1 - 1e-3) if attr == "probs" else value.clamp_min(1e-3)
        store[name] = value.to(store[name].dtype)
        chosen.append(name)
    return chosen


def _create_parameters(model: Callable, args: tuple, kwargs: dict, em: Optional[EM] = None):
    """Run the model once under enumeration, which creates its parameters from its own initialisers (a
    discrete z is (k, 1), so nothing of size n k d^2 is built); the trace and its parameter leaves, or
    None (after a plain run) for a model without an exact E-step.

    The model's structure (:func:`ppl_em.posterior.inspect_model`) is ``em``'s where it has one, else found
    here (and given to ``em``). Its look at the model consumes no randomness, so the parameters that the
    model draws (``torch.randn`` initialisers, a global latent's prior draw) come out the same either way.
    """
    try:
        with poutine.block():
            structure = em.structure if em is not None else None
            if structure is None:
                with fresh_rng():
                    structure = inspect_model(model, args, kwargs)
            trace, leaves = trace_model(model, structure, args, kwargs, log_prob="none")
    except ExactInferenceError:
        with poutine.block():
            poutine.trace(model).get_trace(*args, **kwargs)
        return None
    if em is not None:
        em.structure = structure
        em.offer_trace(trace, leaves, args, kwargs)  # its first step reads the parameters and plates from this run
    return _Traced(trace, leaves)


@dataclass
class _Traced:
    """A run of the model under enumeration: what :func:`location_parameters` reads."""

    trace: Any
    leaves: Dict[str, torch.Tensor]


def impute_columns(args: tuple, kwargs: dict) -> Tuple[tuple, dict, List[torch.Tensor]]:
    """The model arguments with each NaN at the observed value of its column nearest to the column's mean
    (columns: the last dimension), and the masks of observed entries of the arguments that had NaN.

    An observed value rather than the mean itself, so that the filled data stay in the data's support
    (a count stays a count, a bit a bit) and the model accepts them."""
    seen: List[torch.Tensor] = []

    def fill(value: Any) -> Any:
        if not (torch.is_tensor(value) and value.is_floating_point() and value.dim() >= 1
                and bool(torch.isnan(value).any())):
            return value
        observed = ~torch.isnan(value)
        seen.append(observed)
        flat = value.reshape(-1, value.shape[-1])  # (m, d)
        gap = (flat - flat.nanmean(0)).abs().nan_to_num(nan=math.inf)  # (m, d): distance to the column mean
        nearest = flat.gather(0, gap.argmin(0, keepdim=True))[0].nan_to_num(0.0)  # (d,); no observed entry: 0
        return torch.where(observed, value, nearest)

    filled_args = tuple(fill(a) for a in args)
    return filled_args, {name: fill(v) for name, v in kwargs.items()}, seen


def complete_rows(rows: torch.Tensor, seen: List[torch.Tensor], k: int) -> torch.Tensor:
    """``rows`` (m, *row) restricted to those without a missing entry, when some mask of observed entries in
    ``seen`` has their shape (the rows are the data's, one to one) and at least k rows are complete."""
    for observed in seen:
        if observed.shape == rows.shape:
            complete = observed.reshape(rows.shape[0], -1).all(-1)  # (m,)
            if int(complete.sum()) >= k:
                return rows[complete.to(rows.device)]
    return rows


# Attributes that are the mean of an observation, so that a data row is a good starting value.
LOCATIONS = {(dist.Normal, "loc"), (dist.MultivariateNormal, "loc"), (dist.Bernoulli, "probs"), (dist.Poisson, "rate")}


def location_parameters(post) -> Dict[str, tuple]:
    """Parameters that are the location of an observed site, with that site's data rows.

    Returns a dict ``name -> (rows, attr)`` where rows has shape (m, *row) for a parameter
    of shape (k, *row) and attr is "loc", "probs" or "rate".
    """
    found = {}
    by_id = {id(leaf): name for name, leaf in post.leaves.items()}
    uses_of: Dict[str, list] = {}
    for site in post.trace.nodes.values():
        if site["type"] == "sample":
            for use in find_uses(site, by_id)[0]:
                uses_of.setdefault(use.param, []).append(use)
    for name, uses in uses_of.items():
        if len({(u.rule.family, u.rule.attr) for u in uses}) != 1 or uses[0].selection.transforms:
            continue
        rule, shape = uses[0].rule, post.leaves[name].shape
        if (rule.family, rule.attr) not in LOCATIONS:
            continue
        if rule.attr not in ("loc", "probs", "rate") or rule.family is dist.Categorical or len(shape) < 1:
            continue
        row = shape[1:]
        rows = []
        for use in uses:
            site = post.trace.nodes[use.site]
            value = site["value"]
            if (not site["is_observed"] or site["infer"].get("_map_site") or not torch.is_tensor(value)
                    or value.dim() <= len(row) or value.shape[value.dim() - len(row):] != row):
                continue
            rows.append(value.detach().reshape((-1,) + tuple(row)).to(post.leaves[name].dtype))
        if rows:
            rows = torch.cat(rows) if len(rows) > 1 else rows[0]  # the data themselves, not a copy
            finite = torch.isfinite(rows.reshape(rows.shape[0], -1)).all(-1)  # skip NaN rows (masked data)
            found[name] = (rows if finite.all() else rows[finite], rule.attr)
    return found


def kmeans_plus_plus(rows: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of k rows chosen by D^2 sampling (k-means++ seeding), shape (k,), on the CPU (the
    generator's device; CPU indices select rows of a tensor on any device)."""
    flat = rows.reshape(rows.shape[0], -1).detach().cpu()  # (m, p)
    first = torch.randint(flat.shape[0], (1,), generator=generator)
    chosen = [int(first)]
    d2 = _squared_distances(flat, flat[first])  # (m,) squared distance to the nearest chosen row
    for _ in range(1, k):
        weights = d2.clamp_min(0)
        if not weights.sum() > 0:  # every row coincides with a chosen one: pick among the rest uniformly
            weights = torch.ones_like(d2)
            weights[chosen] = 0
        nxt = int(torch.multinomial(weights, 1, generator=generator))
        chosen.append(nxt)
        d2 = torch.minimum(d2, _squared_distances(flat, flat[nxt]))
    return torch.tensor(chosen)


def _squared_distances(flat: torch.Tensor, centre: torch.Tensor, block: int = 65536) -> torch.Tensor:
    """|x^(i) - c|^2 for every row of ``flat`` (m, p), shape (m,); in blocks of rows, so that the (m, p)
    difference is never held whole."""
    return torch.cat([((flat[i:i + block] - centre) ** 2).sum(-1) for i in range(0, flat.shape[0], block)])
