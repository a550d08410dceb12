"""nftables loader: ``nft -f`` transactions and ``nft list ruleset`` text → a ruleset AST.

Both text forms are one grammar to nft, and both are read here:

- the transaction form kube-proxy sends (``add|create|insert|flush|delete|destroy
  table|chain|set|map|rule|element …``, one command per line or ``;``-separated, with
  ``{ … }`` bodies), applied in order, as ``nft -f`` applies it;
- the block form ``nft list ruleset`` prints (``table ip t { set s { … } chain c { … } }``),
  including the ``# handle N`` annotations of ``nft -a`` and ``counter packets N bytes M``.

Only the expressions kube-proxy's table uses are known (see ``_STATEMENTS``); anything else
is an :class:`~bench.errors.InputError` naming ``<source>:<line>``. A rule or map element may
refer to a chain or set defined further down; references are resolved once the whole text is
read, and an unknown one is an error naming the line that refers to it. The model is
IPv4-only: tables of any family load (a node's listing has kubelet's empty ``ip6`` canary
chains), but IPv6 selectors and types are unknown, so kube-proxy's ``ip6 kube-proxy`` table
is an error.

The AST, which the nftables kernel compiles
-------------------------------------------
:class:`NftRuleset` ``.tables[(family, name)]`` → :class:`Table` with

- ``chains``: name → :class:`Chain` (``type``/``hook``/``priority``/``policy`` for a base
  chain, all None for a regular one; ``rules``: a list of :class:`Rule`);
- ``sets``: name → :class:`NftSet` (sets and maps share one namespace, as in nft):
  ``key_types`` such as ``("ipv4_addr", "inet_proto", "inet_service")``, ``data_type``
  ``"verdict"`` for a verdict map or None for a set, ``flags``, ``timeout`` (seconds) and
  ``elements``: a dict from the key tuple to a :class:`Verdict` (maps) or None (sets).

A :class:`Rule` is a tuple of expression ops, evaluated left to right as the kernel evaluates
a rule's expressions; its comment is kept beside them (it is user data, never evaluated).
All values are normalised so that lookups need no strings: an address is a host-order int, a
CIDR a :class:`Prefix` (a /32 is the plain address), a protocol its number, a port an int, a
mark an int. A one-element anonymous set is its element, as nft itself compiles it.

====================  ===========================================================================
op                    written as
====================  ===========================================================================
Payload               ``ip saddr|daddr``, ``tcp|udp|sctp|th dport|sport`` with ``==``/``!=`` and an
                      int, a Prefix or an AnonSet; ``tcp dport`` also implies ``meta l4proto tcp``
Meta                  ``meta l4proto [!=] tcp | { tcp, udp }``
MarkCheck             ``[meta] mark [and|& MASK] [==|!=] VALUE`` (mask 0xffffffff when absent)
MarkSet               ``[meta] mark set [meta] mark or|xor|and|'|'|^|& VALUE``, ``mark set VALUE``
Lookup                ``KEY [. KEY …] [!=] @set`` (vmap False) and ``… vmap @map`` (vmap True)
AnonVmap              ``KEY [. KEY …] vmap { k : verdict, … }``
Numgen                ``numgen random mod N [offset M] vmap { i : verdict, … }``
Fib                   ``fib saddr|daddr type [!=] local``
CtState               ``ct state [!=] new,established | { … }``
Dnat                  ``dnat [ip] to ADDRESS[:PORT]``
Masquerade            ``masquerade [fully-random]``
UpdateSet             ``update|add @set { ip saddr }``
Counter               ``counter [packets N bytes M]``
Verdict               ``accept``, ``drop``, ``return``, ``continue``, ``jump C``, ``goto C`` and
                      ``reject [with …]`` (the reject expression and its drop, as one op)
====================  ===========================================================================

Keys of Lookup, AnonVmap and UpdateSet are selector names: ``"ip saddr"``, ``"ip daddr"``,
``"meta l4proto"``, ``"th dport"``, ``"tcp dport"``, …; :data:`SELECTOR_TYPES` gives each one's
set key type. A verdict ends its rule: Verdict, a vmap Lookup, AnonVmap and Numgen (nft parses a
vmap as a verdict statement) are always the last op. The elements of AnonVmap and Numgen are
dicts: treat them as read-only.

Not kept, because no packet path depends on them: handles, element comments and expiry times,
set ``size``/``policy``/``gc-interval``, and the ``with …`` of ``reject``. Counters are kept with
the values read. :meth:`NftRuleset.rule_counts` and :meth:`NftRuleset.stats` count the result.
``load(text, base=ruleset)`` applies a transaction (a partial sync) to an earlier ruleset
without changing it. :func:`apply` applies one to a ruleset in place, as the kernel commits it:
its work is O(changed objects), an error leaves the ruleset as it was, and it returns the
transaction's net effect (:class:`Changes`), from which the nftables kernel updates a compiled
table without recompiling it (kernels.nftblob.compile_changes). A text that does not touch a
table existing before it can only close a chain loop through a chain it jumps to or adds rules
to, so only those are searched for loops.
"""
from __future__ import annotations

import bisect
import gc
import re
from collections import Counter as _Counter
from dataclasses import dataclass, field

from bench.errors import InputError, read_input
from bench.netaddr import PROTOCOLS, ip_to_int

__all__ = ["NftRuleset", "Table", "Chain", "NftSet", "Rule", "Prefix", "AnonSet", "Payload", "Meta",
           "MarkCheck", "MarkSet", "Lookup", "AnonVmap", "Numgen", "Fib", "CtState", "Dnat",
           "Masquerade", "UpdateSet", "Counter", "Verdict", "SELECTOR_TYPES", "load", "load_file",
           "parse_rule", "rule_references", "apply", "Changes", "TableChanges"]

FAMILY = "ip"
FAMILIES = ("ip", "ip6", "inet", "arp", "bridge", "netdev")
KEY_TYPES = ("ipv4_addr", "inet_proto", "inet_service", "mark")
SELECTOR_TYPES = {
    "ip saddr": "ipv4_addr", "ip daddr": "ipv4_addr", "meta l4proto": "inet_proto",
    **{f"{proto} {port}": "inet_service"
       for proto in ("th", "tcp", "udp", "sctp") for port in ("sport", "dport")},
}
CHAIN_TYPES = {"filter": ("prerouting", "input", "forward", "output", "postrouting"),
               "nat": ("prerouting", "input", "output", "postrouting"),
               "route": ("output",)}
# nft's named priorities for the ip family, and the hooks where a name may be used.
STANDARD_PRIORITIES = {"raw": (-300, None), "mangle": (-150, None), "dstnat": (-100, ("prerouting", "output")),
                       "filter": (0, None), "security": (50, None), "srcnat": (100, ("input", "postrouting"))}
NF_IP_PRI_CONNTRACK = -200  # NAT chains must run after conntrack
CT_STATES = ("invalid", "established", "related", "new", "untracked")
FIB_TYPES = ("unspec", "unicast", "local", "broadcast", "anycast", "multicast", "blackhole",
             "unreachable", "prohibit")
SET_FLAGS = ("constant", "interval", "timeout", "dynamic")
NAME_MAX = 255  # NFT_NAME_MAXLEN and NFT_CHAIN_MAXNAMELEN, less the NUL
_OTHER_PROTOCOLS = {"icmp": 1, "igmp": 2, "ipip": 4, "egp": 8, "gre": 47, "esp": 50, "ah": 51,
                    "udplite": 136, "dccp": 33, "comp": 108}


# ---- the AST -------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Prefix:
    network: int
    mask: int


@dataclass(frozen=True, slots=True)
class AnonSet:
    items: tuple  # ints and Prefixes, sorted and distinct


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: str  # accept, drop, return, continue, jump, goto, reject
    chain: str | None = None


@dataclass(frozen=True, slots=True)
class Payload:
    field: str
    op: str  # "==" or "!="
    value: int | Prefix | AnonSet


@dataclass(frozen=True, slots=True)
class Meta:
    key: str  # "l4proto"
    op: str
    value: int | AnonSet


@dataclass(frozen=True, slots=True)
class MarkCheck:
    mask: int
    op: str
    value: int


@dataclass(frozen=True, slots=True)
class MarkSet:
    op: str  # set, or, xor, and
    value: int


@dataclass(frozen=True, slots=True)
class Lookup:
    keys: tuple[str, ...]
    set: str
    op: str
    vmap: bool


@dataclass(frozen=True, slots=True)
class AnonVmap:
    keys: tuple[str, ...]
    elements: dict  # key tuple → Verdict; read-only


@dataclass(frozen=True, slots=True)
class Numgen:
    mod: int
    offset: int
    elements: dict  # int → Verdict; read-only


@dataclass(frozen=True, slots=True)
class Fib:
    which: str  # saddr or daddr
    op: str
    type: str


@dataclass(frozen=True, slots=True)
class CtState:
    op: str
    states: frozenset


@dataclass(frozen=True, slots=True)
class Dnat:
    address: int
    port: int | None


@dataclass(frozen=True, slots=True)
class Masquerade:
    fully_random: bool


@dataclass(frozen=True, slots=True)
class UpdateSet:
    set: str
    key: str  # the selector whose value is added, "ip saddr"


@dataclass(frozen=True, slots=True)
class Counter:
    packets: int = 0
    bytes: int = 0


@dataclass(frozen=True, slots=True)
class Rule:
    exprs: tuple
    comment: str | None = None
    line: int = field(default=0, compare=False)  # where it was loaded from


@dataclass(eq=True)
class Chain:
    name: str
    type: str | None = None  # filter, nat or route for a base chain
    hook: str | None = None
    priority: int | None = None
    policy: str | None = None  # accept or drop, base chains only
    comment: str | None = None
    rules: list[Rule] = field(default_factory=list)

    @property
    def is_base(self) -> bool:
        return self.hook is not None


@dataclass(eq=True)
class NftSet:
    name: str
    key_types: tuple[str, ...]
    data_type: str | None = None  # "verdict" for a verdict map
    flags: frozenset = frozenset()
    timeout: int | None = None  # seconds
    comment: str | None = None
    elements: dict = field(default_factory=dict)  # key tuple → Verdict (map) or None (set)

    @property
    def is_map(self) -> bool:
        return self.data_type is not None


@dataclass(eq=True)
class Table:
    family: str
    name: str
    comment: str | None = None
    chains: dict[str, Chain] = field(default_factory=dict)
    sets: dict[str, NftSet] = field(default_factory=dict)


@dataclass
class NftRuleset:
    tables: dict[tuple[str, str], Table]
    source: str

    def table(self, name: str = "kube-proxy", family: str = FAMILY) -> Table:
        return self.tables[family, name]

    def rule_counts(self) -> dict[str, int]:
        """Rules per table, keyed ``"family name"``."""
        return {f"{family} {name}": sum(len(chain.rules) for chain in table.chains.values())
                for (family, name), table in self.tables.items()}

    def stats(self) -> dict[str, int]:
        tables = self.tables.values()
        return {
            "tables": len(self.tables),
            "chains": sum(len(t.chains) for t in tables),
            "base_chains": sum(c.is_base for t in tables for c in t.chains.values()),
            "rules": sum(len(c.rules) for t in tables for c in t.chains.values()),
            "sets": sum(not s.is_map for t in tables for s in t.sets.values()),
            "maps": sum(s.is_map for t in tables for s in t.sets.values()),
            "elements": sum(len(s.elements) for t in tables for s in t.sets.values()),
        }


# ---- entry points --------------------------------------------------------------------------

def load(text: str, source: str = "<string>", base: NftRuleset | None = None) -> NftRuleset:
    """Apply ``text`` to ``base`` (or to an empty ruleset) and return the resulting ruleset.

    ``base`` is not changed: what the text modifies is copied first."""
    # A large ruleset allocates millions of objects that all live on and hold no cycles; the
    # cyclic GC would scan them again and again for nothing.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _Loader(source, base).run(text)
    finally:
        if collecting:
            gc.enable()


@dataclass
class TableChanges:
    """The net effect of one transaction on a table that exists before and after it."""

    chains: list[str] = field(default_factory=list)  # created, or whose rules were rewritten
    deleted_chains: list[str] = field(default_factory=list)
    new_sets: list[str] = field(default_factory=list)  # created (or deleted and re-created)
    deleted_sets: list[str] = field(default_factory=list)
    added_elements: dict[str, list[tuple]] = field(default_factory=dict)  # set → [(key, data)]
    deleted_elements: dict[str, list[tuple]] = field(default_factory=dict)  # set → [key]


@dataclass
class Changes:
    """What :func:`apply` changed: per table kept, its :class:`TableChanges`; the tables
    created and deleted (a table deleted and created again is in both)."""

    tables: dict[tuple[str, str], TableChanges]
    created: list[tuple[str, str]]
    deleted: list[tuple[str, str]]


def apply(text: str, ruleset: NftRuleset, source: str = "<string>") -> Changes:
    """Apply the transaction ``text`` to ``ruleset`` in place and return its net effect.

    The work is proportional to what the text changes (plus any ``flush`` it asks for); on an
    error ``ruleset`` keeps its content (a deleted element or chain that comes back may move
    to the end of its dict)."""
    collecting = gc.isenabled()
    gc.disable()
    loader = _Loader(source, ruleset, in_place=True)
    try:
        result = loader.run(text)
    except BaseException:
        loader.undo()
        raise
    finally:
        if collecting:
            gc.enable()
    before = ruleset.tables
    ruleset.tables = result.tables
    kept = {key: state.journal.changes() for key, state in loader.tables.items()
            if state.journal is not None and before.get(key) is state.table}
    return Changes(kept, [key for key in ruleset.tables if key not in kept],
                   [key for key in before if key not in kept])


def kube_proxy_table(ruleset: NftRuleset) -> Table:
    """The ``ip kube-proxy`` table: the one kube-proxy programs, and the one modelled."""
    try:
        return ruleset.table()
    except KeyError:
        raise InputError("has no table ip kube-proxy", ruleset.source) from None


def load_file(path, base: NftRuleset | None = None) -> NftRuleset:
    """:func:`load` the file at ``path``; a file that cannot be read is an InputError."""
    return load(read_input(path, "an nft ruleset"), str(path), base)


# ---- tokens and values ---------------------------------------------------------------------
# nft splits on blanks; braces, ';' and ',' are tokens of their own; a double-quoted string
# has no escapes; '#' outside a string comments out the rest of the line.

_TOKEN = re.compile(r'"[^"]*"|[{};,]|[^\s{};,"#]+|#.*|"')
_NAME = re.compile(r"[A-Za-z_.][A-Za-z0-9_./\-]*")
_U32 = re.compile(r"0[xX][0-9a-fA-F]{1,8}|[0-9]{1,10}")
_SMALL = re.compile(r"[0-9]{1,10}")
_COUNT64 = re.compile(r"[0-9]{1,20}")
_TIME = re.compile(r"(?:([0-9]{1,6})d)?(?:([0-9]{1,6})h)?(?:([0-9]{1,6})m)?"
                   r"(?:([0-9]{1,9})s)?(?:([0-9]{1,9})ms)?")
_PRIORITY = re.compile(r"(-?[0-9]{1,10})|([a-z]+)(?:([+-])([0-9]{1,10}))?")


def _is_plain(line: str) -> bool:
    """Whether ``line`` has no punctuation, string or comment: its tokens are its words."""
    return not ('"' in line or "#" in line or "{" in line or "}" in line or ";" in line or "," in line)


def _is_one_statement(tokens: list[str]) -> bool:
    """Whether a line's ``tokens`` end where they start: no ';', at most one '{ … }' pair."""
    if ";" in tokens:
        return False
    opened = tokens.count("{")
    return opened == tokens.count("}") and (opened == 0 or (opened == 1 and tokens.index("{") < tokens.index("}")))


def _tokens(line: str) -> list[str]:
    if '"' not in line and "#" not in line:
        # Padding the punctuation and splitting is a third of the cost of the regex.
        if "{" in line or "}" in line or ";" in line or "," in line:
            line = line.replace("{", " { ").replace("}", " } ").replace(";", " ; ").replace(",", " , ")
        return line.split()
    tokens = _TOKEN.findall(line)
    if tokens and tokens[-1][0] == "#":
        tokens.pop()
    if '"' in tokens:
        raise InputError("unterminated string", field='"')
    return tokens


def _name(token: str, what: str) -> str:
    if token[:1] == '"' and len(token) > 1:
        token = token[1:-1]
    if not _NAME.fullmatch(token) or len(token.encode()) > NAME_MAX:
        raise InputError(f"not a valid {what} name: {token!r}", field=what)
    return token


def _string(token: str, what: str) -> str:
    if token[:1] == '"':
        return token[1:-1]
    if not _NAME.fullmatch(token):
        raise InputError(f"{what} must be a string, not {token!r}", field=what)
    return token


def _u32(text: str) -> int:
    if not _U32.fullmatch(text):
        raise InputError(f"not a 32-bit number: {text!r}")
    value = int(text, 0) if text[1:2] in ("x", "X") else int(text)
    if value > 0xFFFFFFFF:
        raise InputError(f"{text} does not fit in 32 bits")
    return value


def _count(text: str, what: str, low: int = 0, high: int = 0xFFFFFFFF) -> int:
    if not _SMALL.fullmatch(text) or not low <= int(text) <= high:
        raise InputError(f"{what} must be a number from {low} to {high}, not {text!r}", field=what)
    return int(text)


def _seconds(text: str) -> int:
    """An nft time: ``10800s``, ``3h``, ``1d2h3m4s`` or plain seconds, in whole seconds."""
    if _SMALL.fullmatch(text):
        return int(text)
    match = _TIME.fullmatch(text)
    if not text or match is None:
        raise InputError(f"not a time: {text!r} (like 3h, 90s or 1m30s)")
    days, hours, minutes, seconds, millis = (int(part or 0) for part in match.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds + millis // 1000


def _address_or_prefix(text: str) -> int | Prefix:
    if "/" not in text:
        return ip_to_int(text)
    address, _, length = text.partition("/")
    value = ip_to_int(address)
    bits = _count(length, "prefix length", 0, 32)
    if bits == 32:
        return value
    mask = (0xFFFFFFFF << (32 - bits)) & 0xFFFFFFFF
    return Prefix(value & mask, mask)


def _protocol(text: str) -> int:
    number = PROTOCOLS.get(text, _OTHER_PROTOCOLS.get(text))
    if number is not None:
        return number
    return _count(text, "protocol", 0, 255)


def _port(text: str) -> int:
    return _count(text, "port", 0, 65535)


# How a value of each key type is read; addresses in rules and anonymous sets may be CIDRs.
_VALUE_PARSERS = {"ipv4_addr": ip_to_int, "inet_proto": _protocol, "inet_service": _port, "mark": _u32}
_MATCH_PARSERS = {**_VALUE_PARSERS, "ipv4_addr": _address_or_prefix}


class _Cursor:
    """The tokens of one statement and a position in them."""

    __slots__ = ("tokens", "i")

    def __init__(self, tokens: list[str], i: int = 0):
        self.tokens, self.i = tokens, i

    def peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, what: str = "more") -> str:
        i = self.i
        if i >= len(self.tokens):
            raise InputError(f"unexpected end: expected {what}")
        self.i = i + 1
        return self.tokens[i]

    def expect(self, *words: str) -> str:
        i = self.i
        token = self.tokens[i] if i < len(self.tokens) else None
        if token not in words:
            found = "the end" if token is None else repr(token)
            raise InputError(f"expected {' or '.join(map(repr, words))}, not {found}", field=token or "")
        self.i = i + 1
        return token

    def accept(self, *words: str) -> str | None:
        i = self.i
        if i < len(self.tokens) and self.tokens[i] in words:
            self.i = i + 1
            return self.tokens[i]
        return None

    def done(self) -> bool:
        return self.i >= len(self.tokens)


# ---- rule expressions ----------------------------------------------------------------------

_VERDICTS: dict[tuple[str, str | None], Verdict] = {}
_SHARED_MAX = 4096  # entries kept by each table of shared ops (_VERDICTS, _SIMPLE_MATCHES)


def _verdict(kind: str, chain: str | None = None) -> Verdict:
    # Thousands of rules share a few verdicts (jump mark-for-masquerade): share the objects.
    key = (kind, chain)
    verdict = _VERDICTS.get(key)
    if verdict is None:
        if len(_VERDICTS) >= _SHARED_MAX:
            _VERDICTS.clear()
        verdict = _VERDICTS[key] = Verdict(kind, chain)
    return verdict


def _parse_verdict(cur: _Cursor, word: str) -> Verdict:
    if word in ("jump", "goto"):
        # Not validated here: the name must turn out to be an existing chain's (see _resolve).
        target = cur.take("a chain name")
        return _verdict(word, target[1:-1] if target[:1] == '"' else target)
    if word in ("accept", "drop", "return", "continue"):
        return _verdict(word)
    raise InputError(f"expected a verdict (accept, drop, return, continue, jump or goto), not {word!r}",
                     field=word)


_SELECTORS = {tuple(name.split()): name for name in SELECTOR_TYPES}
_COMPARISONS = {"==": "==", "eq": "==", "!=": "!=", "ne": "!="}


def _selector(cur: _Cursor, first: str) -> str:
    """A payload or meta selector whose first word was ``first``: ``ip daddr``, ``th dport``…"""
    second = cur.take("what to match")
    selector = _SELECTORS.get((first, second))
    if selector is None:
        raise InputError(f"unknown selector '{first} {second}'", field=f"{first} {second}")
    return selector


def _key(cur: _Cursor, first: str) -> tuple[str, ...]:
    keys = (_selector(cur, first),)
    while cur.peek() == ".":
        cur.i += 1
        keys += (_selector(cur, cur.take("a selector")),)
    return keys


def _comparison(cur: _Cursor) -> str:
    op = _COMPARISONS.get(cur.peek())
    if op is None:
        return "=="
    cur.i += 1
    return op


def _anonymous_items(cur: _Cursor, types: tuple[str, ...], verdicts: bool) -> list:
    """The ``{ … }`` after the opening brace: keys (or ``key : verdict`` pairs), to ``}``."""
    parsers = _key_parsers(types, _MATCH_PARSERS)
    items = []
    while True:
        key = _element_key(cur, parsers)
        if verdicts:
            cur.expect(":")
            items.append((key, _parse_verdict(cur, cur.take("a verdict"))))
        else:
            items.append(key)
        if cur.expect(",", "}") == "}":
            return items


def _key_parsers(types: tuple[str, ...], parsers: dict) -> tuple:
    return tuple(parsers[type_] for type_ in types)


def _element_key(cur: _Cursor, parsers: tuple) -> tuple:
    key = (parsers[0](cur.take("a key")),)
    for parse in parsers[1:]:
        cur.expect(".")
        key += (parse(cur.take("a key")),)
    return key


def _match(cur: _Cursor, first: str):
    """``KEY [. KEY …]`` then ``vmap …``, ``[op] @set`` or ``[op] value``."""
    keys = _key(cur, first)
    token = cur.take("a value, @set or vmap")
    if token == "vmap":
        return _vmap(cur, keys)
    op = _COMPARISONS.get(token)
    if op is None:
        op = "=="
    else:
        token = cur.take("a value or @set")
    if token[:1] == "@":
        return Lookup(keys, _set_reference(token), op, False)
    if len(keys) > 1:
        raise InputError("a concatenation can only be looked up in a set or map", field=" . ".join(keys))
    if token == "{":
        return _value_match(keys[0], op, _anonymous_set(cur, SELECTOR_TYPES[keys[0]]))
    return _simple_match(keys[0], op, token)


def _value_match(selector: str, op: str, value):
    if selector == "meta l4proto":
        return Meta("l4proto", op, value)
    return Payload(selector, op, value)


_SIMPLE_MATCHES: dict[tuple[str, str, str], Payload | Meta] = {}


def _simple_match(selector: str, op: str, token: str):
    """``selector op token``, one value. Thousands of rules repeat one (``meta l4proto tcp``,
    ``ip saddr != 10.0.0.0/8``): the op is made once and shared, as it is immutable."""
    key = (selector, op, token)
    match = _SIMPLE_MATCHES.get(key)
    if match is None:
        if len(_SIMPLE_MATCHES) >= _SHARED_MAX:
            _SIMPLE_MATCHES.clear()
        match = _SIMPLE_MATCHES[key] = _value_match(selector, op, _MATCH_PARSERS[SELECTOR_TYPES[selector]](token))
    return match


def _vmap(cur: _Cursor, keys: tuple[str, ...]):
    target = cur.take("@map or {")
    if target != "{":
        return Lookup(keys, _set_reference(target), "==", True)
    types = tuple(SELECTOR_TYPES[key] for key in keys)
    return AnonVmap(keys, dict(_anonymous_items(cur, types, verdicts=True)))


def _anonymous_set(cur: _Cursor, type_: str):
    items = sorted({key[0] for key in _anonymous_items(cur, (type_,), verdicts=False)}, key=_order)
    # nft compiles a one-element set to a plain comparison.
    return items[0] if len(items) == 1 else AnonSet(tuple(items))


def _order(item) -> tuple[int, int]:
    return (item.network, item.mask) if type(item) is Prefix else (item, 0xFFFFFFFF)


def _set_reference(token: str) -> str:
    if token[:1] != "@":
        raise InputError(f"expected @set, not {token!r}", field=token)
    return _name(token[1:], "set")


def _meta(cur: _Cursor):
    if cur.peek() == "mark":
        cur.i += 1
        return _mark(cur)
    return _match(cur, "meta")


_MARK_OPS = {"or": "or", "|": "or", "xor": "xor", "^": "xor", "and": "and", "&": "and"}


def _mark(cur: _Cursor):
    """After ``mark`` (or ``meta mark``): a check, or ``set``."""
    if cur.accept("set"):
        token = cur.take("a mark")
        if token == "meta":
            cur.expect("mark")
            token = "mark"
        if token != "mark":
            return MarkSet("set", _u32(token))
        op = _MARK_OPS.get(cur.take("or, xor or and"))
        if op is None:
            raise InputError("expected or, xor or and after 'mark set mark'")
        return MarkSet(op, _u32(cur.take("a mark")))
    mask = 0xFFFFFFFF
    if cur.accept("and", "&"):
        mask = _u32(cur.take("a mask"))
    op = _comparison(cur)
    return MarkCheck(mask, op, _u32(cur.take("a mark")))


def _ct(cur: _Cursor):
    cur.expect("state")
    op = _comparison(cur)
    token = cur.take("a conntrack state")
    names = []
    if token == "{":
        while True:
            names.append(cur.take("a conntrack state"))
            if cur.expect(",", "}") == "}":
                break
    else:
        names.append(token)
        while cur.accept(","):
            names.append(cur.take("a conntrack state"))
    for name in names:
        if name not in CT_STATES:
            raise InputError(f"unknown conntrack state {name!r} (expected {', '.join(CT_STATES)})", field=name)
    return CtState(op, frozenset(names))


def _fib(cur: _Cursor):
    which = cur.expect("saddr", "daddr")
    cur.expect("type")
    op = _comparison(cur)
    kind = cur.take("an address type")
    if kind not in FIB_TYPES:
        raise InputError(f"unknown address type {kind!r}", field=kind)
    return Fib(which, op, kind)


def _numgen(cur: _Cursor):
    cur.expect("random")
    cur.expect("mod")
    mod = _count(cur.take("a modulus"), "numgen modulus", 1)
    offset = _count(cur.take("a number"), "numgen offset") if cur.accept("offset") else 0
    cur.expect("vmap")
    cur.expect("{")
    pairs = _anonymous_items(cur, ("mark",), verdicts=True)
    return Numgen(mod, offset, {key[0]: verdict for key, verdict in pairs})


def _dnat(cur: _Cursor):
    cur.accept("ip")
    cur.expect("to")
    address, colon, port = cur.take("an address").partition(":")
    return Dnat(ip_to_int(address), _count(port, "port", 1, 65535) if colon else None)


def _masquerade(cur: _Cursor):
    return Masquerade(cur.accept("fully-random") is not None)


def _counter(cur: _Cursor):
    if not cur.accept("packets"):
        return Counter()
    packets = _u64(cur.take("a packet count"))
    cur.expect("bytes")
    return Counter(packets, _u64(cur.take("a byte count")))


def _u64(text: str) -> int:
    if not _COUNT64.fullmatch(text) or int(text) >= 2**64:
        raise InputError(f"not a 64-bit count: {text!r}")
    return int(text)


def _update(cur: _Cursor):
    name = _set_reference(cur.take("@set"))
    cur.expect("{")
    key = _selector(cur, cur.take("a selector"))
    cur.expect("}")
    return UpdateSet(name, key)


def _reject(cur: _Cursor):
    if cur.accept("with"):
        kind = cur.expect("icmp", "icmpx", "tcp")
        if kind == "tcp":
            cur.expect("reset")
        else:
            cur.accept("type")
            cur.take("an icmp type")
    return _verdict("reject")


# A rule statement, by its first word: parse(cursor after that word) → op. Matches
# (``ip daddr …``) and verdicts are parsed apart, as they need the word.
_MATCH_WORDS = frozenset(("ip", "th", "tcp", "udp", "sctp"))
_STATEMENTS = {
    "meta": _meta, "mark": _mark, "ct": _ct, "fib": _fib, "numgen": _numgen, "dnat": _dnat,
    "masquerade": _masquerade, "counter": _counter, "update": _update, "add": _update, "reject": _reject,
}
_VERDICT_WORDS = frozenset(("accept", "drop", "return", "continue", "jump", "goto"))


def parse_rule(tokens: list[str], start: int, line: int = 0) -> Rule:
    """One rule's statements, ``tokens[start:]``, optionally ending in ``comment "…"``."""
    return _parse_rule(_Cursor(tokens, start), line)


def _parse_rule(cur: _Cursor, line: int) -> Rule:
    tokens = cur.tokens
    exprs = []
    n = len(tokens)
    while cur.i < n:
        word = tokens[cur.i]
        cur.i += 1
        if word == "comment":
            comment = _string(cur.take("a comment"), "comment")
            if not cur.done():
                raise InputError(f"{cur.peek()!r} after the rule's comment", field=cur.peek())
            return _rule(exprs, comment, line)
        if exprs and _is_verdict(exprs[-1]):
            raise InputError(f"{word!r} after the rule's verdict", field=word)
        if word in _MATCH_WORDS:
            exprs.append(_match(cur, word))
            continue
        if word in _VERDICT_WORDS:
            exprs.append(_parse_verdict(cur, word))
            continue
        parse = _STATEMENTS.get(word)
        if parse is None:
            raise InputError(f"unknown expression {word!r}", field=word)
        exprs.append(parse(cur))
    return _rule(exprs, None, line)


def _is_verdict(op) -> bool:
    """Whether ``op`` decides the packet's fate, which ends a rule: a verdict, or a verdict
    map (nft parses ``… vmap …`` as a verdict statement)."""
    kind = type(op)
    return kind is Verdict or kind is Numgen or kind is AnonVmap or (kind is Lookup and op.vmap)


def _rule(exprs: list, comment: str | None, line: int) -> Rule:
    if not exprs:
        raise InputError("empty rule")
    return Rule(tuple(exprs), comment, line)


# ---- references ------------------------------------------------------------------------------

def rule_references(rule: Rule) -> tuple[list[str], list[tuple[str, tuple[str, ...], str]]]:
    """The chains a rule jumps or goes to, and its set uses as (set, key selectors, how)
    where how is "set", "vmap" or "update"."""
    chains: list[str] = []
    sets = []
    for op in rule.exprs:
        kind = type(op)
        if kind is Verdict:
            if op.chain is not None:
                chains.append(op.chain)
        elif kind is Lookup:
            sets.append((op.set, op.keys, "vmap" if op.vmap else "set"))
        elif kind is Numgen or kind is AnonVmap:
            chains.extend(v.chain for v in op.elements.values() if v.chain is not None)
        elif kind is UpdateSet:
            sets.append((op.set, (op.key,), "update"))
    return chains, sets


def _names_referenced(rule: Rule) -> tuple[list[str], list[str]]:
    chains, sets = rule_references(rule)
    return chains, [use[0] for use in sets]


def _element_chains(nft_set: NftSet):
    if nft_set.is_map:
        return [v.chain for v in nft_set.elements.values() if v.chain is not None]
    return []


# ---- the loader ----------------------------------------------------------------------------

class _Block:
    """An open ``{`` that holds statements: a table, chain or set body."""

    __slots__ = ("kind", "table", "obj", "existed", "line", "draft")

    def __init__(self, kind, table, obj, existed, line, draft=None):
        self.kind, self.table, self.obj = kind, table, obj
        self.existed, self.line, self.draft = existed, line, draft


class _TableState:
    """A table being edited. With a base ruleset, either its objects are copied before a
    change (``load``), or they are edited in place and the :class:`_Journal` logs each first
    change (``apply``). ``existed``: the table comes from the base."""

    __slots__ = ("table", "key", "shared_chains", "shared_sets", "existed", "journal")

    def __init__(self, table: Table, shared: bool, in_place: bool = False):
        self.table = table
        self.key = (table.family, table.name)
        self.existed = shared
        self.journal = _Journal(table) if in_place else None
        self.shared_chains = set(table.chains) if shared and not in_place else set()
        self.shared_sets = set(table.sets) if shared and not in_place else set()

    def chain(self, name: str) -> Chain:
        chain = self.table.chains[name]
        journal = self.journal
        if journal is not None and name not in journal.chains:
            journal.chains[name] = chain
            chain = self.table.chains[name] = _copy_chain(chain)
        elif self.shared_chains and name in self.shared_chains:
            self.shared_chains.discard(name)
            chain = self.table.chains[name] = _copy_chain(chain)
        return chain

    def new_chain(self, name: str) -> Chain:
        if self.journal is not None:
            self.journal.chains.setdefault(name, self.table.chains.get(name, _ABSENT))
        chain = self.table.chains[name] = Chain(name)
        return chain

    def delete_chain(self, name: str) -> None:
        self.chain(name)  # logs the original
        del self.table.chains[name]

    def new_set(self, nft_set: NftSet) -> None:
        if self.journal is not None:
            self.journal.sets.setdefault(nft_set.name, self.table.sets.get(nft_set.name, _ABSENT))
        self.table.sets[nft_set.name] = nft_set

    def delete_set(self, name: str) -> None:
        self.set(name)  # logs the original
        del self.table.sets[name]

    def note_element(self, nft_set: NftSet, key: tuple) -> None:
        """Before ``key`` of ``nft_set`` is added or deleted (in place: log its old data)."""
        if self.journal is not None:
            self.journal.element(nft_set, key)

    def set(self, name: str) -> NftSet:
        nft_set = self.table.sets[name]
        if self.journal is not None:
            self.journal.touch_set(name, nft_set)
        elif self.shared_sets and name in self.shared_sets:
            self.shared_sets.discard(name)
            nft_set = self.table.sets[name] = NftSet(nft_set.name, nft_set.key_types, nft_set.data_type,
                                                     nft_set.flags, nft_set.timeout, nft_set.comment,
                                                     dict(nft_set.elements))
        return nft_set


def _copy_chain(chain: Chain) -> Chain:
    return Chain(chain.name, chain.type, chain.hook, chain.priority, chain.policy, chain.comment,
                 list(chain.rules))


class _Journal:
    """A table edited in place: the original of every chain, set and element the text
    touches (to undo the text on an error) and, from them, the text's net effect."""

    __slots__ = ("table", "comment", "chains", "sets", "set_fields", "elements")

    def __init__(self, table: Table):
        self.table = table
        self.comment = table.comment
        self.chains: dict[str, Chain] = {}  # name → the original chain or _ABSENT
        self.sets: dict[str, NftSet] = {}  # name → the original set or _ABSENT
        self.set_fields: dict[int, tuple] = {}  # id(set) → (set, comment, flags, timeout)
        self.elements: dict[int, tuple[NftSet, dict]] = {}  # id(set) → (set, {key: old data})

    def touch_set(self, name: str, nft_set: NftSet) -> None:
        self.sets.setdefault(name, nft_set)
        if id(nft_set) not in self.set_fields:
            self.set_fields[id(nft_set)] = (nft_set, nft_set.comment, nft_set.flags, nft_set.timeout)

    def element(self, nft_set: NftSet, key: tuple) -> None:
        entry = self.elements.get(id(nft_set))
        if entry is None:
            entry = self.elements[id(nft_set)] = (nft_set, {})
        if key not in entry[1]:
            entry[1][key] = nft_set.elements.get(key, _ABSENT)

    def undo(self) -> None:
        for nft_set, log in self.elements.values():
            for key, data in log.items():
                if data is _ABSENT:
                    nft_set.elements.pop(key, None)
                else:
                    nft_set.elements[key] = data
        for nft_set, comment, flags, timeout in self.set_fields.values():
            nft_set.comment, nft_set.flags, nft_set.timeout = comment, flags, timeout
        for entries, log in ((self.table.chains, self.chains), (self.table.sets, self.sets)):
            for name, original in log.items():
                if original is _ABSENT:
                    entries.pop(name, None)
                else:
                    entries[name] = original
        self.table.comment = self.comment

    def changes(self) -> TableChanges:
        out = TableChanges()
        for name, original in self.chains.items():
            if name in self.table.chains:
                out.chains.append(name)
            elif original is not _ABSENT:
                out.deleted_chains.append(name)
        for name, original in self.sets.items():
            current = self.table.sets.get(name)
            if current is original:
                continue
            if original is not _ABSENT:
                out.deleted_sets.append(name)
            if current is not None:
                out.new_sets.append(name)
        for nft_set, log in self.elements.values():
            if self.table.sets.get(nft_set.name) is not nft_set or self.sets.get(nft_set.name) is not nft_set:
                continue  # a new or deleted set: whole
            for key, old in log.items():
                new = nft_set.elements.get(key, _ABSENT)
                if new == old:
                    continue
                if old is not _ABSENT:
                    out.deleted_elements.setdefault(nft_set.name, []).append(key)
                if new is not _ABSENT:
                    out.added_elements.setdefault(nft_set.name, []).append((key, new))
        return out


@dataclass
class _SetDraft:
    """The flags and timeout a set or map body declares; they may come before its type."""

    flags: frozenset | None = None
    timeout: int | None = None


class _Loader:
    def __init__(self, source: str, base: NftRuleset | None, in_place: bool = False):
        self.source = source
        self.tables: dict[tuple[str, str], _TableState] = {}
        if base is not None:
            for key, table in base.tables.items():
                if not in_place:
                    table = Table(table.family, table.name, table.comment, dict(table.chains), dict(table.sets))
                self.tables[key] = _TableState(table, shared=True, in_place=in_place)
        self.journals = [state.journal for state in self.tables.values() if state.journal is not None]
        self.blocks: list[_Block] = []
        self.statement: list[str] = []
        self.depth = 0  # open expression braces in the statement
        self.statement_line = 0
        self.breaks: list[tuple[int, int]] = []  # (token index, line) where a statement continues
        self.chain_references: dict[tuple, int] = {}  # (table, chain) → first line referring to it
        self.set_references: dict[tuple, int] = {}  # (table, set, keys, how) → first line
        # References to each (table, chain) and (table, set), counted from the first delete on.
        self.chain_counts: _Counter | None = None
        self.set_counts: _Counter | None = None
        self.ruled_chains: set[tuple] = set()  # (table, chain) that got rules in this text

    def undo(self) -> None:
        """Put every table edited in place back as it was (after an error)."""
        for journal in self.journals:
            journal.undo()

    # -- reading --
    def run(self, text: str) -> NftRuleset:
        for number, line in enumerate(text.split("\n"), 1):
            try:
                self._line(line, number)
            except InputError as exc:
                line = exc.line if isinstance(exc, _AtLine) else number
                raise InputError(exc.message, f"{self.source}:{line}", exc.field) from None
        if self.depth:
            raise InputError("'{' is never closed", f"{self.source}:{self.statement_line}", "{")
        if self.blocks:
            block = self.blocks[-1]
            raise InputError(f"the {block.kind} block is never closed", f"{self.source}:{block.line}", "}")
        self._resolve()
        return NftRuleset({key: state.table for key, state in self.tables.items()}, self.source)

    def _line(self, line: str, number: int) -> None:
        plain = not self.statement and _is_plain(line)
        tokens = line.split() if plain else _tokens(line)
        if not tokens:
            return
        if self.depth:  # the statement goes on here
            self.breaks.append((len(self.statement), number))
        if plain or (not self.statement and _is_one_statement(tokens)
                     and ("{" not in tokens or not self._opens_block(tokens))):
            # One whole statement, as nearly every line is: no need to follow it token by token.
            self.statement_line = number
            self._statement(tokens, number)
            return
        for token in tokens:
            if token == "{":
                if self.depth == 0 and self._opens_block(self.statement):
                    self._open_block(number)
                    continue
                self.depth += 1
            elif token == "}":
                if self.depth == 0:
                    self._end_statement()
                    self._close_block()
                    continue
                self.depth -= 1
            elif token == ";" and self.depth == 0:
                self._end_statement()
                continue
            if not self.statement:
                self.statement_line = number
            self.statement.append(token)
        if not self.depth:
            self._end_statement()

    def _end_statement(self) -> None:
        if self.statement:
            tokens, self.statement = self.statement, []
            try:
                self._statement(tokens, self.statement_line)
            except InputError as exc:
                # A statement over several lines is reported where it starts, unless the
                # error knows its line (an element of a long list).
                if self.breaks and not isinstance(exc, _AtLine):
                    raise _AtLine(exc.message, exc.field, self.statement_line) from None
                raise
            finally:
                self.breaks = []

    def _line_of(self, index: int) -> int:
        """The line of the statement's ``index``-th token (statements may span lines)."""
        position = bisect.bisect_right(self.breaks, (index, float("inf")))
        return self.breaks[position - 1][1] if position else self.statement_line

    # -- blocks --
    def _opens_block(self, words: list[str]) -> bool:
        """Whether a '{' after ``words`` opens a block (else it opens an anonymous set or map)."""
        if not words:
            return False
        if not self.blocks:
            return words[0] == "table" or (words[0] in ("add", "create") and len(words) > 1
                                            and words[1] in ("table", "chain", "set", "map"))
        return self.blocks[-1].kind == "table" and words[0] in ("chain", "set", "map")

    def _open_block(self, number: int) -> None:
        words, self.statement = self.statement, []
        cur = _Cursor(words)
        create = False
        if not self.blocks:
            verb = cur.take()
            create = verb == "create"
            kind = verb if verb == "table" else cur.take()
            state = self._table(cur, create=kind == "table", exclusive=create and kind == "table")
        else:
            kind = cur.take()
            state = self.blocks[-1].table
        if kind == "table":
            self._no_more(cur)
            self.blocks.append(_Block("table", state, state.table, True, number))
            return
        name = _name(cur.take(f"a {kind} name"), kind)
        self._no_more(cur)
        if kind == "chain":
            existed = name in state.table.chains
            if existed and create:
                raise InputError(f"chain {name} already exists", field=name)
            chain = state.chain(name) if existed else self._new_chain(state, name)
            self.blocks.append(_Block("chain", state, chain, existed, number))
        else:
            existed = name in state.table.sets
            if existed and create:
                raise InputError(f"{kind} {name} already exists", field=name)
            self.blocks.append(_Block(kind, state, name, existed, number, _SetDraft()))

    def _close_block(self) -> None:
        if not self.blocks:
            raise InputError("'}' without an open block", field="}")
        block = self.blocks.pop()
        if block.kind in ("set", "map"):
            self._finish_set(block)

    # -- statements --
    def _statement(self, tokens: list[str], number: int) -> None:
        if not self.blocks:
            self._command(tokens, number)
        elif self.blocks[-1].kind == "chain":
            self._chain_statement(self.blocks[-1], tokens, number)
        elif self.blocks[-1].kind == "table":
            self._table_statement(self.blocks[-1], tokens)
        else:
            self._set_statement(self.blocks[-1], tokens)

    def _command(self, tokens: list[str], number: int) -> None:
        verb = tokens[0]
        if verb == "add" and len(tokens) > 1 and tokens[1] == "rule":  # nearly every line
            self._add_rule(tokens, number, insert=False)
            return
        if verb not in ("add", "create", "insert", "flush", "delete", "destroy"):
            raise InputError(f"unknown command {verb!r} (expected add, create, insert, flush, delete "
                             "or destroy, or a table block)", field=verb)
        if len(tokens) < 2:
            raise InputError(f"{verb} what? (table, chain, set, map, rule or element)", field=verb)
        handler = _COMMANDS.get((verb, tokens[1]))
        if handler is None:
            raise InputError(f"cannot {verb} {tokens[1]!r}", field=f"{verb} {tokens[1]}")
        handler(self, _Cursor(tokens, 2), number)

    def _table(self, cur: _Cursor, create: bool = False, exclusive: bool = False) -> _TableState:
        """``[family] name``: the table, created when ``create``."""
        tokens, i = cur.tokens, cur.i
        if i + 1 < len(tokens) and tokens[i] in FAMILIES:
            family, token = tokens[i], tokens[i + 1]
            cur.i = i + 2
        else:
            family, token = FAMILY, cur.take("a table")
            if token in FAMILIES:
                raise InputError(f"expected a table name after {token}", field=token)
        state = self.tables.get((family, token))
        if state is not None and not exclusive:
            return state
        key = (family, _name(token, "table"))
        state = self.tables.get(key)
        if state is not None and exclusive:
            raise InputError(f"table {family} {key[1]} already exists", field=key[1])
        if state is None:
            if not create:
                raise InputError(f"no table {family} {key[1]}", field=key[1])
            state = self.tables[key] = _TableState(Table(family, key[1]), shared=False)
        return state

    def _chain_named(self, state: _TableState, name: str) -> Chain:
        if name not in state.table.chains:
            _name(name, "chain")
            raise InputError(f"no chain {name} in table {state.table.name}", field=name)
        return state.chain(name)

    def _set_named(self, state: _TableState, name: str) -> NftSet:
        if name not in state.table.sets:
            raise InputError(f"no set or map {name} in table {state.table.name}", field=name)
        return state.set(name)

    @staticmethod
    def _no_more(cur: _Cursor) -> None:
        if not cur.done():
            raise InputError(f"unexpected {cur.peek()!r}", field=cur.peek())

    # table
    def _add_table(self, cur: _Cursor, number: int, create: bool = False) -> None:
        self._table(cur, create=True, exclusive=create)
        self._no_more(cur)

    def _delete_table(self, cur: _Cursor, number: int, missing_ok: bool = False) -> None:
        try:
            state = self._table(cur)
        except InputError:
            if missing_ok:
                return
            raise
        self._no_more(cur)
        del self.tables[state.table.family, state.table.name]
        self.chain_counts = self.set_counts = None

    def _flush_table(self, cur: _Cursor, number: int) -> None:
        state = self._table(cur)
        self._no_more(cur)
        for name in list(state.table.chains):
            self._flush_chain_rules(state, name)

    def _flush_ruleset(self, cur: _Cursor, number: int) -> None:
        self._no_more(cur)
        self.tables.clear()
        self.chain_counts = self.set_counts = None

    # chain
    def _new_chain(self, state: _TableState, name: str) -> Chain:
        return state.new_chain(name)

    def _add_chain(self, cur: _Cursor, number: int, create: bool = False) -> None:
        state = self._table(cur)
        name = cur.take("a chain name")
        self._no_more(cur)
        if name in state.table.chains:
            if create:
                raise InputError(f"chain {name} already exists", field=name)
            return
        self._new_chain(state, _name(name, "chain"))

    def _flush_chain(self, cur: _Cursor, number: int) -> None:
        state = self._table(cur)
        name = cur.take("a chain name")
        self._no_more(cur)
        self._chain_named(state, name)
        self._flush_chain_rules(state, name)

    def _flush_chain_rules(self, state: _TableState, name: str) -> None:
        chain = state.chain(name)
        if self.chain_counts is not None or self.set_counts is not None:
            for rule in chain.rules:
                self._count_rule(state.key, rule, -1)
        chain.rules = []

    def _delete_chain(self, cur: _Cursor, number: int, missing_ok: bool = False) -> None:
        state = self._table(cur)
        name = _name(cur.take("a chain name"), "chain")
        self._no_more(cur)
        if name not in state.table.chains and missing_ok:
            return
        chain = self._chain_named(state, name)
        if chain.rules:
            raise InputError(f"chain {name} is not empty (flush it first)", field=name)
        if self._chain_counts()[state.key, name]:
            raise InputError(f"chain {name} is still referenced by a rule or map element", field=name)
        state.delete_chain(name)

    # rule
    def _add_rule(self, tokens: list[str], number: int, insert: bool) -> None:
        cur = _Cursor(tokens, 2)
        state = self._table(cur)
        chain = self._chain_named(state, cur.take("a chain name"))
        if cur.peek() in ("position", "index", "handle"):
            raise InputError(f"rule {cur.peek()}s are not supported", field=cur.peek())
        rule = _parse_rule(cur, number)
        if insert:
            chain.rules.insert(0, rule)
        else:
            chain.rules.append(rule)
        self._note_rule(state, chain.name, rule, number)

    def _insert_rule(self, cur: _Cursor, number: int) -> None:
        self._add_rule(cur.tokens, number, insert=True)

    def _note_rule(self, state: _TableState, chain_name: str, rule: Rule, number: int) -> None:
        chains, sets = rule_references(rule)
        table = state.key
        if state.existed:  # only then are loops searched from the chains given rules
            self.ruled_chains.add((table, chain_name))
        for chain in chains:
            self.chain_references.setdefault((table, chain), number)
        for use in sets:
            self.set_references.setdefault((table, *use), number)
        if self.chain_counts is not None or self.set_counts is not None:
            self._count_names(table, chains, [use[0] for use in sets], 1)

    def _delete_rule(self, cur: _Cursor, number: int) -> None:
        raise InputError("deleting rules by handle is not supported", field="delete rule")

    # set and map
    def _add_set(self, cur: _Cursor, number: int, create: bool = False, kind: str = "set") -> None:
        state = self._table(cur)
        name = _name(cur.take(f"a {kind} name"), kind)
        self._no_more(cur)
        if name not in state.table.sets:
            raise InputError(f"{kind} {name} needs a type: add {kind} … {name} {{ type … ; }}", field=name)
        if create:
            raise InputError(f"{kind} {name} already exists", field=name)

    def _flush_set(self, cur: _Cursor, number: int, kind: str = "set") -> None:
        state = self._table(cur)
        name = _name(cur.take(f"a {kind} name"), kind)
        self._no_more(cur)
        nft_set = self._set_named(state, name)
        if self.chain_counts is not None:
            self.chain_counts.subtract((state.key, c) for c in _element_chains(nft_set))
        if state.journal is None:
            nft_set.elements = {}
            return
        for key in nft_set.elements:
            state.note_element(nft_set, key)
        nft_set.elements.clear()

    def _delete_set(self, cur: _Cursor, number: int, kind: str = "set", missing_ok: bool = False) -> None:
        state = self._table(cur)
        name = _name(cur.take(f"a {kind} name"), kind)
        self._no_more(cur)
        if name not in state.table.sets and missing_ok:
            return
        nft_set = self._set_named(state, name)
        if self._set_counts()[state.key, name]:
            raise InputError(f"{kind} {name} is still used by a rule", field=name)
        if self.chain_counts is not None:
            self.chain_counts.subtract((state.key, c) for c in _element_chains(nft_set))
        state.delete_set(name)

    # element
    def _elements_target(self, cur: _Cursor) -> tuple[_TableState, NftSet, int]:
        state = self._table(cur)
        nft_set = self._set_named(state, _name(cur.take("a set or map name"), "set"))
        cur.expect("{")
        return state, nft_set, cur.i

    def _add_element(self, cur: _Cursor, number: int, create: bool = False) -> None:
        state, nft_set, start = self._elements_target(cur)
        self._add_elements(state, nft_set, cur.tokens, start, create, number)

    def _delete_element(self, cur: _Cursor, number: int, missing_ok: bool = False) -> None:
        state, nft_set, start = self._elements_target(cur)
        for key, data, _ in self._elements(nft_set, cur.tokens, start, data_optional=True):
            if key not in nft_set.elements:
                if missing_ok:
                    continue
                raise InputError(f"{nft_set.name} has no element {_key_text(key)}", field=nft_set.name)
            state.note_element(nft_set, key)
            old = nft_set.elements.pop(key)
            if self.chain_counts is not None and old is not None and old.chain is not None:
                self.chain_counts[state.key, old.chain] -= 1

    def _add_elements(self, state: _TableState, nft_set: NftSet, tokens: list[str], start: int,
                      create: bool, number: int) -> None:
        elements = nft_set.elements
        table = state.key
        for key, data, index in self._elements(nft_set, tokens, start):
            old = elements.get(key, _ABSENT)
            if old is not _ABSENT:
                # The kernel refuses a key it holds with other data (kube-proxy deletes first).
                if create or old != data:
                    raise InputError(f"{nft_set.name} already has {_key_text(key)}", field=nft_set.name)
                continue
            state.note_element(nft_set, key)
            elements[key] = data
            if data is not None and data.chain is not None:
                line = self._line_of(index) if self.breaks else number
                self.chain_references.setdefault((table, data.chain), line)
                if self.chain_counts is not None:
                    self.chain_counts[table, data.chain] += 1

    def _elements(self, nft_set: NftSet, tokens: list[str], start: int, data_optional: bool = False):
        """Each ``key [timeout T] [expires T] [comment "c"] [: verdict]`` up to the closing
        brace, as (key, verdict or None, index of its first token). A map's element needs its
        verdict unless ``data_optional`` (deleting goes by key)."""
        cur = _Cursor(tokens, start)
        if cur.accept("}"):
            self._no_more(cur)
            return
        parsers = _key_parsers(nft_set.key_types, _VALUE_PARSERS)
        while True:
            index = cur.i
            try:
                key = _element_key(cur, parsers)
                while cur.peek() in ("timeout", "expires", "comment"):
                    option = cur.take()
                    value = cur.take(option)
                    if option == "comment":
                        _string(value, "comment")
                    else:
                        _seconds(value)
                data = None
                if nft_set.is_map and (not data_optional or cur.peek() == ":"):
                    cur.expect(":")
                    data = _parse_verdict(cur, cur.take("a verdict"))
                end = cur.expect(",", "}")
            except InputError as exc:
                if self.breaks:
                    raise _AtLine(exc.message, exc.field, self._line_of(max(cur.i - 1, 0))) from None
                raise
            yield key, data, index
            if end == "}":
                self._no_more(cur)
                return

    # -- block statements --
    def _table_statement(self, block: _Block, tokens: list[str]) -> None:
        cur = _Cursor(tokens)
        word = cur.take()
        if word != "comment":
            raise InputError(f"unexpected {word!r} in a table (expected chain, set, map or comment)",
                             field=word)
        block.table.table.comment = _string(cur.take("a comment"), "comment")
        self._no_more(cur)

    def _chain_statement(self, block: _Block, tokens: list[str], number: int) -> None:
        word = tokens[0]
        if word == "type" and len(tokens) > 1 and tokens[1] in CHAIN_TYPES:
            self._chain_type(block, _Cursor(tokens, 1))
        elif word == "policy":
            self._chain_policy(block, _Cursor(tokens, 1))
        elif word == "comment" and len(tokens) == 2:
            block.obj.comment = _string(tokens[1], "comment")
        else:
            rule = parse_rule(tokens, 0, number)
            block.obj.rules.append(rule)
            self._note_rule(block.table, block.obj.name, rule, number)

    def _chain_type(self, block: _Block, cur: _Cursor) -> None:
        chain: Chain = block.obj
        type_ = cur.take()
        cur.expect("hook")
        hook = cur.take("a hook")
        if hook not in CHAIN_TYPES[type_]:
            raise InputError(f"a {type_} chain cannot use hook {hook!r} (expected "
                             f"{', '.join(CHAIN_TYPES[type_])})", field=hook)
        cur.expect("priority")
        priority = _priority("".join(cur.tokens[cur.i:]), hook)
        if type_ == "nat" and priority <= NF_IP_PRI_CONNTRACK:
            raise InputError(f"a nat chain needs a priority above {NF_IP_PRI_CONNTRACK}, not {priority}",
                             field="priority")
        if chain.hook is not None or chain.rules or block.existed:
            if (chain.type, chain.hook, chain.priority) != (type_, hook, priority):
                raise InputError(f"chain {chain.name} exists as a different chain: its type, hook and "
                                 "priority cannot change", field=chain.name)
            return
        chain.type, chain.hook, chain.priority = type_, hook, priority
        chain.policy = chain.policy or "accept"

    def _chain_policy(self, block: _Block, cur: _Cursor) -> None:
        chain: Chain = block.obj
        policy = cur.expect("accept", "drop")
        self._no_more(cur)
        if chain.hook is None:
            raise InputError(f"chain {chain.name} is no base chain: it cannot have a policy", field="policy")
        chain.policy = policy

    def _set_statement(self, block: _Block, tokens: list[str]) -> None:
        cur = _Cursor(tokens)
        word = cur.take()
        draft: _SetDraft = block.draft
        if word == "type":
            self._set_type(block, cur)
            return
        if word == "elements":
            cur.expect("=")
            cur.expect("{")
            nft_set = self._declared_set(block)
            self._add_elements(block.table, nft_set, tokens, cur.i, False, self.statement_line)
            return
        if word == "flags":
            flags = [flag for flag in tokens[1:] if flag != ","]
            if not flags:
                raise InputError("flags needs at least one flag", field="flags")
            for flag in flags:
                if flag not in SET_FLAGS:
                    raise InputError(f"unknown set flag {flag!r} (expected {', '.join(SET_FLAGS)})", field=flag)
            draft.flags = frozenset(flags)
        elif word == "timeout":
            draft.timeout = _seconds(cur.take("a time"))
        elif word == "gc-interval":
            _seconds(cur.take("a time"))
        elif word == "size":
            _count(cur.take("a size"), "size", 1)
        elif word == "policy":
            cur.expect("performance", "memory")
        elif word == "comment":
            self._declared_set(block).comment = _string(cur.take("a comment"), "comment")
        elif word != "auto-merge":
            raise InputError(f"unexpected {word!r} in a {block.kind} (expected type, flags, timeout, "
                             "size, policy, comment or elements)", field=word)
        if word not in ("flags", "auto-merge"):
            self._no_more(cur)
        self._apply_draft(block)

    def _set_type(self, block: _Block, cur: _Cursor) -> None:
        types = [cur.take("a type")]
        while cur.accept("."):
            types.append(cur.take("a type"))
        data_type = None
        if cur.accept(":"):
            data_type = cur.take("a data type")
        self._no_more(cur)
        for type_ in types:
            if type_ not in KEY_TYPES:
                raise InputError(f"unsupported key type {type_!r} (expected {', '.join(KEY_TYPES)})",
                                 field=type_)
        if block.kind == "map" and data_type != "verdict":
            raise InputError(f"unsupported map data type {data_type!r}: only verdict maps are modelled",
                             field="type")
        if block.kind == "set" and data_type is not None:
            raise InputError("a set has no data type: declare a map", field="type")
        name = block.obj
        state = block.table
        if block.existed:
            existing = state.table.sets[name]
            if (existing.key_types, existing.data_type) != (tuple(types), data_type):
                raise InputError(f"{block.kind} {name} exists with another type", field=name)
        else:
            state.new_set(NftSet(name, tuple(types), data_type))
        self._apply_draft(block)

    def _declared_set(self, block: _Block) -> NftSet:
        name = block.obj
        if name not in block.table.table.sets:
            raise InputError(f"{block.kind} {name} needs its type first", field=name)
        return block.table.set(name)

    def _apply_draft(self, block: _Block) -> None:
        """Give a new set what its body declared so far; an existing one must match."""
        if block.obj not in block.table.table.sets:
            return
        draft: _SetDraft = block.draft
        nft_set = block.table.set(block.obj)
        if block.existed:
            for what in ("flags", "timeout"):
                value = getattr(draft, what)
                if value is not None and value != getattr(nft_set, what):
                    raise InputError(f"{block.kind} {nft_set.name} exists with other {what}", field=what)
            return
        if draft.flags is not None:
            nft_set.flags = draft.flags
        if draft.timeout is not None:
            nft_set.timeout = draft.timeout

    def _finish_set(self, block: _Block) -> None:
        if block.obj not in block.table.table.sets:
            raise InputError(f"{block.kind} {block.obj} needs a type", field=block.obj)
        nft_set = block.table.table.sets[block.obj]
        if nft_set.is_map != (block.kind == "map"):
            raise InputError(f"{block.obj} is a {'map' if nft_set.is_map else 'set'}, not a {block.kind}",
                             field=block.obj)

    # -- references --
    def _chain_counts(self) -> _Counter:
        """References per (table, chain) from rules and map elements, counted on the first delete."""
        if self.chain_counts is None:
            self.chain_counts = _Counter()
            for state in self.tables.values():
                for nft_set in state.table.sets.values():
                    self.chain_counts.update((state.key, c) for c in _element_chains(nft_set))
            self._count_all_rules(self.chain_counts, 0)
        return self.chain_counts

    def _set_counts(self) -> _Counter:
        if self.set_counts is None:
            self.set_counts = _Counter()
            self._count_all_rules(self.set_counts, 1)
        return self.set_counts

    def _count_all_rules(self, counts: _Counter, which: int) -> None:
        """Add every rule's chain (``which`` 0) or set (1) references to ``counts``."""
        for state in self.tables.values():
            table = state.key
            for chain in state.table.chains.values():
                for rule in chain.rules:
                    counts.update((table, name) for name in _names_referenced(rule)[which])

    def _count_rule(self, table: tuple[str, str], rule: Rule, sign: int) -> None:
        self._count_names(table, *_names_referenced(rule), sign)

    def _count_names(self, table: tuple[str, str], chains: list[str], sets: list[str], sign: int) -> None:
        for counts, names in ((self.chain_counts, chains), (self.set_counts, sets)):
            if counts is not None:
                for name in names:
                    counts[table, name] += sign

    def _resolve(self) -> None:
        """References made in this text must name existing objects of the right kind; the
        first bad one (by line) is reported."""
        tables = {key: state.table for key, state in self.tables.items()}
        errors = []
        for (table, name), line in self.chain_references.items():
            chain = tables[table].chains.get(name) if table in tables else None
            if chain is None or chain.is_base:
                errors.append((line, _missing_chain_error(name, table, chain, f"{self.source}:{line}")))
        for (table, name, keys, how), line in self.set_references.items():
            nft_set = tables[table].sets.get(name) if table in tables else None
            try:
                _check_set_use(nft_set, name, keys, how, f"{self.source}:{line}")
            except InputError as error:
                errors.append((line, error))
        if errors:
            raise min(errors, key=lambda item: item[0])[1]
        for key, state in self.tables.items():
            table = state.table
            roots = table.chains
            if state.existed:  # a new loop runs through a chain this text jumps to or adds rules to
                roots = [chain for (t, chain) in [*self.chain_references, *self.ruled_chains] if t == key]
            loop = _find_loop(table, roots)
            if loop:
                # A new loop needs a reference made in this text: report the first one on it.
                lines = [self.chain_references.get((key, chain)) for chain in loop]
                line = min((n for n in lines if n is not None), default=None)
                where = self.source if line is None else f"{self.source}:{line}"
                raise InputError(f"chain loop {' -> '.join(loop)} (the kernel refuses loops)", where, loop[0])


_ABSENT = object()


class _AtLine(InputError):
    """An error in a statement that spans lines, with the line it belongs to."""

    def __init__(self, message: str, field: str, line: int):
        super().__init__(message, field=field)
        self.line = line


def _key_text(key: tuple) -> str:
    return " . ".join(map(str, key))


def _priority(text: str, hook: str) -> int:
    """``-110``, ``dstnat``, ``dstnat-10`` or ``dstnat - 10`` (blanks already removed)."""
    match = _PRIORITY.fullmatch(text)
    if match is None:
        raise InputError(f"not a priority: {text!r}", field="priority")
    number, name, sign, offset = match.groups()
    if number is not None:
        value = int(number)
        if not -2**31 <= value < 2**31:
            raise InputError(f"priority {value} does not fit in 32 bits", field="priority")
        return value
    if name not in STANDARD_PRIORITIES:
        raise InputError(f"unknown priority {name!r} (expected {', '.join(STANDARD_PRIORITIES)} or a number)",
                         field="priority")
    value, hooks = STANDARD_PRIORITIES[name]
    if hooks is not None and hook not in hooks:
        raise InputError(f"priority {name} cannot be used with hook {hook}", field="priority")
    if sign is not None:
        value += int(offset) if sign == "+" else -int(offset)
    return value


def _missing_chain_error(name: str, table: tuple[str, str], chain: Chain | None, where: str) -> InputError:
    if chain is None:
        return InputError(f"no chain {name} in table {' '.join(table)}", where, name)
    return InputError(f"cannot jump or go to the base chain {name}", where, name)


def _check_set_use(nft_set: NftSet | None, name: str, keys: tuple[str, ...], how: str, where: str) -> None:
    if nft_set is None:
        raise InputError(f"no set or map {name}", where, name)
    if how == "vmap" and nft_set.data_type != "verdict":
        raise InputError(f"vmap needs a verdict map, and {name} is a set", where, name)
    if how != "vmap" and nft_set.is_map:
        raise InputError(f"{name} is a map: look it up with vmap", where, name)
    wanted = tuple(SELECTOR_TYPES[key] for key in keys)
    if wanted != nft_set.key_types:
        raise InputError(f"{' . '.join(keys)} ({' . '.join(wanted)}) does not fit the key of {name} "
                         f"({' . '.join(nft_set.key_types)})", where, name)


def _find_loop(table: Table, roots) -> list[str] | None:
    """A cycle of chains reachable from the chains ``roots``, which the kernel refuses (ELOOP)."""
    edges = _Edges(table)
    done: set[str] = set()
    for root in roots:
        if root not in done and root in table.chains:
            if edges[root] <= done:  # most chains: leads only to chains already cleared
                done.add(root)
                continue
            loop = _loop_from(root, edges, done)
            if loop:
                return loop
    return None


class _Edges(dict):
    """chain → the chains its rules can lead to, computed on first use."""

    def __init__(self, table: Table):
        super().__init__()
        self.table = table
        self.map_targets: dict[str, set[str]] = {}

    def __missing__(self, name: str) -> set[str]:
        chain = self.table.chains.get(name)
        targets = self[name] = set()
        for rule in chain.rules if chain is not None else ():
            # Only a rule's verdict, its last op, can lead to another chain.
            last = rule.exprs[-1]
            kind = type(last)
            if kind is Verdict:
                if last.chain is not None:
                    targets.add(last.chain)
            elif kind is Numgen or kind is AnonVmap:
                targets.update(v.chain for v in last.elements.values() if v.chain is not None)
            elif kind is Lookup and last.vmap:
                targets |= self.targets_of_map(last.set)
        return targets

    def targets_of_map(self, name: str) -> set[str]:
        if name not in self.map_targets:
            nft_set = self.table.sets.get(name)
            self.map_targets[name] = set(_element_chains(nft_set)) if nft_set is not None else set()
        return self.map_targets[name]


def _loop_from(root: str, edges: dict[str, set[str]], done: set[str]) -> list[str] | None:
    """Depth-first walk from ``root``; ``done`` collects chains proven to be on no loop."""
    path, on_path, pending = [root], {root}, [iter(edges[root])]
    while pending:
        target = next(pending[-1], None)
        if target is None:
            finished = path.pop()
            on_path.discard(finished)
            done.add(finished)
            pending.pop()
        elif target in on_path:
            return path[path.index(target):] + [target]
        elif target not in done:
            if edges[target] <= done:  # leads only to cleared chains: on no loop either
                done.add(target)
                continue
            path.append(target)
            on_path.add(target)
            pending.append(iter(edges[target]))
    return None


def _with(handler, **fixed):
    def command(loader: _Loader, cur: _Cursor, number: int) -> None:
        handler(loader, cur, number, **fixed)
    return command


_COMMANDS = {
    ("add", "table"): _Loader._add_table,
    ("create", "table"): _with(_Loader._add_table, create=True),
    ("delete", "table"): _Loader._delete_table,
    ("destroy", "table"): _with(_Loader._delete_table, missing_ok=True),
    ("flush", "table"): _Loader._flush_table,
    ("flush", "ruleset"): _Loader._flush_ruleset,
    ("add", "chain"): _Loader._add_chain,
    ("create", "chain"): _with(_Loader._add_chain, create=True),
    ("flush", "chain"): _Loader._flush_chain,
    ("delete", "chain"): _Loader._delete_chain,
    ("destroy", "chain"): _with(_Loader._delete_chain, missing_ok=True),
    ("insert", "rule"): _Loader._insert_rule,
    ("delete", "rule"): _Loader._delete_rule,
    ("add", "set"): _Loader._add_set,
    ("create", "set"): _with(_Loader._add_set, create=True),
    ("add", "map"): _with(_Loader._add_set, kind="map"),
    ("create", "map"): _with(_Loader._add_set, create=True, kind="map"),
    ("flush", "set"): _Loader._flush_set,
    ("flush", "map"): _with(_Loader._flush_set, kind="map"),
    ("delete", "set"): _Loader._delete_set,
    ("delete", "map"): _with(_Loader._delete_set, kind="map"),
    ("destroy", "set"): _with(_Loader._delete_set, missing_ok=True),
    ("destroy", "map"): _with(_Loader._delete_set, kind="map", missing_ok=True),
    ("add", "element"): _Loader._add_element,
    ("create", "element"): _with(_Loader._add_element, create=True),
    ("delete", "element"): _Loader._delete_element,
    ("destroy", "element"): _with(_Loader._delete_element, missing_ok=True),
}
