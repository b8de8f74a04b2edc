"""Pass: a functional ``batch_norm`` on a BatchNorm module's own tensors becomes a call of a plain
BatchNorm module sharing them.

timm's norm-activation layers (``BatchNormAct2d``: EfficientNet, MobileNetV3, RegNet, ...) subclass
``nn.BatchNorm2d`` and call ``F.batch_norm(x, self.running_mean, self.running_var, self.weight,
self.bias, training, momentum, eps)`` themselves, then their activation. Traced, that is a
``call_function`` on four ``get_attr`` nodes with the training flag of the traced mode baked in:
torch.ao cannot fold it into the conv before it (its fusion patterns match BatchNorm *modules*), so
the conv output and the normalised value are fake-quantized separately and the BN runs float,
and in QAT the statistics never follow the training mode. PT2E folds the same BN at the aten
level. This pass points such a call at ``<module>_bn``, an ``nn.BatchNorm{1,2,3}d`` whose
parameters and buffers are the *same tensors* as the original module's (one gradient, one
running mean), so torch.ao fuses conv-bn(-relu) as it does for torchvision's BatchNorm2d, and the
BN behaves as a BatchNorm in train and eval mode.

Only calls that normalise a conv or linear module's output (what torch.ao can fuse; it sets
BatchNorm1d/2d/3d) with weight and bias parameters and running statistics of one module, all of the
same length, are rewritten; anything else is left as traced. The traced call's ``momentum`` and
``eps`` carry over (the graph module no longer knows the BatchNorm subclass it came from). Runs on the float graph before ``insert_fake_quant``; ``modified`` is False
when no call was rewritten.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.infra.pass_base import PassResult

__all__ = ["batch_norm_modules"]
REQUIRES = "float"  # the graph it acts on (see passes/__init__.py)

_PLAIN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_PRODUCERS = ((nn.Conv1d, 1), (nn.Conv2d, 2), (nn.Conv3d, 3), (nn.Linear, 1))
_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_TENSORS = ("running_mean", "running_var", "weight", "bias")


def _owner(node, attr: str) -> str | None:
    """The qualified name of the module whose ``attr`` the get_attr ``node`` reads, else None."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    owner, _, name = node.target.rpartition(".")
    return owner if name == attr else None


def _dims(gm: fx.GraphModule, node) -> int | None:
    """BatchNorm1d/2d/3d for the conv or linear module that produces the normalised value."""
    if isinstance(node, fx.Node) and node.op == "call_module":
        module = gm.get_submodule(node.target)
        return next((d for cls, d in _PRODUCERS if type(module) is cls), None)
    return None


def _plain(gm: fx.GraphModule, args: dict, dims: int) -> nn.Module | None:
    weight, bias, mean, var = (gm.get_parameter(args[a].target) if a in ("weight", "bias") else
                               gm.get_buffer(args[a].target) for a in ("weight", "bias", "running_mean", "running_var"))
    n = weight.shape[0] if weight.dim() == 1 else -1
    momentum, eps = args.get("momentum", 0.1), args.get("eps", 1e-5)
    if any(t.shape != (n,) for t in (bias, mean, var)) or not isinstance(eps, float) or not isinstance(momentum, float):
        return None
    bn = _PLAIN[dims](n, eps=eps, momentum=momentum, device="meta")
    bn._parameters["weight"], bn._parameters["bias"] = weight, bias
    bn._buffers["running_mean"], bn._buffers["running_var"] = mean, var
    bn._buffers["num_batches_tracked"] = torch.tensor(0, dtype=torch.long, device=mean.device)
    bn.train(gm.training)
    return bn


def batch_norm_modules(gm: fx.GraphModule, /) -> PassResult:
    rewritten = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not F.batch_norm:
            continue
        args = dict(zip(_ARGS, node.args, strict=False)) | dict(node.kwargs)
        owners = {_owner(args.get(a), a) for a in _TENSORS}
        dims = _dims(gm, args.get("input"))
        if len(owners) != 1 or None in owners or dims is None:
            continue
        try:
            bn = _plain(gm, args, dims)
        except AttributeError:  # a weight that is a buffer, statistics that are parameters: not a BatchNorm's
            bn = None
        if bn is None:
            continue
        (owner,) = owners
        target = f"{owner.replace('.', '_')}_bn" if owner else "bn"
        while hasattr(gm, target):
            target += "_"
        gm.add_submodule(target, bn)
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(target, (args["input"],))
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        for a in _TENSORS:
            if not args[a].users:
                gm.graph.erase_node(args[a])
        rewritten += 1
    if rewritten:
        gm.recompile()
    return PassResult(gm, bool(rewritten))
