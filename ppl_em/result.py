"""The fitted model: one result type for EM, hard EM, SVI and amortized (VAE-style) guides.

A :class:`FitResult` holds the fitted parameters theta (a snapshot of Pyro's param store),
the optimisation history and the model, and answers the questions one asks of a fitted
latent-variable model on one scale for every method:

* ``predict_proba(x)``: the exact posterior Q(z^(i)) = p(z^(i) | x^(i); theta), the
  responsibilities w_j^(i), shape (n, k), from one exact E-step;
* ``score(x)``: the exact mean log-likelihood (1/n) log p(x; theta) = (1/n) l(theta), so an
  EM fit and an SVI fit compare directly (an SVI loss is -ELBO(x; Q, theta) <= -l(theta));
* ``bic(x)`` / ``aic(x)``: with the number of free parameters derived from each parameter's
  constraint (a k-simplex has k - 1, a d x d covariance d(d + 1)/2);
* ``sample(n)``: the generative story run forward with the fitted theta.

Checkpoints (:meth:`FitResult.save`, :func:`load`) hold tensors plus a JSON string and are
read with ``torch.load(weights_only=True)``: loading never runs code from the file. Every
field is validated, and the parameters against the model (:mod:`ppl_em.checkpoint`).

References: lecture notes, "EM algorithm", "density estimation"; Schwarz, "Estimating the
dimension of a model", Ann. Stat. 1978 (BIC); Akaike, IEEE TAC 1974 (AIC).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import pyro
import pyro.distributions.constraints as constraints
import pyro.poutine as poutine
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import transform_to

from . import checkpoint, sources
from .chains import is_chain
from .checkpoint import atomic_write, constraint_to_json, qualified_name
from .em import EM
from .posterior import _MAX_PLATES, ExactInferenceError, enumerated, inspect_model
from .store import State, capture_store, fresh_rng, model_trace, replace_store
from .svi import default_loss
from .validation import check_arguments, check_seed

__all__ = ["FitResult", "load", "free_parameters", "atomic_write", "count_observations", "first_look", "observations",
           "scaled_observations", "capture_store", "replace_store"]
# Matrix constraints whose unconstrained parametrisation in Pyro's store is over-complete.
_TRIANGULAR = (type(constraints.positive_definite), type(constraints.positive_semidefinite),
               type(constraints.lower_cholesky), type(constraints.softplus_lower_cholesky),
               type(constraints.symmetric), type(constraints.lower_triangular))


# -- free parameters ------------------------------------------------------------------------
def free_parameters(shape: torch.Size, constraint: constraints.Constraint) -> int:
    """Degrees of freedom of a parameter of ``shape`` restricted to ``constraint``.

    Counted per event: a k-simplex has k - 1, a d x d positive definite (or symmetric, or
    lower-triangular) matrix d(d + 1)/2, a d x d correlation matrix d(d - 1)/2, a unit
    vector in R^d d - 1; interval and positivity constraints do not remove any.

    Examples
    --------
    >>> free_parameters(torch.Size([3]), constraints.simplex)
    2
    >>> free_parameters(torch.Size([3, 2, 2]), constraints.positive_definite)
    9
    """
    while isinstance(constraint, constraints.independent):
        constraint = constraint.base_constraint
    numel = math.prod(shape)
    if numel == 0:
        return 0
    if constraint is constraints.simplex or constraint is constraints.sphere:
        return numel - numel // shape[-1]
    d = shape[-1] if len(shape) else 1
    matrices = numel // (d * d) if len(shape) >= 2 else 0
    if isinstance(constraint, _TRIANGULAR):
        return matrices * d * (d + 1) // 2
    if constraint is constraints.unit_lower_cholesky:
        return matrices * d * (d - 1) // 2
    return math.prod(transform_to(constraint).inverse_shape(torch.Size(shape)))


# -- observations ---------------------------------------------------------------------------
def count_observations(model: Callable, args: tuple, kwargs: dict, state: Optional[State] = None) -> int:
    """n: the number of observed values, summed over the model's observed sites.

    Each batch element of an observed site's distribution is one observation: an (n, d) data
    set under a MultivariateNormal counts n, an HMM with T observed steps counts T (a chain site,
    ``DiscreteHMM``, counts each of its steps). This is the n of the mean log-likelihood
    (1/n) log p(x) and of BIC's log n. The model runs once with a param store holding exactly
    ``state`` (empty by default: whatever Pyro's store holds is never read), on the first
    ``sources.CHECK_ROWS`` rows of the data plate, scaled to all of them (every observed site lies in the
    plate where rows can be taken); the arguments may hold a data source (:mod:`ppl_em.sources`).
    """
    data = sources.Data.of(model, args, kwargs)
    first = data.first(sources.CHECK_ROWS)
    return scaled_observations(observations(*first_look(model, *first, state)), data, sources.CHECK_ROWS)


def first_look(model: Callable, args: tuple, kwargs: dict, state: Optional[State] = None) -> Tuple[Trace, Optional[int]]:
    """One run of the model (:func:`ppl_em.store.model_trace`, a store holding exactly ``state``) for a count of
    its observations or a check of its data, and the plate dimensions of its batch shapes: under parallel
    enumeration where the model allows it (a discrete z is (k, 1, ...), so a mixture's per-component tensors are
    not gathered once per row: the GMM's Sigma_z of 4096 rows, each checked positive definite), else as written
    (None: every batch dimension is a plate's), e.g. for a model that branches on a drawn value."""
    try:
        return model_trace(enumerated(model), args, kwargs, state), _MAX_PLATES
    except Exception:  # not enumerable as written; a failure of the data or the model shows in the plain run
        return model_trace(model, args, kwargs, state), None


def scaled_observations(observed: int, data: sources.Data, m: int) -> int:
    """n of all rows, from the ``observed`` count of a run on the first min(m, rows) of them."""
    if not data.splits:
        return observed
    rows = data.rows
    first = min(m, rows)
    return observed if first == rows else round(observed * rows / first)


def observations(trace: Trace, plates: Optional[int] = None) -> int:
    """n of :func:`count_observations`, from one trace of the model (``plates``: of a run under enumeration,
    whose batch dimensions left of this many are the discrete latents' values, not observations)."""
    n = sum(math.prod(s["fn"].batch_shape[-plates:] if plates else s["fn"].batch_shape) * _steps(s)
            for s in trace.nodes.values() if s["type"] == "sample" and s["is_observed"])
    if n == 0:
        raise ValueError("The model has no observed sample site (no pyro.sample(..., obs=x)); nothing to fit.")
    return n


def _steps(site: dict) -> int:
    """Observations per batch element: the time steps of a chain site, else 1."""
    fn = site["fn"]
    return site["value"].shape[-1 - fn.observation_dist.event_dim] if is_chain(fn) else 1


# -- the result -----------------------------------------------------------------------------
@dataclass
class FitResult:
    """A fitted model, the same type for ``method`` = "em", "hard_em", "svi" and "vae".

    Attributes
    ----------
    method : str
        How theta was fitted.
    params : dict of str to torch.Tensor
        Constrained values of every parameter in the store after the fit (model and guide),
        e.g. ``phi`` (k,), ``mu`` (k, d), ``Sigma`` (k, d, d) for the GMM.
    losses : list of float
        The loss at each iteration: -log p(x; theta) for EM (before that iteration's update),
        -max_z log p(x, z; theta) for hard EM, an estimate of -ELBO(x; Q, theta) for SVI.
    history : list of dict
        Per iteration: ``iteration``, ``loss``, ``time`` (seconds since the start of the
        restart, excluding any monitoring), and ``log_px`` (exact mean log p(x)) when recorded.
    converged : bool
        Whether the change of the mean loss per observation fell below ``tol``.
    n_iter : int
        Iterations run by the kept restart.
    n_data : int
        n, the number of observations (see :func:`count_observations`).
    log_likelihood : float or None
        Exact (1/n) log p(x; theta) at the fitted theta, from a final E-step; None for models
        without an exact E-step (continuous local latents).
    restarts : list of dict
        One summary per restart (``seed``, ``log_likelihood``, ``final_loss``, ``converged``,
        ``n_iter``, ``stopped``); the kept one is ``restarts[best]``.
    best : int
        Index of the kept restart.
    init : dict
        The initialisation: ``strategy`` and the parameters it set (``params``).
    model, guide, args, kwargs
        The model and guide, and the model arguments of the fit (the defaults of every method
        below when none are passed). After :func:`load`, ``args`` is empty unless passed to it.
    source : str or None
        The checkpoint file a loaded result came from (named in its errors).
    missing : {"error", "marginalize"}
        How NaN entries in the data are treated, as in :func:`ppl_em.fit`: with "marginalize"
        every method below accepts rows with NaN (missing entries marginalised out by the model;
        a row of NaN is still an error), and a checkpoint keeps the setting. Set the attribute to
        "marginalize" to score data with missing entries under a fit made without any.

    Every method checks, once per shape of its arguments, that the model reads exactly this
    result's parameters, with their shapes and constraints (:func:`ppl_em.checkpoint.check_model`):
    a parameter the result lacks is an error, never silently initialised.

    Examples
    --------
    >>> import ppl_em
    >>> from ppl_em.models import gmm
    >>> from ppl_em.datasets import load_old_faithful
    >>> x = load_old_faithful()[::8]                  # (34, 2)
    >>> result = ppl_em.fit(gmm.model, x, 2, progress=False)
    >>> result.converged, result.predict_proba().shape
    (True, torch.Size([34, 2]))
    >>> bool((result.predict() == result.predict_proba().argmax(-1)).all())
    True
    """

    method: str
    params: Dict[str, torch.Tensor]
    losses: List[float]
    history: List[Dict[str, float]]
    converged: bool
    n_iter: int
    n_data: int
    log_likelihood: Optional[float] = None
    restarts: List[Dict[str, Any]] = field(default_factory=list)
    best: int = 0
    init: Dict[str, Any] = field(default_factory=dict)
    model: Optional[Callable] = field(default=None, repr=False)
    guide: Optional[Callable] = field(default=None, repr=False)
    args: tuple = field(default=(), repr=False)
    kwargs: dict = field(default_factory=dict, repr=False)
    state: Dict[str, Dict[str, Any]] = field(default_factory=dict, repr=False)
    source: Optional[str] = field(default=None, repr=False)
    missing: str = "error"
    _checked: set = field(default_factory=set, repr=False, compare=False)  # argument signatures checked

    @classmethod
    def from_store(cls, **fields: Any) -> "FitResult":
        """Snapshot the current param store into a new result."""
        state = capture_store()
        params = {n: transform_to(state["constraints"][n])(v).detach() for n, v in state["params"].items()}
        return cls(params=params, state=state, **fields)

    # -- posterior ------------------------------------------------------------------------
    def predict_proba(self, *args: Any, site: Optional[str] = None, **kwargs: Any) -> torch.Tensor:
        """Exact posterior marginals Q(z^(i) = j) = w_j^(i) of the local discrete latent.

        Parameters
        ----------
        *args, **kwargs
            Model arguments (default: those of the fit), e.g. ``(x_new, k)``.
        site : str, optional
            The latent site; needed only when the model has several that differ in shape.
            Several of equal shape (an HMM's z_1, ..., z_T) are stacked along dim -2.

        Returns
        -------
        torch.Tensor
            Shape (n, k) for a mixture (plate shape + (k,) in general). Computed chunk by chunk of the
            data plate (batch by batch of a data source): the output is the only O(n) memory.
        """
        args, kwargs = self._model_args(args, kwargs)
        with self._active():
            pieces = sources.Data.of(self.model, args, kwargs).pieces()
            parts = [self._marginals(self._posterior(*piece), site) for piece in pieces]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @staticmethod
    def _marginals(post, site: Optional[str]) -> torch.Tensor:
        names = [site] if site is not None else post.enumerated_sites
        if not names:
            raise ValueError("The model has no discrete latent site to predict; predict_proba needs one.")
        margs = [post.marginal(name) for name in names]
        if len(margs) == 1:
            return margs[0]
        if len({m.shape for m in margs}) > 1:
            shapes = {n: tuple(m.shape) for n, m in zip(names, margs)}
            raise ValueError(f"The model has several latent sites of different shapes {shapes}; pass site=NAME.")
        return torch.stack(margs, dim=-2)

    def predict(self, *args: Any, site: Optional[str] = None, **kwargs: Any) -> torch.Tensor:
        """The most probable value of each z^(i) under its exact posterior marginal: argmax_j w_j^(i)."""
        return self.predict_proba(*args, site=site, **kwargs).argmax(-1)

    def score(self, *args: Any, **kwargs: Any) -> float:
        """Exact mean log-likelihood (1/n) log p(x; theta), every discrete latent summed out.

        Raises :class:`ppl_em.ExactInferenceError` for a model with continuous local latents
        (a VAE), whose log p(x) has no closed form; use :meth:`elbo` there, a lower bound.
        Streamed chunk by chunk (batch by batch of a data source): O(chunk) memory.
        """
        args, kwargs = self._model_args(args, kwargs)
        with self._active(), self._exact():
            total = EM(self.model, missing=self.missing).log_likelihood(*args, **kwargs)
        return total / count_observations(self.model, args, kwargs, self.state)

    def elbo(self, *args: Any, num_particles: int = 16, **kwargs: Any) -> float:
        """Mean ELBO(x; Q, theta) per observation with the fitted guide Q (a lower bound on score)."""
        if self.guide is None:
            raise ValueError(f"This {self.method!r} result has no guide; elbo() needs an SVI or VAE fit. "
                             "Use score() for the exact log-likelihood.")
        args, kwargs = self._model_args(args, kwargs)
        if sources.find(args, kwargs) is not None:
            raise ValueError("elbo() runs the guide on all the data at once; pass the data as tensors (or a "
                             "sample of its rows), not a data source.")
        loss = default_loss(self.model, *args, **kwargs)
        loss.num_particles = num_particles
        with self._active(), torch.no_grad():
            value = loss.loss(self.model, self.guide, *args, **kwargs)
        return -float(value) / count_observations(self.model, args, kwargs, self.state)

    # -- model selection --------------------------------------------------------------------
    def n_parameters(self, *args: Any, **kwargs: Any) -> int:
        """Number of free parameters of the model (guide parameters excluded).

        The sum over the model's parameters of :func:`free_parameters` under each one's
        constraint; for a full-covariance GMM k - 1 + k d + k d (d + 1)/2.
        """
        names = self._model_param_names(*self._model_args(args, kwargs))
        return sum(free_parameters(self.params[n].shape, self.state["constraints"][n]) for n in names)

    def bic(self, *args: Any, **kwargs: Any) -> float:
        """Bayesian information criterion -2 log p(x; theta) + p log n (lower is better)."""
        args, kwargs = self._model_args(args, kwargs)
        n = count_observations(self.model, args, kwargs, self.state)
        return -2.0 * self.score(*args, **kwargs) * n + self.n_parameters(*args, **kwargs) * math.log(n)

    def aic(self, *args: Any, **kwargs: Any) -> float:
        """Akaike information criterion -2 log p(x; theta) + 2 p (lower is better)."""
        args, kwargs = self._model_args(args, kwargs)
        n = count_observations(self.model, args, kwargs, self.state)
        return -2.0 * self.score(*args, **kwargs) * n + 2.0 * self.n_parameters(*args, **kwargs)

    # -- generation -------------------------------------------------------------------------
    def sample(self, n: int, *args: Any, seed: Optional[int] = None, **kwargs: Any) -> Dict[str, torch.Tensor]:
        """Run the fitted generative story forward: n fresh draws of every sample site.

        Contract: the first tensor among the model arguments is the data x; it is replaced
        by a placeholder of ``n`` rows (ones, the same row shape and dtype) and the model is
        run under ``poutine.uncondition``, so its observed sites are drawn, not clamped. The
        model must therefore read the number of data points (and nothing else) from x, as
        every model in ``ppl_em.models`` does.

        Returns
        -------
        dict of str to torch.Tensor
            Every sample site's draw, e.g. ``{"z": (n,), "x": (n, d)}`` for the GMM.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"sample(n) needs a number of draws n >= 0, got {n!r}.")
        args, kwargs = self._model_args(args, kwargs)
        if sources.find(args, kwargs) is not None:  # the row shape and dtype from a source's first row
            args, kwargs = sources.Data.of(self.model, args, kwargs).first(1)
        position = next((i for i, a in enumerate(args) if torch.is_tensor(a)), None)
        if position is None:
            raise ValueError("sample() needs the data tensor among the model arguments to know the row shape; "
                             "pass it, e.g. result.sample(100, x, k).")
        x = args[position]
        # A plate of size 0 cannot run: draw one row and keep none of it (the shapes stay right).
        rows = torch.ones((max(n, 1),) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        args = args[:position] + (rows,) + args[position + 1:]
        if seed is not None:
            pyro.set_rng_seed(check_seed(seed))
        with self._active(), torch.no_grad():
            tr = prune_subsample_sites(poutine.trace(poutine.uncondition(self.model)).get_trace(*args, **kwargs))
        sites = {name: s for name, s in tr.nodes.items() if s["type"] == "sample"}
        return {name: _first_rows(s, n) for name, s in sites.items()}

    # -- persistence ------------------------------------------------------------------------
    def save(self, path: "os.PathLike[str] | str") -> str:
        """Write a checkpoint: the parameters' tensors plus JSON metadata, atomically.

        The file is ``torch.save({"format", "version", "params", "meta"})`` where ``params``
        maps names to unconstrained tensors and ``meta`` is a JSON string (constraints,
        losses, history, method, ...). It is written to a temporary file in the same
        directory, fsync'ed and renamed over ``path``: a crash leaves the old file intact.
        """
        meta = {
            "method": self.method, "losses": self.losses, "history": self.history,
            "converged": self.converged, "n_iter": self.n_iter, "n_data": self.n_data,
            "log_likelihood": self.log_likelihood, "restarts": self.restarts, "best": self.best,
            "init": self.init, "model": qualified_name(self.model), "missing": self.missing,
            "constraints": {n: constraint_to_json(c, n) for n, c in self.state["constraints"].items()},
        }
        payload = {"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "meta": json.dumps(meta),
                   "params": {n: v.detach().cpu() for n, v in self.state["params"].items()}}
        return atomic_write(path, lambda f: torch.save(payload, f))

    def activate(self) -> None:
        """Make Pyro's param store hold exactly this result's parameters (replacing, not merging)."""
        replace_store(self.state)

    # -- helpers ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _active(self) -> Iterator[None]:
        """Swap this result's parameters into the param store for the duration of a call."""
        saved = capture_store()
        replace_store(self.state)
        try:
            yield
        finally:
            replace_store(saved)

    def _model_args(self, args: tuple, kwargs: dict) -> Tuple[tuple, dict]:
        if self.model is None:
            raise ValueError("This result has no model (it was loaded from a checkpoint of a model outside "
                             "ppl_em.models); pass it: ppl_em.load(path, model=my_model).")
        if args or kwargs:
            args, kwargs = tuple(args), dict(kwargs)
        elif not self.args and not self.kwargs:
            raise ValueError("No model arguments: this result was loaded from a checkpoint, which does not "
                             "store the data; pass them, e.g. result.predict_proba(x, k).")
        else:
            args, kwargs = self.args, self.kwargs
        self._check_model(args, kwargs)
        return args, kwargs

    def _check_model(self, args: tuple, kwargs: dict) -> None:
        """The arguments can be fitted, and the model reads exactly this result's parameters (checked
        once per argument shape, on the first rows: a data source's first batch)."""
        key = _signature(args, kwargs)
        if sources.find(args, kwargs) is None:
            check_arguments(self.model, args, kwargs, self.missing)  # NaN data: a clear error before the model runs
        elif key not in self._checked:
            check_arguments(self.model, *self._first(args, kwargs), self.missing)
        if key not in self._checked:
            checkpoint.check_model(self.state, self.model, *self._first(args, kwargs), self.source or "This result")
            self._checked.add(key)

    def _first(self, args: tuple, kwargs: dict) -> Tuple[tuple, dict]:
        """The arguments for the first ``sources.CHECK_ROWS`` rows (all of them for small data)."""
        with self._active():
            return sources.Data.of(self.model, args, kwargs).first(sources.CHECK_ROWS)

    @contextlib.contextmanager
    def _exact(self) -> Iterator[None]:
        try:
            yield
        except ExactInferenceError as e:
            raise ExactInferenceError(
                f"{e} This {self.method!r} result has no exact posterior or log p(x); "
                "result.elbo(...) gives the ELBO, a lower bound on log p(x)."
            ) from None

    def _posterior(self, args: tuple, kwargs: dict):
        """The exact E-step on these (checked) arguments, with this result's parameters active."""
        with self._exact():
            return EM(self.model, missing=self.missing).e_step(*args, **kwargs)

    def _model_param_names(self, args: tuple, kwargs: dict) -> List[str]:
        """Parameters the model itself reads (not the guide's), plus point-estimated global latents."""
        args, kwargs = self._first(args, kwargs)
        with self._active(), poutine.block(), fresh_rng():
            tr = poutine.trace(self.model).get_trace(*args, **kwargs)
            try:
                map_sites = list(inspect_model(self.model, args, kwargs).map_sites)
            except ExactInferenceError:
                map_sites = []
        names = [n for n, s in tr.nodes.items() if s["type"] == "param"] + map_sites
        return [n for n in dict.fromkeys(names) if n in self.state["params"]]


def _first_rows(site: dict, n: int) -> torch.Tensor:
    """A drawn site's value, cut to n rows along every plate of size max(n, 1) it lies in (n = 0 only)."""
    value = site["value"].detach()
    if n > 0:
        return value
    event_dim = site["fn"].event_dim
    for frame in site["cond_indep_stack"]:
        dim = value.dim() - event_dim + frame.dim
        if frame.vectorized and frame.size == 1 and dim >= 0:
            value = value.narrow(dim, 0, 0)
    return value


def _signature(args: tuple, kwargs: dict) -> tuple:
    """What the parameters' shapes can depend on: tensor shapes and dtypes, plain values, else identity."""
    def key(v: Any) -> Any:
        if torch.is_tensor(v):
            return ("tensor", tuple(v.shape), v.dtype)
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        return ("object", id(v))
    return tuple(map(key, args)) + tuple(sorted((k, key(v)) for k, v in kwargs.items()))


def load(path: "os.PathLike[str] | str", model: Optional[Callable] = None, args: tuple = (),
         kwargs: Optional[Dict[str, Any]] = None) -> FitResult:
    """Read a checkpoint written by :meth:`FitResult.save` and put its parameters in the store.

    The file is read with ``torch.load(weights_only=True)``, which refuses anything but
    tensors and plain containers: a file crafted to run code on load raises instead. Every
    field is validated first (:func:`ppl_em.checkpoint.read`); a checkpoint that fails leaves
    the param store as it was. Otherwise the store is cleared and holds exactly the
    checkpoint's parameters.

    Parameters
    ----------
    path : path-like
        The checkpoint.
    model : callable, optional
        The model the checkpoint was fitted with. Models of ``ppl_em.models`` are found from
        the checkpoint; any other must be passed for predict/score/sample to work. A model of
        ``ppl_em.models`` other than the one the checkpoint names is refused.
    args, kwargs : optional
        Model arguments, e.g. ``(x, k)``: the checkpoint is then checked against the model
        (every parameter present, shapes and constraints matching) before the store is
        touched, and they become the result's defaults. Without them the same check runs at
        the first method call.

    Returns
    -------
    FitResult
        With ``args`` and ``kwargs`` as passed (empty by default: pass the data to its methods).

    Raises
    ------
    ValueError
        Naming the file, for a file that is not a valid checkpoint, or does not match the model.
    """
    source = os.fspath(path)
    state, meta = checkpoint.read(source)
    model = checkpoint.choose_model(meta["model"], model, source)
    args, kwargs = tuple(args), dict(kwargs or {})
    if (args or kwargs) and model is None:
        raise ValueError(f"{source!r} names no model of ppl_em.models; pass the model with the arguments: "
                         "ppl_em.load(path, model=my_model, args=(x, k)).")
    missing = meta.get("missing", "error")  # absent from checkpoints written before missing values
    if args or kwargs:
        check_arguments(model, args, kwargs, missing)
        checkpoint.check_model(state, model, args, kwargs, repr(source))
    replace_store(state)
    fields = {name: meta[name] for name in ("method", "losses", "history", "converged", "n_iter", "n_data",
                                            "log_likelihood", "restarts", "best", "init")}
    fields["missing"] = missing
    return FitResult.from_store(**fields, model=model, args=args, kwargs=kwargs, source=repr(source))
