"""Network namespaces kpbench creates, wires and removes — and nothing else.

Every namespace is named ``kpb-<pid>-<role>``: the pid of the kpbench process that made it.
Veth pairs are created directly inside those namespaces (never in the host namespace), so
deleting a namespace deletes its links, addresses, routes and rules with it. A namespace whose
pid is no longer running is stale (a crashed or killed run) and :func:`remove_stale` deletes it.

The point topology (:class:`Topology`)::

    client ns                 node ns                         pods ns
    CLIENT_IP/32 ── veth ── node IPs/32 (kube-proxy's --node-ip)   route local <pod CIDRs> dev lo
                            ip_forward=1, the mode's ruleset ── veth ── (no address)

The node's only IPv4 addresses are the cluster's node IPs (and 127.0.0.1), so ``addrtype
LOCAL`` and ``fib daddr type local`` see exactly what the models are told is local. The pods
namespace answers for every address in the cluster's pod CIDRs (a local route), so one
listener per port serves every endpoint. Traffic from the client to a service's cluster IP is
DNATed in the node namespace and forwarded to the pods namespace: the FORWARD path of the
models' ``process``.
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from bench.errors import InputError

PREFIX = "kpb-"
NETNS_DIR = Path("/run/netns")
# The client stands for a pod on another node: an address in the cluster CIDR (no masquerade)
# outside every node's pod CIDR.
CLIENT_IP = "10.255.255.254"
_NAME = re.compile(rf"^{PREFIX}(\d+)-[a-z0-9-]+$")


class CommandTimeout(InputError):
    """A command did not finish in its time limit (it was killed)."""

    def __init__(self, command: list[str], seconds: float):
        super().__init__(f"{command[0]} did not finish in {seconds:g} s", "kpbench kernel")
        self.seconds = seconds


def run(command: list[str], netns: str | None = None, stdin: str | None = None,
        check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a command (inside ``netns`` when given); a failure is an InputError naming it."""
    full = (["ip", "netns", "exec", netns] if netns else []) + command
    try:
        done = subprocess.run(full, input=stdin, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise InputError(f"{command[0]} is not installed", "kpbench kernel") from None
    except subprocess.TimeoutExpired:
        raise CommandTimeout(command, timeout) from None
    if check and done.returncode != 0:
        message = (done.stderr.strip() or done.stdout.strip()).splitlines()
        raise InputError(f"{' '.join(command[:3])} failed: {message[0] if message else done.returncode}",
                         f"namespace {netns}" if netns else "kpbench kernel")
    return done


def ours() -> list[str]:
    """Every namespace with kpbench's prefix, from any run."""
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if _NAME.match(p.name))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def delete(name: str) -> None:
    """Stop the processes inside namespace ``name`` (all started by kpbench), then delete it."""
    pids = run(["ip", "netns", "pids", name], check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), 9)
        except (ProcessLookupError, ValueError):
            pass
    run(["ip", "netns", "delete", name], check=False)


def remove_stale() -> list[str]:
    """Delete namespaces left by kpbench runs whose process is gone; their names."""
    stale = [name for name in ours() if not _alive(int(_NAME.match(name).group(1)))]
    for name in stale:
        delete(name)
    return stale


class Namespaces:
    """Namespaces made by this process, removed by :meth:`close` (also on error and Ctrl-C:
    use it as a context manager)."""

    _counter = 0

    def __init__(self):
        Namespaces._counter += 1
        self.tag = f"{PREFIX}{os.getpid()}-{Namespaces._counter}"
        self.names: list[str] = []
        self.processes: list[subprocess.Popen] = []

    def add(self, role: str) -> str:
        name = f"{self.tag}-{role}"
        self.names.append(name)  # first: an interrupt right after the add still removes it
        run(["ip", "netns", "add", name])
        run(["ip", "link", "set", "lo", "up"], name)
        return name

    def start(self, netns: str, command: list[str]) -> subprocess.Popen:
        """A long-running process inside ``netns``, stopped by close()."""
        process = subprocess.Popen(["ip", "netns", "exec", netns, *command], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.processes.append(process)
        return process

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait()
        self.processes.clear()
        for name in reversed(self.names):
            delete(name)
        self.names.clear()

    def __enter__(self) -> Namespaces:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Topology(Namespaces):
    """client → node → pods, wired as the module docstring draws it."""

    def __init__(self, node_ips: list[str], pod_cidrs: list[str]):
        super().__init__()
        try:
            self.client, self.node, self.pods = self.add("client"), self.add("node"), self.add("pods")
            self._wire(node_ips, pod_cidrs)
        except BaseException:
            self.close()
            raise

    def _wire(self, node_ips: list[str], pod_cidrs: list[str]) -> None:
        gateway = node_ips[0]
        run(["ip", "-n", self.client, "link", "add", "eth0", "type", "veth", "peer", "name", "to-client",
             "netns", self.node])
        run(["ip", "-n", self.node, "link", "add", "to-pods", "type", "veth", "peer", "name", "eth0",
             "netns", self.pods])
        for netns, link in ((self.client, "eth0"), (self.node, "to-client"), (self.node, "to-pods"),
                            (self.pods, "eth0")):
            run(["ip", "-n", netns, "link", "set", link, "up"])
        run(["ip", "-n", self.client, "addr", "add", f"{CLIENT_IP}/32", "dev", "eth0"])
        for ip in node_ips:
            run(["ip", "-n", self.node, "addr", "add", f"{ip}/32", "dev", "to-client"])
        # The node and the pods answer ARP for the gateway and the pods; every hop is onlink.
        for netns, link in ((self.client, "eth0"), (self.pods, "eth0")):
            run(["ip", "-n", netns, "route", "add", f"{gateway}/32", "dev", link])
            run(["ip", "-n", netns, "route", "add", "default", "via", gateway, "dev", link])
        run(["ip", "-n", self.node, "route", "add", f"{CLIENT_IP}/32", "dev", "to-client"])
        for cidr in pod_cidrs:
            run(["ip", "-n", self.node, "route", "add", cidr, "dev", "to-pods"])
            run(["ip", "-n", self.pods, "route", "add", "local", cidr, "dev", "lo"])
        run(["sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0",
             "net.ipv4.conf.default.rp_filter=0"], self.node)
