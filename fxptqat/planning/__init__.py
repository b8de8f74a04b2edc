"""Planning a training run as an FP phase followed by a QAT phase.

After Dremov, Grangier, Katharopoulos and Hannun, "Compute-Optimal Quantization-Aware Training"
(arXiv 2509.22935). A run of ``D`` tokens spends ``D_fp`` in full precision and then
``D_qat = f * D`` in QAT. Three tools:

* :func:`tokens_per_parameter_byte` and :func:`optimal_qat_fraction`: the paper's predictor
  ``f* = exp(-a / ln S)`` with ``S = D / (N * B / 8)`` and ``a = 6.7297``.
* :class:`ScalingLaw`: the paper's loss law, fitted from *your* runs (its constants are not public).
* :func:`plan_qat` / :class:`QATPlan`: FP and QAT steps plus a warmup-stable-decay LR schedule, with
  the LR cooldown either at the end of each phase (``"separate"``) or fused into QAT (``"fused"``);
  :func:`train_with_plan` runs such a plan through ``fxptqat.prepare`` and ``fxptqat.calibrate``.
"""

from .fraction import PAPER_A, optimal_qat_fraction, tokens_per_parameter_byte
from .law import BitsOption, FitInfo, LawParams, LossRecord, ScalingLaw
from .run import PlanRun, train_with_plan
from .schedule import MODES, QATPlan, plan_qat

__all__ = [
    "PAPER_A", "tokens_per_parameter_byte", "optimal_qat_fraction",
    "LawParams", "LossRecord", "FitInfo", "BitsOption", "ScalingLaw",
    "MODES", "QATPlan", "plan_qat", "PlanRun", "train_with_plan",
]
