"""Hypothesis properties of the whole pipeline over models drawn from ``fxptqat.testing``.

Every property runs on random valid conv / linear networks (BatchNorm, ReLU, residual adds,
concatenation, fan-out) and random bit-widths. Each pass's own property (lint, honest ``modified``,
idempotence) sits beside its tests in ``tests/passes/test_<pass>.py``. Hypothesis profiles: see
``conftest.py`` (``dev``: random draws; ``ci``: derandomized).
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.fx as fx
from hypothesis import event, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.ao.quantization import FakeQuantizeBase, disable_fake_quant, disable_observer

import fxptqat as fq
from fxptqat import meta
from fxptqat.config import WEIGHT_RANGES as _RANGES
from fxptqat.fake_quantize import FakeQuantize
from fxptqat.testing import act_bits, traceable_models, weight_bits

from helpers import MODELS, TwoCats, examples, node_named, property_batches, weighted_nodes

EPS32 = torch.finfo(torch.float32).eps
# One example (prepare, calibrate, measure, lower... on a small model) takes ~20-100 ms with one
# torch thread; these counts keep the file near 30 s on 2 cores when every property holds.
FAST = settings(max_examples=examples(40), deadline=None)
PIPELINE = settings(max_examples=examples(30), deadline=None)


# -- helpers --------------------------------------------------------------------------------------
def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same_state(module: nn.Module, before: dict[str, torch.Tensor], what: str) -> None:
    now = module.state_dict()
    assert now.keys() == before.keys(), what
    changed = [k for k in before if not torch.equal(now[k], before[k])]
    assert not changed, f"{what}: {changed} changed"


def _disable_quantization(gm: fx.GraphModule) -> None:
    """torch.ao's own switches; fxptqat's FakeQuantize must follow them."""
    gm.apply(disable_fake_quant)
    gm.apply(disable_observer)
    quantizers = [m for m in gm.modules() if isinstance(m, FakeQuantize)]
    assert quantizers and all(not m._fake_quant and not m._observe for m in quantizers)


def _adam_step(qat: fx.GraphModule, x: torch.Tensor, *, lr: float = 1.0) -> list[tuple[str, nn.Parameter]]:
    """One Adam step in train mode on every parameter that requires grad; returns them by name."""
    qat.train()
    params = [(k, p) for k, p in qat.named_parameters() if p.requires_grad]
    out = qat(x)
    if params:
        opt = torch.optim.Adam([p for _, p in params], lr=lr)
        (out.square().mean() + out.mean()).backward()
        opt.step()
    qat.eval()
    return params


class _Majorant(nn.Module):
    def forward(self, z):
        return 1.5 * z + 1.0


def _abs_network_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``|model|`` on ``|x|`` in float64: every weight, bias and BN affine replaced by its absolute
    value and every BN mean by ``-|mean|``. Element-wise it bounds the magnitude of every value of
    the network and of any perturbation pushed through it (|W z| <= |W| |z|; ReLU, add, cat,
    average pool and flatten are monotone and 1-Lipschitz). A number multiplies by ``|c|`` and adds
    ``|d|``; Hardswish, Sigmoid and Tanh become ``1.5 z + 1``, which bounds each of their values
    (|hardswish(z)| <= |z|, |sigmoid| <= 1, |tanh| <= 1) and slopes (<= 1.5, 1/4, 1)."""
    m = copy.deepcopy(model).double().eval()
    m.program = tuple(op._replace(target=repr(abs(float(op.target)))) if op.kind in ("mul_scalar", "add_scalar")
                      else op for op in m.program)
    for name, mod in list(m.named_children()):
        if isinstance(mod, (nn.Hardswish, nn.Sigmoid, nn.Tanh)):
            setattr(m, name, _Majorant())
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                mod.weight.abs_()
                if mod.bias is not None:
                    mod.bias.abs_()
            elif isinstance(mod, nn.BatchNorm2d):
                mod.weight.abs_()
                mod.bias.abs_()
                mod.running_mean.copy_(-mod.running_mean.abs())
        return m(x.double().abs())


def _max_reduction(model: nn.Module, x: torch.Tensor) -> int:
    """Longest sum any one output element needs: conv/linear fan-in, or the pooled H*W."""
    n = x.shape[-1] * x.shape[-2] if x.dim() == 4 else 1
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            n = max(n, m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1])
        elif isinstance(m, nn.Linear):
            n = max(n, m.in_features)
    return n


# -- 1. fake-quant off == float ----------------------------------------------------------------------
@FAST
@given(traceable_models(max_layers=5, allow_bn=False), weight_bits(), act_bits())
def test_disabled_fake_quant_is_bitwise_float_without_bn(pair, wb, ab):
    model, (x,) = pair
    qat = fq.prepare(model, (x,), config=fq.QuantConfig(weight_bits=wb, act_bits=ab))
    fq.calibrate(qat, [(x,)])
    _disable_quantization(qat)
    with torch.no_grad():
        assert torch.equal(qat(x), model(x))


@FAST
@given(traceable_models(max_layers=5, allow_linear=False), weight_bits(), act_bits())
def test_disabled_fake_quant_matches_float_with_bn_within_roundoff(pair, wb, ab):
    model, (x,) = pair
    qat = fq.prepare(model, (x,), config=fq.QuantConfig(weight_bits=wb, act_bits=ab))
    fq.calibrate(qat, [(x,)])
    _disable_quantization(qat)
    with torch.no_grad():
        ref, out = model(x), qat(x)
    if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        event("no BatchNorm drawn")
        assert torch.equal(out, ref)
        return
    event("BatchNorm folded by torch.ao")
    # torch.ao's fused QAT conv-bn computes bn(conv(x, w*s) / s + b) with s = gamma / sqrt(var + eps)
    # where the float model computes bn(conv(x, w) + b): equal in exact arithmetic, different roundings.
    # Forward error analysis with unit roundoff u = eps/2: a layer whose outputs sum n products
    # (fan-in, or H*W for the average pool) rounds each output by at most (n + 6) u times the
    # magnitude of its terms (n for the dot product, 1 for the bias, 3 in BatchNorm, 2 for the
    # extra w*s and /s of the fused path). The abs network M = |model|(|x|) bounds those magnitudes
    # and how any earlier error grows on its way to the output, so each of the two computations is
    # within L (n_max + 6) u M of the exact result (L = ops in the program), and they are within
    # twice that of each other: L (n_max + 6) eps M, element-wise, M being the output magnitude.
    # (Observed differences are ~3 eps max|out|; a wrongly folded BN is off by O(|out|).)
    magnitude = _abs_network_output(model, x)
    tol = len(model.program) * (_max_reduction(model, x) + 6) * EPS32 * magnitude
    diff = (out.double() - ref.double()).abs()
    assert bool((diff <= tol).all()), f"max diff {float(diff.max())}, tol there {float(tol.max())}"


# -- 2. frozen state never moves -------------------------------------------------------------------
@PIPELINE
@given(
    MODELS,
    weight_bits(),
    act_bits(),
    st.one_of(st.builds(fq.Fraction, fraction=st.just(0.5)), st.builds(fq.Count, k=st.integers(0, 4))),
)
def test_frozen_nodes_do_not_change_under_an_optimizer_step(pair, wb, ab, policy):
    model, (x,) = pair
    batches = property_batches(model, x)
    qat = fq.prepare(model, (x,), config=fq.QuantConfig(weight_bits=wb, act_bits=ab))
    fq.calibrate(qat, batches)
    report = fq.measure_error(qat, batches)
    sel = fq.select_trainable(qat, report, policy=policy)
    assert set(sel.trainable) | set(sel.frozen) == {r.name for r in report.rows}
    assert not set(sel.trainable) & set(sel.frozen)

    nodes = {n.name: n for n in qat.graph.nodes}
    frozen = {name: qat.get_submodule(nodes[name].target) for name in sel.frozen}
    for name, module in frozen.items():
        assert not any(p.requires_grad for p in module.parameters()), name
    event(f"{len(sel.trainable)} trainable / {len(sel.frozen)} frozen nodes")
    frozen_before = {name: _state(m) for name, m in frozen.items()}
    everything_before = _state(qat)

    params = _adam_step(qat, x, lr=1.0)

    for name, module in frozen.items():
        _assert_same_state(module, frozen_before[name], f"frozen node {name}")
    # only parameters that require grad may move: no BN statistics, observer or scale buffer does
    trainable_names = {k for k, p in qat.named_parameters() if p.requires_grad}
    after = qat.state_dict()
    moved = {k for k in everything_before if not torch.equal(after[k], everything_before[k])}
    assert moved <= trainable_names, moved - trainable_names

    if sel.trainable:
        assert params and sel.trainable_params > 0
        # Adam's first step moves every element whose gradient is not negligible by ~lr. A gradient
        # is zero everywhere only when ReLUs kill all the signal of the drawn network.
        live = [k for k, p in params if p.grad is not None and float(p.grad.abs().max()) > 1e-6]
        for k in live:
            assert k in moved, f"trainable {k} had a gradient but did not move"
        event("trainable parameters moved" if moved else "no gradient reached a trainable node")
    else:
        assert sel.trainable_params == 0 and not params


WEIGHT_RANGES = st.sampled_from(_RANGES)


# -- 3. INT8 == fake-quant within one quantization step --------------------------------------------
@pytest.mark.parametrize("ab, ops", [(8, "all"), (None, "all"), (8, "weighted")],
                         ids=["act8", "weight-only", "act8-weighted"])
def test_lowered_int8_matches_fake_quant(ab, ops):
    # an ONNX export costs seconds per draw: 8 here and 6 in tests/test_lowering_onnx.py's property
    @(settings(PIPELINE, max_examples=examples(8)) if ops == "weighted" else PIPELINE)
    @given(MODELS, weight_bits(), WEIGHT_RANGES)
    def check(pair, wb, wr):
        model, (x,) = pair
        batches = property_batches(model, x)
        qat = fq.prepare(model, (x,), config=fq.QuantConfig(weight_bits=wb, weight_range=wr, act_bits=ab,
                                                            quantized_ops=ops))
        fq.calibrate(qat, batches)
        if ops == "weighted":  # its runtimes are the reference-graph ones; torch.ao's convert refuses
            with pytest.raises(fq.LoweringError, match="quantized_ops='weighted'"):
                fq.lower(qat)
            int8 = fq.lower(qat, runtime="onnxruntime", example_inputs=(x,), threads=1)
        else:
            int8 = fq.lower(qat)
        parity = fq.check_parity(qat, int8, batches)
        assert parity.ok and parity.coverage == 1.0, f"first divergence {parity.first_divergence}\n{parity.table()}"
        assert {r.name for r in parity.rows} <= weighted_nodes(qat)
        for row in parity.rows:
            # tolerance derived from the output quantizer's step, not a hand-tuned constant
            if ab is None or meta.node_info(node_named(qat, row.name)).output_quantizer is None:
                assert row.scale is None
            else:  # a calibrated activation quantizer: frozen, per tensor
                assert row.scale is not None and row.tolerance == pytest.approx(row.scale, rel=2e-3)

    check()


def test_lowered_int8_matches_fake_quant_when_one_value_feeds_two_cats():
    torch.manual_seed(0)
    model = TwoCats().eval()
    x = torch.randn(1, 1, 4, 4)
    qat = fq.prepare(model, (x,), config=fq.QuantConfig(weight_bits=8, act_bits=8))
    fq.calibrate(qat, [(x,)])
    parity = fq.check_parity(qat, fq.lower(qat), [(x,)])
    assert parity.ok and parity.coverage == 1.0, f"first divergence {parity.first_divergence}\n{parity.table()}"


def _parity_after_finetune(pair, wb, ab, wr="restricted"):
    model, (x,) = pair
    batches = property_batches(model, x)
    qat = fq.prepare(model, (x,), config=fq.QuantConfig(weight_bits=wb, weight_range=wr, act_bits=ab))
    fq.calibrate(qat, batches)
    fq.select_trainable(qat, fq.measure_error(qat, batches), policy=fq.AllLayers())
    _adam_step(qat, x, lr=0.5)  # pushes weights past the frozen scales: clamp_int_weights' job
    int8 = fq.lower(qat)
    parity = fq.check_parity(qat, int8, batches)
    assert parity.ok and parity.coverage == 1.0, f"first divergence {parity.first_divergence}\n{parity.table()}"


@pytest.mark.parametrize("ab", [8, None], ids=["act8", "weight-only"])
def test_lowered_int8_matches_fake_quant_after_finetuning(ab):
    @PIPELINE
    @given(MODELS, weight_bits(), WEIGHT_RANGES)
    def check(pair, wb, wr):
        _parity_after_finetune(pair, wb, ab, wr)

    check()


# -- 4. error metrics ------------------------------------------------------------------------------
@PIPELINE
@given(MODELS, weight_bits(), act_bits())
def test_error_is_zero_exactly_when_nothing_is_quantized(pair, wb, ab):
    model, (x,) = pair
    batches = property_batches(model, x)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fxptqat: .* stay in float")
        qat = fq.prepare(model, (x,), config=fq.QuantConfig(weight_bits=wb, act_bits=ab))
    fq.calibrate(qat, batches)

    report = fq.measure_error(qat, batches)
    weighted = weighted_nodes(qat)
    assert [r.name for r in report.rows] == [n.name for n in qat.graph.nodes if n.name in weighted]
    float_layers = {name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert {r.source for r in report.rows} == float_layers
    for r in report.rows:
        assert r.params == sum(p.numel() for p in qat.get_submodule(r.source).parameters())
        for s in (r.isolated, r.propagated):
            assert s.count > 0 and s.mse >= 0.0 and -1.0 <= s.cosine <= 1.0 and s.max_abs >= 0.0
            assert (s.mse == 0.0) == (s.sqnr_db == math.inf) == (s.max_abs == 0.0)

    _disable_quantization(qat)
    off = fq.measure_error(qat, batches)
    assert [r.name for r in off.rows] == [r.name for r in report.rows]
    for r in off.rows:
        for s in (r.isolated, r.propagated):
            assert s.mse == 0.0 and s.max_abs == 0.0, r.name
            assert s.cosine == 1.0 and s.sqnr_db == math.inf, r.name


# -- 5. the user's model is never touched ----------------------------------------------------------
@PIPELINE
@given(MODELS, weight_bits(), act_bits(), st.booleans())
def test_pipeline_leaves_the_users_model_unchanged(pair, wb, ab, training):
    model, (x,) = pair
    model.train(training)
    before = copy.deepcopy(model)
    batches = property_batches(model, x)

    qat = fq.prepare(model, (x,), config=fq.QuantConfig(weight_bits=wb, act_bits=ab))
    assert {id(t) for t in model.state_dict(keep_vars=True).values()}.isdisjoint(
        id(t) for t in qat.state_dict(keep_vars=True).values()
    )
    fq.calibrate(qat, batches)
    fq.select_trainable(qat, fq.measure_error(qat, batches), policy=fq.AllLayers())
    _adam_step(qat, x, lr=0.5)
    int8 = fq.lower(qat)
    fq.check_parity(qat, int8, batches)

    _assert_same_state(model, before.state_dict(), "user's model")
    assert [(n, m.training) for n, m in model.named_modules()] == [
        (n, m.training) for n, m in before.named_modules()
    ]
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in before.parameters()]
    assert all(p.grad is None for p in model.parameters())
    assert type(model) is type(before) and model.program == before.program
    if not training:
        with torch.no_grad():
            assert torch.equal(model(x), before(x))


# -- 6. measure_error does not depend on batch order -----------------------------------------------
@PIPELINE
@given(MODELS, weight_bits(), act_bits(), st.permutations(range(3)))
def test_measure_error_is_independent_of_batch_order(pair, wb, ab, order):
    model, (x,) = pair
    batches = property_batches(model, x, n=3)
    shuffled = [batches[i] for i in order]
    config = fq.QuantConfig(weight_bits=wb, act_bits=ab)
    a = fq.prepare(model, (x,), config=config)
    b = fq.prepare(model, (x,), config=config)
    fq.calibrate(a, batches)
    fq.calibrate(b, shuffled)
    # min/max calibration is order independent: identical scales and zero points
    qa = {k: v for k, v in a.state_dict().items() if "scale" in k or "zero_point" in k}
    qb = {k: v for k, v in b.state_dict().items() if "scale" in k or "zero_point" in k}
    assert qa.keys() == qb.keys() and all(torch.equal(qa[k], qb[k]) for k in qa)

    ra, rb = fq.measure_error(a, batches), fq.measure_error(b, shuffled)
    assert (ra.batches, ra.samples) == (rb.batches, rb.samples) == (3, sum(len(x) for x, in batches))
    assert [r.name for r in ra.rows] == [r.name for r in rb.rows]
    for row_a, row_b in zip(ra.rows, rb.rows, strict=True):
        for mode in ("isolated", "propagated"):
            sa, sb = row_a.stats(mode), row_b.stats(mode)
            assert sa.count == sb.count and sa.max_abs == sb.max_abs, (row_a.name, mode)
            # float64 running sums of the same terms in another order: relative 1e-9 (sqnr_db is a
            # log of a ratio of such sums, so 1e-9 dB absolute as well near 0 dB)
            for metric in ("mse", "cosine", "sqnr_db"):
                va, vb = sa.value(metric), sb.value(metric)
                assert va == vb or math.isclose(va, vb, rel_tol=1e-9, abs_tol=1e-9), (row_a.name, mode, metric)


# -- Dynamo ------------------------------------------------------------------------------------------
def _dynamo_breaks(module: nn.Module, x: torch.Tensor):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    try:
        explained = torch._dynamo.explain(module)(x)
        breaks = sum(counters["graph_break"].values())
    finally:
        torch._dynamo.reset()
        counters.clear()
    return explained, breaks


def test_dynamo_traces_calibrated_qat_graph_without_graph_breaks():
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ).eval()
    x = torch.randn(2, 3, 8, 8)

    qat = fq.prepare(model, (x,))
    fq.calibrate(qat, [(x,)])
    explained, breaks = _dynamo_breaks(qat, x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, str(explained)
    assert breaks == 0

    ao = prepare_qat_fx(copy.deepcopy(model).train(), get_default_qat_qconfig_mapping("x86"), (x,))
    explained, breaks = _dynamo_breaks(ao, x)
    # explain() reports graph_count - 1: frames holding only skipped torch.ao module calls compile no
    # graph, so it undercounts; Dynamo's own graph_break counter sees every break.
    assert explained.graph_break_count >= 1, str(explained)
    assert breaks >= explained.graph_break_count
    assert any(isinstance(m, FakeQuantizeBase) and not isinstance(m, FakeQuantize) for m in ao.modules())
