"""models/kmeans.py against its oracles: scikit-learn's Lloyd KMeans, the definition of D^2
sampling, and a direct numpy spherical k-means."""

import numpy as np
import pyro
import pytest
import torch
from sklearn.cluster import KMeans, kmeans_plusplus as sk_kmeans_plusplus

import ppl_em
from ppl_em.datasets import load_old_faithful
from ppl_em.models import kmeans

D = torch.float64


def _faithful():
    x = load_old_faithful()
    return (x - x.mean(0)) / x.std(0)


def test_hard_em_is_lloyd_step_by_step_and_decreases_the_distortion():
    x, k = _faithful(), 3
    centres = x[torch.tensor([0, 5, 17])].clone()
    em = ppl_em.EM(kmeans.model, posterior="hard")
    J = [kmeans.distortion(x, centres).item()]
    for it in range(1, 8):
        loss = em.step(x, k, init={"mu": centres})
        mu = em.params["mu"]
        km = KMeans(k, init=centres.numpy(), n_init=1, max_iter=it, algorithm="lloyd", tol=0.0).fit(x.numpy())
        np.testing.assert_allclose(mu.numpy(), km.cluster_centers_, rtol=1e-10, atol=1e-12)
        J.append(kmeans.distortion(x, mu).item())
        np.testing.assert_allclose(J[-1], km.inertia_, rtol=1e-10)
        # The hard-EM loss is J / (2 sigma^2) + constants, evaluated before the update.
        const = len(x) * (np.log(2 * np.pi) + np.log(k))
        np.testing.assert_allclose(loss, J[-2] / 2 + const, rtol=1e-12)
    assert all(b <= a + 1e-12 for a, b in zip(J, J[1:]))  # coordinate descent on J(c, mu)
    labels = em.e_step(x, k).marginal("z").argmax(-1)
    np.testing.assert_array_equal(labels.numpy(), km.labels_)
    np.testing.assert_array_equal(kmeans.assign(x, mu).numpy(), km.labels_)
    assert em.explain() == {"mu": "closed form: Normal.loc at site x"}


def test_kmeans_plusplus_follows_the_d2_sampling_law():
    """On 4 points, P(first = a, second = b) = (1/4) D(x_b | x_a)^2 / sum_l D(x_l | x_a)^2."""
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0]], dtype=D)
    d2 = (x - x.T) ** 2  # (4, 4)
    expected = 0.25 * d2 / d2.sum(1, keepdim=True)
    draws = 4000
    counts = torch.zeros(4, 4, dtype=D)
    for seed in range(draws):
        _, idx = kmeans.kmeans_plusplus(x, 2, seed=seed)
        counts[idx[0], idx[1]] += 1
    se = (expected * (1 - expected) / draws).sqrt()
    assert ((counts / draws - expected).abs() <= 5 * se + 1e-12).all(), counts / draws


def test_kmeans_plusplus_shares_sklearns_properties():
    g = torch.Generator().manual_seed(0)
    blobs = torch.tensor([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0], [100.0, 100.0]], dtype=D)
    x = (blobs[:, None] + torch.randn(4, 25, 2, generator=g, dtype=D)).reshape(-1, 2)
    blob_of = torch.arange(4).repeat_interleave(25)
    for seed in range(20):
        centres, idx = kmeans.kmeans_plusplus(x, 4, seed=seed)
        sk_centres, sk_idx = sk_kmeans_plusplus(x.numpy(), 4, random_state=seed)
        # Both pick data points, distinct, one in each of four far-apart blobs.
        assert torch.equal(centres, x[idx]) and np.array_equal(sk_centres, x.numpy()[sk_idx])
        assert sorted(blob_of[idx].tolist()) == [0, 1, 2, 3]
        assert sorted(blob_of[torch.as_tensor(sk_idx)].tolist()) == [0, 1, 2, 3]
    # A duplicated point has D = 0 once chosen: never picked twice.
    dup = torch.tensor([[0.0], [0.0], [0.0], [5.0]], dtype=D)
    for seed in range(20):
        _, idx = kmeans.kmeans_plusplus(dup, 2, seed=seed)
        assert dup[idx[0]] != dup[idx[1]]
    with pytest.raises(ValueError, match="fewer than k=3 distinct points"):
        kmeans.kmeans_plusplus(dup, 3)
    with pytest.raises(ValueError, match="k must be between 1 and the number of points"):
        kmeans.kmeans_plusplus(dup, 5)


def _numpy_spherical_kmeans(x, centres, steps):
    """Direct spherical k-means: assign by largest cosine, centroid = normalised sum of members."""
    xh = x / np.linalg.norm(x, axis=1, keepdims=True)
    mu = centres / np.linalg.norm(centres, axis=1, keepdims=True)
    for _ in range(steps):
        c = (xh @ mu.T).argmax(1)
        s = np.stack([xh[c == j].sum(0) for j in range(len(mu))])
        mu = s / np.linalg.norm(s, axis=1, keepdims=True)
        yield c, mu


def test_cosine_metric_is_spherical_kmeans():
    x = _faithful() + torch.tensor([0.5, 0.2], dtype=D)  # off-centre, so directions differ
    centres = x[torch.tensor([3, 40, 101])].clone()
    em = ppl_em.EM(kmeans.model, posterior="hard")
    for c, mu in _numpy_spherical_kmeans(x.numpy(), centres.numpy(), steps=6):
        post = em.e_step(x, 3, init={"mu": centres}, metric="cosine")
        np.testing.assert_array_equal(post.marginal("z").argmax(-1).numpy(), c)
        em.m_step(post, x, 3, init={"mu": centres}, metric="cosine")
        np.testing.assert_allclose(em.params["mu"].numpy(), mu, rtol=1e-10, atol=1e-12)
    assert torch.allclose(em.params["mu"].norm(dim=-1), torch.ones(3, dtype=D))
    assert em.explain() == {"mu": "closed form: Normal.loc at site x"}
    # J for unit vectors is 2 sum_i (1 - cos(x^(i), mu_c(i))).
    xh = x / x.norm(dim=-1, keepdim=True)
    cos = (xh @ em.params["mu"].T).max(-1).values
    assert torch.allclose(kmeans.distortion(x, em.params["mu"], metric="cosine"), 2 * (1 - cos).sum())


def test_exact_em_on_the_same_file_is_soft_kmeans():
    x = _faithful()
    em = ppl_em.EM(kmeans.model)
    trajectory = [-em.step(x, 3, scale=0.5) for _ in range(10)]
    assert all(b >= a - 1e-9 for a, b in zip(trajectory, trajectory[1:]))
    post = em.e_step(x, 3, scale=0.5)
    w = post.marginal("z")  # (n, 3), soft
    logits = -((x[:, None] - em.params["mu"]) ** 2).sum(-1) / (2 * 0.25)
    assert torch.allclose(w, torch.softmax(logits, -1), atol=1e-12)


def test_generate_and_errors():
    mu = torch.tensor([[5.0, 0.0], [-5.0, 0.0]], dtype=D)
    x, z = kmeans.generate(500, mu, seed=2, scale=0.5)
    assert x.shape == (500, 2) and set(z.tolist()) == {0, 1}
    assert torch.equal(kmeans.assign(x, mu), z)  # 10 standard deviations apart
    assert len(pyro.get_param_store()) == 0
    with pytest.raises(ValueError, match="metric must be one of.*got 'manhattan'"):
        ppl_em.EM(kmeans.model, posterior="hard").step(x, 2, metric="manhattan")
    with pytest.raises(ValueError, match=r"x\[1\] is all zeros.*metric='euclidean'"):
        kmeans.prepare(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), "cosine")
