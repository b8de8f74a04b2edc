"""The FX capture: symbolic trace + torch.ao ``prepare_qat_fx`` (through passes/insert_fake_quant.py)
and the graph passes that make its QAT graph what fxptqat simulates."""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Mapping

import torch
import torch.fx as fx
import torch.nn as nn

from fxptqat.passes.batch_norm_modules import batch_norm_modules
from fxptqat.passes.collapse_requantize import collapse_requantize
from fxptqat.passes.drop_identities import drop_identities
from fxptqat.passes.drop_output_quantizers import drop_output_quantizers
from fxptqat.passes.drop_rank_asserts import drop_rank_asserts
from fxptqat.passes.fit_observers_to_clamps import fit_observers_to_clamps
from fxptqat.passes.float_readers import float_readers
from fxptqat.passes.fold_parameter_metadata import fold_parameter_metadata
from fxptqat.passes.insert_fake_quant import insert_fake_quant
from fxptqat.passes.split_shared_modules import split_shared_modules

from .. import meta
from ..config import QuantConfig
from ..interpreter import CheckedInterpreter
from .subclasses import plain_weighted_subclasses
from .tracing import graph_inputs, trace

__all__ = ["capture_fx"]

log = logging.getLogger(__name__)
# torch.fx's tracer patches nn.Module.__call__ process-wide while it traces, and a capture traces twice
# (ours, then torch.ao's prepare_qat_fx): captures in two threads would trace into each other's modules.
_CAPTURE_LOCK = threading.RLock()


def capture_fx(model: nn.Module, example_inputs: tuple, kwargs: Mapping, config: QuantConfig) -> fx.GraphModule:
    """Trace a copy of ``model`` and insert fake-quant; returns the annotated QAT graph in eval mode.

    The graph takes ``example_inputs`` and the tensor values of ``kwargs``, in the order of
    ``model.forward``'s signature; other arguments are baked in (see :func:`graph_inputs`).
    """
    names, _ = graph_inputs(model, len(example_inputs), kwargs)
    with _CAPTURE_LOCK:
        work = copy.deepcopy(model)
        swapped = plain_weighted_subclasses(work, example_inputs, kwargs)
        if swapped:
            log.info("weighted subclass modules quantized as their base class: %s", ", ".join(swapped))
        example_inputs = (*example_inputs, *(kwargs[n] for n in names[len(example_inputs):]))
        gm = trace(work, config, n_args=len(example_inputs) - sum(n in kwargs for n in names), kwargs=kwargs)
        with torch.no_grad():
            CheckedInterpreter(gm.eval(), check_finite=False, what="prepare() on example_inputs").run(*example_inputs)
        drop_identities(gm)
        drop_rank_asserts(gm)
        batch_norm_modules(gm)
        fold_parameter_metadata(gm)
        split_shared_modules(gm)
        insert_fake_quant(gm, config=config, example_inputs=example_inputs)
        if config.weighted_only:
            float_readers(gm)  # ... and float ops read the float value, quantized ops their Q/DQ copy
            collapse_requantize(gm)  # a value rounded only to be requantized is rounded once
            drop_output_quantizers(gm)  # X86InductorQuantizer's rule: outputs only float ops read stay float
        fit_observers_to_clamps(gm)
        meta.update_graph_info(gm, inputs=tuple((tuple(x.shape[1:]), str(x.dtype)) for x in example_inputs))
        gm.graph.lint()
        return gm.eval()
