"""``kefu bench``: the load generator's command line.

``kefu bench run`` drives nodes that are already running; ``kefu bench local`` starts a
node (and the echo server) itself, runs every measurement and writes docs/benchmarks.md;
``kefu bench desk`` measures the help desk (assignment, queue positions) against nodes it
starts and rewrites the doc's "Help desk" section. See docs/benchmarks.md for the method.
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
        doc = report.markdown(results, report.kept_notes(previous), report.kept_desk(previous))
        args.doc.write_text(doc, encoding="utf-8")
        _progress(f"wrote {args.doc}")
    return 0


def _cmd_render(args: argparse.Namespace) -> int:
    results = pickle.loads(args.results.read_bytes())  # a file this command wrote
    if isinstance(results, DeskResults):
        return _publish_desk(results, args)
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


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "render":
            return _cmd_render(args)
        if args.command == "desk":
            return _cmd_desk(args)
        return _cmd_local(args)
    except KeyboardInterrupt:
        print("kefu bench: interrupted", file=sys.stderr)
        return 130
