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
* ``sets``: the named sets and maps (``NamedSet``): 4-, 8- or 12-byte keys in the kernel's byte
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
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

from bench.loaders import nftables as ast
from kernels import layout as L
from kernels.layout import kmalloc_size
from kernels.reference.hashing import SplitMix64

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


@dataclass
class NamedSet:
    name: str
    key_len: int
    is_map: bool
    timeout: int  # seconds, 0 = none (a dynamic set's element lives this long after an update)
    keys: np.ndarray  # uint8 [n, key_len]
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


def anon_map_sets(c: "CompiledNft", hashset_class) -> list:
    """The anonymous maps as ``hashset_class`` objects (kernels.hashset or its reference twin)."""
    out = []
    for m in c.hmaps:
        hs = hashset_class(m.key_len, m.policy, seed=m.seed, size=max(len(m.keys), 1),
                           data_len=L.NFT_VERDICT_DATA_BYTES)
        if len(m.keys):
            hs.insert(m.keys, m.values)
        out.append(hs)
    return out


@dataclass
class CompiledNft:
    blob: np.ndarray  # uint8
    chain_names: list[str]
    chain_offset: np.ndarray  # int32 per chain
    base_hook: np.ndarray  # int32 per base chain, in the order the kernel runs them
    base_chain: np.ndarray  # int32
    base_policy: np.ndarray  # uint8: NFT_V_ACCEPT or NFT_V_DROP
    base_nat: np.ndarray  # uint8: 1 for a nat chain (first packets only)
    base_priority: np.ndarray  # int32
    sets: list[NamedSet]
    hmaps: list[AnonMap]
    range_base: np.ndarray  # int32 per anonymous set: first pair in range_lo/hi
    range_count: np.ndarray  # int32
    range_lo: np.ndarray  # uint32
    range_hi: np.ndarray  # uint32
    rule_exprs: list[list[int]] = field(default_factory=list)  # op ids per rule, for memory

    def chain_id(self, name: str) -> int:
        return self.chain_names.index(name)


def verdict_code(kind: int, chain: int = 0) -> int:
    return kind << 24 | chain


def compile_table(table: ast.Table, seed: int = 0) -> CompiledNft:
    """Compile ``table``; ``seed`` draws the anonymous maps' hash seeds (nft_hash_init)."""
    return _Compiler(table, SplitMix64(seed)).run()


class _Compiler:
    def __init__(self, table: ast.Table, rng: SplitMix64):
        self.table = table
        self.rng = rng
        self.chain_names = list(table.chains)
        self.chain_ids = {name: i for i, name in enumerate(self.chain_names)}
        self.set_ids = {name: i for i, name in enumerate(table.sets)}
        self.hmaps: list[AnonMap] = []
        self.ranges: list[list[tuple[int, int]]] = []
        self.rule_exprs: list[list[int]] = []

    def run(self) -> CompiledNft:
        blob, offsets = bytearray(), []
        for name in self.chain_names:
            offsets.append(len(blob))
            for handle, rule in enumerate(self.table.chains[name].rules):
                ops = self.rule_ops(rule)
                self.rule_exprs.append([op[0] for op in ops])
                blob += _HEADER.pack(len(ops) * L.NFT_OP_BYTES, 0, handle)
                for op in ops:
                    blob += _OP.pack(*op)
            blob += _HEADER.pack(0, 1, 0)
        return CompiledNft(np.frombuffer(bytes(blob), dtype=np.uint8).copy(), self.chain_names,
                           np.array(offsets, dtype=np.int32), *self.base_chains(),
                           [self.named_set(s) for s in self.table.sets.values()],
                           self.hmaps, *self.range_arrays(), self.rule_exprs)

    # ---- base chains -----------------------------------------------------------------------

    def base_chains(self) -> tuple:
        order = sorted((_HOOKS[c.hook], c.priority, i) for i, c in enumerate(self.table.chains.values())
                       if c.hook is not None)
        chains = list(self.table.chains.values())
        return (np.array([h for h, _, _ in order], dtype=np.int32),
                np.array([i for _, _, i in order], dtype=np.int32),
                np.array([_VERDICT_KINDS[chains[i].policy or "accept"] for _, _, i in order], dtype=np.uint8),
                np.array([chains[i].type == "nat" for _, _, i in order], dtype=np.uint8),
                np.array([p for _, p, _ in order], dtype=np.int32))

    # ---- rules -----------------------------------------------------------------------------

    def rule_ops(self, rule: ast.Rule) -> list[tuple]:
        ops: list[tuple] = []
        for expr in rule.exprs:
            ops += self.expr_ops(expr)
        return ops

    def expr_ops(self, e) -> list[tuple]:
        if isinstance(e, ast.Payload):
            return self.match_ops(e.field, e.op, e.value)
        if isinstance(e, ast.Meta):
            return self.match_ops("meta " + e.key, e.op, e.value)
        if isinstance(e, ast.MarkCheck):
            return [_op(L.NFT_OP_META, 0, a=L.NFT_META_MARK),
                    _op(L.NFT_OP_CMP, 0, 4, _neq(e.op), a=e.value & e.mask, b=e.mask)]
        if isinstance(e, ast.MarkSet):
            and_mask, xor = {"set": (0, e.value), "or": (~e.value & 0xFFFFFFFF, e.value),
                             "xor": (0xFFFFFFFF, e.value), "and": (e.value, 0)}[e.op]
            return [_op(L.NFT_OP_MARK_SET, a=and_mask, b=xor)]
        if isinstance(e, ast.CtState):
            mask = sum(_CT_BITS[s] for s in e.states)
            # `ct state new` is (state & mask) != 0: the kernel's bitwise + cmp neq 0.
            flags = 0 if e.op == "!=" else L.NFT_F_NEQ
            return [_op(L.NFT_OP_CT_STATE, 0), _op(L.NFT_OP_CMP, 0, 4, flags, a=0, b=mask)]
        if isinstance(e, ast.Fib):
            if e.type != "local":
                raise ValueError(f"fib type {e.type} is not modelled")
            which = L.NFT_FIELD_SADDR if e.which == "saddr" else L.NFT_FIELD_DADDR
            return [_op(L.NFT_OP_FIB_LOCAL, 0, 0, _neq(e.op), a=which)]
        if isinstance(e, ast.Lookup):
            return self.lookup_ops(e)
        if isinstance(e, ast.AnonVmap):
            return self.load_keys(e.keys) + [self.hmap_lookup(e.elements, _key_len(e.keys), e.keys)]
        if isinstance(e, ast.Numgen):
            return [_op(L.NFT_OP_NUMGEN, 0, a=e.mod, b=e.offset),
                    self.hmap_lookup(e.elements, 4, None)]
        if isinstance(e, ast.Dnat):
            return [_op(L.NFT_OP_DNAT, a=e.address, b=e.port or 0)]
        if isinstance(e, ast.Masquerade):
            return [_op(L.NFT_OP_MASQUERADE)]
        if isinstance(e, ast.UpdateSet):
            s = self.table.sets[e.set]
            return self.load_keys((e.key,)) + [_op(L.NFT_OP_DYNSET, 0, _key_len((e.key,)),
                                                   a=self.set_ids[e.set], b=s.timeout or 0)]
        if isinstance(e, ast.Counter):
            return [_op(L.NFT_OP_COUNTER)]
        if isinstance(e, ast.Verdict):
            return [_op(L.NFT_OP_VERDICT, a=self.verdict(e))]
        raise ValueError(f"{type(e).__name__} is not modelled")

    def match_ops(self, selector: str, op: str, value) -> list[tuple]:
        """A selector compared with a value, a prefix or an anonymous set."""
        ops = self.load_keys((selector,))
        width = _WIDTHS[ast.SELECTOR_TYPES[selector]]
        if isinstance(value, ast.AnonSet):
            items = [(v.network, v.network | (~v.mask & 0xFFFFFFFF)) if isinstance(v, ast.Prefix)
                     else (v, v) for v in value.items]
            self.ranges.append(items)
            return ops + [_op(L.NFT_OP_RANGESET, 0, width, _neq(op), a=len(self.ranges) - 1)]
        network, mask = (value.network, value.mask) if isinstance(value, ast.Prefix) \
            else (value, (1 << 8 * width) - 1)
        return ops + [_op(L.NFT_OP_CMP, 0, width, _neq(op), a=_reg_bytes(network, width),
                          b=_reg_bytes(mask, width))]

    def load_keys(self, selectors) -> list[tuple]:
        """Load each selector into the next register (plus nft's l4proto dependency of a
        ``tcp|udp|sctp dport`` match, which only a lone compare carries)."""
        ops = []
        for reg, selector in enumerate(selectors):
            proto, _, name = selector.partition(" ")
            if proto in _PORT_PROTOCOLS and len(selectors) == 1:
                ops += [_op(L.NFT_OP_META, reg, a=L.NFT_META_L4PROTO),
                        _op(L.NFT_OP_CMP, reg, 1, 0, a=_PORT_PROTOCOLS[proto], b=0xFF)]
            if selector == "meta l4proto":
                ops.append(_op(L.NFT_OP_META, reg, a=L.NFT_META_L4PROTO))
            elif selector == "meta mark":
                ops.append(_op(L.NFT_OP_META, reg, a=L.NFT_META_MARK))
            else:
                ops.append(_op(L.NFT_OP_PAYLOAD, reg, a=_PAYLOAD_FIELDS[name]))
        return ops

    def lookup_ops(self, e: ast.Lookup) -> list[tuple]:
        s = self.table.sets[e.set]
        flags = _neq(e.op) | (L.NFT_F_VMAP if e.vmap else 0) | (L.NFT_F_TIMEOUT if s.timeout else 0)
        return self.load_keys(e.keys) + [_op(L.NFT_OP_LOOKUP, 0, _key_len(e.keys), flags,
                                             a=self.set_ids[e.set])]

    def verdict(self, v: ast.Verdict) -> int:
        return verdict_code(_VERDICT_KINDS[v.kind], self.chain_ids[v.chain] if v.chain else 0)

    # ---- anonymous maps (hash_fast / hash) and sets (ranges) -------------------------------

    def hmap_lookup(self, elements: dict, klen: int, selectors) -> tuple:
        items = [(_key_bytes(k, selectors), self.verdict(v)) for k, v in elements.items()]
        keys = np.frombuffer(b"".join(k for k, _ in items), dtype=np.uint8).reshape(len(items), klen).copy()
        self.hmaps.append(AnonMap(klen, self.rng.next_u64(), keys,
                                  np.array([v for _, v in items], dtype=np.uint32)))
        return _op(L.NFT_OP_HMAP_VMAP, 0, klen, 0, a=len(self.hmaps) - 1)

    def range_arrays(self) -> tuple:
        counts = [len(items) for items in self.ranges]
        pairs = [pair for items in self.ranges for pair in items]
        return (np.array(np.cumsum([0] + counts)[:-1], dtype=np.int32), np.array(counts, dtype=np.int32),
                np.array([lo for lo, _ in pairs], dtype=np.uint32),
                np.array([hi for _, hi in pairs], dtype=np.uint32))

    # ---- named sets ------------------------------------------------------------------------

    def named_set(self, s: ast.NftSet) -> NamedSet:
        klen = 4 * len(s.key_types)
        keys = [_typed_key_bytes(k, s.key_types) for k in s.elements]
        values = [self.verdict(v) if v is not None else 0 for v in s.elements.values()]
        return NamedSet(s.name, klen, s.data_type == "verdict", s.timeout or 0,
                        np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), klen).copy(),
                        np.array(values, dtype=np.uint32))


def _op(kind: int, reg: int = 0, length: int = 0, flags: int = 0, a: int = 0, b: int = 0, c: int = 0) -> tuple:
    return (kind, reg, length, flags, a & 0xFFFFFFFF, b & 0xFFFFFFFF, c & 0xFFFFFFFF)


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

def modelled_bytes(c: CompiledNft, sets) -> int:
    """Kernel memory (kernel-internals §3.6): per rule an nft_rule (24 B) with its expressions
    (layout.NFT_EXPR_BYTES) plus the rule blob (8-byte nft_rule_dp per rule and per chain end,
    and the expressions again); per set an nft_set (256 B) plus its table: rhash sets as
    HashSet.modelled_bytes, anonymous maps too (hash / hash_fast: nft_hash buckets, 8 B each, and
    nft_hash_elem (32 B) + key + 16-B verdict per element), anonymous interval sets as two rbtree
    elements (40 B + 4-B key) per range. ``sets`` are the named sets, then the anonymous maps."""
    expr_bytes = [sum(L.NFT_EXPR_BYTES[k] for k in ops) for ops in c.rule_exprs]
    rules = sum(kmalloc_size(L.NFT_RULE_BYTES + b) for b in expr_bytes)
    blobs = sum(L.NFT_RULE_DP_BYTES + b for b in expr_bytes) + L.NFT_RULE_DP_BYTES * len(c.chain_names)
    named = sum(L.NFT_SET_BYTES + hs.modelled_bytes() for hs in sets)
    ranges = len(c.range_count) * L.NFT_SET_BYTES + 2 * len(c.range_lo) * kmalloc_size(L.NFT_RBTREE_ELEM_BYTES + 4)
    return rules + blobs + named + ranges


def compiled_bytes(c: CompiledNft) -> int:
    arrays = [c.blob, c.chain_offset, c.base_hook, c.base_chain, c.base_policy, c.base_nat,
              c.base_priority, c.range_base, c.range_count,
              c.range_lo, c.range_hi]
    return sum(a.nbytes for a in arrays)

