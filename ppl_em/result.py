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
read with ``torch.load(weights_only=True)``: loading never runs code from the file.

References: lecture notes, "EM algorithm", "density estimation"; Schwarz, "Estimating the
dimension of a model", Ann. Stat. 1978 (BIC); Akaike, IEEE TAC 1974 (AIC).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import pkgutil
import re
import tempfile
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import pyro
import pyro.distributions.constraints as constraints
import pyro.poutine as poutine
import pyro.util
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import transform_to

from .chains import is_chain
from .em import EM
from .posterior import ExactInferenceError, inspect_model
from .svi import default_loss

__all__ = ["FitResult", "load", "free_parameters", "atomic_write", "count_observations"]

FORMAT = "ppl_em.FitResult"
VERSION = 1

# Parametrised constraints a checkpoint may name; their arguments must be plain numbers.
_BOUNDED = {
    "interval": ("lower_bound", "upper_bound"),
    "half_open_interval": ("lower_bound", "upper_bound"),
    "greater_than": ("lower_bound",),
    "greater_than_eq": ("lower_bound",),
    "less_than": ("upper_bound",),
}
# Matrix constraints whose unconstrained parametrisation in Pyro's store is over-complete.
_TRIANGULAR = (type(constraints.positive_definite), type(constraints.positive_semidefinite),
               type(constraints.lower_cholesky), type(constraints.softplus_lower_cholesky),
               type(constraints.symmetric), type(constraints.lower_triangular))


# -- storage helpers ------------------------------------------------------------------------
def atomic_write(path: "os.PathLike[str] | str", write: Callable[[BinaryIO], None]) -> str:
    """Write a file so that a crash leaves either the old file or the new one, never a mix.

    ``write(f)`` fills a temporary file in the destination's directory; it is flushed,
    fsync'ed and moved over ``path`` with :func:`os.replace` (atomic on POSIX and Windows).

    Returns
    -------
    str
        ``path``.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would make checkpoints private
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (POSIX only)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def capture_store() -> Dict[str, Dict[str, Any]]:
    """A detached copy of Pyro's param store: unconstrained values and constraints."""
    store = pyro.get_param_store()
    state = store.get_state()
    return {"params": {n: v.detach().clone() for n, v in state["params"].items()},
            "constraints": dict(state["constraints"])}


def replace_store(state: Dict[str, Dict[str, Any]]) -> None:
    """Make Pyro's param store hold exactly ``state``: cleared first, so nothing is merged."""
    pyro.clear_param_store()
    params = {n: v.detach().clone().requires_grad_() for n, v in state["params"].items()}
    pyro.get_param_store().set_state({"params": params, "constraints": dict(state["constraints"])})


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


# -- constraints <-> JSON ------------------------------------------------------------------
def _constraint_to_json(c: constraints.Constraint, name: str) -> Dict[str, Any]:
    if isinstance(c, constraints.independent):
        return {"independent": _constraint_to_json(c.base_constraint, name), "ndims": c.reinterpreted_batch_ndims}
    for attr in dir(constraints):
        if getattr(constraints, attr) is c and not attr.startswith("_"):
            return {"name": attr}
    for attr, bounds in _BOUNDED.items():
        if type(c) is getattr(constraints, attr):
            values = [getattr(c, b) for b in bounds]
            if all(isinstance(v, (int, float)) or (torch.is_tensor(v) and v.numel() == 1) for v in values):
                return {"name": attr, "args": [float(v) for v in values]}
    if type(c) is type(constraints.real):
        return {"name": "real"}
    raise ValueError(
        f"Cannot save parameter '{name}': its constraint {c!r} has no checkpoint representation. "
        f"Supported: the named constraints of pyro.distributions.constraints, {sorted(_BOUNDED)} "
        "with numeric bounds, and independent(...) of those."
    )


def _constraint_from_json(spec: Any) -> constraints.Constraint:
    """Rebuild a constraint by name; only Constraint objects and numeric bounds are accepted."""
    if not isinstance(spec, dict):
        raise ValueError(f"malformed constraint {spec!r}")
    if "independent" in spec:
        return constraints.independent(_constraint_from_json(spec["independent"]), int(spec["ndims"]))
    name = spec.get("name")
    if name in _BOUNDED:
        args = spec.get("args", [])
        if len(args) != len(_BOUNDED[name]) or not all(isinstance(a, (int, float)) for a in args):
            raise ValueError(f"malformed bounds {args!r} for constraint {name!r}")
        return getattr(constraints, name)(*map(float, args))
    value = getattr(constraints, name, None) if isinstance(name, str) and not name.startswith("_") else None
    if not isinstance(value, constraints.Constraint):
        raise ValueError(f"unknown constraint {name!r}")
    return value


# -- observations ---------------------------------------------------------------------------
def count_observations(model: Callable, args: tuple, kwargs: dict) -> int:
    """n: the number of observed values, summed over the model's observed sites.

    Each batch element of an observed site's distribution is one observation: an (n, d) data
    set under a MultivariateNormal counts n, an HMM with T observed steps counts T (a chain site,
    ``DiscreteHMM``, counts each of its steps). This is the n of the mean log-likelihood
    (1/n) log p(x) and of BIC's log n.
    """
    store = pyro.get_param_store()
    with poutine.block(), _fresh_rng(), store.scope(store.get_state()):  # parameters it creates are dropped
        tr = poutine.trace(model).get_trace(*args, **kwargs)
    n = sum(math.prod(s["fn"].batch_shape) * _steps(s) for s in tr.nodes.values()
            if s["type"] == "sample" and s["is_observed"])
    if n == 0:
        raise ValueError("The model has no observed sample site (no pyro.sample(..., obs=x)); nothing to fit.")
    return n


def _steps(site: dict) -> int:
    """Observations per batch element: the time steps of a chain site, else 1."""
    fn = site["fn"]
    return site["value"].shape[-1 - fn.observation_dist.event_dim] if is_chain(fn) else 1


@contextlib.contextmanager
def _fresh_rng() -> Iterator[None]:
    """Run without consuming the global random stream (a look at the model must not shift seeds)."""
    state = pyro.util.get_rng_state()
    try:
        yield
    finally:
        pyro.util.set_rng_state(state)


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
        below when none are passed). After :func:`load`, ``args`` is empty.

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
            Shape (n, k) for a mixture (plate shape + (k,) in general).
        """
        post = self._e_step(args, kwargs)
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
        """
        args, kwargs = self._model_args(args, kwargs)
        post = self._e_step(args, kwargs)
        return float(post.log_evidence) / count_observations(self.model, args, kwargs)

    def elbo(self, *args: Any, num_particles: int = 16, **kwargs: Any) -> float:
        """Mean ELBO(x; Q, theta) per observation with the fitted guide Q (a lower bound on score)."""
        if self.guide is None:
            raise ValueError(f"This {self.method!r} result has no guide; elbo() needs an SVI or VAE fit. "
                             "Use score() for the exact log-likelihood.")
        args, kwargs = self._model_args(args, kwargs)
        loss = default_loss(self.model, *args, **kwargs)
        loss.num_particles = num_particles
        with self._active(), torch.no_grad():
            value = loss.loss(self.model, self.guide, *args, **kwargs)
        return -float(value) / count_observations(self.model, args, kwargs)

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
        n = count_observations(self.model, args, kwargs)
        return -2.0 * self.score(*args, **kwargs) * n + self.n_parameters(*args, **kwargs) * math.log(n)

    def aic(self, *args: Any, **kwargs: Any) -> float:
        """Akaike information criterion -2 log p(x; theta) + 2 p (lower is better)."""
        args, kwargs = self._model_args(args, kwargs)
        n = count_observations(self.model, args, kwargs)
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
        args, kwargs = self._model_args(args, kwargs)
        position = next((i for i, a in enumerate(args) if torch.is_tensor(a)), None)
        if position is None:
            raise ValueError("sample() needs the data tensor among the model arguments to know the row shape; "
                             "pass it, e.g. result.sample(100, x, k).")
        x = args[position]
        args = args[:position] + (torch.ones((n,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device),) + args[position + 1:]
        if seed is not None:
            pyro.set_rng_seed(seed)
        with self._active(), torch.no_grad():
            tr = prune_subsample_sites(poutine.trace(poutine.uncondition(self.model)).get_trace(*args, **kwargs))
        return {name: s["value"].detach() for name, s in tr.nodes.items() if s["type"] == "sample"}

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
            "init": self.init, "model": _qualified_name(self.model),
            "constraints": {n: _constraint_to_json(c, n) for n, c in self.state["constraints"].items()},
        }
        payload = {"format": FORMAT, "version": VERSION, "meta": json.dumps(meta),
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
            return tuple(args), dict(kwargs)
        if not self.args and not self.kwargs:
            raise ValueError("No model arguments: this result was loaded from a checkpoint, which does not "
                             "store the data; pass them, e.g. result.predict_proba(x, k).")
        return self.args, self.kwargs

    def _e_step(self, args: tuple, kwargs: dict):
        args, kwargs = self._model_args(args, kwargs)
        with self._active():
            try:
                return EM(self.model).e_step(*args, **kwargs)
            except ExactInferenceError as e:
                raise ExactInferenceError(
                    f"{e} This {self.method!r} result has no exact posterior or log p(x); "
                    "result.elbo(...) gives the ELBO, a lower bound on log p(x)."
                ) from None

    def _model_param_names(self, args: tuple, kwargs: dict) -> List[str]:
        """Parameters the model itself reads (not the guide's), plus point-estimated global latents."""
        with self._active(), poutine.block(), _fresh_rng():
            tr = poutine.trace(self.model).get_trace(*args, **kwargs)
            try:
                map_sites = list(inspect_model(self.model, args, kwargs).map_sites)
            except ExactInferenceError:
                map_sites = []
        names = [n for n, s in tr.nodes.items() if s["type"] == "param"] + map_sites
        return [n for n in dict.fromkeys(names) if n in self.state["params"]]


def _qualified_name(model: Optional[Callable]) -> Optional[str]:
    module, name = getattr(model, "__module__", None), getattr(model, "__qualname__", None)
    return f"{module}:{name}" if module and name else None


def _resolve_model(name: Optional[str]) -> Optional[Callable]:
    """A model of ``ppl_em.models`` named in a checkpoint; anything else is never imported."""
    match = re.fullmatch(r"ppl_em\.models\.(\w+):(\w+)", name or "")
    if match is None:
        return None
    import ppl_em.models as models

    if match.group(1) not in {m.name for m in pkgutil.iter_modules(models.__path__)}:
        return None
    return getattr(importlib.import_module(f"ppl_em.models.{match.group(1)}"), match.group(2), None)


def load(path: "os.PathLike[str] | str", model: Optional[Callable] = None) -> FitResult:
    """Read a checkpoint written by :meth:`FitResult.save` and put its parameters in the store.

    The file is read with ``torch.load(weights_only=True)``, which refuses anything but
    tensors and plain containers: a file crafted to run code on load raises instead.
    The param store is cleared first, so it holds exactly the checkpoint's parameters.

    Parameters
    ----------
    path : path-like
        The checkpoint.
    model : callable, optional
        The model the checkpoint was fitted with. Models of ``ppl_em.models`` are found from
        the checkpoint; any other must be passed for predict/score/sample to work.

    Returns
    -------
    FitResult
        With empty ``args``: pass the data to its methods.
    """
    try:
        payload = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # pickle.UnpicklingError, RuntimeError for a non-zip file, ...
        raise ValueError(f"{os.fspath(path)!r} is not a loadable ppl_em checkpoint: torch.load(weights_only=True) "
                         f"refused it ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}).") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not a ppl_em checkpoint (expected a dict with format={FORMAT!r}).")
    meta = json.loads(payload["meta"])
    cons = {n: _constraint_from_json(spec) for n, spec in meta["constraints"].items()}
    state = {"params": dict(payload["params"]), "constraints": cons}
    replace_store(state)
    result = FitResult.from_store(
        method=meta["method"], losses=meta["losses"], history=meta["history"], converged=meta["converged"],
        n_iter=meta["n_iter"], n_data=meta["n_data"], log_likelihood=meta["log_likelihood"],
        restarts=meta["restarts"], best=meta["best"], init=meta["init"],
        model=model if model is not None else _resolve_model(meta.get("model")),
    )
    return result
