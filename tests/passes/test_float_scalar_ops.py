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
    qat, x = _calibrated()
    int8 = convert(qat, meta.graph_info(qat).config)
    assert len(_scalar_ops(int8)) == 2
    before = fq.check_parity(qat, int8, [x])
    assert before.output_mean_abs > 0  # torch.ao's add_scalar rounds the constant to the input grid
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
