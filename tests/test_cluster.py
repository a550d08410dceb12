"""The synthetic generator, the manifest and KubeProxyConfiguration readers, and their errors."""
from __future__ import annotations

import copy
import ipaddress
import json
import math
import re
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.cluster.generate import generate, to_manifests
from bench.cluster.manifests import load_cluster, load_config, load_objects
from bench.cluster.model import (CLUSTER_IP, LOAD_BALANCER, NODE_PORT, Endpoint, EndpointPort,
                                 ServicePort, service_ports)
from bench.errors import InputError

DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def network(cidr: str) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(cidr)


def endpoints_per_service(cluster) -> Counter:
    counts = Counter({svc.key: 0 for svc in cluster.services})
    for eps in cluster.slices:
        counts[f"{eps.namespace}/{eps.service_name}"] += len(eps.endpoints)
    return counts


def all_endpoints(cluster) -> list[Endpoint]:
    return [ep for eps in cluster.slices for ep in eps.endpoints]


def node_ports(cluster) -> list[int]:
    """Every allocated node port, health-check node ports included."""
    ports = [p.node_port for svc in cluster.services for p in svc.ports if p.node_port]
    return ports + [svc.health_check_node_port for svc in cluster.services if svc.health_check_node_port]


# ---- the generator ----------------------------------------------------------------------

@pytest.mark.parametrize("distribution, mix", [("fixed", "realistic"), ("heavy-tailed", "realistic"),
                                               ("fixed", "clusterip"), ("heavy-tailed", "clusterip")])
def test_same_seed_gives_an_equal_cluster_and_another_seed_a_different_one(distribution, mix):
    def make(seed):
        return generate(300, 4, 7, seed=seed, distribution=distribution, mix=mix)

    first = make(5)
    assert make(5) == first
    other = make(6)
    assert [s.cluster_ip for s in other.services] != [s.cluster_ip for s in first.services]
    assert [e.node_name for e in all_endpoints(other)] != [e.node_name for e in all_endpoints(first)]


def test_fixed_distribution_gives_every_service_port_exactly_e_endpoints():
    cluster = generate(120, 7, 5, seed=1)
    assert len(cluster.services) == 120
    infos = service_ports(cluster)
    assert len(infos) == sum(len(s.ports) for s in cluster.services)
    assert all(len(info.endpoints) == 7 for info in infos)
    assert set(endpoints_per_service(cluster).values()) == {7}


def test_large_services_are_split_into_slices_of_at_most_100_endpoints():
    cluster = generate(3, 250, 4, seed=2, mix="clusterip")
    slices_per_service = Counter(eps.service_name for eps in cluster.slices)
    assert set(slices_per_service.values()) == {3}
    assert sorted(len(eps.endpoints) for eps in cluster.slices) == [50] * 3 + [100] * 6
    assert all(len(info.endpoints) == 250 for info in service_ports(cluster))


def test_services_without_endpoints_get_one_empty_slice():
    cluster = generate(4, 0, 2, mix="clusterip")
    assert [len(eps.endpoints) for eps in cluster.slices] == [0, 0, 0, 0]
    assert not any(info.has_endpoints for info in service_ports(cluster))


@pytest.mark.parametrize("mean", [1, 3, 10, 60])
def test_heavy_tailed_counts_have_mean_e_and_stay_within_1_and_250(mean):
    cluster = generate(4000, mean, 10, seed=3, distribution="heavy-tailed", mix="clusterip")
    counts = np.array(list(endpoints_per_service(cluster).values()))
    assert counts.min() >= 1 and counts.max() <= 250
    assert counts.mean() == pytest.approx(mean, rel=0.02)
    if mean >= 10:  # a heavy tail: the median sits well below the mean, the largest far above
        assert np.median(counts) < 0.8 * mean
        assert counts.max() >= min(5 * mean, 250)


def test_heavy_tailed_reaches_the_250_cap():
    cluster = generate(2000, 60, 10, seed=4, distribution="heavy-tailed", mix="clusterip")
    assert max(endpoints_per_service(cluster).values()) == 250


@pytest.mark.parametrize("kwargs, field", [
    (dict(services=-1, endpoints=1, nodes=1), "services"),
    (dict(services=1, endpoints=-1, nodes=1), "endpoints"),
    (dict(services=1, endpoints=1, nodes=0), "nodes"),
    (dict(services=1, endpoints=1, nodes=1, seed=-1), "seed"),
    (dict(services=1.5, endpoints=1, nodes=1), "services"),
    (dict(services=True, endpoints=1, nodes=1), "services"),
    (dict(services=1, endpoints=251, nodes=1, distribution="heavy-tailed"), "endpoints"),
    (dict(services=1, endpoints=0, nodes=1, distribution="heavy-tailed"), "endpoints"),
    (dict(services=1, endpoints=1, nodes=1, distribution="zipf"), "distribution"),
    (dict(services=1, endpoints=1, nodes=1, mix="nodeport"), "mix"),
    (dict(services=2 ** 20, endpoints=1, nodes=1), "services"),
])
def test_impossible_generator_arguments_raise_input_error(kwargs, field):
    with pytest.raises(InputError) as raised:
        generate(**kwargs)
    assert raised.value.field == field


def test_endpoints_that_do_not_fit_in_the_cluster_cidr_are_refused():
    with pytest.raises(InputError, match=r"9,000,000 endpoints on 1 node do not fit in 10\.128\.0\.0/9"):
        generate(1, 9_000_000, 1)
    with pytest.raises(InputError, match=r"1 endpoint on 5,000,000 nodes do not fit") as raised:
        generate(1, 1, 5_000_000)
    assert raised.value.field == "nodes"


@pytest.mark.parametrize("services, endpoints, nodes, prefix", [
    (10, 1, 3, 24),  # kube-controller-manager's default
    (2, 500, 2, 23),  # 500 pods a node need a /23
    (0, 0, 40_000, 25),  # 40,000 /24s would not fit in the /9
])
def test_pod_cidrs_are_sized_for_the_pods_and_the_nodes(services, endpoints, nodes, prefix):
    cluster = generate(services, endpoints, nodes, mix="clusterip")
    assert {network(n.pod_cidr).prefixlen for n in cluster.nodes} == {prefix}


def test_addresses_are_unique_and_in_their_ranges():
    cluster = generate(2000, 5, 20, seed=7)
    by_node = {n.name: network(n.pod_cidr) for n in cluster.nodes}
    checks = {
        "10.96.0.0/12": [s.cluster_ip for s in cluster.services],
        "172.16.0.0/12": [ip for s in cluster.services for ip in s.load_balancer_ips],
        "198.18.0.0/15": [ip for s in cluster.services for ip in s.external_ips],
        "100.64.0.0/10": [ip for n in cluster.nodes for ip in n.ips],
        "10.128.0.0/9": [e.ip for e in all_endpoints(cluster)],
    }
    for cidr, ips in checks.items():
        assert ips and len(set(ips)) == len(ips), cidr
        assert all(ipaddress.IPv4Address(ip) in network(cidr) for ip in ips), cidr
    assert "10.96.0.1" not in checks["10.96.0.0/12"]  # the kubernetes API service's
    pod_cidrs = sorted(by_node.values())
    assert all(a.broadcast_address < b.network_address for a, b in zip(pod_cidrs, pod_cidrs[1:]))
    assert all(n.subnet_of(network("10.128.0.0/9")) for n in pod_cidrs)
    for ep in all_endpoints(cluster):
        pod_cidr = by_node[ep.node_name]
        assert pod_cidr.network_address + 2 <= ipaddress.IPv4Address(ep.ip) < pod_cidr.broadcast_address


def test_pods_are_spread_evenly_over_the_nodes():
    cluster = generate(101, 3, 10, seed=8, mix="clusterip")
    per_node = Counter(e.node_name for e in all_endpoints(cluster))
    assert set(per_node) == {n.name for n in cluster.nodes}
    assert max(per_node.values()) == math.ceil(303 / 10) and min(per_node.values()) == 303 // 10


def test_the_kube_proxy_node_is_the_first_node():
    cluster = generate(10, 2, 3, seed=9)
    first = cluster.nodes[0]
    assert cluster.node_name == first.name
    assert cluster.config.node_ips == first.ips
    assert cluster.config.cluster_cidr == "10.128.0.0/9"


def test_clusterip_mix_is_the_shape_of_the_rule_count_formula():
    cluster = generate(200, 3, 4, seed=10, mix="clusterip")
    for svc in cluster.services:
        assert svc.type == CLUSTER_IP
        assert svc.ports == [ServicePort("", "tcp", 80, 8080)]
        assert not (svc.external_ips or svc.load_balancer_ips or svc.affinity_timeout)
        assert not (svc.external_policy_local or svc.internal_policy_local)
    assert all(e.ready and e.serving and not e.terminating for e in all_endpoints(cluster))
    assert {tuple(eps.ports) for eps in cluster.slices} == {(EndpointPort("", "tcp", 8080),)}
    # Every endpoint reaches a KUBE-SEP chain: nat = 5 + S·(2 + 3E).
    assert sum(len(i.cluster_policy_endpoints) for i in service_ports(cluster)) == 200 * 3


@pytest.mark.parametrize("services, endpoints", [(10, 1), (60, 4), (25, 0)])
def test_clusterip_mix_gives_the_published_iptables_rule_count(services, endpoints):
    from bench.proxies.iptables import WriterOptions, rule_counts, write_full

    cluster = generate(services, endpoints, 3, seed=16, mix="clusterip")
    counts = rule_counts(write_full(cluster, WriterOptions()))
    if endpoints:
        assert counts["nat"] == 5 + services * (2 + 3 * endpoints)
    else:  # a service without endpoints gets one filter REJECT rule and no nat rules
        assert (counts["nat"], counts["filter"]) == (5, 4 + services)


def test_realistic_mix_has_every_type_and_feature():
    cluster = generate(2000, 5, 20, seed=11)
    services = cluster.services
    types = Counter(s.type for s in services)
    assert 0.70 < types[CLUSTER_IP] / 2000 < 0.80
    assert types[NODE_PORT] > 200 and types[LOAD_BALANCER] > 130
    assert 0.08 < sum(len(s.ports) > 1 for s in services) / 2000 < 0.16
    protocols = Counter(p.protocol for s in services for p in s.ports)
    assert protocols["tcp"] > protocols["udp"] > protocols["sctp"] > 0
    assert any(p.port == 53 and p.protocol == "udp" for s in services for p in s.ports)
    assert any(isinstance(p.target_port, str) for s in services for p in s.ports)
    assert any(s.external_ips for s in services)
    load_balancers = [s for s in services if s.type == LOAD_BALANCER]
    assert all(len(s.load_balancer_ips) == 1 for s in load_balancers)
    assert any(s.load_balancer_source_ranges for s in load_balancers)
    assert not any(s.load_balancer_ips or s.load_balancer_source_ranges for s in services if s.type != LOAD_BALANCER)
    assert any(s.external_policy_local for s in services if s.type == NODE_PORT)
    local_lbs = [s for s in load_balancers if s.external_policy_local]
    assert local_lbs and all(s.health_check_node_port for s in local_lbs)
    assert not any(s.health_check_node_port for s in services if s not in local_lbs)
    assert any(s.internal_policy_local for s in services)
    assert {s.affinity_timeout for s in services} == {0, 10800}
    endpoints = all_endpoints(cluster)
    assert any(not e.ready and not e.serving and not e.terminating for e in endpoints)
    assert any(e.terminating and e.serving for e in endpoints)
    assert any(e.terminating and not e.serving for e in endpoints)
    assert not any(e.ready and e.terminating for e in endpoints)


def test_node_ports_are_unique_and_services_become_clusterip_when_they_run_out():
    cluster = generate(12000, 1, 3, seed=12)
    numbers = node_ports(cluster)
    assert len(set(numbers)) == len(numbers)  # unique across protocols, so per protocol too
    assert all(30000 <= port <= 32767 for port in numbers)
    assert len(numbers) > 2700  # nearly all of the 2768 are used ...
    external = [s for s in cluster.services if s.type != CLUSTER_IP]
    assert len(external) < 0.2 * 12000  # ... and the rest of the 25 % stayed ClusterIP
    for svc in cluster.services:
        has_node_ports = [bool(p.node_port) for p in svc.ports]
        assert has_node_ports == [svc.type != CLUSTER_IP] * len(svc.ports)
        if svc.type == CLUSTER_IP:
            assert not svc.external_policy_local and not svc.load_balancer_ips


def test_manifests_are_what_kubectl_prints():
    cluster = generate(400, 2, 3, seed=13)
    manifests = to_manifests(cluster)
    kinds = Counter((m["apiVersion"], m["kind"]) for m in manifests)
    assert kinds == {("v1", "Service"): 400, ("discovery.k8s.io/v1", "EndpointSlice"): len(cluster.slices),
                     ("v1", "Node"): 3}
    load_balancer = next(m for m in manifests if m["kind"] == "Service" and m["spec"]["type"] == "LoadBalancer")
    assert load_balancer["status"]["loadBalancer"]["ingress"][0]["ip"]
    assert {p["protocol"] for m in manifests if m["kind"] == "Service" for p in m["spec"]["ports"]} == \
        {"TCP", "UDP", "SCTP"}
    eps = next(m for m in manifests if m["kind"] == "EndpointSlice")
    assert eps["addressType"] == "IPv4" and eps["metadata"]["labels"]["kubernetes.io/service-name"]
    yaml.safe_dump_all(manifests)  # plain types only


# ---- round trips --------------------------------------------------------------------------

def test_generate_to_yaml_and_back_gives_the_same_cluster(tmp_path):
    cluster = generate(400, 3, 5, seed=14, distribution="heavy-tailed")
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.dump_all(to_manifests(cluster), Dumper=DUMPER, sort_keys=False))
    loaded, warnings = load_cluster(path, node_ips=cluster.config.node_ips)
    assert warnings == []
    assert loaded.services == cluster.services
    assert loaded.slices == cluster.slices
    assert loaded.nodes == cluster.nodes
    assert loaded.node_name == cluster.node_name
    assert service_ports(loaded) == service_ports(cluster)


def test_generate_to_a_json_list_and_back_gives_the_same_cluster(tmp_path):
    cluster = generate(100, 2, 3, seed=15)
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": to_manifests(cluster),
                                "metadata": {"resourceVersion": ""}}, indent=2))
    services, slices, nodes, warnings = load_objects(path)
    assert (services, slices, nodes, warnings) == (cluster.services, cluster.slices, cluster.nodes, [])


# ---- reading manifests -------------------------------------------------------------------

def web_service() -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                     "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080,
                                "nodePort": 30080}],
                     "externalIPs": ["198.18.0.1"], "loadBalancerSourceRanges": ["203.0.113.0/24"],
                     "externalTrafficPolicy": "Local", "healthCheckNodePort": 31000,
                     "sessionAffinity": "ClientIP",
                     "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}}},
            "status": {"loadBalancer": {"ingress": [{"ip": "172.16.0.1", "ipMode": "VIP"}]}}}


def web_slice() -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": "web-abc12", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "endpoints": [{"addresses": ["10.128.0.2"], "nodeName": "node-a",
                           "conditions": {"ready": True, "serving": True, "terminating": False}}],
            "ports": [{"name": "http", "protocol": "TCP", "port": 8080}]}


def node_a() -> dict:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"},
            "spec": {"podCIDR": "10.128.0.0/24", "podCIDRs": ["10.128.0.0/24"]},
            "status": {"addresses": [{"type": "InternalIP", "address": "100.64.0.1"},
                                     {"type": "Hostname", "address": "node-a"}]}}


def write_yaml(tmp_path, *documents, name="cluster.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    return path


def check_web(services, slices, nodes):
    (web,) = services
    assert web.key == "shop/web" and web.type == LOAD_BALANCER and web.cluster_ip == "10.96.0.10"
    assert web.ports == [ServicePort("http", "tcp", 80, 8080, 30080)]
    assert web.external_ips == ["198.18.0.1"] and web.load_balancer_ips == ["172.16.0.1"]
    assert web.load_balancer_source_ranges == ["203.0.113.0/24"]
    assert web.external_policy_local and web.health_check_node_port == 31000
    assert web.affinity_timeout == 600
    (eps,) = slices
    assert (eps.namespace, eps.name, eps.service_name) == ("shop", "web-abc12", "web")
    assert eps.ports == [EndpointPort("http", "tcp", 8080)]
    assert eps.endpoints == [Endpoint("10.128.0.2", "node-a")]
    (node,) = nodes
    assert (node.name, node.ips, node.pod_cidr) == ("node-a", ["100.64.0.1"], "10.128.0.0/24")


def test_reads_multi_document_yaml(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text("---\n" + yaml.safe_dump_all([web_service(), web_slice(), node_a()]) + "---\n")
    *objects, warnings = load_objects(path)
    check_web(*objects)
    assert warnings == []


def test_reads_a_json_object_and_a_json_array(tmp_path):
    single = tmp_path / "svc.json"
    single.write_text(json.dumps(web_service()))
    services, slices, nodes, _ = load_objects(single)
    assert [s.key for s in services] == ["shop/web"] and not slices and not nodes
    array = tmp_path / "all.json"
    array.write_text(json.dumps([web_service(), web_slice(), node_a()], indent=1))
    check_web(*load_objects(array)[:3])


def test_reads_a_v1_list_and_typed_lists(tmp_path):
    listing = {"apiVersion": "v1", "kind": "List", "items": [web_service(), web_slice()]}
    bare_node = {k: v for k, v in node_a().items() if k not in ("apiVersion", "kind")}
    node_list = {"apiVersion": "v1", "kind": "NodeList", "items": [bare_node]}
    check_web(*load_objects(write_yaml(tmp_path, listing, node_list))[:3])


def test_skips_what_kube_proxy_skips(tmp_path):
    external_name = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "ext"},
                     "spec": {"type": "ExternalName", "externalName": "example.com"}}
    headless = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "db"},
                "spec": {"clusterIP": "None", "ports": [{"port": 5432}]}}
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "foo", "namespace": "kube-system"}}
    ipv6_slice = dict(web_slice(), addressType="IPv6", metadata={"name": "web-v6", "namespace": "shop",
                                                                  "labels": {"kubernetes.io/service-name": "web"}})
    unlabelled = dict(web_slice(), metadata={"name": "manual", "namespace": "shop"})
    old_slice = dict(web_slice(), apiVersion="discovery.k8s.io/v1beta1")
    path = write_yaml(tmp_path, external_name, headless, config_map, ipv6_slice, unlabelled, old_slice,
                      web_service())
    services, slices, _, warnings = load_objects(path)
    assert [s.key for s in services] == ["shop/web"] and slices == []
    assert warnings == [
        f"{path}: skipping ConfigMap kube-system/foo (kpbench reads Service, EndpointSlice, Node)",
        f"{path}: skipping EndpointSlice shop/web-v6 (addressType IPv6; kpbench models IPv4)",
        f"{path}: skipping EndpointSlice shop/manual (no kubernetes.io/service-name label: kube-proxy ignores it)",
        f"{path}: skipping discovery.k8s.io/v1beta1 EndpointSlice shop/web-abc12 (kpbench reads discovery.k8s.io/v1)",
    ]


def test_applies_kubernetes_defaults(tmp_path):
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "plain"},
               "spec": {"clusterIP": "10.96.0.20", "ports": [{"port": 53, "protocol": "UDP"}, {"port": 80}],
                        "sessionAffinity": "ClientIP"}}
    eps = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
           "metadata": {"name": "plain-1", "labels": {"kubernetes.io/service-name": "plain"}},
           "endpoints": [{"addresses": ["10.128.0.2"]},
                         {"addresses": ["10.128.0.3"], "conditions": {"ready": False}},
                         {"addresses": ["10.128.0.4"], "conditions": {"ready": False, "serving": True,
                                                                      "terminating": True}}],
           "ports": [{"port": 80}, {"name": "unrestricted"}]}
    (svc,), (eps_read,), _, _ = load_objects(write_yaml(tmp_path, service, eps))
    assert svc.namespace == "default" and svc.type == CLUSTER_IP
    assert svc.ports == [ServicePort("", "udp", 53, 53), ServicePort("", "tcp", 80, 80)]
    assert svc.external_traffic_policy == svc.internal_traffic_policy == "Cluster"
    assert svc.affinity_timeout == 10800
    assert eps_read.ports == [EndpointPort("", "tcp", 80)]  # a port without a number is skipped
    assert eps_read.endpoints == [Endpoint("10.128.0.2", "", True, True, False),
                                  Endpoint("10.128.0.3", "", False, False, False),
                                  Endpoint("10.128.0.4", "", False, True, True)]


def test_named_target_ports_and_skipped_ingress_entries(tmp_path):
    service = web_service()
    service["spec"]["ports"][0]["targetPort"] = "http-alt"
    service["status"]["loadBalancer"]["ingress"] = [{"hostname": "lb.example.com"},
                                                    {"ip": "172.16.0.2", "ipMode": "Proxy"},
                                                    {"ip": "172.16.0.3"}]
    (svc,), *_ = load_objects(write_yaml(tmp_path, service))
    assert svc.ports[0].target_port == "http-alt"
    assert svc.load_balancer_ips == ["172.16.0.3"]


def test_dual_stack_objects_keep_their_ipv4_half(tmp_path):
    dual = web_service()
    dual["spec"].update(clusterIP="fd00::10", clusterIPs=["fd00::10", "10.96.0.10"],
                        ipFamilies=["IPv6", "IPv4"], externalIPs=["2001:db8::1", "198.18.0.1"])
    dual["status"]["loadBalancer"]["ingress"].append({"ip": "2001:db8::2"})
    ipv6_only = dict(copy.deepcopy(dual), metadata={"name": "v6", "namespace": "shop"})
    ipv6_only["spec"].update(clusterIPs=["fd00::11"], ipFamilies=["IPv6"])
    node = node_a()
    node["spec"] = {"podCIDR": "fd00:10::/64", "podCIDRs": ["fd00:10::/64", "10.128.0.0/24"]}
    node["status"]["addresses"].insert(0, {"type": "InternalIP", "address": "2001:db8::a"})
    path = write_yaml(tmp_path, dual, ipv6_only, node)
    services, _, nodes, warnings = load_objects(path)
    (svc,) = services
    assert svc.cluster_ip == "10.96.0.10" and svc.external_ips == ["198.18.0.1"]
    assert svc.load_balancer_ips == ["172.16.0.1"]
    assert (nodes[0].ips, nodes[0].pod_cidr) == (["100.64.0.1"], "10.128.0.0/24")
    assert warnings == [f"{path}: skipping Service shop/v6 (IPv6 only; kpbench models IPv4)"]


DELETE = object()


def set_field(obj: dict, path: str, value) -> dict:
    """A copy of ``obj`` with the field at ``path`` (like spec.ports[0].port) set or deleted."""
    obj = copy.deepcopy(obj)
    *parents, last = re.findall(r"[^.\[\]]+", path)
    target = obj
    for key in parents:
        target = target[int(key)] if key.isdigit() else target[key]
    key = int(last) if last.isdigit() else last
    if value is DELETE:
        del target[key]
    else:
        target[key] = value
    return obj


BAD_FIELDS = [
    (web_service, "spec.clusterIP", "10.96.0.300"),
    (web_service, "spec.clusterIP", DELETE),
    (web_service, "spec.type", "Balanced"),
    (web_service, "spec.ports", "80"),
    (web_service, "spec.ports[0].port", 70000),
    (web_service, "spec.ports[0].port", DELETE),
    (web_service, "spec.ports[0].protocol", "ICMP"),
    (web_service, "spec.ports[0].nodePort", "thirty"),
    (web_service, "spec.ports[0].targetPort", "Not_A_Name"),
    (web_service, "spec.ports[0].targetPort", 0),
    (web_service, "spec.externalIPs[0]", "198.18.0"),
    (web_service, "spec.loadBalancerSourceRanges[0]", "203.0.113.0/33"),
    (web_service, "spec.externalTrafficPolicy", "Global"),
    (web_service, "spec.healthCheckNodePort", -1),
    (web_service, "spec.sessionAffinity", "Cookie"),
    (web_service, "spec.sessionAffinityConfig.clientIP.timeoutSeconds", 0),
    (web_service, "status.loadBalancer.ingress[0].ip", "lb"),
    (web_slice, "addressType", DELETE),
    (web_slice, "endpoints[0].addresses", []),
    (web_slice, "endpoints[0].addresses[0]", "10.128.0.256"),
    (web_slice, "endpoints[0].conditions.ready", "maybe"),
    (web_slice, "endpoints[0].nodeName", 7),
    (web_slice, "ports[0].port", 0),
    (web_slice, "ports[0].protocol", "GRE"),
    (node_a, "status.addresses[0].address", "100.64.0.1.1"),
    (node_a, "spec.podCIDR", "10.128.0.0/99"),
]


@pytest.mark.parametrize("make, field, value", BAD_FIELDS, ids=[f"{m.__name__}-{f}" for m, f, _ in BAD_FIELDS])
def test_a_bad_field_names_the_file_the_object_and_the_field(tmp_path, make, field, value):
    obj = set_field(make(), field, value)
    path = write_yaml(tmp_path, node_a() if make is not node_a else web_service(), obj)
    with pytest.raises(InputError) as raised:
        load_objects(path)
    meta = obj["metadata"]
    subject = f"{obj['kind']} {meta['namespace']}/{meta['name']}" if "namespace" in meta else f"Node {meta['name']}"
    assert raised.value.where == f"{path}: {subject}"
    assert raised.value.field == field
    assert str(raised.value).startswith(f"{path}: {subject}: {field}: ")


def slots(obj):
    """(container, key) of every field and list item inside ``obj``."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in list(items):
        yield obj, key
        yield from slots(value)


ODD_VALUES = [None, 0, -1, 70000, True, 1.5, "", "x", "None", "10.0.0.1", "fd00::1", "10.0.0.0/8",
              [], ["a"], [{}], {}, {"a": 1}, "TCP", "LoadBalancer", "Local", "ClientIP", DELETE]


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_odd_value_in_any_field_is_read_or_raises_input_error(tmp_path, data):
    obj = data.draw(st.sampled_from([web_service, web_slice, node_a]))()
    for _ in range(data.draw(st.integers(1, 3))):
        container, key = data.draw(st.sampled_from(list(slots(obj))))
        value = data.draw(st.sampled_from(ODD_VALUES))
        if value is DELETE:
            del container[key]
        else:
            container[key] = copy.deepcopy(value)
    path = tmp_path / "odd.json"
    path.write_text(json.dumps(obj))
    try:
        load_objects(path)
    except InputError as error:
        assert error.where.startswith(str(path))


@pytest.mark.parametrize("document, field, message", [
    ({"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": "shop"}}, "metadata.name", "needs a name"),
    ({"apiVersion": "v1", "metadata": {"name": "web"}}, "kind", "missing"),
    ({"apiVersion": "v1", "kind": "Service", "metadata": "web"}, "metadata", "expected a mapping"),
    ("just a string", "", "expected a Kubernetes object"),
    ({"apiVersion": "v1", "kind": "List", "items": ["web"]}, "items[0]", "expected a mapping"),
])
def test_a_bad_document_is_named_by_its_position(tmp_path, document, field, message):
    path = write_yaml(tmp_path, node_a(), document)
    with pytest.raises(InputError, match=message) as raised:
        load_objects(path)
    assert (raised.value.where, raised.value.field) == (f"{path}: document 2", field)


def test_unreadable_files_raise_input_error(tmp_path):
    with pytest.raises(InputError, match="no such file") as raised:
        load_objects(tmp_path / "missing.yaml")
    assert raised.value.where == str(tmp_path / "missing.yaml")
    with pytest.raises(InputError, match="is a directory"):
        load_objects(tmp_path)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"kind: \xff\xfe\n")
    with pytest.raises(InputError, match="not UTF-8"):
        load_objects(binary)


def test_malformed_yaml_reports_its_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n"
                    "  clusterIP: 10.96.0.1\n  type: a: b\n")
    with pytest.raises(InputError, match="malformed YAML") as raised:
        load_objects(path)
    assert raised.value.where == f"{path}:7"


def test_malformed_json_reports_its_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "apiVersion": "v1",\n  "kind": ,\n}\n')
    with pytest.raises(InputError, match="malformed JSON") as raised:
        load_objects(path)
    assert raised.value.where == f"{path}:3"


# ---- KubeProxyConfiguration and load_cluster -------------------------------------------------

FULL_CONFIG = """\
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: ipvs
clusterCIDR: 10.128.0.0/9,fd00:10::/56
hostnameOverride: " Node-A "
nodePortAddresses: ["100.64.0.0/10", "fd00::/64"]
iptables:
  masqueradeBit: 15
  masqueradeAll: true
ipvs:
  scheduler: lc
conntrack:
  maxPerCore: 32768
"""


def write_text(tmp_path, text: str, name: str = "kube-proxy.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_reads_a_kube_proxy_configuration(tmp_path):
    config = load_config(write_text(tmp_path, FULL_CONFIG))
    assert (config.mode, config.cluster_cidr, config.hostname_override) == ("ipvs", "10.128.0.0/9", "node-a")
    assert config.node_port_addresses == ["100.64.0.0/10"]
    assert (config.masquerade_bit, config.masquerade_mark, config.masquerade_all) == (15, 0x8000, True)
    assert config.ipvs_scheduler == "lc"


def test_configuration_defaults(tmp_path):
    config = load_config(write_text(tmp_path, 'apiVersion: kubeproxy.config.k8s.io/v1alpha1\n'
                                              'kind: KubeProxyConfiguration\nmode: ""\n'))
    assert (config.mode, config.cluster_cidr, config.masquerade_bit, config.masquerade_all) == \
        ("iptables", "", 14, False)
    assert (config.node_port_addresses, config.hostname_override, config.ipvs_scheduler) == ([], "", "rr")


@pytest.mark.parametrize("replace, by, field", [
    ("kind: KubeProxyConfiguration", "kind: KubeletConfiguration", "kind"),
    ("apiVersion: kubeproxy.config.k8s.io/v1alpha1", "apiVersion: kubeproxy.config.k8s.io/v1beta1", "apiVersion"),
    ("mode: ipvs", "mode: ebpf", "mode"),
    ("masqueradeBit: 15", "masqueradeBit: 32", "iptables.masqueradeBit"),
    ("masqueradeBit: 15", "masqueradeBit: fifteen", "iptables.masqueradeBit"),
    ("masqueradeAll: true", "masqueradeAll: 1", "iptables.masqueradeAll"),
    ('["100.64.0.0/10", "fd00::/64"]', '["fd00::/64", "100.64.0.0/40"]', "nodePortAddresses[1]"),
    ('["100.64.0.0/10", "fd00::/64"]', '"100.64.0.0/10"', "nodePortAddresses"),
    ("clusterCIDR: 10.128.0.0/9", "clusterCIDR: 10.128.0/9", "clusterCIDR"),
    ("scheduler: lc", "scheduler: fastest", "ipvs.scheduler"),
    ("iptables:\n  masqueradeBit: 15\n  masqueradeAll: true\n", "iptables: []\n", "iptables"),
])
def test_configuration_errors_name_the_file_and_field(tmp_path, replace, by, field):
    assert replace in FULL_CONFIG
    path = write_text(tmp_path, FULL_CONFIG.replace(replace, by))
    with pytest.raises(InputError) as raised:
        load_config(path)
    assert (raised.value.where, raised.value.field) == (str(path), field)


def test_a_configuration_is_one_mapping(tmp_path):
    with pytest.raises(InputError, match="expected one KubeProxyConfiguration document, found 2"):
        load_config(write_text(tmp_path, FULL_CONFIG + "---\n" + FULL_CONFIG))
    with pytest.raises(InputError, match="expected a KubeProxyConfiguration"):
        load_config(write_text(tmp_path, "- mode: ipvs\n"))


def test_load_cluster_finds_the_node_by_hostname_override(tmp_path):
    objects = write_yaml(tmp_path, web_service(), web_slice(), node_a())
    cluster, warnings = load_cluster(objects, write_text(tmp_path, FULL_CONFIG))
    assert cluster.node_name == "node-a" and warnings == []
    assert cluster.config.node_ips == ["100.64.0.1"]  # taken from the Node object
    assert service_ports(cluster)[0].endpoints[0].is_local


def test_load_cluster_finds_the_node_by_node_ip(tmp_path):
    objects = write_yaml(tmp_path, web_service(), web_slice(), node_a())
    cluster, _ = load_cluster(objects, node_ips=["100.64.0.1"])
    assert (cluster.node_name, cluster.config.node_ips) == ("node-a", ["100.64.0.1"])
    cluster, _ = load_cluster(objects, node_ips=["100.64.9.9"])
    assert (cluster.node_name, cluster.config.node_ips) == ("", ["100.64.9.9"])
    with pytest.raises(InputError) as raised:
        load_cluster(objects, node_ips=["node-a"])
    assert (raised.value.where, raised.value.field) == ("command line", "--node-ip")


def test_primary_node_port_addresses_are_the_node_ips(tmp_path):
    objects = write_yaml(tmp_path, web_service())
    config = write_text(tmp_path, FULL_CONFIG.replace('"100.64.0.0/10", "fd00::/64"', '"primary"'))
    cluster, _ = load_cluster(objects, config, node_ips=["100.64.0.7"])
    assert cluster.config.node_port_addresses == ["100.64.0.7/32"]
    with pytest.raises(InputError, match="primary") as raised:
        load_cluster(objects, config)  # no --node-ip and no Node object for node-a
    assert raised.value.field == "nodePortAddresses"


def test_service_ports_are_resolved_once_per_cluster_and_again_after_a_change():
    cluster = generate(20, 2, 3, seed=4)
    assert service_ports(cluster) is service_ports(cluster)
    gone = cluster.services[-1].name
    changed = replace(cluster, services=cluster.services[:-1],
                      slices=[s for s in cluster.slices if s.service_name != gone])
    assert len(service_ports(changed)) < len(service_ports(cluster))
    assert all(info.service.name != gone for info in service_ports(changed))


def test_a_copied_cluster_changed_in_place_gets_its_own_service_ports():
    cluster = generate(20, 2, 3, seed=4)
    before = service_ports(cluster)
    changed = copy.deepcopy(cluster)
    changed.services.pop()
    assert len(service_ports(changed)) < len(before) == len(service_ports(cluster))
