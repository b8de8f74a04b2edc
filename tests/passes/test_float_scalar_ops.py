import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import fxptqat as fq
from fxptqat import meta
from fxptqat.lowering import convert
from fxptqat.lowering.torch import output_grids
from fxptqat.passes.float_scalar_ops import float_scalar_ops

from helpers import examples


class Scaled(nn.Module):
    def __init__(self, c_mul: float, c_add: float) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 4)
        self.c_mul, self.c_add = c_mul, c_add

    def forward(self, x):
        return self.b(self.a(x) * self.c_mul + self.c_add)


def _calibrated(c_mul=0.37, c_add=0.5):
    torch.manual_seed(0)
    x = torch.randn(32, 8)
    # 7-bit weights: convert() alone (no kernel pinning) is exact on CPUs without AVX-512 VNNI too
    qat = fq.prepare(Scaled(c_mul, c_add).eval(), (x,), config=fq.QuantConfig(weight_bits=7))
    fq.calibrate(qat, [x])
    return qat, x


def _scalar_ops(gm):
    return [n for n in gm.graph.nodes if n.target in (torch.ops.quantized.add, torch.ops.quantized.mul)]


def test_scalar_ops_run_in_float_onto_the_fake_quant_grid():
    # a constant that moves the sum past the product's range: torch.ao's add_scalar then rescales
    # its grid instead of rounding onto the sum's own quantizer
    qat, x = _calibrated(0.37, 5.0)
    int8 = convert(qat, meta.graph_info(qat).config)
    assert len(_scalar_ops(int8)) == 2
    before = fq.check_parity(qat, int8, [x])
    assert before.output_mean_abs > 0
    result = float_scalar_ops(int8, grids=output_grids(qat, int8))
    assert result.modified is True and result.graph_module is int8
    int8.graph.lint()
    assert _scalar_ops(int8) == []
    after = fq.check_parity(qat, int8, [x])
    assert after.ok and after.coverage == 1.0, after.table()
    assert after.output_max_abs == 0.0 < before.output_max_abs, (before.table(), after.table())
    code = int8.code
    assert float_scalar_ops(int8, grids=output_grids(qat, int8)).modified is False and int8.code == code


def test_an_op_without_a_grid_is_left_alone():
    qat, _ = _calibrated()
    int8 = convert(qat, meta.graph_info(qat).config)
    assert float_scalar_ops(int8, grids={}).modified is False
    assert len(_scalar_ops(int8)) == 2


@settings(max_examples=examples(20), deadline=None)
@given(st.floats(-4, 4).filter(lambda c: abs(c) > 1e-3), st.floats(-4, 4))
def test_property_lowered_scalar_ops_equal_fake_quant(c_mul, c_add):
    qat, x = _calibrated(c_mul, c_add)
    parity = fq.check_parity(qat, fq.lower(qat), [x])
    assert parity.ok and parity.coverage == 1.0, parity.table()
    assert {"mul", "add"} <= {r.name for r in parity.ops}


class ScaledFirst(nn.Module):
    """The number on the left: ``c * x`` and ``c + x`` (torchvision Swin V2's ``16 * sigmoid(b)``)."""

    def forward(self, x):
        return 0.5 + 2.5 * torch.sigmoid(x)


def test_a_number_on_the_left_runs_in_float_too():
    torch.manual_seed(0)
    x = torch.randn(32, 8) * 3
    qat = fq.prepare(ScaledFirst().eval(), (x,), config=fq.QuantConfig(weight_bits=7))
    fq.calibrate(qat, [x])
    int8 = convert(qat, meta.graph_info(qat).config)
    assert len(_scalar_ops(int8)) == 2
    result = float_scalar_ops(int8, grids=output_grids(qat, int8))
    assert result.modified is True and _scalar_ops(int8) == []
    int8.graph.lint()
    after = fq.check_parity(qat, int8, [x])
    assert after.output_max_abs == 0.0, after.table()
    with torch.no_grad():
        assert float(int8(x).max()) > 2.5  # 0.5 + 2.5 * sigmoid leaves sigmoid's [0, 1)
