"""A hidden Markov model (HMM) with Gaussian emissions (diagonal covariance), as a plain Pyro program.

Generative story, for sequences s = 1..S of observations x_t in R^d, t = 0..T-1, with k hidden
states:

    z_0 ~ Multinomial(pi)                          pi_j = p(z_0 = j)
    z_t | z_{t-1} = i ~ Multinomial(A_i)           A_ij = p(z_t = j | z_{t-1} = i)
    x_t | z_t = j ~ N(mu_j, diag(sigma_j^2))

Each z_t is a latent of the lecture's mixture, but the z_t are chained, so the E-step needs the
posteriors p(z_t | x) and p(z_{t-1}, z_t | x) of the whole sequence: the forward-backward
algorithm. EM on this file is Baum-Welch: pi from p(z_0 | x), A_ij from the expected transition
counts sum_t p(z_{t-1} = i, z_t = j | x) (normalised per row), mu_j and sigma_j^2 from the
responsibility-weighted means and variances.

Two model functions tell this same story:

* :func:`model` is a ``pyro.markov`` loop over time (each z_t depends only on z_{t-1}, so
  enumeration needs two dimensions, not T), vectorised over sequences with a plate. Its cost is
  a Python loop of T steps (about 1 ms each): fine for short chains, slow for long ones.
* :func:`vectorized_model` writes the chain z_1, ..., z_{T-1} as one ``DiscreteHMM`` site, whose
  log-probability sums the states out inside the distribution; no Python loop over time. Under
  EM, ppl_em computes that site's posterior by a blocked forward-backward (:mod:`ppl_em.chains`).

Parameters: ``pi`` (k,) and the rows of ``A`` (k, k) on the simplex, ``mu`` (k, d), ``sigma``
(k, d) positive standard deviations.

Reference: lecture notes, "EM algorithm" (EM as the general recipe for any p(x, z));
Rabiner, "A tutorial on hidden Markov models", Proc. IEEE 1989; Bishop, PRML, section 13.2.
"""

from functools import cache, partial
from typing import Dict, Optional, Tuple

import torch
import pyro
import pyro.distributions as dist
from pyro.ops.indexing import Vindex
from torch.distributions import constraints


def init_params(x: torch.Tensor, k: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Default initial values: uniform pi, A with 1/2 on the diagonal, mu at k random observations,
    sigma the per-coordinate standard deviation of the data.

    ``x`` has shape (T, d) or (S, T, d); returns ``pi`` (k,), ``A`` (k, k), ``mu`` (k, d), ``sigma`` (k, d).
    """
    flat = x.reshape(-1, x.shape[-1])  # (S T, d)
    if k > len(flat):
        raise ValueError(f"The default initial mu is k = {k} distinct observations, but x has only {len(flat)}. "
                         f"Use k <= {len(flat)}, or pass init={{'mu': ...}}.")
    g = torch.Generator().manual_seed(seed)
    A = torch.full((k, k), 0.5 / max(k - 1, 1), dtype=x.dtype).fill_diagonal_(0.5 if k > 1 else 1.0)
    return {
        "pi": torch.full((k,), 1.0 / k, dtype=x.dtype),
        "A": A,
        "mu": flat[torch.randperm(len(flat), generator=g)[:k]].clone(),
        "sigma": flat.std(0).clamp_min(1e-3).expand(k, -1).clone(),
    }


def _as_batch(x: torch.Tensor) -> torch.Tensor:
    """(S, T, d) view of a single sequence (T, d) or a batch (S, T, d)."""
    if not torch.is_tensor(x) or x.dim() not in (2, 3):
        got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"x must have shape (T, d) for one sequence or (S, T, d) for S sequences of equal "
                         f"length, got {got}. Reshape a univariate series with x[:, None].")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor (float32 or float64), got {x.dtype}. "
                         "Convert it with x.double().")
    return x if x.dim() == 3 else x.unsqueeze(0)


def _start(name: str, init: Optional[Dict[str, torch.Tensor]], defaults) -> torch.Tensor:
    """Initial value of parameter ``name``: ``init[name]`` if given, else ``defaults()[name]``.

    A fresh copy: the param store must never alias (and later update in place) the caller's tensor.
    Called only when the param store has no value yet; ``defaults`` is cached, made at most once a run.
    """
    value = init[name] if init and name in init else defaults()[name]
    return value.detach().clone()


def model(x: torch.Tensor, k: int = 2, init: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """Gaussian HMM on ``x`` of shape (T, d) or (S, T, d) with ``k`` hidden states.

    ``init`` holds initial values for any of ``pi``, ``A``, ``mu``, ``sigma`` (default
    :func:`init_params`); values already in Pyro's param store take precedence.
    """
    xs = _as_batch(x)  # (S, T, d)
    defaults = cache(partial(init_params, xs, k))  # made at most once a run
    pi = pyro.param("pi", lambda: _start("pi", init, defaults), constraint=constraints.simplex)  # (k,)
    A = pyro.param("A", lambda: _start("A", init, defaults), constraint=constraints.simplex)  # (k, k), rows sum to 1
    mu = pyro.param("mu", lambda: _start("mu", init, defaults))  # (k, d)
    sigma = pyro.param("sigma", lambda: _start("sigma", init, defaults), constraint=constraints.positive)  # (k, d)
    with pyro.plate("sequences", xs.shape[0], dim=-1):
        z = None
        for t in pyro.markov(range(xs.shape[1])):
            probs = pi if z is None else Vindex(A)[..., z, :]  # row A_{z_{t-1}}
            z = pyro.sample(f"z_{t}", dist.Categorical(probs), infer={"enumerate": "parallel"})
            pyro.sample(f"x_{t}", dist.Normal(mu[z], sigma[z]).to_event(1), obs=xs[:, t])


def vectorized_model(x: torch.Tensor, k: int = 2, init: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """The Gaussian HMM of :func:`model` (same parameters, same p(x)), with the chain as one ``DiscreteHMM`` site.

    Pyro's ``DiscreteHMM(initial_logits, transition_logits, observation_dist)`` applies a
    transition *before* its first observation: its initial distribution is that of the state
    one step earlier. So z_0 ~ pi and x_0 | z_0 stay ordinary sites (z_0 enumerated), and the
    chain of x_1, ..., x_{T-1} starts from the point mass on z_0, log e_{z_0} (0 at z_0, -inf
    elsewhere), with the homogeneous transition logits log A. Putting pi in a first transition
    matrix instead (one (K, K) matrix per time step) would give the same p(x) but make every
    step's logits a (T, K, K) tensor, which ``DiscreteHMM`` normalises at each model run.

    ``x`` has shape (T, d) or (S, T, d); ``init`` as in :func:`model`.
    """
    xs = _as_batch(x)  # (S, T, d)
    defaults = cache(partial(init_params, xs, k))  # made at most once a run
    pi = pyro.param("pi", lambda: _start("pi", init, defaults), constraint=constraints.simplex)  # (k,)
    A = pyro.param("A", lambda: _start("A", init, defaults), constraint=constraints.simplex)  # (k, k)
    mu = pyro.param("mu", lambda: _start("mu", init, defaults))  # (k, d)
    sigma = pyro.param("sigma", lambda: _start("sigma", init, defaults), constraint=constraints.positive)  # (k, d)
    T = xs.shape[1]
    with pyro.plate("sequences", xs.shape[0], dim=-1):
        z0 = pyro.sample("z_0", dist.Categorical(pi), infer={"enumerate": "parallel"})
        pyro.sample("x_0", dist.Normal(mu[z0], sigma[z0]).to_event(1), obs=xs[:, 0])
        if T > 1:
            start = torch.eye(k, dtype=xs.dtype, device=xs.device).log()[z0]  # (..., k): log e_{z_0}
            emission = dist.Normal(mu, sigma).to_event(1)  # p(x_t | z_t = j) for every j: batch (k,)
            chain = dist.DiscreteHMM(start, A.log(), emission, duration=T - 1)
            pyro.sample("x_rest", chain, obs=xs[:, 1:])  # x_1 .. x_{T-1}, (S, T - 1, d)


def generate(T: int, pi: torch.Tensor, A: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor,
             num_sequences: int = 1, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Draw (x, z) by running :func:`model` forward: x (S, T, d), z (S, T) with S = ``num_sequences``.

    Runs under ``poutine.uncondition`` with a private param store and a forked random state
    seeded by ``seed``, so the caller's are untouched.
    """
    placeholder = mu.new_zeros(num_sequences, T, mu.shape[-1])  # fixes S, T and d; never observed
    init = {"pi": pi, "A": A, "mu": mu, "sigma": sigma}
    with pyro.get_param_store().scope(), torch.random.fork_rng():
        torch.manual_seed(seed)
        tr = pyro.poutine.trace(pyro.poutine.uncondition(model)).get_trace(placeholder, len(pi), init)
    x = torch.stack([tr.nodes[f"x_{t}"]["value"] for t in range(T)], 1)  # (S, T, d)
    z = torch.stack([tr.nodes[f"z_{t}"]["value"] for t in range(T)], 1)  # (S, T)
    return x.detach(), z.detach()
