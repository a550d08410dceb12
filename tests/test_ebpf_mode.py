"""The eBPF reference model end to end: writer, loader, data path, cost model, measure and CLI.

The model is checked against the kube-proxy modes on the same clusters: the same frontends as
IPVS mode's virtual services, the same backend sets, and packets to ClusterIP and NodePort
frontends DNATed to one of the endpoints IPVS and iptables mode would choose from.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.cli import main
from bench.cluster.generate import generate
from bench.costs import ebpf as ebpf_costs
from bench.errors import InputError
from bench.loaders import ipvs as ipvs_loader
from bench.loaders.ebpf import load
from bench.loaders.iptables import load as load_iptables
from bench.measure import ebpf as ebpf_measure
from bench.measure.ebpf import EbpfDatapath, map_limits
from bench.measure.iptables import IptablesDatapath
from bench.measure.ipvs import IpvsDatapath
from bench.netaddr import ip_to_int
from bench.proxies import ipvs as ipvs_writer
from bench.proxies.ebpf import EbpfWriterOptions, write
from bench.proxies.iptables import WriterOptions, write_full
from bench.sweep import Point
from bench.workload import pod_connections
from kernels import layout as L
from tests.builders import mutate_words


@pytest.fixture(scope="module")
def cluster():
    return generate(150, 3, 4, seed=4)


@pytest.fixture(scope="module")
def maps(cluster):
    return load(write(cluster), "ebpf.txt")


@pytest.fixture(scope="module")
def ipvs_rules(cluster):
    return ipvs_loader.load(ipvs_writer.write(cluster, ipvs_writer.IpvsWriterOptions(include_jump_rules=True)))


def _backend_sets(maps):
    where = {int(b["id"]): (int(b["addr"]), int(b["port"])) for b in maps.backends}
    return {f.key: {where[i] for i in f.backend_ids} for f in maps.frontends}


def _local_policy(cluster, frontend):
    service = next(s for s in cluster.services if frontend.name.split(":")[0] == s.key)
    return service.internal_policy_local or service.external_policy_local


# --- writer and loader --------------------------------------------------------------------------

def test_frontends_and_backends_match_ipvs_virtual_services(cluster, maps, ipvs_rules):
    ipvs_sets = {(s.addr, s.port, s.proto): {(r.addr, r.port) for r in s.real_servers} for s in ipvs_rules.services}
    ebpf_sets = _backend_sets(maps)
    assert set(ebpf_sets) == set(ipvs_sets)
    differ = [f for f in maps.frontends if ebpf_sets[f.key] != ipvs_sets[f.key]]
    # Only Local policies differ: Cilium keeps an empty frontend where IPVS falls back.
    assert all(_local_policy(cluster, f) and not f.backend_ids for f in differ)
    assert {f.type for f in maps.frontends} >= {"ClusterIP", "NodePort", "LoadBalancer"}


def test_text_layout_and_shared_backend_ids(maps):
    text = write(generate(3, 2, 2, seed=1, mix="clusterip"))
    lines = text.splitlines()
    assert "REFERENCE MODEL" in lines[0]
    assert "map services max_entries=65536" in lines and "map backends max_entries=65536" in lines
    service_lines = [line for line in lines if line.startswith("service ")]
    # per frontend: slots 1..count, then the master
    assert [line.split()[2] for line in service_lines] == ["slot=1", "slot=2", "slot=0"] * 3
    assert len(maps.services) == len(maps.frontends) + sum(len(f.backend_ids) for f in maps.frontends)
    if maps.frontends:  # whatever loads, the kernel takes: every frontend is served
        result = EbpfDatapath(maps).process(_packets_to(maps.frontends))
        assert set(result.ebpf["verdict"].tolist()) <= {L.EBPF_FORWARD, L.EBPF_NO_BACKEND}
    assert len(maps.backends) == len({i for f in maps.frontends for i in f.backend_ids})
    assert len({f.rev_nat for f in maps.frontends}) == len(maps.frontends)


def test_round_trip_is_stable(cluster, maps):
    again = load(write(cluster), "again")
    assert again.services.tobytes() == maps.services.tobytes() and again.frontends == maps.frontends


GOOD = ("map services max_entries=8\n"
        "backend 1 10.0.0.1:8080/tcp\n"
        "service 10.96.0.1:80/tcp slot=1 backend=1\n"
        "service 10.96.0.1:80/tcp slot=0 count=1 rev_nat=1 type=ClusterIP name=ns/web\n")


@pytest.mark.parametrize("text, line, fragment", [
    (GOOD + "route 1 2\n", 5, "unknown entry"),
    (GOOD.replace("10.0.0.1:8080", "10.0.0.300:8080"), 2, "not an IPv4 address"),
    (GOOD.replace("8080/tcp", "8080/icmp"), 2, "protocol"),
    (GOOD.replace(" rev_nat=1", ""), 4, "rev_nat: missing"),
    (GOOD.replace("slot=1 backend=1", "slot=1 backend=1 weight=3"), 3, "weight: unknown field"),
    (GOOD.replace("count=1", "count=2"), 4, "count=2 needs slots 1..2"),
    (GOOD.replace("backend=1", "backend=9"), 3, "no backend 9"),
    (GOOD + "service 10.96.0.1:80/tcp slot=1 backend=1\n", 5, "duplicate entry (first on line 3)"),
    (GOOD + "service 10.96.0.2:80/tcp slot=1 backend=1\n", 5, "without a master entry"),
    (GOOD + "map backends max_entries=4\n", 5, "before every entry"),
    (GOOD.replace("type=ClusterIP", "type=Headless"), 4, "unknown frontend type"),
    (GOOD.replace("slot=0", "slot=x"), 4, "slot: expected a number"),
    (GOOD.replace("max_entries=8", "max_entries=1"), None,
     "2 service-map entries do not fit: the map holds max_entries=1"),
])
def test_loader_bad_input_names_the_line(text, line, fragment):
    with pytest.raises(InputError) as error:
        load(text, "maps.txt")
    where = f"maps.txt:{line}" if line else "maps.txt: map services"
    assert str(error.value).startswith(where) and fragment in str(error.value), str(error.value)


FUZZ_LINES = write(generate(4, 2, 2, seed=2)).splitlines()
FUZZ_WORDS = sorted({word for line in FUZZ_LINES for word in line.split()} | {
    "slot=", "slot=0", "count=", "count=99", "backend=0", "rev_nat=0", "type=", "=", "map", "x", "1.2.3.4:0/tcp",
    "max_entries=0", "max_entries=99999999999", "10.0.0.1:80", "10.0.0.1/tcp", ":80/tcp"})


@st.composite
def mutated_dump(draw):
    entries = st.sampled_from([i for i, line in enumerate(FUZZ_LINES) if line and not line.startswith("#")])
    return mutate_words(draw, FUZZ_LINES, entries, FUZZ_WORDS)


@settings(max_examples=200, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_dump())
def test_mutated_dumps_load_or_raise_one_input_error(text):
    try:
        maps = load(text, "fuzz")
    except InputError as error:
        assert error.where.startswith("fuzz")
        return
    assert len(maps.services) == len(maps.frontends) + sum(len(f.backend_ids) for f in maps.frontends)
    if maps.frontends:  # whatever loads, the kernel takes: every frontend is served
        result = EbpfDatapath(maps).process(_packets_to(maps.frontends))
        assert set(result.ebpf["verdict"].tolist()) <= {L.EBPF_FORWARD, L.EBPF_NO_BACKEND}


def test_writer_refuses_a_cluster_that_overflows_the_map(cluster):
    with pytest.raises(InputError, match=r"max_entries=50 .*E2BIG"):
        write(cluster, EbpfWriterOptions(service_max_entries=50))
    overflowing = load(write(cluster, EbpfWriterOptions(service_max_entries=50, allow_overflow=True)),
                       allow_overflow=True)
    assert overflowing.overflow()["services"] > 0 and overflowing.max_entries["services"] == 50


# --- the data path against the kube-proxy modes ----------------------------------------------------

def _packets_to(frontends):
    p = np.zeros(len(frontends), L.PACKET_DTYPE)
    p["src"] = ip_to_int("10.128.0.9")
    p["dst"], p["dport"], p["proto"] = zip(*(f.key for f in frontends))
    p["sport"] = 40000 + np.arange(len(frontends))
    p["ctstate"], p["length"] = L.CT_NEW, 60
    return p


def test_ebpf_picks_among_the_endpoints_iptables_and_ipvs_choose_from(cluster, maps, ipvs_rules, backend):
    ebpf_sets = _backend_sets(maps)
    frontends = [f for f in maps.frontends if f.type in ("ClusterIP", "NodePort") and f.backend_ids]
    p = _packets_to(frontends)
    ebpf = EbpfDatapath(maps, seed=1, backend=backend).process(p)
    ipvs = IpvsDatapath(ipvs_rules, cluster.config.node_ips, seed=1, backend=backend).process(p)
    iptables_rules = load_iptables(write_full(cluster, WriterOptions(include_jump_rules=True)))
    iptables = IptablesDatapath(iptables_rules, cluster.config.node_ips, seed=1, backend=backend).process(p)
    assert (ebpf.ebpf["verdict"] == L.EBPF_FORWARD).all() and (ebpf.nat["verdict"] == L.V_DNAT).all()
    ipvs_forwarded = ipvs.ipvs["verdict"] == L.IPVS_FORWARD
    iptables_forwarded = iptables.nat["verdict"] == L.V_DNAT
    assert ipvs_forwarded.mean() > 0.9 and iptables_forwarded.mean() > 0.9
    for i, frontend in enumerate(frontends):
        chosen = (int(ebpf.after_nat["dst"][i]), int(ebpf.after_nat["dport"][i]))
        assert chosen in ebpf_sets[frontend.key]
        if _local_policy(cluster, frontend):
            continue  # kube-proxy's modes may fall back to Cluster endpoints; Cilium does not
        for other, forwarded in ((ipvs.after_nat, ipvs_forwarded), (iptables.after_nat, iptables_forwarded)):
            if forwarded[i]:
                assert (int(other["dst"][i]), int(other["dport"][i])) in ebpf_sets[frontend.key], frontend


def test_non_service_packets_are_not_translated(cluster, maps, backend):
    p = pod_connections(cluster, 200, seed=3)
    result = EbpfDatapath(maps, backend=backend).process(p)
    assert (result.ebpf["verdict"] == L.EBPF_NOT_SERVICE).all()
    assert (result.after_nat["dst"] == p["dst"]).all() and (result.ebpf["map_lookups"] == 1).all()


def test_map_full_loses_the_frontends_past_the_limit(cluster, backend):
    text = write(cluster, EbpfWriterOptions(service_max_entries=40, allow_overflow=True))
    small = load(text, allow_overflow=True)
    datapath = EbpfDatapath(small, backend=backend)
    limits = map_limits(small, datapath.maps)
    assert limits["map_full"] and limits["service_map_max_entries"] == 40
    assert limits["service_map_insert_failures"] == len(small.services) - 40
    served = [f for f in small.frontends if f.backend_ids]
    verdicts = datapath.process(_packets_to(served)).ebpf["verdict"]
    # Entries go in in order: the first frontends fit, the later ones are missing.
    fitted = np.cumsum([len(f.backend_ids) + 1 for f in small.frontends]) <= 40
    expected = [L.EBPF_FORWARD if fits else L.EBPF_NOT_SERVICE
                for f, fits in zip(small.frontends, fitted) if f.backend_ids]
    assert verdicts.tolist() == expected


# --- cost model and measure --------------------------------------------------------------------------

def test_preallocated_memory_by_hand():
    # service map: (65,536 + 64 spare) x (48 + 16 + 16) + 65,536 buckets x 16 + 64 CPUs x 8 x 4
    assert ebpf_costs.htab_bytes(12, 12, 65536, 64) == 65600 * 80 + 65536 * 16 + 64 * 32
    # CT map: 14-byte tuple rounds to 16, 56-byte ct_entry
    assert ebpf_costs.htab_bytes(14, 56, 524288, 1) == 524289 * 120 + 524288 * 16 + 32
    assert ebpf_costs.maglev_table_bytes(16381) == 17 * 4096


def test_measure_point_gives_every_field():
    records = ebpf_measure.measure(Point("ebpf", 40, 2, 4, 300, 0))
    assert [r["workload"] for r in records] == ["service_new", "service_new_first", "service_new_middle",
                                                "service_new_last", "nonservice_new", "established"]
    for record in records:
        assert record["reference_model"] is True and record["map_full"] is False
        assert record["kernel_bytes"] == sum(record[f"kernel_bytes_{m}"] for m in ("services", "backends", "ct"))
        for name in ("ns_p50", "ns_p99", "entries_visited_mean", "nat_entries_visited_mean", "conntrack_hit_fraction",
                     "conntrack_compares_mean", "model_bytes", "sync_entries", "rules",
                     "sync_proxy_rules_write_seconds", "sync_proxy_rules_load_seconds",
                     "service_map_entries_wanted", "service_map_max_entries", "sync_full_proxy_rules_duration_seconds",
                     "sync_partial_proxy_rules_duration_seconds", "sync_add_service_operations",
                     *(f"{c}_mean" for c in L.EBPF_WORK_COUNTERS)):
            assert name in record, name
    first, at_first, _, at_last, pods, later = records
    # One hash lookup wherever the service is.
    assert at_first["map_lookups_mean"] == at_last["map_lookups_mean"] == first["map_lookups_mean"]
    assert first["sync_partial_proxy_rules_operations"] == 2
    rules = first["rules"]
    assert first["sync_full_proxy_rules_operations"] == rules["service_map_entries"] + rules["backend_map_entries"]
    assert first["forwarded_fraction"] == 1.0 and first["map_lookups_mean"] == 4 and first["ct_inserts_mean"] == 1
    assert pods["forwarded_fraction"] == 0.0 and pods["map_lookups_mean"] == 1
    assert later["conntrack_hit_fraction"] == 1.0 and later["map_lookups_mean"] == 3


# --- the command line -------------------------------------------------------------------------------

def run(capsys, *argv):
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_rules_ebpf(capsys, tmp_path):
    objects = tmp_path / "cluster.yaml"
    assert run(capsys, "cluster", "--services", "4", "--endpoints", "2", "--nodes", "2", "-o", str(objects))[0] == 0
    status, out, _ = run(capsys, "rules", "ebpf", "--objects", str(objects))
    assert status == 0 and "REFERENCE MODEL" in out.splitlines()[0]
    assert len(load(out, "stdout").frontends) >= 4
    status, _, err = run(capsys, "rules", "ebpf", "--objects", str(objects), "--jump-rules")
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and "--jump-rules: not available in ebpf mode" in lines[0]
