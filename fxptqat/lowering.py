"""torch.ao lowering of a fake-quant graph to INT8 kernels (the one place that calls convert_fx)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
import torch.fx as fx
from torch.ao.quantization.fx.utils import assert_and_get_unique_device
from torch.ao.quantization.quantize_fx import _convert_to_reference_decomposed_fx, convert_fx

from .capture.qconfig import backend_config
from .config import QuantConfig
from .errors import LoweringError

__all__ = ["convert", "reference", "quantized_engine", "x86_routes_to_fbgemm", "exact_u8s8_kernels"]


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


def convert(qat: fx.GraphModule, config: QuantConfig) -> fx.GraphModule:
    """Copy ``qat`` and convert the copy; ``qat`` itself is not changed."""
    work = copy.deepcopy(qat).eval()
    with quantized_engine(config.engine):
        try:
            return convert_fx(work, backend_config=backend_config(config))
        except Exception as e:
            raise LoweringError(f"torch.ao convert_fx failed: {type(e).__name__}: {e}") from e
        finally:
            assert_and_get_unique_device.cache_clear()  # it would keep ``work`` alive


def reference(qat: fx.GraphModule, config: QuantConfig) -> fx.GraphModule:
    """Copy ``qat`` and convert the copy to torch.ao's *reference* form with decomposed
    quantize/dequantize ops (``quantized_decomposed``): float ops between Q/DQ pairs that carry the
    fake-quant graph's scales and zero points -- the input of other runtimes (ONNX)."""
    work = copy.deepcopy(qat).eval()
    try:
        return _convert_to_reference_decomposed_fx(work, backend_config=backend_config(config))
    except Exception as e:
        raise LoweringError(f"torch.ao reference conversion failed: {type(e).__name__}: {e}") from e
    finally:
        assert_and_get_unique_device.cache_clear()


def x86_routes_to_fbgemm(module: torch.nn.Module) -> bool:
    """Whether torch's x86 engine packs this quantized conv for fbgemm instead of oneDNN.

    torch 2.13 (``should_use_onednn_quant``) sends convs with more than 100 groups to fbgemm,
    whose depthwise kernel saturates 16-bit pair sums on full-range uint8 inputs.
    """
    return getattr(module, "groups", 1) > 100 and not getattr(module, "transposed", False)


def exact_u8s8_kernels() -> bool:
    """Whether this CPU has AVX-512 VNNI, with which fbgemm's and oneDNN's uint8 x int8 GEMM and
    conv kernels accumulate in 32 bits. Without it they add product pairs in 16 bits
    (``vpmaddubsw``) and saturate on 8-bit weights with full-range activations; torch documents the
    same limit as the reason for ``reduce_range``. ``torch.cpu.get_capabilities`` (torch >= 2.3)."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    return bool(capabilities and capabilities().get("avx512_vnni", False))
