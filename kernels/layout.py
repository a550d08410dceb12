"""Binary layout shared by the iptables loader, the Cython kernel and its pure-Python twin.

A table is one contiguous ``uint8`` blob of entries at the kernel's real x86-64 struct sizes
(``../shared/docs/kernel-internals.md`` §1.1, §1.5). Each entry is a 112-byte header laid out
like ``struct ipt_entry``, then its matches (32-byte ``xt_entry_match`` header + payload),
then its target (32-byte ``xt_entry_target`` header + payload). Sizes are padded to 8 bytes
(XT_ALIGN). Where the kernel keeps a pointer we keep a small id in the same bytes, so the
stride through memory is the kernel's.

All multi-byte fields are little-endian; addresses are host-order uint32.
"""
import numpy as np

# ---- struct ipt_entry (112 B) -------------------------------------------------------------
ENTRY_SIZE = 112
E_SRC, E_DST, E_SMSK, E_DMSK = 0, 4, 8, 12  # u32 each
E_INIFACE, E_OUTIFACE, E_INMASK, E_OUTMASK = 16, 32, 48, 64  # 16 bytes each
E_PROTO = 80  # u16, 0 = any
E_FLAGS = 82  # u8: F_GOTO
E_INVFLAGS = 83  # u8: INV_* bits
E_TARGET_OFFSET = 88  # u16
E_NEXT_OFFSET = 90  # u16
E_RULE_INDEX = 96  # u32: index into the counters array (the kernel keeps a per-CPU pointer here)
E_MATCH_COUNT = 100  # u16: number of matches (the kernel finds them by walking to target_offset)

F_GOTO = 0x02  # IPT_F_GOTO
INV_VIA_IN, INV_VIA_OUT, INV_SRCIP, INV_DSTIP, INV_PROTO = 0x01, 0x02, 0x08, 0x10, 0x40

# ---- xt_entry_match / xt_entry_target headers (32 B) -------------------------------------
XT_HEADER = 32
X_SIZE = 0  # u16: total size including the header
X_KIND = 2  # u8: MATCH_* or TARGET_* id below
X_DATA = XT_HEADER  # payload starts here

# Match ids and total sizes (header + payload padded to 8).
MATCH_COMMENT, MATCH_TCP, MATCH_UDP, MATCH_SCTP = 1, 2, 3, 4
MATCH_STATISTIC, MATCH_MARK, MATCH_CONNTRACK, MATCH_ADDRTYPE = 5, 6, 7, 8
MATCH_RECENT, MATCH_NFACCT, MATCH_MULTIPORT = 9, 10, 11
MATCH_SET, MATCH_PHYSDEV, MATCH_IPVS = 12, 13, 14  # IPVS mode's iptables rules
MATCH_SIZES = {
    MATCH_COMMENT: 288,  # xt_comment_info: char comment[256], whatever the text length
    MATCH_TCP: 48,  # xt_tcp 12 B -> 16
    MATCH_UDP: 48,  # xt_udp 10 B -> 16
    MATCH_SCTP: 104,  # xt_sctp_info 68 B -> 72 (derived from the uapi layout)
    MATCH_STATISTIC: 56,  # xt_statistic_info 24 B
    MATCH_MARK: 48,  # xt_mark_mtinfo1 12 B -> 16
    MATCH_CONNTRACK: 200,  # xt_conntrack_mtinfo3 162 B -> 168 (derived)
    MATCH_ADDRTYPE: 40,  # xt_addrtype_info_v1 8 B
    MATCH_RECENT: 264,  # xt_recent_mtinfo_v1 228 B -> 232 (derived)
    MATCH_NFACCT: 72,  # xt_nfacct_match_info: name[32] + pointer
    MATCH_MULTIPORT: 80,  # xt_multiport_v1 48 B
    # xt_set_info_match_v4 48 B [measured]: what iptables picks on kernels >= 4.x (rev 3 is
    # also 48 B on x86-64). The set itself is a kernels.hashset object handed to the Table.
    MATCH_SET: 80,
    MATCH_PHYSDEV: 104,  # xt_physdev_info 66 B -> 72 [measured]
    MATCH_IPVS: 72,  # xt_ipvs_mtinfo 40 B [measured]
}

TARGET_STANDARD, TARGET_ERROR, TARGET_REJECT, TARGET_DNAT = 1, 2, 3, 4
TARGET_SNAT, TARGET_MASQUERADE, TARGET_MARK = 5, 6, 7
TARGET_SIZES = {
    TARGET_STANDARD: 40,  # xt_standard_target: int verdict (jump, goto, ACCEPT, DROP, RETURN)
    TARGET_ERROR: 64,  # xt_error_target: chain head carrying the name
    TARGET_REJECT: 40,  # ipt_reject_info
    TARGET_DNAT: 80,  # nf_nat_range2 44 B -> 48
    TARGET_SNAT: 80,
    TARGET_MASQUERADE: 56,  # nf_nat_ipv4_multi_range_compat
    TARGET_MARK: 40,  # xt_mark_tginfo2
}

# ---- match payloads (offsets relative to the match start) ---------------------------------
# tcp/udp/sctp: u16 spts[2], u16 dpts[2], u8 invflags (bit 0x01 sport, 0x02 dport)
P_SPT_LO, P_SPT_HI, P_DPT_LO, P_DPT_HI, P_PORT_INV = 32, 34, 36, 38, 40
PORT_INV_SRC, PORT_INV_DST = 0x01, 0x02
# statistic: u32 p31 (probability as 31-bit fixed point); u8 invert
STAT_P31, STAT_INVERT = 32, 36
# mark: u32 mark, u32 mask, u8 invert
MARK_VALUE, MARK_MASK, MARK_INVERT = 32, 36, 40
# conntrack: u16 state_mask, u8 invert
CT_STATE_MASK, CT_INVERT = 32, 34
# addrtype: u16 source types, u16 dest types, u8 flags (ADDRTYPE_INV_*)
AT_SOURCE, AT_DEST, AT_FLAGS = 32, 34, 36
# Type bits are 1 << RTN_* as in uapi xt_addrtype.h (XT_ADDRTYPE_LOCAL is 1 << RTN_LOCAL = 4).
ADDRTYPE_UNICAST, ADDRTYPE_LOCAL, ADDRTYPE_BROADCAST, ADDRTYPE_MULTICAST = 0x0002, 0x0004, 0x0008, 0x0020
ADDRTYPE_INV_SOURCE, ADDRTYPE_INV_DEST = 0x01, 0x02
# recent: u32 seconds, u8 mode (RECENT_*), u8 reap, u8 invert, u16 table id (index of the name)
RC_SECONDS, RC_MODE, RC_REAP, RC_INVERT, RC_TABLE = 32, 36, 37, 38, 40
RECENT_CHECK, RECENT_SET, RECENT_UPDATE, RECENT_REMOVE = 1, 2, 3, 4
# nfacct: u16 accounting object id
NFACCT_ID = 32
# multiport: u8 flags (MP_SRC/MP_DST/MP_ANY), u8 count, u8 invert, u16 ports[15] at +36
MP_FLAGS, MP_COUNT, MP_INVERT, MP_PORTS = 32, 33, 34, 36
MP_SRC, MP_DST, MP_ANY = 1, 2, 3
MP_MAX_PORTS = 15
# set (struct xt_set_info at the start of xt_set_info_match_v4): u16 set id (index into the
# table's set_names, where the kernel keeps ipset's index), u8 dim (1..6 dimensions), u8 flags:
# bit 0 inverts the match, bit d (1..6) takes dimension d from the packet's source, else its
# destination (IPSET_INV_MATCH, IPSET_DIM_*_SRC in uapi ip_set.h).
SET_ID, SET_DIM, SET_FLAGS = 32, 34, 35
SET_INVERT = 0x01
SET_DIM_MAX = 6
# The ipset types a Table's sets model (kernels/ipsets.py tells them apart by class and key
# layout), and the number of dimensions of each, which a match's dim must reach.
SETTYPE_BITMAP_PORT, SETTYPE_IP, SETTYPE_IP_PORT, SETTYPE_IP_PORT_IP, SETTYPE_IP_PORT_NET = 0, 1, 2, 3, 4
SETTYPE_DIMENSIONS = (1, 1, 2, 3, 3)
# physdev (xt_physdev_info): interface names and masks at +32, +48 (in), +64, +80 (out), then
# u8 invert and u8 bitmask, both of PHYSDEV_* bits (XT_PHYSDEV_OP_*).
PHYSDEV_IN_NAME, PHYSDEV_OUT_NAME, PHYSDEV_INVERT, PHYSDEV_BITMASK = 32, 64, 96, 97
PHYSDEV_IN, PHYSDEV_OUT, PHYSDEV_BRIDGED, PHYSDEV_ISIN, PHYSDEV_ISOUT = 0x01, 0x02, 0x04, 0x08, 0x10
# ipvs (xt_ipvs_mtinfo): u32 vaddr at +32 and vmask at +48 (16-byte unions in the kernel),
# u16 vport, u8 l4proto, u8 fwd_method, u16 vportctl, u8 invert, u8 bitmask (IPVS_* bits).
IPVS_VADDR, IPVS_VMASK, IPVS_VPORT, IPVS_L4PROTO, IPVS_INVERT, IPVS_BITMASK = 32, 48, 64, 66, 70, 71
IPVS_PROPERTY, IPVS_PROTO, IPVS_ADDR, IPVS_PORT = 0x01, 0x02, 0x04, 0x08

# ---- target payloads ----------------------------------------------------------------------
# standard: i32 verdict. >= 0: blob offset to jump to; < 0: -(NF_x) - 1; RETURN below.
T_VERDICT = 32
# DNAT/SNAT: u32 ip, u16 port (0 = keep)
T_NAT_IP, T_NAT_PORT = 32, 36
# MARK: u32 mark, u32 mask -> packet.mark = (packet.mark & ~mask) ^ mark
T_MARK_VALUE, T_MARK_MASK = 32, 36
# MASQUERADE: u8 random_fully

# Netfilter verdicts.
NF_DROP, NF_ACCEPT = 0, 1
XT_RETURN = -5  # -NF_REPEAT - 1
VERDICT_ACCEPT = -NF_ACCEPT - 1  # -2
VERDICT_DROP = -NF_DROP - 1  # -1
# A rule without a target gets a standard target whose verdict is the offset of the next entry
# (a fall-through jump: the kernel does not push it). MARK returns XT_CONTINUE: go on.

# Final verdict codes the kernels report per packet.
V_ACCEPT, V_DROP, V_REJECT, V_DNAT, V_SNAT, V_MASQUERADE = 0, 1, 2, 3, 4, 5
VERDICT_NAMES = ["ACCEPT", "DROP", "REJECT", "DNAT", "SNAT", "MASQUERADE"]

# Conntrack states for the ctstate match (XT_CONNTRACK_STATE_BIT and friends).
CT_INVALID, CT_ESTABLISHED, CT_RELATED, CT_NEW = 0x01, 0x02, 0x04, 0x08
CT_SNAT, CT_DNAT, CT_UNTRACKED = 0x100, 0x200, 0x400
CT_STATE_NAMES = {
    "INVALID": CT_INVALID, "ESTABLISHED": CT_ESTABLISHED, "RELATED": CT_RELATED, "NEW": CT_NEW,
    "SNAT": CT_SNAT, "DNAT": CT_DNAT, "UNTRACKED": CT_UNTRACKED,
}

# Hooks, in the kernel's numbering (NF_INET_*).
HOOK_PREROUTING, HOOK_INPUT, HOOK_FORWARD, HOOK_OUTPUT, HOOK_POSTROUTING = 0, 1, 2, 3, 4
HOOK_NAMES = ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"]
TABLE_HOOKS = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "raw": ("PREROUTING", "OUTPUT"),
}

# ---- packets in and results out (one numpy record per packet) -------------------------------
PACKET_DTYPE = np.dtype([
    ("src", "<u4"), ("dst", "<u4"),
    ("sport", "<u2"), ("dport", "<u2"),
    ("proto", "u1"), ("pad0", "u1"), ("ctstate", "<u2"),
    ("mark", "<u4"), ("length", "<u4"),
    ("time", "<u4"),  # seconds, for -m recent
    ("iif", "S16"), ("oif", "S16"),
])  # 60 bytes, packed

RESULT_DTYPE = np.dtype([
    ("verdict", "u1"), ("pad0", "u1"), ("dnat_port", "<u2"),
    ("dnat_ip", "<u4"),
    ("mark", "<u4"),
    ("entries_visited", "<u4"), ("match_calls", "<u4"), ("target_calls", "<u4"),
    ("jumps", "<u4"), ("rng_draws", "<u4"),
    ("bytes_touched", "<u8"),
    ("set_probes", "<u4"), ("set_compares", "<u4"),  # -m set work (kernels/iptables.pyx)
])  # 48 bytes, packed

WORK_COUNTERS = ("entries_visited", "match_calls", "target_calls", "jumps", "rng_draws", "bytes_touched",
                 "set_probes", "set_compares")


# ---- kernel allocation sizes (for the memory models) ----------------------------------------

def kmalloc_size(size: int) -> int:
    """Bytes kmalloc really hands out for ``size``: the slab classes up to 8 KiB (kmalloc-8 …
    kmalloc-96, kmalloc-192, powers of two), above that whole power-of-two page runs."""
    if size <= 0:
        return 0
    for size_class in (8, 16, 32, 64, 96, 128, 192):
        if size <= size_class:
            return size_class
    return 1 << (size - 1).bit_length()


# ---- set keys: ipset elements and nftables concatenations (kernel byte order) ---------------
# The hashset kernel hashes and compares these bytes as they are. ipset's elements are the
# kernel's struct hash_*4_elem (addresses and ports in network order); nft concatenations pad
# every field to 4 bytes (NFT_REG32). All packers take equal-length sequences (or scalars) and
# return a C-contiguous uint8 array, one key per row.
_IPSET_IP = np.dtype([("ip", ">u4")])
_IPSET_IP_PORT = np.dtype([("ip", ">u4"), ("port", ">u2"), ("proto", "u1"), ("pad", "u1")])
_IPSET_IP_PORT_IP = np.dtype([("ip", ">u4"), ("ip2", ">u4"), ("port", ">u2"), ("proto", "u1"),
                              ("pad", "u1")])
# hash:ip,port,net: ip2 is the network (masked), then `u8 cidr:7, nomatch:1` holding cidr - 1.
_IPSET_IP_PORT_NET = np.dtype([("ip", ">u4"), ("ip2", ">u4"), ("port", ">u2"), ("cidr", "u1"),
                               ("proto", "u1")])
IPSET_NET_OFFSET, IPSET_CIDR_OFFSET = 4, 10  # where hash:ip,port,net keeps ip2 and cidr - 1
_NFT_ADDR_PROTO_PORT = np.dtype([("addr", ">u4"), ("proto", "u1"), ("pad0", "u1", 3),
                                 ("port", ">u2"), ("pad1", "u1", 2)])


def _pack_keys(dtype: np.dtype, **fields) -> np.ndarray:
    columns = np.broadcast_arrays(*(np.atleast_1d(np.asarray(v)) for v in fields.values()))
    records = np.zeros(columns[0].shape[0], dtype=dtype)
    for name, column in zip(fields, columns):
        records[name] = column
    return records.view(np.uint8).reshape(len(records), dtype.itemsize)


def netmask(cidr) -> np.ndarray:
    cidr = np.asarray(cidr, dtype=np.uint64)
    return ((0xFFFFFFFF << (32 - cidr)) & 0xFFFFFFFF).astype(np.uint32)


def ipset_key_ip(ips) -> np.ndarray:
    """hash:ip (struct hash_ip4_elem): the address, 4 bytes."""
    return _pack_keys(_IPSET_IP, ip=ips)


def ipset_key_ip_port(ips, protos, ports) -> np.ndarray:
    """hash:ip,port (struct hash_ipport4_elem): ip, port, proto, padding: 8 bytes."""
    return _pack_keys(_IPSET_IP_PORT, ip=ips, port=ports, proto=protos)


def ipset_key_ip_port_ip(ips, protos, ports, ips2) -> np.ndarray:
    """hash:ip,port,ip (struct hash_ipportip4_elem): ip, ip2, port, proto, padding: 12 bytes."""
    return _pack_keys(_IPSET_IP_PORT_IP, ip=ips, ip2=ips2, port=ports, proto=protos)


def ipset_key_ip_port_net(ips, protos, ports, nets, cidrs=32) -> np.ndarray:
    """hash:ip,port,net (struct hash_ipportnet4_elem): ip, net & mask, port, cidr - 1, proto.

    For a lookup pass the packet's address as ``nets`` (cidr 32): the set masks it with each
    prefix length it holds."""
    return _pack_keys(_IPSET_IP_PORT_NET, ip=ips, ip2=np.asarray(nets, np.uint32) & netmask(cidrs),
                      port=ports, cidr=np.asarray(cidrs) - 1, proto=protos)


def nft_key_addr_proto_port(addrs, protos, ports) -> np.ndarray:
    """``ip daddr . meta l4proto . th dport``: three fields each padded to 4 bytes, 12 bytes."""
    return _pack_keys(_NFT_ADDR_PROTO_PORT, addr=addrs, proto=protos, port=ports)


# ---- IPVS (kernels/ipvs.pyx; kernel-internals §2, §6.3) -------------------------------------
# Schedulers by code (the `scheduler` field of IPVS_SERVICE_DTYPE).
IPVS_SCHEDULERS = ("rr", "wrr", "lc", "dh", "sh", "sed", "nq", "mh", "wlc")
# Service flags (uapi ip_vs.h IP_VS_SVC_F_*): SCHED1 is sh/mh "fallback", SCHED2 sh/mh "port".
IP_VS_SVC_F_PERSISTENT, IP_VS_SVC_F_ONEPACKET = 0x0001, 0x0004
IP_VS_SVC_F_SCHED_FALLBACK, IP_VS_SVC_F_SCHED_PORT = 0x0008, 0x0010
# Destination flags (IP_VS_DEST_F_*): a removed destination loses AVAILABLE.
IP_VS_DEST_F_AVAILABLE, IP_VS_DEST_F_OVERLOAD = 0x0001, 0x0002

IPVS_SERVICE_DTYPE = np.dtype([
    ("addr", "<u4"), ("port", "<u2"), ("proto", "u1"), ("scheduler", "u1"),
    ("flags", "<u4"), ("fwmark", "<u4"),
    ("timeout", "<u4"),  # persistence timeout, seconds (kube-proxy: stickyMaxAgeSeconds)
    ("netmask", "<u4"),  # persistence granularity (ipvsadm -M; 255.255.255.255 by default)
])
IPVS_DEST_DTYPE = np.dtype([
    ("service", "<i4"),  # index of the service it belongs to
    ("addr", "<u4"), ("port", "<u2"), ("pad0", "<u2"),
    ("weight", "<i4"), ("activeconns", "<i4"), ("inactconns", "<i4"),
    ("flags", "<u4"),  # IP_VS_DEST_F_OVERLOAD may be set; AVAILABLE is the model's business
])
# One connection slot of the model (connections and persistence templates share the table).
IPVS_CONN_DTYPE = np.dtype([
    ("next", "<i4"), ("dest", "<i4"), ("control", "<i4"), ("n_control", "<i4"),
    ("caddr", "<u4"), ("vaddr", "<u4"), ("daddr", "<u4"),
    ("cport", "<u2"), ("vport", "<u2"), ("dport", "<u2"),
    ("proto", "u1"), ("flags", "u1"),  # IPVS_CONN_* below
    ("expires", "<u4"),  # seconds: when the connection's timer fires
])
IPVS_CONN_TEMPLATE, IPVS_CONN_INACTIVE, IPVS_CONN_IN_USE = 0x01, 0x02, 0x04

# Per-packet verdicts of kernels.ipvs.IPVS.process.
IPVS_FORWARD = 0  # forwarded (masquerade) to the real server dnat_ip:dnat_port
IPVS_NOT_SERVICE = 1  # no virtual service (or not TCP/UDP/SCTP): accepted untouched
IPVS_NO_DEST = 2  # the scheduler found no destination: ICMP unreachable and dropped
IPVS_NO_CONN = 3  # no connection and not a first packet: accepted untouched
IPVS_DEST_GONE = 4  # the connection's real server was removed: dropped, connection expired
IPVS_VERDICT_NAMES = ["FORWARD", "NOT_SERVICE", "NO_DEST", "NO_CONN", "DEST_GONE"]

IPVS_RESULT_DTYPE = np.dtype([
    ("verdict", "u1"), ("conn_hit", "u1"), ("dnat_port", "<u2"),
    ("dnat_ip", "<u4"),
    ("service", "<i4"), ("dest", "<i4"),  # -1 when none
    ("svc_compares", "<u4"), ("conn_compares", "<u4"), ("dests_examined", "<u4"),
    ("conns_created", "<u4"), ("timer_rearms", "<u4"), ("hash_computations", "<u4"),
])  # 40 bytes, packed
IPVS_WORK_COUNTERS = ("svc_compares", "conn_compares", "dests_examined", "conns_created",
                      "timer_rearms", "hash_computations")


# ---- nftables (kernels/nftblob.py, kernels/nftables.pyx; kernel-internals §3, §6.4) ----------
# A chain's rule blob: per rule an 8-byte nft_rule_dp header (u16 dlen, u8 is_last, pad, u32
# handle), then its expressions as fixed 16-byte slots (u8 op, u8 reg, u8 len, u8 flags, u32 a,
# b, c). The chain ends with an is_last header.
NFT_RULE_DP_BYTES = 8
NFT_OP_BYTES = 16
NFT_DP_DLEN, NFT_DP_IS_LAST, NFT_DP_HANDLE = 0, 2, 4
NFT_OP_KIND, NFT_OP_REG, NFT_OP_LEN, NFT_OP_FLAGS, NFT_OP_A, NFT_OP_B, NFT_OP_C = 0, 1, 2, 3, 4, 8, 12
NFT_REGS = 16  # NFT_REG32_00 … NFT_REG32_15
NFT_JUMP_STACK_SIZE = 16

# Expression ops. a/b/c per op: PAYLOAD a = NFT_FIELD_*; META a = NFT_META_*; CMP (reg & b) vs a
# over len bytes; RANGESET a = anonymous set; LOOKUP a = named set, len = key bytes; HMAP_VMAP
# a = anonymous map; NUMGEN a = mod, b = offset; FIB_LOCAL a = NFT_FIELD_*; MARK_SET mark =
# (mark & a) ^ b; DNAT a = address, b = port (0 keeps it); DYNSET a = set, b = timeout (s);
# VERDICT a = verdict code (kind << 24 | chain).
NFT_OP_PAYLOAD, NFT_OP_META, NFT_OP_CMP, NFT_OP_RANGESET, NFT_OP_LOOKUP = 1, 2, 3, 4, 5
NFT_OP_HMAP_VMAP, NFT_OP_NUMGEN, NFT_OP_FIB_LOCAL, NFT_OP_CT_STATE, NFT_OP_MARK_SET = 6, 7, 8, 9, 10
NFT_OP_DNAT, NFT_OP_MASQUERADE, NFT_OP_DYNSET, NFT_OP_COUNTER, NFT_OP_VERDICT = 11, 12, 13, 14, 15
NFT_OP_NAMES = {1: "payload", 2: "meta", 3: "cmp", 4: "rangeset", 5: "lookup", 6: "hmap_vmap",
                7: "numgen", 8: "fib", 9: "ct", 10: "mark_set", 11: "dnat", 12: "masq",
                13: "dynset", 14: "counter", 15: "immediate"}
# NFT_EXPR_SIZE of each op on x86-64: 8-byte ops pointer + private data rounded up to 8
# (derived from the 6.x struct layouts; [mock] where not measured). Folded ops count every
# expression they stand for: MARK_SET = meta load 16 + bitwise 56 + meta set 16; CMP is
# nft_cmp_fast_expr (≤ 4 bytes); RANGESET and LOOKUP are nft_lookup; HMAP_VMAP is nft_lookup
# too; VERDICT is nft_immediate_expr (16-byte nft_data) or, for reject, nft_reject.
NFT_EXPR_BYTES = {NFT_OP_PAYLOAD: 16, NFT_OP_META: 16, NFT_OP_CMP: 24, NFT_OP_RANGESET: 48,
                  NFT_OP_LOOKUP: 48, NFT_OP_HMAP_VMAP: 48, NFT_OP_NUMGEN: 24, NFT_OP_FIB_LOCAL: 24,
                  NFT_OP_CT_STATE: 16, NFT_OP_MARK_SET: 88, NFT_OP_DNAT: 24, NFT_OP_MASQUERADE: 16,
                  NFT_OP_DYNSET: 88, NFT_OP_COUNTER: 16, NFT_OP_VERDICT: 32}
NFT_F_NEQ, NFT_F_VMAP, NFT_F_TIMEOUT = 0x01, 0x02, 0x04
NFT_FIELD_SADDR, NFT_FIELD_DADDR, NFT_FIELD_SPORT, NFT_FIELD_DPORT = 1, 2, 3, 4
NFT_META_L4PROTO, NFT_META_MARK = 1, 2
# Verdict kinds (the top byte of a verdict code); NFT_V_NONE: the rule did not decide.
NFT_V_NONE, NFT_V_ACCEPT, NFT_V_DROP, NFT_V_REJECT, NFT_V_JUMP = 0, 1, 2, 3, 4
NFT_V_GOTO, NFT_V_RETURN, NFT_V_CONTINUE, NFT_V_BREAK = 5, 6, 7, 8
# Kernel struct sizes for modelled_bytes (kernel-internals §3.6).
NFT_RULE_BYTES, NFT_SET_BYTES, NFT_HASH_ELEM_BYTES, NFT_RBTREE_ELEM_BYTES = 24, 256, 32, 40
NFT_VERDICT_DATA_BYTES = 16

# Per-packet result of kernels.nftables.Ruleset.run: RESULT_DTYPE's verdict (V_*), NAT and mark
# fields and nft's work counters (kernel-internals §6.1).
NFT_RESULT_DTYPE = np.dtype([
    ("verdict", "u1"), ("masquerade", "u1"), ("dnat_port", "<u2"),
    ("dnat_ip", "<u4"),
    ("mark", "<u4"),
    ("entries_visited", "<u4"),  # nft rules started
    ("expressions", "<u4"), ("set_lookups", "<u4"), ("bucket_entries_compared", "<u4"),
    ("jumps", "<u4"), ("rng_draws", "<u4"),
])  # 36 bytes, packed
NFT_WORK_COUNTERS = ("entries_visited", "expressions", "set_lookups", "bucket_entries_compared",
                     "jumps", "rng_draws")


# ---- eBPF service maps (kernels/ebpf.pyx): a Cilium-like REFERENCE MODEL, not kube-proxy -----
# One service-map entry as the loader hands it to the kernel, in insertion order. Cilium's
# struct lb4_key (address, dport, backend_slot, proto, scope) and struct lb4_service (backend_id
# or count, rev_nat_index): slot 0 is a frontend's master entry holding ``count``, slots
# 1..count hold the backend ids.
EBPF_SERVICE_DTYPE = np.dtype([
    ("addr", "<u4"), ("port", "<u2"), ("slot", "<u2"), ("proto", "u1"), ("pad", "u1", 3),
    ("backend_id", "<u4"),  # slots 1..count; 0 in the master entry
    ("count", "<u2"),  # the master entry's number of backends; 0 in slot entries
    ("pad1", "<u2"),
    ("rev_nat", "<u4"),  # the frontend's reverse-NAT index (Cilium's service id)
])  # 24 bytes, packed
# One backend-map entry: Cilium's backend id -> struct lb4_backend (address, port, proto).
EBPF_BACKEND_DTYPE = np.dtype([("id", "<u4"), ("addr", "<u4"), ("port", "<u2"), ("proto", "u1"),
                               ("pad", "u1")])  # 12 bytes, packed

EBPF_ALGORITHMS = ("random", "maglev")  # Cilium's bpf-lb-algorithm values
EBPF_SERVICE_MAX_ENTRIES = 65536  # Cilium's bpf-lb-map-max default (service and backend maps)
EBPF_CT_MAX_ENTRIES = 524288  # Cilium's bpf-ct-global-tcp-max default
EBPF_MAGLEV_TABLE_SIZE = 16381  # Cilium's bpf-lb-maglev-table-size default (a prime)
E2BIG = 7  # errno of bpf_map_update_elem on a full preallocated hash map

# Per-packet verdicts of kernels.ebpf.ServiceMaps.process.
EBPF_FORWARD = 0  # DNAT to the backend dnat_ip:dnat_port
EBPF_NOT_SERVICE = 1  # no frontend (or not TCP/UDP/SCTP): passed on untouched
EBPF_NO_BACKEND = 2  # a frontend with no backends: dropped (Cilium's DROP_NO_SERVICE)
EBPF_CT_FULL = 3  # the connection-tracking map is full: dropped (DROP_CT_CREATE_FAILED)
EBPF_VERDICT_NAMES = ["FORWARD", "NOT_SERVICE", "NO_BACKEND", "CT_FULL"]

EBPF_RESULT_DTYPE = np.dtype([
    ("verdict", "u1"), ("ct_hit", "u1"), ("dnat_port", "<u2"),
    ("dnat_ip", "<u4"),
    ("rev_nat", "<i4"),  # the frontend's rev_nat index, -1 when none
    ("backend_id", "<u4"),  # 0 when none (Cilium's ids start at 1)
    ("backend_slot", "<u4"),  # random: the service-map slot; maglev: the table index
    ("map_lookups", "<u4"),  # hash-map lookups (and Maglev's array lookup); inserts apart
    ("bucket_compares", "<u4"),  # hash-map elements compared, every map, inserts included
    ("ct_compares", "<u4"),  # the part of bucket_compares in the connection-tracking map
    ("hash_computations", "<u4"), ("ct_inserts", "<u4"), ("rng_draws", "<u4"),
])  # 44 bytes, packed
EBPF_WORK_COUNTERS = ("map_lookups", "bucket_compares", "ct_compares", "hash_computations", "ct_inserts",
                      "rng_draws")


# ---- iptables-nft (bench/loaders/iptables_nft.py): nft_compat's xt expressions ---------------
# What iptables-nft cannot say natively it stores as nft_compat ``match`` / ``target``
# expressions wrapping the xt extension (statistic, conntrack, addrtype, recent, multiport,
# set, …; DNAT, MASQUERADE, MARK, REJECT). The model keeps the xt data where the legacy
# kernel's Table has it: a = the legacy entry's offset, b = the match's index in the entry, c =
# the match's (or target's) byte offset in that Table's blob; the nft kernels call that Table's
# own match/target code, so both backends share one implementation and one RNG stream.
NFT_OP_XT_MATCH, NFT_OP_XT_TARGET = 16, 17
NFT_OP_NAMES.update({NFT_OP_XT_MATCH: "match", NFT_OP_XT_TARGET: "target"})
# NFT_EXPR_SIZE of a compat expression is 8 + the xt info, so it varies by extension; these
# are kube-proxy's commonest: xt_statistic_info (24 B) and DNAT's nf_nat_range2 (48 B).
NFT_EXPR_BYTES.update({NFT_OP_XT_MATCH: 32, NFT_OP_XT_TARGET: 56})
