"""A/B for issue 13's open ViT goal: does inductor's C++ GEMM template (``max_autotune`` with
``max_autotune_gemm_backends="CPP,ATEN"``, whose epilogues can take element-wise work) bring the
SmallViT W4A8 QAT step under ``backend="fxptqat"`` closer to the FP32 step?

    python benchmarks/compile_gemm_ab.py [--steps 20] [--threads 2] [--fp32-cpp]

Same setup as benchmarks/compile.py's smallvit (batch 64, 28 px, Adam lr 1e-4, every layer
trainable): 2 warm-up steps per variant (their time is the compile time), then ``--steps`` steps
round-robin with the order rotated each repetition; medians, and ratios to the faster FP32 step
taken side by side in this one process. Writes benchmarks/results/compile_gemm_ab.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import subprocess
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import fxptqat as fq
from fxptqat.examples.models import SmallViT

CPP_GEMM = {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
BATCH = 64


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fp32-cpp", action="store_true", help="also FP32 compiled with the C++ GEMM template")
    p.add_argument("--json", type=Path, default=Path(__file__).resolve().parent / "results" / "compile_gemm_ab.json")
    args = p.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    net = SmallViT(num_classes=10, image_size=28, patch_size=4, dim=64, depth=4, heads=4).eval()
    calib = [(torch.randn(BATCH, 1, 28, 28, generator=g),) for _ in range(4)]
    qat = fq.prepare(net, calib[0], config=fq.QuantConfig(weight_bits=4))
    fq.calibrate(qat, calib)
    fq.select_trainable(qat, fq.measure_error(qat, calib[:2]), policy=fq.AllLayers())
    data = [(x, torch.randint(0, 10, (BATCH,), generator=g)) for (x,) in calib]

    variants: dict[str, dict] = {}

    def make(name, model, backend, options=None):
        m = copy.deepcopy(model).train()
        forward = m if backend is None else torch.compile(m, backend=backend, options=options)
        params = [q for q in m.parameters() if q.requires_grad]
        variants[name] = {"forward": forward, "opt": torch.optim.Adam(params, lr=1e-4), "times": []}

    make("fp32/eager", net, None)
    make("fp32/inductor", net, "inductor")
    if args.fp32_cpp:
        make("fp32/inductor+cpp_gemm", net, "inductor", CPP_GEMM)
    make("qat/fxptqat", qat, "fxptqat")
    make("qat/fxptqat+cpp_gemm", qat, "fxptqat", {"inductor": CPP_GEMM})

    def step(v, x, y):
        loss = F.cross_entropy(v["forward"](x), y)
        v["opt"].zero_grad(set_to_none=True)
        loss.backward()
        v["opt"].step()

    compile_s = {}
    for name, v in variants.items():
        t = time.perf_counter()
        for i in range(2):
            step(v, *data[i])
        compile_s[name] = time.perf_counter() - t
    names = list(variants)
    for rep in range(args.steps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            t = time.perf_counter()
            step(variants[name], *data[rep % len(data)])
            variants[name]["times"].append(time.perf_counter() - t)
    median = {n: statistics.median(v["times"]) * 1e3 for n, v in variants.items()}
    fastest = min(median["fp32/eager"], median["fp32/inductor"])
    for n, m in median.items():
        print(f"{n:28s} {m:8.2f} ms  {m / fastest:.2f}x the faster FP32 step  (warm-up {compile_s[n]:.1f} s)")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "command": "python benchmarks/compile_gemm_ab.py" + (" --fp32-cpp" if args.fp32_cpp else ""),
        "commit": commit, "threads": args.threads, "steps": args.steps, "machine": platform.machine(),
        "torch": torch.__version__, "median_ms": median, "warmup_s": compile_s,
        "ratio_to_faster_fp32": {n: m / fastest for n, m in median.items()},
    }, indent=1) + "\n")


if __name__ == "__main__":
    main()
