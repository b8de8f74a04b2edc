"""The paper's loss law, fitted from the user's own runs (its constants are not public)."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence

import torch

from ..config import check_finite, strict_options
from ..errors import CalibrationError, ConfigError
from .fraction import _int, _positive

log = logging.getLogger(__name__)

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
