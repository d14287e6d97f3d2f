"""The ppl-em command on hostile and careless input: one line `ppl-em: error: ...`, exit status 2,
no traceback, and nothing written; Ctrl-C prints one line, exits 130 and leaves nothing."""

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ppl_em import cli
from ppl_em.checkpoint import PARTIAL
from ppl_em.datasets import load_old_faithful


def run(argv, capsys):
    rc = cli.main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_one_error_line(rc, out, err, message):
    assert rc == 2 and out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ppl-em: error: "), err
    assert re.search(message, lines[0]), lines[0]
    assert "Traceback" not in err


def write_npy_header(path, shape, payload=b""):
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f8", "fortran_order": False, "shape": shape})
        f.write(payload)


def make_data_files(t):
    x = load_old_faithful()[::4].numpy()
    (t / "empty.npy").write_bytes(b"")
    np.savez(t / "arrays.npz", x)
    os.replace(t / "arrays.npz", t / "archive.npy")
    write_npy_header(t / "huge.npy", (10 ** 12, 2), np.zeros(4).tobytes())
    write_npy_header(t / "short.npy", (68, 2), np.zeros(10).tobytes())
    np.save(t / "scaled.npy", x * 1e200)
    np.save(t / "one.npy", x[:1])
    np.save(t / "inf.npy", np.array([[1.0, 2.0], [np.inf, 3.0]]))
    (t / "bad.csv").write_text("a,b\n1,2\n3,4\n\n5,abc\n")
    (t / "ragged.csv").write_text("1,2\n3,4\n5,6,7\n")
    (t / "nan.csv").write_text("a,b\n1,2\n\n3,nan\n")
    (t / "folder.csv").mkdir()
    os.mkfifo(t / "fifo.csv")
    os.symlink(t / "gone.csv", t / "broken.csv")


DATA_CASES = {  # name -> (data file, -k, expected message)
    "empty .npy": ("empty.npy", "1", r"'.*empty.npy' is empty \(0 bytes\)"),
    ".npz named .npy": ("archive.npy", "1", r"is an .npz archive.*numpy.save"),
    "header claiming a huge shape": ("huge.npy", "1", r"header declares shape \(1000000000000, 2\).*only 32 bytes"),
    "truncated .npy": ("short.npy", "1", r"truncated or damaged.*1088 bytes of data.*only 80 bytes"),
    "data scaled by 1e200": ("scaled.npy", "2", r"reach 9.6e\+201 in magnitude.*Scale the data"),
    "n = 1 with K = 1": ("one.npy", "1", r"covariance of the data, which needs at least 2 rows; x has 1"),
    "a word in a CSV": ("bad.csv", "1", r"line 5, column 2: 'abc' is not a number"),
    "a ragged CSV": ("ragged.csv", "1", r"line 3 has 3 field\(s\), line 1 has 2"),
    "NaN in a CSV": ("nan.csv", "1", r"NaN/inf value\(s\), the first at line 4, column 2"),
    "inf in a .npy": ("inf.npy", "1", r"NaN/inf value\(s\), the first at row 1, column 0"),
    "a folder": ("folder.csv", "1", r"'.*folder.csv' is a folder; expected a .csv or .npy file"),
    "a FIFO": ("fifo.csv", "1", r"'.*fifo.csv' is not a regular file"),
    "a broken link": ("broken.csv", "1", r"'.*broken.csv' is not a regular file"),
    "a missing file": ("missing.csv", "1", r"'.*missing.csv' not found"),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_data_is_one_line_and_exit_2_with_nothing_written(case, tmp_path, capsys):
    make_data_files(tmp_path)
    name, k, message = DATA_CASES[case]
    out = tmp_path / "out"
    rc, stdout, err = run(["fit", "gmm", "--data", str(tmp_path / name), "-k", k, "--out", str(out)], capsys)
    assert_one_error_line(rc, stdout, err, message)
    assert not out.exists()


def test_a_poisson_mixture_fits_one_observation(tmp_path, capsys):
    path = tmp_path / "one.csv"
    path.write_text("3,4\n")
    rc, stdout, err = run(["fit", "poisson_mixture", "--data", str(path), "-k", "1", "--out", str(tmp_path / "o"),
                           "--json"], capsys)
    assert rc == 0 and err == ""
    assert sorted(os.listdir(tmp_path / "o")) == ["checkpoint.pt", "clusters.png", "history.json", "training.png"]


@pytest.mark.parametrize("case", ["a file", "under a file", "a name too long", "a path too long"])
def test_a_bad_out_folder_fails_before_the_fit(case, faithful_csv, tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("keep me")
    out, message = {
        "a file": (tmp_path / "afile", r"--out '.*afile' exists and is not a folder"),
        "under a file": (tmp_path / "afile" / "sub", r"--out '.*sub' lies under '.*afile', which is a file"),
        "a name too long": (tmp_path / ("x" * 300), r"cannot create --out '.*': File name too long"),
        "a path too long": (tmp_path / "a" / ("y" * 300) / "b", r"cannot create --out '.*': File name too long"),
    }[case]
    monkeypatch.setattr(cli, "fit", lambda *a, **k: pytest.fail("the fit must not start"))
    rc, stdout, err = run(["fit", "gmm", "--data", faithful_csv, "-k", "2", "--out", str(out)], capsys)
    assert_one_error_line(rc, stdout, err, message)
    assert sorted(os.listdir(tmp_path)) == ["afile", "faithful.csv"]  # nothing created, nothing left
    assert (tmp_path / "afile").read_text() == "keep me"


def test_an_out_folder_that_cannot_be_written(faithful_csv, tmp_path, capsys, monkeypatch):
    out = tmp_path / "readonly"
    out.mkdir()

    def refused(*args, **kwargs):  # what mkdtemp meets in a folder without write permission
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cli.tempfile, "mkdtemp", refused)
    rc, stdout, err = run(["fit", "gmm", "--data", faithful_csv, "-k", "2", "--out", str(out)], capsys)
    assert_one_error_line(rc, stdout, err, r"cannot write to --out '.*readonly': Permission denied")
    assert os.listdir(out) == []


@pytest.mark.parametrize("argv, message", [
    (["--seed", "4294967296"], r"--seed must lie in \[0, 4294967295\] \(seeds are 32-bit\), got 4294967296"),
    (["--seed", "-1"], r"--seed must lie in \[0, 4294967295\]"),
    (["--seed", "4294967295", "--n-init", "3"], r"--seed must lie in \[0, 4294967293\]"),
    (["--tol", "-1"], r"--tol must be a finite number >= 0, got -1.0"),
    (["--tol", "nan"], r"--tol must be a finite number >= 0, got nan"),
])
def test_a_seed_out_of_range_names_the_option(argv, message, faithful_csv, tmp_path, capsys):
    rc, stdout, err = run(["fit", "gmm", "--data", faithful_csv, "-k", "2", "--out", str(tmp_path / "o")] + argv, capsys)
    assert_one_error_line(rc, stdout, err, message)


def test_demo_seed_out_of_range(tmp_path, capsys):
    rc, stdout, err = run(["demo", "--seed", "99999999999", "--out", str(tmp_path / "o")], capsys)
    assert_one_error_line(rc, stdout, err, "--seed must lie in")


def test_a_singular_fit_is_an_error_not_a_traceback(tmp_path, capsys, monkeypatch):
    path = tmp_path / "same.csv"
    path.write_text("1,2\n" * 10)
    fit = cli.fit
    monkeypatch.setattr(cli, "fit", lambda *args, **kwargs: fit(*args, em_options={"reg_covar": 0.0}, **kwargs))
    rc, stdout, err = run(["fit", "gmm", "--data", str(path), "-k", "2", "--out", str(tmp_path / "o")], capsys)
    assert_one_error_line(rc, stdout, err, r"component [01] of parameter 'Sigma' has a singular covariance")
    assert not (tmp_path / "o").exists()


# -- Ctrl-C ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("when", ["during the fit", "while writing the outputs"])
def test_ctrl_c_prints_one_line_exits_130_and_leaves_the_folder_as_it_was(when, faithful_csv, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"the previous run's")

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "fit" if when == "during the fit" else "_write_json", interrupt)
    rc, stdout, err = run(["fit", "gmm", "--data", faithful_csv, "-k", "2", "--out", str(out)], capsys)
    assert rc == 130 and stdout == ""
    assert err.splitlines() == ["ppl-em: interrupted; no output was written"]
    assert os.listdir(out) == ["checkpoint.pt"] and (out / "checkpoint.pt").read_bytes() == b"the previous run's"
    new = tmp_path / "new"
    rc, _, _ = run(["fit", "gmm", "--data", faithful_csv, "-k", "2", "--out", str(new)], capsys)
    assert rc == 130 and not new.exists()  # a folder this run created is removed again


def test_sigint_to_the_installed_command(faithful_csv, tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "ppl-em")
    command = [script] if os.path.exists(script) else [sys.executable, "-m", "ppl_em.cli"]
    out = tmp_path / "out"
    # --tol 0: the fit never settles, so it is still running when the signal comes. SIGINT is set back to
    # its default in the child: a test run started in the background of a shell inherits it ignored, and
    # Python then installs no KeyboardInterrupt handler.
    proc = subprocess.Popen(command + ["fit", "gmm", "--data", faithful_csv, "-k", "2", "--method", "svi", "--max-iter",
                                       "1000000", "--tol", "0", "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not (out.exists() and any(PARTIAL in n for n in os.listdir(out))):  # the fit has started
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # never leave the fit running past the test
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert stderr.splitlines() == ["ppl-em: interrupted; no output was written"] and stdout == ""
    assert not out.exists()


def test_a_stale_staging_folder_of_a_killed_run_is_cleaned(faithful_csv, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    stale = out / f".ppl-em.{PARTIAL}.999999999.{cli.partial_prefix('x').split('.')[-2]}.abcdefgh"
    stale.mkdir()
    (stale / "checkpoint.pt").write_bytes(b"half")
    rc, _, err = run(["fit", "gmm", "--data", faithful_csv, "-k", "2", "--out", str(out)], capsys)
    assert rc == 0 and err == ""
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "clusters.png", "history.json", "training.png"]


def test_a_write_that_fails_midway_is_one_line_and_leaves_nothing(faithful_csv, tmp_path, capsys, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli, "_write_json", disk_full)
    out = tmp_path / "out"
    rc, stdout, err = run(["fit", "gmm", "--data", faithful_csv, "-k", "2", "--out", str(out)], capsys)
    assert_one_error_line(rc, stdout, err, r"could not write the output to --out '.*out': No space left on device")
    assert not out.exists()
