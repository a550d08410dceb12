"""Measurements on one node's data path, one module per mode.

Each ``bench/measure/<mode>.py`` assembles the mode's kernels into the node's data path (a
``<Mode>Datapath`` class) and defines ``measure(point)``: generate the cluster, write and load
the mode's rules, send new connections to services, new connections that are not to a
service, and established packets, and return one record per workload. ``MEASURE`` maps each
mode to it; the sweep (bench/sweep.py) runs them.
"""
from bench.measure import ebpf, iptables, iptables_nft, ipvs, nftables, userspace

MEASURE = {
    "iptables": iptables.measure,
    "iptables-nft": iptables_nft.measure,  # iptables mode's rules on the nf_tables backend
    "ipvs": ipvs.measure,
    "nftables": nftables.measure,
    "userspace": userspace.measure,
    "ebpf": ebpf.measure,  # a Cilium-like reference model, not a kube-proxy mode
}
