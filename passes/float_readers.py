"""Pass: float ops read the float value, only quantized ops its fake-quantized copy (``quantized_ops="weighted"``).

torch.ao's prepare puts one quantizer on a value and makes *every* reader read its output. Under
``quantized_ops="weighted"`` most readers besides the conv/linear that needed the quantizer are
float ops: a residual ``add`` (ResNet's identity shortcut, ConvNeXt's and a transformer's residual
stream), pooling, the network output. They then carry the rounding error of a quantizer that
exists only for the conv's sake, and in a residual network that error accumulates block after
block along the skip path. torchao's X86InductorQuantizer quantizes an op's *inputs*: its Q/DQ
pair feeds the conv alone and the shortcut stays float. Measured before this pass
(benchmarks/fidelity_probe.py, W8A8, histogram ranges, same activation scales as PT2E's to 1%):
torchvision ConvNeXt-T's logits had 1.36x PT2E's 1 - cosine; with it, the same as PT2E's.

This pass rewires each reader of an activation quantizer that torch.ao left float (no qconfig) to
read the quantizer's input instead, unless a quantized op downstream of that reader would then see
an unquantized value (a ``flatten`` between the quantizer and a linear keeps reading the quantized
value: it is how the linear's input is quantized; a ReLU that torch.ao gave a qconfig only to fuse
it, whose every reader is a quantizer, is not such an op: ResNet's ``add -> relu -> q``), unless the reader's own output shares the
quantizer's grid (torch.ao calls one observer module on a ``cat``'s inputs and output, and on a
pooling's input and output: those ops run on the grid), and unless the reader is a float ``add``
of an activation applied to a conv/linear output (a fused ReLU included): torch 2.13's inductor
cannot compile ``dq -> conv|linear -> activation -> add`` with a float activation output (see
``drop_output_quantizers``). Other float readers of such an activation are rewired: RegNetY's
squeeze-excite ``gate * x`` reads the conv-bn-relu's float output while its pooling reads the
quantized one, as X86InductorQuantizer has it (zoo, torchvision RegNetY-400MF, W8A8 fake-quant
cosine to FP32 0.924 -> 0.929, PT2E 0.928), and ``fc2 -> hardsigmoid -> mul`` (MobileNetV3) reads
fc2's float output. A quantizer left with no reader is removed (its module too unless it is still
called) and the producing node's ``NodeInfo.output_quantizer`` cleared.

The fake-quant network then computes what the lowered one does: ``convert_fx`` turns the quantizer
into a quantize/dequantize pair read by the quantized ops only. Runs on a prepared graph before
calibration; ``modified`` is False when every reader of every quantizer is already a quantized op.
"""

from __future__ import annotations

import operator
from collections import Counter

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.infra.pass_base import PassResult

from fxptqat import meta
from fxptqat.passes.drop_output_quantizers import _FUSED_RELU, _is_activation, _is_quantizer

__all__ = ["float_readers"]
REQUIRES = "qat"  # the graph it acts on (see passes/__init__.py)


def _requantized_relu(node: fx.Node, gm: fx.GraphModule) -> bool:
    """A ReLU (torch.ao gives it a qconfig only to fuse it into a conv) whose every reader is a
    quantizer: whatever it reads, what follows it is quantized again (ResNet's ``add -> relu``)."""
    relu = (node.op == "call_module" and type(gm.get_submodule(node.target)) is nn.ReLU) or (
        node.op in ("call_function", "call_method") and node.target in (F.relu, torch.relu, "relu"))
    return relu and bool(node.users) and all(_is_quantizer(u, gm) for u in node.users)


def _feeds_quantized_op(node: fx.Node, gm: fx.GraphModule, qconfigs: dict) -> bool:
    """Whether a value computed from ``node`` reaches a quantized op without passing a quantizer."""
    seen, stack = set(), list(node.users)
    while stack:
        user = stack.pop()
        if user in seen or _is_quantizer(user, gm):
            continue
        seen.add(user)
        if qconfigs.get(user.name) is not None and not _requantized_relu(user, gm):
            return True
        stack.extend(user.users)
    return False


def _activation_of_weighted(node: fx.Node, gm: fx.GraphModule) -> bool:
    """``node`` is a conv/linear with a fused ReLU, or an activation applied to a conv/linear output."""
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target), _FUSED_RELU):
        return True
    return _is_activation(node, gm) and any(
        meta.node_info(a) is not None for a in node.all_input_nodes
    )


_ADDS = {operator.add, operator.iadd, torch.add, "add", "add_"}


def _is_add(node: fx.Node) -> bool:
    return node.op in ("call_function", "call_method") and node.target in _ADDS


def _read_by_add(node: fx.Node) -> bool:
    return any(_is_add(u) for u in node.users)


def float_readers(gm: fx.GraphModule, /) -> PassResult:
    attrs = gm.meta.get("_observed_graph_module_attrs")
    qconfigs = getattr(attrs, "node_name_to_qconfig", None)
    if qconfigs is None:
        return PassResult(gm, False)
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    rewired, removed = 0, []
    for quantizer in list(gm.graph.nodes):
        if not _is_quantizer(quantizer, gm):
            continue
        source = quantizer.args[0]
        if not isinstance(source, fx.Node):
            continue
        activation = _activation_of_weighted(source, gm)
        for user in list(quantizer.users):
            if _is_quantizer(user, gm) or (user.op != "output" and qconfigs.get(user.name) is not None):
                continue  # requantized onto another grid, or a quantized op: reads the quantized value
            if user.op != "output" and _feeds_quantized_op(user, gm, qconfigs):
                continue
            if any(_is_quantizer(v, gm) and v.target == quantizer.target for v in user.users):
                continue  # a cat or pooling whose output shares this grid (torch.ao's shared observer)
            if activation and _is_add(user):
                continue  # inductor cannot fuse dq -> conv|linear -> activation -> float add
            if meta.node_info(source) is not None and _is_activation(user, gm) and _read_by_add(user):
                continue  # dq -> conv|linear -> activation -> float add: the same, activation unfused
            user.replace_input_with(quantizer, source)
            rewired += 1
        if not quantizer.users:
            gm.graph.erase_node(quantizer)
            calls[quantizer.target] -= 1
            if not calls[quantizer.target]:  # a shared module (cat inputs, pooling) stays while called
                gm.delete_submodule(quantizer.target)
            removed.append(quantizer.name)
    if removed:
        for node, info in list(meta.quantized_nodes(gm)):
            if info.output_quantizer in removed:
                meta.update_node_info(node, output_quantizer=None, output_quantizer_module=None)
    if rewired:
        gm.recompile()
    return PassResult(gm, bool(rewired))
