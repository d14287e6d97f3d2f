"""The replay of a model's run (ppl_em.fast.replay) against the model itself.

Oracle: the same EM run with the replay turned off, which runs the model at every step. A replayed
run must follow it exactly (the same operations on the same numbers), on models written the ways
users write them; a model whose run cannot be replayed faithfully must be run for real, and every
change of the data or of the parameters' shapes must be noticed.
"""

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

import ppl_em
from benchmarks import pyro_style as ps
from ppl_em.datasets import load_old_faithful
from ppl_em.models import gmm, hmm, poisson_mixture

from test_families import FAMILIES, _mixture
from test_idioms import make_model, vindex_style

D = torch.float64
X = load_old_faithful()
STEPS = 8


def _run(model, args, replay: bool, steps: int = STEPS, tape: bool = False, **options):
    """(losses, final parameters, the EM object) of ``steps`` EM steps from a cleared param store; ``tape``:
    whole steps replayed too (test_tape.py), else only the model's run."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)  # a global latent without a value starts from a draw from its prior
    em = ppl_em.EM(model, replay=replay, **options)
    if replay and not tape:  # the whole step's tape would take over from the model's replay tested here
        em._tape.off = "the model's replay is tested alone"
    losses = [em.step(*args) for _ in range(steps)]
    return losses, {n: v.detach().clone() for n, v in em.params.items()}, em


def _assert_same_run(model, args, steps: int = STEPS, tape: bool = False, **options):
    """The run replayed (the model's run, or with ``tape`` whole steps) against the same run with
    ``replay=False``: losses and parameters equal."""
    losses, params, em = _run(model, args, True, steps, tape, **options)
    ref_losses, ref_params, _ = _run(model, args, False, steps, **options)
    assert losses == pytest.approx(ref_losses, rel=1e-13, abs=1e-13)
    assert params.keys() == ref_params.keys()
    for name, value in params.items():
        torch.testing.assert_close(value, ref_params[name], rtol=1e-12, atol=1e-13)
    return em


SEQUENCES, LENGTHS = ps.binary_sequences()
MODELS = {
    "gmm model file": (gmm.model, (X, 3)),
    "scale_tril": (make_model("scale_tril", "full"), (X,)),
    "precision_matrix, logits": (make_model("precision_matrix", "full", weights="logits"), (X,)),
    "diag covariance_matrix": (make_model("covariance_matrix", "diag"), (X,)),
    "Vindex, config_enumerate": (vindex_style, (X,)),
    "Multinomial mixture": (_mixture("Multinomial"), (FAMILIES["Multinomial"][3],)),
    "Poisson mixture": (poisson_mixture.model, (torch.distributions.Poisson(4.0).sample((50, 3)).to(D), 2)),
    "Gaussian HMM (DiscreteHMM)": (hmm.vectorized_model, (X, 3)),
    "examples/hmm.py model 1 (markov loop, Dirichlet and Beta priors)": (ps.model_1, (SEQUENCES, LENGTHS, ps.args()),
                                                                         {"map_basis": "unconstrained"}),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_a_replayed_run_follows_the_model_run_at_every_step(name):
    model, args, *options = MODELS[name]
    em = _assert_same_run(model, args, **(options[0] if options else {}))
    assert em._replay.off is None and em._replay.replays >= STEPS - 4, (em._replay.off, em._replay.replays)


def test_hard_em_replays_too():
    em = _assert_same_run(gmm.model, (X, 3), posterior="hard")
    assert em._replay.replays > 0


def checks_its_parameters(x):
    """The model checks theta in Python (a bool out of a tensor): a replay could not repeat the check."""
    mu = pyro.param("mu", torch.tensor([1.0, 4.0], dtype=D))
    if bool((mu.abs() > 1e6).any()):
        raise ValueError("mu is out of range")
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(torch.ones(2, dtype=D) / 2), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(mu[z], 1.0), obs=x)


SHIFT = [0.0]


def reads_a_global(x):
    """The data shifted by a module global that the user changes between steps."""
    mu = pyro.param("mu", torch.tensor([1.0, 4.0], dtype=D))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(torch.ones(2, dtype=D) / 2), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(mu[z], 1.0), obs=x - SHIFT[0])


def writes_what_it_read(x):
    """A buffer read beside theta (as a constant) before theta is written into it in place."""
    mu = pyro.param("mu", torch.tensor([1.0, 4.0], dtype=D))
    buffer = torch.ones(2, dtype=D)
    mu * buffer  # reads the buffer while it is a constant
    buffer.mul_(mu)
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(torch.ones(2, dtype=D) / 2), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(buffer[z], 1.0), obs=x)


def fills_a_buffer(x):
    """A parameter written into a fresh tensor in place: a buffer added to."""
    mu = pyro.param("mu", torch.tensor([[1.0, 1.0], [4.0, 4.0]], dtype=D))
    loc = torch.zeros(2, 2, dtype=D)
    loc += mu
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(torch.ones(2, dtype=D) / 2), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.MultivariateNormal(loc[z], scale_tril=torch.eye(2, dtype=D)), obs=x)


def test_parameters_written_in_place_into_fresh_tensors_are_replayed():
    x = torch.cat([torch.randn(30, 2, generator=torch.Generator().manual_seed(0), dtype=D) + 1,
                   torch.randn(30, 2, generator=torch.Generator().manual_seed(1), dtype=D) * 2 + 4])
    em = _assert_same_run(fills_a_buffer, (x,))
    assert em._replay.off is None and em._replay.replays > 0


@pytest.mark.parametrize("model, why", [(checks_its_parameters, "reads a value out of a tensor"),
                                        (writes_what_it_read, "changes in place")])
def test_a_run_that_cannot_be_replayed_faithfully_runs_the_model(model, why):
    x = torch.cat([torch.randn(30, generator=torch.Generator().manual_seed(0), dtype=D) + 1,
                   torch.randn(30, generator=torch.Generator().manual_seed(1), dtype=D) + 4])
    em = _assert_same_run(model, (x,))
    assert why in em._replay.off and em._replay.replays == 0


def _script(em, x):
    """Steps on x, then on x changed in place, then on other arguments (four components), then with
    parameters of another shape behind the same arguments."""
    losses = [em.step(x, 3) for _ in range(6)]
    x.mul_(1.5)  # the same tensor, other values
    losses += [em.step(x, 3) for _ in range(5)]
    pyro.clear_param_store()
    losses += [em.step(x, 4) for _ in range(5)]
    COMPONENTS[0] = 3
    pyro.clear_param_store()
    losses += [em.step(x) for _ in range(6)]
    COMPONENTS[0] = 2
    pyro.clear_param_store()
    losses += [em.step(x) for _ in range(6)]
    return losses


COMPONENTS = [2]


def sized_elsewhere(x, k=None):
    """The GMM model file with k from the module, when not given: its parameters change shape while
    the arguments stay the same."""
    return gmm.model(x, COMPONENTS[0] if k is None else k)


def test_changed_data_and_parameter_shapes_are_recorded_again():
    runs = []
    for replay in (True, False):
        pyro.clear_param_store()
        COMPONENTS[0] = 2
        em = ppl_em.EM(sized_elsewhere, replay=replay)
        if replay:
            em._tape.off = "the model's replay is tested alone"
        runs.append(_script(em, X.clone()))
        if replay:
            assert em._replay.replays > 10
    assert runs[0] == pytest.approx(runs[1], rel=1e-13)


def test_a_replay_that_differs_from_the_model_at_its_check_is_turned_off():
    """The recording is made at step 2; the global changes before step 3, whose check runs the model too."""
    x = torch.cat([torch.randn(30, generator=torch.Generator().manual_seed(0), dtype=D) + 1,
                   torch.randn(30, generator=torch.Generator().manual_seed(1), dtype=D) + 4])
    runs = []
    for replay in (True, False):
        SHIFT[0] = 0.0
        pyro.clear_param_store()
        em = ppl_em.EM(reads_a_global, replay=replay)
        if replay:
            em._tape.off = "the model's replay is tested alone"
        losses = [em.step(x) for _ in range(2)]
        SHIFT[0] = 0.5
        with warnings.catch_warnings():  # other data behind the same tensor: EM's watch sees the loss rise
            warnings.simplefilter("ignore", RuntimeWarning)
            runs.append(losses + [em.step(x) for _ in range(4)])
        if replay:
            assert "differed from a real run" in em._replay.off and em._replay.replays == 0
    SHIFT[0] = 0.0
    assert runs[0] == pytest.approx(runs[1], rel=1e-13)


def test_the_check_compares_tensors_expanded_alike_by_their_stored_elements():
    """A distribution's parameters broadcast to its batch shape: equal where the stored elements are, unequal
    where one is not; a tensor expanded and one written out in full (other strides) element by element."""
    from ppl_em.fast.replay import _equal

    base = torch.arange(6.0, dtype=D).reshape(2, 1, 3)
    other = base.clone()
    assert _equal(base.expand(2, 1000, 3), other.expand(2, 1000, 3))
    other[1, 0, 2] = -1.0
    assert not _equal(base.expand(2, 1000, 3), other.expand(2, 1000, 3))
    assert _equal(base.expand(2, 1000, 3), base.expand(2, 1000, 3).clone())
    assert not _equal(base.expand(2, 1000, 3), other.expand(2, 1000, 3).clone())
    assert not _equal(base.expand(2, 4, 3), base.expand(2, 5, 3)) and not _equal(base, 1.0)


CHUNKED = ["gmm model file", "scale_tril", "Vindex, config_enumerate", "Multinomial mixture", "Poisson mixture"]


@pytest.mark.parametrize("name", CHUNKED)
def test_each_chunk_of_streamed_data_replays_its_own_run(name):
    """chunk_size: the data in chunks, whose views are the same at every step, each chunk's run replayed."""
    model, args, *options = MODELS[name]
    rows = args[0].shape[0]
    chunk = -(-rows // 3)
    em = _assert_same_run(model, args, steps=STEPS, chunk_size=chunk, **(options[0] if options else {}))
    assert em._chunks.rows == chunk and len(em._chunk_replays[1]) == 3
    for replay in em._chunk_replays[1]:
        assert replay.off is None and replay.replays >= STEPS - 4, (replay.off, replay.replays)


def test_held_chunks_follow_the_data_tensors_and_take_the_other_arguments_as_given():
    x = X.clone()
    pyro.clear_param_store()
    em = ppl_em.EM(gmm.model, chunk_size=100)
    em._tape.off = "the model's replay is tested alone"
    for _ in range(5):
        em.step(x, 3, {})  # a new init dict at every call: the chunks' views stay the same
    views = [a[0] for a, _ in em._chunks.split_held((x, 3, {}), {})]
    assert all(v._base is x for v in views) and views[0] is em._chunks.split_held((x, 3, None), {})[0][0][0]
    assert em._chunks.split_held((x, 3, None), {})[0][0][2] is None  # the other arguments as given
    assert [len(a) for a, _ in em._chunks.split_held((x, 3), {})] == [2] * len(views)  # as many as given
    replayed = [r.replays for r in em._chunk_replays[1]]
    assert min(replayed) >= 1
    x.mul_(1.0)  # in place: the same tensor at a new version, seen through the same views
    em.step(x, 3, {})
    assert [r.replays for r in em._chunk_replays[1]] == replayed  # recorded again, not replayed
    other = x.clone()
    assert em._chunks.split_held((other, 3, {}), {})[0][0][0]._base is other  # other data: other views
    for a, b in zip(em._chunks.split_held((other, 3, {}), {}), em._chunks.split((other, 3, {}), {})):
        assert torch.equal(a[0][0], b[0][0])


def test_held_chunks_of_keyword_data_are_the_same_views_at_every_call():
    from ppl_em.chunking import Chunking

    chunking = Chunking(signature=(), rows=100, n=X.shape[0], positions=("x",))
    first = chunking.split_held((), {"x": X, "k": 3})
    again = chunking.split_held((), {"x": X, "k": 4})
    assert len(first) == 3 and all(a[1]["x"] is b[1]["x"] for a, b in zip(first, again))
    assert [c[1]["k"] for c in again] == [4, 4, 4]
    for held, plain in zip(again, chunking.split((), {"x": X, "k": 4})):
        assert torch.equal(held[1]["x"], plain[1]["x"]) and held[1]["k"] == plain[1]["k"]
