"""IPVS mode's data path (:class:`IpvsDatapath`), its sweep point and the connection-table
scaling benchmark.

IPVS-mode points record, besides what iptables points do, the IPVS work per packet
(service-table and connection-table entries compared, destinations examined), memory by part
and the sync and update costs of bench/costs/ipvs.py. The service-table compares grow like
V/512 with V virtual services (256 fixed chains). :func:`connection_scaling` shows the
connection table's growth, connections/8192 per established packet, at up to 300,000
connections in the default profile (1,000,000 in full, about 17 s: each new connection first
searches its chain, so filling the table takes time quadratic in the connections).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

import kernels
from bench.cluster.generate import generate
from bench.cluster.model import service_ports
from bench.costs import ipvs as ipvs_costs
from bench.loaders import ipvs as ipvs_loader
from bench.loaders.ipvs import IpvsRuleset, kernel_arrays
from bench.measure.iptables import IptablesDatapath
from bench.costs import iptables as iptables_costs
from bench.measure.path import PathResult, confirm, conntrack_lookup, nat_result, path_record, position_results
from bench.netaddr import int_to_ip
from bench.proxies import ipvs as ipvs_writer
from bench.workload import EPHEMERAL_LOW, established, pod_connections, service_connections
from kernels import layout as L
from kernels.ipsets import build_sets


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
    return nat_result(np.where(forwarded, L.V_DNAT, L.V_ACCEPT), ipvs["dnat_ip"], ipvs["dnat_port"])


def measure(point) -> list[dict]:
    cluster = generate(point.services, point.endpoints, point.nodes, seed=point.seed, mix=point.mix)
    scheduler = point.settings.get("scheduler")
    if scheduler:
        cluster.config.ipvs_scheduler = scheduler
    started = time.perf_counter()
    text = ipvs_writer.write(cluster, ipvs_writer.IpvsWriterOptions(include_jump_rules=True))
    write_seconds = time.perf_counter() - started
    started = time.perf_counter()
    ruleset = ipvs_loader.load(text, source=f"IPVS-mode rules for {point.services} services")
    load_seconds = time.perf_counter() - started
    datapath = IpvsDatapath(ruleset, cluster.config.node_ips, seed=point.seed)

    infos = service_ports(cluster)
    to_service = service_connections(cluster, infos, point.packets, seed=point.seed)
    first = datapath.process(to_service)
    to_pods = datapath.process(pod_connections(cluster, point.packets, seed=point.seed + 1))
    later = datapath.process(established(to_service))
    # The service table is a hash: the writer's order does not matter, but users ask.
    positions = position_results(datapath, cluster, infos, point.packets, point.seed)

    memory = ipvs_costs.kernel_bytes(ruleset, datapath.ipvs, point.cpus)
    sync = ipvs_costs.sync_operations(ruleset)
    updates = ipvs_costs.measure_updates(ruleset, seed=point.seed)
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
        **updates,
        **control_plane(ruleset, sync, updates, write_seconds + load_seconds),
    }
    workloads = [("service_new", first), *positions, ("nonservice_new", to_pods), ("established", later)]
    return [{**common, "workload": name, **path_record(result),
             **{f"{counter}_mean": float(result.ipvs[counter].mean()) for counter in L.IPVS_WORK_COUNTERS}}
            for name, result in workloads]


def control_plane(ruleset: IpvsRuleset, listed: dict, updates: dict, full_text_seconds: float) -> dict:
    """kube-proxy's sync metrics from bench/costs/ipvs.py's measurements.

    IPVS mode has no partial sync: every sync lists and diffs every virtual server, real
    server and ipset entry, and restores its (small) iptables tables; a change adds its own
    netlink operations (an endpoint change: remove and add a real server; a new service: the
    service and its real servers). The full sync also writes and loads everything.
    ``<metric>_operations`` counts objects listed plus objects changed."""
    restore = iptables_costs.replace_seconds(ruleset.iptables.tables, "\n".join(
        f"*{name}" for name in ruleset.iptables.tables))
    every_sync = updates["full_sync_seconds"] + restore
    listed_total = sum(listed.values())
    added_objects = 1 + max(listed["real_servers_listed"] // max(listed["virtual_servers_listed"], 1), 0)
    return {
        "sync_full_proxy_rules_duration_seconds": full_text_seconds + every_sync,
        "sync_full_proxy_rules_operations": listed_total,
        "sync_partial_proxy_rules_duration_seconds": every_sync + updates["endpoint_change_seconds"],
        "sync_partial_proxy_rules_operations": listed_total + 2,
        "sync_partial_proxy_rules_sched_ops": updates["endpoint_change_sched_ops"],
        "sync_add_service_duration_seconds": every_sync + updates["service_add_seconds"],
        "sync_add_service_operations": listed_total + added_objects,
        "sync_add_service_sched_ops": updates["service_add_sched_ops"],
    }


def connection_scaling(connections: list[int], services: int = 1000, packets: int = 20000,
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
