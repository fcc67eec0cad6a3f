"""The Kefu Python client SDK: ``async with Client(url, user_id, token) as c: ...``."""

from kefu.client.client import Backoff, Client
from kefu.errors import ConnectionClosed, RemoteError

__all__ = ["Backoff", "Client", "ConnectionClosed", "RemoteError"]
