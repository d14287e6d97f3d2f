"""Where one EM iteration's time goes: a profile of B1 and of B5's small fit, by phase.

Usage (from the repository root)::

    python -m benchmarks.profile                  # full sizes -> benchmarks/results/profile.md
    python -m benchmarks.profile --quick --out /tmp/profile   # seconds (the smoke test runs this)

For each workload (``ppl_em.models.gmm``, full covariances, float64, from the model file's start):

* the wall time of ``EM.step`` (median and spread of repeated steps: at B5's size, steps replayed by
  :mod:`ppl_em.fast.tape`), of its E-step half (``EM.summarize``) and of its M-step half
  (``EM.maximize``), called on their own (not replayed), measured without a profiler;
* per step, the process's user and system CPU seconds and its minor and major page faults
  (``getrusage``): a slow phase of a shared machine shows up as system time and faults;
* the self time of every function under cProfile, grouped by the layer it belongs to (Pyro's trace
  and messengers, the distributions, ppl_em's E-step, M-step, loop and fast layer, the model file);
  the time of torch's C functions is charged to the Python function that called them. cProfile adds
  a fixed cost per Python call, so it inflates the Python-heavy layers: read the shares, not the
  absolute milliseconds, and the unprofiled wall times above them. cProfile sees the calling thread
  alone, so the profiled steps run their blocks of rows in order (``Workspace.in_order``);
* for B1, steps with the blocks of rows side by side on torch's threads (``ppl_em.fast.Workspace.map``,
  the default) and in order (each operation on both threads), interleaved one by one: each median and
  the median of the pairs' ratios;
* for B1, the floating-point work of the two Gaussian GEMMs (E-step log-densities and M-step sums:
  4 n F k with F = d + d(d + 1)/2 packed features) against a DGEMM measured in the same process:
  the fraction of the arithmetic roof that an iteration reaches.

And a whole fit's fixed cost, by phase (B10's sweep: ``ppl_em.fit(gmm.model, x, k)`` for each k): the wall
time spent in each of the fit's one-time phases (the data's check, the initialisation, the M-step plan,
the chunking's split check, the step's recording and its check, the final log-likelihood) and in the
replayed steps, each phase's function timed wherever it is called from (wrapped for the run, then
restored), without a profiler.
"""

from __future__ import annotations

import argparse
import cProfile
import contextlib
import importlib
import pstats
import warnings
import resource
import statistics
import time
from pathlib import Path
from typing import Dict, List, Tuple

import pyro
import torch

import ppl_em
from ppl_em.models import gmm

from . import report, workloads as wl

ROOT = Path(__file__).resolve().parents[1]

FULL = {"B1": {"n": 1_000_000, "d": 10, "k": 16, "steps": 9, "profiled": 3},
        "B5-small": {"n": 1000, "d": 2, "k": 3, "steps": 301, "profiled": 300}}
QUICK = {"B1": {"n": 20_000, "d": 10, "k": 16, "steps": 5, "profiled": 2},
         "B5-small": {"n": 1000, "d": 2, "k": 3, "steps": 21, "profiled": 20}}
FIT_FULL = {"n": 5000, "d": 2, "k": 3, "ks": list(range(1, 11)), "tol": 1e-3, "max_iter": 100, "repeats": 3, "seed": 0}  # B10's
FIT_QUICK = {"n": 500, "d": 2, "k": 3, "ks": [1, 2, 3], "tol": 1e-3, "max_iter": 20, "repeats": 1, "seed": 0}

# A fit's phases: (what, module, attribute), each timed wherever it is called from. The steps' phases (the
# plan, the split check, the recording, its check, the replays) lie inside "EM.step"; "the rest" is the fit's
# wall time outside every row but the steps'.
FIT_PHASES: List[Tuple[str, str, str]] = [
    ("the data's check and a first look at the model", "ppl_em.fit", "_check_options"),
    ("initialisation (k-means++, the parameters' creation)", "ppl_em.fit", "initialise"),
    ("EM.step, all steps", "ppl_em.em", "EM.step"),
    ("  of which: the M-step plan and its check", "ppl_em.em", "EM._make_plan"),
    ("  of which: the chunking's split check", "ppl_em.chunking", "check_split"),
    ("  of which: the step's recording", "ppl_em.fast.tape", "StepTape._record"),
    ("  of which: the recording's check", "ppl_em.fast.tape", "StepTape._check"),
    ("  of which: replays (the check's among them)", "ppl_em.fast.tape", "_Tape.run"),
    ("the final log-likelihood", "ppl_em.fit", "exact_log_px"),
]

# (layer, what it does): the first layer whose path fragment is in a function's file name takes it
LAYERS: List[Tuple[str, str, Tuple[str, ...]]] = [
    ("model file", "the user's Pyro program", ("/models/",)),
    ("distributions", "construction, validation, log_prob", ("torch/distributions/", "pyro/distributions/")),
    ("Pyro", "trace, messengers, plates, enumeration", ("pyro/",)),
    ("ppl_em step tape", "a whole closed-form step replayed (its torch calls)", ("ppl_em/fast/tape.py",)),
    ("ppl_em fast/", "GEMM log-densities, packed features, posterior tables", ("ppl_em/fast/",)),
    ("ppl_em E-step", "enumeration, contraction, probe gradients", ("ppl_em/posterior.py", "ppl_em/chains.py")),
    ("ppl_em M-step", "statistics, scatter, closed forms",
     ("ppl_em/closed_form.py", "ppl_em/families.py", "ppl_em/statistics.py", "ppl_em/selection.py",
      "ppl_em/priors.py")),
    ("ppl_em loop", "step, chunks, plan, checks", ("ppl_em/",)),
    ("torch (Python)", "autograd and tensor methods written in Python", ("torch/",)),
]


def _layer(filename: str) -> str:
    path = filename.replace("\\", "/")
    for name, _, fragments in LAYERS:
        if any(fragment in path for fragment in fragments):
            return name
    return "other"


def layers(profile: pstats.Stats) -> Dict[str, float]:
    """Self seconds by layer; a C function's time (file name ``~``) goes to its callers, in
    proportion to the time it spent on each caller's calls."""
    totals: Dict[str, float] = {}
    for (filename, _, _), (_, _, self_time, _, callers) in profile.stats.items():
        if filename != "~":
            totals[_layer(filename)] = totals.get(_layer(filename), 0.0) + self_time
            continue
        spent = {caller: edge[2] for caller, edge in callers.items()}
        share = sum(spent.values())
        for caller, seconds in spent.items():
            part = self_time * seconds / share if share > 0 else self_time / len(spent)
            totals[_layer(caller[0])] = totals.get(_layer(caller[0]), 0.0) + part
        if not callers:
            totals["other"] = totals.get("other", 0.0) + self_time
    return totals


def _usage() -> Tuple[float, float, int, int]:
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime, use.ru_stime, use.ru_minflt, use.ru_majflt


def _timed(fn, count: int) -> Tuple[List[float], Tuple[float, ...]]:
    """Wall seconds of ``count`` calls, and user s, system s, minor and major faults per call."""
    times = []
    before = _usage()
    for _ in range(count):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    after = _usage()
    return times, tuple((b - a) / count for a, b in zip(before, after))


def profile_workload(name: str, cfg: dict) -> dict:
    """Time and profile ``EM.step`` on a GMM of ``cfg``'s size (n, d, k); see the module docstring."""
    n, d, k = cfg["n"], cfg["d"], cfg["k"]
    x = torch.from_numpy(wl.gmm_data(n, d, k))
    init = {key: torch.as_tensor(value) for key, value in wl.gmm_init(x.numpy(), k).items()}
    pyro.clear_param_store()
    em = ppl_em.EM(gmm.model, reg_covar=wl.REG_COVAR)
    em.step(x, k, init)  # the plan
    steps, usage = _timed(lambda: em.step(x, k, init), cfg["steps"])
    halves = [], []
    for _ in range(max(3, cfg["steps"] // 3)):
        start = time.perf_counter()
        stats = em.summarize(x, k, init)
        middle = time.perf_counter()
        em.maximize(stats)
        halves[0].append(middle - start)
        halves[1].append(time.perf_counter() - middle)
    if name == "B1":
        pairs = []
        for _ in range(cfg["steps"]):
            with em._workspace.in_order():
                in_order = _timed(lambda: em.step(x, k, init), 1)[0][0]
            pairs.append((in_order, _timed(lambda: em.step(x, k, init), 1)[0][0]))
    profiler = cProfile.Profile()
    with em._workspace.in_order():  # cProfile sees this thread alone
        profiler.enable()
        for _ in range(cfg["profiled"]):
            em.step(x, k, init)
        profiler.disable()
    by_layer = layers(pstats.Stats(profiler))
    total = sum(by_layer.values())
    result = {
        "size": f"n={n} d={d} k={k}, float64, full covariances",
        "step_median_s": statistics.median(steps), "step_min_s": min(steps), "step_max_s": max(steps),
        "e_step_median_s": statistics.median(halves[0]), "m_step_median_s": statistics.median(halves[1]),
        "user_s": usage[0], "sys_s": usage[1], "minor_faults": usage[2], "major_faults": usage[3],
        "layers": {layer: seconds / total for layer, seconds in sorted(by_layer.items(), key=lambda kv: -kv[1])},
        "profiled_ms_per_step": total / cfg["profiled"] * 1e3,
    }
    if name == "B1":
        features = d + d * (d + 1) // 2
        roof = report.dgemm_gflops()
        result.update(gemm_gflop=4 * n * features * k / 1e9, roof_gflops=roof)
        result["roof_fraction"] = result["gemm_gflop"] / roof / result["step_median_s"]
        result.update(side_median_s=statistics.median(b for _, b in pairs), order_median_s=statistics.median(a for a, _ in pairs),
                      side_gain=statistics.median(a / b for a, b in pairs), side_gains=[a / b for a, b in pairs])
    return result


@contextlib.contextmanager
def _timing(phases: List[Tuple[str, str, str]], spent: Dict[str, float], calls: Dict[str, int]):
    """Each phase's function wrapped to add its wall seconds to ``spent`` (and its calls to ``calls``) for the
    block; the originals restored after it, whatever happens."""
    undo = []
    for label, module_name, attribute in phases:
        owner = importlib.import_module(module_name)
        *path, name = attribute.split(".")
        for part in path:
            owner = getattr(owner, part)
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)

        def timed(*args, _original=original, _label=label, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                spent[_label] = spent.get(_label, 0.0) + time.perf_counter() - start
                calls[_label] = calls.get(_label, 0) + 1

        setattr(owner, name, timed)
        undo.append((owner, name, original))
    try:
        yield
    finally:
        for owner, name, original in reversed(undo):
            setattr(owner, name, original)


def profile_fits(cfg: dict) -> dict:
    """A sweep of whole fits (one per k, as B10's), timed by phase (see the module docstring): ms per fit."""
    x = torch.from_numpy(wl.gmm_data(cfg["n"], cfg["d"], cfg["k"], seed=cfg["seed"]))  # B10's data: k clusters

    def sweep() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ppl_em.ConvergenceWarning)
            for k in cfg["ks"]:
                ppl_em.fit(gmm.model, x, k, tol=cfg["tol"], max_iter=cfg["max_iter"], progress=False,
                           em_options={"reg_covar": wl.REG_COVAR})

    sweep()  # first calls, imports
    runs = []
    for _ in range(cfg["repeats"]):
        spent: Dict[str, float] = {}
        calls: Dict[str, int] = {}
        with _timing(FIT_PHASES, spent, calls):
            start = time.perf_counter()
            sweep()
            total = time.perf_counter() - start
        runs.append((total, spent, calls))
    total, spent, calls = sorted(runs, key=lambda run: run[0])[len(runs) // 2]  # the median sweep
    fits = len(cfg["ks"])
    outside = total - sum(seconds for label, seconds in spent.items() if not label.startswith(" "))
    return {"size": f"n={cfg['n']} d={cfg['d']}, k in {cfg['ks'][0]}..{cfg['ks'][-1]}, one fit each, tol {cfg['tol']:g}",
            "fit_ms": total / fits * 1e3,
            "phases": [(label, spent.get(label, 0.0) / fits * 1e3, calls.get(label, 0) / fits, spent.get(label, 0.0) / total)
                       for label, _, _ in FIT_PHASES] + [("the rest of fit", outside / fits * 1e3, 1.0, outside / total)]}


def markdown(results: Dict[str, dict], info: dict, fits: dict = None) -> str:
    lines = ["# Where an EM iteration's time goes", "",
             "Command: `python -m benchmarks.profile` (see its docstring for what is measured and how).", "",
             "## Machine", ""]
    lines += [f"- {key}: {value}" for key, value in info.items()]
    for name, r in results.items():
        lines += ["", f"## {name}: {r['size']}", "",
                  f"- EM.step: median {r['step_median_s'] * 1e3:.3g} ms (min {r['step_min_s'] * 1e3:.3g}, "
                  f"max {r['step_max_s'] * 1e3:.3g}); E-step (summarize) {r['e_step_median_s'] * 1e3:.3g} ms, "
                  f"M-step (maximize) {r['m_step_median_s'] * 1e3:.3g} ms",
                  f"- per step: user {r['user_s'] * 1e3:.3g} ms, system {r['sys_s'] * 1e3:.3g} ms of CPU; "
                  f"{r['minor_faults']:.0f} minor and {r['major_faults']:.0f} major page faults"]
        if "roof_fraction" in r:
            lines.append(f"- GEMM work {r['gemm_gflop']:.3g} GFLOP per step; DGEMM roof {r['roof_gflops']:.3g} GFLOP/s "
                         f"in this process: the step reaches {100 * r['roof_fraction']:.2g}% of the roof")
        if "side_gain" in r:
            lines.append(f"- blocks of rows side by side on torch's threads (the default) against in order, "
                         f"{len(r['side_gains'])} interleaved pairs of steps: median {r['side_median_s'] * 1e3:.3g} ms "
                         f"against {r['order_median_s'] * 1e3:.3g} ms, {r['side_gain']:.2f}x faster (pairs: "
                         f"{', '.join(f'{g:.2f}' for g in r['side_gains'])})")
        lines += ["", f"Self time by layer under cProfile ({r['profiled_ms_per_step']:.3g} ms per profiled step, "
                      "blocks in order):", "",
                  "| layer | what | share |", "|---|---|---|"]
        what = {layer: text for layer, text, _ in LAYERS}
        lines += [f"| {layer} | {what.get(layer, '')} | {100 * share:.1f}% |" for layer, share in r["layers"].items()]
    if fits is not None:
        lines += ["", f"## A whole fit's fixed cost, by phase: {fits['size']}", "",
                  f"- a fit (`ppl_em.fit(gmm.model, x, k)`): {fits['fit_ms']:.3g} ms on average over the sweep (its median run)",
                  "", "| phase | ms per fit | calls per fit | share of the fit |", "|---|---|---|---|"]
        lines += [f"| {label.strip()} | {ms:.3g} | {count:.3g} | "
                  f"{100 * share:.0f}% |" for label, ms, count, share in fits["phases"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="directory for profile.md")
    args = parser.parse_args(argv)
    results = {name: profile_workload(name, cfg) for name, cfg in (QUICK if args.quick else FULL).items()}
    fits = profile_fits(FIT_QUICK if args.quick else FIT_FULL)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(results, {**report.machine(), "gauge": report.gauge()}, fits)
    partial = out / "profile.md.partial"
    partial.write_text(text)
    partial.replace(out / "profile.md")  # never a half file
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
