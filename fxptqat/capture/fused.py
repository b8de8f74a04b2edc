"""What the capture's QAT modules compute before their fused activation, and where a per-channel
shift of that value lives: the two facts empirical bias correction (:mod:`fxptqat.bias_correction`)
needs from the capture's module layout.

torch.ao's fused QAT modules (``ConvBnReLU2d``, ``ConvReLU2d``, ``LinearReLU``, ...) apply ReLU inside
their forward; a bias correction must shift the value *before* it, so the pre-activation forward is
the forward of the fused module's parent class without the ReLU (``ConvBnReLU2d`` -> ``ConvBn2d``,
``ConvReLU2d`` -> ``Conv2d``, ``LinearReLU`` -> ``Linear``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.ao.nn import intrinsic as nni
from torch.ao.nn import qat as nnqat
from torch.ao.nn.intrinsic import qat as nniqat

__all__ = ["pre_activation", "has_fused_activation", "output_shift"]

# fused QAT module -> the class whose forward is the same computation without the trailing ReLU
_WITHOUT_RELU: dict[type, type] = {
    nniqat.ConvBnReLU1d: nniqat.ConvBn1d,
    nniqat.ConvBnReLU2d: nniqat.ConvBn2d,
    nniqat.ConvBnReLU3d: nniqat.ConvBn3d,
    nniqat.ConvReLU1d: nnqat.Conv1d,
    nniqat.ConvReLU2d: nnqat.Conv2d,
    nniqat.ConvReLU3d: nnqat.Conv3d,
    nniqat.LinearReLU: nnqat.Linear,
}
_NO_ACTIVATION: tuple[type, ...] = (
    nniqat.ConvBn1d, nniqat.ConvBn2d, nniqat.ConvBn3d, nniqat.LinearBn1d,
    nnqat.Conv1d, nnqat.Conv2d, nnqat.Conv3d, nnqat.Linear,
)
_LINEAR: tuple[type, ...] = (nniqat.LinearReLU, nniqat.LinearBn1d, nnqat.Linear)
assert all(issubclass(fused, nni._FusedModule) for fused in _WITHOUT_RELU)


def pre_activation(module: nn.Module, *args, **kwargs) -> torch.Tensor:
    """The module's output before its fused activation (its plain output if it has none)."""
    parent = _WITHOUT_RELU.get(type(module))
    if parent is not None:
        return parent.forward(module, *args, **kwargs)
    return module(*args, **kwargs)


def has_fused_activation(module: nn.Module) -> bool:
    """Whether the module's output is not its pre-activation output (a fused ReLU follows)."""
    return type(module) in _WITHOUT_RELU


def output_shift(module: nn.Module) -> tuple[str, int] | None:
    """``(parameter name, channel dim of the output)`` of the parameter that adds one value per output
    channel to the module's pre-activation output: a fused BatchNorm's bias, else the layer's own bias.
    None for a module type this capture does not know or one without such a parameter (fxptqat
    never adds parameters: saved graphs and optimizers keep the model's)."""
    kind = type(module)
    if kind not in _WITHOUT_RELU and kind not in _NO_ACTIVATION:
        return None
    dim = -1 if kind in _LINEAR else 1
    bn = getattr(module, "bn", None)
    if bn is not None:
        return ("bn.bias", 1) if isinstance(bn.bias, nn.Parameter) else None
    return ("bias", dim) if isinstance(getattr(module, "bias", None), nn.Parameter) else None
