"""Online (stepwise) EM: an M-step after every batch, from a decaying average of the statistics.

Batch EM makes one M-step per pass over the data. Stepwise EM (Cappe & Moulines 2009; Liang & Klein
2009) makes one per batch of m rows: with S(x_t) the statistics of batch t (the E-step at the current
theta, :meth:`ppl_em.EM.summarize`) and n the size of the data set,

    s_t = (1 - gamma_t) s_{t-1} + gamma_t (n / m) S(x_t)        (Statistics arithmetic, float64)
    theta_t = maximize(s_t)                                     (the same closed forms as batch EM)

s_t estimates the statistics of the whole data set at the current theta, so theta_t is a batch
M-step on an estimate that improves batch after batch; near the optimum, many M-steps per pass reach
a given log p(x) in fewer passes than batch EM (benchmark B8).

Choices:

* **Step size** gamma_t = (t + 2)^(-a), a = 0.6 by default. Convergence needs sum_t gamma_t = inf and
  sum_t gamma_t^2 < inf, i.e. 1/2 < a <= 1. a = 1 weights every batch equally (a running mean of all
  statistics since the start, including those computed at early, poor parameters); smaller a forgets
  them faster at the price of more noise. Liang & Klein found a in [0.5, 0.7] best on their tasks and
  Cappe & Moulines use 0.6; averaging (below) removes much of the remaining noise.
* **Warm-up**: no M-step until ``warmup`` rows have been summarised (their statistics are summed, as
  batch EM would, and scaled to n), so that the first M-step does not fit a component from a handful
  of points. The warm-up's statistics are s_0 and its M-step is the first; t = 1, 2, ... counts the
  M-steps made before batch t.
* **Polyak-Ruppert averaging** (``average``): the iterates theta_t run on, and their running mean
  theta_bar_t = (1 / (t - t_0 + 1)) sum_{s = t_0}^{t} theta_s (in the constrained values: a mean of
  probability vectors, of covariance matrices, is one) is the estimate reported.
* **n** scales the statistics to the data set's size, which a prior's pseudo-counts are weighed
  against (MAP-EM); for a stream of unknown length, the warm-up's rows stand in for n. Without a
  prior the closed forms do not depend on the scale.

References: Cappe & Moulines, "On-line expectation-maximization algorithm for latent data models",
JRSS-B 2009; Liang & Klein, "Online EM for unsupervised models", NAACL 2009; Polyak & Juditsky,
"Acceleration of stochastic approximation by averaging", SIAM J. Control Optim. 1992.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, Optional, Tuple, Union

import pyro
import torch

from . import sources
from .em import EM
from .statistics import Statistics

__all__ = ["OnlineEM", "DEFAULT_STEP_EXPONENT", "DEFAULT_WARMUP"]

DEFAULT_STEP_EXPONENT = 0.6
DEFAULT_WARMUP = 2048  # rows summarised before the first M-step (at least one batch)


class OnlineEM:
    """Stepwise EM on a plain Pyro model: :meth:`partial_fit` on each batch of a stream, or :meth:`step`
    for one pass over data that can be read again (tensors, a memory map, a DataLoader).

    Parameters
    ----------
    model : callable
        A Pyro model whose parameters all have closed-form M-steps (see :meth:`ppl_em.EM.explain`).
    batch_size : int, optional
        Rows per batch when :meth:`step` reads tensors (in a fresh random order each pass) or a numpy
        array; default 10000. A DataLoader or another source brings its own batches.
    step_size : float or callable
        The exponent a of gamma_t = (t + 2)^(-a), 1/2 < a <= 1 (default 0.6), or a function
        ``t -> gamma_t`` in (0, 1] of the number t >= 1 of M-steps made before the batch.
    n : int, optional
        Rows of the whole data set (scales each batch's statistics by n / m); default: the warm-up's rows.
    warmup : int, optional
        Rows summarised before the first M-step (default :data:`DEFAULT_WARMUP`, at least one batch, at
        most n).
    average : bool or int
        Polyak-Ruppert averaging of the iterates from M-step 0 (True) or from M-step ``average`` (an int);
        :attr:`params` and :meth:`finish` give the average.
    seed : int
        Seed of the order in which :meth:`step` reads rows in memory.
    **em_options
        Keyword arguments of :class:`ppl_em.EM` (``reg_covar``, ``chunk_size``, ...).

    Examples
    --------
    >>> import torch, pyro
    >>> from ppl_em.models import gmm
    >>> x, _ = gmm.generate(2000, torch.tensor([0.5, 0.5]), torch.tensor([[-2.0], [2.0]]),
    ...                     torch.ones(2, 1, 1), seed=0)
    >>> pyro.clear_param_store()
    >>> online = OnlineEM(gmm.model, n=len(x), warmup=200)
    >>> start = {"mu": torch.tensor([[-1.0], [1.0]])}
    >>> for p in range(3):                                # a stream: 3 x 20 batches of 100 rows
    ...     for b in range(0, 2000, 100):
    ...         loss = online.partial_fit(x[b:b + 100], 2, start)
    >>> online.t                                          # M-steps: none until 200 rows were seen
    59
    >>> sorted(round(v) for v in online.params["mu"].flatten().tolist())
    [-2, 2]
    """

    def __init__(self, model: Callable, batch_size: Optional[int] = None,
                 step_size: Union[float, Callable[[int], float]] = DEFAULT_STEP_EXPONENT, n: Optional[int] = None,
                 warmup: Optional[int] = None, average: Union[bool, int] = False, seed: int = 0,
                 **em_options: Any) -> None:
        self.gamma = _step_sizes(step_size)
        self.batch_size = _positive("batch_size", batch_size, 10000)
        self.n = None if n is None else _positive("n", n, None)
        self.warmup = _positive("warmup", warmup, DEFAULT_WARMUP)
        if isinstance(average, bool) or average is None:
            self.average_from = 0 if average else None
        elif isinstance(average, int) and average >= 0:
            self.average_from = average
        else:
            raise ValueError(f"average must be a bool or an M-step number >= 0, got {average!r}.")
        self.em = EM(model, **em_options)
        self.seed, self.passes = seed, 0
        self.t = 0  # M-steps made
        self.stats: Optional[Statistics] = None  # s_t, on the scale of n rows
        self._warm: Optional[Statistics] = None  # the warm-up's summed statistics
        self._average: Optional[Dict[str, torch.Tensor]] = None
        self._averaged = 0

    # -- one batch --------------------------------------------------------------------------------------
    def partial_fit(self, *args, **kwargs) -> float:
        """One batch of the stream: its E-step at the current theta, then (after the warm-up) one M-step
        from s_t = (1 - gamma_t) s_{t-1} + gamma_t (n / m) S(batch). Returns -log p(x_batch; theta) at theta
        before the update (an estimate of the loss per batch). On failure the parameters stay as they were."""
        if sources.find(args, kwargs) is not None:
            raise ValueError("partial_fit takes one batch of rows (tensors); for a pass over a data source use "
                             "online.step(source, ...).")
        batch = self.em.summarize(*args, **kwargs)  # the E-step at theta_{t-1}
        self.em._check_objective(batch.objective, args, kwargs)
        if self.em.on_batch is not None:
            self.em.on_batch(int(batch.n))
        loss = -float(batch.objective + self.em._log_prior + self.em._log_jacobian())
        stats = self._updated(batch)
        if stats is not None:
            self._maximize(stats)
        return loss

    def _updated(self, batch: Statistics) -> Optional[Statistics]:
        """s_t from S(batch), or None while warming up."""
        if self.stats is None:
            self._warm = batch if self._warm is None else self._warm + batch
            if float(self._warm.n) < min(self.warmup, self.n or self.warmup):  # a data set smaller: all of it
                return None
            scale = (self.n or float(self._warm.n)) / float(self._warm.n)
            self._warm, warm = None, self._warm
            return scale * warm
        gamma = self.gamma(self.t)
        n = self.n or float(self.stats.n)
        return (1.0 - gamma) * self.stats + (gamma * n / float(batch.n)) * batch

    def _maximize(self, stats: Statistics) -> None:
        saved = self.em._snapshot()
        try:
            self.em.maximize(stats)
        except Exception:
            self.em._restore(saved)
            raise
        self.stats, self.t = stats, self.t + 1
        self.em.iterations += 1
        if self.average_from is not None and self.t - 1 >= self.average_from:
            self._accumulate(self.em.params)

    def _accumulate(self, theta: Dict[str, torch.Tensor]) -> None:
        """theta_bar += (theta - theta_bar) / (count + 1): the running mean of the iterates."""
        self._averaged += 1
        if self._average is None:
            self._average = {k: v.clone() for k, v in theta.items()}
            return
        for k, v in theta.items():
            self._average[k] += (v - self._average[k]) / self._averaged

    # -- a pass -----------------------------------------------------------------------------------------
    def step(self, *args, **kwargs) -> float:
        """One pass over the data, a :meth:`partial_fit` per batch: rows in memory in a fresh random order
        (batches of ``batch_size``), a source in its own order. Returns the sum of the batches' losses."""
        total = 0.0
        for b_args, b_kwargs in self._batches(args, kwargs):
            total += self.partial_fit(*b_args, **b_kwargs)
        self.passes += 1
        return total

    def _batches(self, args: tuple, kwargs: dict) -> Iterator[Tuple[tuple, dict]]:
        found = sources.find(args, kwargs)
        if found is not None:
            key, source = found
            if isinstance(source, sources.Rows) and source.batch_size != self.batch_size:
                source = sources.Rows(source.data, self.batch_size, source.dtype, source.start, source.stop,
                                        source.device)
            yield from ((sources.bind(key, b, args, kwargs)) for b in source)
            return
        data = sources.Data.of(self.em.model, args, kwargs, small=False)
        if not data.splits:
            raise ValueError("OnlineEM.step needs rows to cut into batches: a data plate whose rows the model "
                             f"treats independently ({data.chunking.why if data.chunking else 'no exact E-step'}). "
                             "Use ppl_em.EM for this model.")
        order = torch.randperm(data.rows, generator=torch.Generator().manual_seed(self.seed + self.passes))
        for start in range(0, data.rows, self.batch_size):
            yield data.chunking.take(args, kwargs, order[start:start + self.batch_size])

    # -- the estimate -----------------------------------------------------------------------------------
    @property
    def params(self) -> Dict[str, torch.Tensor]:
        """theta_bar (with averaging, once it has begun) or the current theta_t (constrained values)."""
        return {k: v.clone() for k, v in self._average.items()} if self._average is not None else self.em.params

    def finish(self) -> None:
        """Write :attr:`params` (the average, with averaging) into Pyro's param store."""
        if self._average is None:
            return
        store = pyro.get_param_store()
        for name, value in self._average.items():
            store[name] = value.clone()

    def explain(self) -> Dict[str, str]:
        return self.em.explain()


def _step_sizes(step_size) -> Callable[[int], float]:
    """gamma_t as a function of t from an exponent a in (1/2, 1] or a callable (checked at t = 0)."""
    if callable(step_size):
        first = step_size(1)
        if not 0 < first <= 1:
            raise ValueError(f"step_size(t) must lie in (0, 1]; step_size(1) = {first!r}.")
        return step_size
    if isinstance(step_size, bool) or not isinstance(step_size, (int, float)) or not 0.5 < step_size <= 1:
        raise ValueError(f"step_size must be an exponent a in (0.5, 1] (gamma_t = (t + 2)^(-a); the default 0.6) "
                         f"or a function t -> gamma_t, got {step_size!r}.")
    exponent = float(step_size)
    return lambda t: (t + 2.0) ** -exponent


def _positive(name: str, value, default):
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")
    return value
