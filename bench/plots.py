"""PNG figures from results.jsonl (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def first_packet_latency(frame: pd.DataFrame, path: Path) -> Path:
    """First-packet latency (p50 solid, p99 dashed) against services, one line per E, log-log."""
    rows = frame[(frame["kind"] == "point") & (frame["workload"] == "service_new")]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    markers = "osD^v"
    for i, (endpoints, group) in enumerate(sorted(rows.groupby("endpoints"), key=lambda g: g[0])):
        group = group.sort_values("services")
        line, = ax.plot(group["services"], group["ns_p50"], marker=markers[i % len(markers)],
                        label=f"iptables, E={endpoints} endpoints per service, p50")
        ax.plot(group["services"], group["ns_p99"], linestyle="--", marker=markers[i % len(markers)],
                color=line.get_color(), alpha=0.6, label=f"iptables, E={endpoints} endpoints per service, p99")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("services (log scale)")
    ax.set_ylabel("first-packet latency, ns (log scale)")
    ax.set_title("New connection to a service: modelled data path")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
