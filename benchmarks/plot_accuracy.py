"""Markdown tables and a PNG plot from benchmarks/results/accuracy.json (see benchmarks/accuracy.py).

    python benchmarks/accuracy.py --report-only      # regenerates accuracy.md and accuracy.png
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path

__all__ = ["write_report", "render_markdown", "plot", "paired", "summarize_claims"]

MAIN = ("float", "ptq", "qat_all", "ptqat", "ptqat_inverse", "random", "adaptive")
ABLATIONS = ("theta_0.005", "theta_0.02", "metric_cosine", "metric_sqnr", "mode_propagated",
             "granularity_channel", "granularity_block")
ABLATION_TEXT = {
    "theta_0.005": "Threshold(0.005): isolated MSE below 0.005",
    "theta_0.02": "Threshold(0.02): isolated MSE below 0.02",
    "metric_cosine": "k lowest isolated cosine distances (k = layers ptqat trains)",
    "metric_sqnr": "k highest isolated SQNR (k = layers ptqat trains)",
    "mode_propagated": "k lowest propagated MSE (k = layers ptqat trains)",
    "granularity_channel": "per output channel: layers where at least half the channels have isolated MSE < 0.01",
    "granularity_block": "per block: whole blocks whose worst layer has isolated MSE < 0.01",
}
MARKERS = {"qat_all": ("s", "tab:blue"), "ptqat": ("o", "tab:red"), "ptqat_inverse": ("v", "tab:purple"),
           "random": ("D", "tab:gray"), "adaptive": ("^", "tab:green"), "ptq": ("x", "black")}


# -- helpers --------------------------------------------------------------------------------------
def _mean_sd(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _pct(values: list[float]) -> str:
    m, s = _mean_sd([100 * v for v in values])
    return "–" if math.isnan(m) else f"{m:.1f} ± {s:.1f}"


def _order(values, reference) -> list:
    return [v for v in reference if v in values] + sorted(v for v in values if v not in reference)


def _index(records: list[dict]) -> dict:
    """(model, setting, method, steps, seed) -> record."""
    return {(r["model"], r["setting"], r["method"], r["finetune_steps"], r["seed"]): r for r in records}


def _budgets(records: list[dict]) -> list[int]:
    return sorted({r["finetune_steps"] for r in records if r["finetune_steps"] > 0})


def _settings(records: list[dict]) -> list[str]:
    seen = []
    for r in records:
        if r["setting"] != "float" and r["setting"] not in seen:
            seen.append(r["setting"])
    return seen


def _models(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["model"] for r in records))


def _seeds(records: list[dict]) -> list[int]:
    return sorted({r["seed"] for r in records})


def _acc(idx, model, setting, method, steps, seed) -> float | None:
    """Accuracy of a method at a budget; float and ptq do not fine-tune, so any budget reads theirs."""
    if method == "float":
        r = idx.get((model, "float", "float", 0, seed))
    elif method == "ptq":
        r = idx.get((model, setting, "ptq", 0, seed))
    else:
        r = idx.get((model, setting, method, steps, seed))
    return None if r is None else r["accuracy"]


def paired(idx, model, setting, a, b, steps, seeds) -> list[float]:
    """Per-seed accuracy differences a - b (percentage points)."""
    out = []
    for s in seeds:
        x, y = _acc(idx, model, setting, a, steps, s), _acc(idx, model, setting, b, steps, s)
        if x is not None and y is not None:
            out.append(100 * (x - y))
    return out


def _beyond_noise(diffs: list[float]) -> bool:
    """All seeds agree in sign and the mean exceeds two standard errors of the paired differences."""
    if len(diffs) < 2:
        return False
    m, s = _mean_sd(diffs)
    same_sign = all(d > 0 for d in diffs) or all(d < 0 for d in diffs)
    return same_sign and abs(m) > 2 * s / math.sqrt(len(diffs))


def _diff_cell(diffs: list[float]) -> str:
    if not diffs:
        return "–"
    m, s = _mean_sd(diffs)
    mark = " **\\***" if _beyond_noise(diffs) else ""
    return f"{m:+.1f} ± {s:.1f}{mark}"


def _layers_cell(recs: list[dict]) -> str:
    ks = sorted({r["n_trainable_nodes"] for r in recs})
    n = recs[0]["quantized_nodes"]
    return (f"{ks[0]}" if len(ks) == 1 else f"{ks[0]}–{ks[-1]}") + f"/{n}"


def _same_as_cell(recs: list[dict], seeds: list[int]) -> str:
    notes = defaultdict(list)
    for r in recs:
        if r.get("same_as"):
            notes[r["same_as"]].append(r["seed"])
    if not notes:
        return ""
    parts = []
    for src, ss in notes.items():
        ss = sorted(set(ss))
        parts.append(f"= {src}" + ("" if len(ss) == len(seeds) else f" (seed {','.join(map(str, ss))})"))
    return "; ".join(parts)


def _kib(values) -> str:
    vals = [v for v in values if v is not None]
    return "–" if not vals else f"{statistics.fmean(vals) / 1024:.0f}"


def _mib(values) -> str:
    vals = [v for v in values if v is not None]
    return "–" if not vals else f"{statistics.fmean(vals) / 2**20:.1f}"


# -- markdown -------------------------------------------------------------------------------------
def render_markdown(records: list[dict]) -> str:
    idx = _index(records)
    budgets, settings, models, seeds = _budgets(records), _settings(records), _models(records), _seeds(records)
    last = budgets[-1] if budgets else 0
    r0 = records[0]
    out = [
        "# PTQAT on real data: accuracy and fine-tuning cost",
        "",
        "Generated from `accuracy.json` by `python benchmarks/accuracy.py` (or `--report-only`); do not edit.",
        f"Run started {r0.get('run_started', '?')}, {r0.get('run_seconds', '?')} s, torch {r0.get('torch_version')}, "
        f"{r0.get('threads')} thread(s), {r0.get('machine')}. Seeds {seeds}; fine-tuning budgets {budgets} steps "
        f"of batch {r0.get('batch_size')}, Adam at constant lr {r0.get('lr')}, the same batches in the same "
        "order for every method of a seed; PTQ calibration and error measurement on "
        f"{r0.get('calib_batches')} training batches. Test set: 1,000 MNIST images (one image = 0.1 point).",
        "",
        "A seed fixes the float model (init and training order) and the fine-tuning data order; the data split "
        "is the same for all seeds. Accuracies are fake-quant test accuracy in percent, mean ± sample std over "
        "seeds. **\\*** marks a paired difference that exceeds seed noise: every seed has the same sign and "
        "|mean| > 2 standard errors of the per-seed differences (a rough test with 3 seeds).",
        "",
        "## Float models",
        "",
        "| model | data | float accuracy | parameters | quantized layers | float epochs |",
        "|---|---|---|---|---|---|",
    ]
    for m in models:
        fl = [r for r in records if r["model"] == m and r["method"] == "float"]
        q = next((r for r in records if r["model"] == m and r["method"] == "ptq"), None)
        out.append(f"| {m} | {fl[0]['dataset']} | {_pct([r['accuracy'] for r in fl])} | {fl[0]['total_params']:,} | "
                   f"{q['quantized_nodes'] if q else '–'} | {fl[0].get('float_train_epochs', '–')} |")
    out += ["", "## Accuracy and cost of every method", ""]
    out += [
        "Layers: quantized layers trained / all (a range when seeds differ). Trainable: share of all parameters. "
        "Δ: paired difference to qat_all at the same budget, percentage points. Cost columns are per fine-tuning "
        "step: wall time (median step, 1 thread, shared machine: ±20% or worse), Adam state and gradient bytes "
        "(exact), activation bytes autograd saves for backward (exact), and RSS high-water mark above the "
        "RSS before fine-tuning (approximate). `= x`: the selection equals method x's, so its numbers are x's.",
        "",
    ]
    acc_heads = " | ".join(f"acc @{b}" for b in budgets)
    for setting in settings:
        out += [f"### {setting}", "",
                f"| model | method | layers | trainable | {acc_heads} | Δ vs qat_all @{last} | ms/step | "
                "Adam state KiB | grads KiB | saved act. KiB | peak RSS MiB | note |",
                "|---|---|---|---|" + "---|" * len(budgets) + "---|---|---|---|---|---|---|"]
        for m in models:
            for method in MAIN:
                if method == "float":
                    accs = [_acc(idx, m, setting, "float", 0, s) for s in seeds]
                    accs = [a for a in accs if a is not None]
                    cells = " | ".join(_pct(accs) for _ in budgets)
                    out.append(f"| {m} | float | – | – | {cells} | | | | | | | |")
                    continue
                steps_for = [0] if method == "ptq" else budgets
                recs = [idx[(m, setting, method, b, s)] for b in steps_for for s in seeds
                        if (m, setting, method, b, s) in idx]
                if not recs:
                    continue
                accs = " | ".join(_pct([a for s in seeds if (a := _acc(idx, m, setting, method, b, s)) is not None])
                                  for b in budgets)
                last_recs = [r for r in recs if r["finetune_steps"] == (0 if method == "ptq" else last)]
                delta = "" if method == "qat_all" else _diff_cell(paired(idx, m, setting, method, "qat_all", last, seeds))
                out.append(
                    f"| {m} | {method} | {_layers_cell(last_recs)} | "
                    f"{100 * statistics.fmean(r['trainable_fraction'] for r in last_recs):.0f}% | {accs} | {delta} | "
                    f"{1e3 * statistics.median(r['step_seconds'] for r in last_recs):.1f} | "
                    f"{_kib(r['optimizer_state_bytes'] for r in last_recs)} | {_kib(r['grad_bytes'] for r in last_recs)} | "
                    f"{_kib(r['saved_activation_bytes'] for r in last_recs)} | "
                    f"{_mib(r['peak_mem_bytes'] for r in last_recs)} | {_same_as_cell(last_recs, seeds)} |"
                )
        out.append("")
    out += _paired_section(idx, records, settings, models, seeds, budgets)
    out += _ablation_section(idx, records, models, seeds, budgets)
    out += _cost_section(records, settings, models, last)
    out += ["## Claims, computed from these records", ""] + [f"- {line}" for line in summarize_claims(records)]
    out += ["", "## Measurement notes", "", f"- {r0.get('mem_method', '')}",
            "- Frozen layers still pass gradients to earlier trainable layers, so activations are saved wherever "
            "a trainable layer lies upstream; only weight gradients and Adam state vanish for frozen layers.", ""]
    return "\n".join(out)


def _paired_section(idx, records, settings, models, seeds, budgets) -> list[str]:
    out = ["## Paired comparisons (per seed, percentage points)", "",
           "Each cell: mean ± std of the per-seed differences, then the differences themselves.", "",
           "| model | setting | steps | ptqat − qat_all | ptqat − ptqat_inverse | ptqat − random | "
           "adaptive − qat_all | ptqat − ptq |",
           "|---|---|---|---|---|---|---|---|"]
    pairs = [("ptqat", "qat_all"), ("ptqat", "ptqat_inverse"), ("ptqat", "random"), ("adaptive", "qat_all"),
             ("ptqat", "ptq")]
    for setting in settings:
        for m in models:
            for b in budgets:
                cells = []
                for a, c in pairs:
                    d = paired(idx, m, setting, a, c, b, seeds)
                    cells.append(f"{_diff_cell(d)} ({', '.join(f'{x:+.1f}' for x in d)})" if d else "–")
                out.append(f"| {m} | {setting} | {b} | " + " | ".join(cells) + " |")
    out.append("")
    return out


def _ablation_section(idx, records, models, seeds, budgets) -> list[str]:
    present = [a for a in ABLATIONS if any(r["method"] == a for r in records)]
    if not present:
        return []
    setting = next(r["setting"] for r in records if r["method"] in present)
    last = budgets[-1]
    acc_heads = " | ".join(f"acc @{b}" for b in budgets)
    out = [f"## Ablations ({setting})", "", "Variants of the selection rule (ptqat is Threshold(0.01) on isolated MSE, "
           "per layer). Metric and mode variants keep ptqat's number of layers k and change only the ranking; "
           "θ and granularity variants change the count.", ""]
    out += [f"- `{a}`: {ABLATION_TEXT[a]}" for a in present]
    out += ["- blocks: ResidualCNN stem / res (both convs) / down1 / branch (a, b) / down2 / fc; SmallViT "
            "patch_embed / blocks.i.attn (q, k, v, out) / blocks.i.mlp (fc1, fc2) / head; PointNet point_mlp "
            "(three shared layers) / head (fc1, fc2).", ""]
    out += [f"| model | variant | layers | trainable | {acc_heads} | Δ vs qat_all @{last} | Δ vs ptqat @{last} | note |",
            "|---|---|---|---|" + "---|" * len(budgets) + "---|---|---|"]
    for m in models:
        for method in ("qat_all", "ptqat", *present):
            recs = [idx[(m, setting, method, last, s)] for s in seeds if (m, setting, method, last, s) in idx]
            if not recs:
                continue
            accs = " | ".join(_pct([a for s in seeds if (a := _acc(idx, m, setting, method, b, s)) is not None])
                              for b in budgets)
            d_all = "" if method == "qat_all" else _diff_cell(paired(idx, m, setting, method, "qat_all", last, seeds))
            d_pt = "" if method == "ptqat" else _diff_cell(paired(idx, m, setting, method, "ptqat", last, seeds))
            out.append(f"| {m} | {method} | {_layers_cell(recs)} | "
                       f"{100 * statistics.fmean(r['trainable_fraction'] for r in recs):.0f}% | {accs} | {d_all} | "
                       f"{d_pt} | {_same_as_cell(recs, seeds)} |")
    out.append("")
    return out


def _cost_section(records, settings, models, last) -> list[str]:
    out = ["## Fine-tuning cost relative to qat_all", "",
           "Ratios of method / qat_all, averaged over models, seeds and settings where the method trained a "
           "strict, non-empty subset of the layers (copies of other selections excluded).", "",
           "| method | runs | trainable params | ms/step | Adam state | saved activations | peak RSS |",
           "|---|---|---|---|---|---|---|"]
    base = {(r["model"], r["setting"], r["seed"]): r for r in records
            if r["method"] == "qat_all" and r["finetune_steps"] == last}
    for method in ("ptqat", "ptqat_inverse", "random", "adaptive", *ABLATIONS):
        ratios = defaultdict(list)
        for r in records:
            if r["method"] != method or r["finetune_steps"] != last or r.get("same_as"):
                continue
            q = base.get((r["model"], r["setting"], r["seed"]))
            if q is None or r["n_trainable_nodes"] in (0, r["quantized_nodes"]):
                continue
            for key in ("trainable_params", "step_seconds", "optimizer_state_bytes", "saved_activation_bytes",
                        "peak_mem_bytes"):
                if r.get(key) is not None and q.get(key):
                    ratios[key].append(r[key] / q[key])
        if not ratios:
            continue
        cells = [f"{statistics.fmean(ratios[k]):.2f}" if ratios[k] else "–"
                 for k in ("trainable_params", "step_seconds", "optimizer_state_bytes", "saved_activation_bytes",
                           "peak_mem_bytes")]
        out.append(f"| {method} | {len(ratios['trainable_params'])} | " + " | ".join(cells) + " |")
    out.append("")
    return out


def summarize_claims(records: list[dict]) -> list[str]:
    """Pooled numbers behind the paper's claims (a), (b), (c)."""
    idx = _index(records)
    budgets, settings, models, seeds = _budgets(records), _settings(records), _models(records), _seeds(records)
    lines = []
    for b in budgets:
        for a, c, label in (("ptqat", "qat_all", "(a) ptqat − qat_all"), ("ptqat", "ptqat_inverse", "(b) ptqat − ptqat_inverse"),
                            ("ptqat", "random", "ptqat − random"), ("adaptive", "qat_all", "adaptive − qat_all")):
            diffs, cells, beyond = [], 0, []
            for setting in settings:
                for m in models:
                    ks = {idx[(m, setting, a, b, s)]["n_trainable_nodes"] for s in seeds if (m, setting, a, b, s) in idx}
                    n = next((idx[(m, setting, a, b, s)]["quantized_nodes"] for s in seeds if (m, setting, a, b, s) in idx), 0)
                    d = paired(idx, m, setting, a, c, b, seeds)
                    if not d or ks <= {0, n}:
                        continue  # the method trained nothing or everything: not a hybrid
                    cells += 1
                    diffs += d
                    if _beyond_noise(d):
                        beyond.append(f"{m} {setting} ({statistics.fmean(d):+.1f})")
            if not diffs:
                continue
            mean, sd = _mean_sd(diffs)
            wins, ties = sum(x > 1e-9 for x in diffs), sum(abs(x) <= 1e-9 for x in diffs)
            lines.append(
                f"{label} @{b} steps: mean {mean:+.2f} pt (SE {sd / math.sqrt(len(diffs)):.2f}) over {len(diffs)} "
                f"paired runs in {cells} (model, setting) cells where the selection is a strict subset; better in "
                f"{wins}, equal in {ties}, worse in {len(diffs) - wins - ties}; beyond seed noise in "
                f"{len(beyond)} cell(s){': ' + ', '.join(beyond) if beyond else ''}."
            )
    if budgets:  # the same comparisons per setting at the largest budget, hybrids and non-hybrids alike
        b = budgets[-1]
        for a, c, label in (("ptqat", "qat_all", "(a)"), ("ptqat", "ptqat_inverse", "(b)")):
            parts = []
            for setting in settings:
                d = [x for m in models for x in paired(idx, m, setting, a, c, b, seeds)]
                if d:
                    mean, sd = _mean_sd(d)
                    parts.append(f"{setting} {mean:+.2f} (SE {sd / math.sqrt(len(d)):.2f}, "
                                 f"{sum(x > 1e-9 for x in d)} better / {sum(x < -1e-9 for x in d)} worse of {len(d)})")
            lines.append(f"{label} {a} − {c} @{b} steps by setting, all models and seeds: " + "; ".join(parts) + ".")
    frozen = defaultdict(list)
    for r in records:
        if r["method"] == "ptqat" and r["finetune_steps"] == (budgets[-1] if budgets else 0):
            frozen[r["setting"]].append(1 - r["n_trainable_nodes"] / r["quantized_nodes"])
    for setting in settings:
        if frozen[setting]:
            lines.append(f"ptqat froze {100 * statistics.fmean(frozen[setting]):.0f}% of the quantized layers at "
                         f"{setting} on average (paper: about half).")
    return lines


# -- plot -----------------------------------------------------------------------------------------
def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = _index(records)
    budgets, settings, models, seeds = _budgets(records), _settings(records), _models(records), _seeds(records)
    last = budgets[-1]
    fig, axes = plt.subplots(len(settings), len(models), figsize=(4.2 * len(models), 3.2 * len(settings)),
                             squeeze=False)
    for i, setting in enumerate(settings):
        for j, m in enumerate(models):
            ax = axes[i][j]
            fl = [a for s in seeds if (a := _acc(idx, m, setting, "float", 0, s)) is not None]
            if fl:
                ax.axhline(100 * statistics.fmean(fl), color="black", lw=0.8, ls="--", label="float")
            for method in (*MARKERS, *ABLATIONS):
                steps = 0 if method == "ptq" else last
                recs = [idx[(m, setting, method, steps, s)] for s in seeds if (m, setting, method, steps, s) in idx]
                if not recs:
                    continue
                xs = [100 * r["trainable_fraction"] for r in recs]
                ys = [100 * r["accuracy"] for r in recs]
                marker, color = MARKERS.get(method, ("o", "lightgray"))
                ablation = method not in MARKERS
                ax.errorbar(statistics.fmean(xs), statistics.fmean(ys), yerr=_mean_sd(ys)[1], fmt=marker,
                            color=color, mfc="none" if ablation else color, ms=5 if ablation else 7, capsize=2,
                            label=None if ablation else method, zorder=2 if ablation else 3)
            ax.set_title(f"{m}, {setting}", fontsize=9)
            ax.grid(alpha=0.3)
            if i == len(settings) - 1:
                ax.set_xlabel("trainable parameters (% of all)")
            if j == 0:
                ax.set_ylabel(f"test accuracy % @{last} steps")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 7), fontsize=8)
    fig.text(0.5, 0.005, "mean ± std over seeds; open grey circles: ablation variants", ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.02, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(records: list[dict], md: Path, png: Path) -> None:
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(render_markdown(records))
    plot(records, png)
