"""The pipeline on the structures the issue names: residual adds and concats, depthwise convs,
Linear heads, and a transformer block with explicit nn.Linear q/k/v (random weights, real shapes)."""

import pytest
import torch

import fxptqat as fq
from fxptqat import meta
from fxptqat.examples.models import ResidualCNN, SmallViT, TinyMLP


def _pipeline(model, x, config):
    batches = [(x[i : i + 8],) for i in range(0, len(x), 8)]
    qat = fq.prepare(model, x[:8], config=config)
    fq.calibrate(qat, batches)
    report = fq.measure_error(qat, batches)
    selection = fq.select_trainable(qat, report, policy=fq.Adaptive())
    int8 = fq.lower(qat)
    return qat, report, selection, int8, fq.check_parity(qat, int8, batches)


@pytest.mark.parametrize("act_bits", [8, None])
def test_small_vit_with_linear_attention(act_bits):
    torch.manual_seed(0)
    model = SmallViT().eval()
    x = torch.randn(16, 1, 28, 28)
    qat, report, selection, int8, parity = _pipeline(model, x, fq.QuantConfig(weight_bits=4, act_bits=act_bits))
    names = {r.source for r in report}
    # q, k, v and the output projection of every block are quantized Linear nodes
    for block in range(2):
        for proj in ("q", "k", "v", "out"):
            assert any(s.startswith(f"blocks.{block}.attn.{proj}") for s in names), (block, proj, names)
    assert parity.ok and parity.coverage == 1.0, parity.table()
    assert parity.top1_agreement >= 0.99
    assert selection.trainable_params < selection.total_params


def test_residual_cnn_depthwise_concat_and_head():
    torch.manual_seed(0)
    model = ResidualCNN().eval()
    x = torch.randn(16, 1, 28, 28)
    qat, report, _, int8, parity = _pipeline(model, x, fq.QuantConfig(weight_bits=4))
    types = {r.source: r.module_type for r in report}
    assert types["down1_dw.0"] == "ConvBnReLU2d"  # depthwise conv-bn-relu fused
    assert types["fc"] == "Linear"
    code = int8.code
    assert "torch.cat" in code and "quantized.add" in code  # the add and concat stay in INT8
    assert parity.ok and parity.coverage == 1.0, parity.table()


@pytest.mark.parametrize("engine", ["x86", "fbgemm", "qnnpack"])
def test_engines(engine):
    torch.manual_seed(0)
    model = TinyMLP().eval()
    x = torch.randn(32, 1, 8, 8)
    qat, _, _, int8, parity = _pipeline(model, x, fq.QuantConfig(weight_bits=6, engine=engine))
    assert meta.graph_info(qat).config.engine == engine
    assert parity.ok and parity.coverage == 1.0, parity.table()
