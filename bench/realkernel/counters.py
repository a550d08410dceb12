"""Per-rule packet counters: the kernel's, the models', and their rule-by-rule comparison.

The known set of connections: the client opens each one and resets it, so every connection is
exactly four packets through the node — SYN (NEW), SYN-ACK (the reply), ACK and RST — and the
node forwards them all (the endpoint is in the pods namespace). The models see the same four
packets:

- iptables: :class:`~bench.measure.iptables.IptablesDatapath` processes the SYN (conntrack
  miss: nat PREROUTING, DNAT, filter FORWARD, nat POSTROUTING), then the ACK and the RST
  (conntrack hit: filter only) and the SYN-ACK from the endpoint. Its tables' per-entry
  counters are compared with ``iptables-save -c``: every rule, and the built-in chains'
  policy counters, by (table, chain, position in the chain).
- iptables-nft: ``iptables-nft-save -c`` prints the same rules and policy counters, read from
  nft counters. Its model is :class:`~bench.measure.iptables_nft.IptablesNftDatapath`: the
  same packets walk its nft tables (on the nftables twin, traced), and each rule whose
  ``counter`` expression is reached counts one (see :func:`model_iptables_nft_counters`). The
  verdicts are the legacy model's, so the counts must equal it too; they come from the nft
  walk so that a difference in the translation shows.
- nftables: kube-proxy's nftables rules carry almost no counters, so validation loads a copy
  of the ruleset with a ``counter`` statement at the start of every rule: it counts the
  packets that *start* the rule, matched or not. The nftables twin's trace reports exactly
  that (each rule started), hook by hook as NftablesDatapath runs them. Compared with
  ``nft -j list table`` by (chain, position in the chain).

Bytes are not compared: the model's packets have nominal lengths (60-byte SYN, 1500 later).
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

import kernels
from bench.loaders import iptables as iptables_loader
from bench.loaders import nftables as nft_loader
from bench.measure.iptables import IptablesDatapath
from bench.measure.iptables_nft import IptablesNftDatapath
from bench.measure.path import apply_nat, is_local
from bench.netaddr import PROTOCOLS, ip_to_int
from bench.realkernel.netns import CLIENT_IP, run
from kernels import layout as L

MAX_LISTED = 20  # disagreements kept in a record (the count is always complete)


@dataclass(frozen=True)
class Connection:
    """One validation connection: the client's port and the service's address and port."""

    sport: int
    vip: str
    port: int


def syn_packets(connections: list[Connection]) -> np.ndarray:
    packets = np.zeros(len(connections), dtype=L.PACKET_DTYPE)
    packets["src"] = ip_to_int(CLIENT_IP)
    packets["dst"] = [ip_to_int(c.vip) for c in connections]
    packets["sport"] = [c.sport for c in connections]
    packets["dport"] = [c.port for c in connections]
    packets["proto"] = PROTOCOLS["tcp"]
    packets["ctstate"] = L.CT_NEW
    packets["length"] = 60
    return packets


def _later(packets: np.ndarray) -> np.ndarray:
    """Later packets of the same connections, as conntrack classifies them."""
    later = packets.copy()
    later["ctstate"] = (later["ctstate"] & (0xFFFF ^ L.CT_NEW)) | L.CT_ESTABLISHED
    return later


def _replies(after_nat: np.ndarray) -> np.ndarray:
    """The SYN-ACKs: from the endpoint back to the client, as FORWARD sees them (the reverse
    NAT is applied later, at POSTROUTING)."""
    replies = _later(after_nat)
    replies["src"], replies["dst"] = after_nat["dst"], after_nat["src"]
    replies["sport"], replies["dport"] = after_nat["dport"], after_nat["sport"]
    return replies


# --- iptables -------------------------------------------------------------------------------

_SAVED_RULE = re.compile(r"^\[(\d+):(\d+)\] -A (\S+)(.*)$")
_SAVED_CHAIN = re.compile(r"^:(\S+) (\S+) \[(\d+):(\d+)\]$")


def parse_iptables_save(text: str) -> tuple[dict, dict]:
    """``iptables-save -c`` → ({(table, chain, n): packets}, {key: rule text}); n is the
    rule's 1-based position in its chain, 0 the built-in chain's policy."""
    counts, texts, table, seen = {}, {}, "", Counter()
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif (chain := _SAVED_CHAIN.match(line)) and chain.group(2) != "-":
            key = (table, chain.group(1), 0)
            counts[key], texts[key] = int(chain.group(3)), f"policy {chain.group(2)}"
        elif rule := _SAVED_RULE.match(line):
            seen[(table, rule.group(3))] += 1
            key = (table, rule.group(3), seen[(table, rule.group(3))])
            counts[key], texts[key] = int(rule.group(1)), f"-A {rule.group(3)}{rule.group(4)}"
    return counts, texts


def kernel_iptables_counters(save_program: str, node: str) -> tuple[dict, dict]:
    return parse_iptables_save(run([save_program, "-c"], node).stdout)


def model_iptables_counters(text: str, node_ips: list[str], connections: list[Connection],
                            seed: int = 0) -> tuple[dict, dict]:
    """The iptables model's per-rule packet counts after the connections' four packets."""
    ruleset = iptables_loader.load(text, source="validation ruleset")
    datapath = IptablesDatapath(ruleset, node_ips, seed=seed)
    syn = syn_packets(connections)
    first = datapath.process(syn)
    for orig in (_later(syn), _later(syn)):  # the ACK and the RST
        datapath.process(orig, _later(first.after_nat))
    replies = datapath.process(_replies(first.after_nat))
    if not replies.conntrack_hit.all():
        raise AssertionError("the model's conntrack missed a reply of a confirmed connection")
    counts, texts = {}, {}
    for name, table in (("nat", datapath.nat), ("filter", datapath.filter)):
        for row, key, text in _counted_entries(ruleset, name):
            counts[key], texts[key] = int(table.counters[row, 0]), text
    return counts, texts


def _counted_entries(ruleset, table: str):
    """(row, (table, chain, n), text) of the table's rules and built-in chains' policies, the
    keys parse_iptables_save gives them."""
    for row, entry in enumerate(ruleset.tables[table].entries):
        if entry.kind in ("rule", "policy"):
            yield row, (table, entry.chain, entry.rule_number if entry.kind == "rule" else 0), entry.text


# --- iptables-nft ---------------------------------------------------------------------------

_ENDS_BASE_CHAIN = (L.NFT_V_ACCEPT, L.NFT_V_DROP, L.NFT_V_REJECT)


def model_iptables_nft_counters(text: str, node_ips: list[str], connections: list[Connection],
                                seed: int = 0) -> tuple[dict, dict]:
    """The iptables-nft model's per-rule packet counts after the connections' four packets.

    IptablesNftDatapath's tables on the twin of the nftables kernel, walked packet by packet
    with its trace, hook by hook in the order of IptablesDatapath.process. iptables-nft puts
    each rule's ``counter`` after its matches and before its target, so a rule counts a packet
    when none of its expressions failed (trace outcome not NFT_V_BREAK). A base chain's own
    counter (``iptables-nft-save``'s policy counter) counts the packets that reach its policy:
    nft_do_chain updates it only then, so none of the walk's rules accepted, dropped or rejected.
    """
    ruleset = iptables_loader.load(text, source="validation ruleset")
    datapath = IptablesNftDatapath(ruleset, node_ips, seed=seed, backend="python")
    tables = {"nat": datapath.nat, "filter": datapath.filter}
    counted: Counter = Counter()

    def walk(name: str, packets: np.ndarray, hook: int) -> np.ndarray:
        twin = tables[name]
        results = []
        for packet in packets:
            trace: list = []
            results.append(twin.walk_one(packet, hook, trace=trace))
            counted.update((name, twin.compiled.chain_names[chain], handle + 1)
                           for chain, handle, outcome in trace if outcome != L.NFT_V_BREAK)
            base = _base_chain_run(twin.compiled, hook, int(packet["ctstate"]))
            if base is not None and not any(outcome in _ENDS_BASE_CHAIN for *_, outcome in trace):
                counted[(name, base, 0)] += 1
        return np.array(results, dtype=L.NFT_RESULT_DTYPE)

    def filter_hook(packets: np.ndarray) -> None:
        local = datapath.is_local(packets["dst"])
        walk("filter", packets[local], L.HOOK_INPUT)
        walk("filter", packets[~local], L.HOOK_FORWARD)

    syn = syn_packets(connections)
    after_nat = apply_nat(syn, walk("nat", syn, L.HOOK_PREROUTING))
    filter_hook(after_nat)
    walk("nat", after_nat, L.HOOK_POSTROUTING)
    # The ACK, the RST (conntrack applies the stored DNAT) and the SYN-ACK: filter only.
    filter_hook(np.concatenate([_later(after_nat), _later(after_nat), _replies(after_nat)]))
    counts, texts = {}, {}
    for name in tables:
        for _, key, text in _counted_entries(ruleset, name):
            counts[key], texts[key] = counted[key], text
    return counts, texts


def _base_chain_run(compiled, hook: int, ctstate: int) -> str | None:
    """The name of the table's base chain that runs on ``hook`` for this packet, if any
    (iptables-nft gives each hook of a table at most one; nat ones run for NEW packets only)."""
    for i in range(len(compiled.base_hook)):
        if compiled.base_hook[i] == hook and (ctstate & L.CT_NEW or not compiled.base_nat[i]):
            return compiled.chain_names[int(compiled.base_chain[i])]
    return None


# --- nftables -------------------------------------------------------------------------------

_ADD_RULE = re.compile(r"^((?:add|insert) rule \S+ \S+ \S+ )(.*)$")


def with_counters(text: str) -> str:
    """The nft transaction with ``counter`` as the first statement of every rule."""
    return "\n".join(_ADD_RULE.sub(r"\1counter \2", line) for line in text.splitlines()) + "\n"


def parse_nft_json(text: str, table: str = "kube-proxy") -> tuple[dict, dict]:
    """``nft -j list table`` → ({(chain, n): packets of the rule's first counter}, texts);
    n is the rule's 0-based position in its chain. Rules without a counter are left out."""
    counts, texts, seen = {}, {}, Counter()
    for item in json.loads(text).get("nftables", []):
        rule = item.get("rule")
        if not rule or rule.get("table") != table:
            continue
        key = (rule["chain"], seen[rule["chain"]])
        seen[rule["chain"]] += 1
        counter = next((e["counter"] for e in rule["expr"] if "counter" in e), None)
        if counter is not None:
            counts[key] = int(counter["packets"])
            texts[key] = f"{rule['chain']} handle {rule['handle']}"
    return counts, texts


def kernel_nft_counters(node: str) -> tuple[dict, dict]:
    return parse_nft_json(run(["nft", "-j", "list", "table", "ip", "kube-proxy"], node).stdout)


def model_nft_counters(text: str, node_ips: list[str], connections: list[Connection],
                       seed: int = 0) -> tuple[dict, dict]:
    """Rules started per rule in the nftables twin, for the connections' four packets."""
    table = nft_loader.kube_proxy_table(nft_loader.load(text, "validation ruleset"))
    local = np.array(sorted(ip_to_int(ip) for ip in node_ips), dtype=np.uint32)
    twin = kernels.load("nftables", "python").Ruleset.from_table(table, local, seed)
    started: Counter = Counter()

    def walk(packet, hook):
        trace: list = []
        result = twin.walk_one(packet, hook, trace=trace)
        started.update((twin.compiled.chain_names[chain], handle) for chain, handle, _ in trace)
        return result

    def after_prerouting(packet) -> np.ndarray:
        """The packet after the PREROUTING hook: DNATed when a nat chain ran and chose so."""
        result = walk(packet, L.HOOK_PREROUTING)
        return apply_nat(np.array([packet]), np.array([result]))[0]

    syn = syn_packets(connections)
    after_nat = np.array([after_prerouting(p) for p in syn], dtype=L.PACKET_DTYPE)
    # The ACK, the RST (conntrack applies the stored DNAT: the packet is the SYN's after_nat)
    # and the SYN-ACK. The twin skips nat chains for them: they are not NEW.
    later = np.concatenate([_later(after_nat), _later(after_nat), _replies(after_nat)])
    for packet in later:
        walk(packet, L.HOOK_PREROUTING)
    for packet in np.concatenate([after_nat, later]):
        local_dst = bool(is_local(np.array([packet["dst"]], np.uint32), local)[0])
        walk(packet, L.HOOK_INPUT if local_dst else L.HOOK_FORWARD)
        walk(packet, L.HOOK_POSTROUTING)
    counts, texts = {}, {}
    for name, chain in table.chains.items():
        for n, rule in enumerate(chain.rules):
            counts[(name, n)] = started[(name, n)]
            texts[(name, n)] = f"{name} rule {n}"
    return counts, texts


# --- comparison -----------------------------------------------------------------------------

def compare(kernel: dict, model: dict, kernel_texts: dict, model_texts: dict) -> dict:
    """Rule by rule: how many agree, and each disagreement (a rule only one side has counts
    as one)."""
    disagreements = []
    keys = sorted(kernel.keys() | model.keys(), key=lambda k: tuple(map(str, k)))
    for key in keys:
        if kernel.get(key) != model.get(key):
            disagreements.append({"rule": "/".join(map(str, key)),
                                  "text": model_texts.get(key) or kernel_texts.get(key, ""),
                                  "kernel": kernel.get(key), "model": model.get(key)})
    return {"rules_compared": len(keys), "rules_agreeing": len(keys) - len(disagreements),
            "counters_agree": not disagreements, "packets_counted": sum(kernel.values()),
            "disagreements": disagreements[:MAX_LISTED], "disagreement_count": len(disagreements)}
