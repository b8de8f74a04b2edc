"""Workarounds for torch 2.13 behaviour, each behind a named helper citing what it works around.

The one place for them: when torch changes, this file says what to re-check.

* :func:`release_device_cache`: torch.ao memoizes ``assert_and_get_unique_device`` per module
  with an unbounded ``functools.cache`` (pytorch/pytorch#162550 added it to speed up prepare and
  convert; the source marks it "TODO: delete"): every module ever prepared or converted, and its
  weights, would stay alive.
* :func:`exact_u8s8_kernels` / :func:`may_saturate`: without AVX-512 VNNI, fbgemm's and oneDNN's
  uint8 x int8 kernels add pairs of products in 16 bits (``vpmaddubsw``) and saturate
  (pytorch/pytorch#17458, uxlfoundation/oneDNN#717; torch's ``reduce_range`` exists for it).
  The torch runtime pins the modules that could saturate to an exact engine
  (:func:`exact_kernel_engine`), the inductor runtime refuses such a recipe
  (:func:`refuse_saturating_kernels`), the onnxruntime runtime stores uint8 weights
  (``fxptqat.lowering.onnx.weights_to_uint8``).
* :func:`x86_routes_to_fbgemm`: torch's ``x86`` engine picks fbgemm or oneDNN per module when it
  packs weights (pytorch/pytorch#83888); convs with more than 100 groups go to fbgemm's depthwise
  kernel, which saturates the same way on full-range activations.
* :func:`pin_packing_engine`: quantized convs and linears pack their weights for the *global*
  quantized engine whenever ``set_weight_bias`` runs -- at conversion, on ``copy.deepcopy``,
  ``load_state_dict`` and unpickling (pytorch/pytorch#46749, open) -- so the packing engine of a
  module cannot be chosen per module without swapping its class.
* :func:`reuse_torchlib_registry`: ``torch.onnx.export(dynamo=True)`` builds its ATen -> ONNX
  registry from torchlib on every call (``_compat.export_compat`` -> ``ONNXRegistry.from_torchlib``;
  onnxscript re-reads the source of ~500 functions with ``inspect.getsource``): 1-1.5 s of every
  onnxruntime lowering here (1.8 s the first time), whatever the model's size
  (``benchmarks/onnx_registry.py``). The export only reads the registry (it
  writes to it only for a ``custom_translation_table``, which fxptqat never passes), so one build per
  opset serves every export of the process.
* :func:`fake_quant_symbolic_shapes`: torch's fake-quant ops have no meta kernel (the ``*_cachemask``
  forwards; cf. pytorch/pytorch#157729 for ``quantize_per_tensor.tensor_qparams``). With static
  shapes FakeTensor runs the real kernel on zeros instead, but under the dynamic shapes of a
  recompile (a ragged last batch, a new sequence length) it cannot, and Dynamo breaks the graph at
  every quantizer; their backward (``*_cachemask_backward``, a C++ composite that checks
  ``numel()``) then fails to trace with symbolic sizes under AOTAutograd. Registered once, at
  ``import fxptqat``: a meta kernel for each forward (outputs shaped and strided like the input,
  as the CPU kernel makes them) and a Python-dispatcher kernel ``grad * mask`` for each backward,
  only where torch has none.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Callable, Iterator

import torch
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
import torch.fx as fx
import torch.nn as nn
from torch.ao.nn.quantized.modules.linear import LinearPackedParams
from torch.ao.quantization.fx.utils import assert_and_get_unique_device

from .config import QuantConfig
from .errors import LoweringError

__all__ = [
    "release_device_cache", "exact_u8s8_kernels", "may_saturate", "x86_routes_to_fbgemm",
    "exact_kernel_engine", "refuse_saturating_kernels", "pin_packing_engine", "packed_with",
    "CONVS", "LINEARS", "ENGINES", "fake_quant_symbolic_shapes",
]

ENGINES = ("onednn", "qnnpack")  # the engines a module can be pinned to
CONVS = (
    nnq.Conv1d, nnq.Conv2d, nnq.Conv3d, nniq.ConvReLU1d, nniq.ConvReLU2d, nniq.ConvReLU3d,
    nniq.ConvAdd2d, nniq.ConvAddReLU2d,
)
LINEARS = (nnq.Linear, nniq.LinearReLU)
_INT16_MAX = 2**15 - 1


def release_device_cache() -> None:
    """Forget the modules torch.ao's ``assert_and_get_unique_device`` cache holds; call after every
    torch.ao prepare or convert (see the module docstring)."""
    assert_and_get_unique_device.cache_clear()


def exact_u8s8_kernels() -> bool:
    """Whether this CPU has AVX-512 VNNI, with which fbgemm's and oneDNN's uint8 x int8 GEMM and
    conv kernels accumulate in 32 bits. Without it they add product pairs in 16 bits
    (``vpmaddubsw``) and saturate on 8-bit weights with full-range activations; torch documents the
    same limit as the reason for ``reduce_range``. ``torch.cpu.get_capabilities`` (torch >= 2.3)."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    return bool(capabilities and capabilities().get("avx512_vnni", False))


def may_saturate(module: nn.Module, *, act_codes: int = 255) -> bool:
    """Whether a u8 x s8 kernel that adds product pairs in int16 can saturate on this module: some
    pair of integer weights times full-range activation codes (0..``act_codes``) exceeds int16."""
    if type(module) not in (*CONVS, *LINEARS):
        return False
    weight = module.weight()
    if not weight.is_quantized:
        return False
    return 2 * act_codes * int(weight.int_repr().abs().max()) > _INT16_MAX


def x86_routes_to_fbgemm(module: nn.Module) -> bool:
    """Whether torch's x86 engine packs this quantized conv for fbgemm instead of oneDNN.

    torch 2.13 (``should_use_onednn_quant``) sends convs with more than 100 groups to fbgemm,
    whose depthwise kernel saturates 16-bit pair sums on full-range uint8 inputs.
    """
    return getattr(module, "groups", 1) > 100 and not getattr(module, "transposed", False)


def exact_kernel_engine(int8: fx.GraphModule, config: QuantConfig) -> tuple[str, Callable] | None:
    """For a torch.ao INT8 graph: the engine to pin, and which modules, so that no module runs a
    kernel that would not compute what fake-quant simulated (``passes/pack_with_engine.py``
    measures which); None where every kernel is exact already."""
    if config.engine not in ("x86", "fbgemm") or config.act_bits is None:  # weight-only: float kernels
        return None
    engines = torch.backends.quantized.supported_engines
    if not exact_u8s8_kernels():
        codes = config.act_qrange[1]
        if not any(may_saturate(m, act_codes=codes) for m in int8.modules()):
            return None
        if "qnnpack" not in engines:
            raise LoweringError(
                "lower(): this CPU has no AVX-512 VNNI, so fbgemm's and oneDNN's INT8 kernels add pairs of "
                "products in 16 bits and saturate with 8-bit weights on full-range activations, and this torch "
                "has no qnnpack engine to run them exactly. Prepare with QuantConfig(reduce_range=True) or "
                "weight_bits<=7."
            )
        return "qnnpack", lambda m: may_saturate(m, act_codes=codes)
    if config.engine == "x86" and "onednn" in engines:
        return "onednn", x86_routes_to_fbgemm
    return None


def refuse_saturating_kernels(config: QuantConfig) -> None:
    """inductor lowers to oneDNN's u8 x s8 kernels, which have no exact path without AVX-512 VNNI:
    refuse a recipe whose weights and activations can saturate their 16-bit pair sums."""
    if exact_u8s8_kernels() or config.act_bits is None:
        return
    if 2 * config.act_qrange[1] * config.weight_max_code > _INT16_MAX:
        raise LoweringError(
            f"lower(runtime='inductor'): this CPU has no AVX-512 VNNI, so oneDNN's INT8 kernels add pairs of "
            f"products in 16 bits and saturate with {config.weight_bits}-bit weights on full-range activations: "
            "the compiled model would not compute what fake-quant simulated. Prepare with "
            "QuantConfig(reduce_range=True) or weight_bits<=7, or lower with runtime='torch' or 'onnxruntime' "
            "(both run exact kernels here)."
        )


class _Pinned:
    """Mixin: weights are (re)packed under ``_engine``, whichever engine is global."""

    _engine: str

    def set_weight_bias(self, *args, **kwargs):
        previous = torch.backends.quantized.engine
        torch.backends.quantized.engine = self._engine
        try:
            return super().set_weight_bias(*args, **kwargs)
        finally:
            torch.backends.quantized.engine = previous


class _PinnedLinearParams(_Pinned):
    """A linear's packed params are a TorchScript object that ``copy.deepcopy`` repacks under the
    *global* engine (its ``__setstate__``): copy the rest, then repack through ``set_weight_bias``."""

    def __deepcopy__(self, memo):
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update({k: copy.deepcopy(v, memo) for k, v in self.__dict__.items() if k != "_packed_params"})
        new.set_weight_bias(*self._weight_bias())
        return new


def _pinned_class(cls: type, engine: str) -> type:
    # Defined at import under a module-level name, so pickling finds the class.
    name = f"{engine.capitalize()}{cls.__name__}"
    mixin = _PinnedLinearParams if cls is LinearPackedParams else _Pinned
    pinned = type(name, (mixin, cls), {"__module__": __name__, "_engine": engine})
    globals()[name] = pinned
    return pinned


_PINNED = {(cls, e): _pinned_class(cls, e) for e in ENGINES for cls in (*CONVS, LinearPackedParams)}


def _holder(module: nn.Module):
    """The object whose ``set_weight_bias`` packs: a conv itself, a linear's packed-params holder."""
    return module._packed_params if isinstance(module, LINEARS) else module


def packed_with(module: nn.Module) -> str | None:
    """The engine ``module`` (a quantized conv or linear) is pinned to, or None."""
    return getattr(_holder(module), "_engine", None)


def pin_packing_engine(module: nn.Module, engine: str) -> None:
    """Make ``module`` (a quantized conv or linear of :data:`CONVS` / :data:`LINEARS`, not pinned
    yet) pack its weights under ``engine`` now and on every later copy or reload: its packing
    object's class becomes a subclass whose ``set_weight_bias`` sets the engine around the packing."""
    holder = _holder(module)
    weight, bias = module.weight(), module.bias()
    holder.__class__ = _PINNED[(type(holder), engine)]
    module.set_weight_bias(weight, bias)


_REGISTRIES: dict = {}
_REGISTRY_LOCK = threading.RLock()


@contextlib.contextmanager
def reuse_torchlib_registry() -> Iterator[None]:
    """While active, ``ONNXRegistry.from_torchlib`` returns a copy of the registry it built first
    for the same arguments (its lists copied, so that a caller's ``register_op`` changes only its own
    copy). Without that private class (another torch), it does nothing. Exports under it run one at
    a time (the class attribute is swapped for the duration)."""
    try:
        from torch.onnx._internal.exporter import _registration

        cls = _registration.ONNXRegistry
        cls.__dict__["from_torchlib"].__func__  # noqa: B018 (is it still the classmethod we patch?)
    except (ImportError, AttributeError, KeyError):
        yield
        return

    with _REGISTRY_LOCK:  # read what to restore under the lock: another thread may have patched it
        original = cls.__dict__["from_torchlib"].__func__
        if getattr(original, "_fxptqat_reused", False):  # re-entered in this thread: already patched
            yield
            return

        def from_torchlib(klass, *args, **kwargs):
            key = (klass, args, tuple(sorted(kwargs.items())))
            built = _REGISTRIES.get(key)
            if built is None:
                built = _REGISTRIES[key] = original(klass, *args, **kwargs)
            registry = klass.__new__(klass)
            registry.__dict__.update(built.__dict__)
            registry.functions = {k: list(v) for k, v in built.functions.items()}
            return registry

        from_torchlib._fxptqat_reused = True
        cls.from_torchlib = classmethod(from_torchlib)
        try:
            yield
        finally:
            cls.from_torchlib = classmethod(original)


_CACHEMASK_FORWARDS = ("fake_quantize_per_tensor_affine_cachemask",
                       "_fake_quantize_per_tensor_affine_cachemask_tensor_qparams",
                       "fake_quantize_per_channel_affine_cachemask")
_CACHEMASK_BACKWARDS = ("fake_quantize_per_tensor_affine_cachemask_backward",
                        "fake_quantize_per_channel_affine_cachemask_backward")
_META_LIBRARY: list = []  # the torch.library.Library that holds the kernels (alive for the process)
_META_LOCK = threading.Lock()


def _cachemask_meta(x: torch.Tensor, *args) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), torch.empty_like(x, dtype=torch.bool)


def _cachemask_backward(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return grad * mask


def fake_quant_symbolic_shapes() -> list[str]:
    """Give torch's fake-quant ops what tracing with symbolic shapes needs (see the module
    docstring); idempotent. Returns the kernels registered by this call."""
    from torch._C import DispatchKey

    added = []
    with _META_LOCK:
        for name in _CACHEMASK_FORWARDS:
            if not torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{name}", "Meta"):
                if not _META_LIBRARY:
                    _META_LIBRARY.append(torch.library.Library("aten", "IMPL"))
                _META_LIBRARY[0].impl(name, _cachemask_meta, "Meta")
                added.append(f"{name}: Meta")
        for name in _CACHEMASK_BACKWARDS:
            op = getattr(torch.ops.aten, name).default
            if DispatchKey.CompositeImplicitAutograd not in op.py_kernels:
                op.py_impl(DispatchKey.CompositeImplicitAutograd)(_cachemask_backward)
                added.append(f"{name}: CompositeImplicitAutograd (Python dispatcher)")
    return added
