import pytest
import torch
import torch.nn as nn

import fxptqat as fq
from fxptqat.capture.tracing import trace


class Flagged(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x, use_b: bool = True):
        if use_b:  # Python control flow on a plain flag: concrete_args specialises it
            x = self.b(x)
        return self.a(x)


class Branchy(nn.Module):
    """Data-dependent control flow: untraceable unless kept as a leaf."""

    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.l(x)
        return -self.l(x)


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.branchy = Branchy()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.branchy(x))


def test_concrete_args_specialise_a_flag():
    x = torch.randn(3, 4)
    model = Flagged().eval()
    without_b = fq.prepare(model, x, config=fq.QuantConfig(concrete_args={"use_b": False}))
    names = {n.name for n in without_b.graph.nodes if n.op == "call_module"}
    assert "b" not in names and "a" in names
    assert [n.name for n in without_b.graph.nodes if n.op == "placeholder"] == ["x"]
    fq.calibrate(without_b, [(x,)])
    torch.testing.assert_close(without_b(x), model(x, use_b=False), atol=0.05, rtol=0)
    with_b = fq.prepare(model, x, config=fq.QuantConfig(concrete_args={"use_b": True}))
    assert "b" in {n.name for n in with_b.graph.nodes if n.op == "call_module"}


@pytest.mark.parametrize("leaf", [Branchy, "branchy"], ids=["by class", "by name"])
def test_leaf_modules_keep_untraceable_code_opaque(leaf):
    model = Outer().eval()
    x = torch.randn(3, 4)
    with pytest.raises(fq.TraceError, match="leaf_modules"):
        fq.prepare(model, x)
    gm = trace(model, fq.QuantConfig(leaf_modules=(leaf,)))
    assert any(n.op == "call_module" and n.target == "branchy" for n in gm.graph.nodes)
    qat = fq.prepare(model, x, config=fq.QuantConfig(leaf_modules=(leaf,)))
    fq.calibrate(qat, [(x,)])
    report = fq.measure_error(qat, [(x,)])
    assert [r.name for r in report] == ["head"]  # the leaf stays float, the rest is quantized


def test_trace_records_user_source_lines():
    gm = trace(Flagged(), fq.QuantConfig(concrete_args={"use_b": True}))
    node = next(n for n in gm.graph.nodes if n.name == "a")
    assert "self.a(x)" in (node.stack_trace or "")


class Attention(nn.Module):
    """timm / transformers style: optional mask and flags, keyword-only options."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(4, 4)
        self.k = nn.Linear(4, 4)

    def forward(self, x, attn_mask=None, is_causal: bool = False, *, context=None, scale: float = 1.0):
        y = self.q(x) * scale
        if attn_mask is not None:
            y = y + attn_mask
        if context is not None:
            y = y + self.k(context)
        if is_causal:
            y = y * 2
        return y


def _placeholders(qat):
    return [n.target for n in qat.graph.nodes if n.op == "placeholder"]


def test_arguments_not_given_keep_their_defaults():
    x = torch.randn(3, 4)
    qat = fq.prepare(Attention(), (x,))
    assert _placeholders(qat) == ["x"]  # attn_mask, is_causal, context, scale are baked in
    fq.calibrate(qat, [x, (x, torch.zeros(3))])  # trailing items (labels) are ignored
    with torch.no_grad():
        torch.testing.assert_close(qat(x), Attention.forward(_float(qat), x), atol=0.1, rtol=0)


def _float(qat):
    """A float module with qat's weights (the reference for the fake-quant output)."""
    model = Attention()
    model.q.weight.data.copy_(qat.q.weight)
    model.q.bias.data.copy_(qat.q.bias)
    return model


def test_keyword_inputs_become_graph_inputs_in_signature_order():
    x, c = torch.randn(3, 4), torch.randn(3, 4)
    model = Attention().eval()
    qat = fq.prepare(model, (x,), kwargs={"context": c, "scale": 2.0, "is_causal": True})
    assert _placeholders(qat) == ["x", "context"]
    fq.calibrate(qat, [(x, c), {"context": c, "x": x}])
    with torch.no_grad():
        expected = model(x, is_causal=True, context=c, scale=2.0)
        assert (qat(x, c) - expected).abs().max() < 0.1 * expected.abs().max()
    report = fq.measure_error(qat, [{"x": x, "context": c}])
    assert {r.name for r in report.rows} == {"q", "k"}
    parity = fq.check_parity(qat, fq.lower(qat), [(x, c)])
    assert parity.ok and parity.coverage == 1.0, parity.table()


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((torch.randn(3, 4),), {"contxt": torch.randn(3, 4)}, r"no argument\(s\) \['contxt'\].*context"),
        ((torch.randn(3, 4),), {"x": torch.randn(3, 4)}, r"both positionally and as keywords"),
        ((torch.randn(3, 4),) * 4, {}, r"takes 3 positional argument\(s\)"),
    ],
)
def test_bad_example_inputs_are_trace_errors(args, kwargs, match):
    with pytest.raises(fq.TraceError, match=match):
        fq.prepare(Attention(), args, kwargs=kwargs)


def test_a_dict_batch_must_name_every_input():
    x = torch.randn(3, 4)
    qat = fq.prepare(Attention(), (x,), kwargs={"context": x})
    with pytest.raises(fq.InputError, match=r"without the model input\(s\) \['context'\]"):
        fq.calibrate(qat, [{"x": x}])
    assert fq.meta.graph_info(qat).stage == fq.meta.Stage.PREPARED
