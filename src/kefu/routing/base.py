"""The routing-backend interface and its records.

The routing state is what changes every second and must be shared by every node: the
queue of each skill group, each agent's status, connections and load. It is derived
state: the system of record (the message store) holds each conversation's state and
agent, and :meth:`RoutingBackend.rebuild` recreates the routing state from it.

Atomicity is the contract. :meth:`assign_next`, :meth:`pick` and :meth:`reserve` each take
a capacity slot and (for the first two) a queue entry in one indivisible step, so under
concurrent arrivals no agent exceeds their capacity and no conversation is handed out
twice, however many nodes call them. Times are Unix milliseconds, so that nodes agree.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
from collections.abc import Collection

from kefu.errors import ErrorCode, KefuError
from kefu.model import AgentStatus


class RoutingError(KefuError):
    """An atomic routing step was refused; ``code`` says why (state unchanged)."""


@dataclasses.dataclass(slots=True)
class QueueEntry:
    conv: str
    customer: str
    group: str
    #: When the customer started waiting (ms); kept when requeued at the head.
    since: int
    #: The agent to prefer (the customer's previous agent), when online and free.
    prefer: str | None = None
    #: Agents to offer it to only when nobody else is free (e.g. who just passed it on).
    excluded: frozenset[str] = frozenset()
    #: Left a message (overflow or out of hours) instead of waiting live.
    backlog: bool = False


@dataclasses.dataclass(slots=True)
class AgentState:
    id: str
    capacity: int
    groups: frozenset[str]
    #: The status the agent chose; ``effective`` says what routing uses.
    status: AgentStatus = AgentStatus.ONLINE
    connections: int = 0
    #: Conversations the agent holds (assigned or waiting on the customer).
    active: set[str] = dataclasses.field(default_factory=set)
    #: Assigned conversations not yet accepted, and when they were assigned (ms).
    unaccepted: dict[str, int] = dataclasses.field(default_factory=dict)
    #: When the agent last got a conversation, or came online (ms): ties go to the oldest.
    last_assigned: int = 0
    #: Since when the agent has had no connection (ms); None while connected.
    disconnected_at: int | None = None

    @property
    def load(self) -> int:
        return len(self.active)

    @property
    def effective(self) -> AgentStatus:
        """Offline without connections, else the chosen status."""
        return AgentStatus.OFFLINE if self.connections == 0 else self.status

    def available(self) -> bool:
        """Whether the router may give this agent one more conversation now."""
        return (
            self.status is AgentStatus.ONLINE
            and self.connections > 0
            and len(self.active) < self.capacity
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Assignment:
    conv: str
    agent: str
    group: str
    customer: str
    #: How long the conversation waited in the queue (ms).
    waited: int


class RoutingBackend(abc.ABC):
    """Queues, presence and load; see the module docstring for the atomicity contract."""

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def exclusive(self, key: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Hold ``key`` against every other holder of it, on any node, for a short step
        (e.g. a customer's open: search, then create). One process needs nothing more
        than its own locks: the default holds nothing."""
        return contextlib.nullcontext()

    # -- recovery (the state is derived: see the module docstring) ------------------------------

    async def claim_rebuild(self) -> bool:
        """True when the state is missing and this caller should rebuild it from the store
        (then call :meth:`rebuilt`). Shared backends let exactly one node do it."""
        return False

    async def rebuilt(self) -> None:
        return None

    async def needs_report(self) -> bool:
        """True when this node's agent connection counts are missing from the state (a
        shared backend that lost its data): report them with :meth:`report`."""
        return False

    async def report(self, counts: dict[str, int], now: int) -> None:
        """Set the number of connections each agent has on this node."""
        return None

    async def forget_node(self, incarnation: str, now: int) -> list[str]:
        """A node died: drop its agents' connections; returns the agents it had."""
        return []

    # -- agents -----------------------------------------------------------------------------

    @abc.abstractmethod
    async def configure_agent(
        self, agent_id: str, capacity: int, groups: Collection[str], now: int
    ) -> None:
        """Create or update an agent's capacity and groups (status and load are kept)."""

    @abc.abstractmethod
    async def remove_agent(self, agent_id: str) -> None: ...

    @abc.abstractmethod
    async def agent(self, agent_id: str) -> AgentState | None:
        """A snapshot of one agent's state."""

    @abc.abstractmethod
    async def agents(self) -> list[AgentState]:
        """Snapshots of every agent's state."""

    @abc.abstractmethod
    async def connected(self, agent_id: str, now: int) -> AgentState | None:
        """One more connection of the agent (None when not an agent)."""

    @abc.abstractmethod
    async def disconnected(self, agent_id: str, now: int) -> AgentState | None:
        """One connection of the agent fewer; the grace period starts at zero."""

    @abc.abstractmethod
    async def set_status(self, agent_id: str, status: AgentStatus, now: int) -> AgentState:
        """Set the status the agent chose."""

    async def gone(self, grace_ms: int, now: int) -> list[str]:
        """Agents without a connection for ``grace_ms`` who still hold conversations."""
        return gone(await self.agents(), grace_ms, now)

    # -- queues -----------------------------------------------------------------------------

    @abc.abstractmethod
    async def enqueue(self, entry: QueueEntry, *, head: bool = False) -> None:
        """Put a conversation in its group's queue (at the head when requeued)."""

    @abc.abstractmethod
    async def dequeue(self, conv: str) -> QueueEntry | None:
        """Take a conversation out of whatever queue holds it."""

    @abc.abstractmethod
    async def queue(self, group: str) -> list[QueueEntry]:
        """The group's queue in order: live entries first, then left messages."""

    @abc.abstractmethod
    async def queue_length(self, group: str) -> int:
        """How many conversations the group's queue holds (live and left messages)."""

    @abc.abstractmethod
    async def queued_groups(self) -> list[str]:
        """Groups with at least one queued conversation."""

    @abc.abstractmethod
    async def move_to_backlog(self, group: str, older_than: int) -> list[QueueEntry]:
        """Live entries waiting since before ``older_than`` become left messages."""

    # -- assignment (atomic) ------------------------------------------------------------------

    @abc.abstractmethod
    async def assign_next(self, group: str, now: int) -> Assignment | None:
        """Pop the group's next conversation and give it to the best available agent.

        Best: the entry's preferred agent if available, else the least loaded available
        member of the group, ties to the one who got a conversation longest ago; the
        entry's excluded agents only when no other member is available. None when no
        entry can be assigned.
        """

    @abc.abstractmethod
    async def pick(self, agent_id: str, conv: str, now: int) -> Assignment:
        """The agent takes a queued conversation of one of their groups.

        Raises RoutingError: ``not_found`` (not queued), ``not_member`` (not their group),
        ``agent_unavailable`` (at capacity or not online).
        """

    @abc.abstractmethod
    async def reserve(self, agent_id: str, conv: str, now: int, *, force: bool = False) -> bool:
        """Give the agent a slot for ``conv`` unless unavailable or at capacity (``force``
        ignores that). A new slot is unaccepted until :meth:`accepted`."""

    @abc.abstractmethod
    async def move(
        self, conv: str, from_agent: str | None, to_agent: str, now: int, *, force: bool = False
    ) -> bool:
        """Hand ``conv``'s slot from one agent to another in one step (a transfer), unless
        ``to_agent`` is unavailable or at capacity (``force`` ignores that, to undo)."""

    @abc.abstractmethod
    async def holds(self, agent_id: str, conv: str) -> bool:
        """Whether the agent has a slot for ``conv``."""

    @abc.abstractmethod
    async def release(self, agent_id: str, conv: str, now: int) -> None:
        """The agent no longer holds ``conv``."""

    @abc.abstractmethod
    async def accepted(self, agent_id: str, conv: str) -> None:
        """The agent took on the conversation: its accept timer stops."""

    async def unaccepted_since(self, before: int) -> list[tuple[str, str]]:
        """(agent, conv) pairs assigned before ``before`` and not yet accepted."""
        return unaccepted_since(await self.agents(), before)


def gone(agents: Collection[AgentState], grace_ms: int, now: int) -> list[str]:
    """Of a snapshot (:meth:`RoutingBackend.agents`): agents without a connection for
    ``grace_ms`` who still hold conversations."""
    return [
        a.id
        for a in agents
        if a.connections == 0
        and a.disconnected_at is not None
        and now - a.disconnected_at >= grace_ms
        and a.active
    ]


def unaccepted_since(agents: Collection[AgentState], before: int) -> list[tuple[str, str]]:
    """Of a snapshot: (agent, conv) pairs assigned before ``before``, not yet accepted."""
    return [(a.id, conv) for a in agents for conv, at in a.unaccepted.items() if at < before]


def refuse(code: ErrorCode, message: str) -> RoutingError:
    return RoutingError(message, code=code)
