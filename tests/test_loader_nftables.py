"""The nftables loader: nft -f transactions and `nft list ruleset` text into the ruleset AST."""
import copy
import gc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.cluster.generate import generate
from bench.cluster.model import (Cluster, Endpoint, EndpointPort, EndpointSlice, Node, ProxyConfig,
                                 Service, ServicePort)
from bench.errors import InputError
from bench.loaders.nftables import (AnonSet, AnonVmap, Chain, Counter, CtState, Dnat, Fib, Lookup, MarkCheck,
                                    MarkSet, Masquerade, Meta, Numgen, Payload, Prefix, Rule, UpdateSet,
                                    Verdict, apply, load, load_file)
from bench.netaddr import ip_to_int
from bench.proxies.nftables import WriterOptions, write_full, write_partial, write_ruleset_listing
from tests.builders import mutate_words

# A node's `nft -a list ruleset`, written by hand after kube-proxy-rules §c: kube-proxy's table
# for four services (the apiserver, DNS with two endpoints, a LoadBalancer with a source
# range, externalTrafficPolicy Local and ClientIP affinity, and a service without endpoints),
# kubelet's canary chains (which iptables-nft also creates for IPv6), and an admin's table.
NODE_LISTING = """\
# Warning: table ip mangle is managed by iptables-nft, do not touch!
table ip mangle { # handle 1
	chain KUBE-KUBELET-CANARY { # handle 1
	}
}
# Warning: table ip6 mangle is managed by iptables-nft, do not touch!
table ip6 mangle { # handle 2
	chain KUBE-KUBELET-CANARY { # handle 1
	}
}
table ip host-firewall { # handle 4
	chain input { # handle 1
		type filter hook input priority filter + 10; policy accept;
		ct state established,related counter packets 81234 bytes 17233400 accept # handle 2
		ct state invalid counter packets 12 bytes 480 drop # handle 3
	}
}
table ip kube-proxy { # handle 7
	comment "rules for kube-proxy"
	set cluster-ips { # handle 3
		type ipv4_addr
		comment "Active ClusterIPs"
		elements = { 10.96.0.1, 10.96.0.10, 10.96.44.7,
			     10.96.123.45 }
	}

	map no-endpoint-services { # handle 5
		type ipv4_addr . inet_proto . inet_service : verdict
		comment "vmap to drop or reject packets to services with no endpoints"
		elements = { 10.96.44.7 . tcp . 8080 comment "shop/cart:http" : goto reject-chain }
	}

	map no-endpoint-nodeports { # handle 6
		type inet_proto . inet_service : verdict
		comment "vmap to drop or reject packets to service nodeports with no endpoints"
	}

	map firewall-ips { # handle 8
		type ipv4_addr . inet_proto . inet_service : verdict
		comment "destinations that are subject to LoadBalancerSourceRanges"
		elements = { 203.0.113.10 . tcp . 443 comment "shop/web:https" : goto firewall-HPJLA6DC-shop/web/tcp/https }
	}

	map service-ips { # handle 10
		type ipv4_addr . inet_proto . inet_service : verdict
		comment "ClusterIP, ExternalIP and LoadBalancer IP traffic"
		elements = { 10.96.0.1 . tcp . 443 : goto service-2QRHZV4L-default/kubernetes/tcp/https,
			     10.96.0.10 . udp . 53 : goto service-FY5PMXPG-kube-system/kube-dns/udp/dns,
			     10.96.123.45 . tcp . 443 : goto service-HPJLA6DC-shop/web/tcp/https,
			     203.0.113.10 . tcp . 443 : goto external-HPJLA6DC-shop/web/tcp/https }
	}

	map service-nodeports { # handle 11
		type inet_proto . inet_service : verdict
		comment "NodePort traffic"
		elements = { tcp . 31443 : goto external-HPJLA6DC-shop/web/tcp/https }
	}

	set affinity-GRL2K53N-shop/web/tcp/https__10.244.1.17/8443 { # handle 60
		type ipv4_addr
		flags dynamic,timeout
		timeout 3h
		elements = { 10.244.0.33 timeout 3h expires 2h41m12s960ms }
	}

	set affinity-JGX3E6LQ-shop/web/tcp/https__10.244.2.9/8443 { # handle 61
		type ipv4_addr
		flags dynamic,timeout
		timeout 3h
	}

	chain filter-prerouting-pre-dnat { # handle 1
		type filter hook prerouting priority dstnat - 10; policy accept;
		ct state new jump firewall-check # handle 24
	}

	chain filter-output-pre-dnat { # handle 2
		type filter hook output priority dstnat - 10; policy accept;
		ct state new jump firewall-check # handle 25
	}

	chain filter-forward { # handle 4
		type filter hook forward priority filter; policy accept;
		ct state new jump service-endpoints-check # handle 21
		ct state new jump cluster-ips-check # handle 31
	}

	chain filter-input { # handle 7
		type filter hook input priority filter; policy accept;
		ct state new jump nodeport-endpoints-check # handle 19
		ct state new jump service-endpoints-check # handle 20
	}

	chain filter-output { # handle 9
		type filter hook output priority filter; policy accept;
		ct state new jump service-endpoints-check # handle 22
		ct state new jump cluster-ips-check # handle 32
	}

	chain nat-prerouting { # handle 12
		type nat hook prerouting priority dstnat; policy accept;
		jump services # handle 28
	}

	chain nat-output { # handle 13
		type nat hook output priority dstnat; policy accept;
		jump services # handle 27
	}

	chain nat-postrouting { # handle 14
		type nat hook postrouting priority srcnat; policy accept;
		jump masquerading # handle 30
	}

	chain nodeport-endpoints-check { # handle 15
		ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @no-endpoint-nodeports # handle 40
	}

	chain service-endpoints-check { # handle 16
		ip daddr . meta l4proto . th dport vmap @no-endpoint-services # handle 39
	}

	chain firewall-check { # handle 17
		ip daddr . meta l4proto . th dport vmap @firewall-ips # handle 42
	}

	chain services { # handle 18
		ip daddr . meta l4proto . th dport vmap @service-ips # handle 44
		fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports # handle 45
	}

	chain masquerading { # handle 23
		meta mark & 0x00004000 == 0x00000000 return # handle 34
		meta mark set meta mark ^ 0x00004000 # handle 35
		masquerade fully-random # handle 36
	}

	chain cluster-ips-check { # handle 26
		ip daddr @cluster-ips reject comment "Reject traffic to invalid ports of ClusterIPs" # handle 37
		ip daddr 10.96.0.0/16 drop comment "Drop traffic to unallocated ClusterIPs" # handle 38
	}

	chain mark-for-masquerade { # handle 29
		meta mark set meta mark | 0x00004000 # handle 33
	}

	chain reject-chain { # handle 41
		comment "helper for @no-endpoint-services / @no-endpoint-nodeports"
		reject # handle 43
	}

	chain endpoint-SSXR5YTX-default/kubernetes/tcp/https__192.168.1.10/6443 { # handle 46
		ip saddr 192.168.1.10 jump mark-for-masquerade # handle 49
		meta l4proto tcp dnat to 192.168.1.10:6443 # handle 50
	}

	chain service-2QRHZV4L-default/kubernetes/tcp/https { # handle 47
		ip daddr 10.96.0.1 tcp dport 443 ip saddr != 10.244.0.0/16 jump mark-for-masquerade # handle 51
		numgen random mod 1 vmap { 0 : goto endpoint-SSXR5YTX-default/kubernetes/tcp/https__192.168.1.10/6443 } # handle 52
	}

	chain endpoint-LJ24RL4S-kube-system/kube-dns/udp/dns__10.244.0.5/53 { # handle 53
		ip saddr 10.244.0.5 jump mark-for-masquerade # handle 56
		meta l4proto udp dnat to 10.244.0.5:53 # handle 57
	}

	chain endpoint-4HJWWRW7-kube-system/kube-dns/udp/dns__10.244.1.3/53 { # handle 54
		ip saddr 10.244.1.3 jump mark-for-masquerade # handle 58
		meta l4proto udp dnat to 10.244.1.3:53 # handle 59
	}

	chain service-FY5PMXPG-kube-system/kube-dns/udp/dns { # handle 55
		ip daddr 10.96.0.10 udp dport 53 ip saddr != 10.244.0.0/16 jump mark-for-masquerade # handle 62
		numgen random mod 2 vmap { 0 : goto endpoint-LJ24RL4S-kube-system/kube-dns/udp/dns__10.244.0.5/53, 1 : goto endpoint-4HJWWRW7-kube-system/kube-dns/udp/dns__10.244.1.3/53 } # handle 63
	}

	chain endpoint-GRL2K53N-shop/web/tcp/https__10.244.1.17/8443 { # handle 64
		ip saddr 10.244.1.17 jump mark-for-masquerade # handle 70
		update @affinity-GRL2K53N-shop/web/tcp/https__10.244.1.17/8443 { ip saddr } # handle 71
		meta l4proto tcp dnat to 10.244.1.17:8443 # handle 72
	}

	chain endpoint-JGX3E6LQ-shop/web/tcp/https__10.244.2.9/8443 { # handle 65
		ip saddr 10.244.2.9 jump mark-for-masquerade # handle 73
		update @affinity-JGX3E6LQ-shop/web/tcp/https__10.244.2.9/8443 { ip saddr } # handle 74
		meta l4proto tcp dnat to 10.244.2.9:8443 # handle 75
	}

	chain service-HPJLA6DC-shop/web/tcp/https { # handle 66
		ip daddr 10.96.123.45 tcp dport 443 ip saddr != 10.244.0.0/16 jump mark-for-masquerade # handle 76
		ip saddr @affinity-GRL2K53N-shop/web/tcp/https__10.244.1.17/8443 goto endpoint-GRL2K53N-shop/web/tcp/https__10.244.1.17/8443 # handle 77
		ip saddr @affinity-JGX3E6LQ-shop/web/tcp/https__10.244.2.9/8443 goto endpoint-JGX3E6LQ-shop/web/tcp/https__10.244.2.9/8443 # handle 78
		numgen random mod 2 vmap { 0 : goto endpoint-GRL2K53N-shop/web/tcp/https__10.244.1.17/8443, 1 : goto endpoint-JGX3E6LQ-shop/web/tcp/https__10.244.2.9/8443 } # handle 79
	}

	chain local-HPJLA6DC-shop/web/tcp/https { # handle 67
		ip saddr @affinity-GRL2K53N-shop/web/tcp/https__10.244.1.17/8443 goto endpoint-GRL2K53N-shop/web/tcp/https__10.244.1.17/8443 # handle 80
		numgen random mod 1 vmap { 0 : goto endpoint-GRL2K53N-shop/web/tcp/https__10.244.1.17/8443 } # handle 81
	}

	chain external-HPJLA6DC-shop/web/tcp/https { # handle 68
		ip saddr 10.244.0.0/16 goto service-HPJLA6DC-shop/web/tcp/https comment "short-circuit pod traffic" # handle 82
		fib saddr type local jump mark-for-masquerade comment "masquerade local traffic" # handle 83
		fib saddr type local goto service-HPJLA6DC-shop/web/tcp/https comment "short-circuit local traffic" # handle 84
		goto local-HPJLA6DC-shop/web/tcp/https # handle 85
	}

	chain firewall-HPJLA6DC-shop/web/tcp/https { # handle 69
		ip saddr != 198.51.100.0/24 drop # handle 86
	}
}
"""
AFFINITY = "affinity-GRL2K53N-shop/web/tcp/https__10.244.1.17/8443"
SERVICE_CIDRS = WriterOptions(service_cidrs=("10.96.0.0/16",))


def node_cluster():
    """The cluster NODE_LISTING was taken from, seen from node worker-2."""
    def svc(ns, name, ip, port, **fields):
        return Service(ns, name, fields.pop("type", "ClusterIP"), ip, [port], **fields)

    services = [
        svc("default", "kubernetes", "10.96.0.1", ServicePort("https", "tcp", 443, 6443)),
        svc("kube-system", "kube-dns", "10.96.0.10", ServicePort("dns", "udp", 53, 53)),
        svc("shop", "web", "10.96.123.45", ServicePort("https", "tcp", 443, 8443, 31443), type="LoadBalancer",
            load_balancer_ips=["203.0.113.10"], load_balancer_source_ranges=["198.51.100.0/24"],
            external_traffic_policy="Local", affinity_timeout=10800),
        svc("shop", "cart", "10.96.44.7", ServicePort("http", "tcp", 8080, 8080)),
    ]
    slices = [
        EndpointSlice("default", "kubernetes", "kubernetes", [EndpointPort("https", "tcp", 6443)],
                      [Endpoint("192.168.1.10", "cp-1")]),
        EndpointSlice("kube-system", "kube-dns-x", "kube-dns", [EndpointPort("dns", "udp", 53)],
                      [Endpoint("10.244.0.5", "worker-1"), Endpoint("10.244.1.3", "worker-2")]),
        EndpointSlice("shop", "web-x", "web", [EndpointPort("https", "tcp", 8443)],
                      [Endpoint("10.244.1.17", "worker-2"), Endpoint("10.244.2.9", "worker-3")]),
    ]
    return Cluster(services, slices, [Node("worker-2", ["192.168.1.12"])],
                   ProxyConfig(cluster_cidr="10.244.0.0/16", node_ips=["192.168.1.12"]), node_name="worker-2")


def ip(text):
    return ip_to_int(text)


def first_rule(text, chain="c"):
    """The ops of the one rule in ``text``, loaded into chain ``c`` of table ``ip t``."""
    ruleset = load(f"add table ip t\nadd chain ip t {chain}\nadd chain ip t x\nadd set ip t s {{ type ipv4_addr ; }}\n"
                   f"add map ip t m {{ type ipv4_addr . inet_proto . inet_service : verdict ; }}\n"
                   f"add rule ip t {chain} {text}\n")
    return ruleset.table("t").chains[chain].rules[0]


# --- a real node's listing ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def node():
    return load(NODE_LISTING, "node.nft")


def test_node_listing_loads_every_table(node):
    assert sorted(node.tables) == [("ip", "host-firewall"), ("ip", "kube-proxy"), ("ip", "mangle"),
                                   ("ip6", "mangle")]
    assert node.tables["ip6", "mangle"].chains == {"KUBE-KUBELET-CANARY": Chain("KUBE-KUBELET-CANARY")}
    table = node.table()
    assert table.comment == "rules for kube-proxy"
    # kube-proxy: 23 fixed rules; kubernetes 2 + 2, DNS 2·2 + 2, web 2·3 + 4 + 2 + 4 + 1.
    assert node.rule_counts() == {"ip mangle": 0, "ip6 mangle": 0, "ip host-firewall": 2, "ip kube-proxy": 50}
    assert node.stats() == {"tables": 4, "chains": 3 + 16 + 2 + 3 + 6, "base_chains": 9, "rules": 52, "sets": 3,
                            "maps": 5, "elements": 12}


def test_node_listing_base_chains_have_their_numeric_priorities(node):
    chains = node.table().chains
    assert [(c.type, c.hook, c.priority, c.policy) for c in chains.values() if c.is_base] == [
        ("filter", "prerouting", -110, "accept"), ("filter", "output", -110, "accept"),
        ("filter", "forward", 0, "accept"), ("filter", "input", 0, "accept"), ("filter", "output", 0, "accept"),
        ("nat", "prerouting", -100, "accept"), ("nat", "output", -100, "accept"),
        ("nat", "postrouting", 100, "accept")]
    assert node.table("host-firewall").chains["input"].priority == 10
    assert node.table().chains["reject-chain"].comment == "helper for @no-endpoint-services / @no-endpoint-nodeports"


def test_node_listing_keys_and_values_are_numbers(node):
    sets = node.table().sets
    web = "service-HPJLA6DC-shop/web/tcp/https"
    assert sets["service-ips"].key_types == ("ipv4_addr", "inet_proto", "inet_service")
    assert sets["service-ips"].data_type == "verdict"
    assert sets["service-ips"].elements[ip("10.96.123.45"), 6, 443] == Verdict("goto", web)
    assert sets["service-ips"].elements[ip("10.96.0.10"), 17, 53].chain.startswith("service-FY5PMXPG-")
    assert sets["service-nodeports"].elements == {(6, 31443): Verdict("goto", "external-HPJLA6DC-shop/web/tcp/https")}
    assert sets["no-endpoint-services"].elements == {(ip("10.96.44.7"), 6, 8080): Verdict("goto", "reject-chain")}
    assert set(sets["cluster-ips"].elements) == {(ip(a),) for a in ("10.96.0.1", "10.96.0.10", "10.96.44.7", "10.96.123.45")}
    affinity = sets[AFFINITY]
    assert (affinity.flags, affinity.timeout, affinity.elements) == (frozenset({"dynamic", "timeout"}), 10800,
                                                                     {(ip("10.244.0.33"),): None})


def test_node_listing_rules_are_typed_ops(node):
    chains = node.table().chains
    services = chains["services"].rules
    assert services[0] == Rule((Lookup(("ip daddr", "meta l4proto", "th dport"), "service-ips", "==", True),))
    assert services[1].exprs == (Fib("daddr", "==", "local"), Payload("ip daddr", "!=", Prefix(ip("127.0.0.0"), 0xFF000000)),
                                 Lookup(("meta l4proto", "th dport"), "service-nodeports", "==", True))
    web = chains["service-HPJLA6DC-shop/web/tcp/https"].rules
    assert web[0].exprs == (Payload("ip daddr", "==", ip("10.96.123.45")), Payload("tcp dport", "==", 443),
                            Payload("ip saddr", "!=", Prefix(ip("10.244.0.0"), 0xFFFF0000)),
                            Verdict("jump", "mark-for-masquerade"))
    assert web[1].exprs[0] == Lookup(("ip saddr",), AFFINITY, "==", False)
    endpoint = "endpoint-GRL2K53N-shop/web/tcp/https__10.244.1.17/8443"
    assert web[3].exprs == (Numgen(2, 0, {0: Verdict("goto", endpoint),
                                          1: Verdict("goto", "endpoint-JGX3E6LQ-shop/web/tcp/https__10.244.2.9/8443")}),)
    assert [r.exprs for r in chains[endpoint].rules] == [
        (Payload("ip saddr", "==", ip("10.244.1.17")), Verdict("jump", "mark-for-masquerade")),
        (UpdateSet(AFFINITY, "ip saddr"),),
        (Meta("l4proto", "==", 6), Dnat(ip("10.244.1.17"), 8443)),
    ]
    assert [r.exprs for r in chains["masquerading"].rules] == [
        (MarkCheck(0x4000, "==", 0), Verdict("return")), (MarkSet("xor", 0x4000),), (Masquerade(True),)]
    assert chains["mark-for-masquerade"].rules[0].exprs == (MarkSet("or", 0x4000),)
    assert chains["filter-input"].rules[0].exprs == (CtState("==", frozenset({"new"})),
                                                     Verdict("jump", "nodeport-endpoints-check"))
    assert chains["external-HPJLA6DC-shop/web/tcp/https"].rules[0].comment == "short-circuit pod traffic"
    assert chains["reject-chain"].rules == [Rule((Verdict("reject"),))]
    counted = node.table("host-firewall").chains["input"].rules[0]
    assert counted.exprs == (CtState("==", frozenset({"established", "related"})), Counter(81234, 17233400),
                             Verdict("accept"))


def test_node_listing_is_the_ruleset_the_writer_sends(node):
    """The hand-written listing follows §c: it equals the writer's full sync for its cluster,
    once the affinity entry (connection state the writer cannot know) is set aside."""
    listed = copy.deepcopy(node.table())
    listed.sets[AFFINITY].elements.clear()
    assert listed == load(write_full(node_cluster(), SERVICE_CIDRS)).table()


# --- both forms, one AST -----------------------------------------------------------------------

@pytest.mark.parametrize("mix, seed", [("realistic", 3), ("realistic", 8), ("clusterip", 1)])
def test_transaction_and_listing_load_to_the_same_ast(mix, seed):
    generated = generate(80, 3, 4, seed=seed, mix=mix)
    options = WriterOptions(service_cidrs=("10.96.0.0/12",))
    from_transaction = load(write_full(generated, options), "full.nft")
    from_listing = load(write_ruleset_listing(generated, options), "listing.nft")
    assert from_transaction.tables == from_listing.tables
    assert from_transaction.stats() == from_listing.stats()


def test_node_cluster_listing_from_the_writer_equals_the_hand_written_one(node):
    written = load(write_ruleset_listing(node_cluster(), SERVICE_CIDRS)).table()
    listed = copy.deepcopy(node.table())
    listed.sets[AFFINITY].elements.clear()
    assert written == listed


@pytest.mark.parametrize("services, endpoints", [(1, 1), (10, 2), (10, 10)])
def test_counts_of_a_clusterip_cluster(services, endpoints):
    generated = generate(services, endpoints, 3, mix="clusterip")
    stats = load(write_full(generated)).stats()
    # Fixed: 8 base chains and 8 others, 22 rules; per service a service chain with 2 rules,
    # per endpoint a chain with 2 rules; 2 elements (cluster-ips, service-ips) per service.
    assert stats["chains"] == 16 + services * (1 + endpoints)
    assert stats["rules"] == 22 + services * (2 + 2 * endpoints)
    assert stats["elements"] == 2 * services


# --- partial syncs on a loaded base ------------------------------------------------------------

def changed(before):
    after = copy.deepcopy(before)
    del after.services[3]
    after.slices[5].endpoints = after.slices[5].endpoints[::2]
    after.services[7].internal_traffic_policy = "Local"
    after.services[9].affinity_timeout = 0 if after.services[9].affinity_timeout else 60
    return after


@pytest.mark.parametrize("seed", [2, 4])
def test_partial_sync_on_the_full_ruleset_gives_what_a_full_sync_gives(seed):
    before = generate(40, 3, 4, seed=seed)
    after = changed(before)
    options = WriterOptions(delete_stale_chains=True)
    base = load(write_full(before, options), "full.nft")
    snapshot = copy.deepcopy(base)
    patched = load(write_partial(before, after, options), "partial.nft", base=base)
    assert patched.tables == load(write_full(after, options)).tables
    assert base == snapshot  # the base is copied, never changed


def test_partial_sync_leaves_stale_chains_flushed_until_they_are_deleted():
    before = generate(40, 3, 4, seed=2)
    after = changed(before)
    base = load(write_full(before))
    patched = load(write_partial(before, after), base=base).table()
    full = load(write_full(after)).table()
    extra = set(patched.chains) - set(full.chains)
    assert extra and all(not patched.chains[name].rules for name in extra)
    assert patched.sets == full.sets
    assert {name: c for name, c in patched.chains.items() if name not in extra} == full.chains


@pytest.mark.parametrize("seed", [2, 4])
def test_apply_in_place_gives_what_loading_on_a_base_gives(seed):
    before = generate(40, 3, 4, seed=seed)
    after = changed(before)
    text = write_partial(before, after)
    ruleset = load(write_full(before))
    untouched = {name: chain for name, chain in ruleset.table().chains.items()}
    changes = apply(text, ruleset, "partial.nft")
    assert ruleset.tables == load(text, base=load(write_full(before))).tables
    table_changes = changes.tables["ip", "kube-proxy"]
    assert not changes.created and not changes.deleted
    # Every chain the text rewrote is reported, and the others are the very same objects.
    rewritten = {line.split()[4] for line in text.splitlines() if line.split()[:2] in (["add", "rule"],
                                                                                        ["flush", "chain"])}
    assert set(table_changes.chains) >= rewritten
    for name, chain in ruleset.table().chains.items():
        assert (chain is untouched.get(name)) == (name not in table_changes.chains)
    for name, items in table_changes.added_elements.items():
        assert all(ruleset.table().sets[name].elements[key] == data for key, data in items)
    for name, keys in table_changes.deleted_elements.items():
        elements = ruleset.table().sets[name].elements
        added = {key for key, _ in table_changes.added_elements.get(name, [])}
        assert all(key not in elements or key in added for key in keys)


def test_apply_reports_net_changes_and_undoes_everything_on_an_error():
    text = ("add table ip t\nadd chain ip t c\nadd chain ip t d\nadd rule ip t c jump d\n"
            "add map ip t m { type ipv4_addr : verdict ; }\nadd element ip t m { 1.1.1.1 : goto d }\n"
            "add set ip t s { type ipv4_addr ; }\nadd element ip t s { 2.2.2.2, 3.3.3.3 }\n")
    ruleset = load(text)
    snapshot = copy.deepcopy(ruleset)
    bad = ("add element ip t s { 4.4.4.4 }\ndelete element ip t s { 2.2.2.2 }\nflush chain ip t c\n"
           "delete map ip t m\nadd chain ip t e\nadd rule ip t d jump c\nadd rule ip t c jump nowhere\n")
    with pytest.raises(InputError, match="<string>:7"):
        apply(bad, ruleset)
    assert ruleset == snapshot
    changes = apply("add element ip t s { 4.4.4.4, 2.2.2.2 }\ndelete element ip t s { 3.3.3.3 }\n"
                    "destroy element ip t s { 2.2.2.2 }\nadd element ip t s { 2.2.2.2 }\n"
                    "flush chain ip t c\nadd chain ip t e\nadd rule ip t e accept\n", ruleset).tables["ip", "t"]
    assert changes.added_elements == {"s": [((ip("4.4.4.4"),), None)]}
    assert changes.deleted_elements == {"s": [(ip("3.3.3.3"),)]}
    assert sorted(changes.chains) == ["c", "e"] and not changes.deleted_chains
    assert ruleset.table("t").chains["c"].rules == []


def test_apply_finds_a_loop_closed_through_an_existing_chain():
    ruleset = load("add table ip t\nadd chain ip t a\nadd chain ip t b\nadd rule ip t a jump b\n")
    with pytest.raises(InputError, match="chain loop"):
        apply("add rule ip t b goto a\n", ruleset)
    assert ruleset.table("t").chains["b"].rules == []


# --- expressions ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text, ops", [
    ("ip saddr 10.0.0.1 accept", (Payload("ip saddr", "==", ip("10.0.0.1")), Verdict("accept"))),
    ("ip saddr == 10.0.0.1/32 drop", (Payload("ip saddr", "==", ip("10.0.0.1")), Verdict("drop"))),
    ("ip daddr 10.1.2.3/8 drop", (Payload("ip daddr", "==", Prefix(ip("10.0.0.0"), 0xFF000000)), Verdict("drop"))),
    ("ip saddr != { 10.0.0.0/8, 1.2.3.4, 10.0.0.0/8 } drop",
     (Payload("ip saddr", "!=", AnonSet((ip("1.2.3.4"), Prefix(ip("10.0.0.0"), 0xFF000000)))), Verdict("drop"))),
    ("ip daddr { 172.30.0.0/16 } drop", (Payload("ip daddr", "==", Prefix(ip("172.30.0.0"), 0xFFFF0000)), Verdict("drop"))),
    ("tcp dport != 80 return", (Payload("tcp dport", "!=", 80), Verdict("return"))),
    ("th dport { 53, 5353 } accept", (Payload("th dport", "==", AnonSet((53, 5353))), Verdict("accept"))),
    ("udp sport 53 continue", (Payload("udp sport", "==", 53), Verdict("continue"))),
    ("sctp dport 38412 accept", (Payload("sctp dport", "==", 38412), Verdict("accept"))),
    ("meta l4proto { tcp, udp, 132 } accept", (Meta("l4proto", "==", AnonSet((6, 17, 132))), Verdict("accept"))),
    ("meta l4proto sctp dnat ip to 10.0.0.1", (Meta("l4proto", "==", 132), Dnat(ip("10.0.0.1"), None))),
    ("ct state { established, related } accept", (CtState("==", frozenset({"established", "related"})), Verdict("accept"))),
    ("ct state != invalid accept", (CtState("!=", frozenset({"invalid"})), Verdict("accept"))),
    ("mark 0x10 accept", (MarkCheck(0xFFFFFFFF, "==", 0x10), Verdict("accept"))),
    ("meta mark and 0x4000 != 0 accept", (MarkCheck(0x4000, "!=", 0), Verdict("accept"))),
    ("meta mark set 0x1", (MarkSet("set", 1),)),
    ("mark set mark and 0xffffbfff", (MarkSet("and", 0xFFFFBFFF),)),
    ("fib saddr type != local drop", (Fib("saddr", "!=", "local"), Verdict("drop"))),
    ("counter", (Counter(0, 0),)),
    ("masquerade", (Masquerade(False),)),
    ("reject with tcp reset", (Verdict("reject"),)),
    ("reject with icmp type port-unreachable", (Verdict("reject"),)),
    ("ip saddr != @s goto x", (Lookup(("ip saddr",), "s", "!=", False), Verdict("goto", "x"))),
    ("add @s { ip saddr }", (UpdateSet("s", "ip saddr"),)),
    ("ip daddr . tcp dport . meta l4proto vmap @m", None),  # key order differs from the map's: an error
    ("numgen random mod 2 offset 1 vmap { 1 : goto x, 2 : drop }",
     (Numgen(2, 1, {1: Verdict("goto", "x"), 2: Verdict("drop")}),)),
    ("ip daddr . meta l4proto . th dport vmap { 1.2.3.4 . tcp . 80 : goto x }",
     (AnonVmap(("ip daddr", "meta l4proto", "th dport"), {(ip("1.2.3.4"), 6, 80): Verdict("goto", "x")}),)),
])
def test_expression_forms(text, ops):
    if ops is None:
        with pytest.raises(InputError, match="does not fit the key of m"):
            first_rule(text)
        return
    assert first_rule(text).exprs == ops


@pytest.mark.parametrize("written", ["-110", "dstnat-10", "dstnat - 10", "mangle + 40"])
def test_priority_forms(written):
    text = f"add table ip t\nadd chain ip t c {{ type filter hook prerouting priority {written} ; policy drop ; }}\n"
    chain = load(text).table("t").chains["c"]
    assert (chain.type, chain.hook, chain.priority, chain.policy) == ("filter", "prerouting", -110, "drop")


def test_rule_comment_is_kept_beside_the_ops():
    rule = first_rule('ip saddr 1.2.3.4 drop comment "no thanks"')
    assert rule.comment == "no thanks" and rule.exprs[-1] == Verdict("drop")


# --- commands ------------------------------------------------------------------------------------

def test_forward_references_resolve_at_the_end():
    text = """\
add table ip t
add chain ip t start
add rule ip t start ip daddr . meta l4proto . th dport vmap @later-map
add rule ip t start ip saddr @later-set jump later-chain
add map ip t later-map { type ipv4_addr . inet_proto . inet_service : verdict ; }
add element ip t later-map { 1.2.3.4 . tcp . 80 : goto last-chain }
add set ip t later-set { type ipv4_addr ; }
add chain ip t later-chain
add chain ip t last-chain
"""
    table = load(text).table("t")
    assert table.sets["later-map"].elements == {(ip("1.2.3.4"), 6, 80): Verdict("goto", "last-chain")}
    assert len(table.chains["start"].rules) == 2


def test_several_commands_on_a_line_and_a_block_in_a_transaction():
    text = """\
flush ruleset
add table ip t ; add chain ip t c { jump d ; } ; add chain ip t d
table ip t {
	chain d {
		accept
	}
	set s { type ipv4_addr; elements = { 1.2.3.4, 5.6.7.8 } }
}
insert rule ip t d drop
"""
    table = load(text).table("t")
    assert [r.exprs for r in table.chains["c"].rules] == [(Verdict("jump", "d"),)]
    assert [r.exprs for r in table.chains["d"].rules] == [(Verdict("drop"),), (Verdict("accept"),)]
    assert len(table.sets["s"].elements) == 2


def test_create_destroy_flush_and_delete():
    base = load("add table ip t\nadd chain ip t c\nadd rule ip t c accept\n"
                "add set ip t s { type ipv4_addr ; }\nadd element ip t s { 1.1.1.1, 2.2.2.2 }\n")
    ruleset = load("flush chain ip t c\ndelete chain ip t c\ndestroy chain ip t c\ndestroy set ip t gone\n"
                   "delete element ip t s { 1.1.1.1 }\nadd element ip t s { 2.2.2.2 }\n"
                   "destroy element ip t s { 9.9.9.9 }\ncreate chain ip t n\n", base=base)
    table = ruleset.table("t")
    assert list(table.chains) == ["n"] and table.sets["s"].elements == {(ip("2.2.2.2"),): None}
    assert list(load("delete table ip t\n", base=base).tables) == []
    assert load("flush table ip t\n", base=base).table("t").chains["c"].rules == []
    assert load("flush set ip t s\n", base=base).table("t").sets["s"].elements == {}
    assert base.table("t").chains["c"].rules[0].exprs == (Verdict("accept"),)


def test_adding_an_existing_element_with_the_same_verdict_is_allowed():
    text = ("add table ip t\nadd chain ip t c\nadd map ip t m { type inet_proto . inet_service : verdict ; }\n"
            "add element ip t m { tcp . 80 : goto c }\nadd element ip t m { tcp . 80 : goto c }\n")
    assert len(load(text).table("t").sets["m"].elements) == 1


# --- errors --------------------------------------------------------------------------------------

T = "add table ip t\nadd chain ip t c\n"
M = "add map ip t m { type ipv4_addr . inet_proto . inet_service : verdict ; }\n"


@pytest.mark.parametrize("text, line, message", [
    (T + "add rule ip t c ip saddr 10.0.0.256 drop\n", 3, "not an IPv4 address"),
    (T + "add rule ip t c tcp dport 65536 drop\n", 3, "port must be a number"),
    (T + "add rule ip t c ip saddr 10.0.0.0/33 drop\n", 3, "prefix length"),
    (T + "add rule ip t c ip6 saddr ::1 drop\n", 3, "unknown expression 'ip6'"),
    (T + "add rule ip t c ct status dnat drop\n", 3, "expected 'state'"),
    (T + "add rule ip t c drop accept\n", 3, "after the rule's verdict"),
    (T + "add rule ip t c numgen random mod 2 vmap { 0 : goto c } counter\n", 3, "after the rule's verdict"),
    (T + "add rule ip t c ip saddr . tcp dport 1.2.3.4 . 80 drop\n", 3, "concatenation"),
    (T + 'add rule ip t c drop comment "unterminated\n', 3, "unterminated string"),
    (T + "add rule ip t c ip saddr { 1.2.3.4\n\n", 3, "never closed"),
    (T + "add rule ip t c ip saddr {\n1.2.3.4,\n1.2.3.5 } drop drop\n", 3, "after the rule's verdict"),
    (T + "}\n", 3, "without an open block"),
    (T + "list ruleset\n", 3, "unknown command"),
    (T + "add rule ip t nochain accept\n", 3, "no chain nochain"),
    (T + "add rule ip t c jump nowhere\nadd chain ip t d\n", 3, "no chain nowhere"),
    (T + "add rule ip t c ip saddr @nothing drop\n", 3, "no set or map nothing"),
    ("add table ip t\nadd chain ip t b { type filter hook input priority 0 ; }\nadd chain ip t c\n"
     "add rule ip t c jump b\n", 4, "base chain b"),
    (T + "add chain ip t d\nadd rule ip t c jump d\nadd rule ip t d goto c\n", 4, "chain loop c -> d -> c"),
    (T + M + "add rule ip t c ip daddr . meta l4proto . th dport vmap @m\nadd chain ip t d\n"
     "add element ip t m { 1.2.3.4 . tcp . 80 : goto c }\n", 6, "chain loop"),
    (T + "add set ip t s { type ipv4_addr ; }\nadd rule ip t c ip saddr . tcp dport @s drop\n", 4, "does not fit"),
    (T + M + "add rule ip t c ip daddr @m drop\n", 4, "is a map"),
    (T + "add set ip t s { type ipv4_addr ; }\nadd rule ip t c ip daddr vmap @s\n", 4, "vmap needs a verdict map"),
    (T + M + "add element ip t m { 1.2.3.4 . tcp . 80 : drop }\nadd element ip t m { 1.2.3.4 . tcp . 80 : accept }\n",
     5, "already has"),
    (T + M + "add element ip t m { 1.2.3.4 . tcp }\n", 4, "expected '.'"),
    (T + M + "add element ip t m { 1.2.3.4 . tcp . 80 }\n", 4, "expected ':'"),
    (T + M + "delete element ip t m { 1.2.3.4 . tcp . 80 }\n", 4, "has no element"),
    (T + "add rule ip t c accept\ndelete chain ip t c\n", 4, "not empty"),
    (T + "add chain ip t d\nadd rule ip t c jump d\ndelete chain ip t d\n", 5, "still referenced"),
    (T + M + "add element ip t m { 1.2.3.4 . tcp . 80 : goto c }\nadd chain ip t d\ndelete chain ip t c\n",
     6, "still referenced"),
    (T + "add set ip t s { type ipv4_addr ; }\nadd rule ip t c ip saddr @s drop\ndelete set ip t s\n", 5, "still used"),
    (T + "add set ip t s\n", 3, "needs a type"),
    (T + "add set ip t s { flags timeout ; }\n", 3, "needs a type"),
    (T + "add set ip t s { type ipv6_addr ; }\n", 3, "unsupported key type"),
    (T + "add map ip t m { type ipv4_addr : ipv4_addr ; }\n", 3, "only verdict maps"),
    (T + "add set ip t s { type ipv4_addr : verdict ; }\n", 3, "declare a map"),
    (T + "add set ip t s { type ipv4_addr ; }\nadd set ip t s { type ipv4_addr ; flags interval ; }\n", 4, "other flags"),
    (T + "add set ip t s { type ipv4_addr ; }\nadd map ip t s { type ipv4_addr : verdict ; }\n", 4, "another type"),
    ("add table ip t\nadd chain ip t n { type nat hook forward priority 0 ; }\n", 2, "cannot use hook"),
    ("add table ip t\nadd chain ip t n { type nat hook prerouting priority -200 ; }\n", 2, "above -200"),
    ("add table ip t\nadd chain ip t n { type filter hook input priority dstnat ; }\n", 2, "cannot be used with hook"),
    ("add table ip t\nadd chain ip t n { type filter hook input priority sooner ; }\n", 2, "unknown priority"),
    ("add table ip t\nadd chain ip t n { policy drop ; }\n", 2, "no base chain"),
    ("add table ip t\nadd chain ip t n\nadd chain ip t n { type filter hook input priority 0 ; }\n", 3,
     "different chain"),
    ("add table ip t\ncreate table ip t\n", 2, "already exists"),
    ("add table ip t\nadd chain ip t c\ncreate chain ip t c\n", 3, "already exists"),
    ("add chain ip t c\n", 1, "no table ip t"),
    ("add table ip t\nadd chain ip t 9c\n", 2, "not a valid chain name"),
    ("add table ip t\ndelete rule ip t c handle 4\n", 2, "not supported"),
    ("add table ip t\nadd chain ip t c\nadd rule ip t c index 0 accept\n", 3, "not supported"),
    ("table ip t {\n\tchain c {\n\t\taccept\n\t}\n", 1, "table block is never closed"),
    ("table ip t {\n\tflags dormant\n}\n", 2, "unexpected 'flags'"),
    ("table ip t {\n\tset s {\n\t\ttype ipv4_addr\n\t\telements = { 1.2.3.4,\n\t\t\t5.6.7.8.9 }\n\t}\n}\n", 5,
     "not an IPv4 address"),
    ("table ip t {\n\tset s {\n\t\telements = { 1.2.3.4 }\n\t}\n}\n", 3, "needs its type first"),
    ("table ip t {\n\tchain c {\n\t\tip saddr {\n 1.2.3.4, 1.2.3.x } drop\n\t}\n}\n", 3, "not an IPv4 address"),
])
def test_bad_input_names_the_line(text, line, message):
    with pytest.raises(InputError, match=message) as error:
        load(text, "rules.nft")
    assert error.value.where == f"rules.nft:{line}"


def test_load_leaves_the_garbage_collector_as_it_was():
    assert gc.isenabled()
    load(NODE_LISTING)
    assert gc.isenabled()
    with pytest.raises(InputError):
        load("bogus")
    assert gc.isenabled()


def test_load_file(tmp_path):
    path = tmp_path / "ruleset.nft"
    path.write_text(NODE_LISTING)
    assert load_file(path).source == str(path)
    with pytest.raises(InputError, match="no such file"):
        load_file(tmp_path / "missing.nft")
    with pytest.raises(InputError, match="is a directory"):
        load_file(tmp_path)
    binary = tmp_path / "binary.nft"
    binary.write_bytes(b"add table ip t\n\xff\n")
    with pytest.raises(InputError, match="not UTF-8"):
        load_file(binary)
    broken = tmp_path / "broken.nft"
    broken.write_text("add table ip t\nadd chain ip t c\nadd rule ip t c frobnicate\n")
    with pytest.raises(InputError, match=f"{broken}:3"):
        load_file(broken)


# --- fuzzing: bad input never escapes as anything but InputError ---------------------------------

FUZZ = settings(max_examples=300, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SMALL = write_full(node_cluster(), SERVICE_CIDRS)
SMALL_LINES = SMALL.splitlines()
WORDS = sorted({word for line in SMALL_LINES + NODE_LISTING.splitlines() for word in line.split()} | {
    "{", "}", ";", ",", ":", ".", "@", "@s", '"', "#", "==", "!=", "vmap", "numgen", "mod", "0", "1", "-1",
    "65536", "4294967296", "0x", "1.2.3.4/33", "create", "destroy", "insert", "element", "map", "set", "ip6",
    "inet", "table", "chain", "priority", "hook", "type", "policy", "elements", "=", "timeout", "3h", "flags",
    "dynamic", "\u00e9", "\x00", "\ud800", "9" * 5000})


def load_or_input_error(text: str) -> None:
    try:
        load(text, "fuzz")
    except InputError as error:
        assert error.where.startswith("fuzz")


@FUZZ
@given(st.text(max_size=200))
def test_arbitrary_text_only_raises_input_error(text):
    load_or_input_error(text)


@FUZZ
@given(st.lists(st.sampled_from(["add table ip t\n", "add chain ip t c", "add chain ip t d", " { ", " } ", " ; ",
                                 "\n", "type filter hook input priority 0", "add rule ip t c ", "jump d",
                                 "goto c", "ip saddr", " 1.2.3.4", " . ", " : ", "add map ip t m",
                                 "type ipv4_addr", " : verdict", "add element ip t m", "vmap @m", "table ip t",
                                 "chain c", "set s", "elements = ", "delete chain ip t d", "flush chain ip t c",
                                 '"', "#", ","]),
                max_size=40).map("".join))
def test_arbitrary_structure_only_raises_input_error(text):
    load_or_input_error(text)


@st.composite
def mutated(draw, lines):
    """``lines`` with a few words deleted, repeated, swapped or replaced by other nft words."""
    return mutate_words(draw, lines, st.integers(0, len(lines) - 1), WORDS)


@FUZZ
@given(mutated(SMALL_LINES))
def test_mutated_transactions_only_raise_input_error(text):
    load_or_input_error(text)


@FUZZ
@given(mutated(NODE_LISTING.splitlines()))
def test_mutated_listings_only_raise_input_error(text):
    load_or_input_error(text)
