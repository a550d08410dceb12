"""iptables mode on the nf_tables backend (iptables-nft): :class:`IptablesNftDatapath` and its
sweep point.

The same kube-proxy rules as bench/measure/iptables.py, written and loaded the same way, then
translated as iptables-nft stores them (bench/loaders/iptables_nft.py) and walked by the
nftables kernel: one ``ip nat`` and one ``ip filter`` table, each a kernels.nftables Ruleset
whose compat expressions run the xt extensions of a legacy Table built from the same compiled
table with the seed the legacy path gives it. The path is the legacy one (conntrack, nat
PREROUTING, DNAT, filter INPUT or FORWARD, nat POSTROUTING, confirm), so the two backends'
records compare workload by workload: same verdicts, different per-rule work.

Per packet the nft path also counts ``expressions`` (every table walked); ``entries_visited``
counts nft rules started (no policy or chain-tail entries: nft has none).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

import kernels
from bench.loaders.iptables import Ruleset
from bench.loaders.iptables_nft import NftTranslation, translate
from bench.measure.iptables import IptablesDatapath, run_workloads
from bench.measure.path import PathResult, path_record
from bench.netaddr import ip_to_int
from kernels import layout as L


@dataclass
class NftPathResult(PathResult):
    """PathResult plus the nft expressions each packet evaluated, every table included."""

    expressions: np.ndarray = None


class IptablesNftDatapath(IptablesDatapath):
    """conntrack + the ``ip nat`` and ``ip filter`` tables iptables-nft makes of one node's
    iptables rules, on one kernel backend. The path is IptablesDatapath's; only the tables and
    their walk differ (each walk's results are turned into RESULT_DTYPE, expressions counted
    as ``match_calls``)."""

    def __init__(self, ruleset: Ruleset, node_ips: list[str], seed: int = 0,
                 backend: str | None = None, conntrack_buckets: int = 262144):
        iptables = kernels.load("iptables", backend)
        nftables = kernels.load("nftables", backend)
        conntrack = kernels.load("conntrack", backend)
        self.local = np.array(sorted(ip_to_int(ip) for ip in node_ips), dtype=np.uint32)
        self.translation: NftTranslation = translate(ruleset, seed)
        # The legacy datapath seeds nat with `seed`, filter with `seed + 1`: the xt state (and
        # RNG) each table's compat expressions use gets the same seeds.
        self.nat = self._table(iptables, nftables, ruleset, "nat", seed)
        self.filter = self._table(iptables, nftables, ruleset, "filter", seed + 1)
        self.conntrack = conntrack.ConntrackTable(buckets=conntrack_buckets, seed=seed)
        self.timer_overhead = int(iptables.timer_overhead_ns())

    def _table(self, iptables, nftables, ruleset: Ruleset, name: str, seed: int):
        nft = nftables.Ruleset(self.translation.compiled[name], self.local, seed)
        nft.attach_xt(iptables.Table.from_compiled(ruleset.tables[name], self.local, seed=seed))
        return nft

    def _walk(self, table, packets: np.ndarray, hook: int, ns: np.ndarray) -> np.ndarray:
        results = np.zeros(len(packets), dtype=L.NFT_RESULT_DTYPE)
        stage_ns = np.zeros(len(packets), dtype=np.int64)
        table.run(packets, hook, results, stage_ns)
        ns += np.maximum(stage_ns - self.timer_overhead, 0)
        return as_legacy_results(results)

    @staticmethod
    def _path_result(ns, hit, nat, filt, post, after, compares) -> NftPathResult:
        path = IptablesDatapath._path_result(ns, hit, nat, filt, post, after, compares)
        expressions = nat["match_calls"].astype(np.int64) + filt["match_calls"] + post["match_calls"]
        return NftPathResult(**vars(path), expressions=expressions)


def as_legacy_results(nft: np.ndarray) -> np.ndarray:
    """NFT_RESULT_DTYPE records as RESULT_DTYPE ones (same verdict codes): rules started as
    ``entries_visited``, expressions as ``match_calls``, set lookups as ``set_probes``."""
    out = np.zeros(len(nft), dtype=L.RESULT_DTYPE)
    for name in ("verdict", "dnat_ip", "dnat_port", "mark", "entries_visited", "jumps", "rng_draws"):
        out[name] = nft[name]
    out["match_calls"] = nft["expressions"]
    out["set_probes"] = nft["set_lookups"]
    out["set_compares"] = nft["bucket_entries_compared"]
    return out


def measure(point) -> list[dict]:
    """iptables.measure's workloads on the nft backend; records carry ``iptables_backend:
    "nft"`` (``backend`` is already every record's kernel backend, bench/results.py) and
    ``expressions_mean``. The control plane is iptables-restore's (bench.measure.iptables)."""
    ruleset, rules, sync, datapath, workloads = run_workloads(point, IptablesNftDatapath)
    nft_tables = [datapath.nat, datapath.filter]
    common = {
        "kind": "point", "point_id": point.point_id, **asdict(point), "iptables_backend": "nft",
        "rules": rules,
        "expressions": datapath.translation.expression_counts(),
        "kernel_bytes": sum(t.modelled_bytes() for t in nft_tables) + datapath.conntrack.modelled_bytes(),
        # the legacy blobs too: the compat expressions' xt data lives there
        "model_bytes": sum(t.model_bytes() for t in nft_tables) + datapath.conntrack.model_bytes()
                       + sum(t.blob.nbytes for t in ruleset.tables.values()),
        **sync,
    }
    return [{**common, "workload": name, **path_record(result),
             "expressions_mean": float(result.expressions.mean())} for name, result in workloads]
