"""The eBPF REFERENCE MODEL's cost model: the preallocated BPF map memory, and what a change writes.

Memory. A preallocated BPF_MAP_TYPE_HASH (kernel/bpf/hashtab.c, htab_map_alloc and
prealloc_init) takes its memory at creation, however few entries it holds:

* elements: ``max_entries + num_possible_cpus()`` of them (maps that are neither per-CPU nor
  LRU keep one spare element per CPU for replacing a key), each ``elem_size = sizeof(struct
  htab_elem) + round_up(key_size, 8) + round_up(value_size, 8)``, with struct htab_elem 48 bytes
  on x86-64 (hash node 16, the lru_node/pointer union 24, u32 hash, padded to 8);
* buckets: ``roundup_pow_of_two(max_entries)`` struct bucket, 16 bytes each (hlist_nulls_head
  and a raw spinlock, padded);
* per CPU: the map_locked counters, HASHTAB_MAP_LOCK_COUNT (8) ints per CPU.

The struct bpf_htab header (under 1 KiB per map) is left out. Key and value sizes are Cilium's
(bpf/lib/common.h and lb.h, as remembered): lb4_key 12 / lb4_service 12 (service map),
u32 / lb4_backend 12 (backend map), ipv4_ct_tuple 14 / ct_entry 56 (CT map), u16 / an 8-byte
inner-map pointer (Maglev outer map). A Maglev table is an array map holding one value of
``M × 4`` bytes (M = 16,381 by default), allocated with its struct bpf_array header (estimated
at 320 bytes) in whole pages as bpf_map_area_alloc does for large areas. With Cilium's defaults
(65,536-entry LB maps, 524,288-entry CT map) the maps take about 88 MB at any cluster size,
close to the ~90 MB reported for Cilium's defaults (shared/docs/published-figures.md §9).

Updates. Cilium writes map entries one by one (bpf_map_update_elem), so a change costs the
entries it touches: an endpoint change writes its backend-map entry and one slot entry (and
rebuilds the frontend's Maglev table, M slots, under Maglev); adding a frontend writes its new
backends, its slots and its master. There is no list-and-diff of everything, as IPVS mode has.
"""
from __future__ import annotations

from bench.loaders.ebpf import EbpfMaps
from kernels import layout as L

HTAB_ELEM_BYTES = 48  # struct htab_elem, x86-64
BUCKET_BYTES = 16  # struct bucket
HASHTAB_MAP_LOCK_COUNT = 8  # per-CPU int counters of each hash map
BPF_ARRAY_HEADER_BYTES = 320  # struct bpf_array before its values (estimate)
PAGE_BYTES = 4096
# (key bytes, value bytes) of each hash map, as Cilium declares them.
MAP_KEY_VALUE_BYTES = {"services": (12, 12), "backends": (4, 12), "ct": (14, 56), "maglev_outer": (2, 8)}


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def htab_bytes(key_size: int, value_size: int, max_entries: int, n_cpus: int) -> int:
    """A preallocated BPF hash map: elements (with one spare per CPU), buckets, per-CPU locks."""
    elem = HTAB_ELEM_BYTES + _round_up(key_size, 8) + _round_up(value_size, 8)
    buckets = 1 << max(max_entries - 1, 0).bit_length()
    return (max_entries + n_cpus) * elem + buckets * BUCKET_BYTES + n_cpus * HASHTAB_MAP_LOCK_COUNT * 4


def maglev_table_bytes(table_size: int) -> int:
    return _round_up(BPF_ARRAY_HEADER_BYTES + _round_up(4 * table_size, 8), PAGE_BYTES)


def kernel_bytes(service_maps, n_cpus: int) -> dict:
    """Modelled kernel memory by map; the Maglev part only when the model uses Maglev."""
    maps = service_maps.maps()
    parts = {name: htab_bytes(*MAP_KEY_VALUE_BYTES[name], maps[name]["max_entries"], n_cpus)
             for name in ("services", "backends", "ct")}
    if service_maps.algorithm == "maglev":
        parts["maglev"] = (htab_bytes(*MAP_KEY_VALUE_BYTES["maglev_outer"], maps["maglev_outer"]["max_entries"],
                                      n_cpus)
                           + maps["maglev_outer"]["entries"] * maglev_table_bytes(service_maps.maglev_size))
    return parts


def sync_operations(maps: EbpfMaps) -> dict:
    """The map entries a full programming of the cluster writes."""
    return {"frontends": len(maps.frontends), "service_map_entries": len(maps.services),
            "backend_map_entries": len(maps.backends)}


def control_plane(maps: EbpfMaps, algorithm: str, program_seconds: float, write_load_seconds: float,
                  table_size: int = L.EBPF_MAGLEV_TABLE_SIZE) -> dict:
    """kube-proxy's sync metrics for the reference model: a full sync writes every entry; an
    endpoint change writes a backend and a slot (and rebuilds a Maglev table); a new frontend
    like the average one writes its backends, slots and master. Durations charge each entry
    the model's own mean insert time (``program_seconds`` over all entries); the full sync adds
    writing and parsing the text."""
    entries = len(maps.services) + len(maps.backends)
    per_entry = program_seconds / max(entries, 1)
    per_frontend = len(maps.services) / max(len(maps.frontends), 1)
    maglev = table_size if algorithm == "maglev" else 0
    endpoint_change = 2 + maglev
    service_add = per_frontend + (per_frontend - 1) + maglev
    return {
        "sync_full_proxy_rules_duration_seconds": write_load_seconds + program_seconds,
        "sync_full_proxy_rules_operations": entries,
        "sync_partial_proxy_rules_duration_seconds": per_entry * endpoint_change,
        "sync_partial_proxy_rules_operations": endpoint_change,
        "sync_add_service_duration_seconds": per_entry * service_add,
        "sync_add_service_operations": service_add,
    }
