"""Where fxptqat's weighted recipe and PT2E's part on one zoo model, with the recipe made identical.

    python benchmarks/divergence_probe.py [--model timm/levit_128s] [--json PATH]

The zoo's setting (``zoo_models``: random weights, ``give_signal``, batch 8 at 64 px, 4 calibration
batches). fxptqat: ``quantized_ops="weighted"``, ``act_observer="ao_histogram"``, ``weight_range="full"``
(PT2E's ops, estimator and weight grid), fake-quant in eval mode; PT2E: ``X86InductorQuantizer`` after
``convert_pt2e``, Q/DQ float math in eager. Printed: the quantized ops of each (their counts), whether
the activation and weight quantization parameters agree, then per conv/linear in graph order (matched
by position) the largest input and output difference and the share of input elements that differ; and
each recipe's logit cosine to FP32 on the evaluation images and on 4 copies of them multiplied by
``1 + 1e-6 * N(0, 1)`` (how much of a fidelity gap float noise alone makes on this model).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import warnings
from pathlib import Path

import torch
import torch.fx as fx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import zoo_models as zm  # noqa: E402


class _Recorder(fx.Interpreter):
    def __init__(self, gm, wanted):
        super().__init__(gm)
        self.wanted, self.ins, self.outs = wanted, [], []

    def run_node(self, n):
        out = super().run_node(n)
        if self.wanted(self, n):
            self.ins.append(self.env[n.args[0]].detach().clone())
            self.outs.append(out.detach().clone())
        return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="timm/levit_128s")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    import fxptqat as fq

    model, _, size = zm.build(args.model, 64)
    data = zm.benchmark_data(8, size, 4)
    calib, x = data["calib"], data["x"]
    zm.give_signal(model, data["signal"])
    qat = fq.prepare(model, calib[0], config=fq.QuantConfig(
        weight_bits=8, act_bits=8, quantized_ops="weighted", act_observer="ao_histogram", weight_range="full"))
    fq.calibrate(qat, calib)
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(torch.export.export(model, calib[0]).module(), quantizer)
    with torch.no_grad():
        for batch in calib:
            prepared(*batch)
    pt2e = convert_pt2e(prepared)
    out: dict = {"command": "python benchmarks/divergence_probe.py " + " ".join(argv or sys.argv[1:]), "model": args.model}

    weighted = ("Linear", "ConvBn2d", "Conv2d", "ConvReLU2d", "LinearReLU")
    ours = _Recorder(qat.eval(), lambda s, n: n.op == "call_module"
                     and type(s.module.get_submodule(n.target)).__name__ in weighted)
    theirs = _Recorder(pt2e, lambda s, n: n.op == "call_function"
                       and str(n.target) in ("aten.linear.default", "aten.conv2d.default"))
    with torch.no_grad():
        ours.run(x)
        theirs.run(x)
    ours_ops = collections.Counter(type(qat.get_submodule(n.target)).__name__ for n in qat.graph.nodes
                                   if n.op == "call_module" and type(qat.get_submodule(n.target)).__name__ in weighted)
    out["ops"] = {"fxptqat": dict(ours_ops), "pt2e": len(theirs.outs)}
    w_ours = sorted(float(m.weight_fake_quant.scale.double().sum()) for m in qat.modules()
                    if hasattr(m, "weight_fake_quant"))
    w_theirs = sorted(float(getattr(pt2e, n.args[1].target).double().sum()) for n in pt2e.graph.nodes
                      if n.op == "call_function" and "dequantize_per_channel" in str(n.target))
    # per weight, the sum of its channel scales (sorted: the two graphs order their weights differently)
    out["weight_scale_sums_max_rel_diff"] = (max(abs(a - b) / b for a, b in zip(w_ours, w_theirs, strict=True))
                                             if len(w_ours) == len(w_theirs) else None)
    layers = []
    for i, (ai, bi, ao, bo) in enumerate(zip(ours.ins, theirs.ins, ours.outs, theirs.outs, strict=False)):
        if ao.shape != bo.shape:
            layers.append({"index": i, "shape_mismatch": [list(ao.shape), list(bo.shape)]})
            break
        layers.append({"index": i, "in_max_diff": (ai - bi).abs().max().item(),
                       "in_share_differing": ((ai - bi).abs() > 1e-5).float().mean().item(),
                       "out_max_rel_diff": (ao - bo).abs().max().item() / (bo.abs().max().item() + 1e-12)})
    out["layers"] = layers

    def cos(m, inp, ref):
        return zm.cosine(ref, zm.logits(zm.evaluate(m, inp)))["cosine_mean"]

    ref = zm.logits(zm.evaluate(model, x))
    rows = [{"input": "x", "fxptqat": cos(qat, x, ref), "pt2e": cos(pt2e, x, ref)}]
    g = torch.Generator().manual_seed(1)
    for k in range(4):
        xp = x * (1 + 1e-6 * torch.randn(x.shape, generator=g))
        refp = zm.logits(zm.evaluate(model, xp))
        rows.append({"input": f"x * (1 + 1e-6 N) #{k}", "fxptqat": cos(qat, xp, refp), "pt2e": cos(pt2e, xp, refp)})
    out["cosines"] = rows
    print(f"{args.model}: quantized ops fxptqat {dict(ours_ops)}, PT2E {len(theirs.outs)} conv/linear; "
          f"weights' scale sums: largest relative difference {out['weight_scale_sums_max_rel_diff']}")
    for r in layers[:12]:
        print("  ", {k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in r.items()})
    for r in rows:
        print(f"  {r['input']:<22} cosine to FP32: fxptqat {r['fxptqat']:.6f}  PT2E {r['pt2e']:.6f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
