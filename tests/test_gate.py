"""The regression gate: tier decisions on planted changes, and real gate runs on iptables mode.

Nothing here asserts on a time: the A/B tier's decisions are checked on synthetic samples, and
the tiers that run for real (1, 4 and, where valgrind is installed, 2) count work or
instructions, which repeat exactly. The injected regressions are the kernels' own test-only
switches (``_set_test_regression``), so the gate sees them where a real one would be.
"""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import bench.gate as gate
import bench.measure.iptables as iptables_measure
import kernels
from bench.cli import main
from bench.gate import deterministic as det
from bench.gate import timing
from bench.gate.report import Row, exit_status, failure_lines, markdown
from kernels import layout as L
from tests.conftest import compiled_available
from tests.test_kernels import conntrack, flows, kube_nat, load, lookup, packets, walk

MODES = ("iptables",)  # the real runs use one mode: a few seconds
SMALL_GRID = (100, 300, 1000)


def quiet(_message):
    pass


@pytest.fixture(scope="module")
def baseline_dir(tmp_path_factory):
    """A baseline of tier 1 for iptables mode, recorded once for the module."""
    path = tmp_path_factory.mktemp("baseline")
    gate.record(path, progress=quiet, tiers=(1,), modes=MODES)
    return path


def gate_run(baseline, tmp_path, tiers=(1,), **kwargs) -> int:
    return gate.run(baseline, tiers=tiers, out=tmp_path / "out", progress=quiet, modes=MODES, **kwargs)


def copied_baseline(baseline_dir, tmp_path, change) -> Path:
    """A copy of the baseline with ``change(data)`` applied to its JSON."""
    data = json.loads((baseline_dir / gate.BASELINE_FILE).read_text())
    change(data)
    target = tmp_path / "baseline"
    target.mkdir()
    (target / gate.BASELINE_FILE).write_text(json.dumps(data))
    return target


# ---- tier 1: metric selection and thresholds ------------------------------------------------------

@pytest.mark.parametrize("name, gated", [
    ("entries_visited_mean", True), ("conntrack_compares_mean", True), ("rules.nat", True),
    ("kernel_bytes", True), ("kernel_bytes_ipvs", True), ("sync_entries", True),
    ("ns_mean", False), ("ns_p99", False), ("sync_proxy_rules_load_seconds", False),
    ("full_sync_seconds", False), ("services", False), ("seed", False)])
def test_only_deterministic_metrics_are_gated(name, gated):
    assert det.is_deterministic(name) is gated


def test_thresholds_exact_for_counts_one_percent_for_bytes():
    assert det.threshold("entries_visited_mean") == 0.0
    assert det.threshold("kernel_bytes") == 0.01
    assert det.threshold("model_bytes") == 0.01 and det.threshold("rules.nat") == 0.0


def test_work_rows_threshold_boundaries():
    base = {"p kernel_bytes": 1000.0, "p entries_visited_mean": 10.0}
    within = gate.work_rows(base, {"p kernel_bytes": 1009.0, "p entries_visited_mean": 10.0})
    assert {r.verdict for r in within} == {"pass"}
    beyond = gate.work_rows(base, {"p kernel_bytes": 1011.0, "p entries_visited_mean": 10.0})
    assert [r.metric for r in beyond if r.verdict == "fail"] == ["p kernel_bytes"]
    count = gate.work_rows(base, {"p kernel_bytes": 1000.0, "p entries_visited_mean": 10.002})
    assert [r.metric for r in count if r.verdict == "fail"] == ["p entries_visited_mean"]


def test_missing_metric_cannot_compare_and_new_metric_is_only_reported():
    rows = gate.work_rows({"p a_mean": 1.0}, {"p b_mean": 2.0})
    assert {r.metric: r.verdict for r in rows} == {"p a_mean": "missing", "p b_mean": "new"}
    assert exit_status(rows) == 2


# ---- real gate runs (tiers 1 and 4, iptables mode) -----------------------------------------------

def test_aa_against_a_fresh_baseline_passes(baseline_dir, tmp_path):
    assert gate_run(baseline_dir, tmp_path) == 0
    verdict = json.loads((tmp_path / "out" / "gate.json").read_text())
    assert verdict["exit_status"] == 0 and verdict["rows"]
    assert "PASS" in (tmp_path / "out" / "gate.md").read_text()


def test_planted_counter_change_fails_naming_metric_values_and_ratio(baseline_dir, tmp_path, capsys):
    metric = "iptables S=30 service_new entries_visited_mean"

    def plant(data):
        data["work"][metric] -= 1.0

    planted = copied_baseline(baseline_dir, tmp_path, plant)
    assert gate_run(planted, tmp_path) == 1
    base = json.loads((baseline_dir / gate.BASELINE_FILE).read_text())["work"][metric]
    line = next(line for line in capsys.readouterr().err.splitlines() if metric in line)
    assert f"base {base - 1:.4g}, head {base:.4g}, ratio {base / (base - 1):.4f} (allowed exact)" in line
    rows = json.loads((tmp_path / "out" / "gate.json").read_text())["rows"]
    assert rows[0]["metric"] == metric and rows[0]["verdict"] == "fail"  # worst first


def test_extra_rule_per_service_in_the_writer_fails_tier_1(baseline_dir, tmp_path, monkeypatch, capsys):
    """A writer that emits every KUBE-SERVICES jump twice: more rules, more entries walked."""
    writer = iptables_measure.Syncer.full

    def doubled(syncer, cluster):
        lines = []
        for line in writer(syncer, cluster).splitlines():
            lines.append(line)
            if line.startswith("-A KUBE-SERVICES ") and "-j KUBE-SVC-" in line:
                lines.append(line)
        return "\n".join(lines) + "\n"

    monkeypatch.setattr(iptables_measure.Syncer, "full", doubled)
    assert gate_run(baseline_dir, tmp_path) == 1
    failed = {r["metric"].rsplit(" ", 1)[-1] for r in
              json.loads((tmp_path / "out" / "gate.json").read_text())["rows"] if r["verdict"] == "fail"}
    assert {"rules.nat", "entries_visited_mean", "kernel_bytes"} <= failed
    assert "rules.nat" in capsys.readouterr().err


@pytest.fixture
def regression():
    """``regression(module)`` switches a kernel module's test-only regression on, until the
    test ends."""
    switched = []

    def switch_on(module):
        module._set_test_regression(True)
        switched.append(module)

    yield switch_on
    for module in switched:
        module._set_test_regression(False)


def test_extra_hash_compare_in_the_conntrack_kernel_fails_tier_1(baseline_dir, tmp_path, regression, capsys):
    """The kernel's lookup comparing one bucket entry more than it did."""
    regression(kernels.load("conntrack"))
    assert gate_run(baseline_dir, tmp_path) == 1
    rows = json.loads((tmp_path / "out" / "gate.json").read_text())["rows"]
    failed = [r for r in rows if r["verdict"] == "fail"]
    assert {r["metric"].rsplit(" ", 1)[-1] for r in failed} == {"conntrack_compares_mean"}
    assert all(r["head"] > r["base"] for r in failed)
    assert "conntrack_compares_mean" in capsys.readouterr().err


@pytest.mark.skipif(timing.valgrind_missing() is not None,
                    reason=f"tier 2 needs callgrind: {timing.valgrind_missing()}")
def test_slowed_iptables_walk_fails_tier_2_naming_its_instruction_count(tmp_path, monkeypatch, capsys):
    """The kernel's walk repeating its header matches: the same verdicts and counters, so only
    the instruction count (callgrind, exact run after run) can catch it. One kernel: ~1 min."""
    gate.record(tmp_path / "baseline", progress=quiet, tiers=(2,), kernels=("iptables",))
    monkeypatch.setenv("KPB_GATE_SLOW", "iptables")
    assert gate.run(tmp_path / "baseline", tiers=(2,), out=tmp_path / "out", progress=quiet,
                    kernels=("iptables",)) == 1
    [row] = json.loads((tmp_path / "out" / "gate.json").read_text())["rows"]
    assert (row["metric"], row["verdict"]) == ("iptables instructions", "fail") and row["ratio"] > 1.5
    assert "iptables instructions" in capsys.readouterr().err


def extra_compare_lookups(backend, on):
    """Lookups of 200 flows, 150 of them tracked, with the extra-compare switch ``on``."""
    module = kernels.load("conntrack", backend)
    ct = conntrack(backend, buckets=64)
    pkts = flows(200)
    ct.confirm(pkts[:150], np.zeros(150, dtype=L.RESULT_DTYPE), np.zeros(150, dtype=np.uint32))
    module._set_test_regression(on)
    try:
        found, compares = lookup(ct, pkts)
    finally:
        module._set_test_regression(False)
    return found, compares.astype(int), ct.bucket_entries_compared, ct.hash_computations


def test_extra_compare_switch_adds_one_compare_per_lookup(backend):
    off, on = extra_compare_lookups(backend, False), extra_compare_lookups(backend, True)
    assert np.array_equal(on[0], off[0])  # same verdicts
    assert on[3] - off[3] == 200  # the second pass hashes every packet again
    extra = on[1] - off[1]
    assert set(extra) <= {0, 1} and extra[:150].all()  # a tracked tuple's bucket is never empty
    assert on[2] - off[2] == extra.sum()


def test_extra_compare_switch_counts_identically_in_both_twins():
    if not compiled_available():
        pytest.skip("compiled kernels not built")
    cython, python = extra_compare_lookups("cython", True), extra_compare_lookups("python", True)
    assert all(np.array_equal(a, b) for a, b in zip(cython, python))


def test_slowed_walk_switch_changes_no_result_or_counter(backend):
    module = kernels.load("iptables", backend)
    pkts = packets(40, dst=np.arange(40) % 6 + 0x0A600000, dport=80)
    tables = [load(backend, kube_nat(8, 2).build()) for _ in range(2)]
    off = walk(tables[0], pkts)
    module._set_test_regression(True)
    try:
        on = walk(tables[1], pkts)
    finally:
        module._set_test_regression(False)
    assert np.array_equal(on, off) and np.array_equal(tables[1].counters, tables[0].counters)


def test_broken_benchmark_exits_2_not_1(baseline_dir, tmp_path, monkeypatch):
    def broken(point):
        raise RuntimeError("benchmark exploded")

    monkeypatch.setitem(gate.MEASURE, "iptables", broken)
    assert gate_run(baseline_dir, tmp_path) == 2
    text = (tmp_path / "out" / "gate.md").read_text()
    assert "ERROR" in text and "benchmark exploded" in text


def test_cli_exit_2_with_one_line_for_a_missing_or_bad_baseline(tmp_path, capsys):
    assert main(["gate", "--baseline", str(tmp_path), "--tiers", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "make baseline" in err[0]
    (tmp_path / gate.BASELINE_FILE).write_text("{not json")
    assert main(["gate", "--baseline", str(tmp_path), "--tiers", "1"]) == 2
    assert "baseline.json:1" in capsys.readouterr().err
    for option, value in (("--tiers", "1,9"), ("--rounds", "2"), ("--factor", "1.0"), ("--kernels", "nope")):
        assert main(["gate", "--baseline", str(tmp_path), option, value]) == 2
        assert option in capsys.readouterr().err


# ---- fingerprint mismatch: only tiers 1 and 4 enforced ----------------------------------------

def fake_instructions(monkeypatch, factor: float):
    """Tier 2 without valgrind: head's counts are the baseline's times ``factor``."""
    monkeypatch.setattr(timing, "valgrind_missing", lambda: None)
    monkeypatch.setattr(timing, "count_instructions", lambda kernels=timing.KERNELS: {
        k: int(1_000_000 * factor) for k in kernels})


def with_instructions(data, cpu=None):
    data["instructions"] = {k: 1_000_000 for k in timing.KERNELS}
    if cpu:
        data["fingerprint"]["cpu"] = cpu


def test_instruction_regression_fails_when_fingerprints_match(baseline_dir, tmp_path, monkeypatch):
    fake_instructions(monkeypatch, 1.05)
    baseline = copied_baseline(baseline_dir, tmp_path, with_instructions)
    assert gate_run(baseline, tmp_path, tiers=(2,)) == 1


def test_fingerprint_mismatch_enforces_only_tiers_1_and_4(baseline_dir, tmp_path, monkeypatch):
    fake_instructions(monkeypatch, 1.05)
    baseline = copied_baseline(baseline_dir, tmp_path, lambda d: with_instructions(d, cpu="another CPU"))
    assert gate_run(baseline, tmp_path, tiers=(1, 2)) == 0
    verdict = json.loads((tmp_path / "out" / "gate.json").read_text())
    assert any("fingerprint differs" in note and "cpu" in note for note in verdict["notes"])
    assert {r["verdict"] for r in verdict["rows"] if r["tier"] == 2} == {"advisory"}


def test_fingerprint_mismatch_still_enforces_tier_1(baseline_dir, tmp_path):
    def plant(data):
        data["fingerprint"]["python"] = "2.7"
        data["work"]["iptables S=200 established entries_visited_mean"] += 1

    assert gate_run(copied_baseline(baseline_dir, tmp_path, plant), tmp_path) == 1


def test_instruction_threshold_is_two_percent():
    assert gate.instruction_rows({"iptables": 1000}, {"iptables": 1019})[0].verdict == "pass"
    assert gate.instruction_rows({"iptables": 1000}, {"iptables": 1021})[0].verdict == "fail"


def test_missing_valgrind_skips_tier_2_with_a_clear_line(baseline_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    messages = []
    assert gate.run(baseline_dir, tiers=(2,), out=tmp_path, progress=messages.append, modes=MODES) == 0
    assert any(m.startswith("tier 2 skipped: valgrind is not installed") for m in messages)
    assert "tier 2 skipped: valgrind is not installed" in capsys.readouterr().out


def test_broken_kernel_in_tier_2_exits_2(baseline_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(timing, "valgrind_missing", lambda: None)
    monkeypatch.setattr(timing, "count_instructions", lambda kernels=timing.KERNELS: {
        **{k: 1_000_000 for k in kernels}, "ipvs": timing.MeasurementError("ipvs: probe failed")})
    baseline = copied_baseline(baseline_dir, tmp_path, with_instructions)
    assert gate_run(baseline, tmp_path, tiers=(2,)) == 2


# ---- tier 4: complexity --------------------------------------------------------------------------

def test_complexity_tolerance_on_synthetic_work():
    services = np.array([100, 300, 1000, 3000, 10000])
    assert det.check_slope("iptables", services, 50 + 2.0 * services).passed
    assert not det.check_slope("iptables", services, services ** 2.0).passed
    assert not det.check_slope("iptables", services, np.full(5, 40.0)).passed
    assert det.check_slope("nftables", services, 18 + np.sin(services)).passed
    assert not det.check_slope("nftables", services, 18 + services / 10).passed
    chains = 1 + (services - 1) / 512
    assert det.check_slope("ipvs", services, chains).passed
    assert not det.check_slope("ipvs", services, services / 2.0).passed  # one chain: linear
    assert not det.check_slope("ipvs", services, np.full(5, 1.0)).passed  # the table never fills


def test_ipvs_expected_slope_follows_the_256_chains():
    assert det.ipvs_chain_slope([10, 20, 50]) < 0.1  # far below 256 services: flat
    assert det.ipvs_chain_slope([100_000, 300_000, 1_000_000]) > 0.95  # far above: linear


def test_real_complexity_run_names_the_mode_whose_slope_left_the_design(baseline_dir, tmp_path, monkeypatch):
    """iptables' measured slope is near 1; a design that said 2 (quadratic) fails the gate."""
    monkeypatch.setattr(det, "COMPLEXITY_SERVICES", SMALL_GRID)
    spec = det.COMPLEXITY["iptables"]
    monkeypatch.setitem(det.COMPLEXITY, "iptables", det.ComplexitySpec(spec.metrics, 2.0, 0.2, spec.why))
    assert gate_run(baseline_dir, tmp_path, tiers=(4,)) == 1
    row = json.loads((tmp_path / "out" / "gate.json").read_text())["rows"][0]
    assert row["verdict"] == "fail" and row["metric"].startswith("iptables first-packet work")
    assert 0.8 <= row["head"] <= 1.2


# ---- tier 3: the A/B decision on synthetic samples --------------------------------------------

def samples(median: float, spread: float, seed: int, n: int = 15) -> np.ndarray:
    return median * (1 + spread * np.random.default_rng(seed).standard_normal(n))


def test_clear_regression_fails_only_after_the_rerun_confirms():
    base, head = samples(1e6, 0.02, 1), samples(2e6, 0.02, 2)
    first = timing.compare_samples(base, head)
    assert first.tripped and 1.9 < first.ratio < 2.1 and first.p < 0.01
    reruns = []

    def rerun():
        reruns.append(1)
        return timing.compare_samples(samples(1e6, 0.02, 3), samples(2e6, 0.02, 4))

    assert timing.decide(first, rerun)[0] == "fail" and reruns == [1]


def test_regression_not_repeated_on_rerun_is_inconclusive():
    first = timing.compare_samples(samples(1e6, 0.02, 1), samples(2e6, 0.02, 2))
    calm = lambda: timing.compare_samples(samples(1e6, 0.02, 3), samples(1e6, 0.02, 4))  # noqa: E731
    verdict, why = timing.decide(first, calm)
    assert verdict == "inconclusive" and "not on the rerun" in why


def test_noise_is_inconclusive_and_never_reruns():
    first = timing.compare_samples(samples(1e6, 0.3, 5), samples(1e6, 0.3, 6))
    assert not first.tripped
    assert timing.decide(first, lambda: pytest.fail("no rerun for noise"))[0] == "inconclusive"


def test_small_but_significant_slowdown_under_the_factor_passes():
    first = timing.compare_samples(samples(1e6, 0.005, 7), samples(1.1e6, 0.005, 8))
    assert first.p < 0.01 and 1.05 < first.ratio < 1.25 and not first.tripped
    assert timing.decide(first, lambda: pytest.fail("no rerun"))[0] == "inconclusive"


def test_large_ratio_below_the_absolute_floor_passes():
    first = timing.compare_samples(samples(4000, 0.01, 9), samples(8000, 0.01, 10))
    assert first.ratio > 1.25 and first.p < 0.01 and not first.tripped  # Δ 4 µs < 5 µs floor


class FakeWorker:
    """Stands in for a probe process: CPU samples from a seeded generator, ``slow`` for head."""

    slow = 1.0
    made = 0

    def __init__(self, python, tree, label):
        FakeWorker.made += 1
        self.label = label
        self.rng = np.random.default_rng(FakeWorker.made)

    def sample(self, kernel):
        scale = FakeWorker.slow if self.label == "head" else 1.0
        value = 1e6 * scale * (1 + 0.02 * self.rng.standard_normal())
        return {"kernel": kernel, "cpu_ns": value, "wall_ns": value}

    def close(self):
        pass


@pytest.mark.parametrize("slow, status", [(1.0, 0), (2.0, 1)])
def test_aa_tier_3_passes_and_a_slowed_head_fails(baseline_dir, tmp_path, monkeypatch, slow, status):
    monkeypatch.setattr(timing, "Worker", FakeWorker)
    monkeypatch.setattr(FakeWorker, "slow", slow)
    assert gate.run(baseline_dir, tiers=(3, 5), out=tmp_path, aa=True, progress=quiet, modes=MODES) == status
    verdict = json.loads((tmp_path / "gate-aa.json").read_text())
    tier3 = [r for r in verdict["rows"] if r["tier"] == 3]
    assert {r["metric"] for r in tier3} == {f"{k} CPU ns per batch" for k in timing.KERNELS}
    assert {r["verdict"] for r in verdict["rows"] if r["tier"] == 5} == {"advisory"}
    if status:
        assert {r["verdict"] for r in tier3} == {"fail"}
        assert all("confirmed on rerun" in r["note"] for r in tier3)


# ---- report -----------------------------------------------------------------------------------

def test_exit_status_keeps_regression_and_error_apart():
    assert exit_status([Row(1, "a", "pass"), Row(5, "w", "advisory")]) == 0
    assert exit_status([Row(1, "a", "fail")]) == 1
    assert exit_status([Row(1, "a", "fail"), Row(2, "b", "error")]) == 2


def test_markdown_sorts_worst_first_and_folds_identical_tier_1_rows():
    rows = [Row(1, "same", "pass", 1.0, 1.0, ratio=1.0), Row(2, "slower", "fail", 1.0, 1.5, ratio=1.5),
            Row(5, "wall", "advisory", 1.0, 1.1, ratio=1.1)]
    text = markdown(rows, ["a note"])
    assert "FAIL" in text and "1 deterministic metrics identical" in text and "| same |" not in text
    assert text.index("slower") < text.index("wall")
    assert failure_lines(rows) == ["gate: tier 2 ❌ slower: base 1, head 1.5"]


def test_pytest_benchmark_json_joins_tier_5_as_advisory(tmp_path):
    def write(name, median):
        path = tmp_path / name
        path.write_text(json.dumps({"benchmarks": [{"fullname": "k[iptables]", "stats": {"median": median}}]}))
        return path

    rows = gate.pytest_benchmark_rows([write("base.json", 2e-3), write("head.json", 3e-3)])
    assert [(r.tier, r.verdict, r.base, r.head) for r in rows] == [(5, "advisory", 2e6, 3e6)]
    assert rows[0].ratio == pytest.approx(1.5)
    (tmp_path / "bad.json").write_text('{"benchmarks": [{}]}')
    with pytest.raises(gate.InputError, match="bad.json"):
        gate.pytest_benchmark_rows([tmp_path / "bad.json"])


def test_probe_worker_answers_samples_and_reports_a_broken_kernel():
    worker = timing.Worker(sys.executable, gate.REPO, "head")
    try:
        sample = worker.sample("conntrack")
        assert sample["kernel"] == "conntrack" and sample["cpu_ns"] > 0 and sample["wall_ns"] > 0
        with pytest.raises(timing.MeasurementError, match="head nope: KeyError"):
            worker.sample("nope")
        assert worker.sample("conntrack")["kernel"] == "conntrack"  # still serving
    finally:
        worker.close()
