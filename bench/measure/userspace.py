"""userspace mode's data path (:class:`UserspaceDatapath`) and its sweep point.

The legacy proxy's cost has two parts, and every record says which number comes from where:

* the kernel part, modelled: a first packet walks the portal rules (PREROUTING →
  KUBE-PORTALS-CONTAINER, one rule per service port and portal address, linearly) and is
  REDIRECTed to the service's proxy port on the node; a later packet hits conntrack. These
  are the ``rule_walk_ns_*`` fields and the work counters of path_record;
* the proxy part, measured for real on loopback with bench/relay.py, once per run (it does not
  depend on the cluster): connection set-up through
  the relay against a direct connection (connect, one byte there and back), and the time per
  byte copied (a stream into a sink), at 1, 8 and 32 concurrent connections (fields suffixed
  ``_c8`` …; unsuffixed fields are the single-connection numbers).

So a new connection to a service costs ``rule walk + relay set-up`` (the relay's extra
latency over a direct connection), an established packet ``kernel path + relay copy`` of one
full segment's payload, and a new connection not to a service only the walk. The ``ns_*``
fields are those sums (a set-up sample, drawn with the point's seed, added to each walk) and
``ns_source`` names the parts. The relay is Python, not Go: its absolute costs are higher
than kube-proxy's were, and the machine's other load shows in them.
"""
from __future__ import annotations

import functools
import socket
import threading
import time
from dataclasses import asdict, dataclass

import numpy as np

from bench.cluster.generate import generate
from bench.cluster.model import service_ports
from bench.costs import userspace as userspace_costs
from bench.errors import InputError
from bench.loaders.userspace import load
from bench.measure.iptables import IptablesDatapath
from bench.measure.path import latency_summary, path_record, position_results
from bench.proxies.iptables import ordered_ports
from bench.proxies.userspace import WriterOptions, host_ip, portals, write
from bench.relay import COPY_BUFFER_BYTES, ServerProcess
from bench.workload import established, pod_connections, service_connections

RELAY_CONCURRENCY = (1, 8, 32)
SETUPS_PER_LEVEL = 256  # connection set-ups timed per level, through the relay and direct
STREAM_BYTES_PER_LEVEL = 16 * 2**20  # bytes streamed per level, split over the connections
RELAY_BACKENDS = 4  # at most: the relay's work per connection does not depend on the count
SEGMENT_PAYLOAD_BYTES = 1448  # a full TCP segment's payload (1500 MTU − IP, TCP, timestamps)
CLIENT_TIMEOUT_SECONDS = 10.0


class UserspaceDatapath(IptablesDatapath):
    """conntrack + the nat table with the portal rules + an empty filter table.

    The kernel path is iptables' (:class:`IptablesDatapath`); only the rules differ. A first
    packet to a service ends in the DNAT the REDIRECT performs, to the proxy port on the
    node's address, so the packet is local and takes filter INPUT; its walk is one
    KUBE-PORTALS-CONTAINER rule per portal up to the service's. What the relay does after
    that is measured, not modelled (:func:`measure_relay`).
    """


@dataclass(frozen=True)
class RelayLevel:
    """The relay's measured costs at one number of concurrent connections."""

    concurrency: int
    relay_connect_ns: np.ndarray
    direct_connect_ns: np.ndarray
    relay_ns_per_byte: float
    direct_ns_per_byte: float

    @property
    def setup_overhead_ns(self) -> np.ndarray:
        """Each relayed set-up less a typical direct one: what the relay adds."""
        return np.maximum(self.relay_connect_ns - np.median(self.direct_connect_ns), 0)

    @property
    def copy_ns_per_packet(self) -> float:
        """What the relay adds per full segment of an established connection."""
        return max(self.relay_ns_per_byte - self.direct_ns_per_byte, 0.0) * SEGMENT_PAYLOAD_BYTES

    def fields(self, suffix: str = "") -> dict:
        relay, direct = latency_summary(self.relay_connect_ns), latency_summary(self.direct_connect_ns)
        return {
            **{f"relay_connect_{k}{suffix}": v for k, v in relay.items()},
            **{f"direct_connect_{k}{suffix}": v for k, v in direct.items()},
            f"relay_setup_ns_p50{suffix}": float(np.median(self.setup_overhead_ns)),
            f"relay_copy_ns_per_byte{suffix}": self.relay_ns_per_byte,
            f"direct_copy_ns_per_byte{suffix}": self.direct_ns_per_byte,
            f"relay_copy_ns_per_packet{suffix}": self.copy_ns_per_packet,
            f"relay_throughput_mb_s{suffix}": 1e3 / self.relay_ns_per_byte,
            f"direct_throughput_mb_s{suffix}": 1e3 / self.direct_ns_per_byte,
        }


def measure_relay(concurrency=RELAY_CONCURRENCY, backends: int = RELAY_BACKENDS,
                  setups: int = SETUPS_PER_LEVEL, stream_bytes: int = STREAM_BYTES_PER_LEVEL) -> list[RelayLevel]:
    """Time connection set-up and copying through a :class:`Relay` and directly, per level.

    The backends (echo servers for set-ups, sinks for streams) run in one child process and
    the two relays in another, so the relay has a process of its own as kube-proxy did and
    only the clients run in this one.
    """
    levels = [_positive_int(c, "relay concurrency") for c in concurrency]
    backends = _positive_int(backends, "relay backends")
    setups, stream_bytes = _positive_int(setups, "relay set-ups"), _positive_int(stream_bytes, "relay stream bytes")
    if not levels:
        raise InputError("needs at least one level", "measure", "relay concurrency")
    # Connections a server serves at once: room for the clients' closed connections whose
    # threads are still finishing, so a loaded machine does not turn clients away.
    limit = 4 * max(levels) + 64
    server = {"max_connections": limit}
    with ServerProcess([("echo", server)] * backends + [("sink", server)] * backends) as servers:
        echoes, sinks = servers.addresses[:backends], servers.addresses[backends:]
        with ServerProcess([("relay", {**server, "backends": echoes}),
                            ("relay", {**server, "backends": sinks})]) as relays:
            to_echo, to_sink = relays.addresses
            return [_measure_level(level, to_echo, to_sink, echoes, sinks, setups, stream_bytes)
                    for level in levels]


@functools.lru_cache(maxsize=1)
def relay_levels() -> tuple[RelayLevel, ...]:
    """The relay measured once per process: what it costs does not depend on the cluster (the
    rules are the model's part), so a sweep's userspace points share one measurement."""
    return tuple(measure_relay(RELAY_CONCURRENCY, RELAY_BACKENDS, SETUPS_PER_LEVEL, STREAM_BYTES_PER_LEVEL))


def _measure_level(level: int, to_echo, to_sink, echoes, sinks, setups: int, stream_bytes: int) -> RelayLevel:
    per_client = max(setups // level, 1)
    per_stream = max(stream_bytes // level, COPY_BUFFER_BYTES)
    return RelayLevel(level,
                      _time_setups([to_echo], level, per_client), _time_setups(echoes, level, per_client),
                      _time_stream([to_sink], level, per_stream), _time_stream(sinks, level, per_stream))


def _positive_int(value, field_name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InputError(f"must be a positive integer, not {value!r}", "measure", field_name)
    return value


def _run_clients(count: int, client) -> int:
    """Run ``client(i)`` in ``count`` threads released together; the wall ns until all finish."""
    errors: list[BaseException] = []
    start = threading.Barrier(count + 1)

    def run(i: int) -> None:
        start.wait()
        try:
            client(i)
        except OSError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter_ns()
    for thread in threads:
        thread.join()
    if errors:
        raise InputError(f"a loopback client failed: {errors[0]}", "relay measurement")
    return time.perf_counter_ns() - began


def _time_setups(targets, concurrency: int, per_client: int) -> np.ndarray:
    """ns from connect() until one byte came back, for ``per_client`` connections per client."""
    samples = np.zeros((concurrency, per_client), dtype=np.int64)

    def client(i: int) -> None:
        for k in range(per_client):
            began = time.perf_counter_ns()
            with socket.create_connection(targets[(i + k) % len(targets)], timeout=CLIENT_TIMEOUT_SECONDS) as conn:
                conn.sendall(b"x")
                if conn.recv(1) != b"x":
                    raise ConnectionError("the echo backend did not answer")
                samples[i, k] = time.perf_counter_ns() - began

    _run_clients(concurrency, client)
    return samples.ravel()


def _time_stream(targets, concurrency: int, per_connection: int) -> float:
    """Wall ns per byte for ``concurrency`` connections each streaming ``per_connection`` bytes."""
    chunk = memoryview(bytes(COPY_BUFFER_BYTES))

    def client(i: int) -> None:
        with socket.create_connection(targets[i % len(targets)], timeout=CLIENT_TIMEOUT_SECONDS) as conn:
            left = per_connection
            while left > 0:
                conn.sendall(chunk[:min(left, len(chunk))])
                left -= len(chunk)
            conn.shutdown(socket.SHUT_WR)
            if conn.recv(1) != b"\n":
                raise ConnectionError("the sink backend did not answer")

    return _run_clients(concurrency, client) / (concurrency * per_connection)


def measure(point) -> list[dict]:
    cluster = generate(point.services, point.endpoints, point.nodes, seed=point.seed, mix=point.mix)
    options = WriterOptions(include_jump_rules=True, service_order_seed=point.seed, proxy_port_seed=point.seed)
    started = time.perf_counter()
    text = write(cluster, options)
    write_seconds = time.perf_counter() - started
    started = time.perf_counter()
    ruleset = load(text, host_ip(cluster), source=f"userspace portal rules for {point.services} services")
    load_seconds = time.perf_counter() - started
    datapath = UserspaceDatapath(ruleset, cluster.config.node_ips, seed=point.seed)

    to_service = service_connections(cluster, service_ports(cluster), point.packets, seed=point.seed)
    first = datapath.process(to_service)
    to_pods = datapath.process(pod_connections(cluster, point.packets, seed=point.seed + 1))
    later = datapath.process(established(to_service), established(first.after_nat))
    # The portal rules are written in the shuffled service order.
    positions = position_results(datapath, cluster, ordered_ports(service_ports(cluster), point.seed),
                                 point.packets, point.seed)
    levels = relay_levels()
    single = levels[0]

    rng = np.random.default_rng(point.seed)
    new_connection = "rule walk (model) + relay set-up (measured)"
    with_relay = {
        "service_new": (first.ns + rng.choice(single.setup_overhead_ns, len(first.ns)), new_connection),
        **{name: (result.ns + rng.choice(single.setup_overhead_ns, len(result.ns)), new_connection)
           for name, result in positions},
        "nonservice_new": (to_pods.ns, "rule walk (model)"),
        "established": (later.ns + round(single.copy_ns_per_packet),
                        "kernel path (model) + relay copy of one segment (measured)"),
    }
    redirects = text.count("-j REDIRECT")
    proxy_ports = len(portals(cluster, options))
    common = {
        "kind": "point", "point_id": point.point_id, **asdict(point),
        "rules": ruleset.rule_counts(),
        "proxy_ports": proxy_ports,
        "kernel_bytes": userspace_costs.kernel_bytes(ruleset.tables, point.cpus, redirects)
                        + datapath.conntrack.modelled_bytes()
                        + userspace_costs.listener_bytes(proxy_ports),
        "model_bytes": sum(t.blob.nbytes for t in ruleset.tables.values())
                       + datapath.nat.counters.nbytes + datapath.filter.counters.nbytes
                       + datapath.conntrack.model_bytes(),
        **userspace_costs.relay_connection_bytes(),
        "sync_proxy_rules_write_seconds": write_seconds,
        "sync_proxy_rules_load_seconds": load_seconds,
        "sync_entries": userspace_costs.sync_entries(ruleset.tables["nat"], sum(ruleset.rule_counts().values())),
        "relay_concurrency": [level.concurrency for level in levels],
        **single.fields(),
        **{k: v for level in levels[1:] for k, v in level.fields(f"_c{level.concurrency}").items()},
    }
    records = []
    for name, result in (("service_new", first), *positions, ("nonservice_new", to_pods), ("established", later)):
        ns, source = with_relay[name]
        walk = {f"rule_walk_{k}": v for k, v in latency_summary(result.ns).items()}
        records.append({**common, "workload": name, **path_record(result), **walk,
                        **latency_summary(ns), "ns_source": source})
    return records
