import torch
import torch.nn as nn
from hypothesis import event, given, settings
from torch.ao.nn.intrinsic import _FusedModule
from torch.ao.nn.quantized.reference.modules.utils import ReferenceQuantizedModule

import fxptqat as fq
from fxptqat import meta
from fxptqat.capture import quantized_weights
from fxptqat.lowering import convert
from fxptqat.lowering.reference import reference
from fxptqat.passes.snap_weights import snap_weights
from fxptqat.testing import weight_bits

from helpers import MODELS, examples, property_batches


class ConvBn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.bn(self.conv(x))), 1))


def _qat(config=None):
    torch.manual_seed(0)
    model = ConvBn().eval()
    with torch.no_grad():
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 2.0)
    data = [(torch.randn(4, 3, 6, 6),) for _ in range(2)]
    qat = fq.prepare(model, data[0], config=config or fq.QuantConfig(weight_bits=4))
    fq.calibrate(qat, data)
    return qat, data


def _dequantized(module):
    if isinstance(module, _FusedModule):
        module = module[0]
    if isinstance(module, ReferenceQuantizedModule):
        return module.get_weight()
    return module.weight().dequantize()


def test_a_weight_one_step_off_is_put_back_on_the_fake_quant_integer():
    qat, _ = _qat()
    weights = quantized_weights(qat)
    assert set(weights) == {"conv", "fc"}
    config = meta.graph_info(qat).config
    for lowered in (reference(qat, config), convert(qat, config)):
        conv = lowered.get_submodule("conv")
        assert torch.equal(_dequantized(conv), weights["conv"])  # lower() snapped already
        if isinstance(conv, ReferenceQuantizedModule):  # what a BatchNorm-folding tie does
            with torch.no_grad():
                conv.weight[0, 0, 0, 0] += conv.weight_scale[0]
        else:
            w = conv.weight()
            ints = w.int_repr().clone()
            ints[0, 0, 0, 0] -= 1
            conv.set_weight_bias(torch._make_per_channel_quantized_tensor(
                ints, w.q_per_channel_scales(), w.q_per_channel_zero_points(), w.q_per_channel_axis()), conv.bias())
        assert not torch.equal(_dequantized(conv), weights["conv"])
        result = snap_weights(lowered, weights=weights)
        assert result.modified is True and result.graph_module is lowered
        assert torch.equal(_dequantized(lowered.get_submodule("conv")), weights["conv"])
        assert snap_weights(lowered, weights=weights).modified is False


def test_unknown_targets_and_other_shapes_are_left_alone():
    qat, _ = _qat()
    ref = reference(qat, meta.graph_info(qat).config)
    assert snap_weights(ref, weights={"nope": torch.zeros(1), "fc": torch.zeros(2, 2)}).modified is False


@settings(max_examples=examples(10), deadline=None)
@given(MODELS, weight_bits())
def test_property_lowered_weights_are_the_fake_quant_weights(pair, wb):
    """On both lowerings (torch.ao's INT8 modules and the reference graph of onnxruntime/inductor),
    every weighted module holds exactly the fake-quant graph's weights."""
    model, (x,) = pair
    qat = fq.prepare(model, (x,), config=fq.QuantConfig(weight_bits=wb))
    fq.calibrate(qat, property_batches(model, x))
    weights = quantized_weights(qat)
    assert {n.target for n, _ in meta.quantized_nodes(qat)} >= set(weights) and weights
    config = meta.graph_info(qat).config
    checked = 0
    for lowered in (fq.lower(qat), reference(qat, config)):
        for target, weight in weights.items():
            module = lowered.get_submodule(target)
            torch.testing.assert_close(_dequantized(module), weight, rtol=0, atol=0, msg=target)
            checked += 1
    event(f"weights checked: {checked}")
