"""PNG figures from results.jsonl (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

# One colour and marker per mode, the same in every figure and distinct in greyscale.
MODE_STYLE = {"iptables": ("#1f4e9c", "o"), "ipvs": ("#d95f02", "s"), "nftables": ("#1b9e77", "D")}


def first_packet_latency(frame: pd.DataFrame, path: Path) -> Path:
    """First-packet latency against services, a line per mode and E, log-log; p99 dashed."""
    rows = frame[(frame["kind"] == "point") & (frame["workload"] == "service_new")]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for (mode, endpoints), group in rows.groupby(["mode", "endpoints"]):
        colour, marker = MODE_STYLE.get(mode, ("#555555", "x"))
        group = group.sort_values("services")
        shade = 1.0 if endpoints == rows["endpoints"].max() else 0.55
        label = f"{mode}, {int(endpoints)} endpoints per service"
        ax.plot(group["services"], group["ns_p50"], marker=marker, color=colour, alpha=shade,
                label=f"{label}, p50")
        ax.plot(group["services"], group["ns_p99"], marker=marker, color=colour, alpha=shade * 0.6,
                linestyle="--", label=f"{label}, p99")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("services (log scale)")
    ax.set_ylabel("first-packet latency, ns (log scale)")
    ax.set_title("New connection to a service: modelled data path")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
