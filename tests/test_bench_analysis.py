"""benchmarks/analysis.py in-process on its smallest case: the methods run and report what they measure."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def analysis():
    pytest.importorskip("torch.ao.ns._numeric_suite_fx")
    spec = importlib.util.spec_from_file_location("analysis_bench", ROOT / "benchmarks" / "analysis.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("method", ["measure_error", "ns_shadow"])
def test_each_method_measures_time_and_memory(analysis, method):
    rec = analysis.child("vit", method, 1, quick=True, repeats=1)
    assert rec["method"] == method and rec["batches"] == 1 and rec["weighted_nodes"] > 0
    assert rec["seconds"] > 0 and rec["peak_mb_above_start"] >= 0


def test_markdown_reports_ratios_to_the_fake_quant_pass(analysis):
    records = [{"model": "vit", "method": "fake_quant", "batches": 1, "seconds": 0.5, "peak_mb_above_start": 1.0},
               {"model": "vit", "method": "measure_error", "batches": 1, "seconds": 1.0, "peak_mb_above_start": 2.0}]
    for r in records:
        r["x_fake_quant"] = r["seconds"] / 0.5
    md = analysis.markdown(records, {"command": "c", "cpu": "cpu", "date": "d"})
    assert "| vit | 1 | measure_error | 2.00x | 1.000 | 2 |" in md
