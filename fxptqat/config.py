"""Validated, keyword-only configuration dataclasses."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
from collections.abc import Mapping
from typing import Any

import torch.nn as nn

from .errors import ConfigError

__all__ = ["QuantConfig", "ENGINES", "QUANTIZED_OPS", "WEIGHT_RANGES", "ACT_OBSERVERS", "strict_options", "check_finite"]

# onednn is left out: its conv-bn-add-relu fusion pattern cannot be prepared for QAT in torch 2.13
# ("Cannot fuse train modules").
ENGINES = ("x86", "fbgemm", "qnnpack")
QUANTIZED_OPS = ("all", "weighted")
WEIGHT_RANGES = ("restricted", "full")
ACT_OBSERVERS = ("minmax", "histogram", "ao_histogram", "robust_histogram")


def strict_options(cls):
    """Class decorator: unknown keyword arguments raise ConfigError with a "did you mean"."""
    init = cls.__init__
    names = [f.name for f in dataclasses.fields(cls)]
    keyword_only = all(f.kw_only is True for f in dataclasses.fields(cls))

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        if args and keyword_only:
            raise ConfigError(f"{cls.__name__} takes keyword options only, e.g. {cls.__name__}({names[0]}=...).")
        for key in kwargs:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ConfigError(
                    f"{cls.__name__} has no option {key!r}.{hint} Valid options: {', '.join(names)}."
                )
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


def check_finite(owner: str, name: str, value: Any, *, minimum: float | None = None) -> float:
    """Return ``value`` as float, or raise ConfigError if it is not a finite number >= minimum."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{owner}: {name} must be a number, got {type(value).__name__} {value!r}.")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"{owner}: {name} must be finite, got {value}.")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{owner}: {name} must be >= {minimum}, got {value}.")
    return value


def _choice(owner: str, name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{owner}: {name}={value!r} is not supported.{hint} Choose one of {allowed}.")


@strict_options
@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """How to quantize a model.

    weight_bits: 2-8; weights are symmetric (zero point 0), scale per output channel or per tensor.
    weight_range: "restricted" (default): integers ``[-(2**(b-1) - 1), 2**(b-1) - 1]``, scale
        ``max|w| / (2**(b-1) - 1)``, a grid symmetric about zero; "full": ``[-2**(b-1), 2**(b-1) - 1]``,
        scale ``max|w| / (2**(b-1) - 0.5)`` (torch.ao's symmetric observers on the whole signed range:
        the grid of torchao's X86InductorQuantizer at 8 bits): a step 1/(2**b - 2) finer (0.4% at 8 bits,
        7% at 4), and the largest positive weight of a channel may be clipped by half a step.
        Every runtime lowers either grid exactly.
    act_bits: 8 (asymmetric per-tensor uint8) or None (weight-only, activations stay float).
    per_channel: per-output-channel weight scales (default) or one scale per tensor.
    engine: torch.ao backend: "x86" (default), "fbgemm" or "qnnpack".
    reduce_range: use 7-bit activations (needed on CPUs without VNNI for fbgemm/x86 kernels).
    quantized_ops: "all" (default): every op torch.ao can quantize runs on INT8 activations
        (adds, pooling, GELU, softmax, layer norm, matmul, ...); "weighted": only conv and linear
        layers are quantized (inputs and weights), everything between them stays float, and so
        does a conv/linear output that no other conv/linear reads as its input
        (``passes/drop_output_quantizers.py``) -- the recipe of torchao's X86InductorQuantizer,
        lowered with ``runtime="inductor"`` (which fuses the float ops into the INT8 kernels) or
        ``runtime="onnxruntime"``; ``runtime="torch"`` refuses it (torch.ao's convert_fx lowers
        float ops between quantized layers unreliably).
    act_observer: how calibration sets each activation quantizer's range. "minmax" (default): the
        observed min and max, every calibration value representable; "histogram": torch.ao
        HistogramObserver's L2 range search (the estimator torchao's X86InductorQuantizer
        calibrates with: tails that cost more range than they are worth are clipped), run on exact
        counts over a fixed log-scale grid (``qconfig.LogHistogramObserver``), so the result does
        not depend on the order of the batches and torch.distributed ranks reduce it exactly (equal
        or better fidelity than minmax on every model measured, benchmarks/fidelity_probe.py);
        "ao_histogram": torch.ao's ``HistogramObserver`` itself, whose result
        depends on the order of the batches and which calibration refuses under torch.distributed;
        "robust_histogram": "histogram" with each sample of a calibration batch whose activations'
        mean square is above the batch median's counted as the median sample would (weight
        ``2**-octaves`` above it, ``qconfig.RobustHistogramObserver``), so a few samples whose
        activations explode do not stretch the range until the others round to zero (measured:
        random EfficientNet-V2-M at W8A8, cosine to FP32 0.90 against 0.01 with "histogram" and
        0.08 with PT2E's; the zoo benchmark's weighted recipe uses it). Calibrate with batches of
        several samples: a batch of one is counted as "histogram" counts it.
    bias_correction: after calibration has fixed every quantizer, one more pass over the same batches
        measures, per output channel of every conv/linear, the mean shift that rounding its weights
        causes on the (quantized) calibration inputs, and adds it to the layer's bias (a fused
        BatchNorm's bias): empirical bias correction (Nagel et al. 2019), as OpenVINO and AIMET run by
        default (:mod:`fxptqat.bias_correction`). Improves output fidelity most where channels sum few
        weights (depthwise / grouped convs) and at low weight bits. A layer without a bias parameter
        is left alone (no parameter is ever added).
    leaf_modules: module classes (or qualified names) that tracing keeps as opaque calls.
    concrete_args: passed to ``torch.fx.Tracer.trace`` to specialise arguments (e.g. flags).
    """

    weight_bits: int = 8
    weight_range: str = "restricted"
    act_bits: int | None = 8
    per_channel: bool = True
    engine: str = "x86"
    reduce_range: bool = False
    quantized_ops: str = "all"
    act_observer: str = "minmax"
    bias_correction: bool = False
    leaf_modules: tuple[type[nn.Module] | str, ...] = ()
    concrete_args: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        owner = "QuantConfig"
        if isinstance(self.weight_bits, bool) or not isinstance(self.weight_bits, int):
            raise ConfigError(f"{owner}: weight_bits must be an int in 2..8, got {self.weight_bits!r}.")
        if not 2 <= self.weight_bits <= 8:
            raise ConfigError(
                f"{owner}: weight_bits={self.weight_bits} is out of range; fxptqat lowers to INT8 "
                "kernels, so weights take 2 to 8 bits."
            )
        if self.act_bits is not None and (type(self.act_bits) is not int or self.act_bits != 8):
            raise ConfigError(
                f"{owner}: act_bits={self.act_bits!r} is not supported: use 8 (INT8 activations) "
                "or None (weight-only, float activations)."
            )
        for name in ("per_channel", "reduce_range", "bias_correction"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{owner}: {name} must be True or False, got {getattr(self, name)!r}.")
        _choice(owner, "engine", self.engine, ENGINES)
        _choice(owner, "quantized_ops", self.quantized_ops, QUANTIZED_OPS)
        _choice(owner, "weight_range", self.weight_range, WEIGHT_RANGES)
        _choice(owner, "act_observer", self.act_observer, ACT_OBSERVERS)
        leaves = self.leaf_modules
        if isinstance(leaves, (str, type)):
            leaves = (leaves,)
        try:
            leaves = tuple(leaves)
        except TypeError as e:
            raise ConfigError(
                f"{owner}: leaf_modules must be a tuple of module classes or names, got {leaves!r}."
            ) from e
        for leaf in leaves:
            if not (isinstance(leaf, str) or (isinstance(leaf, type) and issubclass(leaf, nn.Module))):
                raise ConfigError(
                    f"{owner}: leaf_modules holds {leaf!r}; give nn.Module subclasses or qualified "
                    "module names such as 'backbone.block1'."
                )
        object.__setattr__(self, "leaf_modules", leaves)
        if self.concrete_args is not None and not isinstance(self.concrete_args, Mapping):
            raise ConfigError(f"{owner}: concrete_args must map argument names to values.")

    @property
    def weight_qrange(self) -> tuple[int, int]:
        """The integer range of weights (``weight_range``)."""
        top = 2 ** (self.weight_bits - 1) - 1
        return (-top if self.weight_range == "restricted" else -top - 1), top

    @property
    def weight_max_code(self) -> int:
        """The largest magnitude a weight integer takes."""
        return max(-self.weight_qrange[0], self.weight_qrange[1])

    @property
    def weighted_only(self) -> bool:
        """Activations are quantized only at conv/linear inputs (``quantized_ops="weighted"`` with
        INT8 activations; weight-only graphs quantize no activation either way)."""
        return self.quantized_ops == "weighted" and self.act_bits is not None

    @property
    def act_qrange(self) -> tuple[int, int] | None:
        if self.act_bits is None:
            return None
        return (0, 127) if self.reduce_range else (0, 255)
