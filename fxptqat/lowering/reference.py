"""The reference Q/DQ graph every portable runtime (onnxruntime, inductor) starts from.

torch.ao's *reference* form with decomposed quantize/dequantize ops (``quantized_decomposed``):
float ops between Q/DQ pairs that carry the fake-quant graph's scales and zero points, conv/linear
as reference modules that quantize-dequantize their float weight on the fly. Its weights are
clamped to the integer range fake-quant simulated (``passes/clamp_int_weights.py``), so a runtime
that folds them to int8 holds exactly the simulated grid.
"""

from __future__ import annotations

import copy

import torch.fx as fx
from torch.ao.quantization.quantize_fx import _convert_to_reference_decomposed_fx

from fxptqat.passes.clamp_int_weights import clamp_int_weights
from fxptqat.passes.snap_weights import snap_weights

from ..capture import quantized_weights
from ..capture.qconfig import backend_config
from ..config import QuantConfig
from ..errors import LoweringError
from ..workarounds import release_device_cache

__all__ = ["reference"]


def reference(qat: fx.GraphModule, config: QuantConfig) -> fx.GraphModule:
    """Copy ``qat`` and convert the copy to the reference Q/DQ graph; ``qat`` is not changed."""
    work = copy.deepcopy(qat).eval()
    try:
        ref = _convert_to_reference_decomposed_fx(work, backend_config=backend_config(config))
    except Exception as e:
        raise LoweringError(f"torch.ao reference conversion failed: {type(e).__name__}: {e}") from e
    finally:
        release_device_cache()
    snap_weights(ref, weights=quantized_weights(qat))  # BN folding ties: the fake-quant integers
    qmin, qmax = config.weight_qrange
    clamp_int_weights(ref, qmin=qmin, qmax=qmax)
    return ref
