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
import time
from collections.abc import Awaitable, Callable

from kefu.cluster import redis_client as rc
from kefu.cluster.ring import Ring
from kefu.metrics import Metrics

log = logging.getLogger(__name__)

Purge = Callable[[str], Awaitable[None]]


def node_of(member: str) -> str:
    """The node id of an incarnation ``node_id/random``."""
    return member.rpartition("/")[0] or member


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
    ) -> None:
        self.client = client
        self.node_id = node_id
        self.incarnation = f"{node_id}/{secrets.token_hex(4)}"
        self.metrics = metrics
        self.weight = weight
        self.url = url
        self.heartbeat = heartbeat
        self.ttl = ttl
        self.vnodes = vnodes
        self.connections = connections
        self.started = int(time.time() * 1000)
        #: The ring until Redis first answers: this node alone.
        self.ring = Ring({node_id: weight}, vnodes=vnodes)
        #: Live incarnations, as of the last heartbeat.
        self.members: frozenset[str] = frozenset({self.incarnation})
        self.member_info: dict[str, dict[str, str]] = {}
        self.purge: Purge | None = None
        self.listeners: list[Callable[[Ring], None]] = []
        self._task: asyncio.Task[None] | None = None
        self.healthy = False

    # -- queries --------------------------------------------------------------------------

    def owns(self, kind: str, key: str) -> bool:
        """Whether this node runs the partition ``(kind, key)`` of background work."""
        return self.ring.owner_of_partition(kind, key) == self.node_id

    def is_live(self, member: str) -> bool:
        return member in self.members

    @property
    def nodes(self) -> tuple[str, ...]:
        return self.ring.nodes

    # -- life cycle -----------------------------------------------------------------------

    async def start(self) -> None:
        try:
            await self.beat()
        except rc.REDIS_ERRORS as exc:
            log.warning("cluster: first heartbeat failed (%s): retrying", exc)
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="kefu-membership")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(*rc.REDIS_ERRORS):
            await self.client.zrem(rc.MEMBERS, self.incarnation)
            await self.client.delete(rc.member_info(self.incarnation))

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat)
            try:
                await self.beat()
            except rc.REDIS_ERRORS as exc:
                self.healthy = False
                self.metrics.cluster_errors.labels(operation="heartbeat").inc()
                log.warning("cluster: heartbeat failed: %s", exc)
            except Exception:  # pragma: no cover - a bug must not stop the heartbeat
                log.exception("cluster: heartbeat failed")

    async def beat(self) -> None:
        """Refresh this node's entry, read the live members, rebuild the ring if needed."""
        now = int(time.time() * 1000)
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
        pipe.zrangebyscore(rc.MEMBERS, now, "+inf")
        pipe.zrangebyscore(rc.MEMBERS, "-inf", now - 1)
        *_, live_raw, dead_raw = await pipe.execute()
        live = sorted(rc.text(m) for m in live_raw)
        pipe = self.client.pipeline(transaction=False)
        for member in live:
            pipe.hgetall(rc.member_info(member))
        infos = await pipe.execute() if live else []
        self.member_info = {
            member: {rc.text(k): rc.text(v) for k, v in raw.items()}
            for member, raw in zip(live, infos, strict=True)
        }
        self.members = frozenset(live) | {self.incarnation}
        weights: dict[str, float] = {}
        newest: dict[str, int] = {}
        for member in self.members:
            data = self.member_info.get(member, {})
            node = node_of(member)
            started = int(data.get("started", "0"))
            if node in newest and newest[node] > started:
                continue  # a restarted node's old incarnation, not yet expired
            newest[node] = started
            try:
                weights[node] = float(data.get("weight", self.weight))
            except ValueError:
                weights[node] = 1.0
        weights[self.node_id] = self.weight
        ring = Ring(weights, vnodes=self.vnodes)
        if ring.version != self.ring.version:
            log.info(
                "cluster: ring %s -> %s: %s", self.ring.version, ring.version, ", ".join(ring.nodes)
            )
            self.ring = ring
            self.metrics.ring_changes.inc()
            for listener in self.listeners:
                listener(ring)
        self.metrics.cluster_nodes.set(len(ring))
        self.healthy = True
        for member in (rc.text(m) for m in dead_raw):
            if member == self.incarnation:
                continue  # our own entry lapsed (Redis was away): the ZADD above renewed it
            if self.owns("purge", member):
                await self._purge(member)

    async def _purge(self, member: str) -> None:
        log.info("cluster: %s stopped beating: purging its state", member)
        if self.purge is not None:
            await self.purge(member)
        await self.client.zrem(rc.MEMBERS, member)
        await self.client.delete(rc.member_info(member))
