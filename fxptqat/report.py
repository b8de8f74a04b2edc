"""ErrorReport: per-node quantization error, rendered with tabulate, round-tripped through JSON."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator

from tabulate import tabulate

from . import report_html
from .errors import InputError
from .stats import ErrorStats

__all__ = ["ErrorRow", "ErrorReport"]


@dataclasses.dataclass(frozen=True)
class ErrorRow:
    name: str  # node name in the QAT graph
    source: str  # module in the user's model
    module_type: str
    params: int
    isolated: ErrorStats  # float inputs into the quantized node vs the float node
    propagated: ErrorStats  # quantized network vs float network at this node

    def stats(self, mode: str) -> ErrorStats:
        return getattr(self, mode)


@dataclasses.dataclass(frozen=True)
class ErrorReport:
    rows: tuple[ErrorRow, ...]
    graph_id: str
    batches: int
    samples: int

    def __iter__(self) -> Iterator[ErrorRow]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, name: str) -> ErrorRow:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"no row named {name!r}; rows: {[r.name for r in self.rows]}")

    def table(self, *, tablefmt: str = "simple", marks: dict[str, str] | None = None) -> str:
        """Text table; ``marks`` adds a column (e.g. {"conv1": "QAT"}) such as a selection."""
        headers = ["node", "type", "params", "iso MSE", "iso SQNR dB", "iso cos", "prop MSE",
                   "prop SQNR dB", "prop cos"]
        if marks is not None:
            headers.append("mode")
        body = []
        for r in self.rows:
            i, p = r.isolated, r.propagated
            line = [r.name, r.module_type, r.params, f"{i.mse:.3g}", f"{i.sqnr_db:.1f}", f"{i.cosine:.4f}",
                    f"{p.mse:.3g}", f"{p.sqnr_db:.1f}", f"{p.cosine:.4f}"]
            if marks is not None:
                line.append(marks.get(r.name, ""))
            body.append(line)
        return tabulate(body, headers=headers, tablefmt=tablefmt)

    def plots(self, *, selection=None, parity=None, sensitivity=None, policy=None) -> dict[str, bytes]:
        """PNG plots (name -> bytes) of the error per node; needs matplotlib (``fxptqat[plots]``)."""
        return report_html.plots(self, selection=selection, parity=parity, sensitivity=sensitivity, policy=policy)

    def to_html(self, path, *, selection=None, policy=None, parity=None, sensitivity=None, config=None,
                timings=None, plots: bool = True, title: str = "fxptqat sensitivity report") -> None:
        """Write a self-contained HTML report (plots embedded) to ``path``; see fxptqat/report_html.py."""
        images = (self.plots(selection=selection, parity=parity, sensitivity=sensitivity, policy=policy)
                  if plots else None)
        text = report_html.render_html(self, selection=selection, policy=policy, parity=parity,
                                       sensitivity=sensitivity, config=config, timings=timings, title=title,
                                       images=images)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)

    def to_json(self) -> str:
        return json.dumps(_encode(dataclasses.asdict(self)), indent=1)

    @classmethod
    def from_json(cls, text: str) -> ErrorReport:
        try:
            data = json.loads(text)
            rows = tuple(
                ErrorRow(
                    **{k: v for k, v in r.items() if k not in ("isolated", "propagated")},
                    isolated=ErrorStats(**_decode(r["isolated"])),
                    propagated=ErrorStats(**_decode(r["propagated"])),
                )
                for r in data["rows"]
            )
            return cls(rows=rows, graph_id=data["graph_id"], batches=data["batches"], samples=data["samples"])
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"ErrorReport.from_json: not an ErrorReport document ({e}).") from e


def _encode(obj):
    """JSON has no inf/nan: store them as the strings "inf", "-inf", "nan"."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode(v) for v in obj]
    return obj


def _decode(stats: dict) -> dict:
    """Undo _encode inside one ErrorStats dict (names elsewhere stay strings)."""
    return {k: float(v) if v in ("inf", "-inf", "nan") else v for k, v in stats.items()}
