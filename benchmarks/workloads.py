"""The fits the benchmark runner times: data, shared initial parameters, one fit per library.

Every fit function takes the same data x and the same initial parameters, runs one untimed
warm-up iteration from them, then ``iters`` timed EM iterations from them again, and returns
a :class:`Fit`. Log-likelihoods are per point, (1/n) l(theta) = (1/n) sum_i log p(x^(i); theta)
(per time step for an HMM), so they compare directly with scikit-learn's ``score``.

ppl_em always runs through the generic ``ppl_em.EM`` on a plain Pyro model file
(``ppl_em.models.gmm``, ``ppl_em.models.hmm``): no hand-written EM stands in for it.
The peers are imported lazily, so a missing optional peer (pomegranate) only skips its rows.
"""

from __future__ import annotations

import importlib
import resource
import sys
import functools
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import pyro
import torch
from pyro.infer import SVI, TraceEnum_ELBO
from pyro.optim import Adam

import ppl_em
from ppl_em.models import gmm, hmm, kmeans

Init = Dict[str, np.ndarray]

REG_COVAR = 1e-6  # ppl_em's and scikit-learn's default: both add it to every Sigma_j

# The module each peer needs; the memory probe imports it before taking its baseline.
LIBRARY_MODULES = {
    "ppl_em": "ppl_em",
    "scikit-learn": "sklearn.mixture",
    "pomegranate": "pomegranate.gmm",
    "hmmlearn": "hmmlearn.hmm",
    "Pyro SVI": "pyro.infer",
}


@dataclass
class Fit:
    """One library's run on one workload.

    Attributes
    ----------
    sec_per_iter : float
        Mean wall-clock seconds of one EM iteration (E-step + M-step) after the warm-up.
    trajectory : list of float
        (1/n) log p(x; theta_t) at the parameters *before* iteration t, t = 0 .. iters - 1.
    final_ll : float
        (1/n) log p(x; theta) after the last iteration.
    times : list of float
        Seconds of each timed iteration, where the library lets us time them one by one.
    note : str
        Anything a reader of the table should know (e.g. which M-step ppl_em used).
    """

    sec_per_iter: float
    trajectory: List[float]
    final_ll: float
    times: List[float] = field(default_factory=list)
    note: str = ""
    usage: Dict[str, float] = field(default_factory=dict)


class Usage:
    """This process's CPU seconds (user, system) and page faults (minor, major) over a ``with`` block,
    from ``getrusage``: a machine's slow phase shows up as system time and faults beside the seconds.
    ``per(count)``: each divided by ``count`` (iterations)."""

    FIELDS = ("ru_utime", "ru_stime", "ru_minflt", "ru_majflt")
    NAMES = ("user_s", "sys_s", "minor_faults", "major_faults")

    def __enter__(self) -> "Usage":
        self._start = resource.getrusage(resource.RUSAGE_SELF)
        return self

    def __exit__(self, *exc) -> None:
        end = resource.getrusage(resource.RUSAGE_SELF)
        self.total = {name: float(getattr(end, f) - getattr(self._start, f)) for name, f in zip(self.NAMES, self.FIELDS)}

    def per(self, count: int) -> Dict[str, float]:
        return {name: value / max(count, 1) for name, value in self.total.items()}


def available(library: str) -> bool:
    """Whether the peer's module imports (pomegranate is an optional extra)."""
    try:
        importlib.import_module(LIBRARY_MODULES[library])
    except ImportError:
        return False
    return True


# -- data ----------------------------------------------------------------------------------------
def gmm_data(n: int, d: int, k: int, seed: int = 0) -> np.ndarray:
    """x^(i) ~ sum_j phi_j N(mu_j, Sigma_j), float64 (n, d), with random well-separated mu_j."""
    rng = np.random.default_rng(seed)
    phi = rng.dirichlet(np.full(k, 5.0))
    mu = rng.normal(scale=3.0, size=(k, d))  # (k, d)
    b = rng.normal(size=(k, d, d)) / np.sqrt(d)
    chol = np.linalg.cholesky(b @ b.transpose(0, 2, 1) + 0.3 * np.eye(d))  # (k, d, d)
    z = rng.choice(k, size=n, p=phi)
    x = rng.standard_normal((n, d))
    for j in range(k):  # per component: an (n, d, d) gather of chol[z] would not fit at n = 1e6
        rows = z == j
        x[rows] = mu[j] + x[rows] @ chol[j].T
    return x


def gmm_init(x: np.ndarray, k: int, seed: int = 0) -> Init:
    """The model file's own default start (uniform phi, k data points, data covariance), as numpy."""
    start = gmm.init_params(torch.from_numpy(x), k, seed=seed)
    return {name: value.numpy().copy() for name, value in start.items()}


def hmm_data(T: int, k: int, d: int, seed: int = 0) -> np.ndarray:
    """One sequence x_0 .. x_{T-1} (T, d) from a sticky Gaussian HMM with k states, float64."""
    rng = np.random.default_rng(seed)
    A = 0.8 * np.eye(k) + 0.2 * rng.dirichlet(np.ones(k), size=k)  # (k, k), rows sum to 1
    mu = rng.normal(scale=2.0, size=(k, d))
    sigma = rng.uniform(0.5, 1.5, size=(k, d))
    cdf, u = A.cumsum(1), rng.random(T)
    z = np.empty(T, dtype=np.int64)
    z[0] = rng.integers(k)
    for t in range(1, T):  # inverse-CDF draw of z_t | z_{t-1}
        z[t] = min(np.searchsorted(cdf[z[t - 1]], u[t]), k - 1)
    return mu[z] + sigma[z] * rng.standard_normal((T, d))


def hmm_init(x: np.ndarray, k: int, seed: int = 0) -> Init:
    start = hmm.init_params(torch.from_numpy(x), k, seed=seed)
    return {name: value.numpy().copy() for name, value in start.items()}


def _torch_init(init: Init, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    return {name: torch.as_tensor(value).to(dtype) for name, value in init.items()}


# -- ppl_em --------------------------------------------------------------------------------------
def _fresh_steps(em: ppl_em.EM, args: tuple, iters: int) -> Tuple[List[float], List[float]]:
    """``iters`` EM steps from the initial parameters (an empty param store): seconds and losses."""
    pyro.clear_param_store()
    times, losses = [], []
    for _ in range(iters):
        start = time.perf_counter()
        losses.append(em.step(*args))
        times.append(time.perf_counter() - start)
    return times, losses


def usage_note(usage: Dict[str, float]) -> str:
    return (f"per iteration: CPU user {usage['user_s']:.3g} s, system {usage['sys_s']:.3g} s, "
            f"{usage['minor_faults']:.0f} minor page faults")


def _m_step_note(em: ppl_em.EM) -> str:
    gradient = [p for p, how in em.explain().items() if not how.startswith("closed form")]
    return f"gradient M-step for {gradient}" if gradient else "closed-form M-step for every parameter"


def ppl_em_fit(model: Callable, args: tuple, n: int, iters: int, **em_options) -> Fit:
    """Warm-up step (it also makes the M-step plan and, on small data, records the step: ppl_em.fast.tape), then
    ``iters`` timed steps from the start again (the first of them starts where the recording did, so it runs
    for real, and the second checks the recording). A user's whole fit, which pays for all of it, is B10's."""
    em = ppl_em.EM(model, **em_options)
    _fresh_steps(em, args, 1)
    with Usage() as usage:
        times, losses = _fresh_steps(em, args, iters)
    final = em.log_likelihood(*args) / n
    return Fit(sum(times) / iters, [-loss / n for loss in losses], final, times, _m_step_note(em), usage.per(iters))


def _on(x: np.ndarray, init: Init, device: str, dtype: Optional[str]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The data and the start as tensors on ``device`` in ``dtype`` (None: the array's own; on the CPU in
    its own dtype the tensor shares the array's memory)."""
    xt = torch.from_numpy(x)
    xt = xt.to(device=device, dtype=getattr(torch, dtype) if dtype else xt.dtype)
    return xt, {name: value.to(device) for name, value in _torch_init(init, xt.dtype).items()}


def ppl_em_gmm(x: np.ndarray, k: int, init: Init, iters: int, device: str = "cpu", dtype: Optional[str] = None) -> Fit:
    """GMM with full covariances (``ppl_em.models.gmm``); the dtype of ``x`` (or ``dtype``) is the dtype of the
    fit, and ``device`` where data and parameters live (each timed step ends with the loss as a Python float,
    so an accelerator's queue is drained inside the timing)."""
    xt, init_t = _on(x, init, device, dtype)
    return ppl_em_fit(gmm.model, (xt, k, init_t), len(x), iters, reg_covar=REG_COVAR)


def gmm_scale_tril(x: torch.Tensor, k: int, init: Dict[str, torch.Tensor]) -> None:
    """The Gaussian mixture as a Pyro user often writes it: a Cholesky factor L_j on ``lower_cholesky``,
    ``scale_tril=L[z]``, ``infer={"enumerate": "parallel"}``; not ppl_em's own model file."""
    phi = pyro.param("phi", init["phi"].clone(), constraint=torch.distributions.constraints.simplex)
    mu = pyro.param("mu", init["mu"].clone())
    L = pyro.param("L", torch.linalg.cholesky(init["Sigma"]), constraint=torch.distributions.constraints.lower_cholesky)
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", pyro.distributions.Categorical(phi), infer={"enumerate": "parallel"})
        pyro.sample("x", pyro.distributions.MultivariateNormal(mu[z], scale_tril=L[z]), obs=x)


def ppl_em_gmm_hard(x: np.ndarray, k: int, init: Init, iters: int) -> Fit:
    """Hard EM (classification EM) on the GMM file with full covariances, timed like :func:`ppl_em_gmm`; its
    trajectory is its own objective, (1/n) max_z log p(x, z; theta) before each step."""
    xt = torch.from_numpy(x)
    return ppl_em_fit(gmm.model, (xt, k, _torch_init(init, xt.dtype)), len(x), iters, reg_covar=REG_COVAR,
                      posterior="hard")


def ppl_em_kmeans(x: np.ndarray, k: int, init: Init, iters: int) -> Fit:
    """k-means as hard EM on ``models/kmeans.py`` from the centres ``init["mu"]``, timed like :func:`ppl_em_fit`;
    no trajectory (scikit-learn keeps none), final_ll = -J / n with J the distortion at the last centres."""
    xt = torch.from_numpy(x)
    fit = ppl_em_fit(kmeans.model, (xt, k, {"mu": torch.as_tensor(init["mu"])}), len(x), iters, posterior="hard")
    distortion = float(kmeans.distortion(xt, pyro.param("mu").detach()))
    return Fit(fit.sec_per_iter, [], -distortion / len(x), fit.times, fit.note, fit.usage)


def ppl_em_gmm_scale_tril(x: np.ndarray, k: int, init: Init, iters: int) -> Fit:
    """The same fit as :func:`ppl_em_gmm` on :func:`gmm_scale_tril` (closed forms through the Cholesky map)."""
    xt = torch.from_numpy(x)
    return ppl_em_fit(gmm_scale_tril, (xt, k, _torch_init(init, xt.dtype)), len(x), iters, reg_covar=REG_COVAR)


def diag_init(init: Init) -> Init:
    """The start of :func:`gmm_init` for diagonal covariances: each Sigma_j's diagonal, (k, d)."""
    return {**init, "Sigma": np.stack([np.diag(s) for s in init["Sigma"]])}


def ppl_em_gmm_diag(x: np.ndarray, k: int, init: Init, iters: int) -> Fit:
    """The GMM with diagonal covariances (``gmm.model(..., covariance_type="diag")``: ``Normal(mu[z],
    sqrt(Sigma[z])).to_event(1)``), from :func:`diag_init`'s start."""
    xt = torch.from_numpy(x)
    model = functools.partial(gmm.model, covariance_type="diag")
    return ppl_em_fit(model, (xt, k, _torch_init(diag_init(init), xt.dtype)), len(x), iters, reg_covar=REG_COVAR)


def ppl_em_hmm(x: np.ndarray, k: int, init: Init, iters: int, device: str = "cpu", dtype: Optional[str] = None) -> Fit:
    """Gaussian HMM (``ppl_em.models.hmm.vectorized_model``: the chain as one ``DiscreteHMM`` site);
    reg_covar = 0 because hmmlearn's M-step adds nothing. ``device``, ``dtype``: as :func:`ppl_em_gmm`."""
    xt, init_t = _on(x, init, device, dtype)
    return ppl_em_fit(hmm.vectorized_model, (xt, k, init_t), len(x), iters, reg_covar=0.0)


def ppl_em_hmm_posterior(x: np.ndarray, k: int, init: Init, iters: int, posterior: str, device: str = "cpu",
                         dtype: Optional[str] = None) -> Fit:
    """The vectorised Gaussian HMM under exact EM (Baum-Welch) or hard EM (Viterbi paths), reg_covar = 1e-6
    (a hard state may hold few points)."""
    xt, init_t = _on(x, init, device, dtype)
    return ppl_em_fit(hmm.vectorized_model, (xt, k, init_t), len(x), iters, reg_covar=1e-6, posterior=posterior)


def ppl_em_until(x: np.ndarray, k: int, init: Init, max_iters: int, tol: float) -> Fit:
    """EM until (1/n) log p(x) rises by less than ``tol`` in one iteration (B4's optimum)."""
    xt = torch.from_numpy(x)
    args, n = (xt, k, _torch_init(init, xt.dtype)), len(x)
    em = ppl_em.EM(gmm.model, reg_covar=REG_COVAR)
    _fresh_steps(em, args, 1)  # warm-up
    pyro.clear_param_store()
    times, trajectory = [], []
    while len(trajectory) < max_iters and not (len(trajectory) > 1 and trajectory[-1] - trajectory[-2] < tol):
        start = time.perf_counter()
        trajectory.append(-em.step(*args) / n)
        times.append(time.perf_counter() - start)
    final = em.log_likelihood(*args) / n
    return Fit(sum(times) / len(times), trajectory, final, times, _m_step_note(em))


WHOLE_FIT_ITERS = 2  # the measurement: ppl_em.fit(gmm.model, x, 16, max_iter=2)


def ppl_em_whole_fit(x: np.ndarray, k: int, init: Init, iters: int) -> None:
    """``ppl_em.fit`` as a user calls it: k-means++ from the data, WHOLE_FIT_ITERS iterations, the final
    E-step (for B2's memory; ``init`` and ``iters`` are not used)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ppl_em.ConvergenceWarning)
        ppl_em.fit(gmm.model, torch.from_numpy(x), k, max_iter=WHOLE_FIT_ITERS, progress=False)


def sklearn_whole_fit(x: np.ndarray, k: int, init: Init, iters: int) -> None:
    """scikit-learn's ``GaussianMixture(...).fit`` with its own k-means initialisation (for B2's memory)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        GaussianMixture(k, covariance_type="full", reg_covar=REG_COVAR, max_iter=WHOLE_FIT_ITERS,
                        random_state=0).fit(x)


# -- peers ---------------------------------------------------------------------------------------
def sklearn_gmm(x: np.ndarray, k: int, init: Init, iters: int, covariance_type: str = "full") -> Fit:
    """scikit-learn ``GaussianMixture`` from the same start, ``max_iter=iters``, ``tol=0``
    (``covariance_type="diag"``: from :func:`diag_init`'s start).

    ``fit`` ends with one extra E-step (so that ``fit_predict`` agrees with ``predict``); it is
    timed separately as ``score`` (the same E-step) and subtracted, so s / iter counts iterations only.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    if covariance_type == "diag":
        precisions = 1.0 / diag_init(init)["Sigma"]
    else:
        precisions = np.linalg.inv(init["Sigma"])

    def make(max_iter: int) -> GaussianMixture:
        return GaussianMixture(k, covariance_type=covariance_type, tol=0.0, reg_covar=REG_COVAR, max_iter=max_iter,
                               weights_init=init["phi"], means_init=init["mu"], precisions_init=precisions)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # tol=0 on purpose: run every iteration
        make(1).fit(x)  # warm-up
        model = make(iters)
        with Usage() as usage:
            fit_seconds = _seconds(model.fit, x)
    score_seconds = _seconds(model.score, x)
    per_iter = max(fit_seconds - score_seconds, 0.0) / iters
    return Fit(per_iter, [float(v) for v in model.lower_bounds_], float(model.score(x)),
               note="s / iter = (fit - one E-step) / iters", usage=usage.per(iters))


def sklearn_kmeans(x: np.ndarray, k: int, init: Init, iters: int) -> Fit:
    """scikit-learn ``KMeans(algorithm="lloyd")`` from the centres ``init["mu"]``, ``max_iter=iters``, ``tol=0``,
    one run. ``fit`` ends with the labels at the last centres (one assignment pass): timed separately as
    ``predict`` and subtracted, and the rest divided by the iterations it ran (``n_iter_``; Lloyd stops early
    where no label changes). final_ll = -inertia / n."""
    from sklearn.cluster import KMeans

    def make(max_iter: int) -> KMeans:
        return KMeans(k, init=init["mu"], n_init=1, max_iter=max_iter, tol=0.0, algorithm="lloyd")

    make(1).fit(x)  # warm-up
    model = make(iters)
    with Usage() as usage:
        fit_seconds = _seconds(model.fit, x)
    predict_seconds = _seconds(model.predict, x)
    per_iter = max(fit_seconds - predict_seconds, 0.0) / model.n_iter_
    return Fit(per_iter, [], -float(model.inertia_) / len(x), note=f"s / iter = (fit - predict) / n_iter_ "
               f"({model.n_iter_} iterations)", usage=usage.per(model.n_iter_))


def pomegranate_gmm(x: np.ndarray, k: int, init: Init, iters: int) -> Fit:
    """pomegranate ``GeneralMixtureModel`` of full-covariance ``Normal``s, same start, same dtype.

    Driven by its public ``summarize`` (E-step, returns log p(x)) and ``from_summaries``
    (M-step), the loop its ``fit`` runs. pomegranate adds no reg_covar to Sigma_j.
    """
    from pomegranate.distributions import Normal
    from pomegranate.gmm import GeneralMixtureModel

    xt = torch.from_numpy(x)
    start = _torch_init(init, xt.dtype)

    def make() -> GeneralMixtureModel:
        parts = [Normal(means=start["mu"][j].clone(), covs=start["Sigma"][j].clone(), covariance_type="full")
                 for j in range(k)]
        return GeneralMixtureModel(parts, priors=start["phi"].clone())

    def steps(model: GeneralMixtureModel, count: int) -> Tuple[List[float], List[float]]:
        times, logps = [], []
        for _ in range(count):
            begin = time.perf_counter()
            logps.append(float(model.summarize(xt)) / len(x))
            model.from_summaries()
            times.append(time.perf_counter() - begin)
        return times, logps

    steps(make(), 1)  # warm-up
    model = make()
    with Usage() as usage:
        times, trajectory = steps(model, iters)
    final = float(model.log_probability(xt).sum()) / len(x)
    return Fit(sum(times) / iters, trajectory, final, times, usage=usage.per(iters))


def hmmlearn_hmm(x: np.ndarray, k: int, init: Init, iters: int) -> Fit:
    """hmmlearn ``GaussianHMM`` (diagonal), same start, priors switched off so both maximise l(theta).

    Each ``fit`` with ``n_iter=1`` and ``init_params=""`` is one Baum-Welch iteration from the
    current parameters; ``monitor_.history[-1]`` is log p(x) before its update.
    """
    from hmmlearn.hmm import GaussianHMM

    def make() -> GaussianHMM:
        model = GaussianHMM(k, covariance_type="diag", n_iter=1, init_params="", params="stmc",
                            means_prior=0.0, means_weight=0.0, covars_prior=0.0, covars_weight=1.0)
        model.startprob_, model.transmat_ = init["pi"].copy(), init["A"].copy()
        model.means_, model.covars_ = init["mu"].copy(), init["sigma"] ** 2
        return model

    def steps(model: GaussianHMM, count: int) -> Tuple[List[float], List[float]]:
        times, lls = [], []
        for _ in range(count):
            times.append(_seconds(model.fit, x))
            lls.append(float(model.monitor_.history[-1]) / len(x))
        return times, lls

    steps(make(), 1)  # warm-up
    model = make()
    times, trajectory = steps(model, iters)
    return Fit(sum(times) / iters, trajectory, float(model.score(x)) / len(x), times)


def _empty_guide(*args, **kwargs) -> None:
    """Every latent of the GMM is enumerated, so SVI's guide has no sites; the loss is -log p(x)."""


def svi_gmm(x: np.ndarray, k: int, init: Init, max_steps: int, stop_at: float, lr: float = 0.1) -> Fit:
    """Pyro SVI (TraceEnum_ELBO, Adam) on the same model file and start, until (1/n) log p(x) >= ``stop_at``."""
    xt = torch.from_numpy(x)
    args = (xt, k, _torch_init(init, xt.dtype))

    def run(count: int) -> Tuple[List[float], List[float]]:
        pyro.clear_param_store()
        svi = SVI(gmm.model, _empty_guide, Adam({"lr": lr}), TraceEnum_ELBO(max_plate_nesting=1))
        times, trajectory = [], []
        while len(times) < count and not (trajectory and trajectory[-1] >= stop_at):
            begin = time.perf_counter()
            trajectory.append(-svi.step(*args) / len(x))
            times.append(time.perf_counter() - begin)
        return times, trajectory

    run(1)  # warm-up
    times, trajectory = run(max_steps)
    return Fit(sum(times) / len(times), trajectory, trajectory[-1], times, note="per SVI step")


def ppl_em_fits(x: np.ndarray, ks: List[int], n_init: int, tol: float, max_iter: int) -> Tuple[float, int, float]:
    """``ppl_em.fit(gmm.model, x, k, n_init=...)`` for each k: (wall seconds, EM iterations, best log-lik / point
    of the last k)."""
    seconds, iters, result = _ppl_em_sweep(gmm.model, torch.from_numpy(x), ks, n_init, tol, max_iter,
                                           em_options={"reg_covar": REG_COVAR})
    return seconds, iters, result.log_likelihood


def _ppl_em_sweep(model: Callable, x: torch.Tensor, ks: List[int], n_init: int, tol: float, max_iter: int,
                  **options) -> Tuple[float, int, "ppl_em.FitResult"]:
    """``ppl_em.fit(model, x, k, n_init=..., **options)`` for each k, timed: (wall seconds, iterations of every
    restart, the last k's result)."""
    start, iters = time.perf_counter(), 0
    for k in ks:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ppl_em.ConvergenceWarning)
            result = ppl_em.fit(model, x, k, n_init=n_init, tol=tol, max_iter=max_iter, progress=False, **options)
        iters += sum(r["n_iter"] for r in result.restarts)
    return time.perf_counter() - start, iters, result


def sklearn_fits(x: np.ndarray, ks: List[int], n_init: int, tol: float, max_iter: int) -> Tuple[float, int, float]:
    """scikit-learn's ``GaussianMixture(k, n_init=..., init_params="k-means++").fit(x)`` for each k: as
    :func:`ppl_em_fits`; the iterations of every restart are counted by the M-steps run."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    m_steps = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        start = time.perf_counter()
        for k in ks:
            model = GaussianMixture(k, covariance_type="full", tol=tol, max_iter=max_iter, n_init=n_init,
                                    reg_covar=REG_COVAR, init_params="k-means++", random_state=0)
            m_step = model._m_step
            model._m_step = lambda *a, _m=m_step, **kw: m_steps.append(1) or _m(*a, **kw)  # count, then M-step
            model.fit(x)
        seconds = time.perf_counter() - start
    return seconds, len(m_steps), float(model.score(x))


def ppl_em_kmeans_fits(x: np.ndarray, ks: List[int], n_init: int, tol: float, max_iter: int) -> Tuple[float, int, float]:
    """``ppl_em.fit(kmeans.model, x, k, method="hard_em", n_init=...)`` for each k, as a user calls it (k-means++
    seeding, hard EM until the loss per point changes by less than ``tol``): (wall seconds, iterations of every
    restart, -J / n at the last k's centres)."""
    xt = torch.from_numpy(x)
    seconds, iters, result = _ppl_em_sweep(kmeans.model, xt, ks, n_init, tol, max_iter, method="hard_em")
    return seconds, iters, -float(kmeans.distortion(xt, result.params["mu"])) / len(x)


def sklearn_kmeans_fits(x: np.ndarray, ks: List[int], n_init: int, tol: float, max_iter: int) -> Tuple[float, int, float]:
    """scikit-learn's ``KMeans(k, n_init=..., algorithm="lloyd").fit(x)`` for each k (its k-means++ seeding; it stops
    where no label changes, or its centres move by less than ``tol`` relative to the data's variance): as
    :func:`ppl_em_kmeans_fits`; the iterations are the best restart's (``n_iter_``)."""
    from sklearn.cluster import KMeans

    start, iters = time.perf_counter(), 0
    for k in ks:
        model = KMeans(k, n_init=n_init, tol=tol, max_iter=max_iter, algorithm="lloyd", random_state=0).fit(x)
        iters += model.n_iter_
    return time.perf_counter() - start, iters, -float(model.inertia_) / len(x)


def _seconds(fn: Callable, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


# -- memory --------------------------------------------------------------------------------------
def current_rss_mb() -> Optional[float]:
    """Resident set size now (Linux /proc); None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except OSError:
        return None
    return pages * resource.getpagesize() / 2**20


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0); False where that is not possible.

    Without it the peak would include transient memory of the imports.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak_rss_mb() -> float:
    """Peak resident set size of this process since start or :func:`reset_peak_rss`.

    Linux: VmHWM of /proc/self/status. Not ru_maxrss: a subprocess's ru_maxrss starts at the
    RSS its parent had when it forked, so a small child would report its big parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        kib_or_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kib_or_bytes / (2**20 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux
