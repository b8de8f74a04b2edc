"""Normalising and checking example inputs and calibration batches."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch
import torch.fx as fx

from .errors import InputError

__all__ = ["as_args", "iter_batches", "placeholders"]


def placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def as_args(batch, *, what: str) -> tuple:
    """A batch as a tuple of positional arguments: a tensor becomes ``(tensor,)``."""
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, list):
        batch = tuple(batch)
    if not isinstance(batch, tuple):
        raise InputError(
            f"{what} must be a tensor or a tuple of tensors, got {type(batch).__name__}. "
            "Wrap a single input as (x,)."
        )
    return batch


def iter_batches(batches: Iterable, gm: fx.GraphModule, *, what: str) -> Iterator[tuple]:
    """Yield each batch as model arguments, trimmed to the model's inputs.

    A batch may carry more items than the model takes (e.g. ``(x, y)`` from a DataLoader for a
    model of one input): the extra trailing items (labels) are dropped.
    """
    if isinstance(batches, (torch.Tensor, str, bytes)) or not isinstance(batches, Iterable):
        raise InputError(
            f"{what}: expected an iterable of batches (a list of tuples, a DataLoader...), got "
            f"{type(batches).__name__}. For one batch pass [batch]."
        )
    names = [str(p.target) for p in placeholders(gm)]
    n_inputs = len(names)
    for i, batch in enumerate(batches):
        if isinstance(batch, Mapping):
            missing = [n for n in names if n not in batch]
            if missing:
                raise InputError(f"{what}: batch {i} is a dict without the model input(s) {missing}; it has "
                                 f"{sorted(batch)}.")
            batch = tuple(batch[n] for n in names)
        args = as_args(batch, what=f"{what}: batch {i}")
        if len(args) < n_inputs:
            raise InputError(
                f"{what}: batch {i} has {len(args)} item(s) but the model takes {n_inputs} input(s) "
                f"({', '.join(p.name for p in placeholders(gm))})."
            )
        _check_ranks(args[:n_inputs], gm, names, what=f"{what}: batch {i}")
        yield args[:n_inputs]


def _check_ranks(args: tuple, gm: fx.GraphModule, names: list[str], *, what: str) -> None:
    """Each tensor input has the rank of the example input the graph was captured with (capture
    drops the model's own rank asserts: passes/drop_rank_asserts.py)."""
    from .meta import graph_info

    info = graph_info(gm)
    captured = getattr(info, "inputs", None) or ()
    for name, arg, spec in zip(names, args, captured, strict=False):
        if isinstance(arg, torch.Tensor) and spec and len(spec[0]) and arg.dim() != len(spec[0]) + 1:
            raise InputError(f"{what}: input {name!r} has {arg.dim()} dimension(s), but the graph was captured "
                             f"with {len(spec[0]) + 1} (example shape (N, {', '.join(map(str, spec[0]))})); "
                             "give batches of the same rank.")
