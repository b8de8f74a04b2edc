"""What check_parity returns: per weighted node rows, the other ops, the network output's verdict."""

from __future__ import annotations

import dataclasses

from tabulate import tabulate

__all__ = ["ParityRow", "ParityReport"]


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
    """``rows``: the weighted nodes compared; ``not_compared``: ``(node, reason)`` for every other
    weighted node of the fake-quant graph. The network output is judged by its mean absolute
    difference (``output_mean_abs`` against ``output_tolerance``): one-step ties add up through
    the network, so single elements may move by a few steps, but a kernel computing something else
    moves the mean (see :func:`compare`)."""

    rows: tuple[ParityRow, ...]
    output_max_abs: float
    top1_agreement: float | None  # share of samples whose argmax agrees (2-D outputs)
    samples: int
    not_compared: tuple[tuple[str, str], ...] = ()
    ops: tuple[ParityRow, ...] = ()  # every other op, fake-quant run on the lowered graph's inputs
    output_nodes: tuple[str, ...] = ()  # the ops or weighted nodes that make the network outputs
    output_mean_abs: float | None = None  # None: the output was not compared (not a tensor)
    output_tolerance: float | None = None  # on output_mean_abs, for a lowered model run outside torch
    output_scale: float | None = None  # the output quantizer's step; None for a float output

    @property
    def coverage(self) -> float:
        """Share of the graph's weighted nodes that were compared."""
        total = len(self.rows) + len(self.not_compared)
        return len(self.rows) / total if total else 0.0

    @property
    def output_ok(self) -> bool:
        """The op making the network output was compared and agrees, and a lowered model run outside
        torch (onnxruntime, inductor) is within ``output_tolerance`` of the graph it was made from.
        Where the lowering renamed that op, the output is judged end to end: mean |diff| within
        one output step."""
        verdicts = {r.name: r.ok for r in (*self.rows, *self.ops)}
        end_to_end = self.output_tolerance is None or (
            self.output_mean_abs is not None and self.output_mean_abs <= self.output_tolerance)
        if not all(n in verdicts for n in self.output_nodes):  # not compared locally: end to end only
            return self.output_tolerance is not None and end_to_end
        return all(verdicts[n] for n in self.output_nodes) and end_to_end

    @property
    def first_divergence(self) -> str | None:
        """The first weighted node (graph order) whose INT8 kernel departs from fake-quant."""
        return next((r.name for r in self.rows if not r.ok), None)

    @property
    def diverging_ops(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.ops if not r.ok)

    @property
    def ok(self) -> bool:
        """At least one weighted node compared, every compared node and op within tolerance, and the
        network output judged. Read :attr:`coverage` beside it: nodes not compared are not judged."""
        return bool(self.rows) and self.first_divergence is None and not self.diverging_ops and self.output_ok

    def table(self, *, tablefmt: str = "simple") -> str:
        def steps(r: ParityRow, v: float) -> str:
            return f"{r.lsb(v):.2f}" if r.scale else f"{v:.2g}"

        body = [
            [r.name, f"{r.scale:.3g}" if r.scale else "float", steps(r, r.isolated_max_abs),
             steps(r, r.propagated_max_abs), f"{r.propagated_frac_off:.2%}", "ok" if r.ok else "DIVERGES"]
            for r in self.rows
        ]
        body += [[name, "", "", "", "", f"not compared: {why}"] for name, why in self.not_compared]
        body += [[f"{r.name} (op)", f"{r.scale:.3g}" if r.scale else "float", steps(r, r.isolated_max_abs), "", "",
                  "DIVERGES"] for r in self.ops if not r.ok]
        head = ["node", "out step", "isolated max (steps)", "propagated max (steps)", "prop > 1 step", "parity"]
        text = tabulate(body, headers=head, tablefmt=tablefmt)
        verdict = "ok" if self.output_ok else "DIVERGES"
        if self.output_mean_abs is None:
            return text + f"\nnetwork output ({', '.join(self.output_nodes) or 'no float value'}): {verdict}, end to end not compared (not a tensor)"
        unit = (lambda v: f"{v / self.output_scale:.3g} steps") if self.output_scale else (lambda v: f"{v:.3g}")
        bound = "" if self.output_tolerance is None else f" (tolerance {unit(self.output_tolerance)})"
        return (text + f"\nnetwork output ({', '.join(self.output_nodes) or 'no float value'}): {verdict}; end to end mean |diff| "
                f"{unit(self.output_mean_abs)}{bound}, max {unit(self.output_max_abs)}; "
                f"{len(self.rows)}/{len(self.rows) + len(self.not_compared)} weighted nodes and "
                f"{len(self.ops)} other ops compared")
