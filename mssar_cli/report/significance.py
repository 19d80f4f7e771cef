"""Welch's t-test of a configuration's error against the plain network's (SPEC.md §4).

The paper reports means of 3 runs for its CIFAR ResNets (± std only in Table 3) and one run for
its DenseNets and ImageNet networks, with no test of whether a gain exceeds seed noise. Here each
recalibrated configuration is compared with the plain network of the same dataset, network and
protocol by Welch's unequal-variances t-test on the final-epoch errors of the finished seeds:

- Δ = mean(error) − mean(plain error), in points (negative: the module helps);
- standard error ``se = sqrt(s1²/n1 + s2²/n2)`` with the sample variances (ddof 1);
- ``t = Δ / se`` with the Welch–Satterthwaite degrees of freedom
  ``df = se⁴ / ((s1²/n1)² / (n1 − 1) + (s2²/n2)² / (n2 − 1))``;
- two-sided p-value ``2 · sf(|t|, df)`` of Student's t, and the 95% confidence interval
  ``Δ ± t₀.₉₇₅(df) · se``.

This is what ``scipy.stats.ttest_ind(a, b, equal_var=False)`` and its ``confidence_interval()``
compute from the samples; it is computed here from the summary (mean, std, n) that
:func:`mssar_cli.report.stats.summarize` keeps, which is the same thing. It needs at least two
finished seeds on each side ("n/a" otherwise). scipy is imported when a test is made: reading
results stays light.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mssar_cli.report.stats import Stat

LEVEL = 0.95
# Under this, a p-value is written "< 0.001": three decimals say nothing more about seed noise.
P_FLOOR = 1e-3
CI_COLUMN = "95% CI of Δ (Welch)"
P_COLUMN = "p (Welch)"
WELCH_NOTE = (
    "95% CI of Δ and p (Welch): Welch's unequal-variances t-test of this configuration's "
    "final-epoch errors against the plain network's (two-sided, Welch–Satterthwaite degrees of "
    "freedom df; n = finished seeds of this configuration vs the plain network's); n/a when "
    "either side has fewer than 2 finished seeds. With 3 seeds a side (df ≤ 4) a gap must "
    "exceed about 2.8 standard errors to reach p < 0.05; no correction is made for comparing "
    "several modules with one plain network"
)


@dataclass(frozen=True)
class Welch:
    """Welch's t-test of ``a`` against ``b`` (Δ = mean a − mean b) and the CI of Δ."""

    delta: float
    se: float
    t: float
    df: float
    p: float
    low: float
    high: float
    n_a: int
    n_b: int


def welch(a: Stat, b: Stat, level: float = LEVEL) -> Welch | None:
    """Welch's t-test of ``a`` against ``b`` from their means, sample stds and n; ``None`` when
    either side has fewer than two finished seeds (no variance to estimate).

    When both sides have zero spread the statistic is undefined: t, df, p and the interval are
    NaN (scipy gives NaN as well).
    """
    if a.n < 2 or b.n < 2 or a.std != a.std or b.std != b.std:
        return None
    from scipy import stats  # slow to import: only when there is a test to make

    delta = a.mean - b.mean
    va, vb = a.std**2 / a.n, b.std**2 / b.n
    se = math.sqrt(va + vb)
    if se == 0:
        nan = math.nan
        return Welch(delta, 0.0, nan, nan, nan, nan, nan, a.n, b.n)
    df = (va + vb) ** 2 / (va**2 / (a.n - 1) + vb**2 / (b.n - 1))
    t = delta / se
    p = float(2 * stats.t.sf(abs(t), df))
    half = float(stats.t.ppf(0.5 + level / 2, df)) * se
    return Welch(delta, se, t, df, p, delta - half, delta + half, a.n, b.n)


def format_p(p: float) -> str:
    """ "0.041", or "< 0.001" below :data:`P_FLOOR`."""
    return f"< {P_FLOOR:g}" if p < P_FLOOR else f"{p:.3f}"


def welch_cells(this: Stat, plain: Stat) -> tuple[str, str]:
    """The two cells of a configuration against the plain network: the 95% CI of Δ
    ("[-1.23, +0.45]") and the p-value with df and n ("0.041 (df 3.7; n=3 vs 3)")."""
    result = welch(this, plain)
    if result is None:
        return "n/a", f"n/a (n={this.n} vs {plain.n}; needs ≥ 2 seeds each)"
    if result.p != result.p:
        return "n/a", f"n/a (no seed-to-seed spread; n={this.n} vs {plain.n})"
    interval = f"[{result.low:+.2f}, {result.high:+.2f}]"
    return interval, f"{format_p(result.p)} (df {result.df:.1f}; n={this.n} vs {plain.n})"
