"""Pass (on a traced float graph): fold ``param.device`` / ``.dtype`` / ``.shape`` reads into constants.

Some models read a parameter's metadata in ``forward`` (timm's EdgeNeXt positional encoding:
``self.token_projection.weight.device``). FX records it as ``getattr(get_attr(weight), "device")``
and evaluates it at every call; once torch.ao swaps the conv for a quantized one, ``weight`` is a
method and the INT8 model fails (``'function' object has no attribute 'device'``). A parameter's
device, dtype and shape do not change through quantization, so the reads are folded into the
values they had when traced, as torch.export does. ``modified`` says whether a read was folded.
"""

from __future__ import annotations

import builtins

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

__all__ = ["fold_parameter_metadata"]
REQUIRES = "float"  # the graph it acts on (see passes/__init__.py)

_FOLDED = ("device", "dtype", "shape")


def fold_parameter_metadata(gm: fx.GraphModule, /) -> PassResult:
    modified = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not builtins.getattr or len(node.args) != 2:
            continue
        source, attr = node.args
        if attr not in _FOLDED or not isinstance(source, fx.Node) or source.op != "get_attr":
            continue
        value = _fetch(gm, source.target)
        if not isinstance(value, torch.Tensor):
            continue
        _replace(node, getattr(value, attr))
        gm.graph.erase_node(node)
        modified = True
    if modified:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return PassResult(gm, modified)


def _fetch(gm: fx.GraphModule, target: str):
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name, None)


def _replace(node: fx.Node, constant) -> None:
    for user in list(node.users):
        user.args = fx.node.map_arg(user.args, lambda a: constant if a is node else a)
        user.kwargs = fx.node.map_arg(user.kwargs, lambda a: constant if a is node else a)
