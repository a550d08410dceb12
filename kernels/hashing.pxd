# The kernel's hash functions and the suite's seeded RNG, at C level, in ONE place.
#
# cimported by every .pyx kernel. kernels/_hashing.pyx wraps them for Python (tests, tools);
# kernels/reference/hashing.py is the pure-Python twin and must give identical results
# (tests/test_kernels.py checks both against fixed vectors).
# Sources: include/linux/jhash.h (jhash family), include/linux/hash.h (hash_32),
# include/linux/kernel.h (reciprocal_scale), lib/siphash.c (SipHash-2-4, and hsiphash as 64-bit
# kernels build it: SipHash-1-3 truncated to 32 bits), and Vigna's splitmix64
# standing in for get_random_u32() so that every run is reproducible from its seed.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

# ---- seeded RNG: splitmix64 -----------------------------------------------------------------

cdef inline uint64_t rng_next_u64(uint64_t *state) noexcept nogil:
    state[0] += 0x9E3779B97F4A7C15ULL
    cdef uint64_t z = state[0]
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL
    return z ^ (z >> 31)


cdef inline uint32_t rng_u32(uint64_t *state) noexcept nogil:
    # The upper half: splitmix64's high bits are its best ones.
    return <uint32_t>(rng_next_u64(state) >> 32)


# ---- small kernel helpers -------------------------------------------------------------------

cdef inline uint32_t hash_32(uint32_t x, unsigned int bits) noexcept nogil:
    return <uint32_t>(x * 0x61C88647U) >> (32 - bits)


cdef inline uint32_t reciprocal_scale(uint32_t h, uint32_t n) noexcept nogil:
    return <uint32_t>((<uint64_t>h * n) >> 32)


cdef inline uint32_t rol32(uint32_t w, unsigned int s) noexcept nogil:
    return (w << s) | (w >> ((32 - s) & 31))


cdef inline uint32_t load_le32(const uint8_t *p) noexcept nogil:
    # Byte-wise so that unaligned keys are fine; the kernel reads CPU order, little-endian here.
    return p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)


cdef inline uint64_t load_le64(const uint8_t *p) noexcept nogil:
    return load_le32(p) | (<uint64_t>load_le32(p + 4) << 32)


# ---- writing key bytes (network order where the kernel keeps __be fields) ------------------

cdef inline void put_be32(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = v >> 24
    p[1] = v >> 16
    p[2] = v >> 8
    p[3] = v


cdef inline void put_be16(uint8_t *p, uint16_t v) noexcept nogil:
    p[0] = v >> 8
    p[1] = v


cdef inline void put_le16(uint8_t *p, uint16_t v) noexcept nogil:
    p[0] = v
    p[1] = v >> 8


cdef inline void put_le32(uint8_t *p, uint32_t v) noexcept nogil:
    put_le16(p, <uint16_t>v)
    put_le16(p + 2, <uint16_t>(v >> 16))


# ---- jhash (Bob Jenkins' lookup3 as include/linux/jhash.h has it) ---------------------------

cdef enum:
    JHASH_INITVAL = 0xdeadbeef


cdef inline void jhash_mix(uint32_t *a, uint32_t *b, uint32_t *c) noexcept nogil:
    a[0] -= c[0]; a[0] ^= rol32(c[0], 4); c[0] += b[0]
    b[0] -= a[0]; b[0] ^= rol32(a[0], 6); a[0] += c[0]
    c[0] -= b[0]; c[0] ^= rol32(b[0], 8); b[0] += a[0]
    a[0] -= c[0]; a[0] ^= rol32(c[0], 16); c[0] += b[0]
    b[0] -= a[0]; b[0] ^= rol32(a[0], 19); a[0] += c[0]
    c[0] -= b[0]; c[0] ^= rol32(b[0], 4); b[0] += a[0]


cdef inline uint32_t jhash_final(uint32_t a, uint32_t b, uint32_t c) noexcept nogil:
    c ^= b; c -= rol32(b, 14)
    a ^= c; a -= rol32(c, 11)
    b ^= a; b -= rol32(a, 25)
    c ^= b; c -= rol32(b, 16)
    a ^= c; a -= rol32(c, 4)
    b ^= a; b -= rol32(a, 14)
    c ^= b; c -= rol32(b, 24)
    return c


cdef inline uint32_t jhash_tail(const uint8_t *k, uint32_t length, uint32_t a, uint32_t b,
                                uint32_t c) noexcept nogil:
    # The kernel's fall-through switch on the 0..12 remaining bytes, as a chain of ifs.
    if length == 0:
        return c
    if length >= 12: c += <uint32_t>k[11] << 24
    if length >= 11: c += <uint32_t>k[10] << 16
    if length >= 10: c += <uint32_t>k[9] << 8
    if length >= 9: c += k[8]
    if length >= 8: b += <uint32_t>k[7] << 24
    if length >= 7: b += <uint32_t>k[6] << 16
    if length >= 6: b += <uint32_t>k[5] << 8
    if length >= 5: b += k[4]
    if length >= 4: a += <uint32_t>k[3] << 24
    if length >= 3: a += <uint32_t>k[2] << 16
    if length >= 2: a += <uint32_t>k[1] << 8
    a += k[0]
    return jhash_final(a, b, c)


cdef inline uint32_t jhash(const uint8_t *k, uint32_t length, uint32_t initval) noexcept nogil:
    cdef uint32_t a = JHASH_INITVAL + length + initval
    cdef uint32_t b = a, c = a
    while length > 12:
        a += load_le32(k)
        b += load_le32(k + 4)
        c += load_le32(k + 8)
        jhash_mix(&a, &b, &c)
        length -= 12
        k += 12
    return jhash_tail(k, length, a, b, c)


cdef inline uint32_t jhash_nwords(uint32_t a, uint32_t b, uint32_t c,
                                  uint32_t initval) noexcept nogil:
    return jhash_final(a + initval, b + initval, c + initval)


cdef inline uint32_t jhash_3words(uint32_t a, uint32_t b, uint32_t c,
                                  uint32_t initval) noexcept nogil:
    return jhash_nwords(a, b, c, initval + JHASH_INITVAL + (3 << 2))


cdef inline uint32_t jhash_2words(uint32_t a, uint32_t b, uint32_t initval) noexcept nogil:
    return jhash_nwords(a, b, 0, initval + JHASH_INITVAL + (2 << 2))


cdef inline uint32_t jhash_1word(uint32_t a, uint32_t initval) noexcept nogil:
    return jhash_nwords(a, 0, 0, initval + JHASH_INITVAL + (1 << 2))


# ---- SipHash (lib/siphash.c; key = two little-endian u64 words) -----------------------------
#
# siphash24() is SipHash-2-4. hsiphash() is what a 64-bit kernel builds (BITS_PER_LONG == 64):
# lib/siphash.c makes "HalfSipHash-1-3" really SipHash-1-3 on 64-bit words for speed, with the
# 128-bit hsiphash_key_t and the 64-bit result truncated to the u32 return type. (Only 32-bit
# kernels run the real HalfSipHash.) ip_vs_mh uses hsiphash.

cdef inline uint64_t rol64(uint64_t w, unsigned int s) noexcept nogil:
    return (w << s) | (w >> (64 - s))


cdef inline void sipround(uint64_t *v) noexcept nogil:
    v[0] += v[1]; v[1] = rol64(v[1], 13); v[1] ^= v[0]; v[0] = rol64(v[0], 32)
    v[2] += v[3]; v[3] = rol64(v[3], 16); v[3] ^= v[2]
    v[0] += v[3]; v[3] = rol64(v[3], 21); v[3] ^= v[0]
    v[2] += v[1]; v[1] = rol64(v[1], 17); v[1] ^= v[2]; v[2] = rol64(v[2], 32)


cdef inline void sip_absorb(uint64_t *v, uint64_t m, int rounds) noexcept nogil:
    cdef int r
    v[3] ^= m
    for r in range(rounds):
        sipround(v)
    v[0] ^= m


cdef inline uint64_t siphash_cd(const uint8_t *data, size_t length, uint64_t k0, uint64_t k1,
                                int c_rounds, int d_rounds) noexcept nogil:
    # SipHash-c-d; the callers pass constants, so the round loops unroll after inlining.
    cdef uint64_t v[4]
    v[0] = 0x736f6d6570736575ULL ^ k0
    v[1] = 0x646f72616e646f6dULL ^ k1
    v[2] = 0x6c7967656e657261ULL ^ k0
    v[3] = 0x7465646279746573ULL ^ k1
    cdef size_t i, whole = length - (length & 7)
    cdef int r
    for i in range(0, whole, 8):
        sip_absorb(v, load_le64(data + i), c_rounds)
    # The last block carries the length in its top byte under the 0..7 leftover bytes.
    cdef uint64_t last = (<uint64_t>length) << 56
    for i in range(length & 7):
        last |= (<uint64_t>data[whole + i]) << (8 * i)
    sip_absorb(v, last, c_rounds)
    v[2] ^= 0xff
    for r in range(d_rounds):
        sipround(v)
    return v[0] ^ v[1] ^ v[2] ^ v[3]


cdef inline uint64_t siphash24(const uint8_t *data, size_t length, uint64_t k0,
                               uint64_t k1) noexcept nogil:
    return siphash_cd(data, length, k0, k1, 2, 4)


cdef inline uint32_t hsiphash(const uint8_t *data, size_t length, uint64_t k0,
                              uint64_t k1) noexcept nogil:
    return <uint32_t>siphash_cd(data, length, k0, k1, 1, 3)


cdef inline uint32_t hsiphash_u32(uint32_t value, uint64_t k0, uint64_t k1) noexcept nogil:
    # hsiphash(&value, sizeof(value), key): the u32 as it sits in (little-endian) memory.
    cdef uint8_t image[4]
    image[0] = value
    image[1] = value >> 8
    image[2] = value >> 16
    image[3] = value >> 24
    return hsiphash(image, 4, k0, k1)
