"""IPVS mode's cost model: the kernel memory a synced node holds, and what a sync costs.

Memory (kernel-internals §2.5, §2.6), each part from the model that owns it:

* IPVS: the kernel model's ``modelled_bytes(n_cpus)``: services and destinations
  (kmalloc-512 plus 40 B of per-CPU stats each), scheduler state, connections (320 B slab
  objects), the connection table and the two 256-bucket service tables;
* ipsets: each set built in the hashset kernel (kernels.ipsets), its ``modelled_bytes()`` (ipset's hash table
  and buckets for hash:* sets, struct bitmap_port and its bitmap for bitmap:port);
* kube-ipvs0's addresses: one ``struct in_ifaddr`` each. Its size is an estimate of the v6.x
  x86-64 layout (hash node, list link, device pointer, RCU head, four addresses, flags,
  label[16], lifetimes), about 72 B, which kmalloc rounds to 96 B.

Update cost (§2.7): adding or removing a service or a destination is one netlink request and
a hash insert or unlink, plus the scheduler's rebuild, which the kernel model counts in
``sched_ops`` (rr O(1), wrr O(D), sh/dh O(256), mh O(M) with M = 4093). kube-proxy's IPVS sync
has no partial form: every sync dumps every virtual server and its real servers over netlink
and diffs them against what it wants, and lists every ipset it owns.
"""
from __future__ import annotations

import time

import numpy as np

import kernels
from bench.costs import iptables as iptables_costs
from bench.loaders.ipvs import IpvsRuleset, kernel_arrays
from kernels import layout as L
from kernels.ipsets import build_sets

IN_IFADDR_BYTES = L.kmalloc_size(72)  # struct in_ifaddr (estimate, see above), kmalloc-96


def kernel_bytes(ruleset: IpvsRuleset, ipvs, n_cpus: int, backend: str | None = None) -> dict:
    """Modelled kernel memory by part (IPVS, ipsets, kube-ipvs0 addresses, iptables)."""
    return {
        "ipvs": int(ipvs.modelled_bytes(n_cpus)),
        "ipsets": sum(int(s.modelled_bytes())
                      for s in build_sets(ruleset.ipsets, list(ruleset.ipsets), backend)),
        "addresses": IN_IFADDR_BYTES * len(ruleset.addresses),
        "iptables": iptables_costs.kernel_bytes(ruleset.iptables.tables, n_cpus),
    }


def sync_operations(ruleset: IpvsRuleset) -> dict:
    """What every kube-proxy IPVS sync reads and diffs, however small the change."""
    return {
        "virtual_servers_listed": len(ruleset.services),
        "real_servers_listed": sum(len(s.real_servers) for s in ruleset.services),
        "ipset_entries_listed": sum(len(s.entries) for s in ruleset.ipsets.values()),
        "iptables_entries": iptables_costs.sync_entries(ruleset.iptables.tables),
        "kube_ipvs0_addresses_listed": len(ruleset.addresses),
    }


def measure_updates(ruleset: IpvsRuleset, backend: str | None = None, scheduler: str | None = None,
                    seed: int = 0) -> dict:
    """The model's own time and scheduler operations for a full sync's list-and-diff, one
    endpoint change (a destination replaced) and one service added."""
    services, dests = kernel_arrays(ruleset.services, ruleset.source, scheduler)
    ipvs = kernels.load("ipvs", backend).IPVS.from_arrays(services, dests, seed=seed)
    started = time.perf_counter()
    differing = _list_and_diff(ipvs, services, dests)
    full = time.perf_counter() - started
    endpoint = _timed(ipvs, _replace_dest(ipvs, services))
    added = _timed(ipvs, _add_service_like(ipvs, services, dests))
    return {"full_sync_seconds": full, "full_sync_services_differing": differing,
            "endpoint_change_seconds": endpoint[0], "endpoint_change_sched_ops": endpoint[1],
            "service_add_seconds": added[0], "service_add_sched_ops": added[1]}


def _timed(ipvs, change) -> tuple[float, int]:
    """Seconds and scheduler operations of one prepared change."""
    before = ipvs.sched_ops
    started = time.perf_counter()
    change()
    return time.perf_counter() - started, int(ipvs.sched_ops - before)


def _list_and_diff(ipvs, services: np.ndarray, dests: np.ndarray) -> int:
    """kube-proxy's sync loop: find every wanted virtual server, list its real servers and
    compare them with the wanted ones; the number of services that differ (0 here)."""
    have = ipvs.destinations()
    wanted: dict[int, set] = {}
    for service, addr, port in zip(dests["service"].tolist(), dests["addr"].tolist(), dests["port"].tolist()):
        wanted.setdefault(service, set()).add((addr, port))
    differing = 0
    keys = zip(services["proto"].tolist(), services["addr"].tolist(), services["port"].tolist(),
               services["fwmark"].tolist())
    for index, key in enumerate(keys):
        s = ipvs.find_service(*key)
        listed = None if s < 0 else {(int(have["addr"][d]), int(have["port"][d])) for d in ipvs.service_dests(s)}
        differing += listed != wanted.get(index, set())
    return differing


NEW_POD_ADDR, NEW_POD_PORT = 0x0AFF0001, 8080  # 10.255.0.1: an address no generated pod has


def _replace_dest(ipvs, services: np.ndarray):
    """An endpoint moves: the first service's first destination goes, a new one comes."""
    s = ipvs.find_service(*(int(services[0][f]) for f in ("proto", "addr", "port", "fwmark")))
    listed = ipvs.service_dests(s)

    def change():
        if listed:
            ipvs.remove_dest(listed[0])
        ipvs.add_dest(s, NEW_POD_ADDR, NEW_POD_PORT)
    return change


def _add_service_like(ipvs, services: np.ndarray, dests: np.ndarray):
    """A new service like the first one, with its endpoints, on an unused address."""
    first = services[0]
    addr = int(services["addr"].max()) + 1
    endpoints = dests[dests["service"] == 0]

    def change():
        s = ipvs.add_service(addr, int(first["port"]), int(first["proto"]),
                             L.IPVS_SCHEDULERS[int(first["scheduler"])], int(first["flags"]),
                             int(first["timeout"]), 0, int(first["netmask"]))
        for d in endpoints:
            ipvs.add_dest(s, int(d["addr"]), int(d["port"]), int(d["weight"]))
    return change
