"""IPVS loader: ``ipvsadm-save -n``, ``ipset save`` and kpbench's IPVS-mode output → plain data.

kube-proxy's IPVS mode programs four things, and kpbench's writer (bench/proxies/ipvs.py) prints
each as the tool that shows it does, one section after another. A section starts with its
marker line and runs to the next marker; lines before the first marker may only be blank or
comments (the writer puts the sysctls kube-proxy sets there):

``# kpbench: ipvsadm-save -n``
    virtual services and their real servers, as ``ipvsadm-save -n`` prints them
``# kpbench: ipset save``
    the sets, as ``ipset save`` prints them
``# kpbench: iptables-save``
    the small, constant iptables ruleset, in iptables-save / iptables-restore format
``# kpbench: ip -4 addr show kube-ipvs0``
    the addresses bound to the dummy interface: the ``inet ADDR/PREFIX ...`` lines of that
    command (its interface, ``link/`` and ``valid_lft`` lines may be there too and are skipped)

:func:`load` reads all four; :func:`load_ipvsadm` and :func:`load_ipset` read a node's real
``ipvsadm-save -n`` and ``ipset save`` output. The model is IPv4-only, like the kernels.
Addresses are host-order ints, protocols IP protocol numbers. Every piece of bad input raises
:class:`bench.errors.InputError` naming ``<source>:<line>`` and the option at fault.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from bench.errors import InputError
from bench.loaders import iptables
from bench.netaddr import PROTOCOL_NAMES, PROTOCOLS, int_to_ip, ip_to_int, parse_cidr, parse_port
from kernels import layout as L

__all__ = ["RealServer", "VirtualService", "IpSet", "IpvsRuleset", "load", "load_ipvsadm",
           "load_ipset", "dump_ipvsadm", "dump_ipset", "dump_addresses", "kernel_arrays"]

SECTION_IPVSADM = "# kpbench: ipvsadm-save -n"
SECTION_IPSET = "# kpbench: ipset save"
SECTION_IPTABLES = "# kpbench: iptables-save"
SECTION_ADDRESSES = "# kpbench: ip -4 addr show kube-ipvs0"
SECTIONS = (SECTION_IPVSADM, SECTION_IPSET, SECTION_IPTABLES, SECTION_ADDRESSES)
_MARKER = "# kpbench: "

DUMMY_DEVICE = "kube-ipvs0"

# The kernel's schedulers (net/netfilter/ipvs/ip_vs_*.c); ipvsadm passes the name through.
SCHEDULERS = ("rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "fo", "ovf", "mh", "twos")
IPVSADM_DEFAULT_SCHEDULER = "wlc"  # what ipvsadm asks for without -s
IPVSADM_DEFAULT_PERSISTENCE = 300  # seconds, for -p without a timeout
_MAX_PERSISTENCE = 86400 * 31  # ipvsadm's parse_timeout

# Service flags (uapi linux/ip_vs.h, IP_VS_SVC_F_*). The scheduler flags mean what the
# scheduler makes of them: for sh and mh, SCHED1 is "fallback" and SCHED2 "hash the port too".
FLAG_PERSISTENT, FLAG_HASHED, FLAG_ONEPACKET = 0x0001, 0x0002, 0x0004
FLAG_SCHED1, FLAG_SCHED2, FLAG_SCHED3 = 0x0008, 0x0010, 0x0020
_GENERIC_SCHED_FLAGS = {"flag-1": FLAG_SCHED1, "flag-2": FLAG_SCHED2, "flag-3": FLAG_SCHED3}
_NAMED_SCHED_FLAGS = {sched: {f"{sched}-fallback": FLAG_SCHED1, f"{sched}-port": FLAG_SCHED2}
                      for sched in ("sh", "mh")}

# Forwarding methods: ipvsadm's -m, -g and -i (Masq, Route and Tunnel in ``ipvsadm -L``).
FWD_MASQ, FWD_ROUTE, FWD_TUNNEL = "masq", "route", "tunnel"
_FORWARD_OPTIONS = {"-m": FWD_MASQ, "--masquerading": FWD_MASQ, "-g": FWD_ROUTE,
                    "--gatewaying": FWD_ROUTE, "-i": FWD_TUNNEL, "--ipip": FWD_TUNNEL}
_FORWARD_SWITCHES = {FWD_MASQ: "-m", FWD_ROUTE: "-g", FWD_TUNNEL: "-i"}

# ipset types and the kind of each dimension of their entries. An entry is a tuple: an
# address is an int, ``proto:port`` two ints (protocol, port), a net an (address, prefix)
# pair, and a bitmap:port entry the port.
SET_TYPES = {
    "hash:ip": ("ip",),
    "hash:ip,port": ("ip", "proto:port"),
    "hash:ip,port,ip": ("ip", "proto:port", "ip"),
    "hash:ip,port,net": ("ip", "proto:port", "net"),
    "hash:net": ("net",),
    "bitmap:port": ("port",),
}
IPSET_DEFAULT_HASHSIZE, IPSET_DEFAULT_MAXELEM = 1024, 65536
_SET_NAME_MAX = 31  # IPSET_MAXNAMELEN - 1


@dataclass
class RealServer:
    addr: int
    port: int
    weight: int = 1
    forward: str = FWD_MASQ  # FWD_MASQ, FWD_ROUTE or FWD_TUNNEL


@dataclass
class VirtualService:
    """One IPVS service: ⟨proto, addr, port⟩, or a firewall mark (proto, addr and port 0)."""

    proto: int
    addr: int
    port: int
    scheduler: str
    fwmark: int = 0
    flags: int = 0  # FLAG_*
    timeout: int = 0  # persistence timeout in seconds; 0 unless FLAG_PERSISTENT
    netmask: int = 0xFFFFFFFF  # persistence granularity
    real_servers: list[RealServer] = field(default_factory=list)

    @property
    def key(self) -> tuple[int, int, int, int]:
        """What ipvsadm sorts services by, and what identifies one."""
        return self.fwmark, self.proto, self.addr, self.port

    @property
    def persistent(self) -> bool:
        return bool(self.flags & FLAG_PERSISTENT)


@dataclass
class IpSet:
    name: str
    type: str  # a key of SET_TYPES
    entries: list[tuple] = field(default_factory=list)  # see SET_TYPES
    family: str = "inet"
    hashsize: int = IPSET_DEFAULT_HASHSIZE  # hash types only
    maxelem: int = IPSET_DEFAULT_MAXELEM  # hash types only
    port_range: tuple[int, int] = (0, 65535)  # bitmap:port only

    @property
    def is_bitmap(self) -> bool:
        return self.type.startswith("bitmap:")


@dataclass
class IpvsRuleset:
    services: list[VirtualService]
    ipsets: dict[str, IpSet]  # by name, in the order they were created
    iptables: iptables.Ruleset
    addresses: list[int]  # bound to kube-ipvs0
    source: str


# ---- the sectioned output ------------------------------------------------------------------

def load(text: str, source: str = "<string>") -> IpvsRuleset:
    """Read kpbench's sectioned IPVS-mode output (see the module docstring)."""
    lines = text.split("\n")
    sections = _sections(lines, source)
    services = _IpvsadmReader(source).read(sections[SECTION_IPVSADM])
    ipsets = _IpsetReader(source).read(sections[SECTION_IPSET])
    # Blank the other sections' lines so iptables errors carry the file's line numbers.
    numbered = dict(sections[SECTION_IPTABLES])
    ruleset = iptables.load("\n".join(numbered.get(n, "") for n in range(1, len(lines) + 1)), source)
    _check_set_references(ruleset, ipsets, source)
    addresses = _read_addresses(sections[SECTION_ADDRESSES], source)
    return IpvsRuleset(services, ipsets, ruleset, addresses, source)


def _sections(lines: list[str], source: str) -> dict[str, list[tuple[int, str]]]:
    """Each section's (line number, line) pairs."""
    sections: dict[str, list[tuple[int, str]]] = {}
    current = None
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if text.startswith(_MARKER):
            if text not in SECTIONS:
                raise InputError(f"unknown section {text!r} (expected one of: {', '.join(SECTIONS)})",
                                 f"{source}:{number}")
            if text in sections:
                raise InputError(f"section {text!r} appears twice", f"{source}:{number}")
            current = sections[text] = []
        elif current is not None:
            current.append((number, line))
        elif text and not text.startswith("#"):
            raise InputError(f"line before the first section: {text[:40]!r}", f"{source}:{number}")
    missing = [name for name in SECTIONS if name not in sections]
    if missing:
        raise InputError(f"missing section {missing[0]!r}", source)
    return sections


def _check_set_references(ruleset: iptables.Ruleset, ipsets: dict[str, IpSet], source: str) -> None:
    """iptables-restore refuses ``-m set`` with a set that does not exist."""
    rules = (rule for builder in ruleset.builders.values() for chain in builder.chains.values()
             for rule in chain.rules)
    for rule in rules:
        for match in rule.matches:
            if match.kind == L.MATCH_SET and match.args["name"] not in ipsets:
                raise InputError(f"set {match.args['name']!r} is not in the ipset section",
                                 f"{source}:{rule.line}", "--match-set")


def _read_addresses(lines: list[tuple[int, str]], source: str) -> list[int]:
    addresses: dict[int, None] = {}
    for number, line in lines:
        words = line.split()
        if not words or words[0].startswith("#") or _is_ip_addr_chatter(words):
            continue
        where = f"{source}:{number}"
        if words[0] != "inet":
            raise InputError(f"expected 'inet ADDRESS/PREFIX ...', not {line.strip()[:40]!r}", where)
        if len(words) < 2:
            raise InputError("inet needs an address", where, "inet")
        address, _, prefix = words[1].partition("/")
        value = ip_to_int(address, where, "inet")
        if prefix and not (prefix.isascii() and prefix.isdigit() and int(prefix) <= 32):
            raise InputError(f"bad prefix length in {words[1]!r}", where, "inet")
        if value in addresses:
            raise InputError(f"address {address} is listed twice", where, "inet")
        addresses[value] = None
    return list(addresses)


_IFACE_HEADER = re.compile(r"[0-9]+:")


def _is_ip_addr_chatter(words: list[str]) -> bool:
    """The lines of ``ip addr show`` that carry no address: interface header, link, lifetimes."""
    return bool(_IFACE_HEADER.fullmatch(words[0])) or words[0].startswith("link/") or words[0] == "valid_lft"


def dump_addresses(addresses: list[int]) -> str:
    """The ``inet`` lines ``ip -4 addr show kube-ipvs0`` prints for /32 addresses."""
    return "".join(f"inet {int_to_ip(a)}/32 scope global {DUMMY_DEVICE}\n" for a in addresses)


# ---- ipvsadm-save -n -------------------------------------------------------------------------

def load_ipvsadm(text: str, source: str = "<string>") -> list[VirtualService]:
    """Read ``ipvsadm-save -n`` (or an ``ipvsadm-restore`` file of -A and -a lines)."""
    return _IpvsadmReader(source).read(enumerate(text.split("\n"), 1))


def dump_ipvsadm(services: list[VirtualService]) -> str:
    """``ipvsadm-save -n``: services sorted as ipvsadm sorts them, each followed by its real
    servers sorted by address and port."""
    lines = []
    for svc in sorted(services, key=lambda s: s.key):
        name = _service_name(svc)
        lines.append(f"-A {name} -s {svc.scheduler}{_persistence_text(svc)}{_sched_flags_text(svc)}")
        for rs in sorted(svc.real_servers, key=lambda r: (r.addr, r.port)):
            forward = _FORWARD_SWITCHES[rs.forward]
            lines.append(f"-a {name} -r {int_to_ip(rs.addr)}:{rs.port} {forward} -w {rs.weight}")
    return "".join(line + "\n" for line in lines)


_SERVICE_SWITCHES = {PROTOCOLS["tcp"]: "-t", PROTOCOLS["udp"]: "-u", PROTOCOLS["sctp"]: "--sctp-service"}


def _service_name(svc: VirtualService) -> str:
    if svc.fwmark:
        return f"-f {svc.fwmark}"
    return f"{_SERVICE_SWITCHES[svc.proto]} {int_to_ip(svc.addr)}:{svc.port}"


def _persistence_text(svc: VirtualService) -> str:
    if not svc.persistent:
        return ""
    mask = "" if svc.netmask == 0xFFFFFFFF else f" -M {int_to_ip(svc.netmask)}"
    return f" -p {svc.timeout}{mask}"


def _sched_flags_text(svc: VirtualService) -> str:
    names = {**_GENERIC_SCHED_FLAGS, **_NAMED_SCHED_FLAGS.get(svc.scheduler, {})}
    # The scheduler's own names win over flag-N, as in ipvsadm's print_sched_flags.
    by_bit = {bit: name for name, bit in names.items()}
    chosen = [by_bit[bit] for bit in (FLAG_SCHED1, FLAG_SCHED2, FLAG_SCHED3) if svc.flags & bit]
    return f" -b {','.join(chosen)}" if chosen else ""


# option -> (key, number of arguments: 0, 1, or None for -p's optional timeout)
_SERVICE_OPTIONS = {
    **dict.fromkeys(("-t", "--tcp-service", "-u", "--udp-service", "--sctp-service",
                     "-f", "--fwmark-service"), ("service", 1)),
    **dict.fromkeys(("-s", "--scheduler"), ("scheduler", 1)),
    **dict.fromkeys(("-p", "--persistent"), ("persistent", None)),
    **dict.fromkeys(("-M", "--netmask"), ("netmask", 1)),
    **dict.fromkeys(("-b", "--sched-flags"), ("sched_flags", 1)),
}
_SERVER_OPTIONS = {
    **{option: ("service", 1) for option, (key, _) in _SERVICE_OPTIONS.items() if key == "service"},
    **dict.fromkeys(("-r", "--real-server"), ("server", 1)),
    **dict.fromkeys(_FORWARD_OPTIONS, ("forward", 0)),
    **dict.fromkeys(("-w", "--weight"), ("weight", 1)),
}
_COMMANDS = {"-A": "service", "--add-service": "service", "-a": "server", "--add-server": "server"}
_SERVICE_PROTOCOLS = {"-t": "tcp", "--tcp-service": "tcp", "-u": "udp", "--udp-service": "udp",
                      "--sctp-service": "sctp"}


def _each_line(lines, source: str, handle) -> None:
    """``handle(words)`` for each (number, line) that is not blank or a comment; an error
    names ``source:number``."""
    for number, line in lines:
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        try:
            handle(words)
        except InputError as exc:
            raise InputError(exc.message, f"{source}:{number}", exc.field) from None


class _IpvsadmReader:
    """ipvsadm-restore: -A adds a service, -a a real server to an existing one."""

    def __init__(self, source: str):
        self.source = source
        self.services: dict[tuple, VirtualService] = {}
        self.destinations: dict[tuple, set[tuple[int, int]]] = {}  # per service: (addr, port)

    def read(self, lines) -> list[VirtualService]:
        _each_line(lines, self.source, self._line)
        return list(self.services.values())

    def _line(self, words: list[str]) -> None:
        command = _COMMANDS.get(words[0])
        if command is None:
            raise InputError(f"unknown command {words[0]!r} (expected -A or -a)", field=words[0])
        if command == "service":
            self._add_service(_options(words, _SERVICE_OPTIONS))
        else:
            self._add_server(_options(words, _SERVER_OPTIONS))

    def _add_service(self, options: dict) -> None:
        svc = _service(options)
        svc.scheduler = _scheduler(options)
        _apply_persistence(svc, options)
        if "sched_flags" in options:
            svc.flags |= _sched_flags(*options["sched_flags"], svc.scheduler)
        if svc.key in self.services:
            raise InputError("service already exists", field=options["service"][1])
        self.services[svc.key], self.destinations[svc.key] = svc, set()

    def _add_server(self, options: dict) -> None:
        key = _service(options).key
        svc = self.services.get(key)
        if svc is None:
            raise InputError("no such service (real servers must follow their -A line)",
                             field=options["service"][1])
        if "server" not in options:
            raise InputError("-a needs -r ADDRESS[:PORT]", field="-a")
        text, option = options["server"]
        addr, port = _address_port(text, option, port_required=False)
        if port is None:
            port = svc.port  # ipvsadm: the real server takes the service's port
        weight = _number(*options["weight"], 0, 65535) if "weight" in options else 1
        forward = _FORWARD_OPTIONS[options["forward"][1]] if "forward" in options else FWD_ROUTE
        destinations = self.destinations[key]
        if (addr, port) in destinations:
            raise InputError("destination already exists", field=option)
        destinations.add((addr, port))
        svc.real_servers.append(RealServer(addr, port, weight, forward))


def _options(words: list[str], table: dict) -> dict[str, tuple[str, str]]:
    """key -> (argument or "", the option as written); repeats and conflicts are errors."""
    found: dict[str, tuple[str, str]] = {}
    index = 1
    while index < len(words):
        option = words[index]
        index += 1
        spec = table.get(option)
        if spec is None:
            raise InputError(f"unknown option {option!r}" if option.startswith("-")
                             else f"unexpected argument {option!r}", field=option)
        key, arity = spec
        if key in found:
            raise InputError(f"{option} repeats or conflicts with {found[key][1]}", field=option)
        value = ""
        if arity == 1 or (arity is None and index < len(words) and not words[index].startswith("-")):
            if index >= len(words):
                raise InputError(f"option {option} needs an argument", field=option)
            value = words[index]
            index += 1
        found[key] = (value, option)
    if "service" not in found:
        raise InputError(f"{words[0]} needs -t, -u, --sctp-service or -f", field=words[0])
    return found


def _service(options: dict) -> VirtualService:
    """The service an -A or -a line names; scheduler and flags are filled in by -A."""
    text, option = options["service"]
    if option in ("-f", "--fwmark-service"):
        return VirtualService(0, 0, 0, IPVSADM_DEFAULT_SCHEDULER, fwmark=_number(text, option, 1, 0xFFFFFFFF))
    addr, port = _address_port(text, option, port_required=True)
    return VirtualService(PROTOCOLS[_SERVICE_PROTOCOLS[option]], addr, port, IPVSADM_DEFAULT_SCHEDULER)


def _scheduler(options: dict) -> str:
    if "scheduler" not in options:
        return IPVSADM_DEFAULT_SCHEDULER
    name, option = options["scheduler"]
    if name not in SCHEDULERS:
        raise InputError(f"unknown scheduler {name!r} (expected one of {', '.join(SCHEDULERS)})", field=option)
    return name


def _apply_persistence(svc: VirtualService, options: dict) -> None:
    if "persistent" in options:
        timeout, option = options["persistent"]
        svc.flags |= FLAG_PERSISTENT
        svc.timeout = _number(timeout, option, 1, _MAX_PERSISTENCE) if timeout else IPVSADM_DEFAULT_PERSISTENCE
    elif svc.port == 0 and not svc.fwmark:
        raise InputError("a service on port 0 must be persistent (-p)", field=options["service"][1])
    if "netmask" in options:
        svc.netmask = _netmask(*options["netmask"])


def _address_port(text: str, option: str, port_required: bool) -> tuple[int, int | None]:
    if text.startswith("["):
        raise InputError(f"IPv6 is not modelled: {text!r}", field=option)
    address, colon, port = text.partition(":")
    if not colon and port_required:
        raise InputError(f"expected ADDRESS:PORT, not {text!r}", field=option)
    value = ip_to_int(address, field=option)
    if not colon:
        return value, None
    if not (port.isascii() and port.isdigit()):
        raise InputError(f"not a port number: {port!r} (save with -n for numeric ports)", field=option)
    return value, parse_port(port, field=option, allow_zero=True)


def _number(text: str, option: str, low: int, high: int) -> int:
    if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
        raise InputError(f"{option} needs a number from {low} to {high}, not {text!r}", field=option)
    return int(text)


def _netmask(text: str, option: str) -> int:
    mask = ip_to_int(text, field=option)
    host_bits = ~mask & 0xFFFFFFFF
    if host_bits & (host_bits + 1):  # the host bits must be one run at the bottom
        raise InputError(f"not a contiguous netmask: {text!r}", field=option)
    return mask


def _sched_flags(text: str, option: str, scheduler: str) -> int:
    bits = 0
    for name in text.split(","):
        bit = _GENERIC_SCHED_FLAGS.get(name)
        if bit is None:
            owner = next((sched for sched, names in _NAMED_SCHED_FLAGS.items() if name in names), None)
            if owner is None:
                raise InputError(f"invalid scheduler flag {name!r}", field=option)
            if owner != scheduler:
                raise InputError(f"scheduler flag {name!r} needs scheduler {owner}, not {scheduler}",
                                 field=option)
            bit = _NAMED_SCHED_FLAGS[owner][name]
        bits |= bit
    return bits


# ---- ipset save --------------------------------------------------------------------------------

def load_ipset(text: str, source: str = "<string>") -> dict[str, IpSet]:
    """Read ``ipset save`` (or an ``ipset restore`` file of create and add lines)."""
    return _IpsetReader(source).read(enumerate(text.split("\n"), 1))


def dump_ipset(sets: list[IpSet]) -> str:
    """``ipset save``: each set's create line, then its entries, sorted.

    Hash sets list their entries in hash order, which kpbench does not reproduce; a current
    ipset also prints ``bucketsize 12 initval 0x…`` (a random seed), which is left out, as
    older versions do.
    """
    lines = []
    for ipset in sets:
        if ipset.is_bitmap:
            low, high = ipset.port_range
            options = f"range {low}-{high}"
        else:
            options = f"family {ipset.family} hashsize {ipset.hashsize} maxelem {ipset.maxelem}"
        lines.append(f"create {ipset.name} {ipset.type} {options}")
        dims = SET_TYPES[ipset.type]
        lines += [f"add {ipset.name} {_entry_text(dims, entry)}" for entry in sorted(ipset.entries)]
    return "".join(line + "\n" for line in lines)


def _entry_text(dims: tuple[str, ...], entry: tuple) -> str:
    parts, values = [], iter(entry)
    for dim in dims:
        if dim == "proto:port":
            proto = next(values)
            parts.append(f"{PROTOCOL_NAMES[proto]}:{next(values)}")
        elif dim == "net":
            net, prefix = next(values)
            parts.append(int_to_ip(net) if prefix == 32 else f"{int_to_ip(net)}/{prefix}")  # ipset hides /32
        elif dim == "ip":
            parts.append(int_to_ip(next(values)))
        else:
            parts.append(str(next(values)))
    return ",".join(parts)


_HASH_OPTIONS = ("family", "hashsize", "maxelem", "bucketsize", "initval")


class _IpsetReader:
    """ipset restore of create and add lines."""

    def __init__(self, source: str):
        self.source = source
        self.sets: dict[str, IpSet] = {}
        self.members: dict[str, set[tuple]] = {}

    def read(self, lines) -> dict[str, IpSet]:
        _each_line(lines, self.source, self._line)
        return self.sets

    def _line(self, words: list[str]) -> None:
        if words[0] == "create":
            self._create(words)
        elif words[0] == "add":
            self._add(words)
        else:
            raise InputError(f"unknown or unsupported command {words[0]!r} (expected create or add)",
                             field=words[0])

    def _create(self, words: list[str]) -> None:
        if len(words) < 3:
            raise InputError("create needs a set name and a type", field="create")
        name, kind = _set_name(words[1]), words[2]
        if kind not in SET_TYPES:
            raise InputError(f"unsupported set type {kind!r} (expected one of {', '.join(SET_TYPES)})",
                             field=kind)
        if name in self.sets:
            raise InputError(f"set {name} already exists", field=name)
        ipset = IpSet(name, kind)
        options = _pairs(words[3:])
        allowed = ("range",) if ipset.is_bitmap else _HASH_OPTIONS
        for option, value in options.items():
            if option not in allowed:
                raise InputError(f"option {option!r} is not supported for {kind}", field=option)
        if ipset.is_bitmap:
            if "range" not in options:
                raise InputError(f"{kind} needs range FROM-TO", field=kind)
            ipset.port_range = _port_range(options["range"])
        else:
            _hash_options(ipset, options)
        self.sets[name], self.members[name] = ipset, set()

    def _add(self, words: list[str]) -> None:
        if len(words) != 3:
            raise InputError("add needs a set name and one entry (extensions are not supported)",
                             field=words[3] if len(words) > 3 else "add")
        ipset = self.sets.get(words[1])
        if ipset is None:
            raise InputError(f"no set named {words[1]!r} (create it first)", field=words[1])
        entry = _entry(ipset, words[2])
        members = self.members[ipset.name]
        if entry in members:
            raise InputError(f"{words[2]} is already in {ipset.name}", field=words[2])
        if not ipset.is_bitmap and len(members) >= ipset.maxelem:
            raise InputError(f"{ipset.name} is full (maxelem {ipset.maxelem})", field=words[2])
        members.add(entry)
        ipset.entries.append(entry)


def _set_name(text: str) -> str:
    if len(text.encode("utf-8", "surrogatepass")) > _SET_NAME_MAX:
        raise InputError(f"set name longer than {_SET_NAME_MAX} bytes: {text!r}", field=text)
    return text


def _pairs(words: list[str]) -> dict[str, str]:
    """``option value`` pairs of a create line."""
    if len(words) % 2:
        raise InputError(f"option {words[-1]!r} needs a value or is not supported", field=words[-1])
    pairs: dict[str, str] = {}
    for option, value in zip(words[::2], words[1::2]):
        if option in pairs:
            raise InputError(f"{option} given twice", field=option)
        pairs[option] = value
    return pairs


def _hash_options(ipset: IpSet, options: dict[str, str]) -> None:
    family = options.get("family", "inet")
    if family != "inet":
        raise InputError(f"only family inet is modelled, not {family!r}", field="family")
    ipset.hashsize = _number(options.get("hashsize", str(IPSET_DEFAULT_HASHSIZE)), "hashsize", 1, 2**31)
    ipset.maxelem = _number(options.get("maxelem", str(IPSET_DEFAULT_MAXELEM)), "maxelem", 1, 2**32 - 1)
    if "bucketsize" in options:
        _number(options["bucketsize"], "bucketsize", 1, 255)
    if "initval" in options and not re.fullmatch(r"0x[0-9a-fA-F]{1,8}", options["initval"]):
        raise InputError(f"initval must be a 32-bit hex number, not {options['initval']!r}", field="initval")


def _port_range(text: str) -> tuple[int, int]:
    low, dash, high = text.partition("-")
    if not dash:
        raise InputError(f"range must be FROM-TO, not {text!r}", field="range")
    ports = _plain_port(low, "range"), _plain_port(high, "range")
    if ports[0] > ports[1]:
        raise InputError(f"range {text!r} runs backwards", field="range")
    return ports


def _plain_port(text: str, what: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise InputError(f"not a port number: {text!r}", field=what)
    return parse_port(text, field=what, allow_zero=True)


def _entry(ipset: IpSet, text: str) -> tuple:
    dims = SET_TYPES[ipset.type]
    parts = text.split(",")
    if len(parts) != len(dims):
        shape = ",".join({"ip": "IP", "proto:port": "PROTO:PORT", "net": "NET/PREFIX", "port": "PORT"}[d]
                         for d in dims)
        raise InputError(f"entry {text!r} does not fit {ipset.type} (expected {shape})", field=text)
    values: list = []
    for dim, part in zip(dims, parts):
        if dim == "ip":
            values.append(_single_address(part, text))
        elif dim == "proto:port":
            values += _proto_port(part, text)
        elif dim == "net":
            values.append(_net(part, text))
        else:
            port = _plain_port(part, text)
            low, high = ipset.port_range
            if not low <= port <= high:
                raise InputError(f"port {port} is outside {ipset.name}'s range {low}-{high}", field=text)
            values.append(port)
    return tuple(values)


def _single_address(part: str, entry: str) -> int:
    if "/" in part or "-" in part:
        raise InputError(f"{part!r}: only single addresses are read (ranges are not expanded)", field=entry)
    return ip_to_int(part, field=entry)


def _proto_port(part: str, entry: str) -> tuple[int, int]:
    proto, colon, port = part.rpartition(":")
    number = PROTOCOLS.get(proto if colon else "tcp")  # ipset's default protocol is tcp
    if number is None:
        raise InputError(f"unsupported protocol {proto!r} in {part!r} (expected tcp, udp or sctp)", field=entry)
    return number, _plain_port(port, entry)


def _net(part: str, entry: str) -> tuple[int, int]:
    net, mask = parse_cidr(part, field=entry)
    prefix = mask.bit_count()
    if prefix == 0:
        raise InputError(f"{part!r}: the kernel refuses a /0 net", field=entry)
    return net, prefix


# ---- to the IPVS kernel ----------------------------------------------------------------------

def kernel_arrays(services: list[VirtualService], source: str = "<string>",
                  scheduler: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """IPVS_SERVICE_DTYPE and IPVS_DEST_DTYPE records for ``kernels.ipvs.IPVS.from_arrays``.

    ``scheduler`` replaces every service's own (``--ipvs-scheduler``). Each service's real
    servers are given in reverse: from_arrays puts every new destination at the list head, so
    the kernel's list then runs in the order the text prints them. The forwarding method is
    not kept: the kernel models masquerading (kube-proxy's only method) for every server.
    """
    rows, dests = [], []
    for index, svc in enumerate(services):
        name = scheduler or svc.scheduler
        if name not in L.IPVS_SCHEDULERS:
            raise InputError(f"scheduler {name!r} is not modelled (kpbench models "
                             f"{', '.join(L.IPVS_SCHEDULERS)})", source, "-s")
        rows.append((svc.addr, svc.port, svc.proto, L.IPVS_SCHEDULERS.index(name), svc.flags,
                     svc.fwmark, svc.timeout, svc.netmask))
        dests += [(index, rs.addr, rs.port, 0, rs.weight, 0, 0, 0) for rs in reversed(svc.real_servers)]
    return (np.array(rows, dtype=L.IPVS_SERVICE_DTYPE), np.array(dests, dtype=L.IPVS_DEST_DTYPE))
