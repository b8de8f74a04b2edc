"""The one training loop: optimizer steps shared by ``finetune``, ``planning`` and the examples.

Callers choose the optimizer, the schedule and where the batches come from; :func:`train_steps`
runs the steps, in one order for all of them, so a QAT phase, a planned FP phase and float training
differ only in what they pass in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn as nn

from .errors import CalibrationError, ConfigError, InputError
from .inputs import as_args

__all__ = ["OPTIMIZERS", "QATSchedule", "cycle", "make_optimizer", "progress_bar", "train_steps"]

OPTIMIZERS = ("adamw", "adam", "sgd")


@runtime_checkable
class QATSchedule(Protocol):
    """What ``finetune(plan=...)`` needs of a plan (:class:`fxptqat.planning.QATPlan` is one).

    The core names this shape instead of importing planning, so planning depends on the core and
    never the other way round.
    """

    @property
    def fp_steps(self) -> int: ...

    @property
    def qat_steps(self) -> int: ...

    def scheduler(self, optimizer: torch.optim.Optimizer, *, start_step: int = 0) -> Any: ...


def _choices(names: Sequence[str]) -> str:
    quoted = [repr(n) for n in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def make_optimizer(
    kind: str, params: Iterable, *, lr: float, weight_decay: float = 0.0, owner: str,
    choices: Sequence[str] = OPTIMIZERS,
) -> torch.optim.Optimizer:
    """``"adamw"``, ``"adam"`` or ``"sgd"`` (momentum 0.9) over ``params``; ``choices`` narrows the set."""
    if kind not in choices:
        raise ConfigError(f"{owner}: optimizer={kind!r}; choose {_choices(choices)}.")
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)


def cycle(loader: Iterable, owner: str) -> Iterator:
    """The loader's batches, starting a new pass whenever one ends (only when another batch is asked for)."""
    while True:
        fed = False
        for batch in loader:
            fed = True
            yield batch
        if not fed:
            raise InputError(f"{owner}: the loader yielded no batch.")


def progress_bar(*, total: int, desc: str, enabled: bool, leave: bool = True):
    """A tqdm bar (tqdm imported on first use: ``import fxptqat`` stays light)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=leave)


def train_steps(
    model: nn.Module,
    batches: Iterator,
    loss_fn: Callable,
    optimizer: torch.optim.Optimizer,
    steps: int,
    *,
    owner: str,
    scheduler: Any = None,
    before_step: Callable[[], None] | None = None,
    max_grad_norm: float | None = None,
    losses: list[float] | None = None,
    lrs: list[float] | None = None,
    bar: Any = None,
    compile: bool = False,
) -> list[float]:
    """Run ``steps`` optimizer steps of ``model`` (put in train mode) on batches ``(*inputs, target)``.

    Each step, in this order: next batch, ``before_step()``, forward, loss (a non-finite loss raises
    :class:`~fxptqat.CalibrationError`), ``zero_grad``, backward, gradient clipping to
    ``max_grad_norm`` (first parameter group), the LR appended to ``lrs``, optimizer step,
    scheduler step, the loss appended to ``losses`` (returned; pass a list to continue one across
    calls, which also numbers the steps in errors). The caller restores the model's mode.
    ``compile``: the forward (and its backward) runs through ``torch.compile(model,
    backend="fxptqat")`` (:mod:`fxptqat.backend`), compiled at the first step.
    """
    losses = [] if losses is None else losses
    model.train()
    forward = torch.compile(model, backend="fxptqat") if compile else model
    for _ in range(steps):
        *inputs, target = as_args(next(batches), what=f"{owner}: batch")
        if before_step is not None:
            before_step()
        loss = loss_fn(forward(*inputs), target)
        value = loss.item()
        if not math.isfinite(value):
            raise CalibrationError(f"{owner}: loss became {value} at step {len(losses)}; lower lr.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], max_grad_norm)
        if lrs is not None:
            lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(value)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}")
    return losses
