import copy
import textwrap

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import fxptqat as fq
from fxptqat import meta
from fxptqat.api import trace
from fxptqat.fake_quantize import FakeQuantize
from fxptqat.passes.insert_fake_quant import insert_fake_quant
from fxptqat.testing import act_bits, weight_bits

from helpers import MODELS, TwoCats, examples, make_small_net, run_twice, same_state, state_of, weighted_nodes

EX = (torch.randn(2, 1, 6, 6),)

GOLDEN = """
def forward(self, x):
    activation_post_process_0 = self.activation_post_process_0(x);  x = None
    conv1 = self.conv1(activation_post_process_0);  activation_post_process_0 = None
    activation_post_process_1 = self.activation_post_process_1(conv1);  conv1 = None
    conv2 = self.conv2(activation_post_process_1)
    activation_post_process_2 = self.activation_post_process_2(conv2);  conv2 = None
    add = activation_post_process_2 + activation_post_process_1;  activation_post_process_2 = None
    activation_post_process_3 = self.activation_post_process_3(add);  add = None
    cat = torch.cat([activation_post_process_3, activation_post_process_1], 1);  activation_post_process_3 = activation_post_process_1 = None
    activation_post_process_4 = self.activation_post_process_4(cat);  cat = None
    flatten = torch.flatten(activation_post_process_4, 1);  activation_post_process_4 = None
    activation_post_process_5 = self.activation_post_process_4(flatten);  flatten = None
    fc = self.fc(activation_post_process_5);  activation_post_process_5 = None
    activation_post_process_6 = self.activation_post_process_6(fc);  fc = None
    return activation_post_process_6
"""


def _traced(config):
    return trace(make_small_net(), config)


def test_precondition_float_graph_has_no_fxptqat_meta():
    gm = _traced(fq.QuantConfig())
    assert meta.graph_info(gm) is None
    assert list(meta.quantized_nodes(gm)) == []


def test_run_modifies_in_place_and_lints():
    config = fq.QuantConfig(weight_bits=4)
    gm = _traced(config)
    result = insert_fake_quant(gm, config=config, example_inputs=EX)
    assert result.modified is True
    assert result.graph_module is gm
    gm.graph.lint()
    assert textwrap.dedent(gm.code).strip() == GOLDEN.strip()


def test_structure_and_metadata():
    config = fq.QuantConfig(weight_bits=4)
    gm = _traced(config)
    insert_fake_quant(gm, config=config, example_inputs=EX)
    infos = {n.name: i for n, i in meta.quantized_nodes(gm)}
    assert list(infos) == ["conv1", "conv2", "fc"]
    assert infos["conv1"].module_type == "ConvBnReLU2d"  # conv-bn-relu fused for QAT
    assert infos["conv1"].output_quantizer == "activation_post_process_1"
    assert infos["fc"].params == 8 * 6 * 6 * 5 + 5
    assert all(i.trainable is None and i.isolated is None for i in infos.values())
    g = meta.graph_info(gm)
    assert g.stage == meta.Stage.PREPARED and g.config == config
    # weights: fxptqat's FakeQuantize on the restricted 4-bit range, per channel
    wfq = gm.get_submodule("conv1").weight_fake_quant
    assert isinstance(wfq, FakeQuantize)
    assert (wfq.quant_min, wfq.quant_max) == (-7, 7)
    assert wfq.qscheme == torch.per_channel_symmetric
    act = gm.get_submodule("activation_post_process_1")
    assert isinstance(act, FakeQuantize) and (act.quant_min, act.quant_max) == (0, 255)


def test_second_run_is_a_no_op():
    config = fq.QuantConfig()
    gm = _traced(config)
    insert_fake_quant(gm, config=config, example_inputs=EX)
    code, state = gm.code, state_of(gm)
    again = insert_fake_quant(gm, config=config, example_inputs=EX)
    assert again.modified is False
    assert gm.code == code and same_state(gm, state)


def test_weight_only_inserts_no_activation_quantizers():
    config = fq.QuantConfig(weight_bits=4, act_bits=None)
    gm = _traced(config)
    insert_fake_quant(gm, config=config, example_inputs=EX)
    assert not any(
        isinstance(m, FakeQuantize) and m.dtype == torch.quint8 for m in gm.modules()
    )
    assert [n.name for n, _ in meta.quantized_nodes(gm)] == ["conv1", "conv2", "fc"]
    assert all(i.output_quantizer is None for _, i in meta.quantized_nodes(gm))


@pytest.mark.parametrize("per_channel", [True, False])
def test_numerics_fake_quant_disabled_equals_float_without_bn(per_channel):
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4)).eval()
    config = fq.QuantConfig(per_channel=per_channel)
    gm = trace(model, config)
    insert_fake_quant(gm, config=config, example_inputs=EX)
    for m in gm.modules():
        if isinstance(m, FakeQuantize):
            m.enable_observer(False)
            m.enable_fake_quant(False)
    x = torch.randn(4, 1, 6, 6)
    assert torch.equal(gm.eval()(x), model(x))


def test_per_tensor_weights():
    config = fq.QuantConfig(per_channel=False, weight_bits=3)
    gm = _traced(config)
    insert_fake_quant(gm, config=config, example_inputs=EX)
    wfq = gm.get_submodule("fc").weight_fake_quant
    assert wfq.qscheme == torch.per_tensor_symmetric and (wfq.quant_min, wfq.quant_max) == (-3, 3)


def test_every_cat_input_is_on_the_cats_output_grid():
    config = fq.QuantConfig()
    gm = trace(TwoCats().eval(), config)
    insert_fake_quant(gm, config=config, example_inputs=(torch.randn(1, 1, 4, 4),))
    gm.graph.lint()
    modules = dict(gm.named_modules(remove_duplicate=False))
    cats = [n for n in gm.graph.nodes if n.target is torch.cat]
    assert len(cats) == 2
    for cat in cats:
        out_q = modules[next(iter(cat.users)).target]
        assert all(modules[a.target] is out_q for a in cat.args[0]), cat.name
    # the first cat got one requantize: its input v1 is quantized on the second cat's grid
    assert len([n for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith("activation")]) == 7


@settings(max_examples=examples(8), deadline=None)
@given(MODELS, weight_bits(), act_bits(), st.sampled_from(["all", "weighted"]))
def test_property_lints_and_second_run_is_a_noop(pair, wb, ab, ops):
    model, inputs = pair
    config = fq.QuantConfig(weight_bits=wb, act_bits=ab, quantized_ops=ops)
    gm = trace(copy.deepcopy(model), config)
    run_twice(gm, lambda: insert_fake_quant(gm, config=config, example_inputs=inputs), modified=True)
    assert meta.graph_info(gm) is not None and weighted_nodes(gm)


class _DropoutHead(torch.nn.Module):
    """timm's MLP-Mixer / Swin head: norm -> mean over tokens -> Dropout -> Linear."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(6, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.head_drop = torch.nn.Dropout(0.1)
        self.head = torch.nn.Linear(8, 5)

    def forward(self, x):
        x = self.norm(self.proj(x)).mean(1)
        return self.head(self.head_drop(x))


def test_dropout_keeps_its_inputs_grid_as_the_int8_dropout_does():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 7, 6, generator=g) * 2,) for _ in range(3)]
    qat = fq.prepare(_DropoutHead().eval(), batches[0], config=fq.QuantConfig(weight_bits=7, act_bits=8))
    nodes = {n.name: n for n in qat.graph.nodes}
    drop = nodes["head_drop"]
    (out_q,) = drop.users
    assert out_q.target == drop.args[0].target  # the input's quantizer, not one of its own
    fq.calibrate(qat, batches)
    parity = fq.check_parity(qat, fq.lower(qat), batches)
    assert parity.ok and parity.coverage == 1.0, parity.table()
    assert "head_drop" in {r.name for r in parity.ops}  # the op itself was checked


class NormAfterNorm(nn.Module):
    """A LayerNorm reading a LayerNorm whose output a residual add also reads (timm's Swin: the
    patch embedding's norm, then the first block's norm1, once the stage's Identity is gone)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.n0, self.n1, self.fc2 = nn.Linear(4, 4), nn.LayerNorm(4), nn.LayerNorm(4), nn.Linear(4, 4)

    def forward(self, x):
        y = self.n0(self.fc(x))
        return y + self.fc2(self.n1(y))


def test_a_quantized_op_reads_the_quantized_copy_and_lowers():
    """prepare_qat_fx left n1 reading n0's float output while n0's output was quantized for the
    add: convert_fx handed n1 (float) n0's quint8 output and the INT8 model crashed."""
    torch.manual_seed(0)
    data = [(torch.randn(3, 4),), (torch.randn(5, 4),)]
    qat = fq.prepare(NormAfterNorm().eval(), data[0])
    n1 = next(n for n in qat.graph.nodes if n.name == "n1")
    assert n1.args[0].op == "call_module" and isinstance(qat.get_submodule(n1.args[0].target), FakeQuantize)
    assert n1.args[0].args[0].name == "n0"
    fq.calibrate(qat, data)
    parity = fq.check_parity(qat, fq.lower(qat), data)
    assert parity.ok and parity.coverage == 1.0, parity.table()


class CatOfInput(nn.Module):
    """The lowering property's seed-7 draw: the input feeds a conv and, requantized onto the cat's
    grid, a cat; the conv must keep reading the input's own quantizer, not the later requantize."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0, self.conv1 = nn.Conv2d(1, 1, 1, bias=False), nn.Conv2d(2, 1, 1, bias=False)

    def forward(self, x):
        return torch.cat([self.conv1(torch.cat([x, self.conv0(x)], 1)), x], 1)


def test_an_op_keeps_reading_its_input_quantizer_next_to_a_cat_requantize():
    torch.manual_seed(0)
    data = [(torch.randn(2, 1, 4, 4),), (torch.randn(3, 1, 4, 4),)]
    qat = fq.prepare(CatOfInput().eval(), data[0], config=fq.QuantConfig(weight_bits=2))
    qat.graph.lint()
    conv0 = next(n for n in qat.graph.nodes if n.name == "conv0")
    assert conv0.args[0].args[0].name == "x"
    fq.calibrate(qat, data)
    parity = fq.check_parity(qat, fq.lower(qat), data)
    assert parity.ok and parity.coverage == 1.0, parity.table()


class ScaledGate(nn.Module):
    """torchvision Swin V2's relative position bias: ``16 * sigmoid(b)``, then a scalar add on a
    value with an observed (not fixed) grid."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.b(x) + 16 * torch.sigmoid(self.a(x)) + (self.a(x) + 3.0)


def _quantizers(gm):
    return {n: m for n, m in gm.named_modules(remove_duplicate=False)
            if isinstance(m, torch.ao.quantization.FakeQuantizeBase) and "weight_fake_quant" not in n}


def test_scalar_ops_get_a_quantizer_of_their_own_and_no_torch_ao_quantizer_is_left():
    """torch.ao shares the sigmoid's fixed [0, 1) grid with ``16 * sigmoid``: fake-quant clamped the
    product to [0, 1) while the INT8 model kept [0, 16); the shared torch.ao module also survived
    under its second name (a Dynamo graph break)."""
    torch.manual_seed(0)
    data = [(torch.randn(64, 8) * 3,), (torch.randn(32, 8) * 3,)]
    model = ScaledGate().eval()
    qat = fq.prepare(model, data[0], config=fq.QuantConfig(weight_bits=8, act_bits=8))
    assert all(type(m) is FakeQuantize for m in _quantizers(qat).values())
    called = {str(n.target) for n in qat.graph.nodes if n.op == "call_module"}
    assert set(_quantizers(qat)) <= called  # no stale name of a quantizer that was replaced
    modules = dict(qat.named_modules(remove_duplicate=False))
    for node in qat.graph.nodes:
        if node.op == "call_function" and any(isinstance(a, (int, float)) for a in node.args):
            (out_q,) = node.users
            in_q = next(a for a in node.args if isinstance(a, torch.fx.Node))
            assert modules[out_q.target] is not modules[in_q.target], node.name
    fq.calibrate(qat, data)
    qat.eval()
    with torch.no_grad():
        gate = 16 * torch.sigmoid(model.a(data[0][0]))
        assert float(gate.max()) > 8  # the float product leaves sigmoid's [0, 1)
        torch.testing.assert_close(qat(*data[0]), model(*data[0]), atol=0.5, rtol=0.05)
    parity = fq.check_parity(qat, fq.lower(qat), data)
    assert parity.ok and parity.coverage == 1.0, parity.table()
    assert {"mul", "add_1"} <= {r.name for r in parity.ops}, parity.table()
    torch._dynamo.reset()
    assert torch._dynamo.explain(copy.deepcopy(qat).train())(*data[0]).graph_break_count == 0


class SigmoidOfFloat(nn.Module):
    """A sigmoid/tanh reading a value no quantized op produced (a graph input, a float op's output:
    torchvision Swin V2's relative position bias comes out of a wrapped function)."""

    def forward(self, x):
        return torch.sigmoid(x) + torch.tanh(x.mean(-1, keepdim=True))


def test_a_fixed_grid_op_reads_its_input_on_an_observed_grid():
    """torch.ao put sigmoid's [0, 1) grid on sigmoid's input too: sigmoid(clamp(x, 0, 1))."""
    torch.manual_seed(0)
    data = [(torch.randn(16, 8) * 3,), (torch.randn(16, 8) * 3,)]
    model = SigmoidOfFloat().eval()
    qat = fq.prepare(model, data[0], config=fq.QuantConfig(weight_bits=8, act_bits=8))
    assert all(type(m) is FakeQuantize for m in _quantizers(qat).values())
    fq.calibrate(qat, data)
    qat.eval()
    with torch.no_grad():
        torch.testing.assert_close(qat(*data[0]), model(*data[0]), atol=0.05, rtol=0)
    parity = fq.check_parity(qat, fq.lower(qat), data)
    assert parity.output_ok and not parity.diverging_ops and len(parity.ops) == 4, parity.table()


class SigmoidIntoCat(nn.Module):
    """A sigmoid concatenated with another value (the lowering property's seed-2 draw): torch.ao
    quantizes its output on the cat's grid, but ``torch.sigmoid`` of a quint8 tensor returns its
    fixed [0, 1) grid, which the cat then requantizes."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(29)
        self.conv0, self.conv1, self.conv2 = (nn.Conv2d(1, 1, 1, bias=False) for _ in range(3))
        with torch.no_grad():
            for conv in (self.conv0, self.conv1, self.conv2):
                conv.weight.uniform_(-1.7, 1.7, generator=g)
        self.relu0, self.sigmoid0 = nn.ReLU(), nn.Sigmoid()

    def forward(self, x):
        v = self.relu0(self.conv0(x) + x)
        return torch.cat([v, self.sigmoid0(self.conv2(self.conv1(v)))], 1)


def test_a_fixed_grid_op_read_on_another_grid_rounds_onto_its_own_first():
    x = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    data = [(x,), (torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(30)),)]
    qat = fq.prepare(SigmoidIntoCat().eval(), data[0], config=fq.QuantConfig(weight_bits=2))
    sigmoid = next(n for n in qat.graph.nodes if n.name == "sigmoid0")
    (first,) = sigmoid.users
    assert float(qat.get_submodule(first.target).scale) == 1 / 256  # the kernel's grid
    fq.calibrate(qat, data)
    parity = fq.check_parity(qat, fq.lower(qat), data)
    assert parity.ok and parity.coverage == 1.0 and not parity.diverging_ops, parity.table()
    assert "sigmoid0" in {r.name for r in parity.ops}, parity.table()


class SigmoidTanhCat(nn.Module):
    """``cat([sigmoid(a), tanh(b)])`` (a random draw of the README's test command): torch.ao shares
    the sigmoid's [0, 1) grid with the cat, and the tanh's [-1, 1) output went onto it unrounded."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.conv0, self.conv1, self.conv2 = (nn.Conv2d(1, 1, 1, bias=False) for _ in range(3))
        with torch.no_grad():
            for conv in (self.conv0, self.conv1, self.conv2):
                conv.weight.uniform_(-1.7, 1.7, generator=g)
        self.sigmoid0, self.tanh0 = nn.Sigmoid(), nn.Tanh()

    def forward(self, x):
        v = self.conv0(x)
        return torch.cat([self.sigmoid0(self.conv1(v)), self.tanh0(self.conv2(v))], 1)


def test_a_tanh_on_a_sigmoids_grid_rounds_onto_its_own_first():
    x = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    data = [(x,), (torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1)),)]
    qat = fq.prepare(SigmoidTanhCat().eval(), data[0], config=fq.QuantConfig(weight_bits=2))
    tanh = next(n for n in qat.graph.nodes if n.name == "tanh0")
    (first,) = tanh.users
    assert int(qat.get_submodule(first.target).zero_point) == 128  # tanh's [-1, 1) grid
    fq.calibrate(qat, data)
    parity = fq.check_parity(qat, fq.lower(qat), data)
    assert parity.ok and parity.coverage == 1.0 and not parity.diverging_ops, parity.table()
    assert "tanh0" in {r.name for r in parity.ops}, parity.table()
