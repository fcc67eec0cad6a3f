"""/health, /ready and /metrics on the node's port."""

from __future__ import annotations

import asyncio

import aiohttp

from kefu.server import Server
from tests.conftest import Connect, open_conversation


async def test_health_and_ready(server: Server, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{server.url}/health") as resp:
        assert resp.status == 200
        assert (await resp.json())["status"] == "ok"
    async with http.get(f"{server.url}/ready") as resp:
        assert resp.status == 200


async def test_not_ready_while_draining_or_store_down(
    server: Server, http: aiohttp.ClientSession
) -> None:
    await server.node.store.close()
    async with http.get(f"{server.url}/ready") as resp:
        assert resp.status == 503
        assert "store" in (await resp.json())["reason"]
    server.node.draining = True
    async with http.get(f"{server.url}/ready") as resp:
        assert resp.status == 503
        assert (await resp.json())["reason"] == "draining"
    async with http.get(f"{server.url}/health") as resp:
        assert resp.status == 200  # alive, just not taking traffic


async def test_metrics_track_the_traffic(
    server: Server, http: aiohttp.ClientSession, connect: Connect
) -> None:
    agent = await connect("agent-m", "agent")
    customer = await connect("cust-m", "customer")
    conv = await open_conversation(agent, "cust-m")
    for n in range(3):
        ack = await customer.request(
            {
                "op": "send",
                "id": n,
                "conv": conv,
                "client_msg_id": f"m{n}",
                "type": "text",
                "body": {"text": "hi"},
            }
        )
        assert ack["op"] == "ack"
        await agent.recv_op("message")
    await customer.request({"op": "bogus", "id": "x"})

    async with http.get(f"{server.url}/metrics") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/plain"
        text = await resp.text()
    samples = dict(
        line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#")
    )
    assert float(samples["websocket_connections_total"]) == 2
    assert float(samples['kefu_messages_total{result="stored",type="text"}']) == 3
    assert float(samples["websocket_message_latency_seconds_count"]) == 3
    assert float(samples['kefu_errors_total{code="unknown_op"}']) == 1
    assert float(samples["kefu_store_batch_size_count"]) >= 1
    assert float(samples["kefu_store_commit_seconds_count"]) >= 1
    assert "kefu_ack_latency_seconds_bucket" in text


async def test_the_node_watches_its_event_loop(server: Server) -> None:
    def samples() -> float:
        registry = server.node.metrics.registry
        return registry.get_sample_value("kefu_event_loop_lag_seconds_count") or 0.0

    before = samples()
    await asyncio.sleep(0.35)  # the watch samples every 0.1 s
    assert samples() >= before + 2
