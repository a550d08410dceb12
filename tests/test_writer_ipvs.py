"""The IPVS writer against kube-proxy's IPVS mode (shared/docs/kube-proxy-rules.md §b).

Clusters are built by hand. Unless a test says otherwise the node is node1 (192.168.0.2), the
cluster CIDR 10.0.0.0/8 is the local-traffic detector, --random-fully is off and the mark is
written 0x4000, as in kube-proxy's own IPVS unit tests.
"""
import pytest

from bench.cluster.generate import generate
from bench.cluster.model import (Cluster, Endpoint, EndpointPort, EndpointSlice, Node, ProxyConfig,
                                 Service, ServicePort)
from bench.errors import InputError
from bench.loaders import iptables
from bench.loaders.ipvs import (FLAG_PERSISTENT, FWD_MASQ, SECTION_ADDRESSES, SECTION_IPSET,
                                SECTION_IPTABLES, SECTION_IPVSADM, SECTIONS, RealServer, VirtualService,
                                dump_ipset, dump_ipvsadm, load)
from bench.netaddr import ip_to_int
from bench.proxies.ipvs import IPSETS, IpvsWriterOptions, write

NODE, OTHER_NODE = "node1", "node2"
NODE_IP, OTHER_NODE_IP = "192.168.0.2", "192.168.0.3"
TEST = IpvsWriterOptions(mark_format="test")
TCP = 6


# --- building clusters -------------------------------------------------------------------------

def service(name, cluster_ip, *, node_port=0, protocol="tcp", port=80, **fields):
    """Service ns1/<name> with one port p80 (80/tcp unless told otherwise)."""
    kind = fields.pop("type", "NodePort" if node_port else "ClusterIP")
    return Service("ns1", name, kind, cluster_ip, [ServicePort("p80", protocol, port, port, node_port)], **fields)


def load_balancer(name, cluster_ip, node_port, **fields):
    return service(name, cluster_ip, node_port=node_port, type="LoadBalancer", **fields)


def endpoints(service_name, *addresses, port=80, protocol="tcp", node=OTHER_NODE, **conditions):
    """An EndpointSlice for ``service_name``; ``addresses`` are IPs, or (IP, node) pairs."""
    eps = [Endpoint(*(a if isinstance(a, tuple) else (a, node)), **conditions) for a in addresses]
    return EndpointSlice("ns1", f"{service_name}-abc", service_name, [EndpointPort("p80", protocol, port)], eps)


def cluster(services, slices=(), **config):
    values = dict(mode="ipvs", cluster_cidr="10.0.0.0/8", node_ips=[NODE_IP], random_fully=False)
    values.update(config)
    return Cluster(list(services), list(slices), [Node(NODE, [NODE_IP]), Node(OTHER_NODE, [OTHER_NODE_IP])],
                   ProxyConfig(**values), node_name=NODE)


# --- reading the output ------------------------------------------------------------------------

def sections(text):
    found, current = {}, None
    for line in text.splitlines():
        if line in SECTIONS:
            current = found[line] = []
        elif current is not None:
            current.append(line)
    return found


def ipvsadm(text):
    return sections(text)[SECTION_IPVSADM]


def entries(text, name):
    return [line.split(" ", 2)[2] for line in sections(text)[SECTION_IPSET] if line.startswith(f"add {name} ")]


def nonempty_sets(text):
    return {line.split()[1] for line in sections(text)[SECTION_IPSET] if line.startswith("add ")}


def iptables_text(text):
    return "\n".join(sections(text)[SECTION_IPTABLES]) + "\n"


def rules(text, table):
    lines = sections(text)[SECTION_IPTABLES]
    start = lines.index(f"*{table}")
    return [line for line in lines[start:lines.index("COMMIT", start)] if line.startswith("-A ")]


# --- virtual and real servers ------------------------------------------------------------------

def test_clusterip_service_is_one_virtual_server_with_a_real_server_per_endpoint():
    text = write(cluster([service("svc1", "172.30.0.41")],
                         [endpoints("svc1", "10.180.0.2", "10.180.0.1")]), TEST)
    assert ipvsadm(text) == [
        "-A -t 172.30.0.41:80 -s rr",
        "-a -t 172.30.0.41:80 -r 10.180.0.1:80 -m -w 1",
        "-a -t 172.30.0.41:80 -r 10.180.0.2:80 -m -w 1",
    ]
    assert entries(text, "KUBE-CLUSTER-IP") == ["172.30.0.41,tcp:80"]
    assert entries(text, "KUBE-IPVS-IPS") == ["172.30.0.41"]
    assert sections(text)[SECTION_ADDRESSES] == ["inet 172.30.0.41/32 scope global kube-ipvs0"]
    assert nonempty_sets(text) == {"KUBE-CLUSTER-IP", "KUBE-IPVS-IPS"}


def test_virtual_servers_are_sorted_by_protocol_address_and_port():
    text = write(cluster([service("b", "172.30.0.2", protocol="udp", port=53), service("a", "172.30.0.9"),
                          Service("ns1", "c", "ClusterIP", "172.30.0.1",
                                  [ServicePort("p80", "tcp", 80, 80), ServicePort("p7", "tcp", 7, 7)])]))
    assert [line for line in ipvsadm(text) if line.startswith("-A")] == [
        "-A -t 172.30.0.1:7 -s rr", "-A -t 172.30.0.1:80 -s rr", "-A -t 172.30.0.9:80 -s rr",
        "-A -u 172.30.0.2:53 -s rr"]


def test_service_without_endpoints_still_gets_its_virtual_servers_and_set_entries():
    text = write(cluster([service("svc1", "172.30.0.41", node_port=3001)]), TEST)
    assert ipvsadm(text) == ["-A -t 172.30.0.41:80 -s rr", f"-A -t {NODE_IP}:3001 -s rr"]
    assert entries(text, "KUBE-CLUSTER-IP") == ["172.30.0.41,tcp:80"]
    assert entries(text, "KUBE-NODE-PORT-TCP") == ["3001"]


def test_nodeport_gets_a_virtual_server_per_node_ip_and_a_port_bitmap_entry():
    svc = service("svc1", "172.30.0.41", node_port=3001)
    text = write(cluster([svc], [endpoints("svc1", "10.180.0.1")], node_ips=[NODE_IP, "172.16.0.2"]), TEST)
    assert ipvsadm(text) == [
        "-A -t 172.16.0.2:3001 -s rr", "-a -t 172.16.0.2:3001 -r 10.180.0.1:80 -m -w 1",
        "-A -t 172.30.0.41:80 -s rr", "-a -t 172.30.0.41:80 -r 10.180.0.1:80 -m -w 1",
        f"-A -t {NODE_IP}:3001 -s rr", f"-a -t {NODE_IP}:3001 -r 10.180.0.1:80 -m -w 1",
    ]
    assert entries(text, "KUBE-NODE-PORT-TCP") == ["3001"]
    assert entries(text, "KUBE-NODE-PORT-LOCAL-TCP") == []
    # Node IPs are not bound to kube-ipvs0: only the cluster IP is.
    assert entries(text, "KUBE-IPVS-IPS") == ["172.30.0.41"]


def test_nodeport_addresses_select_the_node_ips_and_loopback_is_never_used():
    svc = service("svc1", "172.30.0.41", node_port=3001)
    text = write(cluster([svc], node_ips=["127.0.0.1", NODE_IP, "172.16.0.2"],
                         node_port_addresses=["172.16.0.0/16", "127.0.0.0/8"]))
    assert ipvsadm(text) == ["-A -t 172.16.0.2:3001 -s rr", "-A -t 172.30.0.41:80 -s rr"]


def test_without_node_ips_nodeports_and_their_health_check_port_are_skipped():
    svc = load_balancer("svc1", "172.30.0.41", 3001, load_balancer_ips=["1.2.3.4"],
                        external_traffic_policy="Local", health_check_node_port=30000)
    text = write(Cluster([svc], [], [], ProxyConfig(mode="ipvs"), node_name=NODE))
    assert ipvsadm(text) == ["-A -t 1.2.3.4:80 -s rr", "-A -t 172.30.0.41:80 -s rr"]
    assert entries(text, "KUBE-NODE-PORT-TCP") == []
    assert entries(text, "KUBE-HEALTH-CHECK-NODE-PORT") == []


def test_external_ips_get_virtual_servers_and_are_bound_unless_the_node_has_them():
    svc = service("svc1", "172.30.0.41", external_ips=["192.168.99.11", NODE_IP])
    text = write(cluster([svc], [endpoints("svc1", "10.180.0.1")]), TEST)
    assert ipvsadm(text) == [
        "-A -t 172.30.0.41:80 -s rr", "-a -t 172.30.0.41:80 -r 10.180.0.1:80 -m -w 1",
        f"-A -t {NODE_IP}:80 -s rr", f"-a -t {NODE_IP}:80 -r 10.180.0.1:80 -m -w 1",
        "-A -t 192.168.99.11:80 -s rr", "-a -t 192.168.99.11:80 -r 10.180.0.1:80 -m -w 1",
    ]
    assert entries(text, "KUBE-EXTERNAL-IP") == ["192.168.0.2,tcp:80", "192.168.99.11,tcp:80"]
    assert entries(text, "KUBE-EXTERNAL-IP-LOCAL") == []
    assert entries(text, "KUBE-IPVS-IPS") == ["172.30.0.41", "192.168.99.11"]


def test_load_balancer_with_source_ranges_fills_the_firewall_sets():
    svc = load_balancer("svc1", "172.30.0.41", 3001, load_balancer_ips=["1.2.3.4", "5.6.7.8"],
                        load_balancer_source_ranges=["203.0.113.5/25", "198.51.100.7/32"])
    text = write(cluster([svc], [endpoints("svc1", "10.180.0.1")]), TEST)
    assert [line for line in ipvsadm(text) if line.startswith("-A")] == [
        "-A -t 1.2.3.4:80 -s rr", "-A -t 5.6.7.8:80 -s rr", "-A -t 172.30.0.41:80 -s rr",
        f"-A -t {NODE_IP}:3001 -s rr"]
    assert entries(text, "KUBE-LOAD-BALANCER") == ["1.2.3.4,tcp:80", "5.6.7.8,tcp:80"]
    assert entries(text, "KUBE-LOAD-BALANCER-FW") == ["1.2.3.4,tcp:80", "5.6.7.8,tcp:80"]
    # ipset stores the masked net and prints a /32 without its prefix.
    assert entries(text, "KUBE-LOAD-BALANCER-SOURCE-CIDR") == [
        "1.2.3.4,tcp:80,198.51.100.7", "1.2.3.4,tcp:80,203.0.113.0/25",
        "5.6.7.8,tcp:80,198.51.100.7", "5.6.7.8,tcp:80,203.0.113.0/25"]
    assert entries(text, "KUBE-LOAD-BALANCER-SOURCE-IP") == []
    assert entries(text, "KUBE-LOAD-BALANCER-LOCAL") == []
    # The node IP is outside the ranges, so the node may not reach the LB IPs itself.
    assert [rule for rule in rules(text, "filter") if "KUBE-IPVS-OUT-FILTER" in rule] == [
        "-A KUBE-IPVS-OUT-FILTER -s 1.2.3.4 -m ipvs --vaddr 1.2.3.4 --vproto tcp --vport 80 -j DROP",
        "-A KUBE-IPVS-OUT-FILTER -s 5.6.7.8 -m ipvs --vaddr 5.6.7.8 --vproto tcp --vport 80 -j DROP"]


def test_source_range_holding_the_node_ip_lets_the_node_reach_the_lb_ip():
    svc = load_balancer("svc1", "172.30.0.41", 3001, load_balancer_ips=["1.2.3.4"],
                        load_balancer_source_ranges=["192.168.0.0/16", "0.0.0.0/0"])
    text = write(cluster([svc], [endpoints("svc1", "10.180.0.1")]), TEST)
    assert entries(text, "KUBE-LOAD-BALANCER-SOURCE-IP") == ["1.2.3.4,tcp:80,1.2.3.4"]
    # The kernel refuses a /0 net in hash:ip,port,net, so only the /16 is stored.
    assert entries(text, "KUBE-LOAD-BALANCER-SOURCE-CIDR") == ["1.2.3.4,tcp:80,192.168.0.0/16"]
    assert not [rule for rule in rules(text, "filter") if rule.startswith("-A KUBE-IPVS-OUT-FILTER")]


def test_external_policy_local_uses_local_endpoints_on_external_and_nodeport_servers():
    svc = load_balancer("svc1", "172.30.0.41", 3001, external_ips=["192.168.99.11"], load_balancer_ips=["1.2.3.4"],
                        external_traffic_policy="Local", health_check_node_port=30000)
    text = write(cluster([svc], [endpoints("svc1", ("10.180.0.1", NODE), ("10.180.0.2", OTHER_NODE))]), TEST)
    assert ipvsadm(text) == [
        "-A -t 1.2.3.4:80 -s rr", "-a -t 1.2.3.4:80 -r 10.180.0.1:80 -m -w 1",
        "-A -t 172.30.0.41:80 -s rr", "-a -t 172.30.0.41:80 -r 10.180.0.1:80 -m -w 1",
        "-a -t 172.30.0.41:80 -r 10.180.0.2:80 -m -w 1",
        f"-A -t {NODE_IP}:3001 -s rr", f"-a -t {NODE_IP}:3001 -r 10.180.0.1:80 -m -w 1",
        "-A -t 192.168.99.11:80 -s rr", "-a -t 192.168.99.11:80 -r 10.180.0.1:80 -m -w 1",
    ]
    assert entries(text, "KUBE-EXTERNAL-IP-LOCAL") == ["192.168.99.11,tcp:80"]
    assert entries(text, "KUBE-EXTERNAL-IP") == []
    assert entries(text, "KUBE-LOAD-BALANCER-LOCAL") == ["1.2.3.4,tcp:80"]
    assert entries(text, "KUBE-NODE-PORT-LOCAL-TCP") == ["3001"]
    assert entries(text, "KUBE-NODE-PORT-TCP") == ["3001"]
    assert entries(text, "KUBE-HEALTH-CHECK-NODE-PORT") == ["30000"]
    assert entries(text, "KUBE-LOOP-BACK") == ["10.180.0.1,tcp:80,10.180.0.1"]


def test_external_policy_local_without_local_endpoints_falls_back_to_all_endpoints():
    svc = service("svc1", "172.30.0.41", node_port=3001, external_traffic_policy="Local")
    text = write(cluster([svc], [endpoints("svc1", "10.180.0.1", "10.180.0.2")]), TEST)
    assert ipvsadm(text)[3:] == [f"-A -t {NODE_IP}:3001 -s rr",
                                 f"-a -t {NODE_IP}:3001 -r 10.180.0.1:80 -m -w 1",
                                 f"-a -t {NODE_IP}:3001 -r 10.180.0.2:80 -m -w 1"]


def test_internal_policy_local_gives_the_cluster_ip_only_local_endpoints():
    with_local = write(cluster([service("svc1", "172.30.0.41", internal_traffic_policy="Local")],
                               [endpoints("svc1", ("10.180.0.1", NODE), ("10.180.0.2", OTHER_NODE))]))
    assert ipvsadm(with_local) == ["-A -t 172.30.0.41:80 -s rr", "-a -t 172.30.0.41:80 -r 10.180.0.1:80 -m -w 1"]
    # Nothing to fall back to: a ClusterIP service with iTP=Local has no Cluster-policy endpoints.
    without = write(cluster([service("svc1", "172.30.0.41", internal_traffic_policy="Local")],
                            [endpoints("svc1", "10.180.0.2")]))
    assert ipvsadm(without) == ["-A -t 172.30.0.41:80 -s rr"]


def test_not_ready_endpoints_are_left_out_but_local_ones_still_hairpin():
    slices = [endpoints("svc1", ("10.180.0.1", NODE)),
              EndpointSlice("ns1", "svc1-def", "svc1", [EndpointPort("p80", "tcp", 80)],
                            [Endpoint("10.180.0.9", NODE, ready=False, serving=False)])]
    text = write(cluster([service("svc1", "172.30.0.41")], slices))
    assert ipvsadm(text) == ["-A -t 172.30.0.41:80 -s rr", "-a -t 172.30.0.41:80 -r 10.180.0.1:80 -m -w 1"]
    assert entries(text, "KUBE-LOOP-BACK") == ["10.180.0.1,tcp:80,10.180.0.1", "10.180.0.9,tcp:80,10.180.0.9"]


def test_client_ip_affinity_makes_every_virtual_server_persistent():
    svc = service("svc1", "172.30.0.41", node_port=3001, external_ips=["192.168.99.11"], affinity_timeout=600)
    text = write(cluster([svc], [endpoints("svc1", "10.180.0.1")]))
    assert [line for line in ipvsadm(text) if line.startswith("-A")] == [
        "-A -t 172.30.0.41:80 -s rr -p 600", f"-A -t {NODE_IP}:3001 -s rr -p 600",
        "-A -t 192.168.99.11:80 -s rr -p 600"]


def test_udp_ports_use_the_udp_service_switch_and_bitmap():
    svc = service("dns", "172.30.0.10", protocol="udp", port=53, node_port=3053)
    text = write(cluster([svc], [endpoints("dns", "10.180.0.1", port=53, protocol="udp")]))
    assert ipvsadm(text) == [
        "-A -u 172.30.0.10:53 -s rr", "-a -u 172.30.0.10:53 -r 10.180.0.1:53 -m -w 1",
        f"-A -u {NODE_IP}:3053 -s rr", f"-a -u {NODE_IP}:3053 -r 10.180.0.1:53 -m -w 1"]
    assert entries(text, "KUBE-CLUSTER-IP") == ["172.30.0.10,udp:53"]
    assert entries(text, "KUBE-NODE-PORT-UDP") == ["3053"]
    assert entries(text, "KUBE-NODE-PORT-TCP") == []


def test_sctp_nodeports_get_one_hash_entry_per_node_ip():
    svc = service("sig", "172.30.0.20", protocol="sctp", port=9000, node_port=3090, external_traffic_policy="Local")
    text = write(cluster([svc], [endpoints("sig", "10.180.0.1", port=9000, protocol="sctp")],
                         node_ips=[NODE_IP, "172.16.0.2"]))
    assert ipvsadm(text)[:2] == ["-A --sctp-service 172.16.0.2:3090 -s rr",
                                 "-a --sctp-service 172.16.0.2:3090 -r 10.180.0.1:9000 -m -w 1"]
    assert entries(text, "KUBE-NODE-PORT-SCTP-HASH") == ["172.16.0.2,sctp:3090", "192.168.0.2,sctp:3090"]
    assert entries(text, "KUBE-NODE-PORT-LOCAL-SCTP-HASH") == ["172.16.0.2,sctp:3090", "192.168.0.2,sctp:3090"]
    assert "-A KUBE-NODE-PORT -p sctp -m comment --comment \"Kubernetes nodeport SCTP port for masquerade purpose " \
           "with type 'hash ip:port'\" -m set --match-set KUBE-NODE-PORT-SCTP-HASH dst,dst -j KUBE-MARK-MASQ" \
           in rules(text, "nat")


def test_health_check_node_port_only_for_load_balancers_with_local_policy():
    local = load_balancer("a", "172.30.0.1", 3001, external_traffic_policy="Local", health_check_node_port=30000)
    cluster_policy = load_balancer("b", "172.30.0.2", 3002, health_check_node_port=30001)
    text = write(cluster([local, cluster_policy]))
    assert entries(text, "KUBE-HEALTH-CHECK-NODE-PORT") == ["30000"]


def test_headless_services_are_skipped():
    text = write(cluster([service("svc1", "None")], [endpoints("svc1", "10.180.0.1")]))
    assert ipvsadm(text) == []
    assert nonempty_sets(text) == set()


# --- scheduler ---------------------------------------------------------------------------------

@pytest.mark.parametrize("scheduler, expected", [
    ("", "-s rr -p 300"), ("rr", "-s rr -p 300"), ("lc", "-s lc -p 300"), ("sh", "-s sh -p 300"),
    # kube-proxy adds FlagSourceHash (IP_VS_SVC_F_SCHED2) for mh only: mh hashes the port too.
    ("mh", "-s mh -p 300 -b mh-port"),
])
def test_scheduler_comes_from_the_configuration(scheduler, expected):
    text = write(cluster([service("svc1", "172.30.0.41", affinity_timeout=300)], ipvs_scheduler=scheduler))
    assert ipvsadm(text) == [f"-A -t 172.30.0.41:80 {expected}"]


def test_unknown_scheduler_is_bad_input():
    with pytest.raises(InputError) as error:
        write(cluster([service("svc1", "172.30.0.41")], ipvs_scheduler="foo"))
    assert "unknown scheduler 'foo'" in error.value.message
    assert error.value.field == "ipvs.scheduler"


# --- ipsets ------------------------------------------------------------------------------------

def test_every_set_is_created_in_kube_proxy_order_with_its_type():
    created = [line for line in sections(write(cluster([])))[SECTION_IPSET] if line.startswith("create ")]
    assert [line.split()[1:3] for line in created] == [[name, kind] for name, kind, _ in IPSETS]
    assert created[0] == "create KUBE-LOOP-BACK hash:ip,port,ip family inet hashsize 1024 maxelem 65536"
    assert "create KUBE-NODE-PORT-TCP bitmap:port range 0-65535" in created
    assert "create KUBE-IPVS-IPS hash:ip family inet hashsize 1024 maxelem 65536" in created
    assert len(created) == 17


# --- iptables ----------------------------------------------------------------------------------

def test_iptables_rules_of_a_clusterip_only_cluster():
    text = write(cluster([service("svc1", "172.30.0.41")], [endpoints("svc1", "10.180.0.1")]), TEST)
    cluster_ip_comment = '-m comment --comment "Kubernetes service cluster ip + port for masquerade purpose"'
    assert rules(text, "nat") == [
        "-A KUBE-SERVICES -s 127.0.0.0/8 -j RETURN",
        f"-A KUBE-SERVICES {cluster_ip_comment} -m set --match-set KUBE-CLUSTER-IP dst,dst ! -s 10.0.0.0/8 "
        "-j KUBE-MARK-MASQ",
        "-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT",
        "-A KUBE-LOAD-BALANCER -j KUBE-MARK-MASQ",
        "-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT",
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE',
        "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000",
    ]
    assert rules(text, "filter") == [
        "-A KUBE-SOURCE-RANGES-FIREWALL -j DROP",
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT',
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" '
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        '-A KUBE-NODE-PORT -m comment --comment "Kubernetes health check node port" '
        "-m set --match-set KUBE-HEALTH-CHECK-NODE-PORT dst -j ACCEPT",
        "-A KUBE-IPVS-FILTER -m set --match-set KUBE-LOAD-BALANCER dst,dst -j RETURN",
        "-A KUBE-IPVS-FILTER -m set --match-set KUBE-CLUSTER-IP dst,dst -j RETURN",
        "-A KUBE-IPVS-FILTER -m set --match-set KUBE-EXTERNAL-IP dst,dst -j RETURN",
        "-A KUBE-IPVS-FILTER -m set --match-set KUBE-EXTERNAL-IP-LOCAL dst,dst -j RETURN",
        "-A KUBE-IPVS-FILTER -m set --match-set KUBE-HEALTH-CHECK-NODE-PORT dst -j RETURN",
        "-A KUBE-IPVS-FILTER -m conntrack --ctstate NEW -m set --match-set KUBE-IPVS-IPS dst -j REJECT",
    ]
    lines = sections(text)[SECTION_IPTABLES]
    assert lines[:6] == ["*nat", ":KUBE-SERVICES - [0:0]", ":KUBE-POSTROUTING - [0:0]", ":KUBE-NODE-PORT - [0:0]",
                         ":KUBE-LOAD-BALANCER - [0:0]", ":KUBE-MARK-MASQ - [0:0]"]


@pytest.mark.parametrize("config, expected", [
    (dict(masquerade_all=True), "-m set --match-set KUBE-CLUSTER-IP dst,dst -j KUBE-MARK-MASQ"),
    (dict(cluster_cidr=""), "-m set --match-set KUBE-CLUSTER-IP src,dst -j KUBE-MARK-MASQ"),
])
def test_cluster_ip_masquerade_variants(config, expected):
    text = write(cluster([service("svc1", "172.30.0.41")], **config))
    assert [rule for rule in rules(text, "nat") if "KUBE-MARK-MASQ" in rule and "CLUSTER-IP" in rule] == [
        '-A KUBE-SERVICES -m comment --comment "Kubernetes service cluster ip + port for masquerade purpose" '
        + expected]


def test_external_ips_are_masqueraded_and_accepted():
    text = write(cluster([service("svc1", "172.30.0.41", external_ips=["192.168.99.11"])]))
    match = ('-m comment --comment "Kubernetes service external ip + port for masquerade and filter purpose" '
             "-m set --match-set KUBE-EXTERNAL-IP dst,dst")
    assert [rule for rule in rules(text, "nat") if "KUBE-EXTERNAL-IP " in rule] == [
        f"-A KUBE-SERVICES {match} -j KUBE-MARK-MASQ",
        f"-A KUBE-SERVICES {match} -m physdev ! --physdev-is-in -m addrtype ! --src-type LOCAL -j ACCEPT",
        f"-A KUBE-SERVICES {match} -m addrtype --dst-type LOCAL -j ACCEPT",
    ]


def test_kernel_mark_format_and_random_fully():
    text = write(cluster([], random_fully=True))
    assert "-A KUBE-MARK-MASQ -j MARK --or-mark 0x004000" in rules(text, "nat")
    assert ('-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
            "-j MASQUERADE --random-fully") in rules(text, "nat")


def mixed_cluster(copies):
    """``copies`` of each service kind, every one with a remote and a local endpoint."""
    services, slices = [], []
    for i in range(copies):
        kinds = [service(f"c{i}", f"172.30.1.{i + 1}"),
                 service(f"u{i}", f"172.30.2.{i + 1}", protocol="udp", node_port=31000 + i),
                 service(f"s{i}", f"172.30.3.{i + 1}", protocol="sctp", node_port=32000 + i),
                 load_balancer(f"l{i}", f"172.30.4.{i + 1}", 30000 + i, load_balancer_ips=[f"1.2.3.{i + 1}"],
                               load_balancer_source_ranges=["203.0.113.0/25"], external_ips=[f"192.168.99.{i + 1}"],
                               external_traffic_policy="Local", health_check_node_port=30500 + i)]
        for svc in kinds:
            services.append(svc)
            proto = svc.ports[0].protocol
            slices.append(endpoints(svc.name, (f"10.{i + 1}.{len(slices) % 250}.1", NODE),
                                    f"10.{i + 1}.{len(slices) % 250}.2", protocol=proto))
    return cluster(services, slices, node_ips=[NODE_IP])


def rule_counts_but_out_filter(text):
    return {table: sum("KUBE-IPVS-OUT-FILTER" not in rule for rule in rules(text, table)) for table in ("nat", "filter")}


def test_iptables_rule_count_does_not_grow_with_services():
    small, large = write(mixed_cluster(1)), write(mixed_cluster(12))
    assert len(ipvsadm(large)) > 10 * len(ipvsadm(small)) > 0
    assert rule_counts_but_out_filter(small) == rule_counts_but_out_filter(large)
    # The one exception: an LB IP whose source ranges leave out the node gets an OUT-FILTER rule.
    constant = rule_counts_but_out_filter(small)
    assert iptables.load(iptables_text(large)).rule_counts() == {"nat": constant["nat"],
                                                                  "filter": constant["filter"] + 12}


@pytest.mark.parametrize("jump_rules", [False, True])
def test_iptables_section_loads_with_the_iptables_loader(jump_rules):
    text = write(mixed_cluster(2), IpvsWriterOptions(include_jump_rules=jump_rules))
    ruleset = iptables.load(iptables_text(text), "ipvs")
    assert ruleset.chains("nat")[-5:] == ["KUBE-SERVICES", "KUBE-POSTROUTING", "KUBE-NODE-PORT",
                                          "KUBE-LOAD-BALANCER", "KUBE-MARK-MASQ"]
    assert sorted(ruleset.tables["filter"].set_names) == [
        "KUBE-CLUSTER-IP", "KUBE-EXTERNAL-IP", "KUBE-EXTERNAL-IP-LOCAL", "KUBE-HEALTH-CHECK-NODE-PORT",
        "KUBE-IPVS-IPS", "KUBE-LOAD-BALANCER", "KUBE-LOAD-BALANCER-FW", "KUBE-LOAD-BALANCER-SOURCE-CIDR"]
    jumps = [rule for rule in rules(text, "filter") if rule.split()[1] in ("INPUT", "FORWARD", "OUTPUT")]
    if jump_rules:
        assert jumps[:3] == [
            '-A INPUT -m comment --comment "kubernetes ipvs access filter" -j KUBE-IPVS-FILTER',
            '-A INPUT -m comment --comment "kube-proxy firewall rules" -j KUBE-PROXY-FIREWALL',
            '-A INPUT -m comment --comment "kubernetes health check rules" -j KUBE-NODE-PORT']
        assert ruleset.rule_counts()["nat"] == len(rules(text, "nat"))
    else:
        assert jumps == []


# --- the whole output --------------------------------------------------------------------------

def test_sections_in_order_after_the_sysctl_comments():
    lines = write(cluster([])).splitlines()
    markers = [line for line in lines if line.startswith("# kpbench: ")]
    assert markers == list(SECTIONS)
    preamble = lines[:lines.index(SECTION_IPVSADM)]
    assert "# sysctl net/ipv4/vs/conntrack=1" in preamble
    assert "# sysctl net/ipv4/vs/expire_nodest_conn=1" in preamble
    assert all(line.startswith("# ") for line in preamble)


def test_round_trip_gives_the_clusters_servers_sets_and_addresses():
    lb = load_balancer("svc2", "172.30.0.42", 3001, load_balancer_ips=["1.2.3.4"], affinity_timeout=10800,
                       load_balancer_source_ranges=["203.0.113.0/25"])
    text = write(cluster([service("svc1", "172.30.0.41"), lb],
                         [endpoints("svc1", "10.180.0.1", "10.180.0.2"), endpoints("svc2", ("10.180.0.3", NODE))]))
    ruleset = load(text, "ipvs.txt")

    def vs(addr, port, *eps, timeout=0):
        return VirtualService(TCP, ip_to_int(addr), port, "rr", flags=FLAG_PERSISTENT if timeout else 0,
                              timeout=timeout, real_servers=[RealServer(ip_to_int(ep), 80, 1, FWD_MASQ) for ep in eps])

    assert ruleset.services == [
        vs("1.2.3.4", 80, "10.180.0.3", timeout=10800),
        vs("172.30.0.41", 80, "10.180.0.1", "10.180.0.2"),
        vs("172.30.0.42", 80, "10.180.0.3", timeout=10800),
        vs(NODE_IP, 3001, "10.180.0.3", timeout=10800),
    ]
    ip = ip_to_int
    sets = {name: ipset.entries for name, ipset in ruleset.ipsets.items() if ipset.entries}
    assert sets == {
        "KUBE-LOOP-BACK": [(ip("10.180.0.3"), TCP, 80, ip("10.180.0.3"))],
        "KUBE-CLUSTER-IP": [(ip("172.30.0.41"), TCP, 80), (ip("172.30.0.42"), TCP, 80)],
        "KUBE-LOAD-BALANCER": [(ip("1.2.3.4"), TCP, 80)],
        "KUBE-LOAD-BALANCER-FW": [(ip("1.2.3.4"), TCP, 80)],
        "KUBE-LOAD-BALANCER-SOURCE-CIDR": [(ip("1.2.3.4"), TCP, 80, (ip("203.0.113.0"), 25))],
        "KUBE-NODE-PORT-TCP": [(3001,)],
        "KUBE-IPVS-IPS": [(ip("1.2.3.4"),), (ip("172.30.0.41"),), (ip("172.30.0.42"),)],
    }
    assert ruleset.addresses == [ip("172.30.0.41"), ip("172.30.0.42"), ip("1.2.3.4")]
    assert ruleset.iptables.rule_counts() == {"nat": len(rules(text, "nat")), "filter": len(rules(text, "filter"))}


@pytest.mark.parametrize("svc, field", [
    (service("svc1", "172.30.0.300"), "spec.clusterIP"),
    (service("svc1", "172.30.0.41", external_ips=["x"]), "spec.externalIPs"),
    (load_balancer("svc1", "172.30.0.41", 3001, load_balancer_source_ranges=["1.2.3.4/40"]),
     "spec.loadBalancerSourceRanges"),
    (service("svc1", "172.30.0.41", protocol="icmp"), "spec.ports[].protocol"),
])
def test_bad_service_fields_are_input_errors(svc, field):
    with pytest.raises(InputError) as error:
        write(cluster([svc]))
    assert error.value.field == field
    assert error.value.where == "Service ns1/svc1"


@pytest.mark.parametrize("seed, scheduler", [(1, "rr"), (2, "mh"), (3, "wlc")])
def test_generated_clusters_round_trip_through_the_loader(seed, scheduler):
    generated = generate(150, 4, 6, seed=seed, distribution="heavy-tailed")
    generated.config.ipvs_scheduler = scheduler
    text = write(generated)
    ruleset = load(text)
    parts = {marker: "".join(line + "\n" for line in lines) for marker, lines in sections(text).items()}
    # What the loader read prints back as the very same text: nothing was lost or reordered.
    assert dump_ipvsadm(ruleset.services) == parts[SECTION_IPVSADM]
    assert dump_ipset(list(ruleset.ipsets.values())) == parts[SECTION_IPSET]
    assert {(a,) for a in ruleset.addresses} == set(ruleset.ipsets["KUBE-IPVS-IPS"].entries)
    assert {svc.scheduler for svc in ruleset.services} == {scheduler}
    cluster_ips = {(addr, proto, port) for addr, proto, port in ruleset.ipsets["KUBE-CLUSTER-IP"].entries}
    assert cluster_ips <= {(svc.addr, svc.proto, svc.port) for svc in ruleset.services}
    assert all((rs.weight, rs.forward) == (1, FWD_MASQ) for svc in ruleset.services for rs in svc.real_servers)
