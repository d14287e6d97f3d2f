"""Benchmarks of EM beyond one process's memory: B7 (disk vs memory), B8 (online vs batch EM), B9 (processes).

B7  A GMM on a .npy file of several GB (written to a temporary folder, deleted after): seconds per EM
    iteration and peak *anonymous* memory (RssAnon of /proc/self/status, sampled every ms) of EM on
    its memory map (``ppl_em.Rows``) against EM on the same data loaded into memory; a fresh process
    each. A memory map's resident pages are page cache the kernel can drop: they count in RSS and in
    ``ru_maxrss`` but not in RssAnon. The file was just written, so its pages are mostly cached: the
    figure is the cost of streaming, not of the disk.
B8  Stepwise EM (ppl_em.OnlineEM, batches of 1e4 rows) against batch EM, by passes over the data: log p(x)
    per point after 1, 2 and 5 passes against batch EM after 1, 2, 5, 10 and 20 iterations and at its
    optimum (batch EM to convergence), with wall times; on an overlapping 5-component 2-D GMM and on a
    mixture of Poisson counts, n = 1e6 each.
B9  Data-parallel EM (``EM(model, distributed=True)``, gloo on this machine's loopback, launched by
    ``torch.distributed.run``) with 1 and 2 processes on B1's GMM: seconds per step, and per step the
    bytes and seconds of the statistics' all-reduce against the E-step's seconds.

Each ``bench_b7``/``bench_b8``/``bench_b9`` returns (rows, targets) for :mod:`benchmarks.report`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from .report import Row, Target

ROOT = Path(__file__).resolve().parents[1]
SEED = 0

FULL = {
    "B7": {"n": 40_000_000, "d": 10, "k": 8, "iters": 3, "rounds": 2, "batch_rows": None, "device": "cpu",
           "dtype": "float64"},
    "B8": {"n": 1_000_000, "batch": 10_000, "passes": [1, 2, 5], "iters": [1, 2, 5, 10, 20], "max_iters": 1000,
           "tol": 1e-9, "poisson_d": 4, "k": 5},
    "B9": {"n": 1_000_000, "d": 10, "k": 16, "iters": 5, "processes": [1, 2], "threads": [1, 2]},
}
QUICK = {
    "B7": {"n": 20_000, "d": 3, "k": 2, "iters": 2, "rounds": 1, "batch_rows": 3000, "device": "cpu",
           "dtype": "float64"},
    "B8": {"n": 6000, "batch": 500, "passes": [1, 2], "iters": [1, 2, 5], "max_iters": 300, "tol": 1e-9,
           "poisson_d": 2, "k": 3},
    "B9": {"n": 4000, "d": 2, "k": 2, "iters": 2, "processes": [2], "threads": [1]},
}


# -- memory -------------------------------------------------------------------------------------------
class AnonymousPeak:
    """Peak RssAnon (MB) of this process while the block runs, sampled every millisecond."""

    def __enter__(self) -> "AnonymousPeak":
        self.peak, self._stop = rss_anon_mb(), False
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop = True
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, rss_anon_mb())
            time.sleep(0.001)


def rss_anon_mb() -> float:
    """Anonymous resident memory of this process (MB): heap and anonymous maps, not file-backed pages."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 1024


# -- B7: disk vs memory ---------------------------------------------------------------------------------
def write_gmm_file(path: Path, n: int, d: int, k: int, block: int = 1_000_000) -> None:
    """x^(i) ~ sum_j phi_j N(mu_j, Sigma_j) written block by block (never whole in memory) as a .npy file."""
    rng = np.random.default_rng(SEED)
    phi = rng.dirichlet(np.full(k, 5.0))
    mu = rng.normal(scale=3.0, size=(k, d))
    b = rng.normal(size=(k, d, d)) / np.sqrt(d)
    chol = np.linalg.cholesky(b @ b.transpose(0, 2, 1) + 0.3 * np.eye(d))
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float64, shape=(n, d))
    for start in range(0, n, block):
        m = min(block, n - start)
        z = rng.choice(k, size=m, p=phi)
        e = rng.standard_normal((m, d))
        out[start:start + m] = mu[z] + np.einsum("iab,ib->ia", chol[z], e)
    out.flush()
    del out


def b7_child(path: str, mode: str, cfg: dict) -> dict:
    """In a fresh process: EM on the file (``mode`` "disk": its memory map; "memory": loaded), timed."""
    import pyro
    import torch

    import ppl_em
    from ppl_em.models import gmm

    k, iters = cfg["k"], cfg["iters"]
    device, dtype = cfg.get("device", "cpu"), getattr(torch, cfg.get("dtype", "float64"))
    mm = np.load(path, mmap_mode="r")
    init = {name: value.to(device=device, dtype=dtype) for name, value in _b7_init(mm, k).items()}
    tiny = torch.from_numpy(np.array(mm[:2000])).to(device=device, dtype=dtype)
    pyro.clear_param_store()
    ppl_em.EM(gmm.model).step(tiny, k, init)  # load lazily imported code before the baseline
    baseline = rss_anon_mb()
    with AnonymousPeak() as memory:  # the data on the device: the file's batches copied there one at a time
        data = ppl_em.Rows(mm, batch_size=cfg["batch_rows"], dtype=dtype, device=device) if mode == "disk" \
            else torch.from_numpy(np.load(path)).to(device=device, dtype=dtype)
        pyro.clear_param_store()
        em = ppl_em.EM(gmm.model)
        em.step(data, k, init)  # warm-up (the plan); on disk also the first read of the file
        pyro.clear_param_store()
        times, losses = [], []
        for _ in range(iters):
            start = time.perf_counter()
            losses.append(em.step(data, k, init))
            times.append(time.perf_counter() - start)
    return {"times": times, "losses": losses, "peak_mb": memory.peak, "baseline_mb": baseline,
            "batch_rows": data.batch_size if mode == "disk" else None}


def _b7_rounds(path: Path, cfg: dict, threads: Optional[int]) -> Dict[str, dict]:
    """Fresh processes in turn, memory, disk, memory, disk, ...: a burst of load on a shared machine hits both
    modes alike. Times are pooled; the peak is the largest of a mode's rounds."""
    runs: Dict[str, dict] = {}
    for _ in range(cfg["rounds"]):
        for mode in ("memory", "disk"):
            run = _run_child("b7", [str(path), mode, json.dumps(cfg)], threads)
            if mode not in runs:
                runs[mode] = run
                continue
            runs[mode]["times"] += run["times"]
            runs[mode]["peak_mb"] = max(runs[mode]["peak_mb"], run["peak_mb"])
            runs[mode]["baseline_mb"] = min(runs[mode]["baseline_mb"], run["baseline_mb"])
    return runs


def _b7_init(mm: np.ndarray, k: int) -> dict:
    import torch

    head = torch.from_numpy(np.array(mm[:10_000]))
    d = head.shape[1]
    cov = torch.cov(head.T) + 1e-6 * torch.eye(d, dtype=head.dtype)
    return {"phi": torch.full((k,), 1.0 / k, dtype=head.dtype), "mu": head[:k].clone(),
            "Sigma": cov.expand(k, d, d).clone()}


def bench_b7(cfg: dict, threads: Optional[int] = None) -> Tuple[List[Row], List[Target]]:
    n, d = cfg["n"], cfg["d"]
    folder = Path(tempfile.mkdtemp(prefix="ppl_em_b7_"))
    try:
        path = folder / "x.npy"
        print(f"  B7 writing {n * d * 8 / 2**30:.2f} GB to a temporary file ...", flush=True)
        write_gmm_file(path, n, d, cfg["k"])
        runs = _b7_rounds(path, cfg, threads)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    size = f"n={n} d={d} k={cfg['k']} ({n * d * 8 / 2**30:.2f} GB float64), {cfg['rounds']} x {cfg['iters']} iters"
    if (cfg.get("device", "cpu"), cfg.get("dtype", "float64")) != ("cpu", "float64"):
        size += f" (ppl_em on {cfg.get('device', 'cpu')}, {cfg.get('dtype', 'float64')})"
    rows = []
    for mode, label in (("memory", "ppl_em, data in memory"), ("disk", "ppl_em, memory map (Rows)")):
        run = runs[mode]
        per_iter = sum(run["times"]) / len(run["times"])
        note = (f"fastest iteration {min(run['times']):.3g} s, slowest {max(run['times']):.3g} s; peak / extra MB: "
                "anonymous memory (RssAnon)")
        if run["batch_rows"]:
            note += f"; batches of {run['batch_rows']} rows"
        rows.append(Row("B7", label, size, sec_per_iter=per_iter, seconds=per_iter, peak_mb=run["peak_mb"],
                        extra_mb=run["peak_mb"] - run["baseline_mb"], note=note, times=run["times"],
                        trajectory=[-v / n for v in run["losses"]]))
    memory, disk = rows
    disk.ratio, disk.speedup = memory.seconds / disk.seconds, disk.seconds / memory.seconds
    data_mb = n * d * 8 / 2**20
    deviation = max(abs(a - b) / abs(b) for a, b in zip(disk.trajectory, memory.trajectory))
    agree = 1e-5 if cfg.get("dtype") == "float32" else 1e-10  # float32's sums in other batches round otherwise
    disk.target, disk.met = "extra anonymous MB < data MB / 8", disk.extra_mb < data_mb / 8
    fastest = min(disk.times) / min(memory.times)  # on a shared machine the fastest iteration is the least disturbed
    targets = [Target("B7", "EM on a memory map: extra anonymous memory O(batch), < 1/8 of the data",
                      f"{disk.extra_mb:.0f} MB for {data_mb:.0f} MB of data (in memory: {memory.extra_mb:.0f} MB)",
                      disk.met),
               Target("B7", f"memory map: the same log-likelihood trajectory as in memory (relative deviation "
                      f"<= {agree:g})", f"{deviation:.1e}", deviation <= agree),
               Target("B7", "memory map: fastest iteration <= 1.5 x in memory's", f"{fastest:.2f} x (means: "
                      f"{disk.speedup:.2f} x)", fastest <= 1.5, "ours")]
    return rows, targets


# -- B8: online vs batch EM ------------------------------------------------------------------------------
def b8_problems(cfg: dict):
    """(name, model, x, k, init) for an overlapping 2-D GMM and a mixture of Poisson counts."""
    import torch

    from ppl_em.models import gmm, poisson_mixture

    D = torch.float64
    k, n = cfg["k"], cfg["n"]
    g = torch.Generator().manual_seed(SEED)
    angles = torch.arange(k, dtype=D) * 2 * torch.pi / k
    mu = 2.0 * torch.stack([angles.cos(), angles.sin()], -1)  # on a circle of radius 2: overlapping
    Sigma = torch.eye(2, dtype=D).expand(k, 2, 2) * (0.5 + torch.rand(k, 1, 1, generator=g, dtype=D))
    x, _ = gmm.generate(n, torch.full((k,), 1.0 / k, dtype=D), mu, Sigma.contiguous(), seed=SEED)
    gmm_init = gmm.init_params(x, k, seed=SEED)
    rate = 1.0 + 9.0 * torch.rand(k, cfg["poisson_d"], generator=g, dtype=D)
    counts, _ = poisson_mixture.generate(n, torch.full((k,), 1.0 / k, dtype=D), rate, seed=SEED)
    return [("GMM (2-D, 5 overlapping components)" if k == 5 else f"GMM (2-D, k={k})", gmm.model, x, k, gmm_init),
            (f"Poisson mixture (d={cfg['poisson_d']})", poisson_mixture.model, counts, k,
             poisson_mixture.init_params(counts, k, seed=SEED))]


def _b8_batch(model, x, k, init, cfg) -> Tuple[List[float], List[float]]:
    """Batch EM from ``init``: log p(x) / n before each iteration (the trajectory) and cumulative seconds."""
    import pyro

    import ppl_em

    pyro.clear_param_store()
    em = ppl_em.EM(model)
    em.step(x, k, init)  # warm-up: the plan
    pyro.clear_param_store()
    lls, clock, elapsed = [], [], 0.0
    while len(lls) < cfg["max_iters"] and not (len(lls) > 1 and lls[-1] - lls[-2] < cfg["tol"]):
        start = time.perf_counter()
        lls.append(-em.step(x, k, init) / len(x))
        elapsed += time.perf_counter() - start
        clock.append(elapsed)
    lls.append(em.log_likelihood(x, k, init) / len(x))  # after the last iteration
    return lls, clock


def _b8_online(model, x, k, init, cfg, average: bool) -> Dict[int, Tuple[float, float]]:
    """Stepwise EM: log p(x) / n and cumulative seconds after each pass in cfg["passes"]."""
    import pyro

    import ppl_em

    pyro.clear_param_store()
    online = ppl_em.OnlineEM(model, batch_size=cfg["batch"], n=len(x), average=len(x) // cfg["batch"] if average
                             else False)
    out, elapsed = {}, 0.0
    for p in range(1, max(cfg["passes"]) + 1):
        start = time.perf_counter()
        online.step(x, k, init)
        elapsed += time.perf_counter() - start
        if p in cfg["passes"]:
            with pyro.get_param_store().scope(_store_copy()):
                online.finish()
                out[p] = (ppl_em.EM(model).log_likelihood(x, k, init) / len(x), elapsed)
    return out


def _store_copy():
    from ppl_em.store import capture_store

    return capture_store()


def bench_b8(cfg: dict) -> Tuple[List[Row], List[Target]]:
    rows, targets = [], []
    for name, model, x, k, init in b8_problems(cfg):
        size = f"{name}, n={len(x)}, k={k}, batches of {cfg['batch']}"
        print(f"  B8 {name}: batch EM to its optimum ...", flush=True)
        lls, clock = _b8_batch(model, x, k, init, cfg)
        optimum = max(lls)
        for it in cfg["iters"]:
            if it < len(lls):  # lls[it]: after `it` iterations
                rows.append(_b8_row(size, f"batch EM, {it} iter{'s' if it > 1 else ''}", lls[it], clock[it - 1], optimum))
        rows.append(_b8_row(size, f"batch EM, optimum ({len(lls) - 1} iters)", optimum, clock[-1], optimum))
        for average in (False, True):
            print(f"  B8 {name}: online EM{' + averaging' if average else ''} ...", flush=True)
            for p, (ll, seconds) in _b8_online(model, x, k, init, cfg, average).items():
                if average and p == 1:
                    continue  # averaging starts with the second pass
                label = f"online EM{' + averaging' if average else ''}, {p} pass{'es' if p > 1 else ''}"
                rows.append(_b8_row(size, label, ll, seconds, optimum))
        online_two = next(r for r in rows[::-1] if r.library == "online EM, 2 passes")
        batch_two = next((r for r in rows if r.size == size and r.library == "batch EM, 2 iters"), None)
        if batch_two is not None:
            gap_online, gap_batch = optimum - online_two.final_ll, optimum - batch_two.final_ll
            targets.append(Target("B8", f"{name}: online EM after 2 passes closer to the optimum than batch EM after "
                                  "2 iterations", f"{gap_online:.2e} vs {gap_batch:.2e} nats/point",
                                  gap_online < gap_batch))
    return rows, targets


def _b8_row(size: str, label: str, ll: float, seconds: float, optimum: float) -> Row:
    return Row("B8", label, size, seconds=seconds, timed="s (wall)", final_ll=ll,
               note=f"{optimum - ll:.2e} nats/point below the optimum; {seconds:.3g} s wall")


# -- B9: processes ---------------------------------------------------------------------------------------
def b9_worker(cfg: dict, out: str) -> None:
    """One rank (under torch.distributed.run): EM steps on its shard, timing the E-step and the all-reduce."""
    from datetime import timedelta

    import pyro
    import torch
    import torch.distributed as dist

    import ppl_em
    from ppl_em import distributed
    from ppl_em.models import gmm

    from . import workloads as wl

    dist.init_process_group("gloo", timeout=timedelta(seconds=600))
    rank, world = dist.get_rank(), dist.get_world_size()
    x = torch.from_numpy(wl.gmm_data(cfg["n"], cfg["d"], cfg["k"], seed=SEED))
    init = {k: torch.as_tensor(v) for k, v in wl.gmm_init(x.numpy(), cfg["k"], seed=SEED).items()}
    shard = x[distributed.shard(len(x))]
    timings = {"estep": [], "wait": [], "reduce": [], "bytes": []}
    _instrument(distributed, timings)
    em = ppl_em.EM(gmm.model, distributed=True)
    em.step(shard, cfg["k"], init)  # warm-up: plan, broadcasts
    pyro.clear_param_store()
    for v in timings.values():
        v.clear()
    times, losses = [], []
    for _ in range(cfg["iters"]):
        start = time.perf_counter()
        losses.append(em.step(shard, cfg["k"], init))
        times.append(time.perf_counter() - start)
    result = {"times": times, "losses": losses, **timings, "rows": len(shard), "world": world}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    os._exit(0)


def _instrument(distributed, timings: dict) -> None:
    """Time this rank's E-step (its statistics) and the all-reduce of the statistics, in place. A barrier
    before the all-reduce (here only) separates the wait for the slowest rank from the all-reduce itself."""
    import torch.distributed as dist

    local, reduce = distributed._local_statistics, distributed.all_reduce_statistics

    def timed_local(*args):
        start = time.perf_counter()
        stats = local(*args)
        timings["estep"].append(time.perf_counter() - start)
        return stats

    def timed_reduce(stats, what="all_reduce"):
        start = time.perf_counter()
        dist.barrier()
        timings["wait"].append(time.perf_counter() - start)
        start = time.perf_counter()
        out = reduce(stats, what)
        timings["reduce"].append(time.perf_counter() - start)
        timings["bytes"].append(8 * sum(v.numel() for k, v in stats.tensors().items() if not k.startswith("centre/")))
        return out

    distributed._local_statistics, distributed.all_reduce_statistics = timed_local, timed_reduce


def b9_alone(cfg: dict, threads: int) -> dict:
    """One process without torch.distributed, ``threads`` intra-op threads: s / step."""
    import pyro
    import torch

    import ppl_em
    from ppl_em.models import gmm

    from . import workloads as wl

    torch.set_num_threads(threads)
    x = torch.from_numpy(wl.gmm_data(cfg["n"], cfg["d"], cfg["k"], seed=SEED))
    init = {k: torch.as_tensor(v) for k, v in wl.gmm_init(x.numpy(), cfg["k"], seed=SEED).items()}
    pyro.clear_param_store()
    em = ppl_em.EM(gmm.model)
    em.step(x, cfg["k"], init)
    pyro.clear_param_store()
    times, losses = [], []
    for _ in range(cfg["iters"]):
        start = time.perf_counter()
        losses.append(em.step(x, cfg["k"], init))
        times.append(time.perf_counter() - start)
    return {"times": times, "losses": losses}


def bench_b9(cfg: dict) -> Tuple[List[Row], List[Target]]:
    size = f"n={cfg['n']} d={cfg['d']} k={cfg['k']}, {cfg['iters']} iters (B1's GMM), gloo on loopback"
    print(f"  B9 one process, {' and '.join(map(str, cfg['threads']))} thread(s) ...", flush=True)
    alone = {t: _run_child("b9-alone", [json.dumps(cfg), str(t)], None) for t in cfg["threads"]}
    rows = [Row("B9", f"1 process, {t} thread{'s' if t > 1 else ''}", size, sec_per_iter=_mean(r["times"]),
                seconds=_mean(r["times"]), trajectory=[-v / cfg["n"] for v in r["losses"]], times=r["times"],
                note="EM.step without torch.distributed") for t, r in alone.items()]
    ranks = {}
    for world in cfg["processes"]:
        print(f"  B9 {world} process{'es' if world > 1 else ''} under torch.distributed.run ...", flush=True)
        ranks[world] = _run_ranks(cfg, world)
        first = ranks[world][0]
        estep, reduce, wait = _mean(first["estep"]), _mean(first["reduce"]), _mean(first["wait"])
        rows.append(Row("B9", f"{world} process{'es' if world > 1 else ''} x 1 thread, distributed=True", size,
                        sec_per_iter=_mean(first["times"]), seconds=_mean(first["times"]),
                        trajectory=[-v / cfg["n"] for v in first["losses"]], times=first["times"],
                        note=f"per step: E-step {estep:.3g} s on {first['rows']} rows, all-reduce of "
                             f"{first['bytes'][0]} bytes {reduce * 1e3:.3g} ms ({reduce / estep:.1e} of the E-step); "
                             f"rank 0 waited {wait * 1e3:.3g} ms for the other ranks first (a barrier, timed apart)"))
    one = next(r for r in rows if r.library == "1 process, 1 thread")
    for row in rows:
        if row is not one:
            row.ratio, row.speedup = one.seconds / row.seconds, row.seconds / one.seconds
    two = ranks.get(2)
    targets = []
    if two is not None:
        deviation = max(abs(a - b) / abs(b) for a, b in zip(two[0]["losses"], alone[1]["losses"]))
        same = two[0]["losses"] == two[1]["losses"]
        targets.append(Target("B9", "2 processes: the loss trajectory of one process (relative deviation <= 1e-10), "
                              "the same on both ranks", f"{deviation:.1e}; ranks equal: {same}",
                              deviation <= 1e-10 and same))
        share = _mean(two[0]["reduce"]) / _mean(two[0]["estep"])
        targets.append(Target("B9", "all-reduce time per step <= 1% of the E-step's", f"{share:.1e}", share <= 0.01,
                              "ours"))
    return rows, targets


def _run_ranks(cfg: dict, world: int) -> List[dict]:
    out = Path(tempfile.mkdtemp(prefix="ppl_em_b9_"))
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", "--nnodes=1",
                   "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "benchmarks.scaleout", "b9-worker",
                   json.dumps(cfg), str(out)]
        env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            raise RuntimeError(f"B9 with {world} processes failed: {done.stderr[-3000:]}")
        return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    finally:
        shutil.rmtree(out, ignore_errors=True)


# -- helpers -----------------------------------------------------------------------------------------
def _run_child(kind: str, args: List[str], threads: Optional[int]) -> dict:
    """``python -m benchmarks.scaleout KIND ARGS...`` in a fresh process; its last stdout line as JSON."""
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    done = subprocess.run([sys.executable, "-m", "benchmarks.scaleout", kind, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=7200)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} {args[:2]} failed: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _mean(values: List[float]) -> float:
    return sum(values) / len(values)


def main(argv: List[str]) -> int:
    kind, args = argv[0], argv[1:]
    if kind == "b7":
        print(json.dumps(b7_child(args[0], args[1], json.loads(args[2]))))
    elif kind == "b9-alone":
        print(json.dumps(b9_alone(json.loads(args[0]), int(args[1]))))
    elif kind == "b9-worker":
        b9_worker(json.loads(args[0]), args[1])
    else:
        raise SystemExit(f"unknown kind {kind!r}; expected b7, b9-alone or b9-worker")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
