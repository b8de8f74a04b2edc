import torch
import torch.fx as fx
import torch.nn as nn
from hypothesis import given, settings

import fxptqat as fq
from fxptqat.passes.fold_parameter_metadata import fold_parameter_metadata
from fxptqat.testing import traceable_models

from helpers import examples


class PositionalEncoding(nn.Module):
    """timm EdgeNeXt style: forward reads a parameter's device and dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(4, 8, 1)
        self.conv = nn.Conv2d(3, 8, 1)

    def forward(self, x):
        w = self.proj.weight
        pos = torch.ones_like(x[:, :1]).expand(-1, w.shape[1], -1, -1).to(device=w.device, dtype=w.dtype)
        return self.conv(x) + self.proj(pos)


def _reads(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is getattr]


def test_folds_device_dtype_and_shape_reads_into_constants():
    torch.manual_seed(0)
    model = PositionalEncoding().eval()
    x = torch.randn(2, 3, 5, 5)
    gm = fx.symbolic_trace(model)
    assert len(_reads(gm)) == 3
    result = fold_parameter_metadata(gm)
    assert result.modified is True and result.graph_module is gm
    gm.graph.lint()
    assert _reads(gm) == []
    assert "w.device" not in gm.code and "device(type='cpu')" in gm.code
    assert torch.equal(gm(x), model(x))
    code = gm.code
    assert fold_parameter_metadata(gm).modified is False and gm.code == code


def test_the_int8_model_runs_and_keeps_parity():
    """Without the pass the lowered model fails: a quantized conv's ``weight`` is a method."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 5)
    qat = fq.prepare(PositionalEncoding().eval(), (x,))
    fq.calibrate(qat, [x])
    parity = fq.check_parity(qat, fq.lower(qat), [x])
    assert parity.ok and parity.coverage == 1.0, parity.table()


@settings(max_examples=examples(25), deadline=None)
@given(traceable_models(max_layers=4))
def test_property_graphs_without_reads_are_left_alone(pair):
    model, inputs = pair
    gm = fx.symbolic_trace(model)
    code = gm.code
    assert fold_parameter_metadata(gm).modified is False
    assert gm.code == code
    with torch.no_grad():
        assert torch.equal(gm(*inputs), model(*inputs))
