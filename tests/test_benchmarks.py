"""The kernels' batch lookups as pytest-benchmark micro-benchmarks (the gate's probe cases).

`make test` runs each a few rounds and checks the work it did; for timings run
`pytest tests/test_benchmarks.py --benchmark-only --benchmark-autosave` and compare two runs
with `--benchmark-compare`, or hand the JSON (`--benchmark-json FILE`) to `kpbench gate
--benchmark-json FILE` for the advisory wall-clock table.
"""
import pytest

from bench.gate import probe


@pytest.mark.parametrize("kernel", sorted(probe.CASES))
def test_kernel_batch(benchmark, kernel):
    setup, batch = probe.CASES[kernel]()
    benchmark.group = "kernel batch lookups (1,000 first packets, 1,000 ClusterIP services)"
    work = benchmark.pedantic(batch, setup=setup, rounds=5, warmup_rounds=1)
    # every packet did the work the case is about: a rule walk, a service-table compare,
    # a conntrack entry found
    assert len(work) == probe.PACKETS and work.min() >= 1
