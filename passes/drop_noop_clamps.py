"""Pass (on a lowered INT8 graph): remove clamps that cannot change a value of their input's grid.

After ``passes/fit_observers_to_clamps.py`` the quantizer in front of a ReLU6 spans [0, <= 6]:
every uint8 code of the conv's output already lies inside the clamp, yet the INT8 graph still runs
the ReLU6 as a separate pass over the tensor. A clamp node (see
:func:`fxptqat.passes.fit_observers_to_clamps.clamp_range`) is dropped when its input is produced
by a quantized module with a per-tensor ``scale`` and ``zero_point`` whose whole representable
range ``[(qmin - zp) * scale, (qmax - zp) * scale]`` lies inside the clamp's bounds. The outputs
are unchanged bit for bit; ``modified`` says whether a node was removed.
"""

from __future__ import annotations

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from fxptqat.passes.fit_observers_to_clamps import clamp_range

__all__ = ["drop_noop_clamps"]
REQUIRES = "int8"  # the graph it acts on (see passes/__init__.py)

_QMIN, _QMAX = 0, 255  # torch.ao's quantized modules output quint8 here (activations are unsigned)


def _grid(node: fx.Node, gm: fx.GraphModule) -> tuple[float, float] | None:
    if node.op != "call_module":
        return None
    module = gm.get_submodule(node.target)
    scale, zero_point = getattr(module, "scale", None), getattr(module, "zero_point", None)
    if not isinstance(scale, float) or not isinstance(zero_point, int):
        return None
    return (_QMIN - zero_point) * scale, (_QMAX - zero_point) * scale


def drop_noop_clamps(gm: fx.GraphModule, /) -> PassResult:
    modified = False
    dropped: set[str] = set()  # targets of removed call_module clamps
    for node in list(gm.graph.nodes):
        bounds = clamp_range(node, gm)
        if bounds is None or not isinstance(node.args[0], fx.Node):
            continue
        grid = _grid(node.args[0], gm)
        slack = 1e-6 * max(abs(bounds[0]), abs(bounds[1]))  # 255 * (6 / 255) in float32
        if grid is None or not (bounds[0] - slack <= grid[0] and grid[1] <= bounds[1] + slack):
            continue
        if node.op == "call_module":
            dropped.add(node.target)
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        modified = True
    still_called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for target in dropped - still_called:  # only the clamps' own modules, not other unused ones
        gm.delete_submodule(target)
    if modified:
        gm.recompile()
    return PassResult(gm, modified)
