"""torch.distributed support: make statistics global across ranks.

When a process group is initialized, ``calibrate`` and ``measure_error`` call these so that N ranks
on disjoint shards end with the same quantizer parameters and the same report as one process over
all shards, on every rank. Min/max observers reduce exactly (MIN/MAX); error sums reduce with SUM
in float64, so the report matches a single process up to summation order.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.fx as fx
from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver

from .fake_quantize import FakeQuantize
from .stats import RunningError

__all__ = ["active", "sum_int", "reduce_observers", "reduce_running"]


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def sum_int(value: int) -> int:
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item())


def reduce_observers(gm: fx.GraphModule) -> None:
    """Global min/max for every activation observer (weights are the same on every rank)."""
    if not active():
        return
    for module in gm.modules():
        if not isinstance(module, FakeQuantize):
            continue
        obs = module.activation_post_process
        if not isinstance(obs, (MinMaxObserver, PerChannelMinMaxObserver)):
            continue
        dist.all_reduce(obs.min_val, op=dist.ReduceOp.MIN)
        dist.all_reduce(obs.max_val, op=dist.ReduceOp.MAX)


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
