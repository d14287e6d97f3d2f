"""Data-parallel EM on ``torch.distributed``: each process summarises its own shard of the data, and
the statistics are summed across processes before every M-step.

With R processes holding disjoint shards x_1, ..., x_R of the data, the statistics are additive:

    s = sum_r summarize(x_r)        (one all_reduce of the additive entries of Statistics.tensors())
    theta := maximize(s)            on every rank: the same s, so the same theta, bit for bit

so EM on R processes takes the steps of EM on all the data in one process (to float rounding).
``EM(model, distributed=True)`` does this over the default process group, which the user creates
the ordinary way (``torch.distributed.init_process_group("gloo")`` on CPUs, ``"nccl"`` on GPUs, in a
script launched by ``torchrun --nproc-per-node=N``). Shard by contiguous row ranges
(:func:`shard`, :meth:`ppl_em.sources.Rows.shard`): ``DistributedSampler`` pads the shares with
repeated rows, which would count them twice in the statistics.

Agreement. At its first step, rank 0's parameters and its M-step plan's centres (the fixed points
about which Gaussian sums are kept) are broadcast to every rank, so that the sums of every rank
refer to the same centres and the ranks start from the same theta. Before each all-reduce the ranks
exchange a status flag and a checksum of their statistics' layout: an error or a NaN on one rank
makes every rank raise the same :class:`RankError`, naming the rank and its error, within that
step, instead of leaving the others waiting. A rank that stops answering makes the others raise a
:class:`RankError` when a collective exceeds the process group's timeout (``init_process_group(...,
timeout=...)``); every collective here runs under it.

References: Spark MLlib's GaussianMixture (statistics summed with ``treeAggregate``); PyTorch,
"Distributed communication package - torch.distributed".
"""

from __future__ import annotations

import zlib
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from .statistics import Statistics

__all__ = ["RankError", "summarize", "log_likelihood", "agreed", "shard", "broadcast_parameters",
           "all_reduce_statistics", "rank_and_world"]


class RankError(RuntimeError):
    """A step failed on some rank (or a rank stopped answering); every rank raises this same error.

    Attributes: ``rank`` (the failing rank, None for a timeout), ``kind`` (the type name of its error).
    """

    explained = True  # EM.step raises it as it is: the failing rank already explained its error

    def __init__(self, message: str, rank: Optional[int] = None, kind: str = "") -> None:
        super().__init__(message)
        self.rank, self.kind = rank, kind


def check_available() -> bool:
    """``distributed=True`` needs an initialised default process group; True, or a clear error."""
    if not dist.is_available():
        raise RuntimeError("distributed=True needs torch.distributed, which this PyTorch build lacks.")
    if not dist.is_initialized():
        raise RuntimeError("distributed=True sums the statistics over torch.distributed's default process group, "
                           "which is not initialised. Launch the script with torchrun --nproc-per-node=N and call "
                           "torch.distributed.init_process_group('gloo') (CPU) or ('nccl') (GPU) first.")
    return True


def all_reduce_ints(values: torch.Tensor, what: str) -> None:
    """Sum an int64 tensor over the ranks, in place."""
    buffer = values.to(_device())
    _collective(dist.all_reduce, what, buffer)
    values.copy_(buffer.to(values.device))


def rank_and_world() -> Tuple[int, int]:
    return dist.get_rank(), dist.get_world_size()


def shard(n: int, rank: Optional[int] = None, world: Optional[int] = None) -> slice:
    """This rank's contiguous rows [n r / R, n (r + 1) / R) of n (every row on exactly one rank).

    >>> shard(10, 1, 3), shard(10, 2, 3)
    (slice(3, 6, None), slice(6, 10, None))
    """
    from .sources import shard_range

    if rank is None or world is None:
        rank, world = rank_and_world()
    return shard_range(n, rank, world)


# -- EM's two data passes ------------------------------------------------------------------------------
def summarize(em, args: tuple, kwargs: dict) -> Statistics:
    """sum_r summarize(x_r): this rank's statistics, all-reduced. See the module docstring."""
    if em.plan is None:
        agreed(lambda: _first_plan(em, args, kwargs), em._what() + ": making the M-step plan", _parameters_layout)
        broadcast_parameters(em._param_names)
        _broadcast_centres(em.plan)
    stats = agreed(lambda: _local_statistics(em, args, kwargs), em._what(), _layout)
    return all_reduce_statistics(stats, em._what())


def _first_plan(em, args: tuple, kwargs: dict) -> None:
    """The M-step plan, made on this rank's first batch (rank 0's centres are broadcast after it)."""
    from . import sources

    first = next(sources.batches(args, kwargs), None)
    if first is None:
        raise ValueError("this rank's data source yielded no batch; give every rank at least one row.")
    em._prepare(*first)
    if em.plan.gradient or em.plan.second_pass:
        what = em.plan.gradient or sorted(em.plan.second_pass)
        raise ValueError(f"parameters {what} cannot be updated from statistics alone "
                         f"({'; '.join(em.plan.why[p] for p in what)}), which distributed EM sums across ranks. "
                         "Fit this model in one process.")
    return em._param_names


def _parameters_layout(names: List[str]) -> int:
    """A checksum of the parameters' names and shapes: rank 0's values are about to be broadcast into them."""
    import pyro

    store = pyro.get_param_store()
    return zlib.crc32(";".join(f"{n}:{tuple(store[n].shape)}" for n in names if n in store).encode())


def _local_statistics(em, args: tuple, kwargs: dict) -> Statistics:
    stats = em._summarize_here(args, kwargs)
    em._check_objective(stats.objective, args, kwargs)  # NaN here: named on every rank, not summed
    return stats


def log_likelihood(em, args: tuple, kwargs: dict) -> float:
    """sum_r log p(x_r; theta) over the ranks (the same float on every rank)."""
    local = agreed(lambda: em._log_likelihood_here(args, kwargs), em._what() + ": log p(x)")
    total = torch.tensor([local], dtype=torch.float64, device=_device())
    _collective(dist.all_reduce, em._what() + ": log p(x)", total)
    return float(total)


# -- agreement --------------------------------------------------------------------------------------------
def agreed(compute: Callable, what: str, checksum: Optional[Callable] = None):
    """``compute()`` on every rank; if it raises on any rank, every rank raises the same :class:`RankError`.

    ``checksum(result) -> int`` (optional) must agree across ranks too (e.g. the layout of statistics
    about to be all-reduced: keys, shapes and centres), or every rank raises.
    """
    rank, world = rank_and_world()
    result, failure = None, None
    try:
        result = compute()
    except Exception as error:  # every rank must reach the exchange below, whatever happened here
        failure = error
    flags = torch.zeros(world, 2, dtype=torch.int64, device=_device())
    flags[rank, 0] = failure is not None
    flags[rank, 1] = checksum(result) if failure is None and checksum is not None else 0
    _collective(dist.all_reduce, what, flags)
    failed = flags[:, 0].nonzero().flatten().tolist()
    if failed:
        _raise_failure(failed, failure, what, world)
    if checksum is not None and len(set(flags[:, 1].tolist())) > 1:
        raise RankError(f"{what}: the ranks disagree on the layout of what they are about to combine (parameter "
                        f"or statistics names, shapes or centres: checksums {flags[:, 1].tolist()}). Every rank must "
                        "run the same model, with arguments of the same shapes apart from the number of rows.")
    return result


def _raise_failure(failed: List[int], failure: Optional[BaseException], what: str, world: int) -> None:
    """Every rank learns the first failing rank's error (type and message) and raises it."""
    messages: List[Optional[Tuple[str, str]]] = [None] * world
    mine = None if failure is None else (type(failure).__name__, str(failure))
    _collective(dist.all_gather_object, what, messages, mine)
    first = failed[0]
    kind, message = messages[first] or ("Error", "")
    others = f" (and on ranks {failed[1:]})" if len(failed) > 1 else ""
    error = RankError(f"{what} failed on rank {first} of {world}{others}: {kind}: {message}", first, kind)
    raise error from failure


def _collective(fn: Callable, what: str, *args) -> None:
    """A collective under the process group's timeout: a rank that stops answering is a RankError."""
    try:
        fn(*args)
    except RuntimeError as error:  # DistBackendError, DistNetworkError: a timeout, a closed connection
        raise RankError(f"{what}: not every rank answered within the process group's timeout, or one has "
                        f"stopped ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
                        "Look for the rank that failed or hangs; init_process_group(timeout=...) sets the wait."
                        ) from error


def _layout(stats: Statistics) -> int:
    """A 63-bit checksum of the keys, shapes and centres of the statistics."""
    parts = [f"{k}:{tuple(v.shape)}" for k, v in sorted(stats.sums.items())]
    crc = zlib.crc32(";".join(parts).encode())
    for key in sorted(stats.centres):
        crc = zlib.crc32(stats.centres[key].detach().cpu().double().numpy().tobytes(), crc)
    return crc


# -- collectives on statistics and parameters ------------------------------------------------------------
def all_reduce_statistics(stats: Statistics, what: str = "all_reduce") -> Statistics:
    """The statistics summed over every rank: one all_reduce of a flat float64 buffer of the additive
    entries (sums, log p(x), objective, n); the centres are the ranks' common ones."""
    entries = {k: v for k, v in stats.tensors().items() if not k.startswith("centre/")}
    keys = sorted(entries)
    device = _device(stats)
    flat = torch.cat([entries[k].reshape(-1).to(device=device, dtype=torch.float64) for k in keys])
    _collective(dist.all_reduce, what, flat)
    out: Dict[str, torch.Tensor] = {}
    offset = 0
    for k in keys:
        size = entries[k].numel()
        out[k] = flat[offset:offset + size].reshape(entries[k].shape).to(entries[k].device, entries[k].dtype)
        offset += size
    out.update({f"centre/{k}": v for k, v in stats.centres.items()})
    return Statistics.from_tensors(out)


def broadcast_parameters(names: List[str], what: str = "broadcasting the parameters") -> None:
    """Rank 0's values of these ``pyro.param`` sites, written into every rank's param store."""
    import pyro

    store = pyro.get_param_store()
    with torch.no_grad():
        for name in names:
            if name in store:
                value = store[name].unconstrained()
                buffer = value.detach().to(_device()).clone()
                _collective(dist.broadcast, what, buffer, 0)
                value.copy_(buffer.to(value.device))


def _broadcast_centres(plan) -> None:
    """Rank 0's centre of every Gaussian group, on every rank: the sums of all ranks are about the same c."""
    for key in sorted(plan.groups):
        group = plan.groups[key]
        buffer = group.centre.detach().to(_device()).clone()
        _collective(dist.broadcast, "broadcasting the plan's centres", buffer, 0)
        group.centre = buffer.to(group.centre.device, group.centre.dtype)


def _device(stats: Optional[Statistics] = None) -> torch.device:
    """Where collectives run: the current CUDA device under nccl, the CPU otherwise."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
