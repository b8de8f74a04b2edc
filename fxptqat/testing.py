"""Hypothesis strategies for property-testing torch.fx graph rewrites.

:func:`traceable_models` draws ``(model, example_inputs)`` pairs that are valid by
construction: small conv / linear networks with BatchNorm, ReLU or ReLU6, residual adds,
channel concatenation and fan-out, deterministically initialised from a drawn seed
and returned in eval mode.  Every model traces with :func:`torch.fx.symbolic_trace`.

Example -- check that a user rewrite preserves numerics::

    import torch
    from hypothesis import given, settings
    from fxptqat.testing import traceable_models

    @settings(max_examples=50, deadline=None)
    @given(traceable_models(max_layers=4))
    def test_my_rewrite_preserves_outputs(pair):
        model, inputs = pair
        gm = torch.fx.symbolic_trace(model)
        rewritten = my_rewrite(gm)          # the pass under test
        rewritten.graph.lint()
        with torch.no_grad():
            torch.testing.assert_close(rewritten(*inputs), model(*inputs), rtol=1e-4, atol=1e-5)

A failing example prints the drawn architecture (``model.program``) and its seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.fx
from torch import nn

try:
    from hypothesis import strategies as st
    from hypothesis.errors import InvalidArgument
    from hypothesis.strategies import SearchStrategy
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "fxptqat.testing needs hypothesis: `pip install hypothesis` (or `pip install 'fxptqat[dev]'`)"
    ) from exc

__all__ = ["Op", "act_bits", "graph_modules", "traceable_models", "weight_bits"]

ModelAndInputs = tuple[nn.Module, tuple[torch.Tensor, ...]]

_ACTIVATION_KINDS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish, "sigmoid": nn.Sigmoid,
                     "tanh": nn.Tanh}
_ACTIVATIONS = tuple(_ACTIVATION_KINDS.values())
_POINTWISE = ("hardswish", "sigmoid", "tanh")
_SCALES = (0.125, 0.5, 2.0, 16.0, -1.0)  # attention's 1/sqrt(d), Swin V2's 16, a sign flip
_SHIFTS = (3.0, 0.5, -2.0)


class Op(NamedTuple):
    """One step of a drawn program: ``out = kind(target, *args)``.

    ``kind`` is ``"call"`` (call submodule ``target``), ``"add"`` (``a + b``), ``"cat"``
    (``torch.cat(args, dim=1)``), ``"flatten"`` (``torch.flatten(a, 1)``), or ``"mul_scalar"`` /
    ``"add_scalar"`` (``c * a`` / ``a + c``, the number ``c`` written in ``target``).
    """

    kind: str
    target: str
    args: tuple[str, ...]
    out: str


@dataclass(frozen=True)
class _Arch:
    input_shape: tuple[int, ...]  # without the batch dimension
    layers: tuple[tuple[str, tuple[Any, ...]], ...]  # (name, constructor spec), in creation order
    program: tuple[Op, ...]
    output: str


class _DrawnModel(nn.Module):
    """A model whose forward runs a fixed ``program`` over named submodules.

    ``symbolic_trace`` unrolls the Python loop, so the traced graph has exactly one node per op.
    """

    def __init__(self, arch: _Arch, seed: int, modules: dict[str, nn.Module]) -> None:
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, module)
        self.arch = arch
        self.seed = seed
        self.program = arch.program
        self.output = arch.output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env: dict[str, torch.Tensor] = {"x": x}
        for op in self.program:
            args = [env[a] for a in op.args]
            if op.kind == "call":
                env[op.out] = getattr(self, op.target)(args[0])
            elif op.kind == "add":
                env[op.out] = args[0] + args[1]
            elif op.kind == "cat":
                env[op.out] = torch.cat(args, dim=1)
            elif op.kind == "flatten":
                env[op.out] = torch.flatten(args[0], 1)
            elif op.kind == "mul_scalar":  # the number on the left, as torchvision's Swin V2 writes it
                env[op.out] = float(op.target) * args[0]
            elif op.kind == "add_scalar":
                env[op.out] = args[0] + float(op.target)
            else:  # pragma: no cover - programs are built by this module only
                raise ValueError(f"unknown op kind {op.kind!r}")
        return env[self.output]

    def __repr__(self) -> str:
        lines = [
            f"_DrawnModel(seed={self.seed}, input_shape=(N, {', '.join(map(str, self.arch.input_shape))})):"
        ]
        for op in self.program:
            if op.kind == "call":
                mod = getattr(self, op.target)
                note = "" if isinstance(mod, _ACTIVATIONS) else f"  # {mod!r}"
                lines.append(f"  {op.out} = {op.target}({op.args[0]}){note}")
            elif op.kind == "add":
                lines.append(f"  {op.out} = {op.args[0]} + {op.args[1]}")
            elif op.kind == "cat":
                lines.append(f"  {op.out} = torch.cat([{', '.join(op.args)}], dim=1)")
            elif op.kind == "mul_scalar":
                lines.append(f"  {op.out} = {op.target} * {op.args[0]}")
            elif op.kind == "add_scalar":
                lines.append(f"  {op.out} = {op.args[0]} + {op.target}")
            else:
                lines.append(f"  {op.out} = torch.flatten({op.args[0]}, 1)")
        lines.append(f"  return {self.output}")
        return "\n".join(lines)


def _make_module(spec: tuple[Any, ...], g: torch.Generator) -> nn.Module:
    """Build one layer without touching the global RNG; parameters come from ``g``."""
    kind = spec[0]
    if kind in ("conv", "linear"):
        if kind == "conv":
            _, c_in, c_out, k, groups, bias = spec
            m: nn.Module = nn.utils.skip_init(
                nn.Conv2d, c_in, c_out, k, padding=k // 2, groups=groups, bias=bias
            )
            fan_in = (c_in // groups) * k * k
        else:
            _, c_in, c_out, bias = spec
            m = nn.utils.skip_init(nn.Linear, c_in, c_out, bias=bias)
            fan_in = c_in
        bound = math.sqrt(3.0 / fan_in)  # unit-variance preserving uniform init
        with torch.no_grad():
            m.weight.uniform_(-bound, bound, generator=g)
            if m.bias is not None:
                m.bias.uniform_(-0.5, 0.5, generator=g)
        return m
    if kind == "bn":
        bn = nn.utils.skip_init(nn.BatchNorm2d, spec[1])
        with torch.no_grad():  # non-trivial statistics and affine, so BN folding really matters
            bn.weight.uniform_(0.5, 1.5, generator=g)
            bn.bias.uniform_(-0.5, 0.5, generator=g)
            bn.running_mean.uniform_(-0.5, 0.5, generator=g)
            bn.running_var.uniform_(0.25, 4.0, generator=g)
            bn.num_batches_tracked.zero_()
        return bn
    if kind in _ACTIVATION_KINDS:
        return _ACTIVATION_KINDS[kind]()
    if kind == "pool":
        return nn.AdaptiveAvgPool2d(1)
    raise ValueError(f"unknown layer spec {spec!r}")  # pragma: no cover


def _materialise(arch: _Arch, seed: int, batch: int) -> ModelAndInputs:
    """Deterministically build ``(model, example_inputs)`` from an architecture and a seed."""
    g = torch.Generator().manual_seed(seed)
    modules = {name: _make_module(spec, g) for name, spec in arch.layers}
    model = _DrawnModel(arch, seed, modules).eval()
    x = torch.randn((batch, *arch.input_shape), generator=g, dtype=torch.float32)
    return model, (x,)


@dataclass(frozen=True)
class _Cfg:
    max_layers: int
    allow_conv: bool
    allow_linear: bool
    allow_bn: bool
    allow_residual: bool
    allow_cat: bool
    allow_fanout: bool
    allow_depthwise: bool
    max_channels: int
    allow_pointwise: bool = True


class _Builder:
    """Accumulates layers and program ops while a model is being drawn."""

    def __init__(self, draw: Any, cfg: _Cfg, conv: bool, width: int) -> None:
        self.draw, self.cfg, self.conv = draw, cfg, conv
        self.layers: list[tuple[str, tuple[Any, ...]]] = []
        self.program: list[Op] = []
        self.counts: dict[str, int] = {}
        self.values: list[tuple[str, int]] = [("x", width)]  # merge candidates: (name, channels)

    def emit(self, kind: str, target: str, args: tuple[str, ...], width: int) -> str:
        out = f"v{len(self.program) + 1}"
        self.program.append(Op(kind, target, args, out))
        self.values.append((out, width))
        return out

    def layer(self, prefix: str, spec: tuple[Any, ...], src: str, width: int) -> str:
        name = f"{prefix}{self.counts.get(prefix, 0)}"
        self.counts[prefix] = self.counts.get(prefix, 0) + 1
        self.layers.append((name, spec))
        return self.emit("call", name, (src,), width)

    def relu(self, src: str, width: int) -> str:
        """An optional activation: ReLU or ReLU6, and with ``allow_pointwise`` also Hardswish,
        Sigmoid or Tanh (the last two quantized on fixed grids)."""
        kinds = ("none", "relu", "relu6") + (_POINTWISE if self.cfg.allow_pointwise else ())
        kind = self.draw(st.sampled_from(kinds))
        return src if kind == "none" else self.layer(kind, (kind,), src, width)

    def scaled(self, src: str, width: int) -> str:
        """``c * src``, then optionally ``+ d`` (Swin V2's ``16 * sigmoid(b)``, ViT's ``q * scale``)."""
        v = self.emit("mul_scalar", repr(self.draw(st.sampled_from(_SCALES))), (src,), width)
        if self.draw(st.booleans()):
            v = self.emit("add_scalar", repr(self.draw(st.sampled_from(_SHIFTS))), (v,), width)
        return v

    def unit(self, src: str, c_in: int, c_out: int | None = None) -> tuple[str, int]:
        """A conv (+BN) (+ReLU or ReLU6) or linear (+ReLU or ReLU6) layer; ``c_out`` forces the output width."""
        draw, cfg = self.draw, self.cfg
        if self.conv:
            dw = cfg.allow_depthwise and c_in > 1 and c_out in (None, c_in) and draw(st.booleans())
            k = draw(st.sampled_from((1, 3)))
            c = c_in if dw else (c_out or draw(st.integers(1, cfg.max_channels)))
            spec = ("conv", c_in, c, k, c_in if dw else 1, draw(st.booleans()))
            v = self.layer("conv", spec, src, c)
            if cfg.allow_bn and draw(st.booleans()):
                v = self.layer("bn", ("bn", c), v, c)
        else:
            c = c_out or draw(st.integers(1, cfg.max_channels))
            v = self.layer("fc", ("linear", c_in, c, draw(st.booleans())), src, c)
        return self.relu(v, c), c

    def block(self, cur: str, c: int) -> tuple[str, int]:
        draw, cfg = self.draw, self.cfg
        cat_skips = [(n, w) for n, w in self.values if w < cfg.max_channels]
        kinds = ["plain"]
        if cfg.allow_fanout:
            kinds += ["residual"] if cfg.allow_residual else []
            kinds += ["cat"] if cfg.allow_cat and cat_skips else []
            merges = (["add"] if cfg.allow_residual else []) + (
                ["cat"] if cfg.allow_cat and cfg.max_channels > 1 else []
            )
            kinds += ["branch"] if merges else []
        kinds += ["scaled"] if cfg.allow_pointwise else []
        kind = draw(st.sampled_from(kinds))
        if kind == "plain":
            return self.unit(cur, c)
        if kind == "scaled":  # a unit whose output is scaled (and shifted) by numbers
            body, c = self.unit(cur, c)
            return self.scaled(body, c), c
        if kind == "residual":  # body(cur) + any earlier value of the same shape (cur itself included)
            body, _ = self.unit(cur, c, c_out=c)
            skip = draw(st.sampled_from([n for n, w in self.values if w == c and n != body]))
            return self.relu(self.emit("add", "", (body, skip), c), c), c
        if kind == "cat":  # cat of body(cur) with any earlier value, in either order
            skip, ws = draw(st.sampled_from(cat_skips))
            body, wb = self.unit(cur, c, c_out=draw(st.integers(1, cfg.max_channels - ws)))
            args = (body, skip) if draw(st.booleans()) else (skip, body)
            return self.emit("cat", "", args, ws + wb), ws + wb
        merge = draw(st.sampled_from(merges))  # "branch": cur fans out into two layers, then merges
        if merge == "add":
            a, wa = self.unit(cur, c)
            b, _ = self.unit(cur, c, c_out=wa)
            return self.emit("add", "", (a, b), wa), wa
        a, wa = self.unit(cur, c, c_out=draw(st.integers(1, cfg.max_channels - 1)))
        b, wb = self.unit(cur, c, c_out=draw(st.integers(1, cfg.max_channels - wa)))
        return self.emit("cat", "", (a, b), wa + wb), wa + wb


@st.composite
def _models(draw: Any, cfg: _Cfg, batch: SearchStrategy[int]) -> ModelAndInputs:
    conv = cfg.allow_conv and not (cfg.allow_linear and draw(st.booleans()))
    width = draw(st.integers(1, cfg.max_channels))
    hw = draw(st.integers(4, 8)) if conv else 0
    b = _Builder(draw, cfg, conv, width)
    cur, c = "x", width
    for _ in range(draw(st.integers(1, cfg.max_layers))):
        cur, c = b.block(cur, c)
    if conv:
        head = draw(st.sampled_from(["none", "pool"] + (["pool_linear"] if cfg.allow_linear else [])))
        if head != "none":
            cur = b.emit("flatten", "", (b.layer("pool", ("pool",), cur, c),), c)
        if head == "pool_linear":
            out = draw(st.integers(1, cfg.max_channels))
            cur = b.layer("fc", ("linear", c, out, True), cur, out)
    shape = (width, hw, hw) if conv else (width,)
    arch = _Arch(shape, tuple(b.layers), tuple(b.program), cur)
    seed = draw(st.integers(0, 2**32 - 1))
    return _materialise(arch, seed, draw(batch))


_DEFAULT_BATCH: SearchStrategy[int] = st.integers(1, 3)


def traceable_models(
    *,
    max_layers: int = 6,
    allow_conv: bool = True,
    allow_linear: bool = True,
    allow_bn: bool = True,
    allow_residual: bool = True,
    allow_cat: bool = True,
    allow_fanout: bool = True,
    allow_depthwise: bool = True,
    max_channels: int = 8,
    batch_size: SearchStrategy[int] | int = _DEFAULT_BATCH,
    allow_pointwise: bool = True,
) -> SearchStrategy[ModelAndInputs]:
    """Strategy for ``(model, example_inputs)``: eval-mode models that ``symbolic_trace`` cleanly.

    A model is 1..``max_layers`` blocks.  Conv models take ``(N, C, H, W)`` with ``H == W`` in
    4..8; a block is Conv2d (kernel 1 or 3, same padding, optionally depthwise) with optional
    BatchNorm2d and ReLU or ReLU6, a residual ``body(x) + skip`` (skip: any earlier value of the same
    shape, optional ReLU or ReLU6 after), a ``torch.cat(dim=1)`` of a body with an earlier value, or a
    two-branch block (one value feeds two layers, merged by add or cat).  Conv models end
    either on the conv output or on AdaptiveAvgPool2d + flatten (+ Linear head).  Linear-only
    models take ``(N, F)`` and use Linear (+ReLU or ReLU6) in the same block shapes.  With
    ``allow_pointwise`` an activation may also be Hardswish, Sigmoid or Tanh, and a block may be a
    layer whose output is scaled by a number and optionally shifted (``c * v + d``).  Channel / feature
    counts never exceed ``max_channels``.  Residual and cat need one value read twice, so with
    ``allow_fanout=False`` every value in the graph has exactly one user.  Parameters, BN
    statistics and inputs come from a ``torch.Generator`` seeded by a drawn seed (the global
    RNG is untouched), so a failing example replays exactly.
    """
    if not (allow_conv or allow_linear):
        raise InvalidArgument("traceable_models needs allow_conv or allow_linear")
    if max_layers < 1 or max_channels < 1:
        raise InvalidArgument(f"need max_layers >= 1 and max_channels >= 1, got {max_layers}, {max_channels}")
    if isinstance(batch_size, int):
        if batch_size < 1:
            raise InvalidArgument(f"batch_size must be >= 1, got {batch_size}")
        batch_size = st.just(batch_size)
    cfg = _Cfg(
        max_layers,
        allow_conv,
        allow_linear,
        allow_bn,
        allow_residual,
        allow_cat,
        allow_fanout,
        allow_depthwise and allow_conv,
        max_channels,
        allow_pointwise,
    )
    return _models(cfg, batch_size)


def graph_modules(**kwargs: Any) -> SearchStrategy[tuple[torch.fx.GraphModule, tuple[torch.Tensor, ...]]]:
    """Strategy for ``(symbolic_trace(model), example_inputs)``; accepts :func:`traceable_models` kwargs."""
    return traceable_models(**kwargs).map(lambda pair: (torch.fx.symbolic_trace(pair[0]), pair[1]))


def weight_bits() -> SearchStrategy[int]:
    """Weight bit-widths to quantize to: 2..8."""
    return st.integers(2, 8)


def act_bits() -> SearchStrategy[int | None]:
    """Activation bit-widths: 8, or ``None`` for float activations."""
    return st.sampled_from([8, None])
