"""Pass: give every call of a module called more than once its own module object.

A lowered INT8 module holds one output scale, but two calls of the same module get two output
quantizers in the QAT graph: torch.ao would lower both calls with one scale, silently wrong for
the other. This pass (run on the float graph, before ``insert_fake_quant``) points each extra call
at a copy named ``<target>_call<k>`` whose parameters and buffers are the *same tensors* as the
original's, so weights stay tied during QAT (one gradient, one optimizer state) while each call
site gets its own quantizers. A graph where every module is called once is left alone.
"""

from __future__ import annotations

import copy
from collections import defaultdict

import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.infra.pass_base import PassResult

__all__ = ["split_shared_modules"]
REQUIRES = "float"  # the graph it acts on (see passes/__init__.py)


def _tied_copy(module: nn.Module) -> nn.Module:
    clone = copy.deepcopy(module)
    for name, sub in module.named_modules():
        target = clone.get_submodule(name) if name else clone
        for pname, p in sub._parameters.items():
            target._parameters[pname] = p
        for bname, b in sub._buffers.items():
            target._buffers[bname] = b
    return clone


def split_shared_modules(gm: fx.GraphModule, /) -> PassResult:
    calls: dict[str, list[fx.Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target].append(node)
    modified = False
    for target, nodes in calls.items():
        for k, node in enumerate(nodes[1:], start=1):
            name = f"{target}_call{k}"
            while hasattr(gm, name.replace(".", "_")) and name in dict(gm.named_modules()):
                name += "_"
            gm.add_submodule(name, _tied_copy(gm.get_submodule(target)))
            node.target = name
            modified = True
    if modified:
        gm.recompile()
    return PassResult(gm, modified)
