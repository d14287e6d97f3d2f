"""How a distribution's attribute depends on a ``pyro.param``, read off the autograd graph.

How does the engine know that row j of ``mu`` belongs to z = j? It does not need to. When a
distribution's attribute A (say ``loc``, shape (k, n, d)) is a *selection* of a ``pyro.param`` v
(``mu[z]`` broadcast over the data plate), A = S v for a 0/1 matrix S, and the vector-Jacobian
product S^T u scatter-adds any per-element statistic u back onto the elements of v: so
sum_i w_j^(i) x^(i) is simply S^T(w * x). Selection is detected by walking A's autograd graph:
only indexing, broadcasting, reshaping and 0/1 masking may lie between A and v.

Users also write a parameter through an invertible map: ``scale=log_sd.exp()``,
``softplus(raw)``, ``var.sqrt()``, ``torch.log(phi)``, ``cholesky(Sigma)``. Elementwise maps
commute with selections (exp(v)[z] = exp(v[z])), so the walk collects them apart from the
selection: A = S F(v). A closed form computed for F(v) is mapped back by F^-1 (log, softplus^-1,
square, exp, L L^T, ...): see :class:`Transform`.

A :class:`Selection` can also run forward, S v, through its :meth:`Selection.index_map`: the M-step
of a covariance needs each component's new mean mu_z, which is S applied to the new ``mu``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .fast import compact

__all__ = ["Selection", "Transform", "selection_sources", "SELECTION_OPS", "INDEX_MAP_ELEMENTS"]

# At most this many elements of a selection's attribute, the M-step plan makes its index map, so that S^T
# (Selection.vjp) is torch calls, which a recorded step replays (ppl_em.fast.tape), where autograd's nodes called
# directly are not seen by the recording; a larger one walks the nodes instead of holding an index as large.
INDEX_MAP_ELEMENTS = 2 ** 16

# Autograd nodes that move or copy elements without arithmetic.
SELECTION_OPS = {
    "ExpandBackward0", "IndexBackward0", "SelectBackward0", "SliceBackward0", "ViewBackward0",
    "UnsafeViewBackward0", "ReshapeAliasBackward0", "UnsqueezeBackward0", "SqueezeBackward0",
    "SqueezeBackward1", "SqueezeBackward2", "PermuteBackward0", "TransposeBackward0",
    "CloneBackward0", "AliasBackward0", "IndexSelectBackward0", "GatherBackward0",
    "DiagEmbedBackward0", "TBackward0", "ToCopyBackward0",
}


@dataclass(frozen=True)
class Transform:
    """An invertible elementwise (or, for ``matrix``, per-matrix) map y = f(v) between a parameter and
    an attribute: ``name`` says which, ``arg`` holds its constant (an exponent, a factor, softplus's beta).

    ``zero``: f(0) = 0, so f commutes with selections that write structural zeros (a diagonal)."""

    name: str
    arg: float = 0.0

    @property
    def matrix(self) -> bool:
        return self.name in ("cholesky", "inverse")

    @property
    def zero(self) -> bool:
        return self.name in ("sqrt", "pow", "mul", "neg") or self.matrix

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return _FORWARD[self.name](v, self.arg)

    def inverse(self, y: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        """f^-1(y); ``old``, the parameter's current value, picks the branch of an even power (its sign)."""
        return _INVERSE[self.name](y, self.arg, old)

    def describe(self) -> str:
        return {"pow": f"pow {self.arg:g}", "mul": f"times {self.arg:g}"}.get(self.name, self.name)


def _tiny(y: torch.Tensor) -> float:
    return torch.finfo(y.dtype).tiny


def _pow_inverse(y, p, old):
    root = y.abs().pow(1.0 / p)
    return torch.where(old < 0, -root, root) if float(p) % 2 == 0 else torch.sign(y) * root


_FORWARD: Dict[str, Callable] = {
    "exp": lambda v, a: v.exp(),
    "log": lambda v, a: v.log(),
    "softplus": lambda v, a: torch.nn.functional.softplus(v, beta=a),
    "sigmoid": lambda v, a: v.sigmoid(),
    "sqrt": lambda v, a: v.sqrt(),
    "rsqrt": lambda v, a: v.rsqrt(),
    "reciprocal": lambda v, a: v.reciprocal(),
    "pow": lambda v, a: v.pow(a),
    "mul": lambda v, a: v * a,
    "neg": lambda v, a: -v,
    "cholesky": lambda v, a: torch.linalg.cholesky(v),
    "inverse": lambda v, a: torch.linalg.inv(v),
}
# Inverses keep the result finite at the boundary: log(0) of a probability that no data point supports is
# log(tiny) (it changes p(x) by less than 1e-300 relative), softplus^-1 of a tiny scale likewise.
_INVERSE: Dict[str, Callable] = {
    "exp": lambda y, a, old: y.clamp_min(_tiny(y)).log(),
    "log": lambda y, a, old: y.exp(),
    "softplus": lambda y, a, old: torch.where(a * y > 20, y, torch.expm1(a * y.clamp_min(_tiny(y))).log() / a),
    "sigmoid": lambda y, a, old: torch.logit(y.clamp(_tiny(y), 1 - torch.finfo(y.dtype).eps)),
    "sqrt": lambda y, a, old: y.square(),
    "rsqrt": lambda y, a, old: y.pow(-2),
    "reciprocal": lambda y, a, old: y.reciprocal(),
    "pow": _pow_inverse,
    "mul": lambda y, a, old: y / a,
    "neg": lambda y, a, old: -y,
    "cholesky": lambda y, a, old: y @ y.transpose(-1, -2),
    "inverse": lambda y, a, old: torch.linalg.inv(y),
}


def _scalar(t) -> Optional[float]:
    """The value of a constant scalar operand (a Python number or a one-element tensor without a graph)."""
    if isinstance(t, (int, float)):
        return float(t)
    if torch.is_tensor(t) and t.numel() == 1 and not t.requires_grad:
        return float(t)
    return None


def _transform_of(node) -> Optional[Transform]:
    """The elementwise or per-matrix invertible map an autograd node applies to its one graph input, if any."""
    name = type(node).__name__
    simple = {"ExpBackward0": "exp", "LogBackward0": "log", "SigmoidBackward0": "sigmoid", "SqrtBackward0": "sqrt",
              "RsqrtBackward0": "rsqrt", "ReciprocalBackward0": "reciprocal", "NegBackward0": "neg",
              "LinalgCholeskyExBackward0": "cholesky", "LinalgInvExBackward0": "inverse"}
    if name in simple:
        return Transform(simple[name])
    if name == "SoftplusBackward0":
        return Transform("softplus", float(node._saved_beta))
    if name == "PowBackward0":
        p = _scalar(node._saved_exponent)
        return Transform("pow", p) if p not in (None, 0.0) else None
    inputs = [n for n, _ in node.next_functions]
    if name in ("MulBackward0", "DivBackward0") and sum(n is not None for n in inputs) == 1:
        graph = 0 if inputs[0] is not None else 1
        const = _scalar(node._saved_other if graph == 0 else node._saved_self)
        if const in (None, 0.0):
            return None
        if name == "MulBackward0":
            return Transform("mul", const)
        return Transform("mul", 1.0 / const) if graph == 0 else None  # v / c; c / v is a reciprocal times c
    return None


@dataclass
class Selection:
    """A distribution attribute A = S F(v) that selects elements of (a map F of) the ``pyro.param`` v.

    ``shape`` is the shape of A before any final broadcasting (Pyro's plates and the
    distribution's own ``expand`` broadcast A over the data): statistics are summed to it.
    ``vjp(u)`` computes S^T u, scatter-adding ``u`` (of that ``shape``) onto v's elements,
    by applying the backward functions of the selection chain between A and v in turn.
    ``inputs[i]`` is the input of ``nodes[i]`` that leads to v (a ``cat`` has several).
    ``transforms`` lists F's maps from the attribute down to v (apply their inverses in this order).
    """

    param: str
    shape: torch.Size
    nodes: List  # autograd nodes from just below the broadcast down to (excluding) v's AccumulateGrad
    leaf_shape: torch.Size
    tensor: torch.Tensor  # A itself, for torch builds whose autograd nodes do not expose input shapes
    inputs: List[int] = field(default_factory=list)
    transforms: List[Transform] = field(default_factory=list)
    leaf_dtype: Optional[torch.dtype] = None  # the parameter's dtype (the attribute's, unless a cast lies between)
    _index: Optional[torch.Tensor] = field(default=None, repr=False)
    _identity: bool = field(default=False, repr=False)  # S is a reshape: A's elements are v's, in order

    def __post_init__(self) -> None:
        if self.leaf_dtype is None:
            self.leaf_dtype = self.tensor.dtype

    def vjp(self, u: torch.Tensor, fresh: bool = True) -> torch.Tensor:
        """S^T u: ``u`` of :attr:`shape` summed onto the parameter's elements, shape ``leaf_shape``; a new
        tensor, unless ``fresh`` is False (a value read once, never added to in place: the M-step's
        formulas), where S is a reshape and the result may be a view of ``u``."""
        if self._index is not None:
            return self._scatter(u, fresh)
        if self.nodes and not hasattr(self.nodes[0], "_input_metadata"):
            return self._vjp_by_autograd(u)
        return self._through_nodes(u).reshape(self.leaf_shape)

    def _through_nodes(self, u: torch.Tensor) -> torch.Tensor:
        for i, node in enumerate(self.nodes):
            out = node(u)
            out = out if isinstance(out, tuple) else (out,)
            # Keep the gradient of the input that leads to v (a 0/1 mask is a constant), summed to
            # that input's shape: a node called directly leaves broadcasting to its caller.
            inputs = [j for j, (f, _) in enumerate(node.next_functions) if f is not None]
            k = self.inputs[i] if self.inputs else inputs[0]
            nxt, nr = node.next_functions[k]
            u = out[k].sum_to_size(nxt._input_metadata[nr].shape)
        return u

    def index_map(self) -> torch.Tensor:
        """For each element of A (``shape``), the flat index of the element of v it selects (-1: a
        structural zero). S is linear, so S v is the gradient of <S^T u, v> in u: one double backward
        through the selection chain with v = labels 1..numel."""
        if self._index is None:
            dtype = torch.float64 if self.tensor.dtype == torch.float64 else torch.float32
            labels = torch.arange(1, self.leaf_shape.numel() + 1, dtype=dtype, device=self.tensor.device)
            with torch.enable_grad():
                u = torch.zeros(self.shape, dtype=self.tensor.dtype, device=self.tensor.device, requires_grad=True)
                back = self._through_nodes(u).reshape(-1) if self.nodes else u.reshape(-1)
                forward, = torch.autograd.grad(back, u, labels.to(back.dtype).reshape(back.shape))
            self._index = forward.round().long() - 1
            flat = self._index.reshape(-1)
            self._identity = flat.numel() == self.leaf_shape.numel() and bool(
                torch.equal(flat, torch.arange(flat.numel(), device=flat.device)))
        return self._index

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        """S F(v): the attribute for a new parameter value ``v`` (shape ``leaf_shape``), shape :attr:`shape`."""
        index = self.index_map()
        y = v
        for t in reversed(self.transforms):
            y = t.forward(y)
        flat = y.reshape(-1)
        if self._identity:
            return flat.reshape(self.shape)
        return torch.where(index >= 0, flat[index.clamp_min(0)], torch.zeros((), dtype=flat.dtype, device=flat.device))

    def release(self) -> None:
        """Drop the autograd nodes (and the trace they hold): after :meth:`index_map`, S^T and S run without them."""
        self.index_map()
        self.nodes, self.tensor = [], self.tensor.detach()

    def _scatter(self, u: torch.Tensor, fresh: bool = True) -> torch.Tensor:
        if self._identity:  # a fresh tensor, as below: statistics never alias the E-step's tables
            same = u.expand(self.shape).reshape(self.leaf_shape)
            return same.clone() if fresh else same
        index = self._index.reshape(-1)
        keep = index >= 0
        out = torch.zeros(self.leaf_shape.numel(), dtype=u.dtype, device=u.device)
        out.index_add_(0, index[keep], u.expand(self.shape).reshape(-1)[keep])
        return out.reshape(self.leaf_shape)

    def _vjp_by_autograd(self, u: torch.Tensor) -> torch.Tensor:
        full = torch.broadcast_shapes(u.shape, self.tensor.shape)
        repeats = full.numel() // u.numel()
        return torch.autograd.grad(self.tensor, self._leaf(), u.expand(full) / repeats, retain_graph=True)[0]

    def _leaf(self) -> torch.Tensor:
        if self.tensor.grad_fn is None:
            return self.tensor
        node = self.tensor.grad_fn
        while type(node).__name__ != "AccumulateGrad":
            node = next(n for n, _ in node.next_functions if n is not None)
        return node.variable

    def describe(self) -> str:
        """The maps between the parameter and the attribute, in a user's words ('' if none)."""
        return " of ".join(t.describe() for t in self.transforms)


def selection_sources(tensor: torch.Tensor, leaves: Dict[int, str]) -> Tuple[List[Selection], str]:
    """Every param leaf that ``tensor`` selects elements of (through invertible maps), one
    :class:`Selection` per path to it; and, when there is none, why not (in a user's words).

    Empty unless every element of ``tensor`` is such a selection (a ``cat`` joins several
    parameters, or constants, along a dimension). A top-level normalisation (``p / p.sum(-1,
    keepdim=True)``, how torch stores probabilities, or ``l - l.logsumexp(-1, keepdim=True)``,
    how it stores logits) is looked through: it changes nothing the closed form computes.
    """
    if tensor.grad_fn is None:
        leaf = leaves.get(id(tensor))
        return ([], "it is a constant") if leaf is None else ([Selection(leaf, tensor.shape, [], tensor.shape, tensor,
                                                                          leaf_dtype=tensor.dtype)], "")
    node, shape = _below_broadcast(tensor.grad_fn, tensor.shape)
    while True:
        if type(node).__name__ == "DivBackward0" and _is_normalisation(node):
            # Statistics are summed to the shape of the numerator p, then scattered through p's chain.
            tensor = node._saved_self
            node, shape = _below_broadcast(node.next_functions[0][0], tensor.shape)
        elif _is_log_normalisation(node):
            node = node.next_functions[0][0]
        else:
            break
    found: List[Selection] = []
    paths = [(node, [], [], [])]  # (node, selection chain, inputs, transforms)
    while paths:
        node, chain, inputs, maps = paths.pop()
        name = type(node).__name__
        if name == "AccumulateGrad":
            leaf = leaves.get(id(node.variable))
            if leaf is None:
                return [], "it depends on a tensor that is not a pyro.param"
            if (maps or _through_cat(chain)) and not _has_shapes(chain):
                return [], "this torch build's autograd nodes do not expose input shapes"
            selection = Selection(leaf, torch.Size(shape), chain, node.variable.shape, tensor, inputs, maps,
                                  leaf_dtype=node.variable.dtype)
            if any(_is_offset(n) for n in chain) and not _offsets_vanish(selection, node.variable):
                return [], "it adds a constant to the parameter where the parameter is used"
            found.append(selection)
            continue
        transform = _transform_of(node)
        if transform is not None:
            nxt = next(n for n, _ in node.next_functions if n is not None)
            paths.append((nxt, chain, inputs, maps + [transform]))
        elif _is_offset(node):  # S v + c, with c = 0 wherever v is selected (checked below)
            k, nxt = next((k, n) for k, (n, _) in enumerate(node.next_functions) if n is not None)
            paths.append((nxt, chain + [node], inputs + [k], maps))
        elif name in SELECTION_OPS or _is_01_mask(node) or name == "CatBackward0":
            nxt = [(k, n) for k, (n, _) in enumerate(node.next_functions) if n is not None]
            if not nxt or (len(nxt) > 1 and name != "CatBackward0"):
                return [], f"it combines several tensors ({name})"
            paths.extend((n, chain + [node], inputs + [k], maps) for k, n in nxt)
        else:
            return [], f"it is computed from a parameter by {name.replace('Backward0', '').lower()}, " \
                       "which is neither a selection nor an invertible elementwise map"
    return found, ""


def _is_offset(node) -> bool:
    """``S v + c`` or ``S v - c`` with a constant c: an addition with one input in the graph (the first, for a
    subtraction). It is a selection where c is 0 at every selected position: a constant elsewhere, as
    ``mask * phi * z + (1 - mask)`` in a capture-recapture model."""
    name = type(node).__name__
    if name not in ("AddBackward0", "SubBackward0"):
        return False
    inputs = [n for n, _ in node.next_functions]
    if sum(n is not None for n in inputs) != 1 or (name == "SubBackward0" and inputs[0] is None):
        return False
    return float(getattr(node, "_saved_alpha", 1)) == 1


def _offsets_vanish(selection: "Selection", leaf: torch.Tensor) -> bool:
    """The attribute equals S F(v) at every selected position (the added constants are 0 there)."""
    index = selection.index_map()
    expected = selection.forward(leaf.detach())
    actual = compact(selection.tensor.detach())  # the attribute before its broadcast (an expand is a view)
    try:
        actual = actual.reshape(actual.shape[actual.dim() - len(selection.shape):]).expand(selection.shape)
    except RuntimeError:
        return False
    selected = index >= 0
    return bool(torch.equal(actual[selected], expected[selected]))


def _through_cat(chain: List) -> bool:
    return any(type(node).__name__ == "CatBackward0" for node in chain)


def _has_shapes(chain: List) -> bool:
    # Without input shapes on autograd nodes, Selection.vjp falls back to autograd from A, which
    # would differentiate a transform too and could not pick one input of a cat.
    return all(hasattr(node, "_input_metadata") for node in chain)


def _is_normalisation(node) -> bool:
    """``p / p.sum(-1, keepdim=True)``: a division whose divisor is a sum of its numerator."""
    other = node.next_functions[1][0]
    return other is not None and type(other).__name__ == "SumBackward1" and \
        other.next_functions[0][0] is node.next_functions[0][0]


def _is_log_normalisation(node) -> bool:
    """``l - l.logsumexp(-1, keepdim=True)``: a SubBackward0 whose second input is a logsumexp of its first."""
    if type(node).__name__ != "SubBackward0" or node.next_functions[1][0] is None:
        return False
    other = node.next_functions[1][0]
    return type(other).__name__ == "LogsumexpBackward0" and other.next_functions[0][0] is node.next_functions[0][0]


def _is_01_mask(node) -> bool:
    """A product with a constant 0/1 tensor, e.g. ``sigma2[z, None, None] * eye(d)``."""
    if type(node).__name__ != "MulBackward0":
        return False
    inputs = [n for n, _ in node.next_functions]
    if sum(n is not None for n in inputs) != 1:
        return False
    const = node._saved_other if inputs[1] is None else node._saved_self
    if not torch.is_tensor(const) or const.numel() <= 1:
        return False
    return bool(((const == 0) | (const == 1)).all())


def _below_broadcast(node, shape):
    """Skip the ``expand`` nodes at the top of a graph: (first other node, shape of its output)."""
    while node is not None and type(node).__name__ == "ExpandBackward0":
        shape = torch.Size(node._saved_self_sym_sizes)
        node = node.next_functions[0][0]
    return node, shape
