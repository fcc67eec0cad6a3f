"""Domain records shared by the services and the storage backends."""

from __future__ import annotations

import dataclasses
import enum


class Role(enum.StrEnum):
    CUSTOMER = "customer"
    AGENT = "agent"
    ADMIN = "admin"
    SYSTEM = "system"


class ConversationState(enum.StrEnum):
    """Lifecycle states; the transitions between them are in :mod:`kefu.lifecycle`."""

    QUEUED = "queued"
    ASSIGNED = "assigned"
    WAITING = "waiting"
    RESOLVED = "resolved"
    CLOSED = "closed"


class Visibility(enum.StrEnum):
    """Who may see a stored message."""

    ALL = "all"  # every participant
    INTERNAL = "internal"  # agents and admins only: private notes and whispers


class AgentStatus(enum.StrEnum):
    ONLINE = "online"  # takes new conversations
    AWAY = "away"  # keeps their conversations, gets no new ones
    OFFLINE = "offline"  # their conversations go back to the queue


class RoutingMode(enum.StrEnum):
    AUTO = "auto"  # the router assigns queued conversations
    POOL = "pool"  # agents pick queued conversations themselves


@dataclasses.dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated user: who they are and in which role."""

    user_id: str
    role: Role


@dataclasses.dataclass(frozen=True, slots=True)
class NewMessage:
    """A message to store; the store assigns ``seq``, ``msg_id`` and ``ts``."""

    conv: str
    sender: str
    sender_role: Role
    client_msg_id: str | None
    type: str
    body: bytes
    visibility: Visibility = Visibility.ALL
    #: The conversation's (state, agent) as the sender was authorised against. A store
    #: whose conversation hints may be stale (PostgreSQL, shared by several nodes) checks
    #: it under the conversation's row lock and fails the append with
    #: :class:`~kefu.errors.StaleConversation` when it no longer holds; a store that is
    #: the only writer may ignore it.
    expect: tuple[ConversationState, str | None] | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class StoredMessage:
    conv: str
    seq: int
    msg_id: str
    sender: str
    sender_role: str
    client_msg_id: str | None
    type: str
    body: bytes
    ts: int
    duplicate: bool = False
    visibility: str = "all"

    @property
    def internal(self) -> bool:
        return self.visibility != "all"


@dataclasses.dataclass(frozen=True, slots=True)
class Conversation:
    id: str
    customer_id: str
    state: ConversationState
    created_at: int
    agent_id: str | None = None
    group_id: str | None = None
    context_type: str | None = None
    context: bytes | None = None
    labels: tuple[str, ...] = ()
    updated_at: int = 0
    assigned_at: int | None = None
    accepted_at: int | None = None
    first_assigned_at: int | None = None
    first_response_at: int | None = None
    resolved_at: int | None = None
    closed_at: int | None = None
    close_reason: str | None = None
    previous_agent_id: str | None = None
    successor_id: str | None = None
    csat_score: int | None = None
    csat_comment: str | None = None
    #: When the customer was offered leave-a-message in this stay in the queue (ms).
    left_message_at: int | None = None

    def participants(self) -> tuple[str, ...]:
        """Users who receive this conversation's pushes."""
        if self.agent_id is None or self.agent_id == self.customer_id:
            return (self.customer_id,)
        return (self.customer_id, self.agent_id)


@dataclasses.dataclass(frozen=True, slots=True)
class ConversationSummary:
    """A conversation as listed for one user: with its last seq and their read mark."""

    conversation: Conversation
    last_seq: int
    read_seq: int


@dataclasses.dataclass(frozen=True, slots=True)
class Group:
    """A skill group: a queue of conversations and the agents who serve it."""

    id: str
    name: str
    mode: RoutingMode = RoutingMode.AUTO
    welcome: str = ""
    #: Live-queue length past which new customers are offered leave-a-message (0: no cap).
    max_queue: int = 0
    #: Seconds a customer may wait before being offered leave-a-message (0: no limit).
    max_wait: float = 0.0
    #: Business hours (see :mod:`kefu.schedule`); None means always open.
    schedule: dict[str, object] | None = None
    out_of_hours_message: str = ""
    created_at: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Agent:
    """An agent's durable settings (their live status is in the routing backend)."""

    id: str
    name: str
    capacity: int
    groups: tuple[str, ...]
    created_at: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class CannedResponse:
    id: str
    group_id: str | None  # None: for every group
    shortcut: str
    text: str
    created_at: int = 0
