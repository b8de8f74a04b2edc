"""Lowering a calibrated fake-quant graph to a runtime: the registry and what it lowers to.

``registry``  the runtimes by name and the one dispatch (:func:`fxptqat.lower` calls it)
``base``      what a runtime is (``Runtime``, ``Option``) and what every lowered model exposes
              (``LoweredModel``, ``Lowered``, ``describe``)
``torch``     torch.ao's convert_fx to eager INT8 kernels + the INT8 passes, as data, in order
``reference`` the Q/DQ graph every portable runtime starts from
``onnx``      ONNX QDQ model run by onnxruntime (``OnnxRuntimeModule``)
``inductor``  torch.compile of the reference graph (``InductorModule``)
"""

from ..workarounds import exact_u8s8_kernels, x86_routes_to_fbgemm
from .base import Lowered, LoweredModel, Option, Runtime, describe, quantized_engine
from .inductor import InductorModule
from .onnx import OnnxRuntimeModule
from .reference import reference
from .registry import REGISTRY, RUNTIMES, lower
from .torch import convert

__all__ = [
    "lower", "REGISTRY", "RUNTIMES", "Runtime", "Option", "LoweredModel", "Lowered", "describe",
    "convert", "reference", "quantized_engine", "OnnxRuntimeModule", "InductorModule",
    "exact_u8s8_kernels", "x86_routes_to_fbgemm",
]
