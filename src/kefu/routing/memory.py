"""The embedded routing backend: state in this process's memory.

Every method runs to completion without awaiting anything, so on one event loop each is
atomic as the interface requires. The state is derived: the desk rebuilds it from the
store at start-up.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Collection

from kefu.errors import ErrorCode
from kefu.model import AgentStatus
from kefu.routing.base import AgentState, Assignment, QueueEntry, RoutingBackend, refuse

_EMPTY: collections.OrderedDict[str, QueueEntry] = collections.OrderedDict()


class MemoryRouting(RoutingBackend):
    def __init__(self) -> None:
        self._agents: dict[str, AgentState] = {}
        self._live: dict[str, collections.OrderedDict[str, QueueEntry]] = {}
        self._backlog: dict[str, collections.OrderedDict[str, QueueEntry]] = {}
        self._where: dict[str, QueueEntry] = {}
        self._built = False

    async def claim_rebuild(self) -> bool:
        """Once: this process's memory starts empty."""
        return not self._built

    async def rebuilt(self) -> None:
        self._built = True

    # -- agents -------------------------------------------------------------------------------

    async def configure_agent(
        self, agent_id: str, capacity: int, groups: Collection[str], now: int
    ) -> None:
        state = self._agents.get(agent_id)
        if state is None:
            self._agents[agent_id] = AgentState(
                id=agent_id, capacity=capacity, groups=frozenset(groups), disconnected_at=now
            )
        else:
            state.capacity = capacity
            state.groups = frozenset(groups)

    async def remove_agent(self, agent_id: str) -> None:
        self._agents.pop(agent_id, None)

    async def agent(self, agent_id: str) -> AgentState | None:
        state = self._agents.get(agent_id)
        return None if state is None else _copy(state)

    async def agents(self) -> list[AgentState]:
        return [_copy(a) for a in self._agents.values()]

    async def connected(self, agent_id: str, now: int) -> AgentState | None:
        state = self._agents.get(agent_id)
        if state is None:
            return None
        if state.connections == 0:
            state.last_assigned = max(state.last_assigned, now)  # in line behind the others
        state.connections += 1
        state.disconnected_at = None
        return _copy(state)

    async def disconnected(self, agent_id: str, now: int) -> AgentState | None:
        state = self._agents.get(agent_id)
        if state is None:
            return None
        if state.connections == 0:
            return _copy(state)  # an unmatched extra call must not restart the grace period
        state.connections -= 1
        if state.connections == 0:
            state.disconnected_at = now
        return _copy(state)

    async def set_status(self, agent_id: str, status: AgentStatus, now: int) -> AgentState:
        state = self._agents.get(agent_id)
        if state is None:
            raise refuse(ErrorCode.NOT_FOUND, f"{agent_id!r} is not an agent")
        if status is AgentStatus.ONLINE and state.status is not AgentStatus.ONLINE:
            state.last_assigned = max(state.last_assigned, now)  # back in line, at the end
        state.status = status
        return _copy(state)

    # -- queues -------------------------------------------------------------------------------

    async def enqueue(self, entry: QueueEntry, *, head: bool = False) -> None:
        self._remove(entry.conv)
        table = self._backlog if entry.backlog else self._live
        queue = table.setdefault(entry.group, collections.OrderedDict())
        queue[entry.conv] = dataclasses.replace(entry)
        if head:
            queue.move_to_end(entry.conv, last=False)
        self._where[entry.conv] = queue[entry.conv]

    def _remove(self, conv: str) -> QueueEntry | None:
        entry = self._where.pop(conv, None)
        if entry is not None:
            table = self._backlog if entry.backlog else self._live
            queue = table.get(entry.group)
            if queue is not None:
                queue.pop(conv, None)
                if not queue:
                    del table[entry.group]
        return entry

    async def dequeue(self, conv: str) -> QueueEntry | None:
        entry = self._remove(conv)
        return None if entry is None else dataclasses.replace(entry)

    async def queue(self, group: str) -> list[QueueEntry]:
        entries = [*self._live.get(group, _EMPTY).values()]
        entries += self._backlog.get(group, _EMPTY).values()
        return [dataclasses.replace(e) for e in entries]

    async def queue_length(self, group: str) -> int:
        return len(self._live.get(group, _EMPTY)) + len(self._backlog.get(group, _EMPTY))

    async def queued_groups(self) -> list[str]:
        return sorted(set(self._live) | set(self._backlog))

    async def move_to_backlog(self, group: str, older_than: int) -> list[QueueEntry]:
        moved = []
        for entry in list(self._live.get(group, {}).values()):
            if entry.since < older_than:
                moved.append(dataclasses.replace(entry, backlog=True))
                await self.enqueue(moved[-1])
        return moved

    # -- assignment -----------------------------------------------------------------------------

    def _best(self, entry: QueueEntry) -> AgentState | None:
        if entry.prefer is not None and entry.prefer not in entry.excluded:
            preferred = self._agents.get(entry.prefer)
            if preferred is not None and entry.group in preferred.groups and preferred.available():
                return preferred
        best: AgentState | None = None
        fallback: AgentState | None = None  # the best excluded one, if nobody else is free
        for state in self._agents.values():
            if entry.group not in state.groups or not state.available():
                continue
            key = (state.load, state.last_assigned, state.id)
            if state.id in entry.excluded:
                if fallback is None or key < (fallback.load, fallback.last_assigned, fallback.id):
                    fallback = state
            elif best is None or key < (best.load, best.last_assigned, best.id):
                best = state
        return best or fallback

    def _give(self, state: AgentState, entry: QueueEntry, now: int) -> Assignment:
        self._remove(entry.conv)
        state.active.add(entry.conv)
        state.unaccepted[entry.conv] = now
        state.last_assigned = now
        return Assignment(
            conv=entry.conv,
            agent=state.id,
            group=entry.group,
            customer=entry.customer,
            waited=max(0, now - entry.since),
        )

    async def assign_next(self, group: str, now: int) -> Assignment | None:
        if not any(group in a.groups and a.available() for a in self._agents.values()):
            return None  # nobody free: no need to look at each waiting entry
        for table in (self._live, self._backlog):
            for entry in list(table.get(group, {}).values()):
                state = self._best(entry)
                if state is not None:
                    return self._give(state, entry, now)
        return None

    async def pick(self, agent_id: str, conv: str, now: int) -> Assignment:
        entry = self._where.get(conv)
        if entry is None:
            raise refuse(ErrorCode.NOT_FOUND, f"conversation {conv!r} is not queued")
        state = self._agents.get(agent_id)
        if state is None or entry.group not in state.groups:
            raise refuse(ErrorCode.NOT_MEMBER, f"you are not in group {entry.group!r}")
        if not state.available():
            raise refuse(
                ErrorCode.AGENT_UNAVAILABLE, "you are at capacity or not online (set status)"
            )
        return self._give(state, entry, now)

    async def reserve(self, agent_id: str, conv: str, now: int, *, force: bool = False) -> bool:
        state = self._agents.get(agent_id)
        if state is None:  # admins and unconfigured agents hold conversations off the books
            if force:
                self._remove(conv)
            return force
        if conv in state.active:
            return True
        if not force and not state.available():
            return False
        self._remove(conv)
        state.active.add(conv)
        state.unaccepted[conv] = now
        state.last_assigned = now
        return True

    async def holds(self, agent_id: str, conv: str) -> bool:
        state = self._agents.get(agent_id)
        return state is not None and conv in state.active

    async def move(
        self, conv: str, from_agent: str | None, to_agent: str, now: int, *, force: bool = False
    ) -> bool:
        target = self._agents.get(to_agent)
        if target is None:
            if not force:
                return False
        elif conv not in target.active:
            if not force and not target.available():
                return False
            target.active.add(conv)
            target.unaccepted[conv] = now
            target.last_assigned = now
        source = self._agents.get(from_agent) if from_agent is not None else None
        if source is not None and source is not target:
            source.active.discard(conv)
            source.unaccepted.pop(conv, None)
        self._remove(conv)
        return True

    async def release(self, agent_id: str, conv: str, now: int) -> None:
        state = self._agents.get(agent_id)
        if state is not None:
            state.active.discard(conv)
            state.unaccepted.pop(conv, None)

    async def accepted(self, agent_id: str, conv: str) -> None:
        state = self._agents.get(agent_id)
        if state is not None:
            state.unaccepted.pop(conv, None)


def _copy(state: AgentState) -> AgentState:
    return dataclasses.replace(state, active=set(state.active), unaccepted=dict(state.unaccepted))
