"""Figures of a fit, written as PNG files (matplotlib, Agg renderer, no global pyplot state).

* :func:`plot_clusters`: 2-D data coloured by the responsibilities w_j^(i), with each
  component's covariance ellipses {x : (x - mu_j)^T Sigma_j^{-1} (x - mu_j) = r^2}.
* :func:`plot_training`: log p(x) (EM) and ELBO(x; Q, theta) (SVI, amortized guides) per
  observation, by iteration and by wall time, on shared axes.
* :func:`plot_elbo_gap`: log p(x; theta) - ELBO(x; Q, theta) = KL(Q(z) || p(z | x; theta)),
  zero for EM right after its E-step, positive for an SVI guide.
* :func:`plot_latent_space`, :func:`plot_reconstructions`: for amortized (VAE-style) fits,
  given an encoder and a decoder as plain callables.
* :func:`plot_selection`: a model-selection criterion (BIC, AIC, held-out log-likelihood)
  against the number of components k, the chosen k marked (:func:`ppl_em.select`).

Each function takes the output path first, writes the PNG atomically (a temporary file in the
same directory, renamed over the path) and returns the path. Figures are built with
:class:`matplotlib.figure.Figure` directly, so nothing is left open in pyplot and the
user's interactive backend is never switched.

References: lecture notes, "EM algorithm" (the ELBO is tight at Q(z) = p(z | x; theta)).
"""

from __future__ import annotations

import os
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from .checkpoint import atomic_write
from .result import FitResult

__all__ = ["plot_clusters", "plot_training", "plot_elbo_gap", "plot_latent_space", "plot_reconstructions",
           "plot_selection", "ellipse_points"]

COLORS = np.array([[0.12, 0.47, 0.71], [1.00, 0.50, 0.05], [0.17, 0.63, 0.17], [0.84, 0.15, 0.16],
                   [0.58, 0.40, 0.74], [0.55, 0.34, 0.29], [0.89, 0.47, 0.76], [0.50, 0.50, 0.50],
                   [0.74, 0.74, 0.13], [0.09, 0.75, 0.81]])


def _save(fig: Figure, path: "os.PathLike[str] | str") -> str:
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight"))


def _numpy(t) -> np.ndarray:
    return t.detach().cpu().numpy() if torch.is_tensor(t) else np.asarray(t)


def ellipse_points(mu, Sigma, r: float = 1.0, num: int = 100) -> np.ndarray:
    """Points of the ellipse (x - mu)^T Sigma^{-1} (x - mu) = r^2, shape (num, 2).

    With Sigma = U diag(lambda) U^T, x = mu + r U diag(sqrt(lambda)) (cos t, sin t).
    """
    lam, U = np.linalg.eigh(_numpy(Sigma))
    t = np.linspace(0.0, 2.0 * np.pi, num)
    circle = np.stack([np.cos(t), np.sin(t)])  # (2, num)
    return _numpy(mu)[None, :] + (r * U @ (np.sqrt(np.clip(lam, 0, None))[:, None] * circle)).T


def plot_clusters(path, x, resp, mu=None, Sigma=None, title: Optional[str] = None,
                  radii: Sequence[float] = (1.0, 2.0), labels: Sequence[str] = ("x_1", "x_2")) -> str:
    """Scatter 2-D data coloured by responsibility, with covariance ellipses.

    Parameters
    ----------
    path : path-like
        Output PNG.
    x : tensor or array of shape (n, 2)
        The data x^(i).
    resp : tensor or array of shape (n, k)
        w_j^(i); a point's colour is the w-weighted mix of the component colours.
    mu : (k, 2), optional
        Component means mu_j, drawn as crosses.
    Sigma : (k, 2, 2), optional
        Covariances Sigma_j, drawn as ellipses at Mahalanobis radii ``radii``.
    """
    x, resp = _numpy(x), _numpy(resp)
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"plot_clusters draws 2-D data: expected x of shape (n, 2), got {x.shape}. "
                         "Project the data first (e.g. on two columns).")
    k = resp.shape[1]
    colors = COLORS[np.arange(k) % len(COLORS)]
    fig = Figure(figsize=(5.5, 4.5))
    ax = fig.add_subplot()
    ax.scatter(x[:, 0], x[:, 1], c=np.clip(resp @ colors, 0, 1), s=12, edgecolors="none")
    for j in range(k):
        if Sigma is not None and mu is not None:
            for r in radii:
                pts = ellipse_points(_numpy(mu)[j], _numpy(Sigma)[j], r)
                ax.plot(pts[:, 0], pts[:, 1], color=colors[j], lw=1.2, alpha=0.9 if r == radii[0] else 0.5)
        if mu is not None:
            ax.plot(*_numpy(mu)[j], marker="x", color="black", ms=8, mew=2)
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_title(title or f"{k} components: colour = responsibility w_j^(i), ellipses at {list(radii)} sd")
    return _save(fig, path)


def _curves(result: FitResult):
    """(iterations, times, objective per observation, its label, exact log p(x) points or None)."""
    it = np.array([h["iteration"] for h in result.history])
    tm = np.array([h["time"] for h in result.history])
    objective = -np.array([h["loss"] for h in result.history]) / result.n_data
    label = {"em": "log p(x)", "hard_em": "max_z log p(x, z)"}.get(result.method, "ELBO")
    exact = [(h["iteration"], h["time"], h["log_px"]) for h in result.history if "log_px" in h]
    return it, tm, objective, label, (np.array(exact) if exact else None)


def plot_training(path, results: Mapping[str, FitResult], title: Optional[str] = None) -> str:
    """log p(x) (EM) and the ELBO (SVI) per observation, by iteration (left) and wall time (right).

    Parameters
    ----------
    path : path-like
        Output PNG.
    results : mapping of str to FitResult
        Curves to draw, keyed by their legend name. Exact log p(x) values recorded during an
        SVI fit (``fit(..., log_px_every=m)``) are drawn as dots on the curve's colour.
    """
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2, sharey=True)
    for i, (name, result) in enumerate(results.items()):
        it, tm, objective, label, exact = _curves(result)
        color = COLORS[i % len(COLORS)]
        for ax, xs, col in ((axes[0], it, 0), (axes[1], tm, 1)):
            ax.plot(xs, objective, color=color, lw=1.5, label=f"{name}: {label}")
            if exact is not None:
                ax.plot(exact[:, col], exact[:, 2], "o", color=color, ms=3, label=f"{name}: exact log p(x)")
    for ax in axes:  # EM needs tens of iterations, SVI hundreds: a log axis shows both
        ax.set_xscale("log")
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_xlabel("iteration")
    axes[1].set_xlabel("wall time of the iterations (s)")
    axes[0].set_ylabel("per observation (nats)")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(title or "log p(x; theta) (EM) and ELBO(x; Q, theta) (SVI) per observation")
    return _save(fig, path)


def plot_elbo_gap(path, results: Mapping[str, FitResult], title: Optional[str] = None) -> str:
    """log p(x; theta) - ELBO(x; Q, theta) per observation: KL(Q || posterior), by iteration.

    Only iterations where the exact log p(x) was recorded (``fit(..., log_px_every=m)``) are
    drawn; an EM result contributes its identity gap of zero (the E-step makes the bound tight).
    """
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    drawn, lowest = 0, 0.0
    for i, (name, result) in enumerate(results.items()):
        it, _, objective, _, exact = _curves(result)
        color = COLORS[i % len(COLORS)]
        if result.method == "em":
            ax.plot(it, np.zeros_like(objective), color=color, lw=1.5, label=f"{name}: 0 after each E-step")
        elif exact is not None:
            elbo = dict(zip(it.tolist(), objective.tolist()))
            gap = np.array([lp - elbo[int(t)] for t, _, lp in exact])
            ax.plot(exact[:, 0], gap, "o-", color=color, ms=3, lw=1.2, label=name)
            drawn, lowest = drawn + 1, min(lowest, float(gap.min()))
    if not drawn:
        ax.text(0.5, 0.5, "no exact log p(x) recorded\n(fit with log_px_every=m)", ha="center", va="center",
                transform=ax.transAxes)
    ax.axhline(0.0, color="black", lw=0.6)
    ax.set_yscale("symlog", linthresh=1e-6)  # the gap shrinks by orders of magnitude; it may be exactly 0
    if lowest >= 0:  # an exactly computed ELBO never exceeds log p(x): no negative half needed
        ax.set_ylim(bottom=0)
    ax.set_xlabel("iteration")
    ax.set_ylabel("log p(x) - ELBO per observation (nats)")
    ax.set_title(title or "ELBO gap = KL(Q(z) || p(z | x; theta))")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_latent_space(path, encode: Callable, x, labels=None, title: Optional[str] = None) -> str:
    """Encoder means of the data in a 2-D latent space (the first two coordinates).

    Parameters
    ----------
    encode : callable
        x (n, ...) -> latent means (n, m) with m >= 2, or a tuple whose first item is them
        (e.g. ``(loc, scale)``).
    labels : (n,), optional
        Class labels, used as colours.
    """
    with torch.no_grad():
        z = encode(x)
    z = _numpy(z[0] if isinstance(z, (tuple, list)) else z)
    if z.ndim != 2 or z.shape[1] < 2:
        raise ValueError(f"plot_latent_space needs latent codes of shape (n, m >= 2), got {z.shape}.")
    fig = Figure(figsize=(5.5, 4.5))
    ax = fig.add_subplot()
    colors = None if labels is None else COLORS[_numpy(labels).astype(int) % len(COLORS)]
    ax.scatter(z[:, 0], z[:, 1], c=colors, s=8, edgecolors="none")
    if labels is not None:
        for c in np.unique(_numpy(labels).astype(int)):
            ax.scatter([], [], color=COLORS[c % len(COLORS)], label=str(c), s=12)
        ax.legend(fontsize=7, markerscale=1.5, ncol=2)
    ax.set_xlabel("latent 1")
    ax.set_ylabel("latent 2")
    ax.set_title(title or "encoder means E_Q[z | x]")
    return _save(fig, path)


def plot_reconstructions(path, x, reconstruct: Callable, image_shape: Sequence[int] = (8, 8), n: int = 8,
                         title: Optional[str] = None) -> str:
    """The first ``n`` rows of x as images (top) and their reconstructions (bottom).

    ``reconstruct`` maps x (n, p) to (n, p), e.g. decoder means at the encoder means.
    """
    x = x[:n]
    with torch.no_grad():
        xr = reconstruct(x)
    x, xr = _numpy(x), _numpy(xr)
    fig = Figure(figsize=(1.2 * len(x), 2.6))
    axes = fig.subplots(2, len(x), squeeze=False)
    for i in range(len(x)):
        for row, img in ((0, x[i]), (1, xr[i])):
            axes[row, i].imshow(img.reshape(image_shape), cmap="gray_r", vmin=0, vmax=max(1.0, float(x.max())))
            axes[row, i].set_axis_off()
    fig.suptitle(title or "data (top) and reconstructions (bottom)")
    return _save(fig, path)


def plot_selection(path, selection, title: Optional[str] = None) -> str:
    """The model-selection criterion against the number of components k, the chosen k marked.

    Parameters
    ----------
    path : path-like
        Output PNG.
    selection : Selection
        The result of :func:`ppl_em.select`. Its criterion (BIC, AIC: lower is better; the
        held-out mean log-likelihood: higher is better) is drawn for every k; the chosen k gets
        a star and a dashed line, and a fit that did not converge a hollow marker.
    """
    ks = np.array(selection.ks)
    values = np.array([selection.scores[k] for k in selection.ks], dtype=float)
    converged = np.array([row["converged"] for row in selection.rows], dtype=bool)
    label = {"bic": "BIC", "aic": "AIC", "heldout": "held-out log p(x) per point"}[selection.criterion]
    fig = Figure(figsize=(5.5, 4))
    ax = fig.add_subplot()
    ax.plot(ks, values, "-", color=COLORS[0], lw=1.5)
    ax.plot(ks[converged], values[converged], "o", color=COLORS[0], ms=6, label="converged")
    if (~converged).any():
        ax.plot(ks[~converged], values[~converged], "o", mfc="white", color=COLORS[0], ms=6,
                label="stopped at max_iter")
    best = selection.scores[selection.best_k]
    ax.axvline(selection.best_k, color=COLORS[3], ls="--", lw=1)
    ax.plot([selection.best_k], [best], "*", color=COLORS[3], ms=16, label=f"chosen k = {selection.best_k}")
    ax.set_xticks(ks)
    ax.set_xlabel("number of components k")
    ax.set_ylabel(f"{label} ({'lower' if selection.lower_is_better else 'higher'} is better)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or f"choosing k by {label}")
    return _save(fig, path)
