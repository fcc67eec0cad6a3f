"""``kefu bench desk``: the help desk under load, against nodes it starts itself.

Every measurement runs against a fresh ``kefu serve`` child process (embedded store, a
temporary data directory, :func:`kefu.bench.servers.start_node`), set up over the REST
API with an admin token, and driven by real WebSocket clients in separate processes
(spawned, each with its own uvloop loop). The client processes share one clock
(``time.monotonic``, CLOCK_MONOTONIC, machine-wide), so times taken in different
processes compare.

1. **Assignment burst**: one group, ``agents`` agents (capacity ``capacity`` each) online;
   ``customers`` customers open a conversation each, all at once. Throughput is the
   conversations assigned per second from the first ``open`` sent to the last assignment
   a customer saw (its ``assigned`` system message or a ``conversation`` frame in state
   ``assigned``, whichever came first). Run ``runs`` times on fresh nodes; the median is
   reported. Checked: every conversation assigned exactly once (one ``assigned`` event
   on the customer's side and on exactly one agent's side, the same agent on both), and
   no agent above capacity (the ``load`` of every ``agent`` frame <= capacity).
2. **Churn**: the same desk, but agents ``resolve`` every conversation as soon as it is
   assigned and each customer opens a new conversation as soon as theirs is resolved
   (a closed loop of ``customers`` conversations): sustained assignments per second over
   a few windows, with the same checks.
3. **Queue positions**: one group with ONE agent online at capacity 1 (so the live queue
   holds everyone: with no agent online customers go to the leave-a-message backlog
   instead), ``waiting`` customers queued, then the agent resolves at fixed rates so the
   queue moves. Measured: ``queue_position`` frames received per second, how long after
   a queue move a customer learns their new position, the node's CPU and RSS, and a
   ping probe's round trip (event-loop stalls), for each ``queue_update_interval``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import json
import math
import multiprocessing
import os
import secrets
import time
import traceback
import urllib.request
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Literal, TypeVar
from urllib.parse import quote

import aiohttp
import msgspec

from kefu.auth import issue_token
from kefu.bench.procfs import (
    PROC,
    CpuMeter,
    cpu_seconds,
    machine,
    parse_cpu_ticks,
    rss_kb,
    wait_quiet,
)
from kefu.bench.servers import ServerProcess, start_node
from kefu.bench.stats import Latency, median, merge_counts, source_addresses
from kefu.bench.worker import raise_nofile_limit

Progress = Callable[[str], None]
T = TypeVar("T")

#: The JWT secret of the nodes this run starts (they live only as long as the run).
SECRET = secrets.token_urlsafe(32)

#: Node settings changed from the defaults for every desk run: the per-connection rate
#: limit (20/s) would otherwise throttle the probe's pings and a fast-resolving agent.
NODE_SETTINGS: dict[str, str] = {"rate_per_second": "500", "rate_burst": "1000"}

#: The probe's ping period (seconds).
PROBE_EVERY = 0.02
#: Customers per client process (the open-file limit is per process).
PER_WORKER = 2_500
#: Opens in flight per client process while filling the queue: more would exceed the
#: store's ``max_pending_writes`` and be refused as ``overloaded``.
FILL_CONCURRENCY = 100

TEXT = aiohttp.WSMsgType.TEXT
BINARY = aiohttp.WSMsgType.BINARY
WebSocket = aiohttp.ClientWebSocketResponse[bool]
NAN = math.nan

# -- pure arithmetic and checks (tests/unit/test_bench_desk.py) ---------------------------


@dataclasses.dataclass(slots=True)
class ConvRecord:
    """One conversation as its customer saw it (times are ``time.monotonic()``)."""

    conv: str
    customer: str
    opened_at: float  # the customer sent ``open``
    assigned_at: float = NAN  # first sign of assignment (event or conversation frame)
    assigned_events: int = 0  # ``assigned`` system messages received for it
    agent: str = ""  # the agent named at assignment
    resolved_at: float = NAN
    replied_at: float = NAN  # the reply to ``open`` arrived (the conversation exists)


@dataclasses.dataclass(slots=True)
class AgentRecord:
    """One agent as it saw itself."""

    agent: str
    capacity: int = 0  # from its ``agent`` frames
    max_load: int = 0  # the largest ``load`` of its ``agent`` frames
    frames: int = 0  # ``agent`` frames received
    assigned: dict[str, int] = dataclasses.field(default_factory=dict)  # conv -> events
    resolved: int = 0
    resolve_errors: int = 0


@dataclasses.dataclass(slots=True)
class Verdict:
    """Exactly-once assignment and capacity, over a set of conversations."""

    conversations: int
    assigned: int
    once: int  # assigned exactly once, on both sides, to the same agent
    max_load: int
    capacity: int
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems and self.once == self.conversations


def check_assignments(
    convs: Sequence[ConvRecord], agents: Sequence[AgentRecord], capacity: int
) -> Verdict:
    """Every conversation assigned exactly once (one ``assigned`` event seen by the
    customer, one by exactly one agent, the same agent both sides name) and no agent's
    ``load`` above its capacity. ``capacity`` is the configured one; an agent whose frames
    report another capacity is a problem too."""
    problems: list[str] = []
    holders: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
    for a in agents:
        for conv, events in a.assigned.items():
            holders[conv].append((a.agent, events))
    once = assigned = 0
    bad: collections.Counter[str] = collections.Counter()
    for rec in convs:
        seen = holders.pop(rec.conv, [])
        if not math.isnan(rec.assigned_at):
            assigned += 1
        if math.isnan(rec.assigned_at) and not seen:
            bad["never assigned"] += 1
        elif rec.assigned_events != 1:
            bad[f"customer saw {rec.assigned_events} assigned events"] += 1
        elif len(seen) != 1 or seen[0][1] != 1:
            bad[f"agents saw it {sum(n for _, n in seen)} times"] += 1
        elif seen[0][0] != rec.agent:
            bad["customer and agent disagree on the agent"] += 1
        else:
            once += 1
    if holders:
        bad["assigned but never opened by a customer"] += len(holders)
    problems += [f"{n} conversations: {what}" for what, n in bad.most_common()]
    max_load = max((a.max_load for a in agents), default=0)
    over = [a.agent for a in agents if a.max_load > (a.capacity or capacity)]
    if over:
        problems.append(f"{len(over)} agents above capacity (max load {max_load})")
    wrong = [a.agent for a in agents if a.frames and a.capacity != capacity]
    if wrong:
        problems.append(f"{len(wrong)} agents report a capacity other than {capacity}")
    return Verdict(
        conversations=len(convs),
        assigned=assigned,
        once=once,
        max_load=max_load,
        capacity=capacity,
        problems=problems,
    )


def span_rate(count: int, first: float, last: float) -> float:
    """``count`` events from ``first`` to ``last`` (seconds), per second."""
    span = last - first
    return count / span if count and span > 0 else NAN


def count_between(times: Iterable[float], start: float, end: float) -> int:
    """How many of ``times`` fall in ``[start, end)``."""
    return sum(1 for t in times if start <= t < end)


def position_lags(
    start: Mapping[str, int],
    logs: Mapping[str, tuple[Sequence[float], Sequence[int]]],
    moves: Sequence[float],
    assigned: Mapping[str, float] | None = None,
) -> tuple[list[float], int]:
    """How long after each queue move each waiting customer learned of it.

    ``start`` is each conversation's true live position before the first move, ``moves``
    the times the head of the queue was taken (ascending), ``logs`` each conversation's
    ``queue_position`` frames (times ascending, positions). After move ``i`` (1-based) a
    conversation at ``p`` is at ``p - i``; the lag is the time of its first frame saying
    ``<= p - i`` minus the time of move ``i``. A conversation assigned (at
    ``assigned[conv]``) before it was told learned of the moves then. Returns the lags
    (seconds) and how many (conversation, move) pairs were never told at all."""
    assigned = assigned or {}
    lags: list[float] = []
    missing = 0
    for conv, first in start.items():
        times, positions = logs.get(conv, ((), ()))
        taken = assigned.get(conv, math.inf)
        j = 0
        for i, moved in enumerate(moves, start=1):
            target = first - i
            if target < 1:
                break  # it was assigned itself
            while j < len(positions) and positions[j] > target:
                j += 1
            told = times[j] if j < len(positions) else math.inf
            if min(told, taken) == math.inf:
                missing += 1
            else:
                lags.append(min(told, taken) - moved)
    return lags, missing


def positions_match(truth: Mapping[str, int], seen: Mapping[str, int]) -> tuple[int, int]:
    """(conversations whose last pushed position is the node's, conversations checked)."""
    right = sum(1 for conv, position in truth.items() if seen.get(conv) == position)
    return right, len(truth)


def prom_sum(text: str, name: str) -> float:
    """The sum of every sample of ``name`` (labelled or not) in Prometheus text; NaN if
    there is none."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")):
            with contextlib.suppress(IndexError, ValueError):
                total += float(line.rsplit(" ", 1)[1])
                found = True
    return total if found else NAN


@dataclasses.dataclass(frozen=True, slots=True)
class StoreFigures:
    """What the node's store and desk did between two /metrics texts."""

    commits: float = NAN  # group commits (write transactions)
    jobs: float = NAN  # writes in them
    commit_seconds: float = NAN  # BEGIN to COMMIT, summed
    assignments: float = NAN  # kefu_assignments, every kind

    @classmethod
    def between(cls, before: str, after: str) -> StoreFigures:
        def delta(name: str) -> float:
            return prom_sum(after, name) - prom_sum(before, name)

        return cls(
            commits=delta("kefu_store_batch_size_count"),
            jobs=delta("kefu_store_batch_size_sum"),
            commit_seconds=delta("kefu_store_commit_seconds_sum"),
            assignments=delta("kefu_assignments_total"),
        )

    @property
    def jobs_per_commit(self) -> float:
        return self.jobs / self.commits if self.commits else NAN

    @property
    def ms_per_commit(self) -> float:
        return self.commit_seconds / self.commits * 1000 if self.commits else NAN


def parse_floats(text: str) -> tuple[float, ...]:
    """``"5,20"`` -> ``(5.0, 20.0)``."""
    values = tuple(float(v) for v in text.split(",") if v.strip())
    if not values:
        raise ValueError("expected a comma-separated list of numbers")
    return values


# -- what goes over the pipes ---------------------------------------------------------------

Role = Literal["agent", "customer", "probe"]


@dataclasses.dataclass(frozen=True, slots=True)
class Who:
    user: str
    role: Role
    source: str


@dataclasses.dataclass(frozen=True, slots=True)
class Spec:
    worker: int
    url: str
    secret: str
    group: str
    clients: tuple[Who, ...]
    connect_concurrency: int = 100


@dataclasses.dataclass(frozen=True, slots=True)
class Connect:
    """Open every socket and wait for hello; agents also set their status online."""

    timeout: float


@dataclasses.dataclass(frozen=True, slots=True)
class Mode:
    """What agents do with an assignment: hold it, or resolve it at once."""

    resolve: bool


@dataclasses.dataclass(frozen=True, slots=True)
class Pace:
    """The (first) agent resolves one held conversation every ``1/rate`` s from
    ``start_at`` for ``duration`` s, in the background (answered at once)."""

    rate: float
    start_at: float
    duration: float


@dataclasses.dataclass(frozen=True, slots=True)
class Open:
    """Customers open one conversation each from ``start_at`` (at most ``concurrency``
    unanswered at a time, 0: all at once) and wait until each is assigned (``until``
    "assigned") or assigned or told a live queue position ("placed")."""

    start_at: float
    timeout: float
    until: Literal["assigned", "placed"]
    concurrency: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Churn:
    """Customers open at ``start_at``, and again whenever theirs is resolved, until
    ``until``; then wait at most ``drain`` s for the last ones to be resolved."""

    start_at: float
    until: float
    drain: float


@dataclasses.dataclass(frozen=True, slots=True)
class Snapshot:
    """Agents: the node's live queue (conv -> position); customers: the last position
    pushed to each still-waiting conversation."""

    timeout: float = 30.0


@dataclasses.dataclass(frozen=True, slots=True)
class Collect:
    """Everything recorded; the logs (positions, moves, pings) start over."""


@dataclasses.dataclass(frozen=True, slots=True)
class Close:
    timeout: float = 10.0


Command = Connect | Mode | Pace | Open | Churn | Snapshot | Collect | Close


@dataclasses.dataclass(slots=True)
class Done:
    seconds: float = 0.0
    connected: int = 0
    unfinished: int = 0
    errors: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(slots=True)
class Positions:
    queue: dict[str, int]
    seen: dict[str, int]


@dataclasses.dataclass(slots=True)
class Report:
    convs: list[ConvRecord]
    agents: list[AgentRecord]
    #: conv -> (times, positions) of the queue_position frames since the last Collect.
    positions: dict[str, tuple[list[float], list[int]]]
    moves: list[float]  # when agents saw an assignment, since the last Collect
    resolves: list[float]  # when the pacing agent sent a resolve
    pings: list[tuple[float, float]]  # (sent, round trip) of the probe
    errors: dict[str, int]


@dataclasses.dataclass(slots=True)
class Failed:
    error: str


Result = Done | Positions | Report | Failed

# -- the client processes ---------------------------------------------------------------------


class _Info(msgspec.Struct):
    conv: str
    state: str = ""
    agent: str | None = None


class _Item(msgspec.Struct):
    conv: str
    position: int = 0
    backlog: bool = False


class _Frame(msgspec.Struct):
    """The fields of a server frame the bench reads; the rest are skipped unparsed."""

    op: str
    id: str | int | None = None
    code: str = ""
    conv: str = ""
    type: str = ""
    body: msgspec.Raw = msgspec.Raw()
    position: int = 0
    backlog: bool = False
    conversation: _Info | None = None
    load: int = 0
    capacity: int = 0
    entries: list[_Item] = []


class _EventData(msgspec.Struct):
    agent: str | None = None


class _System(msgspec.Struct):
    event: str = ""
    data: _EventData | None = None


_decode = msgspec.json.Decoder(_Frame).decode
_decode_system = msgspec.json.Decoder(_System).decode
_encode = msgspec.json.encode


class _Client:
    """One socket: a customer, an agent or the probe."""

    def __init__(self, who: Who) -> None:
        self.who = who
        self.ws: WebSocket | None = None
        self.reader: asyncio.Task[None] | None = None
        self.hello: asyncio.Future[None] | None = None
        self.replies: dict[str, asyncio.Future[_Frame]] = {}
        # customers
        self.current = ""  # the conversation of the customer's last open
        self.open_sent = NAN
        self.records: dict[str, ConvRecord] = {}
        self.pos_t: list[float] = []
        self.pos_v: list[int] = []
        self.pos_conv = ""
        self.last_position = -1
        # agents
        self.agent = AgentRecord(who.user)
        self.held: collections.deque[str] = collections.deque()
        self.held_event = asyncio.Event()

    def record(self, conv: str) -> ConvRecord:
        rec = self.records.get(conv)
        if rec is None:
            rec = self.records[conv] = ConvRecord(conv, self.who.user, self.open_sent)
            if not self.current:
                self.current = conv
        return rec


class Fleet:
    """The sockets of one client process and what they do with their frames."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.clients = [_Client(w) for w in spec.clients]
        self.customers = [cl for cl in self.clients if cl.who.role == "customer"]
        self.agents = [cl for cl in self.clients if cl.who.role == "agent"]
        self.probes = [cl for cl in self.clients if cl.who.role == "probe"]
        self.sessions: dict[str, aiohttp.ClientSession] = {}
        self.errors: collections.Counter[str] = collections.Counter()
        self.resolve = False
        self.stopping = False
        self.churn_until = 0.0
        self.until: str = ""
        self.pending: set[_Client] = set()
        self.done: asyncio.Event | None = None
        self.moves: list[float] = []
        self.resolves: list[float] = []
        self.pings: list[tuple[float, float]] = []
        self._ping_sent: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # -- sockets -------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[object, object, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _session(self, source: str) -> aiohttp.ClientSession:
        session = self.sessions.get(source)
        if session is None:
            connector = aiohttp.TCPConnector(local_addr=(source, 0), limit=0)
            session = aiohttp.ClientSession(connector=connector)
            self.sessions[source] = session
        return session

    async def _open_socket(self, client: _Client, timeout: float) -> None:
        who = client.who
        role = "customer" if who.role == "probe" else who.role
        token = issue_token(self.spec.secret, who.user, role, ttl=6 * 3600)
        ws = await self._session(who.source).ws_connect(
            f"{self.spec.url}/ws?user_id={quote(who.user)}&token={token}",
            autoping=True,
            decode_text=False,
            max_msg_size=64 << 20,
            timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=2.0),
        )
        client.ws = ws
        client.hello = asyncio.get_running_loop().create_future()
        client.reader = asyncio.get_running_loop().create_task(self._read(client, ws))
        await asyncio.wait_for(asyncio.shield(client.hello), timeout)
        if who.role == "agent":
            reply = await self._request(client, "s", {"op": "status", "status": "online"}, timeout)
            if reply.op != "agent":
                raise RuntimeError(f"status online answered {reply.op} {reply.code}")

    async def _request(
        self, client: _Client, rid: str, frame: dict[str, object], timeout: float
    ) -> _Frame:
        assert client.ws is not None
        future: asyncio.Future[_Frame] = asyncio.get_running_loop().create_future()
        client.replies[rid] = future
        await client.ws.send_frame(_encode({**frame, "id": rid}), TEXT)
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            client.replies.pop(rid, None)

    async def connect(self, cmd: Connect) -> Done:
        started = time.monotonic()
        gate = asyncio.Semaphore(self.spec.connect_concurrency)

        async def one(client: _Client) -> None:
            async with gate:
                try:
                    await self._open_socket(client, min(30.0, cmd.timeout))
                except (aiohttp.ClientError, OSError, TimeoutError, RuntimeError) as exc:
                    self.errors[f"connect:{type(exc).__name__}"] += 1

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(one(cl) for cl in self.clients)), cmd.timeout)
        for probe in self.probes:
            if probe.ws is not None:
                self._spawn(self._probe(probe))
        up = sum(1 for cl in self.clients if cl.ws is not None and not cl.ws.closed)
        return Done(time.monotonic() - started, up, len(self.clients) - up, self._take_errors())

    async def _read(self, client: _Client, ws: WebSocket) -> None:
        try:
            while True:
                msg = await ws.receive()
                if msg.type is TEXT or msg.type is BINARY:
                    self._on_frame(client, msg.data)
                else:
                    break
        except (aiohttp.ClientError, OSError, RuntimeError) as exc:
            self.errors[f"read:{type(exc).__name__}"] += 1
        if not self.stopping:
            self.errors[f"closed:{ws.close_code}"] += 1

    async def _probe(self, client: _Client) -> None:
        """Ping every PROBE_EVERY s: the round trip shows how long the node's loop stalls."""
        n = 0
        while not self.stopping and client.ws is not None and not client.ws.closed:
            n += 1
            rid = f"p{n}"
            self._ping_sent[rid] = time.monotonic()
            with contextlib.suppress(aiohttp.ClientError, OSError, RuntimeError):
                await client.ws.send_frame(_encode({"op": "ping", "id": rid}), TEXT)
            await asyncio.sleep(PROBE_EVERY)

    # -- frames --------------------------------------------------------------------------

    def _on_frame(self, client: _Client, data: bytes | str) -> None:
        now = time.monotonic()
        try:
            fr = _decode(data)
        except msgspec.DecodeError:
            self.errors["bad_frame_from_server"] += 1
            return
        op = fr.op
        if op == "queue_position":
            client.pos_t.append(now)
            client.pos_v.append(fr.position)
            client.pos_conv = fr.conv
            client.last_position = fr.position
            if fr.position >= 1 and client in self.pending and self.until == "placed":
                self._finished(client)
            return
        if op == "message":
            if fr.type == "system":
                event = _decode_system(fr.body)
                if event.event == "assigned":
                    agent = event.data.agent if event.data is not None else None
                    self._assigned(client, fr.conv, agent or "", now, event=True)
            return
        if isinstance(fr.id, str) and fr.id in client.replies:
            _settle(client.replies[fr.id], fr)
        if op == "conversation" and fr.conversation is not None:
            info = fr.conversation
            if client.who.role == "customer":
                if fr.id == "o":
                    client.current = info.conv
                    client.record(info.conv).replied_at = now
                if info.state == "assigned":
                    self._assigned(client, info.conv, info.agent or "", now, event=False)
                elif info.state == "resolved":
                    self._resolved(client, info.conv, now)
            elif fr.id == "r":
                client.agent.resolved += 1
        elif op == "agent":
            rec = client.agent
            rec.frames += 1
            rec.capacity = fr.capacity
            rec.max_load = max(rec.max_load, fr.load)
        elif op == "pong":
            sent = self._ping_sent.pop(str(fr.id), None)
            if sent is not None:
                self.pings.append((sent, now - sent))
        elif op == "hello":
            _settle(client.hello, None)
        elif op == "error":
            self.errors[fr.code or "error"] += 1
            if fr.id == "r":
                client.agent.resolve_errors += 1
            elif fr.id == "o" and client in self.pending:
                self._finished(client)

    def _assigned(self, client: _Client, conv: str, agent: str, now: float, *, event: bool) -> None:
        if client.who.role == "agent":
            if not event:
                return
            rec = client.agent
            first = conv not in rec.assigned
            rec.assigned[conv] = rec.assigned.get(conv, 0) + 1
            if not first:
                return
            self.moves.append(now)
            if self.resolve:
                self._spawn(self._resolve(client, conv))
            else:
                client.held.append(conv)
                client.held_event.set()
            return
        if client.who.role != "customer":
            return
        conv_rec = client.record(conv)
        if event:
            conv_rec.assigned_events += 1
        if math.isnan(conv_rec.assigned_at):
            conv_rec.assigned_at = now
            conv_rec.agent = agent
        if client in self.pending and conv == client.current:
            self._finished(client)

    def _resolved(self, client: _Client, conv: str, now: float) -> None:
        rec = client.record(conv)
        if not math.isnan(rec.resolved_at):
            return
        rec.resolved_at = now
        if conv != client.current:
            return
        if now < self.churn_until:
            self._spawn(self._send_open(client))
        elif client in self.pending:
            self._finished(client)

    def _finished(self, client: _Client) -> None:
        self.pending.discard(client)
        if not self.pending and self.done is not None:
            self.done.set()

    # -- customers -------------------------------------------------------------------------

    async def _send_open(self, client: _Client) -> None:
        if client.ws is None or client.ws.closed:
            self.errors["open:not_connected"] += 1
            return
        client.current = ""
        client.open_sent = time.monotonic()
        try:
            await client.ws.send_frame(
                _encode({"op": "open", "id": "o", "group": self.spec.group}), TEXT
            )
        except (aiohttp.ClientError, OSError, RuntimeError) as exc:
            self.errors[f"open:{type(exc).__name__}"] += 1

    async def _wait_done(self, timeout: float) -> int:
        if self.pending and self.done is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.done.wait(), timeout)
        return len(self.pending)

    async def open(self, cmd: Open) -> Done:
        self.until = cmd.until
        customers = [cl for cl in self.customers if cl.ws is not None]
        self.pending = set(customers)
        self.done = asyncio.Event()
        await _sleep_until(cmd.start_at)
        started = time.monotonic()
        if cmd.concurrency:
            gate = asyncio.Semaphore(cmd.concurrency)

            async def one(client: _Client) -> None:
                async with gate:
                    future: asyncio.Future[_Frame] = asyncio.get_running_loop().create_future()
                    client.replies["o"] = future
                    await self._send_open(client)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(future, 30.0)
                    client.replies.pop("o", None)

            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(one(cl) for cl in customers)), cmd.timeout)
        else:
            for client in customers:
                await self._send_open(client)
        left = max(0.0, started + cmd.timeout - time.monotonic())
        unfinished = await self._wait_done(left)
        seconds = time.monotonic() - started
        self.until, self.done = "", None
        return Done(seconds, len(customers), unfinished, self._take_errors())

    async def churn(self, cmd: Churn) -> Done:
        customers = [cl for cl in self.customers if cl.ws is not None]
        self.churn_until = cmd.until
        await _sleep_until(cmd.start_at)
        started = time.monotonic()
        for client in customers:
            await self._send_open(client)
        await _sleep_until(cmd.until)
        self.churn_until = 0.0
        self.done = asyncio.Event()
        self.pending = {
            cl
            for cl in customers
            if not cl.current or math.isnan(cl.record(cl.current).resolved_at)
        }
        unfinished = await self._wait_done(cmd.drain)
        self.done = None
        return Done(time.monotonic() - started, len(customers), unfinished, self._take_errors())

    # -- agents ----------------------------------------------------------------------------

    async def _resolve(self, client: _Client, conv: str) -> None:
        if client.ws is None or client.ws.closed:
            self.errors["resolve:not_connected"] += 1
            return
        try:
            await client.ws.send_frame(_encode({"op": "resolve", "id": "r", "conv": conv}), TEXT)
        except (aiohttp.ClientError, OSError, RuntimeError) as exc:
            self.errors[f"resolve:{type(exc).__name__}"] += 1

    def mode(self, cmd: Mode) -> Done:
        self.resolve = cmd.resolve
        if cmd.resolve:
            for client in self.agents:
                while client.held:
                    self._spawn(self._resolve(client, client.held.popleft()))
        return Done()

    def pace(self, cmd: Pace) -> Done:
        if self.agents:
            self._spawn(self._pace(self.agents[0], cmd))
        return Done()

    async def _pace(self, client: _Client, cmd: Pace) -> None:
        """Resolve at a fixed rate (no catching up after waiting for an assignment)."""
        end = cmd.start_at + cmd.duration
        k = 0
        while True:
            due = cmd.start_at + k / cmd.rate
            if due >= end:
                return
            await _sleep_until(due)
            while not client.held:
                client.held_event.clear()
                left = end - time.monotonic()
                if left <= 0:
                    return
                try:
                    await asyncio.wait_for(client.held_event.wait(), left)
                except TimeoutError:
                    return
            conv = client.held.popleft()
            self.resolves.append(time.monotonic())
            await self._resolve(client, conv)
            k = max(k + 1, math.ceil((time.monotonic() - cmd.start_at) * cmd.rate - 1e-9))

    # -- reports ---------------------------------------------------------------------------

    async def snapshot(self, cmd: Snapshot) -> Positions:
        queue: dict[str, int] = {}
        if self.agents and self.agents[0].ws is not None:
            reply = await self._request(
                self.agents[0], "q", {"op": "queue", "group": self.spec.group}, cmd.timeout
            )
            queue = {e.conv: e.position for e in reply.entries if not e.backlog}
        seen = {
            cl.current: cl.last_position
            for cl in self.customers
            if cl.current and math.isnan(cl.record(cl.current).assigned_at)
        }
        return Positions(queue, seen)

    def collect(self) -> Report:
        positions: dict[str, tuple[list[float], list[int]]] = {}
        for cl in self.customers:
            if cl.pos_t:
                positions[cl.pos_conv] = (cl.pos_t, cl.pos_v)
                cl.pos_t, cl.pos_v = [], []
        report = Report(
            convs=[dataclasses.replace(r) for cl in self.customers for r in cl.records.values()],
            agents=[
                dataclasses.replace(cl.agent, assigned=dict(cl.agent.assigned))
                for cl in self.agents
            ],
            positions=positions,
            moves=self.moves,
            resolves=self.resolves,
            pings=self.pings,
            errors=self._take_errors(),
        )
        self.moves, self.resolves, self.pings = [], [], []
        return report

    async def close(self, cmd: Close) -> Done:
        self.stopping = True
        for task in list(self._tasks):
            task.cancel()

        async def one(client: _Client) -> None:
            ws, client.ws = client.ws, None
            if ws is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ws.close(), 2.0)
            if client.reader is not None:
                client.reader.cancel()

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(one(cl) for cl in self.clients)), cmd.timeout)
        for session in self.sessions.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(session.close(), 5.0)
        return Done()

    def _take_errors(self) -> dict[str, int]:
        out = dict(self.errors)
        self.errors.clear()
        return out


def _settle(future: asyncio.Future[T] | None, value: T) -> None:
    if future is not None and not future.done():
        future.set_result(value)


async def _sleep_until(when: float) -> None:
    delay = when - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


def worker_main(pipe: Connection, spec: Spec) -> None:
    """Client process entry point (multiprocessing target)."""
    raise_nofile_limit()
    try:
        import uvloop

        uvloop.run(_serve(pipe, spec))
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(_serve(pipe, spec))


async def _serve(pipe: Connection, spec: Spec) -> None:
    fleet = Fleet(spec)
    loop = asyncio.get_running_loop()
    try:
        while True:
            if not await loop.run_in_executor(None, pipe.poll, 900.0):
                return
            try:
                command: Command = pipe.recv()
            except EOFError:
                return
            pipe.send(await _handle(fleet, command))
            if isinstance(command, Close):
                return
    finally:
        if not fleet.stopping:
            await fleet.close(Close(timeout=5.0))


async def _handle(fleet: Fleet, command: Command) -> Result:
    try:
        if isinstance(command, Connect):
            return await fleet.connect(command)
        if isinstance(command, Mode):
            return fleet.mode(command)
        if isinstance(command, Pace):
            return fleet.pace(command)
        if isinstance(command, Open):
            return await fleet.open(command)
        if isinstance(command, Churn):
            return await fleet.churn(command)
        if isinstance(command, Snapshot):
            return await fleet.snapshot(command)
        if isinstance(command, Collect):
            return fleet.collect()
        return await fleet.close(command)
    except Exception:
        return Failed(traceback.format_exc(limit=5))


# -- the parent: client processes --------------------------------------------------------------

R = TypeVar("R", Done, Positions, Report)


class DeskError(RuntimeError):
    """A client process failed a command, died, or did not answer in time."""


def plan(
    url: str, group: str, agents: Sequence[str], customers: Sequence[str], tag: str
) -> list[Spec]:
    """Process 0 holds the agents and the probe; customers are dealt round-robin to the
    others, PER_WORKER at most each, from loopback source addresses 127.0.0.2, ..."""
    sources = source_addresses(len(agents) + len(customers) + 1)
    first: list[Who] = [Who(a, "agent", sources[i % len(sources)]) for i, a in enumerate(agents)]
    first.append(Who(f"{tag}-probe", "probe", sources[0]))
    count = max(1, math.ceil(len(customers) / PER_WORKER))
    dealt: list[list[Who]] = [[] for _ in range(count)]
    for i, user in enumerate(customers):
        dealt[i % count].append(Who(user, "customer", sources[(i + 1) % len(sources)]))
    return [
        Spec(worker=w, url=url, secret=SECRET, group=group, clients=tuple(clients))
        for w, clients in enumerate([first, *dealt])
    ]


class Clients:
    """The client processes of one measurement, commanded all together or by index."""

    def __init__(self, specs: Sequence[Spec]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.specs = list(specs)
        self._pipes: list[Connection] = []
        self._procs: list[BaseProcess] = []
        for spec in self.specs:
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=worker_main, args=(child, spec), name=f"kefu-bench-desk-{spec.worker}"
            )
            proc.start()
            child.close()
            self._pipes.append(parent)
            self._procs.append(proc)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.pid is not None]

    @property
    def everyone(self) -> list[int]:
        return list(range(len(self._pipes)))

    @property
    def customers(self) -> list[int]:
        return self.everyone[1:]

    def send(self, which: Sequence[int], command: Command) -> None:
        for w in which:
            self._pipes[w].send(command)

    def recv(self, which: Sequence[int], timeout: float, kind: type[R]) -> list[R]:
        deadline = time.monotonic() + timeout
        out: list[R] = []
        for w in which:
            pipe = self._pipes[w]
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise DeskError(f"client process {w} did not answer within {timeout:.0f}s")
            try:
                result = pipe.recv()
            except EOFError as exc:
                raise DeskError(f"client process {w} died") from exc
            if isinstance(result, Failed):
                raise DeskError(f"client process {w} failed:\n{result.error}")
            if not isinstance(result, kind):
                raise DeskError(f"client process {w} answered {type(result).__name__}")
            out.append(result)
        return out

    def call(
        self, which: Sequence[int], command: Command, timeout: float, kind: type[R]
    ) -> list[R]:
        self.send(which, command)
        return self.recv(which, timeout, kind)

    def connect(self, timeout: float) -> Done:
        """Agents first (so the group has someone online), then the customers."""
        parts = self.call([0], Connect(timeout), timeout + 15, Done)
        if self.customers:
            parts += self.call(self.customers, Connect(timeout), timeout + 15, Done)
        return Done(
            seconds=max(p.seconds for p in parts),
            connected=sum(p.connected for p in parts),
            unfinished=sum(p.unfinished for p in parts),
            errors=merge_counts(p.errors for p in parts),
        )

    def collect(self) -> list[Report]:
        return self.call(self.everyone, Collect(), 120, Report)

    def close(self) -> None:
        with contextlib.suppress(DeskError, OSError):
            self.call(self.everyone, Close(), 30, Done)
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        for pipe in self._pipes:
            pipe.close()

    def __enter__(self) -> Clients:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the parent: nodes and their set-up ---------------------------------------------------------


def _post(url: str, path: str, body: dict[str, object], token: str) -> object:
    request = urllib.request.Request(
        f"{url}/api/v1{path}",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def set_up(url: str, group: str, agents: Sequence[str], capacity: int) -> None:
    """The group and its agents, over the REST API as an admin."""
    token = issue_token(SECRET, "boss", "admin")
    _post(url, "/groups", {"id": group, "name": f"bench {group}"}, token)
    for agent in agents:
        body = {"id": agent, "name": agent, "groups": [group], "capacity": capacity}
        _post(url, "/agents", body, token)


def _check_alive(node: ServerProcess) -> None:
    if node.proc.poll() is not None:
        raise RuntimeError(f"the node died during the run:\n{node.tail()}")


def _merge(parts: Iterable[Done]) -> dict[str, int]:
    return merge_counts(p.errors for p in parts)


# -- the measurements -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class DeskOptions:
    customers: int = 400
    agents: int = 50
    capacity: int = 10
    runs: int = 3
    churn_windows: int = 3
    churn_seconds: float = 5.0
    churn_warmup: float = 2.0
    waiting: int = 5_000
    rates: tuple[float, ...] = (5.0, 20.0)
    intervals: tuple[float, ...] = (0.5, 0.1)
    window: float = 10.0
    idle: float = 4.0
    timeout: float = 120.0
    scenarios: tuple[str, ...] = ("burst", "churn", "positions")
    quick: bool = False


QUICK = {
    "customers": 100,
    "agents": 10,
    "runs": 1,
    "churn_windows": 1,
    "churn_seconds": 3.0,
    "churn_warmup": 1.0,
    "waiting": 500,
    "window": 4.0,
    "idle": 2.0,
}


@dataclasses.dataclass(slots=True)
class BurstRun:
    customers: int
    agents: int
    capacity: int
    connected: int
    seconds: float  # first open sent to last assignment seen
    rate: float  # assignments a second over ``seconds``
    wait: Latency  # open sent to assignment seen, per conversation
    reply: Latency  # open sent to its reply (created and queued)
    cpu: Cpu  # from the first open to the last customer done
    store: StoreFigures
    verdict: Verdict
    errors: dict[str, int]

    @property
    def cpu_ms_per_assignment(self) -> float:
        n = self.verdict.assigned
        return self.cpu.node * self.cpu.seconds / n * 1000 if n else NAN


@dataclasses.dataclass(slots=True)
class ChurnWindow:
    seconds: float
    opened: int
    assigned: int
    resolved: int
    wait: Latency
    cpu: Cpu

    @property
    def rate(self) -> float:
        return self.assigned / self.seconds

    @property
    def cpu_ms_per_assignment(self) -> float:
        return self.cpu.node * self.seconds / self.assigned * 1000 if self.assigned else NAN


@dataclasses.dataclass(slots=True)
class ChurnRun:
    customers: int
    agents: int
    capacity: int
    windows: list[ChurnWindow]
    store: StoreFigures  # over the windows
    verdict: Verdict
    unfinished: int
    errors: dict[str, int]

    @property
    def median_rate(self) -> float:
        return median(w.rate for w in self.windows)


@dataclasses.dataclass(slots=True)
class PositionWindow:
    rate: float  # resolves a second asked of the agent (0: nobody moves)
    seconds: float
    waiting: int  # live queue at the start
    moves: int  # assignments the agent saw (each takes the head of the queue)
    resolves: int
    pushes: int  # queue_position frames customers received within the window
    node_pushes: float  # kefu_queue_position_pushes over the window and its drain
    passes: float  # position passes a second (frames a second per waiting customer)
    lag: Latency  # queue move -> the customer's frame saying so
    missing: int  # (customer, move) pairs never told
    cpu: Cpu
    rss_kb: int | None
    ping: Latency  # the probe's round trips within the window
    correct: int  # last pushed position == the node's, after the drain
    checked: int

    @property
    def move_rate(self) -> float:
        return self.moves / self.seconds

    @property
    def push_rate(self) -> float:
        return self.pushes / self.seconds

    @property
    def cpu_us_per_push(self) -> float:
        return self.cpu.node * self.seconds / self.pushes * 1e6 if self.pushes else NAN

    @property
    def cpu_ms_per_pass(self) -> float:
        return self.cpu.node / self.passes * 1000 if self.passes else NAN

    @property
    def cpu_ms_per_move(self) -> float:
        return self.cpu.node * self.seconds / self.moves * 1000 if self.moves else NAN


@dataclasses.dataclass(slots=True)
class PositionRun:
    interval: float
    waiting: int
    connected: int
    connect_seconds: float
    fill_seconds: float
    fill_cpu_s: float
    unplaced: int
    fill_correct: int
    fill_checked: int
    rss_base_kb: int | None
    rss_connected_kb: int | None
    rss_filled_kb: int | None
    windows: list[PositionWindow]
    dropped: float  # kefu_ephemeral_dropped over the run
    errors: dict[str, int]

    @property
    def queue_kb_per_customer(self) -> float:
        """RSS the queued conversations added, per waiting customer (beyond the socket)."""
        a, b = self.rss_connected_kb, self.rss_filled_kb
        return (b - a) / self.waiting if a is not None and b is not None else NAN


@dataclasses.dataclass(slots=True)
class DeskResults:
    options: DeskOptions
    machine: dict[str, str]
    node_settings: dict[str, str]
    started: float
    finished: float = 0.0
    bursts: list[BurstRun] = dataclasses.field(default_factory=list)
    churn: ChurnRun | None = None
    positions: list[PositionRun] = dataclasses.field(default_factory=list)

    @property
    def burst_rate(self) -> float:
        return median(b.rate for b in self.bursts)


def _cpu(pid: int) -> float:
    seconds = cpu_seconds(pid)
    return NAN if seconds is None else seconds


def process_seconds(pid: int) -> float:
    """CPU time of ``pid`` itself (all its threads, not its child processes)."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return NAN
    return parse_cpu_ticks(stat) / os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass(frozen=True, slots=True)
class Cpu:
    """CPU over an interval, in cores (1.0 = one core all the time)."""

    seconds: float
    node: float  # the node process and its children (the SQLite writer process)
    process: float  # the node process alone: its event loop and its threads
    bench: float  # the client processes
    other: float  # everything else on the machine


class Meter:
    def __init__(self, node: int, clients: list[int]) -> None:
        self.node = node
        self.meter = CpuMeter(node, clients)
        self.process0 = process_seconds(node)

    def read(self) -> Cpu:
        wall = max(1e-6, time.monotonic() - self.meter.started)
        process = (process_seconds(self.node) - self.process0) / wall
        node, bench, other, _steal = self.meter.read()
        return Cpu(wall, node, process, bench, other)


def burst(options: DeskOptions, run: int, progress: Progress) -> BurstRun:
    """One assignment burst on a fresh node."""
    tag = f"d{secrets.token_hex(3)}"
    group = "desk"
    agents = [f"{tag}-a{i}" for i in range(options.agents)]
    customers = [f"{tag}-c{i}" for i in range(options.customers)]
    with start_node(SECRET, NODE_SETTINGS) as node:
        set_up(node.url, group, agents, options.capacity)
        with Clients(plan(node.url, group, agents, customers, tag)) as clients:
            up = clients.connect(options.timeout)
            start = time.monotonic() + 0.5
            clients.send(clients.customers, Open(start, options.timeout, "assigned"))
            metrics0 = node.metrics()
            time.sleep(max(0.0, start - time.monotonic()))
            meter = Meter(node.pid, clients.pids)
            done = clients.recv(clients.customers, options.timeout + 30, Done)
            cpu = meter.read()
            store = StoreFigures.between(metrics0, node.metrics())
            reports = clients.collect()
        _check_alive(node)
    convs = [r for rep in reports for r in rep.convs]
    verdict = check_assignments(convs, [a for rep in reports for a in rep.agents], options.capacity)
    assigned = [r.assigned_at for r in convs if not math.isnan(r.assigned_at)]
    first = min((r.opened_at for r in convs), default=NAN)
    last = max(assigned, default=NAN)
    result = BurstRun(
        customers=options.customers,
        agents=options.agents,
        capacity=options.capacity,
        connected=up.connected,
        seconds=last - first,
        rate=span_rate(len(assigned), first, last),
        wait=Latency.of(r.assigned_at - r.opened_at for r in convs if r.agent),
        reply=Latency.of(r.replied_at - r.opened_at for r in convs if r.replied_at > 0),
        cpu=cpu,
        store=store,
        verdict=verdict,
        errors=merge_counts([up.errors, _merge(done), *(rep.errors for rep in reports)]),
    )
    progress(
        f"burst {run}: {verdict.assigned:,}/{options.customers:,} assigned in "
        f"{result.seconds:.2f}s = {result.rate:,.0f}/s; max load {verdict.max_load}/"
        f"{options.capacity}; {'ok' if verdict.ok else '; '.join(verdict.problems)}"
    )
    return result


def churn(options: DeskOptions, progress: Progress) -> ChurnRun:
    """Agents resolve on assignment, customers open again on resolution: windows."""
    tag = f"d{secrets.token_hex(3)}"
    group = "desk"
    agents = [f"{tag}-a{i}" for i in range(options.agents)]
    customers = [f"{tag}-c{i}" for i in range(options.customers)]
    with start_node(SECRET, NODE_SETTINGS) as node:
        set_up(node.url, group, agents, options.capacity)
        with Clients(plan(node.url, group, agents, customers, tag)) as clients:
            up = clients.connect(options.timeout)
            clients.call([0], Mode(resolve=True), 30, Done)
            start = time.monotonic() + 0.5
            edges = [
                start + options.churn_warmup + k * options.churn_seconds
                for k in range(options.churn_windows + 1)
            ]
            drain = 20.0
            clients.send(clients.customers, Churn(start, edges[-1], drain))
            meters: list[Cpu] = []
            metrics: list[str] = []
            for begin, end in itertools.pairwise(edges):
                time.sleep(max(0.0, begin - time.monotonic()))
                if not metrics:
                    metrics.append(node.metrics())
                meter = Meter(node.pid, clients.pids)
                time.sleep(max(0.0, end - time.monotonic()))
                meters.append(meter.read())
            metrics.append(node.metrics())
            done = clients.recv(clients.customers, drain + 60, Done)
            reports = clients.collect()
        _check_alive(node)
    convs = [r for rep in reports for r in rep.convs]
    verdict = check_assignments(convs, [a for rep in reports for a in rep.agents], options.capacity)
    windows = []
    for (begin, end), cpu in zip(itertools.pairwise(edges), meters, strict=True):
        waits = [r.assigned_at - r.opened_at for r in convs if begin <= r.assigned_at < end]
        windows.append(
            ChurnWindow(
                seconds=end - begin,
                opened=count_between((r.opened_at for r in convs), begin, end),
                assigned=len(waits),
                resolved=count_between((r.resolved_at for r in convs), begin, end),
                wait=Latency.of(waits),
                cpu=cpu,
            )
        )
    result = ChurnRun(
        customers=options.customers,
        agents=options.agents,
        capacity=options.capacity,
        windows=windows,
        store=StoreFigures.between(metrics[0], metrics[-1]),
        verdict=verdict,
        unfinished=sum(d.unfinished for d in done),
        errors=merge_counts([up.errors, _merge(done), *(rep.errors for rep in reports)]),
    )
    progress(
        f"churn: {', '.join(f'{w.rate:,.0f}' for w in windows)} assignments/s; "
        f"{verdict.once:,}/{verdict.conversations:,} assigned once; max load "
        f"{verdict.max_load}/{options.capacity}; "
        f"{'ok' if verdict.ok else '; '.join(verdict.problems)}"
    )
    return result


def _settle_node(node: ServerProcess, interval: float) -> None:
    wait_quiet(node.pid, below=0.15, timeout=30.0)
    time.sleep(interval + 0.5)


def positions(options: DeskOptions, interval: float, progress: Progress) -> PositionRun:
    """``waiting`` customers queued behind one agent at capacity 1, then the queue moves."""
    tag = f"d{secrets.token_hex(3)}"
    group = "wait"
    agent = f"{tag}-agent"
    customers = [f"{tag}-c{i}" for i in range(options.waiting)]
    settings = {**NODE_SETTINGS, "queue_update_interval": str(interval)}
    with start_node(SECRET, settings) as node:
        set_up(node.url, group, [agent], 1)
        rss_base = rss_kb(node.pid)
        with Clients(plan(node.url, group, [agent], customers, tag)) as clients:
            up = clients.connect(options.timeout)
            time.sleep(1.0)
            rss_connected = rss_kb(node.pid)
            progress(
                f"positions (interval {interval}s): {up.connected:,} sockets in "
                f"{up.seconds:.1f}s; filling the queue"
            )
            start = time.monotonic() + 0.3
            clients.send(
                clients.customers, Open(start, options.timeout, "placed", FILL_CONCURRENCY)
            )
            time.sleep(max(0.0, start - time.monotonic()))
            cpu0 = _cpu(node.pid)
            filled = clients.recv(clients.customers, options.timeout + 30, Done)
            fill_cpu = _cpu(node.pid) - cpu0
            _settle_node(node, interval)
            rss_filled = rss_kb(node.pid)
            snap = _snapshot(clients)
            fill_right, fill_checked = positions_match(snap.queue, snap.seen)
            progress(
                f"  {len(snap.queue):,} queued in {max(d.seconds for d in filled):.1f}s; "
                f"positions right: {fill_right:,}/{fill_checked:,}"
            )
            clients.collect()  # the fill's frames are not part of any window
            metrics0 = node.metrics()
            truth = snap.queue
            windows = []
            steps = [(0.0, options.idle)] if options.idle > 0 else []
            steps += [(r, options.window) for r in options.rates]
            for rate, seconds in steps:
                window, truth = _window(options, clients, node, interval, rate, seconds, truth)
                windows.append(window)
                progress(
                    f"  resolve {rate:g}/s: {window.move_rate:.1f} moves/s, "
                    f"{window.push_rate:,.0f} pushes/s, node {window.cpu.node:.0%} "
                    f"({window.cpu_us_per_push:,.0f} µs/push), lag p99 {window.lag.p99:,.0f} ms, "
                    f"ping p99 {window.ping.p99:,.0f} ms, right {window.correct:,}/{window.checked:,}"
                )
            dropped = prom_sum(node.metrics(), "kefu_ephemeral_dropped_total") - prom_sum(
                metrics0, "kefu_ephemeral_dropped_total"
            )
            errors = merge_counts(
                [up.errors, _merge(filled), *(r.errors for r in clients.collect())]
            )
        _check_alive(node)
    return PositionRun(
        interval=interval,
        waiting=options.waiting,
        connected=up.connected,
        connect_seconds=up.seconds,
        fill_seconds=max(d.seconds for d in filled),
        fill_cpu_s=fill_cpu,
        unplaced=sum(d.unfinished for d in filled),
        fill_correct=fill_right,
        fill_checked=fill_checked,
        rss_base_kb=rss_base,
        rss_connected_kb=rss_connected,
        rss_filled_kb=rss_filled,
        windows=windows,
        dropped=dropped,
        errors=errors,
    )


def _snapshot(clients: Clients) -> Positions:
    parts = clients.call(clients.everyone, Snapshot(), 60, Positions)
    queue: dict[str, int] = {}
    seen: dict[str, int] = {}
    for p in parts:
        queue.update(p.queue)
        seen.update(p.seen)
    return Positions(queue, seen)


def _window(
    options: DeskOptions,
    clients: Clients,
    node: ServerProcess,
    interval: float,
    rate: float,
    seconds: float,
    truth: dict[str, int],
) -> tuple[PositionWindow, dict[str, int]]:
    """One window at a resolve ``rate``; returns it and the queue after it."""
    pushed0 = prom_sum(node.metrics(), "kefu_queue_position_pushes_total")
    start = time.monotonic() + 0.3
    end = start + seconds
    if rate > 0:
        clients.call([0], Pace(rate, start, seconds), 30, Done)
    time.sleep(max(0.0, start - time.monotonic()))
    meter = Meter(node.pid, clients.pids)
    time.sleep(max(0.0, end - time.monotonic()))
    cpu = meter.read()
    rss = rss_kb(node.pid)
    _settle_node(node, interval)
    reports = clients.collect()
    pushed = prom_sum(node.metrics(), "kefu_queue_position_pushes_total") - pushed0
    snap = _snapshot(clients)
    moves = sorted(t for rep in reports for t in rep.moves)
    logs = {conv: log for rep in reports for conv, log in rep.positions.items()}
    taken = {
        r.conv: r.assigned_at
        for rep in reports
        for r in rep.convs
        if r.conv in truth and not math.isnan(r.assigned_at)
    }
    lags, missing = position_lags(truth, logs, moves, taken)
    in_window = {
        conv: count_between(times, start, end) for conv, (times, _positions) in logs.items()
    }
    still = [in_window.get(conv, 0) for conv in snap.queue]
    right, checked = positions_match(snap.queue, snap.seen)
    window = PositionWindow(
        rate=rate,
        seconds=seconds,
        waiting=len(truth),
        moves=len(moves),
        resolves=sum(len(rep.resolves) for rep in reports),
        pushes=sum(in_window.values()),
        node_pushes=pushed,
        passes=median(float(n) for n in still) / seconds if still else NAN,
        lag=Latency.of(lags),
        missing=missing,
        cpu=cpu,
        rss_kb=rss,
        ping=Latency.of(
            rtt for sent, rtt in (p for rep in reports for p in rep.pings) if start <= sent < end
        ),
        correct=right,
        checked=checked,
    )
    return window, snap.queue


def run_desk(options: DeskOptions, progress: Progress) -> DeskResults:
    results = DeskResults(
        options=options, machine=machine(), node_settings=dict(NODE_SETTINGS), started=time.time()
    )
    if "burst" in options.scenarios:
        progress(
            f"assignment burst: {options.customers:,} customers, {options.agents} agents x "
            f"capacity {options.capacity}, {options.runs} runs"
        )
        for run in range(1, options.runs + 1):
            results.bursts.append(burst(options, run, progress))
    if "churn" in options.scenarios:
        progress(
            f"churn: {options.customers:,} customers reopening, agents resolving on assignment"
        )
        results.churn = churn(options, progress)
    if "positions" in options.scenarios:
        for interval in options.intervals:
            results.positions.append(positions(options, interval, progress))
    results.finished = time.time()
    return results
