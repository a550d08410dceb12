"""eBPF service maps: a Cilium-like REFERENCE MODEL of an eBPF kube-proxy replacement.

This is not a kube-proxy mode. It models what Cilium's socket/tc load balancer (bpf/lib/lb.h)
does with BPF hash maps, so that kube-proxy's modes can be compared with an eBPF data plane
at the same cluster sizes.

Hash maps (kernel/bpf/hashtab.c, BPF_MAP_TYPE_HASH, preallocated, no LRU). ``max_entries``
elements are reserved at creation; the bucket array has ``n_buckets = roundup_pow_of_two(
max_entries)`` chains and is never resized. ``htab_map_hash`` is ``jhash(key, key_size,
hashrnd)`` (jhash2 over words for sizes divisible by 4, the same value on a little-endian host),
``hashrnd`` drawn at creation (get_random_u32(), here from the seed); the bucket is ``hash &
(n_buckets - 1)``. A lookup (lookup_nulls_elem_raw) walks the chain comparing the stored hash
and then the key: every element walked counts in ``bucket_compares``. An update (BPF_ANY)
hashes again, walks the chain for the key (replacing its value if found) and otherwise takes a
free element and adds it at the chain head; with all ``max_entries`` elements in use it fails
with -E2BIG (the per-CPU spare elements are only for replacing existing keys).

Maps, as Cilium sizes them by default:

* service map (cilium_lb4_services_v2, 65,536 entries, bpf-lb-map-max): key struct lb4_key =
  __be32 address, __be16 dport, u16 backend_slot, u8 proto, u8 scope, 2 pad bytes (12 bytes);
  value struct lb4_service (12 bytes). Slot 0 is a frontend's master entry: the backend count
  and the rev_nat index; slots 1..count each hold one backend id. A frontend with N backends
  takes N + 1 entries, so the map holds, e.g., 65,536 / 11 ≈ 5,957 frontends of 10 backends.
* backend map (cilium_lb4_backends_v3, 65,536 entries): u32 backend id -> struct lb4_backend
  (address, port, proto). Backends shared by several frontends have one id.
* connection tracking (cilium_ct4_global, 524,288 entries, bpf-ct-global-tcp-max): key struct
  ipv4_ct_tuple (daddr, saddr, dport, sport, nexthdr, flags; 14 bytes, packed) with the service
  address and TUPLE_F_SERVICE; value the connection's backend id. Modelled as a plain hash map
  (Cilium's is LRU by default; no LRU eviction, no garbage collection, no timeouts here), one
  entry per connection (Cilium's second, per-endpoint CT entry is not modelled).
* Maglev (cilium_lb4_maglev): an outer hash-of-maps keyed by the u16 rev_nat index whose inner
  map is an array holding one frontend's table of ``maglev_size`` (16,381) backend ids.

``process`` runs each packet as lb4_local does for a packet to a service:

1. not TCP/UDP/SCTP: NOT_SERVICE, nothing looked up;
2. service-map lookup of ⟨dst, dport, slot 0, proto⟩: a miss is NOT_SERVICE (the packet passes
   untouched; one lookup is all a non-service packet costs);
3. CT lookup of the service tuple: a hit takes the connection's backend id;
4. a miss with count 0 is NO_BACKEND (dropped); otherwise a backend is picked:
   ``random`` (Cilium's default bpf-lb-algorithm): slot ``bpf_get_prandom_u32() % count + 1``
   (lb4_select_backend_id_random uses the modulo), then a service-map lookup of that slot;
   ``maglev``: index ``hash_from_tuple_v4 % maglev_size`` with hash_from_tuple_v4 =
   ``jhash_3words(saddr, dport << 16 | sport, nexthdr, seed)`` (fields as a little-endian CPU
   loads them; as remembered from Cilium's bpf/lib/hash.h), the outer-map lookup and the
   inner array lookup;
5. backend-map lookup of the id (NO_BACKEND if missing), then for a new connection the CT
   update (CT_FULL, dropped, when the CT map is full), and the packet is DNATed: FORWARD.

Maglev tables (Eisenbud et al., "Maglev: A Fast and Reliable Software Network Load Balancer",
NSDI 2016, Pseudocode 1; Cilium's pkg/maglev does the same): per backend, in slot order,
``offset = h1 % M`` and ``skip = h2 % (M - 1) + 1``; backends take turns claiming the next free
slot of their permutation ``(offset + j·skip) % M`` until all M slots are filled. h1 and h2 are
jhash of the backend's address, port and proto with two seeded values (standing in for
Cilium's murmur3 of the backend with the cluster's maglev hash seed). Weights are not modelled.
``maglev_probes`` counts the permutation slots read while filling.

Seeds: one splitmix64 stream from ``seed`` gives, in order, the hashrnd of the service,
backend, CT and Maglev outer maps, the two Maglev seeds, the tuple-hash seed, then the random
picks. Session affinity and health checking are not modelled.

Per-packet counters (EBPF_RESULT_DTYPE): ``map_lookups``, ``bucket_compares`` (every map,
inserts included), ``ct_compares`` (the CT map's part), ``hash_computations``, ``ct_inserts``,
``rng_draws``; ``backend_slot`` is the slot (random) or table index (maglev) picked. The same
counters are summed in ``totals``.

The pure-Python twin is kernels.reference.ebpf; both give identical results and counters.
"""
import numpy as np

cimport cython
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset
from kernels.clock cimport now_ns

from kernels cimport hashing
from kernels.records cimport packet_t
from kernels import layout as L

SERVICE_KEY_BYTES, BACKEND_KEY_BYTES, CT_KEY_BYTES, MAGLEV_KEY_BYTES = 12, 4, 14, 2
INITIAL_CAPACITY = 1024

cdef enum:
    KEY_BYTES = 16  # row width of the key store; every key here is at most 14 bytes
    IPPROTO_TCP = 6
    IPPROTO_UDP = 17
    IPPROTO_SCTP = 132
    TUPLE_F_SERVICE = 4
    V_FORWARD = 0
    V_NOT_SERVICE = 1
    V_NO_BACKEND = 2
    V_CT_FULL = 3
    ALGO_RANDOM = 0
    ALGO_MAGLEV = 1

# C-level copies of kernels/layout.py; test_kernels_ebpf.py checks them against it.
LAYOUT_CONSTANTS = {"EBPF_FORWARD": V_FORWARD, "EBPF_NOT_SERVICE": V_NOT_SERVICE,
                    "EBPF_NO_BACKEND": V_NO_BACKEND, "EBPF_CT_FULL": V_CT_FULL}

cdef packed struct ebpf_result_t:  # EBPF_RESULT_DTYPE
    uint8_t verdict
    uint8_t ct_hit
    uint16_t dnat_port
    uint32_t dnat_ip
    int32_t rev_nat
    uint32_t backend_id
    uint32_t backend_slot
    uint32_t map_lookups
    uint32_t bucket_compares
    uint32_t ct_compares
    uint32_t hash_computations
    uint32_t ct_inserts
    uint32_t rng_draws

cdef packed struct service_entry_t:  # EBPF_SERVICE_DTYPE
    uint32_t addr
    uint16_t port
    uint16_t slot
    uint8_t proto
    uint8_t pad[3]
    uint32_t backend_id
    uint16_t count
    uint16_t pad1
    uint32_t rev_nat

cdef packed struct backend_t:  # EBPF_BACKEND_DTYPE
    uint32_t id
    uint32_t addr
    uint16_t port
    uint8_t proto
    uint8_t pad


def struct_layout() -> dict:
    """{"result"|"service"|"backend": sizeof} of the C structs, to check the dtypes."""
    return {"result": sizeof(ebpf_result_t), "service": sizeof(service_entry_t),
            "backend": sizeof(backend_t)}


def roundup_pow_of_two(uint64_t n) -> int:
    cdef uint64_t size = 1
    while size < n:
        size <<= 1
    return size


# ---- key layouts (network order where the kernel keeps __be fields) -------------------------


cdef inline void service_key(uint8_t *k, uint32_t addr, uint16_t port, uint16_t slot,
                             uint8_t proto) noexcept nogil:
    # struct lb4_key: __be32 address, __be16 dport, u16 backend_slot, u8 proto, u8 scope, pad[2]
    memset(k, 0, KEY_BYTES)
    hashing.put_be32(k, addr)
    hashing.put_be16(k + 4, port)
    hashing.put_le16(k + 6, slot)
    k[8] = proto


cdef inline void ct_key(uint8_t *k, uint32_t daddr, uint32_t saddr, uint16_t dport, uint16_t sport,
                        uint8_t proto) noexcept nogil:
    # struct ipv4_ct_tuple (packed): daddr, saddr, dport, sport, nexthdr, flags
    memset(k, 0, KEY_BYTES)
    hashing.put_be32(k, daddr)
    hashing.put_be32(k + 4, saddr)
    hashing.put_be16(k + 8, dport)
    hashing.put_be16(k + 10, sport)
    k[12] = proto
    k[13] = TUPLE_F_SERVICE


cdef inline uint32_t tuple_hash(const uint8_t *k, uint32_t seed) noexcept nogil:
    # hash_from_tuple_v4: jhash_3words(saddr, dport << 16 | sport, nexthdr, seed)
    cdef uint32_t ports = ((<uint32_t>(k[8] | (k[9] << 8))) << 16) | (k[10] | (k[11] << 8))
    return hashing.jhash_3words(hashing.load_le32(k + 4), ports, k[12], seed)


# ---- one preallocated BPF hash map ----------------------------------------------------------

@cython.final
cdef class Htab:
    """One preallocated BPF_MAP_TYPE_HASH: fixed buckets, chains newest first, E2BIG when full."""

    cdef readonly int key_size
    cdef readonly uint32_t max_entries
    cdef readonly uint32_t n_buckets
    cdef readonly uint32_t hashrnd
    cdef readonly uint32_t capacity
    cdef readonly uint32_t count
    cdef readonly int64_t insert_failures
    cdef int32_t[::1] heads
    cdef int32_t[::1] next
    cdef uint32_t[::1] hashes
    cdef uint8_t[:, ::1] keys
    cdef int32_t[::1] values

    def __init__(self, int key_size, uint32_t max_entries, uint32_t hashrnd):
        if not 1 <= max_entries <= (1 << 26):
            raise ValueError("max_entries must be 1..2^26")
        self.key_size, self.max_entries, self.hashrnd = key_size, max_entries, hashrnd
        self.n_buckets = roundup_pow_of_two(max_entries)
        self.heads = np.full(self.n_buckets, -1, dtype=np.int32)
        self.capacity = 0
        self.grow(min(INITIAL_CAPACITY, max_entries))

    def __len__(self) -> int:
        return self.count

    cdef void grow(self, uint32_t capacity):
        """The model's element arrays, re-made larger (the kernel's are preallocated)."""
        cdef Py_ssize_t used = self.count
        next_, hashes, values = (np.zeros(capacity, np.int32), np.zeros(capacity, np.uint32),
                                 np.zeros(capacity, np.int32))
        keys = np.zeros((capacity, KEY_BYTES), np.uint8)
        if used:
            next_[:used], hashes[:used] = self.next[:used], self.hashes[:used]
            values[:used], keys[:used] = self.values[:used], self.keys[:used]
        self.next, self.hashes, self.values, self.keys = next_, hashes, values, keys
        self.capacity = capacity

    cdef int32_t find(self, const uint8_t *key, uint32_t h, ebpf_result_t *r) noexcept nogil:
        cdef int32_t e = self.heads[h & (self.n_buckets - 1)]
        while e >= 0:
            r.bucket_compares += 1
            if self.hashes[e] == h and memcmp(&self.keys[e, 0], key, self.key_size) == 0:
                return e
            e = self.next[e]
        return -1

    cdef int32_t lookup(self, const uint8_t *key, ebpf_result_t *r) noexcept nogil:
        """bpf_map_lookup_elem: the value, or -1 on a miss."""
        r.map_lookups += 1
        r.hash_computations += 1
        cdef int32_t e = self.find(key, hashing.jhash(key, self.key_size, self.hashrnd), r)
        return self.values[e] if e >= 0 else -1

    cdef int update(self, const uint8_t *key, int32_t value, ebpf_result_t *r) noexcept nogil:
        """bpf_map_update_elem(BPF_ANY): 0, or -E2BIG when a new key finds the map full."""
        r.hash_computations += 1
        cdef uint32_t h = hashing.jhash(key, self.key_size, self.hashrnd)
        cdef int32_t e = self.find(key, h, r)
        if e >= 0:
            self.values[e] = value
            return 0
        if self.count == self.max_entries:
            self.insert_failures += 1
            return -7  # -E2BIG
        if self.count == self.capacity:
            with gil:
                self.grow(min(2 * self.capacity, self.max_entries))
        e = self.count
        cdef uint32_t bucket = h & (self.n_buckets - 1)
        self.next[e] = self.heads[bucket]
        self.hashes[e] = h
        memcpy(&self.keys[e, 0], key, KEY_BYTES)
        self.values[e] = value
        self.heads[bucket] = e
        self.count += 1
        return 0

    def model_bytes(self) -> int:
        return 4 * self.n_buckets + (4 + 4 + 4 + KEY_BYTES) * self.capacity


cdef int64_t maglev_fill(const uint8_t[:, ::1] backend_keys, uint32_t[::1] table, uint32_t seed1,
                        uint32_t seed2):
    """Maglev's population (NSDI 2016, Pseudocode 1) into ``table`` (backend positions); returns
    the permutation slots probed."""
    cdef Py_ssize_t n = backend_keys.shape[0], size = table.shape[0], i, filled = 0
    cdef uint32_t[::1] offsets = np.zeros(n, np.uint32)
    cdef uint32_t[::1] skips = np.zeros(n, np.uint32)
    cdef uint64_t[::1] turns = np.zeros(n, np.uint64)
    cdef uint8_t[::1] occupied = np.zeros(size, np.uint8)
    cdef uint32_t c
    cdef int64_t probes = 0
    for i in range(n):
        offsets[i] = hashing.jhash(&backend_keys[i, 0], 8, seed1) % size
        skips[i] = hashing.jhash(&backend_keys[i, 0], 8, seed2) % (size - 1) + 1
    while filled < size:
        for i in range(n):
            while True:
                c = (offsets[i] + turns[i] * skips[i]) % size
                turns[i] += 1
                probes += 1
                if not occupied[c]:
                    break
            occupied[c] = 1
            table[c] = i
            filled += 1
            if filled == size:
                break
    return probes


# ---- the load balancer ----------------------------------------------------------------------

@cython.final
cdef class ServiceMaps:
    """One node's eBPF load balancer: service, backend, Maglev and connection-tracking maps."""

    cdef readonly Htab services
    cdef readonly Htab backends
    cdef readonly Htab ct
    cdef readonly Htab maglev_outer
    cdef readonly tuple maglev_seeds
    cdef readonly uint32_t tuple_seed
    cdef readonly str algorithm
    cdef readonly uint32_t maglev_size
    cdef readonly int64_t maglev_probes
    cdef int algo
    cdef uint64_t rng_state
    cdef service_entry_t[::1] entries
    cdef backend_t[::1] backend_rows
    cdef uint32_t[:, ::1] maglev  # per table: backend ids
    cdef object _entries_array
    cdef object _backends_array
    cdef Py_ssize_t n_tables
    cdef int64_t[6] total

    def __init__(self, uint64_t seed=0, str algorithm="random",
                 uint32_t service_max_entries=L.EBPF_SERVICE_MAX_ENTRIES,
                 uint32_t backend_max_entries=L.EBPF_SERVICE_MAX_ENTRIES,
                 uint32_t ct_max_entries=L.EBPF_CT_MAX_ENTRIES,
                 uint32_t maglev_size=L.EBPF_MAGLEV_TABLE_SIZE):
        if algorithm not in L.EBPF_ALGORITHMS:
            raise ValueError(f"unknown algorithm {algorithm!r}")
        if maglev_size < 3 or any(maglev_size % d == 0 for d in range(2, int(maglev_size ** 0.5) + 1)):
            raise ValueError("maglev_size must be a prime of at least 3")
        self.rng_state = seed
        # Every map draws its hashrnd at creation (get_random_u32()), in this order.
        self.services = Htab(SERVICE_KEY_BYTES, service_max_entries, hashing.rng_u32(&self.rng_state))
        self.backends = Htab(BACKEND_KEY_BYTES, backend_max_entries, hashing.rng_u32(&self.rng_state))
        self.ct = Htab(CT_KEY_BYTES, ct_max_entries, hashing.rng_u32(&self.rng_state))
        self.maglev_outer = Htab(MAGLEV_KEY_BYTES, service_max_entries, hashing.rng_u32(&self.rng_state))
        first = hashing.rng_u32(&self.rng_state)
        self.maglev_seeds = (first, hashing.rng_u32(&self.rng_state))
        self.tuple_seed = hashing.rng_u32(&self.rng_state)
        self.algorithm = algorithm
        self.algo = ALGO_MAGLEV if algorithm == "maglev" else ALGO_RANDOM
        self.maglev_size = maglev_size
        self._set_rows(np.zeros(0, L.EBPF_SERVICE_DTYPE), np.zeros(0, L.EBPF_BACKEND_DTYPE))
        self.maglev = np.zeros((0, maglev_size), np.uint32)
        self.n_tables = 0
        memset(self.total, 0, sizeof(self.total))

    def _set_rows(self, entries, backends) -> None:
        self._entries_array = np.ascontiguousarray(entries, dtype=L.EBPF_SERVICE_DTYPE).copy()
        self._backends_array = np.ascontiguousarray(backends, dtype=L.EBPF_BACKEND_DTYPE).copy()
        self.entries = self._entries_array
        self.backend_rows = self._backends_array

    @classmethod
    def from_arrays(cls, services, backends, **options):
        """Maps holding ``backends`` (EBPF_BACKEND_DTYPE) and ``services`` (EBPF_SERVICE_DTYPE),
        inserted in array order as the agent would; inserts past max_entries fail (counted in
        each map's ``insert_failures``). With Maglev, every frontend whose master entry went in
        and has backends gets its table."""
        cdef ServiceMaps maps = cls(**options)
        maps._set_rows(services, backends)
        cdef ebpf_result_t scratch
        cdef uint8_t key[KEY_BYTES]
        cdef Py_ssize_t row
        cdef service_entry_t *e
        memset(&scratch, 0, sizeof(scratch))
        for row in range(maps.backend_rows.shape[0]):
            memset(key, 0, KEY_BYTES)
            hashing.put_le32(key, maps.backend_rows[row].id)
            maps.backends.update(key, <int32_t>row, &scratch)
        for row in range(maps.entries.shape[0]):
            e = &maps.entries[row]
            service_key(key, e.addr, e.port, e.slot, e.proto)
            maps.services.update(key, <int32_t>row, &scratch)
        if maps.algo == ALGO_MAGLEV:
            maps.build_maglev()
        return maps

    cdef void build_maglev(self):
        entries = self._entries_array
        slots = {}
        for addr, port, slot, proto, backend_id in zip(*(entries[f].tolist() for f in
                                                         ("addr", "port", "slot", "proto", "backend_id"))):
            if slot:
                slots.setdefault((addr, port, proto), {})[slot] = backend_id
        by_id = {ident: (addr, port, proto) for ident, addr, port, proto, _ in self._backends_array.tolist()}
        frontends = []
        cdef ebpf_result_t scratch
        cdef uint8_t key[KEY_BYTES]
        memset(&scratch, 0, sizeof(scratch))
        for addr, port, proto, count, rev_nat in zip(*(entries[f].tolist() for f in
                                                       ("addr", "port", "proto", "count", "rev_nat"))):
            service_key(key, addr, port, 0, proto)
            if count and self.services.lookup(key, &scratch) >= 0:
                if rev_nat > 0xFFFF:
                    raise ValueError(f"rev_nat {rev_nat} does not fit Maglev's u16 map key")
                frontends.append((rev_nat, [slots.get((addr, port, proto), {}).get(s, 0)
                                            for s in range(1, count + 1)]))
        tables = np.zeros((len(frontends), self.maglev_size), np.uint32)
        positions = np.zeros(self.maglev_size, np.uint32)
        cdef int64_t probes = 0
        for rev_nat, ids in frontends:
            backend_keys = np.zeros(len(ids), dtype=[("addr", ">u4"), ("port", ">u2"), ("proto", "u1"),
                                                     ("pad", "u1")])
            for i, ident in enumerate(ids):
                backend_keys[i] = (*by_id.get(ident, (0, 0, 0)), 0)
            probes += maglev_fill(backend_keys.view(np.uint8).reshape(len(ids), 8), positions,
                                  self.maglev_seeds[0], self.maglev_seeds[1])
            memset(key, 0, KEY_BYTES)
            hashing.put_le16(key, <uint16_t>rev_nat)
            if self.maglev_outer.update(key, <int32_t>self.n_tables, &scratch) == 0:
                tables[self.n_tables] = np.asarray(ids, np.uint32)[positions]
                self.n_tables += 1
        self.maglev_probes += probes
        self.maglev = tables[:self.n_tables].copy()

    # ---- the data path -----------------------------------------------------------------------

    def process(self, const packet_t[::1] packets, ebpf_result_t[::1] results,
                int64_t[::1] ns=None) -> None:
        """Run each packet through the load balancer; fill ``results``, add times into ``ns``."""
        cdef Py_ssize_t n = packets.shape[0], i
        if results.shape[0] < n or (ns is not None and ns.shape[0] < n):
            raise ValueError("results and ns need one slot per packet")
        cdef bint timed = ns is not None
        cdef int64_t start = 0
        with nogil:
            for i in range(n):
                if timed:
                    start = now_ns()
                self.handle(&packets[i], &results[i])
                if timed:
                    ns[i] += now_ns() - start
                self.add_totals(&results[i])

    cdef void handle(self, const packet_t *p, ebpf_result_t *r) noexcept nogil:
        memset(r, 0, sizeof(ebpf_result_t))
        r.rev_nat = -1
        if p.proto != IPPROTO_TCP and p.proto != IPPROTO_UDP and p.proto != IPPROTO_SCTP:
            r.verdict = V_NOT_SERVICE
            return
        cdef uint8_t key[KEY_BYTES]
        cdef uint8_t tuple_key[KEY_BYTES]
        service_key(key, p.dst, p.dport, 0, p.proto)
        cdef int32_t master = self.services.lookup(key, r)
        if master < 0:
            r.verdict = V_NOT_SERVICE
            return
        cdef uint16_t count = self.entries[master].count
        r.rev_nat = <int32_t>self.entries[master].rev_nat
        ct_key(tuple_key, p.dst, p.src, p.dport, p.sport, p.proto)
        cdef uint32_t before = r.bucket_compares
        cdef int64_t backend_id = self.ct.lookup(tuple_key, r)
        r.ct_compares += r.bucket_compares - before
        if backend_id >= 0:
            r.ct_hit = 1
        elif count == 0:
            r.verdict = V_NO_BACKEND
            return
        else:
            backend_id = self.select(p, tuple_key, count, r)
        cdef int32_t backend = -1
        if backend_id > 0:
            memset(key, 0, KEY_BYTES)
            hashing.put_le32(key, <uint32_t>backend_id)
            backend = self.backends.lookup(key, r)
        if backend < 0:
            r.verdict = V_NO_BACKEND
            return
        cdef int failed
        if not r.ct_hit:
            before = r.bucket_compares
            failed = self.ct.update(tuple_key, <int32_t>backend_id, r) < 0
            r.ct_compares += r.bucket_compares - before
            if failed:
                r.verdict = V_CT_FULL
                return
            r.ct_inserts += 1
        r.verdict = V_FORWARD
        r.backend_id = <uint32_t>backend_id
        r.dnat_ip = self.backend_rows[backend].addr
        r.dnat_port = self.backend_rows[backend].port

    cdef int64_t select(self, const packet_t *p, const uint8_t *tuple_key, uint16_t count,
                        ebpf_result_t *r) noexcept nogil:
        """A new connection's backend id (0 when its slot or table is missing)."""
        cdef uint8_t key[KEY_BYTES]
        cdef int32_t found
        if self.algo == ALGO_MAGLEV:
            r.hash_computations += 1
            r.backend_slot = tuple_hash(tuple_key, self.tuple_seed) % self.maglev_size
            memset(key, 0, KEY_BYTES)
            hashing.put_le16(key, <uint16_t>(r.rev_nat & 0xFFFF))
            found = self.maglev_outer.lookup(key, r)
            if found < 0:
                return 0
            r.map_lookups += 1  # the inner array map
            return self.maglev[found, r.backend_slot]
        r.rng_draws += 1
        r.backend_slot = hashing.rng_u32(&self.rng_state) % count + 1
        service_key(key, p.dst, p.dport, <uint16_t>r.backend_slot, p.proto)
        found = self.services.lookup(key, r)
        return self.entries[found].backend_id if found >= 0 else 0

    cdef void add_totals(self, const ebpf_result_t *r) noexcept nogil:
        self.total[0] += r.map_lookups
        self.total[1] += r.bucket_compares
        self.total[2] += r.ct_compares
        self.total[3] += r.hash_computations
        self.total[4] += r.ct_inserts
        self.total[5] += r.rng_draws

    # ---- inspection ------------------------------------------------------------------------

    @property
    def totals(self) -> dict:
        return {name: self.total[i] for i, name in enumerate(L.EBPF_WORK_COUNTERS)}

    def maps(self) -> dict:
        """{map: {"max_entries", "buckets", "entries", "insert_failures"}} of every hash map."""
        return {name: {"max_entries": m.max_entries, "buckets": m.n_buckets, "entries": m.count,
                       "insert_failures": m.insert_failures}
                for name, m in (("services", self.services), ("backends", self.backends),
                                ("ct", self.ct), ("maglev_outer", self.maglev_outer))}

    def maglev_table(self, int rev_nat) -> np.ndarray:
        """A frontend's Maglev table (backend ids); empty when it has none."""
        cdef ebpf_result_t scratch
        cdef uint8_t key[KEY_BYTES]
        memset(&scratch, 0, sizeof(scratch))
        memset(key, 0, KEY_BYTES)
        hashing.put_le16(key, <uint16_t>(rev_nat & 0xFFFF))
        cdef int32_t found = self.maglev_outer.lookup(key, &scratch)
        return np.asarray(self.maglev[found]).copy() if found >= 0 else np.zeros(0, np.uint32)

    def model_bytes(self) -> int:
        """Bytes of this model's own arrays."""
        maps = (self.services, self.backends, self.ct, self.maglev_outer)
        return (sum(m.model_bytes() for m in maps) + self._entries_array.nbytes
                + self._backends_array.nbytes + 4 * self.maglev_size * self.n_tables)
