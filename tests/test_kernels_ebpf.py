"""The eBPF reference model's kernel (kernels/ebpf.pyx and its twin): BPF hash maps, the
random and Maglev picks, the CT map and map-full behaviour.

Every behavioural test runs through both backends (the ``backend`` fixture); the
``*_backends_agree`` tests also compare whole outputs between them.
"""
import numpy as np
import pytest
from scipy import stats

from kernels import layout as L
from kernels.reference import ebpf as twin
from kernels.reference.hashing import jhash
from tests.conftest import compiled_available, kernel

VIP = 0x0A600000  # 10.96.0.0: frontends
CLIENT = 0x0A010001
BACKENDS = 0x0A020000  # 10.2.0.0/16: backends
TCP, UDP, ICMP = 6, 17, 1


def arrays(counts, port=80, proto=TCP):
    """Frontends VIP+i with counts[i] backends each (own backends), in the writer's order."""
    services, backends = [], []
    for i, count in enumerate(counts):
        for slot in range(1, count + 1):
            backends.append((len(backends) + 1, BACKENDS + len(backends) + 1, 8080, proto, 0))
            services.append((VIP + i, port, slot, proto, (0, 0, 0), len(backends), 0, 0, 0))
        services.append((VIP + i, port, 0, proto, (0, 0, 0), 0, count, 0, i + 1))
    return np.array(services, L.EBPF_SERVICE_DTYPE), np.array(backends, L.EBPF_BACKEND_DTYPE)


def packets(dst, sport, proto=TCP, dport=80, src=CLIENT):
    dst, sport = np.broadcast_arrays(np.atleast_1d(dst), np.atleast_1d(sport))
    p = np.zeros(len(dst), L.PACKET_DTYPE)
    p["src"], p["dst"], p["sport"], p["dport"], p["proto"] = src, dst, sport, dport, proto
    p["ctstate"] = L.CT_NEW
    return p


def run(maps, p):
    results = np.zeros(len(p), L.EBPF_RESULT_DTYPE)
    maps.process(p, results)
    return results


def service_maps(backend, counts, **options):
    return kernel("ebpf", backend).ServiceMaps.from_arrays(*arrays(counts), **options)


def test_structs_and_constants_match_layout():
    if not compiled_available():
        pytest.skip("compiled kernels not built")
    from kernels import ebpf
    assert ebpf.struct_layout() == {"result": L.EBPF_RESULT_DTYPE.itemsize,
                                    "service": L.EBPF_SERVICE_DTYPE.itemsize,
                                    "backend": L.EBPF_BACKEND_DTYPE.itemsize}
    for name, value in ebpf.LAYOUT_CONSTANTS.items():
        assert getattr(L, name) == value, name


# ---- hash maps -----------------------------------------------------------------------------

@pytest.mark.parametrize("max_entries, buckets", [(1, 1), (100, 128), (65536, 65536), (65537, 131072)])
def test_buckets_are_max_entries_rounded_up_to_a_power_of_two(backend, max_entries, buckets):
    maps = service_maps(backend, [1], service_max_entries=max_entries, ct_max_entries=max_entries)
    assert maps.maps()["services"]["buckets"] == buckets
    assert maps.maps()["ct"] == {"max_entries": max_entries, "buckets": buckets, "entries": 0, "insert_failures": 0}


def test_lookup_compares_follow_jhash_buckets_newest_first(backend):
    # 40 frontends without backends in a 40-entry map (64 buckets): each master lands in bucket
    # jhash(lb4_key, hashrnd) & 15, at its chain's head; a lookup walks from the head to it.
    counts = [0] * 40
    maps = service_maps(backend, counts, service_max_entries=16 + 24, seed=7)
    n_buckets = maps.maps()["services"]["buckets"]
    assert n_buckets == 64
    hashrnd = maps.services.hashrnd
    buckets = [jhash(twin.service_key(VIP + i, 80, 0, TCP), hashrnd) & (n_buckets - 1) for i in range(40)]
    expected = [1 + sum(b == buckets[i] for b in buckets[i + 1:]) for i in range(40)]
    results = run(maps, packets(VIP + np.arange(40), 40000))
    assert results["verdict"].tolist() == [L.EBPF_NO_BACKEND] * 40
    # the master lookup, then the CT lookup of an empty CT map
    assert results["bucket_compares"].tolist() == expected
    assert results["map_lookups"].tolist() == [2] * 40


def test_full_map_refuses_inserts_with_e2big(backend):
    # 3 frontends x (2 slots + master) = 9 entries into a 7-entry map: the third frontend's
    # second slot and master fail, so it is not served; the others are.
    maps = service_maps(backend, [2, 2, 2], service_max_entries=7)
    assert maps.maps()["services"] == {"max_entries": 7, "buckets": 8, "entries": 7, "insert_failures": 2}
    results = run(maps, packets(VIP + np.arange(3), 40000))
    assert results["verdict"].tolist() == [L.EBPF_FORWARD, L.EBPF_FORWARD, L.EBPF_NOT_SERVICE]


def test_full_ct_map_drops_new_connections(backend):
    maps = service_maps(backend, [3], ct_max_entries=4)
    results = run(maps, packets(VIP, 40000 + np.arange(6)))
    assert results["verdict"].tolist() == [L.EBPF_FORWARD] * 4 + [L.EBPF_CT_FULL] * 2
    assert maps.maps()["ct"]["insert_failures"] == 2 and results["ct_inserts"].sum() == 4
    again = run(maps, packets(VIP, 40000 + np.arange(4)))  # the tracked ones still pass
    assert again["ct_hit"].all() and (again["verdict"] == L.EBPF_FORWARD).all()


# ---- the data path ---------------------------------------------------------------------------

def test_new_then_established_packet_counters(backend):
    maps = service_maps(backend, [4], seed=3)
    first = run(maps, packets(VIP, 40001))[0]
    assert first["verdict"] == L.EBPF_FORWARD and first["ct_hit"] == 0
    # service, CT, slot and backend lookups; hashes for those and the CT insert
    assert (first["map_lookups"], first["hash_computations"], first["ct_inserts"], first["rng_draws"]) == (4, 5, 1, 1)
    assert 1 <= first["backend_slot"] <= 4 and first["backend_id"] == first["backend_slot"]
    assert (first["dnat_ip"], first["dnat_port"]) == (BACKENDS + first["backend_id"], 8080)
    later = run(maps, packets(VIP, 40001))[0]
    assert later["ct_hit"] == 1 and later["backend_id"] == first["backend_id"]
    assert (later["map_lookups"], later["hash_computations"], later["ct_inserts"], later["rng_draws"]) == (3, 3, 0, 0)
    assert later["ct_compares"] >= 1 and maps.maps()["ct"]["entries"] == 1


def test_non_service_packets_cost_one_lookup_and_other_protocols_none(backend):
    maps = service_maps(backend, [2])
    results = run(maps, np.concatenate([packets(VIP + 5, 40000), packets(VIP, 40000, dport=81),
                                        packets(VIP, 40000, proto=ICMP)]))
    assert results["verdict"].tolist() == [L.EBPF_NOT_SERVICE] * 3
    assert results["map_lookups"].tolist() == [1, 1, 0]
    assert results["rev_nat"].tolist() == [-1, -1, -1]


def test_random_pick_spreads_evenly(backend):
    maps = service_maps(backend, [10], seed=11)
    results = run(maps, packets(VIP, np.arange(4000) % 28000 + 32768, src=CLIENT + np.arange(4000) // 28000))
    assert (results["verdict"] == L.EBPF_FORWARD).all()
    counts = np.bincount(results["backend_slot"], minlength=11)[1:]
    assert stats.chisquare(counts).pvalue > 0.001


def test_maglev_table_gives_every_backend_its_share_and_spreads_flows(backend):
    maps = service_maps(backend, [7], algorithm="maglev", maglev_size=1009, seed=5)
    table = maps.maglev_table(1)
    # Backends claim slots in turns until the table is full: shares differ by at most one.
    share = np.bincount(table, minlength=8)[1:]
    assert share.sum() == 1009 and share.max() - share.min() <= 1
    sports = 32768 + np.arange(3500)
    results = run(maps, packets(VIP, sports))
    assert (results["verdict"] == L.EBPF_FORWARD).all() and results["rng_draws"].sum() == 0
    assert (results["backend_id"] == table[results["backend_slot"]]).all()
    assert stats.chisquare(np.bincount(results["backend_id"], minlength=8)[1:]).pvalue > 0.001
    # The pick is a function of the flow alone: a fresh node with the same seed agrees.
    other = run(service_maps(backend, [7], algorithm="maglev", maglev_size=1009, seed=5), packets(VIP, sports))
    assert (other["backend_id"] == results["backend_id"]).all()


def test_maglev_default_table_size(backend):
    maps = service_maps(backend, [3, 0], algorithm="maglev", seed=2)
    assert len(maps.maglev_table(1)) == L.EBPF_MAGLEV_TABLE_SIZE == 16381
    assert len(maps.maglev_table(2)) == 0  # no backends, no table
    assert set(maps.maglev_table(1).tolist()) == {1, 2, 3}


def test_bad_options(backend):
    module = kernel("ebpf", backend)
    with pytest.raises(ValueError, match="algorithm"):
        module.ServiceMaps(algorithm="wrr")
    with pytest.raises(ValueError, match="prime"):
        module.ServiceMaps(maglev_size=1000)


# ---- both backends ---------------------------------------------------------------------------

def _outcome(backend, algorithm, maglev_size, seed):
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 6, 30).tolist()
    maps = service_maps(backend, counts, algorithm=algorithm, maglev_size=maglev_size, seed=seed,
                        service_max_entries=70, backend_max_entries=60, ct_max_entries=300)
    p = packets(VIP + rng.integers(0, 34, 400), rng.integers(32768, 33200, 400),
                proto=np.where(rng.random(400) < 0.1, UDP, TCP), src=CLIENT + rng.integers(0, 3, 400))
    results = np.concatenate([run(maps, p), run(maps, p)])
    return (results.tobytes(), maps.maps(), maps.totals, maps.model_bytes(), maps.maglev_probes,
            [maps.maglev_table(i).tolist() for i in range(1, 31)])


@pytest.mark.parametrize("algorithm, maglev_size", [("random", 16381), ("maglev", 251), ("maglev", 16381)])
def test_backends_agree(algorithm, maglev_size):
    if not compiled_available():
        pytest.skip("compiled kernels not built")
    for seed in (0, 1):
        assert _outcome("cython", algorithm, maglev_size, seed) == _outcome("python", algorithm, maglev_size, seed)


def test_same_seed_same_counters_other_seed_other_hashes(backend):
    assert _outcome(backend, "random", 251, 4) == _outcome(backend, "random", 251, 4)
    assert service_maps(backend, [1], seed=1).services.hashrnd != service_maps(backend, [1], seed=2).services.hashrnd
