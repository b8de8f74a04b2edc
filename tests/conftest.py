import os

import pytest
import torch
from hypothesis import HealthCheck, settings

from helpers import make_small_net

# `ci`: derandomized (same examples every run) with more examples; `dev`: quick and random.
settings.register_profile(
    "ci", derandomize=True, max_examples=40, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# `thorough`: random draws, many of them (HYPOTHESIS_MAX_EXAMPLES, default 300), for the by-hand
# verification runs of the graph rewrites' properties (e.g. with several --hypothesis-seed values)
settings.register_profile(
    "thorough", max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "300")), deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

# One intra-op thread: the 2 cores are shared, and oversubscribed torch threads stalled training
# 10x here; one thread also makes float results independent of the machine's core count.
torch.set_num_threads(1)


@pytest.fixture
def small_net():
    return make_small_net()


@pytest.fixture
def small_batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 1, 6, 6, generator=g),) for _ in range(3)]


@pytest.fixture(scope="session")
def mnist():
    from fxptqat.examples.data import load_mnist

    return load_mnist(n_train=4000, n_test=1000, seed=0)


@pytest.fixture(scope="session")
def mnist_cnn(mnist):
    """ResidualCNN trained once per session on real MNIST (train_float defaults, seed 0)."""
    from fxptqat.examples.models import ResidualCNN, train_float

    x_train, y_train, _, _ = mnist
    torch.manual_seed(0)
    return train_float(ResidualCNN(), x_train, y_train, seed=0)
