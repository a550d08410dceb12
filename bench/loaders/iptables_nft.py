"""iptables-nft: a loaded iptables ruleset as the nf_tables backend of ``iptables`` stores it.

Most distributions run ``iptables`` on nf_tables (kernel-internals §1, the iptables-nft caveat).
``iptables-restore`` then writes every iptables table as an nft table ``ip <name>`` with the
built-in chains as base chains at the iptables priorities (nat PREROUTING/OUTPUT -100, nat
INPUT/POSTROUTING 100, filter 0, mangle -150, raw -300), and every ``-A`` line as one nft
rule, still walked one after another by ``nft_do_chain``. What iptables-nft (nft_ipv4_add and
add_match/add_action in iptables' nft.c) emits per rule, in order:

* ``-p``: ``meta l4proto`` + cmp; ``-s``/``-d``: ``ip saddr|daddr`` payload + cmp (a prefix
  folds the bitwise into the cmp, as kernels/nftblob.py does for the nftables mode);
* the matches in their order: ``-m tcp``/``-m udp`` with single ports become ``th sport|dport``
  payload + cmp and ``-m mark`` ``meta mark`` + cmp (native since iptables 1.8); ``-m comment``
  becomes the rule's user data, evaluated never; every other match is an nft_compat ``match``
  expression wrapping the xt extension (statistic, conntrack, addrtype, recent, multiport,
  set, nfacct, physdev, ipvs, sctp, and tcp/udp port ranges, which iptables-nft emits as a
  native range expression that this model has no op for);
* ``counter`` (iptables-nft gives every rule one, before its verdict);
* the target: ACCEPT, DROP, RETURN and chain jumps (``-g``: goto) are native immediate
  verdicts; DNAT, MASQUERADE, MARK, REJECT and the other extensions are nft_compat ``target``
  expressions.

The compat expressions (:class:`XtMatch`, :class:`XtTarget`) call the legacy kernel's own xt
code (kernels/iptables.pyx ``Table.match``/``Table.target``, or the twin's ``compat_match``/
``compat_target``) on a legacy Table built from the same compiled table: the xt data stays in
that table's blob, and a statistic match draws from that Table's RNG, so with the same seed the
two backends draw the same numbers in the same order and reach the same verdicts.

Not modelled (an InputError names the rule): ``-i``/``-o`` interface matches (native ``meta
iifname`` in iptables-nft; the nft kernel has no interface op) and ``-j SNAT`` (the nft result
has no SNAT verdict).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from bench.errors import InputError
from bench.loaders import nftables as ast
from bench.loaders.iptables import Ruleset
from bench.netaddr import PROTOCOL_NAMES, PROTOCOLS, int_to_ip
from kernels import layout as L
from kernels.blob import CompiledTable, Rule, TableBuilder
from kernels.nftblob import CompiledNft, compile_table

# (nft chain type, hook, priority) of each iptables table's built-in chains.
_NAT_PRIORITY = {"PREROUTING": -100, "OUTPUT": -100, "INPUT": 100, "POSTROUTING": 100}
_TABLE_PRIORITY = {"filter": 0, "mangle": -150, "raw": -300}

MATCH_NAMES = {L.MATCH_TCP: "tcp", L.MATCH_UDP: "udp", L.MATCH_SCTP: "sctp", L.MATCH_STATISTIC: "statistic",
               L.MATCH_MARK: "mark", L.MATCH_CONNTRACK: "conntrack", L.MATCH_ADDRTYPE: "addrtype",
               L.MATCH_RECENT: "recent", L.MATCH_NFACCT: "nfacct", L.MATCH_MULTIPORT: "multiport",
               L.MATCH_SET: "set", L.MATCH_PHYSDEV: "physdev", L.MATCH_IPVS: "ipvs",
               L.MATCH_COMMENT: "comment"}
TARGET_NAMES = {L.TARGET_REJECT: "REJECT", L.TARGET_DNAT: "DNAT", L.TARGET_SNAT: "SNAT",
                L.TARGET_MASQUERADE: "MASQUERADE", L.TARGET_MARK: "MARK"}
_PORT_MATCHES = {L.MATCH_TCP: "tcp", L.MATCH_UDP: "udp"}
_FULL_RANGE = (0, 65535)
_RULE_HEADER = struct.Struct("<HB")  # nft_rule_dp's dlen and is_last (layout.NFT_DP_*)


@dataclass(frozen=True, slots=True)
class XtMatch:
    """An nft_compat ``match`` expression: match ``index`` of the legacy entry at ``entry``,
    whose bytes start at ``at`` in the legacy table's blob."""

    name: str
    entry: int
    index: int
    at: int

    def nft_ops(self) -> list[tuple]:
        return [(L.NFT_OP_XT_MATCH, 0, 0, 0, self.entry, self.index, self.at)]


@dataclass(frozen=True, slots=True)
class XtTarget:
    """An nft_compat ``target`` expression: the target of the legacy entry at ``entry``."""

    name: str
    entry: int
    at: int

    def nft_ops(self) -> list[tuple]:
        return [(L.NFT_OP_XT_TARGET, 0, 0, 0, self.entry, 0, self.at)]


@dataclass
class NftTranslation:
    """The iptables ruleset as iptables-nft stores it: per iptables table its nft AST and
    compiled blobs; ``legacy`` is the ruleset translated (its compiled tables hold the xt data
    the compat expressions run on)."""

    tables: dict[str, ast.Table]
    compiled: dict[str, CompiledNft]
    legacy: Ruleset

    def rule_counts(self) -> dict[str, int]:
        return {name: sum(len(c.rules) for c in t.chains.values()) for name, t in self.tables.items()}

    def expression_counts(self) -> dict[str, int]:
        """Expressions per table, as its compiled blob holds them (folded ops count once)."""
        return {name: sum(_blob_expressions(chain.blob) for chain in c.chains if chain is not None)
                for name, c in self.compiled.items()}


def _blob_expressions(blob: bytes) -> int:
    """The expression slots of one compiled chain: each rule header's dlen, up to is_last."""
    count, off = 0, 0
    while True:
        dlen, is_last = _RULE_HEADER.unpack_from(blob, off)
        if is_last:
            return count
        count += dlen // L.NFT_OP_BYTES
        off += L.NFT_RULE_DP_BYTES + dlen


def translate(ruleset: Ruleset, seed: int = 0) -> NftTranslation:
    """Every table of ``ruleset`` as iptables-nft stores it, compiled for the nft kernels."""
    tables = {name: translate_table(ruleset.builders[name], ruleset.tables[name], ruleset.source)
              for name in ruleset.tables}
    return NftTranslation(tables, {name: compile_table(t, seed) for name, t in tables.items()}, ruleset)


def translate_table(builder: TableBuilder, compiled: CompiledTable, source: str = "<string>") -> ast.Table:
    """One iptables table (its parsed chains and their blob) as the nft table ``ip <name>``."""
    offsets = {(e.chain, e.rule_number): e.offset for e in compiled.entries if e.kind == "rule"}
    table = ast.Table("ip", builder.name)
    for chain in builder.chains.values():
        nft_chain = ast.Chain(chain.name)
        if chain.builtin:
            nft_chain.type, nft_chain.hook, nft_chain.priority = _base_chain(builder.name, chain.name)
            nft_chain.policy = chain.policy.lower()
        for number, rule in enumerate(chain.rules, 1):
            exprs = rule_exprs(rule, offsets[chain.name, number], source)
            nft_chain.rules.append(ast.Rule(exprs, _comment(rule), rule.line))
        table.chains[chain.name] = nft_chain
    return table


def _base_chain(table: str, chain: str) -> tuple[str, str, int]:
    if table == "nat":
        return "nat", chain.lower(), _NAT_PRIORITY[chain]
    kind = "route" if (table, chain) == ("mangle", "OUTPUT") else "filter"
    return kind, chain.lower(), _TABLE_PRIORITY[table]


def _comment(rule: Rule) -> str | None:
    for match in rule.matches:
        if match.kind == L.MATCH_COMMENT:
            return match.args["comment"]
    return None


def rule_exprs(rule: Rule, entry: int, source: str = "<string>") -> tuple:
    """The expressions iptables-nft gives ``rule`` (laid out at ``entry`` in the legacy blob)."""
    where = f"{source}:{rule.line}" if rule.line else source
    if rule.iniface or rule.outiface:
        raise InputError("-i/-o interface matches are not modelled on the nft backend", where,
                         rule.text or "-i/-o")
    exprs: list = []
    if rule.proto:
        exprs.append(ast.Meta("l4proto", _op(rule, L.INV_PROTO), rule.proto))
    for field, address, mask, flag in (("ip saddr", rule.src, rule.smsk, L.INV_SRCIP),
                                       ("ip daddr", rule.dst, rule.dmsk, L.INV_DSTIP)):
        if mask or rule.invflags & flag:
            value = address if mask == 0xFFFFFFFF else ast.Prefix(address & mask, mask)
            exprs.append(ast.Payload(field, _op(rule, flag), value))
    at = entry + L.ENTRY_SIZE
    for index, match in enumerate(rule.matches):
        exprs += _match_exprs(rule, match, XtMatch(MATCH_NAMES[match.kind], entry, index, at))
        at += L.MATCH_SIZES[match.kind]
    exprs.append(ast.Counter())
    exprs += _target_exprs(rule, XtTarget(TARGET_NAMES.get(rule.target, "standard"), entry, at), where)
    return tuple(exprs)


def _op(rule: Rule, flag: int) -> str:
    return "!=" if rule.invflags & flag else "=="


def _match_exprs(rule: Rule, match, compat: XtMatch) -> list:
    args = match.args
    if match.kind == L.MATCH_COMMENT:
        return []  # the rule's user data: no expression
    if match.kind == L.MATCH_MARK:
        return [ast.MarkCheck(args["mask"], "!=" if args.get("invert") else "==", args["value"] & args["mask"])]
    if match.kind in _PORT_MATCHES and rule.proto == PROTOCOLS[_PORT_MATCHES[match.kind]] \
            and not rule.invflags & L.INV_PROTO:
        native = _native_ports(args)
        if native is not None:
            return native
    return [compat]


def _native_ports(args: dict) -> list | None:
    """``th sport|dport`` compares for single ports; None when a range needs the xt match."""
    exprs = []
    for key, flag in (("sport", L.PORT_INV_SRC), ("dport", L.PORT_INV_DST)):
        low, high = args.get(key, _FULL_RANGE)
        if (low, high) == _FULL_RANGE and not args.get("invert", 0) & flag:
            continue
        if low != high:
            return None
        exprs.append(ast.Payload(f"th {key}", "!=" if args.get("invert", 0) & flag else "==", low))
    return exprs


def _target_exprs(rule: Rule, compat: XtTarget, where: str) -> list:
    if rule.target == L.TARGET_STANDARD:
        if rule.verdict is None:
            return []
        if rule.verdict in ("ACCEPT", "DROP", "RETURN"):
            return [ast.Verdict(rule.verdict.lower())]
        return [ast.Verdict("goto" if rule.goto else "jump", rule.verdict)]
    if rule.target == L.TARGET_SNAT:
        raise InputError("-j SNAT is not modelled on the nft backend", where, rule.text or "-j SNAT")
    return [compat]


# ---- `nft list ruleset` text of a translation ------------------------------------------------

def render(translation: NftTranslation) -> str:
    """The translated tables as ``nft list ruleset`` prints an iptables-nft ruleset."""
    lines = []
    for table in translation.tables.values():
        lines.append(f"table {table.family} {table.name} {{")
        for chain in table.chains.values():
            lines.append(f"\tchain {chain.name} {{")
            if chain.hook:
                lines.append(f"\t\ttype {chain.type} hook {chain.hook} priority {chain.priority}; "
                             f"policy {chain.policy};")
            for rule in chain.rules:
                text = " ".join(_expr_text(e) for e in rule.exprs)
                if rule.comment:
                    text += f' comment "{rule.comment}"'
                lines.append(f"\t\t{text}")
            lines.append("\t}")
        lines.append("}")
    return "\n".join(lines) + "\n"


def _expr_text(e) -> str:
    if isinstance(e, ast.Meta):
        return f"meta l4proto {'!= ' if e.op == '!=' else ''}{PROTOCOL_NAMES.get(e.value, e.value)}"
    if isinstance(e, ast.Payload):
        value = e.value
        if isinstance(value, ast.Prefix):
            value = f"{int_to_ip(value.network)}/{bin(value.mask).count('1')}"
        elif e.field.startswith("ip "):
            value = int_to_ip(value)
        return f"{e.field} {'!= ' if e.op == '!=' else ''}{value}"
    if isinstance(e, ast.MarkCheck):
        return f"meta mark & 0x{e.mask:08x} {'!=' if e.op == '!=' else '=='} 0x{e.value:08x}"
    if isinstance(e, ast.Counter):
        return "counter packets 0 bytes 0"
    if isinstance(e, ast.Verdict):
        return f"{e.kind} {e.chain}" if e.chain else e.kind
    if isinstance(e, XtMatch):
        return f"xt match \"{e.name}\""
    return f"xt target \"{e.name}\""
