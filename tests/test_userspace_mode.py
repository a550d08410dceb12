"""userspace mode: portal rules through the kernel, the relay on real loopback sockets, the point.

Relay tests assert which backend answered and what the relay counted, never how long it took.
"""
import socket

import numpy as np
import pytest

from bench.cluster.model import (Cluster, Endpoint, EndpointPort, EndpointSlice, Node, ProxyConfig,
                                 Service, ServicePort)
from bench.costs import userspace as userspace_costs
from bench.costs.iptables import kernel_bytes as iptables_kernel_bytes
from bench.errors import InputError
from bench.loaders.userspace import load, redirects_as_dnat
from bench.measure import MEASURE
from bench.measure import userspace as measure_userspace
from bench.measure.userspace import UserspaceDatapath, measure_relay
from bench.netaddr import ip_to_int
from bench.proxies.userspace import WriterOptions, portals, write
from bench.relay import LoopbackServer, Relay, RoundRobin, ServerProcess, echo
from bench.sweep import Point
from kernels import layout as L

NODE_IP = "192.168.0.2"
POD_IP = "10.0.1.5"


# --- the portal rules in the kernel ----------------------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    def service(name, cluster_ip, kind="ClusterIP", node_port=0, **fields):
        return Service("ns1", name, kind, cluster_ip, [ServicePort("p80", "tcp", 80, 8080, node_port)], **fields)

    services = [service("web", "172.30.0.10"), service("np", "172.30.0.11", "NodePort", 30001),
                service("lb", "172.30.0.12", "LoadBalancer", 30002, load_balancer_ips=["1.2.3.4"]),
                service("ext", "172.30.0.13", external_ips=["5.6.7.8"])]
    slices = [EndpointSlice("ns1", f"{s.name}-x", s.name, [EndpointPort("p80", "tcp", 8080)],
                            [Endpoint("10.180.0.1", "node2")]) for s in services]
    return Cluster(services, slices, [Node("node1", [NODE_IP])],
                   ProxyConfig(mode="userspace", node_ips=[NODE_IP]), node_name="node1")


@pytest.fixture(scope="module")
def proxy_ports(cluster):
    return {p.spn.split("/")[1].split(":")[0]: p.proxy_port for p in portals(cluster)}


@pytest.fixture(scope="module")
def ruleset(cluster):
    return load(write(cluster, WriterOptions(include_jump_rules=True)), NODE_IP)


def _packets(*destinations: tuple[str, int]) -> np.ndarray:
    packets = np.zeros(len(destinations), dtype=L.PACKET_DTYPE)
    for i, (dst, dport) in enumerate(destinations):
        packets[i] = (ip_to_int(POD_IP), ip_to_int(dst), 40000 + i, dport, 6, 0, L.CT_NEW, 0, 60, 0, b"", b"")
    return packets


TARGETS = {"web": ("172.30.0.10", 80), "np": (NODE_IP, 30001), "lb": ("1.2.3.4", 80), "ext": ("5.6.7.8", 80)}


def test_every_portal_sends_pods_to_its_proxy_port(ruleset, proxy_ports, backend):
    path = UserspaceDatapath(ruleset, [NODE_IP], seed=1, backend=backend)
    names = list(TARGETS)
    result = path.process(_packets(*TARGETS.values()))
    assert (result.nat["verdict"] == L.V_DNAT).all()
    assert list(result.nat["dnat_port"]) == [proxy_ports[name] for name in names]
    assert (result.nat["dnat_ip"] == ip_to_int(NODE_IP)).all()
    assert (result.after_nat["dst"] == ip_to_int(NODE_IP)).all()  # local: the proxy takes it


def test_traffic_to_no_portal_walks_every_container_rule_and_is_left_alone(ruleset, backend):
    path = UserspaceDatapath(ruleset, [NODE_IP], seed=1, backend=backend)
    result = path.process(_packets(("10.180.0.1", 8080)))
    assert result.nat["verdict"][0] == L.V_ACCEPT and result.after_nat["dst"][0] == ip_to_int("10.180.0.1")
    # KUBE-PORTALS-CONTAINER: web, np, lb ×2, ext ×3 = 7 rules; more than any service hit.
    assert result.nat_entries_visited[0] > 7


def test_backends_agree_on_verdicts_and_counters(ruleset):
    packets = _packets(*TARGETS.values(), ("10.180.0.1", 8080))
    runs = [UserspaceDatapath(ruleset, [NODE_IP], seed=2, backend=b).process(packets) for b in ("python", "cython")]
    assert np.array_equal(runs[0].nat, runs[1].nat)
    assert np.array_equal(runs[0].entries_visited, runs[1].entries_visited)


def test_redirect_becomes_the_dnat_the_kernel_performs():
    text = ("-A KUBE-PORTALS-CONTAINER -p tcp -m tcp --dport 80 -d 1.1.1.1/32 -j REDIRECT --to-ports 4000\n"
            "-A OUTPUT -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 4001\n"
            "-A OUTPUT -p tcp -m tcp --dport 81 -j DNAT --to-destination 9.9.9.9:1\n")
    assert redirects_as_dnat(text, "10.0.0.1").splitlines() == [
        "-A KUBE-PORTALS-CONTAINER -p tcp -m tcp --dport 80 -d 1.1.1.1/32 -j DNAT --to-destination 10.0.0.1:4000",
        "-A OUTPUT -p tcp -m tcp --dport 80 -j DNAT --to-destination 127.0.0.1:4001",
        "-A OUTPUT -p tcp -m tcp --dport 81 -j DNAT --to-destination 9.9.9.9:1",
    ]


def test_port_range_redirects_and_bad_addresses_are_input_errors():
    with pytest.raises(InputError, match="line 2: --to-ports"):
        redirects_as_dnat("*nat\n-A X -p tcp -j REDIRECT --to-ports 1-9\n", "10.0.0.1")
    with pytest.raises(InputError, match="interface address"):
        load("*nat\nCOMMIT\n", "10.0.0")


def test_cost_model_charges_redirect_at_its_size_and_appends_one_by_one(ruleset):
    redirects = 7 + 2  # container portals and NodePorts
    assert (iptables_kernel_bytes(ruleset.tables, 4) - userspace_costs.kernel_bytes(ruleset.tables, 4, redirects)
            == redirects * (L.TARGET_SIZES[L.TARGET_DNAT] - L.TARGET_SIZES[L.TARGET_MASQUERADE]))
    nat = ruleset.tables["nat"]
    rules = ruleset.rule_counts()["nat"]
    fixed = nat.n_entries - rules
    assert userspace_costs.sync_entries(nat, rules) == sum(fixed + k for k in range(1, rules + 1))


# --- the relay on loopback -------------------------------------------------------------------

def _announcer(name: bytes):
    def handler(conn):
        conn.sendall(name)
    return handler


def _ask(address, source_ip="127.0.0.1") -> bytes:
    with socket.create_connection(address, timeout=5, source_address=(source_ip, 0)) as conn:
        return conn.recv(16)


@pytest.fixture
def named_backends():
    servers = [LoopbackServer(_announcer(name)) for name in (b"a", b"b", b"c")]
    for server in servers:
        server.start()
    yield [server.address for server in servers]
    for server in servers:
        server.stop()


def test_relay_takes_backends_in_turn(named_backends):
    with Relay(named_backends) as relay:
        assert [_ask(relay.address) for _ in range(7)] == [b"a", b"b", b"c", b"a", b"b", b"c", b"a"]
    assert relay.connections_accepted == 7


def test_client_ip_affinity_keeps_each_client_on_its_backend(named_backends):
    with Relay(named_backends, affinity_seconds=600) as relay:
        first = [_ask(relay.address, ip) for ip in ("127.0.0.2", "127.0.0.3")]
        again = [_ask(relay.address, ip) for ip in ("127.0.0.3", "127.0.0.2", "127.0.0.2")]
        newcomer = _ask(relay.address, "127.0.0.4")
    assert first == [b"a", b"b"] and again == [b"b", b"a", b"a"] and newcomer == b"c"


def test_affinity_expires_after_its_timeout():
    now = [100.0]
    balancer = RoundRobin([("127.0.0.1", 1), ("127.0.0.1", 2)], affinity_seconds=10, clock=lambda: now[0])
    assert balancer.pick("127.0.0.9") == ("127.0.0.1", 1)
    now[0] += 9.5
    assert balancer.pick("127.0.0.9") == ("127.0.0.1", 1)  # refreshed: 10 s from now on
    now[0] += 9.5
    assert balancer.pick("127.0.0.9") == ("127.0.0.1", 1)
    now[0] += 10
    assert balancer.pick("127.0.0.9") == ("127.0.0.1", 2)
    assert balancer.pick("127.0.0.9", reset=True) == ("127.0.0.1", 1)  # a retry skips affinity


def test_relay_skips_a_backend_that_refuses(named_backends):
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead = unused.getsockname()  # bound, never listening: connections are refused
        with Relay([dead, named_backends[1]]) as relay:
            assert _ask(relay.address) == b"b"
            assert relay.connect_failures == 1


def test_relay_copies_a_stream_both_ways_and_half_closes():
    payload = bytes(range(256)) * 1024
    with LoopbackServer(echo) as server, Relay([server.address]) as relay:
        with socket.create_connection(relay.address, timeout=5) as conn:
            conn.sendall(payload)
            conn.shutdown(socket.SHUT_WR)
            received = b"".join(iter(lambda: conn.recv(65536), b""))
    assert received == payload


def test_relay_stops_cleanly_with_a_connection_open():
    with LoopbackServer(echo) as server:
        relay = Relay([server.address])
        relay.start()
        address = relay.address
        with socket.create_connection(address, timeout=5) as conn:
            conn.sendall(b"ping")
            assert conn.recv(4) == b"ping"
            relay.stop()
            assert conn.recv(4) == b""  # the relay closed its side when it stopped
    assert not relay.running and relay.threads_alive() == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=5)


def test_relay_stops_by_itself_after_its_lifetime(named_backends):
    relay = Relay(named_backends, lifetime=0.2)
    relay.start()
    assert relay.wait(30)
    relay.stop()


def test_servers_in_a_child_process_serve_and_stop():
    with ServerProcess([("echo", {})]) as servers:
        (echo_address,) = servers.addresses
        with ServerProcess([("relay", {"backends": [echo_address]})]) as relays:
            with socket.create_connection(relays.addresses[0], timeout=5) as conn:
                conn.sendall(b"hi")
                assert conn.recv(2) == b"hi"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(echo_address, timeout=5)


@pytest.mark.parametrize("make", [
    lambda: Relay([]),
    lambda: Relay([("10.0.0.1", 80)]),
    lambda: Relay([("127.0.0.1", 80)], listen=("0.0.0.0", 0)),
    lambda: Relay([("127.0.0.1", 70000)]),
    lambda: Relay([("127.0.0.1", 80)], affinity_seconds=-1),
    lambda: Relay([("127.0.0.1", 80)], idle_timeout=0),
    lambda: Relay([("127.0.0.1", 80)], max_connections=0),
    lambda: ServerProcess([("proxy", {})]),
    lambda: measure_relay(concurrency=(0,)),
    lambda: measure_relay(concurrency=(8, -1)),
    lambda: measure_relay(concurrency=()),
    lambda: measure_relay(setups=0),
    lambda: measure_relay(stream_bytes=-5),
])
def test_bad_relay_parameters_are_input_errors(make):
    with pytest.raises(InputError):
        make()


# --- a sweep point ---------------------------------------------------------------------------

@pytest.fixture
def small_relay_measurement(monkeypatch):
    monkeypatch.setattr(measure_userspace, "RELAY_CONCURRENCY", (1, 4))
    monkeypatch.setattr(measure_userspace, "SETUPS_PER_LEVEL", 16)
    monkeypatch.setattr(measure_userspace, "STREAM_BYTES_PER_LEVEL", 2**20)
    measure_userspace.relay_levels.cache_clear()  # measured once per process: measure these sizes
    yield
    measure_userspace.relay_levels.cache_clear()


def test_a_point_gives_every_workload_with_its_parts_labelled(small_relay_measurement):
    point = Point("userspace", 30, 2, 4, packets=200, seed=3)
    records = MEASURE["userspace"](point)
    assert [r["workload"] for r in records] == ["service_new", "service_new_first", "service_new_middle",
                                                "service_new_last", "nonservice_new", "established"]
    shared = {"ns_p50", "ns_p90", "ns_p99", "ns_mean", "entries_visited_mean",
                                                     "nat_entries_visited_mean", "conntrack_hit_fraction",
                                                     "conntrack_compares_mean", "kernel_bytes", "model_bytes",
                                                     "sync_entries", "rules", "point_id"}
    relay = {"relay_connect_ns_p50", "relay_connect_ns_p99", "direct_connect_ns_p50", "relay_setup_ns_p50",
             "relay_copy_ns_per_byte", "direct_copy_ns_per_byte", "relay_copy_ns_per_packet",
             "relay_connect_ns_p50_c4", "relay_copy_ns_per_byte_c4", "rule_walk_ns_p50", "ns_source",
             "relay_kernel_bytes_per_connection", "proxy_ports"}
    for record in records:
        assert shared | relay <= record.keys()
        assert record["relay_concurrency"] == [1, 4]
        assert record["relay_connect_ns_p50"] > 0 and record["relay_copy_ns_per_byte"] > 0
    service, first, _, last, pods, later = records
    # Portal rules are a linear list: the last service's walk is the longest.
    assert first["nat_entries_visited_mean"] < last["nat_entries_visited_mean"]
    assert "relay set-up (measured)" in last["ns_source"]
    assert "relay set-up (measured)" in service["ns_source"] and service["ns_p50"] >= service["rule_walk_ns_p50"]
    assert pods["ns_source"] == "rule walk (model)" and pods["ns_p50"] == pods["rule_walk_ns_p50"]
    assert "relay copy" in later["ns_source"]
    assert later["conntrack_hit_fraction"] == 1 and later["nat_entries_visited_mean"] == 0
    assert pods["nat_entries_visited_mean"] > service["nat_entries_visited_mean"]


def test_a_points_counters_repeat_with_its_seed(small_relay_measurement):
    point = Point("userspace", 20, 1, 4, packets=100, seed=5)
    counters = ("entries_visited_mean", "nat_entries_visited_mean", "conntrack_compares_mean", "kernel_bytes",
                "sync_entries", "proxy_ports")
    runs = [[{k: r[k] for k in counters} for r in MEASURE["userspace"](point)] for _ in range(2)]
    assert runs[0] == runs[1]
