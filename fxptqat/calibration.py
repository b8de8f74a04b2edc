"""Post-training calibration: observe every quantizer over batches of the float network, then freeze;
with ``QuantConfig(bias_correction=True)``, then correct every weighted node's bias
(:mod:`fxptqat.bias_correction`)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Iterator

import torch
import torch.fx as fx

from fxptqat.passes.freeze_quantizers import freeze_quantizers, observe_only

from . import distributed, meta
from .bias_correction import correct_bias
from .errors import CalibrationError
from .fake_quantize import FakeQuantize
from .inputs import iter_batches
from .interpreter import CheckedInterpreter

__all__ = ["run_calibration"]

log = logging.getLogger(__name__)


def run_calibration(qat: fx.GraphModule, batches: Iterable) -> int:
    """Observe over ``batches`` (statistics reduced across torch.distributed ranks), then freeze
    every quantizer; returns the batches seen. A failed call leaves the quantizers (and biases) as
    they were."""
    info = meta.graph_info(qat)
    bias_correction = info is not None and info.config.bias_correction
    if bias_correction and isinstance(batches, Iterator):  # a one-shot iterator: both passes need the batches
        batches = list(batches)
    distributed.check_observers(qat)  # refuse what cannot be reduced before running any batch
    was_training = qat.training
    saved = _quantizer_state(qat)
    observe_only(qat)
    qat.eval()
    runner = CheckedInterpreter(qat, what="calibrate")
    seen = 0
    try:
        with torch.no_grad():
            for args in iter_batches(batches, qat, what="calibrate()"):
                runner.run(*args)
                seen += 1
        if distributed.sum_int(seen) == 0:
            raise CalibrationError("calibrate(): the batches were empty; give at least one batch of real inputs.")
        if distributed.sum_int(int(seen == 0)):
            raise CalibrationError("calibrate(): some rank got no batch; give every rank a non-empty shard.")
        distributed.reduce_observers(qat)  # no-op unless torch.distributed is initialized
    except BaseException:
        _restore_quantizer_state(qat, saved)
        raise
    finally:
        qat.train(was_training)
    freeze_quantizers(qat)
    if bias_correction:
        try:
            done = correct_bias(qat, batches)  # applies nothing unless it completes
        except BaseException:
            _restore_quantizer_state(qat, saved)
            raise
        log.info("bias correction: %d weighted node(s) corrected, %d left alone%s", len(done.corrected),
                 len(done.skipped), f" ({next(iter(done.skipped.values()))}, ...)" if done.skipped else "")
    return seen


def _quantizer_state(qat: fx.GraphModule) -> dict:
    return {
        name: (copy.deepcopy(m.state_dict()), m._observe, m._fake_quant)
        for name, m in qat.named_modules() if isinstance(m, FakeQuantize)
    }


def _restore_quantizer_state(qat: fx.GraphModule, saved: dict) -> None:
    for name, (state, observe, fake_quant) in saved.items():
        m = qat.get_submodule(name)
        m.load_state_dict(state)
        m.enable_observer(observe)
        m.enable_fake_quant(fake_quant)
