"""Capture: a float ``nn.Module`` -> the annotated QAT graph every later step works on.

The only door through which the capture's representation enters fxptqat. Today it is torch.fx
symbolic tracing plus torch.ao's ``prepare_qat_fx`` (:mod:`fxptqat.capture.fx`, with the QConfig
recipe in :mod:`fxptqat.capture.qconfig`); a second capture (``capture/export.py``: torch.export +
a PT2E quantizer) would write the same :class:`fxptqat.meta.NodeInfo` annotation and use
:class:`fxptqat.FakeQuantize` for its quantizers, and calibration, measurement, selection,
training, parity and persistence would run on it unchanged: they read ``NodeInfo`` and call the
helpers below, never the capture's module layout.
"""

from __future__ import annotations

import torch
from torch import nn

from ..fake_quantize import is_quantizer
from .fx import capture_fx

__all__ = ["capture_fx", "is_quantizer", "bn_frozen", "set_bn_frozen", "bn_shift"]


def bn_frozen(module: nn.Module) -> bool | None:
    """Whether the BatchNorm fused into a weighted node's module has frozen statistics; None if it has none."""
    if not hasattr(module, "freeze_bn_stats"):
        return None
    return bool(module.freeze_bn)


def set_bn_frozen(module: nn.Module, frozen: bool) -> bool:
    """Freeze or unfreeze a fused BatchNorm's statistics; returns whether anything changed."""
    current = bn_frozen(module)
    if current is None or current == frozen:
        return False
    module.freeze_bn_stats() if frozen else module.update_bn_stats()
    return True


def bn_shift(module: nn.Module) -> float:
    """Largest ``|mean * gamma / std| + |beta|`` of a fused conv-bn's BatchNorm, else 0: torch.ao's QAT
    conv-bn divides the conv output by ``gamma / std`` and lets the BatchNorm subtract the mean
    again, terms a folded (lowered) conv never forms, so their rounding adds to the float bound."""
    bn = getattr(module, "bn", None)
    if bn is None or bn.running_mean is None or bn.weight is None:
        return 0.0
    with torch.no_grad():
        shift = (bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)).abs() + bn.bias.abs()
    return float(shift.max())
