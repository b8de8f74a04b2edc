"""How well-conditioned each zoo model's float reference is, without quantizing anything.

    python benchmarks/zoo_conditioning.py [--models a,b] [--json PATH]

For every architecture ``zoo_models.all_models()`` lists (within the zoo's ``--max-params``), this
builds the model exactly as ``zoo.py`` does (same seeds, image size and BatchNorm re-estimation,
``zoo_models.benchmark_data``) and records ``zoo_models.logit_norm_spread`` over the calibration and
evaluation images: the max / median of the per-image FP32 logit norms. ``zoo.py`` records the same
figure in every new record (``signal.logit_norm_spread``); this script measures it for records written
before it did, and ``zoo_summary.py`` reads both. A spread above ``ILL_CONDITIONED_SPREAD`` marks a
reference on which no per-tensor INT8 recipe's cosine means anything (the docstring there says why);
the summary counts the fidelity goal with and without those models and lists them.
One thread, models one after another in this process; writes ``results/zoo_conditioning.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import zoo  # noqa: E402
import zoo_models as zm  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def measure(name: str, s: zoo.Settings) -> dict:
    rec = {"model": name, "image_size": None, "params": None, "signal": None, "error": None}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, _, size = zm.build(name, s.image_size)
            rec["image_size"], rec["params"] = size, sum(p.numel() for p in model.parameters())
            if rec["params"] > s.max_params:
                rec["error"] = f"skipped: {rec['params'] / 1e6:.0f} M parameters > {s.max_params / 1e6:.0f} M"
                return rec
            data = zm.benchmark_data(s.batch, size, s.calib_batches)
            rec["signal"] = zm.give_signal(model, data["signal"])
            rec["signal"]["logit_norm_spread"] = zm.logit_norm_spread(model, [*data["calib"], (data["x"],)])
    except Exception as e:  # recorded, the next model goes on
        rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    finally:
        gc.collect()
    return rec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", help="comma-separated (default: every zoo architecture)")
    p.add_argument("--json", type=Path, default=RESULTS / "zoo_conditioning.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    s = zoo.Settings()
    names = args.models.split(",") if args.models else zm.all_models()
    meta = {"command": "python " + " ".join(sys.argv), "started": time.ctime(), "image_size": s.image_size,
            "batch": s.batch, "calib_batches": s.calib_batches, "ill_conditioned_spread": zm.ILL_CONDITIONED_SPREAD,
            "cpu": zm.lscpu_model(), "versions": zm.versions(), "fxptqat": zm.fxptqat_source()}
    records = []
    for name in names:
        rec = measure(name, s)
        spread = ((rec["signal"] or {}).get("logit_norm_spread") or {}).get("max_over_median")
        print(f"{name}: spread {spread} {rec['error'] or ''}", flush=True)
        records.append(rec)
        args.json.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
