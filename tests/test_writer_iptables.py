"""The iptables writer against kube-proxy's iptables mode (shared/docs/kube-proxy-rules.md §a).

Clusters are built by hand. Unless a test says otherwise, the host is the one kube-proxy's unit
tests fake (NewFakeProxier): IPv4, node 192.168.0.2, cluster CIDR 10.0.0.0/8 as the
local-traffic detector, nfacct available, no --random-fully, localhost NodePorts on, and the
mark written 0x4000.
"""
import copy
import random
import re

import pytest

from bench.cluster.model import (Cluster, Endpoint, EndpointPort, EndpointSlice, Node,
                                 ProxyConfig, Service, ServicePort)
from bench.errors import InputError
from bench.proxies.iptables import (Syncer, WriterOptions, chain_counts, compute_probability,
                                    endpoint_chain, endpoint_chain_hash, external_chain,
                                    firewall_chain, local_chain, port_proto_hash, rule_counts,
                                    service_chain, write_full, write_partial)

NODE, OTHER_NODE = "node1", "node2"
NODE_IP = "192.168.0.2"
POD_CIDR = "10.0.0.0/8"
TEST = WriterOptions(mark_format="test")
SVC1 = "KUBE-SVC-XPGD46QRK7WJZT7O"  # ns1/svc1:p80 tcp
SEP1 = "KUBE-SEP-SXIVWICOYRO3J4NJ"  # ns1/svc1:p80 tcp 10.180.0.1:80
NODEPORTS_COMMENT = '-m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain"'
NODEPORTS_JUMP = f"-A KUBE-SERVICES {NODEPORTS_COMMENT} -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"


# --- building clusters -------------------------------------------------------------------------

def service(name, cluster_ip, *, node_port=0, protocol="tcp", **fields):
    """Service ns1/<name> with one port p80 (80/tcp unless ``protocol`` says otherwise)."""
    kind = fields.pop("type", "NodePort" if node_port else "ClusterIP")
    return Service("ns1", name, kind, cluster_ip, [ServicePort("p80", protocol, 80, 80, node_port)], **fields)


def endpoints(service_name, *addresses, port=80, port_name="p80", protocol="tcp", node=OTHER_NODE,
              **conditions):
    """An EndpointSlice for ``service_name``; ``addresses`` are IPs, or (IP, node) pairs."""
    eps = [Endpoint(*(a if isinstance(a, tuple) else (a, node)), **conditions) for a in addresses]
    return EndpointSlice("ns1", f"{service_name}-abc", service_name, [EndpointPort(port_name, protocol, port)], eps)


def kube_proxy_test_config(**overrides):
    """The host NewFakeProxier gives kube-proxy's unit tests (see the module docstring)."""
    values = dict(cluster_cidr=POD_CIDR, node_ips=[NODE_IP], nfacct=True, random_fully=False,
                  localhost_nodeports=True)
    values.update(overrides)
    return ProxyConfig(**values)


def cluster(services, slices=(), **config):
    return Cluster(list(services), list(slices), [Node(NODE, [NODE_IP]), Node(OTHER_NODE, ["192.168.0.3"])],
                   kube_proxy_test_config(**config), node_name=NODE)


def clusterip_cluster(services, endpoints_per_service, **config):
    """``services`` ClusterIP services with ``endpoints_per_service`` remote endpoints each."""
    svcs, slices = [], []
    for s in range(services):
        svcs.append(service(f"svc{s}", f"172.30.{s // 250}.{s % 250 + 1}"))
        ips = [f"10.{s // 250 + 1}.{s % 250}.{e + 1}" for e in range(endpoints_per_service)]
        if ips:
            slices.append(endpoints(f"svc{s}", *ips))
    return cluster(svcs, slices, **config)


# --- reading payloads --------------------------------------------------------------------------

def table(payload, name):
    """The lines of one table, between ``*name`` and its COMMIT."""
    lines = payload.splitlines()
    start = lines.index(f"*{name}")
    return lines[start + 1:lines.index("COMMIT", start)]


def rules(payload, name, chain):
    return [line for line in table(payload, name) if line.startswith(f"-A {chain} ")]


def chains(payload, name):
    return [line[1:].split()[0] for line in table(payload, name) if line.startswith(":")]


# --- names, hashes, probabilities --------------------------------------------------------------

@pytest.mark.parametrize("spn, proto, endpoint, expected", [
    ("ns1/svc1:p80", "tcp", None, "XPGD46QRK7WJZT7O"),
    ("ns1/svc1:p80", "tcp", "10.180.0.1:80", "SXIVWICOYRO3J4NJ"),
    ("ns4/svc4:p80", "tcp", None, "4SW47YFZTEDKD3PK"),
])
def test_chain_hashes_match_kube_proxy_test_vectors(spn, proto, endpoint, expected):
    if endpoint is None:
        assert port_proto_hash(spn, proto) == expected
    else:
        assert endpoint_chain_hash(spn, proto, endpoint) == expected


def test_chain_names_share_the_service_port_hash():
    assert service_chain("ns1/svc1:p80", "tcp") == SVC1
    assert local_chain("ns1/svc1:p80", "tcp") == "KUBE-SVL-XPGD46QRK7WJZT7O"
    assert external_chain("ns1/svc1:p80", "tcp") == "KUBE-EXT-XPGD46QRK7WJZT7O"
    assert firewall_chain("ns1/svc1:p80", "tcp") == "KUBE-FW-XPGD46QRK7WJZT7O"
    assert endpoint_chain("ns1/svc1:p80", "tcp", "10.180.0.1:80") == SEP1


@pytest.mark.parametrize("n, expected", [
    (1, "1.0000000000"), (2, "0.5000000000"), (10, "0.1000000000"), (1000, "0.0010000000"),
    (100000, "0.0000100000"), (100001, "0.0000099999"),
])
def test_probability_strings(n, expected):
    assert compute_probability(n) == expected


def test_three_endpoints_cascade_thirds_then_half_then_nothing():
    payload = write_full(cluster([service("svc1", "172.30.0.41")],
                                 [endpoints("svc1", "10.180.0.1", "10.180.0.2", "10.180.0.3")]), TEST)
    jumps = rules(payload, "nat", SVC1)[1:]  # after the masquerade rule
    probabilities = [re.search(r"--probability (\S+)", rule) for rule in jumps]
    assert [m.group(1) if m else None for m in probabilities] == ["0.3333333333", "0.5000000000", None]


# --- rule counts -------------------------------------------------------------------------------

# number_generated_rules_test.go measured these for ClusterIP services (≈v1.27–1.28). That
# proxier wrote no KUBE-FIREWALL rule and no nfacct matches, so they hold with localhost
# NodePorts and nfacct off; filter is then KUBE-FORWARD's 3 rules in every row.
MEASURED = [(0, 0, 5), (1, 1, 10), (1, 2, 13), (1, 10, 37), (10, 1, 55), (10, 2, 85), (10, 10, 325)]


@pytest.mark.parametrize("services, eps, nat", MEASURED + [(3, 7, None), (25, 3, None), (40, 1, None)])
def test_clusterip_rule_and_chain_counts_follow_the_formula(services, eps, nat):
    payload = write_full(clusterip_cluster(services, eps, localhost_nodeports=False, nfacct=False), TEST)
    counts = rule_counts(payload)
    assert counts["nat"] == 5 + services * (2 + 3 * eps)
    if nat is not None:
        assert counts["nat"] == nat
    assert counts["filter"] == 3
    assert chain_counts(payload)["nat"] == 4 + services * (1 + eps)


def test_localhost_nodeports_add_the_kube_firewall_rule():
    counts = rule_counts(write_full(clusterip_cluster(2, 2), TEST))
    assert counts == {"filter": 4, "nat": 5 + 2 * (2 + 3 * 2)}


def test_each_service_without_endpoints_adds_one_filter_rule():
    payload = write_full(clusterip_cluster(10, 0, localhost_nodeports=False), TEST)
    assert rule_counts(payload) == {"filter": 13, "nat": 5}


def test_rule_counts_needs_a_table():
    with pytest.raises(InputError, match="line 1"):
        rule_counts("-A KUBE-SERVICES -j ACCEPT\n")


# --- a whole payload ---------------------------------------------------------------------------

def test_full_payload_of_a_clusterip_service_with_two_endpoints():
    payload = write_full(cluster([service("svc1", "172.30.0.41")],
                                 [endpoints("svc1", "10.180.0.1", "10.180.2.1")]), TEST)
    sep2 = endpoint_chain("ns1/svc1:p80", "tcp", "10.180.2.1:80")
    assert sep2 == "KUBE-SEP-ZX7GRIZKSNUQ3LAJ"
    assert payload == f"""\
*filter
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-FIREWALL - [0:0]
-A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
-A KUBE-FORWARD -m conntrack --ctstate INVALID -m nfacct --nfacct-name ct_state_invalid_dropped_pkts -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
*nat
:KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
:{SVC1} - [0:0]
:{SEP1} - [0:0]
:{sep2} - [0:0]
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j {SVC1}
-A {SVC1} -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A {SVC1} -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -m statistic --mode random --probability 0.5000000000 -j {SEP1}
-A {SVC1} -m comment --comment "ns1/svc1:p80 -> 10.180.2.1:80" -j {sep2}
-A {SEP1} -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ
-A {SEP1} -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80
-A {sep2} -m comment --comment ns1/svc1:p80 -s 10.180.2.1 -j KUBE-MARK-MASQ
-A {sep2} -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.2.1:80
{NODEPORTS_JUMP}
COMMIT
"""


def test_kernel_mark_format_pads_like_percent_hash_08x():
    payload = write_full(clusterip_cluster(1, 1))
    assert "-A KUBE-MARK-MASQ -j MARK --or-mark 0x004000" in table(payload, "nat")
    assert "-A KUBE-POSTROUTING -m mark ! --mark 0x004000/0x004000 -j RETURN" in table(payload, "nat")
    other_bit = write_full(clusterip_cluster(1, 1, masquerade_bit=0))
    assert "-A KUBE-MARK-MASQ -j MARK --or-mark 0x000001" in table(other_bit, "nat")


def test_random_fully_is_appended_to_masquerade_when_supported():
    payload = write_full(clusterip_cluster(0, 0, random_fully=True), TEST)
    assert ('-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
            '-j MASQUERADE --random-fully') in table(payload, "nat")


def test_forward_chain_variants():
    liberal = write_full(clusterip_cluster(0, 0, tcp_be_liberal=True), TEST)
    assert not any("INVALID" in rule for rule in rules(liberal, "filter", "KUBE-FORWARD"))
    assert len(rules(liberal, "filter", "KUBE-FORWARD")) == 2
    no_nfacct = write_full(clusterip_cluster(0, 0, nfacct=False), TEST)
    assert rules(no_nfacct, "filter", "KUBE-FORWARD")[0] == "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP"


# --- cluster IPs -------------------------------------------------------------------------------

def _masquerade_rule(payload):
    return [r for r in rules(payload, "nat", SVC1) if r.endswith("-j KUBE-MARK-MASQ")]


def test_masquerade_all_masquerades_every_source():
    payload = write_full(cluster([service("svc1", "172.30.0.41")], [endpoints("svc1", "10.180.0.1")],
                                 masquerade_all=True), TEST)
    assert _masquerade_rule(payload) == [
        f'-A {SVC1} -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-MARK-MASQ']


def test_no_local_traffic_detector_omits_the_masquerade_rule():
    payload = write_full(cluster([service("svc1", "172.30.0.41")], [endpoints("svc1", "10.180.0.1")],
                                 cluster_cidr=""), TEST)
    assert _masquerade_rule(payload) == []
    assert rule_counts(payload)["nat"] == 5 + 1 + 1 + 2


def test_client_ip_affinity_checks_recent_lists_before_balancing():
    payload = write_full(cluster([service("svc1", "172.30.0.41", affinity_timeout=10800)],
                                 [endpoints("svc1", "10.180.0.1", "10.180.2.1")]), TEST)
    sep2 = endpoint_chain("ns1/svc1:p80", "tcp", "10.180.2.1:80")
    assert rules(payload, "nat", SVC1)[1:] == [
        f'-A {SVC1} -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -m recent --name {SEP1} --rcheck --seconds 10800 --reap -j {SEP1}',
        f'-A {SVC1} -m comment --comment "ns1/svc1:p80 -> 10.180.2.1:80" -m recent --name {sep2} --rcheck --seconds 10800 --reap -j {sep2}',
        f'-A {SVC1} -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -m statistic --mode random --probability 0.5000000000 -j {SEP1}',
        f'-A {SVC1} -m comment --comment "ns1/svc1:p80 -> 10.180.2.1:80" -j {sep2}',
    ]
    assert rules(payload, "nat", SEP1)[1] == (
        f"-A {SEP1} -m comment --comment ns1/svc1:p80 -m recent --name {SEP1} --set "
        "-m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80")


def test_unnamed_udp_port_uses_bare_service_name():
    svc = Service("ns1", "dns", "ClusterIP", "172.30.0.10", [ServicePort("", "udp", 53, 53)])
    eps = endpoints("dns", "10.180.0.7", port=5353, port_name="", protocol="udp")
    payload = write_full(cluster([svc], [eps]), TEST)
    svc_chain, sep = service_chain("ns1/dns", "udp"), endpoint_chain("ns1/dns", "udp", "10.180.0.7:5353")
    assert rules(payload, "nat", "KUBE-SERVICES")[0] == (
        f'-A KUBE-SERVICES -m comment --comment "ns1/dns cluster IP" -m udp -p udp -d 172.30.0.10 --dport 53 -j {svc_chain}')
    assert rules(payload, "nat", sep) == [
        f"-A {sep} -m comment --comment ns1/dns -s 10.180.0.7 -j KUBE-MARK-MASQ",
        f"-A {sep} -m comment --comment ns1/dns -m udp -p udp -j DNAT --to-destination 10.180.0.7:5353",
    ]


def test_headless_services_get_no_rules():
    payload = write_full(cluster([service("db", "None")], [endpoints("db", "10.180.0.1")]), TEST)
    assert rule_counts(payload) == rule_counts(write_full(cluster([]), TEST))


# --- large clusters ----------------------------------------------------------------------------

def _two_services(first_endpoints, second_endpoints):
    ips = [f"10.{1 + i // 250}.{i % 250}.1" for i in range(first_endpoints + second_endpoints)]
    return cluster([service("svc1", "172.30.0.41"), service("svc2", "172.30.0.42")],
                   [endpoints("svc1", *ips[:first_endpoints]), endpoints("svc2", *ips[first_endpoints:])])


def test_large_cluster_mode_drops_endpoint_comments_above_1000_endpoints():
    small = write_full(_two_services(500, 500), TEST)
    large = write_full(_two_services(500, 501), TEST)
    assert rule_counts(small)["nat"] == 5 + 2 * 2 + 3 * 1000
    assert rule_counts(large)["nat"] == 5 + 2 * 2 + 3 * 1001

    def endpoint_rules(payload):
        return [r for r in table(payload, "nat") if r.startswith("-A KUBE-SEP-") or " -j KUBE-SEP-" in r]

    assert len(endpoint_rules(small)) == 3000 and len(endpoint_rules(large)) == 3003
    assert all("-m comment" in r for r in endpoint_rules(small))
    assert not any("-m comment" in r for r in endpoint_rules(large))
    first_sep = endpoint_chain("ns1/svc1:p80", "tcp", "10.1.0.1:80")
    assert rules(large, "nat", first_sep) == [
        f"-A {first_sep} -s 10.1.0.1 -j KUBE-MARK-MASQ",
        f"-A {first_sep} -m tcp -p tcp -j DNAT --to-destination 10.1.0.1:80",
    ]
    # The service-level rules keep their comments.
    assert rules(large, "nat", "KUBE-SERVICES")[0].startswith('-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP"')
    assert rules(large, "nat", SVC1)[0].startswith(f'-A {SVC1} -m comment --comment "ns1/svc1:p80 cluster IP"')


# --- services without (local) endpoints --------------------------------------------------------

def service_filter_rules(payload):
    """Filter rules other than the fixed KUBE-FIREWALL and KUBE-FORWARD ones."""
    return [r for r in table(payload, "filter")
            if r.startswith("-A ") and not r.startswith(("-A KUBE-FIREWALL ", "-A KUBE-FORWARD "))]


def _load_balancer(name, cluster_ip, node_port, **fields):
    return service(name, cluster_ip, node_port=node_port, type="LoadBalancer", **fields)


def test_no_endpoints_rejects_every_destination_in_filter_and_writes_no_nat():
    svc = _load_balancer("svc3", "172.30.0.43", 3003, external_ips=["192.168.99.11"],
                         load_balancer_ips=["1.2.3.4"], load_balancer_source_ranges=["203.0.113.0/25"])
    payload = write_full(cluster([svc]), TEST)
    comment = '-m comment --comment "ns1/svc3:p80 has no endpoints"'
    assert service_filter_rules(payload) == [
        f"-A KUBE-SERVICES {comment} -m tcp -p tcp -d 172.30.0.43 --dport 80 -j REJECT",
        f"-A KUBE-EXTERNAL-SERVICES {comment} -m tcp -p tcp -d 192.168.99.11 --dport 80 -j REJECT",
        f"-A KUBE-EXTERNAL-SERVICES {comment} -m tcp -p tcp -d 1.2.3.4 --dport 80 -j REJECT",
        f"-A KUBE-EXTERNAL-SERVICES {comment} -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 3003 -j REJECT",
    ]
    assert chains(payload, "nat") == ["KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"]
    assert rule_counts(payload)["nat"] == 5


def test_not_ready_endpoints_do_not_count_but_serving_terminating_ones_do():
    not_ready = write_full(cluster([service("svc1", "172.30.0.41")],
                                   [endpoints("svc1", "10.180.0.1", ready=False, serving=False)]), TEST)
    assert "has no endpoints" in service_filter_rules(not_ready)[0]
    terminating = write_full(cluster([service("svc1", "172.30.0.41")],
                                     [endpoints("svc1", "10.180.0.1", ready=False, terminating=True)]), TEST)
    assert service_filter_rules(terminating) == []
    assert SEP1 in chains(terminating, "nat")


def test_internal_policy_local_without_local_endpoints_drops_cluster_ip_traffic():
    svc = service("svc1", "172.30.0.41", internal_traffic_policy="Local")
    payload = write_full(cluster([svc], [endpoints("svc1", "10.180.0.1", node=OTHER_NODE)]), TEST)
    assert service_filter_rules(payload) == [
        '-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 has no local endpoints" '
        "-m tcp -p tcp -d 172.30.0.41 --dport 80 -j DROP"]
    assert rule_counts(payload)["nat"] == 5
    assert len(chains(payload, "nat")) == 4


def test_internal_policy_local_sends_cluster_ip_traffic_to_the_svl_chain():
    svc = service("svc1", "172.30.0.41", internal_traffic_policy="Local")
    payload = write_full(cluster([svc], [endpoints("svc1", ("10.180.0.1", NODE), ("10.180.2.1", OTHER_NODE))]), TEST)
    svl = local_chain("ns1/svc1:p80", "tcp")
    assert chains(payload, "nat")[4:] == [svl, SEP1]
    assert rules(payload, "nat", "KUBE-SERVICES")[0].endswith(f"--dport 80 -j {svl}")
    assert rules(payload, "nat", svl) == [
        f'-A {svl} -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ',
        f'-A {svl} -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -j {SEP1}',
    ]


SVC4 = "ns1/svc4:p80"
H4 = port_proto_hash(SVC4, "tcp")


def _etp_local_service(**fields):
    return _load_balancer("svc4", "172.30.0.44", 3004, load_balancer_ips=["5.6.7.8"],
                          external_traffic_policy="Local", health_check_node_port=30000, **fields)


def _etp_local_short_circuit_rules(ext):
    return [
        f'-A {ext} -m comment --comment "pod traffic for {SVC4} external destinations" -s 10.0.0.0/8 -j KUBE-SVC-{H4}',
        f'-A {ext} -m comment --comment "masquerade LOCAL traffic for {SVC4} external destinations" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ',
        f'-A {ext} -m comment --comment "route LOCAL traffic for {SVC4} external destinations" -m addrtype --src-type LOCAL -j KUBE-SVC-{H4}',
    ]


def test_external_policy_local_without_local_endpoints():
    svc = _etp_local_service()
    payload = write_full(cluster([svc], [endpoints("svc4", "10.180.2.4", node=OTHER_NODE)]), TEST)
    ext = f"KUBE-EXT-{H4}"
    assert rules(payload, "nat", ext) == _etp_local_short_circuit_rules(ext)
    assert f"KUBE-SVL-{H4}" not in chains(payload, "nat")
    assert rules(payload, "nat", "KUBE-SERVICES")[:2] == [
        f'-A KUBE-SERVICES -m comment --comment "{SVC4} cluster IP" -m tcp -p tcp -d 172.30.0.44 --dport 80 -j KUBE-SVC-{H4}',
        f'-A KUBE-SERVICES -m comment --comment "{SVC4} loadbalancer IP" -m tcp -p tcp -d 5.6.7.8 --dport 80 -j {ext}',
    ]
    comment = f'-m comment --comment "{SVC4} has no local endpoints"'
    assert service_filter_rules(payload) == [
        f"-A KUBE-EXTERNAL-SERVICES {comment} -m tcp -p tcp -d 5.6.7.8 --dport 80 -j DROP",
        f"-A KUBE-EXTERNAL-SERVICES {comment} -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 3004 -j DROP",
        f'-A KUBE-NODEPORTS -m comment --comment "{SVC4} health check node port" -m tcp -p tcp --dport 30000 -j ACCEPT',
    ]


def test_external_policy_local_with_local_endpoints():
    svc = _etp_local_service()
    payload = write_full(cluster([svc], [endpoints("svc4", ("10.180.0.4", NODE), ("10.180.2.4", OTHER_NODE))]), TEST)
    ext, svl = f"KUBE-EXT-{H4}", f"KUBE-SVL-{H4}"
    local_sep = endpoint_chain(SVC4, "tcp", "10.180.0.4:80")
    remote_sep = endpoint_chain(SVC4, "tcp", "10.180.2.4:80")
    assert chains(payload, "nat")[4:] == [ext, f"KUBE-SVC-{H4}", svl, local_sep, remote_sep]
    assert rules(payload, "nat", ext) == _etp_local_short_circuit_rules(ext) + [f"-A {ext} -j {svl}"]
    assert rules(payload, "nat", svl) == [f'-A {svl} -m comment --comment "{SVC4} -> 10.180.0.4:80" -j {local_sep}']
    assert service_filter_rules(payload) == [
        f'-A KUBE-NODEPORTS -m comment --comment "{SVC4} health check node port" -m tcp -p tcp --dport 30000 -j ACCEPT']


def test_local_policy_falls_back_to_terminating_local_endpoints_and_both_get_sep_chains():
    # Ready endpoints exist only remotely, so the Cluster policy uses them while the Local
    # policy serves from the local serving-terminating one.
    local = Endpoint("10.180.0.4", NODE, ready=False, serving=True, terminating=True)
    remote = Endpoint("10.180.2.4", OTHER_NODE)
    eps = EndpointSlice("ns1", "svc4-abc", "svc4", [EndpointPort("p80", "tcp", 80)], [local, remote])
    payload = write_full(cluster([_etp_local_service()], [eps]), TEST)
    local_sep = endpoint_chain(SVC4, "tcp", "10.180.0.4:80")
    remote_sep = endpoint_chain(SVC4, "tcp", "10.180.2.4:80")
    assert [r.split()[-1] for r in rules(payload, "nat", f"KUBE-SVC-{H4}")[1:]] == [remote_sep]
    assert [r.split()[-1] for r in rules(payload, "nat", f"KUBE-SVL-{H4}")] == [local_sep]
    assert chains(payload, "nat")[-2:] == [local_sep, remote_sep]


def test_external_policy_local_without_detector_has_no_pod_short_circuit():
    payload = write_full(cluster([_etp_local_service()], [endpoints("svc4", ("10.180.0.4", NODE))],
                                 cluster_cidr=""), TEST)
    ext = f"KUBE-EXT-{H4}"
    assert rules(payload, "nat", ext) == _etp_local_short_circuit_rules(ext)[1:] + [f"-A {ext} -j KUBE-SVL-{H4}"]


# --- external destinations ---------------------------------------------------------------------

def test_external_ips_go_through_the_ext_chain_with_cluster_policy():
    svc = service("svc1", "172.30.0.41", external_ips=["192.168.99.11"])
    payload = write_full(cluster([svc], [endpoints("svc1", "10.180.0.1")]), TEST)
    ext = external_chain("ns1/svc1:p80", "tcp")
    assert rules(payload, "nat", "KUBE-SERVICES")[1] == (
        f'-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 external IP" -m tcp -p tcp -d 192.168.99.11 --dport 80 -j {ext}')
    assert rules(payload, "nat", ext) == [
        f'-A {ext} -m comment --comment "masquerade traffic for ns1/svc1:p80 external destinations" -j KUBE-MARK-MASQ',
        f"-A {ext} -j {SVC1}",
    ]
    assert chains(payload, "nat")[4:] == [ext, SVC1, SEP1]


def test_load_balancer_ip_without_source_ranges_jumps_to_ext():
    svc = _load_balancer("svc1", "172.30.0.41", 3001, load_balancer_ips=["1.2.3.4"])
    payload = write_full(cluster([svc], [endpoints("svc1", "10.180.0.1")]), TEST)
    ext = external_chain("ns1/svc1:p80", "tcp")
    assert rules(payload, "nat", "KUBE-SERVICES")[1] == (
        f'-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 loadbalancer IP" -m tcp -p tcp -d 1.2.3.4 --dport 80 -j {ext}')
    assert firewall_chain("ns1/svc1:p80", "tcp") not in chains(payload, "nat")
    assert rules(payload, "filter", "KUBE-PROXY-FIREWALL") == []


def test_load_balancer_source_ranges_go_through_the_fw_chain():
    svc = _load_balancer("svc1", "172.30.0.41", 3001, load_balancer_ips=["1.2.3.4", "1.2.3.5"],
                         load_balancer_source_ranges=["203.0.113.7/25", "198.51.100.0/24"])
    payload = write_full(cluster([svc], [endpoints("svc1", "10.180.0.1")]), TEST)
    fw, ext = firewall_chain("ns1/svc1:p80", "tcp"), external_chain("ns1/svc1:p80", "tcp")
    assert rules(payload, "nat", "KUBE-SERVICES")[1:3] == [
        f'-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 loadbalancer IP" -m tcp -p tcp -d {ip} --dport 80 -j {fw}'
        for ip in ("1.2.3.4", "1.2.3.5")]
    assert rules(payload, "nat", fw) == [  # the ranges are written masked, as Go prints them
        f'-A {fw} -m comment --comment "ns1/svc1:p80 loadbalancer IP" -s 203.0.113.0/25 -j {ext}',
        f'-A {fw} -m comment --comment "ns1/svc1:p80 loadbalancer IP" -s 198.51.100.0/24 -j {ext}',
        f'-A {fw} -m comment --comment "other traffic to ns1/svc1:p80 will be dropped by KUBE-PROXY-FIREWALL"',
    ]
    assert rules(payload, "filter", "KUBE-PROXY-FIREWALL") == [
        f'-A KUBE-PROXY-FIREWALL -m comment --comment "ns1/svc1:p80 traffic not accepted by {fw}" -m tcp -p tcp -d {ip} --dport 80 -j DROP'
        for ip in ("1.2.3.4", "1.2.3.5")]
    assert chains(payload, "nat")[4:] == [ext, fw, SVC1, SEP1]


def test_source_range_containing_the_node_ip_also_admits_the_lb_ips():
    svc = _load_balancer("svc1", "172.30.0.41", 3001, load_balancer_ips=["1.2.3.4", "1.2.3.5"],
                         load_balancer_source_ranges=["192.168.0.0/24"])
    payload = write_full(cluster([svc], [endpoints("svc1", "10.180.0.1")]), TEST)
    fw, ext = firewall_chain("ns1/svc1:p80", "tcp"), external_chain("ns1/svc1:p80", "tcp")
    assert rules(payload, "nat", fw)[:3] == [
        f'-A {fw} -m comment --comment "ns1/svc1:p80 loadbalancer IP" -s {source} -j {ext}'
        for source in ("192.168.0.0/24", "1.2.3.4", "1.2.3.5")]
    assert len(rules(payload, "nat", fw)) == 4


def test_kube_services_order_is_cluster_ip_external_ips_lb_ips_and_nodeports_last():
    svc = _load_balancer("svc1", "172.30.0.41", 3001, external_ips=["192.168.99.11", "192.168.99.12"],
                         load_balancer_ips=["1.2.3.4", "1.2.3.5"])
    other = service("svc2", "172.30.0.42")
    payload = write_full(cluster([other, svc], [endpoints("svc1", "10.180.0.1"), endpoints("svc2", "10.180.0.2")]), TEST)
    kinds = [re.search(r'"(\S+) (cluster IP|external IP|loadbalancer IP|service nodeports;)', r).group(1, 2)
             for r in rules(payload, "nat", "KUBE-SERVICES")]
    assert kinds == [("ns1/svc1:p80", "cluster IP"), ("ns1/svc1:p80", "external IP"),
                     ("ns1/svc1:p80", "external IP"), ("ns1/svc1:p80", "loadbalancer IP"),
                     ("ns1/svc1:p80", "loadbalancer IP"), ("ns1/svc2:p80", "cluster IP"),
                     ("kubernetes", "service nodeports;")]


# --- NodePorts ---------------------------------------------------------------------------------

def _node_port_payload(**config):
    svc = service("svc2", "172.30.0.42", node_port=3001)
    return write_full(cluster([svc], [endpoints("svc2", "10.180.0.2")], **config), TEST)


def test_node_port_with_localhost_nodeports_and_nfacct_is_counted_on_localhost_first():
    payload = _node_port_payload()
    ext = external_chain("ns1/svc2:p80", "tcp")
    assert rules(payload, "nat", "KUBE-NODEPORTS") == [
        f"-A KUBE-NODEPORTS -m comment --comment ns1/svc2:p80 -m tcp -p tcp -d 127.0.0.0/8 --dport 3001 "
        f"-m nfacct --nfacct-name localhost_nps_accepted_pkts -j {ext}",
        f"-A KUBE-NODEPORTS -m comment --comment ns1/svc2:p80 -m tcp -p tcp --dport 3001 -j {ext}",
    ]
    assert rules(payload, "nat", "KUBE-SERVICES")[-1] == NODEPORTS_JUMP


def test_node_port_without_nfacct_has_one_rule():
    payload = _node_port_payload(nfacct=False)
    assert len(rules(payload, "nat", "KUBE-NODEPORTS")) == 1


def test_localhost_nodeports_off_excludes_loopback_and_drops_the_localnet_rule():
    payload = _node_port_payload(localhost_nodeports=False)
    assert len(rules(payload, "nat", "KUBE-NODEPORTS")) == 1
    assert rules(payload, "nat", "KUBE-SERVICES")[-1] == NODEPORTS_JUMP.replace(
        "--dst-type LOCAL -j", "--dst-type LOCAL ! -d 127.0.0.0/8 -j")
    assert "KUBE-FIREWALL" not in chains(payload, "filter")


@pytest.mark.parametrize("addresses, localhost, destinations, firewall", [
    (["192.168.0.0/16"], True, ["192.168.0.2"], False),  # loopback not selected: localhost off
    (["127.0.0.0/8", "192.168.0.0/16"], True, ["127.0.0.1", "192.168.0.2"], True),
    (["127.0.0.0/8", "192.168.0.0/16"], False, ["192.168.0.2"], False),
    (["172.16.0.0/12"], True, [], False),
])
def test_node_port_addresses_write_one_rule_per_matching_node_ip(addresses, localhost, destinations, firewall):
    payload = _node_port_payload(node_port_addresses=addresses, localhost_nodeports=localhost)
    final = [r for r in rules(payload, "nat", "KUBE-SERVICES") if "service nodeports" in r]
    assert final == [f"-A KUBE-SERVICES {NODEPORTS_COMMENT} -d {ip} -j KUBE-NODEPORTS" for ip in destinations]
    assert ("KUBE-FIREWALL" in chains(payload, "filter")) is firewall
    assert len(rules(payload, "nat", "KUBE-NODEPORTS")) == (2 if firewall else 1)


# --- jump rules --------------------------------------------------------------------------------

def test_jump_rules_are_written_as_iptables_save_shows_them():
    payload = write_full(clusterip_cluster(1, 1), WriterOptions(include_jump_rules=True, mark_format="test"))
    assert table(payload, "filter")[:3] == [":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    builtin = [r for r in table(payload, "filter") if r.startswith(("-A INPUT ", "-A FORWARD ", "-A OUTPUT "))]
    new = "-m conntrack --ctstate NEW"
    assert builtin == [
        f'-A INPUT {new} -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL',
        '-A INPUT -m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS',
        f'-A INPUT {new} -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES',
        "-A INPUT -j KUBE-FIREWALL",
        f'-A FORWARD {new} -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL',
        '-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD',
        f'-A FORWARD {new} -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        f'-A FORWARD {new} -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES',
        f'-A OUTPUT {new} -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL',
        f'-A OUTPUT {new} -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        "-A OUTPUT -j KUBE-FIREWALL",
    ]
    assert table(payload, "nat")[:4] == [":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]",
                                         ":OUTPUT ACCEPT [0:0]", ":POSTROUTING ACCEPT [0:0]"]
    assert [r for r in table(payload, "nat") if r.startswith(("-A PREROUTING ", "-A OUTPUT ", "-A POSTROUTING "))] == [
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
    ]
    without = write_full(clusterip_cluster(1, 1), TEST)
    assert rule_counts(payload) == {"filter": rule_counts(without)["filter"] + 11, "nat": rule_counts(without)["nat"] + 3}


def test_jump_rules_declare_kube_firewall_even_when_it_is_empty():
    payload = write_full(clusterip_cluster(1, 1, localhost_nodeports=False), WriterOptions(include_jump_rules=True))
    assert chains(payload, "filter").count("KUBE-FIREWALL") == 1
    assert rules(payload, "filter", "KUBE-FIREWALL") == []


# --- every feature together: the payload is self-consistent ------------------------------------

TERMINAL_TARGETS = {"ACCEPT", "DROP", "REJECT", "RETURN", "MARK", "MASQUERADE", "DNAT"}


def _random_cluster(rng):
    services, slices = [], []
    for s in range(rng.randint(1, 8)):
        kind = rng.choice(["ClusterIP", "NodePort", "LoadBalancer"])
        fields = dict(type=kind, affinity_timeout=rng.choice([0, 0, 300]),
                      internal_traffic_policy=rng.choice(["Cluster", "Local"]),
                      external_ips=[f"192.168.99.{s}"] if rng.random() < 0.3 else [])
        if kind != "ClusterIP":
            fields["external_traffic_policy"] = rng.choice(["Cluster", "Local"])
        if kind == "LoadBalancer":
            fields["load_balancer_ips"] = [f"1.2.{s}.{i}" for i in range(rng.randint(0, 2))]
            fields["load_balancer_source_ranges"] = rng.choice([[], ["203.0.113.0/24"], ["192.168.0.0/16"]])
            fields["health_check_node_port"] = 30000 + s
        services.append(service(f"svc{s}", f"172.30.0.{s + 1}", node_port=3000 + s if kind != "ClusterIP" else 0,
                                **fields))
        eps = [Endpoint(f"10.180.{s}.{e}", rng.choice([NODE, OTHER_NODE]), ready=rng.random() < 0.8,
                        terminating=rng.random() < 0.3) for e in range(rng.randint(0, 4))]
        slices.append(EndpointSlice("ns1", f"svc{s}-abc", f"svc{s}", [EndpointPort("p80", "tcp", 80)], eps))
    config = dict(masquerade_all=rng.random() < 0.2, cluster_cidr=rng.choice([POD_CIDR, ""]),
                  localhost_nodeports=rng.random() < 0.5, nfacct=rng.random() < 0.5,
                  node_port_addresses=rng.choice([[], ["192.168.0.0/16", "127.0.0.0/8"]]))
    return cluster(services, slices, **config)


def _check_references(payload, loaded=()):
    """Every rule's chain and target exist: declared here, or ``loaded`` earlier and not deleted."""
    for name in ("filter", "nat"):
        declared = chains(payload, name)
        assert len(declared) == len(set(declared)), name
        deleted = {line.split()[1] for line in table(payload, name) if line.startswith("-X ")}
        known = TERMINAL_TARGETS | set(declared) | (set(loaded) - deleted if name == "nat" else set())
        for line in table(payload, name):
            if line.startswith("-A "):
                assert line.split()[1] in known - deleted, line
                target = re.search(r" -j (\S+)", line)
                assert target is None or target.group(1) in known - deleted, line


def _changed_copy(before, rng):
    """``before`` with one service removed, one slice's endpoints halved and one policy flipped."""
    after = copy.deepcopy(before)
    if len(after.services) > 1:
        after.services.pop(rng.randrange(len(after.services)))
    halved = rng.choice(after.slices)
    halved.endpoints = halved.endpoints[::2]
    flipped = rng.choice(after.services)
    flipped.internal_traffic_policy = "Local" if flipped.internal_traffic_policy == "Cluster" else "Cluster"
    return after


@pytest.mark.parametrize("seed", range(40))
def test_every_rule_refers_to_an_existing_chain(seed):
    rng = random.Random(seed)
    before = _random_cluster(rng)
    full = write_full(before, WriterOptions(include_jump_rules=True))
    _check_references(full)
    _check_references(write_partial(before, _changed_copy(before, rng)), loaded=chains(full, "nat"))


# --- partial syncs -----------------------------------------------------------------------------

def _three_services(svc2_endpoints=("10.180.0.2",), with_svc3=True, svc1_fields=None):
    services = [service("svc1", "172.30.0.41", **(svc1_fields or {})), service("svc2", "172.30.0.42")]
    slices = [endpoints("svc1", "10.180.0.1"), endpoints("svc2", *svc2_endpoints)]
    if with_svc3:
        services.append(service("svc3", "172.30.0.43"))
        slices.append(endpoints("svc3", "10.180.0.3"))
    return cluster(services, slices)


def _service_chains_in(payload):
    return [c for c in chains(payload, "nat") if c.startswith(("KUBE-SVC-", "KUBE-SEP-", "KUBE-EXT-"))]


def test_partial_sync_rewrites_only_changed_services_and_deletes_stale_chains():
    previous = _three_services()
    current = _three_services(svc2_endpoints=("10.180.0.22", "10.180.0.23"), with_svc3=False)
    payload = write_partial(previous, current, WriterOptions(include_jump_rules=True, mark_format="test"))
    svc2, svc3 = service_chain("ns1/svc2:p80", "tcp"), service_chain("ns1/svc3:p80", "tcp")
    new_seps = [endpoint_chain("ns1/svc2:p80", "tcp", f"10.180.0.{i}:80") for i in (22, 23)]
    stale = sorted([svc3, endpoint_chain("ns1/svc3:p80", "tcp", "10.180.0.3:80"),
                    endpoint_chain("ns1/svc2:p80", "tcp", "10.180.0.2:80")])
    # Top-level chains in full, then svc2's new chains, then the stale ones to delete.
    assert chains(payload, "nat") == ["KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ",
                                      svc2, *new_seps, *stale]
    assert chains(payload, "filter") == ["KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-FORWARD",
                                         "KUBE-NODEPORTS", "KUBE-PROXY-FIREWALL", "KUBE-FIREWALL"]
    nat = table(payload, "nat")
    assert [line for line in nat if line.startswith("-X ")] == [f"-X {chain}" for chain in stale]
    assert nat.index(f"-X {stale[-1]}") < nat.index(NODEPORTS_JUMP) == len(nat) - 1
    # svc1 is unchanged: its KUBE-SERVICES rule is rewritten, its own chains are not.
    assert [r.split()[-1] for r in rules(payload, "nat", "KUBE-SERVICES")[:2]] == [SVC1, svc2]
    assert rules(payload, "nat", SVC1) == [] and rules(payload, "nat", SEP1) == []
    assert len(rules(payload, "nat", svc2)) == 3
    assert not any(r.startswith(("-A INPUT", "-A PREROUTING")) for r in payload.splitlines())


def test_partial_sync_without_changes_writes_only_top_level_chains():
    payload = write_partial(_three_services(), _three_services(), TEST)
    assert _service_chains_in(payload) == []
    assert not any(line.startswith("-X ") for line in payload.splitlines())
    full = write_full(_three_services(), TEST)
    assert rules(payload, "nat", "KUBE-SERVICES") == rules(full, "nat", "KUBE-SERVICES")
    assert table(payload, "filter") == table(full, "filter")
    assert rule_counts(payload)["nat"] == 5 + 3


def test_partial_sync_rewrites_a_service_whose_spec_changed():
    changed = _three_services(svc1_fields=dict(external_ips=["192.168.99.11"]))
    payload = write_partial(_three_services(), changed, TEST)
    ext = external_chain("ns1/svc1:p80", "tcp")
    assert _service_chains_in(payload) == [ext, SVC1, SEP1]  # nothing of svc2 or svc3
    assert rules(payload, "nat", ext)[-1] == f"-A {ext} -j {SVC1}"


def test_partial_sync_deletes_a_firewall_chain_that_is_no_longer_needed():
    lb = dict(type="LoadBalancer", node_port=3001, load_balancer_ips=["1.2.3.4"])
    before = cluster([service("svc1", "172.30.0.41", load_balancer_source_ranges=["203.0.113.0/24"], **lb)],
                     [endpoints("svc1", "10.180.0.1")])
    after = cluster([service("svc1", "172.30.0.41", **lb)], [endpoints("svc1", "10.180.0.1")])
    fw = firewall_chain("ns1/svc1:p80", "tcp")
    payload = write_partial(before, after, TEST)
    assert f"-X {fw}" in table(payload, "nat")
    assert rules(payload, "filter", "KUBE-PROXY-FIREWALL") == []


# --- service order -----------------------------------------------------------------------------

def _cluster_ip_order(payload):
    return [re.search(r'"(\S+) cluster IP"', r).group(1) for r in rules(payload, "nat", "KUBE-SERVICES")[:-1]]


def test_service_order_is_sorted_without_a_seed_and_a_seeded_shuffle_with_one():
    many = clusterip_cluster(20, 2)
    sorted_order = _cluster_ip_order(write_full(many, TEST))
    assert sorted_order == sorted(sorted_order)
    seeded = write_full(many, WriterOptions(service_order_seed=7, mark_format="test"))
    assert seeded == write_full(many, WriterOptions(service_order_seed=7, mark_format="test"))
    orders = {tuple(_cluster_ip_order(write_full(many, WriterOptions(service_order_seed=s)))) for s in range(5)}
    assert len(orders) == 5
    assert sorted(seeded.splitlines()) == sorted(write_full(many, TEST).splitlines())
    assert rules(seeded, "nat", "KUBE-SERVICES")[-1] == NODEPORTS_JUMP


# --- bad input ---------------------------------------------------------------------------------

def _with(svc_fields=None, slice_ip="10.180.0.1", **config):
    fields = dict(svc_fields or {})
    svc = service("svc1", fields.pop("cluster_ip", "172.30.0.41"), **fields)
    return cluster([svc], [endpoints("svc1", slice_ip)], **config)


@pytest.mark.parametrize("bad, where, field", [
    (_with({"cluster_ip": "172.30.0.999"}), "Service ns1/svc1", "spec.clusterIP"),
    (_with({"external_ips": ["fd00::1"]}), "Service ns1/svc1", "spec.externalIPs"),
    (_with({"external_ips": ["10.0.0.01"]}), "Service ns1/svc1", "spec.externalIPs"),
    (_with({"type": "LoadBalancer", "load_balancer_ips": ["1.2.3.4"], "load_balancer_source_ranges": ["bogus"]}),
     "Service ns1/svc1", "spec.loadBalancerSourceRanges"),
    (_with({"node_port": 70000}), "Service ns1/svc1", "spec.ports[].nodePort"),
    (_with({"protocol": "icmp"}), "Service ns1/svc1", "spec.ports[].protocol"),
    (_with({"affinity_timeout": -1}), "Service ns1/svc1", "spec.sessionAffinityConfig.clientIP.timeoutSeconds"),
    (_with(slice_ip="10.180.0.x"), "EndpointSlice ns1/svc1-abc", "endpoints[].addresses"),
    (_with(cluster_cidr="10.0.0.0/33"), "KubeProxyConfiguration", "clusterCIDR"),
    (_with(node_port_addresses=["eth0"]), "KubeProxyConfiguration", "nodePortAddresses"),
    (_with(masquerade_bit=40), "KubeProxyConfiguration", "iptables.masqueradeBit"),
    (_with(node_ips=["node-a"]), "KubeProxyConfiguration", "nodeIPs"),
])
def test_bad_input_raises_input_error_naming_object_and_field(bad, where, field):
    with pytest.raises(InputError) as error:
        write_full(bad)
    assert (error.value.where, error.value.field) == (where, field)


def test_unknown_mark_format_is_an_input_error():
    with pytest.raises(InputError, match="mark format"):
        write_full(clusterip_cluster(1, 1), WriterOptions(mark_format="hex"))


def test_bad_current_cluster_in_a_partial_sync_is_an_input_error():
    with pytest.raises(InputError, match="172.30.0.999"):
        write_partial(_with(), _with({"cluster_ip": "172.30.0.999"}))


def test_syncer_carries_its_state_from_one_partial_sync_to_the_next():
    first, second, third = (_three_services(), _three_services(svc2_endpoints=("10.180.0.22",)),
                            _three_services(svc2_endpoints=("10.180.0.22", "10.180.0.23"), with_svc3=False))
    syncer = Syncer(TEST)
    assert syncer.full(first) == write_full(first, TEST)
    assert syncer.partial(second) == write_partial(first, second, TEST)
    assert syncer.partial(third) == write_partial(second, third, TEST)


def test_syncer_needs_a_full_sync_before_a_partial_one():
    with pytest.raises(ValueError, match="full sync first"):
        Syncer(TEST).partial(_three_services())


def test_a_syncer_copy_goes_on_from_the_state_independently():
    first, second = _three_services(), _three_services(svc2_endpoints=("10.180.0.22",))
    syncer = Syncer(TEST)
    syncer.full(first)
    fork = syncer.copy()
    assert syncer.partial(second) == write_partial(first, second, TEST)
    assert fork.partial(_three_services(with_svc3=False)) == write_partial(first, _three_services(with_svc3=False), TEST)
