"""`kpbench report`: results.jsonl → reports/index.html, reports/*.png and reports/summary.md.

The page is self-contained (PNGs embedded as data URIs) and built from the Jinja2 template in
bench/templates/report.html.j2: a summary first (which mode wins at which scale, crossovers,
machine and versions), then one section per question. A section whose data is not in the
results says so and names what is missing; modes that did not run are named, never guessed.
"""
from __future__ import annotations

import base64
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from bench import plots
from bench.analysis import complexity, crossovers, fit_loglog
from bench.cli import write_atomically
from bench.errors import InputError
from bench.realkernel.prereq import MODE_TOOLS
from bench.realkernel.runner import MIN_RULES_FOR_SLOPE
from bench.results import FORMAT_VERSION, read_jsonl, results_frame as flatten
from bench.sweep import MODELLED_CPUS, MODES, PROFILES, profile_points


@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]]
    id: str | None = None

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in self.rows])


@dataclass
class Figure:
    file: str
    title: str
    data_uri: str
    command: str


@dataclass
class Section:
    key: str
    title: str
    text: str
    figures: list[Figure] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    alerts: list[str] = field(default_factory=list)  # shown more loudly than notes


# ---------------------------------------------------------------------------- reading results

def load_results(path: Path) -> pd.DataFrame:
    """The records of a kpbench results file as a frame; anything else is an InputError."""
    name = str(path)
    try:
        records = read_jsonl(path)
    except FileNotFoundError:
        raise InputError("no such file (run `kpbench bench` first)", name) from None
    except IsADirectoryError:
        raise InputError("is a directory, not a results.jsonl file", name) from None
    except UnicodeDecodeError:
        raise InputError("not UTF-8 text, so not a kpbench results file", name) from None
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror}", name) from None
    return results_frame(records, name)


def results_frame(records: list, name: str) -> pd.DataFrame:
    """Check that ``records`` (read from ``name``) are kpbench results; flatten them into a frame."""
    if not records:
        raise InputError("is empty: no results to report (run `kpbench bench` first)", name)
    for number, record in enumerate(records, 1):
        where = f"{name}: record {number}"
        if not isinstance(record, dict) or "kind" not in record or "format" not in record:
            raise InputError("not a kpbench results record (it has no kind and format)", where)
        if record["format"] != FORMAT_VERSION:
            age = "an older" if _number(record["format"]) < FORMAT_VERSION else "a newer"
            raise InputError(f"written by {age} kpbench (format {record['format']!r}; this one reads "
                             f"format {FORMAT_VERSION}): rerun `kpbench bench --fresh`", where, "format")
    frame = flatten(records)
    points = frame[frame["kind"] == "point"]
    if points.empty:
        raise InputError('holds no sweep points (records of kind "point"): run `kpbench bench`', name)
    for column in ("mode", "services", "endpoints", "nodes", "workload"):
        if column not in points or points[column].isna().any():
            raise InputError("a sweep point has no value for it", name, column)
    # Measurements a section may lack: absent columns become empty ones, drawn as "not measured".
    absent = [c for c in ("ns_p50", "ns_p99", "entries_visited_mean", "kernel_bytes") if c not in frame]
    return frame.assign(**{c: float("nan") for c in absent})


def _number(value) -> float:
    return value if isinstance(value, (int, float)) else float("-inf")


# ---------------------------------------------------------------------------- summary

def _reference_modes(frame: pd.DataFrame) -> set[str]:
    return {mode for mode, label in plots.mode_labels(frame).items() if label != mode}


def _reference_endpoints(points: pd.DataFrame) -> int:
    """The endpoints-per-service value the summary compares at: the one whose services axis
    every mode shares most of (then the one most modes ran, then the larger)."""
    modes = [group for _, group in points.groupby("mode")]

    def coverage(endpoints) -> tuple[int, int, int]:
        sizes = [set(g.loc[g["endpoints"] == endpoints, "services"]) for g in modes]
        return len(set.intersection(*sizes)), sum(bool(s) for s in sizes), endpoints

    return int(max(set(points["endpoints"]), key=coverage))


def _fmt(value, spec: str = ",.0f") -> str:
    return "—" if value is None or pd.isna(value) else format(value, spec)


def headline(frame: pd.DataFrame) -> tuple[Table, int, int]:
    """One row per mode that ran, compared at the largest services size every mode measured
    (a mode that lacks that size or endpoint count is shown at its own largest)."""
    points = plots.against_services(plots.points(frame))
    endpoints = _reference_endpoints(points)
    at_e = points[points["endpoints"] == endpoints]
    common = set.intersection(*(set(g["services"]) for _, g in at_e.groupby("mode")))
    services = int(max(common or set(at_e["services"])))
    labels = plots.mode_labels(frame)
    table = Table(["mode", "services measured", "first packet p50, ns", "first packet p99, ns",
                   "entries visited", "non-service new p50, ns", "established p50, ns",
                   "kernel memory, MiB", "p50 growth (∝ S^slope)"], [])
    for mode, mine in points.groupby("mode"):
        mine = mine[mine["endpoints"] == (endpoints if endpoints in set(mine["endpoints"])
                                          else mine["endpoints"].max())]
        size = services if services in set(mine["services"]) else mine["services"].max()
        row = {w: r.iloc[-1] for w, r in mine[mine["services"] == size].groupby("workload")}
        first = row.get("service_new", {})
        table.rows.append([
            labels[mode],
            ", ".join(f"{s:,}" for s in sorted(points.loc[points["mode"] == mode, "services"].unique())),
            _fmt(first.get("ns_p50")), _fmt(first.get("ns_p99")),
            _fmt(first.get("entries_visited_mean"), ",.1f"),
            _fmt(row.get("nonservice_new", {}).get("ns_p50")), _fmt(row.get("established", {}).get("ns_p50")),
            _fmt(first.get("kernel_bytes", float("nan")) / 2**20, ",.1f"),
            _slope(mine[mine["workload"] == "service_new"]),
        ])
    return table, services, endpoints


def _slope(rows: pd.DataFrame) -> str:
    try:
        fit = fit_loglog(rows["services"], rows["ns_p50"])
    except ValueError:
        return "— (needs 3 sizes)"
    return f"{fit.slope:.2f} [{fit.ci_low:.2f}, {fit.ci_high:.2f}]"


def winners(frame: pd.DataFrame) -> tuple[Table, list[str]]:
    """Fastest first packet (p50) per services size, and the same as sentences over size ranges.
    Reference models do not compete: they are what an eBPF data path would cost, not kube-proxy."""
    points = plots.against_services(plots.points(frame))
    endpoints = _reference_endpoints(points)
    rows = points[(points["workload"] == "service_new") & (points["endpoints"] == endpoints)
                  & ~points["mode"].isin(_reference_modes(frame))]
    table = Table(["services", "fastest first packet (p50)", "p50 by mode, ns"], [])
    runs: list[list] = []
    for services, group in rows.groupby("services"):
        group = group.dropna(subset=["ns_p50"]).drop_duplicates("mode", keep="last").sort_values("ns_p50")
        if group.empty:
            continue
        best = group.iloc[0]
        table.rows.append([f"{services:,}", best["mode"],
                           ", ".join(f"{r['mode']} {r['ns_p50']:,.0f}" for _, r in group.iterrows())])
        if runs and runs[-1][0] == best["mode"]:
            runs[-1][2] = services
        else:
            runs.append([best["mode"], services, services])
    sentences = [f"{mode} has the fastest first packet (p50, E={endpoints}) "
                 + (f"at {low:,} services" if low == high else f"from {low:,} to {high:,} services")
                 for mode, low, high in runs]
    return table, sentences


def machine(frame: pd.DataFrame) -> list[tuple[str, str]]:
    """What the results were measured on, from the env stamp of the last record."""
    env = {c.removeprefix("env."): frame[c].dropna().iloc[-1] for c in frame.columns
           if c.startswith("env.") and frame[c].notna().any()}
    if "memory_bytes" in env:
        env["memory_bytes"] = f"{int(env['memory_bytes']) / 2**30:.1f} GiB"
    keys = [("cpu", "CPU"), ("cpus", "CPUs"), ("memory_bytes", "memory"), ("machine", "architecture"),
            ("os", "operating system"), ("backend", "kernels"), ("kpbench", "kpbench"), ("python", "Python"),
            ("numpy", "NumPy"), ("cython", "Cython"), ("git_commit", "git commit")]
    return [(label, str(env[key])) for key, label in keys if key in env]


# ---------------------------------------------------------------------------- sections

def bench_command(frame: pd.DataFrame, results: Path) -> str:
    """The `kpbench bench` call(s) that measure these points again: the smallest profile whose
    points include them all, or else one call per measured grid."""
    points = frame[frame["kind"] == "point"]
    modes = sorted(points["mode"].unique())
    out = shlex.quote(str(Path(results).parent))
    seeds, cpus = points["seed"].unique(), points["cpus"].unique() if "cpus" in points else [MODELLED_CPUS]
    if len(seeds) == 1 and len(cpus) == 1:
        measured = set(points["point_id"])
        for profile in PROFILES:
            if measured <= {p.point_id for p in profile_points(profile, modes, int(seeds[0]), int(cpus[0]))}:
                return (f"kpbench bench --profile {profile} --modes {' '.join(modes)} --seed {int(seeds[0])}"
                        f"{_cpus(cpus[0])} --out {out}")
    return " && ".join(_grid_commands(points, out))


def _cpus(cpus) -> str:
    return "" if int(cpus) == MODELLED_CPUS else f" --cpus {int(cpus)}"


def _grid_commands(points: pd.DataFrame, out: str) -> list[str]:
    """One call per (endpoints, nodes, packets, seed, cpus) block, modes with the same services
    sharing a call; variant points are left out (they come from a profile)."""
    points = plots.points(points)
    if "cpus" not in points:
        points = points.assign(cpus=MODELLED_CPUS)
    endpoints: dict[tuple, list[str]] = {}
    for (mode, e, *block), group in points.groupby(["mode", "endpoints", "nodes", "packets", "seed", "cpus"]):
        services = " ".join(str(int(s)) for s in sorted(group["services"].unique()))
        endpoints.setdefault((mode, services, *block), []).append(str(int(e)))
    calls: dict[tuple, list[str]] = {}
    for (mode, services, *block), values in endpoints.items():
        calls.setdefault((services, " ".join(values), *block), []).append(mode)
    return [f"kpbench bench --modes {' '.join(modes)} --services {services} --endpoints {e} "
            f"--nodes {int(n)} --packets {int(p)} --seed {int(seed)}{_cpus(cpus)} --out {out}"
            for (services, e, n, p, seed, cpus), modes in calls.items()]


def _figure(draw, frame: pd.DataFrame, out: Path, title: str, results: Path,
            report_command: str) -> Figure:
    path = draw(frame, out / f"{draw.__name__}.png")
    command = f"{bench_command(frame, results)} && {report_command}"
    uri = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    return Figure(path.name, title, uri, command)


def _lacking(frame: pd.DataFrame, columns: list[str]) -> list[str]:
    """Modes that ran but recorded none of these columns."""
    points = plots.points(frame)
    present = [c for c in columns if c in points]
    return sorted(mode for mode, group in points.groupby("mode")
                  if not present or group[present].isna().all().all())


# (key, title, explanation, [(figure function, caption, columns it draws)])
SECTIONS = [
    ("first-packet", "First-packet latency against services",
     "The first packet of a new connection to a service runs the NAT rules: iptables walks "
     "KUBE-SERVICES rule by rule, IPVS and nftables look the service up in a hash table. Log-log: "
     "a straight line of slope 1 is linear growth, slope 0 is flat. Dotted lines are least-squares "
     "fits through each mode's largest endpoints-per-service series (where it has 3 or more sizes).",
     [(plots.first_packet_latency, "first-packet latency p50 and p99 against services",
       ["ns_p50", "ns_p99"])]),
    ("distribution", "Latency distribution at 5,000, 10,000 and 30,000 services",
     "Percentiles of the model's first-packet latency (bars) at the measured sizes nearest to the "
     "Kubernetes nftables blog's 5k/10k/30k services, with the blog's published first-packet round-trip "
     "times drawn as labelled marks. The blog measures a whole round trip on unstated hardware; the "
     "model measures only the data-path lookup, so compare shapes (growth, ordering of modes), not levels.",
     [(plots.latency_distribution, "first-packet latency percentiles with published reference marks",
       ["ns_p50"])]),
    ("other-workloads", "Non-service new connections and established packets",
     "A new connection to a pod IP still walks every KUBE-SERVICES rule in iptables mode before "
     "falling through; an established packet is a conntrack hit and skips NAT entirely.",
     [(plots.other_workloads, "non-service new connections and established packets", ["ns_p50"])]),
    ("work", "Work counters against services",
     "Exact counts per packet from the kernels' own counters: the same on every machine and run "
     "with the same seed, so these are the numbers the CI gate relies on.",
     [(plots.work_counters, "work per first packet against services", list(plots.WORK_COUNTERS))]),
    ("memory", "Memory against services and endpoints",
     "Kernel bytes are modelled from the real struct sizes of each mode's tables (per-CPU counters "
     "scaled to the modelled node's CPUs) plus conntrack; the model's own bytes are what kpbench's "
     "tables occupy in this process.",
     [(plots.memory, "memory against services and endpoints", ["kernel_bytes", "model_bytes"])]),
    ("sync", "Sync time and network programming latency",
     "How long a rule sync takes in the model (kube-proxy's metric names): a full sync, a partial "
     "sync, and adding one service; then network_programming_duration_seconds against nodes. "
     "Times are this machine's wall clock and noisy; the trend matters.",
     [(plots.sync_times, "rule sync time against services", list(plots.SYNC_METRICS)),
      (plots.network_programming, "network programming latency against nodes", [])]),
]


def figure_sections(frame: pd.DataFrame, out: Path, results: Path, report_command: str) -> list[Section]:
    sections = []
    for key, title, text, figures in SECTIONS:
        section = Section(key, title, text)
        for draw, caption, columns in figures:
            try:
                section.figures.append(_figure(draw, frame, out, caption, results, report_command))
            except plots.MissingData as missing:
                section.notes.append(f"{caption}: not in these results ({missing}).")
                continue
            lacking = _lacking(frame, columns) if columns else []
            if lacking:
                section.notes.append(f"{caption}: no data for {', '.join(lacking)}.")
        sections.append(section)
    _note_distribution(frame, next(s for s in sections if s.key == "distribution"))
    return sections


def _note_distribution(frame: pd.DataFrame, section: Section) -> None:
    """Say which percentiles the model recorded, and which target sizes were not measured."""
    points = plots.points(frame)
    recorded = plots.percentile_columns(points)
    if not {1, 10, 25, 75, 95} <= set(recorded):
        section.notes.append(
            "The results record the percentiles " + ", ".join(f"p{p:02d}" for p in recorded)
            + " (and the mean), so only those are drawn for the model; published marks without a "
            "bar beside them are percentiles the model did not record.")
    sizes = sorted(points["services"].unique())
    far = [target for target in plots.DISTRIBUTION_SIZES
           if not any(target / 2 <= size <= target * 2 for size in sizes)]
    if far:
        section.notes.append(
            "Not measured near " + ", ".join(f"{t:,}" for t in far) + " services (sizes measured: "
            + ", ".join(f"{s:,}" for s in sizes) + "); those panels show the nearest size. "
            "For the blog's sizes run e.g. `kpbench bench --services 5000 10000 30000`.")


# Crossovers the summary shows: the first packet's latency, kernel memory and sync time. The
# section below the figures lists all of them.
HEADLINE_CROSSOVERS = {("service_new", "ns_p50"), ("service_new", "ns_p99"), ("memory", "kernel_bytes"),
                       ("sync", "sync_full_proxy_rules_duration_seconds"),
                       ("sync", "sync_partial_proxy_rules_duration_seconds"),
                       ("sync", "sync_add_service_duration_seconds")}


def analysis_sections(frame: pd.DataFrame) -> tuple[Section, Section, Table | None]:
    """The complexity and crossover sections (bench.analysis), and the summary's crossovers."""
    labels = plots.mode_labels(frame)
    fits = complexity(frame).sort_values(["against", "workload", "metric", "mode"], kind="stable")
    crossings = crossovers(frame)
    fits_section = Section("complexity", "Complexity: how each metric grows",
                           "Slope of a log-log least-squares fit (metric ∝ size^slope) with its 95% "
                           "confidence interval, r² and the number of sizes: 0 is constant, 1 linear.",
                           tables=_tables(fits, labels, {"slope": ".2f", "ci_low": ".2f", "ci_high": ".2f",
                                                         "r2": ".3f"}))
    if not fits_section.tables:
        fits_section.notes.append("no fits in these results: a fit needs 3 or more sizes.")
    crossings_section = Section("crossovers", "Crossovers",
                                "Services counts where one mode's curve crosses another's (interpolated in "
                                "log-log space): mode_a is the cheaper one below, mode_b above.",
                                tables=_tables(crossings, labels, {"services": ",.0f"}))
    if not crossings_section.tables:
        crossings_section.notes.append("no crossovers within the sizes measured.")
    headline_rows = crossings[[(w, m) in HEADLINE_CROSSOVERS
                               for w, m in zip(crossings["workload"], crossings["metric"])]]
    summary = _tables(headline_rows, labels, {"services": ",.0f"})
    return fits_section, crossings_section, summary[0] if summary else None


def _tables(table: pd.DataFrame, labels: dict, formats: dict[str, str]) -> list[Table]:
    """The frame as a report table (none when empty), modes by their display names."""
    if table.empty:
        return []
    table = table.replace({c: labels for c in ("mode", "mode_a", "mode_b") if c in table})
    rows = [[_fmt(v, formats[c]) if c in formats else str(v) for c, v in row.items()]
            for _, row in table.iterrows()]
    return [Table(list(table.columns), rows)]


# ---------------------------------------------------------------------------- model vs kernel

KERNEL_TEXT = (
    "`kpbench kernel` loads the same rulesets into the real Linux kernel (network namespaces of its "
    "own, one endpoint per service) with each tool, times TCP connects to services at the first, "
    "last and random positions of KUBE-SERVICES, and runs the model on the same SYNs. ns per visited "
    "rule: the Theil–Sen slope of each connection's time against the rules its first packet visits "
    "(fixed costs drop out; it needs {min_rules}+ rules between the first and last service, so not "
    "for nftables' map lookups or tiny clusters). Overall: the p50 at random positions (kernel: over "
    "conntrack alone) divided by the rules visited, fixed costs left in. Counters: after a known set "
    "of connections, every rule's packet counter in the kernel against the model's, which must agree "
    "exactly. Kernel times are connect times on a shared machine: noisy, compare the trend.")


def kernel_command(rows: pd.DataFrame, results: Path) -> str:
    """The `kpbench kernel` call that measures these kernel points again (as root)."""
    modes = " ".join(sorted(rows["mode"].unique()))
    services = " ".join(str(int(s)) for s in sorted(rows["services"].unique()))
    connections = rows["connections_per_position"].dropna() if "connections_per_position" in rows else []
    options = f" --connections {int(max(connections))}" if len(connections) else ""
    return (f"kpbench kernel --modes {modes} --services {services}{options} --nodes {int(rows['nodes'].iloc[-1])} "
            f"--seed {int(rows['seed'].iloc[-1])} --out {shlex.quote(str(Path(results).parent))}")


def _timed_out(row: pd.Series) -> bool:
    value = row.get("load_timed_out")
    return value is not None and not pd.isna(value) and bool(value)


def _measured(rows: pd.DataFrame) -> pd.DataFrame:
    """The kernel records whose rules loaded in time (the others carry no measurements)."""
    return rows[[not _timed_out(r) for _, r in rows.iterrows()]]


def _ratio(kernel, model) -> str:
    """kernel ÷ model; none when either is at or below zero (noise, see the section's note)."""
    return "—" if pd.isna(kernel) or pd.isna(model) or min(kernel, model) <= 0 else f"{kernel / model:.2f}×"


def _agreement(row: pd.Series) -> str:
    agreeing, compared = int(row["rules_agreeing"]), int(row["rules_compared"])
    if agreeing == compared:
        return f"{agreeing:,}/{compared:,} ✓"
    return f"{agreeing:,}/{compared:,} ✗ {compared - agreeing:,} disagree"


def kernel_table(rows: pd.DataFrame) -> Table:
    """One row per tool and services count: ns per visited rule of both and their ratio, the
    counter agreement and the real tool's rule-load times."""
    table = Table(["tool", "mode", "services", "rules visited first→last", "model ns/rule",
                   "kernel ns/rule", "kernel ÷ model", "model ns/rule overall", "kernel ns/rule overall",
                   "kernel ÷ model overall", "counters agreeing / compared", "rule load full / partial, s"],
                  [], id="model-vs-kernel-table")
    for _, r in rows.iterrows():
        head = [r["tool"], r["mode"], f"{int(r['services']):,}"]
        if _timed_out(r):
            table.rows.append(head + [f"not measured: the rule load took over {r['load_timeout_seconds']:g} s"]
                              + ["—"] * (len(table.columns) - 4))
            continue
        table.rows.append(head + [
            f"{r['positions.first.entries_visited']:,.0f}→{r['positions.last.entries_visited']:,.0f}",
            _fmt(r["model_ns_per_rule"], ",.1f"), _fmt(r["kernel_ns_per_rule"], ",.1f"),
            _ratio(r["kernel_ns_per_rule"], r["model_ns_per_rule"]),
            _fmt(r["model_ns_per_rule_overall"], ",.1f"), _fmt(r["kernel_ns_per_rule_overall"], ",.1f"),
            _ratio(r["kernel_ns_per_rule_overall"], r["model_ns_per_rule_overall"]),
            _agreement(r), f"{r['sync_full_proxy_rules_duration_seconds']:.3f} / "
                           f"{r['sync_partial_proxy_rules_duration_seconds']:.3f}"])
    return table


def _disagreeing(rows: pd.DataFrame) -> pd.DataFrame:
    if "rules_compared" not in rows:
        return rows.iloc[:0]
    return rows[rows["rules_compared"].notna() & (rows["rules_agreeing"] != rows["rules_compared"])]


def _disagreement_alert(row: pd.Series) -> str:
    listed = row.get("disagreements")
    listed = listed if isinstance(listed, list) else []
    shown = "; ".join(f"{d['rule']} ({d['text']}): kernel {d['kernel']}, model {d['model']}" for d in listed[:5])
    count = int(row["rules_compared"] - row["rules_agreeing"])
    return (f"{row['tool']} at {int(row['services']):,} services: {count:,} of {int(row['rules_compared']):,} "
            f"rule counters disagree with the model" + (f" — {shown}" if shown else "")
            + (" …" if count > len(listed[:5]) else "") + ".")


def kernel_section(frame: pd.DataFrame, out: Path, results: Path, report_command: str) -> Section:
    rows = plots.kernel_points(frame)
    section = Section("model-vs-kernel", "Model vs kernel", KERNEL_TEXT.format(min_rules=MIN_RULES_FOR_SLOPE))
    if rows.empty:
        modes = [m for m in MODE_TOOLS if m in set(plots.points(frame)["mode"])] or list(MODE_TOOLS)
        section.notes.append(
            "Real-kernel measurements are not in these results (no records of kind \"kernel_point\"). "
            f"To add them run, as root, `kpbench kernel --modes {' '.join(modes)} --out "
            f"{shlex.quote(str(Path(results).parent))}` and then `{report_command}`.")
        return section
    section.tables.append(kernel_table(rows))
    section.alerts += [_disagreement_alert(r) for _, r in _disagreeing(rows).iterrows()]
    measured = _measured(rows)
    per_rule = measured.filter(["kernel_ns_per_rule", "kernel_ns_per_rule_overall"])
    if (per_rule <= 0).any().any():
        section.notes.append("A kernel figure at or below zero: at that size the rules cost less than this "
                             "machine's noise in a connect time.")
    failed = measured.filter(regex=r"^positions\.\w+\.failed$|^validation_failed_connections$").sum().sum()
    if failed:
        section.notes.append(f"{int(failed):,} kernel connections failed and are not in the times.")
    try:
        path = plots.model_vs_kernel(frame, out / "model_vs_kernel.png")
    except plots.MissingData as missing:
        section.notes.append(f"first-packet latency, model vs kernel: not in these results ({missing}).")
        return section
    uri = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    section.figures.append(Figure(path.name, "first-packet latency against services, model vs real kernel",
                                  uri, f"{kernel_command(rows, results)} && {report_command}"))
    return section


def kernel_summary(frame: pd.DataFrame) -> tuple[list[str], str | None]:
    """The summary's model-vs-kernel sentences: the counter agreement (the alert when any
    disagree) and each tool's ns per visited rule at its largest measured size."""
    rows = plots.kernel_points(frame)
    if rows.empty:
        return ["Not compared with the real kernel in these results (see Model vs kernel)."], None
    measured = _measured(rows)
    if measured.empty:
        return ["Real kernel: no point was measured (every rule load took longer than `kpbench kernel "
                "--load-timeout`; see Model vs kernel)."], None
    disagreeing = _disagreeing(measured)
    compared = int(measured["rules_compared"].sum())
    alert, sentences = None, []
    if not disagreeing.empty:
        alert = (f"Real kernel: rule counters DISAGREE with the model at {len(disagreeing)} of {len(measured)} "
                 "points (" + ", ".join(f"{r['tool']} {int(r['services']):,} services"
                                       for _, r in disagreeing.iterrows()) + "): see Model vs kernel.")
    else:
        sentences.append(f"Real kernel: every rule counter agrees with the model ({len(measured)} points, "
                         f"{compared:,} rule counters compared; tools {', '.join(measured['tool'].unique())}).")
    for tool, mine in measured.groupby("tool"):
        r = mine.iloc[-1]
        slope = pd.notna(r["kernel_ns_per_rule"]) and pd.notna(r["model_ns_per_rule"])
        suffix, label = ("", "") if slope else ("_overall", " overall")
        kernel, model = r["kernel_ns_per_rule" + suffix], r["model_ns_per_rule" + suffix]
        sentences.append(f"{tool} at {int(r['services']):,} services: kernel {_fmt(kernel, ',.1f')} ns per visited "
                         f"rule{label}, model {_fmt(model, ',.1f')} "
                         f"(kernel ÷ model {_ratio(kernel, model)}).")
    return sentences, alert


# ---------------------------------------------------------------------------- writing

def write_report(results: Path, out: Path) -> list[Path]:
    """Write index.html, summary.md and the PNGs into ``out``; returns the paths written."""
    results, out = Path(results), Path(out)
    frame = load_results(results)
    out.mkdir(parents=True, exist_ok=True)
    report_command = f"kpbench report --results {shlex.quote(str(results))} --out {shlex.quote(str(out))}"
    ran = sorted(plots.points(frame)["mode"].unique())
    table, services, endpoints = headline(frame)
    by_size, sentences = winners(frame)
    fits, crossings, headline_crossings = analysis_sections(frame)
    sections = (figure_sections(frame, out, results, report_command)
                + [kernel_section(frame, out, results, report_command), fits, crossings])
    kernel_sentences, kernel_alert = kernel_summary(frame)
    context = {
        "results": str(results), "headline": table, "headline_services": services,
        "headline_endpoints": endpoints, "winners": by_size, "sentences": sentences,
        "crossovers": headline_crossings, "machine": machine(frame),
        "ran": [plots.mode_labels(frame)[m] for m in ran],
        "missing": [m for m in MODES if m not in ran], "sections": sections,
        "report_command": report_command, "kernel_sentences": kernel_sentences, "kernel_alert": kernel_alert,
    }
    environment = Environment(loader=PackageLoader("bench", "templates"),
                              autoescape=select_autoescape(["html.j2"], default_for_string=False),
                              undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    html = environment.get_template("report.html.j2").render(**context)
    markdown = environment.get_template("summary.md.j2").render(**context)
    write_atomically(out / "index.html", html)
    write_atomically(out / "summary.md", markdown)
    return [out / "index.html", out / "summary.md"] + [out / f.file for s in sections for f in s.figures]


def cmd_report(args) -> int:
    written = write_report(Path(args.results), Path(args.out))
    print(f"wrote {written[0]}, {written[1]} and {len(written) - 2} PNG figures")
    return 0
