"""Tests for the data sets shipped in ``ppl_em/data``."""

import csv
import gzip
from importlib import resources

import numpy as np
import pytest
import torch

from ppl_em.datasets import DATASETS, load, load_digits, load_old_faithful


def _faithful_rows_via_csv_module() -> list[tuple[float, float]]:
    """Re-read the Old Faithful file independently of the loader."""
    text = (resources.files("ppl_em") / "data" / "old_faithful.csv").read_text()
    rows = list(csv.DictReader(text.splitlines()))
    return [(float(r["eruptions"]), float(r["waiting"])) for r in rows]


def test_old_faithful_shape_and_dtype():
    data = load_old_faithful()
    assert data.shape == (272, 2)
    assert data.dtype == torch.float64
    assert load_old_faithful(dtype=torch.float32).dtype == torch.float32


def test_old_faithful_summary_statistics():
    rows = _faithful_rows_via_csv_module()
    assert len(rows) == 272
    eruptions = sum(r[0] for r in rows) / len(rows)
    waiting = sum(r[1] for r in rows) / len(rows)
    assert eruptions == pytest.approx(3.487783, abs=1e-5)
    assert waiting == pytest.approx(70.897059, abs=1e-5)
    mean = load_old_faithful().mean(dim=0)
    assert mean.tolist() == pytest.approx([eruptions, waiting], abs=1e-12)


def test_old_faithful_known_values():
    # R: summary(faithful), head(faithful, 1), tail(faithful, 1)
    data = load_old_faithful()
    assert data.min(dim=0).values.tolist() == [1.6, 43.0]
    assert data.max(dim=0).values.tolist() == [5.1, 96.0]
    assert data[0].tolist() == [3.6, 79.0]
    assert data[-1].tolist() == [4.467, 74.0]


def test_loaders_return_fresh_tensors():
    first = load_old_faithful()
    first.zero_()
    assert load_old_faithful()[0].tolist() == [3.6, 79.0]
    images, labels = load_digits(binarize=False)
    images.fill_(-1.0)
    labels.fill_(-1)
    images, labels = load_digits(binarize=False)
    assert images.min() == 0 and labels.min() == 0


def test_digits_match_scikit_learn_exactly():
    sk_datasets = pytest.importorskip("sklearn.datasets")
    expected = sk_datasets.load_digits()
    images, labels = load_digits(binarize=False)
    assert images.shape == (1797, 64) and images.dtype == torch.float64
    assert labels.shape == (1797,) and labels.dtype == torch.long
    np.testing.assert_array_equal(images.numpy(), expected.data)
    np.testing.assert_array_equal(labels.numpy(), expected.target)


def test_digits_raw_file_row_count():
    path = resources.files("ppl_em") / "data" / "digits.csv.gz"
    with path.open("rb") as raw, gzip.open(raw, "rt") as handle:
        lines = handle.read().splitlines()
    assert len(lines) == 1797
    assert all(len(line.split(",")) == 65 for line in lines)


@pytest.mark.parametrize("threshold", [1, 8, 16])
def test_digits_binarized_are_zero_one(threshold):
    raw, _ = load_digits(binarize=False)
    images, labels = load_digits(threshold=threshold, dtype=torch.float32)
    assert images.dtype == torch.float32 and labels.dtype == torch.long
    assert set(images.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(images, (raw >= threshold).float())


def test_digits_label_counts():
    _, labels = load_digits()
    counts = torch.bincount(labels, minlength=10)
    assert counts.sum() == 1797
    assert counts.min() >= 174 and counts.max() <= 183


@pytest.mark.parametrize("threshold", [0, 17])
def test_digits_bad_threshold(threshold):
    with pytest.raises(ValueError, match="threshold must be in 1..16"):
        load_digits(threshold=threshold)


def test_load_by_name_dispatches():
    assert set(DATASETS) == {"old_faithful", "digits"}
    for info in DATASETS.values():
        assert info.description and "\n" not in info.description
    assert torch.equal(load("old_faithful"), load_old_faithful())
    images, _ = load("digits", binarize=False)
    assert torch.equal(images, load_digits(binarize=False)[0])


def test_load_unknown_name():
    with pytest.raises(
        ValueError,
        match=r"unknown data set 'x'; expected one of: digits, old_faithful",
    ):
        load("x")
