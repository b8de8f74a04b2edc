"""The paper's predictor: tokens per parameter byte and f* = exp(-a / ln S)."""

from __future__ import annotations

import logging
import math

from ..config import check_finite
from ..errors import ConfigError

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

def _int(owner: str, name: str, value, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{owner}: {name} must be an int >= {minimum}, got {value!r}.")
    return value
