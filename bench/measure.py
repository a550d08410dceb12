"""One node's data path, assembled from the kernels, and the measurements taken on it.

The path is the kernel's (kernel-internals §4.3). A packet first meets conntrack. On a miss
(the first packet of a connection) the nat table runs at PREROUTING, the DNAT is applied, the
filter table runs at INPUT or FORWARD, the nat table runs again at POSTROUTING, and conntrack
confirms the connection (two tuple entries). On a hit, NAT is applied from conntrack with no
rule walk and only the filter table runs. Each stage is a nogil batch call that adds its own
time per packet into one ``ns`` array, less the timer's own overhead.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import kernels
from bench.loaders.iptables import Ruleset
from bench.netaddr import ip_to_int
from kernels import layout as L

LOOPBACK_NET, LOOPBACK_MASK = 0x7F000000, 0xFF000000


@dataclass
class PathResult:
    """Per-packet outcome of one batch through the data path."""

    ns: np.ndarray  # int64, timer overhead subtracted
    conntrack_hit: np.ndarray  # bool
    nat: np.ndarray  # RESULT_DTYPE of the PREROUTING walk (zeros for conntrack hits)
    entries_visited: np.ndarray  # all tables, per packet
    nat_entries_visited: np.ndarray
    after_nat: np.ndarray  # the packets as the filter table saw them


class IptablesDatapath:
    """conntrack + the nat and filter tables of one node, on one kernel backend."""

    def __init__(self, ruleset: Ruleset, node_ips: list[str], seed: int = 0,
                 backend: str | None = None, conntrack_buckets: int = 262144):
        iptables = kernels.load("iptables", backend)
        conntrack = kernels.load("conntrack", backend)
        self.local = np.array(sorted(ip_to_int(ip) for ip in node_ips), dtype=np.uint32)
        self.nat = iptables.Table.from_compiled(ruleset.tables["nat"], self.local, seed=seed)
        self.filter = iptables.Table.from_compiled(ruleset.tables["filter"], self.local, seed=seed + 1)
        self.conntrack = conntrack.ConntrackTable(buckets=conntrack_buckets, seed=seed)
        self.timer_overhead = int(iptables.timer_overhead_ns())

    def is_local(self, addresses: np.ndarray) -> np.ndarray:
        loopback = (addresses & LOOPBACK_MASK) == LOOPBACK_NET
        return loopback | np.isin(addresses, self.local)

    def _walk(self, table, packets: np.ndarray, hook: int, ns: np.ndarray) -> np.ndarray:
        results = np.zeros(len(packets), dtype=L.RESULT_DTYPE)
        stage_ns = np.zeros(len(packets), dtype=np.int64)
        table.run(packets, hook, results, stage_ns)
        ns += np.maximum(stage_ns - self.timer_overhead, 0)
        return results

    def _filter(self, packets: np.ndarray, ns: np.ndarray) -> np.ndarray:
        """Filter INPUT for local destinations, FORWARD for the rest, in two batches."""
        results = np.zeros(len(packets), dtype=L.RESULT_DTYPE)
        local = self.is_local(packets["dst"])
        for hook, chosen in ((L.HOOK_INPUT, local), (L.HOOK_FORWARD, ~local)):
            index = np.flatnonzero(chosen)
            if index.size:
                part_ns = np.zeros(index.size, dtype=np.int64)
                results[index] = self._walk(self.filter, packets[index], hook, part_ns)
                ns[index] += part_ns
        return results

    def process(self, packets: np.ndarray, established_after_nat: np.ndarray | None = None) -> PathResult:
        """Send a batch through the path.

        ``established_after_nat``: for packets of known connections, what conntrack's stored NAT
        turns them into (the model's conntrack keeps tuples, not the mapping, so callers that
        replay connections pass the post-NAT packets from the first pass).
        """
        n = len(packets)
        ns = np.zeros(n, dtype=np.int64)
        found = np.zeros(n, dtype=np.uint8)
        compares = np.zeros(n, dtype=np.uint32)
        lookup_ns = np.zeros(n, dtype=np.int64)
        self.conntrack.lookup(packets, found, compares, lookup_ns)
        ns += np.maximum(lookup_ns - self.timer_overhead, 0)

        new = np.flatnonzero(found == 0)
        nat = np.zeros(n, dtype=L.RESULT_DTYPE)
        after = packets.copy() if established_after_nat is None else established_after_nat.copy()
        if new.size:
            new_ns = np.zeros(new.size, dtype=np.int64)
            nat[new] = self._walk(self.nat, packets[new], L.HOOK_PREROUTING, new_ns)
            ns[new] += new_ns
            after[new] = apply_nat(packets[new], nat[new])
        filt = self._filter(after, ns)
        post = np.zeros(n, dtype=L.RESULT_DTYPE)
        if new.size:
            post_ns = np.zeros(new.size, dtype=np.int64)
            post[new] = self._walk(self.nat, after[new], L.HOOK_POSTROUTING, post_ns)
            ns[new] += post_ns
            self.conntrack.confirm(packets[new], nat[new], np.zeros(new.size, np.uint32))
        visited = (nat["entries_visited"].astype(np.int64) + filt["entries_visited"]
                   + post["entries_visited"])
        return PathResult(ns, found == 1, nat, visited, nat["entries_visited"].astype(np.int64), after)


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
    """p50/p90/p99/mean of per-packet nanoseconds."""
    p50, p90, p99 = np.percentile(ns, [50, 90, 99])
    return {"ns_p50": float(p50), "ns_p90": float(p90), "ns_p99": float(p99),
            "ns_mean": float(ns.mean())}
