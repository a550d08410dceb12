"""Hash sets and maps keyed by fixed-width byte keys: ipset's hash types, nftables' rhash, and
ipset's bitmap:port (kernel-internals §2.6, §3.2, §3.3, §3.4, §6.4).

``HashSet(key_len, policy)`` stores keys of ``key_len`` (1..16) bytes, each with an optional u32
value, and is built by kernels.layout's packers (ipset_key_*, nft_key_addr_proto_port), which
lay keys out in the kernel's byte order. Bucket policies, all the kernel's:

* ``"ipset"`` (net/netfilter/ipset/ip_set_hash_gen.h). Bucket = ``jhash2(key words, initval) &
  (2^htable_bits - 1)`` with ``initval = get_random_u32()`` at create (jhash2 over whole words
  equals jhash over their bytes on a little-endian host); ``htable_bits`` from ``hashsize``
  (default 1024 -> 10 bits, at least 64). A bucket is an array of slots: created with 2 (AHASH_INIT_SIZE),
  grown by 2 up to ``bucketsize`` (default 12, AHASH_MAX_SIZE); a lookup scans its used slots in
  order, an add reuses the first free slot or appends. The table is resized (htable_bits + 1,
  every element rehashed with the same initval, again until everything fits) when an add finds
  its bucket full at ``bucketsize``, synchronously, as mtype_add's -EAGAIN makes ip_set_core
  call mtype_resize. So the table does not grow with a fill factor: it grows when one bucket
  overflows. ``maxelem`` (65536) caps the element count (IPSET_ERR_HASH_FULL). A delete frees
  the slot; the last slot shrinks ``pos``, an all-free bucket is released, and a bucket with 2 or
  more free slots is compacted into 2 fewer slots.
  With ``net_offset``/``cidr_offset`` (hash:ip,port,net: 4 and 10) the set keeps a count per
  prefix length and a lookup tries each present length, longest first (mtype_test_cidrs): mask
  the key's network field, store ``cidr - 1``, hash and scan. (``nomatch`` is not modelled.)
* ``"rhash"`` (lib/rhashtable.c as nft_set_hash.c's nft_rhash uses it). Bucket = ``jhash(key,
  key_len, hash_rnd) & (size - 1)``, where every bucket table draws its own ``hash_rnd``. Initial
  size ``max(roundup_pow_of_two(nelem_hint * 4 / 3), 4)`` (nft's hint is 3, so 4 buckets); new
  elements go to the head of their chain. An insert into a table with more elements than
  buckets (rht_grow_above_100) first doubles it. The deferred worker is ``maintain()``: it
  doubles while elements > 3/4 of the buckets (rht_grow_above_75) and shrinks once below 30%
  (rht_shrink_below_30) to ``max(roundup_pow_of_two(n * 3 / 2), 4)``, as rhashtable_shrink
  does. A rehash moves each old chain tail first to the head of its new chain, old buckets in
  order (rhashtable_rehash_chain). The kernel migrates inside the worker while lookups also
  check the new table; here a resize completes at once. Chains longer than 16
  (RHT_ELASTICITY) would trigger a same-size rehash in the kernel: not modelled.
* ``"hash_fast"`` and ``"hash"`` (nft_set_hash.c's nft_hash_fast / nft_hash, the backends nft
  picks for a set with a declared ``size``: hash_fast for 4-byte keys, hash otherwise; numgen's
  anonymous verdict maps, kernel-internals §3.3-§3.4). ``size`` is required. A fixed table of
  ``nft_hash_buckets(size) = roundup_pow_of_two(size * 4 / 3)`` chains and one seed drawn at
  create, never resized. Bucket = ``reciprocal_scale(jhash_1word(key as a u32, seed), buckets)``
  (hash_fast) or ``reciprocal_scale(jhash(key, key_len, seed), buckets)`` (hash). An insert
  walks the chain for the key (-EEXIST), then adds at the head; a set holding ``size`` elements
  refuses further adds (-ENFILE).

Counters: ``hash_computations`` and ``bucket_entries_compared`` count lookups, inserts and
deletes (every used slot or chain entry whose key is compared); ``lookup`` also returns the
per-key compares. Resizes are counted apart (``resizes``, ``rehash_moves``: elements moved)
and are not charged to any operation.

``BitmapPort(first, last)`` is bitmap:port (ip_set_bitmap_port.c): one bit per port of the
range; a test is one bit test (``bit_tests``); ports outside the range never match.

The attributes and cdef methods are declared in kernels/hashset.pxd, so that kernels/iptables.pyx
can test a packet's key without the GIL: ``HashSet.lookup_one`` and ``BitmapPort.contains`` are
the single-key, counted steps that ``lookup`` runs for each key.

The pure-Python twin is kernels.reference.hashset; both give identical results and counters.
"""
import numpy as np

cimport cython
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy

from kernels cimport hashing
from kernels.layout import NFT_HASH_ELEM_BYTES, kmalloc_size

MAX_KEY_LEN = KEY_BYTES
POLICIES = ("ipset", "rhash", "hash_fast", "hash")

# ipset (ip_set_hash_gen.h)
IPSET_DEFAULT_HASHSIZE = 1024
IPSET_MIN_HASHSIZE = 64  # IPSET_MIMINAL_HASHSIZE
IPSET_DEFAULT_MAXELEM = 65536
AHASH_MAX_SIZE = 12  # default bucketsize
AHASH_MAX_TUNED = 64
HTABLE_REGION_BITS = 10
IPSET_HTABLE_BYTES = 24  # struct htable before its bucket pointers
IPSET_REGION_BYTES = 24  # struct ip_set_region, one per 2^10 buckets
HBUCKET_BYTES = 32  # struct hbucket: rcu_head, used bitmap, size, pos; then the elements

# rhashtable (lib/rhashtable.c) as nft_rhash uses it
NFT_RHASH_ELEMENT_HINT = 3
HASH_MIN_SIZE = 4
HASH_DEFAULT_SIZE = 64
BUCKET_TABLE_BYTES = 64  # struct bucket_table up to its cacheline-aligned buckets[]
NFT_RHASH_ELEM_BYTES = 24  # struct nft_rhash_elem with the nft_set_ext header (6.17 layout)

# bitmap:port (ip_set_bitmap_port.c)
BITMAP_PORT_BYTES = 72  # struct bitmap_port

cdef enum:
    POLICY_IPSET = 0
    POLICY_RHASH = 1
    POLICY_HASH_FAST = 2
    POLICY_HASH = 3
    KEY_BYTES = 16  # MAX_KEY_LEN: the widest key (nft concatenations of up to 4 words)
    AHASH_INIT_SIZE = 2
    MAX_HTABLE_BITS = 31
    INITIAL_ELEMENTS = 16


cdef inline uint32_t roundup_pow_of_two(uint64_t n) noexcept nogil:
    cdef uint64_t p = 1
    while p < n:
        p <<= 1
    return <uint32_t>p


cdef inline void mask_network(uint8_t *key, int offset, int cidr) noexcept nogil:
    # The field is a big-endian IPv4 address: keep its first `cidr` bits.
    cdef uint32_t mask = (0xFFFFFFFFU << (32 - cidr)) if cidr else 0
    cdef int j
    for j in range(4):
        key[offset + j] &= <uint8_t>(mask >> (24 - 8 * j))


def nft_hash_buckets(uint32_t size) -> int:
    """nft_hash_buckets(): the fixed bucket count of a hash / hash_fast set of ``size``."""
    return roundup_pow_of_two(<uint64_t>size * 4 // 3)


def ipset_htable_bits(uint32_t hashsize) -> int:
    """htable_bits(): log2 of hashsize rounded up to a power of two (at least 64 buckets)."""
    hashsize = max(hashsize, IPSET_MIN_HASHSIZE)
    cdef int bits = 0
    while (1U << bits) < hashsize:
        bits += 1
    return bits


def rhash_initial_size(uint32_t nelem_hint) -> int:
    """rounded_hashtable_size(): the first bucket table's size for a hint."""
    if nelem_hint == 0:
        return HASH_DEFAULT_SIZE
    return max(roundup_pow_of_two(nelem_hint * 4 // 3), HASH_MIN_SIZE)


# nonecheck off: `self` is never None in its own methods, and with the check (debug builds)
# Cython rejects `self.attr += 1` without the GIL.
@cython.final
@cython.nonecheck(False)
cdef class HashSet:
    """A set (or u32-valued map) of fixed-width byte keys with the kernel's bucket policy.

    Like the kernel's set, a HashSet serves one thread at a time.
    """

    def __init__(self, int key_len, str policy="ipset", uint64_t seed=0,
                 uint32_t hashsize=IPSET_DEFAULT_HASHSIZE, uint32_t maxelem=IPSET_DEFAULT_MAXELEM,
                 int bucketsize=AHASH_MAX_SIZE, uint32_t nelem_hint=NFT_RHASH_ELEMENT_HINT,
                 int net_offset=-1, int cidr_offset=-1, int data_len=0, uint32_t size=0):
        if not 1 <= key_len <= MAX_KEY_LEN:
            raise ValueError(f"key_len must be 1..{MAX_KEY_LEN}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}")
        if (net_offset >= 0) != (cidr_offset >= 0) or net_offset + 4 > key_len or cidr_offset >= key_len:
            raise ValueError("net_offset and cidr_offset must both lie inside the key, or both be -1")
        if policy in ("hash_fast", "hash") and size == 0:
            raise ValueError(f"{policy} needs a size (nft_hash*_estimate rejects size 0)")
        if policy == "hash_fast" and key_len != 4:
            raise ValueError("hash_fast takes 4-byte keys only")
        self.key_len = key_len
        self.policy = policy
        self._policy = POLICIES.index(policy)
        self.net_offset = net_offset
        self.cidr_offset = cidr_offset
        self.data_len = data_len
        self.maxelem = maxelem
        # ip_set_hash_gen.h: clamp to [AHASH_INIT_SIZE, AHASH_MAX_TUNED], round up to even.
        bucketsize = min(max(bucketsize, AHASH_INIT_SIZE), AHASH_MAX_TUNED)
        self.bucketsize = bucketsize + bucketsize % 2
        self.rng_state = seed
        self.free_slot = -1
        self._arrays = {}
        self._set_pool(INITIAL_ELEMENTS)
        self.size = size
        if self._policy == POLICY_IPSET:
            self.hash_seed = hashing.rng_u32(&self.rng_state)
            self._set_ipset_table(ipset_htable_bits(hashsize))
        elif self._policy != POLICY_RHASH:
            # nft_hash_init: one seed, nft_hash_buckets(size) chains, never resized.
            self._set_rhash_table(nft_hash_buckets(size))
        else:
            self._set_rhash_table(rhash_initial_size(nelem_hint))

    # ---- storage ---------------------------------------------------------------------------

    cdef void _set_pool(self, Py_ssize_t capacity):
        keys = np.zeros((capacity, KEY_BYTES), dtype=np.uint8)
        values = np.zeros(capacity, dtype=np.uint32)
        links = np.full(capacity, -1, dtype=np.int32)
        if self._key_pool is not None:
            old = len(self._key_pool)
            keys[:old] = self._key_pool
            values[:old] = self._value_pool
            links[:old] = self._next
        self._key_pool, self._value_pool = keys, values
        self._keys, self._values, self._next = keys, values, links
        self.keys_p, self.values_p, self.next_p = &self._keys[0, 0], &self._values[0], &self._next[0]
        self._arrays.update(keys=keys, values=values, links=links)

    cdef void _set_ipset_table(self, int bits):
        self.htable_bits = bits
        self.n_buckets = 1U << bits
        self.mask = self.n_buckets - 1
        slots = np.full(self.n_buckets * self.bucketsize, -1, dtype=np.int32)
        pos = np.zeros(self.n_buckets, dtype=np.uint8)
        size = np.zeros(self.n_buckets, dtype=np.uint8)
        self._slots, self._pos, self._size = slots, pos, size
        self._arrays.update(slots=slots, pos=pos, size=size)

    cdef void _set_rhash_table(self, uint32_t size):
        # bucket_table_alloc: every table gets a fresh hash_rnd.
        self.hash_seed = hashing.rng_u32(&self.rng_state)
        self.n_buckets = size
        self.mask = size - 1
        heads = np.full(size, -1, dtype=np.int32)
        self._heads = heads
        self.heads_p = &self._heads[0]
        self._arrays["heads"] = heads

    cdef int32_t new_element(self, const uint8_t *key, uint32_t value):
        cdef int32_t e = self.free_slot
        if e >= 0:
            self.free_slot = self._next[e]
        else:
            if self.used_slots == self._keys.shape[0]:
                self._set_pool(2 * self.used_slots)
            e = self.used_slots
            self.used_slots += 1
        memcpy(&self._keys[e, 0], key, self.key_len)
        self._values[e] = value
        self._next[e] = -1
        self.n_elements += 1
        return e

    cdef void free_element(self, int32_t e):
        self._next[e] = self.free_slot
        self.free_slot = e
        self.n_elements -= 1

    # ---- hashing and scanning --------------------------------------------------------------

    cdef uint32_t bucket_of(self, const uint8_t *key) noexcept nogil:
        if self._policy == POLICY_HASH_FAST:  # nft_hash_fast_lookup
            return hashing.reciprocal_scale(hashing.jhash_1word(hashing.load_le32(key), self.hash_seed),
                                            self.n_buckets)
        if self._policy == POLICY_HASH:  # nft_hash_lookup
            return hashing.reciprocal_scale(hashing.jhash(key, self.key_len, self.hash_seed),
                                            self.n_buckets)
        return hashing.jhash(key, self.key_len, self.hash_seed) & self.mask

    cdef bint same_key(self, int32_t e, const uint8_t *key) noexcept nogil:
        return memcmp(self.keys_p + <Py_ssize_t>e * KEY_BYTES, key, self.key_len) == 0

    cdef int32_t scan_bucket(self, uint32_t b, const uint8_t *key, uint32_t *compares) noexcept nogil:
        """The element holding ``key`` in bucket ``b``, or -1; counts the keys compared."""
        cdef int32_t e
        cdef Py_ssize_t i, base = <Py_ssize_t>b * self.bucketsize
        if self._policy != POLICY_IPSET:  # rhash, hash_fast, hash: chains
            e = self.heads_p[b]
            while e >= 0:
                compares[0] += 1
                if self.same_key(e, key):
                    return e
                e = self.next_p[e]
            return -1
        for i in range(self._pos[b]):
            e = self._slots[base + i]
            if e < 0:
                continue
            compares[0] += 1
            if self.same_key(e, key):
                return e
        return -1

    cdef int32_t find_exact(self, const uint8_t *key, uint32_t *compares) noexcept nogil:
        self.hash_computations += 1
        return self.scan_bucket(self.bucket_of(key), key, compares)

    cdef int32_t find(self, const uint8_t *key, uint32_t *compares) noexcept nogil:
        if self.net_offset < 0:
            return self.find_exact(key, compares)
        # mtype_test_cidrs: every prefix length the set holds, longest first.
        cdef uint8_t masked[KEY_BYTES]
        cdef int cidr
        cdef int32_t e
        for cidr in range(32, 0, -1):
            if self.nets[cidr] == 0:
                continue
            memcpy(masked, key, self.key_len)
            mask_network(masked, self.net_offset, cidr)
            masked[self.cidr_offset] = cidr - 1
            e = self.find_exact(masked, compares)
            if e >= 0:
                return e
        return -1

    # ---- batch operations ------------------------------------------------------------------

    def lookup(self, const uint8_t[:, ::1] keys, uint8_t[::1] found, uint32_t[::1] values,
               uint32_t[::1] compares) -> None:
        """found[i] = 1 and values[i] = its value when keys[i] is in the set (else 0, 0)."""
        cdef Py_ssize_t n = keys.shape[0], i
        self._check_keys(keys)
        if found.shape[0] < n or values.shape[0] < n or compares.shape[0] < n:
            raise ValueError("found, values and compares need one slot per key")
        cdef int32_t e
        with nogil:
            for i in range(n):
                e = self.lookup_one(&keys[i, 0], &compares[i])
                found[i] = e >= 0
                values[i] = self._values[e] if e >= 0 else 0

    cdef int32_t lookup_one(self, const uint8_t *key, uint32_t *compares) noexcept nogil:
        """The element holding ``key`` or -1; sets ``compares`` and adds it to the counter."""
        compares[0] = 0
        cdef int32_t e = self.find(key, compares)
        self.bucket_entries_compared += compares[0]
        return e

    def insert(self, const uint8_t[:, ::1] keys, const uint32_t[::1] values=None) -> int:
        """Add the keys (with their values); returns how many were new. Keys already present
        and keys refused by a full ipset (maxelem) are left alone."""
        cdef Py_ssize_t n = keys.shape[0], i
        self._check_keys(keys)
        if values is not None and values.shape[0] < n:
            raise ValueError("values needs one slot per key")
        cdef int added = 0
        cdef uint8_t key[KEY_BYTES]
        for i in range(n):
            memcpy(key, &keys[i, 0], self.key_len)
            if self.net_offset >= 0:  # store the network masked, as the kernel's add does
                mask_network(key, self.net_offset, self.cidr_of(key))
            if self.add_one(key, values[i] if values is not None else 0):
                added += 1
                if self.net_offset >= 0:
                    self.nets[self.cidr_of(key)] += 1
        return added

    def delete(self, const uint8_t[:, ::1] keys) -> int:
        """Remove the keys; returns how many were present."""
        cdef Py_ssize_t n = keys.shape[0], i
        self._check_keys(keys)
        cdef int removed = 0
        cdef uint8_t key[KEY_BYTES]
        for i in range(n):
            memcpy(key, &keys[i, 0], self.key_len)
            if self.net_offset >= 0:
                mask_network(key, self.net_offset, self.cidr_of(key))
            if self.delete_one(key):
                removed += 1
                if self.net_offset >= 0:
                    self.nets[self.cidr_of(key)] -= 1
        return removed

    def maintain(self) -> int:
        """rhash's deferred worker (grow above 75%, shrink below 30%); returns elements moved.
        ipset resizes inside insert, so this does nothing for it."""
        cdef int64_t before = self.rehash_moves
        cdef uint32_t smaller
        while self._policy == POLICY_RHASH:
            if self.n_elements > self.n_buckets // 4 * 3:
                self.rhash_resize(2 * self.n_buckets)
            elif self.n_elements < self.n_buckets * 3 // 10 and self.n_buckets > HASH_MIN_SIZE:
                smaller = max(roundup_pow_of_two(self.n_elements * 3 // 2) if self.n_elements else 0,
                              HASH_MIN_SIZE)
                if smaller >= self.n_buckets:
                    break
                self.rhash_resize(smaller)
            else:
                break
        return self.rehash_moves - before

    def _check_keys(self, const uint8_t[:, ::1] keys) -> None:
        if keys.shape[0] and keys.shape[1] != self.key_len:
            raise ValueError(f"keys must be {self.key_len} bytes wide")

    cdef int cidr_of(self, const uint8_t *key) noexcept:
        return min(key[self.cidr_offset] + 1, 32)

    # ---- add / delete ----------------------------------------------------------------------

    cdef bint add_one(self, const uint8_t *key, uint32_t value):
        if self._policy == POLICY_IPSET:
            return self.ipset_add(key, value)
        if self._policy == POLICY_RHASH:
            return self.rhash_add(key, value)
        return self.hash_add(key, value)

    cdef bint delete_one(self, const uint8_t *key):
        if self._policy == POLICY_IPSET:
            return self.ipset_delete(key)
        return self.rhash_delete(key)  # the same chain unlink for hash and hash_fast

    cdef bint ipset_add(self, const uint8_t *key, uint32_t value):
        cdef uint32_t b, compares
        cdef Py_ssize_t i, base
        cdef int free_at
        cdef int32_t e
        while True:
            self.hash_computations += 1
            b = self.bucket_of(key)
            base = <Py_ssize_t>b * self.bucketsize
            free_at = -1
            compares = 0
            for i in range(self._pos[b]):
                e = self._slots[base + i]
                if e < 0:
                    if free_at < 0:
                        free_at = i  # mtype_add reuses the first deleted slot
                    continue
                compares += 1
                if self.same_key(e, key):
                    self.bucket_entries_compared += compares
                    return False
            self.bucket_entries_compared += compares
            if self.n_elements >= self.maxelem:
                return False
            if free_at < 0:
                if self._pos[b] == self._size[b]:
                    if self._size[b] >= self.bucketsize:
                        self.ipset_resize()  # -EAGAIN: resize, then retry the add
                        continue
                    self._size[b] += AHASH_INIT_SIZE
                free_at = self._pos[b]
                self._pos[b] += 1
            self._slots[base + free_at] = self.new_element(key, value)
            return True

    cdef void ipset_resize(self):
        """mtype_resize: htable_bits + 1 (and again while a bucket overflows), same initval."""
        old_slots, old_pos = np.asarray(self._slots), np.asarray(self._pos)
        cdef int bits = self.htable_bits + 1
        while not self.ipset_rehash_into(bits, old_slots, old_pos):
            bits += 1
        self.resizes += 1

    cdef bint ipset_rehash_into(self, int bits, old_slots_array, old_pos_array):
        if bits > MAX_HTABLE_BITS:
            raise MemoryError("ipset cannot grow its hash table further")
        cdef const int32_t[::1] old_slots = old_slots_array
        cdef const uint8_t[::1] old_pos = old_pos_array
        cdef Py_ssize_t old_buckets = old_pos.shape[0], b, i
        self._set_ipset_table(bits)
        cdef int32_t e
        cdef uint32_t nb
        for b in range(old_buckets):
            for i in range(old_pos[b]):
                e = old_slots[b * self.bucketsize + i]
                if e < 0:
                    continue
                nb = self.bucket_of(&self._keys[e, 0])
                if self._pos[nb] == self._size[nb]:
                    if self._size[nb] >= self.bucketsize:
                        return False
                    self._size[nb] += AHASH_INIT_SIZE
                self._slots[<Py_ssize_t>nb * self.bucketsize + self._pos[nb]] = e
                self._pos[nb] += 1
                self.rehash_moves += 1
        return True

    cdef bint ipset_delete(self, const uint8_t *key):
        self.hash_computations += 1
        cdef uint32_t b = self.bucket_of(key)
        cdef Py_ssize_t i, base = <Py_ssize_t>b * self.bucketsize
        cdef int32_t e
        for i in range(self._pos[b]):
            e = self._slots[base + i]
            if e < 0:
                continue
            self.bucket_entries_compared += 1
            if not self.same_key(e, key):
                continue
            self._slots[base + i] = -1
            self.free_element(e)
            if i + 1 == self._pos[b]:
                self._pos[b] -= 1
            self.ipset_tidy_bucket(b)
            return True
        return False

    cdef void ipset_tidy_bucket(self, uint32_t b):
        # mtype_del: release an all-free bucket; compact one with >= 2 free slots into 2 fewer.
        cdef Py_ssize_t i, base = <Py_ssize_t>b * self.bucketsize
        cdef int free = 0, kept = 0
        for i in range(self._pos[b]):
            free += self._slots[base + i] < 0
        if free == self._pos[b]:
            self._pos[b] = 0
            self._size[b] = 0
        elif free >= AHASH_INIT_SIZE:
            for i in range(self._pos[b]):
                if self._slots[base + i] >= 0:
                    self._slots[base + kept] = self._slots[base + i]
                    kept += 1
            for i in range(kept, self._pos[b]):
                self._slots[base + i] = -1
            self._pos[b] = kept
            self._size[b] -= AHASH_INIT_SIZE

    cdef void add_head(self, const uint8_t *key, uint32_t value):
        """A new element at the head of its bucket's chain (hlist_add_head_rcu)."""
        cdef uint32_t b = self.bucket_of(key)
        cdef int32_t e = self.new_element(key, value)
        self._next[e] = self._heads[b]
        self._heads[b] = e

    cdef bint rhash_add(self, const uint8_t *key, uint32_t value):
        cdef uint32_t compares = 0
        cdef int32_t found = self.find_exact(key, &compares)
        if found < 0 and self.n_elements > self.n_buckets:
            # rht_grow_above_100: the insert waits for a table twice the size, then retries.
            self.rhash_resize(2 * self.n_buckets)
            found = self.find_exact(key, &compares)
        self.bucket_entries_compared += compares
        if found >= 0:
            return False
        self.add_head(key, value)
        return True

    cdef bint hash_add(self, const uint8_t *key, uint32_t value):
        """nft_hash_insert: -EEXIST after a walk of the chain, else hlist_add_head_rcu. A set
        already holding ``size`` elements refuses the add (-ENFILE); the table never resizes."""
        cdef uint32_t compares = 0
        cdef int32_t found = self.find_exact(key, &compares)
        self.bucket_entries_compared += compares
        if found >= 0 or self.n_elements >= self.size:
            return False
        self.add_head(key, value)
        return True

    cdef void rhash_resize(self, uint32_t size):
        """A new bucket table (new hash_rnd); each old chain moves tail first, buckets in order."""
        old_heads_array = np.asarray(self._heads)
        cdef const int32_t[::1] old_heads = old_heads_array
        cdef int32_t[::1] chain = np.empty(max(self.n_elements, 1), dtype=np.int32)
        self._set_rhash_table(size)
        cdef Py_ssize_t b, length
        cdef int32_t e
        cdef uint32_t nb
        for b in range(old_heads.shape[0]):
            length = 0
            e = old_heads[b]
            while e >= 0:
                chain[length] = e
                length += 1
                e = self._next[e]
            while length > 0:
                length -= 1
                e = chain[length]
                nb = self.bucket_of(&self._keys[e, 0])
                self._next[e] = self._heads[nb]
                self._heads[nb] = e
                self.rehash_moves += 1
        self.resizes += 1

    cdef bint rhash_delete(self, const uint8_t *key):
        self.hash_computations += 1
        cdef uint32_t b = self.bucket_of(key)
        cdef int32_t e = self._heads[b], prev = -1
        while e >= 0:
            self.bucket_entries_compared += 1
            if self.same_key(e, key):
                if prev < 0:
                    self._heads[b] = self._next[e]
                else:
                    self._next[prev] = self._next[e]
                self.free_element(e)
                return True
            prev = e
            e = self._next[e]
        return False

    # ---- memory ----------------------------------------------------------------------------

    def modelled_bytes(self) -> int:
        """Kernel memory of the table and its elements (kmalloc-rounded).

        ipset: struct htable with 8 B per bucket pointer, one ip_set_region per 1024 buckets,
        and per non-empty bucket an hbucket header plus its allocated slots of ``key_len``
        bytes (the element struct, no extensions). rhash: the bucket table (8 B per bucket) and
        per element nft_rhash_elem + key (4-byte aligned) + ``data_len`` (16 for a verdict map).
        hash / hash_fast: 8 B per bucket (they live in the nft_set's private area) and per element
        nft_hash_elem (32 B) + key (4-byte aligned) + ``data_len``.
        """
        if self._policy == POLICY_HASH_FAST or self._policy == POLICY_HASH:
            element = kmalloc_size(NFT_HASH_ELEM_BYTES + (self.key_len + 3) // 4 * 4 + self.data_len)
            return 8 * self.n_buckets + self.n_elements * element
        if self._policy == POLICY_RHASH:
            element = kmalloc_size(NFT_RHASH_ELEM_BYTES + (self.key_len + 3) // 4 * 4 + self.data_len)
            return kmalloc_size(BUCKET_TABLE_BYTES + 8 * self.n_buckets) + self.n_elements * element
        bits = self.htable_bits
        regions = 1 if bits < HTABLE_REGION_BITS else 1 << (bits - HTABLE_REGION_BITS)
        sizes = np.asarray(self._size)
        buckets = sum(kmalloc_size(HBUCKET_BYTES + int(s) * self.key_len) for s in sizes[sizes > 0])
        return (kmalloc_size(IPSET_HTABLE_BYTES + 8 * self.n_buckets)
                + kmalloc_size(IPSET_REGION_BYTES * regions) + buckets)

    def model_bytes(self) -> int:
        """Bytes of this model's own arrays."""
        return sum(a.nbytes for a in self._arrays.values())


@cython.final
@cython.nonecheck(False)
cdef class BitmapPort:
    """ipset bitmap:port over ``first..last``: one bit per port."""

    def __init__(self, uint16_t first=0, uint16_t last=65535):
        if first > last:
            raise ValueError("first must not exceed last")
        self.first = first
        self.last = last
        self._words = np.zeros((last - first + 64) // 64, dtype=np.uint64)

    cdef bint in_range(self, uint16_t port) noexcept nogil:
        return self.first <= port <= self.last

    cdef bint test(self, uint16_t port) noexcept nogil:
        cdef uint32_t bit = port - self.first
        return (self._words[bit >> 6] >> (bit & 63)) & 1

    cdef void flip(self, uint16_t port) noexcept nogil:
        cdef uint32_t bit = port - self.first
        self._words[bit >> 6] ^= (<uint64_t>1) << (bit & 63)

    def insert(self, const uint16_t[::1] ports) -> int:
        """Add the ports; returns how many were new (ports outside the range are refused)."""
        cdef Py_ssize_t i
        cdef int added = 0
        for i in range(ports.shape[0]):
            if self.in_range(ports[i]) and not self.test(ports[i]):
                self.flip(ports[i])
                added += 1
        self.n_elements += added
        return added

    def delete(self, const uint16_t[::1] ports) -> int:
        """Remove the ports; returns how many were present."""
        cdef Py_ssize_t i
        cdef int removed = 0
        for i in range(ports.shape[0]):
            if self.in_range(ports[i]) and self.test(ports[i]):
                self.flip(ports[i])
                removed += 1
        self.n_elements -= removed
        return removed

    def lookup(self, const uint16_t[::1] ports, uint8_t[::1] found) -> None:
        """found[i] = 1 when ports[i] is in the set."""
        cdef Py_ssize_t n = ports.shape[0], i
        if found.shape[0] < n:
            raise ValueError("found needs one slot per port")
        with nogil:
            for i in range(n):
                found[i] = self.contains(ports[i])

    cdef bint contains(self, uint16_t port) noexcept nogil:
        """bitmap_port_kadt's test: a port outside the range is an error, i.e. no match."""
        if not self.in_range(port):
            return False
        self.bit_tests += 1
        return self.test(port)

    def modelled_bytes(self) -> int:
        """struct bitmap_port (kmalloc-rounded) plus the bitmap of whole longs."""
        return kmalloc_size(BITMAP_PORT_BYTES) + kmalloc_size(8 * self._words.shape[0])

    def model_bytes(self) -> int:
        return self._words.shape[0] * 8
