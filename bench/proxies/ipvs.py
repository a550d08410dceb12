"""IPVS mode: what kube-proxy (≈v1.29–1.31) programs for a cluster, as the tools print it.

This follows ``syncProxyRules`` and ``writeIptablesRules`` in kube-proxy's
``pkg/proxy/ipvs/proxier.go`` and ``ipset.go`` (shared/docs/kube-proxy-rules.md §b). kube-proxy
programs IPVS over netlink and the sets through the ipset binary, so the text is what a node
shows after a sync, in the sections bench/loaders/ipvs.py documents and reads back:
``ipvsadm-save -n``, ``ipset save``, the iptables-restore payload kube-proxy writes, and the
addresses bound to kube-ipvs0. The sysctls kube-proxy sets come first, as comments.

Decisions where the kernel or kube-proxy leaves a choice:

* Services and real servers are sorted the way ipvsadm sorts them (protocol, address, port);
  set entries are sorted too, where ``ipset save`` prints hash sets in hash order.
* Two service ports claiming the same virtual service (an externalIP shared by two Services):
  kube-proxy syncs both in Go-map order and the last one's real servers stay; here the last in
  service port order wins.
* The scheduler ``mh`` gets kube-proxy's FlagSourceHash, 0x10, which is IP_VS_SVC_F_SCHED2:
  for mh that flag hashes the source port too, and ipvsadm prints it as ``-b mh-port``.
* NodePort virtual services are made for the node's non-loopback addresses (``--node-ip`` or
  the Node object's), or those of them that nodePortAddresses selects; with none there are
  no NodePort services, and, as in kube-proxy, the service port's health-check port is then
  skipped too.
* A loadBalancerSourceRange of /0 is asked for but never stored: the kernel refuses a /0 net
  in hash:ip,port,net and kube-proxy only logs the error.
* KUBE-IPVS-OUT-FILTER's rules (one per LB IP whose source ranges leave out the node IP, which
  keeps the node itself from reaching it) and the jump comments are as remembered from the
  proxier source, not re-read.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from bench.cluster.model import Cluster, EndpointInfo, ServicePortInfo, service_ports
from bench.errors import InputError
from bench.loaders.ipvs import (FLAG_PERSISTENT, FLAG_SCHED2, FWD_MASQ, SCHEDULERS,
                                SECTION_ADDRESSES, SECTION_IPSET, SECTION_IPTABLES, SECTION_IPVSADM,
                                IpSet, RealServer, VirtualService, dump_addresses, dump_ipset,
                                dump_ipvsadm)
from bench.netaddr import PROTOCOLS, ip_to_int, parse_cidr, parse_port, parse_protocol
from bench.proxies.iptables import (KUBE_FORWARD, KUBE_MARK_MASQ, KUBE_POSTROUTING, KUBE_PROXY_FIREWALL,
                                    KUBE_SERVICES, LOOPBACK_CIDR, WriterOptions, forward_accept_rules,
                                    masquerade_rules)
# Helpers of the iptables writer that IPVS mode shares with it verbatim.
from bench.proxies.iptables import (canonical_cidr, canonical_ipv4, chain_line, check_slices, comment_args,
                                    in_any_cidr, is_loopback, local_node_ips, mark_text, policy_endpoints,
                                    rule_line, valid_affinity_timeout, valid_health_check_node_port)
from kernels.layout import TABLE_HOOKS

DEFAULT_SCHEDULER = "rr"
FLAG_SOURCE_HASH = FLAG_SCHED2  # kube-proxy's utilipvs.FlagSourceHash (0x10)

KUBE_NODE_PORT = "KUBE-NODE-PORT"
KUBE_LOAD_BALANCER = "KUBE-LOAD-BALANCER"
KUBE_SOURCE_RANGES_FIREWALL = "KUBE-SOURCE-RANGES-FIREWALL"
KUBE_IPVS_FILTER = "KUBE-IPVS-FILTER"
KUBE_IPVS_OUT_FILTER = "KUBE-IPVS-OUT-FILTER"
NAT_CHAINS = (KUBE_SERVICES, KUBE_POSTROUTING, KUBE_NODE_PORT, KUBE_LOAD_BALANCER, KUBE_MARK_MASQ)
FILTER_CHAINS = (KUBE_FORWARD, KUBE_NODE_PORT, KUBE_PROXY_FIREWALL, KUBE_SOURCE_RANGES_FIREWALL,
                 KUBE_IPVS_FILTER, KUBE_IPVS_OUT_FILTER)

LOOP_BACK = "KUBE-LOOP-BACK"
CLUSTER_IP = "KUBE-CLUSTER-IP"
EXTERNAL_IP = "KUBE-EXTERNAL-IP"
EXTERNAL_IP_LOCAL = "KUBE-EXTERNAL-IP-LOCAL"
LOAD_BALANCER = "KUBE-LOAD-BALANCER"
LOAD_BALANCER_FW = "KUBE-LOAD-BALANCER-FW"
LOAD_BALANCER_LOCAL = "KUBE-LOAD-BALANCER-LOCAL"
LOAD_BALANCER_SOURCE_IP = "KUBE-LOAD-BALANCER-SOURCE-IP"
LOAD_BALANCER_SOURCE_CIDR = "KUBE-LOAD-BALANCER-SOURCE-CIDR"
NODE_PORT_TCP = "KUBE-NODE-PORT-TCP"
NODE_PORT_LOCAL_TCP = "KUBE-NODE-PORT-LOCAL-TCP"
NODE_PORT_UDP = "KUBE-NODE-PORT-UDP"
NODE_PORT_LOCAL_UDP = "KUBE-NODE-PORT-LOCAL-UDP"
NODE_PORT_SCTP = "KUBE-NODE-PORT-SCTP-HASH"
NODE_PORT_LOCAL_SCTP = "KUBE-NODE-PORT-LOCAL-SCTP-HASH"
HEALTH_CHECK_NODE_PORT = "KUBE-HEALTH-CHECK-NODE-PORT"
IPVS_IPS = "KUBE-IPVS-IPS"

# ipsetInfo: (name, type, comment) in the order kube-proxy creates the sets, all of them at
# start-up whether they get entries or not (the iptables rules name them either way).
IPSETS = (
    (LOOP_BACK, "hash:ip,port,ip", "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose"),
    (CLUSTER_IP, "hash:ip,port", "Kubernetes service cluster ip + port for masquerade purpose"),
    (EXTERNAL_IP, "hash:ip,port", "Kubernetes service external ip + port for masquerade and filter purpose"),
    (EXTERNAL_IP_LOCAL, "hash:ip,port", "Kubernetes service external ip + port with externalTrafficPolicy=local"),
    (LOAD_BALANCER, "hash:ip,port", "Kubernetes service lb portal"),
    (LOAD_BALANCER_FW, "hash:ip,port",
     "Kubernetes service load balancer ip + port for load balancer with sourceRange"),
    (LOAD_BALANCER_LOCAL, "hash:ip,port",
     "Kubernetes service load balancer ip + port with externalTrafficPolicy=local"),
    (LOAD_BALANCER_SOURCE_IP, "hash:ip,port,ip",
     "Kubernetes service load balancer ip + port + source IP for packet filter purpose"),
    (LOAD_BALANCER_SOURCE_CIDR, "hash:ip,port,net",
     "Kubernetes service load balancer ip + port + source cidr for packet filter purpose"),
    (NODE_PORT_TCP, "bitmap:port", "Kubernetes nodeport TCP port for masquerade purpose"),
    (NODE_PORT_LOCAL_TCP, "bitmap:port", "Kubernetes nodeport TCP port with externalTrafficPolicy=local"),
    (NODE_PORT_UDP, "bitmap:port", "Kubernetes nodeport UDP port for masquerade purpose"),
    (NODE_PORT_LOCAL_UDP, "bitmap:port", "Kubernetes nodeport UDP port with externalTrafficPolicy=local"),
    (NODE_PORT_SCTP, "hash:ip,port",
     "Kubernetes nodeport SCTP port for masquerade purpose with type 'hash ip:port'"),
    (NODE_PORT_LOCAL_SCTP, "hash:ip,port",
     "Kubernetes nodeport SCTP port with externalTrafficPolicy=local with type 'hash ip:port'"),
    (HEALTH_CHECK_NODE_PORT, "bitmap:port", "Kubernetes health check node port"),
    (IPVS_IPS, "hash:ip", "Addresses on the ipvs interface"),
)
_SET_COMMENTS = {name: comment for name, _, comment in IPSETS}
# (all, eTP=Local) NodePort sets per protocol: a port bitmap for TCP and UDP, ip,port for SCTP.
_NODE_PORT_SETS = {"tcp": (NODE_PORT_TCP, NODE_PORT_LOCAL_TCP), "udp": (NODE_PORT_UDP, NODE_PORT_LOCAL_UDP),
                   "sctp": (NODE_PORT_SCTP, NODE_PORT_LOCAL_SCTP)}

# ipsetWithIptablesChain: (set, table, chain, target, directions, protocol), one rule per set
# that has entries. Each LOCAL NodePort set comes before its sibling so that RETURN wins.
_SET_JUMPS = (
    (LOOP_BACK, "nat", KUBE_POSTROUTING, "MASQUERADE", "dst,dst,src", ""),
    (LOAD_BALANCER, "nat", KUBE_SERVICES, KUBE_LOAD_BALANCER, "dst,dst", ""),
    (LOAD_BALANCER_LOCAL, "nat", KUBE_LOAD_BALANCER, "RETURN", "dst,dst", ""),
    (NODE_PORT_LOCAL_TCP, "nat", KUBE_NODE_PORT, "RETURN", "dst", "tcp"),
    (NODE_PORT_TCP, "nat", KUBE_NODE_PORT, KUBE_MARK_MASQ, "dst", "tcp"),
    (NODE_PORT_LOCAL_UDP, "nat", KUBE_NODE_PORT, "RETURN", "dst", "udp"),
    (NODE_PORT_UDP, "nat", KUBE_NODE_PORT, KUBE_MARK_MASQ, "dst", "udp"),
    (NODE_PORT_LOCAL_SCTP, "nat", KUBE_NODE_PORT, "RETURN", "dst,dst", "sctp"),
    (NODE_PORT_SCTP, "nat", KUBE_NODE_PORT, KUBE_MARK_MASQ, "dst,dst", "sctp"),
    (LOAD_BALANCER_FW, "filter", KUBE_PROXY_FIREWALL, KUBE_SOURCE_RANGES_FIREWALL, "dst,dst", ""),
    (LOAD_BALANCER_SOURCE_CIDR, "filter", KUBE_SOURCE_RANGES_FIREWALL, "RETURN", "dst,dst,src", ""),
    (LOAD_BALANCER_SOURCE_IP, "filter", KUBE_SOURCE_RANGES_FIREWALL, "RETURN", "dst,dst,src", ""),
)

# iptablesJumpChain: (table, built-in chain, target, comment), installed with EnsureRule(Prepend).
_JUMP_CHAINS = (
    ("nat", "OUTPUT", KUBE_SERVICES, "kubernetes service portals"),
    ("nat", "PREROUTING", KUBE_SERVICES, "kubernetes service portals"),
    ("nat", "POSTROUTING", KUBE_POSTROUTING, "kubernetes postrouting rules"),
    ("filter", "FORWARD", KUBE_FORWARD, "kubernetes forwarding rules"),
    ("filter", "INPUT", KUBE_NODE_PORT, "kubernetes health check rules"),
    ("filter", "INPUT", KUBE_PROXY_FIREWALL, "kube-proxy firewall rules"),
    ("filter", "FORWARD", KUBE_PROXY_FIREWALL, "kube-proxy firewall rules"),
    ("filter", "INPUT", KUBE_IPVS_FILTER, "kubernetes ipvs access filter"),
    ("filter", "OUTPUT", KUBE_IPVS_OUT_FILTER, "kubernetes ipvs access filter"),
)

# What NewProxier sets: (sysctl, value, when). Informational: the kernels model the effect.
SYSCTLS = (
    ("net/ipv4/vs/conntrack", 1, ""),
    ("net/ipv4/vs/conn_reuse_mode", 0, "only on kernels 4.1 to 5.8"),
    ("net/ipv4/vs/expire_nodest_conn", 1, ""),
    ("net/ipv4/vs/expire_quiescent_template", 1, ""),
    ("net/ipv4/ip_forward", 1, ""),
    ("net/ipv4/conf/all/arp_ignore", 1, "with ipvs.strictARP"),
    ("net/ipv4/conf/all/arp_announce", 2, "with ipvs.strictARP"),
)

_CONFIG = "KubeProxyConfiguration"


@dataclass(frozen=True)
class IpvsWriterOptions:
    """How to render a sync; the host itself is described by ``cluster.config``."""

    # Also write the built-in chains' jump rules (kube-proxy ensures them outside the restore
    # payload), so that the iptables section loads on its own.
    include_jump_rules: bool = False
    # As WriterOptions.mark_format: "kernel" prints 0x004000, "test" 0x4000.
    mark_format: str = "kernel"


def write(cluster: Cluster, options: IpvsWriterOptions = IpvsWriterOptions()) -> str:
    """Everything a sync of ``cluster`` leaves on the node, in kpbench's sectioned format."""
    sync = _sync(cluster)
    mark = mark_text(cluster.config, WriterOptions(mark_format=options.mark_format))
    nat, filt = _iptables_rules(sync, cluster, mark)
    ipsets = [IpSet(name, kind, sorted(sync.entries[name])) for name, kind, _ in IPSETS]
    header = ["# Generated by kpbench: kube-proxy IPVS mode"]
    header += [f"# sysctl {name}={value}" + (f" ({when})" if when else "") for name, value, when in SYSCTLS]
    return "".join([
        "\n".join(header) + "\n",
        f"{SECTION_IPVSADM}\n", dump_ipvsadm(list(sync.services.values())),
        f"{SECTION_IPSET}\n", dump_ipset(ipsets),
        f"{SECTION_IPTABLES}\n", _iptables_payload(nat, filt, options.include_jump_rules),
        f"{SECTION_ADDRESSES}\n", dump_addresses(list(sync.bound)),
    ])


# --- the node --------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Node:
    scheduler: str
    node_ip: str  # the primary node IP (loadBalancerSourceRanges that contain it); "" if unknown
    addresses: frozenset[str]  # external and LB IPs already on the node are not bound to kube-ipvs0
    nodeport_ips: tuple[str, ...]


def _node(cluster: Cluster) -> _Node:
    config = cluster.config
    scheduler = config.ipvs_scheduler or DEFAULT_SCHEDULER
    if scheduler not in SCHEDULERS:
        raise InputError(f"unknown scheduler {scheduler!r} (the kernel has {', '.join(SCHEDULERS)})",
                         _CONFIG, "ipvs.scheduler")
    node_ips = local_node_ips(cluster)
    # IPVS cannot serve NodePorts on loopback addresses; kube-proxy leaves them out.
    local = list(dict.fromkeys(ip for ip in node_ips if not is_loopback(ip)))
    cidrs = [parse_cidr(text, _CONFIG, "nodePortAddresses") for text in config.node_port_addresses]
    return _Node(scheduler, node_ips[0] if node_ips else "", frozenset(local),
                 tuple(ip for ip in local if not cidrs or in_any_cidr(ip, cidrs)))


# --- one service port ------------------------------------------------------------------------

@dataclass(frozen=True)
class _Port:
    """One service port with the decisions syncProxyRules makes about it."""

    proto_name: str
    proto: int
    port: int
    cluster_ip: str
    external_ips: list[str]
    lb_ips: list[str]
    source_ranges: list[tuple[int, int]]  # (network, netmask)
    node_port: int
    health_check_node_port: int
    affinity_timeout: int  # 0: no ClientIP affinity
    internal_endpoints: list[EndpointInfo]  # the ClusterIP service's real servers
    external_endpoints: list[EndpointInfo]  # the external and NodePort services' real servers
    external_local: bool
    hairpin_endpoints: list[EndpointInfo]  # this node's endpoints, ready or not

    def entry(self, ip: str) -> tuple[int, int, int]:
        """An ``ip,proto:port`` set entry for this port."""
        return ip_to_int(ip), self.proto, self.port


def _port(info: ServicePortInfo) -> _Port:
    svc = info.service
    where = f"Service {svc.key}"
    proto_name = parse_protocol(info.port.protocol, where, "spec.ports[].protocol")
    external_ips = [canonical_ipv4(ip, where, "spec.externalIPs") for ip in svc.external_ips]
    lb_ips = [canonical_ipv4(ip, where, "status.loadBalancer.ingress[].ip") for ip in svc.load_balancer_ips]
    node_port = parse_port(info.port.node_port, where, "spec.ports[].nodePort", allow_zero=True)
    cluster_eps, local_eps = policy_endpoints(info, bool(node_port or external_ips or lb_ips))
    return _Port(
        proto_name=proto_name, proto=PROTOCOLS[proto_name],
        port=parse_port(info.port.port, where, "spec.ports[].port"),
        cluster_ip=canonical_ipv4(svc.cluster_ip, where, "spec.clusterIP"),
        external_ips=external_ips, lb_ips=lb_ips,
        source_ranges=[parse_cidr(cidr, where, "spec.loadBalancerSourceRanges")
                       for cidr in svc.load_balancer_source_ranges],
        node_port=node_port,
        health_check_node_port=valid_health_check_node_port(svc, where),
        affinity_timeout=valid_affinity_timeout(svc, where),
        internal_endpoints=_policy_choice(cluster_eps, local_eps, svc.internal_policy_local),
        external_endpoints=_policy_choice(cluster_eps, local_eps, svc.external_policy_local),
        external_local=svc.external_policy_local,
        hairpin_endpoints=[ep for ep in info.endpoints if ep.is_local],
    )


def _policy_choice(cluster_eps: list[EndpointInfo], local_eps: list[EndpointInfo],
                   only_local: bool) -> list[EndpointInfo]:
    """syncEndpoint: the Local policy takes the local endpoints, and without any falls back to
    the Cluster ones, so that pods can still reach the service (kubernetes PR 97081)."""
    return local_eps if only_local and local_eps else cluster_eps


# --- the sync --------------------------------------------------------------------------------

def _empty_sets() -> dict[str, set[tuple]]:
    return {name: set() for name, _, _ in IPSETS}


@dataclass
class _Sync:
    """What one sync leaves in the kernel."""

    services: dict[tuple, VirtualService] = field(default_factory=dict)
    entries: dict[str, set[tuple]] = field(default_factory=_empty_sets)
    bound: dict[int, None] = field(default_factory=dict)  # kube-ipvs0's addresses, in binding order
    # lbNoNodeAccessIPPortProtocolEntries: (LB IP, protocol, port) the node may not reach
    no_node_access: list[tuple[str, str, int]] = field(default_factory=list)


def _sync(cluster: Cluster) -> _Sync:
    check_slices(cluster)
    node = _node(cluster)
    sync = _Sync()
    for info in service_ports(cluster):
        _sync_port(sync, node, _port(info))
    sync.entries[IPVS_IPS] = {(address,) for address in sync.bound}
    return sync


def _sync_port(sync: _Sync, node: _Node, port: _Port) -> None:
    # An endpoint reaching its own service is hairpinned and must be masqueraded.
    sync.entries[LOOP_BACK].update((ip_to_int(ep.ip), port.proto, ep.port, ip_to_int(ep.ip))
                                   for ep in port.hairpin_endpoints)
    sync.entries[CLUSTER_IP].add(port.entry(port.cluster_ip))
    _add_service(sync, node, port, port.cluster_ip, port.port, port.internal_endpoints, bind=True)
    for ip in port.external_ips:
        sync.entries[EXTERNAL_IP_LOCAL if port.external_local else EXTERNAL_IP].add(port.entry(ip))
        _add_service(sync, node, port, ip, port.port, port.external_endpoints, bind=ip not in node.addresses)
    for ip in port.lb_ips:
        _capture_load_balancer_ip(sync, node, port, ip)
        _add_service(sync, node, port, ip, port.port, port.external_endpoints, bind=ip not in node.addresses)
    if port.node_port:
        if not node.nodeport_ips:
            return  # kube-proxy `continue`s here, past the health-check port as well
        _capture_node_port(sync, node, port)
    if port.health_check_node_port:
        sync.entries[HEALTH_CHECK_NODE_PORT].add((port.health_check_node_port,))


def _capture_load_balancer_ip(sync: _Sync, node: _Node, port: _Port, ip: str) -> None:
    entry = port.entry(ip)
    sync.entries[LOAD_BALANCER].add(entry)
    if port.external_local:
        sync.entries[LOAD_BALANCER_LOCAL].add(entry)
    if not port.source_ranges:
        return
    sync.entries[LOAD_BALANCER_FW].add(entry)
    # The kernel refuses a /0 net in this set type, so that entry never lands.
    sync.entries[LOAD_BALANCER_SOURCE_CIDR].update((*entry, (net, mask.bit_count()))
                                                   for net, mask in port.source_ranges if mask)
    if node.node_ip and in_any_cidr(node.node_ip, port.source_ranges):
        # The node reaches the LB IP with that IP as its source: allow it explicitly.
        sync.entries[LOAD_BALANCER_SOURCE_IP].add((*entry, entry[0]))
    else:
        sync.no_node_access.append((ip, port.proto_name, port.port))


def _capture_node_port(sync: _Sync, node: _Node, port: _Port) -> None:
    if port.proto_name == "sctp":  # no SCTP port bitmap: one ip,port entry per node IP
        entries = {(ip_to_int(ip), port.proto, port.node_port) for ip in node.nodeport_ips}
    else:
        entries = {(port.node_port,)}
    every, local = _NODE_PORT_SETS[port.proto_name]
    sync.entries[every].update(entries)
    if port.external_local:
        sync.entries[local].update(entries)
    for ip in node.nodeport_ips:
        _add_service(sync, node, port, ip, port.node_port, port.external_endpoints, bind=False)


def _add_service(sync: _Sync, node: _Node, port: _Port, ip: str, number: int,
                 endpoints: list[EndpointInfo], bind: bool) -> None:
    flags = FLAG_PERSISTENT if port.affinity_timeout else 0
    if node.scheduler == "mh":
        flags |= FLAG_SOURCE_HASH
    svc = VirtualService(port.proto, ip_to_int(ip), number, node.scheduler, flags=flags,
                         timeout=port.affinity_timeout,
                         real_servers=[RealServer(ip_to_int(ep.ip), ep.port, 1, FWD_MASQ) for ep in endpoints])
    sync.services[svc.key] = svc
    if bind:  # packets only reach IPVS (on LOCAL_IN) for an address the node owns
        sync.bound[svc.addr] = None


# --- iptables --------------------------------------------------------------------------------

def _iptables_rules(sync: _Sync, cluster: Cluster, mark: str) -> tuple[list[str], list[str]]:
    """writeIptablesRules: the nat and filter rules, in kube-proxy's order."""
    config = cluster.config
    filled = {name for name, entries in sync.entries.items() if entries}
    # Connections to localhost are never services.
    nat = [rule_line(KUBE_SERVICES, "-s", LOOPBACK_CIDR, "-j", "RETURN")]
    filt: list[str] = []
    for name, table, chain, target, directions, proto in _SET_JUMPS:
        if name in filled:
            rule = rule_line(chain, ("-p", proto) if proto else (), _set_comment(name),
                         _match_set(name, directions), "-j", target)
            (nat if table == "nat" else filt).append(rule)
    if CLUSTER_IP in filled:
        nat.append(_cluster_ip_masquerade(cluster))
    if EXTERNAL_IP in filled:
        # External IPs may be reached across nodes, so their traffic is masqueraded.
        nat.append(rule_line(KUBE_SERVICES, _set_comment(EXTERNAL_IP), _match_set(EXTERNAL_IP, "dst,dst"),
                         "-j", KUBE_MARK_MASQ))
        nat += _external_ip_accepts(EXTERNAL_IP)
    if EXTERNAL_IP_LOCAL in filled:
        nat += _external_ip_accepts(EXTERNAL_IP_LOCAL)
    nat.append(rule_line(KUBE_SERVICES, "-m", "addrtype", "--dst-type", "LOCAL", "-j", KUBE_NODE_PORT))
    nat.append(rule_line(KUBE_LOAD_BALANCER, "-j", KUBE_MARK_MASQ))
    filt.append(rule_line(KUBE_SOURCE_RANGES_FIREWALL, "-j", "DROP"))
    # From the node, an LB IP's source and IPVS destination are both that IP.
    filt += [rule_line(KUBE_IPVS_OUT_FILTER, "-s", ip, "-m", "ipvs", "--vaddr", ip, "--vproto", proto,
                   "--vport", str(number), "-j", "DROP") for ip, proto, number in sync.no_node_access]
    # Accept service traffic in case other rules would block what IPVS must see.
    nat += [rule_line(KUBE_SERVICES, _match_set(name, "dst,dst"), "-j", "ACCEPT")
            for name in (CLUSTER_IP, LOAD_BALANCER) if name in filled]
    filt += forward_accept_rules(mark)
    filt.append(rule_line(KUBE_NODE_PORT, _set_comment(HEALTH_CHECK_NODE_PORT),
                      _match_set(HEALTH_CHECK_NODE_PORT, "dst"), "-j", "ACCEPT"))
    filt += _ipvs_filter_rules()
    nat += masquerade_rules(mark, config.random_fully)
    return nat, filt


def _set_comment(name: str) -> tuple[str, ...]:
    return comment_args(_SET_COMMENTS[name])


def _match_set(name: str, directions: str) -> tuple[str, ...]:
    return "-m", "set", "--match-set", name, directions


def _cluster_ip_masquerade(cluster: Cluster) -> str:
    config = cluster.config
    match = (*_set_comment(CLUSTER_IP), "-m", "set", "--match-set", CLUSTER_IP)
    if config.masquerade_all:
        return rule_line(KUBE_SERVICES, match, "dst,dst", "-j", KUBE_MARK_MASQ)
    if config.cluster_cidr:
        # Off-cluster traffic to a VIP may bounce off-node, so its reply must come back here.
        pod_cidr = canonical_cidr(config.cluster_cidr, _CONFIG, "clusterCIDR")
        return rule_line(KUBE_SERVICES, match, "dst,dst", "!", "-s", pod_cidr, "-j", KUBE_MARK_MASQ)
    # No local-traffic detector: kube-ipvs0 holds every VIP, so the node may pick one as the
    # source of its own connection to a service; masquerade those.
    return rule_line(KUBE_SERVICES, match, "src,dst", "-j", KUBE_MARK_MASQ)


def _external_ip_accepts(name: str) -> list[str]:
    match = (*_set_comment(name), *_match_set(name, "dst,dst"))
    return [
        # Traffic from off the machine: not from a bridge (a container) nor a local process.
        rule_line(KUBE_SERVICES, match, "-m", "physdev", "!", "--physdev-is-in",
              "-m", "addrtype", "!", "--src-type", "LOCAL", "-j", "ACCEPT"),
        # External IPs that are also local addresses (e.g. GCE load balancers) stay local.
        rule_line(KUBE_SERVICES, match, "-m", "addrtype", "--dst-type", "LOCAL", "-j", "ACCEPT"),
    ]


def _ipvs_filter_rules() -> list[str]:
    """KUBE-IPVS-FILTER: a VIP on kube-ipvs0 must not open the host's other ports (issue 72236)."""
    allowed = ((LOAD_BALANCER, "dst,dst"), (CLUSTER_IP, "dst,dst"), (EXTERNAL_IP, "dst,dst"),
               (EXTERNAL_IP_LOCAL, "dst,dst"), (HEALTH_CHECK_NODE_PORT, "dst"))
    rules = [rule_line(KUBE_IPVS_FILTER, _match_set(name, directions), "-j", "RETURN")
             for name, directions in allowed]
    rules.append(rule_line(KUBE_IPVS_FILTER, "-m", "conntrack", "--ctstate", "NEW",
                       _match_set(IPVS_IPS, "dst"), "-j", "REJECT"))
    return rules


def _iptables_payload(nat: list[str], filt: list[str], jump_rules: bool) -> str:
    """The restore payload: nat, then filter, as the IPVS proxier writes them."""
    lines = []
    for table, chains, rules in (("nat", NAT_CHAINS, nat), ("filter", FILTER_CHAINS, filt)):
        chain_lines = [chain_line(chain) for chain in chains]
        if jump_rules:
            chain_lines = [f":{builtin} ACCEPT [0:0]" for builtin in TABLE_HOOKS[table]] + chain_lines
            rules = _jump_rules(table) + rules
        lines += [f"*{table}", *chain_lines, *rules, "COMMIT"]
    return "\n".join(lines) + "\n"


def _jump_rules(table: str) -> list[str]:
    """The built-in chains' jumps as iptables-save lists them: each was prepended, so the
    last one kube-proxy ensured comes first."""
    rules = []
    for builtin in TABLE_HOOKS[table]:
        ours = [jump for jump in _JUMP_CHAINS if jump[:2] == (table, builtin)]
        rules += [rule_line(builtin, comment_args(comment), "-j", target) for _, _, target, comment in reversed(ours)]
    return rules
