"""Pure-Python twin of kernels/hashing.pxd: the kernel's hashes and the suite's seeded RNG.

Same API as the compiled wrapper kernels._hashing and bit-for-bit the same results. Sources:
include/linux/jhash.h (jhash family), include/linux/hash.h (hash_32), include/linux/kernel.h
(reciprocal_scale), lib/siphash.c (SipHash-2-4, and hsiphash as 64-bit kernels build it:
SipHash-1-3 truncated to 32 bits), and Vigna's splitmix64 standing in for get_random_u32() so
that every run is reproducible from its seed.
"""
M32 = 0xFFFFFFFF
M64 = 0xFFFFFFFFFFFFFFFF
JHASH_INITVAL = 0xDEADBEEF


class SplitMix64:
    """The suite's seeded RNG, standing in for the kernel's get_random_u32()."""

    def __init__(self, seed: int = 0):
        self.state = seed & M64

    def next_u64(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & M64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        return z ^ (z >> 31)

    def u32(self) -> int:
        # The upper half: splitmix64's high bits are its best ones.
        return self.next_u64() >> 32


def hash_32(x: int, bits: int) -> int:
    return ((x * 0x61C88647) & M32) >> (32 - bits)


def reciprocal_scale(hval: int, n: int) -> int:
    return (hval * n) >> 32


# ---- jhash ----------------------------------------------------------------------------------

def _rol32(w: int, s: int) -> int:
    return ((w << s) | (w >> (32 - s))) & M32


def _jhash_mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    a = ((a - c) & M32) ^ _rol32(c, 4); c = (c + b) & M32
    b = ((b - a) & M32) ^ _rol32(a, 6); a = (a + c) & M32
    c = ((c - b) & M32) ^ _rol32(b, 8); b = (b + a) & M32
    a = ((a - c) & M32) ^ _rol32(c, 16); c = (c + b) & M32
    b = ((b - a) & M32) ^ _rol32(a, 19); a = (a + c) & M32
    c = ((c - b) & M32) ^ _rol32(b, 4); b = (b + a) & M32
    return a, b, c


def _jhash_final(a: int, b: int, c: int) -> int:
    c ^= b; c = (c - _rol32(b, 14)) & M32
    a ^= c; a = (a - _rol32(c, 11)) & M32
    b ^= a; b = (b - _rol32(a, 25)) & M32
    c ^= b; c = (c - _rol32(b, 16)) & M32
    a ^= c; a = (a - _rol32(c, 4)) & M32
    b ^= a; b = (b - _rol32(a, 14)) & M32
    c ^= b; c = (c - _rol32(b, 24)) & M32
    return c


def jhash(data: bytes, initval: int) -> int:
    data = bytes(data)
    length = len(data)
    a = b = c = (JHASH_INITVAL + length + initval) & M32
    pos = 0
    while length - pos > 12:
        a = (a + int.from_bytes(data[pos:pos + 4], "little")) & M32
        b = (b + int.from_bytes(data[pos + 4:pos + 8], "little")) & M32
        c = (c + int.from_bytes(data[pos + 8:pos + 12], "little")) & M32
        a, b, c = _jhash_mix(a, b, c)
        pos += 12
    tail = data[pos:]
    if not tail:
        return c
    # The kernel's fall-through switch adds the 1..12 tail bytes little-endian into a, b, c.
    words = tail.ljust(12, b"\0")
    a = (a + int.from_bytes(words[0:4], "little")) & M32
    b = (b + int.from_bytes(words[4:8], "little")) & M32
    c = (c + int.from_bytes(words[8:12], "little")) & M32
    return _jhash_final(a, b, c)


def _jhash_nwords(a: int, b: int, c: int, initval: int) -> int:
    return _jhash_final((a + initval) & M32, (b + initval) & M32, (c + initval) & M32)


def jhash_3words(a: int, b: int, c: int, initval: int) -> int:
    return _jhash_nwords(a, b, c, (initval + JHASH_INITVAL + (3 << 2)) & M32)


def jhash_2words(a: int, b: int, initval: int) -> int:
    return _jhash_nwords(a, b, 0, (initval + JHASH_INITVAL + (2 << 2)) & M32)


def jhash_1word(a: int, initval: int) -> int:
    return _jhash_nwords(a, 0, 0, (initval + JHASH_INITVAL + (1 << 2)) & M32)


# ---- SipHash --------------------------------------------------------------------------------
#
# siphash24() is SipHash-2-4. hsiphash() is what a 64-bit kernel builds: lib/siphash.c makes
# "HalfSipHash-1-3" really SipHash-1-3 on 64-bit words when BITS_PER_LONG == 64, with the 128-bit
# hsiphash_key_t and the 64-bit result truncated to the u32 return type. ip_vs_mh uses hsiphash.

def _rol64(w: int, s: int) -> int:
    return ((w << s) | (w >> (64 - s))) & M64


def _sipround(v0: int, v1: int, v2: int, v3: int) -> tuple[int, int, int, int]:
    v0 = (v0 + v1) & M64; v1 = _rol64(v1, 13) ^ v0; v0 = _rol64(v0, 32)
    v2 = (v2 + v3) & M64; v3 = _rol64(v3, 16) ^ v2
    v0 = (v0 + v3) & M64; v3 = _rol64(v3, 21) ^ v0
    v2 = (v2 + v1) & M64; v1 = _rol64(v1, 17) ^ v2; v2 = _rol64(v2, 32)
    return v0, v1, v2, v3


def _siphash_cd(data: bytes, k0: int, k1: int, c_rounds: int, d_rounds: int) -> int:
    data = bytes(data)
    v0, v1 = 0x736F6D6570736575 ^ k0, 0x646F72616E646F6D ^ k1
    v2, v3 = 0x6C7967656E657261 ^ k0, 0x7465646279746573 ^ k1
    whole = len(data) - len(data) % 8
    # The last block carries the length in its top byte under the 0..7 leftover bytes.
    last = int.from_bytes(data[whole:], "little") | ((len(data) & 0xFF) << 56)
    blocks = [int.from_bytes(data[i:i + 8], "little") for i in range(0, whole, 8)] + [last]
    for m in blocks:
        v3 ^= m
        for _ in range(c_rounds):
            v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
        v0 ^= m
    v2 ^= 0xFF
    for _ in range(d_rounds):
        v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
    return v0 ^ v1 ^ v2 ^ v3


def siphash24(data: bytes, k0: int, k1: int) -> int:
    return _siphash_cd(data, k0, k1, 2, 4)


def hsiphash(data: bytes, k0: int, k1: int) -> int:
    return _siphash_cd(data, k0, k1, 1, 3) & M32


def hsiphash_u32(value: int, k0: int, k1: int) -> int:
    """hsiphash(&value, sizeof(value), key): the u32 as it sits in (little-endian) memory."""
    return hsiphash((value & M32).to_bytes(4, "little"), k0, k1)
