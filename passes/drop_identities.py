"""Pass: calls of ``nn.Identity`` leave the traced float graph before torch.ao prepares it.

timm builds its blocks with ``nn.Identity`` placeholders for the options a model does not use
(ResNet's ``conv -> bn -> drop_block -> act -> aa``, drop-path at rate 0, ...). The tracer keeps
every ``torch.nn`` module as a call, so the graph reads ``conv -> bn -> identity -> relu``, and
torch.ao then (1) cannot fuse conv-bn-relu, whose pattern needs the three adjacent, and (2)
quantizes the Identity as an op on its input's grid: the conv's output is fake-quantized *before*
the ReLU, spending half of the uint8 grid on values the ReLU discards, then again after it. The
Identity computes nothing, so its readers read its input instead; the module stays where it was
in the hierarchy (it holds no state). torchao's PT2E export traces Identity away the same way.

Runs on the float graph before ``insert_fake_quant``; ``modified`` is False when no Identity is called.
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.infra.pass_base import PassResult

__all__ = ["drop_identities"]
REQUIRES = "float"  # the graph it acts on (see passes/__init__.py)


def drop_identities(gm: fx.GraphModule, /) -> PassResult:
    dropped = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or type(gm.get_submodule(node.target)) is not nn.Identity:
            continue
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            continue  # not the one-tensor call nn.Identity.forward takes: left as traced
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        dropped += 1
    if dropped:
        gm.recompile()
    return PassResult(gm, bool(dropped))
