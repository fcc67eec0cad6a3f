"""kefu.cluster.resp and kefu.cluster.fastpath against real Redis servers (standalone,
with a password, and a 3-master Redis Cluster), on asyncio's own loop and on uvloop (the
loop nodes run on), since both call the protocol in their own ways."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import redis.asyncio as aioredis
import uvloop
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from kefu.cluster import redis_client as rc
from kefu.cluster.fastpath import FastPath
from kefu.cluster.resp import RespConnection, raise_first_error
from tests.services import RedisClusterServers, RedisServer

Runner = Callable[[Coroutine[Any, Any, None]], None]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Runner:
    def _run(body: Coroutine[Any, Any, None]) -> None:
        if request.param == "uvloop":
            uvloop.run(body)
        else:
            asyncio.run(body)

    return _run


async def open_conn(port: int, **kwargs: Any) -> RespConnection:
    return await RespConnection.open("127.0.0.1", port, timeout=2.0, connect_timeout=1.0, **kwargs)


def test_a_pipeline_gets_its_replies_in_order_with_errors_in_place(
    run: Runner, redis_server: RedisServer
) -> None:
    async def body() -> None:
        conn = await open_conn(redis_server.port)
        try:
            replies = await conn.execute(
                [
                    ("DEL", "t:list", "t:str"),
                    ("RPUSH", "t:list", b"a\r\nb", "c"),
                    ("SET", "t:str", "x"),
                    ("LPUSH", "t:str", "y"),  # wrong type: an error reply, in its place
                    ("LRANGE", "t:list", 0, -1),
                    ("HVALS", "t:nothing"),
                ]
            )
            assert replies[:3] == [replies[0], 2, b"OK"]
            assert isinstance(replies[3], ResponseError)
            assert replies[4:] == [[b"a\r\nb", b"c"], []]
            with pytest.raises(ResponseError, match="WRONGTYPE"):
                raise_first_error(replies)
            # many rounds in flight at once resolve each with its own replies
            rounds = await asyncio.gather(*(conn.execute([("ECHO", str(i))]) for i in range(200)))
            assert [r[0] for r in rounds] == [str(i).encode() for i in range(200)]
            assert await conn.call("PING") == b"PONG"
            with pytest.raises(ResponseError):
                await conn.call("NO-SUCH-COMMAND")
        finally:
            conn.close()
        await conn.wait_closed()
        with pytest.raises(RedisConnectionError):
            await conn.call("PING")

    run(body())


def test_subscribed_messages_reach_the_callback_and_ping_still_answers(
    run: Runner, redis_server: RedisServer
) -> None:
    async def body() -> None:
        got: list[tuple[bytes, bytes]] = []
        sub = await open_conn(redis_server.port, on_message=lambda c, d: got.append((c, d)))
        pub = await open_conn(redis_server.port)
        try:
            confirmations = await sub.execute([("SUBSCRIBE", "t:a", "t:b")], replies=2)
            assert [c[:2] for c in confirmations] == [
                [b"subscribe", b"t:a"],
                [b"subscribe", b"t:b"],
            ]
            counts = await pub.execute(
                [("PUBLISH", "t:a", b"\x00one"), ("PUBLISH", "t:b", "two"), ("PUBLISH", "t:c", "x")]
            )
            assert counts == [1, 1, 0]
            assert await sub.call("PING") == [b"pong", b""]  # after both messages, in order
            assert got == [(b"t:a", b"\x00one"), (b"t:b", b"two")]
        finally:
            sub.close()
            pub.close()

    run(body())


def test_password_and_database_are_applied(run: Runner, private_redis: RedisServer) -> None:
    private_redis.command("CONFIG", "SET", "requirepass", "s3cret")

    async def body() -> None:
        with pytest.raises(ResponseError):
            await open_conn(private_redis.port, password="wrong")
        conn = await open_conn(private_redis.port, password="s3cret", db=3)
        try:
            await conn.call("SET", "t:db", "three")
            assert await conn.call("CLIENT", "INFO") is not None
            info = (await conn.call("CLIENT", "INFO")).decode()
            assert " db=3 " in info
        finally:
            conn.close()

    run(body())


def test_a_silent_server_times_out_and_a_closed_port_is_refused(run: Runner) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]

    async def body() -> None:
        conn = await RespConnection.open("127.0.0.1", port, timeout=0.3, connect_timeout=1.0)
        started = time.monotonic()
        with pytest.raises(RedisTimeoutError):
            await conn.call("PING")
        assert time.monotonic() - started < 2.0
        assert conn.is_closed
        listener.close()
        with pytest.raises(RedisConnectionError):
            await open_conn(port)

    try:
        run(body())
    finally:
        listener.close()


def test_the_fast_path_reconnects_after_a_redis_restart(
    run: Runner, private_redis: RedisServer
) -> None:
    async def body() -> None:
        client = aioredis.Redis(host="127.0.0.1", port=private_redis.port)
        fast = FastPath(client, rc.parse_url(private_redis.url))
        try:
            assert await fast.run([("t:k", ("SET", "t:k", "1"))]) == [b"OK"]
            await asyncio.to_thread(private_redis.restart)
            # the old connection is dead: the call is made once more on a new one
            assert await fast.run([("t:k", ("SET", "t:k", "2"))]) == [b"OK"]
            await asyncio.to_thread(private_redis.kill)
            with pytest.raises(RedisConnectionError):
                await fast.run([("t:k", ("GET", "t:k"))])
        finally:
            await fast.close()
            await client.aclose()

    run(body())


def test_on_a_redis_cluster_each_command_goes_to_its_slots_master(
    run: Runner, redis_cluster: RedisClusterServers
) -> None:
    keys = [rc.presence(f"user-{i}") for i in range(60)]
    assert len({redis_cluster.node_for_key(k) for k in keys}) == 3  # spread over all masters

    async def body() -> None:
        client = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in redis_cluster.seeds])
        await client.initialize()
        fast = FastPath(client, rc.parse_url(redis_cluster.url))
        try:
            for i, key in enumerate(keys):
                assert (
                    fast.address(key)[1] == redis_cluster.seeds[redis_cluster.node_for_key(key)][1]
                )
                await client.hset(key, "c", f"n{i}")
            found = await fast.run([(k, ("HVALS", k)) for k in [*keys, rc.presence("nobody")]])
            assert found == [[f"n{i}".encode()] for i in range(len(keys))] + [[]]
            # A stale slot map: the server answers MOVED; the call fails like a lost
            # connection and the map is read again.
            right = fast.address(keys[0])
            wrong = next(a for a in map(tuple, redis_cluster.seeds) if a != right)
            fast.address = lambda key: wrong  # type: ignore[method-assign]
            with pytest.raises(RedisConnectionError, match="slot moved"):
                await fast.run([(keys[0], ("HVALS", keys[0]))])
            refreshing = fast._refreshing
            assert refreshing is not None
            await refreshing
        finally:
            await fast.close()
            await client.aclose()

    run(body())
