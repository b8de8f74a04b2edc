"""Example reference models plus float training on the library's training loop.

Every model is symbolically traceable with :func:`torch.fx.symbolic_trace` (no
data-dependent control flow) and is written so that torch.ao FX quantization can fuse
conv-bn-relu (separate, non-inplace ``nn.ReLU`` modules) and quantize ``+`` / ``torch.cat``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..training import make_optimizer, progress_bar, train_steps
from .data import batches

logger = logging.getLogger(__name__)

__all__ = [
    "ResidualCNN",
    "SmallViT",
    "TinyMLP",
    "MultiHeadSelfAttention",
    "TransformerBlock",
    "train_float",
    "accuracy",
]


def _conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]


class ResidualCNN(nn.Module):
    """Small CNN for 28x28 inputs mixing the structures quantizers care about.

    stem conv-bn-relu -> residual block (add) -> stride-2 depthwise-separable stage ->
    two parallel branches joined by ``torch.cat`` -> stride-2 depthwise-separable stage ->
    global average pool -> linear head. About 22k parameters at ``width=16``.
    """

    def __init__(self, num_classes: int = 10, width: int = 16, in_channels: int = 1) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(*_conv_bn(in_channels, w), nn.ReLU())
        # residual block: relu(bn(conv(relu(bn(conv(x))))) + x)
        self.res_conv1 = nn.Sequential(*_conv_bn(w, w), nn.ReLU())
        self.res_conv2 = nn.Sequential(*_conv_bn(w, w))
        self.res_relu = nn.ReLU()
        # downsampling, depthwise separable: 28x28 -> 14x14, w -> 2w channels
        self.down1_dw = nn.Sequential(*_conv_bn(w, w, stride=2, groups=w), nn.ReLU())
        self.down1_pw = nn.Sequential(*_conv_bn(w, 2 * w, kernel=1), nn.ReLU())
        # two branches concatenated along channels: 2w + 2w -> 4w
        self.branch_a = nn.Sequential(*_conv_bn(2 * w, 2 * w, kernel=1), nn.ReLU())
        self.branch_b = nn.Sequential(*_conv_bn(2 * w, 2 * w, kernel=3), nn.ReLU())
        # second downsampling stage: 14x14 -> 7x7
        self.down2_dw = nn.Sequential(*_conv_bn(4 * w, 4 * w, stride=2, groups=4 * w), nn.ReLU())
        self.down2_pw = nn.Sequential(*_conv_bn(4 * w, 4 * w, kernel=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.res_relu(self.res_conv2(self.res_conv1(x)) + x)
        x = self.down1_pw(self.down1_dw(x))
        x = torch.cat([self.branch_a(x), self.branch_b(x)], dim=1)
        x = self.down2_pw(self.down2_dw(x))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


class MultiHeadSelfAttention(nn.Module):
    """Self-attention with explicit q/k/v/out ``nn.Linear`` layers and ``torch.matmul`` + softmax.

    Head reshapes use the token count and head size fixed at construction (batch is ``-1``),
    so the module traces with torch.fx.
    """

    def __init__(self, dim: int, heads: int, num_tokens: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.dim, self.heads, self.num_tokens = dim, heads, num_tokens
        self.head_dim = dim // heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        # (B, N, D) -> (B, H, N, D/H)
        return t.reshape(-1, self.num_tokens, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self._split_heads(self.q(x))
        k = self._split_heads(self.k(x))
        v = self._split_heads(self.v(x))
        attn = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scale, dim=-1)
        ctx = torch.matmul(attn, v).transpose(1, 2).reshape(-1, self.num_tokens, self.dim)
        return self.out(ctx)


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))`` with a GELU MLP."""

    def __init__(self, dim: int, heads: int, num_tokens: int, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadSelfAttention(dim, heads, num_tokens)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim * mlp_ratio)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(dim * mlp_ratio, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class SmallViT(nn.Module):
    """Minimal vision transformer: strided-conv patch embedding, learned positions, mean-pool head."""

    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 28,
        patch_size: int = 7,
        dim: int = 32,
        depth: int = 2,
        heads: int = 2,
        mlp_ratio: int = 2,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size ({image_size}) must be divisible by patch_size ({patch_size})")
        num_tokens = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.Sequential(
            *[TransformerBlock(dim, heads, num_tokens, mlp_ratio) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, D, H/p, W/p)
        x = torch.flatten(x, 2).transpose(1, 2)  # (B, N, D)
        x = self.blocks(x + self.pos_embed)
        x = self.norm(x).mean(dim=1)
        return self.head(x)


class TinyMLP(nn.Module):
    """Linear-ReLU-Linear-ReLU-Linear on the flattened input (8x8 digits by default)."""

    def __init__(self, in_features: int = 64, hidden: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, hidden)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        return self.fc3(self.relu2(self.fc2(self.relu1(self.fc1(x)))))


def train_float(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int = 4,
    batch_size: int = 64,
    lr: float = 5e-3,
    seed: int = 0,
    progress: bool = False,
) -> nn.Module:
    """Train ``model`` in place (AdamW, one-cycle LR peaking at ``lr``, cross-entropy); eval mode after.

    ResidualCNN on the default MNIST split reaches about 96% test accuracy in 4 epochs.

    Deterministic for a given ``seed``: it calls ``torch.manual_seed(seed)`` and shuffles
    each epoch with a generator-driven permutation (``seed + epoch``).
    """
    if epochs < 0:
        raise ValueError(f"train_float: epochs must be >= 0, got {epochs}")
    if len(x) != len(y):
        raise ValueError(f"train_float: x and y differ in length ({len(x)} vs {len(y)})")
    torch.manual_seed(seed)
    opt = make_optimizer("adamw", model.parameters(), lr=lr, weight_decay=1e-4, owner="train_float")
    steps_per_epoch = math.ceil(len(x) / batch_size)
    schedule = (
        torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
        if epochs > 0 else None
    )
    losses: list[float] = []
    model.train()
    with progress_bar(total=epochs * steps_per_epoch, desc="train_float", enabled=progress) as bar:
        for epoch in range(epochs):
            first = len(losses)
            stream = batches(x, y, batch_size=batch_size, shuffle=True, seed=seed + epoch)
            train_steps(model, stream, F.cross_entropy, opt, steps_per_epoch, owner="train_float",
                        scheduler=schedule, losses=losses, bar=bar)
            sizes = [min(batch_size, len(x) - i * batch_size) for i in range(steps_per_epoch)]
            mean = sum(loss * n for loss, n in zip(losses[first:], sizes, strict=True)) / max(len(x), 1)
            logger.debug("train_float epoch %d/%d: loss %.4f", epoch + 1, epochs, mean)
            bar.set_postfix(loss=f"{mean:.4f}")
    return model.eval()


@torch.no_grad()
def accuracy(
    model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, batch_size: int = 256
) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` on ``(x, y)``, evaluated under no_grad in eval mode.

    An ``nn.Module`` is switched to eval mode for the evaluation and restored to its previous
    mode afterwards; any other callable mapping a batch to logits is accepted as is.
    """
    if len(x) != len(y):
        raise ValueError(f"accuracy: x and y differ in length ({len(x)} vs {len(y)})")
    if len(x) == 0:
        raise ValueError("accuracy: empty data")
    modes = {m: m.training for m in model.modules()} if isinstance(model, nn.Module) else {}
    if isinstance(model, nn.Module):
        model.eval()
    try:
        correct = 0
        for xb, yb in batches(x, y, batch_size=batch_size):
            correct += int((model(xb).argmax(dim=1) == yb).sum())
    finally:
        for module, mode in modes.items():
            module.training = mode
    return correct / len(x)
