import torch
import torch.nn as nn
from hypothesis import event, given, settings

import fxptqat as fq
from fxptqat import meta
from fxptqat.passes.collapse_requantize import collapse_requantize
from fxptqat.passes.float_readers import float_readers
from fxptqat.testing import weight_bits

from helpers import MODELS, examples, fake_quant_calls, inserted, node_named


class CatOfResidual(nn.Module):
    """The lowering property's failing draw (seed 7): fc0's output feeds a cat (requantized onto the
    cat's grid) and, float, a residual add; fc1's fused-ReLU output feeds two cats."""

    def __init__(self) -> None:
        super().__init__()
        self.fc0, self.fc1, self.relu0 = nn.Linear(1, 2), nn.Linear(1, 1, bias=False), nn.ReLU()
        self.fc2, self.fc3 = nn.Linear(3, 1, bias=False), nn.Linear(2, 2)
        self.relu1, self.fc4 = nn.ReLU(), nn.Linear(2, 1, bias=False)

    def forward(self, x):
        v1, v3 = self.fc0(x), self.relu0(self.fc1(x))
        v5 = self.fc2(torch.cat([v1, v3], 1))
        v7 = self.fc3(torch.cat([v3, v5], 1))
        return self.fc4(self.relu1(v7 + v1))


WEIGHTED = fq.QuantConfig(weight_bits=3, quantized_ops="weighted")


def _quantizer_chains(gm):
    return [q for q in fake_quant_calls(gm) if len(q.users) == 1
            and next(iter(q.users)) in fake_quant_calls(gm) and next(iter(q.users)).target != q.target]


def test_fc0_is_rounded_once_on_the_cat_grid_and_onnxruntime_matches_fake_quant():
    torch.manual_seed(0)
    data = [(torch.randn(2, 1),), (torch.randn(5, 1),)]
    gm = inserted(CatOfResidual().eval(), data[0], WEIGHTED)
    float_readers(gm)
    chains = _quantizer_chains(gm)
    assert [q.args[0].name for q in chains] == ["fc0", "fc2"]  # each feeds a cat only (fc0 also a float add)
    result = collapse_requantize(gm)
    gm.graph.lint()
    assert result.modified is True and result.graph_module is gm and _quantizer_chains(gm) == []
    (requantize,) = [u for u in node_named(gm, "fc0").users if u in fake_quant_calls(gm)]
    assert meta.node_info(node_named(gm, "fc0")).output_quantizer == requantize.name
    assert meta.node_info(node_named(gm, "fc0")).output_quantizer_module == requantize.target
    code = gm.code
    assert collapse_requantize(gm).modified is False and gm.code == code
    # the failing draw's weights and batches: fake-quant rounded fc0 twice, onnxruntime once
    model = CatOfResidual().eval()
    weights = {"fc0.weight": [[0.7444047331809998], [1.3003987073898315]],
               "fc0.bias": [-0.3285778760910034, -0.19429552555084229], "fc1.weight": [[-0.6874892711639404]],
               "fc2.weight": [[0.1751573085784912, 0.5011570453643799, -0.09634435176849365]],
               "fc3.weight": [[-0.1529930979013443, 1.200459361076355], [0.680363655090332, -0.94633948802948]],
               "fc3.bias": [-0.3174578547477722, 0.17682766914367676],
               "fc4.weight": [[-0.19115659594535828, -1.182874321937561]]}
    model.load_state_dict({k: torch.tensor(v) for k, v in weights.items()})
    batches = [(torch.tensor([[-0.6624680161476135], [-0.4869411885738373]]),),
               (torch.tensor([[-0.46051493287086487], [-1.1705611944198608], [-1.978577733039856]]),)]
    qat = fq.prepare(model, batches[0], config=WEIGHTED)
    fq.calibrate(qat, batches)
    int8 = fq.lower(qat, runtime="onnxruntime", example_inputs=batches[0], threads=1)
    parity = fq.check_parity(qat, int8, batches)
    assert parity.ok and parity.coverage == 1.0, parity.table()
    with torch.no_grad():
        for batch in batches:  # was 0.0139 off on the second batch
            torch.testing.assert_close(int8(*batch), qat(*batch), rtol=0, atol=1e-6)


@settings(max_examples=examples(10), deadline=None)
@given(MODELS, weight_bits())
def test_property_no_value_is_rounded_only_to_be_rounded_again(pair, wb):
    """After float_readers, on the weighted recipe: honest ``modified``, no quantizer left whose only
    reader is another quantizer, each collapsed producer's NodeInfo names the requantize, every
    non-quantizer reads what it read before, outputs change only by the removed rounding (same
    shapes), idempotent."""
    model, inputs = pair
    gm = inserted(model, inputs, fq.QuantConfig(weight_bits=wb, quantized_ops="weighted"))
    float_readers(gm)
    chains = _quantizer_chains(gm)
    reads = {n.name: [a.name for a in n.all_input_nodes] for n in gm.graph.nodes
             if n not in fake_quant_calls(gm) and n.op != "output"}
    result = collapse_requantize(gm)
    gm.graph.lint()
    assert result.modified is bool(chains)
    assert _quantizer_chains(gm) == []
    assert {n.name: [a.name for a in n.all_input_nodes] for n in gm.graph.nodes
            if n not in fake_quant_calls(gm) and n.op != "output"} == reads
    names = {q.name for q in fake_quant_calls(gm)}
    for _, info in meta.quantized_nodes(gm):
        assert info.output_quantizer is None or info.output_quantizer in names
    with torch.no_grad():
        assert gm(*inputs).shape == model(*inputs).shape
    code = gm.code
    assert collapse_requantize(gm).modified is False and gm.code == code
    event(f"collapsed: {bool(chains)}")
