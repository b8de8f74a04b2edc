"""``torch.compile(model, backend="fxptqat")``: fake-quant that inductor fuses, for QAT and for inference.

Registered through the ``torch_dynamo_backends`` entry point (pyproject.toml), so the name works in
a fresh process without ``import fxptqat``; nothing registers it again at import (torch refuses a
name registered twice).

Dynamo hands a backend the graph of the model's forward with ``fxptqat.FakeQuantize`` inlined: each
quantizer is a ``torch.fake_quantize_per_{tensor,channel}_affine`` call. Inductor keeps that op as
an opaque kernel (a fallback to ATen, outside every fused loop, with a mask tensor saved for the
backward; pytorch/pytorch#119141), so a QAT step pays a full read and write of every activation
and weight per quantizer, forward and backward. This backend rewrites each call into the same
arithmetic written as element-wise torch ops -- ``round(x * (1/scale)) + zero_point``, the clamp,
the dequantize -- inside an ``autograd.Function`` whose backward is the straight-through estimator
of those ops (the gradient passes where the rounded value is inside ``[quant_min, quant_max]``,
zero elsewhere; scale and zero point get none, they are buffers), then compiles with inductor
(AOTAutograd for training): the quantizers become part of the neighbouring generated loops. The
mask the backward saves is a float tensor, not a ``bool`` one (see :func:`_grid`), and a call that
re-quantizes values already on its grid (torch.ao's shared quantizer after a reshape or transpose)
is removed first (:func:`drop_repeated_fake_quant`).

Options (``torch.compile(..., backend="fxptqat", options={...})``):

``fuse_fake_quant`` (default True): the rewrite above; False compiles the graph unchanged (what
    ``backend="inductor"`` does), for comparison.
``save_fake_quant`` (default "auto"): which fused quantizers AOTAutograd's partitioner must keep
    for the backward instead of recomputing them there (see :func:`rewrite_fake_quant`): "auto" the
    quantizers of softmax outputs (and the softmax), True every one (more memory), False none (the
    partitioner's own choice).
``int8`` (default "auto"): under ``torch.no_grad()`` (inference), lower every fake-quant call to
    the ``quantized_decomposed`` quantize/dequantize pair and compile with inductor's weight
    freezing, so that ``dequantize -> conv/linear`` runs on oneDNN's integer kernels -- the path of
    ``lower(runtime="inductor")``; the eval-mode BatchNorm of torch.ao's ConvBn modules is folded
    into the conv's bias first (:func:`fold_batch_norm`), as torch.ao's convert does. "auto" does so when the graph is an inference graph, False
    never, True refuses a graph that is not one.
``drop_frozen_guards`` (default True): on the INT8 path under ``torch.no_grad()``, remove Dynamo's
    tensor guards (shape, stride, dtype, device) on the parameters and buffers the INT8 graph froze
    into constants (see below); False keeps them.
``dict_tag_guards`` (default True): on the INT8 path, Dynamo builds the frame's guards with its
    recursive dict tags (see below); False: guards checked one by one, as for any other frame.
``inductor``: a dict of ``torch._inductor.config`` options passed on.

A graph without a fake-quant call compiles with inductor unchanged; the reason is logged.

Per-call cost outside the compiled code (inference): before every call Dynamo checks the guards it
installed while tracing, and a QAT module has many -- each quantizer's flags, its scale and zero
point, and every parameter and buffer (a shape/stride check plus five ``hasattr`` checks each),
because Dynamo passes them to the compiled graph as inputs. MobileNetV3-Small at W4A8: 4,481 guards
per call against 1,821 for ``lower(runtime="inductor")``, whose reference graph Dynamo traces with
its weights frozen into constants; 0.52 ms against 0.18 ms per check, which made a 17 ms INT8 call
4.8% slower than ``lower()``'s (one thread, 200 interleaved calls). The INT8 path freezes those
tensors itself (their values are compiled in, as ``lower()`` does), so their tensor guards protect
nothing the compiled code reads. What does change them -- training through the same compiled model
between two evaluations, ``load_state_dict``, an observer -- writes in place and bumps their version
counters, which each call compares (one sum, ~30 us for MobileNetV3's 514 tensors): on a change the
graph is compiled again from the same FX graph with the current values (``int8_refrozen`` counter,
logged), never run with stale constants. A tensor replaced by a new object (``module.weight =
nn.Parameter(...)``, ``load_state_dict(assign=True)``) has a fresh counter, and Dynamo passes the graph
only its remaining inputs, so each call also checks that every module dict still holds the frozen
object (resolved from Dynamo's sources when compiling): a replacement of the same shape and dtype is
compiled in the same way, one of another shape raises ``LoweringError`` (call
``torch._dynamo.reset()``). That check costs 21-27 us alone for MobileNetV3-Small's 514 tensors, and
measured 2.0% and 3.3% of its INT8 call in two runs (batch 32, 64 px, 2 threads, 300 interleaved calls
with and without it, ``/tmp`` script of session 19): it touches every owning dict while cold. With ``drop_frozen_guards`` (the default) the backend removes those
tensors' guards from the guard set Dynamo builds once it returns (``TracingContext``'s guard
checkpoint), only when compiling under ``torch.no_grad()`` (grad mode stays guarded, so a call with
gradients recompiles to the training path). The rest -- each module's type, ``training`` flag, hook
dicts, each quantizer's switches -- is still thousands of checks; with ``dict_tag_guards`` (the
default) Dynamo builds them with ``use_recursive_dict_tags_for_guards``, which skips a module's
subtree while no dict in it changed (setting a quantizer's switch, or ``train()``, changes one: still
a recompile). That setting is read when Dynamo builds the guards, after the backend returns, so the
backend turns it on for the frame being compiled and puts it back in Dynamo's compile-end callback
(which runs after the guards are built, also on failure). Measured on an AMD EPYC (2 threads, 300
interleaved calls, ``/tmp`` script of session 18, MobileNetV3-Small W4A8 at batch 32, 64 px):
INT8 call / ``lower()``'s 1.131x with every guard, 1.061x without the frozen tensors' (514), 0.948x
with both options (the default). (Dynamo ignores a hook registered after compiling,
``skip_nnmodule_hook_guards``, with or without these options.)

Training steps are long enough that the guards do not show (SmallViT: no difference).
"""

from __future__ import annotations

import logging
import operator
import threading
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy

from .errors import ConfigError, LoweringError

__all__ = ["backend", "fake_quantize", "rewrite_fake_quant", "drop_repeated_fake_quant", "FAKE_QUANT_OPS"]

log = logging.getLogger(__name__)

FAKE_QUANT_OPS = {
    torch.fake_quantize_per_tensor_affine: "tensor",
    torch.fake_quantize_per_channel_affine: "channel",
    torch.ops.aten.fake_quantize_per_tensor_affine.default: "tensor",
    torch.ops.aten.fake_quantize_per_tensor_affine.tensor_qparams: "tensor",
    torch.ops.aten.fake_quantize_per_channel_affine.default: "channel",
}
_OPTIONS = {"fuse_fake_quant", "save_fake_quant", "int8", "drop_frozen_guards", "dict_tag_guards", "inductor"}
# ops whose backward reads their output, and whose output the partitioner would rather recompute
# (exp and the reductions' results) than save when a quantizer is its only forward consumer
_OUTPUT_READING_FUNCTIONS = frozenset({torch.softmax, torch.nn.functional.softmax, torch.log_softmax,
                                       torch.nn.functional.log_softmax})
_OUTPUT_READING_METHODS = frozenset({"softmax", "log_softmax"})


def _broadcast(t: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None:
        return t.reshape(())
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


def _grid(x, scale, zero_point, quant_min, quant_max, axis):
    """The fake-quantized ``x`` and the straight-through mask (1 where the rounded value is inside
    ``[quant_min, quant_max]``, else 0; 0 for NaN) as a tensor of ``x``'s dtype.

    The mask is float arithmetic, not a comparison: ``rounded - clamped`` is 0 inside and at least
    1 outside (both are whole numbers), and ``fmin`` maps NaN to 1. A boolean mask is what the
    backward needs to save, and AOTAutograd's partitioner saves the smallest tensor it can, but
    inductor's CPU code stores and loads ``bool`` buffers through a slow path: measured on AVX2
    (torch 2.13, 200,704 elements, 2 threads), ``x > 0`` compiled takes 2.1 ms against 0.13 ms for
    the same comparison written to a float tensor. With a boolean mask the SmallViT QAT step
    spent more time writing masks than fake-quantizing."""
    scale = _broadcast(scale, x, axis).to(x.dtype)
    zero_point = _broadcast(zero_point, x, axis).to(x.dtype)
    rounded = torch.round(x * (1.0 / scale)) + zero_point
    clamped = rounded.clamp(quant_min, quant_max)
    inside = 1.0 - torch.fmin((rounded - clamped).abs(), torch.ones((), dtype=x.dtype, device=x.device))
    return (clamped - zero_point) * scale, inside


class _FakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, quant_min, quant_max, axis):
        out, inside = _grid(x, scale, zero_point, quant_min, quant_max, axis)
        ctx.save_for_backward(inside)
        return out

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None, None


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int, quant_max: int,
                  axis: int | None = None) -> torch.Tensor:
    """``torch.fake_quantize_per_{tensor,channel}_affine`` as element-wise ops (``axis`` None: per
    tensor), with the same straight-through gradient for ``x`` and none for ``scale``/``zero_point``."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _FakeQuantize.apply(x, scale, zero_point, quant_min, quant_max, axis)
    return _grid(x, scale, zero_point, quant_min, quant_max, axis)[0]


def _fake_quant_args(node: fx.Node) -> tuple[Any, ...]:
    """``(x, scale, zero_point, quant_min, quant_max, axis)`` of a fake-quant call."""
    kind = FAKE_QUANT_OPS[node.target]
    names = ("input", "scale", "zero_point", "quant_min", "quant_max")
    if kind == "channel":
        names = ("input", "scale", "zero_point", "axis", "quant_min", "quant_max")
    values = dict(zip(names, node.args, strict=False))  # trailing arguments may come as keywords
    values.update(node.kwargs)
    return (values["input"], values["scale"], values["zero_point"], values["quant_min"], values["quant_max"],
            values.get("axis"))


def _reads_its_output(node) -> bool:
    return isinstance(node, fx.Node) and (
        (node.op == "call_function" and node.target in _OUTPUT_READING_FUNCTIONS)
        or (node.op == "call_method" and node.target in _OUTPUT_READING_METHODS))


def rewrite_fake_quant(gm: fx.GraphModule, mode: str = "fuse", example_inputs: Sequence = (),
                       save: bool | str = "auto") -> int:
    """Replace every fake-quant call in ``gm``: ``mode="fuse"`` by :func:`fake_quantize`,
    ``mode="qdq"`` by ``quantized_decomposed`` quantize/dequantize pairs (inference only).
    Returns how many calls were replaced.

    ``save`` (``mode="fuse"``): which new calls are marked ``MUST_SAVE`` for AOTAutograd's
    partitioner (``node.meta["recompute"]``, the tag of selective activation checkpointing, which
    tracing copies onto every op a call becomes), so that the backward loads the quantized value and
    the straight-through mask the forward computed. Left to itself the partitioner, which counts
    recomputing element-wise ops as free, saves a quantizer's input and recomputes quantize, round,
    clamp and mask in the backward; where the input is a softmax -- whose backward reads its output,
    and whose only forward consumer is now the quantizer -- it saves the softmax's input and
    recomputes the softmax as well (each of SmallViT's four attention softmaxes). "auto" marks the
    calls on a softmax or log-softmax output and that op itself (then the backward recomputes no
    softmax), True every call (no quantization left in the backward: SmallViT's backward graph
    673 ops against 2,507; more memory: mask and quantized value both kept), False none.
    Measured side by side (benchmarks/compile.py, README): "auto" is the fastest on SmallViT, and True
    makes ResNet-18's step slower (the saved masks cost more memory traffic than the recomputation)."""
    count = 0
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = {n: v for n, v in zip(placeholders, example_inputs, strict=False) if isinstance(v, torch.Tensor)}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in FAKE_QUANT_OPS:
            continue
        x, scale, zero_point, qmin, qmax, axis = _fake_quant_args(node)
        if mode == "qdq" and axis is None:  # per-tensor qparams as constants (what freezing makes them)
            scale, zero_point = _constant(scale, values), _constant(zero_point, values)
        with gm.graph.inserting_before(node):
            if mode == "fuse":
                new = gm.graph.call_function(fake_quantize, (x, scale, zero_point, qmin, qmax, axis))
            else:
                new = _qdq(gm.graph, x, scale, zero_point, qmin, qmax, axis)
        new.meta.update(node.meta)
        if mode == "fuse" and (save is True or (save == "auto" and _reads_its_output(x))):
            new.meta["recompute"] = CheckpointPolicy.MUST_SAVE
            if save == "auto":
                x.meta["recompute"] = CheckpointPolicy.MUST_SAVE
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


# ops whose output elements are some of their (first) input's elements, unchanged: a value on a
# quantizer's grid stays on it (views, reshapes, indexing, splits, max pooling)
_KEEPS_VALUES_METHODS = frozenset({
    "reshape", "view", "transpose", "permute", "flatten", "unflatten", "contiguous", "squeeze", "unsqueeze",
    "expand", "t", "view_as", "reshape_as", "expand_as", "movedim", "swapaxes", "swapdims", "narrow", "select",
    "chunk", "split", "unbind", "__getitem__"})
_KEEPS_VALUES_FUNCTIONS = frozenset({
    torch.reshape, torch.transpose, torch.permute, torch.flatten, torch.unflatten, torch.squeeze, torch.unsqueeze,
    torch.t, torch.movedim, torch.swapaxes, torch.swapdims, torch.narrow, torch.select, torch.chunk, torch.split,
    torch.unbind, operator.getitem, torch.max_pool1d, torch.max_pool2d, torch.max_pool3d,
    torch.nn.functional.max_pool1d, torch.nn.functional.max_pool2d, torch.nn.functional.max_pool3d})
# ops that may return their input itself or a view of it without being value-keeping in general
_MAY_ALIAS_METHODS = frozenset({"to", "type", "float", "detach", "as_strided", "diagonal", "unfold", "view_as_real",
                                "real", "imag", "split_with_sizes", "requires_grad_"})


def _keeps_values(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _KEEPS_VALUES_METHODS
    if node.op != "call_function" or node.target not in _KEEPS_VALUES_FUNCTIONS:
        return False
    return not node.kwargs.get("return_indices", False) and not (
        len(node.args) > 6 and node.args[6] is True)  # max_pool's return_indices, positionally


_INPLACE_DUNDERS = frozenset(f"__i{op}__" for op in (
    "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and", "or", "xor", "lshift", "rshift", "matmul"))


def _mutates(node: fx.Node) -> bool:
    """Whether ``node`` may write into one of its inputs (in-place methods and functions, ``out=``,
    ``inplace=True``, item assignment) or is a module call this pass cannot see into."""
    if node.op == "call_module":
        return True
    if node.op not in ("call_method", "call_function"):
        return False
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if isinstance(name, str) and ((name.endswith("_") and not name.endswith("__")) or name in _INPLACE_DUNDERS
                                  or name == "__setitem__"):
        return True
    if node.target in (operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                       operator.ifloordiv, operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                       operator.ilshift, operator.irshift, operator.imatmul):
        return True
    return node.kwargs.get("inplace") is True or "out" in node.kwargs


def _aliases_mutated(start: fx.Node) -> bool:
    """Whether a tensor that may share memory with ``start``'s output is written in place."""
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        for user in node.users:
            if _mutates(user):
                return True
            if _keeps_values(user) or (user.op == "call_method" and user.target in _MAY_ALIAS_METHODS):
                todo.append(user)
    return False


def drop_repeated_fake_quant(gm: fx.GraphModule, example_inputs: Sequence = ()) -> int:
    """Remove a per-tensor fake-quant call whose input is already on its grid: the output of a
    fake-quant call with the same scale and zero-point tensors and the same range, reached through
    ops that only move or select values (reshape, transpose, indexing, max pooling, ...).

    torch.ao gives a shape op's output its input's quantizer (one module under two names), so a
    transformer's QAT graph fake-quantizes q, k and v again after each reshape and transpose: a
    third of SmallViT's fake-quant calls. Such a call is the identity on its input's values
    (``round((q - z) * s / s) + z == q`` for every integer ``q`` in range) and its straight-through
    mask is all ones there, so removing it changes neither the values nor the gradients. A call is
    kept when anything that may alias the first call's output, or the scale or zero point (a
    quantizer that still observes updates them between its calls), is written in place, or when the
    quantizers are different tensors (their values are not known here: fake tensors). Returns how
    many calls were removed."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = dict(zip(placeholders, example_inputs, strict=False))

    def same(a, b) -> bool:
        if a is b or (not isinstance(a, fx.Node) and not isinstance(b, fx.Node) and a == b):
            return True
        va, vb = values.get(a), values.get(b)
        return va is not None and va is vb

    removed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or FAKE_QUANT_OPS.get(node.target) != "tensor":
            continue
        x, scale, zero_point, qmin, qmax, _ = _fake_quant_args(node)
        source = x
        while isinstance(source, fx.Node) and _keeps_values(source) and source.args:
            source = source.args[0]
        if not isinstance(source, fx.Node) or source.op != "call_function" or FAKE_QUANT_OPS.get(source.target) != "tensor":
            continue
        _, s_scale, s_zero_point, s_qmin, s_qmax, _ = _fake_quant_args(source)
        if not (same(scale, s_scale) and same(zero_point, s_zero_point) and qmin == s_qmin and qmax == s_qmax):
            continue
        if any(_aliases_mutated(n) for n in (source, scale, zero_point) if isinstance(n, fx.Node)):
            continue  # (a quantizer still observing updates its scale in place between the calls)
        node.replace_all_uses_with(x)
        gm.graph.erase_node(node)
        removed += 1
    if removed:
        gm.graph.lint()
        gm.recompile()
    return removed


def _constant(arg, values: dict):
    """A one-element qparam read from the example inputs (a placeholder's real value), else ``arg``."""
    tensor = values.get(arg) if isinstance(arg, fx.Node) else None
    if tensor is None or tensor.numel() != 1 or isinstance(tensor, torch._subclasses.FakeTensor):
        return arg
    return tensor.item()


def _qdq(graph: fx.Graph, x, scale, zero_point, qmin, qmax, axis) -> fx.Node:
    qd = torch.ops.quantized_decomposed
    dtype = torch.int8 if qmin < 0 else torch.uint8
    if axis is None:
        if isinstance(scale, (int, float)) and isinstance(zero_point, int):  # values known: inductor's patterns
            q = graph.call_function(qd.quantize_per_tensor.default, (x, scale, zero_point, qmin, qmax, dtype))
            return graph.call_function(qd.dequantize_per_tensor.default, (q, scale, zero_point, qmin, qmax, dtype))
        q = graph.call_function(qd.quantize_per_tensor.tensor, (x, scale, zero_point, qmin, qmax, dtype))
        return graph.call_function(qd.dequantize_per_tensor.tensor, (q, scale, zero_point, qmin, qmax, dtype))
    zp = graph.call_function(torch.Tensor.to, (zero_point, torch.int64))
    if dtype == torch.int8:
        # symmetric weights on a restricted grid: clamp the float weight to it and quantize into the
        # full int8 range (the same integers), the form inductor's INT8 conv/linear patterns take
        # (as passes/clamp_int_weights.py does for torch.ao's lowering)
        x = graph.call_function(_clamp_to_grid, (x, scale, axis, qmin, qmax))
        qmin, qmax = -128, 127
    q = graph.call_function(qd.quantize_per_channel.default, (x, scale, zp, axis, qmin, qmax, dtype))
    return graph.call_function(qd.dequantize_per_channel.default, (q, scale, zp, axis, qmin, qmax, dtype))


def _clamp_to_grid(x, scale, axis, quant_min, quant_max):
    scale = _broadcast(scale, x, axis).to(x.dtype)
    return torch.minimum(torch.maximum(x, quant_min * scale), quant_max * scale)


def _constant_module_state(gm: fx.GraphModule, example_inputs: Sequence) -> list[int]:
    """Make the model's parameters and buffers attributes of ``gm`` instead of graph inputs (what
    Dynamo does itself when inductor's freezing is on while it traces), so that freezing folds the
    weights' quantization into int8 constants. Returns the positions of the inputs left."""
    sources = getattr(gm, "_param_name_to_source", None)
    if sources is None:
        sources = gm._param_name_to_source = {}
    fqns = gm.meta.setdefault("dynamo_flat_name_to_original_fqn", {})
    keep = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, (node, value) in enumerate(zip(placeholders, example_inputs, strict=False)):
        source = getattr(node, "_dynamo_source", None)
        if (not isinstance(value, torch.Tensor) or source is None
                or getattr(value, "_dynamo_static_input_type", None) is None):
            keep.append(i)
            continue
        name = f"_fxptqat_state_{i}"
        gm.register_buffer(name, value.detach(), persistent=False)
        sources[name] = source
        fqns[name] = name
        with gm.graph.inserting_before(node):
            attr = gm.graph.get_attr(name)
        attr.meta.update(node.meta)
        node.replace_all_uses_with(attr)
        gm.graph.erase_node(node)
    gm.recompile()
    return keep


_CONVS = (torch.conv1d, torch.conv2d, torch.conv3d, torch.nn.functional.conv1d, torch.nn.functional.conv2d,
          torch.nn.functional.conv3d)
_BATCH_NORMS = (torch.nn.functional.batch_norm, torch.batch_norm)
_DIV = (operator.truediv, torch.div)
_VERSION = operator.attrgetter("_version")
_ADD = (operator.add, torch.add)


def _constant_value(node, gm: fx.GraphModule, memo: dict):
    """The value of a node computed from the graph's constants alone (attributes, literals), or None."""
    if not isinstance(node, fx.Node):
        return node
    if node in memo:
        return memo[node]
    value = None
    if node.op == "get_attr":
        value = getattr(gm, node.target)
    elif node.op in ("call_function", "call_method"):
        args = [_constant_value(a, gm, memo) if isinstance(a, fx.Node) else a for a in node.args]
        if not any(a is None for a, n in zip(args, node.args, strict=True) if isinstance(n, fx.Node)) and not any(
                isinstance(v, fx.Node) for v in node.kwargs.values()):
            try:
                with torch.no_grad():
                    value = (node.target(*args, **node.kwargs) if node.op == "call_function"
                             else getattr(args[0], node.target)(*args[1:], **node.kwargs))
            except Exception:  # not evaluable here: leave the node alone
                value = None
    memo[node] = value if isinstance(value, torch.Tensor) else None
    return memo[node]


def _batch_norm_args(node: fx.Node) -> dict:
    names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
    values = dict(zip(names, node.args, strict=False))
    values.update(node.kwargs)
    if node.target is torch.batch_norm:  # torch.batch_norm(input, weight, bias, mean, var, training, momentum, eps, cudnn)
        order = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps")
        values = dict(zip(order, node.args, strict=False))
    return values


def fold_batch_norm(gm: fx.GraphModule) -> int:
    """Fold the eval-mode BatchNorm of torch.ao's QAT ConvBn modules into the conv's bias.

    torch.ao's ``ConvBn*d`` (QAT) computes ``bn(conv(x, fq(w * s)) / s + b)`` with ``s = gamma /
    sqrt(var + eps)``, the statistics of that very BatchNorm: in eval mode the multiplier of the conv
    output is ``(gamma / sqrt(var + eps)) / s = 1`` and the whole is ``conv(x, fq(w * s)) + c`` with
    ``c = (b - mean) * gamma / sqrt(var + eps) + beta``, what torch.ao's convert computes. Written
    that way the INT8 conv takes ``c`` as its bias and inductor fuses it with the next quantize
    (otherwise the conv's float output goes through memory to a separate per-channel kernel).
    ``c`` is written as graph arithmetic on the constants, which freezing folds. Applied only where every quantity is a constant of ``gm`` (after :func:`_constant_module_state`)
    and the multiplier is 1 within 1e-5 on every channel (zero ``gamma`` channels: left alone).
    Returns how many BatchNorms were folded."""
    memo: dict = {}
    folded = 0
    for bn in list(gm.graph.nodes):
        if bn.op != "call_function" or bn.target not in _BATCH_NORMS:
            continue
        a = _batch_norm_args(bn)
        if a.get("training", False) is not False:
            continue
        node, bias_node = a["input"], None
        if (isinstance(node, fx.Node) and node.op == "call_function" and node.target in _ADD
                and len(node.users) == 1):
            node, bias_node = node.args[0], node.args[1]
        div = node
        if not (isinstance(div, fx.Node) and div.op == "call_function" and div.target in _DIV
                and len(div.users) == 1 and not div.kwargs):
            continue
        conv = div.args[0]
        if not (isinstance(conv, fx.Node) and conv.op == "call_function" and conv.target in _CONVS
                and len(conv.users) == 1 and len(conv.args) >= 3 and not conv.kwargs):
            continue
        consts = [_constant_value(n, gm, memo) for n in
                  (div.args[1], a["running_mean"], a["running_var"], a.get("weight"), a.get("bias"))]
        b = _constant_value(bias_node, gm, memo) if bias_node is not None else 0.0
        zero_bias = _constant_value(conv.args[2], gm, memo) if conv.args[2] is not None else 0.0
        if any(v is None for v in consts) or b is None or zero_bias is None:
            continue  # (also: a BatchNorm without affine parameters)
        s, mean, var, gamma, beta = consts
        if not (isinstance(zero_bias, float) or not torch.any(zero_bias)):
            continue  # the conv already adds something: not torch.ao's ConvBn form
        channels = mean.numel()
        s, b = s.flatten(), b.flatten() if torch.is_tensor(b) else torch.full((channels,), float(b))
        if s.numel() != channels or b.numel() != channels:
            continue
        std = torch.sqrt(var + a.get("eps", 1e-5))
        multiplier = gamma / std / s
        if not bool(torch.all((multiplier - 1).abs() <= 1e-5)):
            continue
        g = gm.graph
        with g.inserting_before(bn):  # c as graph arithmetic on the constants: freezing folds it
            std = g.call_function(torch.sqrt, (g.call_function(operator.add, (a["running_var"], a.get("eps", 1e-5))),))
            bias = (g.call_method("reshape", (bias_node, (-1,))) if bias_node is not None
                    else g.call_function(torch.zeros_like, (a["running_mean"],)))
            centred = g.call_function(operator.sub, (bias, a["running_mean"]))
            scaled = g.call_function(operator.mul, (centred, g.call_function(operator.truediv, (a["weight"], std))))
            new_bias = g.call_function(operator.add, (scaled, a["bias"]))
        conv.args = (*conv.args[:2], new_bias, *conv.args[3:])
        bn.prepend(conv)  # after the bias it now reads (its own inputs all come earlier)
        bn.replace_all_uses_with(conv)
        gm.graph.erase_node(bn)
        if bias_node is not None and a["input"] is not div:
            gm.graph.erase_node(a["input"])
        gm.graph.erase_node(div)
        folded += 1
    if folded:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return folded


def _needs_grad(example_inputs: Sequence) -> bool:
    return torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs)


def _saturates(gm: fx.GraphModule) -> bool:
    """Whether oneDNN's u8 x s8 kernels could saturate on this graph's grids on this CPU (no
    AVX-512 VNNI: products are summed in pairs in 16 bits; see workarounds.refuse_saturating_kernels)."""
    from .workarounds import _INT16_MAX, exact_u8s8_kernels

    if exact_u8s8_kernels():
        return False
    act_top = weight_top = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in FAKE_QUANT_OPS:
            _, _, _, qmin, qmax, _ = _fake_quant_args(node)
            if qmin < 0:
                weight_top = max(weight_top, -qmin, qmax)
            else:
                act_top = max(act_top, qmax - qmin)
    return 2 * act_top * weight_top > _INT16_MAX


def backend(gm: fx.GraphModule, example_inputs: Sequence, options: dict | None = None, **kwargs):
    """The ``fxptqat`` torch.compile backend (see the module docstring)."""
    import torch._dynamo.utils as dynamo_utils
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed ops)
    from torch._inductor.compile_fx import compile_fx

    options = {**(options or {}), **kwargs}
    unknown = set(options) - _OPTIONS
    if unknown:
        raise ConfigError(f"backend='fxptqat': unknown option(s) {sorted(unknown)}; choose from {sorted(_OPTIONS)}.")
    int8 = options.get("int8", "auto")
    if int8 not in ("auto", True, False):
        raise ConfigError(f"backend='fxptqat': int8={int8!r}; choose 'auto', True or False.")
    save = options.get("save_fake_quant", "auto")
    if not (save == "auto" or isinstance(save, bool)):
        raise ConfigError(f"backend='fxptqat': save_fake_quant={save!r}; choose 'auto', True or False.")
    drop_guards = options.get("drop_frozen_guards", True)
    dict_tags = options.get("dict_tag_guards", True)
    for name, value in (("drop_frozen_guards", drop_guards), ("dict_tag_guards", dict_tags)):
        if not isinstance(value, bool):
            raise ConfigError(f"backend='fxptqat': {name}={value!r}; choose True or False.")
    inductor = dict(options.get("inductor") or {})
    counters = dynamo_utils.counters["fxptqat"]
    counters["graphs"] += 1
    n_fq = sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in FAKE_QUANT_OPS)
    counters["fake_quant_ops"] += n_fq
    inference = not _needs_grad(example_inputs)
    if int8 is True and not inference:
        raise LoweringError("backend='fxptqat' with int8=True compiles inference graphs only: call the model "
                            "under torch.no_grad() (the graph it got computes gradients).")
    if n_fq == 0:
        log.info("backend='fxptqat': the graph has no fake-quant op; compiled with inductor unchanged")
        counters["graphs_without_fake_quant"] += 1
        return compile_fx(gm, example_inputs, config_patches=inductor or None)
    if inference and int8 is not False:
        if not _saturates(gm):
            compiled = _compile_int8(gm, example_inputs, inductor, counters, drop_guards)
            if dict_tags and _dict_tag_guards_for_this_frame():
                counters["dict_tag_guard_frames"] += 1
            return compiled
        message = ("this CPU has no AVX-512 VNNI, so oneDNN's INT8 kernels would saturate on the graph's "
                   "8-bit weights with full-range activations (prepare with weight_bits<=7 or reduce_range=True)")
        if int8 is True:
            raise LoweringError(f"backend='fxptqat', int8=True: {message}.")
        log.warning("backend='fxptqat': %s; compiled as fused fake-quant (float kernels, same values) instead", message)
        counters["int8_refused"] += 1
    if options.get("fuse_fake_quant", True):
        counters["repeated_fake_quant_dropped"] += drop_repeated_fake_quant(gm, example_inputs)
        rewrite_fake_quant(gm, "fuse", save=save)
        counters["fused_graphs"] += 1
    return compile_fx(gm, example_inputs, config_patches=inductor or None)


_DICT_TAGS_TO_RESTORE: list[bool] = []
_DICT_TAGS_LOCK = threading.Lock()


def _restore_dict_tags(args=None) -> None:
    with _DICT_TAGS_LOCK:
        while _DICT_TAGS_TO_RESTORE:
            torch._dynamo.config.use_recursive_dict_tags_for_guards = _DICT_TAGS_TO_RESTORE.pop()


def _dict_tag_guards_for_this_frame() -> bool:
    """Have Dynamo build the guards of the frame being compiled with its recursive dict tags
    (``use_recursive_dict_tags_for_guards``, read when it builds them, after the backend returns),
    and put the setting back when that compile ends (Dynamo's compile-end callback, which runs
    after the guards are built, also when the compile fails). Only inside a Dynamo compile, where
    that callback is pending; returns whether it was set."""
    import torch._dynamo.callback as dynamo_callback

    handler = dynamo_callback.callback_handler
    pending = getattr(handler, "_CompilationCallbackHandler__pending_callbacks_counter", 0)
    if not pending or torch._dynamo.config.use_recursive_dict_tags_for_guards:
        return False
    with _DICT_TAGS_LOCK:
        if _restore_dict_tags not in handler.end_callbacks:
            dynamo_callback.on_compile_end(_restore_dict_tags)
        _DICT_TAGS_TO_RESTORE.append(torch._dynamo.config.use_recursive_dict_tags_for_guards)
        torch._dynamo.config.use_recursive_dict_tags_for_guards = True
    return True


def _drop_frozen_tensor_guards(frozen: set) -> int:
    """Remove the TENSOR_MATCH guards on the ``frozen`` sources from the guards Dynamo is about to
    build for the frame being compiled (see the module docstring); returns how many. Under
    ``torch.no_grad()`` only; does nothing outside a Dynamo compile."""
    from torch._guards import GuardsCheckpointState, TracingContext

    ctx = TracingContext.try_get()
    if ctx is None or torch.is_grad_enabled() or not frozen:
        return 0
    state = ctx.guards_context.copy_graphstate()
    kept = type(state.dynamo_guards)(
        g for g in state.dynamo_guards
        if not (g.originating_source in frozen and g.create_fn_name() == "TENSOR_MATCH"))
    dropped = len(state.dynamo_guards) - len(kept)
    if dropped:
        ctx.guards_context.restore_graphstate(GuardsCheckpointState(kept))
    return dropped


def _compile_int8(gm: fx.GraphModule, example_inputs: Sequence, inductor: dict, counters,
                  drop_guards: bool = True) -> Any:
    from torch._inductor.compile_fx import compile_fx

    rewrite_fake_quant(gm, "qdq", example_inputs)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    keep = _constant_module_state(gm, example_inputs)
    frozen = {getattr(placeholders[i], "_dynamo_source", None) for i in range(len(placeholders)) if i not in keep}
    frozen.discard(None)
    counters["folded_batch_norms"] += fold_batch_norm(gm)
    counters["int8_graphs"] += 1
    patches = {"freezing": True, **inductor}
    # what the graph froze, to see an in-place change later (an optimizer step, load_state_dict, an
    # observer): a tensor's version counter, shared with the detached alias the graph holds, only grows
    # (the graph's attributes: the inputs made constants here, detached aliases sharing the counters,
    # and those Dynamo itself made attributes when inductor's freezing was on while it traced)
    frozen_named = {**dict(gm.named_parameters()), **dict(gm.named_buffers())}
    frozen_tensors, frozen_index = list(frozen_named.values()), {name: i for i, name in enumerate(frozen_named)}
    # and where each came from (the module dict holding it), to see a tensor replaced by another
    # object (``module.weight = nn.Parameter(...)``, ``load_state_dict(assign=True)``): no version changes
    owners = _frozen_owners(gm)
    pristine = _graph_copy(gm)
    compiled = compile_fx(gm, [example_inputs[i] for i in keep], config_patches=patches)
    state = {"compiled": compiled, "version": _version_sum(frozen_tensors), "refrozen": None}
    if drop_guards:
        try:
            counters["frozen_tensor_guards_dropped"] += _drop_frozen_tensor_guards(frozen)
        except Exception as e:  # Dynamo's internals moved: keep every guard (correct, a little slower)
            log.info("backend='fxptqat': frozen tensors' guards kept (%s: %s)", type(e).__name__, e)
    n_inputs = len(example_inputs)

    def run(*args):
        # Dynamo calls with the graph's inputs as this backend left them (parameters and buffers
        # now constants); a caller holding the original signature passes all of them
        if len(args) == n_inputs and n_inputs != len(keep):
            args = [args[i] for i in keep]
        if owners is not None and not owners.unchanged():
            replaced = owners.rebind(pristine, frozen_tensors, frozen_index)
            log.info("backend='fxptqat': %d frozen tensor(s) replaced by new objects since the INT8 graph was "
                     "compiled (%s); compiling it again with them", len(replaced), ", ".join(replaced[:3]))
            state["version"] = None  # forces the refreeze below
        version = _version_sum(frozen_tensors)
        if version == state["version"] and state["refrozen"] is None:
            return state["compiled"](*args)  # aot_autograd's forward binds the frozen parameters itself
        if version != state["version"]:
            # the frozen weights or quantizer parameters changed in place since this graph was
            # compiled (training between two evaluations): compile again from the same graph with
            # the current values, rather than run the stale constants
            log.info("backend='fxptqat': a frozen weight or quantizer parameter changed in place since the "
                     "INT8 graph was compiled; compiling it again with the current values")
            counters["int8_refrozen"] += 1
            state["version"], state["refrozen"] = version, {}
        # compiled outside Dynamo, for these inputs' shapes (a graph Dynamo made dynamic gets one
        # compile per shape it is called with)
        key = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args)
        if key not in state["refrozen"]:
            with torch.no_grad():
                state["refrozen"][key] = compile_fx(_graph_copy(pristine), list(args), config_patches=patches)
        return state["refrozen"][key](*args)
    return run


class _FrozenOwners:
    """For the INT8 graph's frozen attributes: the module dict (``_parameters`` / ``_buffers``) and
    key each was read from, and the tensor object there at compile time. Dynamo passes the compiled
    graph only its remaining inputs, so a parameter replaced by a new object is seen only here."""

    def __init__(self, entries: list[tuple[str, dict, str, torch.Tensor, str]]) -> None:
        self.names = [e[0] for e in entries]
        self.dicts = [e[1] for e in entries]
        self.keys = [e[2] for e in entries]
        self.tensors = [e[3] for e in entries]
        self.labels = [e[4] for e in entries]

    def unchanged(self) -> bool:
        return all(map(operator.is_, map(dict.get, self.dicts, self.keys), self.tensors))

    def rebind(self, pristine: fx.GraphModule, frozen_tensors: list, frozen_index: dict[str, int]) -> list[str]:
        """Point ``pristine``'s attributes (and ``frozen_tensors``, by ``frozen_index``) at the new
        objects; their labels."""
        replaced = []
        for i, (d, key, old) in enumerate(zip(self.dicts, self.keys, self.tensors, strict=True)):
            new = d.get(key)
            if new is old:
                continue
            if not isinstance(new, torch.Tensor) or (new.shape, new.dtype, new.device) != (old.shape, old.dtype, old.device):
                what = "removed" if new is None else (f"replaced by {type(new).__name__}" if not isinstance(new, torch.Tensor)
                                                      else f"replaced by a {tuple(new.shape)} {new.dtype} tensor on {new.device}")
                raise LoweringError(
                    f"backend='fxptqat': {self.labels[i]} (a {tuple(old.shape)} {old.dtype} tensor the INT8 graph froze) "
                    f"was {what} after compiling; the compiled graph cannot take it. Call torch._dynamo.reset() "
                    "(or compile the model again) after changing a model's structure.")
            detached = new.detach()  # as _constant_module_state holds it
            if hasattr(pristine, self.names[i]):  # (an attribute the graph no longer reads is not copied)
                pristine.register_buffer(self.names[i], detached, persistent=False)
            if self.names[i] in frozen_index:
                frozen_tensors[frozen_index[self.names[i]]] = detached
            self.tensors[i] = new
            replaced.append(self.labels[i])
        return replaced


def _frozen_owners(gm: fx.GraphModule) -> _FrozenOwners | None:
    """Resolve the Dynamo source of every frozen attribute of ``gm`` to its owning dict and key,
    in the frame being compiled; None where Dynamo's internals do not allow it (then only in-place
    changes are seen)."""
    try:
        from torch._dynamo.source import DictGetItemSource
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        scope_globals, scope_locals, cache = {"G": tx.f_globals}, {"L": tx.f_locals}, {}
        entries = []
        for name, source in (getattr(gm, "_param_name_to_source", None) or {}).items():
            attr = getattr(gm, name, None)
            if not isinstance(source, DictGetItemSource) or not isinstance(attr, torch.Tensor):
                continue
            owner = source.base.get_value(scope_globals, scope_locals, cache)
            current = owner.get(source.index) if isinstance(owner, dict) else None
            if isinstance(current, torch.Tensor) and current.data_ptr() == attr.data_ptr():
                entries.append((name, owner, source.index, current, source.name))
        return _FrozenOwners(entries)
    except Exception as e:  # Dynamo's internals moved: in-place changes are still seen
        log.info("backend='fxptqat': frozen tensors' owners not resolved (%s: %s)", type(e).__name__, e)
        return None


def _version_sum(tensors: list) -> int:
    """The sum of the tensors' version counters: unchanged iff none was written in place (each only
    grows)."""
    return sum(map(_VERSION, tensors))


def _graph_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm``'s graph over the same attributes (tensors shared, not copied), with the
    attributes compile_fx's freezing reads."""
    import copy

    new = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    for old_node, new_node in zip(gm.graph.nodes, new.graph.nodes, strict=True):
        if hasattr(old_node, "_dynamo_source"):  # AOTAutograd reads it off the placeholders
            new_node._dynamo_source = old_node._dynamo_source
    new.meta.update(copy.copy(gm.meta))
    if hasattr(gm, "_param_name_to_source"):
        new._param_name_to_source = dict(gm._param_name_to_source)
    return new
