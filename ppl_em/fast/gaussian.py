"""The Gaussian's sufficient statistics as GEMMs: the E-step's log-densities and the M-step's sums.

For a Gaussian site whose parameters mu_z, Sigma_z are the same for every data point, everything
EM needs from the data passes through the sufficient statistic T(x - c) = [packed products
(x - c)_a (x - c)_b for a <= b, x - c] about a centre c amid the data:

    E-step   log N(x | mu_z, Sigma_z) = <T(x - c), eta_z> + const_z          one (k, q + d) x (q + d, n) GEMM
    M-step   N_z = sum_i w_z^(i),  [M_z, S_z] = sum_i w_z^(i) T(x^(i) - c)     one (k, n) x (n, q + d) GEMM

T is built in blocks of about ``FEATURE_ELEMENTS`` and each block goes into its GEMM while it is
still in cache: written for a whole chunk it would travel to memory and back (measured 2x slower).
A small table (at most ``WHITEN_PAIRS`` pairs (z, i)) is computed by whitening instead, which takes
fewer operations.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

from .tensors import broadcast_shape, compact, normalise_exp, normalise_mode, overlap, reduce_product
from .workspace import Workspace, block_rows, map_blocks, new_table, scratch, scratch_views

__all__ = ["centre", "sufficient_stats", "product_views", "gaussian_sums", "normal_sums", "mvn_log_prob", "mvn_features",
           "GaussianFeatures", "DiagonalFeatures", "diag_features", "diag_normal_log_prob",
           "FEATURE_ELEMENTS", "PASS_ELEMENTS"]

# Elements of T(x - c) per block: 4 MB in float64.
FEATURE_ELEMENTS = 2**19
# Elements of a block of the posterior's pass (GaussianFeatures.posterior_sums): its features T(x - c) and its
# two (K, B) tables, 16 MB in float64. A block's thirty-odd operations hold the GIL for their Python (some
# 0.1-0.2 ms a block), and the blocks run side by side on torch's threads: smaller blocks keep a thread
# waiting for the GIL more of the time. Measured on 2 cores, blocks of 1/2, 1, 2 and 4 times the features'
# FEATURE_ELEMENTS (d = 10, k = 16): 160, 134, 124, 125 ms a pass over 1e6 rows; at d = 20, k = 5 98, 69, 57,
# 54 ms; at d = 2, k = 3 (n = 1e6) about even.
PASS_ELEMENTS = 2**21
# At most this many (component, row) pairs, a Gaussian's log-density is computed by whitening each row
# (x - mu_z -> L_z^{-1} (x - mu_z)): fewer operations than the exponential-family form, whose fixed
# cost (the centre, the packed coefficients, the range check) is larger below it (measured: 0.3-0.4x
# its time at n = 1000, k = 3, d = 2; about even at 8192 pairs for d = 2..10).
WHITEN_PAIRS = 8192


def centre(rows: torch.Tensor) -> torch.Tensor:
    """A centre c (d,) for rows (N, d): the mean of at most about 8192 evenly spaced rows, in float64
    for lower-precision data. Any c gives the same statistics (it cancels); one amid the data keeps
    the products (x - c)_a (x - c)_b small. The mean of all rows would cost a pass over them (and
    a float64 copy of float32 data) for no gain in accuracy."""
    sample = rows[::max(1, rows.shape[0] // 8192)]
    return sample.mean(0, dtype=torch.promote_types(rows.dtype, torch.float64))


def _feature_rows(d: int) -> int:
    """Rows per block of sufficient statistics for data of dimension d."""
    return max(64, FEATURE_ELEMENTS // (d * (d + 1) // 2 + d))


def sufficient_stats(rows: torch.Tensor, c: torch.Tensor, out: Optional[torch.Tensor] = None,
                     views: Optional[Tuple[torch.Tensor, list]] = None) -> torch.Tensor:
    """T(x - c)^T = [packed (x - c)_a (x - c)_b for a <= b, x - c] of rows x (B, d) about c (d,):
    (q + d, B), q = d(d+1)/2, in c's dtype (float64 for float32 data); into ``out`` where given, through its
    ``views`` (:func:`product_views` of ``out``, made once where ``out`` is used again).

    Each product is written straight into its place as a contiguous row (a gather on the last
    dim, or products joined by cat, are several times slower), in the order of torch.triu_indices.
    (A compiled loop, numba, measured about 5% of a B1 step faster, not worth numba's import and
    loading, most of a second, at every process's first fit.)
    """
    d = rows.shape[-1]
    q = d * (d + 1) // 2
    if out is None:
        out = torch.empty((q + d, rows.shape[0]), dtype=c.dtype, device=c.device)
    cols, products = product_views(out, d) if views is None else views
    torch.sub(rows.T, c.reshape(d, 1), out=cols)
    for left, right, into in products:
        torch.mul(left, right, out=into)
    return out


def product_views(out: torch.Tensor, d: int) -> Tuple[torch.Tensor, List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """The views of a (q + d, B) block of :func:`sufficient_stats` that its operations read and write: the
    centred rows out[q:] (d, B), and for each a the row (x - c)_a (1, B), the rows (x - c)_a.. (d - a, B) and
    the products' place (d - a, B)."""
    q = d * (d + 1) // 2
    cols, products, start = out[q:], [], 0
    for a in range(d):
        products.append((cols[a:a + 1], cols[a:], out[start:start + d - a]))
        start += d - a
    return cols, products


def gaussian_sums(w: torch.Tensor, x: torch.Tensor, inner, c: torch.Tensor):
    """N = sum w, S = sum w (x - c), M = sum w (x - c)(x - c)^T, summed to batch shape ``inner``.

    ``w`` broadcasts against x's batch shape, ``x`` is (..., d), ``c`` (d,) (float64 for float32
    data). Returns N (inner), S (inner, d), M (inner, d, d) in c's dtype: one GEMM of the weights
    with :func:`sufficient_stats` per block of rows, no (k, n, d) difference tensor.
    """
    x, inner = compact(x), tuple(inner)
    d = x.shape[-1]
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
    return n.expand(inner), sums[..., -d:].expand(inner + (d,)), _unpack_symmetric(sums[..., :-d], d).expand(inner + (d, d))


def normal_sums(w: torch.Tensor, x: torch.Tensor, inner, c: torch.Tensor):
    """The elementwise twin of :func:`gaussian_sums` (a Normal's coordinates are independent):
    N = sum w, S = sum w (x - c), M = sum w (x - c)^2, summed to ``inner``; c broadcasts against x."""
    dt = torch.promote_types(x.dtype, torch.float64)
    w, x, inner = compact(w), compact(x), tuple(inner)
    if x.dim() == 2 and w.dim() == 3 and w.shape[1:] == (x.shape[0], 1) and inner == (w.shape[0], 1, x.shape[1]) \
            and c.numel() in (1, x.shape[1]):
        return _row_weighted_normal_sums(w.reshape(w.shape[0], -1), x, c.to(dt).reshape(-1), dt)
    w, xc = w.to(dt), x.to(dt) - c.to(dt)
    return reduce_product([w], inner), reduce_product([w, xc], inner), reduce_product([w, xc * xc], inner)


def _row_weighted_normal_sums(w: torch.Tensor, x: torch.Tensor, c: torch.Tensor, dt):
    """:func:`normal_sums` for weights w (K, m) per row of x (m, d), summed over the rows into (K, 1, d): one
    GEMM per block of rows with the features [1, x - c, (x - c)^2] (B, 1 + 2d) while they are in cache,
    instead of three passes over the (K, m) weights and (m, d) temporaries."""
    k, (m, d) = w.shape[0], x.shape
    step = max(64, FEATURE_ELEMENTS // (2 * d + 1))
    features = torch.empty((min(step, m), 2 * d + 1), dtype=dt, device=x.device)
    features[:, 0] = 1.0
    sums = None
    for start in range(0, m, step):
        block = x[start:start + step]
        f = features[:block.shape[0]]
        torch.sub(block, c, out=f[:, 1:d + 1])
        torch.mul(f[:, 1:d + 1], f[:, 1:d + 1], out=f[:, d + 1:])
        part = torch.mm(w[:, start:start + step].to(dt), f)
        sums = part if sums is None else sums.add_(part)
    return (sums[:, :1].reshape(k, 1, 1).expand(k, 1, d), sums[:, 1:d + 1].reshape(k, 1, d),
            sums[:, d + 1:].reshape(k, 1, d))


def _unpack_symmetric(packed: torch.Tensor, d: int) -> torch.Tensor:
    """The symmetric (..., d, d) matrices of packed (..., q) upper triangles (torch.triu_indices order):
    one gather."""
    return packed[..., _symmetric_index(d, packed.device)].reshape(packed.shape[:-1] + (d, d))


def _symmetric_index(d: int, device: torch.device) -> torch.Tensor:
    """(d * d,): the packed position of entry (a, b) of a symmetric d x d matrix, row by row."""
    rows, cols = torch.triu_indices(d, d, device=device)
    index = torch.empty((d, d), dtype=torch.long, device=device)
    index[rows, cols] = index[cols, rows] = torch.arange(rows.numel(), device=device)
    return index.reshape(-1)


# -- fast log-densities ------------------------------------------------------------------------------
def mvn_log_prob(fn, value: torch.Tensor, ws: Optional[Workspace]) -> Optional[torch.Tensor]:
    """``MultivariateNormal.log_prob`` for parameters and data that vary along different batch dims
    (mu_z, Sigma_z for the k states; x^(i) for the data points): the Mahalanobis terms
    ||L_z^{-1} (x^(i) - mu_z)||^2 for all (z, i) from GEMMs instead of k * n triangular solves.
    None where parameters and data share a dimension."""
    parts = _mvn_parts(fn, value)
    if parts is None:
        return None  # parameters and data vary along a common dimension: no shared GEMM
    x, inv, mu, log_norm, layout, dtype = parts
    d = x.shape[-1]
    small = mu.shape[0] * x[..., 0].numel() <= WHITEN_PAIRS
    out = None if small else GaussianFeatures(x, inv, mu, log_norm, layout, dtype).table(ws)
    if out is None:
        maha = _maha_by_whitening(x.reshape(-1, d), inv.to(dtype), mu, ws)
        out = -0.5 * maha.to(dtype) - log_norm.to(dtype)  # (K, N)
    return broadcast_layout(out, *layout)


def mvn_features(fn, value: torch.Tensor) -> Optional["GaussianFeatures"]:
    """``fn.log_prob(value)`` of a multivariate normal as a :class:`GaussianFeatures`, not yet computed,
    where :func:`mvn_log_prob` would compute it in that form (a table larger than ``WHITEN_PAIRS``, no
    gradient asked for); None elsewhere."""
    parts = _mvn_parts(fn, value, above=WHITEN_PAIRS)
    if parts is None:
        return None
    features = GaussianFeatures(*parts)
    return None if torch.is_grad_enabled() and (features.coef.requires_grad or features.const.requires_grad) else features


def _mvn_parts(fn, value: torch.Tensor, above: int = -1):
    """(x, L^{-1} (K, d, d), mu (K, d), log_norm (K, 1), layout, the log-densities' dtype) of ``fn.log_prob(value)``;
    None where parameters and data vary along a common dimension, or where the table has no more than ``above``
    pairs (component, row). L^{-1} and log_norm are computed in float64 from a float32 factor L (the GEMM form
    runs in float64: a float32 inverse would cost it digits, about 1e-7 of Q)."""
    loc, tril = compact(fn.loc), fn._unbroadcasted_scale_tril
    x = compact(value)
    d = loc.shape[-1]
    params = broadcast_shape(loc.shape[:-1], tril.shape[:-2])
    if x.shape[-1] != d or overlap(params, x.shape[:-1]) or math.prod(params) * (x.numel() // d) <= above:
        return None
    dtype = tril.dtype
    tril = tril.to(torch.promote_types(dtype, torch.float64))
    eye = torch.eye(d, dtype=tril.dtype, device=tril.device)
    inv = torch.linalg.solve_triangular(tril.expand(params + (d, d)), eye, upper=False).reshape(-1, d, d)
    mu = loc.expand(params + (d,)).reshape(-1, d)  # (K, d)
    half_log_det = tril.diagonal(dim1=-2, dim2=-1).log().sum(-1).expand(params).reshape(-1, 1)
    log_norm = 0.5 * d * math.log(2 * math.pi) + half_log_det  # (K, 1)
    return x, inv, mu, log_norm, (params, x.shape[:-1], broadcast_shape(fn.batch_shape, value.shape[:-1])), dtype


def diag_normal_log_prob(base, value: torch.Tensor, ws: Optional[Workspace] = None) -> Optional[torch.Tensor]:
    """``Normal(loc, scale).to_event(1).log_prob(value)`` for all (z, i), when parameters and data vary along
    different dimensions: one GEMM of the coefficients (P, 2d) with the data's diagonal features
    [(x - c)^2, x - c] (2d, B) per block of rows, no (n, k, d) tensor (:class:`DiagonalFeatures`):

        log N(x | mu_z, diag sigma_z^2) = sum_a (-(1/2) (x_a - c_a)^2 / sigma_za^2 + (x_a - c_a) (mu_za - c_a) / sigma_za^2)
                                          - (1/2) sum_a (mu_za - c_a)^2 / sigma_za^2 - log_norm_z,

    expanded about a centre c amid the data so that the cancellation loses no more than the spread of the
    data relative to sigma. float32 inputs are expanded in float64 (and the result, and its gradients,
    rounded back). The table is laid out (P, N), each component's row contiguous, like :func:`mvn_log_prob`'s.
    """
    features = _diag_features(base, value)
    return None if features is None else features.laid_out(features.table(ws))


def broadcast_layout(table: torch.Tensor, params, data, batch_shape) -> torch.Tensor:
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


def _maha_by_whitening(rows: torch.Tensor, inv: torch.Tensor, mu: torch.Tensor,
                       ws: Optional[Workspace] = None) -> torch.Tensor:
    """||L_z^{-1} x - L_z^{-1} mu_z||^2 for all (z, row): a (K d, d) x (d, N) product, block by block of
    rows so that the whitened (K d, B) block stays about ``FEATURE_ELEMENTS``; squared in place and summed
    over d. (K, N), each component's row contiguous like the exponential-family table's (measured: 1.5-2x
    faster at small d than the (N, K d) product and its rows' norms, and the posterior's sums over z then
    run along contiguous rows). Without a graph the blocks run side by side on ``ws``'s threads."""
    d = rows.shape[-1]
    k = inv.shape[0]
    shift = (inv @ mu.unsqueeze(-1)).reshape(-1, 1)  # (K d, 1)
    stacked = inv.reshape(-1, d)  # (K d, d): row (z, b) is row b of L_z^{-1}
    step = max(1, FEATURE_ELEMENTS // max(1, stacked.shape[0]))

    def one(b: int) -> torch.Tensor:
        white = torch.addmm(shift, stacked, rows[b * step:(b + 1) * step].T, beta=-1)  # (K d, B)
        return white.square_().view(k, d, -1).sum(1)

    count = -(-rows.shape[0] // step)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (rows, inv, mu))
    parts = [one(b) for b in range(count)] if grad else map_blocks(ws, one, count, rows.device)
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


class GaussianFeatures:
    """log N(x^(i) | mu_z, Sigma_z) = -(1/2) (x - mu_z)^T P_z (x - mu_z) - log_norm_z for all (z, row),
    P_z = Sigma_z^{-1}, as <T(x^(i) - c), eta_z> + const_z: the exponential-family form, one
    (K, q + d) x (q + d, B) product per block of B rows with their sufficient statistics about a
    centre c amid the data (:func:`sufficient_stats`), not yet computed.

    :meth:`table` computes the (K, N) table. :meth:`posterior_sums` computes it in one pass with what a
    mixture's EM makes of it, Q(z) and the M-step's weighted sums of the same T blocks while they are in
    cache (instead of building T again for the sums). Both give None where cancellation could cost
    accuracy: a bound on |x - c|^2 ||P_z|| must stay below 1e6 (the whitened form is used there instead).

    ``layout`` (parameter batch shape, data batch shape, batch shape) says how a (K, N) table is laid
    out as the site's log-probability (:func:`broadcast_layout`); ``dtype`` is the tables' (log_norm's without it).
    """

    def __init__(self, x: torch.Tensor, inv: torch.Tensor, mu: torch.Tensor, log_norm: torch.Tensor, layout=None,
                 dtype: Optional[torch.dtype] = None):
        d = x.shape[-1]
        self.rows = x.reshape(-1, d)  # (N, d)
        self.c = c = centre(self.rows)
        inv = inv.to(c.dtype)
        self.p_norm = inv.detach().square().sum((-1, -2)).max()  # a tensor: only the bound's test leaves torch
        precision = inv.transpose(-1, -2) @ inv  # (K, d, d)
        lc = mu.to(c.dtype) - c.reshape(1, d)  # (K, d)
        i, j = torch.triu_indices(d, d, device=c.device)
        quad = precision[:, i, j] * torch.where(i == j, -0.5, -1.0).to(c.dtype)  # (K, q): -(1/2) x^T P x, packed
        plc = (precision @ lc.unsqueeze(-1)).squeeze(-1)  # (K, d): the linear term x^T P (mu - c)
        self.const = -0.5 * (plc * lc).sum(-1, keepdim=True) - log_norm.to(c.dtype)  # (K, 1)
        self.coef = torch.cat([quad, plc], -1)  # (K, q + d)
        self.dtype, self.layout = log_norm.dtype if dtype is None else dtype, layout  # the tables' dtype
        self.shape = (self.coef.shape[0], self.rows.shape[0])  # (K, N)

    def laid_out(self, table: torch.Tensor) -> torch.Tensor:
        """A (K, N) table in the site's layout."""
        return broadcast_layout(table, *self.layout)

    def _block(self, start: int, stop: int, extremes: List[torch.Tensor], ws: Optional[Workspace] = None) -> torch.Tensor:
        """T(x - c) (q + d, B) of rows start:stop, in ``ws``'s scratch tensor of the calling thread (held for
        the block only); the least and the greatest x_a - c_a so far go into ``extremes`` (two (d,) tensors,
        for :meth:`_cancels`). (amin and amax: measured 2-4x faster than one aminmax on a block's (d, B) rows.)"""
        rows = self.rows[start:stop]
        stats, views = scratch_views(ws, "features", (self.coef.shape[-1], rows.shape[0]), self.c.dtype, self.c.device,
                                     self._views)
        self._features(rows, stats, views)
        if self.p_norm is not None:
            centred = stats[-self.rows.shape[-1]:]
            low, high = centred.amin(1), centred.amax(1)
            if extremes:
                torch.minimum(extremes[0], low, out=extremes[0])
                torch.maximum(extremes[1], high, out=extremes[1])
            else:
                extremes += [low, high]
        return stats

    def _cancels(self, extremes: List[List[torch.Tensor]]) -> bool:
        """Whether the form could cancel away digits: max_i |x^(i) - c|^2 ||P_z|| > 1e6, bounded above by
        sum_a max_i (x_a - c_a)^2 from the ``extremes`` of :meth:`_block` (one [least, greatest] pair per
        pass or block; checked once, after the pass)."""
        if self.p_norm is None:
            return False
        reach = [torch.maximum(high, -low) for low, high in extremes]
        reach = reach[0] if len(reach) == 1 else torch.stack(reach).amax(0)
        return bool(reach.square().sum() * self.p_norm > 1e6)

    def _rows_per_block(self) -> int:
        """Rows per block of features: about ``FEATURE_ELEMENTS`` elements."""
        return max(64, FEATURE_ELEMENTS // self.coef.shape[-1])

    def _rows_per_pass_block(self) -> int:
        """Rows per block of :meth:`posterior_sums`: about ``PASS_ELEMENTS`` elements of the block's features and
        its two (K, B) tables."""
        return max(64, PASS_ELEMENTS // (self.coef.shape[-1] + 2 * self.coef.shape[0]))

    def _log_density(self, stats: torch.Tensor, out: torch.Tensor) -> None:
        if out.dtype == self.c.dtype:
            torch.addmm(self.const, self.coef, stats, out=out)
        else:  # float32 data: the float64 block is rounded while still in cache
            out.copy_(torch.addmm(self.const, self.coef, stats))

    def table(self, ws: Optional[Workspace] = None) -> Optional[torch.Tensor]:
        """The (K, N) table of log-densities (differentiable where the coefficients carry a graph); without a
        graph its blocks run side by side on ``ws``'s threads (:meth:`ppl_em.fast.Workspace.map`)."""
        grad = torch.is_grad_enabled() and (self.coef.requires_grad or self.const.requires_grad)
        step = block_rows(self.shape[1], self._rows_per_block())
        count = -(-self.shape[1] // step)
        if grad:  # a gradient M-step differentiates through the blocks (out= cannot)
            extremes: List[torch.Tensor] = []
            parts = [torch.addmm(self.const, self.coef, self._block(b * step, (b + 1) * step, extremes))
                     for b in range(count)]
            return None if self._cancels([extremes]) else torch.cat(parts, 1).to(self.dtype)
        out = new_table(ws, self.shape, self.dtype, self.c.device)

        def one(b: int) -> List[torch.Tensor]:
            extremes: List[torch.Tensor] = []
            self._log_density(self._block(b * step, (b + 1) * step, extremes, ws), out[:, b * step:(b + 1) * step])
            return extremes

        blocks = map_blocks(ws, one, count, out.device)
        return None if self._cancels(blocks) else out

    def posterior_sums(self, others: List[torch.Tensor], log_density: Optional[torch.Tensor], total: torch.Tensor,
                       ws: Optional[Workspace] = None, best: Optional[torch.Tensor] = None):
        """One pass over the rows, block by block: the log-densities into ``log_density`` (K, N) (None: not kept,
        a (K, N) table written and read again less: measured 7% of B1's pass); their sum
        with the ``others`` ((K, N) or (1, N) tables, or (K, 1) and (1, 1) columns that broadcast over the
        rows) into ``total`` (K, N), normalised along K in place into Q_z^(i) (:func:`ppl_em.fast.normalise_exp`);
        and the block's weighted sums N_z = sum_i Q_z^(i), [M_z, S_z] = sum_i Q_z^(i) T(x^(i) - c). With
        ``best`` (1, N) (hard EM), Q is instead the one-hot of each row's mode (:func:`ppl_em.fast.normalise_mode`)
        and ``best`` receives max_z of the summed table.

        Tables of a lower precision (float32 data) are written from a float64 block: the block's sums,
        normalisation and GEMM run in c's dtype, and only the tables are rounded (no flush of tiny weights,
        which float32's normalisation needs, and no conversion for the GEMM). The blocks run side by side on
        ``ws``'s threads (:meth:`ppl_em.fast.Workspace.map`); their sums are added in block order.

        Returns (log p(x^(i)) (1, N), N (K,), the packed sums (K, q + d), in c's dtype); or None, with the
        tables part-written, where the form could cancel away digits (see the class).
        """
        step = block_rows(self.shape[1], self._rows_per_pass_block())
        wide = self.c.dtype
        lse = torch.empty((1, self.shape[1]), dtype=total.dtype, device=total.device)

        def one(b: int):
            cols = slice(b * step, (b + 1) * step)
            extremes: List[torch.Tensor] = []
            stats = self._block(cols.start, cols.stop, extremes, ws)
            q = total[:, cols]
            parts = [t[:, cols] if t.shape[-1] != 1 else t for t in others]
            if total.dtype == wide and log_density is None:  # Q is made in place in ``total``
                w = q
                self._log_density(stats, w)
            elif total.dtype == wide:
                w, block = q, log_density[:, cols]
                self._log_density(stats, block)
                torch.add(block, parts[0], out=w) if parts else w.copy_(block)
                parts = parts[1:]
            else:  # the block's Q in c's dtype, in the thread's scratch tensor (as the features)
                w = scratch(ws, "posterior", q.shape, wide, total.device)
                torch.addmm(self.const, self.coef, stats, out=w)
                if log_density is not None:
                    log_density[:, cols].copy_(w)
            for t in parts:
                w.add_(t)
            if best is None:
                lse[:, cols] = normalise_exp(w, 0, in_place=True)[1]
            else:
                exps = scratch(ws, "exponentials", w.shape, w.dtype, w.device)
                _, lse[:, cols], best[:, cols] = normalise_mode(w, 0, in_place=True, scratch=exps)
            if w is not q:
                q.copy_(w)
            return w.sum(-1), torch.mm(w, stats.T), extremes

        blocks = map_blocks(ws, one, -(-self.shape[1] // step), total.device)
        n, sums = blocks[0][0], blocks[0][1]
        for part_n, part, _ in blocks[1:]:
            n.add_(part_n)
            sums.add_(part)
        if self._cancels([b[2] for b in blocks]):
            return None
        return lse, n, sums

    def _views(self, out: torch.Tensor):
        """What :meth:`_features` writes into ``out`` through (made once per scratch tensor)."""
        return product_views(out, self.rows.shape[-1])

    def _features(self, rows: torch.Tensor, out: torch.Tensor, views) -> torch.Tensor:
        return sufficient_stats(rows, self.c, out, views)

    def moments(self, n: torch.Tensor, sums: torch.Tensor):
        """(N (K,), S (K, d), M (K, d, d)) about c from :meth:`posterior_sums`'s N and packed sums."""
        d = self.rows.shape[-1]
        return n, sums[:, -d:], _unpack_symmetric(sums[:, :-d], d)


class DiagonalFeatures(GaussianFeatures):
    """:class:`GaussianFeatures` of ``Normal(mu_z, sigma_z).to_event(1)``: the features are [(x - c)^2, x - c]
    (2d, B) and the coefficients [-(1/2) / sigma_z^2, (mu_z - c) / sigma_z^2] (see :func:`diag_normal_log_prob`);
    :meth:`moments` gives the elementwise sums N (K,), S (K, d), M = sum_i w (x - c)^2 (K, d)."""

    def __init__(self, x: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, dtype, layout):
        d = x.shape[-1]
        self.rows = x.reshape(-1, d)
        self.c = c = centre(self.rows)
        prec = scale.to(c.dtype).pow(-2)  # (K, d)
        mc = loc.to(c.dtype) - c
        log_norm = scale.to(c.dtype).log().sum(-1, keepdim=True) + 0.5 * d * math.log(2 * math.pi)
        self.p_norm = None  # no bound on the cancellation: the diagonal form has always been taken as it is
        self.coef = torch.cat([-0.5 * prec, mc * prec], -1)  # (K, 2d)
        self.const = -0.5 * (mc * mc * prec).sum(-1, keepdim=True) - log_norm  # (K, 1)
        self.dtype, self.layout = dtype, layout
        self.shape = (self.coef.shape[0], self.rows.shape[0])

    def _views(self, out: torch.Tensor):
        d = self.rows.shape[-1]
        return out[d:], out[:d]

    def _features(self, rows: torch.Tensor, out: torch.Tensor, views) -> torch.Tensor:
        centred, squares = views
        torch.sub(rows.T, self.c.reshape(-1, 1), out=centred)
        torch.mul(centred, centred, out=squares)
        return out

    def moments(self, n: torch.Tensor, sums: torch.Tensor):
        d = self.rows.shape[-1]
        return n, sums[:, d:], sums[:, :d]


def diag_features(base, value: torch.Tensor) -> Optional[DiagonalFeatures]:
    """``Normal(loc, scale).to_event(1).log_prob(value)`` (``base`` the Normal) as a :class:`DiagonalFeatures`,
    not yet computed, where :func:`diag_normal_log_prob` computes it by its GEMM and the table has more than
    ``WHITEN_PAIRS`` pairs, with no gradient asked for; None elsewhere."""
    features = _diag_features(base, value, above=WHITEN_PAIRS)
    if features is None or torch.is_grad_enabled() and (features.coef.requires_grad or features.const.requires_grad):
        return None
    return features


def _diag_features(base, value: torch.Tensor, above: int = -1) -> Optional[DiagonalFeatures]:
    """The :class:`DiagonalFeatures` of ``Normal(loc, scale).to_event(1).log_prob(value)``; None where
    parameters and data vary along a common dimension, or where the table has no more than ``above`` pairs."""
    dtype = torch.promote_types(base.loc.dtype, value.dtype)
    loc, scale, x = compact(base.loc), compact(base.scale), compact(value)
    d = x.shape[-1]
    params = broadcast_shape(loc.shape[:-1], scale.shape[:-1])
    if loc.shape[-1] not in (1, d) or scale.shape[-1] not in (1, d) or overlap(params, x.shape[:-1]) \
            or math.prod(params) * (x.numel() // d) <= above:
        return None
    layout = (params, x.shape[:-1], broadcast_shape(base.batch_shape[:-1], value.shape[:-1]))
    return DiagonalFeatures(x, loc.expand(params + (d,)).reshape(-1, d), scale.expand(params + (d,)).reshape(-1, d),
                            dtype, layout)
