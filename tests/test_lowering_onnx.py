"""lower(runtime="onnxruntime"): the fake-quant graph as an ONNX QDQ model run by onnxruntime."""

import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import event, given, settings
from hypothesis import strategies as st

import fxptqat as fq
from fxptqat.errors import ConfigError, LoweringError
from fxptqat.lowering_onnx import OnnxRuntimeModule, fold_weight_quantization
from fxptqat.testing import traceable_models, weight_bits

from conftest import same_state, state_of

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
from onnx import numpy_helper  # noqa: E402


def _calibrated(model, batches, **config):
    qat = fq.prepare(model, batches[0], config=fq.QuantConfig(**config))
    fq.calibrate(qat, batches)
    return qat


def _out_step(qat) -> float:
    out = next(n for n in qat.graph.nodes if n.op == "output").args[0]
    return float(qat.get_submodule(out.target).scale) if out.op == "call_module" else 0.0


def test_matches_fake_quant_node_by_node_and_at_the_output(small_net, small_batches):
    qat = _calibrated(small_net, small_batches)
    before = state_of(qat)
    lowered = fq.lower(qat, runtime="onnxruntime", example_inputs=small_batches[0], threads=1)
    assert isinstance(lowered, OnnxRuntimeModule)
    assert same_state(qat, before)  # lowering copies
    parity = fq.check_parity(qat, lowered, small_batches)
    assert parity.ok and parity.coverage == 1.0, parity.table()
    assert {r.name for r in parity.rows} == {n.name for n, _ in fq.meta.quantized_nodes(qat)}
    (x,) = small_batches[0]
    with torch.no_grad():
        diff = float((lowered(x) - qat.eval()(x)).abs().max())
    assert diff <= 3 * _out_step(qat) + 1e-6  # one-step ties add up over a few layers


def test_batch_dimension_stays_dynamic(small_net, small_batches):
    qat = _calibrated(small_net, small_batches)
    lowered = fq.lower(qat, runtime="onnxruntime", example_inputs=small_batches[0][0][:1])
    for batch in (1, 2, 13):
        x = torch.randn(batch, 1, 6, 6)
        assert lowered(x).shape == qat.eval()(x).shape


def test_weights_are_stored_as_restricted_int8():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(64 * 4 * 4, 64)).eval()
    batches = [(torch.randn(4, 3, 8, 8),) for _ in range(2)]
    qat = _calibrated(model, batches, weight_bits=4)
    with torch.no_grad():  # what fine-tuning does: weights past the frozen 4-bit scale
        for m in qat.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(3.0)
    lowered = fq.lower(qat, runtime="onnxruntime", example_inputs=batches[0])
    graph = onnx.load_from_string(lowered.model_bytes).graph
    weights = [numpy_helper.to_array(i) for i in graph.initializer if len(i.dims) >= 2]
    assert len(weights) == 3 and all(w.dtype.name == "int8" for w in weights)
    assert all(int(abs(w).max()) <= 7 for w in weights)  # clamped to what fake-quant simulated
    parity = fq.check_parity(qat, lowered, batches)
    assert parity.ok and parity.coverage == 1.0, parity.table()
    fp32 = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert lowered.size_bytes < 0.3 * fp32


def test_fold_is_idempotent(small_net, small_batches):
    from fxptqat.lowering import reference

    qat = _calibrated(small_net, small_batches)
    ref = reference(qat, fq.meta.graph_info(qat).config)
    model = torch.onnx.export(ref, small_batches[0], dynamo=True, optimize=True).model_proto
    assert fold_weight_quantization(model) > 0
    assert fold_weight_quantization(model) == 0


def test_copies_and_saves(small_net, small_batches, tmp_path):
    qat = _calibrated(small_net, small_batches)
    lowered = fq.lower(qat, runtime="onnxruntime", example_inputs=small_batches[0])
    (x,) = small_batches[0]
    twin = copy.deepcopy(lowered)
    assert torch.equal(twin(x), lowered(x))
    lowered.save(tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").read_bytes() == lowered.model_bytes
    onnx.checker.check_model(str(tmp_path / "m.onnx"))


def test_calls_go_straight_to_the_session_and_hooks_are_refused(small_net, small_batches):
    qat = _calibrated(small_net, small_batches)
    lowered = fq.lower(qat, runtime="onnxruntime", example_inputs=small_batches[0])
    (x,) = small_batches[0]
    assert torch.equal(lowered(x), lowered.forward(x))
    x.requires_grad_(True)
    assert not lowered(x).requires_grad  # tensors out, no autograd graph
    for register in (lowered.register_forward_hook, lowered.register_forward_pre_hook,
                     lowered.register_full_backward_hook):
        with pytest.raises(fq.LoweringError, match="runs no module hooks"):
            register(lambda *a: None)


def test_weight_only_graph(small_net, small_batches):
    qat = _calibrated(small_net, small_batches, act_bits=None)
    lowered = fq.lower(qat, runtime="onnxruntime", example_inputs=small_batches[0])
    parity = fq.check_parity(qat, lowered, small_batches)
    assert parity.ok and parity.coverage == 1.0, parity.table()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"runtime": "tensorrt"}, ConfigError, "runtime must be one of"),
        ({"runtime": "onnxruntime"}, LoweringError, "needs example_inputs"),
        ({"runtime": "onnxruntime", "example_inputs": "x"}, fq.FxptqatError, "tensor"),
        ({"runtime": "onnxruntime", "threads": 0}, ConfigError, "threads"),
        ({"runtime": "onnxruntime", "threads": True}, ConfigError, "threads"),
        ({"threads": 2}, ConfigError, "only applies to runtime='onnxruntime'"),
        ({"runtime": "inductor", "threads": 2}, ConfigError, "only applies to runtime='onnxruntime'"),
        ({"example_inputs": (torch.zeros(1),)}, ConfigError, "only apply to runtime='onnxruntime' or 'inductor'"),
        ({"runtime": "inductor"}, LoweringError, "needs example_inputs"),
    ],
)
def test_bad_arguments_raise_typed_errors_and_leave_the_graph(small_net, small_batches, kwargs, error, match):
    qat = _calibrated(small_net, small_batches)
    before, code = state_of(qat), qat.code
    with pytest.raises(error, match=match):
        fq.lower(qat, **kwargs)
    assert same_state(qat, before) and qat.code == code


def test_missing_onnxruntime_is_a_clear_error(small_net, small_batches, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ort(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)

    qat = _calibrated(small_net, small_batches)
    monkeypatch.setattr(builtins, "__import__", no_ort)
    with pytest.raises(LoweringError, match=r"pip install fxptqat\[onnx\]"):
        fq.lower(qat, runtime="onnxruntime", example_inputs=small_batches[0])


@settings(max_examples=6)
@given(traceable_models(max_layers=4), weight_bits(), st.sampled_from(["all", "weighted"]))
def test_property_onnxruntime_matches_fake_quant(pair, wb, ops):
    model, inputs = pair
    (x,) = inputs
    batches = [(x,), (x.flip(0) * 1.5,)]
    qat = _calibrated(model, batches, weight_bits=wb, quantized_ops=ops)
    lowered = fq.lower(qat, runtime="onnxruntime", example_inputs=inputs, threads=1)
    parity = fq.check_parity(qat, lowered, batches)
    # node by node on the exported reference graph; onnxruntime's own output departs from that
    # graph on some draws on CPUs without AVX-512 VNNI (open, tests/test_qconfig.py): reported
    event(f"onnxruntime output within its end-to-end bound: {parity.output_ok}")
    assert parity.rows and parity.first_divergence is None and not parity.diverging_ops, parity.table()
    assert parity.coverage == 1.0, parity.table()
