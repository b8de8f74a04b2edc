"""Models and helpers shared by the tests (fixtures live in conftest.py).

Imported as ``from helpers import ...``: pytest's default ("prepend") import mode puts ``tests/``
(the directory of the root conftest.py) on ``sys.path``, for ``tests/passes/`` too.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn as nn
from torch.ao.nn.quantized.reference.modules.utils import ReferenceQuantizedModule
from torch.fx.passes.infra.pass_base import PassResult

import fxptqat as fq
from fxptqat import meta
from fxptqat.fake_quantize import FakeQuantize
from fxptqat.lowering import convert
from fxptqat.passes.insert_fake_quant import insert_fake_quant
from fxptqat.testing import traceable_models

# -- models -----------------------------------------------------------------------------------------


class SmallNet(nn.Module):
    """conv-bn-relu, a residual add, a concat and a Linear head: the shapes fxptqat must handle."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.fc = nn.Linear(8 * 6 * 6, 5)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        z = self.conv2(y) + y
        return self.fc(torch.flatten(torch.cat([z, y], 1), 1))


class TwoCats(nn.Module):
    """conv0's output feeds two torch.cat nodes: torch.ao can put its quantizer in only one cat's
    sharing group (a pattern ``traceable_models`` draws only rarely)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(1, 1, 1, bias=False)
        self.conv1 = nn.Conv2d(1, 1, 1, bias=False)
        self.conv2 = nn.Conv2d(2, 1, 1, bias=False)

    def forward(self, x):
        v1 = self.conv0(x)
        return torch.cat([self.conv2(torch.cat([v1, self.conv1(x)], 1)), v1], 1)


class Twice(nn.Module):
    """One Linear called at two places."""

    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(4, 4)
        self.h = nn.Linear(4, 2)

    def forward(self, x):
        return self.h(self.l(torch.relu(self.l(x))))


def examples(n: int) -> int:
    """A property's ``max_examples``: ``n``, or more under the ``thorough`` hypothesis profile
    (``HYPOTHESIS_MAX_EXAMPLES``, default 300), whose count an explicit ``settings`` would override."""
    if os.environ.get("HYPOTHESIS_PROFILE") == "thorough":
        return max(n, int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "300")))
    return n


def make_small_net(seed: int = 0) -> SmallNet:
    torch.manual_seed(seed)
    net = SmallNet().eval()
    with torch.no_grad():
        net.bn1.running_mean.uniform_(-0.5, 0.5)
        net.bn1.running_var.uniform_(0.5, 2.0)
        net.bn1.weight.uniform_(0.5, 1.5)
    return net


# -- state --------------------------------------------------------------------------------------------


def state_of(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model: nn.Module, state: dict) -> bool:
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


# -- graphs and passes (the properties over drawn models) ----------------------------------------------

# Models for the per-pass properties (tests/passes/test_<pass>.py) and tests/test_properties.py.
MODELS = traceable_models(max_layers=4)


def property_batches(model: nn.Module, x: torch.Tensor, n: int = 2) -> list[tuple[torch.Tensor]]:
    """The example batch plus ``n - 1`` larger ones, seeded by the drawn model."""
    g = torch.Generator().manual_seed(model.seed + 1)
    return [(x,)] + [(torch.randn((x.shape[0] + i, *x.shape[1:]), generator=g),) for i in range(1, n)]


def inserted(model: nn.Module, inputs: tuple, config: fq.QuantConfig) -> fx.GraphModule:
    """A drawn model traced and given its quantizers (``insert_fake_quant``), before the clean-up
    passes ``prepare()`` runs after it (``drop_output_quantizers``, ``fit_observers_to_clamps``)."""
    gm = fq.api.trace(copy.deepcopy(model), config)
    insert_fake_quant(gm, config=config, example_inputs=inputs)
    return gm


def converted(model: nn.Module, x: torch.Tensor, config: fq.QuantConfig, *, push_weights: bool):
    """``(qat, int8)``: a drawn model prepared and calibrated, and torch.ao's INT8 graph of it before
    any of fxptqat's INT8 passes. ``push_weights`` first triples every quantized weight (what
    fine-tuning does past the frozen scales), so that clamping has work."""
    qat = fq.prepare(model, (x,), config=config)
    fq.calibrate(qat, property_batches(model, x))
    if push_weights:
        with torch.no_grad():
            for node, _ in meta.quantized_nodes(qat):
                qat.get_submodule(node.target).weight.mul_(3.0)
    return qat, convert(qat, config)


def node_named(gm: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.name == name)


def weighted_nodes(gm: fx.GraphModule) -> set[str]:
    """Nodes that call a module with a weight quantizer (what fxptqat quantizes)."""
    return {
        n.name
        for n in gm.graph.nodes
        if n.op == "call_module" and hasattr(gm.get_submodule(n.target), "weight_fake_quant")
    }


def fake_quants(gm: fx.GraphModule) -> list[FakeQuantize]:
    """Every fxptqat FakeQuantize module (weight and activation quantizers)."""
    return [m for m in gm.modules() if isinstance(m, FakeQuantize)]


def fake_quant_calls(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), FakeQuantize)]


def int_weights(gm: fx.GraphModule) -> list[torch.Tensor]:
    """The integer weights of a lowered graph: every packed quantized module's int8 weight, and what
    each torch.ao reference module (weight-only graphs) quantizes its float weight to when it runs."""
    ints = []
    for m in gm.modules():
        if isinstance(m, ReferenceQuantizedModule):
            if m.weight_dtype == torch.qint8:
                ints.append(m.get_quantized_weight().int_repr())
        elif hasattr(m, "set_weight_bias") and callable(getattr(m, "weight", None)) and m.weight().is_quantized:
            ints.append(m.weight().int_repr())
    return ints


def run_twice(gm: fx.GraphModule, run_pass: Callable[[], PassResult], *, modified: bool) -> PassResult:
    """A pass's contract: the first run rewrites ``gm`` in place (``modified`` as expected) and the
    graph lints; a second run is a no-op (``modified`` False, same code) and the graph still lints."""
    first = run_pass()
    assert first.graph_module is gm and first.modified is modified
    gm.graph.lint()
    code = gm.code
    second = run_pass()
    assert second.graph_module is gm
    assert second.modified is False
    assert gm.code == code
    gm.graph.lint()
    return first
