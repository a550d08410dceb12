"""Packets to send through a node's data path: seeded, as numpy PACKET_DTYPE arrays.

Three kinds, the ones a user pays for: the first packet of a connection to a service (a
service port picked uniformly at random, so its rule sits at a uniformly random position in
KUBE-SERVICES; or the first, middle or last service port of the order the mode writes them
in), the first packet of a connection that is not to a service (pod to pod: it scans all of
KUBE-SERVICES), and packets of established connections.
"""
from __future__ import annotations

import numpy as np

from bench.cluster.model import Cluster, ServicePortInfo
from bench.netaddr import PROTOCOLS, ip_to_int
from kernels import layout as L

EPHEMERAL_LOW = 32768  # Linux's default ip_local_port_range starts here
PACKET_BYTES = 60  # a TCP SYN with options


def _pod_addresses(cluster: Cluster) -> np.ndarray:
    ips = sorted({ep.ip for eps in cluster.slices for ep in eps.endpoints})
    return np.array([ip_to_int(ip) for ip in ips], dtype=np.uint32)


def _packets(n: int, src: np.ndarray, dst: np.ndarray, dport: np.ndarray, proto: np.ndarray,
             rng: np.random.Generator) -> np.ndarray:
    packets = np.zeros(n, dtype=L.PACKET_DTYPE)
    packets["src"] = src
    packets["dst"] = dst
    # Distinct source ports keep every generated 5-tuple a new connection.
    packets["sport"] = EPHEMERAL_LOW + (rng.permutation(n) % (65536 - EPHEMERAL_LOW))
    packets["dport"] = dport
    packets["proto"] = proto
    packets["ctstate"] = L.CT_NEW
    packets["length"] = PACKET_BYTES
    return packets


POSITIONS = ("first", "middle", "last")


def service_connections(cluster: Cluster, infos: list[ServicePortInfo], n: int,
                        seed: int, position: str | None = None) -> np.ndarray:
    """First packets from random pods to random service ports' cluster IPs.

    ``position`` ("first", "middle", "last"): every packet goes to that one service port of
    ``infos``, in the order given (the order the mode writes its rules in)."""
    rng = np.random.default_rng(seed)
    targets = [i for i in infos if i.cluster_policy_endpoints]
    if not targets:
        raise ValueError("the cluster has no service port with endpoints")
    if position is not None:
        index = {"first": 0, "middle": len(targets) // 2, "last": len(targets) - 1}[position]
        targets = [targets[index]]
    vip = np.array([ip_to_int(i.service.cluster_ip) for i in targets], dtype=np.uint32)
    port = np.array([i.port.port for i in targets], dtype=np.uint16)
    proto = np.array([PROTOCOLS[i.port.protocol] for i in targets], dtype=np.uint8)
    pick = rng.integers(0, len(targets), n)
    pods = _pod_addresses(cluster)
    return _packets(n, pods[rng.integers(0, len(pods), n)], vip[pick], port[pick], proto[pick], rng)


def pod_connections(cluster: Cluster, n: int, seed: int, port: int = 8080) -> np.ndarray:
    """First packets from random pods straight to other pods: not to any service."""
    rng = np.random.default_rng(seed)
    pods = _pod_addresses(cluster)
    src = pods[rng.integers(0, len(pods), n)]
    dst = pods[rng.integers(0, len(pods), n)]
    return _packets(n, src, dst, np.full(n, port, np.uint16), np.full(n, PROTOCOLS["tcp"], np.uint8), rng)


def established(packets: np.ndarray) -> np.ndarray:
    """Later packets of the same connections."""
    later = packets.copy()
    later["ctstate"] = (later["ctstate"] & (0xFFFF ^ L.CT_NEW)) | L.CT_ESTABLISHED
    later["length"] = 1500
    return later
