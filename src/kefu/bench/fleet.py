"""The client sockets of one worker process and the traffic it drives through them.

Both ends of every pair live in this process, so one ``perf_counter`` clock times each
message from the sender's send to the recipient's receive. Messages are tracked by
``client_msg_id``: ``pending_ack`` and ``pending_push`` hold the send time of each message
still waiting for its ack (sender side) and its push (recipient side).

In ``echo`` mode the sockets talk to :mod:`kefu.bench.echo` instead: there is no hello and
no conversation, and the echoed frame counts as both the ack and the delivery.

Sockets are :class:`kefu.bench.wsclient.WsClient` (a frame costs a callback, not a task
wake-up); a run that offers permessage-deflate uses aiohttp's client instead.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar
from urllib.parse import quote

import aiohttp
import msgspec

from kefu.auth import issue_token
from kefu.bench import commands as c
from kefu.bench.wsclient import WsClient

log = logging.getLogger(__name__)
T = TypeVar("T")

TEXT = aiohttp.WSMsgType.TEXT
BINARY = aiohttp.WSMsgType.BINARY
#: Sender ticks: how often the pacing loop wakes to send what has come due.
TICK = 0.002
#: How far behind schedule the sender may fall before it skips (and counts) messages.
MAX_LAG = 0.25
RECONNECT_TRIES = 3
RECONNECT_BACKOFF = 0.25

WebSocket = aiohttp.ClientWebSocketResponse[bool]
#: What a failed socket operation raises.
SOCKET_ERRORS = (aiohttp.ClientError, OSError, RuntimeError, TimeoutError)


class Socket(Protocol):
    """What the fleet needs of a client WebSocket."""

    @property
    def closed(self) -> bool: ...

    @property
    def close_code(self) -> int | None: ...

    def send(self, data: bytes) -> None:
        """Queue one text frame; ConnectionError once closed."""

    def close(self) -> None: ...


class AiohttpSocket:
    """aiohttp's client WebSocket as a :class:`Socket` (for permessage-deflate runs)."""

    def __init__(
        self,
        ws: WebSocket,
        on_message: Callable[[bytes], None],
        on_close: Callable[[AiohttpSocket], None],
    ) -> None:
        self.ws = ws
        self._tasks: set[asyncio.Task[None]] = set()
        self._spawn(self._read(on_message, on_close))

    @property
    def closed(self) -> bool:
        return self.ws.closed

    @property
    def close_code(self) -> int | None:
        return self.ws.close_code

    def send(self, data: bytes) -> None:
        if self.ws.closed:
            raise ConnectionResetError("the WebSocket is closed")
        self._spawn(self.ws.send_frame(data, TEXT))  # tasks start, and write, in order

    def close(self) -> None:
        self._spawn(self.ws.close())

    def _spawn(self, work: Awaitable[object]) -> None:
        async def run() -> None:
            with contextlib.suppress(*SOCKET_ERRORS):
                await work

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _read(
        self, on_message: Callable[[bytes], None], on_close: Callable[[AiohttpSocket], None]
    ) -> None:
        try:
            while True:
                msg = await self.ws.receive()
                if msg.type is TEXT or msg.type is BINARY:
                    data = msg.data
                    on_message(data.encode() if isinstance(data, str) else data)
                else:
                    break
        except SOCKET_ERRORS:
            pass
        on_close(self)


class _Conversation(msgspec.Struct):
    conv: str


class _Frame(msgspec.Struct):
    """The fields of a server frame the bench reads; the rest are skipped unparsed."""

    op: str
    client_msg_id: str = ""
    code: str = ""
    id: str | int | None = None
    conversation: _Conversation | None = None


_decode = msgspec.json.Decoder(_Frame).decode


class Client:
    """One socket of the fleet."""

    __slots__ = ("conv", "endpoint", "hello", "opened", "pong", "sock", "tries")

    def __init__(self, endpoint: c.Endpoint) -> None:
        self.endpoint = endpoint
        self.sock: Socket | None = None
        self.conv = ""
        self.hello: asyncio.Future[None] | None = None
        self.pong: asyncio.Future[None] | None = None
        self.opened: asyncio.Future[str] | None = None
        self.tries = 0

    @property
    def up(self) -> bool:
        return self.sock is not None and not self.sock.closed


class Fleet:
    def __init__(self, spec: c.WorkerSpec) -> None:
        self.spec = spec
        self.echo = spec.mode == "echo"
        self.pairs = [(Client(p.agent), Client(p.customer)) for p in spec.pairs]
        self.clients = [cl for pair in self.pairs for cl in pair]
        self.sessions: dict[str, aiohttp.ClientSession] = {}
        self.errors: collections.Counter[str] = collections.Counter()
        self.reconnects = 0
        self.stopping = False
        self.pending_ack: dict[str, float] = {}
        self.pending_push: dict[str, float] = {}
        self.ack_latency: list[float] = []
        self.e2e_latency: list[float] = []
        self.window_end = 0.0
        self.acked = self.delivered = self.acked_total = self.delivered_total = 0
        self._ids = itertools.count(1)
        self._drained: asyncio.Event | None = None
        self._pad = "x" * max(1, spec.text_size)

    # -- sockets --------------------------------------------------------------------------

    def _session(self, source: str) -> aiohttp.ClientSession:
        session = self.sessions.get(source)
        if session is None:
            connector = aiohttp.TCPConnector(local_addr=(source, 0), limit=0)
            session = aiohttp.ClientSession(connector=connector)
            self.sessions[source] = session
        return session

    def _url(self, ep: c.Endpoint) -> str:
        if self.echo:
            return f"{ep.url}/echo"
        token = issue_token(self.spec.secret, ep.user, ep.role, ttl=6 * 3600)
        return f"{ep.url}/ws?user_id={quote(ep.user)}&token={token}"

    async def _open_socket(self, client: Client, timeout: float) -> None:
        ep = client.endpoint
        loop = asyncio.get_running_loop()
        client.hello = loop.create_future()
        if self.echo:
            client.hello.set_result(None)

        def on_message(data: bytes) -> None:
            self._on_frame(client, data)

        def on_close(sock: Socket) -> None:
            self._closed(client, sock)

        sock: Socket
        if self.spec.compress:
            ws = await self._session(ep.source).ws_connect(
                self._url(ep),
                compress=self.spec.compress,
                autoping=True,
                decode_text=False,
                max_msg_size=1 << 20,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=2.0),
            )
            sock = AiohttpSocket(ws, on_message, on_close)
        else:
            sock = await WsClient.connect(
                self._url(ep),
                on_message=on_message,
                on_close=on_close,
                local_addr=(ep.source, 0),
                timeout=timeout,
            )
        client.sock = sock
        await asyncio.wait_for(asyncio.shield(client.hello), timeout)

    async def _ping(self, client: Client, timeout: float) -> float:
        """One request/reply round trip (a kefu ping, or an echoed frame)."""
        assert client.sock is not None
        client.pong = asyncio.get_running_loop().create_future()
        started = time.perf_counter()
        client.sock.send(b'{"op":"ping","id":"p"}')
        await asyncio.wait_for(asyncio.shield(client.pong), timeout)
        return time.perf_counter() - started

    async def connect(self, cmd: c.Connect) -> c.ConnectResult:
        started = time.perf_counter()
        gate = asyncio.Semaphore(self.spec.connect_concurrency)
        per_socket = min(30.0, cmd.timeout)

        async def one(client: Client) -> float | None:
            async with gate:
                try:
                    await self._open_socket(client, per_socket)
                    return await self._ping(client, per_socket)
                except SOCKET_ERRORS as exc:
                    self.errors[f"connect:{type(exc).__name__}"] += 1
                    self._drop(client)
                    return None

        nothing: list[float | None] = []
        results = await _bounded(
            asyncio.gather(*(one(cl) for cl in self.clients)), cmd.timeout, nothing
        )
        rtt = [r for r in results if r is not None]
        return c.ConnectResult(
            connected=sum(cl.up for cl in self.clients),
            failed=len(self.clients) - len(rtt),
            seconds=time.perf_counter() - started,
            errors=self._take_errors(),
            rtt=rtt,
        )

    def _drop(self, client: Client) -> None:
        sock, client.sock = client.sock, None
        if sock is not None:
            sock.close()

    def _closed(self, client: Client, sock: Socket) -> None:
        """A socket closed: unless the fleet closed it, count it and bring it back."""
        if self.stopping or client.sock is not sock:
            return
        self.errors[f"closed:{sock.close_code}"] += 1
        client.sock = None
        asyncio.get_running_loop().create_task(self._reconnect(client))

    async def _reconnect(self, client: Client) -> None:
        """Bring a dropped socket back (bounded tries, growing pauses)."""
        while not self.stopping and client.tries < RECONNECT_TRIES:
            await asyncio.sleep(RECONNECT_BACKOFF * 2**client.tries)
            client.tries += 1
            self.reconnects += 1
            try:
                await self._open_socket(client, 10.0)
                return
            except SOCKET_ERRORS as exc:
                self.errors[f"reconnect:{type(exc).__name__}"] += 1
                self._drop(client)

    def _on_frame(self, client: Client, data: bytes) -> None:
        try:
            frame = _decode(data)
        except msgspec.DecodeError:
            self.errors["bad_frame_from_server"] += 1
            return
        op = frame.op
        now = time.perf_counter()
        if op == "message" or (op == "send" and self.echo):
            self._delivered(frame.client_msg_id, now)
            if op == "message":
                return
        if op == "ack" or op == "send":
            sent = self.pending_ack.pop(frame.client_msg_id, None)
            if sent is not None:
                self.ack_latency.append(now - sent)
                self.acked_total += 1
                if now <= self.window_end:
                    self.acked += 1
                if self._drained is not None:
                    self._check_drained()
        elif op == "error":
            self.errors[frame.code or "error"] += 1
            if isinstance(frame.id, str):
                self.pending_ack.pop(frame.id, None)
                self.pending_push.pop(frame.id, None)
                if self._drained is not None:
                    self._check_drained()
        elif op == "hello":
            _settle(client.hello, None)
        elif op == "pong" or op == "ping":
            _settle(client.pong, None)
        elif op == "conversation" and frame.id == "o" and frame.conversation is not None:
            _settle(client.opened, frame.conversation.conv)

    def _delivered(self, cmid: str, now: float) -> None:
        sent = self.pending_push.pop(cmid, None)
        if sent is not None:
            self.e2e_latency.append(now - sent)
            self.delivered_total += 1
            if now <= self.window_end:
                self.delivered += 1
            if self._drained is not None:
                self._check_drained()

    def _check_drained(self) -> None:
        if not self.pending_ack and not self.pending_push and self._drained is not None:
            self._drained.set()

    # -- conversations --------------------------------------------------------------------

    async def open(self, cmd: c.Open) -> c.OpenResult:
        started = time.perf_counter()
        if self.echo:
            for agent, customer in self.pairs:
                agent.conv = customer.conv = "echo"
            return c.OpenResult(len(self.pairs), 0, 0.0, {})
        gate = asyncio.Semaphore(self.spec.connect_concurrency)

        async def one(agent: Client, customer: Client) -> bool:
            if agent.sock is None or not customer.up:
                self.errors["open:not_connected"] += 1
                return False
            async with gate:
                agent.opened = asyncio.get_running_loop().create_future()
                frame = msgspec.json.encode(
                    {"op": "open", "id": "o", "customer_id": customer.endpoint.user}
                )
                try:
                    agent.sock.send(frame)
                    conv = await asyncio.wait_for(asyncio.shield(agent.opened), 30.0)
                except SOCKET_ERRORS as exc:
                    self.errors[f"open:{type(exc).__name__}"] += 1
                    return False
                agent.conv = customer.conv = conv
                return True

        results = await _bounded(
            asyncio.gather(*(one(a, cu) for a, cu in self.pairs)), cmd.timeout, [False]
        )
        opened = sum(1 for agent, _ in self.pairs if agent.conv) if not results else sum(results)
        return c.OpenResult(
            opened=opened,
            failed=len(self.pairs) - opened,
            seconds=time.perf_counter() - started,
            errors=self._take_errors(),
        )

    # -- traffic --------------------------------------------------------------------------

    def _senders(self) -> list[Client]:
        """Every pair's agent, then every pair's customer: consecutive sends hit different
        sockets and conversations, and the two sides of a conversation send half a round
        apart (0.6 s with 3,000 pairs at 5,000 msg/s), as people in a chat take turns.
        Sent back to back, they would race for the conversation's row on two nodes in
        every round: a pattern no chat produces."""
        return [cl for side in (0, 1) for pair in self.pairs if (cl := pair[side]).conv]

    def _frame(self, client: Client) -> tuple[str, bytes]:
        cmid = f"{self.spec.tag}{self.spec.worker}.{next(self._ids)}"
        text = (
            f'{{"op":"send","id":"{cmid}","conv":"{client.conv}","client_msg_id":"{cmid}",'
            f'"type":"text","body":{{"text":"{self._pad}"}}}}'
        )
        return cmid, text.encode()

    async def run(self, cmd: c.Run) -> c.StepResult:
        senders = self._senders()
        self.ack_latency, self.e2e_latency = [], []
        self.acked = self.delivered = self.acked_total = self.delivered_total = 0
        reconnects = self.reconnects
        started = time.perf_counter()
        self.window_end = started + cmd.duration
        sent = skipped = 0
        if senders and cmd.rate > 0:
            sent, skipped = await self._pace(senders, cmd.rate, started, cmd.duration)
        if self.pending_ack or self.pending_push:
            self._drained = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), cmd.drain)
            self._drained = None
        unacked, undelivered = len(self.pending_ack), len(self.pending_push)
        if unacked:
            self.errors["no_ack_in_time"] += unacked
        if undelivered:
            self.errors["no_push_in_time"] += undelivered
        self.pending_ack.clear()
        self.pending_push.clear()
        return c.StepResult(
            duration=cmd.duration,
            sent=sent,
            skipped=skipped,
            acked=self.acked,
            delivered=self.delivered,
            acked_total=self.acked_total,
            delivered_total=self.delivered_total,
            unacked=unacked,
            undelivered=undelivered,
            ack_latency=self.ack_latency,
            e2e_latency=self.e2e_latency,
            errors=self._take_errors(),
            reconnects=self.reconnects - reconnects,
        )

    async def _pace(
        self, senders: list[Client], rate: float, started: float, duration: float
    ) -> tuple[int, int]:
        """Send message k at ``started + k / rate``, round-robin over ``senders``."""
        count = len(senders)
        sent = skipped = k = 0
        max_lag = max(1, int(rate * MAX_LAG))
        pending_ack, pending_push = self.pending_ack, self.pending_push
        while True:
            elapsed = time.perf_counter() - started
            if elapsed >= duration:
                break
            due = int(elapsed * rate) + 1
            if due - k > max_lag:  # the generator fell behind: skip, do not burst
                skipped += due - k - max_lag
                k = due - max_lag
            while k < due:
                client = senders[k % count]
                k += 1
                sock = client.sock
                if sock is None or sock.closed:
                    self.errors["send:not_connected"] += 1
                    continue
                cmid, frame = self._frame(client)
                now = time.perf_counter()
                pending_ack[cmid] = now
                pending_push[cmid] = now
                try:
                    sock.send(frame)
                except SOCKET_ERRORS as exc:
                    self.errors[f"send:{type(exc).__name__}"] += 1
                    pending_ack.pop(cmid, None)
                    pending_push.pop(cmid, None)
                    continue
                sent += 1
            await asyncio.sleep(TICK)
        return sent, skipped

    # -- the end --------------------------------------------------------------------------

    async def close(self, cmd: c.Close) -> c.Closed:
        self.stopping = True
        up = [cl for cl in self.clients if cl.sock is not None]
        for client in up:
            self._drop(client)
        await asyncio.sleep(0.1)  # let the close frames go out
        for session in self.sessions.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(session.close(), 5.0)
        return c.Closed(closed=len(up))

    def _take_errors(self) -> dict[str, int]:
        out = dict(self.errors)
        self.errors.clear()
        return out


def _settle(future: asyncio.Future[T] | None, value: T) -> None:
    if future is not None and not future.done():
        future.set_result(value)


async def _bounded(work: Awaitable[list[T]], timeout: float, fallback: list[T]) -> list[T]:
    """Await ``work`` at most ``timeout`` seconds; on timeout return ``fallback``."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.wait_for(task, timeout)
    except TimeoutError:
        return fallback
