"""Where rows come from: tensors in memory, numpy memory maps, DataLoaders, re-iterables of batches.

The M-step needs only sums over data points (:class:`ppl_em.Statistics`), so one EM iteration can
read the data batch by batch, b = 1 .. B, and never hold more than one batch:

    theta := maximize( sum_b summarize(x_b) )      (the same E-step and M-step as in memory)

Memory stays O(batch), and the result equals EM on the data in memory to float rounding (sums are
float64 about the plan's fixed centres, only added in another order).

A **data source** stands in the place of a tensor of rows among the model's arguments:
``em.step(source, k)`` or ``ppl_em.fit(model, source, k)``. Sources are

* a numpy memory map ``np.load("big.npy", mmap_mode="r")``, or any array wrapped as ``Rows(array)``
  (:class:`Rows`: read in contiguous batches of about :data:`BATCH_BYTES`; rows sampled by index for
  initialisation);
* a ``torch.utils.data.DataLoader`` or any other re-iterable of batches (:class:`Batches`).

Each batch is the rows of that argument (a tensor or numpy array), a tuple of positional arguments
spliced in its place (a ``DataLoader`` over ``TensorDataset(words, doc)`` yields ``[words_b, doc_b]``),
or a dict of keyword arguments (``{"x": x_b, "labels": l_b}``). Lists and tuples among the model's
arguments are passed to the model unchanged: wrap a list of batches as ``Batches(list_of_batches)``.

The rows of a batch are the data plate's rows (a mixture's data points; an HMM's sequences): batches
must cut the data where :mod:`ppl_em.chunking` could, between data points that the model treats as
independent.

References: pomegranate's ``summarize`` / ``from_summaries``; Neal & Hinton, "A view of the EM
algorithm", 1998.
"""

from __future__ import annotations

import collections.abc
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch

from .statistics import Statistics

__all__ = ["Rows", "Batches", "Source", "as_source", "find", "bind", "Data", "summarize", "log_likelihood",
           "BATCH_BYTES", "SAMPLE_ROWS", "CHECK_ROWS"]

# Rows of a memory map read per batch: about 32 MiB of data. EM streams each batch in its own chunks
# (chunking.CHUNK_BYTES), so a batch bounds only the copy of the data in memory; fewer, larger batches
# pay the model's per-trace cost fewer times.
BATCH_BYTES = 32 * 2**20
# Rows on which fit and a result run the model to check it (parameter shapes, dtypes, the observations
# per row): never all of a large data set, whose plain run would build per-row tensors (a GMM's Sigma_z of
# n x d x d); at least as many as any sensible number of components.
CHECK_ROWS = 4096
# In-memory data of at most this many elements are used whole where rows would be taken.
SMALL_ELEMENTS = 2**16
# Rows drawn (uniformly, without replacement) for initialisation from a source: k-means++ seeding and
# the model's own initial values (a GMM's data covariance) see this sample, not the whole data.
SAMPLE_ROWS = 65536

Batch = Union[torch.Tensor, tuple, list, dict]
Key = Union[int, str]


class Source:
    """A data set read batch by batch; iterating it gives one pass. See the module docstring."""

    def __iter__(self) -> Iterator[Batch]:
        raise NotImplementedError

    @property
    def rows(self) -> int:
        """Rows in one pass (counted by a pass over the batches where the source cannot tell)."""
        raise NotImplementedError

    def sample(self, m: int, generator: torch.Generator) -> Batch:
        """m rows drawn uniformly without replacement (all rows if there are at most m), as one batch."""
        raise NotImplementedError


class Rows(Source):
    """An array of rows, shape (n, ...), read in contiguous batches: a numpy memory map, any numpy array,
    or a tensor. Memory: one batch at a time (a memory map's pages are page cache, not the process's).

    Parameters
    ----------
    data : numpy.ndarray or torch.Tensor
        The rows, e.g. ``np.load("big.npy", mmap_mode="r")`` of shape (n, d).
    batch_size : int, optional
        Rows per batch; default about :data:`BATCH_BYTES` of data per batch.
    dtype : torch.dtype, optional
        The dtype of the batches (default: the array's own).
    start, stop : int, optional
        Only rows [start, stop) (default all): a shard, see :meth:`shard`.
    device : torch.device or str, optional
        Where the batches go (default: where the data are; a numpy array's rows on the CPU), e.g. ``"cuda"``:
        the file stays on disk, one batch at a time is read and copied to the GPU, and EM's statistics and
        parameters follow the batches there (put ``init`` on that device too).

    Examples
    --------
    >>> rows = Rows(np.arange(10.0).reshape(5, 2), batch_size=2)
    >>> [tuple(b.shape) for b in rows], rows.rows
    ([(2, 2), (2, 2), (1, 2)], 5)
    >>> rows.shard(1, 2).rows                      # rank 1 of 2: rows 2, 3, 4
    3
    """

    def __init__(self, data, batch_size: Optional[int] = None, dtype: Optional[torch.dtype] = None,
                 start: int = 0, stop: Optional[int] = None, device=None) -> None:
        if not isinstance(data, (np.ndarray, torch.Tensor)) or data.ndim < 1:
            raise ValueError(f"Rows needs a numpy array or tensor of shape (n, ...), got {_describe(data)}.")
        self.device = None if device is None else _usable_device(device)
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
        self.data, self.dtype = data, dtype
        self.start, self.stop = start, len(data) if stop is None else stop
        row_bytes = max(1, math.prod(data.shape[1:]) * data.itemsize if isinstance(data, np.ndarray)
                        else math.prod(data.shape[1:]) * data.element_size())
        self.batch_size = batch_size or max(1024, BATCH_BYTES // row_bytes)

    @property
    def rows(self) -> int:
        return self.stop - self.start

    def __len__(self) -> int:
        return self.rows

    @property
    def shape(self) -> tuple:
        return (self.rows,) + tuple(self.data.shape[1:])

    def __iter__(self) -> Iterator[torch.Tensor]:
        for begin in range(self.start, self.stop, self.batch_size):
            yield self.read(slice(begin, min(begin + self.batch_size, self.stop)))

    def read(self, index) -> torch.Tensor:
        """Rows ``index`` (a slice, or sorted absolute row numbers) as a tensor: a copy of a numpy array's rows
        (a memory map's slice would alias the file), a tensor's own slice."""
        part = self.data[index]
        if isinstance(part, np.ndarray):  # a memory map's slice is a view of the file: copy it into memory
            part = torch.from_numpy(np.array(part, copy=True))
        if self.dtype is None and self.device is None:
            return part
        return part.to(device=self.device, dtype=self.dtype)

    def sample(self, m: int, generator: torch.Generator) -> torch.Tensor:
        pick = _sample_indices(self.rows, m, generator) + self.start
        return self.read(pick.numpy() if isinstance(self.data, np.ndarray) else pick)

    def shard(self, rank: int, world: int) -> "Rows":
        """Rank ``rank``'s contiguous share of the rows, of ``world`` near-equal shares (no padding: no row
        is read by two ranks, unlike ``DistributedSampler``, which repeats rows to even the shares)."""
        part = shard_range(self.rows, rank, world)
        return Rows(self.data, self.batch_size, self.dtype, self.start + part.start, self.start + part.stop, self.device)

    def __repr__(self) -> str:
        where = "" if self.device is None else f", device={str(self.device)!r}"
        return f"Rows({type(self.data).__name__} of shape {self.shape}, batch_size={self.batch_size}{where})"


def _usable_device(device) -> torch.device:
    """``device`` as a torch.device; a clear error for a name torch does not know or a GPU this machine lacks."""
    try:
        found = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must name a torch device (e.g. 'cpu', 'cuda', 'cuda:1'), got {device!r}: {error}") from None
    if found.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for, but torch finds no CUDA device on this machine; "
                         "leave device unset (the batches stay on the CPU) or run where a GPU is.")
    if found.type == "cuda" and found.index is not None and found.index >= torch.cuda.device_count():
        raise ValueError(f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s).")
    return found


class Batches(Source):
    """A re-iterable of batches: a ``DataLoader``, a list of batches, any object whose ``__iter__``
    starts a new pass, or a function of no arguments that returns a fresh iterable.

    ``rows``: the rows of one pass, if known (otherwise a ``DataLoader`` that covers its data set once
    tells ``len(dataset)``, and any other source is counted by one pass over its batches).

    Examples
    --------
    >>> source = Batches([torch.zeros(3, 2), torch.ones(2, 2)])
    >>> source.rows, [tuple(b.shape) for b in source]
    (5, [(3, 2), (2, 2)])
    """

    def __init__(self, batches: Union[Iterable, Callable[[], Iterable]], rows: Optional[int] = None) -> None:
        if isinstance(batches, collections.abc.Iterator):
            raise ValueError(one_shot_message(batches))
        if not (callable(batches) or isinstance(batches, collections.abc.Iterable)):
            raise ValueError(f"Batches needs a re-iterable of batches or a function returning one, got "
                             f"{_describe(batches)}.")
        self.batches, self._rows = batches, rows

    def __iter__(self) -> Iterator[Batch]:
        made = self.batches() if callable(self.batches) and not isinstance(self.batches, collections.abc.Iterable) \
            else self.batches
        for batch in made:
            yield _as_tensors(batch)

    @property
    def rows(self) -> int:
        if self._rows is None:
            self._rows = _loader_rows(self.batches)
        if self._rows is None:
            self._rows = sum(batch_rows(b) for b in self)
        return self._rows

    def sample(self, m: int, generator: torch.Generator) -> Batch:
        """One pass, keeping the m rows with the smallest uniform random keys (reservoir sampling)."""
        kept, keys, total = None, None, 0
        for batch in self:
            rows = batch_rows(batch)
            total += rows
            new = torch.rand(rows, generator=generator, dtype=torch.float64)
            kept = batch if kept is None else concatenate([kept, batch])
            keys = new if keys is None else torch.cat([keys, new])
            if len(keys) > m:
                best = torch.topk(keys, m, largest=False).indices.sort().values
                kept, keys = select_rows(kept, best), keys[best]
        if kept is None:
            raise ValueError("The data source yielded no batch: nothing to sample rows from.")
        self._rows = self._rows if self._rows is not None else total
        return kept

    def __repr__(self) -> str:
        return f"Batches({_describe(self.batches)})"


# -- which argument is a source, and the arguments of one batch -------------------------------------
def as_source(value: Any) -> Optional[Source]:
    """The value as a :class:`Source`, or None if it is an ordinary model argument (a tensor, a number,
    a list, a dict, a module, ...). One-shot iterators (generators) are refused: an EM iteration reads
    the data once per iteration."""
    if isinstance(value, Source):
        return value
    if isinstance(value, np.memmap):
        return Rows(value)
    if isinstance(value, np.ndarray) or _is_model_argument(value):  # an array in memory: wrap it, Rows(x)
        return None
    _refuse_dataset(value)
    if isinstance(value, collections.abc.Iterator):
        raise ValueError(one_shot_message(value))
    if isinstance(value, collections.abc.Iterable):
        return Batches(value)
    return None


def _is_model_argument(value: Any) -> bool:
    plain = (torch.Tensor, str, bytes, int, float, complex, bool, type(None), torch.nn.Module,
             collections.abc.Mapping, collections.abc.Sequence, collections.abc.Set, torch.Size)
    return isinstance(value, plain) or callable(value) and not isinstance(value, collections.abc.Iterable)


def _refuse_dataset(value: Any) -> None:
    if isinstance(value, torch.utils.data.Dataset) and not isinstance(value, torch.utils.data.DataLoader):
        raise ValueError(f"A {type(value).__name__} yields single rows, not batches; wrap it in a "
                         "torch.utils.data.DataLoader(dataset, batch_size=...) and pass the loader.")


def one_shot_message(value: Any) -> str:
    return (f"The data source is a one-shot iterator ({type(value).__name__}): it can be read once, but EM reads "
            "the data once per iteration. Pass a re-iterable (a list of batches, a DataLoader), or a function "
            "that returns a fresh iterator: ppl_em.sources.Batches(lambda: make_batches()); for a stream that "
            "cannot be replayed, use ppl_em.OnlineEM(...).partial_fit(batch) on each batch.")


def find(args: tuple, kwargs: dict) -> Optional[Tuple[Key, Source]]:
    """The (position or name, source) of the one data source among the model's arguments, or None."""
    found = [(key, s) for key, value in list(enumerate(args)) + list(kwargs.items())
             for s in [as_source(value)] if s is not None]
    if len(found) > 1:
        raise ValueError(f"Several model arguments are data sources ({[k for k, _ in found]}); pass one source "
                         "whose batches hold every row argument (a tuple or a dict per batch).")
    return found[0] if found else None


def bind(key: Key, batch: Batch, args: tuple, kwargs: dict) -> Tuple[tuple, dict]:
    """The model's arguments for one batch: the batch in the source's place (a tensor), spliced in at its
    position (a tuple or list of positional arguments), or merged into the keyword arguments (a dict)."""
    batch = _as_tensors(batch)
    if isinstance(batch, dict):
        rest = tuple(a for i, a in enumerate(args) if i != key)
        return rest, {**{k: v for k, v in kwargs.items() if k != key}, **batch}
    if isinstance(batch, (tuple, list)):
        if not isinstance(key, int):
            raise ValueError(f"The source passed as keyword argument {key!r} yields tuples of arguments; yield "
                             "tensors (its rows) or dicts of keyword arguments, or pass it by position.")
        return args[:key] + tuple(batch) + args[key + 1:], kwargs
    if isinstance(key, int):
        return args[:key] + (batch,) + args[key + 1:], kwargs
    return args, {**kwargs, key: batch}


def batches(args: tuple, kwargs: dict) -> Iterator[Tuple[tuple, dict]]:
    """The model's arguments for each batch of the source among them (the arguments themselves if none)."""
    found = find(args, kwargs)
    if found is None:
        yield args, kwargs
        return
    key, source = found
    for batch in source:
        yield bind(key, batch, args, kwargs)


# -- EM over a source ---------------------------------------------------------------------------------
def summarize(em, args: tuple, kwargs: dict) -> Statistics:
    """sum_b summarize(x_b): the statistics of every batch of the source among ``args`` (one pass).

    A batch whose E-step fails raises the error that explains it (the site with a non-finite
    log-probability, NaN data), saying which rows of the source it came from.
    """
    total, start = None, 0
    for b_args, b_kwargs in batches(args, kwargs):
        stats = _batch_statistics(em, b_args, b_kwargs, start)
        start += int(stats.n)
        if em.on_batch is not None:
            em.on_batch(int(stats.n))
        total = stats if total is None else total + stats
    if total is None:
        raise ValueError("The data source yielded no batch: nothing to summarise. Pass a source with at least "
                         "one row.")
    return total


def _batch_statistics(em, args: tuple, kwargs: dict, start: int) -> Statistics:
    from .diagnostics import explain_failure, non_finite_loss_message
    from .svi import NonFiniteLossError

    try:
        stats = em._summarize_here(args, kwargs)
        if not torch.isfinite(stats.objective):
            raise NonFiniteLossError(non_finite_loss_message(em.model, args, kwargs, em._what(), None))
    except (ValueError, RuntimeError, FloatingPointError) as error:
        explained = explain_failure(error, em.model, args, kwargs, em._what())
        raise located(explained, f"in the batch of the data source that starts at row {start}") from error
    return stats


def log_likelihood(em, args: tuple, kwargs: dict) -> float:
    """sum_b log p(x_b; theta): l(theta) of the whole source, one batch at a time."""
    return sum(em._log_likelihood_here(b_args, b_kwargs) for b_args, b_kwargs in batches(args, kwargs))


def located(error: BaseException, where: str) -> BaseException:
    """The same error with ``where`` added to its message (the error itself if its type cannot be rebuilt)."""
    try:
        moved = type(error)(f"{error} ({where})")
    except Exception:
        return error
    moved.__dict__.update(getattr(error, "__dict__", {}))
    return moved


# -- rows of a batch ----------------------------------------------------------------------------------
def batch_rows(batch: Batch) -> int:
    """Rows of a batch: the first dimension of its first tensor."""
    for value in _tensors_of(batch):
        if value.dim() >= 1:
            return int(value.shape[0])
    raise ValueError(f"A batch must hold a tensor of rows, got {_describe(batch)}.")


def select_rows(batch: Batch, index) -> Batch:
    """The rows ``index`` (a slice or indices) of every tensor of the batch that has the batch's rows."""
    rows = batch_rows(batch)
    pick = lambda v: v[index] if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == rows else v
    return _map(batch, pick)


def concatenate(parts: List[Batch]) -> Batch:
    """The batches as one: row tensors concatenated, anything else taken from the first."""
    first = parts[0]
    rows = [batch_rows(p) for p in parts]
    if torch.is_tensor(first):
        return torch.cat(parts)
    if isinstance(first, dict):
        return {k: _cat_field([p[k] for p in parts], rows) for k in first}
    return type(first)(_cat_field([p[i] for p in parts], rows) for i in range(len(first)))


def _cat_field(values: list, rows: List[int]):
    if all(torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == r for v, r in zip(values, rows)):
        return torch.cat(values)
    return values[0]


def _map(batch: Batch, fn):
    if isinstance(batch, dict):
        return {k: fn(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(fn(v) for v in batch)
    return fn(batch)


def _tensors_of(batch: Batch) -> List[torch.Tensor]:
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else [batch]
    return [v for v in values if torch.is_tensor(v)]


def _as_tensors(batch: Batch) -> Batch:
    """numpy arrays in a batch become tensors (a copy: a memory map's slice would alias the file)."""
    convert = lambda v: torch.from_numpy(np.array(v, copy=True)) if isinstance(v, np.ndarray) else v
    return _map(batch, convert)


def _sample_indices(n: int, m: int, generator: torch.Generator) -> torch.Tensor:
    """min(m, n) distinct indices in [0, n), uniformly, sorted (sequential reads of a memory map); O(m) memory
    for m much smaller than n."""
    if m >= n:
        return torch.arange(n)
    if n <= 4 * m:
        return torch.randperm(n, generator=generator)[:m].sort().values
    picked = torch.empty(0, dtype=torch.long)
    while len(picked) < m:  # draws with replacement, duplicates dropped: a few rounds at most
        more = torch.randint(n, (2 * (m - len(picked)),), generator=generator)
        picked = torch.unique(torch.cat([picked, more]))
    keep = torch.randperm(len(picked), generator=generator)[:m]
    return picked[keep].sort().values


def _loader_rows(value: Any) -> Optional[int]:
    """len(dataset) of a DataLoader that reads its data set exactly once per pass; None otherwise."""
    data = torch.utils.data
    if not isinstance(value, data.DataLoader) or value.drop_last or not isinstance(value.dataset, collections.abc.Sized):
        return None
    sampler = value.sampler
    once = isinstance(sampler, data.SequentialSampler) or (
        isinstance(sampler, data.RandomSampler) and not sampler.replacement and sampler.num_samples == len(value.dataset))
    if not once or not isinstance(value.batch_sampler, data.BatchSampler):
        return None
    return len(value.dataset)


def shard_range(n: int, rank: int, world: int) -> slice:
    """Rows [n r / W, n (r + 1) / W) of rank r of W: contiguous, near-equal, every row exactly once."""
    if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
        raise ValueError(f"rank must lie in [0, world) with world >= 1, got rank={rank!r}, world={world!r}.")
    return slice(n * rank // world, n * (rank + 1) // world)


def _describe(value: Any) -> str:
    shape = getattr(value, "shape", None)
    return f"{type(value).__name__}" + (f" of shape {tuple(shape)}" if shape is not None else "")


# -- the model's arguments seen as rows -----------------------------------------------------------------
@dataclass
class Data:
    """The model's arguments as rows of its data plate, wherever they are: a source among them, or tensors
    in memory that split along the plate (``chunking``: how ``EM.step`` would split them), or neither
    (one piece: the arguments as they are).

    What :func:`ppl_em.fit` and :class:`ppl_em.FitResult` need of the data, each in O(chunk) memory:
    ``pieces()`` (chunk-sized arguments), ``first(m)`` and ``sample(m)`` (m rows in memory), ``rows``.
    """

    args: tuple
    kwargs: dict
    source: Optional[Source] = None
    key: Optional[Key] = None
    chunking: Any = None

    @classmethod
    def of(cls, model: Callable, args: tuple, kwargs: dict, small: bool = True) -> "Data":
        """``small``: in-memory data of at most :data:`SMALL_ELEMENTS` elements are used whole (one piece)."""
        found = find(args, kwargs)
        if found is not None:
            return cls(args, kwargs, found[1], found[0])
        if small and _elements(args, kwargs) <= SMALL_ELEMENTS:
            return cls(args, kwargs)  # small: the whole data wherever rows would be taken
        return cls(args, kwargs, chunking=_chunking(model, args, kwargs))

    @property
    def splits(self) -> bool:
        """Whether rows can be taken: a source, or tensors split along a data plate."""
        return self.source is not None or bool(self.chunking is not None and self.chunking.positions)

    @property
    def rows(self) -> Optional[int]:
        if self.source is not None:
            return self.source.rows
        return self.chunking.n if self.splits else None

    def pieces(self) -> Iterator[Tuple[tuple, dict]]:
        """Chunk-sized model arguments that together hold every row once (the batches of a source)."""
        if self.source is not None:
            yield from batches(self.args, self.kwargs)
        elif self.chunking is not None and self.chunking.rows is not None:
            yield from self.chunking.split(self.args, self.kwargs)
        else:
            yield self.args, self.kwargs

    def first(self, m: int) -> Tuple[tuple, dict]:
        """The model's arguments for the first min(m, n) rows, in memory (all of them if rows cannot be taken)."""
        if self.source is not None:
            taken, count = [], 0
            for batch in self.source:
                taken.append(batch)
                count += batch_rows(batch)
                if count >= m:
                    break
            if not taken:
                raise ValueError("The data source yielded no batch: there are no rows to fit.")
            return bind(self.key, select_rows(concatenate(taken), slice(0, m)), self.args, self.kwargs)
        if self.splits:
            return self.chunking.take(self.args, self.kwargs, slice(0, m))
        return self.args, self.kwargs

    def sample(self, m: int, generator: torch.Generator) -> Tuple[tuple, dict]:
        """The model's arguments for min(m, n) rows drawn uniformly without replacement, in memory."""
        if self.source is not None:
            return bind(self.key, self.source.sample(m, generator), self.args, self.kwargs)
        if self.splits and self.chunking.n > m:
            return self.chunking.take(self.args, self.kwargs, _sample_indices(self.chunking.n, m, generator))
        return self.args, self.kwargs


def _elements(args: tuple, kwargs: dict) -> int:
    return sum(v.numel() for v in list(args) + list(kwargs.values()) if torch.is_tensor(v))


def _chunking(model: Callable, args: tuple, kwargs: dict):
    """How EM would split these in-memory arguments (None for a model without an exact E-step). Decided in
    a copy of the param store: parameters the model would create are created there and dropped."""
    import pyro

    from .em import EM
    from .store import capture_store

    store = pyro.get_param_store()
    try:
        with store.scope(capture_store()):
            return EM(model)._prepare(args, kwargs, plan=False)
    except Exception:  # no exact E-step, or a model that rejects the data: the caller's run of it will say why
        return None
