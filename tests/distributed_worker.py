"""One rank of the distributed tests (tests/test_distributed.py), launched by torchrun or by the test.

``python distributed_worker.py SCENARIO OUT_DIR``: runs the scenario on this rank and writes what
happened to ``OUT_DIR/rank<r>.pt`` (results, or each fault's error type, message and seconds).
Scenarios: ``agree`` (EM on in-memory shards and on memory-map shards, ``fit(distributed=True)``, a
NaN on rank 1, a non-finite log p(x) on rank 1) and ``hang`` (rank 1 stops answering for a while).
"""

import os
import sys
import time
from datetime import timedelta

import numpy as np
import torch

N, K = 1201, 3  # an odd n: the shards differ in size
TIMEOUT = float(os.environ.get("PPL_EM_TEST_TIMEOUT", "30"))


def make_data():
    """The data every rank (and the one-process oracle) generates: (x (N, 2), init)."""
    from ppl_em.models import gmm

    D = torch.float64
    phi = torch.tensor([0.3, 0.3, 0.4], dtype=D)
    mu = torch.tensor([[-3.0, 0.0], [3.0, 0.0], [0.0, 3.0]], dtype=D)
    Sigma = torch.tensor([[[1.0, 0.3], [0.3, 0.5]], [[0.6, 0.0], [0.0, 1.0]], [[0.8, -0.2], [-0.2, 0.8]]], dtype=D)
    x, _ = gmm.generate(N, phi, mu, Sigma, seed=0)
    init = {"phi": torch.full((K,), 1 / K, dtype=D), "mu": x[:K].clone(), "Sigma": torch.eye(2, dtype=D).expand(K, 2, 2)}
    return x, init


def em_steps(x, init, steps=6, **options):
    import pyro
    import ppl_em
    from ppl_em.models import gmm

    pyro.clear_param_store()
    em = ppl_em.EM(gmm.model, **options)
    losses = [em.step(x, K, init) for _ in range(steps)]
    return {"losses": losses, "params": em.params, "log_likelihood": em.log_likelihood(x, K, init)}


def fault(action):
    """Run ``action``; the error it raises (type, message, rank, seconds), or None."""
    start = time.perf_counter()
    try:
        action()
    except Exception as error:
        return {"type": type(error).__name__, "message": str(error), "rank": getattr(error, "rank", None),
                "seconds": time.perf_counter() - start}
    return None


def agree(rank, world, out):
    import warnings

    import ppl_em
    from ppl_em.models import gmm

    x, init = make_data()
    mine = ppl_em.distributed.shard(N)
    results = {"shard": (mine.start, mine.stop)}
    results["memory"] = em_steps(x[mine], init, distributed=True)
    path = os.path.join(out, "x.npy")
    if rank == 0:
        np.save(path, x.numpy())
    torch.distributed.barrier()
    rows = ppl_em.Rows(np.load(path, mmap_mode="r"), batch_size=97).shard(rank, world)
    results["disk"] = em_steps(rows, init, distributed=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ppl_em.ConvergenceWarning)
        fitted = ppl_em.fit(gmm.model, x[mine], K, max_iter=40, seed=3, distributed=True, progress=False)
        prior = ppl_em.fit(gmm.model, x[mine], K, init, max_iter=20, init="prior", distributed=True, progress=False)
    results["fit"] = {"params": fitted.params, "log_likelihood": fitted.log_likelihood, "n_data": fitted.n_data,
                      "losses": fitted.losses}
    results["fit_prior"] = {"params": prior.params, "log_likelihood": prior.log_likelihood, "losses": prior.losses}
    bad = x[mine].clone()
    if rank == 1:
        bad[5, 0] = float("nan")
    results["nan"] = fault(lambda: em_steps(bad, init, steps=2, distributed=True))
    huge = x[mine].clone()
    if rank == 1:
        huge[7] = 1e300  # finite data whose squares overflow: log p(x) = -inf on this rank only
    results["non_finite"] = fault(lambda: em_steps(huge, init, steps=2, distributed=True))
    results["after"] = em_steps(x[mine], init, steps=2, distributed=True)  # the group still works
    return results


def hang(rank, world, out):
    x, init = make_data()
    import ppl_em

    mine = ppl_em.distributed.shard(N)
    em_steps(x[mine], init, steps=1, distributed=True)  # both ranks answer once
    if rank == 1:
        time.sleep(2 * TIMEOUT)  # stops answering for two timeouts, then tries again
    return {"hang": fault(lambda: em_steps(x[mine], init, steps=2, distributed=True))}


def main():
    scenario, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=TIMEOUT))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    results = {"agree": agree, "hang": hang}[scenario](rank, world, out)
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    sys.stdout.flush()
    os._exit(0)  # no teardown of a process group whose peer may be gone


if __name__ == "__main__":
    main()
