"""``kpbench kernel``: the sweep over tools × services counts, its records and its summary.

Exit status: 0 when every point ran and every kernel counter agreed with the model's, 1 when
a counter disagreed (the disagreements are printed and recorded), 2 for bad parameters, no
root, no tool at all, or a harness error.
"""
from __future__ import annotations

import signal
import sys
from pathlib import Path

from tqdm import tqdm

from bench.errors import InputError
from bench.realkernel import netns, prereq, runner

DEFAULT_SERVICES = (100, 1000, 5000, 20000)
QUICK_SERVICES = (10, 100)
QUICK_CONNECTIONS = 20


def _check(args) -> None:
    for option, values, low in (("--services", args.services, 1), ("--connections", [args.connections], 1),
                                ("--rounds", [args.rounds], 1), ("--validation", [args.validation], 1),
                                ("--nodes", [args.nodes], 1), ("--load-timeout", [args.load_timeout], 1)):
        bad = [v for v in values or [] if v < low]
        if bad:
            raise InputError(f"must be at least {low} (got {bad[0]})", "command line", option)
    if args.validation > runner.MAX_VALIDATION:
        raise InputError(f"at most {runner.MAX_VALIDATION} (got {args.validation})", "command line", "--validation")
    unknown = [m for m in args.modes if m not in prereq.MODE_TOOLS]
    if unknown:
        raise InputError(f"unknown mode {unknown[0]!r} (choose from {', '.join(prereq.MODE_TOOLS)})",
                         "command line", "--modes")


def _usable_tools(modes: list[str]) -> list[tuple[str, str]]:
    """(mode, tool) pairs that can run here; one line per skipped tool."""
    usable = []
    for mode in modes:
        for tool in prereq.MODE_TOOLS[mode]:
            problem = prereq.tool_status(tool)
            if problem is None and tool == "ipvs":
                problem = "IPVS is available, but kpbench kernel does not measure IPVS mode yet"
            if problem:
                print(f"kpbench kernel: skipping {tool}: {problem}", file=sys.stderr)
            else:
                usable.append((mode, tool))
    return usable


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def cmd_kernel(args) -> int:
    if args.quick:
        args.services = args.services or list(QUICK_SERVICES)
        args.connections = min(args.connections, QUICK_CONNECTIONS)
    args.services = args.services or list(DEFAULT_SERVICES)
    args.modes = args.modes or list(prereq.MODE_TOOLS)
    _check(args)
    prereq.require_root()
    for name in netns.remove_stale():
        print(f"kpbench kernel: removed stale namespace {name}", file=sys.stderr)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # clean up on kill as on Ctrl-C
    try:
        return _sweep(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _sweep(args) -> int:
    from bench.results import ResultsWriter

    tools = _usable_tools(args.modes)
    if not tools:
        raise InputError("no tool can run here (see the lines above)", "kpbench kernel")
    writer = ResultsWriter(Path(args.out) / "results.jsonl")
    records, too_slow = [], set()
    points = [(services, mode, tool) for services in args.services for mode, tool in tools]
    with tqdm(total=len(points), desc="kernel points", unit="point", disable=args.quiet) as bar:
        prepared = {}
        for services, mode, tool in points:
            bar.set_postfix_str(f"{tool} {services:,} services")
            if tool not in too_slow:
                if (mode, services) not in prepared:
                    prepared = {(mode, services): runner.prepare(mode, services, args.nodes, args.seed)}
                record = _measure(tool, prepared[(mode, services)], args)
                if record.get("load_timed_out"):
                    too_slow.add(tool)
                records.append(writer.append(record))
            bar.update()
    print(summary(records))
    return _report_disagreements(records)


def _measure(tool: str, prepared: runner.Prepared, args) -> dict:
    """The point's record; a rule load over --load-timeout gives a record saying so."""
    try:
        return runner.measure_tool(tool, prepared, args.connections, args.rounds, args.validation,
                                   args.load_timeout)
    except netns.CommandTimeout:
        print(f"kpbench kernel: {tool}: loading the rules for {prepared.services:,} services took over "
              f"{args.load_timeout:g} s (--load-timeout); skipping larger points for {tool}", file=sys.stderr)
        return {"source": "kernel", "kind": "kernel_point", "mode": prepared.mode, "tool": tool,
                "services": prepared.services, "endpoints": 1, "nodes": prepared.nodes, "seed": prepared.seed,
                "load_timed_out": True, "load_timeout_seconds": args.load_timeout}


def _report_disagreements(records: list[dict]) -> int:
    measured = [r for r in records if not r.get("load_timed_out")]
    for record in measured:
        failed = sum(p["failed"] for p in record["positions"].values()) + record["validation_failed_connections"]
        if failed:
            print(f"kpbench kernel: warning: {record['tool']} {record['services']} services: {failed} "
                  "connections failed (not counted in the times)", file=sys.stderr)
    disagreeing = [r for r in measured if not r["counters_agree"]]
    for record in disagreeing:
        print(f"kpbench kernel: {record['tool']} {record['services']} services: "
              f"{record['disagreement_count']} rule counters disagree with the model:", file=sys.stderr)
        for d in record["disagreements"]:
            print(f"  {d['rule']}: kernel {d['kernel']} model {d['model']}  {d['text']}", file=sys.stderr)
    return 1 if disagreeing else 0


def _us(ns) -> str:
    return "-" if ns is None else f"{ns / 1000:.1f}"


def _per_rule(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def summary(records: list[dict]) -> str:
    """Model vs kernel, one line per point: the tool's model, first-packet extra time at the
    first and last positions (kernel: connect p50 minus the no-rules baseline; model: the data
    path's p50), ns per visited rule, round trips, rule loads and the counter agreement."""
    header = (f"{'tool':<16}{'model':<13}{'services':>9}  {'rules first→last':>17}  {'kernel µs first/last':>21}  "
              f"{'model µs first/last':>20}  {'ns/rule k/m':>12}  {'rtt µs k/base':>14}  "
              f"{'load s full/partial':>20}  counters")
    lines = ["model vs kernel (p50; kernel times are noisy on a shared machine)", header]
    for r in records:
        if r.get("load_timed_out"):
            lines.append(f"{r['tool']:<16}{'':<13}{r['services']:>9,}  rule load took over {r['load_timeout_seconds']:g} s: "
                         "not measured")
            continue
        first, last = r["positions"]["first"], r["positions"]["last"]
        rtt = r["established_rtt_ns"]
        lines.append(
            f"{r['tool']:<16}{r['model']:<13}{r['services']:>9,}  "
            f"{first['entries_visited']:>8.0f}→{last['entries_visited']:<8.0f}  "
            f"{_us(first['extra_ns']['p50']):>10}/{_us(last['extra_ns']['p50']):<10}  "
            f"{_us(first['model_ns']['p50']):>9}/{_us(last['model_ns']['p50']):<10}  "
            f"{_per_rule(r['kernel_ns_per_rule']):>5}/{_per_rule(r['model_ns_per_rule']):<6}  "
            f"{_us(rtt['kernel']['p50']):>6}/{_us(rtt['baseline']['p50']):<7}  "
            f"{r['sync_full_proxy_rules_duration_seconds']:>9.3f}/{r['sync_partial_proxy_rules_duration_seconds']:<10.3f}  "
            f"{r['rules_agreeing']}/{r['rules_compared']} agree")
    return "\n".join(lines)
