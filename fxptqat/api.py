"""Public pipeline: prepare -> calibrate -> measure_error -> select_trainable -> finetune -> lower.

This module composes the passes; passes never call each other. Every call checks its stage and
inputs at the boundary and raises a typed :class:`fxptqat.FxptqatError`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping

import torch
import torch.fx as fx
import torch.nn as nn

from fxptqat.passes.clamp_int_weights import clamp_int_weights
from fxptqat.passes.drop_noop_clamps import drop_noop_clamps
from fxptqat.passes.float_scalar_ops import float_scalar_ops
from fxptqat.passes.pack_with_engine import engine_available, may_saturate, pack_with_engine
from fxptqat.passes.replace_quantized_prelu import replace_quantized_prelu

from . import meta
from .calibration import run_calibration
from .capture import capture_fx
from .capture.tracing import trace
from .config import QuantConfig, check_finite
from .errors import ConfigError, InputError, LoweringError, SelectionError, StageError
from .fake_quantize import FakeQuantize
from .finetune import finetune
from .graph_match import match_nodes, output_quantizer
from .inputs import as_args
from .lowering import convert, exact_u8s8_kernels, quantized_engine, reference, x86_routes_to_fbgemm
from .lowering_inductor import InductorModule, compile_inductor
from .lowering_onnx import OnnxRuntimeModule, export_onnx
from .measure import measure
from .parity import ParityReport, compare
from .report import ErrorReport
from .selection import Adaptive, Selection, Threshold, mark_selection
from .stages import require

__all__ = [
    "prepare", "calibrate", "measure_error", "select_trainable", "finetune", "lower", "check_parity",
    "trace", "reapply_selection", "apply_selection",
]

log = logging.getLogger(__name__)


# -- pipeline -------------------------------------------------------------------------------------
def prepare(
    model: nn.Module, example_inputs, *, kwargs: Mapping | None = None, config: QuantConfig | None = None
) -> fx.GraphModule:
    """Trace a copy of ``model`` and insert fake-quant; ``model`` itself is never mutated.

    The graph takes exactly the tensors given: ``example_inputs`` (positional) and the tensor
    values of ``kwargs``, in the order of ``model.forward``'s signature; calibration batches give
    them in that order (or as a dict by name). Arguments not given keep their defaults and
    non-tensor ``kwargs`` their values: both are baked into the graph, as torch.export does.
    """
    config = QuantConfig() if config is None else config
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"prepare(): config must be a fxptqat.QuantConfig, got {type(config).__name__}.")
    if not isinstance(model, nn.Module):
        raise InputError(f"prepare(): model must be a torch.nn.Module, got {type(model).__name__}.")
    if isinstance(model, fx.GraphModule) and meta.graph_info(model) is not None:
        raise StageError("prepare(): this GraphModule is already prepared; pass the original float model.")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise InputError(f"prepare(): kwargs must be a dict of keyword inputs, got {type(kwargs).__name__}.")
    kwargs = dict(kwargs or {})
    example_inputs = as_args(example_inputs, what="prepare(): example_inputs")
    if not all(isinstance(x, torch.Tensor) for x in example_inputs):
        raise InputError(
            "prepare(): example_inputs must be tensors, got "
            f"{[type(x).__name__ for x in example_inputs]}; give non-tensor options with kwargs={{...}}."
        )
    return capture_fx(model, example_inputs, kwargs, config)


def calibrate(qat: fx.GraphModule, batches: Iterable) -> int:
    """PTQ: observe min/max over ``batches`` (float network), then freeze every quantizer.

    Returns the number of batches seen.
    """
    info = require(qat, meta.Stage.PREPARED, "calibrate")
    if info.stage > meta.Stage.PREPARED:
        raise StageError("calibrate(): this graph is already calibrated; call prepare() again to start over.")
    seen = run_calibration(qat, batches)
    meta.update_graph_info(qat, stage=meta.Stage.CALIBRATED)
    log.info("calibrated on %d batches", seen)
    return seen


def measure_error(qat: fx.GraphModule, batches: Iterable) -> ErrorReport:
    """Isolated and propagated error of every quantized node, streamed over ``batches``."""
    info = require(qat, meta.Stage.CALIBRATED, "measure_error")
    report = measure(qat, batches, graph_id=info.graph_id)
    if info.stage < meta.Stage.MEASURED:
        meta.update_graph_info(qat, stage=meta.Stage.MEASURED)
    return report


def select_trainable(
    qat: fx.GraphModule,
    report: ErrorReport,
    *,
    policy=None,
    bn_stats: str = "frozen",
    float_params: str = "frozen",
) -> Selection:
    """Apply a policy (default: PTQAT, ``Threshold(0.01)``) and mark trainable/frozen nodes."""
    info = require(qat, meta.Stage.CALIBRATED, "select_trainable")
    if not isinstance(report, ErrorReport):
        raise SelectionError(f"select_trainable(): report must be an ErrorReport, got {type(report).__name__}.")
    if report.graph_id != info.graph_id:
        raise SelectionError(
            "select_trainable(): the report was measured on another graph (graph ids differ); "
            "call fxptqat.measure_error() on this graph and pass its report."
        )
    policy = Threshold() if policy is None else policy
    if not callable(getattr(policy, "choose", None)):
        raise ConfigError(
            f"select_trainable(): policy {policy!r} has no choose(rows) method; use fxptqat.Threshold, "
            "Fraction, Count, Random, AllLayers, NoLayers or Adaptive."
        )
    chosen = set(policy.choose(report.rows))
    return apply_selection(qat, chosen, policy=repr(policy), bn_stats=bn_stats, float_params=float_params,
                           theta=policy.theta(report.rows) if isinstance(policy, Adaptive) else None)


def apply_selection(
    qat: fx.GraphModule, trainable: set[str], *, policy: str, bn_stats: str = "frozen",
    float_params: str = "frozen", theta: float | None = None,
) -> Selection:
    """Mark ``trainable`` (node names) trainable, freeze the rest, and describe the result."""
    info = require(qat, meta.Stage.CALIBRATED, "apply_selection")
    selection = mark_selection(qat, trainable, policy=policy, bn_stats=bn_stats, float_params=float_params,
                               theta=theta, graph_id=info.graph_id)
    if info.stage < meta.Stage.SELECTED:
        meta.update_graph_info(qat, stage=meta.Stage.SELECTED)
    return selection


def reapply_selection(
    qat: fx.GraphModule, selection: Selection, *, bn_stats: str = "frozen", float_params: str = "frozen"
) -> Selection:
    """Apply a saved Selection (e.g. from ``Selection.from_json``) to a fresh ``prepare()``.

    Refuses a graph whose quantized nodes differ from the ones the selection was made for.
    """
    require(qat, meta.Stage.CALIBRATED, "reapply_selection")
    if not isinstance(selection, Selection):
        raise SelectionError(f"reapply_selection(): expected a Selection, got {type(selection).__name__}.")
    ours = {n.name: i.source for n, i in meta.quantized_nodes(qat)}
    if meta.fingerprint(qat) != selection.fingerprint or ours != selection.sources:
        missing = sorted(set(selection.sources) - set(ours))[:5]
        extra = sorted(set(ours) - set(selection.sources))[:5]
        raise SelectionError(
            "reapply_selection(): the selection was made for a different model or config "
            f"(quantized nodes differ: only in the selection {missing}, only in this graph {extra}, "
            "or their types/sizes differ). Measure and select on this graph instead."
        )
    return apply_selection(
        qat, set(selection.trainable), policy=selection.policy, bn_stats=bn_stats,
        float_params=float_params, theta=selection.theta,
    )


RUNTIMES = ("torch", "onnxruntime", "inductor")


def lower(qat: fx.GraphModule, *, runtime: str = "torch", example_inputs=None, threads: int | None = None):
    """The INT8 model computing what the fake-quant graph simulated.

    ``runtime="torch"`` (default): a GraphModule of torch.ao quantized modules (``convert_fx``),
    eager CPU kernels; not for ``QuantConfig(quantized_ops="weighted")`` (``LoweringError``).
    The other runtimes take torch.ao's *reference* graph (the same scales and zero points as
    decomposed quantize/dequantize ops) and need ``example_inputs``:
    ``"onnxruntime"``: an :class:`~fxptqat.lowering_onnx.OnnxRuntimeModule` (ONNX QDQ model with
    int8 weights; ``threads`` sets its intra-op threads, default ``torch.get_num_threads()``;
    needs ``fxptqat[onnx]``); ``"inductor"``: an :class:`~fxptqat.lowering_inductor.InductorModule`
    (``torch.compile`` with weight freezing; each new input shape compiles once).
    """
    info = require(qat, meta.Stage.CALIBRATED, "lower")
    if runtime not in RUNTIMES:
        raise ConfigError(f"lower(): runtime must be one of {RUNTIMES}, got {runtime!r}.")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"lower(): threads must be a positive int or None, got {threads!r}.")
    if threads is not None and runtime != "onnxruntime":
        raise ConfigError("lower(): threads only applies to runtime='onnxruntime'.")
    if runtime == "torch" and example_inputs is not None:
        raise ConfigError("lower(): example_inputs only apply to runtime='onnxruntime' or 'inductor'.")
    config = info.config
    qmin, qmax = config.weight_qrange
    if runtime != "torch":
        args = () if example_inputs is None else as_args(example_inputs, what="lower(example_inputs=...)")
        ref = reference(qat, config)
        clamp_int_weights(ref, qmin=qmin, qmax=qmax)
        if runtime == "inductor":
            if args:  # without them compile_inductor says what is missing first
                _refuse_saturating_kernels(config)
            return compile_inductor(ref, args)
        return export_onnx(ref, args, threads=threads or torch.get_num_threads(),
                           uint8_weights=not exact_u8s8_kernels())
    if config.weighted_only:
        raise LoweringError(
            "lower(runtime='torch') does not take QuantConfig(quantized_ops='weighted'): that recipe keeps "
            "float ops (and the conv/linear outputs only they read) between quantized layers, which torch.ao's "
            "convert_fx lowers unreliably (quantized tensors reach float ops) and runs as float reference "
            "modules. Lower it with runtime='inductor' or runtime='onnxruntime' (example_inputs=...), or "
            "prepare with quantized_ops='all' for runtime='torch'."
        )
    int8 = convert(qat, config)
    with quantized_engine(config.engine):  # clamping repacks weights: for the engine converted for
        clamp_int_weights(int8, qmin=qmin, qmax=qmax)
    _pin_exact_kernels(int8, config)
    float_scalar_ops(int8, grids=_output_grids(qat, int8))
    replace_quantized_prelu(int8, float_modules=dict(qat.named_modules()))
    drop_noop_clamps(int8)
    return int8


def _output_grids(qat: fx.GraphModule, int8: fx.GraphModule) -> dict[str, tuple[float, int]]:
    """Lowered op name -> (scale, zero point) of the fake-quant quantizer after the op it computes."""
    grids = {}
    for name, node in match_nodes(qat, int8).items():
        quantizer = output_quantizer(qat, node)
        if quantizer is not None:
            module = qat.get_submodule(quantizer.target)
            if isinstance(module, FakeQuantize) and module.scale.numel() == 1:
                grids[name] = (float(module.scale), int(module.zero_point))
    return grids


def _refuse_saturating_kernels(config: QuantConfig) -> None:
    """inductor lowers to oneDNN's u8 x s8 kernels, which have no exact path without AVX-512 VNNI."""
    if exact_u8s8_kernels() or config.act_bits is None:
        return
    if 2 * config.act_qrange[1] * config.weight_qrange[1] > 2**15 - 1:
        raise LoweringError(
            f"lower(runtime='inductor'): this CPU has no AVX-512 VNNI, so oneDNN's INT8 kernels add pairs of "
            f"products in 16 bits and saturate with {config.weight_bits}-bit weights on full-range activations: "
            "the compiled model would not compute what fake-quant simulated. Prepare with "
            "QuantConfig(reduce_range=True) or weight_bits<=7, or lower with runtime='torch' or 'onnxruntime' "
            "(both run exact kernels here)."
        )


def _pin_exact_kernels(int8: fx.GraphModule, config: QuantConfig) -> None:
    """Move modules off kernels that would not compute what fake-quant simulated
    (``passes/pack_with_engine.py`` says which and why)."""
    if config.engine not in ("x86", "fbgemm") or config.act_bits is None:  # weight-only: float kernels
        return
    if not exact_u8s8_kernels():
        codes = config.act_qrange[1]
        if not any(may_saturate(m, act_codes=codes) for m in int8.modules()):
            return
        if not engine_available("qnnpack"):
            raise LoweringError(
                "lower(): this CPU has no AVX-512 VNNI, so fbgemm's and oneDNN's INT8 kernels add pairs of "
                "products in 16 bits and saturate with 8-bit weights on full-range activations, and this torch "
                "has no qnnpack engine to run them exactly. Prepare with QuantConfig(reduce_range=True) or "
                "weight_bits<=7."
            )
        pack_with_engine(int8, engine="qnnpack", select=lambda m: may_saturate(m, act_codes=codes))
    elif config.engine == "x86" and engine_available("onednn"):
        pack_with_engine(int8, engine="onednn", select=x86_routes_to_fbgemm)


def check_parity(qat: fx.GraphModule, int8, batches: Iterable, *, tolerance_lsb: float = 1.0) -> ParityReport:
    """Compare fake-quant and INT8 at every weighted node; see :mod:`fxptqat.parity`.

    For the onnxruntime and inductor lowerings the nodes are those of the reference graph they
    were made from, and the network output is the lowered model's (an inductor model compiles
    once more for a batch shape it has not seen).
    """
    require(qat, meta.Stage.CALIBRATED, "check_parity")
    tolerance_lsb = check_finite("check_parity", "tolerance_lsb", tolerance_lsb, minimum=0.0)
    if isinstance(int8, (OnnxRuntimeModule, InductorModule)):
        run, int8 = int8, int8.reference
    elif isinstance(int8, fx.GraphModule):
        run = None
    else:
        raise InputError(f"check_parity(): int8 must be what lower() returned, got {type(int8).__name__}.")
    # On a copy: oneDNN keeps the primitive built for the first batch shape it sees, so a parity
    # run at one batch size would slow the user's model down at another (measured: batch 1 2x
    # slower after a batch-8 check). The copy repacks weights, under the engine lowered for.
    with quantized_engine(meta.graph_info(qat).config.engine):
        int8 = copy.deepcopy(int8)
    was_training = qat.training
    qat.eval()
    try:
        with torch.no_grad():
            return compare(qat, int8, batches, tolerance_lsb=tolerance_lsb, run=run)
    finally:
        qat.train(was_training)
