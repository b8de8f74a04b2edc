"""Pass: an activation quantizer whose value is only ever clamped observes the clamped range.

torch.ao gives ``conv -> ReLU6`` one quantizer, shared by the conv's output and the ReLU6's, and
calibrates it on the conv's output: with a range like [-5, 9] the grid spends its codes on values
the ReLU6 then cuts away (zero point 134 in MobileNetV2), and the INT8 model runs the ReLU6 as a
separate pass over the data. When every consumer of a quantizer's value clamps it to [low, high]
(ReLU6, Hardtanh, ``clamp``) -- and every other value the same quantizer sees already comes out of
such a clamp -- observing ``clamp(x, low, high)`` changes nothing the network computes
(quantizing clamps to the observed range, which then lies inside [low, high] once 0 is added) but
puts all 256 codes on it; for ReLU6 the zero point becomes 0 and the clamp a no-op on the grid,
which ``passes/drop_noop_clamps.py`` removes from the INT8 graph.

Runs on a prepared graph before calibration. Sets :attr:`fxptqat.FakeQuantize.observe_range`;
``modified`` is False when every such quantizer already has its range.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.infra.pass_base import PassResult

from fxptqat.fake_quantize import FakeQuantize

__all__ = ["fit_observers_to_clamps", "clamp_range"]
REQUIRES = "qat"  # the graph it acts on (see passes/__init__.py)


def _number(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def clamp_range(node: fx.Node, gm: fx.GraphModule) -> tuple[float, float] | None:
    """[low, high] if ``node`` clamps its first argument to constant bounds, else None."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, (nn.ReLU6, nn.Hardtanh)):  # ReLU6 is a Hardtanh(0, 6)
            return float(module.min_val), float(module.max_val)
        return None
    if node.op == "call_function" and node.target is F.relu6:
        return 0.0, 6.0
    if node.op == "call_function" and node.target is F.hardtanh:
        low = _number(node.kwargs.get("min_val", node.args[1] if len(node.args) > 1 else -1.0))
        high = _number(node.kwargs.get("max_val", node.args[2] if len(node.args) > 2 else 1.0))
        return (low, high) if low is not None and high is not None else None
    if node.op in ("call_function", "call_method") and node.target in (torch.clamp, "clamp"):
        low = _number(node.kwargs.get("min", node.args[1] if len(node.args) > 1 else None))
        high = _number(node.kwargs.get("max", node.args[2] if len(node.args) > 2 else None))
        return (low, high) if low is not None and high is not None else None
    return None


def fit_observers_to_clamps(gm: fx.GraphModule, /) -> PassResult:
    calls: dict[str, list[fx.Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), FakeQuantize):
            calls[node.target].append(node)
    modified = False
    for target, nodes in calls.items():
        fq = gm.get_submodule(target)
        if fq.is_per_channel:
            continue
        feeding: set[tuple[float, float] | None] = set()  # clamp ranges of this quantizer's consumers
        fed: set[tuple[float, float] | None] = set()  # clamp ranges of its other inputs' producers
        for node in nodes:
            users = {clamp_range(u, gm) for u in node.users}
            if users and None not in users:
                feeding |= users
            else:
                source = node.args[0]
                fed.add(clamp_range(source, gm) if isinstance(source, fx.Node) else None)
        if len(feeding) != 1 or not fed <= feeding:
            continue
        (low, high), = feeding
        if low > high or fq.observe_range == (low, high):
            continue
        fq.observe_range = (low, high)
        modified = True
    return PassResult(gm, modified)
