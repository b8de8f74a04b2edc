import copy

import pytest
import torch
import torch.nn as nn

import fxptqat as fq
from fxptqat import meta
from fxptqat.lowering import convert, quantized_engine, x86_routes_to_fbgemm
from fxptqat.passes import pack_with_onednn as pass_module
from fxptqat.passes.pack_with_onednn import onednn_available, pack_with_onednn, packed_with_onednn

pytestmark = pytest.mark.skipif(not onednn_available(), reason="torch built without the onednn engine")

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
    assert packed_with_onednn(_module(int8, DEPTHWISE))
    assert not packed_with_onednn(_module(int8, "0"))  # x86 already uses oneDNN there
    parity = fq.check_parity(qat, int8, data)
    assert parity.ok, parity.table()


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
                assert packed_with_onednn(other)
                assert torch.equal(other(q).int_repr(), expected)  # run with `engine` global too


def test_fixes_what_fbgemm_gets_wrong():
    """The torch pitfall, measured on this CPU: fbgemm's depthwise kernel vs oneDNN's."""
    qat, data = _qat()
    config = meta.graph_info(qat).config
    with quantized_engine("x86"):
        plain = convert(qat, config)
    pinned = copy.deepcopy(plain)
    pack_with_onednn(pinned, select=x86_routes_to_fbgemm)
    plain_parity = fq.check_parity(qat, plain, data)
    assert fq.check_parity(qat, pinned, data).ok
    if plain_parity.ok:
        pytest.skip("this CPU's fbgemm depthwise kernel does not saturate on these inputs")
    assert plain_parity.first_divergence == next(n.name for n in plain.graph.nodes if n.target == DEPTHWISE)


def test_missing_engine_is_a_clear_error(monkeypatch):
    qat, _ = _qat()
    int8 = convert(qat, meta.graph_info(qat).config)
    monkeypatch.setattr(pass_module, "onednn_available", lambda: False)
    with pytest.raises(RuntimeError, match="onednn"):
        pack_with_onednn(int8, select=x86_routes_to_fbgemm)
