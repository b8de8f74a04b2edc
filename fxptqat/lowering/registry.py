"""The runtimes :func:`fxptqat.lower` can target, and the one dispatch into them.

A new runtime is one module in this package defining a :class:`~fxptqat.lowering.base.Runtime`
(its name, its ``lower`` and the options it owns), listed once below.
"""

from __future__ import annotations

import torch.fx as fx

from ..config import QuantConfig
from ..errors import ConfigError
from .base import Runtime
from .inductor import RUNTIME as INDUCTOR
from .onnx import RUNTIME as ONNXRUNTIME
from .torch import RUNTIME as TORCH

__all__ = ["REGISTRY", "RUNTIMES", "lower"]

REGISTRY: dict[str, Runtime] = {r.name: r for r in (TORCH, ONNXRUNTIME, INDUCTOR)}
RUNTIMES = tuple(REGISTRY)


def lower(qat: fx.GraphModule, config: QuantConfig, *, runtime: str, **options):
    """Lower ``qat`` with ``runtime``; an option given as None is not given."""
    if runtime not in REGISTRY:
        raise ConfigError(f"lower(): runtime must be one of {RUNTIMES}, got {runtime!r}.")
    target = REGISTRY[runtime]
    owned = {option.name: option for option in target.options}
    given = {name: value for name, value in options.items() if value is not None}
    for name in given.keys() - owned.keys():
        owners = [r for r in REGISTRY.values() if any(o.name == name for o in r.options)]
        if not owners:
            raise ConfigError(f"lower(): unknown option {name!r}.")
        plural = next(o.plural for o in owners[0].options if o.name == name)
        raise ConfigError(
            f"lower(): {name} only {'apply' if plural else 'applies'} to runtime="
            + " or ".join(repr(r.name) for r in owners) + "."
        )
    return target.lower(qat, config, **{name: owned[name].check(value) for name, value in given.items()})
