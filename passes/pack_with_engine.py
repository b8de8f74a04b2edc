"""Pass (on a lowered INT8 graph): pack chosen conv/linear weights for one quantized engine, and keep them so.

torch's quantized conv and linear modules pack their weights for the *global* quantized engine
whenever ``set_weight_bias`` runs: at conversion, but also on ``copy.deepcopy``, ``load_state_dict``
and unpickling; the packed object then decides which kernel runs. Some kernels do not compute what
fake-quant simulated, and this pass moves the modules that would hit them to an engine that does:

* fbgemm's depthwise kernel (where torch's ``x86`` engine sends convs with more than 100 groups)
  adds pairs of uint8 x int8 products in 16 bits: with full-range uint8 activations it saturates
  and the INT8 output lands tens of steps away from fake-quant (measured: 29 steps on a 144-group
  3x3 conv, 0 with oneDNN on an AVX-512 VNNI CPU).
* On a CPU without AVX-512 VNNI (e.g. an AVX2-only AMD EPYC) every u8 x s8 kernel of fbgemm and
  oneDNN adds such pairs in 16 bits (``vpmaddubsw``): 8-bit weights with full-range activations
  saturate (measured: 92 steps on a 3x8 conv with fbgemm, 38 with oneDNN). QNNPACK widens to 16
  bits before multiplying and accumulates exactly (0 steps): :func:`may_saturate` picks the
  modules that need it.

The pass pins each selected module with :func:`fxptqat.workarounds.pin_packing_engine` (torch
packs for the *global* engine on every copy and reload, so the module's packing class is swapped
for one that always packs under ``engine``). The choice therefore survives copies and reloads, and
the module runs that engine's kernel whatever engine is global at run time. A module already pinned
is left alone (``modified`` is False on a second run).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.infra.pass_base import PassResult

from fxptqat.workarounds import CONVS, ENGINES, LINEARS, may_saturate, packed_with, pin_packing_engine

__all__ = ["pack_with_engine", "engine_available", "packed_with", "may_saturate", "CONVS", "LINEARS", "ENGINES"]
REQUIRES = "int8"  # the graph it acts on (see passes/__init__.py)


def engine_available(engine: str) -> bool:
    return engine in torch.backends.quantized.supported_engines


def pack_with_engine(gm: fx.GraphModule, /, *, engine: str, select: Callable[[nn.Module], bool]) -> PassResult:
    """Pin every quantized conv/linear module of ``gm`` for which ``select(module)`` holds to ``engine``."""
    if engine not in ENGINES:
        raise ValueError(f"pack_with_engine: engine must be one of {ENGINES}, got {engine!r}.")
    if not engine_available(engine):
        raise RuntimeError(f"the {engine} quantized engine is not built into this torch "
                           f"(supported: {torch.backends.quantized.supported_engines}).")
    modified = False
    for module in gm.modules():
        if type(module) not in (*CONVS, *LINEARS) or packed_with(module) is not None or not select(module):
            continue
        pin_packing_engine(module, engine)
        modified = True
    return PassResult(gm, modified)
