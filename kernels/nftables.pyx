"""nft_do_chain over kernels/nftblob.py's rule blobs (kernel-internals §3, §6.4).

``Ruleset.run(packets, hook, results, ns=None)`` runs, for each packet, every base chain
registered on ``hook`` in priority order, as the kernel's hook traversal does: an accept
(policy, ``accept``, ``dnat`` or ``masquerade``) ends that base chain only, and the next base
chain on the hook still runs (filter-prerouting-pre-dnat at -110, then nat-prerouting at
-100); drop and reject end the traversal. A DNAT rewrites the packet's destination for the
chains after it. nat chains run only for a first packet (ctstate NEW): the kernel's NAT hook
consults them only for a connection without a NAT binding yet.

Within a chain: a rule is an 8-byte nft_rule_dp header and its 16-byte expression slots; the
expressions run left to right until one fails (NFT_BREAK: next rule) or sets a verdict. jump
pushes the next rule on the 16-deep stack (a 17th level drops the packet, the kernel's
WARN_ON), goto does not push, return or the chain's is_last marker pops, and an empty stack
falls back to the base chain's policy.

``apply(patch)`` commits a transaction compiled by kernels.nftblob.compile_changes (the changed
chains, anonymous maps and set elements only; see kernels/nftblob.py).

Named sets are kernels.hashset HashSet(policy="rhash") looked up through its C entry point
``lookup_one`` without the GIL; a dynamic set with a timeout stores each element's expiry
(packet time + timeout, seconds) as its value and a lookup misses an expired element
(nft_rhash_cmp). Adding a new element to a dynamic set takes the GIL (HashSet's insert may
grow its arrays), as the kernel's dynset allocates. Anonymous maps are HashSet(policy=
"hash_fast") (4-byte keys, numgen's) or "hash", laid out by nftblob.anon_map_sets and looked up
through the same ``lookup_one``; numgen is ``reciprocal_scale(rng_u32, mod) + offset``. ``fib … type local``
is true for ``local_addrs`` only: 127.0.0.0/8 is not local here, the convention of kube-proxy's
packet-flow tracer (its rules exclude 127.0.0.0/8 explicitly anyway).

Counters per packet (layout.NFT_RESULT_DTYPE): ``entries_visited`` (rules started),
``expressions``, ``set_lookups``, ``bucket_entries_compared``, ``jumps`` (jump and goto),
``rng_draws``. The pure-Python twin is kernels.reference.nftables (it adds ``walk_one`` for
the tracer); both give identical results and counters.
"""
import numpy as np

cimport cython
from cpython.ref cimport PyObject
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.string cimport memset
from kernels.clock cimport now_ns

from kernels cimport hashing
from kernels.hashset cimport HashSet
from kernels.records cimport packet_t, result_t
from kernels.iptables cimport Table as XtTable  # iptables-nft's nft_compat (xt_call)
from kernels import hashset
from kernels import layout as L
from kernels.nftblob import anon_map_sets, append_grown, compile_table, compiled_bytes, modelled_bytes

# C-level copies of kernels/layout.py; tests check LAYOUT_CONSTANTS against it.
cdef enum:
    RULE_DP_BYTES = 8
    OP_BYTES = 16
    N_REGS = 16
    JUMP_STACK_SIZE = 16
    OP_PAYLOAD = 1
    OP_META = 2
    OP_CMP = 3
    OP_RANGESET = 4
    OP_LOOKUP = 5
    OP_HMAP_VMAP = 6
    OP_NUMGEN = 7
    OP_FIB_LOCAL = 8
    OP_CT_STATE = 9
    OP_MARK_SET = 10
    OP_DNAT = 11
    OP_MASQUERADE = 12
    OP_DYNSET = 13
    OP_COUNTER = 14
    OP_VERDICT = 15
    OP_XT_MATCH = 16
    OP_XT_TARGET = 17
    F_NEQ = 0x01
    F_VMAP = 0x02
    F_TIMEOUT = 0x04
    FIELD_SADDR = 1
    FIELD_DADDR = 2
    FIELD_SPORT = 3
    FIELD_DPORT = 4
    META_L4PROTO = 1
    V_NONE = 0
    V_ACCEPT = 1
    V_DROP = 2
    V_REJECT = 3
    V_JUMP = 4
    V_GOTO = 5
    V_RETURN = 6
    V_CONTINUE = 7
    V_BREAK = 8
    CT_NEW = 0x08
    R_ACCEPT = 0
    R_DROP = 1
    R_REJECT = 2
    R_DNAT = 3
    R_MASQUERADE = 5

LAYOUT_CONSTANTS = {
    "NFT_RULE_DP_BYTES": RULE_DP_BYTES, "NFT_OP_BYTES": OP_BYTES, "NFT_REGS": N_REGS,
    "NFT_JUMP_STACK_SIZE": JUMP_STACK_SIZE, "NFT_OP_PAYLOAD": OP_PAYLOAD, "NFT_OP_META": OP_META,
    "NFT_OP_CMP": OP_CMP, "NFT_OP_RANGESET": OP_RANGESET, "NFT_OP_LOOKUP": OP_LOOKUP,
    "NFT_OP_HMAP_VMAP": OP_HMAP_VMAP, "NFT_OP_NUMGEN": OP_NUMGEN, "NFT_OP_FIB_LOCAL": OP_FIB_LOCAL,
    "NFT_OP_CT_STATE": OP_CT_STATE, "NFT_OP_MARK_SET": OP_MARK_SET, "NFT_OP_DNAT": OP_DNAT,
    "NFT_OP_MASQUERADE": OP_MASQUERADE, "NFT_OP_DYNSET": OP_DYNSET, "NFT_OP_COUNTER": OP_COUNTER,
    "NFT_OP_VERDICT": OP_VERDICT, "NFT_OP_XT_MATCH": OP_XT_MATCH, "NFT_OP_XT_TARGET": OP_XT_TARGET,
    "NFT_F_NEQ": F_NEQ, "NFT_F_VMAP": F_VMAP,
    "NFT_F_TIMEOUT": F_TIMEOUT, "NFT_FIELD_SADDR": FIELD_SADDR, "NFT_FIELD_DADDR": FIELD_DADDR,
    "NFT_FIELD_SPORT": FIELD_SPORT, "NFT_FIELD_DPORT": FIELD_DPORT, "NFT_META_L4PROTO": META_L4PROTO,
    "NFT_V_NONE": V_NONE, "NFT_V_ACCEPT": V_ACCEPT, "NFT_V_DROP": V_DROP, "NFT_V_REJECT": V_REJECT,
    "NFT_V_JUMP": V_JUMP, "NFT_V_GOTO": V_GOTO, "NFT_V_RETURN": V_RETURN,
    "NFT_V_CONTINUE": V_CONTINUE, "NFT_V_BREAK": V_BREAK, "CT_NEW": CT_NEW,
    "V_ACCEPT": R_ACCEPT, "V_DROP": R_DROP, "V_REJECT": R_REJECT, "V_DNAT": R_DNAT,
    "V_MASQUERADE": R_MASQUERADE,
}

# One NFT_RESULT_DTYPE record.
cdef packed struct nft_result_t:
    uint8_t verdict
    uint8_t masquerade
    uint16_t dnat_port
    uint32_t dnat_ip
    uint32_t mark
    uint32_t entries_visited
    uint32_t expressions
    uint32_t set_lookups
    uint32_t bucket_entries_compared
    uint32_t jumps
    uint32_t rng_draws

# The packet as the rules see it (a DNAT rewrites dst/dport) and the 32-bit registers.
cdef struct walk_t:
    uint32_t src
    uint32_t dst
    uint16_t sport
    uint16_t dport
    uint8_t proto
    uint16_t ctstate
    uint32_t time
    bint dnat
    uint8_t regs[N_REGS * 4]
    const packet_t *packet  # as it arrived, for nft_compat's xt extensions (xt_call)


def struct_layout() -> dict:
    """{"result": (sizeof, {field: offset})} of the C struct, to check NFT_RESULT_DTYPE."""
    cdef nft_result_t r
    cdef char *rb = <char *>&r
    return {"result": (sizeof(nft_result_t), {
        "verdict": <char *>&r.verdict - rb, "masquerade": <char *>&r.masquerade - rb,
        "dnat_port": <char *>&r.dnat_port - rb, "dnat_ip": <char *>&r.dnat_ip - rb,
        "mark": <char *>&r.mark - rb, "entries_visited": <char *>&r.entries_visited - rb,
        "expressions": <char *>&r.expressions - rb, "set_lookups": <char *>&r.set_lookups - rb,
        "bucket_entries_compared": <char *>&r.bucket_entries_compared - rb,
        "jumps": <char *>&r.jumps - rb, "rng_draws": <char *>&r.rng_draws - rb})}


# ---- leaf helpers ----------------------------------------------------------------------------

cdef inline uint16_t u16_at(const uint8_t *p) noexcept nogil:
    return p[0] | (<uint16_t>p[1] << 8)


cdef inline void store_be(uint8_t *reg, uint32_t value, int width) noexcept nogil:
    # A register holds a selector in network order, zero padded to 4 bytes.
    cdef int j
    for j in range(4):
        reg[j] = <uint8_t>(value >> (8 * (width - 1 - j))) if j < width else 0


cdef inline uint32_t load_be(const uint8_t *reg, int width) noexcept nogil:
    cdef uint32_t value = 0
    cdef int j
    for j in range(width):
        value = (value << 8) | reg[j]
    return value


cdef inline void store_le(uint8_t *reg, uint32_t value) noexcept nogil:
    reg[0] = <uint8_t>value
    reg[1] = <uint8_t>(value >> 8)
    reg[2] = <uint8_t>(value >> 16)
    reg[3] = <uint8_t>(value >> 24)


cdef inline int verdict_kind(uint32_t verdict) noexcept nogil:
    return verdict >> 24 if verdict > V_BREAK else verdict


# nonecheck off: `self` is never None in its own methods, and with the check (debug builds)
# Cython rejects `self.attr += 1` without the GIL.
@cython.final
@cython.nonecheck(False)
cdef class Ruleset:
    """One compiled nftables table plus its sets; like one CPU's view, it serves one thread."""

    cdef const uint8_t[::1] blob
    cdef const int32_t[::1] chain_offset
    cdef const int32_t[::1] base_hook
    cdef const int32_t[::1] base_chain
    cdef const uint8_t[::1] base_policy
    cdef const uint8_t[::1] base_nat
    cdef const int32_t[::1] range_base
    cdef const int32_t[::1] range_count
    cdef const uint32_t[::1] range_lo
    cdef const uint32_t[::1] range_hi
    cdef const uint32_t[::1] local_addrs
    # the named sets (kept alive here) and their addresses for the nogil walk
    cdef uintptr_t[::1] _set_addrs
    cdef uintptr_t[::1] _hmap_addrs  # the anonymous maps' HashSets, likewise
    cdef object _hmap_buffer  # the array behind _hmap_addrs, with room to grow
    cdef uint64_t rng_state
    cdef uint64_t set_rng
    cdef readonly object compiled
    cdef readonly list sets
    cdef readonly list hmaps
    cdef readonly object xt  # iptables-nft: the legacy Table whose xt extensions compat calls
    cdef uintptr_t _xt_addr

    def __init__(self, compiled, local_addrs=(), uint64_t seed=0):
        self.compiled = compiled
        self._bind_arrays()
        self.local_addrs = np.ascontiguousarray(local_addrs, dtype=np.uint32)
        self.rng_state = seed
        self.set_rng = seed ^ 0x5E75
        self.sets = [self._named_set(s) for s in compiled.sets]
        self._set_addrs = np.array([<uintptr_t><PyObject *>hs for hs in self.sets] or [0], dtype=np.uintp)
        self.hmaps = []
        self._hmap_buffer = np.zeros(1, dtype=np.uintp)
        self._add_hmaps(compiled.hmaps)

    def _bind_arrays(self):
        c = self.compiled
        self.blob, self.chain_offset = c.blob, c.chain_offset
        self.base_hook, self.base_chain = c.base_hook, c.base_chain
        self.base_policy, self.base_nat = c.base_policy, c.base_nat
        self.range_base, self.range_count = c.range_base, c.range_count
        self.range_lo, self.range_hi = c.range_lo, c.range_hi

    def _named_set(self, s):
        hs = hashset.HashSet(s.key_len, "rhash", seed=hashing.rng_next_u64(&self.set_rng),
                             data_len=L.NFT_VERDICT_DATA_BYTES if s.is_map else 0)
        values = s.values if not s.timeout else np.full(len(s.keys), s.timeout, dtype=np.uint32)
        if len(s.keys):
            hs.insert(s.keys, values)
        return hs

    def _add_hmaps(self, maps):
        new = anon_map_sets(maps, hashset.HashSet)
        addrs = np.array([<uintptr_t><PyObject *>hs for hs in new], dtype=np.uintp)
        self._hmap_buffer = append_grown(self._hmap_buffer, len(self.hmaps), addrs)
        self.hmaps += new
        self._hmap_addrs = self._hmap_buffer

    def apply(self, patch) -> None:
        """Commit a transaction (kernels.nftblob.compile_changes): the changed chains' blobs,
        new anonymous maps, named-set elements deleted then added. The rhash worker's grow or
        shrink is deferred, as in the kernel: run ``maintain()`` after."""
        self.compiled.apply(patch)
        self._bind_arrays()
        if patch.new_sets:
            self.sets += [self._named_set(s) for s in patch.new_sets]
            self._set_addrs = np.array([<uintptr_t><PyObject *>hs for hs in self.sets], dtype=np.uintp)
        for i, keys in patch.set_deletes:
            self.sets[i].delete(keys)
        for i, keys, values in patch.set_inserts:
            self.sets[i].insert(keys, values)
        if patch.hmaps:
            self._add_hmaps(patch.hmaps)

    @classmethod
    def from_table(cls, table, local_addrs=(), uint64_t seed=0):
        """A Ruleset for a bench.loaders.nftables.Table (compiled with the same seed)."""
        return cls(compile_table(table, seed), local_addrs, seed)

    def attach_xt(self, table) -> None:
        """iptables-nft (bench/loaders/iptables_nft.py): the kernels.iptables.Table whose xt
        matches and targets this table's compat expressions run, with that Table's state."""
        self.xt = <XtTable?>table
        self._xt_addr = <uintptr_t><PyObject *>table

    def reseed(self, uint64_t seed) -> None:
        self.rng_state = seed

    def maintain(self, set_ids=None) -> int:
        """The rhashtable worker's deferred grow/shrink of the named sets ``set_ids`` (default:
        all); returns the elements moved."""
        return sum(self.sets[i].maintain() for i in (range(len(self.sets)) if set_ids is None else set_ids))

    def run(self, const packet_t[::1] packets, int hook, nft_result_t[::1] results,
            int64_t[::1] ns=None) -> None:
        """Every base chain on ``hook`` for each packet; fill ``results``, add times to ``ns``."""
        if not 0 <= hook < 5:
            raise ValueError(f"no hook {hook}")
        cdef Py_ssize_t n = packets.shape[0], i
        if results.shape[0] < n or (ns is not None and ns.shape[0] < n):
            raise ValueError("results and ns need one slot per packet")
        cdef bint timed = ns is not None
        cdef int64_t start = 0
        with nogil:
            for i in range(n):
                if timed:
                    start = now_ns()
                self.traverse_hook(&packets[i], hook, &results[i])
                if timed:
                    ns[i] += now_ns() - start

    # ---- hook traversal and nft_do_chain ---------------------------------------------------

    cdef void traverse_hook(self, const packet_t *p, int hook, nft_result_t *r) noexcept nogil:
        cdef walk_t w
        cdef Py_ssize_t i
        cdef int verdict
        memset(r, 0, sizeof(nft_result_t))
        memset(&w, 0, sizeof(walk_t))
        w.src, w.dst, w.sport, w.dport = p.src, p.dst, p.sport, p.dport
        w.proto, w.ctstate, w.time = p.proto, p.ctstate, p.time
        w.packet = p
        r.mark = p.mark
        for i in range(self.base_hook.shape[0]):
            if self.base_hook[i] != hook or (self.base_nat[i] and not (w.ctstate & CT_NEW)):
                continue
            verdict = self.do_chain(&w, self.base_chain[i], self.base_policy[i], r)
            if verdict == V_DROP or verdict == V_REJECT:
                r.verdict = R_DROP if verdict == V_DROP else R_REJECT
                return
        r.verdict = R_DNAT if w.dnat else R_MASQUERADE if r.masquerade else R_ACCEPT

    cdef int do_chain(self, walk_t *w, int32_t chain, int policy, nft_result_t *r) noexcept nogil:
        cdef const uint8_t *base = &self.blob[0]
        cdef int32_t stack[JUMP_STACK_SIZE]
        cdef int depth = 0
        cdef int32_t off = self.chain_offset[chain]
        cdef uint16_t dlen
        cdef uint32_t verdict
        cdef int kind
        while True:
            dlen = u16_at(base + off)
            if base[off + 2]:  # is_last: the end of the chain
                if depth == 0:
                    return policy
                depth -= 1
                off = stack[depth]
                continue
            r.entries_visited += 1
            verdict = self.eval_rule(w, base + off + RULE_DP_BYTES, dlen, r)
            off += RULE_DP_BYTES + dlen
            kind = verdict_kind(verdict)
            if kind == V_NONE or kind == V_BREAK or kind == V_CONTINUE:
                continue
            if kind == V_ACCEPT or kind == V_DROP or kind == V_REJECT:
                return kind
            if kind == V_RETURN:
                if depth == 0:
                    return policy
                depth -= 1
                off = stack[depth]
                continue
            if kind == V_JUMP:
                if depth >= JUMP_STACK_SIZE:
                    return V_DROP
                stack[depth] = off
                depth += 1
            r.jumps += 1
            off = self.chain_offset[verdict & 0xFFFFFF]

    cdef uint32_t eval_rule(self, walk_t *w, const uint8_t *op, uint16_t dlen,
                            nft_result_t *r) noexcept nogil:
        """The rule's verdict code, V_BREAK when an expression failed, V_NONE else."""
        cdef const uint8_t *end = op + dlen
        cdef uint32_t verdict
        while op < end:
            r.expressions += 1
            verdict = self.eval_expr(w, op, r)
            if verdict != V_NONE:
                return verdict
            op += OP_BYTES
        return V_NONE

    cdef uint32_t eval_expr(self, walk_t *w, const uint8_t *op, nft_result_t *r) noexcept nogil:
        cdef uint8_t *reg = &w.regs[4 * op[1]]
        cdef uint8_t length = op[2], flags = op[3]
        cdef uint32_t a = hashing.load_le32(op + 4), b = hashing.load_le32(op + 8)
        cdef int kind = op[0]
        if kind == OP_PAYLOAD:
            self.load_payload(w, reg, a)
        elif kind == OP_META:
            store_le(reg, w.proto if a == META_L4PROTO else r.mark)
        elif kind == OP_CT_STATE:
            store_le(reg, w.ctstate)
        elif kind == OP_CMP:
            return self.test((hashing.load_le32(reg) & b) == a, flags)
        elif kind == OP_RANGESET:
            return self.test(self.in_ranges(load_be(reg, length), a, r), flags)
        elif kind == OP_LOOKUP:
            return self.lookup(w, reg, length, flags, a, r)
        elif kind == OP_HMAP_VMAP:
            return self.hmap_lookup(reg, length, a, r)
        elif kind == OP_NUMGEN:
            r.rng_draws += 1
            store_le(reg, hashing.reciprocal_scale(hashing.rng_u32(&self.rng_state), a) + b)
        elif kind == OP_FIB_LOCAL:
            return self.test(self.is_local(w.src if a == FIELD_SADDR else w.dst), flags)
        elif kind == OP_MARK_SET:
            r.mark = (r.mark & a) ^ b
        elif kind == OP_DNAT:
            w.dnat = True
            r.dnat_ip = w.dst = a
            r.dnat_port = w.dport = b if b else w.dport
            return <uint32_t>V_ACCEPT << 24
        elif kind == OP_MASQUERADE:
            r.masquerade = True
            return <uint32_t>V_ACCEPT << 24
        elif kind == OP_DYNSET:
            self.dynset(w, reg, length, a, b, r)
        elif kind == OP_XT_MATCH or kind == OP_XT_TARGET:
            return self.xt_call(w, hashing.load_le32(op + 12), kind == OP_XT_TARGET, r)
        elif kind == OP_VERDICT:
            return a
        return V_NONE

    cdef inline uint32_t test(self, bint matched, uint8_t flags) noexcept nogil:
        # An expression that does not match breaks the rule (NFT_BREAK).
        return V_BREAK if matched == ((flags & F_NEQ) != 0) else V_NONE

    cdef inline void load_payload(self, walk_t *w, uint8_t *reg, uint32_t field) noexcept nogil:
        if field == FIELD_SADDR:
            store_be(reg, w.src, 4)
        elif field == FIELD_DADDR:
            store_be(reg, w.dst, 4)
        elif field == FIELD_SPORT:
            store_be(reg, w.sport, 2)
        else:
            store_be(reg, w.dport, 2)

    cdef inline bint is_local(self, uint32_t addr) noexcept nogil:
        cdef Py_ssize_t i
        for i in range(self.local_addrs.shape[0]):
            if self.local_addrs[i] == addr:
                return True
        return False

    # ---- sets and maps ---------------------------------------------------------------------

    cdef inline int32_t find(self, uint32_t s, const uint8_t *key, nft_result_t *r) noexcept nogil:
        """The named set's element holding ``key`` or -1 (HashSet's C entry point)."""
        cdef uint32_t compares = 0
        cdef int32_t e = (<HashSet><PyObject *>self._set_addrs[s]).lookup_one(key, &compares)
        r.set_lookups += 1
        r.bucket_entries_compared += compares
        return e

    cdef uint32_t lookup(self, walk_t *w, const uint8_t *key, uint8_t length, uint8_t flags,
                         uint32_t s, nft_result_t *r) noexcept nogil:
        cdef int32_t e = self.find(s, key, r)
        cdef uint32_t value = (<HashSet><PyObject *>self._set_addrs[s])._values[e] if e >= 0 else 0
        cdef bint found = e >= 0 and (not (flags & F_TIMEOUT) or value > w.time)
        if found == ((flags & F_NEQ) != 0):
            return V_BREAK
        return value if flags & F_VMAP else V_NONE

    cdef void dynset(self, walk_t *w, const uint8_t *key, uint8_t length, uint32_t s,
                     uint32_t timeout, nft_result_t *r) noexcept nogil:
        cdef int32_t e = self.find(s, key, r)
        cdef uint32_t expires = w.time + timeout
        if e >= 0:
            (<HashSet><PyObject *>self._set_addrs[s])._values[e] = expires
            return
        with gil:
            self.sets[s].insert(np.frombuffer(key[:length], dtype=np.uint8).reshape(1, length),
                                np.array([expires], dtype=np.uint32))

    cdef uint32_t hmap_lookup(self, const uint8_t *key, uint8_t length, uint32_t m,
                              nft_result_t *r) noexcept nogil:
        # nft_hash_fast_lookup (4-byte keys) / nft_hash_lookup, through HashSet's C entry point.
        cdef uint32_t compares = 0
        cdef int32_t e = (<HashSet><PyObject *>self._hmap_addrs[m]).lookup_one(key, &compares)
        r.set_lookups += 1
        r.bucket_entries_compared += compares
        if e < 0:
            return V_BREAK
        return (<HashSet><PyObject *>self._hmap_addrs[m]).values_p[e]

    cdef bint in_ranges(self, uint32_t value, uint32_t s, nft_result_t *r) noexcept nogil:
        cdef int32_t i, first = self.range_base[s]
        r.set_lookups += 1
        for i in range(first, first + self.range_count[s]):
            r.bucket_entries_compared += 1
            if self.range_lo[i] <= value <= self.range_hi[i]:
                return True
        return False

    # ---- iptables-nft: nft_compat's xt match and target expressions ------------------------

    cdef uint32_t xt_call(self, walk_t *w, uint32_t at, bint target, nft_result_t *r) noexcept nogil:
        """The legacy kernel's own xt extension at byte ``at`` of the attached Table's blob, on
        the packet as this rule sees it (nft_compat builds an xt_action_param the same way).
        With no Table attached the extension is missing: the packet is dropped."""
        if not self._xt_addr:
            return <uint32_t>V_DROP << 24
        cdef packet_t p = w.packet[0]
        cdef result_t x
        cdef bint matched
        cdef const uint8_t *data = &(<XtTable><PyObject *>self._xt_addr).blob[at]
        memset(&x, 0, sizeof(result_t))
        p.src, p.dst, p.sport, p.dport = w.src, w.dst, w.sport, w.dport
        p.mark = x.mark = r.mark
        if not target:
            matched = (<XtTable><PyObject *>self._xt_addr).match(data, &p, &x)
            r.rng_draws += x.rng_draws
            r.set_lookups += x.set_probes
            r.bucket_entries_compared += x.set_compares
            return V_NONE if matched else V_BREAK
        if (<XtTable><PyObject *>self._xt_addr).target(data, &x):  # XT_CONTINUE: MARK
            r.mark = x.mark
            return V_NONE
        if x.verdict == R_DNAT:
            w.dnat = True
            r.dnat_ip = w.dst = x.dnat_ip
            r.dnat_port = w.dport = x.dnat_port if x.dnat_port else w.dport
        elif x.verdict == R_MASQUERADE:
            r.masquerade = True
        else:
            return <uint32_t>(V_REJECT if x.verdict == R_REJECT else V_DROP) << 24
        return <uint32_t>V_ACCEPT << 24

    # ---- memory ----------------------------------------------------------------------------

    def modelled_bytes(self) -> int:
        """Kernel memory (see kernels.nftblob.modelled_bytes)."""
        return modelled_bytes(self.compiled, self.sets, self.hmaps)

    def model_bytes(self) -> int:
        """Bytes of this model's own tables: the blob, the compiled arrays and the sets."""
        return compiled_bytes(self.compiled) + sum(hs.model_bytes() for hs in self.sets + self.hmaps)
