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

__all__ = ["capture_fx", "is_quantizer", "bn_frozen", "set_bn_frozen", "bn_shift", "quantized_weights"]


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


def quantized_weights(qat) -> dict[str, torch.Tensor]:
    """Module target -> the weight each weighted node's forward uses after fake-quant (a fused
    conv-bn's BatchNorm folded in with the QAT module's own arithmetic), on its integer grid:
    what ``passes/snap_weights.py`` writes into a lowered graph."""
    from .. import meta

    weights = {}
    with torch.no_grad():
        for node, _ in meta.quantized_nodes(qat):
            module = qat.get_submodule(node.target)
            fq = getattr(module, "weight_fake_quant", None)
            if fq is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
                continue
            weight = module.weight
            bn = getattr(module, "bn", None)
            if bn is not None:
                if bn.running_var is None or bn.weight is None:
                    continue
                shape = [1] * weight.dim()
                shape[0] = -1
                weight = weight * (bn.weight / torch.sqrt(bn.running_var + bn.eps)).reshape(shape)
            if fq.is_per_channel:
                weights[node.target] = torch.fake_quantize_per_channel_affine(
                    weight, fq.scale, fq.zero_point, fq.ch_axis, fq.quant_min, fq.quant_max)
            else:
                weights[node.target] = torch.fake_quantize_per_tensor_affine(
                    weight, fq.scale, fq.zero_point, fq.quant_min, fq.quant_max)
    return weights

