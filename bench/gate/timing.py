"""The gate's machine-dependent tiers, all on the kernels' batch lookups (bench/gate/probe.py).

- Tier 2: instructions executed inside each kernel's batch method, counted by valgrind's
  callgrind with collection switched on only inside that method (``--toggle-collect``), so the
  count repeats exactly however loaded the machine is.
- Tier 3: CPU time of base against head, run interleaved by two long-lived worker processes;
  a regression must be large, significant, above a floor and confirmed on a rerun.
- Tier 5: wall-clock medians, advisory only.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from bench.errors import InputError

PROBE = Path(__file__).with_name("probe.py")
KERNELS = ("iptables", "nftables", "ipvs", "conntrack")
ENTRY_POINTS = {"iptables": ("iptables", "Table", "run"), "nftables": ("nftables", "Ruleset", "run"),
                "ipvs": ("ipvs", "IPVS", "process"), "conntrack": ("conntrack", "ConntrackTable", "lookup")}


class MeasurementError(Exception):
    """A tier could not measure: the gate exits 2, never 1."""


# ---- tier 2: instruction counts -----------------------------------------------------------------

def valgrind_missing() -> str | None:
    """Why tier 2 cannot run here, or None when it can."""
    if not shutil.which("valgrind"):
        return "valgrind is not installed (`make valgrind` installs it)"
    if not shutil.which("nm"):
        return "nm (binutils) is not installed: cannot find the kernels' symbols"
    return None


def entry_symbol(kernel: str) -> str:
    """The C symbol of the kernel's batch method in its compiled module, read with nm.

    Cython names a ``def`` method ``__pyx_pw_<len><module>_<len><Class>_<n><method>``; the
    number ``n`` shifts as methods are added, so it is looked up rather than written down.
    """
    module, cls, method = ENTRY_POINTS[kernel]
    try:
        library = importlib.import_module(f"kernels.{module}").__file__
    except ImportError as exc:
        raise MeasurementError(f"kernels.{module} is not compiled: {exc}") from None
    if not library.endswith(".so"):
        raise MeasurementError(f"kernels.{module} is not a compiled extension ({library})")
    pattern = re.compile(rf"__pyx_pw_7kernels_{len(module)}{module}_{len(cls)}{cls}_\d+{method}$")
    symbols = subprocess.run(["nm", library], capture_output=True, text=True, check=True).stdout
    found = [s.split()[-1] for s in symbols.splitlines() if pattern.search(s)]
    if len(found) != 1:
        raise MeasurementError(f"{kernel}: expected one symbol for {cls}.{method} in {library}, found {found}")
    return found[0]


def count_instructions(kernels=KERNELS) -> dict[str, int | MeasurementError]:
    """Instructions inside each kernel's batch method: one callgrind run of the probe per
    kernel, two at a time, collecting only inside the method (``--toggle-collect``).

    One run per kernel because callgrind 3.19 collects nothing when several functions are
    toggled in one run. A kernel that cannot be counted maps to its error.
    """
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(kernels, pool.map(_count_one, kernels)))


def _count_one(kernel: str) -> int | MeasurementError:
    try:
        symbol = entry_symbol(kernel)
    except MeasurementError as exc:
        return exc
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", f"--toggle-collect={symbol}",
                   sys.executable, "-P", str(PROBE), "once", kernel]
        run = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
        if run.returncode != 0 or not out.exists():
            return MeasurementError(f"{kernel}: callgrind run failed (exit {run.returncode}): {_last_line(run.stderr)}")
        errors = [json.loads(line)["error"] for line in run.stdout.splitlines()]
        if errors:
            return MeasurementError(f"{kernel}: {errors[0]}")
        total = re.search(r"^totals: (\d+)", out.read_text(), re.M)
    if not total or int(total.group(1)) == 0:
        return MeasurementError(f"{kernel}: callgrind recorded nothing inside {symbol}")
    return int(total.group(1))


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


# ---- workers: the probe in a tree, answering one sample per request ------------------------------

class Worker:
    """The probe serving samples in one tree (head or the base's worktree) with one Python."""

    def __init__(self, python: str, tree: Path, label: str):
        self.label = label
        env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": str(tree)}
        if label == "base":
            env.pop("KPB_GATE_SLOW", None)  # the test-only slowdown is the head's
        # -P: the head's probe imports the tree's bench and kernels, never its own neighbours
        self.process = subprocess.Popen([python, "-P", str(PROBE), "serve"], cwd=tree, env=env, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE)
        self._read()  # {"ready": true}

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            error = _last_line(self.process.stderr.read())
            raise MeasurementError(f"{self.label} probe stopped: {error}")
        return json.loads(line)

    def sample(self, kernel: str) -> dict:
        try:
            self.process.stdin.write(kernel + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            raise MeasurementError(f"{self.label} probe stopped: {_last_line(self.process.stderr.read())}") from None
        reply = self._read()
        if "error" in reply:
            raise MeasurementError(f"{self.label} {kernel}: {reply['error']}")
        return reply

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=60)


def interleaved(base: Worker, head: Worker, kernel: str, rounds: int) -> dict[str, dict[str, np.ndarray]]:
    """``rounds`` samples from each side, alternating which goes first (ABBA...), after one
    warm-up each. Returns {"base"|"head": {"cpu_ns": array, "wall_ns": array}}."""
    base.sample(kernel), head.sample(kernel)
    samples = {"base": [], "head": []}
    for round_ in range(rounds):
        order = ((base, "base"), (head, "head")) if round_ % 2 == 0 else ((head, "head"), (base, "base"))
        for worker, side in order:
            samples[side].append(worker.sample(kernel))
    return {side: {field: np.array([s[field] for s in rows], dtype=float) for field in ("cpu_ns", "wall_ns")}
            for side, rows in samples.items()}


# ---- tier 3: the A/B decision ------------------------------------------------------------------

@dataclass(frozen=True)
class ABRule:
    factor: float = 1.25  # head/base median ratio above which a slowdown matters
    alpha: float = 0.01  # Mann-Whitney p below which the difference is real
    floor_ns: float = 5_000.0  # median difference per batch call below which nothing matters


@dataclass(frozen=True)
class ABResult:
    ratio: float
    ci_low: float
    ci_high: float
    p: float
    delta_ns: float
    tripped: bool  # all three conditions hold

    def reason(self, rule: ABRule) -> str:
        parts = [f"ratio {self.ratio:.3f} {'>' if self.ratio > rule.factor else '≤'} {rule.factor}",
                 f"p={self.p:.2g} {'<' if self.p < rule.alpha else '≥'} {rule.alpha}",
                 f"Δ={self.delta_ns / 1000:.1f} µs {'>' if self.delta_ns > rule.floor_ns else '≤'} "
                 f"{rule.floor_ns / 1000:.0f} µs"]
        return ", ".join(parts)


def compare_samples(base, head, rule: ABRule = ABRule(), seed: int = 0) -> ABResult:
    """Median ratio head/base with a bootstrap 95% interval, Mann-Whitney p, and whether the
    factor, significance and floor conditions all hold."""
    base, head = np.asarray(base, dtype=float), np.asarray(head, dtype=float)
    ratio = float(np.median(head) / np.median(base))
    rng = np.random.default_rng(seed)
    boot = (np.median(rng.choice(head, (1000, head.size)), axis=1)
            / np.median(rng.choice(base, (1000, base.size)), axis=1))
    low, high = np.percentile(boot, [2.5, 97.5])
    p = float(stats.mannwhitneyu(head, base, alternative="two-sided").pvalue)
    delta = float(np.median(head) - np.median(base))
    tripped = ratio > rule.factor and p < rule.alpha and delta > rule.floor_ns
    return ABResult(ratio, float(low), float(high), p, delta, tripped)


def decide(first: ABResult, rerun=None, rule: ABRule = ABRule()) -> tuple[str, str]:
    """(verdict, why) with verdict "fail", "inconclusive" or "pass".

    ``rerun`` is called (with no arguments, returning an ABResult) only when the first
    comparison trips: the regression counts only if it trips again.
    """
    if first.tripped:
        again = rerun()
        if again.tripped:
            return "fail", f"confirmed on rerun: {again.reason(rule)}"
        return "inconclusive", f"tripped once ({first.reason(rule)}) but not on the rerun"
    if first.p < rule.alpha and first.ratio < 1:
        return "pass", f"faster: {first.reason(rule)}"
    return "inconclusive", first.reason(rule)


# ---- tier 3: building the base commit --------------------------------------------------------

def build_base(ref: str, repo: Path, workdir: Path, progress=print) -> tuple[str, Path]:
    """Export ``ref`` into ``workdir/tree``, make a venv for it, build its kernels.

    Returns (python, tree). The tree is a plain export (``git archive``), which leaves the
    repository's own state (worktree list, index, HEAD) untouched.
    """
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", f"{ref}^{{commit}}"],
                            capture_output=True, text=True)
    if commit.returncode != 0:
        raise InputError(f"not a commit: {ref}", "command line", "--base")
    tree = workdir / "tree"
    tree.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(repo), "archive", commit.stdout.strip()], capture_output=True)
    if archive.returncode != 0:
        raise MeasurementError(f"git archive {ref} failed: {_last_line(archive.stderr.decode())}")
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    venv = workdir / "venv"
    python = str(venv / "bin" / "python")
    steps = [
        ("venv", [sys.executable, "-m", "venv", str(venv)]),
        ("build tools", [python, "-m", "pip", "install", "-q", "setuptools>=68", "wheel", "Cython>=3,<4", "numpy>=2"]),
        ("install", [python, "-m", "pip", "install", "-q", "--no-build-isolation", "-e", str(tree)]),
        ("kernels", [python, "setup.py", "-q", "build_ext", "--inplace"]),
    ]
    for name, command in steps:
        progress(f"base {ref}: {name}")
        done = subprocess.run(command, cwd=tree, capture_output=True, text=True)
        if done.returncode != 0:
            raise MeasurementError(f"building base {ref} failed at {name}: {_last_line(done.stderr)}")
    return python, tree
