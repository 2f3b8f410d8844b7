"""Equivalence of two populations of runs: Welch's two one-sided tests (TOST).

"The two frameworks train the same" is the hypothesis to *prove*, so it is the alternative:
H0 |μ_a − μ_b| ≥ margin against H1 |μ_a − μ_b| < margin, at level α. Equivalently, the
(1 − 2α) confidence interval of μ_a − μ_b (Welch's t, unequal variances) lies inside
(−margin, margin). Failing to show equivalence is not showing a difference: with too few runs
every verdict is "not shown".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Equivalence:
    """The TOST of two samples: the difference of means (a − b), its (1 − 2α) confidence
    interval, the TOST p-value (the larger of the two one-sided ones), the margin and the
    verdict."""

    diff: float
    low: float
    high: float
    p: float
    margin: float
    alpha: float
    n_a: int
    n_b: int
    mean_a: float
    mean_b: float
    sd_a: float
    sd_b: float

    @property
    def equivalent(self) -> bool:
        """Whether equivalence within ±margin is shown at level α."""
        return self.p < self.alpha

    def describe(self, names: tuple[str, str] = ("a", "b"), scale: float = 1.0,
                 unit: str = "") -> str:
        """One line: each sample's mean ± s.d. under its name, the difference, its CI, the
        margin, p and the verdict; values multiplied by ``scale`` (100 for percentage
        points)."""
        level = round(100 * (1 - 2 * self.alpha))
        verdict = "equivalent" if self.equivalent else "equivalence not shown"
        return (f"{names[0]} {scale * self.mean_a:.4g} ± {scale * self.sd_a:.2g} (n={self.n_a})"
                f" vs {names[1]} {scale * self.mean_b:.4g} ± {scale * self.sd_b:.2g} "
                f"(n={self.n_b}): "
                f"difference {scale * self.diff:+.3g}{unit}, {level}% CI "
                f"[{scale * self.low:+.3g}, {scale * self.high:+.3g}]{unit}, margin "
                f"±{scale * self.margin:.3g}{unit}, p = {self.p:.3g}: {verdict}")


def tost(a: Sequence[float], b: Sequence[float], margin: float,
         alpha: float = 0.05) -> Equivalence:
    """Welch's TOST of ``mean(a) − mean(b)`` within ±``margin`` at level ``alpha``. Each
    sample needs at least 2 values."""
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"each sample needs at least 2 values, got {len(x)} and {len(y)}")
    if not margin > 0 or not 0 < alpha < 0.5:
        raise ValueError(f"need margin > 0 and 0 < alpha < 0.5, got {margin} and {alpha}")
    va, vb = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    diff, se = float(x.mean() - y.mean()), math.sqrt(va + vb)
    if se == 0:  # both samples constant: the difference is known exactly
        p = 0.0 if abs(diff) < margin else 1.0
        return Equivalence(diff, diff, diff, p, margin, alpha, len(x), len(y), float(x.mean()),
                           float(y.mean()), 0.0, 0.0)
    df = (va + vb) ** 2 / (va**2 / (len(x) - 1) + vb**2 / (len(y) - 1))
    p_low = float(stats.t.sf((diff + margin) / se, df))   # H0: diff ≤ −margin
    p_high = float(stats.t.cdf((diff - margin) / se, df))  # H0: diff ≥ +margin
    half = float(stats.t.ppf(1 - alpha, df)) * se
    return Equivalence(diff, diff - half, diff + half, max(p_low, p_high), margin, alpha,
                       len(x), len(y), float(x.mean()), float(y.mean()),
                       float(x.std(ddof=1)), float(y.std(ddof=1)))
