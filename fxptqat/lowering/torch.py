"""runtime="torch": torch.ao's ``convert_fx`` to eager INT8 kernels, then :data:`PASSES` in order.

The result is a GraphModule of torch.ao quantized modules (the only place that calls
``convert_fx``). Each pass of :data:`PASSES` lives in ``passes/`` and acts on the torch.ao INT8
graph; its entry here says which options this lowering gives it, or that it is not needed.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable

import torch.fx as fx
from torch.ao.quantization.quantize_fx import convert_fx

from fxptqat.passes.clamp_int_weights import clamp_int_weights
from fxptqat.passes.drop_noop_clamps import drop_noop_clamps
from fxptqat.passes.float_scalar_ops import float_scalar_ops
from fxptqat.passes.pack_with_engine import pack_with_engine
from fxptqat.passes.replace_quantized_prelu import replace_quantized_prelu
from fxptqat.passes.snap_weights import snap_weights

from ..capture import quantized_weights
from ..capture.qconfig import backend_config
from ..config import QuantConfig
from ..errors import LoweringError
from ..fake_quantize import FakeQuantize
from ..graph_match import match_nodes, output_quantizer
from ..workarounds import exact_kernel_engine, release_device_cache
from .base import Runtime, quantized_engine

__all__ = ["convert", "lower", "output_grids", "PASSES", "Int8Pass", "RUNTIME"]


def convert(qat: fx.GraphModule, config: QuantConfig) -> fx.GraphModule:
    """Copy ``qat`` and convert the copy; ``qat`` itself is not changed."""
    work = copy.deepcopy(qat).eval()
    with quantized_engine(config.engine):
        try:
            return convert_fx(work, backend_config=backend_config(config))
        except Exception as e:
            raise LoweringError(f"torch.ao convert_fx failed: {type(e).__name__}: {e}") from e
        finally:
            release_device_cache()


@dataclasses.dataclass(frozen=True)
class Int8Pass:
    """A pass on the converted graph. ``options(qat, int8, config)`` gives its keyword options, or
    None where this lowering does not need it; ``packs``: it (re)packs weights, so it runs under
    the engine the graph was converted for."""

    run: Callable[..., object]
    options: Callable[[fx.GraphModule, fx.GraphModule, QuantConfig], dict | None]
    packs: bool = False


def _fake_quant_weights(qat, int8, config: QuantConfig) -> dict:
    return {"weights": quantized_weights(qat)}


def _weight_range(qat, int8, config: QuantConfig) -> dict:
    qmin, qmax = config.weight_qrange
    return {"qmin": qmin, "qmax": qmax}


def _exact_kernels(qat, int8, config: QuantConfig) -> dict | None:
    pinning = exact_kernel_engine(int8, config)
    return None if pinning is None else {"engine": pinning[0], "select": pinning[1]}


def output_grids(qat: fx.GraphModule, int8: fx.GraphModule) -> dict[str, tuple[float, int]]:
    """Lowered op name -> (scale, zero point) of the fake-quant quantizer after the op it computes."""
    grids = {}
    for name, node in match_nodes(qat, int8).items():
        quantizer = output_quantizer(qat, node)
        if quantizer is not None:
            module = qat.get_submodule(quantizer.target)
            if isinstance(module, FakeQuantize) and module.scale.numel() == 1:
                grids[name] = (float(module.scale), int(module.zero_point))
    return grids


PASSES: tuple[Int8Pass, ...] = (
    Int8Pass(snap_weights, _fake_quant_weights, packs=True),
    Int8Pass(clamp_int_weights, _weight_range, packs=True),
    Int8Pass(pack_with_engine, _exact_kernels),
    Int8Pass(float_scalar_ops, lambda qat, int8, config: {"grids": output_grids(qat, int8)}),
    Int8Pass(replace_quantized_prelu, lambda qat, int8, config: {"float_modules": dict(qat.named_modules())}),
    Int8Pass(drop_noop_clamps, lambda qat, int8, config: {}),
)


def lower(qat: fx.GraphModule, config: QuantConfig) -> fx.GraphModule:
    if config.weighted_only:
        raise LoweringError(
            "lower(runtime='torch') does not take QuantConfig(quantized_ops='weighted'): that recipe keeps "
            "float ops (and the conv/linear outputs only they read) between quantized layers, which torch.ao's "
            "convert_fx lowers unreliably (quantized tensors reach float ops) and runs as float reference "
            "modules. Lower it with runtime='inductor' or runtime='onnxruntime' (example_inputs=...), or "
            "prepare with quantized_ops='all' for runtime='torch'."
        )
    int8 = convert(qat, config)
    for step in PASSES:
        options = step.options(qat, int8, config)
        if options is None:
            continue
        with quantized_engine(config.engine) if step.packs else contextlib.nullcontext():
            step.run(int8, **options)
    return int8


RUNTIME = Runtime("torch", lower)

