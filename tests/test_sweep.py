"""The sweep: grids and point ids, profiles, memory refusal, and resuming an interrupted run."""
import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import bench
from bench.cli import main
from bench.errors import InputError
from bench.results import ResultsWriter, drop_torn_tail, read_jsonl
from bench.measure import MEASURE
from bench.sweep import (FULL_MAX_SERVICES, MODES, PROFILES, Point, check_memory, estimate_point_bytes, finished_points, grid,
                         profile_points)

ROOT = Path(__file__).resolve().parent.parent


def test_grid_is_the_product_of_its_axes():
    points = grid(["iptables", "ipvs"], [10, 20, 30], [1, 2], [5], packets=100, seed=3)
    assert len(points) == 2 * 3 * 2
    assert {(p.mode, p.services, p.endpoints) for p in points} == {
        (m, s, e) for m in ("iptables", "ipvs") for s in (10, 20, 30) for e in (1, 2)}
    assert len({p.point_id for p in points}) == len(points)


def test_point_id_is_stable_and_covers_the_whole_configuration(monkeypatch):
    point = Point("iptables", 100, 2, 10, 500, seed=1)
    assert point.point_id == Point("iptables", 100, 2, 10, 500, seed=1).point_id
    others = [Point("iptables", 100, 2, 10, 500, seed=2), Point("iptables", 100, 2, 10, 501, seed=1),
              Point("iptables", 100, 2, 10, 500, seed=1, cpus=8),
              Point("iptables", 100, 2, 10, 500, seed=1, variant="comments=off")]
    assert point.point_id not in {p.point_id for p in others}
    before = point.point_id
    monkeypatch.setattr(bench, "__version__", "99.0")
    assert point.point_id != before  # a new kpbench version measures afresh


def test_profiles_reach_their_sizes():
    default = profile_points("default", MODES, seed=0)
    for mode in MODES:
        mine = [p for p in default if p.mode == mode]
        assert max(p.services for p in mine) >= (5000 if mode == "iptables-nft" else 20000)
        assert max(p.nodes for p in mine) == 5000
    full = profile_points("full", MODES, seed=0)
    for mode in MODES:
        mine = [p for p in full if p.mode == mode]
        assert max(p.services for p in mine) == FULL_MAX_SERVICES.get(mode, 100_000)
        assert max(p.nodes for p in mine) == 10_000
    assert max(p.services * p.endpoints for p in full) == 1_000_000
    assert max(p.nodes for p in full) == 10_000
    quick = profile_points("quick", MODES, seed=0)
    assert {p.mode for p in quick} == set(MODES) and max(p.services for p in quick) <= 1000
    assert {p.variant for p in quick} >= {"", "comments=off", "scheduler=mh"}
    for points in (default, full, quick):
        assert len({p.point_id for p in points}) == len(points)


def test_overrides_replace_the_profile_grid():
    points = profile_points("default", ["iptables"], seed=0, services=[30, 60], nodes=[3])
    assert {(p.services, p.endpoints, p.nodes) for p in points} == {(s, e, 3) for s in (30, 60) for e in (1, 10)}
    assert {p.packets for p in points} == {PROFILES["default"]["packets"]}
    varied = profile_points("quick", ["iptables", "ipvs"], seed=0, services=[30], endpoints=[2], nodes=[3],
                            variants={"ipvs": ["scheduler=sh"]})
    assert sorted((p.mode, p.variant) for p in varied) == [("iptables", ""), ("ipvs", ""), ("ipvs", "scheduler=sh")]


@pytest.mark.parametrize("mode, variant", [("iptables", "scheduler=mh"), ("ipvs", "scheduler=bogus"),
                                           ("ipvs", "scheduler"), ("nftables", "comments=off")])
def test_unknown_variants_are_refused(mode, variant):
    with pytest.raises(InputError, match="--variants"):
        profile_points("quick", [mode], seed=0, services=[30], variants={mode: [variant]})


def test_memory_estimate_grows_with_the_point_and_refuses_what_does_not_fit():
    small, large = Point("iptables", 1000, 10, 100, 1000, 0), Point("iptables", 100_000, 10, 100, 1000, 0)
    assert estimate_point_bytes(large) > 10 * estimate_point_bytes(small)
    check_memory([small], available=8 * 2**30)  # fits: no error
    with pytest.raises(InputError, match="GiB"):
        check_memory([small, large], available=2 * 2**30)


def test_bench_refuses_a_grid_larger_than_memory(capsys, tmp_path):
    status = main(["bench", "--modes", "iptables", "--services", "100000000", "--endpoints", "100",
                   "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "GiB" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_a_point_cut_short_is_dropped_and_a_torn_line_cut(tmp_path):
    path = tmp_path / "results.jsonl"
    writer = ResultsWriter(path)
    writer.append_all([{"kind": "point", "point_id": "a", "workload": w, "point_records": 2} for w in "xy"])
    writer.append_all([{"kind": "point", "point_id": "b", "workload": "x", "point_records": 2}])
    with path.open("a") as fh:
        fh.write('{"kind": "point", "point_id": "b", "wor')  # killed mid-write
    assert drop_torn_tail(path) > 0
    assert finished_points(path) == {"a"}
    assert [r["point_id"] for r in read_jsonl(path)] == ["a", "a"]


def _bench_command(out: Path) -> list[str]:
    return [sys.executable, "-m", "bench.cli", "bench", "--modes", "iptables", "--services", "20", "40", "60",
            "--endpoints", "1", "2", "--nodes", "3", "--packets", "200", "--no-benchmarks", "--quiet",
            "--out", str(out)]


def _point_lines(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if '"kind": "point"' in line)


def test_a_killed_sweep_resumes_without_losing_or_repeating_points(tmp_path):
    out = tmp_path / "out"
    results = out / "results.jsonl"
    process = subprocess.Popen(_bench_command(out), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while _point_lines(results) == 0 and process.poll() is None:
            time.sleep(0.02)  # polling for the first finished point, not timing anything
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    drop_torn_tail(results)
    before = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    finished_before = finished_points(results)
    assert finished_before  # the kill came after at least one point
    assert subprocess.run(_bench_command(out), cwd=ROOT, capture_output=True).returncode == 0
    after = [r for r in read_jsonl(results) if r["kind"] == "point"]
    pairs = [(r["point_id"], r["workload"]) for r in after]
    assert len(pairs) == len(set(pairs))  # nothing repeated
    assert len({r["point_id"] for r in after}) == 3 * 2  # every point of the grid
    kept = {(r["point_id"], r["workload"]): r for r in after}
    for record in before:  # every point finished before the kill is there, unchanged
        if record["kind"] == "point" and record["point_id"] in finished_before:
            assert kept[(record["point_id"], record["workload"])] == record


@pytest.mark.parametrize("mode", ["iptables", "iptables-nft", "ipvs", "nftables", "ebpf"])
def test_a_point_leaves_no_cyclic_garbage(mode):
    """Points run with the cyclic GC off, so anything a point leaves in a reference cycle
    (a loaded ruleset, at 100,000 services over a GiB) would stay until the sweep ends."""
    point = Point(mode, 60, 2, 5, 200, 0)
    gc.collect()
    gc.disable()
    try:
        MEASURE[mode](point)
        assert gc.collect() == 0
    finally:
        gc.enable()
