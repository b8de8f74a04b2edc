import torch
import torch.nn as nn
from hypothesis import event, given, settings
from hypothesis import strategies as st
from torch.ao.nn.quantized.reference.modules.utils import ReferenceQuantizedModule

import fxptqat as fq
from fxptqat import meta
from fxptqat.lowering import convert
from fxptqat.passes.clamp_int_weights import clamp_int_weights
from fxptqat.testing import act_bits, weight_bits

from helpers import MODELS, converted, examples, int_weights


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


def _stored_weights(int8):
    """What the pass may rewrite: packed int8 weights, and reference modules' float weights."""
    return [
        m.weight.detach().clone() if isinstance(m, ReferenceQuantizedModule) else m.weight().int_repr()
        for m in int8.modules()
        if isinstance(m, ReferenceQuantizedModule)
        or (hasattr(m, "set_weight_bias") and callable(getattr(m, "weight", None)) and m.weight().is_quantized)
    ]


@settings(max_examples=examples(5), deadline=None)
@given(MODELS, weight_bits(), act_bits(), st.booleans())
def test_property_clamps_to_the_simulated_grid_and_second_run_is_a_noop(pair, wb, ab, push):
    model, (x,) = pair
    config = fq.QuantConfig(weight_bits=wb, act_bits=ab)
    _, int8 = converted(model, x, config, push_weights=push)
    qmin, qmax = config.weight_qrange
    stored = _stored_weights(int8)
    first = clamp_int_weights(int8, qmin=qmin, qmax=qmax)
    assert first.graph_module is int8
    # honest `modified`: True exactly when a weight changed; pushed weights always leave the grid
    changed = any(not torch.equal(a, b) for a, b in zip(stored, _stored_weights(int8), strict=True))
    assert first.modified is changed and (changed or not push)
    event(f"weights clamped: {changed}")
    int8.graph.lint()
    code, ints = int8.code, int_weights(int8)
    assert ints  # packed int8 weights, or what a weight-only graph's reference modules run
    assert all(int(w.min()) >= qmin and int(w.max()) <= qmax for w in ints)
    second = clamp_int_weights(int8, qmin=qmin, qmax=qmax)
    assert second.modified is False and int8.code == code
    assert all(torch.equal(a, b) for a, b in zip(ints, int_weights(int8), strict=True))
