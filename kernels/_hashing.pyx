"""Python access to the C-level hashes and RNG of kernels/hashing.pxd.

Same API as the pure-Python twin kernels.reference.hashing, so the tests can check both against
the same vectors. The kernels cimport the .pxd directly and never go through this module.
"""
from libc.stdint cimport uint8_t, uint32_t, uint64_t

from kernels cimport hashing as h


cdef class SplitMix64:
    """The suite's seeded RNG, standing in for the kernel's get_random_u32()."""

    cdef uint64_t state

    def __init__(self, uint64_t seed=0):
        self.state = seed

    def next_u64(self) -> int:
        return h.rng_next_u64(&self.state)

    def u32(self) -> int:
        return h.rng_u32(&self.state)


cdef const uint8_t *first_byte(const uint8_t[::1] data) noexcept:
    # An empty buffer has no &data[0]; the hashes read nothing from it then.
    cdef const uint8_t *nothing = <const uint8_t *>""
    return &data[0] if data.shape[0] else nothing


def siphash24(const uint8_t[::1] data, uint64_t k0, uint64_t k1) -> int:
    return h.siphash24(first_byte(data), data.shape[0], k0, k1)


def hsiphash(const uint8_t[::1] data, uint64_t k0, uint64_t k1) -> int:
    return h.hsiphash(first_byte(data), data.shape[0], k0, k1)


def hsiphash_u32(uint32_t value, uint64_t k0, uint64_t k1) -> int:
    return h.hsiphash_u32(value, k0, k1)


def jhash(const uint8_t[::1] data, uint32_t initval) -> int:
    return h.jhash(first_byte(data), <uint32_t>data.shape[0], initval)


def jhash_3words(uint32_t a, uint32_t b, uint32_t c, uint32_t initval) -> int:
    return h.jhash_3words(a, b, c, initval)


def jhash_2words(uint32_t a, uint32_t b, uint32_t initval) -> int:
    return h.jhash_2words(a, b, initval)


def jhash_1word(uint32_t a, uint32_t initval) -> int:
    return h.jhash_1word(a, initval)


def hash_32(uint32_t x, unsigned int bits) -> int:
    return h.hash_32(x, bits)


def reciprocal_scale(uint32_t hval, uint32_t n) -> int:
    return h.reciprocal_scale(hval, n)
