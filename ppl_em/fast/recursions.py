"""The recursions of a hidden Markov chain, compiled: forward-backward and max-sum (Viterbi).

A Python loop over the T steps of a chain costs microseconds per step and per operation; compiled by
numba, a step costs its K^2 multiply-adds. For emission probabilities b_t[j] (scaled: at most 1) and
transition probabilities A_t[i, j] (Rabiner's scaling, float64), each step normalised by its sum:

    backward   beta_{T-1} = 1,    beta_{t-1}[i] = sum_j A_t[i, j] b_t[j] beta_t[j] / s_t
    forward    alpha_{-1} given,  alpha_t[j] = sum_i alpha_{t-1}[i] A_t[i, j] b_t[j] / r_t

log p(x) = log sum_j p(w_{-1} = j) beta_{-1}[j] + sum_t log s_t (:func:`backward`); the forward pass
yields the posterior tables gamma and xi as it goes (:func:`posterior`). Max-sum runs in log space,
backwards, keeping the best next state of every state (:func:`viterbi`), and a path is walked
forwards from its first state (:func:`walk`).

Entries below ``NEGLIGIBLE`` of the scaled tables (whose largest entry is 1) and of the normalised
messages (at least 1 / K) are set to 0: they change no sum at float64's precision, and a product of
three of them could be subnormal, which costs the CPU about 100x a normal multiply (a transition that
EM drove to 1e-308 once made every step 5x slower). A step whose sum is 0 leaves NaN behind (numpy's
error model), as the blocked torch recursions do, and the caller recomputes in log space.

Used on the CPU when numba is installed (:func:`available`); elsewhere (a GPU, no numba) the blocked
torch recursions of :mod:`ppl_em.chains` run. The first call in a process compiles the kernels
(seconds), or loads them from numba's cache on disk.
"""

from __future__ import annotations

import math
from typing import Tuple

import numpy as np
import torch

from . import jit
from .jit import compile as _compile

__all__ = ["available", "flush", "backward", "posterior", "viterbi", "walk"]

NEGLIGIBLE = 1e-100  # three such factors still make a normal float64 (above 2.2e-308)


def available(t: torch.Tensor) -> bool:
    """Whether the compiled recursions can run on tables like ``t`` (numba installed, on the CPU)."""
    return jit.available(t)


def flush(t: torch.Tensor) -> torch.Tensor:
    """A float64 copy of a scaled table with its entries below NEGLIGIBLE set to 0: what :func:`backward`
    and :func:`posterior` take, made once for both."""
    t = t.detach().to(torch.float64)
    return torch.where(t < NEGLIGIBLE, 0.0, t)


def backward(b: torch.Tensor, A: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """beta_{t-1} for t = 0 .. T, normalised (beta_{T-1} = 1), and sum_t log s_t.

    ``b`` (N, T, K) emission probabilities, ``A`` (1|N, 1|T, K, K) transition probabilities, both
    :func:`flush`'ed. Returns betas (N, T + 1, K), index t holding beta_{t-1}, and the log scale (N,).
    """
    b, A = _array(b), _array(A)
    N, T, K = b.shape
    betas = np.empty((N, T + 1, K))
    log_scale = np.empty(N)
    _backward(b, A, betas, log_scale)
    return torch.from_numpy(betas), torch.from_numpy(log_scale)


def posterior(a: torch.Tensor, b: torch.Tensor, A: torch.Tensor, betas: torch.Tensor, G: torch.Tensor,
              per_chain: bool, per_step: bool):
    """The forward recursion from alpha_{-1} = ``a`` (N, K), fused with the posterior tables it yields with
    :func:`backward`'s ``betas`` (``b`` and ``A`` as there), each scaled to the chain's weight G (N,):

        gamma_t[j] = G alpha_t[j] beta_t[j] / sum_j alpha_t[j] beta_t[j]                    (N, T, K)
        xi_t[i, j] = G alpha_{t-1}[i] A_t[i, j] b_t[j] beta_t[j] / Z_t,  Z_t its sum over (i, j)

    xi summed over t unless ``per_step``, over the chains unless ``per_chain``: (N|1, T|1, K, K). No
    (N, T, K) message is kept but gamma. Also returns, per chain, whether every Z_t and normaliser of gamma
    was positive (False: a scaled message underflowed). A chain of weight 0 gets tables of 0."""
    N, T, K = b.shape
    gamma = np.empty((N, T, K))
    xi = np.zeros((N if per_chain else 1, T if per_step else 1, K, K))
    fine = np.empty(N, np.bool_)
    _posterior(_array(flush(a)), _array(b), _array(A), _array(betas), _array(G), gamma, xi, fine)
    return torch.from_numpy(gamma), torch.from_numpy(xi), torch.from_numpy(fine)


def viterbi(init: torch.Tensor, e: torch.Tensor, tr: torch.Tensor, chain_of: torch.Tensor):
    """max_w log p(x, w) of every chain f: ``init`` (F, K) log p(w_{-1}), ``e`` (N, T, K) log-emissions,
    ``tr`` (1|N, 1|T, K, K) log-transitions, ``chain_of`` (F,) the emissions' chain n of each f (first
    states enumerated by another latent share their chain's emissions). Returns (scores (F,), the best
    w_{-1} of each f (F,), and ``ahead`` for :func:`walk`).

    The recursion runs backwards, once per chain n whatever F: psi_{t-1}[i] = max_j (log A_t[i, j] +
    e_t[j] + psi_t[j]) is the best score of x_t .. x_{T-1} from w_{t-1} = i, with the best next state
    kept, ``ahead`` (N, T, K) (K^2 a step); then score_f = max_i init_f[i] + psi_{-1}[i]. A tie keeps the
    lowest state, as torch's max does."""
    N, T, K = e.shape
    psi, ahead = np.empty((N, K)), np.empty((N, T, K), np.int32)
    _max_backward(_array(e), _array(tr), psi, ahead)
    totals = init.detach().to(torch.float64) + torch.from_numpy(psi)[chain_of]  # (F, K)
    score, first = totals.max(-1)
    return score, first, ahead


def walk(ahead: np.ndarray, chain_of: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """The best paths w_0 .. w_{T-1} (F', T) from their w_{-1}, ``first`` (F',), on chains ``chain_of``
    (F',), walked forwards through :func:`viterbi`'s ``ahead``."""
    states = np.empty((len(first), ahead.shape[1]), np.int64)
    _walk(ahead, _index(chain_of), _index(first), states)
    return torch.from_numpy(states)


def _index(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.int64).contiguous().numpy()


def _array(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).contiguous().numpy()



@_compile
def _backward(b, A, betas, log_scale):  # pragma: no cover - compiled; tested through its callers
    N, T, K = b.shape
    u = np.empty(K)
    for n in range(N):
        an = n if A.shape[0] > 1 else 0
        for j in range(K):
            betas[n, T, j] = 1.0
        total, scale = 0.0, 1.0  # log of the scales taken out so far = total + log(scale)
        for t in range(T - 1, -1, -1):
            at = t if A.shape[1] > 1 else 0
            for j in range(K):
                u[j] = b[n, t, j] * betas[n, t + 1, j]
            s = 0.0
            for i in range(K):
                acc = 0.0
                for j in range(K):
                    acc += A[an, at, i, j] * u[j]
                betas[n, t, i] = acc
                s += acc
            for i in range(K):
                v = betas[n, t, i] / s
                betas[n, t, i] = v if v >= NEGLIGIBLE else 0.0
            if 1e-200 < s < 1e200:  # a log every hundred or so steps instead of every step: products
                scale *= s  # of normal numbers (scale within 1e100 of 1), which lose no precision
                if not 1e-100 < scale < 1e100:
                    total += math.log(scale)
                    scale = 1.0
            else:  # 0 (the caller recomputes in log space), NaN, or an extreme sum
                total += math.log(s) if s > 0 else (-math.inf if s == 0 else s)
        log_scale[n] = total + math.log(scale)


@_compile
def _max_backward(e, tr, psi, ahead):  # pragma: no cover - compiled; tested through its callers
    N, T, K = e.shape
    cur, new = np.empty(K), np.empty(K)
    for n in range(N):
        an = n if tr.shape[0] > 1 else 0
        for j in range(K):
            cur[j] = 0.0  # psi_{T-1}: nothing left to explain
        for t in range(T - 1, -1, -1):
            at = t if tr.shape[1] > 1 else 0
            for j in range(K):
                cur[j] += e[n, t, j]  # e_t[j] + psi_t[j]
            for i in range(K):
                best, arg = tr[an, at, i, 0] + cur[0], 0
                for j in range(1, K):
                    v = tr[an, at, i, j] + cur[j]
                    if v > best:
                        best, arg = v, j
                new[i] = best
                ahead[n, t, i] = arg
            for i in range(K):
                cur[i] = new[i]
        for i in range(K):
            psi[n, i] = cur[i]


@_compile
def _walk(ahead, chain_of, first, states):  # pragma: no cover - compiled; tested through its callers
    F, T = states.shape
    for f in range(F):
        n, w = chain_of[f], first[f]
        for t in range(T):
            w = ahead[n, t, w]
            states[f, t] = w


@_compile
def _posterior(a, b, A, betas, G, gamma, xi, fine):  # pragma: no cover - compiled; tested through its callers
    N, T, K = b.shape
    prev, pred, u, alpha = np.empty(K), np.empty(K), np.empty(K), np.empty(K)
    for n in range(N):
        fine[n] = True
        if not G[n] > 0:
            gamma[n] = 0.0
            continue
        an = n if A.shape[0] > 1 else 0
        xn = n if xi.shape[0] > 1 else 0
        for i in range(K):
            prev[i] = a[n, i]
        for t in range(T):
            at = t if A.shape[1] > 1 else 0
            xt = t if xi.shape[1] > 1 else 0
            for j in range(K):
                pred[j] = 0.0
                u[j] = b[n, t, j] * betas[n, t + 1, j]
            for i in range(K):
                p = prev[i]
                for j in range(K):
                    pred[j] += p * A[an, at, i, j]
            z, r = 0.0, 0.0
            for j in range(K):
                z += pred[j] * u[j]
                alpha[j] = pred[j] * b[n, t, j]
                r += alpha[j]
            norm = 0.0
            for j in range(K):
                v = alpha[j] / r
                alpha[j] = v if v >= NEGLIGIBLE else 0.0
                norm += alpha[j] * betas[n, t + 1, j]
            if not (z > 0 and norm > 0):
                fine[n] = False
                break
            coef, scale = G[n] / z, G[n] / norm
            for i in range(K):
                w = coef * prev[i]
                for j in range(K):
                    xi[xn, xt, i, j] += w * A[an, at, i, j] * u[j]
            for j in range(K):
                gamma[n, t, j] = scale * alpha[j] * betas[n, t + 1, j]
                prev[j] = alpha[j]
