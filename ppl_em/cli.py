"""The ``ppl-em`` command.

``ppl-em demo [--out DIR] [--quick]``
    Fit the Gaussian mixture (``ppl_em.models.gmm``) to the embedded Old Faithful data by EM,
    hard EM, SVI and an amortized guide; print log-likelihood, BIC, iterations and time;
    write the figures to DIR (default ``ppl_em_out/``).
``ppl-em fit MODEL --data FILE -k K [--method M] [--out DIR] [--json] [--max-iter N] [--seed S]``
    Fit a model of ``ppl_em.models`` to a .csv or .npy file of shape (n, d); write the
    checkpoint (``checkpoint.pt``, see :func:`ppl_em.load`), the history (``history.json``)
    and the figures to DIR; ``--json`` prints a machine-readable summary.
``ppl-em fit MODEL --data FILE --components A:B [--criterion bic|aic|heldout]``
    Fit every k from A to B (:func:`ppl_em.select`), print the table of criteria, choose k;
    write the chosen fit's checkpoint and figures, ``selection.json`` and ``selection.png``.
``ppl-em models``
    List the models ``fit`` accepts.

Bad input (a missing or malformed file, NaN, a wrong shape, K larger than the number of
points, an unknown model or method) prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import pkgutil
import sys
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyro
import torch

from .fit import INITS, METHODS, ConvergenceWarning, fit
from .result import FitResult, atomic_write

__all__ = ["main", "load_data", "resolve_model", "components_arg"]


class UsageError(Exception):
    """Bad command-line input: reported as one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print the usage and exit itself
        raise UsageError(message)


# -- input ----------------------------------------------------------------------------------
def load_data(path: str) -> torch.Tensor:
    """Read a (n, d) float64 tensor from a .csv (optional header line) or .npy file; validate it."""
    if not os.path.isfile(path):
        raise UsageError(f"data file {path!r} not found")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise UsageError(f"could not read {path!r} as a numeric .npy array ({e})") from None
    elif ext == ".csv":
        array = _read_csv(path)
    else:
        raise UsageError(f"data file {path!r}: expected a .csv or .npy file, got {ext or 'no extension'!r}")
    if array.dtype.kind not in "biuf":
        raise UsageError(f"data file {path!r}: expected numbers, got dtype {array.dtype}")
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise UsageError(f"data file {path!r}: expected a non-empty table of shape (n, d), got shape {array.shape}")
    bad = ~np.isfinite(array.astype(np.float64))
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise UsageError(f"data file {path!r} has {int(bad.sum())} NaN/inf value(s), the first at row {row}, "
                         f"column {col}; remove or impute them")
    return torch.tensor(array, dtype=torch.float64)


def _read_csv(path: str) -> np.ndarray:
    for skip in (0, 1):  # a header line is allowed
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # numpy warns on an empty file
                return np.loadtxt(path, delimiter=",", ndmin=2, skiprows=skip, dtype=np.float64)
        except ValueError as e:
            error = e
    raise UsageError(f"could not parse {path!r} as a numeric CSV table ({str(error).splitlines()[0]})")


def available_models() -> Dict[str, Tuple[Callable, Tuple[str, ...]]]:
    """Model name -> (model function, supported methods), from ``ppl_em.models.REGISTRY``.

    Without a registry, every module of ``ppl_em.models`` that defines ``model`` is listed,
    with every method.
    """
    import ppl_em.models as models

    registry = getattr(models, "REGISTRY", None)
    if registry:
        return {name: (entry["model"], tuple(entry.get("methods", METHODS))) for name, entry in registry.items()}
    found = {}
    for info in pkgutil.iter_modules(models.__path__):
        module = importlib.import_module(f"ppl_em.models.{info.name}")
        if callable(getattr(module, "model", None)):
            found[info.name] = (module.model, METHODS)
    return found


def resolve_model(name: str, method: str) -> Callable:
    """The model function for ``ppl-em fit NAME``: it must support ``method`` and take (x, k)."""
    models = available_models()
    if name not in models:
        raise UsageError(f"unknown model {name!r}; available: {', '.join(sorted(models))}")
    model, methods = models[name]
    if method not in methods:
        raise UsageError(f"model {name!r} does not support --method {method}; it supports: {', '.join(methods)}")
    params = list(inspect.signature(model).parameters)
    if params[1:2] != ["k"]:
        raise UsageError(f"model {name!r} is called as model({', '.join(params)}), not model(x, k); "
                         "fit it from Python with ppl_em.fit")
    return model


# -- commands -------------------------------------------------------------------------------
def _fit_quietly(model: Callable, *args: Any, **kwargs: Any) -> FitResult:
    """fit() with ConvergenceWarning turned into the result's ``converged`` flag."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return fit(model, *args, **kwargs)


def _summary(result: FitResult, x: torch.Tensor, k: int, seconds: float) -> Dict[str, Any]:
    try:
        loglik, bic, aic = result.score(x, k), result.bic(x, k), result.aic(x, k)
    except ValueError:  # no exact E-step (continuous local latents): report the ELBO instead
        loglik = bic = aic = None
    return {"method": result.method, "log_likelihood": loglik, "bic": bic, "aic": aic,
            "n_parameters": result.n_parameters(x, k), "n_iter": result.n_iter, "converged": result.converged,
            "seconds": round(result.history[-1]["time"], 3), "seconds_total": round(seconds, 3),
            "final_loss_per_observation": result.losses[-1] / result.n_data}


def _cluster_figure(path: str, result: FitResult, x: torch.Tensor, k: int, title: str,
                    labels: Sequence[str] = ("x_1", "x_2")) -> Optional[str]:
    """The responsibility scatter with ellipses, when the data are 2-D and z has an exact posterior."""
    from .plot import plot_clusters

    if x.shape[1] != 2:
        return None
    try:
        resp = result.predict_proba(x, k)
    except ValueError:
        return None
    if resp.numel() != x.shape[0] * resp.shape[-1]:  # one row of w per data row, in data order
        return None
    resp = resp.reshape(x.shape[0], -1)
    mu, Sigma = result.params.get("mu"), result.params.get("Sigma")
    if mu is not None and mu.shape != (k, 2):
        mu = None
    if Sigma is not None and Sigma.shape != (k, 2, 2):  # ellipses for full covariances only
        Sigma = None
    return plot_clusters(path, x, resp, mu, Sigma, title=title, labels=labels)


def components_arg(text: str):
    """``-k`` / ``--components``: ``K`` (one fit), ``A:B`` (every k from A to B, inclusive) or ``K1,K2,...``.

    Returns an int for one K, else the sorted list of the k to choose from.
    """
    try:
        if ":" in text:
            low, high = (int(part) for part in text.split(":"))
            ks = list(range(low, high + 1))
        elif "," in text:
            ks = sorted({int(part) for part in text.split(",")})
        else:
            return int(text)
    except ValueError:
        ks = []
    if not ks or ks[0] < 1:
        raise argparse.ArgumentTypeError(f"expected K, A:B with 1 <= A <= B, or K1,K2,... (positive integers), "
                                         f"got {text!r}; e.g. --components 1:10")
    return ks


def cmd_fit(ns: argparse.Namespace) -> int:
    from .plot import plot_training

    model = resolve_model(ns.model, ns.method)
    x = load_data(ns.data)
    if isinstance(ns.components, list):
        return cmd_select(ns, model, x)
    if not 1 <= ns.components <= len(x):
        raise UsageError(f"--components must be between 1 and the number of data points ({len(x)}), "
                         f"got {ns.components}")
    os.makedirs(ns.out, exist_ok=True)
    _small_problem_threads(x)
    start = time.perf_counter()
    result = _fit_quietly(model, x, ns.components, method=ns.method, max_iter=ns.max_iter, seed=ns.seed,
                          n_init=ns.n_init, init=ns.init, progress=None if not ns.json else False)
    summary = dict(_summary(result, x, ns.components, time.perf_counter() - start), model=ns.model,
                   data=ns.data, n=len(x), d=x.shape[1], components=ns.components)
    files = [result.save(os.path.join(ns.out, "checkpoint.pt")),
             _write_json(os.path.join(ns.out, "history.json"), {"summary": summary, "history": result.history}),
             plot_training(os.path.join(ns.out, "training.png"), {ns.method: result})]
    clusters = _cluster_figure(os.path.join(ns.out, "clusters.png"), result, x, ns.components,
                               f"{ns.model}, {ns.method}, k = {ns.components}")
    summary["files"] = files + ([clusters] if clusters else [])
    if ns.json:
        print(json.dumps(summary, indent=2))
    else:
        print(_table([summary]))
        print("wrote " + ", ".join(summary["files"]))
    return 0


def cmd_select(ns: argparse.Namespace, model: Callable, x: torch.Tensor) -> int:
    """``ppl-em fit MODEL --components A:B``: every k fitted, the table, the chosen fit and its figures."""
    from .model_selection import select
    from .plot import plot_selection, plot_training

    if ns.components[-1] > len(x):
        raise UsageError(f"--components must lie between 1 and the number of data points ({len(x)}), "
                         f"got up to {ns.components[-1]}")
    if ns.criterion == "heldout" and ns.model.startswith("hmm"):
        raise UsageError(f"--criterion heldout holds out random rows, but model {ns.model!r} reads the rows as one "
                         "time series; use --criterion bic or aic")
    os.makedirs(ns.out, exist_ok=True)
    _small_problem_threads(x)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # the table's conv column reports it
        selection = select(model, x, k=ns.components, criterion=ns.criterion, method=ns.method,
                           max_iter=ns.max_iter, seed=ns.seed, n_init=ns.n_init, init=ns.init, progress=False)
    k, best = selection.best_k, selection.best
    summary = {"model": ns.model, "data": ns.data, "n": len(x), "d": x.shape[1], "method": ns.method,
               "criterion": ns.criterion, "chosen_k": k, "split": selection.split, "rows": selection.rows,
               "seconds_total": round(time.perf_counter() - start, 3)}
    files = [best.save(os.path.join(ns.out, "checkpoint.pt")),
             _write_json(os.path.join(ns.out, "selection.json"), summary),
             plot_selection(os.path.join(ns.out, "selection.png"), selection),
             plot_training(os.path.join(ns.out, "training.png"), {f"{ns.method}, k = {k}": best})]
    clusters = _cluster_figure(os.path.join(ns.out, "clusters.png"), best, x, k, f"{ns.model}, {ns.method}, k = {k}")
    summary["files"] = files + ([clusters] if clusters else [])
    if ns.json:
        print(json.dumps(summary, indent=2))
    else:
        print(selection.table())
        print("wrote " + ", ".join(summary["files"]))
    return 0


def _write_json(path: str, obj: Any) -> str:
    return atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def _table(rows: List[Dict[str, Any]]) -> str:
    """A fixed-width table: method, mean log p(x), BIC, iterations, converged, seconds of iterations."""
    def num(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    lines = [f"{'method':<12} {'log p(x)/n':>11} {'BIC':>10} {'iter':>5} {'conv':>5} {'time (s)':>9}"]
    for r in rows:
        lines.append(f"{r.get('label', r['method']):<12} {num(r['log_likelihood'], '.5f'):>11} "
                     f"{num(r['bic'], '.2f'):>10} {r['n_iter']:>5} {'yes' if r['converged'] else 'no':>5} "
                     f"{r['seconds']:>9.2f}")
    return "\n".join(lines)


DEMO_FITS = (  # label, method, extra fit options
    ("EM", "em", {}),
    ("hard EM", "hard_em", {}),
    ("SVI", "svi", {"log_px_every": 10}),
    ("amortized", "vae", {"log_px_every": 10}),
)
FAITHFUL_AXES = ("eruption duration (min)", "waiting time (min)")


def _small_problem_threads(x: torch.Tensor) -> None:
    """One intra-op thread for small data: on tiny tensors extra threads only synchronise.

    On a shared 2-core machine a second thread made the Old Faithful fits 5-10x slower.
    """
    if x.numel() < 100_000:
        torch.set_num_threads(1)


def cmd_demo(ns: argparse.Namespace) -> int:
    """GMM (k = 2, full covariances) on Old Faithful, four ways; a table and the figures."""
    from .datasets import load_old_faithful
    from .models import gmm
    from .plot import plot_elbo_gap, plot_training

    x, k = load_old_faithful(), 2
    _small_problem_threads(x)
    # torch imports its compiler (~3 s) at the first optimiser construction: not part of any fit's time.
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    os.makedirs(ns.out, exist_ok=True)
    results, rows = {}, []
    for label, method, options in DEMO_FITS:
        max_iter = {"em": 100, "hard_em": 100}.get(method, 60 if ns.quick else 500)
        if method in ("svi", "vae"):  # Adam at lr 0.1 reaches EM's optimum here in about 250 steps
            options = dict(options, optim=pyro.optim.Adam({"lr": 0.1}))
        start = time.perf_counter()
        results[label] = _fit_quietly(gmm.model, x, k, method=method, max_iter=max_iter, seed=ns.seed,
                                      progress=False, **options)
        rows.append(dict(_summary(results[label], x, k, time.perf_counter() - start), label=label))
    print(f"Gaussian mixture, k = {k}, full covariances, on Old Faithful (n = {len(x)}, d = 2)")
    print(_table(rows))
    files = [_cluster_figure(os.path.join(ns.out, "clusters_em.png"), results["EM"], x, k,
                             "Old Faithful, EM: colour = responsibility w_j^(i)", FAITHFUL_AXES),
             plot_training(os.path.join(ns.out, "training.png"), results),
             plot_elbo_gap(os.path.join(ns.out, "elbo_gap.png"), results),
             _write_json(os.path.join(ns.out, "summary.json"), rows)]
    files.insert(1, _cluster_figure(os.path.join(ns.out, "clusters_svi.png"), results["SVI"], x, k,
                                    "Old Faithful, SVI: colour = exact responsibility w_j^(i)", FAITHFUL_AXES))
    print("wrote " + ", ".join(f for f in files if f))
    return 0


def cmd_models(ns: argparse.Namespace) -> int:
    for name, (model, methods) in sorted(available_models().items()):
        doc = (getattr(model, "__doc__", None) or "").strip().splitlines()
        print(f"{name:<18} {','.join(methods):<20} {doc[0] if doc else ''}")
    return 0


# -- entry point ----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ppl-em", description="Fit latent-variable models written as plain Pyro programs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = sub.add_parser("demo", help="GMM on Old Faithful by EM, hard EM, SVI and an amortized guide")
    demo.add_argument("--out", default="ppl_em_out", help="folder for the figures (default: ppl_em_out)")
    demo.add_argument("--quick", action="store_true", help="fewer SVI iterations (a smoke test)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)
    f = sub.add_parser("fit", help="fit a model of ppl_em.models to a .csv or .npy file")
    f.add_argument("model", help="a model name (see `ppl-em models`), e.g. gmm")
    f.add_argument("--data", required=True, help="a .csv (optional header line) or .npy file of shape (n, d)")
    f.add_argument("-k", "--components", type=components_arg, required=True,
                   help="number of components K; A:B (or K1,K2,...) fits every k and chooses one by --criterion")
    f.add_argument("--criterion", default="bic", choices=("bic", "aic", "heldout"),
                   help="how --components A:B chooses k (default: bic)")
    f.add_argument("--method", default="em", choices=METHODS)
    f.add_argument("--init", default="kmeans++", choices=INITS)
    f.add_argument("--n-init", type=int, default=1, help="restarts; the best is kept (default 1)")
    f.add_argument("--out", default="ppl_em_out", help="output folder (default: ppl_em_out)")
    f.add_argument("--json", action="store_true", help="print a machine-readable summary")
    f.add_argument("--max-iter", type=int, default=None)
    f.add_argument("--seed", type=int, default=0)
    f.set_defaults(func=cmd_fit)
    sub.add_parser("models", help="list the models `fit` accepts").set_defaults(func=cmd_models)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``ppl-em`` command; returns the exit status (0, or 2 for bad input)."""
    try:
        ns = build_parser().parse_args(argv)
        if getattr(ns, "max_iter", None) is not None and ns.max_iter < 1:
            raise UsageError(f"--max-iter must be >= 1, got {ns.max_iter}")
        if getattr(ns, "n_init", 1) < 1:
            raise UsageError(f"--n-init must be >= 1, got {ns.n_init}")
        return ns.func(ns)
    except (UsageError, ValueError) as e:  # ValueError: the library's own diagnostics of bad input
        print(f"ppl-em: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`ppl-em fit ... | head -1`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
