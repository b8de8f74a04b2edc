"""fxptqat.capture: the annotation later steps rely on, and the torch.ao boundary."""

import ast
from pathlib import Path

import torch
import torch.nn as nn

import fxptqat as fq
from fxptqat import meta

ROOT = Path(__file__).resolve().parents[1]


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, groups=2)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, groups=8, bias=False)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = self.dw(x)
        return self.fc(x.mean((2, 3)))


def test_node_info_names_what_later_steps_use():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 9)
    qat = fq.prepare(_Net().eval(), (x,))
    infos = dict(meta.quantized_nodes(qat))
    assert len(infos) == 3
    nodes = {n.name: n for n in qat.graph.nodes}
    fan_in = {"conv": 2 * 9, "dw": 9, "fc": 8}
    for node, info in infos.items():
        module = qat.get_submodule(node.target)
        assert info.source == node.target
        assert qat.get_parameter(info.weight) is module.weight
        quantizer = qat.get_submodule(info.weight_quantizer)
        assert isinstance(quantizer, fq.FakeQuantize) and quantizer is module.weight_fake_quant
        assert set(info.parameters) == {f"{node.target}.{n}" for n, _ in module.named_parameters()}
        assert info.params == sum(qat.get_parameter(t).numel() for t in info.parameters)
        assert info.fan_in == fan_in[str(node.target).split(".")[0]]
        # a node name and a module target, each what it says
        out = nodes[info.output_quantizer]
        assert out.args[0] is node and out.target == info.output_quantizer_module
        assert isinstance(qat.get_submodule(info.output_quantizer_module), fq.FakeQuantize)
    assert any("bn.weight" in t for i in infos.values() for t in i.parameters)  # the fused BatchNorm's


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_steps_after_capture_never_import_torch_ao():
    # calibrate / measure / select / train / parity / persistence / distributed work on NodeInfo and
    # FakeQuantize methods only, so a second capture (torch.export + PT2E) can feed them
    after_capture = ["api.py", "calibration.py", "measure.py", "interpreter.py", "selection.py", "finetune.py", "parity.py", "graph_match.py",
                     "persistence.py", "distributed.py", "meta.py", "stats.py", "report.py", "inputs.py",
                     "stages.py", "config.py", "errors.py", "training.py", "planning/run.py",
                     "planning/schedule.py", "planning/law.py", "planning/fraction.py"]
    checked = 0
    for name in after_capture:
        path = ROOT / "fxptqat" / name
        if not path.exists():  # moved into a package: its new home is checked where it lands
            continue
        checked += 1
        bad = sorted(m for m in _imports(path) if m == "torch.ao" or m.startswith("torch.ao."))
        assert not bad, f"fxptqat/{name} imports {bad}"
    assert checked >= 18


class _PlainLinear(nn.Linear):
    """timm.layers.Linear's shape: a subclass whose forward is F.linear."""

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight, self.bias)


class _ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2.0 * torch.nn.functional.linear(x, self.weight, self.bias)


class _Heads(nn.Module):
    def __init__(self, head: type):
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.head = head(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def test_a_subclass_computing_its_base_is_quantized_as_a_module_and_the_user_model_kept():
    torch.manual_seed(0)
    batches = [(torch.randn(4, 6),) for _ in range(2)]
    model = _Heads(_PlainLinear).eval()
    qat = fq.prepare(model, batches[0])
    weighted = {n.name for n, _ in meta.quantized_nodes(qat)}
    assert weighted == {"body", "head"}  # measured, selectable and compared like any Linear
    assert type(model.head) is _PlainLinear  # only prepare's copy changed class
    fq.calibrate(qat, batches)
    parity = fq.check_parity(qat, fq.lower(qat), batches)
    assert parity.ok and parity.coverage == 1.0 and {r.name for r in parity.rows} == weighted, parity.table()


def test_a_subclass_computing_something_else_is_traced_into():
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    model = _Heads(_ScaledLinear).eval()
    qat = fq.prepare(model, (x,))
    assert {n.name for n, _ in meta.quantized_nodes(qat)} == {"body"}
    targets = [n.target for n in qat.graph.nodes if n.op == "call_function"]
    assert torch.nn.functional.linear in targets  # its forward, traced: the scale stays in the graph
    assert type(qat.get_submodule("body")).__name__ == "Linear"  # the QAT Linear of the plain layer


def test_captures_in_threads_give_the_graphs_of_captures_one_at_a_time():
    """torch.fx patches nn.Module.__call__ while tracing: unserialized, a second thread's trace failed
    with "module is not installed as a submodule" (and blamed the user's code)."""
    import concurrent.futures

    from helpers import make_small_net

    x = torch.randn(4, 1, 6, 6)
    config = fq.QuantConfig(weight_bits=8, act_bits=8)
    nets = [make_small_net(seed) for seed in range(4)]
    one_at_a_time = [fq.prepare(net, (x,), config=config).code for net in nets]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda net: fq.prepare(net, (x,), config=config).code, nets))
    assert together == one_at_a_time
