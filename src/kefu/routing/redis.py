"""The cluster routing backend: queues, agent state and assignment in Redis.

Every change is one call of ``lua/routing.lua`` (see that file for the key layout), which
Redis runs to completion before any other command, so assignment is atomic across all
nodes exactly as :mod:`kefu.routing.base` requires. All keys share the hash tag ``{rt}``:
the routing state lives in one Redis Cluster slot, so no script crosses slots. One shard
runs tens of thousands of such scripts a second, far above any assignment rate.

An agent's connections are counted per node incarnation; when a node dies, the node that
purges it calls :meth:`RedisRouting.forget_node` and the agent's grace period starts.

The state is derived from the store: :meth:`RedisRouting.claim_rebuild` lets exactly one
node rebuild it when it is missing (a new cluster, or a Redis that lost its data).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Collection, Iterator, Sequence
from importlib import resources
from typing import Any

from redis.commands.core import AsyncScript

from kefu.cluster import redis_client as rc
from kefu.errors import ClusterError, ErrorCode
from kefu.model import AgentStatus
from kefu.routing.base import AgentState, Assignment, QueueEntry, RoutingBackend, refuse
from kefu.tasks import stop_if_cancelled

PREFIX = "kefu:{rt}:"
#: How long :meth:`RedisRouting.exclusive` waits for a lock, and when a lock expires.
LOCK_WAIT = 10.0
LOCK_TTL_MS = 30_000
#: Set once the shared state was rebuilt from the store; gone when Redis lost its data.


@contextlib.contextmanager
def _unavailable() -> Iterator[None]:
    """Redis failing a routing command: a retryable ClusterError (a cancellation that a
    driver turned into a timeout stays a cancellation)."""
    try:
        yield
    except rc.REDIS_ERRORS as exc:
        stop_if_cancelled()
        raise ClusterError(f"routing state unavailable: {exc}") from exc


def _script_text() -> str:
    return resources.files("kefu.routing").joinpath("lua/routing.lua").read_text("utf-8")


class RedisRouting(RoutingBackend):
    def __init__(self, url: str, incarnation: str) -> None:
        self.url = url
        #: This node's incarnation: its agents' connections are counted under it.
        self.incarnation = incarnation
        self._client: rc.RedisClient | None = None
        self._script: AsyncScript | None = None

    async def start(self) -> None:
        if self._client is None:
            self._client, _ = await rc.connect(self.url)
            self._script = self._client.register_script(_script_text())

    async def close(self) -> None:
        if self._client is not None:
            client, self._client, self._script = self._client, None, None
            await client.aclose()

    @property
    def client(self) -> rc.RedisClient:
        assert self._client is not None, "routing backend not started"
        return self._client

    async def _call(self, op: str, *args: str | int) -> Any:
        if self._client is None or self._script is None:  # not started, or closed
            raise ClusterError("the routing backend is not connected")
        with _unavailable():
            return await self._script(keys=[PREFIX + "agents"], args=[op, *args])

    @contextlib.asynccontextmanager
    async def exclusive(self, key: str) -> AsyncIterator[None]:
        """A lock in Redis (``SET NX PX``, released only by its holder): waits up to
        ``LOCK_WAIT`` s, then fails retryably; it expires by itself after ``LOCK_TTL_MS``
        should its holder die."""
        token = f"{self.incarnation}/{secrets.token_hex(6)}"
        name = f"{PREFIX}lock:{key}"
        deadline = time.monotonic() + LOCK_WAIT
        pause = 0.005
        with _unavailable():
            while not await self.client.set(name, token, nx=True, px=LOCK_TTL_MS):
                if time.monotonic() > deadline:
                    raise ClusterError(f"{key} is busy: retry")
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.1)
        try:
            yield
        finally:
            with contextlib.suppress(ClusterError):
                await self._call("unlock", key, token)

    # -- rebuilding ---------------------------------------------------------------------

    async def claim_rebuild(self, ttl_ms: int = 60_000) -> bool:
        """True when the shared state is missing and this node got to rebuild it (one
        atomic step: see ``claim_rebuild`` in the script)."""
        return bool(await self._call("claim_rebuild", self.incarnation, ttl_ms))

    async def rebuilt(self) -> None:
        await self._call("rebuilt", self.incarnation)

    async def needs_report(self) -> bool:
        with _unavailable():
            return not await self.client.exists(f"{PREFIX}reported:{self.incarnation}")

    async def report(self, counts: dict[str, int], now: int) -> None:
        args: list[str | int] = [self.incarnation, now]
        for agent_id, count in sorted(counts.items()):
            args += [agent_id, count]
        await self._call("report", *args)

    async def forget_node(self, incarnation: str, now: int) -> list[str]:
        """Drop a dead incarnation's connections; returns the agents it had."""
        return [rc.text(a) for a in await self._call("forget_node", incarnation, now)]

    # -- agents -------------------------------------------------------------------------

    async def configure_agent(
        self, agent_id: str, capacity: int, groups: Collection[str], now: int
    ) -> None:
        await self._call("configure", agent_id, capacity, ",".join(sorted(groups)), now)

    async def remove_agent(self, agent_id: str) -> None:
        await self._call("remove", agent_id)

    async def agent(self, agent_id: str) -> AgentState | None:
        raw = await self._call("agent", agent_id)
        return None if raw is None else _agent(raw)

    async def agents(self) -> list[AgentState]:
        return sorted((_agent(raw) for raw in await self._call("agents")), key=lambda a: a.id)

    async def connected(self, agent_id: str, now: int) -> AgentState | None:
        raw = await self._call("connected", agent_id, now, self.incarnation)
        return None if raw is None else _agent(raw)

    async def disconnected(self, agent_id: str, now: int) -> AgentState | None:
        raw = await self._call("disconnected", agent_id, now, self.incarnation)
        return None if raw is None else _agent(raw)

    async def set_status(self, agent_id: str, status: AgentStatus, now: int) -> AgentState:
        return _agent(_checked(await self._call("status", agent_id, status.value, now)))

    # -- queues -------------------------------------------------------------------------

    async def enqueue(self, entry: QueueEntry, *, head: bool = False) -> None:
        await self._call(
            "enqueue",
            entry.conv,
            entry.group,
            _entry_json(entry),
            "1" if head else "0",
            "b" if entry.backlog else "l",
        )

    async def dequeue(self, conv: str) -> QueueEntry | None:
        raw = await self._call("dequeue", conv)
        return None if raw is None else _entry(raw[0], raw[1])

    async def queue(self, group: str) -> list[QueueEntry]:
        return [_entry(raw, kind) for raw, kind in await self._call("queue", group) if raw]

    async def queue_length(self, group: str) -> int:
        with _unavailable():
            pipe = self.client.pipeline(transaction=False)
            pipe.llen(f"{PREFIX}ql:{group}")
            pipe.llen(f"{PREFIX}qb:{group}")
            live, backlog = await pipe.execute()
        return int(live) + int(backlog)

    async def queued_groups(self) -> list[str]:
        with _unavailable():
            groups = await self.client.smembers(PREFIX + "queued")
        return sorted(rc.text(g) for g in groups)

    async def move_to_backlog(self, group: str, older_than: int) -> list[QueueEntry]:
        return [_entry(raw, "b") for raw in await self._call("to_backlog", group, older_than)]

    # -- assignment ---------------------------------------------------------------------

    async def assign_next(self, group: str, now: int) -> Assignment | None:
        raw = await self._call("assign_next", group, now)
        return None if raw is None else _assignment(raw)

    async def pick(self, agent_id: str, conv: str, now: int) -> Assignment:
        raw = _checked(await self._call("pick", agent_id, conv, now))
        return _assignment(raw)

    async def reserve(self, agent_id: str, conv: str, now: int, *, force: bool = False) -> bool:
        return bool(await self._call("reserve", agent_id, conv, now, "1" if force else "0"))

    async def move(
        self, conv: str, from_agent: str | None, to_agent: str, now: int, *, force: bool = False
    ) -> bool:
        return bool(
            await self._call("move", conv, from_agent or "", to_agent, now, "1" if force else "0")
        )

    async def holds(self, agent_id: str, conv: str) -> bool:
        with _unavailable():
            return bool(await self.client.sismember(f"{PREFIX}act:{agent_id}", conv))

    async def release(self, agent_id: str, conv: str, now: int) -> None:
        await self._call("release", agent_id, conv)

    async def accepted(self, agent_id: str, conv: str) -> None:
        await self._call("accepted", agent_id, conv)


_ERRORS = {
    "not_found": ErrorCode.NOT_FOUND,
    "not_member": ErrorCode.NOT_MEMBER,
    "agent_unavailable": ErrorCode.AGENT_UNAVAILABLE,
}


def _checked(raw: Any) -> Any:
    if isinstance(raw, list) and len(raw) == 2 and rc.text(raw[0]) == "ERR":
        code = _ERRORS[rc.text(raw[1])]
        raise refuse(
            code,
            {
                ErrorCode.NOT_FOUND: "not queued, or not an agent",
                ErrorCode.NOT_MEMBER: "you are not in the conversation's group",
                ErrorCode.AGENT_UNAVAILABLE: "you are at capacity or not online (set status)",
            }[code],
        )
    return raw


def _entry_json(entry: QueueEntry) -> str:
    return json.dumps(
        {
            "conv": entry.conv,
            "customer": entry.customer,
            "group": entry.group,
            "since": entry.since,
            "prefer": entry.prefer,
            "excluded": sorted(entry.excluded),
        },
        separators=(",", ":"),
    )


def _entry(raw: bytes | str, kind: bytes | str) -> QueueEntry:
    data = json.loads(raw)
    return QueueEntry(
        conv=data["conv"],
        customer=data["customer"],
        group=data["group"],
        since=int(data["since"]),
        prefer=data.get("prefer"),
        excluded=frozenset(data.get("excluded") or ()),
        backlog=rc.text(kind) == "b",
    )


def _assignment(raw: Sequence[Any]) -> Assignment:
    conv, agent, group, customer, waited = (rc.text(v) for v in raw)
    return Assignment(conv=conv, agent=agent, group=group, customer=customer, waited=int(waited))


def _agent(raw: Sequence[Any]) -> AgentState:
    ident, capacity, groups, status, connections, last, disc, active, unaccepted = raw
    pairs = [rc.text(v) for v in unaccepted]
    disc_text = rc.text(disc) if disc is not None else ""
    return AgentState(
        id=rc.text(ident),
        capacity=int(capacity),
        groups=frozenset(g for g in rc.text(groups or b"").split(",") if g),
        status=AgentStatus(rc.text(status)),
        connections=int(connections),
        active={rc.text(c) for c in active},
        unaccepted={pairs[i]: int(pairs[i + 1]) for i in range(0, len(pairs), 2)},
        last_assigned=int(last or 0),
        disconnected_at=int(disc_text) if disc_text else None,
    )
