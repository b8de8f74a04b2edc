"""Pass (on a lowered INT8 graph): run PReLU in float between dequantize and quantize.

The QAT graph keeps ``nn.PReLU`` in float between two activation quantizers; torch.ao's
``convert_fx`` lowers it to ``QuantizedPReLU``, which quantizes the slope to uint8 (never simulated)
and, on x86/fbgemm, onednn and qnnpack in torch 2.13, computes wrong values (errors about the
size of the output range). This pass swaps each ``QuantizedPReLU`` for :class:`DequantizedPReLU`,
which computes exactly what fake-quant simulated: dequantize, float PReLU with the QAT slope,
quantize with the lowered output scale and zero point.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
import torch.fx as fx
import torch.nn as nn
from torch.ao.nn.quantized import PReLU as QuantizedPReLU
from torch.fx.passes.infra.pass_base import PassResult

__all__ = ["replace_quantized_prelu", "DequantizedPReLU"]
REQUIRES = "int8"  # the graph it acts on (see passes/__init__.py)


class DequantizedPReLU(nn.Module):
    """quint8 in, quint8 out; float PReLU in between."""

    def __init__(self, prelu: nn.PReLU, scale: float, zero_point: int) -> None:
        super().__init__()
        self.prelu = prelu
        self.scale = scale
        self.zero_point = zero_point

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.quantize_per_tensor(self.prelu(x.dequantize()), self.scale, self.zero_point, torch.quint8)


def replace_quantized_prelu(gm: fx.GraphModule, /, *, float_modules: Mapping[str, nn.Module]) -> PassResult:
    """``float_modules``: module path -> the float ``nn.PReLU`` it was lowered from."""
    modified = False
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if isinstance(module, QuantizedPReLU):
            prelu = copy.deepcopy(float_modules[node.target]).eval()
            replacement = DequantizedPReLU(prelu, float(module.scale), int(module.zero_point))
            parent, _, name = node.target.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, name, replacement)
            modified = True
    if modified:
        gm.recompile()
    return PassResult(gm, modified)
