"""The ppl-em command: in-process through main([...]), once as a real subprocess."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import ppl_em
from ppl_em import cli
from ppl_em.datasets import load_old_faithful
from ppl_em.models import gmm


def test_fit_writes_checkpoint_history_figures_and_a_json_summary(faithful_csv, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(["fit", "gmm", "--data", faithful_csv, "-k", "2", "--out", str(out), "--json", "--seed", "3"])
    captured = capsys.readouterr()
    assert rc == 0 and captured.err == ""
    summary = json.loads(captured.out)
    x = load_old_faithful()[::4]
    direct = ppl_em.fit(gmm.model, x, 2, seed=3, progress=False)  # the same fit, through the API
    assert summary["log_likelihood"] == pytest.approx(direct.score(), rel=1e-10)
    assert summary["bic"] == pytest.approx(direct.bic(), rel=1e-10)
    assert (summary["n"], summary["d"], summary["n_iter"], summary["method"]) == (len(x), 2, direct.n_iter, "em")
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "clusters.png", "history.json", "training.png"]
    assert sorted(summary["files"]) == sorted(str(out / f) for f in os.listdir(out))
    loaded = ppl_em.load(out / "checkpoint.pt")
    for name, value in direct.params.items():
        torch.testing.assert_close(loaded.params[name], value)
    history = json.loads((out / "history.json").read_text())
    assert [h["loss"] for h in history["history"]] == pytest.approx(direct.losses, rel=1e-12)


def test_fit_tol_is_passed_to_the_fit(faithful_csv, tmp_path, capsys):
    """--tol 0 never settles: the fit runs all of --max-iter, as ppl_em.fit(..., tol=0) does."""
    rc = cli.main(["fit", "gmm", "--data", faithful_csv, "-k", "2", "--out", str(tmp_path / "o"), "--json",
                   "--tol", "0", "--max-iter", "7"])
    summary = json.loads(capsys.readouterr().out)
    with pytest.warns(ppl_em.ConvergenceWarning):  # tol=0: stopped by max_iter
        direct = ppl_em.fit(gmm.model, load_old_faithful()[::4], 2, tol=0, max_iter=7, progress=False)
    assert rc == 0 and summary["n_iter"] == direct.n_iter == 7
    assert summary["log_likelihood"] == pytest.approx(direct.score(), rel=1e-10)


def test_fit_reads_npy_and_prints_a_table(tmp_path, capsys):
    path = tmp_path / "x.npy"
    np.save(path, load_old_faithful()[::4].numpy())
    rc = cli.main(["fit", "gmm", "--data", str(path), "-k", "2", "--method", "hard_em", "--out", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.splitlines()[0].split() == ["method", "log", "p(x)/n", "BIC", "iter", "conv", "time", "(s)"]
    assert out.splitlines()[1].startswith("hard_em")


def write(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, np.ndarray):
        np.save(path, content)
    else:
        path.write_text(content)
    return str(path)


BAD_INPUTS = {
    "missing file": (lambda t: str(t / "nope.csv"), "2", "gmm", "em", "not found"),
    "NaN": (lambda t: write(t, "nan.csv", "1,2\n3,nan\n5,6\n"), "2", "gmm", "em", "NaN/inf value.*line 2, column 2"),
    "3-D array": (lambda t: write(t, "cube.npy", np.zeros((4, 2, 2))), "2", "gmm", "em",
                  r"shape \(n, d\), got shape \(4, 2, 2\)"),
    "empty file": (lambda t: write(t, "empty.csv", ""), "2", "gmm", "em", r"non-empty table"),
    "text": (lambda t: write(t, "words.csv", "a,b\nc,d\n"), "2", "gmm", "em", "could not parse"),
    "extension": (lambda t: write(t, "x.txt", "1,2\n"), "2", "gmm", "em", "expected a .csv or .npy file"),
    "K > n": (lambda t: write(t, "small.csv", "1,2\n3,4\n5,7\n"), "4", "gmm", "em",
              "between 1 and the number of data points \\(3\\), got 4"),
    "unknown model": (lambda t: write(t, "ok.csv", "1,2\n3,4\n"), "1", "gmm2", "em",
                      "unknown model 'gmm2'; available: .*gmm"),
    "method the model lacks": (lambda t: write(t, "ok.csv", "1,2\n3,4\n"), "1", "hmm", "vae",
                               "model 'hmm' does not support --method vae; it supports: em, hard_em, svi"),
    "model not called as (x, k)": (lambda t: write(t, "ok.csv", "1,2\n3,4\n"), "1", "topic", "em",
                                   r"model 'topic' is called as model\(words, doc, k, .*not model\(x, k\)"),
    "unknown method": (lambda t: write(t, "ok.csv", "1,2\n3,4\n"), "1", "gmm", "gibbs", "invalid choice: 'gibbs'"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_on_stderr_and_exit_status_2(case, tmp_path, capsys):
    make, k, model, method, message = BAD_INPUTS[case]
    rc = cli.main(["fit", model, "--data", make(tmp_path), "-k", k, "--method", method, "--out", str(tmp_path / "o")])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ppl-em: error: "), captured.err
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "o" / "checkpoint.pt").exists()


def test_usage_errors_exit_2_without_the_usage_text(capsys):
    assert cli.main(["fit", "gmm"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--data" in err
    assert cli.main([]) == 2


def test_the_installed_command_reports_bad_input_without_a_traceback(tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "ppl-em")
    command = [script] if os.path.exists(script) else [sys.executable, "-m", "ppl_em.cli"]
    bad = write(tmp_path, "nan.csv", "1,2\nnan,4\n")
    proc = subprocess.run(command + ["fit", "gmm", "--data", bad, "-k", "1", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"ppl-em: error: data file {bad!r} has 1 NaN/inf value(s), "
                                                "the first at line 2, column 1; remove or impute them (or, for "
                                                "missing values, pass --missing marginalize: gmm, kmeans, "
                                                "bernoulli_mixture, poisson_mixture)"]
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_models_lists_gmm(capsys):
    assert cli.main(["models"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert "gmm" in names and names == sorted(names)


def test_quick_demo_prints_the_table_and_writes_the_figures(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in text.splitlines()[2:] if line and not line.startswith("wrote")}
    assert set(rows) == {"EM", "hard", "SVI", "amortized"}
    em = ppl_em.fit(gmm.model, load_old_faithful(), 2, progress=False)  # the table's EM row, through the API
    assert float(rows["EM"][1]) == pytest.approx(em.score(), abs=1e-5)
    assert float(rows["EM"][2]) == pytest.approx(em.bic(), abs=0.01)
    assert sorted(os.listdir(out)) == ["clusters_em.png", "clusters_svi.png", "elbo_gap.png", "summary.json",
                                       "training.png"]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["method"] for r in summary] == ["em", "hard_em", "svi", "vae"]
    assert all(r["log_likelihood"] <= em.score() + 1e-6 for r in summary)  # nothing beats EM's optimum
