"""The Kefu Python client: one user's connection that survives disconnects.

* :meth:`Client.send` retries under the same ``client_msg_id`` until the server acks it
  (the server stores a message once however often it is resent).
* The connection re-opens by itself with exponential backoff and jitter, unless the
  server closed it with a code that forbids reconnecting (4500-4999, or 1008/1009...).
* After every (re)connect it lists the user's conversations and syncs each one from the
  last seq seen, so a push missed while away is fetched, never lost.
* :meth:`Client.messages` yields every message of every conversation exactly once and in
  seq order per conversation (the client's own messages included, once acked): pushes,
  sync pages and acks are deduplicated by (conversation, seq), and a gap in the seqs
  triggers a sync.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import msgspec

from kefu.errors import (
    ConnectionClosed,
    ErrorCode,
    RemoteError,
    should_reconnect,
)
from kefu.protocol import frames as f
from kefu.protocol.client import decode_event, encode_request

log = logging.getLogger(__name__)

TokenSource = str | Callable[[], Awaitable[str]]
Reply = (
    f.Ack
    | f.Messages
    | f.Ok
    | f.Pong
    | f.Conversation
    | f.Conversations
    | f.AgentInfo
    | f.Queue
    | f.Canned
)

_SEND_TYPES = {"text", "image", "order_card", "listing_card", "note"}


class Backoff:
    """Exponential backoff with jitter: a random delay in [d/2, d], d doubling to ``cap``."""

    def __init__(self, initial: float = 0.2, cap: float = 10.0) -> None:
        self.initial = initial
        self.cap = cap
        self.attempt = 0

    def next(self) -> float:
        ceiling = min(self.cap, self.initial * (2**self.attempt))
        self.attempt += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0


class Client:
    """A user's connection to a Kefu node."""

    def __init__(
        self,
        url: str,
        user_id: str,
        token: TokenSource,
        *,
        reconnect: bool = True,
        backoff: Backoff | None = None,
        request_timeout: float = 10.0,
        send_attempts: int = 20,
        compress: bool = False,
        heartbeat: float | None = 20.0,
        max_events: int = 1000,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.user_id = user_id
        self._token = token
        self.reconnect = reconnect
        self.backoff = backoff or Backoff()
        self.request_timeout = request_timeout
        self.send_attempts = send_attempts
        self.compress = compress
        #: Seconds between WebSocket pings; a connection without a pong in half of it is
        #: considered dead and re-opened (a black-holed path never says goodbye).
        self.heartbeat = heartbeat
        self._http = session
        self._own_http = session is None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        self._connected = asyncio.Event()
        self._closed = False
        self._fatal: ConnectionClosed | None = None
        self._runner: asyncio.Task[None] | None = None
        self._waiters: set[asyncio.Future[None]] = set()
        self._syncing: dict[str, asyncio.Task[None]] = {}
        self._ahead: dict[str, dict[int, f.Message]] = {}
        self._inbox: asyncio.Queue[f.Message | None] = asyncio.Queue()
        #: Pushes other than messages (typing, read receipts, notices...), newest kept.
        self.events: asyncio.Queue[f.ServerEvent] = asyncio.Queue(maxsize=max_events)
        #: Highest seq per conversation up to which every message has been delivered.
        self.last_seq: dict[str, int] = {}
        self.hello: f.Hello | None = None
        self.reconnects = 0
        self.close_codes: list[int | None] = []

    # -- lifecycle ------------------------------------------------------------------------

    async def connect(self) -> None:
        """Open the connection (first attempt raises on failure) and start the runner."""
        if self._http is None:
            self._http = aiohttp.ClientSession()
        await self._open()
        self._runner = asyncio.get_running_loop().create_task(self._run())
        self._runner.add_done_callback(self._runner_done)
        await self._resume()

    def _runner_done(self, task: asyncio.Task[None]) -> None:
        """However the runner ends, waiters and readers of messages() are released."""
        if not task.cancelled() and task.exception() is not None:
            log.error("connection runner failed: %r", task.exception())
            self._fatal = self._fatal or ConnectionClosed(
                None, f"client failed: {task.exception()}"
            )
        self._fail_pending(self._fatal or ConnectionClosed(None, "client closed"))
        self._inbox.put_nowait(None)

    async def close(self) -> None:
        self._closed = True
        if self._ws is not None:
            await self._ws.close()
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        for task in list(self._syncing.values()):
            task.cancel()
        self._fail_pending(ConnectionClosed(None, "client closed"))
        self._inbox.put_nowait(None)
        if self._own_http and self._http is not None:
            await self._http.close()

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _token_value(self) -> str:
        return self._token if isinstance(self._token, str) else await self._token()

    async def _open(self) -> None:
        assert self._http is not None
        token = await self._token_value()
        ws = await self._http.ws_connect(
            f"{self.url}/ws",
            params={"user_id": self.user_id},
            headers={"Authorization": f"Bearer {token}"},
            compress=15 if self.compress else 0,
            heartbeat=self.heartbeat,
            autoping=True,
        )
        try:
            event = await self._hello(ws)
        except BaseException:
            await ws.close()
            raise
        self.hello = event
        self._ws = ws
        self._connected.set()
        self._wake()

    async def _hello(self, ws: aiohttp.ClientWebSocketResponse) -> f.Hello:
        """The server's first frame: hello, or the error that precedes its close."""
        msg = await ws.receive(timeout=self.request_timeout)
        if msg.type is not aiohttp.WSMsgType.TEXT:
            await ws.close()
            code = ws.close_code
            raise ConnectionClosed(code, f"connection refused before hello ({code})")
        event = decode_event(msg.data)
        if isinstance(event, f.Error):
            await ws.receive(timeout=self.request_timeout)  # the close frame that follows
            raise ConnectionClosed(ws.close_code, f"{event.code}: {event.message}")
        if not isinstance(event, f.Hello):
            raise ConnectionClosed(None, f"expected hello, got {event!r}")
        return event

    async def _run(self) -> None:
        """Receive until the connection ends; reconnect while that is allowed."""
        while not self._closed:
            ws = self._ws
            assert ws is not None
            code: int | None = None
            try:
                code = await self._receive(ws)
            except Exception as exc:  # a broken socket: treat it as a dropped connection
                log.debug("receive failed: %r", exc)
                code = ws.close_code or 1006
            finally:
                self._connected.clear()
                self._fail_pending(None)
            self.close_codes.append(code)
            if self._closed:
                return
            # 4501 (token expired) is worth a retry when a fresh token can be fetched.
            renewable = code == 4501 and not isinstance(self._token, str)
            if not self.reconnect or (
                code is not None and not should_reconnect(code) and not renewable
            ):
                self._fatal = ConnectionClosed(code)
                self._fail_pending(self._fatal)
                return
            if not await self._reopen():
                return
            self.reconnects += 1
            self._spawn(self._resume())

    async def _reopen(self) -> bool:
        while not self._closed:
            await asyncio.sleep(self.backoff.next())
            try:
                await self._open()
            except ConnectionClosed as exc:
                if exc.close_code is not None and not should_reconnect(exc.close_code):
                    self._fatal = exc
                    self._fail_pending(exc)
                    return False
            except Exception as exc:  # network, a bad first frame, a failing token source
                log.debug("reconnect failed: %r", exc)
            else:
                self.backoff.reset()
                return True
        return False

    async def _receive(self, ws: aiohttp.ClientWebSocketResponse) -> int | None:
        """Dispatch frames until the connection ends; return the server's close code.

        The code comes from the close frame itself: aiohttp reports 1006 when its reply
        to a close cannot be written (a server may close TCP right after its close frame).
        """
        while True:
            msg = await ws.receive()
            if msg.type is aiohttp.WSMsgType.CLOSE:
                return int(msg.data)
            if msg.type in (
                aiohttp.WSMsgType.CLOSING,
                aiohttp.WSMsgType.CLOSED,
                aiohttp.WSMsgType.ERROR,
            ):
                return ws.close_code
            if msg.type is not aiohttp.WSMsgType.TEXT:
                continue
            try:
                event = decode_event(msg.data)
            except msgspec.MsgspecError:
                log.warning("undecodable frame from server: %.200r", msg.data)
                continue
            self._dispatch(event)

    def _dispatch(self, event: f.ServerEvent) -> None:
        request_id = getattr(event, "id", None)
        if isinstance(request_id, int) and request_id in self._pending:
            future = self._pending.pop(request_id)
            if not future.done():
                if isinstance(event, f.Error):
                    future.set_exception(
                        RemoteError(
                            event.code,
                            event.message,
                            retry_after=event.retry_after,
                            retryable=event.retryable,
                        )
                    )
                else:
                    future.set_result(event)  # type: ignore[arg-type]
            return
        if isinstance(event, f.Message):
            self._accept(event)
        else:
            if isinstance(event, f.Notice) and event.code == "resync":
                # The node may have missed pushes (its Redis link broke): sync everything.
                task = asyncio.ensure_future(self._resume())
                task.add_done_callback(_log_failure)
            if self.events.full():  # nobody reads them: keep the newest
                self.events.get_nowait()
            self.events.put_nowait(event)

    def _wake(self) -> None:
        """Release everyone waiting for a connection: it is up, or it never will be."""
        waiters, self._waiters = self._waiters, set()
        for future in waiters:
            if not future.done():
                future.set_result(None)

    async def _until_connected(self) -> aiohttp.ClientWebSocketResponse:
        while not self._connected.is_set():
            if self._fatal is not None:
                raise self._fatal
            if self._closed:
                raise ConnectionClosed(None, "client closed")
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.add(future)
            try:
                await asyncio.wait_for(future, self.request_timeout)
            finally:
                self._waiters.discard(future)
        assert self._ws is not None
        return self._ws

    def _fail_pending(self, exc: Exception | None) -> None:
        """Fail every request waiting for a reply (None: the connection dropped)."""
        if exc is not None:
            self._wake()
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(exc or ConnectionResetError("connection lost"))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        task.add_done_callback(_log_failure)

    # -- requests -------------------------------------------------------------------------

    async def _request(self, frame: f.ClientRequest) -> Reply:
        """Send one request and wait for its reply on the current connection."""
        ws = await self._until_connected()
        request_id = next(self._ids)
        frame.id = request_id
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            await ws.send_str(encode_request(frame).decode())
            return await asyncio.wait_for(future, self.request_timeout)
        finally:
            self._pending.pop(request_id, None)

    async def _retrying(
        self, frame: f.ClientRequest, attempts: int, *, idempotent: bool = True
    ) -> Reply:
        """Repeat a request across reconnects and retryable errors.

        A request that is not idempotent is repeated only after an error that says it was
        not carried out, never after a lost connection or reply (it may have been).
        """
        backoff = Backoff(self.backoff.initial, self.backoff.cap)
        last: Exception | None = None
        for _ in range(attempts):
            try:
                return await self._request(frame)
            except RemoteError as exc:
                if not exc.retryable:
                    raise
                last = exc
                await asyncio.sleep(max(exc.retry_after or 0.0, backoff.next()))
            except (ConnectionResetError, TimeoutError, aiohttp.ClientError) as exc:
                last = exc
                if self._fatal is not None:
                    raise self._fatal from exc
                if not idempotent:
                    raise
                await asyncio.sleep(backoff.next() / 4)
        raise last or TimeoutError("request failed")

    async def send(
        self,
        conv: str,
        body: dict[str, Any] | str,
        *,
        type: str = "text",
        client_msg_id: str | None = None,
    ) -> f.Ack:
        """Send a message; returns the server's ack (the message is stored).

        A plain string body is a text message. The request is retried (same
        ``client_msg_id``) across disconnects and retryable errors.
        """
        if type not in _SEND_TYPES:
            raise ValueError(f"cannot send messages of type {type!r}")
        if isinstance(body, str):
            body = {"text": body}
        raw = msgspec.json.encode(body)
        frame = f.Send(
            conv=conv,
            client_msg_id=client_msg_id or uuid.uuid4().hex,
            type=type,  # type: ignore[arg-type]
            body=msgspec.Raw(raw),
        )
        reply = await self._retrying(frame, self.send_attempts)
        assert isinstance(reply, f.Ack)
        self._accept(
            f.Message(
                conv=reply.conv,
                seq=reply.seq,
                msg_id=reply.msg_id,
                sender=self.user_id,
                sender_role=self.hello.role if self.hello else "",
                type=type,
                body=msgspec.Raw(raw),
                ts=reply.ts,
                client_msg_id=reply.client_msg_id,
            )
        )
        return reply

    async def open(
        self,
        *,
        customer_id: str | None = None,
        group: str | None = None,
    ) -> f.ConversationInfo:
        # A customer's (or an admin's, on their behalf) open is idempotent: the server
        # answers with their open conversation in the group. An agent's outreach is not:
        # it is never repeated when its outcome is unknown.
        outreach = self.hello is not None and self.hello.role == "agent"
        reply = await self._retrying(
            f.Open(customer_id=customer_id, group=group), 3, idempotent=not outreach
        )
        assert isinstance(reply, f.Conversation)
        self.last_seq.setdefault(reply.conversation.conv, 0)
        return reply.conversation

    async def request(self, frame: f.ClientRequest, *, retry: bool = False) -> Reply:
        """Send any request and return its reply (an ``error`` reply raises RemoteError).

        With ``retry`` the request is repeated across reconnects and retryable errors:
        only for requests that are safe to repeat (reads, ``status``, ``labels``, ...).
        """
        return await self._retrying(frame, 5 if retry else 1, idempotent=retry)

    async def conversations(self) -> list[f.ConversationInfo]:
        reply = await self._retrying(f.ListConversations(), 5)
        assert isinstance(reply, f.Conversations)
        return reply.conversations

    async def history(
        self, conv: str, *, before_seq: int | None = None, limit: int = 50
    ) -> f.Messages:
        reply = await self._retrying(f.History(conv=conv, before_seq=before_seq, limit=limit), 5)
        assert isinstance(reply, f.Messages)
        return reply

    async def read(self, conv: str, seq: int) -> None:
        await self._retrying(f.Read(conv=conv, seq=seq), 5)

    async def typing(self, conv: str) -> None:
        ws = self._ws
        if ws is not None and self._connected.is_set():
            await ws.send_str(encode_request(f.Typing(conv=conv)).decode())

    async def ping(self) -> f.Pong:
        reply = await self._request(f.Ping())
        assert isinstance(reply, f.Pong)
        return reply

    # -- ordered, exactly-once delivery ---------------------------------------------------

    async def sync(self, conv: str) -> None:
        """Fetch everything after the last seq seen in ``conv`` (all pages)."""
        while True:
            after = self.last_seq.get(conv, 0)
            page = await self._retrying(f.Sync(conv=conv, after_seq=after, limit=200), 10)
            assert isinstance(page, f.Messages)
            for message in page.messages:
                self._accept(message, from_sync=True)
            # The page covers every seq up to its last_seq: seqs it skipped are entries we
            # may not see (private notes), not losses.
            self._advance(conv, page.last_seq)
            if not page.has_more or self.last_seq.get(conv, 0) <= after:
                return

    def _accept(self, message: f.Message, *, from_sync: bool = False) -> None:
        conv = message.conv
        last = self.last_seq.get(conv, 0)
        if message.seq <= last:
            return  # already delivered
        if message.seq == last + 1:
            self._deliver(message)
            ahead = self._ahead.get(conv)
            while ahead:
                nxt = ahead.pop(self.last_seq[conv] + 1, None)
                if nxt is None:
                    break
                self._deliver(nxt)
            if ahead is not None and not ahead:
                del self._ahead[conv]
            return
        self._ahead.setdefault(conv, {})[message.seq] = message
        if not from_sync and conv not in self._syncing:
            self._start_sync(conv)

    def _advance(self, conv: str, seq: int) -> None:
        """Everything up to ``seq`` in ``conv`` has been delivered or is not for us."""
        if seq <= self.last_seq.get(conv, 0):
            return
        ahead = self._ahead.get(conv, {})
        for held in sorted(s for s in ahead if s <= seq):  # in the range: nothing before
            self._deliver(ahead.pop(held))
        self.last_seq[conv] = seq
        while ahead:
            nxt = ahead.pop(self.last_seq[conv] + 1, None)
            if nxt is None:
                break
            self._deliver(nxt)
        if not ahead:
            self._ahead.pop(conv, None)

    def _deliver(self, message: f.Message) -> None:
        self.last_seq[message.conv] = message.seq
        self._inbox.put_nowait(message)

    def _start_sync(self, conv: str) -> None:
        async def run() -> None:
            backoff = Backoff(self.backoff.initial, self.backoff.cap)
            try:
                while True:  # a gap must not stay open: retry until synced or closed
                    try:
                        await self.sync(conv)
                        return
                    except ConnectionClosed:
                        return  # closed, or gave up for good
                    except RemoteError as exc:
                        if not exc.retryable:  # forbidden, not_found: retrying cannot help
                            raise
                    except (ConnectionResetError, TimeoutError, aiohttp.ClientError):
                        pass
                    if self._closed or self._fatal is not None:
                        return
                    await asyncio.sleep(backoff.next())
            finally:
                self._syncing.pop(conv, None)

        self._syncing[conv] = asyncio.ensure_future(run())
        self._syncing[conv].add_done_callback(_log_failure)

    async def _resume(self) -> None:
        """After (re)connecting: sync every conversation that moved while we were away."""
        for info in await self.conversations():
            if info.last_seq > self.last_seq.get(info.conv, 0) and info.conv not in self._syncing:
                self._start_sync(info.conv)

    async def next_message(self, timeout: float | None = None) -> f.Message:
        """The next message in delivery order (waits up to ``timeout`` seconds).

        Raises :class:`ConnectionClosed` once the client is closed or has given up.
        """
        message = await asyncio.wait_for(self._inbox.get(), timeout)
        if message is None:
            self._inbox.put_nowait(None)  # for every other reader too
            raise self._fatal or ConnectionClosed(None, "client closed")
        return message

    async def messages(self) -> AsyncIterator[f.Message]:
        """Every message, exactly once, in seq order per conversation; ends on close."""
        while True:
            try:
                yield await self.next_message()
            except ConnectionClosed:
                return

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def error(self) -> ConnectionClosed | None:
        """Why the client stopped reconnecting, if it did."""
        return self._fatal


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("background task failed: %r", task.exception())


__all__ = ["Backoff", "Client", "ErrorCode"]
