"""A minimal WebSocket client (RFC 6455) for the load generator.

The generator shares the machine's two cores with what it measures, so its cost per
message counts against the results. Through aiohttp's client each frame costs a wake-up of
a reader task and the framing in Python, about as much CPU as the node spends on the
message. Here a frame is parsed in ``data_received`` and handed to a callback, and a send
is one ``write``. It speaks only what the generator needs: text frames without extensions
(no permessage-deflate: with compression the fleet uses aiohttp), pings answered, closes
honoured. Client frames are masked, as RFC 6455 requires, with an all-zero key: the
server unmasks them (XOR with zero) like any other, and the payload goes out unchanged.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import struct
import urllib.parse
from collections.abc import Callable
from typing import cast

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_ZERO_MASK = b"\0\0\0\0"
_LEN16 = struct.Struct("!H")
_LEN64 = struct.Struct("!Q")
TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA


class HandshakeError(ConnectionError):
    """The server did not upgrade the connection."""


def frame(opcode: int, payload: bytes) -> bytes:
    """A final, masked (zero key) client frame."""
    length = len(payload)
    if length < 126:
        header = bytes((0x80 | opcode, 0x80 | length))
    elif length < 65536:
        header = bytes((0x80 | opcode, 0x80 | 126)) + _LEN16.pack(length)
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + _LEN64.pack(length)
    return header + _ZERO_MASK + payload


class WsClient(asyncio.Protocol):
    """One client connection; open with :meth:`connect`."""

    def __init__(
        self,
        on_message: Callable[[bytes], None],
        on_close: Callable[[WsClient], None],
        key: bytes,
    ) -> None:
        self._on_message = on_message
        self._on_close = on_close
        self._key = key
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._fragments: list[bytes] = []
        self._upgraded: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.close_code: int | None = None
        self.closed = False

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        on_message: Callable[[bytes], None],
        on_close: Callable[[WsClient], None],
        local_addr: tuple[str, int] | None = None,
        timeout: float = 30.0,
    ) -> WsClient:
        """Connect to an ``http://`` or ``ws://`` URL and upgrade; raises OSError,
        TimeoutError or :class:`HandshakeError`."""
        parts = urllib.parse.urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        key = base64.b64encode(os.urandom(16))
        loop = asyncio.get_running_loop()
        client = cls(on_message, on_close, key)

        async def opening() -> None:
            await loop.create_connection(lambda: client, host, port, local_addr=local_addr)
            assert client._transport is not None
            client._transport.write(
                f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n".encode()
            )
            await client._upgraded

        try:
            await asyncio.wait_for(opening(), timeout)
        except BaseException:
            client.abort()
            raise
        return client

    # -- sending --------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Send one text frame (``data`` is UTF-8); ConnectionError once closed."""
        transport = self._transport
        if self.closed or transport is None or transport.is_closing():
            raise ConnectionResetError("the WebSocket is closed")
        transport.write(frame(TEXT, data))

    def close(self, code: int = 1000) -> None:
        """Send a close frame and close the connection (no wait for the server's)."""
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(frame(CLOSE, _LEN16.pack(code)))
            transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # (uvloop's are not subclasses)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._upgraded.done():
            self._upgraded.set_exception(exc or ConnectionResetError("closed during handshake"))
        if not self.closed:
            self.closed = True
            self._on_close(self)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        if not self._upgraded.done():
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buffer[:end]).decode("latin-1")
            del buffer[: end + 4]
            error = self._check_upgrade(head)
            if error is not None:
                self._upgraded.set_exception(error)
                self.abort()
                return
            self._upgraded.set_result(None)
        self._frames()

    def _check_upgrade(self, head: str) -> HandshakeError | None:
        status, *lines = head.split("\r\n")
        if status.split(" ", 2)[1:2] != ["101"]:
            return HandshakeError(f"no upgrade: {status!r}")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        accept = base64.b64encode(hashlib.sha1(self._key + _GUID).digest()).decode()
        if headers.get("sec-websocket-accept") != accept:
            return HandshakeError("wrong Sec-WebSocket-Accept")
        if headers.get("sec-websocket-extensions"):
            return HandshakeError("the server chose an extension this client does not speak")
        return None

    def _frames(self) -> None:
        buffer = self._buffer
        while len(buffer) >= 2:
            first, second = buffer[0], buffer[1]
            length, start = second & 0x7F, 2
            if second & 0x80:  # servers never mask
                self._fail(1002)
                return
            if length == 126:
                if len(buffer) < 4:
                    return
                (length,) = _LEN16.unpack_from(buffer, 2)
                start = 4
            elif length == 127:
                if len(buffer) < 10:
                    return
                (length,) = _LEN64.unpack_from(buffer, 2)
                start = 10
            end = start + length
            if len(buffer) < end:
                return
            payload = bytes(buffer[start:end])
            del buffer[:end]
            self._frame(first & 0x80, first & 0x0F, payload)
            if self.closed:
                return

    def _frame(self, fin: int, opcode: int, payload: bytes) -> None:
        if opcode in (TEXT, BINARY, 0x0):
            if not fin:
                self._fragments.append(payload)
                return
            if self._fragments:
                payload = b"".join([*self._fragments, payload])
                self._fragments.clear()
            self._on_message(payload)
        elif opcode == PING:
            if self._transport is not None and not self._transport.is_closing():
                self._transport.write(frame(PONG, payload))
        elif opcode == CLOSE:
            self.close_code = _LEN16.unpack_from(payload)[0] if len(payload) >= 2 else 1005
            self.close(self.close_code if self.close_code != 1005 else 1000)
        # PONG and unknown control frames: nothing to do

    def _fail(self, code: int) -> None:
        self.close_code = code
        self.close(code)
