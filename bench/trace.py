"""`kpbench trace`: follow one NEW packet through an iptables or IPVS-mode ruleset, step by step.

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

IPVS mode (:func:`trace_ipvs`) walks the same iptables hooks over IPVS mode's small ipset-driven
ruleset, with IPVS at LOCAL_IN between filter INPUT and nat POSTROUTING: one ``ipvs`` step shows the
virtual-server lookup (bucket, entries compared) and the scheduler's pick. ``output`` is the
real server reached ("" when the packet is not for a virtual service, "REJECT" when the virtual
service has no usable real server: IPVS answers ICMP port unreachable); with ``all_endpoints``
every real server of the virtual service, in the kernel's list order.

iptables mode on the nf_tables backend (``trace_packet(..., backend="nft")``) walks the same
tables as iptables-nft stores them (bench/loaders/iptables_nft.py) with the twin of the nftables
kernel: one step per nft rule started (no policy or chain-tail entries), the same rule numbers
and text, and the nft counters (expressions evaluated).

nftables mode (:func:`trace_nftables`) runs the twin of the nftables kernel over the
``ip kube-proxy`` table, one hook at a time, each hook's base chains in priority order; its
steps name the chain, the rule's handle (its index in the chain) and the rule's source text.
"""
from __future__ import annotations

import re

import numpy as np

import kernels
from bench.errors import read_input
from bench.loaders import ipvs as ipvs_loader
from bench.loaders import nftables as nft_loader
from bench.loaders.iptables import Ruleset, load, load_file
from bench.netaddr import PROTOCOL_NAMES, PROTOCOLS, int_to_ip, ip_to_int, parse_port
from bench.loaders.nftables import kube_proxy_table
from bench.measure.ipvs import kernel_sets
from bench.measure.path import apply_nat
from kernels import layout as L

KUBE_FILTER_CHAINS = ("KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-NODEPORTS", "KUBE-PROXY-FIREWALL",
                      "KUBE-SOURCE-RANGES-FIREWALL", "KUBE-IPVS-FILTER")  # the last two: IPVS mode
SOURCE_PORT = 40000  # any ephemeral port: kube-proxy's rules never match on it
MAX_PATHS = 10000  # far above kube-proxy's 250-endpoint ceiling; stops a pathological ruleset


def ruleset_for_trace(args) -> tuple[Ruleset, list[str]]:
    """The ruleset named on the command line, and the node's addresses."""
    if args.ruleset:
        _check_node_ips(args.node_ip)
        return load_file(args.ruleset), list(args.node_ip)
    from bench.commands import load_cluster_args
    from bench.proxies.iptables import WriterOptions, write_full

    cluster = load_cluster_args(args.objects, args.config, args.node_ip)
    text = write_full(cluster, WriterOptions(include_jump_rules=True))
    return load(text, source=f"rules for {args.objects}"), list(cluster.config.node_ips)


def _check_node_ips(node_ips: list[str]) -> None:
    for ip in node_ips:
        ip_to_int(ip, "command line", "--node-ip")


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

    def __init__(self, compiled, table: str, local: np.ndarray, seed: int, sets: list | None = None):
        """``compiled`` None: the ruleset has no such table, and walks return nothing."""
        self.name = table
        twin = kernels.load("iptables", "python")
        self.table = twin.Table.from_compiled(compiled, local, seed=seed, sets=sets) if compiled else None
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


class _IptablesNftWalker:
    """Like _Walker, for one iptables table as iptables-nft stores it: the twin of the nftables
    kernel, its compat expressions running the twin iptables Table's xt extensions."""

    def __init__(self, ruleset: Ruleset, table: str, local: np.ndarray, seed: int):
        from bench.loaders.iptables_nft import translate_table

        self.name = table
        self.kernel = None
        if table not in ruleset.tables:
            return
        compiled, builder = ruleset.tables[table], ruleset.builders[table]
        self.chains = builder.chains
        nft = translate_table(builder, compiled, ruleset.source)
        self.kernel = kernels.load("nftables", "python").Ruleset.from_table(nft, local, seed)
        self.kernel.attach_xt(kernels.load("iptables", "python").Table.from_compiled(compiled, local, seed=seed))

    def walk(self, packet: np.ndarray, hook: int, decide=None):
        """(result, steps) — result is None when the table has no base chain on ``hook``."""
        if self.kernel is None or hook not in self.kernel.compiled.base_hook:
            return None, []
        trace: list = []
        result = self.kernel.walk_one(packet[0], hook, trace=trace, decide=decide)
        return result, [self._step(hook, *entry) for entry in trace]

    def _step(self, hook: int, chain: int, handle: int, outcome: int) -> dict:
        name = self.kernel.compiled.chain_names[chain]
        return {"table": self.name, "hook": L.HOOK_NAMES[hook], "chain": name, "rule": handle + 1,
                "text": self.chains[name].rules[handle].text, "matched": outcome != L.NFT_V_BREAK}


def _all_branches(walk, choices):
    """Every walk the random choices allow, depth first, each choice's options in order.

    ``walk(decide)`` runs one walk, calling ``decide(arg)`` at each random choice;
    ``choices(arg)`` lists that choice's options (the first is taken, the rest queued)."""
    pending = [()]
    while pending:
        prefix = pending.pop()
        decisions = list(prefix)
        position = 0

        def decide(arg):
            nonlocal position
            if position == len(decisions):
                first, *others = choices(arg)
                pending.extend(tuple(decisions) + (other,) for other in reversed(others))
                decisions.append(first)
            choice = decisions[position]
            position += 1
            return choice

        yield walk(decide)
        if len(pending) > MAX_PATHS:
            break


def _counters(results, names=L.WORK_COUNTERS) -> dict:
    return {name: int(sum(int(r[name]) for r in results if r is not None)) for name in names}


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
                 all_endpoints: bool = False, seed: int = 0, backend: str = "legacy") -> dict:
    """``backend``: "legacy" (ipt_do_table) or "nft" (iptables-nft: the nft kernel)."""
    packet = make_packet(src, dst, dport, proto)
    local = np.array(sorted(ip_to_int(ip) for ip in node_ips), dtype=np.uint32)
    is_local = lambda address: (address >> 24) == 127 or address in local  # noqa: E731
    if backend == "nft":
        nat, filt = (_IptablesNftWalker(ruleset, name, local, seed) for name in ("nat", "filter"))
    else:
        nat = _Walker(ruleset.tables.get("nat"), "nat", local, seed)
        filt = _Walker(ruleset.tables.get("filter"), "filter", local, seed)
    from_node = is_local(int(packet["src"][0]))
    nat_hook = L.HOOK_OUTPUT if from_node else L.HOOK_PREROUTING

    walk = lambda decide=None: nat.walk(packet, nat_hook, decide)  # noqa: E731
    # A statistic match is a yes/no choice, yes first.
    walks = list(_all_branches(walk, lambda _offset: (True, False))) if all_endpoints else [walk()]
    destinations = _destinations(walks)
    masquerade = _marked(walks, "KUBE-MARK-MASQ")
    nat_result, path = walks[0]

    after = apply_nat(packet, np.array([nat_result])) if nat_result is not None else packet
    results, outputs = [nat_result], list(destinations)
    verdict = _run_filter(filt, after, from_node, is_local(int(after["dst"][0])), path, results, outputs)
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
        "counters": _counters(results, L.NFT_WORK_COUNTERS if backend == "nft" else L.WORK_COUNTERS),
    }


def _destinations(walks) -> list[str]:
    """The distinct DNAT destinations the walks reached, in walk order."""
    destinations = []
    for result, _ in walks:
        if result is not None and int(result["verdict"]) == L.V_DNAT:
            target = f"{int_to_ip(int(result['dnat_ip']))}:{int(result['dnat_port'])}"
            if target not in destinations:
                destinations.append(target)
    return destinations


def _marked(walks, mark_chain: str) -> bool:
    """Whether a followed walk entered the chain that marks packets for masquerade."""
    return any(step["chain"] == mark_chain for _, steps in walks for step in steps)


def ipvs_ruleset_for_trace(args) -> tuple[ipvs_loader.IpvsRuleset, list[str]]:
    """The IPVS-mode state named on the command line, and the node's addresses: kpbench's
    sectioned file (--ruleset), a node's own outputs (--ipvsadm, with --ipset and --iptables),
    or the rules kube-proxy would write for --objects."""
    if args.ruleset or args.ipvsadm:
        _check_node_ips(args.node_ip)
    if args.ruleset:
        text = read_input(args.ruleset, "a kpbench rules ipvs file")
        return ipvs_loader.load(text, args.ruleset), list(args.node_ip)
    if args.ipvsadm:
        return _ruleset_from_outputs(args), list(args.node_ip)
    from bench.commands import ipvs_cluster_args
    from bench.proxies.ipvs import IpvsWriterOptions, write

    cluster = ipvs_cluster_args(args)
    text = write(cluster, IpvsWriterOptions(include_jump_rules=True))
    return ipvs_loader.load(text, f"rules for {args.objects}"), list(cluster.config.node_ips)


def _ruleset_from_outputs(args) -> ipvs_loader.IpvsRuleset:
    """A node's ``ipvsadm-save -n``, ``ipset save`` and ``iptables-save`` outputs. Without
    ``ip addr show kube-ipvs0``, every virtual service's address counts as bound there."""
    services = ipvs_loader.load_ipvsadm(read_input(args.ipvsadm, "ipvsadm-save -n output"), args.ipvsadm)
    ipsets = {}
    if args.ipset:
        ipsets = ipvs_loader.load_ipset(read_input(args.ipset, "ipset save output"), args.ipset)
    rules = load_file(args.iptables) if args.iptables else load("", "no iptables-save output")
    ipvs_loader._check_set_references(rules, ipsets, args.iptables or "")
    addresses = list(dict.fromkeys(svc.addr for svc in services if not svc.fwmark))
    return ipvs_loader.IpvsRuleset(services, ipsets, rules, addresses, args.ipvsadm)


def trace_ipvs(ruleset: ipvs_loader.IpvsRuleset, node_ips: list[str], src: str, dst: str, dport,
               proto: str = "tcp", all_endpoints: bool = False, seed: int = 0,
               scheduler: str | None = None) -> dict:
    """One NEW packet through IPVS mode: nat, filter, IPVS at LOCAL_IN, nat POSTROUTING."""
    packet = make_packet(src, dst, dport, proto)
    local = np.array(sorted({ip_to_int(ip) for ip in node_ips} | set(ruleset.addresses)), dtype=np.uint32)
    is_local = lambda address: (address >> 24) == 127 or address in local  # noqa: E731
    sets, tables = kernel_sets(ruleset, "python", seed), ruleset.iptables.tables
    nat = _Walker(tables.get("nat"), "nat", local, seed, sets.get("nat"))
    filt = _Walker(tables.get("filter"), "filter", local, seed, sets.get("filter"))
    from_node = is_local(int(packet["src"][0]))

    nat_result, path = nat.walk(packet, L.HOOK_OUTPUT if from_node else L.HOOK_PREROUTING)
    if nat_result is not None:
        packet["mark"] = nat_result["mark"]  # IPVS mode's nat rules only mark
    results, outputs = [nat_result], []
    to_local = is_local(int(packet["dst"][0]))
    verdict = _run_filter(filt, packet, from_node, to_local, path, results, outputs)
    ipvs, endpoints, after = None, [], packet
    if verdict == "ACCEPT" and to_local:
        ipvs, step, endpoints = _ipvs_step(ruleset, packet, from_node, all_endpoints, seed, scheduler)
        path.append(step)
        outputs += endpoints
        if int(ipvs["verdict"]) == L.IPVS_FORWARD:
            after = packet.copy()
            after["dst"], after["dport"] = ipvs["dnat_ip"], ipvs["dnat_port"]
        elif int(ipvs["verdict"]) == L.IPVS_NO_DEST:
            verdict = "REJECT"  # ip_vs_leave: ICMP port unreachable, the packet dropped
            outputs.append(verdict)
    post = None
    if verdict == "ACCEPT":
        post, steps = nat.walk(after, L.HOOK_POSTROUTING)
        path += steps
        results.append(post)
    marked = any(s["chain"] == "KUBE-MARK-MASQ" for s in path)
    masquerade = marked or (post is not None and int(post["verdict"]) == L.V_MASQUERADE)
    ipvs_counters = {name: int(ipvs[name]) if ipvs is not None else 0 for name in L.IPVS_WORK_COUNTERS}
    return {
        "packet": {"src": src, "dst": dst, "dport": int(packet["dport"][0]), "proto": proto,
                   "locally_generated": bool(from_node)},
        "output": ", ".join(outputs),
        "masquerade": bool(masquerade),
        "verdict": verdict,
        "endpoints": endpoints,
        "path": path,
        "counters": {**_counters(results), **ipvs_counters},
    }


def nftables_ruleset_for_trace(args) -> tuple[nft_loader.NftRuleset, list[str], str]:
    """The nftables ruleset named on the command line (``nft -f`` text or ``nft list ruleset``
    output), the node's addresses, and the text the ruleset was read from."""
    if args.ruleset:
        _check_node_ips(args.node_ip)
        text = read_input(args.ruleset, "an nft ruleset")
        return nft_loader.load(text, args.ruleset), list(args.node_ip), text
    from bench.commands import load_cluster_args
    from bench.proxies.nftables import write_full

    cluster = load_cluster_args(args.objects, args.config, args.node_ip)
    text = write_full(cluster)
    return nft_loader.load(text, f"rules for {args.objects}"), list(cluster.config.node_ips), text


class _NftWalker:
    """Runs hooks of the ``ip kube-proxy`` table through the twin and turns its trace into steps."""

    def __init__(self, ruleset: nft_loader.NftRuleset, local: np.ndarray, seed: int, text: str):
        self.table = kube_proxy_table(ruleset)
        self.name = f"{self.table.family} {self.table.name}"
        self.kernel = kernels.load("nftables", "python").Ruleset.from_table(self.table, local, seed)
        self.lines = text.splitlines()

    def walk(self, packet: np.ndarray, hook: int, decide=None):
        """(result, steps) of every base chain on ``hook``."""
        trace: list = []
        result = self.kernel.walk_one(packet[0], hook, trace=trace, decide=decide)
        return result, [self._step(hook, *entry) for entry in trace]

    def _step(self, hook: int, chain: int, handle: int, outcome: int) -> dict:
        name = self.kernel.compiled.chain_names[chain]
        rule = self.table.chains[name].rules[handle]
        return {"table": self.name, "hook": L.HOOK_NAMES[hook], "chain": name, "rule": handle,
                "text": self._text(rule), "matched": outcome != L.NFT_V_BREAK}

    def _text(self, rule: nft_loader.Rule) -> str:
        """The rule as its source line has it (the AST keeps the line, not the text), without
        the ``add rule FAMILY TABLE CHAIN`` of the transaction form or nft -a's handle."""
        if not 0 < rule.line <= len(self.lines):
            return " ".join(type(op).__name__.lower() for op in rule.exprs)
        line = _HANDLE_NOTE.sub("", self.lines[rule.line - 1].strip())
        words = line.split(None, 5)
        return words[5] if words[0] in ("add", "insert") and len(words) == 6 else line


_HANDLE_NOTE = re.compile(r"\s*# handle \d+$")


def _nft_verdict(result) -> str:
    verdict = L.VERDICT_NAMES[int(result["verdict"])]
    return verdict if verdict in ("DROP", "REJECT") else "ACCEPT"


def trace_nftables(ruleset: nft_loader.NftRuleset, node_ips: list[str], src: str, dst: str, dport,
                   proto: str = "tcp", all_endpoints: bool = False, seed: int = 0, text: str = "") -> dict:
    """One NEW packet through kube-proxy's nftables table, hook by hook, as the kernel runs
    the base chains: PREROUTING (OUTPUT for the node's own packets), the DNAT applied, INPUT
    for a node address or FORWARD, then POSTROUTING. Local means the node IPs only, as for
    ``fib … type local`` and kube-proxy's nftables tracer. ``output``: the DNAT destinations
    (with ``all_endpoints`` every endpoint chain numgen's vmap can pick, in map order), then a
    DROP or REJECT reached in the table. ``text``: what the ruleset was loaded from (the
    steps' rule text)."""
    packet = make_packet(src, dst, dport, proto)
    local = np.array(sorted(ip_to_int(ip) for ip in node_ips), dtype=np.uint32)
    walker = _NftWalker(ruleset, local, seed, text)
    from_node = int(packet["src"][0]) in local
    first_hook = L.HOOK_OUTPUT if from_node else L.HOOK_PREROUTING
    walk = lambda decide=None: walker.walk(packet, first_hook, decide)  # noqa: E731
    # numgen random mod N: each of its N values, in order.
    walks = list(_all_branches(walk, range)) if all_endpoints else [walk()]
    result, path = walks[0]
    destinations = _destinations(walks)
    results, outputs = [result], list(destinations)
    verdict = _nft_verdict(result)
    after = apply_nat(packet, np.array([result]))
    to_local = int(after["dst"][0]) in local
    # The node's own packets met filter-output at OUTPUT already; INPUT follows if they stay local.
    hooks = [L.HOOK_INPUT] if to_local else [] if from_node else [L.HOOK_FORWARD]
    for hook in hooks + [L.HOOK_POSTROUTING]:
        if verdict != "ACCEPT":
            break
        result, steps = walker.walk(after, hook)
        path += steps
        results.append(result)
        verdict = _nft_verdict(result)
    if verdict != "ACCEPT":
        outputs.append(verdict)
    return {
        "packet": {"src": src, "dst": dst, "dport": int(packet["dport"][0]), "proto": proto,
                   "locally_generated": bool(from_node)},
        "output": ", ".join(outputs),
        "masquerade": _marked(walks, "mark-for-masquerade"),
        "verdict": verdict,
        "endpoints": destinations,
        "path": path,
        "counters": _counters(results, L.NFT_WORK_COUNTERS),
    }


def _ipvs_step(ruleset, packet: np.ndarray, from_node: bool, all_endpoints: bool, seed: int,
               scheduler: str | None) -> tuple[np.void, dict, list[str]]:
    """IPVS's virtual-server lookup and scheduling on the twin: (result, step, real servers)."""
    twin = kernels.load("ipvs", "python")
    services, dests = ipvs_loader.kernel_arrays(ruleset.services, ruleset.source, scheduler)
    ipvs = twin.IPVS.from_arrays(services, dests, seed=seed)
    results = np.zeros(1, dtype=L.IPVS_RESULT_DTYPE)
    ipvs.process(packet, results)
    result = results[0]
    p = packet[0]
    bucket = twin.svc_hashkey(int(p["proto"]), int(p["dst"]), int(p["dport"]))
    lookup = (f"{PROTOCOL_NAMES.get(int(p['proto']), p['proto'])} "
              f"{int_to_ip(int(p['dst']))}:{int(p['dport'])}: service bucket {bucket}, {int(result['svc_compares'])} compared")
    s = int(result["service"])
    if s < 0:
        return result, _ipvs_path_step(from_node, lookup + ", no virtual service", False), []
    table = ipvs.destinations()
    listed = [f"{int_to_ip(int(table['addr'][d]))}:{int(table['port'][d])}" for d in ipvs.service_dests(s)]
    name = L.IPVS_SCHEDULERS[int(services["scheduler"][s])]
    if int(result["verdict"]) != L.IPVS_FORWARD:
        text = f"{lookup}; {name} found no usable real server ({int(result['dests_examined'])} examined)"
        return result, _ipvs_path_step(from_node, text, True), []
    picked = f"{int_to_ip(int(result['dnat_ip']))}:{int(result['dnat_port'])}"
    text = f"{lookup}; {name} picked {picked} ({int(result['dests_examined'])} examined of {len(listed)})"
    return result, _ipvs_path_step(from_node, text, True), listed if all_endpoints else [picked]


def _ipvs_path_step(from_node: bool, text: str, matched: bool) -> dict:
    # IPVS hooks LOCAL_IN for arriving packets and LOCAL_OUT for the node's own.
    hook = L.HOOK_OUTPUT if from_node else L.HOOK_INPUT
    return {"table": "ipvs", "hook": L.HOOK_NAMES[hook], "chain": "ip_vs_service_find",
            "rule": "virtual server", "text": text, "matched": matched}


def _run_filter(filt: _Walker, packet: np.ndarray, from_node: bool, to_local: bool, path: list,
                results: list, outputs: list) -> str:
    """The filter hooks the packet meets (OUTPUT for a local sender, then INPUT for a local
    destination or FORWARD); extends path, results and outputs; the verdict."""
    hooks = [L.HOOK_OUTPUT] if from_node else []
    if to_local:
        hooks.append(L.HOOK_INPUT)
    elif not from_node:
        hooks.append(L.HOOK_FORWARD)
    for hook in hooks:
        result, steps = filt.walk(packet, hook)
        path += steps
        results.append(result)
        decision = _filter_decision(result, steps)
        if decision:
            outputs.append(decision)
        if result is not None and L.VERDICT_NAMES[int(result["verdict"])] in ("DROP", "REJECT"):
            return L.VERDICT_NAMES[int(result["verdict"])]
    return "ACCEPT"


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
