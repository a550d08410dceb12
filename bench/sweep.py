"""The benchmark sweep behind `kpbench bench` / `make bench`.

A grid of points (services × endpoints per service × nodes) is run one point at a time:
generate the cluster, write kube-proxy's rules, load them into the kernels, and send three
kinds of packets through the node's data path. Each finished point is appended to
``results.jsonl`` at once, so an interrupted run loses nothing and a rerun skips the points
already there. Points are identified by a hash of their full configuration.

What a point measures is each mode's ``measure(point)`` in bench/measure/<mode>.py.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

import bench
import kernels
from bench.errors import InputError
from bench.measure import MEASURE
from bench.results import ResultsWriter, read_jsonl

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
