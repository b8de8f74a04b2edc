"""A minimal QAT fine-tuning loop for users without one."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch.fx as fx

from . import meta
from .config import check_finite
from .errors import ConfigError, SelectionError
from .stages import require
from .training import QATSchedule, cycle, make_optimizer, progress_bar, train_steps

__all__ = ["finetune"]


def finetune(
    qat: fx.GraphModule,
    loader: Iterable,
    loss_fn: Callable,
    *,
    steps: int | None = None,
    lr: float = 1e-4,
    optimizer: str = "adam",
    progress: bool = True,
    plan: QATSchedule | None = None,
    compile: bool = False,
) -> list[float]:
    """Minimal QAT loop: ``steps`` optimizer steps on the parameters that require grad.

    Each batch is ``(*inputs, target)``; the loader is cycled if it runs out. Returns the losses.

    ``plan`` (a :class:`fxptqat.planning.QATPlan`): run its QAT phase, i.e. ``plan.qat_steps``
    steps with the learning rate following the plan's schedule from ``plan.fp_steps`` on (the
    fused cooldown, or the separate re-warm and decay), ``lr`` being the schedule's peak.

    ``compile=True``: train through ``torch.compile(qat, backend="fxptqat")`` (fake-quant fused into
    inductor's loops, :mod:`fxptqat.backend`); the first step compiles (seconds to minutes).
    """
    owner = "finetune()"
    require(qat, meta.Stage.CALIBRATED, "finetune")
    if plan is not None:
        if not isinstance(plan, QATSchedule):
            raise ConfigError(f"{owner}: plan must be a fxptqat.planning.QATPlan, got {type(plan).__name__}.")
        if plan.qat_steps < 1:
            raise ConfigError(f"{owner}: the plan has no QAT steps (fraction 0); there is nothing to fine-tune.")
        if steps is not None and steps != plan.qat_steps:
            raise ConfigError(f"{owner}: steps={steps} contradicts the plan's {plan.qat_steps} QAT steps; omit steps.")
        steps = plan.qat_steps
    if not isinstance(compile, bool):
        raise ConfigError(f"{owner}: compile must be True or False, got {compile!r}.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"{owner}: steps must be a positive int (or give a plan), got {steps!r}.")
    lr = check_finite("finetune", "lr", lr, minimum=0.0)
    params = [p for p in qat.parameters() if p.requires_grad]
    if not params:
        raise SelectionError(f"{owner}: no parameter requires grad (NoLayers selection?); nothing to train.")
    opt = make_optimizer(optimizer, params, lr=lr, owner=owner, choices=("adam", "sgd"))
    schedule = plan.scheduler(opt, start_step=plan.fp_steps) if plan is not None else None
    bar = progress_bar(total=steps, desc="QAT fine-tune", enabled=progress, leave=False)
    try:
        return train_steps(qat, cycle(loader, owner), loss_fn, opt, steps, owner=owner, scheduler=schedule, bar=bar,
                           compile=compile)
    finally:
        bar.close()
        qat.eval()
