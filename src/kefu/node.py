"""A Kefu node: one constructor that builds every part from the configuration.

The node owns the store, the broker, the Hub, the chat service and the gateway; it runs
the periodic sweep (heartbeats, authentication deadlines) and the graceful drain. The HTTP
and WebSocket server around it lives in :mod:`kefu.server`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time

from kefu import config as config_module
from kefu import ids
from kefu.broker import Broker, LocalBroker
from kefu.config import Config
from kefu.desk import Desk
from kefu.errors import CloseCode, ClusterError, ConfigError, StoreError
from kefu.gateway import Gateway
from kefu.hub import Hub
from kefu.loopwatch import watch_loop
from kefu.metrics import Metrics
from kefu.protocol import frames as f
from kefu.routing import MemoryRouting, RoutingBackend
from kefu.service import ChatService
from kefu.store import MessageStore, create_store
from kefu.webhooks import Webhooks

log = logging.getLogger(__name__)


class Node:
    def __init__(
        self,
        config: Config,
        *,
        metrics: Metrics | None = None,
        store: MessageStore | None = None,
        broker: Broker | None = None,
        routing: RoutingBackend | None = None,
    ) -> None:
        self.config = config
        #: The node's own settings (file, environment, flags) and the cluster-wide runtime
        #: overrides on top of them (see :meth:`reconfigure`).
        self.base_config = config
        self.cluster_overrides: dict[str, str] = {}
        self.metrics = metrics or Metrics()
        self.store = store or create_store(config, self.metrics)
        self.hub = Hub()
        #: In cluster mode, this run of the node (``node_id/random``; see kefu.cluster).
        self.incarnation = f"{config.node_id}/{secrets.token_hex(4)}"
        self.broker = broker or self._broker()
        self.webhooks = Webhooks(config.webhooks, self.metrics)
        self.routing = routing or self._routing()
        self.desk = Desk(
            config,
            store=self.store,
            routing=self.routing,
            broker=self.broker,
            metrics=self.metrics,
            webhooks=self.webhooks,
        )
        self.service = ChatService(
            config, store=self.store, broker=self.broker, metrics=self.metrics, desk=self.desk
        )
        self.gateway = Gateway(config, metrics=self.metrics, hub=self.hub, service=self.service)
        self._sweeper: asyncio.Task[None] | None = None
        self._loop_watch: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.draining = False
        self._closed = False

    # -- runtime configuration ----------------------------------------------------------------

    def reconfigure(
        self, base: Config | None = None, overrides: dict[str, str] | None = None
    ) -> tuple[list[str], list[str]]:
        """Take new settings without a restart: ``base`` is the node's own configuration
        re-read (SIGHUP), ``overrides`` the cluster-wide settings (``kefu config set``),
        which win. Only hot settings change (:func:`kefu.config.is_hot`); returns the
        names applied and the names that need a restart (ignored)."""
        if base is not None:
            self.base_config = base
        if overrides is not None:
            self.cluster_overrides = dict(overrides)
        hot = {k: v for k, v in self.cluster_overrides.items() if config_module.is_hot(k)}
        wanted = config_module.build_config(base=self.base_config, overrides=hot)
        cfg, applied, restart = config_module.hot_merge(self.config, wanted)
        if restart:
            log.warning("reload: %s change only with a restart", ", ".join(restart))
        if not applied:
            return applied, restart
        log.info("reload: applying %s", ", ".join(applied))
        self.config = cfg
        self.gateway.config = cfg
        self.service.config = cfg
        self.desk.config = cfg
        self.desk.settings = cfg.service
        self.desk.positions.settings = cfg.service
        logging.getLogger("kefu").setLevel(cfg.log_level)
        from kefu.cluster.broker import RedisBroker

        if isinstance(self.broker, RedisBroker) and self.broker.joined:
            self.broker.membership.weight = cfg.cluster.node_weight  # the next heartbeat
        self.metrics.reloads.inc()
        return applied, restart

    def _broker(self) -> Broker:
        if not self.config.cluster.redis_url:
            return LocalBroker(self.hub)
        from kefu.cluster.broker import RedisBroker

        return RedisBroker(
            self.hub, self.config, metrics=self.metrics, incarnation=self.incarnation
        )

    def _routing(self) -> RoutingBackend:
        if not self.config.cluster.redis_url:
            return MemoryRouting()
        from kefu.routing.redis import RedisRouting

        return RedisRouting(self.config.cluster.redis_url, self.incarnation)

    def _join_cluster(self) -> None:
        """Cluster mode: the ring partitions the desk's periodic work and webhook delivery,
        and a dead node's agent connections are dropped with it."""
        from kefu.cluster.broker import RedisBroker

        if not isinstance(self.broker, RedisBroker):
            return
        membership = self.broker.membership
        self.desk.owns = membership.owns
        from kefu.cluster.webhook_log import RedisWebhookLog

        self.webhooks.use_log(
            RedisWebhookLog(
                self.broker.client,
                membership.owns,
                self.metrics,
                capacity=self.config.webhooks.webhook_queue_size,
            )
        )
        routing = self.routing

        async def forget(member: str) -> None:
            await routing.forget_node(member, ids.now_ms())

        membership.purgers.append(forget)
        self.broker.on_announce(self._announced)

    def _announced(self, topic: str, data: str) -> None:
        if topic == "config":
            task = asyncio.get_running_loop().create_task(self.load_cluster_settings())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def advertise(self, url: str) -> None:
        """The URL the node is reachable at (known once it listens): in cluster mode it is
        published with the next membership heartbeat."""
        from kefu.cluster.broker import RedisBroker

        if isinstance(self.broker, RedisBroker) and self.broker.joined:
            self.broker.membership.url = url

    async def load_cluster_settings(self) -> None:
        """Apply the cluster-wide runtime settings kept in Redis (``kefu config set``)."""
        from kefu.cluster import redis_client as rc
        from kefu.cluster.broker import RedisBroker, read_settings

        if not isinstance(self.broker, RedisBroker):
            return
        try:
            overrides = await read_settings(self.broker.client)
        except rc.REDIS_ERRORS as exc:
            log.warning("cluster settings not read: %s", exc)
            return
        try:
            self.reconfigure(overrides=overrides)
        except ConfigError as exc:  # a value another version accepted: keep what runs
            log.error("cluster settings refused: %s", exc)

    async def start(self) -> None:
        await self.store.start()
        await self.broker.start()
        self._join_cluster()
        await self.load_cluster_settings()
        await self.webhooks.start()
        await self.desk.start()
        loop = asyncio.get_running_loop()
        self._sweeper = loop.create_task(self._sweep_loop())
        self._loop_watch = loop.create_task(watch_loop(self.metrics.loop_lag))

    async def _sweep_loop(self) -> None:
        period = max(0.05, min(1.0, self.config.timeouts.heartbeat_interval / 4 or 1.0))
        period = min(period, self.config.timeouts.auth_timeout / 2)
        while True:
            await asyncio.sleep(period)
            try:
                self.gateway.sweep(time.monotonic())
            except Exception:  # pragma: no cover - a bug must not stop the heartbeats
                log.exception("sweep failed")

    async def ready(self) -> str | None:
        """None when ready for traffic, else the reason it is not."""
        if self.draining:
            return "draining"
        try:
            await self.store.ping()
        except StoreError as exc:
            return f"store unavailable: {exc}"
        return None

    async def drain(self) -> None:
        """Graceful shutdown: refuse new work, finish in-flight messages, close clients.

        Every message already handed to the store is committed and acknowledged before
        the clients are closed with 1012 (service restart: reconnect elsewhere).
        """
        if self.draining:
            return
        self.draining = True
        self.service.draining = True
        self.gateway.draining = True
        self.metrics.draining.set(1)
        grace = self.config.timeouts.shutdown_grace
        deadline = time.monotonic() + grace
        if not await self.service.wait_idle(grace):
            log.warning(
                "drain: %d messages still in flight after %.1fs", self.service.inflight, grace
            )
        notice = f.Notice(code="draining", text="this node is restarting: reconnect")
        sessions = list(self.gateway.sessions.values())
        for session in sessions:
            session.send(notice)
        remaining = max(0.1, deadline - time.monotonic())
        await asyncio.gather(
            *(
                s.close(CloseCode.SERVICE_RESTART, "node restarting", flush=remaining)
                for s in sessions
            ),
            return_exceptions=True,
        )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.drain()
        for task in (self._sweeper, self._loop_watch):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.gateway.settle()
        with contextlib.suppress(ClusterError):  # this node's agent connections are gone
            await self.routing.forget_node(self.incarnation, ids.now_ms())
        await self.desk.close()
        await self.webhooks.close()
        await self.broker.close()
        await self.store.close()
