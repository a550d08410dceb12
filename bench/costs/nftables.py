"""nftables mode's cost model: the kernel memory a synced node holds, and what a sync costs.

Memory (kernel-internals §3.6) comes from the kernel model that owns it: the nftables
Ruleset's ``modelled_bytes()`` (rules with their expressions, the rule blobs, the named sets
as rhash tables, the anonymous numgen maps and address sets) plus conntrack's, next to the
real bytes of the model's own arrays (``model_bytes()``).

Update cost (§3.7, kube-proxy-rules §c "Incremental sync"): a sync is one ``nft -f``
transaction, and a partial one holds only the changed chains and elements, so its cost is
O(changed objects), not O(ruleset). :func:`apply_transaction` applies one to the live model as
the kernel commits it: the loader edits the ruleset in place (bench.loaders.nftables.apply),
only the changed chains are compiled (kernels.nftblob.compile_changes), and the kernel Ruleset
takes the patch (new chain blobs, anonymous maps, set elements added and deleted one by one);
then the rhashtable worker's deferred grow/shrink runs, timed and counted apart.
:func:`measure_updates` does this for one endpoint change and then one service added, and
reports per change the transaction's commands by kind, the kernel work by kind
(NftPatch.operations: chains compiled, rules, anonymous maps, elements added/deleted), and the
model's seconds to parse, compile and commit it. Neither count depends on the number of
services; the seconds stay nearly flat (the dict and hash-table accesses grow with the cache
misses of a larger table). Writing the transaction is kube-proxy's userspace work and is not
timed here.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import replace

from bench.cluster.model import CLUSTER_IP, Cluster
from bench.loaders.nftables import FAMILY, NftRuleset, apply, kube_proxy_table, load
from bench.netaddr import int_to_ip, ip_to_int
from bench.proxies.nftables import Syncer, WriterOptions
from kernels.nftblob import CompiledNft, NftPatch, compile_changes, compile_table

NEW_POD_IP = "10.255.0.1"  # an address no generated pod has


def memory(datapath) -> dict:
    """Modelled kernel bytes and the model's own bytes of an NftablesDatapath."""
    return {"kernel_bytes": int(datapath.table.modelled_bytes()) + int(datapath.conntrack.modelled_bytes()),
            "model_bytes": int(datapath.table.model_bytes()) + int(datapath.conntrack.model_bytes())}


def operations(transaction: str) -> dict[str, int]:
    """Commands of an ``nft -f`` transaction by kind ("add_rule", "delete_element", …)."""
    return dict(Counter("_".join(line.split()[:2]) for line in transaction.splitlines() if line.strip()))


def full_sync(cluster: Cluster, options: WriterOptions = WriterOptions(), seed: int = 0,
              syncer: Syncer | None = None) -> tuple[NftRuleset, CompiledNft, dict]:
    """A full sync in the model: the ruleset, its table compiled with ``seed`` (ready for
    NftablesDatapath), and the write, load and compile seconds. ``syncer`` (default: a new
    one) writes the transaction and keeps kube-proxy's state for later partial syncs."""
    started = time.perf_counter()
    text = (syncer or Syncer(options)).full(cluster)
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


def apply_transaction(text: str, ruleset: NftRuleset, table, source: str = "<transaction>") -> tuple[NftPatch, dict]:
    """Apply a partial-sync transaction to ``ruleset`` (in place) and to ``table``, the kernel
    Ruleset built from its compiled ``ip kube-proxy`` table, as the kernel commits it. Returns
    the patch and the seconds of each step, and the rhash worker's moves after it."""
    started = time.perf_counter()
    changes = apply(text, ruleset, source)
    loaded = time.perf_counter()
    if (FAMILY, "kube-proxy") not in changes.tables:
        raise ValueError(f"{source}: a partial sync must keep the table ip kube-proxy")
    patch = compile_changes(table.compiled, kube_proxy_table(ruleset), changes.tables[FAMILY, "kube-proxy"])
    compiled = time.perf_counter()
    table.apply(patch)
    committed = time.perf_counter()
    moved = table.maintain(sorted({i for i, *_ in patch.set_deletes + patch.set_inserts}))
    maintained = time.perf_counter()
    return patch, {"seconds": committed - started, "load_seconds": loaded - started,
                   "compile_seconds": compiled - loaded, "commit_seconds": committed - compiled,
                   "rehash_seconds": maintained - committed, "rehash_moves": moved}


def measure_updates(cluster: Cluster, ruleset: NftRuleset, table, options: WriterOptions = WriterOptions(),
                    syncer: Syncer | None = None) -> dict:
    """One endpoint change, then one service added, written by ``syncer`` (which synced
    ``cluster`` last; default: a new one taking ``cluster``'s state) and applied to
    ``ruleset`` and ``table`` (see :func:`apply_transaction`; all three end up holding the
    changed cluster): per change the transaction's commands by kind and their total, the
    kernel objects built or freed by kind (NftPatch.operations) and their total, and the
    model's seconds (``<change>_seconds``: parse, compile and commit; the rhash worker's
    ``<change>_rehash_seconds`` and ``_rehash_moves`` apart)."""
    if syncer is None:
        syncer = Syncer(options)
        syncer.full(cluster, render=False)
    record = {}
    for change, make in (("endpoint_change", moved_endpoint), ("service_add", added_service)):
        changed = make(cluster)
        text = syncer.partial(changed)
        patch, seconds = apply_transaction(text, ruleset, table, source=change)
        record.update({f"{change}_{name}": value for name, value in seconds.items()})
        record[f"{change}_operations"] = operations(text)
        record[f"{change}_operations_total"] = sum(record[f"{change}_operations"].values())
        record[f"{change}_kernel_operations"] = patch.operations()
        record[f"{change}_kernel_operations_total"] = sum(patch.operations().values())
        cluster = changed
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
