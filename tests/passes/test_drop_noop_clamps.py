import torch
import torch.nn as nn
from hypothesis import event, given, settings
from hypothesis import strategies as st
from test_fit_observers_to_clamps import ConvReLU6, _conv_output_quantizer, _data

import fxptqat as fq
from fxptqat import meta
from fxptqat.lowering import convert
from fxptqat.passes.clamp_int_weights import clamp_int_weights
from fxptqat.passes.drop_noop_clamps import drop_noop_clamps
from fxptqat.testing import act_bits, weight_bits

from helpers import MODELS, converted, examples, fake_quants


def _calibrated(fit: bool = True):
    torch.manual_seed(0)
    qat = fq.prepare(ConvReLU6(nn.ReLU6()).eval(), _data()[0])
    if not fit:
        _conv_output_quantizer(qat).observe_range = None
    fq.calibrate(qat, _data())
    return qat


def _relu6_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.ReLU6)]


def test_drops_relu6_whose_input_grid_lies_inside_and_keeps_outputs_bit_identical():
    qat = _calibrated()
    int8 = convert(qat, meta.graph_info(qat).config)
    (x,) = _data()[0]
    before = int8(x)
    assert len(_relu6_nodes(int8)) == 1
    result = drop_noop_clamps(int8)
    assert result.modified is True and result.graph_module is int8
    int8.graph.lint()
    assert not _relu6_nodes(int8) and not hasattr(int8, "act")
    assert torch.equal(int8(x), before)
    code = int8.code
    assert drop_noop_clamps(int8).modified is False and int8.code == code


def test_keeps_a_clamp_that_cuts_the_grid():
    qat = _calibrated(fit=False)  # torch.ao's own range: signed, beyond 6
    int8 = convert(qat, meta.graph_info(qat).config)
    assert drop_noop_clamps(int8).modified is False
    assert len(_relu6_nodes(int8)) == 1


def test_lower_applies_it_with_parity():
    qat = _calibrated()
    int8 = fq.lower(qat)
    assert not _relu6_nodes(int8)
    parity = fq.check_parity(qat, int8, _data())
    assert parity.ok and parity.coverage == 1.0, parity.table()


def test_other_unused_submodules_are_kept():
    qat = _calibrated()
    int8 = convert(qat, meta.graph_info(qat).config)
    int8.add_submodule("spare", nn.Linear(2, 2))  # not called by the graph: not this pass's business
    assert drop_noop_clamps(int8).modified is True
    assert isinstance(int8.get_submodule("spare"), nn.Linear)


@settings(max_examples=examples(4), deadline=None)
@given(MODELS, weight_bits(), act_bits(), st.booleans())
def test_property_same_outputs_bit_for_bit_and_second_run_is_a_noop(pair, wb, ab, push):
    """Only clamps that cannot change a value go, so outputs stay bit-identical; there are such
    clamps only where an observer was fitted to one (``fit_observers_to_clamps``)."""
    model, (x,) = pair
    config = fq.QuantConfig(weight_bits=wb, act_bits=ab)
    qat, int8 = converted(model, x, config, push_weights=push)
    clamp_int_weights(int8, qmin=config.weight_qrange[0], qmax=config.weight_qrange[1])  # as lower() does first
    fitted = any(q.observe_range is not None for q in fake_quants(qat))
    before = int8(x)
    dropped = drop_noop_clamps(int8)
    assert dropped.graph_module is int8 and (not dropped.modified or fitted)
    event(f"clamps dropped: {dropped.modified}")
    int8.graph.lint()
    assert torch.equal(int8(x), before)
    code = int8.code
    assert drop_noop_clamps(int8).modified is False and int8.code == code
