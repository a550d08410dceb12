"""Compile an nftables table (bench.loaders.nftables AST) into the blobs the kernels walk.

Shared by kernels/nftables.pyx and its twin kernels/reference/nftables.py, as kernels/blob.py
is for iptables (kernel-internals §3.1, §6.4). :func:`compile_table` returns a
:class:`CompiledNft`:

* ``blob``: every chain's rules, packed as nft_do_chain walks them. A rule is an 8-byte
  ``nft_rule_dp`` header (u16 ``dlen`` = bytes of expressions, u8 ``is_last``, u8 pad, u32
  ``handle``) followed by its expressions, each one 16-byte slot (layout.NFT_OP_*). Every chain
  ends with an ``is_last`` header, the kernel's end marker. ``chain_offset[c]`` is where chain
  ``c`` starts.
* base chains sorted by (hook, priority, definition order): the order the kernel runs them.
* ``sets``: the named sets and maps (``NamedSet``, by set id): 4-, 8- or 12-byte keys in the kernel's byte
  order. The kernel gives them rhash (no ``size``, no interval, kernel-internals §3.3); each
  backend builds them with its own HashSet(policy="rhash").
* ``hmaps``: the anonymous maps (numgen's and ``… vmap { … }``, ``AnonMap``). nft passes their
  element count as the set size, so the kernel picks hash_fast (4-byte key) or hash (§3.3-§3.4):
  fixed ``roundup_pow_of_two(N·4/3)`` buckets, bucket = ``reciprocal_scale(hash, buckets)``, new
  elements at the chain head. :func:`anon_map_sets` lays each out as a HashSet of that policy
  (``size`` = N, elements inserted in definition order); each backend passes its own HashSet
  class, as for the named sets.
* ``ranges``: anonymous sets of addresses, prefixes, protocols or ports (``{ 10.0.0.0/8, … }``,
  a lone prefix compiles to a masked cmp instead), as inclusive [lo, hi] pairs scanned in order.

Registers are the kernel's 32-bit ones (NFT_REG32_00…15) holding key bytes in network order,
so a concatenation loaded into registers 0..n-1 is the set key byte for byte (layout's
nft_key_addr_proto_port). A verdict is a u32: kind << 24 | chain id.

What is folded, for counting: a masked compare (payload/meta/ct + bitwise + cmp in the kernel
unless the mask is byte-aligned) is one NFT_OP_CMP; ``mark set mark or|xor|and V`` (meta load,
bitwise, meta set) is one NFT_OP_MARK_SET; ``reject`` is one op (the reject expression, whose
verdict is drop). Expression sizes for the memory model are NFT_EXPR_BYTES.

Incremental updates (kernel-internals §3.7): a transaction rebuilds only the blobs of the
chains it changed and adds or deletes single elements of the named sets, so its cost is
O(changed chains and elements). :func:`compile_changes` turns a transaction's net effect
(bench.loaders.nftables.apply's :class:`~bench.loaders.nftables.TableChanges`) into an
:class:`NftPatch` against a :class:`CompiledNft`, and each backend's ``Ruleset.apply(patch)``
commits it: a changed chain's new blob is appended to the blob buffer and its offset swapped
(the old bytes are left behind, as the kernel frees the old blob only after a grace period; the
buffers grow by doubling, so appending is amortised O(bytes appended)), a new chain gets the
next id, a deleted one keeps its id unused, and element changes go to the live HashSets, whose
rhash worker step (grow/shrink) runs after the commit and is counted apart. A numgen map's hash
seed is drawn from the compile seed, its chain's name and its rule's position, so a chain
compiled again for a patch gets the maps a compile from scratch would give it: a patched table
and one compiled from scratch see the same verdicts and counters.
"""
from __future__ import annotations

import gc
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np

from bench.loaders import nftables as ast
from kernels import layout as L
from kernels.layout import kmalloc_size
from kernels.reference.hashing import SplitMix64

Packed = tuple[bytes, int]  # ops packed as in the blob, and their kernel expression bytes

_HEADER = struct.Struct("<HBxI")
_OP = struct.Struct("<BBBBIII")
assert _HEADER.size == L.NFT_RULE_DP_BYTES and _OP.size == L.NFT_OP_BYTES

_PAYLOAD_FIELDS = {"saddr": L.NFT_FIELD_SADDR, "daddr": L.NFT_FIELD_DADDR,
                   "sport": L.NFT_FIELD_SPORT, "dport": L.NFT_FIELD_DPORT}
_PORT_PROTOCOLS = {"tcp": 6, "udp": 17, "sctp": 132}
_HOOKS = {"prerouting": L.HOOK_PREROUTING, "input": L.HOOK_INPUT, "forward": L.HOOK_FORWARD,
          "output": L.HOOK_OUTPUT, "postrouting": L.HOOK_POSTROUTING}
_VERDICT_KINDS = {"accept": L.NFT_V_ACCEPT, "drop": L.NFT_V_DROP, "reject": L.NFT_V_REJECT,
                  "jump": L.NFT_V_JUMP, "goto": L.NFT_V_GOTO, "return": L.NFT_V_RETURN,
                  "continue": L.NFT_V_CONTINUE}
_CT_BITS = {"invalid": L.CT_INVALID, "established": L.CT_ESTABLISHED, "related": L.CT_RELATED,
            "new": L.CT_NEW, "untracked": L.CT_UNTRACKED}
# Bytes a selector occupies in its register (the rest of the 4 is zero padding).
_WIDTHS = {"ipv4_addr": 4, "inet_service": 2, "inet_proto": 1, "mark": 4}
_END = _HEADER.pack(0, 1, 0)  # a chain's is_last marker
# Expressions whose ops depend on nothing but themselves (and the ids of one compile): packed
# once. Numgen and anonymous vmaps and sets build a new anonymous set each time.
_CACHEABLE = frozenset((ast.Payload, ast.Meta, ast.MarkCheck, ast.MarkSet, ast.CtState, ast.Fib, ast.Lookup,
                        ast.Masquerade, ast.Counter, ast.Verdict, ast.UpdateSet))
_CACHE_MAX = 1 << 16


@dataclass
class NamedSet:
    name: str | None  # None once deleted (its id stays unused)
    key_len: int
    is_map: bool
    timeout: int  # seconds, 0 = none (a dynamic set's element lives this long after an update)
    keys: np.ndarray  # uint8 [n, key_len]: the elements when compiled (later ones: the patches)
    values: np.ndarray  # uint32 [n]: verdicts of a map


@dataclass
class AnonMap:
    key_len: int
    seed: int  # u64 state of the HashSet's RNG; its first u32 is nft_hash_init's seed
    keys: np.ndarray  # uint8 [n, key_len], in definition order
    values: np.ndarray  # uint32 [n]: verdicts

    @property
    def policy(self) -> str:
        """nft_select_set_ops with a declared size: hash_fast for 4-byte keys, else hash."""
        return "hash_fast" if self.key_len == 4 else "hash"


def anon_map_sets(maps: list[AnonMap], hashset_class) -> list:
    """The anonymous maps as ``hashset_class`` objects (kernels.hashset or its reference twin)."""
    out = []
    for m in maps:
        hs = hashset_class(m.key_len, m.policy, seed=m.seed, size=max(len(m.keys), 1),
                           data_len=L.NFT_VERDICT_DATA_BYTES)
        if len(m.keys):
            hs.insert(m.keys, m.values)
        out.append(hs)
    return out


def append_grown(buffer: np.ndarray, used: int, values) -> np.ndarray:
    """``buffer`` with ``values`` written from ``used`` on, or, when they do not fit, a copy
    at least twice as large and with a quarter to spare (appending n values costs amortised
    O(n), and a patch after a full compile does not copy the table)."""
    values = np.asarray(values, dtype=buffer.dtype)
    need = used + len(values)
    if need > len(buffer):
        grown = np.zeros(max(need + need // 4, 2 * len(buffer), 16), dtype=buffer.dtype)
        grown[:used] = buffer[:used]
        buffer = grown
    buffer[used:need] = values
    return buffer


@dataclass
class CompiledChain:
    """One chain compiled: its blob (rules, then the is_last header), the kernel's bytes of
    each rule's expressions (layout.NFT_EXPR_BYTES, for memory), and the anonymous maps and
    range sets its rules own."""

    blob: bytes
    expr_bytes: list[int]
    hmaps: list[int]
    ranges: list[int]


@dataclass
class NftPatch:
    """A transaction's changes to a CompiledNft (see :func:`compile_changes`)."""

    new_chain_names: list[str]  # ids from len(chain_names) on
    chains: dict[int, CompiledChain]  # changed and new chains by id
    deleted_chains: list[int]
    base: tuple | None  # the base-chain arrays, when a base chain changed
    hmaps: list[AnonMap]  # ids from len(hmaps) on
    ranges: list[list[tuple[int, int]]]  # ids from len(range_count) on
    new_sets: list[NamedSet]  # ids from len(sets) on
    deleted_sets: list[int]
    set_deletes: list[tuple[int, np.ndarray]]  # (set id, keys)
    set_inserts: list[tuple[int, np.ndarray, np.ndarray]]  # (set id, keys, values)

    def operations(self) -> dict[str, int]:
        """The kernel objects the commit builds or frees, by kind: chains whose blob is built
        and their rules, chains deleted, anonymous maps built (numgen's), named sets created
        or deleted, and named-set elements added and deleted."""
        return {"chains_compiled": len(self.chains),
                "rules_compiled": sum(len(chain.expr_bytes) for chain in self.chains.values()),
                "chains_deleted": len(self.deleted_chains), "anonymous_maps_built": len(self.hmaps),
                "sets_created": len(self.new_sets), "sets_deleted": len(self.deleted_sets),
                "elements_added": sum(len(keys) for _, keys, _ in self.set_inserts),
                "elements_deleted": sum(len(keys) for _, keys in self.set_deletes)}


_BUFFERS = {"blob": np.uint8, "chain_offset": np.int32, "range_base": np.int32, "range_count": np.int32,
            "range_lo": np.uint32, "range_hi": np.uint32}


@dataclass
class CompiledNft:
    """A compiled table. The arrays named in _BUFFERS are the used part of buffers that grow
    by doubling; :meth:`apply` (called by a Ruleset's ``apply``) changes them in place, so a
    CompiledNft belongs to the one Ruleset built from it once it is patched."""

    seed: int
    blob: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))
    chain_names: list = field(default_factory=list)  # by chain id; None for a deleted chain
    chain_offset: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    base_hook: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # in run order
    base_chain: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    base_policy: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))  # NFT_V_ACCEPT/DROP
    base_nat: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))  # 1: first packets only
    base_priority: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    sets: list[NamedSet] = field(default_factory=list)
    hmaps: list[AnonMap] = field(default_factory=list)
    range_base: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # first pair per set
    range_count: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    range_lo: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32))
    range_hi: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32))
    chains: list = field(default_factory=list)  # CompiledChain by chain id (None once deleted)
    chain_ids: dict = field(default_factory=dict)  # live chain name → id
    set_ids: dict = field(default_factory=dict)  # live set name → id
    _buffers: dict = field(default_factory=dict, repr=False)

    def chain_id(self, name: str) -> int:
        return self.chain_ids[name]

    def live_hmaps(self) -> list[int]:
        return [m for chain in self.chains if chain is not None for m in chain.hmaps]

    def live_ranges(self) -> list[int]:
        return [r for chain in self.chains if chain is not None for r in chain.ranges]

    def _append(self, name: str, values) -> int:
        """Append ``values`` to the buffer behind array ``name``; returns where they start."""
        used = len(getattr(self, name))
        buffer = self._buffers.get(name)
        if buffer is None or buffer.base is not None:
            buffer = np.asarray(getattr(self, name), dtype=_BUFFERS[name]).copy()
        buffer = self._buffers[name] = append_grown(buffer, used, values)
        setattr(self, name, buffer[:used + len(values)])
        return used

    def apply(self, patch: NftPatch) -> None:
        """Commit ``patch``'s chains, base chains, anonymous sets and set list (the elements
        of the named sets are the Ruleset's to change)."""
        for name in patch.new_chain_names:
            self.chain_ids[name] = len(self.chain_names)
            self.chain_names.append(name)
            self.chains.append(None)
        self._append("chain_offset", np.zeros(len(patch.new_chain_names), dtype=np.int32))
        if patch.chains:
            ids = list(patch.chains)
            at = self._append("blob", np.frombuffer(b"".join(patch.chains[i].blob for i in ids), dtype=np.uint8))
            for i in ids:
                self.chain_offset[i] = at
                self.chains[i] = patch.chains[i]
                at += len(patch.chains[i].blob)
        for i in patch.deleted_chains:
            del self.chain_ids[self.chain_names[i]]
            self.chain_names[i] = self.chains[i] = None
        if patch.base is not None:
            (self.base_hook, self.base_chain, self.base_policy, self.base_nat, self.base_priority) = patch.base
        self.hmaps += patch.hmaps
        if patch.ranges:
            counts = [len(items) for items in patch.ranges]
            first = len(self.range_lo) + np.cumsum([0] + counts)[:-1]
            self._append("range_base", first)
            self._append("range_count", counts)
            self._append("range_lo", [lo for items in patch.ranges for lo, _ in items])
            self._append("range_hi", [hi for items in patch.ranges for _, hi in items])
        for i in patch.deleted_sets:  # first: a set may be deleted and created again
            del self.set_ids[self.sets[i].name]
            self.sets[i].name = None
        for s in patch.new_sets:
            self.set_ids[s.name] = len(self.sets)
            self.sets.append(s)


def verdict_code(kind: int, chain: int = 0) -> int:
    return kind << 24 | chain


def compile_table(table: ast.Table, seed: int = 0) -> CompiledNft:
    """Compile ``table``; ``seed`` draws the anonymous maps' hash seeds (nft_hash_init)."""
    compiled = CompiledNft(seed)
    everything = ast.TableChanges(chains=list(table.chains), new_sets=list(table.sets))
    compiled.apply(compile_changes(compiled, table, everything))
    return compiled


def compile_changes(c: CompiledNft, table: ast.Table, changes: ast.TableChanges) -> NftPatch:
    """The patch that brings ``c`` (the table compiled before a transaction) to ``table``
    (after it), given the transaction's net effect: only the changed chains are compiled, and
    the named sets change element by element. O(changed chains, rules and elements)."""
    # As in the loader: what a compile allocates lives on and holds no cycles, and the cyclic
    # GC would otherwise rescan the whole ruleset's objects again and again.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _compile_changes(c, table, changes)
    finally:
        if collecting:
            gc.enable()


def _compile_changes(c: CompiledNft, table: ast.Table, changes: ast.TableChanges) -> NftPatch:
    new_chains = [name for name in changes.chains if name not in c.chain_ids]
    deleted_chains = [c.chain_ids[name] for name in changes.deleted_chains if name in c.chain_ids]
    ids = _Ids(c.chain_ids, len(c.chain_names), new_chains, changes.deleted_chains)
    set_ids = _Ids(c.set_ids, len(c.sets), changes.new_sets, changes.deleted_sets)
    compiler = _Compiler(table, c.seed, ids, set_ids, len(c.hmaps), len(c.range_count))
    chains = {ids[name]: compiler.chain(name) for name in changes.chains}
    base_ids = set(c.base_chain.tolist())
    touched_base = any(table.chains[name].hook is not None for name in changes.chains) or \
        any(i in base_ids for i in deleted_chains)
    base = compiler.base_chains(c, changes.chains, deleted_chains) if touched_base else None
    patch = NftPatch(new_chains, chains, deleted_chains, base, compiler.hmaps, compiler.ranges,
                     [compiler.named_set(table.sets[name]) for name in changes.new_sets],
                     [c.set_ids[name] for name in changes.deleted_sets if name in c.set_ids], [], [])
    for name, keys in changes.deleted_elements.items():
        s = table.sets[name]
        patch.set_deletes.append((set_ids[name], _key_rows([_typed_key_bytes(k, s.key_types) for k in keys],
                                                           4 * len(s.key_types))))
    for name, items in changes.added_elements.items():
        s = table.sets[name]
        keys = _key_rows([_typed_key_bytes(k, s.key_types) for k, _ in items], 4 * len(s.key_types))
        values = [s.timeout if s.timeout else compiler.verdict(v) if v is not None else 0 for _, v in items]
        patch.set_inserts.append((set_ids[name], keys, np.array(values, dtype=np.uint32)))
    return patch


class _Ids(dict):
    """Chain or set name → id after a patch: the new objects' ids from ``first`` on (held),
    else the compiled table's ids (looked up, never copied: O(changed objects))."""

    def __init__(self, known: dict, first: int, new: list[str], deleted: list[str]):
        super().__init__({name: first + i for i, name in enumerate(new)})
        self.known = known
        self.deleted = set(deleted)

    def __missing__(self, name: str) -> int:
        if name in self.deleted:
            raise KeyError(name)
        return self.known[name]


def _key_rows(keys: list[bytes], key_len: int) -> np.ndarray:
    return np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), key_len).copy()


class _Compiler:
    def __init__(self, table: ast.Table, seed: int, chain_ids, set_ids: dict, first_hmap: int,
                 first_range: int):
        self.table = table
        self.seed = seed
        self.chain_ids = chain_ids
        self.set_ids = set_ids
        self.first_hmap, self.first_range = first_hmap, first_range
        self.hmaps: list[AnonMap] = []
        self.ranges: list[list[tuple[int, int]]] = []
        self.chain_hash = self.chain_first_hmap = self.rule_index = 0
        self.cache: dict = {}  # expression → (packed ops, kernel bytes)
        self.key_ops: dict = {}  # selectors → the ops loading them

    def chain(self, name: str) -> CompiledChain:
        parts, expr_bytes = [], []
        hmaps, ranges = len(self.hmaps), len(self.ranges)
        self.chain_hash = zlib.crc32(name.encode())
        self.chain_first_hmap = hmaps
        for handle, rule in enumerate(self.table.chains[name].rules):
            self.rule_index = handle
            body, size = self.rule_body(rule)
            expr_bytes.append(size)
            parts += (_HEADER.pack(len(body), 0, handle), body)
        parts.append(_END)
        return CompiledChain(b"".join(parts), expr_bytes,
                             list(range(self.first_hmap + hmaps, self.first_hmap + len(self.hmaps))),
                             list(range(self.first_range + ranges, self.first_range + len(self.ranges))))

    # ---- base chains -----------------------------------------------------------------------

    def base_chains(self, c: CompiledNft, changed: list[str], deleted: list[int]) -> tuple:
        """The base-chain arrays after a patch, by (hook, priority, chain id): the kernel's
        run order (ids follow definition order)."""
        changed_ids = {self.chain_ids[name]: name for name in changed}
        names = {int(i): c.chain_names[int(i)] for i in c.base_chain
                 if int(i) not in changed_ids and int(i) not in deleted}
        names.update((i, name) for i, name in changed_ids.items() if self.table.chains[name].hook is not None)
        chains = {i: self.table.chains[name] for i, name in names.items()}
        order = sorted((_HOOKS[chain.hook], chain.priority, i) for i, chain in chains.items())
        return (np.array([h for h, _, _ in order], dtype=np.int32),
                np.array([i for _, _, i in order], dtype=np.int32),
                np.array([_VERDICT_KINDS[chains[i].policy or "accept"] for _, _, i in order], dtype=np.uint8),
                np.array([chains[i].type == "nat" for _, _, i in order], dtype=np.uint8),
                np.array([p for _, p, _ in order], dtype=np.int32))

    # ---- rules -----------------------------------------------------------------------------

    def rule_body(self, rule: ast.Rule) -> Packed:
        """The rule's packed ops and their kernel expression bytes. Thousands of rules share
        expressions (``jump mark-for-masquerade``, ``meta l4proto tcp``…): those are packed
        once per compile."""
        parts, size = [], 0
        cache = self.cache
        for expr in rule.exprs:
            kind = type(expr)
            if kind in _CACHEABLE and (kind is not ast.Payload and kind is not ast.Meta
                                       or type(expr.value) is not ast.AnonSet):
                packed = cache.get(expr)
                if packed is None:
                    if len(cache) >= _CACHE_MAX:
                        cache.clear()
                    packed = cache[expr] = self.expr_packed(expr)
            else:
                packed = self.expr_packed(expr)
            parts.append(packed[0])
            size += packed[1]
        return b"".join(parts), size

    def expr_packed(self, e) -> Packed:
        pack = _PACKERS.get(type(e))
        if pack is not None:
            return pack(self, e)
        # Defined outside the nft AST, iptables-nft's xt compat expressions
        # (bench/loaders/iptables_nft.py) give their own ops.
        if hasattr(e, "nft_ops"):
            return _joined([_pack(*op) for op in e.nft_ops()])
        raise ValueError(f"{type(e).__name__} is not modelled")

    def payload(self, e: ast.Payload) -> Packed:
        return self.match(e.field, e.op, e.value)

    def meta(self, e: ast.Meta) -> Packed:
        return self.match("meta " + e.key, e.op, e.value)

    def mark_check(self, e: ast.MarkCheck) -> Packed:
        return _concat(_pack(L.NFT_OP_META, 0, a=L.NFT_META_MARK),
                       _pack(L.NFT_OP_CMP, 0, 4, _neq(e.op), a=e.value & e.mask, b=e.mask))

    def mark_set(self, e: ast.MarkSet) -> Packed:
        and_mask, xor = {"set": (0, e.value), "or": (~e.value & 0xFFFFFFFF, e.value),
                         "xor": (0xFFFFFFFF, e.value), "and": (e.value, 0)}[e.op]
        return _pack(L.NFT_OP_MARK_SET, a=and_mask, b=xor)

    def ct_state(self, e: ast.CtState) -> Packed:
        mask = sum(_CT_BITS[s] for s in e.states)
        # `ct state new` is (state & mask) != 0: the kernel's bitwise + cmp neq 0.
        flags = 0 if e.op == "!=" else L.NFT_F_NEQ
        return _concat(_pack(L.NFT_OP_CT_STATE, 0), _pack(L.NFT_OP_CMP, 0, 4, flags, a=0, b=mask))

    def fib(self, e: ast.Fib) -> Packed:
        if e.type != "local":
            raise ValueError(f"fib type {e.type} is not modelled")
        which = L.NFT_FIELD_SADDR if e.which == "saddr" else L.NFT_FIELD_DADDR
        return _pack(L.NFT_OP_FIB_LOCAL, 0, 0, _neq(e.op), a=which)

    def lookup(self, e: ast.Lookup) -> Packed:
        s = self.table.sets[e.set]
        flags = _neq(e.op) | (L.NFT_F_VMAP if e.vmap else 0) | (L.NFT_F_TIMEOUT if s.timeout else 0)
        return _concat(self.load_keys(e.keys), _pack(L.NFT_OP_LOOKUP, 0, _key_len(e.keys), flags,
                                                     a=self.set_ids[e.set]))

    def anon_vmap(self, e: ast.AnonVmap) -> Packed:
        return _concat(self.load_keys(e.keys), self.hmap_lookup(e.elements, _key_len(e.keys), e.keys))

    def numgen(self, e: ast.Numgen) -> Packed:
        return _concat(_pack(L.NFT_OP_NUMGEN, 0, a=e.mod, b=e.offset), self.hmap_lookup(e.elements, 4, None))

    def dnat(self, e: ast.Dnat) -> Packed:
        return _pack(L.NFT_OP_DNAT, a=e.address, b=e.port or 0)

    def masquerade(self, e: ast.Masquerade) -> Packed:
        return _pack(L.NFT_OP_MASQUERADE)

    def update_set(self, e: ast.UpdateSet) -> Packed:
        s = self.table.sets[e.set]
        return _concat(self.load_keys((e.key,)), _pack(L.NFT_OP_DYNSET, 0, _key_len((e.key,)),
                                                       a=self.set_ids[e.set], b=s.timeout or 0))

    def counter(self, e: ast.Counter) -> Packed:
        return _pack(L.NFT_OP_COUNTER)

    def verdict_op(self, e: ast.Verdict) -> Packed:
        return _pack(L.NFT_OP_VERDICT, a=self.verdict(e))

    def match(self, selector: str, op: str, value) -> Packed:
        """A selector compared with a value, a prefix or an anonymous set."""
        load = self.load_keys((selector,))
        width = _WIDTHS[ast.SELECTOR_TYPES[selector]]
        if isinstance(value, ast.AnonSet):
            items = [(v.network, v.network | (~v.mask & 0xFFFFFFFF)) if isinstance(v, ast.Prefix)
                     else (v, v) for v in value.items]
            self.ranges.append(items)
            return _concat(load, _pack(L.NFT_OP_RANGESET, 0, width, _neq(op),
                                       a=self.first_range + len(self.ranges) - 1))
        network, mask = (value.network, value.mask) if isinstance(value, ast.Prefix) \
            else (value, (1 << 8 * width) - 1)
        return _concat(load, _pack(L.NFT_OP_CMP, 0, width, _neq(op), a=_reg_bytes(network, width),
                                   b=_reg_bytes(mask, width)))

    def load_keys(self, selectors) -> Packed:
        """Load each selector into the next register (plus nft's l4proto dependency of a
        ``tcp|udp|sctp dport`` match, which only a lone compare carries)."""
        packed = self.key_ops.get(selectors)
        if packed is None:
            packed = self.key_ops[selectors] = _joined(self._load_keys(selectors))
        return packed

    def _load_keys(self, selectors) -> list[Packed]:
        ops = []
        for reg, selector in enumerate(selectors):
            proto, _, name = selector.partition(" ")
            if proto in _PORT_PROTOCOLS and len(selectors) == 1:
                ops += [_pack(L.NFT_OP_META, reg, a=L.NFT_META_L4PROTO),
                        _pack(L.NFT_OP_CMP, reg, 1, 0, a=_PORT_PROTOCOLS[proto], b=0xFF)]
            if selector == "meta l4proto":
                ops.append(_pack(L.NFT_OP_META, reg, a=L.NFT_META_L4PROTO))
            elif selector == "meta mark":
                ops.append(_pack(L.NFT_OP_META, reg, a=L.NFT_META_MARK))
            else:
                ops.append(_pack(L.NFT_OP_PAYLOAD, reg, a=_PAYLOAD_FIELDS[name]))
        return ops

    def verdict(self, v: ast.Verdict) -> int:
        return verdict_code(_VERDICT_KINDS[v.kind], self.chain_ids[v.chain] if v.chain else 0)

    # ---- anonymous maps (hash_fast / hash) and sets (ranges) -------------------------------

    def hmap_lookup(self, elements: dict, klen: int, selectors) -> Packed:
        keys = _key_rows([_key_bytes(k, selectors) for k in elements], klen)
        verdicts = np.array([self.verdict(v) for v in elements.values()], dtype=np.uint32)
        self.hmaps.append(AnonMap(klen, self.hmap_seed(), keys, verdicts))
        return _pack(L.NFT_OP_HMAP_VMAP, 0, klen, 0, a=self.first_hmap + len(self.hmaps) - 1)

    def hmap_seed(self) -> int:
        """nft_hash_init's seed for the next anonymous map: drawn from the compile seed, the
        chain's name and the rule's position, so that compiling the chain again gives it again."""
        in_chain = len(self.hmaps) - self.chain_first_hmap
        where = self.chain_hash << 32 | (self.rule_index & 0xFFFFFF) << 8 | in_chain & 0xFF
        return SplitMix64(self.seed ^ where).next_u64()

    # ---- named sets ------------------------------------------------------------------------

    def named_set(self, s: ast.NftSet) -> NamedSet:
        klen = 4 * len(s.key_types)
        keys = [_typed_key_bytes(k, s.key_types) for k in s.elements]
        values = [self.verdict(v) if v is not None else 0 for v in s.elements.values()]
        return NamedSet(s.name, klen, s.data_type == "verdict", s.timeout or 0,
                        np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), klen).copy(),
                        np.array(values, dtype=np.uint32))


# How each expression is packed (a _Compiler method): by the expression's class.
_PACKERS = {ast.Payload: _Compiler.payload, ast.Meta: _Compiler.meta, ast.MarkCheck: _Compiler.mark_check,
            ast.MarkSet: _Compiler.mark_set, ast.CtState: _Compiler.ct_state, ast.Fib: _Compiler.fib,
            ast.Lookup: _Compiler.lookup, ast.AnonVmap: _Compiler.anon_vmap, ast.Numgen: _Compiler.numgen,
            ast.Dnat: _Compiler.dnat, ast.Masquerade: _Compiler.masquerade, ast.UpdateSet: _Compiler.update_set,
            ast.Counter: _Compiler.counter, ast.Verdict: _Compiler.verdict_op}


def _pack(kind: int, reg: int = 0, length: int = 0, flags: int = 0, a: int = 0, b: int = 0, c: int = 0) -> Packed:
    """One op, packed, and its kernel expression bytes."""
    return (_OP.pack(kind, reg, length, flags, a & 0xFFFFFFFF, b & 0xFFFFFFFF, c & 0xFFFFFFFF),
            L.NFT_EXPR_BYTES[kind])


def _concat(first: Packed, second: Packed) -> Packed:
    return first[0] + second[0], first[1] + second[1]


def _joined(ops: list[Packed]) -> Packed:
    return b"".join([packed for packed, _ in ops]), sum([size for _, size in ops])


def _neq(op: str) -> int:
    return L.NFT_F_NEQ if op == "!=" else 0


def _reg_bytes(value: int, width: int) -> int:
    """``value`` as a register holds it (network order, zero padded), read as a LE u32."""
    return int.from_bytes(value.to_bytes(width, "big").ljust(4, b"\0"), "little")


def _key_len(selectors) -> int:
    return 4 * len(selectors)


def _typed_key_bytes(key: tuple, types) -> bytes:
    return b"".join(int(v).to_bytes(_WIDTHS[t], "big").ljust(4, b"\0") for v, t in zip(key, types))


def _key_bytes(key, selectors) -> bytes:
    if selectors is None:  # numgen: the register holds a host-order u32
        return int(key).to_bytes(4, "little")
    key = key if isinstance(key, tuple) else (key,)
    return _typed_key_bytes(key, [ast.SELECTOR_TYPES[s] for s in selectors])



# ---- memory (both backends) ------------------------------------------------------------------

def modelled_bytes(c: CompiledNft, sets: list, hmaps: list) -> int:
    """Kernel memory (kernel-internals §3.6) of the live chains and sets: per rule an nft_rule
    (24 B) with its expressions (layout.NFT_EXPR_BYTES) plus the rule blob (8-byte nft_rule_dp
    per rule and per chain end, and the expressions again); per set an nft_set (256 B) plus its
    table: rhash sets as HashSet.modelled_bytes, anonymous maps too (hash / hash_fast: nft_hash
    buckets, 8 B each, and nft_hash_elem (32 B) + key + 16-B verdict per element), anonymous
    interval sets as two rbtree elements (40 B + 4-B key) per range. ``sets`` and ``hmaps``
    are a Ruleset's HashSets by set and map id."""
    chains = [chain for chain in c.chains if chain is not None]
    expr_bytes = [b for chain in chains for b in chain.expr_bytes]
    rules = sum(kmalloc_size(L.NFT_RULE_BYTES + b) for b in expr_bytes)
    blobs = sum(L.NFT_RULE_DP_BYTES + b for b in expr_bytes) + L.NFT_RULE_DP_BYTES * len(chains)
    live = [sets[i] for i, s in enumerate(c.sets) if s.name is not None] + [hmaps[m] for m in c.live_hmaps()]
    named = sum(L.NFT_SET_BYTES + hs.modelled_bytes() for hs in live)
    ranges = c.live_ranges()
    range_bytes = len(ranges) * L.NFT_SET_BYTES + \
        2 * int(c.range_count[ranges].sum()) * kmalloc_size(L.NFT_RBTREE_ELEM_BYTES + 4)
    return rules + blobs + named + range_bytes


def compiled_bytes(c: CompiledNft) -> int:
    """Bytes of the compiled arrays (their buffers, spare room included)."""
    arrays = [c._buffers.get(name, getattr(c, name)) for name in _BUFFERS] + \
        [c.base_hook, c.base_chain, c.base_policy, c.base_nat, c.base_priority]
    return sum(a.nbytes for a in arrays)
