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

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from .config import QuantConfig, check_finite, strict_options
from .errors import CalibrationError, ConfigError, InputError
from .fake_quantize import FakeQuantize
from .inputs import as_args

__all__ = [
    "PAPER_A", "tokens_per_parameter_byte", "optimal_qat_fraction",
    "LawParams", "LossRecord", "FitInfo", "BitsOption", "ScalingLaw",
    "MODES", "QATPlan", "plan_qat", "PlanRun", "train_with_plan",
]

log = logging.getLogger(__name__)

#: ``a`` of ``f* = exp(-a / ln S)`` as the paper reports it (natural logarithm).
PAPER_A = 6.7297


def _positive(owner: str, name: str, value) -> float:
    value = check_finite(owner, name, value)
    if value <= 0:
        raise ConfigError(f"{owner}: {name} must be > 0, got {value}.")
    return value


# -- the tokens-per-parameter-byte predictor -------------------------------------------------------
def tokens_per_parameter_byte(tokens: float, params: float, bits: float) -> float:
    """``S = tokens / (params * bits / 8)``: training tokens per byte of the quantized weights."""
    owner = "tokens_per_parameter_byte()"
    tokens, params, bits = (_positive(owner, n, v) for n, v in (("tokens", tokens), ("params", params),
                                                                 ("bits", bits)))
    return tokens / (params * bits / 8.0)


def optimal_qat_fraction(tokens: float, params: float, bits: float, *, a: float = PAPER_A) -> float:
    """The paper's loss-optimal QAT share of the tokens: ``exp(-a / ln S)``, clamped to [0, 1].

    For ``S <= 1`` (at most one token per parameter byte) ``ln S <= 0`` and the formula has no
    meaning; we return 0, its limit as ``S`` falls to 1 from above (no QAT phase worth planning).
    """
    a = _positive("optimal_qat_fraction()", "a", a)
    s = tokens_per_parameter_byte(tokens, params, bits)
    if s <= 1.0:
        return 0.0
    return min(1.0, max(0.0, math.exp(-a / math.log(s))))


# -- the loss law ----------------------------------------------------------------------------------
PARAM_NAMES = ("E", "A", "alpha", "C", "beta", "theta", "kappa", "phi", "chi", "psi", "omega",
               "lam", "mu", "nu", "xi", "rho")


@strict_options
@dataclasses.dataclass(frozen=True, kw_only=True)
class LawParams:
    """Constants of ``L = E + A/N^alpha + C/D^beta + delta`` (all >= 0), with the QAT penalty

    ``delta = theta*2^(-kappa*B) + phi*2^(-chi*B) / (N^psi * S_qat^omega)
    + lam*2^(-mu*B) / (N^nu * S_fp^(sign*xi) * S_qat^rho)``.

    ``C``/``beta`` are Chinchilla's data term (its ``B`` is renamed: here ``B`` is the bit width).
    """

    E: float = 0.0
    A: float = 0.0
    alpha: float = 0.0
    C: float = 0.0
    beta: float = 0.0
    theta: float = 0.0
    kappa: float = 0.0
    phi: float = 0.0
    chi: float = 0.0
    psi: float = 0.0
    omega: float = 0.0
    lam: float = 0.0
    mu: float = 0.0
    nu: float = 0.0
    xi: float = 0.0
    rho: float = 0.0

    def __post_init__(self) -> None:
        for name in PARAM_NAMES:
            object.__setattr__(self, name, check_finite("LawParams", name, getattr(self, name), minimum=0.0))


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossRecord:
    """One finished run: parameters, FP tokens, QAT tokens, QAT bit width and final loss."""

    params: float
    fp_tokens: float
    qat_tokens: float
    bits: float
    loss: float

    def __post_init__(self) -> None:
        owner = "LossRecord"
        for name in ("params", "qat_tokens", "bits", "loss"):
            object.__setattr__(self, name, _positive(owner, name, getattr(self, name)))
        object.__setattr__(self, "fp_tokens", check_finite(owner, "fp_tokens", self.fp_tokens, minimum=0.0))


@dataclasses.dataclass(frozen=True)
class FitInfo:
    """How :meth:`ScalingLaw.fit` went: Huber objective (on log loss), R^2 and RMSE on loss."""

    objective: float
    r2: float
    rmse: float
    records: int
    restarts: int
    fixed: dict[str, float]


@dataclasses.dataclass(frozen=True)
class BitsOption:
    """One bit width under a memory budget: its parameter count, best QAT fraction and loss."""

    bits: float
    params: float
    fraction: float
    loss: float


def _as_tensor(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


@dataclasses.dataclass(frozen=True)
class ScalingLaw:
    """The paper's loss law for an FP phase of ``D_fp`` tokens followed by ``D_qat`` of QAT.

    ``S_fp = D_fp / (N*B/8)``, ``S_qat = D_qat / (N*B/8)``, ``D = D_fp + D_qat``.

    **The sign of the S_fp term is ambiguous** in public summaries, so it is a choice:
    ``sfp_sign=+1`` puts ``S_fp^xi`` in the denominator as written (more FP tokens shrink the
    penalty; with ``D_fp -> 0`` the penalty diverges, so QAT from scratch is never optimal and the
    optimal fraction is interior). ``sfp_sign=-1`` puts it in the numerator, as in work showing PTQ
    error *growing* with pretraining tokens (Kumar et al.). Beware: with ``-1`` the whole penalty
    falls as ``f`` grows while the float term depends only on ``D``, so the law's optimal fraction
    is 1 for every budget; only ``+1`` reproduces an interior optimum. Fit both and compare.
    """

    params: LawParams
    sfp_sign: int = 1
    fit_info: FitInfo | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.params, LawParams):
            raise ConfigError(f"ScalingLaw: params must be a LawParams, got {type(self.params).__name__}.")
        if self.sfp_sign not in (1, -1) or isinstance(self.sfp_sign, bool):
            raise ConfigError(f"ScalingLaw: sfp_sign must be +1 or -1, got {self.sfp_sign!r}.")

    # -- prediction --------------------------------------------------------------------------------
    @staticmethod
    def _features(n, d_fp, d_qat, b, *, floor: bool = False) -> dict[str, torch.Tensor]:
        """log N, log D, log S_fp, log S_qat and B ln 2: the law is linear in these inside each term.

        ``floor``: log(0) becomes about -690 instead of -inf (fitting: keeps gradients finite).
        """
        def log(x):
            return torch.log(x.clamp_min(1e-300) if floor else x)

        byte = torch.log(n) + torch.log(b / 8.0)
        return {"n": torch.log(n), "d": torch.log(d_fp + d_qat), "sfp": log(d_fp) - byte, "sqat": log(d_qat) - byte,
                "b": b * math.log(2.0)}

    @staticmethod
    def _log_terms(p: Mapping[str, torch.Tensor], sign: int, f: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """log of each additive term of the law, stacked on the last dim (coefficients as logs)."""
        def times(exponent, log_value):  # x^0 = 1 even at x = 0 or inf
            return torch.where(exponent == 0, torch.zeros_like(log_value), exponent * log_value)

        terms = [
            p["E"] + 0 * f["n"],
            p["A"] - times(p["alpha"], f["n"]),
            p["C"] - times(p["beta"], f["d"]),
            p["theta"] - times(p["kappa"], f["b"]),
            p["phi"] - times(p["chi"], f["b"]) - times(p["psi"], f["n"]) - times(p["omega"], f["sqat"]),
            p["lam"] - times(p["mu"], f["b"]) - times(p["nu"], f["n"]) - times(sign * p["xi"], f["sfp"])
            - times(p["rho"], f["sqat"]),
        ]
        return torch.stack(torch.broadcast_tensors(*terms), dim=-1)

    def _logp(self) -> dict[str, torch.Tensor]:
        out = {}
        for name in PARAM_NAMES:
            v = torch.tensor(getattr(self.params, name), dtype=torch.float64)
            out[name] = torch.log(v) if name in _COEFFS else v  # log(0) = -inf drops the term
        return out

    def predict(self, params, fp_tokens, qat_tokens, bits):
        """Predicted loss; numbers give a float, tensors/arrays broadcast to a float64 tensor.

        ``qat_tokens = 0`` predicts ``inf`` (S_qat = 0); so does ``fp_tokens = 0`` with ``sfp_sign=+1``.
        """
        values = (params, fp_tokens, qat_tokens, bits)
        with torch.no_grad():
            terms = self._log_terms(self._logp(), self.sfp_sign, self._features(*(_as_tensor(v) for v in values)))
            out = torch.logsumexp(terms, dim=-1).exp()
        return float(out) if all(isinstance(v, (int, float)) for v in values) else out

    def penalty(self, params, fp_tokens, qat_tokens, bits):
        """``delta``: the predicted loss minus the float terms ``E + A/N^alpha + C/D^beta``."""
        base = dataclasses.replace(self.params, theta=0.0, phi=0.0, lam=0.0)
        return self.predict(params, fp_tokens, qat_tokens, bits) - dataclasses.replace(
            self, params=base).predict(params, fp_tokens, qat_tokens, bits)

    def optimal_fraction(self, params: float, tokens: float, bits: float, *, grid: int = 2001) -> float:
        """The QAT fraction in [0, 1] that minimises the predicted loss at ``tokens`` (dense grid)."""
        owner = "ScalingLaw.optimal_fraction()"
        params, tokens, bits = (_positive(owner, n, v) for n, v in (("params", params), ("tokens", tokens),
                                                                    ("bits", bits)))
        f = torch.linspace(0.0, 1.0, _int(owner, "grid", grid, 2), dtype=torch.float64)
        loss = self.predict(params, (1 - f) * tokens, f * tokens, bits)
        loss = torch.where(torch.isfinite(loss), loss, torch.tensor(math.inf, dtype=torch.float64))
        return float(f[int(torch.argmin(loss))])

    def compare_bits(self, memory_bytes: float, tokens: float, *, bits: Sequence[float] = (1, 2, 3, 4, 6, 8),
                     fraction: float | None = None) -> tuple[BitsOption, ...]:
        """For each bit width, ``N = memory_bytes * 8 / B`` parameters fill the memory budget;
        predicted loss at the optimal (or given) QAT fraction, best first."""
        owner = "ScalingLaw.compare_bits()"
        memory_bytes, tokens = _positive(owner, "memory_bytes", memory_bytes), _positive(owner, "tokens", tokens)
        if fraction is not None and not 0 <= check_finite(owner, "fraction", fraction) <= 1:
            raise ConfigError(f"{owner}: fraction must be in [0, 1], got {fraction}.")
        options = []
        for b in bits:
            b = _positive(owner, "bits", b)
            n = memory_bytes * 8.0 / b
            f = self.optimal_fraction(n, tokens, b) if fraction is None else fraction
            options.append(BitsOption(b, n, f, self.predict(n, (1 - f) * tokens, f * tokens, b)))
        return tuple(sorted(options, key=lambda o: o.loss))

    def best_bits(self, memory_bytes: float, tokens: float, *, bits: Sequence[float] = (1, 2, 3, 4, 6, 8),
                  fraction: float | None = None) -> BitsOption:
        """The bit width with the lowest predicted loss under a fixed weight memory ``N*B/8``."""
        return self.compare_bits(memory_bytes, tokens, bits=bits, fraction=fraction)[0]

    # -- fitting -----------------------------------------------------------------------------------
    @classmethod
    def fit(cls, records: Sequence[LossRecord], *, sfp_sign: int = 1, fixed: Mapping[str, float] | None = None,
            restarts: int = 64, refine: int = 4, seed: int = 0, huber_delta: float = 1e-3, adam_steps: int = 1500,
            max_iter: int = 500) -> ScalingLaw:
        """Fit the law to your runs: Huber loss on ``log(predicted) - log(observed)`` (as Chinchilla),
        in float64 on log-coefficients and log-exponents, with log N, log D, log S and B centred on
        the records' means (conditioning). ``restarts`` random starts run together through
        ``adam_steps`` of Adam on least squares; the ``refine`` best are polished by L-BFGS, first on
        least squares and then on the Huber objective; the lowest Huber objective wins.

        Parameters the records cannot identify are fixed at 0 and listed in ``fit_info.fixed``:
        with one model size, ``A, alpha, psi, nu`` (absorbed into ``E``, ``phi``, ``lam``); with one
        bit width, ``theta, kappa, chi, mu``; with one total token count, ``C, beta``. ``fixed``
        pins any other parameter to a value you give.
        """
        records = list(records)
        if not records or not all(isinstance(r, LossRecord) for r in records):
            raise ConfigError("ScalingLaw.fit(): records must be a non-empty sequence of LossRecord.")
        if sfp_sign not in (1, -1):
            raise ConfigError(f"ScalingLaw.fit(): sfp_sign must be +1 or -1, got {sfp_sign!r}.")
        if sfp_sign == 1 and any(r.fp_tokens == 0 for r in records):
            raise ConfigError("ScalingLaw.fit(): a record has fp_tokens=0 (QAT from scratch), which the "
                              "sfp_sign=+1 law predicts as infinite loss; drop it or use sfp_sign=-1.")
        for name, value in (("restarts", restarts), ("refine", refine), ("adam_steps", adam_steps),
                            ("max_iter", max_iter)):
            _int("ScalingLaw.fit()", name, value, 1)
        huber_delta = _positive("ScalingLaw.fit()", "huber_delta", huber_delta)
        cols = [_as_tensor([getattr(r, k) for r in records]) for k in ("params", "fp_tokens", "qat_tokens", "bits")]
        observed = _as_tensor([r.loss for r in records])
        pinned = _degenerate(cols)
        for name, value in dict(fixed or {}).items():
            if name not in PARAM_NAMES:
                raise ConfigError(f"ScalingLaw.fit(): fixed has unknown parameter {name!r}; "
                                  f"choose from {', '.join(PARAM_NAMES)}.")
            pinned[name] = check_finite("ScalingLaw.fit()", f"fixed[{name!r}]", value, minimum=0.0)
        free = [n for n in PARAM_NAMES if n not in pinned]
        gen = torch.Generator().manual_seed(seed)
        feats = cls._features(*cols, floor=True)
        centre = {k: v.mean() for k, v in feats.items()}
        feats = {k: v - centre[k] for k, v in feats.items()}
        # a coefficient in centred units is the real one times the term's power-law factor at the centre
        shift = {"E": (), "A": (("alpha", "n", 1),), "C": (("beta", "d", 1),), "theta": (("kappa", "b", 1),),
                 "phi": (("chi", "b", 1), ("psi", "n", 1), ("omega", "sqat", 1)),
                 "lam": (("mu", "b", 1), ("nu", "n", 1), ("xi", "sfp", sfp_sign), ("rho", "sqat", 1))}

        def unpack(x: torch.Tensor, *, centred: bool = True) -> dict[str, torch.Tensor]:
            p = {n: torch.tensor(v, dtype=torch.float64) for n, v in pinned.items()}
            for i, name in enumerate(free):  # coefficients: log value; exponents: exp(log value)
                v = x[..., i:i + 1]  # [restarts, 1] or [1]: broadcasts against the records
                p[name] = v if name in _COEFFS else torch.exp(v.clamp(-20.0, 3.0))
            for name in _COEFFS:
                if name in pinned:
                    p[name] = torch.log(p[name])
                elif not centred:
                    p[name] = p[name] + sum(sg * p[e] * centre[k] for e, k, sg in shift[name])
            return p

        def objective(x: torch.Tensor, delta: float = huber_delta) -> torch.Tensor:
            """Huber loss of the log residuals, summed over records (one value per row of ``x``)."""
            r = torch.logsumexp(cls._log_terms(unpack(x), sfp_sign, feats), dim=-1) - torch.log(observed)
            return torch.nn.functional.huber_loss(r, torch.zeros_like(r), delta=delta, reduction="none").sum(-1)

        # 1. all random starts at once: Adam on least squares of the log residuals (smooth, batched)
        u = torch.rand(restarts, len(free), generator=gen, dtype=torch.float64)
        x = torch.stack([math.log(float(observed.min())) + torch.log(0.2 + 0.75 * u[:, i]) if name == "E"
                         else -7.0 + 7.0 * u[:, i] if name in _COEFFS else torch.log(0.02 + 0.98 * u[:, i])
                         for i, name in enumerate(free)], dim=1).requires_grad_(True)
        adam = torch.optim.Adam([x], lr=0.05)
        for _ in range(adam_steps):
            adam.zero_grad()
            objective(x, 1.0).nansum().backward()
            adam.step()
        with torch.no_grad():
            start_values = torch.nan_to_num(objective(x, 1.0), nan=math.inf)
        # 2. the best few: L-BFGS on least squares, then on the Huber objective
        best_x, best_obj = None, math.inf
        for k in torch.argsort(start_values)[:refine].tolist():
            xk, _ = _minimize(lambda v: objective(v, 1.0).sum(), x[k].detach(), max_iter)
            xk, value = _minimize(lambda v: objective(v).sum(), xk, max_iter)
            if math.isfinite(value) and value < best_obj:
                best_obj, best_x = value, xk
        if best_x is None:
            raise CalibrationError("ScalingLaw.fit(): every restart diverged; check the records' losses.")
        values = {n: float(v.exp()) if n in _COEFFS else float(v) for n, v in unpack(best_x, centred=False).items()}
        law = cls(LawParams(**values), sfp_sign=sfp_sign)
        predicted = law.predict(*cols)
        rmse = float(((predicted - observed) ** 2).mean().sqrt())
        total = float(((observed - observed.mean()) ** 2).sum())
        r2 = 1.0 - float(((predicted - observed) ** 2).sum()) / total if total > 0 else float("nan")
        info = FitInfo(objective=best_obj, r2=r2, rmse=rmse, records=len(records), restarts=restarts,
                       fixed=dict(pinned))
        log.info("fitted loss law on %d records: R2=%.4f RMSE=%.4g (fixed: %s)", len(records), r2, rmse,
                 ", ".join(sorted(pinned)) or "none")
        return dataclasses.replace(law, fit_info=info)


_COEFFS = frozenset({"E", "A", "C", "theta", "phi", "lam"})


def _minimize(objective: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor,
              max_iter: int) -> tuple[torch.Tensor, float]:
    """L-BFGS with strong-Wolfe line search from ``x0``; ``inf`` if the start diverged."""
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([x], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-12, tolerance_change=1e-15, history_size=50)

    def closure():
        opt.zero_grad()
        value = objective(x)
        value.backward()
        return value

    try:
        opt.step(closure)
    except RuntimeError:
        return x0, math.inf
    with torch.no_grad():
        return x.detach().clone(), float(objective(x))


def _degenerate(cols: list[torch.Tensor]) -> dict[str, float]:
    """Parameters that a record set with a single N, B or D cannot identify, pinned at 0."""
    n, d_fp, d_qat, b = cols
    pinned: dict[str, float] = {}
    if bool((n == n[0]).all()):
        pinned.update(A=0.0, alpha=0.0, psi=0.0, nu=0.0)
    if bool((b == b[0]).all()):
        pinned.update(theta=0.0, kappa=0.0, chi=0.0, mu=0.0)
    d = d_fp + d_qat
    if bool((d == d[0]).all()):
        pinned.update(C=0.0, beta=0.0)
    return pinned


# -- the plan: steps and LR schedule ---------------------------------------------------------------
MODES = ("separate", "fused")


def _int(owner: str, name: str, value, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{owner}: {name} must be an int >= {minimum}, got {value!r}.")
    return value


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


# -- running a plan --------------------------------------------------------------------------------
WEIGHT_SCALES = ("track", "frozen")


@dataclasses.dataclass(frozen=True)
class PlanRun:
    """What :func:`train_with_plan` returns: the QAT graph (calibrated, quantizers frozen), the
    training loss and LR of every step, and how many parameters kept their optimizer state."""

    qat: fx.GraphModule
    losses: tuple[float, ...]
    lrs: tuple[float, ...]
    switch_step: int
    carried_state: int


def _cycle(loader: Iterable) -> Iterator:
    while True:
        fed = False
        for batch in loader:
            fed = True
            yield batch
        if not fed:
            raise InputError("train_with_plan(): the loader yielded no batch.")


def _make_optimizer(kind: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ConfigError(f"train_with_plan(): optimizer={kind!r}; choose 'adamw', 'adam' or 'sgd'.")


def _weight_quantizers(qat: fx.GraphModule) -> list[tuple[nn.Module, FakeQuantize]]:
    return [(m, m.weight_fake_quant) for m in qat.modules()
            if isinstance(getattr(m, "weight_fake_quant", None), FakeQuantize)]


def _observe_weights(quantizers, *, freeze: bool) -> None:
    """Max-abs scale tracking: each forward re-measures the weights; ``freeze`` fixes the final scales."""
    with torch.no_grad():
        for module, wfq in quantizers:
            wfq.activation_post_process.reset_min_max_vals()
            if freeze:
                wfq.activation_post_process(module.weight.detach())
                wfq.freeze()
            elif wfq.frozen:
                wfq.enable_observer(True)  # observe + fake-quant: forward sets the scale from this step's weights


def train_with_plan(
    model: nn.Module,
    example_inputs,
    loader: Iterable,
    loss_fn: Callable,
    plan: QATPlan,
    *,
    config: QuantConfig | None = None,
    lr: float = 1e-3,
    optimizer: str = "adamw",
    weight_decay: float = 0.0,
    calib_batches: int = 4,
    weight_scales: str = "track",
    max_grad_norm: float | None = None,
    progress: bool = False,
) -> PlanRun:
    """Train ``model`` in float for ``plan.fp_steps``, then switch fake-quant on and train the QAT graph.

    Each batch is ``(*inputs, target)``; the loader is cycled. ``model`` itself is trained in place
    during the FP phase. At the switch step, ``fxptqat.prepare(model, example_inputs, config=config)``
    and ``fxptqat.calibrate`` on the next ``calib_batches`` batches (not counted as steps) give the
    QAT graph; a new optimizer over its parameters takes over the optimizer state of every parameter
    whose qualified name and shape are unchanged, and the LR schedule continues at ``plan.fp_steps``.
    weight_scales: "track" re-measures each weight quantizer's max-abs scale before every QAT step
        (standard QAT); "frozen" keeps the scales calibration fixed (fxptqat's PTQAT semantics).
        Activation quantizers (``act_bits=8``) stay as calibration fixed them.
    With ``plan.qat_steps == 0`` the result is the PTQ graph of the fully trained model.
    """
    owner = "train_with_plan()"
    if not isinstance(plan, QATPlan):
        raise ConfigError(f"{owner}: plan must be a QATPlan (fxptqat.planning.plan_qat), got {type(plan).__name__}.")
    if not isinstance(model, nn.Module):
        raise InputError(f"{owner}: model must be a torch.nn.Module, got {type(model).__name__}.")
    if weight_scales not in WEIGHT_SCALES:
        raise ConfigError(f"{owner}: weight_scales={weight_scales!r}; choose one of {WEIGHT_SCALES}.")
    lr = _positive(owner, "lr", lr)
    weight_decay = check_finite(owner, "weight_decay", weight_decay, minimum=0.0)
    _int(owner, "calib_batches", calib_batches, 1)
    if max_grad_norm is not None:
        max_grad_norm = _positive(owner, "max_grad_norm", max_grad_norm)
    from tqdm.auto import tqdm

    from .api import calibrate, prepare  # local: api may import planning (finetune(plan=...))

    stream = _cycle(loader)
    losses: list[float] = []
    lrs: list[float] = []
    bar = tqdm(total=plan.total_steps, desc="FP", disable=not progress, leave=False)

    def run_phase(net: nn.Module, opt, sched, steps: int, quantizers) -> None:
        net.train()
        for _ in range(steps):
            *inputs, target = as_args(next(stream), what=f"{owner}: batch")
            if quantizers:
                _observe_weights(quantizers, freeze=False)
            loss = loss_fn(net(*inputs), target)
            if not math.isfinite(loss.item()):
                raise CalibrationError(f"{owner}: loss became {loss.item()} at step {len(losses)}; lower lr.")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], max_grad_norm)
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update(1)

    was_training = model.training
    try:
        opt = _make_optimizer(optimizer, [p for p in model.parameters() if p.requires_grad], lr, weight_decay)
        run_phase(model, opt, plan.scheduler(opt), plan.fp_steps, [])
        model.eval()
        qat = prepare(model, example_inputs, config=config)
        calibrate(qat, [next(stream) for _ in range(calib_batches)])
        log.info("QAT switched on at step %d of %d", plan.fp_steps, plan.total_steps)
        bar.set_description("QAT")
        quantizers = _weight_quantizers(qat) if weight_scales == "track" else []
        names = {n: p for n, p in model.named_parameters()}
        new_params = [(n, p) for n, p in qat.named_parameters() if p.requires_grad]
        qat_opt = _make_optimizer(optimizer, [p for _, p in new_params], lr, weight_decay)
        carried = 0
        for name, p in new_params:
            old = names.get(name)
            if old is not None and old.shape == p.shape and old in opt.state:
                qat_opt.state[p] = {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[old].items()}
                carried += 1
        if plan.qat_steps:
            run_phase(qat, qat_opt, plan.scheduler(qat_opt, start_step=plan.fp_steps), plan.qat_steps, quantizers)
            if quantizers:
                _observe_weights(quantizers, freeze=True)
    finally:
        bar.close()
        model.train(was_training)
    qat.eval()
    return PlanRun(qat=qat, losses=tuple(losses), lrs=tuple(lrs), switch_step=plan.fp_steps, carried_state=carried)
