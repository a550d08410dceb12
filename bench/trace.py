"""`kpbench trace`: follow one NEW packet through an iptables ruleset, entry by entry.

The walk is the kernel's, run by the pure-Python twin of the iptables kernel (speed does not
matter here and the twin can report every entry it visits): nat PREROUTING, or nat OUTPUT for
a packet the node sends itself; the DNAT is applied; the filter table runs at OUTPUT for a
locally generated packet and at INPUT (local destination) or FORWARD (otherwise); nat
POSTROUTING runs last. Local means the node's addresses and 127.0.0.0/8.

The ``output`` string follows kube-proxy's own packet-flow tests: the DNAT destinations reached
in nat, then any ACCEPT, DROP or REJECT decided in kube-proxy's filter chains KUBE-SERVICES,
KUBE-EXTERNAL-SERVICES, KUBE-NODEPORTS and KUBE-PROXY-FIREWALL, joined by ", ".
With ``all_endpoints`` every statistic branch is followed (each walk takes one more "no"
than the last), so every reachable endpoint is listed in rule order.
"""
from __future__ import annotations

import numpy as np

import kernels
from bench.loaders.iptables import Ruleset, load, load_file
from bench.netaddr import PROTOCOLS, int_to_ip, ip_to_int, parse_port
from bench.measure import apply_nat
from kernels import layout as L

KUBE_FILTER_CHAINS = ("KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-NODEPORTS", "KUBE-PROXY-FIREWALL")
SOURCE_PORT = 40000  # any ephemeral port: kube-proxy's rules never match on it
MAX_PATHS = 10000  # far above kube-proxy's 250-endpoint ceiling; stops a pathological ruleset


def ruleset_for_trace(args) -> tuple[Ruleset, list[str]]:
    """The ruleset named on the command line, and the node's addresses."""
    if args.ruleset:
        for ip in args.node_ip:
            ip_to_int(ip, "command line", "--node-ip")
        return load_file(args.ruleset), list(args.node_ip)
    from bench.commands import load_cluster_args
    from bench.proxies.iptables import WriterOptions, write_full

    cluster = load_cluster_args(args.objects, args.config, args.node_ip)
    text = write_full(cluster, WriterOptions(include_jump_rules=True))
    return load(text, source=f"rules for {args.objects}"), list(cluster.config.node_ips)


def make_packet(src: str, dst: str, dport, proto: str) -> np.ndarray:
    packet = np.zeros(1, dtype=L.PACKET_DTYPE)
    packet["src"] = ip_to_int(src, "command line", "--src")
    packet["dst"] = ip_to_int(dst, "command line", "--dst")
    packet["sport"] = SOURCE_PORT
    packet["dport"] = parse_port(dport, "command line", "--dport")
    packet["proto"] = PROTOCOLS[proto]
    packet["ctstate"] = L.CT_NEW
    packet["length"] = 60
    return packet


class _Walker:
    """Runs one table's walks through the twin and turns visited offsets into steps."""

    def __init__(self, ruleset: Ruleset, table: str, local: np.ndarray, seed: int):
        self.name = table
        compiled = ruleset.tables.get(table)
        twin = kernels.load("iptables", "python")
        self.table = twin.Table.from_compiled(compiled, local, seed=seed) if compiled else None
        self.entries = {e.offset: e for e in compiled.entries} if compiled else {}

    def walk(self, packet: np.ndarray, hook: int, decide=None):
        """(result, steps) — result is None when the table has no such hook."""
        if self.table is None or self.table.hook_entry[hook] < 0:
            return None, []
        visited: list = []
        result = self.table.walk_one(packet[0], hook, trace=visited, decide=decide)
        steps = [self._step(hook, offset, matched) for offset, matched in visited]
        return result, steps

    def _step(self, hook: int, offset: int, matched: bool) -> dict:
        entry = self.entries[offset]
        rule = entry.rule_number if entry.kind == "rule" else entry.kind
        return {"table": self.name, "hook": L.HOOK_NAMES[hook], "chain": entry.chain, "rule": rule,
                "text": entry.text, "matched": bool(matched)}


def _all_branches(walker: _Walker, packet: np.ndarray, hook: int):
    """Every walk the statistic matches allow, in rule order (depth first, "yes" first)."""
    pending = [()]
    while pending:
        prefix = pending.pop()
        decisions = list(prefix)
        position = 0

        def decide(_offset):
            nonlocal position
            if position == len(decisions):
                pending.append(tuple(decisions) + (False,))
                decisions.append(True)
            choice = decisions[position]
            position += 1
            return choice

        yield walker.walk(packet, hook, decide)
        if len(pending) > MAX_PATHS:
            break


def _counters(results) -> dict:
    return {name: int(sum(int(r[name]) for r in results if r is not None)) for name in L.WORK_COUNTERS}


def _filter_decision(result, steps) -> str | None:
    """ACCEPT/DROP/REJECT when it was decided inside one of kube-proxy's filter chains."""
    matched = [s for s in steps if s["matched"]]
    if result is None or not matched:
        return None
    verdict = L.VERDICT_NAMES[int(result["verdict"])]
    if verdict in ("ACCEPT", "DROP", "REJECT") and matched[-1]["chain"] in KUBE_FILTER_CHAINS:
        return verdict
    return None


def trace_packet(ruleset: Ruleset, node_ips: list[str], src: str, dst: str, dport, proto: str = "tcp",
                 all_endpoints: bool = False, seed: int = 0) -> dict:
    packet = make_packet(src, dst, dport, proto)
    local = np.array(sorted(ip_to_int(ip) for ip in node_ips), dtype=np.uint32)
    is_local = lambda address: (address >> 24) == 127 or address in local  # noqa: E731
    nat = _Walker(ruleset, "nat", local, seed)
    filt = _Walker(ruleset, "filter", local, seed)
    from_node = is_local(int(packet["src"][0]))
    nat_hook = L.HOOK_OUTPUT if from_node else L.HOOK_PREROUTING

    walks = list(_all_branches(nat, packet, nat_hook)) if all_endpoints else [nat.walk(packet, nat_hook)]
    destinations = []
    for result, _ in walks:
        if result is not None and int(result["verdict"]) == L.V_DNAT:
            target = f"{int_to_ip(int(result['dnat_ip']))}:{int(result['dnat_port'])}"
            if target not in destinations:
                destinations.append(target)
    masquerade = any(s["chain"] == "KUBE-MARK-MASQ" for _, steps in walks for s in steps)
    nat_result, path = walks[0]

    after = apply_nat(packet, np.array([nat_result], dtype=L.RESULT_DTYPE)) if nat_result is not None else packet
    hooks = [L.HOOK_OUTPUT] if from_node else []
    if is_local(int(after["dst"][0])):
        hooks.append(L.HOOK_INPUT)
    elif not from_node:
        hooks.append(L.HOOK_FORWARD)
    results, outputs, verdict = [nat_result], list(destinations), "ACCEPT"
    for hook in hooks:
        result, steps = filt.walk(after, hook)
        path += steps
        results.append(result)
        decision = _filter_decision(result, steps)
        if decision:
            outputs.append(decision)
        if result is not None and L.VERDICT_NAMES[int(result["verdict"])] in ("DROP", "REJECT"):
            verdict = L.VERDICT_NAMES[int(result["verdict"])]
            break
    if verdict == "ACCEPT":
        result, steps = nat.walk(after, L.HOOK_POSTROUTING)
        path += steps
        results.append(result)
    return {
        "packet": {"src": src, "dst": dst, "dport": int(packet["dport"][0]), "proto": proto,
                   "locally_generated": bool(from_node)},
        "output": ", ".join(outputs),
        "masquerade": bool(masquerade),
        "verdict": verdict,
        "endpoints": destinations,
        "path": path,
        "counters": _counters(results),
    }


def format_trace(trace: dict, keep: int = 3) -> str:
    """A readable walk; long runs of non-matching rules are folded into one line."""
    p = trace["packet"]
    origin = "sent by the node itself" if p["locally_generated"] else "arriving from the network"
    lines = [f"packet {p['src']} -> {p['dst']}:{p['dport']}/{p['proto']}, NEW, {origin}"]
    chain, misses = None, []
    for step in trace["path"] + [None]:
        if step is None or step["matched"] or (chain and (step["table"], step["chain"]) != chain):
            lines += _fold(misses, keep)
            misses = []
        if step is None:
            break
        here = (step["table"], step["chain"])
        if here != chain:
            lines.append(f"{step['table']} {step['chain']}  (hook {step['hook']})")
            chain = here
        if step["matched"]:
            lines.append(f"  {step['rule']!s:>6} match  {step['text']}")
        else:
            misses.append(step)
    lines.append(f"verdict: {trace['verdict']}   output: \"{trace['output']}\"   "
                 f"masquerade: {'yes' if trace['masquerade'] else 'no'}")
    lines.append("work: " + ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in trace["counters"].items()))
    return "\n".join(lines)


def _fold(misses: list[dict], keep: int) -> list[str]:
    if len(misses) <= 2 * keep:
        return [f"  {s['rule']!s:>6} -      {s['text']}" for s in misses]
    head = [f"  {s['rule']!s:>6} -      {s['text']}" for s in misses[:keep]]
    tail = [f"  {s['rule']!s:>6} -      {s['text']}" for s in misses[-keep:]]
    return head + [f"         ... {len(misses) - 2 * keep:,} more entries did not match ..."] + tail
