"""Error statistics: streamed running sums and the frozen summary they produce."""

from __future__ import annotations

import dataclasses
import math

import torch

__all__ = ["ErrorStats", "RunningError"]


_ROW = 512  # float32 partial sums over rows this long, then float64 across rows


def _sum64(x: torch.Tensor) -> float:
    """Sum of a flat tensor: float32 (cascade) sums over rows of 512, those summed in float64.
    Relative error ~1e-7 at worst (one row's float32 sum), ~1e-9 over 1e5 elements or more (a plain
    float32 sum stays ~5e-8 off), for one float32 pass: ``torch.sum(x, dtype=torch.float64)``
    casts every element and is ~8x slower on CPU."""
    n = x.numel() - x.numel() % _ROW
    total = float(x[:n].view(-1, _ROW).sum(1).sum(dtype=torch.float64)) if n else 0.0
    if n < x.numel():
        total += float(x[n:].sum(dtype=torch.float64))
    return total


def sum_squares(x: torch.Tensor) -> float:
    """``sum(x**2)``: the products in the input's precision (float64 for half types), summed as
    :func:`_sum64` does."""
    x = x.detach().flatten()
    x = x if x.dtype in (torch.float32, torch.float64) else x.double()
    return _sum64(x * x)


@dataclasses.dataclass(frozen=True)
class ErrorStats:
    """Error of a quantized tensor against its float reference, over all elements seen."""

    mse: float
    sqnr_db: float  # 10 log10(sum ref^2 / sum err^2); inf when there is no error
    cosine: float  # cosine similarity of the flattened tensors; 1.0 when identical
    max_abs: float
    count: int

    def value(self, metric: str) -> float:
        """The stat named ``metric`` ("mse", "sqnr_db", "cosine", "max_abs")."""
        return getattr(self, metric)


class RunningError:
    """Running sums (float64) from which ErrorStats follow; memory is constant in batches."""

    __slots__ = ("count", "sq_err", "sq_ref", "sq_q", "dot", "max_abs")

    def __init__(self) -> None:
        self.count = 0
        self.sq_err = self.sq_ref = self.sq_q = self.dot = self.max_abs = 0.0

    def update(self, quant: torch.Tensor, ref: torch.Tensor, *, sq_ref: float | None = None) -> None:
        """Add one pair. Products are formed in the inputs' precision (float32: each rounded to
        6e-8 of itself) and summed as :func:`_sum64` does, without float64 copies; ``sq_ref``:
        ``sum(ref**2)`` when the caller already has it (see :func:`sum_squares`)."""
        q = quant.detach().flatten()
        r = ref.detach().flatten()
        if q.dtype != torch.float32 or r.dtype != torch.float32:  # half types: products in float64
            q, r = q.double(), r.double()
        err = q - r
        self.count += r.numel()
        self.sq_err += sum_squares(err)
        self.sq_ref += sum_squares(r) if sq_ref is None else sq_ref
        self.sq_q += sum_squares(q)
        self.dot += _sum64(q * r)
        if err.numel():
            low, high = torch.aminmax(err)  # one pass, no |err| temporary
            self.max_abs = max(self.max_abs, float(high), -float(low))

    def merge(self, other: RunningError) -> None:
        self.count += other.count
        self.sq_err += other.sq_err
        self.sq_ref += other.sq_ref
        self.sq_q += other.sq_q
        self.dot += other.dot
        self.max_abs = max(self.max_abs, other.max_abs)

    def result(self) -> ErrorStats:
        if self.count == 0:
            raise ValueError("no elements were recorded")
        mse = self.sq_err / self.count
        if self.sq_err == 0.0:
            sqnr = math.inf
        elif self.sq_ref == 0.0:
            sqnr = -math.inf
        else:
            sqnr = 10.0 * math.log10(self.sq_ref / self.sq_err)
        denom = math.sqrt(self.sq_ref * self.sq_q)
        if denom == 0.0:
            cosine = 1.0 if self.sq_ref == self.sq_q else 0.0
        else:
            cosine = max(-1.0, min(1.0, self.dot / denom))
        if self.sq_err == 0.0:
            cosine = 1.0
        return ErrorStats(mse=mse, sqnr_db=sqnr, cosine=cosine, max_abs=self.max_abs, count=self.count)


def badness(stats: ErrorStats, metric: str) -> float:
    """Larger is worse: MSE, 1 - cosine, or -SQNR (dB)."""
    if metric == "mse":
        return stats.mse
    if metric == "cosine":
        return 1.0 - stats.cosine
    return -stats.sqnr_db
