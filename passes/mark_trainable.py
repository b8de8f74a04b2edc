"""Pass: make selected weighted nodes trainable and freeze everything else.

Trainable node: its parameters (weight, bias, folded BN affine) require grad; gradients reach
them through the straight-through estimator of its weight quantizer.
Frozen node: no parameter requires grad and BatchNorm statistics stop moving
(``freeze_bn_stats`` on fused conv-bn modules), so the PTQ weights and quantizer parameters
are kept bit for bit under any optimizer step.
Nodes whose modules share parameters (a module called twice) train together: if one is
selected, all are. Parameters outside weighted nodes (LayerNorm, embeddings, unfused BatchNorm)
follow ``float_params``. Quantizer scales are not parameters: they stay as calibration fixed them.
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.infra.pass_base import PassResult

from fxptqat import meta
from fxptqat.capture import set_bn_frozen
from fxptqat.errors import ConfigError, SelectionError

__all__ = ["mark_trainable", "BN_STATS", "FLOAT_PARAMS"]
REQUIRES = "qat"  # the graph it acts on (see passes/__init__.py)

BN_STATS = ("frozen", "train")
FLOAT_PARAMS = ("frozen", "train")


def mark_trainable(
    gm: fx.GraphModule,
    /,
    *,
    trainable: frozenset[str],
    bn_stats: str = "frozen",
    float_params: str = "frozen",
) -> PassResult:
    if bn_stats not in BN_STATS:
        raise ConfigError(f"mark_trainable: bn_stats={bn_stats!r}; choose one of {BN_STATS}.")
    if float_params not in FLOAT_PARAMS:
        raise ConfigError(f"mark_trainable: float_params={float_params!r}; choose one of {FLOAT_PARAMS}.")
    nodes = dict(meta.quantized_nodes(gm))
    known = {n.name for n in nodes}
    unknown = sorted(set(trainable) - known)
    if unknown:
        raise SelectionError(
            f"mark_trainable: {unknown[:5]} are not quantized nodes of this graph "
            f"(it has {sorted(known)[:8]}...). Was the selection made for another graph?"
        )
    trainable = _with_tied(gm, nodes, set(trainable))
    modified = False
    owned: set[int] = set()
    for node, info in nodes.items():
        train = node.name in trainable
        for target in info.parameters:
            p = gm.get_parameter(target)
            owned.add(id(p))
            modified |= _set_grad(p, train)
        modified |= set_bn_frozen(gm.get_submodule(node.target), not train or bn_stats == "frozen")
        if info.trainable is not train:
            meta.update_node_info(node, trainable=train)
            modified = True
    train_float = float_params == "train"
    for module in gm.modules():
        for p in module.parameters(recurse=False):
            if id(p) not in owned:
                modified |= _set_grad(p, train_float)
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not _inside_owned(module, owned):
            # Unfused BatchNorm: stop updating running stats while keeping the module's code.
            want = train_float and bn_stats == "train"
            if module.track_running_stats != want:
                module.track_running_stats = want
                modified = True
    return PassResult(gm, modified)


def _set_grad(p: nn.Parameter, flag: bool) -> bool:
    if p.requires_grad == flag:
        return False
    p.requires_grad_(flag)
    return True


def _inside_owned(module: nn.Module, owned: set[int]) -> bool:
    return any(id(p) in owned for p in module.parameters(recurse=False))


def _with_tied(gm: fx.GraphModule, nodes, trainable: set[str]) -> set[str]:
    """Close ``trainable`` over nodes that share a parameter with a trainable node."""
    owners: dict[int, set[str]] = {}
    for node, info in nodes.items():
        for target in info.parameters:
            owners.setdefault(id(gm.get_parameter(target)), set()).add(node.name)
    grown = set(trainable)
    for names in owners.values():
        if names & grown:
            grown |= names
    return grown
