"""eBPF service-map loader: kpbench's map dump (bench/proxies/ebpf.py) → arrays for kernels/ebpf.pyx.

The eBPF row is a Cilium-like REFERENCE MODEL, not a kube-proxy mode. Its text is a dump of the
BPF maps an eBPF kube-proxy replacement programs, one line per map entry, in a format kpbench
defines (close to what ``cilium bpf lb list`` shows, but one entry per line so that it reads
back exactly). Blank lines and ``#`` comments are skipped. Lines, in insertion order:

``map services max_entries=N`` / ``map backends max_entries=N``
    the maps' sizes (optional; Cilium's default bpf-lb-map-max, 65,536, when absent)
``backend ID ADDR:PORT/PROTO``
    a backend-map entry: backend id (1..2^32-1) → the endpoint
``service ADDR:PORT/PROTO slot=N backend=ID``
    a backend slot (N ≥ 1) of a frontend: the id of its N-th backend
``service ADDR:PORT/PROTO slot=0 count=N rev_nat=R type=T [name=NS/NAME[:PORT]]``
    a frontend's master entry: its number of backends, its reverse-NAT index and what kind of
    frontend it is (ClusterIP, NodePort, ExternalIP, LoadBalancer); ``name`` is informational

PROTO is tcp, udp or sctp. A master entry needs exactly its slots 1..count, each naming a
backend that exists. More entries than a map's max_entries is an error (an insert into a full
preallocated BPF hash map fails with E2BIG) unless ``allow_overflow``: then the kernel model
takes the entries in order until the map is full, and the rest fail there, as they would on a
node. Bad input raises :class:`bench.errors.InputError` naming ``<source>:<line>`` and the field.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bench.errors import InputError
from bench.netaddr import PROTOCOL_NAMES, PROTOCOLS, int_to_ip, ip_to_int, parse_port, parse_protocol
from kernels import layout as L

FRONTEND_TYPES = ("ClusterIP", "NodePort", "ExternalIP", "LoadBalancer")
MAP_NAMES = ("services", "backends")
HEADER = "# kpbench: eBPF service maps, a Cilium-like REFERENCE MODEL (not a kube-proxy mode)"
_SLOT_FIELDS = {"slot", "backend"}
_MASTER_FIELDS = {"slot", "count", "rev_nat", "type", "name"}


@dataclass(frozen=True)
class Frontend:
    """A frontend (service address) with its backends' ids in slot order."""

    addr: int
    port: int
    proto: int
    type: str
    rev_nat: int
    backend_ids: tuple[int, ...]
    name: str = ""

    @property
    def key(self) -> tuple[int, int, int]:
        return self.addr, self.port, self.proto


@dataclass
class EbpfMaps:
    """What the text programs: the entries in insertion order, as the kernel takes them."""

    services: np.ndarray  # EBPF_SERVICE_DTYPE, one row per service-map entry
    backends: np.ndarray  # EBPF_BACKEND_DTYPE, one row per backend-map entry
    frontends: list[Frontend]
    max_entries: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MAP_NAMES, L.EBPF_SERVICE_MAX_ENTRIES))
    source: str = "<string>"

    def overflow(self) -> dict[str, int]:
        """Entries past each map's max_entries (0 when it fits)."""
        wanted = {"services": len(self.services), "backends": len(self.backends)}
        return {name: max(wanted[name] - self.max_entries[name], 0) for name in MAP_NAMES}


def load(text: str, source: str = "<string>", allow_overflow: bool = False) -> EbpfMaps:
    reader = _Reader(source)
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split()
        if words and not words[0].startswith("#"):
            reader.read(number, words)
    maps = reader.finish()
    if not allow_overflow:
        for name, extra in maps.overflow().items():
            if extra:
                raise InputError(
                    f"{extra + maps.max_entries[name]:,} {name[:-1]}-map entries do not fit: the map holds "
                    f"max_entries={maps.max_entries[name]:,} (Cilium's bpf-lb-map-max), and an insert "
                    f"into a full BPF hash map fails with E2BIG", source, f"map {name}")
    return maps


def frontend_text(addr: int, port: int, proto: int) -> str:
    return f"{int_to_ip(addr)}:{port}/{PROTOCOL_NAMES[proto]}"


class _Reader:
    def __init__(self, source: str):
        self.source = source
        self.max_entries = dict.fromkeys(MAP_NAMES, L.EBPF_SERVICE_MAX_ENTRIES)
        self.backends: dict[int, tuple[int, int, int]] = {}
        self.entries: list[tuple] = []  # EBPF_SERVICE_DTYPE rows
        self.keys: dict[tuple, int] = {}  # (addr, port, proto, slot) -> line
        self.masters: list[tuple[int, dict]] = []  # (line, fields)
        self.slots: dict[tuple, dict[int, tuple[int, int]]] = {}  # frontend -> slot -> (backend, line)
        self.seen_maps: set[str] = set()

    def where(self, number: int) -> str:
        return f"{self.source}:{number}"

    def read(self, number: int, words: list[str]) -> None:
        kind = words[0]
        if kind == "map":
            self._map(number, words)
        elif kind == "backend":
            self._backend(number, words)
        elif kind == "service":
            self._service(number, words)
        else:
            raise InputError(f"unknown entry {kind!r} (expected map, backend or service)", self.where(number))

    def _map(self, number: int, words: list[str]) -> None:
        if len(words) != 3 or words[1] not in MAP_NAMES or not words[2].startswith("max_entries="):
            raise InputError("expected `map services|backends max_entries=N`", self.where(number))
        if words[1] in self.seen_maps or self.entries or self.backends:
            raise InputError("map sizes come once, before every entry", self.where(number), words[1])
        self.seen_maps.add(words[1])
        self.max_entries[words[1]] = self._number(number, "max_entries", words[2].partition("=")[2], 1, 1 << 26)

    def _backend(self, number: int, words: list[str]) -> None:
        if len(words) != 3:
            raise InputError("expected `backend ID ADDR:PORT/PROTO`", self.where(number))
        ident = self._number(number, "backend id", words[1], 1, 0xFFFFFFFF)
        if ident in self.backends:
            raise InputError(f"backend {ident} appears twice", self.where(number), "backend id")
        self.backends[ident] = self._address(number, words[2])

    def _service(self, number: int, words: list[str]) -> None:
        if len(words) < 3:
            raise InputError("expected `service ADDR:PORT/PROTO slot=N ...`", self.where(number))
        addr, port, proto = self._address(number, words[1])
        fields = {}
        for word in words[2:]:
            name, equals, value = word.partition("=")
            if not equals or not value or name in fields:
                raise InputError(f"expected NAME=VALUE once per field, got {word!r}", self.where(number))
            fields[name] = value
        slot = self._number(number, "slot", fields.get("slot", ""), 0, 0xFFFF)
        allowed, required = ((_MASTER_FIELDS, _MASTER_FIELDS - {"name"}) if slot == 0
                             else (_SLOT_FIELDS, _SLOT_FIELDS))
        unknown, missing = sorted(set(fields) - allowed), sorted(required - set(fields))
        if unknown:
            raise InputError(f"unknown field in a {'master' if slot == 0 else 'slot'} entry",
                             self.where(number), unknown[0])
        if missing:
            raise InputError("missing", self.where(number), missing[0])
        key = (addr, port, proto, slot)
        if key in self.keys:
            raise InputError(f"duplicate entry (first on line {self.keys[key]})", self.where(number), "slot")
        self.keys[key] = number
        if slot == 0:
            count = self._number(number, "count", fields["count"], 0, 0xFFFF)
            rev_nat = self._number(number, "rev_nat", fields["rev_nat"], 1, 0xFFFFFFFF)
            if fields["type"] not in FRONTEND_TYPES:
                raise InputError(f"unknown frontend type {fields['type']!r} (expected {', '.join(FRONTEND_TYPES)})",
                                 self.where(number), "type")
            self.masters.append((number, {**fields, "key": (addr, port, proto), "count": count, "rev_nat": rev_nat}))
            self.entries.append((addr, port, 0, proto, (0, 0, 0), 0, count, 0, rev_nat))
        else:
            backend = self._number(number, "backend", fields["backend"], 1, 0xFFFFFFFF)
            self.slots.setdefault((addr, port, proto), {})[slot] = (backend, number)
            self.entries.append((addr, port, slot, proto, (0, 0, 0), backend, 0, 0, 0))

    def finish(self) -> EbpfMaps:
        frontends = []
        for number, fields in self.masters:
            slots = self.slots.pop(fields["key"], {})
            count = fields["count"]
            if sorted(slots) != list(range(1, count + 1)):
                raise InputError(f"count={count} needs slots 1..{count}, found {sorted(slots) or 'none'}",
                                 self.where(number), "count")
            for backend, line in slots.values():
                if backend not in self.backends:
                    raise InputError(f"no backend {backend}", self.where(line), "backend")
            frontends.append(Frontend(*fields["key"], fields["type"], fields["rev_nat"],
                                      tuple(slots[s][0] for s in range(1, count + 1)), fields.get("name", "")))
        for key, slots in self.slots.items():
            line = min(number for _, number in slots.values())
            raise InputError(f"backend slot of {frontend_text(*key)} without a master entry (slot=0)",
                             self.where(line), "slot")
        services = np.array(self.entries, dtype=L.EBPF_SERVICE_DTYPE)
        backends = np.array([(ident, *where, 0) for ident, where in self.backends.items()],
                            dtype=L.EBPF_BACKEND_DTYPE)
        return EbpfMaps(services, backends, frontends, self.max_entries, self.source)

    def _address(self, number: int, text: str) -> tuple[int, int, int]:
        """``ADDR:PORT/PROTO`` → (address, port, protocol number)."""
        where = self.where(number)
        rest, slash, proto = text.rpartition("/")
        address, colon, port = rest.rpartition(":")
        if not slash or not colon:
            raise InputError(f"expected ADDR:PORT/PROTO, got {text!r}", where)
        return (ip_to_int(address, where, "address"), parse_port(port, where, "port"),
                PROTOCOLS[parse_protocol(proto, where, "protocol")])

    def _number(self, number: int, name: str, text: str, low: int, high: int) -> int:
        if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
            raise InputError(f"expected a number {low}..{high:,}, got {text!r}", self.where(number), name)
        return int(text)
