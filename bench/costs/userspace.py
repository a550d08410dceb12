"""userspace mode's cost model: the portal rules' kernel memory, the proxy's sockets, and syncs.

The portal rules live in the nat table, so their memory is iptables' (bench/costs/iptables.py)
with one correction: the loader models REDIRECT as the DNAT it performs, but the kernel's
REDIRECT target is smaller (``nf_nat_ipv4_multi_range_compat``, the 56 bytes MASQUERADE also
takes, against DNAT's 80).

The proxy itself costs sockets. Assumed sizes, x86-64, Linux 6.x slab object sizes (they vary
by a few hundred bytes between kernels and configs): a TCP socket is a ``tcp_sock`` (2,432 B)
plus its ``socket_alloc`` inode (704 B), ``struct file`` (256 B) and dentry (192 B). One
listening socket per proxy port stays open all the time. Every relayed connection adds two
established sockets (client side and backend side), a second conntrack entry (the relay's own
connection to the backend), and in user space two 32 KiB io.Copy buffers and two goroutine
stacks (2 KiB each at the minimum). Socket buffers are charged only for data in flight; the
default ``tcp_rmem``/``tcp_wmem`` (131,072 / 16,384 B) give the most a socket queues before
autotuning grows it, reported apart as an upper bound.
"""
from __future__ import annotations

from bench.costs import iptables as iptables_costs
from bench.relay import COPY_BUFFER_BYTES
from kernels import layout as L
from kernels.blob import CompiledTable
from kernels.reference.conntrack import NF_CONN_BYTES

REDIRECT_TARGET_BYTES = L.TARGET_SIZES[L.TARGET_MASQUERADE]
TCP_SOCKET_BYTES = 2432 + 704 + 256 + 192  # tcp_sock + socket inode + file + dentry (assumed)
TCP_RMEM_DEFAULT, TCP_WMEM_DEFAULT = 131072, 16384  # net.ipv4.tcp_rmem / tcp_wmem defaults
GOROUTINE_STACK_BYTES = 2048  # Go's minimum goroutine stack


def kernel_bytes(tables: dict[str, CompiledTable], n_cpus: int, redirect_rules: int) -> int:
    """The tables' modelled kernel memory, with REDIRECT targets at their real size."""
    shrink = L.TARGET_SIZES[L.TARGET_DNAT] - REDIRECT_TARGET_BYTES
    return iptables_costs.kernel_bytes(tables, n_cpus) - redirect_rules * shrink


def listener_bytes(proxy_ports: int) -> int:
    """Kernel memory of the proxy's listening sockets, one per proxied service port."""
    return proxy_ports * TCP_SOCKET_BYTES


def relay_connection_bytes() -> dict[str, int]:
    """Memory one relayed connection adds, by where it lives."""
    return {
        "relay_kernel_bytes_per_connection": 2 * TCP_SOCKET_BYTES + NF_CONN_BYTES,
        "relay_user_bytes_per_connection": 2 * (COPY_BUFFER_BYTES + GOROUTINE_STACK_BYTES),
        "relay_socket_buffer_bytes_max_per_connection": 2 * (TCP_RMEM_DEFAULT + TCP_WMEM_DEFAULT),
    }


def sync_entries(nat: CompiledTable, appended_rules: int) -> int:
    """Entries the kernel translated while the proxier added its rules one ``iptables -A`` at a
    time: every append replaced the whole nat table, so the work grows with the square of the
    rule count (§1.7; kubernetes #20479 measured about 50 ms per rule)."""
    fixed = nat.n_entries - appended_rules
    return appended_rules * fixed + appended_rules * (appended_rules + 1) // 2
