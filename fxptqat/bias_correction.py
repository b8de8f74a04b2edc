"""Empirical bias correction: each weighted node's bias absorbs the mean shift that quantizing its
weights causes on the calibration data.

Rounding a layer's weights moves the mean of its outputs: per output channel,
``E[op(x, W)] - E[op(x, W_q)] = E[op(x, W - W_q)]``, a shift the next layers see as a wrong bias
(Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias Correction", ICCV 2019;
OpenVINO's and AIMET's PTQ run it by default). It is largest where a channel sums few weights
(depthwise and grouped convolutions) and at low weight bits. After calibration has fixed every
quantizer, one streamed pass over the batches runs the quantized network and, at each weighted node,
its pre-activation output with float and with quantized weights on the same (quantized) inputs;
the mean difference per output channel is then added to the parameter that shifts that channel
(:func:`fxptqat.capture.fused.output_shift`: a fused BatchNorm's bias or the layer's bias). All the
shifts are measured on the network as calibrated and applied together at the end, so a failure
changes nothing; a channel whose mean rests on fewer than :data:`MIN_VALUES` values is left alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
import torch.fx as fx

from . import distributed, meta
from .capture.fused import has_fused_activation, output_shift, pre_activation
from .errors import CalibrationError
from .inputs import iter_batches
from .interpreter import CheckedInterpreter, _weights_float

__all__ = ["BiasCorrection", "correct_bias", "MIN_VALUES"]

MIN_VALUES = 64  # values per channel (e.g. images for a classifier head) before a mean is trusted


@dataclasses.dataclass(frozen=True)
class BiasCorrection:
    """What :func:`correct_bias` did. corrected: node name -> the largest ``|shift|`` added to one of
    its channels; skipped: node name -> why that node was left alone."""

    corrected: dict[str, float]
    skipped: dict[str, str]


class _ShiftRecorder(CheckedInterpreter):
    """Runs the quantized network; sums, per weighted node and output channel, the pre-activation
    output with float weights minus that with quantized weights, on the node's quantized inputs."""

    def __init__(self, gm: fx.GraphModule, targets: dict[str, tuple[str, int]]):
        super().__init__(gm, what="calibrate (bias correction)")
        self.targets = targets  # node name -> (weight quantizer target, channel dim)
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = dict.fromkeys(targets, 0)

    def run_node(self, n: fx.Node):
        value = super().run_node(n)  # a failure here is reported with the node's context
        target = self.targets.get(n.name)
        if target is not None:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            module = self.fetch_attr(n.target)
            with torch.no_grad():
                quantized = pre_activation(module, *args, **kwargs) if has_fused_activation(module) else value
                with _weights_float(self.fetch_attr(target[0])):
                    unquantized = pre_activation(module, *args, **kwargs)
            diff = (unquantized.double() - quantized.double()).movedim(target[1], 0)
            total = diff.reshape(diff.shape[0], -1).sum(1)
            self.sums[n.name] = total if n.name not in self.sums else self.sums[n.name] + total
            self.counts[n.name] += diff[0].numel()
        return value


def _targets(qat: fx.GraphModule) -> tuple[dict[str, tuple[str, int]], dict[str, str], dict[str, str]]:
    targets, params, skipped = {}, {}, {}
    for node, info in meta.quantized_nodes(qat):
        module = qat.get_submodule(node.target) if node.op == "call_module" else None
        shift = output_shift(module) if module is not None else None
        if shift is None or not info.weight_quantizer:
            skipped[node.name] = (f"{info.module_type} has no bias parameter to shift"
                                  if module is not None and shift is None else "not a module with quantized weights")
            continue
        targets[node.name] = (info.weight_quantizer, shift[1])
        params[node.name] = f"{node.target}.{shift[0]}"
    return targets, params, skipped


def correct_bias(qat: fx.GraphModule, batches: Iterable) -> BiasCorrection:
    """Measure every weighted node's weight-rounding mean shift over ``batches`` on the calibrated
    (frozen) graph in eval mode, then add it to the node's bias. Nothing changes if this raises."""
    targets, params, skipped = _targets(qat)
    if not targets:
        return BiasCorrection({}, skipped)
    recorder = _ShiftRecorder(qat, targets)
    was_training = qat.training
    qat.eval()
    try:
        with torch.no_grad():
            for args in iter_batches(batches, qat, what="calibrate() (bias correction)"):
                recorder.run(*args)
    finally:
        qat.train(was_training)
    names = sorted(targets)
    for name in names:  # a node no batch reached (a branch the inputs never take) has no sum
        recorder.sums.setdefault(name, torch.zeros(qat.get_parameter(params[name]).numel(), dtype=torch.float64))
    sums, counts = distributed.sum_tensors([recorder.sums[n] for n in names],
                                           [recorder.counts[n] for n in names])
    if sum(counts) == 0:
        raise CalibrationError("calibrate(): bias correction saw no batch; give the same non-empty batches "
                               "as for calibration (a one-shot iterator is read once: pass a list).")
    # nodes that call one module (fxptqat splits shared weighted modules; a capture that does not)
    # share its bias: one shift, the mean over all their calls
    by_param: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        by_param.setdefault(params[name], []).append(i)
    corrected = {}
    with torch.no_grad():
        for param, members in by_param.items():
            count = sum(counts[i] for i in members)
            if count < MIN_VALUES:
                for i in members:
                    skipped[names[i]] = (f"{count} values per channel in the batches (bias correction needs "
                                         f"{MIN_VALUES})")
                continue
            bias = qat.get_parameter(param)
            shift = (sum(sums[i] for i in members) / count).to(bias.dtype)
            bias.add_(shift)
            for i in members:
                corrected[names[i]] = float(shift.abs().max())
    return BiasCorrection(corrected, skipped)
