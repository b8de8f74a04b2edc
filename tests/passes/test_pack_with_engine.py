import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import event, given, settings
from hypothesis import strategies as st

import fxptqat as fq
from fxptqat import meta
from fxptqat.lowering import convert, exact_u8s8_kernels, quantized_engine, x86_routes_to_fbgemm
from fxptqat.passes import pack_with_engine as pass_module
from fxptqat.passes.clamp_int_weights import clamp_int_weights
from fxptqat.passes.drop_noop_clamps import drop_noop_clamps
from fxptqat.passes.pack_with_engine import engine_available, may_saturate, pack_with_engine, packed_with
from fxptqat.testing import act_bits, weight_bits

from helpers import MODELS, converted, examples

pytestmark = pytest.mark.skipif(
    not (engine_available("onednn") and engine_available("qnnpack")), reason="torch built without onednn/qnnpack"
)
# what lower() pins the depthwise conv to on this CPU (see passes/pack_with_engine.py)
LOWERED_ENGINE = "onednn" if exact_u8s8_kernels() else "qnnpack"


def pack_with_onednn(gm, *, select):
    return pack_with_engine(gm, engine="onednn", select=select)


def packed_with_onednn(module):
    return packed_with(module) == "onednn"

DEPTHWISE = "3"  # the 144-group conv of _model()


def _model():
    """Pointwise expand to 144 channels, then a depthwise 3x3 conv: x86 sends it to fbgemm."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 144, 1), nn.BatchNorm2d(144), nn.ReLU(),
        nn.Conv2d(144, 144, 3, padding=1, groups=144), nn.BatchNorm2d(144), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(144, 10),
    ).eval()


def _qat():
    model = _model()
    data = [(torch.randn(8, 3, 12, 12) * 3,) for _ in range(3)]
    qat = fq.prepare(model, data[0], config=fq.QuantConfig(weight_bits=8, act_bits=8, engine="x86"))
    fq.calibrate(qat, data)
    return qat, data


def _module(int8, name):
    return int8.get_submodule(name)


def test_only_the_wide_grouped_conv_is_routed_to_fbgemm():
    qat, _ = _qat()
    int8 = convert(qat, meta.graph_info(qat).config)
    routed = {name for name, m in int8.named_modules() if x86_routes_to_fbgemm(m)}
    assert routed == {DEPTHWISE}


def test_lower_pins_the_depthwise_conv_and_keeps_parity():
    qat, data = _qat()
    int8 = fq.lower(qat)
    assert packed_with(_module(int8, DEPTHWISE)) == LOWERED_ENGINE
    if exact_u8s8_kernels():
        assert packed_with(_module(int8, "0")) is None  # x86 already uses oneDNN there
    else:  # every 8-bit conv/linear can saturate on full-range activations without VNNI
        saturating = [m for m in int8.modules() if may_saturate(m)]
        assert saturating and all(packed_with(m) == "qnnpack" for m in saturating)
    parity = fq.check_parity(qat, int8, data)
    assert parity.ok and parity.coverage == 1.0, parity.table()


def test_pass_is_honest_and_idempotent():
    qat, data = _qat()
    int8 = convert(qat, meta.graph_info(qat).config)
    code = int8.code
    assert pack_with_onednn(int8, select=lambda m: False).modified is False
    first = pack_with_onednn(int8, select=x86_routes_to_fbgemm)
    assert first.modified is True and first.graph_module is int8
    int8.graph.lint()
    assert int8.code == code  # modules change class, the graph does not
    weight = _module(int8, DEPTHWISE).weight().int_repr().clone()
    assert pack_with_onednn(int8, select=x86_routes_to_fbgemm).modified is False
    assert torch.equal(weight, _module(int8, DEPTHWISE).weight().int_repr())


def test_pinning_survives_copy_and_state_dict_under_another_global_engine():
    qat, data = _qat()
    int8 = fq.lower(qat)
    depthwise = _module(int8, DEPTHWISE)
    q = torch.quantize_per_tensor(torch.rand(2, 144, 6, 6) * 4, 4 / 255, 0, torch.quint8)
    expected = depthwise(q).int_repr()
    engines = [e for e in ("qnnpack", "fbgemm") if e in torch.backends.quantized.supported_engines]
    for engine in engines:
        with quantized_engine(engine):
            copied = copy.deepcopy(int8)
            reloaded = fq.lower(qat)
            reloaded.load_state_dict(int8.state_dict())
            # (torch.ao's quantized modules do not survive pickling in torch 2.13, pinned or not)
            for other in (_module(copied, DEPTHWISE), _module(reloaded, DEPTHWISE)):
                assert packed_with(other) == LOWERED_ENGINE
                assert torch.equal(other(q).int_repr(), expected)  # run with `engine` global too


def test_fixes_what_fbgemm_gets_wrong():
    """The torch pitfall, measured on this CPU: fbgemm's depthwise kernel vs oneDNN's."""
    qat, data = _qat()
    config = meta.graph_info(qat).config
    with quantized_engine("x86"):
        plain = convert(qat, config)
    if not exact_u8s8_kernels():
        pytest.skip("without AVX-512 VNNI oneDNN saturates too: test_qnnpack_fixes_saturation_without_vnni")
    pinned = copy.deepcopy(plain)
    pack_with_onednn(pinned, select=x86_routes_to_fbgemm)
    plain_parity = fq.check_parity(qat, plain, data)
    pinned_parity = fq.check_parity(qat, pinned, data)
    assert pinned_parity.ok and pinned_parity.coverage == 1.0
    if plain_parity.ok:
        pytest.skip("this CPU's fbgemm depthwise kernel does not saturate on these inputs")
    assert plain_parity.first_divergence == next(n.name for n in plain.graph.nodes if n.target == DEPTHWISE)


def test_missing_engine_is_a_clear_error(monkeypatch):
    qat, _ = _qat()
    int8 = convert(qat, meta.graph_info(qat).config)
    monkeypatch.setattr(pass_module, "engine_available", lambda engine: False)
    with pytest.raises(RuntimeError, match="onednn"):
        pack_with_onednn(int8, select=x86_routes_to_fbgemm)
    with pytest.raises(ValueError, match="fbgemm"):
        pack_with_engine(int8, engine="fbgemm", select=x86_routes_to_fbgemm)


def test_may_saturate_follows_the_int16_bound():
    qat, _ = _qat()
    int8 = convert(qat, meta.graph_info(qat).config)
    conv = _module(int8, "0")
    assert int(conv.weight().int_repr().abs().max()) == 127  # symmetric 8-bit weights use the full range
    assert may_saturate(conv)  # 2 * 255 * 127 > 32767
    assert not may_saturate(conv, act_codes=127)  # reduce_range: 2 * 127 * 127 <= 32767
    assert not may_saturate(nn.ReLU())
    qat4 = fq.prepare(_model(), (torch.randn(2, 3, 12, 12),), config=fq.QuantConfig(weight_bits=4))
    fq.calibrate(qat4, [(torch.randn(4, 3, 12, 12),)])
    assert not any(may_saturate(m) for m in convert(qat4, meta.graph_info(qat4).config).modules())


def test_qnnpack_fixes_saturation_without_vnni():
    """The pitfall, measured on this CPU: with 8-bit weights fbgemm/x86 saturate unless the CPU has
    AVX-512 VNNI; qnnpack accumulates exactly everywhere."""
    qat, data = _qat()
    with quantized_engine("x86"):
        plain = convert(qat, meta.graph_info(qat).config)
    pinned = copy.deepcopy(plain)
    assert pack_with_engine(pinned, engine="qnnpack", select=may_saturate).modified
    pinned_parity = fq.check_parity(qat, pinned, data)
    assert pinned_parity.ok and pinned_parity.coverage == 1.0, pinned_parity.table()
    plain_parity = fq.check_parity(qat, plain, data)
    if exact_u8s8_kernels():
        assert plain_parity.first_divergence in (None, next(n.name for n in plain.graph.nodes if n.target == DEPTHWISE))
    else:
        assert not plain_parity.ok, "fbgemm without VNNI should saturate on these full-range inputs"



def _packed_int_weights(gm):
    return [
        m.weight().int_repr()
        for m in gm.modules()
        if hasattr(m, "set_weight_bias") and callable(getattr(m, "weight", None)) and m.weight().is_quantized
    ]


@settings(max_examples=examples(4), deadline=None)
@given(MODELS, weight_bits(), act_bits(), st.booleans(), st.sampled_from(("onednn", "qnnpack")), st.booleans())
def test_property_same_graph_and_integer_weights_and_second_run_is_a_noop(pair, wb, ab, push, engine, pin_all):
    """Repacking for another engine: same graph, same integer weights, honest ``modified`` (weight-only
    graphs have no packed weights: nothing to repack), then a no-op."""
    model, (x,) = pair
    config = fq.QuantConfig(weight_bits=wb, act_bits=ab)
    _, int8 = converted(model, x, config, push_weights=push)
    clamp_int_weights(int8, qmin=config.weight_qrange[0], qmax=config.weight_qrange[1])  # lower()'s order
    drop_noop_clamps(int8)
    code, ints = int8.code, _packed_int_weights(int8)
    assert bool(ints) is (ab is not None)
    event(f"packed weights: {bool(ints)}")
    first = pack_with_engine(int8, engine=engine, select=lambda m: pin_all)
    assert first.graph_module is int8 and first.modified is (pin_all and bool(ints))
    int8.graph.lint()
    assert int8.code == code
    assert all(torch.equal(a, b) for a, b in zip(ints, _packed_int_weights(int8), strict=True))
    assert pack_with_engine(int8, engine=engine, select=lambda m: True).modified is (not pin_all and bool(ints))
    assert pack_with_engine(int8, engine=engine, select=lambda m: True).modified is False
