"""The gate's verdict: one row per compared metric, a Markdown table sorted worst first, a JSON
file, and the exit status (0 pass · 1 confirmed regression · 2 could not measure or compare)."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

TIER_NAMES = {1: "deterministic work", 2: "instruction counts", 3: "CPU time A/B",
              4: "complexity", 5: "wall-clock (advisory)"}
# Worst first. "error"/"missing": could not measure or compare; "advisory": a failure in a tier
# that is not enforced here (or tier 5).
SEVERITY = ("error", "missing", "fail", "inconclusive", "advisory", "skipped", "new", "pass")
SYMBOL = {"error": "❌ error", "missing": "❌ missing", "fail": "❌", "pass": "✅"}


@dataclass
class Row:
    tier: int
    metric: str
    verdict: str
    base: float | str | None = None
    head: float | str | None = None
    change: str = ""  # ratio ± interval, or what the tier compares
    note: str = ""
    ratio: float | None = None  # head/base, for sorting and for the A/A noise file

    @property
    def symbol(self) -> str:
        return SYMBOL.get(self.verdict, f"~ {self.verdict}")


def ordered(rows: list[Row]) -> list[Row]:
    def worst(row: Row):
        spread = abs(math.log(row.ratio)) if row.ratio and row.ratio > 0 else 0.0
        return SEVERITY.index(row.verdict), -spread, row.tier, row.metric
    return sorted(rows, key=worst)


def exit_status(rows: list[Row]) -> int:
    verdicts = {row.verdict for row in rows}
    if verdicts & {"error", "missing"}:
        return 2
    return 1 if "fail" in verdicts else 0


def _cell(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown(rows: list[Row], notes: list[str], title: str = "kpbench gate") -> str:
    """The table, worst first. Unchanged tier-1 rows fold into one line: there are hundreds."""
    status = exit_status(rows)
    outcome = {0: "PASS", 1: "FAIL: confirmed regression", 2: "ERROR: could not measure or compare"}[status]
    lines = [f"# {title}: {outcome}", ""] + [f"- {note}" for note in notes]
    unchanged = [r for r in rows if r.tier == 1 and r.verdict == "pass" and r.base == r.head]
    shown = [r for r in ordered(rows) if r not in unchanged]
    if unchanged:
        lines.append(f"- tier 1: {len(unchanged)} deterministic metrics identical to the baseline ✅")
    lines += ["", "| tier | metric | base | head | ratio ± interval | verdict | note |",
              "|---|---|---:|---:|---|---|---|"]
    for row in shown:
        lines.append(f"| {row.tier} {TIER_NAMES[row.tier]} | {row.metric} | {_cell(row.base)} | "
                     f"{_cell(row.head)} | {row.change} | {row.symbol} | {row.note} |")
    return "\n".join(lines) + "\n"


def verdict_json(rows: list[Row], notes: list[str], fingerprint: dict) -> str:
    status = exit_status(rows)
    return json.dumps({"exit_status": status,
                       "verdict": {0: "pass", 1: "regression", 2: "error"}[status],
                       "notes": notes, "fingerprint": fingerprint,
                       "rows": [asdict(r) for r in ordered(rows)]}, indent=1, sort_keys=True) + "\n"


def failure_lines(rows: list[Row]) -> list[str]:
    """One line per failed or unmeasurable row: metric, both values and the ratio."""
    return [f"gate: tier {r.tier} {r.symbol} {r.metric}: base {_cell(r.base)}, head {_cell(r.head)}"
            f"{', ' + r.change if r.change else ''}{' — ' + r.note if r.note else ''}"
            for r in ordered(rows) if r.verdict in ("error", "missing", "fail")]
