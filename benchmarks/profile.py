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
  absolute milliseconds, and the unprofiled wall times above them;
* for B1, the floating-point work of the two Gaussian GEMMs (E-step log-densities and M-step sums:
  4 n F k with F = d + d(d + 1)/2 packed features) against a DGEMM measured in the same process:
  the fraction of the arithmetic roof that an iteration reaches.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
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
    profiler = cProfile.Profile()
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
    return result


def markdown(results: Dict[str, dict], info: dict) -> str:
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
                         f"in this process: the step reaches {100 * r['roof_fraction']:.0f}% of the roof")
        lines += ["", f"Self time by layer under cProfile ({r['profiled_ms_per_step']:.3g} ms per profiled step):", "",
                  "| layer | what | share |", "|---|---|---|"]
        what = {layer: text for layer, text, _ in LAYERS}
        lines += [f"| {layer} | {what.get(layer, '')} | {100 * share:.1f}% |" for layer, share in r["layers"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="directory for profile.md")
    args = parser.parse_args(argv)
    results = {name: profile_workload(name, cfg) for name, cfg in (QUICK if args.quick else FULL).items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(results, {**report.machine(), "gauge": report.gauge()})
    partial = out / "profile.md.partial"
    partial.write_text(text)
    partial.replace(out / "profile.md")  # never a half file
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
