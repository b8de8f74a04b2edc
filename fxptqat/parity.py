"""Parity between the fake-quant graph and its INT8 lowering, node by node."""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx
from tabulate import tabulate

from . import meta
from .interpreter import CheckedInterpreter

__all__ = ["ParityRow", "ParityReport", "Capture"]


class Capture(CheckedInterpreter):
    """Runs a graph and keeps the (dequantized) values of the named nodes."""

    def __init__(self, gm: fx.GraphModule, names: set[str], *, what: str):
        super().__init__(gm, check_finite=False, what=what)
        self.names = names
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node):
        value = super().run_node(n)
        if n.name in self.names and isinstance(value, torch.Tensor):
            self.values[n.name] = value.dequantize() if value.is_quantized else value
        return value


@dataclasses.dataclass(frozen=True)
class ParityRow:
    name: str
    scale: float | None  # output quantization step (None: float output, weight-only)
    tolerance: float  # allowed max |fake-quant - INT8| at this node
    max_abs: float
    max_lsb: float | None  # max_abs / scale
    frac_off: float  # share of elements that differ by more than one step (or the tolerance)

    @property
    def ok(self) -> bool:
        return self.max_abs <= self.tolerance


@dataclasses.dataclass(frozen=True)
class ParityReport:
    """Per-node comparison; ``first_divergence`` names the first node beyond its tolerance.

    Tolerance per node: ``tolerance_lsb`` output quantization steps. Where the output is float
    (weight-only), 1e-4 of the float output's range.
    """

    rows: tuple[ParityRow, ...]
    output_max_abs: float
    top1_agreement: float | None  # share of samples whose argmax agrees (2-D outputs)
    samples: int

    @property
    def first_divergence(self) -> str | None:
        return next((r.name for r in self.rows if not r.ok), None)

    @property
    def ok(self) -> bool:
        return self.first_divergence is None

    def table(self, *, tablefmt: str = "simple") -> str:
        body = [
            [r.name, f"{r.scale:.3g}" if r.scale else "float", f"{r.max_abs:.3g}",
             "" if r.max_lsb is None else f"{r.max_lsb:.2f}", f"{r.frac_off:.2%}", "ok" if r.ok else "DIVERGES"]
            for r in self.rows
        ]
        head = ["node", "out scale", "max |diff|", "max LSB", "> 1 LSB", "parity"]
        return tabulate(body, headers=head, tablefmt=tablefmt)


def observed_points(qat: fx.GraphModule) -> dict[str, tuple[str, float | None]]:
    """Weighted node -> (node whose value is compared in the QAT graph, its output scale)."""
    points = {}
    for node, info in meta.quantized_nodes(qat):
        scale = None
        if info.output_quantizer is not None:
            fq = qat.get_submodule(info.output_quantizer)
            if fq.scale.numel() == 1:
                scale = float(fq.scale)
        points[node.name] = (info.output_quantizer or node.name, scale)
    return points
