"""The one place that reads and writes fxptqat's metadata key.

``node.meta["fxptqat"]`` holds a frozen :class:`NodeInfo`; ``gm.meta["fxptqat"]`` a frozen
:class:`GraphInfo`. Updates go through :func:`dataclasses.replace`; no tensors are stored.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from collections.abc import Iterator

import torch.fx as fx

from .config import QuantConfig
from .stats import ErrorStats

__all__ = [
    "KEY",
    "Stage",
    "NodeInfo",
    "GraphInfo",
    "node_info",
    "set_node_info",
    "update_node_info",
    "graph_info",
    "set_graph_info",
    "update_graph_info",
    "quantized_nodes",
    "fingerprint",
]

KEY = "fxptqat"


class Stage(enum.IntEnum):
    """Where a graph is in the pipeline; later stages include the earlier ones."""

    PREPARED = 1
    CALIBRATED = 2
    MEASURED = 3
    SELECTED = 4


@dataclasses.dataclass(frozen=True)
class NodeInfo:
    """Per quantized (weighted) node: what every step after capture needs, as names and targets.

    The steps after capture (calibration, measurement, selection, training, parity, persistence)
    read this and call :class:`fxptqat.FakeQuantize` methods; they never look into the capture's
    module layout (torch.ao's QAT modules today, a PT2E graph later), which writes it.

    source: qualified name of the module in the user's model (the node's target).
    module_type: class name of the QAT module (e.g. "ConvBnReLU2d").
    output_quantizer: *node name* of the activation quantizer fed by this node, if any.
    output_quantizer_module: that quantizer's *module target* (several nodes may call one module).
    weight: target of the weight parameter; weight_quantizer: target of its FakeQuantize.
    parameters: targets of every parameter the node owns (weight, bias, BatchNorm affine).
    fan_in: inputs summed into one output value (in_features, or in_channels/groups x kernel).
    params: number of parameters the node owns.
    isolated / propagated: error stats once measured.
    trainable: None until a selection is applied.
    """

    source: str
    module_type: str
    output_quantizer: str | None
    params: int
    weight: str = ""
    weight_quantizer: str = ""
    output_quantizer_module: str | None = None
    parameters: tuple[str, ...] = ()
    fan_in: int = 0
    isolated: ErrorStats | None = None
    propagated: ErrorStats | None = None
    trainable: bool | None = None


@dataclasses.dataclass(frozen=True)
class GraphInfo:
    """Per graph. inputs: (shape without the batch dimension, dtype) of each example input."""

    stage: Stage
    config: QuantConfig
    graph_id: str
    inputs: tuple[tuple[tuple[int, ...], str], ...] = ()


def node_info(node: fx.Node) -> NodeInfo | None:
    return node.meta.get(KEY)


def set_node_info(node: fx.Node, info: NodeInfo) -> None:
    node.meta[KEY] = info


def update_node_info(node: fx.Node, **changes) -> NodeInfo:
    info = dataclasses.replace(node.meta[KEY], **changes)
    node.meta[KEY] = info
    return info


def graph_info(gm: fx.GraphModule) -> GraphInfo | None:
    return getattr(gm, "meta", {}).get(KEY)


def set_graph_info(gm: fx.GraphModule, info: GraphInfo) -> None:
    gm.meta[KEY] = info


def update_graph_info(gm: fx.GraphModule, **changes) -> GraphInfo:
    info = dataclasses.replace(gm.meta[KEY], **changes)
    gm.meta[KEY] = info
    return info


def quantized_nodes(gm: fx.GraphModule) -> Iterator[tuple[fx.Node, NodeInfo]]:
    """The weighted nodes fxptqat tracks, in graph order."""
    for node in gm.graph.nodes:
        info = node.meta.get(KEY)
        if info is not None:
            yield node, info


def fingerprint(gm: fx.GraphModule) -> str:
    """Identifies the quantized structure: node names, source modules, types and sizes."""
    rows = [(n.name, i.source, i.module_type, i.params) for n, i in quantized_nodes(gm)]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]
