"""Cost of the per-node error analysis: ``measure_error`` against one fake-quant pass over the same
batches, and against torch.ao's Numeric Suite (FX) producing the same quantities.

    python benchmarks/analysis.py [--quick] [--json PATH] [--batches 1 4 16 64]

Per model and number of batches N, each method runs in a fresh subprocess (so that its peak memory is
its own), on the same calibrated fxptqat QAT graph and the same N batches:

* ``fake_quant``: N forwards of the calibrated graph (no grad): the unit the others are divided by;
* ``measure_error``: ``fq.measure_error`` (isolated and propagated error of every weighted node);
* ``ns_loggers``: Numeric Suite ``add_loggers`` (float traced model vs the QAT graph), the N batches
  through both, ``extract_logger_info``: propagated error only, every activation held in memory;
* ``ns_shadow``: ``add_shadow_loggers`` + ``extract_shadow_logger_info``: each quantized layer fed
  the float model's input (Numeric Suite's isolated view);
* ``ns_both``: both, i.e. what gives Numeric Suite the two quantities measure_error computes.

Time: wall time of the method (setup included for Numeric Suite: adding loggers is part of its job),
median over ``--repeats`` calls after a first one. Memory: the process's peak RSS during that first
call above its RSS just before (Linux ``/proc/self/clear_refs`` resets the peak; later calls reuse
what the allocator kept and would undercount). One thread. Ratios are measured side by side in one
run; absolute times vary between runs on this shared machine.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
METHODS = ("fake_quant", "measure_error", "ns_loggers", "ns_shadow", "ns_both")


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def build(model: str, quick: bool):
    """(float model, batches factory) with random weights (BatchNorm re-estimated for the CNN)."""
    torch.manual_seed(0)
    if model == "resnet18":
        sys.path.insert(0, str(HERE))
        import zoo_models as zm

        size = 32 if quick else 64
        net, _, size = zm.build("resnet18", size)
        return net, (lambda n: zm.inputs(8 if quick else 32, size, seed=5, n=n))
    from fxptqat.examples.models import SmallViT

    net = SmallViT(num_classes=10, image_size=28, patch_size=4, dim=64, depth=2 if quick else 4, heads=4).eval()
    gen = torch.Generator().manual_seed(5)
    return net, (lambda n: [(torch.randn(16 if quick else 64, 1, 28, 28, generator=gen),) for _ in range(n)])


def child(model: str, method: str, n: int, quick: bool, repeats: int) -> dict:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    import fxptqat as fq

    net, make = build(model, quick)
    batches = make(n)
    qat = fq.prepare(net, batches[0], config=fq.QuantConfig(weight_bits=8, act_bits=8))
    fq.calibrate(qat, make(2))
    qat.eval()
    float_traced = torch.fx.symbolic_trace(copy.deepcopy(net)).eval()

    def fake_quant():
        with torch.no_grad():
            for args in batches:
                qat(*args)

    def measure():
        fq.measure_error(qat, batches)

    def ns_loggers():
        import torch.ao.ns._numeric_suite_fx as ns

        a, b = ns.add_loggers("fp32", copy.deepcopy(float_traced), "fq", copy.deepcopy(qat), ns.OutputLogger)
        with torch.no_grad():
            for args in batches:
                a(*args)
                b(*args)
        return ns.extract_logger_info(a, b, ns.OutputLogger, "fq")

    def ns_shadow():
        import torch.ao.ns._numeric_suite_fx as ns

        shadow = ns.add_shadow_loggers("fp32", copy.deepcopy(float_traced), "fq", copy.deepcopy(qat), ns.OutputLogger)
        with torch.no_grad():
            for args in batches:
                shadow(*args)
        return ns.extract_shadow_logger_info(shadow, ns.OutputLogger, "fq")

    def ns_both():
        return ns_loggers(), ns_shadow()

    fn = {"fake_quant": fake_quant, "measure_error": measure, "ns_loggers": ns_loggers, "ns_shadow": ns_shadow,
          "ns_both": ns_both}[method]
    importlib.import_module("torch.ao.ns._numeric_suite_fx")  # imported before any measurement

    # memory on the first call: after it the allocator keeps what it freed, and a later call's
    # peak above its start would undercount; times from the calls after it
    before = _rss_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    out = fn()
    peak = max(0, _rss_kb("VmHWM") - before) / 1024
    del out
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
        del out
    nodes = len(list(fq.meta.quantized_nodes(qat)))
    return {"model": model, "method": method, "batches": n, "seconds": statistics.median(times),
            "peak_mb_above_start": peak, "weighted_nodes": nodes,
            "batch_size": int(batches[0][0].shape[0])}


def run(models, counts, quick: bool, repeats: int, cap: dict | None = None) -> list[dict]:
    records = []
    for model in models:
        for n in counts:
            if cap and model in cap and n > cap[model]:
                continue
            for method in METHODS:
                cmd = [sys.executable, __file__, "--child", model, method, str(n), "--repeats", str(repeats)]
                cmd += ["--quick"] if quick else []
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
                if proc.returncode != 0:
                    rec = {"model": model, "method": method, "batches": n, "error": proc.stderr.strip()[-400:]}
                else:
                    rec = json.loads(proc.stdout.strip().splitlines()[-1])
                records.append(rec)
                print(json.dumps(rec), flush=True)
    for rec in records:
        unit = next((r for r in records if r["model"] == rec["model"] and r["batches"] == rec["batches"]
                     and r["method"] == "fake_quant" and "seconds" in r), None)
        if unit and "seconds" in rec:
            rec["x_fake_quant"] = round(rec["seconds"] / unit["seconds"], 3)
    return records


def markdown(records: list[dict], meta: dict) -> str:
    lines = [f"`{meta['command']}` on {meta['cpu']}, 1 thread, {meta['date']}"
             f"{', commit ' + meta['commit'] if meta.get('commit') else ''}.", "",
             "| model | batches | method | time / fake-quant pass | seconds | peak MB above start |",
             "|---|---|---|---|---|---|"]
    for r in records:
        if "seconds" not in r:
            lines.append(f"| {r['model']} | {r['batches']} | {r['method']} | error | - | - |")
            continue
        lines.append(f"| {r['model']} | {r['batches']} | {r['method']} | {r.get('x_fake_quant', 0):.2f}x | "
                     f"{r['seconds']:.3f} | {r['peak_mb_above_start']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="resnet18 at 32 px and a 2-block ViT, 1 and 4 batches")
    p.add_argument("--models", nargs="+", default=["resnet18", "vit"])
    p.add_argument("--batches", nargs="+", type=int)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path)
    p.add_argument("--cap", nargs="+", default=[], metavar="MODEL=N",
                   help="skip batch counts above N for MODEL (e.g. resnet18=16: its 64-batch Numeric Suite rows take ~15 min)")
    p.add_argument("--child", nargs=3, metavar=("MODEL", "METHOD", "N"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        model, method, n = args.child
        print(json.dumps(child(model, method, int(n), args.quick, args.repeats)))
        return 0
    counts = args.batches or ([1, 4] if args.quick else [1, 4, 16, 64])
    repeats = 1 if args.quick else args.repeats
    command = "python benchmarks/analysis.py " + " ".join(argv if argv is not None else sys.argv[1:])
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    meta = {"command": command.strip(), "cpu": cpu, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "load_average": os.getloadavg()}
    try:
        cap = {m: int(n) for m, n in (item.split("=", 1) for item in args.cap)}
    except ValueError:
        p.error(f"--cap takes MODEL=N items, got {args.cap}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True)
    meta["commit"] = commit.stdout.strip() or None
    records = run(args.models, counts, args.quick, repeats, cap)
    path = args.json or (Path("/tmp") / "analysis_quick.json" if args.quick else RESULTS / "analysis.json")
    path.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    md = markdown(records, meta)
    path.with_suffix(".md").write_text(md)
    print(md)
    return 0 if all("seconds" in r for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
