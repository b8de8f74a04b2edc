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

The pass swaps each selected module's class (a linear's packed-params holder) for a subclass
whose ``set_weight_bias`` always packs under ``engine``, then repacks the weights. The choice
therefore survives copies and reloads, and the module runs that engine's kernel whatever engine is
global at run time. A module already pinned is left alone (``modified`` is False on a second run).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
import torch.fx as fx
import torch.nn as nn
from torch.ao.nn.quantized.modules.linear import LinearPackedParams
from torch.fx.passes.infra.pass_base import PassResult

__all__ = ["pack_with_engine", "engine_available", "packed_with", "may_saturate", "CONVS", "LINEARS", "ENGINES"]
REQUIRES = "int8"  # the graph it acts on (see passes/__init__.py)

ENGINES = ("onednn", "qnnpack")
CONVS = (
    nnq.Conv1d, nnq.Conv2d, nnq.Conv3d, nniq.ConvReLU1d, nniq.ConvReLU2d, nniq.ConvReLU3d,
    nniq.ConvAdd2d, nniq.ConvAddReLU2d,
)
LINEARS = (nnq.Linear, nniq.LinearReLU)
_INT16_MAX = 2**15 - 1


def engine_available(engine: str) -> bool:
    return engine in torch.backends.quantized.supported_engines


class _Pinned:
    """Mixin: weights are (re)packed under ``_engine``, whichever engine is global."""

    _engine: str

    def set_weight_bias(self, *args, **kwargs):
        previous = torch.backends.quantized.engine
        torch.backends.quantized.engine = self._engine
        try:
            return super().set_weight_bias(*args, **kwargs)
        finally:
            torch.backends.quantized.engine = previous


class _PinnedLinearParams(_Pinned):
    """A linear's packed params are a TorchScript object that ``copy.deepcopy`` repacks under the
    *global* engine (its ``__setstate__``): copy the rest, then repack through ``set_weight_bias``."""

    def __deepcopy__(self, memo):
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update({k: copy.deepcopy(v, memo) for k, v in self.__dict__.items() if k != "_packed_params"})
        new.set_weight_bias(*self._weight_bias())
        return new


def _pinned_class(cls: type, engine: str) -> type:
    # Defined at import under a module-level name, so pickling finds the class.
    name = f"{engine.capitalize()}{cls.__name__}"
    mixin = _PinnedLinearParams if cls is LinearPackedParams else _Pinned
    pinned = type(name, (mixin, cls), {"__module__": __name__, "_engine": engine})
    globals()[name] = pinned
    return pinned


_PINNED = {(cls, e): _pinned_class(cls, e) for e in ENGINES for cls in (*CONVS, LinearPackedParams)}


def _holder(module: nn.Module):
    return module._packed_params if isinstance(module, LINEARS) else module


def packed_with(module: nn.Module) -> str | None:
    """The engine ``module`` (a quantized conv or linear) is pinned to, or None."""
    return getattr(_holder(module), "_engine", None)


def may_saturate(module: nn.Module, *, act_codes: int = 255) -> bool:
    """Whether a u8 x s8 kernel that adds product pairs in int16 can saturate on this module: some
    pair of integer weights times full-range activation codes (0..``act_codes``) exceeds int16."""
    if type(module) not in (*CONVS, *LINEARS):
        return False
    weight = module.weight()
    if not weight.is_quantized:
        return False
    return 2 * act_codes * int(weight.int_repr().abs().max()) > _INT16_MAX


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
        holder = _holder(module)
        weight, bias = module.weight(), module.bias()
        holder.__class__ = _PINNED[(type(holder), engine)]
        module.set_weight_bias(weight, bias)
        modified = True
    return PassResult(gm, modified)
