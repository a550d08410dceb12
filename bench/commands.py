"""What each kpbench subcommand does, once bench.cli has parsed its arguments."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import yaml

from bench.cli import write_atomically
from bench.errors import InputError


def run(args) -> int:
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
    if args.mode == "ipvs":
        return _rules_ipvs(args)
    if args.mode == "nftables":
        return _rules_nftables(args)
    from bench.proxies.iptables import WriterOptions, write_full, write_partial

    _refuse(args, "iptables", {"--ipvs-scheduler": args.ipvs_scheduler is not None, "--listing": args.listing})
    cluster = load_cluster_args(args.objects, args.config, args.node_ip, args)
    options = WriterOptions(include_jump_rules=args.jump_rules, service_order_seed=args.order_seed)
    if args.previous:
        previous = load_cluster_args(args.previous, args.config, args.node_ip, args)
        text = write_partial(previous, cluster, options)
    else:
        text = write_full(cluster, options)
    _emit(text, args.output)
    return 0


def _rules_ipvs(args) -> int:
    from bench.proxies.ipvs import IpvsWriterOptions, write

    _refuse(args, "ipvs", {"--previous": bool(args.previous), "--order-seed": args.order_seed is not None,
                           "--listing": args.listing})
    cluster = ipvs_cluster_args(args)
    _emit(write(cluster, IpvsWriterOptions(include_jump_rules=args.jump_rules)), args.output)
    return 0


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
                              all_endpoints=args.all_endpoints, seed=args.seed)
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


def _positive(values, name: str) -> list[int]:
    for value in values:
        if value <= 0:
            raise InputError(f"must be a positive number, got {value}", "command line", name)
    return list(values)


def cmd_bench(args) -> int:
    from bench import benchmarks, plots, sweep
    from bench.results import ResultsWriter, export_csv, read_jsonl

    profile = sweep.PROFILES[args.profile]
    unknown = set(args.modes or ()) - set(sweep.MODES)
    if unknown:
        raise InputError(f"unknown mode {sorted(unknown)[0]!r} (kpbench measures {', '.join(sweep.MODES)})",
                         "command line", "--modes")
    modes = args.modes or sweep.MODES
    by_mode = profile.get("services_by_mode", {})
    points = [point for mode in modes for point in sweep.grid(
        [mode],
        _positive(args.services or by_mode.get(mode, profile["services"]), "--services"),
        _positive(args.endpoints or profile["endpoints"], "--endpoints"),
        _positive(args.nodes or profile["nodes"], "--nodes"),
        _positive([args.packets or profile["packets"]], "--packets")[0],
        args.seed,
    )]
    out = Path(args.out)
    path = sweep.run(points, out, fresh=args.fresh, quiet=args.quiet)
    if not args.no_benchmarks:
        _run_benchmarks(path, args, modes, benchmarks, ResultsWriter, read_jsonl)
    frame = export_csv(path, out / "results.csv")
    written = [path, out / "results.csv", plots.first_packet_latency(frame, out / "first_packet_latency.png")]
    print(summary_table(frame))
    print(f"\nwrote {', '.join(map(str, written[:-1]))} and {written[-1]}")
    return 0


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
            services=1000 if quick else 10000, packets=100 if quick else 300, seed=args.seed),
        "load_ruleset": lambda: benchmarks.load_cost(
            services=1000 if quick else 20000, endpoints=10, seed=args.seed),
    }
    if "ipvs" in modes:
        jobs["ipvs_connections"] = lambda: connection_scaling(
            PROFILES[args.profile]["ipvs_connections"], seed=args.seed)
    for name, job in jobs.items():
        key = hashlib.sha256(json.dumps([name, quick, args.seed]).encode()).hexdigest()[:16]
        if key in done:
            continue
        if not args.quiet:
            print(f"benchmark: {name} ...", file=sys.stderr)
        writer.append({**job(), "benchmark_id": key})


def summary_table(frame) -> str:
    """The short tables `kpbench bench` prints: one per mode, one row per point."""
    points = frame[frame["kind"] == "point"]
    if points.empty:
        return "no points measured"
    lines = []
    for mode, rows in points.groupby("mode", sort=False):
        lines += {"ipvs": _ipvs_rows, "nftables": _nftables_rows}.get(mode, _iptables_rows)(rows)
    for _, bench_row in frame[frame["kind"] == "benchmark"].iterrows():
        lines.append(_benchmark_line(bench_row))
    return "\n".join(lines)


def _pivot(points, values: list[str]):
    table = points.pivot_table(index=["services", "endpoints"], columns="workload", values=values,
                               aggfunc="last")
    return table, points.groupby(["services", "endpoints"])["kernel_bytes"].last()


def _iptables_rows(points) -> list[str]:
    table, memory = _pivot(points, ["ns_p50", "entries_visited_mean"])
    lines = [f"{'services':>9} {'E':>3} {'new→svc p50 ns':>15} {'entries':>8} "
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
