"""Every public call's wrong inputs raise the right typed error with a helpful message, and leave
the user's model (and, where the call refuses to run, the prepared graph) bit-identical."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import fxptqat as fq

# -- models ---------------------------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 8)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x):
        hidden = self.fc1(x)
        return self.fc2(self.relu(hidden))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.relu(self.bn(self.conv(x))), 1))


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.fc(x))


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x, y):
        return self.fc(x + y)


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


X = _x(4, 16)
IMG = _x(2, 3, 6, 6)


def make_mlp() -> MLP:
    torch.manual_seed(0)
    return MLP().eval()


def make_convnet() -> ConvNet:
    torch.manual_seed(0)
    model = ConvNet()
    model.bn.running_mean.uniform_(-0.1, 0.1)  # non-default buffers: a reset would be noticed
    return model.eval()


@pytest.fixture
def mlp() -> MLP:
    return make_mlp()


@pytest.fixture
def prepared(mlp) -> fx.GraphModule:
    return fq.prepare(mlp, (X,))


@pytest.fixture
def calibrated(prepared) -> fx.GraphModule:
    fq.calibrate(prepared, [(X,), (_x(4, 16, seed=1),)])
    return prepared


# -- snapshots ------------------------------------------------------------------------------------------


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "training": [m.training for m in model.modules()],
        "meta": dict(getattr(model, "meta", {})),
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        now = after["state"][key]
        if value.is_floating_point() and value.isnan().any():  # NaN != NaN: compare exactly, NaN as equal
            same = now.shape == value.shape and torch.allclose(now, value, rtol=0, atol=0, equal_nan=True)
        else:
            same = torch.equal(now, value)
        assert same, f"{key} changed"
    assert after["grad"] == before["grad"]
    assert after["training"] == before["training"]
    assert after["meta"] == before["meta"]


def stage_of(qat: fx.GraphModule):
    return qat.meta["fxptqat"].stage


# -- hierarchy -----------------------------------------------------------------------------------------

SUBCLASSES = [fq.ConfigError, fq.InputError, fq.TraceError, fq.StageError, fq.CalibrationError,
              fq.SelectionError, fq.LoweringError]


@pytest.mark.parametrize("cls", SUBCLASSES)
def test_every_error_derives_from_fxptqat_error(cls):
    assert issubclass(cls, fq.FxptqatError)
    assert cls is not fq.FxptqatError
    assert cls.__name__ in fq.__all__


def test_fxptqat_error_is_an_exception_and_builtin_bases_are_kept():
    assert issubclass(fq.FxptqatError, Exception)
    assert issubclass(fq.ConfigError, ValueError)
    assert issubclass(fq.InputError, TypeError)
    public_errors = {name for name in fq.__all__ if name.endswith("Error")}
    assert public_errors == {c.__name__ for c in SUBCLASSES} | {"FxptqatError"}


# -- prepare -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("not_a_module", [lambda x: x, {"fc.weight": torch.ones(1)}, None, MLP])
def test_prepare_rejects_non_module(not_a_module):
    with pytest.raises(fq.InputError, match=r"model must be a torch\.nn\.Module"):
        fq.prepare(not_a_module, (X,))


def test_prepare_rejects_config_that_is_not_quant_config(mlp):
    before = snapshot(mlp)
    with pytest.raises(fq.ConfigError, match="QuantConfig"):
        fq.prepare(mlp, (X,), config={"weight_bits": 4})
    assert_unchanged(mlp, before)


@pytest.mark.parametrize("inputs", ["x", 5, None, {"x": X}, (X.numpy(),), (X, "mask")])
def test_prepare_rejects_example_inputs_of_wrong_type(mlp, inputs):
    before = snapshot(mlp)
    with pytest.raises(fq.InputError, match="example_inputs") as info:
        fq.prepare(mlp, inputs)
    assert "tensor" in str(info.value)
    assert_unchanged(mlp, before)


def test_prepare_accepts_a_single_tensor_or_a_list(mlp):
    before = snapshot(mlp)
    fq.prepare(mlp, X)
    fq.prepare(mlp, [X])
    assert_unchanged(mlp, before)


def test_prepare_wrong_shape_names_failing_node(mlp):
    before = snapshot(mlp)
    with pytest.raises(fq.InputError) as info:
        fq.prepare(mlp, (_x(4, 8),))  # fc1 expects 16 features
    first = str(info.value).splitlines()[0]
    assert "'fc1'" in first
    assert "'fc2'" not in first
    assert "shapes" in first and "example inputs" in first
    assert_unchanged(mlp, before)


def test_prepare_wrong_channels_names_conv_node():
    model = make_convnet()
    before = snapshot(model)
    with pytest.raises(fq.InputError, match="'conv'"):
        fq.prepare(model, (_x(2, 1, 6, 6),))
    assert_unchanged(model, before)


def test_prepare_wrong_shape_message_points_at_user_source(mlp):
    with pytest.raises(fq.InputError) as info:
        fq.prepare(mlp, (_x(4, 8),))
    first = str(info.value).splitlines()[0]
    assert "proxy.py" not in first
    assert "hidden = self.fc1(x)" in first


def test_prepare_untraceable_model_raises_trace_error_with_source_line_and_fix():
    model = Gated().eval()
    before = snapshot(model)
    with pytest.raises(fq.TraceError) as info:
        fq.prepare(model, (X,))
    msg = str(info.value)
    assert "leaf_modules" in msg
    assert "if x.sum() > 0:" in msg
    line = inspect.getsourcelines(Gate.forward)[1] + 1
    assert f"test_errors.py:{line}" in msg
    assert "Gated" in msg
    assert isinstance(info.value.__cause__, Exception)  # raised `from` the torch.fx error
    assert_unchanged(model, before)


def test_leaf_modules_fix_suggested_by_trace_error_works():
    model = Gated().eval()
    qat = fq.prepare(model, (X,), config=fq.QuantConfig(leaf_modules=(Gate,)))
    assert any(n.op == "call_module" and n.target == "gate" for n in qat.graph.nodes)
    fq.calibrate(qat, [X])
    assert [r.name for r in fq.measure_error(qat, [X])] == ["fc"]


def test_prepare_twice_raises_stage_error(prepared):
    before = snapshot(prepared)
    with pytest.raises(fq.StageError, match="already prepared"):
        fq.prepare(prepared, (X,))
    assert_unchanged(prepared, before)


def test_prepare_leaves_model_unchanged_on_success():
    model = make_convnet()
    before = snapshot(model)
    qat = fq.prepare(model, (IMG,), config=fq.QuantConfig(weight_bits=4))
    fq.calibrate(qat, [IMG])
    assert_unchanged(model, before)


# -- stage order ---------------------------------------------------------------------------------------

BEFORE_CALIBRATE = {
    "lower": lambda qat: fq.lower(qat),
    "measure_error": lambda qat: fq.measure_error(qat, [X]),
    "select_trainable": lambda qat: fq.select_trainable(qat, None),
    "finetune": lambda qat: fq.finetune(qat, [(X, torch.zeros(4, 4))], nn.functional.mse_loss, steps=1),
    "check_parity": lambda qat: fq.check_parity(qat, qat, [X]),
}


@pytest.mark.parametrize("call", sorted(BEFORE_CALIBRATE))
def test_calls_before_calibrate_raise_stage_error(prepared, call):
    before = snapshot(prepared)
    with pytest.raises(fq.StageError, match=r"call fxptqat\.calibrate\(\) first") as info:
        BEFORE_CALIBRATE[call](prepared)
    assert f"{call}()" in str(info.value)
    assert "prepared" in str(info.value)
    assert_unchanged(prepared, before)
    assert stage_of(prepared).name == "PREPARED"


def test_calibrate_twice_raises_stage_error(calibrated):
    before = snapshot(calibrated)
    with pytest.raises(fq.StageError, match="already calibrated") as info:
        fq.calibrate(calibrated, [_x(4, 16, seed=5) * 100])
    assert "prepare()" in str(info.value)
    assert_unchanged(calibrated, before)


PLAIN_CALLS = {
    "lower": lambda m: fq.lower(m),
    "calibrate": lambda m: fq.calibrate(m, [X]),
    "measure_error": lambda m: fq.measure_error(m, [X]),
    "select_trainable": lambda m: fq.select_trainable(m, None),
    "apply_selection": lambda m: fq.apply_selection(m, set(), policy="none"),
    "finetune": lambda m: fq.finetune(m, [(X, X)], nn.functional.mse_loss, steps=1),
    "check_parity": lambda m: fq.check_parity(m, m, [X]),
}


@pytest.mark.parametrize("traced", [False, True], ids=["module", "symbolic_trace"])
@pytest.mark.parametrize("call", sorted(PLAIN_CALLS))
def test_calls_on_a_plain_module_raise_stage_error(mlp, call, traced):
    model = fx.symbolic_trace(mlp) if traced else mlp
    before = snapshot(model)
    with pytest.raises(fq.StageError, match=r"fxptqat\.prepare\(\)") as info:
        PLAIN_CALLS[call](model)
    assert f"{call}()" in str(info.value)
    assert type(model).__name__ in str(info.value)
    assert_unchanged(model, before)


# -- calibrate ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batches", [[], (), iter([])], ids=["list", "tuple", "iterator"])
def test_calibrate_without_batches_raises_calibration_error(prepared, batches):
    with pytest.raises(fq.CalibrationError, match="empty"):
        fq.calibrate(prepared, batches)
    assert stage_of(prepared).name == "PREPARED"
    with pytest.raises(fq.StageError):
        fq.lower(prepared)  # still not calibrated


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", [0, 1])
def test_calibrate_non_finite_data_names_the_input(mlp, bad, where):
    before = snapshot(mlp)
    qat = fq.prepare(mlp, (X,))
    dirty = X.clone()
    dirty[1, 3] = bad
    batches = [(X,), (dirty,)] if where else [(dirty,)]
    with pytest.raises(fq.CalibrationError) as info:
        fq.calibrate(qat, batches)
    first = str(info.value).splitlines()[0]
    assert "node 'x'" in first
    assert "input batch" in first
    assert "NaN or Inf" in first and "nan_to_num" in first
    assert stage_of(qat).name == "PREPARED"
    assert_unchanged(mlp, before)


def test_calibrate_non_finite_from_the_graph_names_the_first_node(mlp):
    with torch.no_grad():
        mlp.fc1.weight[0, 0] = float("nan")
    before = snapshot(mlp)
    qat = fq.prepare(mlp, (X,))
    with pytest.raises(fq.CalibrationError) as info:
        fq.calibrate(qat, [X])
    first = str(info.value).splitlines()[0]
    assert "node 'fc1'" in first
    assert "from finite inputs" in first and "nan_to_num" not in first  # the data is not blamed
    assert_unchanged(mlp, before)


def test_calibrate_retry_after_failure_matches_fresh_calibration(mlp):
    dirty = torch.full((4, 16), float("nan"))
    qat = fq.prepare(mlp, (X,))
    with pytest.raises(fq.CalibrationError):
        fq.calibrate(qat, [X * 100, dirty])
    fq.calibrate(qat, [X])
    fresh = fq.prepare(mlp, (X,))
    fq.calibrate(fresh, [X])
    ours, theirs = qat.state_dict(), fresh.state_dict()  # graph ids differ by design; state must not
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("batches", [5, None, X, "batches", b"xy"], ids=["int", "none", "tensor", "str", "bytes"])
def test_calibrate_non_iterable_batches_raise_input_error(mlp, prepared, batches):
    before = snapshot(mlp)
    with pytest.raises(fq.InputError, match="iterable of batches") as info:
        fq.calibrate(prepared, batches)
    assert "[batch]" in str(info.value)
    assert type(batches).__name__ in str(info.value)
    assert stage_of(prepared).name == "PREPARED"
    assert_unchanged(mlp, before)


def test_calibrate_rejected_batches_leave_prepared_graph_unchanged(prepared):
    before = snapshot(prepared)
    with pytest.raises(fq.InputError):
        fq.calibrate(prepared, 5)
    assert_unchanged(prepared, before)


def test_calibrate_bad_batch_type_names_batch_index(prepared):
    with pytest.raises(fq.InputError, match=r"batch 1 must be a tensor or a tuple of tensors, got int"):
        fq.calibrate(prepared, [X, 3])
    assert stage_of(prepared).name == "PREPARED"


def test_calibrate_wrong_batch_shape_names_node(prepared):
    with pytest.raises(fq.InputError, match="'fc1'"):
        fq.calibrate(prepared, [X, _x(4, 8)])
    assert stage_of(prepared).name == "PREPARED"


def test_calibrate_too_few_items_for_model_inputs():
    qat = fq.prepare(TwoInputs().eval(), (X, X))
    with pytest.raises(fq.InputError, match=r"batch 0 has 1 item\(s\) but the model takes 2 input\(s\) \(x, y\)"):
        fq.calibrate(qat, [(X,)])
    assert fq.calibrate(qat, [(X, X, "label dropped")]) == 1


# -- measure_error ------------------------------------------------------------------------------------------


def test_measure_error_empty_and_non_finite(calibrated):
    with pytest.raises(fq.CalibrationError, match="empty"):
        fq.measure_error(calibrated, [])
    with pytest.raises(fq.CalibrationError, match="node 'x'"):
        fq.measure_error(calibrated, [torch.full((4, 16), float("nan"))])
    with pytest.raises(fq.InputError, match="iterable of batches"):
        fq.measure_error(calibrated, 3)
    assert stage_of(calibrated).name == "CALIBRATED"


# -- select_trainable ---------------------------------------------------------------------------------------


def test_select_trainable_with_report_of_another_graph(mlp, calibrated):
    other = fq.prepare(mlp, (X,))
    fq.calibrate(other, [X])
    foreign = fq.measure_error(other, [X])
    fq.measure_error(calibrated, [X])
    before = snapshot(calibrated)
    with pytest.raises(fq.SelectionError, match="another graph") as info:
        fq.select_trainable(calibrated, foreign)
    assert "measure_error()" in str(info.value)
    assert_unchanged(calibrated, before)
    # the same report works on the graph it was measured on
    assert set(fq.select_trainable(other, foreign, policy=fq.AllLayers()).trainable) == {"fc1", "fc2"}


def test_select_trainable_report_and_policy_types(calibrated):
    report = fq.measure_error(calibrated, [X])
    with pytest.raises(fq.SelectionError, match="must be an ErrorReport, got dict"):
        fq.select_trainable(calibrated, {"rows": []})
    with pytest.raises(fq.ConfigError, match="no choose"):
        fq.select_trainable(calibrated, report, policy="threshold")
    with pytest.raises(fq.ConfigError, match=r"the class Threshold, not a policy; call it"):
        fq.select_trainable(calibrated, report, policy=fq.Threshold)
    assert stage_of(calibrated).name == "MEASURED"


def test_report_json_garbage_is_input_error():
    with pytest.raises(fq.InputError):
        fq.ErrorReport.from_json("{")
    with pytest.raises(fq.InputError):
        fq.Selection.from_json("{")


# -- finetune ------------------------------------------------------------------------------------------------

LOADER = [(X, torch.zeros(4, 4))]


@pytest.mark.parametrize("steps", [0, -1, True, 2.5, "3", None])
def test_finetune_rejects_bad_steps(calibrated, steps):
    before = snapshot(calibrated)
    with pytest.raises(fq.ConfigError, match="steps must be a positive int"):
        fq.finetune(calibrated, LOADER, nn.functional.mse_loss, steps=steps)
    assert_unchanged(calibrated, before)


def test_finetune_rejects_bad_lr_and_optimizer(calibrated):
    fq.select_trainable(calibrated, fq.measure_error(calibrated, [X]), policy=fq.AllLayers())
    before = snapshot(calibrated)
    with pytest.raises(fq.ConfigError, match="lr must be finite"):
        fq.finetune(calibrated, LOADER, nn.functional.mse_loss, steps=1, lr=float("nan"))
    with pytest.raises(fq.ConfigError, match="lr must be >= 0"):
        fq.finetune(calibrated, LOADER, nn.functional.mse_loss, steps=1, lr=-1e-3)
    with pytest.raises(fq.ConfigError, match="optimizer='adm'"):
        fq.finetune(calibrated, LOADER, nn.functional.mse_loss, steps=1, optimizer="adm")
    assert_unchanged(calibrated, before)


def test_finetune_with_nothing_trainable_or_empty_loader(calibrated):
    fq.select_trainable(calibrated, fq.measure_error(calibrated, [X]), policy=fq.NoLayers())
    with pytest.raises(fq.SelectionError, match="no parameter requires grad"):
        fq.finetune(calibrated, LOADER, nn.functional.mse_loss, steps=1)
    fq.select_trainable(calibrated, fq.measure_error(calibrated, [X]), policy=fq.AllLayers())
    before = snapshot(calibrated)
    with pytest.raises(fq.InputError, match="yielded no batch"):
        fq.finetune(calibrated, [], nn.functional.mse_loss, steps=1, progress=False)
    assert_unchanged(calibrated, before)


# -- check_parity ----------------------------------------------------------------------------------------------


def test_check_parity_rejects_non_graph_int8_and_bad_tolerance(mlp, calibrated):
    with pytest.raises(fq.InputError, match=r"int8 must be what lower\(\) returned"):
        fq.check_parity(calibrated, mlp, [X])
    with pytest.raises(fq.ConfigError, match="tolerance_lsb"):
        fq.check_parity(calibrated, calibrated, [X], tolerance_lsb=-1.0)


def test_a_failure_on_well_shaped_inputs_keeps_its_type_and_gains_the_node(prepared, monkeypatch):
    # our own bug (here: a quantizer that raises) must not be reported as the user's bad input
    from fxptqat.fake_quantize import FakeQuantize

    def broken(self, x):
        raise ValueError("a bug inside a quantizer")

    monkeypatch.setattr(FakeQuantize, "forward", broken)
    with pytest.raises(ValueError, match="a bug inside a quantizer") as info:
        fq.calibrate(prepared, [X])
    assert not isinstance(info.value, fq.FxptqatError)
    assert any("fxptqat calibrate: raised at node" in note for note in info.value.__notes__)
    monkeypatch.undo()
    assert stage_of(prepared).name == "PREPARED"  # and the graph is as it was
    fq.calibrate(prepared, [X])
