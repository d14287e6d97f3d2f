"""A mixture of Poisson distributions, for vectors of counts.

Generative story, for S = {x^(1), ..., x^(n)}, x^(i) in {0, 1, 2, ...}^d, with k components:

    z^(i) ~ Multinomial(phi)
    x_l^(i) | z^(i) = j ~ Poisson(lambda_jl)     independently for each coordinate l = 1..d

The EM updates: w_j^(i) = p(z^(i) = j | x^(i)), phi_j = (1/n) sum_i w_j^(i) and
lambda_j = sum_i w_j^(i) x^(i) / sum_i w_j^(i), the responsibility-weighted mean count.

Parameters: ``phi`` (k,) on the simplex, ``rate`` (k, d) positive (lambda).

Missing values: a NaN entry x_l^(i) is missing. The coordinates are independent given z, so
marginalising the missing ones out leaves the product over the observed coordinates o^(i): the
site is ``Poisson(rate[z]).mask(observed).to_event(1)`` on x with each NaN replaced by the
placeholder 0, and the M-step stays in closed form over the observed entries,
lambda_jl = sum_i w_j^(i) o_l^(i) x_l^(i) / sum_i w_j^(i) o_l^(i) with o_l^(i) = 1{x_l^(i) observed}.
The default initial rates use the mean of each column's observed counts.

Reference: lecture notes, "EM algorithm" (EM as the general recipe for any p(x, z));
McLachlan & Peel, "Finite Mixture Models", 2000, chapter 1.
"""

from functools import cache, partial
from typing import Dict, Optional, Tuple

import torch
import pyro
import pyro.distributions as dist
from torch.distributions import constraints


def init_params(x: torch.Tensor, k: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Default initial values: uniform phi; rates the mean count times a factor from [0.5, 1.5].

    Returns ``phi`` (k,) and ``rate`` (k, d), in the dtype of ``x`` (n, d).
    """
    g = torch.Generator().manual_seed(seed)
    factor = 0.5 + torch.rand(k, x.shape[-1], generator=g, dtype=x.dtype)  # (k, d)
    mean = x.nanmean(0).nan_to_num(1.0)  # (d,): over the observed counts (1 for a column with none)
    rate = factor * mean.clamp_min(0.1)  # never 0: a zero rate cannot explain any count
    return {"phi": torch.full((k,), 1.0 / k, dtype=x.dtype), "rate": rate}


def _check_counts(x: torch.Tensor) -> None:
    if not torch.is_tensor(x) or x.dim() != 2:
        got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"x must be a tensor of shape (n, d), got {got}. Reshape 1-d counts with x[:, None].")
    if not torch.is_floating_point(x) or not ((x >= 0) & (x == x.round()) | torch.isnan(x)).all():  # NaN: missing
        low = x.nan_to_num(nan=0.0).min().item() if torch.is_floating_point(x) else x.min().item()
        raise ValueError(f"x must hold nonnegative integer counts as a floating tensor, got dtype {x.dtype} "
                         f"with min {low}. Convert with x.double(); negative or fractional "
                         "values are not counts.")


def _start(name: str, init: Optional[Dict[str, torch.Tensor]], defaults) -> torch.Tensor:
    """Initial value of parameter ``name``: ``init[name]`` if given, else ``defaults()[name]``.

    A fresh copy: the param store must never alias (and later update in place) the caller's tensor.
    Called only when the param store has no value yet; ``defaults`` is cached, made at most once a run.
    """
    value = init[name] if init and name in init else defaults()[name]
    return value.detach().clone()


def model(x: torch.Tensor, k: int = 2, init: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """Poisson mixture on counts ``x`` of shape (n, d) with ``k`` components; NaN marks a missing
    entry, marginalised out (module docstring).

    ``init`` holds initial values for ``phi`` and ``rate`` (default :func:`init_params`); values
    already in Pyro's param store take precedence.
    """
    _check_counts(x)
    defaults = cache(partial(init_params, x, k))  # made at most once a run
    phi = pyro.param("phi", lambda: _start("phi", init, defaults), constraint=constraints.simplex)  # (k,)
    rate = pyro.param("rate", lambda: _start("rate", init, defaults), constraint=constraints.positive)  # (k, d)
    seen = ~torch.isnan(x)  # (n, d): False at a missing entry
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(phi), infer={"enumerate": "parallel"})  # (n,) or (k, 1)
        coords = dist.Poisson(rate[z])
        complete = bool(seen.all())
        if not complete:  # p(x_o^(i) | z^(i)): the missing entries marginalised out
            coords = coords.mask(seen)
        pyro.sample("x", coords.to_event(1), obs=x if complete else x.masked_fill(~seen, 0.0))


def generate(n: int, phi: torch.Tensor, rate: torch.Tensor, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Draw (x, z) by running :func:`model` forward: x (n, d) counts, z (n,).

    Runs under ``poutine.uncondition`` with a private param store and a forked random state
    seeded by ``seed``, so the caller's are untouched.
    """
    placeholder = rate.new_zeros(n, rate.shape[-1])  # fixes n and d; never observed
    with pyro.get_param_store().scope(), torch.random.fork_rng():
        torch.manual_seed(seed)
        sampler = pyro.poutine.uncondition(model)
        tr = pyro.poutine.trace(sampler).get_trace(placeholder, len(phi), {"phi": phi, "rate": rate})
    return tr.nodes["x"]["value"].detach(), tr.nodes["z"]["value"].detach()
