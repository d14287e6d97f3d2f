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

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import pyro.distributions as dist
from torch.distributions import Independent

__all__ = ["Use", "Rule", "RULES", "find_uses", "unwrap"]

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
    phase 2 updates scales given the new locations.
    """

    family: type
    attr: str
    phase: int
    stats: Callable
    finish: Callable


def _ratio(num: torch.Tensor, den: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    # An empty group (no posterior mass) keeps its previous value instead of becoming 0/0.
    safe = den > torch.finfo(den.dtype).tiny
    return torch.where(safe, num / den.clamp_min(torch.finfo(den.dtype).tiny), old)


def _normalise(num: torch.Tensor, den: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    total = num.sum(-1, keepdim=True)
    safe = total > torch.finfo(num.dtype).tiny
    return torch.where(safe, num / total.clamp_min(torch.finfo(num.dtype).tiny), old)


def _sqrt_ratio(num, den, old):
    return _ratio(num, den, old * old).sqrt()


def _cov_ratio(num, den, old):
    # No symmetrisation here: the parameter need not be (..., d, d) (a diagonal (k, d) or a
    # variance per component (k,) is selected into covariance_matrix too). The outer-product
    # statistics are symmetric before the scatter-add, so a (d, d) result already is.
    return _ratio(num, den, old)


def _mean_stats(fn, w, x, reg):
    return w * x, w


def _categorical_stats(fn, w, x, reg):
    k = fn.probs.shape[-1]
    onehot = torch.nn.functional.one_hot(x.long(), k).to(w.dtype)
    return w.unsqueeze(-1) * onehot, None


def _mvn_loc_stats(fn, w, x, reg):
    w = w.unsqueeze(-1)
    return w * x, w.expand(w.shape[:-1] + x.shape[-1:])


def _normal_scale_stats(fn, w, x, reg):
    return w * ((x - fn.loc) ** 2 + reg), w


def _mvn_cov_stats(fn, w, x, reg):
    diff = x - fn.loc  # (..., d)
    d = diff.shape[-1]
    eye = torch.eye(d, dtype=diff.dtype, device=diff.device)
    w = w[..., None, None]
    outer = diff.unsqueeze(-1) * diff.unsqueeze(-2)  # (..., d, d)
    return w * (outer + reg * eye), w.expand(w.shape[:-2] + (d, d))


RULES: List[Rule] = [
    Rule(dist.Categorical, "probs", 1, _categorical_stats, _normalise),
    Rule(dist.Bernoulli, "probs", 1, _mean_stats, _ratio),
    Rule(dist.Poisson, "rate", 1, _mean_stats, _ratio),
    Rule(dist.Normal, "loc", 1, _mean_stats, _ratio),
    Rule(dist.MultivariateNormal, "loc", 1, _mvn_loc_stats, _ratio),
    Rule(dist.Normal, "scale", 2, _normal_scale_stats, _sqrt_ratio),
    Rule(dist.MultivariateNormal, "covariance_matrix", 2, _mvn_cov_stats, _cov_ratio),
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


def selection_source(tensor: torch.Tensor, leaves: Dict[int, str]) -> Optional[Tuple[torch.Tensor, str]]:
    """If ``tensor`` is a pure selection of a param leaf, return (tensor to differentiate, name).

    A top-level normalisation ``p / p.sum(-1, keepdim=True)`` (how torch stores Categorical
    probabilities) is looked through: the parameter is already on the simplex.
    """
    node = tensor.grad_fn
    if node is None:
        return (tensor, leaves[id(tensor)]) if id(tensor) in leaves else None
    top = node
    while type(top).__name__ == "ExpandBackward0":
        top = top.next_functions[0][0]
    if type(top).__name__ == "DivBackward0" and top.next_functions[1][0] is not None:
        # Statistics are summed over the broadcast dims before the vjp (see scatter_stats).
        tensor = top._saved_self
        node = top.next_functions[0][0]
    while node is not None:
        name = type(node).__name__
        if name == "AccumulateGrad":
            leaf = leaves.get(id(node.variable))
            if tensor.grad_fn is None:
                tensor = node.variable
            return (tensor, leaf) if leaf is not None else None
        inputs = [n for n, _ in node.next_functions if n is not None]
        if len(inputs) != 1 or not (name in SELECTION_OPS or _is_01_mask(node)):
            return None
        node = inputs[0]
    return None


def _is_01_mask(node) -> bool:
    """A product with a constant 0/1 tensor, e.g. ``sigma2[z, None, None] * eye(d)``."""
    if type(node).__name__ != "MulBackward0":
        return False
    const = node._saved_other if node.next_functions[1][0] is None else node._saved_self
    return bool(((const == 0) | (const == 1)).all())


@dataclass
class Use:
    """One place where a parameter enters the model: site, family rule, and the tensor to vjp."""

    site: str
    rule: Rule
    tensor: torch.Tensor
    param: str


def find_uses(site: dict, weights: torch.Tensor, leaves: Dict[int, str]) -> List[Use]:
    """Every (attribute, parameter) pair of ``site`` that a closed-form rule can update."""
    fn, _ = unwrap(site["fn"], weights)
    uses = []
    for rule in RULES:
        if type(fn) is not rule.family or rule.attr not in fn.__dict__:
            continue
        found = selection_source(fn.__dict__[rule.attr], leaves)
        if found is not None:
            uses.append(Use(site["name"], rule, found[0], found[1]))
    return uses


def scatter_stats(use: Use, site: dict, weights: torch.Tensor, leaf: torch.Tensor, reg: float):
    """S^T(numerator), S^T(denominator): the use's weighted statistics summed per param element."""
    fn, w = unwrap(site["fn"], weights)
    num, den = use.rule.stats(fn, w, site["value"], reg)
    shape = use.tensor.shape
    grads = []
    for u in (num, den):
        if u is None:
            grads.append(None)
            continue
        u = u.expand(broadcast_shape(u.shape, shape)).sum_to_size(shape)
        grads.append(torch.autograd.grad(use.tensor, leaf, u, retain_graph=True)[0])
    return grads[0], grads[1]
