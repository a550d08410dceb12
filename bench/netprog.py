"""Network programming latency at cluster scale: N nodes, each running kube-proxy's sync loop.

kube-proxy reports ``network_programming_duration_seconds``: from an endpoint change to the
end of the sync that programs it. Each node runs the change through its own sync loop, a
BoundedFrequencyRunner (pkg/util/async):

* a change requests a sync; the runner never runs two syncs at once, so a change that
  arrives during a sync waits for the next one;
* a token bucket bounds the rate: one token per ``min_sync_period`` (default 1 s), at most
  ``burst`` saved up (kube-proxy uses 2); a sync takes a token or waits for one;
* a sync runs at least every ``sync_period`` (default 30 s) with no change at all;
* with partial syncs (iptables' MinimizeIPTablesRestore, nftables) only a sync at least
  ``full_sync_period`` after the last full one is full (current kube-proxy: one hour; the
  KEP-3453 comparison uses 30 s, the periodic sync of kube-proxy 1.26, whose full resyncs the
  KEP names as what dominates p90/p99); without them every sync is full.

Sync durations come from the sweep's measured costs (``sync_full_proxy_rules_duration_seconds``
and ``sync_partial_proxy_rules_duration_seconds``), varied per sync by a seeded log-normal
factor. Changes arrive cluster-wide as a seeded Poisson process and every node sees each one
``watch_delay`` after it happened (the apiserver and the watch; 0 by default).

All nodes advance together, one sync per step, as numpy arrays. Nodes do not interact:
each sees the same changes and runs its own loop, so the latency distribution of N nodes is
that of a sample of them; at most ``SIMULATED_NODES`` are simulated (the cluster's size still
sets the churn and the sync costs).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from bench.errors import InputError


SAMPLED_CHANGES = 1000
SIMULATED_NODES = 500


@dataclass(frozen=True)
class SyncLoop:
    """One node's sync loop settings, kube-proxy's defaults."""

    min_sync_period: float = 1.0
    sync_period: float = 30.0
    burst: int = 2
    partial: bool = True
    full_sync_period: float = 3600.0


@dataclass(frozen=True)
class Scenario:
    nodes: int
    full_seconds: float  # one node's full sync
    partial_seconds: float  # one node's partial sync
    churn_per_second: float  # endpoint changes per second, cluster-wide
    duration: float = 300.0  # seconds of changes simulated (after the warm-up)
    warmup: float = 60.0  # seconds before changes count: the nodes' start is not steady state
    watch_delay: float = 0.0
    jitter: float = 0.1  # sigma of the log-normal factor on every sync's duration
    seed: int = 0


@dataclass
class Syncs:
    """Every node's syncs: start and end times, and whether each was full (nodes × syncs,
    padded with +inf)."""

    start: np.ndarray
    end: np.ndarray
    full: np.ndarray


def check(scenario: Scenario, loop: SyncLoop) -> None:
    for name, value in (("nodes", scenario.nodes), ("min_sync_period", loop.min_sync_period),
                        ("sync_period", loop.sync_period), ("burst", loop.burst),
                        ("full_sync_seconds", scenario.full_seconds),
                        ("partial_sync_seconds", scenario.partial_seconds)):
        if not value > 0:
            raise InputError(f"must be positive, got {value}", "network programming simulation", name)
    if scenario.churn_per_second < 0 or scenario.watch_delay < 0:
        raise InputError("must not be negative", "network programming simulation", "churn/watch delay")


def change_times(scenario: Scenario) -> np.ndarray:
    """Cluster-wide endpoint changes: a seeded Poisson process over the measured window."""
    rng = np.random.default_rng([scenario.seed, 1])
    count = rng.poisson(scenario.churn_per_second * scenario.duration)
    return np.sort(scenario.warmup + rng.uniform(0, scenario.duration, count))


def simulate_syncs(scenario: Scenario, loop: SyncLoop, changes: np.ndarray,
                   first_sync: np.ndarray | None = None) -> Syncs:
    """Run every node's sync loop until each has started a sync after the last change.

    ``first_sync``: each node's first (full) sync start; default a seeded uniform spread over
    one sync period before 0, so the nodes' periodic syncs are not in step."""
    check(scenario, loop)
    rng = np.random.default_rng([scenario.seed, 2])
    n = min(scenario.nodes, SIMULATED_NODES) if first_sync is None else len(first_sync)
    seen = changes + scenario.watch_delay
    horizon = seen[-1] if seen.size else -np.inf  # a sync starting then includes the last change
    start = -rng.uniform(0, loop.sync_period, n) if first_sync is None else np.asarray(first_sync, float)
    end = start + scenario.full_seconds * _jitter(rng, n, scenario.jitter)
    last_full = start.copy()
    tokens = np.full(n, loop.burst - 1.0)
    starts, ends, fulls = [start], [end], [np.ones(n, bool)]
    while (start < horizon).any():
        # The first change this node's last sync did not include, or the periodic timer.
        pending = np.searchsorted(seen, start, side="right")
        next_change = np.where(pending < seen.size, seen[np.minimum(pending, max(seen.size - 1, 0))], np.inf) \
            if seen.size else np.full(n, np.inf)
        wanted = np.minimum(next_change, start + loop.sync_period)
        ready = np.maximum(wanted, end)
        saved = np.minimum(loop.burst, tokens + (ready - start) / loop.min_sync_period)
        begin = ready + np.maximum(1.0 - saved, 0.0) * loop.min_sync_period
        tokens = np.maximum(saved, 1.0) - 1.0
        full = ~np.full(n, loop.partial) | (begin - last_full >= loop.full_sync_period)
        seconds = np.where(full, scenario.full_seconds, scenario.partial_seconds) * _jitter(rng, n, scenario.jitter)
        done = start >= horizon  # finished nodes keep their last sync; their new rows are padding
        start = np.where(done, start, begin)
        end = np.where(done, end, begin + seconds)
        last_full = np.where(full & ~done, begin, last_full)
        starts.append(np.where(done, np.inf, start))
        ends.append(np.where(done, np.inf, end))
        fulls.append(full & ~done)
    return Syncs(np.stack(starts, 1), np.stack(ends, 1), np.stack(fulls, 1))


def _jitter(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    return rng.lognormal(-sigma * sigma / 2, sigma, n) if sigma > 0 else np.ones(n)


def latencies(syncs: Syncs, changes: np.ndarray, watch_delay: float = 0.0) -> np.ndarray:
    """nodes × changes: from each change to the end of the first sync on each node that
    started after the node saw it."""
    n, width = syncs.start.shape
    if not changes.size:
        return np.zeros((n, 0))
    finite = syncs.start[np.isfinite(syncs.start)]
    span = (finite.max() - min(finite.min(), changes.min())) + 1.0
    # One sorted array for all nodes: node i's starts shifted by i·span (rows are increasing).
    base = min(finite.min(), changes.min())
    offsets = (np.arange(n) * 2 * span)[:, None]
    flat = (np.where(np.isfinite(syncs.start), syncs.start - base, 1.5 * span) + offsets).ravel()
    queries = (changes + watch_delay - base)[None, :] + offsets
    index = np.searchsorted(flat, queries.ravel(), side="left").reshape(n, changes.size)
    return syncs.end.ravel()[index] - changes[None, :]


def simulate(scenario: Scenario, loop: SyncLoop = SyncLoop()) -> dict:
    """The scenario's network programming latency summary and the sync loop's work."""
    check(scenario, loop)
    changes = change_times(scenario)
    syncs = simulate_syncs(scenario, loop, changes)
    # Every node sees every change: a thousand changes, evenly spread, are plenty.
    sample = changes[np.linspace(0, changes.size - 1, min(changes.size, SAMPLED_CHANGES)).astype(int)] \
        if changes.size else changes
    values = latencies(syncs, sample, scenario.watch_delay).ravel()
    window = (syncs.start >= scenario.warmup) & (syncs.start <= scenario.warmup + scenario.duration)
    minutes = scenario.duration / 60
    summary = {"changes": int(changes.size), "simulated_nodes": int(syncs.start.shape[0]),
               "syncs_per_node_per_minute": float(window.sum() / syncs.start.shape[0] / minutes),
               "full_sync_share": float((syncs.full & window).sum() / max(window.sum(), 1))}
    if values.size:
        p50, p90, p99 = np.percentile(values, [50, 90, 99])
        summary.update({"network_programming_duration_seconds_p50": float(p50),
                        "network_programming_duration_seconds_p90": float(p90),
                        "network_programming_duration_seconds_p99": float(p99),
                        "network_programming_duration_seconds_mean": float(values.mean())})
    return summary


# --- from the sweep's results -------------------------------------------------------------

# KEP-3453's 5,000-node figures (published-figures.md §3): p50/p90/p99 in seconds, with the
# middle of the chart's ranges where the KEP gives no exact number.
KEP3453 = (
    ("full restores, minSyncPeriod 10 s", SyncLoop(min_sync_period=10.0, partial=False), (27, 34, 44)),
    ("partial restores, minSyncPeriod 10 s", SyncLoop(min_sync_period=10.0, full_sync_period=30.0), (13, 19, 26)),
    ("partial restores, minSyncPeriod 1 s", SyncLoop(min_sync_period=1.0, full_sync_period=30.0), (5, 18, 24)),
)
KEP_NODES = 5000
WHAT_IF_PARTIAL_SHARE = 0.15
CHANGES_PER_NODE_PER_SECOND = 0.01  # about one endpoint change per node every 100 s


def sync_costs(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per measured (mode, services, endpoints, nodes) of kube-proxy's default
    variant: its full and partial sync seconds."""
    points = frame[(frame["kind"] == "point")]
    if "variant" in points:
        points = points[points["variant"].fillna("") == ""]
    needed = ["sync_full_proxy_rules_duration_seconds", "sync_partial_proxy_rules_duration_seconds"]
    if points.empty or any(c not in points for c in needed):
        return pd.DataFrame(columns=["mode", "services", "endpoints", "nodes", *needed])
    points = points.dropna(subset=needed)
    return points.groupby(["mode", "services", "endpoints", "nodes"], as_index=False)[needed].median()


def scenario_id(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:16]


def records_from_results(frame: pd.DataFrame, seed: int = 0, duration: float = 300.0) -> list[dict]:
    """Network programming latency for every mode's measured sync costs, and the KEP-3453
    comparison from iptables' largest measured point.

    Each measured (mode, services, endpoints, nodes) runs at its own node count with churn
    ``nodes × CHANGES_PER_NODE_PER_SECOND`` and kube-proxy's default loop."""
    records = []
    for row in sync_costs(frame).itertuples(index=False):
        nodes = int(row.nodes)
        scenario = Scenario(nodes, row.sync_full_proxy_rules_duration_seconds,
                            row.sync_partial_proxy_rules_duration_seconds,
                            nodes * CHANGES_PER_NODE_PER_SECOND, duration=duration, seed=seed)
        records.append(_record(row.mode, int(row.services), int(row.endpoints), scenario, SyncLoop(), "default loop"))
    costs = sync_costs(frame)
    iptables = costs[costs["mode"] == "iptables"]
    if not iptables.empty:
        largest = iptables.sort_values(["services", "endpoints", "nodes"]).iloc[-1]
        full = largest.sync_full_proxy_rules_duration_seconds
        # The model's partial sync recompiles the whole table in Python, so it costs most of a
        # full one; kube-proxy's costs a small part of it (the KEP's halved p50 implies so).
        # The what-if keeps the measured full sync and takes a partial one at that share.
        for costs, partial in (("measured", largest.sync_partial_proxy_rules_duration_seconds),
                               (f"partial = {WHAT_IF_PARTIAL_SHARE:g} x full", WHAT_IF_PARTIAL_SHARE * full)):
            scenario = Scenario(KEP_NODES, full, partial, KEP_NODES * CHANGES_PER_NODE_PER_SECOND,
                                duration=duration, seed=seed)
            for name, loop, published in KEP3453:
                record = _record("iptables", int(largest.services), int(largest.endpoints), scenario, loop, name)
                record.update({"scenario": "kep3453", "costs": costs, "published_p50": published[0],
                               "published_p90": published[1], "published_p99": published[2]})
                records.append(record)
    return records


def _record(mode: str, services: int, endpoints: int, scenario: Scenario, loop: SyncLoop, name: str) -> dict:
    record = {"kind": "netprog", "mode": mode, "services": services, "endpoints": endpoints,
              "loop": name, **asdict(scenario), **asdict(loop)}
    record["netprog_id"] = scenario_id(record)
    return {**record, **simulate(scenario, loop)}
