"""A real user-space TCP relay, as the userspace kube-proxy ran one per service port.

The proxier listened on a proxy port per service port; for every accepted connection it
picked a backend with its round-robin balancer (``pkg/proxy/userspace/roundrobin.go``, with
optional ClientIP affinity), connected to it (trying the next backend when that failed) and
copied bytes both ways with two goroutines and ``io.Copy``'s 32 KiB buffer. :class:`Relay`
does the same with two threads per connection. :class:`LoopbackServer` runs the small
backends the tests and the measurement talk to.

Everything is bounded so nothing outlives its use: only 127.0.0.0/8 addresses, sockets with
timeouts (an idle connection ends), a cap on concurrent connections, and a lifetime after which
a server stops by itself; leaving the ``with`` block stops it at once.
"""
from __future__ import annotations

import ipaddress
import multiprocessing
import socket
import threading
import time
from collections.abc import Callable

from bench.errors import InputError

COPY_BUFFER_BYTES = 32 * 1024  # io.Copy's buffer
ACCEPT_POLL_SECONDS = 0.05  # how soon an accept loop notices stop() or the end of its lifetime
Address = tuple[str, int]


def check_loopback(address: Address, field_name: str) -> Address:
    """An (ip, port) on 127.0.0.0/8; port 0 (any free port) is allowed."""
    try:
        ip, port = address
        loopback = ipaddress.IPv4Address(ip).is_loopback
    except (TypeError, ValueError, ipaddress.AddressValueError):
        raise InputError(f"not an (IPv4 address, port) pair: {address!r}", "relay", field_name) from None
    if not loopback:
        raise InputError(f"{ip} is not a loopback address: the relay only uses 127.0.0.0/8", "relay", field_name)
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise InputError(f"port must be 0..65535, not {port!r}", "relay", field_name)
    return ip, port


def _positive(value, field_name: str):
    if not isinstance(value, (int, float)) or value <= 0:
        raise InputError(f"must be a positive number, not {value!r}", "relay", field_name)
    return value


class RoundRobin:
    """roundrobin.go's balancer for one service port.

    Backends are taken in turn. With ClientIP affinity (``affinity_seconds`` > 0) a client
    whose last connection is less than that long ago gets the same backend again, and every
    connection refreshes it. ``reset`` (a retry after a failed connect) skips the affinity.
    """

    def __init__(self, backends: list[Address], affinity_seconds: float = 0,
                 clock: Callable[[], float] = time.monotonic):
        if not backends:
            raise InputError("a relay needs at least one backend", "relay", "backends")
        if not isinstance(affinity_seconds, (int, float)) or affinity_seconds < 0:
            raise InputError(f"must be ≥ 0 seconds, not {affinity_seconds!r}", "relay", "affinity_seconds")
        self.backends = [check_loopback(b, "backends") for b in backends]
        self.affinity_seconds = affinity_seconds
        self._clock = clock
        self._next = 0
        self._affinity: dict[str, tuple[Address, float]] = {}  # client IP → (backend, last used)
        self._lock = threading.Lock()

    def pick(self, client_ip: str, reset: bool = False) -> Address:
        with self._lock:
            now = self._clock()
            if self.affinity_seconds and not reset:
                sticky = self._affinity.get(client_ip)
                if sticky and now - sticky[1] < self.affinity_seconds:
                    self._affinity[client_ip] = (sticky[0], now)
                    return sticky[0]
            backend = self.backends[self._next]
            self._next = (self._next + 1) % len(self.backends)
            if self.affinity_seconds:
                self._affinity[client_ip] = (backend, now)
            return backend


class _Acceptor:
    """A listening socket on loopback whose accept loop hands each connection to a thread."""

    def __init__(self, listen: Address, idle_timeout: float, lifetime: float, max_connections: int):
        self._listen = check_loopback(listen, "listen")
        self.idle_timeout = _positive(idle_timeout, "idle_timeout")
        self.lifetime = _positive(lifetime, "lifetime")
        if not isinstance(max_connections, int) or max_connections <= 0:
            raise InputError(f"must be a positive integer, not {max_connections!r}", "relay", "max_connections")
        self.max_connections = max_connections
        self.connections_accepted = 0
        self.connections_refused = 0  # over max_connections
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._workers: set[threading.Thread] = set()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None

    @property
    def address(self) -> Address:
        return self._listener.getsockname()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(self._listen)
        listener.listen(128)
        listener.settimeout(ACCEPT_POLL_SECONDS)
        self._listener = listener
        self._accept_thread = threading.Thread(target=self._accept_loop, daemon=True,
                                               name=f"{type(self).__name__}-accept")
        self._accept_thread.start()

    def stop(self) -> None:
        """Stop accepting, end every open connection and wait for the threads."""
        self._stopping.set()
        if self._accept_thread:
            self._accept_thread.join()
        with self._lock:
            for sock in self._sockets:
                _shutdown(sock)
            workers = list(self._workers)
        for worker in workers:
            worker.join(self.idle_timeout)

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the accept loop to end; whether it has."""
        self._accept_thread.join(timeout)
        return not self.running

    @property
    def running(self) -> bool:
        return bool(self._accept_thread and self._accept_thread.is_alive())

    def threads_alive(self) -> int:
        with self._lock:
            return sum(worker.is_alive() for worker in self._workers)

    def _accept_loop(self) -> None:
        deadline = time.monotonic() + self.lifetime
        try:
            while not self._stopping.is_set() and time.monotonic() < deadline:
                try:
                    conn, peer = self._listener.accept()
                except TimeoutError:
                    continue
                conn.settimeout(self.idle_timeout)
                self._spawn(self._serve, conn, peer)
        finally:
            self._listener.close()

    def _spawn(self, target, conn: socket.socket, peer: Address) -> None:
        with self._lock:
            self._workers = {w for w in self._workers if w.is_alive()}
            if len(self._workers) >= self.max_connections:
                self.connections_refused += 1
                conn.close()
                return
            self.connections_accepted += 1
            worker = threading.Thread(target=target, args=(conn, peer), daemon=True)
            self._workers.add(worker)
        worker.start()

    def _serve(self, conn: socket.socket, peer: Address) -> None:
        self._track(conn)
        try:
            self.handle(conn, peer)
        except OSError:
            pass  # the peer went away or the connection idled out: this connection ends
        finally:
            self._untrack(conn)
            conn.close()

    def handle(self, conn: socket.socket, peer: Address) -> None:
        raise NotImplementedError

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)
        if self._stopping.is_set():  # stop() may have swept the sockets just before
            _shutdown(sock)

    def _untrack(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)


class LoopbackServer(_Acceptor):
    """A backend on loopback: ``handler(conn)`` serves each connection in its own thread."""

    def __init__(self, handler: Callable[[socket.socket], None], listen: Address = ("127.0.0.1", 0),
                 idle_timeout: float = 5.0, lifetime: float = 60.0, max_connections: int = 256):
        super().__init__(listen, idle_timeout, lifetime, max_connections)
        self._handler = handler

    def handle(self, conn: socket.socket, peer: Address) -> None:
        self._handler(conn)


def echo(conn: socket.socket) -> None:
    """Send back everything received, until the client closes its side."""
    buffer = bytearray(COPY_BUFFER_BYTES)
    while n := conn.recv_into(buffer):
        conn.sendall(memoryview(buffer)[:n])


def sink(conn: socket.socket) -> None:
    """Read everything until the client closes its side, then answer with one byte."""
    buffer = bytearray(COPY_BUFFER_BYTES)
    while conn.recv_into(buffer):
        pass
    conn.sendall(b"\n")


class Relay(_Acceptor):
    """The proxy of one service port: accept, pick a backend, copy both ways."""

    def __init__(self, backends: list[Address], affinity_seconds: float = 0,
                 listen: Address = ("127.0.0.1", 0), connect_timeout: float = 1.0,
                 idle_timeout: float = 5.0, lifetime: float = 60.0, max_connections: int = 256,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__(listen, idle_timeout, lifetime, max_connections)
        self.balancer = RoundRobin(backends, affinity_seconds, clock)
        self.connect_timeout = _positive(connect_timeout, "connect_timeout")
        self.connect_failures = 0

    def handle(self, client: socket.socket, peer: Address) -> None:
        backend = self._connect(peer[0])
        if backend is None:
            return  # no backend answered: the client's connection is closed
        self._track(backend)
        try:
            to_client = threading.Thread(target=_copy, args=(backend, client), daemon=True)
            to_client.start()
            _copy(client, backend)
            to_client.join()
        finally:
            self._untrack(backend)
            backend.close()

    def _connect(self, client_ip: str) -> socket.socket | None:
        """Connect to the chosen backend; after a failure try the next one, each at most once."""
        for attempt in range(len(self.balancer.backends)):
            address = self.balancer.pick(client_ip, reset=attempt > 0)
            try:
                backend = socket.create_connection(address, timeout=self.connect_timeout)
            except OSError:
                with self._lock:
                    self.connect_failures += 1
                continue
            backend.settimeout(self.idle_timeout)
            return backend
        return None


def _copy(source: socket.socket, destination: socket.socket) -> None:
    """Copy until the source closes its side, then close that side of the destination.

    An error (reset, idle timeout, stop) ends both directions at once, as ProxyTCP's
    closing of both connections did.
    """
    buffer = bytearray(COPY_BUFFER_BYTES)
    view = memoryview(buffer)
    try:
        while n := source.recv_into(buffer):
            destination.sendall(view[:n])
        destination.shutdown(socket.SHUT_WR)
    except OSError:
        _shutdown(source)
        _shutdown(destination)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed or never connected


_SERVER_KINDS = {
    "echo": lambda options: LoopbackServer(echo, **options),
    "sink": lambda options: LoopbackServer(sink, **options),
    "relay": lambda options: Relay(**options),
}


class ServerProcess:
    """Servers run in a child process, so they do not share the measuring process's GIL (the
    proxy was a process of its own). ``specs``: (kind, options) pairs, kind one of echo, sink,
    relay; ``addresses`` lists where they listen, in order. The child stops when the ``with``
    block ends, or by itself after ``lifetime`` seconds."""

    START_TIMEOUT_SECONDS = 30.0

    def __init__(self, specs: list[tuple[str, dict]], lifetime: float = 60.0):
        for kind, options in specs:
            if kind not in _SERVER_KINDS:
                raise InputError(f"unknown server kind {kind!r}", "relay", "specs")
            _SERVER_KINDS[kind](options)  # checks the options; nothing listens until start()
        self.specs = specs
        self.lifetime = _positive(lifetime, "lifetime")
        self.addresses: list[Address] = []
        self._process = None
        self._pipe = None

    def __enter__(self) -> ServerProcess:
        context = multiprocessing.get_context("spawn")
        self._pipe, child_end = context.Pipe()
        self._process = context.Process(target=_serve_in_child, args=(child_end, self.specs, self.lifetime),
                                        daemon=True, name="kpbench-servers")
        self._process.start()
        child_end.close()
        if not self._pipe.poll(self.START_TIMEOUT_SECONDS):
            self._end()
            raise InputError("the loopback servers' process did not start", "relay")
        try:
            self.addresses = self._pipe.recv()
        except EOFError:
            self._end()
            raise InputError("the loopback servers' process failed to start", "relay") from None
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._pipe.send("stop")
        except OSError:
            pass  # the child already ended
        self._end()

    def _end(self) -> None:
        self._process.join(self.START_TIMEOUT_SECONDS)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join()
        self._pipe.close()


def _serve_in_child(pipe, specs: list[tuple[str, dict]], lifetime: float) -> None:
    servers = [_SERVER_KINDS[kind](options) for kind, options in specs]
    try:
        for server in servers:
            server.start()
        pipe.send([server.address for server in servers])
        pipe.poll(lifetime)  # until the parent says stop or goes away, at most the lifetime
    finally:
        for server in servers:
            server.stop()
