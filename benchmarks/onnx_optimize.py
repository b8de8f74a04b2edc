"""ONNX lowering's graph optimization: the exporter's ``program.optimize()`` against fxptqat's
``lowering.onnx_optimize.optimize`` (the same passes, without SlicesSplit's cost where it cannot match).

    python benchmarks/onnx_optimize.py [--models densenet121,resnet50,...] [--rounds 2] [--json PATH]

Per model (``zoo_models.build`` at ``--image-size``, random weights, BN re-estimated, W8A8
``quantized_ops="weighted"`` calibrated on 4 batches): the reference graph is exported once with
``optimize=False``; each round then optimizes two fresh copies of that ONNX model, one per path,
alternating which goes first, and checks that both give the same serialized model ("fast" path: the
passes without SlicesSplit; "exporter": a value feeds two Slices, and fxptqat runs the exporter's own
code). Reported: the
median seconds of each path, their ratio, the ONNX node count and the export time (the module docstring
of ``fxptqat/lowering/onnx_optimize.py`` has the profile that found the rule).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import zoo_models as zm  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


class _Program:
    """``ONNXProgram``'s two members the optimizers use, around a copy of an ir.Model."""

    def __init__(self, model):
        self.model = model

    def optimize(self):
        from torch.onnx._internal.exporter import _onnx_program

        _onnx_program.ONNXProgram.optimize(self)


def measure(name: str, image_size: int, rounds: int) -> dict:
    import onnx_ir as ir

    import fxptqat as fq
    from fxptqat.lowering import onnx_optimize
    from fxptqat.lowering.reference import reference

    model, _, size = zm.build(name, image_size)
    calib = zm.inputs(8, size, 0, 4)
    zm.give_signal(model, calib)
    config = fq.QuantConfig(quantized_ops="weighted", act_observer="histogram")
    qat = fq.prepare(model, calib[0], config=config)
    fq.calibrate(qat, calib)
    ref = reference(qat, fq.meta.graph_info(qat).config)
    t = time.perf_counter()
    raw = torch.onnx.export(ref, calib[0], dynamo=True, optimize=False, verbose=False)
    export_s = time.perf_counter() - t
    proto = ir.serde.serialize_model(raw.model)
    times = {"exporter": [], "fxptqat": []}
    outputs = {}
    for i in range(rounds):
        for path in (("exporter", "fxptqat") if i % 2 == 0 else ("fxptqat", "exporter")):
            program = _Program(ir.serde.deserialize_model(proto))
            t = time.perf_counter()
            if path == "exporter":
                program.optimize()
            else:
                taken = onnx_optimize.optimize(program)
            times[path].append(time.perf_counter() - t)
            outputs[path] = ir.serde.serialize_model(program.model).SerializeToString()
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": name, "image_size": size, "onnx_nodes": len(proto.graph.node), "export_s": round(export_s, 2),
            "exporter_s": round(med["exporter"], 2), "fxptqat_s": round(med["fxptqat"], 2),
            "speedup": round(med["exporter"] / med["fxptqat"], 2), "path": taken,
            "identical": outputs["exporter"] == outputs["fxptqat"], "times": times}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet50,mobilenet_v3_large,densenet121,timm/vit_tiny_patch16_224")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=RESULTS / "onnx_optimize.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        row = measure(name, args.image_size, args.rounds)
        rows.append(row)
        print(f"{name}: {row['onnx_nodes']} nodes, export(optimize=False) {row['export_s']} s, "
              f"optimize: exporter {row['exporter_s']} s, fxptqat {row['fxptqat_s']} s, "
              f"{row['speedup']}x ({row['path']} path), identical {row['identical']}", flush=True)
    print("\n| model | ONNX nodes | export, optimize=False (s) | exporter's optimize (s) | fxptqat's (s) | speedup | path | identical |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['onnx_nodes']} | {r['export_s']} | {r['exporter_s']} | {r['fxptqat_s']} | "
              f"{r['speedup']}x | {r['path']} | {r['identical']} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"command": "python benchmarks/onnx_optimize.py " + " ".join(argv or sys.argv[1:]),
                                     "cpu": zm.lscpu_model(), "threads": args.threads, "versions": zm.versions(),
                                     "rows": rows}, indent=1))
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
