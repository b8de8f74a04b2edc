"""Pass: a value quantized only to be requantized is quantized once (``quantized_ops="weighted"``).

``insert_fake_quant`` routes a cat input that carries a quantizer of its own through the cat's
output quantizer (a requantize: INT8 cats need every input on the output's grid). When that
requantize is the only reader of the first quantizer (after ``float_readers`` has moved the float
readers off it), the value is rounded twice, ``q_cat(q_own(x))``, and the first grid serves
nothing. onnxruntime does not compute that: its ``DoubleQDQPairsRemover`` (basic optimization
level) folds ``Q -> DQ -> Q -> DQ`` with single consumers into one pair on the second grid, so the
lowered model rounds once, ``q_cat(x)``, and differs from fake-quant by up to a step of the cat's
grid (found by the lowering property, ``test_lowered_int8_matches_fake_quant[act8-weighted]``:
0.0139 at the output of a 5-linear graph; 0.0 with that optimizer disabled). X86InductorQuantizer
also quantizes such an input once, on the cat's shared grid. This pass makes the requantize read
the first quantizer's input and removes the first quantizer (its module too unless still called):
every runtime and fake-quant then round once. A weighted producer's ``NodeInfo.output_quantizer``
becomes the requantize, the quantizer its output now has.

Only for the weighted recipe (``fxptqat/capture/fx.py``): torch.ao's own INT8 lowering
(``runtime="torch"``) gives the producer its own output grid and requantizes, which is what
fake-quant simulates there. Runs on a prepared graph after ``float_readers``, before calibration;
``modified`` is False when no quantizer is read by another quantizer alone.
"""

from __future__ import annotations

from collections import Counter

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from fxptqat import meta
from fxptqat.passes.drop_output_quantizers import _is_quantizer

__all__ = ["collapse_requantize"]
REQUIRES = "qat"  # the graph it acts on (see passes/__init__.py)


def collapse_requantize(gm: fx.GraphModule, /) -> PassResult:
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    moved: dict[str, fx.Node] = {}
    for first in list(gm.graph.nodes):
        if not _is_quantizer(first, gm) or len(first.users) != 1 or not isinstance(first.args[0], fx.Node):
            continue
        (second,) = first.users
        if not _is_quantizer(second, gm) or second.target == first.target or second.args[0] is not first:
            continue
        second.replace_input_with(first, first.args[0])
        moved[first.name] = second
        gm.graph.erase_node(first)
        calls[first.target] -= 1
        if not calls[first.target]:
            gm.delete_submodule(first.target)
    for node, info in list(meta.quantized_nodes(gm)):
        if info.output_quantizer in moved:
            second = moved[info.output_quantizer]
            meta.update_node_info(node, output_quantizer=second.name, output_quantizer_module=second.target)
    if moved:
        gm.recompile()
    return PassResult(gm, bool(moved))
