"""Pass: a conv/linear output that no quantized node reads stays float (``quantized_ops="weighted"``).

torch.ao's FX recipe always quantizes a weighted op's output. Under ``quantized_ops="weighted"``
most of those outputs go straight into float ops (attention's reshapes and matmuls, GELU, layer
norm, residual adds): the INT8 graph then rounds them onto a uint8 grid only to dequantize them
again, and inductor cannot fuse the float op that follows into the integer kernel. torchao's
X86InductorQuantizer quantizes an op's *inputs* only, so such outputs stay float there: ``dq ->
linear -> gelu -> q`` becomes one oneDNN kernel with a GELU post-op, ``dq -> linear -> add`` one
with a sum post-op, and q/k/v reach the attention kernel without a uint8 round trip.

This pass gives fxptqat's graph the same rule: the output quantizer of a weighted node is removed
when torch.ao left every one of its readers float (no qconfig: not a conv/linear reading it as its
input, nor a ReLU or BN of the recipe), the quantizer is its own (no other node calls the same
module, as torch.ao does for a value feeding a ``cat``) and not requantized onto a cat's grid
(``insert_fake_quant``), and no activation is applied to it whose result a float op reads (a ReLU
fused into the module always keeps it; so does a ReLU6, GELU, ... reader followed by a float op).
Inductor (torch 2.13, torchao 0.18) cannot compile ``dq -> linear|conv -> activation -> add``
with a float activation output: its binary-fusion passes assert that no unary post-op was fused
first, and PT2E's own graph of the linear case fails the same way. ``linear -> GELU -> q`` (a
transformer MLP) is fine and is where the rule gains. The fake-quant network then computes exactly
what the lowered one does (the error recorder and the parity check compare the float output), and
the node's ``NodeInfo.output_quantizer`` becomes None.

Runs on a prepared graph before calibration; ``modified`` is False when no such quantizer is left.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.ao.nn.intrinsic import qat as nniqat
from torch.fx.passes.infra.pass_base import PassResult

from fxptqat import meta
from fxptqat.fake_quantize import FakeQuantize

__all__ = ["drop_output_quantizers"]
REQUIRES = "qat"  # the graph it acts on (see passes/__init__.py)

_FUSED_RELU = (nniqat.LinearReLU, nniqat.ConvReLU1d, nniqat.ConvReLU2d, nniqat.ConvReLU3d,
               nniqat.ConvBnReLU1d, nniqat.ConvBnReLU2d, nniqat.ConvBnReLU3d)
# element-wise activations inductor fuses into a quantized conv/linear as a unary post-op
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.GELU, nn.SiLU, nn.Hardswish, nn.Sigmoid, nn.Tanh,
                nn.LeakyReLU)
_ACTIVATION_FNS = {F.relu, F.relu6, F.hardtanh, F.gelu, F.silu, F.hardswish, F.leaky_relu, torch.relu,
                   torch.sigmoid, torch.tanh, torch.clamp, "relu", "sigmoid", "tanh", "clamp"}


def _is_activation(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _ACTIVATIONS)
    return node.op in ("call_function", "call_method") and node.target in _ACTIVATION_FNS


def _is_quantizer(node: fx.Node, gm: fx.GraphModule) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), FakeQuantize)


def _activation_then_float(quantizer: fx.Node, gm: fx.GraphModule) -> bool:
    """A reader of the value is an activation whose result a float op reads."""
    return any(_is_activation(u, gm) and not all(_is_quantizer(v, gm) for v in u.users) for u in quantizer.users)


def drop_output_quantizers(gm: fx.GraphModule, /) -> PassResult:
    # torch.ao's own record of which nodes it quantizes (what convert_fx will lower as quantized)
    attrs = gm.meta.get("_observed_graph_module_attrs")
    qconfigs = getattr(attrs, "node_name_to_qconfig", None)
    if qconfigs is None:
        return PassResult(gm, False)
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    nodes = {n.name: n for n in gm.graph.nodes}
    dropped = []
    for node, info in list(meta.quantized_nodes(gm)):
        quantizer = nodes.get(info.output_quantizer) if info.output_quantizer else None
        if quantizer is None or quantizer.op != "call_module" or quantizer.args[0] is not node:
            continue
        if not _is_quantizer(quantizer, gm) or calls[quantizer.target] != 1:
            continue
        if isinstance(gm.get_submodule(node.target), _FUSED_RELU) or _activation_then_float(quantizer, gm):
            continue  # see the module docstring: inductor's {linear,conv}+activation+add fusion fails on it
        if any(user.op != "output" and qconfigs.get(user.name) is not None for user in quantizer.users):
            continue  # a quantized op reads it (for a conv/linear: its input quantizer)
        if any(_is_quantizer(user, gm) for user in quantizer.users):
            continue  # requantized onto a cat's grid (passes/insert_fake_quant.py): left as torch.ao made it
        quantizer.replace_all_uses_with(node)
        gm.graph.erase_node(quantizer)
        gm.delete_submodule(quantizer.target)
        meta.update_node_info(node, output_quantizer=None, output_quantizer_module=None)
        dropped.append(node.name)
    if dropped:
        gm.recompile()
    return PassResult(gm, bool(dropped))
