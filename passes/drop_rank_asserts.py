"""Pass: ``torch._assert`` checks of a value's rank leave the traced float graph.

timm's ``BatchNormAct2d`` (and other layers) begin with ``_assert(x.ndim == 4, ...)``. Traced, the
``x.ndim`` read is a second reader of the conv output that ``x`` is, and torch.ao's fusion patterns
need the conv's output read by the BatchNorm alone: conv-bn(-relu) is not fused, and the conv
output is fake-quantized on its own. A rank is fixed by the input shapes: capture has already run
the graph on the example inputs (every such assert held), and fxptqat refuses batches whose
per-sample shapes differ from the example's (``InputError``), so these asserts can no longer
fail. Only an assert whose condition is computed from ``ndim`` / ``dim()`` / ``len(x.shape)``
reads, comparisons and constants is removed, with the nodes that computed only its condition.

Runs on the float graph before ``insert_fake_quant``; ``modified`` is False when no such assert exists.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

__all__ = ["drop_rank_asserts"]
REQUIRES = "float"  # the graph it acts on (see passes/__init__.py)

_COMPARE = {operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
            operator.and_, operator.or_, operator.not_, operator.truth}


def _rank_condition(node, seen: list[fx.Node]) -> bool:
    """``node`` is a constant or computed only from rank reads and comparisons (collected in ``seen``)."""
    if not isinstance(node, fx.Node):
        return isinstance(node, (bool, int))
    if node.op == "call_function" and node.target is getattr and node.args[1] == "ndim":
        pass  # reads the rank of a value computed elsewhere
    elif node.op == "call_method" and node.target == "dim" and len(node.args) == 1:
        pass
    elif node.op == "call_function" and node.target is len:
        shape = node.args[0]
        if not (isinstance(shape, fx.Node) and shape.op == "call_function" and shape.target is getattr
                and shape.args[1] == "shape" and len(shape.users) == 1):
            return False
        seen.append(shape)
    elif node.op == "call_function" and node.target in _COMPARE:
        if not all(_rank_condition(a, seen) for a in node.args):
            return False
    else:
        return False
    seen.append(node)
    return True


def drop_rank_asserts(gm: fx.GraphModule, /) -> PassResult:
    dropped = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch._assert or node.users \
                or not isinstance(node.args[0], fx.Node):
            continue
        seen: list[fx.Node] = []
        if not _rank_condition(node.args[0], seen):
            continue
        gm.graph.erase_node(node)
        for helper in reversed(list(dict.fromkeys(seen))):  # readers before what they read
            if not helper.users:
                gm.graph.erase_node(helper)
        dropped += 1
    if dropped:
        # a rank read with no reader left (FX traces an f-string's ``x.ndim`` in the message too)
        for node in reversed(list(gm.graph.nodes)):
            if (node.op == "call_function" and node.target is getattr and node.args[1] == "ndim"
                    and not node.users):
                gm.graph.erase_node(node)
        gm.recompile()
    return PassResult(gm, bool(dropped))
