"""PNG figures from results.jsonl (matplotlib, Agg backend: no display needed).

Every figure takes the records as a pandas frame (``pd.json_normalize`` of results.jsonl),
writes one PNG and returns its path. A figure whose data is not in the results raises
``MissingData`` naming what is missing, so the report can say so instead of drawing nothing.
Each mode keeps one colour, marker, line style and bar hatch in every figure: the marker and
line style keep the modes apart when the page is printed in greyscale.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bench.analysis import fit_loglog  # noqa: E402


class Style(NamedTuple):
    colour: str
    marker: str
    linestyle: str | tuple
    hatch: str


MODE_STYLE = {
    "iptables": Style("#1f4e9c", "o", "-", ""),
    "iptables-nft": Style("#6a9bd8", "P", (0, (5, 2)), "||"),
    "ipvs": Style("#d95f02", "s", "--", "//"),
    "nftables": Style("#1b9e77", "D", "-.", ".."),
    "userspace": Style("#7b3294", "v", ":", "xx"),
    "ebpf": Style("#555555", "^", (0, (6, 2, 1, 2, 1, 2)), "\\\\"),
}
_UNKNOWN_MODE = Style("#999999", "X", (0, (1, 3)), "++")

# First-packet round-trip time of a new connection to a service, µs, read from the SVG charts of
# the Kubernetes blog "NFTables mode for kube-proxy" (2025-02-28); see
# docs/published-figures.md §1. The blog does not state the hardware.
PUBLISHED_FIRST_PACKET_US = {
    ("iptables", 5000): {1: 15, 50: 47, 90: 120, 99: 152},
    ("iptables", 10000): {1: 11, 50: 62, 90: 188, 99: 257},
    ("iptables", 30000): {1: 40, 50: 272, 90: 493, 99: 714},
    ("nftables", 5000): {1: 8, 50: 14, 90: 21, 99: 38},
    ("nftables", 10000): {1: 8, 50: 14, 90: 21, 99: 37},
    ("nftables", 30000): {1: 8, 50: 14, 90: 21, 99: 38},
    ("ipvs", 5000): {1: 12, 50: 22, 90: 30, 99: 48},
    ("ipvs", 10000): {1: 13, 50: 23, 90: 32, 99: 49},
    ("ipvs", 30000): {1: 14, 50: 27, 90: 37, 99: 56},
}
PUBLISHED_SOURCE = "published: Kubernetes blog \"NFTables mode for kube-proxy\" (2025), first-packet RTT"
DISTRIBUTION_SIZES = (5000, 10000, 30000)


class MissingData(Exception):
    """The results hold nothing this figure could draw; the message says what is missing."""


def style(mode: str) -> Style:
    return MODE_STYLE.get(mode, _UNKNOWN_MODE)


def mode_labels(frame: pd.DataFrame) -> dict[str, str]:
    """Display name per mode; a mode whose records say reference_model is labelled so."""
    rows = points(frame)
    reference = set()
    if "reference_model" in rows:
        reference = set(rows.loc[rows["reference_model"].fillna(False).astype(bool), "mode"])
    return {mode: f"{mode} (reference model)" if mode in reference else mode
            for mode in rows["mode"].unique()}


def percentile_columns(frame: pd.DataFrame) -> dict[int, str]:
    """{percentile: column} for the ns_pNN latency columns present in the records."""
    found = {}
    for column in frame.columns:
        match = re.fullmatch(r"ns_p(\d+)", column)
        if match and frame[column].notna().any():
            found[int(match.group(1))] = column
    return dict(sorted(found.items()))


def points(frame: pd.DataFrame) -> pd.DataFrame:
    """The sweep's point records of kube-proxy's default configuration (no variant)."""
    rows = frame[frame["kind"] == "point"]
    return rows[rows["variant"].fillna("") == ""] if "variant" in rows else rows


def against_services(rows: pd.DataFrame) -> pd.DataFrame:
    """Per mode and endpoints per service, only the node count with the most services sizes
    measured: a line against services then varies services alone."""
    kept = [group[group["nodes"] == group.groupby("nodes")["services"].nunique().idxmax()]
            for _, group in rows.groupby(["mode", "endpoints"])]
    return pd.concat(kept) if kept else rows


def _workload(frame: pd.DataFrame, workload: str, columns: list[str]) -> pd.DataFrame:
    rows = points(frame)
    missing = [c for c in columns if c not in rows or rows[c].isna().all()]
    if missing:
        raise MissingData(f"no {', '.join(missing)}")
    rows = against_services(rows[rows["workload"] == workload].dropna(subset=columns))
    if rows.empty:
        raise MissingData(f"no {workload} records with {', '.join(columns)}")
    return rows


def _mode_series(ax, rows: pd.DataFrame, x: str, y: str, labels: dict, scale: float = 1.0,
                 suffix: str = "") -> None:
    """One line per (mode, endpoints per service): filled markers for each mode's largest E."""
    for (mode, endpoints), group in rows.groupby(["mode", "endpoints"]):
        group = group.dropna(subset=[y]).sort_values(x)
        if group.empty:
            continue
        s = style(mode)
        main = endpoints == rows.loc[rows["mode"] == mode, "endpoints"].max()
        ax.plot(group[x], group[y] * scale, color=s.colour, marker=s.marker, linestyle=s.linestyle,
                markerfacecolor=s.colour if main else "white", alpha=1.0 if main else 0.7,
                label=f"{labels.get(mode, mode)}, E={int(endpoints)}{suffix}")


def _fit_lines(ax, rows: pd.DataFrame, y: str, labels: dict) -> None:
    """The log-log fit through each mode's largest-E series, where it has three or more sizes,
    labelled with its slope."""
    fitted = False
    for mode, group in rows.groupby("mode"):
        group = group[group["endpoints"] == group["endpoints"].max()].sort_values("services")
        try:
            fit = fit_loglog(group["services"], group[y])
        except ValueError:
            continue
        xs = np.geomspace(group["services"].min(), group["services"].max(), 20)
        ys = np.exp(fit.intercept) * xs ** fit.slope
        ax.plot(xs, ys, color=style(mode).colour, linestyle=(0, (1, 1)), linewidth=1.0)
        ax.annotate(f"S^{fit.slope:.2f}", (xs[-1], ys[-1]), textcoords="offset points", xytext=(4, 0),
                    fontsize=7, color=style(mode).colour, va="center")
        fitted = True
    if fitted:
        ax.plot([], [], color="black", linestyle=(0, (1, 1)), linewidth=1.0,
                label="least-squares fit, largest E (∝ S^slope)")


def _finish(fig, axes, title: str, path: Path, xlabel: str | list[str], ylabels: list[str],
            logx: bool | list[bool] = True, logy: bool = True) -> Path:
    """Scales, labels and grid on every panel; one legend for all panels, below them, where it
    hides no data; then write the PNG."""
    xlabels = [xlabel] * len(axes) if isinstance(xlabel, str) else xlabel
    logxs = logx if isinstance(logx, list) else [logx] * len(axes)
    for ax, xlabel, ylabel, logx in zip(axes, xlabels, ylabels, logxs):
        if logx:
            ax.set_xscale("log")
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel(xlabel + (" (log scale)" if logx else ""))
        ax.set_ylabel(ylabel + (" (log scale)" if logy else ""))
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(title)
    entries = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    columns = max(1, min(4, int(fig.get_figwidth() // 3.2)))
    legend_inches = 0.25 + 0.2 * -(-len(entries) // columns) if entries else 0.0
    fig.set_figheight(fig.get_figheight() + legend_inches)
    if entries:
        fig.legend(list(entries.values()), list(entries), loc="lower center", ncol=columns, fontsize=8)
    fig.tight_layout(rect=(0, legend_inches / fig.get_figheight(), 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def _panels(count: int, width: float = 6.0, height: float = 4.6):
    fig, axes = plt.subplots(1, count, figsize=(width * count, height), dpi=110, squeeze=False)
    return fig, list(axes[0])


def first_packet_latency(frame: pd.DataFrame, path: Path) -> Path:
    """First-packet latency (p50, p99) against services per mode, log-log, with fitted lines."""
    rows = _workload(frame, "service_new", ["ns_p50", "ns_p99"])
    labels = mode_labels(frame)
    fig, axes = _panels(2)
    for ax, column, name in zip(axes, ("ns_p50", "ns_p99"), ("median (p50)", "p99")):
        _mode_series(ax, rows, "services", column, labels)
        _fit_lines(ax, rows, column, labels)
        ax.set_title(f"{name}")
    return _finish(fig, axes, "New connection to a service: first-packet latency of the modelled "
                   "data path", path, "services", ["first-packet latency, ns"] * 2)


def _nearest_size(sizes: np.ndarray, target: int) -> int:
    return int(sizes[np.argmin(np.abs(np.log(sizes) - np.log(target)))])


def latency_distribution(frame: pd.DataFrame, path: Path) -> Path:
    """Latency percentiles at (nearest to) 5k/10k/30k services per mode, with the blog's figures
    as labelled reference marks; bars per mode in the style of the blog's chart."""
    percentiles = percentile_columns(points(frame))
    rows = _workload(frame, "service_new", list(percentiles.values()) or ["ns_p50"])
    labels = mode_labels(frame)
    fig, axes = _panels(len(DISTRIBUTION_SIZES), width=5.2)
    for ax, target in zip(axes, DISTRIBUTION_SIZES):
        _distribution_panel(ax, rows, target, percentiles, labels, legend=target == DISTRIBUTION_SIZES[0])
    return _finish(fig, axes, "First-packet latency distribution: model (bars) and published "
                   "round-trip times (marks)", path, "percentile", ["latency, µs"] * 3, logx=False)


def _distribution_panel(ax, rows: pd.DataFrame, target: int, percentiles: dict[int, str],
                        labels: dict, legend: bool) -> None:
    """One size: a bar group per percentile, a bar per mode (its largest E, the measured size
    nearest ``target``), and that mode's published value as a labelled mark over its bar."""
    modes = sorted(rows["mode"].unique())
    shown = sorted(set(percentiles) | {p for (_, size), values in PUBLISHED_FIRST_PACKET_US.items()
                                       if size == target for p in values})
    width = 0.8 / len(modes)
    used = {}
    for index, mode in enumerate(modes):
        mine = rows[rows["mode"] == mode]
        mine = mine[mine["endpoints"] == mine["endpoints"].max()]
        size = _nearest_size(mine["services"].to_numpy(), target)
        row = mine[mine["services"] == size].iloc[-1]
        used[mode] = size
        offset = (index - (len(modes) - 1) / 2) * width
        s = style(mode)
        ax.bar([shown.index(p) + offset for p in percentiles], [row[c] / 1000 for c in percentiles.values()],
               width=width, color=s.colour, hatch=s.hatch, edgecolor="black", linewidth=0.5,
               label=f"{labels[mode]}, E={int(row['endpoints'])}" if legend else None)
        for p, value in PUBLISHED_FIRST_PACKET_US.get((mode, target), {}).items():
            ax.plot(shown.index(p) + offset, value, marker="_", markersize=14, markeredgewidth=2.5,
                    color=s.colour, linestyle="none")
            ax.annotate(f"{value}", (shown.index(p) + offset, value), textcoords="offset points",
                        xytext=(0, 4), ha="center", fontsize=6)
    ax.plot([], [], marker="_", markersize=14, markeredgewidth=2.5, color="black", linestyle="none",
            label=PUBLISHED_SOURCE if legend else None)
    ax.set_xticks(range(len(shown)), [f"p{p:02d}" for p in shown])
    if len(set(used.values())) == 1:
        nearest = f"{next(iter(used.values())):,}"
    else:
        pairs = [f"{mode} {size:,}" for mode, size in used.items()]
        nearest = "\n".join("; ".join(pairs[i:i + 3]) for i in range(0, len(pairs), 3))
    ax.set_title(f"≈{target:,} services (nearest measured: {nearest})", fontsize=9)


def other_workloads(frame: pd.DataFrame, path: Path) -> Path:
    """Non-service new connections and established packets: p50 and p99 against services."""
    labels = mode_labels(frame)
    panels = []
    for workload, title in (("nonservice_new", "new connection to a pod IP (no service)"),
                            ("established", "established connection (conntrack hit)")):
        try:
            panels.append((_workload(frame, workload, ["ns_p50"]), title))
        except MissingData:
            continue
    if not panels:
        raise MissingData("no nonservice_new or established records")
    fig, axes = _panels(len(panels))
    for ax, (rows, title) in zip(axes, panels):
        _mode_series(ax, rows, "services", "ns_p50", labels, suffix=", p50")
        ax.set_title(title)
    return _finish(fig, axes, "Packets that are not a service's first packet (median)", path,
                   "services", ["latency per packet, ns"] * len(panels))


# Per-packet work counters: (column, what it counts). Each mode records the ones its kernel has.
WORK_COUNTERS = {
    "entries_visited_mean": "rules / entries visited per first packet",
    "bucket_entries_compared_mean": "hash-bucket entries compared per first packet (nftables maps)",
    "svc_compares_mean": "service-table entries compared per first packet (IPVS)",
    "set_lookups_mean": "set and map lookups per first packet",
}


def work_counters(frame: pd.DataFrame, path: Path) -> Path:
    """Deterministic work counters of the first packet against services: machine-independent."""
    return _first_packet_panels(frame, path, WORK_COUNTERS, lambda column: WORK_COUNTERS[column],
                                "Work per new connection to a service (exact counts, same on any machine)",
                                "count per packet")


def _first_packet_panels(frame: pd.DataFrame, path: Path, metrics: dict, panel_title, title: str,
                         ylabel: str) -> Path:
    """One panel per metric the records have, each metric of the service_new records against
    services per mode."""
    rows = points(frame)
    present = [c for c in metrics if c in rows and rows[c].notna().any()]
    if not present:
        raise MissingData(f"none of {', '.join(metrics)}")
    labels = mode_labels(frame)
    fig, axes = _panels(len(present), width=4.8)
    for ax, column in zip(axes, present):
        _mode_series(ax, against_services(rows[rows["workload"] == "service_new"]), "services", column, labels)
        text = panel_title(column)
        ax.set_title(text, fontsize=8 if "\n" in text else 9)
    return _finish(fig, axes, title, path, "services", [ylabel] * len(present))


def memory(frame: pd.DataFrame, path: Path) -> Path:
    """Modelled kernel bytes and the model's own bytes against services; both against endpoints."""
    rows = _workload(frame, "service_new", ["kernel_bytes"])
    labels = mode_labels(frame)
    columns = {c: name for c, name in (("kernel_bytes", "kernel tables (modelled)"),
                                       ("model_bytes", "the model's own tables"))
               if c in rows and rows[c].notna().any()}
    fig, axes = _panels(len(columns) + 1, width=4.8)
    for ax, (column, name) in zip(axes, columns.items()):
        _mode_series(ax, rows, "services", column, labels, scale=1 / 2**20)
        ax.set_title(f"{name}, against services", fontsize=9)
    modes_at = rows.groupby("services")["mode"].nunique()
    services = int(modes_at[modes_at == modes_at.max()].index.max())
    for mode, group in rows[rows["services"] == services].groupby("mode"):
        s = style(mode)
        group = group.sort_values("endpoints")
        for column, fill in zip(columns, (s.colour, "white")):
            axes[-1].plot(group["endpoints"], group[column] / 2**20, color=s.colour, marker=s.marker,
                          linestyle=s.linestyle, markerfacecolor=fill,
                          label=f"{labels[mode]}, {columns[column]}")
    axes[-1].set_title(f"against endpoints per service, at {services:,} services\n"
                       "(filled: kernel, hollow: the model's own)", fontsize=9)
    return _finish(fig, axes, "Memory: kernel tables (modelled from real struct sizes) and the model's own",
                   path, ["services"] * len(columns) + ["endpoints per service"],
                   ["memory, MiB"] * (len(columns) + 1))


SYNC_METRICS = {
    "sync_full_proxy_rules_duration_seconds": "full sync",
    "sync_partial_proxy_rules_duration_seconds": "partial sync (one endpoint changed)",
    "sync_add_service_duration_seconds": "one service added",
}


def sync_times(frame: pd.DataFrame, path: Path) -> Path:
    """Rule sync durations (full, partial, one service added) against services."""
    return _first_packet_panels(frame, path, SYNC_METRICS, lambda column: f"{SYNC_METRICS[column]}\n{column}",
                                "Rule sync time (writer + loader of the model, this machine)", "duration, s")


def network_programming(frame: pd.DataFrame, path: Path) -> Path:
    """network_programming_duration_seconds against nodes per mode (kube-proxy's default sync
    loop); and, where the results have them, the KEP-3453 5,000-node scenarios beside the
    KEP's published percentiles."""
    rows = frame[frame["kind"] == "netprog"]
    columns = {int(m.group(1)): c for c in rows.columns
               if (m := re.fullmatch(r"network_programming_duration_seconds_p(\d+)", c))}
    if rows.empty or not columns:
        raise MissingData("no netprog records (network_programming_duration_seconds)")
    kep = rows["scenario"].fillna("") == "kep3453" if "scenario" in rows else rows["kind"] != "netprog"
    fig, axes = _panels(2 if kep.any() else 1, width=6.4)
    _netprog_against_nodes(axes[0], rows[~kep], columns, mode_labels(frame))
    if kep.any():
        _netprog_kep3453(axes[1], rows[kep], columns)
    return _finish(fig, axes, "Network programming latency (modelled sync loop)", path,
                   ["nodes", "KEP-3453 scenario, 5,000 nodes"], ["network_programming_duration_seconds, s"] * 2,
                   logx=[True, False])


def _netprog_against_nodes(ax, rows: pd.DataFrame, columns: dict[int, str], labels: dict) -> None:
    """p50 solid markers, other percentiles hollow and fainter; each mode at the cluster size
    (services, endpoints) with the most node counts, the largest of those."""
    shades = dict(zip(sorted(columns), (1.0, 0.7, 0.45, 0.3)))
    for mode, group in rows.groupby("mode"):
        s = style(mode)
        counts = group.groupby(["services", "endpoints"])["nodes"].nunique()
        services, endpoints = counts[counts == counts.max()].index.max()
        group = group[(group["services"] == services) & (group["endpoints"] == endpoints)]
        group = group.groupby("nodes")[list(columns.values())].median().sort_index()
        for p, column in sorted(columns.items()):
            ax.plot(group.index, group[column], color=s.colour, marker=s.marker, linestyle=s.linestyle,
                    alpha=shades.get(p, 0.3), markerfacecolor=s.colour if p == 50 else "white",
                    label=f"{labels.get(mode, mode)}, p{p} ({int(services):,} services, E={int(endpoints)})")
    ax.set_title("kube-proxy's default sync loop (minSyncPeriod 1 s)", fontsize=9)


def _netprog_kep3453(ax, rows: pd.DataFrame, columns: dict[int, str]) -> None:
    """A bar group per sync-loop setting: the model's percentiles, the KEP's as marks."""
    s = style("iptables")
    percentiles = sorted(columns)
    width = 0.8 / len(percentiles)
    for index, p in enumerate(percentiles):
        xs = np.arange(len(rows)) + (index - (len(percentiles) - 1) / 2) * width
        ax.bar(xs, rows[columns[p]], width=width, color=s.colour, alpha=0.35 + 0.65 * index / len(percentiles),
               edgecolor="black", linewidth=0.5, hatch=("", "//", "..", "xx")[index % 4], label=f"model p{p}")
        if f"published_p{p}" in rows:
            ax.plot(xs, rows[f"published_p{p}"], marker="_", markersize=14, markeredgewidth=2.5,
                    color="black", linestyle="none", label="published (KEP-3453)" if index == 0 else None)
    ax.set_xticks(range(len(rows)), [str(loop).replace(", ", "\n") for loop in rows["loop"]], fontsize=7)
    ax.set_title("iptables at 5,000 nodes: model against KEP-3453's published latency", fontsize=9)


# Model vs kernel (`kpbench kernel` records): the first-packet positions drawn, and how a
# mode's kernel tools are told apart (iptables has two: iptables-legacy and iptables-nft).
KERNEL_POSITIONS = {"first": "first service in KUBE-SERVICES", "last": "last service in KUBE-SERVICES",
                    "random": "a random service"}
KERNEL_LINES = (("-", "full"), ((0, (5, 2)), "left"))  # (line style, marker fill) per tool of a mode
MODEL_LINE = (0, (1, 1.5))  # dotted, hollow markers


def kernel_points(frame: pd.DataFrame) -> pd.DataFrame:
    """The real-kernel records, the latest per tool and services count (a rerun replaces)."""
    rows = frame[frame["kind"] == "kernel_point"] if "kind" in frame else frame.iloc[:0]
    if rows.empty:
        return rows
    return rows.drop_duplicates(["tool", "services"], keep="last").sort_values(["tool", "services"])


def model_vs_kernel(frame: pd.DataFrame, path: Path) -> Path:
    """First-packet extra time against services at the first, last and a random position:
    the kernel's connect p50 minus its no-rules baseline, one line per tool (solid, filled
    markers), and the model's data path p50, one line per mode (dotted, hollow markers).
    Linear in time: on a small cluster the kernel's extra time is within its noise and may
    be below zero."""
    rows = kernel_points(frame)
    columns = [f"positions.{p}.{side}.p50" for p in KERNEL_POSITIONS for side in ("extra_ns", "model_ns")]
    if rows.empty or any(c not in rows for c in columns):
        raise MissingData("no kernel_point records with first-packet times (run `kpbench kernel`)")
    rows = rows.dropna(subset=columns, how="all")
    fig, axes = _panels(len(KERNEL_POSITIONS), width=4.8)
    for ax, (position, title) in zip(axes, KERNEL_POSITIONS.items()):
        for mode, mine in rows.groupby("mode"):
            s = style(mode)
            for index, (tool, group) in enumerate(mine.groupby("tool")):
                linestyle, fill = KERNEL_LINES[index % len(KERNEL_LINES)]
                ax.plot(group["services"], group[f"positions.{position}.extra_ns.p50"] / 1000, color=s.colour,
                        marker=s.marker, linestyle=linestyle, fillstyle=fill, markerfacecoloralt="white",
                        label=f"{tool}: kernel")
            model = mine.groupby("services")[f"positions.{position}.model_ns.p50"].median()
            ax.plot(model.index, model / 1000, color=s.colour, marker=s.marker, linestyle=MODEL_LINE,
                    markerfacecolor="white", label=f"{mode}: model")
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_title(title, fontsize=9)
    return _finish(fig, axes, "First packet, model vs real kernel (p50; kernel: connect time minus "
                   "no-rules baseline)", path, "services", ["extra first-packet time, µs"] * len(axes),
                   logy=False)
