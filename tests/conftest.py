"""Shared fixtures: an in-process node on a free port, tokens, raw WebSocket clients."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from kefu.auth import issue_token
from kefu.config import Config, build_config
from kefu.server import Server

pytest_plugins = ["tests.services"]  # throwaway Redis and PostgreSQL servers

SECRET = "test-secret-0123456789-0123456789-abcdef"

#: The backends the behaviour suites run against (docs/operations.md "Cluster mode"):
#: embedded, Redis + PostgreSQL, a 3-master Redis Cluster + PostgreSQL. ("postgres", the
#: single node on PostgreSQL without Redis, is covered by the store contract and can be
#: added here by hand.)
BACKENDS = ("embedded", "redis+postgres", "cluster+postgres")
#: Modules whose every test runs once per backend: the protocol and customer-service
#: behaviour suites. Other modules run on the embedded backend only.
BACKEND_SUITES = frozenset(
    {
        "test_smoke",
        "test_bad_input",
        "test_client",
        "test_protocol_doc",
        "test_http",
        "test_desk",
        "test_desk_races",
        "test_desk_webhooks",
        "test_api",
    }
)
#: Settings the current test's backend adds to every node config (see ``kefu_backend``).
_backend_settings: dict[str, Any] = {}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    module = metafunc.module.__name__.rsplit(".", 1)[-1]
    if "kefu_backend" in metafunc.fixturenames and module in BACKEND_SUITES:
        metafunc.parametrize("kefu_backend", BACKENDS, indirect=True)


@pytest.fixture(autouse=True)
def kefu_backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """Which backend this test's nodes use: ``make_config`` adds its URLs."""
    name: str = getattr(request, "param", "embedded")
    settings: dict[str, Any] = {}
    if name in ("postgres", "redis+postgres", "cluster+postgres"):
        settings["database_url"] = request.getfixturevalue("postgres_url")
    if name == "redis+postgres":
        settings["redis_url"] = request.getfixturevalue("redis_url")
    if name == "cluster+postgres":
        cluster = request.getfixturevalue("redis_cluster")
        cluster.flushall()
        settings["redis_url"] = cluster.url
    _backend_settings.clear()
    _backend_settings.update(settings)
    try:
        yield name
    finally:
        _backend_settings.clear()


def make_config(data_dir: Path, **overrides: Any) -> Config:
    """A test node's config: free port, fast timers, the test secret, asyncio loop."""
    base = dataclasses.replace(
        Config(), jwt_secret=SECRET, jwt_secret_source="configured", node_id="test-node"
    )
    settings: dict[str, Any] = {
        "port": 0,
        "data_dir": data_dir,
        "use_uvloop": False,
        "shutdown_grace": 3.0,
    }
    settings.update(_backend_settings)
    settings.update(overrides)
    return build_config(base=base, overrides=settings)


def token(user: str, role: str = "customer", ttl: float = 3600.0) -> str:
    return issue_token(SECRET, user, role, ttl=ttl)


class RawClient:
    """A bare WebSocket client speaking JSON frames; for protocol-level tests."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send_str(json.dumps(frame))

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        msg = await self.ws.receive(timeout=timeout)
        assert msg.type is aiohttp.WSMsgType.TEXT, f"expected a text frame, got {msg!r}"
        frame: dict[str, Any] = json.loads(msg.data)
        return frame

    async def recv_op(self, op: str, timeout: float = 5.0) -> dict[str, Any]:
        """Receive frames until one with ``op`` arrives (others are skipped)."""
        while True:
            frame = await self.recv(timeout)
            if frame.get("op") == op:
                return frame

    async def request(self, frame: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        """Send a frame with an id and return the reply carrying that id."""
        await self.send(frame)
        while True:
            reply = await self.recv(timeout)
            if reply.get("id") == frame.get("id"):
                return reply

    async def closed(self, timeout: float = 5.0) -> int | None:
        """Skip text frames until the close frame; return its close code."""
        while True:
            msg = await self.ws.receive(timeout=timeout)
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                return self.ws.close_code
            if msg.type is aiohttp.WSMsgType.ERROR:
                return self.ws.close_code

    async def close(self) -> None:
        await self.ws.close()


Connect = Callable[..., Awaitable[RawClient]]


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    srv = Server(make_config(tmp_path / "data"))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def connect(server: Server, http: aiohttp.ClientSession) -> Connect:
    """Open an authenticated raw client: ``await connect("alice", "customer")``."""

    async def _connect(
        user: str, role: str = "customer", *, hello: bool = True, **kwargs: Any
    ) -> RawClient:
        url = f"{server.url}/ws?user_id={user}&token={token(user, role)}"
        client = RawClient(await http.ws_connect(url, **kwargs))
        if hello:
            frame = await client.recv()
            assert frame["op"] == "hello", frame
        return client

    return _connect


async def open_conversation(agent: RawClient, customer_id: str) -> str:
    """Have an agent open a conversation with a customer; return its id."""
    reply = await agent.request({"op": "open", "id": "open", "customer_id": customer_id})
    assert reply["op"] == "conversation", reply
    conv: str = reply["conversation"]["conv"]
    return conv
