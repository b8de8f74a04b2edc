"""``benchmarks/zoo_summary.py``: the newest record per model over several zoo runs, and what it counts."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def summary():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("zoo_summary", BENCH / "zoo_summary.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH))


def _rt(ok=True, compared=3, weighted=3, cosine=0.9):
    return {"parity_ok": ok, "coverage": compared / weighted, "compared": compared, "weighted_nodes": weighted,
            "cosine_vs_fp32": {"cosine_mean": cosine, "cosine_min": cosine}}


def _record(model, *, ok=True, ort=0.9, pt2e=0.9, breaks=0):
    cos = {"cosine_mean": pt2e, "cosine_min": pt2e}
    return {"model": model, "source": "torchvision", "status": "ok", "params": 1000, "traced": True, "errors": [],
            "runtimes": {"torch": _rt(ok), "onnxruntime": _rt(cosine=ort), "inductor": _rt()},
            "dynamo": {"graph_breaks": breaks, "graphs": 1, "reasons": []},
            "fidelity": {"fxptqat": cos, "fxptqat_fake_quant": cos, "pt2e": cos, "fx_default": None},
            "timings_s": {"total": 1.0}}


def _run_file(path, started, commit, records, runtimes=("torch", "onnxruntime", "inductor")):
    meta = {"started": started, "label": commit, "fxptqat": {"git_head": commit}, "cpu": "test",
            "runtimes": list(runtimes)}
    path.write_text(json.dumps({"meta": meta, "records": records}))


def test_the_newest_record_of_each_model_counts(summary, tmp_path):
    # the older run has resnet18 failing parity and 2 graph breaks; the newer one fixed both
    _run_file(tmp_path / "zoo_old.json", "Mon Nov 30 09:04:51 2026", "aaa",
              [_record("resnet18", ok=False, breaks=2), _record("vgg11", ort=0.85, pt2e=0.9)])
    _run_file(tmp_path / "zoo_new.json", "Tue Dec  1 04:00:00 2026", "bbb", [_record("resnet18", ort=0.95)])
    records = summary.newest_records(tmp_path)
    assert records["resnet18"]["run"]["commit"] == "bbb" and records["vgg11"]["run"]["commit"] == "aaa"
    md, js = tmp_path / "s.md", tmp_path / "s.json"
    assert summary.main(["--results", str(tmp_path), "--no-list", "--md", str(md), "--json", str(js)]) == 0
    text = md.read_text()
    assert "at full coverage: 2/2 traced models" in text
    assert "2/2 models without a graph break" in text
    assert "more than 0.01 below: vgg11 -0.0500" in text
    assert ">= 0: 1/2" in text and "Records come from 2 runs at 2 commits (aaa, bbb)" in text
    assert json.loads(js.read_text())["models"]["resnet18"]["full_parity"] is True
    assert not (tmp_path / "zoo_summary.json").exists()  # written where asked


def test_a_failing_or_partial_record_is_shown(summary, tmp_path):
    _run_file(tmp_path / "zoo_a.json", "Mon Nov 30 09:04:51 2026", "aaa",
              [_record("resnet18", ok=False), {**_record("alexnet"), "runtimes": {"torch": _rt(compared=2)}}])
    text = summary.markdown(summary.newest_records(tmp_path), expected=["resnet18", "alexnet", "vgg11"])
    assert "FAIL 3/3" in text and "ok 2/3" in text
    assert "at full coverage: 0/2 traced models" in text
    assert "with a record: 2; without: vgg11" in text


def test_a_runtime_the_newest_run_skipped_comes_from_an_earlier_run(summary, tmp_path):
    old = _record("resnet18", breaks=3, ort=0.8)
    old["runtimes"]["inductor"] = _rt(compared=2)
    old["fidelity"]["fxptqat"] = {"cosine_mean": 0.7, "cosine_min": 0.7}
    _run_file(tmp_path / "zoo_old.json", "Mon Nov 30 09:04:51 2026", "aaa", [old])
    new = {**_record("resnet18", ort=0.95), "dynamo": None, "weighted_recipe": {"bias_correction": True}}
    new["runtimes"] = {"onnxruntime": new["runtimes"]["onnxruntime"]}
    new["fidelity"] = {**new["fidelity"], "fxptqat": None, "fxptqat_fake_quant": None}
    _run_file(tmp_path / "zoo_new.json", "Tue Dec  1 04:00:00 2026", "bbb", [new, _record("vgg11")],
              runtimes=("onnxruntime",))
    records = summary.newest_records(tmp_path)
    rec = records["resnet18"]
    assert rec["run"]["commit"] == "bbb" and set(rec["filled"]) == {"torch", "inductor"}
    assert rec["runtimes"]["onnxruntime"]["cosine_vs_fp32"]["cosine_mean"] == 0.95  # the newest run's
    assert rec["runtimes"]["inductor"]["compared"] == 2 and rec["dynamo"]["graph_breaks"] == 3  # the earlier run's
    assert rec["fidelity"]["fxptqat"]["cosine_mean"] == 0.7
    assert records["vgg11"]["filled"] == {}  # nothing earlier to fill from: not run
    text = summary.markdown(records, expected=None)
    row = next(line for line in text.splitlines() if line.startswith("| resnet18"))
    assert "ok 3/3* | ok 3/3 | ok 2/3* | 3* | - | +0.0500 | -0.2000* |" in row
    assert "| vgg11 |" in text and "not run" in next(line for line in text.splitlines() if line.startswith("| vgg11"))
    assert "Cells marked * come from" in text and "inductor on 1 models, torch on 1 models" in text
    assert '{"bias_correction": true} on 1 models' in text and "no bias correction" in text


def test_no_results_is_an_error(summary, tmp_path, capsys):
    assert summary.main(["--results", str(tmp_path), "--no-list"]) == 1
    assert "no zoo" in capsys.readouterr().err


def _spread(value):
    return {"images": 40, "median": 5.0, "max_over_median": value, "ill_conditioned": value > 10.0}


def test_the_goal_is_counted_again_over_well_conditioned_references(summary, tmp_path):
    # vgg11 (own figure) and resnet18 (from zoo_conditioning.json) are well-conditioned; effnet is not
    vgg, effnet, resnet = _record("vgg11", ort=0.95), _record("effnet", ort=0.2, pt2e=0.4), _record("resnet18", ort=0.8)
    for rec in (vgg, effnet, resnet):
        rec["image_size"] = 64
    vgg["signal"] = {"batchnorms_reestimated": 0, "logit_norm_spread": _spread(1.2)}
    _run_file(tmp_path / "zoo_a.json", "Mon Nov 30 09:04:51 2026", "aaa", [vgg, effnet, resnet,
                                                                           _record("alexnet", ort=0.8)])
    cond = [{"model": "effnet", "image_size": 64, "signal": {"logit_norm_spread": _spread(2000.0)}},
            {"model": "resnet18", "image_size": 64, "signal": {"logit_norm_spread": _spread(1.1)}},
            {"model": "vgg11", "image_size": 64, "signal": {"logit_norm_spread": _spread(99.0)}},  # own figure wins
            {"model": "alexnet", "image_size": 32, "signal": {"logit_norm_spread": _spread(1.0)}}]  # other size
    (tmp_path / "zoo_conditioning.json").write_text(json.dumps({"meta": {}, "records": cond}))
    md, js = tmp_path / "s.md", tmp_path / "s.json"
    assert summary.main(["--results", str(tmp_path), "--no-list", "--md", str(md), "--json", str(js)]) == 0
    text = md.read_text()
    assert "distribution: >= 0: 1/4" in text  # every model, as before
    assert "spread <= 10): >= 0: 1/2" in text and "more than 0.01 below: resnet18 -0.1000" in text
    assert "Ill-conditioned FP32 references (1, not in the line above; ours ahead of PT2E on 0): effnet -0.2000 " \
           "(spread 2e+03, PT2E's cosine 0.400)" in text
    assert "Without a conditioning figure: alexnet." in text
    rows = {line.split(" |")[0][2:]: line for line in text.splitlines() if line.startswith("| ")}
    assert "| 1.2 |" in rows["vgg11"] and "| 1.1+ |" in rows["resnet18"] and "| 2e+03 ill+ |" in rows["effnet"]
    models = json.loads(js.read_text())["models"]
    assert models["effnet"]["conditioning_from"] == "zoo_conditioning.json"
    assert models["vgg11"]["logit_norm_spread"]["max_over_median"] == 1.2 and models["alexnet"]["logit_norm_spread"] is None
    assert "zoo_conditioning.json" not in {r["run"]["file"] for r in summary.newest_records(tmp_path).values()}


def test_logit_norm_spread_flags_a_chaotic_reference(summary):
    import torch
    import zoo_models

    class Scale(torch.nn.Module):  # logits = x * (1 + 1000 * [first image of each batch])
        def forward(self, x):
            boost = torch.ones(x.shape[0], 1)
            boost[0] = 1000.0
            return x.flatten(1) * boost

    batches = [(torch.ones(4, 3),), (torch.ones(4, 3),)]
    spread = zoo_models.logit_norm_spread(Scale(), batches)
    assert spread["images"] == 8 and spread["max_over_median"] == pytest.approx(1000.0)
    assert spread["ill_conditioned"] is True
    assert zoo_models.logit_norm_spread(torch.nn.Flatten(), batches)["ill_conditioned"] is False


def test_parity_cells_judged_before_the_last_check_change_are_counted_apart(summary, tmp_path):
    # resnet18: every runtime measured after the change; vgg11: onnxruntime after it, the rest filled
    # in from a run before it
    _run_file(tmp_path / "zoo_old.json", "Mon Nov 30 09:04:51 2026", "aaa", [_record("vgg11")])
    new = _record("vgg11")
    new["runtimes"] = {"onnxruntime": new["runtimes"]["onnxruntime"]}
    _run_file(tmp_path / "zoo_new.json", "Thu Dec  3 04:00:00 2026", "bbb", [_record("resnet18"), new],
              runtimes=("onnxruntime",))
    text = summary.markdown(summary.newest_records(tmp_path), expected=None)
    assert "torch 1/2, onnxruntime 2/2, inductor 1/2; the others by the earlier, looser one" in text
