"""Fixtures for tests that run several cluster nodes in this process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from kefu.server import Server
from tests.cluster_helpers import Connect, Nodes, StartNodes, broker, eventually
from tests.conftest import RawClient, make_config, token
from tests.services import RedisClusterServers


@pytest.fixture(params=["redis", "redis-cluster"])
def redis_for_cluster(request: pytest.FixtureRequest) -> str:
    if request.param == "redis":
        url: str = request.getfixturevalue("redis_url")
        return url
    cluster: RedisClusterServers = request.getfixturevalue("redis_cluster")
    cluster.flushall()
    return cluster.url


@pytest.fixture
async def start_nodes(
    tmp_path: Path, postgres_url: str, redis_for_cluster: str
) -> AsyncIterator[StartNodes]:
    started: list[Server] = []

    async def _start(count: int, **settings: Any) -> Nodes:
        servers = []
        for i in range(len(started), len(started) + count):
            config = make_config(
                tmp_path / f"n{i}",
                node_id=f"n{i}",
                database_url=postgres_url,
                redis_url=redis_for_cluster,
                node_heartbeat=0.2,
                node_ttl=1.0,
                **settings,
            )
            server = Server(config)
            await server.start()
            started.append(server)
            servers.append(server)

        async def all_see_each_other() -> bool:
            return all(len(broker(s).membership.ring) == len(started) for s in started)

        await eventually(all_see_each_other)
        return servers

    yield _start
    for server in reversed(started):
        await server.stop()


@pytest.fixture
def connect_to(http: aiohttp.ClientSession) -> Connect:
    async def _connect(server: Server, user: str, role: str = "customer") -> RawClient:
        url = f"{server.url}/ws?user_id={user}&token={token(user, role)}"
        client = RawClient(await http.ws_connect(url))
        assert (await client.recv())["op"] == "hello"
        return client

    return _connect
