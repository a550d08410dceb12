"""The node data path: NAT only on first packets, full scans for non-service traffic, determinism."""
import numpy as np
import pytest

from bench.cluster.generate import generate
from bench.cluster.model import service_ports
from bench.costs.iptables import kernel_bytes, table_memory
from bench.loaders.iptables import load
from bench.measure.iptables import IptablesDatapath, control_plane, without_comments
from bench.measure.path import position_results
from bench.proxies.iptables import WriterOptions, write_full
from bench.workload import established, pod_connections, service_connections
from kernels import layout as L

SERVICES, ENDPOINTS = 40, 3


@pytest.fixture(scope="module")
def cluster():
    return generate(SERVICES, ENDPOINTS, 4, seed=7, mix="clusterip")


@pytest.fixture(scope="module")
def ruleset(cluster):
    return load(write_full(cluster, WriterOptions(include_jump_rules=True)))


def _datapath(cluster, ruleset, backend):
    return IptablesDatapath(ruleset, cluster.config.node_ips, seed=3, backend=backend)


def test_established_packets_visit_no_nat_rule(cluster, ruleset, backend):
    path = _datapath(cluster, ruleset, backend)
    first_packets = service_connections(cluster, service_ports(cluster), 200, seed=1)
    first = path.process(first_packets)
    assert not first.conntrack_hit.any()
    assert (first.nat["verdict"] == L.V_DNAT).all()
    later = path.process(established(first_packets), established(first.after_nat))
    assert later.conntrack_hit.all()
    assert (later.nat_entries_visited == 0).all()
    assert (later.entries_visited > 0).all()  # the filter table still runs


def test_non_service_connection_scans_all_of_kube_services(cluster, ruleset, backend):
    path = _datapath(cluster, ruleset, backend)
    result = path.process(pod_connections(cluster, 50, seed=2))
    assert (result.nat["verdict"] == L.V_ACCEPT).all()
    # PREROUTING's jump, one KUBE-SERVICES rule per service, the nodeports rule, the chain's
    # tail and PREROUTING's policy (kernel-internals §6.7 counts 1 + S + 2 up to the tail).
    assert (result.nat_entries_visited == 1 + SERVICES + 2 + 1).all()


def test_service_hits_cost_half_the_chain_on_average(cluster, ruleset):
    path = _datapath(cluster, ruleset, "python")
    result = path.process(service_connections(cluster, service_ports(cluster), 400, seed=4))
    mean = result.nat_entries_visited.mean()
    assert SERVICES / 2 < mean < SERVICES / 2 + 2 * ENDPOINTS + 12


def test_backends_agree_and_seeds_repeat(cluster, ruleset):
    packets = service_connections(cluster, service_ports(cluster), 300, seed=5)
    runs = [_datapath(cluster, ruleset, b).process(packets) for b in ("python", "cython", "cython")]
    for other in runs[1:]:
        assert np.array_equal(runs[0].nat, other.nat)
        assert np.array_equal(runs[0].entries_visited, other.entries_visited)


def test_kernel_memory_follows_struct_sizes(ruleset):
    nat = ruleset.tables["nat"]
    one_cpu, eight_cpus = table_memory(nat, 1), table_memory(nat, 8)
    assert one_cpu.blob_bytes == nat.blob.nbytes
    assert eight_cpus.counter_bytes == 8 * one_cpu.counter_bytes == 8 * 16 * nat.n_entries
    assert kernel_bytes(ruleset.tables, 8) > kernel_bytes(ruleset.tables, 1)


def test_first_middle_last_service_walk_a_growing_part_of_the_chain(cluster, ruleset, backend):
    # The ruleset is written in sorted order, so the sorted service ports are the chain's order.
    path = _datapath(cluster, ruleset, backend)
    results = dict(position_results(path, cluster, service_ports(cluster), 400, seed=6))
    assert list(results) == ["service_new_first", "service_new_middle", "service_new_last"]
    # The fewest rules a packet visits: its service's rule, then the first endpoint's chain.
    first, middle, last = (results[f"service_new_{p}"].nat_entries_visited.min() for p in ("first", "middle", "last"))
    # KUBE-SERVICES rules before the service's own (one per ClusterIP service): 0, S/2, S-1.
    assert middle - first == SERVICES // 2 and last - first == SERVICES - 1


def test_comments_off_removes_every_comment_match():
    payload = ('-A KUBE-SERVICES -m comment --comment "ns/svc:http cluster IP" -d 10.96.0.1 -j KUBE-SVC-X\n'
               '-A KUBE-SEP-Y -m comment --comment ns/svc:http -j DNAT\n')
    assert without_comments(payload) == "-A KUBE-SERVICES -d 10.96.0.1 -j KUBE-SVC-X\n-A KUBE-SEP-Y -j DNAT\n"


def test_control_plane_records_full_and_partial_syncs(cluster):
    _, _, record = control_plane(cluster, WriterOptions(include_jump_rules=True), comments=True)
    for metric in ("sync_full_proxy_rules", "sync_partial_proxy_rules", "sync_add_service"):
        assert record[f"{metric}_duration_seconds"] > 0
        # The kernel replaces whole tables whatever the change: O(entries) every time.
        assert record[f"{metric}_kernel_entries"] >= record["sync_full_proxy_rules_kernel_entries"] - 10
    # A partial sync sends far fewer rules than a full one.
    assert record["sync_partial_proxy_rules_operations"] < record["sync_full_proxy_rules_operations"] / 2
