"""Build an iptables table blob the way the kernel lays it out (see kernels/layout.py).

The loader turns rule text into :class:`Rule` objects and hands them, chain by chain, to a
:class:`TableBuilder`; ``build()`` places built-in chains first (rules, then the policy entry
that is the hook's underflow), then each user chain (an ERROR head carrying its name, its rules,
an unconditional RETURN tail), then the closing ERROR entry, exactly as ``iptables-restore``
hands the table to ``IPT_SO_SET_REPLACE``. A jump's verdict is the offset of the first entry
after the chain's head, as libiptc computes it.
"""
from __future__ import annotations

import functools
import struct
from dataclasses import dataclass, field

import numpy as np

from kernels import layout as L


@dataclass
class Match:
    kind: int  # L.MATCH_*
    args: dict = field(default_factory=dict)


@dataclass
class Rule:
    """One ``-A`` line, parsed. Addresses and masks are host-order integers."""

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


@dataclass
class Chain:
    name: str
    builtin: bool
    policy: str = "ACCEPT"  # built-in chains only
    rules: list[Rule] = field(default_factory=list)


@dataclass(frozen=True)
class EntryInfo:
    offset: int
    chain: str
    kind: str  # "rule", "policy", "head", "tail", "end"
    rule_number: int  # 1-based within the chain for rules, 0 otherwise
    text: str


@dataclass
class CompiledTable:
    name: str
    blob: np.ndarray  # uint8
    hook_entry: np.ndarray  # int32[5]; -1 when the table has no such hook
    underflow: np.ndarray  # int32[5]
    stacksize: int  # number of user chains
    entries: list[EntryInfo]  # one per entry, in blob order; index = counter row
    chain_start: dict[str, int]  # chain name -> offset of its first rule (or tail / policy)
    recent_names: list[str]  # -m recent table ids
    nfacct_names: list[str]  # -m nfacct object ids

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
        self._recent_ids: dict[str, int] = {}  # name -> index in recent_names
        self._nfacct_ids: dict[str, int] = {}
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

    # ---- layout --------------------------------------------------------------------------
    def _ordered(self) -> list[Chain]:
        builtins = [c for c in self.chains.values() if c.builtin]
        builtins.sort(key=lambda c: L.HOOK_NAMES.index(c.name))
        return builtins + [c for c in self.chains.values() if not c.builtin]

    @staticmethod
    def rule_size(rule: Rule) -> int:
        size = L.ENTRY_SIZE + sum(L.MATCH_SIZES[m.kind] for m in rule.matches)
        return size + L.TARGET_SIZES[rule.target]

    def _plan(self, chains: list[Chain]) -> tuple[list, dict[str, int], int]:
        """Pass 1: every entry's (offset, chain, kind, rule or None, number, target offset)."""
        match_sizes, target_sizes = L.MATCH_SIZES, L.TARGET_SIZES
        offset = 0
        starts: dict[str, int] = {}
        plan = []
        append = plan.append
        for chain in chains:
            if not chain.builtin:
                append((offset, chain, "head", None, 0, L.ENTRY_SIZE))
                offset += _ERROR_ENTRY_SIZE
            starts[chain.name] = offset
            for number, rule in enumerate(chain.rules, 1):
                target_offset = L.ENTRY_SIZE
                for match in rule.matches:
                    target_offset += match_sizes[match.kind]
                append((offset, chain, "rule", rule, number, target_offset))
                offset += target_offset + target_sizes[rule.target]
            append((offset, chain, "policy" if chain.builtin else "tail", None, 0, L.ENTRY_SIZE))
            offset += _STANDARD_ENTRY_SIZE
        append((offset, None, "end", None, 0, L.ENTRY_SIZE))
        return plan, starts, offset + _ERROR_ENTRY_SIZE

    def build(self) -> CompiledTable:
        chains = self._ordered()
        plan, starts, size = self._plan(chains)
        buf = bytearray(size)
        hook_entry = np.full(5, -1, dtype=np.int32)
        underflow = np.full(5, -1, dtype=np.int32)
        entries = []
        append = entries.append
        next_offsets = [entry[0] for entry in plan[1:]] + [size]
        for index, ((off, chain, kind, rule, number, target_offset), next_off) in enumerate(
                zip(plan, next_offsets)):
            if kind == "rule":
                self._encode_rule(buf, off, next_off, rule, target_offset, starts, index)
                append(EntryInfo(off, chain.name, kind, number, rule.text))
                continue
            name = chain.name if chain else ""
            if kind == "head":
                self._encode_error(buf, off, index, name)
                text = f":{name}"
            elif kind == "end":
                self._encode_error(buf, off, index, "ERROR")
                text = "(end of table)"
            else:  # policy or tail: an unconditional standard target
                verdict = self._policy_verdict(chain.policy) if kind == "policy" else L.XT_RETURN
                self._encode_plain_header(buf, off, index, next_off - off)
                self._STANDARD.pack_into(buf, off + L.ENTRY_SIZE, _STANDARD_SIZE, L.TARGET_STANDARD, verdict)
                text = f"(policy {chain.policy})" if kind == "policy" else "(end of chain: RETURN)"
                if kind == "policy":
                    underflow[L.HOOK_NAMES.index(name)] = off
            append(EntryInfo(off, name, kind, number, text))
        for chain in chains:
            if chain.builtin:
                hook_entry[L.HOOK_NAMES.index(chain.name)] = starts[chain.name]
        user_chains = sum(1 for c in chains if not c.builtin)
        blob = np.frombuffer(buf, dtype=np.uint8).copy()
        return CompiledTable(self.name, blob, hook_entry, underflow, user_chains, entries, starts,
                             list(self.recent_names), list(self.nfacct_names))

    @staticmethod
    def _policy_verdict(policy: str) -> int:
        return L.VERDICT_DROP if policy == "DROP" else L.VERDICT_ACCEPT

    # ---- encoding (struct.pack_into on a bytearray: a loader's hot path) ------------------
    _HEADER = struct.Struct("<IIII16s16s16s16sHBBIHHIIH10x")  # struct ipt_entry, 112 B
    _XT = struct.Struct("<HB")  # xt_entry_match / xt_entry_target: size, our kind id
    _STANDARD = struct.Struct("<HB29xi")  # xt_standard_target: header, then the verdict at +32
    _NAT = struct.Struct("<IH")
    _MARK = struct.Struct("<II")
    _PAYLOAD = {
        L.MATCH_TCP: struct.Struct("<HHHHB"), L.MATCH_UDP: struct.Struct("<HHHHB"),
        L.MATCH_SCTP: struct.Struct("<HHHHB"), L.MATCH_STATISTIC: struct.Struct("<IB"),
        L.MATCH_MARK: struct.Struct("<IIB"), L.MATCH_CONNTRACK: struct.Struct("<HB"),
        L.MATCH_ADDRTYPE: struct.Struct("<HHB"), L.MATCH_RECENT: struct.Struct("<IBBBxH"),
        L.MATCH_NFACCT: struct.Struct("<H"), L.MATCH_MULTIPORT: struct.Struct("<BBBx15H"),
    }
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
        return ()

    def _encode_header(self, buf, off, rule: Rule, index, match_count, target_offset, next_offset):
        in_name, in_mask = _iface_cached(rule.iniface)
        out_name, out_mask = _iface_cached(rule.outiface)
        self._HEADER.pack_into(
            buf, off, rule.src & rule.smsk, rule.dst & rule.dmsk, rule.smsk, rule.dmsk,
            in_name, out_name, in_mask, out_mask, rule.proto, L.F_GOTO if rule.goto else 0,
            rule.invflags, 0, target_offset, next_offset, 0, index, match_count)

    def _encode_plain_header(self, buf, off, index, next_offset):
        """The header of a head, tail, policy or end entry: matches everything, no matches."""
        self._HEADER.pack_into(buf, off, 0, 0, 0, 0, _NO_IFACE, _NO_IFACE, _NO_IFACE, _NO_IFACE,
                               0, 0, 0, 0, L.ENTRY_SIZE, next_offset, 0, index, 0)

    def _encode_error(self, buf, off, index, name: str) -> None:
        self._encode_plain_header(buf, off, index, _ERROR_ENTRY_SIZE)
        t = off + L.ENTRY_SIZE
        self._XT.pack_into(buf, t, L.TARGET_SIZES[L.TARGET_ERROR], L.TARGET_ERROR)
        raw = name.encode()[:29]
        buf[t + L.X_DATA:t + L.X_DATA + len(raw)] = raw

    def _encode_standard(self, buf, t: int, verdict: int) -> None:
        self._STANDARD.pack_into(buf, t, _STANDARD_SIZE, L.TARGET_STANDARD, verdict)

    def _encode_rule(self, buf, off, next_off, rule: Rule, target_offset, starts, index) -> None:
        self._encode_header(buf, off, rule, index, len(rule.matches), target_offset, next_off - off)
        m_off = off + L.ENTRY_SIZE
        for match in rule.matches:
            kind = match.kind
            size = L.MATCH_SIZES[kind]
            self._XT.pack_into(buf, m_off, size, kind)
            payload = self._PAYLOAD.get(kind)
            if payload is not None:
                payload.pack_into(buf, m_off + L.X_DATA, *self._payload(match))
            m_off += size
        t = off + target_offset
        if rule.target == L.TARGET_STANDARD:
            verdict = self._VERDICTS.get(rule.verdict)
            if verdict is None:
                verdict = next_off if rule.verdict is None else starts[rule.verdict]
            self._STANDARD.pack_into(buf, t, _STANDARD_SIZE, L.TARGET_STANDARD, verdict)
            return
        self._XT.pack_into(buf, t, L.TARGET_SIZES[rule.target], rule.target)
        args = rule.target_args
        if rule.target in (L.TARGET_DNAT, L.TARGET_SNAT):
            self._NAT.pack_into(buf, t + L.T_NAT_IP, args["ip"], args.get("port", 0))
        elif rule.target == L.TARGET_MARK:
            self._MARK.pack_into(buf, t + L.T_MARK_VALUE, args["value"], args["mask"])
        elif rule.target == L.TARGET_MASQUERADE:
            buf[t + L.X_DATA] = 1 if args.get("random_fully") else 0


_STANDARD_SIZE = L.TARGET_SIZES[L.TARGET_STANDARD]
_STANDARD_ENTRY_SIZE = L.ENTRY_SIZE + _STANDARD_SIZE
_ERROR_ENTRY_SIZE = L.ENTRY_SIZE + L.TARGET_SIZES[L.TARGET_ERROR]
_NO_IFACE = b"\0" * 16
_iface_cached = functools.lru_cache(maxsize=1024)(_iface)  # a handful of names, many rules
