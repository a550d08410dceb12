"""nftables mode: the transaction kube-proxy's nftables proxier sends for a cluster.

This follows ``syncProxyRules`` and ``setupNFTables`` in kube-proxy's
``pkg/proxy/nftables/proxier.go`` (shared/docs/kube-proxy-rules.md §c), in the newer layout of
its test file @81810de6: base chains ``filter-prerouting-pre-dnat`` and
``filter-output-pre-dnat`` at -110, ``filter-{forward,input,output}`` at 0, ``nat-{prerouting,output}``
at -100 and ``nat-postrouting`` at 100. The text is what knftables hands to ``nft -f``: one
``add|flush|delete table|chain|set|map|rule|element`` command per line, in the order the
proxier issues them.

The model is IPv4-only, like the kernels: it writes the ``ip kube-proxy`` table (kube-proxy
writes a second, ``ip6 kube-proxy``, for IPv6; kpbench has no IPv6).

Every service port is categorised exactly as the iptables writer does it (kube-proxy's
proxiers share ``servicePortInfo`` and the endpoint filtering), so those decisions are imported
from :mod:`bench.proxies.iptables` rather than repeated.

The masquerade rule of a service chain matches the port (``ip daddr IP tcp dport P``), as the
≈1.31 proxier does. Details not settled by the sources read (kube-proxy-rules §c), chosen so
that ``nft -f`` accepts the text in order:

- a service's affinity sets are added before the service chain's rules that look them up;
- no-endpoint and firewall elements carry the service port name as their comment
  (``comment "ns/svc:port"``), service-ips and service-nodeports elements none (from memory);
- several ServiceCIDRs are joined with "," in the anonymous set of ``cluster-ips-check``;
- leftover elements are deleted, and stale chains flushed, in sorted order (Go iterates sets);
- the add-and-delete of every base chain that newer kube-proxy does on its very first sync (to
  re-create chains of the older layout) is left out: write_full models a node without the table.

:func:`write_ruleset_listing` applies the same transaction to a model of the table and prints
the result the way ``nft list ruleset`` does, so both forms describe one ruleset.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from bench.cluster.model import Cluster, EndpointInfo, ServicePortInfo, service_ports
from bench.errors import InputError
from bench.loaders.nftables import STANDARD_PRIORITIES
from bench.netaddr import PROTOCOLS, ip_to_int
# kube-proxy's nftables proxier decides everything per service port as its iptables proxier does.
from bench.proxies.iptables import (HostFacts, PortPlan, canonical_cidr, changed_services, check_slices,
                                    hash16, host_facts, ordered_ports, plan_port)

FAMILY = "ip"
TABLE = "kube-proxy"
TABLE_COMMENT = "rules for kube-proxy"

FILTER_PREROUTING_PRE_DNAT = "filter-prerouting-pre-dnat"
FILTER_OUTPUT_PRE_DNAT = "filter-output-pre-dnat"
FILTER_FORWARD = "filter-forward"
FILTER_INPUT = "filter-input"
FILTER_OUTPUT = "filter-output"
NAT_PREROUTING = "nat-prerouting"
NAT_OUTPUT = "nat-output"
NAT_POSTROUTING = "nat-postrouting"

SERVICES = "services"
MASQUERADING = "masquerading"
MARK_FOR_MASQUERADE = "mark-for-masquerade"
CLUSTER_IPS_CHECK = "cluster-ips-check"
NODEPORT_ENDPOINTS_CHECK = "nodeport-endpoints-check"
SERVICE_ENDPOINTS_CHECK = "service-endpoints-check"
FIREWALL_CHECK = "firewall-check"
REJECT_CHAIN = "reject-chain"

SERVICE_IPS = "service-ips"
SERVICE_NODEPORTS = "service-nodeports"
CLUSTER_IPS = "cluster-ips"
NODEPORT_IPS = "nodeport-ips"
NO_ENDPOINT_SERVICES = "no-endpoint-services"
NO_ENDPOINT_NODEPORTS = "no-endpoint-nodeports"
FIREWALL_IPS = "firewall-ips"

# Per-service chains and sets: the prefix, then hashAndTruncate of the service port's name.
SERVICE_PREFIX, LOCAL_PREFIX, EXTERNAL_PREFIX = "service-", "local-", "external-"
FIREWALL_PREFIX, ENDPOINT_PREFIX, AFFINITY_PREFIX = "firewall-", "endpoint-", "affinity-"

# Leaves room for the longest prefix within NFT_CHAIN_MAXNAMELEN (256).
CHAIN_NAME_BASE_MAX = 240

ADDRESS_KEY = "ipv4_addr . inet_proto . inet_service"
PORT_KEY = "inet_proto . inet_service"
LOOPBACK_CIDR = "127.0.0.0/8"

# nftablesBaseChains: (name, type, hook, priority). knftables prints priorities as numbers.
BASE_CHAINS = (
    # Filtering works on the destination before DNAT, so these run just before it.
    (FILTER_PREROUTING_PRE_DNAT, "filter", "prerouting", -110),
    (FILTER_OUTPUT_PRE_DNAT, "filter", "output", -110),
    (FILTER_FORWARD, "filter", "forward", 0),
    (FILTER_INPUT, "filter", "input", 0),
    (FILTER_OUTPUT, "filter", "output", 0),
    (NAT_PREROUTING, "nat", "prerouting", -100),
    (NAT_OUTPUT, "nat", "output", -100),
    (NAT_POSTROUTING, "nat", "postrouting", 100),
)

_CT_NEW = "ct state new"
# nftablesJumpChains: (from, to, match), in the proxier's order.
JUMP_CHAINS = (
    (FILTER_INPUT, NODEPORT_ENDPOINTS_CHECK, _CT_NEW),
    (FILTER_INPUT, SERVICE_ENDPOINTS_CHECK, _CT_NEW),
    (FILTER_FORWARD, SERVICE_ENDPOINTS_CHECK, _CT_NEW),
    (FILTER_OUTPUT, SERVICE_ENDPOINTS_CHECK, _CT_NEW),
    (FILTER_PREROUTING_PRE_DNAT, FIREWALL_CHECK, _CT_NEW),
    (FILTER_OUTPUT_PRE_DNAT, FIREWALL_CHECK, _CT_NEW),
    (NAT_OUTPUT, SERVICES, ""),
    (NAT_PREROUTING, SERVICES, ""),
    (NAT_POSTROUTING, MASQUERADING, ""),
    (FILTER_FORWARD, CLUSTER_IPS_CHECK, _CT_NEW),
    (FILTER_OUTPUT, CLUSTER_IPS_CHECK, _CT_NEW),
)

# The maps and sets kube-proxy mirrors in nftElementStorage (and flushes on a full sync).
_STORED = (("set", CLUSTER_IPS), ("map", SERVICE_IPS), ("map", FIREWALL_IPS),
           ("map", NO_ENDPOINT_SERVICES), ("map", NO_ENDPOINT_NODEPORTS), ("map", SERVICE_NODEPORTS))

_REJECT_VERDICT = f"goto {REJECT_CHAIN}"
_MARK_MASQ = f"jump {MARK_FOR_MASQUERADE}"
_OPTIONS = "WriterOptions"


@dataclass(frozen=True)
class WriterOptions:
    """How to render a sync; the host itself is described by ``cluster.config``."""

    # The ServiceCIDRs (the apiserver's service-cluster-ip-range): traffic to an address in
    # them that no service has is dropped. Empty: kube-proxy knows none and writes no rule.
    service_cidrs: tuple[str, ...] = ()
    # None: service ports in sorted order; an int: a seeded shuffle standing in for the random
    # order of the Go map kube-proxy iterates.
    service_order_seed: int | None = None
    # "kernel": the mark as the proxier formats it (%#08x → 0x004000); "test": 0x4000, as
    # kube-proxy's unit tests inject it.
    mark_format: str = "kernel"
    # kube-proxy only flushes stale service chains and deletes them in a sync at least 1 s
    # later (kernels before 6.2 keep map references a while). True deletes them at the end of
    # this transaction, which is what the ruleset looks like once that later sync ran.
    delete_stale_chains: bool = False


# --- names -----------------------------------------------------------------------------------

def hash_and_truncate(name: str) -> str:
    """kube-proxy's hashAndTruncate: ``base32(sha256(name))[:8] + "-" + name``, cut to 240
    characters ending in "..." so that every prefixed chain name fits."""
    hashed = f"{hash16(name)[:8]}-{name}"
    if len(hashed) > CHAIN_NAME_BASE_MAX:
        return hashed[:CHAIN_NAME_BASE_MAX - 3] + "..."
    return hashed


def service_port_name(info: ServicePortInfo, protocol: str) -> str:
    """``ns/name/proto/portname``: the service port's part of its chain names (before hashing)."""
    svc = info.service
    return f"{svc.namespace}/{svc.name}/{protocol}/{info.port.name}"


def endpoint_name(service_port: str, ip: str, port: int) -> str:
    """The endpoint's part of its chain and affinity-set names; ':' cannot be in a chain name."""
    return f"{service_port}__{ip.replace(':', '.')}/{port}"


@dataclass(frozen=True)
class _Names:
    """The chain and set names of one service port."""

    base: str  # the unhashed service port name
    hashed: str

    @classmethod
    def of(cls, info: ServicePortInfo, protocol: str, hashed=hash_and_truncate) -> _Names:
        base = service_port_name(info, protocol)
        return cls(base, hashed(base))

    @property
    def service(self) -> str:
        return SERVICE_PREFIX + self.hashed

    @property
    def local(self) -> str:
        return LOCAL_PREFIX + self.hashed

    @property
    def external(self) -> str:
        return EXTERNAL_PREFIX + self.hashed

    @property
    def firewall(self) -> str:
        return FIREWALL_PREFIX + self.hashed

    def endpoint_base(self, ep: EndpointInfo, hashed=hash_and_truncate) -> str:
        return hashed(endpoint_name(self.base, ep.ip, ep.port))


def listed_priority(priority: int, hook: str) -> str:
    """The priority as ``nft list`` prints it: the first standard name valid for the hook
    within 10 of it, as ``name`` or ``name ± n``; else the number."""
    for name, (value, hooks) in STANDARD_PRIORITIES.items():
        offset = priority - value
        if abs(offset) <= 10 and (hooks is None or hook in hooks):
            return name if not offset else f"{name} {'+' if offset > 0 else '-'} {abs(offset)}"
    return str(priority)


def listed_time(seconds: int) -> str:
    """A duration as nft prints it: ``3h``, ``1m30s``, ``0s``."""
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"


# --- where the commands go -------------------------------------------------------------------

@dataclass(frozen=True)
class _ChainSpec:
    type: str
    hook: str
    priority: int


class _Transaction:
    """The commands of one sync. This base class discards them, as kube-proxy's partial sync
    discards what it computes for unchanged services; subclasses print or apply them."""

    def add_table(self, comment: str) -> None:
        pass

    def add_chain(self, name: str, spec: _ChainSpec | None = None, comment: str | None = None) -> None:
        pass

    def flush_chain(self, name: str) -> None:
        pass

    def delete_chain(self, name: str) -> None:
        pass

    def add_rule(self, chain: str, rule: str, listed: str | None = None) -> None:
        """``listed`` is how ``nft list`` prints the rule, when that differs from ``rule``."""

    def add_set(self, kind: str, name: str, type_: str, flags: str = "", timeout: int = 0,
                comment: str | None = None) -> None:
        pass

    def flush_set(self, kind: str, name: str) -> None:
        pass

    def delete_set(self, kind: str, name: str) -> None:
        pass

    def add_element(self, container: str, key: str, value: str | None = None,
                    comment: str | None = None) -> None:
        pass

    def delete_element(self, container: str, key: str) -> None:
        pass


_OBJECT = f"{FAMILY} {TABLE}"


class _Text(_Transaction):
    """The transaction as knftables writes it for ``nft -f``."""

    def __init__(self):
        self.lines: list[str] = []

    def text(self) -> str:
        return "\n".join([*self.lines, ""])  # every line ends in a newline; no lines, no text

    def add_table(self, comment):
        self.lines.append(f'add table {_OBJECT} {{ comment "{comment}" ; }}')

    def add_chain(self, name, spec=None, comment=None):
        body = []
        if spec is not None:
            body.append(f"type {spec.type} hook {spec.hook} priority {spec.priority} ;")
        if comment is not None:
            body.append(f'comment "{comment}" ;')
        self.lines.append(f"add chain {_OBJECT} {name}" + (f" {{ {' '.join(body)} }}" if body else ""))

    def flush_chain(self, name):
        self.lines.append(f"flush chain {_OBJECT} {name}")

    def delete_chain(self, name):
        self.lines.append(f"delete chain {_OBJECT} {name}")

    def add_rule(self, chain, rule, listed=None):
        self.lines.append(f"add rule {_OBJECT} {chain} {rule}")

    def add_set(self, kind, name, type_, flags="", timeout=0, comment=None):
        body = f"type {type_} ;"
        if flags:
            body += f" flags {flags} ;"
        if timeout:
            body += f" timeout {timeout}s ;"
        if comment is not None:
            body += f' comment "{comment}" ;'
        self.lines.append(f"add {kind} {_OBJECT} {name} {{ {body} }}")

    def flush_set(self, kind, name):
        self.lines.append(f"flush {kind} {_OBJECT} {name}")

    def delete_set(self, kind, name):
        self.lines.append(f"delete {kind} {_OBJECT} {name}")

    def add_element(self, container, key, value=None, comment=None):
        self.lines.append(f"add element {_OBJECT} {container} {{ {_element(key, value, comment)} }}")

    def delete_element(self, container, key):
        self.lines.append(f"delete element {_OBJECT} {container} {{ {key} }}")


def _element(key: str, value: str | None, comment: str | None) -> str:
    text = key if comment is None else f'{key} comment "{comment}"'
    return text if value is None else f"{text} : {value}"


@dataclass
class _ListedChain:
    spec: _ChainSpec | None
    comment: str | None
    rules: list[str] = field(default_factory=list)


@dataclass
class _ListedSet:
    kind: str
    type: str
    flags: str
    timeout: int
    comment: str | None
    elements: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)


class _Listing(_Transaction):
    """Applies the transaction to a model of the table and prints it as ``nft list ruleset``."""

    def __init__(self):
        self.comment: str | None = None
        self.sets: dict[str, _ListedSet] = {}
        self.chains: dict[str, _ListedChain] = {}

    def add_table(self, comment):
        self.comment = comment

    def add_chain(self, name, spec=None, comment=None):
        self.chains.setdefault(name, _ListedChain(spec, comment))

    def flush_chain(self, name):
        self.chains[name].rules.clear()

    def delete_chain(self, name):
        del self.chains[name]

    def add_rule(self, chain, rule, listed=None):
        self.chains[chain].rules.append(listed or rule)

    def add_set(self, kind, name, type_, flags="", timeout=0, comment=None):
        self.sets.setdefault(name, _ListedSet(kind, type_, flags, timeout, comment))

    def flush_set(self, kind, name):
        self.sets[name].elements.clear()

    def delete_set(self, kind, name):
        del self.sets[name]

    def add_element(self, container, key, value=None, comment=None):
        self.sets[container].elements[key] = (value, comment)

    def delete_element(self, container, key):
        del self.sets[container].elements[key]

    def render(self) -> str:
        # nft lists a table's sets and maps, then its chains, each in the order they were added.
        lines = [f"table {_OBJECT} {{"]
        if self.comment is not None:
            lines.append(f'\tcomment "{self.comment}"')
        blocks = [_listed_set(name, s) for name, s in self.sets.items()]
        blocks += [_listed_chain(name, c) for name, c in self.chains.items()]
        lines.append("\n\n".join(blocks))
        lines.append("}")
        return "\n".join(lines) + "\n"


def _listed_set(name: str, listed: _ListedSet) -> str:
    lines = [f"\t{listed.kind} {name} {{", f"\t\ttype {listed.type}"]
    if listed.flags:
        lines.append(f"\t\tflags {listed.flags}")
    if listed.timeout:
        lines.append(f"\t\ttimeout {listed_time(listed.timeout)}")
    if listed.comment is not None:
        lines.append(f'\t\tcomment "{listed.comment}"')
    if listed.elements:
        # nft sorts the elements it lists by key.
        keys = sorted(listed.elements, key=_key_order)
        items = [_element(key, *listed.elements[key]) for key in keys]
        lines.append("\t\telements = { " + ",\n\t\t\t     ".join(items) + " }")
    lines.append("\t}")
    return "\n".join(lines)


def _key_order(key: str) -> tuple[int, ...]:
    return tuple(_part_order(part) for part in key.split(" . "))


def _part_order(part: str) -> int:
    """An address, protocol or port as the number nft sorts by."""
    if part in PROTOCOLS:
        return PROTOCOLS[part]
    return ip_to_int(part) if "." in part else int(part)


def _listed_chain(name: str, listed: _ListedChain) -> str:
    lines = [f"\tchain {name} {{"]
    if listed.comment is not None:
        lines.append(f'\t\tcomment "{listed.comment}"')
    spec = listed.spec
    if spec is not None:
        priority = listed_priority(spec.priority, spec.hook)
        lines.append(f"\t\ttype {spec.type} hook {spec.hook} priority {priority}; policy accept;")
    lines += [f"\t\t{rule}" for rule in listed.rules]
    lines.append("\t}")
    return "\n".join(lines)


# --- the proxier's element mirror ------------------------------------------------------------

class _Elements:
    """nftElementStorage: the elements kube-proxy knows a set or map holds, so that a sync
    writes only what changed (kube-proxy-rules §c, incremental sync)."""

    def __init__(self, kind: str, name: str):
        self.kind, self.name = kind, name
        self.values: dict[str, str | None] = {}
        self.leftover: set[str] = set()

    def reset(self, tx: _Transaction) -> None:
        """Full sync: the kernel's copy is flushed and everything is written again."""
        tx.flush_set(self.kind, self.name)
        self.values.clear()
        self.leftover.clear()

    def begin(self) -> None:
        """Partial sync: every element is a leftover until a service claims it."""
        self.leftover = set(self.values)

    def ensure(self, tx: _Transaction, key: str, value: str | None = None, comment: str | None = None) -> None:
        if key not in self.values:
            tx.add_element(self.name, key, value, comment)
            self.values[key] = value
            return
        if self.values[key] != value:
            # The kernel refuses to add a key it has with other data: delete it first.
            tx.delete_element(self.name, key)
            tx.add_element(self.name, key, value, comment)
            self.values[key] = value
        self.leftover.discard(key)

    def cleanup(self, tx: _Transaction) -> None:
        for key in sorted(self.leftover):
            tx.delete_element(self.name, key)
            del self.values[key]
        self.leftover = set()


# --- the sync --------------------------------------------------------------------------------

@dataclass
class _Sync:
    """What one sync writes and what it leaves active."""

    tx: _Transaction
    host: HostFacts
    changed: frozenset[str] | None  # Services whose chains are rewritten; None: all of them
    chains: set[str] = field(default_factory=set)  # active per-service chains
    affinity_sets: set[str] = field(default_factory=set)


class _Proxier:
    """The nftables proxier's state between syncs: its element mirror and what it created."""

    def __init__(self, options: WriterOptions):
        self.options = options
        self.service_cidrs = [canonical_cidr(text, _OPTIONS, "service_cidrs") for text in options.service_cidrs]
        self.elements = {name: _Elements(kind, name) for kind, name in _STORED}
        self.chains: set[str] = set()  # per-service chains in the kernel
        self.affinity_sets: set[str] = set()
        # kube-proxy names a service port's and an endpoint's chains once, when it learns of
        # them, not on every sync.
        self.hashed_names: dict[str, str] = {}

    def hashed(self, name: str) -> str:
        hashed = self.hashed_names.get(name)
        if hashed is None:
            hashed = self.hashed_names[name] = hash_and_truncate(name)
        return hashed

    def sync(self, cluster: Cluster, infos: list[ServicePortInfo], tx: _Transaction, full: bool,
             changed: frozenset[str] | None) -> None:
        """syncProxyRules: a full sync sets the table up again and flushes the maps."""
        check_slices(cluster)
        _check_masquerade_bit(cluster)
        sync = _Sync(tx, host_facts(cluster, self.options, infos), changed)
        if full:
            self._setup(sync)
        else:
            for elements in self.elements.values():
                elements.begin()
        for info in ordered_ports(infos, self.options.service_order_seed):
            self._service(sync, info)
        self._cleanup(sync)

    # -- setupNFTables --
    def _setup(self, sync: _Sync) -> None:
        tx, host = sync.tx, sync.host
        tx.add_table(TABLE_COMMENT)
        for name, type_, hook, priority in BASE_CHAINS:
            tx.add_chain(name, _ChainSpec(type_, hook, priority))
            tx.flush_chain(name)
        created: set[str] = set()
        for source, target, match in JUMP_CHAINS:
            _ensure_fixed_chain(tx, target, created)
            tx.add_rule(source, f"{match} jump {target}".lstrip())
        for name in (SERVICES, CLUSTER_IPS_CHECK, MASQUERADING, MARK_FOR_MASQUERADE):
            _ensure_fixed_chain(tx, name, created)
        _write_masquerading(tx, host.mark)
        self._write_cluster_ips_check(tx)
        _write_nodeport_ips(tx, host)
        _write_no_endpoint_handling(tx, host)
        _write_firewall_check(tx)
        _write_dispatch(tx, host)
        for elements in self.elements.values():
            elements.reset(tx)

    def _write_cluster_ips_check(self, tx: _Transaction) -> None:
        tx.add_set("set", CLUSTER_IPS, "ipv4_addr", comment="Active ClusterIPs")
        tx.add_rule(CLUSTER_IPS_CHECK,
                    f'ip daddr @{CLUSTER_IPS} reject comment "Reject traffic to invalid ports of ClusterIPs"')
        if self.service_cidrs:
            comment = 'comment "Drop traffic to unallocated ClusterIPs"'
            tx.add_rule(CLUSTER_IPS_CHECK, f"ip daddr {{ {','.join(self.service_cidrs)} }} drop {comment}",
                        listed=f"ip daddr {_listed_anonymous_set(self.service_cidrs)} drop {comment}")

    # -- one service port --
    def _service(self, sync: _Sync, info: ServicePortInfo) -> None:
        port = plan_port(info, sync.host)
        names = _Names.of(info, port.proto, self.hashed)
        write = sync.changed is None or port.key in sync.changed
        endpoint_bases = {ep.address: names.endpoint_base(ep, self.hashed) for ep in port.reachable_endpoints}
        for base in endpoint_bases.values():
            _ensure_service_chain(sync, ENDPOINT_PREFIX + base, write)
            if port.affinity_timeout:
                sync.affinity_sets.add(AFFINITY_PREFIX + base)
        if port.cluster_endpoints:
            _ensure_service_chain(sync, names.service, write)
        if port.local_endpoints:
            _ensure_service_chain(sync, names.local, write)
        if port.uses_external_chain:
            _ensure_service_chain(sync, names.external, write)
        self._capture(sync, port, names, write)
        if write:
            _write_service_rules(sync, port, names, endpoint_bases)

    def _capture(self, sync: _Sync, port: PortPlan, names: _Names, write: bool) -> None:
        """The service's elements in the dispatch maps, which every sync reconciles."""
        tx, elements = sync.tx, self.elements
        verdict = _filter_verdict(port)
        internal_chain = names.local if port.internal_local else names.service
        goto_external = f"goto {names.external}"
        key = f"{port.cluster_ip} . {port.proto} . {port.port}"
        elements[CLUSTER_IPS].ensure(tx, port.cluster_ip)
        if port.has_internal_endpoints:
            elements[SERVICE_IPS].ensure(tx, key, f"goto {internal_chain}")
        else:
            elements[NO_ENDPOINT_SERVICES].ensure(tx, key, verdict, port.spn)
        for ip in port.external_ips:
            key = f"{ip} . {port.proto} . {port.port}"
            if port.has_endpoints:
                elements[SERVICE_IPS].ensure(tx, key, goto_external)
            if not port.has_external_endpoints:
                elements[NO_ENDPOINT_SERVICES].ensure(tx, key, verdict, port.spn)
        if port.uses_firewall_chain:
            _ensure_service_chain(sync, names.firewall, write)
        for ip in port.lb_ips:
            key = f"{ip} . {port.proto} . {port.port}"
            if port.has_endpoints:
                elements[SERVICE_IPS].ensure(tx, key, goto_external)
            if port.uses_firewall_chain:
                elements[FIREWALL_IPS].ensure(tx, key, f"goto {names.firewall}", port.spn)
        if not port.has_external_endpoints:
            for ip in port.lb_ips:
                elements[NO_ENDPOINT_SERVICES].ensure(tx, f"{ip} . {port.proto} . {port.port}",
                                                      verdict, port.spn)
        if port.node_port:
            # NodePorts are not subject to loadBalancerSourceRanges.
            key = f"{port.proto} . {port.node_port}"
            if port.has_endpoints:
                elements[SERVICE_NODEPORTS].ensure(tx, key, goto_external)
            if not port.has_external_endpoints:
                elements[NO_ENDPOINT_NODEPORTS].ensure(tx, key, verdict, port.spn)

    # -- after the services --
    def _cleanup(self, sync: _Sync) -> None:
        tx = sync.tx
        stale = sorted(self.chains - sync.chains)
        for chain in stale:
            tx.flush_chain(chain)
        # Affinity sets hold no references the kernel keeps, so they go at once.
        for name in sorted(self.affinity_sets - sync.affinity_sets):
            tx.delete_set("set", name)
        for elements in self.elements.values():
            elements.cleanup(tx)
        if self.options.delete_stale_chains:
            for chain in stale:
                tx.delete_chain(chain)
            stale = []
        self.chains = sync.chains | set(stale)
        self.affinity_sets = sync.affinity_sets


def _check_masquerade_bit(cluster: Cluster) -> None:
    bit = cluster.config.masquerade_bit
    if isinstance(bit, bool) or not isinstance(bit, int) or not 0 <= bit <= 31:
        raise InputError(f"masqueradeBit must be 0..31, not {bit!r}", "KubeProxyConfiguration",
                         "nftables.masqueradeBit")


def _ensure_fixed_chain(tx: _Transaction, name: str, created: set[str]) -> None:
    if name not in created:
        created.add(name)
        tx.add_chain(name)
        tx.flush_chain(name)


def _ensure_service_chain(sync: _Sync, name: str, write: bool) -> None:
    """ensureChain: an unchanged service's chains stay as the kernel has them."""
    if name in sync.chains:
        return
    sync.chains.add(name)
    if write:
        sync.tx.add_chain(name)
        sync.tx.flush_chain(name)


def _write_masquerading(tx: _Transaction, mark: str) -> None:
    listed = f"0x{int(mark, 16):08x}"  # nft lists marks as 32-bit hex
    tx.add_rule(MARK_FOR_MASQUERADE, f"mark set mark or {mark}", listed=f"meta mark set meta mark | {listed}")
    tx.add_rule(MASQUERADING, f"mark and {mark} == 0 return",
                listed=f"meta mark & {listed} == 0x00000000 return")
    # Clear the mark so a packet that goes through again is not masqueraded twice.
    tx.add_rule(MASQUERADING, f"mark set mark xor {mark}", listed=f"meta mark set meta mark ^ {listed}")
    tx.add_rule(MASQUERADING, "masquerade fully-random")


def _write_nodeport_ips(tx: _Transaction, host: HostFacts) -> None:
    # "add" then "delete" removes the set whether or not it existed.
    tx.add_set("set", NODEPORT_IPS, "ipv4_addr", comment="IPs that accept NodePort traffic")
    if host.nodeport_ips is None:
        tx.delete_set("set", NODEPORT_IPS)
        return
    tx.flush_set("set", NODEPORT_IPS)
    for ip in host.nodeport_ips:
        # kube-proxy's nftables mode has no localhost NodePorts: it skips loopback addresses.
        if not ip.startswith("127."):
            tx.add_element(NODEPORT_IPS, ip)


def _write_no_endpoint_handling(tx: _Transaction, host: HostFacts) -> None:
    tx.add_set("map", NO_ENDPOINT_SERVICES, f"{ADDRESS_KEY} : verdict",
               comment="vmap to drop or reject packets to services with no endpoints")
    tx.add_set("map", NO_ENDPOINT_NODEPORTS, f"{PORT_KEY} : verdict",
               comment="vmap to drop or reject packets to service nodeports with no endpoints")
    # A helper chain: reject is no verdict a map can hold.
    tx.add_chain(REJECT_CHAIN, comment="helper for @no-endpoint-services / @no-endpoint-nodeports")
    tx.flush_chain(REJECT_CHAIN)
    tx.add_rule(REJECT_CHAIN, "reject")
    tx.add_rule(SERVICE_ENDPOINTS_CHECK, f"ip daddr . meta l4proto . th dport vmap @{NO_ENDPOINT_SERVICES}")
    tx.add_rule(NODEPORT_ENDPOINTS_CHECK,
                f"{_nodeport_destination(host)} meta l4proto . th dport vmap @{NO_ENDPOINT_NODEPORTS}")


def _nodeport_destination(host: HostFacts) -> str:
    if host.nodeport_ips is None:
        return f"ip daddr != {LOOPBACK_CIDR}"
    return f"ip daddr @{NODEPORT_IPS}"


def _write_firewall_check(tx: _Transaction) -> None:
    tx.add_set("map", FIREWALL_IPS, f"{ADDRESS_KEY} : verdict",
               comment="destinations that are subject to LoadBalancerSourceRanges")
    tx.add_rule(FIREWALL_CHECK, f"ip daddr . meta l4proto . th dport vmap @{FIREWALL_IPS}")


def _write_dispatch(tx: _Transaction, host: HostFacts) -> None:
    tx.add_set("map", SERVICE_IPS, f"{ADDRESS_KEY} : verdict",
               comment="ClusterIP, ExternalIP and LoadBalancer IP traffic")
    tx.add_set("map", SERVICE_NODEPORTS, f"{PORT_KEY} : verdict", comment="NodePort traffic")
    tx.add_rule(SERVICES, f"ip daddr . meta l4proto . th dport vmap @{SERVICE_IPS}")
    local = "fib daddr type local " if host.nodeport_ips is None else ""
    tx.add_rule(SERVICES,
                f"{local}{_nodeport_destination(host)} meta l4proto . th dport vmap @{SERVICE_NODEPORTS}")


def _filter_verdict(port: PortPlan) -> str:
    """What the no-endpoint maps do with traffic that has nowhere to go: reject it when the
    service has no endpoints, drop it when a Local policy finds none on this node."""
    return _REJECT_VERDICT if not port.has_endpoints else "drop"


def _listed_anonymous_set(items: list[str]) -> str:
    """An anonymous set of addresses and CIDRs as nft lists it: sorted, a lone item bare,
    and a /32 as the plain address."""
    listed = sorted((item.removesuffix("/32") for item in items),
                    key=lambda item: _part_order(item.split("/")[0]))
    return listed[0] if len(listed) == 1 else "{ " + ", ".join(listed) + " }"


# --- a service port's own chains ---------------------------------------------------------------

def _write_service_rules(sync: _Sync, port: PortPlan, names: _Names, endpoint_bases: dict[str, str]) -> None:
    tx, host = sync.tx, sync.host
    internal_chain = names.local if port.internal_local else names.service
    if port.has_internal_endpoints:
        _write_internal_masquerade(tx, host, port, internal_chain)
    if port.uses_external_chain:
        _write_external_rules(tx, host, port, names)
    if port.uses_firewall_chain:
        _write_firewall_rule(tx, port, names)
    if port.affinity_timeout:
        for base in endpoint_bases.values():
            tx.add_set("set", AFFINITY_PREFIX + base, "ipv4_addr", flags="dynamic,timeout",
                       timeout=port.affinity_timeout)
    for chain, endpoints in ((names.service, port.cluster_endpoints), (names.local, port.local_endpoints)):
        if endpoints:
            _write_balancing(tx, port, chain, [endpoint_bases[ep.address] for ep in endpoints])
    for ep in port.reachable_endpoints:
        _write_endpoint_rules(tx, port, ep, endpoint_bases[ep.address])


def _write_internal_masquerade(tx: _Transaction, host: HostFacts, port: PortPlan, chain: str) -> None:
    # Masquerade off-cluster traffic to the cluster IP: its reply may come back via another node.
    destination = f"ip daddr {port.cluster_ip} {port.proto} dport {port.port}"
    if host.masquerade_all:
        tx.add_rule(chain, f"{destination} {_MARK_MASQ}")
    elif host.local_cidr:
        tx.add_rule(chain, f"{destination} ip saddr != {host.local_cidr} {_MARK_MASQ}")


def _write_external_rules(tx: _Transaction, host: HostFacts, port: PortPlan, names: _Names) -> None:
    chain = names.external
    if not port.external_local:
        # Cluster policy may cross nodes, so the reply must come back through this one.
        tx.add_rule(chain, _MARK_MASQ)
    else:
        # Local policy keeps the client's address, except for pod and host traffic, which
        # behaves as if it went out to the load balancer and came back.
        if host.local_cidr:
            tx.add_rule(chain,
                        f'ip saddr {host.local_cidr} goto {names.service} comment "short-circuit pod traffic"')
        tx.add_rule(chain, f'fib saddr type local {_MARK_MASQ} comment "masquerade local traffic"')
        tx.add_rule(chain, f'fib saddr type local goto {names.service} comment "short-circuit local traffic"')
    if port.has_external_endpoints:
        tx.add_rule(chain, f"goto {names.local if port.external_local else names.service}")


def _write_firewall_rule(tx: _Transaction, port: PortPlan, names: _Names) -> None:
    sources = list(port.source_ranges)
    if port.allow_from_node:
        # A node reaching a VIP-style LB IP it holds itself comes from that IP.
        sources += port.lb_ips
    tx.add_rule(names.firewall, f"ip saddr != {{ {' , '.join(sources)} }} drop",
                listed=f"ip saddr != {_listed_anonymous_set(sources)} drop")


def _write_balancing(tx: _Transaction, port: PortPlan, chain: str, bases: list[str]) -> None:
    if port.affinity_timeout:
        # Sticky clients go back to their endpoint before any random choice is made.
        for base in bases:
            tx.add_rule(chain, f"ip saddr @{AFFINITY_PREFIX}{base} goto {ENDPOINT_PREFIX}{base}")
    targets = [f"{i} : goto {ENDPOINT_PREFIX}{base}" for i, base in enumerate(bases)]
    head = f"numgen random mod {len(bases)} vmap"
    tx.add_rule(chain, f"{head} {{ {' , '.join(targets)} }}", listed=f"{head} {{ {', '.join(targets)} }}")


def _write_endpoint_rules(tx: _Transaction, port: PortPlan, ep: EndpointInfo, base: str) -> None:
    chain = ENDPOINT_PREFIX + base
    # Hairpin: an endpoint reaching itself through the service must be masqueraded.
    tx.add_rule(chain, f"ip saddr {ep.ip} {_MARK_MASQ}")
    if port.affinity_timeout:
        tx.add_rule(chain, f"update @{AFFINITY_PREFIX}{base} {{ ip saddr }}")
    tx.add_rule(chain, f"meta l4proto {port.proto} dnat to {ep.ip}:{ep.port}")


# --- transactions ------------------------------------------------------------------------------

class Syncer:
    """kube-proxy's nftables proxier over successive syncs: a full sync, then partial syncs
    computed from the state the previous sync left (as kube-proxy keeps it), each returning
    its ``nft -f`` transaction."""

    def __init__(self, options: WriterOptions = WriterOptions()):
        self._proxier = _Proxier(options)
        self._ports: list[ServicePortInfo] | None = None

    def full(self, cluster: Cluster, render: bool = True) -> str:
        """The full-sync transaction (``render=False``: only take its state, return "")."""
        ports = service_ports(cluster)
        tx = _Text() if render else _Transaction()
        # Without rendering only the state matters, so no service's rules are written.
        self._proxier.sync(cluster, ports, tx, full=True, changed=None if render else frozenset())
        self._ports = ports
        return tx.text() if render else ""

    def partial(self, cluster: Cluster) -> str:
        """The partial-sync transaction after the last synced cluster became ``cluster``
        (see :func:`write_partial`)."""
        if self._ports is None:
            raise ValueError("a partial sync needs a full sync first")
        ports = service_ports(cluster)
        tx = _Text()
        self._proxier.sync(cluster, ports, tx, full=False,
                           changed=frozenset(changed_services(self._ports, ports)))
        self._ports = ports
        return tx.text()


def write_full(cluster: Cluster, options: WriterOptions = WriterOptions()) -> str:
    """The full-sync transaction for ``cluster`` on a node without kube-proxy's table yet."""
    return Syncer(options).full(cluster)


def write_partial(previous: Cluster, current: Cluster, options: WriterOptions = WriterOptions()) -> str:
    """The partial-sync transaction after ``previous`` (fully synced) became ``current``.

    It rewrites the chains of Services whose Service or endpoints changed (``add chain``,
    ``flush chain``, rules), reconciles the map and set elements (changed ones deleted and
    added, leftovers deleted, unchanged ones untouched), flushes the chains that are no longer
    used and deletes unused affinity sets. The table, base chains and fixed chains are only
    set up on full syncs; a change of node or of kube-proxy's configuration makes kube-proxy
    sync in full: use write_full then.
    """
    syncer = Syncer(options)
    syncer.full(previous, render=False)
    return syncer.partial(current)


def write_ruleset_listing(cluster: Cluster, options: WriterOptions = WriterOptions()) -> str:
    """The ruleset after :func:`write_full`, as ``nft list ruleset`` prints it."""
    listing = _Listing()
    _Proxier(options).sync(cluster, service_ports(cluster), listing, full=True, changed=None)
    return listing.render()
