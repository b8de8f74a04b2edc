"""What a runtime is, and what every lowered model exposes (no runtime imported here).

A runtime (:class:`Runtime`) turns a calibrated fake-quant graph into a lowered model and owns the
options it takes (:class:`Option`): the registry (:mod:`fxptqat.lowering.registry`) refuses an
option given to a runtime that does not take it and lets the owner validate the value.

A lowered model is either a GraphModule that runs its own graph (the ``torch`` runtime), or an
object of the :class:`LoweredModel` protocol: ``runtime``, ``size_bytes``, and ``reference``, the
graph of float ops between quantize/dequantize pairs it was made from. :func:`describe` gives both
the same face (:class:`Lowered`) for :func:`fxptqat.check_parity` and users.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
import torch.fx as fx

from ..errors import LoweringError
from ..inputs import as_args

__all__ = [
    "Option", "Runtime", "LoweredModel", "Lowered", "describe", "quantized_engine", "EXAMPLE_INPUTS",
]


@dataclasses.dataclass(frozen=True)
class Option:
    """A keyword option of :func:`fxptqat.lower`. ``check`` gets the value the user gave (never
    None) and returns it validated, raising a :class:`fxptqat.FxptqatError`; ``plural`` words the
    refusal ("example_inputs only apply to ..." / "threads only applies to ...")."""

    name: str
    check: Callable[[Any], Any]
    plural: bool = False


@dataclasses.dataclass(frozen=True)
class Runtime:
    """``lower(qat, config, **options)`` returns the lowered model; ``qat`` is left unchanged."""

    name: str
    lower: Callable[..., Any]
    options: tuple[Option, ...] = ()


class LoweredModel(Protocol):
    """A lowered model that runs outside its reference graph (onnxruntime, inductor)."""

    runtime: str
    reference: fx.GraphModule | None  # what check_parity compares node by node; None: dropped

    @property
    def size_bytes(self) -> int: ...

    def __call__(self, *args): ...


@dataclasses.dataclass(frozen=True)
class Lowered:
    """Any lowered model, as parity and users read it."""

    runtime: str
    model: Callable  # what lower() returned
    graph: fx.GraphModule  # compared node by node with the fake-quant graph

    @property
    def runs_graph(self) -> bool:
        """Whether calling the model runs ``graph`` itself (else its network output is compared)."""
        return self.model is self.graph

    @property
    def size_bytes(self) -> int:
        """What one would ship: the runtime's own count, or ``torch.save`` of the state dict (for
        torch.ao's INT8 modules: the packed int8 weights and their qparams)."""
        if not self.runs_graph and hasattr(self.model, "size_bytes"):
            return self.model.size_bytes
        buffer = io.BytesIO()
        torch.save(self.graph.state_dict(), buffer)
        return buffer.tell()

    def graph_copy(self, engine: str) -> fx.GraphModule:
        """``graph`` copied under ``engine``, for a parity run: oneDNN keeps the primitive built
        for the first batch shape it sees, so a run at one batch size would slow the user's model
        down at another (measured: batch 1 2x slower after a batch-8 check); the copy repacks."""
        with quantized_engine(engine):
            return copy.deepcopy(self.graph)


def describe(model) -> Lowered | None:
    """The :class:`Lowered` face of what :func:`fxptqat.lower` returned; None for anything else."""
    # by attribute, not isinstance(model, LoweredModel): before Python 3.12 that evaluates every
    # property of the protocol, and an inductor model's size_bytes serializes its weights
    runtime, reference = getattr(model, "runtime", None), getattr(model, "reference", None)
    if isinstance(runtime, str) and isinstance(reference, fx.GraphModule) and callable(model):
        return Lowered(runtime, model, reference)
    if isinstance(model, fx.GraphModule):
        return Lowered("torch", model, model)
    compiled = _compiled_fake_quant_graph(model)
    if compiled is not None:
        from .reference import reference  # the graph backend="fxptqat" lowers to INT8 kernels

        return Lowered("compiled", model, reference(compiled, compiled.meta[_meta_key()].config))
    return None


def _meta_key() -> str:
    from ..meta import KEY

    return KEY


def _compiled_fake_quant_graph(model) -> fx.GraphModule | None:
    """The fxptqat graph inside ``torch.compile(qat, ...)`` (an OptimizedModule), else None. Under
    ``torch.no_grad()`` ``backend="fxptqat"`` runs it on INT8 kernels; any other backend runs the
    fake-quant arithmetic, which parity then checks against the same reference graph."""
    orig = getattr(model, "_orig_mod", None)
    if isinstance(orig, fx.GraphModule) and callable(model) and _meta_key() in getattr(orig, "meta", {}):
        return orig
    return None


@contextlib.contextmanager
def quantized_engine(engine: str) -> Iterator[None]:
    """Select torch's quantized engine for weight packing, restoring the previous one."""
    if engine not in torch.backends.quantized.supported_engines:
        raise LoweringError(
            f"engine {engine!r} is not built into this torch "
            f"(supported: {torch.backends.quantized.supported_engines}); choose another QuantConfig(engine=...)."
        )
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


EXAMPLE_INPUTS = Option(
    "example_inputs", lambda value: as_args(value, what="lower(example_inputs=...)"), plural=True)
