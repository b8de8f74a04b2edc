"""Pass (on a lowered INT8 graph): run a quantized op with a Python-number operand as fake-quant did.

torch.ao lowers ``x + c`` and ``x * c`` (``c`` a number) to ``quantized.add``/``quantized.mul`` with
a scalar, which never requantize: ``add`` rounds ``c`` to the input's grid (a shift of up to half a
step on every element) and ``mul`` rescales the grid, while fake-quant computed the float result and
rounded it onto the output quantizer's grid. Measured: ``linear(x) * 0.37 + 0.5`` 1.02 steps off at
the add and 1.04 steps off on average at the network output. Each such op becomes dequantize ->
float op -> quantize onto the grid fake-quant used (``grids``: lowered node name -> (scale, zero
point) of its output quantizer), exactly the simulated arithmetic. ``modified`` is False when no
such op is left.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

__all__ = ["float_scalar_ops"]
REQUIRES = "int8"  # the graph it acts on (see passes/__init__.py)

_FLOAT_OP = {torch.ops.quantized.add: operator.add, torch.ops.quantized.mul: operator.mul}


def float_scalar_ops(gm: fx.GraphModule, /, *, grids: dict[str, tuple[float, int]]) -> PassResult:
    modified = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _FLOAT_OP or node.name not in grids or node.kwargs:
            continue
        if len(node.args) != 2 or isinstance(node.args[1], bool) or not isinstance(node.args[1], (int, float)):
            continue
        scale, zero_point = grids[node.name]
        with gm.graph.inserting_before(node):
            value = gm.graph.call_method("dequantize", (node.args[0],))
            value = gm.graph.call_function(_FLOAT_OP[node.target], (value, node.args[1]))
            value = gm.graph.call_function(torch.quantize_per_tensor, (value, scale, zero_point, torch.quint8))
        node.replace_all_uses_with(value)
        gm.graph.erase_node(node)
        modified = True
    if modified:
        gm.recompile()
    return PassResult(gm, modified)
