"""nftables mode's data path (:class:`NftablesDatapath`) and its sweep point.

nftables-mode points record the nft work per packet (rules started over all hooks, those at
PREROUTING, expressions, set lookups, …), memory, the full sync's write, load and compile
seconds, and the partial syncs of bench/costs/nftables.py, applied to the live table in place
(O(changed chains and elements)). The writer keeps kube-proxy's state between the full sync
and the partial syncs (bench.proxies.nftables.Syncer), as kube-proxy does. The full sync's
Python writer, loader and compiler are most of a large point's time: about 85 CPU seconds at
50,000 services × 10 endpoints (2.6 million ``nft`` commands) and 30 at 1,000 × 250.

Why the first packet's time grows with services while its work does not: the rules started,
expressions, lookups and bucket compares per first packet are flat (8 PREROUTING rules, 3
lookups, 2-3 compares at every size), but each first packet goes to a random service, so the
chains, the numgen map and the service-ips element it touches were last touched long ago, and
once the services' rules and maps outgrow the CPU caches each of those reads is a miss to
memory. A micro-experiment (PREROUTING only, E=10, Cython, median of the best of 5 runs of
20,000 packets; noisy shared machine): random services 161 / 691 / 1,392 ns at 100 / 2,000 /
10,000 services (model 0.3 / 5.6 / 29 MB); the same tables with every packet to one service:
140 ns at every size; with packets spread over the first 100 services of the 10,000-service
table (the same big service-ips map and blob): 170 ns. So it is not the table size or the
Python model: it is the working set, as in the kernel, whose per-service rules, chains and
numgen maps are separate allocations too. The model touches somewhat more cache lines per map
lookup than the kernel (a HashSet's object and four arrays, where nft_hash_fast has its
buckets in the set and the key and verdict in the element), so the absolute rise overstates
the kernel's somewhat; the shape is the kernel's.
"""
from __future__ import annotations

import gc
from dataclasses import asdict, dataclass

import numpy as np

import kernels
from bench.cluster.generate import generate
from bench.cluster.model import service_ports
from bench.costs import nftables as nftables_costs
from bench.loaders.nftables import NftRuleset, kube_proxy_table
from bench.measure.path import (PathResult, apply_nat, confirm, conntrack_lookup, is_local, nat_result, path_record,
                                position_results)
from bench.netaddr import ip_to_int
from bench.proxies import nftables as nftables_writer
from bench.workload import established, pod_connections, service_connections
from kernels import layout as L
from kernels.nftblob import CompiledNft, compile_table


class NftablesDatapath:
    """nftables mode: conntrack and kube-proxy's ``ip kube-proxy`` table, one kernel Ruleset.

    The Ruleset runs every base chain of a hook in priority order and consults nat chains only
    for first packets (kernel-internals §3.1, §3.5, §4.3). A first packet: conntrack misses;
    PREROUTING runs filter-prerouting-pre-dnat (-110, the firewall check) then nat-prerouting
    (-100, services → service chain → numgen → endpoint chain → dnat); the DNAT is applied;
    filter INPUT (local destination) or FORWARD runs the endpoint and ClusterIP checks;
    POSTROUTING runs nat-postrouting (masquerading); conntrack confirms. A later packet:
    conntrack hits, the filter base chains still run but their ``ct state new`` gates fail, and
    no nat chain runs. A packet dropped or rejected at PREROUTING goes no further.
    """

    def __init__(self, ruleset: NftRuleset, node_ips: list[str], seed: int = 0,
                 backend: str | None = None, conntrack_buckets: int = 262144,
                 compiled: CompiledNft | None = None):
        """``compiled``: the ruleset's table already compiled with ``seed`` (saves compiling
        a large table twice)."""
        conntrack = kernels.load("conntrack", backend)
        self.local = np.array(sorted(ip_to_int(ip) for ip in node_ips), dtype=np.uint32)
        compiled = compiled or compile_table(kube_proxy_table(ruleset), seed)
        self.table = kernels.load("nftables", backend).Ruleset(compiled, self.local, seed=seed)
        self.table.maintain()  # the rhashtable worker has run since the full sync
        self.conntrack = conntrack.ConntrackTable(buckets=conntrack_buckets, seed=seed)
        # The nftables kernel has no timer probe of its own; both kernels read the same clock.
        self.timer_overhead = int(kernels.load("iptables", backend).timer_overhead_ns())

    def _hook(self, packets: np.ndarray, chosen: np.ndarray, hook: int, ns: np.ndarray) -> np.ndarray:
        """The hook's base chains for the chosen packets; zero results for the others."""
        results = np.zeros(len(packets), dtype=L.NFT_RESULT_DTYPE)
        index = np.flatnonzero(chosen)
        if index.size:
            part = np.zeros(index.size, dtype=L.NFT_RESULT_DTYPE)
            part_ns = np.zeros(index.size, dtype=np.int64)
            self.table.run(packets[index], hook, part, part_ns)
            results[index] = part
            ns[index] += np.maximum(part_ns - self.timer_overhead, 0)
        return results

    def process(self, packets: np.ndarray, established_after_nat: np.ndarray | None = None) -> NftPathResult:
        """Send a batch through the path (``established_after_nat`` as for IptablesDatapath)."""
        n = len(packets)
        found, compares, ns = conntrack_lookup(self.conntrack, packets, self.timer_overhead)
        new = found == 0
        everyone = np.ones(n, dtype=bool)
        pre = self._hook(packets, everyone, L.HOOK_PREROUTING, ns)
        passed = ~np.isin(pre["verdict"], (L.V_DROP, L.V_REJECT))
        after = packets.copy() if established_after_nat is None else established_after_nat.copy()
        after[new] = apply_nat(packets[new], pre[new])

        local = is_local(after["dst"], self.local)
        filt = self._hook(after, passed & local, L.HOOK_INPUT, ns)
        forward = passed & ~local
        filt[forward] = self._hook(after, forward, L.HOOK_FORWARD, ns)[forward]
        passed &= ~np.isin(filt["verdict"], (L.V_DROP, L.V_REJECT))
        post = self._hook(after, new & passed, L.HOOK_POSTROUTING, ns)
        confirmed = np.flatnonzero(new & passed)
        if confirmed.size:
            compares[confirmed] += confirm(self.conntrack, packets[confirmed], as_nat_result(pre[confirmed]))
        visited = sum(r["entries_visited"].astype(np.int64) for r in (pre, filt, post))
        return NftPathResult(ns, found == 1, pre, visited, pre["entries_visited"].astype(np.int64),
                             after, compares, filt, post)


@dataclass
class NftPathResult(PathResult):
    """``nat`` holds the PREROUTING walk (filter-prerouting-pre-dnat, then nat-prerouting for
    first packets), NFT_RESULT_DTYPE like the two below."""

    filter: np.ndarray  # INPUT or FORWARD (zeros where the packet was dropped before)
    postrouting: np.ndarray  # nat-postrouting (zeros for later packets)

    def total(self, counter: str) -> np.ndarray:
        """One work counter summed over the three hooks, per packet."""
        return sum(r[counter].astype(np.int64) for r in (self.nat, self.filter, self.postrouting))


def as_nat_result(nft: np.ndarray) -> np.ndarray:
    """nftables results as the RESULT_DTYPE records conntrack's confirm reads."""
    return nat_result(nft["verdict"], nft["dnat_ip"], nft["dnat_port"])


def measure(point) -> list[dict]:
    # A point builds millions of long-lived objects without cycles (the ruleset, the compiled
    # chains, the maps); the cyclic GC would rescan them all again and again, and pause the
    # timed partial syncs.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _measure(point)
    finally:
        if collecting:
            gc.enable()


def _measure(point) -> list[dict]:
    cluster = generate(point.services, point.endpoints, point.nodes, seed=point.seed, mix=point.mix)
    options = nftables_writer.WriterOptions(service_order_seed=point.seed)
    syncer = nftables_writer.Syncer(options)  # kube-proxy's state, kept for the partial syncs
    ruleset, compiled, full_sync = nftables_costs.full_sync(cluster, options, seed=point.seed, syncer=syncer)
    datapath = NftablesDatapath(ruleset, cluster.config.node_ips, seed=point.seed, compiled=compiled)

    to_service = service_connections(cluster, service_ports(cluster), point.packets, seed=point.seed)
    first = datapath.process(to_service)
    to_pods = datapath.process(pod_connections(cluster, point.packets, seed=point.seed + 1))
    later = datapath.process(established(to_service), established(first.after_nat))
    # The service-ips map has no order: first, middle and last cost the same (the flat line).
    positions = position_results(datapath, cluster, service_ports(cluster), point.packets, point.seed)

    common = {"kind": "point", "point_id": point.point_id, **asdict(point), "rules": ruleset.stats(),
              **nftables_costs.memory(datapath), **full_sync}
    # Last: the partial syncs change the ruleset and the data path's table in place.
    common.update(nftables_costs.measure_updates(cluster, ruleset, datapath.table, options, syncer))
    # entries_visited counts every hook's rules, as iptables' counts both tables;
    # nat_entries_visited is the PREROUTING hook, where the service is chosen.
    return [{**common, "workload": name, **path_record(result),
             **{f"{counter}_mean": float(result.total(counter).mean()) for counter in L.NFT_WORK_COUNTERS}}
            for name, result in (("service_new", first), *positions, ("nonservice_new", to_pods),
                                 ("established", later))]
