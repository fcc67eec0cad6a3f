"""The figures as a terminal table and as docs/benchmarks.md."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kefu.bench.desk import (
    FILL_CONCURRENCY,
    PROBE_EVERY,
    DeskResults,
    StoreFigures,
    Verdict,
)
from kefu.bench.scenarios import (
    HOLD_P99_MS,
    HOLD_SHARE,
    Capacity,
    Opened,
    Saturation,
    Sustained,
    why_not,
)
from kefu.bench.stats import Latency, prom_value
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


def markdown(results: LocalResults, notes: str = "", desk: str = "") -> str:
    """docs/benchmarks.md: the figures of ``results``, the kept ``notes`` and the kept
    help-desk section ``desk`` (see :func:`kept_desk`)."""
    opts = results.options
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(results.started))
    minutes = (results.finished - results.started) / 60
    settings = ", ".join(f"`{k}={v}`" for k, v in results.node_settings.items()) or "none"
    doc = [
        "# Benchmarks",
        "",
        f"Figures from `scripts/bench local` (`kefu bench local`), run {when}, "
        f"{minutes:.0f} minutes. Each run rewrites this file except the hand-written "
        "Findings at the end and the sections the other modes write (help desk, cluster).",
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
        "spawned), each with its own uvloop event loop and the minimal WebSocket client "
        "`kefu.bench.wsclient` (frames parsed in a protocol callback, one write per send; "
        "aiohttp's client when the run offers permessage-deflate); "
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
    if desk.strip():
        doc += ["", desk.strip()]
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
        "scripts/bench desk                       # the help desk; rewrites its section only",
        "scripts/bench cluster                    # Redis + PostgreSQL + 3 nodes; its section",
        "scripts/bench cluster --connections      # 6 nodes, up to 150,000 connections",
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
        "- **Not measured here**: cross-node delivery and PostgreSQL (see the Cluster "
        "sections, `kefu bench cluster`), and a real network: loopback has no loss and "
        "near-zero RTT."
    )
    return notes


# -- kefu bench desk ----------------------------------------------------------------------

DESK_BEGIN = "<!-- help desk: written by `kefu bench desk`, kept by `kefu bench local` -->"
DESK_END = "<!-- /help desk -->"
FINDINGS_HEADING = "## Findings"


CLUSTER_BEGIN = "<!-- cluster: written by `kefu bench cluster`, kept by the other modes -->"
CLUSTER_END = "<!-- /cluster -->"
CAPACITY_BEGIN = (
    "<!-- cluster capacity: written by `kefu bench cluster --connections`, kept by the "
    "other modes -->"
)
CAPACITY_END = "<!-- /cluster capacity -->"
#: The sections one mode writes and every other mode keeps, in the doc's order.
KEPT_SECTIONS = (
    (DESK_BEGIN, DESK_END),
    (CLUSTER_BEGIN, CLUSTER_END),
    (CAPACITY_BEGIN, CAPACITY_END),
)


def kept_section(previous: str, begin: str, end: str) -> str:
    """The section between the markers ``begin`` and ``end`` of an earlier
    docs/benchmarks.md, markers included ('' if none)."""
    start, stop = previous.find(begin), previous.find(end)
    if start < 0 or stop < start:
        return ""
    return previous[start : stop + len(end)]


def kept_desk(previous: str) -> str:
    """The help-desk section of an earlier docs/benchmarks.md, markers included ('' if
    none)."""
    return kept_section(previous, DESK_BEGIN, DESK_END)


def kept_sections(previous: str) -> str:
    """Every section of an earlier doc that another mode wrote (:data:`KEPT_SECTIONS`),
    for ``kefu bench local`` to keep."""
    found = (kept_section(previous, begin, end) for begin, end in KEPT_SECTIONS)
    return "\n\n".join(section for section in found if section)


def splice_desk(doc: str, section: str) -> str:
    """``doc`` with its help-desk section replaced by ``section`` (which carries the
    markers); a doc without one gets it before its Findings, else at its end. Nothing else
    of ``doc`` changes."""
    return splice_section(doc, DESK_BEGIN, DESK_END, section)


def splice_section(doc: str, begin: str, end: str, section: str) -> str:
    """``doc`` with its section between ``begin`` and ``end`` replaced by ``section``
    (which carries those markers); a doc without one gets it before its Findings, else at
    its end. Nothing else of ``doc`` changes."""
    section = section.strip()
    old = kept_section(doc, begin, end)
    if old:
        return doc.replace(old, section, 1)
    at = doc.find("\n" + FINDINGS_HEADING + "\n")
    if at >= 0:
        return doc[: at + 1] + section + "\n\n" + doc[at + 1 :]
    if not doc.strip():
        return "# Benchmarks\n\n" + section + "\n"
    return doc.rstrip("\n") + "\n\n" + section + "\n"


def _ms(latency: Latency, which: str) -> str:
    return _num(getattr(latency, which), 1)


def _mib(kb: int | None) -> str:
    return "-" if kb is None else f"{kb / 1024:,.1f}"


BURST_HEADERS = (
    "run",
    "customers",
    "agents x capacity",
    "assigned",
    "first open to last assigned s",
    "assignments/s",
    "open→reply p50 ms",
    "p99 ms",
    "open→assigned p50 ms",
    "p99 ms",
    "max ms",
    "node CPU",
    "of which node process",
    "node CPU ms/assignment",
    "other CPU",
    "store commits (writes each, ms each)",
    "max load",
    "assigned exactly once",
    "errors",
)


def _burst_rows(results: DeskResults) -> list[list[str]]:
    return [
        [
            str(i),
            f"{b.customers:,}",
            f"{b.agents} x {b.capacity}",
            f"{b.verdict.assigned:,}",
            _num(b.seconds, 2),
            _num(b.rate),
            _ms(b.reply, "p50"),
            _ms(b.reply, "p99"),
            _ms(b.wait, "p50"),
            _ms(b.wait, "p99"),
            _ms(b.wait, "max"),
            _pct(b.cpu.node),
            _pct(b.cpu.process),
            _num(b.cpu_ms_per_assignment, 2),
            _pct(b.cpu.other),
            _store(b.store),
            f"{b.verdict.max_load}/{b.capacity}",
            _verdict(b.verdict),
            _errors(b.errors),
        ]
        for i, b in enumerate(results.bursts, start=1)
    ]


def _store(store: StoreFigures) -> str:
    return (
        f"{_num(store.commits)} ({_num(store.jobs_per_commit, 1)}, "
        f"{_num(store.ms_per_commit, 1)} ms)"
    )


def _verdict(verdict: Verdict) -> str:
    text = f"{verdict.once:,}/{verdict.conversations:,}"
    return text if verdict.ok else text + " (" + "; ".join(verdict.problems) + ")"


CHURN_HEADERS = (
    "window",
    "seconds",
    "opened/s",
    "assigned/s",
    "resolved/s",
    "open→assigned p50 ms",
    "p99 ms",
    "node CPU",
    "of which node process",
    "bench CPU",
    "other CPU",
    "node CPU ms/assignment",
)


def _churn_rows(results: DeskResults) -> list[list[str]]:
    if results.churn is None:
        return []
    return [
        [
            str(i),
            _num(w.seconds, 1),
            _num(w.opened / w.seconds),
            _num(w.rate),
            _num(w.resolved / w.seconds),
            _ms(w.wait, "p50"),
            _ms(w.wait, "p99"),
            _pct(w.cpu.node),
            _pct(w.cpu.process),
            _pct(w.cpu.bench),
            _pct(w.cpu.other),
            _num(w.cpu_ms_per_assignment, 2),
        ]
        for i, w in enumerate(results.churn.windows, start=1)
    ]


FILL_HEADERS = (
    "queue_update_interval s",
    "customers connected",
    "connect s",
    "queued in s",
    "node CPU s (queueing)",
    "RSS idle MiB",
    "RSS connected MiB",
    "RSS queued MiB",
    "KiB per queued conversation",
    "positions right after queueing",
    "position frames dropped (slow readers)",
    "errors",
)


def _fill_rows(results: DeskResults) -> list[list[str]]:
    return [
        [
            f"{p.interval:g}",
            f"{p.connected - 2:,}/{p.waiting:,}",  # minus the agent and the probe
            _num(p.connect_seconds, 1),
            _num(p.fill_seconds, 1),
            _num(p.fill_cpu_s, 1),
            _mib(p.rss_base_kb),
            _mib(p.rss_connected_kb),
            _mib(p.rss_filled_kb),
            _num(p.queue_kb_per_customer, 1),
            f"{p.fill_correct:,}/{p.fill_checked:,}",
            _num(p.dropped),
            _errors(p.errors),
        ]
        for p in results.positions
    ]


POSITION_HEADERS = (
    "queue_update_interval s",
    "resolves/s asked",
    "waiting",
    "queue moves/s",
    "position pushes/s",
    "passes/s",
    "lag p50 ms",
    "lag p99 ms",
    "lag max ms",
    "node CPU",
    "of which node process",
    "node µs/push",
    "node ms/pass",
    "node ms/move",
    "bench CPU",
    "other CPU",
    "ping p50 ms",
    "ping p99 ms",
    "ping max ms",
    "node RSS MiB",
    "positions right after",
)


def _position_rows(results: DeskResults) -> list[list[str]]:
    rows = []
    for p in results.positions:
        for w in p.windows:
            lag = "-" if not w.moves else None
            rows.append(
                [
                    f"{p.interval:g}",
                    f"{w.rate:g}" if w.rate else "0 (idle)",
                    f"{w.waiting:,}",
                    _num(w.move_rate, 1),
                    _num(w.push_rate),
                    _num(w.passes, 2),
                    lag or _ms(w.lag, "p50"),
                    lag or _ms(w.lag, "p99"),
                    lag or _ms(w.lag, "max"),
                    _pct(w.cpu.node),
                    _pct(w.cpu.process),
                    _num(w.cpu_us_per_push, 1),
                    _num(w.cpu_ms_per_pass, 0),
                    _num(w.cpu_ms_per_move, 1),
                    _pct(w.cpu.bench),
                    _pct(w.cpu.other),
                    _ms(w.ping, "p50"),
                    _ms(w.ping, "p99"),
                    _ms(w.ping, "max"),
                    _mib(w.rss_kb),
                    f"{w.correct:,}/{w.checked:,}"
                    + (f" ({w.missing:,} moves never told)" if w.missing else ""),
                ]
            )
    return rows


def desk_text(results: DeskResults) -> str:
    parts = []
    if results.bursts:
        parts.append(
            f"assignment burst (median {_num(results.burst_rate)} assignments/s)\n"
            + text_table(BURST_HEADERS, _burst_rows(results))
        )
    if results.churn is not None:
        parts.append(
            f"sustained, resolve on assignment (median {_num(results.churn.median_rate)}"
            " assignments/s)\n"
            + text_table(CHURN_HEADERS, _churn_rows(results))
            + f"\nstore over the windows: {_store(results.churn.store)} commits for "
            f"{_num(results.churn.store.assignments)} assignments; assigned once "
            f"{_verdict(results.churn.verdict)}"
        )
    if results.positions:
        parts.append("queueing\n" + text_table(FILL_HEADERS, _fill_rows(results)))
        parts.append("queue positions\n" + text_table(POSITION_HEADERS, _position_rows(results)))
    return "\n\n".join(parts)


def desk_markdown(results: DeskResults) -> str:
    """The "Help desk" section of docs/benchmarks.md, between its markers."""
    opts = results.options
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(results.started))
    minutes = (results.finished - results.started) / 60
    m = results.machine
    settings = ", ".join(f"`{k}={v}`" for k, v in results.node_settings.items()) or "none"
    doc = [
        DESK_BEGIN,
        "## Help desk",
        "",
        f"Figures from `scripts/bench desk{' --quick' if opts.quick else ''}` "
        f"(`kefu bench desk`), run {when}, {minutes:.1f} minutes, on "
        f"{m.get('cpus (nproc)', '?')} cpus ({m.get('cpu model', '?')}), Python "
        f"{m.get('python', '?')}. `kefu bench desk` rewrites this section only; "
        "`kefu bench local` keeps it.",
        "",
        "### Method",
        "",
        "- **Node**: a fresh `kefu serve` per measurement (embedded store and routing, a "
        "temporary data directory, SQLite `synchronous=FULL`), set up over the REST API "
        "(`POST /api/v1/groups`, `POST /api/v1/agents`) with an admin token; settings "
        f"changed from the defaults: {settings} (the per-connection rate limit would "
        "otherwise throttle the probe's pings), and `queue_update_interval` where a table "
        "says so.",
        "- **Clients**: real WebSocket clients (aiohttp on uvloop) in separate processes: "
        "one for the agents and a ping probe, one per 2,500 customers; sockets bound to "
        "127.0.0.2, 127.0.0.3, ... Agents send `status` online before anything starts. "
        "All client processes time with `time.monotonic()` (one machine-wide clock).",
        f"- **Assignment burst**: {opts.agents} agents, capacity {opts.capacity} each, "
        f"online; {opts.customers:,} customers send `open` all at once. Throughput is the "
        "conversations assigned from the first `open` sent to the last assignment a "
        "customer saw (its `assigned` system message, or a `conversation` frame in state "
        "`assigned`, whichever came first), per second; "
        f"{opts.runs} run{'s' if opts.runs != 1 else ''} on fresh nodes, median reported. "
        "Checked: every conversation assigned exactly once (one `assigned` event at the "
        "customer and at exactly one agent, both naming the same agent) and every `agent` "
        "frame's `load` <= its capacity.",
        f"- **Sustained (resolve on assignment)**: the same desk, but each agent sends "
        "`resolve` as soon as it sees an assignment and each customer sends `open` again "
        f"as soon as its conversation is resolved: a closed loop of {opts.customers:,} "
        f"conversations. {opts.churn_windows} window{'s' if opts.churn_windows != 1 else ''}"
        f" of {opts.churn_seconds:g} s after {opts.churn_warmup:g} s of warm-up; same checks "
        "over every conversation of the run. One cycle is an open (conversation created, "
        "`queued` system message), an assignment and a resolution: three commits, six "
        "pushes or so.",
        f"- **Queue positions**: one group with ONE agent online at capacity 1, so the live "
        f"queue holds everyone ({opts.waiting:,} customers; with no agent online they would "
        "go to the leave-a-message backlog and get one position-0 push each). Customers "
        f"open with at most {FILL_CONCURRENCY} opens in flight per client process, so the "
        "store's `max_pending_writes` does not refuse them. Then windows of "
        f"{opts.window:g} s (an idle one of {opts.idle:g} s first) in which the agent "
        "resolves at a fixed rate (no catching up), so the head of the queue is assigned "
        "and everyone behind moves up. *Position pushes/s*: `queue_position` frames the "
        "customers received in the window. *Passes/s*: frames per still-waiting customer "
        "per second (each pass of the pusher tells everyone whose position changed). "
        "*Lag*: from the agent seeing an assignment (a queue move) to each waiting "
        "customer's first frame with its new position or better. *Node CPU*: "
        "utime+stime of the node and its writer process over the window, per core; "
        "per push and per move are that CPU time divided by pushes and moves. *Ping*: a "
        f"probe socket sends `ping` every {PROBE_EVERY * 1000:.0f} ms; its round trip shows "
        "how long the node's event loop stalls. *Positions right*: after each window and "
        "a drain, each waiting customer's last pushed position compared with the node's "
        "own queue (the `queue` op).",
    ]
    if results.bursts:
        doc += [
            "",
            "### Assignment throughput: burst",
            "",
            md_table(BURST_HEADERS, _burst_rows(results)),
            "",
            f"Median of {len(results.bursts)}: **{_num(results.burst_rate)} "
            f"assignments/s** with {opts.agents} agents online.",
        ]
    if results.churn is not None:
        c = results.churn
        doc += [
            "",
            "### Assignment throughput: sustained, agents resolve on assignment",
            "",
            md_table(CHURN_HEADERS, _churn_rows(results)),
            "",
            f"Median: **{_num(c.median_rate)} assignments/s** sustained ({c.customers:,} "
            f"customers, {c.agents} agents x {c.capacity}); assigned exactly once "
            f"{_verdict(c.verdict)}, max load {c.verdict.max_load}/{c.capacity}, "
            f"errors {_errors(c.errors)}. Store over the windows: {_store(c.store)} "
            f"commits for {_num(c.store.assignments)} assignments.",
        ]
    if results.positions:
        doc += [
            "",
            f"### Queue positions with {opts.waiting:,} waiting",
            "",
            md_table(FILL_HEADERS, _fill_rows(results)),
            "",
            md_table(POSITION_HEADERS, _position_rows(results)),
        ]
    doc += ["", "### Reproduce", "", "```"]
    doc += [
        "scripts/bench desk                 # everything (~5 minutes), rewrites this section",
        "scripts/bench desk --quick --no-doc   # a smoke run",
        "scripts/bench desk --only positions --waiting 2000 --intervals 0.5 --no-doc",
        "```",
        DESK_END,
    ]
    return "\n".join(doc)
