"""Stage checks at the API boundary: which call must come first."""

from __future__ import annotations

import torch.fx as fx

from . import meta
from .errors import StageError

__all__ = ["require"]

_NEXT = {
    meta.Stage.PREPARED: "calibrate",
    meta.Stage.CALIBRATED: "measure_error",
    meta.Stage.MEASURED: "select_trainable",
}

def require(qat, at_least: meta.Stage, call: str) -> meta.GraphInfo:
    info = meta.graph_info(qat) if isinstance(qat, fx.GraphModule) else None
    if info is None:
        raise StageError(
            f"{call}() needs the GraphModule returned by fxptqat.prepare(), got {type(qat).__name__}. "
            "Call qat = fxptqat.prepare(model, example_inputs) first."
        )
    if info.stage < at_least:
        raise StageError(
            f"{call}() needs a {at_least.name.lower()} graph but this one is only "
            f"{info.stage.name.lower()}: call fxptqat.{_NEXT[info.stage]}() first."
        )
    return info
