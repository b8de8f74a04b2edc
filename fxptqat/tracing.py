"""Symbolic tracing with the user's source lines recorded, and errors that say how to fix it."""

from __future__ import annotations

import re
import traceback

import torch
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
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    if config.concrete_args:
        _bake_concrete_args(gm.graph, dict(config.concrete_args))
        gm.recompile()
    return gm


def _bake_concrete_args(graph: fx.Graph, concrete: dict) -> None:
    """Drop the placeholders of specialised arguments. FX keeps one per concrete argument (renamed,
    e.g. ``use_b_1``, with the original default) plus an assert that each call repeats the traced
    value; the prepared graph should take only the remaining inputs."""
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch._assert and "has been specialized" in str(node.args):
            graph.erase_node(node)
    graph.eliminate_dead_code()
    for node in list(graph.nodes):
        base = re.sub(r"_\d+$", "", str(node.target))
        if node.op == "placeholder" and not node.users and (node.target in concrete or base in concrete):
            graph.erase_node(node)
