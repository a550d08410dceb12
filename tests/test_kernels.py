"""The kernels: hashes, ipt_do_table semantics and counters, conntrack.

Every behavioural test runs through both backends (the ``backend`` fixture) against the same
expected values; the ``*_backends_agree`` tests also compare whole outputs between them.
Tables are built with kernels.blob.TableBuilder, the builder the loader uses.
"""
import importlib
import math

import numpy as np
import pytest

from kernels import layout as L
from kernels.blob import Match, Rule, TableBuilder
from tests.conftest import compiled_available, kernel

ALL = 0xFFFFFFFF
VIP_BASE = 0x0A600000  # 10.96.0.0: service IPs
POD_NET, POD_MASK = 0x0A000000, 0xFFFF0000  # 10.0.0.0/16: pod IPs
POD_A, POD_B = 0x0A000101, 0x0A000202
NODE_IP = 0xC0A80001  # 192.168.0.1
MASQ_MARK = 0x4000


def hashing_module(backend):
    return importlib.import_module("kernels._hashing" if backend == "cython" else "kernels.reference.hashing")


@pytest.fixture
def compiled():
    if not compiled_available():
        pytest.skip("compiled kernels not built")


def packets(n=1, **fields):
    out = np.zeros(n, dtype=L.PACKET_DTYPE)
    out["src"], out["dst"], out["proto"] = POD_A, POD_B, 6
    out["sport"], out["dport"], out["length"] = 40000, 80, 60
    out["ctstate"] = L.CT_NEW
    for name, value in fields.items():
        out[name] = value
    return out


def load(backend, compiled_table, local=(NODE_IP,), seed=0):
    return kernel("iptables", backend).Table.from_compiled(
        compiled_table, np.array(local, dtype=np.uint32), seed=seed)


def walk(table, pkts, hook=L.HOOK_PREROUTING):
    results = np.zeros(len(pkts), dtype=L.RESULT_DTYPE)
    table.run(pkts, hook, results)
    return results


def builder(**chains) -> TableBuilder:
    """A nat table whose chains get the given rules (PREROUTING etc. are built in)."""
    b = TableBuilder("nat")
    for name, rules in chains.items():
        b.chain(name).rules.extend(rules)
    return b


def comment():
    return Match(L.MATCH_COMMENT)


def row(compiled_table, chain, kind="rule", number=0):
    """Counter row of an entry, by chain and kind ("rule" with its 1-based number, "tail", ...)."""
    for index, entry in enumerate(compiled_table.entries):
        if entry.chain == chain and entry.kind == kind and entry.rule_number == number:
            return index
    raise KeyError((chain, kind, number))


# ---- hashes ---------------------------------------------------------------------------------

# From a reference C transcription of include/linux/jhash.h compiled with gcc 12 on x86-64
# (jhash(msg, len, 0x12345678) with msg[i] = i*7+1, and the *words helpers on fixed inputs).
JHASH_VECTORS = {0: 0xF0E21567, 1: 0x40158784, 3: 0xD8F0E5DF, 4: 0xF7E6AC94, 7: 0xACD73B78,
                 11: 0x832A600E, 12: 0xE8F4C145, 13: 0xA2FBE119, 24: 0x56FA96DF, 25: 0xE5FC355E,
                 39: 0xA6A26C2E, 40: 0x9D695EDA}
# SipHash-2-4, key 00..0f, message 00..(n-1): n=15 is the paper's vector; the others come from
# the same gcc-built reference C program (n=0 also matches the reference implementation's table).
SIPHASH_VECTORS = {0: 0x726FDB47DD0E0E31, 15: 0xA129CA6149BE45E5, 39: 0x9ABFD8766A33735C,
                   63: 0x958A324CEB064572}
SIPHASH_KEY = (0x0706050403020100, 0x0F0E0D0C0B0A0908)


def test_siphash_vectors(backend):
    h = hashing_module(backend)
    for n, expected in SIPHASH_VECTORS.items():
        assert h.siphash24(bytes(range(n)), *SIPHASH_KEY) == expected


def test_jhash_vectors(backend):
    h = hashing_module(backend)
    message = bytes((i * 7 + 1) & 0xFF for i in range(40))
    for n, expected in JHASH_VECTORS.items():
        assert h.jhash(message[:n], 0x12345678) == expected
    assert h.jhash_3words(0x0A000001, 6, 0x1F90, 0xCAFEF00D) == 0x9B7C12B6
    assert h.jhash_2words(0x0A000001, 0x1F90, 0xCAFEF00D) == 0x9B34B2ED
    assert h.jhash_1word(0x0A000001, 0xCAFEF00D) == 0x9CA47A12
    assert h.jhash_1word(0, 0) == 0x049396B8


def test_rng_and_small_hashes(backend):
    h = hashing_module(backend)
    rng = h.SplitMix64(1234567)  # Vigna's splitmix64.c outputs for this seed
    assert [rng.next_u64() for _ in range(3)] == [6457827717110365317, 3203168211198807973,
                                                  9817491932198370423]
    assert h.SplitMix64(0).u32() == 0xE220A839  # upper half of the first output
    assert h.hash_32(0xDEADBEEF, 8) == ((0xDEADBEEF * 0x61C88647) & ALL) >> 24
    assert h.reciprocal_scale(ALL, 1000) == 999
    assert h.reciprocal_scale(0x80000000, 1000) == 500


# ---- binary contract -------------------------------------------------------------------------

def test_c_structs_match_the_dtypes(compiled):
    from kernels.iptables import struct_layout
    for name, dtype in (("packet", L.PACKET_DTYPE), ("result", L.RESULT_DTYPE)):
        size, offsets = struct_layout()[name]
        assert size == dtype.itemsize
        assert offsets == {field: dtype.fields[field][1] for field in dtype.names}


def test_c_constants_match_layout(compiled):
    from kernels.iptables import LAYOUT_CONSTANTS
    for name, value in LAYOUT_CONSTANTS.items():
        assert getattr(L, name) == value, name


def test_malformed_blob_is_rejected(backend):
    compiled_table = builder(PREROUTING=[Rule(verdict="ACCEPT")]).build()
    table_cls = kernel("iptables", backend).Table
    blob = compiled_table.blob.copy()
    blob[L.E_NEXT_OFFSET:L.E_NEXT_OFFSET + 2] = [0xFF, 0xFF]
    args = (compiled_table.hook_entry, compiled_table.underflow, 0, compiled_table.n_entries, [])
    with pytest.raises(ValueError):
        table_cls(blob, *args)
    with pytest.raises(ValueError):  # a counter row past n_entries
        table_cls(compiled_table.blob, compiled_table.hook_entry, compiled_table.underflow, 0, 1, [])
    hooks = compiled_table.hook_entry.copy()
    hooks[L.HOOK_PREROUTING] = 8  # not an entry boundary
    with pytest.raises(ValueError):
        table_cls(compiled_table.blob, hooks, compiled_table.underflow, 0, compiled_table.n_entries, [])


# ---- ipt_do_table: chains, jumps, verdicts -------------------------------------------------

def test_jump_and_return(backend):
    ct = builder(
        PREROUTING=[Rule(verdict="A"), Rule(dst=POD_B, dmsk=ALL, verdict="DROP")],
        A=[Rule(dst=0x01010101, dmsk=ALL, verdict="ACCEPT"), Rule(verdict="RETURN"),
           Rule(verdict="ACCEPT")],
    ).build()
    table = load(backend, ct)
    r = walk(table, packets())[0]
    assert r["verdict"] == L.V_DROP
    # jump, A rule 1 (miss), A rule 2 (RETURN), PREROUTING rule 2 (DROP)
    assert (r["entries_visited"], r["jumps"], r["match_calls"]) == (4, 1, 0)
    assert r["bytes_touched"] == 4 * 112 + 3 * 40
    assert table.counters[row(ct, "A", number=1), 0] == 0
    assert table.counters[row(ct, "A", number=2), 0] == 1
    assert table.counters[row(ct, "A", number=3), 0] == 0


def test_falling_off_a_user_chain_visits_its_tail(backend):
    ct = builder(PREROUTING=[Rule(verdict="A")], A=[Rule(dst=0x01010101, dmsk=ALL, verdict="DROP")]).build()
    table = load(backend, ct)
    r = walk(table, packets())[0]
    assert r["verdict"] == L.V_ACCEPT  # the PREROUTING policy
    assert r["entries_visited"] == 4  # jump, A rule, A tail, policy
    assert table.counters[row(ct, "A", "tail"), 0] == 1
    assert table.counters[row(ct, "PREROUTING", "policy"), 0] == 1


@pytest.mark.parametrize("goto", [False, True])
def test_goto_returns_to_the_callers_caller(backend, goto):
    ct = builder(
        PREROUTING=[Rule(verdict="A"), Rule(verdict="DROP")],
        A=[Rule(verdict="B", goto=goto)],
        B=[Rule(dst=0x01010101, dmsk=ALL, verdict="ACCEPT")],
    ).build()
    table = load(backend, ct)
    r = walk(table, packets())[0]
    assert r["verdict"] == L.V_DROP
    assert r["jumps"] == 2
    # goto: B's tail pops straight back to PREROUTING, A's tail is never visited
    assert table.counters[row(ct, "A", "tail"), 0] == (0 if goto else 1)
    assert r["entries_visited"] == (5 if goto else 6)


@pytest.mark.parametrize("policy", ["ACCEPT", "DROP"])
def test_return_at_top_level_goes_to_the_policy(backend, policy):
    b = TableBuilder("nat")
    b.chain("PREROUTING").policy = policy
    b.chain("PREROUTING").rules += [Rule(verdict="RETURN"), Rule(verdict="DROP")]
    ct = b.build()
    table = load(backend, ct)
    r = walk(table, packets())[0]
    assert r["verdict"] == (L.V_ACCEPT if policy == "ACCEPT" else L.V_DROP)
    assert r["entries_visited"] == 2  # the RETURN rule, then the underflow (policy) entry
    assert table.counters[row(ct, "PREROUTING", "policy"), 0] == 1
    assert table.counters[row(ct, "PREROUTING", number=2), 0] == 0


def test_drop_policy(backend):
    b = TableBuilder("filter")
    b.chain("INPUT").policy = "DROP"
    table = load(backend, b.build())
    r = walk(table, packets(), L.HOOK_INPUT)[0]
    assert (r["verdict"], r["entries_visited"]) == (L.V_DROP, 1)


def test_jump_stack_overflow_drops(backend):
    ct = builder(PREROUTING=[Rule(verdict="A")], A=[Rule(verdict="B")], B=[Rule(verdict="ACCEPT")]).build()
    iptables = kernel("iptables", backend)
    full = iptables.Table.from_compiled(ct, [])
    assert walk(full, packets())[0]["verdict"] == L.V_ACCEPT
    shallow = iptables.Table(ct.blob, ct.hook_entry, ct.underflow, 1, ct.n_entries, [])
    r = walk(shallow, packets())[0]
    assert (r["verdict"], r["jumps"]) == (L.V_DROP, 1)  # the second push does not fit


def test_missing_hook_is_an_error(backend):
    table = load(backend, TableBuilder("filter").build())
    with pytest.raises(ValueError):
        walk(table, packets(), L.HOOK_PREROUTING)


# ---- ipt_do_table: matches -------------------------------------------------------------------

def verdicts(backend, rule, pkts, hook=L.HOOK_PREROUTING):
    """ACCEPT-by-rule (True) or fell through to the DROP policy (False), per packet."""
    b = TableBuilder("nat")
    b.chain(L.HOOK_NAMES[hook]).policy = "DROP"
    b.chain(L.HOOK_NAMES[hook]).rules.append(rule)
    return list(walk(load(backend, b.build()), pkts, hook)["verdict"] == L.V_ACCEPT)


def test_address_and_proto_matches_with_invert(backend):
    pkts = packets(3, dst=[POD_B, 0x0A010101, 0x08080808], proto=[6, 17, 6])
    in_pods = dict(dst=POD_NET, dmsk=POD_MASK, verdict="ACCEPT")
    assert verdicts(backend, Rule(**in_pods), pkts) == [True, False, False]
    assert verdicts(backend, Rule(**in_pods, invflags=L.INV_DSTIP), pkts) == [False, True, True]
    assert verdicts(backend, Rule(src=POD_A, smsk=ALL, invflags=L.INV_SRCIP, verdict="ACCEPT"),
                    pkts) == [False, False, False]
    assert verdicts(backend, Rule(proto=17, verdict="ACCEPT"), pkts) == [False, True, False]
    assert verdicts(backend, Rule(proto=17, invflags=L.INV_PROTO, verdict="ACCEPT"), pkts) == [True, False, True]


def test_port_matches_with_invert(backend):
    pkts = packets(4, dport=[80, 443, 80, 8080], sport=[1000, 1000, 2000, 1000], proto=[6, 6, 6, 17])
    tcp = lambda **args: Rule(proto=6, matches=[Match(L.MATCH_TCP, args)], verdict="ACCEPT")  # noqa: E731
    assert verdicts(backend, tcp(dport=(80, 80)), pkts) == [True, False, True, False]
    assert verdicts(backend, tcp(dport=(80, 443)), pkts) == [True, True, True, False]
    assert verdicts(backend, tcp(dport=(80, 80), invert=L.PORT_INV_DST), pkts) == [False, True, False, False]
    assert verdicts(backend, tcp(sport=(1500, 65535)), pkts) == [False, False, True, False]
    assert verdicts(backend, tcp(sport=(1500, 65535), invert=L.PORT_INV_SRC), pkts) == [True, True, False, False]
    udp = Rule(proto=17, matches=[Match(L.MATCH_UDP, {"dport": (8080, 8080)})], verdict="ACCEPT")
    assert verdicts(backend, udp, pkts) == [False, False, False, True]
    multi = lambda flags, invert=0: Rule(matches=[Match(L.MATCH_MULTIPORT, {  # noqa: E731
        "flags": flags, "ports": [443, 2000, 8080], "invert": invert})], verdict="ACCEPT")
    assert verdicts(backend, multi(L.MP_DST), pkts) == [False, True, False, True]
    assert verdicts(backend, multi(L.MP_SRC), pkts) == [False, False, True, False]
    assert verdicts(backend, multi(L.MP_ANY), pkts) == [False, True, True, True]
    assert verdicts(backend, multi(L.MP_ANY, invert=1), pkts) == [True, False, False, False]


def test_mark_ctstate_addrtype_matches_with_invert(backend):
    pkts = packets(4, mark=[0x4000, 0x4001, 0, 0x4000], ctstate=[L.CT_NEW, L.CT_ESTABLISHED,
                   L.CT_NEW | L.CT_DNAT, L.CT_RELATED], dst=[NODE_IP, 0x7F000001, 0xE0000001, POD_B])
    mark = lambda invert=0: Rule(matches=[Match(L.MATCH_MARK, {  # noqa: E731
        "value": MASQ_MARK, "mask": MASQ_MARK, "invert": invert})], verdict="ACCEPT")
    assert verdicts(backend, mark(), pkts) == [True, True, False, True]
    assert verdicts(backend, mark(1), pkts) == [False, False, True, False]
    state = lambda states, invert=0: Rule(matches=[Match(L.MATCH_CONNTRACK, {  # noqa: E731
        "states": states, "invert": invert})], verdict="ACCEPT")
    assert verdicts(backend, state(L.CT_NEW), pkts) == [True, False, True, False]
    assert verdicts(backend, state(L.CT_NEW, 1), pkts) == [False, True, False, True]
    assert verdicts(backend, state(L.CT_ESTABLISHED | L.CT_RELATED), pkts) == [False, True, False, True]
    addrtype = lambda flags=0, **args: Rule(matches=[Match(L.MATCH_ADDRTYPE, {  # noqa: E731
        **args, "flags": flags})], verdict="ACCEPT")
    assert verdicts(backend, addrtype(dest=L.ADDRTYPE_LOCAL), pkts) == [True, True, False, False]
    assert verdicts(backend, addrtype(dest=L.ADDRTYPE_LOCAL, flags=L.ADDRTYPE_INV_DEST), pkts) == [
        False, False, True, True]
    assert verdicts(backend, addrtype(dest=L.ADDRTYPE_MULTICAST), pkts) == [False, False, True, False]
    assert verdicts(backend, addrtype(source=L.ADDRTYPE_UNICAST, dest=L.ADDRTYPE_UNICAST), pkts) == [
        False, False, False, True]
    assert verdicts(backend, addrtype(source=L.ADDRTYPE_LOCAL, flags=L.ADDRTYPE_INV_SOURCE), pkts) == [
        True, True, True, True]
    broadcast = packets(2, dst=[ALL, 0x00000001])
    assert verdicts(backend, addrtype(dest=L.ADDRTYPE_BROADCAST), broadcast) == [True, True]


def test_interface_names_and_wildcards(backend):
    pkts = packets(5, iif=[b"eth0", b"eth1", b"veth0", b"lo", b"eth01"])
    assert verdicts(backend, Rule(iniface="eth+", verdict="ACCEPT"), pkts) == [True, True, False, False, True]
    assert verdicts(backend, Rule(iniface="eth0", verdict="ACCEPT"), pkts) == [True, False, False, False, False]
    assert verdicts(backend, Rule(iniface="eth+", invflags=L.INV_VIA_IN, verdict="ACCEPT"), pkts) == [
        False, False, True, True, False]
    out = packets(2, oif=[b"cni0", b"eth0"])
    assert verdicts(backend, Rule(outiface="cni0", verdict="ACCEPT"), out, L.HOOK_OUTPUT) == [True, False]


def test_mark_target_then_mark_match_in_the_same_walk(backend):
    ct = builder(PREROUTING=[
        Rule(dst=POD_B, dmsk=ALL, target=L.TARGET_MARK, target_args={"value": MASQ_MARK, "mask": MASQ_MARK}),
        Rule(matches=[Match(L.MATCH_MARK, {"value": MASQ_MARK, "mask": MASQ_MARK})], target=L.TARGET_MASQUERADE),
    ]).build()
    r = walk(load(backend, ct), packets(2, dst=[POD_B, 0x01010101], mark=[0x1, 0x1]))
    assert list(r["verdict"]) == [L.V_MASQUERADE, L.V_ACCEPT]
    assert list(r["mark"]) == [0x4001, 0x1]
    assert list(r["target_calls"]) == [2, 0]
    assert r[0]["bytes_touched"] == 2 * 112 + 40 + 48 + 56


def test_nat_and_reject_targets(backend):
    ct = builder(PREROUTING=[
        Rule(dst=VIP_BASE, dmsk=ALL, target=L.TARGET_DNAT, target_args={"ip": POD_B, "port": 8080}),
        Rule(dst=VIP_BASE + 1, dmsk=ALL, target=L.TARGET_REJECT),
        Rule(dst=VIP_BASE + 2, dmsk=ALL, target=L.TARGET_SNAT, target_args={"ip": NODE_IP}),
    ]).build()
    r = walk(load(backend, ct), packets(4, dst=[VIP_BASE, VIP_BASE + 1, VIP_BASE + 2, POD_B]))
    assert list(r["verdict"]) == [L.V_DNAT, L.V_REJECT, L.V_SNAT, L.V_ACCEPT]
    assert list(r["dnat_ip"]) == [POD_B, 0, NODE_IP, 0]
    assert list(r["dnat_port"]) == [8080, 0, 0, 0]
    assert list(r["target_calls"]) == [1, 1, 1, 0]
    assert list(r["bytes_touched"]) == [112 + 80, 2 * 112 + 40, 3 * 112 + 80, 4 * 112 + 40]


def test_entry_and_nfacct_counters(backend):
    b = TableBuilder("filter")
    b.chain("INPUT").rules += [
        Rule(proto=6, matches=[Match(L.MATCH_NFACCT, {"name": "tcp-in"})]),  # no target: fall through
        Rule(proto=17, matches=[Match(L.MATCH_NFACCT, {"name": "udp-in"})], verdict="DROP"),
    ]
    ct = b.build()
    table = load(backend, ct)
    r = walk(table, packets(3, proto=[6, 6, 17], length=[60, 1500, 100]), L.HOOK_INPUT)
    assert list(r["verdict"]) == [L.V_ACCEPT, L.V_ACCEPT, L.V_DROP]
    assert list(r["jumps"]) == [0, 0, 0]  # a fall-through is not a jump
    assert table.counters[row(ct, "INPUT", number=1)].tolist() == [2, 1560]
    assert table.counters[row(ct, "INPUT", number=2)].tolist() == [1, 100]
    assert table.counters[row(ct, "INPUT", "policy")].tolist() == [2, 1560]
    assert table.nfacct_counters.tolist() == [[2, 1560], [1, 100]]
    table.reset_counters()
    assert not table.counters.any() and not table.nfacct_counters.any()


def recent_rules(*rules):
    """INPUT rules, each one -m recent match (dict of args) -j ACCEPT, all on the list "seen"."""
    b = TableBuilder("filter")
    b.chain("INPUT").policy = "DROP"
    for args in rules:
        b.chain("INPUT").rules.append(Rule(matches=[Match(L.MATCH_RECENT, {"name": "seen", **args})],
                                           verdict="ACCEPT"))
    return b.build()


def accepted(table, src, t) -> bool:
    return walk(table, packets(1, src=src, time=t), L.HOOK_INPUT)[0]["verdict"] == L.V_ACCEPT


RCHECK, SET, UPDATE, REMOVE = L.RECENT_CHECK, L.RECENT_SET, L.RECENT_UPDATE, L.RECENT_REMOVE


def test_recent_set_and_rcheck_with_seconds(backend):
    table = load(backend, recent_rules({"mode": RCHECK, "seconds": 10}, {"mode": SET}))
    assert accepted(table, POD_A, 100)  # rcheck misses, --set records the address and matches
    assert table.counters[0, 0] == 0 and table.counters[1, 0] == 1
    assert accepted(table, POD_A, 110)  # 10 s after the --set: rcheck matches, refreshes nothing
    assert table.counters[0, 0] == 1
    assert accepted(table, POD_A, 121)  # 21 s: rcheck misses, --set refreshes
    assert table.counters.tolist()[:2] == [[1, 60], [2, 120]]
    any_age = load(backend, recent_rules({"mode": RCHECK}, {"mode": SET, "invert": 1}))
    assert not accepted(any_age, POD_A, 0)  # ! --set records the address without matching
    assert accepted(any_age, POD_A, 10 ** 6)  # --seconds 0: any age
    assert not accepted(load(backend, recent_rules({"mode": UPDATE})), POD_A, 0)  # never inserts


def test_recent_update_refreshes_rcheck_does_not(backend):
    for mode, expected in ((UPDATE, [True, True, True, False]), (RCHECK, [True, False, True, False])):
        table = load(backend, recent_rules({"mode": mode, "seconds": 5}, {"mode": SET, "invert": 1}))
        assert not accepted(table, POD_A, 0)
        assert [accepted(table, POD_A, t) for t in (4, 8, 12, 18)] == expected, mode


def test_recent_remove(backend):
    table = load(backend, recent_rules({"mode": REMOVE}, {"mode": SET, "invert": 1}))
    # stored, removed (match), stored again, removed again
    assert [accepted(table, POD_A, t) for t in range(4)] == [False, True, False, True]


def test_recent_reap_drops_the_stale_lru_head(backend):
    table = load(backend, recent_rules({"mode": RCHECK, "seconds": 5, "reap": 1}, {"mode": RCHECK},
                                       {"mode": SET, "invert": 1}))
    assert not accepted(table, POD_A, 0)  # A stored at 0
    assert not accepted(table, POD_B, 10)  # B stored at 10
    assert accepted(table, POD_B, 11)  # rule 1 matches B and reaps A, the stale LRU head
    assert not accepted(table, POD_A, 11)  # without the reap, rule 2 (any age) would match A


def test_recent_lru_keeps_100_addresses(backend):
    table = load(backend, recent_rules({"mode": RCHECK}, {"mode": SET, "invert": 1}))
    for i in range(101):  # the 101st address drops the least recently updated one (i = 0)
        assert not accepted(table, POD_NET + i, i)
    assert accepted(table, POD_NET + 1, 200)
    assert accepted(table, POD_NET + 100, 200)
    assert not accepted(table, POD_NET, 200)  # evicted; stored again, which evicts i = 1
    assert not accepted(table, POD_NET + 1, 201)


# ---- kube-proxy-shaped tables: the §1.6/§6.7 counts -----------------------------------------

def p31(probability: float) -> int:
    return round(probability * 2 ** 31)


def kube_nat(services: int, endpoints: int) -> TableBuilder:
    """kube-proxy's nat shape (kube-proxy-rules / kernel-internals §1.5), one port per service."""
    b = TableBuilder("nat")
    b.chain("PREROUTING").rules.append(Rule(matches=[comment()], verdict="KUBE-SERVICES"))
    kube_services = b.chain("KUBE-SERVICES")
    b.chain("KUBE-MARK-MASQ").rules.append(
        Rule(target=L.TARGET_MARK, target_args={"value": MASQ_MARK, "mask": MASQ_MARK}))
    b.chain("KUBE-NODEPORTS")
    for s in range(services):
        vip = dict(dst=VIP_BASE + s, dmsk=ALL, proto=6)
        port = [comment(), Match(L.MATCH_TCP, {"dport": (80, 80)})]
        kube_services.rules.append(Rule(**vip, matches=port, verdict=f"KUBE-SVC-{s}"))
        svc = b.chain(f"KUBE-SVC-{s}")
        svc.rules.append(Rule(**vip, src=POD_NET, smsk=POD_MASK, invflags=L.INV_SRCIP, matches=port,
                              verdict="KUBE-MARK-MASQ"))
        for i in range(endpoints):
            chance = [Match(L.MATCH_STATISTIC, {"p31": p31(1 / (endpoints - i))})] if i < endpoints - 1 else []
            svc.rules.append(Rule(matches=[comment(), *chance], verdict=f"KUBE-SEP-{s}-{i}"))
            sep = b.chain(f"KUBE-SEP-{s}-{i}")
            sep.rules.append(Rule(src=endpoint_ip(s, i), smsk=ALL, matches=[comment()], verdict="KUBE-MARK-MASQ"))
            sep.rules.append(Rule(proto=6, matches=[comment(), Match(L.MATCH_TCP)], target=L.TARGET_DNAT,
                                  target_args={"ip": endpoint_ip(s, i), "port": 8080}))
    kube_services.rules.append(Rule(matches=[comment(), Match(L.MATCH_ADDRTYPE, {"dest": L.ADDRTYPE_LOCAL})],
                                    verdict="KUBE-NODEPORTS"))
    return b


def endpoint_ip(service: int, index: int) -> int:
    return POD_NET + 0x100 * (service + 1) + index + 10


def test_non_service_packet_scans_all_of_kube_services(backend):
    services = 50
    table = load(backend, kube_nat(services, 3).build())
    r = walk(table, packets(3, dst=[POD_B, 0x08080808, VIP_BASE + services]))
    # PREROUTING jump + S rules + nodeports rule + KUBE-SERVICES tail (§6.7's 1 + S + 2), then
    # the return lands on PREROUTING's policy entry, which the kernel visits as well.
    assert list(r["entries_visited"]) == [1 + services + 2 + 1] * 3
    assert list(r["verdict"]) == [L.V_ACCEPT] * 3
    assert list(r["match_calls"]) == [1 + 2] * 3  # PREROUTING comment; nodeports comment + addrtype
    assert list(r["rng_draws"]) == [0] * 3


def test_service_hit_follows_section_6_7(backend):
    services, endpoints = 40, 4
    table = load(backend, kube_nat(services, endpoints).build(), seed=7)
    position = np.arange(1, services + 1).repeat(5)
    r = walk(table, packets(len(position), dst=VIP_BASE + position - 1, sport=np.arange(len(position))))
    assert (r["verdict"] == L.V_DNAT).all()
    chosen = (r["dnat_ip"] - POD_NET - 0x100 * position - 10 + 1).astype(np.int64)  # 1-based endpoint
    assert ((chosen >= 1) & (chosen <= endpoints)).all()
    # 1 PREROUTING + k KUBE-SERVICES + 1 masq rule + j KUBE-SVC rules + 2 KUBE-SEP rules
    assert (r["entries_visited"] == position + chosen + 4).all()
    assert (r["rng_draws"] == np.minimum(chosen, endpoints - 1)).all()
    assert (r["jumps"] == 3).all()
    from_outside = walk(table, packets(1, src=0x08080808, dst=VIP_BASE))[0]
    chosen = int(from_outside["dnat_ip"]) - endpoint_ip(0, 0) + 1
    # the masq rule fires: 2 more entries (KUBE-MARK-MASQ's MARK rule and tail), mark set
    assert from_outside["entries_visited"] == 1 + chosen + 4 + 2
    assert from_outside["mark"] == MASQ_MARK


def chi_square_p_value_4_dof(statistic: float) -> float:
    # Survival function of chi-square with 2m = 4 degrees of freedom: e^(-x/2) (1 + x/2).
    return math.exp(-statistic / 2) * (1 + statistic / 2)


def test_statistic_spreads_connections_evenly(backend):
    endpoints, draws = 5, 20000
    table = load(backend, kube_nat(1, endpoints).build(), seed=2024)
    r = walk(table, packets(draws, dst=VIP_BASE, sport=np.arange(draws) % 65536))
    counts = np.bincount(r["dnat_ip"] - endpoint_ip(0, 0), minlength=endpoints)
    expected = draws / endpoints
    statistic = float(((counts - expected) ** 2 / expected).sum())
    assert chi_square_p_value_4_dof(statistic) >= 1e-4, counts
    assert r["rng_draws"].sum() == sum(min(i + 1, endpoints - 1) * c for i, c in enumerate(counts))


def test_same_seed_same_counters_and_reseed(backend):
    compiled_table = kube_nat(20, 5).build()
    pkts = packets(500, dst=VIP_BASE + np.arange(500) % 25, sport=np.arange(500))
    first, second = load(backend, compiled_table, seed=11), load(backend, compiled_table, seed=11)
    a, b = walk(first, pkts), walk(second, pkts)
    assert np.array_equal(a, b) and np.array_equal(first.counters, second.counters)
    other = load(backend, compiled_table, seed=12)
    assert not np.array_equal(walk(other, pkts)["dnat_ip"], a["dnat_ip"])
    other.reseed(11)
    other.reset_counters()
    assert np.array_equal(walk(other, pkts), a) and np.array_equal(other.counters, first.counters)


def test_timed_run_adds_into_ns(backend):
    iptables = kernel("iptables", backend)
    table = load(backend, kube_nat(5, 2).build())
    ns = np.full(3, 7, dtype=np.int64)
    results = np.zeros(3, dtype=L.RESULT_DTYPE)
    table.run(packets(3), L.HOOK_PREROUTING, results, ns)
    assert (ns >= 7).all()
    assert iptables.timer_overhead_ns(100) >= 0


def test_backends_agree_on_a_random_table(compiled):
    compiled_table, pkts = random_table_and_packets(seed=11, rules=200, n_packets=2000)
    outputs = []
    for backend in ("cython", "python"):
        table = load(backend, compiled_table, local=(NODE_IP, POD_B), seed=99)
        results = np.concatenate([walk(table, pkts[:1000], L.HOOK_PREROUTING),
                                  walk(table, pkts[1000:], L.HOOK_OUTPUT)])
        outputs.append((results, table.counters.copy(), table.nfacct_counters.copy()))
    (results_c, counters_c, nfacct_c), (results_p, counters_p, nfacct_p) = outputs
    assert np.array_equal(results_c, results_p)
    assert np.array_equal(counters_c, counters_p) and np.array_equal(nfacct_c, nfacct_p)
    # the random table really exercises the kernel: several verdicts, deep walks, all counters
    assert set(results_c["verdict"].tolist()) == set(range(len(L.VERDICT_NAMES)))
    assert results_c["jumps"].max() >= 3 and results_c["rng_draws"].sum() > 0
    assert results_c["target_calls"].sum() > 0 and nfacct_c.sum() > 0


def random_table_and_packets(seed: int, rules: int, n_packets: int):
    """A loop-free random nat table over small address/port pools, with every match kind."""
    rng = np.random.default_rng(seed)
    addresses = [POD_A, POD_B, NODE_IP, VIP_BASE, VIP_BASE + 1, 0x7F000001, 0x08080808]
    ports = [53, 80, 443, 8080]
    chains = [f"C{i}" for i in range(12)]
    b = TableBuilder("nat")
    owners = ["PREROUTING", "OUTPUT"] + chains
    for _ in range(rules):
        owner = owners[rng.integers(len(owners))]
        depth = chains.index(owner) if owner in chains else -1
        b.chain(owner).rules.append(random_rule(rng, addresses, ports, chains[depth + 1:]))
    for name in chains:
        b.chain(name)
    n = n_packets
    pkts = packets(n, src=rng.choice(addresses, n), dst=rng.choice(addresses, n),
                   sport=rng.choice(ports + [40000], n), dport=rng.choice(ports, n),
                   proto=rng.choice([6, 17, 132, 1], n), mark=rng.choice([0, MASQ_MARK, 1], n),
                   ctstate=rng.choice([L.CT_NEW, L.CT_ESTABLISHED, L.CT_NEW | L.CT_DNAT], n),
                   iif=rng.choice([b"eth0", b"cni0", b"lo"], n), time=np.arange(n) // 20)
    return b.build(), pkts


def random_rule(rng, addresses, ports, deeper_chains) -> Rule:
    rule = Rule()
    if rng.random() < 0.4:
        rule.dst, rule.dmsk = int(rng.choice(addresses)), ALL
    if rng.random() < 0.2:
        rule.src, rule.smsk = POD_NET, POD_MASK
    if rng.random() < 0.3:
        rule.proto = int(rng.choice([6, 17]))
    if rng.random() < 0.1:
        rule.iniface = str(rng.choice(["eth+", "cni0"]))
    rule.invflags = int(rng.choice([0, 0, 0, L.INV_DSTIP, L.INV_SRCIP, L.INV_PROTO]))
    for _ in range(rng.integers(0, 3)):
        rule.matches.append(random_match(rng, ports))
    action = rng.random()
    if action < 0.5 and deeper_chains:
        rule.verdict, rule.goto = str(rng.choice(deeper_chains)), bool(rng.random() < 0.2)
    elif action < 0.65:
        rule.target, rule.target_args = L.TARGET_MARK, {"value": MASQ_MARK, "mask": MASQ_MARK}
    elif action < 0.7:
        rule.target = int(rng.choice([L.TARGET_DNAT, L.TARGET_SNAT]))
        rule.target_args = {"ip": POD_B, "port": int(rng.choice(ports))}
    elif action < 0.73:
        rule.target = int(rng.choice([L.TARGET_MASQUERADE, L.TARGET_REJECT]))
    elif action < 0.8:
        rule.verdict = str(rng.choice(["ACCEPT", "DROP", "RETURN"]))
    return rule  # otherwise no target: a fall-through


def random_match(rng, ports) -> Match:
    kind = int(rng.integers(L.MATCH_COMMENT, L.MATCH_MULTIPORT + 1))
    port = int(rng.choice(ports))
    invert = int(rng.random() < 0.2)
    args = {
        L.MATCH_TCP: {"dport": (port, port + 100), "invert": invert * L.PORT_INV_DST},
        L.MATCH_UDP: {"sport": (0, port)},
        L.MATCH_SCTP: {"dport": (port, port)},
        L.MATCH_STATISTIC: {"p31": p31(rng.random()), "invert": invert},
        L.MATCH_MARK: {"value": MASQ_MARK, "mask": MASQ_MARK, "invert": invert},
        L.MATCH_CONNTRACK: {"states": int(rng.choice([L.CT_NEW, L.CT_DNAT, L.CT_ESTABLISHED])),
                            "invert": invert},
        L.MATCH_ADDRTYPE: {"dest": L.ADDRTYPE_LOCAL, "flags": invert * L.ADDRTYPE_INV_DEST},
        L.MATCH_RECENT: {"name": str(rng.choice(["r1", "r2"])), "mode": int(rng.integers(1, 5)),
                         "seconds": int(rng.choice([0, 2, 10])), "reap": int(rng.random() < 0.3),
                         "invert": invert},
        L.MATCH_NFACCT: {"name": str(rng.choice(["a1", "a2"]))},
        L.MATCH_MULTIPORT: {"flags": int(rng.integers(1, 4)), "ports": [port, 8080], "invert": invert},
    }.get(kind, {})
    return Match(kind, args)


# ---- the twin's tracer hooks -----------------------------------------------------------------

def test_walk_one_traces_entries_and_lets_the_caller_decide():
    from kernels.reference.iptables import Table
    compiled_table = kube_nat(3, 3).build()
    table = Table.from_compiled(compiled_table, [NODE_IP])
    packet = packets(1, dst=VIP_BASE + 1)[0]
    trace, asked = [], []

    def never(offset):
        asked.append(offset)
        return False

    result = table.walk_one(packet, L.HOOK_PREROUTING, trace=trace, decide=never)
    assert result["verdict"] == L.V_DNAT and result["dnat_ip"] == endpoint_ip(1, 2)
    # PREROUTING, 2 KUBE-SERVICES rules, masq rule, 3 endpoint rules, 2 KUBE-SEP rules
    assert len(trace) == result["entries_visited"] == 1 + 2 + 1 + 3 + 2
    assert [matched for _, matched in trace] == [True, False, True, False, False, False, True, False, True]
    kinds = {e.offset: (e.chain, e.kind) for e in compiled_table.entries}
    assert [kinds[offset][0] for offset, _ in trace][:2] == ["PREROUTING", "KUBE-SERVICES"]
    assert len(asked) == result["rng_draws"] == 2
    assert table.counters.sum(axis=0)[0] == sum(matched for _, matched in trace)


# ---- conntrack -------------------------------------------------------------------------------

def conntrack(backend, buckets=1024, seed=0):
    return kernel("conntrack", backend).ConntrackTable(buckets=buckets, seed=seed)


def lookup(ct, pkts):
    found = np.zeros(len(pkts), dtype=np.uint8)
    compares = np.zeros(len(pkts), dtype=np.uint32)
    ct.lookup(pkts, found, compares)
    return found, compares


def flows(n, seed=0):
    rng = np.random.default_rng(seed)
    return packets(n, src=POD_NET + rng.integers(1, 60000, n), sport=32768 + rng.permutation(n) % 28000,
                   dst=VIP_BASE + rng.integers(0, 50, n), dport=80)


def dnat_to(pkts, ip=POD_B, port=8080):
    results = np.zeros(len(pkts), dtype=L.RESULT_DTYPE)
    results["verdict"], results["dnat_ip"], results["dnat_port"] = L.V_DNAT, ip, port
    return results


def test_conntrack_first_packet_misses_then_hits_both_directions(backend):
    ct = conntrack(backend)
    nat = load(backend, kube_nat(5, 2).build())
    first = packets(1, dst=VIP_BASE + 2)
    found, compares = lookup(ct, first)
    assert (found[0], compares[0]) == (0, 0)
    results = walk(nat, first)  # only the first packet runs the nat rules
    ct.confirm(first, results, np.zeros(1, dtype=np.uint32))
    assert ct.n_connections == 1 and ct.allocations == 1
    found, _ = lookup(ct, first)
    assert found[0] == 1  # established: the data path applies NAT with no rule walk
    reply = packets(1, src=results[0]["dnat_ip"], sport=8080, dst=POD_A, dport=40000)
    assert lookup(ct, reply)[0][0] == 1
    assert lookup(ct, packets(1, src=POD_B, sport=8080, dst=POD_A, dport=40001))[0][0] == 0
    assert sum(chain_lengths(ct)) == 2
    assert ct.hash_computations == 1 + 2 + 1 + 1 + 1  # lookup, confirm (both tuples), 3 lookups


def test_conntrack_without_dnat_replies_come_from_the_original_destination(backend):
    ct = conntrack(backend)
    pkts = packets(1)
    ct.confirm(pkts, np.zeros(1, dtype=L.RESULT_DTYPE), np.zeros(1, dtype=np.uint32))
    assert lookup(ct, packets(1, src=POD_B, sport=80, dst=POD_A, dport=40000))[0][0] == 1
    keep_port = conntrack(backend)
    keep_port.confirm(pkts, dnat_to(pkts, port=0), np.zeros(1, dtype=np.uint32))
    assert lookup(keep_port, packets(1, src=POD_B, sport=80, dst=POD_A, dport=40000))[0][0] == 1


def chain_lengths(ct) -> list[int]:
    entries, lengths = ct.entries, []
    for head in ct.heads[ct.heads >= 0]:
        length, h = 0, int(head)
        while h >= 0:
            length, h = length + 1, int(entries[h]["next"])
        lengths.append(length)
    return lengths


def test_conntrack_two_entries_per_connection_and_clash(backend):
    ct = conntrack(backend, buckets=512, seed=3)
    pkts = flows(1500)  # more than the initial storage: it grows by doubling
    compares = np.zeros(len(pkts), dtype=np.uint32)
    ct.confirm(pkts, dnat_to(pkts), compares)
    assert ct.n_connections == ct.allocations == 1500 and ct.clashes == 0
    assert sum(chain_lengths(ct)) == 2 * 1500
    assert ct.hash_computations == 2 * 1500
    assert ct.bucket_entries_compared == int(compares.sum())
    ct.confirm(pkts[:1], dnat_to(pkts[:1]), compares[:1])
    assert (ct.n_connections, ct.allocations, ct.clashes) == (1500, 1501, 1)
    assert ct.modelled_bytes() == 1500 * 256 + 512 * 8
    assert ct.model_bytes() == ct.heads.nbytes + ct.entries.nbytes


def test_conntrack_compares_grow_with_load(backend):
    buckets = 256
    ct = conntrack(backend, buckets=buckets, seed=1)
    pkts = flows(1024, seed=1)
    means = []
    for done, total in ((0, 256), (256, 1024)):
        batch = pkts[done:total]
        ct.confirm(batch, dnat_to(batch), np.zeros(len(batch), dtype=np.uint32))
        found, compares = lookup(ct, pkts[:total])
        assert found.all()
        expected = 1 + (2 * ct.n_connections / buckets) / 2  # §6.7
        means.append(compares.mean())
        assert 0.75 * expected <= compares.mean() <= 1.25 * expected
    assert means[1] > 2 * means[0]


def test_conntrack_backends_agree(compiled):
    pkts = flows(1200, seed=9)
    outputs = []
    for backend in ("cython", "python"):
        ct = conntrack(backend, buckets=300, seed=42)
        confirm_compares = np.zeros(1000, dtype=np.uint32)
        ct.confirm(pkts[:1000], dnat_to(pkts[:1000]), confirm_compares)
        found = np.zeros(len(pkts), dtype=np.uint8)
        compares = np.zeros(len(pkts), dtype=np.uint32)
        ns = np.zeros(len(pkts), dtype=np.int64)
        ct.lookup(pkts, found, compares, ns)
        assert (ns >= 0).all()
        outputs.append((confirm_compares, found, compares, ct.heads.copy(), ct.entries.copy(),
                        ct.hash_computations, ct.bucket_entries_compared, ct.n_connections))
    for c_value, p_value in zip(*outputs):
        assert np.array_equal(c_value, p_value)
    assert outputs[0][1][:1000].all() and not outputs[0][1][1000:].any()
