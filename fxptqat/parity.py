"""Parity between the fake-quant graph and its INT8 lowering, node by node.

For every weighted node N two differences are measured at N's output (after its output
quantizer), in units of that quantizer's step (LSB):

* isolated: the INT8 module of N run on the fake-quant graph's own input of N (quantized onto
  the INT8 input grid, which holds it exactly) vs the fake-quant output. The float accumulation
  of fake-quant and the integer accumulation + requantization of INT8 may round a value that
  sits on a rounding boundary differently, i.e. by one step; nothing correct moves it further.
  So N *diverges* when its isolated difference exceeds ``tolerance_lsb`` (default 1) steps.
* propagated: the INT8 network vs the fake-quant network at N; one-step ties upstream add up,
  so this is reported, not judged.

A float output (weight-only graphs; conv/linear outputs that ``quantized_ops="weighted"`` keeps
float) has no step: fake-quant and INT8 then differ by float32 rounding in a dot product of
``fan_in`` terms, bounded as ``fan_in * eps`` of the output's magnitude (Higham's gamma_n with the
magnitude standing for the sum of the terms), and never less than 1e-4 of it.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.node import map_arg

from . import meta
from .capture import bn_shift
from .errors import LoweringError
from .fake_quantize import is_quantizer
from .graph_match import match_nodes, output_quantizer
from .inputs import iter_batches
from .interpreter import CheckedInterpreter
from .parity_report import ParityReport, ParityRow

__all__ = ["ParityRow", "ParityReport", "compare"]


class _Capture(CheckedInterpreter):
    """Runs the fake-quant graph and keeps the values of the named nodes.

    Values are cloned: an in-place op later in the graph (torchvision's ``Hardswish(inplace=True)``
    after a conv's output quantizer) would otherwise rewrite the kept value, and the comparison
    would hold the INT8 conv against the activation's output.
    """

    def __init__(self, gm: fx.GraphModule, names: set[str]):
        super().__init__(gm, check_finite=False, what="check_parity (fake-quant)")
        self.names = names
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node):
        value = super().run_node(n)
        if n.name in self.names:
            self.values[n.name] = value.clone()
        return value


class _Int8Run(CheckedInterpreter):
    """Runs the INT8 graph; at each weighted node also runs it on the fake-quant input, and at every
    other op with a fake-quant counterpart runs the fake-quant op on the INT8 graph's own inputs."""

    def __init__(self, gm: fx.GraphModule, inputs: dict[str, torch.Tensor], qat: fx.GraphModule, ops: dict):
        super().__init__(
            gm, check_finite=False, what="check_parity (lowered model)", error=LoweringError,
            hint="The fake-quant graph ran these inputs, so the lowered model cannot: a kernel or lowering "
                 "failure (see the error), not a problem with the inputs.")
        self.inputs = inputs
        self.qat, self.ops = qat, ops
        self.lowered_name = {node.name: name for name, node in ops.items()}  # fake-quant -> lowered
        self.by_name: dict[str, torch.Tensor] = {}
        self.propagated: dict[str, torch.Tensor] = {}
        self.isolated: dict[str, torch.Tensor] = {}
        self.local: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # op -> (fake-quant, lowered)

    def run_node(self, n: fx.Node):
        # the fake-quant op runs first: an in-place lowered op (Hardswish(inplace=True)) would
        # otherwise hand it its own output as input
        local = self._fake_quant_op(self.ops[n.name], n) if n.name in self.ops else None
        value = super().run_node(n)
        self.by_name[n.name] = value
        if n.name in self.inputs and n.op == "call_module":
            live = self.env[n.args[0]]
            x = self.inputs[n.name]
            if live.is_quantized:
                x = torch.quantize_per_tensor(x, live.q_scale(), live.q_zero_point(), live.dtype)
            alone = self.fetch_attr(n.target)(x, *[self.env[a] for a in n.args[1:]])
            self.isolated[n.name] = alone.dequantize() if alone.is_quantized else alone
            self.propagated[n.name] = value.dequantize() if value.is_quantized else value.clone()
        elif local is not None and isinstance(value, torch.Tensor):
            node = self.ops[n.name]
            lowered = value.dequantize() if value.is_quantized else value.clone()
            grid = self._output_quantizer(node)
            if grid is not None and not value.is_quantized:
                lowered = grid(lowered)  # a float op whose next Q/DQ pair holds this grid
            self.local[node.name] = (local, lowered)
        return value

    def _output_quantizer(self, node: fx.Node):
        quantizer = output_quantizer(self.qat, node)
        return None if quantizer is None else self.qat.get_submodule(quantizer.target)

    @staticmethod
    def _dequantized(value):
        if isinstance(value, torch.Tensor):
            return value.dequantize() if value.is_quantized else value.clone()  # in-place ops
        return value

    def _value(self, node: fx.Node):
        """The lowered graph's value of fake-quant node ``node`` as fake-quant would see it."""
        if _is_quantizer_node(self.qat, node):
            source = self._value(node.args[0]) if isinstance(node.args[0], fx.Node) else None
            return None if source is None else self.qat.get_submodule(node.target)(source)
        name = self.lowered_name.get(node.name, node.name)
        if name not in self.by_name:
            raise KeyError(node.name)
        value = self.by_name[name]
        if isinstance(value, torch.Tensor):
            return value.dequantize() if value.is_quantized else value.clone()  # in-place ops
        return value

    def _fake_quant_op(self, node: fx.Node, lowered: fx.Node):
        """The fake-quant op on the lowered op's own inputs: where both take the same number of
        tensor inputs they pair up in order (the lowered input already on its INT8 grid, so a
        rounding tie of the quantizer in front is not charged to this op); else each input is
        the lowered value of the fake-quant input node, through its quantizer."""
        fake_in = [a for a in node.all_input_nodes if a.op != "get_attr"]
        low_in = [a for a in lowered.all_input_nodes if a.op != "get_attr"]
        if len(fake_in) == len(low_in) and all(a in self.env for a in low_in):
            given = {a: self._dequantized(self.env[b]) for a, b in zip(fake_in, low_in, strict=True)}
            value = lambda a: given[a] if a in given else self._value(a)  # noqa: E731
        else:
            value = self._value
        try:
            args, kwargs = map_arg((node.args, node.kwargs), value)
        except KeyError:
            return None  # an input the lowering removed or renamed
        try:
            if node.op == "call_module":
                out = self.qat.get_submodule(node.target)(*args, **kwargs)
            elif node.op == "call_function":
                out = node.target(*args, **kwargs)
            else:
                out = getattr(args[0], node.target)(*args[1:], **kwargs)
        except Exception:  # noqa: BLE001 - the lowered inputs do not fit this op: not compared
            return None
        grid = self._output_quantizer(node)
        if grid is not None:
            out = grid(out)
        return out if isinstance(out, torch.Tensor) and out.is_floating_point() else None


class _Nudged(fx.Interpreter):
    """The reference graph with every value it quantizes scaled by ``1 + 2**-20`` (a few float32
    rounding errors): how far float-level differences of another runtime's kernels can move the
    output through rounding ties, on this network and these inputs."""

    _QUANTIZE = ("quantize_per_tensor", "quantize_per_channel")

    def call_function(self, target, args, kwargs):
        name = getattr(target, "__name__", str(target))
        if name.startswith(self._QUANTIZE) and args and isinstance(args[0], torch.Tensor) \
                and args[0].is_floating_point():
            args = (args[0] * (1 + 2**-20), *args[1:])
        return super().call_function(target, args, kwargs)


def _is_quantizer_node(gm: fx.GraphModule, node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_module" and is_quantizer(gm.get_submodule(node.target))


def _step(qat: fx.GraphModule, node) -> float | None:
    """The per-tensor step of the quantizer ``node`` calls, if it is one."""
    if not isinstance(node, fx.Node) or node.op != "call_module":
        return None
    scale = getattr(qat.get_submodule(node.target), "scale", None)
    return float(scale) if isinstance(scale, torch.Tensor) and scale.numel() == 1 and getattr(
        qat.get_submodule(node.target), "frozen", False) else None


def _float_leaves(value) -> list[torch.Tensor]:
    """The floating-point tensors of a network output (a tensor, or a tuple/list/dict of them)."""
    leaves = torch.utils._pytree.tree_leaves(value)
    leaves = [t.dequantize() if t.is_quantized else t for t in leaves if isinstance(t, torch.Tensor)]
    return [t for t in leaves if t.is_floating_point()]


def _float_output_step(qat: fx.GraphModule, made, depth: int = 8) -> float:
    """For a float output: the float image of one-step ties upstream. At a weighted node N whose
    input is quantized, one step at each of N's inputs with independent signs, pushed through N's
    weights (``step_in * max_row ||W||_2``, the root-sum-square); through the float ops after the
    last layers (pooling, flatten, cat, add, activations) the bounds of their inputs add up; 0 where
    no quantized input is found. (It was every input one step in the worst direction, ``||W||_1``:
    30x looser on a 1024-input classifier, loose enough to pass inductor's GoogLeNet whose int8 max
    pools had lost ``ceil_mode``, top-1 agreement 0/8; see passes/explicit_ceil_pooling.py.)"""
    if not isinstance(made, fx.Node) or made.op in ("placeholder", "get_attr") or depth == 0:
        return 0.0
    info = meta.node_info(made)
    if info is not None:
        step_in = _step(qat, made.args[0]) if made.args and isinstance(made.args[0], fx.Node) else None
        if step_in is None:
            return 0.0
        weight = qat.get_submodule(info.weight_quantizer)(qat.get_parameter(info.weight).detach())
        return step_in * float(weight.reshape(weight.shape[0], -1).norm(dim=1).max())
    return sum(_float_output_step(qat, n, depth - 1) for n in made.all_input_nodes)


def compare(qat: fx.GraphModule, int8: fx.GraphModule, batches, *, tolerance_lsb: float, run=None) -> ParityReport:
    """``run``: the lowered model whose network output is compared, when ``int8`` is only its graph:
    a reference graph, whose modules return float values that its next Q/DQ pair (the same scale
    and zero point as the fake-quant output quantizer) puts on the grid; that pair is applied here."""
    int8_nodes = {n.name: n for n in int8.graph.nodes}
    points = {}  # weighted node -> (its input node, node compared, output step)
    targets = {n.name: n.target for n in qat.graph.nodes if n.op == "call_module"}
    fan_in = {}  # weighted node -> products summed per output element
    shift = {}  # weighted node -> BatchNorm shift its QAT form computes and removes (capture.bn_shift)
    not_compared = []
    for node, info in meta.quantized_nodes(qat):
        lowered = int8_nodes.get(node.name)
        if lowered is None or lowered.op != "call_module":
            not_compared.append((node.name, "the lowered graph has no module call of this name (fused or renamed)"))
            continue
        if not isinstance(node.args[0], fx.Node):
            not_compared.append((node.name, "its input is not a graph value"))
            continue
        fan_in[node.name] = max(1, info.fan_in)
        shift[node.name] = bn_shift(qat.get_submodule(node.target))
        out_q = next((u for u in node.users if u.name == info.output_quantizer), None)
        points[node.name] = (node.args[0].name, info.output_quantizer or node.name, _step(qat, out_q))
    ops = {name: n for name, n in match_nodes(qat, int8).items()  # lowered name -> fake-quant op
           if n.name not in points and meta.node_info(n) is None}
    acc = {name: [0.0, 0.0, 0, 0, 0.0] for name in points}  # iso, prop, off, count, magnitude
    op_acc: dict[str, list[float]] = {}  # op -> [local max |diff|, magnitude]
    out_max, out_sum, ref_sum, noise_sum, out_count, agree, samples = 0.0, 0.0, 0.0, 0.0, 0, 0, 0
    for args in iter_batches(batches, qat, what="check_parity()"):
        cap = _Capture(qat, {p for v in points.values() for p in v[:2]})
        q_out = cap.run(*args)
        runner = _Int8Run(int8, {name: cap.values[inp] for name, (inp, _, _) in points.items()}, qat, ops)
        graph_out = i_out = runner.run(*args)
        nudged = graph_out
        if run is not None:
            i_out = run(*args)
            nudged = _Nudged(int8).run(*args)
        for name, (fake, lowered) in runner.local.items():
            a = op_acc.setdefault(name, [0.0, 0.0])
            a[0] = max(a[0], float((fake - lowered).abs().max()) if fake.shape == lowered.shape else float("inf"))
            a[1] = max(a[1], float(fake.abs().max()))
        for name, (_, point, scale) in points.items():
            ref = cap.values[point]
            isolated, propagated = runner.isolated[name], runner.propagated[name]
            if run is not None and point != name:
                grid = qat.get_submodule(targets[point])  # a node may call a shared module
                isolated, propagated = grid(isolated), grid(propagated)
            a = acc[name]
            a[0] = max(a[0], float((isolated - ref).abs().max()))
            diff = (propagated - ref).abs()
            a[1] = max(a[1], float(diff.max()))
            a[2] += int((diff > (scale or 0.0) * 1.001).sum()) if scale else 0
            a[3] += diff.numel()
            a[4] = max(a[4], float(ref.abs().max()))
        outputs = zip(*map(_float_leaves, (q_out, i_out, graph_out, nudged)), strict=False)
        for fake, lowered, graph, moved in outputs:
            noise_sum += float((moved - graph).abs().double().sum())
            diff = (fake - lowered).abs()
            out_max = max(out_max, float(diff.max()))
            out_sum += float(diff.double().sum())
            ref_sum += float((fake - graph).abs().double().sum())
            out_count += diff.numel()
            if fake.dim() == 2:
                agree += int((fake.argmax(1) == lowered.argmax(1)).sum())
                samples += fake.shape[0]
    rows = []
    for name, (_, _, scale) in points.items():
        iso, prop, off, count, magnitude = acc[name]
        if count == 0:
            not_compared.append((name, "no batch was given"))
            continue
        relative = max(1e-4, fan_in[name] * torch.finfo(torch.float32).eps)
        tol = tolerance_lsb * scale * (1 + 1e-3) if scale else relative * (magnitude + shift[name]) + 1e-6
        rows.append(ParityRow(name, scale, tol, iso, prop, off / max(count, 1)))
    op_rows = []
    fake_ops = {n.name: n for n in ops.values()}
    for name, (local, magnitude) in op_acc.items():
        step = _step(qat, output_quantizer(qat, fake_ops[name]))
        tol = tolerance_lsb * step * (1 + 1e-3) if step else 1e-5 * magnitude + 1e-6  # float ops: same math
        op_rows.append(ParityRow(name, step, tol, local, 0.0, 0.0))
    order = {n.name: i for i, n in enumerate(qat.graph.nodes)}
    (output,) = [n for n in qat.graph.nodes if n.op == "output"]
    outputs = []  # (quantizer or value node, the node that makes it) per graph output
    map_arg(output.args[0], outputs.append)
    made = []
    for node in outputs:
        producer = node
        while _is_quantizer_node(qat, producer):
            producer = producer.args[0]
        if producer.op != "placeholder" and producer.name not in made:
            made.append(producer.name)
    steps = [_step(qat, node) if _step(qat, node) is not None else _float_output_step(qat, node) for node in outputs]
    out_scale = _step(qat, outputs[0]) if len(outputs) == 1 else None
    out_tol = None
    compared = {r.name for r in rows} | {r.name for r in op_rows}
    if run is None and out_count and not set(made) <= compared:
        # an op making the output was renamed by the lowering: judge the output end to end
        out_tol = tolerance_lsb * max(steps) + 1e-6
    if run is not None and out_count:
        # an executor of the same graph with its own float kernels is held to one output step (for
        # a float output: one input step of the layer that makes it) beyond twice the distance the
        # reference graph moves when every value it quantizes moves by float rounding (_Nudged):
        # the ties the network amplifies, measured, not assumed
        out_tol = tolerance_lsb * max(steps) + 2 * (ref_sum + noise_sum) / out_count + 1e-6
    return ParityReport(
        tuple(rows), out_max, agree / samples if samples else None, samples,
        not_compared=tuple(sorted(not_compared, key=lambda r: order[r[0]])),
        ops=tuple(sorted(op_rows, key=lambda r: order[r.name])),
        output_nodes=tuple(n for n in made if n in compared or out_count),
        output_mean_abs=out_sum / out_count if out_count else None, output_tolerance=out_tol, output_scale=out_scale,
    )
