"""iptables mode on the nf_tables backend (iptables-nft): :class:`IptablesNftDatapath` and its
sweep point.

The same kube-proxy rules as bench/measure/iptables.py, written and loaded the same way, then
translated as iptables-nft stores them (bench/loaders/iptables_nft.py) and walked by the
nftables kernel: one ``ip nat`` and one ``ip filter`` table, each a kernels.nftables Ruleset
whose compat expressions run the xt extensions of a legacy Table built from the same compiled
table with the seed the legacy path gives it. The path is the legacy one (conntrack, nat
PREROUTING, DNAT, filter INPUT or FORWARD, nat POSTROUTING, confirm), so the two backends'
records compare workload by workload: same verdicts, different per-rule work.

Per packet the nft path also counts ``expressions`` (every table walked); ``entries_visited``
counts nft rules started (no policy or chain-tail entries: nft has none).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

import kernels
from bench.cluster.generate import generate
from bench.cluster.model import service_ports
from bench.loaders.iptables import Ruleset
from bench.loaders.iptables_nft import NftTranslation, translate
from bench.measure.iptables import control_plane
from bench.measure.path import (PathResult, apply_nat, confirm, conntrack_lookup, is_local, path_record,
                                position_results)
from bench.netaddr import ip_to_int
from bench.proxies.iptables import WriterOptions, ordered_ports, rule_counts
from bench.workload import established, pod_connections, service_connections
from kernels import layout as L


@dataclass
class NftPathResult(PathResult):
    """PathResult plus the nft expressions each packet evaluated, every table included."""

    expressions: np.ndarray = None


class IptablesNftDatapath:
    """conntrack + the ``ip nat`` and ``ip filter`` tables iptables-nft makes of one node's
    iptables rules, on one kernel backend."""

    def __init__(self, ruleset: Ruleset, node_ips: list[str], seed: int = 0,
                 backend: str | None = None, conntrack_buckets: int = 262144):
        iptables = kernels.load("iptables", backend)
        nftables = kernels.load("nftables", backend)
        conntrack = kernels.load("conntrack", backend)
        self.local = np.array(sorted(ip_to_int(ip) for ip in node_ips), dtype=np.uint32)
        self.translation: NftTranslation = translate(ruleset, seed)
        # The legacy datapath seeds nat with `seed`, filter with `seed + 1`: the xt state (and
        # RNG) each table's compat expressions use gets the same seeds.
        self.nat = self._table(iptables, nftables, ruleset, "nat", seed)
        self.filter = self._table(iptables, nftables, ruleset, "filter", seed + 1)
        self.conntrack = conntrack.ConntrackTable(buckets=conntrack_buckets, seed=seed)
        self.timer_overhead = int(iptables.timer_overhead_ns())

    def _table(self, iptables, nftables, ruleset: Ruleset, name: str, seed: int):
        nft = nftables.Ruleset(self.translation.compiled[name], self.local, seed)
        nft.attach_xt(iptables.Table.from_compiled(ruleset.tables[name], self.local, seed=seed))
        return nft

    def is_local(self, addresses: np.ndarray) -> np.ndarray:
        return is_local(addresses, self.local)

    def _walk(self, table, packets: np.ndarray, hook: int, ns: np.ndarray) -> np.ndarray:
        results = np.zeros(len(packets), dtype=L.NFT_RESULT_DTYPE)
        stage_ns = np.zeros(len(packets), dtype=np.int64)
        table.run(packets, hook, results, stage_ns)
        ns += np.maximum(stage_ns - self.timer_overhead, 0)
        return results

    def _filter(self, packets: np.ndarray, ns: np.ndarray) -> np.ndarray:
        """Filter INPUT for local destinations, FORWARD for the rest, in two batches."""
        results = np.zeros(len(packets), dtype=L.NFT_RESULT_DTYPE)
        local = self.is_local(packets["dst"])
        for hook, chosen in ((L.HOOK_INPUT, local), (L.HOOK_FORWARD, ~local)):
            index = np.flatnonzero(chosen)
            if index.size:
                part_ns = np.zeros(index.size, dtype=np.int64)
                results[index] = self._walk(self.filter, packets[index], hook, part_ns)
                ns[index] += part_ns
        return results

    def process(self, packets: np.ndarray, established_after_nat: np.ndarray | None = None) -> NftPathResult:
        """Send a batch through the path (as IptablesDatapath.process; ``nat`` holds the nat
        PREROUTING results in RESULT_DTYPE, ``match_calls`` there being its expressions)."""
        n = len(packets)
        found, compares, ns = conntrack_lookup(self.conntrack, packets, self.timer_overhead)
        new = np.flatnonzero(found == 0)
        nat = np.zeros(n, dtype=L.NFT_RESULT_DTYPE)
        after = packets.copy() if established_after_nat is None else established_after_nat.copy()
        if new.size:
            new_ns = np.zeros(new.size, dtype=np.int64)
            nat[new] = self._walk(self.nat, packets[new], L.HOOK_PREROUTING, new_ns)
            ns[new] += new_ns
            after[new] = apply_nat(packets[new], nat[new])
        filt = self._filter(after, ns)
        post = np.zeros(n, dtype=L.NFT_RESULT_DTYPE)
        legacy_nat = as_legacy_results(nat)
        if new.size:
            post_ns = np.zeros(new.size, dtype=np.int64)
            post[new] = self._walk(self.nat, after[new], L.HOOK_POSTROUTING, post_ns)
            ns[new] += post_ns
            compares[new] += confirm(self.conntrack, packets[new], legacy_nat[new])
        visited = (nat["entries_visited"].astype(np.int64) + filt["entries_visited"]
                   + post["entries_visited"])
        expressions = (nat["expressions"].astype(np.int64) + filt["expressions"] + post["expressions"])
        return NftPathResult(ns, found == 1, legacy_nat, visited, nat["entries_visited"].astype(np.int64),
                             after, compares, expressions)


def as_legacy_results(nft: np.ndarray) -> np.ndarray:
    """NFT_RESULT_DTYPE records as RESULT_DTYPE ones (same verdict codes): rules started as
    ``entries_visited``, expressions as ``match_calls``, set lookups as ``set_probes``."""
    out = np.zeros(len(nft), dtype=L.RESULT_DTYPE)
    for name in ("verdict", "dnat_ip", "dnat_port", "mark", "entries_visited", "jumps", "rng_draws"):
        out[name] = nft[name]
    out["match_calls"] = nft["expressions"]
    out["set_probes"] = nft["set_lookups"]
    out["set_compares"] = nft["bucket_entries_compared"]
    return out


def measure(point) -> list[dict]:
    """iptables.measure's workloads on the nft backend; records carry ``iptables_backend:
    "nft"`` (``backend`` is already every record's kernel backend, bench/results.py) and
    ``expressions_mean``. The control plane is iptables-restore's (bench.measure.iptables)."""
    cluster = generate(point.services, point.endpoints, point.nodes, seed=point.seed, mix=point.mix)
    infos = service_ports(cluster)
    options = WriterOptions(include_jump_rules=True, service_order_seed=point.seed)
    ruleset, text, sync = control_plane(cluster, options, comments=point.settings.get("comments") != "off")
    datapath = IptablesNftDatapath(ruleset, cluster.config.node_ips, seed=point.seed)

    to_service = service_connections(cluster, infos, point.packets, seed=point.seed)
    first = datapath.process(to_service)
    to_pods = datapath.process(pod_connections(cluster, point.packets, seed=point.seed + 1))
    later = datapath.process(established(to_service), established(first.after_nat))
    positions = position_results(datapath, cluster, ordered_ports(infos, point.seed), point.packets, point.seed)

    nft_tables = [datapath.nat, datapath.filter]
    common = {
        "kind": "point", "point_id": point.point_id, **asdict(point), "iptables_backend": "nft",
        "rules": rule_counts(text),
        "expressions": datapath.translation.expression_counts(),
        "kernel_bytes": sum(t.modelled_bytes() for t in nft_tables) + datapath.conntrack.modelled_bytes(),
        # the legacy blobs too: the compat expressions' xt data lives there
        "model_bytes": sum(t.model_bytes() for t in nft_tables) + datapath.conntrack.model_bytes()
                       + sum(t.blob.nbytes for t in ruleset.tables.values()),
        **sync,
    }
    workloads = [("service_new", first), *positions, ("nonservice_new", to_pods), ("established", later)]
    return [{**common, "workload": name, **path_record(result),
             "expressions_mean": float(result.expressions.mean())} for name, result in workloads]
