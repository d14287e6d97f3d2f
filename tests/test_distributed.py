"""Data-parallel EM over torch.distributed: 2 gloo processes on the loopback interface.

Oracle: EM in one process on all the data. Each rank summarises its contiguous shard and the
statistics are all-reduced, so the loss trajectory and the parameters equal one process's to
rounding (1e-10), and every rank holds bit-identical parameters. Faults: a NaN, or a non-finite
log p(x), on rank 1 makes both ranks raise the same RankError naming rank 1 within the step; a rank
that stops answering makes the other raise after the process group's timeout, and itself raise
when it comes back. Every launch runs under a timeout.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pyro
import pytest
import torch

import ppl_em
from ppl_em.models import gmm

sys.path.insert(0, str(Path(__file__).parent))
import distributed_worker as worker  # noqa: E402

WORKER = Path(__file__).parent / "distributed_worker.py"
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(**extra) -> dict:
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


@pytest.fixture(scope="module")
def agree(tmp_path_factory):
    """One torchrun launch of 2 ranks running the 'agree' scenario."""
    out = tmp_path_factory.mktemp("distributed")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--nnodes=1",
               "--master-addr=127.0.0.1", f"--master-port={free_port()}", str(WORKER), "agree", str(out)]
    done = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def one_process():
    x, init = worker.make_data()
    return worker.em_steps(x, init)


def test_shards_are_contiguous_and_cover_every_row_once(agree):
    assert [r["shard"] for r in agree] == [(0, worker.N // 2), (worker.N // 2, worker.N)]


@pytest.mark.parametrize("where", ["memory", "disk"])
def test_two_processes_equal_one_process(agree, one_process, where):
    for rank in agree:
        result = rank[where]
        assert result["losses"] == pytest.approx(one_process["losses"], rel=1e-10)
        assert result["log_likelihood"] == pytest.approx(one_process["log_likelihood"], rel=1e-10)
        for name, value in one_process["params"].items():
            torch.testing.assert_close(result["params"][name], value, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("where", ["memory", "disk", "fit", "fit_prior", "after"])
def test_every_rank_holds_bit_identical_parameters(agree, where):
    first, second = (rank[where] for rank in agree)
    assert first["losses"] == second["losses"]
    for name in first["params"]:
        assert torch.equal(first["params"][name], second["params"][name]), name


def test_fit_distributed_counts_all_ranks_data_and_equals_one_process_from_the_same_start(agree):
    assert all(rank["fit"]["n_data"] == worker.N for rank in agree)
    x, init = worker.make_data()
    pyro.clear_param_store()
    alone = ppl_em.fit(gmm.model, x, worker.K, init, max_iter=20, init="prior", progress=False)
    ours = agree[0]["fit_prior"]
    assert ours["losses"] == pytest.approx(alone.losses, rel=1e-10)
    assert ours["log_likelihood"] == pytest.approx(alone.log_likelihood, rel=1e-10)
    for name, value in alone.params.items():
        torch.testing.assert_close(ours["params"][name], value, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("fault, cause", [("nan", "ValueError: The data in argument 0"),
                                          ("non_finite", "NonFiniteLossError: .*log p\\(x\\) is not finite")])
def test_a_fault_on_one_rank_raises_the_same_error_on_every_rank(agree, fault, cause):
    errors = [rank[fault] for rank in agree]
    assert all(e is not None and e["type"] == "RankError" and e["rank"] == 1 for e in errors), errors
    assert errors[0]["message"] == errors[1]["message"]
    import re

    assert re.search(f"failed on rank 1 of 2: {cause}", errors[0]["message"]), errors[0]["message"]
    assert all(e["seconds"] < 20 for e in errors)  # within the step, not after a timeout


def test_a_rank_that_stops_answering_makes_the_others_raise_after_the_timeout(tmp_path):
    """Plain processes (torchrun would stop the sleeping rank as soon as the other exits)."""
    timeout, port = 3, free_port()
    env = environment(PPL_EM_TEST_TIMEOUT=str(timeout), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      WORLD_SIZE="2")
    procs = [subprocess.Popen([sys.executable, str(WORKER), "hang", str(tmp_path)],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        outputs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], [o[1][-3000:] for o in outputs]
    waiting, sleeper = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False)["hang"] for r in range(2))
    assert waiting["type"] == sleeper["type"] == "RankError"
    assert "not every rank answered within the process group's timeout" in waiting["message"]
    assert timeout - 1 <= waiting["seconds"] < 2 * timeout + 10
    assert sleeper["seconds"] < 2 * timeout + 10


def test_distributed_needs_an_initialised_process_group():
    with pytest.raises(RuntimeError, match="process group, which is not initialised.*torchrun.*init_process_group"):
        ppl_em.EM(gmm.model, distributed=True)
    with pytest.raises(ValueError, match="distributed=True sums EM's statistics.*method='svi' has none"):
        ppl_em.fit(gmm.model, torch.zeros(4, 2, dtype=torch.float64), 2, method="svi", distributed=True)


@pytest.fixture
def group_of_one(tmp_path):
    """A gloo process group of this process alone (a file store in tmp_path), destroyed after the test."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_group_of_one_runs_to_rest_like_one_process(group_of_one):
    """150 steps, to where EM comes to rest, in a process group made in this process."""
    x, init = worker.make_data()
    alone = worker.em_steps(x, init, steps=150)
    grouped = worker.em_steps(x, init, steps=150, distributed=True)
    assert abs(alone["losses"][-1] - alone["losses"][-2]) < 1e-8 * abs(alone["losses"][-1])
    assert grouped["losses"] == pytest.approx(alone["losses"], rel=1e-10)
    for name, value in alone["params"].items():
        torch.testing.assert_close(grouped["params"][name], value, rtol=1e-9, atol=1e-9)
