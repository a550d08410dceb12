"""Inputs several test files build the same way: a small packet-flow cluster and word mutations."""
from hypothesis import strategies as st

from bench.cluster.model import (Cluster, Endpoint, EndpointPort, EndpointSlice, Node, ProxyConfig,
                                 Service, ServicePort)


def _service(name, cluster_ip, kind="ClusterIP", node_port=0, **fields):
    return Service("ns1", name, kind, cluster_ip, [ServicePort("p80", "tcp", 80, 80, node_port)], **fields)


def _slice(service_name, *addresses):
    return EndpointSlice("ns1", f"{service_name}-abc", service_name, [EndpointPort("p80", "tcp", 8080)],
                         [Endpoint(address, "node2") for address in addresses])


def packet_flow_cluster(mode: str, node_ip: str) -> Cluster:
    """ClusterIP, NodePort, LoadBalancer with a source range, and a service without endpoints;
    every endpoint on node2, kube-proxy on node1."""
    services = [
        _service("web", "172.30.0.10"),
        _service("np", "172.30.0.11", "NodePort", 30001),
        _service("lb", "172.30.0.12", "LoadBalancer", 30002, load_balancer_ips=["1.2.3.4"],
                 load_balancer_source_ranges=["203.0.113.0/24"]),
        _service("empty", "172.30.0.13"),
    ]
    slices = [_slice("web", "10.180.0.1", "10.180.0.2"), _slice("np", "10.180.1.1"),
              _slice("lb", "10.180.2.1")]
    return Cluster(services, slices, [Node("node1", [node_ip]), Node("node2", ["192.168.0.3"])],
                   ProxyConfig(mode=mode, cluster_cidr="10.0.0.0/8", node_ips=[node_ip]),
                   node_name="node1")


def mutate_words(draw, lines: list[str], numbers, words) -> str:
    """``lines`` with a few of the lines in ``numbers`` having a word deleted, repeated, swapped,
    replaced by one of ``words`` or one of them inserted."""
    lines = list(lines)
    for _ in range(draw(st.integers(1, 3))):
        number = draw(numbers)
        line = lines[number].split(" ")
        position = draw(st.integers(0, len(line) - 1))
        action = draw(st.sampled_from(["delete", "repeat", "swap", "replace", "insert"]))
        word = draw(st.sampled_from(words))
        if action == "delete":
            del line[position]
        elif action == "repeat":
            line.insert(position, line[position])
        elif action == "swap":
            other = draw(st.integers(0, len(line) - 1))
            line[position], line[other] = line[other], line[position]
        elif action == "replace":
            line[position] = word
        else:
            line.insert(position, word)
        lines[number] = " ".join(line)
    return "\n".join(lines) + "\n"
