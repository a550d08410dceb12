"""iptables mode: the iptables-restore payload kube-proxy (v1.31–1.33) writes for a cluster.

This follows ``syncProxyRules`` in kube-proxy's ``pkg/proxy/iptables/proxier.go`` rule by rule
(shared/docs/kube-proxy-rules.md §a): the same chains, the same argument order, the same line
order in the same four buffers (filter chains, filter rules, nat chains, nat rules), so the
text is what a node would load with ``iptables-restore --noflush --counters``.

Things kube-proxy decides from the host are read from ``cluster.config``: nfacct support,
``--random-fully``, ``nf_conntrack_tcp_be_liberal``, localhost NodePorts, the masquerade bit,
masqueradeAll, the cluster CIDR (the local-traffic detector) and nodePortAddresses.
The model is IPv4-only, like the kernels; every address must be a canonical IPv4 address.
"""
from __future__ import annotations

import base64
import copy
import hashlib
import random
from dataclasses import dataclass, field
from functools import lru_cache

from bench.cluster.model import (LOAD_BALANCER, Cluster, EndpointInfo, ProxyConfig, Service,
                                 ServicePortInfo, service_ports)
from bench.errors import InputError
from bench.netaddr import int_to_ip, ip_to_int, parse_cidr, parse_port, parse_protocol

KUBE_SERVICES = "KUBE-SERVICES"
KUBE_EXTERNAL_SERVICES = "KUBE-EXTERNAL-SERVICES"
KUBE_NODEPORTS = "KUBE-NODEPORTS"
KUBE_FORWARD = "KUBE-FORWARD"
KUBE_PROXY_FIREWALL = "KUBE-PROXY-FIREWALL"
KUBE_FIREWALL = "KUBE-FIREWALL"  # kubelet's chain; kube-proxy writes an identical rule into it
KUBE_POSTROUTING = "KUBE-POSTROUTING"
KUBE_MARK_MASQ = "KUBE-MARK-MASQ"

FILTER_TOP_CHAINS = (KUBE_SERVICES, KUBE_EXTERNAL_SERVICES, KUBE_FORWARD, KUBE_NODEPORTS,
                     KUBE_PROXY_FIREWALL)
NAT_TOP_CHAINS = (KUBE_SERVICES, KUBE_NODEPORTS, KUBE_POSTROUTING, KUBE_MARK_MASQ)
# Per-service nat chains: Cluster-policy endpoints, Local-policy endpoints, external
# destinations, loadBalancerSourceRanges, and one chain per endpoint.
SVC, SVL, EXT, FW, SEP = "KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-", "KUBE-SEP-"
SERVICE_CHAIN_PREFIXES = (SVC, SVL, EXT, FW, SEP)

# Above this many endpoints (all services together) kube-proxy drops the per-endpoint comments.
LARGE_CLUSTER_ENDPOINTS_THRESHOLD = 1000

NFACCT_INVALID_DROPPED = "ct_state_invalid_dropped_pkts"
NFACCT_LOCALHOST_NODEPORTS = "localhost_nps_accepted_pkts"
LOOPBACK_CIDR = "127.0.0.0/8"
LOOPBACK_IP = "127.0.0.1"  # every node has it on lo, so nodePortAddresses can select it

_CONFIG = "KubeProxyConfiguration"
_CT_NEW = ("-m", "conntrack", "--ctstate", "NEW")

# kube-proxy's iptablesJumpChains, in its order: (table, built-in chain, target, match, comment).
_JUMP_CHAINS = (
    ("filter", "INPUT", KUBE_EXTERNAL_SERVICES, _CT_NEW, "kubernetes externally-visible service portals"),
    ("filter", "FORWARD", KUBE_EXTERNAL_SERVICES, _CT_NEW, "kubernetes externally-visible service portals"),
    ("filter", "INPUT", KUBE_NODEPORTS, (), "kubernetes health check service ports"),
    ("filter", "FORWARD", KUBE_SERVICES, _CT_NEW, "kubernetes service portals"),
    ("filter", "OUTPUT", KUBE_SERVICES, _CT_NEW, "kubernetes service portals"),
    ("filter", "FORWARD", KUBE_FORWARD, (), "kubernetes forwarding rules"),
    ("filter", "INPUT", KUBE_PROXY_FIREWALL, _CT_NEW, "kubernetes load balancer firewall"),
    ("filter", "OUTPUT", KUBE_PROXY_FIREWALL, _CT_NEW, "kubernetes load balancer firewall"),
    ("filter", "FORWARD", KUBE_PROXY_FIREWALL, _CT_NEW, "kubernetes load balancer firewall"),
    ("nat", "OUTPUT", KUBE_SERVICES, (), "kubernetes service portals"),
    ("nat", "PREROUTING", KUBE_SERVICES, (), "kubernetes service portals"),
    ("nat", "POSTROUTING", KUBE_POSTROUTING, (), "kubernetes postrouting rules"),
)
# kubelet's own jumps to KUBE-FIREWALL (no comment); kube-proxy ensures the same rules.
_KUBELET_JUMPS = (("filter", "INPUT"), ("filter", "OUTPUT"))
_BUILTIN_CHAINS = {"filter": ("INPUT", "FORWARD", "OUTPUT"),
                   "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING")}

MARK_FORMATS = ("kernel", "test")


@dataclass(frozen=True)
class WriterOptions:
    """How to render a sync; the host itself is described by ``cluster.config``."""

    # Also write the built-in chains' jump rules (installed by kube-proxy outside the payload),
    # so the text can be loaded on its own.
    include_jump_rules: bool = False
    # None: service ports in sorted order (as kube-proxy's tests compare them); an int: a seeded
    # shuffle standing in for the random order of the Go map kube-proxy iterates.
    service_order_seed: int | None = None
    # "kernel": the mark as the proxier formats it (%#08x → 0x004000); "test": 0x4000, as
    # kube-proxy's unit tests inject it.
    mark_format: str = "kernel"


# --- names, hashes, probabilities ------------------------------------------------------------

def hash16(text: str) -> str:
    # base32(sha256)[:16], as kube-proxy computes it; 10 bytes encode to exactly those 16 characters.
    return base64.b32encode(hashlib.sha256(text.encode()).digest()[:10]).decode()


def port_proto_hash(spn: str, proto: str) -> str:
    """The 16-character hash shared by a service port's SVC/SVL/EXT/FW chains."""
    return hash16(spn + proto)


def endpoint_chain_hash(spn: str, proto: str, endpoint: str) -> str:
    """The hash of one endpoint's KUBE-SEP chain; ``endpoint`` is ``ip:port``."""
    return hash16(spn + proto + endpoint)


def service_chain(spn: str, proto: str) -> str:
    return SVC + port_proto_hash(spn, proto)


def local_chain(spn: str, proto: str) -> str:
    return SVL + port_proto_hash(spn, proto)


def external_chain(spn: str, proto: str) -> str:
    return EXT + port_proto_hash(spn, proto)


def firewall_chain(spn: str, proto: str) -> str:
    return FW + port_proto_hash(spn, proto)


def endpoint_chain(spn: str, proto: str, endpoint: str) -> str:
    return SEP + endpoint_chain_hash(spn, proto, endpoint)


def is_service_chain(name: str) -> bool:
    """Whether a chain is one of kube-proxy's per-service chains (the ones stale cleanup deletes)."""
    return name.startswith(SERVICE_CHAIN_PREFIXES)


@lru_cache(maxsize=4096)
def compute_probability(n: int) -> str:
    """The statistic probability for 1 of ``n`` (≥ 1) remaining endpoints, as kube-proxy prints it."""
    return "%0.10f" % (1.0 / n)


# --- the host, as kube-proxy sees it ---------------------------------------------------------

@dataclass(frozen=True)
class HostFacts:
    mark: str
    masquerade_all: bool
    local_cidr: str  # the local-traffic detector's pod CIDR; "" when there is none
    nfacct: bool
    random_fully: bool
    drop_invalid: bool
    localhost_nodeports: bool  # effective: also off when nodePortAddresses excludes 127.0.0.1
    nodeport_ips: tuple[str, ...] | None  # None: NodePorts on every local address
    node_ip: str  # the primary node IP, for loadBalancerSourceRanges that contain it; "" if unknown
    large_cluster: bool


def host_facts(cluster: Cluster, options: WriterOptions, ports: list[ServicePortInfo]) -> HostFacts:
    config = cluster.config
    node_ips = local_node_ips(cluster)
    nodeport_cidrs = [parse_cidr(text, _CONFIG, "nodePortAddresses") for text in config.node_port_addresses]
    # kube-proxy turns localhost NodePorts off when nodePortAddresses leaves out 127.0.0.1.
    localhost = config.localhost_nodeports and (not nodeport_cidrs or in_any_cidr(LOOPBACK_IP, nodeport_cidrs))
    total_endpoints = sum(len(info.endpoints) for info in ports)
    return HostFacts(
        mark=mark_text(config, options),
        masquerade_all=config.masquerade_all,
        local_cidr=canonical_cidr(config.cluster_cidr, _CONFIG, "clusterCIDR") if config.cluster_cidr else "",
        nfacct=config.nfacct,
        random_fully=config.random_fully,
        drop_invalid=not config.tcp_be_liberal,
        localhost_nodeports=localhost,
        nodeport_ips=_nodeport_ips(node_ips, nodeport_cidrs, localhost) if nodeport_cidrs else None,
        node_ip=node_ips[0] if node_ips else "",
        large_cluster=total_endpoints > LARGE_CLUSTER_ENDPOINTS_THRESHOLD,
    )


def mark_text(config: ProxyConfig, options: WriterOptions) -> str:
    if options.mark_format not in MARK_FORMATS:
        raise InputError(f"unknown mark format {options.mark_format!r} (expected kernel or test)",
                         "WriterOptions", "mark_format")
    if not isinstance(config.masquerade_bit, int) or not 0 <= config.masquerade_bit <= 31:
        raise InputError(f"masqueradeBit must be 0..31, not {config.masquerade_bit!r}",
                         _CONFIG, "iptables.masqueradeBit")
    mark = config.masquerade_mark
    return "%#08x" % mark if options.mark_format == "kernel" else hex(mark)


def local_node_ips(cluster: Cluster) -> list[str]:
    """This node's addresses: --node-ip, else the addresses of the Node object kube-proxy runs on."""
    ips = cluster.config.node_ips or next(
        (node.ips for node in cluster.nodes if node.name == cluster.node_name), [])
    return [canonical_ipv4(ip, _CONFIG, "nodeIPs") for ip in ips]


def _nodeport_ips(node_ips: list[str], cidrs: list[tuple[int, int]], localhost: bool) -> tuple[str, ...]:
    """The local addresses nodePortAddresses selects.

    kube-proxy collects them in a Go map, so its order varies; here lo's address comes first,
    then the node IPs in the order given.
    """
    candidates = dict.fromkeys([LOOPBACK_IP, *node_ips])
    # kube-proxy skips a selected loopback address when localhost NodePorts are off.
    return tuple(ip for ip in candidates if in_any_cidr(ip, cidrs) and (localhost or not is_loopback(ip)))


def in_any_cidr(ip: str, cidrs: list[tuple[int, int]]) -> bool:
    value = ip_to_int(ip)
    return any(value & mask == net for net, mask in cidrs)


def is_loopback(ip: str) -> bool:
    return ip_to_int(ip) >> 24 == 127


def canonical_ipv4(text: str, where: str, field_name: str) -> str:
    """Check an address is IPv4 and written the way iptables-save prints it."""
    if not isinstance(text, str) or int_to_ip(ip_to_int(text, where, field_name)) != text:
        raise InputError(f"not a canonical IPv4 address: {text!r}", where, field_name)
    return text


def canonical_cidr(text: str, where: str, field_name: str) -> str:
    """A CIDR in the masked form kube-proxy prints (Go's IPNet.String())."""
    net, mask = parse_cidr(text, where, field_name)
    return f"{int_to_ip(net)}/{mask.bit_count()}"


# --- one service port, as syncProxyRules categorises it --------------------------------------

@dataclass(frozen=True)
class PortPlan:
    """One service port with every decision syncProxyRules makes about it."""

    key: str  # the Service's namespace/name: partial syncs decide per Service
    spn: str
    proto: str
    port: int
    cluster_ip: str
    external_ips: list[str]
    lb_ips: list[str]
    source_ranges: list[str]
    node_port: int
    health_check_node_port: int
    affinity_timeout: int  # 0: no ClientIP affinity
    chain_hash: str
    cluster_endpoints: list[EndpointInfo]  # [] when no traffic uses the Cluster policy
    local_endpoints: list[EndpointInfo]  # [] when no traffic uses the Local policy
    reachable_endpoints: list[EndpointInfo]  # the ones that get a KUBE-SEP chain
    has_endpoints: bool  # usable endpoints anywhere in the cluster
    has_internal_endpoints: bool
    has_external_endpoints: bool
    internal_local: bool
    external_local: bool
    allow_from_node: bool  # a loadBalancerSourceRange contains the node IP

    @property
    def svc_chain(self) -> str:
        return SVC + self.chain_hash

    @property
    def svl_chain(self) -> str:
        return SVL + self.chain_hash

    @property
    def ext_chain(self) -> str:
        return EXT + self.chain_hash

    @property
    def fw_chain(self) -> str:
        return FW + self.chain_hash

    @property
    def uses_external_chain(self) -> bool:
        # Written even without externally usable endpoints: it holds the short-circuit rules.
        return self.has_endpoints and bool(self.node_port or self.external_ips or self.lb_ips)

    @property
    def uses_firewall_chain(self) -> bool:
        return self.has_endpoints and bool(self.lb_ips) and bool(self.source_ranges)

    @property
    def internal_chain(self) -> str:
        return self.svl_chain if self.internal_local else self.svc_chain

    @property
    def external_policy_chain(self) -> str:
        return self.svl_chain if self.external_local else self.svc_chain

    @property
    def load_balancer_chain(self) -> str:
        return self.fw_chain if self.uses_firewall_chain else self.ext_chain


def plan_port(info: ServicePortInfo, host: HostFacts) -> PortPlan:
    svc = info.service
    where = f"Service {svc.key}"
    proto = parse_protocol(info.port.protocol, where, "spec.ports[].protocol")
    external_ips = [canonical_ipv4(ip, where, "spec.externalIPs") for ip in svc.external_ips]
    lb_ips = [canonical_ipv4(ip, where, "status.loadBalancer.ingress[].ip") for ip in svc.load_balancer_ips]
    source_ranges = [canonical_cidr(c, where, "spec.loadBalancerSourceRanges") for c in svc.load_balancer_source_ranges]
    node_port = parse_port(info.port.node_port, where, "spec.ports[].nodePort", allow_zero=True)
    external_local = svc.external_policy_local
    cluster_eps, local_eps = policy_endpoints(info, bool(node_port or external_ips or lb_ips))
    has_endpoints = info.has_endpoints
    return PortPlan(
        key=svc.key, spn=info.spn, proto=proto,
        port=parse_port(info.port.port, where, "spec.ports[].port"),
        cluster_ip=canonical_ipv4(svc.cluster_ip, where, "spec.clusterIP"),
        external_ips=external_ips, lb_ips=lb_ips, source_ranges=source_ranges,
        node_port=node_port,
        health_check_node_port=valid_health_check_node_port(svc, where),
        affinity_timeout=valid_affinity_timeout(svc, where),
        chain_hash=port_proto_hash(info.spn, proto),
        cluster_endpoints=cluster_eps, local_endpoints=local_eps,
        reachable_endpoints=_reachable(cluster_eps, local_eps),
        has_endpoints=has_endpoints,
        has_internal_endpoints=has_endpoints and (not svc.internal_policy_local or bool(local_eps)),
        has_external_endpoints=has_endpoints and (not external_local or bool(local_eps)),
        internal_local=svc.internal_policy_local, external_local=external_local,
        allow_from_node=bool(host.node_ip) and in_any_cidr(host.node_ip, [parse_cidr(c) for c in source_ranges]),
    )


def policy_endpoints(info: ServicePortInfo, accessible: bool) -> tuple[list[EndpointInfo], list[EndpointInfo]]:
    """The endpoints of the Cluster and the Local policy, each [] when no traffic uses it.

    UsesClusterEndpoints: external traffic under the Local policy still needs the Cluster
    endpoints, for the short-circuit rules of pod and host traffic.
    """
    svc = info.service
    uses_cluster = not svc.internal_policy_local or accessible
    uses_local = svc.internal_policy_local or (svc.external_policy_local and accessible)
    return (info.cluster_endpoints if uses_cluster else [],
            info.local_endpoints if uses_local else [])


def valid_health_check_node_port(svc: Service, where: str) -> int:
    # kube-proxy only serves one for LoadBalancer services with externalTrafficPolicy=Local.
    if svc.type != LOAD_BALANCER or not svc.external_policy_local:
        return 0
    return parse_port(svc.health_check_node_port, where, "spec.healthCheckNodePort", allow_zero=True)


def valid_affinity_timeout(svc: Service, where: str) -> int:
    timeout = svc.affinity_timeout
    if not isinstance(timeout, int) or not 0 <= timeout <= 86400:
        raise InputError(f"ClientIP affinity timeout must be 0..86400 seconds, not {timeout!r}",
                         where, "spec.sessionAffinityConfig.clientIP.timeoutSeconds")
    return timeout


def _reachable(cluster_eps: list[EndpointInfo], local_eps: list[EndpointInfo]) -> list[EndpointInfo]:
    """allLocallyReachableEndpoints: the union of both policies' endpoints, by address."""
    if not local_eps:
        return cluster_eps
    if not cluster_eps:
        return local_eps
    union = {ep.address: ep for ep in cluster_eps + local_eps}
    return [union[address] for address in sorted(union)]


def check_slices(cluster: Cluster) -> None:
    for eps in cluster.slices:
        where = f"EndpointSlice {eps.namespace}/{eps.name}"
        for port in eps.ports:
            parse_port(port.port, where, "ports[].port")
        for endpoint in eps.endpoints:
            canonical_ipv4(endpoint.ip, where, "endpoints[].addresses")


# --- rule text -------------------------------------------------------------------------------

def rule_line(chain: str, *parts: str | tuple[str, ...]) -> str:
    """One ``-A`` line; ``parts`` are words or tuples of words (an empty tuple adds nothing)."""
    words = ["-A", chain]
    for part in parts:
        if isinstance(part, str):
            words.append(part)
        else:
            words.extend(part)
    return " ".join(words)


def comment_args(text: str) -> tuple[str, ...]:
    # kube-proxy writes literal double quotes around the comments that contain spaces.
    return ("-m", "comment", "--comment", f'"{text}"' if " " in text else text)


def chain_line(name: str) -> str:
    return f":{name} - [0:0]"


def _destination(port: PortPlan, ip: str) -> tuple[str, ...]:
    return ("-m", port.proto, "-p", port.proto, "-d", ip, "--dport", str(port.port))


def _endpoint_comment(host: HostFacts, text: str) -> tuple[str, ...]:
    # Large clusters leave these comments out: they are up to 40% of the payload.
    return () if host.large_cluster else comment_args(text)


def _filter_verdict(port: PortPlan) -> tuple[str, tuple[str, ...]]:
    """Target and comment for traffic the nat table does not take: no endpoints, or no local ones."""
    if not port.has_endpoints:
        return "REJECT", comment_args(f"{port.spn} has no endpoints")
    return "DROP", comment_args(f"{port.spn} has no local endpoints")


# --- the sync --------------------------------------------------------------------------------

@dataclass
class _Buffers:
    """The proxier's four line buffers, plus the nat chains this sync keeps."""

    filter_chains: list[str] = field(default_factory=list)
    filter_rules: list[str] = field(default_factory=list)
    nat_chains: list[str] = field(default_factory=list)
    nat_rules: list[str] = field(default_factory=list)
    active_nat_chains: set[str] = field(default_factory=set)
    port_chains: dict[str, list[str]] = field(default_factory=dict)  # SVC chain → its nat chains


def _sync(cluster: Cluster, infos: list[ServicePortInfo], options: WriterOptions,
          changed: set[str] | None, existing_nat_chains: set[str],
          kept_chains: dict[str, list[str]] | None = None) -> _Buffers:
    """syncProxyRules: ``changed`` None writes every service's chains (a full sync).

    A partial sync writes only the chains of services in ``changed``; the others keep the
    chains the kernel has, which ``kept_chains`` (a service port's SVC chain → its nat chains
    from the previous sync, as kube-proxy remembers them) names without rendering them again.
    ``buf.port_chains`` is that mapping after this sync."""
    check_slices(cluster)
    host = host_facts(cluster, options, infos)
    buf = _Buffers(filter_chains=[chain_line(c) for c in FILTER_TOP_CHAINS],
                   nat_chains=[chain_line(c) for c in NAT_TOP_CHAINS])
    _write_masquerade_chains(buf, host)
    if host.localhost_nodeports:
        _write_localnet_firewall(buf)
    for info in ordered_ports(infos, options.service_order_seed):
        port = plan_port(info, host)
        _write_captures(buf, host, port)
        if changed is None or port.key in changed:
            chains, rules = _service_chains(host, port)
            buf.nat_chains += [chain_line(c) for c in chains]
            buf.nat_rules += rules
        else:  # a partial sync leaves unchanged services' chains as the kernel has them
            chains = kept_chains[port.svc_chain]
        buf.port_chains[port.svc_chain] = chains
        buf.active_nat_chains.update(chains)
    _write_stale_chain_deletions(buf, existing_nat_chains)
    _write_nodeports_jump(buf, host)
    _write_forward_chain(buf, host)
    return buf


def ordered_ports(infos: list[ServicePortInfo], seed: int | None) -> list[ServicePortInfo]:
    if seed is None:
        return infos
    shuffled = list(infos)
    random.Random(seed).shuffle(shuffled)
    return shuffled


def _write_masquerade_chains(buf: _Buffers, host: HostFacts) -> None:
    buf.nat_rules += masquerade_rules(host.mark, host.random_fully)


def masquerade_rules(mark: str, random_fully: bool) -> list[str]:
    """KUBE-POSTROUTING's and KUBE-MARK-MASQ's rules, the same in iptables and IPVS mode."""
    return [
        rule_line(KUBE_POSTROUTING, "-m", "mark", "!", "--mark", f"{mark}/{mark}", "-j", "RETURN"),
        # Clear the mark so a packet that re-traverses the stack is not masqueraded twice.
        rule_line(KUBE_POSTROUTING, "-j", "MARK", "--xor-mark", mark),
        rule_line(KUBE_POSTROUTING, comment_args("kubernetes service traffic requiring SNAT"),
              "-j", "MASQUERADE", ("--random-fully",) if random_fully else ()),
        rule_line(KUBE_MARK_MASQ, "-j", "MARK", "--or-mark", mark),
    ]


def _write_localnet_firewall(buf: _Buffers) -> None:
    # route_localnet (needed for localhost NodePorts) opens a hole this rule closes (issue 90259).
    buf.filter_chains.append(chain_line(KUBE_FIREWALL))
    buf.filter_rules.append(rule_line(
        KUBE_FIREWALL, comment_args("block incoming localnet connections"),
        "-d", LOOPBACK_CIDR, "!", "-s", LOOPBACK_CIDR,
        "-m", "conntrack", "!", "--ctstate", "RELATED,ESTABLISHED,DNAT", "-j", "DROP"))


def _write_captures(buf: _Buffers, host: HostFacts, port: PortPlan) -> None:
    """The service's rules in the top-level chains, which every sync rewrites."""
    _capture_cluster_ip(buf, port)
    _capture_external_ips(buf, port)
    _capture_load_balancer_ips(buf, port)
    if port.node_port:
        _capture_node_port(buf, host, port)
    if port.health_check_node_port:
        buf.filter_rules.append(rule_line(
            KUBE_NODEPORTS, comment_args(f"{port.spn} health check node port"),
            "-m", "tcp", "-p", "tcp", "--dport", str(port.health_check_node_port), "-j", "ACCEPT"))


def _capture_cluster_ip(buf: _Buffers, port: PortPlan) -> None:
    destination = _destination(port, port.cluster_ip)
    if port.has_internal_endpoints:
        buf.nat_rules.append(rule_line(KUBE_SERVICES, comment_args(f"{port.spn} cluster IP"), destination,
                                   "-j", port.internal_chain))
    else:
        target, comment = _filter_verdict(port)
        buf.filter_rules.append(rule_line(KUBE_SERVICES, comment, destination, "-j", target))


def _capture_external_ips(buf: _Buffers, port: PortPlan) -> None:
    for ip in port.external_ips:
        if port.has_endpoints:
            buf.nat_rules.append(rule_line(KUBE_SERVICES, comment_args(f"{port.spn} external IP"),
                                       _destination(port, ip), "-j", port.ext_chain))
        if not port.has_external_endpoints:
            _write_external_filter(buf, port, _destination(port, ip))


def _capture_load_balancer_ips(buf: _Buffers, port: PortPlan) -> None:
    for ip in port.lb_ips:
        if port.has_endpoints:
            buf.nat_rules.append(rule_line(KUBE_SERVICES, comment_args(f"{port.spn} loadbalancer IP"),
                                       _destination(port, ip), "-j", port.load_balancer_chain))
        if port.uses_firewall_chain:
            # Matches after DNAT, so only what KUBE-FW let through unchanged gets here.
            buf.filter_rules.append(rule_line(
                KUBE_PROXY_FIREWALL, comment_args(f"{port.spn} traffic not accepted by {port.fw_chain}"),
                _destination(port, ip), "-j", "DROP"))
    if not port.has_external_endpoints:
        for ip in port.lb_ips:
            _write_external_filter(buf, port, _destination(port, ip))


def _capture_node_port(buf: _Buffers, host: HostFacts, port: PortPlan) -> None:
    protocol = ("-m", port.proto, "-p", port.proto)
    node_port = str(port.node_port)
    if port.has_endpoints:
        if host.localhost_nodeports and host.nfacct:
            # Same jump, counted: kube-proxy's metric of NodePort packets accepted on localhost.
            buf.nat_rules.append(rule_line(
                KUBE_NODEPORTS, comment_args(port.spn), protocol, "-d", LOOPBACK_CIDR, "--dport", node_port,
                "-m", "nfacct", "--nfacct-name", NFACCT_LOCALHOST_NODEPORTS, "-j", port.ext_chain))
        buf.nat_rules.append(rule_line(KUBE_NODEPORTS, comment_args(port.spn), protocol, "--dport", node_port,
                                   "-j", port.ext_chain))
    if not port.has_external_endpoints:
        _write_external_filter(buf, port, ("-m", "addrtype", "--dst-type", "LOCAL", *protocol,
                                           "--dport", node_port))


def _write_external_filter(buf: _Buffers, port: PortPlan, match: tuple[str, ...]) -> None:
    # REJECT without endpoints; DROP what the EXT chain's short-circuit rules did not take.
    target, comment = _filter_verdict(port)
    buf.filter_rules.append(rule_line(KUBE_EXTERNAL_SERVICES, comment, match, "-j", target))


def _service_chains(host: HostFacts, port: PortPlan) -> tuple[list[str], list[str]]:
    """The service's own nat chains (EXT, FW, SVC, SVL, SEP…) and their rules, in write order."""
    chains: list[str] = []
    rules = _internal_masquerade(host, port) if port.has_internal_endpoints else []
    if port.uses_external_chain:
        chains.append(port.ext_chain)
        rules += _external_rules(host, port)
    if port.uses_firewall_chain:
        chains.append(port.fw_chain)
        rules += _firewall_rules(port)
    sep = {ep.address: endpoint_chain(port.spn, port.proto, ep.address) for ep in port.reachable_endpoints}
    for chain, endpoints in ((port.svc_chain, port.cluster_endpoints), (port.svl_chain, port.local_endpoints)):
        if endpoints:
            chains.append(chain)
            rules += _balancing_rules(host, port, chain, endpoints, sep)
    for ep in port.reachable_endpoints:
        chains.append(sep[ep.address])
        rules += _endpoint_rules(host, port, sep[ep.address], ep)
    return chains, rules


def _internal_masquerade(host: HostFacts, port: PortPlan) -> list[str]:
    # Masquerade off-cluster traffic to the cluster IP: its reply may come back via another node.
    match = (*comment_args(f"{port.spn} cluster IP"), *_destination(port, port.cluster_ip))
    if host.masquerade_all:
        return [rule_line(port.internal_chain, match, "-j", KUBE_MARK_MASQ)]
    if host.local_cidr:
        return [rule_line(port.internal_chain, match, "!", "-s", host.local_cidr, "-j", KUBE_MARK_MASQ)]
    return []


def _external_rules(host: HostFacts, port: PortPlan) -> list[str]:
    ext, spn = port.ext_chain, port.spn
    if not port.external_local:
        # Cluster policy may cross nodes, so the reply must come back through this one.
        rules = [rule_line(ext, comment_args(f"masquerade traffic for {spn} external destinations"),
                       "-j", KUBE_MARK_MASQ)]
    else:
        # Local policy keeps the client's source IP, except for pod and host traffic, which
        # behaves as if it went out to the load balancer and came back.
        rules = []
        if host.local_cidr:
            rules.append(rule_line(ext, comment_args(f"pod traffic for {spn} external destinations"),
                               "-s", host.local_cidr, "-j", port.svc_chain))
        rules += [
            rule_line(ext, comment_args(f"masquerade LOCAL traffic for {spn} external destinations"),
                  "-m", "addrtype", "--src-type", "LOCAL", "-j", KUBE_MARK_MASQ),
            rule_line(ext, comment_args(f"route LOCAL traffic for {spn} external destinations"),
                  "-m", "addrtype", "--src-type", "LOCAL", "-j", port.svc_chain),
        ]
    if port.has_external_endpoints:
        rules.append(rule_line(ext, "-j", port.external_policy_chain))
    return rules


def _firewall_rules(port: PortPlan) -> list[str]:
    fw, comment = port.fw_chain, comment_args(f"{port.spn} loadbalancer IP")
    rules = [rule_line(fw, comment, "-s", cidr, "-j", port.ext_chain) for cidr in port.source_ranges]
    if port.allow_from_node:
        # A node reaching its own VIP-style LB IP loops back with the LB IP as source.
        rules += [rule_line(fw, comment, "-s", ip, "-j", port.ext_chain) for ip in port.lb_ips]
    # No target: what falls through is not DNATed, so KUBE-PROXY-FIREWALL drops it.
    rules.append(rule_line(fw, comment_args(f"other traffic to {port.spn} will be dropped by KUBE-PROXY-FIREWALL")))
    return rules


def _balancing_rules(host: HostFacts, port: PortPlan, chain: str, endpoints: list[EndpointInfo],
                     sep: dict[str, str]) -> list[str]:
    rules = []
    if port.affinity_timeout:
        # Sticky clients go back to the endpoint they had before any random choice is made.
        rules += [rule_line(chain, _endpoint_comment(host, f"{port.spn} -> {ep.address}"),
                        "-m", "recent", "--name", sep[ep.address], "--rcheck",
                        "--seconds", str(port.affinity_timeout), "--reap", "-j", sep[ep.address])
                  for ep in endpoints]
    count = len(endpoints)
    for i, ep in enumerate(endpoints):
        # 1/(n-i) of what is left gives every endpoint 1/n; the last one takes the rest.
        statistic = (("-m", "statistic", "--mode", "random", "--probability", compute_probability(count - i))
                     if i < count - 1 else ())
        rules.append(rule_line(chain, _endpoint_comment(host, f"{port.spn} -> {ep.address}"), statistic,
                           "-j", sep[ep.address]))
    return rules


def _endpoint_rules(host: HostFacts, port: PortPlan, chain: str, ep: EndpointInfo) -> list[str]:
    comment = _endpoint_comment(host, port.spn)
    affinity = ("-m", "recent", "--name", chain, "--set") if port.affinity_timeout else ()
    return [
        # Hairpin: an endpoint reaching itself through the service must be masqueraded.
        rule_line(chain, comment, "-s", ep.ip, "-j", KUBE_MARK_MASQ),
        rule_line(chain, comment, affinity, "-m", port.proto, "-p", port.proto,
              "-j", "DNAT", "--to-destination", ep.address),
    ]


def _write_stale_chain_deletions(buf: _Buffers, existing_nat_chains: set[str]) -> None:
    # A chain line flushes the chain, which must be empty before -X may delete it.
    for chain in sorted(existing_nat_chains - buf.active_nat_chains):
        if is_service_chain(chain):
            buf.nat_chains.append(chain_line(chain))
            buf.nat_rules.append(f"-X {chain}")


def _write_nodeports_jump(buf: _Buffers, host: HostFacts) -> None:
    # Last in KUBE-SERVICES: NodePorts must not shadow any service IP rule.
    comment = comment_args("kubernetes service nodeports; NOTE: this must be the last rule in this chain")
    if host.nodeport_ips is None:
        loopback = () if host.localhost_nodeports else ("!", "-d", LOOPBACK_CIDR)
        buf.nat_rules.append(rule_line(KUBE_SERVICES, comment, "-m", "addrtype", "--dst-type", "LOCAL",
                                   loopback, "-j", KUBE_NODEPORTS))
    else:
        buf.nat_rules += [rule_line(KUBE_SERVICES, comment, "-d", ip, "-j", KUBE_NODEPORTS)
                          for ip in host.nodeport_ips]


def _write_forward_chain(buf: _Buffers, host: HostFacts) -> None:
    mark = host.mark
    if host.drop_invalid:
        # INVALID packets would otherwise reset connections (issue 74839), unless the kernel
        # is liberal about TCP windows.
        nfacct = ("-m", "nfacct", "--nfacct-name", NFACCT_INVALID_DROPPED) if host.nfacct else ()
        buf.filter_rules.append(rule_line(KUBE_FORWARD, "-m", "conntrack", "--ctstate", "INVALID", nfacct,
                                      "-j", "DROP"))
    buf.filter_rules += forward_accept_rules(mark)


def forward_accept_rules(mark: str) -> list[str]:
    """KUBE-FORWARD's ACCEPT rules, the same in iptables and IPVS mode."""
    return [
        # Forward marked traffic even where the FORWARD policy is DROP.
        rule_line(KUBE_FORWARD, comment_args("kubernetes forwarding rules"),
              "-m", "mark", "--mark", f"{mark}/{mark}", "-j", "ACCEPT"),
        rule_line(KUBE_FORWARD, comment_args("kubernetes forwarding conntrack rule"),
              "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT"),
    ]


# --- payloads --------------------------------------------------------------------------------

class Syncer:
    """kube-proxy's iptables proxier over successive syncs: a full sync, then partial syncs
    computed from the state the previous sync left (the services it saw and each one's nat
    chains, as kube-proxy keeps them), each returning its iptables-restore payload."""

    def __init__(self, options: WriterOptions = WriterOptions()):
        self.options = options
        self._ports: list[ServicePortInfo] | None = None
        self._port_chains: dict[str, list[str]] = {}
        self._nat_chains: set[str] = set()

    def copy(self) -> "Syncer":
        """A Syncer that goes on from this one's state (a sync replaces the state, never
        changes it, so the copy and this one are independent)."""
        return copy.copy(self)

    def full(self, cluster: Cluster) -> str:
        """The full-sync payload (built-in jump rules included when the options say so)."""
        return _render(self._sync(cluster, full=True), self.options.include_jump_rules)

    def partial(self, cluster: Cluster) -> str:
        """The partial-sync payload after the last synced cluster became ``cluster``
        (see :func:`write_partial`)."""
        if self._ports is None:
            raise ValueError("a partial sync needs a full sync first")
        return _render(self._sync(cluster, full=False), jump_rules=False)

    def _sync(self, cluster: Cluster, full: bool) -> _Buffers:
        ports = service_ports(cluster)
        if full:
            buf = _sync(cluster, ports, self.options, changed=None, existing_nat_chains=set())
        else:
            buf = _sync(cluster, ports, self.options, changed=changed_services(self._ports, ports),
                        existing_nat_chains=self._nat_chains, kept_chains=self._port_chains)
        self._ports, self._port_chains, self._nat_chains = ports, buf.port_chains, buf.active_nat_chains
        return buf


def write_full(cluster: Cluster, options: WriterOptions = WriterOptions()) -> str:
    """The full-sync payload for ``cluster`` on a node that has no kube-proxy chains yet."""
    return Syncer(options).full(cluster)


def write_partial(previous: Cluster, current: Cluster, options: WriterOptions = WriterOptions()) -> str:
    """The partial-sync payload after ``previous`` became ``current``.

    Top-level chains are rewritten in full; only Services whose Service or endpoints changed
    get their chains rewritten; chains that no longer exist are flushed and deleted (``-X``).
    Built-in jump rules are only ensured on full syncs, so they are never included. A change of
    node or of kube-proxy's configuration makes kube-proxy sync in full: use write_full then.
    """
    syncer = Syncer(options)
    syncer.full(previous)
    return syncer.partial(current)


def changed_services(before: list[ServicePortInfo], after: list[ServicePortInfo]) -> set[str]:
    """Services whose Service object or resolved endpoints differ, or that came or went."""
    old, new = _service_states(before), _service_states(after)
    return {key for key in old.keys() | new.keys() if old.get(key) != new.get(key)}


def _service_states(infos: list[ServicePortInfo]) -> dict[str, list]:
    states: dict[str, list] = {}
    for info in infos:
        states.setdefault(info.service.key, [info.service]).append(info.endpoints)
    return states


def _render(buf: _Buffers, jump_rules: bool) -> str:
    lines = []
    for table, chains, rules in (("filter", buf.filter_chains, buf.filter_rules),
                                 ("nat", buf.nat_chains, buf.nat_rules)):
        if jump_rules:
            chains = _builtin_chain_lines(table, chains) + chains
            rules = _jump_rules(table) + rules
        lines += [f"*{table}", *chains, *rules, "COMMIT"]
    return "\n".join(lines) + "\n"


def _builtin_chain_lines(table: str, chains: list[str]) -> list[str]:
    lines = [f":{name} ACCEPT [0:0]" for name in _BUILTIN_CHAINS[table]]
    # kube-proxy ensures KUBE-FIREWALL exists even when it writes no rule into it.
    if table == "filter" and chain_line(KUBE_FIREWALL) not in chains:
        lines.append(chain_line(KUBE_FIREWALL))
    return lines


def _jump_rules(table: str) -> list[str]:
    """The built-in chains' jumps in the order a node's iptables-save lists them.

    kube-proxy prepends each of its jumps in list order, so the last one ends up first.
    kubelet's KUBE-FIREWALL jumps were there before kube-proxy started, so they come last.
    """
    rules = []
    for builtin in _BUILTIN_CHAINS[table]:
        ours = [jump for jump in _JUMP_CHAINS if jump[:2] == (table, builtin)]
        rules += [rule_line(builtin, match, comment_args(comment), "-j", target)
                  for _, _, target, match, comment in reversed(ours)]
        if (table, builtin) in _KUBELET_JUMPS:
            rules.append(rule_line(builtin, "-j", KUBE_FIREWALL))
    return rules


# --- metrics ---------------------------------------------------------------------------------

def rule_counts(payload: str) -> dict[str, int]:
    """``-A`` rules per table: kube-proxy's sync_proxy_rules_iptables_total{table}."""
    return _count_lines(payload, "-A ")


def chain_counts(payload: str) -> dict[str, int]:
    """Chain lines per table (for a full sync: the chains kube-proxy keeps)."""
    return _count_lines(payload, ":")


def _count_lines(payload: str, prefix: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    table = None
    for number, line in enumerate(payload.splitlines(), 1):
        if line.startswith("*"):
            table = line[1:].strip()
            counts.setdefault(table, 0)
        elif line.startswith(prefix):
            if table is None:
                raise InputError("rule or chain line before any *table line", f"line {number}")
            counts[table] += 1
    return counts
