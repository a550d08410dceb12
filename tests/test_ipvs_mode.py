"""IPVS mode end to end: the node's data path, the cost model, the tracer and the command line.

Clusters are built by hand as in test_writer_ipvs (node1 192.168.0.2, cluster CIDR 10.0.0.0/8)
or generated with a seed. Kernel results go through both backends.
"""
import json

import numpy as np
import pytest

from bench.cli import main
from bench.cluster.generate import generate
from bench.costs import ipvs as ipvs_costs
from bench.cluster.model import service_ports
from bench.errors import InputError
from bench.loaders.ipvs import kernel_arrays, load
from bench.measure import ipvs as ipvs_measure
from bench.measure.ipvs import IpvsDatapath
from bench.netaddr import int_to_ip
from bench.proxies.ipvs import IpvsWriterOptions, write
from bench.results import read_jsonl
from bench.trace import trace_ipvs
from bench.workload import EPHEMERAL_LOW, established, pod_connections, service_connections
from kernels import layout as L
from tests.builders import packet_flow_cluster
from tests.conftest import compiled_available, kernel

NODE_IP = "192.168.0.2"


# --- the packet-flow cluster through the tracer ------------------------------------------------

@pytest.fixture(scope="module")
def traced():
    cluster = packet_flow_cluster("ipvs", NODE_IP)
    return load(write(cluster, IpvsWriterOptions(include_jump_rules=True)), "traced")


def _trace(ruleset, src, dst, dport, **options):
    return trace_ipvs(ruleset, [NODE_IP], src, dst, dport, **options)


def test_trace_cluster_ip_reaches_one_real_server(traced):
    result = _trace(traced, "10.180.9.9", "172.30.0.10", 80)
    assert result["verdict"] == "ACCEPT"
    assert result["output"] in ("10.180.0.1:8080", "10.180.0.2:8080")
    ipvs_steps = [s for s in result["path"] if s["table"] == "ipvs"]
    assert len(ipvs_steps) == 1 and ipvs_steps[0]["hook"] == "INPUT" and ipvs_steps[0]["matched"]
    assert "bucket" in ipvs_steps[0]["text"] and "rr picked" in ipvs_steps[0]["text"]
    assert result["counters"]["svc_compares"] >= 1 and result["counters"]["conns_created"] == 1


def test_trace_all_endpoints_lists_the_real_servers_in_list_order(traced):
    result = _trace(traced, "10.180.9.9", "172.30.0.10", 80, all_endpoints=True)
    assert result["output"] == "10.180.0.1:8080, 10.180.0.2:8080"  # the order ipvsadm-save prints
    assert result["endpoints"] == ["10.180.0.1:8080", "10.180.0.2:8080"]


def test_trace_node_port(traced):
    result = _trace(traced, "203.0.113.7", NODE_IP, 30001)
    assert (result["output"], result["masquerade"]) == ("10.180.1.1:8080", True)  # KUBE-NODE-PORT-TCP


def test_trace_without_real_servers_rejects(traced):
    result = _trace(traced, "10.180.9.9", "172.30.0.13", 80)
    assert (result["output"], result["verdict"]) == ("REJECT", "REJECT")
    assert result["endpoints"] == []


def test_trace_not_a_virtual_service(traced):
    result = _trace(traced, "10.180.9.9", "10.180.0.1", 8080)
    assert (result["output"], result["verdict"]) == ("", "ACCEPT")
    assert not any(s["table"] == "ipvs" for s in result["path"])


def test_trace_load_balancer_source_ranges(traced):
    allowed = _trace(traced, "203.0.113.7", "1.2.3.4", 80)
    assert (allowed["output"], allowed["verdict"]) == ("10.180.2.1:8080", "ACCEPT")
    dropped = _trace(traced, "198.51.100.1", "1.2.3.4", 80)
    assert (dropped["output"], dropped["verdict"]) == ("DROP", "DROP")
    assert any(s["chain"] == "KUBE-SOURCE-RANGES-FIREWALL" for s in dropped["path"])


def test_scheduler_the_kernel_lacks_is_refused(traced):
    with pytest.raises(InputError, match="lblc"):
        kernel_arrays(traced.services, "traced", scheduler="lblc")


# --- the data path --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small():
    cluster = generate(40, 3, 4, seed=7, mix="clusterip")
    return cluster, load(write(cluster, IpvsWriterOptions(include_jump_rules=True)), "small")


def test_first_and_established_packets(small, backend):
    cluster, ruleset = small
    path = IpvsDatapath(ruleset, cluster.config.node_ips, seed=3, backend=backend)
    syns = service_connections(cluster, service_ports(cluster), 200, seed=1)
    first = path.process(syns)
    assert not first.conntrack_hit.any()
    assert (first.ipvs["verdict"] == L.IPVS_FORWARD).all()
    assert (first.ipvs["svc_compares"] >= 1).all() and (first.ipvs["dests_examined"] >= 1).all()
    # vs/conntrack=1: each IPVS connection (templates aside) also has a conntrack entry.
    connections = path.ipvs.connections()
    assert path.conntrack.n_connections == int((connections["flags"] & L.IPVS_CONN_TEMPLATE == 0).sum()) == 200

    later = path.process(established(syns))
    assert later.conntrack_hit.all()
    assert (later.nat_entries_visited == 0).all()  # no nat rule walk on established packets
    assert later.ipvs["conn_hit"].all() and (later.ipvs["svc_compares"] == 0).all()
    assert (later.ipvs["timer_rearms"] == 1).all()
    assert (later.ipvs["dnat_ip"] == first.ipvs["dnat_ip"]).all()
    assert path.conntrack.n_connections == 200
    assert (first.nat_entries_visited > 0).all()
    assert (later.entries_visited > 0).all()  # filter INPUT still runs


def test_packets_not_to_a_local_address_skip_ipvs(small, backend):
    cluster, ruleset = small
    path = IpvsDatapath(ruleset, cluster.config.node_ips, seed=3, backend=backend)
    result = path.process(pod_connections(cluster, 50, seed=2))
    assert (result.ipvs["verdict"] == L.IPVS_NOT_SERVICE).all()
    assert (result.ipvs["conn_compares"] == 0).all()
    assert path.conntrack.n_connections == 50


def test_backends_agree(small):
    cluster, ruleset = small
    syns = service_connections(cluster, service_ports(cluster), 100, seed=4)
    outcomes = []
    if not compiled_available():
        pytest.skip("compiled kernels not built")
    for backend in ("cython", "python"):
        path = IpvsDatapath(ruleset, cluster.config.node_ips, seed=5, backend=backend)
        first, later = path.process(syns), path.process(established(syns))
        outcomes.append((first.ipvs.tobytes(), later.ipvs.tobytes(), first.entries_visited.tolist(),
                         first.conntrack_compares.tolist(), later.conntrack_compares.tolist()))
    assert outcomes[0] == outcomes[1]


def _virtual_service_lookups(services: int, backend: str) -> tuple[int, float]:
    cluster = generate(services, 1, 4, seed=11, mix="clusterip")
    ruleset = load(write(cluster), "lookups")
    ipvs = kernel("ipvs", backend).IPVS.from_arrays(*kernel_arrays(ruleset.services), seed=1)
    syns = service_connections(cluster, service_ports(cluster), 3000, seed=2)
    results = np.zeros(len(syns), dtype=L.IPVS_RESULT_DTYPE)
    ipvs.process(syns, results)
    return len(ruleset.services), float(results["svc_compares"].mean())


def test_service_lookup_compares_grow_like_services_over_512(backend):
    # 256 fixed chains; a hit walks half a chain on average: about V/512 + 1 compares.
    for services in (512, 4096):
        virtual, compares = _virtual_service_lookups(services, backend)
        assert 0.7 < (compares - 1) / (virtual / 512) < 1.6, (virtual, compares)


def test_connection_lookup_compares_grow_like_connections_over_twice_the_buckets(backend):
    ipvs_module = kernel("ipvs", backend)
    cluster = generate(20, 1, 4, seed=3, mix="clusterip")
    ruleset = load(write(cluster), "connections")
    for live in (2560, 10240):
        ipvs = ipvs_module.IPVS.from_arrays(*kernel_arrays(ruleset.services), conn_tab_bits=8, seed=1)
        syns = ipvs_measure.distinct_clients(service_connections(cluster, service_ports(cluster), live, seed=live))
        ipvs.process(syns, np.zeros(live, dtype=L.IPVS_RESULT_DTYPE))
        later = np.zeros(2000, dtype=L.IPVS_RESULT_DTYPE)
        sample = np.random.default_rng(live).choice(live, 2000, replace=False)
        ipvs.process(established(syns[sample]), later)  # old connections sit at chain tails
        expected = live / 512 + 1  # 256 chains: half a chain plus the hit itself
        assert 0.8 < later["conn_compares"].mean() / expected < 1.25, (live, later["conn_compares"].mean())


def test_distinct_clients_are_distinct():
    packets = ipvs_measure.distinct_clients(np.zeros(70000, dtype=L.PACKET_DTYPE))
    pairs = packets["src"].astype(np.uint64) << 16 | packets["sport"]
    assert len(np.unique(pairs)) == 70000 and packets["sport"].min() >= EPHEMERAL_LOW


# --- the cost model -----------------------------------------------------------------------------

def test_memory_has_every_part(small, backend):
    cluster, ruleset = small
    path = IpvsDatapath(ruleset, cluster.config.node_ips, seed=3, backend=backend)
    parts = ipvs_costs.kernel_bytes(ruleset, path.ipvs, n_cpus=4, backend=backend)
    assert parts["addresses"] == ipvs_costs.IN_IFADDR_BYTES * len(ruleset.addresses) > 0
    assert parts["ipsets"] > 0 and parts["iptables"] > 0
    more_cpus = ipvs_costs.kernel_bytes(ruleset, path.ipvs, n_cpus=64, backend=backend)
    # 40 B of per-CPU stats per service and per destination.
    per_cpu = 40 * (path.ipvs.n_services + path.ipvs.n_dests)
    assert more_cpus["ipvs"] - parts["ipvs"] == 60 * per_cpu


@pytest.mark.parametrize("scheduler, endpoint_ops", [("rr", 1), ("sh", 2 * 256), ("wrr", None), ("mh", None)])
def test_update_costs_follow_the_scheduler(small, scheduler, endpoint_ops, backend):
    _, ruleset = small
    costs = ipvs_costs.measure_updates(ruleset, backend=backend, scheduler=scheduler)
    assert costs["full_sync_services_differing"] == 0
    if endpoint_ops is not None:  # rr: the cursor fix on removal; sh: two 256-slot rebuilds
        assert costs["endpoint_change_sched_ops"] == endpoint_ops
    elif scheduler == "mh":
        assert costs["endpoint_change_sched_ops"] >= 2 * 4093  # two M-slot Maglev fills
    else:
        assert 0 < costs["endpoint_change_sched_ops"] <= 4 * 3  # wrr: O(D) with D = 3
    operations = ipvs_costs.sync_operations(ruleset)
    assert operations["virtual_servers_listed"] == len(ruleset.services)
    assert operations["real_servers_listed"] == sum(len(s.real_servers) for s in ruleset.services)


# --- the command line -----------------------------------------------------------------------------

def run(capsys, *argv):
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
def cluster_file(tmp_path, capsys):
    path = tmp_path / "cluster.yaml"
    assert run(capsys, "cluster", "--services", "3", "--endpoints", "2", "--nodes", "2",
               "--mix", "clusterip", "-o", str(path))[0] == 0
    return path


def _one_line(status, err, *fragments):
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert all(fragment in lines[0] for fragment in fragments), lines[0]


def test_cli_rules_and_trace_ipvs(capsys, tmp_path, cluster_file):
    rules = tmp_path / "ipvs.txt"
    status, _, _ = run(capsys, "rules", "ipvs", "--objects", str(cluster_file), "--jump-rules",
                       "--ipvs-scheduler", "sh", "-o", str(rules))
    assert status == 0
    ruleset = load(rules.read_text(), str(rules))
    assert ruleset.services and {s.scheduler for s in ruleset.services} == {"sh"}
    vip = ruleset.services[0]
    status, out, _ = run(capsys, "trace", "ipvs", "--ruleset", str(rules), "--src", "10.128.0.9",
                         "--dst", int_to_ip(vip.addr), "--dport", str(vip.port), "--json", "--all-endpoints")
    assert status == 0
    result = json.loads(out)
    assert set(result) >= {"packet", "output", "masquerade", "verdict", "endpoints", "path", "counters"}
    assert len(result["endpoints"]) == len(vip.real_servers) == 2
    assert result["verdict"] == "ACCEPT" and result["counters"]["svc_compares"] >= 1


def test_cli_trace_real_outputs(capsys, tmp_path, cluster_file):
    status, out, _ = run(capsys, "rules", "ipvs", "--objects", str(cluster_file))
    ipvsadm_text = out.split("# kpbench: ipvsadm-save -n\n")[1].split("# kpbench:")[0]
    saved = tmp_path / "ipvsadm.txt"
    saved.write_text(ipvsadm_text)
    first = ipvsadm_text.split()[2]  # "-A -t ADDR:PORT ..."
    address, port = first.rsplit(":", 1)
    status, out, _ = run(capsys, "trace", "ipvs", "--ipvsadm", str(saved), "--src", "10.128.0.9",
                         "--dst", address, "--dport", port, "--json")
    assert status == 0 and json.loads(out)["endpoints"]


@pytest.mark.parametrize("argv", [
    ["rules", "ipvs", "--ipvs-scheduler", "fastest"],
    ["trace", "ipvs", "--ipvs-scheduler", "fastest", "--src", "10.0.0.1", "--dst", "10.0.0.2", "--dport", "80"],
])
def test_cli_unknown_scheduler_is_one_line(capsys, cluster_file, argv):
    status, _, err = run(capsys, *argv, "--objects", str(cluster_file))
    _one_line(status, err, "--ipvs-scheduler", "fastest")


def test_cli_scheduler_from_the_config_file(capsys, tmp_path, cluster_file):
    config = tmp_path / "kp.yaml"
    config.write_text("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"
                      "mode: ipvs\nipvs:\n  scheduler: lc\n")
    status, out, _ = run(capsys, "rules", "ipvs", "--objects", str(cluster_file), "--config", str(config))
    assert status == 0 and " -s lc" in out and " -s rr" not in out


def test_cli_ipvs_has_no_partial_sync(capsys, cluster_file):
    status, _, err = run(capsys, "rules", "ipvs", "--objects", str(cluster_file), "--previous", str(cluster_file))
    _one_line(status, err, "--previous")


def test_cli_bench_ipvs_writes_records(capsys, tmp_path):
    status, out, _ = run(capsys, "bench", "--modes", "ipvs", "--services", "30", "--endpoints", "2",
                         "--nodes", "3", "--packets", "200", "--out", str(tmp_path), "--no-benchmarks", "--quiet")
    assert status == 0
    records = [r for r in read_jsonl(tmp_path / "results.jsonl") if r["kind"] == "point"]
    assert {r["workload"] for r in records} == {"service_new", "service_new_first", "service_new_middle",
                                                "service_new_last", "nonservice_new", "established"}
    assert all(r["mode"] == "ipvs" and r["kernel_bytes"] > 0 for r in records)
    by_workload = {r["workload"]: r for r in records}
    assert by_workload["service_new"]["svc_compares_mean"] >= 1
    assert by_workload["established"]["conn_compares_mean"] >= 1
    assert by_workload["established"]["nat_entries_visited_mean"] == 0
    assert "ipvs" in out and "svc cmp" in out


def test_connection_scaling_record():
    record = ipvs_measure.connection_scaling([4096, 16384], services=50, packets=2000)
    assert record["benchmark"] == "ipvs_connections"
    for live in (4096, 16384):  # 4096 chains: about live/8192 + 1 compares per hit
        assert 0.8 < record[f"conn_compares_mean_{live}"] / (live / 8192 + 1) < 1.25
