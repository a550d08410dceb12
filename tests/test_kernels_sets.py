"""-m set, -m physdev and -m ipvs in ipt_do_table, over the rules kube-proxy's IPVS mode writes.

The cluster is written by bench.proxies.ipvs, loaded by bench.loaders.ipvs and its sets built by
kernels.ipsets, then packets walk the nat and filter tables in both backends. Node node1
(192.168.0.2), pod CIDR 10.0.0.0/8, masquerade mark 0x4000, as in tests/test_writer_ipvs.py.
"""
import numpy as np
import pytest

from bench.cluster.model import (Cluster, Endpoint, EndpointPort, EndpointSlice, Node, ProxyConfig,
                                 Service, ServicePort)
from bench.loaders import iptables as iptables_loader
from bench.loaders.ipvs import IpSet, load
from bench.netaddr import ip_to_int
from bench.proxies.ipvs import IpvsWriterOptions, write
from kernels import layout as L
from kernels.ipsets import build_sets
from tests.conftest import compiled_available, kernel

NODE, OTHER_NODE = "node1", "node2"
NODE_IP = "192.168.0.2"
MASQ = 0x4000
TCP, UDP = 6, 17
CLUSTER_IP, LB_CLUSTER_IP, LB_IP = "172.30.0.10", "172.30.0.20", "198.51.100.50"
LOCAL_POD, REMOTE_POD, LB_POD = "10.1.0.5", "10.2.0.6", "10.2.0.7"
NODE_PORT = 30080
OUTSIDE = "192.168.5.5"  # a client off the pod network


def ip(text):
    return ip_to_int(text)


def ipvs_cluster():
    """A ClusterIP service with a local (hairpin-capable) and a remote endpoint, and a
    LoadBalancer with a NodePort and a source range."""
    web = Service("ns1", "web", "ClusterIP", CLUSTER_IP, [ServicePort("p80", "tcp", 80, 80, 0)])
    lb = Service("ns1", "lb", "LoadBalancer", LB_CLUSTER_IP, [ServicePort("p80", "tcp", 80, 80, NODE_PORT)],
                 load_balancer_ips=[LB_IP], load_balancer_source_ranges=["203.0.113.0/25"])
    slices = [
        EndpointSlice("ns1", "web-abc", "web", [EndpointPort("p80", "tcp", 80)],
                      [Endpoint(LOCAL_POD, NODE), Endpoint(REMOTE_POD, OTHER_NODE)]),
        EndpointSlice("ns1", "lb-abc", "lb", [EndpointPort("p80", "tcp", 80)], [Endpoint(LB_POD, OTHER_NODE)]),
    ]
    config = ProxyConfig(mode="ipvs", cluster_cidr="10.0.0.0/8", node_ips=[NODE_IP], random_fully=False)
    return Cluster([web, lb], slices, [Node(NODE, [NODE_IP]), Node(OTHER_NODE, ["192.168.0.3"])], config,
                   node_name=NODE)


@pytest.fixture(scope="module")
def ruleset():
    return load(write(ipvs_cluster(), IpvsWriterOptions(mark_format="test", include_jump_rules=True)))


def tables(ruleset, backend):
    """{"nat": Table, "filter": Table} of ``backend`` with freshly built sets."""
    iptables = kernel("iptables", backend)
    local = np.array([ip(NODE_IP)], dtype=np.uint32)
    return {name: iptables.Table.from_compiled(compiled, local, sets=build_sets(ruleset.ipsets, compiled.set_names, backend))
            for name, compiled in ruleset.iptables.tables.items()}


def packets(*specs):
    """One packet per (src, dst, dport[, proto]) spec."""
    out = np.zeros(len(specs), dtype=L.PACKET_DTYPE)
    for i, (src, dst, dport, *proto) in enumerate(specs):
        out[i]["src"], out[i]["dst"], out[i]["dport"] = ip(src), ip(dst), dport
        out[i]["proto"] = proto[0] if proto else TCP
    out["sport"], out["length"], out["ctstate"] = 40000, 60, L.CT_NEW
    return out


def walk(table, pkts, hook):
    results = np.zeros(len(pkts), dtype=L.RESULT_DTYPE)
    table.run(pkts, hook, results)
    return results


# ---- kube-proxy's IPVS-mode rules --------------------------------------------------------------

def test_cluster_ip_from_outside_the_pod_cidr_is_marked_for_masquerade(ruleset, backend):
    nat = tables(ruleset, backend)["nat"]
    outside, from_pod = walk(nat, packets((OUTSIDE, CLUSTER_IP, 80), (REMOTE_POD, CLUSTER_IP, 80)),
                             L.HOOK_PREROUTING)
    # KUBE-CLUSTER-IP dst,dst ! -s 10.0.0.0/8 -> KUBE-MARK-MASQ, then KUBE-CLUSTER-IP -> ACCEPT.
    assert outside["verdict"] == L.V_ACCEPT and outside["mark"] == MASQ
    assert from_pod["verdict"] == L.V_ACCEPT and from_pod["mark"] == 0
    assert outside["set_probes"] >= 2 and outside["set_compares"] >= 2  # two hits, one compare each


def test_cluster_ip_set_keys_on_port_and_protocol(ruleset, backend):
    nat = tables(ruleset, backend)["nat"]
    other_port, udp = walk(nat, packets((OUTSIDE, CLUSTER_IP, 81), (OUTSIDE, CLUSTER_IP, 80, UDP)),
                           L.HOOK_PREROUTING)
    assert other_port["mark"] == 0 and udp["mark"] == 0


def test_node_port_matches_the_tcp_port_bitmap(ruleset, backend):
    nat = tables(ruleset, backend)["nat"]
    hit, other_port, udp = walk(nat, packets((OUTSIDE, NODE_IP, NODE_PORT), (OUTSIDE, NODE_IP, NODE_PORT + 1),
                                             (OUTSIDE, NODE_IP, NODE_PORT, UDP)), L.HOOK_PREROUTING)
    assert hit["mark"] == MASQ and hit["verdict"] == L.V_ACCEPT
    assert other_port["mark"] == 0 and udp["mark"] == 0


def test_hairpin_is_masqueraded_by_the_loop_back_set(ruleset, backend):
    nat = tables(ruleset, backend)["nat"]
    # After IPVS picked the local endpoint for a connection that endpoint opened itself.
    hairpin, remote = walk(nat, packets((LOCAL_POD, LOCAL_POD, 80), (REMOTE_POD, LOCAL_POD, 80)),
                           L.HOOK_POSTROUTING)
    assert hairpin["verdict"] == L.V_MASQUERADE  # KUBE-LOOP-BACK dst,dst,src
    assert remote["verdict"] == L.V_ACCEPT


def test_load_balancer_source_ranges_allow_and_drop(ruleset, backend):
    filt = tables(ruleset, backend)["filter"]
    allowed, dropped = walk(filt, packets(("203.0.113.7", LB_IP, 80), ("203.0.113.200", LB_IP, 80)),
                            L.HOOK_INPUT)
    # KUBE-LOAD-BALANCER-FW -> KUBE-SOURCE-RANGES-FIREWALL: SOURCE-CIDR dst,dst,src RETURNs, else DROP.
    assert allowed["verdict"] == L.V_ACCEPT
    assert dropped["verdict"] == L.V_DROP


def test_a_non_service_packet_matches_nothing(ruleset, backend):
    t = tables(ruleset, backend)
    pkts = packets((OUTSIDE, "8.8.8.8", 443))
    for name, hook in (("nat", L.HOOK_PREROUTING), ("filter", L.HOOK_FORWARD)):
        result = walk(t[name], pkts, hook)[0]
        assert result["verdict"] == L.V_ACCEPT and result["mark"] == 0 and result["target_calls"] == 0
    assert result["set_probes"] > 0  # every set match still hashed the packet's key


# ---- match semantics on hand-written rules ------------------------------------------------------

def one_rule_table(ruleset, backend, match):
    """A nat table whose PREROUTING drops what ``match`` matches, with the cluster's sets."""
    text = f"*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING {match} -j DROP\nCOMMIT\n"
    compiled = iptables_loader.load(text).tables["nat"]
    return kernel("iptables", backend).Table.from_compiled(
        compiled, [ip(NODE_IP)], sets=build_sets(ruleset.ipsets, compiled.set_names, backend))


@pytest.mark.parametrize("match, to_service, elsewhere", [
    ("-m set --match-set KUBE-CLUSTER-IP dst,dst", True, False),
    ("-m set ! --match-set KUBE-CLUSTER-IP dst,dst", False, True),
    # Fewer dimensions than the set has: nothing is ever in the set.
    ("-m set --match-set KUBE-CLUSTER-IP dst", False, False),
    ("-m set ! --match-set KUBE-CLUSTER-IP dst", True, True),
    # Dimensions from the wrong side of the packet.
    ("-m set --match-set KUBE-CLUSTER-IP src,dst", False, False),
    ("-m set --match-set KUBE-IPVS-IPS dst", True, False),
    ("-m set ! --match-set KUBE-NODE-PORT-TCP dst", True, True),
    # No bridged packets: physdev matches only when every option is inverted.
    ("-m physdev --physdev-is-in", False, False),
    ("-m physdev ! --physdev-is-in", True, True),
    ("-m physdev ! --physdev-is-in --physdev-is-bridged", False, False),
    # No IPVS connection: only a lone inverted --ipvs matches.
    ("-m ipvs --ipvs", False, False),
    ("-m ipvs ! --ipvs", True, True),
    ("-m ipvs --vaddr 172.30.0.10 --vport 80", False, False),
    ("-m ipvs ! --vaddr 172.30.0.10", False, False),
])
def test_match_semantics(ruleset, backend, match, to_service, elsewhere):
    table = one_rule_table(ruleset, backend, match)
    verdicts = walk(table, packets((OUTSIDE, CLUSTER_IP, 80), (OUTSIDE, "8.8.8.8", 80)), L.HOOK_PREROUTING)["verdict"]
    assert list(verdicts == L.V_DROP) == [to_service, elsewhere]


def test_hash_net_set_tests_each_stored_prefix(ruleset, backend):
    table = one_rule_table(ruleset, backend, "-m set --match-set KUBE-LOAD-BALANCER-SOURCE-CIDR dst,dst,src")
    verdicts = walk(table, packets(("203.0.113.127", LB_IP, 80), ("203.0.113.128", LB_IP, 80),
                                   ("203.0.113.1", LB_IP, 81)), L.HOOK_PREROUTING)["verdict"]
    assert list(verdicts == L.V_DROP) == [True, False, False]


def test_set_lookups_advance_the_sets_own_counters(ruleset, backend):
    compiled = ruleset.iptables.tables["nat"]
    sets = build_sets(ruleset.ipsets, compiled.set_names, backend)
    hash_sets = [s for s in sets if hasattr(s, "hash_computations")]
    bitmaps = [s for s in sets if hasattr(s, "bit_tests")]

    def work():
        return (sum(s.hash_computations for s in hash_sets), sum(s.bucket_entries_compared for s in hash_sets),
                sum(s.bit_tests for s in bitmaps))

    table = kernel("iptables", backend).Table.from_compiled(compiled, [ip(NODE_IP)], sets=sets)
    before = work()
    result = walk(table, packets((OUTSIDE, NODE_IP, NODE_PORT)), L.HOOK_PREROUTING)[0]
    hashed, compared, bits = (after - earlier for after, earlier in zip(work(), before))
    assert bits == 1  # KUBE-NODE-PORT-TCP
    assert (result["set_probes"], result["set_compares"]) == (hashed + bits, compared)


# ---- construction -----------------------------------------------------------------------------

def test_a_missing_set_is_refused_by_name(ruleset, backend):
    compiled = ruleset.iptables.tables["nat"]
    iptables = kernel("iptables", backend)
    with pytest.raises(ValueError, match=f"'{compiled.set_names[0]}'"):
        iptables.Table.from_compiled(compiled, [ip(NODE_IP)])
    without = {name: s for name, s in ruleset.ipsets.items() if name != "KUBE-CLUSTER-IP"}
    with pytest.raises(ValueError, match="'KUBE-CLUSTER-IP'"):
        iptables.Table.from_compiled(compiled, [ip(NODE_IP)], sets=build_sets(without, compiled.set_names, backend))


def test_sets_of_the_other_backend_or_type_are_refused(ruleset, backend, compiled_only):
    compiled = ruleset.iptables.tables["nat"]
    other = "python" if backend == "cython" else "cython"
    with pytest.raises(ValueError, match="not one of this backend's ipset types"):
        kernel("iptables", backend).Table.from_compiled(
            compiled, [ip(NODE_IP)], sets=build_sets(ruleset.ipsets, compiled.set_names, other))


def test_hash_net_is_not_modelled():
    with pytest.raises(ValueError, match="hash:net"):
        build_sets({"NETS": IpSet("NETS", "hash:net", [((ip("10.0.0.0"), 8),)])}, ["NETS"], "python")


@pytest.fixture
def compiled_only():
    if not compiled_available():
        pytest.skip("compiled kernels not built")


# ---- both backends agree --------------------------------------------------------------------

def random_packets(rng, n):
    """Service addresses, node and pod addresses and strangers; service, node and random ports."""
    addresses = np.array([ip(a) for a in (CLUSTER_IP, LB_CLUSTER_IP, LB_IP, NODE_IP, LOCAL_POD, REMOTE_POD,
                                          LB_POD, OUTSIDE, "203.0.113.7", "203.0.113.200", "8.8.8.8")],
                         dtype=np.uint32)
    out = np.zeros(n, dtype=L.PACKET_DTYPE)
    out["src"] = rng.choice(addresses, n)
    out["dst"] = rng.choice(addresses, n)
    out["dport"] = rng.choice(np.array([80, 81, NODE_PORT, 443], dtype=np.uint16), n)
    out["sport"] = rng.choice(np.array([80, 40000], dtype=np.uint16), n)
    out["proto"] = rng.choice(np.array([TCP, TCP, UDP, 132, 1], dtype=np.uint8), n)
    out["ctstate"] = rng.choice(np.array([L.CT_NEW, L.CT_ESTABLISHED], dtype=np.uint16), n)
    out["length"] = 60
    return out


def test_backends_agree_on_a_random_batch(ruleset, compiled_only):
    pkts = random_packets(np.random.default_rng(7), 2000)
    runs = {}
    for backend in ("cython", "python"):
        t = tables(ruleset, backend)
        runs[backend] = [(walk(t[name], pkts, hook), t[name].counters.copy())
                         for name, hooks in (("nat", (L.HOOK_PREROUTING, L.HOOK_POSTROUTING)),
                                             ("filter", (L.HOOK_INPUT, L.HOOK_FORWARD, L.HOOK_OUTPUT)))
                         for hook in hooks]
    for (results_c, counters_c), (results_p, counters_p) in zip(runs["cython"], runs["python"]):
        assert np.array_equal(results_c, results_p)
        assert np.array_equal(counters_c, counters_p)
    all_results = np.concatenate([results for results, _ in runs["python"]])
    assert all_results["set_probes"].any() and all_results["set_compares"].any()
    assert set(np.unique(all_results["verdict"])) >= {L.V_ACCEPT, L.V_DROP, L.V_MASQUERADE}
