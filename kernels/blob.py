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


class TableBuilder:
    def __init__(self, name: str):
        self.name = name
        self.chains: dict[str, Chain] = {}
        self.recent_names: list[str] = []
        self.nfacct_names: list[str] = []
        for hook in L.TABLE_HOOKS.get(name, ()):
            self.chains[hook] = Chain(hook, builtin=True)

    def chain(self, name: str) -> Chain:
        """The chain ``name``, created as a user chain if new."""
        if name not in self.chains:
            self.chains[name] = Chain(name, builtin=False)
        return self.chains[name]

    def recent_id(self, name: str) -> int:
        if name not in self.recent_names:
            self.recent_names.append(name)
        return self.recent_names.index(name)

    def nfacct_id(self, name: str) -> int:
        if name not in self.nfacct_names:
            self.nfacct_names.append(name)
        return self.nfacct_names.index(name)

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
        chains = self._ordered()
        # Pass 1: offsets.
        offset = 0
        starts: dict[str, int] = {}
        plan = []  # (offset, chain, kind, rule or None, number)
        for chain in chains:
            if not chain.builtin:
                plan.append((offset, chain, "head", None, 0))
                offset += L.ENTRY_SIZE + L.TARGET_SIZES[L.TARGET_ERROR]
            starts[chain.name] = offset
            for number, rule in enumerate(chain.rules, 1):
                plan.append((offset, chain, "rule", rule, number))
                offset += self.rule_size(rule)
            plan.append((offset, chain, "policy" if chain.builtin else "tail", None, 0))
            offset += L.ENTRY_SIZE + L.TARGET_SIZES[L.TARGET_STANDARD]
        plan.append((offset, None, "end", None, 0))
        offset += L.ENTRY_SIZE + L.TARGET_SIZES[L.TARGET_ERROR]

        buf = bytearray(offset)
        hook_entry = np.full(5, -1, dtype=np.int32)
        underflow = np.full(5, -1, dtype=np.int32)
        entries = []
        for index, (off, chain, kind, rule, number) in enumerate(plan):
            next_off = plan[index + 1][0] if index + 1 < len(plan) else offset
            name = chain.name if chain else ""
            if kind == "rule":
                self._encode_rule(buf, off, next_off, rule, starts, index)
                text = rule.text
            elif kind == "head":
                self._encode_error(buf, off, index, name)
                text = f":{name}"
            elif kind == "end":
                self._encode_error(buf, off, index, "ERROR")
                text = "(end of table)"
            else:  # policy or tail: an unconditional standard target
                verdict = self._policy_verdict(chain.policy) if kind == "policy" else L.XT_RETURN
                self._encode_header(buf, off, Rule(), index, 0, L.ENTRY_SIZE, next_off - off)
                self._encode_standard(buf, off + L.ENTRY_SIZE, verdict)
                text = f"(policy {chain.policy})" if kind == "policy" else "(end of chain: RETURN)"
                if kind == "policy":
                    underflow[L.HOOK_NAMES.index(name)] = off
            entries.append(EntryInfo(off, name, kind, number, text))
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
    _PAYLOAD = {
        L.MATCH_TCP: struct.Struct("<HHHHB"), L.MATCH_UDP: struct.Struct("<HHHHB"),
        L.MATCH_SCTP: struct.Struct("<HHHHB"), L.MATCH_STATISTIC: struct.Struct("<IB"),
        L.MATCH_MARK: struct.Struct("<IIB"), L.MATCH_CONNTRACK: struct.Struct("<HB"),
        L.MATCH_ADDRTYPE: struct.Struct("<HHB"), L.MATCH_RECENT: struct.Struct("<IBBBxH"),
        L.MATCH_NFACCT: struct.Struct("<H"), L.MATCH_MULTIPORT: struct.Struct("<BBBx15H"),
    }

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
        in_name, in_mask = _iface(rule.iniface)
        out_name, out_mask = _iface(rule.outiface)
        self._HEADER.pack_into(
            buf, off, rule.src & rule.smsk, rule.dst & rule.dmsk, rule.smsk, rule.dmsk,
            in_name, out_name, in_mask, out_mask, rule.proto, L.F_GOTO if rule.goto else 0,
            rule.invflags, 0, target_offset, next_offset, 0, index, match_count)

    def _encode_error(self, buf, off, index, name: str) -> None:
        size = L.ENTRY_SIZE + L.TARGET_SIZES[L.TARGET_ERROR]
        self._encode_header(buf, off, Rule(), index, 0, L.ENTRY_SIZE, size)
        t = off + L.ENTRY_SIZE
        self._XT.pack_into(buf, t, L.TARGET_SIZES[L.TARGET_ERROR], L.TARGET_ERROR)
        raw = name.encode()[:29]
        buf[t + L.X_DATA:t + L.X_DATA + len(raw)] = raw

    def _encode_standard(self, buf, t: int, verdict: int) -> None:
        self._XT.pack_into(buf, t, L.TARGET_SIZES[L.TARGET_STANDARD], L.TARGET_STANDARD)
        struct.pack_into("<i", buf, t + L.T_VERDICT, verdict)

    def _encode_rule(self, buf, off, next_off, rule: Rule, starts, index) -> None:
        target_offset = L.ENTRY_SIZE + sum(L.MATCH_SIZES[m.kind] for m in rule.matches)
        self._encode_header(buf, off, rule, index, len(rule.matches), target_offset, next_off - off)
        m_off = off + L.ENTRY_SIZE
        for match in rule.matches:
            self._XT.pack_into(buf, m_off, L.MATCH_SIZES[match.kind], match.kind)
            payload = self._PAYLOAD.get(match.kind)
            if payload is not None:
                payload.pack_into(buf, m_off + L.X_DATA, *self._payload(match))
            m_off += L.MATCH_SIZES[match.kind]
        t = off + target_offset
        if rule.target == L.TARGET_STANDARD:
            verdict = {"ACCEPT": L.VERDICT_ACCEPT, "DROP": L.VERDICT_DROP, "RETURN": L.XT_RETURN,
                       None: next_off}.get(rule.verdict)
            if verdict is None:
                verdict = starts[rule.verdict]
            self._encode_standard(buf, t, verdict)
            return
        self._XT.pack_into(buf, t, L.TARGET_SIZES[rule.target], rule.target)
        args = rule.target_args
        if rule.target in (L.TARGET_DNAT, L.TARGET_SNAT):
            struct.pack_into("<IH", buf, t + L.T_NAT_IP, args["ip"], args.get("port", 0))
        elif rule.target == L.TARGET_MARK:
            struct.pack_into("<II", buf, t + L.T_MARK_VALUE, args["value"], args["mask"])
        elif rule.target == L.TARGET_MASQUERADE:
            buf[t + L.X_DATA] = 1 if args.get("random_fully") else 0
