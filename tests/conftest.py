"""Shared test set-up: every test starts from an empty param store and a fixed seed."""

import pyro
import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_pyro_state():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    pyro.enable_validation(True)
    yield
    pyro.clear_param_store()
