"""Analysis of sweep results: how each metric grows (log-log fits) and where modes cross."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import stats


class Fit(NamedTuple):
    """``y ≈ exp(intercept) · x^slope``; the slope's 95% confidence interval; r² of the fit."""

    slope: float
    intercept: float
    ci_low: float
    ci_high: float
    r2: float
    n: int


def fit_loglog(x, y) -> Fit:
    """Least-squares line through (log x, log y); needs three or more positive points."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = (x > 0) & (y > 0)
    x, y = np.log(x[keep]), np.log(y[keep])
    if len(x) < 3 or np.ptp(x) == 0:
        raise ValueError("a log-log fit needs three or more positive points at two or more x values")
    line = stats.linregress(x, y)
    half = stats.t.ppf(0.975, len(x) - 2) * line.stderr
    return Fit(float(line.slope), float(line.intercept), float(line.slope - half),
               float(line.slope + half), float(line.rvalue ** 2), len(x))
