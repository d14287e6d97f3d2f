"""The model's run, replayed: the tensor operations from theta to the distributions, without the model.

At small n an EM step's arithmetic is a few hundred microseconds, and running the model under Pyro's
handler stack (messengers, plates, enumeration, distribution construction) costs as much again. The
model's structure does not change between steps on the same data: only theta does. So the first run
is *recorded*: under a ``TorchFunctionMode`` every torch operation that reads theta (or a tensor
made from it) is kept, with its arguments, and the run's trace is kept too. A later step writes the
current theta into the recorded parameter tensors and reruns only those operations, in place into
the tensors the recorded distributions hold: the trace then describes the model at the new theta.

A replay is only as good as the recording, so nothing is trusted on faith:

* a recording is refused when the model takes a value out of torch (``float(sigma)``, ``if mu > 0``,
  ``.tolist()``: Python would keep the recorded value), or changes in place a tensor it had read
  before it depended on theta;
* the first replay is checked against a real run of the model at new parameter values: every tensor
  of every site's distribution, and every site's value, must be equal; otherwise the model is run
  for real from then on (:attr:`Replay.off` says why);
* it is made again when the data (the very tensors, unchanged, and every other argument), the
  parameters' shapes or the param store's names change.

What the model does besides torch operations (printing, counting its calls) happens at the recorded
run only. Lazily computed attributes of the distributions (``Categorical.logits``) are dropped before
each replay and recomputed from the new values.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import pyro
import torch
from torch.distributions import Distribution
from pyro.poutine.trace_struct import Trace
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .tensors import compact

__all__ = ["Replay", "signature"]

# Calls that read only a tensor's metadata: their non-tensor results do not depend on theta's values.
_METADATA = {"dim", "size", "numel", "stride", "__len__", "is_floating_point", "is_complex", "is_contiguous",
             "ndimension", "nelement", "element_size", "storage_offset", "get:shape", "get:ndim", "get:dtype",
             "get:device", "get:layout", "get:requires_grad", "get:is_leaf", "get:grad_fn", "get:grad",
             "get:is_cuda", "get:_version", "get:names", "__hash__", "__format__"}
_SAFE_RESULTS = (torch.Size, torch.dtype, torch.device, torch.layout, type(None))


def _name(func) -> str:
    name = getattr(func, "__name__", "") or ""
    if name == "__get__":  # a property (t.shape, t.T): name it by the property
        return "get:" + getattr(getattr(func, "__self__", None), "__name__", "?")
    return name


def _mutates(name: str, kwargs: dict) -> bool:
    return "out" in kwargs or name == "__setitem__" or name.startswith("__i") or (
        name.endswith("_") and not name.startswith("__"))


def _leaves(obj) -> list:
    """The leaves of nested tuples, lists and dicts (their values), in torch's pytree order: the few shapes
    that a torch call's arguments and results take, without the general pytree's cost per call."""
    if isinstance(obj, (tuple, list)):
        found = []
        for item in obj:
            if isinstance(item, (tuple, list, dict)):
                found += _leaves(item)
            else:
                found.append(item)
        return found
    if isinstance(obj, dict):
        return _leaves(list(obj.values()))
    return [obj]


def _tensors(args: tuple, kwargs: dict) -> List[torch.Tensor]:
    """The tensors among a torch call's arguments, in :func:`_leaves`'s order: only a container argument
    (an index tuple, a list of tensors) is flattened, never a shape."""
    found = []
    for a in (args + tuple(kwargs.values())) if kwargs else args:
        if isinstance(a, torch.Tensor):
            found.append(a)
        elif isinstance(a, (tuple, list, dict)) and not isinstance(a, torch.Size):
            found += [t for t in _leaves(a) if isinstance(t, torch.Tensor)]
    return found


def _targets(args, kwargs) -> List[torch.Tensor]:
    """The tensors an in-place call writes: its ``out=``, else its first argument."""
    return [t for t in _leaves(kwargs["out"] if "out" in kwargs else args[:1]) if torch.is_tensor(t)]


class _Recorder(TorchFunctionMode):
    """Keeps every torch call that reads a tracked tensor (a root, or a tensor made from one).

    Each kept call is ``(func, args, kwargs, fresh, before)``: ``fresh`` pairs the position of each result
    that is a new tensor (not a view of a tracked argument, which follows that argument by itself) with
    that tensor, to be overwritten in place at a replay. Calls that change a tensor in place are kept too,
    with ``before``, the values their untracked targets had (see :meth:`_before`)."""

    subject = "the model"  # what is recorded (in the reason a recording is refused)

    def __init__(self, roots: Dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.roots = roots
        self.tracked: Dict[int, torch.Tensor] = {}  # id -> tensor (the reference keeps the id unique)
        # id -> untracked tensor that kept calls read (constants of the replay), held: while the recording
        # lasts no other tensor takes its id (a freed one's id, reused, would look like a read constant)
        self.read: Dict[int, torch.Tensor] = {}
        self.ops: List[tuple] = []
        self.problem: Optional[str] = None

    def _is_tracked(self, t: torch.Tensor) -> bool:
        if id(t) in self.tracked:
            return True
        if any(r is t for r in self.roots.values()):
            self.tracked[id(t)] = t
            return True
        return False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        before = self._before(func, args, kwargs) if self.problem is None else []
        result = func(*args, **kwargs)
        if self.problem is None:
            self._keep(func, args, kwargs, result, before)
        return result

    def _before(self, func, args, kwargs) -> List[tuple]:
        """(target, copy) of each untracked tensor that an in-place call is about to write theta into: a
        replay restores it first (``buffer += mu`` must add to the buffer as it was, not as the last run left it)."""
        if not _mutates(_name(func), kwargs):
            return []
        if not any(self._is_tracked(t) for t in _tensors(args, kwargs)):
            return []
        return [(t, t.detach().clone()) for t in _targets(args, kwargs) if id(t) not in self.tracked]

    def _keep(self, func, args, kwargs, result, before: List[tuple]) -> None:
        inputs = _tensors(args, kwargs)
        tracked = [t for t in inputs if self._is_tracked(t)]
        if not tracked:
            return
        name, outputs = _name(func), tree_flatten(result)[0]
        if not any(torch.is_tensor(o) for o in outputs):
            if name not in _METADATA and not all(isinstance(o, _SAFE_RESULTS) for o in outputs):
                self.problem = f"the model reads a value out of a tensor that depends on the parameters ({name})"
            return
        mutates = _mutates(name, kwargs)
        if mutates and not self._track_target(name, args, kwargs):
            return
        followed = {t.untyped_storage().data_ptr() for t in tracked}
        constant = {t.untyped_storage().data_ptr() for t in inputs} - followed
        fresh = []
        for i, out in enumerate(outputs):
            if not torch.is_tensor(out) or id(out) in self.tracked:
                continue
            storage = out.untyped_storage().data_ptr()
            if storage in constant:  # a view of a constant argument (broadcast beside a tracked one)
                continue
            self.tracked[id(out)] = out
            if storage not in followed:
                fresh.append((i, out))
        self.read.update((id(t), t) for t in inputs if id(t) not in self.tracked)
        if fresh or mutates:
            self.ops.append((func, args, kwargs, fresh, before))

    def _track_target(self, name: str, args, kwargs) -> bool:
        """An in-place call writes theta into its target, which is tracked from then on; refused (False) for
        a target that kept calls read before, as a constant."""
        for t in _targets(args, kwargs):
            if not self._is_tracked(t):
                if id(t) in self.read:
                    self.problem = (f"{self.subject} changes in place ({name}) a tensor that it read before that "
                                    "tensor depended on the parameters")
                    return False
                self._track(t)
        return True

    def _track(self, t: torch.Tensor) -> None:
        self.tracked[id(t)] = t


def _distributions(fn) -> List[Distribution]:
    """``fn`` and the distributions it wraps (``base_dist``, a chain's observation distribution, ...)."""
    found, stack = [], [fn]
    while stack:
        d = stack.pop()
        if isinstance(d, Distribution) and all(d is not f for f in found):
            found.append(d)
            stack.extend(v for v in vars(d).values() if isinstance(v, Distribution))
    return found


def _sample_sites(tr: Trace) -> List[dict]:
    return [s for s in tr.nodes.values() if s["type"] == "sample"]


def _tensors_of(site: dict) -> List[torch.Tensor]:
    """What a site's replay must reproduce: its value and every tensor its distributions hold."""
    found = [site["value"]] if torch.is_tensor(site["value"]) else []
    for d in _distributions(site["fn"]):
        found += [v for v in vars(d).values() if torch.is_tensor(v)]
    return found


class _Recording:
    """One recorded run: its trace, its roots and the kept calls (see :class:`_Recorder`)."""

    def __init__(self, key, trace: Trace, roots: Dict[str, torch.Tensor], ops: List[tuple]) -> None:
        self.key, self.trace, self.roots, self.ops = key, trace, roots, ops
        # What each distribution held right after the run: anything added later is a lazy cache.
        self.attributes = [(d, set(vars(d))) for s in _sample_sites(trace) for d in _distributions(s["fn"])]
        self.verified = False
        self.moved = False  # whether the last refresh changed theta (a check at the recorded theta proves nothing)

    def refresh(self) -> bool:
        """Write the store's current theta into the roots and rerun the kept calls. False (and nothing
        changed) where the store lacks a root's parameter or holds it in another shape, dtype or device."""
        store = pyro.get_param_store()
        values = {}
        for name, root in self.roots.items():
            value = store[name].detach() if name in store else None
            if value is None or (value.shape, value.dtype, value.device) != (root.shape, root.dtype, root.device):
                return False
            values[name] = value
        with torch.no_grad():
            if not self.verified:
                self.moved = any(not torch.equal(self.roots[name], value) for name, value in values.items())
            for name, value in values.items():
                self.roots[name].copy_(value)
            for func, args, kwargs, fresh, before in self.ops:
                for target, value in before:
                    target.copy_(value)
                result = func(*args, **kwargs)
                if fresh:
                    outputs = tree_flatten(result)[0]
                    for i, old in fresh:
                        old.copy_(outputs[i])
        for d, keys in self.attributes:
            for key in [k for k in vars(d) if k not in keys]:
                delattr(d, key)
        return True

    def trace_copy(self) -> Trace:
        """A fresh trace over the recorded sites (new site dicts: a step's log-probabilities go into them)."""
        tr = self.trace.copy()
        for name, site in self.trace.nodes.items():
            tr.nodes[name] = dict(site)
        return tr


def signature(value):
    """What identifies a model argument between steps: a tensor by identity and version (an in-place change
    shows), containers by their contents, numbers and strings by value, anything else by identity."""
    if isinstance(value, torch.Tensor):  # (isinstance, map: this runs at every step of a small fit)
        return ("tensor", id(value), value._version)
    if isinstance(value, (int, float, str, bool, type(None))):
        return value
    if isinstance(value, (list, tuple)):
        return (type(value).__name__,) + tuple(map(signature, value))
    if isinstance(value, dict):
        return ("dict",) + tuple((k, signature(v)) for k, v in value.items())
    return ("object", id(value))


def _same(a: Trace, b: Trace) -> bool:
    """Whether two traces have the same sites with equal values and distributions."""
    sa, sb = _sample_sites(a), _sample_sites(b)
    if [s["name"] for s in sa] != [s["name"] for s in sb]:
        return False
    for x, y in zip(sa, sb):
        if not all(_equal(x[k], y[k]) for k in ("scale", "mask", "is_observed")):
            return False
        tx, ty = _tensors_of(x), _tensors_of(y)
        if type(x["fn"]) is not type(y["fn"]) or len(tx) != len(ty):
            return False
        if not all(_equal(p, q) for p, q in zip(tx, ty)):
            return False
    return True


def _equal(a, b) -> bool:
    """Equal values; two tensors expanded alike (the same strides) by their stored elements alone: a
    distribution's parameters broadcast to its batch shape (a mixture's covariances, (k, n, d, d) of a (k, 1, d, d)
    tensor) would otherwise be compared element by element (measured 0.15 s a chunk of 250000 rows at k = 16,
    d = 10)."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        if not (torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape):
            return False
        if a.stride() == b.stride():
            a, b = compact(a), compact(b)
        return torch.equal(a, b)
    return a == b


class Replay:
    """The model's runs on one set of arguments, recorded once and replayed (see the module docstring).

    ``trace(run, args, kwargs)`` returns the trace of a run at the param store's current theta. ``run(roots)``
    must run the model with each ``pyro.param`` value (and each point-estimated latent's) replaced by a
    detached copy kept in the dict ``roots``, under its name, and return the trace; it is called to record,
    to check the first replay, and whenever the recording does not apply.
    """

    def __init__(self) -> None:
        self.recording: Optional[_Recording] = None
        self.off: Optional[str] = None  # why this model is not replayed
        self.replays = 0  # runs served by a replay (for tests and profiles)
        self.seen = None  # the arguments of the last run: a recording is made when they come again

    def trace(self, run: Callable[[Dict[str, torch.Tensor]], Trace], args: tuple, kwargs: dict) -> Trace:
        if self.off is not None:
            return run({})
        key = (signature(args), signature(kwargs), torch.is_grad_enabled())
        rec = self.recording
        if rec is not None and rec.key == key and rec.refresh():
            if rec.verified:
                self.replays += 1
                return rec.trace_copy()
            return self._check(rec, run)
        if key != self.seen:  # arguments met for the first time (a batch of a stream, say): no recording yet
            self.seen, self.recording = key, None
            return run({})
        return self._record(run, key)

    def _record(self, run: Callable[[Dict[str, torch.Tensor]], Trace], key) -> Trace:
        roots: Dict[str, torch.Tensor] = {}
        recorder = _Recorder(roots)
        with recorder:
            tr = run(roots)
        self.recording = None
        if recorder.problem is not None:
            self.off = recorder.problem
        else:
            self.recording = _Recording(key, tr, roots, recorder.ops)
        return self.recording.trace_copy() if self.recording is not None else tr

    def _check(self, rec: _Recording, run: Callable[[Dict[str, torch.Tensor]], Trace]) -> Trace:
        """The first replay against a real run at these parameters; the real run's trace is returned."""
        real = run({})
        if _same(rec.trace, real):
            rec.verified = rec.moved
        else:
            self.recording, self.off = None, "a replay of the recorded run differed from a real run of the model"
        return real
