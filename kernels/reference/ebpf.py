"""Pure-Python twin of kernels/ebpf.pyx: a Cilium-like eBPF service-map REFERENCE MODEL.

Same API, results and counters as the Cython kernel; the compiled module's docstring describes
the model in full. In short: preallocated BPF hash maps as kernel/bpf/hashtab.c keeps them
(``roundup_pow_of_two(max_entries)`` buckets, ``jhash`` of the key bytes with a seeded
``hashrnd``, new elements at the chain head, a lookup compares every element it walks, an
insert into a full map fails with E2BIG); Cilium's service map (slot 0 = a frontend's master
entry with the backend count, slots 1..count = backend ids), backend map, one connection-tracking
map, and a random (``rng % count + 1``) or Maglev backend pick.
"""
from __future__ import annotations

import time

import numpy as np

from kernels import layout as L
from kernels.reference.hashing import SplitMix64, jhash, jhash_3words

IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP = 6, 17, 132
TUPLE_F_SERVICE = 4  # Cilium's ipv4_ct_tuple flag for a tuple keyed by the service address
SERVICE_KEY_BYTES, BACKEND_KEY_BYTES, CT_KEY_BYTES, MAGLEV_KEY_BYTES = 12, 4, 14, 2
INITIAL_CAPACITY = 1024  # the model's element arrays grow by doubling up to max_entries
# Bytes per element of the compiled model's arrays: next, hash, value (i4/u4) and 16 key bytes.
MODEL_ELEMENT_BYTES = 4 + 4 + 4 + 16


def roundup_pow_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class _Counts:
    """The per-packet counters an operation adds to (a result record's work fields)."""

    __slots__ = L.EBPF_RESULT_DTYPE.names

    def __init__(self):
        for name in self.__slots__:
            setattr(self, name, 0)
        self.rev_nat = -1

    def record(self) -> tuple:
        return tuple(getattr(self, name) for name in self.__slots__)


class Htab:
    """One preallocated BPF_MAP_TYPE_HASH: fixed buckets, chains newest first, E2BIG when full."""

    def __init__(self, key_size: int, max_entries: int, hashrnd: int):
        if not 1 <= max_entries <= 1 << 26:
            raise ValueError("max_entries must be 1..2^26")
        self.key_size, self.max_entries, self.hashrnd = key_size, max_entries, hashrnd
        self.n_buckets = roundup_pow_of_two(max_entries)
        self._heads = [-1] * self.n_buckets
        self._next: list[int] = []
        self._hashes: list[int] = []
        self._keys: list[bytes] = []
        self._values: list[int] = []
        self.capacity = min(INITIAL_CAPACITY, max_entries)
        self.insert_failures = 0

    def __len__(self) -> int:
        return len(self._keys)

    def _find(self, key: bytes, h: int, counts: _Counts) -> int:
        """lookup_nulls_elem_raw: the element with this hash and key, or -1."""
        e = self._heads[h & (self.n_buckets - 1)]
        while e >= 0:
            counts.bucket_compares += 1
            if self._hashes[e] == h and self._keys[e] == key:
                return e
            e = self._next[e]
        return -1

    def lookup(self, key: bytes, counts: _Counts) -> int:
        """bpf_map_lookup_elem: the value, or -1 on a miss."""
        counts.map_lookups += 1
        counts.hash_computations += 1
        e = self._find(key, jhash(key, self.hashrnd), counts)
        return self._values[e] if e >= 0 else -1

    def update(self, key: bytes, value: int, counts: _Counts) -> int:
        """bpf_map_update_elem(BPF_ANY): 0, or -E2BIG when a new key finds the map full."""
        counts.hash_computations += 1
        h = jhash(key, self.hashrnd)
        e = self._find(key, h, counts)
        if e >= 0:
            self._values[e] = value
            return 0
        n = len(self._keys)
        if n == self.max_entries:
            self.insert_failures += 1
            return -L.E2BIG
        if n == self.capacity:
            self.capacity = min(2 * self.capacity, self.max_entries)
        bucket = h & (self.n_buckets - 1)
        self._next.append(self._heads[bucket])
        self._hashes.append(h)
        self._keys.append(bytes(key))
        self._values.append(value)
        self._heads[bucket] = n
        return 0

    def model_bytes(self) -> int:
        return 4 * self.n_buckets + MODEL_ELEMENT_BYTES * self.capacity


def service_key(addr: int, port: int, slot: int, proto: int) -> bytes:
    """struct lb4_key: __be32 address, __be16 dport, u16 backend_slot, u8 proto, u8 scope, pad."""
    return (addr.to_bytes(4, "big") + port.to_bytes(2, "big") + slot.to_bytes(2, "little")
            + bytes((proto, 0, 0, 0)))


def ct_key(daddr: int, saddr: int, dport: int, sport: int, proto: int) -> bytes:
    """struct ipv4_ct_tuple (packed, 14 bytes) of a service connection."""
    return (daddr.to_bytes(4, "big") + saddr.to_bytes(4, "big") + dport.to_bytes(2, "big")
            + sport.to_bytes(2, "big") + bytes((proto, TUPLE_F_SERVICE)))


def maglev_backend_key(addr: int, port: int, proto: int) -> bytes:
    return addr.to_bytes(4, "big") + port.to_bytes(2, "big") + bytes((proto, 0))


def tuple_hash(key: bytes, seed: int) -> int:
    """Cilium's hash_from_tuple_v4: jhash_3words(saddr, dport << 16 | sport, nexthdr, seed),
    the fields as a little-endian CPU loads them from the network-order tuple."""
    saddr = int.from_bytes(key[4:8], "little")
    ports = (int.from_bytes(key[8:10], "little") << 16) | int.from_bytes(key[10:12], "little")
    return jhash_3words(saddr, ports, key[12], seed)


def maglev_fill(backend_keys: list[bytes], size: int, seed1: int, seed2: int) -> tuple[list[int], int]:
    """Maglev's table population (Eisenbud et al., NSDI 2016, Pseudocode 1): each backend in turn
    takes the next free slot of its permutation ``(offset + j * skip) % size``. Returns the table
    of backend positions and the slots probed."""
    n = len(backend_keys)
    offsets = [jhash(key, seed1) % size for key in backend_keys]
    skips = [jhash(key, seed2) % (size - 1) + 1 for key in backend_keys]
    table = [-1] * size
    turns = [0] * n
    filled = probes = 0
    while filled < size:
        for i in range(n):
            while True:
                c = (offsets[i] + turns[i] * skips[i]) % size
                turns[i] += 1
                probes += 1
                if table[c] < 0:
                    break
            table[c] = i
            filled += 1
            if filled == size:
                break
    return table, probes


class ServiceMaps:
    """One node's eBPF load balancer: service, backend, Maglev and connection-tracking maps."""

    def __init__(self, seed: int = 0, algorithm: str = "random",
                 service_max_entries: int = L.EBPF_SERVICE_MAX_ENTRIES,
                 backend_max_entries: int = L.EBPF_SERVICE_MAX_ENTRIES,
                 ct_max_entries: int = L.EBPF_CT_MAX_ENTRIES,
                 maglev_size: int = L.EBPF_MAGLEV_TABLE_SIZE):
        if algorithm not in L.EBPF_ALGORITHMS:
            raise ValueError(f"unknown algorithm {algorithm!r}")
        if maglev_size < 3 or any(maglev_size % d == 0 for d in range(2, int(maglev_size ** 0.5) + 1)):
            raise ValueError("maglev_size must be a prime of at least 3")
        rng = SplitMix64(seed)
        # Every map draws its hashrnd at creation (get_random_u32()), in this order.
        self.services = Htab(SERVICE_KEY_BYTES, service_max_entries, rng.u32())
        self.backends = Htab(BACKEND_KEY_BYTES, backend_max_entries, rng.u32())
        self.ct = Htab(CT_KEY_BYTES, ct_max_entries, rng.u32())
        self.maglev_outer = Htab(MAGLEV_KEY_BYTES, service_max_entries, rng.u32())
        self.maglev_seeds = (rng.u32(), rng.u32())
        self.tuple_seed = rng.u32()
        self._rng = rng  # bpf_get_prandom_u32() from here on
        self.algorithm = algorithm
        self.maglev_size = maglev_size
        self._entries = np.zeros(0, dtype=L.EBPF_SERVICE_DTYPE)
        self._backends = np.zeros(0, dtype=L.EBPF_BACKEND_DTYPE)
        self._maglev: list[list[int]] = []  # per table: backend ids
        self.maglev_probes = 0
        self.totals = dict.fromkeys(L.EBPF_WORK_COUNTERS, 0)

    @classmethod
    def from_arrays(cls, services, backends, **options) -> "ServiceMaps":
        """Maps holding ``backends`` (EBPF_BACKEND_DTYPE) and ``services`` (EBPF_SERVICE_DTYPE),
        inserted in array order as the agent would; inserts past max_entries fail (counted in
        each map's ``insert_failures``). With Maglev, every frontend whose master entry went in
        and has backends gets its table."""
        maps = cls(**options)
        maps._entries = np.asarray(services, dtype=L.EBPF_SERVICE_DTYPE).copy()
        maps._backends = np.asarray(backends, dtype=L.EBPF_BACKEND_DTYPE).copy()
        scratch = _Counts()
        for row, (ident, *_rest) in enumerate(maps._backends.tolist()):
            maps.backends.update(ident.to_bytes(4, "little"), row, scratch)
        for row, (addr, port, slot, proto, _, _, _, _, _) in enumerate(maps._entries.tolist()):
            maps.services.update(service_key(addr, port, slot, proto), row, scratch)
        if maps.algorithm == "maglev":
            maps._build_maglev()
        return maps

    def _build_maglev(self) -> None:
        entries = self._entries
        slots: dict[tuple, dict[int, int]] = {}
        for addr, port, slot, proto, backend_id in zip(*(entries[f].tolist() for f in
                                                         ("addr", "port", "slot", "proto", "backend_id"))):
            if slot:
                slots.setdefault((addr, port, proto), {})[slot] = backend_id
        by_id = {ident: (addr, port, proto) for ident, addr, port, proto, _ in self._backends.tolist()}
        scratch = _Counts()
        for addr, port, proto, count, rev_nat in zip(*(entries[f].tolist() for f in
                                                       ("addr", "port", "proto", "count", "rev_nat"))):
            key = service_key(addr, port, 0, proto)
            if not count or self.services.lookup(key, scratch) < 0:
                continue
            if rev_nat > 0xFFFF:
                raise ValueError(f"rev_nat {rev_nat} does not fit Maglev's u16 map key")
            ids = [slots.get((addr, port, proto), {}).get(s, 0) for s in range(1, count + 1)]
            keys = [maglev_backend_key(*by_id.get(ident, (0, 0, 0))) for ident in ids]
            table, probes = maglev_fill(keys, self.maglev_size, *self.maglev_seeds)
            self.maglev_probes += probes
            if self.maglev_outer.update(rev_nat.to_bytes(2, "little"), len(self._maglev), scratch) == 0:
                self._maglev.append([ids[i] for i in table])

    # ---- the data path -----------------------------------------------------------------------

    def process(self, packets: np.ndarray, results: np.ndarray, ns: np.ndarray | None = None) -> None:
        """Run each packet through the load balancer; fill ``results``, add times into ``ns``."""
        n = len(packets)
        if len(results) < n or (ns is not None and len(ns) < n):
            raise ValueError("results and ns need one slot per packet")
        clock = time.perf_counter_ns
        records = []
        for i, (src, dst, sport, dport, proto, *_rest) in enumerate(packets.tolist()):
            start = clock()
            r = self._handle(src, dst, sport, dport, proto)
            if ns is not None:
                ns[i] += clock() - start
            for name in L.EBPF_WORK_COUNTERS:
                self.totals[name] += getattr(r, name)
            records.append(r.record())
        if n:
            results[:n] = np.array(records, dtype=L.EBPF_RESULT_DTYPE)

    def _handle(self, src: int, dst: int, sport: int, dport: int, proto: int) -> _Counts:
        r = _Counts()
        if proto not in (IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP):
            r.verdict = L.EBPF_NOT_SERVICE
            return r
        master = self.services.lookup(service_key(dst, dport, 0, proto), r)
        if master < 0:
            r.verdict = L.EBPF_NOT_SERVICE
            return r
        count = int(self._entries["count"][master])
        r.rev_nat = int(self._entries["rev_nat"][master])
        tuple_key = ct_key(dst, src, dport, sport, proto)
        before = r.bucket_compares
        backend_id = self.ct.lookup(tuple_key, r)
        r.ct_compares += r.bucket_compares - before
        if backend_id >= 0:
            r.ct_hit = 1
        elif count == 0:
            r.verdict = L.EBPF_NO_BACKEND
            return r
        else:
            backend_id = self._select(dst, dport, proto, tuple_key, count, r)
        backend = self.backends.lookup(backend_id.to_bytes(4, "little"), r) if backend_id > 0 else -1
        if backend < 0:
            r.verdict = L.EBPF_NO_BACKEND
            return r
        if not r.ct_hit:
            before = r.bucket_compares
            failed = self.ct.update(tuple_key, backend_id, r) < 0
            r.ct_compares += r.bucket_compares - before
            if failed:
                r.verdict = L.EBPF_CT_FULL
                return r
            r.ct_inserts += 1
        r.verdict = L.EBPF_FORWARD
        r.backend_id = backend_id
        r.dnat_ip = int(self._backends["addr"][backend])
        r.dnat_port = int(self._backends["port"][backend])
        return r

    def _select(self, dst: int, dport: int, proto: int, tuple_key: bytes, count: int, r: _Counts) -> int:
        """A new connection's backend id (0 when its slot or table is missing)."""
        if self.algorithm == "maglev":
            r.hash_computations += 1
            r.backend_slot = tuple_hash(tuple_key, self.tuple_seed) % self.maglev_size
            table = self.maglev_outer.lookup((r.rev_nat & 0xFFFF).to_bytes(2, "little"), r)
            if table < 0:
                return 0
            r.map_lookups += 1  # the inner array map
            return self._maglev[table][r.backend_slot]
        r.rng_draws += 1
        r.backend_slot = self._rng.u32() % count + 1
        slot = self.services.lookup(service_key(dst, dport, r.backend_slot, proto), r)
        return int(self._entries["backend_id"][slot]) if slot >= 0 else 0

    # ---- inspection ------------------------------------------------------------------------

    def maps(self) -> dict:
        """{map: {"max_entries", "buckets", "entries", "insert_failures"}} of every hash map."""
        return {name: {"max_entries": m.max_entries, "buckets": m.n_buckets, "entries": len(m),
                       "insert_failures": m.insert_failures}
                for name, m in (("services", self.services), ("backends", self.backends),
                                ("ct", self.ct), ("maglev_outer", self.maglev_outer))}

    def maglev_table(self, rev_nat: int) -> np.ndarray:
        """A frontend's Maglev table (backend ids); empty when it has none."""
        table = self.maglev_outer.lookup((rev_nat & 0xFFFF).to_bytes(2, "little"), _Counts())
        return np.array(self._maglev[table] if table >= 0 else [], dtype=np.uint32)

    def model_bytes(self) -> int:
        """Bytes of this model's own arrays (as the compiled kernel allocates them)."""
        maps = (self.services, self.backends, self.ct, self.maglev_outer)
        return (sum(m.model_bytes() for m in maps) + self._entries.nbytes + self._backends.nbytes
                + 4 * self.maglev_size * len(self._maglev))

