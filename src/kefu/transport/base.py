"""The transport seam: what a session needs from a WebSocket implementation.

The aiohttp adapter (:mod:`kefu.transport.aiohttp_ws`) is the only one today; a faster one
(picows, say) implements the same three coroutines and drives the same
:class:`kefu.session.Session` from its receive loop. Nothing above this layer imports a
WebSocket library.
"""

from __future__ import annotations

from typing import Protocol


class Transport(Protocol):
    """One open WebSocket connection, as seen from the node."""

    async def send_text(self, data: bytes) -> None:
        """Write ``data`` (UTF-8 JSON) as a text message; waits while the socket is full."""

    def try_send_text(self, data: bytes) -> bool:
        """Write a text message now, without waiting, if that is possible.

        False means nothing was written (the socket is backed up, compression is on, ...):
        the caller queues the frame for :meth:`send_text`. This is the hot path: a frame to
        an idle connection costs one ``write`` and no task.
        """

    async def ping(self) -> None:
        """Send a WebSocket ping control frame."""

    async def close(self, code: int, reason: str) -> None:
        """Send a close frame with ``code`` and end the connection."""
