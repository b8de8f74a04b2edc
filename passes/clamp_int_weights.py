"""Pass (on a lowered INT8 graph): clamp integer weights to the range QAT simulated.

torch.ao's ``convert_fx`` quantizes weights into the full int8 range, ignoring the observer's
restricted ``quant_min/quant_max``: a 4-bit weight that fine-tuning pushed past the frozen scale
is clamped to +-7 by fake-quant but lowered as, say, +9. Clamping the integer representation
makes the INT8 model hold exactly the simulated grid. Weight-only graphs lower to torch.ao
*reference* modules, which keep a float weight and quantize-dequantize it on the fly, again into
the full int8 range: their float weight is clamped to ``[qmin, qmax] * scale``, the same grid.
Modules already inside the range are
untouched (``modified`` is False when nothing was out of range).
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.ao.nn.quantized.reference.modules.utils import ReferenceQuantizedModule
from torch.fx.passes.infra.pass_base import PassResult

__all__ = ["clamp_int_weights"]
REQUIRES = "int8"  # the graph it acts on (see passes/__init__.py)


def clamp_int_weights(gm: fx.GraphModule, /, *, qmin: int, qmax: int) -> PassResult:
    modified = False
    for module in gm.modules():
        if isinstance(module, ReferenceQuantizedModule):
            modified |= _clamp_reference(module, qmin, qmax)
            continue
        if not (hasattr(module, "set_weight_bias") and callable(getattr(module, "weight", None))):
            continue
        weight = module.weight()
        if not (weight.is_quantized and weight.dtype == torch.qint8):
            continue
        ints = weight.int_repr()
        if int(ints.min()) >= qmin and int(ints.max()) <= qmax:
            continue
        ints = ints.clamp(qmin, qmax)
        if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            clamped = torch._make_per_channel_quantized_tensor(
                ints, weight.q_per_channel_scales(), weight.q_per_channel_zero_points(),
                weight.q_per_channel_axis(),
            )
        else:
            clamped = torch._make_per_tensor_quantized_tensor(ints, weight.q_scale(), weight.q_zero_point())
        module.set_weight_bias(clamped, module.bias())
        modified = True
    return PassResult(gm, modified)


def _clamp_reference(module, qmin: int, qmax: int) -> bool:
    if module.weight_dtype != torch.qint8:
        return False
    scale = module.weight_scale.to(module.weight.dtype)
    if module.weight_qscheme in (torch.per_channel_affine, torch.per_channel_symmetric):
        shape = [1] * module.weight.dim()
        shape[module.weight_axis_int] = -1
        scale = scale.reshape(shape)
    zero = module.weight_zero_point.to(module.weight.dtype).reshape(scale.shape)
    low, high = (qmin - zero) * scale, (qmax - zero) * scale
    with torch.no_grad():
        clamped = torch.maximum(torch.minimum(module.weight, high), low)
        if torch.equal(clamped, module.weight):
            return False
        module.weight.copy_(clamped)
    return True
