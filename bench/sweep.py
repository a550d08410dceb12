"""The benchmark sweep behind `kpbench bench` / `make bench`.

A grid of points (services × endpoints per service × nodes) is run one point at a time:
generate the cluster, write kube-proxy's rules, load them into the kernels, and send three
kinds of packets through the node's data path. Each finished point is appended to
``results.jsonl`` at once, so an interrupted run loses nothing and a rerun skips the points
already there. Points are identified by a hash of their full configuration.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

import bench
import kernels
from bench.cluster.generate import generate
from bench.cluster.model import service_ports
from bench.costs import iptables as iptables_costs
from bench.errors import InputError
from bench.loaders.iptables import load
from bench.measure import IptablesDatapath, latency_summary
from bench.proxies.iptables import WriterOptions, rule_counts, write_full
from bench.results import ResultsWriter, read_jsonl
from bench.workload import established, pod_connections, service_connections

PROFILES = {
    "quick": {"services": [100, 1000], "endpoints": [1, 10], "nodes": [10], "packets": 2000},
    "default": {"services": [100, 1000, 5000, 10000, 20000], "endpoints": [1, 10], "nodes": [100],
                "packets": 20000},
}
MODELLED_CPUS = 64  # CPUs of the modelled node: per-CPU counters and jump stacks scale with it


@dataclass(frozen=True)
class Point:
    mode: str
    services: int
    endpoints: int
    nodes: int
    packets: int
    seed: int
    mix: str = "realistic"
    cpus: int = MODELLED_CPUS

    @property
    def point_id(self) -> str:
        config = {**asdict(self), "kpbench": bench.__version__, "backend": kernels.BACKEND}
        return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def grid(modes, services, endpoints, nodes, packets: int, seed: int) -> list[Point]:
    return [Point(m, s, e, n, packets, seed)
            for m in modes for n in nodes for e in endpoints for s in services]


def run_point(point: Point) -> list[dict]:
    """Measure one point: one record per workload."""
    return MEASURE[point.mode](point)


def measure_iptables(point: Point) -> list[dict]:
    cluster = generate(point.services, point.endpoints, point.nodes, seed=point.seed, mix=point.mix)
    infos = service_ports(cluster)
    started = time.perf_counter()
    text = write_full(cluster, WriterOptions(include_jump_rules=True, service_order_seed=point.seed))
    write_seconds = time.perf_counter() - started
    started = time.perf_counter()
    ruleset = load(text, source=f"iptables rules for {point.services} services")
    load_seconds = time.perf_counter() - started
    datapath = IptablesDatapath(ruleset, cluster.config.node_ips, seed=point.seed)

    to_service = service_connections(cluster, infos, point.packets, seed=point.seed)
    first = datapath.process(to_service)
    to_pods = datapath.process(pod_connections(cluster, point.packets, seed=point.seed + 1))
    later = datapath.process(established(to_service), established(first.after_nat))

    common = {
        "kind": "point", "point_id": point.point_id, **asdict(point),
        "rules": rule_counts(text),
        "kernel_bytes": iptables_costs.kernel_bytes(ruleset.tables, point.cpus)
                        + datapath.conntrack.modelled_bytes(),
        "model_bytes": sum(t.blob.nbytes for t in ruleset.tables.values())
                       + datapath.nat.counters.nbytes + datapath.filter.counters.nbytes
                       + datapath.conntrack.model_bytes(),
        "sync_proxy_rules_write_seconds": write_seconds,
        "sync_proxy_rules_load_seconds": load_seconds,
        "sync_entries": iptables_costs.sync_entries(ruleset.tables),
    }
    return [
        {**common, "workload": name, **latency_summary(result.ns),
         "entries_visited_mean": float(result.entries_visited.mean()),
         "nat_entries_visited_mean": float(result.nat_entries_visited.mean()),
         "conntrack_hit_fraction": float(result.conntrack_hit.mean())}
        for name, result in (("service_new", first), ("nonservice_new", to_pods),
                             ("established", later))
    ]


MEASURE = {"iptables": measure_iptables}
MODES = tuple(MEASURE)


def finished_points(path: Path) -> set[str]:
    if not path.exists():
        return set()
    try:
        return {r["point_id"] for r in read_jsonl(path) if r.get("kind") == "point"}
    except (ValueError, KeyError):
        raise InputError("not a kpbench results file (use --fresh to start over)", str(path)) from None


def run(points: list[Point], out: Path, fresh: bool = False, quiet: bool = False) -> Path:
    """Run every point not already in ``out/results.jsonl``; returns that path."""
    path = Path(out) / "results.jsonl"
    if fresh and path.exists():
        path.unlink()
    done = finished_points(path)
    writer = ResultsWriter(path)
    todo = [p for p in points if p.point_id not in done]
    bar = tqdm(todo, desc="sweep", unit="point", disable=quiet)
    for point in bar:
        bar.set_postfix_str(f"{point.mode} S={point.services} E={point.endpoints} N={point.nodes}")
        for record in run_point(point):
            writer.append(record)
    return path
