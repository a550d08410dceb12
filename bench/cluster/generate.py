"""Seeded synthetic clusters, and their Kubernetes manifests.

``generate(S, E, N)`` builds S services with E endpoints per service port on N nodes. All
randomness comes from one ``numpy.random.default_rng(seed)``: the same arguments give an equal
cluster, bit for bit.

Endpoints per service (``distribution``):

- ``fixed``: every service has exactly E endpoints (E = 0 gives services without endpoints).
- ``heavy-tailed``: ceil(lognormal(mu, 1.2)) clipped to 1..250, with mu solved on the drawn
  sample so that its mean is as close to E as the integers allow. 250 is Kubernetes'
  per-service endpoints threshold; most services get a few endpoints, a few get hundreds.

Service shapes (``mix``):

- ``clusterip``: every service is ClusterIP with one unnamed TCP port 80 -> 8080, both traffic
  policies Cluster, no affinity, all endpoints ready. In iptables mode this gives exactly
  nat = 5 + S·(2 + 3E) rules (E ≥ 1).
- ``realistic``, each drawn independently per service:

  ==========================================  ===========================================
  type                                        ClusterIP 75 %, NodePort 15 %, LoadBalancer 10 %
  ports                                       one TCP port 87.5 %; 2–3 ports 12 % (DNS-like
                                              53/UDP + 53/TCP + 9153, 80 + 443, 514/UDP +
                                              514/TCP, 8080 + 9090); one SCTP port 0.5 %
  externalIPs                                 2 % of services, one address each
  LoadBalancer ingress IP                     one per LoadBalancer service
  loadBalancerSourceRanges                    20 % of LoadBalancer services, 1–2 ranges
  externalTrafficPolicy=Local                 30 % of NodePort and LoadBalancer services
                                              (LoadBalancer ones get a healthCheckNodePort)
  internalTrafficPolicy=Local                 3 % of services
  sessionAffinity ClientIP (10800 s)          5 % of services
  endpoints not ready / terminating           2 % / 1 % (half of the terminating still serving)
  ==========================================  ===========================================

Names: service i is ``ns-<i // 50>/svc-<i>``, its slices ``svc-<i>-<k>``, node i ``node-<i>``.

Addresses: cluster IPs are drawn at random from 10.96.0.0/12, as the apiserver's allocator
does (10.96.0.1 is left to the ``kubernetes`` API service); LoadBalancer IPs are drawn from
172.16.0.0/12 and externalIPs from 198.18.0.0/15, all distinct. Node i has IP 100.64.0.0 + i + 1 and
the i-th pod CIDR of the cluster CIDR 10.128.0.0/9. Pod CIDRs are /24 (kube-controller-manager's
default node CIDR mask), larger when ceil(total endpoints / N) pods do not fit, smaller when N
/24s do not fit in the /9. Pods take addresses from .2 of their node's CIDR in order (.0 is the
network, .1 the node's bridge, the last address the broadcast). Every endpoint is a distinct
pod; pods are spread evenly over the nodes in a seeded random order.

Node ports come from 30000–32767 in a seeded random order through one allocator for all
protocols, as the apiserver's, so they are unique per protocol (and across protocols). When a
NodePort or LoadBalancer service needs more node ports than are left, it becomes a ClusterIP
service instead (and loses its LoadBalancer IP and externalTrafficPolicy).

The kube-proxy node is the first node. Each service gets one EndpointSlice per 100 endpoints
(the EndpointSlice controller's default maxEndpointsPerSlice), and one empty slice when it has
no endpoints, as the controller creates for a selector that matches no pods.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from bench.cluster.model import (CLUSTER_IP, DEFAULT_AFFINITY_TIMEOUT, LOAD_BALANCER, NODE_PORT,
                                 POLICY_CLUSTER, POLICY_LOCAL, Cluster, Endpoint, EndpointPort,
                                 EndpointSlice, Node, ProxyConfig, Service, ServicePort)
from bench.errors import InputError
from bench.netaddr import int_to_ip, parse_cidr

DISTRIBUTIONS = ("fixed", "heavy-tailed")
MIXES = ("clusterip", "realistic")

SERVICE_CIDR = "10.96.0.0/12"
CLUSTER_CIDR = "10.128.0.0/9"
NODE_CIDR = "100.64.0.0/10"
LOAD_BALANCER_CIDR = "172.16.0.0/12"
EXTERNAL_IP_CIDR = "198.18.0.0/15"
NODE_PORT_RANGE = (30000, 32767)

MAX_ENDPOINTS_PER_SERVICE = 250  # Kubernetes' per-service endpoints threshold
MAX_ENDPOINTS_PER_SLICE = 100  # the EndpointSlice controller's default maxEndpointsPerSlice
HEAVY_TAIL_SIGMA = 1.2
DEFAULT_POD_PREFIX = 24  # kube-controller-manager --node-cidr-mask-size
POD_OFFSET = 2  # pods start at .2: .0 is the pod CIDR's network address, .1 the node's bridge
RESERVED_POD_ADDRESSES = POD_OFFSET + 1  # and the last one is its broadcast address
SERVICES_PER_NAMESPACE = 50

# The realistic mix, as probabilities (see the module docstring).
TYPE_WEIGHTS = {CLUSTER_IP: 0.75, NODE_PORT: 0.15, LOAD_BALANCER: 0.10}
EXTERNAL_IP_SHARE = 0.02
SOURCE_RANGES_SHARE = 0.20  # of LoadBalancer services
EXTERNAL_LOCAL_SHARE = 0.30  # of NodePort and LoadBalancer services
INTERNAL_LOCAL_SHARE = 0.03
AFFINITY_SHARE = 0.05
NOT_READY_SHARE = 0.02
TERMINATING_SHARE = 0.01
# Office and VPN ranges a LoadBalancer is opened to; the last one contains the node IPs, which
# makes kube-proxy add its extra "-s <lbIP>" rules to KUBE-FW chains.
SOURCE_RANGES = ("203.0.113.0/24", "198.51.100.0/24", "192.0.2.0/24", "100.64.0.0/10")


class _Port(NamedTuple):
    name: str
    protocol: str
    port: int
    target: int | str  # the service's targetPort
    container_port: int  # the number the EndpointSlice carries


class _Shape:
    """A service's ports, with the frozen model objects shared by every service of the shape."""

    def __init__(self, *ports: _Port):
        self.ports = ports
        self.service_ports = tuple(ServicePort(p.name, p.protocol, p.port, p.target) for p in ports)
        self.endpoint_ports = tuple(EndpointPort(p.name, p.protocol, p.container_port) for p in ports)


CLUSTERIP_SHAPE = _Shape(_Port("", "tcp", 80, 8080, 8080))
# (shape, probability) of the realistic mix.
REALISTIC_SHAPES = (
    (_Shape(_Port("http", "tcp", 80, 8080, 8080)), 0.30),
    (_Shape(_Port("https", "tcp", 443, 8443, 8443)), 0.20),
    (_Shape(_Port("grpc", "tcp", 9090, 9090, 9090)), 0.175),
    (_Shape(_Port("", "tcp", 6379, 6379, 6379)), 0.10),
    (_Shape(_Port("", "tcp", 5432, 5432, 5432)), 0.10),
    (_Shape(_Port("dns", "udp", 53, 53, 53), _Port("dns-tcp", "tcp", 53, 53, 53),
            _Port("metrics", "tcp", 9153, "metrics", 9153)), 0.03),
    (_Shape(_Port("http", "tcp", 80, "http", 8080), _Port("https", "tcp", 443, "https", 8443)), 0.04),
    (_Shape(_Port("syslog", "udp", 514, 514, 514), _Port("syslog-tcp", "tcp", 514, 514, 514)), 0.02),
    (_Shape(_Port("http", "tcp", 8080, 8080, 8080), _Port("metrics", "tcp", 9090, "metrics", 9090)), 0.03),
    (_Shape(_Port("ngap", "sctp", 38412, 38412, 38412)), 0.005),
)


def generate(services: int, endpoints: int, nodes: int, seed: int = 0,
             distribution: str = "fixed", mix: str = "realistic") -> Cluster:
    """A synthetic cluster: ``services`` services, ``endpoints`` endpoints each, ``nodes`` nodes."""
    _check_arguments(services, endpoints, nodes, seed, distribution, mix)
    rng = np.random.default_rng(seed)
    counts = _endpoint_counts(rng, services, endpoints, distribution)
    pods = _PodLayout(int(counts.sum()), nodes)
    node_objects = pods.nodes()
    plan = _plan_services(rng, services, mix)
    service_objects = _build_services(plan)
    slices = _build_slices(rng, service_objects, plan.shapes, counts, pods, realistic=mix == "realistic")
    config = ProxyConfig(cluster_cidr=CLUSTER_CIDR, node_ips=list(node_objects[0].ips))
    return Cluster(service_objects, slices, node_objects, config, node_name=node_objects[0].name)


def _check_arguments(services, endpoints, nodes, seed, distribution, mix) -> None:
    for name, value in (("services", services), ("endpoints", endpoints), ("nodes", nodes), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise InputError(f"must be an integer, got {value!r}", "generate", name)
        if value < 0:
            raise InputError(f"must not be negative, got {value}", "generate", name)
    if nodes < 1:
        raise InputError("a cluster needs at least one node: kube-proxy runs on the first", "generate", "nodes")
    if distribution not in DISTRIBUTIONS:
        raise InputError(f"unknown distribution {distribution!r} (expected fixed or heavy-tailed)",
                         "generate", "distribution")
    if mix not in MIXES:
        raise InputError(f"unknown mix {mix!r} (expected clusterip or realistic)", "generate", "mix")
    if distribution == "heavy-tailed" and not 1 <= endpoints <= MAX_ENDPOINTS_PER_SERVICE:
        raise InputError(f"a heavy-tailed mean must be 1..{MAX_ENDPOINTS_PER_SERVICE} (every service gets "
                         f"1 to {MAX_ENDPOINTS_PER_SERVICE} endpoints), got {endpoints}", "generate", "endpoints")
    capacity = _range_size(SERVICE_CIDR) - 3  # network, broadcast and the kubernetes service
    if services > capacity:
        raise InputError(f"{services:,} services do not fit in {SERVICE_CIDR} (at most {capacity:,})",
                         "generate", "services")


def _endpoint_counts(rng: np.random.Generator, services: int, mean: int, distribution: str) -> np.ndarray:
    if distribution == "fixed":
        return np.full(services, mean, dtype=np.int64)
    normal = rng.standard_normal(services)
    return _heavy_tailed_counts(normal, mean)


def _heavy_tailed_counts(normal: np.ndarray, mean: int) -> np.ndarray:
    """Discretised, capped lognormal counts; mu is bisected so the sample mean lands on ``mean``."""
    def counts(mu: float) -> np.ndarray:
        values = np.ceil(np.exp(mu + HEAVY_TAIL_SIGMA * normal))
        return np.clip(values, 1, MAX_ENDPOINTS_PER_SERVICE).astype(np.int64)

    low, high = -10.0, 20.0  # sample means of exactly 1 and exactly 250
    for _ in range(60):
        middle = (low + high) / 2
        if counts(middle).mean() < mean:
            low = middle
        else:
            high = middle
    candidates = (counts(low), counts(high))
    return min(candidates, key=lambda c: abs(c.mean() - mean))


def _range_size(cidr: str) -> int:
    _, mask = parse_cidr(cidr)
    return (~mask & 0xFFFFFFFF) + 1


def _random_addresses(rng: np.random.Generator, cidr: str, count: int, first: int = 1) -> list[str]:
    """``count`` distinct random addresses of ``cidr`` from offset ``first`` up to, not including,
    the broadcast address."""
    base, _ = parse_cidr(cidr)
    offsets = rng.choice(_range_size(cidr) - 1 - first, size=count, replace=False) + first
    return [int_to_ip(base + offset) for offset in offsets.tolist()]


def _host_bits(pods_per_node: int) -> int:
    """Host bits of a pod CIDR with room for the pods and the reserved addresses."""
    return (pods_per_node + RESERVED_POD_ADDRESSES - 1).bit_length()


def _count(number: int, noun: str) -> str:
    return f"{number:,} {noun}" if number == 1 else f"{number:,} {noun}s"


class _PodLayout:
    """Equal per-node pod CIDRs carved from the cluster CIDR, and a node for every pod."""

    def __init__(self, pods: int, nodes: int):
        self.pods, self.node_count = pods, nodes
        host_bits = _host_bits(-(-pods // nodes))
        node_bits = (nodes - 1).bit_length()
        cluster_base, cluster_mask = parse_cidr(CLUSTER_CIDR)
        cluster_prefix = bin(cluster_mask).count("1")
        smallest_prefix = cluster_prefix + node_bits
        if smallest_prefix > 32 - host_bits:
            too_many = "nodes" if smallest_prefix > 32 - _host_bits(0) else "endpoints"
            raise InputError(f"{_count(pods, 'endpoint')} on {_count(nodes, 'node')} do not fit "
                             f"in {CLUSTER_CIDR}: each node needs a /{32 - host_bits} pod CIDR",
                             "generate", too_many)
        self.prefix = min(32 - host_bits, max(DEFAULT_POD_PREFIX, smallest_prefix))
        self.cluster_base = cluster_base

    @property
    def block(self) -> int:
        return 1 << (32 - self.prefix)

    def nodes(self) -> list[Node]:
        node_base, _ = parse_cidr(NODE_CIDR)
        return [Node(_node_name(i), [int_to_ip(node_base + 1 + i)],
                     f"{int_to_ip(self.cluster_base + i * self.block)}/{self.prefix}")
                for i in range(self.node_count)]

    def place(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(node index, address) of every pod; each node gets at most ceil(pods / nodes) pods."""
        node_of_pod = rng.permutation(np.arange(self.pods, dtype=np.int64) % self.node_count)
        order = np.argsort(node_of_pod, kind="stable")
        per_node = np.bincount(node_of_pod, minlength=self.node_count)
        first_of_node = np.cumsum(per_node) - per_node
        rank = np.empty(self.pods, dtype=np.int64)
        rank[order] = np.arange(self.pods) - np.repeat(first_of_node, per_node)
        addresses = self.cluster_base + node_of_pod * self.block + POD_OFFSET + rank
        return node_of_pod, addresses


def _node_name(index: int) -> str:
    return f"node-{index}"


@dataclass
class _Plan:
    """Per-service draws, made up front so that the draws never depend on earlier results."""

    shapes: list[_Shape]
    types: list[str]
    cluster_ips: list[str]
    external_ips: list[list[str]]
    load_balancer_ips: list[str]  # "" for services not drawn as LoadBalancer
    source_ranges: list[list[str]]
    external_local: list[bool]
    internal_local: list[bool]
    affinity: list[bool]
    node_ports: list[int]  # the allocator's order


def _plan_services(rng: np.random.Generator, count: int, mix: str) -> _Plan:
    # 10.96.0.1 belongs to the kubernetes API service.
    cluster_ips = _random_addresses(rng, SERVICE_CIDR, count, first=2)
    if mix == "clusterip":
        return _Plan([CLUSTERIP_SHAPE] * count, [CLUSTER_IP] * count, cluster_ips,
                     external_ips=[[] for _ in range(count)], load_balancer_ips=[""] * count,
                     source_ranges=[[] for _ in range(count)], external_local=[False] * count,
                     internal_local=[False] * count, affinity=[False] * count, node_ports=[])
    shapes = [shape for shape, _ in REALISTIC_SHAPES]
    shape_index = rng.choice(len(shapes), size=count, p=[weight for _, weight in REALISTIC_SHAPES])
    types = rng.choice(list(TYPE_WEIGHTS), size=count, p=list(TYPE_WEIGHTS.values())).tolist()
    with_external_ip = rng.random(count) < EXTERNAL_IP_SHARE
    external_ips = [[ip] for ip in _random_addresses(rng, EXTERNAL_IP_CIDR, int(with_external_ip.sum()))]
    is_load_balancer = np.array(types) == LOAD_BALANCER
    load_balancer_ips = _random_addresses(rng, LOAD_BALANCER_CIDR, int(is_load_balancer.sum()))
    with_source_ranges = is_load_balancer & (rng.random(count) < SOURCE_RANGES_SHARE)
    source_ranges = _pick_source_ranges(rng, int(with_source_ranges.sum()))
    low, high = NODE_PORT_RANGE
    return _Plan(
        shapes=[shapes[i] for i in shape_index.tolist()],
        types=types,
        cluster_ips=cluster_ips,
        external_ips=_spread(with_external_ip, external_ips, list),
        load_balancer_ips=_spread(is_load_balancer, load_balancer_ips, str),
        source_ranges=_spread(with_source_ranges, source_ranges, list),
        external_local=(rng.random(count) < EXTERNAL_LOCAL_SHARE).tolist(),
        internal_local=(rng.random(count) < INTERNAL_LOCAL_SHARE).tolist(),
        affinity=(rng.random(count) < AFFINITY_SHARE).tolist(),
        node_ports=(rng.permutation(high - low + 1) + low).tolist(),
    )


def _spread(chosen: np.ndarray, values: list, empty) -> list:
    """``values`` in order for the chosen services, a fresh ``empty()`` for the others."""
    remaining = iter(values)
    return [next(remaining) if pick else empty() for pick in chosen.tolist()]


def _pick_source_ranges(rng: np.random.Generator, count: int) -> list[list[str]]:
    sizes = rng.integers(1, 3, size=count)
    return [[SOURCE_RANGES[i] for i in rng.choice(len(SOURCE_RANGES), size=n, replace=False).tolist()]
            for n in sizes.tolist()]


def _build_services(plan: _Plan) -> list[Service]:
    free_node_ports = iter(plan.node_ports)
    left = len(plan.node_ports)
    services = []
    for i, shape in enumerate(plan.shapes):
        service = Service(f"ns-{i // SERVICES_PER_NAMESPACE}", f"svc-{i}", CLUSTER_IP, plan.cluster_ips[i],
                          list(shape.service_ports), external_ips=plan.external_ips[i],
                          internal_traffic_policy=POLICY_LOCAL if plan.internal_local[i] else POLICY_CLUSTER,
                          affinity_timeout=DEFAULT_AFFINITY_TIMEOUT if plan.affinity[i] else 0)
        wanted = plan.types[i]
        if wanted != CLUSTER_IP:
            health_check = wanted == LOAD_BALANCER and plan.external_local[i]
            needed = len(shape.ports) + health_check
            # Out of node ports: the apiserver would refuse the service, so it stays ClusterIP.
            if needed <= left:
                left -= needed
                _make_external(service, wanted, plan, i, free_node_ports)
        services.append(service)
    return services


def _make_external(service: Service, service_type: str, plan: _Plan, i: int, free_node_ports) -> None:
    service.type = service_type
    service.ports = [ServicePort(p.name, p.protocol, p.port, p.target_port, next(free_node_ports))
                     for p in service.ports]
    if plan.external_local[i]:
        service.external_traffic_policy = POLICY_LOCAL
    if service_type == LOAD_BALANCER:
        service.load_balancer_ips = [plan.load_balancer_ips[i]]
        service.load_balancer_source_ranges = plan.source_ranges[i]
        if plan.external_local[i]:
            service.health_check_node_port = next(free_node_ports)


def _build_slices(rng: np.random.Generator, services: list[Service], shapes: list[_Shape],
                  counts: np.ndarray, pods: _PodLayout, realistic: bool) -> list[EndpointSlice]:
    endpoints = _endpoints(rng, pods, realistic)
    slices = []
    start = 0
    for service, shape, count in zip(services, shapes, counts.tolist()):
        chunks = range(start, start + count, MAX_ENDPOINTS_PER_SLICE) if count else [start]
        for k, first in enumerate(chunks):
            last = min(first + MAX_ENDPOINTS_PER_SLICE, start + count)
            slices.append(EndpointSlice(service.namespace, f"{service.name}-{k}", service.name,
                                        list(shape.endpoint_ports), endpoints[first:last]))
        start += count
    return slices


def _endpoints(rng: np.random.Generator, pods: _PodLayout, realistic: bool) -> list[Endpoint]:
    node_of_pod, addresses = pods.place(rng)
    names = [_node_name(i) for i in range(pods.node_count)]
    ips = [int_to_ip(a) for a in addresses.tolist()]
    nodes = [names[i] for i in node_of_pod.tolist()]
    if not realistic:
        return [Endpoint(ip, node) for ip, node in zip(ips, nodes)]
    draw = rng.random(pods.pods)
    not_ready = draw < NOT_READY_SHARE
    terminating = (draw >= NOT_READY_SHARE) & (draw < NOT_READY_SHARE + TERMINATING_SHARE)
    ready = ~(not_ready | terminating)
    serving = ready | (terminating & (rng.random(pods.pods) < 0.5))
    return [Endpoint(*fields) for fields in zip(ips, nodes, ready.tolist(), serving.tolist(),
                                                terminating.tolist())]


def to_manifests(cluster: Cluster) -> list[dict]:
    """The cluster as v1 Service, discovery.k8s.io/v1 EndpointSlice and v1 Node objects."""
    return ([_service_manifest(s) for s in cluster.services]
            + [_slice_manifest(s) for s in cluster.slices]
            + [_node_manifest(n) for n in cluster.nodes])


def _service_manifest(service: Service) -> dict:
    spec = {"type": service.type, "clusterIP": service.cluster_ip, "clusterIPs": [service.cluster_ip],
            "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
            "ports": [_service_port_manifest(p) for p in service.ports],
            "sessionAffinity": "ClientIP" if service.affinity_timeout else "None",
            "internalTrafficPolicy": service.internal_traffic_policy}
    if service.affinity_timeout:
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": service.affinity_timeout}}
    if service.type != CLUSTER_IP:
        spec["externalTrafficPolicy"] = service.external_traffic_policy
    if service.health_check_node_port:
        spec["healthCheckNodePort"] = service.health_check_node_port
    if service.external_ips:
        spec["externalIPs"] = list(service.external_ips)
    if service.load_balancer_source_ranges:
        spec["loadBalancerSourceRanges"] = list(service.load_balancer_source_ranges)
    ingress = [{"ip": ip, "ipMode": "VIP"} for ip in service.load_balancer_ips]
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": service.name, "namespace": service.namespace},
            "spec": spec, "status": {"loadBalancer": {"ingress": ingress} if ingress else {}}}


def _service_port_manifest(port: ServicePort) -> dict:
    manifest = {"name": port.name} if port.name else {}
    manifest.update(protocol=port.protocol.upper(), port=port.port, targetPort=port.target_port)
    if port.node_port:
        manifest["nodePort"] = port.node_port
    return manifest


def _slice_manifest(eps: EndpointSlice) -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": eps.name, "namespace": eps.namespace,
                         "labels": {"kubernetes.io/service-name": eps.service_name,
                                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
            "endpoints": [_endpoint_manifest(e) for e in eps.endpoints],
            "ports": [{"name": p.name, "protocol": p.protocol.upper(), "port": p.port} for p in eps.ports]}


def _endpoint_manifest(endpoint: Endpoint) -> dict:
    manifest = {"addresses": [endpoint.ip],
                "conditions": {"ready": endpoint.ready, "serving": endpoint.serving,
                               "terminating": endpoint.terminating}}
    if endpoint.node_name:
        manifest["nodeName"] = endpoint.node_name
    return manifest


def _node_manifest(node: Node) -> dict:
    addresses = [{"type": "InternalIP", "address": ip} for ip in node.ips]
    spec = {"podCIDR": node.pod_cidr, "podCIDRs": [node.pod_cidr]} if node.pod_cidr else {}
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": node.name}, "spec": spec,
            "status": {"addresses": addresses + [{"type": "Hostname", "address": node.name}]}}
