import torch
import torch.nn as nn
from hypothesis import event, given, settings

import fxptqat as fq
from fxptqat import meta
from fxptqat.passes.float_readers import float_readers
from fxptqat.testing import act_bits, weight_bits

from helpers import MODELS, examples, fake_quant_calls, inserted, node_named

WEIGHTED = fq.QuantConfig(quantized_ops="weighted")


class Residual(nn.Module):
    """proj -> fc (quantized: reads proj's quantizer) and a residual add of proj's output (float)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        y = self.proj(x)
        return self.fc(y) + y


class FlattenThenLinear(nn.Module):
    """A float flatten between the conv's output and the linear, plus a float add of the conv output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.conv2 = nn.Conv2d(2, 2, 1)
        self.fc = nn.Linear(18, 4)

    def forward(self, x):
        v = self.conv(x)
        return self.fc(torch.flatten(self.conv2(v) + v, 1))


class LinearReLUAdd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(8, 8)

    def forward(self, x):
        v = self.relu(self.fc(x))
        return self.fc2(v) + v


def _data(shape=(6, 8), n=2):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(*shape, generator=g),) for _ in range(n)]


def _inserted(model, shape=(6, 8)):
    torch.manual_seed(0)
    return inserted(model.eval(), _data(shape)[0], WEIGHTED)


def _reads(gm, name):
    return [a.name for a in node_named(gm, name).all_input_nodes]


def test_the_residual_add_reads_the_float_value_and_the_linear_its_quantized_copy():
    gm = _inserted(Residual())
    quantizer = {n.name: i.output_quantizer for n, i in meta.quantized_nodes(gm)}["proj"]
    add = next(n for n in gm.graph.nodes if n.op == "call_function" and "add" in n.name)
    assert quantizer in [a.name for a in add.all_input_nodes]  # torch.ao: every reader reads the quantizer
    result = float_readers(gm)
    gm.graph.lint()
    assert result.modified is True and result.graph_module is gm
    assert "proj" in [a.name for a in add.all_input_nodes] and quantizer not in [a.name for a in add.all_input_nodes]
    assert _reads(gm, "fc") == [quantizer]
    code = gm.code
    assert float_readers(gm).modified is False and gm.code == code


def test_a_float_op_on_the_way_to_a_quantized_op_keeps_the_quantized_value():
    gm = _inserted(FlattenThenLinear(), shape=(2, 2, 3, 3))
    float_readers(gm)
    gm.graph.lint()
    qconfigs = gm.meta["_observed_graph_module_attrs"].node_name_to_qconfig
    # every quantized op still reads a fake-quantized value: walk back through float ops
    for node in gm.graph.nodes:
        if node.op == "call_module" and qconfigs.get(node.name) is not None and hasattr(gm.get_submodule(node.target), "weight"):
            arg = node.args[0]
            while arg.op != "placeholder" and not (arg.op == "call_module" and "activation_post_process" in arg.target):
                assert qconfigs.get(arg.name) is None, (node, arg)
                arg = arg.args[0]
            assert arg.op != "placeholder", node


def test_an_activation_of_a_weighted_output_stays_quantized_for_inductor():
    """fc's fused ReLU output is read by fc2 and the add: the add keeps reading its quantized copy
    (inductor cannot fuse dq -> linear -> relu -> float add); fc2's output, read by the add only,
    goes float (as drop_output_quantizers would make it)."""
    gm = _inserted(LinearReLUAdd())
    relu_q = {n.name: i.output_quantizer for n, i in meta.quantized_nodes(gm)}["fc"]
    assert float_readers(gm).modified is True
    add = next(n for n in gm.graph.nodes if n.op == "call_function" and "add" in n.name)
    assert [a.name for a in add.all_input_nodes] == ["fc2", relu_q]
    assert {n.name: i.output_quantizer for n, i in meta.quantized_nodes(gm)}["fc2"] is None


def test_prepare_applies_it_to_the_weighted_recipe_and_onnxruntime_keeps_parity():
    data = _data()
    qat = fq.prepare(Residual(), data[0], config=WEIGHTED)
    fq.calibrate(qat, data)
    add = next(n for n in qat.graph.nodes if n.op == "call_function" and "add" in n.name)
    assert "proj" in [a.name for a in add.all_input_nodes]
    everything = fq.prepare(Residual(), data[0])
    add = next(n for n in everything.graph.nodes if n.op == "call_function" and "add" in n.name)
    assert "proj" not in [a.name for a in add.all_input_nodes]  # the default recipe quantizes the add
    parity = fq.check_parity(qat, fq.lower(qat, runtime="onnxruntime", example_inputs=data[0]), data)
    assert parity.ok and parity.coverage == 1.0, parity.table()
    # the fake-quant network now computes proj's float value into the add: outputs differ from
    # a graph where the add reads the quantized value by exactly that rounding
    with torch.no_grad():
        (x,) = data[0]
        y = qat.proj(qat.get_submodule("activation_post_process_0")(x))
        expected = qat.fc(qat.get_submodule(meta.node_info(node_named(qat, "proj")).output_quantizer_module)(y)) + y
        torch.testing.assert_close(qat(x), expected, rtol=0, atol=0)


@settings(max_examples=examples(5), deadline=None)
@given(MODELS, weight_bits(), act_bits().filter(lambda bits: bits is not None))
def test_property_only_quantized_ops_read_quantizers_unless_a_float_path_leads_to_one(pair, wb, ab):
    """Honest ``modified``, idempotent; afterwards a quantizer's reader is a quantized op, another
    quantizer, the start of a float path into a quantized op, or reads an activation of a weighted
    output; quantized ops read exactly what they read before; removed quantizers left no NodeInfo."""
    model, inputs = pair
    config = fq.QuantConfig(weight_bits=wb, act_bits=ab, quantized_ops="weighted")
    gm = inserted(model, inputs, config)
    qconfigs = gm.meta["_observed_graph_module_attrs"].node_name_to_qconfig
    quantized = {n.name for n in gm.graph.nodes if qconfigs.get(n.name) is not None}
    reads_before = {n: _reads(gm, n) for n in quantized}
    n_fq = len(fake_quant_calls(gm))
    result = float_readers(gm)
    gm.graph.lint()
    assert result.graph_module is gm
    assert {n: _reads(gm, n) for n in quantized} == reads_before
    calls = fake_quant_calls(gm)
    modules = {n.target for n in calls}
    for _, info in meta.quantized_nodes(gm):
        assert info.output_quantizer is None or info.output_quantizer in {n.name for n in calls}
    rewired = result.modified
    assert rewired or len(calls) == n_fq
    code = gm.code
    assert float_readers(gm).modified is False and gm.code == code
    assert all(hasattr(gm, t) for t in modules)
    event(f"float readers rewired: {rewired}")


class SqueezeExcite(nn.Module):
    """fc2 -> hardsigmoid -> mul (MobileNetV3's squeeze-excite): the activation reads fc2's float output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 8)
        self.gate = nn.Hardsigmoid()

    def forward(self, x):
        y = self.fc1(x)
        return self.gate(self.fc2(y)) * y


def test_an_activation_read_by_a_float_mul_reads_the_float_output_and_inductor_keeps_parity():
    data = _data()
    qat = fq.prepare(SqueezeExcite(), data[0], config=fq.QuantConfig(weight_bits=7, quantized_ops="weighted"))
    fq.calibrate(qat, data)
    assert _reads(qat, "gate") == ["fc2"]
    assert {n.name: i.output_quantizer for n, i in meta.quantized_nodes(qat)}["fc2"] is None
    torch._dynamo.reset()
    parity = fq.check_parity(qat, fq.lower(qat, runtime="inductor", example_inputs=data[0]), data)
    assert parity.ok and parity.coverage == 1.0, parity.table()


def _parity_on_reference_runtimes(qat, model_class, data):
    """check_parity on onnxruntime (``qat`` itself) and inductor (the same model prepared with
    7-bit activations: inductor's u8 x s8 kernels are exact on any CPU then)."""
    inductor = fq.prepare(model_class().eval(), data[0], config=fq.QuantConfig(quantized_ops="weighted", reduce_range=True))
    fq.calibrate(inductor, data)
    torch._dynamo.reset()
    for runtime, work in (("onnxruntime", qat), ("inductor", inductor)):
        parity = fq.check_parity(work, fq.lower(work, runtime=runtime, example_inputs=data[0]), data)
        assert parity.ok and parity.coverage == 1.0, (runtime, parity.table())


class ConvSqueezeExcite(nn.Module):
    """torchvision RegNetY's block: conv-bn-relu -> squeeze-excite (pool -> fc1 -> ReLU -> fc2 ->
    sigmoid) -> ``gate * x`` -> conv. torch.ao quantizes the pooling on its input's grid (one
    observer module, called twice) and fuses the ReLU into the conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(8, 4, 1)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(4, 8, 1)
        self.gate = nn.Sigmoid()
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.relu(self.bn(self.conv(x)))
        return self.out(y * self.gate(self.fc2(self.act(self.fc1(self.pool(y))))))


def test_squeeze_excite_mul_reads_the_float_conv_output_the_pooling_its_quantized_copy():
    """The mul reads the fused conv-bn-relu's float output (as X86InductorQuantizer leaves it); the
    pooling, whose output shares the quantizer's grid, keeps reading the quantized value; both
    reference-graph runtimes keep parity, and the fake-quant network is closer to the float one."""
    torch.manual_seed(0)
    data = _data((4, 3, 6, 6), n=3)
    qat = fq.prepare(ConvSqueezeExcite().eval(), data[0], config=WEIGHTED)
    fq.calibrate(qat, data)
    mul = next(n for n in qat.graph.nodes if n.op == "call_function" and "mul" in n.name)
    assert "conv" in [a.name for a in mul.all_input_nodes]
    pool_input = node_named(qat, "pool").args[0]
    assert pool_input.op == "call_module" and "activation_post_process" in pool_input.target
    assert pool_input.args[0].name == "conv"
    _parity_on_reference_runtimes(qat, ConvSqueezeExcite, data)


class TimmSqueezeExciteResidual(nn.Module):
    """timm's SE-ResNet block end: conv-bn -> squeeze-excite (``mean`` -> fc1 -> ReLU -> fc2 ->
    sigmoid) -> ``x * gate`` -> ``+ shortcut`` -> ReLU -> conv. The ReLU after the add has a
    qconfig (torch.ao fuses ReLUs under the weighted recipe) but reads a float add and is
    requantized by its own quantizer: it does not make the mul read a quantized value."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc1, self.act, self.fc2 = nn.Conv2d(4, 2, 1), nn.ReLU(), nn.Conv2d(2, 4, 1)
        self.relu, self.out = nn.ReLU(), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.bn(self.conv(x))
        gate = torch.sigmoid(self.fc2(self.act(self.fc1(y.mean((2, 3), keepdim=True)))))
        return self.out(self.relu(y * gate + x))


def test_squeeze_excite_before_a_residual_relu_reads_float_values():
    torch.manual_seed(0)
    data = _data((4, 4, 6, 6), n=3)
    qat = fq.prepare(TimmSqueezeExciteResidual().eval(), data[0], config=WEIGHTED)
    fq.calibrate(qat, data)
    mul = next(n for n in qat.graph.nodes if n.op == "call_function" and "mul" in n.name)
    add = next(n for n in qat.graph.nodes if n.op == "call_function" and "add" in n.name)
    sigmoid = next(n for n in qat.graph.nodes if n.op == "call_function" and "sigmoid" in n.name)
    assert "conv" in [a.name for a in mul.all_input_nodes]
    assert _reads(qat, "sigmoid") == ["fc2"] and sigmoid.args[0].name == "fc2"
    assert "x" in [a.name for a in add.all_input_nodes]
    assert {n.name: i.output_quantizer for n, i in meta.quantized_nodes(qat)}["fc2"] is None
    _parity_on_reference_runtimes(qat, TimmSqueezeExciteResidual, data)
