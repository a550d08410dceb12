"""ipt_do_table over a kernel-layout table blob (kernel-internals §1.2, §6.2).

Every packet walks from ``hook_entry[hook]`` exactly as the kernel does: ``ip_packet_match``
on each visited entry, then its matches in order (the first false moves on by ``next_offset``),
then ADD_COUNTER, then the target. A standard target is an absolute verdict, a RETURN (pop
the jump stack, or the hook's underflow policy entry when it is empty) or a jump to a blob
offset (pushed unless it is a fall-through to the next entry or a ``-g`` goto; a push beyond
``stacksize`` drops the packet). Extension targets: DNAT/SNAT (record address and port, stop),
MASQUERADE and REJECT (stop), MARK (rewrite the mark, continue with the next entry).

Work counters per packet (RESULT_DTYPE, kernel-internals §6.1):

* ``entries_visited``: entries on which ip_packet_match ran, policies and chain tails included;
* ``match_calls``: extension matches invoked (a rule stops at its first false match);
* ``target_calls``: extension targets invoked (DNAT, SNAT, MASQUERADE, MARK, REJECT);
* ``jumps``: standard-target jumps to a chain offset (gotos included, fall-throughs not);
* ``rng_draws``: statistic matches evaluated (one get_random_u32 each);
* ``bytes_touched``: 112 per visited entry, plus the size of every match invoked, plus the
  target's size when the target is reached;
* ``set_probes``: the ``-m set`` work that is not a byte of the blob: hashes computed (a
  hash:ip,port,net lookup hashes once per prefix length it tries) and bitmap bits tested;
* ``set_compares``: elements compared in the probed hash buckets.

The set, physdev and ipvs matches of kube-proxy's IPVS mode (kernel-internals §2.6):

* ``-m set`` (set_match_v4, ip_set_test): the Table's sets (kernels.ipsets) are kernels.hashset
  objects; the packet's key is built as the type's kadt builds it, each dimension from the
  source or destination as the match's flags say. A port dimension is ipset's proto:port: the
  packet's protocol and port (TCP, UDP, SCTP, UDPLITE; 0 for other protocols, ICMP's type and
  code are not modelled); bitmap:port only tests TCP and UDP. A match with fewer dimensions
  than its set, and any kadt error (a port outside a bitmap's range), is "not in the set";
  the result is then XORed with the invert flag. The set's own counters advance too.
* ``-m physdev``: the model has no bridged packets, so physdev_mt's "no bridge info" branch
  applies: a match succeeds only if every option it uses is inverted.
* ``-m ipvs``: the packets kpbench walks carry no IPVS connection (skb->ipvs_property is 0;
  they have not been through IPVS). As ipvs_mt has it, ``[!] --ipvs`` alone matches exactly
  when inverted, and any other option (--vaddr, --vport, --vproto: the loader sets
  IPVS_PROPERTY with each) never matches, inverted or not.

``counters[rule, 0/1]`` are each entry's packets and bytes (ADD_COUNTER on every entry whose
header and matches all succeed: jump rules, policies and tails too). Addresses are host-order
integers; the blob is little-endian, read in place (a little-endian host is assumed).

Test-only switch: ``_set_test_regression(True)`` slows ``run`` down without changing a verdict
or counter: after each packet's walk, ip_packet_match runs again on as many entries as the walk
visited (in blob order from the hook's first entry), the deliberate regression the gate's
instruction-count tier must catch. Off by default: one test per packet.

The pure-Python twin is kernels.reference.iptables; both give identical results and counters.
kernels/iptables.pxd exports Table's C API: iptables-nft's compat expressions in
kernels/nftables.pyx call ``match``/``target`` on a Table (the twin: ``compat_match``/
``compat_target``), so both backends run one implementation of every xt extension.
"""
import numpy as np

cimport cython
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset
from kernels.clock cimport now_ns

from cpython.ref cimport PyObject
from libc.stdint cimport uintptr_t

from kernels cimport hashing
from kernels.hashset cimport BitmapPort, HashSet
from kernels.records cimport packet_t, result_t
from kernels import hashset
from kernels import layout as L
from kernels.ipsets import table_sets

# C-level copies of kernels/layout.py; test_kernels.py checks LAYOUT_CONSTANTS against it.
cdef enum:
    ENTRY_SIZE = 112
    E_SRC = 0
    E_DST = 4
    E_SMSK = 8
    E_DMSK = 12
    E_INIFACE = 16
    E_OUTIFACE = 32
    E_INMASK = 48
    E_OUTMASK = 64
    E_PROTO = 80
    E_FLAGS = 82
    E_INVFLAGS = 83
    E_TARGET_OFFSET = 88
    E_NEXT_OFFSET = 90
    E_RULE_INDEX = 96
    E_MATCH_COUNT = 100
    F_GOTO = 0x02
    INV_VIA_IN = 0x01
    INV_VIA_OUT = 0x02
    INV_SRCIP = 0x08
    INV_DSTIP = 0x10
    INV_PROTO = 0x40
    XT_HEADER = 32
    X_SIZE = 0
    X_KIND = 2
    MATCH_COMMENT = 1
    MATCH_TCP = 2
    MATCH_UDP = 3
    MATCH_SCTP = 4
    MATCH_STATISTIC = 5
    MATCH_MARK = 6
    MATCH_CONNTRACK = 7
    MATCH_ADDRTYPE = 8
    MATCH_RECENT = 9
    MATCH_NFACCT = 10
    MATCH_MULTIPORT = 11
    MATCH_SET = 12
    MATCH_PHYSDEV = 13
    MATCH_IPVS = 14
    TARGET_STANDARD = 1
    TARGET_ERROR = 2
    TARGET_REJECT = 3
    TARGET_DNAT = 4
    TARGET_SNAT = 5
    TARGET_MASQUERADE = 6
    TARGET_MARK = 7
    P_SPT_LO = 32
    P_SPT_HI = 34
    P_DPT_LO = 36
    P_DPT_HI = 38
    P_PORT_INV = 40
    PORT_INV_SRC = 0x01
    PORT_INV_DST = 0x02
    STAT_P31 = 32
    STAT_INVERT = 36
    MARK_VALUE = 32
    MARK_MASK = 36
    MARK_INVERT = 40
    CT_STATE_MASK = 32
    CT_INVERT = 34
    AT_SOURCE = 32
    AT_DEST = 34
    AT_FLAGS = 36
    ADDRTYPE_UNICAST = 0x0002
    ADDRTYPE_LOCAL = 0x0004
    ADDRTYPE_BROADCAST = 0x0008
    ADDRTYPE_MULTICAST = 0x0020
    ADDRTYPE_INV_SOURCE = 0x01
    ADDRTYPE_INV_DEST = 0x02
    RC_SECONDS = 32
    RC_MODE = 36
    RC_REAP = 37
    RC_INVERT = 38
    RC_TABLE = 40
    RECENT_CHECK = 1
    RECENT_SET = 2
    RECENT_UPDATE = 3
    RECENT_REMOVE = 4
    NFACCT_ID = 32
    MP_FLAGS = 32
    MP_COUNT = 33
    MP_INVERT = 34
    MP_PORTS = 36
    MP_SRC = 1
    MP_DST = 2
    MP_ANY = 3
    SET_ID = 32
    SET_DIM = 34
    SET_FLAGS = 35
    SET_INVERT = 0x01
    SETTYPE_BITMAP_PORT = 0
    SETTYPE_IP = 1
    SETTYPE_IP_PORT = 2
    SETTYPE_IP_PORT_IP = 3
    SETTYPE_IP_PORT_NET = 4
    PHYSDEV_INVERT = 96
    PHYSDEV_BITMASK = 97
    IPVS_INVERT = 70
    IPVS_BITMASK = 71
    IPVS_PROPERTY = 0x01
    T_VERDICT = 32
    T_NAT_IP = 32
    T_NAT_PORT = 36
    T_MARK_VALUE = 32
    T_MARK_MASK = 36
    XT_RETURN = -5
    VERDICT_ACCEPT = -2
    VERDICT_DROP = -1
    V_ACCEPT = 0
    V_DROP = 1
    V_REJECT = 2
    V_DNAT = 3
    V_SNAT = 4
    V_MASQUERADE = 5
    IPPROTO_TCP = 6
    IPPROTO_UDP = 17
    IPPROTO_SCTP = 132
    IPPROTO_UDPLITE = 136
    SET_KEY_MAX = 12  # the widest ipset key the sets use (hash:ip,port,ip and hash:ip,port,net)
    RECENT_LIST_TOT = 100  # xt_recent's ip_list_tot default: entries per --name table

LAYOUT_CONSTANTS = {
    "ENTRY_SIZE": ENTRY_SIZE, "E_SRC": E_SRC, "E_DST": E_DST, "E_SMSK": E_SMSK, "E_DMSK": E_DMSK,
    "E_INIFACE": E_INIFACE, "E_OUTIFACE": E_OUTIFACE, "E_INMASK": E_INMASK, "E_OUTMASK": E_OUTMASK,
    "E_PROTO": E_PROTO, "E_FLAGS": E_FLAGS, "E_INVFLAGS": E_INVFLAGS,
    "E_TARGET_OFFSET": E_TARGET_OFFSET, "E_NEXT_OFFSET": E_NEXT_OFFSET,
    "E_RULE_INDEX": E_RULE_INDEX, "E_MATCH_COUNT": E_MATCH_COUNT, "F_GOTO": F_GOTO,
    "INV_VIA_IN": INV_VIA_IN, "INV_VIA_OUT": INV_VIA_OUT, "INV_SRCIP": INV_SRCIP,
    "INV_DSTIP": INV_DSTIP, "INV_PROTO": INV_PROTO, "XT_HEADER": XT_HEADER, "X_SIZE": X_SIZE, "X_KIND": X_KIND,
    "MATCH_COMMENT": MATCH_COMMENT, "MATCH_TCP": MATCH_TCP, "MATCH_UDP": MATCH_UDP,
    "MATCH_SCTP": MATCH_SCTP, "MATCH_STATISTIC": MATCH_STATISTIC, "MATCH_MARK": MATCH_MARK,
    "MATCH_CONNTRACK": MATCH_CONNTRACK, "MATCH_ADDRTYPE": MATCH_ADDRTYPE,
    "MATCH_RECENT": MATCH_RECENT, "MATCH_NFACCT": MATCH_NFACCT, "MATCH_MULTIPORT": MATCH_MULTIPORT,
    "TARGET_STANDARD": TARGET_STANDARD, "TARGET_ERROR": TARGET_ERROR,
    "TARGET_REJECT": TARGET_REJECT, "TARGET_DNAT": TARGET_DNAT, "TARGET_SNAT": TARGET_SNAT,
    "TARGET_MASQUERADE": TARGET_MASQUERADE, "TARGET_MARK": TARGET_MARK,
    "P_SPT_LO": P_SPT_LO, "P_SPT_HI": P_SPT_HI, "P_DPT_LO": P_DPT_LO, "P_DPT_HI": P_DPT_HI,
    "P_PORT_INV": P_PORT_INV, "PORT_INV_SRC": PORT_INV_SRC, "PORT_INV_DST": PORT_INV_DST,
    "STAT_P31": STAT_P31, "STAT_INVERT": STAT_INVERT, "MARK_VALUE": MARK_VALUE,
    "MARK_MASK": MARK_MASK, "MARK_INVERT": MARK_INVERT, "CT_STATE_MASK": CT_STATE_MASK,
    "CT_INVERT": CT_INVERT, "AT_SOURCE": AT_SOURCE, "AT_DEST": AT_DEST, "AT_FLAGS": AT_FLAGS,
    "ADDRTYPE_UNICAST": ADDRTYPE_UNICAST, "ADDRTYPE_LOCAL": ADDRTYPE_LOCAL,
    "ADDRTYPE_BROADCAST": ADDRTYPE_BROADCAST, "ADDRTYPE_MULTICAST": ADDRTYPE_MULTICAST,
    "ADDRTYPE_INV_SOURCE": ADDRTYPE_INV_SOURCE, "ADDRTYPE_INV_DEST": ADDRTYPE_INV_DEST,
    "RC_SECONDS": RC_SECONDS, "RC_MODE": RC_MODE, "RC_REAP": RC_REAP, "RC_INVERT": RC_INVERT,
    "RC_TABLE": RC_TABLE, "RECENT_CHECK": RECENT_CHECK, "RECENT_SET": RECENT_SET,
    "RECENT_UPDATE": RECENT_UPDATE, "RECENT_REMOVE": RECENT_REMOVE, "NFACCT_ID": NFACCT_ID,
    "MP_FLAGS": MP_FLAGS, "MP_COUNT": MP_COUNT, "MP_INVERT": MP_INVERT, "MP_PORTS": MP_PORTS,
    "MP_SRC": MP_SRC, "MP_DST": MP_DST, "MP_ANY": MP_ANY, "MATCH_SET": MATCH_SET,
    "MATCH_PHYSDEV": MATCH_PHYSDEV, "MATCH_IPVS": MATCH_IPVS, "SET_ID": SET_ID, "SET_DIM": SET_DIM,
    "SET_FLAGS": SET_FLAGS, "SET_INVERT": SET_INVERT, "SETTYPE_BITMAP_PORT": SETTYPE_BITMAP_PORT,
    "SETTYPE_IP": SETTYPE_IP, "SETTYPE_IP_PORT": SETTYPE_IP_PORT,
    "SETTYPE_IP_PORT_IP": SETTYPE_IP_PORT_IP, "SETTYPE_IP_PORT_NET": SETTYPE_IP_PORT_NET,
    "PHYSDEV_INVERT": PHYSDEV_INVERT, "PHYSDEV_BITMASK": PHYSDEV_BITMASK,
    "IPVS_INVERT": IPVS_INVERT, "IPVS_BITMASK": IPVS_BITMASK, "IPVS_PROPERTY": IPVS_PROPERTY,
    "T_VERDICT": T_VERDICT,
    "T_NAT_IP": T_NAT_IP, "T_NAT_PORT": T_NAT_PORT, "T_MARK_VALUE": T_MARK_VALUE,
    "T_MARK_MASK": T_MARK_MASK, "XT_RETURN": XT_RETURN, "VERDICT_ACCEPT": VERDICT_ACCEPT,
    "VERDICT_DROP": VERDICT_DROP, "V_ACCEPT": V_ACCEPT, "V_DROP": V_DROP, "V_REJECT": V_REJECT,
    "V_DNAT": V_DNAT, "V_SNAT": V_SNAT, "V_MASQUERADE": V_MASQUERADE,
}


cdef bint _test_slowed_walk = False
cdef uint32_t _test_header_matches = 0  # the slowed walk's results, kept so none is optimised away


def _set_test_regression(bint on) -> None:
    """Test-only: switch the slowed walk (header matches repeated) on or off (bench/gate's tests)."""
    global _test_slowed_walk
    _test_slowed_walk = on


def struct_layout() -> dict:
    """{"packet"|"result": (sizeof, {field: offset})} of the C structs, to check the dtypes."""
    cdef packet_t p
    cdef result_t r
    cdef char *pb = <char *>&p
    cdef char *rb = <char *>&r
    return {
        "packet": (sizeof(packet_t), {
            "src": <char *>&p.src - pb, "dst": <char *>&p.dst - pb,
            "sport": <char *>&p.sport - pb, "dport": <char *>&p.dport - pb,
            "proto": <char *>&p.proto - pb, "pad0": <char *>&p.pad0 - pb,
            "ctstate": <char *>&p.ctstate - pb, "mark": <char *>&p.mark - pb,
            "length": <char *>&p.length - pb, "time": <char *>&p.time - pb,
            "iif": <char *>&p.iif - pb, "oif": <char *>&p.oif - pb}),
        "result": (sizeof(result_t), {
            "verdict": <char *>&r.verdict - rb, "pad0": <char *>&r.pad0 - rb,
            "dnat_port": <char *>&r.dnat_port - rb, "dnat_ip": <char *>&r.dnat_ip - rb,
            "mark": <char *>&r.mark - rb, "entries_visited": <char *>&r.entries_visited - rb,
            "match_calls": <char *>&r.match_calls - rb, "target_calls": <char *>&r.target_calls - rb,
            "jumps": <char *>&r.jumps - rb, "rng_draws": <char *>&r.rng_draws - rb,
            "bytes_touched": <char *>&r.bytes_touched - rb,
            "set_probes": <char *>&r.set_probes - rb, "set_compares": <char *>&r.set_compares - rb}),
    }


# ---- reading the blob (memcpy: unaligned-safe, compiles to plain loads) ----------------------

cdef inline uint16_t u16_at(const uint8_t *p, size_t off) noexcept nogil:
    cdef uint16_t v
    memcpy(&v, p + off, 2)
    return v


cdef inline uint32_t u32_at(const uint8_t *p, size_t off) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p + off, 4)
    return v


cdef inline int32_t i32_at(const uint8_t *p, size_t off) noexcept nogil:
    cdef int32_t v
    memcpy(&v, p + off, 4)
    return v


cdef inline uint64_t u64_at(const void *p, size_t off) noexcept nogil:
    cdef uint64_t v
    memcpy(&v, <const char *>p + off, 8)
    return v


# ---- ip_packet_match -------------------------------------------------------------------------

cdef inline bint inv(const uint8_t *e, uint8_t flag) noexcept nogil:
    return (e[E_INVFLAGS] & flag) != 0


cdef inline bint ifname_differs(const char *name, const uint8_t *rule_name,
                                const uint8_t *mask) noexcept nogil:
    # ifname_compare_aligned: XOR-and-mask over the 16-byte names as two 8-byte words.
    return (((u64_at(name, 0) ^ u64_at(rule_name, 0)) & u64_at(mask, 0))
            | ((u64_at(name, 8) ^ u64_at(rule_name, 8)) & u64_at(mask, 8))) != 0


cdef inline bint ip_packet_match(const uint8_t *e, const packet_t *p) noexcept nogil:
    # The kernel computes both address compares before testing either.
    cdef bint src_miss = ((p.src & u32_at(e, E_SMSK)) != u32_at(e, E_SRC)) ^ inv(e, INV_SRCIP)
    cdef bint dst_miss = ((p.dst & u32_at(e, E_DMSK)) != u32_at(e, E_DST)) ^ inv(e, INV_DSTIP)
    if src_miss or dst_miss:
        return False
    if ifname_differs(p.iif, e + E_INIFACE, e + E_INMASK) ^ inv(e, INV_VIA_IN):
        return False
    if ifname_differs(p.oif, e + E_OUTIFACE, e + E_OUTMASK) ^ inv(e, INV_VIA_OUT):
        return False
    cdef uint16_t proto = u16_at(e, E_PROTO)
    return proto == 0 or not ((p.proto != proto) ^ inv(e, INV_PROTO))


cdef inline bint is_local(const uint32_t *addrs, Py_ssize_t n, uint32_t addr) noexcept nogil:
    """Binary search of the sorted local addresses."""
    cdef Py_ssize_t low = 0, high = n, middle
    while low < high:
        middle = (low + high) // 2
        if addrs[middle] < addr:
            low = middle + 1
        else:
            high = middle
    return low < n and addrs[low] == addr


# ---- stateless matches -----------------------------------------------------------------------

cdef inline bint in_range(uint16_t port, const uint8_t *m, size_t lo, bint invert) noexcept nogil:
    return (u16_at(m, lo) <= port <= u16_at(m, lo + 2)) ^ invert


cdef inline bint ports_match(const uint8_t *m, const packet_t *p, uint8_t proto) noexcept nogil:
    # tcp_mt/udp_mt: inclusive source and destination port ranges, each with its invert flag.
    return (p.proto == proto
            and in_range(p.sport, m, P_SPT_LO, (m[P_PORT_INV] & PORT_INV_SRC) != 0)
            and in_range(p.dport, m, P_DPT_LO, (m[P_PORT_INV] & PORT_INV_DST) != 0))


cdef inline bint multiport_match(const uint8_t *m, const packet_t *p) noexcept nogil:
    cdef uint8_t flags = m[MP_FLAGS]
    cdef uint16_t port
    cdef int i
    for i in range(m[MP_COUNT]):
        port = u16_at(m, MP_PORTS + 2 * i)
        if ((flags & MP_SRC) and p.sport == port) or ((flags & MP_DST) and p.dport == port):
            return m[MP_INVERT] == 0
    return m[MP_INVERT] != 0


cdef inline bint physdev_match(const uint8_t *m) noexcept nogil:
    # physdev_mt on a packet without bridge info: every option used must be inverted.
    return (m[PHYSDEV_BITMASK] & ~m[PHYSDEV_INVERT]) == 0


cdef inline bint ipvs_match(const uint8_t *m) noexcept nogil:
    # ipvs_mt with skb->ipvs_property 0 (no packet here has been through IPVS): a lone --ipvs
    # is that property XOR its invert bit; with any other option the match fails outright.
    return m[IPVS_BITMASK] == IPVS_PROPERTY and (m[IPVS_INVERT] & IPVS_PROPERTY) != 0


# ---- ipset keys (ip_set_get_ip4_port and the hash types' kadt, network byte order) ------------


cdef inline bint from_source(uint8_t flags, int dim) noexcept nogil:
    return (flags & (1 << dim)) != 0


cdef inline uint32_t set_addr(const packet_t *p, uint8_t flags, int dim) noexcept nogil:
    return p.src if from_source(flags, dim) else p.dst


cdef inline uint16_t set_port(const packet_t *p, uint8_t flags, int dim) noexcept nogil:
    # get_port: only these protocols carry ports; any other keeps the element's port 0.
    if not (p.proto == IPPROTO_TCP or p.proto == IPPROTO_UDP or p.proto == IPPROTO_SCTP
            or p.proto == IPPROTO_UDPLITE):
        return 0
    return p.sport if from_source(flags, dim) else p.dport


cdef inline void pack_set_key(uint8_t *key, int set_type, uint8_t flags,
                              const packet_t *p) noexcept nogil:
    """The element a hash type's kadt builds, laid out as kernels.layout.ipset_key_* packs it."""
    memset(key, 0, SET_KEY_MAX)
    hashing.put_be32(key, set_addr(p, flags, 1))
    if set_type == SETTYPE_IP_PORT:
        hashing.put_be16(key + 4, set_port(p, flags, 2))
        key[6] = p.proto
    elif set_type == SETTYPE_IP_PORT_IP or set_type == SETTYPE_IP_PORT_NET:
        hashing.put_be32(key + 4, set_addr(p, flags, 3))
        hashing.put_be16(key + 8, set_port(p, flags, 2))
        if set_type == SETTYPE_IP_PORT_IP:
            key[10] = p.proto
        else:  # a host address: cidr - 1 of a /32 (the set masks it for each prefix it holds)
            key[10] = 31
            key[11] = p.proto


# ---- targets ---------------------------------------------------------------------------------

cdef inline bint run_target(const uint8_t *t, result_t *r) noexcept nogil:
    """An extension target; True means XT_CONTINUE (go on with the next entry)."""
    cdef uint8_t kind = t[X_KIND]
    if kind == TARGET_MARK:
        r.mark = (r.mark & ~u32_at(t, T_MARK_MASK)) ^ u32_at(t, T_MARK_VALUE)
        return True
    if kind == TARGET_DNAT or kind == TARGET_SNAT:
        r.verdict = V_DNAT if kind == TARGET_DNAT else V_SNAT
        r.dnat_ip = u32_at(t, T_NAT_IP)
        r.dnat_port = u16_at(t, T_NAT_PORT)
    elif kind == TARGET_MASQUERADE:
        r.verdict = V_MASQUERADE
    elif kind == TARGET_REJECT:
        r.verdict = V_REJECT
    else:  # ERROR: the kernel's xt_error target drops (only a corrupt table reaches one)
        r.verdict = V_DROP
    return False


def timer_overhead_ns(int samples=10000) -> int:
    """Median cost of an empty region timed like run()'s per-packet ``ns``, to subtract."""
    cdef int64_t[::1] spans = np.zeros(max(samples, 1), dtype=np.int64)
    cdef int64_t start
    cdef Py_ssize_t i
    with nogil:
        for i in range(spans.shape[0]):
            start = now_ns()
            spans[i] = now_ns() - start
    return int(np.median(spans))


# Both classes turn nonecheck off: `self` is never None in its own methods, and with the check
# (debug builds) Cython rejects `self.attr += 1` without the GIL.
@cython.nonecheck(False)
cdef class RecentLists:
    """xt_recent's tables: per --name, an LRU list (least recently updated first) of at most
    RECENT_LIST_TOT source addresses with their last-seen time.

    All lists share one pool of slots linked by index (-1 ends a list), grown by doubling, so
    memory follows the addresses actually recorded: kube-proxy's ClientIP affinity has one
    name per endpoint, and most of them stay empty.
    """

    def __init__(self, int n_lists):
        self.oldest = np.full(n_lists, -1, dtype=np.int32)
        self.newest = np.full(n_lists, -1, dtype=np.int32)
        self.count = np.zeros(n_lists, dtype=np.int32)
        self.free = -1
        self.used = 0
        self.addr = np.zeros(16, dtype=np.uint32)
        self.seen = np.zeros(16, dtype=np.uint32)
        self.prev = np.zeros(16, dtype=np.int32)
        self.next = np.zeros(16, dtype=np.int32)

    def grow(self, Py_ssize_t capacity) -> None:
        self.addr = grown(self.addr, capacity)
        self.seen = grown(self.seen, capacity)
        self.prev = grown(self.prev, capacity)
        self.next = grown(self.next, capacity)

    cdef int32_t find(self, int table, uint32_t addr) noexcept nogil:
        cdef int32_t slot = self.oldest[table]
        while slot >= 0 and self.addr[slot] != addr:
            slot = self.next[slot]
        return slot

    cdef void unlink(self, int table, int32_t slot) noexcept nogil:
        if self.prev[slot] >= 0:
            self.next[self.prev[slot]] = self.next[slot]
        else:
            self.oldest[table] = self.next[slot]
        if self.next[slot] >= 0:
            self.prev[self.next[slot]] = self.prev[slot]
        else:
            self.newest[table] = self.prev[slot]

    cdef void append(self, int table, int32_t slot) noexcept nogil:
        self.prev[slot] = self.newest[table]
        self.next[slot] = -1
        if self.newest[table] >= 0:
            self.next[self.newest[table]] = slot
        else:
            self.oldest[table] = slot
        self.newest[table] = slot

    cdef void touch(self, int table, int32_t slot, uint32_t now) noexcept nogil:
        # recent_entry_update: a new time stamp, and the entry moves to the tail of the list.
        self.seen[slot] = now
        self.unlink(table, slot)
        self.append(table, slot)

    cdef void insert(self, int table, uint32_t addr, uint32_t now) noexcept nogil:
        # recent_entry_init: a full list first drops its least recently updated entry.
        cdef int32_t slot
        if self.count[table] >= RECENT_LIST_TOT:
            slot = self.oldest[table]
            self.unlink(table, slot)
        else:
            slot = self.take_slot()
            self.count[table] += 1
        self.addr[slot] = addr
        self.seen[slot] = now
        self.append(table, slot)

    cdef int32_t take_slot(self) noexcept nogil:
        cdef int32_t slot = self.free
        if slot >= 0:
            self.free = self.next[slot]
            return slot
        if self.used == self.addr.shape[0]:
            with gil:  # rare (the pool doubles), and no pointer into the pool is held here
                self.grow(2 * self.used)
        self.used += 1
        return self.used - 1

    cdef void remove(self, int table, int32_t slot) noexcept nogil:
        self.unlink(table, slot)
        self.count[table] -= 1
        self.next[slot] = self.free
        self.free = slot

    cdef void reap(self, int table, uint32_t now, uint32_t seconds, int32_t working,
                   bint updating) noexcept nogil:
        # recent_entry_reap: only the LRU head is examined, and never the entry being updated.
        cdef int32_t oldest = self.oldest[table]
        if oldest == working and updating:
            return
        if <uint32_t>(now - self.seen[oldest]) > seconds:
            self.remove(table, oldest)


def grown(old, Py_ssize_t capacity):
    """A zeroed array of ``capacity`` that starts with the contents of ``old``."""
    old = np.asarray(old)
    array = np.zeros(capacity, dtype=old.dtype)
    array[:len(old)] = old
    return array


@cython.nonecheck(False)
cdef class Table:
    """One loaded table (nat, filter, ...): the blob plus the kernel's per-table state.

    Like one CPU's view in the kernel (one jump stack, one RNG), a Table serves one thread.
    """

    def __init__(self, blob, hook_entry, underflow, int stacksize, int n_entries, local_addrs,
                 int n_recent=0, int n_nfacct=0, uint64_t seed=0, sets=None, set_names=()):
        blob = np.ascontiguousarray(blob, dtype=np.uint8)
        self.blob = blob
        self.hook_entry = np.array(hook_entry, dtype=np.int32).reshape(5)
        self.underflow = np.array(underflow, dtype=np.int32).reshape(5)
        self._hook_entry = self.hook_entry
        self._underflow = self.underflow
        self.stacksize = stacksize
        self.n_entries = n_entries
        self.jumpstack = np.zeros(max(stacksize, 1), dtype=np.int32)
        self.counters = np.zeros((n_entries, 2), dtype=np.uint64)
        self.nfacct_counters = np.zeros((n_nfacct, 2), dtype=np.uint64)
        self._counters = self.counters
        self._nfacct = self.nfacct_counters
        # Sorted and unique: the kernel answers "is this address local" from a routing table,
        # not a scan, and IPVS mode binds every service VIP to the node. 0.0.0.0 keeps the array
        # non-empty; addr_type classes it as broadcast before it searches.
        self.local_addrs = np.unique(np.append(np.asarray(local_addrs, dtype=np.uint32), np.uint32(0)))
        self.recent = RecentLists(n_recent)
        self.rng_state = seed
        self._sets, types = table_sets(set_names, sets, hashset)
        self._set_addrs = np.array([<uintptr_t><PyObject *>s for s in self._sets], dtype=np.uintp)
        self._set_types = np.array(types, dtype=np.uint8)
        self._set_dims = np.array([L.SETTYPE_DIMENSIONS[t] for t in types], dtype=np.uint8)
        check_blob(blob, self.hook_entry, self.underflow, n_entries, n_recent, n_nfacct,
                   len(self._sets))

    @classmethod
    def from_compiled(cls, compiled, local_addrs, seed=0, sets=None):
        """A Table for a kernels.blob.CompiledTable; ``sets`` are its ``-m set`` sets, aligned
        with ``compiled.set_names`` (kernels.ipsets.build_sets)."""
        return cls(compiled.blob, compiled.hook_entry, compiled.underflow, compiled.stacksize,
                   compiled.n_entries, local_addrs, len(compiled.recent_names),
                   len(compiled.nfacct_names), seed, sets, compiled.set_names)

    def reset_counters(self) -> None:
        self.counters[:] = 0
        self.nfacct_counters[:] = 0

    def reseed(self, uint64_t seed) -> None:
        self.rng_state = seed

    def run(self, const packet_t[::1] packets, int hook, result_t[::1] results,
            int64_t[::1] ns=None) -> None:
        """Walk every packet from ``hook``; fill ``results`` and add walk times into ``ns``."""
        if not 0 <= hook < 5 or self._hook_entry[hook] < 0:
            raise ValueError(f"table has no hook {hook}")
        cdef Py_ssize_t n = packets.shape[0], i
        if results.shape[0] < n or (ns is not None and ns.shape[0] < n):
            raise ValueError("results and ns need one slot per packet")
        cdef bint timed = ns is not None, slowed = _test_slowed_walk
        cdef int64_t start = 0
        with nogil:
            for i in range(n):
                if timed:
                    start = now_ns()
                self.walk(&packets[i], hook, &results[i])
                if slowed:
                    match_headers_again(&self.blob[0], self.blob.shape[0], self._hook_entry[hook],
                                        &packets[i], results[i].entries_visited)
                if timed:
                    ns[i] += now_ns() - start

    # ---- the walk (ipt_do_table) ------------------------------------------------------------

    cdef void walk(self, const packet_t *p, int hook, result_t *r) noexcept nogil:
        cdef const uint8_t *base = &self.blob[0]
        cdef const uint8_t *e
        cdef const uint8_t *t
        cdef int32_t *stack = &self.jumpstack[0]
        cdef int stackidx = 0
        cdef int32_t off = self._hook_entry[hook], v, next_off
        memset(r, 0, sizeof(result_t))
        r.mark = p.mark
        while True:
            e = base + off
            next_off = off + u16_at(e, E_NEXT_OFFSET)
            r.entries_visited += 1
            r.bytes_touched += ENTRY_SIZE
            if not (ip_packet_match(e, p) and self.matches(e, p, r)):
                off = next_off
                continue
            self.add_counter(e, p.length)
            t = e + u16_at(e, E_TARGET_OFFSET)
            r.bytes_touched += u16_at(t, X_SIZE)
            if t[X_KIND] != TARGET_STANDARD:
                r.target_calls += 1
                if not self.target(t, r):
                    return
                off = next_off
                continue
            v = i32_at(t, T_VERDICT)
            if v >= 0:
                if v != next_off:
                    if not (e[E_FLAGS] & F_GOTO):
                        if stackidx >= self.stacksize:
                            r.verdict = V_DROP
                            return
                        stack[stackidx] = off
                        stackidx += 1
                    r.jumps += 1
                off = v
            elif v == XT_RETURN:
                if stackidx == 0:
                    off = self._underflow[hook]
                else:
                    stackidx -= 1
                    off = stack[stackidx] + u16_at(base + stack[stackidx], E_NEXT_OFFSET)
            else:
                r.verdict = V_ACCEPT if v == VERDICT_ACCEPT else V_DROP
                return

    cdef void add_counter(self, const uint8_t *e, uint32_t length) noexcept nogil:
        cdef uint32_t row = u32_at(e, E_RULE_INDEX)
        self._counters[row, 0] += 1
        self._counters[row, 1] += length

    cdef bint target(self, const uint8_t *t, result_t *r) noexcept nogil:
        """An extension target (True: XT_CONTINUE); a method so that iptables-nft's compat
        expressions (kernels/nftables.pyx) reach it through this module's C API."""
        return run_target(t, r)

    cdef bint matches(self, const uint8_t *e, const packet_t *p, result_t *r) noexcept nogil:
        cdef const uint8_t *m = e + ENTRY_SIZE
        cdef int i
        for i in range(u16_at(e, E_MATCH_COUNT)):
            r.match_calls += 1
            r.bytes_touched += u16_at(m, X_SIZE)
            if not self.match(m, p, r):
                return False
            m += u16_at(m, X_SIZE)
        return True

    cdef bint match(self, const uint8_t *m, const packet_t *p, result_t *r) noexcept nogil:
        cdef uint8_t kind = m[X_KIND]
        cdef uint16_t acct
        if kind == MATCH_COMMENT:
            return True
        if kind == MATCH_TCP:
            return ports_match(m, p, IPPROTO_TCP)
        if kind == MATCH_UDP:
            return ports_match(m, p, IPPROTO_UDP)
        if kind == MATCH_SCTP:
            return ports_match(m, p, IPPROTO_SCTP)
        if kind == MATCH_STATISTIC:
            r.rng_draws += 1
            return (((hashing.rng_u32(&self.rng_state) & 0x7FFFFFFF) < u32_at(m, STAT_P31))
                    ^ (m[STAT_INVERT] != 0))
        if kind == MATCH_MARK:
            return ((r.mark & u32_at(m, MARK_MASK)) == u32_at(m, MARK_VALUE)) ^ (m[MARK_INVERT] != 0)
        if kind == MATCH_CONNTRACK:
            return ((p.ctstate & u16_at(m, CT_STATE_MASK)) != 0) ^ (m[CT_INVERT] != 0)
        if kind == MATCH_ADDRTYPE:
            return self.addrtype_match(m, p)
        if kind == MATCH_RECENT:
            return self.recent_match(m, p)
        if kind == MATCH_NFACCT:
            acct = u16_at(m, NFACCT_ID)
            self._nfacct[acct, 0] += 1
            self._nfacct[acct, 1] += p.length
            return True
        if kind == MATCH_SET:
            return self.set_match(m, p, r)
        if kind == MATCH_PHYSDEV:
            return physdev_match(m)
        if kind == MATCH_IPVS:
            return ipvs_match(m)
        return multiport_match(m, p)  # the only kind left: check_blob rejects unknown ones

    # ---- set (set_match_v4 -> ip_set_test) ---------------------------------------------------

    cdef bint set_match(self, const uint8_t *m, const packet_t *p, result_t *r) noexcept nogil:
        cdef uint16_t index = u16_at(m, SET_ID)
        cdef uint8_t flags = m[SET_FLAGS]
        # ip_set_test: a match naming fewer dimensions than the set has tests nothing.
        cdef bint found = m[SET_DIM] >= self._set_dims[index] and self.set_test(index, flags, p, r)
        return found ^ ((flags & SET_INVERT) != 0)

    cdef bint set_test(self, uint16_t index, uint8_t flags, const packet_t *p,
                       result_t *r) noexcept nogil:
        # The Table holds a reference to every set, so the borrowed pointers stay valid.
        cdef PyObject *obj = <PyObject *>self._set_addrs[index]
        cdef int set_type = self._set_types[index]
        cdef uint8_t key[SET_KEY_MAX]
        cdef uint32_t compares = 0
        cdef int64_t before
        cdef bint found
        if set_type == SETTYPE_BITMAP_PORT:
            if p.proto != IPPROTO_TCP and p.proto != IPPROTO_UDP:  # ip_set_get_ip_port
                return False
            before = (<BitmapPort>obj).bit_tests
            found = (<BitmapPort>obj).contains(set_port(p, flags, 1))
            r.set_probes += (<BitmapPort>obj).bit_tests - before
            return found
        pack_set_key(key, set_type, flags, p)
        before = (<HashSet>obj).hash_computations
        found = (<HashSet>obj).lookup_one(key, &compares) >= 0
        r.set_probes += (<HashSet>obj).hash_computations - before
        r.set_compares += compares
        return found

    # ---- addrtype (addrtype_mt_v1 with inet_dev_addr_type's classes) -------------------------

    cdef uint16_t addr_type(self, uint32_t addr) noexcept nogil:
        # __inet_dev_addr_type: 0.0.0.0/8 and 255.255.255.255 are broadcast, 224/4 multicast.
        if (addr >> 24) == 0 or addr == 0xFFFFFFFFU:
            return ADDRTYPE_BROADCAST
        if (addr >> 28) == 0xE:
            return ADDRTYPE_MULTICAST
        if (addr >> 24) == 127 or is_local(&self.local_addrs[0], self.local_addrs.shape[0], addr):
            return ADDRTYPE_LOCAL
        return ADDRTYPE_UNICAST

    cdef bint addrtype_match(self, const uint8_t *m, const packet_t *p) noexcept nogil:
        cdef uint16_t source = u16_at(m, AT_SOURCE), dest = u16_at(m, AT_DEST)
        cdef uint8_t flags = m[AT_FLAGS]
        if source and not (((self.addr_type(p.src) & source) != 0) ^ ((flags & ADDRTYPE_INV_SOURCE) != 0)):
            return False
        return not dest or (((self.addr_type(p.dst) & dest) != 0) ^ ((flags & ADDRTYPE_INV_DEST) != 0))

    # ---- recent (recent_mt) -----------------------------------------------------------------

    cdef bint recent_match(self, const uint8_t *m, const packet_t *p) noexcept nogil:
        cdef int table = u16_at(m, RC_TABLE), mode = m[RC_MODE]
        cdef uint32_t seconds = u32_at(m, RC_SECONDS)
        cdef bint ret = m[RC_INVERT] != 0
        cdef int32_t slot = self.recent.find(table, p.src)
        if slot < 0:
            if mode == RECENT_SET:
                self.recent.insert(table, p.src, p.time)
                return not ret
            return ret
        if mode == RECENT_SET:
            ret = not ret
        elif mode == RECENT_REMOVE:
            self.recent.remove(table, slot)
            return not ret
        else:  # --rcheck / --update: seen within `seconds` (0: at any time)
            if seconds == 0 or <uint32_t>(p.time - self.recent.seen[slot]) <= seconds:
                ret = not ret
            if m[RC_REAP]:
                self.recent.reap(table, p.time, seconds, slot, mode == RECENT_UPDATE and ret)
        # As in the kernel, --update refreshes only when the (possibly inverted) result is true.
        if mode == RECENT_SET or (mode == RECENT_UPDATE and ret):
            self.recent.touch(table, slot, p.time)
        return ret


cdef void match_headers_again(const uint8_t *base, Py_ssize_t size, Py_ssize_t off, const packet_t *p,
                              uint32_t entries) noexcept nogil:
    """The test-only slowed walk: ip_packet_match on ``entries`` entries from ``off``, in blob order."""
    global _test_header_matches
    while entries > 0 and off < size:
        _test_header_matches += ip_packet_match(base + off, p)
        off += u16_at(base + off, E_NEXT_OFFSET)
        entries -= 1


# ---- translate_table-like checks: a bad blob must fail here, not crash the nogil walk --------

def check_blob(blob, hook_entry, underflow, n_entries, n_recent, n_nfacct, n_sets=0) -> None:
    """Raise ValueError unless the blob is a well-formed table (offsets, sizes, ids)."""
    cdef const uint8_t[::1] b = blob
    cdef const uint8_t *base = &b[0] if b.shape[0] else NULL
    cdef Py_ssize_t off = 0, size = b.shape[0]
    offsets = set()
    jumps = []
    while off < size:
        if off + ENTRY_SIZE > size or u16_at(base + off, E_NEXT_OFFSET) < ENTRY_SIZE:
            raise ValueError(f"entry at {off} overruns the blob")
        offsets.add(off)
        jumps += check_entry(base + off, off, size, n_entries, n_recent, n_nfacct, n_sets)
        off += u16_at(base + off, E_NEXT_OFFSET)
    for hook in range(5):
        if hook_entry[hook] >= 0 and not {int(hook_entry[hook]), int(underflow[hook])} <= offsets:
            raise ValueError(f"hook {hook}: entry or underflow is not an entry offset")
    if not set(jumps) <= offsets:
        raise ValueError("a jump does not land on an entry")


cdef list check_entry(const uint8_t *e, Py_ssize_t off, Py_ssize_t size, n_entries, n_recent,
                      n_nfacct, n_sets):
    """Check one entry; returns the jump offsets of its standard target (0 or 1 of them)."""
    cdef uint16_t next_offset = u16_at(e, E_NEXT_OFFSET), target_offset = u16_at(e, E_TARGET_OFFSET)
    cdef Py_ssize_t m = ENTRY_SIZE
    if off + next_offset > size or u32_at(e, E_RULE_INDEX) >= n_entries:
        raise ValueError(f"entry at {off}: bad next_offset or rule index")
    if target_offset < ENTRY_SIZE or target_offset + XT_HEADER > next_offset:
        raise ValueError(f"entry at {off}: bad target_offset")
    for _ in range(u16_at(e, E_MATCH_COUNT)):
        kind = e[m + X_KIND]
        if L.MATCH_SIZES.get(kind) != u16_at(e + m, X_SIZE) or m + L.MATCH_SIZES[kind] > target_offset:
            raise ValueError(f"entry at {off}: bad match at +{m}")
        if (kind == MATCH_NFACCT and u16_at(e + m, NFACCT_ID) >= n_nfacct) or (
                kind == MATCH_RECENT and u16_at(e + m, RC_TABLE) >= n_recent):
            raise ValueError(f"entry at {off}: unknown nfacct or recent id")
        if kind == MATCH_SET and u16_at(e + m, SET_ID) >= n_sets:
            raise ValueError(f"entry at {off}: unknown set id {u16_at(e + m, SET_ID)}")
        if kind == MATCH_MULTIPORT and e[m + MP_COUNT] > L.MP_MAX_PORTS:
            raise ValueError(f"entry at {off}: too many multiport ports")
        m += L.MATCH_SIZES[kind]
    kind = e[target_offset + X_KIND]
    if m != target_offset or L.TARGET_SIZES.get(kind) != u16_at(e + target_offset, X_SIZE) or (
            target_offset + L.TARGET_SIZES[kind] > next_offset):
        raise ValueError(f"entry at {off}: bad target")
    if kind != TARGET_STANDARD:
        return []
    verdict = i32_at(e + target_offset, T_VERDICT)
    if verdict < 0 and verdict not in (VERDICT_ACCEPT, VERDICT_DROP, XT_RETURN):
        raise ValueError(f"entry at {off}: unsupported verdict {verdict}")
    return [verdict] if verdict >= 0 else []
