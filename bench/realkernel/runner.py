"""One real-kernel point: a mode's ruleset for S services loaded with one tool into a fresh
client → node → pods topology, measured, validated, and compared with the model.

Per point, in this order, on one topology:

1. baselines: connect times and round trips straight to the endpoints with no rules loaded
   (the node namespace then has no conntrack at all), and connect times again with empty nat
   tables loaded (conntrack and NAT on, no rule): ``extra_ns`` is what the mode costs over no
   rules, ``rules_extra_ns`` what its rules cost over conntrack alone;
2. the full restore, timed as kube-proxy runs the tool (``iptables-restore --noflush
   --counters``, ``nft -f``), then connect times to the services at the first, middle, last
   and random positions of KUBE-SERVICES, and round trips on an open connection;
3. the partial update after one endpoint moved (bench.costs.nftables.moved_endpoint), timed.

Then counter validation in a second, fresh topology (fresh conntrack and ``-m recent`` lists:
the kernel keeps a client's address in them across rule reloads): the updated cluster's full
ruleset (nftables: the copy with a counter on every rule), a known set of connections to
distinct services, and the kernel's per-rule counters against the model's
(bench.realkernel.counters).

Each tool has its own model (``MODELS``, named in the record's ``model``): iptables-legacy the
legacy iptables data path, iptables-nft the same rules as iptables-nft stores them on the nft
kernel (bench.measure.iptables_nft: rules visited are nft rules started, and the record adds
nft expressions per packet), nftables the nftables data path.

Clusters have one endpoint per service: the kernel's ``statistic``/``numgen`` draws are not
the model's seeded ones, so with several endpoints the per-endpoint counters could not agree.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass

import numpy as np
from scipy.stats import theilslopes

from bench.cluster.generate import generate
from bench.cluster.model import Cluster, service_ports
from bench.costs.nftables import NEW_POD_IP, moved_endpoint
from bench.errors import InputError
from bench.loaders import iptables as iptables_loader
from bench.loaders import nftables as nft_loader
from bench.measure.iptables import IptablesDatapath
from bench.measure.iptables_nft import IptablesNftDatapath
from bench.measure.iptables_nft import NftPathResult as IptablesNftPathResult
from bench.measure.nftables import NftablesDatapath
from bench.measure.nftables import NftPathResult as NftablesPathResult
from bench.proxies import iptables as iptables_writer
from bench.proxies import nftables as nft_writer
from bench.realkernel import counters as ctr
from bench.realkernel.netns import Topology, run
from bench.realkernel.prereq import PROGRAMS

POSITIONS = ("first", "middle", "last", "random")
VALIDATION_SPORT = 61000  # above Linux's ephemeral range: never an earlier connection's tuple
MAX_VALIDATION = 4000
# iptables-nft-restore is superlinear: 5,000 services take ~25 s here, 20,000 over 10 minutes.
DEFAULT_LOAD_TIMEOUT = 60.0
MIN_RULES_FOR_SLOPE = 50  # fewer rules between first and last: the slope is mostly noise

# The model each tool is compared with: its data path (timing, rules visited) and its per-rule
# counters. iptables-nft's is the iptables rules as iptables-nft stores them, on the nft kernel.
MODELS = {"iptables-legacy": "iptables", "iptables-nft": "iptables-nft", "nftables": "nftables"}
DATAPATHS = {"iptables": (iptables_loader.load, IptablesDatapath),
             "iptables-nft": (iptables_loader.load, IptablesNftDatapath),
             "nftables": (nft_loader.load, NftablesDatapath)}  # (loader of the ruleset text, data path)
MODEL_COUNTERS = {"iptables": ctr.model_iptables_counters, "iptables-nft": ctr.model_iptables_nft_counters,
                  "nftables": ctr.model_nft_counters}


@dataclass
class Prepared:
    """A mode's cluster and rule texts for one services count, shared by the mode's tools."""

    mode: str
    services: int
    nodes: int
    seed: int
    cluster: Cluster
    updated: Cluster
    full_text: str
    partial_text: str
    updated_text: str  # the updated cluster's full ruleset (nftables: with counters)
    targets: list[tuple[str, int, str, int]]  # (vip, port, endpoint ip, endpoint port), KUBE-SERVICES order
    updated_targets: list[tuple[str, int, str, int]]  # the same for the updated cluster


def service_targets(cluster: Cluster, iptables_text: str) -> list[tuple[str, int, str, int]]:
    """TCP cluster-IP service ports with an endpoint, in KUBE-SERVICES order (nftables looks
    them up in a map, where position does not matter; the same services are used)."""
    endpoints = {}
    for info in service_ports(cluster):
        usable = info.cluster_policy_endpoints
        if info.port.protocol == "tcp" and usable and not info.service.internal_policy_local:
            endpoints[(info.service.cluster_ip, info.port.port)] = (usable[0].ip, usable[0].port)
    targets = []
    for line in iptables_text.splitlines():
        if line.startswith("-A KUBE-SERVICES ") and " cluster IP\"" in line and "-j KUBE-SVC-" in line:
            words = line.split()
            key = (words[words.index("-d") + 1], int(words[words.index("--dport") + 1]))
            if key in endpoints:
                targets.append((*key, *endpoints[key]))
    if not targets:
        raise InputError("the cluster has no TCP ClusterIP service with an endpoint", "kpbench kernel", "--services")
    return targets


def prepare(mode: str, services: int, nodes: int, seed: int) -> Prepared:
    cluster = generate(services, 1, nodes, seed=seed)
    cluster.config.nfacct = False  # no nfacct objects exist in kpbench's namespaces
    updated = moved_endpoint(cluster)
    ipt_options = iptables_writer.WriterOptions(include_jump_rules=True, service_order_seed=seed)
    ipt_text = iptables_writer.write_full(cluster, ipt_options)
    ipt_updated = iptables_writer.write_full(updated, ipt_options)
    targets = service_targets(cluster, ipt_text), service_targets(updated, ipt_updated)
    if mode == "iptables":
        partial = iptables_writer.write_partial(cluster, updated, ipt_options)
        return Prepared(mode, services, nodes, seed, cluster, updated, ipt_text, partial, ipt_updated, *targets)
    options = nft_writer.WriterOptions(service_order_seed=seed)
    return Prepared(mode, services, nodes, seed, cluster, updated, nft_writer.write_full(cluster, options),
                    nft_writer.write_partial(cluster, updated, options),
                    ctr.with_counters(nft_writer.write_full(updated, options)), *targets)


def _percentiles(ns: list[int] | np.ndarray) -> dict:
    values = np.asarray(ns, dtype=float)
    values = values[values >= 0]
    if not values.size:
        return {"p50": None, "p90": None, "p99": None}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99)}


def _position_plan(targets: list, connections: int, seed: int) -> list[tuple[str, int]]:
    """(position, target index) per connection, the positions interleaved so that drift in
    the machine's load affects them alike."""
    rng = np.random.default_rng(seed)
    fixed = {"first": 0, "middle": len(targets) // 2, "last": len(targets) - 1}
    plan = []
    for _ in range(connections):
        plan += [(name, index) for name, index in fixed.items()]
        plan.append(("random", int(rng.integers(0, len(targets)))))
    return plan


class _Client:
    """Runs agent jobs in the client namespace."""

    def __init__(self, topology: Topology):
        self.netns = topology.client

    def job(self, job: dict) -> dict:
        done = run([sys.executable, "-m", "bench.realkernel.agent", "client"], self.netns, stdin=json.dumps(job))
        return json.loads(done.stdout)

    def connect(self, addresses: list[tuple[str, int]], sports: list[int] | None = None) -> list[int]:
        sports = sports or [0] * len(addresses)
        result = self.job({"op": "connect", "source": ctr.CLIENT_IP,
                           "targets": [[ip, port, sport] for (ip, port), sport in zip(addresses, sports)]})
        return result["ns"]

    def round_trips(self, address: tuple[str, int], rounds: int) -> list[int]:
        return self.job({"op": "rtt", "target": list(address), "rounds": rounds})["ns"]


def _start_backends(topology: Topology, ports: set[int]) -> None:
    server = topology.start(topology.pods, [sys.executable, "-m", "bench.realkernel.agent", "serve",
                                            *map(str, sorted(ports))])
    if server.stdout.readline().strip() != "ready":
        raise InputError(f"the backend listeners did not start: {server.stderr.read().strip()[:200]}",
                         f"namespace {topology.pods}")


def _timed(command: list[str], netns: str, stdin: str, timeout: float) -> float:
    started = time.perf_counter()
    run(command, netns, stdin=stdin, timeout=timeout)
    return time.perf_counter() - started


def _load_commands(tool: str) -> tuple[list[str], list[str]]:
    """(full load, partial update) as kube-proxy runs the tool."""
    if tool == "nftables":
        return ["nft", "-f", "-"], ["nft", "-f", "-"]
    restore = [PROGRAMS[tool][0], "--noflush", "--counters"]
    return restore, restore


def _load_validation_ruleset(tool: str, prepared: Prepared, node: str) -> None:
    """The updated cluster's full ruleset (nftables: the copy with counters), all counters zero."""
    command = ["nft", "-f", "-"] if tool == "nftables" else [PROGRAMS[tool][0], "--counters"]
    run(command, node, stdin=prepared.updated_text)


def _empty_tables(tool: str) -> tuple[list[str], str]:
    """A ruleset with no rules whose nat hooks still turn conntrack and NAT on."""
    if tool == "nftables":
        return ["nft", "-f", "-"], ("add table ip kpb-empty\n"
                                    "add chain ip kpb-empty nat { type nat hook prerouting priority -100 ; }\n")
    return [PROGRAMS[tool][0]], "*nat\n:PREROUTING ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n"


def validation_connections(prepared: Prepared, count: int, seed: int) -> list[ctr.Connection]:
    """Distinct services (a repeat would meet ClientIP affinity's recent lists): first,
    middle, last, then seeded random ones."""
    targets = prepared.updated_targets
    n = len(targets)
    chosen = list(dict.fromkeys([0, n // 2, n - 1] + list(np.random.default_rng(seed).permutation(n))))
    chosen = chosen[:min(count, n, MAX_VALIDATION)]
    return [ctr.Connection(VALIDATION_SPORT + i, targets[t][0], targets[t][1]) for i, t in enumerate(chosen)]


def validate(tool: str, prepared: Prepared, count: int, model_text: str | None = None) -> dict:
    """Counter validation in a topology of its own: fresh conntrack, fresh recent lists
    (``-m recent`` keeps a client's address across rule reloads), nothing else sent.
    ``model_text``: give the model this ruleset instead of the one loaded into the kernel
    (the tests' deliberate mismatch)."""
    connections = validation_connections(prepared, count, prepared.seed + 7)
    with _topology(prepared) as topology:
        _start_backends(topology, {t[3] for t in prepared.updated_targets})
        client = _Client(topology)
        client.connect(sorted({t[2:] for t in prepared.updated_targets})[:50])  # ARP, before any rule
        _load_validation_ruleset(tool, prepared, topology.node)
        times = client.connect([(c.vip, c.port) for c in connections], [c.sport for c in connections])
        if tool == "nftables":
            kernel = ctr.kernel_nft_counters(topology.node)
        else:
            kernel = ctr.kernel_iptables_counters(PROGRAMS[tool][1], topology.node)
    node_ips = prepared.cluster.config.node_ips
    model = MODEL_COUNTERS[MODELS[tool]](model_text or prepared.updated_text, node_ips, connections, prepared.seed)
    return {"validation_connections": len(connections),
            "validation_failed_connections": sum(t < 0 for t in times),
            **ctr.compare(kernel[0], model[0], kernel[1], model[1])}


def _topology(prepared: Prepared) -> Topology:
    pod_cidrs = [node.pod_cidr for node in prepared.cluster.nodes] + [f"{NEW_POD_IP}/32"]
    return Topology(prepared.cluster.config.node_ips, pod_cidrs)


def model_first_packets(prepared: Prepared, plan: list[tuple[str, int]], tool: str):
    """The tool's model's data path for the same first packets: ns, rules visited and nft
    expressions evaluated per position; the per-packet PathResult and expressions (None for
    the legacy model, which has no expressions)."""
    connections = [ctr.Connection(40000 + i % 20000, *prepared.targets[t][:2]) for i, (_, t) in enumerate(plan)]
    syn = ctr.syn_packets(connections)
    node_ips = prepared.cluster.config.node_ips
    load, datapath = DATAPATHS[MODELS[tool]]
    result = datapath(load(prepared.full_text, "model"), node_ips, seed=prepared.seed).process(syn)
    expressions = _expressions(result)
    names = np.array([name for name, _ in plan])
    summary = {}
    for position in POSITIONS:
        chosen = names == position
        summary[position] = {"model_ns": _percentiles(result.ns[chosen]),
                             "entries_visited": float(result.entries_visited[chosen].mean())}
        if expressions is not None:
            summary[position]["expressions"] = float(expressions[chosen].mean())
    return summary, result, expressions


def _expressions(result) -> np.ndarray | None:
    """nft expressions evaluated per packet, every hook included; None for the legacy model."""
    if isinstance(result, NftablesPathResult):
        return result.total("expressions")
    if isinstance(result, IptablesNftPathResult):
        return result.expressions
    return None


def measure_tool(tool: str, prepared: Prepared, connections: int, rounds: int, validation: int,
                 load_timeout: float = DEFAULT_LOAD_TIMEOUT) -> dict:
    """One record: kernel and model side by side for ``tool`` on ``prepared``. A rule load
    slower than ``load_timeout`` seconds raises netns.CommandTimeout."""
    targets = prepared.targets
    plan = _position_plan(targets, connections, prepared.seed)
    services_addr = [targets[t][:2] for _, t in plan]
    endpoints_addr = [targets[t][2:] for _, t in plan]
    full_load, partial_load = _load_commands(tool)
    with _topology(prepared) as topology:
        _start_backends(topology, {t[3] for t in targets})
        client = _Client(topology)
        client.connect(sorted(set(endpoints_addr))[:50])  # warm up: ARP, listeners, caches
        baseline = client.connect(endpoints_addr)
        baseline_rtt = client.round_trips(endpoints_addr[0], rounds)
        empty_load, empty_text = _empty_tables(tool)
        run(empty_load, topology.node, stdin=empty_text)
        conntrack_only = client.connect(endpoints_addr)
        if tool == "nftables":
            run(["nft", "delete", "table", "ip", "kpb-empty"], topology.node)
        full_seconds = _timed(full_load, topology.node, prepared.full_text, load_timeout)
        kernel = client.connect(services_addr)
        kernel_rtt = client.round_trips(services_addr[0], rounds)
        partial_seconds = _timed(partial_load, topology.node, prepared.partial_text, load_timeout)
    validation_result = validate(tool, prepared, validation)
    model, model_path, expressions = model_first_packets(prepared, plan, tool)
    names = [name for name, _ in plan]
    positions = {}
    for position in POSITIONS:
        chosen = [i for i, name in enumerate(names) if name == position]
        k = _percentiles([kernel[i] for i in chosen])
        b = _percentiles([baseline[i] for i in chosen])
        c = _percentiles([conntrack_only[i] for i in chosen])
        positions[position] = {
            "kernel_ns": k, "baseline_ns": b, "conntrack_baseline_ns": c,
            "extra_ns": _difference(k, b), "rules_extra_ns": _difference(k, c),
            "failed": sum(kernel[i] < 0 for i in chosen), **model[position]}
    return {
        "source": "kernel", "kind": "kernel_point", "mode": prepared.mode, "tool": tool, "model": MODELS[tool],
        "services": prepared.services, "endpoints": 1, "nodes": prepared.nodes, "seed": prepared.seed,
        "connections_per_position": connections, "service_ports": len(targets),
        "positions": positions,
        "established_rtt_ns": {"kernel": _percentiles(kernel_rtt), "baseline": _percentiles(baseline_rtt)},
        "sync_full_proxy_rules_duration_seconds": full_seconds,
        "sync_partial_proxy_rules_duration_seconds": partial_seconds,
        **ns_per_rule(kernel, model_path.ns, model_path.entries_visited),
        **ns_per_rule_overall(positions["random"]),
        **({} if expressions is None else ns_per_rule(kernel, model_path.ns, expressions, "expression")),
        **validation_result,
    }


def _difference(measured: dict, baseline: dict) -> dict:
    return {p: None if measured[p] is None or baseline[p] is None else measured[p] - baseline[p]
            for p in measured}


def ns_per_rule(kernel_ns: list[int], model_ns: np.ndarray, visited: np.ndarray, unit: str = "rule") -> dict:
    """ns per visited rule: the Theil–Sen slope (robust to the noisy machine's outliers) of
    each connection's time against the rules the model says its first packet visits, for the
    kernel's connect times and for the model's data path. Fixed costs drop out of a slope.
    None when the connections' rule counts barely differ (nftables, tiny clusters).
    ``unit="expression"``: the same against the nft expressions the model evaluates."""
    kernel = np.asarray(kernel_ns, dtype=float)
    ok = kernel >= 0
    if not ok.any() or np.ptp(visited[ok]) < MIN_RULES_FOR_SLOPE:
        return {f"kernel_ns_per_{unit}": None, f"model_ns_per_{unit}": None}
    return {f"kernel_ns_per_{unit}": float(theilslopes(kernel[ok], visited[ok])[0]),
            f"model_ns_per_{unit}": float(theilslopes(model_ns.astype(float), visited)[0])}


def ns_per_rule_overall(random_position: dict) -> dict:
    """ns per visited rule with the fixed costs left in, at random positions: the kernel's
    p50 over conntrack alone (``rules_extra_ns``) and the model's p50, each divided by the
    rules visited. The only per-rule figure a flat ruleset (nftables) has."""
    rules = random_position["entries_visited"]
    extra = random_position["rules_extra_ns"]["p50"]
    return {"kernel_ns_per_rule_overall": None if extra is None else extra / rules,
            "model_ns_per_rule_overall": random_position["model_ns"]["p50"] / rules}
