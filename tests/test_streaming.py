"""Streaming EM and the fast paths, against the unstreamed engine and brute force.

Oracles: ``prod(...).sum_to_size`` for the einsum reduction, ``torch.distributions``' own
MultivariateNormal.log_prob for the GEMM fast path, torch autograd for the selection vjp, and
EM on the whole data (``chunk_size=None``) for EM on chunks: the M-step statistics are sums over
data points, so both must give the same parameters after every step.
"""

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints

import ppl_em
from ppl_em import fast as fastpath, posterior
from ppl_em.fast import gaussian as fast_gaussian
from ppl_em.fast import tensors
from ppl_em.plan import find_uses
from ppl_em.models import REGISTRY, gmm
from ppl_em.posterior import exact_posterior, inspect_model

D = torch.float64


# -- reduce_product --------------------------------------------------------------------------------
@pytest.mark.parametrize("shapes, target", [
    ([(4, 7, 1), (7, 3)], (4, 1, 3)),                 # sum_i w_j^(i) x^(i): a GEMM
    ([(4, 7, 1, 1), (7, 3, 1), (7, 1, 3)], (4, 1, 3, 3)),  # sum_i w x x^T
    ([(4, 7, 1, 1), (7, 3, 1), (7, 1, 3)], (3, 3)),        # tied: summed over components too
    ([(4, 7, 1)], (4, 1, 5)),                          # the target is larger: expanded
    ([(2, 1, 3), (1, 5, 3)], (2, 5, 3)),               # nothing summed
    ([(6,), (6,)], ()),                                # a dot product
    ([(4, 7)], (4, 1)),                                # one operand: a plain sum (the counts N_j)
    ([(4, 7)], (7,)),
    ([(4, 7)], ()),
    ([(4, 7)], (2, 4, 7)),                             # one operand, a larger target: expanded
])
@pytest.mark.parametrize("small", [0, 2 ** 14], ids=["einsum", "small-product"])
def test_reduce_product_equals_the_broadcast_product_summed(shapes, target, small, monkeypatch):
    """Both ways of computing it: one einsum, and (at most ``SMALL_PRODUCT`` elements) the product summed."""
    monkeypatch.setattr(tensors, "SMALL_PRODUCT", small)
    g = torch.Generator().manual_seed(0)
    ops = [torch.randn(s, generator=g, dtype=D) for s in shapes]
    full = ops[0]
    for t in ops[1:]:
        full = full * t
    expected = full.expand(torch.broadcast_shapes(full.shape, target)).sum_to_size(target)
    assert torch.allclose(fastpath.reduce_product(ops, target), expected, rtol=1e-12, atol=1e-12)


def test_reduce_product_of_one_operand_is_a_new_tensor():
    """Statistics hold what it returns while the E-step's tables are recycled for the next chunk."""
    w = torch.rand(4, 7, dtype=D)
    out = fastpath.reduce_product([w], (4, 7))
    assert torch.equal(out, w) and out.data_ptr() != w.data_ptr()


@pytest.mark.parametrize("small", [0, 2 ** 14], ids=["einsum", "small-product"])
def test_reduce_product_counts_the_copies_of_a_dimension_only_broadcast(small, monkeypatch):
    monkeypatch.setattr(tensors, "SMALL_PRODUCT", small)
    w = torch.ones(1, dtype=D).expand(272)[:, None, None]  # (272, 1, 1), stride 0 along the rows
    assert torch.equal(fastpath.reduce_product([w], (2, 2)), torch.full((2, 2), 272.0, dtype=D))
    x = torch.rand(3, 1, dtype=D).expand(3, 5)
    assert torch.allclose(fastpath.reduce_product([x, x], ()), (x * x).sum())


def test_reduce_product_reads_expanded_operands_without_copying_them():
    w = torch.rand(3, 1, dtype=D).expand(3, 10**7)  # 240 MB if it were materialised
    x = torch.ones(10**7, dtype=D)
    assert torch.allclose(fastpath.reduce_product([w, x], (3, 1)), w[:, :1] * 10**7)


# -- MultivariateNormal fast path -----------------------------------------------------------------
@pytest.mark.parametrize("loc_shape, cov_shape, x_shape", [
    ((4, 1, 3), (4, 1, 3, 3), (7, 3)),       # enumerated mu_z, Sigma_z against data rows
    ((4, 1, 3), (3, 3), (7, 3)),             # tied Sigma
    ((3,), (3, 3), (5, 3)),                  # one Gaussian
    ((2, 1, 1, 3), (1, 1, 3, 3), (6, 1, 3)),  # several plates
    ((5, 3), (5, 3, 3), (5, 3)),             # parameters vary per row: torch's own log_prob
])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("whiten_pairs", [0, fast_gaussian.WHITEN_PAIRS])  # the GEMM of T(x - c); whitening
def test_mvn_log_prob_fast_path_equals_torch(loc_shape, cov_shape, x_shape, dtype, whiten_pairs, monkeypatch):
    monkeypatch.setattr(fast_gaussian, "WHITEN_PAIRS", whiten_pairs)
    g = torch.Generator().manual_seed(1)
    loc = torch.randn(loc_shape, generator=g, dtype=D)
    b = torch.randn(cov_shape, generator=g, dtype=D)
    cov = b @ b.transpose(-1, -2) + torch.eye(3, dtype=D)
    fn = dist.MultivariateNormal(loc.to(dtype), cov.to(dtype))
    x = torch.randn(x_shape, generator=g, dtype=D).to(dtype)
    fast, slow = fastpath.log_prob(fn, x), fn.log_prob(x)
    assert fast.shape == slow.shape and fast.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    assert torch.allclose(fast, slow, rtol=tol, atol=tol)


@pytest.mark.parametrize("loc_shape, scale_shape, x_shape", [
    ((4, 1, 3), (4, 1, 3), (7, 3)),        # enumerated mu_z, sigma_z against data rows
    ((4, 1, 3), (3,), (7, 3)),             # one sigma for every state
    ((2, 1, 1, 3), (1, 1, 1), (6, 1, 3)),  # several plates, a scalar sigma
    ((5, 3), (5, 3), (5, 3)),              # parameters vary per row: torch's own log_prob
])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_diagonal_normal_log_prob_fast_path_equals_torch(loc_shape, scale_shape, x_shape, dtype):
    g = torch.Generator().manual_seed(4)
    loc = torch.randn(loc_shape, generator=g, dtype=D).to(dtype)
    scale = (0.5 + torch.rand(scale_shape, generator=g, dtype=D)).to(dtype)
    fn = dist.Normal(loc, scale).to_event(1)
    x = torch.randn(x_shape, generator=g, dtype=D).to(dtype)
    fast, slow = fastpath.log_prob(fn, x), fn.log_prob(x)
    assert fast.shape == slow.shape and fast.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    assert torch.allclose(fast, slow, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_diagonal_normal_log_prob_in_blocks_and_its_gradient_equal_torch(dtype, monkeypatch):
    monkeypatch.setattr(fast_gaussian, "FEATURE_ELEMENTS", 8 * 6)  # the least block: 64 of the 300 rows
    g = torch.Generator().manual_seed(5)
    loc = torch.randn(4, 1, 3, generator=g, dtype=D).to(dtype).requires_grad_()
    scale = (0.5 + torch.rand(4, 1, 3, generator=g, dtype=D)).to(dtype).requires_grad_()
    x = (torch.randn(300, 3, generator=g, dtype=D) + 2).to(dtype)
    fn = dist.Normal(loc, scale).to_event(1)
    fast, slow = fastpath.log_prob(fn, x), fn.log_prob(x)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(fast, slow, **tol)
    for got, expected in zip(torch.autograd.grad(fast.sum(), (loc, scale)), torch.autograd.grad(slow.sum(), (loc, scale))):
        torch.testing.assert_close(got, expected, **tol)
    with torch.no_grad():  # without a graph the blocks are written into one table
        torch.testing.assert_close(fastpath.log_prob(fn, x), slow.detach(), **tol)


# -- selection vjp ----------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda p: dist.Categorical(p).expand([7]),              # a mixture's phi, broadcast over a plate of 7
    lambda p: dist.Categorical(logits=p.log() + 3.0).expand([7]),  # given as (unnormalised) logits
    lambda p: dist.Categorical(p.expand(7, 4)),             # one probability vector per data point
])
@pytest.mark.parametrize("value", ["enumerated", "observed"])
def test_categorical_log_prob_fast_path_equals_torch(make, value):
    g = torch.Generator().manual_seed(3)
    fn = make(torch.rand(4, generator=g, dtype=D) + 0.1)
    x = fn.enumerate_support(expand=False) if value == "enumerated" else torch.randint(4, (7,), generator=g)
    fast = fastpath.log_prob(fn, x)
    slow = make(torch.rand(4, generator=torch.Generator().manual_seed(3), dtype=D) + 0.1).log_prob(x)
    assert fast.shape == slow.shape == ((4, 7) if value == "enumerated" else (7,))
    assert torch.allclose(fast, slow, rtol=1e-14, atol=0)


def test_categorical_log_prob_fast_path_validates_values():
    with pytest.raises(ValueError, match="support"):
        fastpath.log_prob(dist.Categorical(torch.ones(3, dtype=D) / 3, validate_args=True), torch.tensor([0, 3]))


@pytest.mark.parametrize("fill", [None, "some -inf", "all -inf", "a NaN"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_posterior_normalisation_equals_logsumexp(fill, dtype):
    """Also in float32, where weights below 3 times the smallest normal number (3.5e-38) are flushed to 0."""
    g = torch.Generator().manual_seed(4)
    total = (torch.randn(5, 9, generator=g, dtype=D) * 30).to(dtype)
    if fill == "some -inf":
        total[1:4, 2] = -torch.inf
    if fill == "all -inf":
        total[:, 3] = -torch.inf
    if fill == "a NaN":  # a NaN log-density stays NaN (the E-step's check then says where)
        total[2, 5] = torch.nan
    for in_place in (False, True):
        post, lse = fastpath.normalise_exp(total.clone(), 0, in_place=in_place)
        expected = torch.logsumexp(total, 0, keepdim=True)
        assert torch.equal(torch.isfinite(lse), torch.isfinite(expected))
        tiny = torch.finfo(dtype).tiny
        assert torch.allclose(lse, expected, rtol=10 * torch.finfo(dtype).eps, atol=0, equal_nan=True)
        assert torch.allclose(post, torch.exp(total - expected), rtol=100 * torch.finfo(dtype).eps, atol=3 * tiny,
                              equal_nan=True)
        assert not ((post > 0) & (post < tiny)).any()  # no subnormal weights


def test_gaussian_sums_about_a_centre_and_shifted_equal_the_brute_force_moments(monkeypatch):
    """N, S, M about a centre c from the GEMM of T(x - c), in blocks of 8 rows, equal the direct sums; moved
    to another centre m (M - S delta^T - delta S^T + N delta delta^T) they are the moments about m."""
    monkeypatch.setattr(fast_gaussian, "FEATURE_ELEMENTS", 8 * 9)  # d = 3: q + d = 9 features, 8 rows a block
    g = torch.Generator().manual_seed(5)
    x = torch.randn(50, 3, generator=g, dtype=D) * 4 + 100
    w = torch.rand(2, 50, generator=g, dtype=D)
    loc = torch.randn(2, 1, 3, generator=g, dtype=D)
    c = fastpath.centre(x)
    n, s1, m = fastpath.gaussian_sums(w, x, (2, 1), c)
    assert torch.allclose(n, w.sum(-1, keepdim=True), rtol=1e-14)
    assert torch.allclose(s1, torch.einsum("ji,ia->ja", w, x - c).unsqueeze(1), rtol=1e-10)
    m2 = ppl_em.families.GaussianSums.about(n, s1, m, c, loc)
    diff = x - loc  # (2, 50, 3)
    assert torch.allclose(m2, torch.einsum("ji,jia,jib->jab", w, diff, diff).unsqueeze(1), rtol=1e-10)


@pytest.mark.parametrize("x_shape, w_shape, inner", [
    ((150, 3), (2, 150), (2, 1)),        # a mixture: one matrix product per block
    ((150, 3), (2, 150), ()),            # tied: summed over the components too
    ((4, 50, 3), (2, 4, 50), (2, 1, 1)), # a batch of sequences: the general contraction per block
    ((4, 50, 3), (2, 1, 50), (2, 4, 1)), # the weights broadcast over a dim that the result keeps
])
def test_gaussian_sums_in_blocks_equal_the_brute_force_sums(x_shape, w_shape, inner, monkeypatch):
    monkeypatch.setattr(fast_gaussian, "FEATURE_ELEMENTS", 8 * 9)  # the least block: 64 rows (16 of 4 sequences)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(x_shape, generator=g, dtype=D) + 5
    w = torch.rand(w_shape, generator=g, dtype=D)
    c = fastpath.centre(x.reshape(-1, 3))
    assert torch.allclose(c, x.reshape(-1, 3).mean(0), rtol=1e-14)  # fewer than 8192 rows: the mean of all
    n, s1, m = fastpath.gaussian_sums(w, x, inner, c)
    xc = x - c
    assert torch.allclose(n, (w * torch.ones(x_shape[:-1], dtype=D)).sum_to_size(inner), rtol=1e-13)
    assert torch.allclose(s1, (w.unsqueeze(-1) * xc).sum_to_size(tuple(inner) + (3,)), rtol=1e-12, atol=1e-12)
    outer = xc.unsqueeze(-1) * xc.unsqueeze(-2)
    assert torch.allclose(m, (w[..., None, None] * outer).sum_to_size(tuple(inner) + (3, 3)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("w_shape, inner, c_shape", [
    ((2, 200, 1), (2, 1, 3), (3,)),   # a diagonal mixture: weights per (z, row), one centre per coordinate
    ((2, 200, 1), (2, 1, 3), ()),     # one centre for every coordinate
    ((2, 200, 3), (2, 1, 3), (3,)),   # weights per coordinate too: the general contraction
])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_normal_sums_in_blocks_equal_the_brute_force_sums(w_shape, inner, c_shape, dtype, monkeypatch):
    monkeypatch.setattr(fast_gaussian, "FEATURE_ELEMENTS", 8 * 7)  # the least block: 64 of the 200 rows
    g = torch.Generator().manual_seed(8)
    x = (torch.randn(200, 3, generator=g, dtype=D) + 5).to(dtype)
    w = torch.rand(w_shape, generator=g, dtype=D).to(dtype)
    c = x.double().mean(0).reshape(c_shape) if c_shape else x.double().mean()
    n, s1, m = fastpath.normal_sums(w, x, inner, c)
    xc, wd = x.double() - c, w.double()
    tol = {"rtol": 1e-12, "atol": 1e-12}
    assert n.dtype == s1.dtype == m.dtype == torch.float64
    torch.testing.assert_close(n, (wd * torch.ones(200, 3, dtype=D)).sum_to_size(inner), **tol)
    torch.testing.assert_close(s1, (wd * xc).sum_to_size(inner), **tol)
    torch.testing.assert_close(m, (wd * xc * xc).sum_to_size(inner), **tol)


def test_workspace_hands_a_table_to_the_next_chunk_only_after_recycle():
    ws, taken = fastpath.Workspace(), []
    for chunk in ws.chunks(["first", "second"]):
        if chunk == "first":
            a = ws.table((3, 5), D, "cpu")
            b = ws.table((3, 5), D, "cpu")
            assert a.data_ptr() != b.data_ptr()  # both in use in this chunk
        else:  # recycled after the first chunk's body
            c = ws.table((3, 5), D, "cpu")
            assert c.data_ptr() in (a.data_ptr(), b.data_ptr())  # the next chunk reuses one
            t = ws.table((5, 3), D, "cpu", stride=(1, 5))
            assert t.stride() == (1, 5) and t.data_ptr() not in (a.data_ptr(), b.data_ptr())
        taken.append(chunk)
    assert taken == ["first", "second"]
    fresh = fastpath.new_table(None, (3, 5), D, "cpu")  # no workspace: a new tensor
    assert fresh.data_ptr() not in (a.data_ptr(), b.data_ptr())


def test_streaming_with_pooled_tables_equals_whole_data_step_after_step():
    """Several steps and a log-likelihood: the pooled tables of one chunk never leak into the next."""
    x = torch.cat([torch.randn(700, 3, generator=torch.Generator().manual_seed(s), dtype=D) + 4 * s
                   for s in range(3)])
    results = []
    for chunk_size in (None, 256):
        pyro.clear_param_store()
        em = ppl_em.EM(gmm.model, chunk_size=chunk_size)
        losses = [em.step(x, 3) for _ in range(4)]
        results.append((losses, em.log_likelihood(x, 3), em.params))
    (l1, ll1, p1), (l2, ll2, p2) = results
    assert torch.allclose(torch.tensor(l1), torch.tensor(l2), rtol=1e-12) and abs(ll1 - ll2) < 1e-9 * abs(ll1)
    for name in p1:
        assert torch.allclose(p1[name], p2[name], rtol=1e-10, atol=1e-12), name


def test_an_e_step_trace_still_gives_its_log_prob_sum():
    x = torch.randn(40, 2, generator=torch.Generator().manual_seed(6), dtype=D)
    structure = inspect_model(gmm.model, (x, 2), {})
    pyro.clear_param_store()
    post = exact_posterior(gmm.model, structure, (x, 2), {})
    with torch.no_grad():
        expected = sum(float(s["fn"].log_prob(s["value"]).sum()) for s in post.trace.nodes.values()
                       if s["type"] == "sample")
        assert abs(float(post.trace.log_prob_sum()) - expected) < 1e-9 * abs(expected)


@pytest.mark.parametrize("index_map", [True, False], ids=["by the index map", "through the autograd nodes"])
@pytest.mark.parametrize("covariance_type", gmm.COVARIANCE_TYPES)
def test_selection_vjp_equals_autograd(covariance_type, index_map):
    """S^T u both ways: by the index map (which the M-step plan makes for small stable selections: torch calls
    that a recorded step replays) and through the autograd nodes (large or per-row selections)."""
    x = REGISTRY["gmm"]["make_data"](0)[0][0]
    model_args = (x, 3, None, covariance_type)
    post = exact_posterior(gmm.model, inspect_model(gmm.model, model_args, {}), model_args, {})
    by_id = {id(leaf): name for name, leaf in post.leaves.items()}
    found = 0
    for site in post.trace.nodes.values():
        if site["type"] != "sample":
            continue
        for use in find_uses(site, by_id)[0]:
            u = torch.randn(use.selection.shape, dtype=D)
            # A = S F(v): autograd differentiates the elementwise map F too, S^T does not (F'(v) S^T u).
            v = post.leaves[use.param].detach().requires_grad_()
            y = v
            for t in reversed(use.selection.transforms):
                y = t.forward(y)
            slope, = torch.autograd.grad(y.sum(), v)
            if index_map:
                use.selection.index_map()
            assert torch.allclose(slope * use.selection.vjp(u), use.selection._vjp_by_autograd(u),
                                  rtol=1e-12, atol=1e-12)
            assert (use.selection._index is not None) == index_map
            found += 1
    assert found == 3  # phi at z; mu and Sigma at x


# -- streaming EM equals EM on the whole data ------------------------------------------------------
def _run(model, args, kwargs, chunk_size, steps=4, **options):
    pyro.clear_param_store()
    em = ppl_em.EM(model, chunk_size=chunk_size, **options)
    losses = [em.step(*args, **kwargs) for _ in range(steps)]
    return em, losses, em.params


def _assert_same_fit(model, args, kwargs, chunk_size, **options):
    whole, whole_losses, whole_params = _run(model, args, kwargs, None, **options)
    em, losses, params = _run(model, args, kwargs, chunk_size, **options)
    assert em.chunking.startswith("streams"), em.chunking
    assert torch.allclose(torch.tensor(losses), torch.tensor(whole_losses), rtol=1e-12, atol=1e-9)
    assert params.keys() == whole_params.keys()
    for name in params:
        assert torch.allclose(params[name], whole_params[name], rtol=1e-10, atol=1e-12), name
    return em


@pytest.mark.parametrize("covariance_type", gmm.COVARIANCE_TYPES)
def test_streaming_gmm_equals_whole_data(covariance_type):
    x = REGISTRY["gmm"]["make_data"](0)[0][0]
    em = _assert_same_fit(gmm.model, (x, 3), {"covariance_type": covariance_type}, chunk_size=40)
    # mu_z is shared by all rows: one set of Gaussian sums per component gives mu and Sigma, one pass.
    assert set(em.summarize(x, 3, covariance_type=covariance_type).sums) >= {"x.N", "x.S", "x.M"}
    assert "second pass" not in em.explain()["Sigma"]


def test_streaming_semi_supervised_gmm_splits_labels_too():
    x = REGISTRY["gmm"]["make_data"](1)[0][0]
    labels = (x[:, 0] > 0).long() + (x[:, 1] > 1.5).long()
    mask = torch.arange(len(x)) % 3 == 0
    _assert_same_fit(gmm.model, (x, 3), {"labels": labels, "labels_mask": mask}, chunk_size=50)


@pytest.mark.parametrize("name", ["bernoulli_mixture", "poisson_mixture", "topic", "hmm", "hmm_vectorized"])
def test_streaming_other_models_equals_whole_data(name):
    entry = REGISTRY[name]
    args, kwargs = entry["make_data"](0)
    chunk = 2 if name.startswith("hmm") else 40  # the HMM streams whole sequences: 4 of them
    _assert_same_fit(entry["model"], args, kwargs, chunk_size=chunk)


def test_streaming_hard_em_equals_whole_data():
    x = REGISTRY["kmeans"]["make_data"](0)[0][0]
    _assert_same_fit(REGISTRY["kmeans"]["model"], (x, 3), {}, chunk_size=32, posterior="hard")


def group_means(x, group, k=2, groups=2):
    """x^(i) ~ N(mu[z, g_i], sigma_z): the location varies with the data point's group."""
    phi = pyro.param("phi", torch.ones(k, dtype=D) / k, constraint=constraints.simplex)
    mu = pyro.param("mu", torch.tensor([[-1.0, 0.0], [1.0, 2.0]], dtype=D))
    sigma = pyro.param("sigma", torch.ones(k, dtype=D), constraint=constraints.positive)
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(phi))
        pyro.sample("x", dist.Normal(mu[z, group], sigma[z]), obs=x)


def test_streaming_with_a_per_row_location_takes_a_second_pass():
    g = torch.Generator().manual_seed(3)
    group = torch.randint(0, 2, (300,), generator=g)
    z = torch.randint(0, 2, (300,), generator=g)
    truth = torch.tensor([[-2.0, 0.5], [2.0, 3.0]], dtype=D)
    x = truth[z, group] + 0.5 * torch.randn(300, generator=g, dtype=D)
    em = _assert_same_fit(group_means, (x, group), {}, chunk_size=64)
    assert "second pass" in em.explain()["sigma"]
    with pytest.raises(ValueError, match="cannot be updated from statistics alone"):
        em.summarize(x, group)


def test_log_likelihood_streams_and_equals_the_e_step():
    x = REGISTRY["gmm"]["make_data"](0)[0][0]
    em = ppl_em.EM(gmm.model, chunk_size=32)
    em.step(x, 3)
    assert em.log_likelihood(x, 3) == pytest.approx(float(em.e_step(x, 3).log_evidence), rel=1e-12)


def test_float32_data_streams_with_float64_statistics():
    x = REGISTRY["gmm"]["make_data"](0)[0][0]
    _, _, p64 = _run(gmm.model, (x, 3), {}, 40, steps=10)
    em, _, p32 = _run(gmm.model, (x.float(), 3), {}, 40, steps=10)
    assert all(v.dtype == torch.float32 for v in p32.values())
    for name in p64:
        assert torch.allclose(p32[name].double(), p64[name], rtol=1e-4, atol=1e-4), name


# -- what cannot stream says why ------------------------------------------------------------------
def normalised(x, k=2):
    """Standardises its data as a whole: rows are not independent of each other."""
    x = (x - x.mean(0)) / x.std(0)
    phi = pyro.param("phi", torch.ones(k, dtype=D) / k, constraint=constraints.simplex)
    mu = pyro.param("mu", torch.tensor([-1.0, 1.0], dtype=D))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(phi))
        pyro.sample("x", dist.Normal(mu[z], 1.0), obs=x)


def shared_scale(x, k=2):
    """A scale with an offset (softplus(r) + 0.1) has no closed form: its M-step is by gradient."""
    phi = pyro.param("phi", torch.ones(k, dtype=D) / k, constraint=constraints.simplex)
    mu = pyro.param("mu", torch.tensor([-1.0, 1.0], dtype=D))
    log_s = pyro.param("log_s", torch.tensor(0.0, dtype=D))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(phi))
        pyro.sample("x", dist.Normal(mu[z], torch.nn.functional.softplus(log_s) + 0.1), obs=x)


@pytest.mark.parametrize("model, expected", [
    (normalised, "differs from the sum over two halves"),
    (shared_scale, "gradient M-step"),
])
def test_a_model_that_cannot_stream_refuses_an_explicit_chunk_size(model, expected):
    x = torch.cat([torch.randn(100, dtype=D) - 2, torch.randn(100, dtype=D) + 2])
    with pytest.raises(ValueError, match=expected):
        ppl_em.EM(model, chunk_size=50).step(x)
    pyro.clear_param_store()
    em = ppl_em.EM(model, chunk_size="auto")
    em.step(x)
    assert em.chunking.startswith("no streaming") or "one chunk" in em.chunking


def poisson_mixture(x, k=2):
    phi = pyro.param("phi", torch.ones(k, dtype=D) / k, constraint=constraints.simplex)
    rate = pyro.param("rate", torch.tensor([1.0, 5.0], dtype=D), constraint=constraints.positive)
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(phi))
        pyro.sample("x", dist.Poisson(rate[z]), obs=x)


def test_the_split_check_runs_unvalidated_and_again_under_validation_where_the_halves_disagree(monkeypatch):
    """The split check's three runs go without Pyro's validation (the step's E-step validates the data);
    where the halves disagree they run again under it, and the model's refusal stands."""
    from ppl_em import chunking

    states = []
    split = chunking._split
    monkeypatch.setattr(chunking, "_split", lambda *a: states.append(dist.is_validation_enabled()) or split(*a))
    x = torch.cat([torch.zeros(40, dtype=D), torch.full((40,), 5.0, dtype=D)])
    ppl_em.EM(poisson_mixture).step(x)
    assert states == [False]
    states.clear()
    em = ppl_em.EM(normalised, chunk_size="auto")
    em.step(torch.cat([torch.randn(100, dtype=D) - 2, torch.randn(100, dtype=D) + 2]))
    assert states == [False, True] and "differs from the sum over two halves" in em.chunking


@pytest.mark.parametrize("validation", [True, False])
def test_a_split_check_on_rows_of_probability_zero_decides_nothing_for_the_next_data(validation):
    """A count of -1 among the split check's rows makes their log p(x) -inf, which tells nothing about
    whether rows are independent: the step fails on those data, naming the row (under Pyro's validation
    in the check's second run; without it in the step's E-step, the chunking held for these data alone),
    and corrected data of the same shape are decided afresh, not refused as a model that couples rows."""
    x = torch.cat([torch.zeros(40, dtype=D), torch.full((40,), 5.0, dtype=D)])
    bad = x.clone()
    bad[10] = -1.0
    em = ppl_em.EM(poisson_mixture, chunk_size="auto")
    with pyro.validation_enabled(validation), pytest.raises(ppl_em.NonFiniteLossError, match="first at data index 10"):
        em.step(bad)
    if not validation:
        assert "not finite" in em.chunking
    em.step(x)
    assert "fit in one chunk" in em.chunking


def test_hmm_chain_cannot_be_split_inside_a_sequence():
    x = REGISTRY["hmm"]["make_data"](0)[0][0][0]  # one sequence (8, 2): the chain couples its rows
    with pytest.raises(ValueError, match="cannot be streamed exactly"):
        ppl_em.EM(REGISTRY["hmm"]["model"], chunk_size=4).step(x, 2)


def test_auto_chunking_streams_large_data_only(monkeypatch):
    monkeypatch.setattr(ppl_em.chunking, "CHUNK_BYTES", 2**12)  # chunks of about 1024 rows, the least
    x_small = REGISTRY["gmm"]["make_data"](0)[0][0]
    em = ppl_em.EM(gmm.model)
    em.step(x_small, 3)
    assert "fit in one chunk" in em.chunking
    x_large = x_small.repeat(40, 1)  # 6000 rows of 2-d data, 3 components: several chunks
    pyro.clear_param_store()
    em = ppl_em.EM(gmm.model)
    em.step(x_large, 3)
    assert em.chunking.endswith("in chunks of 1000 rows")  # 6 even chunks, not 5 and a rest


def test_a_mixtures_gaussian_tables_from_the_pool_take_larger_chunks(monkeypatch):
    """A Gaussian's (k, rows) tables come from the fast paths' pool: POOLED_CHUNKS times the chunk of a table
    allocated afresh for each chunk (a Poisson mixture's, of the same k and rows); a column broadcast over the
    rows (the latent's log phi_z) counts by what it holds."""
    monkeypatch.setattr(ppl_em.chunking, "CHUNK_BYTES", 3 * 8 * 1024)  # 1024 rows of a (3, rows) float64 table
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 2, generator=g, dtype=torch.float64)
    counts = torch.poisson(torch.full((20000, 2), 4.0, dtype=torch.float64), generator=g)
    rows = {}
    for name, model, data in (("gmm", gmm.model, x), ("poisson", REGISTRY["poisson_mixture"]["model"], counts)):
        pyro.clear_param_store()
        em = ppl_em.EM(model)
        em.step(data, 3)
        rows[name] = int(em.chunking.rsplit("chunks of ", 1)[1].split()[0])
    assert rows["poisson"] == 1000  # 20 even chunks of at most 1024 rows
    assert rows["gmm"] == 20000 // -(-20000 // (ppl_em.chunking.POOLED_CHUNKS * 1024))


def test_invalid_chunk_size_is_rejected():
    with pytest.raises(ValueError, match="chunk_size must be"):
        ppl_em.EM(gmm.model, chunk_size=0)


# -- the one-latent closed form of the probe gradients -------------------------------------------
def _one_latent_problem(name):
    """(model, args, kwargs, structure) of a registered mixture, or the GMM with a quarter of its labels."""
    if name == "gmm_semi_supervised":
        x = REGISTRY["gmm"]["make_data"](0)[0][0]
        model, args = gmm.model, (x, 3)
        kwargs = {"labels": (x[:, 0] > 0).long(), "labels_mask": torch.arange(len(x)) % 4 == 0}
    else:
        model = REGISTRY[name]["model"]
        args, kwargs = REGISTRY[name]["make_data"](0)
    return model, args, kwargs, inspect_model(model, args, kwargs)


@pytest.mark.parametrize("name", ["gmm", "gmm_semi_supervised", "poisson_mixture", "bernoulli_mixture", "topic"])
def test_one_latent_posterior_equals_the_general_contraction(name, monkeypatch):
    model, args, kwargs, structure = _one_latent_problem(name)
    fast = exact_posterior(model, structure, args, kwargs)
    assert posterior._one_latent_posterior(fast.trace, 1.0) is not None  # the fast path applies here
    monkeypatch.setattr(posterior, "_one_latent_posterior", lambda tr, scale, workspace=None, hard=False, tables=True: None)
    general = exact_posterior(model, structure, args, kwargs)
    assert torch.allclose(fast.log_evidence, general.log_evidence, rtol=1e-13)
    assert fast.weights.keys() == general.weights.keys()
    for site, w in general.weights.items():
        assert fast.weights[site].shape == w.shape, site
        assert torch.allclose(fast.weights[site], w, rtol=1e-10, atol=1e-13), site


@pytest.mark.parametrize("name", ["gmm", "gmm_semi_supervised", "poisson_mixture"])
def test_posterior_in_blocks_of_columns_equals_the_whole_table(name, monkeypatch):
    """Summing and normalising the posterior block by block (here 3 columns) is the same arithmetic
    per column: bit for bit the same weights and log-evidence."""
    model, args, kwargs, structure = _one_latent_problem(name)
    whole = exact_posterior(model, structure, args, kwargs)
    monkeypatch.setattr(posterior, "BLOCK_ELEMENTS", 9)
    blocked = exact_posterior(model, structure, args, kwargs)
    assert torch.equal(whole.log_evidence, blocked.log_evidence)
    for site, w in whole.weights.items():
        assert torch.equal(blocked.weights[site], w), site


def test_the_cancellation_bound_covers_every_block(monkeypatch):
    """The bound is checked once, over the extremes of all the blocks: rows far out in the last block
    of several refuse the GEMM form (table and fused pass) as rows in the first would."""
    monkeypatch.setattr(fast_gaussian, "FEATURE_ELEMENTS", 64 * 5)  # blocks of 64 rows
    monkeypatch.setattr(fast_gaussian, "PASS_ELEMENTS", 0)  # and in the fused pass
    g = torch.Generator().manual_seed(3)
    x = 1e-3 * torch.randn(300, 2, generator=g, dtype=D)
    inv = torch.eye(2, dtype=D).expand(2, 2, 2)  # Sigma = I: ||P|| bounded by 2
    mu, log_norm = torch.zeros(2, 2, dtype=D), torch.zeros(2, 1, dtype=D)
    x[-3:, 0] += 1e4  # the centre moves to about 100: 2e4 in the first blocks, about 2e8 in the last
    first = fast_gaussian.GaussianFeatures(x[:64], inv, mu, log_norm)
    first.c = fast_gaussian.centre(x)  # the whole data's centre (only the bound is looked at here)
    assert first.table() is not None  # the first block alone passes
    far = fast_gaussian.GaussianFeatures(x, inv, mu, log_norm)
    assert far.table() is None
    tables = torch.empty(far.shape, dtype=D), torch.empty(far.shape, dtype=D)
    assert far.posterior_sums([], *tables) is None


def test_mvn_fast_path_stays_accurate_for_tight_far_apart_clusters():
    """|x - c|^2 ||Sigma^{-1}|| = 1e12 here: the sufficient-statistic form would cancel away
    every digit, so the whitened form must be used, and agree with torch."""
    g = torch.Generator().manual_seed(2)
    loc = torch.tensor([[[-1e3, 0.0]], [[1e3, 5.0]]], dtype=D)  # (2, 1, 2)
    cov = torch.eye(2, dtype=D) * 1e-6
    x = torch.cat([loc[0, 0] + 1e-3 * torch.randn(5, 2, generator=g, dtype=D),
                   loc[1, 0] + 1e-3 * torch.randn(5, 2, generator=g, dtype=D)])
    fn = dist.MultivariateNormal(loc, cov)
    assert fast_gaussian.GaussianFeatures(x, torch.eye(2, dtype=D).expand(2, 2, 2) * 1e3, loc[:, 0],
                                          torch.zeros(2, 1, dtype=D)).table() is None
    fast, slow = fastpath.log_prob(fn, x), fn.log_prob(x)
    assert torch.allclose(fast, slow, rtol=1e-10)
