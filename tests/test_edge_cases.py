"""Models users actually hand over: modules called twice, in-place ops, integer/bool inputs and
outputs, unused parameters. Each is handled (with INT8 parity) or refused clearly."""

import torch
import torch.nn as nn

import fxptqat as fq

from conftest import Twice, same_state, state_of


def _run(model, example, policy=None):
    before = state_of(model)
    qat = fq.prepare(model, example)
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
    assert parity.ok and parity.output_max_abs == 0.0, parity.table()
    assert qat.get_submodule("l_call1").weight is qat.get_submodule("l").weight


def test_selecting_one_call_of_a_tied_module_trains_both():
    torch.manual_seed(0)
    example = (torch.randn(16, 4),)
    qat = fq.prepare(Twice().eval(), example)
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
    assert parity.ok and parity.output_max_abs == 0.0
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
    assert parity.ok


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
    assert parity.ok
