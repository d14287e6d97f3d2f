"""The object between the E-step and the M-step: expected sufficient statistics.

For a model whose M-step has closed forms, everything the M-step needs from the data and Q(z) is
a handful of weighted sums over data points, e.g. for the Gaussian mixture

    N_j = sum_i w_j^(i),    S_j = sum_i w_j^(i) (x^(i) - c),    M_j = sum_i w_j^(i) (x^(i) - c)(x^(i) - c)^T

(about a centre c amid the data, for accuracy), from which phi_j = N_j / n, mu_j = c + S_j / N_j
and Sigma_j = M_j / N_j - (S_j / N_j)(S_j / N_j)^T. Sums over disjoint data add up, so the
statistics of a data set are the sum of its chunks' statistics, on one machine or many, from
memory or from disk, and a decaying average of them is online EM.

References: Neal & Hinton, "A view of the EM algorithm", 1998 (sufficient statistics);
pomegranate's ``summarize`` / ``from_summaries``; Cappe & Moulines, "Online EM", JRSS-B 2009.
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional, Union

import torch

__all__ = ["Statistics"]

Number = Union[int, float]


class Statistics:
    """Expected sufficient statistics of a model's closed-form M-step, for some data.

    Made by :meth:`ppl_em.EM.summarize` (the E-step on some data) and turned into parameters
    by :meth:`ppl_em.EM.maximize` (the M-step). Statistics of disjoint data add up (``a + b``,
    ``sum([...])``), scale (``0.3 * s``, for online EM), move (``s.to(device)``) and convert
    to and from a flat dict of tensors (:meth:`tensors`, :meth:`from_tensors`), for an
    all-reduce across processes or for saving.

    Attributes
    ----------
    sums : dict of str to torch.Tensor
        The additive sums, float64 whatever the data's dtype. Keys are ``"<group>.<name>"``;
        a Gaussian group has ``N`` (cells), ``S`` (cells, d) and ``M`` (cells, d, d), or
        elementwise ``S`` and ``M`` for a Normal, all about the group's centre.
    centres : dict of str to torch.Tensor
        The centre c of each Gaussian group: a reference point, not a sum. Adding statistics
        about different centres shifts the right operand's sums to the left one's centre.
    log_evidence : torch.Tensor
        log p(x; theta) of the data summarised (scalar, float64), every latent summed out.
    objective : torch.Tensor
        What the E-step's Q makes tight: log p(x; theta), or max_z log p(x, z; theta) for hard EM.
    n : torch.Tensor
        Number of rows (data points, or sequences) summarised (float64: scaled statistics have
        a fractional count).

    Examples
    --------
    >>> import torch
    >>> a = Statistics({"x.N": torch.tensor([2.0])}, log_evidence=-3.0, n=2)
    >>> b = Statistics({"x.N": torch.tensor([1.0])}, log_evidence=-1.0, n=1)
    >>> total = sum([a, b])
    >>> total.sums["x.N"].tolist(), float(total.log_evidence), float(total.n)
    ([3.0], -4.0, 3.0)
    >>> Statistics.from_tensors((0.5 * total).tensors()).sums["x.N"].tolist()
    [1.5]
    """

    def __init__(self, sums: Dict[str, torch.Tensor], centres: Optional[Dict[str, torch.Tensor]] = None,
                 log_evidence: Union[Number, torch.Tensor] = 0.0, n: Union[Number, torch.Tensor] = 0,
                 objective: Optional[Union[Number, torch.Tensor]] = None) -> None:
        self.sums = {k: _wide(v) for k, v in sums.items()}
        self.centres = dict(centres or {})
        device = next(iter(self.sums.values())).device if self.sums else None
        self.log_evidence = torch.as_tensor(log_evidence, dtype=torch.float64, device=device)
        self.objective = self.log_evidence if objective is None else torch.as_tensor(
            objective, dtype=torch.float64, device=device)
        self.n = torch.as_tensor(n, dtype=torch.float64, device=device)

    # -- arithmetic ------------------------------------------------------------------------------
    def __add__(self, other: "Statistics") -> "Statistics":
        if isinstance(other, (int, float)) and other == 0:
            return self
        if not isinstance(other, Statistics):
            return NotImplemented
        if self.sums.keys() != other.sums.keys():
            missing = sorted(set(self.sums) ^ set(other.sums))
            raise ValueError(f"Cannot add Statistics of different models or updates: keys {missing} are in only "
                             "one of them. Summarise every part with the same EM object.")
        theirs = other._recentred(self.centres)
        sums = {k: v + theirs[k] for k, v in self.sums.items()}
        return Statistics(sums, self.centres, self.log_evidence + other.log_evidence, self.n + other.n,
                          self.objective + other.objective)

    __radd__ = __add__  # sum([...]) starts from 0

    def __mul__(self, factor: Number) -> "Statistics":
        if torch.is_tensor(factor):
            factor = float(factor)
        if not isinstance(factor, (int, float)):
            return NotImplemented
        return Statistics({k: v * factor for k, v in self.sums.items()}, self.centres, self.log_evidence * factor,
                          self.n * factor, self.objective * factor)

    __rmul__ = __mul__

    def to(self, *args, **kwargs) -> "Statistics":
        """A copy on another device (``torch.Tensor.to``'s arguments); sums stay float64."""
        move = lambda t: t.to(*args, **kwargs).to(torch.float64) if t.is_floating_point() else t.to(*args, **kwargs)
        return Statistics({k: move(v) for k, v in self.sums.items()}, {k: move(v) for k, v in self.centres.items()},
                          move(self.log_evidence), move(self.n), move(self.objective))

    @staticmethod
    def sum(parts: Iterable["Statistics"]) -> "Statistics":
        """The statistics of the union of disjoint data: ``sum(parts)``, with a clear error for none."""
        total = None
        for part in parts:
            total = part if total is None else total + part
        if total is None:
            raise ValueError("No data to summarise: the data source yielded no chunk. Pass at least one row.")
        return total

    # -- conversion ------------------------------------------------------------------------------
    def tensors(self) -> Dict[str, torch.Tensor]:
        """A flat dict of tensors: ``sum/<key>``, ``centre/<group>``, ``log_evidence``, ``objective`` and ``n``.

        Every entry but the centres is additive: an all-reduce (sum) of the non-centre entries of
        several processes' statistics about the same centres gives the statistics of all their data.
        """
        out = {f"sum/{k}": v for k, v in self.sums.items()}
        out.update({f"centre/{k}": v for k, v in self.centres.items()})
        out.update(log_evidence=self.log_evidence, objective=self.objective, n=self.n)
        return out

    @classmethod
    def from_tensors(cls, tensors: Dict[str, torch.Tensor]) -> "Statistics":
        """The inverse of :meth:`tensors`."""
        unknown = [k for k in tensors if not k.startswith(("sum/", "centre/")) and k not in ("log_evidence", "objective", "n")]
        if unknown:
            raise ValueError(f"Not a Statistics dict: unexpected keys {unknown}; expected sum/..., centre/..., "
                             "log_evidence, objective and n (as written by Statistics.tensors()).")
        sums = {k[4:]: v for k, v in tensors.items() if k.startswith("sum/")}
        centres = {k[7:]: v for k, v in tensors.items() if k.startswith("centre/")}
        return cls(sums, centres, tensors.get("log_evidence", 0.0), tensors.get("n", 0), tensors.get("objective"))

    def __repr__(self) -> str:
        keys = ", ".join(f"{k}{tuple(v.shape)}" for k, v in self.sums.items())
        return f"Statistics(n={float(self.n):g}, log_evidence={float(self.log_evidence):.6g}, sums=[{keys}])"

    # -- centres ---------------------------------------------------------------------------------
    def _recentred(self, centres: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """These sums about ``centres`` instead of their own: for x - c' = (x - c) - delta, delta = c' - c,
        S' = S - N delta and M' = M - S delta^T - delta S^T + N delta delta^T (elementwise for a Normal)."""
        sums = dict(self.sums)
        for group, c in self.centres.items():
            new = centres.get(group)
            if new is None or new is c or torch.equal(new, c):
                continue
            n, s, m = sums[f"{group}.N"], sums[f"{group}.S"], sums[f"{group}.M"]
            delta = (new - c).to(s.dtype)
            if m.dim() == s.dim() + 1:  # a multivariate Gaussian: (cells, d) and (cells, d, d)
                outer = s.unsqueeze(-1) * delta.unsqueeze(-2)
                n1 = n.reshape(n.shape + (1, 1))
                sums[f"{group}.M"] = m - outer - outer.transpose(-1, -2) + n1 * delta.unsqueeze(-1) * delta.unsqueeze(-2)
                sums[f"{group}.S"] = s - n.unsqueeze(-1) * delta
            else:
                sums[f"{group}.M"] = m - 2 * delta * s + n * delta * delta
                sums[f"{group}.S"] = s - n * delta
        return sums


def _wide(value: torch.Tensor) -> torch.Tensor:
    """Statistics of lower precision, in float64 for summing."""
    return value.double() if value.is_floating_point() and value.dtype != torch.float64 else value
