"""A mixture of multivariate Bernoulli distributions, for binary vectors (e.g. binarised digits).

Generative story, for S = {x^(1), ..., x^(n)}, x^(i) in {0, 1}^d, with k components:

    z^(i) ~ Multinomial(phi)
    x_l^(i) | z^(i) = j ~ Bernoulli(p_jl)     independently for each coordinate l = 1..d

so p(x^(i) | z^(i) = j) = prod_l p_jl^{x_l} (1 - p_jl)^{1 - x_l}. The EM updates are the GMM's
with the Gaussian replaced by Bernoulli: w_j^(i) = p(z^(i) = j | x^(i)),
phi_j = (1/n) sum_i w_j^(i), p_j = sum_i w_j^(i) x^(i) / sum_i w_j^(i) (the responsibility-
weighted pixel frequencies). A p_jl of exactly 0 or 1 is a legitimate maximum-likelihood value;
torch clamps it by machine epsilon when it evaluates log-probabilities.

Parameters: ``phi`` (k,) on the simplex, ``p`` (k, d) in [0, 1].

Missing values: a NaN entry x_l^(i) is missing. The coordinates are independent given z, so
marginalising the missing ones out leaves p(x_o^(i) | z^(i) = j) = prod_{l in o^(i)} p_jl^{x_l}
(1 - p_jl)^{1 - x_l}: the site is ``Bernoulli(p[z]).mask(observed).to_event(1)`` on x with each NaN
replaced by the placeholder 0, and the M-step stays in closed form over the observed entries,
p_jl = sum_i w_j^(i) o_l^(i) x_l^(i) / sum_i w_j^(i) o_l^(i) with o_l^(i) = 1{x_l^(i) observed}.

Reference: lecture notes, "EM algorithm" (EM as the general recipe for any p(x, z));
Bishop, PRML, section 9.3.3.
"""

from functools import cache, partial
from typing import Dict, Optional, Tuple

import torch
import pyro
import pyro.distributions as dist
from torch.distributions import constraints


def init_params(x: torch.Tensor, k: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Default initial values: uniform phi, p_jl drawn uniformly from [0.25, 0.75].

    Returns ``phi`` (k,) and ``p`` (k, d), in the dtype of ``x`` (n, d).
    """
    g = torch.Generator().manual_seed(seed)
    p = 0.25 + 0.5 * torch.rand(k, x.shape[-1], generator=g, dtype=x.dtype)
    return {"phi": torch.full((k,), 1.0 / k, dtype=x.dtype), "p": p}


def _check_binary(x: torch.Tensor) -> None:
    if not torch.is_tensor(x) or x.dim() != 2:
        got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"x must be a tensor of shape (n, d), got {got}.")
    if not x.is_floating_point():
        raise ValueError(f"x must hold 0/1 values as a floating-point tensor, got dtype {x.dtype}. "
                         "Convert it with x.double().")
    if not ((x == 0) | (x == 1) | torch.isnan(x)).all():  # NaN: a missing entry
        bad = x[(x != 0) & (x != 1) & ~torch.isnan(x)][0].item()
        raise ValueError(f"x must be binary (0 or 1), found the value {bad}. Binarise the data first, "
                         "e.g. (x >= threshold).double(), or use the Poisson mixture for counts.")


def _start(name: str, init: Optional[Dict[str, torch.Tensor]], defaults) -> torch.Tensor:
    """Initial value of parameter ``name``: ``init[name]`` if given, else ``defaults()[name]``.

    A fresh copy: the param store must never alias (and later update in place) the caller's tensor.
    Called only when the param store has no value yet; ``defaults`` is cached, made at most once a run.
    """
    value = init[name] if init and name in init else defaults()[name]
    return value.detach().clone()


def model(x: torch.Tensor, k: int = 2, init: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """Bernoulli mixture on binary data ``x`` of shape (n, d) with ``k`` components; NaN marks a
    missing entry, marginalised out (module docstring).

    ``init`` holds initial values for ``phi`` and ``p`` (default :func:`init_params`); values
    already in Pyro's param store take precedence.
    """
    _check_binary(x)
    defaults = cache(partial(init_params, x, k))  # made at most once a run
    phi = pyro.param("phi", lambda: _start("phi", init, defaults), constraint=constraints.simplex)  # (k,)
    p = pyro.param("p", lambda: _start("p", init, defaults), constraint=constraints.unit_interval)  # (k, d)
    seen = ~torch.isnan(x)  # (n, d): False at a missing entry
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(phi), infer={"enumerate": "parallel"})  # (n,) or (k, 1)
        coords = dist.Bernoulli(p[z])
        complete = bool(seen.all())
        if not complete:  # p(x_o^(i) | z^(i)): the missing entries marginalised out
            coords = coords.mask(seen)
        pyro.sample("x", coords.to_event(1), obs=x if complete else x.masked_fill(~seen, 0.0))


def generate(n: int, phi: torch.Tensor, p: torch.Tensor, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Draw (x, z) by running :func:`model` forward: x (n, d) binary, z (n,).

    Runs under ``poutine.uncondition`` with a private param store and a forked random state
    seeded by ``seed``, so the caller's are untouched.
    """
    placeholder = p.new_zeros(n, p.shape[-1])  # fixes n and d; never observed
    with pyro.get_param_store().scope(), torch.random.fork_rng():
        torch.manual_seed(seed)
        tr = pyro.poutine.trace(pyro.poutine.uncondition(model)).get_trace(placeholder, len(phi), {"phi": phi, "p": p})
    return tr.nodes["x"]["value"].detach(), tr.nodes["z"]["value"].detach()
