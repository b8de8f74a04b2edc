"""Public pipeline: prepare -> calibrate -> measure_error -> select_trainable -> finetune -> lower.

This module composes the passes; passes never call each other. Every call checks its stage and
inputs at the boundary and raises a typed :class:`fxptqat.FxptqatError`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import torch
import torch.fx as fx
import torch.nn as nn

from . import lowering, meta
from .calibration import run_calibration
from .capture import capture_fx
from .capture.tracing import trace
from .config import QuantConfig, check_finite
from .errors import ConfigError, InputError, SelectionError, StageError
from .finetune import finetune
from .inputs import as_args
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
    """PTQ: observe min/max over ``batches`` (float network), then freeze every quantizer; with
    ``QuantConfig(bias_correction=True)`` a second pass over the same batches then corrects each
    weighted layer's bias (:mod:`fxptqat.bias_correction`). A failure leaves the graph as it was.

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
    if isinstance(policy, type):  # fq.Threshold instead of fq.Threshold(): choose() exists, unbound
        raise ConfigError(
            f"select_trainable(): policy is the class {policy.__name__}, not a policy; call it: "
            f"policy={policy.__name__}(...)."
        )
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


def lower(qat: fx.GraphModule, *, runtime: str = "torch", example_inputs=None, threads: int | None = None):
    """The INT8 model computing what the fake-quant graph simulated.

    ``runtime="torch"`` (default): a GraphModule of torch.ao quantized modules (``convert_fx``),
    eager CPU kernels; not for ``QuantConfig(quantized_ops="weighted")`` (``LoweringError``).
    The other runtimes take torch.ao's *reference* graph (the same scales and zero points as
    decomposed quantize/dequantize ops) and need ``example_inputs``:
    ``"onnxruntime"``: an :class:`~fxptqat.lowering.OnnxRuntimeModule` (ONNX QDQ model with
    int8 weights; ``threads`` sets its intra-op threads, default ``torch.get_num_threads()``;
    needs ``fxptqat[onnx]``); ``"inductor"``: an :class:`~fxptqat.lowering.InductorModule`
    (``torch.compile`` with weight freezing; each new input shape compiles once).
    Each runtime validates the options it owns (:mod:`fxptqat.lowering.registry`).
    """
    info = require(qat, meta.Stage.CALIBRATED, "lower")
    return lowering.lower(qat, info.config, runtime=runtime, example_inputs=example_inputs, threads=threads)


def check_parity(qat: fx.GraphModule, int8, batches: Iterable, *, tolerance_lsb: float = 1.0) -> ParityReport:
    """Compare fake-quant and INT8 at every weighted node; see :mod:`fxptqat.parity`.

    For the onnxruntime and inductor lowerings the nodes are those of the reference graph they
    were made from, and the network output is the lowered model's (an inductor model compiles
    once more for a batch shape it has not seen).
    """
    info = require(qat, meta.Stage.CALIBRATED, "check_parity")
    tolerance_lsb = check_finite("check_parity", "tolerance_lsb", tolerance_lsb, minimum=0.0)
    lowered = lowering.describe(int8)
    if lowered is None:
        raise InputError(f"check_parity(): int8 must be what lower() returned, got {type(int8).__name__}.")
    graph = lowered.graph_copy(info.config.engine)  # on a copy: the user's model keeps its kernel caches
    was_training = qat.training
    qat.eval()
    try:
        with torch.no_grad():
            return compare(qat, graph, batches, tolerance_lsb=tolerance_lsb,
                           run=None if lowered.runs_graph else lowered.model)
    finally:
        qat.train(was_training)
