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

from torch import nn

from ..fake_quantize import is_quantizer
from .fx import capture_fx

__all__ = ["capture_fx", "is_quantizer", "bn_frozen", "set_bn_frozen"]


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
