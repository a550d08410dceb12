"""The conntrack hash table (nf_conntrack_core.c; kernel-internals §4, §6.5).

``buckets`` defaults to 262,144: the kernel's auto-size on a 64-bit host with more than 4 GiB of
RAM (nf_conntrack_init_start). Each connection owns two tuple-hash entries, the original and the
reply direction (``nf_conn.tuplehash[2]``: entries ``2c`` and ``2c + 1`` of connection ``c``),
chained per bucket through ``next`` indices; new entries go to the head of their chain, as
``hlist_nulls_add_head_rcu`` does.

Hash (hash_conntrack_raw): SipHash-2-4 with a 128-bit key drawn from the seeded RNG (two
splitmix64 outputs; zone 0 and the netns mix are taken as 0), over the first 39 bytes of a
40-byte ``nf_conntrack_tuple`` image: src address in a 16-byte slot, src port, l3num = AF_INET,
dst address in a 16-byte slot, dst port, protonum (the ``dir`` byte is excluded). Addresses and
ports are in network byte order, as in the kernel. The function returns u32, so the bucket is
``reciprocal_scale(low 32 bits of the SipHash, buckets)``.

* ``lookup``: one hash per packet, then a walk of its bucket comparing full tuples
  (nf_ct_tuple_equal; either direction's entry is a hit). ``compares[i]`` = entries compared.
* ``confirm`` (__nf_conntrack_confirm) for packets that missed: the original tuple comes from
  the packet, the reply tuple from the NAT result (reply source = the DNAT destination when the
  verdict is DNAT, a zero DNAT port keeping the original port; else the original destination;
  reply destination = the packet's source). Two hashes, a clash check that walks both chains,
  then both entries are inserted. A clash (the tuple is already tracked) inserts nothing.

Test-only switch: ``_set_test_regression(True)`` makes every ``lookup`` compare its bucket's
first entry once more, in a second pass that hashes the packet again (counted in ``compares``,
``bucket_entries_compared`` and ``hash_computations``): the deliberate regression the gate's
tests must catch. Off by default, it costs one test per batch.

Totals: ``allocations`` (one nf_conn per confirmed packet, as init_conntrack allocates on the
miss), ``clashes``, ``hash_computations``, ``bucket_entries_compared`` (lookups and confirms).
The pure-Python twin is kernels.reference.conntrack; both give identical results and counters.
"""
import numpy as np

cimport cython
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memset
from kernels.clock cimport now_ns

from kernels cimport hashing
from kernels.records cimport packet_t, result_t

NF_CONN_BYTES = 256  # struct nf_conn (248 B) in a SLAB_HWCACHE_ALIGN slab
BUCKET_BYTES = 8  # one hlist_nulls_head per bucket
DEFAULT_BUCKETS = 262144
INITIAL_CONNECTIONS = 1024

# One tuple-hash entry of the model: the chain link and the tuple it is keyed by.
ENTRY_DTYPE = np.dtype([("next", "<i4"), ("src", "<u4"), ("dst", "<u4"), ("sport", "<u2"),
                        ("dport", "<u2"), ("proto", "u1"), ("pad0", "u1"), ("pad1", "<u2")])

cdef packed struct entry_t:
    int32_t next
    uint32_t src
    uint32_t dst
    uint16_t sport
    uint16_t dport
    uint8_t proto
    uint8_t pad0
    uint16_t pad1

cdef enum:
    TUPLE_HASHED_BYTES = 39  # offsetofend(struct nf_conntrack_tuple, dst.__nfct_hash_offsetend)
    AF_INET = 2
    V_DNAT = 3


cdef bint _test_extra_compare = False


def _set_test_regression(bint on) -> None:
    """Test-only: switch the extra compare per lookup on or off (bench/gate's tests)."""
    global _test_extra_compare
    _test_extra_compare = on


# nonecheck off: `self` is never None in its own methods, and with the check (debug builds)
# Cython rejects `self.attr += 1` without the GIL.
@cython.final
@cython.nonecheck(False)
cdef class ConntrackTable:
    """Buckets of tuple-hash chains, two entries per connection."""

    cdef int32_t[::1] _heads
    cdef entry_t[::1] _entries
    cdef uint64_t k0, k1
    cdef readonly uint32_t buckets
    cdef readonly int64_t n_connections
    cdef readonly int64_t allocations
    cdef readonly int64_t clashes
    cdef readonly int64_t hash_computations
    cdef readonly int64_t bucket_entries_compared
    cdef readonly object heads
    cdef readonly object entries

    def __init__(self, uint32_t buckets=DEFAULT_BUCKETS, uint64_t seed=0):
        if buckets == 0:
            raise ValueError("buckets must be positive")
        cdef uint64_t state = seed
        self.k0 = hashing.rng_next_u64(&state)
        self.k1 = hashing.rng_next_u64(&state)
        self.buckets = buckets
        self.heads = np.full(buckets, -1, dtype=np.int32)
        self._heads = self.heads
        self._set_entries(np.zeros(2 * INITIAL_CONNECTIONS, dtype=ENTRY_DTYPE))

    cdef void _set_entries(self, entries):
        self.entries = entries
        self._entries = entries

    def reserve(self, Py_ssize_t connections) -> None:
        """Room for ``connections`` in all, by doubling (never inside the nogil loops)."""
        capacity = len(self.entries)
        while capacity < 2 * connections:
            capacity *= 2
        if capacity > len(self.entries):
            grown = np.zeros(capacity, dtype=ENTRY_DTYPE)
            grown[:len(self.entries)] = self.entries
            self._set_entries(grown)

    def modelled_bytes(self) -> int:
        """Kernel memory: one nf_conn slab object per connection plus the bucket heads."""
        return self.n_connections * NF_CONN_BYTES + self.buckets * BUCKET_BYTES

    def model_bytes(self) -> int:
        """Bytes of this model's own arrays."""
        return self.heads.nbytes + self.entries.nbytes

    # ---- batch operations -------------------------------------------------------------------

    def lookup(self, const packet_t[::1] packets, uint8_t[::1] found, uint32_t[::1] compares,
               int64_t[::1] ns=None) -> None:
        """found[i] = 1 when the packet's tuple is tracked (either direction)."""
        cdef Py_ssize_t n = packets.shape[0], i
        if found.shape[0] < n or compares.shape[0] < n or (ns is not None and ns.shape[0] < n):
            raise ValueError("found, compares and ns need one slot per packet")
        cdef bint timed = ns is not None, extra_compare = _test_extra_compare
        cdef int64_t start = 0
        cdef entry_t key
        with nogil:
            for i in range(n):
                if timed:
                    start = now_ns()
                key = packet_tuple(&packets[i])
                compares[i] = 0
                found[i] = self.chain_has(self.bucket(&key), &key, &compares[i])
                if timed:
                    ns[i] += now_ns() - start
            if extra_compare:  # a second pass, so that the switch costs the loop above nothing
                for i in range(n):
                    key = packet_tuple(&packets[i])
                    found[i] |= self.head_equals(self.bucket(&key), &key, &compares[i])

    def confirm(self, const packet_t[::1] packets, const result_t[::1] results,
                uint32_t[::1] compares) -> None:
        """Track the connections these first packets start (both tuples; clashes skipped)."""
        cdef Py_ssize_t n = packets.shape[0], i
        if results.shape[0] < n or compares.shape[0] < n:
            raise ValueError("results and compares need one slot per packet")
        self.reserve(self.n_connections + n)
        cdef entry_t orig, reply
        cdef uint32_t orig_bucket, reply_bucket
        with nogil:
            for i in range(n):
                orig = packet_tuple(&packets[i])
                reply = reply_tuple(&packets[i], &results[i])
                orig_bucket = self.bucket(&orig)
                reply_bucket = self.bucket(&reply)
                self.allocations += 1
                compares[i] = 0
                if (self.chain_has(orig_bucket, &orig, &compares[i])
                        or self.chain_has(reply_bucket, &reply, &compares[i])):
                    self.clashes += 1
                    continue
                # Entry 2c is connection c's original tuple, 2c + 1 its reply.
                self.insert(<int32_t>(2 * self.n_connections), orig_bucket, &orig)
                self.insert(<int32_t>(2 * self.n_connections + 1), reply_bucket, &reply)
                self.n_connections += 1

    # ---- hashing, chains --------------------------------------------------------------------

    cdef uint32_t bucket(self, const entry_t *t) noexcept nogil:
        cdef uint8_t image[40]
        memset(image, 0, sizeof(image))
        hashing.put_be32(image, t.src)
        hashing.put_be16(image + 16, t.sport)
        image[18] = AF_INET  # l3num, a host-order (little-endian) u16
        hashing.put_be32(image + 20, t.dst)
        hashing.put_be16(image + 36, t.dport)
        image[38] = t.proto
        self.hash_computations += 1
        cdef uint64_t h = hashing.siphash24(image, TUPLE_HASHED_BYTES, self.k0, self.k1)
        return hashing.reciprocal_scale(<uint32_t>h, self.buckets)

    cdef bint chain_has(self, uint32_t b, const entry_t *t, uint32_t *compares) noexcept nogil:
        cdef int32_t h = self._heads[b]
        cdef entry_t *e
        while h >= 0:
            e = &self._entries[h]
            compares[0] += 1
            self.bucket_entries_compared += 1
            if tuple_equals(e, t):
                return True
            h = e.next
        return False

    cdef bint head_equals(self, uint32_t b, const entry_t *t, uint32_t *compares) noexcept nogil:
        """The test-only extra compare: the chain's first entry against ``t``."""
        cdef int32_t h = self._heads[b]
        if h < 0:
            return False
        compares[0] += 1
        self.bucket_entries_compared += 1
        return tuple_equals(&self._entries[h], t)

    cdef void insert(self, int32_t h, uint32_t b, const entry_t *t) noexcept nogil:
        self._entries[h] = t[0]
        self._entries[h].next = self._heads[b]
        self._heads[b] = h


cdef inline bint tuple_equals(const entry_t *e, const entry_t *t) noexcept nogil:
    return (e.src == t.src and e.dst == t.dst and e.sport == t.sport and e.dport == t.dport
            and e.proto == t.proto)


cdef inline entry_t packet_tuple(const packet_t *p) noexcept nogil:
    cdef entry_t t
    memset(&t, 0, sizeof(t))
    t.next = -1
    t.src = p.src
    t.dst = p.dst
    t.sport = p.sport
    t.dport = p.dport
    t.proto = p.proto
    return t


cdef inline entry_t reply_tuple(const packet_t *p, const result_t *r) noexcept nogil:
    cdef entry_t t = packet_tuple(p)
    t.dst = p.src
    t.dport = p.sport
    if r.verdict == V_DNAT:
        t.src = r.dnat_ip
        t.sport = r.dnat_port if r.dnat_port else p.dport
    else:
        t.src = p.dst
        t.sport = p.dport
    return t
