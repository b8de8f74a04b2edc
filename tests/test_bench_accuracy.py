"""benchmarks/accuracy.py: the --quick run's records, its report, and the pieces computed outside fxptqat."""

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fxptqat as fq

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import accuracy as bench  # noqa: E402
from benchmarks.plot_accuracy import render_markdown  # noqa: E402
from benchmarks.pointnet import PointNet, images_to_points  # noqa: E402

pytestmark = pytest.mark.xdist_group("bench_accuracy")  # its module fixture runs once: one worker

REQUIRED = {
    "model", "method", "weight_bits", "act_bits", "seed", "accuracy", "trainable_params", "total_params",
    "step_seconds", "peak_mem_bytes", "optimizer_state_bytes", "saved_activation_bytes", "finetune_steps",
    "lr", "optimizer", "batch_size", "setting", "same_as",
}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "accuracy.py"), "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out, json.loads(out.read_text())


def test_quick_run_writes_a_record_for_every_method(quick):
    path, records = quick
    assert isinstance(records, list) and records
    for r in records:
        assert REQUIRED <= r.keys(), REQUIRED - r.keys()
        assert 0.0 <= r["accuracy"] <= 1.0
        assert 0 <= r["trainable_params"] <= r["total_params"]
    methods = {r["method"] for r in records}
    assert set(bench.MAIN_METHODS) <= methods
    assert {"granularity_channel", "granularity_block", "metric_cosine", "theta_0.005"} <= methods
    steps = sorted({r["finetune_steps"] for r in records if r["method"] == "qat_all"})
    assert steps == [3, 6]
    qat_all = next(r for r in records if r["method"] == "qat_all")
    assert qat_all["same_as"] is None and qat_all["step_seconds"] > 0
    # Adam: exp_avg + exp_avg_sq (float32) per parameter, plus one scalar `step` per tensor
    assert 0 <= qat_all["optimizer_state_bytes"] - 2 * 4 * qat_all["trainable_params"] <= 8 * 64
    for r in records:  # copies point at a record that was really trained
        if r["same_as"] not in (None, "ptq"):
            assert any(o["method"] == r["same_as"] and o["same_as"] is None for o in records)
    # the markdown and the plot are written next to the JSON, never into benchmarks/results
    assert path.with_suffix(".md").read_text().startswith("# PTQAT on real data")
    assert path.with_suffix(".png").stat().st_size > 1000


def test_report_only_regenerates_from_json(quick, tmp_path):
    path, records = quick
    md, png = tmp_path / "r.md", tmp_path / "r.png"
    assert bench.main(["--report-only", "--json", str(path), "--md", str(md), "--png", str(png)]) == 0
    assert md.read_text() == render_markdown(records)
    assert png.exists()


def test_quick_refuses_committed_paths():
    assert bench.main(["--quick"]) == 2
    assert bench.main(["--quick", "--json", str(bench.DEFAULT_JSON)]) == 2


def test_per_channel_mse_averages_to_the_reports_isolated_mse():
    torch.manual_seed(0)
    pts = images_to_points(torch.randn(96, 1, 28, 28), num_points=32)
    model = PointNet().eval()
    calib = [(pts[i : i + 32],) for i in range(0, 96, 32)]
    qat = fq.prepare(model, pts[:32], config=fq.QuantConfig(weight_bits=4, act_bits=8))
    fq.calibrate(qat, calib)
    report = fq.measure_error(qat, calib)
    flags = [bool(m.fake_quant_enabled[0]) for m in qat.modules() if isinstance(m, fq.FakeQuantize)]
    per_channel = bench.per_channel_mse(qat, report, calib)
    assert flags == [bool(m.fake_quant_enabled[0]) for m in qat.modules() if isinstance(m, fq.FakeQuantize)]
    for row in report.rows:
        assert float(per_channel[row.name].mean()) == pytest.approx(row.isolated.mse, rel=1e-4)


def test_blocks_and_point_clouds():
    assert bench.block_of("ResidualCNN", "res_conv2.0") == "res"
    assert bench.block_of("ResidualCNN", "down2_pw.0") == "down2"
    assert bench.block_of("SmallViT", "blocks.1.attn.q") == "blocks.1.attn"
    assert bench.block_of("SmallViT", "blocks.0.fc2") == "blocks.0.mlp"
    assert bench.block_of("PointNet", "point2.0") == "point_mlp"
    x = torch.rand(4, 1, 28, 28)
    a, b = images_to_points(x, num_points=64, seed=3), images_to_points(x, num_points=64, seed=3)
    assert a.shape == (4, 3, 64) and torch.equal(a, b)
    assert a[:, :2].abs().max() <= 1.05
    net = PointNet().eval()
    perm = torch.randperm(64)
    assert torch.allclose(net(a), net(a[:, :, perm]), atol=1e-5)  # a set function of the points
    assert list(itertools.islice(bench.train_stream(x, torch.arange(4), seed=1), 1))[0][0].shape[0] == 4
