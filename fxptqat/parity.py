"""Parity between the fake-quant graph and its INT8 lowering, node by node.

For every weighted node N two differences are measured at N's output (after its output
quantizer), in units of that quantizer's step (LSB):

* isolated: the INT8 module of N run on the fake-quant graph's own input of N (quantized onto
  the INT8 input grid, which holds it exactly) vs the fake-quant output. The float accumulation
  of fake-quant and the integer accumulation + requantization of INT8 may round a value that
  sits on a rounding boundary differently, i.e. by one step; nothing correct moves it further.
  So N *diverges* when its isolated difference exceeds ``tolerance_lsb`` (default 1) steps.
* propagated: the INT8 network vs the fake-quant network at N; one-step ties upstream add up,
  so this is reported, not judged.

A float output (weight-only graphs; conv/linear outputs that ``quantized_ops="weighted"`` keeps
float) has no step: fake-quant and INT8 then differ by float32 rounding in a dot product of
``fan_in`` terms, bounded as ``fan_in * eps`` of the output's magnitude (Higham's gamma_n with the
magnitude standing for the sum of the terms), and never less than 1e-4 of it.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx
from tabulate import tabulate

from . import meta
from .inputs import iter_batches
from .interpreter import CheckedInterpreter

__all__ = ["ParityRow", "ParityReport", "compare"]


class _Capture(CheckedInterpreter):
    """Runs the fake-quant graph and keeps the values of the named nodes."""

    def __init__(self, gm: fx.GraphModule, names: set[str]):
        super().__init__(gm, check_finite=False, what="check_parity (fake-quant)")
        self.names = names
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node):
        value = super().run_node(n)
        if n.name in self.names:
            self.values[n.name] = value
        return value


class _Int8Run(CheckedInterpreter):
    """Runs the INT8 graph; at each weighted node also runs it on the fake-quant input."""

    def __init__(self, gm: fx.GraphModule, inputs: dict[str, torch.Tensor]):
        super().__init__(gm, check_finite=False, what="check_parity (INT8)")
        self.inputs = inputs
        self.propagated: dict[str, torch.Tensor] = {}
        self.isolated: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node):
        value = super().run_node(n)
        if n.name in self.inputs and n.op == "call_module":
            live = self.env[n.args[0]]
            x = self.inputs[n.name]
            if live.is_quantized:
                x = torch.quantize_per_tensor(x, live.q_scale(), live.q_zero_point(), live.dtype)
            alone = self.fetch_attr(n.target)(x, *[self.env[a] for a in n.args[1:]])
            self.isolated[n.name] = alone.dequantize() if alone.is_quantized else alone
            self.propagated[n.name] = value.dequantize() if value.is_quantized else value
        return value


@dataclasses.dataclass(frozen=True)
class ParityRow:
    name: str
    scale: float | None  # output quantization step; None for float (weight-only) outputs
    tolerance: float  # allowed isolated max |fake-quant - INT8|
    isolated_max_abs: float
    propagated_max_abs: float
    propagated_frac_off: float  # share of elements more than one step apart (propagated)

    @property
    def ok(self) -> bool:
        return self.isolated_max_abs <= self.tolerance

    def lsb(self, value: float) -> float | None:
        return value / self.scale if self.scale else None


@dataclasses.dataclass(frozen=True)
class ParityReport:
    rows: tuple[ParityRow, ...]
    output_max_abs: float
    top1_agreement: float | None  # share of samples whose argmax agrees (2-D outputs)
    samples: int

    @property
    def first_divergence(self) -> str | None:
        """The first weighted node (graph order) whose INT8 kernel departs from fake-quant."""
        return next((r.name for r in self.rows if not r.ok), None)

    @property
    def ok(self) -> bool:
        return self.first_divergence is None

    def table(self, *, tablefmt: str = "simple") -> str:
        def steps(r: ParityRow, v: float) -> str:
            return f"{r.lsb(v):.2f}" if r.scale else f"{v:.2g}"

        body = [
            [r.name, f"{r.scale:.3g}" if r.scale else "float", steps(r, r.isolated_max_abs),
             steps(r, r.propagated_max_abs), f"{r.propagated_frac_off:.2%}", "ok" if r.ok else "DIVERGES"]
            for r in self.rows
        ]
        head = ["node", "out step", "isolated max (steps)", "propagated max (steps)", "prop > 1 step", "parity"]
        return tabulate(body, headers=head, tablefmt=tablefmt)


def compare(qat: fx.GraphModule, int8: fx.GraphModule, batches, *, tolerance_lsb: float, run=None) -> ParityReport:
    """``run``: the lowered model whose network output is compared, when ``int8`` is only its graph:
    a reference graph, whose modules return float values that its next Q/DQ pair (the same scale
    and zero point as the fake-quant output quantizer) puts on the grid; that pair is applied here."""
    points = {}  # weighted node -> (its input node, node compared, output step)
    fan_in = {}  # weighted node -> products summed per output element
    for node, info in meta.quantized_nodes(qat):
        module = qat.get_submodule(node.target)
        outputs = getattr(module, "out_channels", None) or getattr(module, "out_features", None) or 1
        fan_in[node.name] = max(1, module.weight.numel() // outputs)
        scale = None
        if info.output_quantizer is not None:
            fq = qat.get_submodule(info.output_quantizer)
            scale = float(fq.scale) if fq.scale.numel() == 1 else None
        points[node.name] = (node.args[0].name, info.output_quantizer or node.name, scale)
    int8_nodes = {n.name for n in int8.graph.nodes if n.op == "call_module"}
    points = {k: v for k, v in points.items() if k in int8_nodes}
    acc = {name: [0.0, 0.0, 0, 0, 0.0] for name in points}  # iso, prop, off, count, magnitude
    out_max, agree, samples = 0.0, 0, 0
    for args in iter_batches(batches, qat, what="check_parity()"):
        cap = _Capture(qat, {p for v in points.values() for p in v[:2]})
        q_out = cap.run(*args)
        runner = _Int8Run(int8, {name: cap.values[inp] for name, (inp, _, _) in points.items()})
        i_out = runner.run(*args)
        if run is not None:
            i_out = run(*args)
        for name, (_, point, scale) in points.items():
            ref = cap.values[point]
            isolated, propagated = runner.isolated[name], runner.propagated[name]
            if run is not None and point != name:
                grid = qat.get_submodule(point)
                isolated, propagated = grid(isolated), grid(propagated)
            a = acc[name]
            a[0] = max(a[0], float((isolated - ref).abs().max()))
            diff = (propagated - ref).abs()
            a[1] = max(a[1], float(diff.max()))
            a[2] += int((diff > (scale or 0.0) * 1.001).sum()) if scale else 0
            a[3] += diff.numel()
            a[4] = max(a[4], float(ref.abs().max()))
        if isinstance(q_out, torch.Tensor) and isinstance(i_out, torch.Tensor):
            i_out = i_out.dequantize() if i_out.is_quantized else i_out
            out_max = max(out_max, float((q_out - i_out).abs().max()))
            if q_out.dim() == 2:
                agree += int((q_out.argmax(1) == i_out.argmax(1)).sum())
                samples += q_out.shape[0]
    rows = []
    for name, (_, _, scale) in points.items():
        iso, prop, off, count, magnitude = acc[name]
        relative = max(1e-4, fan_in[name] * torch.finfo(torch.float32).eps)
        tol = tolerance_lsb * scale * (1 + 1e-3) if scale else relative * magnitude + 1e-6
        rows.append(ParityRow(name, scale, tol, iso, prop, off / max(count, 1)))
    return ParityReport(tuple(rows), out_max, agree / samples if samples else None, samples)
