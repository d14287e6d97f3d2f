"""How a step goes through the data: in chunks of the data plate, where that is exact.

The M-step needs only sums over data points (:class:`ppl_em.Statistics`), and Q(z^(i)) depends on
row i alone, so the E-step can run chunk by chunk and the statistics add up: memory stays O(chunk)
instead of O(n k d). Splitting is exact when one plate holds every site of the data, the tensor
arguments whose first dimension is that plate's size are the ones split, and the model treats rows
alike and independently (checked once: log p(x) of 2m rows must equal the sum over two halves).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import pyro
import torch
from pyro.distributions.util import is_validation_enabled

from .fast import has_gemm_path
from .fast.tensors import compact
from .posterior import ModelStructure, exact_posterior, one_latent, sample_sites

__all__ = ["Chunking", "decide", "signature"]

# chunk_size="auto": rows per chunk such that the largest per-chunk tensor (a site's (k, rows)
# log-density; (k, rows, d) where a family's log_prob forms the event's terms) stays under 31 MiB.
# Fewer, larger chunks pay the model's per-trace cost fewer times. The fast paths' chunk-sized tables come from a pool
# (ppl_em.fast.Workspace); any other tensor of that size is allocated per chunk, and above glibc's
# largest mmap threshold (32 MiB) every such allocation is page-faulted anew (measured 15-30%
# slower). The chunks are then evened out: 4 of 250000 rows, not 3 and a rest (a Poisson mixture of
# n = 1e6, k = 16).
CHUNK_BYTES = 31 * 2**20
# A Gaussian site's (k, rows) log-density table and the posterior made from it come from that pool (a fused
# pass keeps only the posterior): they may take up to POOLED_CHUNKS times CHUNK_BYTES a chunk, which bounds the
# memory a step holds. Each chunk costs the model's run and the pass's start and end on the threads: a Gaussian
# mixture with n = 1e6, d = 10, k = 16 measured 147 ms a step in 4 chunks, 130 in 2, 123 in 1 (no page faults
# in either).
POOLED_CHUNKS = 4


@dataclass
class Chunking:
    """How :meth:`ppl_em.EM.step` splits the data: ``rows`` per chunk along the first dimension of the
    arguments at ``positions`` (None: the whole data at once), for data of the given shapes
    (``signature``); ``n`` is the data plate's size (0 if there is none), ``why`` says what was decided.
    ``settled`` is False where the decision holds for these data alone (the split check could not tell:
    log p(x) of its rows is not finite, and the step fails on them): other data are decided again."""

    signature: tuple
    rows: Optional[int] = None
    n: int = 0
    positions: Tuple = ()
    why: str = ""
    plate: Optional[str] = None
    settled: bool = True
    _held: Optional[tuple] = field(default=None, repr=False, compare=False)  # split_held's data and views

    def take(self, args: tuple, kwargs: dict, rows: slice):
        """The arguments restricted to ``rows`` of the data plate."""
        return (tuple(a[rows] if i in self.positions else a for i, a in enumerate(args)),
                {k: (v[rows] if k in self.positions else v) for k, v in kwargs.items()})

    def split(self, args: tuple, kwargs: dict) -> List[Tuple[tuple, dict]]:
        """The chunks of ``rows`` rows (the whole data when not streaming)."""
        if self.rows is None:
            return [(args, kwargs)]
        return [self.take(args, kwargs, slice(start, min(start + self.rows, self.n)))
                for start in range(0, self.n, self.rows)]

    def split_held(self, args: tuple, kwargs: dict) -> List[Tuple[tuple, dict]]:
        """:meth:`split`, with the same view tensors at every call on the same data tensors (the very objects;
        a view shares its base's version, so an in-place change shows in it), the other arguments as given:
        a chunk's model run then meets the same arguments at every step and can be replayed
        (:class:`ppl_em.fast.Replay`). The views of the last data split so are held: for data held anyway
        (a step's), never for the batches of a stream."""
        if self.rows is None:
            return [(args, kwargs)]
        rows = [args[p] if isinstance(p, int) else kwargs[p] for p in self.positions]
        held = self._held
        if held is None or len(held[0]) != len(rows) or any(a is not b for a, b in zip(held[0], rows)):
            views = [{p: (c_args[p] if isinstance(p, int) else c_kwargs[p]) for p in self.positions}
                     for c_args, c_kwargs in self.split(args, kwargs)]
            held = self._held = (rows, views)
        return [(tuple(views.get(i, a) for i, a in enumerate(args)), {k: views.get(k, v) for k, v in kwargs.items()})
                for views in held[1]]

    def rows_of(self, args: tuple, kwargs: dict) -> int:
        """Rows of the data plate in these arguments (1 when there is no data plate: the data set is one row)."""
        if not self.positions:
            return 1
        key = self.positions[0]
        value = args[key] if isinstance(key, int) else kwargs[key]
        return int(value.shape[0])


def signature(args: tuple, kwargs: dict) -> tuple:
    """The shapes and dtypes of the tensor arguments: a step re-decides its chunking when they change."""
    items = list(enumerate(args)) + sorted(kwargs.items())
    return tuple((key, tuple(v.shape), v.dtype) for key, v in items if torch.is_tensor(v))


def decide(model: Callable, structure: ModelStructure, trace, args, kwargs, chunk_size) -> Chunking:
    """Whether and how to split this data (``trace``: the model on all of it, without log-probabilities).

    ``chunk_size``: "auto" (stream where exact and useful), None (never) or an int (stream in chunks of
    that many rows; an error where that is not exact).
    """
    sig = signature(args, kwargs)
    plate, why = data_plate(trace)
    off = Chunking(sig, why=f"no streaming: {why}" if why else "")
    if plate is None:
        return _refuse(off, chunk_size, why)
    n = plate[1]
    positions = row_arguments(args, kwargs, n)
    off.n, off.plate = n, plate[0]
    if not positions:
        return _refuse(off, chunk_size, f"no argument has the data plate's size {n} as its first dimension")
    if n < 2:
        return _refuse(off, chunk_size, f"the data plate '{plate[0]}' has {n} row")
    on = Chunking(sig, n=n, positions=positions, plate=plate[0])
    per_row, why = check_split(model, structure, on, args, kwargs)
    if why is None:  # not finite: the step's E-step will say why; the next data are decided again
        off.why, off.settled = "no streaming: log p(x) of the first rows is not finite", False
        return off
    if why:
        return _refuse(off, chunk_size, why)
    off.positions = positions  # rows can be taken (for the M-step plan), even where a step does not stream
    if chunk_size is None:
        off.why = "no streaming: chunk_size=None"
        return off
    if isinstance(chunk_size, int):
        on.rows = chunk_size
    else:
        fresh, pooled = per_row
        most = max(1024, min(CHUNK_BYTES // fresh, POOLED_CHUNKS * CHUNK_BYTES // pooled))
        on.rows = -(-n // -(-n // most))  # ceil(n / number of chunks): chunks of even size
    if on.rows >= n:
        off.why = f"the data ({n} rows) fit in one chunk of {on.rows}"
        return off
    on.why = f"streams the data plate '{plate[0]}' ({n} rows) in chunks of {on.rows} rows"
    return on


def _refuse(off: Chunking, chunk_size, why: str) -> Chunking:
    if isinstance(chunk_size, int):
        raise ValueError(f"chunk_size={chunk_size} was asked for, but this model's data cannot be "
                         f"streamed exactly: {why}. Use chunk_size='auto' or None.")
    off.why = f"no streaming: {why}"
    return off


def check_split(model, structure, chunking: Chunking, args, kwargs) -> Tuple[Tuple[int, int], Optional[str]]:
    """log p(x) of 2m rows must equal log p(first m) + log p(next m): the model treats rows alike
    and independently (no normalisation of the data inside the model, say). Also returns
    the bytes per row of the largest site tensors, which size the chunks (a pair: of the tensors allocated for
    each chunk, and of the Gaussians' tables, which the fast paths' pool lends; a tensor broadcast over the rows
    counted by the elements it holds), and why the rows are not independent ("" where they are; None where
    log p(x) of those rows is not finite, which tells nothing).

    The three runs go without Pyro's validation (the data are checked by the step's own E-step, under
    it); where the halves disagree or are not finite they run again under it (if it is on), so that invalid
    data raise Pyro's error instead of passing for a model that couples rows."""
    with pyro.validation_enabled(False):
        per_row, why = _split(model, structure, chunking, args, kwargs)
    if why != "" and is_validation_enabled():
        per_row, why = _split(model, structure, chunking, args, kwargs)
    return per_row, why


def _split(model, structure, chunking: Chunking, args, kwargs) -> Tuple[Tuple[int, int], Optional[str]]:
    m = max(1, min(32, chunking.n // 2))
    logs, fresh, pooled = [], 1, 1
    for rows in (slice(0, 2 * m), slice(0, m), slice(m, 2 * m)):
        c_args, c_kwargs = chunking.take(args, kwargs, rows)
        post = exact_posterior(model, structure, c_args, c_kwargs, leaves=False, fuse=False)  # log p(x) and tables
        logs.append(post.log_evidence)
        mixture = one_latent(post.trace) is not None
        for site in sample_sites(post.trace):
            table, gemm = site["unscaled_log_prob"], has_gemm_path(site["fn"])
            # A mixture's E-step broadcasts an unmasked table where it stands (a (k, 1) column over the rows); any
            # other structure's probes and gradients take the table's full shape, and so does a mask.
            held = compact(table) if mixture and (site["mask"] is None or site["mask"] is True) else table
            size = held.numel() * (1 if gemm else site["fn"].event_shape.numel()) * table.element_size()
            if gemm and mixture:
                pooled = max(pooled, size // (rows.stop - rows.start))
            else:
                fresh = max(fresh, size // (rows.stop - rows.start))
    per_row = (fresh, pooled)
    whole, parts = logs[0], logs[1] + logs[2]
    if not (torch.isfinite(whole) and torch.isfinite(parts)):
        return per_row, None
    tol = 1e3 * torch.finfo(whole.dtype).eps * (1 + whole.abs())
    if not (whole - parts).abs() <= tol:
        return per_row, (f"log p(x) of {2 * m} rows ({float(whole):.6g}) differs from the sum over two "
                         f"halves ({float(parts):.6g}): the model couples rows or transforms the data as a whole")
    return per_row, ""


def row_arguments(args: tuple, kwargs: dict, n: int) -> Tuple:
    """Positions (ints) and names of the tensor arguments whose first dimension is the data plate's."""
    items = list(enumerate(args)) + list(kwargs.items())
    return tuple(key for key, v in items if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == n)


def data_plate(trace) -> Tuple[Optional[Tuple[str, int]], str]:
    """The largest plate that holds every site of the data, as (name, size), or why there is none.

    Point-estimated global latents (MAP-EM) are parameters, not data: they need not lie in it."""
    sites = [s for s in sample_sites(trace) if not s["infer"].get("_map_site")]
    common = None
    for site in sites:
        frames = {(f.name, f.size) for f in site["cond_indep_stack"] if f.vectorized}
        common = frames if common is None else common & frames
    if not common:
        return None, "no plate holds every site (a global latent or a Markov chain couples the data)"
    if any(float(site["scale"]) != 1.0 for site in sites):
        return None, "a site is scaled (poutine.scale or a subsampled plate)"
    return max(common, key=lambda frame: frame[1]), ""
