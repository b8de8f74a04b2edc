"""A tiny run of ``benchmarks/deploy.py``: the JSON it writes, ratios, failure records, memory child."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.xdist_group("bench_deploy")  # its module fixture runs once: one worker

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


@pytest.fixture(scope="module")
def deploy():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("deploy", BENCH / "deploy.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["deploy"] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("deploy", None)
        sys.modules.pop("deploy_models", None)
        sys.path.remove(str(BENCH))


TINY = ["--models", "vit", "--batches", "1", "--repeats", "2", "--warmup", "1", "--calib-batches", "2",
        "--calib-size", "2", "--image-size", "32", "--threads", "1", "--tiny"]
REQUIRED = {"model", "batch", "backend", "status", "latency_ms", "size_bytes"}


def _records(path: Path) -> dict[str, dict]:
    data = json.loads(path.read_text())
    assert {"meta", "records"} <= data.keys()
    assert data["meta"]["threads"] == 1 and "torch" in data["meta"]["versions"]
    for r in data["records"]:
        assert REQUIRED <= r.keys(), r
    return {r["backend"]: r for r in data["records"]}


def test_tiny_run_writes_schema(deploy, tmp_path):
    out, md = tmp_path / "deploy.json", tmp_path / "deploy.md"
    # peak RSS of two backends: the memory child builds each twice (its ONNX export alone: ~10 s)
    assert deploy.main([*TINY, "--backends", "fp32_eager", "fxptqat_int8", "fxptqat_int8_onnxruntime",
                        "--memory-backends", "fp32_eager", "fxptqat_int8", "--json", str(out), "--md", str(md)]) == 0
    recs = _records(out)
    assert set(recs) == {"fp32_eager", "fxptqat_int8", "fxptqat_int8_onnxruntime"}
    fp32, int8, ort = recs["fp32_eager"], recs["fxptqat_int8"], recs["fxptqat_int8_onnxruntime"]
    assert int8["parity_ok"] is True
    assert ort["parity_ok"] is True and ort["size_bytes"] > 0
    for r in (fp32, int8, ort):
        assert r["status"] == "ok" and r["model"] == "vit" and r["batch"] == 1
        assert r["latency_ms"] > 0 and r["size_bytes"] > 0
        assert r["latency_q1_ms"] <= r["latency_ms"] <= r["latency_q3_ms"]
        assert r["minor_faults_per_run"] >= 0
    for r in (fp32, int8):
        assert r["peak_rss_mb"] > 0 and r["resident_model_mb"] is not None and "memory_reason" not in r
    assert ort["peak_rss_mb"] is None and ort["memory_reason"] == "not measured (--memory-backends)"
    assert fp32["speedup_vs_fp32_eager"] == 1.0
    assert int8["speedup_vs_fp32_eager"] == pytest.approx(fp32["latency_ms"] / int8["latency_ms"], rel=1e-2)
    assert int8["size_vs_fp32"] < 1.0  # tiny model: qparams weigh in; the real ones are near 0.25
    assert int8["parity_ok"] is True
    table = md.read_text()
    assert "| vit | 1 | fxptqat_int8 |" in table and "parity ok" in table
    meta = json.loads(out.read_text())["meta"]
    assert meta["malloc"] == {"mmap_threshold": 32 << 20, "trim_threshold": 1 << 30}  # glibc here
    assert "Allocator: glibc mmap threshold 32 MiB" in table


def test_memory_backends_must_be_measured_backends(deploy, capsys):
    with pytest.raises(SystemExit):
        deploy.parse_args(["--backends", "fp32_eager", "--memory-backends", "fxptqat_int8"])
    assert "--memory-backends ['fxptqat_int8'] not in --backends" in capsys.readouterr().err
    assert deploy.parse_args(["--backends", "fp32_eager", "fxptqat_int8"]).memory_backends == ["fp32_eager",
                                                                                            "fxptqat_int8"]


def test_failing_peer_is_recorded_not_dropped(deploy, tmp_path, monkeypatch):
    def broken(ctx):
        raise ImportError("No module named 'onnxruntime'")

    monkeypatch.setitem(deploy.BUILDERS, "ort_int8", broken)
    out = tmp_path / "deploy.json"
    deploy.main([*TINY, "--backends", "fp32_eager", "ort_int8", "--no-memory", "--json", str(out)])
    recs = _records(out)
    assert recs["ort_int8"]["status"] == "failed" and recs["ort_int8"]["latency_ms"] is None
    assert "onnxruntime" in recs["ort_int8"]["reason"]
    assert recs["fp32_eager"]["status"] == "ok" and "peak_rss_mb" not in recs["fp32_eager"]


def test_ort_peer_runs_when_installed(deploy, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = tmp_path / "deploy.json"
    deploy.main([*TINY, "--backends", "fp32_eager", "ort_int8", "--no-memory", "--json", str(out)])
    ort = _records(out)["ort_int8"]
    assert ort["status"] == "ok", ort.get("reason")
    assert ort["fastest_peer"] == "ort_int8" and ort["latency_vs_fastest_peer"] == 1.0


def test_pt2e_peer_runs_when_installed(deploy, tmp_path):
    pytest.importorskip("torchao")
    out = tmp_path / "deploy.json"
    import torch._inductor.config as inductor_config

    freezing, threads = inductor_config.freezing, torch.get_num_threads()
    deploy.main([*TINY, "--backends", "fp32_eager", "pt2e_inductor_int8", "--no-memory", "--json", str(out)])
    # the compiled backends set inductor's freezing: put back, or every later test in this worker
    # traces under no_grad with parameters frozen into graph attributes
    assert inductor_config.freezing == freezing and torch.get_num_threads() == threads
    pt2e = _records(out)["pt2e_inductor_int8"]
    assert pt2e["status"] == "ok", pt2e.get("reason")
    assert pt2e["size_vs_fp32"] < 1.0
