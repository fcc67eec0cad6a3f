"""HTTP on the node's port: ``/ws``, ``/health``, ``/ready``, ``/metrics``, the REST API
(``/api/v1``, described at ``/api/openapi.json``); and running it."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kefu import __version__
from kefu.api import add_routes, openapi_document
from kefu.config import Config, advertised_url
from kefu.errors import ConfigError
from kefu.node import Node
from kefu.runtime import tune_process
from kefu.transport import deflate
from kefu.transport.aiohttp_ws import GATEWAY_KEY, websocket_handler

log = logging.getLogger(__name__)

NODE_KEY = web.AppKey("node", Node)


async def health(request: web.Request) -> web.Response:
    """Liveness: the process serves HTTP."""
    return web.json_response({"status": "ok", "version": __version__})


async def ready(request: web.Request) -> web.Response:
    """Readiness: the store answers and the node is not draining."""
    reason = await request.app[NODE_KEY].ready()
    if reason is None:
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "unavailable", "reason": reason}, status=503)


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[NODE_KEY].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


def build_app(node: Node) -> web.Application:
    app = web.Application(client_max_size=256 * 1024)
    app[NODE_KEY] = node
    app[GATEWAY_KEY] = node.gateway
    app.router.add_get("/ws", websocket_handler)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/openapi.json", openapi)
    add_routes(app, node.desk)
    return app


class Server:
    """A started node with its HTTP listener; :meth:`stop` is the graceful shutdown."""

    def __init__(self, config: Config, node: Node | None = None) -> None:
        self.config = config
        self.node = node or Node(config)
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.port = config.port

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    async def start(self) -> None:
        if self.config.compression:
            deflate.install(self.config.compression_mem_level)
        await self.node.start()
        self._runner = web.AppRunner(
            build_app(self.node), handle_signals=False, access_log=None, shutdown_timeout=5.0
        )
        await self._runner.setup()
        self._site = web.TCPSite(
            self._runner, self.config.host, self.config.port, backlog=4096, reuse_address=True
        )
        await self._site.start()
        for address in self._runner.addresses:
            if isinstance(address, tuple):
                self.port = int(address[1])
                break
        self.node.advertise(advertised_url(self.config, self.port))

    async def stop(self) -> None:
        """Stop listening, drain the node (acks flushed, clients closed 1012), release."""
        if self._site is not None:
            await self._site.stop()
            self._site = None
        await self.node.drain()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.node.close()


async def serve(
    config: Config,
    *,
    on_started: Callable[[Server], Awaitable[None]] | None = None,
    reload: Callable[[], Config] | None = None,
) -> None:
    """Run a node until SIGTERM or SIGINT, then shut it down gracefully.

    SIGHUP calls ``reload`` (which re-reads the config file and the environment) and hands
    the result to :meth:`Node.reconfigure`: hot settings change, others are logged."""
    server = Server(config)
    await server.start()
    tune_process(server.node.metrics)  # after start-up, so that its objects are frozen out of GC
    log.info(
        "kefu %s node %s listening on %s (data in %s)",
        __version__,
        config.node_id,
        server.url,
        config.data_dir,
    )
    if on_started is not None:
        await on_started(server)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def hangup() -> None:
        if reload is None:
            return
        try:
            server.node.reconfigure(base=reload())
        except ConfigError as exc:
            log.error("SIGHUP: configuration refused, keeping the running one: %s", exc)

    loop.add_signal_handler(signal.SIGHUP, hangup)
    try:
        await stop.wait()
        log.info("shutting down: draining connections")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await server.stop()
    log.info("stopped")
