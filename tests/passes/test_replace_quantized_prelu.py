import torch
import torch.nn as nn
from torch.ao.nn.quantized import PReLU as QuantizedPReLU

import fxptqat as fq
from fxptqat import meta
from fxptqat.lowering import convert
from fxptqat.passes.replace_quantized_prelu import DequantizedPReLU, replace_quantized_prelu


def _qat():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.PReLU(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    with torch.no_grad():
        model[1].weight.uniform_(-0.5, 0.8)  # negative slopes too
    data = [(torch.randn(16, 1, 8, 8),) for _ in range(3)]
    # 7-bit weights: no kernel pinning on CPUs without AVX-512 VNNI, so the bit-exact checks below hold there
    qat = fq.prepare(model, data[0], config=fq.QuantConfig(weight_bits=7))
    fq.calibrate(qat, data)
    return qat, data


def _out_step(qat):
    return float(qat.get_submodule(meta.node_info(next(n for n in qat.graph.nodes if n.name == "_3"))
                                   .output_quantizer).scale)


def test_torch_ao_prelu_departs_from_what_qat_simulated():
    qat, data = _qat()
    int8 = convert(qat, meta.graph_info(qat).config)
    assert isinstance(int8.get_submodule("1"), QuantizedPReLU)
    (x,) = data[0]
    diff = float((int8(x) - qat(x)).abs().max())
    assert diff > 2 * _out_step(qat)  # the pitfall: far more than a rounding step


def test_replacement_restores_parity_and_is_idempotent():
    qat, data = _qat()
    int8 = convert(qat, meta.graph_info(qat).config)
    result = replace_quantized_prelu(int8, float_modules=dict(qat.named_modules()))
    assert result.modified is True and result.graph_module is int8
    int8.graph.lint()
    module = int8.get_submodule("1")
    assert isinstance(module, DequantizedPReLU)
    assert torch.equal(module.prelu.weight, qat.get_submodule("1").weight)  # the float slope, unquantized
    (x,) = data[0]
    assert torch.equal(int8(x), qat(x))
    code = int8.code
    assert replace_quantized_prelu(int8, float_modules=dict(qat.named_modules())).modified is False
    assert int8.code == code


def test_lower_applies_it():
    qat, data = _qat()
    int8 = fq.lower(qat)
    assert isinstance(int8.get_submodule("1"), DequantizedPReLU)
    assert fq.check_parity(qat, int8, data).output_max_abs == 0.0
