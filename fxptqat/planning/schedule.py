"""QATPlan: FP and QAT steps plus a warmup-stable-decay LR schedule, separate or fused."""

from __future__ import annotations

import dataclasses
import logging

import torch

from ..config import check_finite, strict_options
from ..errors import ConfigError
from .fraction import PAPER_A, _int, _positive, optimal_qat_fraction, tokens_per_parameter_byte

log = logging.getLogger(__name__)

# -- the plan: steps and LR schedule ---------------------------------------------------------------
MODES = ("separate", "fused")



def _wsd(t: int, length: int, warmup: int, decay: int, peak: float, end: float) -> float:
    """Warmup (linear from 0), stable at ``peak``, linear decay to ``end`` over the last ``decay`` steps."""
    if t < warmup:
        return peak * (t + 1) / warmup
    if decay > 0 and t >= length - decay:
        return peak + (end - peak) * (t - (length - decay) + 1) / decay
    return peak


@strict_options
@dataclasses.dataclass(frozen=True, kw_only=True)
class QATPlan:
    """FP steps, then QAT steps, and a warmup-stable-decay LR schedule (multipliers of the base LR).

    ``mode="separate"``: each phase has its own WSD. FP: ``warmup_steps`` up, stable, the last
    ``decay_steps`` of FP decay to ``min_lr_ratio``; QAT: ``qat_warmup_steps`` back up to
    ``qat_lr_ratio``, stable, the last ``decay_steps`` of QAT decay to ``min_lr_ratio`` (each decay
    is cut to what its phase has left after warmup).
    ``mode="fused"`` (cooldown-QAT fusion): one WSD over the whole run, FP stops at the end of the
    stable phase and the decay runs during QAT, over its last ``min(decay_steps, qat_steps)`` steps.
    """

    total_steps: int
    qat_steps: int
    tokens_per_step: float
    params: float
    bits: float
    mode: str = "fused"
    warmup_steps: int = 0
    decay_steps: int = 0
    qat_warmup_steps: int = 0
    qat_lr_ratio: float = 1.0
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        owner = "QATPlan"
        _int(owner, "total_steps", self.total_steps, 1)
        _int(owner, "qat_steps", self.qat_steps)
        if self.qat_steps > self.total_steps:
            raise ConfigError(f"{owner}: qat_steps={self.qat_steps} exceeds total_steps={self.total_steps}.")
        for name in ("warmup_steps", "decay_steps", "qat_warmup_steps"):
            _int(owner, name, getattr(self, name))
        for name in ("tokens_per_step", "params", "bits"):
            object.__setattr__(self, name, _positive(owner, name, getattr(self, name)))
        object.__setattr__(self, "qat_lr_ratio", _positive(owner, "qat_lr_ratio", self.qat_lr_ratio))
        object.__setattr__(self, "min_lr_ratio", check_finite(owner, "min_lr_ratio", self.min_lr_ratio, minimum=0.0))
        if self.mode not in MODES:
            raise ConfigError(f"{owner}: mode={self.mode!r}; choose 'separate' (cooldown ends each phase) "
                              "or 'fused' (the FP cooldown runs during QAT).")

    # -- derived quantities ------------------------------------------------------------------------
    @property
    def fp_steps(self) -> int:
        return self.total_steps - self.qat_steps

    @property
    def fraction(self) -> float:
        """The planned QAT share of the steps (after rounding to whole steps)."""
        return self.qat_steps / self.total_steps

    @property
    def tokens(self) -> float:
        return self.total_steps * self.tokens_per_step

    @property
    def S(self) -> float:  # noqa: N802  (the paper's symbol)
        """Tokens per parameter byte of the whole run."""
        return tokens_per_parameter_byte(self.tokens, self.params, self.bits)

    @property
    def predicted_fraction(self) -> float:
        """``exp(-a / ln S)`` for this run (the paper's predictor, not necessarily ``fraction``)."""
        return optimal_qat_fraction(self.tokens, self.params, self.bits)

    def is_qat(self, step: int) -> bool:
        """Whether optimizer step ``step`` (0-based) trains with fake-quant on."""
        return step >= self.fp_steps

    def qat_starts_at(self, step: int) -> bool:
        """True for the one step at which fake-quant switches on (``prepare`` + ``calibrate``)."""
        return self.qat_steps > 0 and step == self.fp_steps

    def lr_multiplier(self, step: int) -> float:
        """LR of step ``step`` (0-based) relative to the base LR; after the last step it stays at the end."""
        t = min(max(int(step), 0), self.total_steps - 1)
        fp, qat, end = self.fp_steps, self.qat_steps, self.min_lr_ratio
        if self.mode == "fused" or qat == 0:  # one WSD over the whole run
            decay = min(self.decay_steps, qat) if self.mode == "fused" and qat > 0 else self.decay_steps
            warm = min(self.warmup_steps, self.total_steps)
            return _wsd(t, self.total_steps, warm, min(decay, self.total_steps - warm), 1.0, end)
        if t < fp:  # separate: the FP phase's own WSD, then the QAT phase's
            warm = min(self.warmup_steps, fp)
            return _wsd(t, fp, warm, min(self.decay_steps, fp - warm), 1.0, end)
        warm = min(self.qat_warmup_steps, qat)
        return _wsd(t - fp, qat, warm, min(self.decay_steps, qat - warm), self.qat_lr_ratio, end)

    def scheduler(self, optimizer: torch.optim.Optimizer, *, start_step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
        """A ``LambdaLR`` following :meth:`lr_multiplier`; call ``.step()`` after each optimizer step.

        ``start_step``: the plan step the optimizer's first step is (``fp_steps`` for a new optimizer
        over the QAT graph's parameters).
        """
        _int("QATPlan.scheduler()", "start_step", start_step)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: self.lr_multiplier(s + start_step))

    def describe(self) -> list[tuple[str, str]]:
        """Rows for a table: the split and the schedule in words."""
        rows = [
            ("tokens per parameter byte S", f"{self.S:.4g}"),
            ("predicted optimal QAT fraction exp(-a/ln S)", f"{self.predicted_fraction:.3f}"),
            ("planned QAT fraction", f"{self.fraction:.3f}"),
            ("FP steps / tokens", f"{self.fp_steps:,} / {self.fp_steps * self.tokens_per_step:.4g}"),
            ("QAT steps / tokens", f"{self.qat_steps:,} / {self.qat_steps * self.tokens_per_step:.4g}"),
            ("fake-quant switches on at step", f"{self.fp_steps:,}" if self.qat_steps else "never (PTQ at end)"),
        ]
        if self.mode == "fused" or not self.qat_steps:
            warm = min(self.warmup_steps, self.total_steps)
            decay = min(self.decay_steps, self.qat_steps or self.total_steps, self.total_steps - warm)
            where = "inside QAT" if self.qat_steps and self.mode == "fused" else "at the end"
            rows.append((f"LR ({self.mode})", f"warmup {warm:,}, stable, linear decay over the last {decay:,} "
                                              f"steps ({where}) to {self.min_lr_ratio:g} x base"))
        else:
            fp_warm, qat_warm = min(self.warmup_steps, self.fp_steps), min(self.qat_warmup_steps, self.qat_steps)
            fp_decay = min(self.decay_steps, self.fp_steps - fp_warm)
            qat_decay = min(self.decay_steps, self.qat_steps - qat_warm)
            rows.append(("LR (separate)", f"FP: warmup {fp_warm:,}, decay over its last {fp_decay:,}; QAT: warmup "
                                          f"{qat_warm:,} to {self.qat_lr_ratio:g} x base, decay over its last "
                                          f"{qat_decay:,}; to {self.min_lr_ratio:g} x base"))
        return rows


def plan_qat(*, params: float, bits: float, tokens_per_step: float, total_steps: int | None = None,
             tokens: float | None = None, fraction: float | None = None, mode: str = "fused",
             warmup: float = 0.01, cooldown: float = 0.2, qat_warmup: float | None = None,
             qat_lr_ratio: float = 1.0, min_lr_ratio: float = 0.0, a: float = PAPER_A) -> QATPlan:
    """Plan a run of ``total_steps`` (or ``tokens / tokens_per_step``) steps.

    fraction: QAT share of the steps; default the paper's ``exp(-a / ln S)``. A positive fraction
        gets at least one QAT step.
    warmup, cooldown: shares of the total steps for the LR warmup and decay (WSD; see QATPlan).
    qat_warmup: share of the QAT steps re-warming the LR in ``separate`` mode (default: the FP
        warmup length, at most half the QAT phase).
    """
    owner = "plan_qat()"
    tokens_per_step = _positive(owner, "tokens_per_step", tokens_per_step)
    if (total_steps is None) == (tokens is None):
        raise ConfigError(f"{owner}: give exactly one of total_steps or tokens.")
    if total_steps is None:
        total_steps = max(1, round(_positive(owner, "tokens", tokens) / tokens_per_step))
    _int(owner, "total_steps", total_steps, 1)
    run_tokens = total_steps * tokens_per_step
    if fraction is None:
        fraction = optimal_qat_fraction(run_tokens, params, bits, a=a)
    fraction = check_finite(owner, "fraction", fraction, minimum=0.0)
    if fraction > 1:
        raise ConfigError(f"{owner}: fraction must be in [0, 1], got {fraction}.")
    for name, share in (("warmup", warmup), ("cooldown", cooldown)):
        if not 0 <= check_finite(owner, name, share) <= 1:
            raise ConfigError(f"{owner}: {name} is a share of the steps in [0, 1], got {share}.")
    qat_steps = round(fraction * total_steps)
    qat_steps = max(qat_steps, 1) if fraction > 0 else 0
    warmup_steps = round(warmup * total_steps)
    if qat_warmup is None:
        qat_warmup_steps = min(warmup_steps, qat_steps // 2)
    else:
        if not 0 <= check_finite(owner, "qat_warmup", qat_warmup) <= 1:
            raise ConfigError(f"{owner}: qat_warmup is a share of the QAT steps in [0, 1], got {qat_warmup}.")
        qat_warmup_steps = round(qat_warmup * qat_steps)
    return QATPlan(total_steps=total_steps, qat_steps=qat_steps, tokens_per_step=tokens_per_step, params=params,
                   bits=bits, mode=mode, warmup_steps=warmup_steps, decay_steps=round(cooldown * total_steps),
                   qat_warmup_steps=qat_warmup_steps, qat_lr_ratio=qat_lr_ratio, min_lr_ratio=min_lr_ratio)
