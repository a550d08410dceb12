"""The ipsets a table's ``-m set`` matches test, as kernels.hashset objects.

``build_sets`` turns loaded ``ipset save`` sets (bench.loaders.ipvs.IpSet, read by duck typing
so that kernels does not depend on bench) into HashSet / BitmapPort objects of one backend,
aligned with a CompiledTable's ``set_names``. ``table_sets`` is what both Table backends call
to check such a list and learn each set's type.

A set's type is read from its class and key layout, which is the kernel's element struct
(kernels.layout.ipset_key_*): bitmap:port is a BitmapPort; an "ipset"-policy HashSet with
4-byte keys is hash:ip, 8 bytes hash:ip,port, 12 bytes hash:ip,port,ip, or hash:ip,port,net
when it keeps prefixes at IPSET_NET_OFFSET. hash:net (which kube-proxy does not create) is
not modelled.
"""
from __future__ import annotations

import numpy as np

import kernels
from kernels import layout as L

_KEY_LENGTHS = {4: L.SETTYPE_IP, 8: L.SETTYPE_IP_PORT, 12: L.SETTYPE_IP_PORT_IP}


def build_sets(ipsets: dict, names: list[str], backend: str | None = None, seed: int = 0) -> list:
    """One set object per name (None where ``ipsets`` has no such set: the Table then refuses
    the table, naming it). Set i draws its hash initval from ``seed + i``."""
    hashset = kernels.load("hashset", backend)
    return [_build(ipsets[name], hashset, seed + i) if name in ipsets else None
            for i, name in enumerate(names)]


def _build(ipset, hashset, seed: int):
    entries = ipset.entries
    if ipset.type == "bitmap:port":
        bitmap = hashset.BitmapPort(*ipset.port_range)
        bitmap.insert(np.array([port for port, in entries], dtype=np.uint16))
        return bitmap
    nets = {}
    if ipset.type == "hash:ip":
        keys = L.ipset_key_ip([address for address, in entries])
    elif ipset.type == "hash:ip,port":
        keys = L.ipset_key_ip_port(*_columns(entries, 3))
    elif ipset.type == "hash:ip,port,ip":
        keys = L.ipset_key_ip_port_ip(*_columns(entries, 4))
    elif ipset.type == "hash:ip,port,net":
        addresses, protos, ports, networks = _columns(entries, 4)
        keys = L.ipset_key_ip_port_net(addresses, protos, ports, [net for net, _ in networks],
                                       [prefix for _, prefix in networks])
        nets = dict(net_offset=L.IPSET_NET_OFFSET, cidr_offset=L.IPSET_CIDR_OFFSET)
    else:
        raise ValueError(f"set {ipset.name!r}: type {ipset.type} is not modelled")
    hashed = hashset.HashSet(keys.shape[1], "ipset", seed, hashsize=ipset.hashsize,
                             maxelem=ipset.maxelem, **nets)
    hashed.insert(keys)
    return hashed


def _columns(entries: list[tuple], width: int) -> list[list]:
    return [list(column) for column in zip(*entries)] if entries else [[] for _ in range(width)]


def table_sets(set_names: list[str], sets, hashset) -> tuple[list, list[int]]:
    """Check ``sets`` against the names a table uses; returns (sets, their SETTYPE_* codes).

    ``hashset`` is the Table's own backend module: a set of the other backend is refused."""
    sets = list(sets or [])
    if len(sets) > len(set_names):
        raise ValueError(f"{len(sets)} sets given for a table that uses {len(set_names)}")
    sets += [None] * (len(set_names) - len(sets))
    for name, s in zip(set_names, sets):
        if s is None:
            raise ValueError(f"the table matches set {name!r}, which was not supplied")
    return sets, [_set_type(name, s, hashset) for name, s in zip(set_names, sets)]


def _set_type(name: str, s, hashset) -> int:
    if isinstance(s, hashset.BitmapPort):
        return L.SETTYPE_BITMAP_PORT
    if isinstance(s, hashset.HashSet) and s.policy == "ipset":
        if s.net_offset == L.IPSET_NET_OFFSET and s.key_len == 12:
            return L.SETTYPE_IP_PORT_NET
        if s.net_offset < 0 and s.key_len in _KEY_LENGTHS:
            return _KEY_LENGTHS[s.key_len]
    raise ValueError(f"set {name!r}: {s!r} is not one of this backend's ipset types "
                     f"({hashset.__name__}.HashSet with an ipset key layout, or BitmapPort)")
