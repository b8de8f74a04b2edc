"""runtime="inductor": the reference QDQ graph compiled by torch.compile (inductor, weight freezing).

The reference graph (see :mod:`fxptqat.lowering.reference`) carries the fake-quant graph's scales
and zero points as decomposed ``quantize_per_tensor``/``dequantize_per_tensor`` ops around float
ops. With ``freezing`` inductor folds each weight's quantize/dequantize into an int8 constant,
matches ``dequantize -> conv/linear -> quantize`` into oneDNN's integer kernels and fuses the
element-wise rest (GELU, softmax, layer norm, residual adds) with their Q/DQ into generated loops:
the same code path as torchao's PT2E + X86InductorQuantizer, fed fxptqat's quantization.

``freezing`` is an inductor *global* setting; :class:`InductorModule` sets it only around its own
calls (compilation happens at a call), so the process's other compiled models keep theirs.
"""

from __future__ import annotations

import copy
import io

import torch
import torch.fx as fx
import torch.nn as nn
from torch.ao.nn.quantized.reference.modules.utils import ReferenceQuantizedModule

from fxptqat.passes.explicit_ceil_pooling import explicit_ceil_pooling

from ..config import QuantConfig
from ..errors import LoweringError
from ..workarounds import refuse_saturating_kernels
from .base import EXAMPLE_INPUTS, Runtime
from .reference import reference

__all__ = ["InductorModule", "compile_inductor", "RUNTIME"]


class InductorModule(nn.Module):
    """``torch.compile(reference)`` behind ``nn.Module``, for inference (runs under ``no_grad``).

    Each new input shape compiles once, statically (seconds to a minute; inductor's quantized conv
    lowering fails on dynamic shapes in torch 2.13); ``reference`` is what
    :func:`fxptqat.check_parity` compares node by node.
    """

    runtime = "inductor"

    def __init__(self, reference: fx.GraphModule) -> None:
        super().__init__()
        self.reference = reference.eval()
        # inductor compiles a copy in which its int8 max-pool pattern cannot drop ceil_mode
        # (passes/explicit_ceil_pooling.py); ``reference`` keeps the graph check_parity compares
        compiled = copy.deepcopy(reference)
        if not explicit_ceil_pooling(compiled).modified:
            compiled = reference
        # not a submodule: the compiled wrapper holds the graph again
        self.__dict__["compiled"] = torch.compile(compiled, backend="inductor", dynamic=False)

    def forward(self, *args):
        with torch._inductor.config.patch(freezing=True), torch.no_grad():
            return self.compiled(*args)

    @property
    def size_bytes(self) -> int:
        """``torch.save`` of what inference reads: int8 weights (what freezing folds them to), the
        float rest (biases, norms) and the weights' scales and zero points."""
        tensors = {}
        for name, module in self.reference.named_modules():
            own = {**dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False))}
            if isinstance(module, ReferenceQuantizedModule):
                weight = module.get_quantized_weight()  # int8 already in the decomposed form
                own["weight"] = weight.int_repr() if weight.is_quantized else weight
            tensors.update({f"{name}.{key}": t for key, t in own.items()})
        buffer = io.BytesIO()
        torch.save(tensors, buffer)
        return buffer.tell()


def _check_inputs(example_inputs: tuple) -> None:
    if not example_inputs or not all(isinstance(a, torch.Tensor) for a in example_inputs):
        raise LoweringError("lower(runtime='inductor') needs example_inputs: a tuple of tensors.")


def compile_inductor(reference: fx.GraphModule, example_inputs: tuple) -> InductorModule:
    """Compile for ``example_inputs``' shapes now, so that a failure surfaces here."""
    _check_inputs(example_inputs)
    module = InductorModule(reference)
    try:
        module(*example_inputs)
    except Exception as e:
        raise LoweringError(f"torch.compile (inductor) of the reference graph failed: {type(e).__name__}: {e}") from e
    return module


def lower(qat: fx.GraphModule, config: QuantConfig, *, example_inputs: tuple = ()) -> InductorModule:
    """Each new input shape compiles once; ``example_inputs``' shapes compile here."""
    _check_inputs(example_inputs)
    refuse_saturating_kernels(config)
    return compile_inductor(reference(qat, config), example_inputs)


RUNTIME = Runtime("inductor", lower, options=(EXAMPLE_INPUTS,))
