"""The network programming latency simulation, on cases small enough to work out by hand."""
import numpy as np
import pandas as pd
import pytest

from bench.errors import InputError
from bench.netprog import (KEP3453, Scenario, SyncLoop, latencies, records_from_results, simulate,
                           simulate_syncs)


def one_node(seconds=0.25, partial_seconds=None):
    return Scenario(1, seconds, partial_seconds or seconds, churn_per_second=0, jitter=0, warmup=0)


def test_a_change_waits_for_the_running_sync_and_the_token():
    # Sync at 0 (ends 0.25). A change at 5 finds a token: synced 5 → 5.25. A change at 5.1
    # arrives during that sync; with burst 1 the next token comes 1 s after 5: synced 6 → 6.25.
    changes = np.array([5.0, 5.1])
    syncs = simulate_syncs(one_node(), SyncLoop(burst=1, partial=False), changes, first_sync=[0.0])
    assert syncs.start[0].tolist() == [0.0, 5.0, 6.0]
    assert latencies(syncs, changes)[0] == pytest.approx([0.25, 1.15])


def test_burst_lets_a_second_sync_follow_at_once():
    # Burst 2: a token is saved at 5, so the second change syncs as soon as the first sync ends.
    changes = np.array([5.0, 5.1])
    syncs = simulate_syncs(one_node(), SyncLoop(burst=2, partial=False), changes, first_sync=[0.0])
    assert latencies(syncs, changes)[0] == pytest.approx([0.25, 0.4])


def test_periodic_syncs_and_which_are_full():
    # No change until 100: syncs every sync_period; full ones at least 60 s apart.
    loop = SyncLoop(sync_period=30, full_sync_period=60)
    syncs = simulate_syncs(one_node(2.0, 0.5), loop, np.array([100.0]), first_sync=[0.0])
    assert syncs.start[0].tolist() == [0, 30, 60, 90, 100]
    assert syncs.full[0].tolist() == [True, False, True, False, False]
    assert (syncs.end - syncs.start)[0].tolist() == [2.0, 0.5, 2.0, 0.5, 0.5]
    assert latencies(syncs, np.array([100.0]))[0] == pytest.approx([0.5])


def test_watch_delay_adds_to_the_latency():
    changes = np.array([5.0])
    scenario = Scenario(1, 0.25, 0.25, 0, jitter=0, warmup=0, watch_delay=2.0)
    syncs = simulate_syncs(scenario, SyncLoop(), changes, first_sync=[0.0])
    assert latencies(syncs, changes, 2.0)[0] == pytest.approx([2.25])


def test_a_saturated_loop_takes_one_and_a_half_syncs_at_the_median():
    # Changes all the time and syncs longer than minSyncPeriod: syncs run back to back, a
    # change waits uniformly for the next one to start, then its whole length: median 1.5 D.
    result = simulate(Scenario(50, 2.0, 2.0, churn_per_second=50, duration=200, jitter=0), SyncLoop())
    assert result["network_programming_duration_seconds_p50"] == pytest.approx(3.0, rel=0.05)
    assert 2.0 <= result["network_programming_duration_seconds_p90"] <= 4.0
    assert result["syncs_per_node_per_minute"] == pytest.approx(30, rel=0.05)


def test_same_seed_same_result_and_partial_syncs_help():
    scenario = Scenario(200, 8.0, 1.0, churn_per_second=20, duration=120, seed=4)
    loop = SyncLoop(min_sync_period=10.0, partial=False)
    assert simulate(scenario, loop) == simulate(scenario, loop)
    full = simulate(scenario, loop)["network_programming_duration_seconds_p50"]
    partial = simulate(scenario, SyncLoop(min_sync_period=10.0))["network_programming_duration_seconds_p50"]
    faster = simulate(scenario, SyncLoop(min_sync_period=1.0))["network_programming_duration_seconds_p50"]
    assert full > partial > faster


@pytest.mark.parametrize("field, value", [("nodes", 0), ("full_seconds", -1.0), ("churn_per_second", -1.0)])
def test_impossible_scenarios_are_input_errors(field, value):
    arguments = {"nodes": 10, "full_seconds": 1.0, "partial_seconds": 0.5, "churn_per_second": 1.0, field: value}
    with pytest.raises(InputError):
        simulate(Scenario(**arguments))


def test_records_from_sweep_results():
    rows = [{"kind": "point", "mode": mode, "workload": "service_new", "variant": "", "services": services,
             "endpoints": 10, "nodes": 100, "sync_full_proxy_rules_duration_seconds": services / 1000,
             "sync_partial_proxy_rules_duration_seconds": services / 4000}
            for mode in ("iptables", "nftables") for services in (1000, 8000)]
    records = records_from_results(pd.DataFrame(rows), duration=60)
    default = [r for r in records if r.get("scenario") != "kep3453"]
    assert {(r["mode"], r["services"]) for r in default} == {(m, s) for m in ("iptables", "nftables") for s in (1000, 8000)}
    kep = [r for r in records if r.get("scenario") == "kep3453" and r["costs"] == "measured"]
    assert [r["loop"] for r in kep] == [name for name, *_ in KEP3453]
    assert {(r["services"], r["full_seconds"], r["nodes"]) for r in kep} == {(8000, 8.0, 5000)}
    p50 = [r["network_programming_duration_seconds_p50"] for r in kep]
    assert p50[0] > p50[1] > p50[2]  # the KEP's order: full, partial, partial with 1 s
    assert all(r["kind"] == "netprog" and r["netprog_id"] for r in records)
