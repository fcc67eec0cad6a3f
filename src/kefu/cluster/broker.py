"""Targeted cross-node delivery over Redis: one publish per node that holds a recipient.

:meth:`RedisBroker.deliver` pushes to this node's own connections at once (the Hub), then
hands the frame to a publisher task. The publisher takes everything queued since its last
round, looks the recipients up in the presence registry (one pipelined ``HVALS`` per
distinct user) and publishes **one** message to each node that holds at least one of them
(``PUBLISH`` on a standalone Redis, sharded ``SPUBLISH`` on Redis Cluster, so a node's
channel lives on one shard and no other node receives it). A publish carries every frame
of the round for that node. A user with no live connection anywhere gets chat messages
in their offline inbox (a capped LIST), drained into their next connection. Under load a
round trip carries the publishes of one round and the lookups of the next.

Each node subscribes to its own channel only. When that subscription breaks (Redis
restarted or failed over) the node resubscribes with jittered backoff, writes its presence
again and sends every connection a ``resync`` notice: pushes may have been lost, and the
client syncs by seq. Push is the fast path; sync is the guarantee.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterable
from typing import NamedTuple

import msgspec
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError

from kefu import tasks
from kefu.broker import Broker
from kefu.cluster import redis_client as rc
from kefu.cluster.fastpath import FastPath
from kefu.cluster.membership import Membership, new_incarnation
from kefu.cluster.presence import Presence
from kefu.cluster.resp import Command, RespConnection
from kefu.cluster.view import node_of
from kefu.config import Config
from kefu.errors import ClusterError
from kefu.hub import Hub
from kefu.metrics import Metrics
from kefu.protocol import frames as f
from kefu.session import Session

log = logging.getLogger(__name__)

#: Most frames one publisher round takes.
ROUND_FRAMES = 1024
#: Chat pushes kept per offline user, and for how long.
INBOX_LIMIT = 200
INBOX_TTL_MS = 7 * 24 * 3600 * 1000
BACKOFF_INITIAL = 0.05
BACKOFF_MAX = 5.0
#: How long a starting node keeps trying to reach Redis before it gives up.
CONNECT_PATIENCE = 30.0
#: Seconds between PINGs on the subscription's connection (a silent server is dropped).
HEALTH_CHECK = 5.0
_SETTINGS_CHANNEL = rc.SETTINGS_CHANNEL.encode()

RESYNC_NOTICE = msgspec.json.encode(
    f.Notice(code="resync", text="pushes may have been missed: sync every conversation")
)


class Envelope(msgspec.Struct, array_like=True):
    """One frame for some users of the receiving node."""

    users: list[str]
    data: bytes
    ephemeral: bool
    #: Wall-clock time (s) the frame's message entered the cluster; 0: not timed.
    received: float


class Announcement(msgspec.Struct):
    topic: str
    origin: str
    data: str = ""


_encode = msgspec.msgpack.Encoder().encode
_decode_note = msgspec.msgpack.Decoder(Announcement).decode


def announcement(topic: str, origin: str, data: str = "") -> bytes:
    """The payload that tells every node (but ``origin``) that ``topic`` changed."""
    return _encode(Announcement(topic=topic, origin=origin, data=data))


async def read_settings(client: rc.RedisClient) -> dict[str, str]:
    """The cluster-wide runtime settings (``kefu config set``)."""
    raw = await client.hgetall(rc.SETTINGS)
    return {rc.text(k): rc.text(v) for k, v in raw.items()}


_decode = msgspec.msgpack.Decoder(list[Envelope]).decode


class _Outgoing(msgspec.Struct, array_like=True):
    users: list[str]
    data: bytes
    ephemeral: bool
    received: float
    offline: bool


class _Pushes(NamedTuple):
    """What a delivery round's publishes carry: publishes, pushes in them, inbox entries."""

    publishes: int
    remote: int
    inbox: int


_NO_PUSHES = _Pushes(0, 0, 0)


class RedisBroker(Broker):
    """The cluster broker; it also owns this node's membership and presence (see module)."""

    def __init__(
        self, hub: Hub, config: Config, *, metrics: Metrics, incarnation: str | None = None
    ) -> None:
        self.hub = hub
        self.incarnation = incarnation or new_incarnation(config.node_id)
        self._announce_callbacks: list[Callable[[str, str], None]] = []
        self.config = config
        self.url = config.cluster.redis_url
        self.metrics = metrics
        self.node_id = config.node_id
        self.channel = rc.node_channel(self.node_id)
        self.cluster = False
        self._client: rc.RedisClient | None = None
        self._membership: Membership | None = None
        self._presence: Presence | None = None
        self._fast: FastPath | None = None
        self._outbox: list[_Outgoing] = []
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._subscribed = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()
        self._closing = False
        #: Send the ``resync`` notice once presence has been rewritten.
        self._resync_clients = False

    @property
    def client(self) -> rc.RedisClient:
        assert self._client is not None, "the broker is not started"
        return self._client

    @property
    def joined(self) -> bool:
        """Whether :meth:`start` has joined the cluster (membership and presence exist)."""
        return self._membership is not None

    @property
    def membership(self) -> Membership:
        assert self._membership is not None, "the broker is not started"
        return self._membership

    @property
    def fast(self) -> FastPath:
        assert self._fast is not None, "the broker is not started"
        return self._fast

    @property
    def presence(self) -> Presence:
        assert self._presence is not None, "the broker is not started"
        return self._presence

    # -- life cycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Connect (retrying for ``CONNECT_PATIENCE`` seconds), join, subscribe."""
        deadline = time.monotonic() + CONNECT_PATIENCE
        backoff = BACKOFF_INITIAL
        while True:
            try:
                self._client, self.cluster = await rc.connect(self.url)
                break
            except rc.REDIS_ERRORS as exc:
                tasks.stop_if_cancelled()
                if time.monotonic() > deadline:
                    raise ClusterError(f"cannot reach Redis at {self.url}: {exc}") from exc
                log.warning("Redis not reachable yet (%s): retrying", exc)
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, BACKOFF_MAX)
        settings = self.config.cluster
        self._membership = Membership(
            self._client,
            self.node_id,
            metrics=self.metrics,
            weight=settings.node_weight,
            # replaced by the server's advertised URL once it listens (the bound port)
            url=settings.advertise_url or f"http://{self.config.host}:{self.config.port}",
            heartbeat=settings.node_heartbeat,
            ttl=settings.node_ttl,
            vnodes=settings.ring_vnodes,
            connections=lambda: len(self.hub),
            incarnation=self.incarnation,
        )
        self._fast = FastPath(self._client, rc.parse_url(self.url))
        self._presence = Presence(
            self._client,
            self._membership.incarnation,
            self.hub,
            metrics=self.metrics,
            fast=self._fast,
        )
        self._membership.purgers.append(self._presence.purge)
        self._membership.restart_listeners.append(self._redis_restarted)
        await self._presence.start()
        await self._membership.start()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._publish_loop(), name="kefu-publisher"),
            loop.create_task(self._subscribe_loop(), name="kefu-subscriber"),
        ]
        with contextlib.suppress(TimeoutError):  # delivery starts when Redis answers
            await asyncio.wait_for(self._subscribed.wait(), 5.0)

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        await tasks.stop([*self._tasks, *self._background])
        if self._presence is not None:
            await self._presence.close()
        if self._membership is not None:
            await self._membership.close()
        if self._fast is not None:
            await self._fast.close()
        if self._client is not None:
            with contextlib.suppress(*rc.REDIS_ERRORS):
                await self._client.aclose()

    async def _rewrite_presence(self) -> None:
        """Write this node's presence again, then tell its clients to sync: pushes sent
        while it was missing found nobody here."""
        await self.presence.resync()
        self._resync_clients = False
        self.hub.push(list(self.hub.users()), RESYNC_NOTICE)

    def _redis_restarted(self) -> None:
        """Presence may be gone: write it again, then tell clients pushes may be lost."""
        self.presence.dirty = True
        self._resync_clients = True

    # -- announcements --------------------------------------------------------------------

    def announce(self, topic: str, data: str = "") -> None:
        payload = announcement(topic, self.incarnation, data)
        task = asyncio.get_running_loop().create_task(self._announce(payload))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _announce(self, payload: bytes) -> None:
        try:
            await self.client.publish(rc.SETTINGS_CHANNEL, payload)
        except rc.REDIS_ERRORS as exc:
            tasks.stop_if_cancelled()
            self.metrics.cluster_errors.labels(operation="announce").inc()
            log.warning("announcement not sent: %s", exc)

    def on_announce(self, callback: Callable[[str, str], None]) -> None:
        self._announce_callbacks.append(callback)

    def _announced(self, payload: bytes) -> None:
        try:
            note = _decode_note(payload)
        except msgspec.DecodeError:  # pragma: no cover - only Kefu nodes publish here
            return
        if note.origin == self.incarnation:
            return
        for callback in self._announce_callbacks:
            callback(note.topic, note.data)

    # -- sessions -------------------------------------------------------------------------

    async def connections_elsewhere(self, user_id: str) -> int:
        """Live connections of the user on other nodes, from the presence registry. Redis
        trouble never blocks a connection: then only this node's count applies."""
        if len(self.membership.members) == 1:
            return 0
        try:
            holders = (await self.presence.lookup([user_id]))[user_id]
        except rc.REDIS_ERRORS:
            tasks.stop_if_cancelled()
            return 0
        live = self.membership.is_live
        return sum(1 for m in holders if live(m) and m != self.incarnation)

    def session_opened(self, session: Session) -> None:
        self.presence.opened(session.user_id, session.id)
        task = asyncio.get_running_loop().create_task(self._drain_inbox(session))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def session_closed(self, session: Session) -> None:
        self.presence.closed(session.user_id, session.id)

    async def _drain_inbox(self, session: Session) -> None:
        key = rc.inbox(session.user_id)
        try:
            pipe = self.client.pipeline(transaction=True)
            pipe.lrange(key, 0, -1)
            pipe.delete(key)
            frames, _ = await pipe.execute()
        except rc.REDIS_ERRORS as exc:
            tasks.stop_if_cancelled()
            self.metrics.cluster_errors.labels(operation="inbox").inc()
            log.warning("inbox of %s not drained: %s", session.user_id, exc)
            return
        for data in frames:
            session.push(bytes(data))

    # -- sending --------------------------------------------------------------------------

    def deliver(
        self,
        user_ids: Iterable[str],
        data: bytes,
        *,
        ephemeral: bool = False,
        received: float = 0.0,
        exclude: Session | None = None,
        offline: bool = False,
    ) -> None:
        users = list(user_ids)
        pushed = self.hub.push(users, data, ephemeral=ephemeral, received=received, exclude=exclude)
        if pushed:
            self.metrics.cluster_deliveries.labels("local").inc(pushed)
        if len(self.membership.members) == 1:  # this node alone: every connection is here
            if not offline:
                return
            users = [u for u in users if not self.hub.count(u)]  # only the inbox is left
            if not users:
                return
        wall = time.time() - (time.perf_counter() - received) if received else 0.0
        self._outbox.append(_Outgoing(users, data, ephemeral, wall, offline))
        self._wake.set()

    async def _publish_loop(self) -> None:
        """Rounds of one round trip each: the publishes of the frames looked up in the
        previous round go out with the lookups of the frames queued since."""
        looked: tuple[list[_Outgoing], dict[str, list[str]]] | None = None
        while not self._closing:
            if not self._outbox and looked is None:
                await self._wake.wait()
                self._wake.clear()
                continue
            batch = self._outbox[:ROUND_FRAMES]
            del self._outbox[:ROUND_FRAMES]
            to_route, looked = looked, None
            try:
                commands, counts = self._route(*to_route) if to_route else ([], _NO_PUSHES)
                sent = len(commands)
                users = sorted({u for item in batch for u in item.users})
                commands += self.presence.lookup_commands(users)
                replies = await self.fast.run(commands)
            except Exception as exc:  # Redis errors, and a bug must not stop delivery
                tasks.stop_if_cancelled()
                # Those pushes are lost; the frames are stored and clients sync.
                self.metrics.cluster_errors.labels(operation="publish").inc()
                log.warning("a delivery round failed: %r", exc)
                continue
            self._published(counts)
            if batch:
                looked = batch, self.presence.holders(users, replies[sent:])

    def _route(
        self, batch: list[_Outgoing], where: dict[str, list[str]]
    ) -> tuple[list[tuple[str, Command]], _Pushes]:
        """The commands that deliver ``batch`` given its users' holders: one publish per
        node that holds a recipient, inbox entries for users connected nowhere; and the
        pushes counted per path for :meth:`_published`."""
        live = self.membership.is_live
        per_node: dict[str, list[Envelope]] = {}
        inbox: list[tuple[str, bytes]] = []
        for item in batch:
            targets: dict[str, list[str]] = {}
            for user in item.users:
                holders = [m for m in where.get(user, ()) if live(m)]
                for member in holders:
                    node = node_of(member)
                    if node != self.node_id:
                        targets.setdefault(node, []).append(user)
                if item.offline and not holders and not self.hub.count(user):
                    inbox.append((user, item.data))
            for node, node_users in targets.items():
                per_node.setdefault(node, []).append(
                    Envelope(sorted(set(node_users)), item.data, item.ephemeral, item.received)
                )
        publish = "SPUBLISH" if self.cluster else "PUBLISH"
        commands: list[tuple[str, Command]] = []
        for node, envelopes in per_node.items():
            channel = rc.node_channel(node)
            commands.append((channel, (publish, channel, _encode(envelopes))))
        for user, data in inbox:
            key = rc.inbox(user)
            commands.append((key, ("RPUSH", key, data)))
            commands.append((key, ("LTRIM", key, -INBOX_LIMIT, -1)))
            commands.append((key, ("PEXPIRE", key, INBOX_TTL_MS)))
        self.metrics.cluster_commands.labels("publish").inc(len(per_node))
        self.metrics.cluster_commands.labels("inbox").inc(3 * len(inbox))
        remote = sum(len(e) for e in per_node.values())
        return commands, _Pushes(len(per_node), remote, len(inbox))

    def _published(self, pushes: _Pushes) -> None:
        if pushes.publishes:
            self.metrics.cluster_publishes.inc(pushes.publishes)
            self.metrics.cluster_deliveries.labels("remote").inc(pushes.remote)
        if pushes.inbox:
            self.metrics.cluster_deliveries.labels("inbox").inc(pushes.inbox)

    # -- receiving ------------------------------------------------------------------------

    async def _subscribe(self) -> RespConnection:
        """A connection subscribed to this node's channel, on the server that carries it
        (the master of its slot on a Redis Cluster), and to the announcements."""
        fast = self.fast
        node_channel = ("SSUBSCRIBE" if self.cluster else "SUBSCRIBE", self.channel)
        # Plain PUBLISH reaches every node of a Redis Cluster: any shard will do.
        settings = ("SUBSCRIBE", rc.SETTINGS_CHANNEL)
        return await fast.subscribe(
            fast.address(self.channel), [node_channel, settings], 2, self._on_message
        )

    async def _subscribe_loop(self) -> None:
        backoff = BACKOFF_INITIAL
        first = True
        while not self._closing:
            conn: RespConnection | None = None
            try:
                conn = await self._subscribe()
                if not first or self.presence.dirty:
                    await self._rewrite_presence()
                first = False
                self._subscribed.set()
                self.metrics.cluster_redis_up.set(1)
                backoff = BACKOFF_INITIAL
                await self._while_subscribed(conn)
            except rc.REDIS_ERRORS as exc:
                tasks.stop_if_cancelled()
                self.metrics.cluster_redis_up.set(0)
                self.metrics.cluster_errors.labels(operation="subscribe").inc()
                log.warning("delivery subscription lost (%s): resubscribing", exc)
                if isinstance(self.client, RedisCluster):
                    with contextlib.suppress(*rc.REDIS_ERRORS):
                        # The slot may have moved: re-read the map (the client itself only
                        # does after one of its own commands failed).
                        await self.client.nodes_manager.initialize()
            except Exception:  # a bug must not end delivery silently: log, resubscribe
                tasks.stop_if_cancelled()
                self.metrics.cluster_redis_up.set(0)
                self.metrics.cluster_errors.labels(operation="subscribe").inc()
                log.exception("delivery subscription failed: resubscribing")
            finally:
                if conn is not None:
                    conn.close()
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _while_subscribed(self, conn: RespConnection) -> None:
        """Messages arrive by themselves (:meth:`_on_message`); meanwhile check the
        connection every ``HEALTH_CHECK`` seconds and keep presence written. Raises when
        the connection is lost."""
        checked = time.monotonic()
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(conn.wait_closed(), 1.0)
            if conn.is_closed:
                raise RedisConnectionError("the delivery subscription's connection closed")
            if time.monotonic() - checked >= HEALTH_CHECK:
                await conn.call("PING")  # a silent server fails it within the timeout
                checked = time.monotonic()
            # busy or not: a missing presence loses pushes
            if self._resync_clients:
                await self._rewrite_presence()
            elif self.presence.dirty:
                await self.presence.resync()

    def _on_message(self, channel: bytes, data: bytes) -> None:
        """A message on a subscribed channel, as soon as it is read."""
        try:
            if channel == _SETTINGS_CHANNEL:
                self._announced(data)
            else:
                self._received(data)
        except Exception:  # a bug costs this message's pushes (clients sync), not delivery
            self.metrics.cluster_errors.labels(operation="subscribe").inc()
            log.exception("a delivery from %s failed", channel)

    def _received(self, payload: bytes) -> None:
        try:
            envelopes = _decode(payload)
        except msgspec.DecodeError:  # pragma: no cover - only Kefu nodes publish here
            log.error("undecodable delivery on %s", self.channel)
            return
        now_wall, now = time.time(), time.perf_counter()
        for env in envelopes:
            received = now - max(0.0, now_wall - env.received) if env.received else 0.0
            pushed = self.hub.push(env.users, env.data, ephemeral=env.ephemeral, received=received)
            self.metrics.cluster_deliveries.labels("received").inc(pushed)
