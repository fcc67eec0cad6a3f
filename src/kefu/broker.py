"""The broker: delivers a frame to every connection of some users, wherever they are.

In embedded mode every connection is on this node, so :class:`LocalBroker` hands frames
straight to the Hub. The cluster implementation (Redis) keeps the same interface and
publishes once per node that holds a recipient.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable

from kefu.hub import Hub
from kefu.session import Session


class Broker(abc.ABC):
    @abc.abstractmethod
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
        """Push ``data`` to all connections of ``user_ids`` except ``exclude``.

        Delivery is best effort: chat messages are already stored and clients recover any
        push they miss by ``sync``. ``offline``: a cluster broker keeps it for recipients with
        no connection anywhere (their offline inbox, drained into their next connection);
        on one node there is nothing to keep: the client syncs when it connects.
        """

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def announce(self, topic: str, data: str = "") -> None:
        """Tell every node (this one excepted) that ``topic`` changed: ``"desk"`` means
        groups or agents were saved (they re-read them from the store), ``"watch"`` that a
        supervisor started or stopped watching (``data``: JSON [conversation, user, on]),
        ``"queue"`` that a group's queue changed (``data``: JSON [group, assigned ms or
        null]; its ring owner pushes the positions), ``"config"`` that the runtime
        settings in Redis changed (``kefu config``)."""
        return None

    def on_announce(self, callback: Callable[[str, str], None]) -> None:
        """Call ``callback(topic, data)`` for every announcement from another node."""
        return None

    async def connections_elsewhere(self, user_id: str) -> int:
        """The user's connections on other nodes (0 when there are none or it can't tell)."""
        return 0

    def session_opened(self, session: Session) -> None:
        """An authenticated connection joined this node's Hub."""
        return None

    def session_closed(self, session: Session) -> None:
        """A connection left this node's Hub."""
        return None


class LocalBroker(Broker):
    def __init__(self, hub: Hub) -> None:
        self.hub = hub

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
        self.hub.push(user_ids, data, ephemeral=ephemeral, received=received, exclude=exclude)
