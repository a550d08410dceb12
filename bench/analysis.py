"""Analysis of sweep results: how each metric grows (log-log fits) and where modes cross."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd
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


# --- complexity and crossovers of sweep results ---------------------------------------------

# Per-packet metrics, fitted per workload. Counters are deterministic; the rest is measured.
PACKET_COUNTERS = ("entries_visited_mean", "nat_entries_visited_mean", "conntrack_compares_mean",
                   "svc_compares_mean", "conn_compares_mean", "dests_examined_mean",
                   "rules_started_mean", "set_lookups_mean", "expressions_mean")
PACKET_TIMES = ("ns_p50", "ns_p99", "ns_mean")
# Per-point metrics (the same in each workload's record), fitted once, as workload "sync" or
# "memory".
SYNC_COUNTERS = ("sync_entries", "sync_full_proxy_rules_operations", "sync_partial_proxy_rules_operations",
                 "sync_add_service_operations", "sync_full_proxy_rules_kernel_entries",
                 "sync_partial_proxy_rules_kernel_entries")
SYNC_TIMES = ("sync_full_proxy_rules_duration_seconds", "sync_partial_proxy_rules_duration_seconds",
              "sync_add_service_duration_seconds")
MEMORY = ("kernel_bytes", "model_bytes", "peak_rss_bytes")
# What "cheaper" compares across modes: times and bytes mean the same thing in every mode.
COMPARABLE = PACKET_TIMES + SYNC_TIMES + ("kernel_bytes", "peak_rss_bytes")
AXES = {"services": ("endpoints", "nodes"), "endpoints": ("services", "nodes"), "nodes": ("services", "endpoints")}
COMPLEXITY_COLUMNS = ["mode", "workload", "metric", "against", "slope", "ci_low", "ci_high", "r2", "n"]
CROSSOVER_COLUMNS = ["metric", "workload", "mode_a", "mode_b", "services"]


def _series(frame: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """(workload label, metric, rows) for every metric in the frame: per-packet metrics per
    workload; per-point metrics once (from the service_new rows), labelled sync or memory.
    Only kube-proxy's default variant."""
    points = frame[frame["kind"] == "point"] if "kind" in frame else frame.iloc[:0]
    if "variant" in points:
        points = points[points["variant"].fillna("") == ""]
    out = []
    for metric in PACKET_COUNTERS + PACKET_TIMES:
        if metric in points:
            out += [(workload, metric, rows) for workload, rows in points.groupby("workload")]
    per_point = points[points["workload"] == "service_new"] if "workload" in points else points
    for label, metrics in (("sync", SYNC_COUNTERS + SYNC_TIMES), ("memory", MEMORY)):
        out += [(label, metric, per_point) for metric in metrics if metric in per_point]
    return out


def _fit_row(mode: str, workload: str, metric: str, against: str, x, y) -> dict | None:
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = (x > 0) & (y > 0) & np.isfinite(y)
    if len(np.unique(x[keep])) < 3:
        return None
    if np.ptp(np.log(y[keep])) == 0:  # constant: a perfect fit of slope 0
        fit = Fit(0.0, float(np.log(y[keep][0])), 0.0, 0.0, 1.0, int(keep.sum()))
    else:
        fit = fit_loglog(x[keep], y[keep])
    return {"mode": mode, "workload": workload, "metric": metric, "against": against, "slope": fit.slope,
            "ci_low": fit.ci_low, "ci_high": fit.ci_high, "r2": fit.r2, "n": fit.n}


def complexity(frame: pd.DataFrame) -> pd.DataFrame:
    """Log-log fits of every metric against services, endpoints per service and nodes (the
    others held at the values with the most sizes measured), per mode and workload; and of
    IPVS's connection-table work against live connections (the ipvs_connections benchmark).

    ``metric ≈ c · against^slope``: slope with its 95% confidence interval, r² and points.
    Deterministic counters and measured times are separate metrics, so they are fitted
    separately."""
    rows = []
    for workload, metric, data in _series(frame):
        for mode, by_mode in data.dropna(subset=[metric]).groupby("mode", sort=False):
            for against, held in AXES.items():
                best = _widest_series(by_mode, against, list(held))
                if best is None:
                    continue
                best = best.groupby(against, as_index=False)[metric].median()
                row = _fit_row(mode, workload, metric, against, best[against], best[metric])
                if row:
                    rows.append(row)
    rows += _connection_fits(frame)
    return pd.DataFrame(rows, columns=COMPLEXITY_COLUMNS)


def _widest_series(rows: pd.DataFrame, against: str, held: list[str]) -> pd.DataFrame | None:
    """The rows at the ``held`` values with the most distinct ``against`` sizes (ties: the
    largest held values)."""
    if rows.empty:
        return None
    sizes = rows.groupby(held)[against].nunique()
    key = max(sizes.index, key=lambda k: (sizes[k], k))
    return rows[(rows[held] == key).all(axis=1)]


def _connection_fits(frame: pd.DataFrame) -> list[dict]:
    if "benchmark" not in frame:
        return []
    rows = []
    for _, record in frame[frame["benchmark"] == "ipvs_connections"].iterrows():
        for metric, prefix in (("conn_compares_mean", "conn_compares_mean_"), ("ns_p50", "established_ns_p50_")):
            sizes = sorted(int(c[len(prefix):]) for c in record.index
                           if c.startswith(prefix) and c[len(prefix):].isdigit() and record[c] == record[c])
            row = _fit_row("ipvs", "established", metric, "connections", sizes,
                           [record[f"{prefix}{n}"] for n in sizes])
            if row:
                rows.append(row)
    return rows


def crossovers(frame: pd.DataFrame) -> pd.DataFrame:
    """Services counts where one mode becomes cheaper than another, per metric and workload.

    Each mode's curve against services (at the endpoints per service and node count that
    the most modes share) is compared with each other mode's at the sizes both measured; where
    the ratio changes sign the crossing is interpolated linearly in log-log space. ``mode_a``
    is the cheaper one below ``services``, ``mode_b`` above it."""
    rows = []
    for workload, metric, data in _series(frame):
        if metric not in COMPARABLE:
            continue
        data = data.dropna(subset=[metric])
        data = data[data[metric] > 0]
        if data.empty:
            continue
        shared = data.groupby(["endpoints", "nodes"])["mode"].nunique()
        endpoints, nodes = shared[shared == shared.max()].index.max()
        data = data[(data["endpoints"] == endpoints) & (data["nodes"] == nodes)]
        curves = {mode: g.groupby("services")[metric].median() for mode, g in data.groupby("mode", sort=False)}
        names = list(curves)
        for i, first in enumerate(names):
            for second in names[i + 1:]:
                rows += [{"metric": metric, "workload": workload, **crossing}
                         for crossing in _crossings(first, curves[first], second, curves[second])]
    return pd.DataFrame(rows, columns=CROSSOVER_COLUMNS)


def _crossings(name_a: str, a: pd.Series, name_b: str, b: pd.Series) -> list[dict]:
    sizes = a.index.intersection(b.index).sort_values()
    if len(sizes) < 2:
        return []
    x = np.log(sizes.to_numpy(float))
    gap = np.log(a[sizes].to_numpy(float)) - np.log(b[sizes].to_numpy(float))
    found = []
    for k in range(len(sizes) - 1):
        if gap[k] == 0 or np.sign(gap[k]) == np.sign(gap[k + 1]) or gap[k + 1] == 0:
            continue
        at = x[k] + (x[k + 1] - x[k]) * gap[k] / (gap[k] - gap[k + 1])
        cheaper_below, cheaper_above = (name_a, name_b) if gap[k] < 0 else (name_b, name_a)
        found.append({"mode_a": cheaper_below, "mode_b": cheaper_above, "services": float(np.exp(at))})
    return found
