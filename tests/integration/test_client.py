"""The Python client SDK against a real node: ordering, dedupe, reconnect and resync."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from kefu.client import Client, ConnectionClosed, RemoteError
from kefu.server import Server
from tests.conftest import make_config, token


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def drain_messages(
    client: Client, count: int, timeout: float = 10.0
) -> list[tuple[str, int]]:
    got = []
    for _ in range(count):
        msg = await client.next_message(timeout)
        got.append((msg.conv, msg.seq))
    return got


async def test_roundtrip_in_order_exactly_once(server: Server) -> None:
    async with (
        Client(server.url, "agent-a", token("agent-a", "agent")) as agent,
        Client(server.url, "cust-a", token("cust-a")) as customer,
    ):
        info = await agent.open(customer_id="cust-a")
        acks = [await customer.send(info.conv, f"m{i}") for i in range(20)]
        assert [a.seq for a in acks] == list(range(1, 21))
        assert await drain_messages(agent, 20) == [(info.conv, s) for s in range(1, 21)]
        # The sender's own stream has its messages too, once each.
        assert await drain_messages(customer, 20) == [(info.conv, s) for s in range(1, 21)]
        # A resend with the same client_msg_id is acked with the original seq.
        again = await customer.send(info.conv, "m0", client_msg_id=acks[0].client_msg_id)
        assert again.duplicate and again.seq == 1
        with pytest.raises(asyncio.TimeoutError):
            await agent.next_message(0.3)


async def test_forbidden_is_not_retried(server: Server) -> None:
    async with (
        Client(server.url, "agent-b", token("agent-b", "agent")) as agent,
        Client(server.url, "intruder", token("intruder")) as intruder,
    ):
        info = await agent.open(customer_id="cust-b")
        with pytest.raises(RemoteError) as err:
            await intruder.send(info.conv, "let me in")
        assert err.value.raw_code == "forbidden"


async def test_terminal_close_stops_reconnecting(server: Server) -> None:
    client = Client(server.url, "someone-else", token("cust-c"))
    with pytest.raises(ConnectionClosed) as err:
        await client.connect()
    assert err.value.close_code == 4502
    await client.close()


async def test_reconnect_and_resync_across_restart(tmp_path: Path) -> None:
    cfg = make_config(tmp_path / "data", port=free_port())
    srv = Server(cfg)
    await srv.start()
    agent = Client(srv.url, "agent-r", token("agent-r", "agent"))
    customer = Client(srv.url, "cust-r", token("cust-r"))
    await agent.connect()
    await customer.connect()
    try:
        info = await agent.open(customer_id="cust-r")
        for i in range(5):
            await customer.send(info.conv, f"before {i}")
        assert await drain_messages(agent, 5) == [(info.conv, s) for s in range(1, 6)]

        await srv.stop()  # clients are closed with 1012 and start reconnecting
        assert 1012 in agent.close_codes
        # Sends issued while the node is down are retried until it is back.
        pending = [asyncio.ensure_future(customer.send(info.conv, f"during {i}")) for i in range(5)]
        await asyncio.sleep(0.3)
        srv = Server(cfg)
        await srv.start()
        acks = await asyncio.wait_for(asyncio.gather(*pending), 20)
        assert sorted(a.seq for a in acks) == list(range(6, 11))
        # The agent got the messages sent while it was away, once each, in order.
        assert await drain_messages(agent, 5, timeout=15) == [(info.conv, s) for s in range(6, 11)]
        assert agent.reconnects >= 1
        with pytest.raises(asyncio.TimeoutError):
            await agent.next_message(0.3)
    finally:
        await agent.close()
        await customer.close()
        await srv.stop()
