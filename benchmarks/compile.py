"""What ``torch.compile(backend="fxptqat")`` buys: QAT step time against eager QAT, QAT compiled by
plain inductor and FP32 training, and INT8 inference against ``lower(runtime="inductor")``.

    python benchmarks/compile.py [--quick] [--json PATH] [--models ...] [--steps N] [--threads 2]
    python benchmarks/compile.py --report-only [--json PATH]   # the .md again from the JSON

Per model (random weights, BatchNorm statistics re-estimated on random batches as the zoo does:
``zoo_models.give_signal``), prepared W4A8 (``QuantConfig(weight_bits=4)``), calibrated on 4 random
batches, ``measure_error`` on 2, trained with Adam (lr 1e-4) on cross-entropy against random
targets, ``--threads`` intra-op threads (default 2):

* training variants: ``fp32/eager``, ``fp32/inductor`` (``torch.compile(model)``; every parameter
  trains, BatchNorm in train mode), and for the AllLayers selection and for the PTQAT selection
  (``Threshold(0.01)`` on measure_error's report) ``qat-*/eager``, ``qat-*/inductor``
  (``backend="inductor"``: fake-quant stays an opaque ATen kernel) and ``qat-*/fxptqat``
  (``backend="fxptqat"``: fake-quant rewritten into element-wise ops that inductor fuses), and
  ``qat-all/fxptqat-recompute`` (the same with ``options={"save_fake_quant": False}``: AOTAutograd's
  partitioner recomputes every quantizer, and a quantized softmax, in the backward; the backend's
  behaviour before session 17). Each variant has its own copy of the model and its
  own optimizer.
* a step is forward + cross-entropy + ``zero_grad`` + backward + ``optimizer.step()`` (the optimizer
  is never compiled). Each variant runs 2 warm-up steps, one variant after the other: their wall
  time is the compile time (Dynamo + AOTAutograd + inductor, with a fresh, empty inductor cache
  directory unless ``--warm-cache``). Then ``--steps`` timed steps, round-robin: one step of every
  variant per repetition, the order rotated each repetition, so that the machine's noise hits all
  variants alike. Step time: the median; ratios are of medians taken side by side in this one
  process (absolute times are not comparable across runs on this shared machine), with the
  25th-75th percentile of the per-repetition ratios as their spread.
* recompiles: the increase of ``torch._dynamo.utils.counters["stats"]["unique_graphs"]`` (and of
  ``counters["fxptqat"]["graphs"]`` for the fxptqat backend) over the timed steps: must be 0.
* graph breaks: ``torch._dynamo.explain`` on the QAT graph in train mode (expect 0) and on the
  float model.
* memory: see ``MEM_METHOD``.
* INT8 inference under ``torch.no_grad()`` on one batch: ``torch.compile(qat.eval(),
  backend="fxptqat")`` (oneDNN INT8 kernels: W4A8 is exact on CPUs without AVX-512 VNNI) against
  ``fq.lower(qat, runtime="inductor", example_inputs=...)``, with fake-quant eager, FP32 eager and
  FP32 inductor for reference, timed round-robin the same way; ``check_parity`` of the compiled
  model against the fake-quant graph (ok, coverage).

Writes JSON (the records, the ratios, the goals and the environment: CPU model, torch version,
threads, command line, load average) and a markdown report next to it (``.md``). Progress goes to
stderr. ``--quick``: a tiny MLP (``--quick --models tinyconv``: two convolutions and an MLP head at
8 px, ~2 min of cold compiles on 2 shared cores), 3 timed steps; it never writes into benchmarks/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import dataclasses
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/compile.py` puts benchmarks/, not the root, on the path
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_JSON = RESULTS / "compile.json"
WARMUP = 2
RECOMPUTE = "fxptqat-recompute"  # backend="fxptqat", options={"save_fake_quant": False}
CALIB_BATCHES = 4
LR = 1e-4
THETA = 0.01
GOAL_FP32 = 1.3  # fxptqat QAT step / faster FP32 step
GOAL_EAGER_TRANSFORMER = 2.0  # eager QAT step / fxptqat QAT step, transformer
GOAL_INT8 = 1.05  # compiled INT8 latency / lower(runtime="inductor") latency
MEM_METHOD = (
    "step_peak_rss_mb: Linux RSS high-water mark (VmHWM, reset through /proc/self/clear_refs after "
    "gc.collect() and malloc_trim(0)) during one extra training step run after the timed steps, minus "
    "the RSS just before it: the memory one step touches beyond what the process already held "
    "(activations saved for backward, gradients, temporaries; the model and the optimizer state "
    "exist before). torch's CPU allocator is glibc malloc here, so this is what it takes from the OS. "
    "warmup_peak_rss_mb: the same over the 2 warm-up steps (Dynamo, AOTAutograd and inductor in this "
    "process; inductor's C++ compiler runs in child processes, not counted)."
)
COMPILE_NOTE = (
    "compile_s is the wall time of the 2 warm-up steps (inference: of lower() or the first calls), with "
    "inductor's cache directory empty at the start of the run. The variants of a model compile one after "
    "the other in one process, in the order of the table, and inductor reuses a kernel it already compiled "
    "in this process (its in-memory and on-disk caches are keyed by the kernel's source): a variant listed "
    "later (PTQAT after AllLayers, lower() after the compiled INT8 model) may compile faster for that "
    "reason alone. Compile times are therefore comparable within the first of each kind only."
)

__all__ = ["MODELS", "QUICK_MODELS", "main", "run_model", "markdown", "goals"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- models ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    make: Callable[[], nn.Module]
    batch: int
    input_shape: tuple[int, ...]  # one sample
    num_classes: int
    transformer: bool = False


def _torchvision(name: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        from benchmarks import zoo_models as zm

        return zm.build(name, 64)[0]
    return make


def _smallvit() -> nn.Module:
    from fxptqat.examples.models import SmallViT

    return SmallViT(num_classes=10, image_size=28, patch_size=4, dim=64, depth=4, heads=4).eval()


class TinyConv(nn.Module):
    """Two 3x3 convolutions (the first with BatchNorm) and a 2-layer MLP head, for 3x8x8 inputs (--quick)."""

    def __init__(self, bn: bool = True) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), (nn.BatchNorm2d(8) if bn else nn.Identity())
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc1, self.fc2 = nn.Linear(8 * 4 * 4, 16), nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.conv2(x))
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


def _tiny_mlp() -> nn.Module:
    from fxptqat.examples.models import TinyMLP

    return TinyMLP().eval()


MODELS = {
    "resnet18": ModelSpec("resnet18", _torchvision("resnet18"), 32, (3, 64, 64), 1000),
    "mobilenet_v3_small": ModelSpec("mobilenet_v3_small", _torchvision("mobilenet_v3_small"), 32, (3, 64, 64), 1000),
    "mobilenet_v2": ModelSpec("mobilenet_v2", _torchvision("mobilenet_v2"), 32, (3, 64, 64), 1000),
    "smallvit": ModelSpec("smallvit", _smallvit, 64, (1, 28, 28), 10, transformer=True),
}
DEFAULT_MODELS = ("resnet18", "mobilenet_v3_small", "smallvit")
QUICK_MODELS = {
    "tinymlp": ModelSpec("tinymlp", _tiny_mlp, 16, (1, 8, 8), 10),
    "tinyconv": ModelSpec("tinyconv", lambda: TinyConv().eval(), 8, (3, 8, 8), 10),
}
# cold inductor compiles of the conv net take ~2 min on 2 shared cores: --quick runs the MLP unless told
DEFAULT_QUICK_MODELS = ("tinymlp",)


# -- measurement helpers --------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _trim() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def _peak_rss(out: dict, key: str):
    """``out[key]``: the RSS high-water mark inside the block above the RSS before it, in MB."""
    _trim()
    before = _status_kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
        resettable = True
    except OSError:
        resettable = False
    try:
        yield
    finally:
        out[key] = round(max(0, _status_kb("VmHWM") - before) / 1024, 1) if resettable else None


def _counters() -> dict:
    from torch._dynamo.utils import counters

    return {"unique_graphs": counters["stats"]["unique_graphs"], "fxptqat_graphs": counters["fxptqat"]["graphs"],
            "fused_graphs": counters["fxptqat"]["fused_graphs"], "fake_quant_ops": counters["fxptqat"]["fake_quant_ops"],
            "int8_graphs": counters["fxptqat"]["int8_graphs"], "int8_refused": counters["fxptqat"]["int8_refused"],
            "frozen_guards_dropped": counters["fxptqat"]["frozen_tensor_guards_dropped"],
            "qconv_prepack": counters["inductor"]["qconv_weight_prepack_matcher_count"],
            "qlinear_prepack": counters["inductor"]["qlinear_weight_prepack_matcher_count"]}


def _delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in before}


def _quantiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], statistics.median(values), q[2]


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:600] + "\n" + "".join(traceback.format_exception(e))[-1500:]


# -- training variants ----------------------------------------------------------------------------
@dataclasses.dataclass
class Variant:
    name: str
    kind: str  # fp32 | qat
    selection: str | None  # all | ptqat | None
    mode: str  # eager | inductor | fxptqat
    model: nn.Module
    forward: Callable
    optimizer: torch.optim.Optimizer | None
    record: dict
    times: list[float] = dataclasses.field(default_factory=list)
    failed: bool = False


def _train_variant(name, kind, selection, mode, model: nn.Module) -> Variant:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if mode == "eager":
        forward = model
    elif mode == RECOMPUTE:
        forward = torch.compile(model, backend="fxptqat", options={"save_fake_quant": False})
    else:
        forward = torch.compile(model, backend=mode)
    record = {"variant": name, "kind": kind, "selection": selection, "mode": mode,
              "trainable_params": sum(p.numel() for p in params)}
    return Variant(name, kind, selection, mode, model, forward, torch.optim.Adam(params, lr=LR) if params else None,
                   record)


def _step(v: Variant, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = F.cross_entropy(v.forward(x), y)
    v.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    v.optimizer.step()
    return loss.detach()


def _explain(model: nn.Module, x: torch.Tensor) -> dict:
    torch._dynamo.reset()
    try:
        out = torch._dynamo.explain(model)(x)
        return {"graph_count": out.graph_count, "graph_break_count": out.graph_break_count,
                "break_reasons": [str(r.reason)[:600] for r in out.break_reasons][:10]}
    except Exception as e:  # recorded, the benchmark goes on
        return {"error": _error(e)}
    finally:
        torch._dynamo.reset()


def _timed_round_robin(items: list, run_one: Callable, steps: int, label: str) -> None:
    """``steps`` repetitions, each running every live item once (order rotated per repetition);
    ``run_one(item)`` returns seconds and may raise (the item is then marked failed)."""
    for rep in range(steps):
        live = [it for it in items if not it.failed]
        if not live:
            return
        shift = rep % len(live)
        for it in live[shift:] + live[:shift]:
            try:
                it.times.append(run_one(it))
            except Exception as e:
                it.failed = True
                it.record["error"] = _error(e)
                log(f"{label}: {it.name} failed in a timed step: {type(e).__name__}: {e}")
        if rep == 0 or (rep + 1) % max(1, steps // 4) == 0:
            log(f"{label}: timed repetition {rep + 1}/{steps}")


def _summarise_times(v) -> None:
    if v.times:
        lo, med, hi = _quantiles(v.times)
        v.record.update(step_ms_median=round(med * 1e3, 3), step_ms_p25=round(lo * 1e3, 3),
                        step_ms_p75=round(hi * 1e3, 3), step_ms_min=round(min(v.times) * 1e3, 3),
                        timed_steps=len(v.times), step_ms_all=[round(t * 1e3, 3) for t in v.times])


def training(spec: ModelSpec, net: nn.Module, qats: dict, data: list, steps: int, label: str) -> list[Variant]:
    variants = [_train_variant("fp32/eager", "fp32", None, "eager", copy.deepcopy(net)),
                _train_variant("fp32/inductor", "fp32", None, "inductor", copy.deepcopy(net))]
    for selection, qat in qats.items():
        for mode in ("eager", "inductor", "fxptqat"):
            variants.append(_train_variant(f"qat-{selection}/{mode}", "qat", selection, mode, copy.deepcopy(qat)))
        if selection == "all":
            variants.append(_train_variant(f"qat-all/{RECOMPUTE}", "qat", selection, RECOMPUTE, copy.deepcopy(qat)))
    for v in variants:
        if v.optimizer is None:
            v.failed = True
            v.record["error"] = "no parameter requires grad: nothing to train"
    # warm-up (compiles), one variant after the other
    for v in variants:
        if v.failed:
            continue
        before = _counters()
        start = time.perf_counter()
        try:
            with _peak_rss(v.record, "warmup_peak_rss_mb"):
                for i in range(WARMUP):
                    x, y = data[i % len(data)]
                    _step(v, x, y)
        except Exception as e:
            v.failed = True
            v.record["error"] = _error(e)
            log(f"{label}: {v.name} failed to warm up / compile: {type(e).__name__}: {str(e)[:200]}")
            continue
        v.record["compile_s"] = round(time.perf_counter() - start, 2)
        d = _delta(before, _counters())
        v.record["graphs_compiled"] = d["unique_graphs"]
        if v.mode in ("fxptqat", RECOMPUTE):
            v.record.update(fxptqat_graphs=d["fxptqat_graphs"], fused_graphs=d["fused_graphs"],
                            fake_quant_ops=d["fake_quant_ops"])
        log(f"{label}: {v.name} warm-up {v.record['compile_s']:.1f} s, {d['unique_graphs']} graph(s) compiled")
    # timed steps, round-robin
    recompiles = {v.name: {"unique_graphs": 0, "fxptqat_graphs": 0} for v in variants}
    counter = [0]

    def run_one(v: Variant) -> float:
        x, y = data[counter[0] % len(data)]
        counter[0] += 1
        before = _counters()
        start = time.perf_counter()
        loss = _step(v, x, y)
        seconds = time.perf_counter() - start
        d = _delta(before, _counters())
        for k in recompiles[v.name]:
            recompiles[v.name][k] += d[k]
        v.record["final_loss"] = round(float(loss), 5)
        return seconds

    _timed_round_robin(variants, run_one, steps, label)
    # one more step each for memory (after timing: the trims would perturb the timed steps)
    log(f"{label}: one more step per variant for memory")
    for v in variants:
        if v.failed:
            continue
        x, y = data[0]
        try:
            with _peak_rss(v.record, "step_peak_rss_mb"):
                _step(v, x, y)
        except Exception as e:
            v.record["step_peak_rss_mb"] = None
            v.record["memory_error"] = _error(e)
    for v in variants:
        _summarise_times(v)
        if v.mode != "eager" and not v.failed:
            v.record["recompiles"] = recompiles[v.name]["unique_graphs"]
            if v.mode in ("fxptqat", RECOMPUTE):
                v.record["recompiles_fxptqat_graphs"] = recompiles[v.name]["fxptqat_graphs"]
        elif v.mode == "eager":
            v.record["recompiles"] = 0
    return variants


# -- INT8 inference -------------------------------------------------------------------------------
DICT_TAGS = "int8/fxptqat+dict-tags"
KEEP_GUARDS = "int8/fxptqat-keep-guards"  # every guard Dynamo installed, checked one by one (the old default)


def _under_dynamo_config(fn: Callable, **config) -> Callable:
    """``fn`` called under ``torch._dynamo.config.patch(**config)`` (read when a call compiles)."""
    def call(*args):
        with torch._dynamo.config.patch(**config):
            return fn(*args)
    return call


def inference(spec: ModelSpec, net: nn.Module, qat: nn.Module, x: torch.Tensor, parity_batches: list, steps: int,
              label: str) -> tuple[dict, dict]:
    import fxptqat as fq

    out: dict = {}
    items = []
    makers = {
        "int8/fxptqat": lambda: torch.compile(copy.deepcopy(qat).eval(), backend="fxptqat"),
        # the README's advice for inference through the backend: Dynamo's recursive dict-tag guard check
        # (the patch is entered on every call and its cost counted; it matters when a call compiles)
        DICT_TAGS: lambda: _under_dynamo_config(torch.compile(copy.deepcopy(qat).eval(), backend="fxptqat"),
                                                use_recursive_dict_tags_for_guards=True),
        KEEP_GUARDS: lambda: torch.compile(copy.deepcopy(qat).eval(), backend="fxptqat",
                                           options={"drop_frozen_guards": False, "dict_tag_guards": False}),
        "int8/lower-inductor": lambda: fq.lower(copy.deepcopy(qat).eval(), runtime="inductor", example_inputs=(x,)),
        "fake-quant/eager": lambda: copy.deepcopy(qat).eval(),
        "fp32/eager": lambda: copy.deepcopy(net).eval(),
        "fp32/inductor": lambda: torch.compile(copy.deepcopy(net).eval(), backend="inductor"),
    }
    outputs = {}
    for name, make in makers.items():
        it = Variant(name, "inference", None, name.split("/")[1], None, None, None, {"variant": name})
        items.append(it)
        before = _counters()
        start = time.perf_counter()
        try:
            with _peak_rss(it.record, "warmup_peak_rss_mb"), torch.no_grad():
                it.forward = make()
                for _ in range(WARMUP):
                    y = it.forward(x)
            outputs[name] = y
        except Exception as e:
            it.failed = True
            it.record["error"] = _error(e)
            log(f"{label}: inference {name} failed: {type(e).__name__}: {str(e)[:200]}")
            continue
        it.record["compile_s"] = round(time.perf_counter() - start, 2)  # lower(): the lowering and its compile
        d = _delta(before, _counters())
        it.record["graphs_compiled"] = d["unique_graphs"]
        if name in ("int8/fxptqat", DICT_TAGS, KEEP_GUARDS):
            it.record.update(int8_graphs=d["int8_graphs"], int8_refused=d["int8_refused"],
                             frozen_tensor_guards_dropped=d["frozen_guards_dropped"],
                             qconv_prepack_matches=d["qconv_prepack"], qlinear_prepack_matches=d["qlinear_prepack"])
        log(f"{label}: inference {name} warm-up {it.record['compile_s']:.1f} s")
    recompiles = {it.name: 0 for it in items}

    def run_one(it) -> float:
        before = _counters()["unique_graphs"]
        with torch.no_grad():
            start = time.perf_counter()
            it.forward(x)
            seconds = time.perf_counter() - start
        recompiles[it.name] += _counters()["unique_graphs"] - before
        return seconds

    _timed_round_robin(items, run_one, steps, f"{label} inference")
    for it in items:
        _summarise_times(it)
        if not it.failed:
            it.record["recompiles"] = recompiles[it.name]
            it.record["latency_ms_median"] = it.record.pop("step_ms_median")
            it.record["latency_ms_p25"] = it.record.pop("step_ms_p25")
            it.record["latency_ms_p75"] = it.record.pop("step_ms_p75")
            it.record["latency_ms_min"] = it.record.pop("step_ms_min")
            it.record["latency_ms_all"] = it.record.pop("step_ms_all")
    ref = outputs.get("fake-quant/eager")
    for name in ("int8/fxptqat", DICT_TAGS, KEEP_GUARDS, "int8/lower-inductor"):
        if name in outputs and ref is not None:
            rec = next(it.record for it in items if it.name == name)
            rec["max_abs_diff_vs_fake_quant"] = float((outputs[name] - ref).abs().max())
    if "int8/fxptqat" in outputs and "int8/lower-inductor" in outputs:
        out["max_abs_diff_compiled_vs_lower"] = float((outputs["int8/fxptqat"] - outputs["int8/lower-inductor"]).abs().max())
    compiled = next(it for it in items if it.name == "int8/fxptqat")
    if not compiled.failed:
        try:
            report = fq.check_parity(qat, compiled.forward, parity_batches)
            out["parity"] = {"ok": bool(report.ok), "coverage": float(report.coverage)}
        except Exception as e:
            out["parity"] = {"error": _error(e)}
        log(f"{label}: check_parity of the compiled INT8 model: {out['parity']}")
    out["variants"] = [it.record for it in items]
    return out, {it.name: it.times for it in items}


# -- one model ------------------------------------------------------------------------------------
def _ratio(a: dict | None, b: dict | None, key: str = "step_ms_median", pairs: tuple | None = None) -> dict | None:
    if not a or not b or key not in a or key not in b or not b[key]:
        return None
    out = {"ratio": round(a[key] / b[key], 4)}
    low = key.replace("_median", "_min")
    if a.get(low) and b.get(low):
        out["ratio_of_min"] = round(a[low] / b[low], 4)
    if pairs:
        ta, tb = pairs
        paired = [p / q for p, q in zip(ta, tb, strict=False) if q > 0]
        if paired:
            lo, _, hi = _quantiles(paired)
            out["paired_p25"], out["paired_p75"] = round(lo, 4), round(hi, 4)
    return out


def ratios(train: list, infer: list, train_times: dict, infer_times: dict) -> dict:
    by = {r["variant"]: r for r in train}
    ib = {r["variant"]: r for r in infer}

    def r(a, b, recs=by, times=train_times, key="step_ms_median"):
        return _ratio(recs.get(a), recs.get(b), key, (times.get(a, []), times.get(b, [])))

    fp32 = [n for n in ("fp32/eager", "fp32/inductor") if "step_ms_median" in by.get(n, {})]
    best_fp32 = min(fp32, key=lambda n: by[n]["step_ms_median"]) if fp32 else None
    out = {"best_fp32": best_fp32}
    for sel in ("all", "ptqat"):
        out[f"qat-{sel}/fxptqat over best fp32"] = r(f"qat-{sel}/fxptqat", best_fp32) if best_fp32 else None
        out[f"qat-{sel}/eager over qat-{sel}/fxptqat"] = r(f"qat-{sel}/eager", f"qat-{sel}/fxptqat")
        out[f"qat-{sel}/inductor over qat-{sel}/fxptqat"] = r(f"qat-{sel}/inductor", f"qat-{sel}/fxptqat")
    for mode in ("eager", "inductor", "fxptqat"):
        out[f"qat-ptqat/{mode} over qat-all/{mode}"] = r(f"qat-ptqat/{mode}", f"qat-all/{mode}")
    out[f"qat-all/{RECOMPUTE} over qat-all/fxptqat"] = r(f"qat-all/{RECOMPUTE}", "qat-all/fxptqat")
    out["fp32/inductor over fp32/eager"] = r("fp32/inductor", "fp32/eager")
    key = "latency_ms_median"
    out["int8/fxptqat over int8/lower-inductor"] = r("int8/fxptqat", "int8/lower-inductor", ib, infer_times, key)
    out[f"{DICT_TAGS} over int8/lower-inductor"] = r(DICT_TAGS, "int8/lower-inductor", ib, infer_times, key)
    out[f"{KEEP_GUARDS} over int8/lower-inductor"] = r(KEEP_GUARDS, "int8/lower-inductor", ib, infer_times, key)
    out["int8/fxptqat over fp32/inductor (inference)"] = r("int8/fxptqat", "fp32/inductor", ib, infer_times, key)
    return out


def inference_steps(steps: int) -> int:
    """Timed inference calls per variant for ``steps`` timed training steps."""
    return max(4 * steps, 40)


def run_model(spec: ModelSpec, steps: int, seed: int = 0) -> dict:
    import fxptqat as fq
    from benchmarks import zoo_models as zm

    label = spec.name
    rec: dict = {"model": spec.name, "batch": spec.batch, "input_shape": list(spec.input_shape),
                 "num_classes": spec.num_classes, "weight_bits": 4, "act_bits": 8}
    rec["load_average_start"] = [round(x, 2) for x in os.getloadavg()]
    started = time.perf_counter()
    torch.manual_seed(seed)
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(seed + 1)

    def images(n):
        return [(torch.randn(spec.batch, *spec.input_shape, generator=gen),) for _ in range(n)]

    net = spec.make()
    rec["signal"] = zm.give_signal(net, images(4))
    rec["params"] = sum(p.numel() for p in net.parameters())
    calib = images(CALIB_BATCHES)
    qat = fq.prepare(net, calib[0], config=fq.QuantConfig(weight_bits=4))
    fq.calibrate(qat, calib)
    report = fq.measure_error(qat, calib[:2])
    qats = {}
    for sel, policy in (("all", fq.AllLayers()), ("ptqat", fq.Threshold(THETA))):
        q = copy.deepcopy(qat)
        s = fq.select_trainable(q, report, policy=policy)
        rec[f"{sel}_layers"] = len(s.trainable)
        rec[f"{sel}_trainable_params"] = s.trainable_params
        qats[sel] = q
    rec["quantized_layers"] = len(report.rows)
    # quantizers that are not fxptqat's (torch.ao's FixedQParamsFakeQuantize after sigmoid-like ops):
    # Dynamo does not trace into torch.ao, each is a graph break
    rec["torch_ao_fake_quant_modules"] = sorted({type(mod).__name__ for mod in qat.modules()
                                                if type(mod).__module__.startswith("torch.ao.quantization.fake")})
    rec["torch_ao_fake_quant_count"] = sum(1 for mod in qat.modules()
                                           if type(mod).__module__.startswith("torch.ao.quantization.fake"))
    log(f"{label}: {rec['params'] / 1e6:.2f} M params, {rec['quantized_layers']} quantized layers, "
        f"PTQAT trains {rec['ptqat_layers']} ({rec['ptqat_trainable_params']} params)")
    x0 = calib[0][0]
    rec["graph_breaks"] = {"qat": _explain(copy.deepcopy(qats["all"]).train(), x0),
                           "fp32": _explain(copy.deepcopy(net).train(), x0)}
    log(f"{label}: graph breaks {rec['graph_breaks']['qat'].get('graph_break_count')} (QAT), "
        f"{rec['graph_breaks']['fp32'].get('graph_break_count')} (fp32)")
    data = [(xb, torch.randint(0, spec.num_classes, (spec.batch,), generator=gen)) for (xb,) in images(4)]
    variants = training(spec, net, qats, data, steps, label)
    rec["training"] = [v.record for v in variants]
    train_times = {v.name: v.times for v in variants}
    del variants
    gc.collect()
    log(f"{label}: INT8 inference")
    # an inference call is 10-100x shorter than a training step: more repetitions for the same noise
    infer, infer_times = inference(spec, net, qat, x0, calib[:2], inference_steps(steps), label)
    rec["inference"] = infer
    rec["ratios"] = ratios(rec["training"], infer["variants"], train_times, infer_times)
    rec["seconds"] = round(time.perf_counter() - started, 1)
    rec["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    torch._dynamo.reset()
    return rec


# -- goals and report ---------------------------------------------------------------------------------
def goals(models: list[dict]) -> list[dict]:
    """Each goal per model: the value, the target, met or not (None: not measured)."""
    out = []

    def add(goal, model, value, target, met, value_of_min=None):
        out.append({"goal": goal, "model": model, "value": value, "target": target,
                    "met": None if value is None else bool(met), "value_of_min": value_of_min})

    for m in models:
        name = m["model"]
        if "ratios" not in m:
            add("model ran", name, None, "no error", False)
            out[-1]["met"] = False
            continue
        r = m["ratios"]

        def v(key, r=r):
            return (r.get(key) or {}).get("ratio")

        def vmin(key, r=r):
            return (r.get(key) or {}).get("ratio_of_min")

        for sel in ("all", "ptqat"):
            key = f"qat-{sel}/fxptqat over best fp32"
            x = v(key)
            add(f"fxptqat QAT step ({sel}) / faster FP32 step <= {GOAL_FP32}", name, x, f"<= {GOAL_FP32}",
                x is not None and x <= GOAL_FP32, vmin(key))
            key = f"qat-{sel}/eager over qat-{sel}/fxptqat"
            x = v(key)
            add(f"eager QAT / fxptqat QAT ({sel}) >= 1", name, x, ">= 1", x is not None and x >= 1, vmin(key))
            if m.get("transformer"):
                add(f"eager QAT / fxptqat QAT ({sel}) >= {GOAL_EAGER_TRANSFORMER} (transformer)", name, x,
                    f">= {GOAL_EAGER_TRANSFORMER}", x is not None and x >= GOAL_EAGER_TRANSFORMER, vmin(key))
        key = "int8/fxptqat over int8/lower-inductor"
        x = v(key)
        add(f"compiled INT8 latency / lower(runtime='inductor') <= {GOAL_INT8}", name, x, f"<= {GOAL_INT8}",
            x is not None and x <= GOAL_INT8, vmin(key))
        key = f"{DICT_TAGS} over int8/lower-inductor"
        if key in r:  # runs before this variant existed do not have it
            x = v(key)
            add(f"compiled INT8 latency, recursive dict-tag guards / lower(runtime='inductor') <= {GOAL_INT8}",
                name, x, f"<= {GOAL_INT8}", x is not None and x <= GOAL_INT8, vmin(key))
        parity = m.get("inference", {}).get("parity", {})
        add("check_parity of the compiled INT8 model ok, coverage 1", name,
            None if "ok" not in parity else f"ok={parity['ok']}, coverage={parity['coverage']:.3f}", "ok, 1.0",
            parity.get("ok") and parity.get("coverage") == 1.0)
        compiled = [rec for rec in m["training"] + m["inference"]["variants"] if rec.get("mode") != "eager"]
        recompiles = sum(rec.get("recompiles") or 0 for rec in compiled)
        missing = [rec["variant"] for rec in m["training"] + m["inference"]["variants"] if "error" in rec]
        add("no recompile between timed steps", name, recompiles, "0", recompiles == 0)
        gb = m["graph_breaks"]["qat"].get("graph_break_count")
        add("no graph break in the QAT graph", name, gb, "0", gb == 0)
        add("every variant ran", name, ", ".join(missing) or "all", "all", not missing)
    return out


def _fmt(x, digits=2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _ratio_cell(r: dict | None) -> str:
    if not r:
        return "-"
    spread = f" ({r['paired_p25']:.2f}-{r['paired_p75']:.2f})" if "paired_p25" in r else ""
    low = f"; of minimums {r['ratio_of_min']:.2f}x" if "ratio_of_min" in r else ""
    return f"{r['ratio']:.2f}x{spread}{low}"


def markdown(data: dict) -> str:
    meta = data["meta"]
    lines = ["# torch.compile(backend=\"fxptqat\"): QAT step and INT8 inference", "",
             f"`{meta['command']}` on {meta['cpu']} ({meta['cpus']} CPUs, shared), {meta['threads']} thread(s), "
             f"torch {meta['torch']}, python {meta['python']}, {meta['date']}; {meta['steps']} timed steps after "
             f"{WARMUP} warm-up steps ({meta.get('inference_steps') or meta['steps']} timed calls for inference), "
             f"round-robin over the variants; wall time {meta.get('wall_s', '-')} s; "
             f"load average {meta['load_average_start']} at start, {meta.get('load_average_end', '-')} at end. "
             f"AVX-512 VNNI: {meta['avx512_vnni']}. Inductor cache: {meta['inductor_cache']}."
             + (f" Resumed: {', '.join(meta['resumed']['models'])} measured by the same command in an earlier, killed "
                f"process ({meta['resumed']['their_run'].get('date')}); this process's wall time covers the rest, the "
                f"models' own times add up to {meta.get('models_seconds_total')} s." if meta.get("resumed") else ""), "",
             "Step = forward + cross-entropy + zero_grad + backward + Adam step (random targets), W4A8 "
             "(`QuantConfig(weight_bits=4)`), random weights (BatchNorm statistics re-estimated). Ratios are of "
             "medians measured side by side in this run; in brackets the 25th-75th percentile of the per-repetition "
             "ratios (a noise gauge). Absolute times are not comparable across runs on this shared machine.", "",
             "## Goals", "",
             "Judged on the ratio of medians; the ratio of the fastest steps (minimums, the least disturbed by "
             "other work on the machine) is shown beside it.", "",
             "| goal | model | value (ratio of medians) | ratio of minimums | met |", "|---|---|---|---|---|"]
    for g in data["goals"]:
        met = {True: "**met**", False: "**unmet**", None: "not measured"}[g["met"]]
        value = _fmt(g["value"], 2) + ("x" if isinstance(g["value"], float) else "")
        low = _fmt(g.get("value_of_min"), 2) + ("x" if isinstance(g.get("value_of_min"), float) else "")
        lines.append(f"| {g['goal']} | {g['model']} | {value} | {low} | {met} |")
    for m in data["models"]:
        lines += ["", f"## {m['model']}", ""]
        if "error" in m and "training" not in m:
            lines += ["Failed:", "", "```", m["error"][:1500], "```"]
            continue
        lines.append(f"batch {m['batch']}, input {'x'.join(map(str, m['input_shape']))}, {m['num_classes']} classes, "
                     f"{m['params'] / 1e6:.2f} M params, {m['quantized_layers']} quantized layers; PTQAT "
                     f"(Threshold({THETA})) trains {m['ptqat_layers']} of them ({m['ptqat_trainable_params']:,} params), "
                     f"AllLayers {m['all_layers']} ({m['all_trainable_params']:,} params). Graph breaks (explain, train "
                     f"mode): QAT {_fmt(m['graph_breaks']['qat'].get('graph_break_count'))}, FP32 "
                     f"{_fmt(m['graph_breaks']['fp32'].get('graph_break_count'))}. {m['seconds']} s for this model, load "
                     f"average {m.get('load_average_start')} -> {m.get('load_average_end')}.")
        reasons = m["graph_breaks"]["qat"].get("break_reasons") or []
        if reasons:
            lines += ["", f"QAT graph break reason (first of {len(reasons)} listed): `{reasons[0].splitlines()[0]}` "
                      f"({reasons[0].splitlines()[1].strip() if len(reasons[0].splitlines()) > 1 else ''})"]
        lines += ["", "| training variant | step ms (median) | p25-p75 | min | compile s (2 warm-up steps) | recompiles | "
                  "step peak RSS MB | warm-up peak RSS MB | trainable params | note |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in m["training"]:
            note = r["error"].splitlines()[0][:120] if "error" in r else ""
            if r.get("mode") in ("fxptqat", RECOMPUTE) and "fused_graphs" in r:
                note = note or f"{r['fake_quant_ops']} fake-quant ops fused in {r['fused_graphs']} graph(s)"
            lines.append(f"| {r['variant']} | {_fmt(r.get('step_ms_median'), 1)} | {_fmt(r.get('step_ms_p25'), 1)}-"
                         f"{_fmt(r.get('step_ms_p75'), 1)} | {_fmt(r.get('step_ms_min'), 1)} | {_fmt(r.get('compile_s'), 1)} | "
                         f"{_fmt(r.get('recompiles'))} | "
                         f"{_fmt(r.get('step_peak_rss_mb'), 0)} | {_fmt(r.get('warmup_peak_rss_mb'), 0)} | "
                         f"{r.get('trainable_params', 0):,} | {note} |")
        inf = m["inference"]
        lines += ["", "| inference (no_grad, one batch) | latency ms (median) | p25-p75 | min | compile s | recompiles | note |",
                  "|---|---|---|---|---|---|---|"]
        for r in inf["variants"]:
            note = r["error"].splitlines()[0][:120] if "error" in r else ""
            if r["variant"] in ("int8/fxptqat", DICT_TAGS, KEEP_GUARDS) and "int8_graphs" in r:
                note = note or (f"{r['int8_graphs']} INT8 graph(s), {r['int8_refused']} refused, oneDNN prepack "
                                f"matches: {r['qconv_prepack_matches']} conv, {r['qlinear_prepack_matches']} linear"
                                + (f"; {r['frozen_tensor_guards_dropped']} frozen tensors' guards dropped"
                                   if r.get("frozen_tensor_guards_dropped") else ""))
            if "max_abs_diff_vs_fake_quant" in r:
                note += f"; max abs diff vs fake-quant {r['max_abs_diff_vs_fake_quant']:.2e}"
            lines.append(f"| {r['variant']} | {_fmt(r.get('latency_ms_median'), 2)} | {_fmt(r.get('latency_ms_p25'), 2)}-"
                         f"{_fmt(r.get('latency_ms_p75'), 2)} | {_fmt(r.get('latency_ms_min'), 2)} | {_fmt(r.get('compile_s'), 1)} | "
                         f"{_fmt(r.get('recompiles'))} | {note} |")
        parity = inf.get("parity", {})
        lines += ["", f"check_parity(qat, compiled INT8): {parity}; max abs diff compiled vs lower: "
                  f"{_fmt(inf.get('max_abs_diff_compiled_vs_lower'), 6)}.", "", "| ratio | value |", "|---|---|"]
        for k, r in m["ratios"].items():
            if k != "best_fp32":
                lines.append(f"| {k} | {_ratio_cell(r)} |")
        lines.append(f"| (faster FP32 step) | {m['ratios']['best_fp32']} |")
    lines += ["", "Compile time: " + COMPILE_NOTE, "", "Memory: " + MEM_METHOD, ""]
    return "\n".join(lines)


def environment(args, argv: list[str], models: list[str]) -> dict:
    from fxptqat.workarounds import exact_u8s8_kernels

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    meta = {"command": "python benchmarks/compile.py " + " ".join(argv), "argv": [sys.executable, *sys.argv],
            "cpu": cpu, "cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "load_average_start": [round(x, 2) for x in os.getloadavg()], "steps": args.steps, "warmup_steps": WARMUP,
            "inference_steps": inference_steps(args.steps) if args.steps else None,
            "quick": args.quick, "models": models, "lr": LR, "optimizer": "adam", "ptqat_theta": THETA,
            "avx512_vnni": bool(exact_u8s8_kernels()), "mem_method": MEM_METHOD,
            "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR", "default") if args.warm_cache
            else "a fresh empty directory (cold compiles)", "nice": os.nice(0)}
    if any(name in MODELS and name != "smallvit" for name in models):
        from benchmarks import zoo_models as zm

        meta["torchvision"] = zm.import_torchvision().__version__
    with contextlib.suppress(Exception):
        from benchmarks import zoo_models as zm

        meta["fxptqat"] = zm.fxptqat_source()
    return meta


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a tiny MLP (or --models tinyconv), 3 timed steps: a smoke run")
    p.add_argument("--json", type=Path, help=f"output JSON (default {DEFAULT_JSON}; the .md goes next to it)")
    p.add_argument("--models", nargs="+", help=f"from {sorted(MODELS)} (quick: {sorted(QUICK_MODELS)})")
    p.add_argument("--steps", type=int, help="timed steps per variant (default 20, quick 3)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warm-cache", action="store_true", help="keep inductor's usual cache (compile times then "
                   "depend on earlier runs); default: a fresh empty cache directory")
    p.add_argument("--resume", action="store_true", help="take the models a killed run completed from its "
                   ".running.json next to --json and run the rest")
    p.add_argument("--report-only", action="store_true", help="rewrite the .md (and the goals) from --json's records")
    args = p.parse_args(argv)
    if args.report_only:
        path = args.json or DEFAULT_JSON
        data = json.loads(path.read_text())
        data["goals"] = goals(data["models"])
        path.write_text(json.dumps(data, indent=1, default=str))
        path.with_suffix(".md").write_text(markdown(data))
        print(f"rewrote {path.with_suffix('.md')} from {path}")
        return 0
    catalogue = QUICK_MODELS if args.quick else MODELS
    names = args.models or list(DEFAULT_QUICK_MODELS if args.quick else DEFAULT_MODELS)
    unknown = [n for n in names if n not in catalogue]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {sorted(catalogue)}")
    args.steps = args.steps or (3 if args.quick else 20)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    path = args.json or (Path(tempfile.gettempdir()) / "compile_quick.json" if args.quick else DEFAULT_JSON)
    if args.quick and path.resolve().parent == RESULTS.resolve():
        p.error("--quick never writes into benchmarks/results/; give another --json path")
    cache = None
    if not args.warm_cache:
        cache = tempfile.mkdtemp(prefix="fxptqat_compile_bench_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    started = time.perf_counter()
    meta = environment(args, argv, names)
    log(f"compile benchmark: models {names}, {args.steps} timed steps, {args.threads} thread(s), JSON {path}")
    data = {"meta": meta, "models": [], "goals": []}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.stem + ".running.json")
    done: dict = {}
    if args.resume and partial.exists():
        # models a killed run completed: each model's ratios were measured side by side within its own run
        before = json.loads(partial.read_text())
        done = {m["model"]: m for m in before["models"] if "ratios" in m and m["model"] in names}
        if done:
            meta["resumed"] = {"models": sorted(done), "their_run": {k: before["meta"].get(k) for k in
                               ("command", "date", "load_average_start", "steps", "threads", "fxptqat")}}
            log(f"resuming: {sorted(done)} taken from {partial} (run of {before['meta'].get('date')})")
    try:
        for name in names:
            spec = catalogue[name]
            if name in done:
                data["models"].append(done[name])
                continue
            log(f"== {name}")
            try:
                rec = run_model(spec, args.steps)
            except Exception as e:  # recorded; the next model runs
                rec = {"model": name, "error": _error(e)}
                log(f"{name} failed: {type(e).__name__}: {str(e)[:300]}")
            rec["transformer"] = spec.transformer
            rec["run_date"] = meta["date"]
            data["models"].append(rec)
            partial.write_text(json.dumps(data, indent=1, default=str))
            gc.collect()
    finally:
        if cache:
            shutil.rmtree(cache, ignore_errors=True)
    meta["wall_s"] = round(time.perf_counter() - started, 1)
    meta["models_seconds_total"] = round(sum(m.get("seconds", 0) for m in data["models"]), 1)
    meta["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    data["goals"] = goals(data["models"])
    path.write_text(json.dumps(data, indent=1, default=str))
    md = markdown(data)
    path.with_suffix(".md").write_text(md)
    partial.unlink(missing_ok=True)
    print(md)
    log(f"wrote {path} and {path.with_suffix('.md')} in {meta['wall_s']:.0f} s")
    failed = [m["model"] for m in data["models"] if "ratios" not in m]
    recompiled = [g for g in data["goals"] if g["goal"] == "no recompile between timed steps" and not g["met"]]
    return 1 if failed or recompiled else 0


if __name__ == "__main__":
    sys.exit(main())
