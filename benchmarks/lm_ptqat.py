"""Does PTQAT hold for language models?  The PTQAT paper's open questions 2 and 3, inside a compute-optimal plan.

    python benchmarks/lm_ptqat.py                  # full run (~40 min on 2 cores) -> benchmarks/results/
    python benchmarks/lm_ptqat.py --report-only    # regenerate lm_ptqat.md / lm_ptqat.png from the JSON
    python benchmarks/lm_ptqat.py --quick --json /tmp/lm.json   # smoke run (< 1 min; without --json: a temp dir)

Model and data: the character-level decoder-only transformer of ``benchmarks/qat_fraction.py``
(``CharLM``: pre-LN blocks whose q, k, v, o, fc1 and fc2 are all ``nn.Linear``, causal
``scaled_dot_product_attention``, a Linear head; every Linear is quantized, the embeddings and
LayerNorms stay float), 160 wide, 4 blocks, context 64: 1.29 M parameters, 25 quantized nodes. It
is trained here in float (AdamW, WSD schedule ending at LR 0) on the Python standard library's own
sources, every 20th file held out (``load_stdlib_text``). One float model per seed.

Part 1, the PTQAT question (per seed and setting W4 weight-only, W4A8 and W3 weight-only; per
channel symmetric weights): the float model is prepared, calibrated on 4 batches of 32 training
windows and measured once (``fxptqat.measure_error`` on the same batches); every method starts from
a deep copy of that one PTQ state and is fine-tuned with the same budget: Adam at a constant LR,
the same batches in the same order, weight scales frozen at calibration (fxptqat's PTQAT
semantics); the fake-quant model's validation loss (nats per character, 256 windows of 64 held-out
characters), perplexity ``exp(val_loss)`` and next-character accuracy after each budget in
``--steps`` (with a constant LR the state after 20 steps of an 80-step run *is* a 20-step run).

Methods. ``float``; ``float_finetuned`` (the float model fine-tuned like the others: how much of a
gain is just more training, not quantization recovery); ``ptq`` (0 steps); ``qat_all``
(``AllLayers``: every quantized node; LayerNorm and embeddings stay frozen in every method);
``ptqat`` (``Threshold(0.01)``: isolated MSE below 0.01, the paper's rule);
``ptqat_sqnr``, the scale-free variant: ``Threshold(theta, metric="sqnr_db")`` with theta the median
of the layers' isolated SQNR, i.e. train the layers whose *relative* error is below the network's
median. Why: (1) absolute MSE is not scale-free: a layer whose output has 10x the power has 100x
the MSE at the same relative precision (here fc1 and the head rank as high-error only because
their outputs are large), SQNR removes the scale; (2) no fixed threshold transfers across bit
widths, in MSE or in dB: one bit moves every layer's SQNR by about 6 dB (measured here W4 -> W3:
6.5-7.5 dB), so a fixed theta trains every layer at one width and none at the next (seed 0 here:
Threshold(0.01) trains 13/25 nodes at W4 and 0/25 at W3), while the network's own median moves
with them; (3) the paper reports freezing about half the layers, which the median split does by
construction. ``adaptive`` (``Adaptive()``: Otsu split of log isolated MSE, also free of a global
scale and of the bit width); ``ptqat_inverse`` (``Count(k, keep="high")``) and ``random``
(``Random(k, seed)``) with ptqat's count k; ``sensitivity``: the k nodes with the smallest task-level
sensitivity (``fxptqat.analyze.sensitivity``: the increase of the loss on two calibration batches
with only this node quantized), PTQAT's logic applied to the task loss instead of the layer error. When Threshold(0.01) selects no node or
every node, no comparison at its count is possible: the three controls then take ptqat_sqnr's count
(``count_from`` in their records). Two methods that select the same node set train identically, so a
selection already trained is not trained again: its record is a copy with ``same_as``.

Float twins. The float model here is far from converged (1 M tokens for 1.3 M parameters), so
fine-tuning also trains it further: a method's gain mixes quantization recovery with continued
training, and training more (or more useful) layers wins on the second alone. Each setting therefore
also fine-tunes the float model on exactly the Linear layers of the reference selection (ptqat, or
ptqat_sqnr) and of ptqat_inverse (``twin_<method>``; qat_all's twin is ``float_finetuned``), with the
same batches and LR; "recovery" = method - its twin, and the summary's ``net_pairs`` compare
recoveries (a difference in differences).

Cost per method: median step time, trainable parameters, Adam state, gradient bytes, the tensors
autograd saves for backward, and the RSS high-water mark (``benchmarks/accuracy.py``'s measures).

Open question 2 (why low-error layers?): during the qat_all run and the run of the method whose
count the controls use (ptqat, or ptqat_sqnr where ptqat is degenerate), at checkpoints 0, 1/4, 1/2
and all of the budget, every node's isolated and propagated MSE on a fixed validation set (64
windows; the error of the *current* weights: fake-quant against the same weights in float), and
the L2 norm of its weight's gradient at every step (averaged per interval), grouped by that
method's selection at the PTQ state (trained vs frozen).

Part 2, inside a compute-optimal plan: ``plan_qat(mode="fused")`` at two total budgets, QAT
fractions ``m * f*`` for the multipliers in ``--plan-multipliers`` (f* = exp(-a / ln S), the formula's
prediction, is m = 1), and the QAT phase of ``fxptqat.planning.train_with_plan(policy=...)`` run with
each selection: ``AllLayers()``, ``Threshold(0.01)`` and ``Count(k, keep="high")`` with the Threshold's
k at the same switch point (the selection is made on the model at the switch step). Each run trains
from scratch (float phase, then QAT). The model is qat_fraction.py's (64 wide, 2 blocks, 106 k
quantized weights) so that S, the tokens per parameter byte, is in a range where f* is not ~0 (the
1.29 M model would need ~10x the tokens), and its all-layer curve can be read next to
``benchmarks/results/qat_fraction.md``. Weight-only W4, 2 seeds (time).

``--threads N``: N worker processes, one torch thread each, over independent jobs (one per main
seed, one per plan seed; longest first). torch's intra-op threads scale poorly on these small
matrices, the jobs not at all; the records do not depend on N (each job runs on one thread), only
the timings do (jobs share the machine).

Outputs: ``--json`` (records: one per model, setting, method, seed and budget, with
``benchmarks/results/accuracy.json``'s fields plus val_loss, perplexity and accuracy = next-character
accuracy; plan_records; q2; summary; environment), a markdown report and a PNG beside it.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/lm_ptqat.py` puts benchmarks/, not the root, on the path
    sys.path.insert(0, str(ROOT))

import fxptqat as fq  # noqa: E402
from benchmarks.accuracy import HWM_STEPS, MEM_METHOD, _reset_peak_rss, _SavedBytes, _status_bytes  # noqa: E402
from benchmarks.qat_fraction import CharLM, RandomWindows, lm_loss, load_stdlib_text, quantized_params  # noqa: E402
from fxptqat import meta  # noqa: E402
from fxptqat.analyze import sensitivity  # noqa: E402
from fxptqat.planning import plan_qat, train_with_plan  # noqa: E402
from fxptqat.training import train_steps  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_JSON = RESULTS / "lm_ptqat.json"
THETA = 0.01
SETTINGS = {"W4": (4, None), "W4A8": (4, 8), "W3": (3, None)}
TRAINED = ("qat_all", "ptqat", "ptqat_sqnr", "adaptive", "ptqat_inverse", "random", "sensitivity")
CONTROLS = ("ptqat_inverse", "random", "sensitivity")
METHODS = ("float", "float_finetuned", "ptq") + TRAINED
PLAN_SELECTIONS = ("qat_all", "ptqat", "ptqat_inverse")

__all__ = ["main", "summarize", "markdown", "plot", "spearman", "paired_stats"]


# -- small statistics -----------------------------------------------------------------------------
def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for t in range(i, j + 1):
            ranks[order[t]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation (ties get average ranks); None when undefined."""
    if len(x) != len(y) or len(x) < 3:
        return None
    rx, ry = _ranks(x), _ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    sy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return None if sx == 0 or sy == 0 else sxy / (sx * sy)


def paired_stats(diffs: list[float]) -> dict:
    """Mean, sd and standard error (sd / sqrt(n)) of per-seed paired differences."""
    n = len(diffs)
    mean = statistics.fmean(diffs) if n else math.nan
    sd = statistics.stdev(diffs) if n > 1 else math.nan
    return {"n": n, "mean": mean, "sd": sd, "se": sd / math.sqrt(n) if n > 1 else math.nan,
            "per_seed": diffs, "a_better": sum(d < 0 for d in diffs), "ties": sum(d == 0 for d in diffs)}


def _median(values):
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(vals) if vals else None


# -- data and evaluation --------------------------------------------------------------------------
_DATA: dict = {}


def data(max_chars: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The stdlib text, loaded once per process."""
    if max_chars not in _DATA:
        _DATA[max_chars] = load_stdlib_text(max_chars)
    return _DATA[max_chars]


def windows(text: torch.Tensor, count: int, context: int, offset: int = 0) -> torch.Tensor:
    """``count`` evenly spaced windows of context + 1 characters (qat_fraction.evaluate's windows at offset 0)."""
    starts = torch.linspace(0, len(text) - context - 2 - offset, count).long() + offset
    return text[starts[:, None] + torch.arange(context + 1)]


@torch.no_grad()
def evaluate_lm(model: nn.Module, chunk: torch.Tensor) -> tuple[float, float]:
    """(mean loss in nats per character, next-character accuracy) over the windows in ``chunk``."""
    was = model.training
    model.eval()
    loss = correct = 0.0
    for i in range(0, len(chunk), 128):
        part = chunk[i:i + 128]
        logits = model(part[:, :-1])
        loss += float(lm_loss(logits, part[:, 1:])) * len(part)
        correct += float((logits.argmax(-1) == part[:, 1:]).float().mean()) * len(part)
    model.train(was)
    return loss / len(chunk), correct / len(chunk)


def _stream(train: torch.Tensor, cfg: dict, seed: int):
    return iter(RandomWindows(train, cfg["batch"], cfg["context"], seed=seed))


def train_float(model: nn.Module, train: torch.Tensor, cfg: dict, seed: int) -> list[float]:
    """AdamW on a warmup-stable-decay schedule to LR 0 (fxptqat.planning's schedule, no QAT)."""
    plan = plan_qat(params=quantized_params(model), bits=4, tokens_per_step=cfg["batch"] * cfg["context"],
                    total_steps=cfg["float_steps"], fraction=0.0, warmup=0.05, cooldown=0.2)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["float_lr"], weight_decay=0.0)
    losses = train_steps(model, _stream(train, cfg, 1000 + seed), lm_loss, opt, cfg["float_steps"],
                         owner="lm_ptqat float training", scheduler=plan.scheduler(opt), max_grad_norm=1.0)
    model.eval()
    return losses


# -- measured fine-tuning with the open-question-2 trace ------------------------------------------
class Trace:
    """Per node: isolated/propagated MSE at checkpoints and its weight's gradient norm at every step."""

    def __init__(self, qat, batches, checkpoints: list[int]) -> None:
        self.qat, self.batches, self.checkpoints = qat, batches, checkpoints
        self.nodes = [(n.name, info.source, qat.get_parameter(info.weight)) for n, info in meta.quantized_nodes(qat)]
        self.iso = {name: [] for name, _, _ in self.nodes}
        self.prop = {name: [] for name, _, _ in self.nodes}
        self.grad = {name: [] for name, _, _ in self.nodes}  # per step (None: no gradient, a frozen node)

    def measure(self) -> None:
        report = fq.measure_error(self.qat, self.batches)
        for row in report.rows:
            self.iso[row.name].append(row.isolated.mse)
            self.prop[row.name].append(row.propagated.mse)

    def record_grads(self) -> None:
        for name, _, p in self.nodes:
            self.grad[name].append(None if p.grad is None else float(p.grad.norm()))

    def as_dict(self, trained_by_reference: set[str]) -> dict:
        out = {}
        bounds = list(zip(self.checkpoints[:-1], self.checkpoints[1:], strict=True))
        for name, source, p in self.nodes:
            g = self.grad[name]
            per_interval = [None if any(v is None for v in g[a:b]) else statistics.fmean(g[a:b]) for a, b in bounds]
            out[name] = {"source": source, "numel": p.numel(), "reference_trains": name in trained_by_reference,
                         "trained": p.requires_grad, "iso_mse": self.iso[name], "prop_mse": self.prop[name],
                         "grad_norm": per_interval,
                         "grad_rms": [None if v is None else v / math.sqrt(p.numel()) for v in per_interval]}
        return out


def finetune_lm(qat: nn.Module, stream, steps: tuple[int, ...], lr: float, chunk: torch.Tensor,
                trace: Trace | None = None) -> dict:
    """Adam on the parameters that require grad; validation loss after each budget in ``steps``
    (benchmarks/accuracy.py's finetune_measured with the LM loss and the q2 trace)."""
    params = [p for p in qat.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    exclude = {p.untyped_storage().data_ptr() for p in qat.parameters()}
    if trace is not None:
        trace.measure()
    qat.train()
    rss_ok = _reset_peak_rss()
    rss_before = _status_bytes("VmRSS")
    peak = None
    saved = _SavedBytes(exclude)
    times, losses, evals = [], [], {}
    for step in range(1, max(steps) + 1):
        x, y = next(stream)
        t0 = time.perf_counter()
        if step == 1:
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
                loss = lm_loss(qat(x), y)
        else:
            loss = lm_loss(qat(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if trace is not None:
            trace.record_grads()
        if step == min(HWM_STEPS, max(steps)) and rss_ok and rss_before is not None:
            hwm = _status_bytes("VmHWM")
            peak = None if hwm is None else max(hwm - rss_before, 0)
        if step in steps:
            evals[step] = evaluate_lm(qat, chunk)
            qat.train()
        if trace is not None and step in trace.checkpoints:
            trace.measure()
            qat.train()
    qat.eval()
    return dict(
        evals=evals, times=times, step_seconds=statistics.median(times[1:] if len(times) > 1 else times),
        peak_mem_bytes=peak,
        optimizer_state_bytes=sum(v.nbytes for st in opt.state.values() for v in st.values() if torch.is_tensor(v)),
        grad_bytes=sum(p.grad.nbytes for p in params if p.grad is not None), saved_activation_bytes=saved.total,
        final_train_loss=losses[-1], loss_finite=all(math.isfinite(v) for v in losses),
    )


# -- float twins: how much of a gain is continued training ---------------------------------------
def finetune_float(float_model: nn.Module, modules: set[str] | None, cfg: dict, seed: int, chunk) -> tuple[dict, int]:
    """The float model fine-tuned like the quantized ones (same batches, LR and steps), training only the
    Linear layers named in ``modules`` (all Linear layers for None; LayerNorm and embeddings frozen, as in
    every quantized method). Returns finetune_lm's output and the number of trained parameters."""
    train, _, _ = data(cfg["max_chars"])
    tuned = copy.deepcopy(float_model)
    for name, module in tuned.named_modules():
        for p in module.parameters(recurse=False):
            p.requires_grad_(isinstance(module, nn.Linear) and (modules is None or name in modules))
    torch.manual_seed(seed)
    out = finetune_lm(tuned, _stream(train, cfg, 3000 + seed), cfg["steps"], cfg["lr"], chunk)
    return out, sum(p.numel() for p in tuned.parameters() if p.requires_grad)


def _cost_fields(out: dict, b: int) -> dict:
    return dict(step_seconds=out["step_seconds"], finetune_seconds=sum(out["times"][:b]),
                peak_mem_bytes=out["peak_mem_bytes"], optimizer_state_bytes=out["optimizer_state_bytes"],
                grad_bytes=out["grad_bytes"], saved_activation_bytes=out["saved_activation_bytes"])


# -- part 1: one (seed, setting) ------------------------------------------------------------------
def sqnr_median_policy(report: fq.ErrorReport) -> fq.Threshold:
    """The scale-free PTQAT variant: train the layers whose isolated SQNR is above the network's median."""
    return fq.Threshold(statistics.median(r.isolated.sqnr_db for r in report.rows), metric="sqnr_db")


def _selections(qat, report, calib, seed: int) -> tuple[list[tuple[str, object, dict]], str, int]:
    """(method, policy or node set, extra record fields) in training order; the controls' reference and k."""
    rows = report.rows
    n = len(rows)
    ptqat = fq.Threshold(THETA)
    scale_free = sqnr_median_policy(report)
    k_ptqat = len(ptqat.choose(rows))
    reference, k = ("ptqat", k_ptqat) if 0 < k_ptqat < n else ("ptqat_sqnr", len(scale_free.choose(rows)))
    out = [("qat_all", fq.AllLayers(), {}), ("ptqat", ptqat, {}), ("ptqat_sqnr", scale_free, {}),
           ("adaptive", fq.Adaptive(), {})]
    extra = {"count_from": reference, "k": k}
    out += [("ptqat_inverse", fq.Count(k, keep="high"), extra), ("random", fq.Random(k, seed=seed), extra)]
    calib_xy = calib[:2]

    def task_score(model) -> float:  # higher is better: minus the calibration batches' loss
        with torch.no_grad():
            return -statistics.fmean(float(lm_loss(model(x), y)) for x, y in calib_xy)

    t0 = time.perf_counter()
    sens = sensitivity(qat, task_score)
    ranked = sorted(sens, key=lambda name: (sens[name]["only"], name))
    out.append(("sensitivity", set(ranked[:k]), dict(extra, sensitivity_seconds=time.perf_counter() - t0,
                                                      sensitivity={k_: v["only"] for k_, v in sens.items()})))
    return out, reference, k


def run_setting(float_model: nn.Module, setting: str, seed: int, cfg: dict, common: dict, log,
                twins: dict | None = None) -> tuple[list, list]:
    train, val, _ = data(cfg["max_chars"])
    weight_bits, act_bits = SETTINGS[setting]
    chunk = windows(val, cfg["val_windows"], cfg["context"])
    q2_chunk = windows(val, cfg["q2_windows"], cfg["context"], offset=cfg["context"] // 2 + 1)
    q2_batches = [(q2_chunk[i:i + 32, :-1],) for i in range(0, len(q2_chunk), 32)]
    calib_stream = _stream(train, cfg, 2000 + seed)
    calib = [next(calib_stream) for _ in range(cfg["calib_batches"])]
    config = fq.QuantConfig(weight_bits=weight_bits, act_bits=act_bits, leaf_modules=(nn.Embedding,))
    example = (torch.zeros(1, cfg["context"], dtype=torch.long),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        base = fq.prepare(float_model, example, config=config)
    fq.calibrate(base, calib)
    ptq_loss, ptq_acc = evaluate_lm(base, chunk)
    report = fq.measure_error(base, calib)
    n_nodes = len(report.rows)
    base_common = dict(common, setting=setting, weight_bits=weight_bits, act_bits=act_bits, per_channel=True,
                       total_params=sum(p.numel() for p in base.parameters()), quantized_nodes=n_nodes,
                       ptq_val_loss=ptq_loss, ptq_accuracy=ptq_acc)
    errors = {r.name: {"source": r.source, "params": r.params, "iso_mse": r.isolated.mse, "prop_mse": r.propagated.mse,
                       "iso_cos": r.isolated.cosine, "iso_sqnr_db": r.isolated.sqnr_db} for r in report.rows}
    zero_cost = dict(trainable_params=0, trainable_fraction=0.0, trainable_nodes=[], n_trainable_nodes=0,
                     step_seconds=0.0, finetune_seconds=0.0, peak_mem_bytes=0, optimizer_state_bytes=0, grad_bytes=0,
                     saved_activation_bytes=0)
    records = [dict(base_common, method="ptq", group="main", policy="NoLayers()", theta=None, finetune_steps=0,
                    val_loss=ptq_loss, perplexity=math.exp(ptq_loss), accuracy=ptq_acc, same_as=None,
                    node_errors=errors, **zero_cost)]
    log(f"  {setting}: PTQ {ptq_loss:.4f} nats/char")
    plan, reference, k = _selections(base, report, calib, seed)
    trained: dict[frozenset, str] = {}
    by_method: dict[str, list[dict]] = {}
    q2 = []
    ref_set = None
    twin_of: dict[str, fq.Selection] = {}
    for method, how, extra in plan:
        qat = copy.deepcopy(base)
        if isinstance(how, set):
            sel = fq.apply_selection(qat, how, policy=f"sensitivity(k={k}, lowest 'only')")
        else:
            sel = fq.select_trainable(qat, report, policy=how)
        key = frozenset(sel.trainable)
        if method == reference:
            ref_set = set(sel.trainable)
        if method in (reference, "ptqat_inverse"):
            twin_of[method] = sel
        info = dict(base_common, method=method, group="main", policy=sel.policy,
                    theta=sel.theta if sel.theta is not None else getattr(how, "theta", None),
                    trainable_params=sel.trainable_params, trainable_fraction=sel.trainable_fraction,
                    trainable_nodes=list(sel.trainable), n_trainable_nodes=len(sel.trainable), **extra)
        if not key:
            for b in cfg["steps"]:
                records.append(dict(info, **zero_cost, finetune_steps=b, val_loss=ptq_loss, perplexity=math.exp(ptq_loss),
                                    accuracy=ptq_acc, same_as="ptq"))
            log(f"    {method:14s} 0/{n_nodes} nodes -> same as ptq")
            continue
        if key in trained:
            src = trained[key]
            for rec in by_method[src]:
                records.append({**rec, **info, "same_as": src, "finetune_steps": rec["finetune_steps"]})
            log(f"    {method:14s} {len(key)}/{n_nodes} nodes -> same selection as {src}")
            continue
        traced = method in ("qat_all", reference)
        trace = Trace(qat, q2_batches, cfg["checkpoints"]) if traced else None
        torch.manual_seed(seed)
        out = finetune_lm(qat, _stream(train, cfg, 3000 + seed), cfg["steps"], cfg["lr"], chunk, trace)
        recs = []
        for b in cfg["steps"]:
            loss, acc = out["evals"][b]
            recs.append(dict(info, finetune_steps=b, val_loss=loss, perplexity=math.exp(loss), accuracy=acc,
                             same_as=None, final_train_loss=out["final_train_loss"], loss_finite=out["loss_finite"],
                             **_cost_fields(out, b)))
        trained[key], by_method[method] = method, recs
        records += recs
        if trace is not None:
            q2.append({"model": common["model"], "setting": setting, "seed": seed, "method": method,
                       "reference": reference, "checkpoints": cfg["checkpoints"], "trace": trace})
        evals = " ".join(f"@{b}:{out['evals'][b][0]:.4f}" for b in cfg["steps"])
        log(f"    {method:14s} {len(key)}/{n_nodes} nodes, {sel.trainable_fraction:6.1%} params, {evals}, "
            f"{out['step_seconds'] * 1e3:.0f} ms/step")
    # float twins of the reference selection and of its inverse: the same Linear layers fine-tuned in float
    twins = {} if twins is None else twins
    for method, sel in twin_of.items():
        modules = frozenset(sel.sources[n] for n in sel.trainable)
        cached = modules in twins
        if not cached:
            twins[modules] = dict(zip(("out", "params"), finetune_float(float_model, set(modules), cfg, seed, chunk),
                                      strict=True))
        out, n_params = twins[modules]["out"], twins[modules]["params"]
        for b in cfg["steps"]:
            loss, acc = out["evals"][b]
            records.append(dict(base_common, method="twin_" + method, group="control", twin_of=method,
                                policy=f"float, Linear layers of {method}", theta=None, finetune_steps=b, val_loss=loss,
                                perplexity=math.exp(loss), accuracy=acc, same_as=None, trainable_params=n_params,
                                trainable_fraction=n_params / base_common["total_params"],
                                trainable_nodes=list(sel.trainable), n_trainable_nodes=len(sel.trainable),
                                twin_cached=cached, **_cost_fields(out, b)))
        log(f"    twin_{method:9s} float, {len(modules)} Linear layers" + (" (cached)" if cached else "") + ", "
            + " ".join(f"@{b}:{out['evals'][b][0]:.4f}" for b in cfg["steps"]))
    q2_out = []
    for entry in q2:
        trace = entry.pop("trace")
        q2_out.append(dict(entry, reference_trainable=sorted(ref_set or ()), nodes=trace.as_dict(ref_set or set())))
    return records, q2_out


def run_seed(cfg: dict, seed: int, log) -> dict:
    train, val, _ = data(cfg["max_chars"])
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = CharLM(dim=cfg["dim"], layers=cfg["layers"], heads=cfg["heads"], context=cfg["context"])
    losses = train_float(model, train, cfg, seed)
    chunk = windows(val, cfg["val_windows"], cfg["context"])
    float_loss, float_acc = evaluate_lm(model, chunk)
    n_params = sum(p.numel() for p in model.parameters())
    float_seconds = time.perf_counter() - t0
    log(f"seed {seed}: float {float_loss:.4f} nats/char ({cfg['float_steps']} steps, {float_seconds:.0f} s)")
    common = dict(model=cfg["model_name"], dataset="stdlib-chars", seed=seed, float_val_loss=float_loss,
                  float_accuracy=float_acc, float_train_steps=cfg["float_steps"],
                  float_train_loss_last50=statistics.fmean(losses[-50:]), float_train_seconds=float_seconds,
                  lr=cfg["lr"], optimizer="adam", batch_size=cfg["batch"], context=cfg["context"],
                  calib_batches=cfg["calib_batches"], ptqat_theta=THETA, val_windows=cfg["val_windows"])
    zero = dict(trainable_params=0, trainable_fraction=0.0, n_trainable_nodes=0, trainable_nodes=[], step_seconds=0.0,
                finetune_seconds=0.0, peak_mem_bytes=0, optimizer_state_bytes=0, grad_bytes=0,
                saved_activation_bytes=0)
    records = [dict(common, setting="float", weight_bits=32, act_bits=32, per_channel=None, method="float", group="main",
                    policy=None, finetune_steps=0, val_loss=float_loss, perplexity=math.exp(float_loss),
                    accuracy=float_acc, total_params=n_params, same_as=None, **zero)]
    # the float model fine-tuned like qat_all (every Linear; LayerNorm and embeddings frozen, the same batches
    # and LR): how much of qat_all's gain is just more training
    out, n_linear = finetune_float(model, None, cfg, seed, chunk)
    for b in cfg["steps"]:
        loss, acc = out["evals"][b]
        records.append(dict(common, setting="float", weight_bits=32, act_bits=32, per_channel=None,
                            method="float_finetuned", group="control", policy=None, finetune_steps=b, val_loss=loss,
                            perplexity=math.exp(loss), accuracy=acc, total_params=n_params, same_as=None,
                            trainable_params=n_linear, trainable_fraction=n_linear / n_params, n_trainable_nodes=0,
                            trainable_nodes=[], **_cost_fields(out, b)))
    log(f"seed {seed}: float fine-tuned " + " ".join(f"@{b}:{out['evals'][b][0]:.4f}" for b in cfg["steps"]))
    q2 = []
    twins: dict[frozenset, dict] = {}  # float twins by the set of Linear modules they train (shared by settings)
    for setting in cfg["settings"]:
        recs, q = run_setting(model, setting, seed, cfg, common, log, twins)
        records += recs
        q2 += q
    log(f"seed {seed} done in {time.perf_counter() - t0:.0f} s")
    return {"records": records, "q2": q2, "seconds": time.perf_counter() - t0}


# -- part 2: selections inside a compute-optimal plan ---------------------------------------------
def plan_fractions(cfg: dict, budget: int) -> tuple[float, list[tuple[float, float]]]:
    """(f*, [(multiplier, fraction)]) for a budget: multiples of the formula's fraction, plus --plan-fractions."""
    pc = cfg["plan"]
    probe = CharLM(dim=pc["dim"], layers=pc["layers"], heads=pc["heads"], context=pc["context"])
    predicted = plan_qat(params=quantized_params(probe), bits=pc["bits"], tokens_per_step=pc["batch"] * pc["context"],
                         total_steps=budget, mode="fused").predicted_fraction
    grid: dict[float, float | None] = {}
    for m in sorted(pc["multipliers"], key=lambda m: m != 1.0):  # f* itself keeps multiplier 1 on a collision
        grid.setdefault(round(min(m * predicted, 1.0), 6), m)
    for f in pc["fractions"]:
        grid.setdefault(round(f, 6), None)
    return predicted, [(grid[f], f) for f in sorted(grid)]


def run_plan(cfg: dict, seed: int, log) -> dict:
    pc = cfg["plan"]
    train, val, _ = data(cfg["max_chars"])
    chunk = windows(val, pc["val_windows"], pc["context"])
    config = fq.QuantConfig(weight_bits=pc["bits"], act_bits=None, leaf_modules=(nn.Embedding,))
    example = (torch.zeros(1, pc["context"], dtype=torch.long),)
    records = []
    t_all = time.perf_counter()
    for budget in pc["budgets"]:
        predicted, grid = plan_fractions(cfg, budget)
        for multiplier, fraction in grid:
            done: dict[str, dict] = {}
            for selection in PLAN_SELECTIONS:
                torch.manual_seed(seed)
                model = CharLM(dim=pc["dim"], layers=pc["layers"], heads=pc["heads"], context=pc["context"])
                plan = plan_qat(params=quantized_params(model), bits=pc["bits"],
                                tokens_per_step=pc["batch"] * pc["context"], total_steps=budget, fraction=fraction,
                                mode="fused", warmup=pc["warmup"], cooldown=pc["cooldown"])
                k = done["ptqat"]["n_trainable_nodes"] if "ptqat" in done else None
                n_all = done["qat_all"]["quantized_nodes"] if "qat_all" in done else None
                # runs that would train identically (same FP phase, same node set): copy instead of rerunning
                src = None
                if selection != "qat_all" and not plan.qat_steps:
                    src = "qat_all"  # no QAT phase: every selection is the PTQ graph at the end
                elif selection == "ptqat_inverse" and k == n_all:
                    src = "qat_all"
                elif selection == "ptqat_inverse" and k == 0:
                    src = "ptqat"
                if src is not None:
                    copy_of = done[src]
                    records.append(dict(copy_of, method=selection, same_as=copy_of["same_as"] or src))
                    done[selection] = records[-1]
                    continue
                policy = {"qat_all": fq.AllLayers(), "ptqat": fq.Threshold(THETA),
                          "ptqat_inverse": fq.Count(k or 0, keep="high")}[selection]
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    run = train_with_plan(model, example, RandomWindows(train, pc["batch"], pc["context"], 1000 + seed),
                                          lm_loss, plan, config=config, lr=pc["lr"], weight_decay=0.0,
                                          max_grad_norm=1.0, calib_batches=pc["calib_batches"],
                                          policy=policy if plan.qat_steps else None)
                seconds = time.perf_counter() - t0
                loss, acc = evaluate_lm(run.qat, chunk)
                sel = run.selection
                n_nodes = len(list(meta.quantized_nodes(run.qat)))
                records.append({
                    "part": "plan", "model": pc["model_name"], "dataset": "stdlib-chars", "setting": f"W{pc['bits']}",
                    "weight_bits": pc["bits"], "act_bits": None, "seed": seed, "method": selection,
                    "policy": None if sel is None else sel.policy, "budget_steps": budget,
                    "tokens": plan.tokens, "S": plan.S, "predicted_fraction": predicted, "multiplier": multiplier,
                    "fraction": plan.fraction, "fp_steps": plan.fp_steps, "qat_steps": plan.qat_steps,
                    "trainable_nodes": [] if sel is None else list(sel.trainable),
                    "n_trainable_nodes": 0 if sel is None else len(sel.trainable), "quantized_nodes": n_nodes,
                    "trainable_params": None if sel is None else sel.trainable_params,
                    "total_params": sum(p.numel() for p in run.qat.parameters()),
                    "val_loss": loss, "perplexity": math.exp(loss), "accuracy": acc,
                    "train_loss_last20": statistics.fmean(run.losses[-20:]), "seconds": seconds,
                    "lr": pc["lr"], "batch_size": pc["batch"], "context": pc["context"], "same_as": None,
                })
                if selection == "ptqat" and set(records[-1]["trainable_nodes"]) == set(done["qat_all"]["trainable_nodes"]):
                    records[-1]["same_as"] = "qat_all"  # trained anyway (the selection is known only after FP)
                done[selection] = records[-1]
                log(f"plan seed {seed}: {budget} steps f={plan.fraction:.3f} (x{multiplier}) {selection:13s} "
                    f"{records[-1]['n_trainable_nodes']}/{n_nodes} nodes: {loss:.4f} ({seconds:.0f} s)")
    return {"plan_records": records, "seconds": time.perf_counter() - t_all}


# -- jobs -----------------------------------------------------------------------------------------
def run_job(job: tuple[str, int], cfg: dict, started: float) -> dict:
    """One independent unit of work (a main seed or a plan seed) on one torch thread."""
    torch.set_num_threads(1)
    kind, seed = job

    def log(msg: str) -> None:
        print(f"[{time.time() - started:7.0f} s] {kind}{seed}: {msg}", file=sys.stderr, flush=True)

    out = run_seed(cfg, seed, log) if kind == "main" else run_plan(cfg, seed, log)
    return dict(out, job=f"{kind}{seed}", pid=os.getpid())


def run_jobs(cfg: dict, workers: int, started: float) -> list[dict]:
    jobs = [("main", s) for s in cfg["seeds"]] if "main" in cfg["parts"] else []
    jobs += [("plan", s) for s in cfg["plan"]["seeds"]] if "plan" in cfg["parts"] else []
    if workers <= 1 or len(jobs) <= 1:
        return [run_job(j, cfg, started) for j in jobs]
    ctx = multiprocessing.get_context("spawn")  # forking a process that already ran torch ops is unsafe
    with ctx.Pool(min(workers, len(jobs)), maxtasksperchild=1) as pool:
        pending = [pool.apply_async(run_job, (j, cfg, started)) for j in jobs]  # main seeds (longest) first
        return [p.get() for p in pending]


# -- summary --------------------------------------------------------------------------------------
def _index(records):
    return {(r["setting"], r["method"], r["finetune_steps"], r["seed"]): r for r in records}


def _val(idx, setting, method, steps, seed):
    if method == "float":
        r = idx.get(("float", "float", 0, seed))
    elif method == "float_finetuned":
        r = idx.get(("float", "float_finetuned", steps, seed))
    elif method == "ptq":
        r = idx.get((setting, "ptq", 0, seed))
    else:
        r = idx.get((setting, method, steps, seed))
    return None if r is None else r["val_loss"]


def _recovery(idx, setting, method, steps, seed):
    """val_loss of a quantized method minus its float twin's (the same layers fine-tuned in float)."""
    twin = "float_finetuned" if method == "qat_all" else "twin_" + method
    a, b = _val(idx, setting, method, steps, seed), _val(idx, setting, twin, steps, seed)
    return None if a is None or b is None else a - b


def _methods(records, setting) -> list[str]:
    twins = sorted({r["method"] for r in records if r["setting"] == setting and r["method"].startswith("twin_")})
    return list(METHODS) + twins


def _pairs(records, setting) -> list[tuple[str, str]]:
    pairs = [("ptqat", "qat_all"), ("ptqat_sqnr", "qat_all"), ("adaptive", "qat_all"), ("sensitivity", "qat_all"),
             ("ptqat_inverse", "qat_all"), ("random", "qat_all")]
    refs = sorted({r.get("count_from") for r in records if r["setting"] == setting and r.get("count_from")})
    for ref in refs:
        pairs += [(ref, c) for c in CONTROLS]
    pairs += [("qat_all", "ptq"), ("qat_all", "float_finetuned"), ("ptq", "float")]
    return list(dict.fromkeys(pairs))


def summarize_q2(q2: list[dict]) -> list[dict]:
    """Per (setting, method): medians per group (trained / frozen by the reference selection) and correlations."""
    out = []
    for setting, method in dict.fromkeys((e["setting"], e["method"]) for e in q2):
        entries = [e for e in q2 if (e["setting"], e["method"]) == (setting, method)]
        groups = {}
        for label, flag in (("trained", True), ("frozen", False)):
            nodes = [n for e in entries for n in e["nodes"].values() if n["reference_trains"] == flag]

            def rel(key, nodes=nodes):
                return _median([(n[key][-1] - n[key][0]) / n[key][0] for n in nodes if n[key] and n[key][0] > 0])

            groups[label] = {
                "nodes": len(nodes),
                "median_iso_mse_0": _median([n["iso_mse"][0] for n in nodes]),
                "median_rel_change_iso_mse": rel("iso_mse"), "median_rel_change_prop_mse": rel("prop_mse"),
                "median_grad_rms_first": _median([n["grad_rms"][0] for n in nodes if n["grad_rms"]]),
                "median_grad_rms_mean": _median([statistics.fmean(n["grad_rms"]) for n in nodes
                                                 if n["grad_rms"] and None not in n["grad_rms"]]),
                "median_grad_norm_mean": _median([statistics.fmean(n["grad_norm"]) for n in nodes
                                                  if n["grad_norm"] and None not in n["grad_norm"]]),
            }
        per_seed = []
        for e in entries:
            nodes = [n for n in e["nodes"].values() if n["grad_rms"] and None not in n["grad_rms"]]
            iso0 = [n["iso_mse"][0] for n in nodes]
            per_seed.append({
                "seed": e["seed"],
                "rho_iso0_grad_rms": spearman(iso0, [statistics.fmean(n["grad_rms"]) for n in nodes]),
                "rho_iso0_grad_norm": spearman(iso0, [statistics.fmean(n["grad_norm"]) for n in nodes]),
                "rho_iso0_iso_reduction": spearman(iso0, [n["iso_mse"][0] - n["iso_mse"][-1] for n in nodes]),
                "rho_iso0_rel_iso_reduction": spearman(iso0, [(n["iso_mse"][0] - n["iso_mse"][-1]) / n["iso_mse"][0]
                                                              for n in nodes if n["iso_mse"][0] > 0]),
                "rho_iso0_prop_reduction": spearman(iso0, [n["prop_mse"][0] - n["prop_mse"][-1] for n in nodes]),
            })
        means = {}
        for key in per_seed[0] if per_seed else []:
            if key != "seed":
                vals = [p[key] for p in per_seed if p[key] is not None]
                means[key] = statistics.fmean(vals) if vals else None
        out.append({"setting": setting, "method": method, "reference": entries[0]["reference"],
                    "seeds": [e["seed"] for e in entries], "groups": groups, "correlations": per_seed,
                    "mean_correlations": means})
    return out


def summarize_plan(plan_records: list[dict]) -> list[dict]:
    out = []
    for budget in sorted({r["budget_steps"] for r in plan_records}):
        for method in PLAN_SELECTIONS:
            rows = [r for r in plan_records if r["budget_steps"] == budget and r["method"] == method]
            if not rows:
                continue
            fractions = sorted({r["fraction"] for r in rows})
            mean = [statistics.fmean(r["val_loss"] for r in rows if r["fraction"] == f) for f in fractions]
            seeds = sorted({r["seed"] for r in rows})
            best_per_seed = [min((r for r in rows if r["seed"] == s), key=lambda r: r["val_loss"])["fraction"]
                             for s in seeds]
            at_pred = [r for r in rows if r["multiplier"] == 1.0]
            ref = [r for r in plan_records if r["budget_steps"] == budget and r["method"] == "qat_all"]
            diffs = []
            for r in at_pred:
                o = [x for x in ref if x["seed"] == r["seed"] and x["multiplier"] == 1.0]
                if o:
                    diffs.append(r["val_loss"] - o[0]["val_loss"])
            out.append({
                "budget_steps": budget, "method": method, "S": rows[0]["S"], "predicted_fraction": rows[0]["predicted_fraction"],
                "fractions": fractions, "mean_val_loss": mean, "n_seeds": len(seeds),
                "best_fraction": fractions[mean.index(min(mean))], "best_val_loss": min(mean),
                "best_fraction_per_seed": best_per_seed,
                "val_loss_at_predicted": statistics.fmean(r["val_loss"] for r in at_pred) if at_pred else None,
                "minus_qat_all_at_predicted": paired_stats(diffs) if method != "qat_all" else None,
                "n_trainable_nodes": sorted({r["n_trainable_nodes"] for r in rows}),
                "quantized_nodes": rows[0]["quantized_nodes"],
            })
    return out


def summarize(result: dict) -> dict:
    records = result["records"]
    idx = _index(records)
    seeds = sorted({r["seed"] for r in records})
    settings = list(dict.fromkeys(r["setting"] for r in records if r["setting"] != "float"))
    budgets = sorted({r["finetune_steps"] for r in records if r["finetune_steps"] > 0})
    out = {"settings": {}, "budgets": budgets, "seeds": seeds}
    for setting in settings:
        methods = {}
        for method in _methods(records, setting):
            methods[method] = {}
            for b in budgets:
                vals = [v for s in seeds if (v := _val(idx, setting, method, b, s)) is not None]
                if vals:
                    m = statistics.fmean(vals)
                    methods[method][str(b)] = {"mean_val_loss": m, "perplexity_of_mean": math.exp(m),
                                               "sd": statistics.stdev(vals) if len(vals) > 1 else None, "n": len(vals)}
        pairs = []
        for a, c in _pairs(records, setting):
            for b in budgets:
                diffs = [va - vc for s in seeds if (va := _val(idx, setting, a, b, s)) is not None
                         and (vc := _val(idx, setting, c, b, s)) is not None]
                if diffs:
                    pairs.append(dict(a=a, b=c, steps=b, **paired_stats(diffs)))
        net = []  # difference in differences: (a - a's float twin) - (b - b's float twin)
        refs = sorted({r["twin_of"] for r in records if r["setting"] == setting and r.get("twin_of")})
        ref = next((m for m in refs if m != "ptqat_inverse"), None)
        for a, c in ([(ref, "ptqat_inverse"), (ref, "qat_all")] if ref else []) + [("ptqat_inverse", "qat_all")]:
            for b in budgets:
                diffs = [ra - rc for s in seeds if (ra := _recovery(idx, setting, a, b, s)) is not None
                         and (rc := _recovery(idx, setting, c, b, s)) is not None]
                if diffs:
                    net.append(dict(a=a, b=c, steps=b, **paired_stats(diffs)))
        sel, cost = {}, {}
        last = budgets[-1] if budgets else 0
        for method in TRAINED:
            recs = [r for r in records if (r["setting"], r["method"], r["finetune_steps"]) == (setting, method, last)]
            if not recs:
                continue
            sel[method] = {"n_trainable_nodes": [r["n_trainable_nodes"] for r in recs],
                           "quantized_nodes": recs[0]["quantized_nodes"],
                           "trainable_fraction": statistics.fmean(r["trainable_fraction"] for r in recs),
                           "same_as": [r["same_as"] for r in recs], "count_from": recs[0].get("count_from"),
                           "policy": [r["policy"] for r in recs]}
            real = [r for r in recs if r["same_as"] is None] or recs
            cost[method] = {key: _median([r[key] for r in real]) for key in
                            ("step_seconds", "trainable_params", "optimizer_state_bytes", "grad_bytes",
                             "saved_activation_bytes", "peak_mem_bytes")}
        out["settings"][setting] = {"methods": methods, "pairs": pairs, "net_pairs": net, "selection": sel,
                                    "cost": cost}
    out["q2"] = summarize_q2(result.get("q2", []))
    out["plan"] = summarize_plan(result.get("plan_records", []))
    return out


# -- markdown -------------------------------------------------------------------------------------
def _f(v, fmt="{:.4f}"):
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def _verdict(p: dict) -> str:
    if p["n"] < 2 or math.isnan(p["se"]):
        return "n < 2"
    if p["se"] == 0:
        return "identical" if p["mean"] == 0 else ("a better" if p["mean"] < 0 else "b better")
    z = p["mean"] / p["se"]
    if abs(z) < 2:
        return "within noise (|mean| < 2 SE)"
    return f"{'a' if z < 0 else 'b'} better ({abs(z):.1f} SE, {p['a_better'] if z < 0 else p['n'] - p['a_better'] - p['ties']}/{p['n']} seeds)"


def markdown(result: dict) -> str:
    from tabulate import tabulate

    cfg, env, summary = result["config"], result["environment"], result["summary"]
    budgets = summary["budgets"]
    lines = [
        "# PTQAT on a language model (fxptqat)", "",
        f"Character-level decoder-only transformer ({cfg['model_name']}: {cfg['layers']} blocks, width {cfg['dim']}, "
        f"{cfg['heads']} heads, context {cfg['context']}, {cfg.get('params_total', 0):,} parameters, "
        f"{cfg.get('params_quantized', 0):,} quantized weights in every nn.Linear) trained here in float for "
        f"{cfg['float_steps']} steps (batch {cfg['batch']}, AdamW {cfg['float_lr']}, WSD to 0) on the Python "
        f"{env['python']} standard library sources (every 20th file held out). Per seed and setting one PTQ state "
        f"(calibration and measure_error on {cfg['calib_batches']} batches), then every method for "
        f"{', '.join(map(str, budgets))} steps from it: Adam lr {cfg['lr']}, the same batches, weight scales frozen. "
        f"val_loss: nats per character of the fake-quant model on {cfg['val_windows']} held-out windows; "
        f"perplexity = exp(val_loss). Seeds {summary['seeds']}. Run: {result.get('run_seconds', 0) / 60:.1f} min "
        f"with {cfg['threads']} worker process(es) x 1 torch thread on {env['cpu']} ({env['cpus']} CPUs), "
        f"torch {env['torch']}, started {result.get('started', '?')}"
        + (" (quick smoke run: numbers mean nothing)" if cfg.get("quick") else "") + ".", "",
        "`a − b` columns: mean over seeds of the per-seed paired difference in val_loss (nats/char; negative: a "
        "better) ± its standard error (sd/√n).", "",
    ]
    # val loss per method
    for setting, s in summary["settings"].items():
        lines += [f"## {setting}: validation loss (nats/char; mean over seeds, ± sd)", ""]
        rows = []
        for method in s["methods"]:
            cells = [method]
            sel = s["selection"].get(method)
            cells.append("–" if sel is None else
                         f"{'/'.join(map(str, sorted(set(sel['n_trainable_nodes']))))} of {sel['quantized_nodes']}")
            for b in budgets:
                m = s["methods"][method].get(str(b))
                cells.append("–" if m is None else f"{m['mean_val_loss']:.4f}" + ("" if m["sd"] is None else
                                                                                f" ± {m['sd']:.4f}"))
            last = s["methods"][method].get(str(budgets[-1])) if budgets else None
            cells.append("–" if last is None else f"{last['perplexity_of_mean']:.4f}")
            notes = []
            if sel is not None:
                same = [x for x in sel["same_as"] if x]
                if same:
                    notes.append("= " + ", ".join(sorted(set(same))) + f" ({len(same)}/{len(sel['same_as'])} seeds)")
                if sel.get("count_from") and method in CONTROLS:
                    notes.append(f"k from {sel['count_from']}")
            cells.append("; ".join(notes))
            rows.append(cells)
        lines += [tabulate(rows, headers=["method", "nodes trained"] + [f"@{b} steps" for b in budgets]
                           + [f"ppl @{budgets[-1] if budgets else ''}", "note"], tablefmt="github"), ""]
        lines += [f"### {setting}: paired differences", ""]
        body = []
        for p in s["pairs"]:
            body.append([f"{p['a']} − {p['b']}", p["steps"], f"{p['mean']:+.4f}", _f(p["se"]),
                         ", ".join(f"{d:+.4f}" for d in p["per_seed"]), _verdict(p)])
        lines += [tabulate(body, headers=["a − b", "steps", "mean", "SE", "per seed", "verdict"], tablefmt="github",
                           disable_numparse=True), ""]
        if s.get("net_pairs"):
            lines += [f"### {setting}: net of continued training (each method minus its float twin)", "",
                      "Fine-tuning also trains the model further (float_finetuned gains too). A method's *recovery* is "
                      "its val_loss minus that of its float twin: the float model fine-tuned on the same Linear layers "
                      "with the same batches and LR (qat_all's twin: float_finetuned). Rows: recovery(a) − recovery(b).",
                      ""]
            body = [[f"{p['a']} − {p['b']}", p["steps"], f"{p['mean']:+.4f}", _f(p["se"]),
                     ", ".join(f"{d:+.4f}" for d in p["per_seed"]), _verdict(p)] for p in s["net_pairs"]]
            lines += [tabulate(body, headers=["recovery a − recovery b", "steps", "mean", "SE", "per seed", "verdict"],
                               tablefmt="github", disable_numparse=True), ""]
        lines += [f"### {setting}: cost per method (median over trained runs)", ""]
        body = [[m, _f(c["trainable_params"], "{:,.0f}"), _f(c["step_seconds"] and c["step_seconds"] * 1e3, "{:.0f}"),
                 _f(c["optimizer_state_bytes"] and c["optimizer_state_bytes"] / 1024, "{:,.0f}"),
                 _f(c["grad_bytes"] and c["grad_bytes"] / 1024, "{:,.0f}"),
                 _f(c["saved_activation_bytes"] and c["saved_activation_bytes"] / 2**20, "{:.1f}"),
                 _f(c["peak_mem_bytes"] and c["peak_mem_bytes"] / 2**20, "{:.1f}")] for m, c in s["cost"].items()]
        lines += [tabulate(body, headers=["method", "trainable params", "step ms", "Adam state KiB", "grads KiB",
                                          "saved activations MiB", "peak RSS MiB"], tablefmt="github"), ""]
    lines += ["Step times and peak RSS are measured while other jobs share the machine; " + MEM_METHOD, ""]
    # selections
    lines += ["## How many nodes each rule trains", ""]
    body = []
    for setting, s in summary["settings"].items():
        for method, sel in s["selection"].items():
            body.append([setting, method, ", ".join(map(str, sel["n_trainable_nodes"])), sel["quantized_nodes"],
                         f"{sel['trainable_fraction']:.1%}", sel["policy"][0]])
    lines += [tabulate(body, headers=["setting", "method", "nodes per seed", "of", "share of params", "policy (first seed)"],
                       tablefmt="github"), ""]
    # claims
    lines += ["## Claim by claim (the numbers; verdict: |mean| vs 2 SE of the paired differences)", ""]
    last = budgets[-1] if budgets else None
    for setting, s in summary["settings"].items():
        ps = {(p["a"], p["b"], p["steps"]): p for p in s["pairs"]}
        sel = s["selection"]
        k = sel.get("ptqat", {}).get("n_trainable_nodes")
        n = sel.get("ptqat", {}).get("quantized_nodes")
        lines.append(f"- **{setting}**: Threshold(0.01) trains {k} of {n} nodes per seed.")
        for a, b, text in (("ptqat", "qat_all", "PTQAT matches full QAT"),
                           ("ptqat_sqnr", "qat_all", "scale-free PTQAT (median SQNR) matches full QAT"),
                           ("ptqat", "ptqat_inverse", "low-error layers beat the same number of high-error layers"),
                           ("ptqat_sqnr", "ptqat_inverse", "low-error layers beat high-error layers (scale-free count)"),
                           ("ptqat", "random", "low-error layers beat random layers"),
                           ("ptqat_sqnr", "random", "low-error layers beat random layers (scale-free count)"),
                           ("ptqat", "sensitivity", "error-guided vs task-sensitivity-guided selection"),
                           ("ptqat_sqnr", "sensitivity", "error-guided (scale-free) vs task-sensitivity-guided"),
                           ("adaptive", "qat_all", "Adaptive (Otsu) matches full QAT"),
                           ("qat_all", "ptq", "QAT helps at all"),
                           ("qat_all", "float_finetuned", "gap left to the float model fine-tuned alike")):
            p = ps.get((a, b, last))
            if p is not None:
                lines.append(f"  - {text}: {a} − {b} @{last} = {p['mean']:+.4f} nats (SE {_f(p['se'])}, n {p['n']}): "
                             f"{_verdict(p)}")
        for p in s.get("net_pairs", []):
            if p["steps"] == last:
                lines.append(f"  - net of float twins (quantization recovery only): {p['a']} − {p['b']} @{last} = "
                             f"{p['mean']:+.4f} nats (SE {_f(p['se'])}, n {p['n']}): {_verdict(p)}")
    lines.append("")
    # plan
    if summary["plan"]:
        pc = cfg["plan"]
        lines += ["## Inside a compute-optimal plan (plan_qat mode='fused', train_with_plan(policy=...))", "",
                  f"{pc['model_name']} ({pc['layers']} blocks, width {pc['dim']}), W{pc['bits']} weight-only, batch "
                  f"{pc['batch']} x {pc['context']}, AdamW {pc['lr']}, warmup {pc['warmup']}, cooldown {pc['cooldown']} "
                  f"of the steps fused into QAT; seeds {pc['seeds']}; each run trains from scratch. Fractions: "
                  f"{pc['multipliers']} x f* (f* = exp(-6.73/ln S)). qat_all = AllLayers() (LayerNorm and embeddings "
                  "frozen in the QAT phase, as for every selection; qat_fraction.py trains them). val_loss on "
                  f"{pc['val_windows']} windows.", ""]
        body = []
        for c in summary["plan"]:
            d = c["minus_qat_all_at_predicted"]
            body.append([c["budget_steps"], f"{c['S']:.1f}", f"{c['predicted_fraction']:.3f}", c["method"],
                         "/".join(map(str, c["n_trainable_nodes"])) + f" of {c['quantized_nodes']}",
                         ", ".join(f"{f:.3f}: {v:.4f}" for f, v in zip(c["fractions"], c["mean_val_loss"], strict=True)),
                         f"{c['best_fraction']:.3f}", ", ".join(f"{f:.3f}" for f in c["best_fraction_per_seed"]),
                         _f(c["val_loss_at_predicted"]),
                         "–" if d is None else f"{d['mean']:+.4f} ± {_f(d['se'])}"])
        lines += [tabulate(body, headers=["steps", "S", "f*", "selection", "nodes trained", "mean val_loss per fraction",
                                          "best f", "best f per seed", "loss at f*", "− qat_all at f* (± SE)"],
                           tablefmt="github"), ""]
    # q2
    if summary["q2"]:
        lines += ["## Why low-error layers? (open question 2)", "",
                  "Groups: the nodes the reference selection (ptqat, or ptqat_sqnr where Threshold(0.01) is degenerate) "
                  "trains vs freezes at the PTQ state, pooled over seeds. Error: isolated / propagated MSE of the current "
                  "weights (fake-quant vs the same weights in float) on a fixed validation set, relative change from "
                  "step 0 to the last checkpoint. Gradient: RMS per weight element (L2 norm / √numel) of the node's "
                  "weight gradient, averaged over the steps (first interval and whole run).", ""]
        body = []
        for q in summary["q2"]:
            for label, g in q["groups"].items():
                body.append([q["setting"], q["method"], q["reference"], label, g["nodes"], _f(g["median_iso_mse_0"], "{:.3g}"),
                             _f(g["median_rel_change_iso_mse"], "{:+.1%}"), _f(g["median_rel_change_prop_mse"], "{:+.1%}"),
                             _f(g["median_grad_rms_first"], "{:.3g}"), _f(g["median_grad_rms_mean"], "{:.3g}")])
        lines += [tabulate(body, headers=["setting", "run", "groups by", "group", "nodes", "median iso MSE @0",
                                          "median Δiso MSE", "median Δprop MSE", "median grad RMS (1st)",
                                          "median grad RMS (all)"], tablefmt="github"), ""]
        body = []
        for q in summary["q2"]:
            mc = q["mean_correlations"]
            body.append([q["setting"], q["method"], _f(mc.get("rho_iso0_grad_rms"), "{:+.2f}"),
                         _f(mc.get("rho_iso0_grad_norm"), "{:+.2f}"), _f(mc.get("rho_iso0_iso_reduction"), "{:+.2f}"),
                         _f(mc.get("rho_iso0_rel_iso_reduction"), "{:+.2f}"), _f(mc.get("rho_iso0_prop_reduction"), "{:+.2f}"),
                         len(q["seeds"])])
        lines += [tabulate(body, headers=["setting", "run", "ρ(iso MSE₀, grad RMS)", "ρ(iso MSE₀, grad norm)",
                                          "ρ(iso MSE₀, iso MSE reduction)", "ρ(iso MSE₀, relative reduction)",
                                          "ρ(iso MSE₀, prop MSE reduction)", "seeds"], tablefmt="github"), "",
                  "ρ: Spearman over the nodes that have a gradient in that run, mean over seeds.", ""]
    return "\n".join(lines)


# -- plot -----------------------------------------------------------------------------------------
def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    ax = axes[0]
    last = summary["budgets"][-1] if summary["budgets"] else None
    methods = [m for m in TRAINED if m != "qat_all"]
    for i, (setting, s) in enumerate(summary["settings"].items()):
        ps = {(p["a"], p["b"], p["steps"]): p for p in s["pairs"]}
        xs, ys, es = [], [], []
        for j, m in enumerate(methods):
            p = ps.get((m, "qat_all", last))
            if p is not None:
                xs.append(j + 0.15 * (i - 1))
                ys.append(p["mean"])
                es.append(0.0 if math.isnan(p["se"]) else p["se"])
        ax.errorbar(xs, ys, yerr=es, fmt="o", capsize=3, label=setting)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
    ax.set_ylabel(f"val_loss − qat_all @{last} steps (nats/char)")
    ax.set_title("selection vs full QAT (paired, ± SE over seeds)")
    if summary["settings"]:
        ax.legend(fontsize=8)
    ax = axes[1]
    styles = {"qat_all": "-s", "ptqat": "-o", "ptqat_inverse": "--v"}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    budgets = sorted({c["budget_steps"] for c in summary["plan"]})
    for c in summary["plan"]:
        color = colors[budgets.index(c["budget_steps"]) % len(colors)]
        best = min(o["best_val_loss"] for o in summary["plan"] if o["budget_steps"] == c["budget_steps"])
        ax.plot(c["fractions"], [v - best for v in c["mean_val_loss"]], styles[c["method"]], color=color, ms=4,
                label=f"{c['budget_steps']} steps {c['method']}")
        ax.axvline(c["predicted_fraction"], color=color, ls=":", lw=1)
    if summary["plan"]:
        ax.set_xscale("log")
        ax.legend(fontsize=7)
    ax.set_xlabel("QAT fraction (log); dotted: f* = exp(-a/ln S)")
    ax.set_ylabel("val_loss − best at this budget (nats/char)")
    ax.set_title("selections inside plan_qat(mode='fused')")
    ax = axes[2]
    for entry in result.get("q2", []):
        if entry["method"] != "qat_all":
            continue
        setting = entry["setting"]
        marker = {"W4": "o", "W4A8": "s", "W3": "^"}.get(setting, "x")
        for n in entry["nodes"].values():
            if n["grad_rms"] and None not in n["grad_rms"]:
                ax.scatter(n["iso_mse"][0], statistics.fmean(n["grad_rms"]), marker=marker, s=14,
                           color="tab:red" if n["reference_trains"] else "tab:blue", alpha=0.6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("isolated MSE at the PTQ state")
    ax.set_ylabel("weight-gradient RMS during qat_all")
    ax.set_title("red: trained by the reference selection, blue: frozen\n(o W4, s W4A8, ^ W3)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- main -----------------------------------------------------------------------------------------
def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny models, 1 seed, a few steps (< 1 min)")
    p.add_argument("--report-only", action="store_true", help="only regenerate the .md and .png from --json")
    p.add_argument("--json", type=Path, default=None, help="output (default benchmarks/results/lm_ptqat.json; --quick: "
                                                           "a temporary directory)")
    p.add_argument("--parts", nargs="+", choices=("main", "plan"), default=["main", "plan"])
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=None)
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument("--steps", nargs="+", type=int, default=None, help="fine-tuning budgets evaluated (steps)")
    p.add_argument("--float-steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=1e-4, help="fine-tuning Adam LR (benchmarks/accuracy.py's)")
    p.add_argument("--dim", type=int, default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--plan-seeds", nargs="+", type=int, default=None)
    p.add_argument("--plan-budgets", nargs="+", type=int, default=None)
    p.add_argument("--plan-multipliers", nargs="+", type=float, default=None, help="QAT fractions as multiples of f*")
    p.add_argument("--plan-fractions", nargs="*", type=float, default=None, help="extra absolute QAT fractions")
    p.add_argument("--threads", type=int, default=2, help="worker processes, one torch thread each")
    return p.parse_args(argv)


def config(args) -> dict:
    q = args.quick
    dim, layers = args.dim or (32 if q else 160), args.layers or (2 if q else 4)
    steps = tuple(sorted(set(args.steps or ([2, 4] if q else [20, 80]))))
    cfg = dict(
        quick=q, parts=list(args.parts), settings=list(args.settings or SETTINGS), seeds=list(args.seeds or ([0] if q else [0, 1, 2])),
        dim=dim, layers=layers, heads=2 if q else 4, context=32 if q else 64, batch=8 if q else 32,
        model_name=f"CharLM-d{dim}-L{layers}", float_steps=args.float_steps or (30 if q else 500), float_lr=3e-3,
        steps=steps, lr=args.lr, calib_batches=2 if q else 4, val_windows=32 if q else 256,
        q2_windows=32 if q else 64, max_chars=1_000_000 if q else 12_000_000, threads=args.threads,
    )
    last = steps[-1]
    cfg["checkpoints"] = sorted({0, max(1, last // 4), max(1, last // 2), last})
    cfg["plan"] = dict(
        dim=32 if q else 64, layers=2, heads=2 if q else 4, context=32 if q else 64, batch=8 if q else 32, bits=4,
        lr=3e-3, warmup=0.05, cooldown=0.2, calib_batches=2, val_windows=32 if q else 1024,
        seeds=list(args.plan_seeds or ([0] if q else [0, 1])),
        budgets=list(args.plan_budgets or ([12, 24] if q else [300, 600])),
        multipliers=list(args.plan_multipliers or [0.4, 1.0, 2.5]),
        fractions=list(args.plan_fractions if args.plan_fractions is not None else ([0.25, 0.5] if q else [])),
    )
    cfg["plan"]["model_name"] = f"CharLM-d{cfg['plan']['dim']}-L{cfg['plan']['layers']}"
    m = CharLM(dim=dim, layers=layers, heads=cfg["heads"], context=cfg["context"])
    cfg["params_total"], cfg["params_quantized"] = sum(p.numel() for p in m.parameters()), quantized_params(m)
    return cfg


def environment(argv) -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"torch": torch.__version__, "python": platform.python_version(), "cpu": cpu, "cpus": os.cpu_count(),
            "machine": platform.machine(), "command": "python benchmarks/lm_ptqat.py " + " ".join(
                sys.argv[1:] if argv is None else argv)}


def write_report(result: dict, path: Path) -> None:
    path.with_suffix(".md").write_text(markdown(result))
    plot(result, path.with_suffix(".png"))


def main(argv=None) -> int:
    args = parse(argv)
    path = args.json
    if path is None:
        path = Path(tempfile.mkdtemp(prefix="lm_ptqat_")) / "lm_ptqat.json" if args.quick else DEFAULT_JSON
    if args.report_only:
        result = json.loads(path.read_text())
        result["summary"] = summarize(result)
        write_report(result, path)
        print(f"wrote {path.with_suffix('.md')} and {path.with_suffix('.png')} from {path}", file=sys.stderr)
        return 0
    torch.set_num_threads(1)
    cfg = config(args)
    started, stamp = time.time(), time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"lm_ptqat {stamp}: {cfg['model_name']} ({cfg['params_total']:,} params), settings {cfg['settings']}, "
          f"seeds {cfg['seeds']}, steps {cfg['steps']}, plan budgets {cfg['plan']['budgets']} seeds "
          f"{cfg['plan']['seeds']}, {args.threads} worker(s) -> {path}", file=sys.stderr, flush=True)
    outs = run_jobs(cfg, args.threads, started)
    result = {
        "environment": environment(argv), "config": cfg, "started": stamp,
        "records": [r for o in outs for r in o.get("records", [])],
        "plan_records": [r for o in outs for r in o.get("plan_records", [])],
        "q2": [e for o in outs for e in o.get("q2", [])],
        "job_seconds": {o["job"]: round(o["seconds"], 1) for o in outs},
    }
    result["run_seconds"] = round(time.time() - started, 1)
    for r in itertools.chain(result["records"], result["plan_records"]):
        r["run_started"], r["run_seconds"], r["threads"] = stamp, result["run_seconds"], args.threads
    result["summary"] = summarize(result)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(result, indent=1, default=_json_default))
    os.replace(tmp, path)
    write_report(result, path)
    print(f"wrote {len(result['records'])} + {len(result['plan_records'])} records to {path} (+ .md, .png) in "
          f"{result['run_seconds']:.0f} s", file=sys.stderr)
    return 0


def _json_default(obj):
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


if __name__ == "__main__":
    raise SystemExit(main())
