import copy

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import event, given, settings

import fxptqat as fq
from fxptqat.passes.batch_norm_modules import batch_norm_modules

from helpers import MODELS, examples


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d, reduced: a BatchNorm2d subclass that calls F.batch_norm itself."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.act = nn.ReLU()

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return self.act(x)


class Stem(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 4, 3, padding=1), BatchNormAct(4), nn.Conv2d(4, 2, 1)
        with torch.no_grad():
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)) + 1.0)


def _functional_bns(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.batch_norm]


def test_the_call_becomes_a_tied_batchnorm_module():
    model = Stem().eval()
    gm = fx.symbolic_trace(model)
    assert len(_functional_bns(gm)) == 1
    result = batch_norm_modules(gm)
    gm.graph.lint()
    assert result.modified is True and result.graph_module is gm
    assert _functional_bns(gm) == []
    bn = gm.get_submodule("bn_bn")
    assert type(bn) is nn.BatchNorm2d and bn.weight is model.bn.weight and bn.running_var is model.bn.running_var
    assert not any(n.op == "get_attr" for n in gm.graph.nodes)
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    code = gm.code
    assert batch_norm_modules(gm).modified is False and gm.code == code


def test_a_call_on_anything_but_a_conv_or_linear_output_or_foreign_tensors_is_left_alone():
    class Other(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.BatchNorm2d(3), nn.BatchNorm2d(3)

        def forward(self, x):
            y = F.batch_norm(x, self.a.running_mean, self.a.running_var, self.a.weight, self.a.bias, False, 0.1, 1e-5)
            return F.batch_norm(y, self.a.running_mean, self.b.running_var, self.a.weight, self.a.bias, False, 0.1, 1e-5)

    gm = fx.symbolic_trace(Other())
    assert batch_norm_modules(gm).modified is False and len(_functional_bns(gm)) == 2


def test_prepare_folds_it_into_the_conv_and_trains_its_statistics():
    torch.manual_seed(0)
    data = [(torch.randn(4, 3, 6, 6),) for _ in range(2)]
    model = Stem().eval()
    before = copy.deepcopy(model.state_dict())
    qat = fq.prepare(model, data[0])
    assert type(qat.get_submodule("conv")).__name__ == "ConvBnReLU2d"
    for name, t in model.state_dict().items():
        assert torch.equal(t, before[name]), name  # the user's model is untouched
    mean = qat.get_submodule("conv").bn.running_mean.clone()
    qat.train()(*data[0])  # QAT: the folded BN follows the training mode
    assert not torch.equal(qat.get_submodule("conv").bn.running_mean, mean)


def _to_functional(gm: fx.GraphModule) -> int:
    """Every BatchNorm2d module call becomes timm's functional form on get_attr tensors."""
    n = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), nn.BatchNorm2d):
            continue
        m = gm.get_submodule(node.target)
        with gm.graph.inserting_before(node):
            attrs = [gm.graph.get_attr(f"{node.target}.{a}") for a in ("running_mean", "running_var", "weight", "bias")]
            call = gm.graph.call_function(F.batch_norm, (node.args[0], attrs[0], attrs[1]),
                                          {"weight": attrs[2], "bias": attrs[3], "training": False,
                                           "momentum": m.momentum, "eps": m.eps})
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        n += 1
    gm.recompile()
    return n


@settings(max_examples=examples(25), deadline=None)
@given(MODELS)
def test_property_functional_batch_norms_become_modules_in_eval_and_train(pair):
    """Every drawn BatchNorm turned into timm's functional call comes back as a BatchNorm2d module
    on the same tensors: eval outputs bit for bit, train-mode outputs and running statistics as
    the original model's, idempotent, ``modified`` honest."""
    model, inputs = pair
    gm = fx.symbolic_trace(copy.deepcopy(model))
    assert batch_norm_modules(gm).modified is False
    n = _to_functional(gm)
    result = batch_norm_modules(gm)
    gm.graph.lint()
    assert result.modified is bool(n) and _functional_bns(gm) == []
    assert sum(isinstance(gm.get_submodule(m.target), nn.BatchNorm2d) for m in gm.graph.nodes if m.op == "call_module") == n
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), model(*inputs), rtol=0, atol=0)
        twin = copy.deepcopy(model)
        batch = torch.cat([inputs[0], inputs[0].flip(0) + 0.5])
        torch.testing.assert_close(gm.train()(batch), twin.train()(batch), rtol=0, atol=0)
        for name, b in twin.named_buffers():
            if "running" in name:
                torch.testing.assert_close(gm.get_buffer(name), b, rtol=0, atol=0)
    code = gm.code
    assert batch_norm_modules(gm).modified is False and gm.code == code
    event(f"functional batch norms: {min(n, 3)}")
