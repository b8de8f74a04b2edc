"""Selection policies: which quantized nodes get QAT, and the Selection they produce.

Error is oriented so that larger means worse: ``mse`` as is, ``cosine`` as the cosine distance
``1 - cosine``, ``sqnr_db`` negated. A node is "below threshold" (low error) when
``mse < theta``, ``1 - cosine < theta`` or ``sqnr_db > theta``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections.abc import Sequence

import torch.fx as fx

from fxptqat.passes.mark_trainable import mark_trainable

from . import meta
from .config import _choice, check_finite, strict_options
from .errors import ConfigError, InputError
from .report import ErrorRow
from .stats import badness as stats_badness

__all__ = [
    "Threshold", "Fraction", "Count", "Random", "AllLayers", "NoLayers", "Adaptive", "Selection",
    "badness",
]

METRICS = ("mse", "cosine", "sqnr_db")
MODES = ("isolated", "propagated")
KEEPS = ("low", "high")


def badness(row: ErrorRow, metric: str, mode: str) -> float:
    return stats_badness(row.stats(mode), metric)


def _check_common(owner: str, metric: str, mode: str, keep: str) -> None:
    _choice(owner, "metric", metric, METRICS)
    _choice(owner, "mode", mode, MODES)
    _choice(owner, "keep", keep, KEEPS)


def _ranked(rows: Sequence[ErrorRow], metric: str, mode: str, keep: str) -> list[ErrorRow]:
    """Rows in the order they are taken: lowest error first for keep="low"."""
    return sorted(rows, key=lambda r: badness(r, metric, mode), reverse=keep == "high")


@strict_options
@dataclasses.dataclass(frozen=True)
class Threshold:
    """PTQAT: train nodes whose error is below ``theta`` (keep="low"); keep="high" inverts."""

    theta: float = 0.01
    metric: str = "mse"
    mode: str = "isolated"
    keep: str = "low"

    def __post_init__(self) -> None:
        _check_common("Threshold", self.metric, self.mode, self.keep)
        minimum = None if self.metric == "sqnr_db" else 0.0
        object.__setattr__(self, "theta", check_finite("Threshold", "theta", self.theta, minimum=minimum))

    def choose(self, rows: Sequence[ErrorRow]) -> set[str]:
        bound = -self.theta if self.metric == "sqnr_db" else self.theta
        low = {r.name for r in rows if badness(r, self.metric, self.mode) < bound}
        return low if self.keep == "low" else {r.name for r in rows} - low


@strict_options
@dataclasses.dataclass(frozen=True)
class Fraction:
    """Train the lowest-error (or highest, keep="high") nodes until ``fraction`` of the
    quantized parameters are trainable."""

    fraction: float
    metric: str = "mse"
    mode: str = "isolated"
    keep: str = "low"

    def __post_init__(self) -> None:
        _check_common("Fraction", self.metric, self.mode, self.keep)
        f = check_finite("Fraction", "fraction", self.fraction)
        if not 0.0 < f <= 1.0:
            raise ConfigError(f"Fraction: fraction must be in (0, 1], got {f}.")
        object.__setattr__(self, "fraction", f)

    def choose(self, rows: Sequence[ErrorRow]) -> set[str]:
        target = self.fraction * sum(r.params for r in rows)
        chosen, total = set(), 0
        for r in _ranked(rows, self.metric, self.mode, self.keep):
            if total >= target:
                break
            chosen.add(r.name)
            total += r.params
        return chosen


@strict_options
@dataclasses.dataclass(frozen=True)
class Count:
    """Train the ``k`` lowest-error (keep="low") or highest-error (keep="high") nodes."""

    k: int
    metric: str = "mse"
    mode: str = "isolated"
    keep: str = "low"

    def __post_init__(self) -> None:
        _check_common("Count", self.metric, self.mode, self.keep)
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 0:
            raise ConfigError(f"Count: k must be a non-negative int, got {self.k!r}.")

    def choose(self, rows: Sequence[ErrorRow]) -> set[str]:
        return {r.name for r in _ranked(rows, self.metric, self.mode, self.keep)[: self.k]}


@strict_options
@dataclasses.dataclass(frozen=True)
class Random:
    """Train ``k`` nodes drawn at random (seeded): the control for error-guided selection."""

    k: int
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 0:
            raise ConfigError(f"Random: k must be a non-negative int, got {self.k!r}.")

    def choose(self, rows: Sequence[ErrorRow]) -> set[str]:
        names = sorted(r.name for r in rows)
        return set(random.Random(self.seed).sample(names, min(self.k, len(names))))


@dataclasses.dataclass(frozen=True)
class AllLayers:
    """Full QAT: every quantized node is trainable."""

    def choose(self, rows: Sequence[ErrorRow]) -> set[str]:
        return {r.name for r in rows}


@dataclasses.dataclass(frozen=True)
class NoLayers:
    """PTQ only: every quantized node is frozen."""

    def choose(self, rows: Sequence[ErrorRow]) -> set[str]:
        return set()


@strict_options
@dataclasses.dataclass(frozen=True)
class Adaptive:
    """PTQAT without a hand-picked theta.

    The errors of a network's layers spread over orders of magnitude, so the rule works on
    ``log10(error)``: it splits the sorted values into a low and a high group where the
    between-group variance is largest (Otsu's criterion, exhaustive over the n-1 cut points),
    and trains the low group. The chosen theta is the geometric mean of the two values at the
    cut and is reported on the Selection. With fewer than two finite errors, or all errors equal,
    every node is trained.
    """

    metric: str = "mse"
    mode: str = "isolated"

    def __post_init__(self) -> None:
        _check_common("Adaptive", self.metric, self.mode, "low")

    def _split(self, rows: Sequence[ErrorRow]) -> tuple[list[ErrorRow], float] | None:
        """(rows in the low group, theta), or None when the errors do not split."""
        ranked = sorted(rows, key=lambda r: badness(r, self.metric, self.mode))
        values = [badness(r, self.metric, self.mode) for r in ranked]
        # sqnr_db is already logarithmic (dB); the others are taken to log10
        logs = values if self.metric == "sqnr_db" else [math.log10(max(v, 1e-30)) for v in values]
        if len(logs) < 2 or not all(math.isfinite(v) for v in logs):
            return None
        best, cut = 0.0, 0
        for i in range(1, len(logs)):
            lo, hi = logs[:i], logs[i:]
            score = len(lo) * len(hi) * (sum(lo) / len(lo) - sum(hi) / len(hi)) ** 2
            if score > best:
                best, cut = score, i
        if cut == 0:  # every error equal: no low group to speak of
            return None
        mid = (logs[cut - 1] + logs[cut]) / 2
        return ranked[:cut], (-mid if self.metric == "sqnr_db" else 10**mid)

    def theta(self, rows: Sequence[ErrorRow]) -> float | None:
        split = self._split(rows)
        return None if split is None else split[1]

    def choose(self, rows: Sequence[ErrorRow]) -> set[str]:
        split = self._split(rows)
        if split is None:
            return {r.name for r in rows}
        return {r.name for r in split[0]}


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which quantized nodes train (QAT) and which stay frozen at PTQ."""

    trainable: tuple[str, ...]
    frozen: tuple[str, ...]
    trainable_params: int
    total_params: int
    policy: str
    graph_id: str
    sources: dict[str, str]  # node name -> module name in the user's model
    theta: float | None = None
    fingerprint: str = ""  # quantized structure it was made for (fxptqat.meta.fingerprint)

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Selection:
        try:
            data = json.loads(text)
            data["trainable"] = tuple(data["trainable"])
            data["frozen"] = tuple(data["frozen"])
            return cls(**data)
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"Selection.from_json: not a Selection document ({e}).") from e


def mark_selection(
    qat: fx.GraphModule, trainable: set[str], *, policy: str, bn_stats: str, float_params: str,
    theta: float | None, graph_id: str,
) -> Selection:
    """Mark ``trainable`` (node names) trainable, freeze the rest (passes/mark_trainable.py), and
    describe the result; nodes with tied weights train together."""
    mark_trainable(qat, trainable=frozenset(trainable), bn_stats=bn_stats, float_params=float_params)
    nodes = list(meta.quantized_nodes(qat))
    trainable = {n.name for n, i in nodes if i.trainable}
    return Selection(
        trainable=tuple(n.name for n, _ in nodes if n.name in trainable),
        frozen=tuple(n.name for n, _ in nodes if n.name not in trainable),
        trainable_params=sum(p.numel() for p in qat.parameters() if p.requires_grad),
        total_params=sum(p.numel() for p in qat.parameters()),
        policy=policy,
        graph_id=graph_id,
        sources={n.name: i.source for n, i in nodes},
        theta=theta,
        fingerprint=meta.fingerprint(qat),
    )
