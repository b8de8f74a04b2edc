"""The onnxruntime lowering with and without ``fxptqat.workarounds.reuse_torchlib_registry``.

    python benchmarks/onnx_registry.py [--models resnet18,...] [--rounds 4] [--json PATH]

``torch.onnx.export(dynamo=True)`` rebuilds its ATen -> ONNX registry from torchlib on every call
(onnxscript re-reads ~500 functions' source); fxptqat builds it once per process. Per model
(``zoo_models.build`` at ``--image-size``, random weights, BN re-estimated, W8A8
``quantized_ops="weighted"`` calibrated on 2 batches): one untimed ``lower(runtime="onnxruntime")``,
then ``--rounds`` rounds of one lowering per path, alternating which goes first. Reported: the median
seconds of each path, their ratio, and whether both paths gave byte-identical ONNX models.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import zoo_models as zm  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def measure(name: str, image_size: int, rounds: int) -> dict:
    import fxptqat as fq
    from fxptqat.lowering import onnx as onnx_lowering

    model, _, size = zm.build(name, image_size)
    calib = zm.inputs(2, size, 0, 2)
    zm.give_signal(model, calib)
    qat = fq.prepare(model, calib[0], config=fq.QuantConfig(quantized_ops="weighted"))
    fq.calibrate(qat, calib)
    reuse = onnx_lowering.reuse_torchlib_registry
    paths = {"reused": reuse, "rebuilt": contextlib.nullcontext}
    times: dict[str, list[float]] = {k: [] for k in paths}
    models: dict[str, set[bytes]] = {k: set() for k in paths}
    try:
        fq.lower(qat, runtime="onnxruntime", example_inputs=calib[0])
        for i in range(rounds):
            for path in (("reused", "rebuilt") if i % 2 == 0 else ("rebuilt", "reused")):
                onnx_lowering.reuse_torchlib_registry = paths[path]
                t = time.perf_counter()
                lowered = fq.lower(qat, runtime="onnxruntime", example_inputs=calib[0])
                times[path].append(time.perf_counter() - t)
                models[path].add(lowered.model_bytes)
    finally:
        onnx_lowering.reuse_torchlib_registry = reuse
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": name, "image_size": size, "reused_s": round(med["reused"], 2), "rebuilt_s": round(med["rebuilt"], 2),
            "ratio": round(med["reused"] / med["rebuilt"], 2), "saved_s": round(med["rebuilt"] - med["reused"], 2),
            "identical": len(models["reused"] | models["rebuilt"]) == 1, "times": times}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="squeezenet1_1,resnet18,mobilenet_v3_small,timm/vit_tiny_patch16_224")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=RESULTS / "onnx_registry.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        row = measure(name, args.image_size, args.rounds)
        rows.append(row)
        print(f"{name}: lower(onnxruntime) reused registry {row['reused_s']} s, rebuilt {row['rebuilt_s']} s, "
              f"{row['ratio']}x, identical {row['identical']}", flush=True)
    print("\n| model | reused registry (s) | rebuilt per export (s) | ratio | saved per lowering (s) | identical |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['reused_s']} | {r['rebuilt_s']} | {r['ratio']}x | {r['saved_s']} | {r['identical']} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"command": "python benchmarks/onnx_registry.py " + " ".join(argv or sys.argv[1:]),
                                     "cpu": zm.lscpu_model(), "threads": args.threads, "versions": zm.versions(),
                                     "rows": rows}, indent=1))
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
