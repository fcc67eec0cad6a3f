"""``kefu bench local``: the whole benchmark against servers it starts itself.

1. The echo baseline: the bare aiohttp echo server under the same load, stepped to
   saturation (and its memory per connection, for comparison).
2. The node with its default settings: memory per connection with every socket up, then
   conversations, the saturation steps, and the sustained rate in a few windows.
3. Compression variants (fresh node each): memory per connection when permessage-deflate
   is negotiated or switched off.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import time
from collections.abc import Callable

from kefu.bench import commands as c
from kefu.bench.procfs import machine
from kefu.bench.report import capacity_line
from kefu.bench.scenarios import (
    Capacity,
    Opened,
    Saturation,
    Sustained,
    capacity,
    open_conversations,
    saturate,
    sustained,
)
from kefu.bench.servers import ServerProcess, start_echo, start_node
from kefu.bench.stats import per_connection_rate, workers_for
from kefu.bench.swarm import Plan, Swarm

Progress = Callable[[str], None]

#: The JWT secret of the nodes this run starts (they live only as long as the run).
SECRET = secrets.token_urlsafe(32)

#: (label, node compression setting, client permessage-deflate offer) for the variants.
VARIANTS: tuple[tuple[str, bool, int], ...] = (
    ("node compression on, client offers deflate (15)", True, 15),
    ("node compression off, client offers deflate (15)", False, 15),
)


@dataclasses.dataclass(frozen=True, slots=True)
class LocalOptions:
    connections: int
    echo_connections: int
    memory_connections: int
    workers: int | None
    compress: int
    text_size: int
    rate: float
    windows: int
    window_seconds: float
    drain: float
    connect_timeout: float
    steps: tuple[float, ...]
    step_seconds: float
    echo: bool = True
    variants: bool = True


@dataclasses.dataclass(slots=True)
class LocalResults:
    options: LocalOptions
    machine: dict[str, str]
    node_settings: dict[str, str]
    started: float
    finished: float = 0.0
    echo_capacity: Capacity | None = None
    echo: Saturation | None = None
    capacities: list[Capacity] = dataclasses.field(default_factory=list)
    opened: Opened | None = None
    sustained: Sustained | None = None
    saturation: Saturation | None = None
    node_metrics: str = ""


def node_settings(options: LocalOptions) -> dict[str, str]:
    """Node settings for the run: defaults, but a per-connection rate limit high enough
    for the top saturation step (so the limit is not what the steps measure)."""
    return rate_settings(max((*options.steps, options.rate)), options.connections)


def rate_settings(top: float, connections: int) -> dict[str, str]:
    """``rate_per_second``/``rate_burst`` when ``top`` msg/s over ``connections`` sockets
    would come near the default per-connection limit (20/s); else nothing."""
    per_socket = per_connection_rate(top, connections)
    settings: dict[str, str] = {}
    if per_socket * 2 > 20:
        rate = math.ceil(per_socket * 4)
        settings["rate_per_second"] = str(rate)
        settings["rate_burst"] = str(max(40, rate * 2))
    return settings


def _plan(options: LocalOptions, mode: c.Mode, url: str, connections: int, compress: int) -> Plan:
    return Plan(
        mode=mode,
        urls=(url,),
        connections=connections,
        workers=options.workers or workers_for(connections),
        secret=SECRET,
        compress=compress,
        text_size=options.text_size,
        tag=f"b{secrets.token_hex(3)}",
    )


def run_local(options: LocalOptions, progress: Progress) -> LocalResults:
    results = LocalResults(
        options=options,
        machine=machine(),
        node_settings=node_settings(options),
        started=time.time(),
    )
    if options.echo:
        _echo(options, results, progress)
    _main_node(options, results, progress)
    if options.variants:
        for label, node_compression, client_compress in VARIANTS:
            _variant(options, results, progress, label, node_compression, client_compress)
    results.finished = time.time()
    return results


def _echo(options: LocalOptions, results: LocalResults, progress: Progress) -> None:
    progress(f"echo baseline: {options.echo_connections:,} sockets")
    with start_echo(options.compress > 0) as echo:
        plan = _plan(options, "echo", echo.url, options.echo_connections, options.compress)
        with Swarm(plan) as swarm:
            results.echo_capacity = capacity(swarm, "echo", echo.pid, options.connect_timeout)
            progress(f"echo {capacity_line(results.echo_capacity)}")
            open_conversations(swarm, options.connect_timeout)
            results.echo = saturate(
                swarm,
                options.steps,
                options.step_seconds,
                options.drain,
                echo.pid,
                progress,
                failures=2,
            )


def _main_node(options: LocalOptions, results: LocalResults, progress: Progress) -> None:
    label = f"node defaults (compression on), client offers deflate: {options.compress or 'no'}"
    progress(f"node: {options.connections:,} sockets ({label})")
    with start_node(SECRET, results.node_settings) as node:
        plan = _plan(options, "kefu", node.url, options.connections, options.compress)
        with Swarm(plan) as swarm:
            cap = capacity(swarm, label, node.pid, options.connect_timeout)
            results.capacities.append(cap)
            progress(f"node {capacity_line(cap)}")
            results.opened = open_conversations(swarm, options.connect_timeout)
            progress(
                f"opened {results.opened.opened:,} conversations in {results.opened.seconds:.1f}s"
            )
            # Saturation first: an overloaded sustained window leaves a backlog behind.
            results.saturation = saturate(
                swarm,
                options.steps,
                options.step_seconds,
                options.drain,
                node.pid,
                progress,
                failures=2,
            )
            results.sustained = sustained(
                swarm,
                options.rate,
                options.windows,
                options.window_seconds,
                options.drain,
                node.pid,
                progress,
            )
        results.node_metrics = node.metrics()
        _check_alive(node)


def _variant(
    options: LocalOptions,
    results: LocalResults,
    progress: Progress,
    label: str,
    node_compression: bool,
    client_compress: int,
) -> None:
    settings = {**results.node_settings, "compression": str(node_compression).lower()}
    progress(f"variant: {label}")
    with start_node(SECRET, settings) as node:
        plan = _plan(options, "kefu", node.url, options.memory_connections, client_compress)
        with Swarm(plan) as swarm:
            cap = capacity(swarm, label, node.pid, options.connect_timeout)
        results.capacities.append(cap)
        progress(f"variant {capacity_line(cap)}")
        _check_alive(node)


def _check_alive(server: ServerProcess) -> None:
    if server.proc.poll() is not None:
        raise RuntimeError(f"{server.name} died during the run:\n{server.tail()}")
