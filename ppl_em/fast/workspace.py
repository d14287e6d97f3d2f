"""The state of the fast paths during one pass over the data: a pool of chunk-sized tables.

A streaming pass creates one :class:`Workspace`, hands it down to every log-density and posterior
computation of each chunk, and recycles it between chunks. Nothing is kept in module globals: two
EM objects (or two threads) never share tables.
"""

from __future__ import annotations

from typing import Dict, Iterable, Iterator, List, Optional, Tuple, TypeVar

import torch

__all__ = ["Workspace", "new_table"]

T = TypeVar("T")


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

    def table(self, shape, dtype: torch.dtype, device, stride=None) -> torch.Tensor:
        """An uninitialised tensor of this shape (and ``stride``), from the pool if one is free."""
        key = (tuple(shape), dtype, torch.device(device), None if stride is None else tuple(stride))
        free = self._free.get(key)
        table = free.pop() if free else _empty(shape, dtype, device, stride)
        self._used.append((key, table))
        return table

    def recycle(self) -> None:
        """Every table taken so far is free again: nothing from the last chunk may be held now."""
        for key, table in self._used:
            self._free.setdefault(key, []).append(table)
        self._used.clear()

    def clear(self) -> None:
        """Forget every table (e.g. when the data's shape changes)."""
        self._free.clear()
        self._used.clear()

    def chunks(self, chunks: Iterable[T]) -> Iterator[T]:
        """Yield the chunks, recycling the tables after each loop body: the body must keep nothing of them."""
        try:
            for chunk in chunks:
                yield chunk
                self.recycle()
        finally:
            self.recycle()


def new_table(ws: Optional[Workspace], shape, dtype: torch.dtype, device, stride=None) -> torch.Tensor:
    """A table from ``ws``'s pool, or a fresh tensor without one."""
    return ws.table(shape, dtype, device, stride) if ws is not None else _empty(shape, dtype, device, stride)


def _empty(shape, dtype, device, stride=None) -> torch.Tensor:
    if stride is None:
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    return torch.empty_strided(tuple(shape), tuple(stride), dtype=dtype, device=device)
