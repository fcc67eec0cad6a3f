"""The desk's events reach a webhook receiver: signed, unique, in order per conversation."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from kefu.model import Agent
from kefu.server import Server
from kefu.webhooks import verify
from tests.conftest import RawClient, make_config, token

SECRET = "webhook-secret-for-tests"


class Receiver:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.bad_signatures = 0
        self.failed_once: set[str] = set()
        self.arrived = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if not verify(SECRET, body, request.headers.get("X-Kefu-Signature", "")):
            self.bad_signatures += 1
            return web.Response(status=401)
        event = json.loads(body)
        assert request.headers["X-Kefu-Event-Id"] == event["id"]
        assert request.headers["X-Kefu-Event-Type"] == event["type"]
        if event["type"] == "message.created" and event["id"] not in self.failed_once:
            self.failed_once.add(event["id"])  # every message event fails once: retried
            return web.Response(status=503)
        self.events.append(event)
        self.arrived.set()
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
    port = runner.addresses[0][1]
    try:
        yield rec, f"http://127.0.0.1:{port}/hook"
    finally:
        await runner.cleanup()


async def test_desk_events_are_signed_retried_and_ordered(
    tmp_path: Path, receiver: tuple[Receiver, str]
) -> None:
    rec, url = receiver
    config = make_config(
        tmp_path / "data",
        webhook_urls=url,
        webhook_secret=SECRET,
        webhook_backoff_initial=0.01,
        webhook_backoff_max=0.05,
        sweep_interval=0.05,
    )
    server = Server(config)
    await server.start()
    try:
        await server.node.desk.save_agent(
            Agent(id="ag", name="Ag", capacity=3, groups=("general",))
        )
        async with aiohttp.ClientSession() as http:

            async def connect(user: str, role: str) -> RawClient:
                ws = await http.ws_connect(
                    f"{server.url}/ws?user_id={user}&token={token(user, role)}"
                )
                client = RawClient(ws)
                assert (await client.recv())["op"] == "hello"
                return client

            agent = await connect("ag", "agent")
            customer = await connect("cu", "customer")
            opened = await customer.request({"op": "open", "id": "o"})
            conv = opened["conversation"]["conv"]
            await agent.recv_op("conversation")
            for n in range(3):
                ack = await customer.request(
                    {
                        "op": "send",
                        "id": f"s{n}",
                        "conv": conv,
                        "client_msg_id": f"m{n}",
                        "type": "text",
                        "body": {"text": f"hello {n}"},
                    }
                )
                assert ack["op"] == "ack", ack
            await agent.request(
                {
                    "op": "send",
                    "id": "n",
                    "conv": conv,
                    "client_msg_id": "note",
                    "type": "note",
                    "body": {"text": "internal"},
                }
            )
            resolved = await agent.request({"op": "resolve", "id": "r", "conv": conv})
            assert resolved["conversation"]["state"] == "resolved"

            async def all_arrived() -> None:
                while not any(e["type"] == "conversation.resolved" for e in rec.events):
                    rec.arrived.clear()
                    await rec.arrived.wait()

            await asyncio.wait_for(all_arrived(), 10)
            await customer.close()
            await agent.close()
    finally:
        await server.stop()

    assert rec.bad_signatures == 0
    ids = [e["id"] for e in rec.events]
    assert len(ids) == len(set(ids))  # retries delivered each event once here
    mine = [e for e in rec.events if e["conv"] == conv]
    kinds = [e["type"] for e in mine]
    assert kinds[0] == "conversation.created"
    assert "conversation.assigned" in kinds
    texts = [
        e["data"]["message"]["body"].get("text")
        for e in mine
        if e["type"] == "message.created" and e["data"]["message"]["type"] == "text"
    ]
    assert texts == ["hello 0", "hello 1", "hello 2"]  # in order, despite every retry
    note = [
        e for e in mine if e["type"] == "message.created" and e["data"]["message"]["type"] == "note"
    ]
    assert note and note[0]["data"]["message"]["visibility"] == "internal"
    assert kinds[-1] == "conversation.resolved"
    assert mine[-1]["data"]["conversation"]["state"] == "resolved"
    seqs = [e["data"]["message"]["seq"] for e in mine if e["type"] == "message.created"]
    assert seqs == sorted(seqs)
    assert all(e["ts"] > 0 for e in mine)
