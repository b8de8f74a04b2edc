"""Pass: fix every quantizer's scale and zero point from its observer and stop observing."""

from __future__ import annotations

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from fxptqat.fake_quantize import FakeQuantize

__all__ = ["freeze_quantizers", "observe_only"]
REQUIRES = "qat"  # the graph it acts on (see passes/__init__.py)


def freeze_quantizers(gm: fx.GraphModule, /) -> PassResult:
    modified = False
    for module in gm.modules():
        if isinstance(module, FakeQuantize) and not module.frozen:
            module.freeze()
            modified = True
    return PassResult(gm, modified)


def observe_only(gm: fx.GraphModule, /) -> PassResult:
    """Calibration mode: observers on, fake-quant off (statistics of the float network)."""
    modified = False
    for module in gm.modules():
        if isinstance(module, FakeQuantize) and (module._fake_quant or not module._observe):
            module.enable_observer(True)
            module.enable_fake_quant(False)
            modified = True
    return PassResult(gm, modified)
