"""Outgoing webhooks: Kefu's events POSTed, signed, to the operator's HTTP receivers.

Contract (tests/integration/test_webhooks.py checks it):

* :meth:`Webhooks.emit` never blocks, never raises and never waits for a receiver: chat is
  never delayed by a webhook. It queues the event for every receiver and returns it.
* Each URL in ``webhook_urls`` is an independent receiver with its own bounded queue
  (``webhook_queue_size`` pending events) and at most :data:`MAX_IN_FLIGHT` POSTs at once.
  A full queue drops the new event (``kefu_webhook_deliveries{result="dropped"}``).
* Per receiver, the events of one conversation are delivered in emit order: event N+1 is
  not POSTed before event N got a 2xx or was given up. Different conversations, and events
  with ``conv=None``, are delivered concurrently.
* Delivery is at least once: a retry carries the same event id and the same body, so
  receivers dedupe by ``X-Kefu-Event-Id``.
* 2xx is delivered. Network errors, timeouts, 5xx, 408 and 429 are retried with full-jitter
  exponential backoff (or after ``Retry-After``) up to ``webhook_max_attempts`` attempts in
  all; any other status (including 3xx: redirects are not followed) gives up at once.

Every request is::

    POST <url>
    Content-Type: application/json
    X-Kefu-Event-Id: <event id>
    X-Kefu-Event-Type: <event type>
    X-Kefu-Timestamp: <event ts, unix ms>
    X-Kefu-Signature: sha256=<hex HMAC-SHA256(webhook_secret, body)>

    {"id": ..., "type": ..., "ts": ..., "conv": ..., "data": {...}}

The signature covers the exact body bytes, and the body carries the id and timestamp, so
a receiver checks :func:`verify` on the raw body before parsing it, then rejects stale
``ts`` values and ids it has already seen.

The module is split like the rest of Kefu: :class:`Lanes` (which event of a receiver may be
sent next), :func:`classify`, :func:`backoff_delay` and :func:`parse_retry_after` are pure
and tested without I/O; :class:`Webhooks` and its per-URL ``_Receiver`` only move events
between them and aiohttp.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email.utils
import enum
import hashlib
import hmac
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC
from typing import Protocol

import aiohttp
import msgspec

from kefu.config import WebhookSettings, redact_url
from kefu.ids import new_id, now_ms
from kefu.metrics import Metrics

__all__ = [
    "MAX_IN_FLIGHT",
    "Delivery",
    "Lanes",
    "Outcome",
    "WebhookEvent",
    "WebhookLog",
    "Webhooks",
    "backoff_delay",
    "classify",
    "parse_retry_after",
    "sign",
    "verify",
]

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 16
"""POSTs in progress at once to one receiver (events backing off do not count)."""

DROP_LOG_INTERVAL = 10.0
"""Seconds between two warnings about one receiver's full queue."""

_REPLY_LIMIT = 64 * 1024  # a reply body this small is read so the connection can be reused
_USER_AGENT = "kefu-webhooks"


class WebhookEvent(msgspec.Struct, frozen=True):
    """One event, exactly as POSTed (``msgspec.json.encode(event)`` is the body)."""

    id: str
    """Unique and time-ordered (:func:`kefu.ids.new_id`); the same on every retry."""
    type: str
    """What happened, ``noun.verb``: ``conversation.assigned``, ``message.created``."""
    ts: int
    """When the event was emitted, Unix time in milliseconds."""
    conv: str | None
    """The conversation: the ordering key. ``None`` events are not ordered."""
    data: dict[str, object]
    """The event's payload; its shape depends on ``type`` (see docs/operations.md)."""


# -- signatures ---------------------------------------------------------------------------


def sign(secret: str, body: bytes) -> str:
    """The ``X-Kefu-Signature`` value for ``body``: ``sha256=<hex HMAC-SHA256>``."""
    digest = hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def verify(secret: str, body: bytes, header: str) -> bool:
    """Whether ``header`` is the signature of ``body`` under ``secret`` (constant time).

    ``body`` must be the raw request body, before any JSON parsing.
    """
    expected = sign(secret, body).encode("ascii")
    return hmac.compare_digest(expected, header.strip().encode("utf-8", "backslashreplace"))


# -- retry policy (pure) ------------------------------------------------------------------


class Outcome(enum.Enum):
    """What one attempt means for its event."""

    DELIVERED = "delivered"
    RETRY = "retry"
    FAILED = "failed"


RETRY_STATUSES = frozenset({408, 429})
"""Client-error statuses that say "try again later"; all 5xx are retried too."""


def classify(status: int) -> Outcome:
    """2xx is delivered; 5xx, 408 and 429 are retried; anything else gives up."""
    if 200 <= status < 300:
        return Outcome.DELIVERED
    if status >= 500 or status in RETRY_STATUSES:
        return Outcome.RETRY
    return Outcome.FAILED


def backoff_delay(
    failures: int,
    initial: float,
    maximum: float,
    *,
    retry_after: float | None = None,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait after the ``failures``-th failed attempt of an event.

    Full jitter: uniform in ``[0, min(maximum, initial * 2**(failures - 1))]``, so that
    receivers coming back are not hit by every queued event at the same instant. A
    ``Retry-After`` from the receiver wins, but is capped at ``maximum`` so that one
    receiver cannot park its queue for hours.
    """
    if retry_after is not None:
        return min(max(retry_after, 0.0), maximum)
    ceiling = min(maximum, initial * 2.0 ** min(max(failures - 1, 0), 64))
    return rand() * ceiling


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """A ``Retry-After`` header in seconds from ``now``; None when absent or unreadable.

    Both forms of RFC 9110 are read: delta-seconds (``"120"``; fractions are accepted)
    and an HTTP-date. Past dates give 0.
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return max(seconds, 0.0)


# -- per-receiver ordering (pure) ---------------------------------------------------------


@dataclasses.dataclass(slots=True, eq=False)
class Delivery:
    """One event on its way to one receiver.

    ``body`` and ``headers`` are made once in :meth:`Webhooks.emit` and shared by every
    receiver; ``attempts`` is this receiver's own count.
    """

    event: WebhookEvent
    body: bytes
    headers: Mapping[str, str]
    attempts: int = 0
    #: Called once this receiver is done with it (delivered, given up or dropped).
    done: Callable[[], None] | None = None

    @property
    def key(self) -> tuple[bool, str]:
        """The ordering key: the conversation, or the event itself when it has none."""
        conv = self.event.conv
        return (True, conv) if conv is not None else (False, self.event.id)


class Lanes:
    """One receiver's pending deliveries, one FIFO lane per ordering key.

    Only the head of a lane is ever handed out, and a lane is handed out again only after
    its head is :meth:`finish`-ed (delivered or given up) or put back with :meth:`again`.
    That is the whole ordering guarantee; concurrency is the caller's business.

    Invariant: every lane is either in ``_ready`` exactly once (its head may be sent) or
    busy (its head is being sent or is waiting to be retried).
    """

    __slots__ = ("_lanes", "_limit", "_pending", "_ready")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._lanes: dict[tuple[bool, str], deque[Delivery]] = {}
        self._ready: deque[tuple[bool, str]] = deque()
        self._pending = 0

    @property
    def pending(self) -> int:
        """Deliveries not yet finished, including those being sent or backing off."""
        return self._pending

    def push(self, delivery: Delivery) -> bool:
        """Append to the delivery's lane; False (and nothing queued) when full."""
        if self._pending >= self._limit:
            return False
        key = delivery.key
        lane = self._lanes.get(key)
        if lane is None:
            self._lanes[key] = deque((delivery,))
            self._ready.append(key)
        else:
            lane.append(delivery)
        self._pending += 1
        return True

    def next(self) -> Delivery | None:
        """The head of a ready lane, which becomes busy; None when no lane is ready."""
        if not self._ready:
            return None
        return self._lanes[self._ready.popleft()][0]

    def again(self, delivery: Delivery) -> None:
        """Make a busy head ready again (to retry it), ahead of the lanes already ready."""
        self._ready.appendleft(delivery.key)

    def finish(self, delivery: Delivery) -> None:
        """Remove a busy head (delivered or given up); its lane's next event becomes ready."""
        key = delivery.key
        lane = self._lanes[key]
        assert lane[0] is delivery, "only a lane's head can finish"
        lane.popleft()
        self._pending -= 1
        if lane:
            self._ready.append(key)
        else:
            del self._lanes[key]

    def clear(self) -> int:
        """Forget everything; return how many deliveries were pending."""
        dropped = self._pending
        self._lanes.clear()
        self._ready.clear()
        self._pending = 0
        return dropped


# -- I/O ----------------------------------------------------------------------------------


def _describe(exc: BaseException) -> str:
    detail = str(exc)
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


class _Receiver:
    """One webhook URL: its lanes, its POSTs in flight and its retry timers."""

    def __init__(
        self,
        url: str,
        settings: WebhookSettings,
        metrics: Metrics,
        *,
        in_flight: int,
        on_settled: Callable[[], None],
    ) -> None:
        self.url = url
        self.name = redact_url(url)
        self.lanes = Lanes(settings.webhook_queue_size)
        self._settings = settings
        self._metrics = metrics
        self._in_flight = in_flight
        self._on_settled = on_settled
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._timers: dict[Delivery, asyncio.TimerHandle] = {}
        self._stopped = False
        self._dropped_unlogged = 0
        self._last_drop_log = -math.inf
        self._result = {
            outcome: metrics.webhook_deliveries.labels(result=outcome)
            for outcome in ("delivered", "retried", "failed", "dropped")
        }

    def start(self, session: aiohttp.ClientSession) -> None:
        self._session = session
        self._loop = asyncio.get_running_loop()
        self._pump()

    def push(self, delivery: Delivery) -> bool:
        """Queue one delivery (never blocks); False when it was dropped."""
        if self._stopped or not self.lanes.push(delivery):
            self._drop()
            if delivery.done is not None:
                delivery.done()
            return False
        self._metrics.webhook_queue.inc()
        self._pump()
        return True

    def _drop(self) -> None:
        self._result["dropped"].inc()
        self._dropped_unlogged += 1
        now = time.monotonic()
        if now - self._last_drop_log >= DROP_LOG_INTERVAL:
            log.warning(
                "webhook receiver %s: queue full (%d pending) or closed; dropped %d event(s)",
                self.name,
                self.lanes.pending,
                self._dropped_unlogged,
            )
            self._last_drop_log = now
            self._dropped_unlogged = 0

    def _pump(self) -> None:
        """Start POSTs for ready lanes while there is room in flight."""
        if self._loop is None or self._stopped:
            return
        while len(self._tasks) < self._in_flight:
            delivery = self.lanes.next()
            if delivery is None:
                return
            task = self._loop.create_task(self._attempt(delivery))
            self._tasks.add(task)
            task.add_done_callback(self._attempt_done)

    def _attempt_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("webhook receiver %s: delivery task failed", self.name, exc_info=exc)
        self._pump()

    async def _attempt(self, delivery: Delivery) -> None:
        """POST once, then finish the delivery or schedule its retry."""
        delivery.attempts += 1
        retry_after: float | None = None
        started = time.perf_counter()
        try:
            status, retry_after = await self._post(delivery)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            outcome, why = Outcome.RETRY, _describe(exc)
        except Exception as exc:  # a bug or an unusable URL: give up rather than loop
            log.exception("webhook receiver %s: cannot POST", self.name)
            outcome, why = Outcome.FAILED, _describe(exc)
        else:
            outcome, why = classify(status), f"HTTP {status}"
        finally:
            self._metrics.webhook_seconds.observe(time.perf_counter() - started)
        self._settle(delivery, outcome, why, retry_after)

    async def _post(self, delivery: Delivery) -> tuple[int, float | None]:
        assert self._session is not None
        async with self._session.post(
            self.url,
            data=delivery.body,
            headers=delivery.headers,
            allow_redirects=False,
        ) as resp:
            length = resp.content_length
            if length is not None and length <= _REPLY_LIMIT:
                await resp.read()
            return resp.status, parse_retry_after(resp.headers.get("Retry-After"))

    def _settle(
        self, delivery: Delivery, outcome: Outcome, why: str, retry_after: float | None
    ) -> None:
        event = delivery.event
        max_attempts = self._settings.webhook_max_attempts
        if outcome is Outcome.RETRY and delivery.attempts < max_attempts:
            delay = backoff_delay(
                delivery.attempts,
                self._settings.webhook_backoff_initial,
                self._settings.webhook_backoff_max,
                retry_after=retry_after,
            )
            self._result["retried"].inc()
            log.debug(
                "webhook %s %s to %s: attempt %d/%d: %s; retrying in %.2fs",
                event.type,
                event.id,
                self.name,
                delivery.attempts,
                max_attempts,
                why,
                delay,
            )
            assert self._loop is not None
            self._timers[delivery] = self._loop.call_later(delay, self._retry, delivery)
            return
        if outcome is Outcome.DELIVERED:
            self._result["delivered"].inc()
        else:
            self._result["failed"].inc()
            log.error(
                "webhook %s %s to %s given up after %d attempt(s): %s",
                event.type,
                event.id,
                self.name,
                delivery.attempts,
                why,
            )
        self.lanes.finish(delivery)
        self._metrics.webhook_queue.dec()
        if delivery.done is not None:
            delivery.done()
        self._on_settled()

    def _retry(self, delivery: Delivery) -> None:
        del self._timers[delivery]
        self.lanes.again(delivery)
        self._pump()

    async def stop(self) -> int:
        """Cancel POSTs and retries; forget what is queued and return how much that was."""
        self._stopped = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        abandoned = self.lanes.clear()
        self._metrics.webhook_queue.dec(abandoned)
        return abandoned


class WebhookLog(Protocol):
    """Where a cluster node's events go before delivery (kefu.cluster.webhook_log): shared,
    partitioned, each partition delivered by one node. Without one, a node delivers the
    events it emits itself, from memory."""

    def append(self, key: str, body: bytes) -> bool:
        """Queue an event under its ordering key; False when refused (full or closed)."""

    async def start(self, sink: Webhooks) -> None:
        """Begin handing events to ``sink`` (:class:`Webhooks`)."""

    async def stop_reading(self) -> None:
        """Hand over no more events."""

    async def close(self, timeout: float = 5.0) -> None:
        """Record what was settled and store what is queued, then stop."""


class Webhooks:
    """Kefu's webhook sender: :meth:`emit` from the service, delivery in the background.

    Lifecycle: construct, :meth:`start` (inside the event loop), :meth:`emit` any number of
    times from the event loop's thread, :meth:`close`. Events emitted before :meth:`start`
    wait in the queues and go out once it runs. With no ``webhook_urls`` every call is
    (nearly) free and nothing is queued.

    With a :class:`WebhookLog` (:meth:`use_log`, cluster mode) :meth:`emit` appends to the
    log instead, and the log hands this node the events of the partitions it owns through
    :meth:`deliver`.
    """

    def __init__(
        self,
        settings: WebhookSettings,
        metrics: Metrics,
        *,
        in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self._receivers = tuple(
            _Receiver(url, settings, metrics, in_flight=in_flight, on_settled=self._settled)
            for url in settings.webhook_urls
        )
        self._in_flight = in_flight
        self._session: aiohttp.ClientSession | None = None
        self._idle: asyncio.Event | None = None
        self._closed = False
        self._log: WebhookLog | None = None

    def use_log(self, webhook_log: WebhookLog) -> None:
        """Emit into ``webhook_log`` (before :meth:`start`); no-op without receivers."""
        if self._receivers:
            self._log = webhook_log

    @property
    def pending(self) -> int:
        """Events not yet delivered or given up, summed over all receivers."""
        return sum(receiver.lanes.pending for receiver in self._receivers)

    @property
    def room(self) -> int:
        """How many more events every receiver can queue now."""
        limit = self.settings.webhook_queue_size
        return min((limit - r.lanes.pending for r in self._receivers), default=0)

    async def start(self) -> None:
        """Open the HTTP client and send anything emitted so far; no-op without URLs."""
        if not self._receivers or self._session is not None or self._closed:
            return
        self._session = aiohttp.ClientSession(
            # Enough connections for every receiver's POSTs in flight: a receiver that
            # hangs on to its connections never leaves another waiting for one.
            connector=aiohttp.TCPConnector(limit=self._in_flight * len(self._receivers)),
            timeout=aiohttp.ClientTimeout(total=self.settings.webhook_timeout),
            headers={"User-Agent": _USER_AGENT},
        )
        for receiver in self._receivers:
            receiver.start(self._session)
        if self._log is not None:
            await self._log.start(self)

    def emit(self, type: str, conv: str | None, data: Mapping[str, object]) -> WebhookEvent | None:
        """Queue an event for every receiver and return it, without waiting for anything.

        Returns None when no URL is configured, when the event was dropped by every
        receiver (queues full, or :meth:`close` done), or when ``data`` cannot be encoded
        as JSON (logged). Never raises. ``data`` is copied and encoded now: changing it
        afterwards changes nothing that is sent.
        """
        if not self._receivers:
            return None
        try:
            event = WebhookEvent(id=new_id(), type=type, ts=now_ms(), conv=conv, data=dict(data))
            body = msgspec.json.encode(event)
            if self._log is not None:
                if self._closed or not self._log.append(conv or event.id, body):
                    self.dropped(1)
                    return None
                return event
            accepted = self._push(event, body, None)
        except Exception:
            log.exception("webhook event %r for conversation %r not emitted", type, conv)
            return None
        return event if accepted else None

    def _push(self, event: WebhookEvent, body: bytes, done: Callable[[], None] | None) -> bool:
        headers = {
            "Content-Type": "application/json",
            "X-Kefu-Event-Id": event.id,
            "X-Kefu-Event-Type": event.type,
            "X-Kefu-Timestamp": str(event.ts),
            "X-Kefu-Signature": sign(self.settings.webhook_secret, body),
        }
        accepted = False
        for receiver in self._receivers:
            accepted = receiver.push(Delivery(event, body, headers, done=done)) or accepted
        return accepted

    def deliver(self, body: bytes, done: Callable[[], None]) -> None:
        """An event from the log, for every receiver; ``done`` once each has settled it
        (a body that is not an event is logged and settled at once)."""
        try:
            event = _decode_event(body)
        except msgspec.DecodeError:
            log.error("webhooks: an entry of the log is not an event; skipped: %r", body[:200])
            done()
            return
        left = len(self._receivers)

        def settled() -> None:
            nonlocal left
            left -= 1
            if left == 0:
                done()

        self._push(event, body, settled)

    def dropped(self, count: int) -> None:
        """``count`` events refused before reaching any receiver (counted per receiver)."""
        self.metrics.webhook_deliveries.labels(result="dropped").inc(count * len(self._receivers))

    def _settled(self) -> None:
        if self._idle is not None and self.pending == 0:
            self._idle.set()

    async def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued for up to ``timeout`` seconds, then cancel the rest.

        Events still pending then are lost (logged with their count), except with a log:
        there they stay for the partition's next owner. Never raises; later :meth:`emit`
        calls return None.
        """
        if self._closed:
            return
        if self._log is not None:
            try:
                await self._log.stop_reading()
            except Exception:
                log.exception("webhooks: stopping the log reader failed")
        try:
            if self._session is not None and self.pending:
                self._idle = asyncio.Event()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._idle.wait(), timeout)
        except Exception:
            log.exception("webhooks: flushing failed")
        self._closed = True
        if self._log is not None:
            try:
                await self._log.close(timeout)
            except Exception:
                log.exception("webhooks: closing the log failed")
        abandoned = 0
        for receiver in self._receivers:
            try:
                abandoned += await receiver.stop()
            except Exception:
                log.exception("webhook receiver %s: stopping failed", receiver.name)
        if abandoned and self._log is not None:
            log.info("webhooks closed with %d delivery(ies) left to the next owner", abandoned)
        elif abandoned:
            log.warning("webhooks closed with %d delivery(ies) not done; they are lost", abandoned)
        if self._session is not None:
            try:
                await self._session.close()
            except Exception:
                log.exception("webhooks: closing the HTTP client failed")
            self._session = None


_decode_event = msgspec.json.Decoder(WebhookEvent).decode
