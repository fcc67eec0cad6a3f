"""The gateway: a connection's life from upgrade to close, independent of the transport.

A transport adapter calls :meth:`Gateway.connect` once the WebSocket is open, then
:meth:`on_text` / :meth:`on_binary` / :meth:`on_pong` for what arrives, and
:meth:`Session.closed` when the socket ends. The gateway authenticates, enforces the
per-connection limits and hands valid requests to the :class:`ChatService`.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from typing import Any

from kefu.auth import verify_token
from kefu.config import Config
from kefu.errors import AuthError, CloseCode, ErrorCode
from kefu.hub import Hub
from kefu.metrics import Metrics
from kefu.model import Role
from kefu.protocol import frames as f
from kefu.protocol.server import Rejected, ServerConnection
from kefu.ratelimit import TokenBucket
from kefu.service import ChatService
from kefu.session import Session
from kefu.transport.base import Transport

log = logging.getLogger(__name__)

_AUTH_CLOSE = {
    ErrorCode.TOKEN_EXPIRED: CloseCode.TOKEN_EXPIRED,
    ErrorCode.INVALID_TOKEN: CloseCode.INVALID_TOKEN,
}


#: Open files kept for everything but client sockets: the store, Redis and PostgreSQL
#: pools, the writer's pipes, logs, and sockets being refused.
FD_RESERVE = 256


def file_limit_cap() -> int:
    """How many connections the open-file hard limit leaves room for (the node raises its
    soft limit to the hard one at start-up)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        return 2**31
    return max(1, hard - FD_RESERVE)


class Gateway:
    def __init__(self, config: Config, *, metrics: Metrics, hub: Hub, service: ChatService) -> None:
        self.config = config
        self.metrics = metrics
        self.hub = hub
        self.service = service
        self.sessions: dict[str, Session] = {}
        self.draining = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._fd_cap = file_limit_cap()
        if self._fd_cap < config.limits.max_connections:
            log.warning(
                "max_connections %d is above what the open-file limit allows: refusing "
                "connections (4004) past %d instead",
                config.limits.max_connections,
                self._fd_cap,
            )

    @property
    def max_connections(self) -> int:
        """``max_connections``, held below the process's open-file limit: past the limit
        the kernel would reset new sockets before they could get the documented 4004."""
        return min(self.config.limits.max_connections, self._fd_cap)

    # -- opening --------------------------------------------------------------------------

    def new_session(self, transport: Transport) -> Session:
        lim = self.config.limits
        session = Session(
            transport,
            metrics=self.metrics,
            protocol=ServerConnection(max_body_chars=lim.max_body_chars),
            rate=TokenBucket(lim.rate_per_second, lim.rate_burst, time.monotonic()),
            max_frames=lim.send_queue_frames,
            soft_frames=lim.send_queue_soft_frames,
            max_bytes=lim.send_queue_bytes,
            on_closed=self._closed,
        )
        self.sessions[session.id] = session
        self.metrics.connections.inc()
        self.metrics.connections_opened.inc()
        return session

    async def connect(
        self,
        session: Session,
        *,
        user_id: str | None,
        token: str | None,
        origin: str | None,
    ) -> None:
        """Checks made as the socket opens; authenticates at once when a token came along."""
        allowed = self.config.allowed_origins
        if origin is not None and allowed and origin not in allowed and "*" not in allowed:
            await self._refuse(
                session,
                CloseCode.ORIGIN_FORBIDDEN,
                ErrorCode.FORBIDDEN,
                f"origin {origin[:100]!r} is not allowed",
            )
            return
        if self.draining:
            await self._refuse(
                session,
                CloseCode.SERVICE_RESTART,
                ErrorCode.SHUTTING_DOWN,
                "node is shutting down: connect to another",
            )
            return
        if len(self.sessions) > self.max_connections:
            await self._refuse(
                session,
                CloseCode.NODE_FULL,
                ErrorCode.NODE_FULL,
                "node is full: reconnect later or elsewhere",
            )
            return
        if not user_id:
            await self._refuse(
                session,
                CloseCode.USER_MISMATCH,
                ErrorCode.USER_MISMATCH,
                "the user_id query parameter is required",
            )
            return
        session.claimed_user = user_id
        if token:
            await self.authenticate(session, token, None)

    async def _refuse(
        self,
        session: Session,
        close: CloseCode,
        code: ErrorCode,
        message: str,
        request_id: f.RequestId | None = None,
    ) -> None:
        if session.principal is None:
            self.metrics.refused.labels(reason=close.name.lower()).inc()
        self.service.reply_error(session, code, message, request_id)
        await session.close(close, message, flush=1.0)

    async def authenticate(
        self, session: Session, token: str, request_id: f.RequestId | None
    ) -> None:
        try:
            principal = verify_token(self.config.jwt_secret, token)
        except AuthError as exc:
            await self._refuse(
                session,
                _AUTH_CLOSE.get(exc.code, CloseCode.INVALID_TOKEN),
                exc.code,
                exc.message,
                request_id,
            )
            return
        if principal.user_id != session.claimed_user:
            await self._refuse(
                session,
                CloseCode.USER_MISMATCH,
                ErrorCode.USER_MISMATCH,
                "the token's subject does not match user_id",
                request_id,
            )
            return
        limit = self.config.limits.max_connections_per_user
        over = self.hub.count(principal.user_id) >= limit
        if not over:  # the user's connections on other nodes of a cluster count too
            elsewhere = await self.service.broker.connections_elsewhere(principal.user_id)
            if session.closing:
                return
            over = self.hub.count(principal.user_id) + elsewhere >= limit
        if over:
            await self._refuse(
                session,
                CloseCode.TOO_MANY_CONNECTIONS,
                ErrorCode.TOO_MANY_CONNECTIONS,
                "too many connections for this user: close another first",
                request_id,
            )
            return
        session.principal = principal
        session.protocol.authenticated()
        self.hub.add(session)
        self.service.broker.session_opened(session)
        session.send(
            f.Hello(
                user=principal.user_id,
                role=principal.role.value,
                session=session.id,
                node=self.config.node_id,
                heartbeat=self.config.timeouts.heartbeat_interval,
                protocol=f.PROTOCOL_VERSION,
            )
        )
        if principal.role is Role.AGENT:
            await self.service.desk.agent_connected(principal)

    # -- receiving ------------------------------------------------------------------------

    async def on_text(self, session: Session, data: bytes | str) -> None:
        now = time.monotonic()
        session.last_seen = now
        if session.closing:
            return
        wait = session.rate.take(now)
        if wait > 0:
            self.metrics.rate_limited.inc()
            lim = self.config.limits
            if session.rate.debt > lim.rate_burst * lim.rate_flood_factor:
                await self._refuse(
                    session,
                    CloseCode.RATE_FLOOD,
                    ErrorCode.RATE_LIMITED,
                    "rate limit exceeded persistently: slow down",
                )
                return
            self.service.reply_error(
                session,
                ErrorCode.RATE_LIMITED,
                "rate limit exceeded: frame not processed",
                _request_id_of(session, data),
                retry_after=round(wait, 3),
            )
            return
        event = session.protocol.receive_text(data)
        if isinstance(event, Rejected):
            await self._rejected(session, event)
            return
        self.metrics.frame_op(str(type(event).__struct_config__.tag)).inc()
        if isinstance(event, f.Auth):
            await self.authenticate(session, event.token, event.id)
            return
        await self.service.handle(session, event)

    async def on_binary(self, session: Session, data: bytes) -> None:
        session.last_seen = time.monotonic()
        await self._rejected(session, session.protocol.receive_binary(data))

    def on_pong(self, session: Session) -> None:
        session.last_seen = time.monotonic()

    async def _rejected(self, session: Session, event: Rejected) -> None:
        self.metrics.error_code(event.error.code).inc()
        session.send(event.error)
        if event.close is not None:
            await session.close(event.close, event.error.message, flush=1.0)

    # -- closing --------------------------------------------------------------------------

    def _closed(self, session: Session) -> None:
        if self.sessions.pop(session.id, None) is None:
            return
        self.hub.remove(session)
        principal = session.principal
        if principal is not None:
            self.service.broker.session_closed(session)
        if principal is not None and principal.role in (Role.AGENT, Role.ADMIN):
            task = asyncio.get_running_loop().create_task(
                self.service.desk.agent_disconnected(principal, self.hub.count(principal.user_id))
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self.metrics.connections.dec()
        self.metrics.connections_closed.labels(code=str(session.close_code or "peer")).inc()

    async def settle(self, timeout: float = 5.0) -> None:
        """Wait (bounded) for the work closed connections left behind (agents' grace)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)

    def sweep(self, now: float) -> None:
        """Heartbeats and the authentication deadline; called about once a second."""
        timeouts = self.config.timeouts
        interval = timeouts.heartbeat_interval
        for session in tuple(self.sessions.values()):
            if session.closing:
                continue
            if session.principal is None:
                if now - session.created > timeouts.auth_timeout:
                    session.close_soon(CloseCode.AUTH_TIMEOUT, "not authenticated in time")
                continue
            if interval <= 0:
                continue
            if now - session.last_seen > interval * timeouts.heartbeat_misses:
                self.metrics.heartbeat_timeouts.inc()
                session.close_soon(CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout")
            elif now >= session.next_ping and now - session.last_seen >= interval:
                session.next_ping = now + interval
                session.ping()


def _request_id_of(session: Session, data: bytes | str) -> f.RequestId | None:
    """Best-effort request id of a frame we refuse without processing."""
    event = session.protocol.receive_text(data) if len(data) < 4096 else None
    if event is None or isinstance(event, Rejected):
        return None if event is None else event.error.id
    return event.id
