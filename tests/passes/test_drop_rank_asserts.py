import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from hypothesis import event, given, settings
from hypothesis import strategies as st

import fxptqat as fq
from fxptqat.passes.drop_rank_asserts import drop_rank_asserts

from helpers import MODELS, examples


class Checked(nn.Module):
    """timm's BatchNormAct2d style: ``_assert(x.ndim == 4, f"... {x.ndim}D ...")`` on a conv output,
    plus checks that are not about the rank (left alone)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.conv2 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        torch._assert(y.ndim == 4, f"expected 4D input (got {y.ndim}D input)")
        torch._assert(y.dim() < 5, "rank")
        torch._assert(y.shape[1] == 4, "channels")  # a size, not a rank: kept
        return self.conv2(self.bn(y))


def _asserts(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch._assert]


def test_rank_asserts_and_their_reads_leave_the_graph():
    model = Checked().eval()
    gm = fx.symbolic_trace(model)
    assert len(_asserts(gm)) == 3
    result = drop_rank_asserts(gm)
    gm.graph.lint()
    assert result.modified is True and result.graph_module is gm
    (kept,) = _asserts(gm)
    assert kept.args[1] == "channels"
    assert not any(n.op == "call_function" and n.target is getattr and n.args[1] == "ndim" for n in gm.graph.nodes)
    assert [u.name for u in next(n for n in gm.graph.nodes if n.name == "conv").users] == ["getattr_3", "bn"]  # y.shape (the size check), the BN
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    code = gm.code
    assert drop_rank_asserts(gm).modified is False and gm.code == code


def test_prepare_fuses_across_the_assert_and_refuses_batches_of_another_rank():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 5)

    class OnlyRank(Checked):
        def forward(self, x):
            y = self.conv(x)
            torch._assert(y.ndim == 4, f"expected 4D input (got {y.ndim}D input)")
            return self.conv2(self.bn(y))

    qat = fq.prepare(OnlyRank().eval(), (x,))
    assert type(qat.get_submodule("conv")).__name__ == "ConvBn2d"
    assert _asserts(qat) == []
    with pytest.raises(fq.InputError, match="3 dimension.*captured with 4"):
        fq.calibrate(qat, [(x,), (x[0],)])


@settings(max_examples=examples(25), deadline=None)
@given(MODELS, st.data())
def test_property_rank_asserts_anywhere_leave_and_nothing_else_changes(pair, data):
    """Rank asserts (``v.ndim == r``, ``v.dim() >= 1``) inserted on any drawn set of values, plus one
    that is not about the rank: exactly the rank asserts and their reads leave, outputs are
    unchanged bit for bit, a second run is a no-op; without rank asserts ``modified`` is False."""
    model, inputs = pair
    gm = fx.symbolic_trace(model)
    with torch.no_grad():
        shapes = {}

        class Record(fx.Interpreter):
            def run_node(self, n):
                out = super().run_node(n)
                if isinstance(out, torch.Tensor):
                    shapes[n.name] = out.dim()
                return out

        Record(gm).run(*inputs)
    n_nodes = len(gm.graph.nodes)
    assert drop_rank_asserts(gm).modified is False
    values = [n for n in gm.graph.nodes if n.name in shapes]
    chosen = data.draw(st.lists(st.sampled_from(values), unique=True, max_size=4), label="checked")
    for i, node in enumerate(chosen):
        with gm.graph.inserting_after(node):
            rank = (gm.graph.call_method("dim", (node,)) if i % 2 else
                    gm.graph.call_function(getattr, (node, "ndim")))
        with gm.graph.inserting_after(rank):
            cond = gm.graph.call_function(operator.ge, (rank, 1)) if i % 2 else \
                gm.graph.call_function(operator.eq, (rank, shapes[node.name]))
        with gm.graph.inserting_after(cond):
            gm.graph.call_function(torch._assert, (cond, f"check {i}"))
    with gm.graph.inserting_before(next(n for n in gm.graph.nodes if n.op != "placeholder")):
        other = gm.graph.call_function(torch._assert, (True, "not a rank"))
    gm.recompile()
    gm.graph.lint()
    with torch.no_grad():
        expected = model(*inputs)
        result = drop_rank_asserts(gm)
        gm.graph.lint()
        assert result.modified is bool(chosen)
        assert _asserts(gm) == [other] and len(gm.graph.nodes) == n_nodes + 1
        torch.testing.assert_close(gm(*inputs), expected, rtol=0, atol=0)
    code = gm.code
    assert drop_rank_asserts(gm).modified is False and gm.code == code
    event(f"rank asserts: {len(chosen)}")
