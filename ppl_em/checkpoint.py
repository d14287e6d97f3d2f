"""Checkpoints of a fitted model: the file format, its validation, and atomic writes.

A checkpoint is ``torch.save({"format": "ppl_em.FitResult", "version": 1, "params": {name:
unconstrained tensor}, "meta": JSON string})``; ``meta`` holds the constraints, the method,
the history and the qualified name of the model. It is read with
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers:
a file crafted to run code on load raises instead.

:func:`read` validates every field before anything reaches Pyro's param store: the format
and version, each meta field's type, and each parameter (a finite floating tensor whose
constrained value exists and satisfies its constraint). :func:`check_model` validates the
parameters against a model: every ``pyro.param`` the model reads must be there, with the
shape and constraint the model gives it. Every error names the file.

:func:`atomic_write` writes through a temporary file in the destination's folder, named
``.NAME.ppl_em-partial.PID.HOST.XXXXXXXX.tmp`` so that a reader knows what it is. A writer
killed mid-save (``kill -9``) leaves one behind; the next save to that folder removes those
whose process is gone, and never one a live writer still fills.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Tuple

import torch
import pyro.distributions.constraints as constraints
from torch.distributions import transform_to

from .store import State, model_trace

__all__ = ["FORMAT", "VERSION", "atomic_write", "clean_stale_partials", "partial_prefix", "read",
           "check_model", "choose_model", "constraint_to_json", "constraint_from_json"]

FORMAT = "ppl_em.FitResult"
VERSION = 1
PARTIAL = "ppl_em-partial"
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"
_PARTIAL_NAME = re.compile(rf"^\..*\.{PARTIAL}\.(\d+)\.([A-Za-z0-9-]+)\.[^.]+(\.tmp)?$")

# Parametrised constraints a checkpoint may name; their arguments must be plain numbers.
_BOUNDED = {
    "interval": ("lower_bound", "upper_bound"),
    "half_open_interval": ("lower_bound", "upper_bound"),
    "greater_than": ("lower_bound",),
    "greater_than_eq": ("lower_bound",),
    "less_than": ("upper_bound",),
}


# -- atomic writes ----------------------------------------------------------------------------
def atomic_write(path: "os.PathLike[str] | str", write: Callable[[BinaryIO], None]) -> str:
    """Write a file so that a crash leaves either the old file or the new one, never a mix.

    ``write(f)`` fills a temporary file in the destination's directory (see the module
    docstring for its name); it is flushed, fsync'ed and moved over ``path`` with
    :func:`os.replace` (atomic on POSIX and Windows). Stale temporary files of dead writers
    in that directory are removed first.

    Returns
    -------
    str
        ``path``.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    clean_stale_partials(directory)
    fd, tmp = tempfile.mkstemp(prefix=partial_prefix(os.path.basename(path)), suffix=".tmp", dir=directory)
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
    sync_directory(directory)
    return path


def sync_directory(directory: str) -> None:
    """Make renames into ``directory`` durable (POSIX only; a no-op elsewhere)."""
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def partial_prefix(name: str) -> str:
    """The name a partial file (or folder) for ``name`` starts with: it says whose it is."""
    return f".{name[:100]}.{PARTIAL}.{os.getpid()}.{_HOST}."


def clean_stale_partials(directory: str) -> List[str]:
    """Remove the partial files and folders in ``directory`` whose writer (on this host) is gone."""
    if os.name == "nt":  # no cheap liveness test of a process id
        return []
    removed = []
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        for entry in entries:
            match = _PARTIAL_NAME.match(entry.name)
            if match and match.group(2) == _HOST and not _alive(int(match.group(1))):
                with contextlib.suppress(OSError):
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path)
                    else:
                        os.unlink(entry.path)
                    removed.append(entry.path)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, and belongs to someone else
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- constraints <-> JSON ----------------------------------------------------------------------
def constraint_to_json(c: constraints.Constraint, name: str) -> Dict[str, Any]:
    """A JSON description of a constraint: its name in ``constraints``, with numeric bounds."""
    if isinstance(c, constraints.independent):
        return {"independent": constraint_to_json(c.base_constraint, name), "ndims": c.reinterpreted_batch_ndims}
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


def constraint_from_json(spec: Any) -> constraints.Constraint:
    """Rebuild a constraint by name; only Constraint objects and numeric bounds are accepted."""
    if not isinstance(spec, dict):
        raise ValueError(f"malformed constraint {spec!r}")
    if "independent" in spec:
        ndims = spec.get("ndims")
        if not _is_int(ndims) or ndims < 0:
            raise ValueError(f"malformed constraint {spec!r}: ndims must be an integer >= 0")
        return constraints.independent(constraint_from_json(spec["independent"]), ndims)
    name = spec.get("name")
    if name in _BOUNDED:
        args = spec.get("args", [])
        if not isinstance(args, list) or len(args) != len(_BOUNDED[name]) or not all(map(_is_number, args)):
            raise ValueError(f"malformed bounds {args!r} for constraint {name!r}")
        return getattr(constraints, name)(*map(float, args))
    value = getattr(constraints, name, None) if isinstance(name, str) and not name.startswith("_") else None
    if not isinstance(value, constraints.Constraint):
        raise ValueError(f"unknown constraint {name!r}")
    return value


def _same_constraint(a: constraints.Constraint, b: constraints.Constraint) -> bool:
    try:
        return constraint_to_json(a, "") == constraint_to_json(b, "")
    except ValueError:  # a constraint without a JSON form: compare what it prints as
        return type(a) is type(b) and repr(a) == repr(b)


# -- reading -----------------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _list_of(kind) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, list) and all(kind(x) for x in v)


# meta field -> (test, what it must be)
_META = {
    "method": (lambda v: v in ("em", "hard_em", "svi", "vae"), "one of 'em', 'hard_em', 'svi', 'vae'"),
    "losses": (_list_of(_is_number), "a list of numbers"),
    "history": (_list_of(lambda h: isinstance(h, dict)), "a list of objects"),
    "converged": (lambda v: isinstance(v, bool), "true or false"),
    "n_iter": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "n_data": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "log_likelihood": (lambda v: v is None or _is_number(v), "a number or null"),
    "restarts": (_list_of(lambda r: isinstance(r, dict)), "a list of objects"),
    "best": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "init": (lambda v: isinstance(v, dict), "an object"),
    "model": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "constraints": (lambda v: isinstance(v, dict), "an object mapping parameter names to constraints"),
}


# optional meta fields (absent from older checkpoints) -> (test, what it must be)
_OPTIONAL_META = {
    "missing": (lambda v: v in ("error", "marginalize"), "'error' or 'marginalize'"),
}


def read(path: "os.PathLike[str] | str") -> Tuple[State, Dict[str, Any]]:
    """The validated parameters (a param-store state) and metadata of a checkpoint file.

    Raises ``FileNotFoundError`` (or another ``OSError``) if the file cannot be opened, and a
    ``ValueError`` naming the file and the field for anything else that is wrong with it.
    """
    source = os.fspath(path)
    payload = _load_payload(source)
    meta = _check_header(payload, source)
    return _check_params(payload["params"], meta["constraints"], source), meta


def _load_payload(source: str) -> Any:
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as e:  # pickle.UnpicklingError, RuntimeError for a non-zip file, ...
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"{source!r} is not a loadable ppl_em checkpoint: torch.load(weights_only=True) "
                         f"refused it ({type(e).__name__}: {first}).") from None


def _check_header(payload: Any, source: str) -> Dict[str, Any]:
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{source!r} is not a ppl_em checkpoint (expected a dict with format={FORMAT!r}).")
    version = payload.get("version")
    if not _is_int(version) or version != VERSION:
        newer = " (written by a newer ppl_em: upgrade to read it)" if _is_int(version) and version > VERSION else ""
        raise ValueError(f"{source!r} has checkpoint format version {version!r}; this ppl_em reads version "
                         f"{VERSION}{newer}.")
    if not isinstance(payload.get("params"), dict):
        raise ValueError(f"{source!r}: the checkpoint's 'params' must be a dict of tensors, "
                         f"got {type(payload.get('params')).__name__}.")
    return _parse_meta(payload.get("meta"), source)


def _parse_meta(text: Any, source: str) -> Dict[str, Any]:
    if not isinstance(text, str):
        raise ValueError(f"{source!r}: the checkpoint's 'meta' must be a JSON string, got {type(text).__name__}.")
    try:
        meta = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{source!r}: the checkpoint's 'meta' is not valid JSON ({e}).") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{source!r}: the checkpoint's 'meta' must be a JSON object, got {type(meta).__name__}.")
    for name, (test, kind) in _META.items():
        if name not in meta or not test(meta[name]):
            got = f"got {meta[name]!r}"[:120] if name in meta else "it is missing"
            raise ValueError(f"{source!r}: the checkpoint field meta[{name!r}] must be {kind}; {got}.")
    for name, (test, kind) in _OPTIONAL_META.items():
        if name in meta and not test(meta[name]):
            raise ValueError(f"{source!r}: the checkpoint field meta[{name!r}] must be {kind}; "
                             f"got {meta[name]!r}"[:200] + ".")
    if meta["restarts"] and meta["best"] >= len(meta["restarts"]):
        raise ValueError(f"{source!r}: meta['best'] = {meta['best']} is not the index of one of its "
                         f"{len(meta['restarts'])} restarts.")
    return meta


def _check_params(params: Dict[Any, Any], specs: Dict[str, Any], source: str) -> State:
    if set(params) != set(specs):
        raise ValueError(f"{source!r}: the parameters {sorted(map(str, params))} and the constraints "
                         f"{sorted(specs)} of the checkpoint do not match.")
    state: State = {"params": {}, "constraints": {}}
    for name, value in params.items():
        state["constraints"][name] = _check_param(name, value, specs[name], source)
        state["params"][name] = value
    return state


def _check_param(name: str, value: Any, spec: Any, source: str) -> constraints.Constraint:
    """The parameter's constraint, after checking that ``value`` is a valid unconstrained value of it."""
    where = f"{source!r}: parameter {name!r}"
    if not torch.is_tensor(value) or not value.is_floating_point():
        raise ValueError(f"{where} must be a floating-point tensor, got {getattr(value, 'dtype', type(value).__name__)}.")
    if not torch.isfinite(value).all():
        raise ValueError(f"{where} has {int((~torch.isfinite(value)).sum())} NaN or infinite value(s); a checkpoint "
                         "holds finite parameters only (the file is damaged or was edited).")
    try:
        constraint = constraint_from_json(spec)
        constrained = transform_to(constraint)(value)
    except Exception as e:
        raise ValueError(f"{where} (shape {tuple(value.shape)}) does not hold a value of its constraint {spec!r} "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__}).") from None
    if not torch.isfinite(constrained).all() or not bool(constraint.check(constrained).all()):
        raise ValueError(f"{where}: its value is not finite or lies outside its constraint {spec!r}.")
    return constraint


# -- the model -----------------------------------------------------------------------------------
def qualified_name(model: Optional[Callable]) -> Optional[str]:
    module, name = getattr(model, "__module__", None), getattr(model, "__qualname__", None)
    return f"{module}:{name}" if module and name else None


def _registered_models() -> Dict[str, Callable]:
    from ppl_em.models import REGISTRY

    return {qualified_name(entry["model"]): entry["model"] for entry in REGISTRY.values()}


def choose_model(recorded: Optional[str], model: Optional[Callable], source: str) -> Optional[Callable]:
    """The model for a checkpoint: ``model`` if passed, else the registered model it names.

    A name of the form ``ppl_em.models.MODULE:FUNCTION`` must be a model of ``ppl_em.models``'
    registry (nothing else is ever imported); a model passed for a checkpoint of another
    registered model is refused. Other names (models of the user's own) give None.
    """
    registered = _registered_models()
    named = re.fullmatch(r"ppl_em\.models\.\w+:[\w.]+", recorded or "") is not None
    if named and recorded not in registered and model is None:
        raise ValueError(f"{source!r} names the model {recorded!r}, which is not a model of ppl_em.models "
                         f"(those are {sorted(registered)}). Pass the model: ppl_em.load(path, model=...).")
    passed = qualified_name(model)
    if model is not None and recorded in registered and passed in registered and passed != recorded:
        raise ValueError(f"{source!r} was fitted with the model {recorded!r}, not with {passed!r}: its parameters "
                         f"do not belong to that model. Load it with model={recorded.split(':')[0]}.model "
                         "(or without model=).")
    return model if model is not None else registered.get(recorded)


def check_model(state: State, model: Callable, args: tuple, kwargs: dict, source: str) -> None:
    """Every parameter ``model(*args, **kwargs)`` reads is in ``state``, with its shape and constraint.

    The model's own initial values (one run in an empty param store) give the shapes and
    constraints it expects; a model that cannot initialise itself is run on ``state``, which
    still reveals any parameter that ``state`` lacks. Raises a ValueError listing every mismatch.
    """
    try:
        trace = model_trace(model, args, kwargs)
    except Exception:
        trace = model_trace(model, args, kwargs, state)
    problems = [p for name, site in trace.nodes.items() if site["type"] == "param"
                for p in _mismatch(name, site, state)]
    if problems:
        raise ValueError(f"{source} does not match this model and its arguments: {'; '.join(problems)}. Pass the "
                         "model and the arguments (k, covariance_type, ...) it was fitted with.")


def _mismatch(name: str, site: dict, state: State) -> List[str]:
    want_shape = tuple(site["value"].shape)
    want = site["kwargs"].get("constraint", constraints.real)
    if name not in state["params"]:
        return [f"the model's parameter {name!r} (shape {want_shape}) is missing"]
    have = state["constraints"][name]
    have_shape = tuple(transform_to(have)(state["params"][name]).shape)
    problems = []
    if have_shape != want_shape:
        problems.append(f"parameter {name!r} has shape {have_shape}, the model's has {want_shape}")
    if not _same_constraint(have, want):
        problems.append(f"parameter {name!r} has the constraint {have}, the model's has {want}")
    return problems
