"""The pure parts of the load generator: percentiles, spreading, planning, /proc parsing."""

from __future__ import annotations

import math

import pytest

from kefu.bench.procfs import parse_cpu_ticks, parse_vmrss_kb
from kefu.bench.stats import (
    Latency,
    is_loopback_url,
    median,
    merge_counts,
    percentile,
    prom_value,
    rate_steps,
    source_addresses,
    split_rate,
    spread,
    worker_of_pair,
    workers_for,
)
from kefu.bench.swarm import Plan, build_specs


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 1001)]  # 1..1000
    assert percentile(values, 50) == 500.0
    assert percentile(values, 99) == 990.0
    assert percentile(values, 99.9) == 999.0
    assert percentile(values, 100) == 1000.0
    assert percentile([7.0], 99.9) == 7.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError, match="percentile"):
        percentile(values, 0)


def test_latency_in_milliseconds() -> None:
    lat = Latency.of([0.003, 0.001, 0.002])
    assert lat.count == 3
    assert lat.p50 == pytest.approx(2.0)
    assert lat.max == pytest.approx(3.0)
    assert math.isnan(Latency.of([]).p99)


def test_median_and_counts() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, math.nan, 2.0, 3.0]) == 2.5
    assert math.isnan(median([]))
    merged = merge_counts([{"a": 1, "b": 5}, {"a": 2}])
    assert merged == {"b": 5, "a": 3}
    assert list(merged) == ["b", "a"]


def test_source_addresses_spread_and_scale() -> None:
    assert source_addresses(10) == ["127.0.0.2", "127.0.0.3"]
    assert len(source_addresses(150_000)) == 6
    assert source_addresses(60_000, per_address=25_000)[-1] == "127.0.0.4"
    addrs = source_addresses(4)
    assert [spread(i, addrs) for i in range(4)] == ["127.0.0.2", "127.0.0.3"] * 2
    with pytest.raises(ValueError, match="loopback"):
        source_addresses(10_000_000)


def test_rates_and_workers() -> None:
    assert split_rate(900.0, [1, 2]) == [300.0, 600.0]
    assert split_rate(10.0, [0, 0]) == [0.0, 0.0]
    assert workers_for(10_000) == 2
    assert workers_for(15_001) == 4
    assert [worker_of_pair(p, 3) for p in range(5)] == [0, 1, 2, 0, 1]
    assert rate_steps(1000, 2, 8000) == [1000, 2000, 4000, 8000]
    assert len(rate_steps(1, 1.01, 1e9)) == 20


def test_build_specs_keeps_pairs_together_and_spreads_nodes() -> None:
    plan = Plan(
        mode="kefu",
        urls=("http://127.0.0.1:1", "http://127.0.0.1:2"),
        connections=8,
        workers=2,
        secret="s",
    )
    specs = build_specs(plan)
    assert [len(s.pairs) for s in specs] == [2, 2]
    pair = specs[1].pairs[0]
    assert (pair.agent.user, pair.customer.user) == ("b-a1", "b-c1")
    # two nodes: agents on one, customers on the other (every pair is cross-node)
    assert pair.agent.url.endswith(":1")
    assert pair.customer.url.endswith(":2")
    assert pair.agent.source != pair.customer.source


def test_loopback_only() -> None:
    assert is_loopback_url("http://127.0.0.1:8080")
    assert is_loopback_url("ws://localhost:1")
    assert is_loopback_url("http://[::1]:80")
    assert not is_loopback_url("http://10.0.0.1:8080")
    assert not is_loopback_url("ftp://127.0.0.1")


def test_proc_parsing() -> None:
    status = "Name:\tkefu\nVmRSS:\t  123456 kB\nThreads:\t4\n"
    assert parse_vmrss_kb(status) == 123456
    assert parse_vmrss_kb("Name: x\n") is None
    stat = "42 (kefu (a) b) S 1 2 3 4 5 6 7 8 9 10 111 222 0 0 20 0 4"
    assert parse_cpu_ticks(stat) == 333
    text = "# HELP x\nkefu_x_count 12.0\nkefu_x_sum 3\n"
    assert prom_value(text, "kefu_x_count") == 12.0
    assert math.isnan(prom_value(text, "kefu_y"))
