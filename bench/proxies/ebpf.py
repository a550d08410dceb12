"""eBPF service maps: what a Cilium-like kube-proxy replacement programs for a cluster.

A REFERENCE MODEL, not a kube-proxy mode: it stands for Cilium's load balancer (kube-proxy
replacement), which keeps services in BPF hash maps instead of netfilter rules. The text is the
map dump bench/loaders/ebpf.py documents and reads back: the backend map, then per frontend its
backend slots and last its master entry, in the order the agent inserts them (backends first,
a frontend's master last, so that a master never points at missing slots).

Frontends per service port, as Cilium creates them:

* ClusterIP: ``clusterIP:port`` with the internal-policy backends;
* ExternalIP: each ``externalIPs`` address with the external-policy backends;
* LoadBalancer: each ingress IP with the external-policy backends;
* NodePort: ``nodeIP:nodePort`` for each of the node's non-loopback addresses that
  nodePortAddresses selects (Cilium also adds a 0.0.0.0 surrogate frontend for its wildcard
  lookup; not modelled), with the external-policy backends.

Backends are the usable endpoints (ready, else serving-and-terminating), sorted by address; a
Local traffic policy takes only this node's, and with none the frontend has count 0 and drops
(Cilium does not fall back as kube-proxy's IPVS mode does). Each distinct endpoint
(address, port, protocol) gets one backend id, from 1 in order of first use. Two service ports
claiming the same frontend: the last one wins, as in IPVS mode. Session affinity,
loadBalancerSourceRanges and health-check node ports are not modelled.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from bench.cluster.model import Cluster, EndpointInfo, service_ports
from bench.errors import InputError
from bench.loaders.ebpf import HEADER, MAP_NAMES
from bench.netaddr import PROTOCOL_NAMES, PROTOCOLS, ip_to_int, parse_cidr, parse_port, parse_protocol
from bench.proxies.iptables import (canonical_ipv4, check_slices, in_any_cidr, is_loopback, local_node_ips,
                                    policy_endpoints)
from kernels import layout as L

_CONFIG = "KubeProxyConfiguration"


@dataclass(frozen=True)
class EbpfWriterOptions:
    service_max_entries: int = L.EBPF_SERVICE_MAX_ENTRIES  # Cilium's bpf-lb-map-max
    backend_max_entries: int = L.EBPF_SERVICE_MAX_ENTRIES
    # Write a cluster that does not fit (the sweep does, to record the map-full limit); by
    # default that is an InputError naming the limit.
    allow_overflow: bool = False


class _Frontend(NamedTuple):
    ip: str
    port: int
    proto: int
    type: str
    name: str  # the service port's name, ns/name[:port]
    endpoints: list[EndpointInfo]


def write(cluster: Cluster, options: EbpfWriterOptions = EbpfWriterOptions()) -> str:
    """The map dump of ``cluster``: backends, then per frontend its slots and its master."""
    frontends = _frontends(cluster)
    backend_ids: dict[tuple[str, int, int], int] = {}
    for frontend in frontends.values():
        for ep in frontend.endpoints:
            backend_ids.setdefault((ep.ip, ep.port, frontend.proto), len(backend_ids) + 1)
    entries = len(frontends) + sum(len(f.endpoints) for f in frontends.values())
    limits = {"services": options.service_max_entries, "backends": options.backend_max_entries}
    wanted = {"services": entries, "backends": len(backend_ids)}
    for name in MAP_NAMES:
        if wanted[name] > limits[name] and not options.allow_overflow:
            raise InputError(f"needs {wanted[name]:,} {name[:-1]}-map entries but the map holds max_entries="
                             f"{limits[name]:,} (Cilium's bpf-lb-map-max): inserts past it fail with E2BIG",
                             "cluster", f"map {name}")
    lines = [HEADER, "# One line per map entry, in insertion order: backends, then per frontend its",
             "# backend slots and last its master entry (slot 0).",
             *(f"map {name} max_entries={limits[name]}" for name in MAP_NAMES)]
    lines += [f"backend {ident} {ip}:{port}/{PROTOCOL_NAMES[proto]}"
              for (ip, port, proto), ident in backend_ids.items()]
    for rev_nat, f in enumerate(frontends.values(), 1):
        key = f"service {f.ip}:{f.port}/{PROTOCOL_NAMES[f.proto]}"
        lines += [f"{key} slot={slot} backend={backend_ids[(ep.ip, ep.port, f.proto)]}"
                  for slot, ep in enumerate(f.endpoints, 1)]
        lines.append(f"{key} slot=0 count={len(f.endpoints)} rev_nat={rev_nat} type={f.type} name={f.name}")
    return "\n".join(lines) + "\n"


def _frontends(cluster: Cluster) -> dict[tuple, _Frontend]:
    """(addr, port, proto) -> its frontend, in creation order (a later claim replaces it)."""
    check_slices(cluster)
    nodeport_ips = _nodeport_ips(cluster)
    frontends: dict[tuple, _Frontend] = {}

    def add(ip: str, port: int, proto: int, kind: str, name: str, endpoints: list[EndpointInfo]) -> None:
        frontends[(ip_to_int(ip), port, proto)] = _Frontend(ip, port, proto, kind, name, endpoints)

    for info in service_ports(cluster):
        svc = info.service
        where = f"Service {svc.key}"
        proto = PROTOCOLS[parse_protocol(info.port.protocol, where, "spec.ports[].protocol")]
        port = parse_port(info.port.port, where, "spec.ports[].port")
        node_port = parse_port(info.port.node_port, where, "spec.ports[].nodePort", allow_zero=True)
        external_ips = [canonical_ipv4(ip, where, "spec.externalIPs") for ip in svc.external_ips]
        lb_ips = [canonical_ipv4(ip, where, "status.loadBalancer.ingress[].ip") for ip in svc.load_balancer_ips]
        cluster_eps, local_eps = policy_endpoints(info, bool(node_port or external_ips or lb_ips))
        internal = local_eps if svc.internal_policy_local else cluster_eps
        external = local_eps if svc.external_policy_local else cluster_eps
        add(canonical_ipv4(svc.cluster_ip, where, "spec.clusterIP"), port, proto, "ClusterIP", info.spn, internal)
        for ip in external_ips:
            add(ip, port, proto, "ExternalIP", info.spn, external)
        for ip in lb_ips:
            add(ip, port, proto, "LoadBalancer", info.spn, external)
        for ip in nodeport_ips if node_port else ():
            add(ip, node_port, proto, "NodePort", info.spn, external)
    return frontends


def _nodeport_ips(cluster: Cluster) -> list[str]:
    """The node's non-loopback addresses that nodePortAddresses selects (all when empty)."""
    cidrs = [parse_cidr(text, _CONFIG, "nodePortAddresses") for text in cluster.config.node_port_addresses]
    local = dict.fromkeys(ip for ip in local_node_ips(cluster) if not is_loopback(ip))
    return [ip for ip in local if not cidrs or in_any_cidr(ip, cidrs)]
