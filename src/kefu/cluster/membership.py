"""Cluster membership: this node's heartbeat in Redis and the ring over the live nodes.

Every ``node_heartbeat`` seconds a node refreshes its entry in the ``kefu:members`` sorted
set (scored by its expiry, ``node_ttl`` ahead) and reads the live entries back; the
:class:`~kefu.cluster.ring.Ring` built from them (node id -> weight) is the same on every
node that read the same members, and so is its version. An entry is an *incarnation*,
``node_id/random``: a node restarted under the same id (a Kubernetes StatefulSet pod) is a
new incarnation, so cleaning up after the old one never touches the new one's state.

Entries that expired are dead nodes. The live node that owns the partition
``("purge", incarnation)`` on the ring removes what the dead one left (its presence
entries) and then its entry; if that node dies too, the next ring owner does it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio.cluster import RedisCluster

from kefu import ids, tasks
from kefu.cluster import redis_client as rc
from kefu.cluster import view
from kefu.cluster.ring import Ring
from kefu.errors import ClusterError
from kefu.metrics import Metrics

log = logging.getLogger(__name__)

#: What a heartbeat may fail with and retry: Redis trouble, also from a purger.
HEARTBEAT_ERRORS: tuple[type[BaseException], ...] = (*rc.REDIS_ERRORS, ClusterError)

Purge = Callable[[str], Awaitable[None]]


def new_incarnation(node_id: str) -> str:
    """A fresh incarnation name for a node starting now."""
    return f"{node_id}/{secrets.token_hex(4)}"


class Membership:
    def __init__(
        self,
        client: rc.RedisClient,
        node_id: str,
        *,
        metrics: Metrics,
        weight: float = 1.0,
        url: str = "",
        heartbeat: float = 2.0,
        ttl: float = 6.0,
        vnodes: int = 100,
        connections: Callable[[], int] = lambda: 0,
        incarnation: str | None = None,
    ) -> None:
        self.client = client
        self.node_id = node_id
        self.incarnation = incarnation or new_incarnation(node_id)
        self.metrics = metrics
        self.weight = weight
        self.url = url
        self.heartbeat = heartbeat
        self.ttl = ttl
        self.vnodes = vnodes
        self.connections = connections
        self.started = ids.now_ms()
        #: The ring until Redis first answers: this node alone.
        self.ring = Ring({node_id: weight}, vnodes=vnodes)
        #: Live incarnations, as of the last heartbeat.
        self.members: frozenset[str] = frozenset({self.incarnation})
        self.member_info: dict[str, dict[str, str]] = {}
        #: Called with each dead incarnation, to remove what it left behind.
        self.purgers: list[Purge] = []
        #: Called when a Redis server restarted (its data may be gone): rewrite what this
        #: node keeps there.
        self.restart_listeners: list[Callable[[], None]] = []
        self._run_ids: frozenset[str] = frozenset()
        self._beaten = False
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    # -- queries --------------------------------------------------------------------------

    def owns(self, kind: str, key: str) -> bool:
        """Whether this node runs the partition ``(kind, key)`` of background work."""
        return self.ring.owner_of_partition(kind, key) == self.node_id

    def is_live(self, member: str) -> bool:
        return member in self.members

    # -- life cycle -----------------------------------------------------------------------

    async def start(self) -> None:
        try:
            await self.beat()
        except rc.REDIS_ERRORS as exc:
            tasks.stop_if_cancelled()
            log.warning("cluster: first heartbeat failed (%s): retrying", exc)
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="kefu-membership")

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            await tasks.stop([self._task])
        with contextlib.suppress(*rc.REDIS_ERRORS):
            await self.client.zrem(rc.MEMBERS, self.incarnation)
            await self.client.delete(rc.member_info(self.incarnation))

    async def _loop(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.heartbeat)
            try:
                await self.beat()
            except HEARTBEAT_ERRORS as exc:
                tasks.stop_if_cancelled()
                self.metrics.cluster_errors.labels(operation="heartbeat").inc()
                log.warning("cluster: heartbeat failed: %s", exc)
            except Exception:  # pragma: no cover - a bug must not stop the heartbeat
                tasks.stop_if_cancelled()
                log.exception("cluster: heartbeat failed")

    async def beat(self) -> None:
        """Refresh this node's entry, read the live members, rebuild the ring if needed."""
        now = ids.now_ms()
        ttl_ms = int(self.ttl * 1000)
        info = rc.member_info(self.incarnation)
        pipe = self.client.pipeline(transaction=False)
        pipe.zadd(rc.MEMBERS, {self.incarnation: now + ttl_ms})
        pipe.hset(
            info,
            mapping={
                "node": self.node_id,
                "weight": repr(self.weight),
                "url": self.url,
                "started": str(self.started),
                "connections": str(self.connections()),
            },
        )
        pipe.pexpire(info, 3 * ttl_ms)
        pipe.zrangebyscore(rc.MEMBERS, "-inf", now - 1)
        added, *_, dead_raw = await pipe.execute()
        if added and self._beaten:
            # Our entry was gone (purged after a long pause, or Redis lost it): so may be
            # everything this node keeps there.
            log.warning("cluster: this node's entry had vanished: rewriting its state")
            for listener in self.restart_listeners:
                listener()
        self._beaten = True
        self.member_info = await view.live_members(self.client, now_ms=now)
        self.members = frozenset(self.member_info) | {self.incarnation}
        weights = {node: info.weight for node, info in view.nodes_of(self.member_info).items()}
        weights[self.node_id] = self.weight
        ring = Ring(weights, vnodes=self.vnodes)
        if ring.version != self.ring.version:
            log.info(
                "cluster: ring %s -> %s: %s", self.ring.version, ring.version, ", ".join(ring.nodes)
            )
            self.ring = ring
            self.metrics.ring_changes.inc()
        self.metrics.cluster_nodes.set(len(ring))
        await self._watch_restarts()
        for member in (rc.text(m) for m in dead_raw):  # never this one: the ZADD renewed it
            if self.owns("purge", member):
                await self._purge(member)

    async def _watch_restarts(self) -> None:
        """Notice a Redis server that restarted (a new ``run_id``), even when this node's
        own connections to it survived or came back unnoticed: a restarted master of a
        Redis Cluster may have lost the presence entries of any node."""
        if isinstance(self.client, RedisCluster):
            raw: Any = await self.client.info("server", target_nodes=RedisCluster.PRIMARIES)
        else:
            raw = await self.client.info("server")
        infos = [raw] if "run_id" in raw else list(raw.values())
        run_ids = frozenset(str(info.get("run_id", "")) for info in infos)
        if self._run_ids and run_ids != self._run_ids:
            log.warning("cluster: a Redis server restarted: rewriting this node's state")
            for listener in self.restart_listeners:
                listener()
        self._run_ids = run_ids

    async def _purge(self, member: str) -> None:
        log.info("cluster: %s stopped beating: purging its state", member)
        for purge in self.purgers:
            await purge(member)
        await self.client.zrem(rc.MEMBERS, member)
        await self.client.delete(rc.member_info(member))
