"""runtime="onnxruntime": the fake-quant graph as an ONNX QDQ model run by onnxruntime.

torch.ao's quantized CPU kernels pay a fixed cost per call (about 20 us per conv here), which
dominates at batch 1. This lowering exports the *reference* graph -- torch.ao's decomposed
``quantize_per_tensor``/``dequantize_per_tensor`` pairs around float ops, with the same scales and
zero points as the fake-quant graph -- to ONNX QuantizeLinear/DequantizeLinear, stores every
weight as an int8 initializer (the weight quantize + clamp chains are folded), and lets
onnxruntime fuse each DQ -> op -> Q into its integer kernels (QLinearConv, MatMulInteger, ...).

Only this module imports ``onnx``, ``onnxruntime`` and ``numpy``, when a model is lowered: all are
optional (``pip install fxptqat[onnx]``).
"""

from __future__ import annotations

import os

import torch
import torch.fx as fx
import torch.nn as nn

from ..config import QuantConfig
from ..errors import ConfigError, LoweringError
from ..workarounds import exact_u8s8_kernels, reuse_torchlib_registry
from .base import EXAMPLE_INPUTS, Option, Runtime
from .onnx_optimize import optimize
from .onnx_rewrites import fold_weight_quantization, weights_to_uint8, widen_weight_grid
from .onnx_rewrites import import_onnx as _import
from .reference import reference

__all__ = ["OnnxRuntimeModule", "export_onnx", "fold_weight_quantization", "widen_weight_grid", "weights_to_uint8",
           "RUNTIME"]



class OnnxRuntimeModule(nn.Module):
    """An onnxruntime session behind ``nn.Module``: tensors in, tensors out (no autograd, no hooks).

    ``reference`` is the torch.ao reference GraphModule that was exported; :func:`fxptqat.check_parity`
    compares it node by node with the fake-quant graph and this module end to end.
    """

    runtime = "onnxruntime"

    def __init__(self, model_bytes: bytes, reference: fx.GraphModule, *, threads: int) -> None:
        super().__init__()
        self.model_bytes = model_bytes
        self.reference = reference
        self.threads = threads
        self._start()

    def _start(self) -> None:
        _, ort = _import()
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(self.model_bytes, options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def size_bytes(self) -> int:
        return len(self.model_bytes)

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "wb") as f:
            f.write(self.model_bytes)

    def forward(self, *args):
        if len(args) != len(self.input_names):
            raise LoweringError(f"this ONNX model takes {len(self.input_names)} tensor inputs, got {len(args)}.")
        feed = {name: a.detach().cpu().numpy() for name, a in zip(self.input_names, args, strict=True)}
        outputs = [torch.from_numpy(o) for o in self.session.run(self.output_names, feed)]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    # No autograd, no hooks: a call goes straight to the session. nn.Module's call machinery cost
    # 10-18 us per call here, 1-3% of a MobileNetV2 batch-1 inference (scratch measurement).
    __call__ = forward

    def _no_hooks(self, *args, **kwargs):
        raise LoweringError(
            "OnnxRuntimeModule calls its onnxruntime session directly and runs no module hooks; "
            "wrap it in your own nn.Module to observe its inputs and outputs."
        )

    register_forward_hook = register_forward_pre_hook = register_full_backward_hook = _no_hooks

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("session", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._start()


def _check_inputs(example_inputs: tuple) -> None:
    if not example_inputs or not all(isinstance(a, torch.Tensor) and a.dim() >= 1 for a in example_inputs):
        raise LoweringError("lower(runtime='onnxruntime') needs example_inputs: a tuple of batched tensors.")


def export_onnx(
    reference: fx.GraphModule, example_inputs: tuple, *, threads: int, uint8_weights: bool = False
) -> OnnxRuntimeModule:
    """Export ``reference`` (batch dimension dynamic) and open it with onnxruntime; ``uint8_weights``:
    see :func:`weights_to_uint8`."""
    onnx, _ = _import()
    _check_inputs(example_inputs)
    # torch.export specializes sizes 0 and 1: export at batch 2 so the batch stays symbolic
    args = tuple(a[:1].expand(2, *a.shape[1:]).contiguous() for a in example_inputs)
    batch = torch.export.Dim("batch", min=1)
    dynamic = tuple({0: batch} for _ in args)
    try:
        with reuse_torchlib_registry():
            program = torch.onnx.export(reference, args, dynamo=True, dynamic_shapes=dynamic, optimize=False,
                                        verbose=False)
        optimize(program)  # what optimize=True does, less one rule's cost (see onnx_optimize)
    except Exception as e:
        raise LoweringError(f"ONNX export of the reference graph failed: {type(e).__name__}: {e}") from e
    model = program.model_proto
    fold_weight_quantization(model)
    widen_weight_grid(model)
    if uint8_weights:
        weights_to_uint8(model)
    for node in model.graph.node:  # the exporter's per-node stack traces: a fifth of the file
        del node.metadata_props[:]
        node.doc_string = ""
    onnx.checker.check_model(model)
    return OnnxRuntimeModule(model.SerializeToString(), reference, threads=threads)


def _threads(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"lower(): threads must be a positive int or None, got {value!r}.")
    return value


def lower(qat: fx.GraphModule, config: QuantConfig, *, example_inputs: tuple = (),
          threads: int | None = None) -> OnnxRuntimeModule:
    """``threads``: onnxruntime's intra-op threads, default ``torch.get_num_threads()``. Weights are
    stored as uint8 on CPUs whose u8 x s8 kernels saturate (:func:`weights_to_uint8`)."""
    _import()  # before the conversion: a missing package is said first
    _check_inputs(example_inputs)
    return export_onnx(reference(qat, config), example_inputs, threads=threads or torch.get_num_threads(),
                       uint8_weights=not exact_u8s8_kernels())


RUNTIME = Runtime("onnxruntime", lower, options=(EXAMPLE_INPUTS, Option("threads", _threads)))
