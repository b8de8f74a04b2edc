"""Weighted modules of a subclass of ``nn.Linear`` / ``nn.ConvNd`` become their base class when they
compute exactly what it does.

torch.fx traces into a module defined outside ``torch.nn`` (timm's ``timm.layers.Linear``, used by the
classifier heads of MobileNetV3, GhostNet and others, calls ``F.linear`` in its forward), so torch.ao
quantizes the *functional* call: fxptqat then has no weighted module to measure, select, train or
compare there. On a copy of the user's model, each such module whose forward returns, on the example
inputs, bit for bit what the base class's forward returns becomes an instance of the base class
(``__class__`` swapped; parameters, buffers and attributes kept); a subclass that computes anything
else (a scale, a cast, another op) stays as it is and is traced into.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["plain_weighted_subclasses"]

_BASES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _base(module: nn.Module) -> type | None:
    if type(module) in _BASES or type(module).__module__.startswith("torch."):
        return None
    return next((b for b in _BASES if isinstance(module, b)), None)


def plain_weighted_subclasses(model: nn.Module, args: tuple, kwargs: Mapping) -> list[str]:
    """Swap, in place, every weighted subclass module that equals its base class on the example
    inputs (one eager run in eval mode, no grad); returns the qualified names swapped."""
    candidates = {name: m for name, m in model.named_modules() if _base(m) is not None}
    if not candidates:
        return []
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in candidates}
    unusable: set[str] = set()

    def record(name):
        def hook(module, inputs, kw):
            if kw or len(inputs) != 1 or not isinstance(inputs[0], torch.Tensor):
                unusable.add(name)
            else:
                seen[name].append(inputs[0].detach().clone())
        return hook

    handles = [m.register_forward_pre_hook(record(name), with_kwargs=True) for name, m in candidates.items()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception:
        return []  # the traced run reports the failure with its node and source line
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    swapped = []
    with torch.no_grad():
        for name, module in candidates.items():
            if name in unusable or not seen[name]:
                continue
            base = _base(module)
            if all(torch.equal(type(module).forward(module, x), base.forward(module, x)) for x in seen[name]):
                module.__class__ = base
                swapped.append(name)
    return swapped
