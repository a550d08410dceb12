"""The eBPF REFERENCE MODEL's data path (:class:`EbpfDatapath`) and its sweep point.

Not a kube-proxy mode: a Cilium-like eBPF load balancer (kernels/ebpf.pyx), measured at the
same points and with the same workloads and record fields as the kube-proxy modes, so that the
rows compare. Every record carries ``reference_model: True``.

The path is the BPF program alone: every packet looks up the service map; a packet to a
service looks up the BPF connection-tracking map, and a new connection picks a backend, looks
it up and inserts its CT entry; the packet is DNATed in the program. Netfilter is bypassed (no
iptables rules, no nf_conntrack), as with Cilium's kube-proxy replacement and BPF
masquerading; routing and network policy are outside the model. Record fields map as follows:
``entries_visited`` = hash-map elements compared in every map, ``nat_entries_visited`` = those
of the service and backend maps, ``conntrack_*`` = the BPF CT map.

Map full: Cilium's service and backend maps hold 65,536 entries each (bpf-lb-map-max). A point
whose cluster needs more is still measured, with the inserts past the limit failing as on a
node (their frontends are then missing and their packets pass untranslated); the record says
so in ``map_full`` and the ``*_map_entries_wanted`` / ``*_map_max_entries`` fields.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

import kernels
from bench.cluster.generate import generate
from bench.cluster.model import service_ports
from bench.costs import ebpf as ebpf_costs
from bench.loaders import ebpf as ebpf_loader
from bench.loaders.ebpf import EbpfMaps
from bench.measure.path import PathResult, apply_nat, nat_result, path_record, position_results
from bench.proxies import ebpf as ebpf_writer
from bench.workload import established, pod_connections, service_connections
from kernels import layout as L

# The netfilter verdict each eBPF verdict amounts to, indexed by EBPF_* code.
_NAT_VERDICTS = np.zeros(len(L.EBPF_VERDICT_NAMES), np.uint8)
_NAT_VERDICTS[[L.EBPF_FORWARD, L.EBPF_NOT_SERVICE, L.EBPF_NO_BACKEND, L.EBPF_CT_FULL]] = (
    L.V_DNAT, L.V_ACCEPT, L.V_DROP, L.V_DROP)


class EbpfDatapath:
    """A node whose services are served by the eBPF maps (a reference model)."""

    def __init__(self, maps: EbpfMaps, seed: int = 0, backend: str | None = None,
                 algorithm: str = "random", ct_max_entries: int = L.EBPF_CT_MAX_ENTRIES,
                 maglev_size: int = L.EBPF_MAGLEV_TABLE_SIZE):
        started = time.perf_counter()
        self.maps = kernels.load("ebpf", backend).ServiceMaps.from_arrays(
            maps.services, maps.backends, seed=seed, algorithm=algorithm,
            service_max_entries=maps.max_entries["services"], backend_max_entries=maps.max_entries["backends"],
            ct_max_entries=ct_max_entries, maglev_size=maglev_size)
        self.program_seconds = time.perf_counter() - started  # creating the maps, writing every entry
        self.timer_overhead = int(kernels.load("iptables", backend).timer_overhead_ns())

    def process(self, packets: np.ndarray) -> EbpfPathResult:
        """Send a batch through the BPF program (first and later packets may be mixed)."""
        n = len(packets)
        results = np.zeros(n, dtype=L.EBPF_RESULT_DTYPE)
        ns = np.zeros(n, dtype=np.int64)
        self.maps.process(packets, results, ns)
        ns = np.maximum(ns - self.timer_overhead, 0)
        nat = nat_result(_NAT_VERDICTS[results["verdict"]], results["dnat_ip"], results["dnat_port"])
        compares = results["bucket_compares"].astype(np.int64)
        ct_compares = results["ct_compares"].astype(np.int64)
        return EbpfPathResult(ns, results["ct_hit"] == 1, nat, compares, compares - ct_compares,
                              apply_nat(packets, nat), ct_compares, results)


@dataclass
class EbpfPathResult(PathResult):
    ebpf: np.ndarray  # EBPF_RESULT_DTYPE: verdict, backend, map work counters


def map_limits(maps: EbpfMaps, service_maps) -> dict:
    """Wanted entries, max_entries and failed inserts per map, and whether any map is full."""
    record = {}
    for name, info in service_maps.maps().items():
        if name in ("services", "backends"):
            record[f"{name[:-1]}_map_entries_wanted"] = len(getattr(maps, name))
            record[f"{name[:-1]}_map_max_entries"] = info["max_entries"]
            record[f"{name[:-1]}_map_insert_failures"] = info["insert_failures"]
    record["map_full"] = bool(record["service_map_insert_failures"] or record["backend_map_insert_failures"])
    return record


def measure(point, algorithm: str = "random") -> list[dict]:
    cluster = generate(point.services, point.endpoints, point.nodes, seed=point.seed, mix=point.mix)
    started = time.perf_counter()
    text = ebpf_writer.write(cluster, ebpf_writer.EbpfWriterOptions(allow_overflow=True))
    write_seconds = time.perf_counter() - started
    started = time.perf_counter()
    maps = ebpf_loader.load(text, source=f"eBPF maps for {point.services} services", allow_overflow=True)
    load_seconds = time.perf_counter() - started
    datapath = EbpfDatapath(maps, seed=point.seed, algorithm=algorithm)

    to_service = service_connections(cluster, service_ports(cluster), point.packets, seed=point.seed)
    first = datapath.process(to_service)
    to_pods = datapath.process(pod_connections(cluster, point.packets, seed=point.seed + 1))
    later = datapath.process(established(to_service))
    # Hash-map lookups: the first, middle and last service cost the same (after the others, so
    # their connections do not change the workloads above).
    positions = position_results(datapath, cluster, service_ports(cluster), point.packets, point.seed)

    memory = ebpf_costs.kernel_bytes(datapath.maps, point.cpus)
    sync = ebpf_costs.sync_operations(maps)
    common = {
        "kind": "point", "point_id": point.point_id, **asdict(point),
        "reference_model": True, "model": "Cilium-like eBPF service maps (reference model, not kube-proxy)",
        "lb_algorithm": algorithm,
        "rules": sync,
        "kernel_bytes": sum(memory.values()),
        **{f"kernel_bytes_{part}": value for part, value in memory.items()},
        "model_bytes": datapath.maps.model_bytes(),
        "sync_proxy_rules_write_seconds": write_seconds,
        "sync_proxy_rules_load_seconds": load_seconds,
        "sync_entries": sum(sync.values()) - sync["frontends"],  # map entries written
        **ebpf_costs.control_plane(maps, algorithm, datapath.program_seconds, write_seconds + load_seconds),
        **map_limits(maps, datapath.maps),
    }
    return [{**common, "workload": name, **path_record(result),
             "forwarded_fraction": float((result.ebpf["verdict"] == L.EBPF_FORWARD).mean()),
             **{f"{counter}_mean": float(result.ebpf[counter].mean()) for counter in L.EBPF_WORK_COUNTERS}}
            for name, result in (("service_new", first), *positions, ("nonservice_new", to_pods),
                                 ("established", later))]
