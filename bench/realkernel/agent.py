"""The small programs kpbench runs inside its namespaces (``python -m bench.realkernel.agent``).

``serve PORT...``: a TCP echo server on 0.0.0.0 for each port (the pods namespace answers for
every pod address, so one listener per port serves every endpoint). It prints ``ready`` once
listening, echoes what it receives and closes a connection when the peer does. It never sends
anything unprompted, so a connection the client resets costs exactly four packets.

``client``: reads one JSON job from stdin and prints one JSON result:

- ``{"op": "connect", "targets": [[ip, port, sport], ...]}`` → ``{"ns": [...], "failed": n}``:
  the time of each ``connect()`` (ns; -1 when it failed). sport 0 lets the kernel pick. Each
  connection is then reset (SO_LINGER 0): SYN, SYN-ACK, ACK, RST and nothing else.
- ``{"op": "rtt", "target": [ip, port], "rounds": n}`` → ``{"ns": [...]}``: one byte sent and
  echoed back per round, on one open connection.
"""
from __future__ import annotations

import json
import selectors
import socket
import struct
import sys
import time

CONNECT_TIMEOUT_S = 3.0
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)


def serve(ports: list[int]) -> None:
    selector = selectors.DefaultSelector()
    for port in ports:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("0.0.0.0", port))
        listener.listen(4096)
        listener.setblocking(False)
        selector.register(listener, selectors.EVENT_READ, None)
    print("ready", flush=True)
    while True:
        for key, _ in selector.select():
            if key.data is None:
                _accept(selector, key.fileobj)
            else:
                _echo(selector, key.fileobj)


def _accept(selector, listener) -> None:
    try:
        conn, _ = listener.accept()
    except OSError:
        return
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    selector.register(conn, selectors.EVENT_READ, "conn")


def _echo(selector, conn) -> None:
    try:
        data = conn.recv(65536)
        if data:
            conn.sendall(data)
            return
    except OSError:
        pass
    selector.unregister(conn)
    conn.close()


def connect_all(targets: list, source: str) -> dict:
    times, failed = [], 0
    for ip, port, sport in targets:
        sock = socket.socket()
        sock.settimeout(CONNECT_TIMEOUT_S)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
        if sport:
            sock.bind((source, sport))
        started = time.perf_counter_ns()
        try:
            sock.connect((ip, port))
            times.append(time.perf_counter_ns() - started)
        except OSError:
            times.append(-1)
            failed += 1
        sock.close()
    return {"ns": times, "failed": failed}


def round_trips(target: list, rounds: int) -> dict:
    sock = socket.create_connection(tuple(target), timeout=CONNECT_TIMEOUT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times = []
    for _ in range(rounds):
        started = time.perf_counter_ns()
        sock.sendall(b"x")
        sock.recv(1)
        times.append(time.perf_counter_ns() - started)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
    sock.close()
    return {"ns": times}


def client(job: dict) -> dict:
    if job["op"] == "connect":
        return connect_all(job["targets"], job.get("source", "0.0.0.0"))
    return round_trips(job["target"], job["rounds"])


def main(argv: list[str]) -> int:
    if argv[:1] == ["serve"]:
        serve([int(port) for port in argv[1:]])
        return 0
    if argv[:1] == ["client"]:
        print(json.dumps(client(json.loads(sys.stdin.read()))))
        return 0
    print("usage: python -m bench.realkernel.agent serve PORT... | client < job.json", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
