"""The ``ppl-em`` command.

``ppl-em demo [--out DIR] [--quick]``
    Fit the Gaussian mixture (``ppl_em.models.gmm``) to the embedded Old Faithful data by EM,
    hard EM, SVI and an amortized guide; print log-likelihood, BIC, iterations and time;
    write the figures to DIR (default ``ppl_em_out/``).
``ppl-em fit MODEL --data FILE -k K [--method M] [--out DIR] [--json] [--max-iter N] [--seed S]``
    Fit a model of ``ppl_em.models`` to a .csv or .npy file of shape (n, d); write the
    checkpoint (``checkpoint.pt``, see :func:`ppl_em.load`), the history (``history.json``)
    and the figures to DIR; ``--json`` prints a machine-readable summary. A .npy file is
    memory-mapped: one larger than :data:`IN_MEMORY_BYTES` is never loaded, but read in batches
    (``--batch-size`` rows) in every iteration (:mod:`ppl_em.sources`). ``--method online_em`` is
    stepwise EM. Under ``torchrun --nproc-per-node=N -m ppl_em.cli fit ... --distributed`` every
    rank memory-maps its contiguous shard of the rows and EM sums the ranks' statistics
    (:mod:`ppl_em.distributed`); rank 0 writes the outputs and prints.
    ``--missing marginalize`` fits data with missing values (empty CSV fields, NaN) by marginalising
    them out (:func:`ppl_em.fit`'s ``missing``); without it they are an error.
``ppl-em fit MODEL --data FILE --components A:B [--criterion bic|aic|heldout]``
    Fit every k from A to B (:func:`ppl_em.select`), print the table of criteria, choose k;
    write the chosen fit's checkpoint and figures, ``selection.json`` and ``selection.png``.
``ppl-em models``
    List the models ``fit`` accepts.

Bad input (a missing or malformed file, NaN, a wrong shape, K larger than the number of
points, an unknown model or method, an ``--out`` that cannot be written) and the library's own
diagnostics (a singular fit, a gradient M-step that cannot move) print one line on stderr and exit with status 2; Ctrl-C prints
one line and exits with status 130. The outputs of a run appear together when it succeeds,
and not at all otherwise (:class:`Outputs`).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import inspect
import json
import math
import os
import pkgutil
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyro
import torch

from . import distributed as distributed_, sources
from .fit import INITS, METHODS, ConvergenceWarning, fit
from .gradient import StalledError
from .checkpoint import atomic_write, clean_stale_partials, partial_prefix, sync_directory
from .result import FitResult
from .validation import MAX_SEED

__all__ = ["main", "load_data", "resolve_model", "components_arg", "IN_MEMORY_BYTES"]

# A .npy file whose data take more bytes than this is read from its memory map batch by batch in
# every iteration; a smaller one is copied into memory once.
IN_MEMORY_BYTES = 256 * 2**20


class UsageError(Exception):
    """Bad command-line input: reported as one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print the usage and exit itself
        raise UsageError(message)


# -- input ----------------------------------------------------------------------------------
def load_data(path: str, shard: Optional[Tuple[int, int]] = None, missing: str = "error"):
    """Read (n, d) float64 data from a .csv (optional header line) or .npy file; validate it.

    Returns a tensor, or for a .npy file whose data exceed :data:`IN_MEMORY_BYTES` a
    :class:`ppl_em.Rows` source over its memory map (float64 batches). ``shard = (rank, world)``: only
    that rank's contiguous share of the rows. Positions in errors count from 0 for a .npy array's rows
    and from 1 for a .csv file's lines (the header included) and columns, as an editor shows them.
    An empty CSV field, and ``nan``, is a missing value, NaN in the tensor: an error unless
    ``missing="marginalize"``, and then still an error for a row or a column without any observed
    value. An inf is always an error.
    """
    _check_data_path(path)
    ext = os.path.splitext(path)[1].lower()
    lines = None
    if ext == ".npy":
        array = _read_npy(path)
    elif ext == ".csv":
        array, lines = _read_csv(path)
    else:
        raise UsageError(f"data file {path!r}: expected a .csv or .npy file, got {ext or 'no extension'!r}")
    if array.dtype.kind not in "biuf":
        raise UsageError(f"data file {path!r}: expected numbers, got dtype {array.dtype}")
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise UsageError(f"data file {path!r}: expected a non-empty table of shape (n, d), got shape {array.shape}")
    _check_finite(path, array, lines, missing)
    if shard is not None:
        array = array[sources.shard_range(len(array), *shard)]
    if isinstance(array, np.memmap) and array.nbytes > IN_MEMORY_BYTES:
        return sources.Rows(array, dtype=torch.float64)
    return torch.tensor(np.asarray(array), dtype=torch.float64)


def _check_data_path(path: str) -> None:
    if not os.path.lexists(path):
        raise UsageError(f"data file {path!r} not found")
    if os.path.isdir(path):
        raise UsageError(f"data file {path!r} is a folder; expected a .csv or .npy file")
    if not os.path.isfile(path):
        raise UsageError(f"data file {path!r} is not a regular file (a FIFO, socket, device or broken link); "
                         "expected a .csv or .npy file")


def _check_finite(path: str, array: np.ndarray, lines: Optional[List[int]], missing: str = "error") -> None:
    """No NaN (unless ``missing="marginalize"``) or inf, checked in blocks of rows (a memory map is read
    once, never copied whole); with missing values, no row or column without an observed value."""
    block = max(1, 2**22 // max(1, array.shape[1]))
    count, first = 0, None
    empty_rows, first_empty, any_seen = 0, None, np.zeros(array.shape[1], dtype=bool)
    for start in range(0, len(array), block):
        values = np.asarray(array[start:start + block], dtype=np.float64)
        bad = np.isinf(values) if missing == "marginalize" else ~np.isfinite(values)
        if bad.any():
            count += int(bad.sum())
            if first is None:
                row, col = (int(i) for i in np.argwhere(bad)[0])
                first = (start + row, col)
        if missing == "marginalize":
            nan = np.isnan(values)
            empty = np.flatnonzero(nan.all(1))
            if len(empty) and first_empty is None:
                first_empty = start + int(empty[0])
            empty_rows += len(empty)
            any_seen |= ~nan.all(0)
    if count:
        where = _position(first, lines)
        what = "inf value(s) (a missing value is an empty field or NaN)" if missing == "marginalize" else \
            "NaN/inf value(s)"
        hint = "" if missing == "marginalize" else \
            " (or, for missing values, pass --missing marginalize: gmm, kmeans, bernoulli_mixture, poisson_mixture)"
        raise UsageError(f"data file {path!r} has {count} {what}, the first at {where}; remove or impute them{hint}")
    if missing == "marginalize":
        _check_missing(path, first_empty, empty_rows, ~any_seen, lines)


def _position(index, lines: Optional[List[int]]) -> str:
    row, col = (int(i) for i in index)
    return f"row {row}, column {col}" if lines is None else f"line {lines[row]}, column {col + 1}"


def _check_missing(path: str, first_row: Optional[int], n_rows: int, empty_cols: np.ndarray,
                   lines: Optional[List[int]]) -> None:
    """A row, or a column, with no observed value says nothing about the parameters: an error."""
    if n_rows:
        row = first_row
        where = f"row {row}" if lines is None else f"line {lines[row]}"
        raise UsageError(f"data file {path!r} has {n_rows} row(s) with every value missing, the first "
                         f"at {where}; drop them (they say nothing about the parameters)")
    if empty_cols.any():
        col = int(np.argmax(empty_cols))
        where = f"column {col}" if lines is None else f"column {col + 1}"
        raise UsageError(f"data file {path!r} has {int(empty_cols.sum())} column(s) with every value missing, "
                         f"the first is {where}; drop them (nothing determines their parameters)")


def _read_npy(path: str) -> np.ndarray:
    """np.load of a .npy file, after checking that it is one and that its header fits the file."""
    try:
        with open(path, "rb") as f:
            _check_npy_header(path, f, os.fstat(f.fileno()).st_size)
        return np.load(path, mmap_mode="r", allow_pickle=False)  # read as the fit needs it, never whole
    except OSError as e:
        raise UsageError(f"could not read {path!r}: {e.strerror or e}") from None
    except (ValueError, EOFError) as e:
        raise UsageError(f"could not read {path!r} as a numeric .npy array ({str(e).splitlines()[0]})") from None


def _check_npy_header(path: str, f, size: int) -> None:
    if size == 0:
        raise UsageError(f"data file {path!r} is empty (0 bytes); expected an array written by numpy.save")
    if f.read(4) == b"PK\x03\x04":
        raise UsageError(f"data file {path!r} is an .npz archive (a zip of arrays), not a .npy array; save the "
                         "one array to fit with numpy.save(path, x)")
    f.seek(0)
    version = np.lib.format.read_magic(f)
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        return  # a newer header: np.load checks it
    shape, _, dtype = readers[version](f)
    if dtype.hasobject:
        raise UsageError(f"data file {path!r} holds Python objects (dtype {dtype}); expected numbers")
    needed, present = math.prod(shape) * dtype.itemsize, size - f.tell()
    if needed > present:
        raise UsageError(f"data file {path!r} is truncated or damaged: its header declares shape {shape} of "
                         f"{dtype} ({needed} bytes of data), but the file holds only {present} bytes of data")


def _read_csv(path: str) -> Tuple[np.ndarray, List[int]]:
    """The table, and the file line (from 1) of each of its rows."""
    try:
        header = _has_header(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy warns on an empty file
            try:
                array = np.loadtxt(path, delimiter=",", ndmin=2, skiprows=int(header), dtype=np.float64)
            except ValueError:  # an empty field is a missing value: parse again, slower, with NaN there
                array = np.loadtxt(path, delimiter=",", ndmin=2, skiprows=int(header), dtype=np.float64,
                                   converters=_field)
    except OSError as e:
        raise UsageError(f"could not read {path!r}: {e.strerror or e}") from None
    except ValueError:
        raise UsageError(f"could not parse {path!r} as a numeric CSV table: {_csv_problem(path, header)}") from None
    return array, _data_lines(path, header)


def _field(text: str) -> float:
    """One CSV field as a number; an empty field is a missing value, NaN."""
    text = text.strip()
    return float(text) if text else math.nan


def _csv_lines(path: str) -> Iterator[Tuple[int, List[str]]]:
    """(line number from 1, fields) of every line that is not blank or a # comment."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            text = line.split("#", 1)[0].strip()
            if text:
                yield number, [field.strip() for field in text.split(",")]


def _is_number(field: str) -> bool:
    try:
        _field(field)
    except ValueError:
        return False
    return True


def _has_header(path: str) -> bool:
    """Whether the file's first line is a header: some field of it is not a number."""
    first = next(_csv_lines(path), None)
    return first is not None and first[0] == 1 and not all(map(_is_number, first[1]))


def _data_lines(path: str, header: bool) -> List[int]:
    return [number for number, _ in _csv_lines(path) if not (header and number == 1)]


def _csv_problem(path: str, header: bool) -> str:
    """Where the table breaks: the first field that is not a number, or a line of another width."""
    width = None
    for number, fields in _csv_lines(path):
        if header and number == 1:
            continue
        if width is not None and len(fields) != width[1]:
            return f"line {number} has {len(fields)} field(s), line {width[0]} has {width[1]}"
        width = width or (number, len(fields))
        for column, field in enumerate(fields, 1):
            if not _is_number(field):
                return f"line {number}, column {column}: {field!r} is not a number"
    return "no numeric table found"


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
    if "em" in methods:  # stepwise EM runs wherever EM does (closed forms from statistics)
        methods = tuple(methods) + ("online_em",)
    if method not in methods:
        raise UsageError(f"model {name!r} does not support --method {method}; it supports: {', '.join(methods)}")
    params = list(inspect.signature(model).parameters)
    if params[1:2] != ["k"]:
        raise UsageError(f"model {name!r} is called as model({', '.join(params)}), not model(x, k); "
                         "fit it from Python with ppl_em.fit")
    return model


# -- output ---------------------------------------------------------------------------------
class Outputs:
    """The files of one command, all or none: written into a hidden staging folder inside
    ``--out`` and moved into place together when the command succeeds.

    On an error or Ctrl-C the staging folder is removed, and so is ``--out`` itself if this run
    created it: nothing partial is left. ``--out`` is created and checked for writing before any
    fit starts, so a bad folder fails in a second rather than after the fit.
    """

    def __init__(self, out: str) -> None:
        self.out = out
        self.created = _make_folder(out)
        clean_stale_partials(out)
        try:
            self.stage = tempfile.mkdtemp(prefix=partial_prefix("ppl-em"), dir=out)
        except OSError as e:
            _remove_empty(self.created)
            raise UsageError(f"cannot write to --out {out!r}: {e.strerror or e}") from None

    def path(self, name: str) -> str:
        """Where to write output ``name`` during the command."""
        return os.path.join(self.stage, name)

    def final(self, path: str) -> str:
        """Where a file written at ``path`` (see :meth:`path`) will be once the command succeeds."""
        return os.path.join(self.out, os.path.basename(path))

    def __enter__(self) -> "Outputs":
        return self

    def __exit__(self, kind, error, tb) -> None:
        try:
            if kind is None:
                self._commit()
                return
        except OSError as e:
            error = e
        shutil.rmtree(self.stage, ignore_errors=True)
        _remove_empty(self.created)
        if isinstance(error, OSError):  # a full disk, a folder removed under us: one line, not a traceback
            raise UsageError(f"could not write the output to --out {self.out!r}: {error.strerror or error}") from None

    def _commit(self) -> None:
        with _sigint_deferred():  # move the whole set, or (interrupted before) none of it
            for name in sorted(os.listdir(self.stage)):
                os.replace(os.path.join(self.stage, name), os.path.join(self.out, name))
            os.rmdir(self.stage)
        sync_directory(self.out)


def _make_folder(out: str) -> List[str]:
    """Create ``out`` and any missing parents; returns those created, deepest first."""
    if os.path.isdir(out):
        return []
    if os.path.lexists(out):
        raise UsageError(f"--out {out!r} exists and is not a folder; pass the path of a folder")
    missing, folder = [], os.path.abspath(out)
    while not os.path.lexists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise UsageError(f"--out {out!r} lies under {folder!r}, which is a file, not a folder")
    try:
        os.makedirs(out)
    except OSError as e:
        _remove_empty(missing)
        raise UsageError(f"cannot create --out {out!r}: {e.strerror or e}") from None
    return missing


def _remove_empty(folders: List[str]) -> None:
    for folder in folders:  # deepest first; a folder that is not empty stays
        with contextlib.suppress(OSError):
            os.rmdir(folder)


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) back for the duration of the block, where the platform allows."""
    mask = getattr(signal, "pthread_sigmask", None)
    if mask is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    before = mask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        mask(signal.SIG_SETMASK, before)


# -- commands -------------------------------------------------------------------------------
def _fit_quietly(model: Callable, *args: Any, **kwargs: Any) -> FitResult:
    """fit() with ConvergenceWarning turned into the result's ``converged`` flag."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return fit(model, *args, **kwargs)


def _summary(result: FitResult, x, k: int, seconds: float, from_fit: bool = False) -> Dict[str, Any]:
    """The table's numbers; ``from_fit`` (or data on disk): log p(x), BIC and AIC from the fit's own final
    E-step, which covered every rank's data, instead of another pass."""
    try:
        if torch.is_tensor(x) and not from_fit:
            loglik, bic, aic = result.score(x, k), result.bic(x, k), result.aic(x, k)
        else:  # the fit's final E-step, over a memory map or every rank's shard: no further pass
            loglik, bic, aic = _criteria(result, x, k)
    except ValueError:  # no exact E-step (continuous local latents): report the ELBO instead
        loglik = bic = aic = None
    return {"method": result.method, "log_likelihood": loglik, "bic": bic, "aic": aic,
            "n_parameters": result.n_parameters(x, k), "n_iter": result.n_iter, "converged": result.converged,
            "seconds": round(result.history[-1]["time"], 3), "seconds_total": round(seconds, 3),
            "final_loss_per_observation": result.losses[-1] / result.n_data}


def _criteria(result: FitResult, x, k: int) -> Tuple[float, float, float]:
    """(1/n) log p(x), BIC and AIC from the fit's own final E-step (its n and log-likelihood)."""
    if result.log_likelihood is None:
        raise ValueError("no exact log-likelihood")
    n, p = result.n_data, result.n_parameters(x, k)
    total = result.log_likelihood * n
    return result.log_likelihood, -2.0 * total + p * math.log(n), -2.0 * total + 2.0 * p


PLOTTED_ROWS = 20000  # the cluster figure of a memory map shows a sample of its rows


def _cluster_figure(path: str, result: FitResult, x, k: int, title: str,
                    labels: Sequence[str] = ("x_1", "x_2")) -> Optional[str]:
    """The responsibility scatter with ellipses, when the data are 2-D and z has an exact posterior."""
    from .plot import plot_clusters

    if x.shape[1] != 2:
        return None
    if not torch.is_tensor(x):
        x = x.sample(PLOTTED_ROWS, torch.Generator().manual_seed(0))
    try:
        resp = result.predict_proba(x, k)
    except ValueError:
        return None
    if resp.numel() != x.shape[0] * resp.shape[-1]:  # one row of w per data row, in data order
        return None
    resp = resp.reshape(x.shape[0], -1)
    complete = ~torch.isnan(x).any(1)  # a row with a missing coordinate has no place in the plane
    x, resp = x[complete], resp[complete]
    mu, Sigma = result.params.get("mu"), result.params.get("Sigma")
    if mu is not None and mu.shape != (k, 2):
        mu = None
    if Sigma is not None and Sigma.shape != (k, 2, 2):  # ellipses for full covariances only
        Sigma = None
    return plot_clusters(path, x, resp, mu, Sigma, title=title, labels=labels)


def _start_ranks(ns: argparse.Namespace) -> Tuple[int, int]:
    """Join torchrun's process group (gloo, with --timeout); (rank, world) of this process."""
    import datetime

    import torch.distributed as dist

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise UsageError("--distributed runs one process per rank under torchrun, which sets RANK and WORLD_SIZE: "
                         "torchrun --nproc-per-node=N -m ppl_em.cli fit ... --distributed")
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=ns.timeout))
        # Leave the group before the interpreter tears down: gloo's threads, still running at exit, can
        # abort the process ("terminate called without an active exception") after a successful fit.
        atexit.register(lambda: dist.destroy_process_group() if dist.is_initialized() else None)
    return dist.get_rank(), dist.get_world_size()


def _rows_in_file(path: str, x, shard: Optional[Tuple[int, int]]) -> int:
    """The rows of the whole file (every rank's shard together)."""
    if shard is None:
        return len(x)
    total = torch.tensor([len(x)], dtype=torch.int64)
    distributed_.all_reduce_ints(total, "counting the rows")
    return int(total)


@contextlib.contextmanager
def _outputs(ns: argparse.Namespace, shard: Optional[Tuple[int, int]]) -> Iterator[Optional["Outputs"]]:
    """The command's :class:`Outputs` on rank 0 (None on the other ranks); a bad --out stops every rank."""
    if shard is None:
        with Outputs(ns.out) as out:
            yield out
        return
    out = distributed_.agreed(lambda: Outputs(ns.out) if shard[0] == 0 else None, "opening --out")
    if out is None:
        yield None
        return
    with out:
        yield out


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
    if ns.distributed and isinstance(ns.components, list):
        raise UsageError("--components A:B fits every k in one process; choose k without --distributed, "
                         "then fit that k with --distributed")
    shard = _start_ranks(ns) if ns.distributed else None
    x = load_data(ns.data, shard, ns.missing)
    if isinstance(ns.components, list):
        return cmd_select(ns, model, x)
    rows = _rows_in_file(ns.data, x, shard)
    if not 1 <= ns.components <= rows:
        raise UsageError(f"--components must be between 1 and the number of data points ({rows}), "
                         f"got {ns.components}")
    _small_problem_threads(x)
    with _outputs(ns, shard) as out:
        start = time.perf_counter()
        options = {"batch_size": ns.batch_size} if ns.batch_size is not None else {}
        options.update(_tol(ns))
        if ns.distributed:
            options["distributed"] = True
        result = _fit_quietly(model, x, ns.components, method=ns.method, max_iter=ns.max_iter, seed=ns.seed,
                              n_init=ns.n_init, init=ns.init, progress=None if not ns.json else False,
                              missing=ns.missing, **options)
        if out is None:  # ranks other than 0 fitted along; rank 0 writes and prints
            return 0
        summary = dict(_summary(result, x, ns.components, time.perf_counter() - start, from_fit=ns.distributed),
                       model=ns.model, data=ns.data, n=rows, d=x.shape[1], components=ns.components)
        summary["files"] = [out.final(p) for p in (
            result.save(out.path("checkpoint.pt")),
            _write_json(out.path("history.json"), {"summary": summary, "history": result.history}),
            plot_training(out.path("training.png"), {ns.method: result}),
            _cluster_figure(out.path("clusters.png"), result, x, ns.components,
                            f"{ns.model}, {ns.method}, k = {ns.components}")) if p]
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
                           max_iter=ns.max_iter, seed=ns.seed, n_init=ns.n_init, init=ns.init, progress=False,
                           missing=ns.missing, **_tol(ns))
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
    if torch.is_tensor(x) and x.numel() < 100_000:
        torch.set_num_threads(1)


def cmd_demo(ns: argparse.Namespace) -> int:
    """GMM (k = 2, full covariances) on Old Faithful, four ways; a table and the figures."""
    from .datasets import load_old_faithful

    x, k = load_old_faithful(), 2
    _small_problem_threads(x)
    # torch imports its compiler (~3 s) at the first optimiser construction: not part of any fit's time.
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    with Outputs(ns.out) as out:
        files = _demo_fits(ns, x, k, out)
    print("wrote " + ", ".join(files))
    return 0


def _demo_fits(ns: argparse.Namespace, x: torch.Tensor, k: int, out: "Outputs") -> List[str]:
    from .models import gmm
    from .plot import plot_elbo_gap, plot_training

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
    files = [_cluster_figure(out.path("clusters_em.png"), results["EM"], x, k,
                             "Old Faithful, EM: colour = responsibility w_j^(i)", FAITHFUL_AXES),
             _cluster_figure(out.path("clusters_svi.png"), results["SVI"], x, k,
                             "Old Faithful, SVI: colour = exact responsibility w_j^(i)", FAITHFUL_AXES),
             plot_training(out.path("training.png"), results),
             plot_elbo_gap(out.path("elbo_gap.png"), results),
             _write_json(out.path("summary.json"), rows)]
    return [out.final(f) for f in files if f]


def cmd_models(ns: argparse.Namespace) -> int:
    for name, (model, methods) in sorted(available_models().items()):
        doc = (getattr(model, "__doc__", None) or "").strip().splitlines()
        print(f"{name:<18} {','.join(methods):<20} {doc[0] if doc else ''}")
    return 0


def _tol(ns: argparse.Namespace) -> dict:
    """``tol=`` for fit and select when ``--tol`` was given (their own default otherwise)."""
    return {"tol": ns.tol} if getattr(ns, "tol", None) is not None else {}


# -- entry point ----------------------------------------------------------------------------
def _check_options(ns: argparse.Namespace) -> None:
    if getattr(ns, "max_iter", None) is not None and ns.max_iter < 1:
        raise UsageError(f"--max-iter must be >= 1, got {ns.max_iter}")
    if getattr(ns, "n_init", 1) < 1:
        raise UsageError(f"--n-init must be >= 1, got {ns.n_init}")
    if getattr(ns, "tol", None) is not None and not 0 <= ns.tol < math.inf:
        raise UsageError(f"--tol must be a finite number >= 0, got {ns.tol}")
    if getattr(ns, "batch_size", None) is not None and ns.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {ns.batch_size}")
    if getattr(ns, "timeout", 1.0) <= 0:
        raise UsageError(f"--timeout must be > 0 seconds, got {ns.timeout}")
    if hasattr(ns, "seed"):
        last = MAX_SEED - (getattr(ns, "n_init", 1) - 1)  # restart r uses seed + r
        if not 0 <= ns.seed <= last:
            raise UsageError(f"--seed must lie in [0, {last}] (seeds are 32-bit), got {ns.seed}")


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
    f.add_argument("--tol", type=float, default=None,
                   help="stop when the mean loss per observation changes by less than this (default: fit's, 1e-6; "
                        "0 runs all of --max-iter)")
    f.add_argument("--missing", default="error", choices=("error", "marginalize"),
                   help="empty fields or NaN in the data: an error (default), or missing values marginalised out "
                        "(gmm, kmeans, bernoulli_mixture, poisson_mixture)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--batch-size", type=int, default=None,
                   help="rows per batch: of online_em's M-steps, or read from a large .npy file")
    f.add_argument("--distributed", action="store_true",
                   help="under torchrun: each rank fits its contiguous shard of the rows, EM sums their statistics")
    f.add_argument("--timeout", type=float, default=600.0,
                   help="with --distributed: seconds a rank waits for the others before it stops (default 600)")
    f.set_defaults(func=cmd_fit)
    sub.add_parser("models", help="list the models `fit` accepts").set_defaults(func=cmd_models)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``ppl-em`` command; returns the exit status (0; 2 for bad input; 130 on Ctrl-C)."""
    try:
        ns = build_parser().parse_args(argv)
        _check_options(ns)
        return ns.func(ns)
    except BrokenPipeError:  # the reader went away (`ppl-em fit ... | head -1`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except BaseException as e:
        return _report(e)


def _report(error: BaseException) -> int:
    """One line on stderr and the exit status for bad input (2) or Ctrl-C (130); anything else is a bug
    and keeps its traceback."""
    if _interrupted(error):
        print("ppl-em: interrupted; no output was written", file=sys.stderr)
        return 130
    if isinstance(error, (UsageError, ValueError, FloatingPointError, StalledError, distributed_.RankError)):
        # ValueError, FloatingPointError, StalledError: the library's own diagnostics (bad data, a singular
        # fit, a gradient M-step stalled, as a full-covariance GMM with missing values can on tiny data);
        # RankError: one of them, or a rank that stopped answering, on another rank of a --distributed fit
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"ppl-em: error: {message}", file=sys.stderr)
        return 2
    raise error


def _interrupted(error: Optional[BaseException]) -> bool:
    """A Ctrl-C, or an error it caused (an import cut short re-raises it as a RuntimeError)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
