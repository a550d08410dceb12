"""Results: one JSON record per measured row, appended and flushed as soon as it exists.

``results.jsonl`` is the source of truth; ``results.csv`` (and ``results.parquet`` where
pyarrow is installed) are exported from it with pandas.
Every record carries the format version, the machine, the versions and the git commit, so a
file can be read back without the run that wrote it.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from bench.errors import InputError

import bench
import kernels

FORMAT_VERSION = 1


@lru_cache(maxsize=1)
def environment() -> dict:
    """Machine, versions and commit: stamped on every record."""
    import Cython

    return {
        "kpbench": bench.__version__,
        "backend": kernels.BACKEND,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cython": Cython.__version__,
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "git_commit": _git_commit(),
        "hostname": platform.node(),
        "os": f"{platform.system()} {platform.release()}",
        "memory_bytes": proc_bytes("/proc/meminfo", "MemTotal") or 0,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def proc_bytes(path: str, field: str) -> int | None:
    """A ``Field:  N kB`` line of a /proc file, in bytes (None where it cannot be read)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS, where Linux allows it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    """This process's peak RSS since it started or since :func:`reset_peak_rss`."""
    return proc_bytes("/proc/self/status", "VmHWM") or 0


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class ResultsWriter:
    """Appends records to ``results.jsonl``, flushing each one to disk."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, record: dict) -> dict:
        return self.append_all([record])[0]

    def append_all(self, records: list[dict]) -> list[dict]:
        """Append records in one write and flush them to disk: a point's records land together."""
        full = [{"format": FORMAT_VERSION, **record, "env": environment()} for record in records]
        text = "".join(json.dumps(r, sort_keys=True, default=_jsonable) + "\n" for r in full)
        with self.path.open("a") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        return full


def drop_torn_tail(path: Path) -> int:
    """Cut a last line left without its newline by a run killed mid-write; bytes removed."""
    path = Path(path)
    if not path.exists():
        return 0
    with path.open("rb+") as fh:
        size = fh.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        fh.seek(max(size - 1, 0))
        if fh.read(1) == b"\n":
            return 0
        fh.seek(0)
        keep = fh.read().rfind(b"\n") + 1
        fh.truncate(keep)
        return size - keep


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON Lines file; a line that is not JSON is an InputError naming it."""
    records = []
    with Path(path).open() as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError as exc:
                raise InputError(f"not JSON Lines (truncated, or not a kpbench results file): {exc.args[0]}",
                                 f"{path}:{number}") from None
    return records


def results_frame(records: list[dict]) -> pd.DataFrame:
    """The records as one flat frame: nested fields become dotted columns (env.git_commit)."""
    return pd.json_normalize(records, sep=".")


def export_csv(jsonl: Path, csv: Path) -> pd.DataFrame:
    """Flatten the JSONL records (env fields become env.* columns) into a CSV."""
    frame = results_frame(read_jsonl(jsonl))
    frame.to_csv(csv, index=False)
    return frame


def export_tables(jsonl: Path, out: Path) -> tuple[pd.DataFrame, list[Path]]:
    """results.csv, and results.parquet when pyarrow is importable; the frame and the paths."""
    out = Path(out)
    frame = export_csv(jsonl, out / "results.csv")
    written = [out / "results.csv"]
    try:
        import pyarrow  # noqa: F401  (optional: Parquet only where it is installed)
    except ImportError:
        return frame, written
    # Columns that mix types across modes (dicts of counts, strings and numbers) go as text.
    mixed = [c for c in frame.columns if frame[c].map(type).nunique() > 1 and frame[c].dtype == object]
    frame.astype({c: str for c in mixed}).to_parquet(out / "results.parquet", index=False)
    return frame, written + [out / "results.parquet"]
