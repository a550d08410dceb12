"""Pure-Python twin of kernels/nftables.pyx: nft_do_chain over kernels/nftblob.py's rule blobs.

Same API, results and counters as the Cython kernel (kernel-internals §3, §6.4).

``Ruleset.run(packets, hook, results, ns=None)`` runs, for each packet, every base chain
registered on ``hook`` in priority order, as the kernel's hook traversal does: an accept
(policy, ``accept``, ``dnat`` or ``masquerade``) ends that base chain only, and the next base
chain on the hook still runs (filter-prerouting-pre-dnat at -110, then nat-prerouting at
-100); drop and reject end the traversal. A DNAT rewrites the packet's destination for the
chains after it. nat chains run only for a first packet (ctstate NEW), because the kernel's NAT
hook consults them only for a connection without a NAT binding yet.

Within a chain (nft_do_chain): each rule's expressions run left to right until one fails
(NFT_BREAK: next rule) or sets a verdict. jump pushes the next rule on the 16-deep stack (a
17th level drops the packet, as the kernel's WARN_ON does), goto does not push, return or the
end of a chain pops, and an empty stack falls back to the base chain's policy.

``apply(patch)`` commits a transaction compiled by kernels.nftblob.compile_changes.

Sets: the named ones are HashSet(policy="rhash") (12-byte keys for service-ips); a dynamic set
with a timeout (``update @affinity-… { ip saddr }``) stores each element's expiry (packet time
+ timeout, seconds) as its value, and a lookup misses an expired element, as nft_rhash_cmp
does. Elements loaded from the text count as added at time 0. Anonymous maps are HashSet(policy=
"hash_fast") (4-byte keys, numgen's) or "hash", built by kernels.nftblob.anon_map_sets; numgen is ``reciprocal_scale(rng_u32, mod) + offset``.

``fib saddr|daddr type local`` is true for the node addresses given as ``local_addrs``, and
for nothing else: 127.0.0.0/8 is not treated as local, the convention of kube-proxy's own
packet-flow tracer (kube-proxy's rules exclude it with ``ip daddr != 127.0.0.0/8`` anyway).

Per-packet counters (layout.NFT_RESULT_DTYPE): ``entries_visited`` (rules started),
``expressions`` evaluated, ``set_lookups`` (named, anonymous and dynamic-set updates),
``bucket_entries_compared`` (hash chain entries, or anonymous-set ranges, compared),
``rng_draws`` and ``jumps`` (jump and goto, vmap ones included).

Only the twin has ``walk_one``, for the tracer: ``trace`` receives (chain, handle, outcome)
per rule started (outcome: layout.NFT_V_*, NFT_V_BREAK when an expression failed, NFT_V_NONE
when the rule ran to its end), and ``decide(N) -> index`` replaces numgen's draw.
"""
from __future__ import annotations

import struct
import time

import numpy as np

from kernels import layout as L
from kernels.nftblob import CompiledNft, NftPatch, anon_map_sets, compile_table, compiled_bytes, modelled_bytes
from kernels.reference.hashing import SplitMix64, reciprocal_scale
from kernels.reference.hashset import HashSet

_HEADER = struct.Struct("<HBxI")
_OP = struct.Struct("<BBBBIII")
_FINAL = {L.NFT_V_DROP: L.V_DROP, L.NFT_V_REJECT: L.V_REJECT}


class _Walk:
    """One packet on its way through the hook: the fields rules read and write, and counters."""

    __slots__ = ("src", "dst", "sport", "dport", "proto", "ctstate", "mark", "time", "regs",
                 "dnat", "dnat_ip", "dnat_port", "masquerade", "entries_visited", "expressions",
                 "set_lookups", "bucket_entries_compared", "jumps", "rng_draws",
                 "packet")  # the record as it arrived, for iptables-nft's compat (_xt_call)

    def __init__(self, record):
        p = record
        self.src, self.dst, self.sport, self.dport, self.proto = p[0], p[1], p[2], p[3], p[4]
        self.ctstate, self.mark, self.time = p[6], p[7], p[9]
        self.regs = bytearray(4 * L.NFT_REGS)
        self.packet = record
        self.dnat = self.masquerade = False
        self.dnat_ip = self.dnat_port = 0
        self.entries_visited = self.expressions = self.set_lookups = 0
        self.bucket_entries_compared = self.jumps = self.rng_draws = 0

    def record(self, verdict: int) -> tuple:
        if verdict in _FINAL:
            final = _FINAL[verdict]
        else:
            final = L.V_DNAT if self.dnat else L.V_MASQUERADE if self.masquerade else L.V_ACCEPT
        return (final, self.masquerade, self.dnat_port, self.dnat_ip, self.mark, self.entries_visited,
                self.expressions, self.set_lookups, self.bucket_entries_compared, self.jumps,
                self.rng_draws)


class Ruleset:
    """One compiled nftables table plus its sets; like one CPU's view, it serves one thread."""

    def __init__(self, compiled: CompiledNft, local_addrs=(), seed: int = 0):
        self.compiled = c = compiled
        self._blob = memoryview(c.blob)
        self._local = {int(a) for a in np.asarray(local_addrs, dtype=np.uint32)}
        self._rng = SplitMix64(seed)
        self._set_rng = SplitMix64(seed ^ 0x5E75)
        self.sets = [self._named_set(s) for s in c.sets]
        self.hmaps = anon_map_sets(c.hmaps, HashSet)

    def _named_set(self, s) -> HashSet:
        hs = HashSet(s.key_len, "rhash", seed=self._set_rng.next_u64(),
                     data_len=L.NFT_VERDICT_DATA_BYTES if s.is_map else 0)
        values = s.values if not s.timeout else np.full(len(s.keys), s.timeout, dtype=np.uint32)
        if len(s.keys):
            hs.insert(s.keys, values)
        return hs

    @classmethod
    def from_table(cls, table, local_addrs=(), seed: int = 0) -> "Ruleset":
        """A Ruleset for a bench.loaders.nftables.Table (compiled with the same seed)."""
        return cls(compile_table(table, seed), local_addrs, seed)

    def attach_xt(self, table) -> None:
        """iptables-nft (bench/loaders/iptables_nft.py): the kernels.reference.iptables.Table
        whose xt matches and targets this table's compat expressions run, with its state."""
        self.xt = table

    def reseed(self, seed: int) -> None:
        self._rng = SplitMix64(seed)

    def maintain(self, set_ids=None) -> int:
        """The rhashtable worker's deferred grow/shrink of the named sets ``set_ids`` (default:
        all); returns the elements moved."""
        return sum(self.sets[i].maintain() for i in (range(len(self.sets)) if set_ids is None else set_ids))

    def apply(self, patch: NftPatch) -> None:
        """Commit a transaction (kernels.nftblob.compile_changes): the changed chains' blobs,
        new anonymous maps, named-set elements deleted then added. The rhash worker's grow or
        shrink is deferred, as in the kernel: run ``maintain()`` after."""
        self.compiled.apply(patch)
        self._blob = memoryview(self.compiled.blob)
        self.sets += [self._named_set(s) for s in patch.new_sets]
        for i, keys in patch.set_deletes:
            self.sets[i].delete(keys)
        for i, keys, values in patch.set_inserts:
            self.sets[i].insert(keys, values)
        self.hmaps += anon_map_sets(patch.hmaps, HashSet)

    # ---- batch and single-packet entry points ----------------------------------------------

    def run(self, packets: np.ndarray, hook: int, results: np.ndarray,
            ns: np.ndarray | None = None) -> None:
        """Every base chain on ``hook`` for each packet; fill ``results``, add times to ``ns``."""
        _check_hook(hook)
        n = len(packets)
        if len(results) < n or (ns is not None and len(ns) < n):
            raise ValueError("results and ns need one slot per packet")
        clock = time.perf_counter_ns
        rows = []
        for i, record in enumerate(packets.tolist()):
            start = clock()
            rows.append(self._hook(_Walk(record), hook))
            if ns is not None:
                ns[i] += clock() - start
        results[:n] = np.array(rows, dtype=L.NFT_RESULT_DTYPE)

    def walk_one(self, packet, hook: int, trace: list | None = None, decide=None) -> np.void:
        """One packet's result record (see the module docstring for ``trace`` and ``decide``)."""
        _check_hook(hook)
        record = packet.item() if isinstance(packet, np.void) else tuple(packet)
        row = self._hook(_Walk(record), hook, trace, decide)
        return np.array([row], dtype=L.NFT_RESULT_DTYPE)[0]

    # ---- hook traversal and nft_do_chain ---------------------------------------------------

    def _hook(self, w: _Walk, hook: int, trace=None, decide=None) -> tuple:
        c = self.compiled
        for i in range(len(c.base_hook)):
            if c.base_hook[i] != hook or (c.base_nat[i] and not w.ctstate & L.CT_NEW):
                continue
            verdict = self._do_chain(w, int(c.base_chain[i]), int(c.base_policy[i]), trace, decide)
            if verdict in _FINAL:
                return w.record(verdict)
        return w.record(L.NFT_V_ACCEPT)

    def _do_chain(self, w: _Walk, chain: int, policy: int, trace, decide) -> int:
        blob, offsets = self._blob, self.compiled.chain_offset
        off = int(offsets[chain])
        stack: list[tuple[int, int]] = []
        while True:
            dlen, is_last, handle = _HEADER.unpack_from(blob, off)
            if is_last:
                if not stack:
                    return policy
                chain, off = stack.pop()
                continue
            w.entries_visited += 1
            verdict = self._rule(w, off + L.NFT_RULE_DP_BYTES, dlen, decide)
            if trace is not None:
                trace.append((chain, handle, verdict >> 24 if verdict > L.NFT_V_BREAK else verdict))
            off += L.NFT_RULE_DP_BYTES + dlen
            kind, target = verdict >> 24, verdict & 0xFFFFFF
            if verdict <= L.NFT_V_BREAK or kind == L.NFT_V_CONTINUE:
                continue
            if kind in (L.NFT_V_ACCEPT, L.NFT_V_DROP, L.NFT_V_REJECT):
                return kind
            if kind == L.NFT_V_RETURN:
                if not stack:
                    return policy
                chain, off = stack.pop()
                continue
            if kind == L.NFT_V_JUMP:
                if len(stack) >= L.NFT_JUMP_STACK_SIZE:
                    return L.NFT_V_DROP
                stack.append((chain, off))
            w.jumps += 1
            chain, off = target, int(offsets[target])

    def _rule(self, w: _Walk, off: int, dlen: int, decide) -> int:
        """The rule's verdict code, NFT_V_BREAK when an expression failed, NFT_V_NONE else."""
        for at in range(off, off + dlen, L.NFT_OP_BYTES):
            w.expressions += 1
            verdict = self._expr(w, _OP.unpack_from(self._blob, at), decide)
            if verdict != L.NFT_V_NONE:
                return verdict
        return L.NFT_V_NONE

    def _expr(self, w: _Walk, op: tuple, decide) -> int:
        kind, reg, length, flags, a, b, _ = op
        r = 4 * reg
        if kind == L.NFT_OP_PAYLOAD:
            value, width = {L.NFT_FIELD_SADDR: (w.src, 4), L.NFT_FIELD_DADDR: (w.dst, 4),
                            L.NFT_FIELD_SPORT: (w.sport, 2), L.NFT_FIELD_DPORT: (w.dport, 2)}[a]
            w.regs[r:r + 4] = value.to_bytes(width, "big").ljust(4, b"\0")
        elif kind == L.NFT_OP_META:
            w.regs[r:r + 4] = (w.proto if a == L.NFT_META_L4PROTO else w.mark).to_bytes(4, "little")
        elif kind == L.NFT_OP_CT_STATE:
            w.regs[r:r + 4] = w.ctstate.to_bytes(4, "little")
        elif kind == L.NFT_OP_CMP:
            equal = int.from_bytes(w.regs[r:r + 4], "little") & b == a
            return L.NFT_V_BREAK if equal == bool(flags & L.NFT_F_NEQ) else L.NFT_V_NONE
        elif kind == L.NFT_OP_RANGESET:
            return self._rangeset(w, r, length, flags, a)
        elif kind == L.NFT_OP_LOOKUP:
            return self._lookup(w, r, length, flags, a)
        elif kind == L.NFT_OP_HMAP_VMAP:
            return self._hmap(w, r, length, a)
        elif kind == L.NFT_OP_NUMGEN:
            w.rng_draws += 1
            pick = decide(a) if decide is not None else reciprocal_scale(self._rng.u32(), a)
            w.regs[r:r + 4] = ((pick + b) & 0xFFFFFFFF).to_bytes(4, "little")
        elif kind == L.NFT_OP_FIB_LOCAL:
            local = (w.src if a == L.NFT_FIELD_SADDR else w.dst) in self._local
            return L.NFT_V_BREAK if local == bool(flags & L.NFT_F_NEQ) else L.NFT_V_NONE
        elif kind == L.NFT_OP_MARK_SET:
            w.mark = (w.mark & a) ^ b
        elif kind == L.NFT_OP_DNAT:
            w.dnat, w.dnat_ip, w.dnat_port = True, a, b or w.dport
            w.dst, w.dport = w.dnat_ip, w.dnat_port
            return L.NFT_V_ACCEPT << 24
        elif kind == L.NFT_OP_MASQUERADE:
            w.masquerade = True
            return L.NFT_V_ACCEPT << 24
        elif kind == L.NFT_OP_DYNSET:
            self._dynset(w, r, length, a, b)
        elif kind in (L.NFT_OP_XT_MATCH, L.NFT_OP_XT_TARGET):
            return self._xt_call(w, a, b, kind == L.NFT_OP_XT_TARGET, decide)
        elif kind == L.NFT_OP_VERDICT:
            return a
        return L.NFT_V_NONE

    # ---- iptables-nft: nft_compat's xt match and target expressions ------------------------

    def _xt_call(self, w: _Walk, entry: int, index: int, target: bool, decide) -> int:
        """The legacy twin's own xt extension (match ``index`` or the target of the entry at
        ``entry`` in the attached Table), on the packet as this rule sees it. ``decide`` (the
        tracer's) replaces a statistic match's draw, as in the legacy twin's walk_one. With no
        Table attached the extension is missing: the packet is dropped (as the Cython kernel)."""
        if getattr(self, "xt", None) is None:
            return L.NFT_V_DROP << 24
        if not target:
            record = (w.src, w.dst, w.sport, w.dport, *w.packet[4:7], w.mark, *w.packet[8:])
            matched, x = self.xt.compat_match(entry, index, record, w.mark, decide)
            w.rng_draws += x[9]
            w.set_lookups += x[11]
            w.bucket_entries_compared += x[12]
            return L.NFT_V_NONE if matched else L.NFT_V_BREAK
        going_on, x = self.xt.compat_target(entry, w.mark)
        verdict, _, port, address, mark = x[:5]
        if going_on:  # XT_CONTINUE: MARK
            w.mark = mark
            return L.NFT_V_NONE
        if verdict == L.V_DNAT:
            w.dnat, w.dnat_ip, w.dnat_port = True, address, port or w.dport
            w.dst, w.dport = w.dnat_ip, w.dnat_port
        elif verdict == L.V_MASQUERADE:
            w.masquerade = True
        else:
            return (L.NFT_V_REJECT if verdict == L.V_REJECT else L.NFT_V_DROP) << 24
        return L.NFT_V_ACCEPT << 24

    # ---- sets and maps ---------------------------------------------------------------------

    def _find(self, w: _Walk, s: int, key: bytes) -> int:
        """HashSet.lookup_one: the element or -1, its compares counted in both places."""
        hs = self.sets[s]
        e, compared = hs._find(key)
        hs.bucket_entries_compared += compared
        w.set_lookups += 1
        w.bucket_entries_compared += compared
        return e

    def _lookup(self, w: _Walk, r: int, length: int, flags: int, s: int) -> int:
        e = self._find(w, s, bytes(w.regs[r:r + length]))
        value = self.sets[s]._values[e] if e >= 0 else 0
        found = e >= 0 and (not flags & L.NFT_F_TIMEOUT or value > w.time)
        if found == bool(flags & L.NFT_F_NEQ):
            return L.NFT_V_BREAK
        return value if flags & L.NFT_F_VMAP else L.NFT_V_NONE

    def _dynset(self, w: _Walk, r: int, length: int, s: int, timeout: int) -> None:
        key = bytes(w.regs[r:r + length])
        e = self._find(w, s, key)
        expires = (w.time + timeout) & 0xFFFFFFFF
        if e >= 0:
            self.sets[s]._values[e] = expires
        else:
            self.sets[s].insert(np.frombuffer(key, dtype=np.uint8).reshape(1, length),
                                np.array([expires], dtype=np.uint32))

    def _hmap(self, w: _Walk, r: int, length: int, m: int) -> int:
        """nft_hash_fast_lookup / nft_hash_lookup: HashSet.lookup_one on the anonymous map."""
        hs = self.hmaps[m]
        e, compared = hs._find(bytes(w.regs[r:r + length]))
        hs.bucket_entries_compared += compared
        w.set_lookups += 1
        w.bucket_entries_compared += compared
        return hs._values[e] if e >= 0 else L.NFT_V_BREAK

    def _rangeset(self, w: _Walk, r: int, width: int, flags: int, s: int) -> int:
        c = self.compiled
        value = int.from_bytes(w.regs[r:r + width], "big")
        w.set_lookups += 1
        found = False
        for i in range(int(c.range_base[s]), int(c.range_base[s] + c.range_count[s])):
            w.bucket_entries_compared += 1
            if c.range_lo[i] <= value <= c.range_hi[i]:
                found = True
                break
        return L.NFT_V_BREAK if found == bool(flags & L.NFT_F_NEQ) else L.NFT_V_NONE

    # ---- memory ----------------------------------------------------------------------------

    def modelled_bytes(self) -> int:
        return modelled_bytes(self.compiled, self.sets, self.hmaps)

    def model_bytes(self) -> int:
        """Bytes of this model's own tables: the blob, the compiled arrays and the sets."""
        return compiled_bytes(self.compiled) + sum(hs.model_bytes() for hs in self.sets + self.hmaps)


def _check_hook(hook: int) -> None:
    if not 0 <= hook < 5:
        raise ValueError(f"no hook {hook}")
