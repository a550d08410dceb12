"""Build an iptables table blob the way the kernel lays it out (see kernels/layout.py).

The loader turns rule text into :class:`Rule` objects and hands them, chain by chain, to a
:class:`TableBuilder`; ``build()`` places built-in chains first (rules, then the policy entry
that is the hook's underflow), then each user chain (an ERROR head carrying its name, its rules,
an unconditional RETURN tail), then the closing ERROR entry, exactly as ``iptables-restore``
hands the table to ``IPT_SO_SET_REPLACE``. A jump's verdict is the offset of the first entry
after the chain's head, as libiptc computes it.
"""
from __future__ import annotations

import struct
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from kernels import layout as L


@dataclass(slots=True)
class Match:
    kind: int  # L.MATCH_*
    args: dict = field(default_factory=dict)


@dataclass(slots=True)
class Rule:
    """One ``-A`` line, parsed. Addresses and masks are host-order integers. The loader shares
    rules between rulesets and equal matches between rules: change neither once loaded."""

    src: int = 0
    smsk: int = 0
    dst: int = 0
    dmsk: int = 0
    proto: int = 0
    iniface: str = ""
    outiface: str = ""
    invflags: int = 0  # L.INV_*
    matches: list[Match] = field(default_factory=list)
    target: int = L.TARGET_STANDARD  # L.TARGET_*
    verdict: str | None = None  # standard target: ACCEPT, DROP, RETURN, a chain name, or None
    goto: bool = False
    target_args: dict = field(default_factory=dict)
    text: str = ""  # the rule as written, for traces and error messages
    line: int = 0


@dataclass(slots=True)
class Chain:
    name: str
    builtin: bool
    policy: str = "ACCEPT"  # built-in chains only
    rules: list[Rule] = field(default_factory=list)


class EntryInfo(NamedTuple):
    offset: int
    chain: str
    kind: str  # "rule", "policy", "head", "tail", "end"
    rule_number: int  # 1-based within the chain for rules, 0 otherwise
    text: str


class TableEntries(Sequence):
    """A table's entries in blob order (index = counter row), each an :class:`EntryInfo` made
    when it is read. A large table has a million entries and only traces and counter reports
    look at them, so the build keeps just their offsets and a snapshot of the chains."""

    def __init__(self, offsets: list[int], chains: list[Chain]):
        self.offsets = np.array(offsets, dtype=np.int64)
        # Snapshot the rule lists: the builder's chains may be edited after the build.
        self._chains = [(c.name, c.builtin, c.policy, tuple(c.rules)) for c in chains]
        self._firsts: list[int] = []  # index of each chain's first entry (a user chain's head)
        count = 0
        for _name, builtin, _policy, rules in self._chains:
            self._firsts.append(count)
            count += len(rules) + (1 if builtin else 2)  # + the policy, or the head and tail
        if count + 1 != len(self.offsets):  # + the closing ERROR entry
            raise ValueError(f"{len(self.offsets)} offsets for {count + 1} entries")

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("entry index out of range")
        offset = int(self.offsets[index])
        if index == len(self) - 1:
            return EntryInfo(offset, "", "end", 0, "(end of table)")
        position = bisect_right(self._firsts, index) - 1
        name, builtin, policy, rules = self._chains[position]
        number = index - self._firsts[position] + builtin  # 0: a user chain's head
        return EntryInfo(offset, *_describe(name, builtin, policy, rules, number))

    def __iter__(self):
        offsets = iter(self.offsets.tolist())
        for name, builtin, policy, rules in self._chains:
            first = 1 if builtin else 0
            for number in range(first, len(rules) + 2):
                yield EntryInfo(next(offsets), *_describe(name, builtin, policy, rules, number))
        yield EntryInfo(next(offsets), "", "end", 0, "(end of table)")


def _describe(name: str, builtin: bool, policy: str, rules: tuple, number: int) -> tuple:
    """(chain, kind, rule number, text) of a chain's entry ``number``: 0 is a user chain's
    head, 1..n its rules, n + 1 the policy of a built-in chain or the tail of a user chain."""
    if 0 < number <= len(rules):
        return name, "rule", number, rules[number - 1].text
    if number == 0:
        return name, "head", 0, f":{name}"
    if builtin:
        return name, "policy", 0, f"(policy {policy})"
    return name, "tail", 0, "(end of chain: RETURN)"


@dataclass
class CompiledTable:
    name: str
    blob: np.ndarray  # uint8
    hook_entry: np.ndarray  # int32[5]; -1 when the table has no such hook
    underflow: np.ndarray  # int32[5]
    stacksize: int  # number of user chains
    entries: Sequence[EntryInfo]  # one per entry, in blob order; index = counter row
    chain_start: dict[str, int]  # chain name -> offset of its first rule (or tail / policy)
    recent_names: list[str]  # -m recent table ids
    nfacct_names: list[str]  # -m nfacct object ids
    set_names: list[str] = field(default_factory=list)  # -m set ids (ipset names)

    @property
    def n_entries(self) -> int:
        return len(self.entries)

    def entry_index(self) -> dict[int, int]:
        return {e.offset: i for i, e in enumerate(self.entries)}


def _align(n: int) -> int:
    return (n + 7) & ~7


def _iface(name: str) -> tuple[bytes, bytes]:
    """Name and mask as iptables stores them: ``eth+`` compares 3 bytes, ``eth0`` 5 (with NUL)."""
    if not name:
        return b"\0" * 16, b"\0" * 16
    if name.endswith("+"):
        base = name[:-1]
        mask_len = len(base)
    else:
        base = name
        mask_len = len(base) + 1
    raw = base.encode()[:15]
    return raw.ljust(16, b"\0"), (b"\xff" * min(mask_len, 16)).ljust(16, b"\0")


def _list_index(names: list[str], ids: dict[str, int], name: str) -> int:
    """``name``'s index in ``names``, appended if new. The dict keeps this O(1): with ClientIP
    affinity there is one -m recent name per endpoint, 10^5 of them in a large cluster."""
    if len(ids) != len(names):  # the list was changed from outside: index it again
        ids.clear()
        ids.update((n, i) for i, n in enumerate(names))
    index = ids.get(name)
    if index is None:
        index = ids[name] = len(names)
        names.append(name)
    return index


class TableBuilder:
    def __init__(self, name: str):
        self.name = name
        self.chains: dict[str, Chain] = {}
        self.recent_names: list[str] = []
        self.nfacct_names: list[str] = []
        self.set_names: list[str] = []
        self._recent_ids: dict[str, int] = {}  # name -> index in recent_names
        self._nfacct_ids: dict[str, int] = {}
        self._set_ids: dict[str, int] = {}
        for hook in L.TABLE_HOOKS.get(name, ()):
            self.chains[hook] = Chain(hook, builtin=True)

    def chain(self, name: str) -> Chain:
        """The chain ``name``, created as a user chain if new."""
        if name not in self.chains:
            self.chains[name] = Chain(name, builtin=False)
        return self.chains[name]

    def recent_id(self, name: str) -> int:
        return _list_index(self.recent_names, self._recent_ids, name)

    def nfacct_id(self, name: str) -> int:
        return _list_index(self.nfacct_names, self._nfacct_ids, name)

    def set_id(self, name: str) -> int:
        return _list_index(self.set_names, self._set_ids, name)

    # ---- layout --------------------------------------------------------------------------
    def _ordered(self) -> list[Chain]:
        builtins = [c for c in self.chains.values() if c.builtin]
        builtins.sort(key=lambda c: L.HOOK_NAMES.index(c.name))
        return builtins + [c for c in self.chains.values() if not c.builtin]

    @staticmethod
    def rule_size(rule: Rule) -> int:
        size = L.ENTRY_SIZE + sum(L.MATCH_SIZES[m.kind] for m in rule.matches)
        return size + L.TARGET_SIZES[rule.target]

    def build(self) -> CompiledTable:
        """Lay the chains out in one pass; jumps to chains further on are patched at the end."""
        chains = self._ordered()
        buf = bytearray()
        offsets: list[int] = []
        starts: dict[str, int] = {}
        forward_jumps: list[tuple[int, str]] = []  # (where the verdict goes, target chain)
        hook_entry = np.full(5, -1, dtype=np.int32)
        underflow = np.full(5, -1, dtype=np.int32)
        for chain in chains:
            name = chain.name
            if not chain.builtin:
                offsets.append(len(buf))
                _append_plain(buf, _HEAD, len(offsets) - 1, _ERROR_NAME, name.encode()[:29])
            starts[name] = len(buf)
            for rule in chain.rules:
                offsets.append(len(buf))
                self._append_rule(buf, rule, len(offsets) - 1, starts, forward_jumps)
            offsets.append(len(buf))  # the policy, or the tail
            if chain.builtin:
                hook = L.HOOK_NAMES.index(name)
                hook_entry[hook], underflow[hook] = starts[name], len(buf)
                verdict = self._policy_verdict(chain.policy)
            else:
                verdict = L.XT_RETURN
            _append_plain(buf, _TAIL, len(offsets) - 1, _VERDICT, verdict)
        offsets.append(len(buf))
        _append_plain(buf, _HEAD, len(offsets) - 1, _ERROR_NAME, b"ERROR")
        for at, target in forward_jumps:
            _VERDICT.pack_into(buf, at, starts[target])
        user_chains = sum(1 for c in chains if not c.builtin)
        blob = np.frombuffer(buf, dtype=np.uint8)  # a view: no second copy of a 100 MB table
        return CompiledTable(self.name, blob, hook_entry, underflow, user_chains,
                             TableEntries(offsets, chains), starts, list(self.recent_names),
                             list(self.nfacct_names), list(self.set_names))

    @staticmethod
    def _policy_verdict(policy: str) -> int:
        return L.VERDICT_DROP if policy == "DROP" else L.VERDICT_ACCEPT

    # ---- encoding (struct.pack_into on a bytearray: a loader's hot path) ------------------
    _VERDICTS = {"ACCEPT": L.VERDICT_ACCEPT, "DROP": L.VERDICT_DROP, "RETURN": L.XT_RETURN}

    def _payload(self, match: Match) -> tuple:
        a, kind = match.args, match.kind
        if kind in (L.MATCH_TCP, L.MATCH_UDP, L.MATCH_SCTP):
            sport, dport = a.get("sport", (0, 65535)), a.get("dport", (0, 65535))
            return (*sport, *dport, a.get("invert", 0))
        if kind == L.MATCH_STATISTIC:
            return a["p31"], a.get("invert", 0)
        if kind == L.MATCH_MARK:
            return a["value"], a["mask"], a.get("invert", 0)
        if kind == L.MATCH_CONNTRACK:
            return a["states"], a.get("invert", 0)
        if kind == L.MATCH_ADDRTYPE:
            return a.get("source", 0), a.get("dest", 0), a.get("flags", 0)
        if kind == L.MATCH_RECENT:
            return (a.get("seconds", 0), a["mode"], a.get("reap", 0), a.get("invert", 0),
                    self.recent_id(a["name"]))
        if kind == L.MATCH_NFACCT:
            return (self.nfacct_id(a["name"]),)
        if kind == L.MATCH_MULTIPORT:
            ports = list(a["ports"])
            return (a["flags"], len(ports), a.get("invert", 0), *ports, *([0] * (L.MP_MAX_PORTS - len(ports))))
        if kind == L.MATCH_SET:
            return self.set_id(a["name"]), a["dim"], a["flags"]
        if kind == L.MATCH_PHYSDEV:
            return (*_iface(a.get("in", "")), *_iface(a.get("out", "")), a.get("invert", 0), a["bitmask"])
        if kind == L.MATCH_IPVS:
            return (*a.get("vaddr", (0, 0)), a.get("vport", 0), a.get("vproto", 0), a.get("invert", 0),
                    a["bitmask"])
        return ()

    def _append_rule(self, buf: bytearray, rule: Rule, index: int, starts: dict[str, int],
                     forward_jumps: list[tuple[int, str]]) -> None:
        off = len(buf)
        matches = rule.matches
        target_offset = L.ENTRY_SIZE
        for match in matches:
            target_offset += _MATCH_SIZES[match.kind]
        size = target_offset + _TARGET_SIZES[rule.target]
        buf += bytes(size)
        if rule.iniface or rule.outiface:
            in_name, in_mask = _iface(rule.iniface)
            out_name, out_mask = _iface(rule.outiface)
        else:  # nearly every rule: skip the name encoding
            in_name = in_mask = out_name = out_mask = _NO_IFACE
        smsk, dmsk = rule.smsk, rule.dmsk
        _HEADER.pack_into(
            buf, off, rule.src & smsk, rule.dst & dmsk, smsk, dmsk, in_name, out_name, in_mask,
            out_mask, rule.proto, L.F_GOTO if rule.goto else 0, rule.invflags, 0, target_offset,
            size, 0, index, len(matches))
        m_off = off + L.ENTRY_SIZE
        for match in matches:
            kind = match.kind
            _MATCH_STRUCTS[kind].pack_into(buf, m_off, _MATCH_SIZES[kind], kind, *self._payload(match))
            m_off += _MATCH_SIZES[kind]
        self._pack_target(buf, off + target_offset, rule, off + size, starts, forward_jumps)

    def _pack_target(self, buf: bytearray, t: int, rule: Rule, next_off: int, starts: dict[str, int],
                     forward_jumps: list[tuple[int, str]]) -> None:
        if rule.target == L.TARGET_STANDARD:
            verdict = self._VERDICTS.get(rule.verdict)
            if verdict is None:
                if rule.verdict is None:  # no target: fall through to the next entry
                    verdict = next_off
                elif rule.verdict in starts:
                    verdict = starts[rule.verdict]
                else:  # a chain further on: patched once it is laid out
                    verdict = 0
                    forward_jumps.append((t + L.T_VERDICT, rule.verdict))
            _STANDARD_TARGET.pack_into(buf, t, _STANDARD_SIZE, L.TARGET_STANDARD, verdict)
            return
        _XT.pack_into(buf, t, _TARGET_SIZES[rule.target], rule.target)
        args = rule.target_args
        if rule.target in (L.TARGET_DNAT, L.TARGET_SNAT):
            _NAT.pack_into(buf, t + L.T_NAT_IP, args["ip"], args.get("port", 0))
        elif rule.target == L.TARGET_MARK:
            _MARK.pack_into(buf, t + L.T_MARK_VALUE, args["value"], args["mask"])
        elif rule.target == L.TARGET_MASQUERADE:
            buf[t + L.X_DATA] = 1 if args.get("random_fully") else 0


_HEADER_FIELDS = "IIII16s16s16s16sHBBIHHIIH10x"  # struct ipt_entry, 112 B
_HEADER = struct.Struct("<" + _HEADER_FIELDS)
_XT = struct.Struct("<HB")  # xt_entry_match / xt_entry_target: size, our kind id
# Each match in one call: its xt_entry_match header, then its payload at +32.
_PAYLOADS = {
    L.MATCH_TCP: "HHHHB", L.MATCH_UDP: "HHHHB", L.MATCH_SCTP: "HHHHB", L.MATCH_STATISTIC: "IB",
    L.MATCH_MARK: "IIB", L.MATCH_CONNTRACK: "HB", L.MATCH_ADDRTYPE: "HHB", L.MATCH_RECENT: "IBBBxH",
    L.MATCH_NFACCT: "H", L.MATCH_MULTIPORT: "BBBx15H", L.MATCH_SET: "HBB",
    L.MATCH_PHYSDEV: "16s16s16s16sBB", L.MATCH_IPVS: "I12xI12xHB3xBB",
}
_MATCH_STRUCTS = {kind: struct.Struct("<HB" + ("29x" + _PAYLOADS[kind] if kind in _PAYLOADS else ""))
                  for kind in L.MATCH_SIZES}
_MATCH_SIZES, _TARGET_SIZES = L.MATCH_SIZES, L.TARGET_SIZES
_STANDARD_TARGET = struct.Struct("<HB29xi")  # xt_standard_target: header, verdict at +32
_VERDICT = struct.Struct("<i")
_NAT = struct.Struct("<IH")
_MARK = struct.Struct("<II")
# Whole entries that match everything: a chain's tail or policy (152 B), an ERROR head (176 B).
_STANDARD_ENTRY = struct.Struct("<" + _HEADER_FIELDS + "HB29xi4x")
_ERROR_ENTRY = struct.Struct("<" + _HEADER_FIELDS + "HB29x29s3x")
_STANDARD_SIZE = L.TARGET_SIZES[L.TARGET_STANDARD]
_ERROR_SIZE = L.TARGET_SIZES[L.TARGET_ERROR]
assert _STANDARD_ENTRY.size == L.ENTRY_SIZE + _STANDARD_SIZE
assert _ERROR_ENTRY.size == L.ENTRY_SIZE + _ERROR_SIZE
_NO_IFACE = b"\0" * 16


def _plain_header(index: int, next_offset: int) -> tuple:
    """The header fields of an entry without addresses, interfaces or matches."""
    return (0, 0, 0, 0, _NO_IFACE, _NO_IFACE, _NO_IFACE, _NO_IFACE, 0, 0, 0, 0, L.ENTRY_SIZE,
            next_offset, 0, index, 0)


# A chain's head, tail or policy and the table's end match everything: each is a copy of one of
# these with its row index and its target's data (a verdict, or the ERROR target's name) set.
_HEAD = _ERROR_ENTRY.pack(*_plain_header(0, _ERROR_ENTRY.size), _ERROR_SIZE, L.TARGET_ERROR, b"")
_TAIL = _STANDARD_ENTRY.pack(*_plain_header(0, _STANDARD_ENTRY.size), _STANDARD_SIZE, L.TARGET_STANDARD, 0)
_ROW = struct.Struct("<I")
_ERROR_NAME = struct.Struct("<29s")


def _append_plain(buf: bytearray, template: bytes, index: int, data: struct.Struct, value) -> None:
    """Append ``template`` with row ``index`` and ``value`` as its target's data."""
    offset = len(buf)
    buf += template
    _ROW.pack_into(buf, offset + L.E_RULE_INDEX, index)
    data.pack_into(buf, offset + L.ENTRY_SIZE + L.X_DATA, value)
