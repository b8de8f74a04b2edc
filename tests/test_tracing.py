import pytest
import torch
import torch.nn as nn

import fxptqat as fq
from fxptqat.tracing import trace


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
