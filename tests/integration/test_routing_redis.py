"""The routing contract of tests/unit/test_routing.py, run on the Redis backend.

Every example test of that module is collected here again with ``routing`` bound to a
:class:`RedisRouting` on the test run's throwaway Redis (the Lua script does the work);
the hypothesis state machine runs on it too (RedisRoutingMachine).
"""

from __future__ import annotations

import asyncio
import atexit
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import settings

from kefu.model import AgentStatus
from kefu.routing.base import QueueEntry
from kefu.routing.redis import RedisRouting
from tests.services import RedisServer
from tests.unit import test_routing as contract

for _name in dir(contract):
    if _name.startswith("test_"):
        globals()[_name] = getattr(contract, _name)


@pytest.fixture
async def routing(redis_url: str) -> AsyncIterator[RedisRouting]:
    r = RedisRouting(redis_url, "node-a/1")
    await r.start()
    yield r
    await r.close()


async def test_connections_are_counted_per_node_and_forgotten_with_it(redis_url: str) -> None:
    a, b = RedisRouting(redis_url, "node-a/1"), RedisRouting(redis_url, "node-b/1")
    await a.start()
    await b.start()
    try:
        await a.configure_agent("ag", 2, ["g"], 0)
        await a.connected("ag", 1)
        await b.connected("ag", 2)
        state = await a.agent("ag")
        assert state is not None and state.connections == 2
        assert await a.forget_node("node-b/1", 5) == ["ag"]
        state = await b.agent("ag")
        assert state is not None and (state.connections, state.disconnected_at) == (1, None)
        await a.disconnected("ag", 7)
        await b.disconnected("ag", 8)  # b has none left there: an unmatched call
        state = await a.agent("ag")
        assert state is not None and (state.connections, state.disconnected_at) == (0, 7)
    finally:
        await a.close()
        await b.close()


async def test_assignment_is_atomic_across_nodes(redis_url: str) -> None:
    """Several nodes assigning at once: no agent over capacity, nothing handed out twice."""
    nodes = [RedisRouting(redis_url, f"node-{i}/1") for i in range(4)]
    for node in nodes:
        await node.start()
    try:
        for i in range(5):
            await nodes[0].configure_agent(f"ag{i}", 3, ["g"], 0)
            await nodes[i % 4].connected(f"ag{i}", 0)
            await nodes[0].set_status(f"ag{i}", AgentStatus.ONLINE, 0)
        for c in range(40):
            await nodes[c % 4].enqueue(
                QueueEntry(conv=f"c{c}", customer=f"u{c}", group="g", since=c)
            )

        async def drain(node: RedisRouting) -> list[str]:
            got = []
            while (a := await node.assign_next("g", 100)) is not None:
                got.append(a.conv)
            return got

        results = await asyncio.gather(*(drain(n) for n in nodes))
        assigned = [c for r in results for c in r]
        assert len(assigned) == len(set(assigned)) == 15  # 5 agents x capacity 3
        for state in await nodes[0].agents():
            assert state.load == 3
        assert len(await nodes[0].queue("g")) == 25
    finally:
        for node in nodes:
            await node.close()


async def test_rebuild_is_claimed_once(redis_url: str) -> None:
    a, b = RedisRouting(redis_url, "node-a/1"), RedisRouting(redis_url, "node-b/1")
    await a.start()
    await b.start()
    try:
        assert await a.claim_rebuild()
        assert not await b.claim_rebuild()  # a is at it
        await a.rebuilt()
        assert not await b.claim_rebuild()  # done
    finally:
        await a.close()
        await b.close()


# -- the state machine, on Redis ----------------------------------------------------------------

_machine_redis: RedisServer | None = None


def _redis_for_machine() -> RedisServer:
    """A Redis of this module's own (hypothesis test cases take no pytest fixtures)."""
    global _machine_redis
    if _machine_redis is None:
        _machine_redis = RedisServer()
        _machine_redis.start()
        atexit.register(_machine_redis.close)
    return _machine_redis


async def _finished(value: object) -> object:
    return value


class _Driven:
    """RedisRouting's coroutines run to completion on the machine's loop, handed back as
    finished coroutines: the machine's ``drive`` (which forbids suspending, for the
    in-memory backend) takes them as they are."""

    def __init__(self, routing: RedisRouting, loop: asyncio.AbstractEventLoop) -> None:
        self._routing = routing
        self._loop = loop

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._routing, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            return _finished(self._loop.run_until_complete(method(*args, **kwargs)))

        return call


class RedisRoutingMachine(contract.RoutingMachine):
    """The same random interleavings, checked against the same model, on the Lua script."""

    def __init__(self) -> None:
        super().__init__()
        server = _redis_for_machine()
        server.flushall()
        self.loop = asyncio.new_event_loop()
        self.real = RedisRouting(server.url, "machine/1")
        self.loop.run_until_complete(self.real.start())
        self.r = _Driven(self.real, self.loop)  # type: ignore[assignment]

    def teardown(self) -> None:
        self.loop.run_until_complete(self.real.close())
        self.loop.close()


TestRedisRoutingMachine = RedisRoutingMachine.TestCase
TestRedisRoutingMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
