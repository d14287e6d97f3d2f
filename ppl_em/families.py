"""Closed-form M-step updates: weighted maximum likelihood per distribution family.

For a site whose distribution is an exponential family, the maximiser of
E_Q[log p(x, z; theta)] is a weighted MLE computed from weighted sufficient statistics.
With w_j^(i) = Q(z^(i) = j) this gives the lecture's updates:

    phi_j   = (1/n) sum_i w_j^(i)
    mu_j    = sum_i w_j^(i) x^(i) / sum_i w_j^(i)
    Sigma_j = sum_i w_j^(i) (x^(i) - mu_j)(x^(i) - mu_j)^T / sum_i w_j^(i)

How does the engine know that row j of ``mu`` belongs to z = j? It does not need to. When a
distribution's parameter A (say ``loc``, shape (k, n, d)) is a *selection* of a
``pyro.param`` v (``mu[z]`` broadcast over the data plate), A = S v for a 0/1 matrix S,
and the vector-Jacobian product S^T u scatter-adds any per-element statistic u back onto
the elements of v. So sum_i w_j^(i) x^(i) is simply ``vjp(A, v, w * x)``. Selection is
detected by walking A's autograd graph: only indexing, broadcasting, reshaping and
0/1 masking ops may lie between A and v. The EM engine double-checks every closed form
once, by verifying that the gradient of the expected complete-data log-likelihood
vanishes at it; parameters that fail fall back to the gradient M-step.

References: lecture notes, M-step for the GMM; Bishop, PRML, sections 9.2-9.3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import pyro.distributions as dist
from torch.distributions import Independent

from . import chains

__all__ = ["Use", "Rule", "RULES", "Selection", "find_uses", "log_prob", "reduce_product", "unwrap"]

# Autograd nodes that move or copy elements without arithmetic.
SELECTION_OPS = {
    "ExpandBackward0", "IndexBackward0", "SelectBackward0", "SliceBackward0", "ViewBackward0",
    "UnsafeViewBackward0", "ReshapeAliasBackward0", "UnsqueezeBackward0", "SqueezeBackward0",
    "SqueezeBackward1", "SqueezeBackward2", "PermuteBackward0", "TransposeBackward0",
    "CloneBackward0", "AliasBackward0", "IndexSelectBackward0", "GatherBackward0",
    "DiagEmbedBackward0", "TBackward0", "ToCopyBackward0",
}


@dataclass
class Rule:
    """One closed-form update: the weighted statistics of a distribution attribute.

    ``stats(fn, w, x, reg)`` returns (numerator, denominator) per element of the attribute,
    both broadcastable to its shape; ``finish(num, den, old)`` turns their scatter-added sums
    into the new parameter value. ``phase`` 1 updates locations (means, probabilities, rates);
    phase 2 updates scales given the new locations. ``log``: the attribute is log v of a selection v
    of the parameter (logits of a parameter on the simplex), not the selection itself.
    """

    family: type
    attr: str
    phase: int
    stats: Callable
    finish: Callable
    log: bool = False


def _ratio(num: torch.Tensor, den: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    # An empty group (no posterior mass) keeps its previous value instead of becoming 0/0.
    safe = den > torch.finfo(den.dtype).tiny
    return torch.where(safe, num / den.clamp_min(torch.finfo(den.dtype).tiny), old)


def _normalise(num: torch.Tensor, den: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    total = num.sum(-1, keepdim=True)
    safe = total > torch.finfo(num.dtype).tiny
    return torch.where(safe, num / total.clamp_min(torch.finfo(num.dtype).tiny), old)


def _normalise_logits(num: torch.Tensor, den: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    # The parameter enters as log v: a count of 0 gives v = 0 and log v = -inf, whose gradient 1 / 0
    # times a weight of 0 is NaN. The smallest normal float keeps log v finite and changes p(x) by
    # less than 1e-300 (float64) relative.
    return _normalise(num, den, old).clamp_min(torch.finfo(num.dtype).tiny)


def _sqrt_ratio(num, den, old):
    return _ratio(num, den, old * old).sqrt()


def _cov_ratio(num, den, old):
    # No symmetrisation here: the parameter need not be (..., d, d) (a diagonal (k, d) or a
    # variance per component (k,) is selected into covariance_matrix too). The outer-product
    # statistics are symmetric before the scatter-add, so a (d, d) result already is.
    return _ratio(num, den, old)


# Each ``stats(fn, w, x, reg, shape)`` returns (numerator, denominator) already summed to
# ``shape``, the shape in which the site sees the parameter (e.g. (k, 1, d, d) for Sigma_z):
# the sum over data points is a contraction (one GEMM), never an (n, k, d, d) temporary.
def _mean_stats(fn, w, x, reg, shape):
    return reduce_product([w, x], shape), reduce_product([w], shape)


def _categorical_stats(fn, w, x, reg, shape):
    k = fn.probs.shape[-1]
    onehot = torch.nn.functional.one_hot(x.long(), k).to(w.dtype)
    return reduce_product([w.unsqueeze(-1), onehot], shape), None


def _mvn_loc_stats(fn, w, x, reg, shape):
    d = x.shape[-1] if x.dim() else 0
    if d and shape[-1] == d and _seen(compact(x)) is not None:
        # The E-step's Gaussian fast path ran on these rows: sum w x = sum w (x - c) + c sum w comes
        # out of the GEMM that the covariance's moments need too (weighted_features).
        c, n, sums = weighted_features(w, x, shape[:-1])
        n = n.unsqueeze(-1)
        return sums[..., -d:] + n * c.reshape(d), n.expand(shape)
    w = w.unsqueeze(-1)
    return reduce_product([w, x], shape), reduce_product([w], shape)


def _normal_scale_stats(fn, w, x, reg, shape):
    den = reduce_product([w], shape)
    loc = compact(fn.loc)
    if not _constant_over_sums(loc.shape, shape):
        diff = x - fn.loc  # the location varies with the data point itself
        return reduce_product([w, diff * diff], shape) + reg * den, den
    # mu_z is the same for every data point: no (n, k, d) difference tensor (see normal_moments).
    m2 = reduce_product([normal_moments(w, x, loc, broadcast_shape(loc.shape, shape))[0]], shape)
    return (m2 + reg * den).to(den.dtype), den


def _mvn_cov_stats(fn, w, x, reg, shape):
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    w = w[..., None, None]
    den = reduce_product([w], shape)
    loc = compact(fn.loc)
    if _overlap(loc.shape[:-1], compact(x).shape[:-1]):
        diff = x - loc  # the location varies with the data point itself
        num = reduce_product([w, diff.unsqueeze(-1), diff.unsqueeze(-2)], shape)
    else:  # mu_z shared by every data point: moments through the sufficient statistics, then summed
        inner = broadcast_shape(loc.shape[:-1], shape[:-2])
        num = reduce_product([gaussian_moments(w[..., 0, 0], x, loc, inner)[0]], shape).to(x.dtype)
    return num + reg * den * eye, den


def normal_moments(w: torch.Tensor, x: torch.Tensor, loc: torch.Tensor, inner):
    """The elementwise (Normal) twin of :func:`gaussian_moments`: M2 = sum w (x - m)^2,
    S = sum w (x - m), N = sum w, summed to ``inner``, for a location m that varies only along
    dims that ``inner`` keeps. Expanded about the data mean c, so that no (n, k, d) difference
    is formed; the sums cancel, so float32 inputs are summed in float64.
    """
    dt = torch.promote_types(x.dtype, torch.float64)
    w, x, loc = compact(w).to(dt), compact(x).to(dt), loc.to(dt)
    c = x.mean(tuple(range(x.dim())), keepdim=True) if x.dim() else x
    xc, lc = x - c, loc - c
    m2 = (reduce_product([w, xc * xc], inner) - 2 * reduce_product([w, xc, lc], inner)
          + reduce_product([w, lc * lc], inner))
    s1 = reduce_product([w, xc], inner) - reduce_product([w, lc], inner)
    return m2, s1, reduce_product([w], inner)


def gaussian_moments(w: torch.Tensor, x: torch.Tensor, loc: torch.Tensor, inner):
    """M2 = sum w (x - m)(x - m)^T, S = sum w (x - m), N = sum w, summed to batch shape ``inner``,
    for a location m (``loc``, (..., d)) shared by all data points, that varies only along dims
    that ``inner`` keeps. Returns (M2 (inner, d, d), S (inner, d), N (inner)); float64 for float32 data.

    The data enter only through sum w (x - c) and the packed products sum w (x - c)_a (x - c)_b,
    a <= b (the Gaussian's sufficient statistic T(x) about a centre c amid the data, for accuracy): one
    GEMM with the weights (:func:`weighted_features`), no (k, n, d) difference; the location
    comes in afterwards, as x - m = (x - c) - (m - c).
    """
    c, n, sums = weighted_features(w, x, inner)
    d = c.shape[-1]
    m_c, s_c = _unpack_symmetric(sums[..., :-d], d), sums[..., -d:]
    lc = (loc.to(c.dtype) - c).expand(tuple(inner) + (d,))
    n1, outer = n.unsqueeze(-1), s_c.unsqueeze(-1) * lc.unsqueeze(-2)
    m2 = m_c - outer - outer.transpose(-1, -2) + n1.unsqueeze(-1) * lc.unsqueeze(-1) * lc.unsqueeze(-2)
    return m2, s_c - n1 * lc, n


# The Gaussian's sufficient statistics T(x - c) are built block by block, about this many elements
# (4 MB in float64) at a time, and each block goes into its GEMM while it is still in cache: written
# for a whole chunk they would travel to memory and back (measured 2x slower per EM iteration).
FEATURE_ELEMENTS = 2**19

_SEEN: list = []  # (data tensor, its version, its centre c) of the last Gaussian E-step fast path
_SUMS: list = []  # the last (key, weights, data, result) of weighted_features


def release_features() -> None:
    """Forget the data and weighted sums that the Gaussian fast path keeps between an E-step and
    its M-step (they can hold the last chunk alive): called when a step is done."""
    _SEEN.clear()
    _SUMS.clear()


class TablePool:
    """Chunk-sized tables (the (k, rows) log-densities and posteriors of the fast paths) that a
    streaming pass hands from one chunk to the next instead of allocating afresh.

    A table of tens of MB freed and allocated again every chunk can be handed back to the
    operating system by glibc in between (depending on what else the process has allocated),
    and then every page of it is faulted in anew: measured 15-30% of an EM iteration. Tables are
    taken with :func:`new_table` while the pool is active (:func:`recycling`) and become
    free again at :meth:`recycle`, once nothing from the chunk is held.
    """

    def __init__(self) -> None:
        self._free: Dict[tuple, List[torch.Tensor]] = {}
        self._used: List[Tuple[tuple, torch.Tensor]] = []

    def take(self, shape, dtype: torch.dtype, device, stride=None) -> torch.Tensor:
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
        self._free.clear()
        self._used.clear()


_POOLS: List[TablePool] = []  # the active pool (innermost last)


def recycling(pool: Optional[TablePool], chunks):
    """Yield the chunks with ``pool`` active, so that :func:`new_table` takes from it, and recycle
    its tables after each chunk's loop body: the body must keep nothing of them (pool None:
    allocate as usual, e.g. where a pass keeps every chunk's weights)."""
    if pool is None:
        yield from chunks
        return
    _POOLS.append(pool)
    try:
        for chunk in chunks:
            yield chunk
            pool.recycle()
    finally:
        _POOLS.remove(pool)
        pool.recycle()


def new_table(shape, dtype: torch.dtype, device, stride=None) -> torch.Tensor:
    """An uninitialised tensor (with ``stride``, if given): from the active :class:`TablePool` if
    any, else fresh."""
    return _POOLS[-1].take(shape, dtype, device, stride) if _POOLS else _empty(shape, dtype, device, stride)


def _empty(shape, dtype, device, stride=None) -> torch.Tensor:
    if stride is None:
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    return torch.empty_strided(tuple(shape), tuple(stride), dtype=dtype, device=device)


def _seen(x: torch.Tensor) -> Optional[torch.Tensor]:
    """The centre c of ``x`` if the Gaussian E-step fast path ran on these very rows, else None."""
    if _SEEN and _SEEN[0][0] is x and _SEEN[0][1] == x._version:
        return _SEEN[0][2]
    return None


def _centre(rows: torch.Tensor) -> torch.Tensor:
    """A centre c (d,) for rows (N, d): the mean of at most about 8192 evenly spaced rows, in float64
    for lower-precision data. Any c gives the same statistics (it cancels); one amid the data keeps
    the products (x - c)_a (x - c)_b small. The mean of all rows would cost a pass over them (and
    a float64 copy of float32 data) for no gain in accuracy."""
    low = rows.dtype in (torch.float16, torch.bfloat16, torch.float32)
    sample = rows[::max(1, rows.shape[0] // 8192)]
    return sample.mean(0, dtype=torch.float64 if low else rows.dtype)


def _feature_rows(d: int) -> int:
    """Rows per block of sufficient statistics for data of dimension d."""
    return max(64, FEATURE_ELEMENTS // (d * (d + 1) // 2 + d))


def sufficient_stats(rows: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """T(x - c)^T = [packed (x - c)_a (x - c)_b for a <= b, x - c] of rows x (B, d) about c (d,):
    (q + d, B), q = d(d+1)/2, in c's dtype (float64 for float32 data).

    Each product is written straight into its place as a contiguous row (a gather on the last
    dim, or products joined by cat, are several times slower), in the order of torch.triu_indices.
    """
    d = rows.shape[-1]
    q = d * (d + 1) // 2
    out = torch.empty((q + d, rows.shape[0]), dtype=c.dtype, device=c.device)
    cols = out[q:]  # (d, B): the centred rows, transposed
    torch.sub(rows.T, c.reshape(d, 1), out=cols)
    start = 0
    for a in range(d):
        torch.mul(cols[a:a + 1], cols[a:], out=out[start:start + d - a])
        start += d - a
    return out


def weighted_features(w: torch.Tensor, x: torch.Tensor, inner):
    """(c, N = sum w, sum w T(x - c)) summed to batch shape ``inner``: the weighted sufficient
    statistics of a Gaussian about a centre c amid the data (:func:`_centre`), (d,), (inner) and (inner, q + d), as one GEMM
    of the weights with :func:`sufficient_stats` per block of rows. Both Gaussian rules of an
    M-step (mu_z, then Sigma_z) need this product for the same weights and rows, so the last one
    is kept until :func:`release_features`."""
    x, inner = compact(x), tuple(inner)
    key = (w.data_ptr(), tuple(w.shape), w.stride(), w._version, w.dtype, x._version, inner)
    if _SUMS and _SUMS[0][0] == key and _SUMS[0][2] is x:
        return _SUMS[0][3]
    d = x.shape[-1]
    c = _seen(x)
    if c is None:
        c = _centre(x.reshape(-1, d))
    m = x.shape[-2] if x.dim() >= 2 else 1
    # Blocks along the rows are summed, so the rows' dim must be one that the result sums over.
    blocked = x.dim() >= 2 and (len(inner) == 0 or inner[-1] == 1)
    step = max(1, _feature_rows(d) // max(1, x[..., 0, 0].numel())) if blocked else m
    sliced = blocked and w.dim() >= 1 and w.shape[-1] == m  # w's last dim runs along x's rows (dim -2)
    # The common case, rows x (m, d) and weights (..., m) summed over the rows only: a plain matrix
    # product per block, without reduce_product's general bookkeeping each time.
    matrix = sliced and x.dim() == 2 and inner == tuple(w.shape[:-1]) + (1,)
    n = sums = None
    for start in range(0, m, step):
        xb = x[..., start:start + step, :] if blocked else x
        stats_t = sufficient_stats(xb.reshape(-1, d), c)
        wb = (w[..., start:start + step] if sliced else w).to(c.dtype)  # float32 weights: converted block by block
        if matrix:
            wb = wb.reshape(-1, wb.shape[-1])
            part_n, part = wb.sum(-1), torch.mm(wb, stats_t.T)
        else:
            stats = stats_t.T.reshape(xb.shape[:-1] + (-1,))
            part_n, part = reduce_product([wb], inner), reduce_product([wb.unsqueeze(-1), stats], inner + (stats.shape[-1],))
        n, sums = (part_n, part) if sums is None else (n + part_n, sums + part)
    if matrix:
        n, sums = n.reshape(inner), sums.reshape(inner + (sums.shape[-1],))
    result = (c, n, sums)
    _SUMS[:] = [(key, w, x, result)]  # holding w and x: their memory cannot be reused while keyed
    return result


def _unpack_symmetric(packed: torch.Tensor, d: int) -> torch.Tensor:
    rows, cols = torch.triu_indices(d, d, device=packed.device)
    out = packed.new_zeros(packed.shape[:-1] + (d, d))
    out[..., rows, cols] = packed
    out[..., cols, rows] = packed
    return out


# A chain's transition (or initial) logits: Q is already a table over (w_{t-1}, w_t) of the same shape
# (see ppl_em.chains), and for log A_ij the weighted MLE is A_ij = sum_t Q_t(i, j) / sum_{t,j} Q_t(i, j).
def _initial_stats(fn, w, x, reg, shape):
    return reduce_product([w.initial], shape), None


def _transition_stats(fn, w, x, reg, shape):
    return reduce_product([w.transition], shape), None


def _constant_over_sums(loc: Tuple[int, ...], shape: Tuple[int, ...]) -> bool:
    """Whether a location of (compact) shape ``loc`` is constant along every dimension that statistics of
    shape ``shape`` sum over: one mu per parameter element (mu_z), not one per data point."""
    n = max(len(loc), len(shape))
    loc, shape = (1,) * (n - len(loc)) + tuple(loc), (1,) * (n - len(shape)) + tuple(shape)
    return all(a == 1 or b != 1 for a, b in zip(loc, shape))


def _overlap(a: Tuple[int, ...], b: Tuple[int, ...]) -> bool:
    """Whether two batch shapes both exceed 1 in some (right-aligned) dimension."""
    return any(p != 1 and q != 1 for p, q in zip(reversed(a), reversed(b)))


RULES: List[Rule] = [
    Rule(dist.Categorical, "probs", 1, _categorical_stats, _normalise),
    Rule(dist.Bernoulli, "probs", 1, _mean_stats, _ratio),
    Rule(dist.Poisson, "rate", 1, _mean_stats, _ratio),
    Rule(dist.Normal, "loc", 1, _mean_stats, _ratio),
    Rule(dist.MultivariateNormal, "loc", 1, _mvn_loc_stats, _ratio),
    Rule(dist.Normal, "scale", 2, _normal_scale_stats, _sqrt_ratio),
    Rule(dist.MultivariateNormal, "covariance_matrix", 2, _mvn_cov_stats, _cov_ratio),
    Rule(dist.DiscreteHMM, "initial_logits", 1, _initial_stats, _normalise_logits, log=True),
    Rule(dist.DiscreteHMM, "transition_logits", 1, _transition_stats, _normalise_logits, log=True),
]


def broadcast_shape(a: Tuple[int, ...], b: Tuple[int, ...]) -> torch.Size:
    """Like ``torch.broadcast_shapes`` for two shapes, without its per-call overhead (hot path)."""
    a, b = (1,) * (len(b) - len(a)) + tuple(a), (1,) * (len(a) - len(b)) + tuple(b)
    if any(x != y and 1 not in (x, y) for x, y in zip(a, b)):
        raise ValueError(f"shapes {a} and {b} do not broadcast")
    return torch.Size(max(x, y) if 1 in (x, y) else x for x, y in zip(a, b))


def unwrap(fn, w: torch.Tensor):
    """Strip ``Independent`` and masking wrappers; broadcast the weights to the base batch shape.

    Returns the base distribution and weights of shape ``base.batch_shape``.
    """
    while True:
        if isinstance(fn, Independent):
            n = fn.reinterpreted_batch_ndims
            w = w.reshape(w.shape + (1,) * n)
            fn = fn.base_dist
        elif isinstance(fn, dist.MaskedDistribution):
            w = w * torch.as_tensor(fn._mask).to(w.dtype)  # _mask may be a bool (pyro.deterministic)
            fn = fn.base_dist
        else:
            break
    return fn, w.expand(broadcast_shape(w.shape, fn.batch_shape))


def reduce_product(operands: List[torch.Tensor], shape) -> torch.Tensor:
    """``prod(operands).sum_to_size(shape)`` (operands broadcast together), as one einsum.

    The broadcast product is never formed: dimensions that ``shape`` keeps become output
    indices, the others are contracted, and size-1 (or expanded, stride-0) dimensions are
    dropped first. sum_i w_j^(i) x^(i) x^(i)^T, for example, becomes a batched GEMM.
    Where ``shape`` is larger than the operands' broadcast shape the result is expanded.
    """
    shape = torch.Size(shape)
    ndim = max([len(shape)] + [t.dim() for t in operands])
    full = [1] * ndim
    subscripts, squeezed = [], []
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
    out = out.reshape([full[i] if i in kept else 1 for i in range(ndim)])
    return out.reshape(out.shape[ndim - len(shape):]).expand(shape)


def compact(t: torch.Tensor) -> torch.Tensor:
    """``t`` with every expanded (stride-0) dimension narrowed to size 1: a view, no copy."""
    index = tuple(slice(0, 1) if stride == 0 and size > 1 else slice(None)
                  for size, stride in zip(t.shape, t.stride()))
    return t[index] if any(i != slice(None) for i in index) else t


@dataclass
class Selection:
    """A distribution attribute A = S v that selects elements of the ``pyro.param`` v.

    ``shape`` is the shape of A before any final broadcasting (Pyro's plates and the
    distribution's own ``expand`` broadcast A over the data): statistics are summed to it.
    ``vjp(u)`` computes S^T u, scatter-adding ``u`` (of that ``shape``) onto v's elements,
    by applying the backward functions of the selection chain between A and v in turn.
    ``inputs[i]`` is the input of ``nodes[i]`` that leads to v (a ``cat`` has several).
    """

    param: str
    shape: torch.Size
    nodes: List  # autograd nodes from just below the broadcast down to (excluding) v's AccumulateGrad
    leaf_shape: torch.Size
    tensor: torch.Tensor  # A itself, for torch builds whose autograd nodes do not expose input shapes
    inputs: List[int] = field(default_factory=list)

    def vjp(self, u: torch.Tensor) -> torch.Tensor:
        if self.nodes and not hasattr(self.nodes[0], "_input_metadata"):
            return self._vjp_by_autograd(u)
        for i, node in enumerate(self.nodes):
            out = node(u)
            out = out if isinstance(out, tuple) else (out,)
            # Keep the gradient of the input that leads to v (a 0/1 mask is a constant), summed to
            # that input's shape: a node called directly leaves broadcasting to its caller.
            inputs = [j for j, (f, _) in enumerate(node.next_functions) if f is not None]
            k = self.inputs[i] if self.inputs else inputs[0]
            nxt, nr = node.next_functions[k]
            u = out[k].sum_to_size(nxt._input_metadata[nr].shape)
        return u.reshape(self.leaf_shape)

    def _vjp_by_autograd(self, u: torch.Tensor) -> torch.Tensor:
        full = broadcast_shape(u.shape, self.tensor.shape)
        repeats = full.numel() // u.numel()
        grad = torch.autograd.grad(self.tensor, self._leaf(), u.expand(full) / repeats, retain_graph=True)[0]
        return grad

    def _leaf(self) -> torch.Tensor:
        if self.tensor.grad_fn is None:
            return self.tensor
        node = self.tensor.grad_fn
        while type(node).__name__ != "AccumulateGrad":
            node = next(n for n, _ in node.next_functions if n is not None)
        return node.variable


def selection_source(tensor: torch.Tensor, leaves: Dict[int, str]) -> Optional[Selection]:
    """If ``tensor`` is a pure selection of one param leaf, describe it (see :class:`Selection`).

    A top-level normalisation ``p / p.sum(-1, keepdim=True)`` (how torch stores Categorical
    probabilities) is looked through: the parameter is already on the simplex.
    """
    found = selection_sources(tensor, leaves)
    return found[0] if len(found) == 1 else None


def selection_sources(tensor: torch.Tensor, leaves: Dict[int, str], log: bool = False) -> List[Selection]:
    """Every param leaf that ``tensor`` selects elements of, one :class:`Selection` per path to it.

    Empty unless every element of ``tensor`` is a selection (a ``cat`` joins several parameters,
    or constants, along a dimension). With ``log``, ``tensor`` must be log v of a selection v,
    logits: one ``log`` on each path, and a top-level normalisation ``l - l.logsumexp(-1,
    keepdim=True)`` (how Pyro stores logits) is looked through.
    """
    if tensor.grad_fn is None:
        leaf = leaves.get(id(tensor))
        return [] if leaf is None or log else [Selection(leaf, tensor.shape, [], tensor.shape, tensor)]
    node, shape = _below_broadcast(tensor.grad_fn, tensor.shape)
    if not log and type(node).__name__ == "DivBackward0" and node.next_functions[1][0] is not None:
        # Statistics are summed to the shape of the numerator p, then scattered through p's chain.
        tensor = node._saved_self
        node, shape = _below_broadcast(node.next_functions[0][0], tensor.shape)
    if log and _is_log_normalisation(node):
        node = node.next_functions[0][0]
    found: List[Selection] = []
    paths = [(node, [], [], False)]  # (node, chain, inputs, a log passed)
    while paths:
        node, chain, inputs, logged = paths.pop()
        name = type(node).__name__
        if name == "AccumulateGrad":
            leaf = leaves.get(id(node.variable))
            if leaf is None or logged != log or ((log or _through_cat(chain)) and not _has_shapes(chain)):
                return []
            found.append(Selection(leaf, torch.Size(shape), chain, node.variable.shape, tensor, inputs))
        elif name == "LogBackward0" and log and not logged:
            paths.append((node.next_functions[0][0], chain, inputs, True))  # S^T u passes log unchanged
        elif name in SELECTION_OPS or _is_01_mask(node) or name == "CatBackward0":
            nxt = [(k, n) for k, (n, _) in enumerate(node.next_functions) if n is not None]
            if not nxt or (len(nxt) > 1 and name != "CatBackward0"):
                return []
            paths.extend((n, chain + [node], inputs + [k], logged) for k, n in nxt)
        else:
            return []
    return found


def _through_cat(chain: List) -> bool:
    return any(type(node).__name__ == "CatBackward0" for node in chain)


def _has_shapes(chain: List) -> bool:
    # Without input shapes on autograd nodes, Selection.vjp falls back to autograd from A, which
    # would differentiate a log too and could not pick one input of a cat.
    return all(hasattr(node, "_input_metadata") for node in chain)


def _is_log_normalisation(node) -> bool:
    """``l - l.logsumexp(-1, keepdim=True)``: a SubBackward0 whose second input is a logsumexp of its first."""
    if type(node).__name__ != "SubBackward0" or node.next_functions[1][0] is None:
        return False
    other = node.next_functions[1][0]
    return type(other).__name__ == "LogsumexpBackward0" and other.next_functions[0][0] is node.next_functions[0][0]


def _below_broadcast(node, shape):
    """Skip the ``expand`` nodes at the top of a graph: (first other node, shape of its output)."""
    while node is not None and type(node).__name__ == "ExpandBackward0":
        shape = torch.Size(node._saved_self_sym_sizes)
        node = node.next_functions[0][0]
    return node, shape


def _is_01_mask(node) -> bool:
    """A product with a constant 0/1 tensor, e.g. ``sigma2[z, None, None] * eye(d)``."""
    if type(node).__name__ != "MulBackward0":
        return False
    const = node._saved_other if node.next_functions[1][0] is None else node._saved_self
    return bool(((const == 0) | (const == 1)).all())


@dataclass
class Use:
    """One place where a parameter enters the model: site, family rule, and its selection."""

    site: str
    rule: Rule
    selection: Selection
    part: str = ""  # "emission": the observation distribution of a chain site (ppl_em.chains)

    @property
    def param(self) -> str:
        return self.selection.param


def find_uses(site: dict, leaves: Dict[int, str]) -> List[Use]:
    """Every (attribute, parameter) pair of ``site`` that a closed-form rule can update.

    A chain site (``DiscreteHMM``) has two parts: its own transition and initial logits, and
    its observation distribution, whose statistics are weighted by Q(w_t) (``part="emission"``).
    """
    parts = [("", site["fn"])]
    if chains.is_chain(site["fn"]):
        parts.append(("emission", site["fn"].observation_dist))
    uses = []
    for part, fn in parts:
        fn, _ = unwrap(fn, torch.ones(()))
        for rule in RULES:
            if type(fn) is not rule.family or rule.attr not in fn.__dict__:
                continue
            for found in selection_sources(fn.__dict__[rule.attr], leaves, log=rule.log):
                uses.append(Use(site["name"], rule, found, part))
    return uses


def use_distribution(use: Use, site: dict):
    """The distribution (wrappers stripped) whose attribute ``use`` updates."""
    fn = site["fn"].observation_dist if use.part == "emission" else site["fn"]
    return unwrap(fn, torch.ones(()))[0]


def _view(use: Use, site: dict, weights):
    """(distribution, value, Q) over which ``use``'s statistics are taken; Q broadcast to the batch shape.

    A chain's statistics are sums over all its time steps at once (a chain is never split into
    chunks, whose sums are added in float64): lower-precision weights and values are summed in float64.
    """
    if use.part == "emission":
        fn, w = unwrap(site["fn"].observation_dist, weights.emission)
        x = chains.emission_value(site["fn"], site["value"])
        if w.dtype in (torch.float16, torch.bfloat16, torch.float32):
            w, x = compact(w).double(), (x.double() if x.is_floating_point() else x)  # (.., T, K, 1), not (.., T, K, d)
        return fn, x, w
    if isinstance(weights, chains.ChainTerms):
        return site["fn"], site["value"], weights  # the chain's own tables
    fn, w = unwrap(site["fn"], weights)
    return fn, site["value"], w


def scatter_stats(use: Use, site: dict, weights, reg: float):
    """S^T(numerator), S^T(denominator): the use's weighted statistics summed per param element."""
    with torch.no_grad():
        fn, x, w = _view(use, site, weights)
        num, den = use.rule.stats(fn, w, x, reg, use.selection.shape)
        dtype = use.selection.tensor.dtype  # the selection's backward runs in the parameter's dtype
        return use.selection.vjp(num.to(dtype)), (None if den is None else use.selection.vjp(den.to(dtype)))


# -- phase 2 while streaming: statistics about the old location, shifted to the new one -------------
# For a location m that is the same for every data point i (mu_z), with sums over i,
#     sum w (x - m')(x - m')^T = M2 - S delta^T - delta S^T + N delta delta^T,    delta = m' - m,
# where M2 = sum w (x - m)(x - m)^T, S = sum w (x - m), N = sum w about the old m. So one pass over
# the data (the E-step's) gives the scale statistics at the new location of the same M-step.
def location_moments(use: Use, site: dict, weights):
    """(M2, S, N) of a phase-2 use about its current location m, summed over every dimension along
    which neither m nor the parameter varies; and m. Exact to shift only if m does not vary with the
    data point (the caller checks that the shapes do not change with the number of rows)."""
    with torch.no_grad():
        fn, x, w = _view(use, site, weights)
        loc = compact(fn.loc)
        target = use.selection.shape
        if use.rule.family is dist.MultivariateNormal:
            return gaussian_moments(w, x, loc, broadcast_shape(loc.shape[:-1], target[:-2])), loc.detach()
        # An elementwise family (Normal): every dimension is a batch dimension.
        return normal_moments(w, x, loc, broadcast_shape(loc.shape, target)), loc.detach()


def shifted_stats(use: Use, moments, old_loc: torch.Tensor, new_loc: torch.Tensor, reg: float):
    """S^T(numerator), S^T(denominator) of a phase-2 use at the new location, from its moments."""
    with torch.no_grad():
        m2, s1, n = moments
        delta = new_loc.to(m2.dtype) - old_loc.to(m2.dtype)
        if use.rule.family is dist.MultivariateNormal:
            d = delta.shape[-1]
            delta = delta.expand(s1.shape)
            outer = s1.unsqueeze(-1) * delta.unsqueeze(-2)
            eye = torch.eye(d, dtype=m2.dtype, device=m2.device)
            n = n[..., None, None]
            num = m2 - outer - outer.transpose(-1, -2) + n * delta.unsqueeze(-1) * delta.unsqueeze(-2) + reg * n * eye
            den = n.expand(num.shape)
        else:
            num = m2 - 2 * delta * s1 + n * delta * delta + reg * n
            den = n.expand(num.shape)
        shape = use.selection.shape
        num, den = reduce_product([num], shape), reduce_product([den], shape)
        dtype = use.selection.tensor.dtype  # the selection's backward runs in the parameter's dtype
        return use.selection.vjp(num.to(dtype)), use.selection.vjp(den.to(dtype))


# -- fast log-densities --------------------------------------------------------------------------
def log_prob(fn, value: torch.Tensor) -> torch.Tensor:
    """``fn.log_prob(value)``, through a GEMM fast path for a multivariate normal under enumeration.

    With parameters that vary over the enumerated values (mu_z, Sigma_z: batch (k, 1)) and data
    that vary over the plate (x^(i): batch (n,)), the Mahalanobis terms
    ||L_z^{-1} x^(i) - L_z^{-1} mu_z||^2 for all (z, i) come from one product of the (n, d)
    data with the k stacked (d, d) matrices L_z^{-1}, instead of k * n triangular solves.
    Anything else goes to the distribution's own ``log_prob``.
    """
    if type(fn) is dist.Categorical:
        return _categorical_log_prob(fn, value)
    if has_gemm_path(fn) and value.dim() >= 1:
        fast = _mvn_log_prob(fn, value) if type(fn) is dist.MultivariateNormal else _diag_normal_log_prob(fn.base_dist, value)
        if fast is not None:
            return fast
    return fn.log_prob(value)


def _categorical_log_prob(fn, value: torch.Tensor) -> torch.Tensor:
    """``Categorical.log_prob`` from the unexpanded probabilities: log phi_z for the k enumerated
    values is a (k, 1) table broadcast over the data plate, where the distribution's own log_prob
    would take the log of phi expanded to (n, k) and gather from it."""
    if fn._validate_args:
        fn._validate_sample(value)
    if "probs" in fn.__dict__ and "logits" not in fn.__dict__:
        logits = torch.distributions.utils.probs_to_logits(compact(fn.probs))  # what fn.logits would hold
    else:
        logits = compact(fn.logits)
    index = value.long().unsqueeze(-1)
    index, logits = torch.broadcast_tensors(compact(index), logits)
    return logits.gather(-1, index[..., :1]).squeeze(-1).expand(broadcast_shape(fn.batch_shape, value.shape))


def _diag_normal_log_prob(base, value: torch.Tensor) -> Optional[torch.Tensor]:
    """``Normal(loc, scale).to_event(1).log_prob(value)`` as two GEMMs of the data with 1 / sigma_z^2 and
    mu_z / sigma_z^2 (sums over the d coordinates), when parameters and data vary along different dimensions
    (mu_z, sigma_z for the k states; x^(i) for the data points): no (n, k, d) tensor.

    The squares are expanded about the data mean c, sum_d ((x - c)^2 - 2 (x - c)(mu - c) + (mu - c)^2) / sigma^2,
    so that their cancellation loses no more than the spread of the data relative to sigma; float32
    inputs are expanded in float64 (and the result, and its gradients, rounded back).
    """
    dtype = torch.promote_types(base.loc.dtype, value.dtype)
    dt = torch.promote_types(dtype, torch.float64)
    loc, scale, x = compact(base.loc).to(dt), compact(base.scale).to(dt), compact(value).to(dt)
    d = x.shape[-1]
    params = broadcast_shape(loc.shape[:-1], scale.shape[:-1])
    if loc.shape[-1] not in (1, d) or scale.shape[-1] not in (1, d) or _overlap(params, x.shape[:-1]):
        return None
    rows = x.reshape(-1, d)  # (N, d)
    c = rows.mean(0)
    prec = scale.expand(params + (d,)).reshape(-1, d).pow(-2)  # (P, d)
    mc = loc.expand(params + (d,)).reshape(-1, d) - c
    xc = rows - c
    maha = (xc * xc) @ prec.T - 2 * (xc @ (mc * prec).T) + (mc * mc * prec).sum(-1)  # (N, P)
    log_norm = scale.expand(params + (d,)).reshape(-1, d).log().sum(-1) + 0.5 * d * math.log(2 * math.pi)
    out = (-0.5 * maha - log_norm).to(dtype)  # (N, P)
    return _broadcast_layout(out.T, params, x.shape[:-1], broadcast_shape(base.batch_shape[:-1], value.shape[:-1]))


def _mvn_log_prob(fn, value: torch.Tensor) -> Optional[torch.Tensor]:
    loc, tril = compact(fn.loc), fn._unbroadcasted_scale_tril
    x = compact(value)
    d = loc.shape[-1]
    params = broadcast_shape(loc.shape[:-1], tril.shape[:-2])
    if x.shape[-1] != d or _overlap(params, x.shape[:-1]):
        return None  # parameters and data vary along a common dimension: no shared GEMM
    eye = torch.eye(d, dtype=tril.dtype, device=tril.device)
    inv = torch.linalg.solve_triangular(tril.expand(params + (d, d)), eye, upper=False).reshape(-1, d, d)
    mu = loc.expand(params + (d,)).reshape(-1, d)  # (K, d)
    half_log_det = tril.diagonal(dim1=-2, dim2=-1).log().sum(-1).expand(params).reshape(-1, 1)
    log_norm = 0.5 * d * math.log(2 * math.pi) + half_log_det  # (K, 1)
    out = _log_density_by_features(x, inv, mu, log_norm)
    if out is None:
        out = -0.5 * _maha_by_whitening(x.reshape(-1, d), inv, mu).T.to(log_norm.dtype) - log_norm  # (K, N)
    return _broadcast_layout(out, params, x.shape[:-1], broadcast_shape(fn.batch_shape, value.shape[:-1]))


def _broadcast_layout(table: torch.Tensor, params, data, batch_shape) -> torch.Tensor:
    """A (P, N) table, one value per (parameter batch element, data batch element), laid out in
    the broadcast shape: parameter dims and data dims interleaved as they stand (they never
    share a dim), then expanded to ``batch_shape``."""
    ndim = max(len(params), len(data))
    p_sizes = (1,) * (ndim - len(params)) + tuple(params)
    x_sizes = (1,) * (ndim - len(data)) + tuple(data)
    p_dims = [i for i in range(ndim) if p_sizes[i] != 1]
    x_dims = [i for i in range(ndim) if x_sizes[i] != 1]
    out = table.reshape([p_sizes[i] for i in p_dims] + [x_sizes[i] for i in x_dims])
    order = p_dims + x_dims
    out = out.permute([order.index(i) for i in sorted(order)])
    out = out.reshape([max(p_sizes[i], x_sizes[i]) for i in range(ndim)])
    return out.expand(broadcast_shape(out.shape, batch_shape))


def _maha_by_whitening(rows: torch.Tensor, inv: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """||L_z^{-1} x - L_z^{-1} mu_z||^2 for all (row, z): an (N, d) x (d, K d) product, block by
    block of rows so that the whitened (B, K d) block stays about ``FEATURE_ELEMENTS``. (N, K)."""
    d = rows.shape[-1]
    shift = (inv @ mu.unsqueeze(-1)).reshape(1, -1)  # (1, K d)
    stacked = inv.transpose(-1, -2).permute(1, 0, 2).reshape(d, -1)  # (d, K d)
    step = max(1, FEATURE_ELEMENTS // max(1, stacked.shape[-1]))
    parts = []
    for start in range(0, rows.shape[0], step):
        white = torch.addmm(shift, rows[start:start + step], stacked, beta=-1)
        parts.append(torch.linalg.vector_norm(white.view(white.shape[0], -1, d), dim=-1).square())
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def has_gemm_path(fn) -> bool:
    """Whether :func:`log_prob` computes ``fn``'s log-density by a GEMM fast path that never forms a
    temporary of the event's size per (parameter, data point) pair (a multivariate normal; a
    diagonal normal), so that the cost per data row is the log-probability's own size."""
    return type(fn) is dist.MultivariateNormal or (
        type(fn) is dist.Independent and type(fn.base_dist) is dist.Normal and fn.reinterpreted_batch_ndims == 1)


def _log_density_by_features(x: torch.Tensor, inv: torch.Tensor, mu: torch.Tensor,
                             log_norm: torch.Tensor) -> Optional[torch.Tensor]:
    """log N(x | mu_z, Sigma_z) = -(1/2) (x - mu_z)^T P_z (x - mu_z) - log_norm_z for all (z, row),
    P_z = Sigma_z^{-1}, as <T(x - c), eta_z> + const_z: the exponential-family form, one
    (K, q + d) x (q + d, B) product per block of B rows with their sufficient statistics about
    a centre c amid the data (:func:`sufficient_stats`). (K, N). None where cancellation could cost
    accuracy: a bound on |x - c|^2 ||P_z|| must stay below 1e6 (the whitened form is used there instead)."""
    d = x.shape[-1]
    rows = x.reshape(-1, d)
    c = _centre(rows)
    inv = inv.to(c.dtype)
    p_norm = float(inv.detach().square().sum((-1, -2)).max())
    precision = inv.transpose(-1, -2) @ inv  # (K, d, d)
    lc = mu.to(c.dtype) - c.reshape(1, d)  # (K, d)
    i, j = torch.triu_indices(d, d, device=c.device)
    quad = precision[:, i, j] * torch.where(i == j, -0.5, -1.0).to(c.dtype)  # (K, q): -(1/2) x^T P x, packed
    plc = (precision @ lc.unsqueeze(-1)).squeeze(-1)  # (K, d): the linear term x^T P (mu - c)
    const = -0.5 * (plc * lc).sum(-1, keepdim=True) - log_norm.to(c.dtype)  # (K, 1)
    coef = torch.cat([quad, plc], -1)  # (K, q + d)
    grad = torch.is_grad_enabled() and (coef.requires_grad or const.requires_grad)
    out = None if grad else new_table((coef.shape[0], rows.shape[0]), log_norm.dtype, c.device)
    step, parts = _feature_rows(d), []
    for start in range(0, rows.shape[0], step):
        stats = sufficient_stats(rows[start:start + step], c)
        cols = stats[-d:]  # max_i |x - c|^2 <= sum_a max_i (x_a - c_a)^2
        if float(torch.maximum(cols.amax(1), -cols.amin(1)).square().sum()) * p_norm > 1e6:
            return None
        if grad:  # a gradient M-step differentiates through the blocks (out= cannot)
            parts.append(torch.addmm(const, coef, stats))
        elif out.dtype == c.dtype:
            torch.addmm(const, coef, stats, out=out[:, start:start + step])
        else:  # float32 data: the float64 block is rounded while still in cache
            out[:, start:start + step].copy_(torch.addmm(const, coef, stats))
    _SEEN[:] = [(x, x._version, c)]
    return torch.cat(parts, 1).to(log_norm.dtype) if grad else out
