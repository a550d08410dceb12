"""Each kernel's batch lookup on fixed, seeded input: what tiers 2, 3 and 5 of the gate time
(and tests/test_benchmarks.py, for pytest-benchmark). A case is ``(setup, batch)``: ``setup()``
prepares fresh state, ``batch()`` is the one kernel call and returns its per-packet work.

Run as a script inside the tree being measured (its ``bench`` and ``kernels`` are imported), so
the same file measures the head and, in a worktree, the base commit:

    python probe.py once KERNEL...   # one call of each batch (tier 2, under callgrind)
    python probe.py serve            # reads kernel names on stdin, answers one sample per line

A sample is the CPU and wall nanoseconds of one batch call; setup (building the tables, fresh
state for kernels that keep connections) is never inside it. This file imports nothing from
bench.gate: the base commit may not have it.
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

SERVICES, ENDPOINTS, NODES, PACKETS, SEED = 1000, 2, 10, 1000, 0
# Test-only switch: KPB_GATE_SLOW=<kernel> turns on that kernel's own test-only regression
# (``_set_test_regression``: iptables repeats its header matches, conntrack compares one entry
# more per lookup) in the head's probe only, the deliberate regression tiers 2 and 3 must catch.
SLOWED = os.environ.get("KPB_GATE_SLOW", "")


def _cluster():
    from bench.cluster.generate import generate
    from bench.cluster.model import service_ports
    from bench.workload import service_connections

    cluster = generate(SERVICES, ENDPOINTS, NODES, seed=SEED, mix="clusterip")
    return cluster, service_connections(cluster, service_ports(cluster), PACKETS, seed=SEED)


def _table_walk(table, packets, dtype):
    """A case whose batch walks ``packets`` through ``table`` from PREROUTING."""
    from kernels import layout as L

    results = np.zeros(len(packets), dtype=dtype)

    def batch():
        table.run(packets, L.HOOK_PREROUTING, results)
        return results["entries_visited"]

    return lambda: None, batch


def iptables_case():
    from bench.loaders.iptables import load
    from bench.measure.iptables import IptablesDatapath
    from bench.proxies.iptables import WriterOptions, write_full
    from kernels import layout as L

    cluster, packets = _cluster()
    ruleset = load(write_full(cluster, WriterOptions(include_jump_rules=True, service_order_seed=SEED)))
    table = IptablesDatapath(ruleset, cluster.config.node_ips, seed=SEED).nat
    return _table_walk(table, packets, L.RESULT_DTYPE)


def nftables_case():
    from bench.costs import nftables as nftables_costs
    from bench.measure.nftables import NftablesDatapath
    from bench.proxies import nftables as nftables_writer
    from kernels import layout as L

    cluster, packets = _cluster()
    options = nftables_writer.WriterOptions(service_order_seed=SEED)
    ruleset, compiled, _ = nftables_costs.full_sync(cluster, options, seed=SEED)
    table = NftablesDatapath(ruleset, cluster.config.node_ips, seed=SEED, compiled=compiled).table
    return _table_walk(table, packets, L.NFT_RESULT_DTYPE)


def ipvs_case():
    import kernels
    from bench.loaders import ipvs as ipvs_loader
    from bench.loaders.ipvs import kernel_arrays
    from bench.proxies import ipvs as ipvs_writer
    from kernels import layout as L

    cluster, packets = _cluster()
    ruleset = ipvs_loader.load(ipvs_writer.write(cluster, ipvs_writer.IpvsWriterOptions(include_jump_rules=True)))
    services, dests = kernel_arrays(ruleset.services, ruleset.source, None)
    results = np.zeros(len(packets), dtype=L.IPVS_RESULT_DTYPE)
    state = {}

    def fresh():  # every sample creates the same connections in an empty table
        state["ipvs"] = kernels.load("ipvs").IPVS.from_arrays(services, dests, conn_tab_bits=12, seed=SEED)

    def batch():
        state["ipvs"].process(packets, results)
        return results["svc_compares"]

    return fresh, batch


def conntrack_case():
    import kernels
    from bench.workload import established
    from kernels import layout as L

    _, packets = _cluster()
    table = kernels.load("conntrack").ConntrackTable(buckets=262144, seed=SEED)
    table.confirm(packets, np.zeros(len(packets), dtype=L.RESULT_DTYPE), np.zeros(len(packets), np.uint32))
    later = established(packets)
    found = np.zeros(len(later), dtype=np.uint8)
    compares = np.zeros(len(later), dtype=np.uint32)
    def batch():
        table.lookup(later, found, compares)
        return compares

    return lambda: None, batch


CASES = {"iptables": iptables_case, "nftables": nftables_case, "ipvs": ipvs_case,
         "conntrack": conntrack_case}


def sample(name: str, case) -> dict:
    setup, batch = case
    setup()
    cpu, wall = time.process_time_ns(), time.perf_counter_ns()
    batch()
    return {"kernel": name, "cpu_ns": time.process_time_ns() - cpu, "wall_ns": time.perf_counter_ns() - wall}


def main(argv: list[str]) -> int:
    command, names = argv[0], argv[1:] or list(CASES)
    if SLOWED:
        import kernels

        switch = getattr(kernels.load(SLOWED), "_set_test_regression", None) if SLOWED in CASES else None
        if switch is None:
            print(f"probe: KPB_GATE_SLOW={SLOWED}: only iptables and conntrack have a test-only regression",
                  file=sys.stderr)
            return 2
        switch(True)
    if command == "once":
        for name in names:
            try:  # a broken kernel is reported; the others are still counted
                sample(name, CASES[name]())
            except Exception as exc:
                print(json.dumps({"kernel": name, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 0
    if command == "serve":
        cases = {}
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            name = line.strip()
            try:  # a broken kernel answers with its error; the others still get measured
                if name not in cases:
                    cases[name] = CASES[name]()
                reply = sample(name, cases[name])
            except Exception as exc:
                reply = {"kernel": name, "error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(reply), flush=True)
        return 0
    print(f"probe: unknown command {command!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
