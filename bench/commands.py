"""What each kpbench subcommand does, once bench.cli has parsed its arguments."""
from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import yaml

from bench.cli import write_atomically
from bench.errors import InputError


def run(args) -> int:
    if args.command == "report":
        from bench.report import cmd_report  # imported late: matplotlib is slow to load

        return cmd_report(args)
    return {"bench": cmd_bench, "rules": cmd_rules, "trace": cmd_trace,
            "cluster": cmd_cluster}[args.command](args)


def _warn(warnings: list[str]) -> None:
    for warning in warnings:
        print(f"kpbench: warning: {warning}", file=sys.stderr)


def _emit(text: str, output: str | None) -> None:
    if output:
        write_atomically(output, text)
    else:
        sys.stdout.write(text)


def load_cluster_args(objects: str, config: str | None, node_ips: list[str], args=None):
    """The cluster from --objects/--config/--node-ip, with the host-property flags applied."""
    from bench.cluster.manifests import load_cluster

    cluster, warnings = load_cluster(objects, config, node_ips)
    _warn(warnings)
    if args is not None:
        cfg = cluster.config
        cfg.nfacct = not getattr(args, "no_nfacct", False)
        cfg.random_fully = not getattr(args, "no_random_fully", False)
        cfg.tcp_be_liberal = getattr(args, "tcp_be_liberal", False)
        cfg.localhost_nodeports = not getattr(args, "no_localhost_nodeports", False)
    return cluster


def _scheduler(args) -> str | None:
    """--ipvs-scheduler, checked: one of the kernel's schedulers kpbench models."""
    from kernels.layout import IPVS_SCHEDULERS

    name = getattr(args, "ipvs_scheduler", None)
    if name is not None and name not in IPVS_SCHEDULERS:
        raise InputError(f"unknown scheduler {name!r} (kpbench models {', '.join(IPVS_SCHEDULERS)})",
                         "command line", "--ipvs-scheduler")
    return name


def _refuse(args, mode: str, options: dict[str, bool]) -> None:
    for option, given in options.items():
        if given:
            raise InputError(f"not available in {mode} mode", "command line", option)


def ipvs_cluster_args(args):
    """The cluster from the command line, with --ipvs-scheduler applied."""
    cluster = load_cluster_args(args.objects, args.config, args.node_ip, args)
    scheduler = _scheduler(args)
    if scheduler:
        cluster.config.ipvs_scheduler = scheduler
    return cluster


def cmd_rules(args) -> int:
    _refuse(args, args.mode, {"--backend": args.mode != "iptables" and args.backend != "legacy"})
    if args.mode == "userspace":
        return _rules_userspace(args)
    if args.mode == "ebpf":
        return _rules_ebpf(args)
    _refuse(args, args.mode, {"--proxy-port-range": args.proxy_port_range is not None})
    if args.mode == "ipvs":
        return _rules_ipvs(args)
    if args.mode == "nftables":
        return _rules_nftables(args)
    from bench.proxies.iptables import WriterOptions, write_full, write_partial

    _refuse(args, "iptables", {"--ipvs-scheduler": args.ipvs_scheduler is not None, "--listing": args.listing})
    cluster = load_cluster_args(args.objects, args.config, args.node_ip, args)
    options = WriterOptions(include_jump_rules=args.jump_rules, service_order_seed=args.order_seed)
    if args.backend == "nft":
        return _rules_iptables_nft(args, write_full(cluster, options))
    if args.previous:
        previous = load_cluster_args(args.previous, args.config, args.node_ip, args)
        text = write_partial(previous, cluster, options)
    else:
        text = write_full(cluster, options)
    _emit(text, args.output)
    return 0


def _rules_iptables_nft(args, text: str) -> int:
    """The full sync's rules as iptables-nft stores them (bench/loaders/iptables_nft.py)."""
    from bench.loaders.iptables import load
    from bench.loaders.iptables_nft import render, translate

    _refuse(args, "iptables --backend nft", {"--previous": bool(args.previous)})
    _emit(render(translate(load(text, source=f"rules for {args.objects}"))), args.output)
    return 0


def _rules_ebpf(args) -> int:
    from bench.proxies.ebpf import write

    _refuse(args, "ebpf", {"--previous": bool(args.previous), "--order-seed": args.order_seed is not None,
                           "--listing": args.listing, "--jump-rules": args.jump_rules,
                           "--ipvs-scheduler": args.ipvs_scheduler is not None,
                           "--proxy-port-range": args.proxy_port_range is not None})
    _emit(write(load_cluster_args(args.objects, args.config, args.node_ip, args)), args.output)
    return 0


def _rules_ipvs(args) -> int:
    from bench.proxies.ipvs import IpvsWriterOptions, write

    _refuse(args, "ipvs", {"--previous": bool(args.previous), "--order-seed": args.order_seed is not None,
                           "--listing": args.listing})
    cluster = ipvs_cluster_args(args)
    _emit(write(cluster, IpvsWriterOptions(include_jump_rules=args.jump_rules)), args.output)
    return 0


def _rules_userspace(args) -> int:
    from bench.proxies.userspace import EPHEMERAL_PORTS, WriterOptions, write

    _refuse(args, "userspace", {"--previous": bool(args.previous), "--listing": args.listing,
                                "--ipvs-scheduler": args.ipvs_scheduler is not None})
    cluster = load_cluster_args(args.objects, args.config, args.node_ip, args)
    options = WriterOptions(include_jump_rules=args.jump_rules, service_order_seed=args.order_seed,
                            proxy_port_range=_port_range(args.proxy_port_range) or EPHEMERAL_PORTS,
                            proxy_port_seed=args.order_seed or 0)
    _emit(write(cluster, options), args.output)
    return 0


def _port_range(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    low, dash, high = text.partition("-")
    if not (dash and low.isdigit() and high.isdigit()):
        raise InputError(f"expected LOW-HIGH, got {text!r}", "command line", "--proxy-port-range")
    return int(low), int(high)


def _rules_nftables(args) -> int:
    from bench.proxies.nftables import WriterOptions, write_full, write_partial, write_ruleset_listing

    _refuse(args, "nftables", {"--ipvs-scheduler": args.ipvs_scheduler is not None,
                               "--jump-rules": args.jump_rules})  # the base chains are in the table
    if args.listing and args.previous:
        raise InputError("cannot be combined with --previous: a partial sync is a transaction, "
                         "not a listing", "command line", "--listing")
    cluster = load_cluster_args(args.objects, args.config, args.node_ip, args)
    options = WriterOptions(service_order_seed=args.order_seed)
    if args.previous:
        previous = load_cluster_args(args.previous, args.config, args.node_ip, args)
        text = write_partial(previous, cluster, options)
    else:
        text = (write_ruleset_listing if args.listing else write_full)(cluster, options)
    _emit(text, args.output)
    return 0


def cmd_trace(args) -> int:
    from bench.trace import (format_trace, ipvs_ruleset_for_trace, nftables_ruleset_for_trace,
                             ruleset_for_trace, trace_ipvs, trace_nftables, trace_packet)

    _refuse(args, args.mode, {"--backend": args.mode != "iptables" and args.backend != "legacy"})
    if args.mode in ("iptables", "nftables"):
        _refuse(args, args.mode, {"--ipvsadm": bool(args.ipvsadm), "--ipset": bool(args.ipset),
                                  "--iptables": bool(args.iptables),
                                  "--ipvs-scheduler": args.ipvs_scheduler is not None})
    if args.mode == "nftables":
        ruleset, node_ips, text = nftables_ruleset_for_trace(args)
        result = trace_nftables(ruleset, node_ips, args.src, args.dst, args.dport, args.proto,
                                all_endpoints=args.all_endpoints, seed=args.seed, text=text)
    elif args.mode == "ipvs":
        _refuse(args, "ipvs", {"--ipset": bool(args.ipset and not args.ipvsadm),
                               "--iptables": bool(args.iptables and not args.ipvsadm)})
        scheduler = _scheduler(args)
        ruleset, node_ips = ipvs_ruleset_for_trace(args)
        result = trace_ipvs(ruleset, node_ips, args.src, args.dst, args.dport, args.proto,
                            all_endpoints=args.all_endpoints, seed=args.seed, scheduler=scheduler)
    else:
        ruleset, node_ips = ruleset_for_trace(args)
        result = trace_packet(ruleset, node_ips, args.src, args.dst, args.dport, args.proto,
                              all_endpoints=args.all_endpoints, seed=args.seed, backend=args.backend)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_trace(result))
    return 0


def cmd_cluster(args) -> int:
    from bench.cluster.generate import generate, to_manifests

    cluster = generate(args.services, args.endpoints, args.nodes, seed=args.seed,
                       distribution=args.distribution, mix=args.mix)
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml when present: much faster
    text = yaml.dump_all(to_manifests(cluster), Dumper=dumper, sort_keys=False)
    write_atomically(args.output, text)
    print(f"wrote {len(cluster.services)} services, {len(cluster.slices)} EndpointSlices and "
          f"{len(cluster.nodes)} nodes to {args.output}", file=sys.stderr)
    return 0


def _variants(texts: list[str] | None, modes) -> dict[str, list[str]]:
    """--variants MODE:KEY=VALUE ... → mode → variants (checked by the sweep)."""
    chosen: dict[str, list[str]] = {}
    for text in texts or ():
        mode, sep, variant = text.partition(":")
        if not sep or mode not in modes:
            raise InputError(f"expected MODE:KEY=VALUE with MODE one of {', '.join(modes)}, got {text!r}",
                             "command line", "--variants")
        chosen.setdefault(mode, []).append(variant)
    return chosen


def _writable_folder(out: Path) -> Path:
    """The output folder, created if needed; refused at once when it cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".kpbench-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise InputError(f"cannot write there: {exc.strerror}", str(out), "--out") from None
    return out


def cmd_bench(args) -> int:
    from bench import benchmarks, netprog, report, sweep
    from bench.results import ResultsWriter, export_tables, read_jsonl

    unknown = set(args.modes or ()) - set(sweep.MODES)
    if unknown:
        raise InputError(f"unknown mode {sorted(unknown)[0]!r} (kpbench measures {', '.join(sweep.MODES)})",
                         "command line", "--modes")
    modes = args.modes or sweep.MODES
    points = sweep.profile_points(args.profile, modes, args.seed, args.cpus, args.services, args.endpoints,
                                  args.nodes, args.packets, _variants(args.variants, modes))
    sweep.check_memory(points)
    out = _writable_folder(Path(args.out))
    started = time.perf_counter()
    path = sweep.run(points, out, fresh=args.fresh, quiet=args.quiet, trace_memory=args.trace_memory)
    swept = time.perf_counter() - started
    if not args.no_benchmarks:
        _run_benchmarks(path, args, modes, benchmarks, ResultsWriter, read_jsonl)
    _run_netprog(path, args.seed, netprog, ResultsWriter, read_jsonl, args.quiet)
    frame, tables = export_tables(path, out)
    written = [path, *tables, *report.write_report(path, out)[:2]]
    print(summary_table(frame))
    print(headline(frame, points, swept))
    print(f"\nwrote {', '.join(map(str, written[:-1]))} and {written[-1]}")
    return 0


def _run_netprog(path: Path, seed: int, netprog, ResultsWriter, read_jsonl, quiet: bool) -> None:
    """Network programming latency from the measured sync costs; scenarios already recorded
    (same costs, loop and seed) are skipped."""
    from bench.results import results_frame

    if not quiet:
        print("simulation: network programming latency ...", file=sys.stderr)
    records = read_jsonl(path)
    done = {r.get("netprog_id") for r in records if r.get("kind") == "netprog"}
    writer = ResultsWriter(path)
    for record in netprog.records_from_results(results_frame(records), seed=seed):
        if record["netprog_id"] not in done:
            writer.append(record)


def _run_benchmarks(path: Path, args, modes, benchmarks, ResultsWriter, read_jsonl) -> None:
    """Kernel speed and ruleset-load benchmarks (and, with ipvs, the connection-table scaling),
    skipped when already recorded with this seed."""
    from bench.measure.ipvs import connection_scaling
    from bench.sweep import PROFILES

    done = {r.get("benchmark_id") for r in read_jsonl(path)} if path.exists() else set()
    writer = ResultsWriter(path)
    quick = args.profile == "quick"
    jobs = {
        "kernel_speed": lambda: benchmarks.kernel_speed(
            services=1000 if quick else 10000, endpoints=10, packets=100 if quick else 300, seed=args.seed),
        # A fresh process's load time and peak RSS for a 20,000 × 10 ruleset (target: under 10 s).
        "load_ruleset": lambda: benchmarks.load_cost(
            services=1000 if quick else 20000, endpoints=10, seed=args.seed),
    }
    if "ipvs" in modes:
        jobs["ipvs_connections"] = lambda: connection_scaling(
            PROFILES[args.profile]["ipvs_connections"], seed=args.seed)
    for name, job in jobs.items():
        key = hashlib.sha256(json.dumps([name, args.profile, args.seed]).encode()).hexdigest()[:16]
        if key in done:
            continue
        if not args.quiet:
            print(f"benchmark: {name} ...", file=sys.stderr)
        writer.append({**job(), "benchmark_id": key})


def summary_table(frame) -> str:
    """The short tables `kpbench bench` prints: one per mode, one row per point of kube-proxy's
    default variant at the sweep's main node count (the nodes and variant points are in the
    files and the report)."""
    points = frame[frame["kind"] == "point"]
    if points.empty:
        return "no points measured"
    if "variant" in points:
        points = points[points["variant"].fillna("") == ""]
    points = points[points["nodes"] == points["nodes"].mode().iloc[0]]
    lines = []
    for mode, rows in points.groupby("mode", sort=False):
        rows_of = {"ipvs": _ipvs_rows, "nftables": _nftables_rows}.get(mode)
        lines += rows_of(rows) if rows_of else _iptables_rows(rows, mode)
    for _, bench_row in frame[frame["kind"] == "benchmark"].iterrows():
        lines.append(_benchmark_line(bench_row))
    return "\n".join(lines)


HEADLINE_COLUMNS = (("new→svc p50 ns", "service_new", "ns_p50", ",.0f"),
                    ("pps/core", "service_new", "pps_per_core", ",.0f"),
                    ("new→pod p50 ns", "nonservice_new", "ns_p50", ",.0f"),
                    ("estab. p50 ns", "established", "ns_p50", ",.0f"),
                    ("full sync s", "service_new", "sync_full_proxy_rules_duration_seconds", ".3f"),
                    ("partial s", "service_new", "sync_partial_proxy_rules_duration_seconds", ".3f"),
                    ("kernel MiB", "service_new", "kernel_bytes", "mib"),
                    ("peak RSS MiB", "service_new", "peak_rss_bytes", "mib"))


KEP_ORDER = ("full restores, minSyncPeriod 10 s", "partial restores, minSyncPeriod 10 s",
             "partial restores, minSyncPeriod 1 s")


def headline(frame, points, swept_seconds: float) -> str:
    """The headline: each mode at the largest size all modes reached, the KEP-3453
    comparison, and what the harness itself cost."""
    rows = frame[frame["kind"] == "point"]
    if "variant" in rows:
        rows = rows[rows["variant"].fillna("") == ""]
    lines = []
    if not rows.empty:
        size = rows.groupby("mode")["services"].max().min()
        at = rows[rows["services"] == size]
        at = at[(at["endpoints"] == at["endpoints"].max()) & (at["nodes"] == at["nodes"].min())]
        lines.append(f"\nheadline at {size:,} services × {int(at['endpoints'].max())} endpoints, "
                     f"{int(at['nodes'].min()):,} nodes, {int(at['cpus'].max())} modelled CPUs:")
        lines.append(f"{'mode':>10} " + " ".join(f"{title:>15}" for title, *_ in HEADLINE_COLUMNS))
        for mode, group in at.groupby("mode", sort=False):
            cells = []
            for _, workload, column, fmt in HEADLINE_COLUMNS:
                value = group.loc[group["workload"] == workload, column] if column in group else []
                value = value.iloc[0] if len(value) else float("nan")
                cells.append("-" if value != value else
                             f"{value / 2**20:>15,.1f}" if fmt == "mib" else f"{value:>15{fmt}}")
            lines.append(f"{mode:>10} " + " ".join(f"{c:>15}" for c in cells))
    kep = frame[(frame["kind"] == "netprog") & (frame.get("scenario") == "kep3453")] if "scenario" in frame else []
    if len(kep):
        kep = kep.assign(costs=kep["costs"].fillna("measured") if "costs" in kep else "measured")
    for costs, rows in (kep.groupby("costs", sort=False) if len(kep) else ()):
        first = rows.iloc[0]
        lines.append(f"\nnetwork_programming_duration_seconds, {int(first['nodes']):,} nodes, iptables at "
                     f"{int(first['services']):,} services, {costs} costs (full sync {first['full_seconds']:.2f} s, "
                     f"partial {first['partial_seconds']:.2f} s): simulated p50/p90/p99 vs KEP-3453's")
        latest = rows.drop_duplicates("loop", keep="last").set_index("loop")
        for _, row in latest.loc[[name for name in KEP_ORDER if name in latest.index]].reset_index().iterrows():
            lines.append(f"  {row['loop']:<38} {row['network_programming_duration_seconds_p50']:6.1f} "
                         f"{row['network_programming_duration_seconds_p90']:6.1f} "
                         f"{row['network_programming_duration_seconds_p99']:6.1f}   vs "
                         f"{row['published_p50']:.0f} / {row['published_p90']:.0f} / {row['published_p99']:.0f} s")
    ids = {p.point_id for p in points}
    ran = frame[(frame["kind"] == "point") & frame["point_id"].isin(ids)].drop_duplicates("point_id") \
        if "point_id" in frame else frame.iloc[:0]
    if len(ran) and "harness_seconds" in ran:
        measured = ran["point_seconds"].sum()
        lines.append(f"\nsweep: {len(points)} points ({measured:,.1f} s measuring them, {swept_seconds:,.1f} s "
                     f"this run); harness overhead "
                     f"{ran['harness_seconds'].sum():,.2f} s ({ran['harness_seconds'].sum() / max(measured, 1e-9):.1%} "
                     "of the points' own time)")
    return "\n".join(lines)


def _pivot(points, values: list[str]):
    table = points.pivot_table(index=["services", "endpoints"], columns="workload", values=values,
                               aggfunc="last")
    return table, points.groupby(["services", "endpoints"])["kernel_bytes"].last()


MODE_TITLES = {"ebpf": "ebpf (a reference model, not kube-proxy)",
               "userspace": "userspace (new→svc = rule walk + measured relay set-up)"}


def _iptables_rows(points, mode: str = "iptables") -> list[str]:
    table, memory = _pivot(points, ["ns_p50", "entries_visited_mean"])
    title = "services" if mode == "iptables" else f"\n{MODE_TITLES.get(mode, mode)}: S"
    lines = [f"{title:>9} {'E':>3} {'new→svc p50 ns':>15} {'entries':>8} "
             f"{'new→pod p50 ns':>15} {'entries':>8} {'estab. p50 ns':>14} {'kernel MiB':>11}"]
    for (services, endpoints), row in table.iterrows():
        lines.append(
            f"{services:>9,} {int(endpoints):>3} {row[('ns_p50', 'service_new')]:>15,.0f} "
            f"{row[('entries_visited_mean', 'service_new')]:>8,.0f} "
            f"{row[('ns_p50', 'nonservice_new')]:>15,.0f} "
            f"{row[('entries_visited_mean', 'nonservice_new')]:>8,.0f} "
            f"{row[('ns_p50', 'established')]:>14,.0f} "
            f"{memory[(services, endpoints)] / 2**20:>11,.1f}")
    return lines


def _ipvs_rows(points) -> list[str]:
    """svc cmp: service-table entries compared per first packet; conn cmp: connection-table
    entries compared per established packet."""
    table, memory = _pivot(points, ["ns_p50", "svc_compares_mean", "conn_compares_mean"])
    lines = [f"\n{'ipvs: S':>9} {'E':>3} {'new→svc p50 ns':>15} {'svc cmp':>8} "
             f"{'new→pod p50 ns':>15} {'estab. p50 ns':>14} {'conn cmp':>9} {'kernel MiB':>11}"]
    for (services, endpoints), row in table.iterrows():
        lines.append(
            f"{services:>9,} {int(endpoints):>3} {row[('ns_p50', 'service_new')]:>15,.0f} "
            f"{row[('svc_compares_mean', 'service_new')]:>8,.2f} "
            f"{row[('ns_p50', 'nonservice_new')]:>15,.0f} "
            f"{row[('ns_p50', 'established')]:>14,.0f} "
            f"{row[('conn_compares_mean', 'established')]:>9,.2f} "
            f"{memory[(services, endpoints)] / 2**20:>11,.1f}")
    return lines


def _nftables_rows(points) -> list[str]:
    """rules: nft rules started per packet over every hook; pre: those at PREROUTING, where
    the service and endpoint are chosen; lookups: set and map lookups per first packet."""
    table, memory = _pivot(points, ["ns_p50", "entries_visited_mean", "nat_entries_visited_mean",
                                    "set_lookups_mean"])
    lines = [f"\n{'nftables: S':>11} {'E':>3} {'new→svc p50 ns':>15} {'rules':>6} {'pre':>5} {'lookups':>8} "
             f"{'new→pod p50 ns':>15} {'rules':>6} {'estab. p50 ns':>14} {'kernel MiB':>11}"]
    for (services, endpoints), row in table.iterrows():
        lines.append(
            f"{services:>11,} {int(endpoints):>3} {row[('ns_p50', 'service_new')]:>15,.0f} "
            f"{row[('entries_visited_mean', 'service_new')]:>6,.1f} "
            f"{row[('nat_entries_visited_mean', 'service_new')]:>5,.1f} "
            f"{row[('set_lookups_mean', 'service_new')]:>8,.1f} "
            f"{row[('ns_p50', 'nonservice_new')]:>15,.0f} "
            f"{row[('entries_visited_mean', 'nonservice_new')]:>6,.1f} "
            f"{row[('ns_p50', 'established')]:>14,.0f} "
            f"{memory[(services, endpoints)] / 2**20:>11,.1f}")
    return lines


def _benchmark_line(row) -> str:
    if row["benchmark"] == "ipvs_connections":
        sizes = sorted(int(k.rsplit("_", 1)[1]) for k in row.index
                       if k.startswith("conn_compares_mean_") and row[k] == row[k])  # not NaN
        return ("IPVS connection table (4096 chains), entries compared per established packet: "
                + ", ".join(f"{n:,} connections {row[f'conn_compares_mean_{n}']:.2f} "
                            f"(n/8192 + 1 = {n / 8192 + 1:.2f})" for n in sizes))
    if row["benchmark"] == "kernel_speed":
        return (f"kernel speed at {row['services']:,} services, Cython vs its Python twin per first packet "
                f"(medians of wall ns; the ratio is of CPU time): "
                f"to a service {row['service_cython_ns_p50']:,.0f} vs {row['service_python_ns_p50']:,.0f} ns "
                f"= {row['service_speedup']:,.0f}x; not to a service {row['nonservice_cython_ns_p50']:,.0f} vs "
                f"{row['nonservice_python_ns_p50']:,.0f} ns = {row['nonservice_speedup']:,.0f}x; "
                f"{row['ns_per_visited_entry']:.2f} ns per visited entry")
    return (f"load {row['services']:,} services x {int(row['endpoints'])} endpoints "
            f"({row['entries']:,.0f} entries): {row['load_seconds']:.1f} s, "
            f"peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB")
