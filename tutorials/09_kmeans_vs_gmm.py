# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 9. k-means against the Gaussian mixture
#
# k-means (tutorial 1) is hard EM on a mixture with equal weights phi_j = 1/k and one fixed
# spherical covariance sigma^2 I shared by every cluster. Those are assumptions about the
# data, and where the data break them k-means cuts clusters in the wrong places, while the GMM,
# which fits phi_j and a full Sigma_j per component, follows them. We rerun the examples of
# scikit-learn's gallery page "Demonstration of k-means assumptions" (anisotropic blobs,
# unequal variances, unevenly sized blobs) with both models, fitted by `ppl_em.fit`.
#
# The second half looks at something the lecture notes mention: k-means can toggle between
# two sets of assignments c and centroids mu "once we reach a local minimum". When can it, and
# how does an implementation make sure it stops? (Read after tutorial 3.)

# %%
import matplotlib.pyplot as plt
import torch

import ppl_em
from ppl_em import teaching
from ppl_em.models import gmm, kmeans

QUICK, OUT = teaching.setup(globals().get("__file__"))  # no __file__ in a notebook
f64 = torch.float64
COLORS = ["tab:blue", "tab:orange", "tab:green"]

# %% [markdown]
# ## Four data sets, three clusters each
#
# Gaussian blobs with known labels z^(i): a control that satisfies k-means' assumptions
# (round, equal spread, equal sizes), then the three ways of breaking them.

# %%
def blobs(sizes, centres, stds, seed):
    """Points of Gaussian blobs N(centre_j, std_j^2 I) with their labels: (n, 2), (n,)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.tensor(c, dtype=f64) + s * torch.randn(m, 2, generator=g, dtype=f64)
                   for m, c, s in zip(sizes, centres, stds)])
    return x, torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))


n = 150 if QUICK else 600
third = n // 3
stretch = 2 * torch.tensor([[0.6, -0.6], [-0.4, 0.8]], dtype=f64)  # the gallery's linear map
x_aniso, z_aniso = blobs([third] * 3, [[-4, 0], [0, 4], [4, -1]], [1.0] * 3, seed=1)
DATA = {
    "round, equal (control)": blobs([third] * 3, [[-4, 0], [0, 3], [3, -1]], [0.8] * 3, seed=0),
    "anisotropic": (x_aniso @ stretch, z_aniso),
    "unequal variance": blobs([third] * 3, [[-3, 0], [2, 2], [4, -1]], [1.0, 2.5, 0.5], seed=2),
    "uneven sizes": blobs([int(0.7 * n), int(0.25 * n), n - int(0.7 * n) - int(0.25 * n)],
                          [[-4, 0], [0, 4], [4, -1]], [1.0] * 3, seed=3),
}

# %% [markdown]
# ## Fitting both, scoring against the true labels
#
# k-means is hard EM on `models/kmeans.py`; the GMM is EM on `models/gmm.py`, each from
# several k-means++ starts. Cluster labels are arbitrary, so we score a clustering by its
# **matched accuracy**: the fraction of points whose cluster, after the best one-to-one
# relabelling (`teaching.best_permutation`), is their true class.

# %%
def matched_accuracy(c, z, k=3):
    """Fraction of points with c^(i) = z^(i) under the best relabelling of the clusters c."""
    overlap = torch.stack([torch.bincount(c[z == j], minlength=k) for j in range(k)]).to(f64)  # (class, cluster)
    perm = teaching.best_permutation(-overlap)
    return (overlap[range(k), perm].sum() / len(z)).item()


n_init = 3 if QUICK else 10
labels, scores = {}, {}
for name, (x, z) in DATA.items():
    km = ppl_em.fit(kmeans.model, x, 3, method="hard_em", n_init=n_init, progress=False)
    mix = ppl_em.fit(gmm.model, x, 3, n_init=n_init, progress=False)
    labels[name] = {"k-means": km.predict(), "GMM": mix.predict(), "GMM fit": mix}
    scores[name] = {m: matched_accuracy(labels[name][m], z) for m in ("k-means", "GMM")}
    print(f"{name:24s} matched accuracy: k-means {scores[name]['k-means']:.3f}, GMM {scores[name]['GMM']:.3f}")

assert min(scores["round, equal (control)"].values()) > 0.95  # both fine where k-means' assumptions hold
assert min(scores["uneven sizes"].values()) > 0.95  # unequal sizes alone do not break it here
assert scores["anisotropic"]["GMM"] > scores["anisotropic"]["k-means"] + 0.2
assert scores["unequal variance"]["GMM"] > scores["unequal variance"]["k-means"] + 0.05

# %%
fig, axes = plt.subplots(2, 4, figsize=(16, 7.5))
for col, (name, (x, z)) in enumerate(DATA.items()):
    for row, method in enumerate(("k-means", "GMM")):
        ax = axes[row, col]
        ax.scatter(x[:, 0], x[:, 1], c=[COLORS[j] for j in labels[name][method]], s=6)
        if method == "GMM":
            fit = labels[name]["GMM fit"]
            for j in range(3):
                teaching.draw_ellipse(ax, fit.params["mu"][j], fit.params["Sigma"][j], COLORS[j], lw=1.5)
        ax.set_title(f"{method} on {name}: accuracy {scores[name][method]:.2f}", fontsize=9)
        ax.set_xlabel("x_1")
        ax.set_ylabel("x_2")
fig.suptitle("k-means (top) assumes round clusters of equal spread; the GMM (bottom, 2-sigma ellipses) "
             "fits a Sigma_j per component. Colours: the fitted clusters")
fig.tight_layout()
teaching.savefig(fig, OUT / "09_kmeans_vs_gmm.png")

# %% [markdown]
# Why k-means fails where it does: its E-step puts the boundary between two centroids on the
# perpendicular bisector, half way between them, whatever the clusters' shapes. A stretched
# cluster reaches across that line (anisotropic); a wide cluster next to a tight one loses its
# outer points to the tight one (unequal variance). The GMM's boundary between components j
# and l is where phi_j N(x; mu_j, Sigma_j) = phi_l N(x; mu_l, Sigma_l), which bends with the
# Sigma_j and shifts with the phi_j. The price: more parameters, and more ways to fail
# (tutorial 10).

# %% [markdown]
# ## Can k-means oscillate?
#
# Each half-step of Lloyd's algorithm is an exact minimisation of J(c, mu), so J never rises.
# Suppose the algorithm came back to an assignment it had before, a cycle
# c_1 -> mu_1 -> c_2 -> mu_2 -> ... -> c_1. Around a cycle J cannot fall, so every step keeps
# J the same. A centroid step that keeps J the same must return the same centroids (the mean
# is the *only* minimiser, exercise 1.1), so all the mu_t are equal, and the c_t differ only
# by points that are equally far from two centroids: **ties**. So k-means can toggle only
# between assignments of equal J with the same centroids, and only if its tie-breaking rule
# lets a tied point move. The data below have four points exactly on the bisector of two
# centroids; a rule that moves tied points (as a random tie-break may) toggles forever.

# %%
toy = torch.tensor([[-3.0, 0.0], [3.0, 0.0], [0.0, 1.0], [0.0, -1.0], [0.0, 2.0], [0.0, -2.0]], dtype=f64)
c_a = torch.tensor([0, 1, 0, 0, 1, 1])  # the inner tied points with the left anchor
c_b = torch.tensor([0, 1, 1, 1, 0, 0])  # the outer tied points with the left anchor


def means(c):
    return torch.stack([toy[c == j].mean(0) for j in range(2)])  # (2, 2)


def distortion(c, mu):
    return ((toy - mu[c]) ** 2).sum().item()


def assign_moving_ties(mu, c_old):
    """Nearest centroid; a point tied between the two moves to the other cluster."""
    d = torch.cdist(toy, mu) ** 2  # (n, 2)
    tied = (d[:, 0] - d[:, 1]).abs() < 1e-12
    return torch.where(tied, 1 - c_old, d.argmin(-1))


c, history = c_a, []
for _ in range(6):  # stop when c stops changing: it never does
    mu = means(c)
    history.append((c, mu, distortion(c, mu)))
    c = assign_moving_ties(mu, c)
assert all(torch.equal(h[0], c_a if t % 2 == 0 else c_b) for t, h in enumerate(history))  # A, B, A, B, ...
assert all(torch.equal(h[1], history[0][1]) for h in history)  # the same centroids throughout
assert len({h[2] for h in history}) == 1  # the same J throughout
print(f"toggling between two assignments with J = {history[0][2]:.1f} and mu = {history[0][1].tolist()}")

# A stopping rule on J ends it at once: the first step already did not lower J.
assert history[1][2] >= history[0][2]

# %% [markdown]
# ### Exercise 9.1: a tie-breaking rule that cannot toggle
#
# Write `assign_keeping_ties(mu, c_old)`: each point goes to its nearest centroid, but a point
# whose current centroid is among the nearest stays where it is. With it, Lloyd's algorithm
# can change c only when J strictly falls, so it must stop (there are finitely many c). The
# check runs it on the toy data from assignment A.

# %% tags=["exercise"]
def assign_keeping_ties(mu, c_old):
    """c^(i) := c_old^(i) if it is among the nearest centroids, else the nearest, shape (n,)."""
    raise NotImplementedError("Exercise 9.1")


# %% tags=["solution", "hide-cell"] jupyter={"source_hidden": true}
def assign_keeping_ties(mu, c_old):
    d = torch.cdist(toy, mu) ** 2  # (n, 2)
    current = d.gather(1, c_old[:, None])[:, 0]  # distance to the centroid it has now
    return torch.where(current <= d.min(-1).values + 1e-12, c_old, d.argmin(-1))


# %%
def check_keeping_ties():
    c = c_a
    for _ in range(10):
        c_new = assign_keeping_ties(means(c), c)
        if torch.equal(c_new, c):
            break
        assert distortion(c_new, means(c_new)) < distortion(c, means(c)) - 1e-12  # a change lowers J
        c = c_new
    assert torch.equal(c, c_a), "A is a fixed point once ties stay put"
    far = torch.tensor([[-3.0, 0.0], [-2.9, 0.0]], dtype=f64)  # both centroids on the left
    assert torch.equal(assign_keeping_ties(far, c_a), torch.tensor([0, 1, 1, 1, 1, 1]))


teaching.check_exercise("9.1", check_keeping_ties)

# %%
fig, axes = plt.subplots(1, 2, figsize=(9, 4), sharex=True, sharey=True)
for ax, (c, mu, J), name in zip(axes, history[:2], ("A (even steps)", "B (odd steps)")):
    ax.scatter(toy[:, 0], toy[:, 1], c=[COLORS[j] for j in c], s=80, zorder=3)
    ax.scatter(mu[:, 0], mu[:, 1], marker="x", c=COLORS[:2], s=120, zorder=3)
    ax.axvline(0.0, color="gray", ls=":", label="bisector of the centroids: tied points")
    ax.set_title(f"assignment {name}: J = {J:.1f}")
    ax.set_xlim(-3.6, 3.6)
    ax.set_ylim(-2.6, 3.2)
    ax.set_xlabel("x_1")
axes[0].set_ylabel("x_2")
axes[0].legend(fontsize=8, loc="upper left")
fig.suptitle("k-means toggling between two assignments of equal J and the same centroids (crosses)", y=1.02)
teaching.savefig(fig, OUT / "09_kmeans_toggle.png")

# %% [markdown]
# **Summary.** k-means is the GMM with its hands tied: equal phi_j, one round Sigma, hard
# assignments. On round, equal clusters the two agree; on stretched or unequally spread
# clusters the GMM recovers the classes and k-means does not. k-means stops for certain, as
# long as ties are broken in a way that cannot undo a step: keep points where they are when
# tied, or stop when J no longer falls rather than when c no longer changes.
