# C-level API of kernels/iptables.pyx, cimported by kernels/nftables.pyx: iptables-nft's
# nft_compat expressions call the very xt matches and targets the legacy walk calls
# (Table.match, Table.target), on the Table's own state (RNG, recent lists, sets, local
# addresses). Only the attributes and cdef methods live here; the docs are in iptables.pyx.
cimport cython
from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t

from kernels.records cimport packet_t, result_t


@cython.final
cdef class RecentLists:
    cdef uint32_t[::1] addr
    cdef uint32_t[::1] seen
    cdef int32_t[::1] prev
    cdef int32_t[::1] next
    cdef int32_t[::1] oldest
    cdef int32_t[::1] newest
    cdef int32_t[::1] count
    cdef int32_t free  # freed slots, chained through `next`
    cdef int32_t used  # slots ever handed out; the rest of the pool is untouched

    cdef int32_t find(self, int table, uint32_t addr) noexcept nogil
    cdef void unlink(self, int table, int32_t slot) noexcept nogil
    cdef void append(self, int table, int32_t slot) noexcept nogil
    cdef void touch(self, int table, int32_t slot, uint32_t now) noexcept nogil
    cdef void insert(self, int table, uint32_t addr, uint32_t now) noexcept nogil
    cdef int32_t take_slot(self) noexcept nogil
    cdef void remove(self, int table, int32_t slot) noexcept nogil
    cdef void reap(self, int table, uint32_t now, uint32_t seconds, int32_t working,
                   bint updating) noexcept nogil


@cython.final
cdef class Table:
    cdef const uint8_t[::1] blob
    cdef int32_t[::1] _hook_entry
    cdef int32_t[::1] _underflow
    cdef int32_t[::1] jumpstack
    cdef uint64_t[:, ::1] _counters
    cdef uint64_t[:, ::1] _nfacct
    cdef const uint32_t[::1] local_addrs
    cdef uint64_t rng_state
    cdef RecentLists recent
    # -m set: the set objects (kept alive here), their addresses for the nogil walk, and each
    # one's SETTYPE_* and number of dimensions
    cdef list _sets
    cdef uintptr_t[::1] _set_addrs
    cdef const uint8_t[::1] _set_types
    cdef const uint8_t[::1] _set_dims
    cdef readonly int stacksize
    cdef readonly int n_entries
    cdef readonly object hook_entry
    cdef readonly object underflow
    cdef readonly object counters
    cdef readonly object nfacct_counters

    cdef void walk(self, const packet_t *p, int hook, result_t *r) noexcept nogil
    cdef void add_counter(self, const uint8_t *e, uint32_t length) noexcept nogil
    cdef bint matches(self, const uint8_t *e, const packet_t *p, result_t *r) noexcept nogil
    cdef bint match(self, const uint8_t *m, const packet_t *p, result_t *r) noexcept nogil
    cdef bint target(self, const uint8_t *t, result_t *r) noexcept nogil
    cdef bint set_match(self, const uint8_t *m, const packet_t *p, result_t *r) noexcept nogil
    cdef bint set_test(self, uint16_t index, uint8_t flags, const packet_t *p,
                       result_t *r) noexcept nogil
    cdef uint16_t addr_type(self, uint32_t addr) noexcept nogil
    cdef bint addrtype_match(self, const uint8_t *m, const packet_t *p) noexcept nogil
    cdef bint recent_match(self, const uint8_t *m, const packet_t *p) noexcept nogil
