"""Webhook events in Redis, each partition delivered by its owner on the ring.

In cluster mode a node does not POST the events it emits. It appends them to one of
:data:`PARTITIONS` Redis streams, chosen by the event's conversation (or, without one, by
the event id). The live node that owns ``("webhook", N)`` on the ring reads stream ``N``
and hands the events to its receivers (:mod:`kefu.webhooks`), which keep the events of one
conversation in order. So all the events of a conversation, whichever node produced them,
go out from one node, in the order they reached Redis.

Each partition has a cursor key: the id of the last entry whose prefix is settled
(delivered to every receiver or given up). The owner advances it and trims the stream up
to it. A node that takes a partition over (the owner died, drained, or the ring moved)
starts after the cursor, so what the previous owner read but had not settled is sent
again: delivery stays at least once (receivers dedupe by ``X-Kefu-Event-Id``), and an
event in Redis is not lost when a node dies. Redis losing its data (a restart without
persistence) loses the events that were waiting.

Bounds: a stream holds at most ``webhook_queue_size`` events (the append script refuses
more, counted as dropped); a node buffers at most :data:`BUFFER` events while Redis is
unreachable; the owner reads no more than its receivers have room for.

Keys, one Redis Cluster slot per partition: ``kefu:{whN}:events`` (STREAM, field ``e`` the
event's JSON body) and ``kefu:{whN}:cursor`` (STRING, an entry id).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
from collections import OrderedDict, deque
from collections.abc import Callable
from importlib import resources
from typing import Any, Protocol

from kefu import tasks
from kefu.cluster import redis_client as rc
from kefu.cluster.ring import hash_key
from kefu.metrics import Metrics

log = logging.getLogger(__name__)

#: Partitions of webhook delivery: many more than nodes, so that the ring spreads them.
PARTITIONS = 32
#: Events a node holds while it cannot append them (Redis unreachable).
BUFFER = 10_000
#: Events appended in one script call, and read from one partition at once.
BATCH = 256
#: Seconds between two reads of the owned partitions when nothing woke the reader.
POLL = 0.1
#: The longest pause between two attempts to append while Redis fails (seconds).
MAX_BACKOFF = 2.0


def partition_of(key: str) -> int:
    """The partition of an event whose ordering key (its conversation) is ``key``."""
    return hash_key(key) % PARTITIONS


def events_key(partition: int) -> str:
    return f"kefu:{{wh{partition}}}:events"


def cursor_key(partition: int) -> str:
    return f"kefu:{{wh{partition}}}:cursor"


def _script_text() -> str:
    return resources.files("kefu.cluster").joinpath("lua/webhook_append.lua").read_text("utf-8")


class Sink(Protocol):
    """What the log hands events to: the node's webhook receivers."""

    @property
    def room(self) -> int:
        """How many more events every receiver can take now."""

    def deliver(self, body: bytes, done: Callable[[], None]) -> None:
        """Queue one event for every receiver; ``done`` once all of them settled it."""

    def dropped(self, count: int) -> None:
        """``count`` events were refused (a full stream or buffer)."""


@dataclasses.dataclass(eq=False)
class _Partition:
    number: int
    #: The last entry read (the next read starts after it).
    read: str
    #: The cursor as last written.
    committed: str
    #: Entries read and not yet committed, in stream order -> settled.
    open: OrderedDict[str, bool] = dataclasses.field(default_factory=OrderedDict)

    def settled_prefix(self) -> str | None:
        """Drop the settled entries at the front; the last of them, if any."""
        last = None
        while self.open:
            entry, settled = next(iter(self.open.items()))
            if not settled:
                break
            del self.open[entry]
            last = entry
        return last


class RedisWebhookLog:
    def __init__(
        self,
        client: rc.RedisClient,
        owns: Callable[[str, str], bool],
        metrics: Metrics,
        *,
        capacity: int,
        poll: float = POLL,
        buffer: int = BUFFER,
    ) -> None:
        self._client = client
        self._owns = owns
        self._metrics = metrics
        self._capacity = capacity
        self._poll = poll
        self._limit = buffer
        self._script = client.register_script(_script_text())
        self._buffer: dict[int, deque[bytes]] = {}
        self._buffered = 0
        self._parts: dict[int, _Partition] = {}
        self._sink: Sink | None = None
        self._appending = asyncio.Event()
        self._wake = asyncio.Event()
        self._reading = True
        self._closing = False
        self._rotation = 0
        self._flusher: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None

    @property
    def buffered(self) -> int:
        """Events emitted here and not appended to Redis yet."""
        return self._buffered

    # -- emitting ---------------------------------------------------------------------------

    def append(self, key: str, body: bytes) -> bool:
        """Queue an event for its partition's stream (never blocks); False when the
        node's buffer is full or the log is closed."""
        if self._closing or self._buffered >= self._limit:
            return False
        self._buffer.setdefault(partition_of(key), deque()).append(body)
        self._buffered += 1
        self._appending.set()
        return True

    async def _flush_loop(self) -> None:
        backoff = 0.05
        while True:
            if not self._buffered:
                if self._closing:
                    return
                self._appending.clear()
                await self._appending.wait()
                continue
            try:
                await self._flush()
                backoff = 0.05
            except rc.REDIS_ERRORS as exc:
                tasks.stop_if_cancelled()
                self._metrics.cluster_errors.labels(operation="webhook_append").inc()
                log.warning("webhooks: appending to Redis failed (%s): retrying", exc)
                await asyncio.sleep(backoff)
                backoff = min(MAX_BACKOFF, backoff * 2)

    async def _flush(self) -> None:
        """Append what is buffered, one script call per partition (concurrently: they may
        live on different Redis Cluster shards). A call that fails keeps its events for
        the next attempt; it may have appended them all the same, and then they are
        delivered twice (at least once)."""
        batches = {p: list(q)[:BATCH] for p, q in self._buffer.items() if q}
        results = await asyncio.gather(
            *(
                self._script(keys=[events_key(p)], args=[self._capacity, *bodies])
                for p, bodies in batches.items()
            ),
            return_exceptions=True,
        )
        failure: BaseException | None = None
        for (p, bodies), result in zip(batches.items(), results, strict=True):
            if isinstance(result, BaseException):
                failure = failure or result
                continue
            queue = self._buffer[p]
            for _ in bodies:
                queue.popleft()
            self._buffered -= len(bodies)
            refused = len(bodies) - int(result)
            if refused and self._sink is not None:
                log.warning("webhooks: partition %d is full; dropped %d event(s)", p, refused)
                self._sink.dropped(refused)
            if self._owns("webhook", str(p)):
                self._wake.set()
        if failure is not None:
            raise failure

    # -- delivering ---------------------------------------------------------------------------

    async def start(self, sink: Sink) -> None:
        self._sink = sink
        loop = asyncio.get_running_loop()
        self._flusher = loop.create_task(self._flush_loop(), name="kefu-webhook-append")
        self._reader = loop.create_task(self._read_loop(), name="kefu-webhook-read")

    async def _read_loop(self) -> None:
        while self._reading:
            busy = False
            try:
                busy = await self._read()
                await self._commit()
            except rc.REDIS_ERRORS as exc:
                tasks.stop_if_cancelled()
                self._metrics.cluster_errors.labels(operation="webhook_read").inc()
                log.warning("webhooks: reading from Redis failed: %s", exc)
            except Exception:  # pragma: no cover - a bug must not stop delivery
                tasks.stop_if_cancelled()
                log.exception("webhooks: reading failed")
            if not busy and self._reading:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._poll)

    async def _own(self) -> list[_Partition]:
        """The partitions this node owns now, taking over new ones from their cursors."""
        owned = [p for p in range(PARTITIONS) if self._owns("webhook", str(p))]
        for p in set(self._parts) - set(owned):
            # Handed over: the new owner starts after the cursor; whatever this node still
            # has in flight for it may go out twice.
            del self._parts[p]
        new = [p for p in owned if p not in self._parts]
        if new:
            cursors = await asyncio.gather(*(self._client.get(cursor_key(p)) for p in new))
            for p, cursor in zip(new, cursors, strict=True):
                start = rc.text(cursor) if cursor else "0-0"
                self._parts[p] = _Partition(p, read=start, committed=start)
        return [self._parts[p] for p in owned]

    async def _read(self) -> bool:
        """Hand the next events of the owned partitions to the sink, no more than it has
        room for; True when a partition may hold more right now."""
        assert self._sink is not None
        parts = await self._own()
        room = self._sink.room
        if not parts or room <= 0:
            return False
        self._rotation = (self._rotation + 1) % len(parts)
        parts = parts[self._rotation :] + parts[: self._rotation]
        each = min(BATCH, max(1, room // len(parts)))
        parts = parts[:room]  # at most `room` entries in all: each * len(parts) <= room
        replies: list[Any] = await asyncio.gather(
            *(
                self._client.xrange(events_key(part.number), min=f"({part.read}", count=each)
                for part in parts
            )
        )
        busy = False
        for part, entries in zip(parts, replies, strict=True):
            if self._parts.get(part.number) is not part:
                continue  # handed over while reading
            busy = busy or len(entries) == each
            for raw_id, fields in entries:
                entry = rc.text(raw_id)
                part.open[entry] = False
                part.read = entry
                self._sink.deliver(fields[b"e"], functools.partial(self._settled, part, entry))
        return busy

    def _settled(self, part: _Partition, entry: str) -> None:
        if self._parts.get(part.number) is part and entry in part.open:
            part.open[entry] = True

    async def _commit(self) -> None:
        """Advance the cursors over settled prefixes and trim the streams behind them."""
        moved = []
        for part in self._parts.values():
            last = part.settled_prefix()
            if last is not None:
                moved.append((part, last))
        if not moved:
            return
        pipe = self._client.pipeline(transaction=False)
        for part, last in moved:
            pipe.set(cursor_key(part.number), last)
            pipe.xtrim(events_key(part.number), minid=last, approximate=False)
        await pipe.execute()
        for part, last in moved:
            part.committed = last

    # -- stopping -----------------------------------------------------------------------------

    async def stop_reading(self) -> None:
        """Read no more events (what was read is still settled and committed)."""
        self._reading = False
        self._wake.set()
        if self._reader is not None:
            await tasks.stop([self._reader])
            self._reader = None

    async def close(self, timeout: float = 5.0) -> None:
        """Commit what was settled and append what is buffered, for up to ``timeout``
        seconds; events still buffered then are lost (logged). Never raises."""
        await self.stop_reading()
        self._closing = True
        self._appending.set()
        try:
            await asyncio.wait_for(self._commit(), timeout)
        except rc.REDIS_ERRORS as exc:  # TimeoutError included
            tasks.stop_if_cancelled()
            log.warning("webhooks: last cursor commit failed (events will be resent): %s", exc)
        if self._flusher is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._flusher), timeout)
            await tasks.stop([self._flusher])
            self._flusher = None
        if self._buffered:
            log.warning("webhooks: %d event(s) never reached Redis; they are lost", self._buffered)
            if self._sink is not None:
                self._sink.dropped(self._buffered)
