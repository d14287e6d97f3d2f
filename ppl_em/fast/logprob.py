"""Log-densities for the engine's traces: fast paths for the common families, torch's own otherwise."""

from __future__ import annotations

from typing import Optional

import torch
import pyro.distributions as dist

from .gaussian import diag_normal_log_prob, mvn_log_prob
from .tensors import broadcast_shape, compact
from .workspace import Workspace

__all__ = ["log_prob", "has_gemm_path"]


def log_prob(fn, value: torch.Tensor, ws: Optional[Workspace] = None) -> torch.Tensor:
    """``fn.log_prob(value)``, through a GEMM fast path for a (diagonal or full) Gaussian under
    enumeration and from the unexpanded table for a Categorical. ``ws`` lends the chunk-sized tables."""
    if type(fn) is dist.Categorical:
        return _categorical_log_prob(fn, value)
    if has_gemm_path(fn) and value.dim() >= 1:
        fast = mvn_log_prob(fn, value, ws) if type(fn) is dist.MultivariateNormal else diag_normal_log_prob(fn.base_dist, value, ws)
        if fast is not None:
            return fast
    return fn.log_prob(value)


def has_gemm_path(fn) -> bool:
    """Whether :func:`log_prob` computes ``fn``'s log-density by a GEMM fast path that never forms a
    temporary of the event's size per (parameter, data point) pair (a multivariate normal; a
    diagonal normal), so that the cost per data row is the log-probability's own size."""
    return type(fn) is dist.MultivariateNormal or (
        type(fn) is dist.Independent and type(fn.base_dist) is dist.Normal and fn.reinterpreted_batch_ndims == 1)


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
