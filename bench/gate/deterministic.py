"""The gate's machine-independent tiers: deterministic work (tier 1) and complexity (tier 4).

Tier 1 measures a fixed, seeded set of small sweep points per mode and keeps only the metrics
that repeat bit for bit: per-packet work counters, rule counts, modelled memory. Times never
enter it (the ``*_seconds`` and ``ns_*`` fields move from run to run).

Tier 4 fits each mode's first-packet work against the number of services on a log-log scale
(bench/analysis.py) and checks the slope against what the mode's design implies.
"""
from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

import numpy as np

from bench.analysis import fit_loglog
from bench.measure import MEASURE
from bench.sweep import Point

# Metric names that are deterministic. An explicit allow-list: a new metric is gated only once
# it is listed here, so a new timing field can never make tier 1 flaky.
DETERMINISTIC = ("*_mean", "*_fraction", "kernel_bytes*", "model_bytes", "rules.*", "sync_entries",
                 "*_operations", "*_operations_total", "*_sched_ops", "*_differing")
# Timing fields, refused even when a pattern above matches them (``ns_mean`` ends in _mean).
TIMING = ("ns_*", "*_ns", "*_ns_*", "*_seconds")
# Allowed relative change per metric, first matching pattern wins: counts exact, bytes 1%.
# A per-metric threshold is one more (pattern, limit) pair in front.
THRESHOLDS = (("*bytes*", 0.01), ("*", 0.0))

# Tier 1's points: small enough that all modes take a few seconds. A userspace point also
# times a real TCP relay (about 15 s whatever its size), so that mode gets one point.
WORK_SERVICES = (30, 200)
WORK_SERVICES_BY_MODE = {"userspace": (30,)}
WORK_SHAPE = {"endpoints": 2, "nodes": 10, "packets": 300, "seed": 0}


def _matches(name: str, patterns) -> bool:
    return any(fnmatchcase(name, p) for p in patterns)


def is_deterministic(name: str) -> bool:
    return _matches(name, DETERMINISTIC) and not _matches(name, TIMING)


def threshold(name: str) -> float:
    return next(limit for pattern, limit in THRESHOLDS if fnmatchcase(name, pattern))


def flatten(record: dict, prefix: str = "") -> dict[str, float]:
    """Numeric fields of a record, nested dicts as ``outer.inner`` (e.g. ``rules.nat``)."""
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = float(value)
    return flat


def work_points(modes=None) -> list[tuple[str, Point]]:
    """(label, point) for tier 1: every mode at each of its WORK_SERVICES."""
    return [(f"{mode} S={services}", Point(mode=mode, services=services, **WORK_SHAPE))
            for mode in (modes or MEASURE) for services in WORK_SERVICES_BY_MODE.get(mode, WORK_SERVICES)]


def measure_work(modes=None, progress=None) -> dict[str, float]:
    """Tier 1's metrics: ``"<mode> S=<n> <workload> <metric>"`` → value."""
    metrics = {}
    for label, point in work_points(modes):
        if progress:
            progress(label)
        for record in MEASURE[point.mode](point):
            for name, value in flatten(record).items():
                if is_deterministic(name):
                    metrics[f"{label} {record['workload']} {name}"] = value
    return metrics


# ---- tier 4: complexity ------------------------------------------------------------------------

@dataclass(frozen=True)
class ComplexitySpec:
    """What a mode's first-packet work should grow like against services.

    ``metrics`` are summed over the service_new workload; ``expected`` is the design's log-log
    slope, or a function of the service counts giving it; ``tolerance`` the allowed distance.
    """

    metrics: tuple[str, ...]
    expected: object
    tolerance: float
    why: str

    def expected_slope(self, services) -> float:
        return self.expected(services) if callable(self.expected) else float(self.expected)


def ipvs_chain_slope(services) -> float:
    """The slope the IPVS service table implies: 256 fixed chains, so a lookup compares
    1 + (V-1)/512 entries on average (V virtual services, one per ClusterIP service), flat
    while V is small and linear once V is well above 256."""
    v = np.asarray(services, dtype=float)
    return fit_loglog(v, 1 + (v - 1) / 512).slope


COMPLEXITY = {
    "iptables": ComplexitySpec(("entries_visited_mean",), 1.0, 0.2,
                               "KUBE-SERVICES is a linear list: one rule per service port"),
    "nftables": ComplexitySpec(("entries_visited_mean", "bucket_entries_compared_mean"), 0.0, 0.15,
                               "one verdict-map lookup, whatever the number of services"),
    "ipvs": ComplexitySpec(("svc_compares_mean",), ipvs_chain_slope, 0.15,
                           "the service table's 256 fixed hash chains"),
}
# Tolerances from evidence: fitted slopes measured 0.93 (iptables: the fixed filter-table walk
# pulls it under 1 at 100 services), 0.000 (nftables) and 0.60 against the chains' 0.62 (ipvs),
# identical run after run; a class change (flat → linear, linear → quadratic) moves a slope by 1.
# Two decades of services; the clusterip mix gives one table entry per service, so the
# x axis is the table size the design speaks of.
COMPLEXITY_SERVICES = (100, 300, 1000, 3000, 10000)
COMPLEXITY_SHAPE = {"endpoints": 1, "nodes": 10, "packets": 200, "seed": 0, "mix": "clusterip"}


@dataclass(frozen=True)
class SlopeCheck:
    mode: str
    slope: float
    ci_low: float
    ci_high: float
    r2: float
    expected: float
    tolerance: float
    why: str

    @property
    def passed(self) -> bool:
        return abs(self.slope - self.expected) <= self.tolerance


def check_slope(mode: str, services, work, spec: ComplexitySpec | None = None) -> SlopeCheck:
    spec = spec or COMPLEXITY[mode]
    fit = fit_loglog(services, work)
    return SlopeCheck(mode, fit.slope, fit.ci_low, fit.ci_high, fit.r2,
                      spec.expected_slope(services), spec.tolerance, spec.why)


def first_packet_work(mode: str, services: int, spec: ComplexitySpec | None = None) -> float:
    spec = spec or COMPLEXITY[mode]
    records = MEASURE[mode](Point(mode=mode, services=services, **COMPLEXITY_SHAPE))
    first = next(r for r in records if r["workload"] == "service_new")
    return float(sum(first[m] for m in spec.metrics))


def measure_complexity(modes=None, services=None, progress=None) -> list[SlopeCheck]:
    services = services or COMPLEXITY_SERVICES
    checks = []
    for mode in modes or MEASURE:
        if mode not in COMPLEXITY:
            continue
        work = []
        for count in services:
            if progress:
                progress(f"{mode} S={count}")
            work.append(first_packet_work(mode, count))
        checks.append(check_slope(mode, services, work))
    return checks
