"""The kpbench command line: one entry point, a subcommand per job.

Exit status: 0 success · 1 the gate found a confirmed regression · 2 bad input, a missing
prerequisite or a harness error (one line on stderr, never a traceback).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from bench.errors import InputError

MODES = ("iptables", "ipvs", "nftables")


def _add_cluster_inputs(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--objects", metavar="FILE", required=required,
                        help="Kubernetes manifests: multi-document YAML, JSON or a v1 List "
                             "(what `kubectl get svc,endpointslices,nodes -A -o yaml` prints)")
    parser.add_argument("--config", metavar="FILE",
                        help="a KubeProxyConfiguration YAML (kubeproxy.config.k8s.io/v1alpha1)")
    parser.add_argument("--node-ip", metavar="IP", action="append", default=[],
                        help="an address of the node kube-proxy runs on (repeatable)")


def _add_host_options(parser: argparse.ArgumentParser) -> None:
    """Host facts kube-proxy detects at run time; defaults are a current kernel's."""
    host = parser.add_argument_group("host properties kube-proxy detects (defaults: a current kernel)")
    host.add_argument("--no-nfacct", action="store_true", help="nfacct counters unavailable")
    host.add_argument("--no-random-fully", action="store_true",
                      help="MASQUERADE --random-fully unsupported")
    host.add_argument("--tcp-be-liberal", action="store_true",
                      help="net.netfilter.nf_conntrack_tcp_be_liberal=1 (drops the INVALID rule)")
    host.add_argument("--no-localhost-nodeports", action="store_true",
                      help="NodePorts not reachable on 127.0.0.1 (iptables.localhostNodePorts=false)")


def _add_scheduler_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ipvs-scheduler", metavar="NAME",
                        help="ipvs: the IPVS scheduler (rr, wrr, lc, dh, sh, sed, nq, mh, wlc), "
                             "overriding the KubeProxyConfiguration's ipvs.scheduler (default rr)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kpbench",
        description="Benchmark kube-proxy's data-plane modes from faithful models of the kernel "
                    "tables: write the rules kube-proxy would program, load them, trace and "
                    "measure packets.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    bench = sub.add_parser("bench", help="run the benchmark sweep (what `make bench` runs)",
                           description="Sweep services × endpoints × nodes, measure each point's "
                                       "data path and rule sync, and write results.jsonl, "
                                       "results.csv and a PNG. Finished points are kept: rerunning "
                                       "resumes.")
    bench.add_argument("--profile", choices=("quick", "default"), default="default",
                       help="quick: two small points per E, for CI; default: services "
                            "100..20,000 (ipvs: ..50,000) × endpoints 1, 10 (default: %(default)s)")
    bench.add_argument("--modes", nargs="+", metavar="MODE",
                       help=f"modes to measure, of {', '.join(MODES)} (default: all)")
    bench.add_argument("--services", type=int, nargs="+", metavar="S", help="override the services grid")
    bench.add_argument("--endpoints", type=int, nargs="+", metavar="E",
                       help="override the endpoints-per-service grid")
    bench.add_argument("--nodes", type=int, nargs="+", metavar="N", help="override the nodes grid")
    bench.add_argument("--packets", type=int, metavar="N",
                       help="packets per workload and point (default: the profile's)")
    bench.add_argument("--seed", type=int, default=0, help="seed for every random choice (default: 0)")
    bench.add_argument("--out", metavar="DIR", default="reports", help="output folder (default: %(default)s)")
    bench.add_argument("--fresh", action="store_true", help="discard earlier results and start over")
    bench.add_argument("--no-benchmarks", action="store_true",
                       help="skip the kernel-speed and load benchmarks after the sweep")
    bench.add_argument("--quiet", action="store_true", help="no progress bar")

    rules = sub.add_parser("rules", help="print the rules kube-proxy would program for a cluster",
                           description="Print exactly what kube-proxy's MODE programs for the "
                                       "cluster in --objects: for iptables, the iptables-restore "
                                       "payload of a full sync (or, with --previous, the partial "
                                       "sync after the change from that cluster); for ipvs, what "
                                       "a sync leaves on the node, in marked sections: "
                                       "ipvsadm-save -n, ipset save, iptables-save and the "
                                       "addresses of kube-ipvs0 (IPVS mode has no partial sync); "
                                       "for nftables, the `nft -f` transaction of a full sync (or, "
                                       "with --previous, the partial sync; with --listing, the "
                                       "ruleset as `nft list ruleset` prints it).")
    rules.add_argument("mode", choices=MODES, help="the kube-proxy mode")
    _add_cluster_inputs(rules, required=True)
    rules.add_argument("--previous", metavar="FILE",
                       help="manifests of the cluster before a change: print the partial-sync payload")
    rules.add_argument("--listing", action="store_true",
                       help="nftables: print the synced ruleset as `nft list ruleset` shows it")
    rules.add_argument("--jump-rules", action="store_true",
                       help="include the built-in chain jump rules kube-proxy installs separately, "
                            "so the output loads whole with iptables-restore")
    rules.add_argument("--order-seed", type=int, metavar="N",
                       help="shuffle service order as Go's map iteration would (default: sorted)")
    rules.add_argument("--output", "-o", metavar="FILE", help="write to FILE instead of stdout")
    _add_scheduler_option(rules)
    _add_host_options(rules)

    trace = sub.add_parser("trace", help="follow one packet through a ruleset, rule by rule",
                           description="Walk a NEW packet through the ruleset as the kernel does: "
                                       "nat PREROUTING (OUTPUT for the node's own addresses), DNAT, "
                                       "then the filter chains (OUTPUT for local senders; INPUT for "
                                       "local destinations, FORWARD otherwise), then nat POSTROUTING. "
                                       "In ipvs mode IPVS runs at LOCAL_IN, after filter INPUT: the "
                                       "virtual-server lookup and the scheduler's pick. In nftables "
                                       "mode the base chains of ip kube-proxy run per hook in "
                                       "priority order (PREROUTING or OUTPUT, INPUT or FORWARD, "
                                       "POSTROUTING); local = the --node-ip addresses only.")
    trace.add_argument("mode", choices=MODES, help="the kube-proxy mode")
    source = trace.add_mutually_exclusive_group(required=True)
    source.add_argument("--ruleset", metavar="FILE",
                        help="iptables: iptables-save output; ipvs: the output of `kpbench rules ipvs`; "
                             "nftables: `nft -f` text or `nft list ruleset` output")
    source.add_argument("--objects", metavar="FILE", help="manifests: trace the rules kube-proxy would write")
    source.add_argument("--ipvsadm", metavar="FILE",
                        help="ipvs: a node's `ipvsadm-save -n` output (with --ipset and --iptables; "
                             "every virtual service's address counts as bound to kube-ipvs0)")
    trace.add_argument("--ipset", metavar="FILE", help="ipvs, with --ipvsadm: the node's `ipset save` output")
    trace.add_argument("--iptables", metavar="FILE",
                       help="ipvs, with --ipvsadm: the node's `iptables-save` output (needs --ipset "
                            "for the sets its rules match)")
    trace.add_argument("--config", metavar="FILE", help="a KubeProxyConfiguration YAML (with --objects)")
    trace.add_argument("--node-ip", metavar="IP", action="append", default=[],
                       help="an address of the node (repeatable); local = these and 127.0.0.0/8")
    trace.add_argument("--src", required=True, metavar="IP", help="source address")
    trace.add_argument("--dst", required=True, metavar="IP", help="destination address")
    trace.add_argument("--dport", required=True, metavar="N", help="destination port")
    trace.add_argument("--proto", default="tcp", choices=("tcp", "udp", "sctp"), help="(default: tcp)")
    trace.add_argument("--all-endpoints", action="store_true",
                       help="follow every statistic branch (nftables: every numgen value) and list "
                            "every reachable endpoint")
    trace.add_argument("--seed", type=int, default=0, help="seed of the statistic match's (nftables: numgen's) RNG (default: 0)")
    trace.add_argument("--json", action="store_true", help="print a JSON object instead of the walk")
    _add_scheduler_option(trace)

    cluster = sub.add_parser("cluster", help="write a synthetic cluster as Kubernetes manifests",
                             description="Generate a seeded synthetic cluster and write it as "
                                         "multi-document YAML, usable with --objects.")
    cluster.add_argument("--services", type=int, required=True, metavar="S")
    cluster.add_argument("--endpoints", type=int, required=True, metavar="E", help="endpoints per service")
    cluster.add_argument("--nodes", type=int, default=10, metavar="N", help="(default: %(default)s)")
    cluster.add_argument("--distribution", choices=("fixed", "heavy-tailed"), default="fixed",
                         help="endpoints per service: exactly E, or heavy-tailed with mean E "
                              "capped at 250 (default: %(default)s)")
    cluster.add_argument("--mix", choices=("realistic", "clusterip"), default="realistic",
                         help="service types: a realistic mix, or ClusterIP only (default: %(default)s)")
    cluster.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    cluster.add_argument("--output", "-o", metavar="FILE", required=True, help="the YAML file to write")
    return parser


def write_atomically(path: str, text: str) -> None:
    """Write all or nothing: an existing file is only replaced once the new one is complete."""
    target = Path(path)
    if target.is_dir():
        raise InputError("is a directory", str(target))
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent or ".", prefix=f".{target.name}.")
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, target)
    except OSError as exc:
        raise InputError(f"cannot write: {exc.strerror}", str(target)) from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from bench import commands  # imported late: --help stays fast

    try:
        return commands.run(args)
    except InputError as exc:
        print(f"kpbench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kpbench: interrupted; finished results are kept", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
