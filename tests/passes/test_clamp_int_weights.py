import torch
import torch.nn as nn

import fxptqat as fq
from fxptqat import meta
from fxptqat.lowering import convert
from fxptqat.passes.clamp_int_weights import clamp_int_weights


def _push_weights_out_of_range(qat):
    """What QAT does to a layer whose weights grow past the frozen 4-bit scale."""
    fc = qat.get_submodule("0")
    with torch.no_grad():
        fc.weight.mul_(3.0)


def _qat(act_bits=8):
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    torch.manual_seed(0)
    data = [(torch.randn(16, 8),) for _ in range(2)]
    qat = fq.prepare(model, data[0], config=fq.QuantConfig(weight_bits=4, act_bits=act_bits))
    fq.calibrate(qat, data)
    return qat, data


def _int_weights(int8, name):
    return int8.get_submodule(name).weight().int_repr()


def test_convert_alone_leaves_the_simulated_grid():
    qat, _ = _qat()
    _push_weights_out_of_range(qat)
    int8 = convert(qat, meta.graph_info(qat).config)
    assert int(_int_weights(int8, "0").abs().max()) > 7  # the torch.ao pitfall this pass fixes


def test_clamp_restores_the_grid_and_parity():
    qat, data = _qat()
    _push_weights_out_of_range(qat)
    int8 = convert(qat, meta.graph_info(qat).config)
    result = clamp_int_weights(int8, qmin=-7, qmax=7)
    assert result.modified is True and result.graph_module is int8
    int8.graph.lint()
    assert int(_int_weights(int8, "0").abs().max()) == 7
    parity = fq.check_parity(qat, int8, data)
    assert parity.ok and parity.coverage == 1.0, parity.table()


def test_second_run_and_in_range_models_are_no_ops():
    qat, _ = _qat()
    int8 = convert(qat, meta.graph_info(qat).config)
    before = _int_weights(int8, "0").clone()
    assert clamp_int_weights(int8, qmin=-7, qmax=7).modified is False
    assert torch.equal(before, _int_weights(int8, "0"))
    _push_weights_out_of_range(qat)
    int8 = convert(qat, meta.graph_info(qat).config)
    clamp_int_weights(int8, qmin=-7, qmax=7)
    code = int8.code
    assert clamp_int_weights(int8, qmin=-7, qmax=7).modified is False
    assert int8.code == code


def test_lower_applies_it():
    qat, data = _qat()
    _push_weights_out_of_range(qat)
    int8 = fq.lower(qat)
    assert int(_int_weights(int8, "0").abs().max()) == 7
    parity = fq.check_parity(qat, int8, data)
    assert parity.ok and parity.coverage == 1.0, parity.table()
