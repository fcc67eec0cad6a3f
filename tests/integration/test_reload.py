"""Settings that change without a restart: SIGHUP on one node, ``kefu config`` for all."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from kefu import cli
from kefu.cluster import redis_client as rc
from kefu.config import hot_merge, is_hot
from kefu.errors import CloseCode
from kefu.server import Server
from tests.conftest import make_config, token
from tests.process import NodeProcess


def test_hot_and_cold_settings() -> None:
    assert is_hot("rate_per_second") and is_hot("accept_timeout") and is_hot("node_weight")
    assert is_hot("heartbeat_interval") and is_hot("allowed_origins")
    assert not is_hot("port") and not is_hot("redis_url") and not is_hot("jwt_secret")
    assert not is_hot("no_such_setting")


def test_hot_merge_takes_hot_settings_and_names_the_rest(tmp_path: Path) -> None:
    running = make_config(tmp_path)
    wanted = running.replace(rate_per_second=99, port=1234, accept_timeout=5)
    merged, applied, restart = hot_merge(running, wanted)
    assert applied == ["accept_timeout", "rate_per_second"] and restart == ["port"]
    assert merged.limits.rate_per_second == 99 and merged.service.accept_timeout == 5
    assert merged.port == running.port


async def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "not reached in time"
        await asyncio.sleep(0.05)


OPEN: list[aiohttp.ClientWebSocketResponse] = []


async def ws_close_code(http: aiohttp.ClientSession, url: str, user: str) -> int | None:
    """Connect as ``user``; None when accepted (kept open in OPEN), else the close code."""
    ws = await http.ws_connect(f"{url}/ws?user_id={user}&token={token(user)}")
    msg = await ws.receive(timeout=5)
    if msg.type is aiohttp.WSMsgType.TEXT and '"hello"' in msg.data:
        OPEN.append(ws)
        return None
    await ws.close()
    return ws.close_code


@pytest.mark.slow
async def test_sighup_rereads_the_config_file(tmp_path: Path) -> None:
    conf = tmp_path / "kefu.toml"
    conf.write_text("[limits]\nmax_connections_per_user = 5\n")
    node = NodeProcess(tmp_path / "data", env={"KEFU_CONFIG": str(conf)}, log_level="INFO")
    await node.start()
    try:
        async with aiohttp.ClientSession() as http:
            assert await ws_close_code(http, node.url, "u1") is None
            assert await ws_close_code(http, node.url, "u1") is None
            conf.write_text("compression = false\n[limits]\nmax_connections_per_user = 2\n")
            assert node.proc is not None
            os.kill(node.proc.pid, signal.SIGHUP)

            async def reloaded() -> bool:
                async with http.get(f"{node.url}/metrics") as resp:
                    return "kefu_config_reloads_total 1.0" in await resp.text()

            for _ in range(100):
                if await reloaded():
                    break
                await asyncio.sleep(0.05)
            assert await reloaded()
            # the third connection of u1 is now one too many (compression waits for a restart)
            assert await ws_close_code(http, node.url, "u1") == CloseCode.TOO_MANY_CONNECTIONS
            while OPEN:
                await OPEN.pop().close()
        log = node.log.read_text()
        assert "compression change only with a restart" in log
    finally:
        node.stop()


async def test_cluster_wide_settings_reach_every_node(
    tmp_path: Path, postgres_url: str, redis_url: str
) -> None:
    def config(i: int) -> Server:
        return Server(
            make_config(
                tmp_path / f"n{i}",
                node_id=f"n{i}",
                redis_url=redis_url,
                database_url=postgres_url,
                node_heartbeat=0.2,
                node_ttl=1.0,
            )
        )

    nodes = [config(0), config(1)]
    for node in nodes:
        await node.start()
    try:
        argv = ["config", "set", "accept_timeout=7", "node_weight=2", "--redis-url", redis_url]
        assert await asyncio.to_thread(cli.main, argv) == 0
        await eventually(lambda: all(n.node.config.service.accept_timeout == 7 for n in nodes))
        assert all(n.node.desk.settings.accept_timeout == 7 for n in nodes)
        await eventually(
            lambda: all(
                n.node.broker.membership.ring.points_of("n0") == 200  # type: ignore[attr-defined]
                for n in nodes
            )
        )
        late = config(2)  # a node that starts later takes them too
        await late.start()
        nodes.append(late)
        assert late.node.config.service.accept_timeout == 7
        # settings that need a restart, unknown ones and bad values are refused up front
        for bad in ("port=1", "no_such=1", "accept_timeout=soon"):
            argv = ["config", "set", bad, "--redis-url", redis_url]
            assert await asyncio.to_thread(cli.main, argv) == 2
        argv = ["config", "unset", "accept_timeout", "--redis-url", redis_url]
        assert await asyncio.to_thread(cli.main, argv) == 0
        await eventually(lambda: all(n.node.config.service.accept_timeout == 60 for n in nodes))
        client, _ = await rc.connect(redis_url)
        try:
            assert await client.hgetall(rc.SETTINGS) == {b"node_weight": b"2"}
        finally:
            await client.aclose()
    finally:
        for node in reversed(nodes):
            await node.stop()
