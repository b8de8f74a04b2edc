"""Which node of a lowered graph computes which node of the fake-quant graph it was lowered from.

torch.ao's ``convert_fx`` keeps the names of module calls and of most functions, but renames the
ops it swaps for quantized kernels (``add`` -> ``torch.ops.quantized.add`` named ``add_1``, ``mul``
-> ``mul_2``) and inserts quantize/dequantize nodes. A lowered op is matched to the fake-quant op of
the same name; failing that, to the one of the same base name (``add_1`` -> ``add``) whose inputs
are the matches of its own inputs, looking through quantizers on the fake-quant side and through
quantize/dequantize on the lowered side.
"""

from __future__ import annotations

import re

import torch
import torch.fx as fx

from .fake_quantize import is_quantizer

__all__ = ["match_nodes", "output_quantizer"]

_COMPUTE = ("call_module", "call_function", "call_method")
_QDQ_METHODS = ("dequantize",)


def _is_qdq(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _QDQ_METHODS
    if node.op != "call_function":
        return False
    name = getattr(node.target, "__name__", str(node.target))
    return node.target is torch.quantize_per_tensor or name.startswith(("quantize_per_", "dequantize_per_"))


def _base(name: str) -> str:
    return re.sub(r"_\d+$", "", name)


def _inputs(node: fx.Node, through) -> tuple[str, ...]:
    names = []
    for arg in node.all_input_nodes:
        if arg.op == "get_attr":
            continue  # the lowered graph's scales and zero points
        while through(arg) and arg.args and isinstance(arg.args[0], fx.Node):
            arg = arg.args[0]
        names.append(arg.name)
    return tuple(names)


def match_nodes(qat: fx.GraphModule, lowered: fx.GraphModule) -> dict[str, fx.Node]:
    """Lowered node name -> the fake-quant node it computes (compute nodes only, no quantizers)."""

    def fake_quantizer(node: fx.Node) -> bool:
        return node.op == "call_module" and is_quantizer(qat.get_submodule(node.target))

    fake = {n.name: n for n in qat.graph.nodes if n.op in _COMPUTE and not fake_quantizer(n)}
    matched: dict[str, fx.Node] = {}
    taken: set[str] = set()
    for node in lowered.graph.nodes:
        if node.op in _COMPUTE and node.name in fake and not _is_qdq(node):
            # a name is reused when convert_fx renumbers nodes: the same name must read as many
            # values (EdgeNeXt: the lowered `mul` was a scalar mul, the fake-quant one a product)
            if len(_inputs(node, _is_qdq)) != len(_inputs(fake[node.name], fake_quantizer)):
                continue
            matched[node.name] = fake[node.name]
            taken.add(node.name)
    by_inputs: dict[tuple, list[fx.Node]] = {}
    for node in fake.values():
        if node.name not in taken:
            by_inputs.setdefault((_base(node.name), _inputs(node, fake_quantizer)), []).append(node)
    for node in lowered.graph.nodes:
        if node.op not in _COMPUTE or node.name in matched or _is_qdq(node):
            continue
        inputs = tuple(matched[n].name if n in matched else n for n in _inputs(node, _is_qdq))
        candidates = [c for c in by_inputs.get((_base(node.name), inputs), ()) if c.name not in taken]
        if candidates:
            matched[node.name] = candidates[0]
            taken.add(candidates[0].name)
    return matched


def output_quantizer(qat: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The one quantizer node that reads ``node`` (other readers, e.g. a ``.shape`` lookup, may exist)."""
    quantizers = [u for u in node.users if u.op == "call_module" and is_quantizer(qat.get_submodule(u.target))]
    return quantizers[0] if len(quantizers) == 1 else None
