"""Real clusters: Kubernetes manifests and a KubeProxyConfiguration, read into the model.

The input is what ``kubectl get svc,endpointslices,nodes -A -o yaml`` (or ``-o json``) prints:
multi-document YAML, a JSON object or array, a v1 ``List``, or a typed list such as the
API's ``ServiceList``. kpbench reads the fields kube-proxy reads and applies the same defaults
(the API server's defaults too, for hand-written files). Objects kube-proxy ignores are skipped
the same way: ExternalName and headless Services silently, EndpointSlices without a
``kubernetes.io/service-name`` label or of another address type with a warning, and any other
kind with a warning.

kpbench models IPv4. In a dual-stack cluster the IPv6 half is left out: an address that
contains ":" is taken to be IPv6 and skipped (the API server has already validated it); every
other address must be valid IPv4. A Service whose cluster IPs are all IPv6 is skipped with a
warning.

Every bad input raises one :class:`InputError` naming the file, the object (``Service ns/name``,
or ``document N`` before the name is known) and the field (``spec.ports[0].port``).
"""
from __future__ import annotations

import json
import re

import yaml

from bench.cluster.model import (CLUSTER_IP, DEFAULT_AFFINITY_TIMEOUT, POLICY_CLUSTER,
                                 POLICY_LOCAL, SERVICE_TYPES, Cluster, Endpoint, EndpointPort,
                                 EndpointSlice, Node, ProxyConfig, Service, ServicePort)
from bench.errors import InputError, read_input
from bench.netaddr import ip_to_int, parse_cidr, parse_port, parse_protocol

API_VERSIONS = {"Service": "v1", "EndpointSlice": "discovery.k8s.io/v1", "Node": "v1"}
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
CONFIG_API_VERSION = "kubeproxy.config.k8s.io/v1alpha1"
CONFIG_KIND = "KubeProxyConfiguration"
PROXY_MODES = ("iptables", "ipvs", "nftables", "userspace")
# The schedulers of Linux's IPVS (ip_vs_*.ko), which --ipvs-scheduler passes to the kernel.
IPVS_SCHEDULERS = ("rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "fo", "ovf", "mh", "twos")
PRIMARY_NODE_PORT_ADDRESSES = "primary"  # nodePortAddresses: the node's primary IPs (kube-proxy 1.29+)
MAX_AFFINITY_TIMEOUT = 86400  # v1 validation: 0 < timeoutSeconds <= one day
# IANA_SVC_NAME, what a named port must be: at most 15 of [a-z0-9-], a letter, no "--" or
# leading/trailing "-".
PORT_NAME = re.compile(r"(?=.{1,15}$)(?=.*[a-z])[a-z0-9]+(-[a-z0-9]+)*")

_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when PyYAML was built with it
_TYPE_NAMES = {str: "a string", bool: "true or false", int: "an integer", list: "a list", dict: "a mapping"}


def load_cluster(objects_path, config_path=None, node_ips=()) -> tuple[Cluster, list[str]]:
    """The cluster from manifests and an optional KubeProxyConfiguration; also the warnings.

    ``node_ips`` are kube-proxy's --node-ip flags. The node kube-proxy runs on is the one named
    by hostnameOverride, else the one with one of ``node_ips`` as InternalIP, else none ("").
    """
    services, slices, nodes, warnings = load_objects(objects_path)
    config = load_config(config_path) if config_path else ProxyConfig()
    config.node_ips = [_node_ip(ip) for ip in node_ips]
    node_name = config.hostname_override or _node_with_ip(nodes, config.node_ips)
    if not config.node_ips:
        config.node_ips = next((list(n.ips) for n in nodes if n.name == node_name), [])
    config.node_port_addresses = _resolve_primary(config, str(config_path))
    return Cluster(services, slices, nodes, config, node_name), warnings


def _node_ip(text) -> str:
    ip_to_int(text, "command line", "--node-ip")
    return str(text).strip()


def _node_with_ip(nodes: list[Node], ips: list[str]) -> str:
    return next((node.name for node in nodes if set(node.ips) & set(ips)), "")


def _resolve_primary(config: ProxyConfig, config_file: str) -> list[str]:
    """nodePortAddresses "primary" stands for this node's own IPs."""
    if PRIMARY_NODE_PORT_ADDRESSES not in config.node_port_addresses:
        return config.node_port_addresses
    if not config.node_ips:
        raise InputError('"primary" needs this node\'s IP: give --node-ip, or name a Node object '
                         "with hostnameOverride", config_file, "nodePortAddresses")
    others = [cidr for cidr in config.node_port_addresses if cidr != PRIMARY_NODE_PORT_ADDRESSES]
    return others + [f"{ip}/32" for ip in config.node_ips]


# ---- reading files ----------------------------------------------------------------------

def _read_documents(path) -> list:
    """The documents of a YAML or JSON file; a JSON file is one document."""
    text = read_input(path, "a manifests file")
    if text.lstrip()[:1] in ("{", "["):
        return [_parse_json(text, str(path))]
    return _parse_yaml(text, str(path))


def _parse_json(text: str, file: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"malformed JSON: {exc.msg} (column {exc.colno})", f"{file}:{exc.lineno}") from None


def _parse_yaml(text: str, file: str) -> list:
    try:
        return list(yaml.load_all(text, Loader=_YAML_LOADER))
    except yaml.MarkedYAMLError as exc:
        where = f"{file}:{exc.problem_mark.line + 1}" if exc.problem_mark else file
        raise InputError(f"malformed YAML: {exc.problem or exc.context}", where) from None
    except yaml.YAMLError as exc:
        raise InputError(f"malformed YAML: {exc}", file) from None


def _describe(value) -> str:
    text = repr(value)
    return text if len(text) <= 50 else text[:47] + "..."


def _is_ipv6(text: str) -> bool:
    # Only to leave out a dual-stack cluster's other family; the address is not parsed.
    return ":" in text


class _Fields:
    """One mapping of a manifest; its errors name the file, the object and the field's path."""

    def __init__(self, data: dict, where: str, path: str = ""):
        self.data, self.where, self.path = data, where, path

    def name_of(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, message: str) -> InputError:
        return InputError(message, self.where, self.name_of(key))

    def raw(self, key: str):
        return self.data.get(key)

    def typed(self, key: str, kind: type, default):
        value = self.data.get(key)
        if value is None:
            return default
        # bool is an int in Python, but true is not a number in a manifest.
        if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
            raise self.error(key, f"expected {_TYPE_NAMES[kind]}, got {_describe(value)}")
        return value

    def text(self, key: str, default: str = "") -> str:
        return self.typed(key, str, default)

    def flag(self, key: str, default: bool) -> bool:
        return self.typed(key, bool, default)

    def integer(self, key: str, default: int) -> int:
        return self.typed(key, int, default)

    def child(self, key: str) -> _Fields:
        return _Fields(self.typed(key, dict, {}), self.where, self.name_of(key))

    def children(self, key: str) -> list[_Fields]:
        children = []
        for i, item in enumerate(self.typed(key, list, [])):
            path = f"{self.name_of(key)}[{i}]"
            if not isinstance(item, dict):
                raise InputError(f"expected a mapping, got {_describe(item)}", self.where, path)
            children.append(_Fields(item, self.where, path))
        return children

    def texts(self, key: str) -> list[tuple[str, str]]:
        """(field path, stripped string) for each item of a list of strings."""
        items = []
        for i, item in enumerate(self.typed(key, list, [])):
            path = f"{self.name_of(key)}[{i}]"
            if not isinstance(item, str):
                raise InputError(f"expected a string, got {_describe(item)}", self.where, path)
            items.append((path, item.strip()))
        return items

    def port(self, key: str, allow_zero: bool = False) -> int:
        value = self.raw(key)
        if value is None:
            if allow_zero:
                return 0
            raise self.error(key, "missing")
        return parse_port(value, self.where, self.name_of(key), allow_zero)

    def protocol(self, key: str) -> str:
        return parse_protocol(self.raw(key) or "TCP", self.where, self.name_of(key))

    def ipv4_values(self, key: str, parse) -> list[str]:
        """The IPv4 items of a list of addresses or CIDRs, each checked with ``parse``."""
        values = []
        for path, text in self.texts(key):
            if not _is_ipv6(text):
                parse(text, self.where, path)
                values.append(text)
        return values

    def primary_ipv4(self, key: str, plural_key: str, parse) -> str:
        """``key``, or the first IPv4 item of ``plural_key`` when ``key`` is IPv6 (dual-stack,
        IPv6 first); "" when there is none."""
        value = self.text(key).strip()
        if value and not _is_ipv6(value):
            parse(value, self.where, self.name_of(key))
            return value
        values = self.ipv4_values(plural_key, parse)
        return values[0] if values else ""


# ---- Kubernetes objects -----------------------------------------------------------------

class _Skip(Exception):
    """An object kube-proxy would ignore; the reason becomes a warning."""


def load_objects(path) -> tuple[list[Service], list[EndpointSlice], list[Node], list[str]]:
    """The Services, EndpointSlices and Nodes of a manifest file, and warnings about the rest."""
    file = str(path)
    read = {"Service": [], "EndpointSlice": [], "Node": []}
    warnings = []
    for label, obj in _objects(_read_documents(path), file):
        try:
            model = _read_object(obj, file, label)
        except _Skip as skip:
            warnings.append(f"{file}: skipping {skip}")
            continue
        if model is not None:
            read[type(model).__name__].append(model)
    return read["Service"], read["EndpointSlice"], read["Node"], warnings


def _objects(documents: list, file: str):
    """(label, object) for every object, with Lists opened up; empty documents are dropped."""
    for n, document in enumerate(documents, 1):
        label = f"document {n}"
        if isinstance(document, list):
            yield from ((f"{label} [{i}]", item) for i, item in enumerate(document))
        elif isinstance(document, dict) and str(document.get("kind", "")).endswith("List"):
            yield from _list_items(_Fields(document, f"{file}: {label}"), label)
        elif document is not None:
            yield label, document


def _list_items(listing: _Fields, label: str):
    kind = listing.text("kind")
    # A typed list (ServiceList, as the API returns it) leaves kind and apiVersion out of its items.
    implied = {} if kind == "List" else {"kind": kind.removesuffix("List"), "apiVersion": listing.raw("apiVersion")}
    for item in listing.children("items"):
        yield f"{label} {item.path}", {**implied, **item.data}


def _read_object(obj, file: str, label: str):
    where = f"{file}: {label}"
    if not isinstance(obj, dict):
        raise InputError(f"expected a Kubernetes object (a mapping), got {_describe(obj)}", where)
    fields = _Fields(obj, where)
    kind = fields.text("kind")
    if not kind:
        raise fields.error("kind", "missing")
    if kind not in API_VERSIONS:
        raise _Skip(f"{kind} {_display_name(obj, label)} (kpbench reads Service, EndpointSlice, Node)")
    api_version = fields.text("apiVersion", API_VERSIONS[kind])
    if api_version != API_VERSIONS[kind]:
        raise _Skip(f"{api_version} {kind} {_display_name(obj, label)} (kpbench reads {API_VERSIONS[kind]})")
    namespace, name = _identify(fields, kind)
    subject = f"{kind} {namespace}/{name}" if namespace else f"{kind} {name}"
    try:
        return _READERS[kind](_Fields(obj, f"{file}: {subject}"), namespace, name)
    except _Skip as skip:
        raise _Skip(f"{subject} ({skip})") from None


def _display_name(obj: dict, label: str) -> str:
    """ns/name of an object being skipped, without judging its metadata."""
    metadata = obj.get("metadata")
    if not isinstance(metadata, dict) or not metadata.get("name"):
        return f"({label})"
    namespace = metadata.get("namespace")
    return f"{namespace}/{metadata['name']}" if namespace else str(metadata["name"])


def _identify(fields: _Fields, kind: str) -> tuple[str, str]:
    """(namespace, name); the namespace is "" for a Node, "default" when a namespaced object omits it."""
    metadata = fields.child("metadata")
    name = metadata.text("name")
    if not name:
        raise metadata.error("name", f"missing: a {kind} needs a name")
    if kind == "Node":
        return "", name
    return metadata.text("namespace") or "default", name


def _read_service(obj: _Fields, namespace: str, name: str) -> Service | None:
    spec = obj.child("spec")
    service_type = spec.text("type", CLUSTER_IP)
    if service_type == "ExternalName":
        return None
    if service_type not in SERVICE_TYPES:
        raise spec.error("type", f"unknown type {service_type!r} "
                                 "(expected ClusterIP, NodePort, LoadBalancer or ExternalName)")
    cluster_ip = _cluster_ip(spec, service_type)
    if cluster_ip == "None":
        return None
    return Service(
        namespace, name, service_type, cluster_ip,
        ports=[_service_port(port) for port in spec.children("ports")],
        external_ips=spec.ipv4_values("externalIPs", ip_to_int),
        load_balancer_ips=_ingress_ips(obj.child("status").child("loadBalancer")),
        load_balancer_source_ranges=spec.ipv4_values("loadBalancerSourceRanges", parse_cidr),
        external_traffic_policy=_traffic_policy(spec, "externalTrafficPolicy"),
        internal_traffic_policy=_traffic_policy(spec, "internalTrafficPolicy"),
        affinity_timeout=_affinity_timeout(spec),
        health_check_node_port=spec.port("healthCheckNodePort", allow_zero=True),
    )


def _cluster_ip(spec: _Fields, service_type: str) -> str:
    """The IPv4 cluster IP, or "None" for a headless service."""
    cluster_ip = spec.text("clusterIP").strip()
    if cluster_ip == "None":
        return cluster_ip
    if not cluster_ip:
        raise spec.error("clusterIP", f"missing: a {service_type} service needs a cluster IP")
    cluster_ip = spec.primary_ipv4("clusterIP", "clusterIPs", ip_to_int)
    if not cluster_ip:
        raise _Skip("IPv6 only; kpbench models IPv4")
    return cluster_ip


def _service_port(port: _Fields) -> ServicePort:
    number = port.port("port")
    name = port.text("name")
    return ServicePort(name, port.protocol("protocol"), number, _target_port(port, number),
                       port.port("nodePort", allow_zero=True))


def _target_port(port: _Fields, default: int) -> int | str:
    """A container port number, or a container port name; the service port when absent."""
    value = port.raw("targetPort")
    if value is None or value == "":
        return default
    if isinstance(value, str) and not value.strip().isdigit():
        if not PORT_NAME.fullmatch(value):
            raise port.error("targetPort", f"neither a port number nor a port name: {value!r}")
        return value
    return port.port("targetPort")


def _ingress_ips(load_balancer: _Fields) -> list[str]:
    """status.loadBalancer.ingress[].ip, without hostnames and ipMode Proxy (kube-proxy skips those)."""
    ips = []
    for ingress in load_balancer.children("ingress"):
        ip = ingress.text("ip").strip()
        if not ip or _is_ipv6(ip) or ingress.text("ipMode") == "Proxy":
            continue
        ip_to_int(ip, ingress.where, ingress.name_of("ip"))
        ips.append(ip)
    return ips


def _traffic_policy(spec: _Fields, key: str) -> str:
    policy = spec.text(key, POLICY_CLUSTER)
    if policy not in (POLICY_CLUSTER, POLICY_LOCAL):
        raise spec.error(key, f"expected Cluster or Local, got {policy!r}")
    return policy


def _affinity_timeout(spec: _Fields) -> int:
    affinity = spec.text("sessionAffinity", "None")
    if affinity == "None":
        return 0
    if affinity != "ClientIP":
        raise spec.error("sessionAffinity", f"expected None or ClientIP, got {affinity!r}")
    client_ip = spec.child("sessionAffinityConfig").child("clientIP")
    timeout = client_ip.integer("timeoutSeconds", DEFAULT_AFFINITY_TIMEOUT)
    if not 0 < timeout <= MAX_AFFINITY_TIMEOUT:
        raise client_ip.error("timeoutSeconds", f"must be 1..{MAX_AFFINITY_TIMEOUT}, got {timeout}")
    return timeout


def _read_slice(obj: _Fields, namespace: str, name: str) -> EndpointSlice:
    address_type = obj.text("addressType")
    if not address_type:
        raise obj.error("addressType", "missing (IPv4, IPv6 or FQDN)")
    if address_type != "IPv4":
        raise _Skip(f"addressType {address_type}; kpbench models IPv4")
    service_name = obj.child("metadata").child("labels").text(SERVICE_NAME_LABEL)
    if not service_name:
        raise _Skip(f"no {SERVICE_NAME_LABEL} label: kube-proxy ignores it")
    ports = [_endpoint_port(port) for port in obj.children("ports") if port.raw("port") is not None]
    endpoints = [_endpoint(endpoint) for endpoint in obj.children("endpoints")]
    return EndpointSlice(namespace, name, service_name, ports, endpoints)


def _endpoint_port(port: _Fields) -> EndpointPort:
    return EndpointPort(port.text("name"), port.protocol("protocol"), port.port("port"))


def _endpoint(endpoint: _Fields) -> Endpoint:
    addresses = endpoint.texts("addresses")
    if not addresses:
        raise endpoint.error("addresses", "an endpoint needs an address")
    # Consumers use the first address only, as the EndpointSlice API tells them to.
    path, ip = addresses[0]
    ip_to_int(ip, endpoint.where, path)
    conditions = endpoint.child("conditions")
    ready = conditions.flag("ready", True)
    return Endpoint(ip, endpoint.text("nodeName"), ready, conditions.flag("serving", ready),
                    conditions.flag("terminating", False))


def _read_node(obj: _Fields, namespace: str, name: str) -> Node:
    ips = []
    for address in obj.child("status").children("addresses"):
        ip = address.text("address").strip()
        if address.text("type") == "InternalIP" and not _is_ipv6(ip):
            ip_to_int(ip, address.where, address.name_of("address"))
            ips.append(ip)
    return Node(name, ips, obj.child("spec").primary_ipv4("podCIDR", "podCIDRs", parse_cidr))


_READERS = {"Service": _read_service, "EndpointSlice": _read_slice, "Node": _read_node}


# ---- KubeProxyConfiguration -------------------------------------------------------------

def load_config(path) -> ProxyConfig:
    """kube-proxy's configuration file (kubeproxy.config.k8s.io/v1alpha1), with its defaults."""
    file = str(path)
    documents = [d for d in _read_documents(path) if d is not None]
    if len(documents) != 1:
        raise InputError(f"expected one {CONFIG_KIND} document, found {len(documents)}", file)
    if not isinstance(documents[0], dict):
        raise InputError(f"expected a {CONFIG_KIND} (a mapping), got {_describe(documents[0])}", file)
    config = _Fields(documents[0], file)
    _expect(config, "kind", CONFIG_KIND)
    _expect(config, "apiVersion", CONFIG_API_VERSION)
    iptables = config.child("iptables")
    return ProxyConfig(
        mode=_choice(config, "mode", PROXY_MODES, default="iptables"),
        cluster_cidr=_cluster_cidr(config),
        masquerade_bit=_masquerade_bit(iptables),
        masquerade_all=iptables.flag("masqueradeAll", False),
        node_port_addresses=_node_port_addresses(config),
        # kube-proxy trims and lower-cases the override, as node names are.
        hostname_override=config.text("hostnameOverride").strip().lower(),
        ipvs_scheduler=_choice(config.child("ipvs"), "scheduler", IPVS_SCHEDULERS, default="rr"),
    )


def _expect(config: _Fields, key: str, expected: str) -> None:
    value = config.text(key)
    if value != expected:
        raise config.error(key, f"expected {expected}, got {value!r}" if value else f"missing, expected {expected}")


def _choice(fields: _Fields, key: str, allowed: tuple[str, ...], default: str) -> str:
    value = fields.text(key) or default  # "" selects the default, as in kube-proxy
    if value not in allowed:
        raise fields.error(key, f"expected one of {', '.join(allowed)}, got {value!r}")
    return value


def _cluster_cidr(config: _Fields) -> str:
    """The IPv4 range of a comma-separated (dual-stack) clusterCIDR, or ""."""
    ranges = [text.strip() for text in config.text("clusterCIDR").split(",") if text.strip()]
    ipv4 = [text for text in ranges if not _is_ipv6(text)]
    for text in ipv4:
        parse_cidr(text, config.where, config.name_of("clusterCIDR"))
    return ipv4[0] if ipv4 else ""


def _masquerade_bit(iptables: _Fields) -> int:
    bit = iptables.integer("masqueradeBit", ProxyConfig.masquerade_bit)
    if not 0 <= bit <= 31:
        raise iptables.error("masqueradeBit", f"must be 0..31, got {bit}")
    return bit


def _node_port_addresses(config: _Fields) -> list[str]:
    addresses = []
    for path, text in config.texts("nodePortAddresses"):
        if text == PRIMARY_NODE_PORT_ADDRESSES:
            addresses.append(text)
        elif not _is_ipv6(text):
            parse_cidr(text, config.where, path)
            addresses.append(text)
    return addresses
