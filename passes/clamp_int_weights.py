"""Pass (on a lowered INT8 graph): clamp integer weights to the range QAT simulated.

torch.ao's ``convert_fx`` quantizes weights into the full int8 range, ignoring the observer's
restricted ``quant_min/quant_max``: a 4-bit weight that fine-tuning pushed past the frozen scale
is clamped to +-7 by fake-quant but lowered as, say, +9. Clamping the integer representation
makes the INT8 model hold exactly the simulated grid. Modules already inside the range are
untouched (``modified`` is False when nothing was out of range).
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

__all__ = ["clamp_int_weights"]


def clamp_int_weights(gm: fx.GraphModule, /, *, qmin: int, qmax: int) -> PassResult:
    modified = False
    for module in gm.modules():
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
