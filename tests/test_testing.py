"""Properties of the public hypothesis strategies in ``fxptqat.testing``."""

from __future__ import annotations

import operator
from collections.abc import Callable

import pytest
import torch
import torch.fx
from hypothesis import Phase, assume, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from torch import nn

from fxptqat.testing import (
    _materialise,
    act_bits,
    graph_modules,
    traceable_models,
    weight_bits,
)

from helpers import examples

SETTINGS = settings(max_examples=examples(30), deadline=None)


def _modules(gm: torch.fx.GraphModule, cls: type[nn.Module]) -> list[nn.Module]:
    return [m for m in gm.modules() if isinstance(m, cls)]


def _functions(gm: torch.fx.GraphModule) -> set[object]:
    return {n.target for n in gm.graph.nodes if n.op == "call_function"}


@SETTINGS
@given(traceable_models())
def test_drawn_models_run_trace_lint_and_match_eager_bitwise(pair):
    model, inputs = pair
    assert isinstance(inputs, tuple) and len(inputs) == 1
    (x,) = inputs
    assert x.dtype == torch.float32 and x.dim() in (2, 4)
    if x.dim() == 4:
        assert x.shape[2] == x.shape[3] and 4 <= x.shape[2] <= 8
    assert not model.training and not any(m.training for m in model.modules())
    with torch.no_grad():
        eager = model(*inputs)
    assert torch.isfinite(eager).all()
    assert eager.shape[0] == x.shape[0]
    gm = torch.fx.symbolic_trace(model)
    gm.graph.lint()
    with torch.no_grad():
        traced = gm(*inputs)
    assert torch.equal(eager, traced)
    # readable description of the architecture
    text = repr(model)
    assert f"seed={model.seed}" in text and f"return {model.output}" in text
    assert len(model.program) >= 1


@SETTINGS
@given(traceable_models())
def test_same_seed_rebuilds_identical_model_without_touching_global_rng(pair):
    model, (x,) = pair
    rng_before = torch.random.get_rng_state()
    again, (x2,) = _materialise(model.arch, model.seed, x.shape[0])
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert torch.equal(x, x2)
    sd, sd2 = model.state_dict(), again.state_dict()
    assert sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    with torch.no_grad():
        assert torch.equal(model(x), again(x2))
    assert repr(model) == repr(again)


@SETTINGS
@given(traceable_models(allow_linear=False, allow_bn=True))
def test_batchnorm_is_non_trivial(pair):
    model, _ = pair
    bns = _modules(model, nn.BatchNorm2d)
    assume(bns)  # a drawn conv gets BatchNorm half the time: judge the models that have one
    for bn in bns:
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
        assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert int(bn.num_batches_tracked) == 0


def _no_conv(gm, x):
    return not _modules(gm, nn.Conv2d) and x.dim() == 2


def _no_linear(gm, x):
    return not _modules(gm, nn.Linear) and x.dim() == 4


def _no_bn(gm, x):
    return not _modules(gm, nn.BatchNorm2d)


def _no_depthwise(gm, x):
    return all(m.groups == 1 for m in _modules(gm, nn.Conv2d))


def _no_add(gm, x):  # of two values (``v + 3.0`` is a pointwise op)
    return not any(n.op == "call_function" and n.target is operator.add and all(
        isinstance(a, torch.fx.Node) for a in n.args) for n in gm.graph.nodes)


def _no_cat(gm, x):
    return torch.cat not in _functions(gm)


def _no_pointwise(gm, x):
    pointwise = (nn.Hardswish, nn.Sigmoid, nn.Tanh)
    numbers = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (operator.mul, operator.add)
               and any(isinstance(a, float) for a in n.args)]
    return not any(_modules(gm, m) for m in pointwise) and not numbers


def _single_users(gm, x):
    return all(len(n.users) <= 1 for n in gm.graph.nodes)


def _small(gm, x):
    widths = [x.shape[1]]
    for m in gm.modules():
        if isinstance(m, nn.Conv2d):
            widths += [m.in_channels, m.out_channels]
        elif isinstance(m, nn.Linear):
            widths += [m.in_features, m.out_features]
    # one block (a two-branch block has two layers) plus an optional Linear head
    n_layers = len(_modules(gm, nn.Conv2d)) + len(_modules(gm, nn.Linear))
    return max(widths) <= 3 and n_layers <= 3 and x.shape[0] == 2


@pytest.mark.parametrize(
    ("kwargs", "check"),
    [
        ({"allow_conv": False}, _no_conv),
        ({"allow_linear": False}, _no_linear),
        ({"allow_bn": False}, _no_bn),
        ({"allow_depthwise": False}, _no_depthwise),
        ({"allow_residual": False}, _no_add),
        ({"allow_cat": False}, _no_cat),
        ({"allow_fanout": False}, _single_users),
        ({"allow_pointwise": False}, _no_pointwise),
        ({"max_layers": 1, "max_channels": 3, "batch_size": 2}, _small),
    ],
    ids=["conv", "linear", "bn", "depthwise", "residual", "cat", "fanout", "pointwise", "sizes"],
)
def test_flags_restrict_vocabulary(kwargs: dict, check: Callable) -> None:
    @SETTINGS
    @given(graph_modules(**kwargs))
    def inner(pair):
        gm, (x,) = pair
        gm.graph.lint()
        assert check(gm, x), gm.code

    inner()


def _conv_users(gm: torch.fx.GraphModule) -> int:
    convs = [
        n
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Conv2d)
    ]
    return max((len(n.users) for n in convs), default=0)


_FEATURES: dict[str, Callable] = {
    "depthwise": lambda gm, x: any(m.groups > 1 for m in _modules(gm, nn.Conv2d)),
    "bn": lambda gm, x: bool(_modules(gm, nn.BatchNorm2d)),
    "add": lambda gm, x: not _no_add(gm, x),
    "cat": lambda gm, x: torch.cat in _functions(gm),
    "conv-fanout": lambda gm, x: _conv_users(gm) >= 2,  # one conv output feeding two consumers
    "linear-head": lambda gm, x: x.dim() == 4 and bool(_modules(gm, nn.Linear)),
    "conv-output": lambda gm, x: x.dim() == 4 and not _modules(gm, nn.AdaptiveAvgPool2d),
    "linear-only": lambda gm, x: x.dim() == 2,
    "fixed-grid": lambda gm, x: bool(_modules(gm, nn.Sigmoid) or _modules(gm, nn.Tanh)),
    "hardswish": lambda gm, x: bool(_modules(gm, nn.Hardswish)),
    "scaled": lambda gm, x: any(n.op == "call_function" and any(isinstance(a, float) for a in n.args)
                                for n in gm.graph.nodes),
}


def test_whole_vocabulary_is_drawable() -> None:
    seen: set[str] = set()

    @settings(max_examples=120, deadline=None, database=None, derandomize=True, phases=[Phase.generate])
    @given(graph_modules())
    def collect(pair):
        gm, (x,) = pair
        seen.update(name for name, pred in _FEATURES.items() if pred(gm, x))

    collect()
    assert seen == set(_FEATURES)


def test_invalid_arguments_are_rejected() -> None:
    with pytest.raises(InvalidArgument):
        traceable_models(allow_conv=False, allow_linear=False)
    with pytest.raises(InvalidArgument):
        traceable_models(max_layers=0)
    with pytest.raises(InvalidArgument):
        traceable_models(batch_size=0)


@SETTINGS
@given(weight_bits(), act_bits(), st.data())
def test_bit_width_strategies(wb, ab, data):
    assert 2 <= wb <= 8
    assert ab in (8, None)
    batch = data.draw(st.integers(1, 2))
    model, (x,) = data.draw(traceable_models(max_layers=2, batch_size=batch))
    assert x.shape[0] == batch
