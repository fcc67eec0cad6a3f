"""``kefu bench cluster``: parsing (Redis INFO, CLUSTER NODES, Prometheus text), the
figures between two snapshots, step planning, stop reasons, options and the doc sections.
Nothing here starts a server."""

from __future__ import annotations

import argparse
import math
import time

import pytest

from kefu.bench import cluster as cl
from kefu.bench import report
from kefu.bench.cli import build_parser, cluster_options
from kefu.bench.desk import StoreFigures
from kefu.bench.procfs import SPEED, machine, parse_meminfo_total, pid_list, python_speed
from kefu.bench.stats import Latency, prom_samples, sample_sum, source_addresses
from kefu.bench.swarm import Plan, Step
from tests.services import RedisServer

INFO = """# Server\r
redis_version:7.0.15\r
\r
# Stats\r
total_commands_processed:1000\r
# CPU\r
used_cpu_sys:1.5\r
used_cpu_user:2.25\r
used_memory:1048576\r
connected_clients:7\r
# Commandstats\r
cmdstat_hvals:calls=600,usec=900,usec_per_call=1.50,rejected_calls=0,failed_calls=0\r
cmdstat_publish:calls=300,usec=900,usec_per_call=3.00,rejected_calls=0,failed_calls=0\r
cmdstat_script|load:calls=1,usec=468,usec_per_call=468.00,rejected_calls=0,failed_calls=0\r
cmdstat_broken:usec=1\r
"""

METRICS = """# HELP kefu_cluster_deliveries_total Pushes by path
# TYPE kefu_cluster_deliveries_total counter
kefu_cluster_deliveries_total{path="remote"} 100.0
kefu_cluster_deliveries_total{path="received"} 90.0
kefu_cluster_publishes_total 40.0
kefu_cluster_redis_commands_total{kind="lookup"} 200.0
websocket_connections_total 10.0
kefu_store_batch_size_count 10.0
kefu_store_batch_size_sum 100.0
kefu_store_commit_seconds_sum 0.05
odd{label="a } b"} 3.5
broken_sample x
"""


def test_redis_info_and_commandstats() -> None:
    info = cl.parse_info(INFO)
    assert info["redis_version"] == "7.0.15" and info["total_commands_processed"] == "1000"
    assert cl.command_calls(info) == {"hvals": 600, "publish": 300, "script|load": 1}
    both = cl.RedisSample.of([info, info])
    assert both.commands == 2000 and both.clients == 14 and both.memory == 2 * 1048576
    assert both.cpu == pytest.approx(7.5)
    assert both.calls == {"hvals": 1200, "publish": 600, "script|load": 2}


def test_cluster_nodes_reply() -> None:
    text = (
        "07c3 127.0.0.1:30001@40001 myself,master - 0 0 1 connected 0-5460\n"
        "67ed 127.0.0.1:30002@40002,host-b master - 0 1 2 connected 5461-10922\n"
        "292f 127.0.0.1:30003@40003 master,fail - 0 1 3 disconnected\n"
        "e7d1 :0@0 master,noaddr - 0 1 4 disconnected\n"
        "\n"
    )
    assert cl.cluster_node_addresses(text) == [("127.0.0.1", 30001), ("127.0.0.1", 30002)]


def test_redis_call_returns_the_raw_text_reply(redis_server: RedisServer) -> None:
    info = cl.parse_info(cl.redis_call("127.0.0.1", redis_server.port, "INFO", "server"))
    assert info["redis_version"] and info["run_id"]
    assert cl.redis_call("127.0.0.1", redis_server.port, "PING") == "PONG"
    with pytest.raises(ConnectionError, match="unknown command"):
        cl.redis_call("127.0.0.1", redis_server.port, "NO-SUCH-COMMAND")


def test_prometheus_samples_with_labels() -> None:
    samples = prom_samples(METRICS)
    assert samples['kefu_cluster_deliveries_total{path="remote"}'] == 100.0
    assert samples["kefu_cluster_publishes_total"] == 40.0
    assert samples['odd{label="a } b"}'] == 3.5
    assert "broken_sample" not in samples
    assert sample_sum(samples, "kefu_cluster_deliveries_total") == 190.0
    assert sample_sum(samples, "kefu_cluster_deliveries_total", path="received") == 90.0
    assert sample_sum(samples, "kefu_cluster_deliveries_total", path="inbox") == 0.0
    assert sample_sum(samples, "kefu_cluster_publishes") == 0.0  # names match exactly


def _snapshot(at: float, scale: int, cpu: float | None = 1.0) -> cl.Snapshot:
    info = cl.parse_info(INFO)
    redis = cl.RedisSample.of([info] * scale)
    metrics = METRICS.replace("100.0", f"{100 * scale}.0").replace("40.0", f"{40 * scale}.0")
    return cl.Snapshot(
        at=at,
        redis=redis,
        pg=cl.PgSample(commits=1000 * scale, rollbacks=0, inserted=500 * scale, wal_bytes=1e6),
        pg_cpu=2.0 * scale,
        node_cpu=[cpu, 3.0 * scale],
        node_rss=[1024 * scale, None],
        metrics=[metrics, metrics],
    )


def test_figures_between_two_snapshots() -> None:
    fig = cl.Figures.between(_snapshot(10.0, 1), _snapshot(12.0, 3))
    assert fig.seconds == 2.0
    assert fig.redis_commands == 2000 and fig.redis_rate == 1000.0
    assert fig.redis_calls == {"hvals": 1200, "publish": 600, "script|load": 2}
    assert list(fig.redis_calls) == ["hvals", "publish", "script|load"]
    assert fig.redis_cpu == pytest.approx(7.5 / 2)
    assert fig.pg_commits == 2000 and fig.pg_rate == 1000.0 and fig.pg_inserted == 1000
    assert fig.wal_bytes == 0.0
    assert fig.pg_cpu == pytest.approx(2.0)
    assert math.isnan(fig.node_cpu[0]) is False and fig.node_cpu == [0.0, 3.0]
    assert fig.node_rss_kb == [3072, None]
    assert fig.node_connections == [10.0, 10.0]
    # Metrics of both nodes are summed: remote 100 -> 300 on each node.
    assert fig.deliveries["remote"] == 400.0 and fig.deliveries["received"] == 0.0
    assert fig.publishes == 160.0
    assert fig.store.commits == 0.0 and fig.store.jobs == 400.0  # batch_size_sum 100 -> 300
    unreadable = cl.Figures.between(_snapshot(0.0, 1, cpu=None), _snapshot(1.0, 2))
    assert math.isnan(unreadable.node_cpu[0]) and unreadable.node_cpu[1] == 3.0
    missing = cl.Snapshot(0.0, None, None, None, [None], [None], [""])
    empty = cl.Figures.between(missing, missing)
    assert math.isnan(empty.redis_commands) and math.isnan(empty.pg_commits)
    assert empty.redis_calls == {} and math.isnan(empty.pg_cpu)
    assert math.isnan(cl.per(1.0, 0)) and math.isnan(cl.per(1.0, math.nan))
    assert cl.per(3.0, 2) == 1.5


def test_every_pair_is_cross_node() -> None:
    for nodes in (2, 3, 6):
        urls = tuple(f"http://127.0.0.1:{9000 + i}" for i in range(nodes))
        plan = Plan(mode="kefu", urls=urls, connections=60, workers=3, secret="s")
        assert cl.cross_node(plan)
    one = Plan(mode="kefu", urls=("http://127.0.0.1:9000",), connections=4, workers=1, secret="s")
    assert not cl.cross_node(one)


def test_capacity_steps_and_addresses() -> None:
    assert cl.capacity_targets(150_000, 25_000, 6) == [
        24_996,
        49_992,
        75_000,
        99_996,
        124_992,
        150_000,
    ]
    assert cl.capacity_targets(10, 4, 1) == [4, 8, 10]
    assert cl.capacity_targets(5, 4, 2) == [4]  # never a step that adds nothing
    with pytest.raises(ValueError, match="positive"):
        cl.capacity_targets(0, 1, 1)
    blocks = cl.address_blocks([25_000, 25_000, 100], 20_000)
    assert blocks == [
        ["127.0.0.3", "127.0.0.4"],
        ["127.0.0.5", "127.0.0.6"],
        ["127.0.0.7"],
    ]
    assert source_addresses(10, first=10) == ["127.0.0.10", "127.0.0.11"]
    with pytest.raises(ValueError, match=r"127\.0\.0\.254"):
        source_addresses(10, first=254)
    with pytest.raises(ValueError, match="first >= 2"):
        source_addresses(10, first=1)


def test_procfs_helpers() -> None:
    assert pid_list(None) == [] and pid_list(5) == [5] and pid_list((1, 2)) == [1, 2]
    meminfo = "MemTotal:  100 kB\nMemAvailable:   40 kB\n"
    assert parse_meminfo_total(meminfo) == 100
    assert parse_meminfo_total(meminfo, "MemAvailable") == 40
    assert parse_meminfo_total(meminfo, "SwapTotal") == 0
    assert 0.0 < python_speed(rounds=1) < 60.0
    assert float(machine()[SPEED]) > 0.0


def test_loopback_servers_only() -> None:
    assert cl.loopback_server("redis://127.0.0.1:6379/0")
    assert cl.loopback_server("redis://127.0.0.1:7000,127.0.0.2:7001")
    assert cl.loopback_server("postgresql://postgres@localhost:5432/kefu")
    assert not cl.loopback_server("redis://127.0.0.1:7000,10.0.0.1:7001")
    assert not cl.loopback_server("postgresql://u@db.example.com/kefu")
    assert not cl.loopback_server("http://127.0.0.1/")
    assert not cl.loopback_server("redis://127.0.0.1:notaport")


def _step(
    offered: float,
    *,
    p99: float = 10.0,
    acked: int | None = None,
    errors: dict[str, int] | None = None,
    delivered: int | None = None,
) -> Step:
    sent = int(offered * 2)
    acked = sent if acked is None else acked
    delivered = acked if delivered is None else delivered
    latency = Latency(count=acked, p50=p99 / 4, p99=p99, p999=p99 * 1.5, max=p99 * 2)
    return Step(
        offered=offered,
        duration=2.0,
        sent=sent,
        skipped=0,
        acked=acked,
        delivered=delivered,
        unacked=sent - acked,
        undelivered=sent - delivered,
        ack=latency,
        e2e=latency,
        errors=errors or {},
        reconnects=0,
        acked_total=acked,
        delivered_total=delivered,
        server_cpu=1.0,
        client_cpu=0.3,
        other_cpu=0.5,
    )


def _figures(scale: float = 1.0) -> cl.Figures:
    return cl.Figures(
        seconds=4.0,
        redis_commands=8000 * scale,
        redis_calls={"hvals": int(4000 * scale), "publish": int(1000 * scale)},
        redis_cpu=0.05,
        redis_memory=4 << 20,
        pg_commits=9000 * scale,
        pg_inserted=2000 * scale,
        wal_bytes=1.5e6 * scale,
        pg_cpu=0.4,
        node_cpu=[0.3, 0.35, 0.32],
        node_rss_kb=[70_000, 71_000, 72_000],
        node_connections=[2000.0, 2000.0, 2000.0],
        publishes=700 * scale,
        deliveries={"local": 0.0, "remote": 2000 * scale, "received": 2000 * scale, "inbox": 0},
        redis_by_kind={"lookup": 4000 * scale, "publish": 700 * scale, "presence": 0, "inbox": 0},
        cluster_errors=0.0,
        store=StoreFigures(commits=300, jobs=2000, commit_seconds=2.0, assignments=0),
        cpus=2,
    )


def _cluster_results() -> cl.ClusterResults:
    results = cl.ClusterResults(
        options=cl.ClusterOptions(),
        machine={"cpus (nproc)": "2", "cpu model": "AMD EPYC", "python": "3.11.7"},
        node_settings={"log_level": "WARNING"},
        started=time.time() - 300,
        versions={"redis": "7.0.15", "postgresql": "15.20"},
        finished=time.time(),
        connected=6000,
        connect_seconds=3.0,
    )
    results.ladder = [
        cl.Observed(_step(1000), _figures()),
        cl.Observed(_step(2000, p99=60.0), _figures(2)),
        cl.Observed(_step(3000, p99=900.0, acked=4000), _figures(2)),
        cl.Observed(_step(4000, p99=2000.0, acked=4000), _figures(2)),
    ]
    results.latency = [
        cl.Observed(_step(5000, p99=p99, acked=9000), _figures(4)) for p99 in (800, 400, 600)
    ]
    results.throughput = [
        cl.Observed(_step(10_000, p99=3000, acked=5000, errors={"overloaded": 9}), _figures(2))
    ]
    return results


def test_cluster_section_renders_targets_and_tables() -> None:
    results = _cluster_results()
    assert results.best_rate == 2000.0  # the 2,000/s step held; 10,000/s did not hold
    section = cl.cluster_markdown(results, ["- a note"])
    assert section.startswith(report.CLUSTER_BEGIN) and section.endswith(report.CLUSTER_END)
    assert "## Cluster (3 nodes, Redis + PostgreSQL)" in section
    assert "| persisted msg/s sustained, 3 nodes" in section and "NOT met |" in section
    assert "600.0 ms (median of 3 windows" in section
    # The 5,000/s windows did not hold: the breakdown is the best held ladder step's.
    assert "(2,000 msg/s, the best held ladder step)" in section
    assert "| hvals | 8,000 | 2.000 |" in section
    results.latency = [cl.Observed(_step(5000, p99=50.0), _figures(4)) for _ in range(3)]
    assert "| hvals | 16,000 | 1.600 |" in cl.cluster_markdown(results)
    assert "(5,000 msg/s, the median window)" in cl.cluster_markdown(results)
    assert "no: acks lag (2,000/s acked)" in section and "overloaded 9" in section
    assert "- a note" in section and "stopped by 4,000/s" in section
    assert "one generator process (one clock; 1 in all)" in section  # 6,000 sockets
    assert cl.generator_workers(cl.ClusterOptions(sockets=25_000)) == 3
    assert cl.generator_workers(cl.ClusterOptions(workers=4)) == 4
    assert (
        "**At 5,000 msg/s** (the median latency window, p99 600.0 ms): the machine's 2 "
        "cores were 90% busy (nodes 97% of one core"
    ) in section
    assert "Host speed" not in section  # no probe in these results
    results.machine |= {"python loop (s)": "0.210", "python loop after (s)": "0.250"}
    assert "a fixed Python loop took 0.210 s before the run and 0.250 s after" in (
        cl.cluster_markdown(results)
    )
    text = cl.cluster_text(results)
    assert "Redis calls per delivered message" in text and "NOT met" in text


def test_cluster_step_row_figures() -> None:
    row = cl.step_row(cl.Observed(_step(1000), _figures()))
    cells = dict(zip(cl.STEP_HEADERS, row, strict=True))
    assert cells["Redis cmd/s"] == "2,000"
    assert cells["Redis cmd/delivered"] == "4.00"  # 8,000 commands / 2,000 delivered
    assert cells["PG xact/acked"] == "4.500"
    assert cells["store commits/s (msgs each)"] == "75 (6.7)"
    assert cells["nodes CPU (each)"] == "97% (30%/35%/32%)"
    assert cells["other CPU"] == "5%"  # 50% less Redis 5% and PostgreSQL 40%
    assert cells["idle CPU"] == "20%"  # 2 cores less 100% + 30% + 50%
    step = _step(1000)
    step.steal = 0.15
    assert cl.idle_cores(step, 2) == pytest.approx(0.05)
    step.server_cpu = step.other_cpu = float("nan")  # unreadable: counted as nothing
    assert cl.idle_cores(step, 2) == pytest.approx(1.55)
    assert cells["node RSS MiB (each)"] == "68/69/70"
    assert cells["held"] == "yes"


def _capacity_step(target: int, stop: str = "", connections: float = 2000.0) -> cl.CapacityStep:
    fig = _figures()
    fig.node_connections = [connections] * 3
    probe = _step(12)
    return cl.CapacityStep(
        target=target,
        requested=6000,
        connected=6000,
        failed=0,
        connect_seconds=3.0,
        connect_errors={},
        dropped={},
        connecting=fig,
        idle=fig,
        client_rss_kb=300_000,
        clients=target,
        probe=probe,
        available_kb=20 << 20,
        log_errors={},
        stop=stop,
    )


def test_stop_reasons() -> None:
    ok = _capacity_step(6000)
    assert ok.probe_ok and cl.stop_reason(ok, []) == ""
    assert cl.stop_reason(ok, ["node-1 exited (x)"]) == "node-1 exited (x)"
    failed = _capacity_step(6000)
    failed.connected, failed.failed = 5990, 10
    failed.connect_errors = {"connect:ClientOSError": 10}
    assert cl.stop_reason(failed, []) == (
        "10 of 6,000 new connections failed (client errors: connect:ClientOSError 10)"
    )
    dropped = _capacity_step(6000)
    dropped.dropped = {"closed:4004": 3}
    assert cl.stop_reason(dropped, []) == "earlier connections dropped: closed:4004 3"
    lost = _capacity_step(6000)
    assert lost.probe is not None
    lost.probe.delivered_total -= 1
    assert cl.stop_reason(lost, []).startswith("probe: 23/24 delivered")
    none = _capacity_step(6000)
    none.probe = None
    assert cl.stop_reason(none, []) == "probe did not run"


def test_capacity_section_renders() -> None:
    results = cl.CapacityResults(
        options=cl.CapacityOptions(nodes=3, target=12_000, step=6_000),
        machine={},
        node_settings={"log_level": "WARNING"},
        started=time.time() - 60,
        finished=time.time(),
        base_rss_kb=[50_000, 50_000, 50_000],
    )
    results.steps = [
        _capacity_step(6000),
        _capacity_step(12_000, stop="probe: 0/24 delivered", connections=4000.0),
    ]
    results.stop = "at 12,000: probe: 0/24 delivered"
    assert results.reached == 6000
    assert cl.node_kb_per_connection(results.steps[0], results.base_rss_kb) == [10.0, 10.5, 11.0]
    section = cl.capacity_markdown(results)
    assert section.startswith(report.CAPACITY_BEGIN) and section.endswith(report.CAPACITY_END)
    assert "## Cluster connection capacity" in section
    assert "| >= 12,000 | 6,000 (stopped at 12,000: probe: 0/24 delivered) | NOT met |" in section
    assert "| 6,000 | 6,000 | 6,000 | 6,000/6,000 | 3.0 | 2,000 | 2,000 |" in section
    assert "| 12,000 | 12,000 | 12,000 | 6,000/6,000 |" in section
    results.steps[1].idle.node_connections = [math.nan, 1.0, 1.0]
    assert "- (/metrics of 1 nodes unreachable)" in cl.capacity_markdown(results)
    assert "10.0–11.0" in section and "no: probe: 0/24 delivered" in section
    assert "| node-2 | 2,000 | 70 | 49 | 11.0 | 32% |" in section
    assert "stopped: at 12,000" in cl.capacity_text(results)


def test_sections_are_spliced_and_kept_by_bench_local() -> None:
    from kefu.bench.local import LocalOptions, LocalResults

    cluster = cl.cluster_markdown(_cluster_results())
    doc = "# Benchmarks\n\n## Targets\n\nx\n\n## Findings\n\nmine\n"
    spliced = report.splice_section(doc, report.CLUSTER_BEGIN, report.CLUSTER_END, cluster)
    assert spliced.index("## Cluster (") < spliced.index("## Findings")
    again = report.splice_section(
        spliced, report.CLUSTER_BEGIN, report.CLUSTER_END, cluster.replace("Ladder", "Steps")
    )
    assert again.count(report.CLUSTER_BEGIN) == 1 and "### Steps" in again
    assert report.kept_sections(again) == report.kept_section(
        again, report.CLUSTER_BEGIN, report.CLUSTER_END
    )
    options = LocalOptions(
        connections=2,
        echo_connections=2,
        memory_connections=2,
        workers=1,
        compress=0,
        text_size=10,
        rate=1.0,
        windows=1,
        window_seconds=1.0,
        drain=1.0,
        connect_timeout=1.0,
        steps=(1.0,),
        step_seconds=1.0,
    )
    local = LocalResults(options=options, machine={}, node_settings={}, started=time.time())
    regenerated = report.markdown(local, "mine", report.kept_sections(again))
    assert report.kept_section(regenerated, report.CLUSTER_BEGIN, report.CLUSTER_END) == (
        report.kept_section(again, report.CLUSTER_BEGIN, report.CLUSTER_END)
    )
    assert regenerated.index(report.CLUSTER_END) < regenerated.index("## Findings")


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["cluster", *argv])


def test_cluster_options() -> None:
    options = cluster_options(_args())
    assert isinstance(options, cl.ClusterOptions)
    assert options.nodes == 3 and options.sockets == 6000 and options.target_rate == 10_500
    quick = cluster_options(_args("--quick", "--set", "pg_pool_max=20"))
    assert isinstance(quick, cl.ClusterOptions)
    assert (
        quick.sockets == 1000 and quick.windows == 1 and quick.settings == (("pg_pool_max", "20"),)
    )
    capacity = cluster_options(_args("--connections"))
    assert isinstance(capacity, cl.CapacityOptions)
    assert capacity.nodes == 6 and capacity.target == 150_000 and capacity.step == 25_000
    small = cluster_options(_args("--connections", "12000", "--conn-step", "4000", "--nodes", "3"))
    assert isinstance(small, cl.CapacityOptions) and small.target == 12_000
    assert (
        cluster_options(_args("--nodes", "1")) == "--nodes must be >= 2 (every pair is cross-node)"
    )
    assert "even" in str(cluster_options(_args("--sockets", "7")))
    assert "NAME=VALUE" in str(cluster_options(_args("--set", "oops")))
    assert "loopback" in str(cluster_options(_args("--redis-url", "redis://10.1.2.3:6379/0")))
    assert "--per-worker" in str(cluster_options(_args("--connections", "--per-worker", "50")))
    assert "--conn-step" in str(
        cluster_options(_args("--connections", "100", "--conn-step", "500"))
    )
