"""``QuantConfig(weight_range="full")``: the whole signed range, PT2E's grid, lowered exactly everywhere."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxptqat as fq
from fxptqat.lowering import exact_u8s8_kernels
from fxptqat.meta import graph_info

from helpers import same_state, state_of


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)).eval()


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 8, 8, generator=g),) for _ in range(3)]


def _weight_quantizers(qat):
    return {name: m for name, m in qat.named_modules() if name.endswith("weight_fake_quant")}


@pytest.mark.parametrize("bits", [8, 4])
def test_full_range_scale_is_max_over_half_the_codes(bits):
    batches = _batches()
    qat = fq.prepare(_model(), batches[0], config=fq.QuantConfig(weight_bits=bits, weight_range="full"))
    fq.calibrate(qat, batches)
    linear = qat.get_submodule("4")
    fq_w = linear.weight_fake_quant
    assert (fq_w.quant_min, fq_w.quant_max) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    amax = linear.weight.detach().abs().amax(dim=1)
    torch.testing.assert_close(fq_w.scale, amax / (2 ** (bits - 1) - 0.5))  # torchao PT2E's formula at 8 bits
    ints = torch.round(linear.weight.detach() / fq_w.scale[:, None])
    assert int(ints.min()) == -(2 ** (bits - 1)) or int(ints.max()) >= 2 ** (bits - 1)  # the extra code is used
    restricted = fq.prepare(_model(), batches[0], config=fq.QuantConfig(weight_bits=bits))
    fq.calibrate(restricted, batches)
    ratio = restricted.get_submodule("4").weight_fake_quant.scale / fq_w.scale
    torch.testing.assert_close(ratio, torch.full_like(ratio, (2 ** (bits - 1) - 0.5) / (2 ** (bits - 1) - 1)))


def _runtimes():
    yield "torch", {}
    yield "onnxruntime", {"threads": 1, "example_inputs": _batches()[0]}
    yield "inductor", {"example_inputs": _batches()[0]}


@pytest.mark.parametrize("runtime, options", list(_runtimes()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_runtime_lowers_the_full_range_exactly(runtime, options):
    batches = _batches()
    bits = 8 if runtime != "inductor" or exact_u8s8_kernels() else 7  # see test_lowering_inductor
    ops = "weighted" if runtime != "torch" else "all"
    qat = fq.prepare(_model(), batches[0], config=fq.QuantConfig(weight_bits=bits, weight_range="full",
                                                                  quantized_ops=ops))
    fq.calibrate(qat, batches)
    # push one weight of each layer onto the extra negative code: the lowering must keep it
    with torch.no_grad():
        for name, fq_w in _weight_quantizers(qat).items():
            layer = qat.get_submodule(name.rsplit(".", 1)[0])
            layer.weight[0].zero_()
            layer.weight[0, 0].fill_(float(fq_w.quant_min * fq_w.scale[0]))
    before = state_of(qat)
    if runtime == "inductor":
        torch._dynamo.reset()
    lowered = fq.lower(qat, runtime=runtime, **options)
    assert same_state(qat, before)
    parity = fq.check_parity(qat, lowered, batches)
    assert parity.ok and parity.coverage == 1.0, parity.table()
    if runtime == "torch":
        ints = [m.weight().int_repr() for m in lowered.modules() if callable(getattr(m, "weight", None))]
        assert ints and all(int(i.min()) == -(2 ** (bits - 1)) for i in ints)


def test_full_range_survives_save_and_load(tmp_path):
    batches = _batches()
    config = fq.QuantConfig(weight_bits=4, weight_range="full")
    qat = fq.prepare(_model(), batches[0], config=config)
    fq.calibrate(qat, batches)
    fq.save(qat, tmp_path / "q.pt")
    loaded = fq.load(_model(), batches[0], tmp_path / "q.pt")
    assert graph_info(loaded).config == config
    x = batches[0][0]
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), qat.eval()(x))


class _TieNet(nn.Module):  # the 2-bit draw of the lowering property that found the tie
    def __init__(self):
        super().__init__()
        self.fc0, self.fc1 = nn.Linear(7, 2, bias=False), nn.Linear(7, 2)
        self.fc2, self.fc3 = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        v = torch.cat([self.fc0(x), self.fc1(x)], 1)
        v = torch.relu(self.fc2(v)) + v
        return torch.relu(self.fc3(torch.nn.functional.relu6(v)))


def test_a_weight_on_a_rounding_tie_lowers_to_the_fake_quant_integer():
    # full range: a channel whose largest magnitude is negative has that weight at exactly
    # -(2**(b-1) - 0.5) steps; torch's fake-quant (x * 1/scale) and ONNX's QuantizeLinear (x / scale)
    # round it to different integers unless the lowering hands over the on-grid weight
    torch.manual_seed(2)
    model, x = _TieNet().eval(), torch.randn(2, 7)
    batches = [(x,), (x.flip(0) * 1.5,)]
    qat = fq.prepare(model, (x,), config=fq.QuantConfig(weight_bits=2, weight_range="full", quantized_ops="weighted"))
    fq.calibrate(qat, batches)
    ties = [float(((m.weight / m.weight_fake_quant.scale[:, None]) == -1.5).sum()) for m in
            (qat.fc0, qat.fc1, qat.fc2, qat.fc3)]
    assert sum(ties) > 0  # the case this test is about
    lowered = fq.lower(qat, runtime="onnxruntime", example_inputs=(x,), threads=1)
    parity = fq.check_parity(qat, lowered, batches)
    assert parity.ok and parity.coverage == 1.0, parity.table()
    for name in ("fc0", "fc1", "fc2", "fc3"):  # the reference graph holds the fake-quant weights themselves
        fq_weight = getattr(qat, name).weight_fake_quant(getattr(qat, name).weight).detach()
        assert torch.equal(lowered.reference.get_submodule(name).weight.detach(), fq_weight)
