"""Webhooks without the network: signatures, the retry policy, per-conversation lanes,
and what emit does before anything is sent."""

from __future__ import annotations

import dataclasses
import email.utils
import logging
from typing import Any

import msgspec
import pytest

from kefu.config import WebhookSettings
from kefu.ids import now_ms
from kefu.metrics import Metrics
from kefu.webhooks import (
    Delivery,
    Lanes,
    Outcome,
    WebhookEvent,
    Webhooks,
    backoff_delay,
    classify,
    parse_retry_after,
    sign,
    verify,
)

SECRET = "whsec-test"


def deliveries(metrics: Metrics, result: str) -> float:
    value = metrics.registry.get_sample_value("kefu_webhook_deliveries_total", {"result": result})
    return value or 0.0


def queue_gauge(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("kefu_webhook_queue")


def settings(**changes: Any) -> WebhookSettings:
    """One receiver that is never started: events only queue."""
    base = WebhookSettings(webhook_urls=("http://127.0.0.1:9/hook",), webhook_secret=SECRET)
    return dataclasses.replace(base, **changes)


# -- signatures ---------------------------------------------------------------------------


def test_sign_is_hmac_sha256_hex_of_the_body() -> None:
    # RFC 4231 test case 2.
    assert sign("Jefe", b"what do ya want for nothing?") == (
        "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    )


def test_verify_accepts_only_the_exact_body_and_secret() -> None:
    body = b'{"id":"1","type":"message.created"}'
    header = sign(SECRET, body)
    assert verify(SECRET, body, header)
    assert not verify(SECRET, body + b" ", header)
    assert not verify(SECRET, body.replace(b"created", b"deleted"), header)
    assert not verify("other-secret", body, header)
    assert not verify(SECRET, body, header.removeprefix("sha256="))
    assert not verify(SECRET, body, "")
    assert not verify(SECRET, body, "sha256=\u00e9\ud800")  # non-ASCII is refused, not raised


# -- retry policy -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, Outcome.DELIVERED),
        (202, Outcome.DELIVERED),
        (204, Outcome.DELIVERED),
        (301, Outcome.FAILED),
        (400, Outcome.FAILED),
        (401, Outcome.FAILED),
        (404, Outcome.FAILED),
        (408, Outcome.RETRY),
        (429, Outcome.RETRY),
        (500, Outcome.RETRY),
        (502, Outcome.RETRY),
        (503, Outcome.RETRY),
    ],
)
def test_classify(status: int, outcome: Outcome) -> None:
    assert classify(status) is outcome


def test_backoff_doubles_up_to_the_maximum() -> None:
    ceilings = [backoff_delay(n, 0.5, 5.0, rand=lambda: 1.0) for n in range(1, 8)]
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    assert backoff_delay(10_000, 0.5, 5.0, rand=lambda: 1.0) == 5.0  # no overflow


def test_backoff_has_full_jitter() -> None:
    assert backoff_delay(3, 0.5, 5.0, rand=lambda: 0.0) == 0.0
    assert backoff_delay(3, 0.5, 5.0, rand=lambda: 0.25) == 0.5
    delays = {backoff_delay(3, 0.5, 5.0) for _ in range(50)}
    assert all(0.0 <= d <= 2.0 for d in delays)
    assert len(delays) > 1


def test_retry_after_wins_capped_at_the_maximum() -> None:
    assert backoff_delay(1, 0.5, 60.0, retry_after=7.0) == 7.0
    assert backoff_delay(1, 0.5, 60.0, retry_after=0.0) == 0.0
    assert backoff_delay(1, 0.5, 60.0, retry_after=3600.0) == 60.0


def test_parse_retry_after() -> None:
    assert parse_retry_after(None) is None
    assert parse_retry_after("") is None
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(" 0.25 ") == 0.25
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after("nan") is None
    assert parse_retry_after("inf") is None
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after(date, now=now) == pytest.approx(30.0)
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0


# -- lanes --------------------------------------------------------------------------------


def delivery(conv: str | None, n: int = 0) -> Delivery:
    event = WebhookEvent(id=f"e{n}-{conv}", type="t", ts=n, conv=conv, data={})
    return Delivery(event, b"{}", {})


def test_lanes_hand_out_one_event_per_conversation_at_a_time() -> None:
    lanes = Lanes(limit=10)
    a1, a2, b1 = delivery("a", 1), delivery("a", 2), delivery("b", 1)
    for d in (a1, a2, b1):
        assert lanes.push(d)
    assert lanes.next() is a1
    assert lanes.next() is b1
    assert lanes.next() is None  # a2 waits for a1
    lanes.finish(a1)
    assert lanes.next() is a2
    assert lanes.pending == 2
    lanes.finish(a2)
    lanes.finish(b1)
    assert lanes.pending == 0
    assert lanes.next() is None


def test_lanes_retry_holds_the_conversation_and_goes_first() -> None:
    lanes = Lanes(limit=10)
    a1, a2, b1 = delivery("a", 1), delivery("a", 2), delivery("b", 1)
    for d in (a1, a2, b1):
        lanes.push(d)
    assert lanes.next() is a1
    lanes.again(a1)  # a1 failed and its backoff is over
    assert lanes.next() is a1  # ahead of b1, and a2 still waits
    assert lanes.next() is b1
    assert lanes.next() is None
    lanes.finish(a1)  # given up: the conversation moves on
    assert lanes.next() is a2


def test_lanes_events_without_conversation_are_not_ordered() -> None:
    lanes = Lanes(limit=10)
    ds = [delivery(None, n) for n in range(3)]
    for d in ds:
        lanes.push(d)
    assert [lanes.next() for _ in range(3)] == ds


def test_lanes_are_bounded() -> None:
    lanes = Lanes(limit=2)
    a1, b1 = delivery("a", 1), delivery("b", 1)
    assert lanes.push(a1)
    assert lanes.push(b1)
    assert not lanes.push(delivery("c", 1))
    assert lanes.pending == 2
    assert lanes.next() is a1
    lanes.finish(a1)
    assert lanes.push(delivery("c", 1))
    assert lanes.clear() == 2
    assert lanes.pending == 0
    assert lanes.next() is None


# -- emit without sending -----------------------------------------------------------------


async def test_emit_without_urls_returns_none_and_does_nothing() -> None:
    metrics = Metrics()
    hooks = Webhooks(WebhookSettings(), metrics)
    await hooks.start()
    assert hooks.emit("message.created", "c1", {"x": 1}) is None
    assert hooks.pending == 0
    await hooks.close()
    for result in ("delivered", "retried", "failed", "dropped"):
        assert deliveries(metrics, result) == 0
    assert queue_gauge(metrics) == 0


async def test_emit_makes_unique_time_ordered_events() -> None:
    metrics = Metrics()
    hooks = Webhooks(settings(), metrics)  # never started: events only queue
    before = now_ms()
    events = [hooks.emit("message.created", "c1", {"n": n}) for n in range(200)]
    after = now_ms()
    assert all(e is not None for e in events)
    ids = [e.id for e in events if e is not None]
    stamps = [e.ts for e in events if e is not None]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 for i in ids)
    assert stamps == sorted(stamps)
    assert before <= stamps[0] and stamps[-1] <= after
    assert hooks.pending == 200
    assert queue_gauge(metrics) == 200
    await hooks.close(timeout=0.1)
    assert hooks.pending == 0
    assert queue_gauge(metrics) == 0


async def test_emit_copies_data_and_the_body_is_the_event() -> None:
    hooks = Webhooks(settings(), Metrics())
    data: dict[str, object] = {"body": "hi", "tags": ["a"]}
    event = hooks.emit("message.created", "c1", data)
    assert event is not None
    data["body"] = "changed"
    assert event.data["body"] == "hi"
    assert msgspec.json.decode(msgspec.json.encode(event), type=WebhookEvent) == event
    await hooks.close(timeout=0.1)


async def test_emit_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    hooks = Webhooks(settings(), Metrics())
    with caplog.at_level(logging.ERROR, logger="kefu.webhooks"):
        assert hooks.emit("message.created", "c1", {"bad": object()}) is None
    assert "not emitted" in caplog.text
    assert hooks.pending == 0
    await hooks.close(timeout=0.1)


async def test_full_queue_drops_counts_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    hooks = Webhooks(settings(webhook_queue_size=3), metrics)
    with caplog.at_level(logging.WARNING, logger="kefu.webhooks"):
        results = [hooks.emit("message.created", "c1", {"n": n}) for n in range(10)]
    assert [r is not None for r in results] == [True] * 3 + [False] * 7
    assert hooks.pending == 3
    assert deliveries(metrics, "dropped") == 7
    assert len([r for r in caplog.records if "queue full" in r.getMessage()]) == 1
    await hooks.close(timeout=0.1)


async def test_emit_after_close_is_dropped() -> None:
    metrics = Metrics()
    hooks = Webhooks(settings(), metrics)
    await hooks.close()
    await hooks.close()  # twice is fine
    assert hooks.emit("message.created", "c1", {}) is None
    assert hooks.pending == 0
    assert deliveries(metrics, "dropped") == 1
