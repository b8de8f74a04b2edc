"""Pass (on a reference Q/DQ graph, before inductor compiles it): ceil-mode max pooling of a
dequantized value as explicit ``-inf`` padding and floor-mode pooling.

Inductor (torch 2.13) lowers ``dequantize_per_tensor -> max_pool2d -> quantize_per_tensor`` to a
max pool on the uint8 codes (``quantized.max_pool2d``) and loses ``ceil_mode=True`` on the way: the
pattern list of its ``_low_memory_max_pool_with_offsets`` form binds the ceil_mode argument to
``offset_dtype``, so the pool runs in floor mode and its output is one row and column short.
GoogLeNet (every max pool ``ceil_mode=True``) then ran 15x15 maps where the reference has 16x16,
its adaptive pooling hid the shape, and the INT8 logits had cosine 0.55 to the fake-quant ones
(measured at 64 px, W8A8 weighted recipe; top-1 agreement 0/8).

Here such a pool (``nn.MaxPool2d`` / ``F.max_pool2d`` with ``ceil_mode=True`` and no indices, whose
input is a ``dequantize_per_tensor``) becomes :func:`max_pool2d_ceil`: pad the right and bottom with
``-inf`` (and ``padding`` on every side) to exactly the extent ceil mode's last window reaches, then
pool in floor mode. A window sees the same input values and no others (padding never wins a max),
so the result is identical, bit for bit, and inductor's pattern no longer matches (the pad sits
between the dequantize and the pool). The graph is a copy that inductor compiles; the reference
graph :func:`fxptqat.check_parity` compares node by node keeps the original pool. ``modified``
says whether a pool was rewritten.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.infra.pass_base import PassResult

__all__ = ["explicit_ceil_pooling", "max_pool2d_ceil"]
REQUIRES = "int8"  # the graph it acts on (see passes/__init__.py)

_DEQUANTIZE = "quantized_decomposed.dequantize_per_tensor"
_POOL_FUNCTIONS = (F.max_pool2d, torch.max_pool2d)


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _ceil_extent(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """The padded length floor mode needs to give ceil mode's output size (PyTorch's rule: the last
    window must start inside the input or the left padding)."""
    span = dilation * (kernel - 1) + 1
    out = -(-(size + 2 * padding - span) // stride) + 1
    if (out - 1) * stride >= size + padding:
        out -= 1
    return (out - 1) * stride + span


def max_pool2d_ceil(x: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1) -> torch.Tensor:
    """``F.max_pool2d(x, ..., ceil_mode=True)`` as explicit ``-inf`` padding and floor-mode pooling."""
    k, d, p = _pair(kernel_size), _pair(dilation), _pair(padding)
    s = _pair(stride) if stride not in (None, (), []) else k
    h, w = x.shape[-2], x.shape[-1]
    ext_h = max(_ceil_extent(h, k[0], s[0], p[0], d[0]), h + 2 * p[0])
    ext_w = max(_ceil_extent(w, k[1], s[1], p[1], d[1]), w + 2 * p[1])
    padded = F.pad(x, (p[1], ext_w - w - p[1], p[0], ext_h - h - p[0]), value=float("-inf"))
    return F.max_pool2d(padded, k, s, 0, d, ceil_mode=False)


def _is_dequantize(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and str(node.target).startswith(_DEQUANTIZE)


def _pool_args(node: fx.Node, gm: fx.GraphModule) -> dict | None:
    """kernel_size, stride, padding, dilation of a ceil-mode 2-D max pool without indices, else None."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if type(m) is not nn.MaxPool2d or not m.ceil_mode or m.return_indices:
            return None
        return {"kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding, "dilation": m.dilation}
    if node.op == "call_function" and node.target in _POOL_FUNCTIONS:
        names = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
        bound = {**dict(zip(names, node.args, strict=False)), **node.kwargs}
        if not bound.get("ceil_mode", False) or bound.get("return_indices", False):
            return None
        return {"kernel_size": bound["kernel_size"], "stride": bound.get("stride"),
                "padding": bound.get("padding", 0), "dilation": bound.get("dilation", 1)}
    return None


def explicit_ceil_pooling(gm: fx.GraphModule, /) -> PassResult:
    modified = False
    for node in list(gm.graph.nodes):
        if not node.args or not _is_dequantize(node.args[0]):
            continue
        args = _pool_args(node, gm)
        if args is None:
            continue
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(max_pool2d_ceil, (node.args[0],), args)
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        modified = True
    if modified:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return PassResult(gm, modified)
