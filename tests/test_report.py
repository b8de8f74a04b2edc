"""ErrorReport (table, JSON round trip) and the streamed RunningError behind ErrorStats."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxptqat as fq
from fxptqat.stats import RunningError

from helpers import examples


def stats(mse: float, sqnr_db: float, cosine: float = 0.99, max_abs: float = 0.5, count: int = 64) -> fq.ErrorStats:
    return fq.ErrorStats(mse=mse, sqnr_db=sqnr_db, cosine=cosine, max_abs=max_abs, count=count)


def make_report() -> fq.ErrorReport:
    rows = (
        fq.ErrorRow("conv", "features.conv", "ConvBnReLU2d", 120, stats(2e-6, 45.3), stats(5e-6, 41.0)),
        fq.ErrorRow("fc", "head.fc", "Linear", 325, stats(0.0, math.inf, 1.0, 0.0), stats(0.25, -math.inf, 0.0)),
        fq.ErrorRow("fc_1", "head.out", "Linear", 9, stats(1.5e-3, 12.25), stats(3e-3, 9.5, 0.5, 2.0, 7)),
    )
    return fq.ErrorReport(rows=rows, graph_id="0123abcd", batches=3, samples=24)


# -- ErrorReport ------------------------------------------------------------------------------------
def test_json_round_trip_including_infinities():
    report = make_report()
    text = report.to_json()
    json.loads(text)  # strict JSON: no bare Infinity tokens
    assert "Infinity" not in text
    back = fq.ErrorReport.from_json(text)
    assert back == report
    assert back.row("fc").isolated.sqnr_db == math.inf
    assert back.row("fc").propagated.sqnr_db == -math.inf
    assert isinstance(back.rows, tuple)
    assert isinstance(back.row("conv").isolated, fq.ErrorStats)


def test_json_round_trip_nan():
    row = fq.ErrorRow("n", "n", "Linear", 1, stats(math.nan, math.nan, math.nan), stats(1.0, 0.0))
    back = fq.ErrorReport.from_json(fq.ErrorReport((row,), "g", 1, 1).to_json())
    assert math.isnan(back.rows[0].isolated.mse)
    assert math.isnan(back.rows[0].isolated.sqnr_db)
    assert back.rows[0].propagated == row.propagated


def test_json_round_trip_keeps_names_that_look_like_numbers():
    row = fq.ErrorRow("inf", "nan", "Linear", 1, stats(1.0, 0.0), stats(1.0, 0.0))
    report = fq.ErrorReport((row,), "g", 1, 1)
    assert fq.ErrorReport.from_json(report.to_json()) == report


@pytest.mark.parametrize("text", ["", "nope", "[]", "{}", "null", '{"rows": [{}], "graph_id": "g"}',
                                  '{"rows": [], "graph_id": "g", "batches": 1}'])
def test_from_json_garbage_raises_input_error(text):
    with pytest.raises(fq.InputError, match="not an ErrorReport document"):
        fq.ErrorReport.from_json(text)


def test_iteration_len_and_row_lookup():
    report = make_report()
    assert len(report) == 3
    assert [r.name for r in report] == ["conv", "fc", "fc_1"]
    assert report.row("fc_1").source == "head.out"
    with pytest.raises(KeyError, match="conv"):
        report.row("missing")


def test_error_row_stats_by_mode():
    r = make_report().row("conv")
    assert r.stats("isolated") is r.isolated
    assert r.stats("propagated") is r.propagated
    assert r.isolated.value("mse") == 2e-6
    assert r.propagated.value("sqnr_db") == 41.0


def test_table_lists_nodes_and_values_without_mode_column():
    table = make_report().table()
    lines = table.splitlines()
    assert len(lines) == 2 + 3  # header, rule, one line per row
    header = lines[0].split()
    assert header[0] == "node"
    assert "mode" not in header
    for name, line in zip(["conv", "fc", "fc_1"], lines[2:], strict=True):
        assert line.split()[0] == name
    assert "ConvBnReLU2d" in lines[2] and "120" in lines[2]
    assert "45.3" in lines[2]
    cells = lines[3].split()
    assert "inf" in cells and "-inf" in cells


def test_table_with_marks_adds_mode_column():
    table = make_report().table(marks={"conv": "QAT", "fc": "PTQ"})
    lines = table.splitlines()
    assert lines[0].split()[-1] == "mode"
    assert lines[2].split()[-1] == "QAT"
    assert lines[3].split()[-1] == "PTQ"
    assert lines[4].split()[-1] != "QAT"  # unmarked row has an empty mode cell
    assert "PTQ" not in lines[4] and "QAT" not in lines[4]


def test_table_other_format():
    table = make_report().table(tablefmt="github", marks={})
    assert table.startswith("| node")
    assert table.splitlines()[0].rstrip(" |").endswith("mode")


# -- RunningError ---------------------------------------------------------------------------------------
def _stats_close(a: fq.ErrorStats, b: fq.ErrorStats) -> None:
    assert a.count == b.count
    assert a.max_abs == b.max_abs
    assert a.mse == pytest.approx(b.mse, rel=1e-12, abs=1e-300)
    assert a.sqnr_db == pytest.approx(b.sqnr_db, rel=1e-9)
    assert a.cosine == pytest.approx(b.cosine, rel=1e-12)


def test_merge_of_two_halves_equals_one_pass():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(10, 7, generator=g)
    quant = ref + 0.05 * torch.randn(10, 7, generator=g)
    whole = RunningError()
    whole.update(quant, ref)
    first, second = RunningError(), RunningError()
    first.update(quant[:4], ref[:4])
    second.update(quant[4:], ref[4:])
    first.merge(second)
    _stats_close(first.result(), whole.result())
    # streaming (several updates on one accumulator) is the same as well
    streamed = RunningError()
    for i in range(0, 10, 3):
        streamed.update(quant[i:i + 3], ref[i:i + 3])
    _stats_close(streamed.result(), whole.result())


@settings(max_examples=examples(40), deadline=None)
@given(values=st.lists(st.tuples(st.floats(-100, 100), st.floats(-1, 1)), min_size=2, max_size=30),
       cut=st.integers(min_value=1))
def test_merge_property(values, cut):
    cut = 1 + cut % (len(values) - 1)
    ref = torch.tensor([v for v, _ in values], dtype=torch.float64)
    quant = ref + torch.tensor([e for _, e in values], dtype=torch.float64)
    whole = RunningError()
    whole.update(quant, ref)
    a, b = RunningError(), RunningError()
    a.update(quant[:cut], ref[:cut])
    b.update(quant[cut:], ref[cut:])
    a.merge(b)
    assert (a.count, a.max_abs) == (whole.count, whole.max_abs)
    for name in ("sq_err", "sq_ref", "sq_q", "dot"):
        assert getattr(a, name) == pytest.approx(getattr(whole, name), rel=1e-9, abs=1e-9)


def test_merge_with_empty_is_identity():
    acc = RunningError()
    acc.update(torch.tensor([1.0, 2.0]), torch.tensor([1.5, 2.0]))
    before = acc.result()
    acc.merge(RunningError())
    assert acc.result() == before


def test_zero_error():
    acc = RunningError()
    x = torch.randn(3, 5)
    acc.update(x, x.clone())
    s = acc.result()
    assert s.mse == 0.0
    assert s.sqnr_db == math.inf
    assert s.cosine == 1.0
    assert s.max_abs == 0.0
    assert s.count == 15


def test_zero_error_on_zero_tensors():
    acc = RunningError()
    acc.update(torch.zeros(4), torch.zeros(4))
    s = acc.result()
    assert (s.mse, s.sqnr_db, s.cosine) == (0.0, math.inf, 1.0)


def test_known_values_constant_offset():
    ref = torch.ones(100, dtype=torch.float64)
    acc = RunningError()
    acc.update(ref + 0.1, ref)
    s = acc.result()
    assert s.mse == pytest.approx(0.01, rel=1e-12)
    assert s.sqnr_db == pytest.approx(20.0, rel=1e-12)  # 10 log10(100 * 1 / (100 * 0.01))
    assert s.cosine == pytest.approx(1.0, rel=1e-12)  # parallel vectors
    assert s.max_abs == pytest.approx(0.1, rel=1e-12)
    assert s.count == 100


def test_known_values_mixed_signs():
    ref = torch.tensor([[1.0, -1.0], [2.0, -2.0]], dtype=torch.float64)
    acc = RunningError()
    acc.update(ref + 0.1, ref)
    s = acc.result()
    sq_ref, sq_q = 1 + 1 + 4 + 4, 1.1**2 + 0.9**2 + 2.1**2 + 1.9**2
    dot = 1.1 - 0.9 * -1 + 2.1 * 2 + 1.9 * 2
    assert s.mse == pytest.approx(0.01, rel=1e-12)
    assert s.sqnr_db == pytest.approx(10 * math.log10(sq_ref / 0.04), rel=1e-12)
    assert s.cosine == pytest.approx(dot / math.sqrt(sq_ref * sq_q), rel=1e-12)
    assert s.cosine < 1.0


def test_float32_inputs():
    ref = torch.full((1000,), 1.0)
    acc = RunningError()
    acc.update(ref * 2, ref)  # err 1 everywhere
    s = acc.result()
    assert s.mse == 1.0
    assert s.sqnr_db == 0.0
    assert s.cosine == pytest.approx(1.0)


def test_zero_reference_with_error():
    acc = RunningError()
    acc.update(torch.tensor([0.5, -0.5]), torch.zeros(2))
    s = acc.result()
    assert s.sqnr_db == -math.inf
    assert s.cosine == 0.0
    assert s.mse == pytest.approx(0.25)


def test_opposite_sign_gives_cosine_minus_one():
    x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    acc = RunningError()
    acc.update(-x, x)
    assert acc.result().cosine == pytest.approx(-1.0)


def test_empty_accumulator_has_no_result():
    with pytest.raises(ValueError, match="no elements"):
        RunningError().result()
