"""Figures: valid PNGs written atomically, nothing left open, ellipses where the math puts them."""

import os
import warnings

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")  # before pyplot: the test only reads pyplot's figure registry
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

import ppl_em  # noqa: E402
from ppl_em import plot  # noqa: E402
from ppl_em.datasets import load_old_faithful  # noqa: E402
from ppl_em.models import gmm, vae  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"



@pytest.fixture(scope="module")
def results():
    x = load_old_faithful()[::4]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ppl_em.ConvergenceWarning)
        em = ppl_em.fit(gmm.model, x, 2, progress=False)
        svi = ppl_em.fit(gmm.model, x, 2, method="svi", max_iter=30, log_px_every=10, progress=False)
    return x, em, svi


def is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == PNG


def test_ellipse_points_lie_at_the_requested_mahalanobis_radius():
    mu = np.array([3.0, 70.0])
    Sigma = np.array([[0.2, 1.5], [1.5, 40.0]])
    for r in (1.0, 2.0):
        pts = plot.ellipse_points(mu, Sigma, r, num=50)
        diff = pts - mu
        m2 = np.einsum("ni,ij,nj->n", diff, np.linalg.inv(Sigma), diff)
        np.testing.assert_allclose(m2, r * r, rtol=1e-10)


def test_every_figure_is_a_png_at_the_returned_path_and_nothing_stays_open(results, tmp_path):
    x, em, svi = results
    resp = em.predict_proba()
    encoder, decoder = vae.Encoder(x_dim=64, hidden=8, z_dim=2), vae.Decoder(z_dim=2, hidden=8, x_dim=64)
    images = (torch.rand(6, 64) < 0.3).float()
    paths = [
        plot.plot_clusters(tmp_path / "clusters.png", x, resp, em.params["mu"], em.params["Sigma"]),
        plot.plot_clusters(tmp_path / "points.png", x, resp),
        plot.plot_training(tmp_path / "training.png", {"EM": em, "SVI": svi}),
        plot.plot_elbo_gap(tmp_path / "gap.png", {"EM": em, "SVI": svi}),
        plot.plot_elbo_gap(tmp_path / "gap_empty.png", {"hard": em.__class__(**{**em.__dict__, "method": "hard_em"})}),
        plot.plot_latent_space(tmp_path / "latent.png", encoder, images, labels=torch.arange(6) % 3),
        plot.plot_reconstructions(tmp_path / "recon.png", images, lambda v: torch.sigmoid(decoder(encoder(v)[0])), n=4),
    ]
    for path in paths:
        assert os.fspath(path) == path and is_png(path), path
    assert plt.get_fignums() == []
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in paths)  # no temporary files


def test_elbo_gap_is_log_px_minus_the_elbo_at_the_same_iterations(results, tmp_path, monkeypatch):
    _, em, svi = results
    drawn = []
    original = Figure.add_subplot

    def spy(self, *args, **kwargs):
        ax = original(self, *args, **kwargs)
        real_plot = ax.plot

        def recording_plot(*a, **k):
            drawn.append((np.asarray(a[0]), np.asarray(a[1]), k.get("label")))
            return real_plot(*a, **k)

        ax.plot = recording_plot
        return ax

    monkeypatch.setattr(Figure, "add_subplot", spy)
    plot.plot_elbo_gap(tmp_path / "gap.png", {"SVI": svi})
    (xs, gap, label), = [d for d in drawn if d[2] == "SVI"]
    recorded = [h for h in svi.history if "log_px" in h]
    np.testing.assert_array_equal(xs, [h["iteration"] for h in recorded])
    np.testing.assert_allclose(gap, [h["log_px"] + h["loss"] / svi.n_data for h in recorded], rtol=1e-12)
    assert (gap >= -1e-9).all()  # the enumerated ELBO is a lower bound on log p(x)


def test_a_failed_save_keeps_the_old_figure(results, tmp_path, monkeypatch):
    x, em, _ = results
    path = plot.plot_clusters(tmp_path / "c.png", x, em.predict_proba())
    with open(path, "rb") as f:
        before = f.read()

    def broken(self, f, **kwargs):
        f.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        plot.plot_clusters(path, x, em.predict_proba())
    with open(path, "rb") as f:
        assert f.read() == before
    assert os.listdir(tmp_path) == ["c.png"]


def test_bad_shapes_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"expected x of shape \(n, 2\), got \(5, 3\)"):
        plot.plot_clusters(tmp_path / "c.png", torch.zeros(5, 3), torch.ones(5, 2) / 2)
    with pytest.raises(ValueError, match=r"latent codes of shape \(n, m >= 2\), got \(5, 1\)"):
        plot.plot_latent_space(tmp_path / "l.png", lambda v: v[:, :1], torch.zeros(5, 3))
