"""Command line: ``fxptqat demo``."""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    import torch
    from tabulate import tabulate

    from .demo import run_demo

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
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except Exception as e:
        from .errors import FxptqatError

        if isinstance(e, FxptqatError):
            print(f"fxptqat: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
