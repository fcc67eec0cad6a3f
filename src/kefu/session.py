"""One client connection on this node: its protocol state, identity, limits and outbox.

The outbox is the bounded per-connection send queue. Frames are appended without
waiting; a writer task, started only while there is something to write (an idle
connection costs no task), moves them to the transport, which waits whenever the socket is
full. When a client stops reading the outbox grows: past ``soft_frames`` ephemeral frames
(typing) are dropped; past ``max_frames`` or ``max_bytes`` the connection is closed with
4001 (slow consumer, reconnect). Chat messages are never silently dropped: the client
reconnects and resyncs from its last seq.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import secrets
import time
from collections.abc import Callable

from kefu.errors import CloseCode
from kefu.metrics import Metrics
from kefu.model import Principal
from kefu.protocol import frames as f
from kefu.protocol.server import ServerConnection, encode
from kefu.ratelimit import TokenBucket
from kefu.transport.base import Transport

log = logging.getLogger(__name__)

_ids = itertools.count(1)
#: Per-process prefix: session ids stay unique across the nodes of a cluster.
_PREFIX = secrets.token_hex(4)

#: Outbox item kinds.
PUSH, EPHEMERAL, PING = 0, 1, 2


class Session:
    __slots__ = (
        "_on_closed",
        "claimed_user",
        "close_code",
        "closing",
        "created",
        "id",
        "last_seen",
        "max_bytes",
        "max_frames",
        "metrics",
        "next_ping",
        "outbox",
        "outbox_bytes",
        "principal",
        "protocol",
        "rate",
        "soft_frames",
        "transport",
        "writer",
    )

    def __init__(
        self,
        transport: Transport,
        *,
        metrics: Metrics,
        protocol: ServerConnection,
        rate: TokenBucket,
        max_frames: int,
        soft_frames: int,
        max_bytes: int,
        on_closed: Callable[[Session], None],
    ) -> None:
        now = time.monotonic()
        self.id = f"{_PREFIX}-{next(_ids)}"
        self.transport = transport
        self.metrics = metrics
        self.protocol = protocol
        self.rate = rate
        self.principal: Principal | None = None
        self.claimed_user = ""
        self.created = now
        self.last_seen = now
        self.next_ping = now
        self.outbox: collections.deque[tuple[int, bytes, float]] = collections.deque()
        self.outbox_bytes = 0
        self.max_frames = max_frames
        self.soft_frames = soft_frames
        self.max_bytes = max_bytes
        self.writer: asyncio.Task[None] | None = None
        self.closing = False
        self.close_code: int | None = None
        self._on_closed = on_closed

    @property
    def user_id(self) -> str:
        assert self.principal is not None
        return self.principal.user_id

    # -- sending --------------------------------------------------------------------------

    def send(self, frame: f.ServerFrame) -> None:
        """Queue a reply frame (an ack, an error, a page of messages) for this client."""
        self.push(encode(frame))

    def push(self, data: bytes, *, ephemeral: bool = False, received: float = 0.0) -> bool:
        """Queue an encoded frame; False if it was dropped or the connection is closing.

        ``received`` is the perf_counter time the message entered the node; when set the
        delivery latency is observed once the frame is written.
        """
        if self.closing:
            return False
        queued = len(self.outbox)
        if ephemeral and queued >= self.soft_frames:
            self.metrics.dropped.inc()
            return False
        if not queued and self.writer is None and self.transport.try_send_text(data):
            if received:
                self.metrics.latency.observe(time.perf_counter() - received)
            return True
        if queued >= self.max_frames or self.outbox_bytes + len(data) > self.max_bytes:
            if ephemeral:
                self.metrics.dropped.inc()
                return False
            self.metrics.send_queue_overflow.inc()
            self.close_soon(CloseCode.SLOW_CONSUMER, "send queue full: reconnect and sync")
            return False
        self.outbox.append((EPHEMERAL if ephemeral else PUSH, data, received))
        self.outbox_bytes += len(data)
        self._wake_writer()
        return True

    def ping(self) -> None:
        """Queue a WebSocket ping (heartbeat)."""
        if not self.closing and len(self.outbox) < self.max_frames:
            self.outbox.append((PING, b"", 0.0))
            self._wake_writer()

    def _wake_writer(self) -> None:
        if self.writer is None:
            self.writer = asyncio.get_running_loop().create_task(self._write())

    async def _write(self) -> None:
        outbox = self.outbox
        latency = self.metrics.latency
        try:
            while outbox:
                kind, data, received = outbox.popleft()
                self.outbox_bytes -= len(data)
                if kind == PING:
                    await self.transport.ping()
                    continue
                await self.transport.send_text(data)
                if received:
                    latency.observe(time.perf_counter() - received)
        except (ConnectionError, RuntimeError, asyncio.CancelledError) as exc:
            # The peer went away (or we are being torn down); the receive loop ends it.
            log.debug("session %s: write stopped: %r", self.id, exc)
            outbox.clear()
            self.outbox_bytes = 0
        finally:
            self.writer = None

    async def flush(self, timeout: float) -> bool:
        """Wait until the outbox is written (True) or ``timeout`` passes (False)."""
        deadline = time.monotonic() + timeout
        while self.writer is not None or self.outbox:
            if self.writer is None:
                self._wake_writer()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            writer = self.writer
            assert writer is not None
            done, _ = await asyncio.wait({writer}, timeout=remaining)
            if not done:
                return False
        return True

    # -- closing --------------------------------------------------------------------------

    def close_soon(self, code: CloseCode, reason: str) -> None:
        """Close from a synchronous context (a callback, a timer)."""
        if self.closing:
            return
        asyncio.get_running_loop().create_task(self.close(code, reason))

    async def close(self, code: CloseCode, reason: str, *, flush: float = 0.0) -> None:
        """Stop queueing, optionally give the outbox ``flush`` seconds, then close."""
        if self.closing:
            return
        if flush > 0:
            await self.flush(flush)
        self.closing = True
        self.close_code = int(code)
        self.protocol.closed()
        writer = self.writer
        if writer is not None and not writer.done():
            writer.cancel()
        try:
            await self.transport.close(int(code), _clip(reason))
        except (ConnectionError, RuntimeError) as exc:
            log.debug("session %s: close failed: %r", self.id, exc)
        self.closed()

    def closed(self) -> None:
        """The connection is gone (either side closed it): unregister, once."""
        self.closing = True
        self.outbox.clear()
        self.outbox_bytes = 0
        callback, self._on_closed = self._on_closed, _noop
        callback(self)


def _clip(reason: str, limit: int = 120) -> str:
    """A close reason fits in 123 bytes of UTF-8: cut on a character boundary."""
    return reason.encode("utf-8")[:limit].decode("utf-8", "ignore")


def _noop(session: Session) -> None:
    return None
