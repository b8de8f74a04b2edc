import copy

import torch
import torch.fx as fx
import torch.nn as nn
from hypothesis import event, given, settings
from hypothesis import strategies as st
from torch.ao.nn.intrinsic import qat as nniqat

import fxptqat as fq
from fxptqat import meta
from fxptqat.fake_quantize import FakeQuantize
from fxptqat.passes.drop_identities import drop_identities

from helpers import MODELS, examples


class TimmBasicBlock(nn.Module):
    """timm's ResNet BasicBlock with its unused options: conv -> bn -> drop_block (Identity) -> act ->
    aa (Identity) -> conv -> bn -> drop_path (Identity) + shortcut -> act."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.drop_block, self.act1, self.aa = nn.Identity(), nn.ReLU(), nn.Identity()
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.drop_path, self.act2 = nn.Identity(), nn.ReLU()

    def forward(self, x):
        y = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
        return self.act2(self.drop_path(self.bn2(self.conv2(y))) + x)


def _identity_calls(gm):
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Identity)]


def test_readers_read_the_identity_input():
    model = TimmBasicBlock().eval()
    gm = fx.symbolic_trace(model)
    assert len(_identity_calls(gm)) == 3
    x = torch.randn(2, 4, 5, 5)
    result = drop_identities(gm)
    gm.graph.lint()
    assert result.modified is True and result.graph_module is gm
    assert _identity_calls(gm) == []
    assert isinstance(gm.get_submodule("aa"), nn.Identity)  # the hierarchy is left as it was
    relu = next(n for n in gm.graph.nodes if n.target == "act1")
    assert relu.args[0].target == "bn1"
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    code = gm.code
    assert drop_identities(gm).modified is False and gm.code == code


def test_an_identity_called_otherwise_is_left_alone():
    class KeywordCall(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.id = nn.Identity()

        def forward(self, x):
            return self.id(input=x) + 1

    gm = fx.symbolic_trace(KeywordCall())
    assert drop_identities(gm).modified is False and len(_identity_calls(gm)) == 1


def test_prepare_fuses_conv_bn_relu_across_timm_identities():
    """Without the pass torch.ao could not fuse conv1-bn1-act1, and fake-quantized the conv output
    before the ReLU (negative half of the grid wasted) and again after it."""
    torch.manual_seed(0)
    data = [(torch.randn(2, 4, 5, 5),) for _ in range(2)]
    model = TimmBasicBlock().eval()
    reference = copy.deepcopy(model)
    for ops in ("all", "weighted"):
        qat = fq.prepare(model, data[0], config=fq.QuantConfig(quantized_ops=ops))
        assert isinstance(qat.get_submodule("conv1"), nniqat.ConvBnReLU2d), ops
        quantizers = {n.args[0].name for n in qat.graph.nodes
                      if n.op == "call_module" and isinstance(qat.get_submodule(n.target), FakeQuantize)}
        assert "conv1" in quantizers and "act1" not in quantizers and "drop_block" not in quantizers, ops
        assert [n.name for n, _ in meta.quantized_nodes(qat)] == ["conv1", "conv2"]
    for name, p in model.state_dict().items():  # the user's model is untouched
        assert torch.equal(p, reference.state_dict()[name]), name
    assert len(_identity_calls(fx.symbolic_trace(model))) == 3


@settings(max_examples=examples(25), deadline=None)
@given(MODELS, st.data())
def test_property_identities_anywhere_leave_and_nothing_else_changes(pair, data):
    """Identities inserted after any drawn set of values: the pass removes exactly those calls,
    the graph computes the same outputs bit for bit, a second run is a no-op, and on a graph
    without identities ``modified`` is False."""
    model, inputs = pair
    gm = fx.symbolic_trace(model)
    assert drop_identities(gm).modified is False
    values = [n for n in gm.graph.nodes if n.op in ("placeholder", "call_module", "call_function", "call_method")]
    chosen = data.draw(st.lists(st.sampled_from(values), unique=True, max_size=len(values)), label="after")
    for i, node in enumerate(chosen):
        gm.add_submodule(f"identity{i}", nn.Identity())
        with gm.graph.inserting_after(node):
            call = gm.graph.call_module(f"identity{i}", (node,))
        node.replace_all_uses_with(call, delete_user_cb=lambda user, call=call: user is not call)
    gm.recompile()
    gm.graph.lint()
    n_nodes = len(gm.graph.nodes)
    with torch.no_grad():
        expected = model(*inputs)
        result = drop_identities(gm)
        gm.graph.lint()
        assert result.modified is bool(chosen)
        assert _identity_calls(gm) == [] and len(gm.graph.nodes) == n_nodes - len(chosen)
        torch.testing.assert_close(gm(*inputs), expected, rtol=0, atol=0)
    code = gm.code
    assert drop_identities(gm).modified is False and gm.code == code
    event(f"identities inserted: {min(len(chosen), 3)}+")
