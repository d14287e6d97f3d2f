"""ppl-em fit on a memory-mapped .npy file, by stepwise EM, and under torchrun with --distributed.

Oracle: the same command on the same file read into memory (one process).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ppl_em import cli, sources
from ppl_em.models import REGISTRY

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def npy(tmp_path):
    (x,), _ = REGISTRY["gmm"]["make_data"](0)
    path = tmp_path / "x.npy"
    np.save(path, x.numpy())
    return str(path)


def run_json(capsys, *args):
    assert cli.main(["fit", "gmm", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_large_npy_is_memory_mapped_and_read_in_batches(npy, tmp_path, capsys, monkeypatch):
    in_memory = run_json(capsys, "--data", npy, "-k", "3", "--out", str(tmp_path / "a"))
    monkeypatch.setattr(cli, "IN_MEMORY_BYTES", 0)  # every .npy is now "large"
    assert isinstance(cli.load_data(npy), sources.Rows)
    streamed = run_json(capsys, "--data", npy, "-k", "3", "--batch-size", "40", "--out", str(tmp_path / "b"))
    for key in ("log_likelihood", "bic", "aic", "n_parameters", "n_iter", "n"):
        assert streamed[key] == pytest.approx(in_memory[key], rel=1e-9), key
    assert sorted(os.listdir(tmp_path / "b")) == ["checkpoint.pt", "clusters.png", "history.json", "training.png"]


def test_nan_in_a_memory_mapped_file_is_found_block_by_block(tmp_path, capsys, monkeypatch):
    x = np.random.default_rng(0).normal(size=(5000, 2))
    x[4321, 1] = np.nan
    np.save(tmp_path / "bad.npy", x)
    monkeypatch.setattr(cli, "IN_MEMORY_BYTES", 0)
    assert cli.main(["fit", "gmm", "--data", str(tmp_path / "bad.npy"), "-k", "2", "--out", str(tmp_path / "o")]) == 2
    assert "1 NaN/inf value(s), the first at row 4321, column 1" in capsys.readouterr().err


def test_online_em_from_the_command_line(npy, tmp_path, capsys):
    """150 rows in batches of 30: 5 M-steps per pass, 40 passes."""
    summary = run_json(capsys, "--data", npy, "-k", "3", "--method", "online_em", "--batch-size", "30",
                       "--max-iter", "40", "--out", str(tmp_path / "o"))
    batch = run_json(capsys, "--data", npy, "-k", "3", "--out", str(tmp_path / "b"))
    assert summary["method"] == "online_em" and summary["n_iter"] <= 40
    assert summary["log_likelihood"] == pytest.approx(batch["log_likelihood"], abs=3e-3)


def test_distributed_fit_under_torchrun_equals_one_process(npy, tmp_path, capsys):
    from test_distributed import environment, free_port

    alone = run_json(capsys, "--data", npy, "-k", "3", "--out", str(tmp_path / "alone"))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--nnodes=1",
               "--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", "ppl_em.cli", "fit", "gmm",
               "--data", npy, "-k", "3", "--distributed", "--timeout", "60", "--json", "--out", str(tmp_path / "d")]
    done = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    summary = json.loads(done.stdout[done.stdout.index("{"):])  # rank 0 alone prints
    # The start is rank 0's k-means++ seeding of its shard, so the fit may differ from one process's; the
    # criteria are those of all the rows.
    assert summary["n"] == alone["n"] and summary["n_parameters"] == alone["n_parameters"]
    assert summary["log_likelihood"] == pytest.approx(alone["log_likelihood"], abs=1e-3)
    assert sorted(os.listdir(tmp_path / "d")) == ["checkpoint.pt", "clusters.png", "history.json", "training.png"]


def test_distributed_outside_torchrun_says_how_to_launch(npy, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert cli.main(["fit", "gmm", "--data", npy, "-k", "3", "--distributed", "--out", str(tmp_path / "o")]) == 2
    assert "torchrun --nproc-per-node=N -m ppl_em.cli fit ... --distributed" in capsys.readouterr().err
