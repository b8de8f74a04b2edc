"""fxptqat's FakeQuantize: torch.ao compatible, with a frozen path that is plain tensor code.

torch.ao's ``FakeQuantize.forward`` reads its on/off switches from uint8 buffers
(``if self.observer_enabled[0] == 1``) and lives in a file Dynamo skips, so a model full of
them gets one graph break per quantizer under ``torch.compile``. This subclass keeps the
buffers (``convert_fx``, DDP and ``state_dict`` use them) but mirrors them in Python bools
that ``forward`` branches on; once frozen, ``forward`` is a single
``torch.fake_quantize_per_{tensor,channel}_affine`` call, which Dynamo traces without a break.
Gradients are the straight-through estimator of those ops (pass-through inside the clamp range).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.ao.quantization import FakeQuantize as _AOFakeQuantize
from torch.ao.quantization import FakeQuantizeBase
from torch.ao.quantization.observer import (
    FixedQParamsObserver,
    MinMaxObserver,
    ObserverBase,
    PerChannelMinMaxObserver,
)

from .workarounds import fake_quant_symbolic_shapes

__all__ = ["FakeQuantize", "is_quantizer"]

fake_quant_symbolic_shapes()  # tracing under dynamic shapes without a break per quantizer (workarounds.py)


def is_quantizer(module) -> bool:
    """A module that observes or fake-quantizes a value: fxptqat's FakeQuantize, and what the
    capture leaves of torch.ao's own (the fixed-qparams quantizers of sigmoid/softmax, the
    placeholders of weight-only recipes)."""
    return isinstance(module, (FakeQuantizeBase, ObserverBase))


class FakeQuantize(_AOFakeQuantize):
    """A ``torch.ao.quantization.FakeQuantize`` whose switches are Python bools.

    ``frozen`` means: observer off, fake-quant on, scale and zero point fixed. Nothing but
    :meth:`freeze` / :meth:`enable_observer` changes it; flags are restored from the buffers
    when a ``state_dict`` is loaded.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._observe = bool(self.observer_enabled[0])
        self._fake_quant = bool(self.fake_quant_enabled[0])
        # (low, high): the observer sees values clamped to this range. Set by
        # passes/fit_observers_to_clamps.py where every consumer clamps the value anyway.
        self.observe_range: tuple[float, float] | None = None

    # -- switches: keep the buffers (used by torch.ao and DDP) and the bools in step ------------
    @torch.jit.unused
    def enable_fake_quant(self, enabled: bool = True) -> None:
        super().enable_fake_quant(enabled)
        self._fake_quant = bool(enabled)

    @torch.jit.unused
    def enable_observer(self, enabled: bool = True) -> None:
        super().enable_observer(enabled)
        self._observe = bool(enabled)

    @property
    def frozen(self) -> bool:
        """Observer off and fake-quant on: the quantizer computes a fixed function."""
        return self._fake_quant and not self._observe

    def update_qparams(self) -> None:
        """Copy the observer's current scale and zero point into the buffers."""
        scale, zero_point = self.calculate_qparams()
        if self.scale.shape != scale.shape:
            self.scale.resize_(scale.shape)
            self.zero_point.resize_(zero_point.shape)
        self.scale.copy_(scale.to(self.scale.device))
        self.zero_point.copy_(zero_point.to(self.zero_point.device))

    def freeze(self) -> None:
        """Fix scale and zero point from the observer's statistics and stop observing."""
        self.update_qparams()
        self.enable_observer(False)
        self.enable_fake_quant(True)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        if self._observe:
            seen = X.detach()
            if self.observe_range is not None:
                seen = seen.clamp(*self.observe_range)
            self.activation_post_process(seen)
            if not self._fake_quant:
                # Calibration: statistics only; freeze() computes qparams once at the end.
                return X
            self.update_qparams()  # classic QAT (observe + fake-quant): torch.ao semantics
        elif not self._fake_quant:
            return X
        if self.is_per_channel:
            return torch.fake_quantize_per_channel_affine(
                X, self.scale, self.zero_point, self.ch_axis, self.quant_min, self.quant_max
            )
        return torch.fake_quantize_per_tensor_affine(
            X, self.scale, self.zero_point, self.quant_min, self.quant_max
        )

    def reset_statistics(self) -> None:
        """Forget what the observer has seen (its min/max or histogram)."""
        self.activation_post_process.reset_min_max_vals()

    def observe(self, x: torch.Tensor) -> None:
        """Add ``x`` to the observer's statistics without quantizing anything."""
        self.activation_post_process(x.detach())

    # -- statistics across torch.distributed ranks -------------------------------------------------
    def reducible_across_ranks(self) -> bool:
        """Whether :meth:`all_reduce_statistics` can merge this observer's statistics exactly."""
        obs = self.activation_post_process
        return hasattr(obs, "all_reduce_statistics") or isinstance(
            obs, (MinMaxObserver, PerChannelMinMaxObserver, FixedQParamsObserver))  # the last: nothing to reduce

    def all_reduce_statistics(self) -> None:
        """Replace the observer's statistics by those of every rank together (exact, any rank order):
        MIN/MAX of min/max; an observer with its own ``all_reduce_statistics`` (exact histograms)
        reduces itself. Observers that cannot be merged are left alone (see reducible_across_ranks)."""
        obs = self.activation_post_process
        if hasattr(obs, "all_reduce_statistics"):
            obs.all_reduce_statistics()
        elif isinstance(obs, (MinMaxObserver, PerChannelMinMaxObserver)):
            dist.all_reduce(obs.min_val, op=dist.ReduceOp.MIN)
            dist.all_reduce(obs.max_val, op=dist.ReduceOp.MAX)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._observe = bool(self.observer_enabled[0])
        self._fake_quant = bool(self.fake_quant_enabled[0])
