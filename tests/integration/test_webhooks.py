"""Webhook delivery over real HTTP to receivers started on 127.0.0.1 inside each test."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from kefu.config import WebhookSettings
from kefu.metrics import Metrics
from kefu.webhooks import WebhookEvent, Webhooks, verify

SECRET = "whsec-integration"


@dataclasses.dataclass
class Hit:
    """One request as the receiver saw it."""

    event: WebhookEvent
    body: bytes
    headers: dict[str, str]
    at: float


Reply = Callable[[Hit], Awaitable[web.Response]]


async def ok(hit: Hit) -> web.Response:
    return web.Response(status=200)


class Receiver:
    """A webhook receiver: records every request, then answers with ``reply``."""

    def __init__(self, reply: Reply = ok) -> None:
        self.reply = reply
        self.hits: list[Hit] = []
        self.delivered: list[WebhookEvent] = []  # answered 2xx, in order
        self.in_flight = 0
        self.max_in_flight = 0
        self.release = asyncio.Event()  # ends every hang(); set before the server closes
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self.server = TestServer(app, host="127.0.0.1", port=0)

    @property
    def url(self) -> str:
        return str(self.server.make_url("/hook"))

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        hit = Hit(
            msgspec.json.decode(body, type=WebhookEvent),
            body,
            dict(request.headers),
            time.monotonic(),
        )
        self.hits.append(hit)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            resp = await self.reply(hit)
        finally:
            self.in_flight -= 1
        if 200 <= resp.status < 300:
            self.delivered.append(hit.event)
        return resp

    async def hang(self) -> web.Response:
        """Answer only when the test ends (the sender times out long before)."""
        await self.release.wait()
        return web.Response(status=200)

    def ids(self, conv: str | None = None) -> list[str]:
        """Ids of the distinct events received (first arrival), optionally of one conv."""
        seen: dict[str, None] = {}
        for hit in self.hits:
            if conv is None or hit.event.conv == conv:
                seen.setdefault(hit.event.id, None)
        return list(seen)


StartReceiver = Callable[..., Awaitable[Receiver]]
MakeHooks = Callable[..., Awaitable[tuple[Webhooks, Metrics]]]


@pytest.fixture
async def receivers() -> AsyncIterator[StartReceiver]:
    """Start receivers: ``rx = await receivers(reply)``; all are closed after the test."""
    started: list[Receiver] = []

    async def start(reply: Reply = ok) -> Receiver:
        receiver = Receiver(reply)
        await receiver.server.start_server()
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        receiver.release.set()
        await receiver.server.close()


def make_settings(*urls: str, **changes: Any) -> WebhookSettings:
    """Fast timings so that every test runs in well under a second or two."""
    base = WebhookSettings(
        webhook_urls=urls,
        webhook_secret=SECRET,
        webhook_timeout=2.0,
        webhook_max_attempts=5,
        webhook_backoff_initial=0.01,
        webhook_backoff_max=0.05,
        webhook_queue_size=1000,
    )
    return dataclasses.replace(base, **changes)


@pytest.fixture
async def make_hooks() -> AsyncIterator[MakeHooks]:
    """Start a Webhooks with fresh metrics: ``hooks, metrics = await make_hooks(settings)``."""
    made: list[Webhooks] = []

    async def make(settings: WebhookSettings, **kwargs: Any) -> tuple[Webhooks, Metrics]:
        metrics = Metrics()
        hooks = Webhooks(settings, metrics, **kwargs)
        await hooks.start()
        made.append(hooks)
        return hooks, metrics

    yield make
    for hooks in made:
        await hooks.close(timeout=0.1)


def count(metrics: Metrics, result: str) -> float:
    value = metrics.registry.get_sample_value("kefu_webhook_deliveries_total", {"result": result})
    return value or 0.0


def attempts_observed(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("kefu_webhook_delivery_seconds_count") or 0.0


def queue_gauge(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("kefu_webhook_queue")


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


async def test_post_is_signed_over_the_exact_body(
    receivers: StartReceiver, make_hooks: MakeHooks
) -> None:
    rx = await receivers()
    hooks, metrics = await make_hooks(make_settings(rx.url))
    event = hooks.emit("conversation.assigned", "c1", {"agent": "ag-1", "n": 1.5})
    assert event is not None
    await until(lambda: hooks.pending == 0)

    [hit] = rx.hits
    assert hit.event == event
    assert hit.body == msgspec.json.encode(event)
    assert hit.headers["Content-Type"] == "application/json"
    assert hit.headers["X-Kefu-Event-Id"] == event.id
    assert hit.headers["X-Kefu-Event-Type"] == "conversation.assigned"
    assert hit.headers["X-Kefu-Timestamp"] == str(event.ts)
    signature = hit.headers["X-Kefu-Signature"]
    assert verify(SECRET, hit.body, signature)
    tampered = hit.body.replace(b"ag-1", b"ag-2")
    assert tampered != hit.body
    assert not verify(SECRET, tampered, signature)
    assert not verify("wrong-secret", hit.body, signature)

    assert count(metrics, "delivered") == 1
    assert attempts_observed(metrics) == 1
    assert queue_gauge(metrics) == 0


async def test_order_per_conversation_survives_random_failures(
    receivers: StartReceiver, make_hooks: MakeHooks
) -> None:
    rng = random.Random(20240611)
    acked: dict[str, int] = {}
    early: list[tuple[str, int, int]] = []

    async def flaky(hit: Hit) -> web.Response:
        conv, n = hit.event.conv, hit.event.data["n"]
        assert conv is not None and isinstance(n, int)
        if n != acked.get(conv, -1) + 1:
            early.append((conv, n, acked.get(conv, -1)))  # N+1 before N got its 2xx
        await asyncio.sleep(rng.random() * 0.003)
        if rng.random() < 0.3:
            return web.Response(status=rng.choice([500, 502, 503]))
        acked[conv] = n
        return web.Response(status=204)

    rx = await receivers(flaky)
    hooks, metrics = await make_hooks(make_settings(rx.url, webhook_max_attempts=30))
    convs = [f"conv-{i}" for i in range(6)]
    emitted: dict[str, list[str]] = {c: [] for c in convs}
    for n in range(25):
        for conv in convs:
            event = hooks.emit("message.created", conv, {"n": n})
            assert event is not None
            emitted[conv].append(event.id)
    await until(lambda: hooks.pending == 0, timeout=15)

    assert early == []
    for conv in convs:
        assert rx.ids(conv) == emitted[conv]
        assert [e.id for e in rx.delivered if e.conv == conv] == emitted[conv]
    assert count(metrics, "delivered") == 150
    assert count(metrics, "failed") == 0
    assert count(metrics, "retried") == len(rx.hits) - 150 > 0
    assert attempts_observed(metrics) == len(rx.hits)
    # Retries carry the same id and the same signed body.
    by_id: dict[str, bytes] = {}
    for hit in rx.hits:
        assert by_id.setdefault(hit.event.id, hit.body) == hit.body
    assert rx.max_in_flight > 1  # conversations went out side by side


async def test_in_flight_is_bounded_per_receiver(
    receivers: StartReceiver, make_hooks: MakeHooks
) -> None:
    async def slow(hit: Hit) -> web.Response:
        await asyncio.sleep(0.05)
        return web.Response()

    rx = await receivers(slow)
    hooks, _ = await make_hooks(make_settings(rx.url), in_flight=4)
    for n in range(20):
        hooks.emit("conversation.created", f"c{n}", {})
    for n in range(5):
        hooks.emit("agent.status", None, {"n": n})
    await until(lambda: hooks.pending == 0)
    assert len(rx.ids()) == 25
    assert rx.max_in_flight == 4


async def test_a_hanging_conversation_does_not_delay_the_others(
    receivers: StartReceiver, make_hooks: MakeHooks
) -> None:
    async def hang_on_a(hit: Hit) -> web.Response:
        if hit.event.conv == "A":
            return await rx.hang()
        return web.Response()

    rx = await receivers(hang_on_a)
    hooks, metrics = await make_hooks(make_settings(rx.url, webhook_timeout=3.0))
    hooks.emit("message.created", "A", {"n": 0})
    hooks.emit("message.created", "A", {"n": 1})
    await until(lambda: len(rx.hits) == 1)  # A's first event is stuck in flight
    start = time.monotonic()
    b_ids = [hooks.emit("message.created", "B", {"n": n}) for n in range(5)]
    await until(lambda: count(metrics, "delivered") == 5, timeout=1.0)
    assert time.monotonic() - start < 1.0  # long before A's 3 s timeout
    assert [e.id for e in rx.delivered] == [e.id for e in b_ids if e is not None]
    assert [h.event.data["n"] for h in rx.hits if h.event.conv == "A"] == [0]  # A 1 waits
    assert hooks.pending == 2
    assert count(metrics, "delivered") == 5


async def test_a_hanging_receiver_does_not_delay_another(
    receivers: StartReceiver, make_hooks: MakeHooks
) -> None:
    async def hang(hit: Hit) -> web.Response:
        return await stuck.hang()

    stuck = await receivers(hang)
    fine = await receivers()
    hooks, metrics = await make_hooks(make_settings(stuck.url, fine.url, webhook_timeout=3.0))
    start = time.monotonic()
    for n in range(40):  # more conversations than the stuck receiver has room in flight for
        hooks.emit("message.created", f"c{n % 20}", {"n": n})
    await until(lambda: count(metrics, "delivered") == 40, timeout=1.0)
    assert time.monotonic() - start < 1.0
    assert len(fine.delivered) == 40
    assert stuck.delivered == []
    assert hooks.pending == 40  # all still owed to the stuck receiver
    assert queue_gauge(metrics) == 40


async def test_a_timeout_is_retried_then_delivered(
    receivers: StartReceiver, make_hooks: MakeHooks
) -> None:
    async def slow_first(hit: Hit) -> web.Response:
        if len(rx.hits) == 1:
            await asyncio.sleep(1.0)
        return web.Response()

    rx = await receivers(slow_first)
    hooks, metrics = await make_hooks(make_settings(rx.url, webhook_timeout=0.2))
    event = hooks.emit("message.created", "c1", {})
    assert event is not None
    await until(lambda: hooks.pending == 0)
    assert [h.event.id for h in rx.hits] == [event.id, event.id]
    assert (count(metrics, "retried"), count(metrics, "delivered")) == (1, 1)


@pytest.mark.parametrize("status", [500, 503, 408, 429])
async def test_retries_stop_after_max_attempts(
    receivers: StartReceiver, make_hooks: MakeHooks, caplog: pytest.LogCaptureFixture, status: int
) -> None:
    async def fail_first(hit: Hit) -> web.Response:
        return web.Response(status=status if hit.event.data["n"] == 0 else 200)

    rx = await receivers(fail_first)
    hooks, metrics = await make_hooks(make_settings(rx.url, webhook_max_attempts=3))
    with caplog.at_level(logging.ERROR, logger="kefu.webhooks"):
        first = hooks.emit("message.created", "c1", {"n": 0})
        second = hooks.emit("message.created", "c1", {"n": 1})
        assert first is not None and second is not None
        await until(lambda: hooks.pending == 0)
    assert [h.event.id for h in rx.hits] == [first.id] * 3 + [second.id]
    assert count(metrics, "retried") == 2
    assert count(metrics, "failed") == 1
    assert count(metrics, "delivered") == 1
    assert attempts_observed(metrics) == 4
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert first.id in record.getMessage()
    assert f"HTTP {status}" in record.getMessage()


async def test_network_errors_are_retried(make_hooks: MakeHooks) -> None:
    with socket.socket() as sock:  # a port that refuses connections
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    hooks, metrics = await make_hooks(
        make_settings(f"http://user:pw@127.0.0.1:{port}/hook?token=t", webhook_max_attempts=3)
    )
    hooks.emit("message.created", "c1", {})
    await until(lambda: hooks.pending == 0)
    assert (count(metrics, "retried"), count(metrics, "failed")) == (2, 1)


@pytest.mark.parametrize("status", [400, 404, 302])
async def test_other_client_errors_and_redirects_are_not_retried(
    receivers: StartReceiver, make_hooks: MakeHooks, status: int
) -> None:
    async def refuse(hit: Hit) -> web.Response:
        return web.Response(status=status, headers={"Location": "/hook", "Retry-After": "0"})

    rx = await receivers(refuse)
    hooks, metrics = await make_hooks(make_settings(rx.url))
    hooks.emit("message.created", "c1", {})
    await until(lambda: hooks.pending == 0)
    await asyncio.sleep(0.1)  # room for a retry or a followed redirect that must not come
    assert len(rx.hits) == 1
    assert (count(metrics, "failed"), count(metrics, "retried")) == (1, 0)


async def test_retry_after_is_honoured(receivers: StartReceiver, make_hooks: MakeHooks) -> None:
    async def busy_once(hit: Hit) -> web.Response:
        if len(rx.hits) == 1:
            return web.Response(status=503, headers={"Retry-After": "1"})
        return web.Response()

    rx = await receivers(busy_once)
    hooks, metrics = await make_hooks(make_settings(rx.url, webhook_backoff_max=5.0))
    hooks.emit("message.created", "c1", {})
    await until(lambda: hooks.pending == 0)
    first, second = rx.hits
    assert first.event.id == second.event.id
    assert second.at - first.at >= 0.95  # not the 0.01 s backoff
    assert count(metrics, "delivered") == 1


async def test_full_queue_drops_and_counts(
    receivers: StartReceiver, make_hooks: MakeHooks, caplog: pytest.LogCaptureFixture
) -> None:
    async def hang(hit: Hit) -> web.Response:
        return await rx.hang()

    rx = await receivers(hang)
    hooks, metrics = await make_hooks(make_settings(rx.url, webhook_queue_size=3))
    with caplog.at_level(logging.WARNING, logger="kefu.webhooks"):
        events = [hooks.emit("message.created", "c1", {"n": n}) for n in range(6)]
    assert [e is not None for e in events] == [True, True, True, False, False, False]
    assert hooks.pending == 3
    assert queue_gauge(metrics) == 3
    assert count(metrics, "dropped") == 3
    assert len([r for r in caplog.records if "queue full" in r.getMessage()]) == 1
    rx.release.set()  # the receiver recovers: the accepted three arrive, in order
    await until(lambda: hooks.pending == 0)
    assert [e.id for e in rx.delivered] == [e.id for e in events[:3] if e is not None]
    assert hooks.emit("message.created", "c1", {"n": 6}) is not None  # room again


async def test_close_flushes_pending_deliveries(receivers: StartReceiver) -> None:
    async def slowish(hit: Hit) -> web.Response:
        await asyncio.sleep(0.02)
        return web.Response()

    rx = await receivers(slowish)
    metrics = Metrics()
    hooks = Webhooks(make_settings(rx.url), metrics)
    await hooks.start()
    for n in range(30):
        hooks.emit("message.created", f"c{n % 3}", {"n": n})
    assert hooks.pending == 30
    await hooks.close()
    assert hooks.pending == 0
    assert len(rx.delivered) == 30
    assert count(metrics, "delivered") == 30
    assert queue_gauge(metrics) == 0
    assert hooks.emit("message.created", "c1", {}) is None  # closed


async def test_close_gives_up_after_its_timeout(
    receivers: StartReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    async def hang(hit: Hit) -> web.Response:
        return await rx.hang()

    rx = await receivers(hang)
    metrics = Metrics()
    hooks = Webhooks(make_settings(rx.url, webhook_timeout=10.0), metrics)
    await hooks.start()
    for n in range(5):
        hooks.emit("message.created", "c1", {"n": n})
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="kefu.webhooks"):
        await hooks.close(timeout=0.2)
    assert 0.15 <= time.monotonic() - start < 1.0
    assert hooks.pending == 0
    assert queue_gauge(metrics) == 0
    assert "5 delivery(ies) not done" in caplog.text
