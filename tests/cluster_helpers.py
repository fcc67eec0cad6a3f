"""Helpers for tests that run several cluster nodes in this process (fixtures in
tests/integration/conftest.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from kefu.cluster.broker import RedisBroker
from kefu.server import Server
from tests.conftest import RawClient

Nodes = list[Server]


StartNodes = Callable[..., Awaitable[Nodes]]


Connect = Callable[..., Awaitable[RawClient]]


def broker(server: Server) -> RedisBroker:
    b = server.node.broker
    assert isinstance(b, RedisBroker)
    return b


def sample(server: Server, name: str, **labels: str) -> float:
    return server.node.metrics.registry.get_sample_value(name, labels) or 0.0


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


def send(conv: str, n: int, text: str = "") -> dict[str, Any]:
    return {
        "op": "send",
        "id": n,
        "conv": conv,
        "client_msg_id": f"m{n}",
        "type": "text",
        "body": {"text": text or f"message {n}"},
    }
