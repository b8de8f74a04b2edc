"""Models users actually hand over: modules called twice, in-place ops, integer/bool inputs and
outputs, unused parameters. Each is handled (with INT8 parity) or refused clearly."""

import math

import torch
import torch.nn as nn

import fxptqat as fq

from helpers import Twice, same_state, state_of

# 7-bit weights cannot saturate int16 pair sums, so no module is moved to QNNPACK (whose rounding
# ties differ) on CPUs without AVX-512 VNNI: the bit-exact checks below hold on every CPU.
EXACT = fq.QuantConfig(weight_bits=7)


def _run(model, example, policy=None):
    before = state_of(model)
    qat = fq.prepare(model, example, config=EXACT)
    fq.calibrate(qat, [example])
    report = fq.measure_error(qat, [example])
    selection = fq.select_trainable(qat, report, policy=policy or fq.AllLayers())
    int8 = fq.lower(qat)
    parity = fq.check_parity(qat, int8, [example])
    assert same_state(model, before)
    return qat, report, selection, int8, parity


def test_module_called_twice_gets_one_scale_per_call_and_tied_weights():
    torch.manual_seed(0)
    qat, report, _, int8, parity = _run(Twice().eval(), (torch.randn(16, 4),))
    assert [r.name for r in report] == ["l", "l_call1", "h"]
    assert parity.ok and parity.coverage == 1.0 and parity.output_max_abs == 0.0, parity.table()
    assert qat.get_submodule("l_call1").weight is qat.get_submodule("l").weight


def test_selecting_one_call_of_a_tied_module_trains_both():
    torch.manual_seed(0)
    example = (torch.randn(16, 4),)
    qat = fq.prepare(Twice().eval(), example, config=EXACT)
    fq.calibrate(qat, [example])
    selection = fq.apply_selection(qat, {"l"}, policy="one call")
    assert set(selection.trainable) == {"l", "l_call1"}
    assert selection.frozen == ("h",)
    assert qat.get_submodule("l").weight.requires_grad


class InPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.a(x)
        y += self.b(x)
        return self.relu(y)


def test_in_place_ops():
    torch.manual_seed(0)
    model = InPlace().eval()
    x = torch.randn(16, 4)
    qat, _, _, int8, parity = _run(model, (x,))
    assert parity.ok and parity.coverage == 1.0 and parity.output_max_abs == 0.0
    assert (int8(x) - model(x)).abs().max() < 0.05  # and it still computes the model


class IndicesAndMask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, idx, mask):
        return self.fc(self.emb(idx)) * mask.unsqueeze(-1), mask


def test_integer_and_bool_inputs_and_outputs():
    torch.manual_seed(0)
    idx = torch.randint(0, 10, (8, 3))
    mask = torch.rand(8, 3) > 0.3
    qat, report, _, int8, parity = _run(IndicesAndMask().eval(), (idx, mask))
    assert [r.name for r in report] == ["fc"]  # the embedding stays float
    out, mask_out = int8(idx, mask)
    assert mask_out.dtype == torch.bool and torch.equal(mask_out, mask)
    assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))
    assert parity.ok and parity.coverage == 1.0


class Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(4, 2)
        self.unused = nn.Linear(4, 4)

    def forward(self, x):
        return self.used(x)


def test_unused_parameters_are_not_carried():
    qat, report, selection, _, parity = _run(Unused().eval(), (torch.randn(4, 4),))
    assert [r.name for r in report] == ["used"]
    assert selection.total_params == 4 * 2 + 2
    assert parity.ok and parity.coverage == 1.0


class ZeroGamma(nn.Module):
    """Zero-init-residual style: the last BatchNorm of a block starts with gamma = 0 in one channel,
    and a pruned conv has an all-zero output channel."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.head = nn.Conv2d(4, 2, 1)
        with torch.no_grad():
            self.bn.weight[1] = 0.0
            self.head.weight[0] = 0.0

    def forward(self, x):
        return self.head(self.relu(self.bn(self.conv(x))))


def test_zero_gamma_and_zero_channels_quantize_exactly():
    torch.manual_seed(0)
    model = ZeroGamma().eval()
    batches = [(torch.randn(4, 3, 8, 8),) for _ in range(2)]
    qat = fq.prepare(model, batches[0])
    fq.calibrate(qat, batches)  # torch.ao's default conv-bn folding divides by gamma: NaN here
    report = fq.measure_error(qat, batches)
    assert report.rows and all(math.isfinite(r.isolated.mse) and math.isfinite(r.propagated.mse) for r in report.rows)
    with torch.no_grad():
        out = qat(batches[0][0])
        expected = model(batches[0][0])
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, 0], torch.full_like(out[:, 0], float(out[0, 0, 0, 0])))  # bias only
    assert (out - expected).abs().max() < 0.1
    qat.train()
    qat(batches[0][0]).sum().backward()  # the QAT forward in train mode is finite too
    grads = [p.grad for p in qat.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    qat.eval()
    int8 = fq.lower(qat)
    parity = fq.check_parity(qat, int8, batches)
    assert parity.ok and parity.coverage == 1.0, parity.table()
