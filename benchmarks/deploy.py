"""Deployment benchmark: fxptqat's INT8 lowering against FP32 and against peer INT8 paths on CPU.

    python benchmarks/deploy.py [--quick] [--json PATH] [--md PATH]

For each model (ResNet-18, MobileNetV2, a small ViT; see ``deploy_models.py``) and batch size
(1 and 32, 64x64 inputs) it times, in one process with ``torch.set_num_threads(2)``:

=====================  ========================================================================
fp32_eager             the float model, eager
fp32_compile           ``torch.compile`` (inductor, ``freezing=True``, static shapes)
fxptqat_int8           ``fq.lower()`` of ``fq.prepare`` + ``fq.calibrate`` (W8A8, x86 engine)
fxptqat_int8_onnx...   ``fq.lower(runtime="onnxruntime")`` of the same calibrated graph: fxptqat's
                       own scales exported as an ONNX QDQ model, run by onnxruntime
fxptqat_int8_onnx...   the same lowering of a graph calibrated with
_weighted              ``QuantConfig(quantized_ops="weighted")`` (only conv/linear inputs and
                       weights quantized, outputs that no conv/linear reads stay float: the
                       recipe of X86InductorQuantizer); onnxruntime then runs transformers'
                       GELU, layer norm and softmax in float and the linears as integer GEMMs
fxptqat_int8_inductor  ``fq.lower(runtime="inductor")`` of a graph calibrated with the
                       ``"weighted"`` recipe: its reference QDQ graph compiled by
                       ``torch.compile`` (inductor, freezing, static shapes)
pt2e_inductor_int8     torchao PT2E + ``X86InductorQuantizer`` + ``torch.compile`` (freezing)
ort_int8               ONNX export of the float model + onnxruntime ``quantize_static`` (QDQ,
                       per-channel s8 weights, u8 activations, MinMax), CPU execution provider
=====================  ========================================================================

All INT8 paths calibrate on the same batches (8 x 8 random images). fxptqat's models are also checked
against their fake-quant graph (``fq.check_parity``; recorded as ``parity_ok``).

Timing: warm-up, then ``repeats`` rounds (20 at batch 32, 60 at batch 1; ``--quick``: 5 and 15).
In each round every backend runs once, interleaved, so that load from other processes hits all
backends alike; each timed run is preceded by a 20 ms pause (``--pause-ms``: onnxruntime's worker
threads spin after a run and, without it, made the next backend's batch-1 time up to 2x slower) and
one untimed run of the same backend (``--cold`` drops it), so it sees its weights in cache as in
back-to-back serving rather than after the other backends evicted them. Reported: median and
interquartile range per backend; ratios to ``fp32_eager`` and to the fastest peer INT8 path of the
same model and batch.
torch's oneDNN quantized conv (x86 engine) fixes its primitive cache on the first call's shape,
so the fxptqat model is timed per batch size on a fresh copy (``copy.deepcopy`` repacks)
whose first call is at that batch size (``check_parity`` works on a copy).

Allocator (``--no-malloc-tuning`` turns this off): glibc hands large freed blocks back to the
kernel (``mmap`` threshold, heap trimming), so a compiled graph whose buffers are allocated per call
can re-fault them on every run, depending on what the process allocated before. Scratch harnesses
built from this file's builders saw thousands of minor page faults per ViT batch-32 run and
process-dependent medians (see the issue note); this script's own runs show few either way
(``minor_faults_per_run`` is recorded per backend). The timing process sets ``M_MMAP_THRESHOLD`` =
32 MiB and ``M_TRIM_THRESHOLD`` = 1 GiB (``mallopt``) for every backend alike, as a server would
(or preload jemalloc/tcmalloc), so that allocation history cannot decide a ranking.

Size (``size_bytes``): the serialized artifact one would ship. Torch modules: ``torch.save`` of
the state dict (for torch.ao INT8 modules it holds the int8 packed weights and their qparams);
the PT2E model: ``torch.save`` of the tensors its graph reads (``get_attr`` constants: int8 weights,
scales, biases; its state dict also holds the dead float weights); ORT and fxptqat's onnxruntime
lowering: the ``.onnx`` file; fxptqat's inductor lowering: ``torch.save`` of its weights as int8
(what freezing folds them to) plus the float rest (biases, norms, qparams).

Memory (``peak_rss_mb``): one fresh subprocess per model measures every backend in turn. Per
backend it first runs the same flow on a tiny model of the same layer types (lazy imports, kernel
set-up and the compiler itself then belong to the baseline), drops it and takes ``base`` (VmRSS
after ``gc.collect`` + ``malloc_trim``); then builds the backend from the float model (ORT loads the
quantized ``.onnx`` the parent wrote), runs each batch size (ascending), resets the kernel's RSS
high-water mark (``/proc/self/clear_refs`` = 5) and runs 3 inferences. ``peak_rss_mb = VmHWM -
base``: what the model holds resident (weights, caches, what its build left alive, e.g. the float
weights the PT2E module keeps and the QAT graph torch.ao's module cache keeps for fxptqat) plus the
inference working set. ``resident_model_mb``: the same before inference.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import dataclasses
import gc
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from deploy_models import build  # noqa: E402

BACKENDS = ("fp32_eager", "fp32_compile", "fxptqat_int8", "fxptqat_int8_onnxruntime",
            "fxptqat_int8_onnxruntime_weighted", "fxptqat_int8_inductor",
            "pt2e_inductor_int8", "ort_int8")
OURS = ("fxptqat_int8", "fxptqat_int8_onnxruntime", "fxptqat_int8_onnxruntime_weighted", "fxptqat_int8_inductor")
PEERS = ("pt2e_inductor_int8", "ort_int8")
MODELS = ("resnet18", "mobilenetv2", "vit")
CNNS = ("resnet18", "mobilenetv2")
RESULTS = Path(__file__).resolve().parent / "results"


# -- backends ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class Backend:
    name: str
    run: Callable[[torch.Tensor], object] | None = None
    size_bytes: int | None = None
    status: str = "ok"
    reason: str | None = None
    info: dict = dataclasses.field(default_factory=dict)
    keep: list = dataclasses.field(default_factory=list)  # objects the run closure needs alive
    # A fresh runner per batch size, for models whose first call fixes a fast path (see build_fxptqat).
    fresh: Callable[[], Callable[[torch.Tensor], object]] | None = None

    def for_batch(self) -> Backend:
        if self.fresh is None or self.status != "ok":
            return self
        return dataclasses.replace(self, run=self.fresh(), info=self.info)


def _state_dict_bytes(module: torch.nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return buf.tell()


def _graph_constants_bytes(gm: torch.fx.GraphModule) -> int:
    tensors = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = gm
            for part in node.target.split("."):
                value = getattr(value, part)
            if isinstance(value, torch.Tensor):
                tensors[node.target] = value
    buf = io.BytesIO()
    torch.save(tensors, buf)
    return buf.tell()


def _no_grad(fn):
    def run(x):
        with torch.inference_mode():
            return fn(x)
    return run


def _inductor_config() -> None:
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # constant-fold weights, prepack for oneDNN (INT8 needs it)


def build_fp32_eager(ctx) -> Backend:
    model = ctx.model
    return Backend("fp32_eager", _no_grad(model), _state_dict_bytes(model), keep=[model])


def build_fp32_compile(ctx) -> Backend:
    _inductor_config()
    model = ctx.model
    compiled = torch.compile(model, backend="inductor", dynamic=False)
    return Backend("fp32_compile", _no_grad(compiled), _state_dict_bytes(model), keep=[model, compiled])


def _fxptqat_calibrated(ctx, **options):
    import fxptqat as fq

    config = fq.QuantConfig(weight_bits=8, act_bits=8, **{**ctx.fxptqat_options, **options})
    qat = fq.prepare(ctx.model, ctx.calib[0], config=config)
    fq.calibrate(qat, ctx.calib)
    return qat


def _parity_info(qat, lowered, ctx) -> dict:
    import fxptqat as fq

    parity = fq.check_parity(qat, lowered, ctx.calib[:2])  # on a copy: `lowered` keeps its caches
    return {"parity_ok": parity.ok, "parity_first_divergence": parity.first_divergence,
            "parity_output_max_abs": parity.output_max_abs}


def build_fxptqat(ctx) -> Backend:
    import fxptqat as fq

    qat = _fxptqat_calibrated(ctx)
    int8 = fq.lower(qat)
    size = _state_dict_bytes(int8)
    if not ctx.parity:  # never called yet: serve it as is (the memory child does)
        return Backend("fxptqat_int8", _no_grad(int8), size, keep=[int8])
    # torch's oneDNN quantized conv (x86 engine) builds its primitive cache once, for the shape of the
    # first call: a model first run at another batch size runs batch 1 about 2x slower. So each batch
    # size times its own copy (deepcopy repacks), first called at that size.
    info = _parity_info(qat, int8, ctx)

    def fresh():
        return _no_grad(copy.deepcopy(int8))

    return Backend("fxptqat_int8", fresh(), size, info=info, keep=[int8], fresh=fresh)


def build_fxptqat_ort(ctx, quantized_ops: str = "all") -> Backend:
    import fxptqat as fq

    qat = _fxptqat_calibrated(ctx, quantized_ops=quantized_ops)
    lowered = fq.lower(qat, runtime="onnxruntime", example_inputs=ctx.calib[0], threads=ctx.threads)
    info = _parity_info(qat, lowered, ctx) if ctx.parity else {}
    lowered.reference = None  # only check_parity reads it; the deployed artifact is the ONNX model
    name = "fxptqat_int8_onnxruntime" + ("" if quantized_ops == "all" else f"_{quantized_ops}")
    # called as the ORT peer is: no torch autograd mode around it (inference_mode costs ~20 us a call)
    return Backend(name, lowered, lowered.size_bytes, info=info, keep=[lowered])


def build_fxptqat_inductor(ctx) -> Backend:
    import fxptqat as fq

    # PT2E's recipe: conv/linear quantized, the rest float (inductor fuses it)
    qat = _fxptqat_calibrated(ctx, quantized_ops="weighted")
    lowered = fq.lower(qat, runtime="inductor", example_inputs=ctx.calib[0])
    info = _parity_info(qat, lowered, ctx) if ctx.parity else {}
    return Backend("fxptqat_int8_inductor", lowered, lowered.size_bytes, info=info, keep=[lowered])


def build_pt2e(ctx) -> Backend:
    _inductor_config()
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    batch = torch.export.Dim("batch", min=1, max=4096)
    exported = torch.export.export(ctx.model, ctx.calib[0], dynamic_shapes=({0: batch},)).module()
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for args in ctx.calib:
            prepared(*args)
    converted = convert_pt2e(prepared)
    size = _graph_constants_bytes(converted)
    compiled = torch.compile(converted, backend="inductor", dynamic=False)
    return Backend("pt2e_inductor_int8", _no_grad(compiled), size, keep=[converted, compiled])


def build_ort(ctx) -> Backend:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    tmp = Path(ctx.workdir)
    float_path, pre_path, int8_path = tmp / f"{ctx.name}.onnx", tmp / f"{ctx.name}.pre.onnx", tmp / f"{ctx.name}.int8.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            ctx.model, ctx.calib[0], str(float_path), input_names=["x"], output_names=["y"],
            dynamo=True, external_data=False, dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
        )
    quant_pre_process(str(float_path), str(pre_path))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"x": a[0].numpy()} for a in ctx.calib])

        def get_next(self):
            return next(self.it, None)

    quantize_static(
        str(pre_path), str(int8_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
    )
    b = Backend("ort_int8", ort_runner(str(int8_path), ctx.threads), int8_path.stat().st_size)
    b.info["onnx_path"] = str(int8_path)
    return b


def ort_runner(path: str, threads: int) -> Callable:
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])

    def run(x):
        return session.run(None, {"x": np.ascontiguousarray(x.numpy())})[0]

    return run


BUILDERS = {
    "fp32_eager": build_fp32_eager,
    "fp32_compile": build_fp32_compile,
    "fxptqat_int8": build_fxptqat,
    "fxptqat_int8_onnxruntime": build_fxptqat_ort,
    "fxptqat_int8_onnxruntime_weighted": lambda ctx: build_fxptqat_ort(ctx, "weighted"),
    "fxptqat_int8_inductor": build_fxptqat_inductor,
    "pt2e_inductor_int8": build_pt2e,
    "ort_int8": build_ort,
}


@dataclasses.dataclass
class Context:
    name: str
    model: torch.nn.Module
    calib: list  # list of 1-tuples
    workdir: str
    threads: int
    parity: bool = True
    fxptqat_options: dict = dataclasses.field(default_factory=dict)


def make_context(name: str, image_size: int, calib_batches: int, calib_size: int, workdir: str,
                 threads: int, parity: bool = True, tiny: bool = False) -> Context:
    model = build(name, image_size, tiny=tiny)
    gen = torch.Generator().manual_seed(1)
    calib = [(torch.randn(calib_size, 3, image_size, image_size, generator=gen),) for _ in range(calib_batches)]
    return Context(name, model, calib, workdir, threads, parity)


def safe_build(backend: str, ctx: Context) -> Backend:
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            b = BUILDERS[backend](ctx)
    except Exception as e:  # a peer that cannot run is reported, not dropped
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
        log(f"  {backend}: FAILED to build ({reason})")
        if os.environ.get("DEPLOY_DEBUG"):
            traceback.print_exc()
        return Backend(backend, status="failed", reason=reason)
    b.info["build_s"] = round(time.perf_counter() - start, 2)
    return b


def inputs(image_size: int, batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(2))


def warm(b: Backend, x: torch.Tensor, n: int) -> None:
    """Warm-up; the first call compiles for this shape. A backend failing here is marked failed."""
    if b.status != "ok":
        return
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(n):
                b.run(x)
    except Exception as e:
        b.status, b.reason = "failed", f"{type(e).__name__} at run: {str(e).strip()[:300]}"
        log(f"  {b.name}: FAILED at run ({b.reason})")
        if os.environ.get("DEPLOY_DEBUG"):
            traceback.print_exc()
    b.info.setdefault("warmup_s", {})[int(x.shape[0])] = round(time.perf_counter() - start, 2)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)


def tune_malloc() -> dict | None:
    """Keep freed memory in the process (see the module docstring); None where glibc is absent."""
    settings = {"mmap_threshold": 32 << 20, "trim_threshold": 1 << 30}
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(M_MMAP_THRESHOLD, settings["mmap_threshold"]) == 1
        ok = libc.mallopt(M_TRIM_THRESHOLD, settings["trim_threshold"]) == 1 and ok
    except (OSError, AttributeError):
        return None
    return settings if ok else None


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_interleaved(backends: list[Backend], x: torch.Tensor, repeats: int, *, rewarm: bool = True,
                     pause_s: float = 0.0, faults: dict[str, int] | None = None) -> dict[str, list[float]]:
    """``repeats`` rounds; in each, every backend runs once (timed). With ``rewarm`` an untimed run
    comes first, so the timed one finds its weights in cache as in back-to-back serving, instead of
    after the other backends evicted them. ``pause_s`` before each backend lets the previous one's
    worker threads stop spinning (onnxruntime's pool spins after a run and would steal a core)."""
    times: dict[str, list[float]] = {b.name: [] for b in backends if b.status == "ok"}
    live = [b for b in backends if b.status == "ok"]
    for _ in range(repeats):
        for b in live:
            if pause_s:
                time.sleep(pause_s)
            if rewarm:
                b.run(x)
            before = _minor_faults()
            start = time.perf_counter()
            b.run(x)
            times[b.name].append((time.perf_counter() - start) * 1e3)
            if faults is not None:
                faults[b.name] = faults.get(b.name, 0) + _minor_faults() - before
    return times


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 4:
        m = statistics.median(values)
        return min(values), m, max(values)
    q = statistics.quantiles(values, n=4)
    return q[0], statistics.median(values), q[2]


# -- memory (subprocess) ----------------------------------------------------------------------------
def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _trim() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def memory_child(spec: dict) -> dict:
    """Runs in a fresh process; for each backend in turn: ``{"peak_rss_mb": {batch: MB}, ...}``.

    Per backend, ``base`` is the resident set after (1) the same flow has run once on a tiny model of
    the same layer types (``deploy_models.TINY``), so lazy imports, kernel set-up and, for
    torch.compile, the compiler itself are in ``base``, not in the model's figure; and (2) the
    previous backends were dropped. Then the backend is built, warmed up and run; ``peak_rss_mb`` is
    ``VmHWM - base`` over 3 runs, after the kernel's high-water mark was reset. ORT loads the
    quantized ``.onnx`` file the parent wrote, as a deployment would.
    """
    torch.set_num_threads(spec["threads"])
    xs = dict(sorted((b, inputs(spec["image_size"], b)) for b in spec["batches"]))  # ascending:
    # ORT's arena only grows, torch frees per call

    def context(tiny: bool) -> Context:
        return make_context(spec["model"], spec["image_size"], spec["calib_batches"], spec["calib_size"],
                            spec["workdir"], spec["threads"], parity=False, tiny=tiny)

    results = {}
    for backend in spec["backends"]:
        if backend == "ort_int8":
            if spec["onnx_path"] is None:
                results[backend] = {"status": "failed", "reason": "no quantized .onnx file (ORT build failed)"}
                continue
            import onnxruntime  # noqa: F401
        else:
            warmup = safe_build(backend, context(tiny=True))
            for x in xs.values():
                warm(warmup, x, 1)
            del warmup
            _release()
        _trim()
        base = _rss_kb("VmRSS")
        if backend == "ort_int8":
            b = Backend(backend, ort_runner(spec["onnx_path"], spec["threads"]))
        else:  # the float model is made, quantized and compiled here; an INT8 flow then drops it
            b = safe_build(backend, context(tiny=spec["tiny"]))
        out = results[backend] = {"status": b.status, "reason": b.reason, "base_mb": round(base / 1024, 1),
                                  "peak_rss_mb": {}, "resident_model_mb": {}}
        if b.status == "ok":
            for batch, x in xs.items():  # one model serves every batch (no per-batch copies here)
                warm(b, x, 2)
                _trim()
                loaded = _rss_kb("VmRSS")
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset VmHWM to the current RSS
                for _ in range(3):
                    b.run(x)
                out["peak_rss_mb"][batch] = round((_rss_kb("VmHWM") - base) / 1024, 1)
                out["resident_model_mb"][batch] = round((loaded - base) / 1024, 1)
        del b
        _release()
    return results


def _release() -> None:
    """Drop what earlier builds left behind, so that it is in the next ``base``, not counted twice."""
    # torch.ao's device cache keeps every module fxptqat prepared or converted alive
    from fxptqat.workarounds import release_device_cache

    release_device_cache()
    with contextlib.suppress(Exception):
        torch._dynamo.reset()
    _trim()


def measure_memory(model: str, args, workdir: str, onnx_path: str | None) -> dict:
    spec = {"model": model, "backends": args.memory_backends, "threads": args.threads, "image_size": args.image_size,
            "calib_batches": args.calib_batches, "calib_size": args.calib_size, "batches": args.batches,
            "workdir": workdir, "onnx_path": onnx_path, "tiny": args.tiny}
    try:
        proc = subprocess.run([sys.executable, __file__, "--memory-child", json.dumps(spec)],
                              capture_output=True, text=True, timeout=1800)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"memory child rc={proc.returncode}: {proc.stderr.strip()[-300:]}")
        results = json.loads(lines[-1])
    except Exception as e:
        results = {b: {"status": "failed", "reason": f"{type(e).__name__}: {e}"} for b in args.memory_backends}
    for b in args.backends:
        results.setdefault(b, {"status": "skipped", "reason": "not measured (--memory-backends)"})
    for r in results.values():
        for key in ("peak_rss_mb", "resident_model_mb"):
            r[key] = {int(k): v for k, v in r.get(key, {}).items()}
    return results


# -- driver -----------------------------------------------------------------------------------------
def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("torchao", "onnx", "onnxruntime", "onnxscript"):
        try:
            out[pkg] = __import__(pkg).__version__
        except Exception as e:
            out[pkg] = f"missing ({type(e).__name__})"
    return out


def machine() -> str:
    model, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    isa = [f for f in ("avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return f"{model}, {os.cpu_count()} CPUs ({', '.join(isa) or 'no VNNI/AMX'})"


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def run_model(name: str, args, workdir: str) -> list[dict]:
    log(f"[{name}] building backends")
    ctx = make_context(name, args.image_size, args.calib_batches, args.calib_size, workdir, args.threads,
                       tiny=args.tiny)
    backends = [safe_build(b, ctx) for b in args.backends]
    onnx_path = next((b.info.pop("onnx_path") for b in backends if "onnx_path" in b.info), None)
    for b in backends:
        if b.status == "ok":
            size = "size n/a" if b.size_bytes is None else f"{b.size_bytes / 1e6:.2f} MB"
            log(f"  {b.name}: built in {b.info['build_s']} s, {size}")
    records = []
    for batch in args.batches:
        x = inputs(args.image_size, batch)
        warmups = args.warmup if batch > 1 else args.warmup * 3
        live = [b.for_batch() for b in backends]
        for b in live:
            warm(b, x, warmups)
        repeats = args.repeats if batch > 1 else args.repeats * 3
        load_before = load_average()
        start = time.perf_counter()
        faults: dict[str, int] = {}
        times = time_interleaved(live, x, repeats, rewarm=not args.cold, pause_s=args.pause_ms / 1e3,
                                 faults=faults)
        log(f"[{name} b{batch}] {repeats} interleaved rounds in {time.perf_counter() - start:.1f} s, "
            f"load {load_before}")
        for b in live:
            rec = {"model": name, "batch": batch, "backend": b.name, "status": b.status,
                   "latency_ms": None, "size_bytes": b.size_bytes, "image_size": args.image_size,
                   "threads": args.threads, "repeats": repeats, "load_avg_1m": load_before}
            if b.status == "ok":
                q1, med, q3 = quartiles(times[b.name])
                rec.update(latency_ms=round(med, 3), latency_q1_ms=round(q1, 3), latency_q3_ms=round(q3, 3),
                           throughput_ips=round(batch / med * 1e3, 1),
                           minor_faults_per_run=round(faults.get(b.name, 0) / repeats, 1))
                log(f"  {b.name:20s} {med:9.2f} ms  [{q1:.2f}, {q3:.2f}]  "
                    f"faults/run {rec['minor_faults_per_run']:.0f}")
            else:
                rec["reason"] = b.reason
            rec.update({k: v for k, v in b.info.items() if k != "warmup_s"})
            if "warmup_s" in b.info:
                rec["warmup_s"] = b.info["warmup_s"].get(batch)
            records.append(rec)
        del live
    del backends, ctx
    gc.collect()
    if args.memory:
        start = time.perf_counter()
        memory = measure_memory(name, args, workdir, onnx_path)
        for rec in records:
            mem = memory.get(rec["backend"], {})
            rec["peak_rss_mb"] = mem.get("peak_rss_mb", {}).get(rec["batch"])
            rec["resident_model_mb"] = mem.get("resident_model_mb", {}).get(rec["batch"])
            if mem.get("status") != "ok":
                rec["memory_reason"] = mem.get("reason")
        for backend, mem in memory.items():
            log(f"  memory {backend}: {mem.get('peak_rss_mb') or mem.get('reason')}")
        log(f"[{name}] memory subprocess took {time.perf_counter() - start:.0f} s")
    add_ratios(records)
    return records


def add_ratios(records: list[dict]) -> None:
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in records:
        by_key.setdefault((r["model"], r["batch"]), {})[r["backend"]] = r
    for group in by_key.values():
        base = group.get("fp32_eager")
        peers = [group[p] for p in PEERS if p in group and group[p]["latency_ms"] is not None]
        best = min(peers, key=lambda r: r["latency_ms"]) if peers else None
        for r in group.values():
            if r["latency_ms"] is None:
                continue
            if base and base["latency_ms"]:
                r["speedup_vs_fp32_eager"] = round(base["latency_ms"] / r["latency_ms"], 3)
                if r["size_bytes"] and base["size_bytes"]:
                    r["size_vs_fp32"] = round(r["size_bytes"] / base["size_bytes"], 3)
                if r.get("peak_rss_mb") and base.get("peak_rss_mb"):
                    r["peak_rss_vs_fp32"] = round(r["peak_rss_mb"] / base["peak_rss_mb"], 3)
            if best is not None:
                r["fastest_peer"] = best["backend"]
                r["latency_vs_fastest_peer"] = round(r["latency_ms"] / best["latency_ms"], 3)


NOTES = [
    "How measured (details in `benchmarks/deploy.py`): latency is the median of interleaved rounds, each timed "
    "run preceded by a short pause (spinning worker threads of the previous backend stop) and an untimed run "
    "of the same backend; the fxptqat model is timed per batch size on a fresh "
    "copy (torch's oneDNN quantized conv keeps the primitive of its first call's shape). Size: `torch.save` of "
    "the state dict (PT2E: of the constants its graph reads; ORT and fxptqat's onnxruntime lowering: the "
    "`.onnx` file; fxptqat's inductor lowering: its weights as int8 plus the float rest). Peak RSS: VmHWM above a "
    "baseline taken after the same flow ran on a tiny model, in a fresh process per model: resident weights, "
    "whatever the build left alive, and the inference working set.",
]


def goals(records: list[dict]) -> list[str]:
    """The issue's goals, judged on this run's numbers: per fxptqat lowering, then for the fastest one."""
    out = []
    for r in records:
        if r["backend"] not in OURS or r["latency_ms"] is None:
            continue
        where = f"{r['model']} batch {r['batch']} {r['backend']}"
        if r["model"] in CNNS and r["batch"] >= 32:
            speed, size = r.get("speedup_vs_fp32_eager"), r.get("size_vs_fp32")
            ok = speed is not None and speed >= 2.0 and size is not None and size <= 0.3
            out.append(f"- {where}: {speed:.2f}x faster than fp32 eager (goal >= 2), size {size:.2f}x fp32 "
                       f"(goal <= 0.3): {'met' if ok else 'NOT met'}")
        gap = r.get("latency_vs_fastest_peer")
        if gap is not None:
            out.append(f"- {where}: {gap:.2f}x the fastest peer ({r['fastest_peer']}) (goal <= 1.15): "
                       f"{'met' if gap <= 1.15 else 'NOT met'}")
        if "parity_ok" in r:
            out.append(f"- {where}: parity with fake-quant "
                       f"{'ok' if r['parity_ok'] else 'DIVERGES at ' + str(r['parity_first_divergence'])}")
    best: dict[tuple, dict] = {}
    for r in records:
        if r["backend"] in OURS and r.get("latency_vs_fastest_peer") is not None:
            key = (r["model"], r["batch"])
            if key not in best or r["latency_ms"] < best[key]["latency_ms"]:
                best[key] = r
    if best:
        out += ["", "Fastest fxptqat lowering per model and batch:", ""]
        for (model, batch), r in best.items():
            gap = r["latency_vs_fastest_peer"]
            out.append(f"- {model} batch {batch}: {r['backend']} {r['latency_ms']:.2f} ms, {gap:.2f}x the fastest "
                       f"peer ({r['fastest_peer']}): {'met' if gap <= 1.15 else 'NOT met'}")
    return out


def _allocator(malloc) -> str:
    if not isinstance(malloc, dict):
        return " Allocator: glibc defaults."
    return (f" Allocator: glibc mmap threshold {malloc['mmap_threshold'] >> 20} MiB, trim threshold "
            f"{malloc['trim_threshold'] >> 20} MiB (freed buffers stay mapped).")


def markdown(records: list[dict], meta: dict) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    load = [v for v in (meta["load_avg_start"], meta["load_avg_end"]) if v is not None]
    lines = [
        "# Deployment benchmark: INT8 vs FP32 vs peer INT8 paths (CPU)",
        "",
        f"`{meta['command']}`: {meta['threads']} threads, {meta['image_size']}x{meta['image_size']} inputs, "
        f"random weights, median of {meta['repeats']} interleaved rounds at batch 32 "
        f"({meta['repeats'] * 3} at batch 1){', re-warmed' if meta['rewarm'] else ', cold'}; "
        f"total {meta['runtime_s']:.0f} s. "
        f"1-min load average {', '.join(f'{v:.2f}' for v in load)} at start and end (the benchmark itself "
        f"adds up to {meta['threads']}) on {meta['machine']}"
        + (" -- other processes were running: absolute times are inflated and noisy."
           if meta["load_avg_start"] is not None and meta["load_avg_start"] > 1.0 else ".")
        + _allocator(meta.get("malloc"))
        + " Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".",
        "",
        "| model | batch | backend | latency ms (median) | IQR ms | speed-up vs fp32 eager | latency / fastest peer "
        "| size MB | size / fp32 | peak RSS MB | RSS / fp32 | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        iqr = "-" if r.get("latency_q1_ms") is None else f"{r['latency_q1_ms']:.2f}-{r['latency_q3_ms']:.2f}"
        status = r["status"] if r["status"] == "ok" else f"failed: {r.get('reason')}"
        if "parity_ok" in r:
            status += f", parity {'ok' if r['parity_ok'] else 'DIVERGES at ' + str(r['parity_first_divergence'])}"
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['backend']} | {f(r['latency_ms'], '.2f')} | {iqr} "
            f"| {f(r.get('speedup_vs_fp32_eager'), '.2f')} | {f(r.get('latency_vs_fastest_peer'), '.2f')} "
            f"| {f(r['size_bytes'] and r['size_bytes'] / 1e6, '.2f')} | {f(r.get('size_vs_fp32'), '.2f')} "
            f"| {f(r.get('peak_rss_mb'), '.1f')} | {f(r.get('peak_rss_vs_fp32'), '.2f')} | {status} |"
        )
    lines += ["", "Goals (fxptqat's lowerings):", "", *goals(records), "", *NOTES]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats (finishes in under 10 minutes)")
    p.add_argument("--json", type=Path, help="write the records as JSON here")
    p.add_argument("--md", type=Path, help="write the markdown table here")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, help="rounds at batch > 1 (3x at batch 1); default 20, --quick 5")
    p.add_argument("--warmup", type=int, default=2, help="warm-up runs at batch > 1 (3x at batch 1)")
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--calib-size", type=int, default=8)
    p.add_argument("--cold", action="store_true",
                   help="time each round's first run (caches cold after the other backends), no re-warm")
    p.add_argument("--pause-ms", type=float, default=20.0,
                   help="idle time before each backend's turn in a round (lets spinning worker threads stop)")
    p.add_argument("--no-malloc-tuning", dest="malloc_tuning", action="store_false",
                   help="keep glibc's default mmap/trim thresholds (freed buffers re-fault every run)")
    p.add_argument("--tiny", action="store_true", help="tiny models of the same layer types (for tests)")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-RSS subprocesses")
    p.add_argument("--memory-backends", nargs="+", choices=BACKENDS,
                   help="measure peak RSS of these only (default: every --backends; each is built twice there)")
    p.add_argument("--from-json", type=Path, help="only re-render --md (or stdout) from a JSON written earlier")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 5 if args.quick else 20
    if args.memory_backends is None:
        args.memory_backends = list(args.backends)
    elif not set(args.memory_backends) <= set(args.backends):
        p.error(f"--memory-backends {sorted(set(args.memory_backends) - set(args.backends))} not in --backends")
    return args


def main(argv=None) -> int:
    """The benchmark; inductor's freezing (set for the compiled backends) and the thread count are
    put back afterwards, so that an in-process caller (the test suite) keeps its own."""
    import torch._inductor.config as inductor_config

    threads = torch.get_num_threads()
    try:
        with inductor_config.patch(freezing=inductor_config.freezing):
            return _main(argv)
    finally:
        torch.set_num_threads(threads)


def _main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return 0
    if args.from_json:
        data = json.loads(args.from_json.read_text())
        md = markdown(data["records"], data["meta"])
        print(md)
        if args.md:
            args.md.write_text(md)
        return 0
    malloc = tune_malloc() if args.malloc_tuning else None
    start = time.perf_counter()
    load_start = load_average()
    log(f"deploy benchmark: {args.models} x batches {args.batches}, threads {args.threads}, load {load_start}")
    records = []
    with tempfile.TemporaryDirectory(prefix="fxptqat-deploy-") as workdir:
        for name in args.models:
            records += run_model(name, args, workdir)
    meta = {
        "command": "python benchmarks/deploy.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "threads": args.threads, "image_size": args.image_size, "repeats": args.repeats, "tiny_models": args.tiny,
        "rewarm": not args.cold, "pause_ms": args.pause_ms, "malloc": malloc or "glibc defaults",
        "runtime_s": time.perf_counter() - start, "load_avg_start": load_start, "load_avg_end": load_average(),
        "versions": versions(), "machine": machine(),
    }
    md = markdown(records, meta)
    print(md)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
