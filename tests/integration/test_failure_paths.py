"""Failure paths found in review: drain during a slow send, writer restarts that fail,
a black-holed connection, the SDK's end of stream and its retry rules."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

import kefu.store.sqlite as sqlite_store
from kefu.client import Backoff, Client, ConnectionClosed, RemoteError
from kefu.metrics import Metrics
from kefu.model import NewMessage, Role
from kefu.server import Server
from kefu.store.sqlite import SQLiteStore
from tests.conftest import RawClient, make_config, open_conversation, token


async def test_drain_waits_for_a_send_whose_lookup_is_in_flight(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """SIGTERM while a send awaits a (slow) conversation lookup: the send is either
    refused or acked before the 1012 close, never stored silently."""
    srv = Server(make_config(tmp_path / "data"))
    await srv.start()
    store = srv.node.store
    agent = RawClient(
        await http.ws_connect(f"{srv.url}/ws?user_id=ag&token={token('ag', 'agent')}")
    )
    cust = RawClient(await http.ws_connect(f"{srv.url}/ws?user_id=cu&token={token('cu')}"))
    await agent.recv_op("hello")
    await cust.recv_op("hello")
    conv = await open_conversation(agent, "cu")

    real_get = store.get_conversation

    async def slow_get(conv_id: str) -> Any:
        await asyncio.sleep(0.3)
        return await real_get(conv_id)

    store.cached_conversation = lambda conv_id: None  # type: ignore[method-assign]
    store.get_conversation = slow_get  # type: ignore[method-assign]
    await cust.send(
        {
            "op": "send",
            "id": "s",
            "conv": conv,
            "client_msg_id": "k1",
            "type": "text",
            "body": {"text": "racing the drain"},
        }
    )
    await asyncio.sleep(0.05)  # the send is now inside the lookup
    stopping = asyncio.ensure_future(srv.stop())
    frames = []
    while True:
        msg = await cust.ws.receive(timeout=10)
        if msg.type is not aiohttp.WSMsgType.TEXT:
            break
        frames.append(msg.json())
    await stopping
    replies = [f for f in frames if f.get("id") == "s"]
    assert len(replies) == 1, frames
    reply = replies[0]

    again = Server(make_config(tmp_path / "data"))
    await again.start()
    try:
        stored = await again.node.store.messages_after(conv, 0, 10)
    finally:
        await again.stop()
    if reply["op"] == "ack":
        assert [m.client_msg_id for m in stored] == ["k1"]
    else:
        assert reply["code"] == "shutting_down" and stored == []


async def test_writer_restart_survives_a_failing_spawn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_store, "RESTART_DELAY", 0.05)
    store = SQLiteStore(tmp_path / "kefu.sqlite3", metrics=Metrics())
    await store.start()
    try:
        conv = (await store.create_conversation(customer_id="c")).id
        runner = store._runner
        assert isinstance(runner, sqlite_store._ProcessRunner) and runner._proc is not None
        real_spawn = asyncio.create_subprocess_exec
        failures = []

        async def flaky_spawn(*args: Any, **kwargs: Any) -> Any:
            if len(failures) < 2:
                failures.append(1)
                raise OSError(24, "Too many open files")
            return await real_spawn(*args, **kwargs)

        monkeypatch.setattr(asyncio, "create_subprocess_exec", flaky_spawn)
        runner._proc.kill()
        for _ in range(200):
            if runner.alive and len(failures) == 2:
                break
            await asyncio.sleep(0.05)
        assert runner.alive and len(failures) == 2
        message = NewMessage(
            conv=conv,
            sender="c",
            sender_role=Role.CUSTOMER,
            client_msg_id="x",
            type="text",
            body=b'{"text":"x"}',
        )
        assert (await store.append(message)).seq == 1
    finally:
        await store.close()


async def test_client_notices_a_black_holed_connection(tmp_path: Path) -> None:
    """A server that stops answering (no FIN, no RST) is detected by the heartbeat."""
    accepted = 0

    async def silent(request: web.Request) -> web.WebSocketResponse:
        nonlocal accepted
        accepted += 1
        ws = web.WebSocketResponse(autoping=False)
        await ws.prepare(request)
        await ws.send_str(
            '{"op":"hello","user":"u","role":"customer","session":"s",'
            '"node":"n","heartbeat":30.0,"protocol":1}'
        )
        await asyncio.sleep(30)  # never reads, never answers a ping
        return ws

    app = web.Application()
    app.router.add_get("/ws", silent)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    client = Client(
        f"http://127.0.0.1:{port}",
        "u",
        "t",
        heartbeat=0.3,
        backoff=Backoff(0.05, 0.1),
        request_timeout=0.5,
    )
    try:
        with pytest.raises((TimeoutError, ConnectionResetError, RemoteError)):
            await client.connect()  # the convs request is never answered
        if client._runner is None:  # connect raised in _resume: the runner still runs
            pytest.fail("the runner should have started")
        for _ in range(100):
            if accepted >= 2:
                break
            await asyncio.sleep(0.05)
        assert accepted >= 2, "the client kept a dead connection instead of reconnecting"
    finally:
        await client.close()
        await runner.cleanup()


async def test_messages_end_when_the_client_closes(server: Server) -> None:
    client = Client(server.url, "cust-end", token("cust-end"))
    await client.connect()
    reader = asyncio.ensure_future(_collect(client))
    await asyncio.sleep(0.1)
    await client.close()
    assert await asyncio.wait_for(reader, 5) == []
    with pytest.raises(ConnectionClosed):
        await client.next_message(1)


async def _collect(client: Client) -> list[Any]:
    return [m async for m in client.messages()]


def test_remote_error_retryable_follows_the_frame() -> None:
    assert RemoteError("overloaded", "x").retryable
    assert not RemoteError("forbidden", "x").retryable
    assert not RemoteError("some_future_code", "x").retryable
    assert RemoteError("some_future_code", "x", retryable=True).retryable
    assert not RemoteError("internal", "x", retryable=False).retryable


async def test_background_sync_is_retried_until_it_succeeds(server: Server) -> None:
    client = Client(server.url, "cust-sync", token("cust-sync"), backoff=Backoff(0.01, 0.02))
    await client.connect()
    calls = 0

    async def flaky_sync(conv: str) -> None:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise TimeoutError("no reply")

    client.sync = flaky_sync  # type: ignore[method-assign]
    try:
        client._start_sync("some-conv")
        await asyncio.wait_for(client._syncing["some-conv"], 5)
        assert calls == 3
        assert "some-conv" not in client._syncing
    finally:
        await client.close()
