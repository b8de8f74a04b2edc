import platform

import pytest
import torch
import torch.nn as nn
from hypothesis import event, given, settings

import fxptqat as fq
from fxptqat import meta
from fxptqat.fake_quantize import FakeQuantize
from fxptqat.passes.drop_output_quantizers import drop_output_quantizers
from fxptqat.passes.insert_fake_quant import insert_fake_quant
from fxptqat.testing import act_bits, weight_bits

from helpers import MODELS, examples, fake_quant_calls, inserted, node_named

WEIGHTED = fq.QuantConfig(quantized_ops="weighted")


class Block(nn.Module):
    """fc1 -> GELU -> fc2 -> residual add -> head: fc1's and fc2's outputs are only read by float ops,
    ``proj`` feeds ``fc1`` directly (its output is fc1's input quantizer)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.fc1 = nn.Linear(8, 16)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(16, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        y = self.proj(x)
        return self.head(y + self.fc2(self.act(self.fc1(y))))


class ConvReLUAdd(nn.Module):
    """The conv's quantizer is read by a ReLU, which the weighted recipe quantizes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.relu = nn.ReLU()

    def forward(self, x):
        v = self.conv(x)
        return self.relu(v) + v


def _data(shape=(6, 8)):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(*shape, generator=g),) for _ in range(2)]


def _inserted(model, config=WEIGHTED, shape=(6, 8)):
    torch.manual_seed(0)
    gm = fq.api.trace(model.eval(), config)
    insert_fake_quant(gm, config=config, example_inputs=_data(shape)[0])
    return gm


def _out_q(gm):
    return {n.name: i.output_quantizer for n, i in meta.quantized_nodes(gm)}


def _fake_quant_calls(gm):
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), FakeQuantize)]


def test_drops_quantizers_only_float_ops_read_and_keeps_input_quantizers():
    gm = _inserted(Block())
    before = _out_q(gm)
    assert all(before.values())  # torch.ao quantizes every linear's output
    n_calls = len(_fake_quant_calls(gm))
    result = drop_output_quantizers(gm)
    assert result.modified is True and result.graph_module is gm
    gm.graph.lint()
    after = _out_q(gm)
    # proj's output is fc1's input: kept; fc1 (GELU reads it), fc2 (add) and head (graph output): float
    assert after == {"proj": before["proj"], "fc1": None, "fc2": None, "head": None}
    for name in ("fc1", "fc2", "head"):
        assert not hasattr(gm, before[name])  # the module is gone from the state dict too
    assert len(_fake_quant_calls(gm)) == n_calls - 3
    code = gm.code
    for line in ("fc1 = self.fc1(activation_post_process_1)", "act = self.act(fc1)",
                 "add = activation_post_process_1 + fc2", "head = self.head(activation_post_process_5)",
                 "return head"):
        assert line in code, code
    assert drop_output_quantizers(gm).modified is False and gm.code == code


def test_a_quantized_relu_reading_it_keeps_it():
    gm = _inserted(ConvReLUAdd(), shape=(2, 2, 3, 3))
    before = _out_q(gm)
    assert drop_output_quantizers(gm).modified is False
    assert _out_q(gm) == before


def test_prepare_applies_it_only_to_the_weighted_recipe():
    data = _data()
    weighted = fq.prepare(Block(), data[0], config=WEIGHTED)
    everything = fq.prepare(Block(), data[0])
    assert _out_q(weighted)["fc1"] is None
    assert all(_out_q(everything).values())
    weight_only = fq.prepare(Block(), data[0], config=fq.QuantConfig(quantized_ops="weighted", act_bits=None))
    assert not _fake_quant_calls(weight_only)


def test_fake_quant_reads_the_float_output():
    """With fc1's quantizer gone, GELU sees fc1's exact float output (no rounding to a grid)."""
    data = _data()
    qat = fq.prepare(Block(), data[0], config=WEIGHTED)
    fq.calibrate(qat, data)
    (x,) = data[0]
    seen = {}
    hook = qat.act.register_forward_hook(lambda m, args, out: seen.setdefault("in", args[0]))
    with torch.no_grad():
        qat(x)
        hook.remove()
        proj_q = qat.get_submodule(_out_q(qat)["proj"])
        expected = qat.fc1(proj_q(qat.proj(qat.get_submodule("activation_post_process_0")(x))))
    torch.testing.assert_close(seen["in"], expected, rtol=0, atol=0)


def test_torch_lowering_refuses_the_recipe_and_onnxruntime_keeps_parity():
    data = _data()
    qat = fq.prepare(Block(), data[0], config=WEIGHTED)
    fq.calibrate(qat, data)
    before = {k: v.clone() for k, v in qat.state_dict().items()}
    with pytest.raises(fq.LoweringError, match=r"runtime='torch'.*quantized_ops='weighted'.*runtime='inductor'"):
        fq.lower(qat)
    assert all(torch.equal(before[k], v) for k, v in qat.state_dict().items())
    parity = fq.check_parity(qat, fq.lower(qat, runtime="onnxruntime", example_inputs=data[0]), data)
    assert parity.ok and parity.coverage == 1.0, parity.table()
    assert {r.name for r in parity.rows if r.scale is None} == {"fc1", "fc2", "head"}
    everything = fq.prepare(Block(), data[0])
    fq.calibrate(everything, data)
    fq.lower(everything)  # the default recipe still lowers with torch.ao


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="oneDNN x86 fusions")
def test_inductor_fuses_gelu_and_add_into_the_int8_linears():
    """The point of the rule: ``dq -> linear -> gelu -> q`` and ``dq -> linear -> add`` become one
    oneDNN kernel each (inductor's unary/binary post-op fusions), as with PT2E."""
    from torch._dynamo.utils import counters

    data = _data((4, 8))
    counts = {}
    for ops in ("all", "weighted"):
        # 7-bit weights: oneDNN runs them exactly without AVX-512 VNNI too (lower() refuses 8 there)
        qat = fq.prepare(Block(), data[0], config=fq.QuantConfig(weight_bits=7, quantized_ops=ops))
        fq.calibrate(qat, data)
        counters.clear()
        torch._dynamo.reset()
        lowered = fq.lower(qat, runtime="inductor", example_inputs=data[0])
        counts[ops] = dict(counters["inductor"])
        parity = fq.check_parity(qat, lowered, data)
        assert parity.ok and parity.coverage == 1.0, parity.table()
    assert counts["weighted"].get("qlinear_binary_matcher_count", 0) > counts["all"].get(
        "qlinear_binary_matcher_count", 0), counts
    assert counts["weighted"].get("qlinear_unary_matcher_count", 0) >= 1, counts


class CatThenAdd(nn.Module):
    """Two outputs (fc0's is fc1's input; fc1's has a fused ReLU) are concatenated, and a float add
    reads the cat: torch.ao's convert_fx hands the add a quantized tensor when the cat reads
    quantized values."""

    def __init__(self) -> None:
        super().__init__()
        self.fc0 = nn.Linear(4, 4)
        self.fc1 = nn.Linear(4, 4)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(8, 8)

    def forward(self, x):
        v0 = self.fc0(x)
        v = torch.cat([v0, self.relu(self.fc1(v0))], 1)
        return self.fc2(v) + v


def test_reference_graph_lowerings_handle_a_float_read_quantized_cat():
    data = _data((6, 4))
    qat = fq.prepare(CatThenAdd(), data[0], config=WEIGHTED)
    fq.calibrate(qat, data)
    # fc1 reads fc0's quantizer; the cat (float) reads both float values, fc1's fused-ReLU output
    # included (float_readers), as X86InductorQuantizer leaves them
    assert _out_q(qat)["fc0"] is not None and _out_q(qat)["fc1"] is None
    cat = next(n for n in qat.graph.nodes if n.target is torch.cat)
    assert [a.name for a in cat.all_input_nodes] == ["fc0", "fc1"]
    for runtime in ("onnxruntime", "inductor"):
        work = qat
        if runtime == "inductor":  # 7-bit activations: inductor's u8 x s8 kernels on any CPU
            work = fq.prepare(CatThenAdd(), data[0], config=fq.QuantConfig(quantized_ops="weighted", reduce_range=True))
            fq.calibrate(work, data)
            torch._dynamo.reset()
        parity = fq.check_parity(work, fq.lower(work, runtime=runtime, example_inputs=data[0]), data)
        assert parity.ok and parity.coverage == 1.0, (runtime, parity.table())


@settings(max_examples=examples(5), deadline=None)
@given(MODELS, weight_bits(), act_bits().filter(lambda bits: bits is not None))
def test_property_drops_exactly_the_unread_output_quantizers(pair, wb, ab):
    """On the weighted recipe with quantized activations (the only one prepare() runs it on):
    honest ``modified`` (True exactly when output quantizers left the graph), each one dropped had
    no quantized reader and was its own module, and a second run is a no-op."""
    model, inputs = pair
    config = fq.QuantConfig(weight_bits=wb, act_bits=ab, quantized_ops="weighted")
    gm = inserted(model, inputs, config)
    quantized = {n for n, q in gm.meta["_observed_graph_module_attrs"].node_name_to_qconfig.items() if q}
    before = {n: i.output_quantizer for n, i in meta.quantized_nodes(gm)}
    assert before  # every drawn model has a conv or linear
    readers = {n: list(node_named(gm, q).users) for n, q in before.items() if q}
    n_fq = len(fake_quant_calls(gm))
    first = drop_output_quantizers(gm)
    gm.graph.lint()
    dropped = [n for n, i in meta.quantized_nodes(gm) if before[n] and i.output_quantizer is None]
    assert first.graph_module is gm and first.modified is bool(dropped)
    assert len(fake_quant_calls(gm)) == n_fq - len(dropped)
    for node in dropped:
        assert not any(u.name in quantized for u in readers[node] if u.op != "output")
        assert not hasattr(gm, before[node])  # its module left the state dict
        assert set(node.users) == set(readers[node])  # the readers now read the float value
    assert {i.output_quantizer for n, i in meta.quantized_nodes(gm) if n not in dropped} == {
        before[n] for n in before if n not in dropped}
    code = gm.code
    assert drop_output_quantizers(gm).modified is False and gm.code == code
    gm.graph.lint()
    event(f"output quantizers dropped: {bool(dropped)}")
