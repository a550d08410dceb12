"""iptables mode's data path (:class:`IptablesDatapath`) and its sweep point.

The path is the kernel's (kernel-internals §4.3). A packet first meets conntrack. On a miss
(the first packet of a connection) the nat table runs at PREROUTING, the DNAT is applied, the
filter table runs at INPUT or FORWARD, the nat table runs again at POSTROUTING, and conntrack
confirms the connection (two tuple entries). On a hit, NAT is applied from conntrack with no
rule walk and only the filter table runs. Each stage is a nogil batch call that adds its own
time per packet into one ``ns`` array, less the timer's own overhead.

A point also times the control plane (:func:`control_plane`: full sync, partial sync after
one endpoint change, one service added) and honours the variant ``comments=off``.
"""
from __future__ import annotations

import re
import time
from dataclasses import asdict

import numpy as np

import kernels
from bench.cluster.generate import generate
from bench.cluster.model import service_ports
from bench.costs import iptables as iptables_costs
from bench.costs.nftables import added_service, moved_endpoint
from bench.loaders.iptables import Ruleset, load
from bench.measure.path import (PathResult, apply_nat, confirm, conntrack_lookup, is_local, path_record,
                                position_results)
from bench.netaddr import ip_to_int
from bench.proxies.iptables import Syncer, WriterOptions, ordered_ports, rule_counts
from bench.workload import established, pod_connections, service_connections
from kernels import layout as L


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
        return self._path_result(ns, found == 1, nat, filt, post, after, compares)

    @staticmethod
    def _path_result(ns, hit, nat, filt, post, after, compares) -> PathResult:
        """The batch's PathResult from the three walks' results (RESULT_DTYPE)."""
        visited = nat["entries_visited"].astype(np.int64) + filt["entries_visited"] + post["entries_visited"]
        return PathResult(ns, hit, nat, visited, nat["entries_visited"].astype(np.int64), after, compares)


COMMENT = re.compile(r' -m comment --comment (?:"[^"]*"|\S+)')


def without_comments(payload: str) -> str:
    """The payload with every ``-m comment`` match removed (the variant ``comments=off``)."""
    return COMMENT.sub("", payload)


def timed_sync(write, comments: bool, base: Ruleset | None = None) -> tuple[Ruleset, dict]:
    """Write a payload and load it (onto ``base`` with --noflush); the ruleset after it, and
    the sync's seconds: writing, loading, and the kernel's modelled table replacement."""
    started = time.perf_counter()
    text = write()
    if not comments:
        text = without_comments(text)
    written = time.perf_counter()
    ruleset = load(text, source="iptables sync", base=base, noflush=base is not None)
    loaded = time.perf_counter()
    kernel = iptables_costs.replace_seconds(ruleset.tables, text)
    rules = rule_counts(text)
    return ruleset, {"write_seconds": written - started, "load_seconds": loaded - written,
                     "kernel_seconds": kernel, "duration_seconds": loaded - started + kernel,
                     "operations": sum(rules.values()), "rules": rules,
                     "kernel_entries": iptables_costs.replace_entries(ruleset.tables, text)}


# kube-proxy's metric name for each sync the model times, and the change it follows.
SYNC_METRICS = (("sync_full_proxy_rules", None), ("sync_partial_proxy_rules", moved_endpoint),
                ("sync_add_service", added_service))


def control_plane(cluster, options: WriterOptions, comments: bool) -> tuple[Ruleset, dict, dict]:
    """A full sync, then, each from the state it left, the partial syncs after one endpoint
    change and after one service added.

    Each sync's record: ``<metric>_duration_seconds`` (write + load + the kernel's modelled
    replacement), its parts, ``<metric>_operations`` (rules in the payload) and
    ``<metric>_kernel_entries`` (entries the kernel checks). The writer keeps kube-proxy's
    state between syncs (:class:`Syncer`), so a partial sync renders only the changed
    services' chains; the kernel replaces the whole table either way. Returns the full sync's
    ruleset (the data path's), its rules per table and the record. Only one partial sync's
    ruleset lives at a time: at 100,000 × 10 each holds over a GiB of tables."""
    synced = Syncer(options)
    ruleset, full = timed_sync(lambda: synced.full(cluster), comments)
    record = {"sync_proxy_rules_write_seconds": full["write_seconds"],
              "sync_proxy_rules_load_seconds": full["load_seconds"]}
    for metric, change in SYNC_METRICS:
        if change is None:
            result = full
        else:
            syncer, changed = synced.copy(), change(cluster)
            result = timed_sync(lambda: syncer.partial(changed), comments, base=ruleset)[1]
        for part in ("duration_seconds", "write_seconds", "load_seconds", "kernel_seconds",
                     "operations", "kernel_entries"):
            record[f"{metric}_{part}"] = result[part]
    return ruleset, full["rules"], record


def run_workloads(point, datapath_class) -> tuple:
    """Sync the point's cluster (the control plane, timed), load the rules into a
    ``datapath_class`` data path and send the workloads through it: (ruleset, rules per table, sync
    record, data path, [(workload, PathResult)])."""
    cluster = generate(point.services, point.endpoints, point.nodes, seed=point.seed, mix=point.mix)
    infos = service_ports(cluster)
    options = WriterOptions(include_jump_rules=True, service_order_seed=point.seed)
    ruleset, rules, sync = control_plane(cluster, options, comments=point.settings.get("comments") != "off")
    datapath = datapath_class(ruleset, cluster.config.node_ips, seed=point.seed)

    to_service = service_connections(cluster, infos, point.packets, seed=point.seed)
    first = datapath.process(to_service)
    to_pods = datapath.process(pod_connections(cluster, point.packets, seed=point.seed + 1))
    later = datapath.process(established(to_service), established(first.after_nat))
    # KUBE-SERVICES holds the service ports in the order the writer shuffled them into.
    positions = position_results(datapath, cluster, ordered_ports(infos, point.seed), point.packets, point.seed)
    workloads = [("service_new", first), *positions, ("nonservice_new", to_pods), ("established", later)]
    return ruleset, rules, sync, datapath, workloads


def measure(point) -> list[dict]:
    ruleset, rules, sync, datapath, workloads = run_workloads(point, IptablesDatapath)
    common = {
        "kind": "point", "point_id": point.point_id, **asdict(point),
        "rules": rules,
        "kernel_bytes": iptables_costs.kernel_bytes(ruleset.tables, point.cpus)
                        + datapath.conntrack.modelled_bytes(),
        "model_bytes": sum(t.blob.nbytes for t in ruleset.tables.values())
                       + datapath.nat.counters.nbytes + datapath.filter.counters.nbytes
                       + datapath.conntrack.model_bytes(),
        "sync_entries": iptables_costs.sync_entries(ruleset.tables),
        **sync,
    }
    return [{**common, "workload": name, **path_record(result)} for name, result in workloads]
