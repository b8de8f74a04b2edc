"""lower(runtime="inductor"): the reference QDQ graph compiled by torch.compile with freezing."""

import io

import pytest
import torch
from hypothesis import given, settings

import fxptqat as fq
from fxptqat.lowering import exact_u8s8_kernels
from fxptqat.lowering.inductor import InductorModule
from fxptqat.testing import traceable_models, weight_bits

from helpers import examples, same_state, state_of

# Without AVX-512 VNNI oneDNN saturates 8-bit weights on full-range activations and lower() refuses
# them (test_refuses_saturating_weights_without_vnni); 7-bit weights run exactly everywhere.
WB = 8 if exact_u8s8_kernels() else 7


@pytest.fixture(scope="module")
def lowered_small_net():
    from helpers import make_small_net

    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 1, 6, 6, generator=g),) for _ in range(3)]
    qat = fq.prepare(make_small_net(), batches[0], config=fq.QuantConfig(weight_bits=WB))
    fq.calibrate(qat, batches)
    before = state_of(qat)
    freezing = torch._inductor.config.freezing
    lowered = fq.lower(qat, runtime="inductor", example_inputs=batches[0])
    assert torch._inductor.config.freezing == freezing  # set only around its own calls
    assert same_state(qat, before)
    return qat, lowered, batches


def test_matches_fake_quant_node_by_node_and_at_the_output(lowered_small_net):
    qat, lowered, batches = lowered_small_net
    assert isinstance(lowered, InductorModule)
    parity = fq.check_parity(qat, lowered, batches)
    assert parity.ok and parity.coverage == 1.0, parity.table()
    assert parity.top1_agreement == 1.0
    assert parity.output_max_abs <= 3 * _out_step(qat) + 1e-6  # one-step ties add up over a few layers


def _out_step(qat) -> float:
    out = next(n for n in qat.graph.nodes if n.op == "output").args[0]
    return float(qat.get_submodule(out.target).scale)


def test_other_batch_sizes(lowered_small_net):
    qat, lowered, _ = lowered_small_net
    x = torch.randn(3, 1, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(lowered(x), qat.eval()(x), atol=3 * _out_step(qat) + 1e-6, rtol=0)


def test_size_counts_weights_as_int8(lowered_small_net):
    _, lowered, _ = lowered_small_net
    ref = lowered.reference
    quantized = [m for m in ref.modules() if hasattr(m, "get_quantized_weight")]
    float_weight_bytes = sum(m.weight.numel() * 4 for m in quantized)
    buffer = io.BytesIO()
    torch.save(ref.state_dict(), buffer)
    # float weights replaced by int8 ones save 3 of every 4 bytes; the rest of the two files is the
    # same tensors, up to pickle framing: at least half the float weight bytes must be gone
    saved = buffer.tell() - lowered.size_bytes
    assert 0.5 * float_weight_bytes < saved <= 0.75 * float_weight_bytes + 1024


class _LinearReLUAdd(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)
        self.relu = torch.nn.ReLU()

    def forward(self, x):
        return self.relu(self.fc(x)) + x


def test_weighted_recipe_linear_relu_add_compiles():
    """Inductor (torch 2.13) cannot compile dq -> linear -> relu -> add with a float ReLU output (PT2E's
    own graph of it fails too): drop_output_quantizers keeps that output quantized."""
    torch.manual_seed(0)
    batches = [(torch.randn(4, 16),), (torch.randn(4, 16),)]
    qat = fq.prepare(_LinearReLUAdd().eval(), batches[0], config=fq.QuantConfig(weight_bits=WB, quantized_ops="weighted"))
    fq.calibrate(qat, batches)
    assert fq.meta.node_info(next(n for n, _ in fq.meta.quantized_nodes(qat))).output_quantizer is not None
    torch._dynamo.reset()
    lowered = fq.lower(qat, runtime="inductor", example_inputs=batches[0])
    parity = fq.check_parity(qat, lowered, batches)
    assert parity.ok and parity.coverage == 1.0, parity.table()


@settings(max_examples=examples(5), deadline=None)
@given(traceable_models(max_layers=4), weight_bits().map(lambda b: min(b, WB)))
def test_property_weighted_recipe_compiles_and_matches_fake_quant(pair, wb):
    """The weighted recipe is meant for this runtime: every drawn model compiles and keeps parity."""
    model, (x,) = pair
    batches = [(x,), (x.flip(0) * 1.5,)]
    qat = fq.prepare(model, (x,), config=fq.QuantConfig(weight_bits=wb, quantized_ops="weighted"))
    fq.calibrate(qat, batches)
    torch._dynamo.reset()
    lowered = fq.lower(qat, runtime="inductor", example_inputs=(x,))
    parity = fq.check_parity(qat, lowered, batches)
    assert parity.ok and parity.coverage == 1.0, parity.table()


def test_refuses_saturating_weights_without_vnni():
    from helpers import make_small_net

    batches = [(torch.randn(8, 1, 6, 6),)]
    qat = fq.prepare(make_small_net(), batches[0], config=fq.QuantConfig(weight_bits=8))
    fq.calibrate(qat, batches)
    if exact_u8s8_kernels():
        lowered = fq.lower(qat, runtime="inductor", example_inputs=batches[0])
        parity = fq.check_parity(qat, lowered, batches)
        assert parity.ok and parity.coverage == 1.0 and parity.coverage == 1.0, parity.table()
        return
    with pytest.raises(fq.LoweringError, match=r"no AVX-512 VNNI.*reduce_range=True\) or weight_bits<=7"):
        fq.lower(qat, runtime="inductor", example_inputs=batches[0])
    reduced = fq.prepare(make_small_net(), batches[0], config=fq.QuantConfig(weight_bits=8, reduce_range=True))
    fq.calibrate(reduced, batches)
    lowered = fq.lower(reduced, runtime="inductor", example_inputs=batches[0])
    parity = fq.check_parity(reduced, lowered, batches)
    assert parity.ok and parity.coverage == 1.0 and parity.coverage == 1.0, parity.table()
