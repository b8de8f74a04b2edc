"""fxptqat.graph_match: pairing lowered nodes with the fake-quant nodes they compute."""

import torch
import torch.fx as fx

from fxptqat.graph_match import match_nodes


def _graph(build) -> fx.GraphModule:
    graph = fx.Graph()
    build(graph)
    return fx.GraphModule(torch.nn.Module(), graph)


def test_a_reused_name_for_a_different_op_is_not_paired():
    # convert_fx renumbers nodes: EdgeNeXt's lowered `mul` was a scalar mul while the fake-quant
    # graph's `mul` multiplied two tensors; pairing them made parity report a false divergence
    def fake(g):
        x, y = g.placeholder("x"), g.placeholder("y")
        mul = g.call_function(torch.mul, (x, y))
        mul.name = "mul"
        scaled = g.call_function(torch.mul, (mul, 6.28))
        scaled.name = "mul_1"
        g.output(scaled)

    def lowered(g):
        x, y = g.placeholder("x"), g.placeholder("y")
        product = g.call_function(torch.mul, (x, y))
        product.name = "mul_3"
        scaled = g.call_function(torch.mul, (product, 6.28))
        scaled.name = "mul"
        g.output(scaled)

    qat, low = _graph(fake), _graph(lowered)
    matched = {k: v.name for k, v in match_nodes(qat, low).items()}
    assert matched.get("mul") != "mul"  # one value read vs two: not the same op
    assert matched.get("mul_3") == "mul"  # found by its inputs instead


def test_same_name_same_arity_is_paired():
    def build(g):
        x, y = g.placeholder("x"), g.placeholder("y")
        add = g.call_function(torch.add, (x, y))
        add.name = "add"
        g.output(add)

    assert {k: v.name for k, v in match_nodes(_graph(build), _graph(build)).items()} == {"add": "add"}
