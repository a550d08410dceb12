"""IPVS: service table, schedulers and connection table (kernel-internals §2, §6.3).

Services (ip_vs_ctl.c). Two fixed tables of 256 chains, never resized, new services at the
head: ⟨proto, addr, port⟩ hashed by ip_vs_svc_hashkey, ``(proto ^ addr ^ (port >> 8) ^ port) &
255`` on host-order values, and fwmark services by ``fwmark & 255``. The netns-pointer term both
kernel hashes XOR in is a per-boot constant; it is taken as 0. ip_vs_service_find's order: the
fwmark table when the packet has a mark, then ⟨proto, addr, port⟩, then the port-0 catch-all
only while some service has port 0 (nullsvc_counter, which fwmark services also count). The
FTP fallback (a port-21 lookup for TCP misses) is not modelled.

Destinations (svc->destinations) keep the kernel's list order: ``add_dest`` puts the new one at
the head (list_add_rcu), so a list built by ipvsadm-restore, kube-proxy or ``from_arrays`` runs
newest first, the reverse of the order they were added in. Ids are never reused; a removed
destination loses IP_VS_DEST_F_AVAILABLE and stays for the connections that point at it (the
kernel's trash list). Schedulers, as in ip_vs_<name>.c; ``dests_examined`` counts each
destination tested or each table slot read:

* ``rr``: from the cursor to the next destination with weight > 0 and not OVERLOAD, wrapping
  once to the cursor itself (a cursor at the list head makes one pass). Removing the cursor's
  destination moves the cursor to the one before it.
* ``wrr``: cursor, cw, mw = max weight - (gcd - 1), di = gcd, with the kernel's last-pass and
  restart logic; any destination change recomputes gcd and max (2·D operations).
* ``lc``: a full pass minimising ``(activeconns << 8) + inactconns`` over destinations that are
  not OVERLOAD and have weight != 0; the first minimum wins.
* ``sed``: the first available destination, then a pass keeping ``(active + 1)`` per weight
  lowest by cross-multiplying (``loh * w_dest > doh * w_least``), as ip_vs_sed.c does.
* ``wlc`` (ipvsadm's default): the same loop over ``(activeconns << 8) + inactconns``.
* ``nq``: one pass; an idle (activeconns == 0) available destination is taken at once,
  otherwise the sed comparison.
* ``dh``: a 256-slot table filled round-robin from the list (weights ignored), indexed by
  ``(daddr * 2654435761) & 255`` of the packet's destination address, so every client of a
  virtual address lands on the same server. 256 operations per rebuild.
* ``sh``: a 256-slot table filled round-robin with each destination repeated ``weight`` times,
  indexed by ``hash_32(sport + saddr, 8)``. kube-proxy does not set the sh-port flag
  (IP_VS_SVC_F_SCHED_PORT), so the port term is 0 unless the service has the flag. The fallback
  flag probes ``(offset + 2·hash) & 255`` for offsets 0..255, as ip_vs_sh_get_fallback's double
  offset gives. 256 operations per rebuild.
* ``mh``: Maglev with M = 4093 (CONFIG_IP_VS_MH_TAB_INDEX 12). Per destination, in list order,
  ``offset = hsiphash(port + addr, hash1) % M`` and ``skip = hsiphash(port + addr, hash2) %
  (M - 1) + 1`` with the fixed keys of generate_hash_secret; ``turns = ((last_weight / gcd) >>
  rshift) ?: (last_weight != 0)``, ``rshift = max(fls(max_weight / gcd) - 6, 0)``; the table is
  filled round by round, each destination taking ``turns`` slots by walking its permutation to
  the next free slot. Lookup: ``hsiphash(sport + saddr, hash1) % M``, the port only with the port
  flag (kube-proxy's mh sets it, as FlagSourceHash); the fallback flag walks
  ``hsiphash(roffset + port + addr)`` probes. A rebuild costs 3·D + one operation per slot probed.
  hsiphash is the 64-bit kernel's (SipHash-1-3 truncated to 32 bits, kernels/hashing.pxd).

Connections (ip_vs_conn.c). One table of ``2^conn_tab_bits`` chains (default 12), never resized,
bucket = ``jhash_3words(caddr, cport, proto, rnd) & mask`` with the address and port as the
kernel loads them (network byte order on a little-endian host) and ``rnd`` drawn from the seed;
new connections at the head. A lookup (ip_vs_conn_in_get) compares cport, vport, caddr, vaddr
and proto of every entry it walks, persistence templates included.

``process`` runs each client-to-virtual-service packet through ip_vs_in:

1. not TCP/UDP/SCTP: NOT_SERVICE, nothing looked up;
2. connection lookup; a hit is an established packet: the connection's timer is re-armed
   (``timer_rearms``, ip_vs_conn_put's mod_timer), a TCP/SCTP connection still inactive becomes
   active on its first non-NEW packet, and the packet is forwarded (a NEW packet that hits is a
   retransmitted SYN: conn_reuse_mode's rescheduling of closing connections needs TCP states
   this model does not keep). A hit whose real server was removed is dropped and the
   connection expired (kube-proxy's expire_nodest_conn = 1): DEST_GONE;
3. a miss that is not a first packet: NO_CONN. A first packet is a TCP SYN / SCTP INIT, taken
   from ``ctstate & CT_NEW`` of PACKET_DTYPE (the workload sets it on a flow's first packet;
   RST is not modelled), or any UDP packet;
4. service lookup (NOT_SERVICE on a miss), then ip_vs_schedule: a persistent service
   (ClientIP affinity) first looks up its template ⟨proto, caddr & netmask, 0, vaddr, vport⟩ in
   the connection table (ip_vs_sched_persist). A template whose server is gone, or has weight 0
   (kube-proxy's expire_quiescent_template = 1), is invalidated (vport and dport set to 0xffff,
   rehashed to its chain head) and a new one is scheduled. Templates carry the service's
   persistence timeout and are re-armed on every use. A non-persistent port-0 service refuses
   to schedule (NO_DEST), as the kernel does;
5. the scheduler picks a destination (NO_DEST when none), and the connection is created: TCP and
   SCTP ones inactive (SYN_RECV), UDP ones active. Every new connection arms its timer.

Timeouts (seconds, from ``packet.time``): TCP/SCTP 60 while inactive (SYN_RECV) and 900 once
established, UDP 300, templates the service's timeout. Timers fire in ``expire(now)``: expired
connections are unhashed and unbound; an expired template that still controls connections is
re-armed, as ip_vs_conn_expire does. Lookups see whatever ``expire`` has left in the table.

Per-packet counters (IPVS_RESULT_DTYPE): ``svc_compares`` (service-table entries compared),
``conn_compares`` (connection-table entries compared, template lookups included),
``dests_examined``, ``conns_created`` (connections and templates), ``timer_rearms``,
``hash_computations`` (connection, service, template and scheduler hashes). The same names are
totals on the object, with ``bucket_entries_compared`` = service + connection compares and
``sched_ops`` for scheduler rebuilds. Reply packets (ip_vs_out) are not modelled.

The pure-Python twin is kernels.reference.ipvs; both give identical results and counters.
"""
import numpy as np

cimport cython
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memset
from kernels.clock cimport now_ns

from kernels cimport hashing
from kernels.records cimport packet_t
from kernels import layout as L

SVC_TAB_SIZE = 256
DEFAULT_CONN_TAB_BITS = 12
MH_TAB_SIZE = 4093
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

cdef enum:
    SVC_TAB_MASK = 255
    SCHED_TAB_SIZE = 256  # dh and sh
    M = 4093
    MH_TAB_BITS = 6  # IP_VS_MH_TAB_BITS = CONFIG_IP_VS_MH_TAB_INDEX / 2
    HEAD = -1  # a cursor at the list head
    FTPPORT = 21
    IPPROTO_IP = 0
    IPPROTO_TCP = 6
    IPPROTO_UDP = 17
    IPPROTO_SCTP = 132
    CT_NEW = 0x08
    SVC_F_PERSISTENT = 0x0001
    SVC_F_SCHED_FALLBACK = 0x0008
    SVC_F_SCHED_PORT = 0x0010
    DEST_F_AVAILABLE = 0x0001
    DEST_F_OVERLOAD = 0x0002
    CONN_TEMPLATE = 0x01
    CONN_INACTIVE = 0x02
    CONN_IN_USE = 0x04
    V_FORWARD = 0
    V_NOT_SERVICE = 1
    V_NO_DEST = 2
    V_NO_CONN = 3
    V_DEST_GONE = 4
    SCHED_RR = 0
    SCHED_WRR = 1
    SCHED_LC = 2
    SCHED_DH = 3
    SCHED_SH = 4
    SCHED_SED = 5
    SCHED_NQ = 6
    SCHED_MH = 7
    SCHED_WLC = 8
    TCP_SYN_RECV_TIMEOUT = 60
    TCP_ESTABLISHED_TIMEOUT = 900
    UDP_TIMEOUT = 300
    INITIAL_CONNECTIONS = 1024

# C-level copies of kernels/layout.py; test_kernels_ipvs.py checks them against it.
LAYOUT_CONSTANTS = {
    "IP_VS_SVC_F_PERSISTENT": SVC_F_PERSISTENT, "IP_VS_SVC_F_SCHED_FALLBACK": SVC_F_SCHED_FALLBACK,
    "IP_VS_SVC_F_SCHED_PORT": SVC_F_SCHED_PORT, "IP_VS_DEST_F_AVAILABLE": DEST_F_AVAILABLE,
    "IP_VS_DEST_F_OVERLOAD": DEST_F_OVERLOAD, "IPVS_CONN_TEMPLATE": CONN_TEMPLATE,
    "IPVS_CONN_INACTIVE": CONN_INACTIVE, "IPVS_CONN_IN_USE": CONN_IN_USE,
    "IPVS_FORWARD": V_FORWARD, "IPVS_NOT_SERVICE": V_NOT_SERVICE, "IPVS_NO_DEST": V_NO_DEST,
    "IPVS_NO_CONN": V_NO_CONN, "IPVS_DEST_GONE": V_DEST_GONE, "CT_NEW": CT_NEW,
}

# generate_hash_secret's fixed hsiphash keys (key[0], key[1]) for ip_vs_mh.
cdef uint64_t MH_KEY1_0 = 2654435761ULL
cdef uint64_t MH_KEY1_1 = 2654435761ULL
cdef uint64_t MH_KEY2_0 = 2654435801ULL
cdef uint64_t MH_KEY2_1 = 2654435761ULL

cdef packed struct ipvs_result_t:
    uint8_t verdict
    uint8_t conn_hit
    uint16_t dnat_port
    uint32_t dnat_ip
    int32_t service
    int32_t dest
    uint32_t svc_compares
    uint32_t conn_compares
    uint32_t dests_examined
    uint32_t conns_created
    uint32_t timer_rearms
    uint32_t hash_computations

cdef packed struct conn_t:  # IPVS_CONN_DTYPE
    int32_t next
    int32_t dest
    int32_t control  # the template this connection was scheduled by, or -1
    int32_t n_control  # templates: connections they control
    uint32_t caddr
    uint32_t vaddr
    uint32_t daddr
    uint16_t cport
    uint16_t vport
    uint16_t dport
    uint8_t proto
    uint8_t flags
    uint32_t expires

# The model's own service and destination records (ip_vs_service, ip_vs_dest).
SVC_DTYPE = np.dtype([
    ("next", "<i4"), ("dests", "<i4"), ("n_dests", "<i4"), ("cursor", "<i4"),
    ("cw", "<i4"), ("mw", "<i4"), ("di", "<i4"), ("table", "<i8"),
    ("addr", "<u4"), ("fwmark", "<u4"), ("netmask", "<u4"), ("timeout", "<u4"), ("flags", "<u4"),
    ("port", "<u2"), ("proto", "u1"), ("scheduler", "u1"), ("live", "u1"), ("pad", "u1", 3)])

cdef packed struct svc_t:
    int32_t next  # chain in the ⟨proto, addr, port⟩ or the fwmark table
    int32_t dests  # first destination of svc->destinations, -1 when empty
    int32_t n_dests
    int32_t cursor  # rr, wrr: the destination the last pick stopped at, or HEAD
    int32_t cw
    int32_t mw
    int32_t di
    int64_t table  # dh, sh, mh: offset of the lookup table in the slot pool, else -1
    uint32_t addr
    uint32_t fwmark
    uint32_t netmask
    uint32_t timeout
    uint32_t flags
    uint16_t port
    uint8_t proto
    uint8_t scheduler
    uint8_t live
    uint8_t pad[3]

DEST_DTYPE = np.dtype([
    ("next", "<i4"), ("service", "<i4"), ("weight", "<i4"), ("last_weight", "<i4"),
    ("activeconns", "<i4"), ("inactconns", "<i4"), ("persistconns", "<i4"),
    ("addr", "<u4"), ("flags", "<u4"), ("port", "<u2"), ("pad", "<u2")])

cdef packed struct dest_t:
    int32_t next
    int32_t service
    int32_t weight
    int32_t last_weight  # the latest non-zero weight (mh builds from it)
    int32_t activeconns
    int32_t inactconns
    int32_t persistconns
    uint32_t addr
    uint32_t flags
    uint16_t port
    uint16_t pad


def struct_layout() -> dict:
    """{"result"|"conn": (sizeof, {field: offset})} of the C structs, to check the dtypes."""
    cdef ipvs_result_t r
    cdef conn_t c
    cdef char *rb = <char *>&r
    cdef char *cb = <char *>&c
    return {
        "result": (sizeof(ipvs_result_t), {
            "verdict": <char *>&r.verdict - rb, "conn_hit": <char *>&r.conn_hit - rb,
            "dnat_port": <char *>&r.dnat_port - rb, "dnat_ip": <char *>&r.dnat_ip - rb,
            "service": <char *>&r.service - rb, "dest": <char *>&r.dest - rb,
            "svc_compares": <char *>&r.svc_compares - rb,
            "conn_compares": <char *>&r.conn_compares - rb,
            "dests_examined": <char *>&r.dests_examined - rb,
            "conns_created": <char *>&r.conns_created - rb,
            "timer_rearms": <char *>&r.timer_rearms - rb,
            "hash_computations": <char *>&r.hash_computations - rb}),
        "conn": (sizeof(conn_t), {
            "next": <char *>&c.next - cb, "dest": <char *>&c.dest - cb,
            "control": <char *>&c.control - cb, "n_control": <char *>&c.n_control - cb,
            "caddr": <char *>&c.caddr - cb, "vaddr": <char *>&c.vaddr - cb,
            "daddr": <char *>&c.daddr - cb, "cport": <char *>&c.cport - cb,
            "vport": <char *>&c.vport - cb, "dport": <char *>&c.dport - cb,
            "proto": <char *>&c.proto - cb, "flags": <char *>&c.flags - cb,
            "expires": <char *>&c.expires - cb}),
    }


# ---- the kernel's hash functions -------------------------------------------------------------

cdef inline uint32_t bswap32(uint32_t v) noexcept nogil:
    return (v >> 24) | ((v >> 8) & 0xFF00) | ((v << 8) & 0xFF0000) | (v << 24)


cdef inline uint32_t bswap16(uint16_t v) noexcept nogil:
    return <uint16_t>((v >> 8) | (v << 8))


cdef inline uint32_t svc_bucket(uint8_t proto, uint32_t addr, uint16_t port) noexcept nogil:
    return (proto ^ addr ^ (port >> 8) ^ port) & SVC_TAB_MASK


cdef inline uint32_t conn_bucket(uint32_t caddr, uint16_t cport, uint8_t proto, uint32_t rnd,
                                 uint32_t mask) noexcept nogil:
    # The kernel hashes the raw __be32 address and __be16 port as a little-endian CPU loads them.
    return hashing.jhash_3words(bswap32(caddr), bswap16(cport), proto, rnd) & mask


cdef inline uint32_t sh_hash(uint32_t addr, uint16_t port) noexcept nogil:
    return hashing.hash_32(port + addr, 8)


cdef inline uint32_t dh_hash(uint32_t addr) noexcept nogil:
    return (addr * 2654435761U) & (SCHED_TAB_SIZE - 1)


cdef inline uint32_t mh_hash(uint32_t addr, uint16_t port, uint32_t offset, uint64_t k0,
                             uint64_t k1) noexcept nogil:
    return hashing.hsiphash_u32(offset + port + addr, k0, k1)


def svc_hashkey(int proto, uint32_t addr, uint16_t port) -> int:
    """ip_vs_svc_hashkey with the netns term 0: the service-table bucket."""
    return svc_bucket(proto, addr, port)


def fwm_hashkey(uint32_t fwmark) -> int:
    """ip_vs_svc_fwm_hashkey with the netns term 0: the fwmark-table bucket."""
    return fwmark & SVC_TAB_MASK


def conn_hashkey(uint32_t caddr, uint16_t cport, uint8_t proto, uint32_t rnd, int bits) -> int:
    """ip_vs_conn_hashkey with the netns term 0: the connection-table bucket."""
    return conn_bucket(caddr, cport, proto, rnd, (1U << bits) - 1)


cdef inline uint32_t gcd(uint32_t a, uint32_t b) noexcept nogil:
    cdef uint32_t t
    while b:
        t = a % b
        a = b
        b = t
    return a


cdef inline int fls(uint32_t x) noexcept nogil:
    cdef int bits = 0
    while x:
        bits += 1
        x >>= 1
    return bits


def grown(old, Py_ssize_t capacity, fill=None):
    """An array of ``capacity`` (zeros or ``fill`` beyond the old length) starting with ``old``."""
    array = np.zeros(capacity, dtype=old.dtype)
    if fill is not None:
        array[:] = fill
    array[:len(old)] = old
    return array


# nonecheck off: `self` is never None in its own methods, and with the check (debug builds)
# Cython rejects `self.attr += 1` without the GIL.
@cython.final
@cython.nonecheck(False)
cdef class IPVS:
    """One network namespace's IPVS: services, destinations, schedulers, connections.

    Like one CPU's view of the kernel's tables, an IPVS serves one thread.
    """

    cdef int32_t[::1] _svc_heads
    cdef int32_t[::1] _fwm_heads
    cdef svc_t[::1] _svcs
    cdef dest_t[::1] _dests
    cdef conn_t[::1] _conns
    cdef int32_t[::1] _conn_heads
    cdef int32_t[::1] _tables  # dh/sh/mh lookup tables: destination ids, -1 empty
    cdef int32_t n_svc_slots
    cdef int32_t n_dest_slots
    cdef int32_t n_conn_slots
    cdef int32_t free_conn
    cdef int64_t tables_used
    cdef dict free_tables  # table size -> offsets released by removed services
    cdef uint32_t conn_mask
    cdef int32_t n_port_zero  # nullsvc_counter
    cdef readonly bint expire_quiescent_template
    cdef readonly bint expire_nodest_conn
    cdef readonly int conn_tab_bits
    cdef readonly uint32_t conn_rnd
    cdef readonly int64_t n_services
    cdef readonly int64_t n_dests
    cdef readonly int64_t n_connections
    cdef readonly int64_t hash_computations
    cdef readonly int64_t svc_compares
    cdef readonly int64_t conn_compares
    cdef readonly int64_t dests_examined
    cdef readonly int64_t conns_created
    cdef readonly int64_t timer_rearms
    cdef readonly int64_t conns_expired
    cdef readonly int64_t sched_ops
    cdef dict _arrays  # every numpy array behind the memoryviews, for model_bytes()

    def __init__(self, int conn_tab_bits=DEFAULT_CONN_TAB_BITS, uint64_t seed=0,
                 bint expire_quiescent_template=True, bint expire_nodest_conn=True):
        if not 1 <= conn_tab_bits <= 27:
            raise ValueError("conn_tab_bits must be 1..27")
        cdef uint64_t state = seed
        self.conn_rnd = hashing.rng_u32(&state)  # ip_vs_conn_rnd
        self.conn_tab_bits = conn_tab_bits
        self.conn_mask = (1U << conn_tab_bits) - 1
        self.expire_quiescent_template = expire_quiescent_template
        self.expire_nodest_conn = expire_nodest_conn
        self.free_conn = -1
        self.free_tables = {}
        self._arrays = {}
        self._set("svc_heads", np.full(SVC_TAB_SIZE, -1, dtype=np.int32))
        self._set("fwm_heads", np.full(SVC_TAB_SIZE, -1, dtype=np.int32))
        self._set("conn_heads", np.full(1 << conn_tab_bits, -1, dtype=np.int32))
        self._set("svcs", np.zeros(16, dtype=SVC_DTYPE))
        self._set("dests", np.zeros(16, dtype=DEST_DTYPE))
        self._set("conns", np.zeros(INITIAL_CONNECTIONS, dtype=L.IPVS_CONN_DTYPE))
        self._set("tables", np.full(SCHED_TAB_SIZE, -1, dtype=np.int32))

    cdef void _set(self, str name, array):
        self._arrays[name] = array
        if name == "svc_heads":
            self._svc_heads = array
        elif name == "fwm_heads":
            self._fwm_heads = array
        elif name == "conn_heads":
            self._conn_heads = array
        elif name == "svcs":
            self._svcs = array
        elif name == "dests":
            self._dests = array
        elif name == "conns":
            self._conns = array
        else:
            self._tables = array

    @classmethod
    def from_arrays(cls, services, dests, **options):
        """An IPVS holding ``services`` (IPVS_SERVICE_DTYPE records) and ``dests``
        (IPVS_DEST_DTYPE records), added in array order as ipvsadm-restore would: ids are the
        array positions, and each service's list ends up newest first (list_add_rcu)."""
        services = np.asarray(services, dtype=L.IPVS_SERVICE_DTYPE)
        dests = np.asarray(dests, dtype=L.IPVS_DEST_DTYPE)
        ipvs = cls(**options)
        for s in services.tolist():
            addr, port, proto, scheduler, flags, fwmark, timeout, netmask = s
            ipvs.add_service(addr, port, proto, L.IPVS_SCHEDULERS[scheduler], flags, timeout,
                             fwmark, netmask)
        for d in dests.tolist():
            service, addr, port, _, weight, active, inactive, flags = d
            ipvs.add_dest(service, addr, port, weight, flags, active, inactive)
        return ipvs

    # ---- control plane: services -----------------------------------------------------------

    def add_service(self, uint32_t addr, uint16_t port, uint8_t proto, str scheduler="rr",
                    uint32_t flags=0, uint32_t timeout=0, uint32_t fwmark=0,
                    uint32_t netmask=0xFFFFFFFF) -> int:
        """ip_vs_add_service; returns the service id."""
        if scheduler not in L.IPVS_SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}")
        cdef ipvs_result_t scratch
        memset(&scratch, 0, sizeof(scratch))
        if (self.fwm_find(fwmark, &scratch) if fwmark else self.svc_find(proto, addr, port, &scratch)) >= 0:
            raise ValueError("service exists")
        if self.n_svc_slots == self._svcs.shape[0]:
            self._set("svcs", grown(self._arrays["svcs"], 2 * self.n_svc_slots))
        cdef int32_t s = self.n_svc_slots
        self.n_svc_slots += 1
        cdef svc_t *svc = &self._svcs[s]
        memset(svc, 0, sizeof(svc_t))
        svc.addr, svc.port, svc.proto, svc.flags = addr, port, proto, flags
        svc.timeout, svc.fwmark, svc.netmask = timeout, fwmark, netmask
        svc.scheduler = L.IPVS_SCHEDULERS.index(scheduler)
        svc.live = 1
        svc.dests = -1
        svc.cursor = HEAD
        svc.table = self.take_table(svc.scheduler)
        self.sched_changed(s)  # init_service
        cdef int32_t *chain = self.svc_chain(s)
        svc.next = chain[0]
        chain[0] = s
        if port == 0:
            self.n_port_zero += 1
        self.n_services += 1
        return s

    def remove_service(self, int32_t s) -> None:
        """ip_vs_del_service: unhash, drop the scheduler state, unlink every destination."""
        self._check_service(s)
        cdef svc_t *svc = &self._svcs[s]
        cdef int32_t *head = self.svc_chain(s)
        cdef int32_t prev = -1, e = head[0]
        while e != s:
            prev = e
            e = self._svcs[e].next
        if prev < 0:
            head[0] = svc.next
        else:
            self._svcs[prev].next = svc.next
        cdef int32_t d = svc.dests
        while d >= 0:
            self._dests[d].flags &= ~DEST_F_AVAILABLE
            self.n_dests -= 1
            d = self._dests[d].next
        if svc.table >= 0:
            self.free_tables.setdefault(self.table_size(svc.scheduler), []).append(svc.table)
        if svc.port == 0:
            self.n_port_zero -= 1
        svc.live = 0
        svc.dests = -1
        svc.n_dests = 0
        self.n_services -= 1

    def find_service(self, uint8_t proto, uint32_t addr, uint16_t port, uint32_t fwmark=0) -> int:
        """The service a first packet would match (ip_vs_service_find), or -1; not counted."""
        cdef ipvs_result_t scratch
        cdef packet_t p
        memset(&scratch, 0, sizeof(scratch))
        memset(&p, 0, sizeof(p))
        p.proto, p.dst, p.dport, p.mark = proto, addr, port, fwmark
        return self.service_find(&p, &scratch)

    cdef int32_t *svc_chain(self, int32_t s) noexcept:
        cdef svc_t *svc = &self._svcs[s]
        if svc.fwmark:
            return &self._fwm_heads[svc.fwmark & SVC_TAB_MASK]
        return &self._svc_heads[svc_bucket(svc.proto, svc.addr, svc.port)]

    def _check_service(self, int32_t s) -> None:
        if not (0 <= s < self.n_svc_slots and self._svcs[s].live):
            raise ValueError(f"no service {s}")

    cdef Py_ssize_t table_size(self, uint8_t scheduler):
        return M if scheduler == SCHED_MH else SCHED_TAB_SIZE if scheduler in (SCHED_SH, SCHED_DH) else 0

    cdef int64_t take_table(self, uint8_t scheduler):
        cdef Py_ssize_t size = self.table_size(scheduler)
        if size == 0:
            return -1
        if self.free_tables.get(size):
            return self.free_tables[size].pop()
        cdef int64_t offset = self.tables_used
        self.tables_used += size
        if self.tables_used > self._tables.shape[0]:
            self._set("tables", grown(self._arrays["tables"], 2 * self.tables_used, -1))
        return offset

    # ---- control plane: destinations -------------------------------------------------------

    def add_dest(self, int32_t s, uint32_t addr, uint16_t port, int32_t weight=1,
                 uint32_t flags=0, int32_t activeconns=0, int32_t inactconns=0) -> int:
        """ip_vs_add_dest: the new destination goes first in the list; returns its id."""
        self._check_service(s)
        cdef int32_t d = self._svcs[s].dests
        while d >= 0:
            if self._dests[d].addr == addr and self._dests[d].port == port:
                raise ValueError("destination exists")
            d = self._dests[d].next
        if self.n_dest_slots == self._dests.shape[0]:
            self._set("dests", grown(self._arrays["dests"], 2 * self.n_dest_slots))
        d = self.n_dest_slots
        self.n_dest_slots += 1
        cdef dest_t *dest = &self._dests[d]
        memset(dest, 0, sizeof(dest_t))
        dest.service, dest.addr, dest.port = s, addr, port
        dest.weight = dest.last_weight = weight
        dest.flags = (flags & DEST_F_OVERLOAD) | DEST_F_AVAILABLE
        dest.activeconns, dest.inactconns = activeconns, inactconns
        dest.next = self._svcs[s].dests
        self._svcs[s].dests = d
        self._svcs[s].n_dests += 1
        self.n_dests += 1
        if self._svcs[s].scheduler != SCHED_RR:  # rr has no add_dest hook
            self.sched_changed(s)
        return d

    def update_dest(self, int32_t d, weight=None, overloaded=None) -> None:
        """__ip_vs_update_dest: a new weight (0 quiesces) and/or the OVERLOAD flag."""
        self._check_dest(d)
        cdef dest_t *dest = &self._dests[d]
        if weight is not None:
            dest.weight = weight
            if weight != 0:  # keep the last_weight with latest non-0 weight
                dest.last_weight = weight
        if overloaded is not None:
            dest.flags = (dest.flags | DEST_F_OVERLOAD) if overloaded else (dest.flags & ~DEST_F_OVERLOAD)
        if self._svcs[dest.service].scheduler != SCHED_RR:
            self.sched_changed(dest.service)

    def remove_dest(self, int32_t d) -> None:
        """ip_vs_del_dest: unlink, run the scheduler's del_dest, keep it for its connections."""
        self._check_dest(d)
        cdef int32_t s = self._dests[d].service
        cdef svc_t *svc = &self._svcs[s]
        cdef int32_t prev = HEAD, e = svc.dests
        while e != d:
            prev = e
            e = self._dests[e].next
        if prev == HEAD:
            svc.dests = self._dests[d].next
        else:
            self._dests[prev].next = self._dests[d].next
        svc.n_dests -= 1
        self._dests[d].flags &= ~DEST_F_AVAILABLE
        self.n_dests -= 1
        if svc.scheduler == SCHED_RR:
            # ip_vs_rr_del_dest: a cursor on the removed one moves to the one before it.
            if svc.cursor == d:
                svc.cursor = prev
            self.sched_ops += 1
        else:
            self.sched_changed(s)

    def _check_dest(self, int32_t d) -> None:
        if not (0 <= d < self.n_dest_slots and self._dests[d].flags & DEST_F_AVAILABLE):
            raise ValueError(f"no destination {d}")

    def service_dests(self, int32_t s) -> list:
        """The service's destination ids in list order."""
        self._check_service(s)
        out = []
        cdef int32_t d = self._svcs[s].dests
        while d >= 0:
            out.append(d)
            d = self._dests[d].next
        return out

    def destinations(self):
        """IPVS_DEST_DTYPE records of every destination id (removed ones lack AVAILABLE)."""
        mine = self._arrays["dests"][:self.n_dest_slots]
        out = np.zeros(self.n_dest_slots, dtype=L.IPVS_DEST_DTYPE)
        for name in ("service", "addr", "port", "weight", "activeconns", "inactconns", "flags"):
            out[name] = mine[name]
        return out

    def connections(self):
        """IPVS_CONN_DTYPE copy of every connection slot handed out so far."""
        return self._arrays["conns"][:self.n_conn_slots].copy()

    @property
    def conn_heads(self):
        return self._arrays["conn_heads"].copy()

    # ---- data plane (ip_vs_in) -------------------------------------------------------------

    def reserve(self, Py_ssize_t more) -> None:
        """Room for ``more`` new connection slots (never inside the nogil loop)."""
        cdef Py_ssize_t capacity = self._conns.shape[0]
        while capacity < self.n_conn_slots + more:
            capacity *= 2
        if capacity > self._conns.shape[0]:
            self._set("conns", grown(self._arrays["conns"], capacity))

    def process(self, const packet_t[::1] packets, ipvs_result_t[::1] results,
                int64_t[::1] ns=None) -> None:
        """Run each packet through ip_vs_in; fill ``results`` and add times into ``ns``."""
        cdef Py_ssize_t n = packets.shape[0], i
        if results.shape[0] < n or (ns is not None and ns.shape[0] < n):
            raise ValueError("results and ns need one slot per packet")
        self.reserve(2 * n)  # at most a connection and a template per packet
        cdef bint timed = ns is not None
        cdef int64_t start = 0
        with nogil:
            for i in range(n):
                if timed:
                    start = now_ns()
                self.handle(&packets[i], &results[i])
                if timed:
                    ns[i] += now_ns() - start
                self.add_totals(&results[i])

    cdef void handle(self, const packet_t *p, ipvs_result_t *r) noexcept nogil:
        memset(r, 0, sizeof(ipvs_result_t))
        r.service = -1
        r.dest = -1
        if p.proto != IPPROTO_TCP and p.proto != IPPROTO_UDP and p.proto != IPPROTO_SCTP:
            r.verdict = V_NOT_SERVICE  # no ip_vs_protocol: accepted untouched
            return
        cdef int32_t c = self.conn_in_get(p, r)
        if c >= 0:
            self.established(c, p, r)
            return
        if p.proto != IPPROTO_UDP and not (p.ctstate & CT_NEW):
            r.verdict = V_NO_CONN  # tcp_conn_schedule schedules only a SYN
            return
        cdef int32_t s = self.service_find(p, r)
        if s < 0:
            r.verdict = V_NOT_SERVICE
            return
        r.service = s
        if self._svcs[s].flags & SVC_F_PERSISTENT:
            c = self.sched_persist(s, p, r)
        else:
            c = self.schedule(s, p, r)
        if c < 0:
            r.verdict = V_NO_DEST
            return
        r.timer_rearms += 1  # ip_vs_conn_put arms the new connection's timer
        self.forward(c, r)

    cdef void forward(self, int32_t c, ipvs_result_t *r) noexcept nogil:
        r.verdict = V_FORWARD
        r.dnat_ip = self._conns[c].daddr
        r.dnat_port = self._conns[c].dport
        r.dest = self._conns[c].dest

    cdef void established(self, int32_t c, const packet_t *p, ipvs_result_t *r) noexcept nogil:
        cdef conn_t *conn = &self._conns[c]
        cdef dest_t *dest = &self._dests[conn.dest]
        r.conn_hit = 1
        r.service = dest.service
        r.dest = conn.dest
        if not (dest.flags & DEST_F_AVAILABLE):
            r.verdict = V_DEST_GONE
            if self.expire_nodest_conn:
                self.drop_conn(c)
            return
        if conn.flags & CONN_INACTIVE and not (p.ctstate & CT_NEW):
            conn.flags &= ~CONN_INACTIVE  # the TCP/SCTP state machine reaches ESTABLISHED
            dest.inactconns -= 1
            dest.activeconns += 1
        conn.expires = p.time + self.conn_timeout(c)
        r.timer_rearms += 1
        self.forward(c, r)

    cdef void add_totals(self, const ipvs_result_t *r) noexcept nogil:
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

    cdef int32_t service_find(self, const packet_t *p, ipvs_result_t *r) noexcept nogil:
        cdef int32_t s
        if p.mark:
            s = self.fwm_find(p.mark, r)
            if s >= 0:
                return s
        s = self.svc_find(p.proto, p.dst, p.dport, r)
        if s < 0 and self.n_port_zero > 0:
            s = self.svc_find(p.proto, p.dst, 0, r)  # the port-zero catch-all
        return s

    cdef int32_t svc_find(self, uint8_t proto, uint32_t addr, uint16_t port,
                          ipvs_result_t *r) noexcept nogil:
        r.hash_computations += 1
        cdef int32_t s = self._svc_heads[svc_bucket(proto, addr, port)]
        while s >= 0:
            r.svc_compares += 1
            if self._svcs[s].addr == addr and self._svcs[s].port == port and self._svcs[s].proto == proto:
                return s
            s = self._svcs[s].next
        return -1

    cdef int32_t fwm_find(self, uint32_t fwmark, ipvs_result_t *r) noexcept nogil:
        r.hash_computations += 1
        cdef int32_t s = self._fwm_heads[fwmark & SVC_TAB_MASK]
        while s >= 0:
            r.svc_compares += 1
            if self._svcs[s].fwmark == fwmark:
                return s
            s = self._svcs[s].next
        return -1

    # ---- connections (ip_vs_conn.c) --------------------------------------------------------

    cdef int32_t conn_in_get(self, const packet_t *p, ipvs_result_t *r) noexcept nogil:
        r.hash_computations += 1
        cdef int32_t c = self._conn_heads[conn_bucket(p.src, p.sport, p.proto, self.conn_rnd, self.conn_mask)]
        cdef conn_t *conn
        while c >= 0:
            conn = &self._conns[c]
            r.conn_compares += 1
            if (conn.cport == p.sport and conn.vport == p.dport and conn.caddr == p.src
                    and conn.vaddr == p.dst and conn.proto == p.proto
                    and not (conn.flags & CONN_TEMPLATE)):
                return c
            c = conn.next
        return -1

    cdef int32_t template_find(self, uint32_t caddr, uint32_t vaddr, uint16_t vport, uint8_t proto,
                               ipvs_result_t *r) noexcept nogil:
        """ip_vs_ct_in_get for ⟨proto, caddr, 0, vaddr, vport⟩."""
        r.hash_computations += 1
        cdef int32_t t = self._conn_heads[conn_bucket(caddr, 0, proto, self.conn_rnd, self.conn_mask)]
        cdef conn_t *conn
        while t >= 0:
            conn = &self._conns[t]
            r.conn_compares += 1
            if (conn.flags & CONN_TEMPLATE and conn.caddr == caddr and conn.vaddr == vaddr
                    and conn.vport == vport and conn.cport == 0 and conn.proto == proto):
                return t
            t = conn.next
        return -1

    cdef uint32_t conn_timeout(self, int32_t c) noexcept nogil:
        cdef conn_t *conn = &self._conns[c]
        if conn.flags & CONN_TEMPLATE:
            return self._svcs[self._dests[conn.dest].service].timeout
        if conn.proto == IPPROTO_UDP:
            return UDP_TIMEOUT
        return TCP_SYN_RECV_TIMEOUT if conn.flags & CONN_INACTIVE else TCP_ESTABLISHED_TIMEOUT

    cdef int32_t conn_new(self, uint32_t caddr, uint16_t cport, uint32_t vaddr, uint16_t vport,
                          uint8_t proto, int32_t d, uint16_t dport, uint8_t flags, uint32_t now,
                          ipvs_result_t *r) noexcept nogil:
        """ip_vs_conn_new: allocate, bind the destination (ip_vs_bind_dest), hash."""
        cdef int32_t c = self.free_conn
        if c >= 0:
            self.free_conn = self._conns[c].next
        else:
            c = self.n_conn_slots
            self.n_conn_slots += 1
        cdef conn_t *conn = &self._conns[c]
        cdef dest_t *dest = &self._dests[d]
        conn.caddr, conn.cport, conn.vaddr, conn.vport, conn.proto = caddr, cport, vaddr, vport, proto
        conn.daddr, conn.dport, conn.dest = dest.addr, dport, d
        conn.control, conn.n_control = -1, 0
        conn.flags = CONN_IN_USE | flags
        if flags & CONN_TEMPLATE:
            dest.persistconns += 1
        elif proto == IPPROTO_UDP:
            dest.activeconns += 1
        else:  # a SYN leaves a TCP (or SCTP) connection in SYN_RECV: inactive
            conn.flags |= CONN_INACTIVE
            dest.inactconns += 1
        conn.expires = now + self.conn_timeout(c)
        self.hash_in(c, r)
        self.n_connections += 1
        r.conns_created += 1
        return c

    cdef void hash_in(self, int32_t c, ipvs_result_t *r) noexcept nogil:
        cdef conn_t *conn = &self._conns[c]
        r.hash_computations += 1
        cdef uint32_t b = conn_bucket(conn.caddr, conn.cport, conn.proto, self.conn_rnd, self.conn_mask)
        conn.next = self._conn_heads[b]
        self._conn_heads[b] = c

    cdef void unhash(self, int32_t c) noexcept nogil:
        # The kernel's hlist unlinks in O(1); walking our singly linked chain is not counted.
        cdef conn_t *conn = &self._conns[c]
        cdef uint32_t b = conn_bucket(conn.caddr, conn.cport, conn.proto, self.conn_rnd, self.conn_mask)
        cdef int32_t prev = -1, e = self._conn_heads[b]
        while e != c:
            prev = e
            e = self._conns[e].next
        if prev < 0:
            self._conn_heads[b] = conn.next
        else:
            self._conns[prev].next = conn.next

    cdef void drop_conn(self, int32_t c) noexcept nogil:
        """ip_vs_conn_expire: unhash, unbind the destination and the controlling template."""
        cdef conn_t *conn = &self._conns[c]
        cdef dest_t *dest = &self._dests[conn.dest]
        self.unhash(c)
        if conn.flags & CONN_TEMPLATE:
            dest.persistconns -= 1
        elif conn.flags & CONN_INACTIVE:
            dest.inactconns -= 1
        else:
            dest.activeconns -= 1
        if conn.control >= 0:
            self._conns[conn.control].n_control -= 1
        conn.flags = 0
        conn.next = self.free_conn
        self.free_conn = c
        self.n_connections -= 1
        self.conns_expired += 1

    def expire(self, uint32_t now) -> int:
        """Fire every timer due by ``now``; returns the connections and templates removed."""
        cdef int64_t before = self.conns_expired
        cdef int32_t c
        cdef conn_t *conn
        cdef uint32_t timeout
        for c in range(self.n_conn_slots):
            conn = &self._conns[c]
            if conn.flags & CONN_IN_USE and not (conn.flags & CONN_TEMPLATE) and conn.expires <= now:
                self.drop_conn(c)
        for c in range(self.n_conn_slots):  # templates, once the connections they control are gone
            conn = &self._conns[c]
            if conn.flags & CONN_IN_USE and conn.flags & CONN_TEMPLATE and conn.expires <= now:
                if conn.n_control == 0:
                    self.drop_conn(c)
                    continue
                timeout = max(self.conn_timeout(c), 1)  # still in use: the timer is re-armed
                while conn.expires <= now:
                    conn.expires += timeout
        return self.conns_expired - before

    # ---- ip_vs_schedule --------------------------------------------------------------------

    cdef int32_t schedule(self, int32_t s, const packet_t *p, ipvs_result_t *r) noexcept nogil:
        cdef svc_t *svc = &self._svcs[s]
        if svc.fwmark == 0 and p.dport != svc.port:
            return -1  # "port zero only supported in persistent services"
        cdef int32_t d = self.pick(s, p, r)
        if d < 0:
            return -1
        cdef uint16_t dport = self._dests[d].port if self._dests[d].port else p.dport
        return self.conn_new(p.src, p.sport, p.dst, p.dport, p.proto, d, dport, 0, p.time, r)

    cdef int32_t sched_persist(self, int32_t s, const packet_t *p, ipvs_result_t *r) noexcept nogil:
        """ip_vs_sched_persist: find or create the client's template, then the connection."""
        cdef svc_t *svc = &self._svcs[s]
        cdef uint32_t snet = p.src & svc.netmask
        cdef uint8_t proto = p.proto
        cdef uint32_t vaddr = p.dst
        cdef uint16_t vport = 0
        cdef bint port_match = p.dport == svc.port
        if port_match:
            if svc.port != FTPPORT:
                vport = p.dport
        elif svc.fwmark:  # fwmark template <IPPROTO_IP, caddr, 0, fwmark, 0>
            proto = IPPROTO_IP
            vaddr = svc.fwmark
        cdef int32_t t = self.template_find(snet, vaddr, vport, proto, r)
        if t >= 0 and not self.template_valid(t, r):
            t = -1
        cdef int32_t d
        if t < 0:
            d = self.pick(s, p, r)
            if d < 0:
                return -1
            t = self.conn_new(snet, 0, vaddr, vport, proto, d,
                              self._dests[d].port if port_match and svc.port != FTPPORT else 0,
                              CONN_TEMPLATE, p.time, r)
        d = self._conns[t].dest
        cdef uint16_t dport = p.dport
        if dport == svc.port and self._dests[d].port:
            dport = self._dests[d].port
        cdef int32_t c = self.conn_new(p.src, p.sport, p.dst, p.dport, p.proto, d, dport, 0, p.time, r)
        self._conns[c].control = t  # ip_vs_control_add
        self._conns[t].n_control += 1
        self._conns[t].expires = p.time + self.conn_timeout(t)  # ip_vs_conn_put(ct)
        r.timer_rearms += 1
        return c

    cdef bint template_valid(self, int32_t t, ipvs_result_t *r) noexcept nogil:
        """ip_vs_check_template; an invalid template is rehashed under vport/dport 0xffff."""
        cdef conn_t *tpl = &self._conns[t]
        cdef dest_t *dest = &self._dests[tpl.dest]
        if dest.flags & DEST_F_AVAILABLE and not (self.expire_quiescent_template and dest.weight == 0):
            return True
        if tpl.vport != 0xFFFF:
            self.unhash(t)
            tpl.vport = 0xFFFF
            tpl.dport = 0xFFFF
            tpl.cport = 0
            self.hash_in(t, r)
        return False

    # ---- schedulers ------------------------------------------------------------------------

    cdef int32_t pick(self, int32_t s, const packet_t *p, ipvs_result_t *r) noexcept nogil:
        cdef uint8_t scheduler = self._svcs[s].scheduler
        if scheduler == SCHED_RR:
            return self.rr_pick(&self._svcs[s], r)
        if scheduler == SCHED_WRR:
            return self.wrr_pick(&self._svcs[s], r)
        if scheduler == SCHED_LC:
            return self.lc_pick(&self._svcs[s], r)
        if scheduler == SCHED_SED or scheduler == SCHED_WLC:
            return self.sed_pick(&self._svcs[s], r, scheduler == SCHED_WLC)
        if scheduler == SCHED_NQ:
            return self.nq_pick(&self._svcs[s], r)
        if scheduler == SCHED_DH:
            return self.dh_pick(&self._svcs[s], p, r)
        if scheduler == SCHED_SH:
            return self.sh_pick(&self._svcs[s], p, r)
        return self.mh_pick(&self._svcs[s], p, r)

    cdef inline bint usable(self, int32_t d) noexcept nogil:
        # is_unavailable()'s complement in sh, mh and dh; rr's test too.
        return self._dests[d].weight > 0 and not (self._dests[d].flags & DEST_F_OVERLOAD)

    cdef int32_t rr_pick(self, svc_t *svc, ipvs_result_t *r) noexcept nogil:
        cdef int32_t last = svc.cursor
        cdef int32_t d = svc.dests if last == HEAD else self._dests[last].next
        cdef int passes = 0
        while True:
            while d >= 0:
                r.dests_examined += 1
                if self.usable(d):
                    svc.cursor = d
                    return d
                if d == last:
                    return -1
                d = self._dests[d].next
            passes += 1
            if passes >= 2 or last == HEAD:  # from the head one pass covers every destination
                return -1
            d = svc.dests

    cdef int32_t wrr_pick(self, svc_t *svc, ipvs_result_t *r) noexcept nogil:
        cdef int32_t last = svc.cursor, d = svc.cursor, stop = -2
        cdef bint last_pass = False, restarted = False
        if svc.mw == 0:
            return -1
        while True:
            d = svc.dests if d == HEAD else self._dests[d].next
            while d >= 0:
                r.dests_examined += 1
                if not (self._dests[d].flags & DEST_F_OVERLOAD) and self._dests[d].weight >= svc.cw:
                    svc.cursor = d
                    return d
                if d == stop:
                    svc.cursor = d
                    return -1
                d = self._dests[d].next
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

    cdef inline int32_t conn_overhead(self, int32_t d) noexcept nogil:
        # ip_vs_dest_conn_overhead
        return (self._dests[d].activeconns << 8) + self._dests[d].inactconns

    cdef int32_t lc_pick(self, svc_t *svc, ipvs_result_t *r) noexcept nogil:
        cdef int32_t d = svc.dests, least = -1
        cdef uint32_t loh = 0, doh
        while d >= 0:
            r.dests_examined += 1
            if not (self._dests[d].flags & DEST_F_OVERLOAD) and self._dests[d].weight != 0:
                doh = <uint32_t>self.conn_overhead(d)  # ip_vs_lc keeps it unsigned
                if least < 0 or doh < loh:
                    least = d
                    loh = doh
            d = self._dests[d].next
        return least

    cdef inline bint sed_less(self, int64_t loh, int32_t least, int64_t doh, int32_t d) noexcept nogil:
        # doh/w_d < loh/w_least without division: loh * w_d > doh * w_least
        return loh * self._dests[d].weight > doh * self._dests[least].weight

    cdef int32_t sed_pick(self, svc_t *svc, ipvs_result_t *r, bint wlc) noexcept nogil:
        """ip_vs_sed_schedule, or with ``wlc`` ip_vs_wlc_schedule: only the overhead differs."""
        cdef int32_t d = svc.dests, least = -1
        cdef int64_t loh, doh
        while d >= 0:
            r.dests_examined += 1
            if self.usable(d):
                least = d
                break
            d = self._dests[d].next
        if least < 0:
            return -1
        loh = self.conn_overhead(least) if wlc else self._dests[least].activeconns + 1
        d = self._dests[least].next
        while d >= 0:
            r.dests_examined += 1
            if not (self._dests[d].flags & DEST_F_OVERLOAD):
                doh = self.conn_overhead(d) if wlc else self._dests[d].activeconns + 1
                if self.sed_less(loh, least, doh, d):
                    least = d
                    loh = doh
            d = self._dests[d].next
        return least

    cdef int32_t nq_pick(self, svc_t *svc, ipvs_result_t *r) noexcept nogil:
        cdef int32_t d = svc.dests, least = -1
        cdef int64_t loh = 0, doh
        while d >= 0:
            r.dests_examined += 1
            if not (self._dests[d].flags & DEST_F_OVERLOAD) and self._dests[d].weight != 0:
                if self._dests[d].activeconns == 0:
                    return d  # never queue: an idle server takes it at once
                doh = self._dests[d].activeconns + 1
                if least < 0 or self.sed_less(loh, least, doh, d):
                    least = d
                    loh = doh
            d = self._dests[d].next
        return least

    cdef int32_t dh_pick(self, svc_t *svc, const packet_t *p, ipvs_result_t *r) noexcept nogil:
        r.hash_computations += 1
        r.dests_examined += 1
        cdef int32_t d = self._tables[svc.table + dh_hash(p.dst)]
        return d if d >= 0 and self.usable(d) else -1

    cdef int32_t sh_pick(self, svc_t *svc, const packet_t *p, ipvs_result_t *r) noexcept nogil:
        cdef uint16_t port = p.sport if svc.flags & SVC_F_SCHED_PORT else 0
        cdef int32_t *table = &self._tables[svc.table]
        r.hash_computations += 1
        r.dests_examined += 1
        cdef uint32_t ihash = sh_hash(p.src, port)
        cdef int offset
        cdef int32_t d = table[ihash]
        if d < 0 or self.usable(d):
            return d
        if not (svc.flags & SVC_F_SCHED_FALLBACK):
            return -1
        for offset in range(SCHED_TAB_SIZE):  # ip_vs_sh_get_fallback
            r.hash_computations += 1
            r.dests_examined += 1
            d = table[((offset + ihash) % SCHED_TAB_SIZE + sh_hash(p.src, port)) % SCHED_TAB_SIZE]
            if self.usable(d):
                return d
        return -1

    cdef int32_t mh_pick(self, svc_t *svc, const packet_t *p, ipvs_result_t *r) noexcept nogil:
        cdef uint16_t port = p.sport if svc.flags & SVC_F_SCHED_PORT else 0
        cdef int32_t *table = &self._tables[svc.table]
        r.hash_computations += 1
        r.dests_examined += 1
        cdef uint32_t ihash = mh_hash(p.src, port, 0, MH_KEY1_0, MH_KEY1_1) % M
        cdef int offset
        cdef int32_t d = table[ihash]
        if d < 0 or self.usable(d):
            return d
        if not (svc.flags & SVC_F_SCHED_FALLBACK):
            return -1
        for offset in range(M):  # ip_vs_mh_get_fallback
            r.hash_computations += 1
            r.dests_examined += 1
            d = table[mh_hash(p.src, port, (offset + ihash) % M, MH_KEY1_0, MH_KEY1_1) % M]
            if d < 0 or self.usable(d):
                return d
        return -1

    # ---- memory ----------------------------------------------------------------------------

    def modelled_bytes(self, int n_cpus=1) -> int:
        """Kernel memory (§2.5): services and destinations (kmalloc-512 plus 40 B of per-CPU
        stats each), scheduler state, connection slab objects (templates included), the
        connection table and the two 256-bucket service tables."""
        svcs = self._arrays["svcs"][:self.n_svc_slots]
        schedulers = svcs["scheduler"][svcs["live"] == 1].tolist()
        per_cpu = IP_VS_CPU_STATS_BYTES * n_cpus
        return (self.n_services * (IP_VS_SERVICE_BYTES + per_cpu)
                + sum(SCHED_STATE_BYTES[L.IPVS_SCHEDULERS[k]] for k in schedulers)
                + self.n_dests * (IP_VS_DEST_BYTES + per_cpu)
                + self.n_connections * IP_VS_CONN_BYTES
                + BUCKET_BYTES * ((1 << self.conn_tab_bits) + 2 * SVC_TAB_SIZE))

    def model_bytes(self) -> int:
        """Bytes of this model's own arrays."""
        return sum(a.nbytes for a in self._arrays.values())

    # ---- scheduler state rebuilds ----------------------------------------------------------

    cdef void sched_changed(self, int32_t s):
        """The scheduler's init/add_dest/del_dest/upd_dest hook; counts its operations."""
        cdef uint8_t scheduler = self._svcs[s].scheduler
        if scheduler == SCHED_WRR:
            self.wrr_dest_changed(s)
        elif scheduler == SCHED_SH or scheduler == SCHED_DH:
            self.hash_table_reassign(s, scheduler == SCHED_SH)
        elif scheduler == SCHED_MH:
            self.mh_reassign(s)

    cdef void wrr_dest_changed(self, int32_t s):
        cdef svc_t *svc = &self._svcs[s]
        cdef int32_t d = svc.dests, max_weight = 0
        cdef uint32_t g = 0
        while d >= 0:
            if self._dests[d].weight > 0:
                g = gcd(self._dests[d].weight, g) if g else self._dests[d].weight
            max_weight = max(max_weight, self._dests[d].weight)
            d = self._dests[d].next
        self.sched_ops += 2 * svc.n_dests  # ip_vs_wrr_gcd_weight and ip_vs_wrr_max_weight
        svc.cursor = HEAD
        svc.di = g if g else 1
        svc.mw = max_weight - (svc.di - 1)
        if svc.cw > svc.mw or svc.cw == 0:
            svc.cw = svc.mw
        elif svc.di > 1:
            svc.cw = (svc.cw // svc.di) * svc.di + 1

    cdef void hash_table_reassign(self, int32_t s, bint weighted):
        """ip_vs_sh_reassign (each destination ``weight`` times) / ip_vs_dh_reassign (once)."""
        cdef svc_t *svc = &self._svcs[s]
        cdef int32_t *table = &self._tables[svc.table]
        cdef int32_t d = svc.dests, repeats = 0
        cdef int i
        for i in range(SCHED_TAB_SIZE):
            if svc.dests < 0:
                table[i] = -1
                continue
            if d < 0:
                d = svc.dests
            table[i] = d
            repeats += 1
            if not weighted or repeats >= self._dests[d].weight:
                d = self._dests[d].next
                repeats = 0
        self.sched_ops += SCHED_TAB_SIZE

    cdef void mh_reassign(self, int32_t s):
        """ip_vs_mh_dest_changed: gcd, shift, permutations, then the table (Maglev populate)."""
        cdef svc_t *svc = &self._svcs[s]
        cdef int32_t *table = &self._tables[svc.table]
        cdef int32_t d = svc.dests
        cdef uint32_t g = 0
        cdef int32_t max_weight = 0
        while d >= 0:
            if self._dests[d].last_weight > 0:
                g = gcd(self._dests[d].last_weight, g) if g else self._dests[d].last_weight
                max_weight = max(max_weight, self._dests[d].last_weight)
            d = self._dests[d].next
        self.sched_ops += 2 * svc.n_dests
        cdef int i
        if g < 1:
            for i in range(M):
                table[i] = -1
            self.sched_ops += M
            return
        cdef int rshift = max(fls(max_weight // g) - MH_TAB_BITS, 0)
        cdef Py_ssize_t n = svc.n_dests
        cdef uint32_t[::1] skip = np.empty(n, dtype=np.uint32)
        cdef uint32_t[::1] perm = np.empty(n, dtype=np.uint32)
        cdef int32_t[::1] turns = np.empty(n, dtype=np.int32)
        cdef int32_t[::1] order = np.empty(n, dtype=np.int32)
        cdef uint8_t[::1] taken = np.zeros(M, dtype=np.uint8)
        cdef int32_t lw
        d = svc.dests
        for i in range(n):  # ip_vs_mh_permutate: perm starts at the offset
            order[i] = d
            perm[i] = mh_hash(self._dests[d].addr, self._dests[d].port, 0, MH_KEY1_0, MH_KEY1_1) % M
            skip[i] = mh_hash(self._dests[d].addr, self._dests[d].port, 0, MH_KEY2_0, MH_KEY2_1) % (M - 1) + 1
            lw = self._dests[d].last_weight
            turns[i] = (lw // <int32_t>g) >> rshift
            if turns[i] == 0:
                turns[i] = lw != 0
            d = self._dests[d].next
        self.sched_ops += n
        self.sched_ops += mh_populate(table, order, skip, perm, turns, taken)


cdef int64_t mh_populate(int32_t *table, int32_t[::1] order, uint32_t[::1] skip,
                         uint32_t[::1] perm, int32_t[::1] turns, uint8_t[::1] taken) noexcept:
    """ip_vs_mh_populate: rounds over the destinations, each taking ``turns`` free slots along
    its permutation; returns the slots probed."""
    cdef Py_ssize_t n = order.shape[0], i = 0
    cdef int filled = 0, taken_in_turn = 0
    cdef int64_t probes = 0
    cdef uint32_t c
    while True:
        i = 0
        while i < n:
            if turns[i] < 1:  # ignore added server with zero weight
                i += 1
                continue
            c = perm[i]
            probes += 1
            while taken[c]:
                perm[i] += skip[i]
                if perm[i] >= M:
                    perm[i] -= M
                c = perm[i]
                probes += 1
            taken[c] = 1
            table[c] = order[i]
            filled += 1
            if filled == M:
                return probes
            taken_in_turn += 1
            if taken_in_turn >= turns[i]:
                taken_in_turn = 0
                i += 1
