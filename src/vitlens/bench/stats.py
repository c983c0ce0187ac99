"""The statistics of the report: per (method entry, metric protocol) the mean over images with a finite
value and a 95 % interval that stays inside the metric's range.

Images a protocol excludes (e.g. pointing-game images with large boxes) are NaN and left out; ``n``
counts the rest. The interval depends on the metric's declared range (:func:`value_range`, read from the
metric registry: :meth:`vitlens.metrics.base.MetricInfo.range_for`):

* **binary** values (pointing-game hits, 0/1): the Wilson score interval of the proportion
  ``p = k / n`` (Wilson 1927; Brown, Cai & DasGupta 2001, eq. 4)::

      (p + z^2/2n -/+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n),   z = 1.959964

* **bounded** values (AUCs of probabilities, Gini, shares in [0, 1], ...): Student's t interval
  ``mean +/- t_{0.975, n-1} s / sqrt(n)`` clipped to the range, labelled "t, clipped to [lo, hi]";
* **unbounded** values (e.g. AUCs of logits, and labels that are not registered metrics): the plain
  Student-t interval.

No interval for n < 2 (t) or n = 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

Z95 = 1.959963984540054  # standard normal 0.975 quantile


@dataclass
class Cell:
    n: int
    mean: float
    lo: float
    hi: float
    kind: str = "t"  # "wilson" | "t" | "t-clipped"

    @property
    def half(self) -> float:
        return (self.hi - self.lo) / 2


def _finite(values: Sequence[float]) -> np.ndarray:
    return np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)


def mean_ci(values: Sequence[float], level: float = 0.95) -> Cell:
    """Mean and Student-t confidence interval of the finite ``values``."""
    v = _finite(values)
    n = len(v)
    if n == 0:
        return Cell(0, float("nan"), float("nan"), float("nan"))
    m = float(v.mean())
    if n < 2:
        return Cell(n, m, float("nan"), float("nan"))
    from scipy import stats

    h = float(stats.t.ppf(0.5 + level / 2, n - 1) * v.std(ddof=1) / math.sqrt(n))
    return Cell(n, m, m - h, m + h)


def wilson(k: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion k / n (see the module docstring); inside [0, 1]."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    # k = 0 (k = n): the lower (upper) end point is exactly 0 (1); the closed form can be 1 ulp off
    lo = 0.0 if k <= 0 else max(0.0, centre - half)
    hi = 1.0 if k >= n else min(1.0, centre + half)
    return lo, hi


def value_range(metric: str, protocol: dict) -> tuple[Optional[float], Optional[float], bool]:
    """(low, high, binary) of a metric's per-image values under ``protocol`` (None: unbounded), as the
    registered metric ``metric`` declares it (:meth:`~vitlens.metrics.base.MetricInfo.range_for`); a name
    that is not a registered metric is unbounded."""
    from ..metrics.base import REGISTRY

    if metric not in REGISTRY:
        return None, None, False
    r = REGISTRY.get(metric).range_for(protocol)
    return r.lo, r.hi, bool(r.binary)


def range_text(lo: Optional[float], hi: Optional[float]) -> str:
    """``[lo, hi]`` with ``-inf``/``inf`` for an open end."""
    return f"[{'-inf' if lo is None else f'{lo:g}'}, {'inf' if hi is None else f'{hi:g}'}]"


def metric_ci(values: Sequence[float], metric: str, protocol: dict) -> Cell:
    """The 95 % interval of the module docstring for ``metric``'s values (checked against its range:
    values outside the declared range, or non-0/1 values of a binary metric, fall back to plain t)."""
    v = _finite(values)
    lo, hi, binary = value_range(metric, protocol)
    inside = len(v) > 0 and (lo is None or v.min() >= lo) and (hi is None or v.max() <= hi)
    if binary and inside and np.isin(v, (0.0, 1.0)).all():
        a, b = wilson(float(v.sum()), len(v))
        return Cell(len(v), float(v.mean()), a, b, "wilson")
    c = mean_ci(v)
    if inside and (lo is not None or hi is not None):
        if math.isfinite(c.lo):
            c.lo = max(c.lo, lo) if lo is not None else c.lo
            c.hi = min(c.hi, hi) if hi is not None else c.hi
        c.kind = "t-clipped"
    return c


def interval_label(kind: str, metric: str, protocol: dict) -> str:
    """How a cell's interval was computed, in words (its ``Cell.kind`` for ``metric``)."""
    if kind == "wilson":
        return "Wilson score interval of a proportion"
    if kind == "t-clipped":
        lo, hi, _ = value_range(metric, protocol)
        return f"Student t, clipped to {range_text(lo, hi)}"
    return "Student t"
