"""``kefu bench``: the load generator's command line.

``kefu bench run`` drives nodes that are already running; ``kefu bench local`` starts a
node (and the echo server) itself, runs every measurement and writes docs/benchmarks.md;
``kefu bench desk`` measures the help desk (assignment, queue positions) against nodes it
starts and rewrites the doc's "Help desk" section; ``kefu bench cluster`` starts Redis,
PostgreSQL and N nodes and measures cross-node chat (or, with ``--connections``, how many
idle connections M nodes hold) and rewrites its own section. See docs/benchmarks.md for the
method.
"""

from __future__ import annotations

import argparse
import dataclasses
import pickle
import secrets
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from kefu.bench import cluster as cl
from kefu.bench import report
from kefu.bench.desk import QUICK, DeskOptions, DeskResults, parse_floats, run_desk
from kefu.bench.local import LocalOptions, LocalResults, run_local
from kefu.bench.scenarios import capacity, open_conversations, saturate, sustained
from kefu.bench.stats import is_loopback_url, per_connection_rate, rate_steps, workers_for
from kefu.bench.swarm import Plan, Swarm

DEFAULT_RATE_LIMIT = 20.0


def _progress(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)


def _load_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--connections", type=int, default=10_000, help="client sockets")
    parser.add_argument("--workers", type=int, help="client processes (default ~5k sockets each)")
    parser.add_argument("--compress", type=int, default=0, choices=[0, 9, 10, 11, 12, 13, 14, 15])
    parser.add_argument("--text-size", type=int, default=100, help="characters per message")
    parser.add_argument("--windows", type=int, default=3, help="sustained-rate windows")
    parser.add_argument("--window-seconds", type=float, default=10.0)
    parser.add_argument("--drain", type=float, default=5.0, help="seconds to wait for stragglers")
    parser.add_argument("--connect-timeout", type=float, default=240.0)
    parser.add_argument("--step-start", type=float, default=1000.0)
    parser.add_argument("--step-factor", type=float, default=1.3)
    parser.add_argument("--step-max", type=float, default=40_000.0)
    parser.add_argument("--step-seconds", type=float, default=8.0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kefu bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="drive nodes that are already running")
    run.add_argument("--url", action="append", required=True, help="node URL (repeatable)")
    run.add_argument("--secret", required=True, help="the nodes' JWT secret")
    run.add_argument("--rate", type=float, default=1000.0, help="total messages a second")
    run.add_argument("--duration", type=float, default=30.0, help="seconds of traffic")
    run.add_argument("--server-pid", type=int, help="a local node's pid, for RSS and CPU")
    run.add_argument("--saturate", action="store_true", help="then step the rate up")
    _load_args(run)

    local = sub.add_parser("local", help="start a node and the echo server, run everything")
    local.add_argument("--rate", type=float, default=5000.0, help="the sustained rate")
    local.add_argument("--echo-connections", type=int, help="default: --connections")
    local.add_argument(
        "--memory-connections", type=int, help="sockets per compression variant (default: all)"
    )
    local.add_argument("--no-echo", action="store_true", help="skip the echo baseline")
    local.add_argument("--no-variants", action="store_true", help="skip compression variants")
    local.add_argument("--doc", type=Path, default=Path("docs/benchmarks.md"))
    local.add_argument("--no-doc", action="store_true", help="print only")
    local.add_argument("--save", type=Path, help="also keep the raw results (pickle) here")
    _load_args(local)

    desk = sub.add_parser("desk", help="the help desk: assignment and queue positions")
    desk.add_argument("--customers", type=int, help="customers opening at once (400)")
    desk.add_argument("--agents", type=int, help="agents online (50)")
    desk.add_argument("--capacity", type=int, help="conversations per agent (10)")
    desk.add_argument("--runs", type=int, help="burst runs, median reported (3)")
    desk.add_argument("--waiting", type=int, help="customers queued for positions (5000)")
    desk.add_argument("--rates", type=parse_floats, help="agent resolves a second (5,20)")
    desk.add_argument(
        "--intervals", type=parse_floats, help="queue_update_interval values (0.5,0.1)"
    )
    desk.add_argument("--window", type=float, help="seconds per resolve rate (10)")
    desk.add_argument("--churn-windows", type=int, help="sustained windows (3)")
    desk.add_argument("--churn-seconds", type=float, help="seconds per sustained window (5)")
    desk.add_argument(
        "--only",
        action="append",
        choices=["burst", "churn", "positions"],
        help="run only this measurement (repeatable)",
    )
    desk.add_argument("--quick", action="store_true", help="a small smoke run (~1 minute)")
    desk.add_argument("--doc", type=Path, default=Path("docs/benchmarks.md"))
    desk.add_argument("--no-doc", action="store_true", help="print only")
    desk.add_argument("--save", type=Path, help="also keep the raw results (pickle) here")

    clu = sub.add_parser(
        "cluster",
        help="Redis + PostgreSQL + N nodes: cross-node chat, or --connections capacity",
        description="Start a redis-server, a PostgreSQL and N nodes (kefu cluster up's code; "
        "or use --redis-url/--database-url) and drive 1:1 chats whose two ends are on "
        "different nodes: a rate ladder, then sustained windows. With --connections: M nodes, "
        "idle connections in steps with a cross-node probe at each, until a step fails.",
    )
    clu.add_argument("--nodes", type=int, help="nodes (3; 6 with --connections)")
    clu.add_argument(
        "--connections",
        type=int,
        nargs="?",
        const=cl.CONNECTIONS_TARGET,
        metavar="N",
        help=f"capacity mode: idle connections up to N ({cl.CONNECTIONS_TARGET:,})",
    )
    clu.add_argument("--conn-step", type=int, default=25_000, help="connections per step")
    clu.add_argument("--per-worker", type=int, default=12_500, help="sockets per process")
    clu.add_argument("--idle-seconds", type=float, default=10.0, help="quiet window per step")
    clu.add_argument("--sockets", type=int, default=6_000, help="throughput mode: sockets")
    clu.add_argument("--workers", type=int, help="throughput mode: client processes")
    clu.add_argument("--rate", type=float, default=5000.0, help="the latency target's rate")
    clu.add_argument(
        "--target-rate",
        type=float,
        default=cl.THROUGHPUT_OFFER,
        help="what the throughput windows offer (10,500 for the 10,000 acked/s target)",
    )
    clu.add_argument("--steps", type=parse_floats, help="ladder rates (1000,2000,...,12000)")
    clu.add_argument("--step-seconds", type=float, default=8.0)
    clu.add_argument("--windows", type=int, default=3, help="sustained windows per rate")
    clu.add_argument("--window-seconds", type=float, default=10.0)
    clu.add_argument("--drain", type=float, default=5.0)
    clu.add_argument("--text-size", type=int, default=100)
    clu.add_argument("--connect-timeout", type=float, default=240.0)
    clu.add_argument("--redis-url", default="", help="use this Redis (loopback)")
    clu.add_argument("--database-url", default="", help="use this PostgreSQL (loopback)")
    clu.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE", help="node setting"
    )
    clu.add_argument("--quick", action="store_true", help="a small smoke run (~1 minute)")
    clu.add_argument("--doc", type=Path, default=Path("docs/benchmarks.md"))
    clu.add_argument("--no-doc", action="store_true", help="print only")
    clu.add_argument("--save", type=Path, help="also keep the raw results (pickle) here")

    render = sub.add_parser("render", help="print and write the doc again from --save results")
    render.add_argument("results", type=Path)
    render.add_argument("--doc", type=Path, default=Path("docs/benchmarks.md"))
    render.add_argument("--no-doc", action="store_true", help="print only")
    return parser


def _check(args: argparse.Namespace, urls: Sequence[str]) -> str | None:
    for url in urls:
        if not is_loopback_url(url):
            return f"{url}: the bench only drives loopback addresses"
    if args.connections < 2 or args.connections % 2:
        return "--connections must be an even number >= 2 (agent/customer pairs)"
    if args.connections > 250_000:
        return "--connections above 250,000 is out of bounds"
    if args.windows < 1 or args.window_seconds <= 0 or args.step_seconds <= 0:
        return "windows and durations must be positive"
    return None


def _cmd_run(args: argparse.Namespace) -> int:
    urls = [u.rstrip("/") for u in args.url]
    problem = _check(args, urls)
    if problem:
        print(f"kefu bench: {problem}", file=sys.stderr)
        return 2
    top = max(args.rate, args.step_max if args.saturate else 0.0)
    if per_connection_rate(top, args.connections) > DEFAULT_RATE_LIMIT / 2:
        _progress(
            f"warning: {per_connection_rate(top, args.connections):.1f} frames/s per socket is "
            "near the default per-connection limit (20/s): expect rate_limited errors "
            "unless the nodes run with a higher --set rate_per_second"
        )
    workers = args.workers or workers_for(args.connections)
    plan = Plan(
        mode="kefu",
        urls=tuple(urls),
        connections=args.connections,
        workers=workers,
        secret=args.secret,
        compress=args.compress,
        text_size=args.text_size,
        tag=f"b{secrets.token_hex(3)}",
    )
    pid = args.server_pid
    with Swarm(plan) as swarm:
        _progress(f"connecting {args.connections:,} sockets from {workers} workers")
        cap = capacity(swarm, "run", pid, args.connect_timeout)
        _progress(report.capacity_line(cap))
        opened = open_conversations(swarm, args.connect_timeout)
        _progress(f"opened {opened.opened:,} conversations in {opened.seconds:.1f}s")
        windows = max(1, round(args.duration / args.window_seconds))
        seconds = args.duration / windows
        held = sustained(swarm, args.rate, windows, seconds, args.drain, pid, _progress)
        sat = None
        if args.saturate:
            rates = rate_steps(args.step_start, args.step_factor, args.step_max)
            sat = saturate(swarm, rates, args.step_seconds, args.drain, pid, _progress)
    print(report.run_table(cap, opened, held, sat))
    return 0


def _cmd_local(args: argparse.Namespace) -> int:
    problem = _check(args, [])
    if problem:
        print(f"kefu bench: {problem}", file=sys.stderr)
        return 2
    options = LocalOptions(
        connections=args.connections,
        echo_connections=args.echo_connections or args.connections,
        memory_connections=args.memory_connections or args.connections,
        workers=args.workers,
        compress=args.compress,
        text_size=args.text_size,
        rate=args.rate,
        windows=args.windows,
        window_seconds=args.window_seconds,
        drain=args.drain,
        connect_timeout=args.connect_timeout,
        steps=tuple(rate_steps(args.step_start, args.step_factor, args.step_max)),
        step_seconds=args.step_seconds,
        echo=not args.no_echo,
        variants=not args.no_variants,
    )
    results = run_local(options, _progress)
    if args.save is not None:
        args.save.write_bytes(pickle.dumps(results))
    return _publish(results, args)


def _publish(results: LocalResults, args: argparse.Namespace) -> int:
    print(report.local_table(results))
    if not args.no_doc:
        args.doc.parent.mkdir(parents=True, exist_ok=True)
        previous = args.doc.read_text(encoding="utf-8") if args.doc.exists() else ""
        doc = report.markdown(results, report.kept_notes(previous), report.kept_sections(previous))
        args.doc.write_text(doc, encoding="utf-8")
        _progress(f"wrote {args.doc}")
    return 0


def _cmd_render(args: argparse.Namespace) -> int:
    results = pickle.loads(args.results.read_bytes())  # a file this command wrote
    if isinstance(results, DeskResults):
        return _publish_desk(results, args)
    if isinstance(results, cl.ClusterResults | cl.CapacityResults):
        return _publish_cluster(results, args)
    if not isinstance(results, LocalResults):
        print(f"kefu bench: {args.results} does not hold bench results", file=sys.stderr)
        return 2
    return _publish(results, args)


DESK_FLAGS = (
    "customers",
    "agents",
    "capacity",
    "runs",
    "waiting",
    "rates",
    "intervals",
    "window",
    "churn_windows",
    "churn_seconds",
)


def desk_options(args: argparse.Namespace) -> DeskOptions | str:
    """The options of ``kefu bench desk`` (``--quick`` sizes, then explicit flags), or
    what is wrong with them."""
    given: dict[str, object] = dict(QUICK) if args.quick else {}
    given.update({k: getattr(args, k) for k in DESK_FLAGS if getattr(args, k) is not None})
    if args.only:
        given["scenarios"] = tuple(dict.fromkeys(args.only))
    options = dataclasses.replace(DeskOptions(quick=args.quick), **given)  # type: ignore[arg-type]
    if min(options.customers, options.agents, options.runs, options.churn_windows) < 1:
        return "--customers, --agents, --runs and --churn-windows must be >= 1"
    if not 1 <= options.capacity <= 200:
        return "--capacity must be 1..200 (the node's max_capacity)"
    if options.customers > options.agents * options.capacity:
        return "--customers above --agents x --capacity could not all be assigned at once"
    if options.customers > 10_000 or not 2 <= options.waiting <= 15_000:
        return "--customers is at most 10,000 and --waiting 2..15,000 (one node's sockets)"
    if any(r <= 0 or r > 200 for r in options.rates):
        return "--rates must be in (0, 200] resolves a second"
    if any(i < 0 or i > 5 for i in options.intervals):
        return "--intervals must be 0..5 seconds"
    if options.window <= 0 or options.churn_seconds <= 0:
        return "durations must be positive"
    return options


def _cmd_desk(args: argparse.Namespace) -> int:
    options = desk_options(args)
    if isinstance(options, str):
        print(f"kefu bench: {options}", file=sys.stderr)
        return 2
    results = run_desk(options, _progress)
    if args.save is not None:
        args.save.write_bytes(pickle.dumps(results))
    return _publish_desk(results, args)


def _publish_desk(results: DeskResults, args: argparse.Namespace) -> int:
    print(report.desk_text(results))
    if not args.no_doc:
        args.doc.parent.mkdir(parents=True, exist_ok=True)
        previous = args.doc.read_text(encoding="utf-8") if args.doc.exists() else ""
        args.doc.write_text(
            report.splice_desk(previous, report.desk_markdown(results)), encoding="utf-8"
        )
        _progress(f"wrote the Help desk section of {args.doc}")
    return 0


def _settings(pairs: Sequence[str]) -> tuple[tuple[str, str], ...] | str:
    out = []
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            return f"--set {pair!r}: expected NAME=VALUE"
        out.append((name.strip(), value.strip()))
    return tuple(out)


def cluster_options(args: argparse.Namespace) -> cl.ClusterOptions | cl.CapacityOptions | str:
    """The options of ``kefu bench cluster`` (either mode), or what is wrong with them."""
    settings = _settings(args.set)
    if isinstance(settings, str):
        return settings
    for url in (args.redis_url, args.database_url):
        if url and not cl.loopback_server(url):
            return f"{url}: the bench only uses servers on loopback addresses"
    if args.connections is not None:
        quick = args.quick and args.connections == cl.CONNECTIONS_TARGET
        capacity = cl.CapacityOptions(
            nodes=args.nodes or (3 if args.quick else 6),
            target=6_000 if quick else args.connections,
            step=2_000 if args.quick else args.conn_step,
            per_worker=args.per_worker,
            idle_seconds=2.0 if args.quick else args.idle_seconds,
            redis_url=args.redis_url,
            database_url=args.database_url,
            settings=settings,
        )
        return cl.capacity_problem(capacity) or capacity
    steps = args.steps or ((500.0, 1000.0, 2000.0) if args.quick else cl.ClusterOptions().steps)
    options = cl.ClusterOptions(
        nodes=args.nodes or 3,
        sockets=1_000 if args.quick and args.sockets == 6_000 else args.sockets,
        workers=args.workers,
        text_size=args.text_size,
        steps=tuple(steps),
        step_seconds=3.0 if args.quick else args.step_seconds,
        drain=2.0 if args.quick else args.drain,
        rate=1000.0 if args.quick else args.rate,
        target_rate=2000.0 if args.quick else args.target_rate,
        windows=1 if args.quick else args.windows,
        window_seconds=3.0 if args.quick else args.window_seconds,
        warmup_seconds=1.0 if args.quick else 5.0,
        connect_timeout=args.connect_timeout,
        redis_url=args.redis_url,
        database_url=args.database_url,
        settings=settings,
    )
    if options.nodes < 2:
        return "--nodes must be >= 2 (every pair is cross-node)"
    if options.sockets < 2 * options.nodes or options.sockets % 2 or options.sockets > 100_000:
        return "--sockets must be even, >= 2 x --nodes and <= 100,000"
    if min(options.steps) <= 0 or options.rate <= 0 or options.target_rate <= 0:
        return "rates must be positive"
    if options.windows < 1 or options.window_seconds <= 0 or options.step_seconds <= 0:
        return "windows and durations must be positive"
    return options


def _cmd_cluster(args: argparse.Namespace) -> int:
    options = cluster_options(args)
    if isinstance(options, str):
        print(f"kefu bench: {options}", file=sys.stderr)
        return 2
    results: cl.ClusterResults | cl.CapacityResults
    if isinstance(options, cl.CapacityOptions):
        results = cl.run_capacity(options, _progress)
    else:
        results = cl.run_cluster(options, _progress)
    if args.save is not None:
        args.save.write_bytes(pickle.dumps(results))
    return _publish_cluster(results, args)


def _publish_cluster(
    results: cl.ClusterResults | cl.CapacityResults, args: argparse.Namespace
) -> int:
    if isinstance(results, cl.CapacityResults):
        print(cl.capacity_text(results))
        begin, end, section = (
            report.CAPACITY_BEGIN,
            report.CAPACITY_END,
            cl.capacity_markdown(results),
        )
    else:
        print(cl.cluster_text(results))
        begin, end, section = report.CLUSTER_BEGIN, report.CLUSTER_END, cl.cluster_markdown(results)
    if not args.no_doc:
        args.doc.parent.mkdir(parents=True, exist_ok=True)
        previous = args.doc.read_text(encoding="utf-8") if args.doc.exists() else ""
        args.doc.write_text(report.splice_section(previous, begin, end, section), encoding="utf-8")
        _progress(f"wrote the {section.splitlines()[1][3:]} section of {args.doc}")
    return 0


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "render":
            return _cmd_render(args)
        if args.command == "desk":
            return _cmd_desk(args)
        if args.command == "cluster":
            return _cmd_cluster(args)
        return _cmd_local(args)
    except KeyboardInterrupt:
        print("kefu bench: interrupted", file=sys.stderr)
        return 130
