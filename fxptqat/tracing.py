"""Symbolic tracing with the user's source lines recorded, and errors that say how to fix it."""

from __future__ import annotations

import traceback

import torch.fx as fx
import torch.nn as nn

from .config import QuantConfig
from .errors import TraceError

__all__ = ["trace"]


class _Tracer(fx.Tracer):
    def __init__(self, leaves: tuple) -> None:
        super().__init__()
        self.record_stack_traces = True
        self.leaf_types = tuple(m for m in leaves if isinstance(m, type))
        self.leaf_names = {m for m in leaves if isinstance(m, str)}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, self.leaf_types) or qualname in self.leaf_names:
            return True
        return super().is_leaf_module(m, qualname)


def _user_frame(exc: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/torch/" not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {f.filename}:{f.lineno}: `{(f.line or '').strip()}`"


def trace(model: nn.Module, config: QuantConfig) -> fx.GraphModule:
    """Symbolically trace ``model`` (not copied here) with source lines recorded."""
    tracer = _Tracer(config.leaf_modules)
    try:
        graph = tracer.trace(model, concrete_args=dict(config.concrete_args or {}) or None)
    except Exception as e:
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}{_user_frame(e)}: {type(e).__name__}: {e}. "
            "Data-dependent control flow and unsupported Python cannot be traced: mark the submodule "
            "that contains it as a leaf (QuantConfig(leaf_modules=(MyBlock,))) or fix the branch with "
            "QuantConfig(concrete_args={'flag': True})."
        ) from e
    return fx.GraphModule(tracer.root, graph, type(model).__name__)
