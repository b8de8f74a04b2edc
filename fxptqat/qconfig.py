"""Translate a QuantConfig into torch.ao's QConfigMapping and BackendConfig.

This is the only module that knows torch.ao's configuration vocabulary; another lowering
(e.g. PT2E) would add its own translation beside it.
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
    MinMaxObserver,
    PerChannelMinMaxObserver,
    PlaceholderObserver,
)
from torch.ao.quantization.qconfig import default_quint8_weight_qconfig, default_reuse_input_qconfig
from torch.ao.quantization.qconfig_mapping import _FIXED_QPARAMS_OP_TO_OBSERVER

from .config import QuantConfig
from .fake_quantize import FakeQuantize

__all__ = ["backend_config", "qconfig_mapping", "weight_fake_quant", "activation_fake_quant"]

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
    """Symmetric weights on the restricted range [-(2^(b-1)-1), 2^(b-1)-1]."""
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


def activation_fake_quant(config: QuantConfig):
    """Asymmetric per-tensor uint8 (min/max: order-independent), or a float placeholder."""
    if config.act_bits is None:
        return PlaceholderObserver.with_args(dtype=torch.float)
    qmin, qmax = config.act_qrange
    eps = _EPS.get(config.engine, torch.finfo(torch.float32).eps)
    return FakeQuantize.with_args(
        observer=MinMaxObserver, quant_min=qmin, quant_max=qmax, dtype=torch.quint8,
        qscheme=torch.per_tensor_affine, eps=eps,
    )


_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
# quantized_ops="weighted": conv/linear, plus the BN and ReLU that torch.ao fuses into them (it fuses
# conv-bn-relu only when all three share a qconfig)
_WEIGHTED_OPS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, *_TRANSPOSED, nn.Linear, torch.nn.functional.conv1d,
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
    # fbgemm/x86 transposed convs only take per-tensor weights (pytorch/pytorch#47535).
    transpose = QConfig(activation=act, weight=weight_fake_quant(config, per_channel=False))
    for op in _TRANSPOSED:
        mapping.set_object_type(op, transpose)
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
