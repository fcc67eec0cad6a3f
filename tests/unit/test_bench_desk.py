"""``kefu bench desk``: its pure helpers, its doc section, and one small real run."""

from __future__ import annotations

import argparse
import math
import time

import pytest

from kefu.bench import report
from kefu.bench.cli import build_parser, desk_options
from kefu.bench.desk import (
    AgentRecord,
    BurstRun,
    ChurnRun,
    ChurnWindow,
    ConvRecord,
    Cpu,
    DeskOptions,
    DeskResults,
    PositionRun,
    PositionWindow,
    StoreFigures,
    check_assignments,
    count_between,
    parse_floats,
    plan,
    position_lags,
    positions_match,
    prom_sum,
    run_desk,
    span_rate,
)
from kefu.bench.stats import Latency


def _conv(conv: str, agent: str, events: int = 1, assigned: float = 1.0) -> ConvRecord:
    return ConvRecord(conv, f"cust-{conv}", 0.0, assigned, events, agent)


def test_assigned_exactly_once_and_within_capacity() -> None:
    convs = [_conv("c1", "a"), _conv("c2", "a"), _conv("c3", "b")]
    agents = [
        AgentRecord("a", capacity=2, max_load=2, frames=3, assigned={"c1": 1, "c2": 1}),
        AgentRecord("b", capacity=2, max_load=1, frames=2, assigned={"c3": 1}),
    ]
    verdict = check_assignments(convs, agents, capacity=2)
    assert verdict.ok, verdict.problems
    assert (verdict.once, verdict.assigned, verdict.max_load) == (3, 3, 2)


def test_every_way_to_get_assignment_wrong_is_reported() -> None:
    convs = [
        _conv("twice-customer", "a", events=2),
        _conv("twice-agents", "a"),
        _conv("other-agent", "a"),
        ConvRecord("never", "cust", 0.0),
    ]
    agents = [
        AgentRecord(
            "a",
            capacity=1,
            max_load=3,
            frames=1,
            assigned={"twice-customer": 1, "twice-agents": 1, "stray": 1},
        ),
        AgentRecord("b", capacity=5, max_load=1, frames=1, assigned={"twice-agents": 1}),
        AgentRecord("c", capacity=1, max_load=1, frames=1, assigned={"other-agent": 1}),
    ]
    verdict = check_assignments(convs, agents, capacity=1)
    text = "; ".join(verdict.problems)
    assert not verdict.ok and verdict.once == 0
    assert "never assigned" in text
    assert "customer saw 2 assigned events" in text
    assert "agents saw it 2 times" in text
    assert "disagree on the agent" in text
    assert "never opened by a customer" in text
    assert "1 agents above capacity (max load 3)" in text
    assert "report a capacity other than 1" in text


def test_rates_and_windows() -> None:
    assert span_rate(100, 10.0, 12.0) == 50.0
    assert math.isnan(span_rate(0, 1.0, 2.0)) and math.isnan(span_rate(5, 2.0, 2.0))
    assert count_between([0.5, 1.0, 1.5, 2.0, math.nan], 1.0, 2.0) == 2


def test_position_lags_follow_each_move_to_the_first_frame_that_reflects_it() -> None:
    moves = [10.0, 11.0, 12.0]
    start = {"x": 5, "y": 2, "z": 4}
    logs = {
        # one pass after the first move, one after the next two (coalesced)
        "x": ([10.5, 12.5], [4, 2]),
        # told of nothing: assigned at the second move instead
        "y": ([], []),
        # the last move never reached it
        "z": ([10.25, 11.25], [3, 2]),
    }
    lags, missing = position_lags(start, logs, moves, {"y": 11.1})
    assert sorted(round(v, 2) for v in lags) == sorted([0.5, 1.5, 0.5, 0.25, 0.25, 1.1])
    assert missing == 1


def test_positions_match_and_metrics() -> None:
    assert positions_match({"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 3}) == (1, 3)
    text = (
        "# HELP x\n"
        'kefu_assignments_total{how="auto"} 7.0\n'
        'kefu_assignments_total{how="pick"} 2.0\n'
        "kefu_store_batch_size_count 4.0\n"
        "kefu_store_batch_size_sum 10.0\n"
    )
    assert prom_sum(text, "kefu_assignments_total") == 9.0
    assert math.isnan(prom_sum(text, "kefu_nothing"))
    store = StoreFigures.between("kefu_store_batch_size_count 1.0\n", text)
    assert store.commits == 3.0 and math.isnan(store.commit_seconds)
    assert parse_floats("5, 20") == (5.0, 20.0)
    with pytest.raises(ValueError, match="comma-separated"):
        parse_floats(",")


def test_plan_puts_agents_and_probe_first_and_deals_customers() -> None:
    specs = plan("http://127.0.0.1:1", "g", ["a0", "a1"], [f"c{i}" for i in range(5001)], "t")
    assert [len(s.clients) for s in specs] == [3, 1667, 1667, 1667]
    assert [w.role for w in specs[0].clients] == ["agent", "agent", "probe"]
    assert {w.role for s in specs[1:] for w in s.clients} == {"customer"}
    assert all(w.source.startswith("127.0.0.") for s in specs for w in s.clients)


def _desk(args: list[str]) -> DeskOptions | str:
    parser = build_parser()
    return desk_options(parser.parse_args(["desk", *args]))


def test_cli_options() -> None:
    quick = _desk(["--quick", "--waiting", "300", "--only", "positions"])
    assert isinstance(quick, DeskOptions)
    assert (quick.customers, quick.waiting, quick.scenarios) == (100, 300, ("positions",))
    full = _desk(["--rates", "5,20,50"])
    assert isinstance(full, DeskOptions) and full.rates == (5.0, 20.0, 50.0)
    assert full.customers == 400 and full.agents == 50
    assert "capacity" in str(_desk(["--customers", "600"]))
    assert isinstance(_desk(["--capacity", "0"]), str)
    assert isinstance(build_parser().parse_args(["desk"]), argparse.Namespace)


def _results() -> DeskResults:
    lat = Latency.of([0.001, 0.002])
    verdict = check_assignments([_conv("c", "a")], [AgentRecord("a", 1, 1, 1, {"c": 1})], 1)
    cpu = Cpu(10, 0.2, 0.15, 0.1, 0.0)
    window = PositionWindow(5, 10, 100, 50, 50, 4000, 4000, 1.5, lat, 0, cpu, 1024, lat, 90, 90)
    idle = PositionWindow(0, 4, 100, 0, 0, 0, 0, 0.0, Latency.of([]), 0, cpu, None, lat, 100, 100)
    return DeskResults(
        options=DeskOptions(),
        machine={"cpus (nproc)": "2"},
        node_settings={"rate_per_second": "500"},
        started=time.time() - 60,
        finished=time.time(),
        bursts=[BurstRun(1, 1, 1, 3, 0.5, 2.0, lat, lat, cpu, StoreFigures(), verdict, {})],
        churn=ChurnRun(
            1,
            1,
            1,
            [ChurnWindow(5, 10, 10, 10, lat, cpu)],
            StoreFigures(),
            verdict,
            0,
            {},
        ),
        positions=[
            PositionRun(0.5, 100, 102, 1, 1, 0.5, 0, 100, 100, 1, 2, 3, [idle, window], 0, {})
        ],
    )


def test_desk_section_is_spliced_in_and_kept() -> None:
    section = report.desk_markdown(_results())
    assert section.startswith(report.DESK_BEGIN) and section.endswith(report.DESK_END)
    assert "## Help desk" in section and "| 0.5 | 5 | 100 |" in section
    assert "assignments/s" in report.desk_text(_results())

    doc = "# Benchmarks\n\n## Targets\n\nx\n\n## Findings\n\n<!-- f -->\nmine\n<!-- /f -->\n"
    spliced = report.splice_desk(doc, section)
    assert spliced.index("## Help desk") < spliced.index("## Findings")
    assert spliced.replace(section + "\n\n", "") == doc
    again = report.splice_desk(spliced, section.replace("Help desk", "Help desk (2)"))
    assert again.count("## Help desk") == 1 and "Help desk (2)" in again
    assert report.kept_desk(again).startswith(report.DESK_BEGIN)
    assert report.kept_desk("no section") == ""
    assert report.splice_desk("", section).startswith("# Benchmarks\n\n" + report.DESK_BEGIN)
    assert report.splice_desk("# B\n", section) == "# B\n\n" + section + "\n"


@pytest.mark.slow  # real node and client processes (~15 s on the 2-core machine)
def test_small_real_run() -> None:
    """Every measurement once, tiny, against real nodes: the checks must pass."""
    options = DeskOptions(
        customers=20,
        agents=4,
        capacity=5,
        runs=1,
        churn_windows=1,
        churn_seconds=1.0,
        churn_warmup=0.5,
        waiting=40,
        rates=(20.0,),
        intervals=(0.1,),
        window=1.0,
        idle=0.0,
        timeout=30.0,
    )
    results = run_desk(options, lambda line: None)
    (b,) = results.bursts
    assert b.verdict.ok and b.verdict.assigned == 20 and b.verdict.max_load <= 5, b.verdict
    assert results.churn is not None and results.churn.verdict.ok, results.churn.verdict
    assert results.churn.windows[0].assigned > 0
    (p,) = results.positions
    assert p.fill_correct == p.fill_checked == 39
    moving = p.windows[-1]
    assert moving.moves > 0 and moving.pushes > 0 and moving.correct == moving.checked
    assert moving.missing == 0


def test_bench_local_keeps_the_desk_section() -> None:
    from kefu.bench.local import LocalOptions, LocalResults

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
    section = report.desk_markdown(_results())
    previous = report.splice_desk("# Benchmarks\n\n## Findings\n\nold\n", section)
    doc = report.markdown(local, "mine", report.kept_desk(previous))
    assert report.kept_desk(doc) == section
    assert doc.index(report.DESK_END) < doc.index("## Findings") < doc.index("mine")
