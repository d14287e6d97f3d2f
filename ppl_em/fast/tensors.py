"""Shape helpers of the hot paths: contractions without broadcast temporaries, and views that undo
``expand``. Small and free of state; the family rules and the fast log-densities build on them."""

from __future__ import annotations

import functools
import math
from typing import List, Optional, Tuple

import torch

__all__ = ["broadcast_shape", "compact", "normalise_exp", "normalise_mode", "overlap", "reduce_product", "SMALL_PRODUCT"]

# At most this many elements, the broadcast product of reduce_product's operands is formed and summed:
# an einsum's fixed cost (its planning, permutes and batched GEMM) is several times two plain kernels there.
SMALL_PRODUCT = 2 ** 14


def broadcast_shape(a: Tuple[int, ...], b: Tuple[int, ...]) -> torch.Size:
    """Like ``torch.broadcast_shapes`` for two shapes, without its per-call overhead (hot path)."""
    a, b = (1,) * (len(b) - len(a)) + tuple(a), (1,) * (len(a) - len(b)) + tuple(b)
    if any(x != y and 1 not in (x, y) for x, y in zip(a, b)):
        raise ValueError(f"shapes {a} and {b} do not broadcast")
    return torch.Size(max(x, y) if 1 in (x, y) else x for x, y in zip(a, b))


def compact(t: torch.Tensor) -> torch.Tensor:
    """``t`` with every expanded (stride-0) dimension narrowed to size 1: a view, no copy."""
    index = tuple(slice(0, 1) if stride == 0 and size > 1 else slice(None)
                  for size, stride in zip(t.shape, t.stride()))
    return t[index] if any(i != slice(None) for i in index) else t


def overlap(a: Tuple[int, ...], b: Tuple[int, ...]) -> bool:
    """Whether two batch shapes both exceed 1 in some (right-aligned) dimension."""
    return any(p != 1 and q != 1 for p, q in zip(reversed(a), reversed(b)))


def reduce_product(operands: List[torch.Tensor], shape, fresh: bool = True) -> torch.Tensor:
    """``prod(operands).sum_to_size(shape)`` (operands broadcast together), as one einsum.

    The broadcast product is never formed: dimensions that ``shape`` keeps become output
    indices, the others are contracted, and size-1 (or expanded, stride-0) dimensions are
    dropped first. sum_i w_j^(i) x^(i) x^(i)^T, for example, becomes a batched GEMM.
    Where ``shape`` is larger than the operands' broadcast shape the result is expanded. A product of
    at most ``SMALL_PRODUCT`` elements is formed and summed instead (cheaper than an einsum there).
    The result is a new tensor; with ``fresh=False`` one operand of ``shape`` itself is returned as it is.
    """
    shape = torch.Size(shape)
    if len(operands) == 1 and _plain_sum(operands[0], shape):  # one operand: no product to avoid
        t = operands[0]
        return (t.clone() if fresh else t) if t.shape == shape else t.sum_to_size(shape)
    if len(operands) > 1 and math.prod(functools.reduce(broadcast_shape, [t.shape for t in operands])) <= SMALL_PRODUCT:
        return _small_product(operands, shape)
    ndim = max([len(shape)] + [t.dim() for t in operands])
    full = [1] * ndim
    subscripts, squeezed = [], []
    sizes_before = [1] * ndim
    for t in operands:
        for i, size in enumerate(t.shape, ndim - t.dim()):
            sizes_before[i] = max(sizes_before[i], size)
    for t in operands:
        t = compact(t)
        sizes = (1,) * (ndim - t.dim()) + tuple(t.shape)
        letters = [i for i in range(ndim) if sizes[i] != 1]
        for i in letters:
            if full[i] not in (1, sizes[i]):
                raise ValueError(f"shapes {[tuple(o.shape) for o in operands]} do not broadcast")
            full[i] = sizes[i]
        subscripts.append(letters)
        squeezed.append(t.reshape([sizes[i] for i in letters]))
    target = (1,) * (ndim - len(shape)) + tuple(shape)
    kept = [i for i in range(ndim) if full[i] != 1 and target[i] != 1]
    for i in kept:
        if full[i] != target[i]:
            raise ValueError(f"cannot sum shape {tuple(full)} to {tuple(shape)}")
    args = []
    for t, letters in zip(squeezed, subscripts):
        args += [t, letters]
    out = torch.einsum(*args, kept)
    # A dimension that every operand only broadcasts (stride 0) still counts its copies in a sum over it.
    copies = math.prod(sizes_before[i] for i in range(ndim) if full[i] == 1 and target[i] == 1)
    if copies != 1:
        out = out * copies
    out = out.reshape([full[i] if i in kept else 1 for i in range(ndim)])
    return out.reshape(out.shape[ndim - len(shape):]).expand(shape)


def _small_product(operands: List[torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """:func:`reduce_product` of operands whose broadcast product is small: the product itself, summed."""
    out = operands[0]
    for t in operands[1:]:
        out = out * t
    ndim = max(out.dim(), len(shape))
    sizes = (1,) * (ndim - out.dim()) + tuple(out.shape)
    target = (1,) * (ndim - len(shape)) + tuple(shape)
    if any(s != t and 1 not in (s, t) for s, t in zip(sizes, target)):
        raise ValueError(f"cannot sum shape {tuple(out.shape)} to {tuple(shape)}")
    summed = out.reshape(sizes).sum_to_size([t if s != 1 else 1 for s, t in zip(sizes, target)])
    return summed.expand(target).reshape(shape)


def _plain_sum(t: torch.Tensor, shape: torch.Size) -> bool:
    """Whether ``t.sum_to_size(shape)`` is :func:`reduce_product` of ``[t]``: ``shape`` only sums ``t``'s
    dimensions (none grows) and none is expanded (a stride-0 dimension's copies count in the sum
    either way, but its einsum reads one copy)."""
    if len(shape) > t.dim() or any(st == 0 and sz > 1 for sz, st in zip(t.shape, t.stride())):
        return False
    return all(s in (1, n) for s, n in zip(shape, t.shape[t.dim() - len(shape):]))


def normalise_exp(total: torch.Tensor, dim: int, in_place: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """(exp(total - lse), lse) with lse = log sum_j exp(total_j) along ``dim`` (kept), as
    ``torch.logsumexp`` computes it (about the maximum), in three passes over the table: the
    maximum, one exponential that serves both, and the division in place. ``in_place``: the
    result overwrites ``total``."""
    top = total.amax(dim, keepdim=True)
    post, norm, top = _exp_about(total, dim, top, total if in_place else None)
    return post.div_(norm), norm.log_().add_(top)


def _exp_about(total: torch.Tensor, dim: int, top: torch.Tensor, out: Optional[torch.Tensor]):
    """(exp(total - top), its sum along ``dim``, top) about each slice's maximum ``top`` (made 0 where it is
    not finite, as logsumexp does); the exponentials go into ``out`` (``total`` itself: in place; None: a new
    tensor)."""
    top = torch.nan_to_num(top, nan=0.0, posinf=0.0, neginf=0.0)  # all -inf (or an inf): as logsumexp does
    shifted = torch.sub(total, top) if out is None else torch.sub(total, top, out=out)
    if torch.finfo(shifted.dtype).bits < 64:
        # exp below log(tiny) (-87.3 in float32, common once clusters are tight) would be a subnormal
        # number, which the CPU handles many times slower, and exp(-inf) takes a slow path too (measured
        # 2.6x the time of this pass where most weights are that small): the exponents are clamped to one
        # above log(tiny), and the weights below 3 tiny (3.5e-38 in float32) set to 0; NaN stays NaN.
        tiny = torch.finfo(shifted.dtype).tiny
        post = shifted.clamp_min_(math.log(tiny) + 1).exp_()
        post.masked_fill_(post < 3 * tiny, 0.0)
    else:
        post = shifted.exp_()
    return post, post.sum(dim, keepdim=True), top


def normalise_mode(total: torch.Tensor, dim: int, in_place: bool = False,
                   scratch: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hard EM's Q along ``dim``: (the one-hot of the mode argmax_j total_j, lse, the maximum max_j total_j), each
    of the last two with ``dim`` kept. A tie goes to the first of the tied maxima, as ``torch.max`` picks it (and
    as the max-sum contraction's backward pass gives it its weight: Pyro's ``MapRing``, whose gradient is the
    one-hot of its ``max``); lse as :func:`normalise_exp` computes it, for log p(x). ``in_place``: the one-hot
    overwrites ``total`` (a table without a graph); ``scratch``, a tensor of its shape and dtype, takes the
    exponentials (else a new one). No gradient flows through the one-hot (it is piecewise constant); the
    maximum keeps its graph (``torch.max``'s).

    Without a graph the modes are the entries equal to the maximum (``torch.max`` with indices along a dim that
    is not the last measured 16 times the maximum alone); a column with a tie takes the first of them from an
    argmax over those entries (a column with a NaN, which has no maximum, the first component)."""
    if total.requires_grad and torch.is_grad_enabled():
        best, index = total.max(dim, keepdim=True)
        _, norm, top = _exp_about(total, dim, best, None)
        return torch.zeros_like(total, requires_grad=False).scatter_(dim, index, 1.0), norm.log_().add_(top), best
    best = total.amax(dim, keepdim=True)
    _, norm, top = _exp_about(total, dim, best, scratch)  # the maximum found once serves both
    q = torch.eq(total, best, out=total if in_place else torch.empty_like(total))
    if bool((q.sum(dim, keepdim=True) != 1).any()):  # a tie, or NaN: the first of the maxima
        first = q.argmax(dim, keepdim=True)  # (argmax: the first of several maximal values)
        q.zero_().scatter_(dim, first, 1.0)
    return q, norm.log_().add_(top), best
