"""torch.compile(model, backend="fxptqat"): entry point, fused fake-quant for training, INT8 for inference."""

import copy
import logging
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

import fxptqat as fq
from fxptqat.backend import fake_quantize
from fxptqat.workarounds import exact_u8s8_kernels

from helpers import examples


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8 * 6 * 6, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.relu(self.bn(self.conv(x))), 1))


def _qat(weight_bits=4, seed=0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(4, 3, 8, 8, generator=g),) for _ in range(3)]
    qat = fq.prepare(Net().eval(), batches[0], config=fq.QuantConfig(weight_bits=weight_bits))
    fq.calibrate(qat, batches)
    fq.select_trainable(qat, fq.measure_error(qat, batches[:1]), policy=fq.AllLayers())
    return qat, batches


def _grads(model, x, y, forward=None):
    model.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy((model if forward is None else forward)(x), y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_registered_by_entry_point_in_a_fresh_process():
    """The name works before ``import fxptqat`` (torch reads the entry point group lazily), and
    importing fxptqat afterwards does not register it twice."""
    code = textwrap.dedent("""
        import sys, torch, torch._dynamo
        assert "fxptqat" in torch._dynamo.list_backends(), torch._dynamo.list_backends()
        scale, zp = torch.tensor([0.1]), torch.tensor([0], dtype=torch.int32)
        w = torch.randn(4, 4, requires_grad=True)
        def f(x):
            return torch.fake_quantize_per_tensor_affine(x @ w, scale, zp, -8, 7).sum()
        torch.compile(f, backend="fxptqat")(torch.randn(2, 4)).backward()
        assert w.grad is not None
        import fxptqat, fxptqat.backend
        assert torch._dynamo.lookup_backend("fxptqat") is fxptqat.backend.backend
        torch._dynamo.reset()
        torch.compile(f, backend="fxptqat")(torch.randn(2, 4))  # (the same graph: inductor's cache has it)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


@settings(max_examples=examples(40), deadline=None)
@given(st.integers(2, 8), st.booleans(), st.integers(0, 2**31 - 1), st.floats(1e-3, 1.0))
def test_fake_quantize_is_torchs_op_with_its_gradient(bits, per_channel, seed, scale_top):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(3, 5, 4, generator=g) * 3).requires_grad_()
    if per_channel:
        scale = torch.rand(5, generator=g) * scale_top + 1e-3
        zp = torch.zeros(5, dtype=torch.int32)
        qmin, qmax = -(2 ** (bits - 1)) + 1, 2 ** (bits - 1) - 1
        ref = torch.fake_quantize_per_channel_affine(x, scale, zp, 1, qmin, qmax)
        out = fake_quantize(x, scale, zp, qmin, qmax, 1)
    else:
        scale = torch.rand(1, generator=g) * scale_top + 1e-3
        zp = torch.randint(0, 2**bits, (1,), generator=g, dtype=torch.int32)
        qmin, qmax = 0, 2**bits - 1
        ref = torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax)
        out = fake_quantize(x, scale, zp, qmin, qmax)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6 * float(scale.max()))
    w = torch.randn(ref.shape, generator=g)
    (gref,) = torch.autograd.grad((ref * w).sum(), x)
    (gout,) = torch.autograd.grad((out * w).sum(), x)
    # the straight-through mask may differ only where x / scale sits on a rounding tie at the edge
    assert (gref != gout).float().mean() < 0.01
    assert torch.equal(gout, torch.where(gout != 0, w, torch.zeros_like(w)))  # pass-through or zero


def test_training_step_matches_eager_with_no_recompile_and_one_on_selection_change():
    qat, batches = _qat()
    eager = copy.deepcopy(qat).train()
    compiled_model = copy.deepcopy(qat).train()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(compiled_model, backend="fxptqat")
    y = torch.tensor([1, 2, 3, 4])
    for x, in batches:
        loss_e, grads_e = _grads(eager, x, y)
        loss_c, grads_c = _grads(compiled_model, x, y, compiled)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
        assert grads_c.keys() == grads_e.keys() and grads_e
        for name in grads_e:
            torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-5, msg=name)
    assert counters["fxptqat"]["graphs"] == 1 and counters["fxptqat"]["fused_graphs"] == 1
    assert counters["fxptqat"]["fake_quant_ops"] >= 4  # input, weights, the linear's input
    # a new selection changes which parameters require grad: one recompile, then none
    report = fq.measure_error(qat, batches[:1])
    fq.select_trainable(compiled_model, report, policy=fq.NoLayers())
    compiled_model.fc.weight.requires_grad_(True)
    for x, in batches[:2]:
        _grads(compiled_model, x, y, compiled)
    assert counters["fxptqat"]["graphs"] == 2, dict(counters["fxptqat"])


def test_no_graph_break_in_a_qat_graph():
    qat, batches = _qat()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(qat.train())(*batches[0])
    assert explained.graph_break_count == 0 and explained.graph_count == 1


class Gated(nn.Module):
    """Sigmoid and hardsigmoid outputs: torch.ao quantizes them on fixed grids."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x):
        y = self.conv(x)
        return torch.sigmoid(y) + self.gate(y) * y


def test_fixed_grid_quantizers_are_fxptqats_and_trace_without_a_break():
    from torch.ao.quantization.fake_quantize import FixedQParamsFakeQuantize

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(2, 3, 4, 4, generator=g),) for _ in range(2)]
    qat = fq.prepare(Gated().eval(), batches[0])
    fq.calibrate(qat, batches)
    fixed = [m for m in qat.modules() if isinstance(m, fq.FakeQuantize) and m.scale.numel() == 1
             and float(m.scale) == 1.0 / 256]
    assert len(fixed) == 2 and not any(type(m) is FixedQParamsFakeQuantize for m in qat.modules())
    torch._dynamo.reset()
    explained = torch._dynamo.explain(copy.deepcopy(qat).train())(*batches[0])
    assert explained.graph_break_count == 0, explained.break_reasons
    parity = fq.check_parity(qat, fq.lower(qat), batches)
    assert parity.ok and parity.coverage == 1.0, parity.table()


def test_inference_runs_int8_kernels_with_the_result_of_lower_inductor_and_parity():
    qat, batches = _qat(weight_bits=7)
    qat.eval()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(qat, backend="fxptqat")
    with torch.no_grad():
        out = compiled(*batches[0])
        expected = fq.lower(qat, runtime="inductor", example_inputs=batches[0])(*batches[0])
        fake = qat(*batches[0])
    assert counters["fxptqat"]["int8_graphs"] >= 1
    assert counters["fxptqat"]["folded_batch_norms"] == 1  # the ConvBn's BatchNorm became the conv's bias
    assert counters["inductor"]["qconv_weight_prepack_matcher_count"] >= 1
    assert counters["inductor"]["qlinear_weight_prepack_matcher_count"] >= 1
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(out, fake, rtol=0, atol=1e-4)
    parity = fq.check_parity(qat, compiled, batches)
    assert parity.ok and parity.coverage == 1.0, parity.table()
    assert parity.output_mean_abs is not None  # the compiled model's own network output was judged


def test_recursive_dict_tag_guards_give_the_same_int8_model_and_still_see_a_switched_quantizer():
    """The README's advice for INT8 inference through the backend (Dynamo checks a module's guards
    only when its ``__dict__`` changed): same output as lower(), no recompile from call to call, and a
    quantizer switched off after compiling recompiles instead of running the stale graph."""
    qat, batches = _qat(weight_bits=7)
    qat.eval()
    x = batches[0][0]
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(qat, backend="fxptqat")
    with torch.no_grad(), torch._dynamo.config.patch(use_recursive_dict_tags_for_guards=True):
        out = compiled(x)
        compiled(batches[1][0])
        graphs = counters["stats"]["unique_graphs"]
        expected = fq.lower(copy.deepcopy(qat), runtime="inductor", example_inputs=(x,))(x)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
        assert counters["fxptqat"]["int8_graphs"] == 1 and graphs == 1
        compiled(x)
        graphs = counters["stats"]["unique_graphs"]  # lower() compiled one more
        quantizer = next(m for m in qat.modules() if isinstance(m, fq.FakeQuantize) and not m.is_per_channel)
        quantizer.enable_fake_quant(False)
        switched = qat(x)
        assert not torch.allclose(switched, out, atol=1e-4)  # the switch matters for this input
        torch.testing.assert_close(compiled(x), switched, rtol=0, atol=1e-4)
    assert counters["stats"]["unique_graphs"] == graphs + 1


def _tensor_guard_sources(drop: bool, model, x) -> tuple[set, torch.Tensor]:
    """The sources of the TENSOR_MATCH guards Dynamo installs when the backend compiles ``model`` for
    inference (``drop_frozen_guards=drop``), and the output."""
    import functools

    from fxptqat.backend import backend

    guards = []
    compiled = torch._dynamo.optimize(functools.partial(backend, options={"drop_frozen_guards": drop}),
                                      guard_export_fn=lambda g: guards.append(list(g)))(model)
    with torch.no_grad():
        out = compiled(x)
    return {g.name for g in guards[-1] if g.create_fn_name() == "TENSOR_MATCH"}, out


def test_int8_drops_the_guards_of_frozen_tensors_and_still_recompiles_on_every_other_change():
    """The INT8 path compiles the weights and quantizer parameters in: their tensor guards are
    removed (drop_frozen_guards, default), the input's stays, and every other change still
    recompiles -- a switched quantizer, train mode, a call with gradients, a new input shape."""
    qat, batches = _qat(weight_bits=7)
    qat.eval()
    x = batches[0][0]
    torch._dynamo.reset()
    kept, out_kept = _tensor_guard_sources(False, qat, x)
    torch._dynamo.reset()
    counters.clear()
    dropped, out = _tensor_guard_sources(True, qat, x)
    weights = {f"._parameters['{name}']" for name in ("weight", "bias")}
    assert sum(any(name.endswith(w) for w in weights) for name in kept) >= 3, kept  # conv, bn, fc weights...
    assert sum("_buffers['scale']" in name for name in kept) >= 2, kept  # ...and the quantizers' scales
    assert dropped == {name for name in kept if "self" not in name} and len(dropped) == 1, dropped  # the input
    assert counters["fxptqat"]["frozen_tensor_guards_dropped"] == len(kept) - len(dropped)
    torch.testing.assert_close(out, out_kept, rtol=0, atol=0)

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(qat, backend="fxptqat")
    with torch.no_grad():
        out = compiled(x)
        compiled(batches[1][0])
        assert counters["stats"]["unique_graphs"] == 1  # no recompile from call to call
        torch.testing.assert_close(out, fq.lower(copy.deepcopy(qat), runtime="inductor", example_inputs=(x,))(x),
                                   rtol=0, atol=1e-5)
        graphs = counters["stats"]["unique_graphs"]
        quantizer = next(m for m in qat.modules() if isinstance(m, fq.FakeQuantize) and not m.is_per_channel)
        quantizer.enable_fake_quant(False)
        switched = qat(x)
        assert not torch.allclose(switched, out, atol=1e-4)
        torch.testing.assert_close(compiled(x), switched, rtol=0, atol=1e-4)
        assert counters["stats"]["unique_graphs"] == graphs + 1
        quantizer.enable_fake_quant(True)
        # the guards were built with Dynamo's recursive dict tags (dict_tag_guards; the switched
        # quantizer above was still seen), and the setting was put back once the compile ended
        assert counters["fxptqat"]["dict_tag_guard_frames"] == 2
        assert torch._dynamo.config.use_recursive_dict_tags_for_guards is False
        torch.testing.assert_close(compiled(x), out, rtol=0, atol=1e-5)
        graphs = counters["stats"]["unique_graphs"]
        small = x[:2]  # a new batch size: the input's guard is kept
        torch.testing.assert_close(compiled(small), qat(small), rtol=0, atol=1e-4)
        # one more graph, dynamic in the batch size (none if Dynamo's profile-guided dynamism, which
        # remembers code locations across the process, made the first compile dynamic already)
        assert counters["stats"]["unique_graphs"] <= graphs + 1
        assert not counters["graph_break"]
    qat.train()  # training mode and gradients: the fused QAT graph, which gives gradients
    loss = compiled(x).sum()
    loss.backward()
    assert all(p.grad is not None for p in qat.parameters() if p.requires_grad)
    assert counters["fxptqat"]["fused_graphs"] >= 1
    # an inference graph compiled with gradients on (nothing requires grad) keeps its guards: making
    # a weight trainable again must recompile, not run the graph that computes no gradient
    frozen = copy.deepcopy(qat).eval().requires_grad_(False)
    torch._dynamo.reset()
    counters.clear()
    torch.compile(frozen, backend="fxptqat")(x)
    assert counters["fxptqat"]["int8_graphs"] == 1 and not counters["fxptqat"]["frozen_tensor_guards_dropped"]


@pytest.mark.parametrize("global_freezing", [False, True])
def test_int8_compiles_again_when_training_changed_the_frozen_weights(global_freezing):
    """Evaluate, train through the same compiled model, evaluate again: the INT8 graph froze the
    weights and quantizer parameters, so it must not run the old constants (an in-place change bumps
    their version counters). Also with inductor's freezing set globally, where Dynamo itself makes
    the parameters graph attributes."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch(freezing=global_freezing):
        _train_between_evaluations()


@pytest.mark.parametrize("global_freezing", [False, True])
def test_int8_compiles_again_when_a_frozen_parameter_was_replaced_by_a_new_object(global_freezing):
    """``module.weight = nn.Parameter(...)`` and ``load_state_dict(assign=True)`` put new tensor objects
    in place of the ones the INT8 graph froze (their version counters start afresh, and Dynamo passes
    the graph only its remaining inputs): the backend sees the replacement and compiles again with
    them; one of another shape is refused with what to do. Also with inductor's freezing set globally."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch(freezing=global_freezing):
        _replace_between_evaluations()


def _compiled_and_evaluated():
    """A W7 QAT graph compiled with the backend and called once in eval mode under no_grad."""
    qat, batches = _qat(weight_bits=7)
    x = batches[0][0]
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(qat, backend="fxptqat")
    qat.eval()
    with torch.no_grad():
        before = compiled(x)
    return qat, batches, x, compiled, before


def _replace_between_evaluations():
    qat, batches, x, compiled, before = _compiled_and_evaluated()
    conv = next(m for m in qat.modules() if isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.dim() == 4)
    conv.weight = nn.Parameter(conv.weight.detach() * 0.5)
    with torch.no_grad():
        after, again, eager = compiled(x), compiled(x), qat(x)
    assert not torch.allclose(after, before, atol=1e-3)  # the replacement moved the output
    torch.testing.assert_close(after, eager, rtol=0, atol=1e-4)
    torch.testing.assert_close(again, after, rtol=0, atol=0)
    # one compile per change: ours (refrozen), or Dynamo's own where it guards the attributes it froze
    compiles = lambda: counters["fxptqat"]["int8_refrozen"] + counters["fxptqat"]["int8_graphs"]  # noqa: E731
    assert compiles() == 2
    if not torch._inductor.config.freezing:
        assert counters["fxptqat"]["int8_refrozen"] == 1
    state = {k: v * 0.25 if k.endswith("weight") else v.clone() for k, v in qat.state_dict().items()}
    qat.load_state_dict(state, assign=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), qat(x), rtol=0, atol=1e-4)
    assert compiles() == 3
    if torch._inductor.config.freezing:
        return  # Dynamo traces a new shape again itself there (this model then fails as eager does)
    conv.weight = nn.Parameter(conv.weight.detach()[:, :, :2, :2].contiguous())
    with torch.no_grad(), pytest.raises(fq.LoweringError, match=r"torch._dynamo.reset\(\)"):
        compiled(x)
    torch._dynamo.reset()


def _train_between_evaluations():
    qat, batches, x, compiled, before = _compiled_and_evaluated()
    with torch.no_grad():
        compiled(x)
    assert counters["fxptqat"]["int8_graphs"] == 1 and not counters["fxptqat"]["int8_refrozen"]
    qat.train()
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.05)
    for xb, in batches:
        loss = compiled(xb).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    qat.eval()
    with torch.no_grad():
        after, again, eager = compiled(x), compiled(x), qat(x)
    assert not torch.allclose(after, before, atol=1e-3)  # training moved the output
    torch.testing.assert_close(after, eager, rtol=0, atol=1e-4)
    torch.testing.assert_close(again, after, rtol=0, atol=0)
    assert counters["fxptqat"]["int8_refrozen"] == 1  # once, not on every call
    with torch.no_grad():  # load_state_dict copies in place too
        state = {k: v * 0.5 if k.endswith("weight") else v for k, v in qat.state_dict().items()}
        qat.load_state_dict(state)
        torch.testing.assert_close(compiled(x), qat(x), rtol=0, atol=1e-4)
    assert counters["fxptqat"]["int8_refrozen"] == 2 and counters["fxptqat"]["int8_graphs"] == 1
    with torch.no_grad():  # a graph Dynamo made dynamic in the batch size, refrozen, then other sizes
        compiled(x[:2])
        for p in qat.parameters():
            p.mul_(0.9)
        for n in (3, 2, 3):
            torch.testing.assert_close(compiled(x[:n]), qat(x[:n]), rtol=0, atol=1e-4)
    assert counters["fxptqat"]["int8_refrozen"] == 3 and counters["fxptqat"]["int8_graphs"] <= 2


@pytest.mark.parametrize("backend", ["fxptqat", "inductor"])
def test_a_ragged_last_batch_recompiles_once_without_a_graph_break(backend):
    """A new batch size makes Dynamo recompile with dynamic shapes, where torch's fake-quant ops have
    no meta kernel (workarounds.fake_quant_symbolic_shapes): one graph, no break, eager's gradients."""
    from fxptqat.workarounds import fake_quant_symbolic_shapes

    assert fake_quant_symbolic_shapes() == []  # registered once, at import
    qat, batches = _qat()
    qat.train()
    g = torch.Generator().manual_seed(5)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(qat, backend=backend)
    for n in (4, 3, 2):
        x, y = torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)
        eager_loss, eager_grads = _grads(qat, x, y)
        loss, grads = _grads(qat, x, y, forward=compiled)
        torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
        assert grads.keys() == eager_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # 2: one recompile, dynamic (1 if Dynamo's profile-guided dynamism made the first compile dynamic)
    assert counters["stats"]["unique_graphs"] <= 2 and not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.skipif(exact_u8s8_kernels(), reason="this CPU has AVX-512 VNNI: oneDNN is exact with 8-bit weights")
def test_inference_that_would_saturate_falls_back_with_a_log_or_refuses(caplog):
    qat, batches = _qat(weight_bits=8)
    qat.eval()
    torch._dynamo.reset()
    counters.clear()
    with caplog.at_level(logging.WARNING, logger="fxptqat.backend"), torch.no_grad():
        out = torch.compile(qat, backend="fxptqat")(*batches[0])
        fake = qat(*batches[0])
    assert counters["fxptqat"]["int8_refused"] == 1 and counters["fxptqat"]["int8_graphs"] == 0
    assert "AVX-512 VNNI" in caplog.text
    torch.testing.assert_close(out, fake, rtol=0, atol=1e-5)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="int8=True.*VNNI"), torch.no_grad():
        torch.compile(qat, backend="fxptqat", options={"int8": True})(*batches[0])


def test_bad_options_and_graphs_without_fake_quant(caplog):
    qat, batches = _qat()
    torch._dynamo.reset()
    with pytest.raises(Exception, match="unknown option"):
        torch.compile(qat, backend="fxptqat", options={"fuse": True})(*batches[0])
    torch._dynamo.reset()
    with pytest.raises(Exception, match="save_fake_quant='yes'"):
        torch.compile(qat.train(), backend="fxptqat", options={"save_fake_quant": "yes"})(*batches[0])
    torch._dynamo.reset()
    with pytest.raises(Exception, match="int8=True compiles inference graphs only"):
        torch.compile(qat.train(), backend="fxptqat", options={"int8": True})(*batches[0])
    for option in ("drop_frozen_guards", "dict_tag_guards"):
        with pytest.raises(Exception, match=option):
            torch.compile(qat.train(), backend="fxptqat", options={option: "yes"})(*batches[0])
    torch._dynamo.reset()
    counters.clear()
    plain = nn.Linear(4, 2)
    with caplog.at_level(logging.INFO, logger="fxptqat.backend"):
        out = torch.compile(plain, backend="fxptqat")(torch.ones(1, 4))
    torch.testing.assert_close(out, plain(torch.ones(1, 4)))
    assert counters["fxptqat"]["graphs_without_fake_quant"] == 1 and "no fake-quant op" in caplog.text


def test_finetune_compile_follows_the_eager_losses():
    qat, batches = _qat()
    y = torch.tensor([1, 2, 3, 4])
    loader = [(x, y) for x, in batches]
    a, b = copy.deepcopy(qat), copy.deepcopy(qat)
    torch._dynamo.reset()
    eager = fq.finetune(a, loader, nn.functional.cross_entropy, steps=4, lr=1e-3, progress=False)
    compiled = fq.finetune(b, loader, nn.functional.cross_entropy, steps=4, lr=1e-3, progress=False, compile=True)
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5)
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)
    with pytest.raises(fq.ConfigError, match="compile must be True or False"):
        fq.finetune(a, loader, nn.functional.cross_entropy, steps=1, compile="yes")


def _dynamo_graph(model, x):
    """The graph (and example inputs) Dynamo hands a backend for ``model(x)`` under no_grad."""
    seen = []

    def grab(gm, example_inputs):
        seen.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=grab)(x)
    torch._dynamo.reset()
    (gm, inputs), = seen
    return gm, inputs


@pytest.mark.parametrize("zero_gamma", [False, True])
def test_fold_batch_norm_turns_convbn_into_conv_with_bias(zero_gamma):
    """torch.ao's eval-mode ConvBn ``bn(conv(x, fq(w*s)) / s + b)`` becomes ``conv(x, fq(w*s), c)``,
    the same values; a channel with gamma 0 (s = 0: the division is 0/0) is left alone."""
    from fxptqat.backend import _constant_module_state, fold_batch_norm, rewrite_fake_quant

    qat, batches = _qat()
    if zero_gamma:
        with torch.no_grad():
            qat.get_submodule("conv").bn.weight[2] = 0.0
    qat.eval()
    (x,) = batches[0]
    gm, inputs = _dynamo_graph(qat, x)
    rewrite_fake_quant(gm, "qdq", inputs)
    keep = _constant_module_state(gm, inputs)
    with torch.no_grad():
        before = gm(*[inputs[i] for i in keep])
    folded = fold_batch_norm(gm)
    norms = [n for n in gm.graph.nodes if n.op == "call_function" and "batch_norm" in str(n.target)]
    if zero_gamma:
        assert folded == 0 and len(norms) == 1
        return
    assert folded == 1 and not norms
    with torch.no_grad():
        after = gm(*[inputs[i] for i in keep])
        fake = qat(x)
    torch.testing.assert_close(after[0], before[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(after[0], fake, rtol=0, atol=1e-5)


# -- the fake-quant mask and drop_repeated_fake_quant --------------------------------------------------
def test_the_straight_through_mask_is_a_float_tensor_zero_outside_the_grid_and_on_nan():
    """Same gradient as torch's op on values outside the grid, at infinities and at NaN (0), and the
    mask is of ``x``'s dtype: a ``bool`` mask is what inductor's CPU code stores slowly."""
    from fxptqat.backend import _grid

    # grid [0, 27], zero point 3: x / 0.1 rounds inside for x in [-0.35, 2.45)
    x = torch.tensor([-1e9, -3.0, -0.36, -0.26, 0.0, 0.3, 2.4, 2.46, 1e9, float("inf"), float("-inf"), float("nan")])
    scale, zp = torch.tensor([0.1]), torch.tensor([3], dtype=torch.int32)
    out, inside = _grid(x, scale, zp, 0, 27, None)
    assert inside.dtype == x.dtype
    assert inside.tolist() == [0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    xg = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(fake_quantize(xg, scale, zp, 0, 27).sum(), xg)
    xr = x.clone().requires_grad_()
    (ref,) = torch.autograd.grad(torch.fake_quantize_per_tensor_affine(xr, scale, zp, 0, 27).sum(), xr)
    assert grad.tolist() == ref.tolist() == inside.tolist()
    finite = ~torch.isnan(x)
    assert torch.equal(out[finite], torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, 27)[finite])


def _drop_backend(record: list):
    """A backend that applies drop_repeated_fake_quant and runs the graph eagerly."""
    from fxptqat.backend import drop_repeated_fake_quant

    def run(gm, example_inputs):
        record.append(drop_repeated_fake_quant(gm, example_inputs))
        return gm.forward
    return run


def _values_and_grads(f, x, w):
    x = x.clone().requires_grad_()
    out = f(x)
    (grad,) = torch.autograd.grad((out * w).sum(), x)
    return out.detach(), grad


_S0, _Z0 = torch.tensor([0.05]), torch.tensor([120], dtype=torch.int32)
_S1, _Z1 = torch.tensor([0.07]), torch.tensor([3], dtype=torch.int32)
# one quantizer's tensors under a second name; equal values in other tensors; the same tensors, a narrower range
_QUANTIZERS = [(_S0, _Z0, 0, 255), (_S1, _Z1, 0, 255), (_S0.clone(), _Z0.clone(), 0, 255), (_S0, _Z0, 0, 127)]
_KEEPING = ("reshape", "transpose", "permute", "flatten", "getitem", "max_pool", "chunk")


def _apply(op: str, v: torch.Tensor) -> torch.Tensor:
    if op == "reshape":
        return v.reshape(v.shape[0], -1).reshape(v.shape)
    if op == "transpose":
        return v.transpose(2, 3)
    if op == "permute":
        return v.permute(0, 1, 3, 2)
    if op == "flatten":
        return torch.flatten(v, 2).unflatten(2, v.shape[2:])
    if op == "getitem":
        return v[:, :, 1:] if v.shape[2] > 2 else v[:, :, :]
    if op == "max_pool":
        return nn.functional.max_pool2d(v, 2, stride=1) if v.shape[2] > 2 and v.shape[3] > 2 else v
    if op == "chunk":
        return torch.chunk(v, 2, dim=1)[0] if v.shape[1] > 1 else v
    if op == "relu":
        return torch.relu(v)  # keeps the grid too, but not in the pass's list: the chain stops here
    return v * 2  # "double": off the grid


@settings(max_examples=examples(40), deadline=None)
@given(st.lists(st.one_of(st.tuples(st.just("fq"), st.integers(0, len(_QUANTIZERS) - 1)),
                          st.tuples(st.sampled_from(_KEEPING + ("relu", "double")), st.just(0))),
                min_size=1, max_size=10),
       st.integers(0, 2**31 - 1))
def test_dropping_repeated_fake_quant_changes_no_value_and_no_gradient(program, seed):
    """A random chain of fake-quant calls (four quantizers: two distinct, one with the first's values
    in other tensors, one with the first's tensors and a narrower range) and value-keeping ops:
    the compiled graph computes the same values and gradients bit for bit, and exactly the calls
    that re-quantize onto the grid their input is already on (same tensors, same range, through
    value-keeping ops only) are removed."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 5, 5, generator=g) * 4
    expected_drops, grid = 0, None
    for op, k in program:
        if op == "fq":
            expected_drops += grid == k
            grid = k
        elif op in ("relu", "double"):
            grid = None

    def f(v):
        for op, k in program:
            if op == "fq":
                s, z, lo, hi = _QUANTIZERS[k]
                v = torch.fake_quantize_per_tensor_affine(v, s, z, lo, hi)
            else:
                v = _apply(op, v)
        return v

    ref, ref_grad = _values_and_grads(f, x, w := torch.randn(f(x).shape, generator=g))
    record: list[int] = []
    torch._dynamo.reset()
    out, grad = _values_and_grads(torch.compile(f, backend=_drop_backend(record), fullgraph=True), x, w)
    torch._dynamo.reset()
    assert record == [expected_drops], (record, expected_drops, program)
    assert torch.equal(out, ref) and torch.equal(grad, ref_grad)


def test_a_call_is_kept_when_its_grid_may_have_changed():
    """No removal when an alias of the first call's output is written in place, or when the
    quantizer's scale is updated between the calls (a quantizer that still observes)."""
    s, z = torch.tensor([0.05]), torch.tensor([120], dtype=torch.int32)

    def mutated_alias(v):
        a = torch.fake_quantize_per_tensor_affine(v, s, z, 0, 255)
        a.view(-1)[:3].mul_(1.01)
        return torch.fake_quantize_per_tensor_affine(a.reshape(2, -1), s, z, 0, 255)

    def rescaled(v, s):
        a = torch.fake_quantize_per_tensor_affine(v, s, z, 0, 255)
        s.mul_(1.5)
        return torch.fake_quantize_per_tensor_affine(a.transpose(0, 1), s, z, 0, 255)

    x = torch.randn(2, 8) * 4
    for f, args in ((mutated_alias, ()), (rescaled, (s.clone(),))):
        record: list[int] = []
        torch._dynamo.reset()
        out = torch.compile(f, backend=_drop_backend(record))(x.clone(), *[a.clone() for a in args])
        torch._dynamo.reset()
        assert record == [0], f.__name__
        assert torch.equal(out, f(x.clone(), *[a.clone() for a in args])), f.__name__


def test_a_transformers_reshaped_qkv_are_not_fake_quantized_again():
    """SmallViT's graph re-quantizes q, k, v after each reshape and transpose (torch.ao shares the
    quantizer): the backend drops those calls, and the compiled training step matches eager."""
    from fxptqat.examples.models import SmallViT

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 1, 8, 8, generator=g),) for _ in range(2)]
    net = SmallViT(num_classes=3, image_size=8, patch_size=4, dim=8, depth=1, heads=2).eval()
    qat = fq.prepare(net, batches[0], config=fq.QuantConfig(weight_bits=4))
    fq.calibrate(qat, batches)
    eager, compiled_model = copy.deepcopy(qat).train(), copy.deepcopy(qat).train()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(compiled_model, backend="fxptqat")
    y = torch.tensor([0, 1, 2, 0])
    loss_e, grads_e = _grads(eager, batches[0][0], y)
    loss_c, grads_c = _grads(compiled_model, batches[0][0], y, compiled)
    # per block: q, k, v after reshape and after transpose (6), k's second transpose, the attention
    # output's transpose and reshape (3); the patch embedding's flatten and transpose (2)
    assert counters["fxptqat"]["repeated_fake_quant_dropped"] == 11, dict(counters["fxptqat"])
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    assert grads_c.keys() == grads_e.keys() and grads_e
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-5, msg=name)


def _partitioned_backend(save, graphs):
    """A Dynamo backend doing what ``backend="fxptqat"`` does before inductor (drop repeated calls,
    fuse), then AOTAutograd with inductor's partitioner and decompositions, running the partitioned
    forward and backward graphs as Python (no C++ compile) and recording them."""
    from functools import partial

    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.decomposition import select_decomp_table

    from fxptqat.backend import drop_repeated_fake_quant, rewrite_fake_quant

    def record(kind):
        def compiler(gm, example_inputs):
            graphs[kind] = gm
            return make_boxed_func(gm.forward)
        return compiler

    inner = aot_autograd(fw_compiler=record("forward"), bw_compiler=record("backward"),
                         partition_fn=partial(min_cut_rematerialization_partition, compiler="inductor"),
                         decompositions=select_decomp_table())

    def backend(gm, example_inputs):
        drop_repeated_fake_quant(gm, example_inputs)
        rewrite_fake_quant(gm, "fuse", save=save)
        return inner(gm, example_inputs)
    return backend


def _ops(gm):
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("save", ["auto", True, False])
def test_what_the_backward_recomputes_follows_save_fake_quant(save):
    """The backward AOTAutograd partitions out of a transformer's training graph: by default
    ("auto") it recomputes no softmax (the softmax and its quantizer are tagged MUST_SAVE) but still
    recomputes the other quantizers from their saved inputs; with True it recomputes no quantizer
    either; with False (the partitioner's own choice) it recomputes the softmax and the quantizers.
    Gradients equal eager's in each case."""
    from fxptqat.examples.models import SmallViT

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 1, 8, 8, generator=g),) for _ in range(2)]
    net = SmallViT(num_classes=3, image_size=8, patch_size=4, dim=8, depth=1, heads=2).eval()
    net.blocks[0].act = nn.ReLU()  # GELU's recomputation has an exp of its own: the only exp is the softmax's
    qat = fq.prepare(net, batches[0], config=fq.QuantConfig(weight_bits=4))
    fq.calibrate(qat, batches)
    eager, compiled_model = copy.deepcopy(qat).train(), copy.deepcopy(qat).train()
    torch._dynamo.reset()
    graphs = {}
    compiled = torch.compile(compiled_model, backend=_partitioned_backend(save, graphs))
    y = torch.tensor([0, 1, 2, 0])
    loss_e, grads_e = _grads(eager, batches[0][0], y)
    loss_c, grads_c = _grads(compiled_model, batches[0][0], y, compiled)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    assert grads_c.keys() == grads_e.keys() and grads_e
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-5, msg=name)
    forward, backward = _ops(graphs["forward"]), _ops(graphs["backward"])
    assert "aten.round.default" in forward and "aten.exp.default" in forward
    assert ("aten.round.default" in backward) == (save is not True), backward
    assert ("aten.exp.default" in backward) == (save is False), backward



_SOFTMAX_GRID = (torch.tensor([1 / 256]), torch.tensor([0], dtype=torch.int32), 0, 255)  # torch.ao's fixed grid
_PARTITION_OPS = ("fq", "fq_softmax_grid", "softmax", "log_softmax", "relu", "double", "transpose")


@settings(max_examples=examples(12), deadline=None)
@given(st.lists(st.sampled_from(_PARTITION_OPS), min_size=1, max_size=8), st.integers(0, 2**31 - 1))
def test_save_fake_quant_changes_no_value_and_no_gradient(program, seed):
    """A random chain of fake-quant calls, softmaxes and element-wise ops, compiled through
    AOTAutograd with each ``save_fake_quant`` setting: whatever the partitioner saves or recomputes,
    the values and gradients are the same bit for bit across the settings. (Against eager: only
    where no value sits within float error of a rounding boundary -- the decomposed softmax differs
    from eager's in the last bits -- so that comparison is the real-model tests' above.)"""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 4, 4, generator=g) * 3

    def chain(fake_quant):
        def f(v):
            for op in program:
                if op == "fq":
                    v = fake_quant(v, torch.tensor([0.05]), torch.tensor([120], dtype=torch.int32), 0, 255)
                elif op == "fq_softmax_grid":
                    v = fake_quant(v, *_SOFTMAX_GRID)
                elif op == "softmax":
                    v = torch.softmax(v, dim=-1)
                elif op == "log_softmax":
                    v = torch.log_softmax(v, dim=-1)
                elif op == "relu":
                    v = torch.relu(v)
                elif op == "transpose":
                    v = v.transpose(2, 3)
                else:
                    v = v * 2
            return v
        return f

    w = torch.randn(x.shape, generator=g)
    results = []
    for save in ("auto", True, False):
        torch._dynamo.reset()
        graphs = {}
        compiled = torch.compile(chain(torch.fake_quantize_per_tensor_affine), fullgraph=True,
                                 backend=_partitioned_backend(save, graphs))
        results.append(_values_and_grads(compiled, x, w))
    torch._dynamo.reset()
    for out, grad in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(grad, results[0][1]), program
    ref, ref_grad = _values_and_grads(chain(fake_quantize), x, w)
    assert torch.isclose(results[0][0], ref, rtol=1e-4, atol=1e-5).float().mean() > 0.5  # the same chain
