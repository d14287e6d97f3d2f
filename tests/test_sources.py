"""EM from data sources (memory maps, DataLoaders, re-iterables of batches) against EM in memory.

Oracle: the same EM on the same data held as tensors. The statistics are sums over data points,
so reading the data in batches changes only the order of the float64 additions: parameters and
losses agree to rounding after every step. Memory: anonymous memory (RssAnon) sampled during a pass
over a memory map stays far below the size of the data.
"""

import importlib
import threading
import time
import warnings

import numpy as np
import pyro
import pyro.poutine as poutine
import pytest
import torch

import ppl_em
from ppl_em import sources
from ppl_em.datasets import load_old_faithful
from ppl_em.models import REGISTRY, gmm
from ppl_em.store import capture_store, replace_store

D = torch.float64



def memmap(tmp_path, array: np.ndarray, name: str = "x.npy") -> np.ndarray:
    path = tmp_path / name
    np.save(path, array)
    return np.load(path, mmap_mode="r")


def start_state(model, args, kwargs):
    """The model's own initial parameters on the whole data (one run of it), as a store state."""
    pyro.clear_param_store()
    with poutine.block():
        poutine.trace(model).get_trace(*args, **kwargs)
    return capture_store()


def em_steps(model, args, kwargs, state, steps=4):
    replace_store(state)
    em = ppl_em.EM(model)
    losses = [em.step(*args, **kwargs) for _ in range(steps)]
    return losses, em.params


def assert_same_fit(a, b, rtol=1e-10):
    (losses_a, params_a), (losses_b, params_b) = a, b
    assert losses_a == pytest.approx(losses_b, rel=rtol)
    for name in params_a:
        torch.testing.assert_close(params_a[name], params_b[name], rtol=rtol, atol=rtol)


# -- disk == memory ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gmm", "poisson_mixture", "bernoulli_mixture", "hmm_vectorized", "hmm"])
def test_em_on_a_memory_map_equals_em_in_memory(tmp_path, name):
    """Batches of 40 rows (the last one shorter); for the HMMs a row is a sequence, the plate's unit."""
    entry = REGISTRY[name]
    (x,), kwargs = entry["make_data"](0)
    state = start_state(entry["model"], (x,), kwargs)
    in_memory = em_steps(entry["model"], (x,), kwargs, state)
    rows = memmap(tmp_path, x.numpy())
    assert isinstance(sources.as_source(rows), sources.Rows)
    on_disk = em_steps(entry["model"], (sources.Rows(rows, batch_size=3 if x.dim() == 3 else 40),), kwargs, state)
    assert_same_fit(on_disk, in_memory)


def test_a_dataloader_and_a_list_of_batches_equal_em_in_memory():
    (x,), kwargs = REGISTRY["gmm"]["make_data"](1)
    state = start_state(gmm.model, (x,), kwargs)
    in_memory = em_steps(gmm.model, (x,), kwargs, state)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=32, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    assert_same_fit(em_steps(gmm.model, (loader,), kwargs, state), in_memory)
    batches = ppl_em.Batches([x[:50], x[50:51], x[51:]])
    assert_same_fit(em_steps(gmm.model, (batches,), kwargs, state), in_memory)
    factory = ppl_em.Batches(lambda: (x[i:i + 64] for i in range(0, len(x), 64)))  # a fresh generator per pass
    assert_same_fit(em_steps(gmm.model, (factory,), kwargs, state), in_memory)


def test_batches_of_several_arguments_as_tuples_and_dicts():
    """Topic model: (words_b, doc_b) spliced in as positional arguments; GDA: dicts of keyword arguments."""
    (words, doc), kwargs = REGISTRY["topic"]["make_data"](0)
    state = start_state(REGISTRY["topic"]["model"], (words, doc), kwargs)
    in_memory = em_steps(REGISTRY["topic"]["model"], (words, doc), kwargs, state)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(words, doc), batch_size=45)
    assert_same_fit(em_steps(REGISTRY["topic"]["model"], (loader,), kwargs, state), in_memory)

    (x,), kwargs = REGISTRY["gmm"]["make_data"](2)
    state = start_state(gmm.model, (x,), kwargs)
    in_memory = em_steps(gmm.model, (x,), kwargs, state)
    batches = ppl_em.Batches([{"x": x[i:i + 50]} for i in range(0, len(x), 50)])
    assert_same_fit(em_steps(gmm.model, (batches,), kwargs, state), in_memory)


def test_a_scale_that_needs_a_second_pass_asks_for_the_data_in_memory():
    """Semi-supervised GDA: mu_z of a labelled point is mu[label_i], so Sigma needs the new locations of
    every point, a second pass that statistics of one pass do not hold."""
    (x,), kwargs = REGISTRY["gmm"]["make_data"](2)
    labels, mask = torch.arange(len(x)) % 3, torch.arange(len(x)) % 4 == 0
    batches = ppl_em.Batches([{"x": x[i:i + 50], "labels": labels[i:i + 50], "labels_mask": mask[i:i + 50]}
                              for i in range(0, len(x), 50)])
    replace_store(start_state(gmm.model, (x,), dict(kwargs, labels=labels, labels_mask=mask)))
    with pytest.raises(ValueError, match="cannot be updated from statistics alone.*in memory.*starts at row 0"):
        ppl_em.EM(gmm.model).step(batches, **kwargs)


def test_summarize_and_log_likelihood_of_a_source_are_the_sums_over_its_batches(tmp_path):
    (x,), kwargs = REGISTRY["poisson_mixture"]["make_data"](3)
    replace_store(start_state(REGISTRY["poisson_mixture"]["model"], (x,), kwargs))
    em = ppl_em.EM(REGISTRY["poisson_mixture"]["model"])
    source = sources.Rows(memmap(tmp_path, x.numpy()), batch_size=17)
    whole, streamed = em.summarize(x, **kwargs), em.summarize(source, **kwargs)
    assert float(streamed.n) == len(x)
    for key, value in whole.sums.items():
        torch.testing.assert_close(streamed.sums[key], value, rtol=1e-12, atol=1e-12)
    assert em.log_likelihood(source, **kwargs) == pytest.approx(em.log_likelihood(x, **kwargs), rel=1e-12)


# -- fit and the result on a source ------------------------------------------------------------------
def quiet_fit(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ppl_em.ConvergenceWarning)
        return ppl_em.fit(*args, progress=False, **kwargs)


@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_fit_on_a_memory_map_equals_fit_in_memory(tmp_path, init):
    """Fewer rows than sources.SAMPLE_ROWS: the sample is every row, so the start is the same."""
    (x,), kwargs = REGISTRY["gmm"]["make_data"](4)
    mm = memmap(tmp_path, x.numpy())
    ours = quiet_fit(gmm.model, mm, max_iter=15, init=init, batch_size=64, **kwargs)
    theirs = quiet_fit(gmm.model, x, max_iter=15, init=init, **kwargs)
    assert ours.n_data == theirs.n_data == len(x) and ours.n_iter == theirs.n_iter
    assert ours.losses == pytest.approx(theirs.losses, rel=1e-10)
    assert ours.log_likelihood == pytest.approx(theirs.log_likelihood, rel=1e-10)
    for name, value in theirs.params.items():
        torch.testing.assert_close(ours.params[name], value, rtol=1e-9, atol=1e-9)
    # The result's methods read the source batch by batch, with the same answers.
    assert ours.score() == pytest.approx(theirs.score(), rel=1e-10)
    assert ours.bic() == pytest.approx(theirs.bic(), rel=1e-10)
    torch.testing.assert_close(ours.predict_proba(), theirs.predict_proba(), rtol=1e-8, atol=1e-8)
    assert ours.sample(5)["x"].shape == (5, 2)


def test_fit_initialises_a_source_from_a_sample_of_its_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "SAMPLE_ROWS", 40)
    (x,), kwargs = REGISTRY["gmm"]["make_data"](5)
    rows = sources.Rows(memmap(tmp_path, x.numpy()), batch_size=25)
    seen = []
    original = sources.Rows.sample
    monkeypatch.setattr(sources.Rows, "sample", lambda self, m, g: seen.append(m) or original(self, m, g))
    result = quiet_fit(gmm.model, rows, max_iter=30, **kwargs)
    assert seen == [40] and result.init["params"] == ["mu"]
    truth = torch.tensor([[-3.0, 0.0], [3.0, 0.0], [0.0, 3.0]], dtype=D)
    found = result.params["mu"][torch.cdist(truth, result.params["mu"]).argmin(-1)]
    assert torch.allclose(found, truth, atol=0.5)


def test_predict_proba_and_score_stream_tensors_in_chunks(monkeypatch):
    """Chunks of 32 rows (a small CHUNK_BYTES): the same responsibilities and log p(x) as one E-step."""
    (x,), kwargs = REGISTRY["gmm"]["make_data"](6)
    result = quiet_fit(gmm.model, x, max_iter=5, **kwargs)
    whole_w, whole_score = result.predict_proba(), result.score()
    monkeypatch.setattr(sources, "SMALL_ELEMENTS", 0)
    monkeypatch.setattr(ppl_em.chunking, "CHUNK_BYTES", 32 * 3 * 8)
    torch.testing.assert_close(result.predict_proba(), whole_w, rtol=1e-12, atol=1e-12)
    assert result.score() == pytest.approx(whole_score, rel=1e-12)
    assert result.n_parameters() == 3 - 1 + 3 * 2 + 3 * 3


# -- memory ---------------------------------------------------------------------------------------
class AnonymousMemory:
    """Peak RssAnon (anonymous resident memory, MB) of this process while the block runs, sampled every ms.
    A memory map's pages are page cache and do not count; copies of the data into memory do."""

    def __enter__(self):
        self.base, self.peak, self._stop = self.now(), 0.0, False
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()
        self.extra = self.peak - self.base

    def _sample(self):
        while not self._stop:
            self.peak = max(self.peak, self.now())
            time.sleep(0.001)

    @staticmethod
    def now() -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 1024


def test_em_on_a_memory_map_holds_one_batch_not_the_data(tmp_path):
    """A 96 MB file read in batches of 2 MB: the pass's extra anonymous memory stays under a third of the
    data (one batch plus the E-step's chunk tables), where loading it would take all 96 MB."""
    rng = np.random.default_rng(0)
    n, d = 1_500_000, 8
    path = tmp_path / "big.npy"
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float64, shape=(n, d))
    for i in range(0, n, 250_000):
        out[i:i + 250_000] = rng.normal(size=(min(250_000, n - i), d)) + 3.0 * (i % 500_000 == 0)
    out.flush()
    del out
    source = sources.Rows(np.load(path, mmap_mode="r"), batch_size=32768)
    init = {"phi": torch.tensor([0.5, 0.5], dtype=D), "mu": torch.tensor([[0.0] * d, [3.0] * d], dtype=D),
            "Sigma": torch.eye(d, dtype=D).expand(2, d, d).clone()}
    pyro.clear_param_store()
    em = ppl_em.EM(gmm.model)
    em.step(source, 2, init)  # the plan, and the tables of the first pass
    with AnonymousMemory() as memory:
        loss = em.step(source, 2, init)
    data_mb = n * d * 8 / 2**20
    assert np.isfinite(loss) and memory.extra < data_mb / 3, (memory.extra, data_mb)


# -- errors -----------------------------------------------------------------------------------------------
def test_a_one_shot_generator_is_refused_with_what_to_do():
    (x,), kwargs = REGISTRY["gmm"]["make_data"](7)
    em = ppl_em.EM(gmm.model)
    with pytest.raises(ValueError, match="one-shot iterator.*once per iteration.*Batches\\(lambda.*partial_fit"):
        em.step((x[i:i + 10] for i in range(0, len(x), 10)), **kwargs)
    with pytest.raises(ValueError, match="TensorDataset yields single rows.*DataLoader"):
        em.step(torch.utils.data.TensorDataset(x), **kwargs)
    with pytest.raises(ValueError, match="Several model arguments are data sources"):
        ppl_em.EM(REGISTRY["topic"]["model"]).step(ppl_em.Batches([x]), ppl_em.Batches([x]), k=2)
    with pytest.raises(ValueError, match="e_step holds Q\\(z\\) of all the data.*summarize"):
        em.e_step(ppl_em.Batches([x]), **kwargs)


def test_a_batch_with_nan_names_where_it_starts(tmp_path):
    (x,), kwargs = REGISTRY["gmm"]["make_data"](8)
    bad = x.clone()
    bad[97, 1] = float("nan")
    replace_store(start_state(gmm.model, (x,), kwargs))
    em = ppl_em.EM(gmm.model)
    before = capture_store()["params"]
    with pytest.raises(ValueError, match=r"index \(17, 1\): nan.*batch of the data source that starts at row 80"):
        em.step(sources.Rows(memmap(tmp_path, bad.numpy()), batch_size=40), **kwargs)
    after = capture_store()["params"]
    assert all(torch.equal(after[name], value) for name, value in before.items())  # nothing was changed


def test_rows_validates_its_arguments_and_shards_without_padding():
    with pytest.raises(ValueError, match="numpy array or tensor of shape \\(n, ...\\), got list"):
        sources.Rows([1, 2, 3])
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        sources.Rows(np.zeros((3, 2)), batch_size=0)
    rows = sources.Rows(torch.arange(10.0)[:, None], batch_size=2)
    shards = [rows.shard(r, 3) for r in range(3)]
    assert [s.rows for s in shards] == [3, 3, 4]
    assert torch.equal(torch.cat([b for s in shards for b in s]), torch.arange(10.0)[:, None])
    sample = rows.sample(4, torch.Generator().manual_seed(0))
    assert sample.shape == (4, 1) and len(set(sample.flatten().tolist())) == 4


def test_batches_counts_rows_and_samples_uniformly():
    source = ppl_em.Batches([torch.arange(i, i + 7.0)[:, None] for i in range(0, 70, 7)])
    assert source.rows == 70
    counts = torch.zeros(70)
    for seed in range(300):
        counts[source.sample(10, torch.Generator().manual_seed(seed)).long().flatten()] += 1
    assert counts.sum() == 3000 and counts.min() > 15 and counts.max() < 75  # about 43 each
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(9, 2)), batch_size=4)
    assert ppl_em.Batches(loader).rows == 9 and sources._loader_rows(loader) == 9


def test_the_progress_bar_counts_rows_of_a_source(tmp_path, monkeypatch):
    fitting = importlib.import_module("ppl_em.fit")  # the module (ppl_em.fit is also the function)

    bars, original = [], fitting._progress_bar
    monkeypatch.setattr(fitting, "_progress_bar", lambda opts, seed: bars.append(original(opts, seed)) or bars[-1])
    (x,), kwargs = REGISTRY["gmm"]["make_data"](9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ppl_em.ConvergenceWarning)
        ppl_em.fit(gmm.model, sources.Rows(memmap(tmp_path, x.numpy()), batch_size=50), max_iter=4, tol=0,
                   progress=True, **kwargs)
    (bar,) = bars
    assert (bar.unit, bar.total, bar.n) == ("rows", 600, 600)  # 4 iterations x 150 rows, batch by batch


def test_em_on_a_source_comes_to_rest_like_em_in_memory():
    """Run to rest: the check EM makes where it comes to rest needs all of Q(z), which a source never holds."""
    (x,), kwargs = REGISTRY["gmm"]["make_data"](10)
    state = start_state(gmm.model, (x,), kwargs)
    in_memory = em_steps(gmm.model, (x,), kwargs, state, steps=150)
    on_batches = em_steps(gmm.model, (ppl_em.Batches([x[:70], x[70:]]),), kwargs, state, steps=150)
    assert abs(in_memory[0][-1] - in_memory[0][-2]) < 1e-9  # at rest
    assert_same_fit(on_batches, in_memory, rtol=1e-8)


def test_rows_put_their_batches_on_the_device_asked_for_and_its_shards_and_fits_keep_it(tmp_path):
    """``Rows(..., device=...)`` copies each batch there (the CPU here: where a GPU is, "cuda"); a shard and the
    batch size that ``fit`` chooses keep it; EM on it equals EM in memory. A device torch does not know, or a
    GPU this machine lacks, is a clear error when the source is made, not at the first batch."""
    x = load_old_faithful()
    rows = sources.Rows(memmap(tmp_path, x.numpy()), batch_size=40, dtype=torch.float32, device="cpu")
    assert rows.device == torch.device("cpu") and "device='cpu'" in repr(rows)
    batch = next(iter(rows))
    assert batch.device.type == "cpu" and batch.dtype == torch.float32 and batch.shape == (40, 2)
    assert rows.shard(1, 2).device == rows.device
    on_disk = sources.Rows(memmap(tmp_path, x.numpy(), "y.npy"), batch_size=50, device=torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ppl_em.ConvergenceWarning)  # five iterations, by design
        result = ppl_em.fit(gmm.model, on_disk, 2, max_iter=5, tol=0, progress=False, seed=0, batch_size=30)
        reference = ppl_em.fit(gmm.model, x, 2, max_iter=5, tol=0, progress=False, seed=0)
    assert result.log_likelihood == pytest.approx(reference.log_likelihood, rel=1e-10)
    with pytest.raises(ValueError, match="must name a torch device"):
        sources.Rows(x.numpy(), device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            sources.Rows(x.numpy(), device="cuda")
