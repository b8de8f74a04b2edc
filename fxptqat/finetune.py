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
    steps: int,
    lr: float = 1e-4,
    optimizer: str = "adam",
    progress: bool = True,
) -> list[float]:
    """Minimal QAT loop: ``steps`` optimizer steps on the parameters that require grad.

    Each batch is ``(*inputs, target)``; the loader is cycled if it runs out. Returns the losses.
    """
    require(qat, meta.Stage.CALIBRATED, "finetune")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"finetune(): steps must be a positive int, got {steps!r}.")
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
