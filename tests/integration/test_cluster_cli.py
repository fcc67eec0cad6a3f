"""The cluster's operator tools against real servers: ``kefu migrate`` on PostgreSQL,
``kefu route`` on Redis (entries written as membership writes them, and live in-process
nodes), ``GET /api/v1/cluster`` in embedded and cluster mode, and (slow) ``kefu cluster up``
/ ``kefu cluster down`` with real processes.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from kefu.auth import issue_token
from kefu.cli import main
from kefu.cluster import redis_client as rc
from kefu.cluster.broker import RedisBroker
from kefu.cluster.local import port_free
from kefu.cluster.ring import Ring
from kefu.cluster.view import live_members, node_info, nodes_of, ring_of
from kefu.server import Server
from kefu.store.pg_schema import migrations
from tests.conftest import Connect, make_config, token
from tests.process import free_port
from tests.services import RedisClusterServers, RedisServer, ensure_installed

CLUSTER = "/api/v1/cluster"


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out = capsys.readouterr()
    return status, out.out, out.err


async def run_cli_async(*argv: str) -> int:
    """``main`` from a test's event loop (it runs one of its own): in a thread."""
    return await asyncio.to_thread(main, list(argv))


async def get(
    http: aiohttp.ClientSession, url: str, who: tuple[str, str] | None = ("root", "admin")
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token(*who)}"} if who else {}
    async with http.get(url + CLUSTER, headers=headers) as resp:
        return resp.status, await resp.json()


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


# -- kefu migrate ------------------------------------------------------------------------------


def test_migrate_applies_then_says_current(
    postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    latest = migrations()[-1]
    status, out, _ = run_cli(capsys, "migrate", "--database-url", postgres_url)
    assert status == 0
    lines = out.splitlines()
    assert lines[0] == "applied migration 0001_initial"
    assert len(lines) == latest.version + 1
    assert lines[-1] == f"schema is current (version {latest.version})"
    status, out, _ = run_cli(capsys, "migrate", "--database-url", postgres_url)
    assert (status, out) == (0, f"schema is current (version {latest.version})\n")

    async def applied() -> list[int]:
        conn = await asyncpg.connect(postgres_url)
        try:
            rows = await conn.fetch("SELECT version FROM kefu_schema_migrations ORDER BY 1")
        finally:
            await conn.close()
        return [r["version"] for r in rows]

    assert asyncio.run(applied()) == list(range(1, latest.version + 1))


def test_migrate_refuses_a_database_it_cannot_reach_or_that_is_too_new(
    postgres_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    closed = f"postgresql://postgres:hunter2@127.0.0.1:{free_port()}/kefu"
    status, out, err = run_cli(capsys, "migrate", "--database-url", closed)
    assert (status, out) == (2, "")
    assert "cannot reach the database" in err and "hunter2" not in err and ":***@" in err
    missing = postgres_url.rsplit("/", 1)[0] + "/no_such_database"
    status, _, err = run_cli(capsys, "migrate", "--database-url", missing)
    assert status == 2 and "no_such_database" in err

    async def from_the_future() -> None:
        conn = await asyncpg.connect(postgres_url)
        try:
            await conn.execute(
                "CREATE TABLE kefu_schema_migrations (version INTEGER PRIMARY KEY,"
                " name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            await conn.execute("INSERT INTO kefu_schema_migrations VALUES (999, 'future')")
        finally:
            await conn.close()

    asyncio.run(from_the_future())
    status, _, err = run_cli(capsys, "migrate", "--database-url", postgres_url)
    assert status == 2 and "newer than this Kefu" in err


# -- kefu route --------------------------------------------------------------------------------


def write_member(
    redis: RedisServer, member: str, expires_ms: int, *, weight: str = "1.0", started: int = 1
) -> None:
    """An entry as Membership.beat writes it."""
    node = member.rpartition("/")[0]
    redis.command("ZADD", rc.MEMBERS, expires_ms, member)
    redis.command(
        "HSET", rc.member_info(member),
        "node", node,
        "weight", weight,
        "url", f"http://127.0.0.1:9{node[-1]}00",
        "started", started,
        "connections", 3,
    )  # fmt: skip


@pytest.fixture
def members(redis_url: str, redis_server: RedisServer) -> dict[str, str]:
    """node-a (restarted: two incarnations), node-b (weight 2), node-c (expired)."""
    now = int(time.time() * 1000)
    write_member(redis_server, "node-a/old", now + 60_000, started=100)
    write_member(redis_server, "node-a/new", now + 60_000, started=200)
    write_member(redis_server, "node-b/0001", now + 60_000, weight="2.0", started=150)
    write_member(redis_server, "node-c/dead", now - 1, started=300)
    return {"node-a": "node-a/new", "node-b": "node-b/0001"}


def test_route_prints_the_home_node_of_the_live_ring(
    redis_url: str, members: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    ring = Ring({"node-a": 1.0, "node-b": 2.0})
    users = [f"user-{i}" for i in range(20)]
    assert {ring.owner(u) for u in users} == {"node-a", "node-b"}  # both sides covered
    for user in users:
        status, out, err = run_cli(capsys, "route", user, "--redis-url", redis_url)
        assert status == 0, err
        home = ring.owner(user)
        assert out.splitlines() == [
            f"user: {user}",
            f"node: {home}",
            f"url: http://127.0.0.1:9{home[-1]}00",
            f"incarnation: {members[home]}",
            f"ring_version: {ring.version}",
            "nodes: node-a, node-b",
        ]
    # ring_vnodes comes from the configuration, as on the nodes
    status, out, _ = run_cli(
        capsys, "route", "u", "--redis-url", redis_url, "--set", "ring_vnodes=7"
    )
    assert status == 0
    assert f"ring_version: {Ring({'node-a': 1.0, 'node-b': 2.0}, vnodes=7).version}" in out


def test_route_without_live_nodes_or_redis_exits_2(
    redis_url: str, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run_cli(capsys, "route", "u", "--redis-url", redis_url)
    assert (status, out) == (2, "")
    assert "no live node" in err
    write_member(redis_server, "node-x/1", int(time.time() * 1000) - 1000)  # expired only
    assert run_cli(capsys, "route", "u", "--redis-url", redis_url)[0] == 2
    status, _, err = run_cli(
        capsys, "route", "u", "--redis-url", f"redis://127.0.0.1:{free_port()}/0"
    )
    assert status == 2 and "cannot reach Redis" in err
    seeds = f"redis://127.0.0.1:{free_port()},127.0.0.1:{free_port()}"  # a Redis Cluster's
    status, _, err = run_cli(capsys, "route", "u", "--redis-url", seeds)
    assert status == 2 and "cannot reach Redis" in err


async def test_route_on_a_redis_cluster(
    redis_cluster: RedisClusterServers, capsys: pytest.CaptureFixture[str]
) -> None:
    redis_cluster.flushall()
    client, is_cluster = await rc.connect(redis_cluster.url)
    try:
        assert is_cluster
        now = int(time.time() * 1000)
        for member, weight in (("node-a/1", "1.0"), ("node-b/2", "3.0")):
            await client.zadd(rc.MEMBERS, {member: now + 60_000})
            await client.hset(
                rc.member_info(member),
                mapping={"node": member[:6], "weight": weight, "url": "u-" + member[:6]},
            )
    finally:
        await client.aclose()
    ring = Ring({"node-a": 1.0, "node-b": 3.0})
    for user in ("cust-1", "cust-2", "cust-3"):
        assert await run_cli_async("route", user, "--redis-url", redis_cluster.url) == 0
        out = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
        assert (out["node"], out["url"]) == (ring.owner(user), "u-" + ring.owner(user))
        assert out["ring_version"] == ring.version


async def test_view_reads_what_membership_wrote(redis_url: str, members: dict[str, str]) -> None:
    client, cluster = await rc.connect(redis_url)
    try:
        live = await live_members(client)
    finally:
        await client.aclose()
    assert not cluster
    assert sorted(live) == ["node-a/new", "node-a/old", "node-b/0001"]
    assert live["node-b/0001"]["weight"] == "2.0"
    nodes = nodes_of(live)
    assert list(nodes) == ["node-a", "node-b"]
    assert nodes["node-a"].incarnation == "node-a/new"  # the newest start wins
    assert (nodes["node-b"].weight, nodes["node-b"].connections) == (2.0, 3)
    assert ring_of(live) == Ring({"node-a": 1.0, "node-b": 2.0})
    assert ring_of({}) == Ring({})


def test_view_tolerates_garbled_entries() -> None:
    info = node_info("n/1", {"weight": "nan", "started": "x", "connections": ""})
    assert (info.node, info.weight, info.started, info.connections, info.url) == (
        "n",
        1.0,
        0,
        0,
        "",
    )
    assert node_info("bare", {"weight": "-2"}, default_weight=3.0).weight == 3.0
    assert node_info("bare", {}).node == "bare"


# -- GET /api/v1/cluster: embedded -------------------------------------------------------------


async def test_cluster_api_in_embedded_mode(
    server: Server, http: aiohttp.ClientSession, connect: Connect
) -> None:
    client = await connect("cust-1")
    status, body = await get(http, server.url)
    assert status == 200, body
    config = server.config
    ring = Ring({config.node_id: config.cluster.node_weight}, vnodes=config.cluster.ring_vnodes)
    assert body["mode"] == "embedded"
    assert body["node"] == config.node_id == "test-node"
    assert body["ring_version"] == ring.version
    [node] = body["nodes"]
    assert node["id"] == config.node_id
    assert node["url"] == server.url  # the bound port, not the configured 0
    assert (node["weight"], node["connections"], node["incarnation"]) == (1.0, 1, None)
    assert abs(node["started"] - time.time() * 1000) < 60_000
    await client.close()

    for who in (("ag1", "agent"), ("cu1", "customer")):
        status, body = await get(http, server.url, who)
        assert status == 403 and body["error"]["code"] == "forbidden"
    status, body = await get(http, server.url, None)
    assert status == 401 and body["error"]["code"] == "unauthenticated"


async def test_cluster_route_is_in_the_openapi_document(
    server: Server, http: aiohttp.ClientSession
) -> None:
    async with http.get(server.url + "/api/openapi.json") as resp:
        doc = await resp.json()
    op = doc["paths"][CLUSTER]["get"]
    assert op["description"] == "Roles: admin."
    ref = op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    schema = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert set(schema["properties"]) == {"mode", "node", "ring_version", "nodes"}
    node_ref = schema["properties"]["nodes"]["items"]["$ref"]
    node = doc["components"]["schemas"][node_ref.rsplit("/", 1)[1]]
    assert set(node["properties"]) == {
        "id",
        "url",
        "weight",
        "connections",
        "started",
        "incarnation",
    }


# -- GET /api/v1/cluster and kefu route: live cluster nodes ------------------------------------


def broker(server: Server) -> RedisBroker:
    b = server.node.broker
    assert isinstance(b, RedisBroker)
    return b


@pytest.fixture
async def nodes(tmp_path: Path, redis_url: str, postgres_url: str) -> AsyncIterator[list[Server]]:
    servers: list[Server] = []
    try:
        for i, weight in enumerate((1.0, 2.0)):
            config = make_config(
                tmp_path / f"n{i}",
                node_id=f"n{i}",
                port=free_port(),  # a real port: the URL a node advertises is usable
                redis_url=redis_url,
                database_url=postgres_url,
                node_weight=weight,
                node_heartbeat=0.2,
                node_ttl=1.0,
            )
            server = Server(config)
            await server.start()
            servers.append(server)

        async def all_see_each_other() -> bool:
            return all(len(broker(s).membership.ring) == 2 for s in servers)

        await eventually(all_see_each_other)
        yield servers
    finally:
        for server in reversed(servers):
            await server.stop()


async def test_cluster_api_in_cluster_mode(
    nodes: list[Server], http: aiohttp.ClientSession
) -> None:
    n0, n1 = nodes
    ws = await http.ws_connect(f"{n1.url}/ws?user_id=cust-1&token={token('cust-1')}")
    try:
        assert json.loads((await ws.receive(timeout=5)).data)["op"] == "hello"

        async def n0_sees_the_connection_on_n1() -> bool:
            _, body = await get(http, n0.url)
            return bool(body["nodes"][1]["connections"] == 1)

        await eventually(n0_sees_the_connection_on_n1)  # as of n1's next heartbeat
        for server in nodes:
            status, body = await get(http, server.url)
            assert status == 200, body
            membership = broker(server).membership
            assert body["mode"] == "cluster"
            assert body["node"] == server.config.node_id
            assert body["ring_version"] == membership.ring.version
            assert body["ring_version"] == Ring({"n0": 1.0, "n1": 2.0}).version
            assert [n["id"] for n in body["nodes"]] == ["n0", "n1"]
            for node, peer in zip(body["nodes"], nodes, strict=True):
                peer_membership = broker(peer).membership
                assert node["url"] == peer.url
                assert node["weight"] == peer.config.cluster.node_weight
                assert node["incarnation"] == peer_membership.incarnation
                assert node["started"] == peer_membership.started
            assert [n["connections"] for n in body["nodes"]] == [0, 1]
        for who in (("ag1", "agent"), ("cu1", "customer")):
            assert (await get(http, n0.url, who))[0] == 403
        assert (await get(http, n0.url, None))[0] == 401
    finally:
        await ws.close()


async def test_route_names_the_home_node_the_cluster_uses(
    nodes: list[Server], redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ring = broker(nodes[0]).membership.ring
    urls = {s.config.node_id: s.url for s in nodes}
    for user in ("cust-1", "cust-2", "cust-3", "agent-9"):
        assert await run_cli_async("route", user, "--redis-url", redis_url) == 0
        out = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
        assert out["node"] == ring.owner(user)
        assert out["url"] == urls[out["node"]]
        assert out["ring_version"] == ring.version


# -- kefu cluster up / down (real processes) ------------------------------------------------------


def _consecutive_free_ports(count: int) -> int:
    for _ in range(100):
        base = free_port()
        if base + count <= 65536 and all(port_free(base + i) for i in range(count)):
            return base
    raise RuntimeError("no consecutive free ports")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _group_alive(pgid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            found.append(int(stat.parent.name))
    return found


def _kefu(*argv: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEFU_")}
    return subprocess.run(
        [sys.executable, "-m", "kefu", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.slow
async def test_cluster_up_and_down(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    ensure_installed()  # redis-server, initdb and postgres, as for the other server tests
    directory = tmp_path / "cluster"
    base = _consecutive_free_ports(2)
    up = await asyncio.to_thread(
        _kefu,
        "cluster", "up",
        "--nodes", "2",
        "--base-port", str(base),
        "--dir", str(directory),
        "--set", "node_heartbeat=0.2",
        "--set", "node_ttl=1.0",
    )  # fmt: skip
    pids: dict[str, int] = {}
    try:
        for path in (directory / "pids").glob("*.pid"):
            pids[path.stem] = int(path.read_text().split()[0])
        assert up.returncode == 0, up.stdout + up.stderr
        assert set(pids) == {"node-0", "node-1", "redis", "postgres"}
        urls = [f"http://127.0.0.1:{base}", f"http://127.0.0.1:{base + 1}"]
        for url in urls:
            assert url in up.stdout
        state = json.loads((directory / "cluster.json").read_text())
        assert state["redis_url"] in up.stdout and state["database_url"] in up.stdout
        assert "kefu token" in up.stdout and "kefu cluster down" in up.stdout

        secret = (directory / "jwt-secret").read_text().strip()
        admin = issue_token(secret, "boss", "admin")
        for url in urls:
            async with http.get(url + "/ready") as resp:
                assert resp.status == 200
            async with http.get(
                url + CLUSTER, headers={"Authorization": f"Bearer {admin}"}
            ) as resp:
                assert resp.status == 200
                body = await resp.json()
            assert body["mode"] == "cluster"
            assert [(n["id"], n["url"]) for n in body["nodes"]] == list(
                zip(["node-0", "node-1"], urls, strict=True)
            )
        # kefu route agrees with the nodes
        route = await asyncio.to_thread(_kefu, "route", "cust-1", "--redis-url", state["redis_url"])
        assert route.returncode == 0, route.stderr
        assert f"ring_version: {body['ring_version']}" in route.stdout
        # a second up on the same directory refuses
        again = await asyncio.to_thread(_kefu, "cluster", "up", "--dir", str(directory))
        assert again.returncode == 2 and "already runs" in again.stderr
    finally:
        down = await asyncio.to_thread(_kefu, "cluster", "down", "--dir", str(directory))
        link = directory / "postgres"
        if link.is_symlink():  # as root, the data went to a directory of its own
            subprocess.run(["rm", "-rf", str(link.resolve())], check=False)
    assert down.returncode == 0, down.stdout + down.stderr
    for name, pid in pids.items():
        assert f"stopped {name} (pid {pid})" in down.stdout
        assert not _alive(pid), name
        assert not _group_alive(pid), name
    assert not list((directory / "pids").iterdir())
    assert not (directory / "cluster.json").exists()
    assert all(port_free(base + i) for i in range(2))
