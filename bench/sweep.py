"""The benchmark sweep behind `kpbench bench` / `make bench`.

A grid of points (services × endpoints per service × nodes) is run one point at a time:
generate the cluster, write kube-proxy's rules, load them into the kernels, and send three
kinds of packets through the node's data path. Each finished point is appended to
``results.jsonl`` at once, so an interrupted run loses nothing and a rerun skips the points
already there. Points are identified by a hash of their full configuration.

IPVS-mode points record, besides what iptables points do, the IPVS work per packet
(service-table and connection-table entries compared, destinations examined), memory by part
and the sync and update costs of bench/costs/ipvs.py. The service-table compares grow like
V/512 with V virtual services (256 fixed chains). :func:`ipvs_connection_scaling` shows the
connection table's growth, connections/8192 per established packet, at up to 1,000,000
connections (the default profile; 100,000 in quick): with no rule set involved it takes a few
seconds, so the largest size stays in.

nftables-mode points record the nft work per packet (rules started over all hooks, those at
PREROUTING, expressions, set lookups, …), memory, the full sync's write, load and compile
seconds, and the partial syncs of bench/costs/nftables.py. The default profile stops at
20,000 services for nftables: a 50,000-service point spends about 45 s writing, loading and
compiling the table (and twice more compiling the partial syncs), which would break the
profile's five-minute budget; the first-packet rule count is flat long before that.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

import bench
import kernels
from bench.cluster.generate import generate
from bench.cluster.model import service_ports
from bench.costs import iptables as iptables_costs
from bench.costs import ipvs as ipvs_costs
from bench.costs import nftables as nftables_costs
from bench.errors import InputError
from bench.loaders import ipvs as ipvs_loader
from bench.loaders.iptables import load
from bench.measure import IpvsDatapath, IptablesDatapath, NftablesDatapath, latency_summary
from bench.proxies import ipvs as ipvs_writer
from bench.proxies import nftables as nftables_writer
from bench.proxies.iptables import WriterOptions, rule_counts, write_full
from bench.results import ResultsWriter, read_jsonl
from bench.workload import EPHEMERAL_LOW, established, pod_connections, service_connections
from kernels import layout as L

PROFILES = {
    "quick": {"services": [100, 1000], "endpoints": [1, 10], "nodes": [10], "packets": 2000,
              "ipvs_connections": [10_000, 100_000]},
    # IPVS also runs at 50,000 services: its first packet does not scan the services, so the
    # point stays fast, and the issue asks to show the 256-bucket table's chains at that size.
    "default": {"services": [100, 1000, 5000, 10000, 20000], "endpoints": [1, 10], "nodes": [100],
                "packets": 20000, "services_by_mode": {"ipvs": [100, 1000, 5000, 10000, 20000, 50000]},
                "ipvs_connections": [10_000, 100_000, 1_000_000]},
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
    return [{**common, "workload": name, **_path_record(result)}
            for name, result in (("service_new", first), ("nonservice_new", to_pods), ("established", later))]


def _path_record(result) -> dict:
    """What every mode records of one workload's PathResult."""
    return {**latency_summary(result.ns),
            "entries_visited_mean": float(result.entries_visited.mean()),
            "nat_entries_visited_mean": float(result.nat_entries_visited.mean()),
            "conntrack_hit_fraction": float(result.conntrack_hit.mean()),
            "conntrack_compares_mean": float(result.conntrack_compares.mean())}


def measure_ipvs(point: Point) -> list[dict]:
    cluster = generate(point.services, point.endpoints, point.nodes, seed=point.seed, mix=point.mix)
    started = time.perf_counter()
    text = ipvs_writer.write(cluster, ipvs_writer.IpvsWriterOptions(include_jump_rules=True))
    write_seconds = time.perf_counter() - started
    started = time.perf_counter()
    ruleset = ipvs_loader.load(text, source=f"IPVS-mode rules for {point.services} services")
    load_seconds = time.perf_counter() - started
    datapath = IpvsDatapath(ruleset, cluster.config.node_ips, seed=point.seed)

    to_service = service_connections(cluster, service_ports(cluster), point.packets, seed=point.seed)
    first = datapath.process(to_service)
    to_pods = datapath.process(pod_connections(cluster, point.packets, seed=point.seed + 1))
    later = datapath.process(established(to_service))

    memory = ipvs_costs.kernel_bytes(ruleset, datapath.ipvs, point.cpus)
    sync = ipvs_costs.sync_operations(ruleset)
    common = {
        "kind": "point", "point_id": point.point_id, **asdict(point),
        "rules": {**sync, **ruleset.iptables.rule_counts()},
        "kernel_bytes": sum(memory.values()) + datapath.conntrack.modelled_bytes(),
        **{f"kernel_bytes_{part}": value for part, value in memory.items()},
        "model_bytes": datapath.ipvs.model_bytes() + datapath.conntrack.model_bytes()
                       + sum(t.blob.nbytes for t in ruleset.iptables.tables.values()),
        "sync_proxy_rules_write_seconds": write_seconds,
        "sync_proxy_rules_load_seconds": load_seconds,
        "sync_entries": sum(sync.values()),  # everything a sync lists, diffs or restores
        **ipvs_costs.measure_updates(ruleset, seed=point.seed),
    }
    return [{**common, "workload": name, **_path_record(result),
             **{f"{counter}_mean": float(result.ipvs[counter].mean()) for counter in L.IPVS_WORK_COUNTERS}}
            for name, result in (("service_new", first), ("nonservice_new", to_pods), ("established", later))]


def ipvs_connection_scaling(connections: list[int], services: int = 1000, packets: int = 20000,
                            seed: int = 0) -> dict:
    """Established-packet connection-lookup compares against live connections.

    One IPVS (1000 ClusterIP services, one endpoint each: the service side does not matter
    here) is filled with ``connections`` first packets from distinct clients, then a random
    sample of them sends a later packet. The connection table has 4096 chains and is never
    resized, so a hit compares about connections/8192 entries (half a chain)."""
    cluster = generate(services, 1, 10, seed=seed, mix="clusterip")
    ruleset = ipvs_loader.load(ipvs_writer.write(cluster), source="connection scaling")
    infos = service_ports(cluster)
    record = {"kind": "benchmark", "benchmark": "ipvs_connections", "services": services,
              "virtual_services": len(ruleset.services), "connections": list(connections)}
    for live in connections:
        ipvs = kernels.load("ipvs").IPVS.from_arrays(*ipvs_loader.kernel_arrays(ruleset.services), seed=seed)
        first = distinct_clients(service_connections(cluster, infos, live, seed=seed))
        results = np.zeros(live, dtype=L.IPVS_RESULT_DTYPE)
        ipvs.process(first, results)
        sample = established(first[np.random.default_rng(seed).integers(0, live, packets)])
        later = np.zeros(packets, dtype=L.IPVS_RESULT_DTYPE)
        ns = np.zeros(packets, dtype=np.int64)
        ipvs.process(sample, later, ns)
        record[f"conn_compares_mean_{live}"] = float(later["conn_compares"].mean())
        record[f"svc_compares_mean_{live}"] = float(results["svc_compares"].mean())
        record[f"established_ns_p50_{live}"] = float(np.median(ns))
    return record


def distinct_clients(packets: np.ndarray) -> np.ndarray:
    """Make every (source, source port) pair distinct: 28,232 ports per client address."""
    index = np.arange(len(packets))
    ports = 65536 - EPHEMERAL_LOW
    packets["src"] = 0x0A800000 + index // ports
    packets["sport"] = EPHEMERAL_LOW + index % ports
    return packets


def measure_nftables(point: Point) -> list[dict]:
    cluster = generate(point.services, point.endpoints, point.nodes, seed=point.seed, mix=point.mix)
    options = nftables_writer.WriterOptions(service_order_seed=point.seed)
    ruleset, compiled, full_sync = nftables_costs.full_sync(cluster, options, seed=point.seed)
    datapath = NftablesDatapath(ruleset, cluster.config.node_ips, seed=point.seed, compiled=compiled)

    to_service = service_connections(cluster, service_ports(cluster), point.packets, seed=point.seed)
    first = datapath.process(to_service)
    to_pods = datapath.process(pod_connections(cluster, point.packets, seed=point.seed + 1))
    later = datapath.process(established(to_service), established(first.after_nat))

    common = {
        "kind": "point", "point_id": point.point_id, **asdict(point),
        "rules": ruleset.stats(),
        **nftables_costs.memory(datapath),
        **full_sync,
        **nftables_costs.measure_updates(cluster, ruleset, options),
    }
    # entries_visited counts every hook's rules, as iptables' counts both tables;
    # nat_entries_visited is the PREROUTING hook, where the service is chosen.
    return [{**common, "workload": name, **_path_record(result),
             **{f"{counter}_mean": float(result.total(counter).mean()) for counter in L.NFT_WORK_COUNTERS}}
            for name, result in (("service_new", first), ("nonservice_new", to_pods), ("established", later))]


MEASURE = {"iptables": measure_iptables, "ipvs": measure_ipvs, "nftables": measure_nftables}
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
