"""Python access to the C-level hashes and RNG of kernels/hashing.pxd.

Same API as the pure-Python twin kernels.reference.hashing, so tests and tools can check one
against the other. The kernels themselves cimport the .pxd and never go through this module.
"""
from libc.stdint cimport uint8_t, uint32_t, uint64_t


cdef class SplitMix64:
    """The suite's seeded RNG (stands in for the kernel's get_random_u32)."""

    cdef uint64_t state

    def __init__(self, uint64_t seed=0):
        self.state = seed

    def next_u64(self) -> int:
        return rng_next_u64(&self.state)

    def u32(self) -> int:
        return rng_u32(&self.state)


def siphash24(const uint8_t[::1] data, uint64_t k0, uint64_t k1) -> int:
    return siphash24_c(data, k0, k1)


cdef uint64_t siphash24_c(const uint8_t[::1] data, uint64_t k0, uint64_t k1) noexcept:
    # An empty memoryview has no &data[0]; the hash only reads `length` bytes.
    cdef uint8_t empty = 0
    return siphash24(&data[0] if data.shape[0] else &empty, data.shape[0], k0, k1)


def jhash(const uint8_t[::1] data, uint32_t initval) -> int:
    cdef uint8_t empty = 0
    return jhash(&data[0] if data.shape[0] else &empty, data.shape[0], initval)
