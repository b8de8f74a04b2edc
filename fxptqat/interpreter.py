"""FX interpreters: a checked runner (calibration) and the streamed error recorder.

Both follow ``torch/fx/passes/shape_prop.py``: they override ``run_node`` only. A failing node is
reported by name and source line; a non-finite value by the first node that produced it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.fx as fx
from torch.fx.node import map_arg

from . import meta
from .errors import CalibrationError, FxptqatError, InputError
from .fake_quantize import is_quantizer
from .stats import RunningError, sum_squares

__all__ = ["CheckedInterpreter", "ErrorRecorder"]


def _where(node: fx.Node) -> str:
    """Node name, op, and the user's source line that created it (recorded while tracing)."""
    return f"node {node.name!r} ({node.op} {node.target}){source_line(node)}"


def source_line(node: fx.Node) -> str:
    trace = node.stack_trace or node.meta.get("stack_trace") or ""
    lines = trace.splitlines()
    frames = [  # ('File "x.py", line 3, in forward', 'code') pairs
        (lines[i].strip(), lines[i + 1].strip() if i + 1 < len(lines) else "")
        for i in range(len(lines)) if lines[i].strip().startswith("File ")
    ]
    user = [f for f in frames if "/torch/" not in f[0]]
    if not user:
        return ""
    where, code = user[-1]
    return f" (source: {where}: `{code}`)"


def _all_finite(value: torch.Tensor) -> bool:
    """One reduction instead of isfinite's element-wise passes: a NaN or Inf makes the sum non-finite;
    a non-finite sum of finite values (float overflow) gets the exact check."""
    return bool(torch.isfinite(value.sum())) or bool(torch.isfinite(value).all())


def _check_finite(node: fx.Node, value, path: str) -> None:
    if isinstance(value, torch.Tensor) and value.is_floating_point() and not _all_finite(value):
        if node.op == "placeholder":
            raise CalibrationError(
                f"{path}: an input batch holds NaN or Inf in node {node.name!r} (a model input). Clean the data "
                "(torch.nan_to_num) or drop the batch."
            )
        raise CalibrationError(
            f"{path}: {_where(node)} produced NaN or Inf from finite inputs (it is the first such node). "
            "The inputs are not to blame: the layer's float computation overflows (weights or "
            "statistics out of range) or its quantized form does; check its weights and BatchNorm "
            "statistics, and report it to fxptqat if the float model computes finite values here."
        )


class CheckedInterpreter(fx.Interpreter):
    """Runs a graph; failures name the node; optionally rejects non-finite values.

    A node that fails is reported as ``error`` (InputError by default: the inputs do not fit the
    graph) unless the inputs have the example inputs' shapes and dtypes: then the failure is not the
    data's fault, and the original exception propagates with the node's context added as a note
    (as torch.fx.Interpreter does), so a bug in fxptqat or in the model is not blamed on the user.
    """

    _INPUT_HINT = "Check that the inputs have the shapes and dtypes of the example inputs given to prepare()."

    def __init__(self, gm: fx.GraphModule, *, check_finite: bool = True, what: str = "run",
                 error: type[FxptqatError] = InputError, hint: str = _INPUT_HINT):
        super().__init__(gm)
        self.check_finite = check_finite
        self.what = what
        self.error, self.hint = error, hint
        self._blame_inputs = True

    def run(self, *args, **kwargs):
        info = meta.graph_info(self.module)
        known = info.inputs if info is not None and self.error is InputError else ()
        self._blame_inputs = not known or not _fits(args, known)
        return super().run(*args, **kwargs)

    def run_node(self, n: fx.Node):
        try:
            value = super().run_node(n)
        except FxptqatError:
            raise
        except Exception as e:
            if not self._blame_inputs:
                e.add_note(f"fxptqat {self.what}: raised at {_where(n)}, on inputs shaped like the example "
                           "inputs (please report it to fxptqat if the float model runs them)")
                raise
            raise self.error(f"{self.what}: {_where(n)} failed: {type(e).__name__}: {e}. {self.hint}") from e
        if self.check_finite:
            _check_finite(n, value, self.what)
        return value


def _fits(args: tuple, known: tuple) -> bool:
    """The batch's tensors have the example inputs' shapes (but the batch size) and dtypes."""
    if len(args) != len(known):
        return False
    return all(isinstance(a, torch.Tensor) and tuple(a.shape[1:]) == tuple(shape) and str(a.dtype) == dtype
               for a, (shape, dtype) in zip(args, known, strict=True))


class _Pair:
    """Quantized value, float value, and (for a weighted node) its isolated quantized value."""

    __slots__ = ("q", "f", "iso")

    def __init__(self, q, f, iso=None):
        self.q, self.f, self.iso = q, f, iso


@contextlib.contextmanager
def _weights_float(quantizer) -> Iterator[None]:
    """The weight quantizer passes weights through unchanged inside the block."""
    saved = bool(quantizer.fake_quant_enabled[0])
    quantizer.enable_fake_quant(False)
    try:
        yield
    finally:
        quantizer.enable_fake_quant(saved)


@contextlib.contextmanager
def _weights_once(quantizers) -> Iterator[None]:
    """Each weight quantizer fake-quantizes once inside the block and then returns that tensor.

    For measure_error (eval mode, no grad, weights and BatchNorm statistics fixed): a weighted
    module's weight input is a function of its parameters and buffers alone, so the quantized and
    the isolated call of every batch would compute the same fake-quantized weights again. Calls with
    fake-quant disabled (the float path) or with the observer on (which must see every call) go to
    the quantizer as usual; a cached result is keyed by the weight's shape and dtype."""
    patched = []
    try:
        for quantizer in dict.fromkeys(quantizers):  # a quantizer shared by two nodes is patched once
            if "forward" in vars(quantizer):
                continue  # already an instance attribute (the user's or ours): leave it alone
            original, cache = quantizer.forward, {}

            def forward(x, _original=original, _cache=cache, _q=quantizer):
                if not bool(_q.fake_quant_enabled[0]) or bool(_q.observer_enabled[0]) or torch.is_grad_enabled():
                    return _original(x)
                key = (tuple(x.shape), x.dtype, x.device)
                if key not in _cache:
                    _cache[key] = _original(x)
                return _cache[key]

            quantizer.forward = forward
            patched.append(quantizer)
        yield
    finally:
        for quantizer in patched:
            del quantizer.forward


class ErrorRecorder(CheckedInterpreter):
    """Runs the float and the quantized network side by side, in one pass per batch.

    The float path is the same graph with every quantizer bypassed. For each weighted node N
    the error is taken where N's value enters the rest of the network: after its output
    quantizer if it has one, else at N. *Propagated*: the quantized network's value there vs the
    float network's. *Isolated*: N (quantized weights) and its output quantizer applied to the
    float network's inputs of N, vs the float value. Only running sums are kept.
    """

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm, check_finite=True, what="measure_error")
        self.weighted = {node.name: info for node, info in meta.quantized_nodes(gm)}
        # the node at which each weighted node's error is taken
        self.observe_at = {info.output_quantizer or name: name for name, info in self.weighted.items()}
        self.isolated = {name: RunningError() for name in self.weighted}
        self.propagated = {name: RunningError() for name in self.weighted}

    def weights_once(self):
        """Context in which every weight quantizer of a weighted node fake-quantizes once (see
        :func:`_weights_once`): the quantized and isolated paths and all batches share the result."""
        quantizers = [self.fetch_attr(info.weight_quantizer) for info in self.weighted.values() if info.weight_quantizer]
        return _weights_once([q for q in quantizers if hasattr(q, "fake_quant_enabled")])

    def run_node(self, n: fx.Node):
        try:
            pair = self._run_pair(n)
        except FxptqatError:
            raise
        except Exception as e:
            if not self._blame_inputs:
                e.add_note(f"fxptqat measure_error: raised at {_where(n)}, on inputs shaped like the example "
                           "inputs (please report it to fxptqat if the float model runs them)")
                raise
            raise InputError(f"measure_error: {_where(n)} failed: {type(e).__name__}: {e}. {self.hint}") from e
        _check_finite(n, pair.f, "measure_error (float network)")
        _check_finite(n, pair.q, "measure_error (quantized network)")
        owner = self.observe_at.get(n.name)
        if owner is not None:
            q, iso, f = pair.q, pair.iso, pair.f
            grid = self.fetch_attr(n.target) if n.op == "call_module" else None
            if getattr(grid, "observe_range", None) is not None:
                # every consumer clamps this value (passes/fit_observers_to_clamps.py): the error
                # the network sees is between the clamped values
                q, iso, f = (v.clamp(*grid.observe_range) for v in (q, iso, f))
            sq_ref = sum_squares(f)  # shared by both
            self.propagated[owner].update(q, f, sq_ref=sq_ref)
            self.isolated[owner].update(iso, f, sq_ref=sq_ref)
            pair.iso = None
        return pair

    def _run_pair(self, n: fx.Node) -> _Pair:
        if n.op == "placeholder":
            value = super(CheckedInterpreter, self).run_node(n)
            return _Pair(value, value)
        if n.op == "output":
            return _Pair(map_arg(n.args[0], lambda a: self.env[a].q), map_arg(n.args[0], lambda a: self.env[a].f))
        if n.op == "get_attr":
            value = self.fetch_attr(n.target)
            return _Pair(value, value)
        q_args = map_arg(n.args, lambda a: self.env[a].q)
        q_kwargs = map_arg(n.kwargs, lambda a: self.env[a].q)
        f_args = map_arg(n.args, lambda a: self.env[a].f)
        f_kwargs = map_arg(n.kwargs, lambda a: self.env[a].f)
        if n.op == "call_module":
            module = self.fetch_attr(n.target)
            if n.name in self.weighted:
                q = None  # below: with the isolated value when they can share a call
            else:
                q = self.call_module(n.target, q_args, q_kwargs)
            if is_quantizer(module):
                source = self.env[n.args[0]]
                iso = module(source.iso) if source.iso is not None else None
                return _Pair(q, f_args[0], iso)
            if n.name in self.weighted:
                with _weights_float(self.fetch_attr(self.weighted[n.name].weight_quantizer)):
                    f = module(*f_args, **f_kwargs)
                # (one call on the quantized and float inputs stacked along dim 0 would fake-quantize
                # the weights once, but changes the kernel's blocking: q would no longer equal the
                # float value bit for bit when nothing is quantized)
                return _Pair(self.call_module(n.target, q_args, q_kwargs), f, module(*f_args, **f_kwargs))
        else:
            q = getattr(self, n.op)(n.target, q_args, q_kwargs)
        f = getattr(self, n.op)(n.target, f_args, f_kwargs)
        return _Pair(q, f)
