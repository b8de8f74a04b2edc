"""Pass (on a lowered INT8 graph): each weight holds exactly the integers the fake-quant graph used.

torch.ao's ``convert_fx`` folds a conv-bn's BatchNorm into the conv weight with its own arithmetic
(``w * (gamma * rsqrt(var + eps))``) and quantizes the result; the QAT module fake-quantizes
``w * (gamma / sqrt(var + eps))``. The two differ by float rounding, so a weight that sits on a
rounding boundary lands one step apart: measured on torchvision ResNet-18 (weighted recipe,
histogram ranges, 32 px), one of 589,824 weights of ``layer3.1.conv2`` was lowered one step
(0.0011) off, and that conv's float output differed from fake-quant by 0.0024, 2x the float
tolerance (``check_parity`` reported it). Given the fake-quant weights (on their grid,
``capture.quantized_weights``) by module target, this pass writes them into the lowered modules:
torch.ao's quantized modules get their integers re-packed, reference modules the fake-quant weight
itself as their float weight (on the grid, so no later quantization of it meets a rounding tie).
Modules already equal are untouched (``modified`` is False when nothing was off).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.fx as fx
from torch.ao.nn.intrinsic import _FusedModule
from torch.ao.nn.quantized.reference.modules.utils import ReferenceQuantizedModule
from torch.fx.passes.infra.pass_base import PassResult

__all__ = ["snap_weights"]
REQUIRES = "int8"  # the graph it acts on (see passes/__init__.py)


def _axis_shape(weight: torch.Tensor, axis: int) -> list[int]:
    shape = [1] * weight.dim()
    shape[axis] = -1
    return shape


def _snap_reference(module, weight: torch.Tensor) -> bool:
    # the on-grid weight itself, not merely one that quantizes to the same integers: a portable
    # runtime quantizes this float weight again with its own arithmetic (the ONNX exporter's
    # QuantizeLinear divides by the scale, torch's fake-quant multiplies by its inverse), and a
    # weight on a rounding tie goes either way. With weight_range="full" every channel whose largest
    # magnitude is negative has one on a tie (-(2**(b-1) - 0.5) steps); a 2-bit draw of the lowering
    # property lowered such a weight to -2 where fake-quant had -1.
    if module.weight.shape != weight.shape or module.weight_dtype != torch.qint8:
        return False
    with torch.no_grad():
        if torch.equal(module.weight, weight.to(module.weight.dtype)):
            return False
        module.weight.copy_(weight)
    return True


def _snap_quantized(module, weight: torch.Tensor) -> bool:
    current = module.weight()
    if not (current.is_quantized and current.dtype == torch.qint8) or current.shape != weight.shape:
        return False
    if current.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        axis = current.q_per_channel_axis()
        scales, zeros = current.q_per_channel_scales(), current.q_per_channel_zero_points()
        shape = _axis_shape(weight, axis)
        ints = torch.round(weight / scales.reshape(shape).to(weight.dtype)) + zeros.reshape(shape)
        ints = ints.clamp(-128, 127).to(torch.int8)
        if torch.equal(ints, current.int_repr()):
            return False
        new = torch._make_per_channel_quantized_tensor(ints, scales, zeros, axis)
    else:
        ints = (torch.round(weight / current.q_scale()) + current.q_zero_point()).clamp(-128, 127).to(torch.int8)
        if torch.equal(ints, current.int_repr()):
            return False
        new = torch._make_per_tensor_quantized_tensor(ints, current.q_scale(), current.q_zero_point())
    module.set_weight_bias(new, module.bias())
    return True


def snap_weights(gm: fx.GraphModule, /, *, weights: Mapping[str, torch.Tensor]) -> PassResult:
    modified = False
    for target, weight in weights.items():
        try:
            module = gm.get_submodule(target)
        except AttributeError:
            continue  # fused into another module or renamed: the parity check reports such nodes
        if isinstance(module, _FusedModule):  # a reference conv/linear fused with its ReLU: (layer, relu)
            module = module[0]
        if isinstance(module, ReferenceQuantizedModule):
            modified |= _snap_reference(module, weight)
        elif hasattr(module, "set_weight_bias") and callable(getattr(module, "weight", None)):
            modified |= _snap_quantized(module, weight)
    return PassResult(gm, modified)
