"""Pure-Python twin of kernels/conntrack.pyx: the conntrack hash table (kernel-internals §4, §6.5).

Same API, storage, results and counters as the Cython kernel. ``buckets`` defaults to 262,144,
the kernel's auto-size on a 64-bit host with more than 4 GiB of RAM. Each connection owns two
tuple-hash entries (``2c`` original, ``2c + 1`` reply), chained per bucket through ``next``
indices with new entries at the head (``hlist_nulls_add_head_rcu``).

Hash (hash_conntrack_raw): SipHash-2-4 with a 128-bit key from two splitmix64 outputs of the
seed (zone 0 and the netns mix taken as 0), over the first 39 bytes of a 40-byte
``nf_conntrack_tuple`` image (src address in a 16-byte slot, src port, l3num = AF_INET, dst
address in a 16-byte slot, dst port, protonum; ``dir`` excluded), addresses and ports in network
byte order. The kernel keeps the u32, so bucket = ``reciprocal_scale(low 32 bits, buckets)``.

``lookup`` hashes each packet and walks its bucket comparing full tuples (either direction is a
hit); ``confirm`` builds the original tuple from the packet and the reply tuple from the NAT
result (reply source = DNAT destination, a zero DNAT port keeping the original port, else the
original destination; reply destination = the packet's source), checks both chains for a clash
and inserts both entries. Totals: allocations, clashes, hash_computations,
bucket_entries_compared. ``_set_test_regression(True)``, test-only as in the kernel: every
lookup hashes its tuple again and compares its bucket's first entry once more (counted like
any hash and compare).
"""
from __future__ import annotations

import struct
import time

import numpy as np

from kernels import layout as L
from kernels.reference.hashing import SplitMix64, reciprocal_scale, siphash24

NF_CONN_BYTES = 256  # struct nf_conn (248 B) in a SLAB_HWCACHE_ALIGN slab
BUCKET_BYTES = 8  # one hlist_nulls_head per bucket
DEFAULT_BUCKETS = 262144
INITIAL_CONNECTIONS = 1024
AF_INET = 2

# One tuple-hash entry of the model: the chain link and the tuple it is keyed by.
ENTRY_DTYPE = np.dtype([("next", "<i4"), ("src", "<u4"), ("dst", "<u4"), ("sport", "<u2"),
                        ("dport", "<u2"), ("proto", "u1"), ("pad0", "u1"), ("pad1", "<u2")])

# nf_conntrack_tuple up to dst.protonum: src.u3 (16 B), src port, l3num (host order), dst.u3,
# dst port, protonum. 39 bytes, the hashed part of the 40-byte tuple.
_SRC = struct.Struct(">I12xH")
_L3NUM = struct.Struct("<H")
_DST = struct.Struct(">I12xHB")

_test_extra_compare = False


def _set_test_regression(on: bool) -> None:
    """Test-only: switch the extra compare per lookup on or off (bench/gate's tests)."""
    global _test_extra_compare
    _test_extra_compare = bool(on)


class ConntrackTable:
    """Buckets of tuple-hash chains, two entries per connection."""

    def __init__(self, buckets: int = DEFAULT_BUCKETS, seed: int = 0):
        if buckets <= 0:
            raise ValueError("buckets must be positive")
        rng = SplitMix64(seed)
        self._key = (rng.next_u64(), rng.next_u64())
        self.buckets = int(buckets)
        self.heads = np.full(buckets, -1, dtype=np.int32)
        self.entries = np.zeros(2 * INITIAL_CONNECTIONS, dtype=ENTRY_DTYPE)
        self.n_connections = 0
        self.allocations = 0
        self.clashes = 0
        self.hash_computations = 0
        self.bucket_entries_compared = 0

    def reserve(self, connections: int) -> None:
        """Room for ``connections`` in all, by doubling."""
        capacity = len(self.entries)
        while capacity < 2 * connections:
            capacity *= 2
        if capacity > len(self.entries):
            grown = np.zeros(capacity, dtype=ENTRY_DTYPE)
            grown[:len(self.entries)] = self.entries
            self.entries = grown

    def modelled_bytes(self) -> int:
        """Kernel memory: one nf_conn slab object per connection plus the bucket heads."""
        return self.n_connections * NF_CONN_BYTES + self.buckets * BUCKET_BYTES

    def model_bytes(self) -> int:
        """Bytes of this model's own arrays."""
        return self.heads.nbytes + self.entries.nbytes

    # ---- batch operations -------------------------------------------------------------------

    def lookup(self, packets: np.ndarray, found: np.ndarray, compares: np.ndarray,
               ns: np.ndarray | None = None) -> None:
        """found[i] = 1 when the packet's tuple is tracked (either direction)."""
        n = len(packets)
        if len(found) < n or len(compares) < n or (ns is not None and len(ns) < n):
            raise ValueError("found, compares and ns need one slot per packet")
        clock = time.perf_counter_ns
        for i, p in enumerate(packets.tolist()):
            start = clock()
            key = _packet_tuple(p)
            hit, compared = self._chain_has(self._bucket(key), key)
            if _test_extra_compare:  # the kernel's second pass: hash again, compare the first entry
                compared += self._head_compared(self._bucket(key))
            found[i], compares[i] = hit, compared
            if ns is not None:
                ns[i] += clock() - start

    def confirm(self, packets: np.ndarray, results: np.ndarray, compares: np.ndarray) -> None:
        """Track the connections these first packets start (both tuples; clashes skipped)."""
        n = len(packets)
        if len(results) < n or len(compares) < n:
            raise ValueError("results and compares need one slot per packet")
        self.reserve(self.n_connections + n)
        for i, (p, r) in enumerate(zip(packets.tolist(), results.tolist())):
            orig, reply = _packet_tuple(p), _reply_tuple(p, r)
            orig_bucket, reply_bucket = self._bucket(orig), self._bucket(reply)
            self.allocations += 1
            clash, compared = self._chain_has(orig_bucket, orig)
            if not clash:
                clash, more = self._chain_has(reply_bucket, reply)
                compared += more
            compares[i] = compared
            if clash:
                self.clashes += 1
                continue
            # Entry 2c is connection c's original tuple, 2c + 1 its reply.
            self._insert(2 * self.n_connections, orig_bucket, orig)
            self._insert(2 * self.n_connections + 1, reply_bucket, reply)
            self.n_connections += 1

    # ---- hashing, chains --------------------------------------------------------------------

    def _bucket(self, t: tuple) -> int:
        src, dst, sport, dport, proto = t
        image = _SRC.pack(src, sport) + _L3NUM.pack(AF_INET) + _DST.pack(dst, dport, proto)
        self.hash_computations += 1
        return reciprocal_scale(siphash24(image, *self._key) & 0xFFFFFFFF, self.buckets)

    def _chain_has(self, bucket: int, t: tuple) -> tuple[bool, int]:
        """(tuple found, entries compared) for one chain."""
        entries = self.entries
        h = int(self.heads[bucket])
        compared = 0
        while h >= 0:
            e = entries[h]
            compared += 1
            if (int(e["src"]), int(e["dst"]), int(e["sport"]), int(e["dport"]), int(e["proto"])) == t:
                self.bucket_entries_compared += compared
                return True, compared
            h = int(e["next"])
        self.bucket_entries_compared += compared
        return False, compared

    def _head_compared(self, bucket: int) -> int:
        """The test-only extra compare: 1 when the chain has a first entry to compare."""
        compared = int(self.heads[bucket] >= 0)
        self.bucket_entries_compared += compared
        return compared

    def _insert(self, h: int, bucket: int, t: tuple) -> None:
        src, dst, sport, dport, proto = t
        self.entries[h] = (int(self.heads[bucket]), src, dst, sport, dport, proto, 0, 0)
        self.heads[bucket] = h


def _packet_tuple(p: tuple) -> tuple:
    return p[0], p[1], p[2], p[3], p[4]  # src, dst, sport, dport, proto (PACKET_DTYPE order)


def _reply_tuple(p: tuple, r: tuple) -> tuple:
    src, dst, sport, dport, proto = _packet_tuple(p)
    verdict, _, nat_port, nat_ip = r[:4]  # RESULT_DTYPE order
    if verdict == L.V_DNAT:
        return nat_ip, src, nat_port or dport, sport, proto
    return dst, src, dport, sport, proto
