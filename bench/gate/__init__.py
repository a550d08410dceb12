"""`kpbench gate`: did a change make any mode slower or bigger?

Five tiers, run in the order 1, 4, 2, 3, 5 (cheapest and most certain first):

1. deterministic work counters, rule counts and modelled memory vs the baseline (blocking);
4. the log-log slope of each mode's first-packet work against services vs the design (blocking);
2. instructions inside each kernel's batch method under callgrind vs the baseline (blocking);
3. CPU time of ``--base`` against head, interleaved, with a confirmation rerun (blocking only
   for large, significant, confirmed effects);
5. wall-clock medians (advisory).

The baseline (``reports/baseline/baseline.json``) carries a fingerprint of the toolchain and
CPU; when it differs from this machine's, only the machine-independent tiers 1 and 4 are
enforced. ``--aa`` compares the working tree with itself and writes the noise of every metric.
"""
from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np

import bench
from bench.errors import InputError, read_input
from bench.gate import deterministic as det
from bench.gate import timing
from bench.gate.report import Row, exit_status, failure_lines, markdown, verdict_json
from bench.measure import MEASURE
from bench.results import environment

BASELINE_FILE = "baseline.json"
FORMAT = 1
ALL_TIERS = (1, 4, 2, 3, 5)
MACHINE_INDEPENDENT = {1, 4}
INSTRUCTION_THRESHOLD = 0.02
ROUNDS = 15
REPO = Path(__file__).resolve().parents[2]


def fingerprint() -> dict:
    """What the machine-dependent figures depend on (tiers 2, 3, 5)."""
    env = environment()
    return {"kpbench": bench.__version__, "python": env["python"], "cython": env["cython"],
            "numpy": env["numpy"], "compiler": _compiler(), "cpu": env["cpu"]}


def _compiler() -> str:
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=10).stdout
        return out.splitlines()[0].strip() if out else cc
    except (OSError, subprocess.SubprocessError):
        return cc


def _say(message: str) -> None:
    print(f"gate: {message}", file=sys.stderr, flush=True)


# ---- measuring one side ------------------------------------------------------------------------

def measure(tiers, progress=_say, rounds: int = ROUNDS, modes=None, strict: bool = True,
            kernels=timing.KERNELS) -> dict:
    """Everything the baseline stores, for the chosen tiers (modes and kernels; default all).

    ``strict=False`` leaves out modes whose measurement breaks (the A/A's head side reports them).
    """
    side = {"format": FORMAT, "fingerprint": fingerprint()}

    def per_mode(tier, chosen, measure_mode):
        results, errors = _per_mode(tier, chosen, measure_mode)
        if strict and errors:
            raise timing.MeasurementError(f"{errors[0].metric} failed: {errors[0].note}")
        return results

    if 1 in tiers:
        work = per_mode(1, modes, lambda m: det.measure_work([m], lambda p: progress(f"tier 1: {p}")))
        side["work"] = {k: v for part in work.values() for k, v in part.items()}
    if 4 in tiers:
        declared = [m for m in (modes or MEASURE) if m in det.COMPLEXITY]
        checks = per_mode(4, declared, lambda m: det.measure_complexity([m], progress=lambda p: progress(f"tier 4: {p}")))
        side["complexity"] = {c.mode: c.slope for part in checks.values() for c in part}
    if 2 in tiers and not timing.valgrind_missing():
        progress("tier 2: callgrind, one run per kernel (a few minutes)")
        side["instructions"] = _measured(timing.count_instructions(kernels), strict)
    if 5 in tiers:
        walls = _measured(_head_wall(rounds, progress), strict)
        side["wallclock"] = {k: float(np.median(v)) for k, v in walls.items()}
    return side


def _measured(per_kernel: dict, strict: bool) -> dict:
    """The kernels that could be measured; with ``strict``, any that could not is an error."""
    failed = [v for v in per_kernel.values() if isinstance(v, Exception)]
    if strict and failed:
        raise failed[0]
    return {k: v for k, v in per_kernel.items() if not isinstance(v, Exception)}


def _error_row(tier: int, metric: str, error: Exception) -> Row:
    return Row(tier, metric, "error", note=str(error))


def _head_wall(rounds: int, progress) -> dict[str, np.ndarray]:
    """Wall ns of ``rounds`` batch calls per kernel in this tree, after one warm-up."""
    worker = timing.Worker(sys.executable, REPO, "head")
    try:
        walls = {}
        for kernel in timing.KERNELS:
            progress(f"tier 5: {kernel}, {rounds} rounds")
            try:
                walls[kernel] = np.array([worker.sample(kernel)["wall_ns"] for _ in range(rounds + 1)][1:])
            except timing.MeasurementError as exc:
                walls[kernel] = exc
        return walls
    finally:
        worker.close()


def _samples(base: tuple[str, Path] | None, rounds: int, progress, kernels=timing.KERNELS) -> dict:
    """Interleaved samples per kernel: the base (python, tree) against head, or head twice.
    A kernel that cannot be measured maps to its MeasurementError."""
    head_worker = timing.Worker(sys.executable, REPO, "head")
    base_worker = timing.Worker(*(base or (sys.executable, REPO)), "base")
    try:
        out = {}
        for kernel in kernels:
            progress(f"tier 3: {kernel}, {rounds} interleaved rounds")
            try:
                out[kernel] = timing.interleaved(base_worker, head_worker, kernel, rounds)
            except timing.MeasurementError as exc:
                out[kernel] = exc
        return out
    finally:
        head_worker.close()
        base_worker.close()


def record(baseline_dir: Path, progress=_say, rounds: int = ROUNDS, tiers=ALL_TIERS, modes=None,
           kernels=timing.KERNELS) -> Path:
    """Measure the tiers on this machine and write the baseline."""
    from bench.cli import write_atomically

    side = measure(tiers, progress, rounds, modes, kernels=kernels)
    if 2 in tiers and "instructions" not in side:
        progress(f"tier 2 not recorded: {timing.valgrind_missing()}")
    baseline_dir.mkdir(parents=True, exist_ok=True)
    path = baseline_dir / BASELINE_FILE
    write_atomically(str(path), json.dumps(side, indent=1, sort_keys=True) + "\n")
    return path


def read_baseline(baseline_dir: Path) -> dict:
    path = Path(baseline_dir) / BASELINE_FILE
    if not path.exists():
        raise InputError("no baseline here: record one with `make baseline`", str(path))
    try:
        data = json.loads(read_input(path, "a kpbench gate baseline"))
    except json.JSONDecodeError as exc:
        raise InputError(f"not JSON ({exc.msg})", f"{path}:{exc.lineno}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or "fingerprint" not in data:
        raise InputError(f"not a kpbench gate baseline of format {FORMAT}", str(path))
    return data


# ---- the tiers: rows ---------------------------------------------------------------------------

def work_rows(base: dict, head: dict) -> list[Row]:
    """Tier 1: every metric must stay within its threshold (exact for counts, 1% for bytes)."""
    rows = []
    for name in sorted(base.keys() | head.keys()):
        if name not in head:
            rows.append(Row(1, name, "missing", base[name], None,
                            note="no longer measured: re-record the baseline if intended"))
            continue
        if name not in base:
            rows.append(Row(1, name, "new", None, head[name], note="not in the baseline"))
            continue
        old, new = base[name], head[name]
        limit = det.threshold(name.rsplit(" ", 1)[-1])
        ratio = new / old if old else (1.0 if new == old else float("inf"))
        within = abs(new - old) <= limit * abs(old)
        allowed = "exact" if limit == 0 else f"±{limit:.0%}"
        rows.append(Row(1, name, "pass" if within else "fail", old, new,
                        f"ratio {ratio:.4f} (allowed {allowed})", ratio=ratio))
    return rows


def complexity_rows(checks: list[det.SlopeCheck], recorded: dict | None) -> list[Row]:
    """Tier 4: the fitted slope must lie within the tolerance of the design's slope."""
    return [Row(4, f"{c.mode} first-packet work ~ services^slope", "pass" if c.passed else "fail",
                (recorded or {}).get(c.mode), round(c.slope, 3),
                f"slope {c.slope:.3f} [{c.ci_low:.3f}, {c.ci_high:.3f}] vs design {c.expected:.2f} "
                f"± {c.tolerance}", f"{c.why}; r²={c.r2:.3f}")
            for c in checks]


def instruction_rows(base: dict, head: dict, threshold: float = INSTRUCTION_THRESHOLD) -> list[Row]:
    """Tier 2: more than ``threshold`` extra instructions in a kernel's batch method fails."""
    rows = []
    for kernel, new in head.items():
        if isinstance(new, Exception):
            rows.append(_error_row(2, f"{kernel} instructions", new))
            continue
        if kernel not in base:
            rows.append(Row(2, f"{kernel} instructions", "new", None, new, note="not in the baseline"))
            continue
        old = base[kernel]
        ratio = new / old
        rows.append(Row(2, f"{kernel} instructions", "fail" if ratio > 1 + threshold else "pass",
                        old, new, f"ratio {ratio:.4f} (allowed +{threshold:.0%})", ratio=ratio))
    return rows


def ab_rows(samples: dict, rerun, rule: timing.ABRule) -> list[Row]:
    """Tier 3 from CPU-time samples; ``rerun(kernel)`` takes fresh samples of one kernel."""
    rows = []
    for kernel, sides in samples.items():
        if isinstance(sides, Exception):
            rows.append(_error_row(3, f"{kernel} CPU ns per batch", sides))
            continue
        first = timing.compare_samples(sides["base"]["cpu_ns"], sides["head"]["cpu_ns"], rule)

        def again(kernel=kernel):
            fresh = rerun(kernel)
            if isinstance(fresh, Exception):
                raise fresh
            return timing.compare_samples(fresh["base"]["cpu_ns"], fresh["head"]["cpu_ns"], rule)

        verdict, why = timing.decide(first, again, rule)
        rows.append(Row(3, f"{kernel} CPU ns per batch", verdict,
                        float(np.median(sides["base"]["cpu_ns"])), float(np.median(sides["head"]["cpu_ns"])),
                        f"{first.ratio:.3f} [{first.ci_low:.3f}, {first.ci_high:.3f}] p={first.p:.2g}",
                        why, first.ratio))
    return rows


def wallclock_rows(samples: dict) -> list[Row]:
    """Tier 5 from the A/B's samples: wall-clock medians, never enforced."""
    rows = []
    for kernel, sides in samples.items():
        if isinstance(sides, Exception):
            continue  # tier 3 already reports it
        base, head = sides["base"]["wall_ns"], sides["head"]["wall_ns"]
        result = timing.compare_samples(base, head)
        rows.append(Row(5, f"{kernel} wall ns per batch", "advisory", float(np.median(base)),
                        float(np.median(head)), f"{result.ratio:.3f} [{result.ci_low:.3f}, "
                        f"{result.ci_high:.3f}]", "shared runner: advisory", result.ratio))
    return rows


def pytest_benchmark_rows(paths: list[Path]) -> list[Row]:
    """Tier 5 from pytest-benchmark JSON (``--benchmark-json``): one file lists its medians, two
    (base, head) compare them. Advisory, like all wall-clock figures."""
    runs = []
    for path in paths:
        try:
            data = json.loads(read_input(path, "a pytest-benchmark JSON file"))
            runs.append({b["fullname"]: b["stats"]["median"] * 1e9 for b in data["benchmarks"]})
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise InputError(f"not a pytest-benchmark JSON file ({type(exc).__name__}: {exc})", str(path)) from None
    base, head = (runs[0], runs[-1]) if len(runs) == 2 else ({}, runs[0])
    rows = []
    for name, new in head.items():
        old = base.get(name)
        rows.append(Row(5, f"{name} median ns (pytest-benchmark)", "advisory", old, new,
                        f"{new / old:.3f}" if old else "", "shared runner: advisory",
                        new / old if old else None))
    return rows


def recorded_wallclock_rows(recorded: dict, head: dict[str, np.ndarray]) -> list[Row]:
    """Tier 5 without an A/B: head's medians against the baseline's, never enforced."""
    rows = []
    for kernel, walls in head.items():
        if isinstance(walls, Exception):
            rows.append(_error_row(5, f"{kernel} wall ns per batch", walls))
        elif kernel in recorded:
            old, new = recorded[kernel], float(np.median(walls))
            rows.append(Row(5, f"{kernel} wall ns per batch", "advisory", old, new, f"{new / old:.3f}",
                            "shared runner: advisory; against the recorded median", new / old))
    return rows


# ---- the gate ----------------------------------------------------------------------------------

def run(baseline_dir: Path = Path("reports/baseline"), base_ref: str | None = None, tiers=ALL_TIERS,
        out: Path = Path("reports"), aa: bool = False, rule: timing.ABRule = timing.ABRule(),
        rounds: int = ROUNDS, progress=_say, modes=None, benchmark_json=(), kernels=timing.KERNELS) -> int:
    """Run the gate, write ``out/gate.md`` and ``out/gate.json`` (``gate-aa.*`` with ``aa``),
    print the table; returns the exit status. ``benchmark_json``: pytest-benchmark files whose
    medians join tier 5; ``kernels``: the kernels tier 2 counts."""
    notes, rows = [], []
    head_fp = fingerprint()
    if aa:
        notes.append("A/A: the working tree against itself; the ratios are the noise of each metric")
        base = measure([t for t in tiers if t in (1, 2, 4)], progress, modes=modes, strict=False, kernels=kernels)
    elif set(tiers) & {1, 2} or (5 in tiers and not base_ref):
        base = read_baseline(baseline_dir)
    else:  # tiers 3 and 4 (and 5 with --base) compare with no stored figures
        base = {"fingerprint": head_fp}
    enforced = set(ALL_TIERS)
    differing = sorted(k for k in head_fp if base["fingerprint"].get(k) != head_fp[k])
    if differing:
        enforced = set(MACHINE_INDEPENDENT)
        notes.append(f"fingerprint differs from the baseline's ({', '.join(differing)}): only the "
                     "machine-independent tiers 1 and 4 are enforced")
    samples = None
    for tier in [t for t in ALL_TIERS if t in tiers]:
        try:
            new_rows, samples = _tier(tier, base, base_ref, aa, rule, rounds, samples, progress, notes, modes,
                                      kernels)
        except InputError:
            raise
        except Exception as exc:  # a broken benchmark is "could not measure" (2), never a regression
            new_rows = [Row(tier, f"tier {tier}", "error", note=f"{type(exc).__name__}: {exc}")]
        if tier not in enforced:
            for row in new_rows:
                if row.verdict == "fail":
                    row.verdict, row.note = "advisory", f"not enforced (fingerprint differs); {row.note}"
        rows += new_rows
    if benchmark_json:
        rows += pytest_benchmark_rows([Path(p) for p in benchmark_json])
    return _write(rows, notes, head_fp, out, "gate-aa" if aa else "gate")


def _tier(tier, base, base_ref, aa, rule, rounds, samples, progress, notes, modes, kernels):
    """The rows of one tier (and the timing samples, shared by tiers 3 and 5)."""
    if tier == 1:
        if "work" not in base:
            raise timing.MeasurementError("the baseline has no tier-1 figures")
        head, rows = _per_mode(1, modes, lambda m: det.measure_work([m], lambda p: progress(f"tier 1: {p}")))
        broken = {m for m in (modes or MEASURE) if m not in head}  # reported as errors already
        compared = {k: v for k, v in base["work"].items()
                    if (modes is None or k.split(" ", 1)[0] in modes) and k.split(" ", 1)[0] not in broken}
        return rows + work_rows(compared, {k: v for part in head.values() for k, v in part.items()}), samples
    if tier == 4:
        declared = [m for m in (modes or MEASURE) if m in det.COMPLEXITY]
        checks, rows = _per_mode(4, declared, lambda m: det.measure_complexity([m], progress=lambda p: progress(f"tier 4: {p}")))
        rows += [Row(4, f"{mode} first-packet work ~ services^slope", "skipped",
                     note="no design slope declared in bench/gate/deterministic.py COMPLEXITY")
                 for mode in (modes or MEASURE) if mode not in det.COMPLEXITY]
        return rows + complexity_rows([c for part in checks.values() for c in part], base.get("complexity")), samples
    if tier == 2:
        missing = timing.valgrind_missing()
        if missing:
            line = f"tier 2 skipped: {missing}"
            progress(line)
            notes.append(line)
            return [Row(2, "instruction counts", "skipped", note=missing)], samples
        if "instructions" not in base:
            raise timing.MeasurementError("the baseline has no instruction counts: re-record it "
                                          "where valgrind is installed")
        progress("tier 2: callgrind, one run per kernel (a few minutes)")
        return instruction_rows(base["instructions"], timing.count_instructions(kernels)), samples
    if tier == 3:
        if not (base_ref or aa):
            notes.append("tier 3 not run: give --base GIT_REF for a CPU-time A/B")
            return [], samples
        return _ab(base_ref, aa, rule, rounds, progress)
    # tier 5: the A/B's samples, or head alone against the recorded medians
    if samples is None:
        return recorded_wallclock_rows(base.get("wallclock", {}), _head_wall(rounds, progress)), samples
    return wallclock_rows(samples), samples


def _per_mode(tier: int, modes, measure_mode) -> tuple[dict, list[Row]]:
    """``measure_mode(mode)`` for each mode; a mode whose measurement breaks becomes an error
    row (exit 2) and the other modes are still compared."""
    results, errors = {}, []
    for mode in modes or MEASURE:
        try:
            results[mode] = measure_mode(mode)
        except Exception as exc:  # a broken benchmark: "could not measure", never a regression
            errors.append(Row(tier, f"{mode}: measurement", "error", note=f"{type(exc).__name__}: {exc}"))
    return results, errors


def _ab(base_ref, aa, rule, rounds, progress):
    with tempfile.TemporaryDirectory(prefix="kpbench-base-") as tmp:
        base = None if aa else timing.build_base(base_ref, REPO, Path(tmp), progress)
        samples = _samples(base, rounds, progress)

        def rerun(kernel):
            progress(f"tier 3: rerunning {kernel} to confirm")
            return _samples(base, rounds, progress, (kernel,))[kernel]

        return ab_rows(samples, rerun, rule), samples


def noise_notes(rows: list[Row]) -> list[str]:
    """Per tier, the largest A/A deviation |ratio - 1|: thresholds should be at least twice it."""
    notes = []
    for tier in ALL_TIERS:
        ratios = [r.ratio for r in rows if r.tier == tier and r.ratio]
        if ratios:
            worst = max(abs(r - 1) for r in ratios)
            notes.append(f"A/A noise, tier {tier}: largest |ratio - 1| = {worst:.2%} over {len(ratios)} metrics")
    return notes


def _write(rows, notes, head_fp, out: Path, stem: str) -> int:
    from bench.cli import write_atomically

    out.mkdir(parents=True, exist_ok=True)
    if stem == "gate-aa":
        notes = notes + noise_notes(rows)
    table = markdown(rows, notes, "kpbench gate A/A" if stem == "gate-aa" else "kpbench gate")
    write_atomically(str(out / f"{stem}.md"), table)
    write_atomically(str(out / f"{stem}.json"), verdict_json(rows, notes, head_fp))
    print(table)
    for line in failure_lines(rows):
        print(line, file=sys.stderr)
    return exit_status(rows)


def command(args) -> int:
    """`kpbench gate` once bench.cli has parsed its arguments."""
    tiers = _parse_tiers(args.tiers)
    if args.rounds < 5:
        raise InputError(f"needs 5 or more rounds for a significance test, got {args.rounds}", "command line", "--rounds")
    if args.factor <= 1:
        raise InputError(f"must be above 1 (a slowdown ratio), got {args.factor}", "command line", "--factor")
    unknown = sorted(set(args.kernels) - set(timing.KERNELS))
    if unknown:
        raise InputError(f"unknown kernel {unknown[0]!r}, expected some of {', '.join(timing.KERNELS)}",
                         "command line", "--kernels")
    if len(args.benchmark_json) > 2:
        raise InputError("at most two files (base, then head)", "command line", "--benchmark-json")
    if args.record:
        try:
            path = record(Path(args.baseline), rounds=args.rounds, kernels=tuple(args.kernels))
        except timing.MeasurementError as exc:
            print(f"kpbench: error: cannot record the baseline: {exc}", file=sys.stderr)
            return 2
        print(f"gate: baseline recorded in {path}")
        return 0
    return run(Path(args.baseline), args.base, tiers, Path(args.out), args.aa, timing.ABRule(factor=args.factor),
               args.rounds, benchmark_json=args.benchmark_json, kernels=tuple(args.kernels))


def _parse_tiers(text: str) -> tuple[int, ...]:
    try:
        tiers = tuple(int(t) for t in text.split(","))
    except ValueError:
        tiers = ()
    if not tiers or not set(tiers) <= set(ALL_TIERS):
        raise InputError(f"expected tiers from 1-5 separated by commas, got {text!r}", "command line", "--tiers")
    return tiers

