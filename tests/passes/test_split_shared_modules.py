import textwrap

import torch
import torch.nn as nn

from fxptqat.passes.split_shared_modules import split_shared_modules

from helpers import Twice

GOLDEN = """
def forward(self, x):
    l = self.l(x);  x = None
    relu = torch.relu(l);  l = None
    l_1 = self.l_call1(relu);  relu = None
    h = self.h(l_1);  l_1 = None
    return h
"""


def test_each_call_gets_a_tied_module():
    model = Twice().eval()
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(3, 4)
    result = split_shared_modules(gm)
    assert result.modified is True and result.graph_module is gm
    gm.graph.lint()
    assert textwrap.dedent(gm.code).strip() == GOLDEN.strip()
    assert gm.l_call1 is not gm.l
    assert gm.l_call1.weight is gm.l.weight and gm.l_call1.bias is gm.l.bias  # tied, not copied
    assert torch.equal(gm(x), model(x))


def test_second_run_and_single_calls_are_no_ops():
    gm = torch.fx.symbolic_trace(Twice())
    split_shared_modules(gm)
    code = gm.code
    assert split_shared_modules(gm).modified is False and gm.code == code
    single = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    assert split_shared_modules(single).modified is False
