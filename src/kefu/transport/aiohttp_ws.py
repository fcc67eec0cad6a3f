"""The aiohttp WebSocket adapter: moves frames between an aiohttp socket and the gateway."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from typing import Any, cast

from aiohttp import WSMsgType, hdrs, web
from aiohttp.http_websocket import WebSocketError, ws_ext_gen

from kefu.errors import CloseCode
from kefu.gateway import Gateway

log = logging.getLogger(__name__)

#: How long a close handshake may take before the socket is simply dropped.
CLOSE_TIMEOUT = 2.0


class KefuWebSocketResponse(web.WebSocketResponse):
    """A WebSocketResponse whose permessage-deflate window is capped.

    aiohttp answers a client's permessage-deflate offer with the client's window size
    (32 KiB by default), and a deflate stream's memory grows with its window: at 15 bits a
    compressor holds about 256 KiB. Answering with a smaller ``server_max_window_bits``
    (allowed by RFC 7692 section 7.1.2.1) keeps compression affordable per connection.
    """

    def __init__(self, *, window_bits: int = 15, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._window_bits = window_bits

    def _handshake(self, request: Any) -> Any:
        headers, protocol, compress, notakeover = super()._handshake(request)
        if compress and compress > self._window_bits:
            compress = self._window_bits
            headers[hdrs.SEC_WEBSOCKET_EXTENSIONS] = ws_ext_gen(
                compress=compress, isserver=True, server_notakeover=notakeover
            )
        return headers, protocol, compress, notakeover


#: Above this many bytes waiting in the socket's buffer, frames queue in the outbox.
DIRECT_WRITE_LIMIT = 64 * 1024
_PACK_LEN2 = struct.Struct("!BBH").pack
_PACK_LEN3 = struct.Struct("!BBQ").pack


def text_frame_header(length: int) -> bytes:
    """RFC 6455 header of an unmasked, final, uncompressed text frame (server to client)."""
    if length < 126:
        return bytes((0x81, length))
    if length < 65536:
        return _PACK_LEN2(0x81, 126, length)
    return _PACK_LEN3(0x81, 127, length)


class AiohttpTransport:
    """:class:`kefu.transport.base.Transport` over an aiohttp WebSocketResponse."""

    __slots__ = ("_closing", "_direct", "_raw", "ws")

    def __init__(self, ws: web.WebSocketResponse, raw: asyncio.BaseTransport | None) -> None:
        self.ws = ws
        # uvloop's transports do not subclass asyncio's: check for what is used.
        writable = all(hasattr(raw, a) for a in ("write", "get_write_buffer_size", "abort"))
        self._raw = cast("asyncio.WriteTransport", raw) if writable else None
        # Frames may bypass aiohttp's writer only when no deflate stream must see them.
        self._direct = self._raw is not None and not ws.compress
        self._closing: asyncio.Task[None] | None = None

    async def send_text(self, data: bytes) -> None:
        await self.ws.send_frame(data, WSMsgType.TEXT)

    def try_send_text(self, data: bytes) -> bool:
        raw = self._raw
        if (
            not self._direct
            or raw is None
            or self._closing is not None
            or self.ws.closed
            or raw.is_closing()
            or raw.get_write_buffer_size() > DIRECT_WRITE_LIMIT
        ):
            return False
        raw.write(text_frame_header(len(data)) + data)
        return True

    async def ping(self) -> None:
        await self.ws.ping()

    async def close(self, code: int, reason: str) -> None:
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self._close(code, reason))
        await asyncio.shield(self._closing)

    async def _close(self, code: int, reason: str) -> None:
        try:
            await asyncio.wait_for(
                self.ws.close(code=code, message=reason.encode("utf-8")), CLOSE_TIMEOUT
            )
        except (TimeoutError, ConnectionError, RuntimeError):
            # The peer does not read (or is gone): drop the socket.
            if self._raw is not None:
                self._raw.abort()

    async def wait_closed(self) -> None:
        if self._closing is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._closing)


def _bearer(header: str | None) -> str | None:
    if header and header[:7].lower() == "bearer ":
        return header[7:].strip() or None
    return None


async def websocket_handler(request: web.Request) -> web.StreamResponse:
    gateway: Gateway = request.app[GATEWAY_KEY]
    config = gateway.config
    ws = KefuWebSocketResponse(
        window_bits=config.compression_window_bits,
        compress=config.compression,
        max_msg_size=config.limits.max_frame_bytes,
        autoping=False,
        decode_text=False,
        timeout=CLOSE_TIMEOUT,
    )
    try:
        await ws.prepare(request)
    except web.HTTPException:
        gateway.metrics.refused.labels(reason="not_websocket").inc()
        raise
    transport = AiohttpTransport(ws, request.transport)
    session = gateway.new_session(transport)
    try:
        await gateway.connect(
            session,
            user_id=request.query.get("user_id"),
            token=request.query.get("token") or _bearer(request.headers.get(hdrs.AUTHORIZATION)),
            origin=request.headers.get(hdrs.ORIGIN),
        )
        while not session.closing:
            msg = await ws.receive()
            kind = msg.type
            if kind is WSMsgType.TEXT:
                await gateway.on_text(session, msg.data)
            elif kind is WSMsgType.BINARY:
                await gateway.on_binary(session, msg.data)
            elif kind is WSMsgType.PING:
                gateway.on_pong(session)
                await ws.pong(msg.data)
            elif kind is WSMsgType.PONG:
                gateway.on_pong(session)
            elif kind is WSMsgType.ERROR:
                exc = ws.exception()
                too_big = isinstance(exc, WebSocketError) and exc.code == 1009
                code = CloseCode.MESSAGE_TOO_BIG if too_big else CloseCode.PROTOCOL_ERROR
                reason = "frame too large" if too_big else "websocket protocol error"
                gateway.metrics.errors.labels(
                    code="frame_too_large" if too_big else "ws_error"
                ).inc()
                await session.close(code, reason)
                break
            else:  # CLOSE, CLOSING, CLOSED
                break
    except ConnectionError:
        pass
    except Exception:  # a bug: tell the client to come back, keep serving the others
        log.exception("connection %s failed", session.id)
        await session.close(CloseCode.INTERNAL_ERROR, "internal error")
    finally:
        session.closed()
        await transport.wait_closed()
        if not ws.closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), CLOSE_TIMEOUT)
    return ws


GATEWAY_KEY = web.AppKey("gateway", Gateway)
