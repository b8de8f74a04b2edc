"""fxptqat.workarounds: reuse_torchlib_registry (one torchlib registry per process, the same ONNX model)."""

import contextlib

import pytest
import torch

import fxptqat as fq
from fxptqat import workarounds
from fxptqat.lowering import onnx as onnx_lowering

from helpers import make_small_net

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
_registration = pytest.importorskip("torch.onnx._internal.exporter._registration")


def test_registry_is_built_once_and_each_caller_gets_its_own_copy(monkeypatch):
    cls = _registration.ONNXRegistry
    original = cls.__dict__["from_torchlib"]
    builds = []
    real = original.__func__

    def counting(klass, *args, **kwargs):
        builds.append(args or kwargs)
        return real(klass, *args, **kwargs)

    monkeypatch.setattr(cls, "from_torchlib", classmethod(counting))
    monkeypatch.setattr(workarounds, "_REGISTRIES", {})
    with workarounds.reuse_torchlib_registry():
        a = cls().from_torchlib(opset_version=18)
        b = cls.from_torchlib(opset_version=18)
        assert len(builds) == 1 and a is not b
        assert a.functions.keys() == b.functions.keys() and a.opset_version == b.opset_version == 18
        key = next(iter(a.functions))
        a.functions[key].append("mine")
        assert "mine" not in b.functions[key] and "mine" not in cls.from_torchlib(opset_version=18).functions[key]
    assert cls.__dict__["from_torchlib"].__func__ is counting  # what was there before is back
    cls.from_torchlib(opset_version=18)
    assert len(builds) == 2  # outside the context: built again


def test_lowered_model_is_the_same_with_and_without_the_reused_registry(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(4, 1, 6, 6)
    qat = fq.prepare(make_small_net(), (x,), config=fq.QuantConfig(weight_bits=4, act_bits=8, quantized_ops="weighted"))
    fq.calibrate(qat, [(x,)])
    reused = fq.lower(qat, runtime="onnxruntime", example_inputs=(x,))
    again = fq.lower(qat, runtime="onnxruntime", example_inputs=(x,))
    monkeypatch.setattr(onnx_lowering, "reuse_torchlib_registry", contextlib.nullcontext)
    fresh = fq.lower(qat, runtime="onnxruntime", example_inputs=(x,))
    assert reused.model_bytes == again.model_bytes == fresh.model_bytes
    assert torch.equal(reused(x), fresh(x))


def test_threads_and_nested_use_leave_the_exporters_own_method_in_place():
    """A second thread waits for the first one's export; nesting in one thread patches once."""
    import threading

    cls = _registration.ONNXRegistry
    original = cls.__dict__["from_torchlib"].__func__
    inside, release = threading.Event(), threading.Event()
    seen = []

    def first():
        with workarounds.reuse_torchlib_registry():
            inside.set()
            release.wait(10)

    def second():
        inside.wait(10)
        with workarounds.reuse_torchlib_registry():
            seen.append(cls.__dict__["from_torchlib"].__func__)
            with workarounds.reuse_torchlib_registry():  # nested: the same patch
                assert cls.__dict__["from_torchlib"].__func__ is seen[0]

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    inside.wait(10)
    release.set()
    for t in threads:
        t.join(10)
    assert len(seen) == 1 and seen[0] is not original
    assert cls.__dict__["from_torchlib"].__func__ is original
