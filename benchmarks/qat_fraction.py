"""How long should QAT be? A small-scale test of "Compute-Optimal Quantization-Aware Training".

A character-level transformer LM is trained from scratch on the Python standard library's own
sources (on disk everywhere Python is; files in sorted order, every 20th file held out for
validation) at several total budgets. Each run spends a fraction f of its steps in QAT: float
training for (1-f) of the steps, then ``fxptqat.prepare`` + ``calibrate`` and fake-quant training
(``fxptqat.planning.train_with_plan``), with the LR cooldown either at the end of each phase
(``separate``) or fused into QAT (``fused``). Weight-only quantization (``act_bits=None``, per-channel
symmetric, every ``nn.Linear`` incl. the output head; embeddings and LayerNorm stay float): the usual
choice for LMs, whose activations are kept in higher precision. The recorded result of a run is the
validation loss (nats per character) of the fake-quant model. Tokens are characters; N is the
number of quantized weights.

    python benchmarks/qat_fraction.py            # full run (writes benchmarks/results/qat_fraction.*)
    python benchmarks/qat_fraction.py --quick --json /tmp/q.json   # under a minute
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import sys
import sysconfig
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import fxptqat as fq
from fxptqat.planning import LossRecord, ScalingLaw, optimal_qat_fraction, plan_qat, train_with_plan

RESULTS = Path(__file__).resolve().parent / "results"
VOCAB = 128  # ASCII; anything else becomes "?"
log = logging.getLogger("qat_fraction")


# -- data ------------------------------------------------------------------------------------------
def load_stdlib_text(max_chars: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The stdlib's .py files (sorted walk, no site-packages), ASCII codes; every 20th file -> validation."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    train, val, size = [], [], 0
    for i, path in enumerate(files):
        text = Path(path).read_bytes().decode("utf-8", "replace").encode("ascii", "replace")
        (val if i % 20 == 0 else train).append(text)
        size += len(text)
        if size >= max_chars:
            break
    as_tensor = lambda parts: torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8).long()  # noqa: E731
    return as_tensor(train), as_tensor(val), len(files)


class RandomWindows:
    """Endless (x, y) batches of random windows; the generator lives in the object, so re-iterating
    continues the same stream (what train_with_plan's cycling needs)."""

    def __init__(self, data: torch.Tensor, batch: int, context: int, seed: int) -> None:
        self.data, self.batch, self.context = data, batch, context
        self.gen = torch.Generator().manual_seed(seed)

    def __iter__(self):
        while True:
            start = torch.randint(0, len(self.data) - self.context - 1, (self.batch,), generator=self.gen)
            idx = start[:, None] + torch.arange(self.context + 1)
            chunk = self.data[idx]
            yield chunk[:, :-1], chunk[:, 1:]


# -- model -----------------------------------------------------------------------------------------
class Block(nn.Module):
    """Pre-LN transformer block with explicit q/k/v Linears (traceable; nn.MultiheadAttention is not
    quantized by torch.ao's QAT prepare)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, t, d = x.size(0), x.size(1), x.size(2)
        y = self.ln1(x)
        q, k, v = (m(y).view(b, t, self.heads, -1).transpose(1, 2) for m in (self.q, self.k, self.v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(att.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class CharLM(nn.Module):
    def __init__(self, *, dim: int, layers: int, heads: int, context: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, dim), nn.Embedding(context, dim)
        self.blocks = nn.Sequential(*(Block(dim, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.size(1)))
        return self.head(self.ln(self.blocks(x)))


def quantized_params(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def lm_loss(logits, target):
    return F.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1))


@torch.no_grad()
def evaluate(model: nn.Module, val: torch.Tensor, *, windows: int, context: int) -> float:
    was = model.training
    model.eval()
    starts = torch.linspace(0, len(val) - context - 2, windows).long()
    chunk = val[starts[:, None] + torch.arange(context + 1)]
    total = 0.0
    for i in range(0, windows, 128):
        part = chunk[i:i + 128]
        total += float(lm_loss(model(part[:, :-1]), part[:, 1:])) * len(part)
    model.train(was)
    return total / windows


# -- one run ---------------------------------------------------------------------------------------
def run_one(args, data, *, budget: int, fraction: float, mode: str, bits: int, seed: int) -> dict:
    train, val = data
    torch.manual_seed(seed)
    model = CharLM(dim=args.dim, layers=args.layers, heads=args.heads, context=args.context)
    n_q = quantized_params(model)
    tokens_per_step = args.batch * args.context
    plan = plan_qat(params=n_q, bits=bits, tokens_per_step=tokens_per_step, total_steps=budget,
                    fraction=fraction, mode=mode, warmup=args.warmup, cooldown=args.cooldown,
                    qat_lr_ratio=args.qat_lr_ratio)
    loader = RandomWindows(train, args.batch, args.context, seed=1000 + seed)
    config = fq.QuantConfig(weight_bits=bits, act_bits=None, leaf_modules=(nn.Embedding,))
    example = (torch.zeros(1, args.context, dtype=torch.long),)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        run = train_with_plan(model, example, loader, lm_loss, plan, config=config, lr=args.lr,
                              weight_decay=args.weight_decay, max_grad_norm=1.0, calib_batches=2)
    seconds = time.perf_counter() - t0
    final = evaluate(run.qat, val, windows=args.val_windows, context=args.context)
    float_at_switch = evaluate(model, val, windows=args.val_windows, context=args.context)
    return {
        "budget_steps": budget, "tokens": plan.tokens, "fraction": plan.fraction, "fp_steps": plan.fp_steps,
        "qat_steps": plan.qat_steps, "bits": bits, "seed": seed, "mode": mode, "params": n_q,
        "params_total": sum(p.numel() for p in model.parameters()), "S": plan.S,
        "f_star_predicted": plan.predicted_fraction, "final_loss": final,
        "float_loss_at_switch": float_at_switch, "train_loss_last50": statistics.fmean(run.losses[-50:]),
        "seconds": seconds,
    }


# -- analysis --------------------------------------------------------------------------------------
def _interp_argmin(fractions: list[float], losses: list[float]) -> float:
    """Vertex of the parabola (in log f) through the best grid point and its neighbours."""
    i = min(range(len(losses)), key=losses.__getitem__)
    if i == 0 or i == len(losses) - 1:
        return fractions[i]
    x = [math.log(fractions[j]) for j in (i - 1, i, i + 1)]
    y = [losses[j] for j in (i - 1, i, i + 1)]
    den = (x[0] - x[1]) * (x[0] - x[2]) * (x[1] - x[2])
    a = (x[2] * (y[1] - y[0]) + x[1] * (y[0] - y[2]) + x[0] * (y[2] - y[1])) / den
    b = (x[2] ** 2 * (y[0] - y[1]) + x[1] ** 2 * (y[2] - y[0]) + x[0] ** 2 * (y[1] - y[2])) / den
    return math.exp(min(max(-b / (2 * a), x[0]), x[2])) if a > 0 else fractions[i]


def summarize(records: list[dict]) -> dict:
    qat = [r for r in records if r["qat_steps"] > 0]
    curves = []
    for mode in [m for m in ("separate", "fused") if any(r["mode"] == m for r in qat)]:
        for bits in sorted({r["bits"] for r in qat}, reverse=True):
            for budget in sorted({r["budget_steps"] for r in qat}):
                rows = [r for r in qat if (r["mode"], r["bits"], r["budget_steps"]) == (mode, bits, budget)]
                if not rows:
                    continue
                fr = sorted({r["fraction"] for r in rows})
                mean = [statistics.fmean(r["final_loss"] for r in rows if r["fraction"] == f) for f in fr]
                spread = [max(r["final_loss"] for r in rows if r["fraction"] == f)
                          - min(r["final_loss"] for r in rows if r["fraction"] == f) for f in fr]
                per_seed_best = [min((r for r in rows if r["seed"] == s), key=lambda r: r["final_loss"])["fraction"]
                                 for s in sorted({r["seed"] for r in rows})]
                curves.append({
                    "mode": mode, "bits": bits, "budget_steps": budget, "tokens": rows[0]["tokens"],
                    "S": rows[0]["S"], "f_star_predicted": rows[0]["f_star_predicted"], "fractions": fr,
                    "mean_loss": mean, "seed_range": spread, "best_fraction": fr[mean.index(min(mean))],
                    "best_fraction_interp": _interp_argmin(fr, mean), "best_fraction_per_seed": per_seed_best,
                    "best_loss": min(mean),
                    # the a that would make exp(-a / ln S) hit the interpolated optimum
                    "a_implied": -math.log(_interp_argmin(fr, mean)) * math.log(rows[0]["S"])
                    if rows[0]["S"] > 1 else None,
                })
    fusion = []
    for sep in (r for r in qat if r["mode"] == "separate"):
        match = [r for r in qat if r["mode"] == "fused" and all(r[k] == sep[k] for k in
                                                                 ("budget_steps", "fraction", "bits", "seed"))]
        if match:
            fusion.append({k: sep[k] for k in ("budget_steps", "fraction", "bits", "seed")}
                          | {"separate": sep["final_loss"], "fused": match[0]["final_loss"],
                             "fused_minus_separate": match[0]["final_loss"] - sep["final_loss"]})
    return {"curves": curves, "fusion_pairs": fusion}


def _as_record(r: dict) -> LossRecord:
    per_step = r["tokens"] / r["budget_steps"]
    return LossRecord(params=r["params"], fp_tokens=r["fp_steps"] * per_step, qat_tokens=r["qat_steps"] * per_step,
                      bits=r["bits"], loss=r["final_loss"])


def fit_law(records: list[dict], *, restarts: int, adam_steps: int = 1500, refine: int = 4) -> list[dict]:
    """Fit the loss law per mode and S_fp sign on all runs but a held-out split, and test on it.

    Splits: the largest budget (extrapolation in tokens, as a scaling law is used) and the middle
    QAT fraction at every budget (interpolation in f; baseline: the mean of the same budget, bits
    and seed's other fractions).
    """
    qat = [r for r in records if r["qat_steps"] > 0]
    budgets = sorted({r["budget_steps"] for r in qat})
    fractions = sorted({r["fraction"] for r in qat})
    middle = fractions[len(fractions) // 2]
    main_bits = max({r["bits"] for r in qat}, key=lambda b: sum(r["bits"] == b for r in qat))
    per_step = qat[0]["tokens"] / qat[0]["budget_steps"]
    splits = [(f"largest budget ({budgets[-1]} steps)", lambda r: r["budget_steps"] == budgets[-1]),
              (f"f = {middle:g} at every budget", lambda r: r["fraction"] == middle)]
    out = []
    for mode in [m for m in ("separate", "fused") if any(r["mode"] == m for r in qat)]:
        rows = [r for r in qat if r["mode"] == mode]
        for split, held_out in splits:
            fit_rows, held = [r for r in rows if not held_out(r)], [r for r in rows if held_out(r)]
            if not fit_rows or not held:
                continue
            baseline = []
            for r in held:
                same = [o["final_loss"] for o in fit_rows if all(o[k] == r[k] for k in ("budget_steps", "bits", "seed"))]
                if same:
                    baseline.append(abs(statistics.fmean(same) - r["final_loss"]))
            for sign in (1, -1):
                law = ScalingLaw.fit([_as_record(r) for r in fit_rows], sfp_sign=sign, restarts=restarts, seed=0,
                                     adam_steps=adam_steps, refine=refine)
                errors = [law.predict(*(getattr(_as_record(r), k) for k in ("params", "fp_tokens", "qat_tokens", "bits")))
                          - r["final_loss"] for r in held]
                out.append({
                    "mode": mode, "sfp_sign": sign, "heldout": split, "fit_records": len(fit_rows),
                    "heldout_records": len(held), "train_r2": law.fit_info.r2, "train_rmse": law.fit_info.rmse,
                    "heldout_mae": statistics.fmean(abs(e) for e in errors),
                    "heldout_max_abs": max(abs(e) for e in errors), "heldout_bias": statistics.fmean(errors),
                    "heldout_loss_std": statistics.pstdev([r["final_loss"] for r in held]),
                    "baseline_mae": statistics.fmean(baseline) if baseline and split.startswith("f =") else None,
                    "fixed": sorted(law.fit_info.fixed),
                    "params": {k: getattr(law.params, k) for k in law.params.__dataclass_fields__},
                    "law_optimal_fraction": {str(b): law.optimal_fraction(rows[0]["params"], b * per_step, main_bits)
                                             for b in budgets},
                    "law_bits": main_bits,
                })
    return out


# -- output ----------------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    from tabulate import tabulate

    cfg = result["config"]
    lines = [
        "# QAT fraction at small scale (fxptqat.planning)", "",
        f"Char-level transformer LM ({cfg['layers']} layers, dim {cfg['dim']}, context {cfg['context']}, "
        f"N = {cfg['params']:,} quantized weights, {cfg['params_total']:,} parameters in all) trained from "
        f"scratch on the Python {cfg['python']} standard library sources ({cfg['train_chars']:,} training, "
        f"{cfg['val_chars']:,} validation characters). Weight-only fake-quant (every Linear, per-channel "
        f"symmetric) for the last f of the steps: W{'/'.join(map(str, cfg['bits']))} at {cfg['budgets']} steps, "
        f"seeds {cfg['seeds']}"
        + (f"; W{'/'.join(map(str, cfg['extra_bits']))} at {cfg['extra_budgets']} steps, seeds {cfg['extra_seeds']}"
           if cfg.get("extra_bits") else "")
        + f". Batch {cfg['batch']} x {cfg['context']} characters; AdamW lr {cfg['lr']}, grad clip 1; WSD schedule "
        f"(warmup {cfg['warmup']}, cooldown {cfg['cooldown']} of the steps; separate mode re-warms QAT to "
        f"{cfg.get('qat_lr_ratio', 1.0)} x the peak LR); weight scales tracked every QAT step; "
        f"{cfg['val_windows']} validation windows. Loss: nats/char of the "
        f"fake-quant model on held-out files. Runtime {result['seconds'] / 60:.1f} min, 1 CPU thread"
        f"{' (' + result['rendered'] + ')' if result.get('rendered') else ''}.", "",
        "## Optimal QAT fraction per budget", "",
    ]
    rows = [[c["mode"], c["bits"], c["budget_steps"], f"{c['tokens']:.3g}", f"{c['S']:.1f}",
             f"{c['f_star_predicted']:.3f}", c["best_fraction"], f"{c['best_fraction_interp']:.3f}",
             ", ".join(map(str, c["best_fraction_per_seed"])), f"{c['best_loss']:.4f}",
             "n/a" if c["a_implied"] is None else f"{c['a_implied']:.2f}"]
            for c in result["summary"]["curves"]]
    lines += [tabulate(rows, headers=["mode", "bits", "steps", "tokens", "S", "f* = exp(-a/ln S)",
                                      "best f (grid)", "best f (interp.)", "best f per seed", "best loss",
                                      "a implied"],
                       tablefmt="github"), "",
              "best f (interp.): vertex of a parabola in log f through the best grid point and its neighbours; "
              "a implied: the a for which exp(-a/ln S) equals it (the paper's a = 6.7297).", ""]
    for key in dict.fromkeys((c["mode"], c["bits"]) for c in result["summary"]["curves"]):
        cs = [c for c in result["summary"]["curves"] if (c["mode"], c["bits"]) == key]
        if len(cs) > 1:
            found = " -> ".join(f"{c['best_fraction_interp']:.3f}" for c in cs)
            predicted = " -> ".join(f"{c['f_star_predicted']:.3f}" for c in cs)
            steps = " -> ".join(str(c["budget_steps"]) for c in cs)
            lines.append(f"- {key[0]} W{key[1]}: empirical optimum (interp.) {found} as the budget grows "
                         f"({steps} steps); exp(-a/ln S) predicts {predicted}")
    lines.append("")
    lines += ["## Final quantized loss (mean over seeds; +- half the seed range)", ""]
    curves = result["summary"]["curves"]
    if curves:
        fr = curves[0]["fractions"]
        head = ["f"] + [f"{c['mode'][:3]} W{c['bits']} {c['budget_steps']}" for c in curves]
        body = []
        for i, f in enumerate(fr):
            body.append([f] + [f"{c['mean_loss'][i]:.4f} +- {c['seed_range'][i] / 2:.4f}" if i < len(c["mean_loss"])
                               else "" for c in curves])
        lines += [tabulate(body, headers=head, tablefmt="github"), ""]
    ptq = [r for r in result["records"] if r["qat_steps"] == 0]
    if ptq:
        lines += ["PTQ baseline (f = 0: float training with its full cooldown, then calibration only): " + "; ".join(
            f"{r['budget_steps']} steps seed {r['seed']}: float {r['float_loss_at_switch']:.4f}, "
            f"W{r['bits']} PTQ {r['final_loss']:.4f}" for r in ptq), ""]
    pairs = result["summary"]["fusion_pairs"]
    if pairs:
        lines += ["## Fused vs separate cooldown at equal tokens (fused - separate; negative = fusion better)", ""]
        keys = sorted({(p["bits"], p["budget_steps"]) for p in pairs})
        frs = sorted({p["fraction"] for p in pairs})
        body = []
        for f in frs:
            row = [f]
            for key in keys:
                d = [p["fused_minus_separate"] for p in pairs if (p["bits"], p["budget_steps"]) == key and p["fraction"] == f]
                row.append(f"{statistics.fmean(d):+.4f} ({sum(x < 0 for x in d)}/{len(d)})" if d else "")
            body.append(row)
        lines += [tabulate(body, headers=["f"] + [f"W{b} {s} steps" for b, s in keys], tablefmt="github"), "",
                  "(k/n): seeds where fused was better.", ""]
        for c in (c for c in curves if c["mode"] == "fused"):
            sep = [s for s in curves if s["mode"] == "separate" and (s["bits"], s["budget_steps"])
                   == (c["bits"], c["budget_steps"])]
            if sep:
                lines.append(f"- W{c['bits']} {c['budget_steps']} steps: best fused {c['best_loss']:.4f} "
                             f"(f={c['best_fraction']}) vs best separate {sep[0]['best_loss']:.4f} "
                             f"(f={sep[0]['best_fraction']})")
        lines.append("")
    if result.get("law"):
        lines += ["## Loss law fitted on part of the runs, tested on the rest", ""]
        body = [[f["mode"], f"{f['sfp_sign']:+d}", f["heldout"], f["fit_records"], f"{f['train_r2']:.3f}",
                 f["heldout_records"], f"{f['heldout_mae']:.4f}", f"{f['heldout_max_abs']:.4f}",
                 f"{f['heldout_bias']:+.4f}", f"{f['heldout_loss_std']:.4f}",
                 "" if f["baseline_mae"] is None else f"{f['baseline_mae']:.4f}",
                 ", ".join(f"{b}: {v:.3f}" for b, v in f["law_optimal_fraction"].items())]
                for f in result["law"]]
        lines += [tabulate(body, headers=["mode", "S_fp sign", "held out", "fit n", "fit R2", "held-out n",
                                          "held-out MAE", "max |err|", "bias", "held-out loss std",
                                          "baseline MAE", f"law's optimal f (W{result['law'][0]['law_bits']})"],
                           tablefmt="github"), "",
                  "Huber loss on log loss (delta 1e-3), fxptqat.planning.ScalingLaw.fit. Baseline (middle-fraction "
                  "split): the mean loss of the same budget, bit width and seed at the other fractions. Pinned at 0 "
                  f"(not identifiable here: one model size): {', '.join(result['law'][0]['fixed'])}.", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = result["summary"]["curves"]
    modes = [m for m in ("separate", "fused") if any(c["mode"] == m for c in curves)]
    bits_list = sorted({c["bits"] for c in curves}, reverse=True)
    fig, axes = plt.subplots(len(bits_list), len(modes), figsize=(5.6 * len(modes), 4.0 * len(bits_list)),
                             squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    low = min(result["config"]["fractions"]) / 1.6
    for row, bits in enumerate(bits_list):
        for col, mode in enumerate(modes):
            ax = axes[row][col]
            for i, c in enumerate(c for c in curves if (c["mode"], c["bits"]) == (mode, bits)):
                color = colors[i % len(colors)]
                seeds = [r for r in result["records"] if r["qat_steps"] > 0 and r["mode"] == mode
                         and r["bits"] == bits and r["budget_steps"] == c["budget_steps"]]
                best = c["best_loss"]  # curves drawn relative to their own minimum: the shapes are what matter
                ax.scatter([r["fraction"] for r in seeds], [r["final_loss"] - best for r in seeds], s=8, color=color,
                           alpha=0.4)
                ax.plot(c["fractions"], [m - best for m in c["mean_loss"]], "-o", ms=3, color=color,
                        label=f"{c['budget_steps']} steps, S={c['S']:.0f}, f*={c['f_star_predicted']:.2f}, "
                              f"best {best:.3f}")
                if c["f_star_predicted"] > low:
                    ax.axvline(c["f_star_predicted"], color=color, ls="--", lw=1)
                ax.plot([c["best_fraction_interp"]], [0.0], "*", ms=12, color=color)
            ax.set_xscale("log")
            ax.set_xlim(low, 1.0)
            ax.set_xticks(result["config"]["fractions"], [f"{f:g}" for f in result["config"]["fractions"]])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel("QAT fraction f (log)")
            ax.set_ylabel("fake-quant val. loss - best at this budget (nats/char)")
            ax.set_title(f"{mode} cooldown, W{bits}")
            ax.legend(fontsize=8)
    fig.suptitle("Loss vs QAT fraction (mean of seeds; dots: seeds). Dashed: exp(-6.73 / ln S); "
                 "star: empirical optimum (interpolated)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ------------------------------------------------------------------------------------------
def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="budgets of 12 and 24 steps, 1 seed, 2 fractions (< 1 min); needs --json")
    p.add_argument("--json", help="output JSON (the .md and .png go beside it); default benchmarks/results/")
    p.add_argument("--budgets", type=int, nargs="+", help="total steps per run")
    p.add_argument("--fractions", type=float, nargs="+")
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--bits", type=int, nargs="+", default=[4])
    p.add_argument("--modes", nargs="+", default=["separate", "fused"])
    p.add_argument("--extra-bits", type=int, nargs="*", help="a second bit width, run on a smaller grid "
                   "(default 2; none with --quick)")
    p.add_argument("--extra-budgets", type=int, nargs="*", help="budgets of the extra grid (default 600)")
    p.add_argument("--extra-seeds", type=int, nargs="*", help="seeds of the extra grid (default 0)")
    p.add_argument("--render", help="only recompute the analysis, tables and plot from this JSON's records")
    p.add_argument("--no-ptq", action="store_true", help="skip the f=0 (PTQ) baseline runs")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup", type=float, default=0.05)
    p.add_argument("--cooldown", type=float, default=0.2)
    p.add_argument("--qat-lr-ratio", type=float, default=1.0, help="separate mode: peak LR of the QAT phase / base")
    p.add_argument("--val-windows", type=int, default=1024)
    p.add_argument("--max-chars", type=int, default=12_000_000)
    p.add_argument("--restarts", type=int, default=32, help="loss-law fit: random starts")
    p.add_argument("--fit-steps", type=int, default=1500, help="loss-law fit: Adam steps before L-BFGS")
    p.add_argument("--fit-refine", type=int, default=4, help="loss-law fit: best starts polished by L-BFGS")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.quick:
        args.budgets = args.budgets or [12, 24]
        args.fractions = args.fractions or [0.2, 0.6]
        args.seeds = args.seeds or [0]
        args.no_ptq, args.val_windows, args.max_chars, args.restarts, args.fit_steps = True, 128, 1_000_000, 2, 200
        args.fit_refine = 1
        args.extra_bits = args.extra_bits or []
        if not args.json:
            args.json = os.path.join(tempfile.mkdtemp(prefix="qat_fraction_"), "qat_fraction.json")
    args.budgets = args.budgets or [300, 600, 1200]
    args.fractions = args.fractions or [0.05, 0.1, 0.2, 0.4, 0.6, 0.8]
    args.seeds = args.seeds or [0, 1]
    args.extra_bits = [2] if args.extra_bits is None else args.extra_bits
    args.extra_budgets = args.extra_budgets or [600]
    args.extra_seeds = args.extra_seeds or [0]
    args.json = Path(args.json) if args.json else RESULTS / "qat_fraction.json"
    return args


def analyse(result: dict, *, restarts: int, adam_steps: int = 1500, refine: int = 4) -> dict:
    records = result["records"]
    result["summary"] = summarize(records)
    budgets = sorted({r["budget_steps"] for r in records if r["qat_steps"] > 0})
    result["law"] = fit_law(records, restarts=restarts, adam_steps=adam_steps, refine=refine) if len(budgets) >= 2 else []
    result["f_star_check"] = optimal_qat_fraction(100e9, 86e6, 4)
    return result


def write(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    path.with_suffix(".md").write_text(markdown(result))
    plot(result, path.with_suffix(".png"))


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("fxptqat").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    if args.render:
        result = analyse(json.loads(Path(args.render).read_text()), restarts=args.restarts,
                         adam_steps=args.fit_steps, refine=args.fit_refine)
        result["rendered"] = "analysis, tables and plot recomputed from these records with --render"
        write(result, args.json)
        log.info("re-rendered %s from %s", args.json, args.render)
        return result
    t0 = time.perf_counter()
    train, val, n_files = load_stdlib_text(args.max_chars)
    log.info("data: %d train / %d validation characters from %d stdlib files", len(train), len(val), n_files)
    ptq = [] if args.no_ptq else [0.0]
    jobs = [(b, f, m, bits, s) for bits in args.bits for b in args.budgets for s in args.seeds
            for f in ptq + args.fractions for m in (args.modes if f > 0 else ["separate"])]
    jobs += [(b, f, m, bits, s) for bits in args.extra_bits for b in args.extra_budgets for s in args.extra_seeds
             for f in ptq + args.fractions for m in (args.modes if f > 0 else ["separate"])]
    records = []
    for i, (budget, fraction, mode, bits, seed) in enumerate(jobs):
        r = run_one(args, (train, val), budget=budget, fraction=fraction, mode=mode, bits=bits, seed=seed)
        records.append(r)
        log.info("[%d/%d] %5d steps f=%.2f %-8s W%d seed %d: loss %.4f (float at switch %.4f) %.1fs, total %.0fs",
                 i + 1, len(jobs), budget, fraction, mode, bits, seed, r["final_loss"], r["float_loss_at_switch"],
                 r["seconds"], time.perf_counter() - t0)
    model = CharLM(dim=args.dim, layers=args.layers, heads=args.heads, context=args.context)
    result = {
        "command": "python benchmarks/qat_fraction.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": {k: getattr(args, k) for k in ("budgets", "fractions", "seeds", "bits", "modes", "extra_bits",
                                                 "extra_budgets", "extra_seeds", "dim", "layers", "heads",
                                                 "context", "batch", "lr", "weight_decay", "warmup", "cooldown", "qat_lr_ratio",
                                                 "val_windows", "max_chars", "restarts", "fit_steps", "fit_refine", "threads")}
        | {"params": quantized_params(model), "params_total": sum(p.numel() for p in model.parameters()),
           "python": platform.python_version(), "torch": torch.__version__, "train_chars": len(train),
           "val_chars": len(val), "paper_a": 6.7297},
        "records": records,
    }
    result["train_seconds"] = time.perf_counter() - t0
    analyse(result, restarts=args.restarts, adam_steps=args.fit_steps, refine=args.fit_refine)
    result["seconds"] = time.perf_counter() - t0
    write(result, args.json)
    log.info("wrote %s (+ .md, .png) in %.0f s", args.json, result["seconds"])
    return result


if __name__ == "__main__":
    main()
