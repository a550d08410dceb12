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

MODES = ("iptables", "ipvs", "nftables", "userspace", "ebpf")  # ebpf: a reference model, not kube-proxy
TRACE_MODES = ("iptables", "ipvs", "nftables")  # userspace: its REDIRECT rules need bench/loaders/userspace.py


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
                           description="Sweep mode (and variant) × services × endpoints × nodes; "
                                       "for each point measure the data path (new connections to "
                                       "services at random and at the first, middle and last "
                                       "position, to pods, established packets), the rule syncs "
                                       "(full, partial after one endpoint change, one service "
                                       "added) and memory; then simulate network programming "
                                       "latency on N nodes from the measured sync costs. Writes "
                                       "results.jsonl (appended and flushed per point: rerunning "
                                       "resumes), results.csv (and results.parquet with pyarrow) "
                                       "and the report. A grid that would not fit in memory is "
                                       "refused before it starts.",
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="profiles:\n"
                                  "  quick    a few small points per mode and a small nodes axis (~1 min, CI)\n"
                                  "  default  services 100..20,000 (ipvs ..50,000) × E 1, 10 at 100 nodes; "
                                  "E 3, 30;\n"
                                  "           nodes 1,000 and 5,000 and the variants at 1,000 services (a few minutes)\n"
                                  "  full     services to 100,000 (1,000,000 endpoints; ipvs to 50,000, iptables-nft\n"
                                  "           and userspace to 20,000), nodes to 10,000 (about 20 minutes, under 7 GiB)\n"
                                  "variants (--variants MODE:KEY=VALUE):\n"
                                  "  iptables:comments=off   no rule comments at all\n"
                                  "  ipvs:scheduler=NAME     rr, wrr, lc, wlc, sh, dh, mh, sed, nq")
    bench.add_argument("--profile", choices=("quick", "default", "full"), default="default",
                       help="the grid to sweep, see below (default: %(default)s)")
    bench.add_argument("--modes", nargs="+", metavar="MODE",
                       help=f"modes to measure, of {', '.join(MODES)} and iptables-nft (iptables "
                            "mode's rules on the nf_tables backend; ebpf: a Cilium-like reference "
                            "model, not a kube-proxy mode; default: all)")
    bench.add_argument("--services", type=int, nargs="+", metavar="S",
                       help="override the services axis (with --endpoints/--nodes: one grid instead "
                            "of the profile's blocks)")
    bench.add_argument("--endpoints", type=int, nargs="+", metavar="E",
                       help="override the endpoints-per-service axis")
    bench.add_argument("--nodes", type=int, nargs="+", metavar="N", help="override the nodes axis")
    bench.add_argument("--variants", nargs="+", metavar="MODE:KEY=VALUE",
                       help="also measure these variants on the grid, e.g. iptables:comments=off "
                            "ipvs:scheduler=mh")
    bench.add_argument("--packets", type=int, metavar="N",
                       help="packets per workload and point (default: the profile's)")
    bench.add_argument("--cpus", type=int, default=64, metavar="N",
                       help="CPUs of the modelled node, for per-CPU kernel memory (default: %(default)s)")
    bench.add_argument("--seed", type=int, default=0, help="seed for every random choice (default: 0)")
    bench.add_argument("--out", metavar="DIR", default="reports", help="output folder (default: %(default)s)")
    bench.add_argument("--fresh", action="store_true", help="discard earlier results and start over")
    bench.add_argument("--no-benchmarks", action="store_true",
                       help="skip the kernel-speed and load benchmarks after the sweep")
    bench.add_argument("--trace-memory", action="store_true",
                       help="also record tracemalloc's peak per point (4-6x slower points)")
    bench.add_argument("--quiet", action="store_true", help="no progress bar (for logs)")

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
                                       "ruleset as `nft list ruleset` prints it); for userspace, "
                                       "the legacy proxy's portal rules as `iptables-save -t nat` "
                                       "lists them, one REDIRECT (pods) and one DNAT (the node) "
                                       "rule per service port and address, to its proxy port; "
                                       "for ebpf (a Cilium-like REFERENCE MODEL, not a kube-proxy "
                                       "mode), the BPF service-map and backend-map entries an eBPF "
                                       "kube-proxy replacement programs, one line per entry "
                                       "(format: bench/loaders/ebpf.py); a cluster needing more "
                                       "entries than a map's 65,536 is refused.")
    rules.add_argument("mode", choices=MODES, help="the kube-proxy mode (ebpf: a reference model)")
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
    rules.add_argument("--proxy-port-range", metavar="LOW-HIGH",
                       help="userspace: the ports the proxy listens on, one per service port, "
                            "chosen at random with --order-seed's seed (default: Linux's "
                            "ephemeral range 32768-60999)")
    rules.add_argument("--output", "-o", metavar="FILE", help="write to FILE instead of stdout")
    rules.add_argument("--backend", choices=("legacy", "nft"), default="legacy",
                       help="iptables: legacy prints the iptables-restore payload; nft prints the "
                            "full sync's rules as iptables-nft stores them in nf_tables, in `nft "
                            "list ruleset` form (native payload/meta/cmp expressions, xt compat "
                            "matches and targets, comments as rule comments) (default: legacy)")
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
    trace.add_argument("mode", choices=TRACE_MODES, help="the kube-proxy mode")
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
    trace.add_argument("--backend", choices=("legacy", "nft"), default="legacy",
                       help="iptables: the kernel backend that walks the rules: legacy (ip_tables' "
                            "ipt_do_table) or nft (iptables-nft: the same rules as nf_tables rules "
                            "walked by nft_do_chain; the steps are nft rules) (default: legacy)")
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

    report = sub.add_parser("report", help="turn results.jsonl into an HTML page, PNGs and Markdown",
                            description="Write DIR/index.html (one self-contained page: summary, "
                                        "then a section per question, images embedded), every "
                                        "figure as DIR/*.png, and DIR/summary.md (the headline "
                                        "table in Markdown). Sections whose data is not in the "
                                        "results say so; modes that did not run are named.")
    report.add_argument("--results", metavar="FILE", default="reports/results.jsonl",
                        help="the results of `kpbench bench` (default: %(default)s)")
    report.add_argument("--out", metavar="DIR", default="reports", help="output folder (default: %(default)s)")
    _add_gate_parser(sub)
    _add_kernel_parser(sub)
    return parser


def _add_gate_parser(sub) -> None:
    gate = sub.add_parser(
        "gate", help="fail a change that makes a mode slower or bigger (what `make gate` runs)",
        description="Compare this tree with a recorded baseline, tier by tier: 1 deterministic work "
                    "counters, rule counts and modelled memory (exact for counts, 1% for bytes); "
                    "4 the log-log slope of first-packet work against services (iptables 1, "
                    "nftables 0, ipvs as its 256 hash chains imply); 2 instructions inside each "
                    "kernel's batch method under valgrind's callgrind (+2%; skipped, saying so, "
                    "without valgrind); 3 with --base, CPU time of base against head run "
                    "interleaved, failing only on a large, significant, confirmed slowdown; 5 "
                    "wall-clock, advisory. Writes OUT/gate.md and OUT/gate.json. When the "
                    "baseline's fingerprint differs from this machine's, only tiers 1 and 4 are "
                    "enforced. Exit 0 pass, 1 confirmed regression, 2 could not measure or compare.")
    gate.add_argument("--baseline", metavar="DIR", default="reports/baseline",
                      help="the committed baseline (default: %(default)s)")
    gate.add_argument("--base", metavar="GIT_REF",
                      help="tier 3: build this commit in a temporary tree and venv and run it "
                           "against the working tree")
    gate.add_argument("--tiers", default="1,4,2,3,5", metavar="LIST",
                      help="tiers to run, e.g. 1,2,4 for the deterministic ones (default: %(default)s)")
    gate.add_argument("--factor", type=float, default=1.25,
                      help="tier 3: median CPU-time ratio a slowdown must exceed (default: %(default)s)")
    gate.add_argument("--rounds", type=int, default=15,
                      help="tiers 3 and 5: samples per side and kernel (default: %(default)s)")
    gate.add_argument("--kernels", nargs="+", default=["iptables", "nftables", "ipvs", "conntrack"], metavar="KERNEL",
                      help="tiers 2 and --record: the kernels whose instructions are counted (default: all four)")
    gate.add_argument("--out", metavar="DIR", default="reports", help="output folder (default: %(default)s)")
    gate.add_argument("--benchmark-json", nargs="+", default=[], metavar="FILE",
                      help="pytest-benchmark JSON (`pytest tests/test_benchmarks.py --benchmark-only "
                           "--benchmark-json FILE`): its medians join tier 5; two files (base, then "
                           "head) are compared. Advisory")
    gate.add_argument("--record", action="store_true",
                      help="measure every tier and write the baseline into --baseline instead "
                           "(what `make baseline` runs)")
    gate.add_argument("--aa", action="store_true",
                      help="A/A: compare the working tree with itself and write OUT/gate-aa.md and "
                           "gate-aa.json, the observed noise of every metric (what `make gate-aa` runs)")


def _add_kernel_parser(sub) -> None:
    kernel = sub.add_parser(
        "kernel", help="load the rulesets into the real Linux kernel and compare with the models (root)",
        description="In network namespaces of its own (kpb-<pid>-client → node → pods, removed on "
                    "exit, error and Ctrl-C; stale ones from a crashed run removed at start), load "
                    "each mode's ruleset with the real tools (iptables-legacy-restore, "
                    "iptables-nft-restore, nft -f) and measure: TCP connect time to services at the "
                    "first, middle, last and random positions minus the same with no rules loaded, "
                    "round trips on an open connection, the full restore and the partial update "
                    "after one endpoint change; then compare the kernel's per-rule packet counters "
                    "with the model's after a known set of connections (they must agree exactly). "
                    "Each tool has its own model: iptables-legacy the legacy iptables data path, "
                    "iptables-nft the same rules on the nf_tables backend model, nftables the "
                    "nftables one. "
                    "Clusters have one endpoint per service. Records (source \"kernel\") are "
                    "appended to OUT/results.jsonl; a model-vs-kernel table is printed at the end. "
                    "The host namespace's rules are never read or changed. Exit 0 all agree, 1 a "
                    "counter disagreed, 2 bad parameters, no root or nothing can run.")
    kernel.add_argument("--modes", nargs="+", metavar="MODE",
                        help="iptables (both iptables-legacy and iptables-nft), nftables, ipvs "
                             "(detected; skipped when the kernel lacks IPVS) (default: all)")
    kernel.add_argument("--services", type=int, nargs="+", metavar="S",
                        help="services counts (default: 100 1000 5000 20000; --quick: 10 100)")
    kernel.add_argument("--connections", type=int, default=200, metavar="N",
                        help="timed connections per position and point (default: %(default)s)")
    kernel.add_argument("--rounds", type=int, default=200, metavar="N",
                        help="round trips on the open connection (default: %(default)s)")
    kernel.add_argument("--validation", type=int, default=64, metavar="N",
                        help="connections to distinct services for the counter comparison "
                             "(default: %(default)s)")
    kernel.add_argument("--nodes", type=int, default=10, metavar="N", help="cluster nodes (default: %(default)s)")
    kernel.add_argument("--load-timeout", type=float, default=60, metavar="SECONDS",
                        help="give up a tool's larger points once loading its rules takes longer "
                             "(iptables-nft-restore is superlinear: 20,000 services take over 10 "
                             "minutes) (default: %(default)s)")
    kernel.add_argument("--seed", type=int, default=0, help="seed for every random choice (default: 0)")
    kernel.add_argument("--quick", action="store_true",
                        help="a smoke run: services 10 and 100, 20 connections per position")
    kernel.add_argument("--out", metavar="DIR", default="reports", help="output folder (default: %(default)s)")
    kernel.add_argument("--quiet", action="store_true", help="no progress bar")


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
        if args.command == "gate":
            from bench.gate import command as gate_command

            return gate_command(args)
        if args.command == "kernel":
            from bench.realkernel.command import cmd_kernel

            return cmd_kernel(args)
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
