"""nftables mode's cost model: the kernel memory a synced node holds, and what a sync costs.

Memory (kernel-internals §3.6) comes from the kernel model that owns it: the nftables
Ruleset's ``modelled_bytes()`` (rules with their expressions, the rule blobs, the named sets
as rhash tables, the anonymous numgen maps and address sets) plus conntrack's, next to the
real bytes of the model's own arrays (``model_bytes()``).

Update cost (§3.7, kube-proxy-rules §c "Incremental sync"): a sync is one ``nft -f``
transaction, and a partial one holds only the changed chains and elements, so its cost is
O(changed objects), not O(ruleset). :func:`measure_updates` counts the commands in
write_partial's transaction for one endpoint change and one service added, by kind, and
times the model applying each (``load(text, base=ruleset)`` and compiling the table) next to
a full sync. The model's compile rebuilds every chain's blob where the kernel rebuilds only
the changed chains', so the model's partial-sync time overstates the kernel's.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import replace

from bench.cluster.model import CLUSTER_IP, Cluster
from bench.loaders.nftables import NftRuleset, load
from bench.loaders.nftables import kube_proxy_table
from bench.netaddr import int_to_ip, ip_to_int
from bench.proxies.nftables import WriterOptions, write_full, write_partial
from kernels.nftblob import CompiledNft, compile_table

NEW_POD_IP = "10.255.0.1"  # an address no generated pod has


def memory(datapath) -> dict:
    """Modelled kernel bytes and the model's own bytes of an NftablesDatapath."""
    return {"kernel_bytes": int(datapath.table.modelled_bytes()) + int(datapath.conntrack.modelled_bytes()),
            "model_bytes": int(datapath.table.model_bytes()) + int(datapath.conntrack.model_bytes())}


def operations(transaction: str) -> dict[str, int]:
    """Commands of an ``nft -f`` transaction by kind ("add_rule", "delete_element", …)."""
    return dict(Counter("_".join(line.split()[:2]) for line in transaction.splitlines() if line.strip()))


def full_sync(cluster: Cluster, options: WriterOptions = WriterOptions(),
              seed: int = 0) -> tuple[NftRuleset, CompiledNft, dict]:
    """A full sync in the model: the ruleset, its table compiled with ``seed`` (ready for
    NftablesDatapath), and the write, load and compile seconds."""
    started = time.perf_counter()
    text = write_full(cluster, options)
    written = time.perf_counter()
    ruleset = load(text, source=f"nftables rules for {len(cluster.services)} services")
    loaded = time.perf_counter()
    compiled_table = compile_table(kube_proxy_table(ruleset), seed)
    compiled = time.perf_counter()
    return ruleset, compiled_table, {"sync_proxy_rules_write_seconds": written - started,
                                     "sync_proxy_rules_load_seconds": loaded - written,
                                     "sync_proxy_rules_compile_seconds": compiled - loaded,
                     "sync_full_proxy_rules_duration_seconds": compiled - started,
                     "sync_full_operations": sum(operations(text).values())}


def measure_updates(cluster: Cluster, ruleset: NftRuleset, options: WriterOptions = WriterOptions()) -> dict:
    """The partial syncs after one endpoint change and one service added: operations by kind,
    their total, and the model's seconds to apply them: loading the transaction onto
    ``ruleset`` (O(changed objects)) and compiling the table (the whole table, see above)."""
    record = {}
    for change, changed in (("endpoint_change", moved_endpoint(cluster)), ("service_add", added_service(cluster))):
        text = write_partial(cluster, changed, options)
        started = time.perf_counter()
        applied = load(text, source=change, base=ruleset)
        loaded = time.perf_counter()
        compile_table(kube_proxy_table(applied))
        compiled = time.perf_counter()
        record[f"{change}_seconds"] = compiled - started
        record[f"{change}_load_seconds"] = loaded - started
        record[f"{change}_compile_seconds"] = compiled - loaded
        record[f"{change}_operations"] = operations(text)
        record[f"{change}_operations_total"] = sum(record[f"{change}_operations"].values())
    return record


def moved_endpoint(cluster: Cluster) -> Cluster:
    """The cluster after the first EndpointSlice's first endpoint moved to a new pod address."""
    first = next(i for i, s in enumerate(cluster.slices) if s.endpoints)
    old = cluster.slices[first]
    endpoints = [replace(old.endpoints[0], ip=NEW_POD_IP)] + old.endpoints[1:]
    slices = list(cluster.slices)
    slices[first] = replace(old, endpoints=endpoints)
    return replace(cluster, slices=slices)


def added_service(cluster: Cluster) -> Cluster:
    """The cluster with one more ClusterIP service with the first (non-headless) one's ports
    and endpoints, on a new name and the next free ClusterIP."""
    template = next(s for s in cluster.services if s.cluster_ip not in ("", "None"))
    name = f"{template.name}-added"
    used = {s.cluster_ip for s in cluster.services}
    ip = next(candidate for candidate in _addresses_after(template.cluster_ip) if candidate not in used)
    service = replace(template, name=name, type=CLUSTER_IP, cluster_ip=ip, external_ips=[], load_balancer_ips=[],
                      load_balancer_source_ranges=[], health_check_node_port=0,
                      ports=[replace(p, node_port=0) for p in template.ports])
    slices = [replace(s, name=f"{name}-{i}", service_name=name)
              for i, s in enumerate(cluster.slices)
              if (s.namespace, s.service_name) == (template.namespace, template.name)]
    return replace(cluster, services=cluster.services + [service], slices=cluster.slices + slices)


def _addresses_after(ip: str):
    start = ip_to_int(ip)
    return (int_to_ip(start + step) for step in range(1, 1 << 16))
