"""`python benchmarks/compile.py --quick --json PATH` in a subprocess: the JSON's structure, finite
ratios, no recompile between steps, no graph break, parity of the compiled INT8 model.

No timing assertion: timings on this shared machine are noise; they belong to the benchmark."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.xdist_group("bench_compile")  # its module fixture runs once: one worker

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "compile.py"
TRAINING = {"fp32/eager", "fp32/inductor"} | {f"qat-{s}/{m}" for s in ("all", "ptqat")
                                              for m in ("eager", "inductor", "fxptqat")} | {"qat-all/fxptqat-recompute"}
INFERENCE = {"int8/fxptqat", "int8/fxptqat+dict-tags", "int8/fxptqat-keep-guards", "int8/lower-inductor", "fake-quant/eager", "fp32/eager", "fp32/inductor"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile") / "compile.json"
    committed = [ROOT / "benchmarks" / "results" / f"compile{ext}" for ext in (".json", ".md")]
    before = {p: p.stat().st_mtime_ns for p in committed if p.exists()}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    # --warm-cache: the suite's inductor cache (its precompiled header and kernels other tests built);
    # compile times are not asserted here, and an empty cache of its own cost ~50 s of gcc per run
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--warm-cache", "--json", str(out)], capture_output=True,
                          text=True, timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert {p: p.stat().st_mtime_ns for p in committed if p.exists()} == before  # committed results untouched
    assert "timed repetition" in proc.stderr  # progress goes to stderr
    return json.loads(out.read_text()), out.with_suffix(".md").read_text()


def test_environment_is_recorded(quick):
    data, _ = quick
    meta = data["meta"]
    assert meta["command"].startswith("python benchmarks/compile.py --quick --warm-cache --json")
    assert "fresh" not in meta["inductor_cache"]  # the environment's cache, as asked
    assert meta["cpu"] and meta["torch"] and meta["threads"] == 2 and meta["steps"] == 3 and meta["quick"]
    assert meta["wall_s"] > 0 and len(meta["load_average_start"]) == 3 and meta["mem_method"]


def test_every_variant_is_timed_with_zero_recompiles(quick):
    data, _ = quick
    assert [m["model"] for m in data["models"]] == ["tinymlp"]
    for m in data["models"]:
        assert "error" not in m, m.get("error")
        assert m["quantized_layers"] >= 3 and 0 <= m["ptqat_layers"] <= m["all_layers"] == m["quantized_layers"]
        assert m["graph_breaks"]["qat"]["graph_break_count"] == 0
        assert {r["variant"] for r in m["training"]} == TRAINING
        for r in m["training"]:
            if r["selection"] == "ptqat" and m["ptqat_layers"] == 0:
                continue  # nothing to train: recorded as such
            assert "error" not in r, (r["variant"], r.get("error"))
            assert r["timed_steps"] == 3 and r["step_ms_median"] > 0 and r["compile_s"] > 0
            assert r["recompiles"] == 0, r
            assert r["step_peak_rss_mb"] is None or r["step_peak_rss_mb"] >= 0
            assert math.isfinite(r["final_loss"])
            if r["mode"] != "eager":
                assert r["graphs_compiled"] >= 1
            if r["mode"] in ("fxptqat", "fxptqat-recompute"):
                assert r["fused_graphs"] >= 1 and r["fake_quant_ops"] >= 3 and r["recompiles_fxptqat_graphs"] == 0
        infer = {r["variant"]: r for r in m["inference"]["variants"]}
        assert set(infer) == INFERENCE
        for r in infer.values():
            assert "error" not in r and r["latency_ms_median"] > 0 and r["recompiles"] == 0, r
        for name in ("int8/fxptqat", "int8/fxptqat+dict-tags", "int8/fxptqat-keep-guards"):
            assert infer[name]["int8_graphs"] >= 1 and infer[name]["int8_refused"] == 0, name
            assert infer[name]["max_abs_diff_vs_fake_quant"] < 1e-4, name
        assert infer["int8/fxptqat"]["frozen_tensor_guards_dropped"] > 0
        assert infer["int8/fxptqat-keep-guards"]["frozen_tensor_guards_dropped"] == 0
        assert m["inference"]["parity"] == {"ok": True, "coverage": 1.0}
        assert m["inference"]["max_abs_diff_compiled_vs_lower"] < 1e-4


def test_ratios_are_finite_and_goals_judged(quick):
    data, md = quick
    for m in data["models"]:
        r = m["ratios"]
        assert r["best_fp32"] in ("fp32/eager", "fp32/inductor")
        keys = ["qat-all/fxptqat over best fp32", "qat-all/eager over qat-all/fxptqat",
                "qat-all/inductor over qat-all/fxptqat", "int8/fxptqat over int8/lower-inductor",
                "int8/fxptqat+dict-tags over int8/lower-inductor", "int8/fxptqat-keep-guards over int8/lower-inductor",
                "qat-all/fxptqat-recompute over qat-all/fxptqat"]
        if m["ptqat_layers"]:
            keys += ["qat-ptqat/fxptqat over best fp32", "qat-ptqat/eager over qat-ptqat/fxptqat"]
            keys += [f"qat-ptqat/{mode} over qat-all/{mode}" for mode in ("eager", "inductor", "fxptqat")]
        for key in keys:
            assert math.isfinite(r[key]["ratio"]) and r[key]["ratio"] > 0, key
            assert r[key]["paired_p25"] <= r[key]["paired_p75"]
    goals = data["goals"]
    assert goals and all(g["met"] in (True, False) for g in goals)
    judged = {g["goal"] for g in goals}
    assert "no recompile between timed steps" in judged and "no graph break in the QAT graph" in judged
    assert any("faster FP32 step" in g for g in judged) and any("lower(runtime='inductor')" in g for g in judged)
    assert any("recursive dict-tag guards" in g for g in judged)
    assert all(g["met"] for g in goals if g["goal"].startswith("no "))
    assert "## Goals" in md and "## tinymlp" in md and "| qat-all/fxptqat |" in md and "**met**" in md


def test_quick_refuses_the_committed_results(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--json", str(ROOT / "benchmarks" / "results" / "x.json")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and "never writes into benchmarks/results" in proc.stderr


def test_report_only_rewrites_the_markdown_from_the_json(quick, tmp_path):
    data, md = quick
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    proc = subprocess.run([sys.executable, str(BENCH), "--report-only", "--json", str(path)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert path.with_suffix(".md").read_text() == md
