"""The node data path: NAT only on first packets, full scans for non-service traffic, determinism."""
import numpy as np
import pytest

from bench.cluster.generate import generate
from bench.cluster.model import service_ports
from bench.costs.iptables import kernel_bytes, table_memory
from bench.loaders.iptables import load
from bench.measure.iptables import IptablesDatapath
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
