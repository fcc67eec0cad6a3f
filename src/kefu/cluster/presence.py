"""The presence registry: which node holds each user's connections (the truth for delivery).

``kefu:presence:{user}`` is a HASH connection id -> incarnation (``node_id/random``), and
``kefu:member-users:{incarnation}`` the SET of users that incarnation has connections of,
so that a dead node's entries can be purged without scanning every user.

Writes happen off the connection path, in order, in pipelines: a connection's
registration never waits for Redis. When Redis fails or comes back empty, this node's
whole share is written again (:meth:`Presence.resync`) from its Hub, which is the truth
for its own connections; until then a missed push is recovered by the clients' sync.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

from kefu import tasks
from kefu.cluster import redis_client as rc
from kefu.cluster.fastpath import FastPath
from kefu.cluster.resp import Command
from kefu.hub import Hub
from kefu.metrics import Metrics

log = logging.getLogger(__name__)

#: Registrations written per pipeline.
WRITE_BATCH = 500


class Presence:
    def __init__(
        self,
        client: rc.RedisClient,
        incarnation: str,
        hub: Hub,
        *,
        metrics: Metrics,
        fast: FastPath,
    ) -> None:
        self.client = client
        #: Lookups (the delivery path) go through this; writes through ``client``.
        self.fast = fast
        self.incarnation = incarnation
        self.hub = hub
        self.metrics = metrics
        # (user, connection id, opened?) in the order they happened
        self._pending: list[tuple[str, str, bool]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        #: A write failed: the whole share must be written again.
        self.dirty = False

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="kefu-presence")

    async def close(self) -> None:
        """Remove this node's entries (a graceful stop), then stop writing."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await tasks.stop([self._task])
        with contextlib.suppress(*rc.REDIS_ERRORS):
            await self.purge(self.incarnation)

    def opened(self, user_id: str, conn_id: str) -> None:
        self._pending.append((user_id, conn_id, True))
        self._wake.set()

    def closed(self, user_id: str, conn_id: str) -> None:
        self._pending.append((user_id, conn_id, False))
        self._wake.set()

    async def _loop(self) -> None:
        while not self._closing:
            await self._wake.wait()
            if self._closing:
                return
            self._wake.clear()
            while self._pending:
                batch = self._pending[:WRITE_BATCH]
                del self._pending[:WRITE_BATCH]
                try:
                    await self._write(batch)
                except Exception as exc:  # Redis errors, and a bug must not stop presence
                    tasks.stop_if_cancelled()
                    self.dirty = True
                    self.metrics.cluster_errors.labels(operation="presence").inc()
                    log.warning("presence: write failed (%r): will resync", exc)

    async def _write(self, batch: list[tuple[str, str, bool]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        users = rc.member_users(self.incarnation)
        for user, conn, opened in batch:
            if opened:
                pipe.hset(rc.presence(user), conn, self.incarnation)
                pipe.sadd(users, user)
            else:
                pipe.hdel(rc.presence(user), conn)
                if not self.hub.count(user):
                    pipe.srem(users, user)
        self.metrics.cluster_commands.labels("presence").inc(len(pipe))
        await pipe.execute()

    async def lookup(self, user_ids: Iterable[str]) -> dict[str, list[str]]:
        """The incarnations holding each user's connections (possibly dead ones)."""
        users = list(user_ids)
        return self.holders(users, await self.fast.run(self.lookup_commands(users)))

    def lookup_commands(self, users: list[str]) -> list[tuple[str, Command]]:
        """The commands that look ``users`` up (for :meth:`holders`), to send along with
        others in one round trip."""
        self.metrics.cluster_commands.labels("lookup").inc(len(users))
        return [(key, ("HVALS", key)) for key in map(rc.presence, users)]

    @staticmethod
    def holders(users: list[str], replies: list[Any]) -> dict[str, list[str]]:
        """What :meth:`lookup_commands` found: each user's incarnations."""
        return {
            user: [v.decode() for v in values] for user, values in zip(users, replies, strict=True)
        }

    async def purge(self, member: str) -> None:
        """Remove every presence entry of incarnation ``member`` (dead, or this one closing)."""
        users_key = rc.member_users(member)
        users = sorted(rc.text(u) for u in await self.client.smembers(users_key))
        await self._rewrite(member, users, lambda user: set())
        await self.client.delete(users_key)

    async def resync(self) -> None:
        """Make Redis hold exactly this node's connections for this incarnation."""
        self._pending.clear()  # the Hub is newer than anything queued
        # Cleared first: a failure that marks it dirty during the rewrite is not lost.
        self.dirty = False
        try:
            known = await self.client.smembers(rc.member_users(self.incarnation))
            users = sorted({rc.text(u) for u in known} | set(self.hub.users()))
            await self._rewrite(
                self.incarnation, users, lambda user: {s.id for s in self.hub.sessions(user)}
            )
        except BaseException:
            self.dirty = True
            raise

    async def _rewrite(
        self, member: str, users: list[str], mine: Callable[[str], set[str]]
    ) -> None:
        """Make each user's presence hold exactly ``mine(user)`` for ``member``: drop its
        other entries, write these, and keep the member's user set to match."""
        users_key = rc.member_users(member)
        for start in range(0, len(users), WRITE_BATCH):
            chunk = users[start : start + WRITE_BATCH]
            pipe = self.client.pipeline(transaction=False)
            for user in chunk:
                pipe.hgetall(rc.presence(user))
            entries = await pipe.execute()
            pipe = self.client.pipeline(transaction=False)
            for user, fields in zip(chunk, entries, strict=True):
                held = mine(user)
                stale = [
                    conn
                    for conn, holder in fields.items()
                    if rc.text(holder) == member and rc.text(conn) not in held
                ]
                if stale:
                    pipe.hdel(rc.presence(user), *stale)
                if held:
                    pipe.hset(rc.presence(user), mapping=dict.fromkeys(held, member))
                    pipe.sadd(users_key, user)
                else:
                    pipe.srem(users_key, user)
            if len(pipe):
                await pipe.execute()
