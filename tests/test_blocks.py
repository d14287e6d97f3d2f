"""A pass's blocks of rows side by side on torch's threads (``ppl_em.fast.Workspace.map``).

Oracles: the same pass with its blocks in order on the calling thread (no workspace, or
``Workspace.in_order``), which is what the pass computed before its blocks were shared out; EM's
trajectory from the one against the other; and the step tape's check (a recorded step must equal a
real one to the bit, so a step that may be recorded keeps its blocks in order).
"""

import os
import threading
import time

import pyro
import pytest
import torch
from torch.overrides import TorchFunctionMode

import ppl_em
from ppl_em.datasets import load_old_faithful
from ppl_em.fast import Workspace, gaussian as fast_gaussian, workspace as fast_workspace
from ppl_em.models import gmm

D = torch.float64


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _block_facts(i: int):
    time.sleep(0.01)  # long enough that the helper thread takes blocks too
    return i * i, threading.get_ident(), torch.get_num_threads(), torch.is_grad_enabled(), torch.is_inference_mode_enabled()


def test_blocks_come_back_in_order_from_both_threads_each_on_one_thread(two_threads):
    ws = Workspace()
    facts = ws.map(_block_facts, 12, "cpu")
    assert [f[0] for f in facts] == [i * i for i in range(12)]
    assert len({f[1] for f in facts}) == 2 and threading.get_ident() in {f[1] for f in facts}
    assert all(f[2] == 1 for f in facts)  # each block's operations on its own thread alone
    assert torch.get_num_threads() == 2  # and the calling thread's threads back after the pass


def test_beyond_the_most_side_by_side_each_block_gets_a_share_of_the_threads(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(fast_workspace, "MAX_SIDE_BY_SIDE", 2)
    torch.set_num_threads(5)
    try:
        facts = Workspace().map(_block_facts, 8, "cpu")
        assert len({f[1] for f in facts}) == 2 and {f[2] for f in facts} == {2}  # 2 side by side, 5 // 2 threads each
        assert torch.get_num_threads() == 5
        facts = Workspace().map(_block_facts, 1, "cpu")
        assert {f[2] for f in facts} == {5}  # one block: in order, on all of them
    finally:
        torch.set_num_threads(before)


def test_grad_mode_and_inference_mode_pass_to_the_threads(two_threads):
    ws = Workspace()
    with torch.no_grad():
        assert {f[3] for f in ws.map(_block_facts, 6, "cpu")} == {False}
    assert {f[3] for f in ws.map(_block_facts, 6, "cpu")} == {True}
    with torch.inference_mode():
        facts = ws.map(_block_facts, 6, "cpu")
    assert {f[4] for f in facts} == {True} and {f[3] for f in facts} == {False}


class _Watching(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case", ["no workspace", "in order", "one thread", "a torch function mode", "one block",
                                  "torch's own thread pool"])
def test_blocks_run_in_order_on_the_calling_thread_where_they_must(case, two_threads):
    ws = Workspace()
    count = 1 if case == "one block" else 6
    if case == "no workspace":
        facts = fast_workspace.map_blocks(None, _block_facts, count, "cpu")
    elif case == "in order":
        with ws.in_order():
            facts = ws.map(_block_facts, count, "cpu")
        assert not ws._in_order  # the block's setting ends with it
    elif case == "one thread":
        torch.set_num_threads(1)
        facts = ws.map(_block_facts, count, "cpu")
    elif case == "a torch function mode":  # a recording sees the calling thread's operations only
        with _Watching():
            facts = ws.map(_block_facts, count, "cpu")
    elif case == "torch's own thread pool":  # one count of threads for the process: not set per thread
        ws._openmp = False
        facts = ws.map(_block_facts, count, "cpu")
    else:
        facts = ws.map(_block_facts, count, "cpu")
    assert {f[1] for f in facts} == {threading.get_ident()}
    assert [f[0] for f in facts] == [i * i for i in range(count)]
    assert {f[2] for f in facts} == {torch.get_num_threads()}  # the operations keep torch's threads


def test_a_failing_block_raises_its_error_after_every_thread_has_stopped(two_threads):
    ws = Workspace()
    ran = []

    def block(i: int):
        time.sleep(0.005)
        ran.append(i)
        if i == 3:
            raise ValueError("block 3 is bad")
        return i

    with pytest.raises(ValueError, match="block 3 is bad"):
        ws.map(block, 40, "cpu")
    done = len(ran)
    time.sleep(0.05)
    assert len(ran) == done < 40  # nothing still running, and the rest given up
    assert torch.get_num_threads() == 2
    assert ws.map(lambda i: i, 5, "cpu") == list(range(5))  # the pool still serves


def test_a_forked_process_makes_its_own_helper_threads(monkeypatch, two_threads):
    ws = Workspace()
    ws.map(lambda i: i, 4, "cpu")
    first = ws._pool[2]
    assert ws._workers(1) is first
    pid = os.getpid()
    monkeypatch.setattr(fast_workspace.os, "getpid", lambda: pid + 1)  # as in a child after fork
    assert ws._workers(1) is not first and ws.map(lambda i: i, 4, "cpu") == list(range(4))


def test_a_blocks_features_reuse_their_threads_scratch_tensor_side_by_side_only(two_threads):
    ws = Workspace()
    assert ws.scratch("a", (5, 7), D, "cpu") is not ws.scratch("a", (5, 7), D, "cpu")  # in order (maybe recorded): fresh
    got = ws.map(lambda i: (threading.get_ident(), time.sleep(0.01), ws.scratch("a", (5, 7), D, "cpu"))[::2], 8, "cpu")
    named = ws.map(lambda i: ws.scratch("a", (5, 7), D, "cpu") is ws.scratch("b", (5, 7), D, "cpu"), 4, "cpu")
    assert not any(named)  # two tensors of one block, of the same shape, never share a scratch tensor
    by_thread = {}
    for ident, t in got:
        by_thread.setdefault(ident, set()).add(id(t))
    assert len(by_thread) == 2 and all(len(ids) == 1 for ids in by_thread.values())  # one tensor per thread
    assert len(set().union(*by_thread.values())) == 2  # another thread's block never writes into this one's
    ws.clear()
    assert not ws._scratch


def test_a_scratch_tensors_views_are_made_once_with_it_side_by_side():
    ws, made = Workspace(), []

    def views(t):
        made.append(t)
        return (t[0], t[1:])

    first, v = ws.scratch_views("f", (3, 4), D, "cpu", views)  # in order: a fresh tensor and its own views
    assert v[0].data_ptr() == first.data_ptr() and len(made) == 1
    assert ws.scratch_views("f", (3, 4), D, "cpu", views)[0] is not first and len(made) == 2
    got = ws.map(lambda i: ws.scratch_views("f", (3, 4), D, "cpu", views), 6, "cpu")
    assert len(made) == 2 + len({id(t) for t, _ in got})  # once per thread's tensor, not per block
    assert all(v[1].data_ptr() == t[1:].data_ptr() for t, v in got)
    assert ws.map(lambda i: ws.scratch("f", (3, 4), D, "cpu") is not ws.scratch_views("f", (3, 4), D, "cpu", views)[0],
                  2, "cpu") == [True, True]  # with and without views: two tensors


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_block_rows_even_the_blocks_out_over_the_threads(threads, monkeypatch):
    """Blocks of ceil(rows / count) rows, count the number of blocks of ``most`` rows rounded up to a multiple of
    the threads: where the blocks are many rows each, exactly that many blocks, the last at most a row per block
    short; one thread (or one block): ``most``."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    for rows, most in [(250000, 21000), (1000000, 21620), (1000, 64), (100, 7), (64, 64), (10, 100), (999, 1)]:
        step = fast_workspace.block_rows(rows, most)
        assert step <= most
        if threads == 1 or rows <= most:
            assert step == most
            continue
        count = -(-(-(-rows // most)) // threads) * threads
        assert step == -(-rows // count), (rows, most)
        if rows >= count * count:
            assert -(-rows // step) == count and rows - (count - 1) * step >= step - count, (rows, most)


def _features(n: int = 3000, d: int = 3, k: int = 4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g, dtype=D) * 2 + 1
    mu = torch.randn(k, d, generator=g, dtype=D)
    a = torch.randn(k, d, d, generator=g, dtype=D)
    cov = a @ a.transpose(-1, -2) + torch.eye(d, dtype=D)
    fn = pyro.distributions.MultivariateNormal(mu.unsqueeze(-2), cov.unsqueeze(-3))
    return fast_gaussian.mvn_features(fn, x), x, fn


@pytest.mark.parametrize("hard", [False, True], ids=["exact", "hard"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_fused_pass_side_by_side_equals_it_in_order(dtype, hard, monkeypatch, two_threads):
    monkeypatch.setattr(fast_gaussian, "WHITEN_PAIRS", 0)
    monkeypatch.setattr(fast_gaussian, "FEATURE_ELEMENTS", 9 * 256)
    monkeypatch.setattr(fast_gaussian, "PASS_ELEMENTS", (9 + 2 * 4) * 128)  # d = 3, K = 4: 128-row blocks, 24 of them
    features, x, fn = _features()
    log_phi = torch.log_softmax(torch.arange(4, dtype=D), 0).reshape(4, 1)
    outs = []
    for ws in (None, Workspace()):
        log_density, total = torch.empty(features.shape, dtype=dtype), torch.empty(features.shape, dtype=dtype)
        best = torch.empty((1, features.shape[1]), dtype=D) if hard else None
        lse, n, sums = features.posterior_sums([log_phi.to(dtype)], log_density, total, ws, best)
        outs.append((log_density, total, lse, n, sums) + ((best,) if hard else ()))
    for plain, side in zip(*outs):
        torch.testing.assert_close(side, plain, rtol=1e-14, atol=0)
    torch.testing.assert_close(outs[1][0].double(), fn.log_prob(x), rtol=1e-10 if dtype == D else 1e-6, atol=1e-10)
    torch.testing.assert_close(outs[1][1].sum(0), torch.ones(x.shape[0], dtype=dtype))
    joint, rtol = fn.log_prob(x) + log_phi, 1e-10 if dtype == D else 1e-6  # (k, n), the oracle
    torch.testing.assert_close(outs[1][2].double(), joint.logsumexp(0, keepdim=True), rtol=rtol, atol=0)
    if hard:
        assert torch.equal(outs[1][1].argmax(0), joint.argmax(0)) and set(outs[1][1].unique().tolist()) == {0.0, 1.0}
        torch.testing.assert_close(outs[1][5], joint.amax(0, keepdim=True), rtol=rtol, atol=0)


def test_the_table_side_by_side_equals_it_in_order(monkeypatch, two_threads):
    monkeypatch.setattr(fast_gaussian, "WHITEN_PAIRS", 0)
    monkeypatch.setattr(fast_gaussian, "FEATURE_ELEMENTS", 9 * 128)
    features, x, fn = _features()
    plain, side = features.table(None), features.table(Workspace())
    torch.testing.assert_close(side, plain, rtol=1e-14, atol=0)
    torch.testing.assert_close(features.laid_out(side), fn.log_prob(x), rtol=1e-10, atol=1e-10)


def test_a_form_that_would_cancel_digits_is_refused_side_by_side_too(monkeypatch, two_threads):
    """One far row in the last block: the bound is taken over every block's extremes."""
    monkeypatch.setattr(fast_gaussian, "FEATURE_ELEMENTS", 9 * 128)
    features, x, fn = _features()
    x[-1] = 1e6
    far = fast_gaussian.GaussianFeatures(x, torch.linalg.inv(torch.linalg.cholesky(fn.covariance_matrix[:, 0])),
                                         fn.loc[:, 0], torch.zeros(4, 1, dtype=D))
    assert far.table(Workspace()) is None and far.table(None) is None


def test_em_follows_the_same_trajectory_with_its_blocks_side_by_side(monkeypatch, two_threads):
    monkeypatch.setattr(fast_gaussian, "WHITEN_PAIRS", 0)
    monkeypatch.setattr(fast_gaussian, "FEATURE_ELEMENTS", 5 * 64)
    monkeypatch.setattr(fast_gaussian, "PASS_ELEMENTS", 0)  # Old Faithful's 272 rows in 5 blocks of at most 64
    x = load_old_faithful()
    runs = []
    for in_order in (True, False):
        pyro.clear_param_store()
        em = ppl_em.EM(gmm.model)
        em._tape.off = "every step runs for real here, its blocks as this test sets"
        calls = []
        original = em._workspace.map
        em._workspace.map = lambda fn, count, device: calls.append(em._workspace._in_order) or original(fn, count, device)
        with em._workspace.in_order(in_order):
            losses = [em.step(x, 3) for _ in range(15)]
        runs.append((losses, {n: v.clone() for n, v in em.params.items()}))
        assert calls and set(calls) == {in_order}
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=1e-13, atol=0)
    for name, value in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][name], value, rtol=1e-10, atol=1e-12)


def test_a_step_that_may_be_recorded_keeps_its_blocks_in_order_and_is_replayed(monkeypatch, two_threads):
    monkeypatch.setattr(fast_gaussian, "WHITEN_PAIRS", 0)
    monkeypatch.setattr(fast_gaussian, "FEATURE_ELEMENTS", 5 * 64)
    monkeypatch.setattr(fast_gaussian, "PASS_ELEMENTS", 0)
    x = load_old_faithful()
    pyro.clear_param_store()
    em = ppl_em.EM(gmm.model)
    orders = []
    original = em._workspace.map
    em._workspace.map = lambda fn, count, device: orders.append(em._workspace._in_order) or original(fn, count, device)
    for _ in range(12):
        em.step(x, 3)
    assert orders and all(orders[1:])  # after the first step (the data not yet checked), every pass in order
    assert em._tape.off is None and em._tape.tape.verified and em._tape.replays >= 8


def test_a_posterior_normalised_side_by_side_equals_it_in_order(monkeypatch, two_threads):
    """A mixture whose factors have no GEMM form (Poisson counts): Q(z) and log p(x^(i)) block by block."""
    from ppl_em import posterior

    monkeypatch.setattr(posterior, "BLOCK_ELEMENTS", 3 * 64)  # k = 3: 64 columns a block, 32 blocks
    g = torch.Generator().manual_seed(1)
    counts = torch.poisson(torch.full((2000,), 4.0, dtype=D), generator=g)
    rate = torch.tensor([[1.0], [4.0], [9.0]], dtype=D)
    log_like = pyro.distributions.Poisson(rate).log_prob(counts)  # (3, 2000)
    log_phi = torch.tensor([[0.2], [0.5], [0.3]], dtype=D).log()
    for hard in (False, True):
        plain = posterior._sum_and_normalise([log_like, log_phi], 0, None, hard)
        side = posterior._sum_and_normalise([log_like, log_phi], 0, Workspace(), hard)
        for a, b in zip(plain, side):
            torch.testing.assert_close(b, a, rtol=0, atol=0)
        joint = log_like + log_phi
        torch.testing.assert_close(side[1], torch.logsumexp(joint, 0, keepdim=True), rtol=1e-14, atol=0)
        if hard:  # the one-hot of each column's mode, and the columns' maxima
            assert torch.equal(side[0], torch.nn.functional.one_hot(joint.argmax(0), 3).T.to(D))
            assert torch.equal(side[2], joint.amax(0, keepdim=True))
        else:
            assert side[2] is None


def test_the_whitened_table_side_by_side_equals_it_in_order(monkeypatch, two_threads):
    """The form for small tables and for data whose GEMM form would cancel digits, block by block."""
    monkeypatch.setattr(fast_gaussian, "FEATURE_ELEMENTS", 12 * 64)  # K d = 12: 64 rows a block
    features, x, fn = _features()
    inv = torch.linalg.inv(torch.linalg.cholesky(fn.covariance_matrix[:, 0]))
    plain = fast_gaussian._maha_by_whitening(x, inv, fn.loc[:, 0])
    side = fast_gaussian._maha_by_whitening(x, inv, fn.loc[:, 0], Workspace())
    torch.testing.assert_close(side, plain, rtol=0, atol=0)
    torch.testing.assert_close(side, ((x - fn.loc) @ inv.transpose(-1, -2)).square().sum(-1),
                               rtol=1e-10, atol=1e-10)


def test_float32_tables_with_as_many_components_as_features_side_by_side_equal_them_in_order(monkeypatch, two_threads):
    """d = 2 (5 features) and K = 5: a block's features and its float64 posterior have the same shape."""
    monkeypatch.setattr(fast_gaussian, "WHITEN_PAIRS", 0)
    monkeypatch.setattr(fast_gaussian, "FEATURE_ELEMENTS", 5 * 128)
    monkeypatch.setattr(fast_gaussian, "PASS_ELEMENTS", 0)  # the posterior's pass in blocks of 64 rows
    features, x, fn = _features(d=2, k=5)
    log_phi = torch.full((5, 1), -float(torch.log(torch.tensor(5.0))), dtype=torch.float32)
    outs = []
    for ws in (None, Workspace()):
        log_density, total = torch.empty(features.shape), torch.empty(features.shape)
        outs.append((log_density, total) + tuple(features.posterior_sums([log_phi], log_density, total, ws)))
    for plain, side in zip(*outs):
        torch.testing.assert_close(side, plain, rtol=0, atol=0)
    torch.testing.assert_close(outs[1][0].double(), fn.log_prob(x), rtol=1e-6, atol=1e-6)
