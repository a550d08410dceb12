"""The nftables kernels (nft_do_chain over compiled rule blobs) on kube-proxy's own rulesets.

Rulesets come from the writer (bench.proxies.nftables.write_full) on small hand-built
clusters, loaded by bench.loaders.nftables and compiled by kernels.nftblob. Every case runs
through both backends (the ``backend`` fixture) and, where it matters, the two are compared
counter for counter. The host is the one tests/test_writer_nftables.py fakes: node
192.168.0.2, pod CIDR 10.0.0.0/8, service CIDR 172.30.0.0/16, masquerade mark 0x4000.
"""
import numpy as np
import pytest

from bench.cluster.model import (Cluster, Endpoint, EndpointPort, EndpointSlice, Node, ProxyConfig,
                                 Service, ServicePort)
from bench.loaders.nftables import apply, load
from bench.netaddr import ip_to_int
from bench.proxies.nftables import WriterOptions, write_full
from kernels import layout as L
from kernels.nftblob import compile_changes, compile_table
from tests.conftest import compiled_available, kernel

NODE_IP = "192.168.0.2"
TEST = WriterOptions(service_cidrs=("172.30.0.0/16",), mark_format="test")
MASQ_MARK = 0x4000
POD = "10.0.0.5"
OUTSIDER = "203.0.113.9"
# chi-square with 4 degrees of freedom: P(X > 23.5127) = 1e-4
CHI2_DF4_P1E4 = 23.5127


# ---- clusters and rulesets --------------------------------------------------------------------

def service(name, cluster_ip, *, node_port=0, port=80, **fields):
    kind = fields.pop("type", "NodePort" if node_port else "ClusterIP")
    return Service("ns1", name, kind, cluster_ip, [ServicePort("p80", "tcp", port, 80, node_port)], **fields)


def endpoints(service_name, *addresses):
    eps = [Endpoint(a, "node2") for a in addresses]
    return EndpointSlice("ns1", f"{service_name}-abc", service_name, [EndpointPort("p80", "tcp", 80)], eps)


def cluster(services, slices):
    config = ProxyConfig(cluster_cidr="10.0.0.0/8", node_ips=[NODE_IP])
    return Cluster(list(services), list(slices), [Node("node1", [NODE_IP]), Node("node2", ["192.168.0.3"])],
                   config, node_name="node1")


def many_services(count, endpoints_each=2):
    """``count`` ClusterIP services 172.30.x.y, each with ``endpoints_each`` endpoints."""
    services, slices = [], []
    for i in range(count):
        name = f"svc{i}"
        services.append(service(name, f"172.30.{1 + i // 250}.{1 + i % 250}"))
        slices.append(endpoints(name, *(f"10.{1 + i // 250}.{i % 250}.{e + 1}" for e in range(endpoints_each))))
    return cluster(services, slices)


def ruleset(backend, c, seed=1):
    table = load(write_full(c, TEST)).table()
    return kernel("nftables", backend).Ruleset(compile_table(table, seed), [ip_to_int(NODE_IP)], seed)


def packets(dst, dport=80, src=POD, count=1, ctstate=L.CT_NEW, mark=0, time=0):
    p = np.zeros(count, dtype=L.PACKET_DTYPE)
    dst = dst if isinstance(dst, int) else ip_to_int(dst)
    p["src"], p["dst"], p["dport"], p["sport"] = ip_to_int(src), dst, dport, 40000
    p["proto"], p["ctstate"], p["mark"], p["time"] = 6, ctstate, mark, time
    return p


def run(rs, p, hook=L.HOOK_PREROUTING):
    results = np.zeros(len(p), dtype=L.NFT_RESULT_DTYPE)
    rs.run(p, hook, results)
    return results


def both(c, p, hook=L.HOOK_PREROUTING, seed=1):
    """Results of both backends, asserted identical (same seed: same draws, same counters)."""
    cython, python = (run(ruleset(b, c, seed), p, hook) for b in ("cython", "python"))
    np.testing.assert_array_equal(cython, python)
    return python


# ---- layout -----------------------------------------------------------------------------------

@pytest.mark.skipif(not compiled_available(), reason="compiled kernels not built")
def test_layout_constants_and_result_struct_match_layout_py():
    nft = kernel("nftables", "cython")
    for name, value in nft.LAYOUT_CONSTANTS.items():
        assert getattr(L, name) == value, name
    size, offsets = nft.struct_layout()["result"]
    assert size == L.NFT_RESULT_DTYPE.itemsize
    assert offsets == {name: L.NFT_RESULT_DTYPE.fields[name][1] for name in L.NFT_RESULT_DTYPE.names}


def test_compiled_blob_ends_every_chain_with_an_is_last_marker():
    table = load(write_full(many_services(3), TEST)).table()
    c = compile_table(table)
    ends = list(c.chain_offset[1:]) + [len(c.blob)]
    for end in ends:
        assert c.blob[end - L.NFT_RULE_DP_BYTES + L.NFT_DP_IS_LAST] == 1
    assert {s.name: s.key_len for s in c.sets}["service-ips"] == 12


# ---- the first packet of a connection ---------------------------------------------------------

def test_clusterip_packet_is_dnatted_to_one_of_its_endpoints(backend):
    rs = ruleset(backend, many_services(10))
    r = run(rs, packets("172.30.1.4", count=50))
    assert set(r["verdict"]) == {L.V_DNAT}
    assert {ip for ip in r["dnat_ip"]} <= {ip_to_int("10.1.3.1"), ip_to_int("10.1.3.2")}
    assert set(r["dnat_port"]) == {80}
    assert set(r["mark"]) == {0}  # a pod source is not marked for masquerade


def test_service_hit_costs_the_same_rules_at_10_and_2000_services(backend):
    small = run(ruleset(backend, many_services(10)), packets("172.30.1.4"))
    large = run(ruleset(backend, many_services(2000)), packets("172.30.8.200"))
    # filter-prerouting-pre-dnat: ct state new jump firewall-check, the firewall-ips lookup (2);
    # nat: jump services, the service-ips vmap, the service chain's masquerade check and numgen,
    # the endpoint chain's masquerade check and dnat (6).
    for r in (small, large):
        assert r["verdict"][0] == L.V_DNAT
        assert r["entries_visited"][0] == 2 + 6
        assert r["set_lookups"][0] == 3  # firewall-ips, service-ips, numgen's map
        assert r["rng_draws"][0] == 1
    assert small["expressions"][0] == large["expressions"][0]


def test_every_service_of_2000_is_reachable_after_the_map_resizes(backend):
    rs = ruleset(backend, many_services(2000, endpoints_each=1))
    rs.maintain()
    dst = [f"172.30.{1 + i // 250}.{1 + i % 250}" for i in range(2000)]
    p = np.concatenate([packets(d) for d in dst])
    r = run(rs, p)
    assert (r["verdict"] == L.V_DNAT).all()
    expected = [ip_to_int(f"10.{1 + i // 250}.{i % 250}.1") for i in range(2000)]
    np.testing.assert_array_equal(r["dnat_ip"], expected)
    # rhash keeps the load at or below 3/4 after maintain(): short chains.
    assert r["bucket_entries_compared"].mean() < 3


def test_non_service_packet_falls_through_accepted_and_untouched(backend):
    r = run(ruleset(backend, many_services(10)), packets("8.8.8.8"))
    assert r["verdict"][0] == L.V_ACCEPT and r["dnat_ip"][0] == 0 and r["mark"][0] == 0
    # pre-dnat firewall check (2 rules), jump services, the miss on service-ips, the nodeport
    # rule failing at fib daddr type local.
    assert r["entries_visited"][0] == 5


def test_non_pod_source_is_marked_then_masqueraded_at_postrouting(backend):
    rs = ruleset(backend, many_services(3))
    r = run(rs, packets("172.30.1.2", src=OUTSIDER))
    assert r["verdict"][0] == L.V_DNAT and r["mark"][0] == MASQ_MARK
    post = run(rs, packets(int(r["dnat_ip"][0]), src=OUTSIDER, mark=int(r["mark"][0])), L.HOOK_POSTROUTING)
    assert post["verdict"][0] == L.V_MASQUERADE and post["masquerade"][0] == 1
    assert post["mark"][0] == 0  # masquerading clears the bit it tested


def test_unmarked_packet_is_not_masqueraded(backend):
    post = run(ruleset(backend, many_services(3)), packets("10.1.0.1"), L.HOOK_POSTROUTING)
    assert post["verdict"][0] == L.V_ACCEPT and post["masquerade"][0] == 0


def test_nodeport_on_a_local_address_goes_through_the_external_chain(backend):
    svc = service("np", "172.30.0.41", node_port=30001)
    rs = ruleset(backend, cluster([svc], [endpoints("np", "10.180.0.1")]))
    local = run(rs, packets(NODE_IP, dport=30001, src=OUTSIDER))
    assert local["verdict"][0] == L.V_DNAT and local["dnat_ip"][0] == ip_to_int("10.180.0.1")
    assert local["mark"][0] == MASQ_MARK  # external traffic with policy Cluster is masqueraded
    elsewhere = run(rs, packets("192.168.0.77", dport=30001, src=OUTSIDER))
    assert elsewhere["verdict"][0] == L.V_ACCEPT and elsewhere["dnat_ip"][0] == 0
    # 127.0.0.0/8 is not local (node addresses only), and the rule excludes it too.
    loopback = run(rs, packets("127.0.0.1", dport=30001))
    assert loopback["verdict"][0] == L.V_ACCEPT


def test_service_without_endpoints_is_rejected_through_the_no_endpoint_map(backend):
    svc = service("empty", "172.30.0.50")
    rs = ruleset(backend, cluster([svc], []))
    for hook in (L.HOOK_FORWARD, L.HOOK_OUTPUT, L.HOOK_INPUT):
        assert run(rs, packets("172.30.0.50"), hook)["verdict"][0] == L.V_REJECT
    assert run(rs, packets("172.30.0.50", ctstate=L.CT_ESTABLISHED), L.HOOK_FORWARD)["verdict"][0] == L.V_ACCEPT


def test_nodeport_without_endpoints_is_rejected_on_input(backend):
    svc = service("empty", "172.30.0.50", node_port=30002)
    rs = ruleset(backend, cluster([svc], []))
    assert run(rs, packets(NODE_IP, dport=30002), L.HOOK_INPUT)["verdict"][0] == L.V_REJECT


def test_cluster_ips_check_rejects_a_wrong_port_and_drops_an_unallocated_address(backend):
    rs = ruleset(backend, many_services(3))
    assert run(rs, packets("172.30.1.2", dport=81), L.HOOK_FORWARD)["verdict"][0] == L.V_REJECT
    assert run(rs, packets("172.30.200.200"), L.HOOK_FORWARD)["verdict"][0] == L.V_DROP
    # After DNAT on output the destination is the endpoint: the check lets it through.
    assert run(rs, packets("172.30.1.2"), L.HOOK_OUTPUT)["verdict"][0] == L.V_DNAT


def test_load_balancer_source_ranges_drop_other_sources_before_dnat(backend):
    svc = service("lb", "172.30.0.41", type="LoadBalancer", node_port=3001, load_balancer_ips=["5.6.7.8"],
                  load_balancer_source_ranges=["203.0.113.0/25"])
    rs = ruleset(backend, cluster([svc], [endpoints("lb", "10.180.0.1")]))
    allowed = run(rs, packets("5.6.7.8", src="203.0.113.9"))
    assert allowed["verdict"][0] == L.V_DNAT and allowed["dnat_ip"][0] == ip_to_int("10.180.0.1")
    denied = run(rs, packets("5.6.7.8", src="198.51.100.1"))
    assert denied["verdict"][0] == L.V_DROP and denied["dnat_ip"][0] == 0


# ---- numgen, affinity, the jump stack, seeds ----------------------------------------------------

def test_numgen_spreads_draws_evenly_over_the_endpoints(backend):
    n, draws = 5, 20000
    rs = ruleset(backend, many_services(1, endpoints_each=n), seed=7)
    r = run(rs, packets("172.30.1.1", count=draws))
    counts = np.array([(r["dnat_ip"] == ip_to_int(f"10.1.0.{e + 1}")).sum() for e in range(n)])
    assert counts.sum() == draws
    expected = draws / n
    assert ((counts - expected) ** 2 / expected).sum() < CHI2_DF4_P1E4


def test_client_ip_affinity_sticks_until_the_timeout(backend):
    svc = service("sticky", "172.30.0.41", affinity_timeout=100)
    rs = ruleset(backend, cluster([svc], [endpoints("sticky", *(f"10.180.0.{i}" for i in range(1, 9)))]))
    first = run(rs, packets("172.30.0.41", time=10))["dnat_ip"][0]
    later = run(rs, packets("172.30.0.41", count=20, time=50))
    assert set(later["dnat_ip"]) == {first}
    assert later["rng_draws"].sum() == 0  # the affinity set answered: no numgen
    expired = run(rs, packets("172.30.0.41", count=20, time=10_000))
    assert expired["rng_draws"][0] == 1


def test_jump_stack_overflow_drops_the_packet(backend):
    def chained(depth):
        lines = ["add table ip t", "add chain ip t base { type filter hook prerouting priority 0 ; policy accept ; }",
                 "add rule ip t base jump c1"]
        for i in range(1, depth + 1):
            lines.append(f"add chain ip t c{i}")
            if i < depth:
                lines.append(f"add rule ip t c{i} jump c{i + 1}")
        lines.append(f"add rule ip t c{depth} mark set 7")
        return kernel("nftables", backend).Ruleset(compile_table(load("\n".join(lines)).table("t")))

    ok = run(chained(L.NFT_JUMP_STACK_SIZE), packets("1.2.3.4"))
    assert ok["verdict"][0] == L.V_ACCEPT and ok["mark"][0] == 7
    assert ok["jumps"][0] == L.NFT_JUMP_STACK_SIZE
    assert run(chained(L.NFT_JUMP_STACK_SIZE + 1), packets("1.2.3.4"))["verdict"][0] == L.V_DROP


@pytest.mark.skipif(not compiled_available(), reason="compiled kernels not built")
def test_both_backends_agree_on_a_mixed_batch():
    c = many_services(20, endpoints_each=3)
    dsts = ["172.30.1.5", "8.8.8.8", NODE_IP, "172.30.1.19", "172.30.9.9"]
    p = np.concatenate([packets(d, src=s) for d in dsts for s in (POD, OUTSIDER)] * 20)
    for hook in (L.HOOK_PREROUTING, L.HOOK_OUTPUT, L.HOOK_FORWARD, L.HOOK_INPUT, L.HOOK_POSTROUTING):
        both(c, p, hook)


def test_same_seed_same_counters_and_another_seed_other_picks(backend):
    c = many_services(5, endpoints_each=4)
    p = packets("172.30.1.3", count=200)
    a, b = run(ruleset(backend, c, seed=3), p), run(ruleset(backend, c, seed=3), p)
    np.testing.assert_array_equal(a, b)
    other = run(ruleset(backend, c, seed=4), p)
    assert (other["dnat_ip"] != a["dnat_ip"]).any()


def test_walk_one_traces_rules_and_decide_visits_every_endpoint_in_map_order():
    from kernels.reference.nftables import Ruleset
    c = many_services(1, endpoints_each=3)
    rs = Ruleset(compile_table(load(write_full(c, TEST)).table()), [ip_to_int(NODE_IP)])
    picked = []
    for index in range(3):
        trace = []
        row = rs.walk_one(packets("172.30.1.1")[0], L.HOOK_PREROUTING, trace, decide=lambda n: index)
        picked.append(int(row["dnat_ip"]))
        names = [rs.compiled.chain_names[chain] for chain, _, _ in trace]
        assert names[-1].startswith("endpoint-") and trace[-1][2] == L.NFT_V_ACCEPT
        assert row["rng_draws"] == 1
    assert picked == [ip_to_int(f"10.1.0.{e}") for e in (1, 2, 3)]


# ---- memory -----------------------------------------------------------------------------------

@pytest.mark.skipif(not compiled_available(), reason="compiled kernels not built")
def test_memory_grows_per_service_and_both_backends_model_the_same_bytes():
    small, large = many_services(10), many_services(100)
    per = {}
    for b in ("cython", "python"):
        rs_small, rs_large = ruleset(b, small), ruleset(b, large)
        per[b] = (rs_small.modelled_bytes(), rs_large.modelled_bytes())
        assert rs_large.model_bytes() > rs_small.model_bytes() > 0
    assert per["cython"] == per["python"]
    growth = (per["python"][1] - per["python"][0]) / 90
    # A service with two endpoints: five small chains and their rules, a few map elements.
    assert 1000 < growth < 10000


@pytest.mark.skipif(not compiled_available(), reason="compiled kernels not built")
def test_hand_written_table_with_anonymous_maps_sets_and_negated_lookups():
    text = """add table ip t
add chain ip t base { type filter hook input priority 0 ; policy accept ; }
add chain ip t rej
add rule ip t rej reject
add set ip t blocked { type ipv4_addr ; }
add element ip t blocked { 9.9.9.9 }
add rule ip t base ip saddr @blocked drop
add rule ip t base meta l4proto != { tcp, udp } accept
add rule ip t base ip daddr . meta l4proto . th dport vmap { 1.2.3.4 . tcp . 80 : drop, 1.2.3.5 . tcp . 80 : goto rej }
add rule ip t base th dport { 1500, 3000 } mark set 5
add rule ip t base ip daddr != @blocked mark set mark or 0x10
"""
    p = np.concatenate([packets("1.2.3.4"), packets("1.2.3.5"), packets("1.2.3.6", dport=1500),
                        packets("1.2.3.6", src="9.9.9.9"), packets("1.2.3.6")])
    p["proto"][4] = 1  # icmp
    table = load(text).table("t")
    cython, python = (run(kernel("nftables", b).Ruleset(compile_table(table)), p, L.HOOK_INPUT)
                      for b in ("cython", "python"))
    np.testing.assert_array_equal(cython, python)
    assert list(python["verdict"]) == [L.V_DROP, L.V_REJECT, L.V_ACCEPT, L.V_DROP, L.V_ACCEPT]
    assert python["mark"][2] == 5 | 0x10
    assert list(python["entries_visited"]) == [3, 4, 5, 1, 2]


# ---- patches: a transaction applied to a compiled table ------------------------------------

def test_a_patch_rewrites_chains_and_sets_as_a_compile_from_scratch_would(backend):
    ruleset = load("add table ip t\nadd chain ip t pre { type filter hook prerouting priority 0 ; }\n"
                   "add chain ip t c\nadd rule ip t pre ip daddr @s jump c\nadd rule ip t c drop\n"
                   "add set ip t s { type ipv4_addr ; }\nadd element ip t s { 10.0.0.1 }\n"
                   "add set ip t old { type ipv4_addr ; }\nadd element ip t old { 1.1.1.1 }\n")
    rs = kernel("nftables", backend).Ruleset(compile_table(ruleset.table("t")))
    changes = apply("delete set ip t old\nadd set ip t old { type ipv4_addr ; }\n"
                    "add element ip t old { 2.2.2.2 }\nadd element ip t s { 10.0.0.2 }\n"
                    "flush chain ip t c\nadd chain ip t d\nadd rule ip t c jump d\nadd rule ip t d reject\n",
                    ruleset).tables["ip", "t"]
    patch = compile_changes(rs.compiled, ruleset.table("t"), changes)
    assert patch.operations() == {"chains_compiled": 2, "rules_compiled": 2, "chains_deleted": 0,
                                  "anonymous_maps_built": 0, "sets_created": 1, "sets_deleted": 1,
                                  "elements_added": 1, "elements_deleted": 0}
    rs.apply(patch)
    fresh = kernel("nftables", backend).Ruleset(compile_table(ruleset.table("t")))
    p = np.concatenate([packets(d) for d in ("10.0.0.1", "10.0.0.2", "10.0.0.3")])
    np.testing.assert_array_equal(run(rs, p), run(fresh, p))
    assert list(run(rs, p)["verdict"]) == [L.V_REJECT, L.V_REJECT, L.V_ACCEPT]
    old = rs.sets[rs.compiled.set_ids["old"]]
    assert old.n_elements == 1 and rs.compiled.sets[0].name == "s"
    assert rs.modelled_bytes() == fresh.modelled_bytes()
