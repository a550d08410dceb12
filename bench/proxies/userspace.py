"""userspace mode: the portal rules the original kube-proxy proxier (removed in 1.26) programmed.

The userspace proxier opened one listening socket (a "proxy port") per service port and
installed nat rules that sent the service's traffic to it; the proxy then copied the bytes
to a backend in user space (bench/relay.py). Its rules (shared/docs/kube-proxy-rules.md §e,
and ``pkg/proxy/userspace/proxier.go`` as recalled there):

* four nat chains, reached from the built-in chains: PREROUTING → KUBE-PORTALS-CONTAINER
  (prepended: "this must be before the NodePort rules") … → KUBE-NODEPORT-CONTAINER (appended,
  for local destinations: "this must be the last rule"); OUTPUT → KUBE-PORTALS-HOST … →
  KUBE-NODEPORT-HOST the same way;
* per service port and portal address (cluster IP, each load-balancer ingress IP, each
  external IP) a container rule ``-j REDIRECT --to-ports PROXY`` and a host rule
  ``-j DNAT --to-destination HOST_IP:PROXY``; external IPs get a second container rule for
  traffic not arriving over a bridge (``-m physdev ! --physdev-is-in``) and
  ``-m addrtype --dst-type LOCAL`` on their local-destination rules;
* per NodePort, the same pair in the NODEPORT chains, without a destination address.

kube-proxy added each rule with its own ``iptables -A`` call as services appeared; the text
here is the resulting ``iptables-save -t nat`` listing, in the proxier's argument order.
Only TCP and UDP were proxied: SCTP ports got no portal. The proxier's filter chain
KUBE-NODEPORT-NON-LOCAL (``-m state --state NEW -j ACCEPT`` per proxy port, so default-deny
INPUT policies let NodePort traffic in) is left out: the loader has no ``state`` match and the
rule never changes where a packet goes.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from bench.cluster.model import Cluster, ServicePortInfo, service_ports
from bench.errors import InputError
from bench.netaddr import parse_port, parse_protocol
from bench.proxies.iptables import (canonical_ipv4, chain_line, comment_args, local_node_ips,
                                    ordered_ports, rule_line)

PORTALS_CONTAINER = "KUBE-PORTALS-CONTAINER"
PORTALS_HOST = "KUBE-PORTALS-HOST"
NODEPORT_CONTAINER = "KUBE-NODEPORT-CONTAINER"
NODEPORT_HOST = "KUBE-NODEPORT-HOST"
# In iptables-save's order: libiptc keeps user chains sorted by name.
PORTAL_CHAINS = (NODEPORT_CONTAINER, NODEPORT_HOST, PORTALS_CONTAINER, PORTALS_HOST)

PROXIED_PROTOCOLS = ("tcp", "udp")
# Linux's default net.ipv4.ip_local_port_range: where port-0 listeners land.
EPHEMERAL_PORTS = (32768, 60999)

_PORTALS_COMMENT = "handle ClusterIPs; NOTE: this must be before the NodePort rules"
_NODEPORTS_COMMENT = "handle service NodePorts; NOTE: this must be the last rule in the chain"
_DST_LOCAL = ("-m", "addrtype", "--dst-type", "LOCAL")
_NOT_BRIDGED = ("-m", "physdev", "!", "--physdev-is-in")


@dataclass(frozen=True)
class WriterOptions:
    # Also write the built-in chains with kube-proxy's jumps into the portal chains.
    include_jump_rules: bool = False
    # None: service ports in sorted order; an int: a seeded shuffle (the order services appeared).
    service_order_seed: int | None = None
    # kube-proxy's --proxy-port-range; by default the kernel picked a free ephemeral port.
    proxy_port_range: tuple[int, int] = EPHEMERAL_PORTS
    # Seed of the proxy-port choice (the kernel's and the allocator's choices were random).
    proxy_port_seed: int = 0


@dataclass(frozen=True)
class Portal:
    """One proxied service port: where its traffic arrives and the proxy port it goes to."""

    spn: str
    proto: str
    port: int
    cluster_ip: str
    lb_ips: list[str]
    external_ips: list[str]
    node_port: int
    proxy_port: int
    affinity_timeout: int
    backends: list[str]  # "ip:port" of the endpoints the proxy balances over


def portals(cluster: Cluster, options: WriterOptions = WriterOptions()) -> list[Portal]:
    """The proxied service ports in rule order, each with its allocated proxy port."""
    infos = [i for i in ordered_ports(service_ports(cluster), options.service_order_seed)
             if _protocol(i) in PROXIED_PROTOCOLS]
    ports = allocate_proxy_ports(len(infos), options.proxy_port_range, options.proxy_port_seed)
    return [_portal(info, proxy_port) for info, proxy_port in zip(infos, ports)]


def allocate_proxy_ports(count: int, port_range: tuple[int, int], seed: int) -> list[int]:
    """``count`` distinct ports from ``port_range``, chosen at random with ``seed``."""
    low, high = port_range
    if not (isinstance(low, int) and isinstance(high, int) and 1 <= low <= high <= 65535):
        raise InputError(f"must be two ports low ≤ high in 1..65535, not {port_range!r}",
                         "WriterOptions", "proxy_port_range")
    if count > high - low + 1:
        raise InputError(f"{count} proxied service ports need one proxy port each, but the range "
                         f"{low}-{high} has only {high - low + 1}", "WriterOptions", "proxy_port_range")
    return random.Random(seed).sample(range(low, high + 1), count)


def _protocol(info: ServicePortInfo) -> str:
    return parse_protocol(info.port.protocol, f"Service {info.service.key}", "spec.ports[].protocol")


def _portal(info: ServicePortInfo, proxy_port: int) -> Portal:
    svc = info.service
    where = f"Service {svc.key}"
    return Portal(
        spn=info.spn, proto=_protocol(info),
        port=parse_port(info.port.port, where, "spec.ports[].port"),
        cluster_ip=canonical_ipv4(svc.cluster_ip, where, "spec.clusterIP"),
        lb_ips=[canonical_ipv4(ip, where, "status.loadBalancer.ingress[].ip") for ip in svc.load_balancer_ips],
        external_ips=[canonical_ipv4(ip, where, "spec.externalIPs") for ip in svc.external_ips],
        node_port=parse_port(info.port.node_port, where, "spec.ports[].nodePort", allow_zero=True),
        proxy_port=proxy_port, affinity_timeout=svc.affinity_timeout,
        backends=[ep.address for ep in info.cluster_endpoints],
    )


def host_ip(cluster: Cluster) -> str:
    """The node's primary address: host traffic is DNATed to it (REDIRECT failed for it)."""
    ips = local_node_ips(cluster)
    if not ips:
        raise InputError("userspace mode DNATs the node's own traffic to its primary address: "
                         "give --node-ip or a Node object for this node", "KubeProxyConfiguration", "nodeIPs")
    return ips[0]


def write(cluster: Cluster, options: WriterOptions = WriterOptions()) -> str:
    """``iptables-save -t nat`` of kube-proxy's chains after the userspace proxier's sync."""
    rules = portal_rules(portals(cluster, options), host_ip(cluster))
    lines = ["*nat"]
    if options.include_jump_rules:
        lines += [f":{name} ACCEPT [0:0]" for name in ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING")]
    lines += [chain_line(name) for name in PORTAL_CHAINS]
    if options.include_jump_rules:
        lines += jump_rules()
    return "\n".join([*lines, *rules, "COMMIT"]) + "\n"


def jump_rules() -> list[str]:
    """The built-in chains' jumps, portals first and NodePorts last, as iptables-save lists them."""
    return [
        rule_line("PREROUTING", comment_args(_PORTALS_COMMENT), "-j", PORTALS_CONTAINER),
        rule_line("PREROUTING", _DST_LOCAL, comment_args(_NODEPORTS_COMMENT), "-j", NODEPORT_CONTAINER),
        rule_line("OUTPUT", comment_args(_PORTALS_COMMENT), "-j", PORTALS_HOST),
        rule_line("OUTPUT", _DST_LOCAL, comment_args(_NODEPORTS_COMMENT), "-j", NODEPORT_HOST),
    ]


def portal_rules(ports: list[Portal], host: str) -> list[str]:
    """Every portal rule, chain by chain, each chain in the order the portals were opened."""
    by_chain: dict[str, list[str]] = {name: [] for name in PORTAL_CHAINS}
    for portal in ports:
        for chain, rule in _rules_of(portal, host):
            by_chain[chain].append(rule)
    return [rule for chain in PORTAL_CHAINS for rule in by_chain[chain]]


def _rules_of(portal: Portal, host: str) -> list[tuple[str, str]]:
    """openPortal: the cluster IP, each load-balancer ingress IP, each external IP, the NodePort."""
    redirect = ("-j", "REDIRECT", "--to-ports", str(portal.proxy_port))
    dnat = ("-j", "DNAT", "--to-destination", f"{host}:{portal.proxy_port}")
    rules = []
    for ip in [portal.cluster_ip, *portal.lb_ips]:
        destination = _portal_match(portal, portal.port, ip)
        rules += [(PORTALS_CONTAINER, rule_line(PORTALS_CONTAINER, destination, redirect)),
                  (PORTALS_HOST, rule_line(PORTALS_HOST, destination, dnat))]
    for ip in portal.external_ips:
        destination = _portal_match(portal, portal.port, ip)
        rules += [(PORTALS_CONTAINER, rule_line(PORTALS_CONTAINER, destination, _NOT_BRIDGED, redirect)),
                  (PORTALS_CONTAINER, rule_line(PORTALS_CONTAINER, destination, _DST_LOCAL, redirect)),
                  (PORTALS_HOST, rule_line(PORTALS_HOST, destination, _DST_LOCAL, dnat))]
    if portal.node_port:
        any_address = _portal_match(portal, portal.node_port, None)
        rules += [(NODEPORT_CONTAINER, rule_line(NODEPORT_CONTAINER, any_address, redirect)),
                  (NODEPORT_HOST, rule_line(NODEPORT_HOST, any_address, dnat))]
    return rules


def _portal_match(portal: Portal, port: int, ip: str | None) -> tuple[str, ...]:
    # iptablesCommonPortalArgs' order: comment, protocol, port, then the destination as a /32.
    words = (*comment_args(portal.spn), "-p", portal.proto, "-m", portal.proto, "--dport", str(port))
    return words + (("-d", f"{ip}/32") if ip else ())
