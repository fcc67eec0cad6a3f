"""A lean Redis connection for the delivery path: RESP on an asyncio protocol, commands
packed and replies parsed by hiredis.

Per chat message a node looks up two users' presence and publishes a share of a frame.
Through redis-py's asyncio pipeline each command costs tens of µs of Python (packing,
an ``asyncio.timeout`` and a parser call per reply, response callbacks): a quarter of a
node's CPU at a few thousand messages a second. Here a whole pipeline is packed by
``hiredis.pack_command``, written with one ``write`` and resolved by one future once
``hiredis.Reader`` has parsed its replies, and a pub/sub message is handed to its
callback as soon as it is read (``data_received``), before any callback the same read of
the event loop made ready. Everything else in Kefu (membership, routing scripts, streams,
settings) uses redis-py.

Errors are redis-py's: a reply error is a :class:`redis.exceptions.ResponseError` in the
pipeline's results (:func:`raise_first_error` raises it), a lost or silent connection a
:class:`redis.exceptions.ConnectionError` / :class:`redis.exceptions.TimeoutError`, so
callers handle one family (``kefu.cluster.redis_client.REDIS_ERRORS``).
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Callable, Sequence
from typing import Any, cast

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

Arg = bytes | str | int | float
Command = tuple[Arg, ...]
#: Called with (channel, data) for every pub/sub message the connection reads.
OnMessage = Callable[[bytes, bytes], None]

_MESSAGE_KINDS = (b"message", b"smessage")
#: (hiredis's stub types the command as a 1-tuple; it takes any number of arguments)
_pack: Callable[[Command], bytes] = hiredis.pack_command  # type: ignore[assignment]


class _Request:
    __slots__ = ("deadline", "future", "replies", "wanted")

    def __init__(self, future: asyncio.Future[list[Any]], wanted: int, deadline: float) -> None:
        self.future = future
        self.wanted = wanted
        self.deadline = deadline
        self.replies: list[Any] = []


class RespConnection(asyncio.Protocol):
    """One connection to one Redis server; see the module. Open with :meth:`open`."""

    def __init__(self, *, timeout: float, on_message: OnMessage | None = None) -> None:
        self.timeout = timeout
        self._on_message = on_message
        self._reader = hiredis.Reader(protocolError=InvalidResponse, replyError=ResponseError)
        self._pending: collections.deque[_Request] = collections.deque()
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._closed: asyncio.Future[None] = self._loop.create_future()
        self._error: Exception | None = None
        #: Checks the oldest request's deadline while any is pending (one timer, not one
        #: per request).
        self._watchdog: asyncio.TimerHandle | None = None

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        *,
        timeout: float,
        connect_timeout: float,
        username: str | None = None,
        password: str | None = None,
        db: int = 0,
        tls: bool = False,
        on_message: OnMessage | None = None,
    ) -> RespConnection:
        """Connect, authenticate and select ``db``; raises redis-py's errors."""
        loop = asyncio.get_running_loop()
        conn = cls(timeout=timeout, on_message=on_message)
        try:
            await asyncio.wait_for(
                loop.create_connection(
                    lambda: conn, host, port, ssl=ssl.create_default_context() if tls else None
                ),
                connect_timeout,
            )
        except (OSError, TimeoutError) as exc:
            raise RedisConnectionError(f"cannot connect to Redis at {host}:{port}: {exc}") from exc
        setup: list[Command] = []
        if password is not None:
            setup.append(("AUTH", username, password) if username else ("AUTH", password))
        if db:
            setup.append(("SELECT", db))
        if setup:
            try:
                raise_first_error(await conn.execute(setup))
            except BaseException:
                conn.close()
                raise
        return conn

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports do not subclass asyncio's)
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        pending = self._pending
        while True:
            try:
                reply = reader.gets()
            except InvalidResponse as exc:
                self._fail(exc)
                return
            if reply is False:
                return
            if (
                self._on_message is not None
                and type(reply) is list
                and len(reply) == 3
                and reply[0] in _MESSAGE_KINDS
            ):
                self._on_message(reply[1], reply[2])
                continue
            if not pending:
                self._fail(InvalidResponse(f"unexpected reply from Redis: {reply!r:.100}"))
                return
            request = pending[0]
            request.replies.append(reply)
            if len(request.replies) == request.wanted:
                pending.popleft()
                if not request.future.done():
                    request.future.set_result(request.replies)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(self._error or RedisConnectionError(f"Redis closed the connection: {exc}"))
        if not self._closed.done():
            self._closed.set_result(None)

    # -- use ------------------------------------------------------------------------------

    @property
    def is_closed(self) -> bool:
        return self._transport is None or self._transport.is_closing()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    def execute(
        self, commands: Sequence[Command], *, replies: int = 0
    ) -> asyncio.Future[list[Any]]:
        """Send ``commands`` in one write; the future gets their replies in order (a reply
        error as a ResponseError value). ``replies``: how many to wait for when it is not
        one per command (SUBSCRIBE of several channels answers once per channel)."""
        future: asyncio.Future[list[Any]] = self._loop.create_future()
        transport = self._transport
        if transport is None or transport.is_closing():
            future.set_exception(self._error or RedisConnectionError("Redis connection closed"))
            return future
        transport.write(b"".join([_pack(c) for c in commands]))
        deadline = self._loop.time() + self.timeout
        self._pending.append(_Request(future, replies or len(commands), deadline))
        if self._watchdog is None:
            self._watchdog = self._loop.call_at(deadline, self._check_deadline)
        return future

    async def call(self, *command: Arg) -> Any:
        """One command; its reply, or its error raised."""
        (reply,) = await self.execute([command])
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _check_deadline(self) -> None:
        self._watchdog = None
        if not self._pending:
            return
        oldest = self._pending[0].deadline
        if self._loop.time() >= oldest:
            self._fail(RedisTimeoutError(f"no reply from Redis within {self.timeout:g}s"))
        else:
            self._watchdog = self._loop.call_at(oldest, self._check_deadline)

    def _fail(self, exc: Exception) -> None:
        """Fail every pending request with ``exc`` and drop the connection."""
        if self._error is None:
            self._error = exc
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        while self._pending:
            request = self._pending.popleft()
            if not request.future.done():
                request.future.set_exception(exc)
        if self._transport is not None:
            self._transport.abort()


def raise_first_error(replies: list[Any]) -> list[Any]:
    """``replies`` unchanged, or the first reply error among them raised."""
    for reply in replies:
        if isinstance(reply, ResponseError):
            raise reply
    return replies
