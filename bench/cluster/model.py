"""The cluster as kube-proxy sees it: Services, EndpointSlices, Nodes and its own configuration.

Every writer (one per mode) reads a :class:`Cluster` and nothing else. The objects keep the
Kubernetes field meanings but only the fields kube-proxy uses. :func:`service_ports` does the
part of kube-proxy's ServiceChangeTracker/EndpointsChangeTracker that all modes share: one
entry per service port with its endpoints resolved and categorised.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field

CLUSTER_IP, NODE_PORT, LOAD_BALANCER = "ClusterIP", "NodePort", "LoadBalancer"
SERVICE_TYPES = (CLUSTER_IP, NODE_PORT, LOAD_BALANCER)
POLICY_CLUSTER, POLICY_LOCAL = "Cluster", "Local"
DEFAULT_AFFINITY_TIMEOUT = 10800  # seconds, v1.ClientIPConfig default


@dataclass(frozen=True)
class ServicePort:
    name: str  # "" for an unnamed port
    protocol: str  # lower case: tcp, udp, sctp
    port: int
    target_port: int | str  # a number, or the name of a container port
    node_port: int = 0  # 0 when none is allocated


@dataclass
class Service:
    namespace: str
    name: str
    type: str = CLUSTER_IP
    cluster_ip: str = ""  # "" or "None" (headless): kube-proxy ignores the service
    ports: list[ServicePort] = field(default_factory=list)
    external_ips: list[str] = field(default_factory=list)
    load_balancer_ips: list[str] = field(default_factory=list)  # status.loadBalancer.ingress[].ip
    load_balancer_source_ranges: list[str] = field(default_factory=list)
    external_traffic_policy: str = POLICY_CLUSTER
    internal_traffic_policy: str = POLICY_CLUSTER
    affinity_timeout: int = 0  # seconds of ClientIP affinity; 0 means sessionAffinity None
    health_check_node_port: int = 0

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def external_policy_local(self) -> bool:
        # kube-proxy only honours eTP=Local on services that have external destinations.
        return self.external_traffic_policy == POLICY_LOCAL and self.type in (NODE_PORT, LOAD_BALANCER)

    @property
    def internal_policy_local(self) -> bool:
        return self.internal_traffic_policy == POLICY_LOCAL


@dataclass(frozen=True)
class EndpointPort:
    name: str
    protocol: str
    port: int


@dataclass(frozen=True)
class Endpoint:
    ip: str
    node_name: str = ""
    ready: bool = True
    serving: bool = True
    terminating: bool = False


@dataclass
class EndpointSlice:
    namespace: str
    name: str
    service_name: str  # the kubernetes.io/service-name label
    ports: list[EndpointPort] = field(default_factory=list)
    endpoints: list[Endpoint] = field(default_factory=list)


@dataclass
class Node:
    name: str
    ips: list[str] = field(default_factory=list)
    pod_cidr: str = ""


@dataclass
class ProxyConfig:
    """KubeProxyConfiguration fields kpbench uses, plus host facts kube-proxy detects at run time."""

    mode: str = "iptables"
    cluster_cidr: str = ""  # the local-traffic detector: "! -s <cidr>"; "" means no detector
    masquerade_bit: int = 14
    masquerade_all: bool = False
    node_port_addresses: list[str] = field(default_factory=list)  # CIDRs; [] means all local addresses
    hostname_override: str = ""
    ipvs_scheduler: str = "rr"
    node_ips: list[str] = field(default_factory=list)  # this node's own addresses (--node-ip)
    # Detected on the host by kube-proxy; the defaults are what a current kernel gives.
    nfacct: bool = True
    random_fully: bool = True
    tcp_be_liberal: bool = False
    localhost_nodeports: bool = True

    @property
    def masquerade_mark(self) -> int:
        return 1 << self.masquerade_bit


@dataclass
class Cluster:
    services: list[Service] = field(default_factory=list)
    slices: list[EndpointSlice] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)
    config: ProxyConfig = field(default_factory=ProxyConfig)
    node_name: str = ""  # the node this kube-proxy runs on (hostnameOverride or the first node)


@dataclass(frozen=True)
class EndpointInfo:
    ip: str
    port: int
    is_local: bool
    ready: bool = True
    serving: bool = True
    terminating: bool = False

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"


@dataclass
class ServicePortInfo:
    """One service port with its endpoints, as every mode's writer consumes it."""

    service: Service
    port: ServicePort
    endpoints: list[EndpointInfo]  # all endpoints for this port, sorted by "ip:port"

    @property
    def spn(self) -> str:
        """ServicePortName.String(): ``ns/name:portname``, or ``ns/name`` for an unnamed port."""
        base = self.service.key
        return f"{base}:{self.port.name}" if self.port.name else base

    @property
    def cluster_endpoints(self) -> list[EndpointInfo]:
        """Endpoints usable by the Cluster policy: ready ones, else serving-terminating ones."""
        return _usable(self.endpoints)

    @property
    def local_endpoints(self) -> list[EndpointInfo]:
        return _usable([e for e in self.endpoints if e.is_local])

    @property
    def cluster_policy_endpoints(self) -> list[EndpointInfo]:
        """What ClusterIP traffic reaches: local ones when internalTrafficPolicy=Local."""
        return self.local_endpoints if self.service.internal_policy_local else self.cluster_endpoints

    @property
    def has_endpoints(self) -> bool:
        return bool(self.cluster_endpoints) or bool(self.local_endpoints)


def _usable(endpoints: list[EndpointInfo]) -> list[EndpointInfo]:
    ready = [e for e in endpoints if e.ready]
    if ready:
        return ready
    return [e for e in endpoints if e.serving and e.terminating]


def service_ports(cluster: Cluster) -> list[ServicePortInfo]:
    """Resolve every (service, port) to its endpoints, sorted by service port name.

    An EndpointSlice port matches a service port by name (kube-proxy's rule); the endpoint's
    port is the slice's port number. Headless services (no clusterIP) are skipped.

    Writers, loaders and workloads all ask for this, so it is kept while the cluster lives and
    its services and slices lists are the same objects (a changed cluster is a new one, made
    with dataclasses.replace or a copy). The list is shared: do not change it.
    """
    entry = _RESOLVED.get(id(cluster))
    if entry is None or entry[0] is not cluster.services or entry[1] is not cluster.slices:
        if entry is None:
            weakref.finalize(cluster, _RESOLVED.pop, id(cluster), None)
        entry = _RESOLVED[id(cluster)] = (cluster.services, cluster.slices, _resolve_ports(cluster))
    return entry[2]


# id(cluster) → (its services list, its slices list, its service ports), while the cluster lives.
_RESOLVED: dict[int, tuple] = {}


def _resolve_ports(cluster: Cluster) -> list[ServicePortInfo]:
    by_service: dict[tuple[str, str], list[EndpointSlice]] = {}
    for eps in cluster.slices:
        by_service.setdefault((eps.namespace, eps.service_name), []).append(eps)
    infos = []
    for svc in cluster.services:
        if svc.cluster_ip in ("", "None"):
            continue
        slices = by_service.get((svc.namespace, svc.name), [])
        for port in svc.ports:
            eps = set()
            for eps_slice in slices:
                for ep_port in eps_slice.ports:
                    if ep_port.name != port.name or ep_port.protocol != port.protocol:
                        continue
                    for ep in eps_slice.endpoints:
                        eps.add(EndpointInfo(ep.ip, ep_port.port, ep.node_name == cluster.node_name,
                                             ep.ready, ep.serving, ep.terminating))
            infos.append(ServicePortInfo(svc, port, sorted(eps, key=lambda e: e.address)))
    infos.sort(key=lambda info: (info.spn, info.port.protocol))
    return infos
