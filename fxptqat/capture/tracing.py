"""Symbolic tracing with the user's source lines recorded, and errors that say how to fix it."""

from __future__ import annotations

import inspect
import re
import traceback
from collections.abc import Mapping

import torch
import torch.fx as fx
import torch.nn as nn

from ..config import QuantConfig
from ..errors import TraceError

__all__ = ["trace", "graph_inputs"]

_TRACE_KINDS = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                inspect.Parameter.KEYWORD_ONLY)


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


def graph_inputs(model: nn.Module, n_args: int, kwargs: Mapping) -> tuple[list[str], dict]:
    """Split ``model.forward``'s parameters into the graph's inputs and the values baked into it.

    The graph takes exactly what the user gave as tensors: the first ``n_args`` parameters and the
    tensor ``kwargs``, in signature order. Every other parameter is specialised, as torch.export
    does: a non-tensor keyword to its value, a parameter not given to its default.
    """
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values() if p.kind in _TRACE_KINDS]
    except (TypeError, ValueError):
        return [], {}
    positional = [p for p in params if p.kind != inspect.Parameter.KEYWORD_ONLY]
    if n_args > len(positional):
        raise TraceError(
            f"{type(model).__name__}.forward takes {len(positional)} positional argument(s) "
            f"({', '.join(p.name for p in positional)}) but example_inputs has {n_args}."
        )
    names = {p.name for p in params}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise TraceError(
            f"{type(model).__name__}.forward has no argument(s) {unknown}; it takes "
            f"{', '.join(p.name for p in params)}."
        )
    given = {p.name for p in positional[:n_args]}
    twice = sorted(given & set(kwargs))
    if twice:
        raise TraceError(f"example inputs give {twice} both positionally and as keywords.")
    inputs, concrete = [], {}
    for p in params:
        if p.name in given or (p.name in kwargs and isinstance(kwargs[p.name], torch.Tensor)):
            inputs.append(p.name)
        elif p.name in kwargs:
            concrete[p.name] = kwargs[p.name]
        elif p.default is not inspect.Parameter.empty:
            concrete[p.name] = p.default
        else:
            raise TraceError(
                f"{type(model).__name__}.forward needs argument {p.name!r}, which has no default and "
                "is not in the example inputs: pass it positionally or with kwargs={...}."
            )
    return inputs, concrete


def trace(model: nn.Module, config: QuantConfig, *, n_args: int | None = None, kwargs: Mapping | None = None
          ) -> fx.GraphModule:
    """Symbolically trace ``model`` (not copied here) with source lines recorded.

    With ``n_args`` (how many positional example inputs were given) the graph takes exactly the
    given inputs; see :func:`graph_inputs`. ``QuantConfig(concrete_args=...)`` overrides.
    """
    tracer = _Tracer(config.leaf_modules)
    concrete = {}
    if n_args is not None:
        _, concrete = graph_inputs(model, n_args, kwargs or {})
    concrete.update(config.concrete_args or {})
    try:
        graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as e:
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}{_user_frame(e)}: {type(e).__name__}: {e}. "
            "Data-dependent control flow and unsupported Python cannot be traced: mark the submodule "
            "that contains it as a leaf (QuantConfig(leaf_modules=(MyBlock,))) or fix the branch with "
            "QuantConfig(concrete_args={'flag': True})."
        ) from e
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    if concrete:
        _bake_concrete_args(gm.graph, concrete)
        gm.recompile()
    return gm


def _bake_concrete_args(graph: fx.Graph, concrete: dict) -> None:
    """Drop the placeholders of specialised arguments. FX keeps one per concrete argument (renamed,
    e.g. ``use_b_1``, with the original default) plus an assert that each call repeats the traced
    value; the prepared graph should take only the remaining inputs."""
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in (torch._assert, fx._symbolic_trace._assert_is_none) \
                and "has been specialized" in str(node.args):
            graph.erase_node(node)
    graph.eliminate_dead_code()
    for node in list(graph.nodes):
        base = re.sub(r"_\d+$", "", str(node.target))
        if node.op == "placeholder" and not node.users and (node.target in concrete or base in concrete):
            graph.erase_node(node)
