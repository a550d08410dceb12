"""What every mode's data path shares: conntrack calls, NAT application, per-batch results
and the latency summary. Each mode's path lives in ``bench/measure/<mode>.py``."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bench.workload import POSITIONS, service_connections
from kernels import layout as L

LOOPBACK_NET, LOOPBACK_MASK = 0x7F000000, 0xFF000000
PERCENTILES = (1, 10, 25, 50, 75, 90, 95, 99)


@dataclass
class PathResult:
    """Per-packet outcome of one batch through the data path."""

    ns: np.ndarray  # int64, timer overhead subtracted
    conntrack_hit: np.ndarray  # bool
    nat: np.ndarray  # RESULT_DTYPE of the PREROUTING walk (zeros for conntrack hits)
    entries_visited: np.ndarray  # all tables, per packet
    nat_entries_visited: np.ndarray
    after_nat: np.ndarray  # the packets as the filter table saw them
    conntrack_compares: np.ndarray  # conntrack lookup, plus confirm for first packets


def is_local(addresses: np.ndarray, local: np.ndarray) -> np.ndarray:
    """The node's own addresses and 127.0.0.0/8: packets to them take INPUT."""
    loopback = (addresses & LOOPBACK_MASK) == LOOPBACK_NET
    return loopback | np.isin(addresses, local)


def conntrack_lookup(conntrack, packets: np.ndarray, timer_overhead: int):
    """Every packet's conntrack lookup: (found, entries compared, ns) per packet."""
    n = len(packets)
    found = np.zeros(n, dtype=np.uint8)
    compares = np.zeros(n, dtype=np.uint32)
    ns = np.zeros(n, dtype=np.int64)
    conntrack.lookup(packets, found, compares, ns)
    return found, compares.astype(np.int64), np.maximum(ns - timer_overhead, 0)


def confirm(conntrack, packets: np.ndarray, nat: np.ndarray) -> np.ndarray:
    """Confirm the first packets' connections; the entries each compared."""
    compares = np.zeros(len(packets), np.uint32)
    conntrack.confirm(packets, nat, compares)
    return compares


def apply_nat(packets: np.ndarray, nat: np.ndarray) -> np.ndarray:
    """The packets after the nat table: destination rewritten, mark and ctstate updated."""
    after = packets.copy()
    dnat = nat["verdict"] == L.V_DNAT
    after["dst"][dnat] = nat["dnat_ip"][dnat]
    has_port = dnat & (nat["dnat_port"] != 0)
    after["dport"][has_port] = nat["dnat_port"][has_port]
    after["mark"] = nat["mark"]
    after["ctstate"][dnat] |= L.CT_DNAT
    return after


def latency_summary(ns: np.ndarray) -> dict:
    """Percentiles (p01 … p99, the report's distribution) and the mean of per-packet ns."""
    values = np.percentile(ns, PERCENTILES)
    return {**{f"ns_p{q:02d}": float(v) for q, v in zip(PERCENTILES, values)}, "ns_mean": float(ns.mean())}


def nat_result(verdict: np.ndarray, dnat_ip: np.ndarray, dnat_port: np.ndarray) -> np.ndarray:
    nat = np.zeros(len(verdict), dtype=L.RESULT_DTYPE)
    nat["verdict"], nat["dnat_ip"], nat["dnat_port"] = verdict, dnat_ip, dnat_port
    return nat


def path_record(result) -> dict:
    """What every mode records of one workload's PathResult; throughput is one core's,
    packets per second at the mean latency."""
    summary = latency_summary(result.ns)
    return {**summary, "pps_per_core": 1e9 / max(summary["ns_mean"], 1.0),
            "entries_visited_mean": float(result.entries_visited.mean()),
            "nat_entries_visited_mean": float(result.nat_entries_visited.mean()),
            "conntrack_hit_fraction": float(result.conntrack_hit.mean()),
            "conntrack_compares_mean": float(result.conntrack_compares.mean())}


def position_results(datapath, cluster, ordered_infos, packets: int, seed: int) -> list[tuple[str, PathResult]]:
    """New connections to the first, middle and last service port of ``ordered_infos`` (the
    order the mode writes its rules in), as workloads service_new_first/_middle/_last.

    One service port's packets all take the same rule path, so a quarter of the point's
    packets give a stable p99."""
    count = max(packets // 4, 100)
    return [(f"service_new_{position}",
             datapath.process(service_connections(cluster, ordered_infos, count, seed + 10 + i, position)))
            for i, position in enumerate(POSITIONS)]
