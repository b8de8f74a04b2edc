"""Translate a QuantConfig into torch.ao's QConfigMapping and BackendConfig.

This is the only module that knows torch.ao's configuration vocabulary; another lowering
(e.g. PT2E) would add its own translation beside it. It also holds the one observer fxptqat adds
to torch.ao's, :class:`LogHistogramObserver` (``QuantConfig(act_observer="histogram")``).
"""

from __future__ import annotations

import torch
import torch.ao.quantization.backend_config.utils  # noqa: F401  (torch 2.13 forgets this import)
import torch.nn as nn
from torch.ao.quantization import QConfig, QConfigMapping
from torch.ao.quantization.backend_config import (
    BackendConfig,
    DTypeConfig,
    get_fbgemm_backend_config,
    get_qnnpack_backend_config,
)
from torch.ao.quantization.backend_config.x86 import get_x86_backend_config
from torch.ao.quantization.fake_quantize import FixedQParamsFakeQuantize
from torch.ao.quantization.observer import (
    HistogramObserver,
    MinMaxObserver,
    PerChannelMinMaxObserver,
    PlaceholderObserver,
    UniformQuantizationObserverBase,
)
from torch.ao.quantization.qconfig import default_quint8_weight_qconfig, default_reuse_input_qconfig
from torch.ao.quantization.qconfig_mapping import _FIXED_QPARAMS_OP_TO_OBSERVER

from ..config import QuantConfig
from ..fake_quantize import FakeQuantize

__all__ = ["backend_config", "qconfig_mapping", "weight_fake_quant", "activation_fake_quant",
           "LogHistogramObserver", "RobustHistogramObserver"]

_BACKENDS = {
    "x86": get_x86_backend_config,
    "fbgemm": get_fbgemm_backend_config,
    "qnnpack": get_qnnpack_backend_config,
}
# qnnpack refuses scales below 2**-12 (its BackendConfig constraint); prepare would then
# silently leave the op in float, so every observer keeps its scale above that bound.
_EPS = {"qnnpack": 2.0**-12}
_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_WEIGHT_ONLY = DTypeConfig(
    input_dtype=torch.float, output_dtype=torch.float, weight_dtype=torch.qint8, bias_dtype=torch.float
)


def weight_fake_quant(config: QuantConfig, *, per_channel: bool | None = None):
    """Symmetric weights on ``config.weight_qrange`` (restricted or full signed range)."""
    qmin, qmax = config.weight_qrange
    per_channel = config.per_channel if per_channel is None else per_channel
    eps = _EPS.get(config.engine, torch.finfo(torch.float32).eps)
    if per_channel:
        return FakeQuantize.with_args(
            observer=PerChannelMinMaxObserver, quant_min=qmin, quant_max=qmax, dtype=torch.qint8,
            qscheme=torch.per_channel_symmetric, ch_axis=0, eps=eps,
        )
    return FakeQuantize.with_args(
        observer=MinMaxObserver, quant_min=qmin, quant_max=qmax, dtype=torch.qint8,
        qscheme=torch.per_tensor_symmetric, eps=eps,
    )


# |x| = (1 + f) * 2**(E - 127) in float32: the grid is E's octaves (2**-32 .. 2**32 kept, beyond
# them the end bins) times the top 5 bits of f, i.e. 32 bins per octave
_EXP_LOW, _OCTAVES, _SUB = -31, 64, 32
_HALF = _OCTAVES * _SUB
_KEY_BITS = 1 + 8 + 5  # sign, exponent, top mantissa bits of a float32


def _key_to_bin() -> tuple[torch.Tensor, torch.Tensor]:
    """For every 14-bit float32 key: its histogram bin, and whether it is finite."""
    key = torch.arange(1 << _KEY_BITS)
    negative, biased, top = key >> (_KEY_BITS - 1), (key >> 5) & 0xFF, key & (_SUB - 1)
    pos = (biased - 126 - _EXP_LOW).clamp(0, _OCTAVES - 1) * _SUB + top
    index = torch.where(negative == 1, _HALF - 1 - pos, _HALF + 1 + pos)
    index = torch.where(biased == 0, _HALF, index)  # zeros (and subnormals, below 1.2e-38)
    finite = biased != 0xFF
    return torch.where(finite, index, 0), finite


_BIN_OF_KEY, _FINITE_KEY = _key_to_bin()
_FLOAT_EPS = torch.finfo(torch.float32).eps


class LogHistogramObserver(UniformQuantizationObserverBase):
    """Activation observer: exact counts on a fixed grid, then HistogramObserver's L2 range search.

    torch.ao's ``HistogramObserver`` (what torchao's X86InductorQuantizer calibrates with) bins
    values linearly between the running min and max and re-bins its histogram whenever a batch
    widens that range, so its result depends on the order of the batches and cannot be merged
    exactly across processes. This observer counts every finite value in a bin of a grid fixed in
    advance -- sign, binary exponent (2**-32 .. 2**32) and 32 bins per octave (each <= 3.1% of its
    value wide: the top 14 bits of the float32; zeros get their own bin) -- and keeps the exact min
    and max. Integer counts
    and min/max do not depend on the order of the batches, and N processes sum their counts
    (``distributed.reduce_observers``) to exactly what one process over all batches holds.

    ``calculate_qparams`` spreads each bin's count uniformly over its width (the lowest and highest
    occupied bins end at the exact min and max), rebuilds the 2048-bin histogram between min and
    max that ``HistogramObserver`` searches, and runs that search (L2 quantization error, outliers
    clipped): same estimator, deterministic input. Values beyond the grid are counted in its end
    bins and stretch them to the exact min/max.
    """

    def __init__(self, dtype=torch.quint8, qscheme=torch.per_tensor_affine, reduce_range=False,
                 quant_min=None, quant_max=None, factory_kwargs=None, eps=_FLOAT_EPS,
                 is_dynamic=False, **kwargs) -> None:
        super().__init__(dtype=dtype, qscheme=qscheme, reduce_range=reduce_range, quant_min=quant_min,
                         quant_max=quant_max, factory_kwargs=factory_kwargs, eps=eps, is_dynamic=is_dynamic,
                         **kwargs)
        device = torch.nn.factory_kwargs(factory_kwargs).get("device")
        self.register_buffer("histogram", torch.zeros(2 * _HALF + 1, dtype=torch.int64, device=device))
        self.register_buffer("min_val", torch.tensor(float("inf"), device=device))
        self.register_buffer("max_val", torch.tensor(float("-inf"), device=device))
        # calculate_qparams() runs a search, and convert_fx calls it again for every quantizer at
        # lower(): the result is kept with a key of the statistics it came from
        self._qparams: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        x = x_orig.detach().float().contiguous()
        if x.numel() == 0:
            return x_orig
        low, high = torch.aminmax(x)
        if not (torch.isfinite(low) and torch.isfinite(high)):
            x = x[torch.isfinite(x)]  # as HistogramObserver: inf would make the range infinite
            if x.numel() == 0:
                return x_orig
            low, high = torch.aminmax(x)
        self.min_val.copy_(torch.minimum(self.min_val, low))
        self.max_val.copy_(torch.maximum(self.max_val, high))
        keys = (x.view(torch.int32) >> (32 - _KEY_BITS)).flatten() & ((1 << _KEY_BITS) - 1)
        counts = torch.bincount(keys, minlength=1 << _KEY_BITS)
        device = self.histogram.device
        self.histogram.index_add_(0, _BIN_OF_KEY.to(device), (counts * _FINITE_KEY.to(counts.device)).to(device))
        return x_orig

    @staticmethod
    def bin_edges() -> tuple[torch.Tensor, torch.Tensor]:
        """(lower, upper) value of every bin, ascending; the zero bin is [0, 0]."""
        k = torch.arange(_HALF, dtype=torch.float64)
        octave = torch.pow(2.0, k.div(_SUB, rounding_mode="floor") + _EXP_LOW)
        low = (0.5 + (k % _SUB) / (2 * _SUB)) * octave
        high = (0.5 + (k % _SUB + 1) / (2 * _SUB)) * octave
        zero = torch.zeros(1, dtype=torch.float64)
        return torch.cat([-high.flip(0), zero, low]), torch.cat([-low.flip(0), zero, high])

    def linear_histogram(self, bins: int) -> torch.Tensor:
        """The counts as a ``bins``-bin histogram between min_val and max_val."""
        lo, hi = float(self.min_val), float(self.max_val)
        counts = self.histogram.cpu().double()
        occupied = counts > 0
        low, high = (t[occupied] for t in self.bin_edges())
        counts = counts[occupied]
        low[0], high[-1] = lo, hi
        low, high = low.clamp(lo, hi), high.clamp(lo, hi)
        edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
        below = torch.cat([torch.zeros(1, dtype=torch.float64), counts.cumsum(0)])
        k = (torch.searchsorted(low, edges, right=True) - 1).clamp(min=0)  # the bin an edge falls in
        width = high[k] - low[k]
        frac = torch.where(width > 0, (edges - low[k]) / width.clamp(min=1e-300), torch.ones_like(edges))
        frac = torch.where(edges < low[0], torch.zeros_like(edges), frac.clamp(0, 1))
        cdf = below[k] + counts[k] * frac
        cdf[0], cdf[-1] = 0.0, below[-1]  # a point mass at min_val (e.g. ReLU zeros) lands in bin 0
        return (cdf[1:] - cdf[:-1]).clamp(min=0).float()

    def calculate_qparams(self):
        weights = torch.arange(1, self.histogram.numel() + 1, device=self.histogram.device, dtype=self.histogram.dtype)
        key = (float(self.min_val), float(self.max_val), self.histogram.sum().item(), (self.histogram @ weights).item(),
               self.min_val.device)
        if self._qparams is None or self._qparams[0] != key:
            self._qparams = (key, self._search())
        return tuple(t.clone() for t in self._qparams[1])

    def _search(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.min_val == float("inf"):
            return torch.tensor([1.0]), torch.tensor([0])  # never observed: torch.ao's default
        if self.min_val == self.max_val:
            return self._calculate_qparams(self.min_val, self.max_val)
        search = HistogramObserver(dtype=self.dtype, qscheme=self.qscheme, quant_min=self.quant_min,
                                   quant_max=self.quant_max, eps=float(self.eps))
        search.histogram = self.linear_histogram(search.bins)
        search.min_val, search.max_val = self.min_val.detach().cpu().clone(), self.max_val.detach().cpu().clone()
        scale, zero_point = search.calculate_qparams()
        return scale.to(self.min_val.device), zero_point.to(self.min_val.device)

    def all_reduce_statistics(self) -> None:
        """SUM of the integer counts, MIN/MAX of min/max over torch.distributed ranks: exact."""
        torch.distributed.all_reduce(self.histogram, op=torch.distributed.ReduceOp.SUM)
        torch.distributed.all_reduce(self.min_val, op=torch.distributed.ReduceOp.MIN)
        torch.distributed.all_reduce(self.max_val, op=torch.distributed.ReduceOp.MAX)

    def extra_repr(self) -> str:
        return f"min_val={float(self.min_val)}, max_val={float(self.max_val)}, values={int(self.histogram.sum())}"


class RobustHistogramObserver(LogHistogramObserver):
    """:class:`LogHistogramObserver` whose L2 range search is not ruled by a few exploding samples.

    The plain search minimises the squared quantization error summed over every value calibration
    saw, so a sample (dim 0 of the observed tensor: the batch) whose activations are 100x the others'
    carries 10,000x their weight: the range is stretched to hold it and the other samples round to a
    few codes, or to zero (random-weight EfficientNets, and any network some inputs drive far out of
    range). Here each sample of a batch whose mean square is above the batch's median one counts as
    that median sample would: its values are counted with weight ``2**-k``, ``k`` its mean square's
    ratio to the median's in octaves (rounded). Samples at or below the median keep weight 1, so a
    batch of similar samples (or a batch of one) gives exactly ``LogHistogramObserver``'s counts.

    Every count is an integer times a power of two, so the float64 sums are exact (the result does not
    depend on the order of the batches, and torch.distributed ranks reduce it exactly) as long as one
    bin's counts span fewer than 53 bits. It does depend on which samples share a batch: the median
    is the batch's.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.histogram = self.histogram.double()

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        x = x_orig.detach().float().contiguous()
        if x.numel() == 0:
            return x_orig
        samples = x.reshape(x.shape[0], -1) if x.dim() >= 2 else x.reshape(1, -1)
        finite = torch.isfinite(samples)
        if not bool(finite.any()):
            return x_orig
        values = samples[finite] if not bool(finite.all()) else samples.reshape(-1)
        low, high = torch.aminmax(values)
        self.min_val.copy_(torch.minimum(self.min_val, low))
        self.max_val.copy_(torch.maximum(self.max_val, high))
        weight = self.sample_weights(torch.where(finite, samples, 0.0), finite)
        weight = weight[:, None].expand_as(samples)[finite] if not bool(finite.all()) else \
            weight.repeat_interleave(samples.shape[1])
        keys = (values.view(torch.int32) >> (32 - _KEY_BITS)) & ((1 << _KEY_BITS) - 1)
        counts = torch.bincount(keys, weights=weight, minlength=1 << _KEY_BITS)
        device = self.histogram.device
        self.histogram.index_add_(0, _BIN_OF_KEY.to(device), (counts * _FINITE_KEY.to(counts.device)).to(device))
        return x_orig

    @staticmethod
    def sample_weights(samples: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
        """Per row of ``samples`` (float64): ``2**-k``, k = round(log2(mean square / batch median)), k >= 0."""
        energy = samples.double().square().sum(1) / finite.sum(1).clamp(min=1)
        median = energy.median()
        if samples.shape[0] < 2 or not float(median) > 0:
            return torch.ones_like(energy)
        octaves = torch.log2(energy / median).round().clamp(min=0)
        return torch.exp2(-octaves)


# QuantConfig.act_observer -> torch.ao observer class
ACT_OBSERVERS = {"minmax": MinMaxObserver, "histogram": LogHistogramObserver, "ao_histogram": HistogramObserver,
                 "robust_histogram": RobustHistogramObserver}


def activation_fake_quant(config: QuantConfig):
    """Asymmetric per-tensor uint8 observed by ``config.act_observer``, or a float placeholder."""
    if config.act_bits is None:
        return PlaceholderObserver.with_args(dtype=torch.float)
    qmin, qmax = config.act_qrange
    eps = _EPS.get(config.engine, torch.finfo(torch.float32).eps)
    return FakeQuantize.with_args(
        observer=ACT_OBSERVERS[config.act_observer], quant_min=qmin, quant_max=qmax, dtype=torch.quint8,
        qscheme=torch.per_tensor_affine, eps=eps,
    )


_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
# quantized_ops="weighted": conv/linear, plus the BN and ReLU that torch.ao fuses into them (it fuses
# conv-bn-relu only when all three share a qconfig)
_WEIGHTED_OPS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, torch.nn.functional.conv1d,
                 torch.nn.functional.conv2d, torch.nn.functional.conv3d, torch.nn.functional.linear,
                 nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.ReLU, torch.nn.functional.relu)


def qconfig_mapping(config: QuantConfig) -> QConfigMapping:
    act = activation_fake_quant(config)
    weight = weight_fake_quant(config)
    qconfig = QConfig(activation=act, weight=weight)
    weighted_only = config.weighted_only
    mapping = QConfigMapping().set_global(None if weighted_only else qconfig)
    if weighted_only:
        for op in _WEIGHTED_OPS:
            mapping.set_object_type(op, qconfig)
    # Embeddings take integer indices; torch.ao only quantizes them weight-only with float qparams,
    # a scheme fxptqat does not simulate: they stay float.
    for op in (nn.Embedding, nn.EmbeddingBag):
        mapping.set_object_type(op, None)
    if config.act_bits is None:
        return mapping
    # Transposed convs stay float: torch.ao 2.13 has no QAT module for them, so their weights would
    # run unquantized in fake-quant and quantized by convert_fx (a ConvTranspose2d lowered 224 steps
    # away from what was simulated; check_parity's op checks found it).
    for op in _TRANSPOSED:
        mapping.set_object_type(op, None)
    if weighted_only:
        return mapping
    float_weight = QConfig(activation=act, weight=PlaceholderObserver.with_args(dtype=torch.float))
    mapping.set_object_type(nn.LayerNorm, float_weight)
    mapping.set_object_type(torch.nn.functional.layer_norm, float_weight)
    mapping.set_object_type("reshape", default_reuse_input_qconfig)
    # convert_fx builds QuantizedPReLU from this observer (1-D slope, per-tensor uint8); lowering
    # then replaces that module by a float PReLU (passes/replace_quantized_prelu.py).
    mapping.set_object_type(nn.PReLU, QConfig(activation=act, weight=default_quint8_weight_qconfig.weight))
    for op, observer in _FIXED_QPARAMS_OP_TO_OBSERVER.items():
        fixed = FixedQParamsFakeQuantize.with_args(observer=observer)
        mapping.set_object_type(op, QConfig(activation=fixed, weight=weight))
    return mapping


def backend_config(config: QuantConfig) -> BackendConfig:
    backend = _BACKENDS[config.engine]()
    if config.act_bits is None:
        for pattern in backend.configs:
            if pattern.root_module in _WEIGHTED or pattern.qat_module is not None:
                pattern.add_dtype_config(_WEIGHT_ONLY)
    return backend
