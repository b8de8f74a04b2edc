"""Pass (on a lowered INT8 graph): pack chosen conv/linear weights with oneDNN, and keep them so.

torch's quantized conv and linear modules pack their weights for the *global* quantized engine
whenever ``set_weight_bias`` runs: at conversion, but also on ``copy.deepcopy``, ``load_state_dict``
and unpickling. Under the ``x86`` engine torch routes a conv with more than 100 groups (the
depthwise convs of MobileNet-style networks) to fbgemm, whose depthwise kernel adds pairs of
uint8 x int8 products in 16 bits: with full-range uint8 activations it saturates and the INT8
output lands tens of steps away from what fake-quant simulated (measured: 29 steps on a 144-group
3x3 conv, 0 with oneDNN). oneDNN accumulates in 32 bits.

This pass swaps each selected module's class for a subclass whose ``set_weight_bias`` always
packs under the ``onednn`` engine, then repacks the weights. The choice therefore survives
copies and reloads, and the module runs oneDNN's kernel whatever engine is global at run time.
A module already pinned is left alone (``modified`` is False on a second run).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
import torch.fx as fx
import torch.nn as nn
from torch.ao.nn.quantized.modules.linear import LinearPackedParams
from torch.fx.passes.infra.pass_base import PassResult

__all__ = ["pack_with_onednn", "onednn_available", "packed_with_onednn", "CONVS", "LINEARS"]

ENGINE = "onednn"
CONVS = (
    nnq.Conv1d, nnq.Conv2d, nnq.Conv3d, nniq.ConvReLU1d, nniq.ConvReLU2d, nniq.ConvReLU3d,
    nniq.ConvAdd2d, nniq.ConvAddReLU2d,
)
LINEARS = (nnq.Linear, nniq.LinearReLU)


def onednn_available() -> bool:
    return ENGINE in torch.backends.quantized.supported_engines


class _PackedWithOnednn:
    """Mixin: weights are (re)packed under the onednn engine, whichever engine is global."""

    def set_weight_bias(self, *args, **kwargs):
        previous = torch.backends.quantized.engine
        torch.backends.quantized.engine = ENGINE
        try:
            return super().set_weight_bias(*args, **kwargs)
        finally:
            torch.backends.quantized.engine = previous


def _pinned_class(cls: type) -> type:
    # Defined at import under a module-level name, so pickling finds the class.
    pinned = type(f"Onednn{cls.__name__}", (_PackedWithOnednn, cls), {"__module__": __name__})
    globals()[pinned.__name__] = pinned
    return pinned


_PINNED = {cls: _pinned_class(cls) for cls in (*CONVS, LinearPackedParams)}


def packed_with_onednn(module: nn.Module) -> bool:
    """Whether ``module`` (a quantized conv or linear) has its weights pinned to oneDNN."""
    holder = module._packed_params if isinstance(module, LINEARS) else module
    return isinstance(holder, _PackedWithOnednn)


def pack_with_onednn(gm: fx.GraphModule, /, *, select: Callable[[nn.Module], bool]) -> PassResult:
    """Pin every quantized conv/linear module of ``gm`` for which ``select(module)`` holds."""
    if not onednn_available():
        raise RuntimeError(f"the onednn quantized engine is not built into this torch "
                           f"(supported: {torch.backends.quantized.supported_engines}).")
    modified = False
    for module in gm.modules():
        if type(module) not in (*CONVS, *LINEARS) or packed_with_onednn(module) or not select(module):
            continue
        holder = module._packed_params if isinstance(module, LINEARS) else module
        weight, bias = module.weight(), module.bias()
        holder.__class__ = _PINNED[type(holder)]
        module.set_weight_bias(weight, bias)
        modified = True
    return PassResult(gm, modified)
