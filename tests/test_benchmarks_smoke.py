"""Smoke test of the benchmark harness (``python -m benchmarks.run --quick``).

Runs the runner once, in a subprocess, on tiny sizes, and checks that it writes results.md and
results.json with the promised columns, and that what it recorded agrees with the oracles:
ppl_em's log-likelihood trajectory on B1 equals scikit-learn's (and on B3 hmmlearn's) to 1e-6
relative, EM's trajectory never decreases, and EM reaches B4's optimum. The full sizes are
not run here (see benchmarks/README.md).
"""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

COLUMNS = ["workload", "library", "size", "s / iter", "timed", "ppl_em / peer", "speed-up (peer / ppl_em)",
           "peak RSS MB", "extra MB", "final log-lik / point", "target", "met?", "note"]
ROW_KEYS = {"workload", "library", "size", "sec_per_iter", "seconds", "ratio", "speedup", "peak_mb",
            "extra_mb", "final_ll", "target", "met", "note", "trajectory"}
MACHINE_KEYS = {"date", "platform", "cpu_count", "torch_threads", "torch", "pyro", "scikit-learn", "hmmlearn"}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("benchmarks")
    # One thread: on a busy machine, torch's thread pool makes tiny fits ten times slower.
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--threads", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    data = json.loads((out / "results.json").read_text())
    rows = {(r["workload"], r["library"]): r for r in data["rows"]}
    return out, data, rows


def relative_deviation(a, b):
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def test_writes_markdown_and_json_with_expected_columns(results):
    out, data, rows = results
    markdown = (out / "results.md").read_text()
    assert "| " + " | ".join(COLUMNS) + " |" in markdown
    assert "| workload | target | measured | met? | source |" in markdown
    assert data["columns"] == COLUMNS
    assert MACHINE_KEYS <= set(data["machine"])
    assert {w for w, _ in rows} == {"B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B9", "B10", "B11", "B12", "B13",
                                    "B14"}
    assert all(ROW_KEYS <= set(row) for row in data["rows"])
    assert {t["workload"] for t in data["targets"]} == {"B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B9", "B11", "B12",
                                                        "B13", "B14"}
    assert all(t["met"] in (True, False) for t in data["targets"])


def _gmm_rows_follow_scikit_learn(data, rows, workload):
    """ppl_em's and scikit-learn's rows of a GMM workload: the same trajectory (1e-6), which never falls."""
    ours, peer = rows[workload, "ppl_em"], rows[workload, "scikit-learn"]
    assert len(ours["trajectory"]) == len(peer["trajectory"]) == data["sizes"][workload]["iters"]
    assert relative_deviation(ours["trajectory"] + [ours["final_ll"]], peer["trajectory"] + [peer["final_ll"]]) <= 1e-6
    # The EM guarantee: log p(x; theta) never decreases.
    assert all(b >= a - 1e-12 for a, b in zip(ours["trajectory"], ours["trajectory"][1:]))
    return ours, peer


def test_b1_trajectory_equals_scikit_learn(results):
    _, data, rows = results
    ours, peer = _gmm_rows_follow_scikit_learn(data, rows, "B1")
    # Interleaved runs: the speed-up is the median of each scikit-learn run's over the ppl_em runs either side.
    runs = [float(v) for v in peer["note"].split("speed-up per interleaved run ")[1].split(":")[0].split(", ")]
    assert len(runs) == data["sizes"]["B1"]["repeats"]
    assert ours["sec_per_iter"] > 0 and peer["speedup"] == pytest.approx(statistics.median(runs), rel=1e-2)
    assert peer["ratio"] == pytest.approx(1 / peer["speedup"]) and {"sys_s", "minor_faults"} <= set(peer["usage"])


def test_b13_diagonal_gmm_trajectory_equals_scikit_learns(results):
    _, data, rows = results
    ours, peer = _gmm_rows_follow_scikit_learn(data, rows, "B13")
    assert "diagonal" in ours["size"] and peer["speedup"] > 0


def test_b2_measures_peak_memory_in_subprocesses(results):
    _, _, rows = results
    for library in ("ppl_em", "scikit-learn"):
        row = rows["B2", library]
        assert row["peak_mb"] > 100 and 0 <= row["extra_mb"] <= row["peak_mb"]  # torch alone is > 100 MB


def test_b3_trajectory_equals_hmmlearn(results):
    _, _, rows = results
    ours, peer = rows["B3", "ppl_em"], rows["B3", "hmmlearn"]
    assert relative_deviation(ours["trajectory"] + [ours["final_ll"]], peer["trajectory"] + [peer["final_ll"]]) <= 1e-6


def test_b3_times_hard_em_against_exact_em_on_the_same_hmm(results):
    _, data, rows = results
    exact, hard = rows["B3", "ppl_em exact EM (reg_covar 1e-6)"], rows["B3", "ppl_em hard EM (Viterbi)"]
    assert exact["sec_per_iter"] > 0 and hard["sec_per_iter"] > 0 and "hard / exact per interleaved pair" in hard["note"]
    # hard EM's trajectory is its own objective, max_w log p(x, w) per point: it never decreases
    assert all(b >= a - 1e-9 for a, b in zip(hard["trajectory"], hard["trajectory"][1:]))
    assert hard["trajectory"][0] <= exact["trajectory"][0] + 1e-12  # max_w log p(x, w) <= log p(x)
    assert any(t["workload"] == "B3" and t["target"].startswith("hard EM") for t in data["targets"])


def test_b14_k_means_ends_where_scikit_learns_lloyd_ends_and_times_hard_against_exact_em(results):
    _, data, rows = results
    steps = {r["library"]: r for r in data["rows"] if r["workload"] == "B14" and r["timed"] == "s / iter"
             and r["size"].endswith("k-means")}
    ours, peer = steps["ppl_em"], steps["scikit-learn"]
    assert ours["final_ll"] == pytest.approx(peer["final_ll"], rel=1e-9)  # -J / n at the last centres
    assert ours["final_ll"] < 0 and peer["speedup"] > 0 and "n_iter_" in peer["note"]
    exact, hard = rows["B14", "ppl_em exact EM (GMM file)"], rows["B14", "ppl_em hard EM (GMM file)"]
    assert "hard / exact per interleaved pair" in hard["note"] and exact["sec_per_iter"] > 0
    assert all(b >= a - 1e-9 for a, b in zip(hard["trajectory"], hard["trajectory"][1:]))  # its own objective
    assert hard["trajectory"][0] <= exact["trajectory"][0] + 1e-12  # max_z log p(x, z) <= log p(x), same start
    assert any(t["workload"] == "B14" and t["target"].startswith("hard EM s / iter <=") for t in data["targets"])
    whole = [r for r in data["rows"] if r["workload"] == "B14" and r["timed"] == "s, all fits"]
    assert {r["library"] for r in whole} == {"ppl_em", "scikit-learn"} and len(whole) == 4  # one fit; a sweep over k
    for ours, peer in zip(whole[::2], whole[1::2]):  # each from its own seeding: -J / n of its own optimum
        assert ours["size"] == peer["size"] and ours["seconds"] > 0 and peer["speedup"] > 0
        assert ours["final_ll"] < 0 and peer["final_ll"] < 0


def test_b4_em_reaches_the_optimum_sooner_than_svi(results):
    _, data, rows = results
    em, svi = rows["B4", "ppl_em"], rows["B4", "Pyro SVI"]
    optimum = max(em["trajectory"] + [em["final_ll"]])
    assert em["seconds"] is not None and em["final_ll"] >= optimum - 1e-9
    assert all(b >= a - 1e-12 for a, b in zip(em["trajectory"], em["trajectory"][1:]))
    # SVI optimises the same log p(x) (its loss is -log p(x): every latent is enumerated);
    # it starts where EM starts.
    assert svi["trajectory"][0] == pytest.approx(em["trajectory"][0], rel=1e-9)
    tol = data["sizes"]["B4"]["tol"]
    reached = [i for i, v in enumerate(svi["trajectory"]) if v >= optimum - tol]
    assert svi["seconds"] is None or reached == [len(svi["trajectory"]) - 1]


def test_b7_memory_map_equals_memory_and_measures_anonymous_memory(results):
    _, _, rows = results
    memory, disk = rows["B7", "ppl_em, data in memory"], rows["B7", "ppl_em, memory map (Rows)"]
    assert relative_deviation(disk["trajectory"], memory["trajectory"]) <= 1e-10
    assert disk["sec_per_iter"] > 0 and memory["peak_mb"] > 0 and disk["extra_mb"] is not None


def test_b8_online_em_approaches_the_optimum_of_batch_em(results):
    _, data, _ = results
    b8 = [r for r in data["rows"] if r["workload"] == "B8"]
    for size in {r["size"] for r in b8}:
        here = {r["library"]: r["final_ll"] for r in b8 if r["size"] == size}
        optimum = next(v for k, v in here.items() if k.startswith("batch EM, optimum"))
        assert all(v <= optimum + 1e-9 for v in here.values())  # nothing beats the optimum of batch EM
        assert here["online EM, 2 passes"] > here["online EM, 1 pass"]


def test_b9_two_processes_equal_one(results):
    _, data, rows = results
    one, two = rows["B9", "1 process, 1 thread"], rows["B9", "2 processes x 1 thread, distributed=True"]
    assert relative_deviation(two["trajectory"], one["trajectory"]) <= 1e-10
    assert "all-reduce of" in two["note"]


def test_b10_times_whole_fits_and_counts_every_restart(results):
    _, data, _ = results
    b10 = [r for r in data["rows"] if r["workload"] == "B10"]
    assert {r["library"] for r in b10} == {"ppl_em", "scikit-learn"} and len(b10) == 4
    for row in b10:
        iters = int(row["note"].split(" for ")[1].split()[0])
        assert iters >= 1 and row["sec_per_iter"] == pytest.approx(row["seconds"] / iters, rel=1e-9)
        assert -10 < row["final_ll"] < 0
    for peer in (r for r in b10 if r["library"] == "scikit-learn"):
        ups = [float(u) for u in peer["note"].split("speed-up per interleaved run ")[1].split(":")[0].split(", ")]
        assert len(ups) == 2  # the quick size's repeats, each against the ppl_em runs either side
        assert peer["speedup"] == pytest.approx(sorted(ups)[0] / 2 + sorted(ups)[1] / 2, rel=1e-2)
        assert peer["ratio"] == pytest.approx(1 / peer["speedup"])


def test_profile_writes_where_the_time_goes(tmp_path):
    done = subprocess.run([sys.executable, "-m", "benchmarks.profile", "--quick", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    text = (tmp_path / "profile.md").read_text()
    assert not (tmp_path / "profile.md.partial").exists()
    for name in ("## B1:", "## B5-small:"):
        section = text.split(name)[1].split("\n## ")[0]
        shares = [float(line.rsplit("|", 2)[1].strip().rstrip("%")) for line in section.splitlines()
                  if line.startswith("| ") and line.strip().endswith("% |")]
        assert len(shares) >= 5 and sum(shares) == pytest.approx(100, abs=0.5)  # every layer's share, summing to all
        assert "E-step (summarize)" in section and "page faults" in section
    roof = float(text.split("reaches ")[1].split("%")[0])
    assert 0 < roof <= 100
    # A whole fit's phases: each one-time phase ran once per fit, and the top-level rows (the steps' own rows
    # lie inside "EM.step") add up to the fit's wall time.
    section = text.split("## A whole fit's fixed cost, by phase:")[1]
    rows = {line.split("|")[1].strip(): line.split("|")[2:5] for line in section.splitlines() if line.startswith("| ")
            and not line.startswith("| phase") and not line.startswith("|---")}
    for phase in ("the M-step plan and its check", "the step's recording", "the final log-likelihood"):
        assert float(next(v for k, v in rows.items() if phase in k)[1]) == 1, phase
    top = [float(v[2].strip().rstrip("%")) for k, v in rows.items() if not k.startswith("of which")]
    assert sum(top) == pytest.approx(100, abs=len(top))  # (each share rounded to a whole percent)
