"""Benchmarks of kpbench itself, reported by `kpbench bench` next to the sweep (never tests).

- the Cython kernel's speed against its pure-Python twin on the same 10,000-service work;
- nanoseconds per visited entry of the compiled iptables walk;
- time and peak memory to load a 20,000-service × 10-endpoint ruleset, in a fresh process.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import kernels
from bench.cluster.generate import generate
from bench.cluster.model import service_ports
from bench.loaders.iptables import load, load_file
from bench.proxies.iptables import WriterOptions, write_full
from bench.results import peak_rss_bytes, reset_peak_rss
from bench.workload import pod_connections, service_connections
from kernels import layout as L


def _nat_tables(services: int, endpoints: int, seed: int):
    cluster = generate(services, endpoints, 100, seed=seed)
    ruleset = load(write_full(cluster, WriterOptions(include_jump_rules=True, service_order_seed=seed)))
    return cluster, ruleset


def _walk(table, packets) -> tuple[np.ndarray, np.ndarray, float]:
    """Results, wall ns per packet, and the thread's CPU ns per packet over the batch.

    CPU time is what the speed ratio uses: on a shared machine, wall time charges other
    processes' time slices to whichever walk is longer.
    """
    results = np.zeros(len(packets), dtype=L.RESULT_DTYPE)
    ns = np.zeros(len(packets), dtype=np.int64)
    started = time.thread_time_ns()
    table.run(packets, L.HOOK_PREROUTING, results, ns)
    return results, ns, (time.thread_time_ns() - started) / len(packets)


def kernel_speed(services: int = 10000, endpoints: int = 10, packets: int = 300, seed: int = 0) -> dict:
    """Cython against the twin on identical first packets, to services and not to services.

    Also ns per visited entry of the compiled walk, over a longer run of full scans.
    """
    cluster, ruleset = _nat_tables(services, endpoints, seed)
    local = np.array([], dtype=np.uint32)
    workloads = {"service": service_connections(cluster, service_ports(cluster), packets, seed),
                 "nonservice": pod_connections(cluster, packets, seed + 1)}
    record = {"kind": "benchmark", "benchmark": "kernel_speed", "services": services,
              "endpoints": endpoints, "packets": packets, "seed": seed, "identical_results": True}
    tables = {backend: kernels.load("iptables", backend).Table.from_compiled(ruleset.tables["nat"], local, seed=seed)
              for backend in ("cython", "python")}
    for workload, batch in workloads.items():
        cpu, outputs = {}, {}
        for backend, table in tables.items():
            table.reseed(seed)
            outputs[backend], ns, cpu[backend] = _walk(table, batch)
            record[f"{workload}_{backend}_ns_p50"] = float(np.median(ns))
            record[f"{workload}_{backend}_cpu_ns_mean"] = cpu[backend]
        record[f"{workload}_speedup"] = cpu["python"] / max(cpu["cython"], 1.0)
        record["identical_results"] &= bool(np.array_equal(outputs["cython"], outputs["python"]))
    results, ns, _ = _walk(tables["cython"], pod_connections(cluster, 20 * packets, seed + 2))
    record["ns_per_visited_entry"] = float(ns.sum() / results["entries_visited"].sum())
    return record


def load_cost(services: int = 20000, endpoints: int = 10, seed: int = 0) -> dict:
    """Time and peak RSS of loading a large ruleset, measured in a fresh Python process."""
    cluster = generate(services, endpoints, 100, seed=seed)
    text = write_full(cluster, WriterOptions(include_jump_rules=True, service_order_seed=seed))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rules.txt"
        path.write_text(text)
        out = subprocess.run([sys.executable, "-m", "bench.benchmarks", str(path)],
                             capture_output=True, text=True, check=True)
    probe = json.loads(out.stdout)
    return {"kind": "benchmark", "benchmark": "load_ruleset", "services": services,
            "endpoints": endpoints, "seed": seed, "rules_bytes": len(text), **probe}


def _probe_load(path: str) -> dict:
    """Run in the child: reset the peak-RSS mark, load, report time and the new peak."""
    text_size = Path(path).stat().st_size
    reset_peak_rss()
    started = time.perf_counter()
    ruleset = load_file(path)
    seconds = time.perf_counter() - started
    return {"load_seconds": seconds, "peak_rss_bytes": peak_rss_bytes(), "text_bytes": text_size,
            "entries": sum(t.n_entries for t in ruleset.tables.values())}


if __name__ == "__main__":
    print(json.dumps(_probe_load(sys.argv[1])))
