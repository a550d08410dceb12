"""The iptables loader: iptables-save / iptables-restore text -> table blobs at kernel sizes.

Fields are read back out of the blob at the offsets of kernels/layout.py, so these tests check
the bytes the kernels will walk, not the loader's Python objects.
"""
import copy
import gc
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.cluster.generate import generate
from bench.errors import InputError
from bench.loaders import iptables
from bench.loaders.iptables import dump, load, load_file
from bench.proxies.iptables import write_full, write_partial
from kernels import layout as L
from tests.builders import mutate_words

SVC1 = "KUBE-SVC-XPGD46QRK7WJZT7O"  # ns1/svc1:p80, two endpoints
SEP1A = "KUBE-SEP-SXIVWICOYRO3J4NJ"  # 10.180.0.1:80
SEP1B = "KUBE-SEP-LXVODXWDISEETFEF"  # 10.180.0.2:80
SVC2 = "KUBE-SVC-GNZBNJ2PO5MGZ6GT"  # ns2/svc2:p80: LoadBalancer, ClientIP affinity, NodePort
EXT2 = "KUBE-EXT-GNZBNJ2PO5MGZ6GT"
FW2 = "KUBE-FW-GNZBNJ2PO5MGZ6GT"
SEP2 = "KUBE-SEP-2GOKER2KF7NAANZN"  # 10.180.0.3:80

# What kube-proxy's syncProxyRules writes (kube-proxy-rules.md §a.2, §a.3), by hand.
KUBE_PROXY_PAYLOAD = f"""\
*filter
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-FIREWALL - [0:0]
-A KUBE-SERVICES -m comment --comment "ns3/svc3:p80 has no endpoints" -m tcp -p tcp -d 172.30.0.43 --dport 80 -j REJECT
-A KUBE-EXTERNAL-SERVICES -m comment --comment "ns3/svc3:p80 has no endpoints" -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 3003 -j REJECT
-A KUBE-NODEPORTS -m comment --comment "ns2/svc2:p80 health check node port" -m tcp -p tcp --dport 30000 -j ACCEPT
-A KUBE-PROXY-FIREWALL -m comment --comment "ns2/svc2:p80 traffic not accepted by {FW2}" -m tcp -p tcp -d 1.2.3.4 --dport 80 -j DROP
-A KUBE-FORWARD -m conntrack --ctstate INVALID -m nfacct --nfacct-name ct_state_invalid_dropped_pkts -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
COMMIT
*nat
:KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
:{SVC1} - [0:0]
:{SEP1A} - [0:0]
:{SEP1B} - [0:0]
:{SVC2} - [0:0]
:{EXT2} - [0:0]
:{FW2} - [0:0]
:{SEP2} - [0:0]
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j {SVC1}
-A {SVC1} -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A {SVC1} -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -m statistic --mode random --probability 0.5000000000 -j {SEP1A}
-A {SVC1} -m comment --comment "ns1/svc1:p80 -> 10.180.0.2:80" -j {SEP1B}
-A {SEP1A} -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ
-A {SEP1A} -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80
-A {SEP1B} -m comment --comment ns1/svc1:p80 -s 10.180.0.2 -j KUBE-MARK-MASQ
-A {SEP1B} -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.2:80
-A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 cluster IP" -m tcp -p tcp -d 172.30.0.42 --dport 80 -j {SVC2}
-A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 loadbalancer IP" -m tcp -p tcp -d 1.2.3.4 --dport 80 -j {FW2}
-A KUBE-NODEPORTS -m comment --comment ns2/svc2:p80 -m tcp -p tcp --dport 3001 -j {EXT2}
-A {EXT2} -m comment --comment "masquerade traffic for ns2/svc2:p80 external destinations" -j KUBE-MARK-MASQ
-A {EXT2} -j {SVC2}
-A {FW2} -m comment --comment "ns2/svc2:p80 loadbalancer IP" -s 203.0.113.0/25 -j {EXT2}
-A {FW2} -m comment --comment "other traffic to ns2/svc2:p80 will be dropped by KUBE-PROXY-FIREWALL"
-A {SVC2} -m comment --comment "ns2/svc2:p80 cluster IP" -m tcp -p tcp -d 172.30.0.42 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A {SVC2} -m comment --comment "ns2/svc2:p80 -> 10.180.0.3:80" -m recent --name {SEP2} --mask 255.255.255.255 --rsource --rcheck --seconds 10800 --reap -j {SEP2}
-A {SVC2} -m comment --comment "ns2/svc2:p80 -> 10.180.0.3:80" -j {SEP2}
-A {SEP2} -m comment --comment ns2/svc2:p80 -s 10.180.0.3 -j KUBE-MARK-MASQ
-A {SEP2} -m comment --comment ns2/svc2:p80 -m recent --name {SEP2} --mask 255.255.255.255 --rsource --set -m tcp -p tcp -j DNAT --to-destination 10.180.0.3:80
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
COMMIT
"""

HEAD = L.ENTRY_SIZE + L.TARGET_SIZES[L.TARGET_ERROR]  # 176
TAIL = L.ENTRY_SIZE + L.TARGET_SIZES[L.TARGET_STANDARD]  # 152


@pytest.fixture(scope="module")
def ruleset():
    return load(KUBE_PROXY_PAYLOAD, "payload.txt")


# ---- reading entries back out of a blob --------------------------------------------------------

def read(table, fmt: str, offset: int):
    return struct.unpack_from("<" + fmt, table.blob, offset)[0]


def entry(table, chain: str, number: int) -> int:
    """Blob offset of rule ``number`` (1-based) of ``chain``."""
    for info in table.entries:
        if info.chain == chain and info.kind == "rule" and info.rule_number == number:
            return info.offset
    raise AssertionError(f"no rule {number} in {chain}")


def entry_of(table, chain: str, kind: str) -> int:
    return next(info.offset for info in table.entries if info.chain == chain and info.kind == kind)


def size(table, offset: int) -> int:
    return read(table, "H", offset + L.E_NEXT_OFFSET)


def matches(table, offset: int) -> list[tuple[int, int]]:
    """(kind, offset) of each match of the entry at ``offset``, walked by their size fields."""
    found, at = [], offset + L.ENTRY_SIZE
    end = offset + read(table, "H", offset + L.E_TARGET_OFFSET)
    while at < end:
        found.append((read(table, "B", at + L.X_KIND), at))
        at += read(table, "H", at + L.X_SIZE)
    assert at == end
    return found


def target(table, offset: int) -> tuple[int, int]:
    """(kind, offset) of the entry's target."""
    at = offset + read(table, "H", offset + L.E_TARGET_OFFSET)
    return read(table, "B", at + L.X_KIND), at


def verdict(table, offset: int) -> int:
    kind, at = target(table, offset)
    assert kind == L.TARGET_STANDARD
    return read(table, "i", at + L.T_VERDICT)


def ip(text: str) -> int:
    a, b, c, d = map(int, text.split("."))
    return a << 24 | b << 16 | c << 8 | d


# ---- a realistic kube-proxy payload -------------------------------------------------------------

def test_kube_proxy_payload_has_the_chains_and_rules_written(ruleset):
    assert ruleset.source == "payload.txt"
    assert ruleset.rule_counts() == {"filter": 8, "nat": 25}
    assert ruleset.chains("filter") == ["INPUT", "FORWARD", "OUTPUT", "KUBE-SERVICES",
                                        "KUBE-EXTERNAL-SERVICES", "KUBE-FORWARD", "KUBE-NODEPORTS",
                                        "KUBE-PROXY-FIREWALL", "KUBE-FIREWALL"]
    assert ruleset.chains("nat") == ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING", "KUBE-SERVICES",
                                     "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ", SVC1,
                                     SEP1A, SEP1B, SVC2, EXT2, FW2, SEP2]
    nat = ruleset.tables["nat"]
    assert nat.stacksize == 11  # user chains
    # Every entry: rules + one head and one tail per user chain + policies + the end marker.
    assert nat.n_entries == 25 + 2 * 11 + 4 + 1
    assert nat.blob.nbytes == sum(size(nat, info.offset) for info in nat.entries)


def test_entry_sizes_are_the_kernels(ruleset):
    """kernel-internals §1.5."""
    nat = ruleset.tables["nat"]
    assert size(nat, entry(nat, "KUBE-SERVICES", 1)) == 488
    assert size(nat, entry(nat, SVC1, 1)) == 488  # the masquerade rule
    assert size(nat, entry(nat, SVC1, 2)) == 496  # endpoint with statistic
    assert size(nat, entry(nat, SVC1, 3)) == 440  # last endpoint
    assert size(nat, entry(nat, SEP1A, 1)) == 440  # hairpin
    assert size(nat, entry(nat, SEP1A, 2)) == 528  # DNAT
    assert size(nat, entry(nat, "KUBE-MARK-MASQ", 1)) == 152
    assert size(nat, entry_of(nat, SEP1A, "head")) + size(nat, entry_of(nat, SEP1A, "tail")) == 328
    assert size(nat, entry(nat, FW2, 2)) == 112 + 288 + 40  # a rule without a target still has one


def test_cluster_ip_rule_fields(ruleset):
    nat = ruleset.tables["nat"]
    at = entry(nat, "KUBE-SERVICES", 1)
    assert read(nat, "I", at + L.E_DST) == ip("172.30.0.41")
    assert read(nat, "I", at + L.E_DMSK) == 0xFFFFFFFF
    assert read(nat, "I", at + L.E_SMSK) == 0
    assert read(nat, "H", at + L.E_PROTO) == 6
    assert read(nat, "B", at + L.E_INVFLAGS) == 0
    assert read(nat, "H", at + L.E_MATCH_COUNT) == 2
    (comment, _), (tcp, tcp_at) = matches(nat, at)
    assert (comment, tcp) == (L.MATCH_COMMENT, L.MATCH_TCP)
    assert read(nat, "H", tcp_at + L.P_DPT_LO) == read(nat, "H", tcp_at + L.P_DPT_HI) == 80
    assert (read(nat, "H", tcp_at + L.P_SPT_LO), read(nat, "H", tcp_at + L.P_SPT_HI)) == (0, 65535)
    assert read(nat, "B", tcp_at + L.P_PORT_INV) == 0
    # The entry's index is its counter row.
    assert read(nat, "I", at + L.E_RULE_INDEX) == [i.offset for i in nat.entries].index(at)


def test_masquerade_rule_inverts_the_pod_cidr(ruleset):
    nat = ruleset.tables["nat"]
    at = entry(nat, SVC1, 1)
    assert read(nat, "I", at + L.E_SRC) == ip("10.0.0.0")
    assert read(nat, "I", at + L.E_SMSK) == 0xFF000000
    assert read(nat, "B", at + L.E_INVFLAGS) == L.INV_SRCIP
    assert verdict(nat, at) == nat.chain_start["KUBE-MARK-MASQ"]


def test_statistic_probability_is_31_bit_fixed_point(ruleset):
    nat = ruleset.tables["nat"]
    (_, _), (kind, at) = matches(nat, entry(nat, SVC1, 2))
    assert kind == L.MATCH_STATISTIC
    assert read(nat, "I", at + L.STAT_P31) == 1 << 30  # lround(0.5 * 2^31)
    assert read(nat, "B", at + L.STAT_INVERT) == 0


@pytest.mark.parametrize("printed, p31", [("0.3333333333", 715827883), ("0.1000000000", 214748365),
                                          ("1.0000000000", 1 << 31), ("0.0000099999", 21475),
                                          ("0", 0)])
def test_probability_rounds_like_lround(printed, p31):
    text = f"*nat\n:A - [0:0]\n-A A -m statistic --mode random --probability {printed}\nCOMMIT\n"
    nat = load(text).tables["nat"]
    (_, at), = matches(nat, entry(nat, "A", 1))
    assert read(nat, "I", at + L.STAT_P31) == p31


def test_dnat_and_hairpin_fields(ruleset):
    nat = ruleset.tables["nat"]
    hairpin = entry(nat, SEP1A, 1)
    assert read(nat, "I", hairpin + L.E_SRC) == ip("10.180.0.1")
    assert read(nat, "I", hairpin + L.E_SMSK) == 0xFFFFFFFF
    dnat = entry(nat, SEP1A, 2)
    kind, at = target(nat, dnat)
    assert kind == L.TARGET_DNAT
    assert read(nat, "I", at + L.T_NAT_IP) == ip("10.180.0.1")
    assert read(nat, "H", at + L.T_NAT_PORT) == 80


def test_mark_and_masquerade_fields(ruleset):
    nat = ruleset.tables["nat"]
    (kind, at), = matches(nat, entry(nat, "KUBE-POSTROUTING", 1))
    assert kind == L.MATCH_MARK
    assert (read(nat, "I", at + L.MARK_VALUE), read(nat, "I", at + L.MARK_MASK)) == (0x4000, 0x4000)
    assert read(nat, "B", at + L.MARK_INVERT) == 1
    assert verdict(nat, entry(nat, "KUBE-POSTROUTING", 1)) == L.XT_RETURN
    kind, at = target(nat, entry(nat, "KUBE-POSTROUTING", 2))  # --xor-mark 0x4000
    assert kind == L.TARGET_MARK
    assert (read(nat, "I", at + L.T_MARK_VALUE), read(nat, "I", at + L.T_MARK_MASK)) == (0x4000, 0)
    kind, at = target(nat, entry(nat, "KUBE-POSTROUTING", 3))
    assert kind == L.TARGET_MASQUERADE
    assert read(nat, "B", at + L.X_DATA) == 1  # --random-fully
    kind, at = target(nat, entry(nat, "KUBE-MARK-MASQ", 1))  # --or-mark 0x4000
    assert (read(nat, "I", at + L.T_MARK_VALUE), read(nat, "I", at + L.T_MARK_MASK)) == (0x4000, 0x4000)


def test_recent_addrtype_conntrack_and_nfacct_fields(ruleset):
    nat = ruleset.tables["nat"]
    (_, _), (kind, at) = matches(nat, entry(nat, SVC2, 2))
    assert kind == L.MATCH_RECENT
    assert read(nat, "I", at + L.RC_SECONDS) == 10800
    assert read(nat, "B", at + L.RC_MODE) == L.RECENT_CHECK
    assert read(nat, "B", at + L.RC_REAP) == 1
    assert nat.recent_names[read(nat, "H", at + L.RC_TABLE)] == SEP2
    (_, _), (kind, at), (_, _) = matches(nat, entry(nat, SEP2, 2))
    assert read(nat, "B", at + L.RC_MODE) == L.RECENT_SET
    assert nat.recent_names == [SEP2]  # one list, shared by --rcheck and --set
    (_, _), (kind, at) = matches(nat, entry(nat, "KUBE-SERVICES", 4))
    assert kind == L.MATCH_ADDRTYPE
    assert read(nat, "H", at + L.AT_DEST) == L.ADDRTYPE_LOCAL
    assert read(nat, "H", at + L.AT_SOURCE) == 0
    filt = ruleset.tables["filter"]
    (ct, ct_at), (acct, acct_at) = matches(filt, entry(filt, "KUBE-FORWARD", 1))
    assert (ct, acct) == (L.MATCH_CONNTRACK, L.MATCH_NFACCT)
    assert read(filt, "H", ct_at + L.CT_STATE_MASK) == L.CT_INVALID
    assert filt.nfacct_names[read(filt, "H", acct_at + L.NFACCT_ID)] == "ct_state_invalid_dropped_pkts"
    at = entry(filt, "KUBE-FIREWALL", 1)
    (_, _), (_, ct_at) = matches(filt, at)
    assert read(filt, "H", ct_at + L.CT_STATE_MASK) == L.CT_RELATED | L.CT_ESTABLISHED | L.CT_DNAT
    assert read(filt, "B", ct_at + L.CT_INVERT) == 1
    assert read(filt, "B", at + L.E_INVFLAGS) == L.INV_SRCIP
    assert verdict(filt, at) == L.VERDICT_DROP


def test_reject_and_accept(ruleset):
    filt = ruleset.tables["filter"]
    assert target(filt, entry(filt, "KUBE-SERVICES", 1))[0] == L.TARGET_REJECT
    assert verdict(filt, entry(filt, "KUBE-NODEPORTS", 1)) == L.VERDICT_ACCEPT


def test_jumps_point_at_the_first_rule_after_the_head(ruleset):
    nat = ruleset.tables["nat"]
    for chain, number, to in [("KUBE-SERVICES", 1, SVC1), (SVC1, 2, SEP1A), (SVC1, 3, SEP1B),
                              ("KUBE-SERVICES", 3, FW2), (FW2, 1, EXT2), (EXT2, 2, SVC2),
                              ("KUBE-SERVICES", 4, "KUBE-NODEPORTS")]:
        head = entry_of(nat, to, "head")
        assert verdict(nat, entry(nat, chain, number)) == head + HEAD == nat.chain_start[to]
        assert nat.blob[head + L.ENTRY_SIZE + L.X_DATA:][:len(to)].tobytes() == to.encode()
    # A rule without a target falls through to the next entry.
    last = entry(nat, FW2, 2)
    assert verdict(nat, last) == last + size(nat, last)
    assert read(nat, "B", last + L.E_FLAGS) == 0


def test_entries_describe_every_entry_in_blob_order(ruleset):
    """The entries are made when read: by index (also from the end) and by iteration alike,
    each at the offset where the previous one ends, and later edits of the chains don't show."""
    nat = ruleset.tables["nat"]
    listed = list(nat.entries)
    assert [nat.entries[i] for i in range(nat.n_entries)] == listed == nat.entries[:]
    assert nat.entries[-1] == listed[-1] == (nat.blob.nbytes - size(nat, listed[-1].offset), "", "end", 0,
                                             "(end of table)")
    assert all(after.offset == before.offset + size(nat, before.offset)
               for before, after in zip(listed, listed[1:]))
    assert listed[:5] == [(0, "PREROUTING", "policy", 0, "(policy ACCEPT)"),
                          (152, "INPUT", "policy", 0, "(policy ACCEPT)"),
                          (304, "OUTPUT", "policy", 0, "(policy ACCEPT)"),
                          (456, "POSTROUTING", "policy", 0, "(policy ACCEPT)"),
                          (608, "KUBE-SERVICES", "head", 0, ":KUBE-SERVICES")]
    sep = [e for e in listed if e.chain == SEP1A]
    assert [(e.kind, e.rule_number) for e in sep] == [("head", 0), ("rule", 1), ("rule", 2), ("tail", 0)]
    assert sep[2].text == f"-A {SEP1A} -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80"
    fresh = load(KUBE_PROXY_PAYLOAD, "payload.txt")  # the fixture is shared: edit a copy
    fresh.builders["nat"].chains[SEP1A].rules.clear()
    assert list(fresh.tables["nat"].entries) == listed
    with pytest.raises(IndexError):
        nat.entries[nat.n_entries]


def test_chain_tails_return_and_policies_accept(ruleset):
    nat = ruleset.tables["nat"]
    assert verdict(nat, entry_of(nat, SVC1, "tail")) == L.XT_RETURN
    for hook in ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"):
        number = L.HOOK_NAMES.index(hook)
        policy = entry_of(nat, hook, "policy")
        assert nat.underflow[number] == policy == nat.hook_entry[number]  # no rules of its own
        assert verdict(nat, policy) == L.VERDICT_ACCEPT
    assert nat.hook_entry[L.HOOK_FORWARD] == -1


# ---- blob bytes per service: kernel-internals §1.5 ---------------------------------------------

NAT_BASE = """*nat
:KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
"""


def cluster_ip_service(endpoints: int, comments: bool) -> tuple[list[str], list[str]]:
    """(chain lines, rules) of one ClusterIP service as kube-proxy writes it (§a.3)."""
    svc, spn = "KUBE-SVC-SERVICE0", "ns/svc:p80"
    chains, rules = [f":{svc} - [0:0]"], [
        f'-A KUBE-SERVICES -m comment --comment "{spn} cluster IP" -m tcp -p tcp -d 172.30.0.1 --dport 80 -j {svc}',
        f'-A {svc} -m comment --comment "{spn} cluster IP" -m tcp -p tcp -d 172.30.0.1 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ']
    for i in range(endpoints):
        sep, ep = f"KUBE-SEP-ENDPOINT{i}", f"10.180.0.{i + 1}"
        chains.append(f":{sep} - [0:0]")
        jump_comment = f'-m comment --comment "{spn} -> {ep}:80" ' if comments else ""
        sep_comment = f"-m comment --comment {spn} " if comments else ""
        statistic = (f"-m statistic --mode random --probability {1 / (endpoints - i):0.10f} "
                     if i < endpoints - 1 else "")
        rules += [f"-A {svc} {jump_comment}{statistic}-j {sep}",
                  f"-A {sep} {sep_comment}-s {ep} -j KUBE-MARK-MASQ",
                  f"-A {sep} {sep_comment}-m tcp -p tcp -j DNAT --to-destination {ep}:80"]
    return chains, rules


@pytest.mark.parametrize("comments, per_endpoint", [(True, 1792), (False, 928)])
@pytest.mark.parametrize("endpoints", [1, 2, 5, 10])
def test_blob_bytes_per_cluster_ip_service(endpoints, comments, per_endpoint):
    empty = load(NAT_BASE + "COMMIT\n").tables["nat"].blob.nbytes
    chains, rules = cluster_ip_service(endpoints, comments)
    text = NAT_BASE.replace(":KUBE-MARK-MASQ - [0:0]\n", ":KUBE-MARK-MASQ - [0:0]\n" + "\n".join(chains) + "\n")
    nat = load(text + "\n".join(rules) + "\nCOMMIT\n").tables["nat"]
    assert nat.blob.nbytes - empty == 1248 + per_endpoint * endpoints
    assert nat.n_entries - load(NAT_BASE + "COMMIT\n").tables["nat"].n_entries == 4 + 5 * endpoints


# ---- syntax ---------------------------------------------------------------------------------------

def one_rule(rule: str, table: str = "nat", chains: str = "A B") -> str:
    declared = "".join(f":{name} - [0:0]\n" for name in chains.split())
    return f"*{table}\n{declared}-A A {rule}\nCOMMIT\n"


def first_rule(text: str, table: str = "nat"):
    compiled = load(text).tables[table]
    return compiled, entry(compiled, "A", 1)


def test_implicit_protocol_match_is_loaded_where_the_option_is():
    explicit = load(one_rule("-m comment --comment x -p tcp -m tcp --dport 80 -j B"))
    implicit = load(one_rule("-p tcp -m comment --comment x --dport 80 -j B"))
    assert (explicit.tables["nat"].blob == implicit.tables["nat"].blob).all()


@pytest.mark.parametrize("proto, kind", [("udp", L.MATCH_UDP), ("sctp", L.MATCH_SCTP)])
def test_udp_and_sctp_ports(proto, kind):
    nat, at = first_rule(one_rule(f"-p {proto} ! --sport 1000:2000 --dport 53"))
    (found, m_at), = matches(nat, at)
    assert found == kind
    assert read(nat, "H", at + L.E_PROTO) == iptables.PROTOCOLS[proto]
    assert (read(nat, "H", m_at + L.P_SPT_LO), read(nat, "H", m_at + L.P_SPT_HI)) == (1000, 2000)
    assert read(nat, "B", m_at + L.P_PORT_INV) == L.PORT_INV_SRC


@pytest.mark.parametrize("ports, low, high", [("80", 80, 80), ("1024:", 1024, 65535), (":1023", 0, 1023)])
def test_port_ranges(ports, low, high):
    nat, at = first_rule(one_rule(f"-p tcp -m tcp ! --dport {ports}"))
    (_, m_at), = matches(nat, at)
    assert (read(nat, "H", m_at + L.P_DPT_LO), read(nat, "H", m_at + L.P_DPT_HI)) == (low, high)
    assert read(nat, "B", m_at + L.P_PORT_INV) == L.PORT_INV_DST


def test_header_options_and_their_inversions():
    nat, at = first_rule(one_rule("! -s 10.1.0.0/16 ! -d 192.168.1.7/24 ! -p udp -i eth+ ! -o veth0 -g B"))
    assert read(nat, "I", at + L.E_SRC) == ip("10.1.0.0")
    assert read(nat, "I", at + L.E_DST) == ip("192.168.1.0")  # host bits are masked off
    assert read(nat, "I", at + L.E_DMSK) == 0xFFFFFF00
    assert read(nat, "H", at + L.E_PROTO) == 17
    assert read(nat, "B", at + L.E_INVFLAGS) == (L.INV_SRCIP | L.INV_DSTIP | L.INV_PROTO | L.INV_VIA_OUT)
    iface = nat.blob[at + L.E_INIFACE:at + L.E_INIFACE + 16].tobytes()
    mask = nat.blob[at + L.E_INMASK:at + L.E_INMASK + 16].tobytes()
    assert iface.rstrip(b"\0") == b"eth" and mask == b"\xff" * 3 + b"\0" * 13  # wildcard
    mask = nat.blob[at + L.E_OUTMASK:at + L.E_OUTMASK + 16].tobytes()
    assert mask == b"\xff" * 6 + b"\0" * 10  # "veth0" and its NUL
    assert read(nat, "B", at + L.E_FLAGS) == L.F_GOTO
    assert verdict(nat, at) == nat.chain_start["B"]


@pytest.mark.parametrize("proto, number", [("all", 0), ("ICMP", 1), ("47", 47), ("TCP", 6)])
def test_protocol_names_and_numbers(proto, number):
    nat, at = first_rule(one_rule(f"-p {proto}"))
    assert read(nat, "H", at + L.E_PROTO) == number


@pytest.mark.parametrize("option, value, mask", [
    ("--set-xmark 0x4000/0xffff", 0x4000, 0xFFFF), ("--set-xmark 0x10", 0x10, 0xFFFFFFFF),
    ("--set-mark 0x1/0x3", 0x1, 0x3), ("--set-mark 16", 16, 0xFFFFFFFF),
    ("--or-mark 0x004000", 0x4000, 0x4000), ("--xor-mark 0x4000", 0x4000, 0),
    ("--and-mark 0xffffbfff", 0, 0x4000)])
def test_mark_target_encodes_value_and_mask(option, value, mask):
    nat, at = first_rule(one_rule(f"-j MARK {option}"))
    kind, t = target(nat, at)
    assert (read(nat, "I", t + L.T_MARK_VALUE), read(nat, "I", t + L.T_MARK_MASK)) == (value, mask)


def test_multiport_expands_ranges_that_fit():
    nat, at = first_rule(one_rule("-p tcp -m multiport ! --dports 80,443,8000:8002 -j ACCEPT"))
    (kind, m_at), = matches(nat, at)
    assert kind == L.MATCH_MULTIPORT
    assert read(nat, "B", m_at + L.MP_FLAGS) == L.MP_DST
    count = read(nat, "B", m_at + L.MP_COUNT)
    assert [read(nat, "H", m_at + L.MP_PORTS + 2 * i) for i in range(count)] == [80, 443, 8000, 8001, 8002]
    assert read(nat, "B", m_at + L.MP_INVERT) == 1


def test_addrtype_source_inverted_and_state_alias():
    filt, at = first_rule(one_rule("-m addrtype ! --src-type LOCAL,unicast -m state --state NEW,established",
                                   table="filter"), "filter")
    (at_kind, at_at), (ct_kind, ct_at) = matches(filt, at)
    assert read(filt, "H", at_at + L.AT_SOURCE) == L.ADDRTYPE_LOCAL | L.ADDRTYPE_UNICAST
    assert read(filt, "B", at_at + L.AT_FLAGS) == L.ADDRTYPE_INV_SOURCE
    assert ct_kind == L.MATCH_CONNTRACK
    assert read(filt, "H", ct_at + L.CT_STATE_MASK) == L.CT_NEW | L.CT_ESTABLISHED


def test_addrtype_bits_are_the_kernels():
    assert iptables._ADDRTYPE_NAMES["LOCAL"] == L.ADDRTYPE_LOCAL == 1 << 2  # 1 << RTN_LOCAL
    assert iptables._ADDRTYPE_NAMES["UNICAST"] == L.ADDRTYPE_UNICAST
    assert iptables._ADDRTYPE_NAMES["MULTICAST"] == L.ADDRTYPE_MULTICAST
    assert iptables._ADDRTYPE_NAMES["XRESOLVE"] == 1 << 11


def test_quoted_comments_with_spaces_and_escaped_quotes():
    text = one_rule(r'-m comment --comment "say \"hi\" to a\\b" -m comment --comment plain"glued word"')
    rule = load(text).builders["nat"].chains["A"].rules[0]
    assert [m.args["comment"] for m in rule.matches] == ['say "hi" to a\\b', "plainglued word"]
    assert rule.text == text.splitlines()[3]
    assert rule.line == 4


@settings(max_examples=200, derandomize=True)
@given(st.text(alphabet=' \t"ab-', max_size=30))
def test_fast_quote_splitting_agrees_with_the_character_reader(line):
    try:
        expected = iptables._tokens_escaped(line)
    except InputError:
        with pytest.raises(InputError):
            iptables._tokens(line)
        return
    assert iptables._tokens(line) == expected


def test_counter_prefixes_are_accepted_and_ignored():
    plain = load(KUBE_PROXY_PAYLOAD)
    counted = "".join(f"[12:3456] {line}\n" if line.startswith("-A") else line + "\n"
                      for line in KUBE_PROXY_PAYLOAD.splitlines())
    counted = counted.replace(":KUBE-SERVICES - [0:0]", ":KUBE-SERVICES - [7:99]")
    with_counters = load(counted)
    for table in ("filter", "nat"):
        assert (plain.tables[table].blob == with_counters.tables[table].blob).all()


def test_insert_new_chain_flush_and_policies():
    text = """# comment lines and blank lines are skipped

*filter
:INPUT DROP [0:0]
:FORWARD - [0:0]
-N MINE
-A MINE -j ACCEPT
-I MINE -j DROP
-I MINE 2 -j RETURN
-A INPUT -j MINE
-A FORWARD -j DROP
-F FORWARD
COMMIT
"""
    ruleset = load(text)
    mine = ruleset.builders["filter"].chains["MINE"].rules
    assert [rule.verdict for rule in mine] == ["DROP", "RETURN", "ACCEPT"]
    assert ruleset.rule_counts() == {"filter": 4}
    filt = ruleset.tables["filter"]
    assert verdict(filt, entry_of(filt, "INPUT", "policy")) == L.VERDICT_DROP
    assert verdict(filt, entry_of(filt, "FORWARD", "policy")) == L.VERDICT_ACCEPT


def test_delete_all_user_chains():
    text = "*filter\n:A - [0:0]\n:B - [0:0]\n-A A -j B\n-F\n-X\nCOMMIT\n"
    assert load(text).chains("filter") == ["INPUT", "FORWARD", "OUTPUT"]


# ---- dump and round trips ------------------------------------------------------------------------

def assert_same_tables(one, other):
    assert one.tables.keys() == other.tables.keys()
    for name, table in one.tables.items():
        twin = other.tables[name]
        assert (table.blob == twin.blob).all(), name
        assert (table.hook_entry == twin.hook_entry).all() and (table.underflow == twin.underflow).all()
        assert table.chain_start == twin.chain_start
        assert (table.recent_names, table.nfacct_names) == (twin.recent_names, twin.nfacct_names)


def test_round_trip_through_dump(ruleset):
    again = load(dump(ruleset))
    assert_same_tables(ruleset, again)
    assert dump(again) == dump(ruleset)
    assert '--comment "ns1/svc1:p80 cluster IP"' in dump(ruleset)
    assert "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000" in dump(ruleset)


def test_round_trip_of_every_extension():
    text = """*filter
:INPUT DROP [0:0]
:X - [0:0]
-A INPUT ! -i lo+ -p tcp -m multiport --sports 1:3,9 -m state ! --state INVALID -j REJECT --reject-with tcp-rst
-A INPUT -p udp -m addrtype --src-type BROADCAST ! --dst-type MULTICAST,ANYCAST -j REJECT
-A INPUT -m comment --comment "it's \\"quoted\\"" -m mark --mark 0x1 -m recent --name "a b" --update --seconds 5 --rdest -j X
-A INPUT -m recent ! --remove -m nfacct --nfacct-name acct -m statistic --mode random ! --probability 0.25 -g X
-A X -p 200 -m mark ! --mark 7/0x0f -j RETURN
COMMIT
*nat
:POSTROUTING ACCEPT [0:0]
-A POSTROUTING -o eth0 -p tcp -j MASQUERADE --to-ports 1000-2000
-A POSTROUTING -p udp -j SNAT --to-source 192.0.2.1:53
-A POSTROUTING -j SNAT --to-source 192.0.2.2
-A POSTROUTING -j MARK --and-mark 0xff
COMMIT
"""
    first = load(text)
    assert_same_tables(first, load(dump(first)))
    assert dump(load(dump(first))) == dump(first)
    assert "--reject-with tcp-reset" in dump(first)
    assert "-m state ! --state INVALID" in dump(first)


PORT = st.integers(0, 65535)
FREE_TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), max_size=30)


def ports(draw) -> str:
    low, high = sorted((draw(PORT), draw(PORT)))
    return draw(st.sampled_from([str(low), f"{low}:{high}", f"{low}:", f":{high}"]))


def bang(draw) -> str:
    return draw(st.sampled_from(["", "! "]))


def address(draw) -> str:
    quad = ".".join(str(draw(st.integers(0, 255))) for _ in range(4))
    return quad + draw(st.sampled_from(["", f"/{draw(st.integers(0, 32))}"]))


def match_text(draw, module: str, proto: str | None) -> str:
    if module == "comment":
        text = draw(FREE_TEXT)
        return '--comment "' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if module == proto:
        return " ".join(draw(st.sampled_from([[], [f"{bang(draw)}--sport {ports(draw)}"],
                                              [f"{bang(draw)}--dport {ports(draw)}"]])))
    if module == "multiport":
        listed = draw(st.lists(PORT.map(str), min_size=1, max_size=15))
        return f"{bang(draw)}{draw(st.sampled_from(['--dports', '--sports', '--ports']))} {','.join(listed)}"
    if module == "statistic":
        return f"--mode random {bang(draw)}--probability {draw(st.floats(0, 1)):.10f}"
    if module == "mark":
        return f"{bang(draw)}--mark {draw(st.integers(0, 2**32 - 1))}/{hex(draw(st.integers(0, 2**32 - 1)))}"
    if module in ("conntrack", "state"):
        names = ["INVALID", "NEW", "RELATED", "ESTABLISHED", "UNTRACKED"] + (["SNAT", "DNAT"] if module == "conntrack" else [])
        option = "--ctstate" if module == "conntrack" else "--state"
        return f"{bang(draw)}{option} {','.join(draw(st.lists(st.sampled_from(names), min_size=1, max_size=3)))}"
    if module == "addrtype":
        types = st.lists(st.sampled_from(sorted(iptables._ADDRTYPE_NAMES)), min_size=1, max_size=3).map(",".join)
        return f"{bang(draw)}--src-type {draw(types)} {bang(draw)}--dst-type {draw(types)}"
    if module == "recent":
        mode = draw(st.sampled_from(["--set", "--rcheck", "--update", "--remove"]))
        timing = f" --seconds {draw(st.integers(1, 99999))} --reap" if mode in ("--rcheck", "--update") else ""
        name = draw(st.from_regex(r"[A-Za-z0-9_ .-]{1,20}", fullmatch=True).filter(lambda n: n not in (".", "..")))
        side = draw(st.sampled_from(["", " --rsource", " --rdest"]))
        return f'{bang(draw)}{mode}{timing} --name "{name}"{side} --mask {address(draw).split("/")[0]}'
    return f"--nfacct-name {draw(st.from_regex(r'[a-z_]{1,31}', fullmatch=True))}"


def target_text(draw, table: str, proto: str | None) -> str:
    port_proto = proto in ("tcp", "udp", "sctp")
    choices = ["", "-j ACCEPT", "-j DROP", "-j RETURN", "-j B", "-g B",
               f"-j MARK --{draw(st.sampled_from(['set-xmark', 'set-mark', 'or-mark', 'xor-mark', 'and-mark']))} "
               f"{hex(draw(st.integers(0, 2**32 - 1)))}"]
    endpoint = address(draw).split("/")[0] + (f":{draw(st.integers(1, 65535))}" if port_proto else "")
    if table == "nat":
        choices += [f"-j DNAT --to-destination {endpoint}", f"-j SNAT --to-source {endpoint}",
                    "-j MASQUERADE --random-fully" + (" --to-ports 100-200" if port_proto else "")]
    else:
        choices += ["-j REJECT", "-j REJECT --reject-with icmp-host-prohibited"]
        choices += ["-j REJECT --reject-with tcp-reset"] if proto == "tcp" else []
    return draw(st.sampled_from(choices))


@st.composite
def valid_rule(draw) -> tuple[str, str]:
    """(table, rule options) that iptables-restore accepts, in any mix of what the loader knows."""
    table = draw(st.sampled_from(["nat", "filter"]))
    proto = draw(st.sampled_from([None, "tcp", "udp", "sctp", "icmp", "47"]))
    words = []
    if proto:
        words.append(f"{bang(draw) if proto in ('icmp', '47') else ''}-p {proto}")
    for option in ("-s", "-d"):
        if draw(st.booleans()):
            words.append(f"{bang(draw)}{option} {address(draw)}")
    for option in ("-i", "-o"):
        if draw(st.booleans()):
            words.append(f"{bang(draw)}{option} {draw(st.from_regex(r'[a-z][a-z0-9]{0,8}[+]?', fullmatch=True))}")
    modules = ["comment", "statistic", "mark", "conntrack", "state", "addrtype", "recent", "nfacct"]
    modules += [proto, "multiport"] if proto in ("tcp", "udp", "sctp") else []
    for module in draw(st.lists(st.sampled_from(modules), max_size=4)):
        words.append(f"-m {module} {match_text(draw, module, proto)}")
    words = draw(st.permutations(words))
    return table, " ".join(words + [target_text(draw, table, proto)])


@settings(max_examples=150, derandomize=True, deadline=None)
@given(st.lists(valid_rule(), min_size=1, max_size=4))
def test_valid_rules_load_and_round_trip(rules):
    text = "".join(f"*{table}\n:A - [0:0]\n:B - [0:0]\n-A A {rule}\nCOMMIT\n" for table, rule in rules)
    first = load(text)
    assert_same_tables(first, load(dump(first)))
    assert dump(load(dump(first))) == dump(first)


# ---- --noflush partial syncs --------------------------------------------------------------------

def test_noflush_applies_a_partial_sync(ruleset):
    """ns1/svc1 lost endpoint 10.180.0.2; svc2's chains are not in the payload (KEP-3453)."""
    partial = f"""*filter
:KUBE-SERVICES - [0:0]
COMMIT
*nat
:KUBE-SERVICES - [0:0]
:{SVC1} - [0:0]
:{SEP1A} - [0:0]
:{SEP1B} - [0:0]
-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j {SVC1}
-A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 cluster IP" -m tcp -p tcp -d 172.30.0.42 --dport 80 -j {SVC2}
-A {SVC1} -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -j {SEP1A}
-A {SEP1A} -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80
-X {SEP1B}
COMMIT
"""
    after = load(partial, "partial.txt", base=ruleset, noflush=True)
    nat = after.builders["nat"].chains
    assert SEP1B not in nat and SEP1B not in after.chains("nat")
    assert len(nat["KUBE-SERVICES"].rules) == 2
    assert len(nat[SVC1].rules) == 1 and len(nat[SEP1A].rules) == 1
    assert len(nat[SVC2].rules) == 3 and len(nat[SEP2].rules) == 2  # not mentioned: kept
    assert len(nat["KUBE-POSTROUTING"].rules) == 3
    # KUBE-SERVICES 4 -> 2, SVC1 3 -> 1, SEP1A 2 -> 1, SEP1B 2 -> deleted.
    assert after.rule_counts() == {"filter": 7, "nat": 25 - 2 - 2 - 1 - 2}
    compiled = after.tables["nat"]
    assert verdict(compiled, entry(compiled, "KUBE-SERVICES", 2)) == compiled.chain_start[SVC2]
    # The base ruleset is untouched.
    assert ruleset.rule_counts() == {"filter": 8, "nat": 25}
    assert SEP1B in ruleset.builders["nat"].chains
    assert_same_tables(ruleset, load(KUBE_PROXY_PAYLOAD))


def test_without_noflush_a_table_in_the_payload_starts_empty(ruleset):
    after = load("*nat\n:KUBE-SERVICES - [0:0]\nCOMMIT\n", base=ruleset)
    assert after.chains("nat") == ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING", "KUBE-SERVICES"]
    assert after.rule_counts() == {"filter": 8, "nat": 0}
    assert after.tables["filter"] is ruleset.tables["filter"]


def test_noflush_creates_new_chains_and_keeps_policies():
    base = load("*filter\n:INPUT DROP [0:0]\n:OLD - [0:0]\n-A OLD -j ACCEPT\nCOMMIT\n")
    after = load("*filter\n:NEW - [0:0]\n-A INPUT -j NEW\n-A OLD -j DROP\nCOMMIT\n", base=base, noflush=True)
    chains = after.builders["filter"].chains
    assert [rule.verdict for rule in chains["OLD"].rules] == ["ACCEPT", "DROP"]
    assert chains["INPUT"].policy == "DROP"
    assert after.chains("filter")[-2:] == ["OLD", "NEW"]
    assert [rule.verdict for rule in base.builders["filter"].chains["OLD"].rules] == ["ACCEPT"]


def test_noflush_partial_sync_from_the_writer_equals_a_full_sync():
    """kube-proxy's own partial payload (changed services only, stale chains -X'd) applied to
    the previous full sync gives every chain the rules a full sync of the new state has."""
    before = generate(60, 3, 3, seed=1)
    after = copy.deepcopy(before)
    for endpoint_slice in after.slices[:10]:
        endpoint_slice.endpoints.pop()
    del after.slices[12]  # a service loses its endpoints: its chains go, a REJECT comes
    applied = load(write_partial(before, after), base=load(write_full(before)), noflush=True)
    full = load(write_full(after))

    def contents(ruleset):
        return {(table, name): [rule.text for rule in chain.rules]
                for table, builder in ruleset.builders.items() for name, chain in builder.chains.items()}
    assert contents(applied) == contents(full)
    assert applied.rule_counts() == full.rule_counts()


# ---- bad input: InputError at the right line, naming the option ----------------------------------

ERRORS = [
    # (payload, line, field, words in the message)
    ("-A A -j ACCEPT\n", 1, "", "before any *table"),
    ("*nat\n:A - [0:0]\n-A A -j NOWHERE\nCOMMIT\n", 3, "-j", "unknown target or chain 'NOWHERE'"),
    ("*nat\n:A - [0:0]\n-A A -g ACCEPT\nCOMMIT\n", 3, "-g", "unknown target or chain"),
    ("*nat\n:A - [0:0]\n-A A -j PREROUTING\nCOMMIT\n", 3, "-j", "built-in chain"),
    ("*nat\n:A - [0:0]\n-A A -j ACCEPT\n", 4, "COMMIT", "opened at line 1"),
    ("*nat\n:A - [0:0]\n*filter\nCOMMIT\n", 3, "", "COMMIT missing"),
    ("*nat\n:A - [0:0]\n:B - [0:0]\n-A A -j B\n-X B\nCOMMIT\n", 5, "B", "still referenced by rule 1 of A (line 4)"),
    ("*nat\n:B - [0:0]\n-A B -j ACCEPT\n-X B\nCOMMIT\n", 4, "B", "not empty"),
    ("*nat\n-X PREROUTING\nCOMMIT\n", 2, "PREROUTING", "built-in"),
    ("*nat\n-X GONE\nCOMMIT\n", 2, "-X", "no chain named 'GONE'"),
    ("*security\nCOMMIT\n", 1, "*security", "unknown table"),
    ("*nat\n:A - [0:0]\n-A A -m foo -j ACCEPT\nCOMMIT\n", 3, "-m", "unknown match '-m foo'"),
    ("*nat\n:A - [0:0]\n-A A -p tcp -m tcp --syn\nCOMMIT\n", 3, "--syn", "unknown option '--syn'"),
    ("*nat\n:A - [0:0]\n-A A --dport 80\nCOMMIT\n", 3, "--dport", "unknown option"),
    ("*nat\n:A - [0:0]\n-A A -j LOG --log-prefix x\nCOMMIT\n", 3, "-j", "unknown target or chain 'LOG'"),
    ("*nat\n:A - [0:0]\n-A A -p tcp --dport\nCOMMIT\n", 3, "--dport", "needs an argument"),
    ("*nat\n:A - [0:0]\n-A A -s\nCOMMIT\n", 3, "-s", "needs an argument"),
    ("*nat\n:A - [0:0]\n-A A -p tcp --dport 99999\nCOMMIT\n", 3, "--dport", "out of range"),
    ("*nat\n:A - [0:0]\n-A A -p tcp --dport 8_0\nCOMMIT\n", 3, "--dport", "not a port"),
    ("*nat\n:A - [0:0]\n-A A -p tcp --dport 90:80\nCOMMIT\n", 3, "--dport", "min > max"),
    ("*nat\n:A - [0:0]\n-A A -d 10.0.0.256\nCOMMIT\n", 3, "-d", "not an IPv4 address"),
    ("*nat\n:A - [0:0]\n-A A -s 10.0.0.0/33\nCOMMIT\n", 3, "-s", "not an IPv4 address"),
    ("*nat\n:A - [0:0]\n-A A -j DNAT --to-destination 10.0.0.1:x\nCOMMIT\n", 3, "--to-destination", "port"),
    ("*nat\n:A - [0:0]\n-A A -j DNAT --to-destination 10.0.0.1:80\nCOMMIT\n", 3, "-j DNAT", "-p tcp"),
    ("*nat\n:A - [0:0]\n-A A -p tcp -j DNAT\nCOMMIT\n", 3, "-j DNAT", "needs --to-destination"),
    ("*nat\n:A - [0:0]\n-A A -p tcp -j DNAT --to-destination 10.0.0.1-10.0.0.9\nCOMMIT\n", 3,
     "--to-destination", "ranges are not supported"),
    ("*filter\n:A - [0:0]\n-A A -p tcp -j DNAT --to-destination 10.0.0.1\nCOMMIT\n", 3, "-j DNAT", "nat table"),
    ("*nat\n:A - [0:0]\n-A A -j REJECT\nCOMMIT\n", 3, "-j REJECT", "filter table"),
    ("*nat\n:A - [0:0]\n-A A -j MARK\nCOMMIT\n", 3, "-j MARK", "needs --set-xmark"),
    ("*nat\n:A - [0:0]\n-A A -j MARK --or-mark 1 --and-mark 2\nCOMMIT\n", 3, "--and-mark", "conflicts"),
    ("*nat\n:A - [0:0]\n-A A -j MARK --set-mark 0x1ffffffff\nCOMMIT\n", 3, "--set-mark", "32 bits"),
    ("*nat\n:A - [0:0]\n-A A -m mark --mark 09\nCOMMIT\n", 3, "--mark", "not a number"),
    ("*nat\n:A - [0:0]\n-A A -s 10.0.0.1 !\nCOMMIT\n", 3, "!", "not followed by an option"),
    ("*nat\n:A - [0:0]\n-A A ! ! -s 10.0.0.1\nCOMMIT\n", 3, "!", "multiple"),
    ("*nat\n:A - [0:0]\n-A A ! -m comment --comment x\nCOMMIT\n", 3, "-m", "'!' is not allowed"),
    ("*nat\n:A - [0:0]\n-A A -m comment ! --comment x\nCOMMIT\n", 3, "--comment", "'!' is not allowed"),
    ("*nat\n:A - [0:0]\n-A A -m comment\nCOMMIT\n", 3, "-m comment", "needs --comment"),
    ("*nat\n:A - [0:0]\n-A A -m comment --comment \"unterminated\nCOMMIT\n", 3, '"', "unterminated quote"),
    ("*nat\n:A - [0:0]\n-A A -m comment --comment " + "x" * 256 + "\nCOMMIT\n", 3, "--comment", "255"),
    ("*nat\n:A - [0:0]\n-A A -m statistic --mode nth --every 2\nCOMMIT\n", 3, "--mode", "not supported"),
    ("*nat\n:A - [0:0]\n-A A -m statistic --mode random --probability 1.5\nCOMMIT\n", 3, "--probability",
     "between 0 and 1"),
    ("*nat\n:A - [0:0]\n-A A -m statistic --probability nan\nCOMMIT\n", 3, "--probability", "not a probability"),
    ("*nat\n:A - [0:0]\n-A A -m statistic --probability 0.5\nCOMMIT\n", 3, "-m statistic", "--mode random"),
    ("*nat\n:A - [0:0]\n-A A -m recent --name x\nCOMMIT\n", 3, "-m recent", "--set, --rcheck"),
    ("*nat\n:A - [0:0]\n-A A -m recent --set --rcheck\nCOMMIT\n", 3, "--rcheck", "conflicts"),
    ("*nat\n:A - [0:0]\n-A A -m recent --set --seconds 5\nCOMMIT\n", 3, "-m recent", "--rcheck or --update"),
    ("*nat\n:A - [0:0]\n-A A -m recent --rcheck --reap\nCOMMIT\n", 3, "-m recent", "--reap needs --seconds"),
    ("*nat\n:A - [0:0]\n-A A -m recent --set --name a/b\nCOMMIT\n", 3, "--name", "not a valid recent"),
    ("*nat\n:A - [0:0]\n-A A -m addrtype --dst-type LOCALE\nCOMMIT\n", 3, "--dst-type", "unknown address type"),
    ("*nat\n:A - [0:0]\n-A A -m conntrack --ctstate NEW,\nCOMMIT\n", 3, "--ctstate", "unknown state"),
    ("*nat\n:A - [0:0]\n-A A -m state --state DNAT\nCOMMIT\n", 3, "--state", "unknown state"),
    ("*nat\n:A - [0:0]\n-A A -m nfacct --nfacct-name " + "n" * 32 + "\nCOMMIT\n", 3, "--nfacct-name", "31"),
    ("*nat\n:A - [0:0]\n-A A -p tcp -m multiport --dports 1:20\nCOMMIT\n", 3, "--dports", "more than 15"),
    ("*nat\n:A - [0:0]\n-A A -m multiport --dports 80\nCOMMIT\n", 3, "-m multiport", "needs -p tcp"),
    ("*nat\n:A - [0:0]\n-A A -p udp -m tcp --dport 80\nCOMMIT\n", 3, "-m tcp", "needs -p tcp"),
    ("*nat\n:A - [0:0]\n-A A -p tcp -m tcp --dport 80 --dport 81\nCOMMIT\n", 3, "--dport", "repeats"),
    ("*nat\n:A - [0:0]\n-A A -s 1.1.1.1 -s 2.2.2.2\nCOMMIT\n", 3, "-s", "multiple -s"),
    ("*nat\n:A - [0:0]\n-A A -j ACCEPT -g A\nCOMMIT\n", 3, "-g", "multiple -j/-g"),
    ("*nat\n:A - [0:0]\n-A A ! -p all\nCOMMIT\n", 3, "-p", "never match"),
    ("*nat\n:A - [0:0]\n-A A -p gre\nCOMMIT\n", 3, "-p", "unknown protocol"),
    ("*nat\n-A OUTPUT -i eth0\nCOMMIT\n", 2, "-i", "OUTPUT"),
    ("*nat\n:A - [0:0]\n-A A -i eth/0\nCOMMIT\n", 3, "-i", "interface"),
    ("*nat\n:A - [0:0]\n-A A stray\nCOMMIT\n", 3, "stray", "unexpected argument"),
    ("*nat\n:A - [0:0]\n-A A -t filter\nCOMMIT\n", 3, "-t", "unknown option"),
    ("*nat\n-A MISSING -j ACCEPT\nCOMMIT\n", 2, "-A", "no chain named 'MISSING'"),
    ("*nat\n-A\nCOMMIT\n", 2, "-A", "needs a chain name"),
    ("*nat\n-D PREROUTING 1\nCOMMIT\n", 2, "-D", "unknown command"),
    ("*nat\n:A - [0:0]\n-I A 3 -j ACCEPT\nCOMMIT\n", 3, "-I", "position 3"),
    ("*nat\n:A - [0:0]\n:A - [0:0]\nCOMMIT\n", 3, "A", "already exists"),
    ("*nat\n:A ACCEPT [0:0]\nCOMMIT\n", 2, "A", "cannot have a policy"),
    ("*nat\n:PREROUTING REJECT [0:0]\nCOMMIT\n", 2, "PREROUTING", "ACCEPT or DROP"),
    ("*nat\n:A\nCOMMIT\n", 2, "", "chain line"),
    ("*nat\n:A - [x:0]\nCOMMIT\n", 2, "", "chain line"),
    ("*nat\n:ACCEPT - [0:0]\nCOMMIT\n", 2, "ACCEPT", "invalid chain name"),
    ("*nat\n:" + "C" * 29 + " - [0:0]\nCOMMIT\n", 2, "C" * 29, "invalid chain name"),
    ("*nat\n:-A - [0:0]\nCOMMIT\n", 2, "-A", "invalid chain name"),
    ("*nat\n[1:x] -A PREROUTING\nCOMMIT\n", 2, "", "bad counters"),
    ("*nat\n[1:2] :A - [0:0]\nCOMMIT\n", 2, "", "followed by a rule"),
    ("*nat\nGARBAGE\nCOMMIT\n", 2, "", "cannot parse"),
    ("*nat\n:A - [0:0]\n:B - [0:0]\n-A A -j B\n-A B -g A\nCOMMIT\n", 6, "COMMIT", "chain loop A -> B -> A"),
    ("*nat\n:A - [0:0]\n-A A -j A\nCOMMIT\n", 4, "COMMIT", "chain loop A -> A"),
]


@pytest.mark.parametrize("text, line, field, words", ERRORS)
def test_bad_input_names_line_and_option(text, line, field, words):
    with pytest.raises(InputError) as caught:
        load(text, "rules.txt")
    error = caught.value
    assert error.where == f"rules.txt:{line}"
    assert error.field == field
    assert words in error.message
    assert str(error).startswith(f"rules.txt:{line}: ")


def test_load_leaves_the_garbage_collector_as_it_was():
    assert gc.isenabled()
    load(KUBE_PROXY_PAYLOAD)
    with pytest.raises(InputError):
        load("*nat\n-A NOPE\n")
    assert gc.isenabled()


def test_load_file(tmp_path):
    good = tmp_path / "rules.txt"
    good.write_text(KUBE_PROXY_PAYLOAD)
    assert load_file(good).rule_counts() == {"filter": 8, "nat": 25}
    assert load_file(good).source == str(good)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"*nat\n# caf\xe9\nCOMMIT\n")
    cases = [(tmp_path / "missing.txt", "no such file"), (tmp_path, "directory"), (bad, "not UTF-8")]
    for path, words in cases:
        with pytest.raises(InputError) as caught:
            load_file(path)
        assert caught.value.where == str(path) and words in caught.value.message
    broken = tmp_path / "broken.txt"
    broken.write_text("*nat\n-A NOPE\nCOMMIT\n")
    with pytest.raises(InputError, match=f"{broken}:2"):
        load_file(broken)


# ---- fuzzing: bad input never escapes as anything but InputError --------------------------------

def load_or_input_error(text: str) -> None:
    try:
        ruleset = load(text, "fuzz")
    except InputError as error:
        assert error.where.startswith("fuzz:")
        return
    assert_same_tables(ruleset, load(dump(ruleset)))


FUZZ = settings(max_examples=300, derandomize=True, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
VALID_LINES = [line for line in KUBE_PROXY_PAYLOAD.splitlines() if line.startswith("-A")]
WORDS = sorted({word for line in VALID_LINES for word in line.split()} | {
    "!", "-s", "-d", "-p", "-i", "-o", "-m", "-j", "-g", "--dport", "--sport", "--ctstate", "--mark",
    "--probability", "--mode", "nth", "random", "--to-destination", "--set-xmark", "-X", "-F", "-N",
    "-I", "COMMIT", "*nat", "*filter", ":A", "-", "[0:0]", '"', "\\", "0x", "/", ":", "1:", "65536",
    "-1", "1e9", "0.5", "multiport", "--dports", "1:40", "recent", "--name", "--set", "--seconds",
    "--reap", "addrtype", "--src-type", "state", "--state", "mark", "--or-mark", "SNAT",
    "--to-source", "MASQUERADE", "--to-ports", "REJECT", "--reject-with", "udp", "sctp", "all",
    "eth+", "\u00e9", "\x00", "\ud800"})


@FUZZ
@given(st.text(max_size=200))
def test_arbitrary_text_only_raises_input_error(text):
    load_or_input_error(text)


@FUZZ
@given(st.lists(st.sampled_from(["*nat\n", "*filter\n", ":A - [0:0]\n", ":B - [0:0]\n", "-A A ", "-A B ",
                                 "-j A", "-j B", "-g A", "COMMIT\n", "\n", " ", '"', "!", "-p tcp ", "--dport 1",
                                 "-X A\n", "-X\n", "-F\n", "-I A 1 ", ":INPUT DROP [0:0]\n"]),
                max_size=40).map("".join))
def test_arbitrary_structure_only_raises_input_error(text):
    load_or_input_error(text)


@st.composite
def mutated_payload(draw):
    """The kube-proxy payload with a few of its rule lines' words deleted, repeated, swapped or
    replaced by other words iptables knows."""
    lines = KUBE_PROXY_PAYLOAD.splitlines()
    rules = st.sampled_from([i for i, line in enumerate(lines) if line.startswith("-A")])
    return mutate_words(draw, lines, rules, WORDS)


@FUZZ
@given(mutated_payload())
def test_mutated_rule_lines_only_raise_input_error(text):
    load_or_input_error(text)


@pytest.mark.parametrize("mix", ["realistic", "clusterip"])
def test_round_trip_of_what_the_writer_prints(mix):
    from bench.proxies.iptables import WriterOptions, rule_counts

    text = write_full(generate(60, 3, 5, seed=11, mix=mix), WriterOptions(include_jump_rules=True))
    first = load(text, source="writer")
    assert first.rule_counts() == rule_counts(text)
    again = load(dump(first), source="dump")
    for name, table in first.tables.items():
        assert table.blob.tobytes() == again.tables[name].blob.tobytes()


def test_equal_matches_are_one_object():
    text = ("*nat\n:A - [0:0]\n:B - [0:0]\n"
            "-A A -m statistic --mode random --probability 0.5 -j B\n"
            "-A A -m statistic --mode random --probability 0.5 -j B\n"
            "-A A -m statistic --mode random --probability 0.25 -j B\n"
            "-A B -p tcp -m multiport --dports 1,2 -j ACCEPT\n"
            "-A B -p tcp -m multiport --dports 1,2 -j ACCEPT\nCOMMIT\n")
    chains = load(text).builders["nat"].chains
    first, second, third = (rule.matches[0] for rule in chains["A"].rules)
    assert first is second and first is not third and first.args == {"mode": "random", "p31": 1 << 30}
    assert chains["B"].rules[0].matches[0] == chains["B"].rules[1].matches[0]  # a list: kept apart
