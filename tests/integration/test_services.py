"""The throwaway Redis and PostgreSQL servers of tests/services.py: they answer, they die
on SIGKILL and come back on the same port, the cluster spreads keys over its masters, and a
committed PostgreSQL row survives a kill -9."""

from __future__ import annotations

import asyncpg
import pytest
from redis import asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot

from tests.services import (
    PostgresServer,
    RedisClusterServers,
    RedisReplyError,
    RedisServer,
    redis_command,
)

MACHINE_PORTS = {6379, 5432}  # the machine's own services: never ours


async def test_redis_set_get(redis_url: str, redis_server: RedisServer) -> None:
    assert redis_url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert redis_server.port not in MACHINE_PORTS
    client = aioredis.from_url(redis_url)
    try:
        assert await client.dbsize() == 0  # redis_url flushed whatever earlier tests left
        await client.set("greeting", "hello")
        assert await client.get("greeting") == b"hello"
    finally:
        await client.aclose()


def test_private_redis_kill_restart(private_redis: RedisServer) -> None:
    port = private_redis.port
    assert private_redis.command("SET", "k", "v") == "OK"
    private_redis.kill()
    assert not private_redis.running
    with pytest.raises(ConnectionRefusedError):
        redis_command(port, "PING")
    private_redis.restart()
    assert private_redis.port == port
    assert private_redis.command("PING") == "PONG"
    assert private_redis.command("GET", "k") is None  # no persistence: the data is gone


def test_redis_stop_and_start_again(private_redis: RedisServer) -> None:
    private_redis.stop()
    assert not private_redis.running
    private_redis.start()
    assert private_redis.command("PING") == "PONG"


def test_redis_appendonly_survives_kill() -> None:
    with RedisServer(appendonly=True) as server:
        server.start()
        assert server.command("SET", "k", "kept") == "OK"
        server.kill()
        server.restart()
        assert server.command("GET", "k") == "kept"


async def test_cluster_spreads_keys_over_masters(redis_cluster: RedisClusterServers) -> None:
    ports = [port for _, port in redis_cluster.seeds]
    assert redis_cluster.url == "redis://" + ",".join(f"127.0.0.1:{p}" for p in ports)
    assert not MACHINE_PORTS & set(ports)
    # One key per master: the first "spread-<n>" each node serves.
    keys: dict[int, str] = {}
    for key in (f"spread-{n}" for n in range(10_000)):
        keys.setdefault(redis_cluster.node_for_key(key), key)
    assert sorted(keys) == [0, 1, 2]
    client = RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in redis_cluster.seeds]
    )
    try:
        for owner, key in keys.items():
            await client.set(key, f"value-{owner}")
        for owner, key in keys.items():
            assert await client.get(key) == f"value-{owner}".encode()
        masters = {(node.host, node.port) for node in client.get_primaries()}
        assert masters == set(redis_cluster.seeds)
    finally:
        await client.aclose()
    # Each key is stored on its own master; the others redirect.
    for owner, key in keys.items():
        for index, port in enumerate(ports):
            if index == owner:
                assert redis_command(port, "GET", key) == f"value-{owner}"
            else:
                with pytest.raises(RedisReplyError, match=r"^MovedError: "):
                    redis_command(port, "GET", key)


@pytest.mark.slow
async def test_cluster_node_kill_restart(private_redis_cluster: RedisClusterServers) -> None:
    cluster = private_redis_cluster
    key = next(k for k in (f"node1-{n}" for n in range(10_000)) if cluster.node_for_key(k) == 1)
    first, last = cluster.slot_range(1)
    assert first <= key_slot(key.encode()) <= last
    assert cluster.nodes[1].command("SET", key, "v") == "OK"
    cluster.kill(1)
    cluster.restart(1)  # waits for cluster_state:ok on every node
    assert cluster.nodes[1].command("GET", key) is None  # no persistence
    client = RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in cluster.seeds])
    try:
        await client.set(key, "again")
        assert await client.get(key) == b"again"
    finally:
        await client.aclose()


async def test_postgres_url_is_a_fresh_database(
    postgres_url: str, postgres_server: PostgresServer
) -> None:
    assert postgres_url.startswith(f"postgresql://postgres@127.0.0.1:{postgres_server.port}/")
    assert postgres_server.port not in MACHINE_PORTS
    conn = await asyncpg.connect(postgres_url)
    try:
        tables = await conn.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
        assert tables == 0
        await conn.execute("CREATE TABLE t (x int)")
        await conn.execute("INSERT INTO t VALUES (1), (2)")
        assert await conn.fetchval("SELECT sum(x) FROM t") == 3
    finally:
        await conn.close()
    # The session server also has the application database.
    assert postgres_server.url.endswith("/kefu")
    assert postgres_server.psql("SELECT current_database()", "kefu") == "kefu"


async def test_postgres_committed_row_survives_kill(private_postgres: PostgresServer) -> None:
    server = private_postgres
    port = server.port
    conn = await asyncpg.connect(server.url)
    try:
        await conn.execute("CREATE TABLE t (x int)")
        await conn.execute("INSERT INTO t VALUES (42)")  # autocommit: committed on return
        server.kill()  # SIGKILL postmaster and backends, this connection's too
        with pytest.raises((asyncpg.PostgresConnectionError, ConnectionError, OSError)):
            await conn.fetchval("SELECT 1")
    finally:
        conn.terminate()
    with pytest.raises(ConnectionRefusedError):
        await asyncpg.connect(server.url, timeout=2)
    server.restart()  # crash recovery
    assert server.port == port
    conn = await asyncpg.connect(server.url)
    try:
        assert await conn.fetchval("SELECT x FROM t") == 42
    finally:
        await conn.close()
    server.stop()  # and a clean shutdown keeps it too
    server.start()
    assert server.psql("SELECT x FROM t", "kefu") == "42"
