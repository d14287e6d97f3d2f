"""Benchmarks of ppl_em's EM side by side with scikit-learn, pomegranate, hmmlearn and Pyro SVI.

Usage (from the repository root)::

    python -m benchmarks.run                       # the full sizes (minutes to hours; not for CI)
    python -m benchmarks.run --quick --threads 1   # tiny sizes, seconds: the smoke test runs this
    python -m benchmarks.run --only B1,B2,B5 --set B1.n=100000 --set "B5.ns=[10000,100000]"
    python -m benchmarks.run --out some/dir --title "my machine"
    python -m benchmarks.run --only B1 --device cuda   # ppl_em's B1 on a GPU, the peers on the CPU
    python -m benchmarks.run --only B7,B8,B9 --merge   # re-run some workloads, keep the others' results

Workloads (sizes in :data:`FULL`, overridable with ``--set WORKLOAD.KEY=VALUE``):

B1  GMM, full covariances, n = 1e6, d = 10, k = 16, 20 EM iterations: ppl_em vs scikit-learn's
    ``GaussianMixture`` and pomegranate's ``GeneralMixtureModel``; the log-likelihood
    trajectories must agree with scikit-learn's to 1e-6 relative.
B2  Peak memory of B1 (a fresh subprocess per library), and of whole fits (ppl_em.fit and scikit-learn's
    GaussianMixture.fit with max_iter=2: initialisation, iterations and final E-step included).
B3  Gaussian HMM, T = 1e5, K = 8, D = 4, diagonal covariances: ppl_em vs hmmlearn.
B4  EM vs Pyro SVI (TraceEnum_ELBO, Adam lr 0.1) on a 2-D GMM, n = 2e4, k = 5: wall time to come
    within 1e-3 nats per point of the optimum (EM run to convergence).
B5  Scaling of one EM iteration with n (d = 2, k = 3) and the cost of a small fit (n = 1000).
B6  float32 vs float64 data.
B7  EM on a memory-mapped file of several GB vs the same data in memory: s / iter, peak anonymous memory.
B8  Online (stepwise) EM vs batch EM by passes over the data: a GMM and a mixture of counts, n = 1e6.
B9  Data-parallel EM over torch.distributed (1 and 2 processes): s / step, all-reduce bytes and time.
    (B7-B9: :mod:`benchmarks.scaleout`.)
B10 Whole fits as users run them: restarts (n_init) and a sweep over k, against scikit-learn.
B11 B1's GMM written with ``scale_tril=L[z]`` (a user's idiom).
B12 Pyro's examples as their authors wrote them: EM against SVI in the same wall time.
B13 B1's GMM with diagonal covariances against scikit-learn's ``covariance_type="diag"``.
B14 Hard EM: k-means (``models/kmeans.py``) against scikit-learn's ``KMeans`` (Lloyd) from the same centres, and
    hard EM against exact EM on B1's GMM (interleaved pairs).

Every library starts from the same initial parameters (the model file's ``init_params``), gets
one untimed warm-up iteration, then is timed with ``time.perf_counter``. torch keeps its default
number of threads unless ``--threads`` is given. Writes ``results.md`` and ``results.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import ast
import copy
import functools
import gc
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from . import report, scaleout, workloads as wl
from .report import Row, Target

ROOT = Path(__file__).resolve().parents[1]
SEED = 0

FULL: Dict[str, dict] = {
    "B1": {"n": 1_000_000, "d": 10, "k": 16, "iters": 20, "device": "cpu", "dtype": "float64", "repeats": 3},
    # B1's sizes; one library at a time, so that big peaks do not add up on a shared machine
    "B2": {"libraries": ["ppl_em", "scikit-learn", "pomegranate"], "parallel": False},
    "B3": {"T": 100_000, "K": 8, "D": 4, "iters": 10, "repeats": 3, "hard_repeats": 5, "hard_iters": 10,
           "device": "cpu", "dtype": "float64"},
    "B4": {"n": 20_000, "d": 2, "k": 5, "tol": 1e-3, "em_tol": 1e-10, "max_em_iters": 3000,
           "max_svi_steps": 5000, "lr": 0.1},
    "B5": {"ns": [10_000, 100_000, 1_000_000], "d": 2, "k": 3, "iters": 10, "small_n": 1000, "small_iters": 50,
           "small_ns": [1000, 10_000], "small_ns_iters": [50, 20], "small_repeats": 5},
    "B6": {"n": 1_000_000, "d": 10, "k": 16, "iters": 5},
    "B10": {"n": 5000, "d": 2, "k": 3, "n_init": 10, "ks": list(range(1, 11)), "tol": 1e-3, "max_iter": 100,
            "repeats": 5},
    "B11": {"n": 1_000_000, "d": 10, "k": 16, "iters": 10, "repeats": 3},
    "B13": {"n": 1_000_000, "d": 10, "k": 16, "iters": 10, "repeats": 3},
    "B12": {"em_steps": 30, "quick": False},
    "B14": {"n": 1_000_000, "d": 10, "k": 16, "iters": 10, "repeats": 3, "hard_repeats": 3,
            "fits": {"n": 1000, "d": 2, "k": 3, "ks": list(range(1, 11)), "tol": 1e-4, "max_iter": 100, "repeats": 5}},
    **scaleout.FULL,
}
QUICK: Dict[str, dict] = {
    "B1": {"n": 1000, "d": 2, "k": 2, "iters": 3, "device": "cpu", "dtype": "float64", "repeats": 2, "settle": 0.0},
    "B2": {"libraries": ["ppl_em", "scikit-learn"], "parallel": True},  # pomegranate's import (numba) is slow
    "B3": {"T": 20, "K": 2, "D": 2, "iters": 2, "repeats": 1, "hard_repeats": 1, "hard_iters": 2, "settle": 0.0,
           "device": "cpu", "dtype": "float64"},
    "B4": {"n": 600, "d": 2, "k": 3, "tol": 1e-3, "em_tol": 1e-7, "max_em_iters": 300,
           "max_svi_steps": 400, "lr": 0.1},
    "B5": {"ns": [500, 1000, 2000], "d": 2, "k": 3, "iters": 2, "small_n": 1000, "small_iters": 3,
           "small_ns": [1000], "small_ns_iters": [3], "small_repeats": 2, "settle": 0.0},
    "B6": {"n": 1000, "d": 2, "k": 2, "iters": 2},
    "B10": {"n": 300, "d": 2, "k": 2, "n_init": 2, "ks": [1, 2, 3], "tol": 1e-3, "max_iter": 20, "settle": 0.0,
            "repeats": 2},
    "B11": {"n": 1000, "d": 2, "k": 2, "iters": 2, "repeats": 2, "settle": 0.0},
    "B13": {"n": 1000, "d": 2, "k": 2, "iters": 2, "repeats": 2, "settle": 0.0},
    "B12": {"em_steps": 3, "quick": True},
    "B14": {"n": 1000, "d": 2, "k": 2, "iters": 2, "repeats": 2, "hard_repeats": 1, "settle": 0.0,
            "fits": {"n": 300, "d": 2, "k": 2, "ks": [1, 2, 3], "tol": 1e-4, "max_iter": 20, "repeats": 1,
                     "settle": 0.0}},
    **scaleout.QUICK,
}
WORKLOADS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B9", "B10", "B11", "B12", "B13", "B14")

GMM_PEERS: Dict[str, Callable] = {"ppl_em": wl.ppl_em_gmm, "scikit-learn": wl.sklearn_gmm,
                                  "pomegranate": wl.pomegranate_gmm}
# B2 also measures whole fits as a user calls them: initialisation, iterations, the final E-step.
WHOLE_FITS: Dict[str, Callable] = {"ppl_em (whole fit)": wl.ppl_em_whole_fit,
                                   "scikit-learn (whole fit)": wl.sklearn_whole_fit}
HMM_PEERS: Dict[str, Callable] = {"ppl_em": wl.ppl_em_hmm, "hmmlearn": wl.hmmlearn_hmm}
NOT_INSTALLED = "not installed (pip install -e '.[bench]'); skipped"


# -- shared helpers --------------------------------------------------------------------------
def max_relative_deviation(a: List[float], b: List[float]) -> float:
    """max_t |a_t - b_t| / |b_t| over two log-likelihood trajectories of equal length."""
    if len(a) != len(b) or not a:
        raise ValueError(f"trajectories of different lengths: {len(a)} and {len(b)}")
    return max(abs(x - y) / max(abs(y), 1e-300) for x, y in zip(a, b))


def _row(workload: str, library: str, size: str, fit: wl.Fit) -> Row:
    note = "; ".join(part for part in (fit.note, wl.usage_note(fit.usage) if fit.usage else "") if part)
    return Row(workload, library, size, sec_per_iter=fit.sec_per_iter, seconds=fit.sec_per_iter,
               final_ll=fit.final_ll, note=note, trajectory=fit.trajectory, times=fit.times, usage=fit.usage)


def _ratios(rows: List[Row], reference: Row) -> None:
    """ratio = reference seconds / row seconds, speed-up = its inverse, for every timed row."""
    for row in rows:
        # A time of 0 (a peer's fit minus its own scoring, on a loaded machine) has no ratio.
        if row is not reference and row.seconds and reference.seconds:
            row.ratio = reference.seconds / row.seconds
            row.speedup = row.seconds / reference.seconds


def _compare(rows: List[Row], reference: Row, min_speedup: float) -> List[Target]:
    """Ratios against ``reference`` and, per peer, the target ``speed-up >= min_speedup``."""
    _ratios(rows, reference)
    targets = []
    for row in rows:
        if row.speedup is None:
            continue
        row.target = f"{reference.library} >= {min_speedup:g}x faster ({row.timed})"
        row.met = row.speedup >= min_speedup
        targets.append(Target(row.workload, f"{row.target} than {row.library}", f"{row.speedup:.3g}x", row.met))
    return targets


def _agreement(workload: str, fits: Dict[str, wl.Fit], peer: str, rtol: float = 1e-6) -> Target:
    """The log-likelihood trajectory (and final value) of ppl_em vs a peer's, relative deviation."""
    goal = f"log-lik trajectory = {peer}'s (max relative deviation <= {rtol:g})"
    if peer not in fits:
        return Target(workload, goal, f"not measured: {peer} {NOT_INSTALLED}", None)
    ours, theirs = fits["ppl_em"], fits[peer]
    dev = max_relative_deviation(ours.trajectory + [ours.final_ll], theirs.trajectory + [theirs.final_ll])
    return Target(workload, goal, f"{dev:.2e}", dev <= rtol)


def _run_peers(workload: str, size: str, peers: Dict[str, Callable], args: tuple) -> Tuple[List[Row], dict]:
    """Each installed library on the same (x, k, init, iters), once; a placeholder row for a missing one.
    (B1, B3, B5's small fits and B11 time ppl_em against its peers in interleaved repetitions instead:
    :func:`_interleaved`.)"""
    rows, fits = [], {}
    for library, fn in peers.items():
        if not wl.available(library):
            rows.append(Row(workload, library, size, note=NOT_INSTALLED))
            continue
        print(f"  {workload} {library} ...", flush=True)
        fits[library] = fn(*args)
        rows.append(_row(workload, library, size, fits[library]))
    return rows, fits


def _merge_runs(fit: wl.Fit, again: wl.Fit, note: str) -> None:
    """``fit`` becomes the mean over its own timed iterations and ``again``'s (a second run of the same fit)."""
    fit.times = fit.times + again.times
    fit.sec_per_iter = sum(fit.times) / len(fit.times)
    fit.note = (fit.note + "; " if fit.note else "") + note


# -- workloads -------------------------------------------------------------------------------
def _gmm_problem(cfg: dict) -> Tuple[np.ndarray, dict]:
    x = wl.gmm_data(cfg["n"], cfg["d"], cfg["k"], seed=SEED)
    return x, wl.gmm_init(x, cfg["k"], seed=SEED)


def bench_b1(cfg: dict) -> Tuple[List[Row], List[Target]]:
    """GMM, full covariances: s / iter and log-lik trajectories vs scikit-learn and pomegranate, timed by
    :func:`_interleaved`."""
    x, init = _gmm_problem(cfg)
    size = f"n={cfg['n']} d={cfg['d']} k={cfg['k']}, {cfg['iters']} iters"
    where, note, rtol = placement(cfg)  # ppl_em on an accelerator or in float32: the peers stay on the CPU in float64
    ours = functools.partial(wl.ppl_em_gmm, **where)
    order = ["scikit-learn"] * cfg["repeats"] + ["pomegranate"]
    rows, targets, fits = _interleaved("B1", size + note, ours, order, (x, cfg["k"], init, cfg["iters"]), 10.0,
                                       settle=cfg.get("settle", SETTLE_S), rtol=rtol)
    if "pomegranate" in fits:  # no reg_covar in pomegranate: close, not equal
        dev = max_relative_deviation(fits["ppl_em"].trajectory, fits["pomegranate"].trajectory)
        rows[2].note += f"; log-lik trajectory vs ppl_em: max rel. deviation {dev:.1e} (no reg_covar)"
    sklearn = next((row for row in rows if row.library == "scikit-learn" and row.speedup is not None), None)
    if sklearn is not None:  # the performance goal beyond the 10x bar
        targets.append(Target("B1", f"ppl_em >= {B1_GOAL:g}x faster (s / iter) than scikit-learn (the goal)",
                              f"{sklearn.speedup:.3g}x (median of {cfg['repeats']} interleaved runs)",
                              sklearn.speedup >= B1_GOAL))
    return rows, targets


B1_GOAL = 25.0  # B1's speed-up goal over scikit-learn (the 10x bar is what every run must keep)
PLACED = ("B1", "B3", "B7")  # the workloads that take a device and a dtype for ppl_em (--device, --dtype)


def placement(cfg: dict) -> Tuple[Dict[str, str], str, float]:
    """(the keyword arguments that put ppl_em's fit on ``cfg``'s device and dtype, the size's note, the
    trajectories' agreement asked for: 1e-6 relative in float64, 1e-5 in float32)."""
    where = {key: cfg[key] for key, default in (("device", "cpu"), ("dtype", "float64")) if cfg.get(key, default) != default}
    note = f" (ppl_em on {cfg.get('device', 'cpu')}, {cfg.get('dtype', 'float64')})" if where else ""
    return where, note, 1e-5 if cfg.get("dtype") == "float32" else 1e-6


def placed_name(name: str, cfg: dict) -> str:
    """The workload's name in the results: ``B1`` on the CPU in float64, else e.g. ``B1@cuda`` or
    ``B1@cuda/float32``, so that a GPU's rows are kept beside the CPU's (``--merge``)."""
    device, dtype = cfg.get("device", "cpu"), cfg.get("dtype", "float64")
    if device == "cpu" and dtype == "float64":
        return name
    return f"{name}@{device}" + (f"/{dtype}" if dtype != "float64" else "")


def bench_b11(cfg: dict) -> Tuple[List[Row], List[Target]]:
    """B1's GMM written with ``scale_tril=L[z]`` (a user's idiom, not the model file): the same closed forms
    through the Cholesky map, at the same speed; trajectory vs scikit-learn. Timed like B1."""
    x, init = _gmm_problem(cfg)
    size = f"n={cfg['n']} d={cfg['d']} k={cfg['k']}, {cfg['iters']} iters, scale_tril model"
    rows, targets, _ = _interleaved("B11", size, wl.ppl_em_gmm_scale_tril, ["scikit-learn"] * cfg["repeats"],
                                    (x, cfg["k"], init, cfg["iters"]), 15.0, settle=cfg.get("settle", SETTLE_S))
    return rows, targets


def bench_b13(cfg: dict) -> Tuple[List[Row], List[Target]]:
    """B1's GMM with diagonal covariances (``covariance_type="diag"``: a Normal per coordinate) against
    scikit-learn's ``covariance_type="diag"``: s / iter and trajectory, timed like B1."""
    x, init = _gmm_problem(cfg)
    size = f"n={cfg['n']} d={cfg['d']} k={cfg['k']}, {cfg['iters']} iters, diagonal covariances"
    peers = {"scikit-learn": functools.partial(wl.sklearn_gmm, covariance_type="diag")}
    rows, targets, _ = _interleaved("B13", size, wl.ppl_em_gmm_diag, ["scikit-learn"] * cfg["repeats"],
                                    (x, cfg["k"], init, cfg["iters"]), 3.0, peers=peers,
                                    settle=cfg.get("settle", SETTLE_S))
    for target in targets:
        target.source = "ours"  # no goal set for it yet: a bar against regressions of the diagonal path
    return rows, targets


def bench_b14(cfg: dict) -> Tuple[List[Row], List[Target]]:
    """Hard EM. k-means as hard EM on ``models/kmeans.py`` against scikit-learn's Lloyd ``KMeans`` from the same
    centres (B1's data and starting means), timed like B1, the final distortions compared; then hard against
    exact EM on B1's GMM file in interleaved pairs (exact, hard, ...): the median of the pairs' time ratios;
    then whole k-means fits on small data as users run them (``ppl_em.fit(..., method="hard_em")`` against
    ``KMeans(k).fit(x)``, each from its own k-means++ seeding, timed like B10)."""
    x, init = _gmm_problem(cfg)
    size = f"n={cfg['n']} d={cfg['d']} k={cfg['k']}, {cfg['iters']} iters"
    peers = {"scikit-learn": wl.sklearn_kmeans}
    rows, targets, _ = _interleaved("B14", size + ", k-means", wl.ppl_em_kmeans, ["scikit-learn"] * cfg["repeats"],
                                    (x, cfg["k"], init, cfg["iters"]), KMEANS_BAR, peers=peers,
                                    settle=cfg.get("settle", SETTLE_S))
    for target in targets:
        target.source = "ours"  # no goal set for it: a bar against regressions of hard EM's one-latent path
    targets[-1].target = "final distortion J / n = scikit-learn's (relative deviation <= 1e-6)"
    fits = {"exact": functools.partial(wl.ppl_em_gmm, x, cfg["k"], init, cfg["iters"]),
            "hard": functools.partial(wl.ppl_em_gmm_hard, x, cfg["k"], init, cfg["iters"])}
    pair, target = _hard_vs_exact(
        "B14", size, fits, cfg["hard_repeats"], ("ppl_em exact EM (GMM file)", "ppl_em hard EM (GMM file)"), HARD_BAR,
        (f"hard EM s / iter <= {HARD_BAR:g}x exact EM's", f"hard EM s / iter <= {HARD_BAR:g}x exact EM's on B1's GMM file"),
        settle=cfg.get("settle", SETTLE_S), source="ours")
    targets.append(target)
    small = cfg["fits"]  # whole k-means fits as users run them on small data (timed like B10; no target yet)
    data = wl.gmm_data(small["n"], small["d"], small["k"], seed=SEED)
    jobs = [(f"k-means, k={small['k']}, one fit", [small["k"]], 1),
            (f"k-means, k in {small['ks'][0]}..{small['ks'][-1]}, one fit each", small["ks"], 1)]
    whole = _interleaved_fits("B14", data, small, jobs, {"ppl_em": wl.ppl_em_kmeans_fits,
                                                       "scikit-learn": wl.sklearn_kmeans_fits})
    return rows + pair + whole, targets


# B14's bars against regressions (no goal set): k-means against scikit-learn's Lloyd, whose one compiled loop per
# chunk of rows assigns and sums where ppl_em's pass makes the (k, rows) table of log p(x, z) and its log-sum-exp
# (log p(x), which hard EM's statistics keep); hard against exact EM, whose pass is hard EM's less the modes.
KMEANS_BAR = 0.15
HARD_BAR = 1.25


# Seconds of rest before each interleaved run. numpy's OpenBLAS threads keep spinning for a while after a
# call returns, and on a machine of few cores they take the cores from the next run's torch threads:
# ppl_em's small fit (n = 1000) measured 1.9 ms / iter alone, 2.5-3.1 right after scikit-learn's fit,
# 1.9 again after a pause of 0.5 s (or with OPENBLAS_NUM_THREADS=1). Every library gets the same rest.
SETTLE_S = 0.5


def _interleaved(workload: str, size: str, ours: Callable, order: List[str], args: tuple, factor: float,
                 peers: Optional[Dict[str, Callable]] = None, agree_with: str = "scikit-learn",
                 settle: float = SETTLE_S, rtol: float = 1e-6) -> Tuple[List[Row], List[Target], Dict[str, wl.Fit]]:
    """ppl_em and its peers in interleaved repetitions: ppl_em, peer, ppl_em, peer, ..., ppl_em (``order``
    names the peer of each repetition).

    Each peer run's speed-up is its s / iter over the mean of the two ppl_em runs either side of it, so
    that both sample the machine's drifting speed alike; a peer's row gives the median of its speed-ups
    and their spread (target: at least ``factor``), each library's s / iter is the median over its runs,
    and CPU system time and page faults per iteration are recorded beside them. Also returns one fit per
    library (for trajectories); the targets include the trajectory's agreement with ``agree_with``.
    ``peers``: each library's fit (default: the GMM peers); ``settle``: seconds of rest before each run;
    ``rtol``: the trajectories' agreement asked for.
    """
    peers = GMM_PEERS if peers is None else peers
    libraries = ["ppl_em"] + list(dict.fromkeys(order))
    runs: Dict[str, List[wl.Fit]] = {library: [] for library in libraries}
    speedups: Dict[str, List[float]] = {library: [] for library in libraries[1:]}
    print(f"  {workload} ppl_em ...", flush=True)
    runs["ppl_em"].append(ours(*args))
    for peer in order:
        if not wl.available(peer):
            continue
        print(f"  {workload} {peer} ...", flush=True)
        time.sleep(settle)
        runs[peer].append(peers[peer](*args))
        print(f"  {workload} ppl_em ...", flush=True)
        time.sleep(settle)
        runs["ppl_em"].append(ours(*args))
        around = (runs["ppl_em"][-2].sec_per_iter + runs["ppl_em"][-1].sec_per_iter) / 2
        speedups[peer].append(runs[peer][-1].sec_per_iter / around)
    rows = [_median_row(workload, library, size, runs[library]) if runs[library] else
            Row(workload, library, size, note=NOT_INSTALLED) for library in libraries]
    _compare(rows, rows[0], factor)  # the targets' wording; the speed-ups are the interleaved runs' below
    for row in rows[1:]:
        if speedups.get(row.library):
            ups = speedups[row.library]
            row.speedup = float(np.median(ups))
            row.ratio = 1.0 / row.speedup
            row.met = row.speedup >= factor
            row.note = (f"speed-up per interleaved run {', '.join(f'{u:.3g}' for u in ups)}: median "
                        f"{row.speedup:.3g}, spread {min(ups):.3g}-{max(ups):.3g}; ") + row.note
    targets = [Target(workload, f"{rows[0].library} >= {factor:g}x faster (s / iter) than {row.library}",
                      f"{row.speedup:.3g}x (median of {len(speedups[row.library])} interleaved runs)", row.met)
               for row in rows[1:] if speedups.get(row.library)]
    fits = {library: next((f for f in runs[library] if f.trajectory), runs[library][0]) for library in runs if runs[library]}
    targets.append(_agreement(workload, fits, agree_with, rtol))
    return rows, targets, fits


def _median_row(workload: str, library: str, size: str, fits: List[wl.Fit]) -> Row:
    """One library's row from several runs of the same fit: the median s / iter, and the trajectory and
    usage of the run nearest to it; the note lists every run."""
    median = float(np.median([f.sec_per_iter for f in fits]))
    fit = min(fits, key=lambda f: abs(f.sec_per_iter - median))
    row = _row(workload, library, size, wl.Fit(median, fit.trajectory, fit.final_ll, fit.times, fit.note, fit.usage))
    row.note = f"median of {len(fits)} runs ({', '.join(f'{f.sec_per_iter:.3g}' for f in fits)} s / iter); " + row.note
    return row


def bench_b12(cfg: dict) -> Tuple[List[Row], List[Target]]:
    """Pyro's examples as their authors wrote them: EM against SVI in the same wall time (benchmarks.examples)."""
    from . import examples

    rows, targets = [], []
    for record in examples.compare(cfg["quick"], cfg["em_steps"]):
        size = f"{record['model']}, {record['seconds']:.3g} s each"
        rows.append(Row("B12", "ppl_em", size, seconds=record["seconds"], timed="same wall time",
                        final_ll=record["em"], note=f"{record['em_steps']} EM steps"))
        rows.append(Row("B12", "Pyro SVI", size, seconds=record["seconds"], timed="same wall time",
                        final_ll=record["svi"], note=f"{record['svi_steps']} SVI steps (Adam lr 0.05)",
                        target="ppl_em's log p(x) + log p(theta) higher", met=record["met"]))
        targets.append(Target("B12", f"{record['model']}: EM above SVI in the same wall time",
                              f"{record['em']:.4f} vs {record['svi']:.4f} nats/observation", record["met"]))
    return rows, targets


def bench_b2(cfg: dict, options: dict, memory: "MemoryProbe") -> Tuple[List[Row], List[Target]]:
    """Peak RSS of B1's fit (warm-up + 1 iteration), a fresh subprocess per library."""
    size = f"n={cfg['n']} d={cfg['d']} k={cfg['k']}, warm-up + 1 iter"
    libraries = options["libraries"]
    installed = [lib for lib in GMM_PEERS if lib in libraries and wl.available(lib)]
    print(f"  B2 {', '.join(installed)} (one subprocess each) ...", flush=True)
    if options["parallel"]:
        measured = memory.measure("B1", cfg, installed)
    else:
        measured = {lib: memory.measure("B1", cfg, [lib])[lib] for lib in installed}
    rows = []
    for library in GMM_PEERS:
        if library not in measured:
            skipped = NOT_INSTALLED if library in libraries else "not measured (not in B2.libraries)"
            rows.append(Row("B2", library, size, note=skipped))
            continue
        peak, extra = measured[library]
        rows.append(Row("B2", library, size, peak_mb=peak, extra_mb=extra, note="memory only"))
    ours, sk = rows[0], rows[1]
    if ours.extra_mb is None or sk.extra_mb is None:
        return rows, [Target("B2", "ppl_em extra memory <= 1/2 scikit-learn's", "not measured", None)]
    sk.ratio = ours.extra_mb / max(sk.extra_mb, 1.0)  # 1 MB floor: tiny (--quick) fits may allocate ~nothing
    sk.target, sk.met = "ppl_em extra MB <= 0.5 x peer's", sk.ratio <= 0.5
    sk.note = f"ppl_em / peer column = ratio of extra MB: {sk.ratio:.2f}"
    targets = [Target("B2", "ppl_em extra memory (peak - baseline) <= 1/2 scikit-learn's",
                      f"{ours.extra_mb:.0f} MB vs {sk.extra_mb:.0f} MB (ratio {sk.ratio:.2f})", sk.met)]
    whole_rows, whole_targets = _whole_fits(cfg, memory, installed)
    return rows + whole_rows, targets + whole_targets


def _whole_fits(cfg: dict, memory: "MemoryProbe", installed: List[str]) -> Tuple[List[Row], List[Target]]:
    """Peak memory of ppl_em.fit and of scikit-learn's GaussianMixture.fit (max_iter=2), one subprocess each."""
    size = f"n={cfg['n']} d={cfg['d']} k={cfg['k']}, fit(max_iter={wl.WHOLE_FIT_ITERS}): init, iters, final E-step"
    libraries = [lib for lib in WHOLE_FITS if lib.split(" (")[0] in installed]
    print(f"  B2 {', '.join(libraries)} (one subprocess each) ...", flush=True)
    measured = {lib: memory.measure("B1", cfg, [lib])[lib] for lib in libraries}
    rows = [Row("B2", lib, size, peak_mb=peak, extra_mb=extra, note="memory only") for lib, (peak, extra) in
            measured.items()]
    if len(rows) < 2 or rows[0].extra_mb is None or rows[1].extra_mb is None:
        return rows, []
    ours, sk = rows
    sk.ratio = ours.extra_mb / max(sk.extra_mb, 1.0)
    sk.target, sk.met = "ppl_em's whole fit extra MB <= peer's", sk.ratio <= 1.0
    return rows, [Target("B2", "ppl_em.fit's extra memory (the whole fit) <= scikit-learn's GaussianMixture.fit's",
                         f"{ours.extra_mb:.0f} MB vs {sk.extra_mb:.0f} MB (ratio {sk.ratio:.2f})", sk.met)]


def bench_b3(cfg: dict) -> Tuple[List[Row], List[Target]]:
    """Gaussian HMM (diagonal): s / Baum-Welch iteration and log-lik trajectories vs hmmlearn."""
    x = wl.hmm_data(cfg["T"], cfg["K"], cfg["D"], seed=SEED)
    init = wl.hmm_init(x, cfg["K"], seed=SEED)
    size = f"T={cfg['T']} K={cfg['K']} D={cfg['D']}, {cfg['iters']} iters"
    # Target: 5x hmmlearn, on the vectorised model file (the chain as one DiscreteHMM site), timed like B1.
    where, note, rtol = placement(cfg)
    rows, targets, _ = _interleaved("B3", size + note, functools.partial(wl.ppl_em_hmm, **where),
                                    ["hmmlearn"] * cfg["repeats"], (x, cfg["K"], init, cfg["iters"]), 5.0,
                                    peers=HMM_PEERS, agree_with="hmmlearn", settle=cfg.get("settle", SETTLE_S), rtol=rtol)
    rows[0].note += f"; {rows[0].sec_per_iter / cfg['T'] * 1e6:.3g} µs per time step"
    fits = {posterior: functools.partial(wl.ppl_em_hmm_posterior, x, cfg["K"], init, cfg["hard_iters"], posterior,
                                         **where)
            for posterior in ("exact", "hard")}
    hard_rows, hard_target = _hard_vs_exact(
        "B3", f"T={cfg['T']} K={cfg['K']} D={cfg['D']}, {cfg['hard_iters']} iters", fits, cfg["hard_repeats"],
        ("ppl_em exact EM (reg_covar 1e-6)", "ppl_em hard EM (Viterbi)"), 1.0,
        ("hard EM s / iter <= exact EM's", "hard EM (Viterbi) s / iter <= exact EM's on the vectorised HMM"))
    return rows + hard_rows, targets + [hard_target]


def _hard_vs_exact(workload: str, size: str, fits: Dict[str, Callable[[], wl.Fit]], repeats: int,
                   labels: Tuple[str, str], bar: float, goals: Tuple[str, str], settle: float = 0.0,
                   source: str = "issue") -> Tuple[List[Row], Target]:
    """Hard EM against exact EM on the same model and data (``fits["exact"]()``, ``fits["hard"]()``), in
    ``repeats`` interleaved pairs (exact, hard, exact, hard, ...): the median of the pairs' time ratios, met
    where it is at most ``bar``. Hard EM's E-step also computes the exact log p(x) that its statistics keep.
    ``labels``: the two rows' libraries; ``goals``: the hard row's target and the workload's."""
    runs: Dict[str, List[wl.Fit]] = {"exact": [], "hard": []}
    for _ in range(repeats):
        for posterior in runs:
            print(f"  {workload} {labels[posterior == 'hard']} ...", flush=True)
            time.sleep(settle)
            runs[posterior].append(fits[posterior]())
    ratios = [h.sec_per_iter / e.sec_per_iter for e, h in zip(runs["exact"], runs["hard"])]
    ratio = float(np.median(ratios))
    rows = [_median_row(workload, labels[0], size, runs["exact"]), _median_row(workload, labels[1], size, runs["hard"])]
    met = ratio <= bar
    rows[1].target, rows[1].met = goals[0], met
    rows[1].note = f"hard / exact per interleaved pair {', '.join(f'{r:.3g}' for r in ratios)}; " + rows[1].note
    target = Target(workload, goals[1], f"hard / exact = {ratio:.3g} (median of {len(ratios)} interleaved pairs)", met,
                    source=source)
    return rows, target


def _time_to(fit: wl.Fit, level: float) -> Optional[Tuple[float, int]]:
    """Seconds (and steps) until the step whose log-lik, before its update, is >= ``level``."""
    for step, value in enumerate(fit.trajectory):
        if value >= level:
            return sum(fit.times[: step + 1]), step + 1
    return None


def bench_b4(cfg: dict) -> Tuple[List[Row], List[Target]]:
    """Wall time to within ``tol`` nats / point of the optimum: EM vs SVI, same model file and start."""
    x, init = _gmm_problem(cfg)
    size = f"n={cfg['n']} d={cfg['d']} k={cfg['k']}, tol {cfg['tol']:g} nats/point"
    print("  B4 ppl_em EM to convergence ...", flush=True)
    em = wl.ppl_em_until(x, cfg["k"], init, cfg["max_em_iters"], cfg["em_tol"])
    optimum = max(em.trajectory + [em.final_ll])
    level = optimum - cfg["tol"]
    print("  B4 Pyro SVI ...", flush=True)
    svi = wl.svi_gmm(x, cfg["k"], init, cfg["max_svi_steps"], level, lr=cfg["lr"])
    rows = [_to_optimum_row("ppl_em", size, em, level, f"optimum {optimum:.6f} after {len(em.trajectory)} iters"),
            _to_optimum_row("Pyro SVI", size, svi, level, f"Adam lr {cfg['lr']:g}")]
    if rows[1].seconds is None:  # SVI never got there: its speed-up is at least total time / EM's
        total = sum(svi.times)
        rows[1].speedup = total / rows[0].seconds
        rows[1].target, rows[1].met = "ppl_em >= 5x sooner", rows[1].speedup >= 5
        return rows, [Target("B4", "EM within 1e-3 nats/point of the optimum >= 5x sooner than SVI",
                             f"> {rows[1].speedup:.3g}x (SVI not there after {len(svi.times)} steps)", rows[1].met)]
    return rows, _compare(rows, rows[0], 5.0)


def _to_optimum_row(library: str, size: str, fit: wl.Fit, level: float, note: str) -> Row:
    row = Row("B4", library, size, sec_per_iter=fit.sec_per_iter, timed="s to optimum", final_ll=fit.final_ll,
              trajectory=fit.trajectory, times=fit.times)
    reached = _time_to(fit, level)
    note += f"; median step {np.median(fit.times):.3g} s"  # shows when load on the machine distorted the sum
    if reached is None:
        row.note = f"{note}; not within tol after {len(fit.times)} steps ({sum(fit.times):.3g} s)"
    else:
        row.seconds = reached[0]
        row.note = f"{note}; {reached[1]} steps, {reached[0]:.3g} s to optimum"
    return row


def bench_b5(cfg: dict) -> Tuple[List[Row], List[Target]]:
    """s / iter at growing n (ppl_em and scikit-learn) and the growth exponent; a small fit's ms / iter."""
    runs = [(n, cfg["iters"], "") for n in cfg["ns"]] + [(cfg["small_n"], cfg["small_iters"], " (small fit)")]
    rows, ours = [], []
    for n, iters, label in runs:
        x, init = _gmm_problem(dict(cfg, n=n))
        size = f"n={n} d={cfg['d']} k={cfg['k']}, {iters} iters{label}"
        pair, _ = _run_peers("B5", size, {"ppl_em": wl.ppl_em_gmm, "scikit-learn": wl.sklearn_gmm},
                             (x, cfg["k"], init, iters))
        _ratios(pair, pair[0])
        rows += pair
        ours.append(pair[0].sec_per_iter)
    exponent = float(np.polyfit(np.log(cfg["ns"]), np.log(ours[:-1]), 1)[0])
    small_ms = ours[-1] * 1e3
    rows[-2].target, rows[-2].met = "<= 10 ms / iter", small_ms <= 10
    targets = [Target("B5", "s / iter grows at most linearly in n (exponent <= 1.1)",
                      f"exponent {exponent:.2f} over n = {list(cfg['ns'])}", exponent <= 1.1, "ours"),
               Target("B5", f"small fit (n={cfg['small_n']}, k={cfg['k']}) <= 10 ms / EM iteration",
                      f"{small_ms:.1f} ms", small_ms <= 10)]
    # Small fits against scikit-learn, as the library's model file and as a user's scale_tril model, in
    # interleaved repetitions (one run of either takes a fraction of a second: the machine's drift matters).
    for n, iters in zip(cfg["small_ns"], cfg["small_ns_iters"]):
        x, init = _gmm_problem(dict(cfg, n=n))
        for model, ours in (("gmm model file", wl.ppl_em_gmm), ("scale_tril model", wl.ppl_em_gmm_scale_tril)):
            size = f"n={n} d={cfg['d']} k={cfg['k']}, {iters} iters, small fit, {model}"
            pair, more, _ = _interleaved("B5", size, ours, ["scikit-learn"] * cfg["small_repeats"],
                                         (x, cfg["k"], init, iters), 1.0, settle=cfg.get("settle", SETTLE_S))
            for target in more:  # the speed-up and the trajectory's agreement
                target.target += f" (small fit, n={n}, {model})"
            rows += pair
            targets += more
    return rows, targets


def bench_b6(cfg: dict) -> Tuple[List[Row], List[Target]]:
    """The same GMM fit on float64 and on float32 data (parameters follow the data's dtype)."""
    x, init = _gmm_problem(cfg)
    size = f"n={cfg['n']} d={cfg['d']} k={cfg['k']}, {cfg['iters']} iters"
    fits: Dict[str, wl.Fit] = {}
    # float64, float32, float64 again: the float64 time is the mean of the runs either side of float32's,
    # so that both sample the drifting speed of a shared machine alike.
    for name, dtype in (("ppl_em float64", np.float64), ("ppl_em float32", np.float32), ("ppl_em float64", np.float64)):
        print(f"  B6 {name} ...", flush=True)
        cast = {key: value.astype(dtype) for key, value in init.items()}
        fit = wl.ppl_em_gmm(x.astype(dtype), cfg["k"], cast, cfg["iters"])
        if name in fits:
            _merge_runs(fits[name], fit, "timed before and after float32: the mean of both runs")
        else:
            fits[name] = fit
    rows = [_row("B6", name, size, fit) for name, fit in fits.items()]
    _ratios(rows, rows[0])  # here speed-up = float32 time / float64 time: < 1 when float32 is faster
    rows[1].target = "float32 no slower (within 5%); |delta final log-lik| <= 1e-3"
    gap = abs(rows[1].final_ll - rows[0].final_ll)
    rows[1].met = bool(rows[1].speedup <= 1.05 and gap <= 1e-3)
    targets = [Target("B6", "float32 s / iter <= 1.05 x float64's", f"float32 / float64 = {rows[1].speedup:.3g}",
                      rows[1].speedup <= 1.05, "ours"),
               Target("B6", "float32 final log-lik within 1e-3 nats/point of float64's", f"{gap:.2e}",
                      gap <= 1e-3, "ours")]
    return rows, targets


def bench_b10(cfg: dict) -> Tuple[List[Row], List[Target]]:
    """Whole fits as users run them: ``n_init`` restarts at one k, and a sweep over k (one fit each),
    ppl_em.fit vs scikit-learn's GaussianMixture.fit with the same tol, max_iter and reg_covar, each from
    its own k-means++ seeding. The wall time of everything (seeding, iterations, final scoring) is
    compared; iterations differ with the seeds, so s / iteration is given beside it. Interleaved
    repetitions (ppl_em, scikit-learn, ppl_em, ..., ppl_em; ``repeats`` of scikit-learn's): each
    scikit-learn run's speed-up is over the mean of the ppl_em runs either side; the rows give the median
    wall times, the median speed-up and its spread (the fits are deterministic: every run does the same work)."""
    x, _ = _gmm_problem(cfg)
    jobs = [(f"n_init={cfg['n_init']}, k={cfg['k']}", [cfg["k"]], cfg["n_init"]),
            (f"k in {cfg['ks'][0]}..{cfg['ks'][-1]}, one fit each", cfg["ks"], 1)]
    return _interleaved_fits("B10", x, cfg, jobs, {"ppl_em": wl.ppl_em_fits, "scikit-learn": wl.sklearn_fits}), []


def _interleaved_fits(workload: str, x: np.ndarray, cfg: dict, jobs: List[tuple], fits: Dict[str, Callable]) -> List[Row]:
    """B10's timing of whole fits, for each job (label, ks, n_init): ppl_em's fit and the peer's
    (``fits``, ppl_em's first), each ``fit(x, ks, n_init, tol, max_iter) -> (seconds, iterations, log-lik or
    score)``, after one untimed warm-up each, in interleaved repetitions (ppl_em, peer, ppl_em, ...)."""
    (ours, our_fit), (peer_name, peer_fit) = fits.items()
    for fit in (our_fit, peer_fit):  # untimed warm-up: first calls, imports
        fit(x, [jobs[0][1][0]], 1, cfg["tol"], 5)
    rows: List[Row] = []
    for label, ks, n_init in jobs:
        size = f"n={cfg['n']} d={cfg['d']}, {label}, tol {cfg['tol']:g}"
        runs: Dict[str, list] = {ours: [], peer_name: []}

        def timed(library: str, fit: Callable) -> None:
            print(f"  {workload} {library} {label} ...", flush=True)
            time.sleep(cfg.get("settle", SETTLE_S))  # the last library's BLAS threads at rest (see SETTLE_S)
            runs[library].append(fit(x, ks, n_init, cfg["tol"], cfg["max_iter"]))

        timed(ours, our_fit)
        ups = []
        for _ in range(cfg.get("repeats", 1)):
            timed(peer_name, peer_fit)
            timed(ours, our_fit)
            ups.append(runs[peer_name][-1][0] / ((runs[ours][-2][0] + runs[ours][-1][0]) / 2))
        pair = []
        for library, done in runs.items():
            seconds = float(np.median([run[0] for run in done]))
            _, iters, best = done[0]
            times = ", ".join(f"{run[0]:.3g}" for run in done)
            pair.append(Row(workload, library, size, sec_per_iter=seconds / iters, seconds=seconds,
                            timed="s, all fits", final_ll=best,
                            note=f"{seconds:.3g} s for {iters} iterations in all (median of {len(done)} runs: {times} s)"))
        peer = pair[1]
        peer.speedup = float(np.median(ups))
        peer.ratio = 1.0 / peer.speedup
        peer.note = (f"speed-up per interleaved run {', '.join(f'{u:.3g}' for u in ups)}: median {peer.speedup:.3g}, "
                     f"spread {min(ups):.3g}-{max(ups):.3g}; ") + peer.note
        rows += pair
    return rows


# -- memory: one fresh subprocess per (workload, library) ------------------------------------
class MemoryProbe:
    """Runs (workload, library) fits in fresh Python processes and reads their peak resident set size.

    The processes of one call run side by side (each has its own peak; time is not measured here).
    """

    def __init__(self, threads: Optional[int] = None) -> None:
        self.threads = [] if threads is None else ["--threads", str(threads)]

    def measure(self, workload: str, cfg: dict, libraries: List[str]) -> Dict[str, Tuple[Optional[float], ...]]:
        """Per library: (peak RSS MB, peak minus the RSS after imports and data set-up); Nones on failure."""
        procs = {lib: subprocess.Popen([sys.executable, "-m", "benchmarks.run", "--child", f"{workload}:{lib}",
                                        "--child-config", json.dumps(cfg)] + self.threads,
                                       cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for lib in libraries}
        return {lib: self._read(lib, *proc.communicate(), proc.returncode) for lib, proc in procs.items()}

    @staticmethod
    def _read(library: str, stdout: str, stderr: str, returncode: int) -> Tuple[Optional[float], ...]:
        if returncode != 0:
            print(f"    memory probe for {library} failed: {stderr.strip().splitlines()[-1:]}", flush=True)
            return None, None
        result = json.loads(stdout.strip().splitlines()[-1])
        return result["peak_mb"], result["extra_mb"]


def child(spec: str, cfg: dict, threads: Optional[int]) -> None:
    """Inside the subprocess: imports, data, baseline RSS, the fit, then print peak RSS as JSON."""
    import importlib

    workload, library = spec.split(":")
    if workload != "B1":
        raise ValueError(f"memory probes exist for B1's fits only, got {spec!r}")
    importlib.import_module(wl.LIBRARY_MODULES[library.split(" (")[0]])
    fit = {**GMM_PEERS, **WHOLE_FITS}[library]
    set_threads(threads)
    # A first fit on a tiny problem loads every lazily imported module and library (linear algebra,
    # autograd, Pyro's contraction code), so that the baseline below contains them.
    tiny_x, tiny_init = _gmm_problem(dict(cfg, n=max(200, 10 * cfg["k"])))
    fit(tiny_x, cfg["k"], tiny_init, 1)
    x, init = _gmm_problem(cfg)
    gc.collect()
    reset = wl.reset_peak_rss()
    baseline = wl.current_rss_mb()
    fit(x, cfg["k"], init, 1)
    peak = wl.peak_rss_mb()
    # statm and VmHWM round differently: a fit that allocates nothing may read a hair below 0.
    extra = None if baseline is None or not reset else max(peak - baseline, 0.0)
    print(json.dumps({"peak_mb": peak, "extra_mb": extra, "baseline_mb": baseline}))


# -- command line ----------------------------------------------------------------------------
def sizes_for(quick: bool, overrides: List[str]) -> Dict[str, dict]:
    """FULL or QUICK sizes with ``WORKLOAD.KEY=VALUE`` overrides (values as Python literals)."""
    sizes = copy.deepcopy(QUICK if quick else FULL)
    for item in overrides:
        key, _, value = item.partition("=")
        name, _, field = key.partition(".")
        if name not in sizes or field not in sizes[name] or not value:
            raise SystemExit(f"--set expects WORKLOAD.KEY=VALUE with KEY one of "
                             f"{ {n: list(c) for n, c in sizes.items()} }, got {item!r}")
        sizes[name][field] = ast.literal_eval(value)
    return sizes


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds): the smoke test")
    parser.add_argument("--only", default=",".join(WORKLOADS), help="comma-separated workloads, e.g. B1,B4")
    parser.add_argument("--set", action="append", default=[], metavar="W.KEY=VALUE",
                        help="override a size, e.g. --set B1.n=100000 --set B5.ns=[1000,10000]")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--title", default=None, help="heading of results.md")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch and BLAS threads for every library (default: torch's default, all cores); "
                             "1 keeps tiny sizes fast on a busy machine")
    parser.add_argument("--device", default=None,
                        help="torch device for ppl_em in B1, B3 and B7, e.g. cuda (the peers stay on the CPU); "
                             "the results name them B1@cuda, ...; the same as --set B1.device=\"'cuda'\" for each")
    parser.add_argument("--dtype", default=None, choices=["float32", "float64"],
                        help="ppl_em's dtype in B1, B3 and B7 (default float64; the peers stay in float64)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the recorded rows of the workloads not run (from --out's results.json)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.only = [w.strip() for w in args.only.split(",") if w.strip()]
    unknown = sorted(set(args.only) - set(WORKLOADS))
    if unknown:
        parser.error(f"unknown workloads {unknown}; choose from {list(WORKLOADS)}")
    return args


def run(args: argparse.Namespace, command: str) -> Tuple[List[Row], List[Target]]:
    """Run the selected workloads in order; B2 uses B1's sizes."""
    sizes = sizes_for(args.quick, args.set)
    for name in PLACED:
        sizes[name].update({key: value for key, value in (("device", args.device), ("dtype", args.dtype)) if value})
    cpu_b1 = dict(sizes["B1"], device="cpu", dtype="float64")  # B2 measures the CPU's fit
    benches = {"B1": lambda: bench_b1(sizes["B1"]),
               "B2": lambda: bench_b2(cpu_b1, sizes["B2"], MemoryProbe(args.threads)),
               "B3": lambda: bench_b3(sizes["B3"]), "B4": lambda: bench_b4(sizes["B4"]),
               "B5": lambda: bench_b5(sizes["B5"]), "B6": lambda: bench_b6(sizes["B6"]),
               "B7": lambda: scaleout.bench_b7(sizes["B7"], args.threads), "B8": lambda: scaleout.bench_b8(sizes["B8"]),
               "B9": lambda: scaleout.bench_b9(sizes["B9"]),
               "B10": lambda: bench_b10(sizes["B10"]),
               "B11": lambda: bench_b11(sizes["B11"]), "B12": lambda: bench_b12(sizes["B12"]),
               "B13": lambda: bench_b13(sizes["B13"]), "B14": lambda: bench_b14(sizes["B14"])}
    info = report.machine()  # before the runs: the load average says how busy the machine was
    info["gauge_before"] = report.gauge()  # and how fast it was (report.gauge)
    rows, targets = [], []
    for name in args.only:
        print(f"{name}:", flush=True)
        start = time.perf_counter()
        new_rows, new_targets = benches[name]()
        print(f"{name} done in {time.perf_counter() - start:.1f} s", flush=True)
        label = placed_name(name, sizes[name]) if name in PLACED else name
        for item in new_rows + new_targets:
            item.workload = label
        rows += new_rows
        targets += new_targets
    used = {placed_name(name, cfg) if name in PLACED else name: cfg for name, cfg in sizes.items() if name in args.only}
    if "B2" in args.only and "B1" not in args.only:  # B2's fit is B1's, on the CPU
        used["B1"] = cpu_b1
    mode = "quick" if args.quick else ("custom" if args.set else "full")
    title = args.title or f"ppl_em benchmarks ({mode} sizes)"
    info["load_average_1min_after"] = report.machine()["load_average_1min"]
    info["gauge_after"] = report.gauge()
    if args.merge:
        title, info, used, rows, targets, command = report.merged(args.out, title, info, used, rows, targets, command)
    report.write(args.out, title, info, used, rows, targets, command)
    return rows, targets


def set_threads(threads: Optional[int]) -> None:
    """The same thread count for torch (ppl_em, pomegranate, SVI) and for numpy's BLAS (scikit-learn, hmmlearn).

    Call it after the peers are imported: importing pomegranate (numba) resets torch's thread count.
    """
    if threads is None:
        return
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    threadpool_limits(limits=threads)  # not used as a context manager: the limit holds for the whole run


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args.child, json.loads(args.child_config), args.threads)
        return 0
    for library in wl.LIBRARY_MODULES:
        wl.available(library)  # import every installed peer now, before set_threads
    set_threads(args.threads)
    command = "python -m benchmarks.run " + shlex.join(sys.argv[1:] if argv is None else argv)
    rows, targets = run(args, command.strip())
    print(f"wrote {args.out / 'results.md'} and {args.out / 'results.json'}")
    for t in targets:
        print(f"  [{'met' if t.met else 'NOT met' if t.met is False else '?'}] {t.workload} {t.target}: {t.measured}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
