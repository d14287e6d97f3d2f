"""The state of the fast paths during one pass over the data: a pool of chunk-sized tables, and the
threads that run a pass's blocks of rows side by side.

A streaming pass creates one :class:`Workspace`, hands it down to every log-density and posterior
computation of each chunk, and recycles it between chunks. Nothing is kept in module globals: two
EM objects (or two threads) never share tables or threads.
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple, TypeVar

import torch

__all__ = ["Workspace", "block_rows", "map_blocks", "new_table", "scratch", "scratch_views"]

T = TypeVar("T")

# The most threads that run blocks side by side (Workspace.map); more of torch's threads go to each block's
# operations. A block's Python (some thirty calls, about 0.15 ms under the GIL against about 1.3 ms of its
# kernels at B1's block size) would keep more threads than this waiting for the GIL. An estimate from those
# two figures: the machines measured here have 2 cores.
MAX_SIDE_BY_SIDE = 8


class Workspace:
    """Chunk-sized tables (the (k, rows) log-densities and posteriors of the fast paths) that a
    streaming pass hands from one chunk to the next instead of allocating afresh.

    A table of tens of MB freed and allocated again every chunk can be handed back to the
    operating system by glibc in between (depending on what else the process has allocated),
    and then every page of it is faulted in anew: measured 15-30% of an EM iteration. Tables are
    taken with :meth:`table` and become free again at :meth:`recycle`, once nothing from the
    chunk is held; :meth:`chunks` does that between the chunks of a pass.

    Examples
    --------
    >>> ws = Workspace()
    >>> for chunk in ws.chunks(["first", "second"]):
    ...     t = ws.table((3, 5), torch.float64, "cpu")
    >>> len(ws._free[((3, 5), torch.float64, torch.device("cpu"), None)])
    1
    """

    def __init__(self) -> None:
        self._free: Dict[tuple, List[torch.Tensor]] = {}
        self._used: List[Tuple[tuple, torch.Tensor]] = []
        self._scratch: Dict[tuple, Tuple[torch.Tensor, object]] = {}
        self._side = threading.local()  # .on: the calling thread runs a block of :meth:`map` side by side
        self._pool: Optional[Tuple[int, int, ThreadPoolExecutor]] = None  # (process id, workers, pool)
        self._in_order = False
        self._openmp: Optional[bool] = None  # whether torch's intra-op threads are OpenMP's (asked once)

    def table(self, shape, dtype: torch.dtype, device, stride=None) -> torch.Tensor:
        """An uninitialised tensor of this shape (and ``stride``), from the pool if one is free."""
        key = (tuple(shape), dtype, torch.device(device), None if stride is None else tuple(stride))
        free = self._free.get(key)
        table = free.pop() if free else _empty(shape, dtype, device, stride)
        self._used.append((key, table))
        return table

    def scratch(self, name: str, shape, dtype: torch.dtype, device) -> torch.Tensor:
        """An uninitialised tensor for the calling thread's block, the same one at every call of that thread
        for this ``name`` (what it holds: two tensors of a block never share one) and shape: a block's features (MBs, made and dropped some 250 times a B1 step) allocated afresh
        by a helper thread of :meth:`map` went back to the operating system between blocks and were
        page-faulted in anew (about 30000 faults a step). Nothing of it may be held after the block.
        Outside a block of :meth:`map` run side by side, a fresh tensor: a pass in order may be recorded
        (:class:`ppl_em.fast.StepTape`), and a recording must not see a buffer that its blocks overwrite."""
        return self.scratch_views(name, shape, dtype, device, None)[0]

    def scratch_views(self, name: str, shape, dtype: torch.dtype, device,
                      views: Optional[Callable[[torch.Tensor], T]]) -> Tuple[torch.Tensor, Optional[T]]:
        """(:meth:`scratch`'s tensor, ``views(tensor)``): what ``views`` makes of the tensor (the views of its rows
        that a block's operations write, say) is made once with it, not at every block (each view a Python call
        that holds the GIL while the other threads' blocks wait for it); None without ``views``."""
        if not getattr(self._side, "on", False):
            table = _empty(shape, dtype, device)
            return table, None if views is None else views(table)
        key = (threading.get_ident(), name, tuple(shape), dtype, torch.device(device), views is None)
        entry = self._scratch.get(key)
        if entry is None:
            table = _empty(shape, dtype, device)
            entry = self._scratch[key] = (table, None if views is None else views(table))
        return entry

    def recycle(self) -> None:
        """Every table taken so far is free again: nothing from the last chunk may be held now."""
        for key, table in self._used:
            self._free.setdefault(key, []).append(table)
        self._used.clear()

    def clear(self) -> None:
        """Forget every table (e.g. when the data's shape changes)."""
        self._free.clear()
        self._used.clear()
        self._scratch.clear()

    def chunks(self, chunks: Iterable[T]) -> Iterator[T]:
        """Yield the chunks, recycling the tables after each loop body: the body must keep nothing of them."""
        try:
            for chunk in chunks:
                yield chunk
                self.recycle()
        finally:
            self.recycle()

    @contextlib.contextmanager
    def in_order(self, on: bool = True) -> Iterator[None]:
        """Within the block, :meth:`map` runs its blocks one after the other on the calling thread (each
        operation on torch's threads), as it does without a workspace: for a step whose operations a
        :class:`ppl_em.fast.StepTape` records and checks against a real run, to the bit."""
        before = self._in_order
        self._in_order = before or on
        try:
            yield
        finally:
            self._in_order = before

    def map(self, fn: Callable[[int], T], count: int, device) -> List[T]:
        """[fn(0), ..., fn(count - 1)]: the blocks of a pass over the rows, side by side on torch's intra-op
        threads (``torch.get_num_threads()``), each block's operations on one thread (beyond
        ``MAX_SIDE_BY_SIDE`` threads, on an equal share of them).

        A block's operations (a GEMM of a (K, q + d) by a (q + d, B) block, the posterior of B rows) are too
        small to share well: run on two threads each, every operation ends at a barrier where both wait for the
        slower, some thirty times a block, and on a shared machine one thread held up holds up all of them
        (a B1 E-step measured 2-3x slower in such a phase). Whole blocks instead go to whichever thread is free
        next. ``fn`` must write only its own block's part of any shared table; the results come back in block
        order, so that a caller sums them in the order a sequential pass would.

        Sequential, on the calling thread, for one block or one thread, off the CPU (an accelerator queues its
        own kernels), under a ``TorchFunctionMode`` (a recording sees the calling thread's operations only),
        within :meth:`in_order`, and where torch's intra-op threads are not OpenMP's (torch's own thread pool
        is one for the process: its count cannot be set per thread). Grad mode and inference mode pass to the
        threads.
        """
        threads = torch.get_num_threads()
        if count < 2 or threads < 2 or self._in_order or torch.device(device).type != "cpu" \
                or torch._C._is_torch_function_mode_enabled() or not self._per_thread_counts():
            return [fn(i) for i in range(count)]
        workers = min(threads, MAX_SIDE_BY_SIDE, count)
        inner = threads // workers
        results: List[Optional[T]] = [None] * count
        lock, following, failed = threading.Lock(), iter(range(count)), []
        grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

        def work() -> None:
            torch.set_num_threads(inner)  # this thread's own operations, and MKL's, on this thread (and its share)
            self._side.on = True
            try:
                with torch.inference_mode() if inference else torch.set_grad_enabled(grad):
                    while not failed:
                        with lock:
                            i = next(following, None)
                        if i is None:
                            return
                        try:
                            results[i] = fn(i)
                        except BaseException:
                            failed.append(i)
                            raise
            finally:
                self._side.on = False

        pool = self._workers(workers - 1)
        try:
            helpers = []
            for _ in range(workers - 1):
                try:
                    helpers.append(pool.submit(work))
                except RuntimeError:  # no new work for threads (the interpreter is exiting): fewer threads share it
                    break
            try:
                work()
            finally:
                errors = [h.exception() for h in helpers]  # waits: every block is written or given up
        finally:
            torch.set_num_threads(threads)
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first
        return results

    def _per_thread_counts(self) -> bool:
        """Whether each thread sets its own count of intra-op threads (torch's OpenMP backend)."""
        if self._openmp is None:
            self._openmp = "parallel backend: OpenMP" in torch.__config__.parallel_info()
        return self._openmp

    def _workers(self, count: int) -> ThreadPoolExecutor:
        """The pool of ``count`` helper threads, made anew in a forked process (its threads stay behind)."""
        pid = os.getpid()
        if self._pool is None or self._pool[:2] != (pid, count):
            if self._pool is not None and self._pool[0] == pid:
                self._pool[2].shutdown(wait=False)
            self._pool = (pid, count, ThreadPoolExecutor(count, thread_name_prefix="ppl_em-blocks"))
        return self._pool[2]


def map_blocks(ws: Optional[Workspace], fn: Callable[[int], T], count: int, device) -> List[T]:
    """:meth:`Workspace.map` with ``ws``'s threads; [fn(0), ..., fn(count - 1)] in order without one."""
    return ws.map(fn, count, device) if ws is not None else [fn(i) for i in range(count)]


def block_rows(rows: int, most: int) -> int:
    """Rows per block of a pass over ``rows`` rows (:meth:`Workspace.map`), at most ``most``: ceil(rows / count),
    count the number of blocks of ``most`` rows rounded up to a multiple of the threads that run them side by
    side (where the blocks are many rows each, that many blocks of one size to a row). Blocks of ``most`` rows
    and a short last one leave a thread idle at the end of each chunk for up to a block's time (measured 1-2 ms
    of each 30 ms chunk at n = 1e6, d = 10, k = 16 in four chunks). The same blocks whether they then run side
    by side or in order (the sums add up in the same order: the results agree to the bit)."""
    count = -(-rows // max(1, most))
    workers = min(torch.get_num_threads(), MAX_SIDE_BY_SIDE)
    if count < 2 or workers < 2:
        return most
    return -(-rows // (-(-count // workers) * workers))


def scratch(ws: Optional[Workspace], name: str, shape, dtype: torch.dtype, device) -> torch.Tensor:
    """:meth:`Workspace.scratch` of ``ws``, or a fresh tensor without one."""
    return ws.scratch(name, shape, dtype, device) if ws is not None else _empty(shape, dtype, device)


def scratch_views(ws: Optional[Workspace], name: str, shape, dtype: torch.dtype, device,
                  views: Callable[[torch.Tensor], T]) -> Tuple[torch.Tensor, T]:
    """:meth:`Workspace.scratch_views` of ``ws``, or a fresh tensor and its views without one."""
    if ws is not None:
        return ws.scratch_views(name, shape, dtype, device, views)
    table = _empty(shape, dtype, device)
    return table, views(table)


def new_table(ws: Optional[Workspace], shape, dtype: torch.dtype, device, stride=None) -> torch.Tensor:
    """A table from ``ws``'s pool, or a fresh tensor without one."""
    return ws.table(shape, dtype, device, stride) if ws is not None else _empty(shape, dtype, device, stride)


def _empty(shape, dtype, device, stride=None) -> torch.Tensor:
    if stride is None:
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    return torch.empty_strided(tuple(shape), tuple(stride), dtype=dtype, device=device)
