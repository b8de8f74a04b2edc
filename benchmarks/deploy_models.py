"""Reference models for the deployment benchmark (random weights; shapes are what matter for speed).

* :class:`ResNet18` -- torchvision's ResNet-18 layout (7x7/2 stem, max-pool, 4 stages of two
  BasicBlocks, 64-128-256-512 channels, 11.7 M parameters), written by hand because torchvision
  does not install against the CPU torch here.
* :class:`MobileNetV2` -- torchvision's MobileNetV2 layout (inverted residuals with expansion 6,
  depthwise 3x3 convs, ReLU6, linear bottlenecks, 1280-channel head, 3.5 M parameters).
* ``vit`` -- :class:`fxptqat.examples.models.SmallViT` (patch conv, LayerNorm, attention written with
  explicit ``nn.Linear`` q/k/v/out and ``torch.matmul`` + softmax, GELU MLP), ViT-Tiny-like widths.

Every model is torch.fx traceable, uses separate non-inplace activation modules (so torch.ao
fuses conv-bn-relu) and has BatchNorm statistics perturbed away from the identity so that folding
does real work.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fxptqat.examples.models import SmallViT

__all__ = ["ResNet18", "MobileNetV2", "MODELS", "build"]


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + identity)


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 1000, widths: tuple[int, ...] = (64, 128, 256, 512)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(cin, w, stride), BasicBlock(w, w)))
            cin = w
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _conv_bn_act(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True):
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU6())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [_conv_bn_act(cin, hidden, 1)]
        layers += [_conv_bn_act(hidden, hidden, 3, stride, groups=hidden), _conv_bn_act(hidden, cout, 1, act=False)]
        self.conv = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    # (expansion, channels, repeats, first stride): torchvision's table
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))

    def __init__(self, num_classes: int = 1000, settings=SETTINGS, last: int = 1280) -> None:
        super().__init__()
        layers, cin = [_conv_bn_act(3, 32, 3, 2)], 32
        for t, c, n, s in settings:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(_conv_bn_act(cin, last, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.2)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.pool(self.features(x)), 1)
        return self.classifier(self.dropout(x))


def _randomize_bn(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=gen) * 0.5 + 0.75)
                m.weight.copy_(torch.rand(c, generator=gen) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.1)
    return model


def _vit(image_size: int) -> nn.Module:
    # ViT-Tiny widths (dim 192, 3 heads, MLP x4) at 6 blocks, 8x8 patches: 64 tokens at 64x64.
    return SmallViT(num_classes=1000, image_size=image_size, patch_size=8, dim=192, depth=6, heads=3,
                    mlp_ratio=4, in_channels=3)


MODELS: dict[str, Callable[[int], nn.Module]] = {
    "resnet18": lambda image_size: ResNet18(),
    "mobilenetv2": lambda image_size: MobileNetV2(),
    "vit": _vit,
}
# Same layer types at a fraction of the size: the memory benchmark runs one of these first so that
# one-time costs (lazy imports, kernel and thread-pool set-up) are not counted as model memory.
TINY: dict[str, Callable[[int], nn.Module]] = {
    "resnet18": lambda image_size: ResNet18(num_classes=10, widths=(8, 8, 8, 8)),
    "mobilenetv2": lambda image_size: MobileNetV2(num_classes=10, settings=((1, 8, 1, 1), (2, 8, 2, 2)), last=16),
    "vit": lambda image_size: SmallViT(num_classes=10, image_size=image_size, patch_size=8, dim=24, depth=1,
                                       heads=2, mlp_ratio=2, in_channels=3),
}


def build(name: str, image_size: int, seed: int = 0, *, tiny: bool = False) -> nn.Module:
    """A float model in eval mode with seeded random weights (``tiny``: same layer types, few channels)."""
    torch.manual_seed(seed)
    return _randomize_bn((TINY if tiny else MODELS)[name](image_size), seed).eval()
