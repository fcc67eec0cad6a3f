"""Webhook delivery in cluster mode: one Redis stream per partition, delivered by the ring
owner of the partition, at least once across owner changes (kefu.cluster.webhook_log)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web

from kefu.cluster import redis_client as rc
from kefu.cluster import webhook_log as wl
from kefu.cluster.webhook_log import RedisWebhookLog
from kefu.metrics import Metrics
from kefu.model import Agent
from kefu.server import Server
from kefu.webhooks import verify
from tests.cluster_helpers import Connect, StartNodes, eventually, send
from tests.services import RedisServer

SECRET = "cluster-webhook-secret"


class Sink:
    """Stands in for kefu.webhooks.Webhooks: records bodies, settles on request."""

    def __init__(self, room: int = 1000) -> None:
        self.limit = room
        self.bodies: list[bytes] = []
        self.dones: list[Callable[[], None]] = []
        self.refused = 0

    @property
    def room(self) -> int:
        return self.limit - len(self.dones)

    def deliver(self, body: bytes, done: Callable[[], None]) -> None:
        self.bodies.append(body)
        self.dones.append(done)

    def dropped(self, count: int) -> None:
        self.refused += count

    def settle(self, count: int | None = None) -> None:
        count = len(self.dones) if count is None else count
        for done in self.dones[:count]:
            done()
        del self.dones[:count]


def body(key: str, n: int) -> bytes:
    return json.dumps({"key": key, "n": n}).encode()


def owned(_: str, __: str) -> bool:
    return True


def not_owned(_: str, __: str) -> bool:
    return False


@pytest.fixture
async def client(redis_for_cluster: str) -> AsyncIterator[rc.RedisClient]:
    redis, _ = await rc.connect(redis_for_cluster)
    yield redis
    await redis.aclose()


async def wait_for(check: Callable[[], bool], timeout: float = 10.0) -> None:
    async def poll() -> bool:
        return check()

    await eventually(poll, timeout)


async def test_events_keep_their_order_per_key_and_are_handed_over_once(
    client: rc.RedisClient,
) -> None:
    log = RedisWebhookLog(client, owned, Metrics(), capacity=1000, poll=0.02)
    sink = Sink()
    await log.start(sink)
    try:
        for n in range(40):
            assert log.append(f"conv-{n % 4}", body(f"conv-{n % 4}", n))
        await wait_for(lambda: len(sink.bodies) == 40)
        await asyncio.sleep(0.1)
        assert len(sink.bodies) == 40  # nothing read twice by one owner
        events = [json.loads(b) for b in sink.bodies]
        for key in {e["key"] for e in events}:
            ns = [e["n"] for e in events if e["key"] == key]
            assert ns == sorted(ns) and len(ns) == 10
        sink.settle()

        async def trimmed() -> bool:
            lengths = [await client.xlen(wl.events_key(p)) for p in range(wl.PARTITIONS)]
            return all(length <= 1 for length in lengths)  # the cursor's entry stays

        await eventually(trimmed)
    finally:
        await log.close(1.0)


async def test_a_full_partition_refuses_new_events_not_old_ones(client: rc.RedisClient) -> None:
    log = RedisWebhookLog(client, not_owned, Metrics(), capacity=3)
    sink = Sink()
    await log.start(sink)
    try:
        for n in range(5):
            log.append("one-conv", body("one-conv", n))
        await wait_for(lambda: sink.refused == 2)
        key = wl.events_key(wl.partition_of("one-conv"))
        entries = await client.xrange(key)
        assert [json.loads(fields[b"e"])["n"] for _, fields in entries] == [0, 1, 2]
    finally:
        await log.close(1.0)


async def test_a_new_owner_resends_what_the_last_one_had_not_settled(
    client: rc.RedisClient,
) -> None:
    first = RedisWebhookLog(client, owned, Metrics(), capacity=1000, poll=0.02)
    sink = Sink()
    await first.start(sink)
    for n in range(10):
        first.append("conv", body("conv", n))
    await wait_for(lambda: len(sink.bodies) == 10)
    sink.settle(4)  # 0..3 delivered; 4..9 in flight when the owner goes
    await first.close(1.0)

    second = RedisWebhookLog(client, owned, Metrics(), capacity=1000, poll=0.02)
    again = Sink()
    await second.start(again)
    try:
        await wait_for(lambda: len(again.bodies) == 6)
        assert [json.loads(b)["n"] for b in again.bodies] == [4, 5, 6, 7, 8, 9]
    finally:
        await second.close(1.0)


async def test_the_owner_reads_no_more_than_its_receivers_have_room_for(
    client: rc.RedisClient,
) -> None:
    log = RedisWebhookLog(client, owned, Metrics(), capacity=1000, poll=0.02)
    sink = Sink(room=3)
    await log.start(sink)
    try:
        for n in range(10):
            log.append(f"c{n}", body(f"c{n}", n))
        await wait_for(lambda: len(sink.bodies) == 3)
        await asyncio.sleep(0.2)
        assert len(sink.bodies) == 3
        sink.settle()
        await wait_for(lambda: len(sink.bodies) == 6)
        sink.settle()
        await wait_for(lambda: len(sink.bodies) == 9)
        sink.settle()
        await wait_for(lambda: len(sink.bodies) == 10)
        assert sorted(json.loads(b)["n"] for b in sink.bodies) == list(range(10))
    finally:
        await log.close(1.0)


async def test_events_wait_in_the_node_while_redis_is_down(private_redis: RedisServer) -> None:
    redis, _ = await rc.connect(private_redis.url)
    metrics = Metrics()
    log = RedisWebhookLog(redis, owned, metrics, capacity=1000, poll=0.02)
    sink = Sink()
    await log.start(sink)
    try:
        private_redis.stop()
        for n in range(5):
            assert log.append("conv", body("conv", n))

        def failed() -> bool:
            value = metrics.registry.get_sample_value(
                "kefu_cluster_errors_total", {"operation": "webhook_append"}
            )
            return bool(value)

        await wait_for(failed)
        assert log.buffered == 5 and not sink.bodies
        private_redis.start()
        await wait_for(lambda: len(sink.bodies) == 5, timeout=20)
        assert [json.loads(b)["n"] for b in sink.bodies] == [0, 1, 2, 3, 4]
        assert log.buffered == 0
    finally:
        await log.close(1.0)
        await redis.aclose()


# -- nodes -------------------------------------------------------------------------------------


class Receiver:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.up = True

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        assert verify(SECRET, raw, request.headers["X-Kefu-Signature"])
        if not self.up:
            return web.Response(status=503)
        self.events.append(json.loads(raw))
        return web.Response(status=204)


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield rec, f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    finally:
        await runner.cleanup()


def delivered(server: Server) -> float:
    value = server.node.metrics.registry.get_sample_value(
        "kefu_webhook_deliveries_total", {"result": "delivered"}
    )
    return value or 0.0


def owner_of(nodes: list[Server], conv: str) -> Server:
    ring = nodes[0].node.broker.membership.ring  # type: ignore[attr-defined]
    node_id = ring.owner_of_partition("webhook", str(wl.partition_of(conv)))
    return next(s for s in nodes if s.node.config.node_id == node_id)


def hook_settings(url: str) -> dict[str, Any]:
    return {
        "webhook_urls": url,
        "webhook_secret": SECRET,
        "webhook_backoff_initial": 0.02,
        "webhook_backoff_max": 0.1,
        "webhook_max_attempts": 1000,
    }


async def test_events_of_a_conversation_from_two_nodes_go_out_in_order_from_its_owner(
    start_nodes: StartNodes, connect_to: Connect, receiver: tuple[Receiver, str]
) -> None:
    rec, url = receiver
    nodes = await start_nodes(2, **hook_settings(url))
    await nodes[0].node.desk.save_agent(Agent(id="ag", name="Ag", capacity=5, groups=("general",)))
    agent = await connect_to(nodes[1], "ag", "agent")
    customer = await connect_to(nodes[0], "cu")
    conv = (await customer.request({"op": "open", "id": "o"}))["conversation"]["conv"]
    await agent.recv_op("conversation")

    def texts() -> list[str]:
        return [
            e["data"]["message"]["body"]["text"]
            for e in rec.events
            if e["conv"] == conv
            and e["type"] == "message.created"
            and e["data"]["message"]["type"] == "text"
        ]

    for n in range(6):  # three from one node, then alternately from both
        side = customer if n < 3 or n % 2 == 0 else agent
        ack = await side.request(send(conv, n, f"text {n}"))
        assert ack["op"] == "ack", ack
    await wait_for(lambda: len(texts()) == 6)
    assert texts()[:3] == [f"text {n}" for n in range(3)]  # one node's: in emit order
    # Events emitted on two nodes within a few milliseconds may swap (they are in the
    # order they reached Redis); message events carry the seq to order them by.
    assert sorted(texts()) == [f"text {n}" for n in range(6)]
    mine = [e for e in rec.events if e["conv"] == conv]
    assert mine[0]["type"] == "conversation.created"
    ids = [e["id"] for e in rec.events]
    assert len(ids) == len(set(ids))
    owner = owner_of(nodes, conv)
    other = next(s for s in nodes if s is not owner)
    await wait_for(lambda: delivered(owner) + delivered(other) == len(rec.events))
    assert delivered(other) == 0  # every event of the conversation left from its owner
    await customer.close()
    await agent.close()


async def test_events_the_owner_could_not_deliver_go_out_from_the_next_owner(
    start_nodes: StartNodes, connect_to: Connect, receiver: tuple[Receiver, str]
) -> None:
    rec, url = receiver
    nodes = await start_nodes(2, **hook_settings(url))
    await nodes[0].node.desk.save_agent(Agent(id="ag", name="Ag", capacity=5, groups=("general",)))
    rec.up = False
    customer = await connect_to(nodes[0], "cu")
    agent = await connect_to(nodes[0], "ag", "agent")
    conv = (await customer.request({"op": "open", "id": "o"}))["conversation"]["conv"]
    await agent.recv_op("conversation")
    for n in range(3):
        assert (await customer.request(send(conv, n)))["op"] == "ack"
    owner = owner_of(nodes, conv)
    survivor = next(s for s in nodes if s is not owner)

    def attempted() -> bool:
        value = owner.node.metrics.registry.get_sample_value(
            "kefu_webhook_deliveries_total", {"result": "retried"}
        )
        return bool(value)

    await wait_for(attempted)  # the owner is trying, and failing
    await customer.close()
    await agent.close()
    await owner.stop()
    rec.up = True

    def kinds() -> list[str]:
        return [e["type"] for e in rec.events if e["conv"] == conv]

    def texts() -> list[str]:
        return [
            e["data"]["message"]["body"]["text"]
            for e in rec.events
            if e["conv"] == conv
            and e["type"] == "message.created"
            and e["data"]["message"]["type"] == "text"
        ]

    await wait_for(lambda: len(texts()) == 3, timeout=20)
    assert texts() == [f"message {n}" for n in range(3)]
    assert kinds()[0] == "conversation.created"
    assert delivered(survivor) >= len([e for e in rec.events if e["conv"] == conv])
