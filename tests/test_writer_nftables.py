"""The nftables writer against kube-proxy's nftables mode (shared/docs/kube-proxy-rules.md §c).

Clusters are built by hand. Unless a test says otherwise, the host is the one kube-proxy's
nftables unit tests fake: IPv4, node 192.168.0.2, cluster CIDR 10.0.0.0/8 as the local-traffic
detector, NodePorts on every local address, service CIDR 172.30.0.0/16, and the mark written
0x4000.
"""
import base64
import copy
import hashlib
import random

import pytest

from bench.cluster.model import (Cluster, Endpoint, EndpointPort, EndpointSlice, Node, ProxyConfig,
                                 Service, ServicePort)
from bench.errors import InputError
from bench.proxies.nftables import (WriterOptions, hash_and_truncate, listed_priority, listed_time,
                                    write_full, write_partial, write_ruleset_listing)

NODE, OTHER_NODE = "node1", "node2"
NODE_IP = "192.168.0.2"
POD_CIDR = "10.0.0.0/8"
TEST = WriterOptions(service_cidrs=("172.30.0.0/16",), mark_format="test")
P = "ip kube-proxy"
SVC1 = "service-ULMVA6XW-ns1/svc1/tcp/p80"
EXT1 = "external-ULMVA6XW-ns1/svc1/tcp/p80"
LOCAL1 = "local-ULMVA6XW-ns1/svc1/tcp/p80"
FW1 = "firewall-ULMVA6XW-ns1/svc1/tcp/p80"
EP1 = "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
EP2 = "endpoint-MLKSHPWN-ns1/svc1/tcp/p80__10.180.2.1/80"


# --- building clusters -------------------------------------------------------------------------

def service(name, cluster_ip, *, node_port=0, protocol="tcp", **fields):
    """Service ns1/<name> with one port p80 (80/tcp unless ``protocol`` says otherwise)."""
    kind = fields.pop("type", "NodePort" if node_port else "ClusterIP")
    return Service("ns1", name, kind, cluster_ip, [ServicePort("p80", protocol, 80, 80, node_port)], **fields)


def endpoints(service_name, *addresses, node=OTHER_NODE, **conditions):
    """An EndpointSlice for ``service_name``; ``addresses`` are IPs, or (IP, node) pairs."""
    eps = [Endpoint(*(a if isinstance(a, tuple) else (a, node)), **conditions) for a in addresses]
    return EndpointSlice("ns1", f"{service_name}-abc", service_name, [EndpointPort("p80", "tcp", 80)], eps)


def cluster(services, slices=(), **config):
    values = dict(cluster_cidr=POD_CIDR, node_ips=[NODE_IP])
    values.update(config)
    return Cluster(list(services), list(slices), [Node(NODE, [NODE_IP]), Node(OTHER_NODE, ["192.168.0.3"])],
                   ProxyConfig(**values), node_name=NODE)


def one(svc, *addresses, **config):
    """A cluster of ``svc`` with its endpoints at ``addresses`` (remote unless paired with NODE)."""
    return cluster([svc], [endpoints(svc.name, *addresses)] if addresses else [], **config)


# --- reading transactions ----------------------------------------------------------------------

SETUP_END = f"flush map {P} service-nodeports"


def service_lines(text):
    """The lines after setupNFTables: what the services themselves write."""
    lines = text.splitlines()
    return lines[lines.index(SETUP_END) + 1:]


def rules(text, chain):
    prefix = f"add rule {P} {chain} "
    return [line[len(prefix):] for line in text.splitlines() if line.startswith(prefix)]


def elements(text, container, verb="add"):
    prefix = f"{verb} element {P} {container} {{ "
    return [line[len(prefix):-2] for line in text.splitlines() if line.startswith(prefix)]


def chains_added(text):
    prefix = f"add chain {P} "
    return [line[len(prefix):].split(" {")[0] for line in text.splitlines() if line.startswith(prefix)]


# --- names -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("ns1/svc1/tcp/p80", "ULMVA6XW-ns1/svc1/tcp/p80"),
    ("ns1/svc1/tcp/p80__10.180.0.1/80", "5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"),
    ("ns2/svc2/tcp/p80", "42NFTM6N-ns2/svc2/tcp/p80"),
])
def test_hash_and_truncate_matches_kube_proxy_test_vectors(name, expected):
    assert hash_and_truncate(name) == expected


def test_long_names_are_truncated_to_240_characters_ending_in_dots():
    name = "ns/" + "s" * 63 + "/tcp/" + "p" * 63 + "__" + "10.1.2.3/" + "9" * 200
    hashed = hash_and_truncate(name)
    digest = base64.b32encode(hashlib.sha256(name.encode()).digest()).decode()
    assert hashed == (digest[:8] + "-" + name)[:237] + "..."
    assert len(hashed) == 240
    exactly = "n" * 231  # 8 + 1 + 231 = 240: not truncated
    assert hash_and_truncate(exactly).endswith("n" * 231)


def test_unnamed_udp_port_has_an_empty_port_name_in_its_chains():
    svc = Service("ns1", "dns", "ClusterIP", "172.30.0.10", [ServicePort("", "udp", 53, 53)])
    eps = EndpointSlice("ns1", "dns-abc", "dns", [EndpointPort("", "udp", 53)], [Endpoint("10.180.0.5", OTHER_NODE)])
    text = write_full(cluster([svc], [eps]), TEST)
    chain = "service-" + hash_and_truncate("ns1/dns/udp/")
    assert chain in chains_added(text)
    assert elements(text, "service-ips") == [f"172.30.0.10 . udp . 53 : goto {chain}"]
    endpoint = "endpoint-" + hash_and_truncate("ns1/dns/udp/__10.180.0.5/53")
    assert rules(text, endpoint) == ["ip saddr 10.180.0.5 jump mark-for-masquerade",
                                     "meta l4proto udp dnat to 10.180.0.5:53"]


@pytest.mark.parametrize("priority, hook, listed", [
    (-110, "prerouting", "dstnat - 10"), (-110, "output", "dstnat - 10"), (0, "forward", "filter"),
    (-100, "prerouting", "dstnat"), (100, "postrouting", "srcnat"), (-90, "output", "dstnat + 10"),
    (-100, "forward", "-100"), (1000, "input", "1000"), (-300, "prerouting", "raw"),
])
def test_priorities_are_listed_by_name_within_ten(priority, hook, listed):
    assert listed_priority(priority, hook) == listed


@pytest.mark.parametrize("seconds, listed", [(10800, "3h"), (90, "1m30s"), (86401, "1d1s"), (0, "0s"), (10, "10s")])
def test_times_are_listed_like_nft(seconds, listed):
    assert listed_time(seconds) == listed


# --- a whole transaction -----------------------------------------------------------------------

def test_full_transaction_of_a_clusterip_service_with_two_endpoints():
    text = write_full(one(service("svc1", "172.30.0.41"), "10.180.0.1", "10.180.2.1"), TEST)
    assert text == f"""\
add table {P} {{ comment "rules for kube-proxy" ; }}
add chain {P} filter-prerouting-pre-dnat {{ type filter hook prerouting priority -110 ; }}
flush chain {P} filter-prerouting-pre-dnat
add chain {P} filter-output-pre-dnat {{ type filter hook output priority -110 ; }}
flush chain {P} filter-output-pre-dnat
add chain {P} filter-forward {{ type filter hook forward priority 0 ; }}
flush chain {P} filter-forward
add chain {P} filter-input {{ type filter hook input priority 0 ; }}
flush chain {P} filter-input
add chain {P} filter-output {{ type filter hook output priority 0 ; }}
flush chain {P} filter-output
add chain {P} nat-prerouting {{ type nat hook prerouting priority -100 ; }}
flush chain {P} nat-prerouting
add chain {P} nat-output {{ type nat hook output priority -100 ; }}
flush chain {P} nat-output
add chain {P} nat-postrouting {{ type nat hook postrouting priority 100 ; }}
flush chain {P} nat-postrouting
add chain {P} nodeport-endpoints-check
flush chain {P} nodeport-endpoints-check
add rule {P} filter-input ct state new jump nodeport-endpoints-check
add chain {P} service-endpoints-check
flush chain {P} service-endpoints-check
add rule {P} filter-input ct state new jump service-endpoints-check
add rule {P} filter-forward ct state new jump service-endpoints-check
add rule {P} filter-output ct state new jump service-endpoints-check
add chain {P} firewall-check
flush chain {P} firewall-check
add rule {P} filter-prerouting-pre-dnat ct state new jump firewall-check
add rule {P} filter-output-pre-dnat ct state new jump firewall-check
add chain {P} services
flush chain {P} services
add rule {P} nat-output jump services
add rule {P} nat-prerouting jump services
add chain {P} masquerading
flush chain {P} masquerading
add rule {P} nat-postrouting jump masquerading
add chain {P} cluster-ips-check
flush chain {P} cluster-ips-check
add rule {P} filter-forward ct state new jump cluster-ips-check
add rule {P} filter-output ct state new jump cluster-ips-check
add chain {P} mark-for-masquerade
flush chain {P} mark-for-masquerade
add rule {P} mark-for-masquerade mark set mark or 0x4000
add rule {P} masquerading mark and 0x4000 == 0 return
add rule {P} masquerading mark set mark xor 0x4000
add rule {P} masquerading masquerade fully-random
add set {P} cluster-ips {{ type ipv4_addr ; comment "Active ClusterIPs" ; }}
add rule {P} cluster-ips-check ip daddr @cluster-ips reject comment "Reject traffic to invalid ports of ClusterIPs"
add rule {P} cluster-ips-check ip daddr {{ 172.30.0.0/16 }} drop comment "Drop traffic to unallocated ClusterIPs"
add set {P} nodeport-ips {{ type ipv4_addr ; comment "IPs that accept NodePort traffic" ; }}
delete set {P} nodeport-ips
add map {P} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment "vmap to drop or reject packets to services with no endpoints" ; }}
add map {P} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; comment "vmap to drop or reject packets to service nodeports with no endpoints" ; }}
add chain {P} reject-chain {{ comment "helper for @no-endpoint-services / @no-endpoint-nodeports" ; }}
flush chain {P} reject-chain
add rule {P} reject-chain reject
add rule {P} service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services
add rule {P} nodeport-endpoints-check ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @no-endpoint-nodeports
add map {P} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment "destinations that are subject to LoadBalancerSourceRanges" ; }}
add rule {P} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips
add map {P} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment "ClusterIP, ExternalIP and LoadBalancer IP traffic" ; }}
add map {P} service-nodeports {{ type inet_proto . inet_service : verdict ; comment "NodePort traffic" ; }}
add rule {P} services ip daddr . meta l4proto . th dport vmap @service-ips
add rule {P} services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports
flush set {P} cluster-ips
flush map {P} service-ips
flush map {P} firewall-ips
flush map {P} no-endpoint-services
flush map {P} no-endpoint-nodeports
flush map {P} service-nodeports
add chain {P} {EP1}
flush chain {P} {EP1}
add chain {P} {EP2}
flush chain {P} {EP2}
add chain {P} {SVC1}
flush chain {P} {SVC1}
add element {P} cluster-ips {{ 172.30.0.41 }}
add element {P} service-ips {{ 172.30.0.41 . tcp . 80 : goto {SVC1} }}
add rule {P} {SVC1} ip daddr 172.30.0.41 tcp dport 80 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
add rule {P} {SVC1} numgen random mod 2 vmap {{ 0 : goto {EP1} , 1 : goto {EP2} }}
add rule {P} {EP1} ip saddr 10.180.0.1 jump mark-for-masquerade
add rule {P} {EP1} meta l4proto tcp dnat to 10.180.0.1:80
add rule {P} {EP2} ip saddr 10.180.2.1 jump mark-for-masquerade
add rule {P} {EP2} meta l4proto tcp dnat to 10.180.2.1:80
"""


def test_kernel_mark_format_pads_like_percent_hash_08x():
    text = write_full(one(service("svc1", "172.30.0.41"), "10.180.0.1"))
    assert rules(text, "mark-for-masquerade") == ["mark set mark or 0x004000"]
    assert rules(text, "masquerading")[:2] == ["mark and 0x004000 == 0 return", "mark set mark xor 0x004000"]
    assert "masquerade_bit" not in text and rules(text, "cluster-ips-check") == [
        'ip daddr @cluster-ips reject comment "Reject traffic to invalid ports of ClusterIPs"']
    bit12 = write_full(one(service("svc1", "172.30.0.41"), "10.180.0.1", masquerade_bit=12))
    assert rules(bit12, "mark-for-masquerade") == ["mark set mark or 0x001000"]


def test_several_service_cidrs_are_one_anonymous_set():
    options = WriterOptions(service_cidrs=("172.30.0.0/16", "10.96.0.1/12"))
    text = write_full(one(service("svc1", "172.30.0.41"), "10.180.0.1"), options)
    assert rules(text, "cluster-ips-check")[1] == \
        'ip daddr { 172.30.0.0/16,10.96.0.0/12 } drop comment "Drop traffic to unallocated ClusterIPs"'


@pytest.mark.parametrize("count", [1, 3, 10])
def test_numgen_picks_among_all_n_endpoints_in_order(count):
    ips = [f"10.180.0.{i + 1}" for i in range(count)]
    text = write_full(one(service("svc1", "172.30.0.41"), *ips), TEST)
    # Endpoints come in kube-proxy's order: sorted by "ip:port" as text (10.180.0.10 before 10.180.0.1).
    chains = ["endpoint-" + hash_and_truncate(f"ns1/svc1/tcp/p80__{ip}/80") for ip in sorted(ips, key=lambda ip: f"{ip}:80")]
    targets = " , ".join(f"{i} : goto {chain}" for i, chain in enumerate(chains))
    assert rules(text, SVC1)[-1] == f"numgen random mod {count} vmap {{ {targets} }}"
    assert chains_added(text)[-count - 1:] == [*chains, SVC1]


def test_masquerade_all_and_no_local_traffic_detector():
    everything = write_full(one(service("svc1", "172.30.0.41"), "10.180.0.1", masquerade_all=True), TEST)
    assert rules(everything, SVC1)[0] == "ip daddr 172.30.0.41 tcp dport 80 jump mark-for-masquerade"
    no_detector = write_full(one(service("svc1", "172.30.0.41"), "10.180.0.1", cluster_cidr=""), TEST)
    assert rules(no_detector, SVC1) == [f"numgen random mod 1 vmap {{ 0 : goto {EP1} }}"]


def test_not_ready_endpoints_get_no_chain_but_serving_terminating_ones_do_when_alone():
    ready = endpoints("svc1", "10.180.0.1")
    ready.endpoints.append(Endpoint("10.180.0.9", OTHER_NODE, ready=False, serving=False))
    text = write_full(cluster([service("svc1", "172.30.0.41")], [ready]), TEST)
    assert rules(text, SVC1)[-1] == f"numgen random mod 1 vmap {{ 0 : goto {EP1} }}"
    terminating = endpoints("svc1", "10.180.0.1", ready=False, serving=True, terminating=True)
    text = write_full(cluster([service("svc1", "172.30.0.41")], [terminating]), TEST)
    assert rules(text, EP1)[-1] == "meta l4proto tcp dnat to 10.180.0.1:80"


# --- service types -----------------------------------------------------------------------------

def test_node_port_with_cluster_policy_goes_through_the_external_chain():
    text = write_full(one(service("svc1", "172.30.0.41", node_port=3001), "10.180.0.1"), TEST)
    assert service_lines(text) == [
        f"add chain {P} {EP1}", f"flush chain {P} {EP1}",
        f"add chain {P} {SVC1}", f"flush chain {P} {SVC1}",
        f"add chain {P} {EXT1}", f"flush chain {P} {EXT1}",
        f"add element {P} cluster-ips {{ 172.30.0.41 }}",
        f"add element {P} service-ips {{ 172.30.0.41 . tcp . 80 : goto {SVC1} }}",
        f"add element {P} service-nodeports {{ tcp . 3001 : goto {EXT1} }}",
        f"add rule {P} {SVC1} ip daddr 172.30.0.41 tcp dport 80 ip saddr != 10.0.0.0/8 jump mark-for-masquerade",
        f"add rule {P} {EXT1} jump mark-for-masquerade",
        f"add rule {P} {EXT1} goto {SVC1}",
        f"add rule {P} {SVC1} numgen random mod 1 vmap {{ 0 : goto {EP1} }}",
        f"add rule {P} {EP1} ip saddr 10.180.0.1 jump mark-for-masquerade",
        f"add rule {P} {EP1} meta l4proto tcp dnat to 10.180.0.1:80",
    ]


def test_external_ips_go_to_the_external_chain():
    svc = service("svc1", "172.30.0.41", external_ips=["192.168.99.11", "192.168.99.12"])
    text = write_full(one(svc, "10.180.0.1"), TEST)
    assert elements(text, "service-ips") == [f"172.30.0.41 . tcp . 80 : goto {SVC1}",
                                             f"192.168.99.11 . tcp . 80 : goto {EXT1}",
                                             f"192.168.99.12 . tcp . 80 : goto {EXT1}"]
    assert rules(text, EXT1) == ["jump mark-for-masquerade", f"goto {SVC1}"]
    assert elements(text, "no-endpoint-services") == []


def test_load_balancer_with_source_ranges_is_checked_by_the_firewall_map_before_dnat():
    svc = service("svc1", "172.30.0.41", type="LoadBalancer", node_port=3001, load_balancer_ips=["5.6.7.8"],
                  load_balancer_source_ranges=["203.0.113.0/25", "198.51.100.7/32"])
    text = write_full(one(svc, "10.180.0.1"), TEST)
    assert elements(text, "service-ips")[1] == f"5.6.7.8 . tcp . 80 : goto {EXT1}"  # not via the firewall
    assert elements(text, "firewall-ips") == [f'5.6.7.8 . tcp . 80 comment "ns1/svc1:p80" : goto {FW1}']
    assert rules(text, FW1) == ["ip saddr != { 203.0.113.0/25 , 198.51.100.7/32 } drop"]
    lines = text.splitlines()
    # The firewall chain exists before the map element that goes to it.
    assert lines.index(f"add chain {P} {FW1}") < lines.index(f"add element {P} firewall-ips {{ {elements(text, 'firewall-ips')[0]} }}")


def test_source_range_containing_the_node_ip_also_admits_the_lb_ips():
    svc = service("svc1", "172.30.0.41", type="LoadBalancer", node_port=3001, load_balancer_ips=["5.6.7.8"],
                  load_balancer_source_ranges=["192.168.0.0/16"])
    text = write_full(one(svc, "10.180.0.1"), TEST)
    assert rules(text, FW1) == ["ip saddr != { 192.168.0.0/16 , 5.6.7.8 } drop"]


def test_load_balancer_without_source_ranges_has_no_firewall():
    svc = service("svc1", "172.30.0.41", type="LoadBalancer", node_port=3001, load_balancer_ips=["5.6.7.8"])
    text = write_full(one(svc, "10.180.0.1"), TEST)
    assert elements(text, "firewall-ips") == [] and FW1 not in chains_added(text)


def test_external_policy_local_with_local_endpoints():
    svc = service("svc1", "172.30.0.41", type="LoadBalancer", node_port=3001, load_balancer_ips=["5.6.7.8"],
                  external_traffic_policy="Local")
    text = write_full(one(svc, ("10.180.0.1", OTHER_NODE), ("10.180.2.1", NODE)), TEST)
    assert rules(text, EXT1) == [
        f'ip saddr 10.0.0.0/8 goto {SVC1} comment "short-circuit pod traffic"',
        'fib saddr type local jump mark-for-masquerade comment "masquerade local traffic"',
        f'fib saddr type local goto {SVC1} comment "short-circuit local traffic"',
        f"goto {LOCAL1}",
    ]
    # Cluster traffic uses both endpoints, external traffic only the local one.
    assert rules(text, SVC1)[-1] == f"numgen random mod 2 vmap {{ 0 : goto {EP1} , 1 : goto {EP2} }}"
    assert rules(text, LOCAL1) == [f"numgen random mod 1 vmap {{ 0 : goto {EP2} }}"]
    assert elements(text, "no-endpoint-services") == [] and elements(text, "no-endpoint-nodeports") == []


def test_external_policy_local_without_local_endpoints_drops_external_traffic():
    svc = service("svc1", "172.30.0.41", type="LoadBalancer", node_port=3001, load_balancer_ips=["5.6.7.8"],
                  external_ips=["192.168.99.11"], external_traffic_policy="Local")
    text = write_full(one(svc, "10.180.0.1"), TEST)
    assert rules(text, EXT1) == [
        f'ip saddr 10.0.0.0/8 goto {SVC1} comment "short-circuit pod traffic"',
        'fib saddr type local jump mark-for-masquerade comment "masquerade local traffic"',
        f'fib saddr type local goto {SVC1} comment "short-circuit local traffic"',
    ]
    assert elements(text, "no-endpoint-services") == [
        '192.168.99.11 . tcp . 80 comment "ns1/svc1:p80" : drop',
        '5.6.7.8 . tcp . 80 comment "ns1/svc1:p80" : drop',
    ]
    assert elements(text, "no-endpoint-nodeports") == ['tcp . 3001 comment "ns1/svc1:p80" : drop']
    assert LOCAL1 not in chains_added(text)
    # The short-circuit rules still need the external chain in the dispatch maps.
    assert elements(text, "service-nodeports") == [f"tcp . 3001 : goto {EXT1}"]


def test_external_policy_local_without_detector_has_no_pod_short_circuit():
    svc = service("svc1", "172.30.0.41", node_port=3001, external_traffic_policy="Local")
    text = write_full(one(svc, ("10.180.0.1", NODE), cluster_cidr=""), TEST)
    assert [rule.split(" comment")[0] for rule in rules(text, EXT1)] == [
        "fib saddr type local jump mark-for-masquerade", f"fib saddr type local goto {SVC1}", f"goto {LOCAL1}"]


def test_internal_policy_local_sends_cluster_ip_traffic_to_the_local_chain():
    svc = service("svc1", "172.30.0.41", internal_traffic_policy="Local")
    text = write_full(one(svc, ("10.180.0.1", OTHER_NODE), ("10.180.2.1", NODE)), TEST)
    assert elements(text, "service-ips") == [f"172.30.0.41 . tcp . 80 : goto {LOCAL1}"]
    assert rules(text, LOCAL1) == ["ip daddr 172.30.0.41 tcp dport 80 ip saddr != 10.0.0.0/8 jump mark-for-masquerade",
                                   f"numgen random mod 1 vmap {{ 0 : goto {EP2} }}"]
    assert SVC1 not in chains_added(text) and EP1 not in chains_added(text)


def test_internal_policy_local_without_local_endpoints_drops_cluster_ip_traffic():
    svc = service("svc1", "172.30.0.41", internal_traffic_policy="Local")
    text = write_full(one(svc, "10.180.0.1"), TEST)
    assert service_lines(text) == [
        f"add element {P} cluster-ips {{ 172.30.0.41 }}",
        f'add element {P} no-endpoint-services {{ 172.30.0.41 . tcp . 80 comment "ns1/svc1:p80" : drop }}',
    ]


def test_no_endpoints_rejects_every_destination_and_writes_no_chains():
    svc = service("svc1", "172.30.0.41", type="LoadBalancer", node_port=3001, load_balancer_ips=["5.6.7.8"],
                  external_ips=["192.168.99.11"], load_balancer_source_ranges=["203.0.113.0/25"])
    text = write_full(one(svc), TEST)
    reject = 'comment "ns1/svc1:p80" : goto reject-chain'
    assert service_lines(text) == [
        f"add element {P} cluster-ips {{ 172.30.0.41 }}",
        f"add element {P} no-endpoint-services {{ 172.30.0.41 . tcp . 80 {reject} }}",
        f"add element {P} no-endpoint-services {{ 192.168.99.11 . tcp . 80 {reject} }}",
        f"add element {P} no-endpoint-services {{ 5.6.7.8 . tcp . 80 {reject} }}",
        f"add element {P} no-endpoint-nodeports {{ tcp . 3001 {reject} }}",
    ]


def test_client_ip_affinity_uses_a_dynamic_set_per_endpoint():
    svc = service("svc1", "172.30.0.41", affinity_timeout=10800)
    text = write_full(one(svc, "10.180.0.1", "10.180.2.1"), TEST)
    aff1, aff2 = (chain.replace("endpoint-", "affinity-") for chain in (EP1, EP2))
    assert [line for line in text.splitlines() if line.startswith(f"add set {P} affinity-")] == [
        f"add set {P} {aff} {{ type ipv4_addr ; flags dynamic,timeout ; timeout 10800s ; }}" for aff in (aff1, aff2)]
    assert rules(text, SVC1) == [
        "ip daddr 172.30.0.41 tcp dport 80 ip saddr != 10.0.0.0/8 jump mark-for-masquerade",
        f"ip saddr @{aff1} goto {EP1}", f"ip saddr @{aff2} goto {EP2}",
        f"numgen random mod 2 vmap {{ 0 : goto {EP1} , 1 : goto {EP2} }}",
    ]
    assert rules(text, EP1) == ["ip saddr 10.180.0.1 jump mark-for-masquerade", f"update @{aff1} {{ ip saddr }}",
                                "meta l4proto tcp dnat to 10.180.0.1:80"]
    # The sets exist before the rules that use them.
    lines = text.splitlines()
    assert max(i for i, line in enumerate(lines) if line.startswith(f"add set {P} affinity-")) < \
        min(i for i, line in enumerate(lines) if "@affinity-" in line)


def test_node_port_addresses_fill_nodeport_ips_without_loopback():
    svc = service("svc1", "172.30.0.41", node_port=3001)
    text = write_full(one(svc, "10.180.0.1", node_port_addresses=["192.168.0.0/16", "127.0.0.0/8"]), TEST)
    assert f"delete set {P} nodeport-ips" not in text
    assert elements(text, "nodeport-ips") == ["192.168.0.2"]
    assert rules(text, "services")[1] == "ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports"
    assert rules(text, "nodeport-endpoints-check") == [
        "ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports"]


def test_a_cluster_ip_shared_by_two_ports_is_one_cluster_ips_element():
    svc = Service("ns1", "svc1", "ClusterIP", "172.30.0.41",
                  [ServicePort("p80", "tcp", 80, 80), ServicePort("p443", "tcp", 443, 443)])
    eps = EndpointSlice("ns1", "svc1-abc", "svc1", [EndpointPort("p80", "tcp", 80), EndpointPort("p443", "tcp", 443)],
                        [Endpoint("10.180.0.1", OTHER_NODE)])
    text = write_full(cluster([svc], [eps]), TEST)
    assert elements(text, "cluster-ips") == ["172.30.0.41"]
    assert len(elements(text, "service-ips")) == 2


def test_service_order_is_sorted_without_a_seed_and_a_seeded_shuffle_with_one():
    many = cluster([service(f"svc{i:02}", f"172.30.0.{i + 1}") for i in range(20)],
                   [endpoints(f"svc{i:02}", f"10.180.0.{i + 1}") for i in range(20)])
    assert elements(write_full(many, TEST), "cluster-ips") == [f"172.30.0.{i + 1}" for i in range(20)]
    seeded = write_full(many, WriterOptions(service_order_seed=7))
    assert seeded == write_full(many, WriterOptions(service_order_seed=7))
    assert seeded != write_full(many, WriterOptions(service_order_seed=8))
    assert sorted(seeded.splitlines()) == sorted(write_full(many).splitlines())


# --- the listing -------------------------------------------------------------------------------

def test_listing_prints_the_ruleset_as_nft_list_ruleset_does():
    svc = service("svc1", "172.30.0.41", type="LoadBalancer", node_port=3001, load_balancer_ips=["5.6.7.8"],
                  external_ips=["1.1.1.1"], load_balancer_source_ranges=["203.0.113.0/25"], affinity_timeout=10800)
    listing = write_ruleset_listing(one(svc, "10.180.0.1"), TEST)
    assert listing.startswith('table ip kube-proxy {\n\tcomment "rules for kube-proxy"\n\tset cluster-ips {\n')
    assert listing.endswith("\t}\n}\n")
    assert "\t\ttype filter hook prerouting priority dstnat - 10; policy accept;\n" in listing
    assert "\t\ttype nat hook postrouting priority srcnat; policy accept;\n" in listing
    assert "\t\tmeta mark set meta mark | 0x00004000\n" in listing
    assert "\t\tmeta mark & 0x00004000 == 0x00000000 return\n" in listing
    assert '\t\tip daddr 172.30.0.0/16 drop comment "Drop traffic to unallocated ClusterIPs"\n' in listing
    assert "\t\tip saddr != 203.0.113.0/25 drop\n" in listing
    assert "\t\tflags dynamic,timeout\n\t\ttimeout 3h\n" in listing
    # Elements are sorted by key, one per line after the first.
    assert (f"\t\telements = {{ 1.1.1.1 . tcp . 80 : goto {EXT1},\n"
            f"\t\t\t     5.6.7.8 . tcp . 80 : goto {EXT1},\n"
            f"\t\t\t     172.30.0.41 . tcp . 80 : goto {SVC1} }}\n") in listing
    assert "nodeport-ips" not in listing  # added and deleted again
    # Sets and maps come first, then the chains, each in the order they were added.
    assert listing.index("\tmap service-nodeports {") < listing.index("\tchain filter-prerouting-pre-dnat {")


# --- partial syncs -----------------------------------------------------------------------------

def three_services(svc2_endpoints=("10.180.0.2",), with_svc3=True, svc1_fields=None):
    services = [service("svc1", "172.30.0.41", **(svc1_fields or {})), service("svc2", "172.30.0.42")]
    slices = [endpoints("svc1", "10.180.0.1"), endpoints("svc2", *svc2_endpoints)]
    if with_svc3:
        services.append(service("svc3", "172.30.0.43"))
        slices.append(endpoints("svc3", "10.180.0.3"))
    return cluster(services, slices)


def names(service_name, *ips):
    base = f"ns1/{service_name}/tcp/p80"
    return ["service-" + hash_and_truncate(base)] + ["endpoint-" + hash_and_truncate(f"{base}__{ip}/80") for ip in ips]


def test_partial_sync_without_changes_is_empty():
    assert write_partial(three_services(), three_services(), TEST) == ""


def test_partial_sync_rewrites_only_changed_services_and_flushes_stale_chains():
    current = three_services(svc2_endpoints=("10.180.0.22", "10.180.0.23"), with_svc3=False)
    text = write_partial(three_services(), current, TEST)
    svc2, ep22, ep23 = names("svc2", "10.180.0.22", "10.180.0.23")
    stale = sorted(names("svc3", "10.180.0.3") + names("svc2", "10.180.0.2")[1:])
    assert text.splitlines() == [
        f"add chain {P} {ep22}", f"flush chain {P} {ep22}",
        f"add chain {P} {ep23}", f"flush chain {P} {ep23}",
        f"add chain {P} {svc2}", f"flush chain {P} {svc2}",
        f"add rule {P} {svc2} ip daddr 172.30.0.42 tcp dport 80 ip saddr != 10.0.0.0/8 jump mark-for-masquerade",
        f"add rule {P} {svc2} numgen random mod 2 vmap {{ 0 : goto {ep22} , 1 : goto {ep23} }}",
        f"add rule {P} {ep22} ip saddr 10.180.0.22 jump mark-for-masquerade",
        f"add rule {P} {ep22} meta l4proto tcp dnat to 10.180.0.22:80",
        f"add rule {P} {ep23} ip saddr 10.180.0.23 jump mark-for-masquerade",
        f"add rule {P} {ep23} meta l4proto tcp dnat to 10.180.0.23:80",
        *[f"flush chain {P} {chain}" for chain in stale],
        f"delete element {P} cluster-ips {{ 172.30.0.43 }}",
        f"delete element {P} service-ips {{ 172.30.0.43 . tcp . 80 }}",
    ]


def test_partial_sync_deletes_and_re_adds_an_element_whose_verdict_changed():
    current = three_services(svc1_fields=dict(internal_traffic_policy="Local"))
    text = write_partial(three_services(), current, TEST)
    key = "172.30.0.41 . tcp . 80"
    assert elements(text, "service-ips", "delete") == [key]
    assert elements(text, "no-endpoint-services") == [f'{key} comment "ns1/svc1:p80" : drop']
    assert elements(text, "service-ips") == []
    assert [line.split()[-1] for line in text.splitlines() if line.startswith("flush chain")] == [EP1, SVC1]
    lines = text.splitlines()
    assert lines.index(f"delete element {P} service-ips {{ {key} }}") > lines.index(f"flush chain {P} {EP1}")


def test_partial_sync_re_adds_a_changed_value_in_place():
    current = three_services(svc1_fields=dict(internal_traffic_policy="Local"))
    current.slices[0].endpoints = [Endpoint("10.180.0.1", NODE)]
    text = write_partial(three_services(), current, TEST)
    key = "172.30.0.41 . tcp . 80"
    lines = text.splitlines()
    position = lines.index(f"delete element {P} service-ips {{ {key} }}")
    assert lines[position + 1] == f"add element {P} service-ips {{ {key} : goto {LOCAL1} }}"
    assert f"flush chain {P} {SVC1}" in lines[position:]  # the Cluster chain is no longer used


def test_partial_sync_can_delete_stale_chains_at_once():
    current = three_services(with_svc3=False)
    text = write_partial(three_services(), current, WriterOptions(delete_stale_chains=True))
    stale = sorted(names("svc3", "10.180.0.3"))
    lines = text.splitlines()
    assert lines[-2:] == [f"delete chain {P} {chain}" for chain in stale]
    assert lines.index(f"delete element {P} service-ips {{ 172.30.0.43 . tcp . 80 }}") < lines.index(
        f"delete chain {P} {stale[0]}")


def test_partial_sync_deletes_affinity_sets_no_longer_used():
    before = three_services(svc1_fields=dict(affinity_timeout=60))
    text = write_partial(before, three_services(), TEST)
    affinity = EP1.replace("endpoint-", "affinity-")
    assert f"delete set {P} {affinity}" in text.splitlines()
    assert rules(text, EP1) == ["ip saddr 10.180.0.1 jump mark-for-masquerade", "meta l4proto tcp dnat to 10.180.0.1:80"]


def test_partial_sync_of_a_service_that_lost_its_endpoints_rejects_it():
    current = three_services(svc2_endpoints=())
    text = write_partial(three_services(), current, TEST)
    assert elements(text, "service-ips", "delete") == ["172.30.0.42 . tcp . 80"]
    assert elements(text, "no-endpoint-services") == ['172.30.0.42 . tcp . 80 comment "ns1/svc2:p80" : goto reject-chain']
    assert not any(line.startswith("add chain") for line in text.splitlines())


def test_partial_sync_is_deterministic_under_random_changes():
    rng = random.Random(5)
    before = three_services()
    for _ in range(10):
        after = copy.deepcopy(before)
        rng.choice(after.slices).endpoints = [Endpoint(f"10.180.1.{rng.randrange(1, 9)}", rng.choice([NODE, OTHER_NODE]))]
        rng.choice(after.services).affinity_timeout = rng.choice([0, 30])
        assert write_partial(before, after, TEST) == write_partial(before, after, TEST)
        before = after


# --- bad input ---------------------------------------------------------------------------------

def with_(svc_fields=None, slice_ip="10.180.0.1", **config):
    fields = dict(svc_fields or {})
    svc = service("svc1", fields.pop("cluster_ip", "172.30.0.41"), **fields)
    return one(svc, slice_ip, **config)


@pytest.mark.parametrize("bad, where, field", [
    (with_({"cluster_ip": "172.30.0.999"}), "Service ns1/svc1", "spec.clusterIP"),
    (with_({"external_ips": ["fd00::1"]}), "Service ns1/svc1", "spec.externalIPs"),
    (with_({"type": "LoadBalancer", "load_balancer_ips": ["1.2.3.4"], "load_balancer_source_ranges": ["bogus"]}),
     "Service ns1/svc1", "spec.loadBalancerSourceRanges"),
    (with_({"node_port": 70000}), "Service ns1/svc1", "spec.ports[].nodePort"),
    (with_({"protocol": "icmp"}), "Service ns1/svc1", "spec.ports[].protocol"),
    (with_({"affinity_timeout": -1}), "Service ns1/svc1", "spec.sessionAffinityConfig.clientIP.timeoutSeconds"),
    (with_(slice_ip="10.180.0.x"), "EndpointSlice ns1/svc1-abc", "endpoints[].addresses"),
    (with_(cluster_cidr="10.0.0.0/33"), "KubeProxyConfiguration", "clusterCIDR"),
    (with_(node_port_addresses=["eth0"]), "KubeProxyConfiguration", "nodePortAddresses"),
    (with_(masquerade_bit=40), "KubeProxyConfiguration", "nftables.masqueradeBit"),
    (with_(node_ips=["node-a"]), "KubeProxyConfiguration", "nodeIPs"),
])
def test_bad_input_raises_input_error_naming_object_and_field(bad, where, field):
    with pytest.raises(InputError) as error:
        write_full(bad)
    assert (error.value.where, error.value.field) == (where, field)


def test_bad_options_are_input_errors():
    with pytest.raises(InputError, match="service_cidrs"):
        write_full(with_(), WriterOptions(service_cidrs=("172.30.0.0/40",)))
    with pytest.raises(InputError, match="mark format"):
        write_full(with_(), WriterOptions(mark_format="hex"))


def test_bad_current_cluster_in_a_partial_sync_is_an_input_error():
    with pytest.raises(InputError, match="172.30.0.999"):
        write_partial(with_(), with_({"cluster_ip": "172.30.0.999"}))
