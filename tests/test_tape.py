"""The replay of whole closed-form EM steps (ppl_em.fast.tape) against the steps themselves.

Oracle: the same EM run with ``replay=False``, which runs every step's code (and the model) for real.
A replayed run must follow it exactly (the same operations on the same numbers) on models written
the ways users write them; a step that decides from a tensor otherwise than at its recording (an
empty component, a failing update) must run for real; every change of the data, the parameters'
tensors or the plan must be noticed; a step that cannot be replayed faithfully is never replayed.
"""

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

import ppl_em
import ppl_em.em
from ppl_em.models import REGISTRY, gmm, kmeans
from ppl_em.fast import tape as tape_module
from ppl_em.svi import NonFiniteLossError

import test_replay as replay_tests
from test_replay import COMPONENTS, MODELS, SHIFT, X, _script, reads_a_global, sized_elsewhere

D = torch.float64
STEPS = 10


def _run(model, args, replay: bool, steps: int = STEPS, **options):
    return replay_tests._run(model, args, replay, steps, tape=True, **options)


def _assert_same_run(model, args, steps: int = STEPS, **options):
    return replay_tests._assert_same_run(model, args, steps, tape=True, **options)


# The replay tests' models whose steps are not taped, and why: their Q is a gradient (the general contraction)
# or their step writes into a buffer it read as a constant.
UNTAPED = {"Gaussian HMM (DiscreteHMM)": "differentiates",
           "examples/hmm.py model 1 (markov loop, Dirichlet and Beta priors)": "overwrites"}


@pytest.mark.parametrize("name", list(MODELS))
def test_a_taped_run_follows_the_real_steps(name):
    model, args, *options = MODELS[name]
    em = _assert_same_run(model, args, **(options[0] if options else {}))
    if name in UNTAPED:
        assert UNTAPED[name] in em._tape.off and em._tape.replays == 0
    else:  # every mixture: replayed from its third step
        assert em._tape.off is None and em._tape.replays == STEPS - 2, (em._tape.off, em._tape.replays)


def test_the_gmm_file_and_a_scale_tril_model_are_taped():
    """The small fits that the tape is for: recorded at the first step (beside the M-step plan), checked at
    the second, replayed from the third on."""
    for name in ("gmm model file", "scale_tril", "precision_matrix, logits"):
        model, args = MODELS[name][:2]
        em = _assert_same_run(model, args, steps=12)
        assert em._tape.off is None and em._tape.tape.verified and em._tape.replays == 10, (name, em._tape.off)


def test_hard_em_on_a_mixture_is_taped():
    """Its Q(z) is the one-hot of each row's mode, from the table that exact EM normalises: forward calls only."""
    for name in ("gmm model file", "scale_tril"):
        model, args = MODELS[name][:2]
        em = _assert_same_run(model, args, steps=12, posterior="hard")
        assert em._tape.off is None and em._tape.tape.verified and em._tape.replays == 10, (name, em._tape.off)


@pytest.mark.parametrize("posterior", ["exact", "hard"])
def test_a_location_alone_is_taped(posterior):
    """The k-means file (Normal(mu[z], sigma) with sigma fixed): mu's statistics are scattered onto it by the
    selection's index map, which the plan makes: torch calls the tape records (autograd's nodes, called
    directly, it would not see)."""
    x = (X - X.mean(0)) / X.std(0)
    em = _assert_same_run(kmeans.model, (x, 3), steps=12, posterior=posterior)
    assert em._tape.off is None and em._tape.tape.verified and em._tape.replays == 10, em._tape.off
    assert all(u.selection._index is not None for p in em.plan.closed for u in em.plan.uses[p])  # made by the plan


def test_a_step_that_differentiates_is_not_taped():
    """Hard EM's Q(z) through the general max-sum contraction (here a hidden Markov chain's best path) is the
    gradient of a max-product (the probe trick): a replay, which reruns forward calls only, cannot repeat it,
    so those steps run for real."""
    model, args = MODELS["Gaussian HMM (DiscreteHMM)"]
    em = _assert_same_run(model, args, posterior="hard")
    assert "differentiates" in em._tape.off and em._tape.replays == 0


def test_changed_data_parameters_and_shapes_are_recorded_again():
    runs = []
    for replay in (True, False):
        pyro.clear_param_store()
        COMPONENTS[0] = 2
        em = ppl_em.EM(sized_elsewhere, replay=replay)
        runs.append(_script(em, X.clone()))
        if replay:
            assert em._tape.off is None and em._tape.replays > 3
    assert runs[0] == pytest.approx(runs[1], rel=1e-13)


def test_a_tape_that_differs_from_the_real_step_at_its_check_is_turned_off():
    """The tape is recorded at step 1 (the plan's E-step saw every row under Pyro's validation) and checked at
    step 2 against the real step. The global changes before every step, so each check's real step sees other
    data than the recording: it differs (once more with copies in place of out= calls), the step is recorded
    again, and after a few such recordings the steps run for real. No replay ever stands for a step."""
    x = torch.cat([torch.randn(30, generator=torch.Generator().manual_seed(0), dtype=D) + 1,
                   torch.randn(30, generator=torch.Generator().manual_seed(1), dtype=D) + 4])
    runs = []
    for replay in (True, False):
        pyro.clear_param_store()
        em = ppl_em.EM(reads_a_global, replay=replay)
        em._replay.off = "runs the model at every step"  # the tape, not the model's replay, meets the change
        losses = []
        with warnings.catch_warnings():  # other data behind the same tensor: EM's watch sees the loss rise
            warnings.simplefilter("ignore", RuntimeWarning)
            for step in range(10):
                SHIFT[0] = 0.1 * step
                losses.append(em.step(x))
                if replay and step == 0:
                    assert em._tape.tape is not None and not em._tape.tape.verified
        runs.append(losses)
        if replay:
            assert "differed from a real step" in em._tape.off and em._tape.replays == 0
    SHIFT[0] = 0.0
    assert runs[0] == pytest.approx(runs[1], rel=1e-13)


def _two_clusters():
    g = torch.Generator().manual_seed(0)
    return torch.cat([torch.randn(40, 2, generator=g, dtype=D), torch.randn(40, 2, generator=g, dtype=D) + 6])


def test_a_guard_that_comes_out_otherwise_runs_the_step_for_real():
    """A component that empties (every point moved away from it) makes the closed form keep its old value: a
    branch the recorded step did not take. The taped run must take it as the real one does."""
    x = _two_clusters()
    init = {"phi": torch.tensor([0.45, 0.45, 0.1], dtype=D),
            "mu": torch.tensor([[0.0, 0.0], [6.0, 6.0], [3.0, 3.0]], dtype=D),
            "Sigma": torch.eye(2, dtype=D).expand(3, 2, 2).clone()}

    def run(replay):
        pyro.clear_param_store()
        em = ppl_em.EM(gmm.model, replay=replay)
        losses = [em.step(x, 3, init) for _ in range(10)]
        replayed = em._tape.replays
        with torch.no_grad():  # the third component far from every point: it is empty at the next E-step
            dict(pyro.get_param_store().named_parameters())["mu"][2] = torch.tensor([1e3, 1e3], dtype=D)
        losses += [em.step(x, 3, init) for _ in range(4)]
        # the other way recorded at the stopped replay, checked at the next step, replayed from then on
        assert not replay or 0 < replayed < em._tape.replays
        return losses, {n: v.detach().clone() for n, v in em.params.items()}, em

    (taped, params, em), (real, ref, _) = run(True), run(False)
    assert taped == pytest.approx(real, rel=1e-13)
    for name in params:
        torch.testing.assert_close(params[name], ref[name], rtol=1e-12, atol=1e-13)
    assert em._tape.off is None and em._tape.misses == 1


def test_a_step_whose_way_keeps_changing_is_recorded_again_a_few_times_then_runs_for_real():
    """theta = 1, -2, 0, 2, -1, 1, ...: the branch on theta > 0 changes at every second step. Each stopped
    replay records the step again, RECORDINGS_AFTER_MISSES times; after that a stopped replay runs the step
    for real. Every step's loss and theta equal those of the plain steps."""
    def run(taped: bool):
        theta = torch.tensor([1.0], dtype=D)
        roots, tape, losses = {"theta": theta}, tape_module.StepTape(), []

        def region():
            loss = (theta * 2.0).sum()
            with torch.no_grad():
                if bool(theta > 0):
                    theta.sub_(3.0)
                else:
                    theta.add_(2.0)
            return loss

        for _ in range(15):
            losses.append(float(tape.step(region, "key", roots) if taped else region()))
        return losses, tape

    (taped, tape), (real, _) = run(True), run(False)
    assert taped == real
    assert tape.misses > tape_module.RECORDINGS_AFTER_MISSES and tape.replays > 0 and tape.off is None


def test_a_failing_step_raises_and_keeps_the_parameters_as_a_real_step_does():
    """A guard (the objective's finiteness) stops the replay before any parameter is written; the real
    step then raises its own error and restores theta."""
    x = _two_clusters()
    pyro.clear_param_store()
    em = ppl_em.EM(gmm.model)
    for _ in range(8):
        em.step(x, 2)
    assert em._tape.replays > 0
    store = dict(pyro.get_param_store().named_parameters())
    with torch.no_grad():
        store["mu"][0, 0] = float("nan")
    before = {n: v.detach().clone() for n, v in store.items()}
    with pytest.raises(NonFiniteLossError):
        em.step(x, 2)
    for name, value in before.items():
        assert torch.equal(value, store[name], ) or torch.isnan(value).any()
        torch.testing.assert_close(store[name], value, equal_nan=True, rtol=0, atol=0)


def prints_its_mean(x):
    """A model that reads theta into Python each run: no step is recorded."""
    mu = pyro.param("mu", torch.tensor([1.0, 4.0], dtype=D))
    scale = float(mu.detach().abs().max()) / float(mu.detach().abs().max())  # 1.0, read out of theta
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(torch.ones(2, dtype=D) / 2), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(mu[z], scale), obs=x)


def test_a_step_that_reads_a_value_out_of_theta_is_never_taped():
    x = torch.cat([torch.randn(30, generator=torch.Generator().manual_seed(0), dtype=D) + 1,
                   torch.randn(30, generator=torch.Generator().manual_seed(1), dtype=D) + 4])
    em = _assert_same_run(prints_its_mean, (x,))
    assert em._tape.tape is None and em._tape.replays == 0


def test_replay_false_runs_every_step():
    _, _, em = _run(gmm.model, (X, 3), False)
    assert em._tape.off == "EM(..., replay=False)" and em._tape.replays == 0


def test_large_data_is_not_recorded(monkeypatch):
    """Beyond TAPE_ELEMENTS the step's Python is a small part of it: no recording, no tables kept."""
    monkeypatch.setattr(ppl_em.em, "TAPE_ELEMENTS", X.numel() - 1)
    _, _, em = _run(gmm.model, (X, 3), True)
    assert em._tape.tape is None and em._tape.off is None and em._tape.replays == 0


def test_a_recording_that_would_keep_too_much_memory_is_refused(monkeypatch):
    monkeypatch.setattr(tape_module, "TAPE_BYTES", 1024)
    em = _assert_same_run(gmm.model, (X, 3))
    assert "MB of the step's tables" in em._tape.off and em._tape.replays == 0


def warns_each_run(x):
    """A model that warns at every run: a replay would not warn, so no step is replayed."""
    warnings.warn("a model's own warning", UserWarning)
    mu = pyro.param("mu", torch.tensor([1.0, 4.0], dtype=D))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(torch.ones(2, dtype=D) / 2), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(mu[z], 1.0), obs=x)


def test_a_step_that_warns_is_not_replayed_and_keeps_warning():
    x = torch.cat([torch.randn(30, generator=torch.Generator().manual_seed(0), dtype=D) + 1,
                   torch.randn(30, generator=torch.Generator().manual_seed(1), dtype=D) + 4])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        em = _assert_same_run(warns_each_run, (x,))
    ours = [w for w in caught if "a model's own warning" in str(w.message)]
    assert len(ours) >= 2 * STEPS  # every step of both runs warned (some ran the model more than once)
    assert "the step warns" in em._tape.off and em._tape.replays == 0


def test_restarts_on_a_cleared_param_store_replay_the_same_recording():
    """fit(..., n_init=...) clears the param store for every restart: new tensors of the same names, shapes and
    constraints. The recording holds for them (their values go in and out of it), and the restarts follow the
    real steps."""
    runs, tapes = [], []
    for replay in (True, False):
        em, losses = ppl_em.EM(gmm.model, replay=replay), []
        for seed in range(3):
            pyro.clear_param_store()
            em.reset()
            pyro.param("mu", X[[seed, 100 + seed, 200 + seed]].clone())  # the store's value over the file's own start
            losses += [em.step(X, 3) for _ in range(6)]
            tapes.append(em._tape.tape)
        runs.append((losses, {n: v.detach().clone() for n, v in em.params.items()}))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-13)
    for name, value in runs[0][1].items():
        torch.testing.assert_close(value, runs[1][1][name], rtol=1e-12, atol=1e-13)
    assert tapes[0] is tapes[1] is tapes[2] is not None  # recorded once, in the first restart


def test_fit_with_restarts_equals_the_real_steps():
    results = []
    for replay in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ppl_em.ConvergenceWarning)  # 15 iterations: not converged, by design
            results.append(ppl_em.fit(gmm.model, X, 3, n_init=3, max_iter=15, progress=False, seed=0,
                                      em_options={"replay": replay}))
    assert results[0].log_likelihood == pytest.approx(results[1].log_likelihood, rel=1e-12)
    for name, value in results[0].params.items():
        torch.testing.assert_close(value, results[1].params[name], rtol=1e-10, atol=1e-12)


def test_data_changed_after_replayed_steps_are_checked_again():
    """A NaN written into the data in place (a new version), or new data: the check of the arguments runs
    again (it is skipped only for the very tensors already through a step, unchanged)."""
    x = X.clone()
    pyro.clear_param_store()
    em = ppl_em.EM(gmm.model)
    for _ in range(6):
        em.step(x, 3)
    assert em._tape.replays > 0
    x[5, 1] = float("nan")
    with pytest.raises(ValueError, match="argument 0"):
        em.step(x, 3)
    y = X.clone()
    y[7, 0] = float("inf")
    with pytest.raises((ValueError, NonFiniteLossError), match="data index 7|index \\(7, 0\\)"):
        em.step(y, 3)
    assert all(torch.isfinite(v).all() for v in em.params.values())  # nothing lost


def test_a_buffer_reused_for_blocks_of_the_data_is_not_taped(monkeypatch):
    """The diagonal Normal's M-step sums reuse one buffer of features for every block of rows, and read it
    between the writes: a replay would read the last block's features for all of them. Such a step is not
    recorded (it says why), and the run still follows the real steps."""
    from ppl_em.fast import gaussian

    monkeypatch.setattr(gaussian, "FEATURE_ELEMENTS", 64 * 5)  # blocks of 64 rows
    model = lambda x, k: gmm.model(x, k, covariance_type="diag")  # noqa: E731
    em = _assert_same_run(model, (X, 3))
    assert em._tape.off is not None and "overwrites" in em._tape.off, em._tape.off


@pytest.mark.parametrize("args, kwargs", [
    ((torch.ones(2), 3.0, torch.zeros(1)), {}),
    ((torch.ones(2),), {"out": torch.empty(2), "alpha": 2}),
    (([torch.ones(2), torch.zeros(3)], 0), {}),  # torch.cat's list
    ((torch.ones(2),), {"dims": (torch.zeros(1), 1)}),
    ((torch.ones(2, 1), torch.Size([2, 3])), {}),  # expand's shape
    ((torch.ones(3, 2), (torch.zeros(1, dtype=torch.long), [torch.ones(1, dtype=torch.long)])), {}),  # t[i, [j]]
    ((torch.ones(2), {"a": torch.zeros(1), "b": (1, torch.ones(1))}), {"c": [torch.zeros(2)]}),
    ((), {}),
])
def test_the_recorders_scan_of_a_calls_tensors_is_its_leaves(args, kwargs):
    """The flat scan finds the tensors that the leaves of (args, kwargs) hold (oracle), the same objects in order."""
    from ppl_em.fast.replay import _leaves, _tensors
    expected = [t for t in _leaves((args, kwargs)) if torch.is_tensor(t)]
    found = _tensors(args, kwargs)
    assert len(found) == len(expected) and all(a is b for a, b in zip(found, expected))


def test_the_first_step_is_recorded_where_the_plans_e_step_saw_every_row(monkeypatch):
    """The plan's E-step takes the first PLAN_ROWS rows under Pyro's validation: where those are all the data,
    the first step (validation off) is recorded beside the plan; on more rows, the first step's own E-step
    validates them and the second is recorded. Either way the run is the real one (oracle: replay=False)."""
    monkeypatch.setattr(ppl_em.em, "PLAN_ROWS", 16)
    for rows, expected in ((12, [True, True, True]), (len(X), [False, True, True])):
        x = X[:rows]
        runs = []
        for replay in (True, False):
            pyro.clear_param_store()
            em = ppl_em.EM(gmm.model, replay=replay)
            recorded, losses = [], []
            for _ in range(3):
                losses.append(em.step(x, 2))
                recorded.append(em._tape.tape is not None)
            runs.append(losses)
            if replay:
                assert recorded == expected, (rows, recorded)
        assert runs[0] == pytest.approx(runs[1], rel=1e-13)


def test_a_step_from_the_recorded_parameters_runs_for_real_and_the_check_waits(monkeypatch):
    """A restart from the very start of the recording: a check there would prove nothing (the recorded tensors
    hold that step's values), so the step runs for real, unchecked, and the next step, from other parameters,
    is the check. The losses are the real run's (oracle: replay=False)."""
    init = {"phi": torch.tensor([0.5, 0.5], dtype=D), "mu": torch.tensor([[2.0, 55.0], [4.5, 80.0]], dtype=D),
            "Sigma": torch.tensor([[1.0, 0.0], [0.0, 30.0]], dtype=D).expand(2, 2, 2).clone()}
    checks = []
    own = tape_module.StepTape._check
    monkeypatch.setattr(tape_module.StepTape, "_check", lambda self, *a: checks.append(1) or own(self, *a))
    runs = []
    for replay in (True, False):
        pyro.clear_param_store()
        em = ppl_em.EM(gmm.model, replay=replay)
        losses = [em.step(X, 2, init)]  # recorded (the plan's E-step validated X)
        pyro.clear_param_store()  # a restart from the same start
        losses.append(em.step(X, 2, init))
        if replay:
            assert em._tape.tape is not None and not em._tape.tape.verified and checks == []
        losses += [em.step(X, 2, init) for _ in range(3)]
        if replay:
            assert em._tape.tape.verified and checks == [1] and em._tape.replays == 2
        runs.append(losses)
    assert runs[0] == pytest.approx(runs[1], rel=1e-13)


def _log_likelihoods(model, args, replay: bool, steps: int = 8, **options):
    """log p(x; theta) before each of ``steps`` EM steps (a user's monitoring loop), and the EM object."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    em = ppl_em.EM(model, replay=replay, **options)
    values = []
    for _ in range(steps):
        em.step(*args)
        values.append(em.log_likelihood(*args))
    return values, em


@pytest.mark.parametrize("name", list(MODELS))
def test_a_log_likelihood_per_iteration_equals_the_real_e_step(name):
    """The log-likelihood on data seen before is recorded at its second computation, checked at the third
    and replayed from the fourth: the same numbers as the E-step run for real, on every model."""
    model, args, *options = MODELS[name]
    options = options[0] if options else {}
    values, em = _log_likelihoods(model, args, True, **options)
    real, _ = _log_likelihoods(model, args, False, **options)
    assert values == pytest.approx(real, rel=1e-13, abs=1e-13)
    if name in ("gmm model file", "scale_tril"):
        assert em._log_px_tape.off is None and em._log_px_tape.replays == len(values) - 3


def test_a_log_likelihood_after_a_restart_replays_and_of_other_data_runs_for_real():
    """A restart's cleared store (new parameter tensors, the same layout) replays the same recording at the
    new values; other data are computed for real (and are a first sight: the next call on them is real too)."""
    pyro.clear_param_store()
    em, ref = ppl_em.EM(gmm.model), ppl_em.EM(gmm.model, replay=False)
    for _ in range(5):
        em.step(X, 3)
        em.log_likelihood(X, 3)
    replays = em._log_px_tape.replays
    assert replays == 2
    pyro.clear_param_store()
    em.reset()
    em.step(X, 3)
    assert em.log_likelihood(X, 3) == ref.log_likelihood(X, 3)
    assert em._log_px_tape.replays == replays + 1
    other = X + 0.5
    for _ in range(2):
        assert em.log_likelihood(other, 3) == ref.log_likelihood(other, 3)
    assert em._log_px_tape.replays == replays + 1


def test_a_fit_with_restarts_scores_each_restart_as_the_real_e_step():
    results = []
    for replay in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ppl_em.ConvergenceWarning)
            results.append(ppl_em.fit(gmm.model, X, 3, n_init=5, max_iter=15, progress=False, seed=0,
                                      em_options={"replay": replay}))
    assert [r["log_likelihood"] for r in results[0].restarts] == \
        pytest.approx([r["log_likelihood"] for r in results[1].restarts], rel=1e-13)


FILE_RUNS = [(name, posterior) for name in ("gmm", "kmeans", "bernoulli_mixture", "poisson_mixture", "hmm",
                                             "hmm_vectorized", "topic")
             for posterior in ("exact", "hard") if posterior == "exact" or "hard_em" in REGISTRY[name]["methods"]]


@pytest.mark.parametrize("name, posterior", FILE_RUNS)
def test_every_model_file_is_taped_on_its_small_data_or_says_why_not(name, posterior):
    """A regression guard: a model file whose small steps silently stopped being replayed (a check that fails
    at every try) would cost several times each step. The mixtures are replayed from their third step; the
    chains take the general contraction, whose Q is a gradient (the recorder turns off at the first reason it
    meets: that one, or an in-place write it cannot follow); the topic model's theta[doc_i] is a per-row
    selection, read again from each step's autograd graph, so its steps are not recorded at all."""
    entry = REGISTRY[name]
    data = entry["make_data"](0)
    args = data[0] if isinstance(data[0], tuple) else (data[0],)
    pyro.clear_param_store()
    em = ppl_em.EM(entry["model"], posterior=posterior)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (a model file's own notes on its data)
        for _ in range(8):
            em.step(*args)
    if name in ("hmm", "hmm_vectorized"):  # (which of its reasons the recorder meets first may vary between runs)
        assert em._tape.off and em._tape.tape is None and em._tape.replays == 0
    elif name == "topic":
        assert em.plan.needs_graph and em._tape.tape is None and em._tape.replays == 0
    else:
        assert em._tape.off is None and em._tape.replays == 6, em._tape.off


def _count_whole_steps(em, monkeypatch):
    """The steps that take the whole way through EM._iterate (not the replay straight away), counted."""
    whole = []
    own = em._iterate
    monkeypatch.setattr(em, "_iterate", lambda args, kwargs: whole.append(1) or own(args, kwargs))
    return whole


def test_replayed_steps_go_straight_to_the_tape_until_what_they_decide_from_changes(monkeypatch):
    """After a step that replayed its checked tape, the next step on the same data replays it at once (none of
    the step's decisions is taken again) while nothing that those decisions read has changed: the data (in
    place), an option, the store's tensors, the M-step plan. Each change sends one step the whole way again.
    Every loss and parameter equals that of the real steps (oracle: replay=False)."""
    def script(em, x, whole):
        losses, counts = [], []

        def steps(n):
            for _ in range(n):
                losses.append(em.step(x, 3))
            counts.append(len(whole))

        steps(6)  # recorded, checked, then replayed
        steps(4)  # the same: straight to the tape
        em.reg_covar = 1e-4  # an option
        steps(4)
        x.add_(0.01)  # the data in place (a new version)
        steps(4)
        store = pyro.get_param_store()
        store["mu"] = store["mu"].detach() + 0.1  # a new tensor in the store
        steps(4)
        em.plan = None  # the plan made again
        steps(4)
        with torch.no_grad():  # the grad mode is part of what a step decides from
            steps(3)
        return losses, counts

    runs = []
    for replay in (True, False):
        pyro.clear_param_store()
        em = ppl_em.EM(gmm.model, replay=replay)
        whole = _count_whole_steps(em, monkeypatch)
        losses, counts = script(em, X.clone(), whole)
        runs.append((losses, {n: v.detach().clone() for n, v in em.params.items()}))
        if replay:
            steps_each = [6, 4, 4, 4, 4, 4, 3]
            straight = [n - (c - b) for n, b, c in zip(steps_each, [0] + counts[:-1], counts)]
            assert straight[1] == 4, counts  # nothing changed: every step straight to the tape
            assert all(0 < s < n for s, n in zip(straight[2:], steps_each[2:])), (counts, straight)
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-13)
    for name, value in runs[0][1].items():
        torch.testing.assert_close(value, runs[1][1][name], rtol=1e-12, atol=1e-13)


def test_a_replay_that_raises_takes_the_whole_way_which_raises_and_keeps_the_parameters(monkeypatch):
    """A replay straight away that fails on its way (here made to) has written no parameter; the step then
    takes the whole way, whose own failure is the error the user gets, with the parameters as they were."""
    pyro.clear_param_store()
    em = ppl_em.EM(gmm.model)
    for _ in range(6):
        em.step(X, 3)
    assert em._fast is not None and em._tape.tape.writes_last
    before = {n: v.detach().clone() for n, v in pyro.get_param_store().named_parameters()}

    def fails(roots):
        raise RuntimeError("linalg.cholesky: the factorization could not be completed")

    monkeypatch.setattr(em._tape.tape, "run", fails)
    with pytest.raises(RuntimeError, match="cholesky"):
        em.step(X, 3)
    assert em._fast is None
    for name, value in pyro.get_param_store().named_parameters():
        assert torch.equal(value.detach(), before[name]), name


def test_a_tape_whose_parameters_are_written_last_is_told_from_one_that_writes_and_computes_on():
    theta = torch.tensor([1.0, 2.0], dtype=D)
    roots = {"theta": theta}

    def last():
        loss = (theta * 2.0).sum()
        with torch.no_grad():
            theta.copy_(theta / 2.0)
        return loss

    def between():
        with torch.no_grad():
            theta.mul_(0.5)
        return (theta * 3.0).sum()  # computed after the write: a failure here would leave theta written

    for region, expected in ((last, True), (between, False)):
        tape = tape_module.StepTape()
        tape.step(region, "key", roots)
        assert tape.tape is not None and tape.tape.writes_last is expected


def test_the_objectives_watch_sees_parameters_changed_in_place_between_steps():
    """Parameters set in place between two steps (a new version of the same tensor): the watch does not take a
    higher loss for a fall of EM's objective (no warning, the plan stays)."""
    pyro.clear_param_store()
    em = ppl_em.EM(gmm.model)
    for _ in range(6):
        em.step(X, 3)
    plan = em.plan
    with torch.no_grad():
        dict(pyro.get_param_store().named_parameters())["mu"].add_(3.0)  # a worse start: the loss rises
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        em.step(X, 3)
    assert em.plan is plan


def test_a_fresh_buffer_that_takes_a_freed_constants_id_is_not_taken_for_that_constant():
    """The recorder knows the constants that calls on theta read by their ids; it holds them, so that a tensor
    made after one of them was freed cannot take its id and look like a constant written in place (which
    refuses the recording). Here a constant read beside theta by a call that makes only views is dropped,
    buffers are made right after (where the constant is not held, one of them takes its address as a rule)
    and theta is added into one: every recording is made, and its replays equal the real steps."""
    def region(theta):
        constant = torch.full((2,), 0.5, dtype=D)
        wide, _ = torch.broadcast_tensors(theta, constant)  # a view of theta: read beside the constant, not kept
        loss = (wide * 2.0).sum()
        freed = id(constant)
        del constant, _
        made = [torch.zeros(2, dtype=D) for _ in range(200)]
        buffer = next((t for t in made if id(t) == freed), made[0])
        buffer.add_(theta)
        with torch.no_grad():
            theta.copy_(buffer * 0.9 + 0.1)
        return loss

    theta = torch.tensor([1.0, 2.0], dtype=D)
    for _ in range(10):
        recorder = tape_module._TapeRecorder({"theta": theta})
        with recorder:
            region(theta)
        assert recorder.problem is None, recorder.problem
    runs, tape = [], tape_module.StepTape()
    for taped in (True, False):
        theta = torch.tensor([1.0, 2.0], dtype=D)
        runs.append([float(tape.step(lambda: region(theta), "key", {"theta": theta}) if taped else region(theta))
                     for _ in range(6)])
    assert runs[0] == runs[1] and tape.off is None and tape.replays == 4


def _direct_forms_region(theta, index, negative):
    """A step that makes, from theta, the tensors that a replay writes into straight away: a gather by a constant
    index, one by an index made from theta (argmax), one by a negative constant index, a gather along the last
    dimension, a reshape that copies, a test for finite values, a diagonal embedding, a max with its indices, a
    Cholesky factor with its info, a batched triangular solve, an out= call into a buffer it does not read;
    theta then moves by all of them."""
    scratch = torch.empty(3, 2, dtype=D)
    a = theta.exp()  # (3, 2)
    picked = a[index]  # (2, 1, 2)
    best = a[a.argmax(0)]  # an index that changes with theta
    last = a[negative]
    columns = a[..., torch.tensor([1, 0, 1])]  # a gather along the last dimension
    finite = torch.isfinite(a / theta)  # theta holds no 0: all finite (a replay tests it as |x| < inf)
    flat = a.t().reshape(-1)  # a copy (a transposed view cannot be viewed flat)
    diag = torch.diag_embed(a)  # (3, 2, 2)
    values, where = a.max(-1, keepdim=True)
    spd = diag @ diag.mT + torch.eye(2, dtype=D)
    factor, info = torch.linalg.cholesky_ex(spd)
    solved = torch.linalg.solve_triangular(torch.linalg.cholesky(spd), torch.eye(2, dtype=D).expand(3, 2, 2), upper=False)
    torch.add(a, 1.0, out=scratch)  # into a buffer it does not read (nothing of it restored at a replay)
    loss = (picked.sum() + best.sum() + last.sum() + flat[1] + values.sum() + where.sum() + factor.sum()
            + solved.sum() + scratch.sum() + info.sum() + columns.sum() + finite.sum())
    with torch.no_grad():
        theta.copy_(0.5 * theta + 0.01 * (picked.sum() + solved.sum()))
    return loss


def test_a_replay_writes_gathers_reshapes_diagonals_and_several_results_straight_into_the_recorded_tensors():
    """Calls without an out= of their own, replayed as calls that write the same values into the recorded
    tensors (index_select for a gather by a constant index, a copy for a reshape that copied, the diagonal set
    over zeros, out=(values, indices) for max and cholesky_ex, out= into a batched factor's own layout), and
    an out= call into a buffer that it does not read, whose old values need no restoring: the replayed run
    equals the real steps to the bit; gathers by an index that changes (argmax) or by a negative one stay
    copies."""
    def run(taped: bool):
        theta = torch.tensor([[0.1, 0.2], [0.3, -0.1], [0.0, 0.4]], dtype=D)
        index = torch.tensor([[2], [0]])
        negative = torch.tensor([-1, 0])
        tape, losses = tape_module.StepTape(), []
        for _ in range(8):
            region = lambda: _direct_forms_region(theta, index, negative)  # noqa: E731
            losses.append(float(tape.step(region, "key", {"theta": theta}) if taped else region()))
        return losses, theta, tape

    (taped, theta, tape), (real, ref, _) = run(True), run(False)
    assert taped == real and torch.equal(theta, ref)
    assert tape.off is None and tape.replays == 6 and tape.tape.direct
    kinds = {}
    for kind, thunk, _ in tape.tape.calls:
        name = getattr(getattr(thunk, "func", thunk), "__name__", "")
        kinds.setdefault(name, set()).add(kind)
    assert kinds["index_select"] == {tape_module._OUT}  # the constant index
    assert tape_module._COPY in kinds["__getitem__"]  # the argmax's and the negative index's
    straight = ("diag_embed", "max", "linalg_cholesky_ex", "linalg_solve_triangular", "linalg_cholesky", "isfinite")
    assert all(kinds.get(n) == {tape_module._OUT} for n in straight) and "reshape" not in kinds, kinds
    assert not any(op[4] for op in tape.tape.ops if op[0] != tape_module._GUARD)  # nothing restored before a call


def test_a_parameter_given_another_layout_through_data_is_not_replayed_straight_away():
    """``p.data = ...`` keeps the store's tensor and its version but may change its shape or dtype, which the
    tape's key holds: the straight replay's check sees it too and leaves the step to the whole way."""
    pyro.clear_param_store()
    em = ppl_em.EM(gmm.model)
    for _ in range(6):
        em.step(X, 3)
    assert em._fast is not None and em._fast.holds(em, (X, 3), {})
    mu = dict(pyro.get_param_store().named_parameters())["mu"]
    kept = mu.data
    mu.data = kept.float()
    assert not em._fast.holds(em, (X, 3), {})
    mu.data = kept
    assert em._fast.holds(em, (X, 3), {})
