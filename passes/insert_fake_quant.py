"""Pass: insert observers and fake-quant nodes (torch.ao ``prepare_qat_fx`` underneath).

Runs in place on a float GraphModule: the prepared graph and its QAT submodules (conv-bn-relu
fused, weights wrapped by :class:`fxptqat.FakeQuantize`) replace the input's. Every weighted node
gets a :class:`fxptqat.meta.NodeInfo`; the graph gets a :class:`fxptqat.meta.GraphInfo` at stage
PREPARED. A graph that already carries fxptqat's GraphInfo is left alone (``modified=False``).
"""

from __future__ import annotations

import logging
import operator
import uuid
import warnings

import torch
import torch.fx as fx
from torch.ao.quantization import FakeQuantizeBase
from torch.ao.quantization.backend_config import ObservationType
from torch.ao.quantization.fake_quantize import FixedQParamsFakeQuantize
from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
from torch.ao.quantization.observer import FixedQParamsObserver
from torch.ao.quantization.qconfig_mapping import _FIXED_QPARAMS_OP_TO_OBSERVER
from torch.ao.quantization.quantize_fx import prepare_qat_fx
from torch.fx.passes.infra.pass_base import PassResult
from torch.fx.passes.shape_prop import ShapeProp

from fxptqat import meta
from fxptqat.capture.qconfig import activation_fake_quant, backend_config, qconfig_mapping
from fxptqat.config import QuantConfig
from fxptqat.errors import TraceError
from fxptqat.fake_quantize import FakeQuantize
from fxptqat.workarounds import release_device_cache

__all__ = ["insert_fake_quant"]
REQUIRES = "float"  # the graph it acts on (see passes/__init__.py)

log = logging.getLogger(__name__)
_FLOAT_WEIGHTED = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)


def insert_fake_quant(
    gm: fx.GraphModule, /, *, config: QuantConfig, example_inputs: tuple
) -> PassResult:
    if meta.graph_info(gm) is not None:
        return PassResult(gm, False)
    custom = PrepareCustomConfig()
    custom.set_non_traceable_module_classes([m for m in config.leaf_modules if isinstance(m, type)])
    custom.set_non_traceable_module_names([m for m in config.leaf_modules if isinstance(m, str)])
    non_float = _non_float_nodes(gm, example_inputs)
    was_training = gm.training
    gm.train()  # prepare_qat_fx insists on train mode
    try:
        prepared = prepare_qat_fx(
            gm,
            qconfig_mapping(config),
            example_inputs,
            prepare_custom_config=custom,
            backend_config=backend_config(config),
        )
    except Exception as e:
        raise TraceError(
            f"torch.ao prepare_qat_fx failed on the traced graph: {type(e).__name__}: {e}. "
            "If a submodule cannot be traced or quantized, list it in QuantConfig(leaf_modules=...)."
        ) from e
    finally:
        release_device_cache()  # else torch.ao's cache keeps every model ever prepared alive
    _transplant(prepared, into=gm)
    _round_onto_fixed_grid_first(gm)
    _own_fixed_qparams_quantizers(gm, config)
    _own_scalar_op_quantizers(gm, config)
    _fold_zero_gamma_exactly(gm)
    gm.train(was_training)
    _drop_non_float_quantizers(gm, non_float)
    _share_output_quantizers(gm, config)
    if not config.weighted_only:
        _read_quantized_inputs(gm)
    _requantize_cat_inputs(gm)
    _drop_unused_quantizer_names(gm)
    _annotate(gm, config)
    return PassResult(gm, True)


def _transplant(prepared: fx.GraphModule, *, into: fx.GraphModule) -> None:
    """Make ``into`` the prepared module: same children, attributes, graph and torch.ao meta."""
    for name in list(into._modules):
        if name not in prepared._modules:
            delattr(into, name)
    for name, child in prepared._modules.items():  # not named_children(): it hides shared modules
        setattr(into, name, child)
    for name, value in prepared.__dict__.items():
        # torch.ao stores a few plain attributes (e.g. quantized input/output indices) on the module
        if not name.startswith("_") and name not in into.__dict__ and name != "training":
            setattr(into, name, value)
    into.graph = prepared.graph
    into.meta.update(prepared.meta)
    into.recompile()


def _own_fixed_qparams_quantizers(gm: fx.GraphModule, config: QuantConfig) -> None:
    """torch.ao quantizes sigmoid, hardsigmoid, tanh and softmax outputs on fixed grids with its own
    ``FixedQParamsFakeQuantize``, whose ``forward`` Dynamo refuses to trace (torch.ao is on its skip
    list: one graph break per quantizer under ``torch.compile``, 9 in MobileNetV3-Small). Each is
    replaced by fxptqat's FakeQuantize holding the same grid in a ``FixedQParamsObserver``:
    the same values, and ``convert_fx`` still reads the fixed scale and zero point from it. A
    quantizer torch.ao shares under several names (``16 * sigmoid(x)``: the product's output) is
    one replacement under every name (``named_modules()`` lists a shared module once: the second
    name kept torch.ao's, and a graph break with it, in torchvision's Swin V2).

    torch.ao also puts the fixed grid on the *input* of such an op when nothing else quantized
    that input (a graph input, a float op's output): ``sigmoid(x)`` then computed
    ``sigmoid(clamp(x, 0, 1))``, in fake-quant and INT8 alike (torchvision's Swin V2: every
    relative position bias squeezed into [0.5, 0.73]). Such an input quantizer observes its value
    like any other activation quantizer.
    """
    modules = dict(gm.named_modules(remove_duplicate=False))
    fixed = lambda node: _on_fixed_grid(node, modules)  # noqa: E731
    on_its_grid: dict[fx.Node, bool] = {}
    for node in gm.graph.nodes:  # topological: a shared quantizer's source comes first
        if not fixed(node):
            continue
        value = node.args[0]
        if not isinstance(value, fx.Node):
            on_its_grid[node] = False
            continue
        source = next((a for a in value.all_input_nodes if fixed(a)), None)
        on_its_grid[node] = _fixed_grid_op(value, modules) is not None or (
            source is not None and on_its_grid.get(source, False)
            and modules[source.target] is modules[node.target])  # an op sharing the op's grid
    make = activation_fake_quant(config)
    for node, ok in on_its_grid.items():
        if not ok:
            name = _free_name(gm, f"{node.target}_observed")
            own = make()
            own.train(gm.training)
            gm.add_submodule(name, own)
            node.target = name
    replaced: dict[int, FakeQuantize] = {}
    for name, module in list(gm.named_modules(remove_duplicate=False)):
        if type(module) is not FixedQParamsFakeQuantize:
            continue
        if id(module) in replaced:
            gm.set_submodule(name, replaced[id(module)])
            continue
        own = FakeQuantize(
            observer=FixedQParamsObserver.with_args(
                scale=float(module.scale), zero_point=int(module.zero_point), dtype=module.dtype,
                quant_min=module.quant_min, quant_max=module.quant_max),
            quant_min=module.quant_min, quant_max=module.quant_max, dtype=module.dtype)
        own.scale.copy_(module.scale)
        own.zero_point.copy_(module.zero_point)
        own.enable_observer(bool(module.observer_enabled[0]))
        own.enable_fake_quant(bool(module.fake_quant_enabled[0]))
        own.train(module.training)
        gm.set_submodule(name, own)
        replaced[id(module)] = own
    gm.recompile()  # the names no node calls now go in _drop_unused_quantizer_names


def _on_fixed_grid(node, modules: dict) -> bool:
    """``node`` calls one of torch.ao's fixed-grid quantizers."""
    return isinstance(node, fx.Node) and node.op == "call_module" and type(
        modules.get(node.target)) is FixedQParamsFakeQuantize


def _fixed_grid_op(node: fx.Node, modules: dict):
    """The key of ``_FIXED_QPARAMS_OP_TO_OBSERVER`` that ``node`` computes (sigmoid, tanh...), else None."""
    if node.op not in ("call_module", "call_function", "call_method"):
        return None
    kind = type(modules.get(node.target)) if node.op == "call_module" else node.target
    return kind if kind in _FIXED_QPARAMS_OP_TO_OBSERVER else None


def _same_grid(quantizer, observer) -> bool:
    return (float(quantizer.scale) == float(observer.scale) and int(quantizer.zero_point) == int(observer.zero_point)
            and (quantizer.quant_min, quantizer.quant_max) == (observer.quant_min, observer.quant_max))


def _round_onto_fixed_grid_first(gm: fx.GraphModule) -> None:
    """A quantized sigmoid/tanh whose output torch.ao quantizes on another grid (a cat's shared one)
    rounds onto its fixed grid first, as its INT8 kernel does: ``torch.sigmoid`` of a quint8
    tensor always returns the [0, 1) grid, which the cat then requantizes; fake-quant rounded once
    onto the cat's grid (1.07 steps apart at the sigmoid, a property draw). The cat's grid may be
    another fixed one: ``cat([sigmoid(a), tanh(b)])`` shares the sigmoid's, and the tanh's [-1, 1)
    output was put on it unrounded and unrequantized (254 steps apart, another draw)."""
    qconfigs = getattr(gm.meta.get("_observed_graph_module_attrs"), "node_name_to_qconfig", None) or {}
    modules = dict(gm.named_modules(remove_duplicate=False))
    for node in list(gm.graph.nodes):
        kind = _fixed_grid_op(node, modules)
        if kind is None or qconfigs.get(node.name) is None:
            continue
        readers = [u for u in node.users if u.op == "call_module" and isinstance(modules.get(u.target), FakeQuantizeBase)
                   and u.args[0] is node]
        grid = _FIXED_QPARAMS_OP_TO_OBSERVER[kind]()
        if not readers or any(_on_fixed_grid(u, modules) and _same_grid(modules[u.target], grid) for u in readers):
            continue  # already on its own grid (a tanh read on a sigmoid's shared grid is not)
        name = _free_name(gm, f"{node.name}_fixed_grid")
        own = FixedQParamsFakeQuantize(observer=_FIXED_QPARAMS_OP_TO_OBSERVER[kind])  # made fxptqat's next
        own.train(gm.training)
        gm.add_submodule(name, own)
        with gm.graph.inserting_after(node):
            rounded = gm.graph.call_module(name, (node,))
        for reader in readers:
            reader.replace_input_with(node, rounded)


_SCALAR_OPS = (operator.add, operator.mul, torch.add, torch.mul, "add", "mul")


def _scalar_operand(node: fx.Node) -> fx.Node | None:
    """The tensor operand of ``x + c`` / ``c * x`` (``c`` a Python number), else None."""
    if node.op not in ("call_function", "call_method") or node.target not in _SCALAR_OPS or node.kwargs:
        return None
    if len(node.args) != 2:
        return None
    tensors = [a for a in node.args if isinstance(a, fx.Node)]
    numbers = [a for a in node.args if isinstance(a, (int, float)) and not isinstance(a, bool)]
    return tensors[0] if len(tensors) == 1 and len(numbers) == 1 else None


def _own_scalar_op_quantizers(gm: fx.GraphModule, config: QuantConfig) -> None:
    """``x * c`` and ``x + c`` (``c`` a number) quantize their output with a quantizer of their own.

    torch.ao's backend shares the input's quantizer with such an op's output: one observer sees
    both ranges, and on a fixed grid the output is clamped to the input's range (torchvision's
    Swin V2 computes ``16 * sigmoid(bias)``: fake-quant cut it to [0, 1) on sigmoid's grid, while
    convert_fx's ``quantized.mul`` rescales the grid and keeps [0, 16)). With a quantizer of its
    own the output is observed on its range; lowering computes the op in float onto that grid
    (``passes/float_scalar_ops.py``), exactly the simulated arithmetic.
    """
    if config.act_bits is None:
        return
    modules = dict(gm.named_modules(remove_duplicate=False))

    def quantizer(node):
        if isinstance(node, fx.Node) and node.op == "call_module" and isinstance(
                modules.get(node.target), FakeQuantizeBase):
            return node
        return None

    make = activation_fake_quant(config)
    # torch.ao's module of each quantizer node, before any is replaced (``0.5 + 2 * sigmoid(x)``:
    # the sum shares the product's, which shares the sigmoid's)
    shared_with = {n: modules[n.target] for n in gm.graph.nodes if quantizer(n) is not None}
    changed = False
    for node in list(gm.graph.nodes):
        source = quantizer(_scalar_operand(node))
        if source is None:
            continue
        for user in list(node.users):
            if quantizer(user) is not None and user.args[0] is node \
                    and shared_with[user] is shared_with[source]:  # one module, maybe two names
                name = _free_name(gm, f"{source.target}_scalar_{node.name}")
                own = make()
                own.train(gm.training)
                gm.add_submodule(name, own)
                modules[name] = own
                user.target = name
                changed = True
    if changed:
        gm.recompile()


def _drop_unused_quantizer_names(gm: fx.GraphModule) -> None:
    """Remove every quantizer name no node calls. ``delete_all_unused_submodules`` keeps a second
    name of a module that is used under its first (it walks ``named_modules()``, which lists a
    shared module once): a stale name then shows an observer that never saw a value."""
    used = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    for name, module in list(gm._modules.items()):  # named_children() lists a shared module once too
        if name not in used and isinstance(module, FakeQuantizeBase):
            delattr(gm, name)


def _free_name(gm: fx.GraphModule, base: str) -> str:
    base = base.replace(".", "_")
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def _fold_zero_gamma_exactly(gm: fx.GraphModule) -> None:
    """A fused conv-bn whose BatchNorm has a zero gamma (zero-init residual recipes, pruning) gets
    torch.ao's exact folding. Its default QAT forward divides the conv output by gamma / std
    (``_ConvBnNd._forward_approximate``): 0 / 0 = NaN in those channels, where the folded weight is
    exactly zero and the INT8 model computes the BatchNorm's bias. torch.ao's slower path
    (``_forward_slow``, switched on by a private flag in torch 2.13) folds without dividing."""
    for module in gm.modules():
        bn = getattr(module, "bn", None)
        if hasattr(module, "_enable_slow_path_for_better_numerical_stability") and bn is not None \
                and bn.weight is not None and bool((bn.weight == 0).any()):
            module._enable_slow_path_for_better_numerical_stability = True


def _non_float_nodes(gm: fx.GraphModule, example_inputs: tuple) -> set[str]:
    """Names of float-graph nodes whose value is a non-floating tensor (indices, masks)."""
    was_training = gm.training
    try:
        with torch.no_grad():
            ShapeProp(gm.eval()).propagate(*example_inputs)
    finally:
        gm.train(was_training)
    found = set()
    for node in gm.graph.nodes:
        tm = node.meta.pop("tensor_meta", None)
        if tm is not None and hasattr(tm, "dtype") and not tm.dtype.is_floating_point:
            found.add(node.name)
    return found


def _drop_non_float_quantizers(gm: fx.GraphModule, non_float: set[str]) -> None:
    """torch.ao observes every input of a quantizable op, integer and bool masks included; an
    INT8 kernel cannot take them, so such quantizers are removed (the op then runs in float)."""
    modules = dict(gm.named_modules(remove_duplicate=False))
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), FakeQuantizeBase):
            continue
        source = node.args[0]
        if isinstance(source, fx.Node) and source.name in non_float:
            node.replace_all_uses_with(source)
            gm.graph.erase_node(node)
            changed = True
    if changed:
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        gm.recompile()


def _share_output_quantizers(gm: fx.GraphModule, config: QuantConfig) -> None:
    """An op that torch.ao lowers on its input's grid (ReLU, pooling, reshape...: the backend's
    OUTPUT_SHARE_OBSERVER_WITH_INPUT ops) quantizes its output with its input's quantizer.

    prepare_qat_fx gives such an op its input's observer, except when that input also joins a
    cat's shared group: the op then keeps an observer of its own, which fake-quant applies but
    convert_fx drops (the INT8 op keeps its input's scale): a ReLU after a linear feeding a cat was
    lowered 70 steps away from fake-quant once fine-tuning moved values past the ReLU's own range.
    """
    modules = dict(gm.named_modules(remove_duplicate=False))
    shared = set()
    for pattern in backend_config(config).configs:
        if pattern.observation_type == ObservationType.OUTPUT_SHARE_OBSERVER_WITH_INPUT:
            shared.add(pattern.pattern)
    shared -= {torch.cat, torch.stack}  # several inputs: _requantize_cat_inputs puts them on one grid
    # Dropout gets an observer of its own at prepare, but convert_fx lowers it to the quantized
    # Dropout, an identity that keeps its input's grid: in eval it is an output-sharing op (timm's
    # MLP-Mixer / Swin heads read such a value: the head diverged 1.3 steps)
    shared |= {torch.nn.Dropout, torch.nn.functional.dropout}

    def is_quantizer(node) -> bool:
        return isinstance(node, fx.Node) and node.op == "call_module" and isinstance(
            modules.get(node.target), FakeQuantizeBase)

    changed = False
    for node in gm.graph.nodes:
        kind = type(modules.get(node.target)) if node.op == "call_module" else node.target
        if node.op not in ("call_module", "call_function", "call_method") or kind not in shared:
            continue
        source = node.args[0] if node.args else None
        if not is_quantizer(source):
            continue
        for user in node.users:
            if is_quantizer(user) and user.target != source.target:
                user.target = source.target
                changed = True
    if changed:
        gm.delete_all_unused_submodules()
        gm.recompile()


def _read_quantized_inputs(gm: fx.GraphModule) -> None:
    """A quantized op reads the quantized copy of a value that has one.

    prepare_qat_fx sometimes leaves an op reading the float value of an input it also quantizes
    for other readers: a LayerNorm directly after a LayerNorm (timm's Swin once its Identity
    placeholder leaves the graph: ``patch_embed.norm -> blocks.0.norm1``) got no input observer of
    its own while the first one's output was observed for the residual add. convert_fx then lowers
    the first to a quantized LayerNorm and hands its quint8 output to a float LayerNorm
    (``aten::native_batch_norm`` on QuantizedCPU). An op with a qconfig reading a value that has a
    quantizer now reads the quantizer, as torch.ao does everywhere else (convert_fx then gives it
    the INT8 value or dequantizes it, whichever the op takes).
    """
    qconfigs = getattr(gm.meta.get("_observed_graph_module_attrs"), "node_name_to_qconfig", None) or {}
    modules = dict(gm.named_modules(remove_duplicate=False))

    def is_quantizer(node) -> bool:
        return isinstance(node, fx.Node) and node.op == "call_module" and isinstance(
            modules.get(node.target), FakeQuantizeBase)

    order = {n: i for i, n in enumerate(gm.graph.nodes)}

    def quantizer_of(value, reader):
        """A quantizer of ``value`` itself that runs before ``reader``."""
        return next((u for u in value.users if is_quantizer(u) and u.args[0] is value
                     and order[u] < order[reader]), None)

    changed = False
    for node in list(gm.graph.nodes):
        if node.op not in ("call_module", "call_function", "call_method") or qconfigs.get(node.name) is None:
            continue
        if is_quantizer(node):
            continue
        arg = node.args[0] if node.args else None
        if not isinstance(arg, fx.Node) or arg.op == "get_attr" or is_quantizer(arg):
            continue  # a parameter, or already a quantized value
        q = quantizer_of(arg, node)
        if q is not None:
            node.replace_input_with(arg, q)
            changed = True
    if changed:
        gm.recompile()


def _requantize_cat_inputs(gm: fx.GraphModule) -> None:
    """Give every quantized ``torch.cat`` inputs on its own output grid.

    torch.ao lets a cat share one quantizer between its inputs and output, but a value feeding two
    cats can only join one group: the other cat then concatenates inputs on a different grid. Its
    INT8 kernel keeps the first input's qparams while fake-quant used the output's (seen off by
    100+ steps). Routing such an input through the cat's output quantizer (a requantize in INT8)
    makes fake-quant and INT8 compute the same thing.
    """
    modules = dict(gm.named_modules(remove_duplicate=False))

    def quantizer(node):
        if isinstance(node, fx.Node) and node.op == "call_module":
            module = modules.get(node.target)
            if isinstance(module, torch.ao.quantization.FakeQuantizeBase):
                return module
        return None

    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.cat or len(node.users) != 1:
            continue
        out_node = next(iter(node.users))
        out_q = quantizer(out_node)
        inputs = node.args[0]
        if out_q is None or not isinstance(inputs, (list, tuple)):
            continue
        fixed = []
        for arg in inputs:
            if quantizer(arg) is not None and quantizer(arg) is not out_q:
                with gm.graph.inserting_before(node):
                    arg = gm.graph.call_module(out_node.target, (arg,))
                changed = True
            fixed.append(arg)
        node.args = (type(inputs)(fixed), *node.args[1:])
    if changed:
        gm.recompile()


def _annotate(gm: fx.GraphModule, config: QuantConfig) -> None:
    modules = dict(gm.named_modules(remove_duplicate=False))
    left_float = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = modules[node.target]
        if hasattr(module, "weight_fake_quant"):
            users = list(node.users)
            out_q = None
            if len(users) == 1 and users[0].op == "call_module":
                if isinstance(modules[users[0].target], torch.ao.quantization.FakeQuantizeBase):
                    out_q = users[0]
            target = str(node.target)
            weight = module.weight
            meta.set_node_info(
                node,
                meta.NodeInfo(
                    source=target,
                    module_type=type(module).__name__,
                    output_quantizer=out_q.name if out_q is not None else None,
                    output_quantizer_module=str(out_q.target) if out_q is not None else None,
                    params=sum(p.numel() for p in module.parameters()),
                    weight=f"{target}.weight",
                    weight_quantizer=f"{target}.weight_fake_quant",
                    parameters=tuple(f"{target}.{name}" for name, _ in module.named_parameters()),
                    fan_in=weight[0].numel() if weight.dim() > 1 else 1,
                ),
            )
        elif type(module) in _FLOAT_WEIGHTED:
            left_float.append(node.name)
    if left_float:
        warnings.warn(
            f"fxptqat: {len(left_float)} conv/linear node(s) stay in float because the {config.engine!r} "
            f"backend does not quantize them in this position: {', '.join(left_float[:8])}.",
            stacklevel=3,
        )
    meta.set_graph_info(
        gm, meta.GraphInfo(stage=meta.Stage.PREPARED, config=config, graph_id=uuid.uuid4().hex)
    )
