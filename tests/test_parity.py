"""check_parity: what it compares, what it lists as not compared, and what makes it fail."""

import copy

import torch
import torch.nn as nn

import fxptqat as fq
from fxptqat.parity import compare

from helpers import make_small_net


def _calibrated(model, shape=(8, 1, 6, 6), **config):
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(*shape, generator=g) * 2,) for _ in range(2)]
    qat = fq.prepare(model, batches[0], config=fq.QuantConfig(**config))
    fq.calibrate(qat, batches)
    return qat, batches


class Stem(nn.Module):
    """MobileNetV3's stem as torchvision writes it: conv -> BN -> Hardswish(inplace=True)."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.act = act
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.act(self.bn(self.conv(x))))


def test_in_place_activations_after_a_conv_are_compared_before_they_run():
    """The kept fake-quant value must not be the activation's in-place result (was 100+ steps)."""
    for act in (nn.Hardswish(inplace=True), nn.SiLU(inplace=True), nn.ReLU6(inplace=True)):
        torch.manual_seed(0)
        qat, batches = _calibrated(Stem(act).eval(), shape=(4, 3, 16, 16))
        parity = fq.check_parity(qat, fq.lower(qat), batches)
        assert parity.ok and parity.coverage == 1.0, parity.table()
        assert parity.rows[0].isolated_max_abs <= parity.rows[0].scale * 1.001


def test_nothing_compared_is_not_ok():
    qat, batches = _calibrated(nn.Sequential(nn.ReLU(), nn.Flatten()))
    parity = fq.check_parity(qat, fq.lower(qat), batches)
    assert parity.rows == () and parity.coverage == 0.0
    assert not parity.ok


def test_a_weighted_node_missing_from_the_lowered_graph_is_listed_with_its_reason():
    qat, batches = _calibrated(make_small_net())
    int8 = fq.lower(qat)
    (fc,) = [n for n in int8.graph.nodes if n.name == "fc"]
    fc.name = "renamed_fc"
    int8.recompile()
    parity = fq.check_parity(qat, int8, batches)
    assert [name for name, _ in parity.not_compared] == ["fc"]
    assert "no module call of this name" in parity.not_compared[0][1]
    assert parity.coverage == len(parity.rows) / (len(parity.rows) + 1) < 1.0
    assert "not compared" in parity.table()


def test_an_op_between_weighted_nodes_is_checked():
    """The residual add of SmallNet: make the INT8 add requantize onto a shifted grid."""
    qat, batches = _calibrated(make_small_net())
    int8 = fq.lower(qat)
    parity = fq.check_parity(qat, int8, batches)
    assert "add" in {r.name for r in parity.ops}  # lowered as torch.ops.quantized.add, renamed
    broken = copy.deepcopy(int8)
    (add,) = [n for n in broken.graph.nodes if n.target is torch.ops.quantized.add]
    zero_point = add.args[3]  # torch.ops.quantized.add(a, b, scale, zero_point): a get_attr
    setattr(broken, zero_point.target, getattr(broken, zero_point.target) + 20)
    broken.recompile()
    parity = fq.check_parity(qat, broken, batches)
    assert "add" in parity.diverging_ops and not parity.ok, parity.table()
    assert parity.first_divergence is None or parity.first_divergence != "conv1"


def test_a_runtime_is_judged_at_the_network_output():
    """A lowered model whose executor departs from its own graph fails even when every node agrees."""
    qat, batches = _calibrated(make_small_net())
    int8 = fq.lower(qat)
    with torch.no_grad():
        good = compare(qat, int8, batches, tolerance_lsb=1.0, run=lambda *a: int8(*a))
        step = good.output_scale
        bad = compare(qat, int8, batches, tolerance_lsb=1.0, run=lambda *a: int8(*a) + 3 * step)
    assert good.ok and good.coverage == 1.0 and good.output_ok and good.output_mean_abs <= good.output_tolerance
    assert bad.rows and all(r.ok for r in bad.rows) and not bad.output_ok and not bad.ok
    assert "DIVERGES" in bad.table()
