"""fxptqat: hybrid PTQ + QAT for PyTorch as torch.fx graph passes.

    import fxptqat as fq
    qat = fq.prepare(model, example_inputs, config=fq.QuantConfig(weight_bits=4, act_bits=8))
    fq.calibrate(qat, batches)
    report = fq.measure_error(qat, batches)
    selection = fq.select_trainable(qat, report, policy=fq.Threshold(0.01))
    ...  # fine-tune: only selected parameters require grad
    int8 = fq.lower(qat)
    parity = fq.check_parity(qat, int8, batches)
"""

from .api import (
    apply_selection,
    calibrate,
    check_parity,
    finetune,
    lower,
    measure_error,
    prepare,
    reapply_selection,
    select_trainable,
)
from .config import QuantConfig
from .errors import (
    CalibrationError,
    ConfigError,
    FxptqatError,
    InputError,
    LoweringError,
    SelectionError,
    StageError,
    TraceError,
)
from .fake_quantize import FakeQuantize
from .parity import ParityReport, ParityRow
from .persistence import load, save
from .report import ErrorReport, ErrorRow
from .selection import Adaptive, AllLayers, Count, Fraction, NoLayers, Random, Selection, Threshold
from .stats import ErrorStats

__version__ = "0.1.0"

__all__ = [
    "prepare", "calibrate", "measure_error", "select_trainable", "apply_selection", "reapply_selection",
    "finetune", "lower", "save", "load",
    "check_parity", "QuantConfig", "FakeQuantize", "ErrorReport", "ErrorRow", "ErrorStats",
    "ParityReport", "ParityRow", "Selection", "Threshold", "Fraction", "Count", "Random", "AllLayers",
    "NoLayers", "Adaptive", "FxptqatError", "ConfigError", "InputError", "TraceError", "StageError",
    "CalibrationError", "SelectionError", "LoweringError",
]
