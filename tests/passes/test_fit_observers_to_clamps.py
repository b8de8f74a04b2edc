import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import event, given, settings
from hypothesis import strategies as st

import fxptqat as fq
from fxptqat import meta
from fxptqat.fake_quantize import FakeQuantize
from fxptqat.passes.drop_output_quantizers import drop_output_quantizers
from fxptqat.passes.fit_observers_to_clamps import clamp_range, fit_observers_to_clamps
from fxptqat.testing import act_bits, weight_bits

from helpers import MODELS, examples, fake_quants, inserted


class ConvReLU6(nn.Module):
    def __init__(self, act) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.act = act
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.act(self.bn(self.conv(x))))


class Functional(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _data():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 3, 8, 8, generator=g) * 4,) for _ in range(2)]


def _prepared(act, config=None):
    torch.manual_seed(0)
    return fq.prepare(ConvReLU6(act).eval(), _data()[0], config=config)


def _conv_output_quantizer(qat) -> FakeQuantize:
    conv = next(n for n, _ in meta.quantized_nodes(qat) if n.target == "conv")
    return qat.get_submodule(meta.node_info(conv).output_quantizer)


ACTS = [
    (nn.ReLU6(), (0.0, 6.0)),
    (nn.Hardtanh(-1.0, 2.0), (-1.0, 2.0)),
    (Functional(F.relu6), (0.0, 6.0)),
    (Functional(lambda x: F.hardtanh(x, 0.0, 3.0)), (0.0, 3.0)),
    (Functional(lambda x: torch.clamp(x, 0.0, 4.0)), (0.0, 4.0)),
    (Functional(lambda x: x.clamp(min=-2.0, max=1.0)), (-2.0, 1.0)),
]


@pytest.mark.parametrize("act, bounds", ACTS, ids=lambda a: type(a).__name__ if isinstance(a, nn.Module) else "")
def test_prepare_fits_the_quantizer_in_front_of_a_clamp(act, bounds):
    qat = _prepared(act)
    fq_ = _conv_output_quantizer(qat)
    assert fq_.observe_range == bounds
    fq.calibrate(qat, _data())
    low, high = bounds
    grid_low = (fq_.quant_min - int(fq_.zero_point)) * float(fq_.scale)
    grid_high = (fq_.quant_max - int(fq_.zero_point)) * float(fq_.scale)
    assert min(low, 0.0) - 1e-6 <= grid_low and grid_high <= max(high, 0.0) + 1e-6


def test_relu6_grid_gets_zero_point_zero_and_smaller_error():
    fitted = _prepared(nn.ReLU6())
    plain = _prepared(nn.ReLU6())
    _conv_output_quantizer(plain).observe_range = None  # what torch.ao alone calibrates
    for qat in (fitted, plain):
        fq.calibrate(qat, _data())
    assert int(_conv_output_quantizer(fitted).zero_point) == 0
    assert int(_conv_output_quantizer(plain).zero_point) > 0  # conv outputs are signed: codes wasted
    assert float(_conv_output_quantizer(fitted).scale) < float(_conv_output_quantizer(plain).scale)
    err = {id(q): fq.measure_error(q, _data()).row("conv").isolated.mse for q in (fitted, plain)}
    assert err[id(fitted)] < err[id(plain)]


def test_the_network_computes_the_same_function_apart_from_the_grid():
    """Fake-quant off: the float model, up to BN-folding round-off (the pass changes what is observed)."""
    model = ConvReLU6(nn.ReLU6()).eval()
    qat = fq.prepare(model, _data()[0])
    fq.calibrate(qat, _data())
    for m in qat.modules():
        if isinstance(m, FakeQuantize):
            m.enable_fake_quant(False)
    (x,) = _data()[0]
    with torch.no_grad():
        torch.testing.assert_close(qat(x), model(x), rtol=1e-5, atol=1e-5)


def test_quantizer_with_another_consumer_is_left_alone():
    class Both(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.act = nn.ReLU6()

        def forward(self, x):
            y = self.conv(x)
            return torch.cat([self.act(y), y], dim=1)

    qat = fq.prepare(Both().eval(), _data()[0])
    quantizers = fake_quants(qat)
    assert quantizers and all(m.observe_range is None for m in quantizers)


def test_one_sided_clamp_is_not_a_range():
    gm = torch.fx.symbolic_trace(Functional(lambda x: torch.clamp(x, min=0.0)))
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    assert clamp_range(node, gm) is None


def test_pass_is_honest_and_idempotent():
    qat = _prepared(nn.ReLU6())
    code = qat.code
    assert fit_observers_to_clamps(qat).modified is False  # prepare() ran it
    _conv_output_quantizer(qat).observe_range = None
    first = fit_observers_to_clamps(qat)
    assert first.modified is True and first.graph_module is qat
    qat.graph.lint()
    assert qat.code == code
    assert fit_observers_to_clamps(qat).modified is False


def test_weight_only_graphs_have_nothing_to_fit():
    qat = _prepared(nn.ReLU6(), fq.QuantConfig(act_bits=None))
    assert fit_observers_to_clamps(qat).modified is False


@settings(max_examples=examples(6), deadline=None)
@given(MODELS, weight_bits(), act_bits(), st.sampled_from(["all", "weighted"]))
def test_property_fits_only_clamped_quantizers_and_second_run_is_a_noop(pair, wb, ab, ops):
    """Honest ``modified``: True exactly when some quantizer got a range (drawn ReLU6s); the graph's
    code does not change; a second run is a no-op."""
    model, inputs = pair
    config = fq.QuantConfig(weight_bits=wb, act_bits=ab, quantized_ops=ops)
    gm = inserted(model, inputs, config)
    if config.weighted_only:
        drop_output_quantizers(gm)  # what prepare() runs before this pass on that recipe
    code = gm.code
    fitted = fit_observers_to_clamps(gm)
    quantizers = fake_quants(gm)
    assert quantizers and fitted.graph_module is gm
    assert fitted.modified is any(m.observe_range is not None for m in quantizers)
    event(f"observers fitted to a clamp: {fitted.modified}")
    assert all(m.observe_range in (None, (0.0, 6.0)) for m in quantizers)
    assert gm.code == code and fit_observers_to_clamps(gm).modified is False
    gm.graph.lint()
