"""Rows, targets, the machine description, and the two output files (results.md, results.json)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np


@dataclass
class Row:
    """One library on one workload.

    ``seconds`` is the time that is compared across libraries (``timed``: "s / iter" or
    "s to optimum"); ``ratio`` = ppl_em's seconds / this row's seconds and ``speedup`` =
    this row's seconds / ppl_em's (> 1: ppl_em is faster). Log-likelihoods are per point.
    """

    workload: str
    library: str
    size: str
    sec_per_iter: Optional[float] = None
    seconds: Optional[float] = None
    timed: str = "s / iter"
    ratio: Optional[float] = None
    speedup: Optional[float] = None
    peak_mb: Optional[float] = None
    extra_mb: Optional[float] = None
    final_ll: Optional[float] = None
    target: str = ""
    met: Optional[bool] = None
    note: str = ""
    trajectory: List[float] = field(default_factory=list)
    times: List[float] = field(default_factory=list)
    usage: Dict[str, float] = field(default_factory=dict)  # CPU user/system s and page faults per iteration


@dataclass
class Target:
    """A workload's goal, what was measured, and whether it was met (None: could not be measured)."""

    workload: str
    target: str
    measured: str
    met: Optional[bool]
    source: str = "issue"  # "issue": the goal the project set; "ours": a sanity bar the harness adds


COLUMNS = ["workload", "library", "size", "s / iter", "timed", "ppl_em / peer", "speed-up (peer / ppl_em)",
           "peak RSS MB", "extra MB", "final log-lik / point", "target", "met?", "note"]
TARGET_COLUMNS = ["workload", "target", "measured", "met?", "source"]


def machine() -> Dict[str, object]:
    """Platform, CPU count, threads, library versions and the date: what the ratios were measured on."""
    import pyro
    import torch

    info: Dict[str, object] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "blas_threads": _blas_threads(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "numpy": np.__version__,
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    for name, module in (("scikit-learn", "sklearn"), ("hmmlearn", "hmmlearn"), ("pomegranate", "pomegranate")):
        try:
            info[name] = __import__(module).__version__
        except ImportError:
            info[name] = "not installed"
    return info


def dgemm_gflops(size: int = 2048, repeats: int = 3) -> float:
    """The arithmetic roof: the best of ``repeats`` float64 (size x size) @ (size x size) products."""
    import torch

    a = torch.randn(size, size, dtype=torch.float64)
    b = torch.randn(size, size, dtype=torch.float64)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


def gauge() -> Dict[str, float]:
    """How fast the machine is now, to read the ratios of runs made in different phases of a shared
    machine: the float64 DGEMM rate (arithmetic, what B1 pays) and the time of one small torch and one
    small numpy operation called from Python (dispatch, what small fits pay per call), each the median
    of 5 batches of 2000 calls."""
    import torch

    def per_call(fn, *args) -> float:
        batches = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(2000):
                fn(*args)
            batches.append((time.perf_counter() - start) / 2000)
        return statistics.median(batches) * 1e6

    t, a = torch.ones(3, dtype=torch.float64), np.ones(3)
    return {"dgemm_gflops": round(dgemm_gflops(), 1), "torch_add_us": round(per_call(torch.add, t, t), 2),
            "numpy_add_us": round(per_call(np.add, a, a), 2)}


def _blas_threads() -> Optional[int]:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    counts = [pool["num_threads"] for pool in threadpool_info() if pool.get("user_api") == "blas"]
    return max(counts) if counts else None


def _fmt(value, kind: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        if kind == "ll":
            return f"{value:.6f}"
        if kind == "mb":
            return f"{value:.0f}"
        return f"{value:.3g}"
    return str(value).replace("|", "\\|")


def _row_cells(row: Row) -> List[str]:
    return [row.workload, row.library, row.size, _fmt(row.sec_per_iter), row.timed if row.seconds is not None
            else "—", _fmt(row.ratio), _fmt(row.speedup), _fmt(row.peak_mb, "mb"), _fmt(row.extra_mb, "mb"),
            _fmt(row.final_ll, "ll"), _fmt(row.target), _fmt(row.met) if row.target else "", _fmt(row.note)]


def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cells) + " |" for cells in rows]


def markdown(title: str, info: Dict[str, object], sizes: Dict[str, dict], rows: List[Row],
             targets: List[Target], command: str) -> str:
    """The results.md text: machine, sizes, the side-by-side table, the targets table."""
    out = [f"# {title}", "", f"Command: `{command}`", "",
           "Ratios, not absolute times, are the result: both sides ran in the same process, from the "
           "same initial parameters, one after the other. `ppl_em / peer` < 1 and speed-up > 1 mean "
           "ppl_em is faster. Peak memory: a fresh subprocess per (workload, library); `extra MB` is peak RSS "
           "minus the RSS after imports and data loading.", "", "## Machine", ""]
    out += [f"- {key}: {value}" for key, value in info.items()]
    out += ["", "## Sizes", ""] + [f"- {name}: {json.dumps(cfg)}" for name, cfg in sizes.items()]
    out += ["", "## Results", ""] + _table(COLUMNS, [_row_cells(r) for r in rows])
    target_cells = [[t.workload, _fmt(t.target), _fmt(t.measured), _fmt(t.met), t.source] for t in targets]
    out += ["", "## Targets", ""] + _table(TARGET_COLUMNS, target_cells) + [""]
    return "\n".join(out)


def merged(out_dir: Path, title: str, info: Dict[str, object], sizes: Dict[str, dict], rows: List[Row],
           targets: List[Target], command: str):
    """This run's rows and targets with the recorded ones (``out_dir/results.json``) of the workloads it did
    not run: the recorded title, machine and sizes stay, this run's machine is added under its workloads."""
    path = out_dir / "results.json"
    if not path.exists():
        return title, info, sizes, rows, targets, command
    old = json.loads(path.read_text())
    ran = {r.workload for r in rows} | {t.workload for t in targets}
    kept_rows = [Row(**r) for r in old["rows"] if r["workload"] not in ran]
    kept_targets = [Target(**t) for t in old["targets"] if t["workload"] not in ran]
    machine = dict(old["machine"])
    machine[f"run of {', '.join(sorted(ran))}"] = {k: info[k] for k in ("date", "load_average_1min", "load_average_1min_after",
                                                                          "gauge_before", "gauge_after") if k in info}
    order = lambda item: item.workload
    return (old["title"], machine, {**old["sizes"], **sizes}, sorted(kept_rows + rows, key=order),
            sorted(kept_targets + targets, key=order), f"{old['command']}; then {command}")


def write(out_dir: Path, title: str, info: Dict[str, object], sizes: Dict[str, dict], rows: List[Row],
          targets: List[Target], command: str) -> None:
    """Write ``results.md`` and ``results.json`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"title": title, "command": command, "machine": info, "sizes": sizes,
               "columns": COLUMNS, "rows": [asdict(r) for r in rows], "targets": [asdict(t) for t in targets]}
    texts = {"results.md": markdown(title, info, sizes, rows, targets, command),
             "results.json": json.dumps(payload, indent=1, default=float) + "\n"}
    for name, text in texts.items():  # each file whole or not at all: written aside, then renamed
        partial = out_dir / (name + ".partial")
        partial.write_text(text)
        partial.replace(out_dir / name)
