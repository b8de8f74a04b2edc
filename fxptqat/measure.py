"""Per-node error measurement: the streamed float-vs-quantized pass, reduced into an ErrorReport."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.fx as fx

from . import distributed, meta
from .errors import CalibrationError
from .inputs import iter_batches
from .interpreter import ErrorRecorder
from .report import ErrorReport, ErrorRow

__all__ = ["measure"]


def measure(qat: fx.GraphModule, batches: Iterable, *, graph_id: str) -> ErrorReport:
    """Isolated and propagated error of every quantized node over ``batches`` (all ranks under
    torch.distributed); each node's NodeInfo gets its stats."""
    was_training = qat.training
    qat.eval()
    recorder = ErrorRecorder(qat)
    seen = samples = 0
    try:
        with torch.no_grad(), recorder.weights_once():
            for args in iter_batches(batches, qat, what="measure_error()"):
                recorder.run(*args)
                seen += 1
                samples += int(args[0].shape[0]) if args[0].dim() else 1
    finally:
        qat.train(was_training)
    seen, samples = distributed.sum_int(seen), distributed.sum_int(samples)
    if seen == 0:
        raise CalibrationError("measure_error(): the batches were empty; give at least one batch.")
    distributed.reduce_running(recorder.isolated)  # no-ops unless torch.distributed is initialized
    distributed.reduce_running(recorder.propagated)
    rows = []
    for node, ninfo in meta.quantized_nodes(qat):
        iso, prop = recorder.isolated[node.name].result(), recorder.propagated[node.name].result()
        meta.update_node_info(node, isolated=iso, propagated=prop)
        rows.append(ErrorRow(node.name, ninfo.source, ninfo.module_type, ninfo.params, iso, prop))
    return ErrorReport(rows=tuple(rows), graph_id=graph_id, batches=seen, samples=samples)
