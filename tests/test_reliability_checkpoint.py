"""Checkpoints: every field validated against tampering and against the model, atomic saves that
survive kill -9 and concurrent writers, and the small promises of a result (sample(0))."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import warnings

import pyro
import pytest
import torch

import ppl_em
from ppl_em.checkpoint import PARTIAL, atomic_write, partial_prefix
from ppl_em.datasets import load_old_faithful
from ppl_em.models import REGISTRY, gmm, poisson_mixture

from test_reliability_fit import assert_same, snapshot

D = torch.float64


@pytest.fixture(scope="module")
def fitted():
    pyro.clear_param_store()
    x = load_old_faithful()[::4]
    return ppl_em.fit(gmm.model, x, 2, progress=False), x


@pytest.fixture
def saved(fitted, tmp_path):
    return fitted[0].save(tmp_path / "gmm.pt")


@pytest.fixture
def sentinel():
    pyro.param("user_theta", torch.tensor([1.0, 2.0], dtype=D))
    return snapshot()


def tampered(path, edit, name="tampered.pt"):
    payload = torch.load(path, weights_only=True)
    original = payload["meta"]
    meta = json.loads(original)
    edit(payload, meta)
    if payload.get("meta") is original:  # the edit was to the metadata, not to the payload's "meta" itself
        payload["meta"] = json.dumps(meta)
    out = os.path.join(os.path.dirname(path), name)
    torch.save(payload, out)
    return out


def set_param(name, value):
    def edit(payload, meta):
        payload["params"][name] = value
    return edit


def set_meta(field, value):
    def edit(payload, meta):
        if value is KeyError:
            del meta[field]
        else:
            meta[field] = value
    return edit


def set_top(field, value):
    def edit(payload, meta):
        payload[field] = value
    return edit


def drop_param(name):
    def edit(payload, meta):
        del payload["params"][name]
        del meta["constraints"][name]
    return edit


def set_constraint(name, spec):
    def edit(payload, meta):
        meta["constraints"][name] = spec
    return edit


NAN_MU = torch.tensor([[float("nan"), 1.0], [2.0, 3.0]], dtype=D)
TAMPERED = {
    "NaN parameter": (set_param("mu", NAN_MU), r"parameter 'mu' has 1 NaN or infinite"),
    "inf parameter": (set_param("phi", torch.tensor([float("inf"), 0.0], dtype=D)), "parameter 'phi' has 1 NaN or inf"),
    "integer parameter": (set_param("mu", torch.zeros(2, 2, dtype=torch.long)), "'mu' must be a floating-point"),
    "not a tensor": (set_param("mu", [1.0, 2.0]), "'mu' must be a floating-point tensor, got list"),
    "covariance of the wrong shape": (set_param("Sigma", torch.zeros(2, 3, dtype=D)),
                                      r"'Sigma' \(shape \(2, 3\)\) does not hold a value of its constraint"),
    "newer version": (set_top("version", 7), "format version 7; this ppl_em reads version 1 .*newer ppl_em"),
    "version 0": (set_top("version", 0), "format version 0; this ppl_em reads version 1"),
    "version as text": (set_top("version", "1"), "format version '1'"),
    "version as bool": (set_top("version", True), "format version True"),
    "other format": (set_top("format", "sklearn"), "is not a ppl_em checkpoint"),
    "params not a dict": (set_top("params", [1, 2]), "'params' must be a dict of tensors, got list"),
    "meta not JSON": (set_top("meta", "{not json"), "'meta' is not valid JSON"),
    "meta not text": (set_top("meta", torch.zeros(2)), "'meta' must be a JSON string, got Tensor"),
    "meta a list": (set_top("meta", "[1, 2]"), "'meta' must be a JSON object, got list"),
    "missing field": (set_meta("n_data", KeyError), r"meta\['n_data'\] must be an integer >= 1; it is missing"),
    "n_data 0": (set_meta("n_data", 0), r"meta\['n_data'\] must be an integer >= 1; got 0"),
    "converged as text": (set_meta("converged", "yes"), r"meta\['converged'\] must be true or false"),
    "losses as text": (set_meta("losses", "many"), r"meta\['losses'\] must be a list of numbers"),
    "unknown method": (set_meta("method", "gibbs"), r"meta\['method'\] must be one of"),
    "best out of range": (set_meta("best", 5), r"meta\['best'\] = 5 is not the index of one of its 1 restarts"),
    "model not text": (set_meta("model", 3), r"meta\['model'\] must be a string or null"),
    "model path to a function": (set_meta("model", "ppl_em.models.gmm:generate"),
                                 "names the model 'ppl_em.models.gmm:generate', which is not a model of ppl_em.models"),
    "model path to a constant": (set_meta("model", "ppl_em.models.gmm:COVARIANCE_TYPES"),
                                 "names the model 'ppl_em.models.gmm:COVARIANCE_TYPES', which is not a model"),
    "model path to a module attribute": (set_meta("model", "ppl_em.models.gmm:torch.load"),
                                         "which is not a model of ppl_em.models"),
    "unknown constraint": (set_constraint("Sigma", {"name": "os.system"}), "unknown constraint 'os.system'"),
    "malformed bounds": (set_constraint("phi", {"name": "interval", "args": ["0", 1]}), "malformed bounds"),
    "malformed independent": (set_constraint("mu", {"independent": {"name": "real"}, "ndims": "x"}), "ndims must"),
    "constraint not an object": (set_constraint("mu", "real"), "malformed constraint 'real'"),
    "a constraint without its parameter": (lambda payload, meta: payload["params"].pop("mu"),
                                           r"parameters \[.*\] and the constraints .* do not match"),
}


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_a_tampered_checkpoint_is_refused_naming_the_file_and_leaves_the_store(case, saved, sentinel):
    edit, message = TAMPERED[case]
    path = tampered(saved, edit)
    with pytest.raises(ValueError, match=re.escape(repr(path)) + ".*" + message):
        ppl_em.load(path)
    assert_same(sentinel, snapshot())


@pytest.mark.parametrize("content", [b"", b"not a zip", b"PK\x03\x04garbage"])
def test_files_that_are_not_checkpoints(content, tmp_path, sentinel):
    path = tmp_path / "junk.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="junk.pt' is not a loadable ppl_em checkpoint"):
        ppl_em.load(path)
    assert_same(sentinel, snapshot())


def test_a_missing_parameter_is_an_error_never_silently_initialised(fitted, saved):
    result, x = fitted
    path = tampered(saved, drop_param("Sigma"))
    with pytest.raises(ValueError, match=r"tampered.pt' does not match this model.*'Sigma' \(shape \(2, 2, 2\)\) "
                                         "is missing"):
        ppl_em.load(path, args=(x, 2))
    loaded = ppl_em.load(path)  # without data the model cannot be run: the check comes at first use
    before = snapshot()
    for method in (loaded.score, loaded.predict_proba, loaded.bic, loaded.sample):
        with pytest.raises(ValueError, match="'Sigma' .* is missing"):
            method(*((5,) if method == loaded.sample else ()), x, 2)
    assert_same(before, snapshot())
    assert "Sigma" not in pyro.get_param_store()


def test_a_checkpoint_of_another_model_is_refused(fitted, tmp_path, sentinel):
    args, kwargs = REGISTRY["poisson_mixture"]["make_data"](0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ppl_em.ConvergenceWarning)
        poisson = ppl_em.fit(poisson_mixture.model, *args, **kwargs, progress=False, max_iter=5)
    path = poisson.save(tmp_path / "poisson.pt")
    before = snapshot()
    with pytest.raises(ValueError, match=r"poisson.pt' was fitted with the model 'ppl_em.models.poisson_mixture:model', "
                                         r"not with 'ppl_em.models.gmm:model'"):
        ppl_em.load(path, model=gmm.model)
    assert_same(before, snapshot())
    # A model of the user's own with the same call signature is checked structurally.
    def my_gmm(x, k):
        return gmm.model(x, k)

    x = load_old_faithful()[::4]
    with pytest.raises(ValueError, match="does not match this model.*'mu' .* is missing"):
        ppl_em.load(path, model=my_gmm, args=(x, 3))
    assert_same(before, snapshot())


@pytest.mark.parametrize("kwargs, message", [
    ({"k": 3}, r"'phi' has shape \(2,\), the model's has \(3,\)"),
    ({"k": 2, "covariance_type": "diag"}, r"'Sigma' has shape \(2, 2, 2\), the model's has \(2, 2\).*constraint"),
])
def test_shapes_and_constraints_must_match_the_model_and_its_arguments(fitted, saved, kwargs, message):
    x = fitted[1]
    with pytest.raises(ValueError, match=message):
        ppl_em.load(saved, kwargs=dict(kwargs, x=x))
    loaded = ppl_em.load(saved)
    with pytest.raises(ValueError, match=message):
        loaded.score(x, **kwargs)
    with pytest.raises(ValueError, match=message):  # a fitted result is held to the same check
        fitted[0].score(x, **kwargs)


def test_a_checkpoint_loaded_with_its_arguments_needs_no_data_later(fitted, saved):
    result, x = fitted
    loaded = ppl_em.load(saved, args=(x, 2))
    assert loaded.score() == pytest.approx(result.score(), rel=1e-12)
    with pytest.raises(ValueError, match="names no model of ppl_em.models; pass the model"):
        ppl_em.load(tampered(saved, set_meta("model", "my_package:model")), args=(x, 2))


# -- atomic saves ---------------------------------------------------------------------------------
KILLED_WRITER = """
import os, signal, sys
from ppl_em.checkpoint import atomic_write

def write(f):
    f.write(b"x" * 4_000_000)
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)  # kill -9 in the middle of the save

atomic_write(sys.argv[1], write)
"""


def test_kill_9_mid_save_leaves_a_named_partial_that_the_next_save_removes(fitted, saved):
    with open(saved, "rb") as f:
        original = f.read()
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, saved], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    folder = os.path.dirname(saved)
    partials = [n for n in os.listdir(folder) if n != "gmm.pt"]
    assert len(partials) == 1 and re.fullmatch(rf"\.gmm\.pt\.{PARTIAL}\.\d+\.[\w-]+\.\w+\.tmp", partials[0])
    with open(saved, "rb") as f:
        assert f.read() == original  # the old checkpoint is intact
    fitted[0].save(os.path.join(folder, "other.pt"))  # any save to the folder cleans up
    assert sorted(os.listdir(folder)) == ["gmm.pt", "other.pt"]
    assert ppl_em.load(saved).score(fitted[1], 2) == pytest.approx(fitted[0].score(), rel=1e-12)


def test_a_partial_file_of_a_live_writer_is_never_removed(fitted, tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        mine = tmp_path / (partial_prefix("a.pt") + "abcd1234.tmp")
        theirs = tmp_path / (partial_prefix("b.pt").replace(f".{os.getpid()}.", f".{sleeper.pid}.") + "abcd1234.tmp")
        elsewhere = tmp_path / f".c.pt.{PARTIAL}.1.another-host.abcd1234.tmp"
        for path in (mine, theirs, elsewhere):
            path.write_bytes(b"half")
        fitted[0].save(tmp_path / "gmm.pt")
        assert sorted(os.listdir(tmp_path)) == sorted([mine.name, theirs.name, elsewhere.name, "gmm.pt"])
    finally:
        sleeper.kill()
        sleeper.wait()


def test_concurrent_writers_leave_one_whole_checkpoint(fitted, tmp_path):
    path = tmp_path / "gmm.pt"
    errors = []

    def save():
        try:
            for _ in range(5):
                atomic_write(path, lambda f: torch.save({"params": torch.arange(100_000)}, f))
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=save) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert torch.equal(torch.load(path, weights_only=True)["params"], torch.arange(100_000))
    assert os.listdir(tmp_path) == ["gmm.pt"]


# -- sample -------------------------------------------------------------------------------------------
def test_sample_zero_is_empty_with_the_right_shapes_and_negative_is_an_error(fitted):
    result, x = fitted
    draws = result.sample(0)
    assert draws["z"].shape == (0,) and draws["x"].shape == (0, 2) and draws["x"].dtype == x.dtype
    assert result.sample(3)["x"].shape == (3, 2)
    for n in (-1, 2.5, True):
        with pytest.raises(ValueError, match=r"sample\(n\) needs a number of draws n >= 0"):
            result.sample(n)


def test_a_results_methods_check_their_data_first(fitted):
    result, x = fitted
    bad = x.clone()
    bad[3, 1] = float("nan")
    for method in (result.score, result.predict_proba, result.bic):
        with pytest.raises(ValueError, match=r"argument 'x' \(shape \(68, 2\)\) has 1 non-finite.*index \(3, 1\)"):
            method(bad, 2)
    with pytest.raises(ValueError, match="seed must lie in"):
        result.sample(3, seed=-5)
