"""The exact E-step of a hidden Markov chain, a ``DiscreteHMM`` site, without a Python loop over time.

A site ``x ~ DiscreteHMM(initial_logits, transition_logits, observation_dist)`` (Pyro's
convention) holds a whole chain of hidden states w_{-1}, w_0, ..., w_{T-1} with K values each:

    p(x) = sum_w p(w_{-1}) prod_{t=0}^{T-1} A_t[w_{t-1}, w_t] p(x_t | w_t)

(w_{-1} is the state *before* the first observation: the first transition comes before x_0).
The site's factor is given by three tables of log-potentials, kept together as :class:`ChainTerms`:

    initial     (..., K)           log p(w_{-1} = j)
    transition  (..., T|1, K, K)   log A_t[i, j] = log p(w_t = j | w_{t-1} = i)
    emission    (..., T, K)        log p(x_t | w_t = j)

log p(x) is a log-sum-exp of sums of these entries, so the engine's probe trick applies to the
tables themselves: d log p(x) / d transition[t, i, j] = p(w_{t-1} = i, w_t = j | x) (Baum-Welch's
xi), d log p(x) / d emission[t, j] = p(w_t = j | x) (gamma) and d log p(x) / d initial[j] =
p(w_{-1} = j | x). A homogeneous (K, K) transition table gets sum_t xi_t, the expected transition
counts. Replacing sum by max gives, as everywhere in the engine, the 0/1 indicators of the most
probable path: the Viterbi path.

How log p(x) is computed. The forward recursion alpha_t = (alpha_{t-1} A_t) * b_t, with
b_t[j] = p(x_t | w_t = j), is sequential in t; a Python loop over T = 1e5 steps costs seconds.
On the CPU the recursions run compiled (:mod:`ppl_em.fast.recursions`, numba): K^2 multiply-adds
per step, rescaled at every step, and max-sum with back-pointers. Elsewhere (a GPU, or without
numba) the chain is cut into about sqrt(T) blocks of about sqrt(T) steps: one pass over the steps of a
block, for all blocks at once, gives each block's transfer matrix P_c = M_{cL} ... M_{cL+L-1}
(M_t = A_t diag(b_t)); one pass over the blocks chains them. So the recursions take about
5 sqrt(T) vectorised steps (O(T K^3) work), and for a homogeneous A each step is one GEMM over
all blocks. Sums run in probability space, float64, rescaled at every step (Rabiner's scaling);
:class:`_ChainLogProb`'s backward runs the backward and forward recursions the same way and
returns the tables above. If a rescaled quantity underflows to 0 (a 700-nat outlier that only
transitions of probability 0 could explain), the same quantities are computed in log space
instead (:func:`_log_space`, slower, memory O(T K^3)); max-sum (Viterbi) always runs there.

References: Rabiner, "A tutorial on hidden Markov models", Proc. IEEE 1989 (scaling);
Eisner, "Inside-Outside and Forward-Backward Algorithms Are Just Backprop", 2016;
Sarkka & Garcia-Fernandez, "Temporal Parallelization of Bayesian Smoothers", 2021 (blocks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
import pyro.distributions as dist
from pyro.ops.special import safe_log
from .fast import recursions

__all__ = ["ChainTerms", "is_chain", "chain_terms", "log_evidence", "expected_log_potential"]


@dataclass
class ChainTerms:
    """The three tables of a chain site, as log-potentials or as their posterior weights.

    Attributes
    ----------
    initial : torch.Tensor
        (..., K): log p(w_{-1} = j), or Q(w_{-1} = j).
    transition : torch.Tensor
        (..., T, K, K) or (K, K) for a homogeneous chain: log A_t[i, j], or
        Q(w_{t-1} = i, w_t = j) (summed over t for a homogeneous chain: expected counts).
    emission : torch.Tensor
        (..., T, K): log p(x_t | w_t = j), or Q(w_t = j).
    weight : torch.Tensor, optional
        For posterior weights only: Q over the configurations of the enumerated latents the chain
        depends on, in the layout of the site's log-probability, like any other site's weights.
    """

    initial: torch.Tensor
    transition: torch.Tensor
    emission: torch.Tensor
    weight: Optional[torch.Tensor] = None

    def tensors(self) -> List[torch.Tensor]:
        return [self.initial, self.transition, self.emission]

    def sum(self) -> torch.Tensor:
        """Total posterior weight of the site, as ``Tensor.sum`` of an ordinary site's weights."""
        return self.weight.sum()


def is_chain(fn) -> bool:
    """Whether a site's distribution is a hidden Markov chain this module handles."""
    return type(fn) is dist.DiscreteHMM


def emission_value(fn, value: torch.Tensor) -> torch.Tensor:
    """x_t with a state dimension, (..., T, 1, *event), against the observation batch (..., T|1, K)."""
    return value.unsqueeze(-1 - fn.observation_dist.event_dim)


def chain_terms(fn, value: torch.Tensor, log_prob: Callable) -> ChainTerms:
    """A ``DiscreteHMM``'s log-potentials at observations ``value`` (..., T, *event).

    ``log_prob(distribution, value)`` computes the emission table (the engine passes its fast path).
    Pyro broadcasts a size-1 state dimension (an observation distribution that does not depend on the
    state, or a one-state initial table): so do the tables here, to the K of the transition matrix.
    """
    k = fn.transition_logits.shape[-1]
    emission = log_prob(fn.observation_dist, emission_value(fn, value))
    if emission.shape[-1] == 1 and k > 1:
        emission = emission.expand(emission.shape[:-1] + (k,))
    initial = fn.initial_logits
    if initial.shape[-1] == 1 and k > 1:
        initial = initial.expand(initial.shape[:-1] + (k,))
    return ChainTerms(initial, fn.transition_logits, emission)


def expected_log_potential(terms: ChainTerms, weights: ChainTerms) -> torch.Tensor:
    """E_Q[log p(x, w)] over the chain's states: each table of weights times its log-potentials, summed.

    0 log 0 = 0: an entry of probability 0 (a one-hot initial state, say) that Q never takes adds nothing.
    """
    total = torch.zeros((), dtype=terms.emission.dtype, device=terms.emission.device)
    for w, t in zip(weights.tensors(), terms.tensors()):
        wt = w * t
        total = total + torch.where(w == 0, torch.zeros_like(wt), wt).sum()
    return total


def log_evidence(initial: torch.Tensor, transition: torch.Tensor, emission: torch.Tensor,
                 semiring: str = "sum") -> torch.Tensor:
    """log p(x) of a chain (``semiring="sum"``) or max_w log p(x, w) (``"max"``), batch shape.

    Parameters
    ----------
    initial : torch.Tensor
        (..., K) log p(w_{-1}).
    transition : torch.Tensor
        (..., T, K, K), (..., 1, K, K) or (K, K): log A_t[i, j], i = w_{t-1}, j = w_t.
    emission : torch.Tensor
        (..., T, K) log p(x_t | w_t).

    Returns
    -------
    torch.Tensor
        The batch shape (all three broadcast), in the emission's dtype. Its gradients with
        respect to the three tables are the posterior tables of :class:`ChainTerms` (times the
        incoming gradient); for ``"max"``, the 0/1 indicators of the most probable path.

    Examples
    --------
    >>> import torch
    >>> initial = torch.tensor([0.5, 0.5]).log()
    >>> transition = torch.tensor([[0.9, 0.1], [0.2, 0.8]]).log()
    >>> emission = torch.tensor([[0.0, -2.0], [-1.0, 0.0], [-3.0, 0.0]], requires_grad=True)  # log p(x_t | w_t)
    >>> log_p = log_evidence(initial, transition, emission)
    >>> gamma, = torch.autograd.grad(log_p, emission)  # p(w_t = j | x)
    >>> gamma.shape, bool(torch.allclose(gamma.sum(-1), torch.ones(3)))
    (torch.Size([3, 2]), True)
    """
    _check_tables(initial, transition, emission)
    if semiring == "sum":
        return _ChainLogProb.apply(initial, transition, emission)
    if semiring == "max":
        return _ChainViterbi.apply(initial, transition, emission)
    raise ValueError(f"semiring must be 'sum' or 'max', got {semiring!r}.")


def _check_tables(initial, transition, emission) -> None:
    k = emission.shape[-1]
    steps = transition.shape[-3] if transition.dim() > 2 else 1
    if (emission.dim() < 2 or emission.shape[-2] < 1 or initial.shape[-1:] != (k,) or transition.dim() < 2
            or transition.shape[-2:] != (k, k) or steps not in (1, emission.shape[-2])):
        raise ValueError(
            f"Expected chain tables initial (..., K), transition (..., T, K, K) or (K, K) and emission (..., T, K) "
            f"with one K and one T; got initial {tuple(initial.shape)}, transition {tuple(transition.shape)}, "
            f"emission {tuple(emission.shape)}. Check the DiscreteHMM's initial_logits, transition_logits and "
            "observation_dist batch shapes.")


# -- layout: batch flattened to N, time cut into blocks ----------------------------------------------
@dataclass
class _Layout:
    """Shapes of one chain computation. ``batch`` = broadcast of the transition and emission batch
    shapes (flattened to N); ``full`` adds the dimensions only ``initial`` has (an enumerated latent
    that picks the first state, say): by linearity they never multiply the work over T."""

    batch: torch.Size
    full: torch.Size
    T: int
    K: int
    L: int  # steps per block
    nb: int  # number of blocks; steps nb * L .. T - 1 form the tail
    homogeneous: bool  # one transition matrix for every t
    shared: bool  # one transition table for every chain of the batch

    @property
    def N(self) -> int:
        return self.batch.numel()

    @property
    def main(self) -> int:
        return self.nb * self.L


def _layout(initial, transition, emission) -> _Layout:
    T, K = emission.shape[-2:]
    t_batch = transition.shape[:-3] if transition.dim() > 2 else torch.Size()
    batch = torch.broadcast_shapes(t_batch, emission.shape[:-2])
    full = torch.broadcast_shapes(initial.shape[:-1], batch)
    L = _block_length(T)
    return _Layout(batch, full, T, K, L, T // L, transition.dim() == 2 or transition.shape[-3] == 1,
                   len(t_batch) == 0 or t_batch.numel() == 1)


def _block_length(T: int) -> int:
    """Steps per block, about sqrt(T): the passes run 3 loops over the L steps of a block, 2 over the
    T // L blocks and 2 over the T % L remaining steps."""
    root = max(1, math.isqrt(T))
    return min(range(max(1, root // 2), 2 * root + 1), key=lambda L: 3 * L + 2 * (T // L) + 2 * (T % L))


# Chains of at least this many steps in all (N T) run the compiled recursions (ppl_em.fast.recursions) on
# the CPU; shorter ones the blocked torch recursions, which take milliseconds there, so that a process that
# only fits short chains never pays for importing numba and loading its kernels (most of a second).
COMPILED_STEPS = 4096


def _compiled(lay: _Layout, emission: torch.Tensor) -> bool:
    return lay.N * lay.T >= COMPILED_STEPS and recursions.available(emission)


class _Chain:
    """Scaled probability-space tables of one chain computation, laid out by block.

    ``b_full`` (N, T, K) are the emission probabilities b_t[j] = exp(emission - max_j emission);
    ``b`` the same for the nb * L steps of the blocks as (L, N, nb, K), step l of every block
    contiguous; ``b_main`` and ``b_tail`` lists of the per-step views (blocks, then the r remaining
    steps). ``A_full`` the transition probabilities, (K, K), (N, 1, K, K) or (1|N, T, K, K);
    ``A_main`` and ``A_tail`` per step likewise. ``log_shift`` (N,) is what was taken out of the
    tables to scale them. Not ``blocked`` (the compiled recursions): only ``b_full`` and ``A``
    (1|N, 1|T, K, K), flushed (:func:`ppl_em.fast.recursions.flush`).
    """

    def __init__(self, transition: torch.Tensor, emission: torch.Tensor, lay: _Layout, blocked: bool = True) -> None:
        self.lay, self.blocked = lay, blocked
        N, T, K, L, nb, main = lay.N, lay.T, lay.K, lay.L, lay.nb, lay.main
        e = emission.detach().to(torch.float64).expand(lay.batch + (T, K)).reshape(N, T, K)
        m_e = _finite_max(e, (-1,))  # (N, T, 1)
        b = (e - m_e).exp()  # (N, T, K)
        tr = transition.detach().to(torch.float64)
        tr = tr.reshape((1,) * (3 - tr.dim()) + tr.shape) if tr.dim() < 3 else tr
        Tt = tr.shape[-3]
        tr = tr.reshape(1, Tt, K, K) if lay.shared else tr.expand(lay.batch + (Tt, K, K)).reshape(N, Tt, K, K)
        m_a = _finite_max(tr, (-1, -2))  # (1|N, Tt, 1, 1)
        A = (tr - m_a).exp()
        self.log_shift = m_e.sum((-1, -2)) + m_a.sum((-1, -2, -3)) * (T if Tt == 1 else 1)  # (N,) or (1,)
        if not blocked:  # the compiled recursions read b_full and A, flushed once for both passes
            self.b_full, self.A = recursions.flush(b), recursions.flush(A)  # (N, T, K), (1|N, 1|T, K, K)
            return
        self.b_full = b
        self.A_full = A[0, 0] if lay.homogeneous and lay.shared else A  # (K, K), (N, 1, K, K) or (1|N, T, K, K)
        self.b = b[:, :main].reshape(N, nb, L, K).permute(2, 0, 1, 3).contiguous()  # (L, N, nb, K)
        # Per-step views as Python lists: the loops below index them thousands of times.
        self.b_main = list(self.b.unbind(0))  # L x (N, nb, K)
        self.b_tail = list(b[:, main:].unbind(1))  # r x (N, K)
        if lay.homogeneous:
            self.A_main = [self.A_full] * L  # broadcasts over the blocks
            self.A_tail = [self.A_full if lay.shared else A[:, 0]] * (T - main)
        else:
            self.A_main = list(A[:, :main].reshape(A.shape[0], nb, L, K, K).unbind(2))  # L x (1|N, nb, K, K)
            self.A_tail = list(A[:, main:].unbind(1))  # r x (1|N, K, K)

    # -- the passes, compiled or blocked ------------------------------------------------------------
    def messages(self):
        """The backward pass: beta_{-1} normalised (N, K), the log of the chain's total scale (N,), and
        what the posterior tables need of it later (compiled: every beta_t; blocked: the block products
        and the messages at the block ends, for :meth:`alphas` and :meth:`betas`)."""
        if not self.blocked:
            betas, log_scale = recursions.backward(self.b_full, self.A)
            return betas[:, 0], log_scale, betas
        P, block_log = self.block_products()
        tail, ends, log_scale = self.backward_messages(P, block_log)
        return ends[0], log_scale, (P, tail, ends)

    # -- the blocked passes: each step is a product with A_t, a product with b_t, a sum and a division ----
    def block_products(self) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """P_c = M_{cL} ... M_{cL+L-1} of every block c, scaled: a list of nb (N, K, K), and the log scale (N, nb).

        Rows are normalised separately at every step, so that a start state the block's
        observations make very unlikely keeps its row instead of underflowing next to the others;
        their scales are put back at the end, relative to the largest.
        """
        lay = self.lay
        P = (self.A_main[0] * self.b_main[0].unsqueeze(-2)).expand(lay.N, lay.nb, lay.K, lay.K).contiguous()
        Q = torch.empty_like(P)
        sums = P.new_empty((lay.L,) + P.shape[:-1] + (1,))
        for l in range(lay.L):
            if l:
                torch.matmul(P, self.A_main[l], out=Q)
                Q.mul_(self.b_main[l].unsqueeze(-2))
                P, Q = Q, P
            torch.sum(P, -1, keepdim=True, out=sums[l])
            P.div_(sums[l].clamp_min_(_TINY))  # a row of zeros (a start state the data rule out) stays zero
        row_log = sums.log_().sum(0)  # (N, nb, K, 1)
        row_max = row_log.amax(-2, keepdim=True)
        P.mul_((row_log - row_max).exp_())
        return list(P.unbind(1)), row_max.reshape(lay.N, lay.nb)

    def backward_messages(self, P: List[torch.Tensor], block_log: torch.Tensor):
        """beta_t up to scale at the tail steps (r, N, K) and at the block ends (nb + 1, N, K) (index c:
        beta at step cL - 1; index 0 is beta_{-1}), and the log of the chain's total scale (N,)."""
        lay = self.lay
        r = lay.T - lay.main
        ends = self.b_full.new_empty(lay.nb + r + 1, lay.N, lay.K)  # block ends, then the tail steps
        vs, sums = list(ends.unbind(0)), self.b_full.new_empty(lay.nb + r, lay.N, 1)
        vs[-1].fill_(1.0)
        for s in range(r - 1, -1, -1):  # the tail: beta_{t-1} = A_t (b_t * beta_t)
            _matvec(self.A_tail[s], self.b_tail[s] * vs[lay.nb + s + 1], out=vs[lay.nb + s])
            vs[lay.nb + s].div_(torch.sum(vs[lay.nb + s], -1, keepdim=True, out=sums[lay.nb + s]))
        for c in range(lay.nb - 1, -1, -1):  # the blocks: beta_{cL-1} = P_c beta_{cL+L-1}
            _matvec(P[c], vs[c + 1], out=vs[c])
            vs[c].div_(torch.sum(vs[c], -1, keepdim=True, out=sums[c]))
        log_scale = sums.log().sum(0).squeeze(-1) + block_log.sum(-1)
        return ends[lay.nb + 1:], ends[:lay.nb + 1], log_scale

    def betas(self, tail, ends) -> torch.Tensor:
        """beta_t for every t, each normalised: (N, T, K)."""
        lay = self.lay
        buf = self.b.new_empty(self.b.shape)  # (L, N, nb, K)
        vs, tmp = list(buf.unbind(0)), buf[0].clone()
        vs[-1].copy_(ends[1:].transpose(0, 1))  # beta at the last step of each block
        for l in range(lay.L - 1, 0, -1):
            _matvec(self.A_main[l], torch.mul(self.b_main[l], vs[l], out=tmp), out=vs[l - 1])
            vs[l - 1].div_(vs[l - 1].sum(-1, keepdim=True))
        main = buf.permute(1, 2, 0, 3).reshape(lay.N, lay.main, lay.K)
        return torch.cat([main, tail.transpose(0, 1)], 1)

    def alphas(self, a: torch.Tensor, P: List[torch.Tensor]) -> torch.Tensor:
        """alpha_t for every t from alpha_{-1} = ``a`` (N, K), each normalised: (N, T, K)."""
        lay = self.lay
        starts = a.new_empty(lay.nb + 1, lay.N, lay.K)  # alpha at step cL - 1
        vs = list(starts.unbind(0))
        vs[0].copy_(a)
        for c in range(lay.nb):  # alpha_{cL+L-1} = alpha_{cL-1} P_c
            _vecmat(vs[c], P[c], out=vs[c + 1])
            vs[c + 1].div_(vs[c + 1].sum(-1, keepdim=True))
        buf = self.b.new_empty(self.b.shape)  # (L, N, nb, K)
        V = starts[:-1].transpose(0, 1)
        for l, out in enumerate(buf.unbind(0)):  # alpha_t = (alpha_{t-1} A_t) * b_t
            V = _vecmat(V, self.A_main[l], out=out).mul_(self.b_main[l])
            V.div_(V.sum(-1, keepdim=True))
        tail = a.new_empty(lay.T - lay.main + 1, lay.N, lay.K)
        ts = list(tail.unbind(0))
        ts[0].copy_(vs[lay.nb])
        for s in range(lay.T - lay.main):
            _vecmat(ts[s], self.A_tail[s], out=ts[s + 1]).mul_(self.b_tail[s])
            ts[s + 1].div_(ts[s + 1].sum(-1, keepdim=True))
        main = buf.permute(1, 2, 0, 3).reshape(lay.N, lay.main, lay.K)
        return torch.cat([main, tail[1:].transpose(0, 1)], 1)

    def pairwise(self, prev: torch.Tensor, beta: torch.Tensor, G: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Q(w_{t-1}, w_t) from alpha_{t-1} (``prev``) and beta_t, scaled so that each t sums to G (N,).

        Returns the table (summed over t, and over the batch if shared, for a homogeneous chain)
        and Z_t = sum_ij alpha_{t-1}[i] A_t[i, j] b_t[j] beta_t[j] (N, T), the normaliser.
        """
        u = self.b_full * beta  # (N, T, K)
        A = self.A_full
        pred = _vecmat(prev, A) if self.lay.homogeneous and self.lay.shared else (prev.unsqueeze(-2) @ A).squeeze(-2)
        Z = (pred * u).sum(-1)  # (N, T)
        coef = G.unsqueeze(-1) / Z
        if not self.lay.homogeneous:
            return coef[..., None, None] * prev.unsqueeze(-1) * A * u.unsqueeze(-2), Z  # (N, T, K, K)
        w = prev * coef.unsqueeze(-1)
        if self.lay.shared:
            return A * torch.einsum("nti,ntj->ij", w, u), Z  # (K, K)
        return A * torch.einsum("nti,ntj->nij", w, u).unsqueeze(1), Z  # (N, 1, K, K)


_TINY = torch.finfo(torch.float64).tiny


def _finite_max(t: torch.Tensor, dims) -> torch.Tensor:
    m = t.amax(dims, keepdim=True)
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def _vecmat(v: torch.Tensor, A: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """v A for row vectors v (..., K) and A (K, K) (one GEMM) or a batch (..., K, K)."""
    if A.dim() == 2:
        return torch.matmul(v, A, out=out)
    if out is None:
        return (v.unsqueeze(-2) @ A).squeeze(-2)
    torch.matmul(v.unsqueeze(-2), A, out=out.unsqueeze(-2))
    return out


def _matvec(A: torch.Tensor, v: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A v for column vectors v (..., K)."""
    if A.dim() == 2:
        return torch.matmul(v, A.t(), out=out)
    if out is None:
        return (A @ v.unsqueeze(-1)).squeeze(-1)
    torch.matmul(A, v.unsqueeze(-1), out=out.unsqueeze(-1))
    return out


# -- log p(x) and its gradient -------------------------------------------------------------------
class _ChainLogProb(torch.autograd.Function):
    """log p(x) by scaled backward recursions; the backward pass returns the posterior tables.

    By linearity of the recursions in the first state's distribution, batch dimensions that only
    ``initial`` has (``_Layout.full``) cost nothing over T: their gradients are folded into one
    alpha_{-1} per chain before the forward recursion.
    """

    @staticmethod
    def forward(ctx, initial, transition, emission):
        lay = _layout(initial, transition, emission)
        chain = _Chain(transition, emission, lay, blocked=not _compiled(lay, emission))
        beta0, log_scale, kept = chain.messages()
        log_beta0 = beta0.log().reshape(lay.batch + (lay.K,))  # beta_{-1}
        init = initial.detach().to(torch.float64)
        log_p = torch.logsumexp(init + log_beta0, -1) + (log_scale + chain.log_shift).reshape(lay.batch)
        ctx.fallback = not bool(torch.isfinite(log_p).all())
        if ctx.fallback:  # a scaled quantity underflowed: recompute in log space
            with torch.no_grad():
                log_p = _log_space(initial, transition, emission, _logsumexp).double()
        ctx.save_for_backward(initial, transition, emission)
        ctx.state = (lay, chain, kept, log_beta0)
        return log_p.to(emission.dtype).expand(lay.full).clone()

    @staticmethod
    def backward(ctx, g):
        initial, transition, emission = ctx.saved_tensors
        if not ctx.fallback:
            grads = _tables(ctx.state, initial, g.double())
            if grads is not None:
                return tuple(_to_input(gr, x) for gr, x in zip(grads, (initial, transition, emission)))
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (initial, transition, emission)]
            out = _log_space(*leaves, _logsumexp)
            return torch.autograd.grad(out, leaves, g.to(out.dtype))


def _tables(state, initial, g: torch.Tensor):
    """The gradient tables for incoming gradient g (shape ``full``), or None if a normaliser underflowed."""
    if bool((g < 0).any()):  # the recursions assume nonnegative weights: split g = g+ - g- (linear)
        pos, neg = _tables(state, initial, g.clamp_min(0)), _tables(state, initial, (-g).clamp_min(0))
        return None if pos is None or neg is None else tuple(p - n for p, n in zip(pos, neg))
    lay, chain, kept, log_beta0 = state
    init = initial.detach().to(torch.float64)
    # p(w_{-1} = j | x) per batch element, and alpha_{-1} = sum over initial-only dims of g p0 / p.
    lp_scaled = torch.logsumexp(init + log_beta0, -1, keepdim=True)  # (full, 1)
    q0 = (init + log_beta0 - lp_scaled).exp() * g.unsqueeze(-1)  # (full, K)
    a = ((init - lp_scaled).exp() * g.unsqueeze(-1)).sum_to_size(lay.batch + (lay.K,)).reshape(lay.N, lay.K)
    G = g.sum_to_size(lay.batch).reshape(lay.N)
    live = G.unsqueeze(-1) > 0  # a chain of weight 0 (masked out) gets tables of 0, whatever its messages
    a_hat = torch.where(live, a / a.sum(-1, keepdim=True), torch.full_like(a, 1.0 / lay.K))
    if chain.blocked:
        beta = chain.betas(kept[1], kept[2])  # (N, T, K)
        alpha = chain.alphas(a_hat, kept[0])  # (N, T, K)
        gamma = alpha * beta
        norm = gamma.sum(-1, keepdim=True)
        prev = torch.cat([a_hat.unsqueeze(1), alpha[:, :-1]], 1)  # alpha_{t-1}
        xi, Z = chain.pairwise(prev, beta, G)
        if not bool(((Z > 0) & (norm.squeeze(-1) > 0) | ~live).all()):
            return None  # a scaled message underflowed
        gamma = gamma * (G[:, None, None] / norm.clamp_min(_TINY))
    else:  # compiled: the forward recursion and both tables in one pass
        one = lay.homogeneous and lay.shared  # one (K, K) table of expected counts
        gamma, xi, fine = recursions.posterior(a_hat, chain.b_full, chain.A, kept, G, not one, not lay.homogeneous)
        if not bool(fine.all()):
            return None  # a scaled message underflowed
        xi = xi[0, 0] if one else xi
    if xi.dim() == 4:  # one table per chain of the batch
        xi = xi.reshape(lay.batch + xi.shape[1:])
    return q0, xi, gamma.reshape(lay.batch + (lay.T, lay.K))


def _to_input(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A gradient computed over the broadcast shape, summed to the input's shape and dtype."""
    if grad.dim() > x.dim():
        grad = grad.sum(tuple(range(grad.dim() - x.dim())))
    grad = grad.reshape((1,) * (x.dim() - grad.dim()) + grad.shape)
    return grad.sum_to_size(x.shape).to(x.dtype)


# -- max-sum (Viterbi): block products, then each block's path from its start, no autograd graph ------
class _ChainViterbi(torch.autograd.Function):
    """max over paths of log p(x, w) of a chain, and as its gradient the 0/1 indicators of the best path.

    delta_t[j] = max_i delta_{t-1}[i] + log M_t[i, j] (log M_t = log A_t + emission_t), blocked as the sums
    are. One pass over the L steps of every block at once gives each block's max-plus product D_c (the best
    score from every start state to every end state, K^3 terms per step); one pass over the blocks (and the
    tail) chains them, which fixes the state before each block and at its end. A second pass over the L
    steps reruns the recursion of every block from its one start state (K^2 terms per step: row s_c of the
    first pass's products, the same sums in the same order), keeping its back-pointers, and the path is read
    back from each block's end. No autograd graph is kept: the backward returns the path's indicators
    (initial state, transition counts, states) times the incoming gradient, what autograd through the max
    would give, for a fraction of its time and memory.
    """

    @staticmethod
    def forward(ctx, initial, transition, emission):
        lay = _layout(initial, transition, emission)
        e, tr, init = _viterbi_tables(initial, transition, emission, lay)
        ctx.save_for_backward(initial, transition, emission)
        if _compiled(lay, emission):  # compiled: one backward max-sum pass per chain, paths in backward
            chain_of = _chain_of(lay, init.shape[0], init.device)
            score, first, ahead = recursions.viterbi(init, e, tr, chain_of)
            ctx.state = (None, lay, (ahead, first, chain_of))
            return score.reshape(lay.full).to(emission.dtype)
        steps = _BlockSteps(e, tr, lay)
        score, chained = _chain_max(init, e, tr, _max_plus_blocks(steps, lay), lay)
        ctx.state = (steps, lay, chained)
        return score.reshape(lay.full).to(emission.dtype)

    @staticmethod
    def backward(ctx, g):
        """The paths are read back here, for the chains whose incoming gradient is not 0 only: under hard
        EM the other values of an enumerated first state (all but the best) get none."""
        initial, transition, emission = ctx.saved_tensors
        steps, lay, chained = ctx.state
        K, F = lay.K, lay.full.numel()
        g = g.to(torch.float64).expand(lay.full).reshape(F)
        live = g.nonzero().squeeze(-1)
        if steps is None:  # the compiled recursion: each live chain's path walked from its first state
            first = chained[1][live]
            states = recursions.walk(chained[0], chained[2][live], first)
        else:
            states, first = _read_paths(live, chained, steps, lay)  # (F', T) states w_0 .. w_{T-1}, (F',) w_{-1}
        g_live, chain_live = g[live], chained[-1][live]
        q0 = _spread(_indicators(first, K, g_live), live, F)  # (F, K)
        gamma = _per_batch(_indicators(states, K, g_live), chain_live, lay.N)  # (N, T, K)
        prev = torch.cat([first[:, None], states[:, :-1]], 1)  # w_{t-1}
        pair = prev * K + states  # (F', T)
        if lay.homogeneous and transition.dim() == 2:
            counts = torch.zeros(len(live), K * K, dtype=torch.float64, device=g.device)
            counts.scatter_add_(1, pair, g_live[:, None].expand_as(pair).contiguous())
            xi = counts.sum(0).reshape(K, K)
        else:
            xi = _per_batch(_indicators(pair, K * K, g_live), chain_live, lay.N).reshape(lay.batch + (lay.T, K, K))
            if transition.shape[-3] == 1:
                xi = xi.sum(-3, keepdim=True)
        return (_to_input(q0.reshape(lay.full + (K,)), initial), _to_input(xi, transition),
                _to_input(gamma.reshape(lay.batch + (lay.T, K)), emission))


def _per_batch(rows: torch.Tensor, chain_of: torch.Tensor, N: int) -> torch.Tensor:
    """Rows of full chains (F', ...) summed into their batch chains, ``chain_of`` (F',): (N, ...). The
    dims that only the first state has are summed out of the emission's and transitions' gradients anyway."""
    if len(chain_of) == N and bool((chain_of == torch.arange(N, device=chain_of.device)).all()):
        return rows
    return rows.new_zeros((N,) + rows.shape[1:]).index_add_(0, chain_of, rows)


def _spread(rows: torch.Tensor, live: torch.Tensor, F: int) -> torch.Tensor:
    """The rows of the chains ``live`` (F', ...) placed among F chains, zeros elsewhere."""
    if len(live) == F:
        return rows
    return rows.new_zeros((F,) + rows.shape[1:]).index_copy_(0, live, rows)


def _indicators(index: torch.Tensor, K: int, g: torch.Tensor) -> torch.Tensor:
    """g[f] at the state ``index`` names, 0 elsewhere: (F, ..., K) float64 from indices (F, ...) and g (F,)."""
    out = torch.zeros(index.shape + (K,), dtype=torch.float64, device=index.device)
    out.scatter_(-1, index.unsqueeze(-1), 1.0)
    return out.mul_(g.reshape((-1,) + (1,) * index.dim()))


def _viterbi_tables(initial, transition, emission, lay: _Layout):
    """Log-space tables in float64: e (N, T, K), transitions (1|N, T|1, K, K), initial (F, K) over the full batch."""
    N, T, K = lay.N, lay.T, lay.K
    e = emission.detach().to(torch.float64).expand(lay.batch + (T, K)).reshape(N, T, K)
    tr = transition.detach().to(torch.float64)
    tr = tr.reshape((1,) * (3 - tr.dim()) + tr.shape) if tr.dim() < 3 else tr
    Tt = tr.shape[-3]
    tr = tr.reshape(1, Tt, K, K) if lay.shared else tr.expand(lay.batch + (Tt, K, K)).reshape(N, Tt, K, K)
    init = initial.detach().to(torch.float64).expand(lay.full + (K,)).reshape(-1, K)
    return e, tr, init


def _log_m(e, tr, t) -> torch.Tensor:
    """log M_t = log A_t[i, j] + emission_t[j], (N|1, K, K)."""
    return tr[:, 0 if tr.shape[1] == 1 else t] + e[:, t, None, :]


class _BlockSteps:
    """The tables of step l of every block, for the max-plus recursion written as
    D_l[i, j] = max_m (D_{l-1}[i, m] + log A_l[m, j]) + emission_l[j] (the emission is the same for every m,
    so it is added after the max, to K^2 numbers instead of K^3).

    Two layouts of the same numbers: for the products' pass, the summed-out state m first, so that the
    max runs over whole contiguous tables (``a_state`` (m, j, 1|N, 1|nb), ``e_state`` (j, N, nb)); for the
    paths' pass, blocks first (``a_block`` (1|N, 1|nb, j, m), ``e_block`` (N, nb, j) per step). Both passes add,
    take the max and add in the same order, so the paths' pass reproduces the products' numbers exactly.
    """

    def __init__(self, e, tr, lay: _Layout) -> None:
        N, K, L, nb, main = lay.N, lay.K, lay.L, lay.nb, lay.main
        self.homogeneous = tr.shape[1] == 1
        e = e[:, :main].reshape(N, nb, L, K)
        self.e_block = e.permute(2, 0, 1, 3).contiguous()  # (L, N, nb, j)
        self.e_state = e.permute(2, 3, 0, 1).contiguous()  # (L, j, N, nb)
        if self.homogeneous:  # tr (1|N, 1, m, j)
            self.a_block = tr[:, 0].transpose(-1, -2).unsqueeze(1)  # (1|N, 1, j, m)
            self.a_state = tr[:, 0].permute(1, 2, 0).unsqueeze(-1).contiguous()  # (m, j, 1|N, 1)
        else:
            blocks = tr[:, :main].reshape(tr.shape[0], nb, L, K, K)  # (1|N, nb, L, m, j)
            self.a_block = blocks.transpose(-1, -2)  # (1|N, nb, L, j, m)
            self.a_state = blocks.permute(2, 3, 4, 0, 1).contiguous()  # (L, m, j, 1|N, nb)

    def state_tables(self, l: int):
        """(a (m, j, 1|N, 1|nb), e (j, N, nb)) of step l."""
        return (self.a_state if self.homogeneous else self.a_state[l]), self.e_state[l]

    def block_tables(self, l: int):
        """(a (1|N, 1|nb, j, m), e (N, nb, j)) of step l."""
        return (self.a_block if self.homogeneous else self.a_block[:, :, l]), self.e_block[l]


def _max_plus_blocks(steps: _BlockSteps, lay: _Layout) -> torch.Tensor:
    """D_c[i, j] = max-plus product of the L steps of every block c, from state i before the block to state
    j at its last step: (N, nb, K, K).

    The running product is kept as (j, N, nb, i), so that a step is one sum table (m, j, N, nb, i) =
    D[m, ..., i] + log A[m, j, ...], a max over its first dimension, m (the state at the step before),
    and the emission added to the (j, N, nb, i) result.
    """
    N, K, L, nb = lay.N, lay.K, lay.L, lay.nb
    a, e0 = steps.state_tables(0)
    D = (a.permute(1, 2, 3, 0) + e0.unsqueeze(-1)).expand(K, N, nb, K).contiguous()  # (j, N, nb, i)
    if L > 1:
        table = D.new_empty((K, K, N, nb, K))
        out = torch.empty_like(D)
        for l in range(1, L):
            a, e_l = steps.state_tables(l)
            torch.add(D.unsqueeze(1), a.unsqueeze(-1), out=table)
            torch.amax(table, 0, out=out).add_(e_l.unsqueeze(-1))
            D, out = out, D
    return D.permute(1, 2, 3, 0)  # (N, nb, i, j)


def _chain_max(init, e, tr, blocks, lay: _Layout):
    """The best score of every full chain (F,), and what reading its path back needs: the best state
    before each block (and tail step) for each state after it, (nb + r, F, K), the best last state (F,),
    and each full chain's batch chain (F,)."""
    F, N, T, main = init.shape[0], lay.N, lay.T, lay.main
    chain_of = _chain_of(lay, F, init.device)
    products = list((blocks if N == 1 else blocks[chain_of]).unbind(1))  # nb x (1|F, K, K)
    products += [_log_m(e, tr, t)[chain_of if tr.shape[0] > 1 or e.shape[0] > 1 else 0] for t in range(main, T)]
    delta = init
    back = torch.empty((len(products),) + init.shape, dtype=torch.long, device=init.device)
    for D, out in zip(products, back.unbind(0)):  # the blocks, then the tail steps
        delta, index = (delta.unsqueeze(-1) + D).max(-2)  # (F, K)
        out.copy_(index)
    score, last = delta.max(-1)
    return score, (back, last, chain_of)


def _chain_of(lay: _Layout, F: int, device) -> torch.Tensor:
    """The batch chain (of N) of each full chain (of F): (F,)."""
    return torch.arange(lay.N, device=device).reshape(lay.batch).expand(lay.full).reshape(F)


def _read_paths(live: torch.Tensor, chained, steps: _BlockSteps, lay: _Layout):
    """The best paths of the full chains ``live`` (F',): (states (F', T) of w_0 .. w_{T-1}, w_{-1} (F',))."""
    back, last, chain_of = chained
    F, T, nb, main = len(live), lay.T, lay.nb, lay.main
    if F != back.shape[1]:
        back = back[:, live]
    before = torch.empty(back.shape[0] + 1, F, dtype=torch.long, device=last.device)  # the state before each
    slots = before.unbind(0)  # block and tail step, then the last state
    current = slots[-1]
    current.copy_(last[live])
    for c in range(back.shape[0] - 1, -1, -1):  # backwards: the tail steps, then the blocks
        torch.gather(back[c], 1, current.unsqueeze(1), out=slots[c].unsqueeze(1))
        current = slots[c]
    states = torch.empty(F, T, dtype=torch.long, device=last.device)
    states[:, main:] = before[nb + 1:].T  # the state at each tail step
    if nb and F:
        starts, ends = before[:nb].T, before[1:nb + 1].T  # (F', nb): before each block, at its last step
        states[:, :main] = _block_paths(steps, lay, chain_of[live], starts, ends).reshape(F, main)
    return states, before[0]  # before[0]: w_{-1}


def _block_paths(steps: _BlockSteps, lay: _Layout, chain_of, starts, ends) -> torch.Tensor:
    """The best path through every block c from the state before it, ``starts`` (F, nb), to the state at
    its last step, ``ends`` (F, nb): the recursion of :func:`_max_plus_blocks` for the one start state,
    with back-pointers. (F, nb, L)."""
    F, K, L, nb = starts.shape[0], lay.K, lay.L, lay.nb
    same = F == lay.N and bool((chain_of == torch.arange(F, device=chain_of.device)).all())  # no gather needed

    def tables(l):  # (a (F|1, nb|1, j, m), e (F, nb, j))
        a, e_l = steps.block_tables(l)
        return (a, e_l) if same else (a if a.shape[0] == 1 else a[chain_of], e_l[chain_of])

    a, e0 = tables(0)
    delta = a.expand(F, nb, K, K).gather(-1, starts[:, :, None, None].expand(F, nb, K, 1)).squeeze(-1) + e0  # (F, nb, j)
    pointers = torch.empty(L, F, nb, K, dtype=torch.long, device=starts.device)  # pointers[l]: the state at l - 1
    for l, out in zip(range(1, L), pointers.unbind(0)[1:]):
        a, e_l = tables(l)
        torch.max(delta.unsqueeze(-2) + a, -1, out=(delta, out))  # the sum is a new table: delta may take the max
        delta.add_(e_l)
    path = torch.empty(L, F, nb, dtype=torch.long, device=starts.device)
    slots = path.unbind(0)
    slots[-1].copy_(ends)
    for l in range(L - 1, 0, -1):
        torch.gather(pointers[l], -1, slots[l].unsqueeze(-1), out=slots[l - 1].unsqueeze(-1))
    return path.permute(1, 2, 0)


# -- log space: the fallback for sums (and the reference max-sum of the tests) ---------------------
def _logsumexp(t: torch.Tensor, dim: int) -> torch.Tensor:
    # torch.logsumexp's gradient is NaN where every term is -inf (states that cannot follow each
    # other); this one is 0 there.
    m = t.detach().amax(dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return safe_log((t - m).exp().sum(dim)) + m.squeeze(dim)


def _max(t: torch.Tensor, dim: int) -> torch.Tensor:
    # .max(dim) routes the gradient to one index even under ties: a single 0/1 path
    return t.max(dim).values


def _log_space(initial, transition, emission, reduce: Callable) -> torch.Tensor:
    """The chain's log p(x) (or max) with ``reduce`` in place of the sum, differentiable by autograd.

    beta_{t-1}[i] = reduce_j (log A_t[i, j] + emission_t[j] + beta_t[j]), blocked as in
    :class:`_Chain`: the block products are log-space matrix products, K^3 terms per step.
    """
    lay = _layout(initial, transition, emission)
    dtype = torch.promote_types(emission.dtype, torch.float64)
    e, init = emission.to(dtype), initial.to(dtype)
    tr = transition.to(dtype)
    tr = tr.unsqueeze(0) if tr.dim() == 2 else tr  # (..., T|1, K, K)
    T, K, L, nb, main = lay.T, lay.K, lay.L, lay.nb, lay.main
    homogeneous = tr.shape[-3] == 1

    def log_m(t: int) -> torch.Tensor:  # log M_t = log A_t + emission_t, (..., K, K)
        return tr[..., 0 if homogeneous else t, :, :] + e[..., t, None, :]

    beta = e.new_zeros(lay.batch + (K,))
    for t in range(T - 1, main - 1, -1):  # the tail
        beta = reduce(log_m(t) + beta.unsqueeze(-2), -1)
    e_main = e[..., :main, :].reshape(e.shape[:-2] + (nb, L, K))
    tr_main = tr if homogeneous else tr[..., :main, :, :].reshape(tr.shape[:-3] + (nb, L, K, K))

    def log_m_blocks(l: int) -> torch.Tensor:  # log M at step l of every block, (..., nb, K, K)
        return (tr_main if homogeneous else tr_main[..., l, :, :]) + e_main[..., l, None, :]

    blocks = log_m_blocks(0)
    for l in range(1, L):
        blocks = reduce(blocks.unsqueeze(-1) + log_m_blocks(l).unsqueeze(-3), -2)
    for c in range(nb - 1, -1, -1):
        beta = reduce(blocks[..., c, :, :] + beta.unsqueeze(-2), -1)
    return reduce(init + beta, -1)
