"""One node's data path, assembled from the kernels, and the measurements taken on it.

iptables mode (:class:`IptablesDatapath`): the path is the kernel's (kernel-internals §4.3). A packet first meets conntrack. On a miss
(the first packet of a connection) the nat table runs at PREROUTING, the DNAT is applied, the
filter table runs at INPUT or FORWARD, the nat table runs again at POSTROUTING, and conntrack
confirms the connection (two tuple entries). On a hit, NAT is applied from conntrack with no
rule walk and only the filter table runs. Each stage is a nogil batch call that adds its own
time per packet into one ``ns`` array, less the timer's own overhead.

IPVS mode (:class:`IpvsDatapath`) and nftables mode (:class:`NftablesDatapath`) are
described there.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import kernels
from bench.loaders.iptables import Ruleset
from bench.errors import InputError
from bench.loaders.ipvs import IpvsRuleset, kernel_arrays
from bench.loaders.nftables import NftRuleset, Table
from bench.netaddr import int_to_ip, ip_to_int
from kernels import layout as L
from kernels.ipsets import build_sets
from kernels.nftblob import CompiledNft, compile_table

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
    conntrack_compares: np.ndarray  # conntrack lookup, plus confirm for first packets


class IptablesDatapath:
    """conntrack + the nat and filter tables of one node, on one kernel backend."""

    def __init__(self, ruleset: Ruleset, node_ips: list[str], seed: int = 0,
                 backend: str | None = None, conntrack_buckets: int = 262144,
                 sets: dict | None = None):
        """``sets``: per table, the ipsets its ``-m set`` rules name, aligned with the
        compiled table's set_names (IPVS mode; None for iptables mode's rules)."""
        iptables = kernels.load("iptables", backend)
        conntrack = kernels.load("conntrack", backend)
        sets = sets or {}
        self.local = np.array(sorted(ip_to_int(ip) for ip in node_ips), dtype=np.uint32)
        self.nat = iptables.Table.from_compiled(ruleset.tables["nat"], self.local, seed=seed,
                                                sets=sets.get("nat"))
        self.filter = iptables.Table.from_compiled(ruleset.tables["filter"], self.local, seed=seed + 1,
                                                   sets=sets.get("filter"))
        self.conntrack = conntrack.ConntrackTable(buckets=conntrack_buckets, seed=seed)
        self.timer_overhead = int(iptables.timer_overhead_ns())

    def is_local(self, addresses: np.ndarray) -> np.ndarray:
        return is_local(addresses, self.local)

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
        found, compares, ns = conntrack_lookup(self.conntrack, packets, self.timer_overhead)
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
            compares[new] += confirm(self.conntrack, packets[new], nat[new])
        visited = (nat["entries_visited"].astype(np.int64) + filt["entries_visited"]
                   + post["entries_visited"])
        return PathResult(ns, found == 1, nat, visited, nat["entries_visited"].astype(np.int64), after,
                          compares)


class IpvsDatapath:
    """IPVS mode: conntrack, IPVS mode's small iptables ruleset, and IPVS at LOCAL_IN.

    A first packet (kernel-internals §4.3, §2.3, §2.6): conntrack misses; nat PREROUTING runs
    kube-proxy's ipset-driven rules, which only set the masquerade mark; the destination is a
    VIP bound to kube-ipvs0, so the packet is local and filter INPUT runs (KUBE-IPVS-FILTER,
    the source-range firewall); IPVS at LOCAL_IN finds the virtual service, schedules and
    creates its connection; nat POSTROUTING masquerades marked packets; conntrack confirms
    (kube-proxy sets vs/conntrack=1, so every IPVS connection also has a conntrack entry).
    A later packet: conntrack hits, filter INPUT runs, IPVS finds its connection and re-arms
    the connection's timer; no nat rule runs. Packets to addresses that are not local never
    reach LOCAL_IN: they take filter FORWARD, and IPVS is not run for them (its reply-path
    lookup at FORWARD is not modelled).

    ``self.rules`` holds the iptables stages and conntrack (an IptablesDatapath whose local
    addresses include the VIPs).
    """

    def __init__(self, ruleset: IpvsRuleset, node_ips: list[str], seed: int = 0,
                 backend: str | None = None, scheduler: str | None = None,
                 conntrack_buckets: int = 262144, conn_tab_bits: int = 12):
        services, dests = kernel_arrays(ruleset.services, ruleset.source, scheduler)
        ipvs = kernels.load("ipvs", backend)
        self.ipvs = ipvs.IPVS.from_arrays(services, dests, conn_tab_bits=conn_tab_bits, seed=seed)
        # The VIPs on kube-ipvs0 are local addresses: that is how packets reach LOCAL_IN.
        local_ips = list(node_ips) + [int_to_ip(a) for a in ruleset.addresses]
        self.rules = IptablesDatapath(ruleset.iptables, local_ips, seed, backend, conntrack_buckets,
                                      sets=kernel_sets(ruleset, backend, seed))
        self.conntrack = self.rules.conntrack

    def process(self, packets: np.ndarray) -> IpvsPathResult:
        """Send a batch through the path (first and later packets may be mixed)."""
        n = len(packets)
        found, compares, ns = conntrack_lookup(self.conntrack, packets, self.rules.timer_overhead)
        new = found == 0

        nat = np.zeros(n, dtype=L.RESULT_DTYPE)
        nat[new] = self._rule_walk(self.rules.nat, packets, new, L.HOOK_PREROUTING, ns)
        marked = packets.copy()
        # IPVS mode's nat rules never DNAT: the mark is all PREROUTING leaves.
        marked["mark"][new] = nat["mark"][new]
        filt = self.rules._filter(marked, ns)
        allowed = ~np.isin(filt["verdict"], (L.V_DROP, L.V_REJECT))
        ipvs = self._ipvs(marked, allowed & self.rules.is_local(marked["dst"]), ns)

        after = marked.copy()
        forwarded = ipvs["verdict"] == L.IPVS_FORWARD
        after["dst"][forwarded] = ipvs["dnat_ip"][forwarded]
        after["dport"][forwarded] = ipvs["dnat_port"][forwarded]
        passed = new & allowed & (ipvs["verdict"] != L.IPVS_NO_DEST)
        post = np.zeros(n, dtype=L.RESULT_DTYPE)
        post[passed] = self._rule_walk(self.rules.nat, after, passed, L.HOOK_POSTROUTING, ns)
        if passed.any():
            compares[passed] += confirm(self.conntrack, packets[passed], _as_dnat(ipvs[passed]))
        visited = (nat["entries_visited"].astype(np.int64) + filt["entries_visited"]
                   + post["entries_visited"])
        return IpvsPathResult(ns, found == 1, nat, visited, nat["entries_visited"].astype(np.int64),
                              after, compares, ipvs, post)

    def _rule_walk(self, table, packets: np.ndarray, chosen: np.ndarray, hook: int,
                   ns: np.ndarray) -> np.ndarray:
        """One table's walk over the chosen packets; their results."""
        index = np.flatnonzero(chosen)
        if not index.size:
            return np.zeros(0, dtype=L.RESULT_DTYPE)
        part_ns = np.zeros(index.size, dtype=np.int64)
        results = self.rules._walk(table, packets[index], hook, part_ns)
        ns[index] += part_ns
        return results

    def _ipvs(self, packets: np.ndarray, chosen: np.ndarray, ns: np.ndarray) -> np.ndarray:
        """IPVS at LOCAL_IN for the chosen packets; NOT_SERVICE for the rest."""
        results = np.zeros(len(packets), dtype=L.IPVS_RESULT_DTYPE)
        results["verdict"] = L.IPVS_NOT_SERVICE
        results["service"] = results["dest"] = -1
        index = np.flatnonzero(chosen)
        if index.size:
            part = np.zeros(index.size, dtype=L.IPVS_RESULT_DTYPE)
            part_ns = np.zeros(index.size, dtype=np.int64)
            self.ipvs.process(packets[index], part, part_ns)
            results[index] = part
            ns[index] += np.maximum(part_ns - self.rules.timer_overhead, 0)
        return results


@dataclass
class IpvsPathResult(PathResult):
    ipvs: np.ndarray  # IPVS_RESULT_DTYPE: verdict, real server, IPVS work counters
    postrouting: np.ndarray  # RESULT_DTYPE of nat POSTROUTING (zeros where it did not run)


def kernel_sets(ruleset: IpvsRuleset, backend: str | None, seed: int) -> dict:
    """Per table, the set kernels its ``-m set`` rules name, aligned with its set_names."""
    return {name: build_sets(ruleset.ipsets, table.set_names, backend, seed)
            for name, table in ruleset.iptables.tables.items()}


def _as_dnat(ipvs: np.ndarray) -> np.ndarray:
    """IPVS's forwarding as the DNAT conntrack records for the connection's reply tuple."""
    forwarded = ipvs["verdict"] == L.IPVS_FORWARD
    return _nat_result(np.where(forwarded, L.V_DNAT, L.V_ACCEPT), ipvs["dnat_ip"], ipvs["dnat_port"])


def as_nat_result(nft: np.ndarray) -> np.ndarray:
    """nftables results as the RESULT_DTYPE records conntrack's confirm reads."""
    return _nat_result(nft["verdict"], nft["dnat_ip"], nft["dnat_port"])


def _nat_result(verdict: np.ndarray, dnat_ip: np.ndarray, dnat_port: np.ndarray) -> np.ndarray:
    nat = np.zeros(len(verdict), dtype=L.RESULT_DTYPE)
    nat["verdict"], nat["dnat_ip"], nat["dnat_port"] = verdict, dnat_ip, dnat_port
    return nat


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


def kube_proxy_table(ruleset: NftRuleset) -> Table:
    """The ``ip kube-proxy`` table: the one kube-proxy programs, and the one modelled."""
    try:
        return ruleset.table()
    except KeyError:
        raise InputError("has no table ip kube-proxy", ruleset.source) from None


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
    """p50/p90/p99/mean of per-packet nanoseconds."""
    p50, p90, p99 = np.percentile(ns, [50, 90, 99])
    return {"ns_p50": float(p50), "ns_p90": float(p90), "ns_p99": float(p99),
            "ns_mean": float(ns.mean())}
