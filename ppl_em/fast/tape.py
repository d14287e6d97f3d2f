"""A closed-form EM step, replayed: the tensor operations of the whole step, recorded once and rerun.

At small n a step's arithmetic is a few hundred microseconds, and the Python around it (Pyro's
handlers, the posterior's and the statistics' bookkeeping, the closed forms' dispatch, the checks)
costs several times that. On the same data, under the same M-step plan, a closed-form step runs the
same tensor operations in the same order at every iteration: only theta's values differ. So one
step is *recorded*: under a ``TorchFunctionMode`` every torch operation that reads theta (the param
store's unconstrained tensors), or a tensor made from it, directly or through a view, is kept with
its arguments. A later step reruns only those operations, writing each result into the tensor the
recorded step made (an in-place update of a parameter, the M-step's write, is rerun as it was):
the parameters end where the step's own code would have put them, and the loss tensor holds
-log p(x; theta) at the theta before the update. The algorithm's code is unchanged; the tape only
skips the Python between its tensor operations. (``EM.log_likelihood`` keeps a :class:`StepTape` of its
own for the E-step alone: a region that writes no parameter, whose tensor is log p(x; theta).)

A replay is only as good as the recording, so nothing is trusted on faith:

* every decision the step took from a tensor's value (``if not torch.isfinite(objective)``, ``if
  bool(empty.any())``, a constraint's check before a parameter is written) is a *guard*: a replay
  evaluates it again, and where it comes out otherwise the replay stops (before it has written any
  parameter) and the step runs for real, which then raises its error or takes the other branch, and is
  recorded in place of the last recording (at most :data:`RECORDINGS_AFTER_MISSES` times);
* a step that reads any other value out of a tensor that depends on theta (``float(log_prior)``),
  changes in place a tensor it read before that tensor depended on theta, overwrites a tensor that it
  read as a constant (a buffer reused for the blocks of the data: a replay would read its last
  contents), differentiates (autograd
  is not replayed), warns (at two recordings), or would keep more than :data:`TAPE_BYTES` of tables
  alive, is not recorded: it runs for real every time (:attr:`StepTape.off` says why);
* the first replay is checked against a real step from the same theta (every parameter and the loss
  must be equal to the bit), at a theta other than the recorded one (a step from the recorded theta, a
  restart from the same start, runs for real and the check waits); otherwise the step runs for real
  from then on;
* a recording holds for one key (the data, by identity and version, the plan, the parameters' names,
  shapes and constraints, the options): any change of it records afresh. A restart's cleared param
  store holds new tensors under the same names: their values go into the recorded tensors before a
  replay and the results back after it.

What the model and the engine do besides tensor operations (a model's print, counting its calls)
happens at the recorded step only.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import warnings
from typing import Callable, Dict, List, Optional

import torch

from .replay import _METADATA, _SAFE_RESULTS, _Recorder, _leaves, _mutates, _name, _targets, _tensors

__all__ = ["StepTape", "TAPE_BYTES", "TAPE_ELEMENTS", "RECORDINGS_AFTER_MISSES"]

TAPE_ELEMENTS = 2 ** 20  # the largest data (elements of the tensor arguments) whose steps are recorded
TAPE_BYTES = 64 * 2 ** 20  # the most memory a recording may keep alive (its tables)
# A replay stopped by a guard records the step again (a component that emptied stays empty: the new way
# holds from then on); after this many such stops the steps that the tape's guards refuse run for real.
RECORDINGS_AFTER_MISSES = 3
_GUARD, _COPY, _OUT, _TRY, _CALL = range(5)  # how a replay reruns a kept call (see _Tape.calls)
_AUTOGRAD = {"grad", "backward", "vjp", "jvp"}
_IDENTITY = {"data_ptr", "untyped_storage", "get:is_meta", "get:is_sparse"}  # where, not what: the same at a replay
# Methods whose torch function of another name takes out=, with the same arguments in the same order.
_OUT_FORMS = {"__invert__": torch.bitwise_not, "__and__": torch.bitwise_and, "__or__": torch.bitwise_or,
              "__eq__": torch.eq, "__ne__": torch.ne, "linalg_cholesky": torch.linalg.cholesky,
              "linalg_solve_triangular": torch.linalg.solve_triangular}
# Functions whose out= takes the layout of their own result, contiguous or not (a batched factor is laid out
# column by column): a replay may write into the recorded result itself.
_OWN_LAYOUT = {"linalg_cholesky", "linalg_solve_triangular"}
# Calls of several tensor results that take them all as out=(...), in the order they return them.
_OUT_TUPLES = {"max": torch.max, "min": torch.min, "linalg_cholesky_ex": torch.linalg.cholesky_ex}
_READS = {"__bool__", "equal", "is_nonzero"}  # value reads that become guards; every other read of a value refuses the recording
# Calls that read no tensor's values and make no tensor (a shape, a dtype, the grad mode): run at once, unexamined.
_UNEXAMINED = (_METADATA | _IDENTITY | {"_set_grad_enabled"}) - {"get:grad"}


def _overwrites(args, kwargs) -> bool:
    """Whether a call writes its ``out=`` tensors whole without reading them (none shares storage with an
    input): a replay then needs not restore what they held before."""
    if "out" not in kwargs:
        return False
    inputs = {_storage(t) for t in _tensors(args, {k: v for k, v in kwargs.items() if k != "out"})}
    return not any(_storage(t) in inputs for t in _targets(args, kwargs))


def _caller() -> str:
    """file:line of the innermost frame outside torch and this module (where a recording was refused)."""
    frame = sys._getframe(1)
    while frame is not None and (frame.f_code.co_filename == __file__ or "torch" + os.sep in frame.f_code.co_filename
                                 or frame.f_code.co_filename.endswith("replay.py")):
        frame = frame.f_back
    return f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}" if frame is not None else "?"


def _storage(t: torch.Tensor) -> int:
    return 0 if t.is_meta else t.untyped_storage().data_ptr()


class _TapeRecorder(_Recorder):
    """:class:`ppl_em.fast.replay._Recorder` for a whole step: keeps every torch call that reads a tracked
    tensor, a root, a tensor made from one, or one that shares storage with a tracked tensor (the views the
    engine makes of a distribution's tensors); a call that writes a tracked tensor and returns nothing
    (``t[i] = v``) is kept too.

    A kept call is ``(func, args, kwargs, fresh, before)``, as in :mod:`ppl_em.fast.replay`: ``fresh`` pairs
    the position of each new tensor result (None for a call's one tensor result) with that tensor; ``before``
    holds the values that an in-place call's untracked targets had. ``bool(t)`` (and ``torch.equal``) of a
    tracked ``t`` is kept as a guard, ``(_GUARD, func, args, kwargs, result)``."""

    subject = "the step"

    def __init__(self, roots: Dict[str, torch.Tensor]) -> None:
        super().__init__(roots)
        self.tracked.update({id(t): t for t in roots.values()})
        self.storages = {_storage(t) for t in roots.values()} - {0}
        self.constants: set = set()  # storages of the untracked tensors that kept calls read

    def _is_tracked(self, t: torch.Tensor) -> bool:
        if id(t) in self.tracked:
            return True
        if _storage(t) in self.storages:  # alive: every tracked tensor is referenced, so its storage is not reused
            self.tracked[id(t)] = t
            return True
        return False

    def _read(self, storages: set) -> None:
        """A kept call read untracked tensors of these storages (alive while the call holds them)."""
        self.constants |= storages

    def _track(self, t: torch.Tensor, storage: Optional[int] = None) -> None:
        super()._track(t)
        storage = _storage(t) if storage is None else storage
        if storage:  # (0: a tensor on the meta device, which holds no values)
            self.storages.add(storage)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.problem is not None:
            return func(*args, **kwargs)
        name = _name(func)
        if name in _UNEXAMINED:  # about half the calls of a step
            return func(*args, **kwargs)
        if name in _AUTOGRAD:  # a replay reruns the forward calls only, without autograd
            self.problem = f"the step differentiates ({name}): autograd is not replayed"
            return func(*args, **kwargs)
        inputs = _tensors(args, kwargs)
        tracked = [t for t in inputs if self._is_tracked(t)]
        mutates = _mutates(name, kwargs)
        if not tracked:
            if mutates and self.constants and any(_storage(t) in self.constants for t in _targets(args, kwargs)):
                # a replay would read what the step wrote last, not what the kept calls read in between
                self.problem = (f"the step overwrites ({name}, at {_caller()}) a tensor that it read as a constant, "
                                "one not made from the parameters (a buffer reused for blocks of the data)")
            return func(*args, **kwargs)
        before = [(t, t.detach().clone()) for t in _targets(args, kwargs)
                  if not self._is_tracked(t)] if mutates and not _overwrites(args, kwargs) else []
        constant = {_storage(t) for t in inputs if id(t) not in self.tracked} - {0}  # the untracked inputs' storages
        result = func(*args, **kwargs)
        single = isinstance(result, torch.Tensor)  # most calls: one tensor result, no flattening
        outputs = (result,) if single else _leaves(result)
        if mutates and not self._track_target(name, args, kwargs):
            return result
        if not single and not any(isinstance(o, torch.Tensor) for o in outputs):
            if mutates:  # t[i] = v
                self.ops.append((func, args, kwargs, [], before))
                self._read(constant)
            elif name in _READS:
                self.ops.append((_GUARD, func, args, kwargs, result))
                self._read(constant)
            elif name not in _METADATA and name not in _IDENTITY and not all(isinstance(o, _SAFE_RESULTS) for o in outputs):
                self.problem = (f"the step reads a value out of a tensor that depends on the parameters ({name}, "
                                f"at {_caller()})")
            return result
        followed = {_storage(t) for t in tracked}
        fresh = []
        for i, out in enumerate(outputs):
            if not isinstance(out, torch.Tensor) or id(out) in self.tracked:
                continue
            storage = _storage(out)
            if storage in constant:  # a view of a constant argument (broadcast beside a tracked one)
                continue
            self._track(out, storage)
            if storage not in followed:  # a view of a tracked argument follows it by itself
                fresh.append((None if single else i, out))  # None: the call's one result
        self.read.update((id(t), t) for t in inputs if id(t) not in self.tracked)
        if fresh or mutates:
            self.ops.append((func, args, kwargs, fresh, before))
            self._read(constant)
        return result


class _Tape:
    """One recorded step: its key, the parameters' tensors (roots), the kept calls and guards, the loss.

    ``calls`` is what a replay runs, one ``(kind, thunk, target)`` per kept call, ``thunk`` the call with its
    recorded arguments bound (a ``functools.partial``: a replay does not unpack them again): a guard
    ``(_GUARD, thunk, expected)``; a call with one new tensor result ``(_COPY, thunk, old)`` (its result copied
    into ``old``, the tensor the recorded step made) or ``(_OUT, thunk, None)`` (the result written into
    ``old`` directly, no tensor made: the call with ``out=old``, or a call of the same values that writes
    there, :func:`_into`) or ``(_TRY, thunk, (old, copy))`` (``out=`` tried at the next replay, ``copy``, the
    call without it, where the function takes none; ``old`` a tuple for the several results of ``max`` or
    ``cholesky_ex``); an in-place call on the step's own tensors, which needs nothing restored first,
    ``(_OUT, thunk, None)`` too; any other ``(_CALL, thunk, (fresh, before))``. A replay written straight into
    the recorded tensors that is not equal to the bit to the real step (another kernel) falls back to copies
    (:meth:`copies`).
    """

    def __init__(self, key, roots: Dict[str, torch.Tensor], ops: List[tuple], loss: torch.Tensor,
                 start: Dict[str, torch.Tensor]) -> None:
        self.key, self.roots, self.ops, self.loss, self.start = key, roots, ops, loss, start
        self.written = _written(ops)  # storages that kept calls write: their values change from replay to replay
        self.verified = False
        self.writes_last = _writes_last(ops, roots)  # a replay that raises has written no parameter
        self.pins: tuple = ()
        self.calls = self._calls(True)
        self.direct = True  # whether some calls may write their results with out=

    def _calls(self, direct: bool) -> List[tuple]:
        """The replay's calls; a call that only makes tensors on the meta device (shapes, no values) is dropped."""
        return [self._call(op, direct, self.written) for op in self.ops
                if op[0] == _GUARD or op[4] or not op[3] or any(not t.is_meta for _, t in op[3])]

    @staticmethod
    def _call(op: tuple, direct: bool, written: set) -> tuple:
        bound = functools.partial
        if op[0] == _GUARD:
            _, func, args, kwargs, expected = op
            return (_GUARD, bound(func, *args, **kwargs), expected)
        func, args, kwargs, fresh, before = op
        name = _name(func)
        if len(fresh) == 1 and fresh[0][0] is None and not before:
            old = fresh[0][1]
            if direct and name == "clone" and len(args) == 1 and not kwargs:  # the copy itself, into old
                return (_OUT, bound(old.copy_, *args), None)
            into = _into(name, args, kwargs, old, written) if direct else None
            if into is not None:  # the result written straight into old by another call of the same values
                return (_OUT, into, None)
            alt = (_OUT_FORMS.get(name) or getattr(torch, name, None)) if direct and "out" not in kwargs else None
            if callable(alt) and (old.is_contiguous() or name in _OWN_LAYOUT):
                return (_TRY, bound(alt, *args, **dict(kwargs, out=old)), (old, bound(func, *args, **kwargs)))
            return (_COPY, bound(func, *args, **kwargs), old)
        if not fresh and not before:  # in place, on tensors the step made itself: the call alone
            return (_OUT, bound(func, *args, **kwargs), None)
        if direct and name in _OUT_TUPLES and not before and "out" not in kwargs and [i for i, _ in fresh] == list(
                range(len(fresh))):  # every result into its recorded tensor: out=(values, indices)
            outs = tuple(t for _, t in fresh)
            return (_TRY, bound(_OUT_TUPLES[name], *args, **dict(kwargs, out=outs)), (outs, bound(func, *args, **kwargs)))
        return (_CALL, bound(func, *args, **kwargs), (fresh, before))

    def copies(self) -> None:
        """Every result copied, none written with out= (after a replay that was not equal to a real step)."""
        self.calls, self.direct = self._calls(False), False

    def replay(self, into: Optional[List[torch.Tensor]] = None,
               values: Optional[List[torch.Tensor]] = None) -> Optional[torch.Tensor]:
        """Rerun the step; the loss tensor, or None where a guard came out otherwise (nothing written yet).
        Under ``torch.inference_mode``: nothing of a replay is differentiated, and the recorded tensors it
        writes into are ordinary ones. ``into``, ``values``: the recorded parameters' tensors and the values
        they take first (see :meth:`run`); ``values`` get the results after a replay that ran to its end."""
        calls = self.calls
        with torch.inference_mode():
            if into is not None:
                torch._foreach_copy_(into, values)
            for j, (kind, thunk, target) in enumerate(calls):
                if kind == _OUT:
                    thunk()
                elif kind == _COPY:
                    target.copy_(thunk())
                elif kind == _GUARD:
                    if thunk() != target:
                        return None
                elif kind == _TRY:
                    old, copy = target
                    try:
                        thunk()
                        calls[j] = (_OUT, thunk, None)
                    except (TypeError, RuntimeError, IndexError):  # no out= (a method without a function of its name, say)
                        if isinstance(old, tuple):  # several results: each into its tensor
                            calls[j] = (_CALL, copy, (list(enumerate(old)), []))
                            for t, value in zip(old, copy()):
                                t.copy_(value)
                        else:
                            calls[j] = (_COPY, copy, old)
                            old.copy_(copy())
                else:
                    fresh, before = target
                    for t, value in before:
                        t.copy_(value)
                    result = thunk()
                    if fresh:
                        outputs = [result] if fresh[0][0] is None else _leaves(result)
                        for i, old in fresh:
                            old.copy_(outputs[i or 0])
            if into is not None:
                torch._foreach_copy_(values, into)
        return self.loss

    def run(self, roots: Dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
        """:meth:`replay` on the param store's tensors ``roots``: where they are not the recorded ones (the
        store cleared and filled again for a restart, the same names, shapes and constraints), their values
        go into the recorded tensors first, and the results back into them after."""
        own = self.roots
        if all(own[n] is roots[n] for n in own):
            return self.replay()
        return self.replay(list(own.values()), [roots[n] for n in own])


def _written(ops: List[tuple]) -> set:
    """The storages of the new tensors that kept calls make and of the tensors they change in place."""
    found = set()
    for op in ops:
        if op[0] == _GUARD:
            continue
        func, args, kwargs, fresh, _ = op
        found |= {_storage(t) for _, t in fresh}
        if _mutates(_name(func), kwargs):
            found |= {_storage(t) for t in _targets(args, kwargs)}
    return found


def _into(name: str, args: tuple, kwargs: dict, old: torch.Tensor, written: set) -> Optional[Callable[[], object]]:
    """A call that writes the values of ``name(*args, **kwargs)`` into ``old`` (the recorded result, a new
    tensor of the step) without making a tensor, for calls without an ``out=``: a gather by a constant index
    tensor (``base[index]``, an enumerated value, say; ``written``: the storages whose values change between
    replays) as ``index_select``, a ``reshape`` that copied as a copy into ``old`` seen in the source's shape,
    ``diag_embed`` as old's diagonal set over zeros. None for any other call. (The same values to the bit: each
    is the same copy of the same elements; the first replay's check says so, as for out=.)"""
    if kwargs or not old.is_contiguous() or not args or not isinstance(args[0], torch.Tensor):
        return None
    src = args[0]
    if name == "__getitem__" and len(args) == 2:
        index, dim = args[1], 0
        if isinstance(index, tuple) and len(index) == 2 and index[0] is Ellipsis:  # x[..., index]: the last dim
            index, dim = index[1], src.dim() - 1
        if not (isinstance(index, torch.Tensor) and index.dtype == torch.long and index.is_contiguous()
                and _storage(index) not in written and index.numel() and bool((index >= 0).all())):
            return None
        if dim == 0 and old.shape == index.shape + src.shape[1:]:
            return functools.partial(torch.index_select, src, 0, index.view(-1), out=old.view((-1,) + src.shape[1:]))
        if dim > 0 and index.dim() == 1 and old.shape == src.shape[:-1] + index.shape:
            return functools.partial(torch.index_select, src, dim, index, out=old)
        return None
    if name == "isfinite" and len(args) == 1 and src.is_floating_point():  # |x| < inf: false at NaN and at +-inf
        magnitude = torch.empty_like(src)

        def isfinite() -> None:
            torch.abs(src, out=magnitude)
            torch.lt(magnitude, math.inf, out=old)
        return isfinite
    if name == "reshape" and src.numel() == old.numel():
        return functools.partial(old.view(src.shape).copy_, src)
    if name == "diag_embed" and len(args) == 1 and src.dim() >= 1 and old.shape == src.shape + src.shape[-1:]:
        diagonal = old.diagonal(dim1=-2, dim2=-1)

        def diag_embed() -> None:
            old.zero_()
            diagonal.copy_(src)
        return diag_embed
    return None


def _held_bytes(ops: List[tuple]) -> int:
    """The memory that a recording keeps alive: the new tensors its calls made, and the copies it restores."""
    seen, total = set(), 0
    for op in ops:
        if op[0] == _GUARD:
            continue
        for t in [old for _, old in op[3]] + [value for _, value in op[4]]:
            if id(t) not in seen and not t.is_meta:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def _parameter_targets(op: tuple, storages: set) -> List[bool]:
    """For each tensor a kept call writes in place, whether it is a parameter's (``storages``: the
    parameters'); empty for a guard or a call that writes nothing in place."""
    if op[0] == _GUARD or not _mutates(_name(op[0]), op[2]):
        return []
    return [_storage(t) in storages for t in _targets(op[1], op[2])]


def _writes_last(ops: List[tuple], roots: Dict[str, torch.Tensor]) -> bool:
    """Whether every call from the first that writes a parameter on writes a parameter (the M-step's
    writes, last): a replay that raises on its way has then changed no parameter."""
    storages = {_storage(r) for r in roots.values()}
    written = False
    for op in ops:
        targets = _parameter_targets(op, storages)
        writes = bool(targets) and all(targets)
        if written and not writes:
            return False
        written = written or writes
    return True


def _guards_first(ops: List[tuple], roots: Dict[str, torch.Tensor]) -> bool:
    """Whether every guard comes before the first call that writes a parameter: a replay stopped by a guard
    has then changed nothing that the real step reads."""
    storages = {_storage(r) for r in roots.values()}
    written = False
    for op in ops:
        if op[0] == _GUARD:
            if written:
                return False
        elif any(_parameter_targets(op, storages)):
            written = True
    return True


class StepTape:
    """The closed-form steps of one EM object, recorded once per key and replayed (see the module docstring).

    ``step(region, key, roots)`` returns what ``region()`` returns, the loss tensor of one step: from a
    replay where a checked recording for ``key`` exists, else from ``region()`` itself, recorded where the
    last recording was for another key (the key says that the data were seen before). ``roots`` are the
    param store's unconstrained tensors that the step reads and writes, by name. A ``key`` of None: no
    replay, and nothing recorded. ``pins``: the objects whose ids ``key`` holds (the data), kept alive with
    the recording.
    """

    def __init__(self) -> None:
        self.tape: Optional[_Tape] = None
        self.off: Optional[str] = None  # why steps are not replayed
        self.replays = 0  # steps served by a replay (for tests and profiles)
        self.misses = 0  # replays stopped by a guard (the step went another way)
        self.warned = 0  # recordings dropped because the step warned

    def step(self, region: Callable[[], torch.Tensor], key, roots: Dict[str, torch.Tensor],
             pins: tuple = ()) -> torch.Tensor:
        if self.off is not None or key is None:
            return region()
        tape = self.tape
        if tape is not None and tape.key == key:
            if not tape.verified and all(torch.equal(r, tape.start[n]) for n, r in roots.items()):
                return region()  # a check at the recorded theta would prove nothing: it waits for another
            before = None if tape.verified else _values(roots)
            loss = tape.run(roots)
            if loss is None:  # a guard: the step goes another way this time, and that way is recorded
                self.misses += 1
                if self.misses > RECORDINGS_AFTER_MISSES:  # a step whose way keeps changing: run for real
                    return region()
                return self._record(region, key, roots, pins)
            if tape.verified:
                self.replays += 1
                return loss
            return self._check(tape, region, roots, before, loss.clone())
        return self._record(region, key, roots, pins)

    def _record(self, region: Callable[[], torch.Tensor], key, roots: Dict[str, torch.Tensor],
                pins: tuple) -> torch.Tensor:
        self.tape = None
        recorder = _TapeRecorder(roots)
        start = {n: r.detach().clone() for n, r in roots.items()}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with recorder:
                loss = region()
        for w in caught:  # the step's own warnings, as it gave them
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if recorder.problem is None and not _guards_first(recorder.ops, roots):
            recorder.problem = "the step decides from a tensor after it has written a parameter"
        held = _held_bytes(recorder.ops)
        if recorder.problem is None and held > TAPE_BYTES:
            recorder.problem = (f"a recording would keep {held / 2 ** 20:.0f} MB of the step's tables "
                                f"(at most {TAPE_BYTES / 2 ** 20:.0f} MB): at this size the step's own Python is a small part of it")
        if recorder.problem is not None:
            self.off = recorder.problem
        elif caught:
            self.warned += 1
            if self.warned >= 2:  # not a passing warning: no recording will be made
                self.off = f"the step warns ({caught[0].category.__name__}: {caught[0].message})"
        elif torch.is_tensor(loss) and id(loss) in recorder.tracked:
            self.tape = _Tape(key, roots, recorder.ops, loss, start)
            self.tape.pins = pins  # the objects whose ids the key holds: no other object takes them meanwhile
        return loss

    def _check(self, tape: _Tape, region, roots: Dict[str, torch.Tensor], before: List[torch.Tensor],
               loss: torch.Tensor) -> torch.Tensor:
        """The first replay against a real step from the same theta; the real step's loss is returned."""
        after = _values(roots)
        with torch.no_grad():
            for root, value in zip(roots.values(), before):
                root.copy_(value)
        real = region()
        same = torch.equal(real.detach(), loss) and all(torch.equal(r, a) for r, a in zip(roots.values(), after))
        if not same and tape.direct:  # a function's out= variant may round otherwise: copies, checked again
            tape.copies()
        elif not same:
            self.tape, self.off = None, "a replay of the recorded step differed from a real step"
        else:
            tape.verified = True  # checked at a theta other than the recorded one (see step)
        return real


def _values(roots: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
    return [r.detach().clone() for r in roots.values()]
