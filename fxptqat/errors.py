"""Typed errors. Every message says what failed, where, why, and how to fix it."""

from __future__ import annotations

__all__ = [
    "FxptqatError",
    "ConfigError",
    "InputError",
    "TraceError",
    "StageError",
    "CalibrationError",
    "SelectionError",
    "LoweringError",
]


class FxptqatError(Exception):
    """Base class of every error fxptqat raises on purpose."""


class ConfigError(FxptqatError, ValueError):
    """An option has a wrong name, type or value."""


class InputError(FxptqatError, TypeError):
    """A model, example inputs or batches are not what the call needs."""


class TraceError(FxptqatError):
    """torch.fx could not trace the model, or the traced graph failed on the example inputs."""


class StageError(FxptqatError):
    """Pipeline calls came out of order (e.g. ``lower`` before ``calibrate``)."""


class CalibrationError(FxptqatError):
    """Calibration or error measurement saw no data or non-finite values."""


class SelectionError(FxptqatError):
    """A policy, report or selection does not fit the graph it is applied to."""


class LoweringError(FxptqatError):
    """torch.ao could not lower the fake-quant graph to INT8."""
