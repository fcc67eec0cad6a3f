"""The Hub: this node's authenticated connections, keyed by user, then by session id."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from kefu.session import Session


class Hub:
    def __init__(self) -> None:
        self._users: dict[str, dict[str, Session]] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, session: Session) -> None:
        conns = self._users.setdefault(session.user_id, {})
        if session.id not in conns:
            conns[session.id] = session
            self._count += 1

    def remove(self, session: Session) -> None:
        if session.principal is None:
            return
        conns = self._users.get(session.user_id)
        if conns is None or conns.pop(session.id, None) is None:
            return
        self._count -= 1
        if not conns:
            del self._users[session.user_id]

    def count(self, user_id: str) -> int:
        return len(self._users.get(user_id, ()))

    def sessions(self, user_id: str) -> Iterable[Session]:
        return tuple(self._users.get(user_id, {}).values())

    def users(self) -> Iterable[str]:
        return tuple(self._users)

    def __iter__(self) -> Iterator[Session]:
        for conns in tuple(self._users.values()):
            yield from tuple(conns.values())

    def push(
        self,
        user_ids: Iterable[str],
        data: bytes,
        *,
        ephemeral: bool = False,
        received: float = 0.0,
        exclude: Session | None = None,
    ) -> int:
        """Queue ``data`` on every connection of each user; return how many took it."""
        delivered = 0
        for user_id in user_ids:
            conns = self._users.get(user_id)
            if not conns:
                continue
            for session in tuple(conns.values()):
                if session is not exclude and session.push(
                    data, ephemeral=ephemeral, received=received
                ):
                    delivered += 1
        return delivered
