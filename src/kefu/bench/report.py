"""The figures as a terminal table and as docs/benchmarks.md."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kefu.bench.scenarios import (
    HOLD_P99_MS,
    HOLD_SHARE,
    Capacity,
    Opened,
    Saturation,
    Sustained,
    why_not,
)
from kefu.bench.stats import prom_value
from kefu.bench.swarm import Step

if TYPE_CHECKING:
    from kefu.bench.local import LocalResults

#: The targets this benchmark checks (docs/benchmarks.md, DESIGN.md).
RSS_TARGET_KB = 20.0
SUSTAINED_P99_TARGET_MS = 20.0


# -- formatting ---------------------------------------------------------------------------


def _num(value: float, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _pct(cores: float) -> str:
    """CPU use in percent of one core ("150%" = one and a half cores)."""
    return "-" if math.isnan(cores) else f"{cores:.0%}"


def _errors(errors: dict[str, int]) -> str:
    if not errors:
        return "0"
    return ", ".join(f"{code} {n:,}" for code, n in errors.items())


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


STEP_HEADERS = (
    "offered/s",
    "sent/s",
    "acked/s",
    "delivered/s",
    "ack p50 ms",
    "ack p99 ms",
    "e2e p50 ms",
    "e2e p99 ms",
    "e2e p99.9 ms",
    "server CPU",
    "bench CPU",
    "other CPU",
    "errors",
    "reconnects",
    "held",
)


def step_row(step: Step) -> list[str]:
    reason = why_not(step)
    return [
        _num(step.offered),
        _num(step.sent_rate),
        _num(step.ack_rate),
        _num(step.delivery_rate),
        _num(step.ack.p50, 1),
        _num(step.ack.p99, 1),
        _num(step.e2e.p50, 1),
        _num(step.e2e.p99, 1),
        _num(step.e2e.p999, 1),
        _pct(step.server_cpu),
        _pct(step.client_cpu),
        _pct(step.other_cpu),
        _errors(step.errors),
        str(step.reconnects),
        "yes" if not reason else f"no: {reason}",
    ]


CAPACITY_HEADERS = (
    "configuration",
    "connected",
    "connect s",
    "RSS before MiB",
    "RSS after MiB",
    "KiB/connection",
    "ping rtt p99 ms (during connect)",
    "errors",
)


def capacity_row(cap: Capacity) -> list[str]:
    def mib(kb: int | None) -> str:
        return "-" if kb is None else f"{kb / 1024:,.1f}"

    return [
        cap.label,
        f"{cap.connected:,}/{cap.connections:,}",
        _num(cap.connect_seconds, 1),
        mib(cap.rss_before_kb),
        mib(cap.rss_after_kb),
        _num(cap.per_connection_kb, 1),
        _num(cap.rtt.p99, 1),
        _errors(cap.errors),
    ]


def capacity_line(cap: Capacity) -> str:
    return (
        f"{cap.connected:,}/{cap.connections:,} connected in {cap.connect_seconds:.1f}s, "
        f"RSS {cap.rss_before_kb} -> {cap.rss_after_kb} KiB = "
        f"{cap.per_connection_kb:.1f} KiB/connection, errors {_errors(cap.errors)}"
    )


def _steps_text(title: str, steps: Sequence[Step]) -> str:
    return f"{title}\n" + text_table(STEP_HEADERS, [step_row(s) for s in steps])


# -- kefu bench run -----------------------------------------------------------------------


def run_table(cap: Capacity, opened: Opened, held: Sustained, sat: Saturation | None) -> str:
    parts = [
        text_table(CAPACITY_HEADERS, [capacity_row(cap)]),
        f"conversations opened: {opened.opened:,} ({opened.failed} failed) "
        f"in {opened.seconds:.1f}s",
        _steps_text(f"sustained {held.rate:,.0f} msg/s", held.windows),
    ]
    if sat is not None:
        parts.append(_steps_text("saturation", sat.steps))
        parts.append(f"max sustained: {_num(sat.max_rate)} msg/s (stopped by {sat.stopped_by})")
    return "\n\n".join(parts)


# -- kefu bench local ---------------------------------------------------------------------


def _ratio(results: LocalResults) -> float:
    if results.saturation is None or results.echo is None:
        return math.nan
    return results.saturation.max_rate / results.echo.max_rate


def _targets(results: LocalResults) -> list[list[str]]:
    rows: list[list[str]] = []
    if results.capacities:
        cap = results.capacities[0]
        kb = cap.per_connection_kb
        rows.append(
            [
                f"RSS per idle connection ({cap.connections:,} connected)",
                f"<= {RSS_TARGET_KB:.0f} KiB",
                f"{_num(kb, 1)} KiB",
                _met(kb <= RSS_TARGET_KB and cap.connected == cap.connections),
            ]
        )
    held = results.sustained
    if held is not None:
        p99 = held.median_p99
        ok = p99 <= SUSTAINED_P99_TARGET_MS and held.median_ack_rate >= HOLD_SHARE * held.rate
        rows.append(
            [
                f"end-to-end p99 at {held.rate:,.0f} persisted msg/s",
                f"<= {SUSTAINED_P99_TARGET_MS:.0f} ms",
                f"{_num(p99, 1)} ms (median of {len(held.windows)} windows; "
                f"{_num(held.median_ack_rate)} acked/s)",
                _met(ok),
            ]
        )
    sat = results.saturation
    if sat is not None:
        rows.append(
            [
                "max sustained persisted msg/s, one node",
                ">= 10,000 (DESIGN.md, cross-node cluster target)",
                f"{_num(sat.max_rate)} msg/s; echo {_num(results.echo.max_rate) if results.echo else '-'}"
                f"/s; ratio {_num(_ratio(results), 2)}",
                _met(sat.max_rate >= 10_000),
            ]
        )
    return rows


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def local_table(results: LocalResults) -> str:
    parts = [
        "Memory per connection\n"
        + text_table(
            CAPACITY_HEADERS,
            [capacity_row(c) for c in _all_capacities(results)],
        )
    ]
    if results.sustained is not None:
        parts.append(
            _steps_text(f"sustained {results.sustained.rate:,.0f} msg/s", results.sustained.windows)
        )
    if results.saturation is not None:
        parts.append(_steps_text("node saturation", results.saturation.steps))
    if results.echo is not None:
        parts.append(_steps_text("echo saturation", results.echo.steps))
    parts.append(text_table(("target", "goal", "measured", ""), _targets(results)))
    return "\n\n".join(parts)


def _all_capacities(results: LocalResults) -> list[Capacity]:
    extra = [results.echo_capacity] if results.echo_capacity is not None else []
    return [*results.capacities, *extra]


def _cpu_per_message_us(step: Step) -> float:
    return step.server_cpu / step.ack_rate * 1e6 if step.ack_rate else math.nan


def _cost_line(best: Step, echo: Saturation | None) -> str:
    line = (
        f"- **CPU per message**: the node spent {_num(_cpu_per_message_us(best))} µs of CPU "
        f"per persisted message at {_num(best.ack_rate)} msg/s"
    )
    if echo is not None and echo.best is not None:
        line += (
            f"; the echo server {_num(_cpu_per_message_us(echo.best))} µs per echoed "
            f"message at {_num(echo.best.ack_rate)} msg/s"
        )
    return line + "."


def _store_figures(metrics: str) -> list[str]:
    lines = []
    count = prom_value(metrics, "kefu_store_batch_size_count")
    total = prom_value(metrics, "kefu_store_batch_size_sum")
    secs = prom_value(metrics, "kefu_store_commit_seconds_sum")
    if count > 0:
        lines.append(
            f"- **Store** (whole run, overload included): {count:,.0f} group commits of {total / count:,.1f} jobs on average, "
            f"{secs / count * 1000:.2f} ms each on average (BEGIN to COMMIT, fsync included)"
        )
    return lines


NOTES_BEGIN = "<!-- findings: hand-written, kept when the figures are regenerated -->"
NOTES_END = "<!-- /findings -->"


def kept_notes(previous: str) -> str:
    """The hand-written findings block of an earlier docs/benchmarks.md ('' if none)."""
    start, end = previous.find(NOTES_BEGIN), previous.find(NOTES_END)
    if start < 0 or end < start:
        return ""
    return previous[start + len(NOTES_BEGIN) : end].strip()


def markdown(results: LocalResults, notes: str = "") -> str:
    """docs/benchmarks.md: the figures of ``results`` and the kept ``notes``."""
    opts = results.options
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(results.started))
    minutes = (results.finished - results.started) / 60
    settings = ", ".join(f"`{k}={v}`" for k, v in results.node_settings.items()) or "none"
    doc = [
        "# Benchmarks",
        "",
        f"Figures from `scripts/bench local` (`kefu bench local`), run {when}, "
        f"{minutes:.0f} minutes. Each run rewrites this file except the hand-written "
        "Findings at the end.",
        "",
        "## Machine",
        "",
        md_table(("", ""), [[k, v] for k, v in results.machine.items()]),
        "",
        "## Targets",
        "",
        md_table(("target", "goal", "measured", ""), _targets(results)),
        "",
        "## Method",
        "",
        "- **Load generator**: `kefu.bench`, separate processes (multiprocessing, "
        "spawned), each with its own uvloop event loop and aiohttp client WebSockets; "
        f"{opts.workers or 'about 5,000 sockets per'} worker{'s' if opts.workers else ''}. "
        "Sockets are bound to source addresses 127.0.0.2, 127.0.0.3, ... round-robin "
        "(each address has its own ~28k ephemeral ports). Only loopback is used.",
        "- **Load**: 1:1 conversations. Each pair is an agent and a customer connection "
        "driven by the same worker process; the agent opens the conversation (`open`), then "
        "both sides send text messages of "
        f"{opts.text_size} characters (~{opts.text_size + 110} bytes of JSON) at a fixed total "
        "rate, paced every 2 ms and spread round-robin over every socket (open loop: a "
        "generator that falls more than 250 ms behind skips and counts the messages).",
        "- **Throughput**: acked msgs/s are `ack` frames (the message is committed to "
        "SQLite, `synchronous=FULL`) received within the window; delivered msgs/s are "
        "`message` pushes received by the other side within the window.",
        "- **Latency**: end-to-end is the sender's `perf_counter()` at send to the "
        "recipient's `perf_counter()` at receive, matched by `client_msg_id` (both ends in "
        "one process, one clock); ack latency is send to ack on the sender.",
        "- **CPU**: from /proc over each step (its send window and drain): the server "
        "process (all threads), the generator's worker processes, and everything else on "
        "the machine (other users of the shared machine), each in percent of one core; the "
        "machine has two.",
        "- **Memory**: server VmRSS (/proc/PID/status) before connecting and 2 s after "
        "every socket is up, authenticated (token in the query) and has done one "
        "`ping`/`pong` round trip (so a negotiated permessage-deflate stream has built its "
        "compressor and decompressor); (after - before) / connections.",
        f"- **Sustained**: {opts.rate:,.0f} msg/s for {opts.windows} windows of "
        f"{opts.window_seconds:.0f} s over the {opts.connections:,} connected sockets; the "
        "medians of the windows are reported.",
        f"- **Saturation**: rate steps of {opts.step_seconds:.0f} s "
        f"({', '.join(f'{r:,.0f}' for r in opts.steps)} msg/s) until two steps in a row do "
        "not hold, run before the sustained windows (an overloaded window leaves a "
        "backlog; after a step that did not hold the bench waits for the node to go quiet). "
        f"A step holds when >= {HOLD_SHARE:.0%} of the offered rate is acked within the "
        f"step, nothing is left unacked {opts.drain:.0f} s after it, and the end-to-end p99 "
        f"is <= {HOLD_P99_MS:.0f} ms. The maximum sustained rate is the acked rate of the "
        "best step that held.",
        "- **Echo baseline**: `python -m kefu.bench.echo`, a bare aiohttp WebSocket server "
        "on uvloop that sends every text frame back unparsed, driven by the same generator "
        f"({opts.echo_connections:,} sockets, same steps; the echoed frame counts as both ack "
        "and delivery). Per message the echo server reads one frame and writes one; the node "
        "reads one, validates it, commits it to SQLite, and writes two (ack and push).",
        f"- **Node**: `kefu serve` as a subprocess with a fresh data directory, "
        f"`KEFU_JWT_SECRET` set, uvloop, heartbeats every 30 s, open-file soft limit raised "
        f"to the hard limit; settings changed from the defaults: {settings}.",
        f"- **Client compression**: the main run's clients "
        f"{'offer permessage-deflate (' + str(opts.compress) + ')' if opts.compress else 'do not offer permessage-deflate'}"
        "; the variants below measure memory with deflate negotiated and with the node's "
        "compression off.",
        "",
        "## Memory per connection",
        "",
        md_table(CAPACITY_HEADERS, [capacity_row(c) for c in _all_capacities(results)]),
    ]
    if results.opened is not None:
        o = results.opened
        doc += [
            "",
            f"Conversations opened: {o.opened:,} ({o.failed} failed) in {o.seconds:.1f} s.",
        ]
    if results.sustained is not None:
        doc += [
            "",
            f"## Sustained {results.sustained.rate:,.0f} msg/s",
            "",
            md_table(STEP_HEADERS, [step_row(s) for s in results.sustained.windows]),
        ]
    if results.saturation is not None:
        sat = results.saturation
        doc += [
            "",
            "## Saturation: the node",
            "",
            md_table(STEP_HEADERS, [step_row(s) for s in sat.steps]),
            "",
            f"Maximum sustained: **{_num(sat.max_rate)} persisted msg/s** "
            f"(stopped by {sat.stopped_by}).",
        ]
    if results.echo is not None:
        doc += [
            "",
            "## Saturation: bare aiohttp echo",
            "",
            md_table(STEP_HEADERS, [step_row(s) for s in results.echo.steps]),
            "",
            f"Maximum sustained: **{_num(results.echo.max_rate)} echoed msg/s** "
            f"(stopped by {results.echo.stopped_by}). Node / echo: "
            f"**{_num(_ratio(results), 2)}**.",
        ]
    doc += ["", "## What limits these numbers", "", *_notes(results)]
    doc += ["", "## Findings", "", NOTES_BEGIN, notes.strip() or "(none yet)", NOTES_END]
    doc += [
        "",
        "## Reproduce",
        "",
        "```",
        "scripts/bench local                      # everything, rewrites this file",
        "scripts/bench local --connections 2000 --no-variants --no-doc   # a quick look",
        'scripts/bench run --url http://127.0.0.1:8080 --secret "$KEFU_JWT_SECRET" \\',
        "    --connections 2000 --rate 1000 --duration 30   # against running nodes",
        "```",
        "",
    ]
    return "\n".join(doc)


def _notes(results: LocalResults) -> list[str]:
    notes = [
        "- **One machine, two cores, shared.** The node, the load generator's worker "
        "processes and (for the baseline) the echo server all run on the same 2 cores, and "
        "the machine is shared with other work, so figures move between runs. The client "
        "side is Python too: each message costs the generator one send and two receives "
        "(ack and push), about as much CPU as it costs the node.",
    ]
    sat = results.saturation
    if sat is not None and sat.steps:
        best = sat.best or sat.steps[0]
        notes.append(
            f"- **At the best held step** ({_num(best.offered)} msg/s offered) the node "
            f"used {best.server_cpu:.0%} of one core (the event loop process with its "
            f"threads plus its SQLite writer process) and the generator {best.client_cpu:.0%} "
            "(summed over its processes). A Python event loop runs on one core: once the "
            "node's loop is near 100% of a core, acks and pushes queue up and p99 grows."
        )
        last = sat.steps[-1]
        if last is not best:
            notes.append(
                f"- **At the step that failed** ({_num(last.offered)} msg/s) the node used "
                f"{last.server_cpu:.0%} and the generator {last.client_cpu:.0%}; reason: "
                f"{why_not(last) or 'none'}."
            )
        notes.append(_cost_line(best, results.echo))
    notes += _store_figures(results.node_metrics)
    notes.append(
        "- **Memory** is RSS, so it includes the Python allocator's free lists and the "
        "arenas the handshakes touched; it is an upper bound for what a connection keeps. "
        "The echo row is bare aiohttp's own cost per socket, the floor for any aiohttp "
        "server."
    )
    notes.append(
        "- **Not measured here**: cross-node delivery (needs the Redis broker), "
        "PostgreSQL, and a real network: loopback has no loss and near-zero RTT."
    )
    return notes
