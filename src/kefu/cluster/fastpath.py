"""The delivery path's Redis commands on :mod:`kefu.cluster.resp` connections, each sent
to the server that holds its key.

On a standalone Redis that is one connection. On a Redis Cluster each command goes to the
master of its key's slot (the slot map is redis-py's, kept by the cluster client) with one
pipeline per master, all in flight at once. A reply that says the slot moved (``MOVED``,
``ASK``: a failover or resharding) makes the map be read again and the whole call fail
like a lost connection: the delivery path's callers treat a failure as pushes lost and
clients recover by sync, as they do when Redis is unreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from kefu.cluster import redis_client as rc
from kefu.cluster.resp import Command, OnMessage, RespConnection, raise_first_error

Address = tuple[str, int]


class FastPath:
    """See the module. ``client`` is the node's redis-py client (for the slot map)."""

    def __init__(self, client: rc.RedisClient, target: rc.RedisTarget) -> None:
        self.client = client
        self.target = target
        self._conns: dict[Address, RespConnection] = {}
        self._opening: dict[Address, asyncio.Task[RespConnection]] = {}
        self._refreshing: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def cluster(self) -> bool:
        return isinstance(self.client, RedisCluster)

    def address(self, key: str) -> Address:
        """The server holding ``key`` (the master of its slot on a Redis Cluster)."""
        client = self.client
        if isinstance(client, RedisCluster):
            node = client.nodes_manager.get_node_from_slot(key_slot(key.encode()))
            return str(node.host), int(node.port)
        return self.target.seeds[0]

    async def run(self, commands: Sequence[tuple[str, Command]]) -> list[Any]:
        """Replies to ``(key, command)`` pairs, in order; raises the first reply error or
        redis-py's ConnectionError / TimeoutError (see the module for ``MOVED``)."""
        if not commands:
            return []
        if not self.cluster:
            return raise_first_error(
                await self._execute(self.target.seeds[0], [c for _, c in commands])
            )
        groups: dict[Address, list[int]] = {}
        for i, (key, _) in enumerate(commands):
            groups.setdefault(self.address(key), []).append(i)
        addresses = list(groups)
        results = await asyncio.gather(
            *(self._execute(a, [commands[i][1] for i in groups[a]]) for a in addresses),
            return_exceptions=True,
        )
        replies: list[Any] = [None] * len(commands)
        failure: BaseException | None = None
        for address, result in zip(addresses, results, strict=True):
            if isinstance(result, BaseException):
                failure = failure or result
                continue
            for i, reply in zip(groups[address], result, strict=True):
                replies[i] = reply
                if isinstance(reply, ResponseError) and _moved(reply):
                    failure = failure or RedisConnectionError(f"slot moved: {reply}")
        if failure is not None:
            self._refresh_slots()
            raise failure
        return raise_first_error(replies)

    async def subscribe(
        self, address: Address, commands: Sequence[Command], replies: int, on_message: OnMessage
    ) -> RespConnection:
        """A new connection to ``address`` in subscribe mode (``commands`` are its
        SUBSCRIBE/SSUBSCRIBE, answered ``replies`` times); the caller closes it."""
        conn = await self._open(address, on_message)
        try:
            raise_first_error(await conn.execute(commands, replies=replies))
        except BaseException:
            conn.close()
            raise
        return conn

    async def close(self) -> None:
        self._closed = True
        for task in (*self._opening.values(), self._refreshing):
            if task is not None:
                task.cancel()
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()

    # -- connections ----------------------------------------------------------------------

    async def _execute(self, address: Address, commands: list[Command]) -> list[Any]:
        conn = self._conns.get(address)
        fresh = conn is None or conn.is_closed
        if fresh:
            conn = await self._connection(address)
        assert conn is not None
        try:
            return await conn.execute(commands)
        except RedisConnectionError:
            if fresh or self._closed:
                raise
            # The server restarted since this connection was last used: once more, anew.
            conn = await self._connection(address)
            return await conn.execute(commands)

    async def _connection(self, address: Address) -> RespConnection:
        conn = self._conns.get(address)
        if conn is not None and not conn.is_closed:
            return conn
        if self._closed:
            raise RedisConnectionError("the delivery path is closed")
        task = self._opening.get(address)
        if task is None:  # one connect per server at a time, whoever waits for it
            task = asyncio.get_running_loop().create_task(self._open(address, None))
            self._opening[address] = task
            task.add_done_callback(lambda done: self._opened(address, done))
        conn = await asyncio.shield(task)
        self._conns[address] = conn
        return conn

    def _opened(self, address: Address, task: asyncio.Task[RespConnection]) -> None:
        self._opening.pop(address, None)
        if not task.cancelled():
            task.exception()  # retrieved: its waiters (if any are left) raise it

    async def _open(self, address: Address, on_message: OnMessage | None) -> RespConnection:
        target = self.target
        return await RespConnection.open(
            *address,
            timeout=rc.SOCKET_TIMEOUT,
            connect_timeout=rc.CONNECT_TIMEOUT,
            username=target.username,
            password=target.password,
            db=0 if self.cluster else target.db,
            tls=target.tls,
            on_message=on_message,
        )

    def _refresh_slots(self) -> None:
        """Read the Redis Cluster's slot map again (once at a time, in the background)."""
        client = self.client
        if not isinstance(client, RedisCluster) or self._closed:
            return
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.get_running_loop().create_task(_initialize(client))


async def _initialize(client: RedisCluster) -> None:
    with contextlib.suppress(*rc.REDIS_ERRORS):
        await client.nodes_manager.initialize()


def _moved(error: ResponseError) -> bool:
    return str(error).startswith(("MOVED ", "ASK ", "CLUSTERDOWN", "TRYAGAIN"))
