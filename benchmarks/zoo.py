"""Model-zoo benchmark: fxptqat's pipeline, its three runtimes and INT8 fidelity on every
torchvision classification architecture and a selection of timm ones (random weights, CPU).

    python benchmarks/zoo.py [--quick] [--models a,b,c] [--json PATH] [--md PATH] [--report-only]

Per model (``zoo_models.py`` builds it with random weights, re-initialises all-zero heads and
re-estimates BatchNorm statistics; inputs ``torch.randn`` at ``--image-size``, batch 8, fixed seeds):

1. ``QuantConfig(weight_bits=8, act_bits=8)``: ``prepare`` -> ``calibrate`` -> ``measure_error`` ->
   ``select_trainable(policy=Adaptive())`` -> ``lower()`` (runtime "torch") -> ``check_parity``, and
   ``torch._dynamo.explain`` of the QAT graph (only when ``--runtimes`` includes "torch").
2. fxptqat's accuracy recipe, ``quantized_ops="weighted"`` (the ops PT2E's X86InductorQuantizer
   quantizes) with ``act_observer="robust_histogram"`` and ``bias_correction=True`` (the record's
   ``weighted_recipe``; records before it was added ran without bias correction, records before
   session 19 with ``act_observer="histogram"``): ``prepare`` ->
   ``calibrate`` -> ``lower(runtime="onnxruntime")`` and ``lower(runtime="inductor")``, each ->
   ``check_parity``.
3. Fidelity on 8 fresh random images: cosine similarity of each sample's logits to the FP32 model's
   (mean and min over samples) for fxptqat's fake-quant graph, its INT8 model (1.), the lowerings of
   2., torchao PT2E + ``X86InductorQuantizer`` (converted module in eager) and torch.ao's default
   FX recipe (``prepare_fx`` with ``get_default_qconfig_mapping("x86")``).

Per runtime: parity ok, coverage (compared / weighted nodes), what was not compared and why, the first
divergence, the output check; per step: its time and any exception's type and message (independent
later steps still run). An untraceable model keeps the ``fq.TraceError`` message exactly as raised.

Each model runs in a fresh subprocess (``--in-process``: not) under ``--timeout``, so a crash, a hang
or the OOM killer costs one record (the child saves its partial record after every step); the JSON is
rewritten after every model (``--resume`` continues a run). Models above ``--max-params`` are recorded
as skipped with their parameter count and estimated peak memory: the default, 350 M, runs ViT-L (306 M,
~16 GiB) and skips ViT-H/14 and RegNetY-128GF (630+ M, ~33 GiB: more than the machine). Time goes mostly to
``lower(runtime="inductor")`` (C++ compilation, cached on disk across runs) and to the ONNX export of
``lower(runtime="onnxruntime")``: 15-120 s per model at 1 thread.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zoo_models as zm  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
QUICK = ("resnet18", "mobilenet_v3_small", "timm/vit_tiny_patch16_224")
RUNTIMES = ("torch", "onnxruntime", "inductor")
WEIGHTED_RECIPE = {"quantized_ops": "weighted", "act_observer": "robust_histogram", "bias_correction": True}
# Peak RSS of a whole model run per parameter, the most measured here: vit_b_16 3.3 GB for 86 M parameters
# (40 B), convnext_base 4.7 GB for 89 M (53 B), ~1 GB of each imports and kernels. It holds the FP32 model,
# two prepared copies, their INT8 / reference / ONNX lowerings, the PT2E and FX copies.
BYTES_PER_PARAM = 55


@dataclasses.dataclass
class Settings:
    image_size: int = 64
    batch: int = 8
    calib_batches: int = 4
    parity_batches: int = 2
    threads: int = 1
    max_params: float = 350e6
    runtimes: tuple[str, ...] = RUNTIMES


class Recorder:
    """Runs named steps of one model's record: times them, keeps each one's exception (then returns
    None), records the peak RSS so far and hands the record to ``save`` before every step."""

    def __init__(self, rec: dict, save=None) -> None:
        self.rec, self.save = rec, save or (lambda rec: None)

    def __call__(self, step: str, fn, *args, **kwargs):
        self.rec["current_step"] = step
        self.save(self.rec)
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            frames = traceback.extract_tb(e.__traceback__)
            where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else ""
            self.rec["errors"].append({"step": step, "type": type(e).__name__, "message": str(e), "where": where})
            return None
        finally:
            self.rec["timings_s"][step] = round(time.perf_counter() - start, 3)
            self.rec["peak_rss_mb"] = zm.peak_rss_mb()

    def error(self, step: str) -> dict | None:
        return next((e for e in self.rec["errors"] if e["step"] == step), None)


# -- fxptqat ----------------------------------------------------------------------------------------
def parity_record(report) -> dict:
    return {
        "parity_ok": bool(report.ok), "coverage": float(report.coverage), "compared": len(report.rows),
        "weighted_nodes": len(report.rows) + len(report.not_compared),
        "not_compared": [list(t) for t in report.not_compared], "first_divergence": report.first_divergence,
        "output_ok": bool(report.output_ok), "output_max_abs": float(report.output_max_abs),
        "top1_agreement": report.top1_agreement,
        "diverging_ops": list(getattr(report, "diverging_ops", ())),  # extra, not in the documented API
    }


def _prepare(step: Recorder, model, calib, suffix: str = "", **options):
    """``prepare`` + ``calibrate``; a ``TraceError`` is kept as the user sees it."""
    import fxptqat as fq

    rec = step.rec
    qat = step("prepare" + suffix, fq.prepare, model, calib[0],
               config=fq.QuantConfig(weight_bits=8, act_bits=8, **options))
    error = step.error("prepare" + suffix)
    if error is not None and error["type"] == "TraceError" and rec["trace_error"] is None:
        rec["traced"] = False
        says = any(k in error["message"] for k in ("leaf_modules", "concrete_args", "QuantConfig("))
        rec["trace_error"] = {"message": error["message"], "says_what_to_do": says}
    if qat is None:
        return None
    rec["traced"] = True
    step("calibrate" + suffix, fq.calibrate, qat, calib)
    return None if step.error("calibrate" + suffix) else qat


def _lower_and_check(step: Recorder, runtime: str, qat, calib, parity_batches, x, ref, **options) -> None:
    import fxptqat as fq

    lowered = step(f"lower_{runtime}", fq.lower, qat, runtime=runtime, **options)
    if lowered is None:
        return
    out = {"cosine_vs_fp32": None}
    report = step(f"parity_{runtime}", fq.check_parity, qat, lowered, parity_batches)
    if report is not None:
        out.update(parity_record(report))
    y = step(f"eval_{runtime}", zm.evaluate, lowered, x)
    out["cosine_vs_fp32"] = None if y is None else zm.cosine(ref, y)
    step.rec["runtimes"][runtime] = out


def run_fxptqat(step: Recorder, s: Settings, model, calib, x, ref) -> None:
    import fxptqat as fq
    from fxptqat.lowering import exact_u8s8_kernels

    rec, parity_batches = step.rec, calib[: s.parity_batches]
    # the default recipe (measure_error, selection, the torch runtime, torch.compile's graph breaks)
    # runs with runtime "torch"; --runtimes without it measures the weighted recipe alone
    qat = _prepare(step, model, calib) if "torch" in s.runtimes else None
    if qat is not None:
        report = step("measure_error", fq.measure_error, qat, calib)
        sel = None if report is None else step("select_trainable", fq.select_trainable, qat, report,
                                                policy=fq.Adaptive())
        if sel is not None:
            rec["selection"] = {"theta": sel.theta, "trainable": len(sel.trainable), "frozen": len(sel.frozen)}
        y = step("eval_fake_quant", zm.evaluate, qat, x)
        rec["fidelity"]["fxptqat_fake_quant"] = None if y is None else zm.cosine(ref, y)
        if "torch" in s.runtimes:
            _lower_and_check(step, "torch", qat, calib, parity_batches, x, ref)
            rec["fidelity"]["fxptqat"] = (rec["runtimes"].get("torch") or {}).get("cosine_vs_fp32")
        rec["dynamo"] = step("dynamo_explain", graph_breaks, qat, calib[0])
    others = [r for r in s.runtimes if r != "torch"]
    # the weighted recipe with PT2E's activation-range search (X86InductorQuantizer's HistogramObserver's)
    # on robust per-sample weights, and empirical bias correction
    weighted = dict(WEIGHTED_RECIPE)
    rec["weighted_recipe"] = weighted
    qat = _prepare(step, model, calib, "_weighted", **weighted) if others else None
    for runtime in others if qat is not None else ():
        extra = {"threads": s.threads} if runtime == "onnxruntime" else {}
        if runtime == "inductor" and not exact_u8s8_kernels():
            # oneDNN saturates 8-bit weights on full-range activations without AVX-512 VNNI and
            # lower() refuses them: this CPU's inductor lowering runs 7-bit activations
            rec["inductor_reduce_range"] = True
            qat = _prepare(step, model, calib, "_weighted_reduce_range", reduce_range=True, **weighted)
            if qat is None:
                continue
        _lower_and_check(step, runtime, qat, calib, parity_batches, x, ref, example_inputs=calib[0], **extra)


def graph_breaks(qat, args) -> dict:
    """``torch._dynamo.explain`` of the QAT graph in train mode (what ``torch.compile`` of a QAT step
    traces), on a copy: a forward in train mode updates BatchNorm statistics."""
    import copy

    work = copy.deepcopy(qat).train()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(work)(*args)
    return {"graph_breaks": explained.graph_break_count, "graphs": explained.graph_count,
            "reasons": [str(b.reason)[:300] for b in explained.break_reasons][:5]}


# -- one model --------------------------------------------------------------------------------------
def new_record(name: str) -> dict:
    return {"model": name, "source": zm.source_of(name), "status": "running", "params": None, "image_size": None,
            "traced": None, "trace_error": None, "selection": None, "signal": None, "runtimes": {}, "dynamo": None,
            "fidelity": {"fxptqat": None, "fxptqat_fake_quant": None, "pt2e": None, "fx_default": None},
            "timings_s": {}, "errors": [], "peak_rss_mb": None, "current_step": None}


def run_model(name: str, s: Settings, save=None) -> dict:
    """One model's record; never raises (each step's exception is recorded)."""
    torch.set_num_threads(s.threads)
    zm.reset_peak_rss()
    rec = new_record(name)
    step, start = Recorder(rec, save), time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        built = step("build", zm.build, name, s.image_size)
        if built is not None:
            _run_built(step, s, *built)
    if rec["status"] == "running":
        rec["status"] = "errors" if rec["errors"] else "ok"
    rec["timings_s"]["total"] = round(time.perf_counter() - start, 3)
    rec["current_step"] = None
    step.save(rec)
    return rec


def _run_built(step: Recorder, s: Settings, model, source: str, size: int) -> None:
    rec = step.rec
    rec["params"], rec["image_size"] = sum(p.numel() for p in model.parameters()), size
    if rec["params"] > s.max_params:
        rec["status"] = "skipped"
        rec["skip_reason"] = (f"{rec['params'] / 1e6:.0f} M parameters > --max-params {s.max_params / 1e6:.0f} M: "
                              f"estimated peak memory {rec['params'] * BYTES_PER_PARAM / 2**30:.0f} GiB "
                              f"({BYTES_PER_PARAM} bytes per parameter, the most measured on smaller models)")
        return
    data = zm.benchmark_data(s.batch, size, s.calib_batches)
    calib, x = data["calib"], data["x"]
    rec["signal"] = step("give_signal", zm.give_signal, model, data["signal"])
    ref = step("eval_fp32", zm.evaluate, model, x)
    if ref is None:
        rec["status"] = "failed"
        return
    if rec["signal"] is not None:
        rec["signal"]["logit_norm_spread"] = step("fp32_conditioning", zm.logit_norm_spread, model, [*calib, (x,)])
    ref = zm.logits(ref)
    run_fxptqat(step, s, model, calib, x, ref)
    for peer, fn in zm.PEERS.items():
        y = step(peer, fn, model, calib, x)
        rec["fidelity"][peer] = None if y is None else zm.cosine(ref, y)


# -- the run ----------------------------------------------------------------------------------------
def run_isolated(name: str, s: Settings, timeout: float, workdir: str) -> dict:
    """``run_model`` in a fresh process; a crash or timeout keeps its last saved partial record."""
    out, log = Path(workdir) / "record.json", Path(workdir) / "child.log"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--child", name, "--child-out", str(out), "--image-size", str(s.image_size),
           "--threads", str(s.threads), "--max-params", str(s.max_params), "--calib-batches", str(s.calib_batches),
           "--parity-batches", str(s.parity_batches), "--runtimes", ",".join(s.runtimes)]
    env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": "1", "OMP_NUM_THREADS": str(s.threads)}
    with log.open("w") as f:
        child = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = "timeout"
        finally:
            if child.poll() is None:  # timed out, or Ctrl-C in the parent: end the child's group
                os.killpg(child.pid, 9)
                child.wait()
    rec = json.loads(out.read_text()) if out.exists() else new_record(name)
    if code != 0:
        how = (f"timed out after {timeout:g} s" if code == "timeout" else
               f"exit code {code}" + (" (SIGKILL: the kernel's OOM killer?)" if code == -9 else ""))
        rec.update(status="timeout" if code == "timeout" else "crashed",
                   log_tail=log.read_text(errors="replace").splitlines()[-15:])
        rec["errors"].append({"step": rec["current_step"], "type": "timeout" if code == "timeout" else "crash",
                              "message": f"{how} during step {rec['current_step']!r}", "where": ""})
    return rec


def run_zoo(models: list[str], s: Settings, *, json_path: Path | None = None, isolate: bool = False,
            timeout: float = 1800.0, resume: bool = False, command: str = "", label: str = "") -> tuple[list[dict], dict]:
    """Run ``models`` (in order), rewriting ``json_path`` after each; returns ``(records, meta)``."""
    torch.set_num_threads(s.threads)
    records = []
    if resume and json_path is not None and json_path.exists():
        records = [r for r in json.loads(json_path.read_text())["records"] if r["model"] in models]
    todo = [m for m in models if m not in {r["model"] for r in records}]
    meta = {"command": command, **dataclasses.asdict(s), "isolated": isolate, "timeout_s": timeout if isolate else None,
            "cpu": zm.lscpu_model(), "cpus": os.cpu_count(), "versions": zm.versions(), "started": time.ctime(),
            "fxptqat": zm.fxptqat_source(), "label": label}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fxptqat-zoo-") as workdir:
        for i, name in enumerate(todo):
            print(f"[{i + 1}/{len(todo)}] {name}", file=sys.stderr, flush=True)
            rec = run_isolated(name, s, timeout, workdir) if isolate else run_model(name, s)
            records.append(rec)
            meta["runtime_s"] = round(time.perf_counter() - start, 1)
            if json_path is not None:  # via a temporary file: a Ctrl-C never leaves half a JSON
                json_path.parent.mkdir(parents=True, exist_ok=True)
                tmp = json_path.with_suffix(".tmp")
                tmp.write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
                tmp.replace(json_path)
            errors = "; ".join(f"{e['step']}: {e['type']}" for e in rec["errors"])
            print(f"    {rec['status']} in {rec['timings_s'].get('total', '?')} s {errors}", file=sys.stderr,
                  flush=True)
    return records, meta


# -- report -----------------------------------------------------------------------------------------
def _parity_cell(rec: dict, runtime: str) -> str:
    for step in (f"lower_{runtime}", f"parity_{runtime}"):
        if (error := next((e for e in rec["errors"] if e["step"] == step), None)) is not None:
            return f"{step.split('_')[0]}: {error['type']}"
    r = rec["runtimes"].get(runtime)
    if r is None or "parity_ok" not in r:
        return "-"
    if r["parity_ok"]:
        verdict = "ok"
    elif r["first_divergence"]:
        verdict = f"DIVERGES at `{r['first_divergence']}`"
    elif r.get("diverging_ops"):
        verdict = f"DIVERGES at op `{r['diverging_ops'][0]}`"
    else:
        verdict = f"output off (max {r['output_max_abs']:.2g})" if not r["output_ok"] else "not ok"
    return f"{verdict}, {r['compared']}/{r['weighted_nodes']}"


def _cos(c: dict | None) -> str:
    return "-" if c is None else f"{c['cosine_mean']:.4f}"


def _traced_cell(rec: dict) -> str:
    if rec["status"] == "skipped" or rec["traced"]:
        return "skipped" if rec["status"] == "skipped" else "yes"
    if rec["traced"] is False:
        return "no: TraceError" + (" (says what to do)" if rec["trace_error"]["says_what_to_do"] else " (no fix given)")
    return f"- ({rec['errors'][0]['step']}: {rec['errors'][0]['type']})" if rec["errors"] else "-"


def full_parity(rec: dict, runtimes) -> bool:
    rts = [rec["runtimes"].get(k) or {} for k in runtimes]
    return all(r.get("parity_ok") and r.get("coverage") == 1.0 for r in rts)


def _vs_pt2e(records: list[dict], what: str, ours) -> list[str]:
    gaps = sorted((ours(r)["cosine_mean"] - r["fidelity"]["pt2e"]["cosine_mean"], r["model"])
                  for r in records if ours(r) and r["fidelity"]["pt2e"])
    if not gaps:
        return []
    return [f"- {what} cosine >= PT2E's: {sum(g >= 0 for g, _ in gaps)}/{len(gaps)} models with both; "
            f"worst gap {gaps[0][0]:+.4f} ({gaps[0][1]})."]


def summary(records: list[dict], runtimes) -> list[str]:
    traced = [r for r in records if r["traced"]]
    lines = [f"- {len(records)} models: {len(traced)} traced by fxptqat, "
             f"{sum(r['traced'] is False for r in records)} TraceError, "
             f"{sum(r['status'] == 'skipped' for r in records)} skipped, "
             f"{sum(r['status'] in ('crashed', 'timeout', 'failed') for r in records)} crashed, timed out or failed.",
             f"- Parity ok on every runtime ({', '.join(runtimes)}) at full coverage: "
             f"{sum(full_parity(r, runtimes) for r in traced)}/{len(traced)} traced models."]
    explained = [r["dynamo"] for r in traced if r.get("dynamo")]
    if explained:
        lines.append(f"- torch.compile of the QAT graph (train mode, `torch._dynamo.explain`): "
                     f"{sum(d['graph_breaks'] == 0 for d in explained)}/{len(explained)} models without a graph break"
                     + "".join(f"; {r['model']}: {r['dynamo']['graph_breaks']} ({r['dynamo']['reasons'][:1]})"
                               for r in traced if r.get("dynamo") and r["dynamo"]["graph_breaks"]) + ".")
    errors = collections.Counter(f"{e['step']}: {e['type']}" for r in records for e in r["errors"])
    lines.append("- Errors (step: type x models): " + (", ".join(f"{k} x{n}" for k, n in errors.most_common()) or "none"))
    lines += _vs_pt2e(traced, "fxptqat INT8 (default recipe, runtime torch)", lambda r: r["fidelity"]["fxptqat"])
    for rt in (r for r in runtimes if r != "torch"):
        reduced = sum(bool(r.get("inductor_reduce_range")) and bool(r["runtimes"].get(rt)) for r in traced)
        what = f"fxptqat weighted recipe on {rt}" + (
            f" (7-bit activations, `reduce_range=True`, on {reduced} models: their CPU has no AVX-512 VNNI)"
            if rt == "inductor" and reduced else "")
        lines += _vs_pt2e(traced, what, lambda r, rt=rt: (r["runtimes"].get(rt) or {}).get("cosine_vs_fp32"))
    return lines


def markdown(records: list[dict], meta: dict) -> str:
    runtimes = meta.get("runtimes", RUNTIMES)
    lines = [
        "# Model zoo: fxptqat W8A8 on torchvision and timm architectures (random weights, CPU)", "",
        f"`{meta['command']}`: {meta['image_size']} px inputs (larger where an architecture needs it), "
        f"batch {meta['batch']}, {meta['calib_batches']} calibration batches, parity on {meta['parity_batches']}, "
        f"{meta['threads']} thread(s), {meta.get('runtime_s', 0):.0f} s, on {meta['cpu']}. "
        "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".", "",
        "Parity: verdict, compared/weighted nodes (coverage); torch lowers the default recipe, onnxruntime "
        "(ort) and inductor the `quantized_ops=\"weighted\"` one (inductor with `reduce_range=True` on a CPU "
        "without AVX-512 VNNI, where lower() refuses 8-bit weights with full-range activations). Fidelity: mean cosine of the logits to "
        "FP32 over 8 random images: fxptqat's INT8 (runtime torch, its fake-quant graph in brackets), its "
        "weighted recipe as lowered for onnxruntime / inductor (PT2E's recipe), the peers.", "",
        "| model | params M | traced? | " + " | ".join(f"parity {r.replace('onnxruntime', 'ort')}" for r in runtimes)
        + " | fxptqat (fake-quant) | fxptqat weighted ort / inductor | pt2e | fx default | s | errors |",
        "|---" * (9 + len(runtimes)) + "|",
    ]
    for rec in records:
        f = rec["fidelity"]
        params = "-" if rec["params"] is None else f"{rec['params'] / 1e6:.1f}"
        errors = "; ".join(f"{e['step']}: {e['type']}" for e in rec["errors"]) or rec.get("skip_reason", "")
        weighted = " / ".join(_cos((rec["runtimes"].get(r) or {}).get("cosine_vs_fp32"))
                              for r in runtimes if r != "torch")
        lines.append(f"| {rec['model']} | {params} | {_traced_cell(rec)} | "
                     + " | ".join(_parity_cell(rec, r) for r in runtimes)
                     + f" | {_cos(f['fxptqat'])} ({_cos(f['fxptqat_fake_quant'])}) | {weighted} | {_cos(f['pt2e'])} "
                     f"| {_cos(f['fx_default'])} | {rec['timings_s'].get('total', 0):.0f} | {errors} |")
    return "\n".join([*lines, "", "Summary:", "", *summary(records, runtimes)]) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"{', '.join(QUICK)} at 32 px")
    p.add_argument("--models", help="comma-separated names (timm ones as timm/NAME); default: all")
    p.add_argument("--json", type=Path, help="default benchmarks/results/zoo.json (--quick: in the temp dir)")
    p.add_argument("--md", type=Path, help="default: beside --json")
    p.add_argument("--report-only", action="store_true", help="only rebuild --md from --json")
    p.add_argument("--image-size", type=int, help="default 64 (--quick: 32)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calib-batches", type=int, default=4)
    p.add_argument("--parity-batches", type=int, default=2)
    p.add_argument("--runtimes", default=",".join(RUNTIMES), help="comma-separated subset of " + ",".join(RUNTIMES))
    p.add_argument("--max-params", type=float, default=350e6, help="skip (and record) larger models")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per model (subprocess mode)")
    p.add_argument("--in-process", action="store_true", help="no subprocess per model (and no timeout)")
    p.add_argument("--resume", action="store_true", help="keep the models already in --json")
    p.add_argument("--label", default="", help="a note stored in the JSON (e.g. which fxptqat snapshot)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.json = args.json or (Path(tempfile.gettempdir()) / "zoo_quick.json" if args.quick else RESULTS / "zoo.json")
    args.md = args.md or args.json.with_suffix(".md")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    s = Settings(image_size=args.image_size or (32 if args.quick else 64), calib_batches=args.calib_batches,
                 parity_batches=args.parity_batches, threads=args.threads, max_params=args.max_params,
                 runtimes=tuple(args.runtimes.split(",")))
    if args.child:
        run_model(args.child, s, save=lambda rec: args.child_out.write_text(json.dumps(rec)))
        return 0
    if not args.report_only:
        models = args.models.split(",") if args.models else list(QUICK) if args.quick else zm.all_models()
        command = "python benchmarks/zoo.py " + " ".join(sys.argv[1:] if argv is None else argv)
        run_zoo(models, s, json_path=args.json, isolate=not args.in_process, timeout=args.timeout,
                resume=args.resume, command=command, label=args.label)
    data = json.loads(args.json.read_text())
    md = markdown(data["records"], data["meta"])
    args.md.parent.mkdir(parents=True, exist_ok=True)
    args.md.write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
