"""Choosing the number of components k: fit the model for every k, score each fit, keep the best.

The log-likelihood l(theta) = log p(x; theta) cannot choose k by itself: a mixture with k + 1
components contains the one with k (give the extra component phi_{k+1} = 0), so the maximised
l(theta_k) never falls as k grows. Each criterion below trades l(theta_k) against the
number p_k of free parameters of the k-component model:

``"bic"``
    BIC(k) = -2 l(theta_k) + p_k log n (Schwarz, 1978), lower is better. Consistent: with
    enough data it picks the true k of data drawn from the model.
``"aic"``
    AIC(k) = -2 l(theta_k) + 2 p_k (Akaike, 1974), lower is better. A lighter penalty: it
    tends to choose larger k than BIC.
``"heldout"``
    (1/m) log p(x_test; theta_k), the mean log-likelihood of m held-out data points that the
    fit never saw, theta_k fitted on the rest; higher is better. The split is a seeded random
    permutation of the data points, the same for every k.

n is the number of observations (:func:`ppl_em.result.count_observations`) and p_k counts each
parameter's degrees of freedom under its constraint (:func:`ppl_em.result.free_parameters`).
Every fit is an ordinary :func:`ppl_em.fit` with the same options and seed; ties go to the
smaller k.

References: lecture notes, "density estimation", "EM algorithm"; Schwarz, "Estimating the
dimension of a model", Ann. Stat. 1978; Akaike, IEEE TAC 1974; McLachlan & Peel, "Finite
Mixture Models", 2000, chapter 6.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import pyro
import torch

from .fit import ConvergenceWarning, fit
from .posterior import ExactInferenceError
from .result import FitResult

__all__ = ["select", "Selection", "CRITERIA", "split_data"]

CRITERIA = ("bic", "aic", "heldout")
LOWER_IS_BETTER = {"bic": True, "aic": True, "heldout": False}


@dataclass
class Selection:
    """Every fit of a search over k, the criterion of each, and the chosen k.

    Attributes
    ----------
    criterion : {"bic", "aic", "heldout"}
        What chose k (see the module docstring).
    ks : list of int
        The numbers of components tried, in increasing order.
    scores : dict of int to float
        The criterion for each k.
    best_k : int
        The chosen k: the lowest BIC or AIC, or the highest held-out mean log-likelihood.
    results : dict of int to FitResult
        The fit for each k (for ``"heldout"``: fitted on the training part only).
    best : FitResult
        The chosen fit; for ``"heldout"`` with ``refit=True``, refitted on all the data.
    rows : list of dict
        One row per k: ``k``, ``n_parameters``, ``log_likelihood`` ((1/n) log p(x; theta_k) on
        the data the fit saw), ``bic``, ``aic``, ``heldout`` (None unless computed),
        ``n_iter``, ``converged``.
    split : dict or None
        For ``"heldout"``: ``seed``, ``test_size``, ``n_train``, ``n_test``.

    Examples
    --------
    >>> import ppl_em
    >>> from ppl_em.models import gmm
    >>> from ppl_em.datasets import load_old_faithful
    >>> x = load_old_faithful()                       # (272, 2)
    >>> selection = ppl_em.select(gmm.model, x, k=range(1, 5), tol=1e-4, progress=False)
    >>> selection.best_k, sorted(selection.results)
    (2, [1, 2, 3, 4])
    >>> selection.best is selection.results[2]
    True
    """

    criterion: str
    ks: List[int]
    scores: Dict[int, float]
    best_k: int
    results: Dict[int, FitResult] = field(repr=False)
    best: FitResult = field(repr=False)
    rows: List[Dict[str, Any]] = field(default_factory=list, repr=False)
    split: Optional[Dict[str, Any]] = None

    @property
    def lower_is_better(self) -> bool:
        """True for BIC and AIC, False for the held-out log-likelihood."""
        return LOWER_IS_BETTER[self.criterion]

    def table(self) -> str:
        """A fixed-width table, one line per k; the chosen k is marked with ``*``."""
        def num(v: Optional[float], fmt: str) -> str:
            return "n/a" if v is None else format(v, fmt)

        order = "lower" if self.lower_is_better else "higher"
        lines = [f"criterion: {self.criterion} ({order} is better); chosen k = {self.best_k}",
                 f"  {'k':>4} {'params':>7} {'log p(x)/n':>11} {'BIC':>11} {'AIC':>11} {'held-out/n':>11} "
                 f"{'iter':>5} {'conv':>5}"]
        for r in self.rows:
            mark = "*" if r["k"] == self.best_k else " "
            lines.append(f"{mark} {r['k']:>4} {r['n_parameters']:>7} {num(r['log_likelihood'], '.5f'):>11} "
                         f"{num(r['bic'], '.2f'):>11} {num(r['aic'], '.2f'):>11} {num(r['heldout'], '.5f'):>11} "
                         f"{r['n_iter']:>5} {'yes' if r['converged'] else 'no':>5}")
        return "\n".join(lines)


def select(
    model: Callable,
    *args: Any,
    k: Iterable[int] = range(1, 11),
    criterion: str = "bic",
    n_init: int = 1,
    seed: int = 0,
    test_size: float = 0.25,
    refit: bool = True,
    **kwargs: Any,
) -> Selection:
    """Fit ``model`` for every number of components in ``k`` and choose one by ``criterion``.

    Parameters
    ----------
    model : callable
        A Pyro model that takes the number of components as a keyword argument ``k``, e.g.
        ``ppl_em.models.gmm.model(x, k)``; it is called as ``model(*args, k=k_j, **kwargs)``.
    *args
        Model arguments, e.g. the data x of shape (n, d).
    k : iterable of int
        The numbers of components to try (default 1, ..., 10).
    criterion : {"bic", "aic", "heldout"}
        How to choose (see the module docstring).
    n_init : int
        Restarts per k (:func:`ppl_em.fit`); the best of them is that k's fit.
    seed : int
        Seed of every fit, and of the held-out split.
    test_size : float
        For ``"heldout"``: the fraction of data points held out, in (0, 1).
    refit : bool
        For ``"heldout"``: refit the chosen k on all the data (``Selection.best``).
    **kwargs
        Options of :func:`ppl_em.fit` (``method``, ``max_iter``, ``tol``, ``init``,
        ``em_options``, ...) and further model arguments, passed to every fit.

    Returns
    -------
    Selection
        Every fit, the criterion for each k, the chosen k and its fit.

    Raises
    ------
    ValueError
        For an empty or non-positive ``k``, an unknown ``criterion``, a model without a ``k``
        argument, or a ``test_size`` that leaves no data on one side.
    ExactInferenceError
        If the model has no exact log p(x) (continuous local latents, as in a VAE).

    Warns
    -----
    ConvergenceWarning
        Once, naming every k whose fit did not converge within ``max_iter``.

    Notes
    -----
    Held-out split: every tensor argument whose first dimension is the data's n (the first
    dimension of the first tensor argument) is split along it by the same permutation: the
    rows of x (and any per-row labels), the sequences of an HMM's (S, T, d) data, the words of
    a topic model's (words, doc) pair.
    """
    ks = _check_ks(k)
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}. Use 'bic' (the default) "
                         "or 'aic' on the fitted data, or 'heldout' for the log-likelihood of held-out points.")
    _check_takes_k(model)
    split, (train_args, train_kwargs), test = None, (args, kwargs), None
    if criterion == "heldout":
        (train_args, train_kwargs), test, split = split_data(args, kwargs, test_size, seed)
    results: Dict[int, FitResult] = {}
    rows = []
    for kk in ks:
        results[kk] = _fit_quietly(model, train_args, dict(train_kwargs, k=kk), n_init, seed)
        rows.append(_row(kk, results[kk], test))
    scores = {r["k"]: r[criterion] for r in rows}
    sign = 1.0 if LOWER_IS_BETTER[criterion] else -1.0
    best_k = min(ks, key=lambda kk: (sign * scores[kk], kk))
    _warn_unconverged(rows)
    best = results[best_k]
    if criterion == "heldout" and refit:
        best = _fit_quietly(model, args, dict(kwargs, k=best_k), n_init, seed)
        _warn_unconverged([_summary_row(best_k, best)])
    return Selection(criterion=criterion, ks=ks, scores=scores, best_k=best_k, results=results, best=best,
                     rows=rows, split=split)


def _check_ks(k: Iterable[int]) -> List[int]:
    try:
        ks = sorted(set(int(kk) for kk in k))
    except (TypeError, ValueError):
        raise ValueError(f"k must be an iterable of integers, e.g. range(1, 11), got {k!r}.") from None
    if not ks or ks[0] < 1 or any(float(kk) != int(kk) for kk in k):
        raise ValueError(f"k must hold at least one integer >= 1, e.g. range(1, 11), got {list(k)!r}.")
    return ks


def _check_takes_k(model: Callable) -> None:
    try:
        params = inspect.signature(model).parameters
    except (TypeError, ValueError):  # a builtin or C callable: let the call itself decide
        return
    if "k" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    name = getattr(model, "__qualname__", repr(model))
    raise ValueError(f"select passes the number of components as model(..., k=K), but {name}"
                     f"({', '.join(params)}) takes no argument k. Give the model a k argument, or fit "
                     "each variant yourself with ppl_em.fit and compare result.bic().")


def _fit_quietly(model: Callable, args: tuple, kwargs: dict, n_init: int, seed: int) -> FitResult:
    """One fit; its ConvergenceWarning is folded into the row (``converged``) and warned once at the end.

    Each fit runs in a param store of its own: the previous k's parameters, of other shapes, must
    not be seen by the next fit's first look at the model, and the caller's store is left as it was.
    """
    with warnings.catch_warnings(), pyro.get_param_store().scope():
        warnings.simplefilter("ignore", ConvergenceWarning)
        result = fit(model, *args, n_init=n_init, seed=seed, **kwargs)
    if result.log_likelihood is None:
        raise ExactInferenceError(
            "select needs the exact log p(x; theta) of every fit, but this model has no exact E-step "
            "(a continuous latent inside the data plate, as in a VAE). Compare such fits by their ELBO "
            "(result.elbo()) on held-out data instead.")
    return result


def _summary_row(kk: int, result: FitResult) -> Dict[str, Any]:
    return {"k": kk, "n_parameters": result.n_parameters(), "log_likelihood": result.log_likelihood,
            "n_iter": result.n_iter, "converged": result.converged}


def _row(kk: int, result: FitResult, test: Optional[Tuple[tuple, dict]]) -> Dict[str, Any]:
    row = dict(_summary_row(kk, result), bic=result.bic(), aic=result.aic(), heldout=None)
    if test is not None:  # the fit's own model arguments, with the held-out part of each split tensor
        test_args, test_kwargs = test
        row["heldout"] = result.score(*test_args, **{n: test_kwargs.get(n, v) for n, v in result.kwargs.items()})
    return row


def _warn_unconverged(rows: List[Dict[str, Any]]) -> None:
    late = [r["k"] for r in rows if not r["converged"]]
    if late:
        warnings.warn(f"the fits for k = {', '.join(map(str, late))} did not converge within max_iter; their "
                      "criterion may be off. Increase max_iter, loosen tol, or try more restarts (n_init).",
                      ConvergenceWarning, stacklevel=3)


# -- held-out split -------------------------------------------------------------------------
def split_data(args: tuple, kwargs: dict, test_size: float = 0.25,
               seed: int = 0) -> Tuple[Tuple[tuple, dict], Tuple[tuple, dict], Dict[str, Any]]:
    """Split model arguments into a training and a held-out part by a seeded permutation.

    Every tensor among ``args`` and the values of ``kwargs`` whose first dimension equals n,
    the first dimension of the first tensor argument, is indexed by the same random
    permutation of range(n): the last ``round(test_size * n)`` (at least 1) indices are held out.

    Returns
    -------
    (train_args, train_kwargs), (test_args, test_kwargs), info
        ``info`` holds ``seed``, ``test_size``, ``n_train`` and ``n_test``.

    Examples
    --------
    >>> x = torch.arange(10.0)[:, None]
    >>> (train, _), (test, _), info = split_data((x, 2), {}, test_size=0.3, seed=0)
    >>> train[0].shape, test[0].shape, train[1]
    (torch.Size([7, 1]), torch.Size([3, 1]), 2)
    """
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must be a fraction in (0, 1), got {test_size!r}; e.g. 0.25 holds out a quarter.")
    first = next((a for a in list(args) + list(kwargs.values()) if torch.is_tensor(a) and a.dim() >= 1), None)
    if first is None:
        raise ValueError("a held-out split needs the data among the model arguments, as a tensor whose first "
                         "dimension indexes the data points; got none.")
    n = first.shape[0]
    n_test = max(1, int(round(test_size * n)))
    if n - n_test < 1:
        raise ValueError(f"test_size={test_size} holds out all {n} data points; use a smaller test_size or more data.")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    parts = []
    for index in (perm[: n - n_test].sort().values, perm[n - n_test:].sort().values):
        def take(a: Any) -> Any:
            return a[index.to(a.device)] if torch.is_tensor(a) and a.dim() >= 1 and a.shape[0] == n else a
        parts.append((tuple(take(a) for a in args), {name: take(v) for name, v in kwargs.items()}))
    return parts[0], parts[1], {"seed": seed, "test_size": test_size, "n_train": n - n_test, "n_test": n_test}
