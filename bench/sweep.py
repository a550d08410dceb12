"""The benchmark sweep behind `kpbench bench` / `make bench`.

A grid of points (mode and variant × services × endpoints per service × nodes) is run one
point at a time: generate the cluster, write kube-proxy's rules, load them into the kernels,
send packets through the node's data path and time the syncs. Each finished point is appended
to ``results.jsonl`` at once, so an interrupted run loses nothing and a rerun skips the points
already there. Points are identified by a hash of their full configuration.

A profile is a list of blocks, each a small grid; the union of the blocks is the sweep, so
the services axis can run long at one node count while the nodes axis runs at a few service
counts. What a point measures is each mode's ``measure(point)`` in bench/measure/<mode>.py.
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
import time
import tracemalloc
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

import bench
import kernels
from bench.errors import InputError
from bench.measure import MEASURE
from bench.results import ResultsWriter, drop_torn_tail, peak_rss_bytes, proc_bytes, read_jsonl, reset_peak_rss

MODES = tuple(MEASURE)
MODELLED_CPUS = 64  # CPUs of the modelled node: per-CPU counters and jump stacks scale with it

# Variants a mode understands: "key=value" settings on top of kube-proxy's defaults.
VARIANT_KEYS = {
    "iptables": {"comments": ("off",)},  # "off": no rule comments at all (default: kube-proxy's)
    "ipvs": {"scheduler": ("rr", "wrr", "lc", "wlc", "sh", "dh", "mh", "sed", "nq")},
}
SERVICES_AXIS = [100, 1000, 5000, 10000, 20000]
# The modes the default profile sweeps along the whole services axis: iptables-nft stops at 5,000.
WHOLE_AXIS_MODES = [mode for mode in MEASURE if mode != "iptables-nft"]
FULL_SERVICES_AXIS = SERVICES_AXIS + [50000, 100000]
# The full profile's largest services count per mode (the others go to 100,000). IPVS mode's
# ipsets hold at most 65,536 entries (kube-proxy's maxelem), fewer than 100,000 services'
# ports, so its rules cannot be programmed there; iptables-nft and userspace have the slowest
# walks per packet and add nothing to the linear growth already measured by 20,000.
FULL_MAX_SERVICES = {"ipvs": 50000, "iptables-nft": 20000, "userspace": 20000}
FULL_SERVICES_BLOCKS = [
    {"services": [s for s in FULL_SERVICES_AXIS if s <= FULL_MAX_SERVICES.get(mode, s)],
     "endpoints": [1, 10], "nodes": [100], "modes": [mode]} for mode in MEASURE]
PROFILES = {
    "quick": {"packets": 2000, "ipvs_connections": [10_000, 100_000], "blocks": [
        {"services": [100, 1000], "endpoints": [1, 10], "nodes": [10]},
        {"services": [300], "endpoints": [3], "nodes": [100, 1000]},
        {"services": [300], "endpoints": [3], "nodes": [10],
         "variants": {"iptables": ["comments=off"], "ipvs": ["scheduler=mh"]}},
    ]},
    # Sized for a few minutes on 2 cores. E=10 runs the whole services axis, E=1 stops at 5,000;
    # iptables-nft (the slowest to walk and translate) stops at 5,000 services. IPVS and
    # nftables also run at 50,000 services with one endpoint each (their first packet does not
    # scan the services, so those points stay quick): IPVS shows its 256-bucket table's chains,
    # nftables its flat rule count. nftables also runs 250 endpoints per service.
    "default": {"packets": 5000, "ipvs_connections": [10_000, 100_000, 300_000],
                "axes": {"services": SERVICES_AXIS, "endpoints": [1, 10], "nodes": [100]}, "blocks": [
        {"services": SERVICES_AXIS, "endpoints": [10], "nodes": [100], "modes": WHOLE_AXIS_MODES},
        {"services": [100, 1000, 5000], "endpoints": [1], "nodes": [100], "modes": WHOLE_AXIS_MODES},
        {"services": [100, 1000, 5000], "endpoints": [1, 10], "nodes": [100], "modes": ["iptables-nft"]},
        {"services": [50000], "endpoints": [1], "nodes": [100], "modes": ["ipvs", "nftables"]},
        {"services": [100], "endpoints": [250], "nodes": [100], "modes": ["nftables"]},
        {"services": [1000], "endpoints": [3, 30], "nodes": [100]},
        {"services": [1000], "endpoints": [10], "nodes": [1000, 5000]},
        {"services": [1000], "endpoints": [10], "nodes": [100],
         "variants": {"iptables": ["comments=off"], "ipvs": ["scheduler=mh", "scheduler=sh"]}},
    ]},
    # To 100,000 services (1,000,000 endpoints) and 10,000 nodes in about 21 minutes on 2
    # cores, peaking at 6.85 GiB (see FULL_MAX_SERVICES).
    "full": {"packets": 20000, "ipvs_connections": [10_000, 100_000, 1_000_000],
             "axes": {"services": FULL_SERVICES_AXIS, "endpoints": [1, 10], "nodes": [100]}, "blocks": [
        *FULL_SERVICES_BLOCKS,
        {"services": [1000], "endpoints": [1, 3, 10, 30, 100], "nodes": [100]},
        {"services": [5000], "endpoints": [10], "nodes": [1000, 5000, 10000]},
        {"services": [20000], "endpoints": [10], "nodes": [10000]},
        {"services": [20000], "endpoints": [10], "nodes": [100],
         "variants": {"iptables": ["comments=off"],
                      "ipvs": ["scheduler=mh", "scheduler=sh", "scheduler=wrr"]}},
    ]},
}


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
    variant: str = ""  # "key=value[,key=value]" of VARIANT_KEYS; "" is kube-proxy's default

    @property
    def point_id(self) -> str:
        config = {**asdict(self), "kpbench": bench.__version__, "backend": kernels.BACKEND}
        if not self.variant:
            del config["variant"]  # ids of points measured before variants existed stay valid
        return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def settings(self) -> dict[str, str]:
        return parse_variant(self.variant)

    @property
    def label(self) -> str:
        variant = f" [{self.variant}]" if self.variant else ""
        return f"{self.mode}{variant} S={self.services:,} E={self.endpoints} N={self.nodes:,}"


def parse_variant(variant: str) -> dict[str, str]:
    """``"comments=off,scheduler=mh"`` → ``{"comments": "off", "scheduler": "mh"}``."""
    settings = {}
    for part in filter(None, variant.split(",")):
        key, sep, value = part.partition("=")
        if not sep or not key or not value:
            raise InputError(f"expected key=value, got {part!r}", "command line", "--variants")
        settings[key] = value
    return settings


def check_variant(mode: str, variant: str) -> None:
    known = VARIANT_KEYS.get(mode, {})
    for key, value in parse_variant(variant).items():
        if key not in known:
            raise InputError(f"{mode} has no variant {key!r} (it has: {', '.join(known) or 'none'})",
                             "command line", "--variants")
        if value not in known[key]:
            raise InputError(f"{mode} {key} must be one of {', '.join(known[key])}, got {value!r}",
                             "command line", "--variants")


def grid(modes, services, endpoints, nodes, packets: int, seed: int, variants=("",),
         cpus: int = MODELLED_CPUS) -> list[Point]:
    return [Point(m, s, e, n, packets, seed, cpus=cpus, variant=v)
            for m in modes for v in variants for n in nodes for e in endpoints for s in services]


def profile_points(profile: str, modes, seed: int, cpus: int = MODELLED_CPUS, services=None,
                   endpoints=None, nodes=None, packets: int | None = None,
                   variants: dict[str, list[str]] | None = None) -> list[Point]:
    """The points of a profile for the chosen modes, in order, without duplicates (a block's
    ``modes`` limits it to those modes).

    Any of ``services``/``endpoints``/``nodes`` replaces the profile's blocks with one block
    built from the profile's ``axes`` (else its first block) and the overrides; ``variants`` (mode → variants) adds variant
    points on that grid."""
    spec = PROFILES[profile]
    packets = spec["packets"] if packets is None else packets
    for name, values in (("--services", services), ("--endpoints", endpoints), ("--nodes", nodes),
                         ("--packets", [packets]), ("--cpus", [cpus])):
        for value in values or ():
            if value <= 0:
                raise InputError(f"must be a positive number, got {value}", "command line", name)
    blocks = spec["blocks"]
    if services or endpoints or nodes:
        first = spec.get("axes", blocks[0])
        blocks = [{"services": services or first["services"], "endpoints": endpoints or first["endpoints"],
                   "nodes": nodes or first["nodes"]}]
    if variants:
        blocks = blocks + [{**blocks[0], "variants": variants}]
    points: dict[str, Point] = {}
    for block in blocks:
        for mode in (m for m in modes if m in block.get("modes", modes)):
            wanted = block.get("variants", {mode: [""]}).get(mode, [])
            for variant in wanted:
                check_variant(mode, variant)
            for point in grid([mode], block["services"], block["endpoints"], block["nodes"], packets, seed, wanted, cpus):
                points.setdefault(point.point_id, point)
    return list(points.values())


# --- memory -------------------------------------------------------------------------------

# Peak bytes of the model process per endpoint and per service port while one point runs:
# the rule text, the parsed rules, the compiled tables and the data path's arrays. Fitted on
# measured peak RSS (results' peak_rss_bytes) with some headroom (iptables at 100,000 × 10:
# 6.85 GiB measured, 7.3 estimated); modes not listed use the most expensive per endpoint.
PEAK_BYTES_PER_ENDPOINT = {"iptables": 5500, "ipvs": 3000, "nftables": 3500, "ebpf": 2000, "other": 7500}
PEAK_BYTES_PER_SERVICE = {"iptables": 20000, "ipvs": 20000, "nftables": 20000, "ebpf": 5000, "other": 25000}
BASE_PROCESS_BYTES = 300 * 2**20  # the interpreter, numpy, pandas and the compiled kernels
CONNTRACK_BYTES_PER_PACKET = 2 * 400  # the data path's connections: two tuples each, generously


def estimate_point_bytes(point: Point) -> int:
    """A cheap upper estimate of one point's peak process memory."""
    per_endpoint = PEAK_BYTES_PER_ENDPOINT.get(point.mode, PEAK_BYTES_PER_ENDPOINT["other"])
    per_service = PEAK_BYTES_PER_SERVICE.get(point.mode, PEAK_BYTES_PER_SERVICE["other"])
    return (BASE_PROCESS_BYTES + point.services * per_service
            + point.services * point.endpoints * per_endpoint
            + 6 * point.packets * CONNTRACK_BYTES_PER_PACKET + point.nodes * 2000)


def memory_available() -> int:
    """MemAvailable from /proc/meminfo, in bytes (no limit where it cannot be read)."""
    available = proc_bytes("/proc/meminfo", "MemAvailable")
    return 1 << 62 if available is None else available


def check_memory(points: list[Point], available: int | None = None) -> None:
    """Refuse a grid whose largest point would not fit in the machine's memory."""
    if not points:
        return
    available = memory_available() if available is None else available
    largest = max(points, key=estimate_point_bytes)
    need = estimate_point_bytes(largest)
    if need > available:
        raise InputError(f"point {largest.label} needs about {need / 2**30:,.1f} GiB but only "
                         f"{available / 2**30:,.1f} GiB is available; lower --services/--endpoints "
                         "or choose a smaller --profile", "command line", "--profile")


# --- running ------------------------------------------------------------------------------

def run_point(point: Point, trace_memory: bool = False) -> list[dict]:
    """Measure one point: one record per workload, each with the point's memory and time.

    ``trace_memory`` also records tracemalloc's peak (Python objects and numpy arrays) during
    the point; it makes a point four to six times slower, so it is off by default."""
    reset_peak_rss()
    if trace_memory:
        tracemalloc.start()
    # The cyclic collector off while the point runs, as timeit does: the model allocates
    # millions of acyclic objects, and with a large ruleset loaded each collection walks all of
    # them (at 50,000 × 10 it doubled the point's time and made a partial sync's write 5x slower).
    gc.disable()
    started = time.perf_counter()
    try:
        records = MEASURE[point.mode](point)
    finally:
        seconds = time.perf_counter() - started
        gc.enable()
        traced = tracemalloc.get_traced_memory()[1] if trace_memory else None
        if trace_memory:
            tracemalloc.stop()
    extra = {"point_seconds": seconds, "peak_rss_bytes": peak_rss_bytes(),
             "estimated_peak_bytes": estimate_point_bytes(point), "variant": point.variant}
    if traced is not None:
        extra["traced_peak_bytes"] = traced
    return [with_control_plane_names({**record, **extra}) for record in records]


# Each mode's own names for its update costs → kube-proxy's metric names (added when missing).
CONTROL_PLANE_ALIASES = {
    "sync_partial_proxy_rules_duration_seconds": "endpoint_change_seconds",
    "sync_add_service_duration_seconds": "service_add_seconds",
    "sync_full_proxy_rules_operations": "sync_full_operations",
    "sync_partial_proxy_rules_operations": "endpoint_change_operations_total",
    "sync_add_service_operations": "service_add_operations_total",
}


def with_control_plane_names(record: dict) -> dict:
    """The record with kube-proxy's sync metric names, and cluster-wide programming work:
    every node runs the same proxy, so a change costs nodes × one node's sync."""
    for name, source in CONTROL_PLANE_ALIASES.items():
        if name not in record and source in record:
            record[name] = record[source]
    for name in ("sync_full_proxy_rules_duration_seconds", "sync_partial_proxy_rules_duration_seconds",
                 "sync_add_service_duration_seconds"):
        if name in record and "nodes" in record:
            record[f"cluster_{name.removesuffix('_duration_seconds')}_cpu_seconds"] = record[name] * record["nodes"]
    return record


def finished_points(path: Path) -> set[str]:
    """Ids of the points whose records are all in the file (each record says how many the
    point wrote; files from before that count every point listed). A point cut short by a
    kill mid-write has its records removed, so that its rerun does not repeat them."""
    if not path.exists():
        return set()
    try:
        records = read_jsonl(path)
        written = Counter(r["point_id"] for r in records if r.get("kind") == "point")
        partial = {r["point_id"] for r in records
                   if r.get("kind") == "point" and written[r["point_id"]] < r.get("point_records", 1)}
    except (ValueError, KeyError, TypeError):
        raise InputError("not a kpbench results file (use --fresh to start over)", str(path)) from None
    if partial:
        lines = [line for line in path.read_text().splitlines(keepends=True) if line.strip()]
        kept = [line for line, r in zip(lines, records)
                if r.get("point_id") not in partial or r.get("kind") != "point"]
        replace_file(path, "".join(kept))
    return set(written) - partial


def replace_file(path: Path, text: str) -> None:
    """Replace ``path``'s contents all at once (a kill leaves the old or the new file)."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def point_weight(point: Point) -> float:
    """Relative cost of a point, for the progress bar's ETA: rules grow with S·(E + 2)."""
    return 1.0 + point.services * (point.endpoints + 2) / 1000


def run(points: list[Point], out: Path, fresh: bool = False, quiet: bool = False,
        trace_memory: bool = False) -> Path:
    """Run every point not already in ``out/results.jsonl``; returns that path."""
    path = Path(out) / "results.jsonl"
    if fresh and path.exists():
        path.unlink()
    drop_torn_tail(path)
    done = finished_points(path)
    writer = ResultsWriter(path)
    todo = [p for p in points if p.point_id not in done]
    writing = 0.0  # seconds the previous point's records took to write and flush
    bar = tqdm(total=round(sum(map(point_weight, todo)), 1), disable=quiet, unit="",
               bar_format="{l_bar}{bar}| {postfix} [{elapsed}<{remaining}]", desc="sweep")
    for index, point in enumerate(todo, 1):
        bar.set_postfix_str(f"point {index}/{len(todo)}: {point.label}")
        started = time.perf_counter()
        records = run_point(point, trace_memory)
        written = time.perf_counter()
        for record in records:
            # What the harness spent around the point's own measurement: its probes, and
            # writing the previous point's records. Reported so that it can be watched.
            record["harness_seconds"] = written - started - record["point_seconds"] + writing
            record["point_records"] = len(records)
        writer.append_all(records)
        writing = time.perf_counter() - written
        bar.update(round(point_weight(point), 1))
    bar.close()
    return path
