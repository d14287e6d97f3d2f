"""The same Gaussian mixture written the ways users write it, each fitted by closed forms.

Every parametrisation (``covariance_matrix``, ``scale_tril``, ``precision_matrix``; ``probs`` or
``logits``; a scale as ``exp``, ``softplus``, ``sqrt`` of an unconstrained parameter) in every
covariance structure (full, diag, spherical, tied). Oracles: scikit-learn's ``GaussianMixture``
trajectory from the same start (1e-6 relative), the GDA estimate (one M-step on labelled data,
1e-10), and ``explain()`` saying closed form.
"""

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import config_enumerate
from pyro.ops.indexing import Vindex
from sklearn.mixture import GaussianMixture
from torch.distributions import constraints

import ppl_em
from ppl_em.datasets import load_old_faithful

D = torch.float64
X = load_old_faithful()
N, DIM = X.shape
K = 2
MU0 = X[[3, 150]].clone()
COV0 = torch.cov(X.T)
STRUCTURES = ("full", "diag", "spherical", "tied")
IDIOMS = ("covariance_matrix", "scale_tril", "precision_matrix")


def _start_cov(structure):
    """Sigma_j at the start, in the structure's own layout: (k, d, d), (k, d), (k,) or (d, d)."""
    return {"full": COV0.expand(K, DIM, DIM).clone(), "diag": COV0.diagonal().expand(K, DIM).clone(),
            "spherical": COV0.diagonal().mean().expand(K).clone(), "tied": COV0.clone()}[structure]


def _param(idiom, structure):
    """The pyro.param a user would keep for Sigma in this idiom: Sigma, a Cholesky factor L, or a precision P."""
    cov = _start_cov(structure)
    matrix = structure in ("full", "tied")
    if idiom == "covariance_matrix":
        return cov, constraints.positive_definite if matrix else constraints.positive
    if idiom == "scale_tril":
        return (torch.linalg.cholesky(cov), constraints.lower_cholesky) if matrix else (cov.sqrt(), constraints.positive)
    return (torch.linalg.inv(cov), constraints.positive_definite) if matrix else (1 / cov, constraints.positive)


def _attribute(value, z, structure):
    """The (k, 1, d, d) attribute from the parameter, selected by z: Sigma[z], diag_embed, sigma^2 I or tied."""
    if structure == "full":
        return value[z]
    if structure == "diag":
        return torch.diag_embed(value[z])
    if structure == "spherical":
        return value[z][..., None, None] * torch.eye(DIM, dtype=D)
    return value


def make_model(idiom, structure, weights="probs"):
    def model(x, labels=None):
        if weights == "probs":
            phi = pyro.param("phi", torch.full((K,), 1.0 / K, dtype=D), constraint=constraints.simplex)
            prior = dist.Categorical(phi)
        else:
            prior = dist.Categorical(logits=pyro.param("logits", torch.zeros(K, dtype=D)))
        mu = pyro.param("mu", MU0.clone())
        start, constraint = _param(idiom, structure)
        value = pyro.param("S", start, constraint=constraint)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", prior, obs=labels, infer={"enumerate": "parallel"})
            pyro.sample("x", dist.MultivariateNormal(mu[z], **{idiom: _attribute(value, z, structure)}), obs=x)
    return model


def _sklearn(structure, iters):
    precision = {"full": np.linalg.inv(COV0.numpy())[None].repeat(K, 0), "diag": 1 / _start_cov("diag").numpy(),
                 "spherical": 1 / _start_cov("spherical").numpy(), "tied": np.linalg.inv(COV0.numpy())}[structure]
    gm = GaussianMixture(K, covariance_type=structure, max_iter=iters, tol=0, reg_covar=1e-6,
                         weights_init=np.full(K, 1.0 / K), means_init=MU0.numpy(), precisions_init=precision)
    with pytest.warns(Warning):  # scikit-learn warns that 12 iterations did not converge: that is the point
        gm.fit(X.numpy())
    return gm


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("idiom", IDIOMS)
def test_each_idiom_follows_scikit_learns_trajectory_in_closed_form(idiom, structure):
    em = ppl_em.EM(make_model(idiom, structure, weights="probs" if idiom != "precision_matrix" else "logits"))
    losses = [em.step(X) for _ in range(12)]
    final = em.log_likelihood(X) / N
    gm = _sklearn(structure, 12)
    assert abs(final - gm.score(X.numpy())) < 1e-6 * abs(final)
    assert all(b <= a + 1e-9 for a, b in zip(losses, losses[1:]))
    assert all(route.startswith("closed form") for route in em.explain().values()), em.explain()
    if idiom == "scale_tril":
        expected = "via Cholesky" if structure in ("full", "tied") else "via square root of the diagonal"
        assert em.explain()["S"].endswith(expected)
    np.testing.assert_allclose(em.params["mu"].numpy(), gm.means_, rtol=1e-6)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("idiom", IDIOMS)
def test_one_step_on_labelled_data_is_the_gda_estimate(idiom, structure):
    labels = (X[:, 0] > 3.0).long()  # Old Faithful's two clusters, by eruption time
    em = ppl_em.EM(make_model(idiom, structure), reg_covar=0.0)
    em.step(X, labels)
    p = em.params
    counts = torch.bincount(labels, minlength=K).to(D)
    mu = torch.stack([X[labels == j].mean(0) for j in range(K)])
    scatter = [torch.cov(X[labels == j].T, correction=0) for j in range(K)]
    if structure == "tied":
        scatter = [sum(c * s for c, s in zip(counts, scatter)) / N] * K
    assert torch.allclose(p["phi"], counts / N, rtol=1e-12)
    assert torch.allclose(p["mu"], mu, rtol=1e-10)
    expected = {"full": torch.stack(scatter), "diag": torch.stack([s.diagonal() for s in scatter]),
                "spherical": torch.stack([s.diagonal().mean() for s in scatter]), "tied": scatter[0]}[structure]
    cov = {"covariance_matrix": lambda v: v, "precision_matrix": lambda v: torch.linalg.inv(v) if v.dim() > 1 and
           structure in ("full", "tied") else 1 / v,
           "scale_tril": lambda v: v @ v.mT if structure in ("full", "tied") else v ** 2}[idiom](p["S"])
    assert torch.allclose(cov, expected, rtol=1e-10, atol=1e-12)


def _diag_model(scale_of):
    """A diagonal GMM as Normal(...).to_event(1), its scale a map of an unconstrained parameter r."""
    def model(x):
        phi = pyro.param("phi", torch.full((K,), 1.0 / K, dtype=D), constraint=constraints.simplex)
        mu = pyro.param("mu", MU0.clone())
        r = pyro.param("r", scale_of[1](COV0.diagonal().sqrt()).expand(K, DIM).clone())
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(phi), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(mu[z], scale_of[0](r[z])).to_event(1), obs=x)
    return model


SCALES = {  # (sigma from r, r from sigma)
    "exp": (torch.exp, torch.log),
    "softplus": (torch.nn.functional.softplus, lambda s: torch.log(torch.expm1(s))),
    "sqrt of a variance": (torch.sqrt, lambda s: s ** 2),
    "square of a root": (torch.square, torch.sqrt),
    "reciprocal of a precision's root": (torch.rsqrt, lambda s: s ** -2),
}


@pytest.mark.parametrize("name", list(SCALES))
def test_scales_written_through_maps_get_closed_forms(name):
    em = ppl_em.EM(_diag_model(SCALES[name]))
    for _ in range(12):
        em.step(X)
    gm = _sklearn("diag", 12)
    assert abs(em.log_likelihood(X) / N - gm.score(X.numpy())) < 1e-6 * abs(gm.score(X.numpy()))
    assert em.explain()["r"].startswith("closed form: Normal.scale at site x"), em.explain()
    np.testing.assert_allclose(SCALES[name][0](em.params["r"]).square().numpy(), gm.covariances_, rtol=1e-5)


@config_enumerate
def vindex_style(data, num_components=2):
    """Other names, a weights vector from logits, Vindex, config_enumerate instead of infer=."""
    weight_logits = pyro.param("weight_logits", torch.zeros(num_components, dtype=D))
    centres = pyro.param("centres", MU0.clone())
    chol = pyro.param("chol", torch.linalg.cholesky(COV0).expand(num_components, DIM, DIM).clone(),
                      constraint=constraints.lower_cholesky)
    with pyro.plate("points", data.shape[0]):
        which = pyro.sample("which", dist.Categorical(logits=weight_logits))
        pyro.sample("obs", dist.MultivariateNormal(Vindex(centres)[which], scale_tril=Vindex(chol)[which]), obs=data)


def test_a_vindex_and_config_enumerate_style_model_gets_every_closed_form():
    em = ppl_em.EM(vindex_style)
    for _ in range(12):
        em.step(X)
    gm = _sklearn("full", 12)
    assert abs(em.log_likelihood(X) / N - gm.score(X.numpy())) < 1e-6 * abs(gm.score(X.numpy()))
    assert em.explain() == {
        "weight_logits": "closed form: Categorical.logits at site which",
        "centres": "closed form: MultivariateNormal.loc at site obs",
        "chol": "closed form: MultivariateNormal.scale_tril at site obs, via Cholesky"}


def test_bernoulli_logits_get_the_closed_form():
    g = torch.Generator().manual_seed(0)
    truth = torch.tensor([[0.9, 0.8, 0.1, 0.2], [0.1, 0.3, 0.9, 0.7]], dtype=D)
    z = torch.randint(0, 2, (300,), generator=g)
    x = torch.bernoulli(truth[z], generator=g)

    def model(x):
        phi = pyro.param("phi", torch.full((2,), 0.5, dtype=D), constraint=constraints.simplex)
        logits = pyro.param("logits", torch.tensor([[1.0, 0.5, -1.0, -0.5], [-1.0, -0.5, 1.0, 0.5]], dtype=D))
        with pyro.plate("data", len(x)):
            c = pyro.sample("c", dist.Categorical(phi), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Bernoulli(logits=logits[c]).to_event(1), obs=x)

    em = ppl_em.EM(model)
    post = em.e_step(x)
    w = post.marginal("c")  # (n, 2)
    em.step(x)
    expected = (w.T @ x) / w.sum(0)[:, None]
    assert torch.allclose(torch.sigmoid(em.params["logits"]), expected, rtol=1e-10)
    assert em.explain()["logits"] == "closed form: Bernoulli.logits at site x"
