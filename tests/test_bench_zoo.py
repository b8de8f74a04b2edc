"""A small run of ``benchmarks/zoo.py``: record fields, parity reports that say what they compared,
TraceError and failure records, the markdown, the per-model subprocess's timeout."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.xdist_group("bench_zoo")  # its module fixture runs once: one worker

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
# A CNN on torch + onnxruntime and a timm ViT on torch (~25 s each on 2 idle cores): the inductor
# lowering runs the same benchmark code as onnxruntime's and compiles for 15-40 s more per model.
RUNTIMES = ("torch", "onnxruntime")
RECORD = {"model", "source", "status", "params", "image_size", "traced", "trace_error", "selection", "runtimes",
          "fidelity", "timings_s", "errors", "peak_rss_mb"}
PARITY = {"parity_ok", "coverage", "compared", "weighted_nodes", "not_compared", "first_divergence", "output_ok",
          "output_max_abs", "cosine_vs_fp32"}


@pytest.fixture(scope="module")
def zoo():
    pytest.importorskip("torchao")
    pytest.importorskip("onnxruntime")
    for name in ("torchvision", "timm"):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} is not installed")
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("zoo", BENCH / "zoo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["zoo"] = module  # dataclasses look their module up there
    threads = torch.get_num_threads()
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        torch.set_num_threads(threads)
        sys.modules.pop("zoo", None)
        sys.modules.pop("zoo_models", None)
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def settings(zoo):
    return zoo.Settings(image_size=32, calib_batches=2, parity_batches=1, threads=1, runtimes=RUNTIMES)


@pytest.fixture(scope="module")
def run(zoo, settings, tmp_path_factory):
    path = tmp_path_factory.mktemp("zoo") / "zoo.json"
    records, meta = zoo.run_zoo(["squeezenet1_1"], settings, json_path=path, command="test")
    vit = zoo.run_model("timm/vit_tiny_patch16_224", dataclasses.replace(settings, runtimes=("torch",)))
    return [*records, vit], meta, path


def _check_parity_records(rec: dict) -> None:
    for runtime, r in rec["runtimes"].items():
        assert runtime in RUNTIMES and PARITY <= r.keys(), (runtime, r)
        assert 0.0 <= r["coverage"] <= 1.0
        assert r["compared"] + len(r["not_compared"]) == r["weighted_nodes"]
        assert all(len(item) == 2 and all(isinstance(v, str) for v in item) for item in r["not_compared"])
        if r["parity_ok"]:  # an ok says what it compared
            assert r["coverage"] > 0 and r["compared"] > 0 and r["output_ok"], (runtime, r)
        else:
            assert r["first_divergence"] or not r["output_ok"] or r["diverging_ops"] or r["coverage"] == 0


def test_records_have_the_fields(run):
    records, meta, path = run
    assert [r["model"] for r in records] == ["squeezenet1_1", "timm/vit_tiny_patch16_224"]
    assert [r["source"] for r in records] == ["torchvision", "timm"]
    for rec in records:
        assert RECORD <= rec.keys(), rec.keys()
        assert rec["params"] > 0 and rec["image_size"] == 32 and rec["timings_s"]["total"] > 0
        assert all({"step", "type", "message"} <= e.keys() for e in rec["errors"])
        assert rec["status"] == ("errors" if rec["errors"] else "ok")
        if rec["traced"]:
            _check_parity_records(rec)
        for c in rec["fidelity"].values():
            assert c is None or -1.0 <= c["cosine_min"] <= c["cosine_mean"] <= 1.0 + 1e-9
    data = json.loads(path.read_text())
    assert data["records"] == records[:1]
    assert data["meta"]["cpu"] and data["meta"]["versions"]["torch"] == torch.__version__


def test_cnn_runs_every_step(run):
    rec = run[0][0]
    assert rec["traced"] is True and rec["trace_error"] is None
    assert set(rec["runtimes"]) == set(RUNTIMES), rec["errors"]  # lowered and checked on both runtimes
    assert rec["selection"]["trainable"] + rec["selection"]["frozen"] == rec["runtimes"]["torch"]["weighted_nodes"]
    for step in ("prepare", "calibrate", "measure_error", "select_trainable", "lower_torch", "parity_torch",
                 "prepare_weighted", "lower_onnxruntime", "parity_onnxruntime", "pt2e", "fx_default"):
        assert step in rec["timings_s"], step
    assert rec["signal"]["batchnorms_reestimated"] == 0  # squeezenet has none
    spread = rec["signal"]["logit_norm_spread"]  # over the calibration batches and the evaluation batch
    assert spread["images"] == 8 * (2 + 1) and spread["max_over_median"] >= 1.0 and "fp32_conditioning" in rec["timings_s"]
    assert rec["fidelity"]["fxptqat"] == rec["runtimes"]["torch"]["cosine_vs_fp32"]
    assert rec["fidelity"]["fxptqat_fake_quant"] is not None and rec["fidelity"]["fx_default"] is not None


def test_the_small_models_keep_parity_on_every_runtime(run):
    # the zoo's goal on its fast subset: every runtime ok, every weighted node compared
    checked = 0
    for rec in run[0]:
        for runtime, r in rec["runtimes"].items():
            assert r["parity_ok"] and r["coverage"] == 1.0, (rec["model"], runtime, r)
            checked += 1
    assert checked == 3  # squeezenet on torch and onnxruntime, the ViT on torch


def test_markdown_renders(zoo, run):
    records, meta, _ = run
    md = zoo.markdown(records, meta)
    assert "| parity torch | parity ort |" in md and "parity inductor" not in md
    for rec in records:
        assert f"| {rec['model']} | {rec['params'] / 1e6:.1f} |" in md
    assert "Parity ok on every runtime (torch, onnxruntime) at full coverage:" in md
    data = json.loads(run[2].read_text())
    assert zoo.markdown(data["records"], data["meta"]) == zoo.markdown(records[:1], meta)  # --report-only


class Untraceable(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return y if y.sum() > 0 else -y  # data-dependent branch


def test_trace_error_and_failures_are_recorded(zoo, settings, monkeypatch):
    def build(name, size):
        if name == "broken":
            raise RuntimeError("no such model")
        return Untraceable().eval(), "torchvision", size

    monkeypatch.setattr(zoo.zm, "build", build)
    untraceable, broken = (zoo.run_model(n, settings) for n in ("untraceable", "broken"))
    assert untraceable["traced"] is False
    message = untraceable["trace_error"]["message"]
    assert message.startswith("torch.fx could not trace Untraceable") and untraceable["trace_error"]["says_what_to_do"]
    assert {"step": "prepare", "type": "TraceError", "message": message} in [
        {k: e[k] for k in ("step", "type", "message")} for e in untraceable["errors"]]
    assert untraceable["runtimes"] == {} and "fx_default" in {e["step"] for e in untraceable["errors"]}
    assert broken["status"] == "errors" and broken["errors"][0]["message"] == "no such model"
    skipped = zoo.run_model("untraceable", dataclasses.replace(settings, max_params=10))
    assert skipped["status"] == "skipped" and skipped["params"] == 112
    assert "> --max-params" in skipped["skip_reason"] and set(skipped["timings_s"]) == {"build", "total"}
    md = zoo.markdown([untraceable, broken, skipped], {"command": "test", **dataclasses.asdict(settings), "cpu": "cpu",
                                              "versions": {}})
    assert "| untraceable | 0.0 | no: TraceError (says what to do) |" in md and "build: RuntimeError" in md
    assert "| untraceable | 0.0 | skipped |" in md and "1 skipped" in md


def test_subprocess_timeout_is_recorded(zoo, settings, tmp_path):
    rec = zoo.run_isolated("squeezenet1_1", settings, timeout=0.5, workdir=str(tmp_path))
    assert rec["status"] == "timeout" and rec["errors"][-1]["type"] == "timeout"
    assert "timed out after" in rec["errors"][-1]["message"]
