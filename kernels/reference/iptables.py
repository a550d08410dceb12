"""Pure-Python twin of kernels/iptables.pyx: ipt_do_table over a kernel-layout table blob.

Same API, results and counters as the Cython kernel (kernel-internals §1.2, §6.2). Every
packet walks from ``hook_entry[hook]``: ``ip_packet_match`` on each visited entry, then its
matches in order (the first false moves on by ``next_offset``), then ADD_COUNTER, then the
target. A standard target is an absolute verdict, a RETURN (pop the jump stack, or the hook's
underflow policy entry when it is empty) or a jump to a blob offset (pushed unless it is a
fall-through to the next entry or a ``-g`` goto; a push beyond ``stacksize`` drops the packet).
Extension targets: DNAT/SNAT (record address and port, stop), MASQUERADE and REJECT (stop),
MARK (rewrite the mark, continue with the next entry).

Work counters per packet (RESULT_DTYPE, kernel-internals §6.1):

* ``entries_visited``: entries on which ip_packet_match ran, policies and chain tails included;
* ``match_calls``: extension matches invoked (a rule stops at its first false match);
* ``target_calls``: extension targets invoked (DNAT, SNAT, MASQUERADE, MARK, REJECT);
* ``jumps``: standard-target jumps to a chain offset (gotos included, fall-throughs not);
* ``rng_draws``: statistic matches evaluated (one get_random_u32 each);
* ``bytes_touched``: 112 per visited entry, plus the size of every match invoked, plus the
  target's size when the target is reached;
* ``set_probes``: hashes computed and bitmap bits tested by ``-m set`` matches;
* ``set_compares``: elements compared in the hash buckets they probed.

``-m set`` tests the packet's key against the Table's sets (kernels.ipsets); ``-m physdev``
sees no bridged packets; ``-m ipvs`` sees no IPVS connection. The compiled kernel's docstring
gives the details of all three.

The blob is decoded once, at construction, into one record per entry (checking it the way
translate_table would); the walk then follows blob offsets exactly as the compiled kernel does.
Only the twin has ``walk_one``, for the packet tracer: it reports every visited entry and can
let the caller decide each statistic match instead of the RNG.

``_set_test_regression(True)``, test-only as in the kernel: after each packet's walk, ``run``
matches the headers of as many entries as the walk visited again (blob order from the hook's
first entry), changing no result or counter.
"""
from __future__ import annotations

import struct
import time
from collections import OrderedDict, defaultdict

import numpy as np

from kernels import layout as L
from kernels.ipsets import table_sets
from kernels.reference import hashset
from kernels.reference.hashing import SplitMix64

RECENT_LIST_TOT = 100  # xt_recent's ip_list_tot default: entries per --name table
M32 = 0xFFFFFFFF
PORT_PROTOCOLS = {L.MATCH_TCP: 6, L.MATCH_UDP: 17, L.MATCH_SCTP: 132}
ABSOLUTE_VERDICTS = {L.VERDICT_ACCEPT: L.V_ACCEPT, L.VERDICT_DROP: L.V_DROP}
SET_PORT_PROTOCOLS = (6, 17, 132, 136)  # get_port: TCP, UDP, SCTP, UDPLITE carry ports
BITMAP_PORT_PROTOCOLS = (6, 17)  # ip_set_get_ip_port: bitmap:port tests only TCP and UDP

# struct ipt_entry as layout.py places it: addresses, interface names/masks as 2 × u64 each,
# proto, flags, invflags, target_offset, next_offset, rule index, match count.
_HEADER = struct.Struct("<4I8QHBB4xHH4xIH10x")
assert _HEADER.size == L.ENTRY_SIZE

_test_slowed_walk = False
_ENTRIES_VISITED = L.RESULT_DTYPE.names.index("entries_visited")  # its place in a result row


def _set_test_regression(on: bool) -> None:
    """Test-only: switch the slowed walk (header matches repeated) on or off (bench/gate's tests)."""
    global _test_slowed_walk
    _test_slowed_walk = bool(on)


def _u16(blob, off: int) -> int:
    return struct.unpack_from("<H", blob, off)[0]


def _u32(blob, off: int) -> int:
    return struct.unpack_from("<I", blob, off)[0]


class _Entry:
    """One decoded entry; ``next`` is the absolute offset of the entry after it."""

    __slots__ = ("src", "dst", "smsk", "dmsk", "iniface", "outiface", "inmask", "outmask",
                 "proto", "goto", "invflags", "next", "row", "matches", "target", "target_size",
                 "target_args")


class _Packet:
    __slots__ = ("src", "dst", "sport", "dport", "proto", "ctstate", "mark", "length", "time",
                 "iif", "oif")

    def __init__(self, record: tuple):
        (self.src, self.dst, self.sport, self.dport, self.proto, _, self.ctstate, self.mark,
         self.length, self.time, iif, oif) = record
        self.iif = _iface_words(iif)
        self.oif = _iface_words(oif)


def _iface_words(name: bytes) -> tuple[int, int]:
    # ifname_compare_aligned works on the 16-byte name as two 8-byte words.
    return struct.unpack("<QQ", bytes(name).ljust(16, b"\0")[:16])


class _Walk:
    """A packet's mark, verdict and work counters while it walks."""

    __slots__ = ("mark", "verdict", "nat_ip", "nat_port", "entries_visited", "match_calls",
                 "target_calls", "jumps", "rng_draws", "bytes_touched", "set_probes", "set_compares")

    def __init__(self, mark: int):
        self.mark = mark
        self.verdict = L.V_ACCEPT
        self.nat_ip = self.nat_port = 0
        self.entries_visited = self.match_calls = self.target_calls = 0
        self.jumps = self.rng_draws = self.bytes_touched = 0
        self.set_probes = self.set_compares = 0

    def record(self) -> tuple:
        return (self.verdict, 0, self.nat_port, self.nat_ip, self.mark, self.entries_visited,
                self.match_calls, self.target_calls, self.jumps, self.rng_draws,
                self.bytes_touched, self.set_probes, self.set_compares)


def timer_overhead_ns(samples: int = 10000) -> int:
    """Median cost of an empty region timed like run()'s per-packet ``ns``, to subtract."""
    clock = time.perf_counter_ns
    spans = []
    for _ in range(max(samples, 1)):
        start = clock()
        spans.append(clock() - start)
    return int(np.median(spans))


class Table:
    """One loaded table (nat, filter, ...): the blob plus the kernel's per-table state.

    Like one CPU's view in the kernel (one jump stack, one RNG), a Table serves one thread.
    """

    def __init__(self, blob, hook_entry, underflow, stacksize: int, n_entries: int, local_addrs,
                 n_recent: int = 0, n_nfacct: int = 0, seed: int = 0, sets=None, set_names=()):
        blob = np.ascontiguousarray(blob, dtype=np.uint8).tobytes()
        self.hook_entry = np.array(hook_entry, dtype=np.int32).reshape(5)
        self.underflow = np.array(underflow, dtype=np.int32).reshape(5)
        self.stacksize = int(stacksize)
        self.n_entries = int(n_entries)
        self.counters = np.zeros((n_entries, 2), dtype=np.uint64)
        self.nfacct_counters = np.zeros((n_nfacct, 2), dtype=np.uint64)
        self._local = {int(a) for a in np.asarray(local_addrs, dtype=np.uint32)}
        # xt_recent: per --name table id, source address -> last seen, least recently updated
        # first. Created on first use: with ClientIP affinity there is one name per endpoint.
        self._recent: defaultdict[int, OrderedDict] = defaultdict(OrderedDict)
        self._rng = SplitMix64(seed)
        self._sets, self._set_types = table_sets(set_names, sets, hashset)
        self._entries = _decode(blob, n_entries, n_recent, n_nfacct, len(self._sets))
        self._check_hooks()

    @classmethod
    def from_compiled(cls, compiled, local_addrs, seed: int = 0, sets=None) -> "Table":
        """A Table for a kernels.blob.CompiledTable; ``sets`` are its ``-m set`` sets, aligned
        with ``compiled.set_names`` (kernels.ipsets.build_sets)."""
        return cls(compiled.blob, compiled.hook_entry, compiled.underflow, compiled.stacksize,
                   compiled.n_entries, local_addrs, len(compiled.recent_names),
                   len(compiled.nfacct_names), seed, sets, compiled.set_names)

    def _check_hooks(self) -> None:
        for hook in range(5):
            start, policy = int(self.hook_entry[hook]), int(self.underflow[hook])
            if start >= 0 and not (start in self._entries and policy in self._entries):
                raise ValueError(f"hook {hook}: entry or underflow is not an entry offset")
        targets = {e.target_args[0] for e in self._entries.values()
                   if e.target == L.TARGET_STANDARD and e.target_args[0] >= 0}
        if not targets <= self._entries.keys():
            raise ValueError("a jump does not land on an entry")

    def reset_counters(self) -> None:
        self.counters[:] = 0
        self.nfacct_counters[:] = 0

    def reseed(self, seed: int) -> None:
        self._rng = SplitMix64(seed)

    # ---- batch and single-packet entry points ----------------------------------------------

    def run(self, packets: np.ndarray, hook: int, results: np.ndarray,
            ns: np.ndarray | None = None) -> None:
        """Walk every packet from ``hook``; fill ``results`` and add walk times into ``ns``."""
        self._check_hook(hook)
        n = len(packets)
        if len(results) < n or (ns is not None and len(ns) < n):
            raise ValueError("results and ns need one slot per packet")
        clock = time.perf_counter_ns
        rows = []
        for i, record in enumerate(packets.tolist()):
            start = clock()
            rows.append(self._walk(_Packet(record), hook))
            if _test_slowed_walk:
                self._match_headers_again(_Packet(record), hook, rows[-1][_ENTRIES_VISITED])
            if ns is not None:
                ns[i] += clock() - start
        results[:n] = np.array(rows, dtype=L.RESULT_DTYPE)

    def walk_one(self, packet, hook: int, trace: list | None = None, decide=None) -> np.void:
        """One packet's result record; ``trace`` receives (entry_offset, matched) per visited
        entry, and ``decide(entry_offset) -> bool`` replaces the RNG in statistic matches."""
        self._check_hook(hook)
        record = packet.item() if isinstance(packet, np.void) else tuple(packet)
        row = self._walk(_Packet(record), hook, trace, decide)
        return np.array([row], dtype=L.RESULT_DTYPE)[0]

    def _match_headers_again(self, p: _Packet, hook: int, entries: int) -> None:
        """The test-only slowed walk: ip_packet_match on ``entries`` entries from the hook's first."""
        off = int(self.hook_entry[hook])
        for _ in range(entries):
            if off not in self._entries:
                return
            _ip_packet_match(self._entries[off], p)
            off = self._entries[off].next

    def _check_hook(self, hook: int) -> None:
        if not 0 <= hook < 5 or self.hook_entry[hook] < 0:
            raise ValueError(f"table has no hook {hook}")

    # ---- the walk (ipt_do_table) ------------------------------------------------------------

    def _walk(self, p: _Packet, hook: int, trace: list | None = None, decide=None) -> tuple:
        w = _Walk(p.mark)
        entries = self._entries
        off = int(self.hook_entry[hook])
        stack: list[int] = []
        while True:
            e = entries[off]
            w.entries_visited += 1
            w.bytes_touched += L.ENTRY_SIZE
            matched = _ip_packet_match(e, p) and self._matches(e, off, p, w, decide)
            if trace is not None:
                trace.append((off, matched))
            if not matched:
                off = e.next
                continue
            self.counters[e.row, 0] += 1
            self.counters[e.row, 1] += p.length
            w.bytes_touched += e.target_size
            if e.target != L.TARGET_STANDARD:
                w.target_calls += 1
                if not _run_target(e, w):
                    return w.record()
                off = e.next
                continue
            v = e.target_args[0]
            if v >= 0:
                if v != e.next:
                    if not e.goto:
                        if len(stack) >= self.stacksize:
                            w.verdict = L.V_DROP
                            return w.record()
                        stack.append(off)
                    w.jumps += 1
                off = v
            elif v == L.XT_RETURN:
                off = entries[stack.pop()].next if stack else int(self.underflow[hook])
            else:
                w.verdict = ABSOLUTE_VERDICTS[v]
                return w.record()

    # ---- iptables-nft's nft_compat (kernels/reference/nftables.py): this Table's own xt
    # extensions, on this Table's state, for a compat expression of the translated rule ------

    def compat_match(self, entry: int, index: int, record: tuple, mark: int, decide=None) -> tuple:
        """Match ``index`` of the entry at offset ``entry`` on the packet ``record`` (a
        PACKET_DTYPE tuple) carrying ``mark``: (matched, its work as a RESULT_DTYPE row)."""
        kind, _, args = self._entries[entry].matches[index]
        w = _Walk(mark)
        matched = self._match(kind, args, entry, _Packet(record), w, decide)
        return matched, w.record()

    def compat_target(self, entry: int, mark: int) -> tuple:
        """The target of the entry at offset ``entry``: (XT_CONTINUE?, RESULT_DTYPE row)."""
        w = _Walk(mark)
        return _run_target(self._entries[entry], w), w.record()

    def _matches(self, e: _Entry, off: int, p: _Packet, w: _Walk, decide) -> bool:
        for kind, size, args in e.matches:
            w.match_calls += 1
            w.bytes_touched += size
            if not self._match(kind, args, off, p, w, decide):
                return False
        return True

    def _match(self, kind: int, args: tuple, off: int, p: _Packet, w: _Walk, decide) -> bool:
        if kind == L.MATCH_COMMENT:
            return True
        if kind in PORT_PROTOCOLS:
            return p.proto == PORT_PROTOCOLS[kind] and _ports_match(args, p)
        if kind == L.MATCH_STATISTIC:
            p31, invert = args
            w.rng_draws += 1
            hit = bool(decide(off)) if decide is not None else (self._rng.u32() & 0x7FFFFFFF) < p31
            return hit != bool(invert)
        if kind == L.MATCH_MARK:
            value, mask, invert = args
            return ((w.mark & mask) == value) != bool(invert)
        if kind == L.MATCH_CONNTRACK:
            states, invert = args
            return ((p.ctstate & states) != 0) != bool(invert)
        if kind == L.MATCH_ADDRTYPE:
            return self._addrtype_match(args, p)
        if kind == L.MATCH_RECENT:
            return self._recent_match(args, p)
        if kind == L.MATCH_NFACCT:
            self.nfacct_counters[args[0], 0] += 1
            self.nfacct_counters[args[0], 1] += p.length
            return True
        if kind == L.MATCH_SET:
            return self._set_match(args, p, w)
        if kind == L.MATCH_PHYSDEV:
            invert, bitmask = args  # no bridge info: every option used must be inverted
            return bitmask & ~invert == 0
        if kind == L.MATCH_IPVS:
            # No IPVS connection: a lone --ipvs is its invert bit; any other option fails.
            invert, bitmask = args
            return bitmask == L.IPVS_PROPERTY and bool(invert & L.IPVS_PROPERTY)
        return _multiport_match(args, p)  # the only kind left: _decode rejects unknown ones

    # ---- set (set_match_v4 -> ip_set_test) ---------------------------------------------------

    def _set_match(self, args: tuple, p: _Packet, w: _Walk) -> bool:
        index, dim, flags = args
        set_type = self._set_types[index]
        # ip_set_test: a match naming fewer dimensions than the set has tests nothing.
        found = dim >= L.SETTYPE_DIMENSIONS[set_type] and self._set_test(index, set_type, flags, p, w)
        return found != bool(flags & L.SET_INVERT)

    def _set_test(self, index: int, set_type: int, flags: int, p: _Packet, w: _Walk) -> bool:
        s = self._sets[index]
        found = np.zeros(1, dtype=np.uint8)
        if set_type == L.SETTYPE_BITMAP_PORT:
            if p.proto not in BITMAP_PORT_PROTOCOLS:
                return False
            before = s.bit_tests
            s.lookup(np.array([_set_port(p, flags, 1)], dtype=np.uint16), found)
            w.set_probes += s.bit_tests - before
            return bool(found[0])
        compares = np.zeros(1, dtype=np.uint32)
        before = s.hash_computations
        s.lookup(_set_key(set_type, flags, p), found, np.zeros(1, dtype=np.uint32), compares)
        w.set_probes += s.hash_computations - before
        w.set_compares += int(compares[0])
        return bool(found[0])

    # ---- addrtype (addrtype_mt_v1 with inet_dev_addr_type's classes) -------------------------

    def _addr_type(self, addr: int) -> int:
        # __inet_dev_addr_type: 0.0.0.0/8 and 255.255.255.255 are broadcast, 224/4 multicast.
        if (addr >> 24) == 0 or addr == M32:
            return L.ADDRTYPE_BROADCAST
        if (addr >> 28) == 0xE:
            return L.ADDRTYPE_MULTICAST
        if (addr >> 24) == 127 or addr in self._local:
            return L.ADDRTYPE_LOCAL
        return L.ADDRTYPE_UNICAST

    def _addrtype_match(self, args: tuple, p: _Packet) -> bool:
        source, dest, flags = args
        if source and not (bool(self._addr_type(p.src) & source) != bool(flags & L.ADDRTYPE_INV_SOURCE)):
            return False
        return not dest or (bool(self._addr_type(p.dst) & dest) != bool(flags & L.ADDRTYPE_INV_DEST))

    # ---- recent (recent_mt: one LRU list of RECENT_LIST_TOT source addresses per name) -------

    def _recent_match(self, args: tuple, p: _Packet) -> bool:
        seconds, mode, reap, invert, table = args
        lru = self._recent[table]
        ret = bool(invert)
        seen = lru.get(p.src)
        if seen is None:
            if mode != L.RECENT_SET:
                return ret
            if len(lru) >= RECENT_LIST_TOT:  # recent_entry_init drops the LRU head first
                lru.popitem(last=False)
            lru[p.src] = p.time
            return not ret
        if mode == L.RECENT_SET:
            ret = not ret
        elif mode == L.RECENT_REMOVE:
            del lru[p.src]
            return not ret
        else:  # --rcheck / --update: seen within `seconds` (0: at any time)
            if seconds == 0 or ((p.time - seen) & M32) <= seconds:
                ret = not ret
            if reap:
                _recent_reap(lru, p.time, seconds, p.src, mode == L.RECENT_UPDATE and ret)
        # As in the kernel, --update refreshes only when the (possibly inverted) result is true.
        if mode == L.RECENT_SET or (mode == L.RECENT_UPDATE and ret):
            lru[p.src] = p.time
            lru.move_to_end(p.src)
        return ret


def _recent_reap(lru: OrderedDict, now: int, seconds: int, working: int, updating: bool) -> None:
    # recent_entry_reap: only the LRU head is examined, and never the entry being updated.
    oldest = next(iter(lru))
    if oldest == working and updating:
        return
    if ((now - lru[oldest]) & M32) > seconds:
        del lru[oldest]


# ---- header match, stateless matches, targets ------------------------------------------------

def _ip_packet_match(e: _Entry, p: _Packet) -> bool:
    inv = e.invflags
    # The kernel computes both address compares before testing either.
    src_miss = ((p.src & e.smsk) != e.src) != bool(inv & L.INV_SRCIP)
    dst_miss = ((p.dst & e.dmsk) != e.dst) != bool(inv & L.INV_DSTIP)
    if src_miss or dst_miss:
        return False
    if _ifname_differs(p.iif, e.iniface, e.inmask) != bool(inv & L.INV_VIA_IN):
        return False
    if _ifname_differs(p.oif, e.outiface, e.outmask) != bool(inv & L.INV_VIA_OUT):
        return False
    return e.proto == 0 or ((p.proto != e.proto) == bool(inv & L.INV_PROTO))


def _ifname_differs(name: tuple, rule_name: tuple, mask: tuple) -> bool:
    return (((name[0] ^ rule_name[0]) & mask[0]) | ((name[1] ^ rule_name[1]) & mask[1])) != 0


def _ports_match(args: tuple, p: _Packet) -> bool:
    # tcp_mt/udp_mt: inclusive source and destination port ranges, each with its invert flag.
    spt_lo, spt_hi, dpt_lo, dpt_hi, inv = args
    return ((spt_lo <= p.sport <= spt_hi) != bool(inv & L.PORT_INV_SRC)
            and (dpt_lo <= p.dport <= dpt_hi) != bool(inv & L.PORT_INV_DST))


def _multiport_match(args: tuple, p: _Packet) -> bool:
    flags, invert, ports = args
    for port in ports:
        if ((flags & L.MP_SRC) and p.sport == port) or ((flags & L.MP_DST) and p.dport == port):
            return not invert
    return bool(invert)


def _set_addr(p: _Packet, flags: int, dim: int) -> int:
    return p.src if flags & (1 << dim) else p.dst


def _set_port(p: _Packet, flags: int, dim: int) -> int:
    if p.proto not in SET_PORT_PROTOCOLS:
        return 0  # get_port leaves the element's port 0
    return p.sport if flags & (1 << dim) else p.dport


def _set_key(set_type: int, flags: int, p: _Packet) -> np.ndarray:
    """The element a hash type's kadt builds from the packet (kernels.layout's packers)."""
    ip = _set_addr(p, flags, 1)
    if set_type == L.SETTYPE_IP:
        return L.ipset_key_ip(ip)
    port = _set_port(p, flags, 2)
    if set_type == L.SETTYPE_IP_PORT:
        return L.ipset_key_ip_port(ip, p.proto, port)
    if set_type == L.SETTYPE_IP_PORT_IP:
        return L.ipset_key_ip_port_ip(ip, p.proto, port, _set_addr(p, flags, 3))
    return L.ipset_key_ip_port_net(ip, p.proto, port, _set_addr(p, flags, 3))


def _run_target(e: _Entry, w: _Walk) -> bool:
    """An extension target; True means XT_CONTINUE (go on with the next entry)."""
    kind = e.target
    if kind == L.TARGET_MARK:
        value, mask = e.target_args
        w.mark = (w.mark & ~mask & M32) ^ value
        return True
    if kind in (L.TARGET_DNAT, L.TARGET_SNAT):
        w.verdict = L.V_DNAT if kind == L.TARGET_DNAT else L.V_SNAT
        w.nat_ip, w.nat_port = e.target_args
    elif kind == L.TARGET_MASQUERADE:
        w.verdict = L.V_MASQUERADE
    elif kind == L.TARGET_REJECT:
        w.verdict = L.V_REJECT
    else:  # ERROR: the kernel's xt_error target drops (only a corrupt table reaches one)
        w.verdict = L.V_DROP
    return False


# ---- decoding, with translate_table-like checks ----------------------------------------------

def _decode(blob: bytes, n_entries: int, n_recent: int, n_nfacct: int, n_sets: int) -> dict[int, _Entry]:
    entries = {}
    off = 0
    while off < len(blob):
        if off + L.ENTRY_SIZE > len(blob) or _u16(blob, off + L.E_NEXT_OFFSET) < L.ENTRY_SIZE:
            raise ValueError(f"entry at {off} overruns the blob")
        entries[off] = _decode_entry(blob, off, n_entries, n_recent, n_nfacct, n_sets)
        off = entries[off].next
    return entries


def _decode_entry(blob: bytes, off: int, n_entries: int, n_recent: int, n_nfacct: int,
                  n_sets: int) -> _Entry:
    e = _Entry()
    (e.src, e.dst, e.smsk, e.dmsk, in0, in1, out0, out1, inm0, inm1, outm0, outm1, e.proto,
     flags, e.invflags, target_offset, next_offset, e.row, match_count) = _HEADER.unpack_from(blob, off)
    e.iniface, e.outiface, e.inmask, e.outmask = (in0, in1), (out0, out1), (inm0, inm1), (outm0, outm1)
    e.goto = bool(flags & L.F_GOTO)
    e.next = off + next_offset
    if e.next > len(blob) or e.row >= n_entries:
        raise ValueError(f"entry at {off}: bad next_offset or rule index")
    if target_offset < L.ENTRY_SIZE or target_offset + L.XT_HEADER > next_offset:
        raise ValueError(f"entry at {off}: bad target_offset")
    e.matches = []
    m = L.ENTRY_SIZE
    for _ in range(match_count):
        kind, size = blob[off + m + L.X_KIND], _u16(blob, off + m + L.X_SIZE)
        if L.MATCH_SIZES.get(kind) != size or m + size > target_offset:
            raise ValueError(f"entry at {off}: bad match at +{m}")
        e.matches.append((kind, size, _match_args(blob, off + m, kind, n_recent, n_nfacct, n_sets)))
        m += size
    t = off + target_offset
    e.target, e.target_size = blob[t + L.X_KIND], _u16(blob, t + L.X_SIZE)
    if m != target_offset or L.TARGET_SIZES.get(e.target) != e.target_size or (
            target_offset + e.target_size > next_offset):
        raise ValueError(f"entry at {off}: bad target")
    e.target_args = _target_args(blob, t, e.target)
    if e.target == L.TARGET_STANDARD and e.target_args[0] < 0 and (
            e.target_args[0] not in ABSOLUTE_VERDICTS and e.target_args[0] != L.XT_RETURN):
        raise ValueError(f"entry at {off}: unsupported verdict {e.target_args[0]}")
    return e


def _match_args(blob: bytes, m: int, kind: int, n_recent: int, n_nfacct: int, n_sets: int) -> tuple:
    if kind in PORT_PROTOCOLS:
        return (_u16(blob, m + L.P_SPT_LO), _u16(blob, m + L.P_SPT_HI), _u16(blob, m + L.P_DPT_LO),
                _u16(blob, m + L.P_DPT_HI), blob[m + L.P_PORT_INV])
    if kind == L.MATCH_STATISTIC:
        return _u32(blob, m + L.STAT_P31), blob[m + L.STAT_INVERT]
    if kind == L.MATCH_MARK:
        return _u32(blob, m + L.MARK_VALUE), _u32(blob, m + L.MARK_MASK), blob[m + L.MARK_INVERT]
    if kind == L.MATCH_CONNTRACK:
        return _u16(blob, m + L.CT_STATE_MASK), blob[m + L.CT_INVERT]
    if kind == L.MATCH_ADDRTYPE:
        return _u16(blob, m + L.AT_SOURCE), _u16(blob, m + L.AT_DEST), blob[m + L.AT_FLAGS]
    if kind == L.MATCH_RECENT:
        table = _u16(blob, m + L.RC_TABLE)
        if table >= n_recent:
            raise ValueError(f"match at {m}: unknown recent id {table}")
        return (_u32(blob, m + L.RC_SECONDS), blob[m + L.RC_MODE], blob[m + L.RC_REAP],
                blob[m + L.RC_INVERT], table)
    if kind == L.MATCH_NFACCT:
        if _u16(blob, m + L.NFACCT_ID) >= n_nfacct:
            raise ValueError(f"match at {m}: unknown nfacct id")
        return (_u16(blob, m + L.NFACCT_ID),)
    if kind == L.MATCH_MULTIPORT:
        count = blob[m + L.MP_COUNT]
        if count > L.MP_MAX_PORTS:
            raise ValueError(f"match at {m}: too many multiport ports")
        ports = struct.unpack_from(f"<{count}H", blob, m + L.MP_PORTS)
        return blob[m + L.MP_FLAGS], blob[m + L.MP_INVERT], ports
    if kind == L.MATCH_SET:
        index = _u16(blob, m + L.SET_ID)
        if index >= n_sets:
            raise ValueError(f"match at {m}: unknown set id {index}")
        return index, blob[m + L.SET_DIM], blob[m + L.SET_FLAGS]
    if kind == L.MATCH_PHYSDEV:
        return blob[m + L.PHYSDEV_INVERT], blob[m + L.PHYSDEV_BITMASK]
    if kind == L.MATCH_IPVS:
        return blob[m + L.IPVS_INVERT], blob[m + L.IPVS_BITMASK]
    return ()  # comment: nothing to read


def _target_args(blob: bytes, t: int, kind: int) -> tuple:
    if kind == L.TARGET_STANDARD:
        return struct.unpack_from("<i", blob, t + L.T_VERDICT)
    if kind in (L.TARGET_DNAT, L.TARGET_SNAT):
        return _u32(blob, t + L.T_NAT_IP), _u16(blob, t + L.T_NAT_PORT)
    if kind == L.TARGET_MARK:
        return _u32(blob, t + L.T_MARK_VALUE), _u32(blob, t + L.T_MARK_MASK)
    return ()
