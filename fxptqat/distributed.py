"""torch.distributed support: make statistics global across ranks.

When a process group is initialized, ``calibrate`` and ``measure_error`` call these so that N ranks
on disjoint shards end with the same quantizer parameters and the same report as one process over
all shards, on every rank. Min/max observers reduce exactly (MIN/MAX), and so do
``act_observer="histogram"``'s observers (integer counts on a fixed grid: SUM; min/max: MIN/MAX) and
``"robust_histogram"``'s (integers times powers of two in float64: SUM, exact);
error sums reduce with SUM in float64, so the report matches a single process up to summation
order. torch.ao's ``HistogramObserver`` (``act_observer="ao_histogram"``) has no exact reduction:
calibration refuses it under torch.distributed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.fx as fx

from .errors import ConfigError
from .fake_quantize import FakeQuantize
from .stats import RunningError

__all__ = ["active", "sum_int", "sum_tensors", "check_observers", "reduce_observers", "reduce_running"]


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def sum_int(value: int) -> int:
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item())


def sum_tensors(tensors: list[torch.Tensor], counts: list[int]) -> tuple[list[torch.Tensor], list[int]]:
    """Element-wise sums over ranks of float64 tensors (the same shapes on every rank) and of counts,
    in one all_reduce; the inputs unchanged outside torch.distributed."""
    if not active():
        return tensors, counts
    flat = torch.cat([t.reshape(-1) for t in tensors] + [torch.tensor(counts, dtype=torch.float64)])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    out, start = [], 0
    for t in tensors:
        out.append(flat[start:start + t.numel()].reshape(t.shape))
        start += t.numel()
    return out, [int(c) for c in flat[start:].tolist()]


def check_observers(gm: fx.GraphModule) -> None:
    """Raise ConfigError if some observer's statistics cannot be reduced exactly across ranks.

    Cheap; ``calibrate`` can call it before running any batch. A no-op outside torch.distributed.
    """
    if not active():
        return
    for name, module in gm.named_modules():
        if isinstance(module, FakeQuantize) and not module.reducible_across_ranks():
            observer = type(module.activation_post_process).__name__
            raise ConfigError(
                f"calibrate(): quantizer {name!r} uses {observer} (torch.ao's HistogramObserver is what "
                "QuantConfig(act_observer='ao_histogram') gives), which cannot be reduced across torch.distributed "
                "ranks: it re-bins its histogram whenever a batch widens the range, so its statistics depend on "
                "which batches a process saw and in which order, and two ranks' histograms do not merge into "
                "one process's. Use QuantConfig(act_observer='histogram') (the same range search on exact "
                "counts that sum across ranks) or act_observer='minmax', or calibrate in one process."
            )


def reduce_observers(gm: fx.GraphModule) -> None:
    """Global statistics for every activation observer (weights are the same on every rank):
    MIN/MAX of min/max, SUM of LogHistogramObserver's integer counts -- exact, any rank order."""
    if not active():
        return
    check_observers(gm)
    for module in gm.modules():
        if isinstance(module, FakeQuantize):
            module.all_reduce_statistics()


def reduce_running(stats: dict[str, RunningError]) -> None:
    """Sum every node's running sums over ranks (max for max_abs), in place, in one call each."""
    if not active() or not stats:
        return
    names = sorted(stats)
    sums = torch.tensor(
        [[stats[n].count, stats[n].sq_err, stats[n].sq_ref, stats[n].sq_q, stats[n].dot] for n in names],
        dtype=torch.float64,
    )
    maxes = torch.tensor([stats[n].max_abs for n in names], dtype=torch.float64)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    dist.all_reduce(maxes, op=dist.ReduceOp.MAX)
    for i, n in enumerate(names):
        s = stats[n]
        s.count = int(sums[i, 0])
        s.sq_err, s.sq_ref, s.sq_q, s.dot = (float(v) for v in sums[i, 1:])
        s.max_abs = float(maxes[i])
