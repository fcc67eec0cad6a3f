"""permessage-deflate: negotiated when offered, window capped, switchable off."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from kefu.server import Server
from tests.conftest import RawClient, make_config, open_conversation, token


async def exchange(url: str, http: aiohttp.ClientSession, compress: int) -> str | None:
    """Open a compressed-or-not pair, chat once, return the negotiated extension header."""
    agent = await http.ws_connect(
        f"{url}/ws?user_id=ag&token={token('ag', 'agent')}", compress=compress
    )
    customer = RawClient(
        await http.ws_connect(f"{url}/ws?user_id=cu&token={token('cu')}", compress=compress)
    )
    a = RawClient(agent)
    await a.recv_op("hello")
    await customer.recv_op("hello")
    conv = await open_conversation(a, "cu")
    text = "compressible " * 200
    ack = await customer.request(
        {
            "op": "send",
            "id": 1,
            "conv": conv,
            "client_msg_id": "z",
            "type": "text",
            "body": {"text": text},
        }
    )
    assert ack["op"] == "ack"
    assert (await a.recv_op("message"))["body"]["text"] == text
    extensions = agent._response.headers.get("Sec-WebSocket-Extensions")
    await a.close()
    await customer.close()
    return extensions


async def test_negotiated_with_capped_window(server: Server, http: aiohttp.ClientSession) -> None:
    ext = await exchange(server.url, http, compress=15)
    assert ext is not None and "permessage-deflate" in ext
    assert "server_max_window_bits=11" in ext  # the default cap, not the client's 15


async def test_not_negotiated_unless_offered(server: Server, http: aiohttp.ClientSession) -> None:
    assert await exchange(server.url, http, compress=0) is None


async def test_switched_off(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    srv = Server(make_config(tmp_path / "data", compression=False))
    await srv.start()
    try:
        assert await exchange(srv.url, http, compress=15) is None
    finally:
        await srv.stop()


async def test_window_setting(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    srv = Server(make_config(tmp_path / "data", compression_window_bits=9))
    await srv.start()
    try:
        ext = await exchange(srv.url, http, compress=15)
        assert ext is not None and "server_max_window_bits=9" in ext
    finally:
        await srv.stop()
