"""The packet tracer against the packet-flow cases of kube-proxy's own iptables tests."""
import pytest

from bench.cluster.model import (Cluster, Endpoint, EndpointPort, EndpointSlice, Node,
                                 ProxyConfig, Service, ServicePort)
from bench.loaders.iptables import load
from bench.proxies.iptables import WriterOptions, write_full
from bench.trace import format_trace, trace_packet

NODE_IP = "192.168.0.2"
POD_CIDR = "10.0.0.0/8"


def _service(name, cluster_ip, port=80, node_port=0, **fields):
    svc_type = fields.pop("type", "NodePort" if node_port else "ClusterIP")
    return Service("ns1", name, svc_type, cluster_ip,
                   [ServicePort("p80", "tcp", port, port, node_port)], **fields)


def _slice(name, *endpoints, port=80):
    eps = [Endpoint(ip, node) for ip, node in endpoints]
    return EndpointSlice("ns1", f"{name}-abc", name, [EndpointPort("p80", "tcp", port)], eps)


@pytest.fixture(scope="module")
def ruleset():
    services = [
        _service("svc1", "172.30.0.41"),
        _service("svc2", "172.30.0.42", node_port=3001),
        _service("svc3", "172.30.0.43", type="LoadBalancer", node_port=3003,
                 load_balancer_ips=["1.2.3.4"], load_balancer_source_ranges=["203.0.113.0/25"]),
        _service("svc4", "172.30.0.44", type="LoadBalancer", node_port=3004,
                 load_balancer_ips=["5.6.7.8"], external_traffic_policy="Local",
                 health_check_node_port=30000),
        _service("svc5", "172.30.0.45"),  # no endpoints
    ]
    slices = [
        _slice("svc1", ("10.180.0.1", "node1"), ("10.180.2.1", "node2")),
        _slice("svc2", ("10.180.0.2", "node1")),
        _slice("svc3", ("10.180.0.3", "node1")),
        _slice("svc4", ("10.180.2.4", "node2")),  # remote only: eTP=Local has nothing local
    ]
    config = ProxyConfig(cluster_cidr=POD_CIDR, node_ips=[NODE_IP])
    cluster = Cluster(services, slices, [Node("node1", [NODE_IP])], config, node_name="node1")
    return load(write_full(cluster, WriterOptions(include_jump_rules=True)), source="test")


def _trace(ruleset, src, dst, dport, all_endpoints=True):
    return trace_packet(ruleset, [NODE_IP], src, dst, dport, all_endpoints=all_endpoints)


@pytest.mark.parametrize("name, src, dst, dport, output, masq", [
    ("pod to cluster IP", "10.0.0.2", "172.30.0.41", 80, "10.180.0.1:80, 10.180.2.1:80", False),
    ("hairpin", "10.180.0.1", "172.30.0.41", 80, "10.180.0.1:80, 10.180.2.1:80", True),
    ("external to cluster IP", "192.168.0.3", "172.30.0.41", 80, "10.180.0.1:80, 10.180.2.1:80", True),
    ("external to node port", "203.0.113.1", NODE_IP, 3001, "10.180.0.2:80", True),
    ("node to its own node port", NODE_IP, NODE_IP, 3001, "10.180.0.2:80", True),
    ("allowed source to LB", "203.0.113.1", "1.2.3.4", 80, "10.180.0.3:80", True),
    ("blocked source to LB", "203.0.113.200", "1.2.3.4", 80, "DROP", False),
    ("eTP Local without local endpoints", "203.0.113.1", "5.6.7.8", 80, "DROP", False),
    ("pod to eTP Local service's cluster IP", "10.0.0.2", "172.30.0.44", 80, "10.180.2.4:80", False),
    ("no endpoints", "10.0.0.2", "172.30.0.45", 80, "REJECT", False),
    ("health check node port", "203.0.113.1", NODE_IP, 30000, "ACCEPT", False),
    ("not a service", "10.0.0.2", "10.180.0.5", 8080, "", False),
])
def test_packet_flows(ruleset, name, src, dst, dport, output, masq):
    result = _trace(ruleset, src, dst, dport)
    assert result["output"] == output, name
    assert result["masquerade"] is masq, name


def test_dropped_and_rejected_packets_have_that_verdict(ruleset):
    assert _trace(ruleset, "203.0.113.200", "1.2.3.4", 80)["verdict"] == "DROP"
    assert _trace(ruleset, "10.0.0.2", "172.30.0.45", 80)["verdict"] == "REJECT"
    assert _trace(ruleset, "10.0.0.2", "172.30.0.41", 80)["verdict"] == "ACCEPT"


def test_seeded_walk_picks_one_endpoint_reproducibly(ruleset):
    picks = {_trace(ruleset, "10.0.0.2", "172.30.0.41", 80, all_endpoints=False)["output"] for _ in range(3)}
    assert len(picks) == 1
    assert picks.pop() in ("10.180.0.1:80", "10.180.2.1:80")


def test_path_lists_every_visited_rule_in_order(ruleset):
    result = _trace(ruleset, "10.0.0.2", "10.180.0.5", 8080, all_endpoints=False)
    nat_services = [s for s in result["path"] if s["table"] == "nat" and s["chain"] == "KUBE-SERVICES"]
    # A non-service packet is compared with every KUBE-SERVICES rule, then the chain's tail.
    assert [s["rule"] for s in nat_services][-1] == "tail"
    assert not any(s["matched"] for s in nat_services[:-2])
    assert result["counters"]["entries_visited"] == len(result["path"])


def test_human_format_shows_verdict_and_rules(ruleset):
    text = format_trace(_trace(ruleset, "203.0.113.200", "1.2.3.4", 80))
    assert "verdict: DROP" in text
    assert "KUBE-PROXY-FIREWALL" in text
