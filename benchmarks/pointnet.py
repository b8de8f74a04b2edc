"""PointNet-style classifier and MNIST -> point-cloud conversion (the stand-in for 3D perception).

Each MNIST digit becomes a set of ``num_points`` 3-D points: the (x, y) pixel coordinates of pixels
brighter than a threshold, centred and scaled to [-1, 1], with the pixel intensity as the third
coordinate (a height field, as in the PointNet++ MNIST experiments). Points are drawn from the bright
pixels with a seeded generator (with replacement when a digit has fewer bright pixels than
``num_points``) and jittered by a fraction of a pixel so that duplicates are not identical.
The result is a fixed tensor of shape (N, 3, num_points): the model sees an unordered set, and the
conversion is done once, so every method and seed sees the same clouds.

The model is PointNet without the input/feature transform nets: a shared per-point MLP (1x1
``Conv1d`` + BatchNorm + ReLU, 3 -> 32 -> 64 -> 128), a symmetric max-pool over the points, and an
MLP head (128 -> 64 -> 10). Every layer is a weighted node that torch.ao FX quantizes (conv-bn-relu
and linear-relu fuse), and the max-pool makes it permutation-invariant.
"""

from __future__ import annotations

import torch
from torch import nn

from fxptqat.examples.data import MNIST_MEAN, MNIST_STD

__all__ = ["PointNet", "images_to_points"]


def images_to_points(
    images: torch.Tensor, num_points: int = 128, threshold: float = 0.5, seed: int = 0
) -> torch.Tensor:
    """(N, 1, 28, 28) normalised MNIST images -> (N, 3, num_points) point clouds.

    ``threshold`` is in raw [0, 1] intensity; coordinates are (col, -row) scaled to [-1, 1] and the
    intensity, mapped to [-1, 1], is the third coordinate.
    """
    gen = torch.Generator().manual_seed(seed)
    raw = images[:, 0] * MNIST_STD + MNIST_MEAN  # back to [0, 1]
    n, h, w = raw.shape
    rows = torch.arange(h, dtype=torch.float32).view(h, 1).expand(h, w)
    cols = torch.arange(w, dtype=torch.float32).view(1, w).expand(h, w)
    coords = torch.stack([cols.reshape(-1), -rows.reshape(-1)], dim=1)  # (h*w, 2)
    coords = (coords - torch.tensor([(w - 1) / 2, -(h - 1) / 2])) / ((max(h, w) - 1) / 2)
    out = torch.empty(n, 3, num_points)
    flat = raw.reshape(n, -1)
    for i in range(n):
        idx = (flat[i] > threshold).nonzero(as_tuple=True)[0]
        if idx.numel() == 0:  # a blank image: fall back to the brightest pixels
            idx = flat[i].topk(num_points).indices
        if idx.numel() >= num_points:
            pick = idx[torch.randperm(idx.numel(), generator=gen)[:num_points]]
        else:
            pick = idx[torch.randint(idx.numel(), (num_points,), generator=gen)]
        xy = coords[pick] + (torch.rand(num_points, 2, generator=gen) - 0.5) * (1.0 / (w - 1))
        out[i, :2] = xy.T
        out[i, 2] = flat[i, pick] * 2 - 1
    return out


def _point_mlp(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(cin, cout, 1, bias=False), nn.BatchNorm1d(cout), nn.ReLU())


class PointNet(nn.Module):
    """Shared per-point MLP, max-pool over points, MLP head; about 20k parameters."""

    def __init__(self, num_classes: int = 10, in_dims: int = 3, widths: tuple[int, ...] = (32, 64, 128),
                 hidden: int = 64) -> None:
        super().__init__()
        dims = (in_dims, *widths)
        self.point1 = _point_mlp(dims[0], dims[1])
        self.point2 = _point_mlp(dims[1], dims[2])
        self.point3 = _point_mlp(dims[2], dims[3])
        self.pool = nn.AdaptiveMaxPool1d(1)
        self.fc1 = nn.Linear(dims[3], hidden)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 3, num_points)
        x = self.point3(self.point2(self.point1(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.fc2(self.relu(self.fc1(x)))
