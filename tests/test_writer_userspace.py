"""The userspace proxier's portal rules: chains, one rule pair per portal, proxy ports, errors."""
import pytest

from bench.cli import main
from bench.cluster.model import (Cluster, Endpoint, EndpointPort, EndpointSlice, Node, ProxyConfig,
                                 Service, ServicePort)
from bench.errors import InputError
from bench.proxies.userspace import (PORTAL_CHAINS, WriterOptions, allocate_proxy_ports, portals,
                                     write)

NODE_IP = "192.168.0.2"


def _cluster(*services: Service, node_ips=(NODE_IP,)) -> Cluster:
    slices = [EndpointSlice("ns1", f"{svc.name}-x", svc.name, [EndpointPort("p80", "tcp", 8080)],
                            [Endpoint("10.180.0.1", "node2")]) for svc in services]
    return Cluster(list(services), slices, [Node("node1", list(node_ips))],
                   ProxyConfig(mode="userspace", node_ips=list(node_ips)), node_name="node1")


def _service(name, cluster_ip, kind="ClusterIP", node_port=0, protocol="tcp", **fields) -> Service:
    return Service("ns1", name, kind, cluster_ip, [ServicePort("p80", protocol, 80, 8080, node_port)], **fields)


def _rules(cluster, chain=None, **options) -> list[str]:
    lines = [line for line in write(cluster, WriterOptions(**options)).splitlines() if line.startswith("-A ")]
    return [line for line in lines if chain is None or line.split()[1] == chain]


def _proxy_port(cluster) -> int:
    (portal,) = portals(cluster)
    return portal.proxy_port


def test_cluster_ip_gets_a_redirect_for_pods_and_a_dnat_for_the_node():
    cluster = _cluster(_service("web", "172.30.0.10"))
    port = _proxy_port(cluster)
    match = "-m comment --comment ns1/web:p80 -p tcp -m tcp --dport 80 -d 172.30.0.10/32"
    assert _rules(cluster) == [
        f"-A KUBE-PORTALS-CONTAINER {match} -j REDIRECT --to-ports {port}",
        f"-A KUBE-PORTALS-HOST {match} -j DNAT --to-destination {NODE_IP}:{port}",
    ]


def test_node_port_gets_a_pair_without_destination_in_the_nodeport_chains():
    cluster = _cluster(_service("np", "172.30.0.11", "NodePort", 30001))
    port = _proxy_port(cluster)
    match = "-m comment --comment ns1/np:p80 -p tcp -m tcp --dport 30001"
    assert _rules(cluster, "KUBE-NODEPORT-CONTAINER") == [
        f"-A KUBE-NODEPORT-CONTAINER {match} -j REDIRECT --to-ports {port}"]
    assert _rules(cluster, "KUBE-NODEPORT-HOST") == [
        f"-A KUBE-NODEPORT-HOST {match} -j DNAT --to-destination {NODE_IP}:{port}"]
    assert len(_rules(cluster, "KUBE-PORTALS-CONTAINER")) == 1  # and its cluster IP


def test_load_balancer_ingress_is_a_portal_like_the_cluster_ip():
    cluster = _cluster(_service("lb", "172.30.0.12", "LoadBalancer", 30002, load_balancer_ips=["1.2.3.4"]))
    port = _proxy_port(cluster)
    containers = _rules(cluster, "KUBE-PORTALS-CONTAINER")
    assert [line.split(" -d ")[1] for line in containers] == [
        f"172.30.0.12/32 -j REDIRECT --to-ports {port}",
        f"1.2.3.4/32 -j REDIRECT --to-ports {port}"]
    assert _rules(cluster, "KUBE-PORTALS-HOST")[1].endswith(f"-d 1.2.3.4/32 -j DNAT --to-destination {NODE_IP}:{port}")
    assert len(_rules(cluster, "KUBE-NODEPORT-HOST")) == 1


def test_external_ips_get_a_not_bridged_and_a_local_rule():
    cluster = _cluster(_service("ext", "172.30.0.13", external_ips=["5.6.7.8"]))
    port = _proxy_port(cluster)
    match = "-m comment --comment ns1/ext:p80 -p tcp -m tcp --dport 80 -d 5.6.7.8/32"
    assert _rules(cluster, "KUBE-PORTALS-CONTAINER")[1:] == [
        f"-A KUBE-PORTALS-CONTAINER {match} -m physdev ! --physdev-is-in -j REDIRECT --to-ports {port}",
        f"-A KUBE-PORTALS-CONTAINER {match} -m addrtype --dst-type LOCAL -j REDIRECT --to-ports {port}",
    ]
    assert _rules(cluster, "KUBE-PORTALS-HOST")[1:] == [
        f"-A KUBE-PORTALS-HOST {match} -m addrtype --dst-type LOCAL -j DNAT --to-destination {NODE_IP}:{port}"]


def test_chains_and_jump_rules_put_portals_before_nodeports():
    text = write(_cluster(_service("web", "172.30.0.10")), WriterOptions(include_jump_rules=True))
    lines = text.splitlines()
    assert lines[0] == "*nat" and lines[-1] == "COMMIT"
    assert [line for line in lines if line.startswith(":KUBE")] == [f":{c} - [0:0]" for c in PORTAL_CHAINS]
    jumps = [line for line in lines if line.startswith(("-A PREROUTING", "-A OUTPUT"))]
    assert [line.split()[-1] for line in jumps] == [
        "KUBE-PORTALS-CONTAINER", "KUBE-NODEPORT-CONTAINER", "KUBE-PORTALS-HOST", "KUBE-NODEPORT-HOST"]
    assert all("--dst-type LOCAL" in line for line in jumps if "NODEPORT" in line)


def test_services_without_endpoints_keep_their_portal_and_sctp_gets_none():
    cluster = _cluster(_service("web", "172.30.0.10"), _service("sctp", "172.30.0.14", protocol="sctp"))
    cluster.slices = []
    assert [p.spn for p in portals(cluster)] == ["ns1/web:p80"]
    assert portals(cluster)[0].backends == []


def test_proxy_ports_are_distinct_in_range_and_seeded():
    services = [_service(f"s{i}", f"172.30.0.{i + 1}") for i in range(50)]
    cluster = _cluster(*services)
    ports = [p.proxy_port for p in portals(cluster, WriterOptions(proxy_port_range=(40000, 40100)))]
    assert len(set(ports)) == 50 and all(40000 <= p <= 40100 for p in ports)
    assert ports == [p.proxy_port for p in portals(cluster, WriterOptions(proxy_port_range=(40000, 40100)))]
    assert ports != [p.proxy_port for p in portals(cluster, WriterOptions(proxy_port_range=(40000, 40100),
                                                                          proxy_port_seed=1))]


def test_order_seed_shuffles_the_portals():
    cluster = _cluster(*[_service(f"s{i:02}", f"172.30.0.{i + 1}") for i in range(20)])
    sorted_order = [p.spn for p in portals(cluster)]
    assert sorted_order == sorted(sorted_order)
    assert sorted([p.spn for p in portals(cluster, WriterOptions(service_order_seed=3))]) == sorted_order
    assert [p.spn for p in portals(cluster, WriterOptions(service_order_seed=3))] != sorted_order


@pytest.mark.parametrize("port_range", [(10, 5), (0, 10), (1, 70000), ("a", 9)])
def test_bad_port_ranges_are_input_errors(port_range):
    with pytest.raises(InputError, match="proxy_port_range"):
        allocate_proxy_ports(1, port_range, 0)


def test_more_service_ports_than_proxy_ports_is_an_input_error():
    cluster = _cluster(*[_service(f"s{i}", f"172.30.0.{i + 1}") for i in range(3)])
    with pytest.raises(InputError, match="3 proxied service ports need one proxy port each"):
        write(cluster, WriterOptions(proxy_port_range=(40000, 40001)))


def test_without_a_node_address_the_host_rules_cannot_be_written():
    with pytest.raises(InputError, match="--node-ip"):
        write(_cluster(_service("web", "172.30.0.10"), node_ips=()))


def test_bad_cluster_ip_names_the_service_and_field():
    with pytest.raises(InputError, match="Service ns1/web: spec.clusterIP"):
        write(_cluster(_service("web", "172.30.0.300")))


def test_cli_prints_the_rules_and_refuses_what_userspace_lacks(tmp_path, capsys):
    objects = tmp_path / "objects.yaml"
    assert main(["cluster", "--services", "4", "--endpoints", "2", "--output", str(objects)]) == 0
    capsys.readouterr()
    assert main(["rules", "userspace", "--objects", str(objects), "--node-ip", NODE_IP, "--jump-rules"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("*nat\n") and "-j REDIRECT --to-ports" in out and f"{NODE_IP}:" in out
    assert main(["rules", "userspace", "--objects", str(objects), "--node-ip", NODE_IP,
                 "--previous", str(objects)]) == 2
    assert "--previous: not available in userspace mode" in capsys.readouterr().err
    assert main(["rules", "userspace", "--objects", str(objects), "--node-ip", NODE_IP,
                 "--proxy-port-range", "9-x"]) == 2
    assert "--proxy-port-range" in capsys.readouterr().err
