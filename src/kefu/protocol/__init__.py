"""Wire protocol v1, sans I/O: it imports neither asyncio nor aiohttp.

* :mod:`kefu.protocol.frames` — every frame as a typed Struct.
* :mod:`kefu.protocol.server` — the server's view of one connection.
* :mod:`kefu.protocol.client` — encode requests and decode server frames for clients.
"""

from kefu.protocol.frames import PROTOCOL_VERSION

__all__ = ["PROTOCOL_VERSION"]
