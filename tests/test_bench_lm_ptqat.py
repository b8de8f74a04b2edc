"""benchmarks/lm_ptqat.py: the --quick run's records, summary, plan part, q2 trace and report."""

import json
import math
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import lm_ptqat as bench  # noqa: E402

pytestmark = pytest.mark.xdist_group("bench_lm_ptqat")  # its module fixture runs once: one worker

REQUIRED = {
    "model", "method", "weight_bits", "act_bits", "seed", "accuracy", "trainable_params", "total_params",
    "trainable_nodes", "n_trainable_nodes", "step_seconds", "peak_mem_bytes", "optimizer_state_bytes", "grad_bytes",
    "saved_activation_bytes", "finetune_steps", "lr", "optimizer", "batch_size", "setting", "same_as", "policy",
    "val_loss", "perplexity",
}
COMMITTED = [bench.RESULTS / f"lm_ptqat{ext}" for ext in (".json", ".md", ".png")]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    before = {p: p.stat().st_mtime_ns for p in COMMITTED if p.exists()}
    path = tmp_path_factory.mktemp("lm") / "quick.json"
    assert bench.main(["--quick", "--seeds", "0", "1", "--threads", "1", "--json", str(path)]) == 0
    assert {p: p.stat().st_mtime_ns for p in COMMITTED if p.exists()} == before  # results/ untouched
    return path, json.loads(path.read_text())


def _by(records, **match):
    return [r for r in records if all(r.get(k) == v for k, v in match.items())]


def test_every_method_per_setting_with_finite_loss_and_perplexity(quick):
    _, result = quick
    records = result["records"]
    assert records
    for r in records:
        assert REQUIRED <= r.keys(), REQUIRED - r.keys()
        assert math.isfinite(r["val_loss"]) and 0 < r["val_loss"] < math.log(128) + 1
        assert r["perplexity"] == pytest.approx(math.exp(r["val_loss"]), rel=1e-12)
        assert 0.0 <= r["accuracy"] <= 1.0
        assert 0 <= r["trainable_params"] <= r["total_params"]
    budgets = result["config"]["steps"]
    for seed in (0, 1):
        assert len(_by(records, setting="float", method="float", seed=seed)) == 1
        assert sorted(r["finetune_steps"] for r in _by(records, method="float_finetuned", seed=seed)) == budgets
        for setting in bench.SETTINGS:
            assert len(_by(records, setting=setting, method="ptq", seed=seed)) == 1
            for method in bench.TRAINED:
                steps = sorted(r["finetune_steps"] for r in _by(records, setting=setting, method=method, seed=seed))
                assert steps == budgets, (setting, method, seed)


def test_selections_follow_their_rules_and_copies_match_their_source(quick):
    _, result = quick
    records = result["records"]
    index = {(r["setting"], r["method"], r["finetune_steps"], r["seed"]): r for r in records}
    for ptq in _by(records, method="ptq"):
        errors = ptq["node_errors"]
        n = len(errors)
        same = dict(setting=ptq["setting"], seed=ptq["seed"], finetune_steps=result["config"]["steps"][-1])
        sel = {m: set(_by(records, method=m, **same)[0]["trainable_nodes"]) for m in bench.TRAINED}
        assert sel["qat_all"] == set(errors)
        assert sel["ptqat"] == {k for k, e in errors.items() if e["iso_mse"] < bench.THETA}
        median = statistics.median(e["iso_sqnr_db"] for e in errors.values())
        assert sel["ptqat_sqnr"] == {k for k, e in errors.items() if e["iso_sqnr_db"] > median}
        ref = "ptqat" if 0 < len(sel["ptqat"]) < n else "ptqat_sqnr"
        for control in bench.CONTROLS:
            rec = _by(records, method=control, **same)[0]
            assert rec["count_from"] == ref and rec["k"] == len(sel[ref]) == len(sel[control])
        high = sel["ptqat_inverse"]
        if high and high != set(errors):  # the k highest isolated errors
            assert min(errors[k]["iso_mse"] for k in high) >= max(errors[k]["iso_mse"] for k in set(errors) - high)
    for r in records:
        if r["same_as"] == "ptq":
            assert r["n_trainable_nodes"] == 0 and r["val_loss"] == r["ptq_val_loss"]
        elif r["same_as"] is not None:
            src = index[(r["setting"], r["same_as"], r["finetune_steps"], r["seed"])]
            assert src["same_as"] is None and src["val_loss"] == r["val_loss"]
            assert set(src["trainable_nodes"]) == set(r["trainable_nodes"])
        elif r["method"] in bench.TRAINED:
            assert r["step_seconds"] > 0 and r["n_trainable_nodes"] > 0
            # Adam: exp_avg + exp_avg_sq (float32) per trainable parameter, plus one scalar `step` per tensor
            assert 0 <= r["optimizer_state_bytes"] - 8 * r["trainable_params"] <= 8 * 64
            assert r["grad_bytes"] == 4 * r["trainable_params"]


def test_paired_differences_are_recomputed_from_the_records(quick):
    _, result = quick
    records, summary = result["records"], result["summary"]
    last = result["config"]["steps"][-1]
    for setting in bench.SETTINGS:
        pairs = {(p["a"], p["b"], p["steps"]): p for p in summary["settings"][setting]["pairs"]}
        for a, b in (("ptqat", "qat_all"), ("ptqat_sqnr", "qat_all"), ("sensitivity", "qat_all"), ("qat_all", "ptq")):
            p = pairs[(a, b, last)]
            diffs = []
            for seed in (0, 1):
                va = _by(records, setting=setting, method=a, seed=seed, finetune_steps=0 if a == "ptq" else last)
                vb = _by(records, setting=setting, method=b, seed=seed, finetune_steps=0 if b == "ptq" else last)
                diffs.append(va[0]["val_loss"] - vb[0]["val_loss"])
            assert p["n"] == 2 and p["per_seed"] == pytest.approx(diffs)
            assert p["mean"] == pytest.approx(statistics.fmean(diffs))
            assert p["se"] == pytest.approx(statistics.stdev(diffs) / math.sqrt(2))
        ref = _by(records, setting=setting, method="random")[0]["count_from"]
        assert all((ref, c, last) in pairs for c in bench.CONTROLS)


def test_float_twins_train_the_same_layers_and_net_pairs_are_differences_in_differences(quick):
    _, result = quick
    records = result["records"]
    last = result["config"]["steps"][-1]
    for setting in bench.SETTINGS:
        net = {(p["a"], p["b"], p["steps"]): p for p in result["summary"]["settings"][setting]["net_pairs"]}
        for seed in (0, 1):
            same = dict(setting=setting, seed=seed, finetune_steps=last)
            ref = _by(records, method="random", **same)[0]["count_from"]
            recovery = {}
            for method in (ref, "ptqat_inverse"):
                twin, quant = _by(records, method="twin_" + method, **same)[0], _by(records, method=method, **same)[0]
                assert twin["twin_of"] == method and twin["trainable_nodes"] == quant["trainable_nodes"]
                assert twin["trainable_params"] == quant["trainable_params"]  # the same Linear weights and biases
                recovery[method] = quant["val_loss"] - twin["val_loss"]
            recovery["qat_all"] = (_by(records, method="qat_all", **same)[0]["val_loss"]
                                   - _by(records, method="float_finetuned", seed=seed, finetune_steps=last)[0]["val_loss"])
            for a, b in ((ref, "ptqat_inverse"), (ref, "qat_all"), ("ptqat_inverse", "qat_all")):
                assert net[(a, b, last)]["per_seed"][seed] == pytest.approx(recovery[a] - recovery[b])


def test_plan_part_runs_each_selection_at_each_fraction(quick):
    _, result = quick
    plan = result["plan_records"]
    pc = result["config"]["plan"]
    assert {r["budget_steps"] for r in plan} == set(pc["budgets"])
    for budget in pc["budgets"]:
        rows = _by(plan, budget_steps=budget)
        fractions = {r["fraction"] for r in rows}
        assert len(fractions) >= 3 and any(r["multiplier"] == 1.0 for r in rows)
        for f in fractions:
            at = {r["method"]: r for r in rows if r["fraction"] == f}
            assert set(at) == set(bench.PLAN_SELECTIONS)
            for r in at.values():
                assert r["fp_steps"] + r["qat_steps"] == budget and math.isfinite(r["val_loss"])
                assert r["perplexity"] == pytest.approx(math.exp(r["val_loss"]))
                if r["same_as"] is not None:
                    assert at[r["same_as"]]["val_loss"] == r["val_loss"]
            if at["qat_all"]["qat_steps"]:
                assert at["qat_all"]["n_trainable_nodes"] == at["qat_all"]["quantized_nodes"]
                assert at["ptqat_inverse"]["n_trainable_nodes"] == at["ptqat"]["n_trainable_nodes"]
    curves = result["summary"]["plan"]
    assert {(c["budget_steps"], c["method"]) for c in curves} == {(b, m) for b in pc["budgets"]
                                                                 for m in bench.PLAN_SELECTIONS}
    for c in curves:
        assert c["best_val_loss"] == min(c["mean_val_loss"]) and c["val_loss_at_predicted"] is not None


def test_q2_traces_errors_and_gradients_by_group(quick):
    _, result = quick
    checkpoints = result["config"]["checkpoints"]
    for setting in bench.SETTINGS:
        for seed in (0, 1):
            entries = {e["method"]: e for e in result["q2"] if (e["setting"], e["seed"]) == (setting, seed)}
            assert "qat_all" in entries and entries["qat_all"]["reference"] in entries
            ref = entries[entries["qat_all"]["reference"]]
            for name, node in entries["qat_all"]["nodes"].items():
                assert len(node["iso_mse"]) == len(node["prop_mse"]) == len(checkpoints)
                assert len(node["grad_norm"]) == len(checkpoints) - 1 and all(g > 0 for g in node["grad_norm"])
                assert node["reference_trains"] == (name in ref["reference_trainable"])
            for node in ref["nodes"].values():
                assert node["trained"] == node["reference_trains"]
                assert all((g is not None) == node["trained"] for g in node["grad_norm"])
    groups = {(q["setting"], q["method"]): q for q in result["summary"]["q2"]}
    for setting in bench.SETTINGS:
        q = groups[(setting, "qat_all")]
        assert q["groups"]["trained"]["nodes"] + q["groups"]["frozen"]["nodes"] == sum(
            len(e["nodes"]) for e in result["q2"] if (e["setting"], e["method"]) == (setting, "qat_all"))
        assert q["groups"]["trained"]["median_grad_rms_mean"] > 0 and len(q["correlations"]) == 2


def test_report_only_regenerates_the_markdown_from_the_json(quick, tmp_path):
    path, _ = quick
    md = path.with_suffix(".md").read_text()
    assert md.startswith("# PTQAT on a language model") and "Claim by claim" in md
    assert "Inside a compute-optimal plan" in md and "Why low-error layers" in md
    assert path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    copy = tmp_path / "again.json"
    copy.write_text(path.read_text())
    assert bench.main(["--report-only", "--json", str(copy)]) == 0
    assert copy.with_suffix(".md").read_text() == md
    assert copy.with_suffix(".png").stat().st_size > 1000


def test_worker_processes_give_the_same_records(quick, tmp_path):
    """--threads 2 runs the jobs in 2 spawned processes (one torch thread each): same numbers as in-process."""
    _, result = quick
    path = tmp_path / "two.json"
    assert bench.main(["--quick", "--seeds", "1", "--settings", "W4", "--threads", "2", "--json", str(path)]) == 0
    two = json.loads(path.read_text())
    assert set(two["job_seconds"]) == {"main1", "plan0"}
    key = lambda r: (r["setting"], r["method"], r["finetune_steps"])  # noqa: E731
    one = {key(r): r["val_loss"] for r in result["records"] if r["seed"] == 1 and r["setting"] in ("W4", "float")}
    assert {key(r): r["val_loss"] for r in two["records"]} == one
    assert [r["val_loss"] for r in two["plan_records"]] == [r["val_loss"] for r in result["plan_records"]]


def test_spearman_and_paired_stats():
    assert bench.spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert bench.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert bench.spearman([1, 2, 3, 4], [1, 1, 2, 2]) == pytest.approx(0.8944, abs=1e-4)  # ties: average ranks
    assert bench.spearman([1, 2], [1, 2]) is None and bench.spearman([1, 1, 1], [1, 2, 3]) is None
    p = bench.paired_stats([-0.01, -0.03, 0.01])
    assert p["mean"] == pytest.approx(-0.01) and p["se"] == pytest.approx(0.02 / math.sqrt(3))
    assert p["a_better"] == 2 and p["n"] == 3
    assert math.isnan(bench.paired_stats([0.5])["se"])


def test_quick_without_json_writes_into_a_temporary_directory(monkeypatch, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in COMMITTED if p.exists()}
    monkeypatch.setattr(bench.tempfile, "mkdtemp", lambda prefix="": str(tmp_path))
    assert bench.main(["--quick", "--parts", "plan", "--threads", "1"]) == 0
    result = json.loads((tmp_path / "lm_ptqat.json").read_text())
    assert result["plan_records"] and not result["records"] and (tmp_path / "lm_ptqat.md").exists()
    assert {p: p.stat().st_mtime_ns for p in COMMITTED if p.exists()} == before
