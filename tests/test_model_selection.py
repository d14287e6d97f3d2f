"""ppl_em.select: choosing k by BIC, AIC or held-out log-likelihood; its figure; ``ppl-em fit --components A:B``.

The oracle for a choice is the truth: data drawn from every registry model with k = 3
components (or states, or topics) must give back k = 3. The oracle for the numbers is a
hand-written loop over :func:`ppl_em.fit` and ``FitResult.bic``.
"""

import json
import warnings

import numpy as np
import pyro
import pytest
import torch

import ppl_em
from ppl_em import cli
from ppl_em.model_selection import split_data
from ppl_em.models import REGISTRY, bernoulli_mixture, gmm, hmm, kmeans, poisson_mixture, topic
from ppl_em.plot import plot_selection

D = torch.float64


# -- data drawn from each registry model with k = 3 -----------------------------------------
def gmm_data(seed):
    phi = torch.tensor([0.3, 0.3, 0.4], dtype=D)
    mu = torch.tensor([[-4.0, 0.0], [4.0, 0.0], [0.0, 5.0]], dtype=D)
    Sigma = torch.tensor([[[1.0, 0.3], [0.3, 0.5]], [[0.6, 0.0], [0.0, 1.0]], [[0.8, -0.2], [-0.2, 0.8]]], dtype=D)
    return (gmm.generate(300, phi, mu, Sigma, seed=seed)[0],), {}


def kmeans_data(seed):
    mu = torch.tensor([[-4.0, 0.0], [4.0, 0.0], [0.0, 5.0]], dtype=D)
    return (kmeans.generate(300, mu, seed=seed)[0],), {}


def bernoulli_data(seed):
    p = torch.full((3, 12), 0.1, dtype=D)
    for j in range(3):
        p[j, 4 * j:4 * j + 4] = 0.9  # component j switches on its own four pixels
    return (bernoulli_mixture.generate(300, torch.full((3,), 1 / 3, dtype=D), p, seed=seed)[0],), {}


def poisson_data(seed):
    rate = torch.tensor([[1.0, 10.0], [6.0, 6.0], [12.0, 1.0]], dtype=D)
    return (poisson_mixture.generate(300, torch.tensor([0.3, 0.4, 0.3], dtype=D), rate, seed=seed)[0],), {}


def hmm_data(seed, T=15):
    A = torch.full((3, 3), 0.05, dtype=D) + 0.85 * torch.eye(3, dtype=D)  # sticky: rows 0.9 / 0.05 / 0.05
    params = {"pi": torch.full((3,), 1 / 3, dtype=D), "A": A, "sigma": torch.full((3, 2), 0.7, dtype=D),
              "mu": torch.tensor([[-3.0, 0.0], [3.0, 0.0], [0.0, 3.0]], dtype=D)}
    return (hmm.generate(T, **params, num_sequences=6, seed=seed)[0],), {}  # (6, T, 2)


def topic_data(seed):
    V = 15
    beta = torch.full((3, V), 0.01, dtype=D)
    for j in range(3):
        beta[j, 5 * j:5 * j + 5] = 0.2  # topic j is about its own five words
    theta = 0.8 * torch.eye(3, dtype=D)[torch.arange(20) % 3] + 0.2 / 3  # each document mostly one topic
    words, doc, _ = topic.generate([40] * 20, theta, beta / beta.sum(-1, keepdim=True), seed=seed)
    return (words, doc), {"num_docs": 20, "vocab_size": V}


THREE = {  # registry name -> data with k = 3, and the k to try
    "gmm": (gmm_data, range(1, 7)),
    "kmeans": (kmeans_data, range(1, 7)),
    "bernoulli_mixture": (bernoulli_data, range(1, 7)),
    "poisson_mixture": (poisson_data, range(1, 7)),
    "hmm": (hmm_data, range(1, 5)),  # a pyro.markov loop: ~1 ms per time step per trace, so fewer k
    "hmm_vectorized": (hmm_data, range(1, 7)),
    "topic": (topic_data, range(1, 7)),
}
# The VAE's latent z^(i) is continuous: it has no number of components and no exact log p(x).
NO_K = {"vae"}


def test_every_registry_model_is_covered():
    assert set(THREE) | NO_K == set(REGISTRY), "add a k = 3 data set for the new model to THREE (or to NO_K)"


@pytest.mark.parametrize("name", sorted(THREE))
def test_bic_picks_the_true_k_on_data_drawn_from_each_registry_model(name):
    make_data, ks = THREE[name]
    args, kwargs = make_data(0)
    selection = ppl_em.select(REGISTRY[name]["model"], *args, k=ks, n_init=2, tol=1e-5, max_iter=200,
                              progress=False, **kwargs)
    assert selection.best_k == 3, selection.table()
    assert selection.best is selection.results[3]
    assert all(row["converged"] for row in selection.rows)


def test_a_model_without_k_is_refused_with_a_hint():
    args, kwargs = REGISTRY["vae"]["make_data"](0)
    with pytest.raises(ValueError, match=r"takes no argument k\. Give the model a k argument, or fit each variant"):
        ppl_em.select(REGISTRY["vae"]["model"], *args, k=range(1, 3), **kwargs)


def test_select_agrees_with_a_hand_written_loop_over_fit_and_bic():
    (x,), _ = gmm_data(1)
    selection = ppl_em.select(gmm.model, x, k=[1, 2, 3, 4], n_init=2, seed=4, tol=1e-5, max_iter=200, progress=False)
    by_hand = {}
    for k in (1, 2, 3, 4):
        pyro.clear_param_store()
        result = ppl_em.fit(gmm.model, x, k, n_init=2, seed=4, tol=1e-5, max_iter=200, progress=False)
        by_hand[k] = result.bic()
        assert selection.rows[k - 1]["aic"] == pytest.approx(result.aic(), rel=1e-12)
        assert selection.rows[k - 1]["log_likelihood"] == pytest.approx(result.score(), rel=1e-12)
    pyro.clear_param_store()
    assert selection.scores == pytest.approx(by_hand, rel=1e-12)
    assert selection.best_k == min(by_hand, key=by_hand.get) == 3
    assert selection.ks == [1, 2, 3, 4] and selection.criterion == "bic"


@pytest.mark.parametrize("criterion", ["aic", "heldout"])
def test_aic_and_held_out_log_likelihood_pick_the_true_k_on_separated_blobs(criterion):
    (x,), _ = gmm_data(2)
    selection = ppl_em.select(gmm.model, x, k=range(1, 6), criterion=criterion, n_init=2, tol=1e-5, max_iter=200,
                              progress=False)
    assert selection.best_k == 3, selection.table()
    if criterion == "heldout":
        assert selection.split == {"seed": 0, "test_size": 0.25, "n_train": 225, "n_test": 75}
        assert all(row["heldout"] is not None for row in selection.rows)
        # the chosen k is refitted on all the data; the per-k fits saw the training part only
        assert selection.best.n_data == 300 and selection.results[3].n_data == 225
        assert max(selection.scores, key=selection.scores.get) == 3


def test_held_out_score_is_the_mean_log_likelihood_of_the_held_out_rows():
    (x,), _ = gmm_data(3)
    selection = ppl_em.select(gmm.model, x, k=[2, 3], criterion="heldout", test_size=0.2, seed=5, tol=1e-5,
                              progress=False)
    (train, _), (test, _), info = split_data((x,), {}, test_size=0.2, seed=5)
    assert (info["n_train"], info["n_test"]) == (240, 60)
    for k in (2, 3):
        result = selection.results[k]
        assert result.n_data == 240
        assert selection.scores[k] == pytest.approx(result.score(test[0], k), rel=1e-12)


def test_the_split_is_seeded_disjoint_and_complete_and_splits_every_per_row_tensor():
    x = torch.arange(20.0, dtype=D)[:, None]
    labels = torch.arange(20)
    (tr, trk), (te, tek), info = split_data((x, 3), {"labels": labels, "k": 3}, test_size=0.25, seed=1)
    (tr2, _), (te2, _), _ = split_data((x, 3), {"labels": labels}, test_size=0.25, seed=1)
    torch.testing.assert_close(tr[0], tr2[0])
    assert sorted(torch.cat([tr[0], te[0]])[:, 0].tolist()) == list(range(20))
    torch.testing.assert_close(trk["labels"].double(), tr[0][:, 0])  # rows and labels split together
    assert (tr[1], trk["k"], te[1], tek["k"]) == (3, 3, 3, 3)
    assert (info["n_train"], info["n_test"]) == (15, 5)
    (_, _), (te3, _), _ = split_data((x, 3), {}, test_size=0.25, seed=2)
    assert not torch.equal(te3[0], te[0])


def test_topic_model_held_out_split_is_over_tokens():
    (words, doc), kwargs = topic_data(0)
    selection = ppl_em.select(topic.model, words, doc, k=[2, 3, 4], criterion="heldout", tol=1e-5, max_iter=200,
                              progress=False, **kwargs)
    assert selection.split["n_train"] + selection.split["n_test"] == len(words)
    assert selection.best_k == 3, selection.table()


def test_unconverged_fits_are_warned_about_once_naming_their_k():
    (x,), _ = gmm_data(4)
    with pytest.warns(ppl_em.ConvergenceWarning, match=r"the fits for k = 2, 3 did not converge") as record:
        selection = ppl_em.select(gmm.model, x, k=[1, 2, 3], max_iter=3, progress=False)
    assert len(record) == 1
    assert [row["converged"] for row in selection.rows] == [True, False, False]
    assert "  no" in selection.table().splitlines()[-1]


def test_select_leaves_the_callers_param_store_as_it_was():
    pyro.clear_param_store()
    pyro.param("mine", torch.ones(2))
    (x,), _ = kmeans_data(5)
    ppl_em.select(kmeans.model, x, k=[1, 2], progress=False)
    assert list(pyro.get_param_store().keys()) == ["mine"]
    pyro.clear_param_store()


@pytest.mark.parametrize("kwargs, match", [
    ({"k": []}, r"k must hold at least one integer >= 1, e.g. range\(1, 11\), got \[\]"),
    ({"k": [0, 1]}, r"k must hold at least one integer >= 1"),
    ({"k": "abc"}, r"k must be an iterable of integers"),
    ({"k": [1.5]}, r"k must hold at least one integer >= 1"),
    ({"criterion": "loglik"}, r"criterion must be one of \('bic', 'aic', 'heldout'\), got 'loglik'"),
    ({"criterion": "heldout", "test_size": 1.0}, r"test_size must be a fraction in \(0, 1\), got 1.0"),
])
def test_bad_arguments_say_what_was_expected(kwargs, match):
    (x,), _ = gmm_data(0)
    with pytest.raises(ValueError, match=match):
        ppl_em.select(gmm.model, x[:20], **kwargs)


def test_the_table_marks_the_chosen_k_and_the_figure_is_written(tmp_path):
    (x,), _ = gmm_data(6)
    selection = ppl_em.select(gmm.model, x, k=range(1, 5), tol=1e-5, max_iter=200, progress=False)
    lines = selection.table().splitlines()
    assert lines[0] == "criterion: bic (lower is better); chosen k = 3"
    assert [line.split()[0] for line in lines[2:]] == ["1", "2", "*", "4"]
    path = plot_selection(tmp_path / "selection.png", selection)
    data = (tmp_path / "selection.png").read_bytes()
    assert str(path) == str(tmp_path / "selection.png") and data.startswith(b"\x89PNG") and len(data) > 10000


# -- the command line -----------------------------------------------------------------------
@pytest.fixture
def blobs_csv(tmp_path):
    (x,), _ = gmm_data(7)
    path = tmp_path / "blobs.csv"
    np.savetxt(path, x.numpy(), delimiter=",", header="x1,x2", comments="")
    return str(path)


def test_fit_with_a_range_of_components_prints_the_table_and_writes_the_chosen_fit(blobs_csv, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(["fit", "gmm", "--data", blobs_csv, "--components", "1:5", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0 and captured.err == ""
    lines = captured.out.splitlines()
    assert lines[0] == "criterion: bic (lower is better); chosen k = 3"
    assert len(lines) == 2 + 5 + 1 and lines[-1].startswith("wrote ")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "clusters.png", "selection.json",
                                                      "selection.png", "training.png"]
    loaded = ppl_em.load(out / "checkpoint.pt")
    assert loaded.params["mu"].shape == (3, 2)
    summary = json.loads((out / "selection.json").read_text())
    assert summary["chosen_k"] == 3 and [r["k"] for r in summary["rows"]] == [1, 2, 3, 4, 5]


def test_fit_with_components_and_held_out_criterion_prints_json(blobs_csv, tmp_path, capsys):
    rc = cli.main(["fit", "gmm", "--data", blobs_csv, "-k", "2,3,4", "--criterion", "heldout", "--json",
                   "--out", str(tmp_path / "o")])
    summary = json.loads(capsys.readouterr().out)
    assert rc == 0 and summary["criterion"] == "heldout" and [r["k"] for r in summary["rows"]] == [2, 3, 4]
    assert summary["chosen_k"] == max(summary["rows"], key=lambda r: r["heldout"])["k"]
    assert summary["split"]["n_test"] == 75


@pytest.mark.parametrize("argv, match", [
    (["--components", "3:1"], r"expected K, A:B with 1 <= A <= B, or K1,K2,\.\.\. .*got '3:1'; e.g. --components 1:10"),
    (["--components", "0:4"], r"got '0:4'"),
    (["--components", "a:b"], r"got 'a:b'"),
    (["--components", "1:400"], r"--components must lie between 1 and the number of data points \(300\), got up to 400"),
])
def test_bad_component_ranges_exit_2_with_one_line(argv, match, blobs_csv, tmp_path, capsys):
    rc = cli.main(["fit", "gmm", "--data", blobs_csv, "--out", str(tmp_path / "o")] + argv)
    err = capsys.readouterr().err
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("ppl-em: error: ")
    assert __import__("re").search(match, err), err


def test_held_out_rows_of_one_time_series_are_refused(blobs_csv, tmp_path, capsys):
    rc = cli.main(["fit", "hmm_vectorized", "--data", blobs_csv, "--components", "1:3", "--criterion", "heldout",
                   "--out", str(tmp_path / "o")])
    assert rc == 2 and "reads the rows as one time series; use --criterion bic or aic" in capsys.readouterr().err


def test_one_k_still_means_one_fit(blobs_csv, tmp_path, capsys):
    rc = cli.main(["fit", "gmm", "--data", blobs_csv, "-k", "3", "--out", str(tmp_path / "o")])
    assert rc == 0 and capsys.readouterr().out.splitlines()[0].startswith("method")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cli.components_arg("4") == 4 and cli.components_arg("2:4") == [2, 3, 4]
        assert cli.components_arg("5,2,2") == [2, 5]


def test_ppl_em_and_select_work_without_scikit_learn():
    """scikit-learn is optional: blocked, ppl_em still imports and selects, and ppl_em.sklearn says what to install."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['sklearn'] = None\n"  # any import of scikit-learn now fails
        "import torch, ppl_em\n"
        "from ppl_em.models import kmeans\n"
        "x = kmeans.generate(60, torch.tensor([[-5.0, 0.0], [5.0, 0.0]], dtype=torch.float64))[0]\n"
        "assert ppl_em.select(kmeans.model, x, k=[1, 2, 3], progress=False).best_k == 2\n"
        "try:\n"
        "    import ppl_em.sklearn\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ppl_em.sklearn needs scikit-learn >= 1.6, which is not installed: pip install 'ppl_em[sklearn]'" in out.stdout
