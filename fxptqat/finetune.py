"""A minimal QAT fine-tuning loop for users without one."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.fx as fx

from . import meta
from .config import check_finite
from .errors import CalibrationError, ConfigError, InputError, SelectionError
from .inputs import as_args
from .stages import require

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
    plan=None,
) -> list[float]:
    """Minimal QAT loop: ``steps`` optimizer steps on the parameters that require grad.

    Each batch is ``(*inputs, target)``; the loader is cycled if it runs out. Returns the losses.

    ``plan`` (a :class:`fxptqat.planning.QATPlan`): run its QAT phase, i.e. ``plan.qat_steps``
    steps with the learning rate following the plan's schedule from ``plan.fp_steps`` on (the
    fused cooldown, or the separate re-warm and decay), ``lr`` being the schedule's peak.
    """
    require(qat, meta.Stage.CALIBRATED, "finetune")
    if plan is not None:
        from .planning import QATPlan

        if not isinstance(plan, QATPlan):
            raise ConfigError(f"finetune(): plan must be a fxptqat.planning.QATPlan, got {type(plan).__name__}.")
        if plan.qat_steps < 1:
            raise ConfigError("finetune(): the plan has no QAT steps (fraction 0); there is nothing to fine-tune.")
        if steps is not None and steps != plan.qat_steps:
            raise ConfigError(f"finetune(): steps={steps} contradicts the plan's {plan.qat_steps} QAT steps; omit steps.")
        steps = plan.qat_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"finetune(): steps must be a positive int (or give a plan), got {steps!r}.")
    lr = check_finite("finetune", "lr", lr, minimum=0.0)
    params = [p for p in qat.parameters() if p.requires_grad]
    if not params:
        raise SelectionError("finetune(): no parameter requires grad (NoLayers selection?); nothing to train.")
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    else:
        raise ConfigError(f"finetune(): optimizer={optimizer!r}; choose 'adam' or 'sgd'.")
    schedule = plan.scheduler(opt, start_step=plan.fp_steps) if plan is not None else None
    from tqdm.auto import tqdm

    losses: list[float] = []
    qat.train()
    bar = tqdm(total=steps, desc="QAT fine-tune", disable=not progress, leave=False)
    try:
        while len(losses) < steps:
            fed = False
            for batch in loader:
                fed = True
                *inputs, target = as_args(batch, what="finetune(): batch")
                loss = loss_fn(qat(*inputs), target)
                if not math.isfinite(loss.item()):
                    raise CalibrationError(f"finetune(): loss became {loss.item()} at step {len(losses)}; lower lr.")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if schedule is not None:
                    schedule.step()
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                if len(losses) >= steps:
                    break
            if not fed:
                raise InputError("finetune(): the loader yielded no batch.")
    finally:
        bar.close()
        qat.eval()
    return losses
