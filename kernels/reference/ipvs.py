"""Pure-Python twin of kernels/ipvs.pyx: IPVS services, schedulers and connections.

Same API, results and counters as the Cython kernel (kernel-internals §2, §6.3); the compiled
module's docstring describes the model in full. In short: two fixed 256-chain service tables
(ip_vs_svc_hashkey ``(proto ^ addr ^ (port >> 8) ^ port) & 255`` and ``fwmark & 255``, netns term
0, new services at the head, lookup order fwmark → ⟨proto, addr, port⟩ → port-0 catch-all, no FTP
fallback); destinations in the kernel's list order (add_dest puts the new one first); the
rr, wrr, lc, dh, sh, sed, nq, mh and wlc schedulers with their rebuild costs in ``sched_ops``; a
``2^conn_tab_bits``-chain connection table hashed by ``jhash_3words(caddr, cport, proto, rnd)``
over network-order values, new connections at the head, persistence templates in the same
table; timers fired by ``expire(now)``.
"""
from __future__ import annotations

import time

import numpy as np

from kernels import layout as L
from kernels.reference.hashing import M32, SplitMix64, hash_32, hsiphash_u32, jhash_3words

SVC_TAB_SIZE = 256
SVC_TAB_MASK = 255
SCHED_TAB_SIZE = 256  # dh and sh
DEFAULT_CONN_TAB_BITS = 12
MH_TAB_SIZE = 4093
MH_TAB_BITS = 6  # IP_VS_MH_TAB_BITS = CONFIG_IP_VS_MH_TAB_INDEX / 2
MH_HASH1 = (2654435761, 2654435761)  # generate_hash_secret's fixed hsiphash keys
MH_HASH2 = (2654435801, 2654435761)
HEAD = -1  # a cursor at the list head
FTPPORT = 21
IPPROTO_IP, IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP = 0, 6, 17, 132
TCP_SYN_RECV_TIMEOUT, TCP_ESTABLISHED_TIMEOUT, UDP_TIMEOUT = 60, 900, 300
INITIAL_CONNECTIONS = 1024
# Modelled kernel memory (kernel-internals §2.5).
IP_VS_SERVICE_BYTES = 512  # struct ip_vs_service, 448 B, kmalloc-512
IP_VS_DEST_BYTES = 512  # struct ip_vs_dest, 472 B, kmalloc-512
IP_VS_CONN_BYTES = 320  # struct ip_vs_conn, 288 B, in a SLAB_HWCACHE_ALIGN slab
IP_VS_CPU_STATS_BYTES = 40  # per CPU, per service and per destination
BUCKET_BYTES = 8  # hlist_head
SCHED_STATE_BYTES = {  # kmalloc-rounded scheduler state per service
    "rr": 0, "lc": 0, "sed": 0, "nq": 0, "wlc": 0,  # rr's state is the list head itself
    "wrr": L.kmalloc_size(40),  # struct ip_vs_wrr_mark
    "dh": L.kmalloc_size(16 + 256 * 8),  # rcu_head + 256 bucket pointers: 2064 B, kmalloc-4096
    "sh": L.kmalloc_size(16 + 256 * 8),
    "mh": L.kmalloc_size(72) + L.kmalloc_size(MH_TAB_SIZE * 8),  # ip_vs_mh_state + lookup[M]
}
# Record sizes of the compiled kernel's arrays, so that model_bytes() agrees with it.
SVC_RECORD_BYTES, DEST_RECORD_BYTES = 64, 40

RR, WRR, LC, DH, SH, SED, NQ, MH, WLC = (L.IPVS_SCHEDULERS.index(n) for n in
                                         ("rr", "wrr", "lc", "dh", "sh", "sed", "nq", "mh", "wlc"))
TEMPLATE, INACTIVE, IN_USE = L.IPVS_CONN_TEMPLATE, L.IPVS_CONN_INACTIVE, L.IPVS_CONN_IN_USE
AVAILABLE, OVERLOAD = L.IP_VS_DEST_F_AVAILABLE, L.IP_VS_DEST_F_OVERLOAD


def _bswap32(v: int) -> int:
    return int.from_bytes(v.to_bytes(4, "little"), "big")


def _bswap16(v: int) -> int:
    return ((v >> 8) | (v << 8)) & 0xFFFF


def svc_hashkey(proto: int, addr: int, port: int) -> int:
    """ip_vs_svc_hashkey with the netns term 0: the service-table bucket."""
    return (proto ^ addr ^ (port >> 8) ^ port) & SVC_TAB_MASK


def fwm_hashkey(fwmark: int) -> int:
    """ip_vs_svc_fwm_hashkey with the netns term 0: the fwmark-table bucket."""
    return fwmark & SVC_TAB_MASK


def conn_hashkey(caddr: int, cport: int, proto: int, rnd: int, bits: int) -> int:
    """ip_vs_conn_hashkey with the netns term 0: the connection-table bucket."""
    # The kernel hashes the raw __be32 address and __be16 port as a little-endian CPU loads them.
    return jhash_3words(_bswap32(caddr), _bswap16(cport), proto, rnd) & ((1 << bits) - 1)


def _sh_hash(addr: int, port: int) -> int:
    return hash_32((port + addr) & M32, 8)


def _dh_hash(addr: int) -> int:
    return (addr * 2654435761) & (SCHED_TAB_SIZE - 1)


def _mh_hash(addr: int, port: int, offset: int, key: tuple[int, int]) -> int:
    return hsiphash_u32((offset + port + addr) & M32, *key)


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


class _Service:
    __slots__ = ("next", "dests", "n_dests", "cursor", "cw", "mw", "di", "table", "addr",
                 "fwmark", "netmask", "timeout", "flags", "port", "proto", "scheduler", "live")


class _Dest:
    __slots__ = ("next", "service", "weight", "last_weight", "activeconns", "inactconns",
                 "persistconns", "addr", "flags", "port")


class _Conn:
    __slots__ = L.IPVS_CONN_DTYPE.names

    def __init__(self):
        for name in self.__slots__:
            setattr(self, name, 0)

    def record(self) -> tuple:
        return tuple(getattr(self, name) for name in self.__slots__)


class _Result:
    __slots__ = L.IPVS_RESULT_DTYPE.names

    def __init__(self):
        for name in self.__slots__:
            setattr(self, name, 0)
        self.service = self.dest = -1

    def record(self) -> tuple:
        return tuple(getattr(self, name) for name in self.__slots__)


class _Packet:
    __slots__ = ("src", "dst", "sport", "dport", "proto", "ctstate", "mark", "time")

    def __init__(self, record: tuple):
        (self.src, self.dst, self.sport, self.dport, self.proto, _, self.ctstate, self.mark,
         _, self.time, _, _) = record


def _grow_capacity(capacity: int, needed: int) -> int:
    while capacity < needed:
        capacity *= 2
    return capacity


class IPVS:
    """One network namespace's IPVS: services, destinations, schedulers, connections."""

    def __init__(self, conn_tab_bits: int = DEFAULT_CONN_TAB_BITS, seed: int = 0,
                 expire_quiescent_template: bool = True, expire_nodest_conn: bool = True):
        if not 1 <= conn_tab_bits <= 27:
            raise ValueError("conn_tab_bits must be 1..27")
        self.conn_rnd = SplitMix64(seed).u32()  # ip_vs_conn_rnd
        self.conn_tab_bits = conn_tab_bits
        self.expire_quiescent_template = bool(expire_quiescent_template)
        self.expire_nodest_conn = bool(expire_nodest_conn)
        self._svc_heads = [-1] * SVC_TAB_SIZE
        self._fwm_heads = [-1] * SVC_TAB_SIZE
        self._conn_heads = [-1] * (1 << conn_tab_bits)
        self._svcs: list[_Service] = []
        self._dests: list[_Dest] = []
        self._conns: list[_Conn] = []
        self._free_conn = -1
        self._n_port_zero = 0  # nullsvc_counter
        # The compiled kernel's array capacities (svcs, dests, conns, sched tables), so that
        # model_bytes() agrees with it.
        self._capacity = {"svcs": 16, "dests": 16, "conns": INITIAL_CONNECTIONS, "tables": SCHED_TAB_SIZE}
        self._tables_used = 0
        self._free_tables: dict[int, list] = {}
        self.n_services = self.n_dests = self.n_connections = 0
        self.hash_computations = self.svc_compares = self.conn_compares = 0
        self.dests_examined = self.conns_created = self.timer_rearms = 0
        self.conns_expired = self.sched_ops = 0

    @classmethod
    def from_arrays(cls, services, dests, **options) -> "IPVS":
        """An IPVS holding ``services`` (IPVS_SERVICE_DTYPE records) and ``dests``
        (IPVS_DEST_DTYPE records), added in array order as ipvsadm-restore would: ids are the
        array positions, and each service's list ends up newest first (list_add_rcu)."""
        services = np.asarray(services, dtype=L.IPVS_SERVICE_DTYPE)
        dests = np.asarray(dests, dtype=L.IPVS_DEST_DTYPE)
        ipvs = cls(**options)
        for addr, port, proto, scheduler, flags, fwmark, timeout, netmask in services.tolist():
            ipvs.add_service(addr, port, proto, L.IPVS_SCHEDULERS[scheduler], flags, timeout,
                             fwmark, netmask)
        for service, addr, port, _, weight, active, inactive, flags in dests.tolist():
            ipvs.add_dest(service, addr, port, weight, flags, active, inactive)
        return ipvs

    # ---- control plane: services -----------------------------------------------------------

    def add_service(self, addr: int, port: int, proto: int, scheduler: str = "rr", flags: int = 0,
                    timeout: int = 0, fwmark: int = 0, netmask: int = 0xFFFFFFFF) -> int:
        """ip_vs_add_service; returns the service id."""
        if scheduler not in L.IPVS_SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}")
        scratch = _Result()
        if (self._fwm_find(fwmark, scratch) if fwmark else self._svc_find(proto, addr, port, scratch)) >= 0:
            raise ValueError("service exists")
        s = len(self._svcs)
        if s == self._capacity["svcs"]:
            self._capacity["svcs"] *= 2
        svc = _Service()
        svc.addr, svc.port, svc.proto, svc.flags = addr, port, proto, flags
        svc.timeout, svc.fwmark, svc.netmask = timeout, fwmark, netmask
        svc.scheduler = L.IPVS_SCHEDULERS.index(scheduler)
        svc.live = 1
        svc.dests, svc.n_dests, svc.cursor, svc.cw, svc.mw, svc.di = -1, 0, HEAD, 0, 0, 0
        svc.table = self._take_table(svc.scheduler)
        self._svcs.append(svc)
        self._sched_changed(s)  # init_service
        heads, bucket = self._svc_chain(svc)
        svc.next = heads[bucket]
        heads[bucket] = s
        if port == 0:
            self._n_port_zero += 1
        self.n_services += 1
        return s

    def remove_service(self, s: int) -> None:
        """ip_vs_del_service: unhash, drop the scheduler state, unlink every destination."""
        self._check_service(s)
        svc = self._svcs[s]
        heads, bucket = self._svc_chain(svc)
        if heads[bucket] == s:
            heads[bucket] = svc.next
        else:
            e = heads[bucket]
            while self._svcs[e].next != s:
                e = self._svcs[e].next
            self._svcs[e].next = svc.next
        d = svc.dests
        while d >= 0:
            self._dests[d].flags &= ~AVAILABLE
            self.n_dests -= 1
            d = self._dests[d].next
        if svc.table is not None:
            self._free_tables.setdefault(len(svc.table), []).append(svc.table)
        if svc.port == 0:
            self._n_port_zero -= 1
        svc.live, svc.dests, svc.n_dests = 0, -1, 0
        self.n_services -= 1

    def find_service(self, proto: int, addr: int, port: int, fwmark: int = 0) -> int:
        """The service a first packet would match (ip_vs_service_find), or -1; not counted."""
        return self._service_find(proto, addr, port, fwmark, _Result())

    def _svc_chain(self, svc: _Service) -> tuple[list, int]:
        if svc.fwmark:
            return self._fwm_heads, svc.fwmark & SVC_TAB_MASK
        return self._svc_heads, svc_hashkey(svc.proto, svc.addr, svc.port)

    def _check_service(self, s: int) -> None:
        if not (0 <= s < len(self._svcs) and self._svcs[s].live):
            raise ValueError(f"no service {s}")

    def _take_table(self, scheduler: int) -> list | None:
        size = MH_TAB_SIZE if scheduler == MH else SCHED_TAB_SIZE if scheduler in (SH, DH) else 0
        if size == 0:
            return None
        if self._free_tables.get(size):
            return self._free_tables[size].pop()
        self._tables_used += size
        if self._tables_used > self._capacity["tables"]:
            self._capacity["tables"] = 2 * self._tables_used
        return [-1] * size

    # ---- control plane: destinations -------------------------------------------------------

    def add_dest(self, s: int, addr: int, port: int, weight: int = 1, flags: int = 0,
                 activeconns: int = 0, inactconns: int = 0) -> int:
        """ip_vs_add_dest: the new destination goes first in the list; returns its id."""
        self._check_service(s)
        svc = self._svcs[s]
        if any(self._dests[e].addr == addr and self._dests[e].port == port for e in self._list(svc)):
            raise ValueError("destination exists")
        d = len(self._dests)
        if d == self._capacity["dests"]:
            self._capacity["dests"] *= 2
        dest = _Dest()
        dest.service, dest.addr, dest.port = s, addr, port
        dest.weight = dest.last_weight = weight
        dest.flags = (flags & OVERLOAD) | AVAILABLE
        dest.activeconns, dest.inactconns, dest.persistconns = activeconns, inactconns, 0
        dest.next = svc.dests
        self._dests.append(dest)
        svc.dests = d
        svc.n_dests += 1
        self.n_dests += 1
        if svc.scheduler != RR:  # rr has no add_dest hook
            self._sched_changed(s)
        return d

    def update_dest(self, d: int, weight: int | None = None, overloaded: bool | None = None) -> None:
        """__ip_vs_update_dest: a new weight (0 quiesces) and/or the OVERLOAD flag."""
        self._check_dest(d)
        dest = self._dests[d]
        if weight is not None:
            dest.weight = weight
            if weight != 0:  # keep the last_weight with latest non-0 weight
                dest.last_weight = weight
        if overloaded is not None:
            dest.flags = (dest.flags | OVERLOAD) if overloaded else (dest.flags & ~OVERLOAD)
        if self._svcs[dest.service].scheduler != RR:
            self._sched_changed(dest.service)

    def remove_dest(self, d: int) -> None:
        """ip_vs_del_dest: unlink, run the scheduler's del_dest, keep it for its connections."""
        self._check_dest(d)
        s = self._dests[d].service
        svc = self._svcs[s]
        prev, e = HEAD, svc.dests
        while e != d:
            prev, e = e, self._dests[e].next
        if prev == HEAD:
            svc.dests = self._dests[d].next
        else:
            self._dests[prev].next = self._dests[d].next
        svc.n_dests -= 1
        self._dests[d].flags &= ~AVAILABLE
        self.n_dests -= 1
        if svc.scheduler == RR:
            # ip_vs_rr_del_dest: a cursor on the removed one moves to the one before it.
            if svc.cursor == d:
                svc.cursor = prev
            self.sched_ops += 1
        else:
            self._sched_changed(s)

    def _check_dest(self, d: int) -> None:
        if not (0 <= d < len(self._dests) and self._dests[d].flags & AVAILABLE):
            raise ValueError(f"no destination {d}")

    def _list(self, svc: _Service) -> list[int]:
        out, d = [], svc.dests
        while d >= 0:
            out.append(d)
            d = self._dests[d].next
        return out

    def service_dests(self, s: int) -> list:
        """The service's destination ids in list order."""
        self._check_service(s)
        return self._list(self._svcs[s])

    def destinations(self) -> np.ndarray:
        """IPVS_DEST_DTYPE records of every destination id (removed ones lack AVAILABLE)."""
        return np.array([(d.service, d.addr, d.port, 0, d.weight, d.activeconns, d.inactconns, d.flags)
                         for d in self._dests], dtype=L.IPVS_DEST_DTYPE)

    def connections(self) -> np.ndarray:
        """IPVS_CONN_DTYPE copy of every connection slot handed out so far."""
        return np.array([c.record() for c in self._conns], dtype=L.IPVS_CONN_DTYPE)

    @property
    def conn_heads(self) -> np.ndarray:
        return np.array(self._conn_heads, dtype=np.int32)

    # ---- scheduler state rebuilds ----------------------------------------------------------

    def _sched_changed(self, s: int) -> None:
        """The scheduler's init/add_dest/del_dest/upd_dest hook; counts its operations."""
        scheduler = self._svcs[s].scheduler
        if scheduler == WRR:
            self._wrr_dest_changed(self._svcs[s])
        elif scheduler in (SH, DH):
            self._hash_table_reassign(self._svcs[s], weighted=scheduler == SH)
        elif scheduler == MH:
            self._mh_reassign(self._svcs[s])

    def _wrr_dest_changed(self, svc: _Service) -> None:
        g, max_weight = 0, 0
        for d in self._list(svc):
            weight = self._dests[d].weight
            if weight > 0:
                g = _gcd(weight, g) if g else weight
            max_weight = max(max_weight, weight)
        self.sched_ops += 2 * svc.n_dests  # ip_vs_wrr_gcd_weight and ip_vs_wrr_max_weight
        svc.cursor = HEAD
        svc.di = g or 1
        svc.mw = max_weight - (svc.di - 1)
        if svc.cw > svc.mw or svc.cw == 0:
            svc.cw = svc.mw
        elif svc.di > 1:
            svc.cw = (svc.cw // svc.di) * svc.di + 1

    def _hash_table_reassign(self, svc: _Service, weighted: bool) -> None:
        """ip_vs_sh_reassign (each destination ``weight`` times) / ip_vs_dh_reassign (once)."""
        table = svc.table
        d, repeats = svc.dests, 0
        for i in range(SCHED_TAB_SIZE):
            if svc.dests < 0:
                table[i] = -1
                continue
            if d < 0:
                d = svc.dests
            table[i] = d
            repeats += 1
            if not weighted or repeats >= self._dests[d].weight:
                d, repeats = self._dests[d].next, 0
        self.sched_ops += SCHED_TAB_SIZE

    def _mh_reassign(self, svc: _Service) -> None:
        """ip_vs_mh_dest_changed: gcd, shift, permutations, then the table (Maglev populate)."""
        order = self._list(svc)
        weights = [self._dests[d].last_weight for d in order]
        g, max_weight = 0, 0
        for weight in weights:
            if weight > 0:
                g = _gcd(weight, g) if g else weight
                max_weight = max(max_weight, weight)
        self.sched_ops += 2 * svc.n_dests
        table = svc.table
        if g < 1:
            table[:] = [-1] * MH_TAB_SIZE
            self.sched_ops += MH_TAB_SIZE
            return
        rshift = max((max_weight // g).bit_length() - MH_TAB_BITS, 0)
        perm, skip, turns = [], [], []
        for d, weight in zip(order, weights):  # ip_vs_mh_permutate: perm starts at the offset
            dest = self._dests[d]
            perm.append(_mh_hash(dest.addr, dest.port, 0, MH_HASH1) % MH_TAB_SIZE)
            skip.append(_mh_hash(dest.addr, dest.port, 0, MH_HASH2) % (MH_TAB_SIZE - 1) + 1)
            turns.append(((weight // g) >> rshift) or int(weight != 0))
        self.sched_ops += len(order)
        self.sched_ops += _mh_populate(table, order, skip, perm, turns)

    # ---- data plane (ip_vs_in) -------------------------------------------------------------

    def reserve(self, more: int) -> None:
        """Room for ``more`` new connection slots (mirrors the compiled kernel's capacity)."""
        self._capacity["conns"] = _grow_capacity(self._capacity["conns"], len(self._conns) + more)

    def process(self, packets: np.ndarray, results: np.ndarray, ns: np.ndarray | None = None) -> None:
        """Run each packet through ip_vs_in; fill ``results`` and add times into ``ns``."""
        n = len(packets)
        if len(results) < n or (ns is not None and len(ns) < n):
            raise ValueError("results and ns need one slot per packet")
        self.reserve(2 * n)  # at most a connection and a template per packet
        clock = time.perf_counter_ns
        records = []
        for i, record in enumerate(packets.tolist()):
            start = clock()
            r = self._handle(_Packet(record))
            if ns is not None:
                ns[i] += clock() - start
            self._add_totals(r)
            records.append(r.record())
        if n:
            results[:n] = np.array(records, dtype=L.IPVS_RESULT_DTYPE)

    def _handle(self, p: _Packet) -> _Result:
        r = _Result()
        if p.proto not in (IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP):
            r.verdict = L.IPVS_NOT_SERVICE  # no ip_vs_protocol: accepted untouched
            return r
        c = self._conn_in_get(p, r)
        if c >= 0:
            self._established(c, p, r)
            return r
        if p.proto != IPPROTO_UDP and not p.ctstate & L.CT_NEW:
            r.verdict = L.IPVS_NO_CONN  # tcp_conn_schedule schedules only a SYN
            return r
        s = self._service_find(p.proto, p.dst, p.dport, p.mark, r)
        if s < 0:
            r.verdict = L.IPVS_NOT_SERVICE
            return r
        r.service = s
        if self._svcs[s].flags & L.IP_VS_SVC_F_PERSISTENT:
            c = self._sched_persist(s, p, r)
        else:
            c = self._schedule(s, p, r)
        if c < 0:
            r.verdict = L.IPVS_NO_DEST
            return r
        r.timer_rearms += 1  # ip_vs_conn_put arms the new connection's timer
        self._forward(c, r)
        return r

    def _forward(self, c: int, r: _Result) -> None:
        conn = self._conns[c]
        r.verdict, r.dnat_ip, r.dnat_port, r.dest = L.IPVS_FORWARD, conn.daddr, conn.dport, conn.dest

    def _established(self, c: int, p: _Packet, r: _Result) -> None:
        conn = self._conns[c]
        dest = self._dests[conn.dest]
        r.conn_hit, r.service, r.dest = 1, dest.service, conn.dest
        if not dest.flags & AVAILABLE:
            r.verdict = L.IPVS_DEST_GONE
            if self.expire_nodest_conn:
                self._drop_conn(c)
            return
        if conn.flags & INACTIVE and not p.ctstate & L.CT_NEW:
            conn.flags &= ~INACTIVE  # the TCP/SCTP state machine reaches ESTABLISHED
            dest.inactconns -= 1
            dest.activeconns += 1
        conn.expires = (p.time + self._conn_timeout(conn)) & M32
        r.timer_rearms += 1
        self._forward(c, r)

    def _add_totals(self, r: _Result) -> None:
        self.svc_compares += r.svc_compares
        self.conn_compares += r.conn_compares
        self.dests_examined += r.dests_examined
        self.conns_created += r.conns_created
        self.timer_rearms += r.timer_rearms
        self.hash_computations += r.hash_computations

    @property
    def bucket_entries_compared(self) -> int:
        return self.svc_compares + self.conn_compares

    # ---- service lookup (ip_vs_service_find) -----------------------------------------------

    def _service_find(self, proto: int, addr: int, port: int, mark: int, r: _Result) -> int:
        if mark:
            s = self._fwm_find(mark, r)
            if s >= 0:
                return s
        s = self._svc_find(proto, addr, port, r)
        if s < 0 and self._n_port_zero > 0:
            s = self._svc_find(proto, addr, 0, r)  # the port-zero catch-all
        return s

    def _svc_find(self, proto: int, addr: int, port: int, r: _Result) -> int:
        r.hash_computations += 1
        s = self._svc_heads[svc_hashkey(proto, addr, port)]
        while s >= 0:
            r.svc_compares += 1
            svc = self._svcs[s]
            if svc.addr == addr and svc.port == port and svc.proto == proto:
                return s
            s = svc.next
        return -1

    def _fwm_find(self, fwmark: int, r: _Result) -> int:
        r.hash_computations += 1
        s = self._fwm_heads[fwmark & SVC_TAB_MASK]
        while s >= 0:
            r.svc_compares += 1
            if self._svcs[s].fwmark == fwmark:
                return s
            s = self._svcs[s].next
        return -1

    # ---- connections (ip_vs_conn.c) --------------------------------------------------------

    def _bucket(self, caddr: int, cport: int, proto: int) -> int:
        return conn_hashkey(caddr, cport, proto, self.conn_rnd, self.conn_tab_bits)

    def _conn_in_get(self, p: _Packet, r: _Result) -> int:
        r.hash_computations += 1
        c = self._conn_heads[self._bucket(p.src, p.sport, p.proto)]
        while c >= 0:
            conn = self._conns[c]
            r.conn_compares += 1
            if (conn.cport == p.sport and conn.vport == p.dport and conn.caddr == p.src
                    and conn.vaddr == p.dst and conn.proto == p.proto and not conn.flags & TEMPLATE):
                return c
            c = conn.next
        return -1

    def _template_find(self, caddr: int, vaddr: int, vport: int, proto: int, r: _Result) -> int:
        """ip_vs_ct_in_get for ⟨proto, caddr, 0, vaddr, vport⟩."""
        r.hash_computations += 1
        t = self._conn_heads[self._bucket(caddr, 0, proto)]
        while t >= 0:
            conn = self._conns[t]
            r.conn_compares += 1
            if (conn.flags & TEMPLATE and conn.caddr == caddr and conn.vaddr == vaddr
                    and conn.vport == vport and conn.cport == 0 and conn.proto == proto):
                return t
            t = conn.next
        return -1

    def _conn_timeout(self, conn: _Conn) -> int:
        if conn.flags & TEMPLATE:
            return self._svcs[self._dests[conn.dest].service].timeout
        if conn.proto == IPPROTO_UDP:
            return UDP_TIMEOUT
        return TCP_SYN_RECV_TIMEOUT if conn.flags & INACTIVE else TCP_ESTABLISHED_TIMEOUT

    def _conn_new(self, caddr: int, cport: int, vaddr: int, vport: int, proto: int, d: int,
                  dport: int, flags: int, now: int, r: _Result) -> int:
        """ip_vs_conn_new: allocate, bind the destination (ip_vs_bind_dest), hash."""
        c = self._free_conn
        if c >= 0:
            conn = self._conns[c]
            self._free_conn = conn.next
        else:
            c = len(self._conns)
            conn = _Conn()
            self._conns.append(conn)
        dest = self._dests[d]
        conn.caddr, conn.cport, conn.vaddr, conn.vport, conn.proto = caddr, cport, vaddr, vport, proto
        conn.daddr, conn.dport, conn.dest = dest.addr, dport, d
        conn.control, conn.n_control = -1, 0
        conn.flags = IN_USE | flags
        if flags & TEMPLATE:
            dest.persistconns += 1
        elif proto == IPPROTO_UDP:
            dest.activeconns += 1
        else:  # a SYN leaves a TCP (or SCTP) connection in SYN_RECV: inactive
            conn.flags |= INACTIVE
            dest.inactconns += 1
        conn.expires = (now + self._conn_timeout(conn)) & M32
        self._hash_in(c, r)
        self.n_connections += 1
        r.conns_created += 1
        return c

    def _hash_in(self, c: int, r: _Result) -> None:
        conn = self._conns[c]
        r.hash_computations += 1
        b = self._bucket(conn.caddr, conn.cport, conn.proto)
        conn.next = self._conn_heads[b]
        self._conn_heads[b] = c

    def _unhash(self, c: int) -> None:
        conn = self._conns[c]
        b = self._bucket(conn.caddr, conn.cport, conn.proto)
        if self._conn_heads[b] == c:
            self._conn_heads[b] = conn.next
            return
        e = self._conn_heads[b]
        while self._conns[e].next != c:
            e = self._conns[e].next
        self._conns[e].next = conn.next

    def _drop_conn(self, c: int) -> None:
        """ip_vs_conn_expire: unhash, unbind the destination and the controlling template."""
        conn = self._conns[c]
        dest = self._dests[conn.dest]
        self._unhash(c)
        if conn.flags & TEMPLATE:
            dest.persistconns -= 1
        elif conn.flags & INACTIVE:
            dest.inactconns -= 1
        else:
            dest.activeconns -= 1
        if conn.control >= 0:
            self._conns[conn.control].n_control -= 1
        conn.flags = 0
        conn.next = self._free_conn
        self._free_conn = c
        self.n_connections -= 1
        self.conns_expired += 1

    def expire(self, now: int) -> int:
        """Fire every timer due by ``now``; returns the connections and templates removed."""
        before = self.conns_expired
        for c, conn in enumerate(self._conns):
            if conn.flags & IN_USE and not conn.flags & TEMPLATE and conn.expires <= now:
                self._drop_conn(c)
        for c, conn in enumerate(self._conns):  # templates, once their connections are gone
            if conn.flags & IN_USE and conn.flags & TEMPLATE and conn.expires <= now:
                if conn.n_control == 0:
                    self._drop_conn(c)
                    continue
                timeout = max(self._conn_timeout(conn), 1)  # still in use: the timer is re-armed
                while conn.expires <= now:
                    conn.expires = (conn.expires + timeout) & M32
        return self.conns_expired - before

    # ---- ip_vs_schedule --------------------------------------------------------------------

    def _schedule(self, s: int, p: _Packet, r: _Result) -> int:
        svc = self._svcs[s]
        if svc.fwmark == 0 and p.dport != svc.port:
            return -1  # "port zero only supported in persistent services"
        d = self._pick(svc, p, r)
        if d < 0:
            return -1
        dport = self._dests[d].port or p.dport
        return self._conn_new(p.src, p.sport, p.dst, p.dport, p.proto, d, dport, 0, p.time, r)

    def _sched_persist(self, s: int, p: _Packet, r: _Result) -> int:
        """ip_vs_sched_persist: find or create the client's template, then the connection."""
        svc = self._svcs[s]
        snet = p.src & svc.netmask
        proto, vaddr, vport = p.proto, p.dst, 0
        port_match = p.dport == svc.port
        if port_match:
            if svc.port != FTPPORT:
                vport = p.dport
        elif svc.fwmark:  # fwmark template <IPPROTO_IP, caddr, 0, fwmark, 0>
            proto, vaddr = IPPROTO_IP, svc.fwmark
        t = self._template_find(snet, vaddr, vport, proto, r)
        if t >= 0 and not self._template_valid(t, r):
            t = -1
        if t < 0:
            d = self._pick(svc, p, r)
            if d < 0:
                return -1
            tdport = self._dests[d].port if port_match and svc.port != FTPPORT else 0
            t = self._conn_new(snet, 0, vaddr, vport, proto, d, tdport, TEMPLATE, p.time, r)
        d = self._conns[t].dest
        dport = p.dport
        if dport == svc.port and self._dests[d].port:
            dport = self._dests[d].port
        c = self._conn_new(p.src, p.sport, p.dst, p.dport, p.proto, d, dport, 0, p.time, r)
        template = self._conns[t]
        self._conns[c].control = t  # ip_vs_control_add
        template.n_control += 1
        template.expires = (p.time + self._conn_timeout(template)) & M32  # ip_vs_conn_put(ct)
        r.timer_rearms += 1
        return c

    def _template_valid(self, t: int, r: _Result) -> bool:
        """ip_vs_check_template; an invalid template is rehashed under vport/dport 0xffff."""
        template = self._conns[t]
        dest = self._dests[template.dest]
        if dest.flags & AVAILABLE and not (self.expire_quiescent_template and dest.weight == 0):
            return True
        if template.vport != 0xFFFF:
            self._unhash(t)
            template.vport = template.dport = 0xFFFF
            template.cport = 0
            self._hash_in(t, r)
        return False

    # ---- schedulers ------------------------------------------------------------------------

    def _pick(self, svc: _Service, p: _Packet, r: _Result) -> int:
        scheduler = svc.scheduler
        if scheduler == RR:
            return self._rr_pick(svc, r)
        if scheduler == WRR:
            return self._wrr_pick(svc, r)
        if scheduler == LC:
            return self._lc_pick(svc, r)
        if scheduler in (SED, WLC):
            return self._sed_pick(svc, r, wlc=scheduler == WLC)
        if scheduler == NQ:
            return self._nq_pick(svc, r)
        if scheduler == DH:
            return self._dh_pick(svc, p, r)
        if scheduler == SH:
            return self._sh_pick(svc, p, r)
        return self._mh_pick(svc, p, r)

    def _usable(self, d: int) -> bool:
        # is_unavailable()'s complement in sh, mh and dh; rr's test too.
        dest = self._dests[d]
        return dest.weight > 0 and not dest.flags & OVERLOAD

    def _rr_pick(self, svc: _Service, r: _Result) -> int:
        last = svc.cursor
        d = svc.dests if last == HEAD else self._dests[last].next
        passes = 0
        while True:
            while d >= 0:
                r.dests_examined += 1
                if self._usable(d):
                    svc.cursor = d
                    return d
                if d == last:
                    return -1
                d = self._dests[d].next
            passes += 1
            if passes >= 2 or last == HEAD:  # from the head one pass covers every destination
                return -1
            d = svc.dests

    def _wrr_pick(self, svc: _Service, r: _Result) -> int:
        last = d = svc.cursor
        stop, last_pass, restarted = -2, False, False
        if svc.mw == 0:
            return -1
        while True:
            d = svc.dests if d == HEAD else self._dests[d].next
            while d >= 0:
                r.dests_examined += 1
                dest = self._dests[d]
                if not dest.flags & OVERLOAD and dest.weight >= svc.cw:
                    svc.cursor = d
                    return d
                if d == stop:
                    svc.cursor = d
                    return -1
                d = dest.next
            svc.cw -= svc.di
            if svc.cw <= 0:
                svc.cw = svc.mw
                # a pass for weight >= 1 over every destination already failed
                if last_pass or last == HEAD:
                    svc.cursor = HEAD
                    return -1
                restarted = True
            last_pass = svc.cw <= svc.di
            if last_pass and restarted and last != HEAD:
                stop = last  # the weight >= 1 pass covered only what follows `last`

    def _conn_overhead(self, d: int) -> int:
        dest = self._dests[d]  # ip_vs_dest_conn_overhead
        return (dest.activeconns << 8) + dest.inactconns

    def _lc_pick(self, svc: _Service, r: _Result) -> int:
        least, loh = -1, 0
        for d in self._list(svc):
            r.dests_examined += 1
            dest = self._dests[d]
            if not dest.flags & OVERLOAD and dest.weight != 0:
                doh = self._conn_overhead(d) & M32  # ip_vs_lc keeps it unsigned
                if least < 0 or doh < loh:
                    least, loh = d, doh
        return least

    def _sed_less(self, loh: int, least: int, doh: int, d: int) -> bool:
        # doh/w_d < loh/w_least without division: loh * w_d > doh * w_least
        return loh * self._dests[d].weight > doh * self._dests[least].weight

    def _sed_pick(self, svc: _Service, r: _Result, wlc: bool) -> int:
        """ip_vs_sed_schedule, or with ``wlc`` ip_vs_wlc_schedule: only the overhead differs."""
        overhead = self._conn_overhead if wlc else (lambda d: self._dests[d].activeconns + 1)
        order = self._list(svc)
        least = -1
        for i, d in enumerate(order):
            r.dests_examined += 1
            if self._usable(d):
                least = d
                break
        if least < 0:
            return -1
        loh = overhead(least)
        for d in order[i + 1:]:
            r.dests_examined += 1
            if not self._dests[d].flags & OVERLOAD:
                doh = overhead(d)
                if self._sed_less(loh, least, doh, d):
                    least, loh = d, doh
        return least

    def _nq_pick(self, svc: _Service, r: _Result) -> int:
        least, loh = -1, 0
        for d in self._list(svc):
            r.dests_examined += 1
            dest = self._dests[d]
            if not dest.flags & OVERLOAD and dest.weight != 0:
                if dest.activeconns == 0:
                    return d  # never queue: an idle server takes it at once
                doh = dest.activeconns + 1
                if least < 0 or self._sed_less(loh, least, doh, d):
                    least, loh = d, doh
        return least

    def _dh_pick(self, svc: _Service, p: _Packet, r: _Result) -> int:
        r.hash_computations += 1
        r.dests_examined += 1
        d = svc.table[_dh_hash(p.dst)]
        return d if d >= 0 and self._usable(d) else -1

    def _sh_pick(self, svc: _Service, p: _Packet, r: _Result) -> int:
        port = p.sport if svc.flags & L.IP_VS_SVC_F_SCHED_PORT else 0
        r.hash_computations += 1
        r.dests_examined += 1
        ihash = _sh_hash(p.src, port)
        d = svc.table[ihash]
        if d < 0 or self._usable(d):
            return d
        if not svc.flags & L.IP_VS_SVC_F_SCHED_FALLBACK:
            return -1
        for offset in range(SCHED_TAB_SIZE):  # ip_vs_sh_get_fallback
            r.hash_computations += 1
            r.dests_examined += 1
            d = svc.table[((offset + ihash) % SCHED_TAB_SIZE + _sh_hash(p.src, port)) % SCHED_TAB_SIZE]
            if self._usable(d):
                return d
        return -1

    def _mh_pick(self, svc: _Service, p: _Packet, r: _Result) -> int:
        port = p.sport if svc.flags & L.IP_VS_SVC_F_SCHED_PORT else 0
        r.hash_computations += 1
        r.dests_examined += 1
        ihash = _mh_hash(p.src, port, 0, MH_HASH1) % MH_TAB_SIZE
        d = svc.table[ihash]
        if d < 0 or self._usable(d):
            return d
        if not svc.flags & L.IP_VS_SVC_F_SCHED_FALLBACK:
            return -1
        for offset in range(MH_TAB_SIZE):  # ip_vs_mh_get_fallback
            r.hash_computations += 1
            r.dests_examined += 1
            d = svc.table[_mh_hash(p.src, port, (offset + ihash) % MH_TAB_SIZE, MH_HASH1) % MH_TAB_SIZE]
            if d < 0 or self._usable(d):
                return d
        return -1

    # ---- memory ----------------------------------------------------------------------------

    def modelled_bytes(self, n_cpus: int = 1) -> int:
        """Kernel memory (§2.5): services and destinations (kmalloc-512 plus 40 B of per-CPU
        stats each), scheduler state, connection slab objects (templates included), the
        connection table and the two 256-bucket service tables."""
        per_cpu = IP_VS_CPU_STATS_BYTES * n_cpus
        return (self.n_services * (IP_VS_SERVICE_BYTES + per_cpu)
                + sum(SCHED_STATE_BYTES[L.IPVS_SCHEDULERS[s.scheduler]] for s in self._svcs if s.live)
                + self.n_dests * (IP_VS_DEST_BYTES + per_cpu)
                + self.n_connections * IP_VS_CONN_BYTES
                + BUCKET_BYTES * ((1 << self.conn_tab_bits) + 2 * SVC_TAB_SIZE))

    def model_bytes(self) -> int:
        """Bytes the compiled kernel's arrays take for the same contents."""
        cap = self._capacity
        return (4 * (2 * SVC_TAB_SIZE + (1 << self.conn_tab_bits)) + cap["svcs"] * SVC_RECORD_BYTES
                + cap["dests"] * DEST_RECORD_BYTES + cap["conns"] * L.IPVS_CONN_DTYPE.itemsize
                + cap["tables"] * 4)


def _mh_populate(table: list, order: list, skip: list, perm: list, turns: list) -> int:
    """ip_vs_mh_populate: rounds over the destinations, each taking ``turns`` free slots along
    its permutation; returns the slots probed."""
    taken = bytearray(MH_TAB_SIZE)
    filled = taken_in_turn = probes = 0
    n = len(order)
    while True:
        i = 0
        while i < n:
            if turns[i] < 1:  # ignore added server with zero weight
                i += 1
                continue
            c = perm[i]
            probes += 1
            while taken[c]:
                c = perm[i] = (perm[i] + skip[i]) % MH_TAB_SIZE
                probes += 1
            taken[c] = 1
            table[c] = order[i]
            filled += 1
            if filled == MH_TAB_SIZE:
                return probes
            taken_in_turn += 1
            if taken_in_turn >= turns[i]:
                taken_in_turn = 0
                i += 1
