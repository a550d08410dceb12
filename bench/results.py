"""Results: one JSON record per measured row, appended and flushed as soon as it exists.

``results.jsonl`` is the source of truth; ``results.csv`` is exported from it with pandas.
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
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


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
        full = {"format": FORMAT_VERSION, **record, "env": environment()}
        with self.path.open("a") as fh:
            fh.write(json.dumps(full, sort_keys=True, default=_jsonable) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return full


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_jsonl(path: Path) -> list[dict]:
    with Path(path).open() as fh:
        return [json.loads(line) for line in fh if line.strip()]


def export_csv(jsonl: Path, csv: Path) -> pd.DataFrame:
    """Flatten the JSONL records (env fields become env.* columns) into a CSV."""
    frame = pd.json_normalize(read_jsonl(jsonl), sep=".")
    frame.to_csv(csv, index=False)
    return frame
