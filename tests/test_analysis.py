"""Complexity fits and crossovers on synthetic results with known slopes and crossings."""
import numpy as np
import pandas as pd
import pytest

from bench.analysis import COMPLEXITY_COLUMNS, CROSSOVER_COLUMNS, complexity, crossovers, fit_loglog

SERVICES = [100, 300, 1000, 3000, 10000]


def test_fit_loglog_recovers_a_power_law():
    x = np.array(SERVICES, float)
    fit = fit_loglog(x, 3 * x ** 1.5)
    assert fit.slope == pytest.approx(1.5) and fit.r2 == pytest.approx(1.0) and fit.n == 5
    noisy = fit_loglog(x, x ** 0.5 * np.random.default_rng(1).lognormal(0, 0.05, len(x)))
    assert noisy.ci_low < 0.5 < noisy.ci_high and noisy.r2 < 1


def _points(rows_per_mode) -> pd.DataFrame:
    rows = []
    for mode, make in rows_per_mode.items():
        for services in SERVICES:
            for endpoints in (1, 3, 10):
                for workload in ("service_new", "established"):
                    rows.append({"kind": "point", "mode": mode, "variant": "", "workload": workload,
                                 "services": services, "endpoints": endpoints, "nodes": 100,
                                 **make(services, endpoints, workload)})
    return pd.DataFrame(rows)


def linear_scan(services, endpoints, workload):
    scan = 2.0 * services if workload == "service_new" else 5.0
    return {"entries_visited_mean": scan, "ns_p50": 10.0 * scan, "kernel_bytes": 500.0 * services * endpoints,
            "sync_full_proxy_rules_duration_seconds": 1e-4 * services * endpoints}


def hashed(services, endpoints, workload):
    return {"entries_visited_mean": 5.0, "ns_p50": 2000.0 * np.sqrt(endpoints),
            "kernel_bytes": 1e6 + 10.0 * services, "sync_full_proxy_rules_duration_seconds": 0.01}


def test_complexity_finds_the_known_slopes():
    table = complexity(_points({"iptables": linear_scan, "ipvs": hashed}))
    assert list(table.columns) == COMPLEXITY_COLUMNS

    def slope(mode, workload, metric, against):
        row = table[(table["mode"] == mode) & (table["workload"] == workload) & (table["metric"] == metric)
                    & (table["against"] == against)]
        assert len(row) == 1
        return row.iloc[0]

    assert slope("iptables", "service_new", "entries_visited_mean", "services")["slope"] == pytest.approx(1.0)
    assert slope("iptables", "established", "entries_visited_mean", "services")["slope"] == pytest.approx(0.0)
    assert slope("ipvs", "service_new", "ns_p50", "endpoints")["slope"] == pytest.approx(0.5)
    assert slope("iptables", "memory", "kernel_bytes", "endpoints")["slope"] == pytest.approx(1.0)
    assert slope("iptables", "sync", "sync_full_proxy_rules_duration_seconds", "services")["r2"] == pytest.approx(1.0)
    assert slope("ipvs", "memory", "kernel_bytes", "services")["slope"] < 0.1  # mostly the fixed part
    assert (table["n"] >= 3).all()


def test_complexity_fits_connections_from_the_ipvs_benchmark():
    record = {"kind": "benchmark", "benchmark": "ipvs_connections"}
    for n in (10_000, 100_000, 1_000_000):
        record[f"conn_compares_mean_{n}"] = n / 8192
        record[f"established_ns_p50_{n}"] = 100.0
    table = complexity(pd.DataFrame([record]))
    row = table[(table["against"] == "connections") & (table["metric"] == "conn_compares_mean")].iloc[0]
    assert row["mode"] == "ipvs" and row["slope"] == pytest.approx(1.0)


def test_crossovers_are_interpolated_in_log_space():
    # iptables' first packet costs 20·S ns; ipvs' 2000·sqrt(E) ns: equal at S = 100·sqrt(E).
    table = crossovers(_points({"iptables": linear_scan, "ipvs": hashed}))
    assert list(table.columns) == CROSSOVER_COLUMNS
    first_packet = table[(table["metric"] == "ns_p50") & (table["workload"] == "service_new")]
    assert len(first_packet) == 1
    row = first_packet.iloc[0]
    assert (row["mode_a"], row["mode_b"]) == ("iptables", "ipvs")  # iptables cheaper below
    # Both curves are straight in log-log, so the interpolation is exact (E = 10 is shared).
    assert row["services"] == pytest.approx(100 * np.sqrt(10))
    # Sync: 1e-4·S·E against 0.01 s, equal at S = 10 for E = 10: below the sizes measured.
    assert table[table["metric"] == "sync_full_proxy_rules_duration_seconds"].empty


def test_no_points_no_rows():
    empty = pd.DataFrame([{"kind": "benchmark", "benchmark": "kernel_speed"}])
    assert complexity(empty).empty and crossovers(empty).empty
