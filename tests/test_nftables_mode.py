"""nftables mode end to end: the node's data path, the cost model, the tracer and the command line.

The tracer cases are kube-proxy's nftables packet-flow cases (kube-proxy-rules.md §c, §d) on a
hand-built cluster (node1 192.168.0.2, cluster CIDR 10.0.0.0/8, ServiceCIDR 172.30.0.0/16);
the data path runs on seeded generated clusters through both backends.
"""
import json
import re
from dataclasses import replace

import numpy as np
import pytest

from bench.cli import main
from bench.cluster.generate import generate
from bench.costs import nftables as nft_costs
from bench.cluster.model import service_ports
from bench.errors import InputError
from bench.loaders.nftables import load
from bench.measure.nftables import NftablesDatapath
from bench.netaddr import ip_to_int
from bench.proxies.nftables import WriterOptions, write_full, write_partial, write_ruleset_listing
from bench.results import read_jsonl
from bench.trace import trace_nftables
from bench.workload import established, pod_connections, service_connections
from kernels import layout as L
from tests.builders import packet_flow_cluster
from kernels.nftblob import compile_table
from tests.conftest import compiled_available, kernel

NODE_IP = "192.168.0.2"
OPTIONS = WriterOptions(service_cidrs=("172.30.0.0/16",))


# --- the tracer on kube-proxy's packet-flow cases -----------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    return packet_flow_cluster("nftables", NODE_IP)


@pytest.fixture(scope="module", params=["transaction", "listing"])
def traced(request, cluster):
    """The same ruleset read from both text forms: (ruleset, text)."""
    text = (write_full if request.param == "transaction" else write_ruleset_listing)(cluster, OPTIONS)
    return load(text, request.param), text


def _trace(traced, src, dst, dport, **options):
    ruleset, text = traced
    return trace_nftables(ruleset, [NODE_IP], src, dst, dport, text=text, **options)


def test_cluster_ip_reaches_both_endpoints_in_map_order(traced):
    result = _trace(traced, "10.180.9.9", "172.30.0.10", 80, all_endpoints=True)
    assert (result["output"], result["masquerade"]) == ("10.180.0.1:8080, 10.180.0.2:8080", False)
    assert result["verdict"] == "ACCEPT" and result["counters"]["rng_draws"] == 1
    hooks = [step["hook"] for step in result["path"]]
    assert hooks.index("PREROUTING") < hooks.index("FORWARD") < hooks.index("POSTROUTING")
    dnat = next(step for step in result["path"] if "dnat to" in step["text"])
    assert dnat["matched"] and dnat["table"] == "ip kube-proxy"
    assert dnat["text"] == "meta l4proto tcp dnat to 10.180.0.1:8080"


def test_one_pick_without_all_endpoints(traced):
    result = _trace(traced, "10.180.9.9", "172.30.0.10", 80)
    assert result["output"] in ("10.180.0.1:8080", "10.180.0.2:8080")


def test_hairpin_is_masqueraded(traced):
    result = _trace(traced, "10.180.1.1", "172.30.0.11", 80)
    assert (result["output"], result["masquerade"]) == ("10.180.1.1:8080", True)
    assert any(s["chain"] == "mark-for-masquerade" for s in result["path"])


def test_node_port(traced):
    result = _trace(traced, "203.0.113.7", NODE_IP, 30001)
    assert (result["output"], result["masquerade"]) == ("10.180.1.1:8080", True)
    assert any(s["chain"].startswith("external-") and s["matched"] for s in result["path"])


def test_load_balancer_source_ranges(traced):
    allowed = _trace(traced, "203.0.113.7", "1.2.3.4", 80)
    assert (allowed["output"], allowed["verdict"]) == ("10.180.2.1:8080", "ACCEPT")
    dropped = _trace(traced, "198.51.100.1", "1.2.3.4", 80)
    assert (dropped["output"], dropped["verdict"], dropped["masquerade"]) == ("DROP", "DROP", False)
    assert dropped["path"][-1]["chain"].startswith("firewall-") and dropped["path"][-1]["matched"]
    assert {s["hook"] for s in dropped["path"]} == {"PREROUTING"}  # dropped before nat-prerouting


def test_service_without_endpoints_is_rejected(traced):
    result = _trace(traced, "10.180.9.9", "172.30.0.13", 80)
    assert (result["output"], result["verdict"]) == ("REJECT", "REJECT")
    assert result["path"][-1]["chain"] == "reject-chain"


def test_wrong_port_on_a_cluster_ip_is_rejected(traced):
    result = _trace(traced, "10.180.9.9", "172.30.0.10", 81)
    assert (result["output"], result["verdict"]) == ("REJECT", "REJECT")
    assert result["path"][-1]["chain"] == "cluster-ips-check"


def test_unallocated_address_in_the_service_cidr_is_dropped(traced):
    result = _trace(traced, "10.180.9.9", "172.30.9.9", 80)
    assert (result["output"], result["verdict"]) == ("DROP", "DROP")


def test_non_service_packet_passes_untouched(traced):
    result = _trace(traced, "10.180.9.9", "10.180.0.1", 8080)
    assert (result["output"], result["verdict"], result["masquerade"]) == ("", "ACCEPT", False)
    assert result["endpoints"] == []


def test_a_ruleset_without_kube_proxys_table_is_refused():
    ruleset = load("add table ip filter\n", "other")
    with pytest.raises(InputError, match="ip kube-proxy"):
        trace_nftables(ruleset, [NODE_IP], "10.0.0.1", "10.0.0.2", 80)


# --- the data path ----------------------------------------------------------------------------

def _generated(services):
    cluster = generate(services, 2, 4, seed=7, mix="clusterip")
    return cluster, load(write_full(cluster), f"{services} services")


@pytest.fixture(scope="module")
def small():
    return _generated(100)


def test_first_packets_are_dnated_and_established_ones_skip_nat(small, backend):
    cluster, ruleset = small
    path = NftablesDatapath(ruleset, cluster.config.node_ips, seed=3, backend=backend)
    syns = service_connections(cluster, service_ports(cluster), 300, seed=1)
    first = path.process(syns)
    assert not first.conntrack_hit.any() and (first.nat["verdict"] == L.V_DNAT).all()
    endpoints = {ep.ip for s in cluster.slices for ep in s.endpoints}
    assert {a for a in map(_ip, first.after_nat["dst"])} <= endpoints
    assert (first.postrouting["entries_visited"] > 0).all()  # nat-postrouting ran
    assert path.conntrack.n_connections == 300

    later = path.process(established(syns), established(first.after_nat))
    assert later.conntrack_hit.all()
    # Only the filter base chains' ct-state gates: one rule at PREROUTING, two at FORWARD.
    table = ruleset.table()
    gates = len(table.chains["filter-prerouting-pre-dnat"].rules) + len(table.chains["filter-forward"].rules)
    assert (later.entries_visited == gates).all()
    assert (later.total("set_lookups") == 0).all() and (later.total("jumps") == 0).all()
    assert (later.postrouting["entries_visited"] == 0).all()


def test_non_service_packets_fall_through(small, backend):
    cluster, ruleset = small
    path = NftablesDatapath(ruleset, cluster.config.node_ips, seed=3, backend=backend)
    result = path.process(pod_connections(cluster, 200, seed=2))
    assert (result.nat["verdict"] == L.V_ACCEPT).all() and (result.filter["verdict"] == L.V_ACCEPT).all()
    assert (result.after_nat["dst"] == pod_connections(cluster, 200, seed=2)["dst"]).all()
    assert path.conntrack.n_connections == 200


def _first_packet_work(services, backend):
    cluster, ruleset = _generated(services)
    path = NftablesDatapath(ruleset, cluster.config.node_ips, seed=5, backend=backend)
    result = path.process(service_connections(cluster, service_ports(cluster), 400, seed=2))
    return (float(result.entries_visited.mean()), float(result.nat_entries_visited.mean()),
            float(result.total("set_lookups").mean()))


def test_rules_visited_stay_flat_as_services_grow(backend):
    few, many = _first_packet_work(100, backend), _first_packet_work(2000, backend)
    assert abs(few[0] - many[0]) < 0.2 and abs(few[2] - many[2]) < 0.2, (few, many)
    assert 6 <= many[1] <= 9  # kernel-internals §3.5: ~6 rules choose service and endpoint


def test_backends_agree(small):
    if not compiled_available():
        pytest.skip("compiled kernels not built")
    cluster, ruleset = small
    syns = service_connections(cluster, service_ports(cluster), 200, seed=4)
    outcomes = []
    for backend in ("cython", "python"):
        path = NftablesDatapath(ruleset, cluster.config.node_ips, seed=5, backend=backend)
        first = path.process(syns)
        later = path.process(established(syns), established(first.after_nat))
        outcomes.append((first.nat.tobytes(), first.filter.tobytes(), first.postrouting.tobytes(),
                         later.nat.tobytes(), first.conntrack_compares.tolist()))
    assert outcomes[0] == outcomes[1]


def _ip(value):
    return ".".join(str(int(value) >> shift & 255) for shift in (24, 16, 8, 0))


# --- the cost model -----------------------------------------------------------------------------

def test_memory_is_the_kernel_models(small, backend):
    cluster, ruleset = small
    path = NftablesDatapath(ruleset, cluster.config.node_ips, seed=3, backend=backend)
    memory = nft_costs.memory(path)
    assert memory["kernel_bytes"] == path.table.modelled_bytes() + path.conntrack.modelled_bytes()
    assert memory["model_bytes"] == path.table.model_bytes() + path.conntrack.model_bytes()


def synced(services, endpoints=2, backend="python", seed=7, mix="clusterip"):
    """A fully synced node: (cluster, its ruleset, the kernel Ruleset of its table)."""
    cluster = generate(services, endpoints, 4, seed=seed, mix=mix)
    ruleset, compiled, _ = nft_costs.full_sync(cluster, seed=seed)
    local = [ip_to_int(ip) for ip in cluster.config.node_ips]
    return cluster, ruleset, kernel("nftables", backend).Ruleset(compiled, local, seed=seed)


def removed_service(cluster):
    """The cluster without its first service (and that service's EndpointSlices)."""
    gone = cluster.services[0]
    return replace(cluster, services=cluster.services[1:],
                   slices=[s for s in cluster.slices
                           if (s.namespace, s.service_name) != (gone.namespace, gone.name)])


CHANGES = {"endpoint_change": nft_costs.moved_endpoint, "service_add": nft_costs.added_service,
           "service_delete": removed_service}


def test_an_update_costs_the_changed_objects_not_the_ruleset():
    costs = []
    for services in (50, 400):
        cluster, ruleset, table = synced(services)
        full = nft_costs.operations(write_full(cluster))
        costs.append((sum(full.values()), nft_costs.measure_updates(cluster, ruleset, table)))
    (small_full, small), (large_full, large) = costs
    assert large_full > 6 * small_full
    for change in ("endpoint_change", "service_add"):
        assert small[f"{change}_operations"] == large[f"{change}_operations"]
        assert small[f"{change}_kernel_operations"] == large[f"{change}_kernel_operations"]
    # One endpoint of a two-endpoint service moved: the service's chain and its two endpoint
    # chains are rewritten (add, flush, two rules each) and the old endpoint chain flushed.
    assert small["endpoint_change_operations"] == {"add_chain": 3, "flush_chain": 4, "add_rule": 6}
    # The kernel builds those four chains' blobs (one of them new, one now empty) and the
    # service chain's new numgen map; no set element changes.
    assert small["endpoint_change_kernel_operations"] == {
        "chains_compiled": 4, "rules_compiled": 6, "chains_deleted": 0, "anonymous_maps_built": 1,
        "sets_created": 0, "sets_deleted": 0, "elements_added": 0, "elements_deleted": 0}
    assert small["service_add_operations"]["add_element"] == 2  # cluster-ips and service-ips
    assert small["service_add_kernel_operations"]["elements_added"] == 2


@pytest.mark.parametrize("change", CHANGES)
def test_a_partial_sync_applied_in_place_equals_compiling_the_result(change, backend):
    before, ruleset, live = synced(40, endpoints=3, backend=backend, seed=5, mix="realistic")
    after = CHANGES[change](before)
    nft_costs.apply_transaction(write_partial(before, after), ruleset, live)
    local = [ip_to_int(ip) for ip in after.config.node_ips]
    rebuilt = kernel("nftables", backend).Ruleset(compile_table(ruleset.table(), 5), local, seed=5)
    # A full sync of the changed cluster: the same rules, in another order of chains and elements.
    fresh_ruleset, fresh_compiled, _ = nft_costs.full_sync(after, seed=5)
    fresh = kernel("nftables", backend).Ruleset(fresh_compiled, local, seed=5)
    to_service = service_connections(after, service_ports(after), 400, seed=1)
    batches = (to_service, pod_connections(after, 100, seed=2), established(to_service))
    for rs in (live, rebuilt, fresh):
        rs.maintain()  # the rhash worker has run on every set
    for hook in (L.HOOK_PREROUTING, L.HOOK_INPUT, L.HOOK_FORWARD, L.HOOK_POSTROUTING):
        for p in batches:
            got, want, full = (run_hook(rs, p, hook) for rs in (live, rebuilt, fresh))
            np.testing.assert_array_equal(got, want)
            # Bucket compares follow the order the elements were added in; all else is equal.
            fields = [f for f in L.NFT_RESULT_DTYPE.names if f != "bucket_entries_compared"]
            np.testing.assert_array_equal(got[fields], full[fields])
    assert live.modelled_bytes() == rebuilt.modelled_bytes()
    # The same rules as a full sync's (the flushed chains are deleted by a later sync).
    assert ruleset.stats()["rules"] == fresh_ruleset.stats()["rules"]


def run_hook(rs, packets, hook):
    rs.reseed(11)
    results = np.zeros(len(packets), dtype=L.NFT_RESULT_DTYPE)
    rs.run(packets, hook, results)
    return results


def test_the_rhash_worker_keeps_every_service_reachable_through_many_changes(backend):
    cluster, ruleset, live = synced(30, backend=backend)
    for step in range(12):  # services added, and some removed: service-ips grows
        after = nft_costs.added_service(cluster) if step < 8 or step % 2 else removed_service(cluster)
        nft_costs.apply_transaction(write_partial(cluster, after), ruleset, live)
        cluster = after
    service_ips = live.sets[live.compiled.set_ids["service-ips"]]
    assert service_ips.resizes > 0
    to_service = service_connections(cluster, service_ports(cluster), 300, seed=3)
    r = run_hook(live, to_service, L.HOOK_PREROUTING)
    assert (r["verdict"] == L.V_DNAT).all()


def test_a_changed_cluster_still_routes_the_new_endpoint():
    cluster = generate(20, 2, 4, seed=7, mix="clusterip")
    moved = nft_costs.moved_endpoint(cluster)
    ruleset, _, _ = nft_costs.full_sync(moved)
    assert nft_costs.NEW_POD_IP in write_full(moved) and ruleset.table()


# --- the command line -----------------------------------------------------------------------------

def run(capsys, *argv):
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def _one_line(status, err, *fragments):
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert all(fragment in lines[0] for fragment in fragments), lines[0]


@pytest.fixture
def cluster_files(tmp_path, capsys):
    """Manifests of a cluster and of the same cluster with one more service."""
    paths = []
    for services in (3, 4):
        path = tmp_path / f"cluster{services}.yaml"
        assert run(capsys, "cluster", "--services", str(services), "--endpoints", "2", "--nodes", "2",
                   "--mix", "clusterip", "-o", str(path))[0] == 0
        paths.append(path)
    return paths


def test_cli_rules_nftables_forms(capsys, tmp_path, cluster_files):
    before, after = cluster_files
    status, full, _ = run(capsys, "rules", "nftables", "--objects", str(after))
    assert status == 0 and full.startswith("add table ip kube-proxy")
    status, listing, _ = run(capsys, "rules", "nftables", "--objects", str(after), "--listing")
    assert status == 0 and listing.startswith("table ip kube-proxy {")
    assert load(full, "full").stats() == load(listing, "listing").stats()
    status, partial, _ = run(capsys, "rules", "nftables", "--objects", str(after), "--previous", str(before))
    assert status == 0 and "add table" not in partial and "add element ip kube-proxy service-ips" in partial
    assert len(partial.splitlines()) < len(full.splitlines()) / 2
    applied = load(partial, "partial", base=load(write_full_of(before, capsys), "before"))
    assert applied.table().sets["service-ips"].elements == load(full, "full").table().sets["service-ips"].elements


def write_full_of(path, capsys):
    status, out, _ = run(capsys, "rules", "nftables", "--objects", str(path))
    assert status == 0
    return out


def test_cli_trace_nftables_json(capsys, tmp_path, cluster_files):
    listing = tmp_path / "ruleset.nft"
    assert run(capsys, "rules", "nftables", "--objects", str(cluster_files[0]), "--listing",
               "-o", str(listing))[0] == 0
    vip, port = re.search(r"([0-9.]+) \. tcp \. ([0-9]+) : goto service-", listing.read_text()).groups()
    for source in (["--ruleset", str(listing)], ["--objects", str(cluster_files[0])]):
        status, out, _ = run(capsys, "trace", "nftables", *source, "--src", "10.128.0.9", "--dst", vip,
                             "--dport", port, "--all-endpoints", "--json")
        assert status == 0
        result = json.loads(out)
        assert set(result) >= {"packet", "output", "masquerade", "verdict", "endpoints", "path", "counters"}
        assert len(result["endpoints"]) == 2 and result["verdict"] == "ACCEPT"
        assert set(result["counters"]) == set(L.NFT_WORK_COUNTERS)
        assert {"table", "hook", "chain", "rule", "text", "matched"} <= set(result["path"][0])
    status, out, _ = run(capsys, "trace", "nftables", "--ruleset", str(listing), "--src", "10.128.0.9",
                         "--dst", vip, "--dport", port)
    assert status == 0 and "ip kube-proxy services  (hook PREROUTING)" in out


def test_cli_malformed_nft_text_is_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.nft"
    bad.write_text("add table ip kube-proxy\nadd chain ip kube-proxy services\n"
                   "add rule ip kube-proxy services ip daddr 10.0.0.1 frobnicate\n")
    status, _, err = run(capsys, "trace", "nftables", "--ruleset", str(bad), "--src", "10.0.0.2",
                         "--dst", "10.0.0.1", "--dport", "80")
    _one_line(status, err, "bad.nft:3")


def test_cli_nftables_refuses_other_modes_options(capsys, cluster_files):
    status, _, err = run(capsys, "rules", "nftables", "--objects", str(cluster_files[0]), "--ipvs-scheduler", "rr")
    _one_line(status, err, "--ipvs-scheduler", "nftables")


def test_cli_bench_nftables_writes_records(capsys, tmp_path):
    status, out, _ = run(capsys, "bench", "--modes", "nftables", "--services", "30", "--endpoints", "2",
                         "--nodes", "3", "--packets", "200", "--out", str(tmp_path), "--no-benchmarks", "--quiet")
    assert status == 0
    records = [r for r in read_jsonl(tmp_path / "results.jsonl") if r["kind"] == "point"]
    by_workload = {r["workload"]: r for r in records}
    assert set(by_workload) == {"service_new", "service_new_first", "service_new_middle", "service_new_last",
                                "nonservice_new", "established"}
    # The service-ips map has no order: the first and the last service cost about the same rules
    # (they differ only by their own chains: affinity, endpoints, masquerade).
    assert abs(by_workload["service_new_first"]["nat_entries_visited_mean"]
               - by_workload["service_new_last"]["nat_entries_visited_mean"]) < 1
    assert all(r["mode"] == "nftables" and r["kernel_bytes"] > r["model_bytes"] > 0 for r in records)
    assert 6 <= by_workload["service_new"]["nat_entries_visited_mean"] <= 9
    assert by_workload["service_new"]["set_lookups_mean"] > by_workload["established"]["set_lookups_mean"] == 0
    assert by_workload["established"]["conntrack_hit_fraction"] == 1
    assert by_workload["service_new"]["endpoint_change_operations_total"] > 0
    assert by_workload["service_new"]["sync_full_operations"] > by_workload["service_new"]["service_add_operations_total"]
    assert "nftables" in out and "lookups" in out
    assert np.isfinite(by_workload["service_new"]["sync_full_proxy_rules_duration_seconds"])
