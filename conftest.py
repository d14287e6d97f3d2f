"""Shared test set-up (tests and doctests): every test starts from an empty param store and a fixed seed."""

import pyro
import pytest
import torch

# The suite runs thousands of tiny tensor ops; with two intra-op threads, reductions on tiny
# tensors (e.g. the max inside Pyro's log-einsum) cost milliseconds under load instead of
# microseconds. One thread makes the suite several times faster and no less honest.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test on one intra-op thread, as above, whatever a test before it set."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def faithful_csv(tmp_path):
    """Every fourth row of the embedded Old Faithful data as a CSV with a header line (the CLI's input)."""
    import numpy as np

    from ppl_em.datasets import load_old_faithful

    path = tmp_path / "faithful.csv"
    np.savetxt(path, load_old_faithful()[::4].numpy(), delimiter=",", header="eruptions,waiting", comments="")
    return str(path)


@pytest.fixture(autouse=True)
def _fresh_pyro_state():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    pyro.enable_validation(True)
    yield
    pyro.clear_param_store()
