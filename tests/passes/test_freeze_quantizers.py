import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxptqat as fq
from fxptqat.fake_quantize import FakeQuantize
from fxptqat.passes.freeze_quantizers import freeze_quantizers, observe_only
from fxptqat.testing import act_bits, weight_bits

from helpers import MODELS, examples, make_small_net, property_batches, run_twice


def _quantizers(gm):
    return [m for m in gm.modules() if isinstance(m, FakeQuantize)]


def test_observe_then_freeze():
    qat = fq.prepare(make_small_net(), torch.randn(2, 1, 6, 6))
    assert observe_only(qat).modified is True
    quantizers = _quantizers(qat)
    assert quantizers and all(q._observe and not q._fake_quant for q in quantizers)
    assert observe_only(qat).modified is False  # idempotent
    x = torch.randn(8, 1, 6, 6)
    with torch.no_grad():
        out_observing = qat(x)
    result = freeze_quantizers(qat)
    assert result.modified is True and result.graph_module is qat
    qat.graph.lint()
    assert all(q.frozen for q in _quantizers(qat))
    # the buffers torch.ao and DDP read agree with the Python flags
    assert all(int(q.observer_enabled[0]) == 0 and int(q.fake_quant_enabled[0]) == 1 for q in _quantizers(qat))
    scales = [q.scale.clone() for q in _quantizers(qat)]
    assert freeze_quantizers(qat).modified is False
    with torch.no_grad():
        qat(x * 3)  # a wider range must not move frozen qparams
    assert all(torch.equal(s, q.scale) for s, q in zip(scales, _quantizers(qat), strict=True))
    assert not torch.equal(out_observing, qat(x))  # fake-quant is on now


def test_frozen_scale_matches_observed_range():
    qat = fq.prepare(make_small_net(), torch.randn(2, 1, 6, 6))
    observe_only(qat)
    x = torch.randn(8, 1, 6, 6)
    with torch.no_grad():
        qat(x)
    freeze_quantizers(qat)
    first = qat.get_submodule("activation_post_process_0")  # quantizes the input itself
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    assert abs(float(first.scale) - (hi - lo) / 255) < 1e-6


RECIPES = st.sampled_from(["all", "weighted"])


@settings(max_examples=examples(4), deadline=None)
@given(MODELS, weight_bits(), act_bits(), RECIPES)
def test_property_observe_only_lints_and_second_run_is_a_noop(pair, wb, ab, ops):
    model, inputs = pair
    gm = fq.prepare(model, inputs, config=fq.QuantConfig(weight_bits=wb, act_bits=ab, quantized_ops=ops))
    run_twice(gm, lambda: observe_only(gm), modified=True)
    quantizers = _quantizers(gm)
    assert quantizers and all(q._observe and not q._fake_quant for q in quantizers)


@settings(max_examples=examples(4), deadline=None)
@given(MODELS, weight_bits(), act_bits(), RECIPES)
def test_property_freeze_lints_and_second_run_is_a_noop(pair, wb, ab, ops):
    """Calibration's last step: observe only, run the batches, then freeze every quantizer."""
    model, inputs = pair
    gm = fq.prepare(model, inputs, config=fq.QuantConfig(weight_bits=wb, act_bits=ab, quantized_ops=ops))
    observe_only(gm)
    gm.eval()
    with torch.no_grad():
        for args in property_batches(model, inputs[0]):
            gm(*args)
    run_twice(gm, lambda: freeze_quantizers(gm), modified=True)
    quantizers = _quantizers(gm)
    assert quantizers and all(q.frozen for q in quantizers)
