"""QuantConfig -> torch.ao QConfigMapping: which ops get quantizers."""

import pytest
import torch
import torch.nn as nn

import fxptqat as fq
from fxptqat.examples.models import SmallViT
from fxptqat.persistence import _config_from_dict, _config_to_dict

from helpers import make_small_net


def _vit():
    torch.manual_seed(0)
    return SmallViT(num_classes=10, image_size=16, patch_size=4, dim=16, depth=1, heads=2, mlp_ratio=2,
                    in_channels=1).eval()


def _data(shape):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(*shape, generator=g),) for _ in range(2)]


def _activation_quantizers(qat):
    return [n for n in qat.graph.nodes if n.op == "call_module"
            and isinstance(qat.get_submodule(n.target), fq.FakeQuantize)]


def _weighted(node, qat) -> bool:
    return node.op == "call_module" and hasattr(qat.get_submodule(node.target), "weight_fake_quant")


@pytest.mark.parametrize("build, shape", [(_vit, (4, 1, 16, 16)),
                                          (make_small_net, (4, 1, 6, 6))])
def test_weighted_recipe_quantizes_only_conv_and_linear_and_keeps_parity(build, shape):
    data = _data(shape)
    qats = {}
    for ops in ("all", "weighted"):
        qat = fq.prepare(build(), data[0], config=fq.QuantConfig(quantized_ops=ops))
        fq.calibrate(qat, data)
        # the weighted recipe is for the reference-graph runtimes (lower(runtime="torch") refuses it)
        int8 = fq.lower(qat) if ops == "all" else fq.lower(qat, runtime="onnxruntime", example_inputs=data[0])
        parity = fq.check_parity(qat, int8, data)
        assert parity.ok and parity.coverage == 1.0, parity.table()
        qats[ops] = qat
    weighted = qats["weighted"]
    activation_quantizers = _activation_quantizers(weighted)
    assert activation_quantizers
    for q in activation_quantizers:
        # at a weighted layer's output, or in front of weighted layers (or the graph output) only
        users = [u for u in q.users if u.op != "output"]
        assert _weighted(q.args[0], weighted) or all(_weighted(u, weighted) for u in users), q.name
        if _weighted(q.args[0], weighted):  # an output kept quantized: some quantized op reads it
            assert any(_weighted(u, weighted) or u.op == "call_module" for u in users), q.name
    # the same weighted nodes are measured and selectable under both recipes
    names = {ops: {n.name for n, _ in fq.meta.quantized_nodes(q)} for ops, q in qats.items()}
    assert names["all"] == names["weighted"]
    assert len(_activation_quantizers(qats["all"])) > len(_activation_quantizers(weighted))


def test_recipe_survives_the_saved_config():
    config = fq.QuantConfig(quantized_ops="weighted", weight_bits=4)
    assert _config_from_dict(_config_to_dict(config)) == config


class Upsample(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.up(self.conv(x)))


def test_transposed_convs_stay_float_so_int8_computes_what_was_simulated():
    """torch.ao has no QAT ConvTranspose: its weights were float in fake-quant, quantized by convert."""
    torch.manual_seed(0)
    data = _data((4, 3, 8, 8))
    qat = fq.prepare(Upsample().eval(), data[0])
    fq.calibrate(qat, data)
    int8 = fq.lower(qat)
    assert type(int8.get_submodule("up")) is nn.ConvTranspose2d
    parity = fq.check_parity(qat, int8, data)
    assert parity.ok and parity.coverage == 1.0, parity.table()
    assert {r.name for r in parity.rows} == {"conv", "head"}
