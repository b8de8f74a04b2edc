"""W8A8 output fidelity against FP32: fxptqat recipes vs torchao PT2E vs torch.ao's FX default.

Every figure is the cosine similarity of the logits (per image, averaged) between the float model
and a *fake-quant* model, so that no INT8 kernel is involved (on CPUs without VNNI, fbgemm's
16-bit pair sums saturate and INT8 outputs are wrong for reasons that have nothing to do with the
quantization recipe):

* fxptqat: the prepared + calibrated graph in eval mode (what a correct INT8 lowering computes);
* PT2E: ``convert_pt2e`` of ``X86InductorQuantizer``'s prepared model, run in eager (Q/DQ float math);
* FX default: ``convert_to_reference_fx`` of ``get_default_qconfig_mapping("x86")``, run in eager.

Models have random weights, BatchNorm statistics re-estimated on a few random batches (train mode,
``momentum=None``), inputs are N(0, 1) images. Calibration and evaluation batches are disjoint.

    python benchmarks/fidelity_probe.py --models mobilenet_v2 efficientnet_b0 --seeds 0 1 2
    python benchmarks/fidelity_probe.py --recipes fxptqat_minmax fxptqat_histogram pt2e
    python benchmarks/fidelity_probe.py --explain mobilenet_v2   # which ops each recipe quantizes
    python benchmarks/fidelity_probe.py --ablate efficientnet_b0 --act-observer histogram  # error by op
    python benchmarks/fidelity_probe.py --summarize runs.jsonl   # mean tables, share >= PT2E

One process, one thread (``torch.set_num_threads(1)``); ``--json PATH`` appends one line per figure.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import io
import json
import math
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F


def import_torchvision():
    """torchvision's PyPI wheel is CUDA-linked: imported through the zoo benchmark's shim (ENVIRONMENT.md)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from zoo_models import import_torchvision as shimmed

    return shimmed()


MODELS = {
    "mobilenet_v2": ("tv", "mobilenet_v2"),
    "efficientnet_b0": ("tv", "efficientnet_b0"),
    "mobilenet_v3_small": ("tv", "mobilenet_v3_small"),
    "resnet18": ("tv", "resnet18"),
    "convnext_tiny": ("tv", "convnext_tiny"),
    "regnet_x_400mf": ("tv", "regnet_x_400mf"),
    "shufflenet_v2_x1_0": ("tv", "shufflenet_v2_x1_0"),
    "mnasnet0_5": ("tv", "mnasnet0_5"),
    "resnet50": ("tv", "resnet50"),
    "deit_tiny": ("timm", "deit_tiny_patch16_224"),
    "vit_tiny": ("timm", "vit_tiny_patch16_224"),
    "mobilevitv2_050": ("timm", "mobilevitv2_050"),
    "efficientnet_lite0": ("timm", "efficientnet_lite0"),
    "mixer_s32": ("timm", "mixer_s32_224"),
}


def build_model(name: str, image_size: int, seed: int) -> nn.Module:
    # any timm architecture as "timm/NAME" (the zoo's spelling), any torchvision one by its name
    kind, arch = MODELS.get(name) or (("timm", name[5:]) if name.startswith("timm/") else ("tv", name))
    torch.manual_seed(seed)
    if kind == "tv":  # torchvision's ViTs take the image size (a multiple of the patch) as an argument
        kwargs = {"image_size": image_size} if arch.startswith("vit_") else {}
        model = getattr(import_torchvision().models, arch)(weights=None, **kwargs)
    else:
        import_torchvision()  # timm imports torchvision when present
        import timm

        kwargs = {"img_size": image_size} if any(k in arch for k in ("deit", "vit_", "mixer", "levit")) else {}
        model = timm.create_model(arch, pretrained=False, **kwargs)
        if hasattr(model, "blocks"):
            for block in model.blocks:  # explicit q/k/v matmuls instead of SDPA: FX can quantize them
                attn = getattr(block, "attn", None)
                if attn is not None and hasattr(attn, "fused_attn"):
                    attn.fused_attn = False
    for m in model.modules():  # zero-initialised heads (ViT) give all-zero logits
        if isinstance(m, nn.Linear) and m.weight.abs().max() == 0:
            nn.init.normal_(m.weight, std=0.02)
    gen = torch.Generator().manual_seed(10_000 + seed)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bns:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the passes
        model.train()
        with torch.no_grad():
            for _ in range(4):
                model(torch.randn(8, 3, image_size, image_size, generator=gen))
    return model.eval()


def batches(image_size: int, seed: int, n: int, batch: int = 8) -> list[tuple[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, image_size, image_size, generator=gen),) for _ in range(n)]


def cosine(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(F.cosine_similarity(ref.flatten(1).double(), out.flatten(1).double(), dim=1).mean())


# -- recipes: each returns a callable computing the fake-quant (reference) model -----------------------
def fxptqat_recipe(**options):
    def build(model, calib):
        import fxptqat as fq

        config = fq.QuantConfig(weight_bits=8, act_bits=8, **options)
        qat = fq.prepare(model, calib[0], config=config)
        fq.calibrate(qat, calib)
        return qat.eval()
    return build


def pt2e_recipe(act_observer: str = "histogram"):
    def build(model, calib):
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        config = xiq.get_default_x86_inductor_quantization_config()
        if act_observer == "minmax":
            from torchao.quantization.pt2e import MinMaxObserver

            spec = dataclass_replace(config.input_activation, observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2**-12))
            config = dataclass_replace(config, input_activation=spec, output_activation=spec)
        exported = torch.export.export(model, calib[0]).module()
        try:
            prepared = prepare_pt2e(exported, xiq.X86InductorQuantizer().set_global(config))
        except ValueError as e:  # "Input partition has more than one output node": a ReLU module called twice
            if "more than one output node" not in str(e):
                raise
            exported = torch.export.export(unshare_relus(model), calib[0]).module()
            prepared = prepare_pt2e(exported, xiq.X86InductorQuantizer().set_global(config))
        with torch.no_grad():
            for args in calib:
                prepared(*args)
        return convert_pt2e(prepared)
    return build


def unshare_relus(model: nn.Module) -> nn.Module:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from zoo_models import unshare_relus as shared

    return shared(model)


def dataclass_replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)


def fx_default_recipe(reduce_range: bool = True):
    def build(model, calib):
        from torch.ao.quantization import QConfig, get_default_qconfig_mapping
        from torch.ao.quantization.observer import HistogramObserver
        from torch.ao.quantization.quantize_fx import convert_to_reference_fx, prepare_fx

        mapping = get_default_qconfig_mapping("x86")
        if not reduce_range:  # the same recipe with 8-bit instead of 7-bit activations
            qc = mapping.global_qconfig
            full = QConfig(activation=HistogramObserver.with_args(reduce_range=False), weight=qc.weight)
            mapping.set_global(full)
            for key, value in list(mapping.object_type_qconfigs.items()):
                if value is qc:
                    mapping.object_type_qconfigs[key] = full
        prepared = prepare_fx(copy.deepcopy(model), mapping, calib[0])
        with torch.no_grad():
            for args in calib:
                prepared(*args)
        return convert_to_reference_fx(prepared)
    return build


RECIPES = {
    "fxptqat_minmax": fxptqat_recipe(act_observer="minmax"),
    "fxptqat_histogram": fxptqat_recipe(act_observer="histogram"),
    "fxptqat_ao_histogram": fxptqat_recipe(act_observer="ao_histogram"),
    "fxptqat_weighted_minmax": fxptqat_recipe(quantized_ops="weighted", act_observer="minmax"),
    "fxptqat_weighted_histogram": fxptqat_recipe(quantized_ops="weighted", act_observer="histogram"),
    "fxptqat_weighted_histogram_bc": fxptqat_recipe(quantized_ops="weighted", act_observer="histogram",
                                                    bias_correction=True),
    "fxptqat_weighted_ao_histogram": fxptqat_recipe(quantized_ops="weighted", act_observer="ao_histogram"),
    "fxptqat_weighted_robust_histogram_bc": fxptqat_recipe(quantized_ops="weighted", act_observer="robust_histogram",
                                                           bias_correction=True),
    "fxptqat_weighted_histogram_bc_full": fxptqat_recipe(quantized_ops="weighted", act_observer="histogram",
                                                         bias_correction=True, weight_range="full"),
    # PT2E's recipe exactly (its ops, estimator and weight grid): what is left is float rounding
    "fxptqat_weighted_ao_histogram_full": fxptqat_recipe(quantized_ops="weighted", act_observer="ao_histogram",
                                                         weight_range="full"),
    "fxptqat_minmax_pertensor": fxptqat_recipe(act_observer="minmax", per_channel=False),
    "pt2e": pt2e_recipe(),
    "pt2e_minmax": pt2e_recipe("minmax"),
    "fx_default": fx_default_recipe(),
    "fx_default_fullrange": fx_default_recipe(reduce_range=False),
}
DEFAULT_RECIPES = ("fxptqat_minmax", "fxptqat_histogram", "pt2e", "fx_default")


def measure(name: str, recipe: str, seed: int, image_size: int, n_calib: int) -> dict:
    model = build_model(name, image_size, seed)
    calib = batches(image_size, 1000 + seed, n_calib)
    (x,) = batches(image_size, 2000 + seed, 1)[0]
    with torch.no_grad():
        ref = model(x)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(io.StringIO()):
            quantized = RECIPES[recipe](model, calib)
        with torch.no_grad():
            out = quantized(x)
    return {"model": name, "recipe": recipe, "seed": seed, "image_size": image_size, "n_calib": n_calib,
            "cosine": cosine(ref, out), "seconds": round(time.perf_counter() - start, 2),
            "ref_norm": float(ref.norm() / math.sqrt(ref.numel()))}


# -- --explain: which ops each recipe runs on quantized inputs -----------------------------------------
def explain(name: str, image_size: int) -> None:
    import fxptqat as fq
    from fxptqat.fake_quantize import FakeQuantize

    model = build_model(name, image_size, 0)
    calib = batches(image_size, 1000, 2)
    qat = fq.prepare(model, calib[0], config=fq.QuantConfig())
    fed = collections.Counter()
    for node in qat.graph.nodes:
        if node.op == "call_module" and isinstance(qat.get_submodule(node.target), FakeQuantize):
            continue
        if any(a.op == "call_module" and isinstance(qat.get_submodule(a.target), FakeQuantize)
               for a in node.all_input_nodes):
            key = type(qat.get_submodule(node.target)).__name__ if node.op == "call_module" else str(node.target)
            fed[key] += 1
    print(f"fxptqat (all): ops reading a fake-quantized value: {dict(fed)}")
    converted = pt2e_recipe()(model, calib)
    fed = collections.Counter()
    for node in converted.graph.nodes:
        if any(a.op == "call_function" and "dequantize" in str(a.target) for a in node.all_input_nodes):
            if "quantize" not in str(node.target):
                fed[str(node.target).replace("aten.", "")] += 1
    print(f"PT2E X86InductorQuantizer: ops reading a dequantized value: {dict(fed)}")


def ablate(name: str, image_size: int, seed: int, n_calib: int, **options) -> None:
    """Turn off one group of fxptqat's activation quantizers at a time (grouped by the op whose
    output they quantize) and print the cosine gained: where the error comes from."""
    from fxptqat.fake_quantize import FakeQuantize

    model = build_model(name, image_size, seed)
    calib = batches(image_size, 1000 + seed, n_calib)
    (x,) = batches(image_size, 2000 + seed, 1)[0]
    with torch.no_grad():
        ref = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qat = fxptqat_recipe(**options)(model, calib)
    groups: dict[str, set[str]] = collections.defaultdict(set)
    for node in qat.graph.nodes:
        if node.op != "call_module" or not isinstance(qat.get_submodule(node.target), FakeQuantize):
            continue
        src = node.args[0]
        if src.op == "placeholder":
            kind = "input"
        elif src.op == "call_module":
            kind = type(qat.get_submodule(src.target)).__name__
        else:
            kind = getattr(src.target, "__name__", str(src.target))
        if all(u.op == "output" for u in node.users):
            kind = "model output"
        groups[kind].add(node.target)
    with torch.no_grad():
        base = cosine(ref, qat(x))
    print(f"{name} {options}: all quantized {base:.4f}")
    for kind, targets in sorted(groups.items()):
        for t in targets:
            qat.get_submodule(t).enable_fake_quant(False)
        with torch.no_grad():
            c = cosine(ref, qat(x))
        for t in targets:
            qat.get_submodule(t).enable_fake_quant(True)
        print(f"  float after {kind:<28} ({len(targets):3d} quantizers): {c:.4f} ({c - base:+.4f})")
    weights = [m.weight_fake_quant for m in qat.modules() if hasattr(m, "weight_fake_quant")]
    for w in weights:
        w.enable_fake_quant(False)
    with torch.no_grad():
        c = cosine(ref, qat(x))
    print(f"  float weights ({len(weights)}): {c:.4f} ({c - base:+.4f})")


def summarize(paths: list[str], against: str = "pt2e") -> None:
    """Mean cosine per model and recipe over the seeds in JSON-lines files (later lines win), and
    for each recipe how often (per model and seed) it is >= ``against`` and its worst shortfall."""
    rows: dict[tuple[str, str, int], float] = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                if "cosine" in r:
                    rows[r["model"], r["recipe"], r["seed"]] = r["cosine"]
    models = list(dict.fromkeys(m for m, _, _ in rows))
    recipes = [r for r in RECIPES if any(k[1] == r for k in rows)]
    print("| model | seeds | " + " | ".join(recipes) + " |")
    print("|---|---|" + "---|" * len(recipes))
    for m in models:
        cells = []
        for r in recipes:
            v = [c for (mm, rr, _), c in rows.items() if mm == m and rr == r]
            cells.append(f"{statistics.mean(v):.4f}" if v else "-")
        seeds = len({s for (mm, _, s) in rows if mm == m})
        print(f"| {m} | {seeds} | " + " | ".join(cells) + " |")
    print(f"\nper (model, seed) against {against}: share >= it, worst difference")
    for r in recipes:
        diffs = [c - rows[m, against, s] for (m, rr, s), c in rows.items() if rr == r and (m, against, s) in rows]
        if diffs and r != against:
            share = sum(d >= 0 for d in diffs) / len(diffs)
            print(f"  {r:<32} {share:6.0%} of {len(diffs):3d}   worst {min(diffs):+.4f}   mean {statistics.mean(diffs):+.4f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mobilenet_v2", "efficientnet_b0", "mobilenet_v3_small",
                                                        "resnet18", "deit_tiny", "convnext_tiny"])
    parser.add_argument("--recipes", nargs="+", default=list(DEFAULT_RECIPES), choices=list(RECIPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--calib-batches", type=int, default=4)
    parser.add_argument("--json", help="append one JSON line per figure to this file")
    parser.add_argument("--explain", metavar="MODEL")
    parser.add_argument("--ablate", metavar="MODEL")
    parser.add_argument("--act-observer", default="minmax", help="with --ablate")
    parser.add_argument("--summarize", nargs="+", metavar="JSONL", help="print the tables of earlier --json runs")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.summarize:
        summarize(args.summarize)
        return 0
    if args.explain:
        explain(args.explain, args.image_size)
        return 0
    if args.ablate:
        for seed in args.seeds:
            ablate(args.ablate, args.image_size, seed, args.calib_batches, act_observer=args.act_observer)
        return 0
    table: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for name in args.models:
        for seed in args.seeds:
            for recipe in args.recipes:
                try:
                    row = measure(name, recipe, seed, args.image_size, args.calib_batches)
                except Exception as e:  # one failing recipe must not hide the others
                    row = {"model": name, "recipe": recipe, "seed": seed, "error": f"{type(e).__name__}: {e}"[:300]}
                print(json.dumps(row), flush=True)
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(row) + "\n")
                if "cosine" in row:
                    table[name, recipe].append(row["cosine"])
    print("\n| model | " + " | ".join(args.recipes) + " |")
    print("|---|" + "---|" * len(args.recipes))
    for name in args.models:
        cells = []
        for recipe in args.recipes:
            v = table.get((name, recipe))
            cells.append("error" if not v else f"{statistics.mean(v):.4f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's fxptqat
    sys.exit(main())
