# C-level API of kernels/hashset.pyx, cimported by kernels/iptables.pyx so that `-m set` can
# test a packet's key against a set inside the nogil walk (the kernel's ip_set_test is a direct
# call too). Only the attributes and cdef methods live here; the docs are in hashset.pyx.
cimport cython
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t


@cython.final
cdef class HashSet:
    # What a lookup reads comes first, so that it shares the object's first cache lines: the
    # memoryview structs below are ~200 bytes each. The raw pointers alias their data.
    cdef int _policy
    cdef uint32_t hash_seed  # ipset: initval; rhash: the current bucket table's hash_rnd; hash*: seed
    cdef uint32_t mask
    cdef readonly int key_len
    cdef readonly int net_offset
    cdef readonly uint32_t n_buckets
    cdef readonly int64_t hash_computations
    cdef readonly int64_t bucket_entries_compared
    cdef int32_t *heads_p  # _heads
    cdef int32_t *next_p  # _next
    cdef uint8_t *keys_p  # _keys (rows of KEY_BYTES)
    cdef uint32_t *values_p  # _values
    cdef uint64_t rng_state
    # element pool: key bytes, values, chain link (rhash) or free-list link
    cdef uint8_t[:, ::1] _keys
    cdef uint32_t[::1] _values
    cdef int32_t[::1] _next
    cdef int32_t free_slot
    cdef int32_t used_slots
    # rhash / hash / hash_fast chains
    cdef int32_t[::1] _heads
    # ipset buckets: slot arrays of bucketsize, their used length and allocated size
    cdef int32_t[::1] _slots
    cdef uint8_t[::1] _pos
    cdef uint8_t[::1] _size
    cdef int64_t[33] nets  # elements per prefix length (hash:*,net)
    cdef readonly str policy
    cdef readonly int cidr_offset
    cdef readonly int data_len
    cdef readonly int bucketsize
    cdef readonly int htable_bits  # ipset only
    cdef readonly uint32_t maxelem
    cdef readonly uint32_t size  # hash / hash_fast: the declared set size
    cdef readonly int64_t n_elements
    cdef readonly int64_t resizes
    cdef readonly int64_t rehash_moves
    cdef object _key_pool  # the numpy arrays behind _keys and _values, kept to grow them
    cdef object _value_pool
    cdef dict _arrays  # every numpy array behind the memoryviews, for model_bytes()

    # The public C entry point: one counted lookup (see HashSet.lookup).
    cdef int32_t lookup_one(self, const uint8_t *key, uint32_t *compares) noexcept nogil

    cdef void _set_pool(self, Py_ssize_t capacity)
    cdef void _set_ipset_table(self, int bits)
    cdef void _set_rhash_table(self, uint32_t size)
    cdef int32_t new_element(self, const uint8_t *key, uint32_t value)
    cdef void free_element(self, int32_t e)
    cdef uint32_t bucket_of(self, const uint8_t *key) noexcept nogil
    cdef bint same_key(self, int32_t e, const uint8_t *key) noexcept nogil
    cdef int32_t scan_bucket(self, uint32_t b, const uint8_t *key, uint32_t *compares) noexcept nogil
    cdef int32_t find_exact(self, const uint8_t *key, uint32_t *compares) noexcept nogil
    cdef int32_t find(self, const uint8_t *key, uint32_t *compares) noexcept nogil
    cdef int cidr_of(self, const uint8_t *key) noexcept
    cdef bint add_one(self, const uint8_t *key, uint32_t value)
    cdef bint delete_one(self, const uint8_t *key)
    cdef bint ipset_add(self, const uint8_t *key, uint32_t value)
    cdef void ipset_resize(self)
    cdef bint ipset_rehash_into(self, int bits, old_slots_array, old_pos_array)
    cdef bint ipset_delete(self, const uint8_t *key)
    cdef void ipset_tidy_bucket(self, uint32_t b)
    cdef void add_head(self, const uint8_t *key, uint32_t value)
    cdef bint rhash_add(self, const uint8_t *key, uint32_t value)
    cdef bint hash_add(self, const uint8_t *key, uint32_t value)
    cdef void rhash_resize(self, uint32_t size)
    cdef bint rhash_delete(self, const uint8_t *key)


@cython.final
cdef class BitmapPort:
    cdef uint64_t[::1] _words
    cdef readonly uint16_t first
    cdef readonly uint16_t last
    cdef readonly int64_t n_elements
    cdef readonly int64_t bit_tests

    # The public C entry point: one counted test (see BitmapPort.lookup).
    cdef bint contains(self, uint16_t port) noexcept nogil

    cdef bint in_range(self, uint16_t port) noexcept nogil
    cdef bint test(self, uint16_t port) noexcept nogil
    cdef void flip(self, uint16_t port) noexcept nogil
