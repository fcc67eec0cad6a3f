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
    """Lifecycle states; the transition rules arrive with the customer-service issue."""

    QUEUED = "queued"
    ASSIGNED = "assigned"
    WAITING = "waiting"
    RESOLVED = "resolved"
    CLOSED = "closed"


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
