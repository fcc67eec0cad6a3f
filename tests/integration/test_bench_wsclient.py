"""The load generator's WebSocket client (kefu.bench.wsclient) against aiohttp's server and
against a hand-driven server that sends fragmented, control and close frames."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import struct
from collections.abc import AsyncIterator

import pytest
from aiohttp import WSMsgType, web

from kefu.bench.wsclient import HandshakeError, WsClient

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


@pytest.fixture
async def echo_url() -> AsyncIterator[str]:
    """aiohttp echoing text frames; ``/close`` closes with 4001 after the first frame."""

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=False)
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                if request.path == "/close":
                    await ws.close(code=4001, message=b"bye")
                    break
                if msg.data == "ping me":
                    await ws.ping(b"p1")
                    continue
                await ws.send_str(msg.data)
            elif msg.type is WSMsgType.PONG:
                await ws.send_str(f"pong:{msg.data.decode()}")
        return ws

    app = web.Application()
    app.router.add_get("/echo", handler)
    app.router.add_get("/close", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def receive(got: list[bytes], count: int) -> list[bytes]:
    for _ in range(200):
        if len(got) >= count:
            break
        await asyncio.sleep(0.01)
    return got


async def test_text_frames_of_every_length_class_go_both_ways(echo_url: str) -> None:
    got: list[bytes] = []
    closed: list[WsClient] = []
    client = await WsClient.connect(
        f"{echo_url}/echo?x=1", on_message=got.append, on_close=closed.append, timeout=5
    )
    payloads = [b"", b"a" * 125, "é".encode() * 63, b"b" * 126, b"c" * 65535, b"d" * 70000]
    for payload in payloads:
        client.send(payload)
    assert await receive(got, len(payloads)) == payloads
    client.send(b"ping me")  # the server pings; the client answers with the same payload
    assert (await receive(got, len(payloads) + 1))[-1] == b"pong:p1"
    client.close()
    await asyncio.sleep(0.1)
    assert closed == [client] and client.closed
    with pytest.raises(ConnectionError):
        client.send(b"late")


async def test_the_servers_close_code_is_kept(echo_url: str) -> None:
    closed: list[WsClient] = []
    client = await WsClient.connect(
        f"{echo_url}/close", on_message=lambda _: None, on_close=closed.append, timeout=5
    )
    client.send(b"hi")
    for _ in range(200):
        if closed:
            break
        await asyncio.sleep(0.01)
    assert closed == [client] and client.close_code == 4001


async def test_not_a_websocket_is_a_handshake_error(echo_url: str) -> None:
    with pytest.raises(HandshakeError, match="no upgrade"):
        await WsClient.connect(
            f"{echo_url}/missing", on_message=lambda _: None, on_close=lambda _: None, timeout=5
        )


async def raw_server(frames: bytes, *, accept: bool = True) -> tuple[asyncio.Server, int]:
    """Answers the upgrade (with a wrong key unless ``accept``), writes ``frames``, keeps
    reading."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        key = next(
            line.split(":", 1)[1].strip()
            for line in head.split("\r\n")
            if line.lower().startswith("sec-websocket-key")
        )
        digest = hashlib.sha1(key.encode() + (GUID if accept else b"x")).digest()
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + base64.b64encode(digest) + b"\r\n\r\n" + frames
        )
        await writer.drain()
        await reader.read()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_fragments_are_joined_and_control_frames_between_them_answered() -> None:
    frames = (
        bytes((0x01, 3)) + b"abc"  # text, not final
        + bytes((0x89, 2)) + b"hi"  # a ping in the middle
        + bytes((0x00, 3)) + b"def"  # continuation, not final
        + bytes((0x80, 1)) + b"!"  # final continuation
        + bytes((0x81, 126)) + struct.pack("!H", 300) + b"x" * 300
        + bytes((0x88, 2)) + struct.pack("!H", 1012)  # close: service restart
    )  # fmt: skip
    server, port = await raw_server(frames)
    got: list[bytes] = []
    closed: list[WsClient] = []
    async with server:
        client = await WsClient.connect(
            f"ws://127.0.0.1:{port}/", on_message=got.append, on_close=closed.append, timeout=5
        )
        for _ in range(200):
            if closed:
                break
            await asyncio.sleep(0.01)
    assert got == [b"abcdef!", b"x" * 300]
    assert closed == [client] and client.close_code == 1012


async def test_a_wrong_accept_key_is_refused() -> None:
    server, port = await raw_server(b"", accept=False)
    async with server:
        with pytest.raises(HandshakeError, match="Accept"):
            await WsClient.connect(
                f"ws://127.0.0.1:{port}/", on_message=lambda _: None, on_close=lambda _: None
            )
